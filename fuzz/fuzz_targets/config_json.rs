//! The operator's network config.
#![no_main]
use libfuzzer_sys::fuzz_target;
use subnet_manager::config::NetworkConfig;

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = NetworkConfig::parse(data) {
        let _ = c.subnet_count();
        let _ = c.ipv4_subnets().take(3).count();
        let _ = c.ipv6_subnets().take(3).count();
    }
});
