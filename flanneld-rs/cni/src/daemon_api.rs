//! A small HTTP/1.1 client for the local flanneld-rs daemon's API socket, beside subnet.env.
//!
//! One request per connection (`Connection: close`), one deadline for the whole exchange, and
//! a cap on what we read: the plugin runs inside kubelet's ADD/DEL, so a hung or misbehaving
//! daemon must cost a bounded wait and memory, never a stuck pod. std's UnixStream is enough;
//! an HTTP library would be most of the plugin's size.

use std::fmt;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The daemon's API socket, in subnet.env's directory.
pub const SOCKET_NAME: &str = "flanneld-rs.sock";
/// Whole responses (head and body) larger than this are refused: the pod API answers with a
/// status and at most a short message.
pub const MAX_RESPONSE: usize = 64 * 1024;
/// How much of a refusal's body an error message quotes.
const MAX_QUOTED_BODY: usize = 512;

/// The directory the daemon shares with the plugin: subnet.env's (`.` for a bare file name).
pub fn state_dir(subnet_file: &Path) -> PathBuf {
    match subnet_file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// `<directory of subnetFile>/flanneld-rs.sock`.
pub fn socket_path(subnet_file: &Path) -> PathBuf {
    state_dir(subnet_file).join(SOCKET_NAME)
}

/// Percent-encodes everything but RFC 3986's unreserved characters, for one path segment or
/// query value: a name can never add a segment or end the request line.
pub fn encode_component(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[derive(Debug)]
pub enum ApiError {
    /// No connection, or it broke: the daemon is not running or is restarting.
    Unreachable(io::Error),
    /// Connected, but no complete answer within the deadline.
    TimedOut(Duration),
    /// An answer that is not HTTP we can read.
    BadResponse(String),
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ApiError::Unreachable(e) => write!(f, "{e}"),
            ApiError::TimedOut(t) => write!(f, "no answer within {} ms", t.as_millis()),
            ApiError::BadResponse(why) => write!(f, "unreadable HTTP response: {why}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Response {
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The body for an error message: lossy UTF-8, trimmed, at most ~512 bytes.
    pub fn body_text(&self) -> String {
        let text = String::from_utf8_lossy(&self.body);
        let text = text.trim();
        if text.len() <= MAX_QUOTED_BODY {
            return text.to_string();
        }
        let mut end = MAX_QUOTED_BODY;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}...", &text[..end])
    }
}

/// The daemon's API at one socket, with one deadline per request.
#[derive(Debug, Clone)]
pub struct DaemonApi {
    socket: PathBuf,
    timeout: Duration,
}

impl DaemonApi {
    pub fn new(socket: PathBuf, timeout: Duration) -> Self {
        DaemonApi { socket, timeout }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sends `method target` with an optional JSON body and reads the whole answer.
    ///
    /// `target` must already be encoded (see `encode_component`). The deadline covers
    /// connecting (which waits only for room in a full listen backlog: a daemon that stopped
    /// accepting), writing and reading.
    pub fn request(
        &self,
        method: &str,
        target: &str,
        body: Option<&[u8]>,
    ) -> Result<Response, ApiError> {
        let deadline = Instant::now() + self.timeout;
        let mut stream = connect_within(&self.socket, self.remaining(deadline)?).map_err(|e| {
            match e.kind() {
                io::ErrorKind::WouldBlock => ApiError::TimedOut(self.timeout),
                _ => ApiError::Unreachable(e),
            }
        })?;
        let mut request =
            format!("{method} {target} HTTP/1.1\r\nHost: flanneld-rs\r\nConnection: close\r\n");
        if let Some(body) = body {
            request.push_str("Content-Type: application/json\r\n");
            request.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        request.push_str("\r\n");
        let mut bytes = request.into_bytes();
        bytes.extend_from_slice(body.unwrap_or_default());

        stream
            .set_write_timeout(Some(self.remaining(deadline)?))
            .map_err(ApiError::Unreachable)?;
        stream.write_all(&bytes).map_err(|e| self.io_error(e))?;
        self.read_response(&mut stream, deadline)
    }

    fn read_response(
        &self,
        stream: &mut UnixStream,
        deadline: Instant,
    ) -> Result<Response, ApiError> {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            stream
                .set_read_timeout(Some(self.remaining(deadline)?))
                .map_err(ApiError::Unreachable)?;
            let n = match stream.read(&mut chunk) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.io_error(e)),
            };
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            if buf.len() > MAX_RESPONSE {
                return Err(bad(format!("longer than {MAX_RESPONSE} bytes")));
            }
            // Done as soon as the declared body is in, even if the daemon keeps the
            // connection open despite `Connection: close`.
            if let Some(head) = parse_head(&buf)? {
                if head
                    .body_len
                    .is_some_and(|len| buf.len() - head.body_start >= len)
                {
                    break;
                }
            }
        }
        let head = parse_head(&buf)?
            .ok_or_else(|| bad("connection closed before the end of the headers".into()))?;
        let mut body = buf.split_off(head.body_start);
        if let Some(len) = head.body_len {
            if body.len() < len {
                return Err(bad(format!(
                    "connection closed after {} of {len} body bytes",
                    body.len()
                )));
            }
            body.truncate(len);
        } else if head.chunked {
            body = dechunk(&body)?;
        }
        Ok(Response {
            status: head.status,
            body,
        })
    }

    fn remaining(&self, deadline: Instant) -> Result<Duration, ApiError> {
        // A zero timeout would mean "none" to the socket calls; out of time is out of time.
        match deadline.checked_duration_since(Instant::now()) {
            Some(left) if !left.is_zero() => Ok(left),
            _ => Err(ApiError::TimedOut(self.timeout)),
        }
    }

    fn io_error(&self, e: io::Error) -> ApiError {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ApiError::TimedOut(self.timeout),
            _ => ApiError::Unreachable(e),
        }
    }
}

fn bad(why: String) -> ApiError {
    ApiError::BadResponse(why)
}

/// A response's status line and headers, once all of them are in.
struct Head {
    status: u16,
    body_start: usize,
    /// `None`: up to EOF (or chunked).
    body_len: Option<usize>,
    chunked: bool,
}

/// `Ok(None)` while the headers are incomplete; an error as soon as the bytes cannot be HTTP.
fn parse_head(buf: &[u8]) -> Result<Option<Head>, ApiError> {
    const PREFIX: &[u8] = b"HTTP/1.";
    let seen = buf.len().min(PREFIX.len());
    if buf[..seen] != PREFIX[..seen] {
        return Err(bad(format!(
            "does not start with HTTP/1.x: {:?}",
            String::from_utf8_lossy(&buf[..buf.len().min(40)])
        )));
    }
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let text = std::str::from_utf8(&buf[..end]).map_err(|_| bad("headers not UTF-8".into()))?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .filter(|s| s.len() == 3)
        .and_then(|s| s.parse::<u16>().ok())
        .filter(|s| (100..600).contains(s))
        .ok_or_else(|| bad(format!("bad status line {status_line:?}")))?;
    let mut body_len = None;
    let mut chunked = false;
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| bad(format!("bad header line {line:?}")))?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            let len = value
                .parse::<usize>()
                .map_err(|_| bad(format!("bad Content-Length {value:?}")))?;
            body_len = Some(len);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        }
    }
    // These never have a body, whatever the headers say (RFC 9112 6.3).
    if status < 200 || status == 204 || status == 304 {
        body_len = Some(0);
    } else if chunked {
        body_len = None;
    }
    Ok(Some(Head {
        status,
        body_start: end + 4,
        body_len,
        chunked,
    }))
}

/// connect(2) to `path` waiting at most `timeout` (not zero) for room in the listen backlog,
/// which a blocking connect otherwise waits for without end: std has no timeout for it, the
/// socket's send timeout bounds it.
fn connect_within(path: &Path, timeout: Duration) -> io::Result<UnixStream> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;

    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data, for which all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the socket path is too long for a Unix socket",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (to, from) in addr.sun_path.iter_mut().zip(bytes) {
        *to = *from as libc::c_char;
    }
    // SAFETY: socket(2) with constant arguments; the descriptor is owned at once below.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let tv = libc::timeval {
        tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_usec: libc::suseconds_t::from(timeout.subsec_micros().max(1)),
    };
    // SAFETY: `tv` is a valid timeval and the length given is its size.
    let set = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if set != 0 {
        return Err(io::Error::last_os_error());
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `addr` is a sockaddr_un filled above and `len` does not exceed its size.
    let connected = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len as libc::socklen_t,
        )
    };
    if connected != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(fd))
}

/// A chunked body (read to EOF) decoded; trailers are ignored.
fn dechunk(mut rest: &[u8]) -> Result<Vec<u8>, ApiError> {
    let mut body = Vec::new();
    loop {
        let line_end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| bad("chunked body ends inside a chunk size".into()))?;
        let size_text = String::from_utf8_lossy(&rest[..line_end]);
        let size_hex = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16)
            .map_err(|_| bad(format!("bad chunk size {size_hex:?}")))?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Ok(body);
        }
        let Some((chunk, after)) = size
            .checked_add(2)
            .filter(|&end| end <= rest.len())
            .map(|end| (&rest[..size], &rest[size..end]))
            .filter(|(_, crlf)| *crlf == b"\r\n")
        else {
            return Err(bad("chunked body ends inside a chunk".into()));
        };
        body.extend_from_slice(chunk);
        rest = &rest[size + after.len()..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::FakeDaemon;

    fn api(daemon: &FakeDaemon, timeout_ms: u64) -> DaemonApi {
        DaemonApi::new(daemon.socket.clone(), Duration::from_millis(timeout_ms))
    }

    #[test]
    fn paths_beside_subnet_env() {
        assert_eq!(
            socket_path(Path::new("/run/flannel/subnet.env")),
            Path::new("/run/flannel/flanneld-rs.sock")
        );
        assert_eq!(
            socket_path(Path::new("subnet.env")),
            Path::new("./flanneld-rs.sock")
        );
    }

    #[test]
    fn encoding() {
        assert_eq!(encode_component("kube-system"), "kube-system");
        assert_eq!(encode_component("a b/c?d%é"), "a%20b%2Fc%3Fd%25%C3%A9");
    }

    #[test]
    fn put_with_body_and_2xx() {
        let daemon = FakeDaemon::start("HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok");
        let r = api(&daemon, 2000)
            .request("PUT", "/v1/pods/ns/p", Some(b"{\"a\":1}"))
            .unwrap();
        assert_eq!(
            r,
            Response {
                status: 201,
                body: b"ok".to_vec()
            }
        );
        assert!(r.is_success());
        let req = daemon.requests();
        assert_eq!(req.len(), 1);
        assert_eq!(
            req[0],
            "PUT /v1/pods/ns/p HTTP/1.1\r\nHost: flanneld-rs\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: 7\r\n\r\n{\"a\":1}"
        );
    }

    #[test]
    fn error_statuses_keep_their_body() {
        let daemon = FakeDaemon::start(
            "HTTP/1.1 400 Bad Request\r\ncontent-length: 22\r\n\r\n  label key invalid \n  ",
        );
        let r = api(&daemon, 2000).request("DELETE", "/x", None).unwrap();
        assert_eq!(r.status, 400);
        assert!(!r.is_success());
        assert_eq!(r.body_text(), "label key invalid");
        assert!(!daemon.requests()[0].contains("Content-Length"));

        // No Content-Length: the body runs to EOF.
        let daemon = FakeDaemon::start("HTTP/1.0 503 Service Unavailable\r\n\r\nstarting up");
        let r = api(&daemon, 2000).request("GET", "/", None).unwrap();
        assert_eq!((r.status, r.body_text().as_str()), (503, "starting up"));
    }

    #[test]
    fn chunked_bodies_are_decoded() {
        let daemon = FakeDaemon::start(
            "HTTP/1.1 409 Conflict\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nbusy\r\n3;x=y\r\n!!!\r\n0\r\n\r\n",
        );
        let r = api(&daemon, 2000).request("GET", "/", None).unwrap();
        assert_eq!(r.body, b"busy!!!");
    }

    #[test]
    fn a_full_listen_queue_costs_the_deadline_not_forever() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("full.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        {
            use std::os::fd::AsRawFd;
            // SAFETY: listen(2) on a listening socket we own, to shrink its backlog.
            assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 0) }, 0);
        }
        // Never accepted: these fill the backlog (0 admits one, and the kernel one more).
        let _held: Vec<UnixStream> = (0..2)
            .filter_map(|_| connect_within(&path, Duration::from_millis(100)).ok())
            .collect();
        let api = DaemonApi::new(path.clone(), Duration::from_millis(200));
        let started = Instant::now();
        let r = api.request("GET", "/", None);
        assert!(matches!(r, Err(ApiError::TimedOut(_))), "{r:?}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn huge_chunk_sizes_are_a_bad_response() {
        for size in ["ffffffffffffffff", "fffffffffffffffe", "10"] {
            assert!(matches!(
                dechunk(format!("{size}\r\nxx\r\n0\r\n\r\n").as_bytes()),
                Err(ApiError::BadResponse(_))
            ));
        }
    }

    #[test]
    fn long_bodies_are_quoted_short() {
        let r = Response {
            status: 500,
            body: "é".repeat(1000).into_bytes(),
        };
        let text = r.body_text();
        assert!(
            text.len() <= MAX_QUOTED_BODY + 3 && text.ends_with("..."),
            "{text}"
        );
    }

    #[test]
    fn garbage_is_a_bad_response() {
        for answer in [
            "SSH-2.0-OpenSSH\r\n",
            "HTTP/1.1 abc\r\n\r\n",
            "HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
            "HTTP/1.1 200 OK\r\n",
            "",
        ] {
            let daemon = FakeDaemon::start(answer);
            let err = api(&daemon, 2000).request("GET", "/", None).unwrap_err();
            assert!(matches!(err, ApiError::BadResponse(_)), "{answer:?}: {err}");
        }
        let daemon = FakeDaemon::start(&format!("HTTP/1.1 200 OK\r\n\r\n{}", "x".repeat(70_000)));
        let err = api(&daemon, 2000).request("GET", "/", None).unwrap_err();
        assert!(err.to_string().contains("longer than 65536 bytes"), "{err}");
    }

    #[test]
    fn silent_daemon_times_out() {
        let daemon = FakeDaemon::silent();
        let start = Instant::now();
        let err = api(&daemon, 200).request("GET", "/", None).unwrap_err();
        assert!(matches!(err, ApiError::TimedOut(_)), "{err}");
        assert_eq!(err.to_string(), "no answer within 200 ms");
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn missing_socket_is_unreachable() {
        let tmp = tempfile::tempdir().unwrap();
        let api = DaemonApi::new(tmp.path().join("none.sock"), Duration::from_secs(1));
        let err = api.request("GET", "/", None).unwrap_err();
        assert!(matches!(err, ApiError::Unreachable(_)), "{err}");
    }
}
