//! TUN queues that speak virtio-net headers, so the kernel can hand over and accept 64 KiB TCP
//! (and UDP) super-packets instead of one MTU-sized packet per syscall.
//!
//! The device is not persistent: it disappears with the last queue, i.e. when the daemon exits.
//! Go Flannel's udp backend behaves the same (its `flannel0` is not persistent either), and it
//! is the safer failure mode: with the daemon gone its routes go too, instead of traffic being
//! black-holed into a device nobody reads; and a restart may change the queue count or offloads,
//! which an existing device with other flags would refuse. An existing device of that name (say
//! left persistent by someone else) is attached to and made non-persistent.

use std::ffi::CStr;
use std::io::{self, IoSlice};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use libc::{c_char, c_int, c_short, c_ulong};
use tracing::debug;

use super::sys::{cvt, cvt_size, retry, wait_ready, Timeout, NO_WAIT};
use super::{SetupError, DEFAULT_TIMEOUT};

/// Size of `struct virtio_net_hdr` that starts every read and write.
pub const VNET_HDR_LEN: usize = 10;

/// A read buffer this large holds anything the kernel hands over: the header plus a 64 KiB
/// super-packet.
pub const TUN_READ_BUF_LEN: usize = VNET_HDR_LEN + 65535;

/// The offloads the kernel accepted with `TUNSETOFFLOAD`: what reads may carry and writes may use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Offload {
    /// `TUN_F_CSUM`: packets may come with `NEEDS_CSUM` (a partial checksum to complete).
    pub csum: bool,
    /// `TUN_F_TSO4 | TUN_F_TSO6`: TCP super-packets with `gso_type` TCPV4/TCPV6.
    pub tso: bool,
    /// `TUN_F_USO4 | TUN_F_USO6` (kernel 6.2+): UDP super-packets with `gso_type` UDP_L4.
    pub uso: bool,
}

/// One queue (one fd) of a TUN device opened with `IFF_VNET_HDR`. All queues of a device are
/// equivalent; the kernel spreads flows over them. Reads and writes go through `&self`, so one
/// queue can be shared by a reader thread and a writer thread.
#[derive(Debug)]
pub struct TunQueue {
    fd: OwnedFd,
    name: String,
    index: usize,
    offload: Offload,
    timeout: Timeout,
}

/// Opens (creating if needed) the TUN device `name` with `queues` queues (`IFF_MULTI_QUEUE`
/// when more than one) and, if `offload`, the richest offload set the kernel accepts.
///
/// `name` may be a template like `flannel%d`; [`TunQueue::name`] gives the real name. Attaching
/// to an existing device fails with `EINVAL` if it was created with other flags (TAP, queue
/// mode, no `IFF_VNET_HDR`). Needs `CAP_NET_ADMIN` to create the device.
pub fn open_tun(name: &str, queues: usize, offload: bool) -> Result<Vec<TunQueue>, SetupError> {
    if name.is_empty()
        || name.len() >= libc::IFNAMSIZ
        || name
            .bytes()
            .any(|b| b == b'/' || b == 0 || b.is_ascii_whitespace())
    {
        return Err(SetupError::InvalidName(name.to_owned()));
    }
    if queues == 0 {
        return Err(SetupError::NoQueues(name.to_owned()));
    }
    let mut flags = libc::IFF_TUN | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
    if queues > 1 {
        flags |= libc::IFF_MULTI_QUEUE;
    }
    let mut name = name.to_owned();
    let mut negotiated = Offload::default();
    let mut out = Vec::with_capacity(queues);
    for index in 0..queues {
        // Builds the error for `call` on this queue (setup path only, so formatting eagerly is fine).
        let err = |call: &'static str, name: &str| {
            let target = format!("TUN {name} queue {}/{queues}", index + 1);
            move |source| SetupError::Os {
                call,
                target,
                source,
            }
        };
        let fd = open_dev().map_err(err("open(/dev/net/tun)", &name))?;
        // Later queues attach by the real name, in case `name` was a template.
        name = set_iff(&fd, &name, flags).map_err(err("ioctl(TUNSETIFF)", &name))?;
        if index == 0 {
            // The header size, persistence and offloads belong to the device, not the queue.
            let hdr_len = VNET_HDR_LEN as c_int;
            // SAFETY: TUNSETVNETHDRSZ reads one c_int through the pointer, which is live.
            cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr_len) })
                .map_err(err("ioctl(TUNSETVNETHDRSZ)", &name))?;
            // SAFETY: TUNSETPERSIST takes its argument by value.
            cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETPERSIST, 0 as c_ulong) })
                .map_err(err("ioctl(TUNSETPERSIST)", &name))?;
            negotiated =
                negotiate_offload(&fd, offload).map_err(err("ioctl(TUNSETOFFLOAD)", &name))?;
            debug!(device = %name, queues, offload = ?negotiated, "TUN device opened");
        }
        out.push(TunQueue {
            fd,
            name: name.clone(),
            index,
            offload: negotiated,
            timeout: Timeout::new(Some(DEFAULT_TIMEOUT)),
        });
    }
    Ok(out)
}

fn open_dev() -> io::Result<OwnedFd> {
    // SAFETY: the path is a NUL-terminated literal; open has no other memory effects.
    let fd = cvt(unsafe {
        libc::open(
            c"/dev/net/tun".as_ptr(),
            libc::O_RDWR | libc::O_CLOEXEC | libc::O_NONBLOCK,
        )
    })?;
    // SAFETY: `fd` was just returned by open and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The part of `struct ifreq` TUNSETIFF uses, padded to the full 40 bytes the kernel copies.
#[repr(C)]
struct IfReq {
    name: [c_char; libc::IFNAMSIZ],
    flags: c_short,
    _pad: [u8; 22],
}

/// TUNSETIFF: creates or attaches to the device; returns the name the kernel chose.
fn set_iff(fd: &OwnedFd, name: &str, flags: c_int) -> io::Result<String> {
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        // The kernel reads the low 16 bits; all IFF_* TUN flags fit.
        flags: flags as c_short,
        _pad: [0; 22],
    };
    // `name` is shorter than IFNAMSIZ (checked by the caller), so a NUL terminator remains.
    for (dst, src) in req.name.iter_mut().zip(name.bytes()) {
        *dst = src as c_char;
    }
    // SAFETY: TUNSETIFF reads and writes one struct ifreq through the pointer; `req` is live,
    // exclusively borrowed and at least sizeof(struct ifreq) bytes long.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut req) })?;
    req.name[libc::IFNAMSIZ - 1] = 0;
    // SAFETY: the array is NUL-terminated (set just above) and lives for this call.
    let real = unsafe { CStr::from_ptr(req.name.as_ptr()) };
    Ok(real.to_string_lossy().into_owned())
}

/// Tries CSUM+TSO+USO, then CSUM+TSO, then nothing. Only a failure to switch offloads off is an
/// error: the device would then be in a state we cannot describe.
fn negotiate_offload(fd: &OwnedFd, want: bool) -> io::Result<Offload> {
    const BASE: libc::c_uint = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6;
    const USO: libc::c_uint = libc::TUN_F_USO4 | libc::TUN_F_USO6;
    let set = |flags: libc::c_uint| {
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETOFFLOAD, c_ulong::from(flags)) })
    };
    if want {
        match set(BASE | USO) {
            Ok(_) => {
                return Ok(Offload {
                    csum: true,
                    tso: true,
                    uso: true,
                })
            }
            Err(e) => debug!(error = %e, "TUN offload CSUM|TSO|USO refused"),
        }
        match set(BASE) {
            Ok(_) => {
                return Ok(Offload {
                    csum: true,
                    tso: true,
                    uso: false,
                })
            }
            Err(e) => debug!(error = %e, "TUN offload CSUM|TSO refused"),
        }
    }
    set(0)?;
    Ok(Offload::default())
}

impl TunQueue {
    /// The device name (all queues share it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// This queue's position among the queues `open_tun` returned.
    pub fn index(&self) -> usize {
        self.index
    }

    /// What the kernel accepted, device-wide.
    pub fn offload(&self) -> Offload {
        self.offload
    }

    /// How long [`read`](Self::read)/[`write`](Self::write) wait before `TimedOut`: `None` waits
    /// forever, `Some(ZERO)` never waits (then `WouldBlock`). Takes effect on the next wait,
    /// including one another thread is about to start.
    pub fn set_timeout(&self, timeout: Option<Duration>) {
        self.timeout.set(timeout);
    }

    pub fn timeout(&self) -> Option<Duration> {
        self.timeout.get()
    }

    /// Reads one packet: a `virtio_net_hdr` ([`VNET_HDR_LEN`] bytes) then the IP packet, up to
    /// 64 KiB with TSO (size `buf` as [`TUN_READ_BUF_LEN`]; the kernel truncates silently).
    /// Returns `TimedOut` when nothing came within the timeout.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_within(buf, &self.timeout)
    }

    /// [`read`](Self::read) without waiting: `WouldBlock` when no packet is queued.
    pub fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_within(buf, &NO_WAIT)
    }

    /// Waits (up to the timeout, then `TimedOut`) until a packet can be read, without reading
    /// it. An error condition of the device counts as readable: the read then reports it.
    pub fn wait_readable(&self) -> io::Result<()> {
        wait_ready(self.fd.as_raw_fd(), libc::POLLIN, &self.timeout)
    }

    /// Whether a packet can be read now: `WouldBlock` if not.
    pub fn readable_now(&self) -> io::Result<()> {
        wait_ready(self.fd.as_raw_fd(), libc::POLLIN, &NO_WAIT)
    }

    fn read_within(&self, buf: &mut [u8], timeout: &Timeout) -> io::Result<usize> {
        let fd = self.fd.as_raw_fd();
        retry(fd, libc::POLLIN, timeout, || {
            // SAFETY: `buf` is valid for writes of `buf.len()` bytes during the call.
            cvt_size(unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) })
        })
    }

    /// Writes one packet, `virtio_net_hdr` first. Fails with `EIO` while the device is down and
    /// `EINVAL` for a header the kernel rejects (e.g. a GSO type it was not offered).
    pub fn write(&self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    /// [`write`](Self::write) gathered from slices, e.g. a header built on the stack and a
    /// packet still sitting in a receive buffer, without copying them together.
    pub fn write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let fd = self.fd.as_raw_fd();
        let count = c_int::try_from(bufs.len()).unwrap_or(c_int::MAX);
        retry(fd, libc::POLLOUT, &self.timeout, || {
            // SAFETY: IoSlice is ABI-compatible with struct iovec on Unix, and every slice is
            // valid for reads during the call; `count` does not exceed `bufs.len()`.
            cvt_size(unsafe { libc::writev(fd, bufs.as_ptr().cast(), count) })
        })
    }
}

impl AsFd for TunQueue {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for TunQueue {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}
