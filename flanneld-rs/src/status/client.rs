//! `flanneld-rs status`: asks the running daemon for its `/status` snapshot over the Unix
//! socket beside its subnet file, and prints it as a table (or as JSON for scripts).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::report::Report;

/// The daemon's snapshot, read from its socket.
pub fn fetch(socket: &Path) -> Result<Report> {
    let mut conn = UnixStream::connect(socket).with_context(|| {
        format!(
            "connecting to {} (is flanneld-rs running with this --subnet-file?)",
            socket.display()
        )
    })?;
    // The environment checks run a command or two: seconds, not minutes.
    conn.set_read_timeout(Some(Duration::from_secs(15)))?;
    conn.write_all(b"GET /status HTTP/1.0\r\n\r\n")?;
    let mut reply = Vec::new();
    conn.take(16 << 20).read_to_end(&mut reply)?;
    let text = String::from_utf8_lossy(&reply);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("the daemon's reply has no body")?;
    let status_line = head.lines().next().unwrap_or_default();
    if !status_line.contains(" 200 ") {
        bail!("the daemon answered {status_line:?}: {}", body.trim());
    }
    serde_json::from_str(body).context("the daemon's /status is not a status report")
}

/// Runs the command; returns the exit code: 0 when all is well, 1 when something needs
/// attention (not ready, a failed check), 2 when the daemon could not be asked.
pub fn run(socket: &Path, json: bool) -> u8 {
    match fetch(socket) {
        Ok(report) => {
            if json {
                match serde_json::to_string_pretty(&report) {
                    Ok(text) => println!("{text}"),
                    Err(e) => {
                        eprintln!("flanneld-rs status: {e}");
                        return 2;
                    }
                }
            } else {
                print!("{}", report.render());
            }
            if report.healthy() {
                0
            } else {
                1
            }
        }
        Err(e) => {
            eprintln!("flanneld-rs status: {e:#}");
            2
        }
    }
}
