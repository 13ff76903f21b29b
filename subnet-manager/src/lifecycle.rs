//! A lease over time: acquire it (Flannel's order, retried on conflicts), keep it renewed, and
//! notice when it is lost.

use std::time::Duration;

use thiserror::Error;
use tokio::time::Instant;

use crate::alloc::{self, Action, AllocError, Identity};
use crate::config::NetworkConfig;
use crate::lease::{LeaseAttrs, SubnetKey};
use crate::registry::{HeldLease, Registry, RegistryError, Renewal};

/// Flannel tries this many times when another node wins the race for the subnet it picked.
const CREATE_ATTEMPTS: usize = 10;
/// Flannel gives up on a lease after this many failed renewals and acquires again.
const RENEW_FAILURES: u32 = 3;

#[derive(Debug, Error)]
pub enum AcquireError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Alloc(#[from] AllocError),
    #[error("gave up after {0} attempts: another node took each subnet we picked first")]
    Contended(usize),
}

/// What we ask for: the config in force, who we are and what we publish.
#[derive(Clone, Debug)]
pub struct LeaseRequest {
    pub config: NetworkConfig,
    pub identity: Identity,
    pub attrs: LeaseAttrs,
    /// The subnet we had before (from subnet.env, or the lease we just lost).
    pub previous: Option<SubnetKey>,
    pub ttl: Duration,
}

/// Acquires a lease: our own existing one, else `previous`, else a random free subnet.
pub async fn acquire(registry: &Registry, req: &LeaseRequest) -> Result<HeldLease, AcquireError> {
    for _ in 0..CREATE_ATTEMPTS {
        let list = registry.list_leases().await?;
        for bad in &list.malformed {
            // The watch logs each once; an attempt repeated every few seconds must not.
            tracing::debug!("ignoring malformed lease while allocating: {bad}");
        }
        let plan = alloc::plan(
            &req.config,
            &list.leases,
            &list.unreadable,
            &req.identity,
            req.previous.as_ref(),
            &mut rand::rng(),
        )?;
        for stale in &plan.delete {
            tracing::info!(subnet = %stale, "deleting our old lease: it no longer fits the network config");
            registry.delete_lease(stale).await?;
        }
        let held = match plan.action {
            Action::Reuse(key) => {
                let held = registry.put_lease(&key, &req.attrs, req.ttl, false).await?;
                if let Some(h) = &held {
                    tracing::info!(subnet = %h.key, "reusing our existing lease");
                }
                held
            }
            Action::Reclaim(key) => {
                let held = registry.create_lease(&key, &req.attrs, req.ttl).await?;
                if let Some(h) = &held {
                    tracing::info!(subnet = %h.key, "reclaimed our previous subnet");
                }
                held
            }
            Action::Create(key) => {
                let held = registry.create_lease(&key, &req.attrs, req.ttl).await?;
                if let Some(h) = &held {
                    tracing::info!(subnet = %h.key, "acquired a new lease");
                }
                held
            }
        };
        match held {
            Some(h) => return Ok(h),
            None => tracing::debug!("lease creation conflicted with another node; picking again"),
        }
    }
    Err(AcquireError::Contended(CREATE_ATTEMPTS))
}

/// When to renew: `margin` before expiry as Flannel does, but never later than half the TTL,
/// so that a short test TTL with Flannel's default 60 min margin does not renew in a loop.
pub fn renew_at(held: &HeldLease, margin: Duration) -> Instant {
    let margin = margin.min(held.ttl / 2);
    held.expires_at
        .checked_sub(margin)
        .unwrap_or(held.expires_at)
}

/// How long to wait after a failed renewal: Flannel's minute, shortened for short TTLs.
fn retry_after(held: &HeldLease) -> Duration {
    (held.ttl / 10).clamp(Duration::from_secs(1), Duration::from_secs(60))
}

/// Why `keep_renewed` returned.
#[derive(Debug)]
pub enum LeaseLost {
    /// The key is gone from etcd (deleted by someone, expired, or etcd was wiped).
    Deleted,
    /// The key is there but someone else wrote it (it is no longer on our grant).
    Rewritten,
    /// Renewal failed this many times in a row.
    RenewFailed(u32),
}

/// Renews `held` in place until the lease is lost, calling `on_renew` after each renewal.
/// Never returns while all is well.
pub async fn keep_renewed(
    registry: &Registry,
    held: &mut HeldLease,
    margin: Duration,
    mut on_renew: impl FnMut(&HeldLease),
) -> LeaseLost {
    let mut failures = 0;
    let mut wake = renew_at(held, margin);
    loop {
        tokio::time::sleep_until(wake).await;
        match registry.renew(held).await {
            Ok(Renewal::Renewed(renewed)) => {
                tracing::info!(subnet = %renewed.key, ttl_s = renewed.ttl.as_secs(), "lease renewed");
                let old = std::mem::replace(held, *renewed);
                // Told before the old grant goes, so that nobody takes the key's new grant
                // for someone else's meanwhile.
                on_renew(held);
                registry.release_grant(old.grant_id).await;
                failures = 0;
                wake = renew_at(held, margin);
            }
            Ok(Renewal::Gone) => return LeaseLost::Deleted,
            Ok(Renewal::Rewritten) => return LeaseLost::Rewritten,
            Err(e) => {
                failures += 1;
                tracing::warn!(attempt = failures, "lease renewal failed: {e}");
                if failures >= RENEW_FAILURES {
                    return LeaseLost::RenewFailed(failures);
                }
                wake = Instant::now() + retry_after(held);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::SubnetKey;

    fn held(ttl_s: u64) -> HeldLease {
        HeldLease {
            key: SubnetKey::parse("10.244.3.0-24").expect("key"),
            attrs: LeaseAttrs {
                public_ip: "192.168.1.10".parse().expect("ip"),
                public_ipv6: None,
                backend_type: None,
                backend_data: None,
                backend_v6_data: None,
            },
            grant_id: 1,
            ttl: Duration::from_secs(ttl_s),
            expires_at: Instant::now() + Duration::from_secs(ttl_s),
        }
    }

    #[tokio::test]
    async fn renews_by_margin_for_long_ttls() {
        let h = held(24 * 3600);
        let at = renew_at(&h, Duration::from_secs(3600));
        assert_eq!(h.expires_at - at, Duration::from_secs(3600));
    }

    #[tokio::test]
    async fn short_ttl_renews_at_half_life() {
        let h = held(10);
        let at = renew_at(&h, Duration::from_secs(3600));
        assert_eq!(h.expires_at - at, Duration::from_secs(5));
        assert_eq!(retry_after(&h), Duration::from_secs(1));
        assert_eq!(retry_after(&held(24 * 3600)), Duration::from_secs(60));
    }
}
