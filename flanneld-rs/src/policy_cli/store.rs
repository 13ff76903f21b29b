//! The records under `<prefix>/policy/` in etcd, reached with the daemon's `--etcd-*` flags.
//! Every failure names the endpoints, so "which etcd?" is never the question.

use anyhow::{Context, Result};
use netpol::ObjectKey;
use subnet_manager::registry::Registry;

use crate::flags::Flags;

pub struct Store {
    registry: Registry,
    /// `<prefix>/policy/`
    base: String,
    endpoints: String,
}

/// One stored record: its key relative to `<prefix>/policy/` and its value.
pub struct Raw {
    pub rel: String,
    pub value: Vec<u8>,
}

impl Store {
    pub async fn connect(flags: &Flags) -> Result<Store> {
        let opts = flags.etcd_options();
        let endpoints = opts.endpoints.join(",");
        let registry = Registry::connect(&opts)
            .await
            .with_context(|| format!("etcd at {endpoints}"))?;
        let base = format!("{}/policy/", registry.prefix());
        Ok(Store {
            registry,
            base,
            endpoints,
        })
    }

    fn ctx(&self) -> String {
        format!("etcd at {}", self.endpoints)
    }

    pub fn full_key(&self, key: &ObjectKey) -> String {
        format!("{}{}", self.base, key.rel())
    }

    /// Every record whose relative key starts with `rel_prefix` (e.g. `networkpolicies/x/`).
    pub async fn list(&self, rel_prefix: &str) -> Result<Vec<Raw>> {
        let prefix = format!("{}{rel_prefix}", self.base);
        let list = self
            .registry
            .get_prefix(&prefix)
            .await
            .with_context(|| self.ctx())?;
        Ok(list
            .kvs
            .into_iter()
            .filter_map(|kv| {
                let rel = kv.key.strip_prefix(&self.base)?.to_string();
                Some(Raw {
                    rel,
                    value: kv.value,
                })
            })
            .collect())
    }

    /// The value at `key`, if there is one.
    pub async fn get(&self, key: &ObjectKey) -> Result<Option<Vec<u8>>> {
        let rel = key.rel();
        Ok(self
            .list(&rel)
            .await?
            .into_iter()
            .find(|r| r.rel == rel)
            .map(|r| r.value))
    }

    pub async fn put(&self, key: &ObjectKey, value: Vec<u8>) -> Result<()> {
        self.registry
            .put_raw(&self.full_key(key), value, None)
            .await
            .with_context(|| self.ctx())?;
        Ok(())
    }

    /// Deletes `key`; whether it was there.
    pub async fn delete(&self, key: &ObjectKey) -> Result<bool> {
        let (existed, _) = self
            .registry
            .delete_raw(&self.full_key(key))
            .await
            .with_context(|| self.ctx())?;
        Ok(existed)
    }
}
