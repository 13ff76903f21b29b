//! The control loop: policy records in (batches from the watch), checked objects into the
//! world, the world compiled for our pods, and only the difference from what the kernel holds
//! written to it. Bursts are taken whole: every batch already queued is applied before one
//! compile, so a thousand writes cost one transaction, not a thousand.

use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use netpol::compile::Ruleset;
use netpol::object::{self, ObjectKey};
use netpol::{compile, nft, World};
use subnet_manager::watch::{RawBatch, RawEvent};
use tokio::sync::mpsc;

use super::{kernel, Policy};

/// After a failed `nft` run the whole table is written again after this pause.
const RETRY: Duration = Duration::from_secs(1);

pub async fn run(policy: Arc<Policy>, mut records: mpsc::Receiver<RawBatch>) {
    let mut world = World::new();
    // What the kernel holds; None: unknown (at start, after a failed run), so the next
    // update writes the table whole.
    let mut installed: Option<Ruleset> = None;
    let mut bridge_hooks_warned = false;
    let mut pending_retry = false;
    // The last failure logged, so that a lasting one is logged once.
    let mut last_failure: Option<String> = None;
    // The newest revision applied to `world`: kept across failed attempts, so the retry that
    // lands reports the batches those attempts drained.
    let mut revision = policy.revision();
    let mut subnet = policy.subnet.subscribe();
    // Nothing is written before the first listing arrives: until then the world is empty, and
    // writing it would remove the table kept across a restart.
    let mut listed = false;
    loop {
        let wait = async {
            tokio::select! {
                b = records.recv() => b.map(Wake::Records).unwrap_or(Wake::Closed),
                r = subnet.changed() => match r {
                    Ok(()) => Wake::Subnet,
                    Err(_) => Wake::Closed,
                },
            }
        };
        let woke = if pending_retry {
            tokio::time::timeout(RETRY, wait)
                .await
                .unwrap_or(Wake::Retry)
        } else {
            wait.await
        };
        let started = Instant::now();
        // The first pass always writes: a table left by an earlier run (kept on purpose, so
        // pods stay isolated across a restart) is replaced, or removed when no pod of ours
        // is isolated any more, even when etcd holds no record at all.
        let mut changed = pending_retry || installed.is_none();
        let mut batches = Vec::new();
        match woke {
            Wake::Closed => return,
            Wake::Records(b) => batches.push(b),
            Wake::Subnet => {
                // Seen now, even if nothing is written yet (else `changed()` fires again at once).
                subnet.mark_unchanged();
                changed = true;
            }
            Wake::Retry => {}
        }
        while let Ok(more) = records.try_recv() {
            batches.push(more);
        }
        for batch in batches {
            listed = true;
            revision = revision.max(batch.revision);
            for ev in batch.events {
                changed |= apply(&policy, &mut world, ev);
            }
        }
        if changed && listed {
            let local = subnet.borrow_and_update().locality.clone();
            let rules = compile::compile_for(&world, &local);
            if !rules.is_empty() {
                kernel::ensure_bridge_hooks(&mut bridge_hooks_warned);
            }
            let script = match &installed {
                Some(old) => nft::diff(old, &rules),
                None => nft::full(&rules),
            };
            match kernel::apply(&script.text).await {
                Ok(()) => {
                    pending_retry = false;
                    if last_failure.take().is_some() {
                        tracing::info!("the policy table is written again");
                    }
                    let s = &policy.stats;
                    s.operations
                        .fetch_add(script.operations as u64, Ordering::Relaxed);
                    s.isolated_in.store(
                        rules.isolated(netpol::world::Direction::Ingress) as u64,
                        Ordering::Relaxed,
                    );
                    s.isolated_out.store(
                        rules.isolated(netpol::world::Direction::Egress) as u64,
                        Ordering::Relaxed,
                    );
                    installed = Some(rules);
                    if script.operations > 0 {
                        tracing::debug!(
                            operations = script.operations,
                            revision,
                            "policy rules updated"
                        );
                    }
                }
                // Nothing to enforce on a node without nft: its pods are not isolated
                // anyway. Any other failure to remove the table is retried like any failed
                // write: the table left behind would keep isolating addresses that new pods,
                // selected by nothing, may reuse.
                Err(e) if rules.is_empty() && kernel::nft_missing(&e) => {
                    tracing::debug!("no policy table to remove: {e:#}");
                    installed = Some(rules);
                    pending_retry = false;
                }
                Err(e) => {
                    policy.stats.failures.fetch_add(1, Ordering::Relaxed);
                    // Logged when it first fails (and when the reason changes), not at every
                    // retry: a lasting failure would otherwise log every second.
                    let why = format!("{e:#}");
                    if last_failure.as_ref() != Some(&why) {
                        tracing::error!(
                            "programming the policy table: {why}; writing it whole every {} s until it works",
                            RETRY.as_secs()
                        );
                        last_failure = Some(why);
                    }
                    installed = None;
                    pending_retry = true;
                    // With nothing to enforce, no pod waits on the removal being retried: a
                    // pod's ADD would otherwise hang 5 s and leave its record pending.
                    if rules.is_empty() {
                        policy.programmed.send_replace(revision);
                    }
                    continue;
                }
            }
            *policy.world.lock().unwrap_or_else(PoisonError::into_inner) = Arc::new(world.clone());
            let us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
            let s = &policy.stats;
            s.programs.fetch_add(1, Ordering::Relaxed);
            s.programming_us.fetch_add(us, Ordering::Relaxed);
            s.last_programming_us.store(us, Ordering::Relaxed);
        }
        policy.programmed.send_replace(revision);
    }
}

/// Longest key `GET /v1/policy/status` lists a rejected record under.
const LISTED_KEY_MAX: usize = 256;

/// `rel` as the rejected records are listed: itself when short, else its first characters
/// and a hash of the whole (still one entry per key, so a later valid write clears it).
fn listed_key(rel: &str) -> String {
    if rel.len() <= LISTED_KEY_MAX {
        return rel.to_string();
    }
    format!("{}#{:016x}", netpol::clip(rel), netpol::fnv(rel))
}

/// What woke the engine.
enum Wake {
    Records(RawBatch),
    /// Our lease's subnet changed: other pods are ours to isolate.
    Subnet,
    /// The pause after a failed `nft` run ended.
    Retry,
    /// The watch or the daemon is gone.
    Closed,
}

/// Applies one record change; returns whether the world changed.
fn apply(policy: &Policy, world: &mut World, ev: RawEvent) -> bool {
    let (key, value, revision) = match ev {
        RawEvent::Put {
            key,
            value,
            revision,
        } => (key, Some(value), revision),
        RawEvent::Delete { key, revision } => (key, None, revision),
    };
    let Some(rel) = key.strip_prefix(&policy.prefix) else {
        return false;
    };
    let Some(okey) = ObjectKey::parse(rel) else {
        return false; // not a kind we read
    };
    // Listed under a key of bounded length: a key any writer chose may be megabytes long.
    let listed = listed_key(rel);
    let rel = listed.as_str();
    let mut rejected = policy
        .rejected
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    match value {
        None => {
            rejected.remove(rel);
            world.apply(&okey, None, revision);
        }
        Some(v) => match object::parse(&okey, &v) {
            Ok(obj) => {
                rejected.remove(rel);
                world.apply(&okey, Some(obj), revision);
            }
            Err(why) => {
                // As an API server refuses an invalid update, the version we had (if any)
                // stays in force; the others are untouched either way. Counted each time,
                // logged once per key and reason (a writer repeating the same bad value
                // must not flood the log); the key is quoted clipped, as any input.
                policy.stats.rejected.fetch_add(1, Ordering::Relaxed);
                let why = why.to_string();
                if rejected.get(rel) != Some(&why) {
                    let key = netpol::clip(&key);
                    tracing::error!(key = ?key, revision, "policy record rejected (keeping what we had for it): {why}");
                }
                rejected.insert(rel.to_string(), why);
                return false;
            }
        },
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejected_records_are_listed_under_bounded_keys() {
        assert_eq!(listed_key("pods/x/a"), "pods/x/a");
        let long = format!("pods/x/{}", "a".repeat(100_000));
        let other = format!("pods/x/{}b", "a".repeat(100_000));
        let (l, o) = (listed_key(&long), listed_key(&other));
        assert!(l.len() < 100, "{} bytes", l.len());
        assert_ne!(l, o, "two keys, two entries");
        assert_eq!(l, listed_key(&long), "one key, one entry");
    }
}
