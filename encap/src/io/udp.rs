//! The UDP side: one socket per worker (`SO_REUSEPORT` spreads flows over them), sending many
//! datagrams per syscall with `UDP_SEGMENT` (one destination) or `sendmmsg` (many), and
//! receiving with `UDP_GRO` + `recvmmsg` (in `recv.rs`).

use std::io::{self, IoSlice};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::ptr;
use std::time::Duration;

use libc::{c_int, c_uint};

use super::addr::RawAddr;
use super::sys::{cvt, cvt_size, getsockopt_int, retry, setsockopt_int, Timeout};
use super::{SetupError, DEFAULT_TIMEOUT};

/// Most messages one [`UdpSock::send_batch`] call sends; the headers live on the stack.
pub const SEND_BATCH_MAX: usize = 64;

/// Most segments the kernel accepts in one `UDP_SEGMENT` send (`UDP_MAX_SEGMENTS`; newer
/// kernels allow 128, this is the portable limit). More fails with `EINVAL`.
pub const GSO_MAX_SEGMENTS: usize = 64;

/// Socket buffer size worth asking for: wireguard-go's 7 MiB, enough for a few ms of 10 Gbit/s.
pub const DEFAULT_SOCKET_BUFFER: usize = 7 << 20;

/// The forced variants of the buffer options (root may exceed `net.core.[rw]mem_max`).
const FORCE_OPTS: Option<(c_int, c_int)> = Some((libc::SO_RCVBUFFORCE, libc::SO_SNDBUFFORCE));

/// Room for one `cmsghdr` with a small payload (`UDP_SEGMENT`'s u16, `UDP_GRO`'s int), aligned
/// like `cmsghdr`.
#[repr(C, align(8))]
#[derive(Clone, Copy)]
pub(crate) struct CmsgBuf(pub(crate) [u8; 64]);

/// Where a socket listens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listen {
    /// One address; an IPv6 one takes IPv6 only (`IPV6_V6ONLY`, whatever the sysctl says).
    At(SocketAddr),
    /// `[::]:port` for both families. IPv4 peers appear as plain IPv4 addresses both ways:
    /// received sources are unmapped and IPv4 destinations are mapped when sending, so the
    /// caller never sees `::ffff:a.b.c.d`.
    DualStack(u16),
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::At(a) => write!(f, "{a}"),
            Listen::DualStack(port) => write!(f, "[::]:{port} (IPv4 and IPv6)"),
        }
    }
}

/// A UDP socket for batched I/O through `&self`. Sends and receives wait at most the timeout
/// (see [`set_timeout`](Self::set_timeout)) and then fail with `TimedOut`.
#[derive(Debug)]
pub struct UdpSock {
    sock: UdpSocket,
    local: SocketAddr,
    /// An IPv6 socket that also carries IPv4: IPv4 destinations are sent to as mapped.
    dual_stack: bool,
    pub(crate) timeout: Timeout,
}

/// Socket buffer sizes as the kernel reports them (it doubles what was asked for).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BufferSizes {
    pub rcv: usize,
    pub snd: usize,
}

impl UdpSock {
    /// Binds a UDP socket to `addr`, with `SO_REUSEPORT` first if asked so several workers can
    /// share the port (the kernel then hashes flows to sockets).
    pub fn bind(addr: SocketAddr, reuse_port: bool) -> Result<Self, SetupError> {
        Self::listen(Listen::At(addr), reuse_port)
    }

    /// Binds a UDP socket where `listen` says, with `SO_REUSEPORT` first if asked.
    pub fn listen(listen: Listen, reuse_port: bool) -> Result<Self, SetupError> {
        let (addr, dual_stack) = match listen {
            Listen::At(addr) => (addr, false),
            Listen::DualStack(port) => (SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port), true),
        };
        let err = |call| {
            move |source| SetupError::Os {
                call,
                target: format!("UDP socket {addr}"),
                source,
            }
        };
        let domain = if addr.is_ipv4() {
            libc::AF_INET
        } else {
            libc::AF_INET6
        };
        // SAFETY: plain syscall without pointers.
        let raw = cvt(unsafe { libc::socket(domain, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })
            .map_err(err("socket"))?;
        // SAFETY: `raw` was just returned by socket and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        if reuse_port {
            setsockopt_int(raw, libc::SOL_SOCKET, libc::SO_REUSEPORT, 1)
                .map_err(err("setsockopt(SO_REUSEPORT)"))?;
        }
        if addr.is_ipv6() {
            // Explicit either way: `net.ipv6.bindv6only` must not decide which peers we hear.
            setsockopt_int(
                raw,
                libc::IPPROTO_IPV6,
                libc::IPV6_V6ONLY,
                c_int::from(!dual_stack),
            )
            .map_err(err("setsockopt(IPV6_V6ONLY)"))?;
        }
        let (mut sa, len) = RawAddr::new(&addr);
        // SAFETY: `sa` holds a valid sockaddr of length `len`.
        cvt(unsafe { libc::bind(raw, sa.as_mut_ptr().cast(), len) }).map_err(err("bind"))?;
        let sock = UdpSocket::from(fd);
        let local = sock.local_addr().map_err(err("getsockname"))?;
        Ok(Self {
            sock,
            local,
            dual_stack,
            timeout: Timeout::new(Some(DEFAULT_TIMEOUT)),
        })
    }

    /// `dst` as this socket must name it: an IPv6 socket reaches IPv4 peers by mapped address.
    fn outgoing(&self, dst: SocketAddr) -> SocketAddr {
        match dst.ip() {
            IpAddr::V4(ip) if self.dual_stack => {
                SocketAddr::new(IpAddr::V6(ip.to_ipv6_mapped()), dst.port())
            }
            _ => dst,
        }
    }

    /// The bound address (with the real port when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Turns on `UDP_GRO`: the kernel may then hand over several same-size datagrams from one
    /// sender as one message (receive buffers must then be 64 KiB). False if refused.
    pub fn enable_gro(&self) -> bool {
        setsockopt_int(self.as_raw_fd(), libc::SOL_UDP, libc::UDP_GRO, 1).is_ok()
    }

    /// Whether the kernel knows `UDP_SEGMENT` (Linux 4.18+). A send may still fail with `EIO`
    /// when the egress device cannot checksum; fall back to [`send_batch`](Self::send_batch).
    pub fn gso_supported(&self) -> bool {
        getsockopt_int(self.as_raw_fd(), libc::SOL_UDP, libc::UDP_SEGMENT).is_ok()
    }

    /// Asks for `bytes` of receive and send buffer, beyond `net.core.[rw]mem_max` when we have
    /// `CAP_NET_ADMIN` (`SO_*BUFFORCE`), else up to that limit. Returns what the kernel set.
    pub fn grow_buffers(&self, bytes: usize) -> BufferSizes {
        let fd = self.as_raw_fd();
        let want = c_int::try_from(bytes).unwrap_or(c_int::MAX);
        for (plain, force) in [
            (libc::SO_RCVBUF, FORCE_OPTS.map(|f| f.0)),
            (libc::SO_SNDBUF, FORCE_OPTS.map(|f| f.1)),
        ] {
            let forced =
                force.is_some_and(|opt| setsockopt_int(fd, libc::SOL_SOCKET, opt, want).is_ok());
            if !forced {
                // Best effort: the result is reported below either way.
                let _ = setsockopt_int(fd, libc::SOL_SOCKET, plain, want);
            }
        }
        let get = |opt| {
            getsockopt_int(fd, libc::SOL_SOCKET, opt)
                .ok()
                .and_then(|v| usize::try_from(v).ok())
                .unwrap_or(0)
        };
        BufferSizes {
            rcv: get(libc::SO_RCVBUF),
            snd: get(libc::SO_SNDBUF),
        }
    }

    /// See [`TunQueue::set_timeout`](super::TunQueue::set_timeout): same meaning, for sends and
    /// receives.
    pub fn set_timeout(&self, timeout: Option<Duration>) {
        self.timeout.set(timeout);
    }

    pub fn timeout(&self) -> Option<Duration> {
        self.timeout.get()
    }

    /// Sends `buf` to `dst` as datagrams of `seg_size` bytes (the last may be shorter) in one
    /// `sendmsg` with a `UDP_SEGMENT` cmsg; as one plain datagram when it fits in one segment
    /// (or `seg_size` is 0). At most [`GSO_MAX_SEGMENTS`] segments and 64 KiB in all.
    pub fn send_gso(&self, dst: SocketAddr, buf: &[u8], seg_size: u16) -> io::Result<usize> {
        self.send_gso_vectored(dst, &[IoSlice::new(buf)], seg_size)
    }

    /// [`send_gso`](Self::send_gso) gathered from slices: segments are cut by byte offset over
    /// the concatenation, so `[hdr0, payload0, hdr1, payload1, …]` needs no copy.
    pub fn send_gso_vectored(
        &self,
        dst: SocketAddr,
        bufs: &[IoSlice<'_>],
        seg_size: u16,
    ) -> io::Result<usize> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let (mut name, name_len) = RawAddr::new(&self.outgoing(dst));
        let mut ctrl = CmsgBuf([0; 64]);
        // SAFETY: msghdr is a plain C struct for which all zeros (null pointers, zero lengths)
        // is a valid value.
        let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
        hdr.msg_name = name.as_mut_ptr();
        hdr.msg_namelen = name_len;
        hdr.msg_iov = bufs.as_ptr().cast_mut().cast();
        hdr.msg_iovlen = bufs.len() as _;
        if seg_size != 0 && total > usize::from(seg_size) {
            add_segment_cmsg(&mut hdr, &mut ctrl, seg_size);
        }
        let fd = self.as_raw_fd();
        retry(fd, libc::POLLOUT, &self.timeout, || {
            // SAFETY: `hdr` points to `name`, `bufs` (IoSlice is ABI-compatible with iovec) and
            // `ctrl`, all live and unaliased for the call; sendmsg only reads them.
            cvt_size(unsafe { libc::sendmsg(fd, &hdr, libc::MSG_DONTWAIT) })
        })
    }

    /// Sends up to [`SEND_BATCH_MAX`] datagrams, each to its own destination, with one
    /// `sendmmsg`. Returns how many went out; the caller retries the rest. An error means the
    /// first message failed (e.g. `ENETUNREACH` for that peer): skip it to get past it.
    pub fn send_batch(&self, msgs: &[(SocketAddr, &[u8])]) -> io::Result<usize> {
        let msgs = &msgs[..msgs.len().min(SEND_BATCH_MAX)];
        if msgs.is_empty() {
            return Ok(0);
        }
        let mut names = [RawAddr::zeroed(); SEND_BATCH_MAX];
        let mut iovs = [libc::iovec {
            iov_base: ptr::null_mut(),
            iov_len: 0,
        }; SEND_BATCH_MAX];
        let mut name_lens = [0; SEND_BATCH_MAX];
        for (i, (dst, data)) in msgs.iter().enumerate() {
            (names[i], name_lens[i]) = RawAddr::new(&self.outgoing(*dst));
            iovs[i].iov_base = data.as_ptr().cast_mut().cast();
            iovs[i].iov_len = data.len();
        }
        // SAFETY: mmsghdr is a plain C struct; all zeros is a valid (empty) value.
        let mut hdrs: [libc::mmsghdr; SEND_BATCH_MAX] = unsafe { std::mem::zeroed() };
        let (names_ptr, iovs_ptr) = (names.as_mut_ptr(), iovs.as_mut_ptr());
        for (i, h) in hdrs.iter_mut().take(msgs.len()).enumerate() {
            h.msg_hdr.msg_name = names_ptr.wrapping_add(i).cast();
            h.msg_hdr.msg_namelen = name_lens[i];
            h.msg_hdr.msg_iov = iovs_ptr.wrapping_add(i);
            h.msg_hdr.msg_iovlen = 1;
        }
        let fd = self.as_raw_fd();
        let count = msgs.len() as c_uint;
        let sent = retry(fd, libc::POLLOUT, &self.timeout, || {
            // SAFETY: the first `count` headers point into `names` and `iovs` (in bounds, live
            // for the call) and the iovecs into the caller's slices, which are only read.
            cvt(unsafe { libc::sendmmsg(fd, hdrs.as_mut_ptr(), count, libc::MSG_DONTWAIT) })
        })?;
        Ok(sent as usize)
    }
}

/// Attaches a `UDP_SEGMENT` cmsg carrying `seg_size` to `hdr`, stored in `ctrl`.
fn add_segment_cmsg(hdr: &mut libc::msghdr, ctrl: &mut CmsgBuf, seg_size: u16) {
    hdr.msg_control = ctrl.0.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE is a pure size computation.
    hdr.msg_controllen = unsafe { libc::CMSG_SPACE(size_of::<u16>() as c_uint) } as _;
    // SAFETY: msg_control points to `ctrl`, which is aligned for cmsghdr and larger than
    // msg_controllen, so CMSG_FIRSTHDR returns a pointer to its start (checked for null), and
    // the cmsghdr plus a u16 payload fit inside it.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(hdr);
        if cmsg.is_null() {
            hdr.msg_control = ptr::null_mut();
            hdr.msg_controllen = 0;
            return;
        }
        (*cmsg).cmsg_level = libc::SOL_UDP;
        (*cmsg).cmsg_type = libc::UDP_SEGMENT;
        (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as c_uint) as _;
        ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<u16>(), seg_size);
    }
}

impl AsFd for UdpSock {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

impl AsRawFd for UdpSock {
    fn as_raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}
