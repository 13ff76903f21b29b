//! Following every node's lease: list with a revision, watch from the next one, and on a
//! compacted revision or a broken stream list again and report only what changed.

use std::collections::HashMap;
use std::time::Duration;

use etcd_client::{EventType, WatchOptions};
use tokio::sync::mpsc;

use crate::lease::{Lease, SubnetKey};
use crate::registry::{LeaseList, Registry, RegistryStats};
use crate::Backoff;

/// A change to the set of leases in etcd. Our own lease is included; the daemon filters it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseEvent {
    /// A lease appeared or its value changed.
    Added(Lease),
    /// A lease was deleted or expired.
    Removed(Lease),
}

/// The leases as last seen, keyed by subnet, so a re-list yields only the differences.
#[derive(Default)]
struct Known(HashMap<SubnetKey, Lease>);

impl Known {
    fn put(&mut self, lease: Lease) -> Option<LeaseEvent> {
        if self.0.get(&lease.key) == Some(&lease) {
            return None;
        }
        self.0.insert(lease.key.clone(), lease.clone());
        Some(LeaseEvent::Added(lease))
    }

    fn remove(&mut self, key: &SubnetKey) -> Option<LeaseEvent> {
        self.0.remove(key).map(LeaseEvent::Removed)
    }

    /// Replaces the whole set, returning removals first, then additions and changes.
    fn resync(&mut self, list: &LeaseList) -> Vec<LeaseEvent> {
        let fresh: HashMap<&SubnetKey, &Lease> = list.leases.iter().map(|l| (&l.key, l)).collect();
        let gone: Vec<SubnetKey> = self
            .0
            .keys()
            .filter(|k| !fresh.contains_key(k))
            .cloned()
            .collect();
        let mut events: Vec<LeaseEvent> = gone.iter().filter_map(|k| self.remove(k)).collect();
        events.extend(list.leases.iter().filter_map(|l| self.put(l.clone())));
        events
    }
}

/// Starts the watch task. Each message is a batch of events that arrived together; the first
/// one after (re)connecting holds the whole difference from what was known before.
pub fn spawn(registry: Registry) -> mpsc::Receiver<Vec<LeaseEvent>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(run(registry, tx));
    rx
}

async fn run(registry: Registry, tx: mpsc::Sender<Vec<LeaseEvent>>) {
    let mut known = Known::default();
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        let list = match registry.list_leases().await {
            Ok(list) => list,
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!(
                    retry_in_ms = delay.as_millis() as u64,
                    "listing leases failed: {e}"
                );
                tokio::time::sleep(delay).await;
                continue;
            }
        };
        for bad in &list.malformed {
            tracing::error!("skipping malformed lease: {bad}");
        }
        let events = known.resync(&list);
        if !events.is_empty() && tx.send(events).await.is_err() {
            return;
        }
        match follow(&registry, list.revision + 1, &mut known, &tx, &mut backoff).await {
            Ok(()) => return, // the receiver is gone: the daemon is shutting down
            Err(why) => {
                RegistryStats::bump(&registry.stats.watch_restarts);
                let delay = backoff.next_delay();
                tracing::warn!(
                    retry_in_ms = delay.as_millis() as u64,
                    "lease watch interrupted ({why}); listing again"
                );
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Applies watch events until the stream breaks (`Err` with the reason) or the receiver is gone.
async fn follow(
    registry: &Registry,
    from_revision: i64,
    known: &mut Known,
    tx: &mpsc::Sender<Vec<LeaseEvent>>,
    backoff: &mut Backoff,
) -> Result<(), String> {
    let opts = WatchOptions::new()
        .with_prefix()
        .with_start_revision(from_revision);
    let prefix = registry.subnets_prefix();
    let mut stream = registry
        .client()
        .watch(prefix.as_str(), Some(opts))
        .await
        .map_err(|e| format!("starting the watch: {e}"))?;
    loop {
        let resp = match stream.message().await {
            Ok(Some(resp)) => resp,
            Ok(None) => return Err("stream closed by etcd".into()),
            Err(e) => return Err(format!("stream error: {e}")),
        };
        if resp.compact_revision() != 0 {
            return Err(format!(
                "revision compacted up to {}",
                resp.compact_revision()
            ));
        }
        if resp.canceled() {
            return Err(format!("watch canceled: {}", resp.cancel_reason()));
        }
        backoff.reset();
        let mut batch = Vec::new();
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            let key = String::from_utf8_lossy(kv.key());
            let event = match ev.event_type() {
                EventType::Put => match Lease::parse(registry.prefix(), &key, kv.value()) {
                    None => None,
                    Some(Ok(lease)) => known.put(lease),
                    Some(Err(e)) => {
                        RegistryStats::bump(&registry.stats.malformed_leases);
                        tracing::error!(
                            "skipping malformed lease (keeping what we had for it): {e}"
                        );
                        None
                    }
                },
                EventType::Delete => match SubnetKey::from_key(registry.prefix(), &key) {
                    Some(Ok(subnet)) => known.remove(&subnet),
                    _ => None,
                },
            };
            batch.extend(event);
        }
        if !batch.is_empty() && tx.send(batch).await.is_err() {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::LeaseAttrs;

    fn lease(key: &str, ip: &str) -> Lease {
        Lease {
            key: SubnetKey::parse(key).expect("key"),
            attrs: LeaseAttrs {
                public_ip: ip.parse().expect("ip"),
                public_ipv6: None,
                backend_type: Some("host-gw".into()),
                backend_data: None,
                backend_v6_data: None,
            },
        }
    }

    fn list(leases: Vec<Lease>) -> LeaseList {
        LeaseList {
            leases,
            ..LeaseList::default()
        }
    }

    #[test]
    fn resync_reports_only_differences() {
        let mut known = Known::default();
        let a = lease("10.244.1.0-24", "192.168.1.1");
        let b = lease("10.244.2.0-24", "192.168.1.2");
        let b2 = lease("10.244.2.0-24", "192.168.1.22");
        let c = lease("10.244.3.0-24", "192.168.1.3");
        assert_eq!(
            known.resync(&list(vec![a.clone(), b.clone()])),
            vec![LeaseEvent::Added(a.clone()), LeaseEvent::Added(b.clone())]
        );
        // Unchanged a, changed b, new c: a is not reported again.
        assert_eq!(
            known.resync(&list(vec![a.clone(), b2.clone(), c.clone()])),
            vec![LeaseEvent::Added(b2.clone()), LeaseEvent::Added(c.clone())]
        );
        // Everything wiped.
        let mut gone = known.resync(&list(vec![]));
        gone.sort_by_key(|e| format!("{e:?}"));
        assert_eq!(gone.len(), 3);
        assert!(gone.contains(&LeaseEvent::Removed(a)));
    }

    #[test]
    fn repeated_put_is_not_an_event() {
        let mut known = Known::default();
        let a = lease("10.244.1.0-24", "192.168.1.1");
        assert!(known.put(a.clone()).is_some());
        assert!(known.put(a.clone()).is_none());
        assert_eq!(known.remove(&a.key), Some(LeaseEvent::Removed(a.clone())));
        assert_eq!(known.remove(&a.key), None);
    }
}
