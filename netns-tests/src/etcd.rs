//! A real etcd (Debian's etcd-server 3.4) on a private data dir, for one test.

use std::net::TcpListener;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use tempfile::TempDir;

use crate::proc::{self, Daemon};
use crate::wait_until;

pub struct Etcd {
    /// `http://IP:PORT`, for the daemons' `--etcd-endpoints`.
    pub endpoint: String,
    ns: Option<String>,
    daemon: Daemon,
    _data: TempDir,
}

/// Two ports that were free a moment ago on the host's loopback.
fn free_ports() -> Result<(u16, u16)> {
    let a = TcpListener::bind("127.0.0.1:0")?;
    let b = TcpListener::bind("127.0.0.1:0")?;
    Ok((a.local_addr()?.port(), b.local_addr()?.port()))
}

impl Etcd {
    /// On the host's loopback, on free ports (no root needed).
    pub fn on_loopback(workdir: &Path) -> Result<Self> {
        let (client, peer) = free_ports()?;
        Self::start(None, "127.0.0.1", client, peer, workdir)
    }

    /// Inside namespace `ns`, listening on `ip:2379` (the namespace has its own ports).
    pub fn in_netns(ns: &str, ip: &str, workdir: &Path) -> Result<Self> {
        Self::start(Some(ns), ip, 2379, 2380, workdir)
    }

    fn start(ns: Option<&str>, ip: &str, client: u16, peer: u16, workdir: &Path) -> Result<Self> {
        let data = tempfile::Builder::new()
            .prefix("etcd-data")
            .tempdir_in(workdir)
            .context("creating the etcd data dir")?;
        let endpoint = format!("http://{ip}:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let args: Vec<String> = [
            "--name=t",
            &format!("--data-dir={}", data.path().display()),
            &format!("--listen-client-urls={endpoint}"),
            &format!("--advertise-client-urls={endpoint}"),
            &format!("--listen-peer-urls={peer_url}"),
            &format!("--initial-advertise-peer-urls={peer_url}"),
            &format!("--initial-cluster=t={peer_url}"),
            "--logger=zap",
            "--log-level=warn",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let daemon = Daemon::spawn(
            "etcd",
            ns,
            Path::new("/usr/bin/etcd"),
            &args,
            &[],
            &workdir.join("etcd.log"),
        )?;
        let etcd = Etcd {
            endpoint,
            ns: ns.map(str::to_string),
            daemon,
            _data: data,
        };
        wait_until("etcd to answer", Duration::from_secs(20), || {
            etcd.ctl(&["endpoint", "health"]).is_ok()
        })?;
        Ok(etcd)
    }

    /// Runs `etcdctl` (v3 API) against this etcd.
    pub fn ctl(&self, args: &[&str]) -> Result<String> {
        let ep = format!("--endpoints={}", self.endpoint);
        let mut all = vec![
            "ETCDCTL_API=3",
            "etcdctl",
            ep.as_str(),
            "--command-timeout=5s",
        ];
        all.extend_from_slice(args);
        match &self.ns {
            Some(ns) => proc::run_in(ns, "env", &all),
            None => proc::run("env", &all),
        }
    }

    pub fn put(&self, key: &str, value: &str) -> Result<()> {
        self.ctl(&["put", key, value]).map(drop)
    }

    pub fn get(&self, key: &str) -> Result<Option<String>> {
        let out = self.ctl(&["get", key, "--print-value-only"])?;
        let v = out.trim_end_matches('\n');
        Ok((!out.is_empty()).then(|| v.to_string()))
    }

    /// Keys (with values) under a prefix, in etcd's order.
    pub fn list(&self, prefix: &str) -> Result<Vec<(String, String)>> {
        let out = self.ctl(&["get", prefix, "--prefix"])?;
        let lines: Vec<&str> = out.lines().collect();
        Ok(lines
            .chunks(2)
            .filter(|c| c.len() == 2)
            .map(|c| (c[0].to_string(), c[1].to_string()))
            .collect())
    }

    pub fn pid(&self) -> Option<u32> {
        self.daemon.pid()
    }
}
