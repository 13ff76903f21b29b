//! The flanneld-rs datapath: one module per backend behind one `Backend` trait, chosen by the
//! `Backend.Type` string of the network config, and the netlink plumbing they share.

pub mod backend;
pub mod io;
pub mod netlink;
pub mod peers;
pub mod stats;
pub mod wire;

pub use backend::{lease_claims, new_backend, Backend, BackendError, Datapath, NodeInfo, Repaired};
