//! Spreading one peer's flows over the receiving sockets of a `SO_REUSEPORT` group, without
//! ever splitting a flow.
//!
//! All datagrams from one peer socket carry the same address 4-tuple, so the kernel's reuseport
//! hash puts all of a peer's traffic on one receiving socket, hence one receiver thread; and
//! because each receiver writes to its own TUN queue, the kernel's TUN flow steering then puts
//! the replies of all those flows on one sender thread too. To spread them, a sender sends each
//! TUN queue's traffic from its own source port (one flow stays on one queue, so on one port),
//! taken as a run of consecutive ports; the receiving group picks its socket as source port
//! modulo the group size (a classic BPF program, `SO_ATTACH_REUSEPORT_CBPF`). Consecutive ports
//! land on distinct sockets, and two nodes with as many queues pair their queues one to one.
//! Datagrams the kernel merges (UDP GRO) share a 4-tuple, hence a port, hence a socket.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;

use super::sys::cvt;
use super::udp::UdpSock;
use super::{Listen, SetupError};

/// `SO_ATTACH_REUSEPORT_CBPF` (asm-generic/socket.h).
const SO_ATTACH_REUSEPORT_CBPF: libc::c_int = 51;

/// Where source ports are taken from: the kernel's default ephemeral range.
const PORTS: std::ops::Range<u32> = 32_768..61_000;

/// How many random runs of ports are tried before giving up.
const TRIES: usize = 32;

/// Makes the reuseport group `sock` belongs to deliver each datagram to the socket at index
/// `source port % queues` (sockets are indexed in the order they joined). A datagram whose
/// index is past the group's end falls back to the kernel's hash. `sock` must be bound.
pub fn steer_by_source_port(sock: &UdpSock, queues: usize) -> io::Result<()> {
    let queues = u32::try_from(queues)
        .ok()
        .filter(|&q| q > 0)
        .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
    // The program sees the datagram from its UDP payload on; the source port is the UDP
    // header's first field, reached from the network header (no IPv4 options on a peer's
    // packets; a packet with some only lands on another socket, always the same one).
    let udp_at: i32 = if sock.local_addr().is_ipv4() { 20 } else { 40 };
    let net_off = libc::SKF_NET_OFF + udp_at;
    let prog = [
        bpf(libc::BPF_LD | libc::BPF_H | libc::BPF_ABS, net_off as u32),
        bpf(libc::BPF_ALU | libc::BPF_MOD | libc::BPF_K, queues),
        bpf(libc::BPF_RET | libc::BPF_A, 0),
    ];
    let fprog = libc::sock_fprog {
        len: prog.len() as libc::c_ushort,
        filter: prog.as_ptr().cast_mut(),
    };
    // SAFETY: `fprog` points at `prog`, which lives until the call returns (the kernel copies
    // the program), and the length passed is the struct's.
    cvt(unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_ATTACH_REUSEPORT_CBPF,
            (&fprog as *const libc::sock_fprog).cast(),
            size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    })
    .map(drop)
}

fn bpf(code: u32, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    }
}

/// Binds `count` sockets at `ip` to consecutive ports, the first a multiple of `count` (so
/// socket `i`'s port is `i` modulo `count`): the send sockets of a device's queues.
pub fn bind_consecutive(ip: IpAddr, count: usize) -> Result<Vec<UdpSock>, SetupError> {
    let span = u32::try_from(count.max(1)).unwrap_or(u32::MAX);
    let runs = (PORTS.end - PORTS.start) / span;
    let mut last = None;
    for attempt in 0..TRIES {
        let pick = RandomState::new().hash_one(attempt) as u32 % runs.max(1);
        let first = (PORTS.start.div_ceil(span) + pick) * span;
        match bind_run(ip, first, count) {
            Ok(socks) => return Ok(socks),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| SetupError::Os {
        call: "bind",
        target: format!("{count} consecutive UDP ports at {ip}"),
        source: io::ErrorKind::AddrInUse.into(),
    }))
}

fn bind_run(ip: IpAddr, first: u32, count: usize) -> Result<Vec<UdpSock>, SetupError> {
    (0..count)
        .map(|i| {
            let port = u16::try_from(first as usize + i).map_err(|_| SetupError::Os {
                call: "bind",
                target: format!("UDP port {first}+{i} at {ip}"),
                source: io::ErrorKind::InvalidInput.into(),
            })?;
            UdpSock::listen(Listen::At(SocketAddr::new(ip, port)), false)
        })
        .collect()
}
