//! A lease written by another node: key suffix and JSON value.
#![no_main]
use libfuzzer_sys::fuzz_target;
use subnet_manager::lease::{Lease, LeaseAttrs, SubnetKey};

fuzz_target!(|data: &[u8]| {
    let split = data.iter().position(|b| *b == b'\n').unwrap_or(data.len());
    let key = String::from_utf8_lossy(&data[..split]);
    let value = data.get(split + 1..).unwrap_or_default();
    let _ = SubnetKey::parse(&key);
    let _ = Lease::parse("/coreos.com/network", &format!("/coreos.com/network/subnets/{key}"), value);
    if let Ok(a) = LeaseAttrs::from_json(value) {
        // What we parse, we write back in a form we parse the same way.
        assert_eq!(LeaseAttrs::from_json(a.to_json().as_bytes()).ok(), Some(a));
    }
});
