//! WireGuard's handshake messages, data messages and replay window, each fed directly (no
//! mac1 check in the way): nothing forged may complete a handshake, open, or pass the window
//! where its model says no.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    encap::backend::wireguard_fuzzing::protocol(data);
});
