//! One WireGuard device of ours: a TUN (`flannel-wg` or `flannel-wg-v6`) with its pump, its
//! codec (peer table, cookie gate) and its peers, one per remote public key. Separate mode
//! runs two of these with the same private key, as Flannel runs two kernel devices.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use subnet_manager::lease::SubnetKey;

use super::codec::WgCodec;
use super::config::{DeviceSpec, WgConfig};
use super::keys::StaticKeys;
use super::lease::DevicePeer;
use super::peers::{WgPeer, WgTable, INDEX_BITS};
use crate::backend::pump::{Addressing, DeviceState, Family, Outbox, Pump};
use crate::backend::{BackendError, Datapath};
use crate::netlink::Netlink;
use crate::stats::{Stats, Tally};

/// How often peer timers run: well under WireGuard's shortest timer (REKEY_TIMEOUT, 5 s).
const TIMER_TICK: Duration = Duration::from_millis(100);

/// Threads that help open large messages: none below 4 queues (the receiver threads and the
/// pods already share those cores), then one per two queues, up to 8.
fn open_threads(datapath: &Datapath) -> usize {
    match datapath.queue_count() {
        q if q < 4 => 0,
        q => (q / 2).min(8),
    }
}

pub(super) struct WgDevice {
    pub spec: DeviceSpec,
    pub codec: Arc<WgCodec>,
    pub state: Arc<DeviceState>,
    psk: Option<[u8; 32]>,
    keepalive: Option<u16>,
    /// What each peer lease means to this device (leases with nothing for it are absent).
    leases: HashMap<SubnetKey, DevicePeer>,
    /// One peer per public key (a node may briefly hold two leases with one key).
    pub peers: HashMap<[u8; 32], Arc<WgPeer>>,
    next_index: u32,
    /// The packet and timer threads, once started; dropping it stops them.
    pump: Option<Pump>,
    /// The TUN device's addresses for our lease.
    addressing: Addressing,
}

impl WgDevice {
    /// `seed`: where peer indexes start (random, so a restarted node does not reuse them).
    pub fn new(
        spec: DeviceSpec,
        keys: StaticKeys,
        cfg: &WgConfig,
        mtu: usize,
        stats: Arc<Stats>,
        seed: u32,
        datapath: Datapath,
    ) -> Self {
        let codec = WgCodec::new(keys)
            .with_mtu(mtu)
            .with_open_threads(open_threads(&datapath), spec.threads);
        WgDevice {
            spec,
            codec: Arc::new(codec),
            state: Arc::new(DeviceState::with_stats(mtu, stats).with_datapath(datapath)),
            psk: cfg.psk,
            keepalive: cfg.keepalive,
            leases: HashMap::new(),
            peers: HashMap::new(),
            next_index: seed,
            pump: None,
            addressing: Addressing::new(spec.name),
        }
    }

    /// Sets what lease `key` means to this device (`None`: nothing, or gone). Returns whether
    /// that changed the peers.
    pub fn set_lease(&mut self, key: &SubnetKey, peer: Option<DevicePeer>) -> bool {
        let changed = match peer {
            Some(p) if self.leases.get(key) != Some(&p) => {
                self.leases.insert(key.clone(), p.clone());
                vec![p]
            }
            Some(_) => return false,
            // The leases left with the gone one's key name where its peer is now (the peer
            // may have been following the gone one's endpoint).
            None => match self.leases.remove(key) {
                Some(gone) => self
                    .leases
                    .values()
                    .filter(|l| l.public_key == gone.public_key)
                    .cloned()
                    .collect(),
                None => return false,
            },
        };
        self.sync_peers(&changed);
        true
    }

    /// Replaces every lease at once (after a full listing).
    pub fn set_all(&mut self, leases: HashMap<SubnetKey, DevicePeer>) {
        self.leases = leases;
        let all: Vec<DevicePeer> = self.leases.values().cloned().collect();
        self.sync_peers(&all);
    }

    fn alloc_index(&mut self) -> u32 {
        let mask = (1u32 << INDEX_BITS) - 1;
        loop {
            self.next_index = self.next_index.wrapping_add(1) & mask;
            let i = self.next_index;
            if i != 0 && !self.peers.values().any(|p| p.index == i) {
                return i;
            }
        }
    }

    /// Makes the peers match the leases: new keys get a fresh peer, gone keys are dropped
    /// (their keys wiped once the packet threads let go), endpoints follow lease changes; then
    /// the packet threads get the new table.
    fn sync_peers(&mut self, changed: &[DevicePeer]) {
        let mut wanted: HashMap<[u8; 32], Vec<IpNet>> = HashMap::new();
        for l in self.leases.values() {
            wanted
                .entry(l.public_key)
                .or_default()
                .extend(l.allowed.iter().copied());
        }
        self.peers.retain(|k, _| wanted.contains_key(k));
        // Per key, the endpoints the changed leases name: two leases with one key (a node
        // between two subnets) may name two, of which the lowest is taken, so that repeated
        // syncs agree.
        let mut named: HashMap<[u8; 32], Vec<SocketAddr>> = HashMap::new();
        for l in changed {
            named.entry(l.public_key).or_default().push(l.endpoint);
        }
        let lowest = |eps: &[SocketAddr]| eps.iter().min().copied();
        for key in wanted.keys() {
            if self.peers.contains_key(key) {
                continue;
            }
            let Some(lease) = self.leases.values().find(|l| l.public_key == *key) else {
                continue;
            };
            let endpoint = named
                .get(key)
                .and_then(|eps| lowest(eps))
                .unwrap_or(lease.endpoint);
            let index = self.alloc_index();
            let peer = WgPeer::new(
                &self.codec.local,
                index,
                *key,
                self.psk,
                self.keepalive,
                endpoint,
            );
            self.peers.insert(*key, Arc::new(peer));
        }
        // A lease that moved its endpoint moves the peer, even if it had roamed meanwhile;
        // one that still names the configured endpoint leaves it (and any roaming) alone.
        for (key, eps) in &named {
            let (Some(peer), Some(endpoint)) = (self.peers.get(key), lowest(eps)) else {
                continue;
            };
            let mut st = peer.lock();
            if !eps.contains(&st.configured) {
                st.configured = endpoint;
                st.endpoint = endpoint;
            }
        }
        let mut entries: Vec<(Arc<WgPeer>, Vec<IpNet>)> = wanted
            .into_iter()
            .filter_map(|(k, mut nets)| {
                nets.sort();
                Some((self.peers.get(&k)?.clone(), nets))
            })
            .collect();
        entries.sort_by_key(|(p, _)| p.index);
        self.codec.table.store(Arc::new(WgTable::new(entries)));
    }

    /// Opens the TUN if it is not running yet and gives it our lease's addresses.
    pub async fn start(
        &mut self,
        netlink: &Netlink,
        families: &[Family],
    ) -> Result<(), BackendError> {
        if self.pump.is_none() {
            self.start_pump(netlink).await?;
        }
        self.addressing.adopt(netlink, &self.state, families).await
    }

    pub async fn repair(&self, netlink: &Netlink) -> Result<bool, BackendError> {
        self.addressing.repair(netlink, &self.state).await
    }

    /// Opens the TUN (replacing a leftover device of that name that is not a TUN, e.g.
    /// Flannel's kernel WireGuard device on a node migrating to us) and starts the threads.
    async fn start_pump(&mut self, netlink: &Netlink) -> Result<(), BackendError> {
        let name = self.spec.name;
        let start = || {
            Pump::start(
                self.spec.threads,
                name,
                self.spec.listen,
                self.codec.clone(),
                self.state.clone(),
            )
        };
        let mut pump = match start() {
            Ok(p) => p,
            Err(first) => {
                let Ok(old) = netlink.link_by_name(name).await else {
                    return Err(first);
                };
                tracing::warn!(
                    "{first}: replacing the existing {name} (index {})",
                    old.index
                );
                netlink
                    .handle()
                    .link()
                    .del(old.index)
                    .execute()
                    .await
                    .map_err(|e| BackendError::Config(format!("deleting the old {name}: {e}")))?;
                start()?
            }
        };
        let (codec, sender, state) = (self.codec.clone(), pump.sender(), self.state.clone());
        // Handshake retries, rekeying, keepalives, the cookie gate's new second.
        pump.spawn(
            format!("{}-timers", self.spec.threads),
            move |stop: &AtomicBool| {
                let mut due = Outbox::new();
                let mut tally = Tally::default();
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(TIMER_TICK);
                    codec.tick(&mut due, &mut tally);
                    sender.flush(&mut due, &mut tally);
                    tally.flush_tx(&state.stats);
                }
            },
        )?;
        self.pump = Some(pump);
        Ok(())
    }
}
