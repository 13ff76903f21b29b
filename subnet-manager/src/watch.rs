//! Following every node's lease: list with a revision, watch from the next one, and on a
//! compacted revision or a broken stream list again and report only what changed.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use etcd_client::{EventType, WatchOptions};
use tokio::sync::mpsc;

use crate::lease::{Lease, LeaseError, SubnetKey};
use crate::registry::{LeaseList, Registry, RegistryError, RegistryStats};
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

    /// Replaces the whole set, returning removals first, then additions and changes. A key
    /// whose value is now unreadable keeps what we had for it, as a watched put of such a value
    /// does (`Leases::apply`): whether a careless write shows as a deletion must not depend on
    /// whether the watch restarted since (for our own key, a deletion means moving subnet).
    fn resync(&mut self, list: &LeaseList) -> Vec<LeaseEvent> {
        let fresh: HashMap<&SubnetKey, &Lease> = list.leases.iter().map(|l| (&l.key, l)).collect();
        let gone: Vec<SubnetKey> = self
            .0
            .keys()
            .filter(|k| !fresh.contains_key(k) && !list.unreadable.contains(k))
            .cloned()
            .collect();
        let mut events: Vec<LeaseEvent> = gone.iter().filter_map(|k| self.remove(k)).collect();
        events.extend(list.leases.iter().filter_map(|l| self.put(l.clone())));
        events
    }
}

/// How often an idle watch asks etcd for a progress report, and how long it waits for any
/// answer before it takes the stream for dead. A stream can die without an error reaching us
/// (seen after etcd restarts); an answered progress request also carries the store's revision
/// and cluster ID, which is how a wipe (revisions from 1 again, a new ID) shows on a quiet
/// watch that would otherwise wait forever for a revision the new etcd has not reached.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
const PROGRESS_DEADLINE: Duration = Duration::from_secs(2);
/// Starting a watch is one round trip; past this the attempt is abandoned and retried.
const START_TIMEOUT: Duration = Duration::from_secs(5);
/// Re-list back-off: short, so a node learns what changed within about a second of etcd's
/// return (a list is one cheap read), long enough not to spin while etcd is away.
const RELIST_MIN: Duration = Duration::from_millis(100);
const RELIST_MAX: Duration = Duration::from_secs(1);

/// Starts the watch task. Each message is a batch of events that arrived together; the first
/// one after (re)connecting holds the whole difference from what was known before.
pub fn spawn(registry: Registry) -> mpsc::Receiver<Vec<LeaseEvent>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(run(registry, Leases::default(), tx));
    rx
}

/// What one followed prefix needs besides the list-and-watch machinery, which is shared:
/// the leases (`Leases`) and the policy records (`Records`) go through the same resilience.
pub trait Keyspace: Send + 'static {
    /// What the receiver gets for one listing or one watch response.
    type Batch: Send + 'static;
    /// For logs: "lease", "policy record".
    const WHAT: &'static str;
    fn prefix(&self, registry: &Registry) -> String;
    /// Lists the prefix: (store revision, cluster ID, the batch holding what changed since the
    /// last listing or watch event), or the error.
    fn list(
        &mut self,
        registry: &Registry,
    ) -> impl std::future::Future<Output = Result<(i64, u64, Option<Self::Batch>), RegistryError>> + Send;
    /// The batch for one watch response (`None`: nothing worth sending).
    fn apply(
        &mut self,
        registry: &Registry,
        resp: &etcd_client::WatchResponse,
    ) -> Option<Self::Batch>;
}

/// Subnet leases, parsed, as `LeaseEvent`s.
#[derive(Default)]
pub struct Leases {
    known: Known,
    /// The malformed entries already logged: a re-list (after each etcd restart, compaction
    /// or broken stream) does not log them all again.
    said: HashSet<String>,
}

impl Leases {
    /// The errors of a listing not logged before; from now on these are the ones logged (one
    /// mended and broken again is logged again).
    fn not_said(&mut self, errors: &[LeaseError]) -> Vec<String> {
        let now: HashSet<String> = errors.iter().map(ToString::to_string).collect();
        let mut new: Vec<String> = now.difference(&self.said).cloned().collect();
        new.sort();
        self.said = now;
        new
    }
}

impl Keyspace for Leases {
    type Batch = Vec<LeaseEvent>;
    const WHAT: &'static str = "lease";

    fn prefix(&self, registry: &Registry) -> String {
        registry.subnets_prefix()
    }

    async fn list(
        &mut self,
        registry: &Registry,
    ) -> Result<(i64, u64, Option<Self::Batch>), RegistryError> {
        let list = registry.list_leases().await?;
        for bad in self.not_said(&list.malformed) {
            tracing::error!("skipping malformed lease: {bad}");
        }
        let events = self.known.resync(&list);
        Ok((
            list.revision,
            list.cluster_id,
            (!events.is_empty()).then_some(events),
        ))
    }

    fn apply(
        &mut self,
        registry: &Registry,
        resp: &etcd_client::WatchResponse,
    ) -> Option<Self::Batch> {
        let mut batch = Vec::new();
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            let key = String::from_utf8_lossy(kv.key());
            let event = match ev.event_type() {
                EventType::Put => match Lease::parse(registry.prefix(), &key, kv.value()) {
                    None => None,
                    Some(Ok(lease)) => self.known.put(lease),
                    Some(Err(e)) => {
                        RegistryStats::bump(&registry.stats.malformed_leases);
                        tracing::error!(
                            "skipping malformed lease (keeping what we had for it): {e}"
                        );
                        self.said.insert(e.to_string());
                        None
                    }
                },
                EventType::Delete => match SubnetKey::from_key(registry.prefix(), &key) {
                    Some(Ok(subnet)) => self.known.remove(&subnet),
                    _ => None,
                },
            };
            batch.extend(event);
        }
        (!batch.is_empty()).then_some(batch)
    }
}

/// A raw key change under a followed prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RawEvent {
    Put {
        key: String,
        value: Vec<u8>,
        revision: i64,
    },
    Delete {
        key: String,
        revision: i64,
    },
}

/// What `Records` sends: the changes, and the store revision they bring us up to. Sent also
/// with no changes (watch progress), so a receiver knows how current it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawBatch {
    pub events: Vec<RawEvent>,
    pub revision: i64,
}

/// Any prefix, unparsed: the receiver checks the values (policy records).
pub struct Records {
    prefix: String,
    /// Each key's value as last seen, by digest and revision (the revision alone would miss a
    /// different value at the same revision after a wipe): what a re-list compares with,
    /// without keeping every value whole, however large, in memory.
    known: HashMap<String, (u64, i64)>,
}

/// A value's digest, to tell a changed value from the one seen before.
fn digest(value: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    value.hash(&mut h);
    h.finish()
}

impl Records {
    pub fn new(prefix: String) -> Self {
        Records {
            prefix,
            known: HashMap::new(),
        }
    }
}

impl Keyspace for Records {
    type Batch = RawBatch;
    const WHAT: &'static str = "policy record";

    fn prefix(&self, _: &Registry) -> String {
        self.prefix.clone()
    }

    async fn list(
        &mut self,
        registry: &Registry,
    ) -> Result<(i64, u64, Option<Self::Batch>), RegistryError> {
        let list = registry.get_prefix(&self.prefix).await?;
        let fresh: HashMap<&str, &crate::registry::RawKv> =
            list.kvs.iter().map(|kv| (kv.key.as_str(), kv)).collect();
        let mut events: Vec<RawEvent> = self
            .known
            .keys()
            .filter(|k| !fresh.contains_key(k.as_str()))
            .map(|k| RawEvent::Delete {
                key: k.clone(),
                revision: list.revision,
            })
            .collect();
        self.known.retain(|k, _| fresh.contains_key(k.as_str()));
        for kv in &list.kvs {
            let seen = (digest(&kv.value), kv.mod_revision);
            if self.known.get(&kv.key) != Some(&seen) {
                self.known.insert(kv.key.clone(), seen);
                events.push(RawEvent::Put {
                    key: kv.key.clone(),
                    value: kv.value.clone(),
                    revision: kv.mod_revision,
                });
            }
        }
        Ok((
            list.revision,
            list.cluster_id,
            Some(RawBatch {
                events,
                revision: list.revision,
            }),
        ))
    }

    fn apply(&mut self, _: &Registry, resp: &etcd_client::WatchResponse) -> Option<Self::Batch> {
        let mut events = Vec::new();
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            match ev.event_type() {
                EventType::Put => {
                    self.known
                        .insert(key.clone(), (digest(kv.value()), kv.mod_revision()));
                    events.push(RawEvent::Put {
                        key,
                        value: kv.value().to_vec(),
                        revision: kv.mod_revision(),
                    });
                }
                EventType::Delete => {
                    if self.known.remove(&key).is_some() {
                        events.push(RawEvent::Delete {
                            key,
                            revision: kv.mod_revision(),
                        });
                    }
                }
            }
        }
        let revision = resp.header().map(|h| h.revision()).unwrap_or_default();
        Some(RawBatch { events, revision })
    }
}

/// Follows a raw prefix (policy records) with the leases' resilience.
pub fn spawn_records(registry: Registry, prefix: String) -> mpsc::Receiver<RawBatch> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(run(registry, Records::new(prefix), tx));
    rx
}

/// Which etcd we last saw, so a wiped or replaced one is noticed and said.
#[derive(Default)]
struct Seen {
    cluster_id: u64,
    revision: i64,
}

impl Seen {
    /// Records a listing; returns why it differs from the etcd seen before, if it does.
    fn update(&mut self, cluster_id: u64, revision: i64) -> Option<String> {
        let why = if self.cluster_id != 0 && cluster_id != 0 && cluster_id != self.cluster_id {
            Some(format!(
                "etcd's cluster ID changed from {:x} to {cluster_id:x}: etcd was wiped or replaced",
                self.cluster_id
            ))
        } else if revision < self.revision {
            Some(format!(
                "etcd's revision went back from {} to {revision}: etcd was wiped or restored",
                self.revision
            ))
        } else {
            None
        };
        if cluster_id != 0 {
            self.cluster_id = cluster_id;
        }
        self.revision = revision;
        why
    }
}

async fn run<K: Keyspace>(registry: Registry, mut keys: K, tx: mpsc::Sender<K::Batch>) {
    let mut seen = Seen::default();
    let mut backoff = Backoff::new(RELIST_MIN, RELIST_MAX);
    // The last listing failure logged: while etcd stays away, the same one each second is
    // not logged again (the etcd_errors metric counts them all).
    let mut failing: Option<String> = None;
    loop {
        let (revision, cluster_id, batch) = match keys.list(&registry).await {
            Ok(list) => list,
            Err(e) => {
                let delay = backoff.next_delay();
                let msg = e.to_string();
                if failing.as_ref() != Some(&msg) {
                    tracing::warn!(
                        retry_in_ms = delay.as_millis() as u64,
                        "listing {}s failed: {msg} (retrying; the same failure is not logged again)",
                        K::WHAT
                    );
                    failing = Some(msg);
                }
                tokio::time::sleep(delay).await;
                continue;
            }
        };
        if failing.take().is_some() {
            tracing::info!("listing {}s works again", K::WHAT);
        }
        if let Some(why) = seen.update(cluster_id, revision) {
            RegistryStats::bump(&registry.stats.etcd_resets);
            tracing::warn!("{why}; every {} is taken from the new listing", K::WHAT);
        }
        if let Some(batch) = batch {
            if tx.send(batch).await.is_err() {
                return;
            }
        }
        let mut watch = Follow {
            registry: &registry,
            keys: &mut keys,
            tx: &tx,
            backoff: &mut backoff,
            cluster_id,
            listed_revision: revision,
        };
        match watch.follow().await {
            Ok(()) => return, // the receiver is gone: the daemon is shutting down
            Err(why) => {
                RegistryStats::bump(&registry.stats.watch_restarts);
                let delay = backoff.next_delay();
                tracing::warn!(
                    retry_in_ms = delay.as_millis() as u64,
                    "{} watch interrupted ({why}); listing again",
                    K::WHAT
                );
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// One watch stream, from the revision after a listing until it breaks.
struct Follow<'a, K: Keyspace> {
    registry: &'a Registry,
    keys: &'a mut K,
    tx: &'a mpsc::Sender<K::Batch>,
    backoff: &'a mut Backoff,
    cluster_id: u64,
    listed_revision: i64,
}

impl<K: Keyspace> Follow<'_, K> {
    /// Applies watch events until the stream breaks or goes quiet past the progress deadline
    /// (`Err` with the reason), or the receiver is gone (`Ok`).
    async fn follow(&mut self) -> Result<(), String> {
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(self.listed_revision + 1);
        let prefix = self.keys.prefix(self.registry);
        let mut client = self.registry.client();
        let start = client.watch(prefix.as_str(), Some(opts));
        let stream = match tokio::time::timeout(START_TIMEOUT, start).await {
            Ok(r) => r.map_err(|e| format!("starting the watch: {e}"))?,
            Err(_) => {
                return Err(format!(
                    "starting the watch: no answer in {} s",
                    START_TIMEOUT.as_secs()
                ))
            }
        };
        let (mut requests, mut responses) = stream.split();
        let mut ticker = tokio::time::interval(PROGRESS_EVERY);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // When the oldest progress request still unanswered was sent.
        let mut waiting_since: Option<tokio::time::Instant> = None;
        loop {
            let resp = tokio::select! {
                msg = responses.message() => match msg {
                    Ok(Some(resp)) => resp,
                    Ok(None) => return Err("stream closed by etcd".into()),
                    Err(e) => return Err(format!("stream error: {e}")),
                },
                _ = ticker.tick() => {
                    let now = tokio::time::Instant::now();
                    match waiting_since {
                        Some(t) if now - t >= PROGRESS_DEADLINE => {
                            return Err(format!(
                                "no answer from etcd on the watch stream for {} s",
                                (now - t).as_secs()
                            ));
                        }
                        Some(_) => {}
                        None => waiting_since = Some(now),
                    }
                    requests
                        .request_progress()
                        .await
                        .map_err(|e| format!("asking for watch progress: {e}"))?;
                    continue;
                }
            };
            waiting_since = None;
            self.check_header(&resp)?;
            if resp.compact_revision() != 0 {
                return Err(format!(
                    "revision compacted up to {}",
                    resp.compact_revision()
                ));
            }
            if resp.canceled() {
                return Err(format!("watch canceled: {}", resp.cancel_reason()));
            }
            self.backoff.reset();
            if let Some(batch) = self.keys.apply(self.registry, &resp) {
                if self.tx.send(batch).await.is_err() {
                    return Ok(());
                }
            }
        }
    }

    /// A response from another cluster, or with a store revision below what we listed, means
    /// etcd was wiped or replaced under a stream that kept going: list again.
    fn check_header(&self, resp: &etcd_client::WatchResponse) -> Result<(), String> {
        let Some(h) = resp.header() else {
            return Ok(());
        };
        if self.cluster_id != 0 && h.cluster_id() != 0 && h.cluster_id() != self.cluster_id {
            return Err(format!(
                "etcd's cluster ID changed from {:x} to {:x}",
                self.cluster_id,
                h.cluster_id()
            ));
        }
        if h.revision() != 0 && h.revision() < self.listed_revision {
            return Err(format!(
                "etcd's revision is {}, below the {} we listed at",
                h.revision(),
                self.listed_revision
            ));
        }
        Ok(())
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
    fn malformed_entries_are_logged_once_across_relists() {
        let bad = |k: &str| LeaseError::Key {
            key: k.into(),
            reason: "junk".into(),
        };
        let mut leases = Leases::default();
        assert_eq!(leases.not_said(&[bad("a"), bad("b")]).len(), 2);
        assert!(leases.not_said(&[bad("a"), bad("b")]).is_empty());
        // b mended, c new: only c; b broken again later: b again.
        assert_eq!(leases.not_said(&[bad("a"), bad("c")]).len(), 1);
        assert_eq!(leases.not_said(&[bad("a"), bad("b"), bad("c")]).len(), 1);
    }

    #[test]
    fn a_key_turned_unreadable_keeps_its_lease_on_resync_too() {
        let mut known = Known::default();
        let a = lease("10.244.1.0-24", "192.168.1.1");
        let b = lease("10.244.2.0-24", "192.168.1.2");
        known.resync(&list(vec![a.clone(), b.clone()]));
        // b's value is garbage now: kept, as the watch keeps it; a deleted: removed.
        let garbled = LeaseList {
            unreadable: vec![b.key.clone()],
            ..LeaseList::default()
        };
        assert_eq!(known.resync(&garbled), vec![LeaseEvent::Removed(a)]);
        // Readable again with another value: a change.
        let b2 = lease("10.244.2.0-24", "192.168.1.22");
        assert_eq!(
            known.resync(&list(vec![b2.clone()])),
            vec![LeaseEvent::Added(b2)]
        );
    }

    #[test]
    fn a_wiped_or_replaced_etcd_is_noticed() {
        let mut seen = Seen::default();
        assert_eq!(seen.update(0xaa, 10), None);
        assert_eq!(seen.update(0xaa, 12), None);
        let why = seen.update(0xbb, 3).expect("new cluster");
        assert!(why.contains("cluster ID changed from aa to bb"), "{why}");
        let why = seen.update(0xbb, 1).expect("revision went back");
        assert!(why.contains("went back from 3 to 1"), "{why}");
        assert_eq!(seen.update(0xbb, 5), None);
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
