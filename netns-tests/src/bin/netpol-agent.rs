//! The server and prober of the NetworkPolicy suite, run inside pod namespaces
//! (`ip netns exec <pod> netpol-agent ...`), the role agnhost plays upstream.
//!
//! - `serve --ports 80,81 [--sctp]`: on each port a TCP server (accept, write a token, close)
//!   and a UDP echo server, plus SCTP (like TCP) with `--sctp`; on `[::]` (IPv4 and IPv6)
//!   where the pod has IPv6, else on `0.0.0.0`. Runs until killed.
//! - `probe --timeout-ms N TARGET...` with `TARGET` = `ip:port/tcp|udp|sctp` (`[v6]:port/..`):
//!   probes all targets at once, one thread each, and prints `TARGET ok|fail` per target in
//!   the order given; exits 0. TCP/SCTP succeed when the token is read, UDP when the echo of
//!   a nonce comes back (sent up to 3 times within the timeout).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::FromRawFd;
use std::process::ExitCode;
use std::time::{Duration, Instant};

const TOKEN: &[u8] = b"netpol-agent\n";

fn usage() -> ExitCode {
    eprintln!(
        "usage: netpol-agent serve --ports 80,81 [--sctp]\n       netpol-agent probe --timeout-ms N ip:port/tcp|udp|sctp ..."
    );
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("serve") => serve(&args[1..]),
        Some("probe") => probe(&args[1..]),
        _ => usage(),
    }
}

// ---------------- serve ----------------

fn serve(args: &[String]) -> ExitCode {
    let mut ports: Vec<u16> = Vec::new();
    let mut sctp = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--ports" => {
                let Some(list) = it.next() else {
                    return usage();
                };
                for p in list.split(',') {
                    match p.trim().parse() {
                        Ok(p) => ports.push(p),
                        Err(_) => return usage(),
                    }
                }
            }
            "--sctp" => sctp = true,
            _ => return usage(),
        }
    }
    if ports.is_empty() {
        return usage();
    }
    let mut threads = Vec::new();
    for port in ports {
        match tcp_listener(port) {
            Ok(l) => threads.push(std::thread::spawn(move || serve_stream(l))),
            Err(e) => {
                eprintln!("netpol-agent: tcp port {port}: {e}");
                return ExitCode::FAILURE;
            }
        }
        match udp_socket(port) {
            Ok(s) => threads.push(std::thread::spawn(move || serve_udp(s))),
            Err(e) => {
                eprintln!("netpol-agent: udp port {port}: {e}");
                return ExitCode::FAILURE;
            }
        }
        if sctp {
            match sctp_listener(port) {
                Ok(l) => threads.push(std::thread::spawn(move || serve_stream(l))),
                Err(e) => {
                    eprintln!("netpol-agent: sctp port {port}: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
    }
    eprintln!("netpol-agent: serving");
    for t in threads {
        let _ = t.join();
    }
    ExitCode::SUCCESS
}

/// `[::]:port` (dual stack), or `0.0.0.0:port` where IPv6 is off.
fn tcp_listener(port: u16) -> std::io::Result<TcpListener> {
    TcpListener::bind((Ipv6Addr::UNSPECIFIED, port))
        .or_else(|_| TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)))
}

fn udp_socket(port: u16) -> std::io::Result<UdpSocket> {
    UdpSocket::bind((Ipv6Addr::UNSPECIFIED, port))
        .or_else(|_| UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)))
}

fn serve_stream(l: TcpListener) {
    for conn in l.incoming() {
        match conn {
            Ok(mut c) => {
                let _ = c.write_all(TOKEN);
                let _ = c.shutdown(std::net::Shutdown::Both);
            }
            Err(e) => eprintln!("netpol-agent: accept: {e}"),
        }
    }
}

fn serve_udp(s: UdpSocket) {
    let mut buf = [0u8; 2048];
    loop {
        match s.recv_from(&mut buf) {
            Ok((n, from)) => {
                let _ = s.send_to(&buf[..n], from);
            }
            Err(e) => eprintln!("netpol-agent: udp recv: {e}"),
        }
    }
}

fn last_err() -> std::io::Error {
    std::io::Error::last_os_error()
}

/// An SCTP one-to-one socket (`SOCK_STREAM`, `IPPROTO_SCTP`): it follows the TCP socket API,
/// so std's TCP types drive it once it exists.
fn sctp_socket(family: i32) -> std::io::Result<i32> {
    // SAFETY: plain socket(2) call.
    let fd = unsafe { libc::socket(family, libc::SOCK_STREAM, libc::IPPROTO_SCTP) };
    if fd < 0 {
        return Err(last_err());
    }
    Ok(fd)
}

fn sockaddr(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: an all-zero sockaddr_storage is valid; we fill one of its variants.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*a.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is large enough and suitably aligned for sockaddr_in.
            unsafe { std::ptr::write(&mut ss as *mut _ as *mut libc::sockaddr_in, sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: as above, for sockaddr_in6.
            unsafe { std::ptr::write(&mut ss as *mut _ as *mut libc::sockaddr_in6, sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

fn sctp_listener(port: u16) -> std::io::Result<TcpListener> {
    let bind = |addr: SocketAddr, family: i32| -> std::io::Result<TcpListener> {
        let fd = sctp_socket(family)?;
        let one: libc::c_int = 1;
        let (ss, len) = sockaddr(&addr);
        // SAFETY: fd is ours; the option and address point to live values of the given sizes.
        let ok = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_REUSEADDR,
                &one as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
            libc::bind(fd, &ss as *const _ as *const libc::sockaddr, len) == 0
                && libc::listen(fd, 128) == 0
        };
        if !ok {
            let e = last_err();
            // SAFETY: closing our own fd.
            unsafe { libc::close(fd) };
            return Err(e);
        }
        // SAFETY: fd is a listening stream socket we own; TcpListener takes it over.
        Ok(unsafe { TcpListener::from_raw_fd(fd) })
    };
    bind((Ipv6Addr::UNSPECIFIED, port).into(), libc::AF_INET6)
        .or_else(|_| bind((Ipv4Addr::UNSPECIFIED, port).into(), libc::AF_INET))
}

fn sctp_connect(addr: &SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    let family = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    let fd = sctp_socket(family)?;
    // SAFETY: fd is ours; TcpStream takes it over and closes it on drop.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    // connect(2) honours SO_SNDTIMEO on Linux.
    stream.set_write_timeout(Some(timeout.max(Duration::from_millis(1))))?;
    let (ss, len) = sockaddr(addr);
    // SAFETY: the address points to a live sockaddr of `len` bytes.
    if unsafe { libc::connect(fd, &ss as *const _ as *const libc::sockaddr, len) } != 0 {
        return Err(last_err());
    }
    Ok(stream)
}

// ---------------- probe ----------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Proto {
    Tcp,
    Udp,
    Sctp,
}

fn parse_target(t: &str) -> Option<(SocketAddr, Proto)> {
    let (addr, proto) = t.rsplit_once('/')?;
    let proto = match proto {
        "tcp" => Proto::Tcp,
        "udp" => Proto::Udp,
        "sctp" => Proto::Sctp,
        _ => return None,
    };
    Some((addr.parse().ok()?, proto))
}

fn probe(args: &[String]) -> ExitCode {
    let mut timeout = Duration::from_millis(500);
    let mut targets = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--timeout-ms" {
            match it.next().and_then(|v| v.parse().ok()) {
                Some(ms) => timeout = Duration::from_millis(ms),
                None => return usage(),
            }
        } else {
            match parse_target(a) {
                Some(t) => targets.push((a.clone(), t)),
                None => {
                    eprintln!("netpol-agent: bad target {a} (want ip:port/tcp|udp|sctp)");
                    return ExitCode::from(2);
                }
            }
        }
    }
    let handles: Vec<_> = targets
        .into_iter()
        .enumerate()
        .map(|(i, (text, (addr, proto)))| {
            let nonce = format!("netpol-probe-{}-{i}", std::process::id());
            std::thread::spawn(move || {
                let ok = match proto {
                    Proto::Tcp => probe_stream(TcpStream::connect_timeout(&addr, timeout), timeout),
                    Proto::Sctp => probe_stream(sctp_connect(&addr, timeout), timeout),
                    Proto::Udp => probe_udp(&addr, timeout, nonce.as_bytes()),
                };
                (text, ok)
            })
        })
        .collect();
    let mut out = std::io::stdout().lock();
    for h in handles {
        let (text, ok) = h.join().unwrap_or_else(|_| (String::from("?"), false));
        let _ = writeln!(out, "{text} {}", if ok { "ok" } else { "fail" });
    }
    ExitCode::SUCCESS
}

fn probe_stream(conn: std::io::Result<TcpStream>, timeout: Duration) -> bool {
    let Ok(mut conn) = conn else {
        return false;
    };
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 64];
    while got.len() < TOKEN.len() {
        let left = timeout.saturating_sub(start.elapsed());
        if left.is_zero() || conn.set_read_timeout(Some(left)).is_err() {
            return false;
        }
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    got.starts_with(TOKEN)
}

fn probe_udp(addr: &SocketAddr, timeout: Duration, nonce: &[u8]) -> bool {
    let local: SocketAddr = if addr.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let Ok(s) = UdpSocket::bind(local) else {
        return false;
    };
    if s.connect(addr).is_err() {
        return false;
    }
    let start = Instant::now();
    let each = timeout / 3;
    let mut buf = [0u8; 2048];
    for _ in 0..3 {
        if s.send(nonce).is_err() {
            // An ICMP error from an earlier try (e.g. port unreachable) surfaces here; retry.
            std::thread::sleep(each.min(Duration::from_millis(20)));
        }
        let until = (start.elapsed() + each).min(timeout);
        loop {
            let left = until.saturating_sub(start.elapsed());
            if left.is_zero() || s.set_read_timeout(Some(left)).is_err() {
                break;
            }
            match s.recv(&mut buf) {
                Ok(n) if &buf[..n] == nonce => return true,
                Ok(_) => continue,
                Err(_) => break,
            }
        }
        if start.elapsed() >= timeout {
            break;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse() {
        assert_eq!(
            parse_target("10.244.1.2:80/tcp"),
            Some(("10.244.1.2:80".parse().unwrap(), Proto::Tcp))
        );
        assert_eq!(
            parse_target("[fd00::2]:81/udp"),
            Some(("[fd00::2]:81".parse().unwrap(), Proto::Udp))
        );
        assert_eq!(parse_target("10.0.0.1:80/icmp"), None);
        assert_eq!(parse_target("10.0.0.1/tcp"), None);
    }

    #[test]
    fn probes_a_server_on_loopback() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let tcp_addr = l.local_addr().unwrap();
        std::thread::spawn(move || serve_stream(l));
        let u = UdpSocket::bind("127.0.0.1:0").unwrap();
        let udp_addr = u.local_addr().unwrap();
        std::thread::spawn(move || serve_udp(u));
        let t = Duration::from_millis(500);
        assert!(probe_stream(TcpStream::connect_timeout(&tcp_addr, t), t));
        assert!(probe_udp(&udp_addr, t, b"n1"));
        // Nothing listens on the port of a closed socket.
        let closed = UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let start = Instant::now();
        assert!(!probe_udp(&closed, Duration::from_millis(300), b"n2"));
        assert!(start.elapsed() < Duration::from_millis(600));
    }
}
