//! Network -> pod: receive datagrams in batches (`recvmmsg`, UDP GRO), drop what no lease
//! justifies, merge TCP segments into super-packets and write them to the TUN.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use ipnet::Ipv4Net;

use super::Shared;
use crate::io::{is_timeout, RecvBatch, TunQueue, UdpSock};
use crate::peers::PeerTable;
use crate::stats::{DropReason, Tally};
use crate::wire::{ip, Gro, VNET_HDR_LEN};

/// Messages per `recvmmsg`; each may hold many GRO-merged datagrams.
const BATCH: usize = 16;
/// Super-packets the coalescer holds before it must be flushed to the TUN.
const GRO_PACKETS: usize = 64;

pub(super) struct Receiver {
    tun: Arc<TunQueue>,
    sock: Arc<UdpSock>,
    shared: Arc<Shared>,
}

impl Receiver {
    pub fn new(tun: Arc<TunQueue>, sock: Arc<UdpSock>, shared: Arc<Shared>) -> Self {
        Receiver { tun, sock, shared }
    }

    pub fn run(self) {
        let mut batch = RecvBatch::new(BATCH, 65_535);
        let mut gro = Gro::new(GRO_PACKETS, VNET_HDR_LEN + 65_535);
        let mut tally = Tally::default();
        let mut reported = false;
        while !self.shared.stop.load(Ordering::Relaxed) {
            let n = match self.sock.recv_batch(&mut batch) {
                Ok(n) => n,
                Err(e) if is_timeout(&e) => {
                    tally.flush_rx(&self.shared.stats);
                    continue;
                }
                Err(e) => {
                    if !reported {
                        tracing::error!("receiving from the UDP socket failed: {e}");
                        reported = true;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            };
            tally.syscalls += 1;
            let table = self.shared.peers.load();
            let own = self.shared.own_subnet();
            for i in 0..n {
                let Some(msg) = batch.msg(i) else { continue };
                let sender = match msg.source().ip() {
                    IpAddr::V4(ip) => ip,
                    IpAddr::V6(ip) => match ip.to_ipv4_mapped() {
                        Some(ip) => ip,
                        None => {
                            tally.count_drop(DropReason::UnknownSender);
                            continue;
                        }
                    },
                };
                for d in msg.datagrams() {
                    if let Err(why) = admit(d, sender, own, &table) {
                        tally.count_drop(why);
                        continue;
                    }
                    if gro.is_full() {
                        self.flush(&mut gro, &mut tally);
                    }
                    match gro.push(d) {
                        Ok(()) => {
                            tally.packets += 1;
                            tally.bytes += d.len() as u64;
                        }
                        Err(_) => tally.count_drop(DropReason::Malformed),
                    }
                }
            }
            self.flush(&mut gro, &mut tally);
            if tally.packets >= 1024 {
                tally.flush_rx(&self.shared.stats);
            }
        }
    }

    fn flush(&self, gro: &mut Gro, tally: &mut Tally) {
        for p in gro.packets() {
            tally.syscalls += 1;
            if self.tun.write(p).is_err() {
                tally.count_drop(DropReason::IoError);
            }
        }
        gro.clear();
    }
}

/// The anti-spoofing rules: the sender is a peer, the inner source is in its subnet, the
/// inner destination in ours.
fn admit(
    pkt: &[u8],
    sender: Ipv4Addr,
    own: Option<Ipv4Net>,
    table: &PeerTable,
) -> Result<(), DropReason> {
    if !table.knows(sender) {
        return Err(DropReason::UnknownSender);
    }
    let (src, dst) = match ip::addrs(pkt) {
        Ok((IpAddr::V4(s), IpAddr::V4(d))) => (s, d),
        Ok(_) => return Err(DropReason::NotForUs),
        Err(_) => return Err(DropReason::Malformed),
    };
    if !table.may_send_from(sender, src) {
        return Err(DropReason::SpoofedSource);
    }
    if !own.is_some_and(|o| o.contains(&dst)) {
        return Err(DropReason::NotForUs);
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
        let own = Some("10.244.1.0/24".parse().expect("net"));
        let ok = v4_packet([10, 244, 2, 5], [10, 244, 1, 7]);
        assert_eq!(admit(&ok, sender, own, &table), Ok(()));
        assert_eq!(
            admit(&ok, "172.30.0.99".parse().expect("ip"), own, &table),
            Err(DropReason::UnknownSender)
        );
        let spoofed = v4_packet([10, 244, 3, 5], [10, 244, 1, 7]);
        assert_eq!(
            admit(&spoofed, sender, own, &table),
            Err(DropReason::SpoofedSource)
        );
        let elsewhere = v4_packet([10, 244, 2, 5], [10, 244, 9, 7]);
        assert_eq!(
            admit(&elsewhere, sender, own, &table),
            Err(DropReason::NotForUs)
        );
        assert_eq!(
            admit(&[0x45, 0, 1], sender, own, &table),
            Err(DropReason::Malformed)
        );
        assert_eq!(admit(&ok, sender, None, &table), Err(DropReason::NotForUs));
    }
}
