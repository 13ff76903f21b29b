//! Our handshake and sessions against a third-party WireGuard: boringtun's `Tunn`, in memory.
//! Each side initiates, with and without a preshared key, data flows both ways, a responder
//! under load sends a cookie that our retry carries, and tampered messages fail.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};

use super::handshake::{
    consume_response, initiate, open_cookie, open_init, respond, tai64n, HandshakeError, Local,
    Remote, COOKIE_REPLY_LEN, INIT_LEN, RESPONSE_LEN,
};
use super::keys::random_key;
use super::session::{Session, DATA_HEADER, TAG_LEN};

fn secret() -> StaticSecret {
    StaticSecret::from(random_key().expect("random"))
}

/// An IPv4 packet from 10.244.1.2 carrying `fill` bytes.
fn ip_packet(fill: usize) -> Vec<u8> {
    let mut p = vec![0u8; 20 + fill];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&((20 + fill) as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&[10, 244, 1, 2]);
    p[16..20].copy_from_slice(&[10, 244, 2, 3]);
    for (i, b) in p[20..].iter_mut().enumerate() {
        *b = i as u8;
    }
    p
}

/// Our static key, the peer's, our side of handshakes and the peer as we know it.
fn sides(psk: Option<[u8; 32]>) -> (StaticSecret, StaticSecret, Local, Remote) {
    let (ours, theirs) = (secret(), secret());
    let local = Local::new(ours.clone());
    let remote = Remote::new(&local, *PublicKey::from(&theirs).as_bytes(), psk);
    (ours, theirs, local, remote)
}

/// An initiation from boringtun's side.
fn initiation_of(tunn: &mut Tunn, buf: &mut [u8]) -> [u8; INIT_LEN] {
    match tunn.format_handshake_initiation(buf, false) {
        TunnResult::WriteToNetwork(m) => m.try_into().expect("an initiation"),
        _ => panic!("no initiation"),
    }
}

fn seal(s: &Session, pkt: &[u8]) -> Vec<u8> {
    let mut msg = vec![0u8; DATA_HEADER + pkt.len() + TAG_LEN];
    msg[DATA_HEADER..DATA_HEADER + pkt.len()].copy_from_slice(pkt);
    assert!(s.seal(s.reserve(1).expect("counter"), &mut msg));
    msg
}

fn open(s: &Session, msg: &[u8]) -> Vec<u8> {
    let mut buf = msg.to_vec();
    let len = s.open(&mut buf).expect("opens");
    buf[DATA_HEADER..DATA_HEADER + len].to_vec()
}

/// Data both ways between our session and the `Tunn`.
fn data_flows(ours: &Session, tunn: &mut Tunn) {
    let mut buf = vec![0u8; 2048];
    for size in [0, 1, 100, 1400] {
        let pkt = ip_packet(size);
        let msg = seal(ours, &pkt);
        match tunn.decapsulate(None, &msg, &mut buf) {
            TunnResult::WriteToTunnelV4(p, src) => {
                assert_eq!(p, &pkt[..]);
                assert_eq!(IpAddr::from(src), IpAddr::from([10, 244, 1, 2]));
            }
            _ => panic!("boringtun did not open our {size}-byte packet"),
        }
        let sealed = match tunn.encapsulate(&pkt, &mut buf) {
            TunnResult::WriteToNetwork(m) => m.to_vec(),
            _ => panic!("boringtun did not seal"),
        };
        assert_eq!(
            open(ours, &sealed),
            pkt,
            "we open boringtun's {size}-byte packet"
        );
    }
}

fn we_initiate(psk: Option<[u8; 32]>) {
    let (ours, theirs, local, remote) = sides(psk);
    let mut tunn = Tunn::new(theirs, PublicKey::from(&ours), psk, None, 7 << 8, None);
    let mut init = [0u8; INIT_LEN];
    let sent = initiate(
        &local,
        &remote,
        0x0102_0304,
        secret(),
        tai64n(SystemTime::now()),
        None,
        &mut init,
    )
    .expect("initiation");
    let mut buf = vec![0u8; 2048];
    let resp: [u8; RESPONSE_LEN] = match tunn.decapsulate(None, &init, &mut buf) {
        TunnResult::WriteToNetwork(r) => r.try_into().expect("a response"),
        _ => panic!("boringtun refused our initiation"),
    };
    let keys = consume_response(&local, &remote, &sent, &resp).expect("response");
    assert_eq!(keys.local_index, 0x0102_0304);
    assert!(keys.initiator);
    let s = Session::new(&keys, Instant::now()).expect("session");
    // The responder's first word must come from us (key confirmation).
    data_flows(&s, &mut tunn);

    let mut bad = resp;
    bad[50] ^= 1;
    assert_eq!(
        consume_response(&local, &remote, &sent, &bad).err(),
        Some(HandshakeError::NotAuthentic)
    );
}

fn they_initiate(psk: Option<[u8; 32]>) {
    let (ours, theirs, local, remote) = sides(psk);
    let mut tunn = Tunn::new(
        theirs.clone(),
        PublicKey::from(&ours),
        psk,
        None,
        7 << 8,
        None,
    );
    let mut buf = vec![0u8; 2048];
    let init = initiation_of(&mut tunn, &mut buf);
    let opened = open_init(&local, &init).expect("opens");
    assert_eq!(&opened.peer_static, PublicKey::from(&theirs).as_bytes());
    let received = opened.finish(&remote).expect("timestamp");
    let mut resp = [0u8; RESPONSE_LEN];
    let (keys, _) =
        respond(&remote, &received, 0x0a0b_0c0d, secret(), None, &mut resp).expect("respond");
    assert!(!keys.initiator);
    let s = Session::new(&keys, Instant::now()).expect("session");
    // boringtun confirms the keys with a keepalive: an empty data message we open.
    match tunn.decapsulate(None, &resp, &mut buf) {
        TunnResult::WriteToNetwork(k) => assert_eq!(open(&s, k), Vec::<u8>::new()),
        _ => panic!("boringtun refused our response"),
    }
    data_flows(&s, &mut tunn);
}

#[test]
fn we_initiate_to_boringtun() {
    we_initiate(None);
}

#[test]
fn boringtun_initiates_to_us() {
    they_initiate(None);
}

#[test]
fn preshared_keys_both_ways() {
    let psk = random_key().expect("random");
    we_initiate(Some(psk));
    they_initiate(Some(psk));
}

#[test]
fn a_wrong_preshared_key_fails() {
    let (ours, theirs) = (secret(), secret());
    let local = Local::new(ours.clone());
    let remote = Remote::new(&local, *PublicKey::from(&theirs).as_bytes(), Some([1; 32]));
    let mut tunn = Tunn::new(
        theirs,
        PublicKey::from(&ours),
        Some([2; 32]),
        None,
        7 << 8,
        None,
    );
    let mut init = [0u8; INIT_LEN];
    let sent = initiate(
        &local,
        &remote,
        1,
        secret(),
        tai64n(SystemTime::now()),
        None,
        &mut init,
    )
    .expect("initiation");
    let mut buf = vec![0u8; 2048];
    let resp: [u8; RESPONSE_LEN] = match tunn.decapsulate(None, &init, &mut buf) {
        TunnResult::WriteToNetwork(r) => r.try_into().expect("a response"),
        _ => panic!("the psk only shows in the response"),
    };
    assert!(consume_response(&local, &remote, &sent, &resp).is_err());
}

#[test]
fn tampered_or_foreign_initiations_fail() {
    let (ours, theirs, local, remote) = sides(None);
    let stranger = secret();
    let mut tunn = Tunn::new(theirs, PublicKey::from(&ours), None, None, 7 << 8, None);
    let mut buf = vec![0u8; 2048];
    let init = initiation_of(&mut tunn, &mut buf);
    for at in [8, 40, 87, 88, 115] {
        let mut bad = init;
        bad[at] ^= 0x80;
        let r = open_init(&local, &bad).and_then(|o| o.finish(&remote).map(|_| ()));
        assert!(r.is_err(), "byte {at} flipped");
    }
    // Meant for someone else: our key does not open its static field.
    assert!(open_init(&Local::new(stranger), &init).is_err());
    // A low order ephemeral key is refused before anything is opened.
    let mut weak = init;
    weak[8..40].fill(0);
    assert_eq!(
        open_init(&local, &weak).err(),
        Some(HandshakeError::WeakKey)
    );
}

#[test]
fn a_responder_under_load_gets_our_cookie_back() {
    let (ours, theirs, local, remote) = sides(None);
    // A limit of 0: boringtun is always "under load" and wants mac2.
    let limiter = Arc::new(RateLimiter::new(&PublicKey::from(&theirs), 0));
    let mut tunn = Tunn::new(
        theirs,
        PublicKey::from(&ours),
        None,
        None,
        7 << 8,
        Some(limiter),
    );
    let from = Some(IpAddr::from([192, 0, 2, 1]));
    let mut buf = vec![0u8; 2048];
    let mut init = [0u8; INIT_LEN];
    let sent = initiate(
        &local,
        &remote,
        5,
        secret(),
        tai64n(SystemTime::now()),
        None,
        &mut init,
    )
    .expect("initiation");
    let reply: [u8; COOKIE_REPLY_LEN] = match tunn.decapsulate(from, &init, &mut buf) {
        TunnResult::WriteToNetwork(r) => r.try_into().expect("a cookie reply"),
        _ => panic!("no cookie reply"),
    };
    let cookie = open_cookie(&remote, &sent.mac1, &reply).expect("cookie");
    let mut wrong_mac1 = sent.mac1;
    wrong_mac1[0] ^= 1;
    assert!(open_cookie(&remote, &wrong_mac1, &reply).is_err());
    let sent = initiate(
        &local,
        &remote,
        6,
        secret(),
        tai64n(SystemTime::now()),
        Some(&cookie),
        &mut init,
    )
    .expect("initiation");
    let resp: [u8; RESPONSE_LEN] = match tunn.decapsulate(from, &init, &mut buf) {
        TunnResult::WriteToNetwork(r) => r.try_into().expect("a response"),
        _ => panic!("mac2 was not accepted"),
    };
    assert!(consume_response(&local, &remote, &sent, &resp).is_ok());
}

#[test]
fn a_cookie_reply_to_our_response_opens() {
    // The initiator is under load when our response arrives: its rate limiter answers with a
    // cookie sealed to the response's mac1, which `respond` returned.
    let (ours, theirs, local, remote) = sides(None);
    let mut tunn = Tunn::new(
        theirs.clone(),
        PublicKey::from(&ours),
        None,
        None,
        7 << 8,
        None,
    );
    let mut buf = vec![0u8; 2048];
    let init = initiation_of(&mut tunn, &mut buf);
    let received = open_init(&local, &init)
        .and_then(|o| o.finish(&remote))
        .expect("opens");
    let mut resp = [0u8; RESPONSE_LEN];
    let (_, mac1) = respond(&remote, &received, 3, secret(), None, &mut resp).expect("respond");
    let limiter = RateLimiter::new(&PublicKey::from(&theirs), 0);
    let reply: [u8; COOKIE_REPLY_LEN] =
        match limiter.verify_packet(Some(IpAddr::from([192, 0, 2, 1])), &resp, &mut buf) {
            Err(TunnResult::WriteToNetwork(r)) => r.try_into().expect("a cookie reply"),
            _ => panic!("no cookie reply"),
        };
    assert!(open_cookie(&remote, &mac1, &reply).is_ok());
}
