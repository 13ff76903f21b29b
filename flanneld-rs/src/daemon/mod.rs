//! The daemon's life: wait for a valid config, take a lease, start the backend, write
//! subnet.env, then hand over to the event loop (`running`) until told to stop.

mod running;
mod upkeep;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use encap::netlink::Netlink;
use encap::{new_backend, Backend, NodeInfo};
use subnet_manager::alloc::Identity;
use subnet_manager::config::NetworkConfig;
use subnet_manager::lease::{Lease, LeaseAttrs, SubnetKey};
use subnet_manager::lifecycle::{self, LeaseLost, LeaseRequest};
use subnet_manager::registry::{HeldLease, Registry, RegistryError};
use subnet_manager::subnet_env::SubnetEnv;
use subnet_manager::Backoff;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{oneshot, watch as tokio_watch};
use tokio::task::JoinHandle;

use crate::flags::Flags;
use crate::health::{Health, HealthConfig};
use crate::iface;
use crate::status::{self, NodeDetails, Status};
use crate::traffic::{self, FullyRandom, Kinds, RuleConfig, TrafficRules};
use running::Running;

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
    let mut failures = Failures::default();
    loop {
        let attempt = tokio::select! {
            r = op() => r,
            _ = shutdown.wait() => return None,
        };
        match attempt {
            Ok(v) => return Some(v),
            Err(e) => {
                if !shutdown.sleep(failures.next(what, e)).await {
                    return None;
                }
            }
        }
    }
}

/// The failed attempts of one retry loop: each logged only when its text changes (a long etcd
/// outage is not a log flood), each answered with the back-off before the next attempt.
struct Failures {
    backoff: Backoff,
    last: String,
}

impl Default for Failures {
    fn default() -> Self {
        Failures {
            backoff: Backoff::new(Duration::from_millis(200), Duration::from_secs(5)),
            last: String::new(),
        }
    }
}

impl Failures {
    /// Notes a failure of `what`; returns how long to wait before trying again.
    fn next(&mut self, what: &str, e: impl std::fmt::Display) -> Duration {
        let msg = e.to_string();
        if msg != self.last {
            tracing::error!("{what}: {msg} (retrying)");
            self.last = msg;
        }
        self.backoff.next_delay()
    }
}

/// Start-up: everything up to holding a lease with the backend configured, then the event loop.
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
    // `flanneld-rs status` is for the operator: without its socket the node still networks.
    if let Err(e) = status::serve_unix(
        &crate::single::socket_path(&flags.subnet_file),
        status.clone(),
    )
    .await
    {
        tracing::warn!("flanneld-rs status will not answer: {e:#}");
    }
    let etcd = flags.etcd_options();
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
    let mut node = NodeInfo {
        wg_key_file: flags.wg_key_path(),
        datapath: flags.datapath(),
        ..iface::choose(&netlink, &flags).await?
    };

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
        enable_nftables = config.enable_nftables,
        "network config loaded"
    );
    node.public_ipv6 = public_ipv6(&config, &node)?;
    let mut backend = new_backend(&config, &node)
        .await
        .with_context(|| format!("starting the {} backend", config.backend_type))?;
    status.set_sources(backend.name(), registry.stats.clone(), backend.stats());

    let previous = previous_subnet(&flags);
    let req = LeaseRequest {
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
    // NetworkPolicy for our pods: follows `<prefix>/policy/` and answers the CNI plugin, which
    // may call as soon as subnet.env exists, so it starts first.
    let policy = crate::policy::Policy::start(
        registry.clone(),
        &held.key,
        node.public_ip.into(),
        flags.subnet_lease_ttl,
        &flags.subnet_file,
    );
    let _ = status.policy.set(policy);
    let own = start_lease(&flags, &req.config, backend.as_mut(), &held).await?;
    // After subnet.env, as Flannel does: the rules need our lease's subnet. A masquerade that
    // cannot be installed is fatal; forward rules that cannot are retried by the upkeep.
    let config = RuleConfig::new(&req.config, &own.key, rule_kinds(&flags));
    let rules = TrafficRules::install(config)
        .await
        .context("installing the --ip-masq rules")?;
    // Go Flannel v0.27+ leaves its rules behind at exit; a node moving to us would keep them
    // for ever. Removed once ours are in place (their names differ), so pods never go a
    // moment without either.
    for what in traffic::remove_go_flannel_leftovers().await {
        tracing::info!("removed Go Flannel's leftover {what}");
    }
    let blackholes = upkeep::blackholes(&flags, &own.key);
    if let Err(e) = upkeep::ensure_blackholes(&netlink, &blackholes).await {
        tracing::warn!("{e:#} (retried every --iptables-resync period)");
    }
    status.set_lease(Some(&held));
    status.backend_running.store(true, Ordering::Relaxed);
    // Lease, device, rules and subnet.env are all in place: Flannel's /readyz turns 200.
    status.ready.store(true, Ordering::Relaxed);
    status.set_node(NodeDetails {
        devices: devices_of(backend.as_ref()),
        masquerade: flags.ip_masq,
        forward_rules: flags.iptables_forward_rules,
    });
    let renewer = Renewer::spawn(&registry, held, flags.renew_margin(), status.clone());

    let health = start_health(&flags, backend.as_ref(), node.public_ip, status.clone());
    let flags_subnet_file = flags.subnet_file.clone();
    let mut running = Running::new(
        flags, registry, netlink, status, backend, req, own, rules, renewer, health,
    );
    let result = running.event_loop(&mut shutdown).await;
    running.stop().await;
    // `status` then says no daemon runs, not that one stopped answering.
    let _ = std::fs::remove_file(crate::single::socket_path(&flags_subnet_file));
    result
}

/// Configures the backend for the lease we hold and writes subnet.env for the CNI plugin.
async fn start_lease(
    flags: &Flags,
    config: &NetworkConfig,
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
        mtu: backend.mtu(),
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

/// The subnet recorded by a previous run (ours or Go Flannel's), to ask for it again. Only the
/// subnet lines count, as for Flannel; a file there that names none we can use is said at
/// warn, for the node is about to take another subnet than its pods' addresses are in.
fn previous_subnet(flags: &Flags) -> Option<SubnetKey> {
    let path = &flags.subnet_file;
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!("no previous subnet: cannot read {}: {e}", path.display());
            return None;
        }
    };
    match SubnetEnv::previous_leases(&text) {
        Ok((ipv4, ipv6)) if ipv4.is_some() || ipv6.is_some() => Some(SubnetKey { ipv4, ipv6 }),
        Ok(_) => {
            tracing::warn!(
                "no previous subnet: {} has no FLANNEL_SUBNET or FLANNEL_IPV6_SUBNET",
                path.display()
            );
            None
        }
        Err(e) => {
            tracing::warn!("no previous subnet in {}: {e}", path.display());
            None
        }
    }
}

/// Our PublicIPv6 as Flannel publishes it: only with `EnableIPv6` (leases of IPv4-only networks
/// say `null`), and then required, since peers route our IPv6 subnet to it.
fn public_ipv6(config: &NetworkConfig, node: &NodeInfo) -> Result<Option<std::net::Ipv6Addr>> {
    if !config.enable_ipv6 {
        return Ok(None);
    }
    match node.public_ipv6 {
        Some(ip) => Ok(Some(ip)),
        None => anyhow::bail!(
            "EnableIPv6 is true but interface {} has no global IPv6 address: pass --public-ipv6 or another --iface",
            node.iface.name
        ),
    }
}

/// The per-peer health prober, unless `--health-port=0`. A port that cannot be bound is
/// reported and leaves the node without probes, never without networking.
fn start_health(
    flags: &Flags,
    backend: &dyn Backend,
    public_ip: std::net::Ipv4Addr,
    status: Arc<Status>,
) -> Option<Health> {
    if flags.health_port == 0 {
        return None;
    }
    // host-gw's peers probe our PublicIP and take answers only from it; the encapsulating
    // backends' probes go to and come from overlay addresses, which the routes pick.
    let bind = match backend.name() {
        "host-gw" => public_ip,
        _ => std::net::Ipv4Addr::UNSPECIFIED,
    };
    let cfg = HealthConfig {
        bind,
        port: flags.health_port,
        interval: flags.health_probe_interval,
        pod_mtu: backend.mtu(),
    };
    match Health::spawn(cfg, status) {
        Ok(h) => Some(h),
        Err(e) => {
            tracing::warn!("per-peer health probes off: {e:#}");
            None
        }
    }
}

/// The network devices a backend runs on, for `status`: the kernel devices it keeps (vxlan),
/// else Flannel's fixed names of the TUN devices (host-gw has none).
fn devices_of(backend: &dyn Backend) -> Vec<String> {
    let kept = backend.device_names();
    if !kept.is_empty() {
        return kept;
    }
    match backend.name() {
        "udp" => vec!["flannel0".to_string()],
        "wireguard" => vec!["flannel-wg".to_string()],
        _ => Vec::new(),
    }
}

/// The traffic rules the flags ask for.
fn rule_kinds(flags: &Flags) -> Kinds {
    Kinds {
        masquerade: flags
            .ip_masq
            .then_some(FullyRandom(!flags.ip_masq_fully_random_disable)),
        forward: flags.iptables_forward_rules,
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

/// The background task that keeps our lease renewed and says when it is lost.
struct Renewer {
    task: JoinHandle<()>,
    lost: oneshot::Receiver<LeaseLost>,
    /// The etcd lease grant our key is attached to now (each renewal makes a new one).
    grant: Arc<AtomicI64>,
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
        let grant = Arc::new(AtomicI64::new(held.grant_id));
        let current = grant.clone();
        let task = tokio::spawn(async move {
            let why = lifecycle::keep_renewed(&registry, &mut held, margin, |h| {
                current.store(h.grant_id, Ordering::Relaxed);
                status.set_lease(Some(h))
            })
            .await;
            let _ = tx.send(why);
        });
        Renewer { task, lost, grant }
    }

    fn grant(&self) -> i64 {
        self.grant.load(Ordering::Relaxed)
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
