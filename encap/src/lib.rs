//! The flanneld-rs datapath: one module per backend behind one `Backend` trait, chosen by the
//! `Backend.Type` string of the network config, and the netlink plumbing they share.

pub mod backend;
pub mod netlink;

pub use backend::{new_backend, Backend, BackendError, NodeInfo};
