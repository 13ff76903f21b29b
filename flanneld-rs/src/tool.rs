//! Asking a system tool (iptables, nft, ethtool) for what it prints: bounded in time, since
//! a tool can wait on a lock another holds (`iptables -w`) or a busy netlink socket, and
//! killed when the wait is abandoned.

use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

/// `prog args`'s standard output; `None` when it is missing, fails or takes longer than
/// `within`.
pub async fn stdout(prog: &str, args: &[&str], within: Duration) -> Option<String> {
    let run = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(within, run).await.ok()?.ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const COMMAND_TIMEOUT: Duration = Duration::from_secs(3);

    #[tokio::test]
    async fn a_command_that_hangs_reads_as_unknown() {
        let started = std::time::Instant::now();
        assert_eq!(stdout("sleep", &["30"], COMMAND_TIMEOUT).await, None);
        assert!(
            started.elapsed() < COMMAND_TIMEOUT * 2,
            "{:?}",
            started.elapsed()
        );
        assert_eq!(
            stdout("echo", &["x"], COMMAND_TIMEOUT)
                .await
                .as_deref()
                .map(str::trim),
            Some("x")
        );
    }
}
