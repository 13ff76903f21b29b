//! The daemon's life: wait for a valid config, take a lease, start the backend, write
//! subnet.env, then follow other nodes' leases and keep ours renewed until told to stop.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use encap::netlink::Netlink;
use encap::{new_backend, Backend, NodeInfo};
use subnet_manager::admission::{Admission, Outcome, PeerChange};
use subnet_manager::alloc::Identity;
use subnet_manager::config::NetworkConfig;
use subnet_manager::lease::{Lease, LeaseAttrs, SubnetKey};
use subnet_manager::lifecycle::{self, LeaseLost, LeaseRequest};
use subnet_manager::registry::{EtcdOptions, HeldLease, Registry, RegistryError};
use subnet_manager::subnet_env::SubnetEnv;
use subnet_manager::watch::{self, LeaseEvent};
use subnet_manager::Backoff;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{oneshot, watch as tokio_watch};
use tokio::task::JoinHandle;

use crate::flags::Flags;
use crate::iface;
use crate::ipmasq::{IpMasq, MasqConfig};
use crate::status::{self, Status};

/// Set when SIGTERM or SIGINT arrives; every wait in the daemon also waits on it.
#[derive(Clone)]
struct Shutdown(tokio_watch::Receiver<bool>);

impl Shutdown {
    fn install() -> Result<Self> {
        let (tx, rx) = tokio_watch::channel(false);
        let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
        tokio::spawn(async move {
            let which = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            tracing::info!("{which} received: stopping (the lease stays in etcd for the restart)");
            let _ = tx.send(true);
        });
        Ok(Shutdown(rx))
    }

    async fn wait(&mut self) {
        while !*self.0.borrow() {
            if self.0.changed().await.is_err() {
                return;
            }
        }
    }

    /// Sleeps, or returns false at once if we are stopping.
    async fn sleep(&mut self, d: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(d) => true,
            _ = self.wait() => false,
        }
    }
}

/// Retries `op` with back-off until it succeeds (`Some`) or we are told to stop (`None`).
/// Errors are logged only when their text changes, so a long etcd outage is not a log flood.
async fn retry<T, E, F, Fut>(what: &str, shutdown: &mut Shutdown, mut op: F) -> Option<T>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    let mut last = String::new();
    loop {
        let attempt = tokio::select! {
            r = op() => r,
            _ = shutdown.wait() => return None,
        };
        match attempt {
            Ok(v) => return Some(v),
            Err(e) => {
                let msg = e.to_string();
                if msg != last {
                    tracing::error!("{what}: {msg} (retrying)");
                    last = msg;
                }
                if !shutdown.sleep(backoff.next_delay()).await {
                    return None;
                }
            }
        }
    }
}

pub async fn run(flags: Flags) -> Result<()> {
    // First of all: a second daemon with our subnet file would share our lease and devices.
    let _instance = crate::single::acquire(&flags.subnet_file)?;
    let mut shutdown = Shutdown::install()?;
    let status = Arc::new(Status::default());
    let mut ports = vec![flags.healthz_port, flags.metrics_port];
    ports.dedup();
    for port in ports.into_iter().filter(|p| *p != 0) {
        status::serve(SocketAddr::new(flags.healthz_ip, port), status.clone()).await?;
    }
    let etcd = etcd_options(&flags);
    // Unreachable etcd or a refused login is retried; bad TLS files are fatal (a restart with
    // the same flags cannot fix them).
    let connect = retry("connecting to etcd", &mut shutdown, || async {
        match Registry::connect(&etcd).await {
            Err(e @ RegistryError::Etcd { .. }) => Err(e),
            other => Ok(other),
        }
    });
    let registry = match connect.await {
        Some(r) => r?,
        None => return Ok(()),
    };
    let netlink = Netlink::open().context("opening netlink")?;
    let node = iface::choose(&netlink, &flags).await?;

    let Some(config) = retry("waiting for a valid network config", &mut shutdown, || {
        registry.network_config()
    })
    .await
    else {
        return Ok(());
    };
    tracing::info!(
        network = ?config.network,
        ipv6_network = ?config.ipv6_network,
        backend = %config.backend_type,
        "network config loaded"
    );
    let mut backend = new_backend(&config, &node)
        .await
        .with_context(|| format!("starting the {} backend", config.backend_type))?;
    status.set_sources(backend.name(), registry.stats.clone(), backend.stats());

    let previous = previous_subnet(&flags);
    let mut req = LeaseRequest {
        attrs: lease_attrs(&node, backend.as_ref()),
        identity: Identity {
            public_ip: node.public_ip,
            public_ipv6: node.public_ipv6,
        },
        config,
        previous,
        ttl: flags.subnet_lease_ttl,
    };
    let Some(held) = retry("acquiring a subnet lease", &mut shutdown, || {
        lifecycle::acquire(&registry, &req)
    })
    .await
    else {
        return Ok(());
    };
    let mut own = start_lease(&flags, &req.config, &node, backend.as_mut(), &held).await?;
    // After subnet.env, as Flannel does: the rules need our lease's subnet.
    let mut masq = if flags.ip_masq {
        let rules = MasqConfig::new(&req.config, &own.key);
        Some(
            IpMasq::install(rules)
                .await
                .context("installing the --ip-masq rules")?,
        )
    } else {
        None
    };
    status.set_lease(Some(&held));
    status.backend_running.store(true, Ordering::Relaxed);
    let mut renewer = Renewer::spawn(&registry, held, flags.renew_margin(), status.clone());

    let backend_type = backend.name();
    let mut admission = Admission::new(
        &req.config,
        backend_type,
        Box::new(move |l: &Lease| encap::lease_claims(backend_type, l)),
    );
    admission.set_own(&own);
    let mut events = watch::spawn(registry.clone());
    let mut reconciled = false;
    let mut resync = tokio::time::interval(Duration::from_secs(flags.iptables_resync.max(1)));
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let lost = tokio::select! {
            _ = shutdown.wait() => break,
            lost = &mut renewer.lost => match lost {
                Ok(LeaseLost::Deleted) => Some("lease lost: our lease key is gone from etcd".to_string()),
                Ok(LeaseLost::RenewFailed(n)) => Some(format!(
                    "lease renewal failed {n} times (the key stays ours until it expires)"
                )),
                Err(_) => Some("renewal task ended".to_string()),
            },
            _ = resync.tick(), if reconciled => {
                keep_programmed(&netlink, backend.as_mut(), masq.as_mut(), &status).await;
                None
            }
            batch = events.recv() => {
                let Some(batch) = batch else { break };
                let own_event = admit_events(&own, batch, &mut admission, &status, backend.as_mut(), reconciled).await;
                if !reconciled {
                    reconciled = true;
                    let all: Vec<Lease> = admission.admitted().cloned().collect();
                    if let Err(e) = backend.reconcile(&all).await {
                        tracing::warn!("reconciling peers: {e}");
                    }
                    sweep_devices(&netlink, backend.as_ref()).await;
                    sweep_routes(&netlink, backend.as_ref(), &status).await;
                    tracing::info!(peers = all.len(), refused = admission.refused_count(), "peers programmed");
                }
                status.peers.store(admission.admitted_count(), Ordering::Relaxed);
                match own_event {
                    OwnEvent::None => None,
                    OwnEvent::Removed => Some("lease lost: our lease key was deleted from etcd".to_string()),
                    OwnEvent::Rewritten(theirs) => {
                        let Some(held) = restore_own(&registry, &own, &theirs, &req, &status, &mut shutdown).await else {
                            break;
                        };
                        renewer.stop();
                        status.set_lease(Some(&held));
                        renewer = Renewer::spawn(&registry, held, flags.renew_margin(), status.clone());
                        None
                    }
                }
            }
        };
        if let Some(why) = lost {
            tracing::warn!(subnet = %own.key, "{why}: acquiring again");
            renewer.stop();
            status.set_lease(None);
            req.previous = Some(own.key.clone());
            let Some(held) = retry("re-acquiring a subnet lease", &mut shutdown, || {
                lifecycle::acquire(&registry, &req)
            })
            .await
            else {
                break;
            };
            if held.key != own.key {
                tracing::warn!(old = %own.key, new = %held.key, "our old subnet was taken meanwhile: pods created before keep addresses from the old one until recreated");
                own = start_lease(&flags, &req.config, &node, backend.as_mut(), &held).await?;
                let out = admission.set_own(&own);
                apply_outcome(out, &status, backend.as_mut(), reconciled).await;
                status
                    .peers
                    .store(admission.admitted_count(), Ordering::Relaxed);
                if let Some(m) = masq.as_mut() {
                    m.update(MasqConfig::new(&req.config, &own.key))
                        .await
                        .context("updating the --ip-masq rules")?;
                }
            } else {
                tracing::info!(subnet = %held.key, "lease re-acquired with the same subnet");
            }
            status.set_lease(Some(&held));
            renewer = Renewer::spawn(&registry, held, flags.renew_margin(), status.clone());
        }
    }
    renewer.stop();
    // Our NAT rules go with us (routes and the lease stay for the restart, as with Flannel).
    if let Some(m) = masq {
        match m.remove().await {
            Ok(()) => tracing::info!("ip-masq rules removed"),
            Err(e) => tracing::warn!("{e:#}"),
        }
    }
    tracing::info!("stopped");
    Ok(())
}

/// What a batch of lease events said about our own lease.
enum OwnEvent {
    None,
    /// Our key was deleted (or etcd lost it).
    Removed,
    /// Someone else wrote our key: their value.
    Rewritten(Box<Lease>),
}

/// Passes a batch of lease events through the admission check and hands the backend what
/// passed. Our own key is not a peer: what happened to it is returned.
async fn admit_events(
    own: &Lease,
    batch: Vec<LeaseEvent>,
    admission: &mut Admission,
    status: &Status,
    backend: &mut dyn Backend,
    reconciled: bool,
) -> OwnEvent {
    let mut own_event = OwnEvent::None;
    for ev in batch {
        let out = match ev {
            LeaseEvent::Added(lease) if lease.key == own.key => {
                if lease.attrs != own.attrs {
                    own_event = OwnEvent::Rewritten(Box::new(lease));
                }
                continue;
            }
            LeaseEvent::Removed(lease) if lease.key == own.key => {
                own_event = OwnEvent::Removed;
                continue;
            }
            LeaseEvent::Added(lease) => admission.put(lease),
            LeaseEvent::Removed(lease) => admission.remove(&lease.key),
        };
        apply_outcome(out, status, backend, reconciled).await;
    }
    own_event
}

/// Logs and counts refusals, and programs the changes once the first full listing is in.
async fn apply_outcome(out: Outcome, status: &Status, backend: &mut dyn Backend, reconciled: bool) {
    for (key, why) in &out.refused {
        if why.is_benign() {
            tracing::info!(subnet = %key, "lease ignored: {why}");
        } else {
            tracing::warn!(subnet = %key, "lease refused: {why}");
        }
        status.count_refused(why.kind());
    }
    for change in out.changes {
        match change {
            PeerChange::Add(lease) => {
                tracing::info!(subnet = %lease.key, public_ip = %lease.attrs.public_ip, "peer added");
                if reconciled {
                    if let Err(e) = backend.add_peer(&lease).await {
                        tracing::warn!("{e}");
                    }
                }
            }
            PeerChange::Remove(lease) => {
                tracing::info!(subnet = %lease.key, public_ip = %lease.attrs.public_ip, "peer removed");
                if reconciled {
                    if let Err(e) = backend.remove_peer(&lease).await {
                        tracing::warn!("{e}");
                    }
                }
            }
        }
    }
}

/// Someone wrote our lease key with another value (a hijack, or a careless `etcdctl put`,
/// which also detaches the key from our etcd lease): put ours back under a fresh grant.
async fn restore_own(
    registry: &Registry,
    own: &Lease,
    theirs: &Lease,
    req: &LeaseRequest,
    status: &Status,
    shutdown: &mut Shutdown,
) -> Option<HeldLease> {
    status.lease_rewrites.fetch_add(1, Ordering::Relaxed);
    if theirs.attrs.public_ip == own.attrs.public_ip {
        tracing::warn!(subnet = %own.key, "our lease key was rewritten with our PublicIP but other attributes (a second daemon on this host, or a hand-made put?): putting ours back");
    } else {
        tracing::warn!(subnet = %own.key, their_public_ip = %theirs.attrs.public_ip, "our lease key was overwritten by another writer: putting ours back");
    }
    retry("putting our lease back", shutdown, || async {
        match registry
            .put_lease(&own.key, &own.attrs, req.ttl, false)
            .await
        {
            Ok(Some(held)) => Ok(held),
            Ok(None) => Err("the write was refused".to_string()),
            Err(e) => Err(e.to_string()),
        }
    })
    .await
}

/// Every `--iptables-resync` seconds: restore what was removed behind our back and drop routes
/// of ours that nothing justifies any more.
async fn keep_programmed(
    netlink: &Netlink,
    backend: &mut dyn Backend,
    masq: Option<&mut IpMasq>,
    status: &Status,
) {
    match backend.repair().await {
        Ok(0) => {}
        Ok(n) => {
            tracing::warn!(
                restored = n,
                "restored kernel state of ours that was removed"
            );
            status.repairs.fetch_add(n as u64, Ordering::Relaxed);
        }
        Err(e) => tracing::warn!(
            "checking the {} backend's kernel state: {e}",
            backend.name()
        ),
    }
    sweep_routes(netlink, backend, status).await;
    if let Some(m) = masq {
        match m.repair().await {
            Ok(false) => {}
            Ok(true) => {
                tracing::warn!("our ip-masq rules were changed or removed: restored");
                status.repairs.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => tracing::warn!("restoring the ip-masq rules: {e:#}"),
        }
    }
}

/// Deletes VXLAN devices named like Flannel's (`flannel.<VNI>`) that the current backend does
/// not use: left by an earlier vxlan config (another VNI, or another backend now). Their
/// routes go with them. Called once at start, after the backend made its own device.
async fn sweep_devices(netlink: &Netlink, backend: &dyn Backend) {
    let links = match netlink.links().await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!("listing links: {e}");
            return;
        }
    };
    let ours = backend.device_name();
    for link in links {
        let flannel_vxlan_name = link
            .name
            .strip_prefix("flannel.")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        if !flannel_vxlan_name || ours.as_deref() == Some(link.name.as_str()) {
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

/// Removes every route of ours (protocol 70) that the backend does not want: left by an
/// earlier backend (host-gw's routes would bypass an encrypting one) or by a lease long gone.
async fn sweep_routes(netlink: &Netlink, backend: &dyn Backend, status: &Status) {
    let wanted = backend.wanted_routes();
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

/// Configures the backend for the lease we hold and writes subnet.env for the CNI plugin.
async fn start_lease(
    flags: &Flags,
    config: &NetworkConfig,
    node: &NodeInfo,
    backend: &mut dyn Backend,
    held: &HeldLease,
) -> Result<Lease> {
    let own = Lease {
        key: held.key.clone(),
        attrs: held.attrs.clone(),
    };
    backend
        .start(&own)
        .await
        .with_context(|| format!("configuring the {} backend for {}", backend.name(), own.key))?;
    let env = SubnetEnv {
        network: config.network,
        subnet: own.key.ipv4.map(first_host),
        ipv6_network: config.ipv6_network,
        ipv6_subnet: own.key.ipv6.map(first_host),
        mtu: node.iface.mtu.saturating_sub(backend.mtu_overhead()),
        ipmasq: flags.ip_masq,
    };
    // The error names the file, the step and the OS error once; no context to add.
    env.write_atomic(&flags.subnet_file)?;
    tracing::info!(file = %flags.subnet_file.display(), subnet = %own.key, mtu = env.mtu, "wrote subnet.env");
    Ok(own)
}

/// The lease's first address with the lease's prefix length (FLANNEL_SUBNET's form).
fn first_host<N: SubnetAddr>(net: N) -> N {
    net.first_host()
}

trait SubnetAddr {
    fn first_host(self) -> Self;
}

impl SubnetAddr for ipnet::Ipv4Net {
    fn first_host(self) -> Self {
        let addr = std::net::Ipv4Addr::from(u32::from(self.network()).wrapping_add(1));
        ipnet::Ipv4Net::new(addr, self.prefix_len()).unwrap_or(self)
    }
}

impl SubnetAddr for ipnet::Ipv6Net {
    fn first_host(self) -> Self {
        let addr = std::net::Ipv6Addr::from(u128::from(self.network()).wrapping_add(1));
        ipnet::Ipv6Net::new(addr, self.prefix_len()).unwrap_or(self)
    }
}

/// The subnet recorded by a previous run (ours or Go Flannel's), to ask for it again.
fn previous_subnet(flags: &Flags) -> Option<SubnetKey> {
    match SubnetEnv::read(&flags.subnet_file) {
        Ok(env) => {
            let key = SubnetKey {
                ipv4: env.leased_ipv4(),
                ipv6: env.leased_ipv6(),
            };
            (key.ipv4.is_some() || key.ipv6.is_some()).then_some(key)
        }
        Err(e) => {
            tracing::debug!("no previous subnet: {e}");
            None
        }
    }
}

fn lease_attrs(node: &NodeInfo, backend: &dyn Backend) -> LeaseAttrs {
    let data = backend.lease_data();
    LeaseAttrs {
        public_ip: node.public_ip,
        public_ipv6: node.public_ipv6,
        backend_type: data.backend_type,
        backend_data: data.backend_data,
        backend_v6_data: data.backend_v6_data,
    }
}

fn etcd_options(flags: &Flags) -> EtcdOptions {
    EtcdOptions {
        endpoints: flags.etcd_endpoints.clone(),
        prefix: flags.etcd_prefix.clone(),
        username: flags.etcd_username.clone(),
        password: flags.etcd_password.clone(),
        cafile: flags.etcd_cafile.clone(),
        certfile: flags.etcd_certfile.clone(),
        keyfile: flags.etcd_keyfile.clone(),
    }
}

/// The background task that keeps our lease renewed and says when it is lost.
struct Renewer {
    task: JoinHandle<()>,
    lost: oneshot::Receiver<LeaseLost>,
}

impl Renewer {
    fn spawn(
        registry: &Registry,
        mut held: HeldLease,
        margin: Duration,
        status: Arc<Status>,
    ) -> Self {
        let (tx, lost) = oneshot::channel();
        let registry = registry.clone();
        let task = tokio::spawn(async move {
            let why = lifecycle::keep_renewed(&registry, &mut held, margin, |h| {
                status.set_lease(Some(h))
            })
            .await;
            let _ = tx.send(why);
        });
        Renewer { task, lost }
    }

    fn stop(&self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnet_env_address_is_first_host() {
        let n: ipnet::Ipv4Net = "10.244.3.0/24".parse().expect("net");
        assert_eq!(first_host(n).to_string(), "10.244.3.1/24");
        let n6: ipnet::Ipv6Net = "fc00:0:0:3::/64".parse().expect("net");
        assert_eq!(first_host(n6).to_string(), "fc00:0:0:3::1/64");
    }
}
