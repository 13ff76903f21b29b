//! `recvmmsg` into buffers allocated once: [`RecvBatch`] owns the data, address and cmsg space
//! for `count` messages and, after [`UdpSock::recv_batch`], each message's length, source and
//! GRO segment size. The syscall's headers, which point into those buffers, are built on the
//! stack for each call, so the batch holds no raw pointers into itself and is plainly `Send`.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;

use libc::{c_int, c_uint};

use super::addr::{RawAddr, RAW_ADDR_LEN};
use super::sys::{cvt, retry, Timeout, NO_WAIT};
use super::udp::{CmsgBuf, UdpSock};

/// Most messages per `recvmmsg`: the headers for that many live on the stack (5 KiB).
const MAX_COUNT: usize = 64;

/// Where a message's source could not be read (never seen for UDP; kept total rather than panic).
const UNKNOWN_SRC: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));

/// What the last receive put in one slot.
#[derive(Clone, Copy, Debug)]
struct Meta {
    len: usize,
    src: SocketAddr,
    gro: Option<u16>,
    truncated: bool,
}

/// Preallocated room for a batch of received messages; reuse it for every call.
pub struct RecvBatch {
    /// `count` slots of `slot_len` bytes, back to back.
    data: Vec<u8>,
    slot_len: usize,
    names: Vec<RawAddr>,
    ctrl: Vec<CmsgBuf>,
    meta: Vec<Meta>,
    filled: usize,
}

impl std::fmt::Debug for RecvBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvBatch")
            .field("capacity", &self.capacity())
            .field("buf_len", &self.slot_len)
            .field("filled", &self.filled)
            .finish_non_exhaustive()
    }
}

/// One received message: possibly several GRO-merged datagrams, see [`RecvMsg::datagrams`].
#[derive(Clone, Copy, Debug)]
pub struct RecvMsg<'a> {
    data: &'a [u8],
    src: SocketAddr,
    gro_size: Option<u16>,
    truncated: bool,
}

impl<'a> RecvMsg<'a> {
    /// A message as if received from `src` (fuzzing and tests feed decoders without a socket).
    #[cfg(any(test, fuzzing))]
    pub fn from_parts(data: &'a [u8], src: SocketAddr, gro_size: Option<u16>) -> Self {
        RecvMsg {
            data,
            src,
            gro_size,
            truncated: false,
        }
    }

    /// The bytes received: one datagram, or several back to back when GRO merged them.
    pub fn data(&self) -> &'a [u8] {
        self.data
    }

    /// The sender (`0.0.0.0:0` if the kernel gave no usable address, which UDP never does).
    pub fn source(&self) -> SocketAddr {
        self.src
    }

    /// The `UDP_GRO` segment size when the kernel merged datagrams, else `None`.
    pub fn gro_size(&self) -> Option<u16> {
        self.gro_size
    }

    /// The message did not fit its slot: `data` is only its beginning. Drop it.
    pub fn is_truncated(&self) -> bool {
        self.truncated
    }

    /// The individual datagrams, split at the GRO segment size.
    pub fn datagrams(&self) -> Datagrams<'a> {
        Datagrams::new(self.data, self.gro_size)
    }

    /// The length of every datagram but the last: where each of them starts.
    pub fn datagram_len(&self) -> usize {
        Datagrams::step(self.data.len(), self.gro_size)
    }
}

/// A received message lent for rewriting where the kernel put it (a codec decrypting in
/// place): its bytes, and through [`view`](Self::view) all that [`RecvMsg`] tells of them.
#[derive(Debug)]
pub struct RecvMsgMut<'a> {
    data: &'a mut [u8],
    src: SocketAddr,
    gro_size: Option<u16>,
    truncated: bool,
}

impl<'a> RecvMsgMut<'a> {
    /// A message as if received from `src` (fuzzing and tests feed decoders without a socket).
    #[cfg(any(test, fuzzing))]
    pub fn from_parts(data: &'a mut [u8], src: SocketAddr, gro_size: Option<u16>) -> Self {
        RecvMsgMut {
            data,
            src,
            gro_size,
            truncated: false,
        }
    }

    /// The message, read-only.
    pub fn view(&self) -> RecvMsg<'_> {
        RecvMsg {
            data: self.data,
            src: self.src,
            gro_size: self.gro_size,
            truncated: self.truncated,
        }
    }

    /// The bytes received, to rewrite in place; [`RecvMsg::datagram_len`] says where each
    /// datagram starts.
    pub fn data_mut(&mut self) -> &mut [u8] {
        self.data
    }
}

/// Splits a GRO-merged message into its datagrams: `seg` bytes each, the last possibly shorter.
/// Without a (non-zero) segment size the whole message is one datagram; empty data yields none.
#[derive(Clone, Debug)]
pub struct Datagrams<'a> {
    rest: &'a [u8],
    seg: usize,
}

impl<'a> Datagrams<'a> {
    pub fn new(data: &'a [u8], seg: Option<u16>) -> Self {
        Self {
            rest: data,
            seg: Self::step(data.len(), seg),
        }
    }

    /// The length of every datagram but the last in `len` bytes received with GRO segment
    /// size `seg` (at least 1).
    pub fn step(len: usize, seg: Option<u16>) -> usize {
        match seg {
            Some(s) if s > 0 => usize::from(s),
            _ => len.max(1),
        }
    }
}

impl<'a> Iterator for Datagrams<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        if self.rest.is_empty() {
            return None;
        }
        let (head, tail) = self.rest.split_at(self.seg.min(self.rest.len()));
        self.rest = tail;
        Some(head)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.rest.len().div_ceil(self.seg.max(1));
        (n, Some(n))
    }
}

impl ExactSizeIterator for Datagrams<'_> {}

impl RecvBatch {
    /// Room for `count` messages (1..=64) of `buf_len` bytes each (at least 1). With GRO on,
    /// use 65535: a merged message larger than its slot is truncated and lost.
    pub fn new(count: usize, buf_len: usize) -> Self {
        let count = count.clamp(1, MAX_COUNT);
        let slot_len = buf_len.max(1);
        let empty_meta = Meta {
            len: 0,
            src: UNKNOWN_SRC,
            gro: None,
            truncated: false,
        };
        Self {
            data: vec![0; count * slot_len],
            slot_len,
            names: vec![RawAddr::zeroed(); count],
            ctrl: vec![CmsgBuf([0; 64]); count],
            meta: vec![empty_meta; count],
            filled: 0,
        }
    }

    /// How many messages one receive can return.
    pub fn capacity(&self) -> usize {
        self.meta.len()
    }

    /// The size of each message slot.
    pub fn buf_len(&self) -> usize {
        self.slot_len
    }

    /// Messages filled by the last receive (0 after an error).
    pub fn len(&self) -> usize {
        self.filled
    }

    pub fn is_empty(&self) -> bool {
        self.filled == 0
    }

    /// Message `i` of the last receive, `None` past [`len`](Self::len).
    pub fn msg(&self, i: usize) -> Option<RecvMsg<'_>> {
        let m = self.meta.get(i).filter(|_| i < self.filled)?;
        let start = i * self.slot_len;
        Some(RecvMsg {
            data: &self.data[start..start + m.len],
            src: m.src,
            gro_size: m.gro,
            truncated: m.truncated,
        })
    }

    /// Message `i` for rewriting in place (decrypting where it lies).
    pub fn msg_mut(&mut self, i: usize) -> Option<RecvMsgMut<'_>> {
        let m = self.meta.get(i).filter(|_| i < self.filled)?;
        let start = i * self.slot_len;
        Some(RecvMsgMut {
            data: &mut self.data[start..start + m.len],
            src: m.src,
            gro_size: m.gro,
            truncated: m.truncated,
        })
    }

    /// The messages of the last receive, in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = RecvMsg<'_>> + '_ {
        self.meta[..self.filled]
            .iter()
            .zip(self.data.chunks(self.slot_len))
            .map(|(m, slot)| RecvMsg {
                data: &slot[..m.len],
                src: m.src,
                gro_size: m.gro,
                truncated: m.truncated,
            })
    }

    /// Puts messages in as a receive would, for in-memory sockets in tests: each (source,
    /// bytes, GRO segment size) into the next slot, cut to the slot and marked truncated if
    /// longer. Returns how many fitted in the batch.
    #[cfg(test)]
    pub(crate) fn fill<'d>(
        &mut self,
        msgs: impl IntoIterator<Item = (SocketAddr, &'d [u8], Option<u16>)>,
    ) -> usize {
        let mut n = 0;
        let slots = self
            .data
            .chunks_mut(self.slot_len)
            .zip(self.meta.iter_mut());
        for ((slot, meta), (src, bytes, gro)) in slots.zip(msgs) {
            let len = bytes.len().min(slot.len());
            slot[..len].copy_from_slice(&bytes[..len]);
            *meta = Meta {
                len,
                src,
                gro,
                truncated: len < bytes.len(),
            };
            n += 1;
        }
        self.filled = n;
        n
    }
}

/// The `UDP_GRO` cmsg's segment size, if the kernel attached one.
fn gro_size(hdr: &libc::msghdr) -> Option<u16> {
    let mut found = None;
    // SAFETY: `msg_control` points to this message's CmsgBuf and the kernel set
    // `msg_controllen` to the bytes it wrote there (at most the buffer size), so the CMSG_*
    // walk stays inside it; the payload is read unaligned and only when its length covers an int.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(hdr);
        while !cmsg.is_null() {
            let c = &*cmsg;
            if c.cmsg_level == libc::SOL_UDP
                && c.cmsg_type == libc::UDP_GRO
                && c.cmsg_len as usize >= libc::CMSG_LEN(size_of::<c_int>() as c_uint) as usize
            {
                let v = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<c_int>());
                found = u16::try_from(v).ok().filter(|&s| s > 0);
            }
            cmsg = libc::CMSG_NXTHDR(hdr, cmsg);
        }
    }
    found
}

impl UdpSock {
    /// Receives up to `batch.capacity()` messages with one `recvmmsg`, waiting (up to the
    /// timeout, then `TimedOut`) until at least one is there but not for more after that.
    /// The wait is a `poll`, not recvmmsg's own timeout, which is only checked between
    /// datagrams and so cannot end an idle wait.
    pub fn recv_batch(&self, batch: &mut RecvBatch) -> io::Result<usize> {
        self.recv_batch_within(batch, &self.timeout)
    }

    /// [`recv_batch`](Self::recv_batch) without waiting: `WouldBlock` when nothing is queued.
    pub fn try_recv_batch(&self, batch: &mut RecvBatch) -> io::Result<usize> {
        self.recv_batch_within(batch, &NO_WAIT)
    }

    fn recv_batch_within(&self, batch: &mut RecvBatch, timeout: &Timeout) -> io::Result<usize> {
        batch.filled = 0;
        let count = batch.capacity().min(MAX_COUNT);
        let slot_len = batch.slot_len;
        let mut iovs = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; MAX_COUNT];
        for (iov, slot) in iovs.iter_mut().zip(batch.data.chunks_mut(slot_len)) {
            iov.iov_base = slot.as_mut_ptr().cast();
            iov.iov_len = slot.len();
        }
        // SAFETY: mmsghdr is a plain C struct; all zeros is a valid (empty) value.
        let mut hdrs: [libc::mmsghdr; MAX_COUNT] = unsafe { std::mem::zeroed() };
        // Raw pointers are taken after the last write through a reference to these buffers.
        let (iov_ptr, names, ctrl) = (
            iovs.as_mut_ptr(),
            batch.names.as_mut_ptr(),
            batch.ctrl.as_mut_ptr(),
        );
        for (i, h) in hdrs.iter_mut().take(count).enumerate() {
            let m = &mut h.msg_hdr;
            m.msg_name = names.wrapping_add(i).cast();
            m.msg_namelen = RAW_ADDR_LEN;
            m.msg_iov = iov_ptr.wrapping_add(i);
            m.msg_iovlen = 1;
            m.msg_control = ctrl.wrapping_add(i).cast();
            m.msg_controllen = size_of::<CmsgBuf>() as _;
        }
        let fd = self.as_raw_fd();
        let hdr_ptr = hdrs.as_mut_ptr();
        let n = retry(fd, libc::POLLIN, timeout, || {
            // SAFETY: the first `count` headers point at `count` iovecs on this stack frame and
            // at slots, names and cmsg space of `batch` (all in bounds: `count` is at most the
            // batch's capacity), which stays exclusively borrowed until recvmmsg returns.
            cvt(unsafe {
                libc::recvmmsg(
                    fd,
                    hdr_ptr,
                    count as c_uint,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                )
            })
        })?;
        let n = (n as usize).min(count);
        for (i, h) in hdrs.iter().take(n).enumerate() {
            batch.meta[i] = Meta {
                len: (h.msg_len as usize).min(slot_len),
                src: batch.names[i]
                    .get(h.msg_hdr.msg_namelen)
                    .unwrap_or(UNKNOWN_SRC),
                gro: gro_size(&h.msg_hdr),
                truncated: h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0,
            };
        }
        batch.filled = n;
        Ok(n)
    }
}
