//! What `flanneld-rs status` shows: one snapshot of the running daemon (served as JSON on
//! `/status`), and its rendering as a table a person reads at a glance.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// The daemon's state at one moment.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Report {
    pub version: String,
    pub backend: String,
    pub lease: Option<LeaseReport>,
    /// `/readyz`'s answer: `None` when ready, else why not.
    pub not_ready: Option<String>,
    pub devices: Vec<DeviceReport>,
    /// The offloads the userspace datapath runs with (udp, wireguard); the kernel datapaths
    /// (vxlan, host-gw) have none of ours.
    pub offloads: Vec<String>,
    pub peers: Vec<PeerReport>,
    /// Peers' leases kept from the backend (see the daemon's log and
    /// `flanneld_leases_refused_total` for which and why).
    pub refused_leases: u64,
    pub checks: Vec<Check>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct LeaseReport {
    pub subnet: String,
    /// Seconds until the lease expires unless renewed (negative: expired).
    pub expires_in_s: i64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct DeviceReport {
    pub name: String,
    /// The kernel's `operstate` (`up`, `unknown` for a TUN that carries traffic, `down`), or
    /// `missing`.
    pub state: String,
    pub mtu: Option<u32>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct PeerReport {
    /// The peer's lease key (`10.244.3.0-24`).
    pub subnet: String,
    pub public_ip: String,
    pub public_ipv6: Option<String>,
    /// The last health probe's verdict; `not probed` until per-peer probes exist.
    pub probe: String,
}

/// One environment check: what was looked at, whether it can hurt pod traffic, and what was
/// found.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

impl Report {
    /// Whether anything needs an operator's attention.
    pub fn healthy(&self) -> bool {
        self.not_ready.is_none() && self.checks.iter().all(|c| c.ok)
    }

    /// The table `flanneld-rs status` prints.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let lease = self.lease.as_ref().map_or("none".to_string(), |l| {
            if l.expires_in_s >= 0 {
                format!("{} (expires in {})", l.subnet, duration(l.expires_in_s))
            } else {
                format!("{} (EXPIRED {} ago)", l.subnet, duration(-l.expires_in_s))
            }
        });
        let ready = self
            .not_ready
            .as_ref()
            .map_or("yes".to_string(), |why| format!("NO: {why}"));
        let _ = writeln!(s, "flanneld-rs {}", self.version);
        let _ = writeln!(s, "  backend   {}", self.backend);
        let _ = writeln!(s, "  lease     {lease}");
        let _ = writeln!(s, "  ready     {ready}");
        for d in &self.devices {
            let mtu = d.mtu.map_or("-".to_string(), |m| m.to_string());
            let _ = writeln!(s, "  device    {} {} mtu {mtu}", d.name, d.state);
        }
        for o in &self.offloads {
            let _ = writeln!(s, "  offloads  {o}");
        }
        let _ = writeln!(
            s,
            "\npeers ({}, {} refused)",
            self.peers.len(),
            self.refused_leases
        );
        let rows: Vec<[String; 4]> = self
            .peers
            .iter()
            .map(|p| {
                [
                    p.subnet.clone(),
                    p.public_ip.clone(),
                    p.public_ipv6.clone().unwrap_or_else(|| "-".into()),
                    p.probe.clone(),
                ]
            })
            .collect();
        table(
            &mut s,
            &["SUBNET", "PUBLIC IP", "PUBLIC IPV6", "PROBE"],
            &rows,
        );
        let _ = writeln!(s, "\nchecks");
        let rows: Vec<[String; 3]> = self
            .checks
            .iter()
            .map(|c| {
                let mark = if c.ok { "ok" } else { "PROBLEM" };
                [c.name.clone(), mark.to_string(), c.detail.clone()]
            })
            .collect();
        table(&mut s, &["CHECK", "STATE", "DETAIL"], &rows);
        s
    }
}

/// Columns padded to their widest cell, two spaces apart, indented by two.
fn table<const N: usize>(out: &mut String, head: &[&str; N], rows: &[[String; N]]) {
    let mut width = head.map(str::len);
    for row in rows {
        for (w, cell) in width.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut line = |cells: Vec<&str>| {
        let mut l = String::from(" ");
        for (cell, w) in cells.iter().zip(width) {
            let _ = write!(l, " {cell:<w$} ");
        }
        let _ = writeln!(out, "{}", l.trim_end());
    };
    line(head.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// `3h25m`, `42s`.
fn duration(secs: i64) -> String {
    let (h, m, s) = (secs / 3600, secs % 3600 / 60, secs % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m{s:02}s"),
        _ => format!("{h}h{m:02}m"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Report {
        Report {
            version: "0.1.0".into(),
            backend: "vxlan".into(),
            lease: Some(LeaseReport {
                subnet: "10.244.3.0-24".into(),
                expires_in_s: 86_000,
            }),
            not_ready: None,
            devices: vec![DeviceReport {
                name: "flannel.1".into(),
                state: "unknown".into(),
                mtu: Some(1450),
            }],
            offloads: vec!["flannel0: tun offload TSO, udp gso true, udp gro true".into()],
            peers: vec![PeerReport {
                subnet: "10.244.7.0-24".into(),
                public_ip: "192.168.1.11".into(),
                public_ipv6: None,
                probe: "not probed".into(),
            }],
            refused_leases: 1,
            checks: vec![
                Check {
                    name: "forward".into(),
                    ok: false,
                    detail: "FORWARD policy DROP and no forward rules of ours".into(),
                },
                Check {
                    name: "rp_filter".into(),
                    ok: true,
                    detail: "flannel.1: 0".into(),
                },
            ],
        }
    }

    #[test]
    fn table_shows_lease_peers_and_problems() {
        let text = sample().render();
        for want in [
            "lease     10.244.3.0-24 (expires in 23h53m)",
            "ready     yes",
            "device    flannel.1 unknown mtu 1450",
            "offloads  flannel0: tun offload TSO, udp gso true, udp gro true",
            "peers (1, 1 refused)",
            "10.244.7.0-24  192.168.1.11  -            not probed",
            "forward    PROBLEM  FORWARD policy DROP and no forward rules of ours",
        ] {
            assert!(text.contains(want), "no {want:?} in\n{text}");
        }
        assert!(!sample().healthy());
    }

    #[test]
    fn json_round_trip() {
        let r = sample();
        let json = serde_json::to_string(&r).expect("json");
        let back: Report = serde_json::from_str(&json).expect("parse");
        assert_eq!(back, r);
    }

    #[test]
    fn durations_read_at_a_glance() {
        assert_eq!(duration(42), "42s");
        assert_eq!(duration(125), "2m05s");
        assert_eq!(duration(3 * 3600 + 25 * 60 + 7), "3h25m");
    }
}
