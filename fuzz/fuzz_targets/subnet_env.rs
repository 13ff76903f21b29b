//! subnet.env as the CNI plugin reads it.
#![no_main]
use libfuzzer_sys::fuzz_target;
use subnet_manager::subnet_env::SubnetEnv;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(env) = SubnetEnv::parse(&text) {
        assert_eq!(SubnetEnv::parse(&env.render()).ok(), Some(env));
    }
});
