//! The vhost-user-net device over a real vhost-user socket and a socket port: frames arrive
//! intact in both directions, frames spread over several mergeable RX buffers are published
//! together, bad input is counted and survived, and with `LOG_ALL` on every page the device
//! wrote (header, payload, used ring) is in the dirty log. The daemon runs in-process (so the
//! test can read its counters) or as the `vhost-dirtylog-net` program.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use vhost::vhost_user::message::VhostUserVirtioFeatures;
use vhost_dirtylog::driver::net::{self as netdrv, NetConfigInfo, POISON};
use vhost_dirtylog::driver::{Buf, DriverError, QueueLayout};
use vhost_dirtylog::net::{NetConfig, NetDevice, Port};
use vhost_dirtylog::test_utils::net::*;
use vhost_dirtylog::test_utils::{
    pages_covering, set_pages, DaemonDir, DaemonProcess, InProcessDaemon,
};
use vhost_dirtylog::virtio_net::NET_HDR_SIZE;
use vhost_dirtylog::vmm::SharedLog;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

const BIN: &str = env!("CARGO_BIN_EXE_vhost-dirtylog-net");

fn logged(log: &SharedLog) -> BTreeSet<u64> {
    set_pages(log).collect()
}

/// Asserts every page the device wrote for `f` (its buffers, which hold header and payload)
/// and the RX used ring are marked.
fn assert_marked(log: &SharedLog, f: &netdrv::RxFrame, used: QueueLayout) {
    let dirty = logged(log);
    for &(gpa, len) in &f.bufs {
        for p in pages_covering(gpa, u64::from(len)) {
            assert!(dirty.contains(&p), "RX buffer page {p:#x} not in the log");
        }
    }
    for p in used.used_pages() {
        assert!(
            dirty.contains(&p),
            "RX used ring page {p:#x} not in the log"
        );
    }
}

#[test]
fn net_rx_frames_arrive_intact_and_marked() {
    let d = in_process(1);
    let (mut g, log) = Guest::new(d.daemon.connect(), 1, true);
    let log = log.unwrap();
    let cfg = NetConfigInfo::parse(&g.conn.get_config(0, 12).unwrap());
    assert_eq!(cfg.status, 1, "link up");
    assert_eq!(cfg.max_virtqueue_pairs, 1);
    let wire = &d.wires[0];
    for (i, len) in [64usize, 1500, 9000, 60, 1514].into_iter().enumerate() {
        let sent = frame(len, i as u8);
        let snap = g.ram.snapshot();
        wire.inject(&sent);
        let f = g.rx[0].recv(T).unwrap();
        assert_eq!(f.data, sent, "frame {i} ({len} bytes) arrived intact");
        let expect_bufs = (NET_HDR_SIZE + len).div_ceil(BUF_LEN as usize);
        assert_eq!(usize::from(f.hdr.num_buffers()), expect_bufs, "{len} bytes");
        assert_eq!(f.bufs.len(), expect_bufs);
        assert_marked(&log, &f, rx_layout(0));
        // Every page that changed is the driver's own (descriptors, avail ring) or marked.
        let dirty = logged(&log);
        let l = rx_layout(0);
        let driver_pages: BTreeSet<u64> = pages_covering(l.desc, l.used - l.desc).collect();
        for p in g.ram.changed_pages(&snap) {
            assert!(
                driver_pages.contains(&p) || dirty.contains(&p),
                "page {p:#x} changed but is not in the log"
            );
        }
    }
    // The bytes after a frame in its last buffer were not touched (still poison).
    let sent = frame(100, 9);
    wire.inject(&sent);
    let f = g.rx[0].recv(T).unwrap();
    let (gpa, len) = f.bufs[0];
    assert_eq!(len as usize, NET_HDR_SIZE + 100);
    let tail = g.ram.read_vec(gpa + u64::from(len), 64).unwrap();
    assert!(
        tail.iter().all(|&b| b == POISON),
        "device wrote past the frame"
    );
    let s = d.dev.pair_stats(0).unwrap();
    assert_eq!(s.rx_frames, 6, "{s:?}");
    assert_eq!(s.errors(), 0, "{s:?}");
}

#[test]
fn net_rx_burst_publishes_whole_frames() {
    // Many frames queued in the port before the guest posts buffers: they arrive in bursts,
    // and RxQueue::recv fails if a frame's buffers are not all in the used ring together.
    let d = in_process(1);
    let conn = d.daemon.connect();
    let (mut g, _) = Guest::new(conn, 1, false);
    let wire = &d.wires[0];
    let sizes: Vec<usize> = (0..40).map(|i| [64, 1500, 3000, 4200][i % 4]).collect();
    // The port's socket queue holds few datagrams (net.unix.max_dgram_qlen, 10 by default):
    // inject from a thread, which blocks while the guest has no buffers.
    let (sock, to, sz) = (
        wire.sock.try_clone().unwrap(),
        wire.port.clone(),
        sizes.clone(),
    );
    let injector = std::thread::spawn(move || {
        for (i, &len) in sz.iter().enumerate() {
            sock.send_to(&frame(len, i as u8), &to).unwrap();
        }
    });
    for (i, &len) in sizes.iter().enumerate() {
        let f = g.rx[0].recv(T).unwrap();
        assert_eq!(f.data, frame(len, i as u8), "frame {i}");
    }
    injector.join().unwrap();
    let s = d.dev.pair_stats(0).unwrap();
    assert_eq!(s.rx_frames, 40);
    // 64 buffers cannot hold all 40 frames at once: some frames waited for buffers.
    assert!(s.rx_buffers > 64, "{s:?}");
    assert!(
        s.rx_bursts < s.rx_frames,
        "bursts {} frames {}",
        s.rx_bursts,
        s.rx_frames
    );
    // Negative control: publishing each buffer on its own (virtio-queue's `add_used`) is caught.
    d.dev.publish_each_buffer_for_tests(true);
    wire.inject(&frame(4200, 0x77));
    match g.rx[0].recv(T) {
        Err(DriverError::Backend(m)) => assert!(m.contains("published with only"), "{m}"),
        other => panic!("a frame published buffer by buffer was not caught: {other:?}"),
    }
}

#[test]
fn net_tx_frames_reach_the_port_and_used_ring_is_marked() {
    let d = in_process(1);
    let (mut g, log) = Guest::new(d.daemon.connect(), 1, true);
    let log = log.unwrap();
    let wire = &d.wires[0];
    for (i, (len, split)) in [(64usize, false), (1500, true), (1514, false)]
        .into_iter()
        .enumerate()
    {
        let f = frame(len, 0x40 + i as u8);
        g.tx[0].send(&f, split).unwrap();
        g.tx[0].kick().unwrap();
        assert_eq!(wire.take(), f, "TX frame {i}");
        g.tx[0].reap(1, T).unwrap();
    }
    let dirty = logged(&log);
    for p in tx_layout(0).used_pages() {
        assert!(
            dirty.contains(&p),
            "TX used ring page {p:#x} not in the log"
        );
    }
    // The device never writes TX buffers: their pages stay clean.
    for p in pages_covering(tx_slots(0), 3 * u64::from(SLOT_LEN)) {
        assert!(!dirty.contains(&p), "TX buffer page {p:#x} marked");
    }
    let s = d.dev.pair_stats(0).unwrap();
    assert_eq!((s.tx_frames, s.tx_bytes), (3, 64 + 1500 + 1514), "{s:?}");
}

/// A full port (the peer reads nothing; a unix datagram queue holds only
/// `net.unix.max_dgram_qlen` datagrams, 10 by default) makes TX wait, not drop: every frame
/// the guest sent arrives, in order, once the peer reads, and none is completed before it
/// was sent.
#[test]
fn net_tx_waits_for_a_full_port_instead_of_dropping() {
    let d = in_process(1);
    let (mut g, _) = Guest::new(d.daemon.connect(), 1, false);
    let wire = &d.wires[0];
    let n = 40usize;
    let frames: Vec<Vec<u8>> = (0..n).map(|i| frame(100 + i, i as u8)).collect();
    for f in &frames {
        g.tx[0].send(f, false).unwrap();
    }
    g.tx[0].kick().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let s = d.dev.pair_stats(0).unwrap();
    assert!(s.tx_blocked > 0, "the port never filled up: {s:?}");
    assert!(s.tx_frames < n as u64, "{s:?}");
    for (i, f) in frames.iter().enumerate() {
        assert_eq!(&wire.take(), f, "TX frame {i}");
    }
    g.tx[0].reap(n, T).unwrap();
    let s = d.dev.pair_stats(0).unwrap();
    assert_eq!((s.tx_frames, s.tx_dropped), (n as u64, 0), "{s:?}");
}

#[test]
fn net_bad_input_is_counted_not_fatal() {
    let d = in_process(1);
    let (mut g, _) = Guest::new(d.daemon.connect(), 1, false);
    let wire = &d.wires[0];
    // From the port: a runt and an oversized datagram, then a good frame.
    wire.inject(&[1, 2, 3]);
    wire.inject(&vec![0xab; 66_000]);
    wire.inject(&frame(200, 1));
    assert_eq!(g.rx[0].recv(T).unwrap().data, frame(200, 1));
    // From the guest: a runt, a chain outside guest memory, a device-writable descriptor,
    // a chain longer than the largest frame; then a good frame.
    let tx = &mut g.tx[0];
    let slot = tx_slots(0) + 100 * u64::from(SLOT_LEN);
    tx.send_raw(&[Buf::readable(slot, NET_HDR_SIZE as u32 + 5)])
        .unwrap();
    tx.send_raw(&[Buf::readable(RAM_SIZE + 0x1000, 100)])
        .unwrap();
    tx.send_raw(&[Buf::writable(slot, 100)]).unwrap();
    tx.send_raw(&[
        Buf::readable(0x200000, 40000),
        Buf::readable(0x200000, 40000),
    ])
    .unwrap();
    tx.send(&frame(300, 2), false).unwrap();
    tx.kick().unwrap();
    assert_eq!(wire.take(), frame(300, 2));
    tx.reap(5, T).unwrap();
    let s = d.dev.pair_stats(0).unwrap();
    assert_eq!((s.rx_runts, s.rx_oversized), (1, 1), "{s:?}");
    assert_eq!(
        (s.tx_runts, s.tx_bad_chains, s.tx_oversized),
        (1, 2, 1),
        "{s:?}"
    );
    assert_eq!((s.rx_frames, s.tx_frames), (1, 1), "{s:?}");
}

#[test]
fn net_two_queue_pairs_use_their_own_ports() {
    let d = in_process(2);
    let (mut g, _) = Guest::new(d.daemon.connect(), 2, false);
    assert!(g.conn.queue_num() >= 4);
    for p in 0..2usize {
        let f = frame(500, 0x10 + p as u8);
        d.wires[p].inject(&f);
        assert_eq!(g.rx[p].recv(T).unwrap().data, f, "pair {p} RX");
        g.tx[p].send(&f, false).unwrap();
        g.tx[p].kick().unwrap();
        assert_eq!(d.wires[p].take(), f, "pair {p} TX");
    }
    assert!(g.rx[0].try_recv().unwrap().is_none());
    for p in 0..2 {
        let s = d.dev.pair_stats(p).unwrap();
        assert_eq!((s.rx_frames, s.tx_frames), (1, 1), "pair {p}: {s:?}");
    }
}

fn spawn_daemon(env: DaemonDir, port: &Path, peer: &Path, drop_marks: bool) -> DaemonProcess {
    let mut cmd = std::process::Command::new(BIN);
    cmd.arg("--socket-path")
        .arg(&env.sock)
        .arg("--socket-port")
        .arg(port)
        .arg("--socket-peer")
        .arg(peer)
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null());
    if drop_marks {
        cmd.env("VHOST_DIRTYLOG_TEST_DROP_MARKS", "1");
    }
    DaemonProcess::spawn(&mut cmd, env)
}

#[test]
fn net_daemon_program_round_trip_and_drop_marks_switch() {
    for drop_marks in [false, true] {
        let env = DaemonDir::new("net-bin");
        let (port, peer) = (env.dir.path().join("port"), env.dir.path().join("peer"));
        let wire = Wire::new(&peer, &port);
        let mut d = spawn_daemon(env, &port, &peer, drop_marks);
        let (mut g, log) = Guest::new(d.connect(), 1, true);
        let log = log.unwrap();
        assert!(g.conn.offered_features() & VhostUserVirtioFeatures::LOG_ALL.bits() != 0);
        let f = frame(1500, 7);
        wire.inject(&f);
        let got = g.rx[0].recv(T).unwrap();
        assert_eq!(got.data, f);
        g.tx[0].send(&f, true).unwrap();
        g.tx[0].kick().unwrap();
        assert_eq!(wire.take(), f);
        g.tx[0].reap(1, T).unwrap();
        let marked = !logged(&log).is_empty();
        if drop_marks && cfg!(feature = "test-drop-marks") {
            assert!(!marked, "drop-marks switch on, but pages were marked");
            // The negative control: the page check catches the unmarked build.
            let caught = std::panic::catch_unwind(|| assert_marked(&log, &got, rx_layout(0)));
            assert!(caught.is_err(), "the page check missed the unmarked build");
        } else {
            assert!(marked, "nothing marked");
            assert_marked(&log, &got, rx_layout(0));
        }
        d.assert_alive();
    }
}

/// A TAP in a fresh network namespace, with an `AF_PACKET` socket on it (the "wire"), or
/// `None` (with a loud message) where that is not possible (not root, no `/dev/net/tun`).
/// Namespaces are per thread: a helper thread unshares, creates both, and hands the fds back;
/// nothing leaves the namespace.
fn tap_in_netns(name: &'static str) -> Option<(vhost_dirtylog::net::TapPort, std::fs::File)> {
    vhost_dirtylog::test_utils::net::tap_in_netns(name)
        .map_err(|e| eprintln!("SKIPPED: TAP test needs root and /dev/net/tun ({e})"))
        .ok()
}

#[test]
fn net_tap_port_round_trip() {
    use std::io::{Read, Write};
    let Some((tap, mut wire)) = tap_in_netns("vdltap0") else {
        return;
    };
    let dir = DaemonDir::new("net-tap");
    let ports: Vec<Arc<dyn Port>> = vec![Arc::new(tap)];
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let backend = NetDevice::into_backend(NetConfig::default(), ports, mem.clone()).unwrap();
    let dev = backend.inner().clone();
    let d2 = dev.clone();
    let daemon = InProcessDaemon::serve_with(backend, mem, &dir.sock, |d| d2.attach(d).unwrap());
    let (mut g, log) = Guest::new(daemon.connect(), 1, true);
    let log = log.unwrap();
    // Offloads are offered on a TAP (the driver does not ack them).
    let offered = g.conn.offered_features();
    assert!(offered & (1 << virtio_bindings::virtio_net::VIRTIO_NET_F_HOST_TSO4) != 0);
    // RX: a frame sent on the interface reaches the guest (skip whatever else the kernel sends).
    let mut f = frame(1000, 0x33);
    f[12..14].copy_from_slice(&[0x88, 0xb5]); // local experimental EtherType
    wire.write_all(&f).unwrap();
    let got = loop {
        let r = g.rx[0].recv(T).unwrap();
        if r.data == f {
            break r;
        }
    };
    assert_eq!(got.hdr.num_buffers(), 1);
    assert_marked(&log, &got, rx_layout(0));
    // TX: a guest frame comes out of the interface.
    let mut t = frame(600, 0x44);
    t[12..14].copy_from_slice(&[0x88, 0xb5]);
    g.tx[0].send(&t, true).unwrap();
    g.tx[0].kick().unwrap();
    g.tx[0].reap(1, T).unwrap();
    let mut buf = vec![0u8; 70000];
    let mut seen = false;
    for _ in 0..50 {
        match wire.read(&mut buf) {
            Ok(n) if buf[..n] == t[..] => {
                seen = true;
                break;
            }
            Ok(_) => continue,
            Err(_) => break,
        }
    }
    assert!(seen, "the guest's frame did not come out of the TAP");
    let s = dev.pair_stats(0).unwrap();
    assert_eq!(s.tx_frames, 1, "{s:?}");
    assert_eq!(s.errors(), 0, "{s:?}");
}

/// Injects frames into the port until `stop` is set, one every 100 µs at most (so the guest,
/// which keeps re-posting, does not run out of buffers and the socket queue does not fill).
fn flood(
    wire: &Wire,
    len: usize,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<u64> {
    let sock = wire.sock.try_clone().unwrap();
    sock.set_nonblocking(true).unwrap();
    let to = wire.port.clone();
    std::thread::spawn(move || {
        let f = frame(len, 0x5a);
        let mut sent = 0u64;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            if sock.send_to(&f, &to).is_ok() {
                sent += 1;
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        sent
    })
}

#[test]
fn net_get_vring_base_leaves_no_write_after_the_reply() {
    // Frames keep arriving and the guest keeps posting buffers; GET_VRING_BASE on the RX
    // queue must leave guest memory untouched after its reply. (What makes it hold: the
    // worker runs a burst under the ring's lock, which vhost-user-backend takes to clear
    // `ready`, and virtio-queue pops nothing from a ring that is not ready.)
    let d = in_process(1);
    let (mut g, _) = Guest::new(d.daemon.connect(), 1, false);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let injector = flood(&d.wires[0], 1500, stop.clone());
    for _ in 0..200 {
        g.rx[0].recv(T).unwrap();
    }
    g.conn.stop_queue(0).unwrap();
    // Take what was delivered before the reply and post fresh buffers (driver writes), so a
    // device that went on would have room to write.
    for _ in 0..RX_BUFS {
        if g.rx[0].try_recv().unwrap().is_none() {
            break;
        }
    }
    let snap = g.ram.snapshot();
    std::thread::sleep(Duration::from_millis(200));
    let changed = g.ram.changed_pages(&snap);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(injector.join().unwrap() > 200);
    assert!(
        changed.is_empty(),
        "pages written after GET_VRING_BASE: {changed:x?}"
    );
}

#[test]
fn net_daemon_serves_a_reconnecting_frontend() {
    let env = DaemonDir::new("net-reconnect");
    let (port, peer) = (env.dir.path().join("port"), env.dir.path().join("peer"));
    let wire = Wire::new(&peer, &port);
    let mut d = spawn_daemon(env, &port, &peer, false);
    for round in 0..3u8 {
        let (mut g, _) = Guest::new(d.connect(), 1, false);
        let f = frame(700, round);
        wire.inject(&f);
        assert_eq!(g.rx[0].recv(T).unwrap().data, f, "round {round}");
        g.tx[0].send(&f, false).unwrap();
        g.tx[0].kick().unwrap();
        assert_eq!(wire.take(), f, "round {round}");
        drop(g);
        d.assert_alive();
    }
}

/// Frames per second from the socket port into the guest for one second, logging off or on.
fn rx_rate(len: usize, log: bool) -> f64 {
    let d = in_process(1);
    let (mut g, _log) = Guest::new(d.daemon.connect(), 1, log);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sock = d.wires[0].sock.try_clone().unwrap();
    let to = d.wires[0].port.clone();
    let s2 = stop.clone();
    let injector = std::thread::spawn(move || {
        sock.set_write_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let f = frame(len, 1);
        while !s2.load(std::sync::atomic::Ordering::Relaxed) {
            let _ = sock.send_to(&f, &to);
        }
    });
    // Warm up, then count for one second.
    for _ in 0..1000 {
        g.rx[0].recv(T).unwrap();
    }
    let start = std::time::Instant::now();
    let mut n = 0u64;
    while start.elapsed() < Duration::from_secs(1) {
        g.rx[0].recv(T).unwrap();
        n += 1;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    injector.join().unwrap();
    let s = d.dev.pair_stats(0).unwrap();
    eprintln!(
        "  {len:>5} B, logging {:>3}: {rate:>10.0} frames/s ({} frames in {} bursts, {:.1} frames/burst)",
        if log { "on" } else { "off" },
        s.rx_frames,
        s.rx_bursts,
        s.rx_frames as f64 / s.rx_bursts.max(1) as f64
    );
    rate
}

/// Preliminary RX throughput through the socket port (the in-process guest driver and the
/// injecting socket share the machine with the device, so absolute numbers are low; the ratio
/// is the point). `cargo test --release --test net_basic -- --ignored --nocapture`.
#[test]
#[ignore]
fn net_rx_throughput_logging_off_vs_on() {
    for len in [64usize, 1500] {
        let off = rx_rate(len, false);
        let on = rx_rate(len, true);
        eprintln!("  {len:>5} B: logging on / off = {:.3}", on / off);
    }
}
