//! A real etcd (Debian's etcd-server 3.4) on a private data dir, for one test; plain, or with
//! TLS (certificates made with `openssl` for the test) and optionally user authentication.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use tempfile::TempDir;

use crate::proc::{self, Daemon};
use crate::wait_until;

/// The etcd server, found on the PATH: Debian's `etcd-server` puts it in /usr/bin, and the
/// benchmark bundle for machines without packages (`scripts/bench-bundle.sh`) puts its own first.
pub const ETCD: &str = "etcd";

pub struct Etcd {
    /// `http://IP:PORT` (`https://` with TLS), for the daemons' `--etcd-endpoints`.
    pub endpoint: String,
    ns: Option<String>,
    daemon: Daemon,
    /// Client certificates etcdctl presents, when the server wants TLS.
    tls: Option<TlsFiles>,
    /// `user:password` etcdctl authenticates with once auth is enabled (root).
    ctl_user: Option<String>,
    _data: TempDir,
    /// How it was started, to start it again (`restart`).
    args: Vec<String>,
    workdir: PathBuf,
}

/// A test CA and certificates signed by it, as PEM files (made by `TlsFiles::generate`).
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl TlsFiles {
    /// Makes a CA, a server certificate valid for `server_ips` and a client certificate, all
    /// P-256 (fast to generate), in `dir`.
    pub fn generate(dir: &Path, server_ips: &[&str]) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let p = |name: &str| dir.join(name);
        let s = |path: &PathBuf| path.to_string_lossy().into_owned();
        let files = TlsFiles {
            ca: p("ca.crt"),
            server_cert: p("server.crt"),
            server_key: p("server.key"),
            client_cert: p("client.crt"),
            client_key: p("client.key"),
        };
        let ca_key = p("ca.key");
        let key = |path: &PathBuf| {
            proc::run(
                "openssl",
                &[
                    "genpkey",
                    "-algorithm",
                    "EC",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                    "-out",
                    &s(path),
                ],
            )
        };
        key(&ca_key)?;
        proc::run(
            "openssl",
            &[
                "req",
                "-x509",
                "-new",
                "-key",
                &s(&ca_key),
                "-days",
                "2",
                "-subj",
                "/CN=flanneld-rs test CA",
                "-out",
                &s(&files.ca),
            ],
        )?;
        let sans: Vec<String> = server_ips.iter().map(|ip| format!("IP:{ip}")).collect();
        let leaf = |cert: &PathBuf, key_path: &PathBuf, cn: &str, ext: String| -> Result<()> {
            key(key_path)?;
            let csr = dir.join(format!("{cn}.csr"));
            let ext_file = dir.join(format!("{cn}.ext"));
            std::fs::write(&ext_file, ext)?;
            proc::run(
                "openssl",
                &[
                    "req",
                    "-new",
                    "-key",
                    &s(key_path),
                    "-subj",
                    &format!("/CN={cn}"),
                    "-out",
                    &s(&csr),
                ],
            )?;
            proc::run(
                "openssl",
                &[
                    "x509",
                    "-req",
                    "-in",
                    &s(&csr),
                    "-CA",
                    &s(&files.ca),
                    "-CAkey",
                    &s(&ca_key),
                    "-CAcreateserial",
                    "-days",
                    "2",
                    "-extfile",
                    &s(&ext_file),
                    "-out",
                    &s(cert),
                ],
            )
            .map(drop)
        };
        leaf(
            &files.server_cert,
            &files.server_key,
            "etcd-server",
            format!(
                "subjectAltName={}\nextendedKeyUsage=serverAuth,clientAuth\n",
                sans.join(",")
            ),
        )?;
        leaf(
            &files.client_cert,
            &files.client_key,
            "flanneld-rs",
            "extendedKeyUsage=clientAuth\n".to_string(),
        )?;
        Ok(files)
    }
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

    /// Inside namespace `ns` on `https://ip:2379`, demanding client certificates signed by
    /// `tls.ca`; `extra` goes to etcd as is (e.g. `--auth-token-ttl=2`).
    pub fn in_netns_tls(
        ns: &str,
        ip: &str,
        workdir: &Path,
        tls: &TlsFiles,
        extra: &[&str],
    ) -> Result<Self> {
        Self::start_with(Some(ns), ip, 2379, 2380, workdir, Some(tls), extra)
    }

    fn start(ns: Option<&str>, ip: &str, client: u16, peer: u16, workdir: &Path) -> Result<Self> {
        Self::start_with(ns, ip, client, peer, workdir, None, &[])
    }

    fn start_with(
        ns: Option<&str>,
        ip: &str,
        client: u16,
        peer: u16,
        workdir: &Path,
        tls: Option<&TlsFiles>,
        extra: &[&str],
    ) -> Result<Self> {
        let data = tempfile::Builder::new()
            .prefix("etcd-data")
            .tempdir_in(workdir)
            .context("creating the etcd data dir")?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let endpoint = format!("{scheme}://{ip}:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let mut args: Vec<String> = [
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
        if let Some(t) = tls {
            args.extend([
                format!("--cert-file={}", t.server_cert.display()),
                format!("--key-file={}", t.server_key.display()),
                format!("--trusted-ca-file={}", t.ca.display()),
                "--client-cert-auth".to_string(),
            ]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let daemon = Daemon::spawn(
            "etcd",
            ns,
            Path::new(ETCD),
            &args,
            &[],
            &workdir.join("etcd.log"),
        )?;
        let etcd = Etcd {
            endpoint,
            ns: ns.map(str::to_string),
            daemon,
            tls: tls.cloned(),
            ctl_user: None,
            _data: data,
            args,
            workdir: workdir.to_path_buf(),
        };
        wait_until("etcd to answer", Duration::from_secs(20), || {
            etcd.ctl(&["endpoint", "health"]).is_ok()
        })?;
        Ok(etcd)
    }

    /// Stops etcd, and unless `wipe` leaves its data; `start_again` starts it on the same
    /// address. Split in two so a test can act while etcd is away.
    pub fn stop(&mut self) {
        self.daemon.stop(Duration::from_secs(5));
    }

    /// Starts etcd again after `stop`: with its data, or (`wipe`) with a fresh data dir, so its
    /// revisions start from 1 again and its cluster ID changes.
    pub fn start_again(&mut self, wipe: bool) -> Result<()> {
        if wipe {
            let data = tempfile::Builder::new()
                .prefix("etcd-data")
                .tempdir_in(&self.workdir)
                .context("creating the etcd data dir")?;
            for a in &mut self.args {
                if a.starts_with("--data-dir=") {
                    *a = format!("--data-dir={}", data.path().display());
                }
            }
            self._data = data;
        }
        self.daemon = Daemon::spawn(
            "etcd",
            self.ns.as_deref(),
            Path::new(ETCD),
            &self.args,
            &[],
            &self.workdir.join("etcd.log"),
        )?;
        wait_until("etcd to answer again", Duration::from_secs(20), || {
            self.ctl(&["endpoint", "health"]).is_ok()
        })
        .map(drop)
    }

    /// Runs `etcdctl` (v3 API) against this etcd.
    pub fn ctl(&self, args: &[&str]) -> Result<String> {
        let ep = format!("--endpoints={}", self.endpoint);
        let mut owned = Vec::new();
        if let Some(t) = &self.tls {
            owned.push(format!("--cacert={}", t.ca.display()));
            owned.push(format!("--cert={}", t.client_cert.display()));
            owned.push(format!("--key={}", t.client_key.display()));
        }
        if let Some(user) = &self.ctl_user {
            owned.push(format!("--user={user}"));
        }
        let mut all = vec![
            "ETCDCTL_API=3",
            "etcdctl",
            ep.as_str(),
            "--command-timeout=5s",
        ];
        all.extend(owned.iter().map(String::as_str));
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

    /// Turns on etcd's authentication: a `root` user (for etcdctl from now on) and `user`,
    /// allowed to read and write under `prefix` only, as an operator would set Flannel up.
    pub fn enable_auth(&mut self, user: &str, password: &str, prefix: &str) -> Result<()> {
        let root = "root:root-secret";
        self.ctl(&["user", "add", root])?;
        self.ctl(&["user", "grant-role", "root", "root"])?;
        self.ctl(&["role", "add", "flannel"])?;
        self.ctl(&[
            "role",
            "grant-permission",
            "flannel",
            "--prefix=true",
            "readwrite",
            prefix,
        ])?;
        self.ctl(&["user", "add", &format!("{user}:{password}")])?;
        self.ctl(&["user", "grant-role", user, "flannel"])?;
        self.ctl(&["auth", "enable"])?;
        self.ctl_user = Some(root.to_string());
        Ok(())
    }

    /// After [`enable_auth`](Self::enable_auth): its role may read `prefix` but no longer
    /// write it (as a full database or a read-only role refuses a node's writes).
    pub fn make_read_only(&self, prefix: &str) -> Result<()> {
        self.ctl(&[
            "role",
            "revoke-permission",
            "flannel",
            "--prefix=true",
            prefix,
        ])?;
        self.ctl(&[
            "role",
            "grant-permission",
            "flannel",
            "--prefix=true",
            "read",
            prefix,
        ])
        .map(drop)
    }

    /// The TLS files this etcd was started with, if any.
    pub fn tls(&self) -> Option<&TlsFiles> {
        self.tls.as_ref()
    }

    /// etcdctl's environment for this etcd (endpoint, certificates, root credentials), for
    /// tools that call etcdctl themselves (e.g. `deploy/etcd-config.sh`).
    pub fn ctl_env(&self) -> Vec<(String, String)> {
        let mut env = vec![("ETCDCTL_ENDPOINTS".to_string(), self.endpoint.clone())];
        if let Some(t) = &self.tls {
            for (k, v) in [
                ("ETCDCTL_CACERT", &t.ca),
                ("ETCDCTL_CERT", &t.client_cert),
                ("ETCDCTL_KEY", &t.client_key),
            ] {
                env.push((k.to_string(), v.display().to_string()));
            }
        }
        if let Some(user) = &self.ctl_user {
            env.push(("ETCDCTL_USER".to_string(), user.clone()));
        }
        env
    }

    /// The namespace etcd runs in (`None`: the host's loopback).
    pub fn netns(&self) -> Option<&str> {
        self.ns.as_deref()
    }
}
