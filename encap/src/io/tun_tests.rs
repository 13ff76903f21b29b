//! TUN tests. Opening /dev/net/tun needs root: without it they print why and pass. Devices get
//! unique `frtio<pid>…` names; the packet tests run in a throwaway network namespace entered by
//! one thread only (`setns` is per thread), so the host's interfaces are never touched.

use std::fs::File;
use std::io::{ErrorKind, IoSlice};
use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use super::*;

fn can_open_tun() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root || !Path::new("/dev/net/tun").exists() {
        eprintln!("skipping: needs root and /dev/net/tun");
    }
    root && Path::new("/dev/net/tun").exists()
}

fn unique(tag: &str) -> String {
    let name = format!("frtio{}{tag}", std::process::id());
    assert!(name.len() < 16, "{name} too long for an interface name");
    name
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn gone(name: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(2);
    while Path::new("/sys/class/net").join(name).exists() {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

#[test]
fn rejects_bad_names_and_zero_queues() {
    for bad in ["", "abcdefghijklmnop", "a/b", "a b"] {
        assert!(
            matches!(open_tun(bad, 1, false), Err(SetupError::InvalidName(_))),
            "{bad:?}"
        );
    }
    assert!(matches!(
        open_tun("frtiox", 0, false),
        Err(SetupError::NoQueues(_))
    ));
}

#[test]
fn offload_negotiation_and_multiqueue() {
    if !can_open_tun() {
        return;
    }
    let name = unique("m");
    let queues = open_tun(&name, 2, true).unwrap();
    assert_eq!(queues.len(), 2);
    let off = queues[0].offload();
    eprintln!("{name}: offloads accepted: {off:?}");
    assert!(off.csum && off.tso, "kernel refused CSUM|TSO: {off:?}");
    for (i, q) in queues.iter().enumerate() {
        assert_eq!((q.name(), q.index(), q.offload()), (name.as_str(), i, off));
        assert_eq!(q.timeout(), Some(DEFAULT_TIMEOUT));
    }
    assert!(Path::new("/sys/class/net").join(&name).exists());
    let flags = std::fs::read_to_string(format!("/sys/class/net/{name}/tun_flags")).unwrap();
    eprintln!("{name}: tun_flags {}", flags.trim());
    // A third queue can attach to the running device by name.
    let extra = open_tun(&name, 2, true).unwrap();
    drop(queues);
    assert!(
        Path::new("/sys/class/net").join(&name).exists(),
        "device vanished with queues left"
    );
    drop(extra);
    assert!(gone(&name), "non-persistent {name} outlived its queues");
}

#[test]
fn template_name_and_no_offload() {
    if !can_open_tun() {
        return;
    }
    let template = format!("{}%d", unique("t"));
    let q = open_tun(&template, 1, false).unwrap();
    let real = q[0].name().to_owned();
    assert!(
        real.starts_with(&template[..template.len() - 2]) && !real.contains('%'),
        "{real}"
    );
    assert_eq!(q[0].offload(), Offload::default());
    drop(q);
    assert!(gone(&real));
}

/// A throwaway network namespace, deleted on drop.
struct Netns(String);

impl Netns {
    fn new(name: String) -> Self {
        ip(&["netns", "add", &name]);
        Netns(name)
    }
}

/// Moves the calling thread (only) into the namespace `name`.
fn enter_netns(name: &str) {
    let f = File::open(format!("/run/netns/{name}")).unwrap();
    // SAFETY: `f` is an open netns file; setns affects only the calling thread.
    assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn ipv4_checksum(hdr: &[u8]) -> u16 {
    let mut sum: u32 = hdr
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4/UDP packet (UDP checksum 0 = none) from `src` to `dst`.
fn udp_packet(src: ([u8; 4], u16), dst: ([u8; 4], u16), payload: &[u8]) -> Vec<u8> {
    let total = 28 + payload.len();
    let mut p = vec![0u8; 28];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src.0);
    p[16..20].copy_from_slice(&dst.0);
    let c = ipv4_checksum(&p[..20]);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p[20..22].copy_from_slice(&src.1.to_be_bytes());
    p[22..24].copy_from_slice(&dst.1.to_be_bytes());
    p[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p.extend_from_slice(payload);
    p
}

/// Reads until an IPv4 packet to `dst` shows up; returns the whole read (header included).
fn read_until_to(q: &TunQueue, dst: [u8; 4]) -> Vec<u8> {
    let mut buf = vec![0u8; TUN_READ_BUF_LEN];
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        match q.read(&mut buf) {
            Ok(n) if n > VNET_HDR_LEN + 20 && buf[VNET_HDR_LEN] >> 4 == 4 => {
                if buf[VNET_HDR_LEN + 16..VNET_HDR_LEN + 20] == dst {
                    return buf[..n].to_vec();
                }
            }
            Ok(_) => {}
            Err(e) if is_timeout(&e) => {}
            Err(e) => panic!("TUN read: {e}"),
        }
    }
    panic!("no packet to {dst:?} came out of the TUN");
}

#[test]
fn packets_through_a_tun_in_a_netns() {
    if !can_open_tun() {
        return;
    }
    let ns = Netns::new(unique("n"));
    let name = unique("p");
    let ns_name = ns.0.clone();
    let worker = std::thread::spawn(move || {
        let nsx = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &ns_name];
            all.extend_from_slice(args);
            ip(&all);
        };
        nsx(&["ip", "link", "set", "lo", "up"]);
        // No IPv6 chatter (router solicitations, MLD) to wait through.
        for conf in ["all", "default"] {
            let key = format!("net.ipv6.conf.{conf}.disable_ipv6=1");
            let ok = Command::new("ip")
                .args(["netns", "exec", &ns_name, "sysctl", "-qw", &key])
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "sysctl {key}");
        }
        enter_netns(&ns_name);
        let q = open_tun(&name, 1, true).unwrap().remove(0);
        let off = q.offload();

        // Down and idle: writes fail, reads time out.
        q.set_timeout(Some(Duration::from_millis(50)));
        assert_eq!(
            q.read(&mut [0u8; 2048]).unwrap_err().kind(),
            ErrorKind::TimedOut
        );
        let probe = udp_packet(([10, 213, 0, 2], 1), ([10, 213, 0, 1], 1), b"x");
        assert!(q
            .write_vectored(&[IoSlice::new(&[0; VNET_HDR_LEN]), IoSlice::new(&probe)])
            .is_err());
        q.set_timeout(Some(DEFAULT_TIMEOUT));

        nsx(&["ip", "addr", "add", "10.213.0.1/24", "dev", &name]);
        nsx(&["ip", "link", "set", &name, "up"]);

        // Kernel -> TUN: a datagram routed to the peer side comes out with a virtio header.
        let s = UdpSocket::bind("10.213.0.1:0").unwrap();
        s.send_to(b"hello-tun", "10.213.0.2:9999").unwrap();
        let got = read_until_to(&q, [10, 213, 0, 2]);
        assert_eq!(got[1], 0, "gso_type of a small datagram");
        assert!(got.ends_with(b"hello-tun"));

        // A UDP_SEGMENT send stays one super-packet through the TUN when USO was accepted.
        let u = UdpSock::bind("10.213.0.1:0".parse().unwrap(), false).unwrap();
        u.send_gso("10.213.0.2:9998".parse().unwrap(), &[9u8; 4000], 1000)
            .unwrap();
        let first = read_until_to(&q, [10, 213, 0, 2]);
        let gso_size = u16::from_le_bytes([first[4], first[5]]);
        eprintln!(
            "USO {}: first read {} bytes, gso_type {}, gso_size {gso_size}",
            off.uso,
            first.len(),
            first[1]
        );
        if off.uso {
            // VIRTIO_NET_HDR_GSO_UDP_L4 = 5
            assert_eq!(
                (first[1], gso_size, first.len()),
                (5, 1000, VNET_HDR_LEN + 28 + 4000)
            );
        } else {
            assert_eq!(first.len(), VNET_HDR_LEN + 28 + 1000);
        }

        // TUN -> kernel: a packet written with an empty header reaches a local socket.
        let r = UdpSocket::bind("10.213.0.1:0").unwrap();
        r.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let port = r.local_addr().unwrap().port();
        let pkt = udp_packet(
            ([10, 213, 0, 2], 7777),
            ([10, 213, 0, 1], port),
            b"from-tun",
        );
        let mut framed = vec![0u8; VNET_HDR_LEN];
        framed.extend_from_slice(&pkt);
        assert_eq!(q.write(&framed).unwrap(), framed.len());
        let mut rbuf = [0u8; 64];
        let (n, from) = r.recv_from(&mut rbuf).unwrap();
        assert_eq!(
            (&rbuf[..n], from.to_string().as_str()),
            (&b"from-tun"[..], "10.213.0.2:7777")
        );
    });
    let result = worker.join();
    drop(ns);
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}
