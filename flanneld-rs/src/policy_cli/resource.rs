//! The three kinds of record, by the names kubectl users type and print.

use anyhow::{bail, Result};
use netpol::ObjectKey;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Resource {
    NetworkPolicy,
    Namespace,
    Pod,
}

impl Resource {
    /// A resource as typed on the command line: singular, plural or short, any case, with
    /// or without the API group.
    pub fn parse(s: &str) -> Result<Resource> {
        let lower = s.to_ascii_lowercase();
        Ok(match lower.as_str() {
            "networkpolicy"
            | "networkpolicies"
            | "netpol"
            | "netpols"
            | "networkpolicy.networking.k8s.io"
            | "networkpolicies.networking.k8s.io" => Resource::NetworkPolicy,
            "namespace" | "namespaces" | "ns" => Resource::Namespace,
            "pod" | "pods" | "po" => Resource::Pod,
            _ => bail!(
                "unknown resource {s:?}: use networkpolicies (netpol), namespaces (ns) or pods (po)"
            ),
        })
    }

    /// The resource of an object's `kind`.
    pub fn from_kind(kind: &str) -> Option<Resource> {
        match kind {
            "NetworkPolicy" => Some(Resource::NetworkPolicy),
            "Namespace" => Some(Resource::Namespace),
            "Pod" => Some(Resource::Pod),
            _ => None,
        }
    }

    pub fn kind(self) -> &'static str {
        match self {
            Resource::NetworkPolicy => "NetworkPolicy",
            Resource::Namespace => "Namespace",
            Resource::Pod => "Pod",
        }
    }

    /// What kubectl prints before `/name` (`networkpolicy.networking.k8s.io/web created`).
    pub fn singular(self) -> &'static str {
        match self {
            Resource::NetworkPolicy => "networkpolicy.networking.k8s.io",
            Resource::Namespace => "namespace",
            Resource::Pod => "pod",
        }
    }

    /// What kubectl names in "not found" errors (`networkpolicies.networking.k8s.io "x"`).
    pub fn plural(self) -> &'static str {
        match self {
            Resource::NetworkPolicy => "networkpolicies.networking.k8s.io",
            Resource::Namespace => "namespaces",
            Resource::Pod => "pods",
        }
    }

    /// The key segment under `<prefix>/policy/`.
    pub fn dir(self) -> &'static str {
        match self {
            Resource::NetworkPolicy => "networkpolicies",
            Resource::Namespace => "namespaces",
            Resource::Pod => "pods",
        }
    }

    pub fn namespaced(self) -> bool {
        self != Resource::Namespace
    }

    /// The key of object `name` (in `namespace`, for namespaced resources).
    pub fn key(self, namespace: &str, name: &str) -> ObjectKey {
        let (namespace, name) = (namespace.to_string(), name.to_string());
        match self {
            Resource::NetworkPolicy => ObjectKey::Policy { namespace, name },
            Resource::Namespace => ObjectKey::Namespace { name },
            Resource::Pod => ObjectKey::Pod { namespace, name },
        }
    }

    pub fn of_key(key: &ObjectKey) -> Resource {
        match key {
            ObjectKey::Policy { .. } => Resource::NetworkPolicy,
            ObjectKey::Namespace { .. } => Resource::Namespace,
            ObjectKey::Pod { .. } => Resource::Pod,
        }
    }
}

/// `namespace/name`, or `name` for a Namespace.
pub fn key_name(key: &ObjectKey) -> (Option<&str>, &str) {
    match key {
        ObjectKey::Policy { namespace, name } | ObjectKey::Pod { namespace, name } => {
            (Some(namespace), name)
        }
        ObjectKey::Namespace { name } => (None, name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases() {
        for s in [
            "netpol",
            "netpols",
            "networkpolicy",
            "NetworkPolicies",
            "networkpolicies.networking.k8s.io",
        ] {
            assert_eq!(Resource::parse(s).expect(s), Resource::NetworkPolicy, "{s}");
        }
        for s in ["ns", "namespace", "namespaces"] {
            assert_eq!(Resource::parse(s).expect(s), Resource::Namespace, "{s}");
        }
        for s in ["po", "pod", "pods"] {
            assert_eq!(Resource::parse(s).expect(s), Resource::Pod, "{s}");
        }
        let e = Resource::parse("deployments").expect_err("unknown");
        assert!(e.to_string().contains("netpol"), "{e}");
    }

    #[test]
    fn keys_round_trip() {
        for r in [Resource::NetworkPolicy, Resource::Namespace, Resource::Pod] {
            let key = r.key("x", "a");
            assert_eq!(ObjectKey::parse(&key.rel()), Some(key.clone()));
            assert_eq!(Resource::of_key(&key), r);
            assert!(key.rel().starts_with(r.dir()));
            assert_eq!(Resource::from_kind(r.kind()), Some(r));
        }
    }
}
