//! Batched, blocking I/O for the userspace datapath: TUN queues with virtio-net offloads and UDP
//! sockets with GSO/GRO and `sendmmsg`/`recvmmsg` (the kernel facts are in the project's
//! fast-path spec, `shared/spec/fast-path.md` beside the checkout).
//!
//! The model is wireguard-go's `tun.Device` / `conn.Bind`: each queue or socket is driven by a
//! dedicated thread doing blocking calls through `&self`, with buffers the caller allocated once.
//! Nothing here allocates or logs per packet; errors on the per-packet calls are plain
//! [`std::io::Error`]s because the caller knows which queue or socket it called.
//!
//! Shutdown: every blocking call waits at most a per-object timeout ([`DEFAULT_TIMEOUT`],
//! changeable with `set_timeout`) and then fails with [`std::io::ErrorKind::TimedOut`], so a
//! worker loop notices a stop flag within that time without an extra fd to signal. The fds are
//! non-blocking and the wait (`poll`) only happens after a call found nothing to do, so a busy
//! queue costs one syscall per batch, not two.

mod addr;
mod recv;
mod steer;
mod sys;
mod tun;
mod udp;

#[cfg(test)]
mod tun_tests;
#[cfg(test)]
mod udp_tests;

use std::io;
use std::time::Duration;

use thiserror::Error;

pub use recv::{Datagrams, RecvBatch, RecvMsg, RecvMsgMut};
pub use steer::{bind_consecutive, steer_by_source_port};
pub use tun::{open_tun, Offload, TunQueue, TUN_READ_BUF_LEN, VNET_HDR_LEN};
pub use udp::{
    BufferSizes, Listen, UdpSock, DEFAULT_SOCKET_BUFFER, GSO_MAX_SEGMENTS, SEND_BATCH_MAX,
};

/// How long a blocking read/write/send/recv waits before returning `TimedOut`: short enough for
/// a prompt shutdown, long enough that idle workers cost nothing measurable.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(200);

/// Errors while setting up a TUN device or a socket: which call failed on what.
#[derive(Debug, Error)]
pub enum SetupError {
    #[error("invalid TUN device name {0:?}: need 1-15 bytes, no '/', whitespace or NUL")]
    InvalidName(String),
    #[error("TUN device {0:?}: need at least one queue")]
    NoQueues(String),
    #[error("{call} on {target}: {source}")]
    Os {
        /// The syscall or option, e.g. `ioctl(TUNSETIFF)`.
        call: &'static str,
        /// The device or socket, e.g. `TUN flannel0 queue 1/2`.
        target: String,
        #[source]
        source: io::Error,
    },
}

/// True for the errors that only mean "nothing happened before the timeout": the caller should
/// check its stop flag and call again.
pub fn is_timeout(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}
