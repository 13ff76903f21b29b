//! The event loop of a node that holds a lease: peers' leases through the admission check to
//! the backend, our own lease renewed (re-acquired when lost, put back when overwritten), and
//! the periodic upkeep of what we programmed.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use encap::netlink::Netlink;
use encap::Backend;
use subnet_manager::admission::{Admission, Outcome, PeerChange};
use subnet_manager::lease::{Lease, LeaseAttrs, SubnetKey};
use subnet_manager::lifecycle::{self, LeaseLost, LeaseRequest};
use subnet_manager::registry::{HeldLease, Registry};
use subnet_manager::watch::{self, LeaseEvent};
use tokio::sync::mpsc;

use super::upkeep::{self, keep_programmed, sweep_devices, sweep_routes};
use super::{start_lease, Failures, Renewer, Shutdown};
use crate::flags::Flags;
use crate::health::Health;
use crate::status::Status;
use crate::traffic::{RuleConfig, TrafficRules};

/// A node holding a lease, and everything its event loop works on.
pub(super) struct Running {
    flags: Flags,
    registry: Registry,
    netlink: Netlink,
    status: Arc<Status>,
    backend: Box<dyn Backend>,
    req: LeaseRequest,
    own: Lease,
    rules: TrafficRules,
    renewer: Renewer,
    /// The per-peer health prober, when on.
    health: Option<Health>,
    admission: Admission,
    /// Whether the first full listing reached the backend (before that, changes wait for it).
    reconciled: bool,
    /// The upkeep's last failure, logged once while it lasts.
    upkeep_error: Option<String>,
    /// Every node's lease as the watch reports it (spawned with the event loop; `None` again
    /// once the watch ended).
    events: Option<mpsc::Receiver<Vec<LeaseEvent>>>,
    /// Our own key changed while we were busy with it (re-acquiring, putting it back): the
    /// event loop reads it again before anything else.
    recheck_own: bool,
    /// Admitted peers the backend failed to program (a netlink error, an operator's route in
    /// the way), tried again at each upkeep: nothing else would bring them back, as their
    /// leases' renewals change nothing in etcd. With whether it is known to have failed
    /// (else it may have: a reconcile that failed names only its first failure).
    unprogrammed: BTreeMap<SubnetKey, (Lease, bool)>,
}

impl Running {
    #[allow(clippy::too_many_arguments)] // the parts start-up made, handed over once
    pub(super) fn new(
        flags: Flags,
        registry: Registry,
        netlink: Netlink,
        status: Arc<Status>,
        backend: Box<dyn Backend>,
        req: LeaseRequest,
        own: Lease,
        rules: TrafficRules,
        renewer: Renewer,
        health: Option<Health>,
    ) -> Self {
        let backend_type = backend.name();
        let mut admission = Admission::new(
            &req.config,
            backend_type,
            Box::new(move |l: &Lease| encap::lease_claims(backend_type, l)),
        );
        admission.set_own(&own);
        Running {
            flags,
            registry,
            netlink,
            status,
            backend,
            req,
            own,
            rules,
            renewer,
            health,
            admission,
            reconciled: false,
            upkeep_error: None,
            unprogrammed: BTreeMap::new(),
            events: None,
            recheck_own: false,
        }
    }

    /// Runs until told to stop (or the watch ends with the process).
    pub(super) async fn event_loop(&mut self, shutdown: &mut Shutdown) -> Result<()> {
        self.events = Some(watch::spawn(self.registry.clone()));
        let mut resync = self.resync_interval();
        loop {
            if self.events.is_none() {
                return Ok(()); // the watch ended meanwhile (with the process)
            }
            // What happened to our lease: lost for a reason, or rewritten (the event's value,
            // and whether the renewer found it and so ended). A change seen while we were busy
            // with our key is decided from the key as it is now.
            let (lost, rewritten) = if std::mem::take(&mut self.recheck_own) {
                (None, Some((None, false)))
            } else {
                tokio::select! {
                    _ = shutdown.wait() => return Ok(()),
                    lost = &mut self.renewer.lost => match lost {
                        Ok(LeaseLost::Deleted) => (Some(Lost::gone("lease lost: our lease key is gone from etcd")), None),
                        Ok(LeaseLost::Rewritten) => (None, Some((None, true))),
                        Ok(LeaseLost::RenewFailed(n)) => (Some(Lost {
                            why: format!("lease renewal failed {n} times (the key stays ours until it expires)"),
                            still_ours: true,
                        }), None),
                        Err(_) => (Some(Lost::gone("renewal task ended")), None),
                    },
                    _ = resync.tick(), if self.reconciled => {
                        self.keep_programmed().await;
                        (None, None)
                    }
                    batch = next_batch(&mut self.events) => {
                        let Some(batch) = batch else { return Ok(()) };
                        match self.on_batch(batch).await {
                            OwnEvent::None => (None, None),
                            OwnEvent::Removed => (Some(Lost::gone("lease lost: our lease key was deleted from etcd")), None),
                            OwnEvent::Rewritten(theirs) => (None, Some((Some(theirs), false))),
                        }
                    }
                }
            };
            let lost = match rewritten {
                None => lost,
                Some((theirs, renewer_ended)) => {
                    match self.on_rewrite(theirs.as_deref(), shutdown).await {
                        Rewrite::Restored => None,
                        Rewrite::Left => {
                            if renewer_ended {
                                self.renew_from_now();
                            }
                            None
                        }
                        Rewrite::Ours(grant) => {
                            if renewer_ended {
                                self.renew_now_from(grant);
                            }
                            None
                        }
                        Rewrite::Lost(why) => Some(Lost::gone(why)),
                        Rewrite::Stop => return Ok(()),
                    }
                }
            };
            if let Some(lost) = lost {
                if !self.reacquire(&lost, shutdown).await? {
                    return Ok(());
                }
            }
        }
    }

    /// Stops renewing and removes our masquerade rules (routes, forward accepts and the lease
    /// stay for the restart, as with Flannel).
    pub(super) async fn stop(self) {
        self.renewer.stop();
        if self.rules.masquerades() {
            match self.rules.remove_masquerade().await {
                Ok(()) => tracing::info!("ip-masq rules removed"),
                Err(e) => tracing::warn!("{e:#}"),
            }
        }
        tracing::info!("stopped");
    }

    /// A batch from the watch; the first one (the full listing) also reconciles the backend.
    async fn on_batch(&mut self, batch: Vec<LeaseEvent>) -> OwnEvent {
        let own_event = self.admit_events(batch).await;
        if !self.reconciled {
            self.reconciled = true;
            let all: Vec<Lease> = self.admission.admitted().cloned().collect();
            if let Err(e) = self.backend.reconcile(&all).await {
                tracing::warn!("reconciling peers: {e}");
                // Which ones failed is in the log; adding one again is harmless.
                self.unprogrammed
                    .extend(all.iter().map(|l| (l.key.clone(), (l.clone(), false))));
            }
            sweep_devices(&self.netlink, self.backend.as_ref()).await;
            let blackholes = upkeep::blackholes(&self.flags, &self.own.key);
            sweep_routes(
                &self.netlink,
                self.backend.as_ref(),
                &blackholes,
                &self.status,
            )
            .await;
            tracing::info!(
                peers = all.len(),
                refused = self.admission.refused_count(),
                "peers programmed"
            );
        }
        self.publish_peers();
        own_event
    }

    fn publish_peers(&self) {
        self.status
            .peers
            .store(self.admission.admitted_count(), Ordering::Relaxed);
        self.status
            .refused_now
            .store(self.admission.refused_count(), Ordering::Relaxed);
        self.status.set_peers(self.admission.admitted());
        if let Some(h) = &self.health {
            // Over the path pods' packets take: the overlay address for the encapsulating
            // backends, the underlay for host-gw. Probes are IPv4: a peer without an IPv4
            // subnet (IPv6-only) is not probed, its PublicIP being no path of its pods.
            let host_gw = self.backend.name() == "host-gw";
            let targets = self
                .admission
                .admitted()
                .filter_map(|l| {
                    let subnet = l.key.ipv4?;
                    let to = if host_gw {
                        IpAddr::V4(l.attrs.public_ip)
                    } else {
                        IpAddr::V4(subnet.network())
                    };
                    Some((l.key.to_string(), to))
                })
                .collect();
            h.set_peers(targets);
        }
    }

    /// Passes a batch of lease events through the admission check and hands the backend what
    /// passed. Our own key is not a peer: what happened to it is returned.
    async fn admit_events(&mut self, batch: Vec<LeaseEvent>) -> OwnEvent {
        let mut own_event = OwnEvent::None;
        for ev in batch {
            let out = match ev {
                // Admission keeps another node's value on our key, which becomes a peer if we
                // move away because of it.
                LeaseEvent::Added(lease) if lease.key == self.own.key => {
                    if lease.attrs != self.own.attrs {
                        own_event = OwnEvent::Rewritten(Box::new(lease.clone()));
                    }
                    self.admission.put(lease);
                    continue;
                }
                LeaseEvent::Removed(lease) if lease.key == self.own.key => {
                    own_event = OwnEvent::Removed;
                    self.admission.remove(&lease.key);
                    continue;
                }
                LeaseEvent::Added(lease) => self.admission.put(lease),
                LeaseEvent::Removed(lease) => self.admission.remove(&lease.key),
            };
            self.apply_outcome(out).await;
        }
        own_event
    }

    /// Logs and counts refusals, and programs the changes once the first full listing is in.
    async fn apply_outcome(&mut self, out: Outcome) {
        for (key, why) in &out.refused {
            if why.is_benign() {
                tracing::info!(subnet = %key, "lease ignored: {why}");
            } else {
                tracing::warn!(subnet = %key, "lease refused: {why}");
            }
            self.status.count_refused(why.kind());
        }
        for change in out.changes {
            let result = match &change {
                PeerChange::Add(lease) => {
                    tracing::info!(subnet = %lease.key, public_ip = %lease.attrs.public_ip, "peer added");
                    if !self.reconciled {
                        continue;
                    }
                    self.backend.add_peer(lease).await
                }
                PeerChange::Remove(lease) => {
                    tracing::info!(subnet = %lease.key, public_ip = %lease.attrs.public_ip, "peer removed");
                    if !self.reconciled {
                        continue;
                    }
                    self.backend.remove_peer(lease).await
                }
            };
            match (&change, result) {
                (PeerChange::Add(lease), Err(e)) => {
                    tracing::warn!("{e} (tried again at each --iptables-resync period)");
                    self.unprogrammed
                        .insert(lease.key.clone(), (lease.clone(), true));
                }
                (PeerChange::Add(lease) | PeerChange::Remove(lease), result) => {
                    self.unprogrammed.remove(&lease.key);
                    if let Err(e) = result {
                        tracing::warn!("{e}");
                    }
                }
            }
        }
    }

    /// Tries again to program the peers whose programming failed; logged when it works.
    async fn retry_unprogrammed(&mut self) {
        for (key, (lease, failed)) in std::mem::take(&mut self.unprogrammed) {
            match self.backend.add_peer(&lease).await {
                Ok(()) if failed => {
                    tracing::info!(subnet = %key, "peer programmed after an earlier failure");
                    self.status.repairs.fetch_add(1, Ordering::Relaxed);
                }
                Ok(()) => {}
                Err(e) => {
                    // Said once, when it first failed (the reconcile said the first one).
                    tracing::debug!("{e}");
                    self.unprogrammed.insert(key, (lease, true));
                }
            }
        }
    }

    /// Someone wrote our lease key with another value. Who wrote it decides what we do, read
    /// from the etcd lease grant the key is attached to now:
    /// - none (a plain put: a careless `etcdctl put`, which also detaches the key from our
    ///   grant) or ours: put ours back under a fresh grant;
    /// - another node's grant, with another PublicIP: that node holds the subnet now (it saw the
    ///   key deleted and created it anew, or etcd came back from an older snapshot). Overwriting
    ///   it would have each of us put its own back without end, both routing the subnet: we
    ///   acquire another one, as after a deletion;
    /// - another grant with our PublicIP: a second daemon on this host. Leave it and say so
    ///   (each putting its own back would loop just the same).
    ///
    /// `theirs`: the value the watch saw, if it was the watch that saw it (the renewer sees
    /// only that the key left our grant).
    async fn on_rewrite(&mut self, theirs: Option<&Lease>, shutdown: &mut Shutdown) -> Rewrite {
        self.status.lease_rewrites.fetch_add(1, Ordering::Relaxed);
        let mut theirs = theirs.map(|l| l.attrs.public_ip);
        // Each pass decides from the key as read; a put over it only lands while nobody has
        // written it since (another node may have taken the subnet in between), else we read
        // it again. Only another writer's puts make a pass fail, so this ends when they stop.
        let mut first = true;
        loop {
            if let Some(done) = self.rewrite_pass(theirs, first, shutdown).await {
                return done;
            }
            tracing::debug!(subnet = %self.own.key, "our lease key changed again while we put ours back: reading it again");
            // The event's value is older than what the next pass reads.
            theirs = None;
            first = false;
        }
    }

    /// One pass of [`on_rewrite`](Self::on_rewrite): `None` when the key changed between our
    /// read and our put. `first`: warn about what we found (later passes stay quiet: a writer
    /// rewriting the key in a loop must not flood the log).
    async fn rewrite_pass(
        &mut self,
        theirs: Option<Ipv4Addr>,
        first: bool,
        shutdown: &mut Shutdown,
    ) -> Option<Rewrite> {
        let (registry, key) = (self.registry.clone(), self.own.key.clone());
        let read = || registry.lease_key_now(&key);
        let Some(now) = self
            .retry_keeping_programmed("reading our lease key", shutdown, read)
            .await
        else {
            return Some(Rewrite::Stop);
        };
        let Some(now) = now else {
            return Some(Rewrite::Lost(
                "lease lost: our lease key was deleted from etcd".into(),
            ));
        };
        let own = &self.own;
        // The event may be older than the key: what it holds now decides.
        let current = LeaseAttrs::from_json(&now.value).ok();
        if current.as_ref() == Some(&own.attrs) {
            // Our value, on whatever grant it is on now: our renewal put it back meanwhile (and
            // the renewer may not have told us its new grant yet), a renewal that failed to
            // answer had in fact moved it, etcd came back from a snapshot, or a plain put
            // wrote our value (grant 0).
            return Some(Rewrite::Ours(now.grant));
        }
        let ours = self.renewer.grant();
        let their_ip = current.map(|a| a.public_ip).or(theirs);
        let same_ip = their_ip == Some(own.attrs.public_ip);
        let their_ip = their_ip.map_or_else(|| "unreadable".to_string(), |ip| ip.to_string());
        match now.grant {
            g if g != 0 && g != ours && !same_ip => {
                return Some(Rewrite::Lost(format!(
                    "our lease key was taken by the node with PublicIP {their_ip} under its own etcd lease"
                )));
            }
            g if g != 0 && g != ours => {
                tracing::error!(subnet = %own.key, "our lease key was rewritten with our PublicIP under another etcd lease: a second daemon on this host? Leaving it: each putting its own back would never end");
                return Some(Rewrite::Left);
            }
            _ if !first => {}
            _ if same_ip => {
                tracing::warn!(subnet = %own.key, "our lease key was rewritten with our PublicIP but other attributes (a hand-made put?): putting ours back");
            }
            _ => {
                tracing::warn!(subnet = %own.key, their_public_ip = %their_ip, "our lease key was overwritten by another writer: putting ours back");
            }
        }
        let (registry, own, ttl) = (self.registry.clone(), own.clone(), self.req.ttl);
        let put = || registry.put_lease_over(&own.key, &own.attrs, ttl, now.mod_revision);
        let Some(put) = self
            .retry_keeping_programmed("putting our lease back", shutdown, put)
            .await
        else {
            return Some(Rewrite::Stop);
        };
        let held = put?;
        // The key left our old grant (read now: the renewer may have renewed meanwhile): it
        // holds nothing until its TTL.
        let old = self.renewer.grant();
        self.hold(held);
        self.registry.release_grant(old).await;
        Some(Rewrite::Restored)
    }

    /// After the renewer found our value on a grant it did not know (`grant`, 0 for none):
    /// renew from that grant at once, which moves the key back onto a grant of ours (renewed
    /// from then on) and lets go of that one.
    fn renew_now_from(&mut self, grant: i64) {
        self.hold(HeldLease {
            key: self.own.key.clone(),
            attrs: self.own.attrs.clone(),
            grant_id: grant,
            ttl: self.req.ttl,
            expires_at: tokio::time::Instant::now(),
        });
    }

    /// After the renewer found our key on someone else's grant and we leave it so: renew from
    /// now on as if just written, the next attempt about a TTL away (which tells again whether
    /// it is still not ours), so that a daemon we leave the key to is not fought each minute.
    fn renew_from_now(&mut self) {
        let ttl = self.req.ttl;
        self.hold(HeldLease {
            key: self.own.key.clone(),
            attrs: self.own.attrs.clone(),
            grant_id: self.renewer.grant(),
            ttl,
            expires_at: tokio::time::Instant::now() + ttl,
        });
    }

    /// Our lease was lost: acquire again, asking for the same subnet first. False when told
    /// to stop meanwhile.
    async fn reacquire(&mut self, lost: &Lost, shutdown: &mut Shutdown) -> Result<bool> {
        tracing::warn!(subnet = %self.own.key, "{}: acquiring again", lost.why);
        self.renewer.stop();
        let old_grant = self.renewer.grant();
        if !lost.still_ours {
            // After failed renewals the key is ours until the expiry the status holds:
            // readiness fails from then on, not up to an hour early.
            self.status.set_lease(None);
        }
        self.req.previous = Some(self.own.key.clone());
        let (registry, req) = (self.registry.clone(), self.req.clone());
        let acquire = || lifecycle::acquire(&registry, &req);
        let Some(held) = self
            .retry_keeping_programmed("re-acquiring a subnet lease", shutdown, acquire)
            .await
        else {
            return Ok(false);
        };
        // Our key is gone from the old grant (deleted, expired, or another's now): it holds
        // nothing until its TTL, 24 h.
        if held.grant_id != old_grant {
            self.registry.release_grant(old_grant).await;
        }
        if held.key == self.own.key {
            tracing::info!(subnet = %held.key, "lease re-acquired with the same subnet");
        } else {
            tracing::warn!(old = %self.own.key, new = %held.key, "our old subnet was taken meanwhile: pods created before keep addresses from the old one until recreated");
            if let Some(policy) = self.status.policy.get() {
                // New pods get addresses from the new subnet (once subnet.env says it, just
                // below: the plugin's records must be accepted from then on).
                policy.set_subnet(&held.key);
            }
            self.own =
                start_lease(&self.flags, &self.req.config, self.backend.as_mut(), &held).await?;
            let out = self.admission.set_own(&self.own);
            self.apply_outcome(out).await;
            self.publish_peers();
            let kinds = super::rule_kinds(&self.flags);
            self.rules
                .update(RuleConfig::new(&self.req.config, &self.own.key, kinds))
                .await
                .context("updating the traffic rules")?;
            let blackholes = upkeep::blackholes(&self.flags, &self.own.key);
            if let Err(e) = upkeep::ensure_blackholes(&self.netlink, &blackholes).await {
                tracing::warn!("{e:#} (retried every --iptables-resync period)");
            }
        }
        self.hold(held);
        Ok(true)
    }

    /// Every `--iptables-resync` seconds, what `keep_programmed` repairs.
    fn resync_interval(&self) -> tokio::time::Interval {
        let mut resync =
            tokio::time::interval(Duration::from_secs(self.flags.iptables_resync.max(1)));
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        resync
    }

    /// Puts back what someone removed of ours: routes, rules, the blackhole route, devices;
    /// and programs the peers that failed before.
    async fn keep_programmed(&mut self) {
        // First, so that the sweep below finds their routes wanted.
        self.retry_unprogrammed().await;
        keep_programmed(
            &self.netlink,
            self.backend.as_mut(),
            &mut self.rules,
            &upkeep::blackholes(&self.flags, &self.own.key),
            &self.status,
            &mut self.upkeep_error,
        )
        .await;
    }

    /// A batch that came while we were busy with our own lease (acquiring it again, putting
    /// it back): peers' changes reach the backend now, not once etcd lets us finish (a node
    /// whose writes fail may still read). A change to our own key is left to the event loop,
    /// which reads the key again once the operation in progress is over (it may have changed
    /// after that operation read or wrote it). Our own value under another key is the subnet
    /// we are taking, not a peer to refuse.
    async fn on_batch_meanwhile(&mut self, batch: Option<Vec<LeaseEvent>>) {
        let Some(mut batch) = batch else {
            self.events = None;
            return;
        };
        batch.retain(|ev| !matches!(ev, LeaseEvent::Added(l) if l.attrs == self.own.attrs && l.key != self.own.key));
        if !matches!(self.on_batch(batch).await, OwnEvent::None) {
            self.recheck_own = true;
        }
    }

    /// Runs `op` with back-off until it succeeds (`None`: told to stop), as `retry` does, but
    /// the upkeep and the peers' lease events go on meanwhile, as in the event loop: the
    /// datapath keeps forwarding to the peers we know while etcd is away, what someone removes
    /// of ours is put back then too, and peers come and go, not only once etcd returns. `op`
    /// works on copies of what it needs: an attempt may hang as long as etcd does (an etcd
    /// that stopped answering).
    async fn retry_keeping_programmed<T, E, F, Fut>(
        &mut self,
        what: &str,
        shutdown: &mut Shutdown,
        mut op: F,
    ) -> Option<T>
    where
        E: std::fmt::Display,
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, E>>,
    {
        let mut failures = Failures::default();
        let mut resync = self.resync_interval();
        // An interval's first tick is at once: the event loop's last upkeep was just now.
        resync.tick().await;
        loop {
            let attempt = op();
            tokio::pin!(attempt);
            let attempt = loop {
                tokio::select! {
                    r = &mut attempt => break r,
                    _ = shutdown.wait() => return None,
                    _ = resync.tick(), if self.reconciled => self.keep_programmed().await,
                    batch = next_batch(&mut self.events), if self.reconciled => self.on_batch_meanwhile(batch).await,
                }
            };
            let pause = match attempt {
                Ok(v) => return Some(v),
                Err(e) => tokio::time::sleep(failures.next(what, e)),
            };
            tokio::pin!(pause);
            loop {
                tokio::select! {
                    _ = &mut pause => break,
                    _ = shutdown.wait() => return None,
                    _ = resync.tick(), if self.reconciled => self.keep_programmed().await,
                    batch = next_batch(&mut self.events), if self.reconciled => self.on_batch_meanwhile(batch).await,
                }
            }
        }
    }

    /// Renews `held` from now on, in place of whatever renewed before.
    fn hold(&mut self, held: HeldLease) {
        self.renewer.stop();
        self.status.set_lease(Some(&held));
        self.renewer = Renewer::spawn(
            &self.registry,
            held,
            self.flags.renew_margin(),
            self.status.clone(),
        );
    }
}

/// Why we acquire a lease again.
struct Lost {
    why: String,
    /// Renewals failed, but the key is ours until it expires.
    still_ours: bool,
}

impl Lost {
    fn gone(why: impl Into<String>) -> Self {
        Lost {
            why: why.into(),
            still_ours: false,
        }
    }
}

/// The watch's next batch; never ready without a watch (not started, or gone), so that a
/// select waits on its other arms.
async fn next_batch(
    events: &mut Option<mpsc::Receiver<Vec<LeaseEvent>>>,
) -> Option<Vec<LeaseEvent>> {
    match events {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// What came of someone else writing our lease key.
enum Rewrite {
    /// Ours again, under a new grant (a new renewer).
    Restored,
    /// Left as it is (someone else's value): we keep the subnet.
    Left,
    /// It holds our value, on this grant (0: none).
    Ours(i64),
    /// The subnet is not ours any more: acquire again, for this reason.
    Lost(String),
    /// Told to stop meanwhile.
    Stop,
}

/// What a batch of lease events said about our own lease.
enum OwnEvent {
    None,
    /// Our key was deleted (or etcd lost it).
    Removed,
    /// Someone else wrote our key: their value.
    Rewritten(Box<Lease>),
}
