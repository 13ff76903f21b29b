//! ADD, DEL and CHECK: subnet.env and our config in, the delegate plugin does the work; ADD
//! and DEL also hand the pod's record to the daemon and take it back (`handover`).
//! GC and STATUS (CNI 1.1.0) succeed without doing anything, as Flannel's do.

use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};
use subnet_manager::subnet_env::SubnetEnv;

use super::args::{CniArgs, Command, Environment};
use super::conf::NetConf;
use super::daemon_api::{self, DaemonApi};
use super::error::CniError;
use super::handover;
use super::pod::{self, PodId, PodLabels};
use super::saved::SavedConfigs;
use super::{delegate, invoke};

/// How long ADD waits for subnet.env to appear (or be complete) before giving up, and for
/// the daemon to answer a request about a pod.
#[derive(Debug, Clone)]
pub struct Options {
    pub subnet_env_wait: Duration,
    pub subnet_env_poll: Duration,
    pub daemon_timeout: Duration,
}

impl Default for Options {
    /// flanneld writes subnet.env within moments of starting; kubelet retries ADD anyway, so
    /// waiting a few seconds turns a start-up race into a slow ADD instead of a failed pod.
    fn default() -> Self {
        Options {
            subnet_env_wait: Duration::from_secs(5),
            subnet_env_poll: Duration::from_millis(100),
            // Well inside kubelet's CNI call budget, and far longer than a healthy daemon
            // needs to store one record.
            daemon_timeout: Duration::from_secs(10),
        }
    }
}

/// ADD: returns the delegate's result unchanged, once the daemon has the pod's record.
pub fn add(
    args: &CniArgs,
    conf: &NetConf,
    env: &Environment,
    opts: &Options,
) -> Result<Vec<u8>, CniError> {
    // Checked before anything runs: a pod we could not describe needs nothing undone.
    let pod = PodId::from_env(env, &args.container_id)?;
    let labels = PodLabels::from_args(conf.args.as_ref())?;
    let subnet_env = read_subnet_env(&conf.subnet_file, opts)?;
    let delegate = delegate::build(conf, &subnet_env)?;
    let plugin = plugin_type(&delegate)
        .unwrap_or(delegate::DEFAULT_TYPE)
        .to_string();
    // Found before anything is saved: a missing plugin leaves no config that would make every
    // later DEL fail too.
    let plugin_path = invoke::find_in_path(&plugin, &args.path)?;
    let bytes = delegate::to_json(delegate);
    let saved = SavedConfigs::new(&conf.data_dir);
    // Saved before the delegate runs, so a DEL after a crash mid-ADD can still clean up.
    saved.save(&args.container_id, &bytes)?;

    let api = daemon_api(conf, opts);
    let added = invoke::exec(&plugin_path, &plugin, Command::Add, &bytes, env).and_then(|out| {
        let result = delegate_result(&plugin, &out)?;
        let ips = pod::pod_ips(&result).map_err(|reason| CniError::NoPodIp {
            plugin: plugin.clone(),
            reason,
        })?;
        let record = pod::record(&pod, &args.container_id, &labels, &ips);
        let pending = handover::pending_dir(&conf.subnet_file);
        handover::put_pod(&api, &pod, &args.container_id, &record, &pending)?;
        Ok(out)
    });
    // A record the daemon stored but could not confirm (a timeout) is not taken back here:
    // the runtime DELs a failed ADD, and our DEL deletes it then.
    let failure = match added {
        Ok(out) => return Ok(out),
        Err(e) => e,
    };
    // Undo whatever the delegate did before failing (veth, IPAM allocation). If that fails too,
    // the saved config stays for the runtime's own DEL to try once more with.
    match invoke::exec(&plugin_path, &plugin, Command::Del, &bytes, env) {
        Ok(_) => {
            if let Err(e) = saved.remove(&args.container_id) {
                eprintln!("flannel: after failed ADD: {e}");
            }
        }
        Err(e) => eprintln!("flannel: cleanup after failed ADD: {e}"),
    }
    Err(failure)
}

/// DEL: undoes the delegate, then takes the pod's record back from the daemon whatever the
/// delegate's DEL did; the daemon's answer never fails DEL (see `handover::delete_pod`).
pub fn del(
    args: &CniArgs,
    conf: &NetConf,
    env: &Environment,
    opts: &Options,
) -> Result<Vec<u8>, CniError> {
    let undone = del_delegate(args, conf, env);
    // Also without a saved config: an ADD whose PUT timed out may still have left a record.
    match PodId::from_env(env, &args.container_id) {
        Ok(pod) => {
            let dropped = handover::drop_pending(
                &handover::pending_dir(&conf.subnet_file),
                &pod,
                &args.container_id,
            );
            // A record still pending that no daemon ever had: no tombstone if none answers.
            let never_sent = dropped == Some(handover::Sent::Never);
            let gone = (!never_sent).then(|| handover::gone_dir(&conf.subnet_file));
            handover::delete_pod(
                &daemon_api(conf, opts),
                &pod,
                &args.container_id,
                gone.as_deref(),
            );
        }
        // ADD refuses such a pod, so the daemon has no record of it.
        Err(e) => eprintln!("flannel: no pod record to delete: {e}"),
    }
    undone
}

/// DEL's delegate part: runs the delegate with the config ADD saved; no saved config means
/// nothing to undo. The saved config is removed even when the delegate's DEL fails, as Flannel
/// v1.9 does.
fn del_delegate(args: &CniArgs, conf: &NetConf, env: &Environment) -> Result<Vec<u8>, CniError> {
    let saved = SavedConfigs::new(&conf.data_dir);
    let Some(bytes) = saved.load(&args.container_id)? else {
        return Ok(Vec::new());
    };
    let plugin = match parse_saved(&saved, &args.container_id, &bytes) {
        Ok(map) => plugin_type(&map).map(str::to_string),
        Err(_) => None,
    };
    let Some(plugin) = plugin else {
        // Nothing can be run with it, and failing would block the pod's teardown forever;
        // Flannel's plugin also reports success here.
        eprintln!(
            "flannel: saved delegate config {} is unreadable; removed without running a delegate",
            saved.path(&args.container_id).display()
        );
        saved.remove(&args.container_id)?;
        return Ok(Vec::new());
    };
    let ran = invoke::run(&plugin, &args.path, Command::Del, &bytes, env);
    // Kept, the config would make every retried DEL run the same failing delegate (a plugin
    // gone from CNI_PATH, a delegate that cannot undo its own state) and block the pod's
    // teardown for good. Whatever that delegate left behind stays, as with Flannel's plugin.
    let removed = saved.remove(&args.container_id);
    match (ran, removed) {
        (Ok(_), removed) => removed.map(|()| Vec::new()),
        (Err(e), Ok(())) => Err(e),
        (Err(e), Err(also)) => {
            eprintln!("flannel: after failed DEL: {also}");
            Err(e)
        }
    }
}

/// CHECK: the pod must have a saved, readable delegate config (ADD ran and DEL did not).
///
/// Go's plugin answers CHECK with success and nothing else. We check our own state but do not
/// run the delegate's CHECK: Debian's `bridge` (1.1.x) fails it on every healthy pod, because
/// it installs our gateway-less IPAM routes via the gateway and then looks them up without one.
pub fn check(args: &CniArgs, conf: &NetConf, _env: &Environment) -> Result<Vec<u8>, CniError> {
    let saved = SavedConfigs::new(&conf.data_dir);
    let Some(bytes) = saved.load(&args.container_id)? else {
        return Err(CniError::NoSavedConfig(saved.path(&args.container_id)));
    };
    let delegate = parse_saved(&saved, &args.container_id, &bytes)?;
    if plugin_type(&delegate).is_none() {
        return Err(CniError::CorruptSavedConfig {
            path: saved.path(&args.container_id),
            reason: "no string \"type\"".into(),
        });
    }
    Ok(Vec::new())
}

/// GC: nothing of ours to collect. libcni first DELs every cached attachment that is not in
/// `cni.dev/valid-attachments`, which removes those saved configs through `del`; only then does
/// it send GC, which Flannel's plugin answers with success and no output.
pub fn gc(_conf: &NetConf) -> Result<Vec<u8>, CniError> {
    Ok(Vec::new())
}

/// STATUS: ready, as Flannel's plugin always answers. Not even a missing subnet.env makes us
/// say otherwise: ADD waits a few seconds for it, and flanneld normally writes it by then.
pub fn status(_conf: &NetConf) -> Result<Vec<u8>, CniError> {
    Ok(Vec::new())
}

/// Reads subnet.env, waiting while it is missing or incomplete (flanneld starting up).
fn read_subnet_env(path: &Path, opts: &Options) -> Result<SubnetEnv, CniError> {
    let start = Instant::now();
    loop {
        match SubnetEnv::read(path) {
            Ok(env) => return Ok(env),
            Err(e) if e.is_not_found() || e.is_incomplete() => {
                if start.elapsed() >= opts.subnet_env_wait {
                    return Err(CniError::SubnetEnvNotReady {
                        waited_ms: start.elapsed().as_millis(),
                        source: e,
                    });
                }
                thread::sleep(opts.subnet_env_poll);
            }
            Err(e) => return Err(CniError::SubnetEnv(e)),
        }
    }
}

fn parse_saved(
    saved: &SavedConfigs,
    container_id: &str,
    bytes: &[u8],
) -> Result<Map<String, Value>, CniError> {
    let corrupt = |reason: String| CniError::CorruptSavedConfig {
        path: saved.path(container_id),
        reason,
    };
    match serde_json::from_slice(bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(corrupt("not a JSON object".into())),
        Err(e) => Err(corrupt(e.to_string())),
    }
}

/// The delegate's ADD result: it must be a JSON object, or there is nothing to relay.
fn delegate_result(plugin: &str, out: &[u8]) -> Result<Value, CniError> {
    match serde_json::from_slice::<Value>(out) {
        Ok(v) if v.is_object() => Ok(v),
        _ => Err(CniError::DelegateFailed {
            plugin: plugin.to_string(),
            command: "ADD",
            message: format!(
                "it succeeded but printed no JSON result: {:?}",
                String::from_utf8_lossy(out)
            ),
            raw: None,
        }),
    }
}

fn daemon_api(conf: &NetConf, opts: &Options) -> DaemonApi {
    DaemonApi::new(
        daemon_api::socket_path(&conf.subnet_file),
        opts.daemon_timeout,
    )
}

fn plugin_type(conf: &Map<String, Value>) -> Option<&str> {
    conf.get("type").and_then(Value::as_str)
}
