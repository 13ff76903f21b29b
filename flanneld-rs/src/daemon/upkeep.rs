//! What the daemon programmed stays programmed: every `--iptables-resync` seconds the backend
//! restores what was removed behind our back, and routes or devices of ours that nothing
//! justifies any more are removed.

use std::sync::atomic::Ordering;

use anyhow::{Context, Result};
use encap::netlink::{Netlink, OwnRoute};
use encap::Backend;
use ipnet::IpNet;
use subnet_manager::lease::SubnetKey;

use crate::flags::Flags;
use crate::status::Status;
use crate::traffic::TrafficRules;

/// `--ip-blackhole-route`: our lease's subnets, each a blackhole route (v6 too).
pub(super) fn blackholes(flags: &Flags, own: &SubnetKey) -> Vec<IpNet> {
    if !flags.ip_blackhole_route {
        return Vec::new();
    }
    let v4 = own.ipv4.map(|n| IpNet::V4(n.trunc()));
    let v6 = own.ipv6.map(|n| IpNet::V6(n.trunc()));
    v4.into_iter().chain(v6).collect()
}

/// Installs the blackhole routes that are missing; returns how many were.
pub(super) async fn ensure_blackholes(netlink: &Netlink, dsts: &[IpNet]) -> Result<usize> {
    let mut added = 0;
    for dst in dsts {
        if netlink
            .ensure_blackhole(*dst)
            .await
            .with_context(|| format!("--ip-blackhole-route for {dst}"))?
        {
            added += 1;
        }
    }
    Ok(added)
}

fn blackhole_routes(dsts: &[IpNet]) -> Vec<OwnRoute> {
    dsts.iter()
        .map(|dst| OwnRoute {
            dst: *dst,
            gateway: None,
            oif: None,
            blackhole: true,
        })
        .collect()
}

/// Every `--iptables-resync` seconds: restore what was removed behind our back and drop routes
/// of ours that nothing justifies any more.
/// `last_error` keeps the last failure's text, so a lasting one is logged once, not every
/// period.
pub(super) async fn keep_programmed(
    netlink: &Netlink,
    backend: &mut dyn Backend,
    rules: &mut TrafficRules,
    blackholes: &[IpNet],
    status: &Status,
    last_error: &mut Option<String>,
) {
    let mut errors = Vec::new();
    // What went back counts even when another part of the pass failed.
    let pass = backend.repair().await;
    if pass.restored > 0 {
        tracing::warn!(
            restored = pass.restored,
            "put right kernel state of ours that was removed or left stale"
        );
        status
            .repairs
            .fetch_add(pass.restored as u64, Ordering::Relaxed);
    }
    if let Some(e) = pass.error {
        errors.push(format!(
            "checking the {} backend's kernel state: {e}",
            backend.name()
        ));
    }
    match ensure_blackholes(netlink, blackholes).await {
        Ok(0) => {}
        Ok(n) => {
            tracing::warn!(restored = n, "our blackhole route was removed: restored");
            status.repairs.fetch_add(n as u64, Ordering::Relaxed);
        }
        Err(e) => errors.push(format!("{e:#}")),
    }
    sweep_routes(netlink, backend, blackholes, status).await;
    match rules.repair().await {
        Ok(0) => {}
        Ok(n) => {
            tracing::warn!("our traffic rules were changed or removed: restored");
            status.repairs.fetch_add(n as u64, Ordering::Relaxed);
        }
        Err(e) => errors.push(format!("restoring the traffic rules: {e:#}")),
    }
    let now = (!errors.is_empty()).then(|| errors.join("; "));
    if now != *last_error {
        match &now {
            Some(e) => tracing::warn!("{e} (retried every --iptables-resync period)"),
            None => tracing::info!("kernel state checks pass again"),
        }
        *last_error = now;
    }
}

/// Whether `name` is one of Flannel's VXLAN device names: `flannel.<VNI>` or
/// `flannel-v6.<VNI>` (not `flannel-wg`, `flannel0`, …).
fn is_flannel_vxlan_name(name: &str) -> bool {
    ["flannel.", "flannel-v6."].iter().any(|prefix| {
        name.strip_prefix(prefix)
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    })
}

/// Deletes VXLAN devices named like Flannel's (`flannel.<VNI>`, `flannel-v6.<VNI>`) that the
/// current backend does not use: left by an earlier vxlan config (another VNI, IPv6 since
/// turned off, or another backend now). Their routes go with them. Called once at start,
/// after the backend made its own devices.
pub(super) async fn sweep_devices(netlink: &Netlink, backend: &dyn Backend) {
    let links = match netlink.links().await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!("listing links: {e}");
            return;
        }
    };
    let ours = backend.device_names();
    for link in links {
        if !is_flannel_vxlan_name(&link.name) || ours.contains(&link.name) {
            continue;
        }
        let is_vxlan =
            matches!(netlink.link_details(&link.name).await, Ok(Some(d)) if d.vxlan.is_some());
        if !is_vxlan {
            continue;
        }
        tracing::warn!(device = %link.name, backend = backend.name(), "deleting a VXLAN device of an earlier config that the current backend does not use");
        if let Err(e) = netlink.delete_link(link.index).await {
            tracing::warn!("{e}");
        }
    }
}

/// Removes every route of ours (protocol 70) that neither the backend nor
/// `--ip-blackhole-route` wants: left by an earlier backend (host-gw's routes would bypass an
/// encrypting one), by a lease long gone, or by a blackhole flag since turned off.
pub(super) async fn sweep_routes(
    netlink: &Netlink,
    backend: &dyn Backend,
    blackholes: &[IpNet],
    status: &Status,
) {
    let mut wanted = backend.wanted_routes();
    wanted.extend(blackhole_routes(blackholes));
    let ours = match netlink.own_routes().await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!("listing our routes: {e}");
            return;
        }
    };
    for r in ours.iter().filter(|r| !wanted.contains(r)) {
        tracing::warn!(route = %r.dst, via = ?r.gateway, backend = backend.name(), "removing a route of ours that the current backend and leases do not justify");
        match netlink.delete_route(r).await {
            Ok(()) => {
                status.stale_routes_removed.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => tracing::warn!("{e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::is_flannel_vxlan_name;

    #[test]
    fn flannel_vxlan_names_of_both_families() {
        for name in ["flannel.1", "flannel.4096", "flannel-v6.1", "flannel-v6.42"] {
            assert!(is_flannel_vxlan_name(name), "{name}");
        }
        for name in [
            "flannel.",
            "flannel-v6.",
            "flannel.1a",
            "flannel-v6.x",
            "flannel-wg",
            "flannel-wg-v6",
            "flannel0",
            "flannel-v61",
            "eth0",
        ] {
            assert!(!is_flannel_vxlan_name(name), "{name}");
        }
    }
}
