//! Integration tests against real etcd, real namespaces and Debian's CNI plugins.
//! One test binary (link once); tests needing root say so and skip without it.

mod defences;
mod deploy;
mod dual_stack;
mod etcd_tls;
mod faults;
mod flannel_v028;
mod health;
mod host_gw;
mod ipmasq;
mod mixed;
mod netpol;
mod registry;
mod scale;
mod services;
mod single;
mod soak;
mod status;
mod udp;
mod vxlan;
mod wireguard;

/// Skips a root-only test with a message; under `CI=true` not running as root is an error.
#[macro_export]
macro_rules! require_root {
    () => {
        if netns_tests::must_skip(netns_tests::root_missing())? {
            return Ok(());
        }
    };
}
