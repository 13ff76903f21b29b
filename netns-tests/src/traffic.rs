//! Traffic from inside namespaces without helper processes: a thread enters a namespace with
//! `setns` (network namespaces are per thread) and uses ordinary sockets there.

use std::hash::Hasher;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

/// Runs `f` on a new thread inside network namespace `ns` and returns its result.
pub fn in_netns<T, F>(ns: &str, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    let path = format!("/var/run/netns/{ns}");
    let handle = std::thread::spawn(move || -> Result<T> {
        let file = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
        // SAFETY: setns on a valid namespace fd affects only this thread, which we own.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns({path}): {}", std::io::Error::last_os_error());
        }
        f()
    });
    handle
        .join()
        .map_err(|_| anyhow!("thread in {ns} panicked"))?
}

/// A seeded deterministic random stream, so both ends of a transfer agree on its content.
pub struct TestRng(rand::rngs::StdRng);

impl TestRng {
    pub fn new(seed: u64) -> Self {
        TestRng(rand::SeedableRng::seed_from_u64(seed))
    }

    pub fn next_u64(&mut self) -> u64 {
        rand::RngCore::next_u64(&mut self.0)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        rand::RngCore::fill_bytes(&mut self.0, buf);
    }
}

/// Writes `bytes` of pseudo-random data (from `seed`) to a stream; returns their hash, which
/// `hash_stream` on the other end must reproduce.
pub fn send_stream(conn: &mut impl Write, seed: u64, bytes: u64) -> std::io::Result<u64> {
    let mut rng = TestRng::new(seed);
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill(&mut buf[..n]);
        conn.write_all(&buf[..n])?;
        h.write(&buf[..n]);
        left -= n as u64;
    }
    Ok(h.finish())
}

/// Reads a stream to its end: (hash of the bytes, how many there were).
pub fn hash_stream(conn: &mut impl Read) -> std::io::Result<(u64, u64)> {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0u64;
    loop {
        let n = conn.read(&mut buf)?;
        if n == 0 {
            return Ok((h.finish(), total));
        }
        h.write(&buf[..n]);
        total += n as u64;
    }
}

/// Sends `bytes` of pseudo-random data over TCP from namespace `from_ns` to `to_ip` (a listener
/// in `to_ns`). Returns the hashes of what was sent and what was received.
pub fn tcp_transfer(from_ns: &str, to_ns: &str, to_ip: &str, bytes: u64) -> Result<(u64, u64)> {
    tcp_transfers(from_ns, to_ns, to_ip, 7777, 1, bytes)?
        .pop()
        .context("no stream")
}

/// `streams` such transfers at once, to one listener on `port`, each with its own content:
/// (sent, received) hashes per stream, in the order the streams were opened.
pub fn tcp_transfers(
    from_ns: &str,
    to_ns: &str,
    to_ip: &str,
    port: u16,
    streams: usize,
    bytes: u64,
) -> Result<Vec<(u64, u64)>> {
    let (addr, receiver) = serve_in(to_ns, to_ip, port, move |addr, ready| {
        let listener = TcpListener::bind(addr).context("binding the receiver")?;
        ready();
        let mut readers = Vec::new();
        for _ in 0..streams {
            let (mut conn, _) = listener.accept()?;
            conn.set_read_timeout(Some(Duration::from_secs(60)))?;
            // The sender's first 8 bytes say which stream this is (accept order is not
            // connect order).
            let mut id = [0u8; 8];
            conn.read_exact(&mut id)?;
            readers.push(std::thread::spawn(move || {
                hash_stream(&mut conn).map(|h| (u64::from_le_bytes(id), h))
            }));
        }
        let mut got = Vec::new();
        for r in readers {
            got.push(r.join().map_err(|_| anyhow!("reader panicked"))??);
        }
        got.sort_unstable_by_key(|(id, _)| *id);
        Ok(got)
    })?;
    let sent = in_netns(from_ns, move || {
        let writers: Vec<_> = (0..streams as u64)
            .map(|id| {
                std::thread::spawn(move || -> Result<u64> {
                    let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
                        .context("connecting")?;
                    conn.write_all(&id.to_le_bytes())?;
                    Ok(send_stream(
                        &mut conn,
                        0x9E37_79B9_7F4A_7C15 ^ bytes ^ id.rotate_left(32),
                        bytes,
                    )?)
                })
            })
            .collect();
        writers
            .into_iter()
            .map(|w| w.join().map_err(|_| anyhow!("sender panicked"))?)
            .collect::<Result<Vec<u64>>>()
    })?;
    let received = receiver
        .join()
        .map_err(|_| anyhow!("receiver panicked"))??;
    let mut out = Vec::new();
    for (id, sent) in sent.into_iter().enumerate() {
        let Some(&(_, (hash, total))) = received.iter().find(|(r, _)| *r == id as u64) else {
            bail!("stream {id} never arrived");
        };
        if total != bytes {
            bail!("stream {id}: received {total} bytes of {bytes}");
        }
        out.push((sent, hash));
    }
    Ok(out)
}

/// Runs `serve` on a thread inside `ns`, given `ip:port` and a `ready` to call once it listens,
/// and returns when it did: the address and the thread.
fn serve_in<T, F>(
    ns: &str,
    ip: &str,
    port: u16,
    serve: F,
) -> Result<(SocketAddr, std::thread::JoinHandle<Result<T>>)>
where
    T: Send + 'static,
    F: FnOnce(SocketAddr, &dyn Fn()) -> Result<T> + Send + 'static,
{
    let ip: std::net::IpAddr = ip.parse().with_context(|| format!("address {ip}"))?;
    let addr = SocketAddr::new(ip, port);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let ns = ns.to_string();
    // Threads spawned inside a namespace's thread stay in that namespace.
    let handle = std::thread::spawn(move || {
        in_netns(&ns, move || {
            serve(addr, &|| {
                let _ = ready_tx.send(());
            })
        })
    });
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .context("receiver did not start")?;
    Ok((addr, handle))
}

/// `GET path` on `127.0.0.1:port` inside `ns`; returns (status line, body).
pub fn http_get(ns: &str, port: u16, path: &str) -> Result<(String, String)> {
    http_get_at(ns, SocketAddr::from(([127, 0, 0, 1], port)), path)
}

/// `GET path` on `addr` from inside `ns`; returns (status line, body).
pub fn http_get_at(ns: &str, addr: SocketAddr, path: &str) -> Result<(String, String)> {
    let path = path.to_string();
    in_netns(ns, move || {
        let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
        conn.set_read_timeout(Some(Duration::from_secs(5)))?;
        conn.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())?;
        let mut text = String::new();
        conn.read_to_string(&mut text)?;
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        Ok((
            head.lines().next().unwrap_or("").to_string(),
            body.to_string(),
        ))
    })
}

/// The value of one Prometheus sample line (`name{labels} value`) in a /metrics body.
/// The sum of a node's datapath drop counters for `reasons` (0 where unreadable).
pub fn drops_total(ns: &str, port: u16, reasons: &[&str]) -> f64 {
    let Ok((_, body)) = http_get(ns, port, "/metrics") else {
        return 0.0;
    };
    reasons
        .iter()
        .filter_map(|r| {
            metric(
                &body,
                &format!("flanneld_datapath_drops_total{{reason=\"{r}\"}}"),
            )
        })
        .sum()
}

/// Waits up to 5 s for [`drops_total`] to reach `want` and hold still for 300 ms, instead of a
/// fixed sleep before reading counters: datagrams still in socket buffers are counted as the
/// daemon reads them, and its receive threads publish their counts in batches, at the latest
/// when a read times out (200 ms) after the last one: holding still for longer than that means
/// nothing is held back. Returns the last value; the caller asserts on it, so a shortfall says
/// by how much.
pub fn wait_for_drops(ns: &str, port: u16, reasons: &[&str], want: f64) -> f64 {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut last = f64::NAN;
    loop {
        let now = drops_total(ns, port, reasons);
        if (now >= want && now == last) || std::time::Instant::now() >= deadline {
            return now;
        }
        last = now;
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
}

pub fn metric(body: &str, name_and_labels: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.trim().parse().ok())
}

/// What [`udp_burst`] saw arrive.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct UdpBurst {
    /// Datagrams that arrived whole: their size and the content their index calls for.
    pub whole: usize,
    /// Datagrams that arrived with another size or other bytes.
    pub damaged: usize,
    /// Indexes that arrived more than once.
    pub repeated: usize,
}

/// Sends `count` datagrams of `size` bytes (at least 4), back to back, from `from_ns` to
/// `to_ip:port` in `to_ns`, each holding its index and bytes derived from it, and checks what
/// arrives within 2 s of the last: datagram boundaries, sizes and contents, as a pod sees them.
pub fn udp_burst(
    from_ns: &str,
    to_ns: &str,
    to_ip: &str,
    port: u16,
    count: u32,
    size: usize,
) -> Result<UdpBurst> {
    fn datagram(i: u32, size: usize) -> Vec<u8> {
        let mut d: Vec<u8> = (0..size).map(|j| (i as usize * 31 + j * 7) as u8).collect();
        d[..4].copy_from_slice(&i.to_be_bytes());
        d
    }
    let (addr, receiver) = serve_in(to_ns, to_ip, port, move |addr, ready| {
        let sock = std::net::UdpSocket::bind(addr).context("binding the receiver")?;
        ready();
        let mut seen = vec![false; count as usize];
        let mut got = UdpBurst::default();
        let mut buf = vec![0u8; 65536];
        sock.set_read_timeout(Some(Duration::from_secs(10)))?;
        // Until quiet for the timeout: the burst is over.
        while let Ok(n) = sock.recv(&mut buf) {
            sock.set_read_timeout(Some(Duration::from_secs(2)))?;
            let i = buf
                .get(..4)
                .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
                .filter(|&i| i < count);
            match i {
                Some(i) if n == size && buf[..n] == datagram(i, size)[..] => {
                    if std::mem::replace(&mut seen[i as usize], true) {
                        got.repeated += 1;
                    } else {
                        got.whole += 1;
                    }
                }
                _ => got.damaged += 1,
            }
        }
        Ok(got)
    })?;
    in_netns(from_ns, move || {
        let sock = std::net::UdpSocket::bind("0.0.0.0:0")?;
        sock.connect(addr)?;
        for i in 0..count {
            // A full socket buffer drops here, not in the path under test.
            while sock.send(&datagram(i, size)).is_err() {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        Ok(())
    })?;
    receiver.join().map_err(|_| anyhow!("receiver panicked"))?
}
