//! The Prometheus exposition: one `prometheus-client` registry holding a collector that reads
//! the daemon's counters at scrape time (they live as atomics beside the code that bumps them:
//! the packet threads, the etcd adapter, the control loop), so nothing is counted twice.
//!
//! Names are the ones scraped since the first release: counters are registered without
//! `_total`, which the encoders add. Every scraper that takes the Prometheus text format 0.0.4
//! gets it, byte for byte the exposition served before (Prometheus itself lists it, after
//! OpenMetrics, in every `Accept`: serving it OpenMetrics would rename its counter families'
//! metadata); OpenMetrics goes only to a client that accepts nothing else.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use encap::stats::DropReason;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use subnet_manager::admission::Refusal;

use super::Status;
use crate::health::core::State;

/// `Content-Type` of the OpenMetrics text format, served to scrapers that ask for it.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// `Content-Type` of the Prometheus text format 0.0.4, served otherwise.
pub const PROMETHEUS_TEXT: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// The registry every scrape encodes.
pub fn registry(status: Arc<Status>) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(StatusCollector(status)));
    registry
}

/// The registry in the format the scraper takes (`Accept`), and its content type.
pub fn render(registry: &Registry, accept: &str) -> (&'static str, String) {
    let mut out = String::new();
    if openmetrics_only(accept) {
        // Writing to a String cannot fail; a collector's fmt::Error would only cut the text.
        let _ = prometheus_client::encoding::text::encode(&mut out, registry);
        (OPENMETRICS, out)
    } else {
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, registry);
        (PROMETHEUS_TEXT, out)
    }
}

/// Whether `accept` takes OpenMetrics but not the text format (`text/plain`, `text/*`, `*/*`
/// with a q above 0; an empty header takes anything).
fn openmetrics_only(accept: &str) -> bool {
    let mut openmetrics = false;
    let mut text = accept.trim().is_empty();
    for range in accept.split(',') {
        let mut parts = range.split(';').map(str::trim);
        let media = parts.next().unwrap_or("").to_ascii_lowercase();
        let q = parts
            .filter_map(|p| p.strip_prefix("q="))
            .find_map(|q| q.parse::<f32>().ok())
            .unwrap_or(1.0);
        if q <= 0.0 {
            continue;
        }
        match media.as_str() {
            "application/openmetrics-text" => openmetrics = true,
            "text/plain" | "text/*" | "*/*" => text = true,
            _ => {}
        }
    }
    openmetrics && !text
}

struct StatusCollector(Arc<Status>);

impl fmt::Debug for StatusCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StatusCollector")
    }
}

fn load(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// One family of `ConstCounter`s or `ConstGauge`s, written with its HELP and TYPE.
struct Family<'a, 'e> {
    enc: &'a mut DescriptorEncoder<'e>,
}

impl Family<'_, '_> {
    fn counter(&mut self, name: &str, help: &str, value: u64) -> fmt::Result {
        let metric = ConstCounter::new(value);
        metric.encode(
            self.enc
                .encode_descriptor(name, help, None, MetricType::Counter)?,
        )
    }

    fn gauge<V>(&mut self, name: &str, help: &str, value: V) -> fmt::Result
    where
        ConstGauge<V>: EncodeMetric,
    {
        let metric = ConstGauge::new(value);
        metric.encode(
            self.enc
                .encode_descriptor(name, help, None, MetricType::Gauge)?,
        )
    }

    /// A family with one label: a sample per `(label value, sample value)`.
    fn labelled<M: EncodeMetric>(
        &mut self,
        name: &str,
        help: &str,
        kind: MetricType,
        label: &str,
        samples: impl IntoIterator<Item = (String, M)>,
    ) -> fmt::Result {
        let mut family = self.enc.encode_descriptor(name, help, None, kind)?;
        for (value, metric) in samples {
            let labels = [(label, value)];
            metric.encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

impl Collector for StatusCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let s = &self.0;
        let mut f = Family { enc: &mut enc };
        let build = [
            ("version", env!("CARGO_PKG_VERSION").to_string()),
            ("backend", s.backend()),
        ];
        ConstGauge::new(1i64).encode(
            f.enc
                .encode_descriptor(
                    "flanneld_build_info",
                    "Version and backend of this flanneld-rs.",
                    None,
                    MetricType::Gauge,
                )?
                .encode_family(&build)?,
        )?;
        let lease = s.lease();
        f.labelled(
            "flanneld_lease_info",
            "The subnet leased by this node.",
            MetricType::Gauge,
            "subnet",
            lease
                .iter()
                .map(|l| (l.subnet.clone(), ConstGauge::new(1i64))),
        )?;
        let expiry = lease
            .as_ref()
            .and_then(|l| l.expires.duration_since(UNIX_EPOCH).ok())
            .map_or(0.0, |d| d.as_secs_f64());
        f.gauge(
            "flanneld_lease_expiry_timestamp_seconds",
            "When our lease expires unless renewed.",
            expiry,
        )?;
        f.gauge(
            "flanneld_peers",
            "Other nodes' leases programmed into the backend.",
            s.peers.load(Ordering::Relaxed) as i64,
        )?;
        f.gauge(
            "flanneld_healthy",
            "1 while the lease is held and the backend runs.",
            i64::from(s.health().is_ok()),
        )?;
        f.labelled(
            "flanneld_leases_refused",
            "Peers' leases kept from the backend, by reason (other_backend is Flannel's ordinary skip).",
            MetricType::Counter,
            "reason",
            Refusal::KINDS
                .iter()
                .zip(&s.refused)
                .map(|(k, c)| (k.to_string(), ConstCounter::new(load(c)))),
        )?;
        f.counter(
            "flanneld_lease_rewrites",
            "Times another writer changed our lease key and we put ours back.",
            load(&s.lease_rewrites),
        )?;
        f.counter(
            "flanneld_repairs",
            "Routes, neighbours, FDB entries, devices and rule sets of ours restored after being removed.",
            load(&s.repairs),
        )?;
        f.counter(
            "flanneld_stale_routes_removed",
            "Routes of ours removed because neither the backend nor a lease justified them.",
            load(&s.stale_routes_removed),
        )?;
        let probes = s.probes();
        let probed = || probes.iter().filter(|v| v.state != State::NotProbed);
        f.labelled(
            "flanneld_peer_reachable",
            "1 while the peer answers health probes, 0 once they go unanswered (peers that never answered, e.g. Go Flannel nodes, are not listed).",
            MetricType::Gauge,
            "peer",
            probed().map(|v| (v.key.clone(), ConstGauge::new(i64::from(v.state == State::Up)))),
        )?;
        f.labelled(
            "flanneld_peer_rtt_seconds",
            "Round trip of the last answered health probe.",
            MetricType::Gauge,
            "peer",
            probed().filter_map(|v| Some((v.key.clone(), ConstGauge::new(v.rtt?.as_secs_f64())))),
        )?;
        f.labelled(
            "flanneld_peer_probe_loss_ratio",
            "Health probes lost over the last rounds.",
            MetricType::Gauge,
            "peer",
            probed().filter_map(|v| Some((v.key.clone(), ConstGauge::new(v.loss?)))),
        )?;
        f.labelled(
            "flanneld_peer_path_mtu_bytes",
            "The largest probed packet size that reached the peer (the pod MTU when all is well).",
            MetricType::Gauge,
            "peer",
            probed()
                .filter_map(|v| Some((v.key.clone(), ConstGauge::new(i64::from(v.mtu_passes?))))),
        )?;
        f.labelled(
            "flanneld_peer_path_mtu_problem",
            "1 while full-size (pod MTU) probes are lost and small ones pass.",
            MetricType::Gauge,
            "peer",
            probed().map(|v| {
                (
                    v.key.clone(),
                    ConstGauge::new(i64::from(v.mtu_fails.is_some())),
                )
            }),
        )?;
        let h = &s.health;
        f.labelled(
            "flanneld_health_probes",
            "Health probe datagrams: sent, send_failed (no room in the socket), answered (peers' probes we answered), answer_failed (no room for the answer), refused (a probe from no peer's address), looped (our own probe come back: a peer address that is ours too), reply_refused (an answer with an unknown or expired nonce, or from another address than probed), no_responder (our probe met ICMP port unreachable: nothing listens there), malformed.",
            MetricType::Counter,
            "kind",
            [
                ("sent", &h.sent),
                ("send_failed", &h.send_failed),
                ("answered", &h.answered),
                ("answer_failed", &h.answer_failed),
                ("refused", &h.refused),
                ("looped", &h.looped),
                ("reply_refused", &h.reply_refused),
                ("no_responder", &h.no_responder),
                ("malformed", &h.malformed),
            ]
            .into_iter()
            .map(|(k, c)| (k.to_string(), ConstCounter::new(load(c)))),
        )?;
        if let Some(r) = s.registry_stats() {
            for (name, help, c) in [
                ("flanneld_etcd_errors", "Failed etcd requests.", &r.etcd_errors),
                (
                    "flanneld_etcd_watch_restarts",
                    "Lease watch re-lists after a broken or compacted stream.",
                    &r.watch_restarts,
                ),
                (
                    "flanneld_malformed_leases",
                    "Lease values that did not parse (skipped).",
                    &r.malformed_leases,
                ),
                (
                    "flanneld_etcd_resets",
                    "Listings that found etcd wiped or replaced (new cluster ID or revision gone back).",
                    &r.etcd_resets,
                ),
                (
                    "flanneld_lease_renewals",
                    "Successful lease renewals.",
                    &r.lease_renewals,
                ),
            ] {
                f.counter(name, help, load(c))?;
            }
        }
        if let Some(d) = s.datapath_stats() {
            let by_direction = |tx: &AtomicU64, rx: &AtomicU64| {
                [
                    ("tx".to_string(), ConstCounter::new(load(tx))),
                    ("rx".to_string(), ConstCounter::new(load(rx))),
                ]
            };
            for (name, help, tx, rx) in [
                (
                    "flanneld_datapath_packets",
                    "Inner packets moved by the datapath.",
                    &d.tx_packets,
                    &d.rx_packets,
                ),
                (
                    "flanneld_datapath_bytes",
                    "Inner bytes moved by the datapath.",
                    &d.tx_bytes,
                    &d.rx_bytes,
                ),
                (
                    "flanneld_datapath_syscalls",
                    "Packet I/O system calls (packets / syscalls = batch size).",
                    &d.tx_syscalls,
                    &d.rx_syscalls,
                ),
            ] {
                f.labelled(
                    name,
                    help,
                    MetricType::Counter,
                    "direction",
                    by_direction(tx, rx),
                )?;
            }
            f.gauge(
                "flanneld_datapath_peers",
                "Peers in the table the packet threads route by.",
                load(&d.peers) as i64,
            )?;
            f.counter(
                "flanneld_datapath_table_updates",
                "Times the packet threads' peer table was replaced.",
                load(&d.table_updates),
            )?;
            f.labelled(
                "flanneld_datapath_drops",
                "Packets dropped, by reason.",
                MetricType::Counter,
                "reason",
                DropReason::ALL
                    .iter()
                    .map(|r| (r.to_string(), ConstCounter::new(d.drops(*r)))),
            )?;
        }
        if let Some(p) = s.policy.get() {
            encode_policy(&mut f, &p.stats)?;
        }
        Ok(())
    }
}

/// NetworkPolicy: drops by direction, refused records, and what programming costs.
fn encode_policy(f: &mut Family<'_, '_>, p: &crate::policy::PolicyStats) -> fmt::Result {
    f.labelled(
        "flanneld_policy_denied_packets",
        "Packets dropped by NetworkPolicy on this node, by direction (new connections only).",
        MetricType::Counter,
        "direction",
        [
            ("ingress".to_string(), ConstCounter::new(load(&p.denied_in))),
            ("egress".to_string(), ConstCounter::new(load(&p.denied_out))),
        ],
    )?;
    f.labelled(
        "flanneld_policy_isolated_pods",
        "Addresses of this node's pods isolated by a policy, by direction.",
        MetricType::Gauge,
        "direction",
        [
            (
                "ingress".to_string(),
                ConstGauge::new(load(&p.isolated_in) as i64),
            ),
            (
                "egress".to_string(),
                ConstGauge::new(load(&p.isolated_out) as i64),
            ),
        ],
    )?;
    f.counter(
        "flanneld_policy_rejected_objects",
        "Policy, namespace and pod records refused (bad JSON, key mismatch, invalid spec).",
        load(&p.rejected),
    )?;
    f.counter(
        "flanneld_policy_programs",
        "Times the policy table was brought up to date.",
        load(&p.programs),
    )?;
    f.gauge(
        "flanneld_policy_programming_seconds_sum",
        "Time spent bringing the table up to date, in all, from each change's arrival to nft's return.",
        load(&p.programming_us) as f64 / 1e6,
    )?;
    f.gauge(
        "flanneld_policy_last_programming_seconds",
        "How long the last update took, from its arrival to its rules being in force.",
        load(&p.last_programming_us) as f64 / 1e6,
    )?;
    f.counter(
        "flanneld_policy_nft_operations",
        "Rules, set elements, map entries, sets and chains written to the kernel.",
        load(&p.operations),
    )?;
    f.counter(
        "flanneld_policy_failures",
        "nft runs that failed (the table is then written whole).",
        load(&p.failures),
    )
}

#[cfg(test)]
mod tests {
    use super::super::tests::held;
    use super::*;
    use encap::stats::Stats;

    fn status() -> Arc<Status> {
        let s = Arc::new(Status::default());
        s.set_lease(Some(&held(60)));
        let stats = Arc::new(Stats::default());
        stats.count_drop(DropReason::SpoofedSource, 3);
        s.set_sources("udp", Arc::default(), Some(stats));
        s
    }

    #[tokio::test]
    async fn prometheus_text_keeps_every_name() {
        let (content_type, text) = render(&registry(status()), "*/*");
        assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
        for line in [
            "flanneld_lease_info{subnet=\"10.244.3.0-24\"} 1",
            "flanneld_datapath_drops_total{reason=\"spoofed_source\"} 3",
            "# TYPE flanneld_etcd_errors_total counter",
            "# HELP flanneld_etcd_errors_total Failed etcd requests.",
            "# TYPE flanneld_build_info gauge",
            "flanneld_peers 0",
            "flanneld_datapath_packets_total{direction=\"tx\"} 0",
            "flanneld_leases_refused_total{reason=\"other_backend\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        assert!(!text.contains("# EOF"), "{text}");
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let value = line.rsplit(' ').next().unwrap_or("");
            assert!(value.parse::<f64>().is_ok(), "bad sample line {line:?}");
        }
    }

    /// Every family and sample name of the exposition as it was rendered by hand before the
    /// move to prometheus-client (dashboards are built on these).
    #[tokio::test]
    async fn family_names_are_the_ones_scraped_before() {
        let (_, text) = render(&registry(status()), "");
        let mut types: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .collect();
        types.sort_unstable();
        let mut want = vec![
            "flanneld_build_info gauge",
            "flanneld_lease_info gauge",
            "flanneld_lease_expiry_timestamp_seconds gauge",
            "flanneld_peers gauge",
            "flanneld_healthy gauge",
            "flanneld_leases_refused_total counter",
            "flanneld_lease_rewrites_total counter",
            "flanneld_repairs_total counter",
            "flanneld_stale_routes_removed_total counter",
            "flanneld_etcd_errors_total counter",
            "flanneld_etcd_watch_restarts_total counter",
            "flanneld_malformed_leases_total counter",
            "flanneld_etcd_resets_total counter",
            "flanneld_lease_renewals_total counter",
            "flanneld_datapath_packets_total counter",
            "flanneld_datapath_bytes_total counter",
            "flanneld_datapath_syscalls_total counter",
            "flanneld_datapath_peers gauge",
            "flanneld_datapath_table_updates_total counter",
            "flanneld_datapath_drops_total counter",
            // Added with per-peer health probes.
            "flanneld_peer_reachable gauge",
            "flanneld_peer_rtt_seconds gauge",
            "flanneld_peer_probe_loss_ratio gauge",
            "flanneld_peer_path_mtu_bytes gauge",
            "flanneld_peer_path_mtu_problem gauge",
            "flanneld_health_probes_total counter",
        ];
        want.sort_unstable();
        assert_eq!(types, want);
    }

    #[test]
    fn prometheus_keeps_the_text_format() {
        // Prometheus 2.x and 3.x scrape Accept headers: both list text/plain.
        for accept in [
            "application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2",
            "application/openmetrics-text; version=0.0.1,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
            "",
            "*/*",
        ] {
            assert!(!openmetrics_only(accept), "{accept}");
        }
        assert!(openmetrics_only(
            "application/openmetrics-text;version=1.0.0"
        ));
        assert!(openmetrics_only(
            "application/openmetrics-text;version=1.0.0,text/plain;q=0"
        ));
    }

    #[tokio::test]
    async fn openmetrics_when_nothing_else_is_taken() {
        let (content_type, text) = render(
            &registry(status()),
            "application/openmetrics-text;version=1.0.0",
        );
        assert!(content_type.starts_with("application/openmetrics-text"));
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert!(
            text.contains("flanneld_datapath_drops_total{reason=\"spoofed_source\"} 3"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn label_values_are_escaped() {
        let s = Arc::new(Status::default());
        s.set_sources("a\"b\\c\nd", Arc::default(), None);
        let (_, text) = render(&registry(s), "");
        assert!(
            text.contains(r#"backend="a\"b\\c\nd""#),
            "a hostile value must not break the exposition:\n{text}"
        );
    }
}
