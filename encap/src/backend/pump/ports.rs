//! The two things the pump does I/O through, as small traits in the manner of wireguard-go's
//! `tun.Device` and `conn.Bind`: the kernel's TUN queue and UDP socket in production, in-memory
//! fakes in tests (`fake.rs`), so the packet threads run without root or real sockets.
//!
//! Both are driven through `&self` by one thread each way, and every blocking call gives up
//! after a short timeout (see [`crate::io::is_timeout`]) so the threads see their stop flag.

use std::io;
use std::net::SocketAddr;

use crate::io::{RecvBatch, TunQueue, UdpSock};

/// One TUN queue: reads and writes one packet with its virtio-net header in front.
pub(crate) trait TunIo: Send + Sync + 'static {
    /// Reads one packet without waiting: `WouldBlock` when none is queued.
    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// Waits (up to a short timeout) until a packet is queued, without taking it.
    fn wait_readable(&self) -> io::Result<()>;
    /// Whether a packet is queued now: `WouldBlock` if not.
    fn readable_now(&self) -> io::Result<()>;
    fn write(&self, pkt: &[u8]) -> io::Result<usize>;
    /// Whether writes may be UDP super-packets (`GSO_UDP_L4`): the kernel took `TUN_F_USO`.
    fn writes_udp_gso(&self) -> bool;
    /// The device name, for logs.
    fn name(&self) -> &str;
}

/// One UDP socket, batch first.
pub(crate) trait UdpIo: Send + Sync + 'static {
    /// Fills `batch` with up to its capacity of messages; how many it got.
    fn recv_batch(&self, batch: &mut RecvBatch) -> io::Result<usize>;
    /// [`recv_batch`](Self::recv_batch) without waiting: `WouldBlock` when nothing is queued.
    fn try_recv_batch(&self, batch: &mut RecvBatch) -> io::Result<usize>;
    /// Sends `data` to `to` as datagrams of `seg_len` bytes (UDP GSO), or as one datagram when
    /// `seg_len` is 0 or the data fits one segment.
    fn send_gso(&self, to: SocketAddr, data: &[u8], seg_len: u16) -> io::Result<usize>;
    /// Sends each datagram to its own destination (`sendmmsg`); how many went out.
    fn send_batch(&self, msgs: &[(SocketAddr, &[u8])]) -> io::Result<usize>;
    /// Whether the kernel knows UDP GSO at all (it may still refuse it per send).
    fn gso_supported(&self) -> bool;
}

impl TunIo for TunQueue {
    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        TunQueue::try_read(self, buf)
    }

    fn wait_readable(&self) -> io::Result<()> {
        TunQueue::wait_readable(self)
    }

    fn readable_now(&self) -> io::Result<()> {
        TunQueue::readable_now(self)
    }

    fn write(&self, pkt: &[u8]) -> io::Result<usize> {
        TunQueue::write(self, pkt)
    }

    fn writes_udp_gso(&self) -> bool {
        self.offload().uso
    }

    fn name(&self) -> &str {
        TunQueue::name(self)
    }
}

impl UdpIo for UdpSock {
    fn recv_batch(&self, batch: &mut RecvBatch) -> io::Result<usize> {
        UdpSock::recv_batch(self, batch)
    }

    fn try_recv_batch(&self, batch: &mut RecvBatch) -> io::Result<usize> {
        UdpSock::try_recv_batch(self, batch)
    }

    fn send_gso(&self, to: SocketAddr, data: &[u8], seg_len: u16) -> io::Result<usize> {
        UdpSock::send_gso(self, to, data, seg_len)
    }

    fn send_batch(&self, msgs: &[(SocketAddr, &[u8])]) -> io::Result<usize> {
        UdpSock::send_batch(self, msgs)
    }

    fn gso_supported(&self) -> bool {
        UdpSock::gso_supported(self)
    }
}

/// A shared TUN queue (a test keeps a handle on its fake).
impl<T: TunIo> TunIo for std::sync::Arc<T> {
    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        (**self).try_read(buf)
    }

    fn wait_readable(&self) -> io::Result<()> {
        (**self).wait_readable()
    }

    fn readable_now(&self) -> io::Result<()> {
        (**self).readable_now()
    }

    fn write(&self, pkt: &[u8]) -> io::Result<usize> {
        (**self).write(pkt)
    }

    fn writes_udp_gso(&self) -> bool {
        (**self).writes_udp_gso()
    }

    fn name(&self) -> &str {
        (**self).name()
    }
}

/// A shared socket (a test keeps a handle on its fake).
impl<U: UdpIo> UdpIo for std::sync::Arc<U> {
    fn recv_batch(&self, batch: &mut RecvBatch) -> io::Result<usize> {
        (**self).recv_batch(batch)
    }

    fn try_recv_batch(&self, batch: &mut RecvBatch) -> io::Result<usize> {
        (**self).try_recv_batch(batch)
    }

    fn send_gso(&self, to: SocketAddr, data: &[u8], seg_len: u16) -> io::Result<usize> {
        (**self).send_gso(to, data, seg_len)
    }

    fn send_batch(&self, msgs: &[(SocketAddr, &[u8])]) -> io::Result<usize> {
        (**self).send_batch(msgs)
    }

    fn gso_supported(&self) -> bool {
        (**self).gso_supported()
    }
}
