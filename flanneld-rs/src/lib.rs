//! flanneld-rs: the daemon's wiring (the CNI plugin is the `flannel-cni` crate in `cni/`).

pub mod daemon;
pub mod flags;
pub mod health;
mod iface;
pub mod policy;
pub mod policy_cli;
pub mod single;
pub mod status;
mod tool;
pub mod traffic;
