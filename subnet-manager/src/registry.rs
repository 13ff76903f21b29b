//! The etcd v3 adapter: the only part of this crate that does I/O.
//!
//! It reads the network config, creates and renews lease keys the way Flannel does (a
//! create-only-if-absent transaction under a granted etcd lease) and lists the subnets with the
//! revision a watch resumes from. Everything it decides is delegated to the pure modules.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, Identity as TlsIdentity,
    PutOptions, TlsOptions, Txn, TxnOp, TxnOpResponse,
};
use thiserror::Error;

use crate::config::{ConfigError, NetworkConfig};
use crate::lease::{Lease, LeaseAttrs, LeaseError, SubnetKey};

/// How to reach etcd: Flannel's `--etcd-*` flags.
#[derive(Clone, Debug, Default)]
pub struct EtcdOptions {
    pub endpoints: Vec<String>,
    pub prefix: String,
    pub username: Option<String>,
    pub password: Option<String>,
    /// CA, certificate and key files; TLS is used only when certificate and key are both given.
    pub cafile: Option<String>,
    pub certfile: Option<String>,
    pub keyfile: Option<String>,
}

#[derive(Debug, Error)]
pub enum RegistryError {
    #[error("etcd ({context}): {source}")]
    Etcd {
        context: String,
        #[source]
        source: etcd_client::Error,
    },
    #[error(
        "network config not found at {key} (did you create it with the etcd v3 API? e.g. etcdctl put {key} '{{\"Network\":\"10.244.0.0/16\",\"Backend\":{{\"Type\":\"host-gw\"}}}}')"
    )]
    ConfigMissing { key: String },
    #[error("network config at {key}: {source}")]
    ConfigInvalid {
        key: String,
        #[source]
        source: ConfigError,
    },
    #[error("reading TLS file {path}: {source}")]
    TlsFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("etcd TLS needs both --etcd-certfile and --etcd-keyfile")]
    TlsIncomplete,
}

impl RegistryError {
    fn etcd(context: impl Into<String>) -> impl FnOnce(etcd_client::Error) -> Self {
        let context = context.into();
        move |source| RegistryError::Etcd { context, source }
    }
}

/// Counters an operator wants to see (exported as metrics by the daemon).
#[derive(Debug, Default)]
pub struct RegistryStats {
    pub etcd_errors: AtomicU64,
    pub malformed_leases: AtomicU64,
    pub watch_restarts: AtomicU64,
    pub lease_renewals: AtomicU64,
    /// Listings that found etcd wiped or replaced (new cluster ID, revision gone back).
    pub etcd_resets: AtomicU64,
}

impl RegistryStats {
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// The subnets in etcd at one revision. Malformed entries are reported, not fatal.
#[derive(Debug, Default)]
pub struct LeaseList {
    pub leases: Vec<Lease>,
    pub malformed: Vec<LeaseError>,
    /// The subnets of the malformed entries whose key is a lease key: they exist, so they are
    /// taken when allocating, whatever their value.
    pub unreadable: Vec<SubnetKey>,
    pub revision: i64,
    /// The etcd cluster that answered: a new ID means etcd was wiped or replaced.
    pub cluster_id: u64,
}

/// A lease key as read now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyNow {
    /// The etcd lease grant it is attached to (0 for none: a plain put, as `etcdctl put`
    /// makes).
    pub grant: i64,
    pub value: Vec<u8>,
    /// The revision it was last written at.
    pub mod_revision: i64,
}

/// What came of renewing a lease.
#[derive(Debug)]
pub enum Renewal {
    /// Ours, under the new grant.
    Renewed(Box<HeldLease>),
    /// The key is gone (deleted, expired, etcd wiped).
    Gone,
    /// The key is there but no longer attached to our grant: someone else wrote it.
    Rewritten,
}

/// One key as read from etcd.
#[derive(Clone, Debug)]
pub struct RawKv {
    pub key: String,
    pub value: Vec<u8>,
    pub mod_revision: i64,
}

/// A prefix listing with the store's revision and cluster ID at the time.
#[derive(Clone, Debug, Default)]
pub struct RawList {
    pub kvs: Vec<RawKv>,
    pub revision: i64,
    pub cluster_id: u64,
}

/// A lease key written by us under an etcd lease grant.
#[derive(Clone, Debug)]
pub struct HeldLease {
    pub key: SubnetKey,
    pub attrs: LeaseAttrs,
    pub grant_id: i64,
    pub ttl: Duration,
    /// When the grant runs out, by the local monotonic clock.
    pub expires_at: tokio::time::Instant,
}

#[derive(Clone)]
pub struct Registry {
    client: Client,
    prefix: String,
    pub stats: Arc<RegistryStats>,
}

impl Registry {
    /// Connects lazily without auth: an etcd that is down makes the first request fail, not
    /// this call. With a username the client logs in here, so this can fail: callers retry.
    pub async fn connect(opts: &EtcdOptions) -> Result<Self, RegistryError> {
        let mut connect = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            .with_keep_alive_while_idle(true)
            // As Flannel's watches do: a member cut off from the majority refuses (and ends
            // its watch streams) instead of serving its frozen store, whose progress reports
            // would otherwise keep a deaf watch looking alive.
            .with_require_leader(true)
            // etcd's auth tokens expire (5 min idle by default) while a 24 h lease renews every
            // 12 h: without a refresh every request after that fails with "invalid auth token".
            .with_auto_token_refresh(true);
        if let (Some(user), Some(pass)) = (&opts.username, &opts.password) {
            connect = connect.with_user(user.clone(), pass.clone());
        }
        if let Some(tls) = tls_options(opts)? {
            connect = connect.with_tls(tls);
        }
        let client = Client::connect(&opts.endpoints, Some(connect))
            .await
            .map_err(RegistryError::etcd(format!(
                "connecting to {}",
                opts.endpoints.join(",")
            )))?;
        Ok(Registry {
            client,
            prefix: opts.prefix.trim_end_matches('/').to_string(),
            stats: Arc::default(),
        })
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn config_key(&self) -> String {
        format!("{}/config", self.prefix)
    }

    pub fn subnets_prefix(&self) -> String {
        format!("{}/subnets/", self.prefix)
    }

    pub(crate) fn client(&self) -> Client {
        self.client.clone()
    }

    fn count_err<T>(&self, r: Result<T, RegistryError>) -> Result<T, RegistryError> {
        if matches!(r, Err(RegistryError::Etcd { .. })) {
            RegistryStats::bump(&self.stats.etcd_errors);
        }
        r
    }

    /// Reads and checks `<prefix>/config`.
    pub async fn network_config(&self) -> Result<NetworkConfig, RegistryError> {
        let key = self.config_key();
        let resp = self.count_err(
            self.client
                .clone()
                .get(key.as_str(), None)
                .await
                .map_err(RegistryError::etcd(format!("reading {key}"))),
        )?;
        let Some(kv) = resp.kvs().first() else {
            return Err(RegistryError::ConfigMissing { key });
        };
        NetworkConfig::parse(kv.value())
            .map_err(|source| RegistryError::ConfigInvalid { key, source })
    }

    /// Lists every subnet lease with the revision to watch from.
    pub async fn list_leases(&self) -> Result<LeaseList, RegistryError> {
        let prefix = self.subnets_prefix();
        let resp = self.count_err(
            self.client
                .clone()
                .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
                .await
                .map_err(RegistryError::etcd(format!("listing {prefix}"))),
        )?;
        let mut list = LeaseList {
            revision: resp.header().map(|h| h.revision()).unwrap_or_default(),
            cluster_id: resp.header().map(|h| h.cluster_id()).unwrap_or_default(),
            ..LeaseList::default()
        };
        // Oldest first, not in key order: where two leases claim one thing (a VtepMAC, a
        // WireGuard key), the first admitted keeps it, and that must be the one that was there
        // first, as for a node that saw both arrive (`10.244.10.0` sorts before `10.244.2.0`).
        let mut kvs: Vec<_> = resp.kvs().iter().collect();
        kvs.sort_by_key(|kv| kv.create_revision());
        for kv in kvs {
            let key = String::from_utf8_lossy(kv.key());
            match Lease::parse(&self.prefix, &key, kv.value()) {
                None => {}
                Some(Ok(lease)) => list.leases.push(lease),
                Some(Err(e)) => {
                    RegistryStats::bump(&self.stats.malformed_leases);
                    if let Some(Ok(subnet)) = SubnetKey::from_key(&self.prefix, &key) {
                        list.unreadable.push(subnet);
                    }
                    list.malformed.push(e);
                }
            }
        }
        Ok(list)
    }

    async fn grant(&self, ttl: Duration) -> Result<i64, RegistryError> {
        let secs = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let resp = self.count_err(
            self.client
                .clone()
                .lease_grant(secs, None)
                .await
                .map_err(RegistryError::etcd("granting a lease")),
        )?;
        Ok(resp.id())
    }

    /// Best effort: a grant we no longer use would otherwise linger until its TTL.
    async fn revoke(&self, grant_id: i64) {
        if let Err(e) = self.client.clone().lease_revoke(grant_id).await {
            tracing::debug!(grant_id, error = %e, "revoking an unused etcd lease grant failed");
        }
    }

    fn held(&self, key: &SubnetKey, attrs: &LeaseAttrs, grant_id: i64, ttl: Duration) -> HeldLease {
        HeldLease {
            key: key.clone(),
            attrs: attrs.clone(),
            grant_id,
            ttl,
            expires_at: tokio::time::Instant::now() + ttl,
        }
    }

    /// Writes a lease key only if it does not exist yet. `Ok(None)`: someone else holds it.
    pub async fn create_lease(
        &self,
        key: &SubnetKey,
        attrs: &LeaseAttrs,
        ttl: Duration,
    ) -> Result<Option<HeldLease>, RegistryError> {
        self.put_if(key, attrs, ttl, Some((CompareOp::Equal, "creating")))
            .await
    }

    /// Re-puts a lease key under a fresh grant. With `must_exist`, only while the key is still
    /// there (`Ok(None)` when it was deleted: the caller acquires again rather than resurrect a
    /// subnet another node may have taken meanwhile).
    pub async fn put_lease(
        &self,
        key: &SubnetKey,
        attrs: &LeaseAttrs,
        ttl: Duration,
        must_exist: bool,
    ) -> Result<Option<HeldLease>, RegistryError> {
        let condition = must_exist.then_some((CompareOp::Greater, "writing"));
        self.put_if(key, attrs, ttl, condition).await
    }

    /// Puts `attrs` at `key` under a new grant of `ttl`, in a transaction that requires the
    /// key's version to compare to 0 as given (Equal: absent; Greater: present), if any.
    /// On a failed condition the unused grant is revoked and `Ok(None)` returned.
    async fn put_if(
        &self,
        key: &SubnetKey,
        attrs: &LeaseAttrs,
        ttl: Duration,
        condition: Option<(CompareOp, &str)>,
    ) -> Result<Option<HeldLease>, RegistryError> {
        let full = key.to_key(&self.prefix);
        let (when, verb) = match condition {
            Some((op, verb)) => (vec![Compare::version(full.as_str(), op, 0)], verb),
            None => (Vec::new(), "writing"),
        };
        let (held, _) = self.put_when(key, attrs, ttl, when, verb).await?;
        Ok(held)
    }

    /// Puts `attrs` at `key` under a new grant of `ttl` if `when` holds; otherwise revokes the
    /// unused grant and reads the key instead. Returns what was put, and the transaction's
    /// answer (the key as it is, when the put did not happen).
    async fn put_when(
        &self,
        key: &SubnetKey,
        attrs: &LeaseAttrs,
        ttl: Duration,
        when: Vec<Compare>,
        verb: &str,
    ) -> Result<(Option<HeldLease>, etcd_client::TxnResponse), RegistryError> {
        let full = key.to_key(&self.prefix);
        let grant_id = self.grant(ttl).await?;
        let put = TxnOp::put(
            full.as_str(),
            attrs.to_json(),
            Some(PutOptions::new().with_lease(grant_id)),
        );
        let txn = Txn::new()
            .when(when)
            .and_then([put])
            .or_else([TxnOp::get(full.as_str(), None)]);
        let resp = self.count_err(
            self.client
                .clone()
                .txn(txn)
                .await
                .map_err(RegistryError::etcd(format!("{verb} {full}"))),
        );
        let resp = match resp {
            Ok(resp) => resp,
            Err(e) => {
                self.release_if_unused(key, grant_id).await;
                return Err(e);
            }
        };
        if resp.succeeded() {
            Ok((Some(self.held(key, attrs, grant_id, ttl)), resp))
        } else {
            self.revoke(grant_id).await;
            Ok((None, resp))
        }
    }

    /// After a write whose answer was an error: revokes its grant unless the key is on it.
    /// Else each failed attempt (a role that may grant but not write, say) would leave a grant
    /// behind for its whole TTL; but a write that committed before its answer was lost put
    /// the key on that grant, and revoking it would delete the key (the caller finds our value
    /// on a grant it does not know at its next try, and takes it back). When even the read
    /// fails, the grant is left to expire.
    async fn release_if_unused(&self, key: &SubnetKey, grant_id: i64) {
        match self.lease_key_now(key).await {
            Ok(Some(now)) if now.grant == grant_id => {}
            Ok(_) => self.revoke(grant_id).await,
            Err(e) => {
                tracing::debug!(grant_id, "not revoking the grant of a failed write: {e}");
            }
        }
    }

    /// Renews a held lease: the same value under a fresh grant, only while the key is still
    /// attached to ours (its value could be anyone's otherwise: a renewal would undo what the
    /// daemon decided about a rewrite, or land after it moved on). The old grant is the
    /// caller's to release, once it knows the new one.
    pub async fn renew(&self, held: &HeldLease) -> Result<Renewal, RegistryError> {
        let full = held.key.to_key(&self.prefix);
        let ours = Compare::lease(full.as_str(), CompareOp::Equal, held.grant_id);
        let (renewed, resp) = self
            .put_when(&held.key, &held.attrs, held.ttl, vec![ours], "renewing")
            .await?;
        if let Some(renewed) = renewed {
            RegistryStats::bump(&self.stats.lease_renewals);
            return Ok(Renewal::Renewed(Box::new(renewed)));
        }
        let exists = resp.op_responses().into_iter().any(|r| match r {
            TxnOpResponse::Get(g) => !g.kvs().is_empty(),
            _ => false,
        });
        Ok(if exists {
            Renewal::Rewritten
        } else {
            Renewal::Gone
        })
    }

    /// Every key under `prefix` with its value and the revision it was last written at, and
    /// the store's revision (the listing's header).
    pub async fn get_prefix(&self, prefix: &str) -> Result<RawList, RegistryError> {
        let resp = self.count_err(
            self.client
                .clone()
                .get(prefix, Some(GetOptions::new().with_prefix()))
                .await
                .map_err(RegistryError::etcd(format!("listing {prefix}"))),
        )?;
        Ok(RawList {
            revision: resp.header().map(|h| h.revision()).unwrap_or_default(),
            cluster_id: resp.header().map(|h| h.cluster_id()).unwrap_or_default(),
            kvs: resp
                .kvs()
                .iter()
                .map(|kv| RawKv {
                    key: String::from_utf8_lossy(kv.key()).into_owned(),
                    value: kv.value().to_vec(),
                    mod_revision: kv.mod_revision(),
                })
                .collect(),
        })
    }

    /// Writes one key, under etcd lease `grant` if given; returns the store revision after.
    pub async fn put_raw(
        &self,
        key: &str,
        value: Vec<u8>,
        grant: Option<i64>,
    ) -> Result<i64, RegistryError> {
        let opts = grant.map(|g| PutOptions::new().with_lease(g));
        let resp = self.count_err(
            self.client
                .clone()
                .put(key, value, opts)
                .await
                .map_err(RegistryError::etcd(format!("writing {key}"))),
        )?;
        Ok(resp.header().map(|h| h.revision()).unwrap_or_default())
    }

    /// Deletes one key; returns whether it existed and the store revision after.
    pub async fn delete_raw(&self, key: &str) -> Result<(bool, i64), RegistryError> {
        let resp = self.count_err(
            self.client
                .clone()
                .delete(key, None)
                .await
                .map_err(RegistryError::etcd(format!("deleting {key}"))),
        )?;
        Ok((
            resp.deleted() > 0,
            resp.header().map(|h| h.revision()).unwrap_or_default(),
        ))
    }

    /// Deletes `key` only if it was last written at `mod_revision` (nobody rewrote it since
    /// we read it). Returns whether it was deleted.
    pub async fn delete_if_unchanged(
        &self,
        key: &str,
        mod_revision: i64,
    ) -> Result<bool, RegistryError> {
        let txn = Txn::new()
            .when([Compare::mod_revision(key, CompareOp::Equal, mod_revision)])
            .and_then([TxnOp::delete(key, None)]);
        let resp = self.count_err(
            self.client
                .clone()
                .txn(txn)
                .await
                .map_err(RegistryError::etcd(format!("deleting {key}"))),
        )?;
        Ok(resp.succeeded())
    }

    /// A new etcd lease grant of `ttl` for keys that should vanish when we stop renewing.
    pub async fn grant_raw(&self, ttl: Duration) -> Result<i64, RegistryError> {
        self.grant(ttl).await
    }

    /// Renews a grant once; `Ok(false)` when etcd no longer knows it (expired).
    pub async fn keep_alive_once(&self, grant_id: i64) -> Result<bool, RegistryError> {
        let (mut keeper, mut stream) = self.count_err(
            self.client
                .clone()
                .lease_keep_alive(grant_id)
                .await
                .map_err(RegistryError::etcd("renewing a lease grant")),
        )?;
        self.count_err(
            keeper
                .keep_alive()
                .await
                .map_err(RegistryError::etcd("renewing a lease grant")),
        )?;
        let resp = self.count_err(
            stream
                .message()
                .await
                .map_err(RegistryError::etcd("renewing a lease grant")),
        )?;
        Ok(resp.is_some_and(|r| r.ttl() > 0))
    }

    /// A lease key as it is now (`None` when it is gone).
    pub async fn lease_key_now(&self, key: &SubnetKey) -> Result<Option<KeyNow>, RegistryError> {
        let full = key.to_key(&self.prefix);
        let resp = self.count_err(
            self.client
                .clone()
                .get(full.as_str(), None)
                .await
                .map_err(RegistryError::etcd(format!("reading {full}"))),
        )?;
        Ok(resp.kvs().first().map(|kv| KeyNow {
            grant: kv.lease(),
            value: kv.value().to_vec(),
            mod_revision: kv.mod_revision(),
        }))
    }

    /// Puts our lease back over a key we read at `mod_revision` ([`lease_key_now`]), only if
    /// nobody wrote it since: what we decided from that read may not hold for a newer value
    /// (a node that took the subnet meanwhile). `Ok(None)`: it changed; read it again.
    ///
    /// [`lease_key_now`]: Self::lease_key_now
    pub async fn put_lease_over(
        &self,
        key: &SubnetKey,
        attrs: &LeaseAttrs,
        ttl: Duration,
        mod_revision: i64,
    ) -> Result<Option<HeldLease>, RegistryError> {
        let full = key.to_key(&self.prefix);
        let unchanged = Compare::mod_revision(full.as_str(), CompareOp::Equal, mod_revision);
        let (held, _) = self
            .put_when(key, attrs, ttl, vec![unchanged], "writing")
            .await?;
        Ok(held)
    }

    /// Best effort: lets go of a grant we stopped using (a key that moved to another grant
    /// leaves it holding nothing until its TTL, 24 h).
    pub async fn release_grant(&self, grant_id: i64) {
        // 0 is no grant (a key written with a plain put).
        if grant_id != 0 {
            self.revoke(grant_id).await;
        }
    }

    pub async fn delete_lease(&self, key: &SubnetKey) -> Result<(), RegistryError> {
        let full = key.to_key(&self.prefix);
        self.count_err(
            self.client
                .clone()
                .delete(full.as_str(), None)
                .await
                .map_err(RegistryError::etcd(format!("deleting {full}"))),
        )?;
        Ok(())
    }
}

fn tls_options(opts: &EtcdOptions) -> Result<Option<TlsOptions>, RegistryError> {
    let read = |path: &String| {
        std::fs::read(path).map_err(|source| RegistryError::TlsFile {
            path: path.clone(),
            source,
        })
    };
    match (&opts.certfile, &opts.keyfile) {
        (None, None) => Ok(None),
        (Some(cert), Some(key)) => {
            let mut tls =
                TlsOptions::new().identity(TlsIdentity::from_pem(read(cert)?, read(key)?));
            if let Some(ca) = &opts.cafile {
                tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
            }
            Ok(Some(tls))
        }
        _ => Err(RegistryError::TlsIncomplete),
    }
}
