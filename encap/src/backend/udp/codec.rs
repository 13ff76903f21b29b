//! Flannel's udp encapsulation as a pump codec: the datagram is the inner packet, nothing
//! else. What we add is the admission check Flannel lacks: the outer sender must be a lease's
//! PublicIP and the inner source inside that lease's subnet.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use crate::backend::pump::{sender_v4, Codec, Outbox, Packets, Transmit};
use crate::io::RecvMsgMut;
use crate::peers::{PeerTable, SharedPeers};
use crate::stats::{DropReason, Tally};
use crate::wire::ip;

pub(super) struct UdpCodec {
    pub peers: Arc<SharedPeers>,
}

impl Codec for UdpCodec {
    type Route = SocketAddr;
    type TxScratch = ();
    type RxScratch = ();

    const DECREMENT_TTL: bool = true;

    // The outer UDP checksum covers the whole inner packet and the kernel verified it before
    // recvmmsg returned it (Flannel's senders, Go or ours, always set it).
    const DELIVERS_INTACT: bool = true;

    // Flannel's udp peers (Go's too) send to the configured port whatever port a datagram
    // came from, and check only the sender's address.
    const SEND_FROM_QUEUE_PORTS: bool = true;

    fn tx_scratch(&self) {}
    fn rx_scratch(&self) {}

    fn same_route(&self, a: &SocketAddr, b: &SocketAddr) -> bool {
        a == b
    }

    fn route(&self, dst: IpAddr) -> Option<SocketAddr> {
        self.peers.load().route(dst).map(|p| p.endpoint)
    }

    fn transmit<'a>(
        &self,
        _: &'a mut (),
        to: SocketAddr,
        pkts: Packets<'a>,
        _: &mut Outbox,
        _: &mut Tally,
    ) -> Result<Option<Transmit<'a>>, DropReason> {
        // The segments are already Flannel's datagrams: send them from where they lie.
        Ok(Some(pkts.into_datagrams_to(to)))
    }

    fn receive<F>(
        &self,
        _: &mut (),
        msg: &mut RecvMsgMut<'_>,
        _: &mut Outbox,
        tally: &mut Tally,
        mut deliver: F,
    ) where
        F: FnMut(&[u8], &mut Tally),
    {
        // Flannel's udp datagrams are the inner packets: delivered from where they lie.
        let msg = msg.view();
        let Some(sender) = sender_v4(msg.source()) else {
            return tally.count_drop(DropReason::UnknownSender);
        };
        let table = self.peers.load();
        for d in msg.datagrams() {
            match admit(d, sender, &table) {
                Ok(()) => deliver(d, tally),
                Err(why) => tally.count_drop(why),
            }
        }
    }
}

/// The anti-spoofing rules: the sender is a peer, the inner packet is a whole IPv4 packet and
/// its source is in the sender's subnet (the pump then checks that the destination is ours).
fn admit(pkt: &[u8], sender: Ipv4Addr, table: &PeerTable) -> Result<(), DropReason> {
    if !table.knows(sender) {
        return Err(DropReason::UnknownSender);
    }
    let src = match ip::addrs(pkt) {
        Ok((IpAddr::V4(s), IpAddr::V4(_))) => s,
        Ok(_) => return Err(DropReason::NotForUs),
        Err(_) => return Err(DropReason::Malformed),
    };
    // `addrs` reads only the address fields; GRO and the TUN would take IHL and total length
    // on trust, and the packet would be counted as delivered.
    if ip::parse(pkt).is_err() {
        return Err(DropReason::Malformed);
    }
    if !table.may_send_from(sender, src) {
        return Err(DropReason::SpoofedSource);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peers::Peer;

    fn v4_packet(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
        let mut p = vec![0u8; 28];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&28u16.to_be_bytes());
        p[8] = 64;
        p[9] = 17;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        p
    }

    #[test]
    fn admission_rules() {
        let sender: Ipv4Addr = "172.30.0.12".parse().expect("ip");
        let table = PeerTable::new(vec![Peer {
            subnet: "10.244.2.0/24".parse().expect("net"),
            public_ip: sender,
            endpoint: (sender, 8285).into(),
        }]);
        let ok = v4_packet([10, 244, 2, 5], [10, 244, 1, 7]);
        assert_eq!(admit(&ok, sender, &table), Ok(()));
        assert_eq!(
            admit(&ok, "172.30.0.99".parse().expect("ip"), &table),
            Err(DropReason::UnknownSender)
        );
        let spoofed = v4_packet([10, 244, 3, 5], [10, 244, 1, 7]);
        assert_eq!(
            admit(&spoofed, sender, &table),
            Err(DropReason::SpoofedSource)
        );
        assert_eq!(
            admit(&[0x45, 0, 1], sender, &table),
            Err(DropReason::Malformed)
        );
        assert_eq!(
            admit(&[0x60; 40], sender, &table),
            Err(DropReason::NotForUs),
            "IPv6 inside the udp backend's IPv4 tunnel"
        );
    }

    /// Inner headers that lie about their own size: addresses are readable, the packet is not.
    fn lying_headers() -> Vec<(&'static str, Vec<u8>)> {
        let ok = v4_packet([10, 244, 2, 5], [10, 244, 1, 7]);
        let mut short_ihl = ok.clone();
        short_ihl[0] = 0x44;
        let mut zero_ihl = ok.clone();
        zero_ihl[0] = 0x40;
        let mut too_long = ok.clone();
        too_long[2..4].copy_from_slice(&1500u16.to_be_bytes());
        let mut shorter_than_header = ok.clone();
        shorter_than_header[2..4].copy_from_slice(&19u16.to_be_bytes());
        let mut ihl_past_end = ok.clone();
        ihl_past_end[0] = 0x4f; // 60-byte header in a 28-byte packet
        vec![
            ("IHL 4", short_ihl),
            ("IHL 0", zero_ihl),
            ("total length beyond the datagram", too_long),
            ("total length below the header", shorter_than_header),
            ("IHL beyond the total length", ihl_past_end),
        ]
    }

    #[test]
    fn lying_inner_headers_are_malformed() {
        let sender: Ipv4Addr = "172.30.0.12".parse().expect("ip");
        let table = PeerTable::new(vec![Peer {
            subnet: "10.244.2.0/24".parse().expect("net"),
            public_ip: sender,
            endpoint: (sender, 8285).into(),
        }]);
        for (what, pkt) in lying_headers() {
            assert_eq!(
                admit(&pkt, sender, &table),
                Err(DropReason::Malformed),
                "{what}"
            );
        }
        // Padding after the declared length is not a lie (Ethernet minimum frames have it).
        let mut padded = v4_packet([10, 244, 2, 5], [10, 244, 1, 7]);
        padded.extend_from_slice(&[0; 18]);
        assert_eq!(admit(&padded, sender, &table), Ok(()));
    }

    #[test]
    fn receive_counts_lying_headers_as_malformed_not_delivered() {
        use crate::io::RecvMsgMut;

        let sender: Ipv4Addr = "172.30.0.12".parse().expect("ip");
        let table = PeerTable::new(vec![Peer {
            subnet: "10.244.2.0/24".parse().expect("net"),
            public_ip: sender,
            endpoint: (sender, 8285).into(),
        }]);
        let codec = UdpCodec {
            peers: Arc::new(SharedPeers::from_pointee(table)),
        };
        let mut out = Outbox::new();
        let mut tally = Tally::default();
        let mut delivered = Vec::new();
        let cases = lying_headers();
        for (_, pkt) in &cases {
            let mut data = pkt.clone();
            let mut msg = RecvMsgMut::from_parts(&mut data, (sender, 8285).into(), None);
            codec.receive(&mut (), &mut msg, &mut out, &mut tally, |p, _| {
                delivered.push(p.to_vec())
            });
        }
        assert!(delivered.is_empty(), "{delivered:?}");
        assert_eq!(
            tally.drops[DropReason::Malformed as usize],
            cases.len() as u64
        );
        assert_eq!(tally.packets, 0);
        assert!(out.is_empty(), "udp never answers");
    }
}
