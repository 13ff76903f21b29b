//! Standard WireGuard peers for the namespace cluster: Debian's `wireguard-go` (userspace
//! WireGuard, as a harness [`Daemon`](crate::proc::Daemon)) configured with `wg`, the way an
//! operator or Flannel's kernel backend would configure a node, from the leases in etcd.
//!
//! `wg` finds a wireguard-go device through `/var/run/wireguard/<device>.sock`, which is not
//! per network namespace, so each device gets a name unique to its node namespace.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use base64::Engine as _;

use crate::cluster::{Cluster, ETCD_PREFIX, POD_NETWORK};
use crate::proc::{run, run_in};
use crate::wait_until;

/// wireguard-go's and wg's paths (Debian's `wireguard-go`, `wireguard-tools`).
pub const WIREGUARD_GO: &str = "/usr/bin/wireguard-go";
pub const WG: &str = "/usr/bin/wg";

/// Why the WireGuard interop tests cannot run here (`wireguard-go` or `wg` missing), or `None`;
/// tests pass it to [`crate::must_skip`].
pub fn missing() -> Option<String> {
    let missing: Vec<&str> = [WIREGUARD_GO, WG]
        .into_iter()
        .filter(|p| !Path::new(p).exists())
        .collect();
    (!missing.is_empty()).then(|| {
        format!(
            "{} not installed (apt-get install wireguard-go wireguard-tools)",
            missing.join(" and ")
        )
    })
}

/// A WireGuard key pair in base64, as `wg genkey`/`wg pubkey` print them.
#[derive(Clone, Debug)]
pub struct WgKeys {
    pub private: String,
    pub public: String,
}

impl WgKeys {
    /// A new pair from `wg genkey`.
    pub fn generate() -> Result<Self> {
        let private = run(WG, &["genkey"])?.trim().to_string();
        let public = pubkey(&private)?;
        Ok(WgKeys { private, public })
    }
}

/// A preshared key from `wg genpsk`.
pub fn genpsk() -> Result<String> {
    Ok(run(WG, &["genpsk"])?.trim().to_string())
}

/// `wg pubkey` of a private key.
pub fn pubkey(private: &str) -> Result<String> {
    use std::io::Write;
    let mut child = std::process::Command::new(WG)
        .arg("pubkey")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("running wg pubkey")?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(private.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("wg pubkey failed");
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A wireguard-go device running in a node.
#[derive(Clone, Debug)]
pub struct WgDevice {
    pub node: usize,
    pub name: String,
    pub keys: WgKeys,
    pub port: u16,
}

/// A device name unique to the node namespace (FNV-1a of its name), at most 15 bytes.
fn device_name(ns: &str) -> String {
    let mut h: u32 = 0x811c_9dc5;
    for b in ns.bytes() {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    format!("wg{h:08x}")
}

impl Cluster {
    /// Starts wireguard-go in node `i` (as the node's daemon) with `keys` on `port`, gives the
    /// device `addr` (e.g. `10.244.200.0/16`, the lease address with the Network's prefix, as
    /// Flannel's device has) and `mtu`, and brings it up. No peers yet.
    pub fn start_wireguard_go(
        &mut self,
        i: usize,
        keys: &WgKeys,
        port: u16,
        addr: &str,
        mtu: u32,
    ) -> Result<WgDevice> {
        let name = device_name(&self.nodes[i].ns);
        let key_file = self.nodes[i].dir.join("wg-private");
        std::fs::write(&key_file, &keys.private)?;
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600))?;
        self.start_program(
            i,
            Path::new(WIREGUARD_GO),
            &["-f".to_string(), name.clone()],
            &[("LOG_LEVEL", "verbose")],
        )?;
        let node = &self.nodes[i];
        let sock = format!("/var/run/wireguard/{name}.sock");
        wait_until(
            &format!("wireguard-go's {sock}"),
            Duration::from_secs(10),
            || Path::new(&sock).exists(),
        )
        .with_context(|| format!("wireguard-go log:\n{}", node.log()))?;
        node.run(
            WG,
            &[
                "set",
                &name,
                "private-key",
                &key_file.to_string_lossy(),
                "listen-port",
                &port.to_string(),
            ],
        )?;
        node.run("ip", &["addr", "add", addr, "dev", &name])?;
        node.run("ip", &["link", "set", &name, "mtu", &mtu.to_string(), "up"])?;
        Ok(WgDevice {
            node: i,
            name,
            keys: keys.clone(),
            port,
        })
    }

    /// `wg set <dev> peer …`: AllowedIPs and endpoint (and a preshared key), as Flannel's
    /// kernel backend sets a peer.
    pub fn wg_set_peer(
        &self,
        dev: &WgDevice,
        public_key: &str,
        allowed: &str,
        endpoint: &str,
        psk: Option<&str>,
    ) -> Result<()> {
        let node = &self.nodes[dev.node];
        let mut args = vec![
            "set".to_string(),
            dev.name.clone(),
            "peer".into(),
            public_key.into(),
            "allowed-ips".into(),
            allowed.into(),
            "endpoint".into(),
            endpoint.into(),
        ];
        if let Some(psk) = psk {
            let file = node.dir.join("wg-psk");
            std::fs::write(&file, psk)?;
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600))?;
            args.extend(["preshared-key".into(), file.to_string_lossy().into_owned()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        node.run(WG, &args).map(drop)
    }

    /// `wg set <dev> listen-port <port>`: the device moves to another port (and sends from it).
    pub fn wg_set_port(&self, dev: &mut WgDevice, port: u16) -> Result<()> {
        self.nodes[dev.node].run(WG, &["set", &dev.name, "listen-port", &port.to_string()])?;
        dev.port = port;
        Ok(())
    }

    /// `wg show <dev> dump`: one line for the device, then one per peer (tab-separated:
    /// public key, psk, endpoint, allowed ips, latest handshake, rx bytes, tx bytes, keepalive).
    pub fn wg_dump(&self, dev: &WgDevice) -> Result<String> {
        self.nodes[dev.node].run(WG, &["show", &dev.name, "dump"])
    }

    /// Writes node `i`'s subnet.env as Flannel does for `subnet` (e.g. `10.244.200.0/24`), so
    /// the CNI plugin can make pods there.
    pub fn write_subnet_env(&self, i: usize, subnet: &str, mtu: u32) -> Result<()> {
        let (net, len) = subnet
            .split_once('/')
            .context("subnet needs a prefix length")?;
        let mut octets: Vec<u8> = net
            .split('.')
            .map(str::parse)
            .collect::<Result<_, _>>()
            .with_context(|| format!("{subnet} is not an IPv4 subnet"))?;
        if let Some(last) = octets.last_mut() {
            *last = last.wrapping_add(1);
        }
        let first: Vec<String> = octets.iter().map(u8::to_string).collect();
        std::fs::write(
            self.nodes[i].subnet_file(),
            format!(
                "FLANNEL_NETWORK={POD_NETWORK}\nFLANNEL_SUBNET={}/{len}\nFLANNEL_MTU={mtu}\nFLANNEL_IPMASQ=false\n",
                first.join(".")
            ),
        )?;
        Ok(())
    }

    /// Writes a wireguard lease for node `i` with etcdctl, in Flannel's JSON: what a Flannel
    /// node (kernel WireGuard) publishes, with `key` and `port` in BackendData.
    pub fn put_wireguard_lease(&self, i: usize, subnet: &str, key: &str, port: u16) -> Result<()> {
        let suffix = subnet.replace('/', "-");
        let value = format!(
            r#"{{"PublicIP":"{}","PublicIPv6":null,"BackendType":"wireguard","BackendData":{{"Port":{port},"PublicKey":"{key}"}}}}"#,
            self.nodes[i].ip
        );
        self.etcd()?
            .put(&format!("{ETCD_PREFIX}/subnets/{suffix}"), &value)
    }

    /// Configures `dev`'s peers from every other wireguard lease in etcd (key, subnet,
    /// PublicIP:Port, and the config's PSK if any), as Flannel's backend does from its watch.
    /// Returns how many.
    pub fn wg_peers_from_leases(&self, dev: &WgDevice, psk: Option<&str>) -> Result<usize> {
        let own_ip = &self.nodes[dev.node].ip;
        let mut n = 0;
        for (suffix, value) in self.leases()? {
            let v: serde_json::Value =
                serde_json::from_str(&value).with_context(|| format!("lease {suffix}: {value}"))?;
            if v["BackendType"] != "wireguard" || v["PublicIP"] == own_ip.as_str() {
                continue;
            }
            let (Some(key), Some(ip)) = (
                v["BackendData"]["PublicKey"].as_str(),
                v["PublicIP"].as_str(),
            ) else {
                bail!("lease {suffix} has no PublicKey or PublicIP: {value}");
            };
            let port = v["BackendData"]["Port"]
                .as_u64()
                .unwrap_or(u64::from(dev.port));
            let subnet = suffix.replacen('-', "/", 1);
            self.wg_set_peer(dev, key, &subnet, &format!("{ip}:{port}"), psk)?;
            n += 1;
        }
        Ok(n)
    }
}

/// Captures up to `count` UDP datagrams to `port` on interface `iface` of namespace `ns` with
/// tcpdump (`filter` narrows it further) while `during` runs; returns their payloads.
pub fn capture_udp(
    cluster: &Cluster,
    ns: &str,
    iface: &str,
    filter: &str,
    count: usize,
    during: impl FnOnce() -> Result<()>,
) -> Result<Vec<Vec<u8>>> {
    let file = cluster.dir.path().join(format!("capture-{iface}.pcap"));
    let log = cluster.dir.path().join(format!("tcpdump-{iface}.log"));
    let args: Vec<String> = [
        "-i",
        iface,
        "-n",
        "-U",
        "-c",
        &count.to_string(),
        "-w",
        &file.to_string_lossy(),
        filter,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut dump = crate::proc::Daemon::spawn(
        "tcpdump",
        Some(ns),
        Path::new("/usr/bin/tcpdump"),
        &args,
        &[],
        &log,
    )?;
    wait_until("tcpdump to listen", Duration::from_secs(10), || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("listening on"))
    })?;
    during()?;
    let _ = wait_until("tcpdump to capture", Duration::from_secs(5), || {
        !dump.alive()
    });
    dump.stop(Duration::from_secs(2));
    let pcap = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
    udp_payloads(&pcap)
}

/// The UDP payloads of the IPv4 packets in an Ethernet pcap file.
fn udp_payloads(pcap: &[u8]) -> Result<Vec<Vec<u8>>> {
    let magic = pcap.get(..4).context("pcap too short")?;
    let le = match magic {
        [0xd4, 0xc3, 0xb2, 0xa1] => true,
        [0xa1, 0xb2, 0xc3, 0xd4] => false,
        _ => bail!("not a (microsecond) pcap file"),
    };
    let u32_at = |b: &[u8], off: usize| -> Option<usize> {
        let a: [u8; 4] = b.get(off..off + 4)?.try_into().ok()?;
        Some(if le {
            u32::from_le_bytes(a)
        } else {
            u32::from_be_bytes(a)
        } as usize)
    };
    let mut out = Vec::new();
    let mut pos = 24;
    while let Some(incl) = u32_at(pcap, pos + 8) {
        let Some(frame) = pcap.get(pos + 16..pos + 16 + incl) else {
            break;
        };
        pos += 16 + incl;
        // Ethernet (14) + IPv4 (IHL) + UDP (8).
        let Some(ihl) = frame.get(14).map(|b| usize::from(b & 0x0f) * 4) else {
            continue;
        };
        if frame.get(12..14) != Some(&[0x08, 0x00]) || frame.get(23) != Some(&17) {
            continue;
        }
        let udp = 14 + ihl;
        let Some(len) = frame
            .get(udp + 4..udp + 6)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
        else {
            continue;
        };
        if let Some(payload) = frame.get(udp + 8..udp + len.max(8)) {
            out.push(payload.to_vec());
        }
    }
    Ok(out)
}

/// Sends each datagram from namespace `ns` to `to` (an `ip:port`).
pub fn send_datagrams(ns: &str, to: &str, datagrams: Vec<Vec<u8>>) -> Result<()> {
    let to = to.to_string();
    crate::traffic::in_netns(ns, move || {
        let sock = std::net::UdpSocket::bind("0.0.0.0:0")?;
        for (i, d) in datagrams.iter().enumerate() {
            sock.send_to(d, &to)?;
            if i % 100 == 99 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        Ok(())
    })
}

/// Whether `ping` from a pod gets any reply within `secs` seconds.
pub fn pod_reaches(ns: &str, ip: &str, secs: u32) -> bool {
    run_in(ns, "ping", &["-c", "1", "-W", &secs.to_string(), "-q", ip]).is_ok()
}

/// WireGuard's mac1 over `msg` for the node with public key `responder`: keyed BLAKE2s-128
/// under BLAKE2s-256("mac1----" || responder), so a test can forge handshake initiations that
/// pass the mac1 check and reach the rate limiter (a real flood, not garbage dropped at once).
pub fn mac1(responder: &[u8], msg: &[u8]) -> Vec<u8> {
    use blake2::digest::{Digest, Mac};
    let mut label = b"mac1----".to_vec();
    label.extend_from_slice(responder);
    let key = blake2::Blake2s256::digest(&label);
    // A 32-byte key always fits BLAKE2s (keys up to 32 bytes).
    match blake2::Blake2sMac::<blake2::digest::consts::U16>::new_from_slice(&key) {
        Ok(mac) => mac.chain_update(msg).finalize().into_bytes().to_vec(),
        Err(_) => Vec::new(),
    }
}

/// A handshake initiation to the WireGuard node with public key `responder` (32 bytes): random
/// sender index, ephemeral key and ciphertexts, but a valid mac1, so it passes the first check
/// and costs the responder a Diffie-Hellman unless its rate limiter steps in.
pub fn forged_initiation(responder: &[u8], rng: &mut crate::traffic::TestRng) -> Vec<u8> {
    let mut msg = vec![0u8; 148];
    msg[..4].copy_from_slice(&1u32.to_le_bytes());
    rng.fill(&mut msg[4..116]);
    let mac = mac1(responder, &msg[..116]);
    msg[116..132].copy_from_slice(&mac);
    msg
}

/// What a handshake flood got back.
#[derive(Clone, Copy, Debug, Default)]
pub struct FloodReport {
    pub sent: u64,
    /// Cookie replies (type 3, 64 bytes) received: the responder was under load.
    pub cookies: u64,
    /// Any other reply (a handshake response would mean a forged initiation was accepted).
    pub other: u64,
}

/// Sends forged initiations (see [`forged_initiation`]) from namespace `ns` to `to` for
/// `secs` seconds, at about `per_sec`, counting the replies.
pub fn handshake_flood(
    ns: &str,
    to: &str,
    responder_b64: &str,
    secs: u64,
    per_sec: u64,
) -> Result<FloodReport> {
    let responder = base64::engine::general_purpose::STANDARD
        .decode(responder_b64.trim())
        .context("responder key is not base64")?;
    let to = to.to_string();
    crate::traffic::in_netns(ns, move || {
        let sock = std::net::UdpSocket::bind("0.0.0.0:0")?;
        sock.set_nonblocking(true)?;
        let mut rng = crate::traffic::TestRng::new(0x5EED);
        let mut report = FloodReport::default();
        let start = std::time::Instant::now();
        let mut buf = [0u8; 256];
        while start.elapsed() < Duration::from_secs(secs) {
            for _ in 0..per_sec.div_ceil(100) {
                sock.send_to(&forged_initiation(&responder, &mut rng), &to)?;
                report.sent += 1;
            }
            std::thread::sleep(Duration::from_millis(10));
            while let Ok(n) = sock.recv(&mut buf) {
                if n == 64 && buf[0] == 3 {
                    report.cookies += 1;
                } else {
                    report.other += 1;
                }
            }
        }
        Ok(report)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn mac1_matches_wireguard() {
        // A mac1 computed independently (Python: key = blake2s(b"mac1----" + pub).digest();
        // blake2s(msg, key=key, digest_size=16)) for the public key below and 116 bytes of 0x01.
        let public = base64::engine::general_purpose::STANDARD
            .decode("hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=")
            .expect("test key");
        assert_eq!(
            hex(&mac1(&public, &[1u8; 116])),
            "d9dc352d4f2de66eb1e016b43e173c4e"
        );
    }
}
