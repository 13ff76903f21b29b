//! Our pods' records: the CNI plugin hands them over (it holds no etcd credentials), we write
//! them under `<prefix>/policy/pods/<ns>/<name>`, marked as ours and held by an etcd grant we
//! keep alive, so they vanish if this node goes away for good. On start we take back the
//! records we published before (under a fresh grant, with the labels found in etcd, which an
//! operator may have changed) and apply the deletions the plugin could not hand over while we
//! were away (its tombstones).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use netpol::object::{self, ObjectKey};
use serde_json::Value;

use super::Policy;

/// Which node published a record (its lease key): only that node ever removes it, and its
/// record outranks others claiming the same address (`netpol::World`).
pub use netpol::object::OWNER_ANNOTATION;
/// The container the record was made for (set by the CNI plugin).
pub const CONTAINER_ANNOTATION: &str = "flanneld-rs.io/container-id";
/// The plugin's tombstones, beside the socket.
const GONE_DIR: &str = "flanneld-rs-gone";
/// Records the plugin made while no daemon listened.
const PENDING_DIR: &str = "flanneld-rs-pending";
/// How long a pod ADD waits for its own rules to be in force.
pub const IN_FORCE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a publication failed: the caller's fault (400) or ours/etcd's (503).
#[derive(Debug)]
pub enum PublishError {
    Invalid(String),
    Unavailable(String),
}

impl Policy {
    fn pod_key(&self, namespace: &str, name: &str) -> String {
        format!("{}pods/{namespace}/{name}", self.prefix)
    }

    /// Checks and writes a pod record; returns the revision once it is in force here.
    pub async fn publish(
        &self,
        namespace: &str,
        name: &str,
        body: &[u8],
    ) -> Result<i64, PublishError> {
        let okey = ObjectKey::Pod {
            namespace: namespace.to_string(),
            name: name.to_string(),
        };
        let subnet = self.subnet();
        let mut json: Value = serde_json::from_slice(body)
            .map_err(|e| PublishError::Invalid(format!("the pod record is not JSON: {e}")))?;
        let Some(meta) = json.get_mut("metadata").and_then(Value::as_object_mut) else {
            return Err(PublishError::Invalid(
                "the pod record has no metadata".into(),
            ));
        };
        meta.entry("namespace")
            .or_insert_with(|| Value::String(namespace.to_string()));
        let annotations = meta
            .entry("annotations")
            .or_insert_with(|| Value::Object(Default::default()));
        if let Some(a) = annotations.as_object_mut() {
            a.insert(OWNER_ANNOTATION.into(), Value::String(subnet.node.clone()));
        }
        if let Some(status) = json.get_mut("status").and_then(Value::as_object_mut) {
            status.insert("hostIP".into(), Value::String(self.host_ip.to_string()));
        }
        let bytes = serde_json::to_vec(&json)
            .map_err(|e| PublishError::Invalid(format!("re-encoding the record: {e}")))?;
        let pod = match object::parse(&okey, &bytes) {
            Ok(object::Object::Pod(p)) => p,
            Ok(_) => return Err(PublishError::Invalid("not a pod".into())),
            Err(e) => return Err(PublishError::Invalid(e.to_string())),
        };
        if pod.ips.is_empty() {
            return Err(PublishError::Invalid(
                "the pod record has no status.podIP(s)".into(),
            ));
        }
        if let Some(ip) = pod
            .ips
            .iter()
            .find(|ip| !subnet.locality.subnets.iter().any(|n| n.contains(*ip)))
        {
            return Err(PublishError::Invalid(format!(
                "{ip} is not in this node's subnet {}",
                subnet.node
            )));
        }
        let grant = self.grant.load(Ordering::Relaxed);
        let revision = self
            .registry
            .put_raw(
                &self.pod_key(namespace, name),
                bytes,
                (grant != 0).then_some(grant),
            )
            .await
            .map_err(|e| PublishError::Unavailable(e.to_string()))?;
        if !self.wait_programmed(revision, IN_FORCE_TIMEOUT).await {
            return Err(PublishError::Unavailable(format!(
                "the pod's rules were not in force within {} s",
                IN_FORCE_TIMEOUT.as_secs()
            )));
        }
        Ok(revision)
    }

    /// Removes a record we published for `container` (any container when None). Ok(false):
    /// there was none of ours.
    pub async fn unpublish(
        &self,
        namespace: &str,
        name: &str,
        container: Option<&str>,
    ) -> Result<bool> {
        let key = self.pod_key(namespace, name);
        let list = self.registry.get_prefix(&key).await?;
        let Some(kv) = list.kvs.iter().find(|kv| kv.key == key) else {
            return Ok(false);
        };
        if !self.owns(&kv.value, container) {
            return Ok(false);
        }
        // A record rewritten meanwhile (a new pod of the same name) is not ours to remove.
        Ok(self
            .registry
            .delete_if_unchanged(&key, kv.mod_revision)
            .await?)
    }

    /// Whether a record was published by this node (for `container`, if given).
    fn owns(&self, value: &[u8], container: Option<&str>) -> bool {
        let Ok(json) = serde_json::from_slice::<Value>(value) else {
            return false;
        };
        let ann = &json["metadata"]["annotations"];
        let Some(owner) = ann[OWNER_ANNOTATION].as_str() else {
            return false;
        };
        let host = json["status"]["hostIP"].as_str();
        self.subnet.borrow().published_here(owner, host)
            && container.is_none_or(|c| ann[CONTAINER_ANNOTATION].as_str() == Some(c))
    }

    /// Puts our records back under the current grant, keeping what etcd holds for them.
    async fn readopt(&self) -> Result<usize> {
        let grant = self.grant.load(Ordering::Relaxed);
        let list = self
            .registry
            .get_prefix(&format!("{}pods/", self.prefix))
            .await?;
        let mut n = 0;
        for kv in list.kvs.iter().filter(|kv| self.owns(&kv.value, None)) {
            self.registry
                .put_raw(&kv.key, kv.value.clone(), (grant != 0).then_some(grant))
                .await?;
            n += 1;
        }
        Ok(n)
    }

    /// Publishes the records the plugin left while no daemon listened.
    async fn sweep_pending(&self) {
        for path in files_in(&self.state_dir.join(PENDING_DIR)) {
            let Ok(body) = std::fs::read(&path) else {
                continue;
            };
            let json = serde_json::from_slice::<Value>(&body).ok();
            let meta = json.as_ref().map(|j| {
                let m = &j["metadata"];
                (
                    m["namespace"].as_str().unwrap_or("default").to_string(),
                    m["name"].as_str().unwrap_or_default().to_string(),
                )
            });
            let container = json.as_ref().and_then(|j| {
                j["metadata"]["annotations"][CONTAINER_ANNOTATION]
                    .as_str()
                    .map(str::to_string)
            });
            let Some((ns, name)) =
                meta.filter(|(ns, n)| !n.is_empty() && !n.contains('/') && !ns.contains('/'))
            else {
                tracing::warn!(path = %path.display(), "dropping an unreadable pending pod record");
                let _ = std::fs::remove_file(&path);
                continue;
            };
            let pod = format!("{ns}/{name}");
            match self.publish(&ns, &name, &body).await {
                Ok(_) if taken_back(&path) => {
                    // The plugin's DEL dropped the file while we published, and its DELETE
                    // may have come before our record: the pod is gone, so is its record.
                    match self.unpublish(&ns, &name, container.as_deref()).await {
                        Ok(_) => {
                            tracing::info!(pod = %pod, "a pending pod record was deleted while we published it: removed")
                        }
                        Err(e) => {
                            tracing::warn!(pod = %pod, "removing the record of a pod deleted while we published it: {e:#}")
                        }
                    }
                }
                Ok(_) => {
                    tracing::info!(pod = %pod, "published a pod record made while we were away");
                }
                Err(PublishError::Invalid(why)) => {
                    tracing::warn!(path = %path.display(), "dropping a pending pod record: {why}");
                    let _ = std::fs::remove_file(&path);
                }
                Err(PublishError::Unavailable(why)) => {
                    tracing::debug!(path = %path.display(), "pending pod record kept: {why}");
                }
            }
        }
    }

    /// Applies the plugin's tombstones: deletions it could not hand over.
    async fn sweep_tombstones(&self) {
        for path in files_in(&self.state_dir.join(GONE_DIR)) {
            match self.tombstone(&path).await {
                Ok(()) => {
                    let _ = std::fs::remove_file(&path);
                }
                Err(e) => tracing::warn!(path = %path.display(), "pod tombstone kept: {e:#}"),
            }
        }
    }

    async fn tombstone(&self, path: &std::path::Path) -> Result<()> {
        let text = std::fs::read(path).context("reading")?;
        let Ok(json) = serde_json::from_slice::<Value>(&text) else {
            // Not a tombstone the plugin wrote: never retried, never acted on.
            tracing::warn!(path = %path.display(), "ignoring an unreadable pod tombstone");
            return Ok(());
        };
        let field = |k: &str| json[k].as_str().map(str::to_string);
        let (Some(ns), Some(name)) = (field("namespace"), field("name")) else {
            tracing::warn!(path = %path.display(), "ignoring a pod tombstone without namespace and name");
            return Ok(());
        };
        if ns.contains('/') || name.contains('/') {
            bail!("bad names in tombstone");
        }
        let container = field("containerID");
        if self.unpublish(&ns, &name, container.as_deref()).await? {
            tracing::info!(pod = %format!("{ns}/{name}"), "removed the record of a pod deleted while we were away");
        }
        Ok(())
    }
}

/// Removes a pending record once published; true when it was gone already. Only the plugin's
/// DEL drops such a file (before it tells us), so a file gone meanwhile is a pod deleted while
/// we published it. Removing it first makes the order safe: a DEL that drops it later finds it
/// gone and tells us afterwards, when our record is there to be removed.
fn taken_back(path: &std::path::Path) -> bool {
    matches!(std::fs::remove_file(path), Err(e) if e.kind() == std::io::ErrorKind::NotFound)
}

/// A plugin killed while writing leaves its temp file behind: removed after this long.
const STALE_TEMP: Duration = Duration::from_secs(600);

/// The files the plugin left in `dir` (none when it does not exist). Names starting with `.`
/// are the plugin's temp files, written and then renamed into place: one read half written
/// (or taken away before its rename) would be a record or a tombstone lost.
fn files_in(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files = Vec::new();
    for e in entries.flatten() {
        if !e.file_name().as_encoded_bytes().starts_with(b".") {
            files.push(e.path());
            continue;
        }
        let age = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok());
        if age.is_some_and(|a| a > STALE_TEMP) {
            let _ = std::fs::remove_file(e.path());
        }
    }
    files
}

/// Grants, re-adopts and keeps alive our records' etcd grant; sweeps tombstones.
pub async fn upkeep(policy: Arc<Policy>) {
    let ttl = policy.grant_ttl.max(Duration::from_secs(60));
    let every = (ttl / 3).min(Duration::from_secs(10));
    loop {
        if policy.grant.load(Ordering::Relaxed) == 0 {
            match grant_and_readopt(&policy, ttl).await {
                Ok(n) if n > 0 => tracing::info!(records = n, "took back this node's pod records"),
                Ok(_) => {}
                Err(e) => tracing::warn!("pod records: {e:#} (retrying)"),
            }
        } else {
            let grant = policy.grant.load(Ordering::Relaxed);
            match policy.registry.keep_alive_once(grant).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!("our pod records' etcd grant is gone (etcd restored or wiped?); publishing them again");
                    policy.grant.store(0, Ordering::Relaxed);
                    continue;
                }
                Err(e) => tracing::debug!("renewing the pod records' grant: {e}"),
            }
        }
        if policy.grant.load(Ordering::Relaxed) != 0 {
            policy.sweep_tombstones().await;
            policy.sweep_pending().await;
        }
        tokio::time::sleep(every).await;
    }
}

async fn grant_and_readopt(policy: &Policy, ttl: Duration) -> Result<usize> {
    let grant = policy
        .registry
        .grant_raw(ttl)
        .await
        .map_err(|e| anyhow!("granting: {e}"))?;
    policy.grant.store(grant, Ordering::Relaxed);
    policy.readopt().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plugins_temp_files_are_not_swept() {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::write(dir.path().join("x_a_c1"), "{}").expect("write");
        std::fs::write(dir.path().join(".x_b_c2.123.tmp"), "").expect("write");
        assert_eq!(files_in(dir.path()), vec![dir.path().join("x_a_c1")]);
        // A fresh temp file is left for its rename.
        assert!(dir.path().join(".x_b_c2.123.tmp").exists());
        assert!(files_in(&dir.path().join("absent")).is_empty());
    }

    #[test]
    fn a_pending_record_dropped_while_published_reads_as_taken_back() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("prod_db-0_c1");
        std::fs::write(&path, "{}").expect("write");
        assert!(
            !taken_back(&path),
            "still there: published, and removed now"
        );
        assert!(!path.exists());
        // The plugin's DEL dropped it meanwhile.
        assert!(taken_back(&path));
    }
}
