//! WireGuard's primitives (whitepaper §5.4): BLAKE2s as HASH, HMAC and the keyed MAC, the HKDF
//! built on that HMAC, and ChaCha20-Poly1305 / XChaCha20-Poly1305 for handshake fields and
//! cookies. Pure functions over byte arrays; transport data uses ring in place (`session`).

use blake2::digest::consts::U16;
use blake2::digest::{Digest, KeyInit, Mac};
use blake2::{Blake2s256, Blake2sMac};
use chacha20poly1305::aead::{AeadInPlace, Nonce};
use chacha20poly1305::{ChaCha20Poly1305, XChaCha20Poly1305};
use hmac::SimpleHmac;
use zeroize::Zeroize;

pub(super) const CONSTRUCTION: &[u8] = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s";
pub(super) const IDENTIFIER: &[u8] = b"WireGuard v1 zx2c4 Jason@zx2c4.com";
pub(super) const LABEL_MAC1: &[u8] = b"mac1----";
pub(super) const LABEL_COOKIE: &[u8] = b"cookie--";
pub(super) const TAG_LEN: usize = 16;

/// A failed authentication: the tag did not match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct NotAuthentic;

/// Sealing failed (no room for the tag): nothing was made to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct SealFailed;

pub(super) fn hash(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Blake2s256::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

/// HMAC-BLAKE2s (the HMAC construction, not BLAKE2s's own keying).
fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // A key of any length is valid for HMAC: the error arm cannot happen.
    let Ok(mut m) = <SimpleHmac<Blake2s256> as KeyInit>::new_from_slice(key) else {
        return [0; 32];
    };
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

/// HKDF over HMAC-BLAKE2s: `N` (1..=3) 32-byte outputs of `key` and `input`.
pub(super) fn kdf<const N: usize>(key: &[u8; 32], input: &[u8]) -> [[u8; 32]; N] {
    let mut prk = hmac(key, &[input]);
    let mut out = [[0u8; 32]; N];
    let mut prev: Option<[u8; 32]> = None;
    for (i, o) in out.iter_mut().enumerate() {
        let n = [i as u8 + 1];
        *o = match &prev {
            None => hmac(&prk, &[&n]),
            Some(p) => hmac(&prk, &[p, &n]),
        };
        prev = Some(*o);
    }
    prk.zeroize();
    if let Some(mut p) = prev {
        p.zeroize();
    }
    out
}

/// BLAKE2s keyed with `key` (16 or 32 bytes), 16 bytes out: mac1, mac2 and the cookie.
pub(super) fn mac(key: &[u8], parts: &[&[u8]]) -> [u8; 16] {
    let Ok(mut m) = <Blake2sMac<U16> as KeyInit>::new_from_slice(key) else {
        return [0; 16];
    };
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

/// Whether `tag` is [`mac`] of `parts` under `key`, compared in constant time.
pub(super) fn mac_matches(key: &[u8], parts: &[&[u8]], tag: &[u8]) -> bool {
    let Ok(mut m) = <Blake2sMac<U16> as KeyInit>::new_from_slice(key) else {
        return false;
    };
    for p in parts {
        m.update(p);
    }
    m.verify_slice(tag).is_ok()
}

/// ChaCha20-Poly1305 with WireGuard's nonce: 32 zero bits, then the counter little-endian.
fn nonce(counter: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_le_bytes());
    n
}

/// Seals `buf[..len - 16]` in place, writing the tag into its last 16 bytes. An error (a
/// buffer without room for the tag) leaves nothing fit to send.
pub(super) fn seal(
    key: &[u8; 32],
    counter: u64,
    aad: &[u8],
    buf: &mut [u8],
) -> Result<(), SealFailed> {
    let cipher = ChaCha20Poly1305::new(key.into());
    let split = buf.len().checked_sub(TAG_LEN).ok_or(SealFailed)?;
    let (text, tag_out) = buf.split_at_mut(split);
    let n = nonce(counter);
    let tag = cipher
        .encrypt_in_place_detached(Nonce::<ChaCha20Poly1305>::from_slice(&n), aad, text)
        .map_err(|_| SealFailed)?;
    tag_out.copy_from_slice(&tag);
    Ok(())
}

/// Opens what [`seal`] made: on success `buf[..len - 16]` is the plaintext.
pub(super) fn open(
    key: &[u8; 32],
    counter: u64,
    aad: &[u8],
    buf: &mut [u8],
) -> Result<(), NotAuthentic> {
    let cipher = ChaCha20Poly1305::new(key.into());
    let split = buf.len().checked_sub(TAG_LEN).ok_or(NotAuthentic)?;
    let (text, tag) = buf.split_at_mut(split);
    let n = nonce(counter);
    cipher
        .decrypt_in_place_detached(
            Nonce::<ChaCha20Poly1305>::from_slice(&n),
            aad,
            text,
            (&*tag).into(),
        )
        .map_err(|_| NotAuthentic)
}

/// Seals a cookie for a cookie reply in place: `sealed[..16]` holds it, the tag goes into
/// `sealed[16..]` (XChaCha20-Poly1305, 24-byte nonce).
pub(super) fn xseal(
    key: &[u8; 32],
    nonce: &[u8],
    aad: &[u8],
    sealed: &mut [u8],
) -> Result<(), SealFailed> {
    if nonce.len() != 24 || sealed.len() != 32 {
        return Err(SealFailed);
    }
    let cipher = XChaCha20Poly1305::new(key.into());
    let (text, tag_out) = sealed.split_at_mut(16);
    let tag = cipher
        .encrypt_in_place_detached(Nonce::<XChaCha20Poly1305>::from_slice(nonce), aad, text)
        .map_err(|_| SealFailed)?;
    tag_out.copy_from_slice(&tag);
    Ok(())
}

/// Opens a cookie reply's cookie (XChaCha20-Poly1305, 24-byte nonce).
pub(super) fn xopen(
    key: &[u8; 32],
    nonce: &[u8; 24],
    aad: &[u8],
    sealed: &[u8; 32],
) -> Result<[u8; 16], NotAuthentic> {
    let cipher = XChaCha20Poly1305::new(key.into());
    let mut text = [0u8; 16];
    text.copy_from_slice(&sealed[..16]);
    cipher
        .decrypt_in_place_detached(
            Nonce::<XChaCha20Poly1305>::from_slice(nonce),
            aad,
            &mut text,
            sealed[16..].into(),
        )
        .map_err(|_| NotAuthentic)?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_blake2s_matches_the_hmac_construction() {
        // HMAC by hand: H((K ^ opad) || H((K ^ ipad) || m)), 64-byte blocks.
        let key = [7u8; 32];
        let mut ipad = [0x36u8; 64];
        let mut opad = [0x5cu8; 64];
        for i in 0..32 {
            ipad[i] ^= key[i];
            opad[i] ^= key[i];
        }
        let inner = hash(&[&ipad, b"abc"]);
        assert_eq!(hmac(&key, &[b"a", b"bc"]), hash(&[&opad, &inner]));
    }

    #[test]
    fn kdf_chains_its_outputs() {
        let key = [1u8; 32];
        let [a, b, c] = kdf::<3>(&key, b"in");
        let prk = hmac(&key, &[b"in"]);
        assert_eq!(a, hmac(&prk, &[&[1]]));
        assert_eq!(b, hmac(&prk, &[&a, &[2]]));
        assert_eq!(c, hmac(&prk, &[&b, &[3]]));
        assert_eq!(kdf::<1>(&key, b"in"), [a]);
    }

    #[test]
    fn seal_then_open_and_tampering_fails() {
        let key = [9u8; 32];
        let mut buf = *b"hello, world!!!!0123456789abcdef";
        seal(&key, 5, b"ad", &mut buf).expect("sealed");
        let mut copy = buf;
        assert!(open(&key, 5, b"ad", &mut copy).is_ok());
        assert_eq!(&copy[..16], b"hello, world!!!!");
        for (counter, aad) in [(6, &b"ad"[..]), (5, &b"ax"[..])] {
            let mut c = buf;
            assert_eq!(open(&key, counter, aad, &mut c), Err(NotAuthentic));
        }
        let mut short = [0u8; 15];
        assert_eq!(open(&key, 0, b"", &mut short), Err(NotAuthentic));
    }
}
