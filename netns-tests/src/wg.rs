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

use crate::cluster::{Cluster, ETCD_PREFIX, POD_NETWORK};
use crate::proc::{run, run_in};
use crate::wait_until;

/// wireguard-go's and wg's paths (Debian's `wireguard-go`, `wireguard-tools`).
pub const WIREGUARD_GO: &str = "/usr/bin/wireguard-go";
pub const WG: &str = "/usr/bin/wg";

/// Why the WireGuard interop tests must be skipped here, or `None` when they can run. Under
/// `CI=true` a missing tool is an error: `scripts/install-deps.sh` installs both.
pub fn skip_reason() -> Result<Option<String>> {
    let missing: Vec<&str> = [WIREGUARD_GO, WG]
        .into_iter()
        .filter(|p| !Path::new(p).exists())
        .collect();
    if missing.is_empty() {
        return Ok(None);
    }
    let why = format!(
        "{} not installed (apt-get install wireguard-go wireguard-tools)",
        missing.join(" and ")
    );
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        bail!("{why}: the WireGuard interop tests must run in CI");
    }
    Ok(Some(why))
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

/// BLAKE2s (RFC 7693) with an optional key and an output of `out_len` (1-32) bytes: what
/// WireGuard's mac1 is made of, so a test can forge handshake initiations that pass the mac1
/// check and reach the rate limiter (a real flood, not garbage dropped at the first check).
pub fn blake2s(out_len: usize, key: &[u8], data: &[u8]) -> Vec<u8> {
    const IV: [u32; 8] = [
        0x6A09_E667,
        0xBB67_AE85,
        0x3C6E_F372,
        0xA54F_F53A,
        0x510E_527F,
        0x9B05_688C,
        0x1F83_D9AB,
        0x5BE0_CD19,
    ];
    const SIGMA: [[usize; 16]; 10] = [
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
        [14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3],
        [11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4],
        [7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8],
        [9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13],
        [2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9],
        [12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11],
        [13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10],
        [6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5],
        [10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0],
    ];
    fn g(v: &mut [u32; 16], (a, b, c, d): (usize, usize, usize, usize), x: u32, y: u32) {
        v[a] = v[a].wrapping_add(v[b]).wrapping_add(x);
        v[d] = (v[d] ^ v[a]).rotate_right(16);
        v[c] = v[c].wrapping_add(v[d]);
        v[b] = (v[b] ^ v[c]).rotate_right(12);
        v[a] = v[a].wrapping_add(v[b]).wrapping_add(y);
        v[d] = (v[d] ^ v[a]).rotate_right(8);
        v[c] = v[c].wrapping_add(v[d]);
        v[b] = (v[b] ^ v[c]).rotate_right(7);
    }
    let out_len = out_len.clamp(1, 32);
    let mut h = IV;
    h[0] ^= 0x0101_0000 ^ ((key.len().min(32) as u32) << 8) ^ out_len as u32;
    let mut input = Vec::with_capacity(64 + data.len());
    if !key.is_empty() {
        input.extend_from_slice(&key[..key.len().min(32)]);
        input.resize(64, 0);
    }
    input.extend_from_slice(data);
    let blocks = input.len().div_ceil(64).max(1);
    for i in 0..blocks {
        let last = i + 1 == blocks;
        let mut block = [0u8; 64];
        let chunk = &input[i * 64..input.len().min((i + 1) * 64)];
        block[..chunk.len()].copy_from_slice(chunk);
        let t = if last { input.len() } else { (i + 1) * 64 } as u64;
        let mut m = [0u32; 16];
        for (w, b) in m.iter_mut().zip(block.chunks(4)) {
            *w = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
        let mut v = [0u32; 16];
        v[..8].copy_from_slice(&h);
        v[8..].copy_from_slice(&IV);
        v[12] ^= t as u32;
        v[13] ^= (t >> 32) as u32;
        if last {
            v[14] = !v[14];
        }
        for s in &SIGMA {
            g(&mut v, (0, 4, 8, 12), m[s[0]], m[s[1]]);
            g(&mut v, (1, 5, 9, 13), m[s[2]], m[s[3]]);
            g(&mut v, (2, 6, 10, 14), m[s[4]], m[s[5]]);
            g(&mut v, (3, 7, 11, 15), m[s[6]], m[s[7]]);
            g(&mut v, (0, 5, 10, 15), m[s[8]], m[s[9]]);
            g(&mut v, (1, 6, 11, 12), m[s[10]], m[s[11]]);
            g(&mut v, (2, 7, 8, 13), m[s[12]], m[s[13]]);
            g(&mut v, (3, 4, 9, 14), m[s[14]], m[s[15]]);
        }
        for (j, x) in h.iter_mut().enumerate() {
            *x ^= v[j] ^ v[j + 8];
        }
    }
    h.iter()
        .flat_map(|w| w.to_le_bytes())
        .take(out_len)
        .collect()
}

/// A handshake initiation to the WireGuard node with public key `responder` (32 bytes): random
/// sender index, ephemeral key and ciphertexts, but a valid mac1, so it passes the first check
/// and costs the responder a Diffie-Hellman unless its rate limiter steps in.
pub fn forged_initiation(responder: &[u8], rng: &mut crate::traffic::Xorshift) -> Vec<u8> {
    let mut msg = vec![0u8; 148];
    msg[..4].copy_from_slice(&1u32.to_le_bytes());
    rng.fill(&mut msg[4..116]);
    let mut label = b"mac1----".to_vec();
    label.extend_from_slice(responder);
    let mac1_key = blake2s(32, &[], &label);
    let mac1 = blake2s(16, &mac1_key, &msg[..116]);
    msg[116..132].copy_from_slice(&mac1);
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
    let responder = base64_decode(responder_b64).context("responder key is not base64")?;
    let to = to.to_string();
    crate::traffic::in_netns(ns, move || {
        let sock = std::net::UdpSocket::bind("0.0.0.0:0")?;
        sock.set_nonblocking(true)?;
        let mut rng = crate::traffic::Xorshift(0x5EED);
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

/// Standard base64 (with padding), enough for WireGuard keys.
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let s = s.trim().trim_end_matches('=');
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes() {
        acc = (acc << 6) | val(c)?;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn blake2s_matches_rfc7693_and_keyed_vectors() {
        assert_eq!(
            hex(&blake2s(32, &[], b"abc")),
            "508c5e8c327c14e2e1a72ba34eeb452f37458b209ed63a294d999b4c86675982"
        );
        assert_eq!(
            hex(&blake2s(32, &[], b"")),
            "69217a3079908094e11121d042354a7c1f55b6482ca1a51e1b250dfd1ed0eef9"
        );
        // Python: hashlib.blake2s(b"x" * 100, key=b"k" * 32, digest_size=16).hexdigest()
        assert_eq!(
            hex(&blake2s(16, &[b'k'; 32], &[b'x'; 100])),
            "144ec676a9bc72891951d996a5f4e307"
        );
        assert_eq!(
            base64_decode("hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=").map(|k| hex(&k)),
            Some("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a".into())
        );
    }
}
