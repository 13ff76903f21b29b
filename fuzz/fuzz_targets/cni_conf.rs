//! The CNI plugin's config on stdin.
#![no_main]
use flannel_cni::conf::{parse_json, NetConf};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(json) = parse_json(data) {
        let _ = NetConf::from_json(&json);
    }
});
