//! Running commands, in a namespace or not, and guarding the long-lived ones.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Runs a command to completion; an error carries its stderr.
pub fn run(prog: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(prog)
        .args(args)
        .output()
        .with_context(|| format!("running {prog}"))?;
    if !out.status.success() {
        bail!(
            "{prog} {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command inside network namespace `ns`.
pub fn run_in(ns: &str, prog: &str, args: &[&str]) -> Result<String> {
    let mut all = vec!["netns", "exec", ns, prog];
    all.extend_from_slice(args);
    run("ip", &all)
}

/// Resident memory of a process in KiB (`VmRSS` in /proc/<pid>/status).
pub fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no VmRSS for pid {pid}"))
}

/// Nanoseconds on a CPU of each thread of process `pid` whose name contains `part`, from
/// the scheduler's own accounting (`schedstat`): exact, where the tick-sampled user and system
/// times miss threads that run in bursts shorter than a tick.
pub fn thread_cpu_ns(pid: u32, part: &str) -> Result<Vec<u64>> {
    let mut ns = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let dir = task?.path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if !comm.contains(part) {
            continue;
        }
        let stat = std::fs::read_to_string(dir.join("schedstat"))?;
        let on_cpu = stat
            .split_whitespace()
            .next()
            .and_then(|f| f.parse().ok())
            .with_context(|| format!("{}: schedstat {stat:?}", dir.display()))?;
        ns.push(on_cpu);
    }
    Ok(ns)
}

/// Kills every process inside a namespace (leftovers of a dead run).
pub fn kill_netns_pids(ns: &str) {
    if let Ok(pids) = run("ip", &["netns", "pids", ns]) {
        for pid in pids
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            // SAFETY: plain kill(2) on a pid read from the namespace.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

/// A background process that is stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Daemon {
    pub name: String,
    child: Option<Child>,
    pub log: PathBuf,
}

impl Daemon {
    /// Starts `prog args` inside `ns` (or in our own namespace when `ns` is None), with its
    /// stdout and stderr going to `log`.
    pub fn spawn(
        name: &str,
        ns: Option<&str>,
        prog: &Path,
        args: &[String],
        envs: &[(&str, &str)],
        log: &Path,
    ) -> Result<Self> {
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        let err = out.try_clone()?;
        let mut cmd = match ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(prog);
                c
            }
            None => Command::new(prog),
        };
        cmd.args(args)
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name} ({})", prog.display()))?;
        Ok(Daemon {
            name: name.to_string(),
            child: Some(child),
            log: log.to_path_buf(),
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    pub fn signal(&self, sig: i32) {
        if let Some(pid) = self.pid() {
            // SAFETY: kill(2) on our own child's pid, which we have not reaped yet.
            unsafe {
                libc::kill(pid as i32, sig);
            }
        }
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL. Returns the exit code if it exited itself.
    pub fn stop(&mut self, grace: Duration) -> Option<i32> {
        let mut child = self.child.take()?;
        if let Ok(Some(status)) = child.try_wait() {
            return status.code();
        }
        // SAFETY: as in `signal`.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let start = Instant::now();
        while start.elapsed() < grace {
            if let Ok(Some(status)) = child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.stop(Duration::from_secs(2));
            if std::thread::panicking() {
                let text = self.log_text();
                let tail: Vec<&str> = text.lines().rev().take(40).collect();
                eprintln!(
                    "---- last lines of {} ({}) ----",
                    self.name,
                    self.log.display()
                );
                for l in tail.iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
    }
}
