//! wireguard: Flannel's wireguard backend without the kernel module. The WireGuard protocol runs
//! in userspace on the same batched TUN/UDP pump as the udp backend, so it speaks standard
//! WireGuard to Flannel's kernel backend, wireguard-go or `wg` peers, and is fast: our own
//! handshake (`handshake`, Noise IKpsk2), sessions (`session`: counters reserved per run,
//! sealed and opened in place on every core at once), timers (`peers`) and the cookie gate in
//! front of handshakes (`cookie`), with boringtun's `Tunn` as the third-party peer of the tests.
//!
//! Like Flannel v0.28.9: TUN devices holding the lease's network address with the Network's
//! prefix per family (one route for the whole Network, and IPv6Network, into the device),
//! MTU = underlay - 80, one WireGuard peer per remote node and device with AllowedIPs = its
//! lease subnets, the private key in a key file (created once, reused, the same for every
//! device), and `{"PublicKey":…,"Port":ListenPort}` in BackendData with EnableIPv4,
//! `{"PublicKey":…,"Port":ListenPortV6}` in BackendV6Data with EnableIPv6.
//!
//! `Mode` separate (the default) runs `flannel-wg` for IPv4 over IPv4 and `flannel-wg-v6` for
//! IPv6 over IPv6; auto, ipv4 and ipv6 run `flannel-wg` alone for both families, each peer
//! reached over the family the mode picks (see `lease.rs`).

mod codec;
#[cfg(test)]
mod codec_tests;
mod config;
mod cookie;
#[cfg(feature = "testutil")]
pub mod cost;
mod crypto;
mod device;
#[cfg(any(test, fuzzing))]
pub mod fuzzing;
mod handshake;
#[cfg(test)]
mod handshake_tests;
mod keys;
mod lease;
mod peers;
#[cfg(test)]
mod pump_tests;
mod session;
mod source_limit;

use std::collections::{HashMap, HashSet};
use std::net::Ipv6Addr;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use ipnet::IpNet;
use serde_json::json;
use subnet_manager::config::NetworkConfig;
use subnet_manager::lease::Lease;

use super::pump::{io_error, Family};
use super::{Backend, BackendError, LeaseData, NodeInfo, Repaired};
use crate::netlink::Netlink;
use crate::stats::Stats;
use config::{DeviceSpec, WgConfig};
use device::WgDevice;
use keys::StaticKeys;
use lease::device_peer;

/// A PublicKey as the peer table keys it (its bytes, in standard base64); `None` if it is not
/// a key.
pub(super) fn canonical_key(s: &str) -> Option<String> {
    keys::decode_key(s).map(|k| keys::encode_key(&k))
}

const TYPE: &str = "wireguard";
/// Flannel's figure: outer IPv6 header (40, the worst case) + UDP (8) + WireGuard (32).
const OVERHEAD: u32 = 80;
/// Flannel's key file.
pub const DEFAULT_KEY_FILE: &str = "/run/flannel/wgkey";

pub struct WireGuard {
    netlink: Netlink,
    network: NetworkConfig,
    cfg: WgConfig,
    public_key: [u8; 32],
    /// Our PublicIPv6: Mode auto reaches a peer over IPv6 only if it is public.
    public_ipv6: Option<Ipv6Addr>,
    /// One per device the config calls for (two in dual-stack separate mode).
    devices: Vec<WgDevice>,
    /// The devices' counters, added up.
    stats: Arc<Stats>,
    mtu: usize,
}

impl WireGuard {
    pub fn new(network: &NetworkConfig, node: &NodeInfo) -> Result<Self, BackendError> {
        let cfg = WgConfig::parse(network)?;
        let key_file = node
            .wg_key_file
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_KEY_FILE));
        let keys = keys::load_or_create(&key_file)?;
        let specs = cfg.devices();
        tracing::info!(
            public_key = %keys::encode_key(keys.public.as_bytes()),
            file = %key_file.display(),
            devices = ?specs.iter().map(|d| d.name).collect::<Vec<_>>(),
            ?cfg,
            "WireGuard key loaded"
        );
        let seed =
            keys::random_key().map_err(|e| io_error("reading random bytes for peer indexes", e))?;
        let mtu = node.iface.mtu.saturating_sub(OVERHEAD) as usize;
        let stats = Arc::new(Stats::default());
        let devices = specs
            .into_iter()
            .zip(seed.chunks_exact(3))
            .map(|(spec, s)| {
                let keys = StaticKeys {
                    secret: keys.secret.clone(),
                    public: keys.public,
                };
                let seed = u32::from_le_bytes([s[0], s[1], s[2], 0]);
                WgDevice::new(spec, keys, &cfg, mtu, stats.clone(), seed, node.datapath)
            })
            .collect();
        Ok(WireGuard {
            netlink: Netlink::open()?,
            network: network.clone(),
            cfg,
            public_key: *keys.public.as_bytes(),
            public_ipv6: node.public_ipv6,
            devices,
            stats,
            mtu,
        })
    }

    /// The families `dev` carries, with our lease's subnet and the Network of each.
    fn families(&self, dev: &DeviceSpec, own: &Lease) -> Result<Vec<Family>, BackendError> {
        let mut out = Vec::new();
        if dev.carries(false, &self.cfg) {
            let (Some(subnet), Some(network)) = (own.key.ipv4, self.network.network) else {
                return Err(BackendError::Config(format!(
                    "{}: IPv4 is enabled but our lease has no IPv4 subnet",
                    dev.name
                )));
            };
            out.push(Family {
                subnet: IpNet::V4(subnet),
                network: IpNet::V4(network),
            });
        }
        if dev.carries(true, &self.cfg) {
            let (Some(subnet), Some(network)) = (own.key.ipv6, self.network.ipv6_network) else {
                return Err(BackendError::Config(format!(
                    "{}: IPv6 is enabled but our lease has no IPv6 subnet",
                    dev.name
                )));
            };
            out.push(Family {
                subnet: IpNet::V6(subnet),
                network: IpNet::V6(network),
            });
        }
        Ok(out)
    }

    /// `flanneld_datapath_peers`: remote nodes, however many devices each is a peer of.
    fn publish_peer_count(&self) {
        let keys: HashSet<&[u8; 32]> = self.devices.iter().flat_map(|d| d.peers.keys()).collect();
        self.stats.table_published(keys.len());
    }
}

#[async_trait]
impl Backend for WireGuard {
    fn name(&self) -> &'static str {
        TYPE
    }

    fn mtu(&self) -> u32 {
        self.mtu as u32
    }

    fn lease_data(&self) -> LeaseData {
        // Flannel publishes both objects by family, whatever the mode, with the same key.
        let key = keys::encode_key(&self.public_key);
        LeaseData {
            backend_type: Some(TYPE.into()),
            backend_data: self
                .cfg
                .ipv4
                .then(|| json!({"PublicKey": key, "Port": self.cfg.listen_port})),
            backend_v6_data: self
                .cfg
                .ipv6
                .then(|| json!({"PublicKey": key, "Port": self.cfg.listen_port_v6})),
        }
    }

    fn stats(&self) -> Option<Arc<Stats>> {
        Some(self.stats.clone())
    }

    async fn start(&mut self, own: &Lease) -> Result<(), BackendError> {
        let families: Vec<Vec<Family>> = self
            .devices
            .iter()
            .map(|d| self.families(&d.spec, own))
            .collect::<Result<_, _>>()?;
        for (dev, families) in self.devices.iter_mut().zip(families) {
            dev.start(&self.netlink, &families).await?;
        }
        Ok(())
    }

    async fn repair(&mut self) -> Repaired {
        // Each device is checked whatever the other's failure.
        let mut pass = Repaired::default();
        for dev in &self.devices {
            pass.note(dev.repair(&self.netlink).await.map(usize::from));
        }
        pass
    }

    async fn add_peer(&mut self, peer: &Lease) -> Result<(), BackendError> {
        let err = |reason: String| BackendError::Peer {
            peer: peer.key.to_string(),
            reason,
        };
        let plans: Vec<_> = self
            .devices
            .iter()
            .map(|d| device_peer(peer, &d.spec, &self.cfg, self.public_ipv6))
            .collect();
        let ours = |p: &Result<Option<lease::DevicePeer>, String>| matches!(p, Ok(Some(p)) if p.public_key == self.public_key);
        if plans.iter().any(ours) {
            return Err(err(
                "ignored: it carries our own public key (a copied key file?)".into(),
            ));
        }
        let (mut carried, mut changed, mut refused) = (false, false, Vec::new());
        for (dev, plan) in self.devices.iter_mut().zip(plans) {
            match plan {
                Ok(p) => {
                    carried |= p.is_some();
                    changed |= dev.set_lease(&peer.key, p);
                }
                // What the device had of this lease stays, as a bad update leaves it.
                Err(why) => refused.push(format!("{}: {why}", dev.spec.name)),
            }
        }
        if changed {
            self.publish_peer_count();
        }
        if !refused.is_empty() {
            return Err(err(refused.join("; ")));
        }
        if !carried {
            return Err(err("no subnet of a family we carry".into()));
        }
        Ok(())
    }

    async fn remove_peer(&mut self, peer: &Lease) -> Result<(), BackendError> {
        let mut changed = false;
        for dev in &mut self.devices {
            changed |= dev.set_lease(&peer.key, None);
        }
        if changed {
            self.publish_peer_count();
        }
        Ok(())
    }

    async fn reconcile(&mut self, peers: &[Lease]) -> Result<(), BackendError> {
        for dev in &mut self.devices {
            let mut leases = HashMap::new();
            for p in peers {
                match device_peer(p, &dev.spec, &self.cfg, self.public_ipv6) {
                    Ok(Some(dp)) if dp.public_key != self.public_key => {
                        leases.insert(p.key.clone(), dp);
                    }
                    Ok(_) => {}
                    Err(why) => {
                        tracing::warn!(peer = %p.key, device = dev.spec.name, "wireguard lease ignored: {why}");
                    }
                }
            }
            dev.set_all(leases);
        }
        self.publish_peer_count();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use subnet_manager::lease::{LeaseAttrs, SubnetKey};

    fn lease(json: &str) -> Lease {
        Lease {
            key: SubnetKey::parse("10.244.7.0-24").expect("key"),
            attrs: LeaseAttrs::from_json(json.as_bytes()).expect("attrs"),
        }
    }

    const KEY: &str = "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=";
    const KEY2: &str = "3p7bfXt9wbTTW2HC7OQ1Nz+DQ8hbeGdNrfx+FG+IK08=";

    fn wg_lease(subnet: &str, ip: &str, key: &str) -> Lease {
        Lease {
            key: SubnetKey::parse(subnet).expect("key"),
            attrs: LeaseAttrs::from_json(
                format!(
                    r#"{{"PublicIP":"{ip}","BackendType":"wireguard","BackendData":{{"PublicKey":"{key}","Port":51820}}}}"#
                )
                .as_bytes(),
            )
            .expect("attrs"),
        }
    }

    /// A dual-stack lease as Flannel v0.28.9 writes it.
    fn dual_lease(n: u8, key: &str) -> Lease {
        Lease {
            key: SubnetKey::parse(&format!("10.244.{n}.0-24&fc00:44:0:{n}::-64")).expect("key"),
            attrs: LeaseAttrs::from_json(
                format!(
                    r#"{{"PublicIP":"172.30.0.{n}","PublicIPv6":"fd00:30::{n}","BackendType":"wireguard","BackendData":{{"PublicKey":"{key}","Port":51820}},"BackendV6Data":{{"PublicKey":"{key}","Port":51821}}}}"#
                )
                .as_bytes(),
            )
            .expect("attrs"),
        }
    }

    /// The table device `dev`'s packet threads see: (peer index, public key, endpoint,
    /// AllowedIPs among a few pod addresses).
    fn table_of(wg: &WireGuard, dev: usize) -> Vec<(u32, String, SocketAddr, Vec<String>)> {
        let t = wg.devices[dev].codec.table.load();
        t.peers()
            .iter()
            .enumerate()
            .map(|(slot, p)| {
                let nets = [
                    "10.244.1.0",
                    "10.244.2.0",
                    "10.244.3.0",
                    "fc00:44:0:1::",
                    "fc00:44:0:2::",
                ]
                .iter()
                .filter(|n| t.allows(slot, n.parse().expect("ip")))
                .map(|n| n.to_string())
                .collect();
                (
                    p.index,
                    keys::encode_key(&p.public_key),
                    p.lock().endpoint,
                    nets,
                )
            })
            .collect()
    }

    fn table(wg: &WireGuard) -> Vec<(u32, String, SocketAddr, Vec<String>)> {
        table_of(wg, 0)
    }

    fn backend(config: &str, dir: &tempfile::TempDir) -> WireGuard {
        let config = NetworkConfig::parse(config.as_bytes()).expect("config");
        let node = NodeInfo {
            wg_key_file: Some(dir.path().join("wgkey")),
            ..NodeInfo::for_test(config.enable_ipv6)
        };
        WireGuard::new(&config, &node).expect("backend")
    }

    #[tokio::test]
    async fn peers_follow_the_leases() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut wg = backend(
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"wireguard"}}"#,
            &dir,
        );
        assert_eq!(wg.mtu(), 1500 - 80);
        let data = wg.lease_data();
        assert_eq!(data.backend_type.as_deref(), Some("wireguard"));
        assert_eq!(data.backend_v6_data, None, "no IPv6, no BackendV6Data");
        let own = data.backend_data.expect("data");
        assert_eq!(own["Port"], 51820);
        let own_key = own["PublicKey"].as_str().expect("key").to_string();

        wg.add_peer(&wg_lease("10.244.1.0-24", "172.30.0.12", KEY))
            .await
            .expect("peer");
        let t = table(&wg);
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].2, "172.30.0.12:51820".parse().expect("addr"));
        let first_index = t[0].0;

        // A second lease with the same key (a node that moved subnet before its old lease
        // expired) adds AllowedIPs to the same peer, keeping its noise state.
        wg.add_peer(&wg_lease("10.244.2.0-24", "172.30.0.12", KEY))
            .await
            .expect("peer");
        let t = table(&wg);
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].0, first_index);
        assert_eq!(t[0].3, vec!["10.244.1.0", "10.244.2.0"]);

        // The node moves: the endpoint follows the lease.
        wg.add_peer(&wg_lease("10.244.2.0-24", "172.30.0.99", KEY))
            .await
            .expect("peer");
        assert_eq!(table(&wg)[0].2, "172.30.0.99:51820".parse().expect("addr"));

        // A lease whose key changed (the node got a new key file) gets a new peer.
        wg.add_peer(&wg_lease("10.244.1.0-24", "172.30.0.12", KEY2))
            .await
            .expect("peer");
        let t = table(&wg);
        assert_eq!(t.len(), 2);
        let renewed = t.iter().find(|p| p.1 == KEY2).expect("new key");
        assert_ne!(renewed.0, first_index);
        assert_eq!(renewed.3, vec!["10.244.1.0"]);
        assert_eq!(wg.stats.peers.load(std::sync::atomic::Ordering::Relaxed), 2);

        // Removal: the old key's last lease goes, and its peer with it.
        let old = Arc::downgrade(
            wg.devices[0]
                .peers
                .get(&keys::decode_key(KEY).expect("key"))
                .expect("peer"),
        );
        wg.remove_peer(&wg_lease("10.244.2.0-24", "172.30.0.99", KEY))
            .await
            .expect("removed");
        let t = table(&wg);
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].1, KEY2);
        assert!(
            old.upgrade().is_none(),
            "the removed peer (and its sessions) is freed"
        );

        // Leases we must not take as peers.
        let ours = wg_lease("10.244.3.0-24", "172.30.0.13", &own_key);
        assert!(wg.add_peer(&ours).await.is_err(), "our own key");
        // (Another backend's lease never gets here: the daemon's admission check keeps it out.)
        wg.reconcile(&[wg_lease("10.244.3.0-24", "172.30.0.13", KEY), ours])
            .await
            .expect("reconcile");
        let t = table(&wg);
        assert_eq!(t.len(), 1);
        assert_eq!(
            (t[0].1.as_str(), t[0].3.clone()),
            (KEY, vec!["10.244.3.0".to_string()])
        );
    }

    const DUAL: &str = r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fc00:44::/48","Backend":{"Type":"wireguard"MODE}}"#;

    #[tokio::test]
    async fn two_leases_with_one_key_keep_one_endpoint() {
        // A node between two subnets holds two leases with one key. Every full sync passes
        // both: the endpoint must not follow whichever came last (hash order), nor undo
        // roaming each time.
        let dir = tempfile::tempdir().expect("tempdir");
        let mut wg = backend(
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"wireguard"}}"#,
            &dir,
        );
        let a = wg_lease("10.244.1.0-24", "172.30.0.13", KEY);
        let b = wg_lease("10.244.2.0-24", "172.30.0.12", KEY);
        let low: SocketAddr = "172.30.0.12:51820".parse().expect("addr");
        for leases in [[a.clone(), b.clone()], [b.clone(), a.clone()]] {
            for _ in 0..3 {
                wg.reconcile(&leases).await.expect("reconcile");
                assert_eq!(table(&wg)[0].2, low);
            }
        }
        let roamed: SocketAddr = "192.0.2.1:4000".parse().expect("addr");
        for p in wg.devices[0].peers.values() {
            p.lock().endpoint = roamed;
        }
        wg.reconcile(&[a.clone(), b.clone()])
            .await
            .expect("reconcile");
        assert_eq!(table(&wg)[0].2, roamed, "roaming kept");
        // The lease whose endpoint the peer had goes (it expired after the node moved): the
        // peer moves to the one left, instead of staying on a dead address.
        wg.remove_peer(&b).await.expect("remove");
        let high: SocketAddr = "172.30.0.13:51820".parse().expect("addr");
        assert_eq!(table(&wg)[0].2, high);
    }

    #[tokio::test]
    async fn dual_stack_lease_data_and_devices_like_flannel() {
        for mode in ["", r#","Mode":"ipv6""#] {
            let dir = tempfile::tempdir().expect("tempdir");
            let wg = backend(&DUAL.replace("MODE", mode), &dir);
            let data = wg.lease_data();
            let (v4, v6) = (
                data.backend_data.expect("BackendData"),
                data.backend_v6_data.expect("BackendV6Data"),
            );
            // One key for every device; each object says its family's port, whatever the mode.
            assert_eq!(v4["PublicKey"], v6["PublicKey"], "{mode}");
            assert_eq!(
                (v4["Port"].as_u64(), v6["Port"].as_u64()),
                (Some(51820), Some(51821))
            );
            let names: Vec<_> = wg.devices.iter().map(|d| d.spec.name).collect();
            let want: &[&str] = if mode.is_empty() {
                &["flannel-wg", "flannel-wg-v6"]
            } else {
                &["flannel-wg"]
            };
            assert_eq!(names, want);
            assert_eq!(wg.mtu(), 1420, "underlay - 80 on every device");
            assert!(wg.devices.iter().all(|d| d.state.mtu == 1420));
        }
        // IPv6 only: BackendV6Data alone.
        let dir = tempfile::tempdir().expect("tempdir");
        let wg = backend(
            r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fc00:44::/48","Backend":{"Type":"wireguard"}}"#,
            &dir,
        );
        let data = wg.lease_data();
        assert_eq!(data.backend_data, None);
        assert_eq!(data.backend_v6_data.expect("v6")["Port"], 51821);
    }

    #[tokio::test]
    async fn separate_mode_gives_each_family_its_device() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut wg = backend(&DUAL.replace("MODE", ""), &dir);
        wg.add_peer(&dual_lease(1, KEY)).await.expect("peer");
        wg.add_peer(&dual_lease(2, KEY2)).await.expect("peer");
        let (v4, v6) = (table_of(&wg, 0), table_of(&wg, 1));
        assert_eq!(
            v4.iter()
                .map(|p| (p.1.as_str(), p.2.to_string(), p.3.clone()))
                .collect::<Vec<_>>(),
            [
                (
                    KEY,
                    "172.30.0.1:51820".to_string(),
                    vec!["10.244.1.0".to_string()]
                ),
                (
                    KEY2,
                    "172.30.0.2:51820".to_string(),
                    vec!["10.244.2.0".to_string()]
                ),
            ]
        );
        assert_eq!(
            v6.iter()
                .map(|p| (p.1.as_str(), p.2.to_string(), p.3.clone()))
                .collect::<Vec<_>>(),
            [
                (
                    KEY,
                    "[fd00:30::1]:51821".to_string(),
                    vec!["fc00:44:0:1::".to_string()]
                ),
                (
                    KEY2,
                    "[fd00:30::2]:51821".to_string(),
                    vec!["fc00:44:0:2::".to_string()]
                ),
            ]
        );
        assert_eq!(
            wg.stats.peers.load(std::sync::atomic::Ordering::Relaxed),
            2,
            "two nodes, whatever the devices"
        );
        wg.remove_peer(&dual_lease(1, KEY)).await.expect("removed");
        assert_eq!((table_of(&wg, 0).len(), table_of(&wg, 1).len()), (1, 1));
        // A lease with a broken BackendV6Data: the IPv4 side still works, the error says so.
        let mut broken = dual_lease(3, KEY);
        broken.attrs.backend_v6_data = Some(serde_json::json!({"PublicKey": "nope"}));
        let err = wg.add_peer(&broken).await.expect_err("v6 data").to_string();
        assert!(
            err.contains("flannel-wg-v6: BackendV6Data.PublicKey"),
            "{err}"
        );
        assert_eq!((table_of(&wg, 0).len(), table_of(&wg, 1).len()), (2, 1));
    }

    #[tokio::test]
    async fn single_device_mode_carries_both_families_in_one_peer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut wg = backend(&DUAL.replace("MODE", r#","Mode":"ipv6""#), &dir);
        wg.add_peer(&dual_lease(1, KEY)).await.expect("peer");
        let t = table(&wg);
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].2, "[fd00:30::1]:51820".parse().expect("addr"));
        assert_eq!(t[0].3, ["10.244.1.0", "fc00:44:0:1::"]);
        // Same for the packet threads' routing: both families of pods, one peer.
        let codec = &wg.devices[0].codec;
        for dst in ["10.244.1.9", "fc00:44:0:1::9"] {
            let found = crate::backend::pump::Codec::route(&**codec, dst.parse().expect("ip"));
            assert_eq!(found.map(|p| p.index), Some(t[0].0), "{dst}");
        }
    }

    #[test]
    fn v4_lease_peers_like_flannel() {
        let cfg = |port: u16| {
            let json = format!(
                r#"{{"Network":"10.244.0.0/16","Backend":{{"Type":"wireguard","ListenPort":{port}}}}}"#
            );
            WgConfig::parse(&NetworkConfig::parse(json.as_bytes()).expect("config")).expect("wg")
        };
        let peer = |l: &Lease, port: u16| {
            let c = cfg(port);
            let dev = c.devices()[0];
            device_peer(l, &dev, &c, None).map(|p| p.expect("an IPv4 subnet"))
        };
        let new = lease(&format!(
            r#"{{"PublicIP":"172.30.0.13","PublicIPv6":null,"BackendType":"wireguard","BackendData":{{"Port":5555,"PublicKey":"{KEY}"}}}}"#
        ));
        let p = peer(&new, 51820).expect("newer Flannel");
        assert_eq!(p.endpoint, "172.30.0.13:5555".parse().expect("addr"));
        assert_eq!(p.allowed, ["10.244.7.0/24".parse::<IpNet>().expect("net")]);
        assert_eq!(keys::encode_key(&p.public_key), KEY);
        let old = lease(&format!(
            r#"{{"PublicIP":"172.30.0.13","BackendType":"wireguard","BackendData":{{"publickey":"{KEY}"}}}}"#
        ));
        let p = peer(&old, 51999).expect("older Flannel: no Port");
        assert_eq!(p.endpoint.port(), 51999, "our ListenPort");
        for (json, want) in [
            (
                r#"{"PublicIP":"172.30.0.13","BackendType":"wireguard"}"#,
                "no BackendData",
            ),
            (
                r#"{"PublicIP":"172.30.0.13","BackendType":"wireguard","BackendData":{"PublicKey":"xyz="}}"#,
                "PublicKey",
            ),
            (
                &format!(
                    r#"{{"PublicIP":"172.30.0.13","BackendType":"wireguard","BackendData":{{"PublicKey":"{KEY}","Port":0}}}}"#
                ),
                "Port",
            ),
            (
                &format!(
                    r#"{{"PublicIP":"0.0.0.0","BackendType":"wireguard","BackendData":{{"PublicKey":"{KEY}"}}}}"#
                ),
                "PublicIP",
            ),
        ] {
            let err = peer(&lease(json), 51820).expect_err(json);
            assert!(err.contains(want), "{json}: {err}");
        }
    }
}
