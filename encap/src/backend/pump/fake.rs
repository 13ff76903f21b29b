//! In-memory stand-ins for the TUN queue and the UDP socket (wireguard-go's `tun/tuntest` and
//! `conn/bindtest`), so that pumps and codecs run in unit tests without root: a [`FakeTun`]
//! the test writes "pod" packets into and reads delivered ones from, and [`FakeUdp`] sockets
//! that reach each other through a [`FakeNet`].

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::ports::{TunIo, UdpIo};
use crate::io::RecvBatch;

/// How long a fake read waits before `TimedOut`, like the real queue's timeout (shorter).
const WAIT: Duration = Duration::from_millis(20);

/// A blocking FIFO with a timeout, the common part of both fakes.
struct Queue<T> {
    items: Mutex<VecDeque<T>>,
    ready: Condvar,
}

impl<T> Default for Queue<T> {
    fn default() -> Self {
        Queue {
            items: Mutex::new(VecDeque::new()),
            ready: Condvar::new(),
        }
    }
}

impl<T> Queue<T> {
    fn lock(&self) -> MutexGuard<'_, VecDeque<T>> {
        self.items.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, item: T) {
        self.lock().push_back(item);
        self.ready.notify_all();
    }

    /// Waits up to `wait` until there is an item: the items, locked, or `None` if there are
    /// none.
    fn nonempty(&self, wait: Duration) -> Option<MutexGuard<'_, VecDeque<T>>> {
        let deadline = Instant::now() + wait;
        let mut items = self.lock();
        while items.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            items = match self.ready.wait_timeout(items, left) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
        Some(items)
    }

    /// Waits up to `wait` for at least one item, then takes up to `max`.
    fn take(&self, max: usize, wait: Duration) -> Vec<T> {
        let Some(mut items) = self.nonempty(wait) else {
            return Vec::new();
        };
        let n = max.min(items.len());
        items.drain(..n).collect()
    }
}

/// What a call that found nothing returns: `TimedOut` after a wait, `WouldBlock` without.
fn nothing(wait: Duration) -> io::Error {
    if wait.is_zero() {
        io::ErrorKind::WouldBlock.into()
    } else {
        io::ErrorKind::TimedOut.into()
    }
}

/// A TUN queue whose "pods" are the test.
#[derive(Default)]
pub(crate) struct FakeTun {
    from_pods: Queue<Vec<u8>>,
    to_pods: Queue<Vec<u8>>,
    /// The pods' answer to a written packet, queued before the write returns, as the kernel
    /// does when the pod's stack answers in the softirq the write ran (ICMP echo, TCP ACKs).
    answer: Mutex<Option<Answer>>,
    /// Refuse every write (`EIO`, as a device set down does).
    pub refuse_writes: AtomicBool,
    /// Whether writes may be UDP super-packets (`TUN_F_USO` taken); off, as before 6.2.
    pub uso: AtomicBool,
}

type Answer = Box<dyn Fn(&[u8]) -> Option<Vec<u8>> + Send>;

impl FakeTun {
    /// From now on every written packet (header first) gets `answer`'s packet, if any, queued
    /// from the pods before the write returns.
    pub fn answer_with(&self, answer: impl Fn(&[u8]) -> Option<Vec<u8>> + Send + 'static) {
        *self.answer.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(answer));
    }

    /// A pod sends `pkt` (virtio-net header first) into the device.
    pub fn inject(&self, pkt: Vec<u8>) {
        self.from_pods.push(pkt);
    }

    /// What the pump wrote to the device (header first), waiting up to `wait` for the first.
    pub fn written(&self, wait: Duration) -> Vec<Vec<u8>> {
        self.to_pods.take(usize::MAX, wait)
    }
}

impl FakeTun {
    fn readable_within(&self, wait: Duration) -> io::Result<()> {
        match self.from_pods.nonempty(wait) {
            Some(_) => Ok(()),
            None => Err(nothing(wait)),
        }
    }

    fn read_within(&self, buf: &mut [u8], wait: Duration) -> io::Result<usize> {
        let Some(pkt) = self.from_pods.take(1, wait).pop() else {
            return Err(nothing(wait));
        };
        let n = pkt.len().min(buf.len());
        buf[..n].copy_from_slice(&pkt[..n]);
        Ok(n)
    }
}

impl TunIo for FakeTun {
    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_within(buf, Duration::ZERO)
    }

    fn wait_readable(&self) -> io::Result<()> {
        self.readable_within(WAIT)
    }

    fn readable_now(&self) -> io::Result<()> {
        self.readable_within(Duration::ZERO)
    }

    fn writes_udp_gso(&self) -> bool {
        self.uso.load(Ordering::Relaxed)
    }

    fn write(&self, pkt: &[u8]) -> io::Result<usize> {
        if self.refuse_writes.load(Ordering::Relaxed) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        self.to_pods.push(pkt.to_vec());
        let answer = self.answer.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(reply) = answer.as_ref().and_then(|f| f(pkt)) {
            self.from_pods.push(reply);
        }
        Ok(pkt.len())
    }

    fn name(&self) -> &str {
        "fake0"
    }
}

/// One received message: sender, bytes and the GRO segment size if several were merged.
type Message = (SocketAddr, Vec<u8>, Option<u16>);

/// The network the fake sockets share: who listens where.
#[derive(Default)]
pub(crate) struct FakeNet {
    inboxes: Mutex<HashMap<SocketAddr, Arc<Queue<Message>>>>,
}

impl FakeNet {
    /// A socket bound to `addr` on this network.
    pub fn bind(self: &Arc<Self>, addr: SocketAddr) -> FakeUdp {
        let inbox = Arc::new(Queue::default());
        self.inboxes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(addr, inbox.clone());
        FakeUdp {
            net: self.clone(),
            addr,
            inbox,
            refuse_gso: AtomicBool::new(false),
            path_mtu: AtomicUsize::new(usize::MAX),
            sends_left: AtomicUsize::new(usize::MAX),
            gso_sends: AtomicUsize::new(0),
            batch_sends: AtomicUsize::new(0),
        }
    }

    /// Delivers to whoever is bound to `to`; nobody there loses it, as UDP does.
    fn deliver(&self, to: SocketAddr, msg: Message) {
        let inbox = self
            .inboxes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&to)
            .cloned();
        if let Some(inbox) = inbox {
            inbox.push(msg);
        }
    }
}

/// A UDP socket on a [`FakeNet`]. A GSO send arrives as one message with a GRO segment size,
/// as a receiver with `UDP_GRO` on gets it; a batch send as one message per datagram.
pub(crate) struct FakeUdp {
    net: Arc<FakeNet>,
    addr: SocketAddr,
    inbox: Arc<Queue<Message>>,
    /// Fail GSO sends of more than one segment with `EIO`, as a device without checksum
    /// offload makes the kernel do.
    pub refuse_gso: AtomicBool,
    /// The path MTU the kernel learned for every destination, as UDP payload bytes: a GSO send
    /// of more than one segment larger than this fails with `EMSGSIZE`, as the kernel's
    /// `udp_send_skb` does; a lone datagram goes (the kernel fragments it).
    pub path_mtu: AtomicUsize,
    /// Datagrams the socket still takes; then every send fails (`ENOBUFS`). A GSO send goes
    /// whole or not at all, a batch send as far as this allows.
    pub sends_left: AtomicUsize,
    /// Syscalls made, by kind.
    pub gso_sends: AtomicUsize,
    pub batch_sends: AtomicUsize,
}

impl FakeUdp {
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sends one datagram from this socket (a stranger or a test's hand-made message).
    pub fn send_to(&self, to: SocketAddr, data: &[u8]) {
        self.net.deliver(to, (self.addr, data.to_vec(), None));
    }
}

impl FakeUdp {
    /// Takes `n` datagrams' worth of `sends_left` if there is that much (returns `n`), else
    /// nothing (returns 0).
    fn take_sends(&self, n: usize) -> usize {
        let took = self
            .sends_left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                left.checked_sub(n)
            });
        if took.is_ok() {
            n
        } else {
            0
        }
    }

    /// Takes up to `n` datagrams' worth of `sends_left`; returns how many.
    fn take_sends_upto(&self, n: usize) -> usize {
        let mut took = 0;
        let _ = self
            .sends_left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                took = n.min(left);
                Some(left - took)
            });
        took
    }

    fn recv_within(&self, batch: &mut RecvBatch, wait: Duration) -> io::Result<usize> {
        let msgs = self.inbox.take(batch.capacity(), wait);
        if msgs.is_empty() {
            return Err(nothing(wait));
        }
        Ok(batch.fill(msgs.iter().map(|(src, d, gro)| (*src, &d[..], *gro))))
    }
}

impl UdpIo for FakeUdp {
    fn recv_batch(&self, batch: &mut RecvBatch) -> io::Result<usize> {
        self.recv_within(batch, WAIT)
    }

    fn try_recv_batch(&self, batch: &mut RecvBatch) -> io::Result<usize> {
        self.recv_within(batch, Duration::ZERO)
    }

    fn send_gso(&self, to: SocketAddr, data: &[u8], seg_len: u16) -> io::Result<usize> {
        self.gso_sends.fetch_add(1, Ordering::Relaxed);
        let merged = seg_len != 0 && data.len() > usize::from(seg_len);
        if merged && self.refuse_gso.load(Ordering::Relaxed) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        if merged && usize::from(seg_len) > self.path_mtu.load(Ordering::Relaxed) {
            return Err(io::Error::from_raw_os_error(libc::EMSGSIZE));
        }
        let datagrams = match merged {
            true => data.len().div_ceil(usize::from(seg_len)),
            false => 1,
        };
        if self.take_sends(datagrams) < datagrams {
            return Err(io::Error::from_raw_os_error(libc::ENOBUFS));
        }
        let gro = merged.then_some(seg_len);
        self.net.deliver(to, (self.addr, data.to_vec(), gro));
        Ok(data.len())
    }

    fn send_batch(&self, msgs: &[(SocketAddr, &[u8])]) -> io::Result<usize> {
        self.batch_sends.fetch_add(1, Ordering::Relaxed);
        let msgs = &msgs[..self.take_sends_upto(msgs.len())];
        if msgs.is_empty() {
            return Err(io::Error::from_raw_os_error(libc::ENOBUFS));
        }
        for (to, d) in msgs {
            self.net.deliver(*to, (self.addr, d.to_vec(), None));
        }
        Ok(msgs.len())
    }

    fn gso_supported(&self) -> bool {
        true
    }
}
