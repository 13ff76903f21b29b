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
    let (code, body) = get(socket, "/status")?;
    if code != 200 {
        bail!(
            "the daemon answered {code}: {}",
            String::from_utf8_lossy(&body).trim()
        );
    }
    serde_json::from_slice(&body).context("the daemon's /status is not a status report")
}

/// An HTTP response: the status code and the body (chunked bodies decoded).
pub fn parse_response(reply: &[u8]) -> Result<(u16, Vec<u8>)> {
    let split = reply
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("the daemon's reply has no body")?;
    let head = String::from_utf8_lossy(&reply[..split]);
    let mut body = reply[split + 4..].to_vec();
    let mut lines = head.lines();
    let status_line = lines.next().unwrap_or_default();
    let code: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("the daemon's reply starts {status_line:?}, not HTTP"))?;
    let mut chunked = false;
    let mut length = None;
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
            if name == "transfer-encoding" && value.to_ascii_lowercase().contains("chunked") {
                chunked = true;
            } else if name == "content-length" {
                length = value.parse::<usize>().ok();
            }
        }
    }
    if chunked {
        body = dechunk(&body)?;
    } else if let Some(n) = length {
        body.truncate(n);
    }
    Ok((code, body))
}

fn dechunk(mut rest: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("the daemon's chunked reply is cut short")?;
        let size_text = String::from_utf8_lossy(&rest[..eol]);
        let size_hex = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16)
            .with_context(|| format!("bad chunk size {size_hex:?} in the daemon's reply"))?;
        rest = &rest[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        let chunk = rest
            .get(..size)
            .context("the daemon's chunked reply is cut short")?;
        out.extend_from_slice(chunk);
        rest = rest.get(size + 2..).unwrap_or_default();
    }
}

/// Sends `GET path` to the daemon's socket (`status`, `policy explain`): the status code and
/// the body.
pub fn get(socket: &Path, path: &str) -> Result<(u16, Vec<u8>)> {
    let mut conn = UnixStream::connect(socket).with_context(|| {
        format!(
            "connecting to {} (is flanneld-rs running with this --subnet-file?)",
            socket.display()
        )
    })?;
    conn.set_read_timeout(Some(Duration::from_secs(15)))?;
    conn.set_write_timeout(Some(Duration::from_secs(15)))?;
    write!(
        conn,
        "GET {path} HTTP/1.1\r\nHost: flanneld-rs\r\nAccept: application/json\r\nConnection: close\r\n\r\n"
    )
    .with_context(|| format!("asking {}", socket.display()))?;
    let mut reply = Vec::new();
    conn.take(16 << 20)
        .read_to_end(&mut reply)
        .with_context(|| format!("reading the answer from {}", socket.display()))?;
    parse_response(&reply)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_plain_and_chunked() {
        let plain = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}trailing";
        assert_eq!(parse_response(plain).expect("r"), (200, b"{}".to_vec()));
        let chunked =
            b"HTTP/1.1 400 Bad Request\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nbad \r\n3\r\nsrc\r\n0\r\n\r\n";
        assert_eq!(
            parse_response(chunked).expect("r"),
            (400, b"bad src".to_vec())
        );
        assert!(parse_response(b"garbage").is_err());
    }
}
