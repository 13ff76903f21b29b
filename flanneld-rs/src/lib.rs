//! flanneld-rs: the daemon's wiring and the Flannel-compatible CNI plugin.

pub mod cni;
pub mod daemon;
pub mod flags;
mod iface;
pub mod ipmasq;
pub mod single;
pub mod status;
