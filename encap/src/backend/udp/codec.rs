//! Flannel's udp encapsulation as a pump codec: the datagram is the inner packet, nothing
//! else. What we add is the admission check Flannel lacks: the outer sender must be a lease's
//! PublicIP and the inner source inside that lease's subnet.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use crate::backend::pump::{sender_v4, Codec, Wire};
use crate::io::RecvMsg;
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

    fn tx_scratch(&self) {}
    fn rx_scratch(&self) {}

    fn route(&self, dst: Ipv4Addr) -> Option<SocketAddr> {
        self.peers.load().route(dst).map(|p| p.endpoint)
    }

    fn transmit(
        &self,
        _: &mut (),
        to: SocketAddr,
        segs: &[u8],
        seg_len: usize,
        wire: &Wire,
        tally: &mut Tally,
    ) -> Result<(), DropReason> {
        // The segments are already Flannel's datagrams: send them from where they lie.
        if wire.send(to, segs, seg_len, tally) {
            Ok(())
        } else {
            Err(DropReason::IoError)
        }
    }

    fn receive<F>(&self, _: &mut (), msg: &RecvMsg<'_>, _: &Wire, tally: &mut Tally, mut deliver: F)
    where
        F: FnMut(&[u8], &mut Tally),
    {
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

/// The anti-spoofing rules: the sender is a peer and the inner source is in its subnet (the
/// pump then checks that the destination is ours).
fn admit(pkt: &[u8], sender: Ipv4Addr, table: &PeerTable) -> Result<(), DropReason> {
    if !table.knows(sender) {
        return Err(DropReason::UnknownSender);
    }
    let src = match ip::addrs(pkt) {
        Ok((IpAddr::V4(s), IpAddr::V4(_))) => s,
        Ok(_) => return Err(DropReason::NotForUs),
        Err(_) => return Err(DropReason::Malformed),
    };
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
}
