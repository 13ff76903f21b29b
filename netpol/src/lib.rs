//! Kubernetes NetworkPolicy for flanneld-rs, with no I/O: the records kept in etcd under
//! `<prefix>/policy/` (`object`), label selectors (`selector`), the cluster as those records
//! describe it (`world`), what one node's kernel must hold for its own pods (`compile`), that
//! state as nftables commands, whole or as the difference from what is installed (`nft`), and
//! the answer to "why is this allowed or denied" from the same rules (`explain`).
//!
//! The daemon feeds records in, applies the commands with `nft -f`, and serves `explain`.
//! The contract (keys, formats, semantics) is `shared/spec/network-policy.md`.

pub mod compile;
pub mod explain;
pub mod nft;
pub mod object;
pub mod selector;
pub mod wire;
pub mod world;

pub use object::{Object, ObjectKey};
pub use world::World;

/// A record that cannot be used: which field, and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct Invalid {
    pub field: String,
    pub reason: String,
}

impl Invalid {
    pub fn new(field: &str, reason: impl Into<String>) -> Self {
        Invalid {
            field: field.to_string(),
            reason: reason.into(),
        }
    }
}

/// FNV-1a of `s`: short names for what may be too long to name itself (chains, keys), stable
/// across runs and builds, which is all such a name needs.
pub fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    })
}

/// Quotes of untrusted text stop at 64 characters, so a huge value never reaches a log whole.
pub fn clip(s: &str) -> String {
    clip_to(s, 64)
}

pub(crate) fn clip_to(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let cut: String = s.chars().take(max).collect();
        format!("{cut}…")
    }
}

/// A JSON parse error, whose message may quote the value (`invalid type: string "…"`),
/// clipped, with its position kept.
pub(crate) fn json_error(e: &serde_json::Error) -> String {
    let full = e.to_string();
    // serde_json appends " at line L column C"; the last one is its own.
    let message = full
        .rsplit_once(" at line ")
        .map_or(full.as_str(), |(m, _)| m);
    format!(
        "{} at line {} column {}",
        clip_to(message, 160),
        e.line(),
        e.column()
    )
}
