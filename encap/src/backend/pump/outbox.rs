//! What a codec asks the pump to send, as data: codecs never hold a socket (boringtun's `noise`
//! model), so no send can happen while a codec holds a peer's lock. The pump sends after the
//! codec returned.

use std::net::SocketAddr;

/// A run of back-to-back datagrams for one peer, each `seg_len` bytes but the last (quinn-udp's
/// `Transmit`): one UDP GSO send, or one `sendmmsg`, per up to 64 of them.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Transmit<'a> {
    pub to: SocketAddr,
    pub data: &'a [u8],
    pub seg_len: usize,
}

/// Single datagrams a codec produced besides its data runs (handshake messages, cookie
/// replies, keepalives, packets released from a handshake queue), copied back to back into
/// one buffer that keeps its capacity from call to call.
#[derive(Debug, Default)]
pub(crate) struct Outbox {
    bytes: Vec<u8>,
    queued: Vec<Queued>,
}

#[derive(Clone, Copy, Debug)]
struct Queued {
    to: SocketAddr,
    end: usize,
    /// A refused send loses a packet (counted as an `io_error` drop) rather than a protocol
    /// message that the protocol itself retries.
    counted: bool,
}

/// One datagram waiting in an [`Outbox`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Datagram<'a> {
    pub to: SocketAddr,
    pub data: &'a [u8],
    /// Whether a refused send counts as a dropped packet.
    pub counted: bool,
}

impl Outbox {
    /// Room for a few handshakes' worth of messages before the first allocation.
    pub fn new() -> Self {
        Outbox {
            bytes: Vec::with_capacity(4096),
            queued: Vec::with_capacity(16),
        }
    }

    /// A protocol message (handshake, cookie reply): if the kernel refuses it, the protocol's
    /// own retry covers the loss, so it is not counted as a dropped packet.
    pub fn push_control(&mut self, to: SocketAddr, datagram: &[u8]) {
        self.push(to, datagram, false);
    }

    /// A datagram whose loss is a lost packet (a sealed data packet, a timer's keepalive or
    /// initiation): a refusal counts as an `io_error` drop.
    pub fn push_packet(&mut self, to: SocketAddr, datagram: &[u8]) {
        self.push(to, datagram, true);
    }

    fn push(&mut self, to: SocketAddr, datagram: &[u8], counted: bool) {
        self.bytes.extend_from_slice(datagram);
        self.queued.push(Queued {
            to,
            end: self.bytes.len(),
            counted,
        });
    }

    pub fn is_empty(&self) -> bool {
        self.queued.is_empty()
    }

    /// The queued datagrams, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = Datagram<'_>> + '_ {
        let mut start = 0;
        self.queued.iter().map(move |q| {
            let data = self.bytes.get(start..q.end).unwrap_or_default();
            start = q.end;
            Datagram {
                to: q.to,
                data,
                counted: q.counted,
            }
        })
    }

    /// Forgets what was sent, keeping the buffers.
    pub fn clear(&mut self) {
        self.bytes.clear();
        self.queued.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_datagrams_apart_and_in_order() {
        let (a, b): (SocketAddr, SocketAddr) = (
            "10.0.0.1:1".parse().expect("addr"),
            "10.0.0.2:2".parse().expect("addr"),
        );
        let mut out = Outbox::new();
        assert!(out.is_empty());
        out.push_control(a, b"init");
        out.push_packet(b, b"");
        out.push_packet(a, b"data");
        let got: Vec<_> = out.iter().map(|q| (q.to, q.data, q.counted)).collect();
        assert_eq!(
            got,
            [
                (a, &b"init"[..], false),
                (b, &b""[..], true),
                (a, &b"data"[..], true)
            ]
        );
        out.clear();
        assert!(out.is_empty());
        assert_eq!(out.iter().count(), 0);
    }
}
