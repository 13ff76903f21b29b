//! UDP batching over loopback: no privileges needed.

use std::io::{ErrorKind, IoSlice};
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use super::*;

fn sock() -> UdpSock {
    UdpSock::bind("127.0.0.1:0".parse().unwrap(), false).unwrap()
}

fn plain_receiver() -> UdpSocket {
    let r = UdpSocket::bind("127.0.0.1:0").unwrap();
    r.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    r
}

/// `count` segments of `seg` bytes, each filled with its own index, plus a `tail`-byte one.
fn segments(count: usize, seg: usize, tail: usize) -> Vec<u8> {
    let mut v: Vec<u8> = (0..count).flat_map(|i| vec![i as u8; seg]).collect();
    v.extend(std::iter::repeat_n(0xee, tail));
    v
}

/// Receives with `recv_batch` until `total` bytes arrived; returns the datagrams and the GRO
/// sizes seen.
fn recv_all(s: &UdpSock, batch: &mut RecvBatch, total: usize) -> (Vec<Vec<u8>>, Vec<Option<u16>>) {
    let (mut grams, mut gros, mut got) = (Vec::new(), Vec::new(), 0);
    let deadline = Instant::now() + Duration::from_secs(3);
    while got < total && Instant::now() < deadline {
        match s.recv_batch(batch) {
            Ok(_) => {
                for m in batch.iter() {
                    assert!(!m.is_truncated());
                    gros.push(m.gro_size());
                    for d in m.datagrams() {
                        got += d.len();
                        grams.push(d.to_vec());
                    }
                }
            }
            Err(e) if is_timeout(&e) => {}
            Err(e) => panic!("recv_batch: {e}"),
        }
    }
    (grams, gros)
}

#[test]
fn gso_is_probed_and_buffers_grow() {
    let s = sock();
    assert!(s.gso_supported(), "kernel without UDP_SEGMENT?");
    let sizes = s.grow_buffers(DEFAULT_SOCKET_BUFFER);
    eprintln!("socket buffers after grow_buffers: {sizes:?}");
    assert!(sizes.rcv > 0 && sizes.snd > 0);
}

#[test]
fn send_gso_arrives_as_separate_datagrams() {
    let (s, r) = (sock(), plain_receiver());
    let buf = segments(10, 1200, 0);
    assert_eq!(
        s.send_gso(r.local_addr().unwrap(), &buf, 1200).unwrap(),
        12_000
    );
    let mut rbuf = [0u8; 2000];
    for i in 0..10 {
        let (n, from) = r.recv_from(&mut rbuf).unwrap();
        assert_eq!(from, s.local_addr());
        assert_eq!(n, 1200);
        assert!(
            rbuf[..n].iter().all(|&b| b == i as u8),
            "segment {i} out of order"
        );
    }
}

#[test]
fn send_gso_last_segment_shorter_and_single_segment_plain() {
    let (s, r) = (sock(), plain_receiver());
    let dst = r.local_addr().unwrap();
    s.send_gso(dst, &segments(3, 1000, 500), 1000).unwrap();
    // Fits one segment: sent without the cmsg.
    s.send_gso(dst, &[7u8; 300], 1000).unwrap();
    // seg_size 0: no segmentation at all.
    s.send_gso(dst, &[8u8; 1500], 0).unwrap();
    let mut rbuf = [0u8; 2000];
    let lens: Vec<usize> = (0..6).map(|_| r.recv_from(&mut rbuf).unwrap().0).collect();
    assert_eq!(lens, [1000, 1000, 1000, 500, 300, 1500]);
}

#[test]
fn send_gso_vectored_gathers_across_slices() {
    let (s, r) = (sock(), plain_receiver());
    let (h0, p0, h1, p1) = ([1u8; 20], [2u8; 80], [3u8; 20], [4u8; 30]);
    let bufs = [
        IoSlice::new(&h0),
        IoSlice::new(&p0),
        IoSlice::new(&h1),
        IoSlice::new(&p1),
    ];
    assert_eq!(
        s.send_gso_vectored(r.local_addr().unwrap(), &bufs, 100)
            .unwrap(),
        150
    );
    let mut rbuf = [0u8; 200];
    let n = r.recv(&mut rbuf).unwrap();
    assert_eq!((n, &rbuf[..20], &rbuf[20..100]), (100, &h0[..], &p0[..]));
    let n = r.recv(&mut rbuf).unwrap();
    assert_eq!((n, &rbuf[..20], &rbuf[20..50]), (50, &h1[..], &p1[..]));
}

#[test]
fn send_gso_into_gro_receiver_round_trips() {
    let (s, r) = (sock(), sock());
    let gro = r.enable_gro();
    let buf = segments(10, 1200, 0);
    s.send_gso(r.local_addr(), &buf, 1200).unwrap();
    let mut batch = RecvBatch::new(8, 65_535);
    let (grams, gros) = recv_all(&r, &mut batch, buf.len());
    eprintln!("GRO enabled: {gro}; segment sizes per message: {gros:?}");
    assert_eq!(grams.len(), 10);
    assert!(grams.iter().all(|g| g.len() == 1200));
    assert_eq!(grams.concat(), buf);
    if gro {
        assert!(gros.contains(&Some(1200)), "expected a GRO-merged message");
    }
}

#[test]
fn send_batch_reaches_two_receivers_in_order() {
    let (s, a, b) = (sock(), plain_receiver(), plain_receiver());
    let (da, db) = (a.local_addr().unwrap(), b.local_addr().unwrap());
    let msgs: [(SocketAddr, &[u8]); 4] = [(da, b"a0"), (db, b"b00"), (da, b"a11"), (db, b"b2222")];
    assert_eq!(s.send_batch(&msgs).unwrap(), 4);
    let mut rbuf = [0u8; 16];
    for (r, want) in [(&a, &b"a0"[..]), (&a, b"a11"), (&b, b"b00"), (&b, b"b2222")] {
        let (n, from) = r.recv_from(&mut rbuf).unwrap();
        assert_eq!((&rbuf[..n], from), (want, s.local_addr()));
    }
    assert_eq!(s.send_batch(&[]).unwrap(), 0);
}

#[test]
fn send_batch_caps_at_batch_max() {
    let (s, r) = (sock(), sock());
    s.grow_buffers(1 << 20);
    r.grow_buffers(1 << 20);
    let dst = r.local_addr();
    let msgs: Vec<(SocketAddr, &[u8])> =
        (0..SEND_BATCH_MAX + 10).map(|_| (dst, &b"x"[..])).collect();
    assert_eq!(s.send_batch(&msgs).unwrap(), SEND_BATCH_MAX);
    let mut batch = RecvBatch::new(128, 64);
    let (grams, _) = recv_all(&r, &mut batch, SEND_BATCH_MAX);
    assert_eq!(grams.len(), SEND_BATCH_MAX);
}

#[test]
fn recv_batch_reports_sources_and_lengths() {
    let r = sock();
    let (a, b) = (plain_receiver(), plain_receiver());
    for _ in 0..3 {
        a.send_to(&[0xaa; 100], r.local_addr()).unwrap();
        b.send_to(&[0xbb; 200], r.local_addr()).unwrap();
    }
    let mut batch = RecvBatch::new(4, 1500);
    let mut seen = 0;
    let deadline = Instant::now() + Duration::from_secs(3);
    while seen < 6 && Instant::now() < deadline {
        let n = r.recv_batch(&mut batch).unwrap();
        assert!(n >= 1 && n <= batch.capacity() && n == batch.len());
        assert!(batch.msg(n).is_none());
        for i in 0..n {
            let m = batch.msg(i).unwrap();
            let (len, byte) = if m.source() == a.local_addr().unwrap() {
                (100, 0xaa)
            } else {
                assert_eq!(m.source(), b.local_addr().unwrap());
                (200, 0xbb)
            };
            assert_eq!(m.data().len(), len);
            assert!(m.data().iter().all(|&x| x == byte));
            assert_eq!((m.gro_size(), m.is_truncated()), (None, false));
            seen += 1;
        }
    }
    assert_eq!(seen, 6);
}

#[test]
fn recv_batch_handles_empty_and_oversized_datagrams() {
    let r = sock();
    let tx = plain_receiver();
    tx.send_to(&[], r.local_addr()).unwrap();
    tx.send_to(&[5u8; 500], r.local_addr()).unwrap();
    let mut batch = RecvBatch::new(4, 100);
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(3);
    while got.len() < 2 && Instant::now() < deadline {
        r.recv_batch(&mut batch).unwrap();
        got.extend(
            batch
                .iter()
                .map(|m| (m.data().len(), m.is_truncated(), m.datagrams().count())),
        );
        if let Some(mut first) = batch.msg_mut(0) {
            first.data_mut().fill(0); // in-place access stays within the message
        }
    }
    assert_eq!(got, [(0, false, 0), (100, true, 1)]);
}

#[test]
fn recv_batch_times_out_when_idle() {
    let r = sock();
    r.set_timeout(Some(Duration::from_millis(50)));
    assert_eq!(r.timeout(), Some(Duration::from_millis(50)));
    let mut batch = RecvBatch::new(2, 64);
    let t = Instant::now();
    let e = r.recv_batch(&mut batch).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TimedOut);
    assert!(is_timeout(&e) && t.elapsed() >= Duration::from_millis(40));
    assert!(batch.is_empty());
    r.set_timeout(Some(Duration::ZERO));
    assert_eq!(
        r.recv_batch(&mut batch).unwrap_err().kind(),
        ErrorKind::WouldBlock
    );
}

#[test]
fn reuse_port_lets_workers_share_a_port() {
    let a = UdpSock::bind("127.0.0.1:0".parse().unwrap(), true).unwrap();
    UdpSock::bind(a.local_addr(), true).unwrap();
    let err = UdpSock::bind(a.local_addr(), false).unwrap_err();
    assert!(
        err.to_string().starts_with("bind on UDP socket 127.0.0.1:"),
        "{err}"
    );
}

#[test]
fn ipv6_round_trip_when_available() {
    let Ok(r) = UdpSock::bind("[::1]:0".parse().unwrap(), false) else {
        eprintln!("skipping: no IPv6 loopback");
        return;
    };
    let s = UdpSock::bind("[::1]:0".parse().unwrap(), false).unwrap();
    assert_eq!(s.send_batch(&[(r.local_addr(), b"six")]).unwrap(), 1);
    let mut batch = RecvBatch::new(2, 64);
    r.recv_batch(&mut batch).unwrap();
    let m = batch.msg(0).unwrap();
    assert_eq!((m.data(), m.source()), (&b"six"[..], s.local_addr()));
}

#[test]
fn datagrams_split_at_segment_size() {
    let data = [0u8; 2500];
    let lens = |seg| {
        Datagrams::new(&data, seg)
            .map(<[u8]>::len)
            .collect::<Vec<_>>()
    };
    assert_eq!(lens(Some(1000)), [1000, 1000, 500]);
    assert_eq!(lens(Some(2500)), [2500]);
    assert_eq!(lens(Some(4000)), [2500]);
    assert_eq!(lens(None), [2500]);
    assert_eq!(lens(Some(0)), [2500]);
    assert_eq!(Datagrams::new(&data, Some(1000)).len(), 3);
    assert_eq!(Datagrams::new(&[], Some(1000)).count(), 0);
}

#[test]
fn recv_batch_sizes_are_clamped() {
    let b = RecvBatch::new(0, 0);
    assert_eq!((b.capacity(), b.buf_len(), b.len()), (1, 1, 0));
    assert!(b.msg(0).is_none());
    assert_eq!(RecvBatch::new(5000, 8).capacity(), 64);
}

#[test]
fn dual_stack_socket_speaks_plain_ipv4_to_its_caller() {
    let Ok(dual) = UdpSock::listen(crate::io::Listen::DualStack(0), false) else {
        eprintln!("skipping: no IPv6");
        return;
    };
    let port = dual.local_addr().port();
    let v4 = UdpSock::bind("127.0.0.1:0".parse().unwrap(), false).unwrap();
    // IPv4 in: the source is the IPv4 address, not ::ffff:127.0.0.1.
    let to_dual: SocketAddr = SocketAddr::from(([127, 0, 0, 1], port));
    assert_eq!(v4.send_batch(&[(to_dual, b"in")]).unwrap(), 1);
    let mut batch = RecvBatch::new(2, 64);
    dual.recv_batch(&mut batch).unwrap();
    let m = batch.msg(0).unwrap();
    assert_eq!((m.data(), m.source()), (&b"in"[..], v4.local_addr()));
    // IPv4 out, to an IPv4 address, every way of sending (GSO: three segments in one call).
    // The v4 socket has no UDP_GRO: each segment arrives as its own datagram.
    assert_eq!(dual.send_batch(&[(v4.local_addr(), b"out")]).unwrap(), 1);
    dual.send_gso(v4.local_addr(), b"one", 0).unwrap();
    let mut want: Vec<&[u8]> = vec![b"out", b"one"];
    if dual.gso_supported() {
        dual.send_gso(v4.local_addr(), b"aaabbbcc", 3).unwrap();
        want.extend([&b"aaa"[..], b"bbb", b"cc"]);
    }
    let mut got = Vec::new();
    while got.len() < want.len() {
        let n = v4.recv_batch(&mut batch).unwrap();
        got.extend(
            (0..n)
                .filter_map(|i| batch.msg(i))
                .map(|m| m.data().to_vec()),
        );
    }
    assert_eq!(got, want);
}

#[test]
fn steering_by_source_port_pairs_consecutive_ports_with_sockets() {
    // A reuseport group of 3 listening sockets, steered by source port.
    let first = UdpSock::bind("127.0.0.1:0".parse().unwrap(), true).unwrap();
    let at = first.local_addr();
    let group = [
        first,
        UdpSock::bind(at, true).unwrap(),
        UdpSock::bind(at, true).unwrap(),
    ];
    steer_by_source_port(&group[0], group.len()).unwrap();
    // Six senders on consecutive ports, the first a multiple of 6: sender i lands on socket
    // i % 3, every time.
    let senders = bind_consecutive("127.0.0.1".parse().unwrap(), 6).unwrap();
    let base = senders[0].local_addr().port();
    assert_eq!(base % 6, 0);
    for (i, s) in senders.iter().enumerate() {
        assert_eq!(usize::from(s.local_addr().port() - base), i);
        for _ in 0..4 {
            s.send_gso(at, &[i as u8; 10], 0).unwrap();
        }
    }
    let mut batch = RecvBatch::new(16, 64);
    for (k, r) in group.iter().enumerate() {
        let mut got = 0;
        let deadline = Instant::now() + Duration::from_secs(3);
        while got < 8 && Instant::now() < deadline {
            let Ok(n) = r.recv_batch(&mut batch) else {
                continue;
            };
            for i in 0..n {
                let m = batch.msg(i).unwrap();
                assert_eq!(usize::from(m.source().port()) % 3, k, "socket {k}");
                assert_eq!(usize::from(m.data()[0]) % 3, k);
                got += 1;
            }
        }
        assert_eq!(got, 8, "socket {k} gets its two senders' datagrams");
    }
}
