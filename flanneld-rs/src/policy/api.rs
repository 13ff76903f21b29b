//! The node's policy API on its Unix socket (routes in `status::http`):
//! - `PUT /v1/pods/{ns}/{name}`: the CNI plugin hands over a pod's record; 200 once the pod's
//!   own rules are in force here, 400 with the reason for a bad record, 503 while we cannot;
//! - `DELETE /v1/pods/{ns}/{name}?containerID=…`: the pod is gone (404: no record of ours);
//! - `GET /v1/policy/status`: the revision in force, counts, rejected records;
//! - `GET /v1/policy/explain?src=&dst=&port=&protocol=`: `netpol::explain` on what is in force.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use netpol::object::Protocol;
use serde_json::json;

use super::pods::PublishError;
use super::Policy;

fn text(code: StatusCode, msg: impl Into<String>) -> Response {
    let mut m = msg.into();
    m.push('\n');
    (code, m).into_response()
}

fn json_response(v: &serde_json::Value) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], v.to_string()).into_response()
}

fn not_ready() -> Response {
    text(
        StatusCode::SERVICE_UNAVAILABLE,
        "this node holds no lease yet: policy is not running",
    )
}

fn check_names(ns: &str, name: &str) -> Option<Response> {
    (ns.is_empty() || name.is_empty() || ns.contains('/') || name.contains('/')).then(|| {
        text(
            StatusCode::BAD_REQUEST,
            "namespace and name must be non-empty, without '/'",
        )
    })
}

pub async fn put_pod(
    policy: Option<Arc<Policy>>,
    ns: String,
    name: String,
    body: &[u8],
) -> Response {
    let Some(policy) = policy else {
        return not_ready();
    };
    if let Some(bad) = check_names(&ns, &name) {
        return bad;
    }
    match policy.publish(&ns, &name, body).await {
        Ok(revision) => json_response(&json!({ "revision": revision })),
        Err(PublishError::Invalid(why)) => {
            policy.stats.rejected.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(pod = %format!("{ns}/{name}"), "refused a pod record from the CNI plugin: {why}");
            text(StatusCode::BAD_REQUEST, format!("pod {ns}/{name}: {why}"))
        }
        Err(PublishError::Unavailable(why)) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("pod {ns}/{name}: {why}"),
        ),
    }
}

pub async fn delete_pod(
    policy: Option<Arc<Policy>>,
    ns: String,
    name: String,
    query: HashMap<String, String>,
) -> Response {
    let Some(policy) = policy else {
        return not_ready();
    };
    if let Some(bad) = check_names(&ns, &name) {
        return bad;
    }
    let container = query.get("containerID").map(String::as_str);
    match policy.unpublish(&ns, &name, container).await {
        Ok(true) => text(StatusCode::OK, format!("pod {ns}/{name}: record removed")),
        Ok(false) => text(
            StatusCode::NOT_FOUND,
            format!("pod {ns}/{name}: no record of ours"),
        ),
        Err(e) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("pod {ns}/{name}: {e:#}"),
        ),
    }
}

pub async fn status(policy: Option<Arc<Policy>>) -> Response {
    let Some(policy) = policy else {
        return not_ready();
    };
    let world = policy.world();
    let s = &policy.stats;
    json_response(&json!({
        "revision": policy.revision(),
        "policies": world.policy_count(),
        "namespaces": world.namespace_count(),
        "pods": world.pod_count(),
        "isolatedIngress": s.isolated_in.load(Ordering::Relaxed),
        "isolatedEgress": s.isolated_out.load(Ordering::Relaxed),
        "programs": s.programs.load(Ordering::Relaxed),
        "nftOperations": s.operations.load(Ordering::Relaxed),
        "lastProgrammingMicros": s.last_programming_us.load(Ordering::Relaxed),
        "rejected": policy.rejected(),
    }))
}

pub async fn explain(policy: Option<Arc<Policy>>, query: HashMap<String, String>) -> Response {
    let Some(policy) = policy else {
        return not_ready();
    };
    let ip = |k: &str| -> Option<IpAddr> { query.get(k).and_then(|v| v.parse().ok()) };
    let (Some(src), Some(dst)) = (ip("src"), ip("dst")) else {
        return text(
            StatusCode::BAD_REQUEST,
            "src and dst: IP addresses are needed",
        );
    };
    let Some(port) = query.get("port").and_then(|p| p.parse::<u16>().ok()) else {
        return text(StatusCode::BAD_REQUEST, "port: a number 0-65535 is needed");
    };
    let proto = query.get("protocol").map(|p| p.to_ascii_uppercase());
    let protocol = match Protocol::parse(proto.as_deref(), "protocol") {
        Ok(p) => p,
        Err(e) => return text(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let answer = netpol::explain::explain(&policy.world(), src, dst, port, protocol);
    match serde_json::to_value(&answer) {
        Ok(v) => json_response(&v),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}
