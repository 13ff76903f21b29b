//! Test-only packet builders and a straightforward reference checksum, independent of the
//! optimized code in `checksum`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::vnet::{VnetHdr, FLAG_NEEDS_CSUM, GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4};

pub const V4_A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
pub const V4_B: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 3);
pub const V6_A: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 1, 0, 0, 0, 2);
pub const V6_B: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 2, 0, 0, 0, 3);

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;
pub const URG: u8 = 0x20;
pub const CWR: u8 = 0x80;

/// RFC 1071 the slow way: concatenate, add 16-bit words one at a time, fold every time.
pub fn naive_csum(parts: &[&[u8]]) -> u16 {
    let bytes = parts.concat();
    let mut s: u32 = 0;
    for pair in bytes.chunks(2) {
        let w = (u32::from(pair[0]) << 8) | u32::from(*pair.get(1).unwrap_or(&0));
        s += w;
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
    }
    !(s as u16)
}

/// Pseudo-header bytes for a packet's transport checksum.
pub fn pseudo_bytes(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> Vec<u8> {
    let mut p = Vec::new();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            p.extend_from_slice(&[0, proto]);
            p.extend_from_slice(&(len as u16).to_be_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            p.extend_from_slice(&(len as u32).to_be_bytes());
            p.extend_from_slice(&[0, 0, 0, proto]);
        }
        _ => panic!("mixed families"),
    }
    p
}

/// Test packet description: TCP (or UDP with `udp()`), IPv4 or IPv6.
#[derive(Clone, Debug)]
pub struct TcpSpec {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub window: u16,
    pub options: Vec<u8>,
    pub payload: Vec<u8>,
    pub id: u16,
    pub df: bool,
    pub ttl: u8,
    pub udp: bool,
}

impl TcpSpec {
    pub fn v4() -> Self {
        TcpSpec {
            src: V4_A.into(),
            dst: V4_B.into(),
            sport: 40000,
            dport: 5201,
            seq: 0xfffff000, // wraps within a 64 KiB super-packet
            ack: 5000,
            flags: ACK,
            window: 512,
            options: Vec::new(),
            payload: Vec::new(),
            id: 0xfff0,
            df: true,
            ttl: 64,
            udp: false,
        }
    }
    pub fn v6() -> Self {
        TcpSpec {
            src: V6_A.into(),
            dst: V6_B.into(),
            ..Self::v4()
        }
    }
    pub fn payload(mut self, p: &[u8]) -> Self {
        self.payload = p.to_vec();
        self
    }
    pub fn seq(mut self, s: u32) -> Self {
        self.seq = s;
        self
    }
    pub fn flags(mut self, f: u8) -> Self {
        self.flags = f;
        self
    }
    pub fn ttl(mut self, t: u8) -> Self {
        self.ttl = t;
        self
    }
    pub fn id(mut self, i: u16) -> Self {
        self.id = i;
        self
    }
    pub fn df(mut self, d: bool) -> Self {
        self.df = d;
        self
    }
    pub fn options(mut self, o: &[u8]) -> Self {
        assert_eq!(o.len() % 4, 0);
        self.options = o.to_vec();
        self
    }
    pub fn ports(mut self, s: u16, d: u16) -> Self {
        self.sport = s;
        self.dport = d;
        self
    }
    pub fn udp(mut self) -> Self {
        self.udp = true;
        self
    }
    pub fn proto(&self) -> u8 {
        if self.udp {
            17
        } else {
            6
        }
    }
    pub fn ip_hdr_len(&self) -> usize {
        if self.src.is_ipv4() {
            20
        } else {
            40
        }
    }
    pub fn l4_hdr_len(&self) -> usize {
        if self.udp {
            8
        } else {
            20 + self.options.len()
        }
    }

    /// The packet with correct IP and transport checksums.
    pub fn build(&self) -> Vec<u8> {
        let mut l4 = Vec::new();
        l4.extend_from_slice(&self.sport.to_be_bytes());
        l4.extend_from_slice(&self.dport.to_be_bytes());
        if self.udp {
            let len = 8 + self.payload.len();
            l4.extend_from_slice(&(len as u16).to_be_bytes());
            l4.extend_from_slice(&[0, 0]);
        } else {
            l4.extend_from_slice(&self.seq.to_be_bytes());
            l4.extend_from_slice(&self.ack.to_be_bytes());
            l4.push((((20 + self.options.len()) / 4) as u8) << 4);
            l4.push(self.flags);
            l4.extend_from_slice(&self.window.to_be_bytes());
            l4.extend_from_slice(&[0, 0, 0, 0]);
            l4.extend_from_slice(&self.options);
        }
        l4.extend_from_slice(&self.payload);
        let ps = pseudo_bytes(self.src, self.dst, self.proto(), l4.len());
        let mut c = naive_csum(&[&ps, &l4]);
        if self.udp && c == 0 {
            c = 0xffff;
        }
        let at = if self.udp { 6 } else { 16 };
        l4[at..at + 2].copy_from_slice(&c.to_be_bytes());

        let mut p = Vec::new();
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let total = (20 + l4.len()) as u16;
                p.extend_from_slice(&[0x45, 0]);
                p.extend_from_slice(&total.to_be_bytes());
                p.extend_from_slice(&self.id.to_be_bytes());
                p.extend_from_slice(&[if self.df { 0x40 } else { 0 }, 0, self.ttl, self.proto()]);
                p.extend_from_slice(&[0, 0]);
                p.extend_from_slice(&s.octets());
                p.extend_from_slice(&d.octets());
                let c = naive_csum(&[&p]);
                p[10..12].copy_from_slice(&c.to_be_bytes());
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                p.extend_from_slice(&[0x60, 0, 0, 0]);
                p.extend_from_slice(&(l4.len() as u16).to_be_bytes());
                p.extend_from_slice(&[self.proto(), self.ttl]);
                p.extend_from_slice(&s.octets());
                p.extend_from_slice(&d.octets());
            }
            _ => panic!("mixed families"),
        }
        p.extend_from_slice(&l4);
        p
    }

    /// What TUN hands over for this packet as a super-packet: the transport checksum field
    /// holds only the pseudo-header sum (folded, not complemented), `NEEDS_CSUM` says where.
    pub fn build_gso(&self, gso_size: u16) -> (VnetHdr, Vec<u8>) {
        let mut p = self.build();
        let ihl = self.ip_hdr_len();
        let l4_len = p.len() - ihl;
        let ps = pseudo_bytes(self.src, self.dst, self.proto(), l4_len);
        let at = ihl + if self.udp { 6 } else { 16 };
        p[at..at + 2].copy_from_slice(&(!naive_csum(&[&ps])).to_be_bytes());
        let gso_type = match (self.udp, self.src.is_ipv4()) {
            (true, _) => GSO_UDP_L4,
            (false, true) => GSO_TCPV4,
            (false, false) => GSO_TCPV6,
        };
        let h = VnetHdr {
            flags: FLAG_NEEDS_CSUM,
            gso_type,
            hdr_len: (ihl + self.l4_hdr_len()) as u16,
            gso_size,
            csum_start: ihl as u16,
            csum_offset: if self.udp { 6 } else { 16 },
        };
        (h, p)
    }
}

/// IP addresses of a packet (test helper, panics on garbage).
pub fn ip_addrs(pkt: &[u8]) -> (IpAddr, IpAddr) {
    if pkt[0] >> 4 == 4 {
        let s: [u8; 4] = pkt[12..16].try_into().unwrap();
        let d: [u8; 4] = pkt[16..20].try_into().unwrap();
        (s.into(), d.into())
    } else {
        let s: [u8; 16] = pkt[8..24].try_into().unwrap();
        let d: [u8; 16] = pkt[24..40].try_into().unwrap();
        (s.into(), d.into())
    }
}

pub fn ip_hdr_len(pkt: &[u8]) -> usize {
    if pkt[0] >> 4 == 4 {
        usize::from(pkt[0] & 0xf) * 4
    } else {
        40
    }
}

/// The IP header is consistent with the packet length (and its IPv4 checksum verifies).
pub fn assert_ip_valid(pkt: &[u8]) {
    if pkt[0] >> 4 == 4 {
        let ihl = ip_hdr_len(pkt);
        assert_eq!(naive_csum(&[&pkt[..ihl]]), 0, "IPv4 header checksum");
        assert_eq!(usize::from(u16::from_be_bytes([pkt[2], pkt[3]])), pkt.len());
    } else {
        assert_eq!(pkt[0] >> 4, 6);
        assert_eq!(
            usize::from(u16::from_be_bytes([pkt[4], pkt[5]])),
            pkt.len() - 40
        );
    }
}

/// The transport checksum of the whole packet verifies.
pub fn assert_l4_valid(pkt: &[u8], proto: u8) {
    let ihl = ip_hdr_len(pkt);
    let (s, d) = ip_addrs(pkt);
    let ps = pseudo_bytes(s, d, proto, pkt.len() - ihl);
    assert_eq!(naive_csum(&[&ps, &pkt[ihl..]]), 0, "transport checksum");
}

/// Tiny deterministic PRNG (xorshift64).
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> Self {
        XorShift(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
    pub fn fill(&mut self, b: &mut [u8]) {
        for x in b {
            *x = self.next_u64() as u8;
        }
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0; n];
        self.fill(&mut v);
        v
    }
}
