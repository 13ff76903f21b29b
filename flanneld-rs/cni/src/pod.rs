//! The Kubernetes-shaped Pod record ADD hands to the daemon for NetworkPolicy: who the pod is
//! (CNI_ARGS), its labels and named ports (the config's `args.cni`), its IPs (the delegate's
//! result). The daemon validates the contents; we only make sure the shape is right.

use std::fmt;
use std::net::IpAddr;

use serde_json::{json, Map, Value};

use super::args::{cni_arg, Environment};
use super::conf::{field, kind};
use super::daemon_api::encode_component;
use super::error::CniError;

/// Ties the record to the sandbox that made it, so a late DEL of an old sandbox cannot remove
/// the record of a newer pod with the same name.
pub const CONTAINER_ID_ANNOTATION: &str = "flanneld-rs.io/container-id";
/// The namespace of a pod whose runtime passes no K8S_POD_NAMESPACE.
pub const DEFAULT_NAMESPACE: &str = "default";

/// A pod's namespace and name: non-empty, without '/', so each is one API path segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodId {
    pub namespace: String,
    pub name: String,
}

impl PodId {
    /// From K8S_POD_NAMESPACE and K8S_POD_NAME in CNI_ARGS; without them, `default` and the
    /// container ID (a runtime that is not kubelet still gets a record per container).
    pub fn from_env(env: &Environment, container_id: &str) -> Result<PodId, CniError> {
        let id = PodId {
            namespace: cni_arg(env, "K8S_POD_NAMESPACE")
                .unwrap_or(DEFAULT_NAMESPACE)
                .to_string(),
            name: cni_arg(env, "K8S_POD_NAME")
                .unwrap_or(container_id)
                .to_string(),
        };
        for (what, value) in [
            ("K8S_POD_NAMESPACE", &id.namespace),
            ("K8S_POD_NAME", &id.name),
        ] {
            if value.is_empty() || value.contains('/') {
                return Err(CniError::InvalidConfig(format!(
                    "CNI_ARGS {what} {value:?} cannot name a pod: empty or contains '/'"
                )));
            }
        }
        Ok(id)
    }

    /// `/v1/pods/<namespace>/<name>`, encoded.
    pub fn api_path(&self) -> String {
        format!(
            "/v1/pods/{}/{}",
            encode_component(&self.namespace),
            encode_component(&self.name)
        )
    }
}

impl fmt::Display for PodId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// What the network config says about the pod: `args.cni.labels` (CNI CONVENTIONS.md runtime
/// labels) and our `args.cni.ports` (Kubernetes ContainerPorts, for named ports in policies).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PodLabels {
    pub labels: Map<String, Value>,
    pub ports: Vec<Value>,
}

impl PodLabels {
    /// From the config's raw `args`; wrong types fail ADD, naming the field.
    pub fn from_args(args: Option<&Value>) -> Result<PodLabels, CniError> {
        let Some(args) = args else {
            return Ok(PodLabels::default());
        };
        let args = as_object(args, "args")?;
        let Some(cni) = field(args, "cni") else {
            return Ok(PodLabels::default());
        };
        let cni = as_object(cni, "args.cni")?;
        let mut out = PodLabels::default();
        for (i, label) in list(cni, "labels")?.iter().enumerate() {
            let at = format!("args.cni.labels[{i}]");
            let label = as_object(label, &at)?;
            let key = string(label, "key", &at)?;
            let value = string(label, "value", &at)?;
            // A later label with the same key wins, as in a Kubernetes labels map.
            out.labels.insert(key, Value::String(value));
        }
        for (i, port) in list(cni, "ports")?.iter().enumerate() {
            out.ports
                .push(container_port(port, &format!("args.cni.ports[{i}]"))?);
        }
        Ok(out)
    }
}

/// A ContainerPort as given, its types checked and `protocol` defaulted to TCP.
fn container_port(port: &Value, at: &str) -> Result<Value, CniError> {
    let mut port = as_object(port, at)?.clone();
    match field(&port, "containerPort") {
        Some(Value::Number(n)) if n.as_u64().is_some_and(|p| (1..=65535).contains(&p)) => {}
        Some(Value::Number(n)) => {
            return Err(invalid(format!(
                "{at}.containerPort must be 1..=65535, got {n}"
            )))
        }
        Some(other) => {
            return Err(wrong_type(
                &format!("{at}.containerPort"),
                "a number",
                other,
            ))
        }
        None => return Err(invalid(format!("{at}.containerPort is missing"))),
    }
    for optional in ["name", "protocol"] {
        if let Some(v) = field(&port, optional).filter(|v| !v.is_string()) {
            return Err(wrong_type(&format!("{at}.{optional}"), "a string", v));
        }
    }
    if field(&port, "protocol").is_none() {
        port.insert("protocol".into(), json!("TCP"));
    }
    Ok(Value::Object(port))
}

/// The pod's IPs from the delegate's ADD result, IPv4 first: `ips[].address` (CNI >= 0.3.0)
/// or `ip4.ip` / `ip6.ip` (0.1.0 and 0.2.0), each "address/prefix".
pub fn pod_ips(result: &Value) -> Result<Vec<IpAddr>, String> {
    let mut cidrs = Vec::new();
    if let Some(ips) = result.get("ips").filter(|v| !v.is_null()) {
        let ips = ips.as_array().ok_or("\"ips\" is not an array")?;
        for ip in ips {
            cidrs.push(
                ip.get("address")
                    .and_then(Value::as_str)
                    .ok_or_else(|| format!("an \"ips\" entry has no string \"address\": {ip}"))?,
            );
        }
    } else {
        for key in ["ip4", "ip6"] {
            if let Some(ip) = result.get(key) {
                cidrs.push(
                    ip.get("ip")
                        .and_then(Value::as_str)
                        .ok_or_else(|| format!("\"{key}\" has no string \"ip\": {ip}"))?,
                );
            }
        }
    }
    let mut ips = cidrs
        .iter()
        .map(|cidr| {
            let addr = cidr.split_once('/').map_or(*cidr, |(addr, _)| addr);
            addr.parse::<IpAddr>()
                .map_err(|_| format!("{cidr:?} is not an IP address"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if ips.is_empty() {
        return Err("it names no IP address".into());
    }
    // Stable: the delegate's order within each family is kept.
    ips.sort_by_key(|ip| !ip.is_ipv4());
    Ok(ips)
}

/// The record: a v1 Pod with the fields NetworkPolicy needs. `ips` is non-empty.
pub fn record(id: &PodId, container_id: &str, labels: &PodLabels, ips: &[IpAddr]) -> Value {
    let pod_ips: Vec<Value> = ips.iter().map(|ip| json!({"ip": ip.to_string()})).collect();
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": id.name,
            "namespace": id.namespace,
            "labels": labels.labels,
            "annotations": {CONTAINER_ID_ANNOTATION: container_id},
        },
        "spec": {"containers": [{"name": "main", "ports": labels.ports}]},
        "status": {
            "podIP": ips.first().map(ToString::to_string).unwrap_or_default(),
            "podIPs": pod_ips,
        },
    })
}

fn as_object<'a>(v: &'a Value, name: &str) -> Result<&'a Map<String, Value>, CniError> {
    v.as_object()
        .ok_or_else(|| wrong_type(name, "an object", v))
}

/// An optional array field of `args.cni`.
fn list<'a>(cni: &'a Map<String, Value>, name: &str) -> Result<&'a [Value], CniError> {
    match field(cni, name) {
        None => Ok(&[]),
        Some(Value::Array(items)) => Ok(items),
        Some(other) => Err(wrong_type(&format!("args.cni.{name}"), "an array", other)),
    }
}

fn string(obj: &Map<String, Value>, name: &str, at: &str) -> Result<String, CniError> {
    match field(obj, name) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(wrong_type(&format!("{at}.{name}"), "a string", other)),
        None => Err(invalid(format!("{at}.{name} is missing"))),
    }
}

fn wrong_type(name: &str, expected: &str, got: &Value) -> CniError {
    invalid(format!("{name} must be {expected}, got {}", kind(got)))
}

fn invalid(message: String) -> CniError {
    CniError::InvalidConfig(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(cni_args: &str) -> Environment {
        Environment::from_pairs([("CNI_ARGS", cni_args)])
    }

    #[test]
    fn identity_from_cni_args_or_defaults() {
        let id = PodId::from_env(
            &env("IgnoreUnknown=1;K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=dns-1"),
            "ctr1",
        )
        .unwrap();
        assert_eq!(id.to_string(), "kube-system/dns-1");
        assert_eq!(id.api_path(), "/v1/pods/kube-system/dns-1");
        let id = PodId::from_env(&Environment::default(), "ctr1").unwrap();
        assert_eq!(
            (id.namespace.as_str(), id.name.as_str()),
            ("default", "ctr1")
        );
        let id = PodId::from_env(&env("K8S_POD_NAME=web"), "ctr1").unwrap();
        assert_eq!(id.to_string(), "default/web");
        assert_eq!(
            PodId::from_env(&env("K8S_POD_NAME=a b"), "c")
                .unwrap()
                .api_path(),
            "/v1/pods/default/a%20b"
        );
        for bad in ["K8S_POD_NAME=a/b", "K8S_POD_NAMESPACE=../x"] {
            let err = PodId::from_env(&env(bad), "ctr1").unwrap_err();
            assert_eq!(err.code(), 7, "{bad}");
            assert!(err.to_string().contains("contains '/'"), "{err}");
        }
    }

    #[test]
    fn labels_and_ports() {
        let args = json!({"cni": {
            "labels": [{"key": "app", "value": "db"}, {"key": "tier", "value": ""},
                       {"key": "app", "value": "db2"}],
            "ports": [{"name": "serve-80-tcp", "containerPort": 80, "protocol": "TCP"},
                      {"name": "dns", "containerPort": 53, "protocol": "UDP"},
                      {"containerPort": 8080}],
        }, "other": 1});
        let got = PodLabels::from_args(Some(&args)).unwrap();
        assert_eq!(Value::Object(got.labels), json!({"app": "db2", "tier": ""}));
        assert_eq!(
            got.ports,
            vec![
                json!({"name": "serve-80-tcp", "containerPort": 80, "protocol": "TCP"}),
                json!({"name": "dns", "containerPort": 53, "protocol": "UDP"}),
                json!({"containerPort": 8080, "protocol": "TCP"}),
            ]
        );
        for none in [None, Some(json!({})), Some(json!({"cni": {}}))] {
            assert_eq!(
                PodLabels::from_args(none.as_ref()).unwrap(),
                PodLabels::default()
            );
        }
    }

    #[test]
    fn malformed_labels_and_ports_name_the_field() {
        for (args, needle) in [
            (json!("x"), "args must be an object, got a string"),
            (json!({"cni": []}), "args.cni must be an object"),
            (
                json!({"cni": {"labels": {}}}),
                "args.cni.labels must be an array",
            ),
            (
                json!({"cni": {"labels": ["app=db"]}}),
                "args.cni.labels[0] must be an object",
            ),
            (
                json!({"cni": {"labels": [{"key": "a", "value": 1}]}}),
                "args.cni.labels[0].value must be a string, got a number",
            ),
            (
                json!({"cni": {"labels": [{"value": "x"}]}}),
                "args.cni.labels[0].key is missing",
            ),
            (
                json!({"cni": {"ports": 80}}),
                "args.cni.ports must be an array",
            ),
            (
                json!({"cni": {"ports": [{"containerPort": "80"}]}}),
                "args.cni.ports[0].containerPort must be a number",
            ),
            (
                json!({"cni": {"ports": [{"containerPort": 80}, {"containerPort": 0}]}}),
                "args.cni.ports[1].containerPort must be 1..=65535",
            ),
            (
                json!({"cni": {"ports": [{"name": "x"}]}}),
                "args.cni.ports[0].containerPort is missing",
            ),
            (
                json!({"cni": {"ports": [{"containerPort": 80, "protocol": 6}]}}),
                "args.cni.ports[0].protocol must be a string",
            ),
        ] {
            let err = PodLabels::from_args(Some(&args)).unwrap_err();
            assert_eq!(err.code(), 7, "{args}");
            assert!(err.to_string().contains(needle), "{args}: {err}");
        }
    }

    #[test]
    fn ips_from_every_result_shape() {
        let ips = |v: Value| {
            pod_ips(&v).map(|ips| ips.iter().map(ToString::to_string).collect::<Vec<_>>())
        };
        assert_eq!(
            ips(json!({"cniVersion": "1.0.0", "ips": [{"address": "10.244.1.5/24"}]})).unwrap(),
            ["10.244.1.5"]
        );
        // Dual stack, IPv6 listed first by the delegate: IPv4 comes first.
        assert_eq!(
            ips(
                json!({"ips": [{"address": "fd00::5/64"}, {"address": "10.244.1.5/24"},
                               {"address": "fd00::6/64"}]})
            )
            .unwrap(),
            ["10.244.1.5", "fd00::5", "fd00::6"]
        );
        assert_eq!(
            ips(json!({"cniVersion": "0.2.0", "ip6": {"ip": "fd00::5/64"},
                       "ip4": {"ip": "10.244.1.5/24", "gateway": "10.244.1.1"}}))
            .unwrap(),
            ["10.244.1.5", "fd00::5"]
        );
        assert_eq!(
            ips(json!({"ip4": {"ip": "10.0.0.1/8"}})).unwrap(),
            ["10.0.0.1"]
        );
        for (bad, needle) in [
            (json!({"cniVersion": "1.0.0"}), "names no IP address"),
            (json!({"ips": []}), "names no IP address"),
            (json!({"ips": {}}), "not an array"),
            (
                json!({"ips": [{"gateway": "10.0.0.1"}]}),
                "no string \"address\"",
            ),
            (
                json!({"ips": [{"address": "banana/24"}]}),
                "\"banana/24\" is not an IP address",
            ),
            (
                json!({"ip4": {"gateway": "10.0.0.1"}}),
                "\"ip4\" has no string \"ip\"",
            ),
        ] {
            let err = ips(bad.clone()).unwrap_err();
            assert!(err.contains(needle), "{bad}: {err}");
        }
    }

    #[test]
    fn record_shape() {
        let id = PodId {
            namespace: "prod".into(),
            name: "db-0".into(),
        };
        let labels = PodLabels::from_args(Some(&json!({"cni": {
            "labels": [{"key": "app", "value": "db"}],
            "ports": [{"name": "pg", "containerPort": 5432}],
        }})))
        .unwrap();
        let ips = ["10.244.1.5".parse().unwrap(), "fd00::5".parse().unwrap()];
        let rec = record(&id, "ctr1", &labels, &ips);
        assert_eq!(
            rec.to_string(),
            json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "db-0", "namespace": "prod", "labels": {"app": "db"},
                             "annotations": {"flanneld-rs.io/container-id": "ctr1"}},
                "spec": {"containers": [{"name": "main", "ports": [
                    {"name": "pg", "containerPort": 5432, "protocol": "TCP"}]}]},
                "status": {"podIP": "10.244.1.5",
                           "podIPs": [{"ip": "10.244.1.5"}, {"ip": "fd00::5"}]}})
            .to_string()
        );
        let bare = record(&id, "c", &PodLabels::default(), &ips[..1]);
        assert_eq!(bare["metadata"]["labels"], json!({}));
        assert_eq!(bare["spec"]["containers"][0]["ports"], json!([]));
    }
}
