//! Datagrams arriving on the WireGuard port: message parsing, handshake and cookie handling,
//! decryption attempts, with a codec that knows one peer and holds a session with it (the
//! selector can seal the bytes with that session first, so that they pass authentication).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    encap::backend::wireguard_fuzzing::receive(data);
});
