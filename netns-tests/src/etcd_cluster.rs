//! A real 3-member etcd cluster in the underlay namespace, to test that the daemons ride
//! through the loss of the member they talk to.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::proc::{run_in, Daemon};
use crate::wait_until;

pub struct EtcdMembers {
    ns: String,
    pub ips: Vec<String>,
    members: Vec<Option<Daemon>>,
}

impl EtcdMembers {
    /// Starts one member per IP (each added to `dev` in `ns`), clients on `IP:2379`, peers on
    /// `IP:2380`, data under `workdir`.
    pub fn start(ns: &str, dev: &str, ips: &[&str], workdir: &Path) -> Result<Self> {
        for ip in ips {
            let present = run_in(ns, "ip", &["-o", "addr", "show", "dev", dev])?
                .contains(&format!("inet {ip}/"));
            if !present {
                run_in(ns, "ip", &["addr", "add", &format!("{ip}/24"), "dev", dev])?;
            }
        }
        let initial: Vec<String> = ips
            .iter()
            .enumerate()
            .map(|(i, ip)| format!("m{i}=http://{ip}:2380"))
            .collect();
        let mut members = Vec::new();
        for (i, ip) in ips.iter().enumerate() {
            let data = workdir.join(format!("etcd-m{i}"));
            std::fs::create_dir_all(&data)?;
            let args: Vec<String> = vec![
                format!("--name=m{i}"),
                format!("--data-dir={}", data.display()),
                format!("--listen-client-urls=http://{ip}:2379"),
                format!("--advertise-client-urls=http://{ip}:2379"),
                format!("--listen-peer-urls=http://{ip}:2380"),
                format!("--initial-advertise-peer-urls=http://{ip}:2380"),
                format!("--initial-cluster={}", initial.join(",")),
                "--initial-cluster-state=new".into(),
                "--logger=zap".into(),
                "--log-level=warn".into(),
            ];
            let log = workdir.join(format!("etcd-m{i}.log"));
            members.push(Some(Daemon::spawn(
                &format!("etcd-m{i}"),
                Some(ns),
                Path::new(crate::etcd::ETCD),
                &args,
                &[],
                &log,
            )?));
        }
        let cluster = EtcdMembers {
            ns: ns.to_string(),
            ips: ips.iter().map(|s| s.to_string()).collect(),
            members,
        };
        wait_until(
            "the etcd cluster to be healthy",
            Duration::from_secs(30),
            || cluster.ctl(&["endpoint", "health", "--cluster"]).is_ok(),
        )?;
        Ok(cluster)
    }

    /// `http://a:2379,http://b:2379,…` of the members still running.
    pub fn endpoints(&self) -> String {
        self.ips
            .iter()
            .zip(&self.members)
            .filter(|(_, m)| m.is_some())
            .map(|(ip, _)| format!("http://{ip}:2379"))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn ctl(&self, args: &[&str]) -> Result<String> {
        let ep = format!("--endpoints={}", self.endpoints());
        let mut all = vec![
            "ETCDCTL_API=3",
            "etcdctl",
            ep.as_str(),
            "--command-timeout=5s",
        ];
        all.extend_from_slice(args);
        run_in(&self.ns, "env", &all)
    }

    /// Kills member `i` (SIGKILL: no goodbye to its peers or clients).
    pub fn kill(&mut self, i: usize) -> Result<()> {
        let m = self
            .members
            .get_mut(i)
            .and_then(Option::take)
            .context("no such running member")?;
        m.signal(libc::SIGKILL);
        drop(m);
        Ok(())
    }
}
