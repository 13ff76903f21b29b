//! Handing pod records to the daemon (ADD) and taking them back (DEL).
//!
//! ADD must not succeed without the daemon knowing the pod, or NetworkPolicy would not cover
//! it: any failure here fails ADD. DEL must never block a pod's teardown: when the daemon
//! cannot be told, a tombstone file tells it once it is back.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::daemon_api::{encode_component, state_dir, ApiError, DaemonApi, Response};
use super::error::CniError;
use super::pod::PodId;
use super::saved::write_atomic;

/// Beside subnet.env: one file per pod record the daemon still has to delete.
pub const GONE_DIR_NAME: &str = "flanneld-rs-gone";

/// `<directory of subnetFile>/flanneld-rs-gone`.
pub fn gone_dir(subnet_file: &Path) -> PathBuf {
    state_dir(subnet_file).join(GONE_DIR_NAME)
}

/// `PUT /v1/pods/<ns>/<name>` with the record; success is any 2xx.
/// Where ADD leaves a record when no daemon listens on the socket, for the daemon to publish
/// when it starts (and DEL removes it if the pod goes first).
pub const PENDING_DIR_NAME: &str = "flanneld-rs-pending";

pub fn pending_dir(subnet_file: &Path) -> PathBuf {
    state_dir(subnet_file).join(PENDING_DIR_NAME)
}

/// Hands the record over. When nothing listens on the socket (no file, or connection refused:
/// the daemon is restarting, or this node still runs Go Flannel, which has no socket) the
/// record is left under `pending` and ADD goes on: the network must not wait on policy, and
/// the daemon publishes it when it starts. A daemon that answers but refuses, or does not
/// answer in time, fails ADD.
pub fn put_pod(
    api: &DaemonApi,
    pod: &PodId,
    container_id: &str,
    record: &Value,
    pending: &Path,
) -> Result<(), CniError> {
    let body = serde_json::to_vec(record).map_err(|e| refused(api, pod, e.to_string()))?;
    match api.request("PUT", &pod.api_path(), Some(&body)) {
        Ok(r) if r.is_success() => Ok(()),
        // The daemon cannot publish now (etcd away): it will from the pending directory.
        // It may have written the record before failing (its rules not in force in time):
        // the pending file says so, and DEL then still leaves a tombstone.
        Ok(r) if r.status >= 500 => leave_pending(
            api,
            pod,
            container_id,
            &body,
            pending,
            &status_text(&r),
            Sent::Maybe,
        ),
        Ok(r) => Err(refused(api, pod, status_text(&r))),
        Err(e @ ApiError::BadResponse(_)) => Err(refused(api, pod, e.to_string())),
        // InvalidInput: a socket path too long for a Unix socket, where no daemon can listen.
        Err(ApiError::Unreachable(e))
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound
                    | std::io::ErrorKind::ConnectionRefused
                    | std::io::ErrorKind::InvalidInput
            ) =>
        {
            leave_pending(
                api,
                pod,
                container_id,
                &body,
                pending,
                &e.to_string(),
                Sent::Never,
            )
        }
        Err(e) => Err(CniError::DaemonUnreachable {
            socket: api.socket().to_path_buf(),
            reason: e.to_string(),
        }),
    }
}

/// Whether a pending record may have reached a daemon: never, when none listened; maybe,
/// when one answered with a failure (it may have written the record first).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sent {
    Never,
    Maybe,
}

/// The pending file's name: a record a daemon may hold already carries a suffix, so that DEL
/// knows to leave a tombstone for it.
fn pending_name(pod: &PodId, container_id: &str, sent: Sent) -> String {
    let name = tombstone_name(pod, container_id);
    match sent {
        Sent::Never => name,
        Sent::Maybe => format!("{name}.sent"),
    }
}

fn leave_pending(
    api: &DaemonApi,
    pod: &PodId,
    container_id: &str,
    body: &[u8],
    pending: &Path,
    e: &str,
    sent: Sent,
) -> Result<(), CniError> {
    let name = pending_name(pod, container_id, sent);
    // One pending file per container: a later attempt's replaces an earlier one's.
    let other = match sent {
        Sent::Never => Sent::Maybe,
        Sent::Maybe => Sent::Never,
    };
    let _ = std::fs::remove_file(pending.join(pending_name(pod, container_id, other)));
    write_atomic(pending, &name, body).map_err(|w| CniError::DaemonUnreachable {
        socket: api.socket().to_path_buf(),
        reason: format!(
            "{e}; and leaving the record under {}: {w}",
            pending.display()
        ),
    })?;
    eprintln!(
        "flannel: warning: the flanneld-rs daemon at {} cannot take pod {pod}'s record now \
         ({e}): left in {} for it to publish",
        api.socket().display(),
        pending.join(&name).display()
    );
    Ok(())
}

/// What became of a DELETE.
#[derive(Debug, PartialEq, Eq)]
pub enum Removal {
    /// 2xx, or 404: the daemon has no such record (any more).
    Done,
    /// The daemon was unreachable or failing (5xx, unreadable answer): a tombstone was left.
    Tombstone(PathBuf),
    /// The daemon refused for good (another 4xx), or the tombstone could not be written: there
    /// is nothing more DEL can do, and failing it would block the pod's teardown.
    GaveUp(String),
}

/// Drops the record ADD left pending, and says which kind it was (`None`: none). One no
/// daemon ever had (`Sent::Never`) is in no daemon's hands but one publishing it at this
/// moment, which finds its file gone afterwards and removes what it published.
pub fn drop_pending(pending: &Path, pod: &PodId, container_id: &str) -> Option<Sent> {
    let mut dropped = None;
    for sent in [Sent::Maybe, Sent::Never] {
        if std::fs::remove_file(pending.join(pending_name(pod, container_id, sent))).is_ok() {
            dropped = dropped.or(Some(sent));
        }
    }
    dropped
}

/// `DELETE /v1/pods/<ns>/<name>?containerID=<id>`; never fails. Anything but `Done` is
/// reported with a one-line warning on stderr. When the daemon cannot be told, a tombstone is
/// left under `gone`; with no `gone` (the record was still pending, so no daemon holds it)
/// there is nothing to tell, and nothing is left: on a node that runs Go Flannel beside this
/// plugin, tombstones would pile up in `/run` with every pod deleted.
pub fn delete_pod(
    api: &DaemonApi,
    pod: &PodId,
    container_id: &str,
    gone: Option<&Path>,
) -> Removal {
    let target = format!(
        "{}?containerID={}",
        pod.api_path(),
        encode_component(container_id)
    );
    let problem = match api.request("DELETE", &target, None) {
        Ok(r) if r.is_success() || r.status == 404 => return Removal::Done,
        Ok(r) if r.status < 500 => {
            let why = format!(
                "the flanneld-rs daemon at {} refused to delete pod {pod}: {}",
                api.socket().display(),
                status_text(&r)
            );
            eprintln!("flannel: warning: {why}");
            return Removal::GaveUp(why);
        }
        Ok(r) => status_text(&r),
        Err(e) => e.to_string(),
    };
    let Some(gone) = gone else {
        return Removal::Done;
    };
    match write_tombstone(gone, pod, container_id) {
        Ok(path) => {
            eprintln!(
                "flannel: warning: cannot tell the flanneld-rs daemon at {} that pod {pod} is \
                 gone ({problem}); left {} for it",
                api.socket().display(),
                path.display()
            );
            Removal::Tombstone(path)
        }
        Err(e) => {
            let why = format!(
                "cannot tell the flanneld-rs daemon at {} that pod {pod} is gone ({problem}), \
                 nor write a tombstone under {}: {e}",
                api.socket().display(),
                gone.display()
            );
            eprintln!("flannel: warning: {why}");
            Removal::GaveUp(why)
        }
    }
}

/// `<namespace>_<name>_<containerID>`, every other character than [A-Za-z0-9._-] made '_'.
/// A leading '.' is made '_' too: it would hide the file and clash with temp files.
pub fn tombstone_name(pod: &PodId, container_id: &str) -> String {
    let raw = format!("{}_{}_{}", pod.namespace, pod.name, container_id);
    let mut name: String = raw
        .chars()
        .enumerate()
        .map(|(i, c)| match c {
            '.' if i == 0 => '_',
            c if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') => c,
            _ => '_',
        })
        .collect();
    // A pod name may be 253 characters and a namespace 63: with the container ID and the temp
    // file's additions that passes a file name's 255 bytes. The file holds the names in full,
    // so a long one is cut and told apart by a hash of the whole.
    if name.len() > MAX_NAME {
        name.truncate(MAX_NAME - 17);
        name.push_str(&format!("_{:016x}", fnv1a(raw.as_bytes())));
    }
    name
}

/// Longest tombstone or pending file name; `write_atomic`'s temp name adds about 20 bytes.
const MAX_NAME: usize = 200;

/// FNV-1a, 64 bits: stable across builds, so that a DEL finds what an ADD of another version
/// of the plugin left.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Writes `{"namespace","name","containerID"}` to `gone/<tombstone_name>` atomically.
pub fn write_tombstone(gone: &Path, pod: &PodId, container_id: &str) -> std::io::Result<PathBuf> {
    let name = tombstone_name(pod, container_id);
    let body = json!({
        "namespace": pod.namespace,
        "name": pod.name,
        "containerID": container_id,
    });
    write_atomic(gone, &name, body.to_string().as_bytes())?;
    Ok(gone.join(name))
}

fn refused(api: &DaemonApi, pod: &PodId, reason: String) -> CniError {
    CniError::DaemonRefused {
        socket: api.socket().to_path_buf(),
        pod: pod.to_string(),
        reason,
    }
}

fn status_text(r: &Response) -> String {
    match r.body_text() {
        body if body.is_empty() => format!("HTTP {}", r.status),
        body => format!("HTTP {}: {body}", r.status),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::FakeDaemon;
    use std::fs;
    use std::os::unix::fs::MetadataExt;
    use std::time::Duration;

    fn pod() -> PodId {
        PodId {
            namespace: "prod".into(),
            name: "db-0".into(),
        }
    }

    fn api(daemon: &FakeDaemon) -> DaemonApi {
        DaemonApi::new(daemon.socket.clone(), Duration::from_millis(500))
    }

    #[test]
    fn put_success_and_refusals() {
        let daemon = FakeDaemon::start("HTTP/1.1 204 No Content\r\n\r\n");
        put_pod(
            &api(&daemon),
            &pod(),
            "c1",
            &json!({"kind": "Pod"}),
            Path::new("/nonexistent"),
        )
        .unwrap();
        assert!(daemon.requests()[0].starts_with("PUT /v1/pods/prod/db-0 HTTP/1.1\r\n"));
        assert!(daemon.requests()[0].ends_with("\r\n\r\n{\"kind\":\"Pod\"}"));

        daemon
            .answer("HTTP/1.1 422 Unprocessable\r\nContent-Length: 16\r\n\r\nbad label \"a b\"\n");
        let err = put_pod(
            &api(&daemon),
            &pod(),
            "c1",
            &json!({}),
            Path::new("/nonexistent"),
        )
        .unwrap_err();
        assert_eq!(err.code(), 999);
        assert!(
            err.to_string()
                .ends_with("refused pod prod/db-0: HTTP 422: bad label \"a b\""),
            "{err}"
        );
        // A daemon that cannot publish now (etcd away) gets the record from the pending
        // directory later; ADD goes on.
        // It may have written the record before failing: the file says so, and DEL that
        // drops it still leaves a tombstone.
        daemon.answer("HTTP/1.1 503 Busy\r\n\r\n");
        let tmp = tempfile::tempdir().unwrap();
        put_pod(&api(&daemon), &pod(), "c1", &json!({}), tmp.path()).unwrap();
        assert_eq!(
            fs::read_to_string(tmp.path().join("prod_db-0_c1.sent")).unwrap(),
            "{}"
        );
        assert_eq!(drop_pending(tmp.path(), &pod(), "c1"), Some(Sent::Maybe));
        daemon.answer("garbage");
        let err = put_pod(
            &api(&daemon),
            &pod(),
            "c1",
            &json!({}),
            Path::new("/nonexistent"),
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("unreadable HTTP response"),
            "{err}"
        );
    }

    #[test]
    fn put_to_an_absent_or_silent_daemon_is_try_again_later() {
        let daemon = FakeDaemon::silent();
        let err = put_pod(
            &api(&daemon),
            &pod(),
            "c1",
            &json!({}),
            Path::new("/nonexistent"),
        )
        .unwrap_err();
        assert_eq!(err.code(), 11);
        let msg = err.to_string();
        assert!(
            msg.contains("flanneld-rs daemon is not reachable at"),
            "{msg}"
        );
        assert!(msg.contains("no answer within 500 ms"), "{msg}");
    }

    #[test]
    fn put_with_no_daemon_leaves_the_record_pending() {
        let tmp = tempfile::tempdir().unwrap();
        let api = DaemonApi::new(tmp.path().join("flanneld-rs.sock"), Duration::from_secs(1));
        let pending = tmp.path().join("pending");
        put_pod(&api, &pod(), "c1", &json!({"kind": "Pod"}), &pending).unwrap();
        let left = fs::read_to_string(pending.join("prod_db-0_c1")).unwrap();
        assert_eq!(left, "{\"kind\":\"Pod\"}");
        assert_eq!(drop_pending(&pending, &pod(), "c1"), Some(Sent::Never));
        assert!(!pending.join("prod_db-0_c1").exists());
        assert_eq!(drop_pending(&pending, &pod(), "c1"), None, "nothing left");
        // A record dropped while pending reached no daemon: with none to tell, DEL leaves no
        // tombstone behind (on a Go Flannel node they would pile up in /run).
        let gone = tmp.path().join("gone");
        assert_eq!(delete_pod(&api, &pod(), "c1", None), Removal::Done);
        assert!(!gone.exists());
        // A socket path too long for a Unix socket: no daemon can listen there either.
        let long = tmp.path().join("d".repeat(120)).join("flanneld-rs.sock");
        let api = DaemonApi::new(long, Duration::from_secs(1));
        put_pod(&api, &pod(), "c2", &json!({"kind": "Pod"}), &pending).unwrap();
        assert!(pending.join("prod_db-0_c2").exists());
    }

    #[test]
    fn delete_outcomes() {
        let tmp = tempfile::tempdir().unwrap();
        let gone = tmp.path().join("gone");
        let daemon = FakeDaemon::start("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(
            delete_pod(&api(&daemon), &pod(), "ctr1", Some(&gone)),
            Removal::Done
        );
        assert!(daemon.requests()[0]
            .starts_with("DELETE /v1/pods/prod/db-0?containerID=ctr1 HTTP/1.1\r\n"));
        daemon.answer("HTTP/1.1 404 Not Found\r\n\r\n");
        assert_eq!(
            delete_pod(&api(&daemon), &pod(), "ctr1", Some(&gone)),
            Removal::Done
        );
        daemon.answer("HTTP/1.1 400 Bad Request\r\n\r\nno");
        assert!(matches!(
            delete_pod(&api(&daemon), &pod(), "ctr1", Some(&gone)),
            Removal::GaveUp(_)
        ));
        assert!(!gone.exists(), "nothing left for answers the daemon gave");

        daemon.answer("HTTP/1.1 500 Oops\r\n\r\n");
        let Removal::Tombstone(path) = delete_pod(&api(&daemon), &pod(), "ctr1", Some(&gone))
        else {
            panic!("5xx leaves a tombstone");
        };
        assert_eq!(path, gone.join("prod_db-0_ctr1"));
        let content: Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        assert_eq!(
            content,
            json!({"namespace": "prod", "name": "db-0", "containerID": "ctr1"})
        );
        assert_eq!(fs::metadata(&gone).unwrap().mode() & 0o777, 0o700);
        assert_eq!(fs::read_dir(&gone).unwrap().count(), 1, "no temp file left");
    }

    #[test]
    fn tombstone_names_are_safe() {
        let odd = PodId {
            namespace: ".hidden".into(),
            name: "a b:ä".into(),
        };
        assert_eq!(tombstone_name(&odd, "c.1"), "_hidden_a_b___c.1");
        assert_eq!(tombstone_name(&pod(), "ctr1"), "prod_db-0_ctr1");
    }

    #[test]
    fn long_pod_names_still_make_a_file() {
        let tmp = tempfile::tempdir().unwrap();
        let long = |name: &str| PodId {
            namespace: "n".repeat(63),
            name: name.repeat(253),
        };
        let cid = "f".repeat(64);
        let path = write_tombstone(tmp.path(), &long("a"), &cid).unwrap();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.len() <= MAX_NAME, "{name}");
        // Another pod with the same start gets another file.
        let other = write_tombstone(tmp.path(), &long("b"), &cid).unwrap();
        assert_ne!(path, other);
        let mut other_cid = cid.clone();
        other_cid.replace_range(63.., "e");
        assert_ne!(
            tombstone_name(&long("a"), &cid),
            tombstone_name(&long("a"), &other_cid)
        );
        let body: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        assert_eq!(body["name"].as_str().map(str::len), Some(253));
    }

    #[test]
    fn unwritable_gone_dir_gives_up_without_failing() {
        let tmp = tempfile::tempdir().unwrap();
        let blocker = tmp.path().join("file");
        fs::write(&blocker, "").unwrap();
        let api = DaemonApi::new(tmp.path().join("none.sock"), Duration::from_secs(1));
        assert!(matches!(
            delete_pod(&api, &pod(), "ctr1", Some(&blocker.join("gone"))),
            Removal::GaveUp(_)
        ));
    }
}
