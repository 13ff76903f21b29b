//! The HTTP side, over real loopback sockets.
use super::*;
use std::io::{BufRead, BufReader, Read as _, Write as _};
use std::process::{Command, Stdio};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn start() -> SocketAddr {
    start_with(Limits::default()).await
}

async fn start_with(limits: Limits) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    spawn_server(
        listener,
        Arc::new(Status::default()),
        limits,
        Endpoints::Probes,
    );
    addr
}

/// Sends `parts` as separate segments (a pause between them), returns the whole reply.
async fn exchange(addr: SocketAddr, parts: &[&[u8]]) -> String {
    let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
    conn.set_nodelay(true).expect("nodelay");
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        conn.write_all(part).await.expect("send");
    }
    read_reply(&mut conn).await
}

/// Everything the server sends until it closes, within 10 s.
async fn read_reply(conn: &mut (impl tokio::io::AsyncRead + Unpin)) -> String {
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut reply))
        .await
        .expect("reply in time")
        .expect("read");
    String::from_utf8_lossy(&reply).into_owned()
}

fn head_and_body(reply: &str) -> (&str, &str) {
    reply.split_once("\r\n\r\n").unwrap_or((reply, ""))
}

#[tokio::test]
async fn request_split_across_segments_is_read_whole() {
    let addr = start().await;
    let reply = exchange(
        addr,
        &[
            b"GET /met",
            b"rics HTTP/1.1\r\nHost: x\r\n",
            b"Accept: */*\r\n\r\n",
        ],
    )
    .await;
    let (head, body) = head_and_body(&reply);
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
    assert!(body.contains("# TYPE flanneld_peers gauge"), "{reply}");
}

#[tokio::test]
async fn query_string_is_ignored_for_routing() {
    let addr = start().await;
    let reply = exchange(addr, &[b"GET /metrics?x=1 HTTP/1.1\r\n\r\n"]).await;
    assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
    let reply = exchange(addr, &[b"GET /readyz?verbose HTTP/1.0\r\n\r\n"]).await;
    assert!(reply.starts_with("HTTP/1.0 503 "), "{reply}");
}

#[tokio::test]
async fn head_gets_headers_only() {
    let addr = start().await;
    let reply = exchange(addr, &[b"HEAD /metrics HTTP/1.1\r\n\r\n"]).await;
    let (head, body) = head_and_body(&reply);
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
    assert_eq!(body, "", "{reply}");
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .and_then(|v| v.parse().ok())
        .expect("Content-Length");
    assert!(length > 100, "the length GET would send: {reply}");
}

#[tokio::test]
async fn other_methods_get_405_with_allow() {
    let addr = start().await;
    for method in ["POST", "PUT", "DELETE", "OPTIONS"] {
        let req = format!("{method} /metrics HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello");
        let reply = exchange(addr, &[req.as_bytes()]).await;
        let (head, _) = head_and_body(&reply);
        assert!(head.starts_with("HTTP/1.1 405 "), "{method}: {reply}");
        assert!(head.contains("\r\nallow: GET,HEAD"), "{method}: {reply}");
    }
}

#[tokio::test]
async fn oversized_or_garbled_requests_are_refused() {
    let addr = start().await;
    let mut big = b"GET /metrics HTTP/1.1\r\n".to_vec();
    big.extend(std::iter::repeat_n(b'a', 9000));
    let reply = exchange(addr, &[&big]).await;
    assert!(reply.starts_with("HTTP/1.1 431 "), "{reply}");
    let reply = exchange(addr, &[b"hello\r\n\r\n"]).await;
    assert!(reply.starts_with("HTTP/1.1 400 "), "{reply}");
}

#[tokio::test]
async fn idle_connections_cannot_lock_out_a_probe() {
    let addr = start_with(Limits {
        connections: 4,
        read_timeout: Duration::from_secs(60),
    })
    .await;
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(tokio::net::TcpStream::connect(addr).await.expect("connect"));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let reply = tokio::time::timeout(
        Duration::from_secs(5),
        exchange(addr, &[b"GET /readyz HTTP/1.0\r\n\r\n"]),
    )
    .await
    .expect("answered although silent connections hold every slot");
    assert!(reply.starts_with("HTTP/1.0 503 "), "{reply}");
    // The one that had waited longest made room.
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(5), idle[0].read(&mut byte))
        .await
        .expect("oldest idle connection closed");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
}

#[tokio::test]
async fn clients_not_reading_their_answer_cannot_lock_out_a_probe() {
    use crate::health::core::{PeerView, State};
    // Enough probed peers for /metrics to outgrow both ends' socket buffers.
    let status = Arc::new(Status::default());
    let peer = |i: usize| PeerView {
        key: format!("10.{}.{}.0-24{}", i / 256 % 256, i % 256, "x".repeat(200)),
        state: State::Up,
        rtt: Some(Duration::from_micros(100)),
        loss: Some(0.0),
        mtu_passes: Some(1450),
        mtu_fails: None,
    };
    status.set_probes((0..20_000).map(peer).collect());
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let limits = Limits {
        connections: 2,
        read_timeout: Duration::from_secs(5),
    };
    spawn_server(listener, status, limits, Endpoints::Probes);
    // Two scrapers that never read their answer hold both slots.
    let mut stuck = Vec::new();
    for _ in 0..2 {
        let sock = tokio::net::TcpSocket::new_v4().expect("socket");
        sock.set_recv_buffer_size(4096).expect("rcvbuf");
        let mut conn = sock.connect(addr).await.expect("connect");
        conn.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
            .await
            .expect("send");
        stuck.push(conn);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    let reply = tokio::time::timeout(
        Duration::from_secs(4),
        exchange(addr, &[b"GET /healthz HTTP/1.0\r\n\r\n"]),
    )
    .await
    .expect("answered while two scrapers sit on their answers");
    assert!(reply.starts_with("HTTP/1.0 200 "), "{reply}");
    eprintln!("probe answered after {:?}", started.elapsed());
}

#[tokio::test]
async fn slow_requests_are_cut_off() {
    let addr = start_with(Limits {
        connections: 4,
        read_timeout: Duration::from_millis(300),
    })
    .await;
    let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
    conn.write_all(b"GET /healthz HTTP/1.1\r\n")
        .await
        .expect("send");
    let started = std::time::Instant::now();
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut byte))
        .await
        .expect("closed after the read timeout");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert!(started.elapsed() >= Duration::from_millis(250));
}

const CHILD: &str = "FLANNELD_RS_STATUS_EMFILE_CHILD";

/// Not a test by itself: the process `accept_errors_back_off_instead_of_spinning` runs.
/// Serves with a file limit a few descriptors above what it holds, prints its port, and
/// lives until its stdin closes.
#[test]
fn emfile_child() {
    if std::env::var_os(CHILD).is_none() {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let addr = rt.block_on(start());
    // New descriptors take the lowest free numbers and must stay below the limit; ones
    // inherited above it (a jobserver pipe) stay usable and do not count.
    let open: Vec<u64> = std::fs::read_dir("/proc/self/fd")
        .expect("fds")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    let lowest_free = (0..).find(|fd| !open.contains(fd)).unwrap_or(0);
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a live rlimit.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = lowest_free + 8;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
    println!("PORT {} LIMIT {}", addr.port(), limit.rlim_cur);
    std::io::stdout().flush().expect("flush");
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
}

/// User plus system CPU time of a process, from /proc.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // Fields after the command name (which may hold spaces): state is field 3, so utime
    // (14) and stime (15) are the 12th and 13th after it.
    let rest = stat.rsplit_once(')').expect("comm").1;
    let fields: Vec<u64> = rest
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_millis((fields[11] + fields[12]) * 1000 / hz)
}

#[test]
fn accept_errors_back_off_instead_of_spinning() {
    let exe = std::env::current_exe().expect("exe");
    let mut child = Command::new(exe)
        .args([
            "--exact",
            "status::http::tests::emfile_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("stdout");
    // libtest prints "test <name> ... " on the same line first.
    let (port, limit): (u16, u64) = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .find_map(|l| {
            let mut words = l.split("PORT ").nth(1)?.split(" LIMIT ");
            Some((
                words.next()?.parse().ok()?,
                words.next()?.trim().parse().ok()?,
            ))
        })
        .expect("child's port and limit");
    let addr = SocketAddr::from(([127, 0, 0, 1], port));

    // More connections than the child has descriptors for: the rest wait in its backlog
    // and every accept fails with EMFILE.
    let flood: Vec<std::net::TcpStream> = (0..32)
        .map(|_| std::net::TcpStream::connect(addr).expect("connect"))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let fds: Vec<u64> = std::fs::read_dir(format!("/proc/{}/fd", child.id()))
        .expect("child's fds")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    let out_of_fds = (0..limit).all(|fd| fds.contains(&fd));
    let before = cpu_time(child.id());
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_time(child.id()).saturating_sub(before);
    drop(flood);

    // Once the flood is gone its descriptors come back and the server answers again.
    let reply = (|| -> std::io::Result<String> {
        let mut conn = std::net::TcpStream::connect(addr)?;
        conn.set_read_timeout(Some(Duration::from_secs(10)))?;
        conn.write_all(b"GET /readyz HTTP/1.0\r\n\r\n")?;
        let mut reply = String::new();
        conn.read_to_string(&mut reply)?;
        Ok(reply)
    })();
    let _ = child.kill();
    let _ = child.wait();
    eprintln!("child CPU during 2 s of EMFILE: {used:?}");
    assert!(
        out_of_fds,
        "the child never ran out of descriptors: {fds:?}"
    );
    // A spinning loop gets 0.3 s and more even on a loaded machine; backing off, ~0.
    assert!(
        used < Duration::from_millis(100),
        "the accept loop spins on EMFILE: {used:?} of CPU in 2 s"
    );
    let reply = reply.expect("readyz after the flood");
    assert!(reply.starts_with("HTTP/1.0 503 "), "{reply}");
}

#[tokio::test]
async fn healthz_answers_while_the_process_runs() {
    // Flannel v0.28.9: liveness is the process answering, readiness is the node being ready.
    let addr = start().await;
    let reply = exchange(addr, &[b"GET /healthz HTTP/1.0\r\n\r\n"]).await;
    assert!(reply.starts_with("HTTP/1.0 200 OK\r\n"), "{reply}");
    let reply = exchange(addr, &[b"GET /readyz HTTP/1.0\r\n\r\n"]).await;
    let (head, body) = head_and_body(&reply);
    assert!(head.starts_with("HTTP/1.0 503 "), "{reply}");
    assert!(body.contains("no subnet lease"), "{reply}");
    let reply = exchange(addr, &[b"GET /nope HTTP/1.0\r\n\r\n"]).await;
    assert!(reply.starts_with("HTTP/1.0 404 "), "{reply}");
}

#[tokio::test]
async fn scrapers_get_the_format_they_ask_for() {
    let addr = start().await;
    let reply = exchange(addr, &[b"GET /metrics HTTP/1.0\r\n\r\n"]).await;
    let (head, _) = head_and_body(&reply);
    assert!(
        head.contains("content-type: text/plain; version=0.0.4"),
        "{reply}"
    );
    let reply = exchange(
        addr,
        &[b"GET /metrics HTTP/1.0\r\nAccept: application/openmetrics-text; version=1.0.0\r\n\r\n"],
    )
    .await;
    let (head, body) = head_and_body(&reply);
    assert!(
        head.contains("content-type: application/openmetrics-text"),
        "{reply}"
    );
    assert!(body.ends_with("# EOF\n"), "{reply}");
}

#[tokio::test]
async fn tcp_ports_serve_probes_only_and_the_socket_serves_the_rest() {
    // The TCP ports face every pod and host: no pod records (which pass policies) and no
    // report of the peers from there.
    let addr = start().await;
    for request in [
        &b"PUT /v1/pods/prod/db-0 HTTP/1.0\r\ncontent-length: 2\r\n\r\n{}"[..],
        b"DELETE /v1/pods/prod/db-0 HTTP/1.0\r\n\r\n",
        b"GET /v1/policy/status HTTP/1.0\r\n\r\n",
        b"GET /v1/policy/explain?src=10.0.0.1&dst=10.0.0.2 HTTP/1.0\r\n\r\n",
        b"GET /status HTTP/1.0\r\n\r\n",
    ] {
        let reply = exchange(addr, &[request]).await;
        assert!(
            reply.starts_with("HTTP/1.0 404 "),
            "{}: {reply}",
            String::from_utf8_lossy(request)
        );
    }
    let reply = exchange(addr, &[b"GET /metrics HTTP/1.0\r\n\r\n"]).await;
    assert!(reply.starts_with("HTTP/1.0 200 "), "{reply}");

    // The Unix socket (root only) serves all of it.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("flanneld-rs.sock");
    serve_unix(&path, Arc::new(Status::default()))
        .await
        .expect("serve on the socket");
    // Root's alone from the start: made 0600 out of reach, then moved into place.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&path)
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .expect("dir")
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()
        .expect("entries");
    assert_eq!(left, ["flanneld-rs.sock"], "nothing else left beside it");
    let ask = |request: &'static [u8]| {
        let path = path.clone();
        async move {
            let mut conn = tokio::net::UnixStream::connect(&path)
                .await
                .expect("connect");
            conn.write_all(request).await.expect("send");
            read_reply(&mut conn).await
        }
    };
    let reply = ask(b"GET /status HTTP/1.0\r\n\r\n").await;
    assert!(reply.starts_with("HTTP/1.0 200 "), "{reply}");
    // Reached the policy API (no lease yet, so it cannot take the record), not the fallback.
    let reply = ask(b"PUT /v1/pods/prod/db-0 HTTP/1.0\r\ncontent-length: 2\r\n\r\n{}").await;
    assert!(!reply.starts_with("HTTP/1.0 404 "), "{reply}");
}
