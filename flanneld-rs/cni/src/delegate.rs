//! The delegate's network config, built from our config and subnet.env exactly as Flannel's Go
//! plugin (flannel-io/cni-plugin v1.1.2) builds it: same defaults, same keys, ranges written as
//! the lease's network address (10.244.3.0/24) and the overlay routes appended to the user's.

use std::net::IpAddr;

use ipnet::IpNet;
use serde_json::{json, Map, Value};
use subnet_manager::subnet_env::SubnetEnv;

use super::conf::{field, kind, NetConf};
use super::error::CniError;

pub const DEFAULT_TYPE: &str = "bridge";
const DEFAULT_IPAM_TYPE: &str = "host-local";

/// The delegate config for ADD.
pub fn build(conf: &NetConf, env: &SubnetEnv) -> Result<Map<String, Value>, CniError> {
    let mut d = conf.delegate.clone();
    if let Some(t) = d.get("type") {
        if !t.is_string() {
            return Err(CniError::InvalidConfig(
                "'delegate' dictionary, if present, must have (string) 'type' field".into(),
            ));
        }
    }
    for key in ["name", "ipam"] {
        if d.contains_key(key) {
            return Err(CniError::InvalidConfig(format!(
                "'delegate' dictionary must not have '{key}' field, it'll be set by flannel"
            )));
        }
    }
    if let Some(rc) = &conf.runtime_config {
        d.insert("runtimeConfig".into(), Value::Object(rc.clone()));
    }
    d.insert("name".into(), Value::String(conf.name.clone()));
    d.entry("type").or_insert_with(|| json!(DEFAULT_TYPE));
    // Whoever does not masquerade, flanneld or the bridge, leaves it to the other.
    d.entry("ipMasq").or_insert_with(|| json!(!env.ipmasq));
    d.entry("mtu").or_insert_with(|| json!(env.mtu));
    if d.get("type").and_then(Value::as_str) == Some(DEFAULT_TYPE) {
        // The bridge is the pods' gateway: its address is FLANNEL_SUBNET's first address.
        d.entry("isGateway").or_insert(Value::Bool(true));
    }
    if let Some(v) = &conf.cni_version {
        d.insert("cniVersion".into(), Value::String(v.clone()));
    }
    d.insert("ipam".into(), Value::Object(ipam(conf, env)?));
    Ok(d)
}

/// The delegate config as bytes, object keys sorted at every level as Go's encoder sorts map
/// keys: the saved file is byte for byte what Flannel's plugin would have saved.
pub fn to_json(map: Map<String, Value>) -> Vec<u8> {
    let mut value = Value::Object(map);
    value.sort_all_objects();
    // A Value with string keys always serializes; the empty fallback is never taken.
    serde_json::to_vec(&value).unwrap_or_default()
}

/// The user's `ipam` (other fields such as a host-local `dataDir` kept) with `ranges` replaced
/// by our lease and our networks appended to its `routes`.
fn ipam(conf: &NetConf, env: &SubnetEnv) -> Result<Map<String, Value>, CniError> {
    let mut ipam = conf.ipam.clone().unwrap_or_default();
    ipam.entry("type")
        .or_insert_with(|| json!(DEFAULT_IPAM_TYPE));

    let mut ranges = Vec::new();
    if let Some(s) = env.subnet {
        ranges.push(json!([{ "subnet": s.trunc().to_string() }]));
    }
    if let Some(s) = env.ipv6_subnet {
        ranges.push(json!([{ "subnet": s.trunc().to_string() }]));
    }
    ipam.insert("ranges".into(), Value::Array(ranges));

    let mut routes = user_routes(&ipam)?;
    if let Some(n) = env.network {
        routes.push(json!({ "dst": n.trunc().to_string() }));
    }
    if let Some(n) = env.ipv6_network {
        routes.push(json!({ "dst": n.trunc().to_string() }));
    }
    ipam.insert("routes".into(), Value::Array(routes));
    Ok(ipam)
}

/// `ipam.routes` as given, after checking each is a route the delegate can read: Flannel
/// refuses a bad one at ADD rather than let the IPAM plugin fail obscurely.
fn user_routes(ipam: &Map<String, Value>) -> Result<Vec<Value>, CniError> {
    let bad = |i: usize, what: String| {
        CniError::InvalidConfig(format!("failed to parse ipam.routes[{i}]: {what}"))
    };
    let routes = match ipam.get("routes") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(r)) => r,
        Some(other) => {
            return Err(CniError::InvalidConfig(format!(
                "ipam.routes must be an array, got {}",
                kind(other)
            )))
        }
    };
    for (i, route) in routes.iter().enumerate() {
        let Value::Object(r) = route else {
            return Err(bad(i, format!("expected an object, got {}", kind(route))));
        };
        // Read as Go's plugin reads them (CNI's `types.Route`): keys of any case, and an
        // empty "gw" is no gateway (Go's `net.IP` takes "" as nil), as a templated config
        // with an empty value renders it.
        match field(r, "dst") {
            Some(Value::String(dst)) if dst.parse::<IpNet>().is_ok() => {}
            Some(dst) => return Err(bad(i, format!("\"dst\" is not a CIDR: {dst}"))),
            None => return Err(bad(i, "\"dst\" is missing".into())),
        }
        match field(r, "gw") {
            None => {}
            Some(Value::String(gw)) if gw.is_empty() || gw.parse::<IpAddr>().is_ok() => {}
            Some(gw) => return Err(bad(i, format!("\"gw\" is not an IP address: {gw}"))),
        }
    }
    Ok(routes.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conf::parse_json;

    fn conf(v: Value) -> NetConf {
        NetConf::from_json(&parse_json(v.to_string().as_bytes()).unwrap()).unwrap()
    }

    fn env(text: &str) -> SubnetEnv {
        SubnetEnv::parse(text).unwrap()
    }

    fn sorted(v: &Value) -> String {
        let mut v = v.clone();
        v.sort_all_objects();
        v.to_string()
    }

    const V4: &str = "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.3.1/24\n\
                      FLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n";

    /// Byte for byte what Go's plugin saved under dataDir/<containerID> for the same input
    /// (both sort object keys).
    #[test]
    fn matches_go_plugin_for_kube_flannel_default_conf() {
        let c = conf(
            json!({"cniVersion": "1.0.0", "name": "cbr0", "type": "flannel",
            "delegate": {"hairpinMode": true, "isDefaultGateway": true},
            "ipam": {"dataDir": "/tmp/ipam"}}),
        );
        let d = build(&c, &env(V4)).unwrap();
        assert_eq!(
            String::from_utf8(to_json(d)).unwrap(),
            r#"{"cniVersion":"1.0.0","hairpinMode":true,"ipMasq":true,"ipam":{"dataDir":"/tmp/ipam","ranges":[[{"subnet":"10.244.3.0/24"}]],"routes":[{"dst":"10.244.0.0/16"}],"type":"host-local"},"isDefaultGateway":true,"isGateway":true,"mtu":1450,"name":"cbr0","type":"bridge"}"#
        );
    }

    #[test]
    fn matches_go_plugin_with_user_routes_and_runtime_config() {
        let c = conf(
            json!({"cniVersion": "1.0.0", "name": "n", "delegate": {"type": "fakeplug"},
            "ipam": {"type": "host-local", "dataDir": "/x",
                     "routes": [{"dst": "1.2.3.4/8", "gw": "10.244.3.9"}]},
            "runtimeConfig": {"portMappings": []}}),
        );
        let text = V4.replace("IPMASQ=false", "IPMASQ=true");
        let d = build(&c, &env(&text)).unwrap();
        let go: Value = serde_json::from_str(
            r#"{"cniVersion":"1.0.0","ipMasq":false,"ipam":{"dataDir":"/x","ranges":[[{"subnet":"10.244.3.0/24"}]],"routes":[{"dst":"1.2.3.4/8","gw":"10.244.3.9"},{"dst":"10.244.0.0/16"}],"type":"host-local"},"mtu":1450,"name":"n","runtimeConfig":{"portMappings":[]},"type":"fakeplug"}"#,
        )
        .unwrap();
        assert_eq!(Value::Object(d), go);
    }

    #[test]
    fn dual_stack_and_ipv6_only_match_go_plugin() {
        let c = conf(json!({"cniVersion": "1.0.0", "name": "n", "delegate": {"type": "x"}}));
        let dual = env(
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.3.1/24\n\
                        FLANNEL_IPV6_NETWORK=fc00::/48\nFLANNEL_IPV6_SUBNET=fc00:0:0:3::1/64\n\
                        FLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n",
        );
        let d = build(&c, &dual).unwrap();
        assert_eq!(
            sorted(&d["ipam"]),
            r#"{"ranges":[[{"subnet":"10.244.3.0/24"}],[{"subnet":"fc00:0:0:3::/64"}]],"routes":[{"dst":"10.244.0.0/16"},{"dst":"fc00::/48"}],"type":"host-local"}"#
        );
        let v6 = env(
            "FLANNEL_IPV6_NETWORK=fc00::/48\nFLANNEL_IPV6_SUBNET=fc00:0:0:3::1/64\n\
                      FLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n",
        );
        let d = build(&c, &v6).unwrap();
        assert_eq!(
            sorted(&d["ipam"]),
            r#"{"ranges":[[{"subnet":"fc00:0:0:3::/64"}]],"routes":[{"dst":"fc00::/48"}],"type":"host-local"}"#
        );
        // Not a bridge: no isGateway.
        assert!(!d.contains_key("isGateway"));
    }

    #[test]
    fn explicit_delegate_values_win_and_user_ranges_are_replaced() {
        let c = conf(json!({"name": "n",
            "delegate": {"ipMasq": false, "mtu": 1400, "isGateway": false},
            "ipam": {"type": "other", "ranges": [[{"subnet": "192.168.0.0/24"}]], "routes": null}}));
        let d = build(&c, &env(V4)).unwrap();
        assert_eq!(d["ipMasq"], false);
        assert_eq!(d["mtu"], 1400);
        assert_eq!(d["isGateway"], false);
        assert_eq!(d["ipam"]["type"], "other");
        assert_eq!(d["ipam"]["ranges"], json!([[{"subnet": "10.244.3.0/24"}]]));
        assert_eq!(d["ipam"]["routes"], json!([{"dst": "10.244.0.0/16"}]));
        // No cniVersion in our config: none for the delegate either, as with Flannel.
        assert!(!d.contains_key("cniVersion"));
    }

    #[test]
    fn refuses_what_flannel_refuses() {
        for (delegate, needle) in [
            (json!({"type": 5}), "(string) 'type'"),
            (json!({"name": "x"}), "must not have 'name'"),
            (json!({"ipam": {}}), "must not have 'ipam'"),
        ] {
            let c = conf(json!({"name": "n", "delegate": delegate}));
            let err = build(&c, &env(V4)).unwrap_err();
            assert_eq!(err.code(), 7);
            assert!(err.to_string().contains(needle), "{err}");
        }
        for routes in [
            json!([{"dst": "x"}]),
            json!([{"gw": "1.2.3.4"}]),
            json!([{"dst": "10.0.0.0/8", "gw": "nope"}]),
            json!(["10.0.0.0/8"]),
            json!({"dst": "10.0.0.0/8"}),
        ] {
            let c = conf(json!({"name": "n", "ipam": {"routes": routes}}));
            let err = build(&c, &env(V4)).unwrap_err();
            assert_eq!(err.code(), 7, "{routes}");
            assert!(err.to_string().contains("ipam.routes"), "{err}");
        }
        // As Go's plugin takes them: an empty gateway is none, keys of any case.
        for routes in [
            json!([{"dst": "10.0.0.0/8", "gw": ""}]),
            json!([{"Dst": "10.0.0.0/8", "GW": "10.244.3.9"}]),
        ] {
            let c = conf(json!({"name": "n", "ipam": {"routes": routes}}));
            assert!(build(&c, &env(V4)).is_ok(), "{routes}");
        }
    }
}
