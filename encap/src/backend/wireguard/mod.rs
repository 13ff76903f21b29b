//! wireguard: Flannel's wireguard backend without the kernel module. The WireGuard protocol runs
//! in userspace (boringtun's noise state machine) on the same batched TUN/UDP pump as the udp
//! backend, so it speaks standard WireGuard to Flannel's kernel backend, wireguard-go or `wg`
//! peers, and is fast.
//!
//! Like Flannel: TUN `flannel-wg` holding the lease's network address with the Network's prefix
//! (one route for the whole Network into the device), MTU = underlay - 80, one WireGuard peer per
//! remote node with AllowedIPs = its lease subnet and endpoint = PublicIP:Port, the private key
//! in a key file (created once, reused), and `{"PublicKey":…,"Port":…}` in our lease.
//!
//! IPv4 only for now: `Mode` ipv6 and dual-stack configs are refused with a clear error.

mod codec;
#[cfg(test)]
mod codec_tests;
mod config;
mod keys;
mod peers;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use boringtun::noise::Tunn;
use boringtun::x25519::PublicKey;
use ipnet::Ipv4Net;
use serde_json::{json, Value};
use subnet_manager::config::NetworkConfig;
use subnet_manager::lease::{Lease, SubnetKey};

use super::pump::{io_error, Addressing, DeviceState, Outbox, Pump};
use super::{Backend, BackendError, LeaseData, NodeInfo};
use crate::netlink::Netlink;
use crate::stats::{Stats, Tally};
use codec::WgCodec;
use config::WgConfig;
use peers::{WgPeer, WgTable, INDEX_BITS};

const TYPE: &str = "wireguard";
const DEVICE: &str = "flannel-wg";
/// Flannel's figure: outer IPv6 header (40, the worst case) + UDP (8) + WireGuard (32).
const OVERHEAD: u32 = 80;
/// Flannel's key file.
pub const DEFAULT_KEY_FILE: &str = "/run/flannel/wgkey";
/// How often peer timers run: well under WireGuard's shortest timer (REKEY_TIMEOUT, 5 s).
const TIMER_TICK: Duration = Duration::from_millis(100);

/// One lease of a wireguard node, as it configures a peer.
#[derive(Clone, Debug, PartialEq, Eq)]
struct LeasePeer {
    public_key: [u8; 32],
    subnet: Ipv4Net,
    endpoint: SocketAddr,
}

pub struct WireGuard {
    netlink: Netlink,
    network: NetworkConfig,
    cfg: WgConfig,
    codec: Arc<WgCodec>,
    state: Arc<DeviceState>,
    /// Every wireguard lease but ours, by lease key.
    leases: HashMap<SubnetKey, LeasePeer>,
    /// One peer per public key (a node may briefly hold two leases with one key).
    peers: HashMap<[u8; 32], Arc<WgPeer>>,
    next_index: u32,
    /// The packet and timer threads, once started; dropping it stops them.
    pump: Option<Pump>,
    /// The TUN device's address for our lease.
    addressing: Addressing,
}

impl WireGuard {
    pub fn new(network: &NetworkConfig, node: &NodeInfo) -> Result<Self, BackendError> {
        let cfg = WgConfig::parse(network)?;
        let key_file = node
            .wg_key_file
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_KEY_FILE));
        let keys = keys::load_or_create(&key_file)?;
        tracing::info!(
            public_key = %keys::encode_key(keys.public.as_bytes()),
            file = %key_file.display(),
            port = cfg.listen_port,
            ?cfg,
            "WireGuard key loaded"
        );
        let seed =
            keys::random_key().map_err(|e| io_error("reading random bytes for peer indexes", e))?;
        let mtu = node.iface.mtu.saturating_sub(OVERHEAD) as usize;
        Ok(WireGuard {
            netlink: Netlink::open()?,
            network: network.clone(),
            cfg,
            codec: Arc::new(WgCodec::new(keys)),
            state: Arc::new(DeviceState::new(mtu)),
            leases: HashMap::new(),
            peers: HashMap::new(),
            next_index: u32::from_le_bytes([seed[0], seed[1], seed[2], 0]),
            pump: None,
            addressing: Addressing::new(DEVICE),
        })
    }
}

/// The peer a wireguard lease describes (`listen_port`: ours, for leases of older Flannel
/// that publish no Port); the error says why it cannot be one.
fn lease_peer(lease: &Lease, listen_port: u16) -> Result<LeasePeer, String> {
    let subnet = lease
        .key
        .ipv4
        .ok_or("no IPv4 subnet (the wireguard backend is IPv4 only for now)")?;
    let ip = lease.attrs.public_ip;
    if ip.is_unspecified() {
        return Err("no PublicIP".into());
    }
    let data = lease
        .attrs
        .backend_data
        .as_ref()
        .and_then(Value::as_object)
        .ok_or("no BackendData object with the node's PublicKey")?;
    // Go decodes BackendData case-insensitively.
    let get = |name: &str| subnet_manager::json::field(data, name);
    let public_key = get("PublicKey")
        .and_then(Value::as_str)
        .and_then(keys::decode_key)
        .ok_or("BackendData.PublicKey is not a base64 WireGuard key")?;
    // Older Flannel publishes no Port: its peers listen where we do.
    let port = match get("Port") {
        None => listen_port,
        Some(v) => v
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("BackendData.Port {v} is not a port"))?,
    };
    Ok(LeasePeer {
        public_key,
        subnet,
        endpoint: SocketAddr::new(IpAddr::V4(ip), port),
    })
}

impl WireGuard {
    fn alloc_index(&mut self) -> u32 {
        let mask = (1u32 << INDEX_BITS) - 1;
        loop {
            self.next_index = self.next_index.wrapping_add(1) & mask;
            let i = self.next_index;
            if i != 0 && !self.peers.values().any(|p| p.index == i) {
                return i;
            }
        }
    }

    /// Makes the peers match the leases: new keys get a fresh `Tunn`, gone keys are dropped
    /// (their keys wiped once the packet threads let go), endpoints follow lease changes; then
    /// the packet threads get the new table.
    fn sync_peers(&mut self, changed: &[LeasePeer]) {
        let mut wanted: HashMap<[u8; 32], Vec<Ipv4Net>> = HashMap::new();
        for l in self.leases.values() {
            wanted.entry(l.public_key).or_default().push(l.subnet);
        }
        self.peers.retain(|k, _| wanted.contains_key(k));
        for key in wanted.keys() {
            if self.peers.contains_key(key) {
                continue;
            }
            let Some(lease) = self.leases.values().find(|l| l.public_key == *key) else {
                continue;
            };
            let endpoint = changed
                .iter()
                .find(|l| l.public_key == *key)
                .map_or(lease.endpoint, |l| l.endpoint);
            let index = self.alloc_index();
            let tunn = Tunn::new(
                self.codec.keys().secret.clone(),
                PublicKey::from(*key),
                self.cfg.psk,
                self.cfg.keepalive,
                index,
                Some(self.codec.limiter.clone()),
            );
            self.peers
                .insert(*key, Arc::new(WgPeer::new(index, *key, tunn, endpoint)));
        }
        // A lease that moved its endpoint moves the peer, even if it had roamed meanwhile.
        for l in changed {
            if let Some(peer) = self.peers.get(&l.public_key) {
                let mut st = peer.lock();
                if st.configured != l.endpoint {
                    st.configured = l.endpoint;
                    st.endpoint = l.endpoint;
                }
            }
        }
        let mut entries: Vec<(Arc<WgPeer>, Vec<Ipv4Net>)> = wanted
            .into_iter()
            .filter_map(|(k, mut nets)| {
                nets.sort();
                Some((self.peers.get(&k)?.clone(), nets))
            })
            .collect();
        entries.sort_by_key(|(p, _)| p.index);
        self.state.stats.table_published(entries.len());
        self.codec.table.store(Arc::new(WgTable::new(entries)));
    }

    /// Opens flannel-wg (replacing a leftover device of that name that is not a TUN, e.g.
    /// Flannel's kernel WireGuard device on a node migrating to us) and starts the threads.
    async fn start_pump(&mut self) -> Result<(), BackendError> {
        let bind = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), self.cfg.listen_port);
        let start = || Pump::start("wg", DEVICE, bind, self.codec.clone(), self.state.clone());
        let mut pump = match start() {
            Ok(p) => p,
            Err(first) => {
                let Ok(old) = self.netlink.link_by_name(DEVICE).await else {
                    return Err(first);
                };
                tracing::warn!(
                    "{first}: replacing the existing {DEVICE} (index {})",
                    old.index
                );
                self.netlink
                    .handle()
                    .link()
                    .del(old.index)
                    .execute()
                    .await
                    .map_err(|e| BackendError::Config(format!("deleting the old {DEVICE}: {e}")))?;
                start()?
            }
        };
        let (codec, sender, state) = (self.codec.clone(), pump.sender(), self.state.clone());
        // Handshake retries, rekeying, keepalives, the rate limiter's reset.
        pump.spawn("wg-timers".into(), move |stop: &AtomicBool| {
            let mut buf = vec![0u8; 65_536 + 256];
            let mut due = Outbox::new();
            let mut tally = Tally::default();
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(TIMER_TICK);
                codec.tick(&mut buf, &mut due);
                sender.flush(&mut due, &mut tally);
                tally.flush_tx(&state.stats);
            }
        })?;
        self.pump = Some(pump);
        Ok(())
    }
}

#[async_trait]
impl Backend for WireGuard {
    fn name(&self) -> &'static str {
        TYPE
    }

    fn mtu(&self) -> u32 {
        self.state.mtu as u32
    }

    fn lease_data(&self) -> LeaseData {
        LeaseData {
            backend_type: Some(TYPE.into()),
            backend_data: Some(json!({
                "PublicKey": keys::encode_key(self.codec.keys().public.as_bytes()),
                "Port": self.cfg.listen_port,
            })),
            backend_v6_data: None,
        }
    }

    fn stats(&self) -> Option<Arc<Stats>> {
        Some(self.state.stats.clone())
    }

    async fn start(&mut self, own: &Lease) -> Result<(), BackendError> {
        let (Some(subnet), Some(network)) = (own.key.ipv4, self.network.network) else {
            return Err(BackendError::Config(
                "the wireguard backend needs an IPv4 lease".into(),
            ));
        };
        if self.pump.is_none() {
            self.start_pump().await?;
        }
        self.addressing
            .adopt(&self.netlink, &self.state, subnet, network)
            .await
    }

    async fn repair(&mut self) -> Result<usize, BackendError> {
        let restored = self.addressing.repair(&self.netlink, &self.state).await?;
        Ok(usize::from(restored))
    }

    async fn add_peer(&mut self, peer: &Lease) -> Result<(), BackendError> {
        let err = |reason: String| BackendError::Peer {
            peer: peer.key.to_string(),
            reason,
        };
        let lp = lease_peer(peer, self.cfg.listen_port).map_err(err)?;
        if lp.public_key == *self.codec.keys().public.as_bytes() {
            return Err(err(
                "ignored: it carries our own public key (a copied key file?)".into(),
            ));
        }
        let changed = self.leases.get(&peer.key) != Some(&lp);
        self.leases.insert(peer.key.clone(), lp.clone());
        if changed {
            self.sync_peers(&[lp]);
        }
        Ok(())
    }

    async fn remove_peer(&mut self, peer: &Lease) -> Result<(), BackendError> {
        if self.leases.remove(&peer.key).is_some() {
            self.sync_peers(&[]);
        }
        Ok(())
    }

    async fn reconcile(&mut self, peers: &[Lease]) -> Result<(), BackendError> {
        let own = *self.codec.keys().public.as_bytes();
        self.leases = peers
            .iter()
            .filter_map(|p| match lease_peer(p, self.cfg.listen_port) {
                Ok(lp) if lp.public_key != own => Some((p.key.clone(), lp)),
                Ok(_) => None,
                Err(why) => {
                    tracing::warn!(peer = %p.key, "wireguard lease ignored: {why}");
                    None
                }
            })
            .collect();
        let all: Vec<LeasePeer> = self.leases.values().cloned().collect();
        self.sync_peers(&all);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(json: &str) -> Lease {
        Lease {
            key: SubnetKey::parse("10.244.7.0-24").expect("key"),
            attrs: subnet_manager::lease::LeaseAttrs::from_json(json.as_bytes()).expect("attrs"),
        }
    }

    const KEY: &str = "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=";
    const KEY2: &str = "3p7bfXt9wbTTW2HC7OQ1Nz+DQ8hbeGdNrfx+FG+IK08=";

    fn wg_lease(subnet: &str, ip: &str, key: &str) -> Lease {
        Lease {
            key: SubnetKey::parse(subnet).expect("key"),
            attrs: subnet_manager::lease::LeaseAttrs::from_json(
                format!(
                    r#"{{"PublicIP":"{ip}","BackendType":"wireguard","BackendData":{{"PublicKey":"{key}","Port":51820}}}}"#
                )
                .as_bytes(),
            )
            .expect("attrs"),
        }
    }

    /// The table the packet threads see: (peer index, public key, endpoint, AllowedIPs).
    fn table(wg: &WireGuard) -> Vec<(u32, String, SocketAddr, Vec<String>)> {
        let t = wg.codec.table.load();
        t.peers()
            .iter()
            .enumerate()
            .map(|(slot, p)| {
                let nets = ["10.244.1.0", "10.244.2.0", "10.244.3.0"]
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

    #[tokio::test]
    async fn peers_follow_the_leases() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config =
            NetworkConfig::parse(br#"{"Network":"10.244.0.0/16","Backend":{"Type":"wireguard"}}"#)
                .expect("config");
        let node = NodeInfo {
            iface: crate::netlink::Link {
                index: 1,
                name: "eth0".into(),
                mtu: 1500,
            },
            public_ip: "172.30.0.11".parse().expect("ip"),
            public_ipv6: None,
            wg_key_file: Some(dir.path().join("wgkey")),
        };
        let mut wg = WireGuard::new(&config, &node).expect("backend");
        assert_eq!(wg.mtu(), 1500 - 80);
        let data = wg.lease_data();
        assert_eq!(data.backend_type.as_deref(), Some("wireguard"));
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

        // Removal: the old key's last lease goes, and its peer with it.
        let old = Arc::downgrade(
            wg.peers
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
            "the removed peer (and its Tunn) is freed"
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

    #[test]
    fn lease_peers_like_flannel() {
        let new = lease(&format!(
            r#"{{"PublicIP":"172.30.0.13","PublicIPv6":null,"BackendType":"wireguard","BackendData":{{"Port":5555,"PublicKey":"{KEY}"}}}}"#
        ));
        let p = lease_peer(&new, 51820).expect("newer Flannel");
        assert_eq!(p.endpoint, "172.30.0.13:5555".parse().expect("addr"));
        assert_eq!(p.subnet, "10.244.7.0/24".parse::<Ipv4Net>().expect("net"));
        assert_eq!(keys::encode_key(&p.public_key), KEY);
        let old = lease(&format!(
            r#"{{"PublicIP":"172.30.0.13","BackendType":"wireguard","BackendData":{{"publickey":"{KEY}"}}}}"#
        ));
        let p = lease_peer(&old, 51999).expect("older Flannel: no Port");
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
            let err = lease_peer(&lease(json), 51820).expect_err(json);
            assert!(err.contains(want), "{json}: {err}");
        }
    }
}

/// The receive path as a fuzz target: arbitrary datagrams from a peer's address and from a
/// stranger's, fed to a codec that knows one peer. Only built by `cargo fuzz` (`cfg(fuzzing)`).
#[cfg(fuzzing)]
pub mod fuzzing {
    use std::cell::RefCell;
    use std::net::SocketAddr;
    use std::sync::Arc;

    use boringtun::noise::Tunn;
    use boringtun::x25519::{PublicKey, StaticSecret};

    use super::codec::{RxScratch, WgCodec};
    use super::keys::StaticKeys;
    use super::peers::{WgPeer, WgTable};
    use crate::backend::pump::{Codec, Outbox};
    use crate::io::RecvMsg;
    use crate::stats::Tally;

    struct State {
        codec: WgCodec,
        rx: RxScratch,
        replies: Outbox,
        peer_addr: SocketAddr,
    }

    fn keys(seed: u8) -> StaticKeys {
        let secret = StaticSecret::from([seed; 32]);
        let public = PublicKey::from(&secret);
        StaticKeys { secret, public }
    }

    fn state() -> Option<State> {
        let (ours, theirs) = (keys(1), keys(2));
        let peer_addr: SocketAddr = "127.0.0.1:9".parse().ok()?;
        let codec = WgCodec::new(ours);
        let tunn = Tunn::new(
            codec.keys().secret.clone(),
            theirs.public,
            None,
            None,
            1 << 8,
            Some(codec.limiter.clone()),
        );
        let peer = Arc::new(WgPeer::new(
            1 << 8,
            *theirs.public.as_bytes(),
            tunn,
            peer_addr,
        ));
        let table = WgTable::new(vec![(peer, vec!["10.244.2.0/24".parse().ok()?])]);
        codec.table.store(Arc::new(table));
        let rx = codec.rx_scratch();
        Some(State {
            codec,
            rx,
            replies: Outbox::new(),
            peer_addr,
        })
    }

    thread_local! {
        static STATE: RefCell<Option<State>> = RefCell::new(state());
    }

    /// Feeds `data` as one message (the first byte picks the sender and a GRO segment size).
    pub fn receive(data: &[u8]) {
        let Some((&sel, data)) = data.split_first() else {
            return;
        };
        STATE.with(|st| {
            let mut st = st.borrow_mut();
            let Some(st) = st.as_mut() else { return };
            let stranger = SocketAddr::from(([127, 0, 0, 2], 51820));
            let src = if sel & 1 == 0 { st.peer_addr } else { stranger };
            let gro = (sel & 2 != 0).then_some(u16::from(sel >> 2).max(1) * 8);
            let msg = RecvMsg::from_parts(data, src, gro);
            let mut tally = Tally::default();
            st.codec
                .receive(&mut st.rx, &msg, &mut st.replies, &mut tally, |pkt, _| {
                    assert!(!pkt.is_empty());
                });
            // What a pump would send goes to one of the two senders, never elsewhere.
            for d in st.replies.iter() {
                assert!(
                    d.to == stranger || d.to == st.peer_addr,
                    "reply to {}",
                    d.to
                );
            }
            st.replies.clear();
        });
    }
}
