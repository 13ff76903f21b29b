//! WireGuard's handshake, Noise IKpsk2 (whitepaper §5.4.2-5.4.4), as pure functions: each
//! builds or opens one message in the caller's buffer and returns the state to keep. The
//! transport keys it derives are ours, so that sessions seal and open on every core at once
//! (boringtun keeps them inside its `Tunn`, behind `&mut self`).
//!
//! mac1 of arriving messages (and mac2 under load) is checked before anything here runs, by
//! the cookie gate (`cookie`) in the codec; here we write mac1/mac2 and open cookie replies.

use std::time::{SystemTime, UNIX_EPOCH};

use boringtun::x25519::{PublicKey, StaticSecret};
use zeroize::{Zeroize, Zeroizing};

use super::crypto::{
    self, hash, kdf, mac, NotAuthentic, SealFailed, CONSTRUCTION, IDENTIFIER, LABEL_COOKIE,
    LABEL_MAC1,
};

pub(super) const INIT: u8 = 1;
pub(super) const RESPONSE: u8 = 2;
pub(super) const COOKIE_REPLY: u8 = 3;
pub(super) const INIT_LEN: usize = 148;
pub(super) const RESPONSE_LEN: usize = 92;
pub(super) const COOKIE_REPLY_LEN: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(super) enum HandshakeError {
    #[error("a field did not authenticate")]
    NotAuthentic,
    #[error("a public key gives an all-zero Diffie-Hellman result (low order point)")]
    WeakKey,
    #[error("sealing a field failed")]
    Seal,
}

impl From<SealFailed> for HandshakeError {
    fn from(_: SealFailed) -> Self {
        HandshakeError::Seal
    }
}

impl From<NotAuthentic> for HandshakeError {
    fn from(_: NotAuthentic) -> Self {
        HandshakeError::NotAuthentic
    }
}

/// Our static key and what every handshake with us starts from.
pub(super) struct Local {
    secret: StaticSecret,
    public: PublicKey,
    /// HASH(CONSTRUCTION): the first chaining key of every handshake.
    chain0: [u8; 32],
    /// HASH(HASH(chain0 || IDENTIFIER) || our public key): the first hash where we respond.
    hash_as_responder: [u8; 32],
    /// HASH(chain0 || IDENTIFIER), to be mixed with a responder's public key.
    hash0: [u8; 32],
}

impl Local {
    pub fn new(secret: StaticSecret) -> Self {
        let public = PublicKey::from(&secret);
        let chain0 = hash(&[CONSTRUCTION]);
        let hash0 = hash(&[&chain0, IDENTIFIER]);
        Local {
            hash_as_responder: hash(&[&hash0, public.as_bytes()]),
            secret,
            public,
            chain0,
            hash0,
        }
    }

    #[cfg(test)]
    pub fn public(&self) -> &[u8; 32] {
        self.public.as_bytes()
    }
}

/// A peer, as far as handshakes with it go. The precomputed secrets are zeroed on drop.
pub(super) struct Remote {
    public: PublicKey,
    psk: [u8; 32],
    /// DH(our static, its static): the same for every handshake with it.
    static_static: Option<[u8; 32]>,
    /// HASH(LABEL_MAC1 || its public key): the mac1 key of what we send it.
    mac1_key: [u8; 32],
    /// HASH(LABEL_COOKIE || its public key): opens the cookies it sends us.
    cookie_key: [u8; 32],
    /// The first hash where we initiate to it.
    hash_as_initiator: [u8; 32],
}

impl Remote {
    pub fn new(local: &Local, public: [u8; 32], psk: Option<[u8; 32]>) -> Self {
        let public = PublicKey::from(public);
        Remote {
            static_static: dh(&local.secret, &public).ok().map(|ss| *ss),
            psk: psk.unwrap_or([0; 32]),
            mac1_key: hash(&[LABEL_MAC1, public.as_bytes()]),
            cookie_key: hash(&[LABEL_COOKIE, public.as_bytes()]),
            hash_as_initiator: hash(&[&local.hash0, public.as_bytes()]),
            public,
        }
    }
}

impl Drop for Remote {
    fn drop(&mut self) {
        self.psk.zeroize();
        if let Some(ss) = self.static_static.as_mut() {
            ss.zeroize();
        }
    }
}

/// The transport keys one handshake made, with the indexes that name its session.
pub(super) struct Keys {
    pub send: [u8; 32],
    pub recv: [u8; 32],
    pub local_index: u32,
    pub remote_index: u32,
    /// Whether we initiated: only the initiator rekeys on age, and the responder may not send
    /// until the initiator's first data message confirms the keys.
    pub initiator: bool,
}

impl Drop for Keys {
    fn drop(&mut self) {
        self.send.zeroize();
        self.recv.zeroize();
    }
}

/// An initiation we sent and wait to hear back on.
pub(super) struct InitSent {
    pub local_index: u32,
    chain: [u8; 32],
    hash: [u8; 32],
    ephemeral: StaticSecret,
    /// The mac1 it carried: a cookie reply to it is sealed with it as associated data.
    pub mac1: [u8; 16],
}

impl Drop for InitSent {
    fn drop(&mut self) {
        self.chain.zeroize();
        self.hash.zeroize();
    }
}

/// An initiation whose sender we learnt (its static key), before we know it is a peer.
pub(super) struct InitOpened {
    pub remote_index: u32,
    pub peer_static: [u8; 32],
    chain: [u8; 32],
    hash: [u8; 32],
    ephemeral: [u8; 32],
    timestamp_sealed: [u8; 28],
}

impl Drop for InitOpened {
    fn drop(&mut self) {
        self.chain.zeroize();
        self.hash.zeroize();
    }
}

/// An initiation from a known peer that authenticated completely.
pub(super) struct InitReceived {
    opened: InitOpened,
    /// TAI64N: greater than the last one from this peer, or it is a replay.
    pub timestamp: [u8; 12],
}

fn dh(secret: &StaticSecret, public: &PublicKey) -> Result<Zeroizing<[u8; 32]>, HandshakeError> {
    let shared = Zeroizing::new(secret.diffie_hellman(public).to_bytes());
    // WireGuard refuses all-zero results (a low-order public key); not secret-dependent timing
    // that matters: the result is thrown away when zero.
    if shared.iter().fold(0u8, |a, b| a | b) == 0 {
        return Err(HandshakeError::WeakKey);
    }
    Ok(shared)
}

fn put_u32(buf: &mut [u8], at: usize, v: u32) {
    buf[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

pub(super) fn get_u32(buf: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&buf[at..at + 4]);
    u32::from_le_bytes(b)
}

/// Now as TAI64N (big-endian seconds since 1970 + 2^62 + 10, then nanoseconds), the
/// nanoseconds cut to steps of 2^24 (16.8 ms) as wireguard-go does: the responder needs only
/// an increasing stamp (initiations go at least a second apart), not our precise clock.
pub(super) fn tai64n(now: SystemTime) -> [u8; 12] {
    let d = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let mut t = [0u8; 12];
    t[..8].copy_from_slice(&(0x4000_0000_0000_000a_u64 + d.as_secs()).to_be_bytes());
    t[8..].copy_from_slice(&(d.subsec_nanos() & !0x00ff_ffff).to_be_bytes());
    t
}

/// mac1 (and mac2 with a cookie) over what precedes them in `msg`.
fn put_macs(msg: &mut [u8], mac1_key: &[u8; 32], cookie: Option<&[u8; 16]>) -> [u8; 16] {
    let n = msg.len();
    let mac1 = mac(mac1_key, &[&msg[..n - 32]]);
    msg[n - 32..n - 16].copy_from_slice(&mac1);
    let mac2 = cookie.map_or([0; 16], |c| mac(c, &[&msg[..n - 16]]));
    msg[n - 16..].copy_from_slice(&mac2);
    mac1
}

/// Builds a handshake initiation to `remote` into `msg`.
pub(super) fn initiate(
    local: &Local,
    remote: &Remote,
    local_index: u32,
    ephemeral: StaticSecret,
    timestamp: [u8; 12],
    cookie: Option<&[u8; 16]>,
    msg: &mut [u8; INIT_LEN],
) -> Result<InitSent, HandshakeError> {
    let ss = remote
        .static_static
        .as_ref()
        .ok_or(HandshakeError::WeakKey)?;
    let e_pub = PublicKey::from(&ephemeral);
    msg.fill(0);
    msg[0] = INIT;
    put_u32(msg, 4, local_index);
    msg[8..40].copy_from_slice(e_pub.as_bytes());
    let [mut chain] = kdf::<1>(&local.chain0, e_pub.as_bytes());
    let mut h = hash(&[&remote.hash_as_initiator, e_pub.as_bytes()]);
    let [c, mut k] = kdf::<2>(&chain, &*dh(&ephemeral, &remote.public)?);
    chain = c;
    msg[40..72].copy_from_slice(local.public.as_bytes());
    let sealed = crypto::seal(&k, 0, &h, &mut msg[40..88]);
    k.zeroize();
    sealed?;
    h = hash(&[&h, &msg[40..88]]);
    let [c, mut k2] = kdf::<2>(&chain, ss);
    chain = c;
    msg[88..100].copy_from_slice(&timestamp);
    let sealed = crypto::seal(&k2, 0, &h, &mut msg[88..116]);
    k2.zeroize();
    sealed?;
    h = hash(&[&h, &msg[88..116]]);
    let mac1 = put_macs(msg, &remote.mac1_key, cookie);
    Ok(InitSent {
        local_index,
        chain,
        hash: h,
        ephemeral,
        mac1,
    })
}

/// Opens an initiation's sender field: who claims to send it. The rest needs that peer's
/// precomputed state ([`InitOpened::finish`]).
pub(super) fn open_init(local: &Local, msg: &[u8; INIT_LEN]) -> Result<InitOpened, HandshakeError> {
    let mut ephemeral = [0u8; 32];
    ephemeral.copy_from_slice(&msg[8..40]);
    let [chain] = kdf::<1>(&local.chain0, &ephemeral);
    let h = hash(&[&local.hash_as_responder, &ephemeral]);
    let [chain, mut k] = kdf::<2>(&chain, &*dh(&local.secret, &PublicKey::from(ephemeral))?);
    let mut field = [0u8; 48];
    field.copy_from_slice(&msg[40..88]);
    let opened = crypto::open(&k, 0, &h, &mut field);
    k.zeroize();
    opened?;
    let mut peer_static = [0u8; 32];
    peer_static.copy_from_slice(&field[..32]);
    let mut timestamp_sealed = [0u8; 28];
    timestamp_sealed.copy_from_slice(&msg[88..116]);
    Ok(InitOpened {
        remote_index: get_u32(msg, 4),
        peer_static,
        chain,
        hash: hash(&[&h, &msg[40..88]]),
        ephemeral,
        timestamp_sealed,
    })
}

impl InitOpened {
    /// Opens the timestamp with the static-static secret of the peer the sender claimed to be.
    pub fn finish(mut self, remote: &Remote) -> Result<InitReceived, HandshakeError> {
        let ss = remote
            .static_static
            .as_ref()
            .ok_or(HandshakeError::WeakKey)?;
        let [chain, mut k] = kdf::<2>(&self.chain, ss);
        let mut field = self.timestamp_sealed;
        let opened = crypto::open(&k, 0, &self.hash, &mut field);
        k.zeroize();
        opened?;
        self.hash = hash(&[&self.hash, &self.timestamp_sealed]);
        self.chain = chain;
        let mut timestamp = [0u8; 12];
        timestamp.copy_from_slice(&field[..12]);
        Ok(InitReceived {
            opened: self,
            timestamp,
        })
    }
}

/// Answers an initiation from `remote` with a response in `msg`; the keys are ours to use once
/// the initiator's first data message confirms them. Also returns the response's mac1 (a
/// cookie reply to it is sealed with it).
pub(super) fn respond(
    remote: &Remote,
    init: &InitReceived,
    local_index: u32,
    ephemeral: StaticSecret,
    cookie: Option<&[u8; 16]>,
    msg: &mut [u8; RESPONSE_LEN],
) -> Result<(Keys, [u8; 16]), HandshakeError> {
    let o = &init.opened;
    let e_pub = PublicKey::from(&ephemeral);
    msg.fill(0);
    msg[0] = RESPONSE;
    put_u32(msg, 4, local_index);
    put_u32(msg, 8, o.remote_index);
    msg[12..44].copy_from_slice(e_pub.as_bytes());
    let [chain] = kdf::<1>(&o.chain, e_pub.as_bytes());
    let h = hash(&[&o.hash, e_pub.as_bytes()]);
    let [chain] = kdf::<1>(&chain, &*dh(&ephemeral, &PublicKey::from(o.ephemeral))?);
    let [chain] = kdf::<1>(&chain, &*dh(&ephemeral, &remote.public)?);
    let [mut chain, mut tau, mut k] = kdf::<3>(&chain, &remote.psk);
    let h = hash(&[&h, &tau]);
    let sealed = crypto::seal(&k, 0, &h, &mut msg[44..60]);
    tau.zeroize();
    k.zeroize();
    if let Err(e) = sealed {
        chain.zeroize();
        return Err(e.into());
    }
    let mac1 = put_macs(msg, &remote.mac1_key, cookie);
    let [recv, send] = kdf::<2>(&chain, &[]);
    chain.zeroize();
    let keys = Keys {
        send,
        recv,
        local_index,
        remote_index: o.remote_index,
        initiator: false,
    };
    Ok((keys, mac1))
}

/// Completes the handshake we started with `sent` from the responder's answer.
pub(super) fn consume_response(
    local: &Local,
    remote: &Remote,
    sent: &InitSent,
    msg: &[u8; RESPONSE_LEN],
) -> Result<Keys, HandshakeError> {
    let mut e_r = [0u8; 32];
    e_r.copy_from_slice(&msg[12..44]);
    let e_r_pub = PublicKey::from(e_r);
    let [chain] = kdf::<1>(&sent.chain, &e_r);
    let h = hash(&[&sent.hash, &e_r]);
    let [chain] = kdf::<1>(&chain, &*dh(&sent.ephemeral, &e_r_pub)?);
    let [chain] = kdf::<1>(&chain, &*dh(&local.secret, &e_r_pub)?);
    let [mut chain, mut tau, mut k] = kdf::<3>(&chain, &remote.psk);
    let h = hash(&[&h, &tau]);
    let mut empty = [0u8; 16];
    empty.copy_from_slice(&msg[44..60]);
    let opened = crypto::open(&k, 0, &h, &mut empty);
    let [send, recv] = kdf::<2>(&chain, &[]);
    for secret in [&mut chain, &mut tau, &mut k] {
        secret.zeroize();
    }
    opened?;
    Ok(Keys {
        send,
        recv,
        local_index: sent.local_index,
        remote_index: get_u32(msg, 4),
        initiator: true,
    })
}

/// The cookie in a reply `remote` sent to our message that carried `mac1`.
pub(super) fn open_cookie(
    remote: &Remote,
    mac1: &[u8; 16],
    msg: &[u8; COOKIE_REPLY_LEN],
) -> Result<[u8; 16], HandshakeError> {
    let mut nonce = [0u8; 24];
    nonce.copy_from_slice(&msg[8..32]);
    let mut sealed = [0u8; 32];
    sealed.copy_from_slice(&msg[32..64]);
    Ok(crypto::xopen(&remote.cookie_key, &nonce, mac1, &sealed)?)
}
