//! Shared by the `blk_*` integration tests: spawn the real `vhost-dirtylog-blk` daemon (or run
//! the device in-process), and set up an in-process VMM with `vhost_dirtylog::driver`.
#![allow(dead_code)]

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tempfile::TempDir;
use vhost::vhost_user::Listener;
use vhost_dirtylog::backend::DirtyLogBackend;
use vhost_dirtylog::blk::disk::Disk;
use vhost_dirtylog::blk::{BlkConfig, BlkDevice};
use vhost_dirtylog::driver::{BlkQueue, Connection, GuestRam, QueueLayout, RegionSpec};
use vhost_dirtylog::log::DirtyLog;
use vhost_dirtylog::vmm::SharedLog;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

pub const BIN: &str = env!("CARGO_BIN_EXE_vhost-dirtylog-blk");
pub const T: Duration = Duration::from_secs(10);

/// Default image: 4 MiB = 8192 sectors.
pub const IMAGE_SIZE: u64 = 4 << 20;
/// Default guest RAM: 8 MiB at GPA 0.
pub const RAM_SIZE: u64 = 8 << 20;
/// Queue `i` lives at `QUEUE_BASE + i * QUEUE_STRIDE`.
pub const QUEUE_BASE: u64 = 0x10000;
pub const QUEUE_STRIDE: u64 = 0x10000;
/// Scratch (headers, status bytes) of queue `i`: `SCRATCH_BASE + i * SCRATCH_STRIDE`.
pub const SCRATCH_BASE: u64 = 0x100000;
pub const SCRATCH_STRIDE: u64 = 0x40000;
/// Data buffers go from here up.
pub const DATA_BASE: u64 = 0x400000;

/// Byte `i` of the initial image.
pub fn image_byte(off: u64) -> u8 {
    ((off / 512) as u8).wrapping_mul(31) ^ (off as u8)
}

pub fn image_bytes(off: u64, len: usize) -> Vec<u8> {
    (0..len as u64).map(|i| image_byte(off + i)).collect()
}

/// A temp dir with an image (filled with `image_byte`) and a socket path.
pub struct Env {
    pub dir: TempDir,
    pub image: PathBuf,
    pub sock: PathBuf,
}

impl Env {
    pub fn new(size: u64) -> Env {
        let dir = tempfile::Builder::new()
            .prefix("blk-test")
            .tempdir_in(std::env::temp_dir())
            .unwrap();
        let image = dir.path().join("disk.img");
        let mut f = std::fs::File::create(&image).unwrap();
        f.write_all(&image_bytes(0, size as usize)).unwrap();
        f.sync_all().unwrap();
        let sock = dir.path().join("blk.sock");
        Env { dir, image, sock }
    }
}

/// The daemon binary, killed on drop.
pub struct Daemon {
    pub child: Child,
    pub env: Env,
}

impl Daemon {
    /// Spawns the daemon on a fresh image of `size` bytes with extra `args`.
    pub fn spawn(size: u64, args: &[&str]) -> Daemon {
        Self::spawn_in(Env::new(size), args)
    }

    pub fn spawn_in(env: Env, args: &[&str]) -> Daemon {
        let child = Command::new(BIN)
            .arg("--socket-path")
            .arg(&env.sock)
            .args(args)
            .arg(&env.image)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn daemon");
        let d = Daemon { child, env };
        d.wait_socket();
        d
    }

    pub fn wait_socket(&self) {
        let deadline = Instant::now() + T;
        while !self.env.sock.exists() {
            assert!(
                Instant::now() < deadline,
                "daemon did not create its socket"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn connect(&self) -> Connection {
        Connection::connect(&self.env.sock, T).expect("connect")
    }

    pub fn image(&self) -> &Path {
        &self.env.image
    }

    /// Asserts the daemon is still running.
    pub fn assert_alive(&mut self) {
        assert!(
            self.child.try_wait().unwrap().is_none(),
            "daemon exited unexpectedly"
        );
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The device run in this process (so tests can read its counters); serves connections on a
/// background thread until the test ends.
pub struct InProcess {
    pub env: Env,
    pub device: BlkDevice,
    thread: Option<JoinHandle<()>>,
}

impl InProcess {
    /// Serves exactly one connection with a device for `env.image`.
    pub fn start(env: Env, read_only: bool, direct: bool, config: BlkConfig) -> InProcess {
        let disk = Arc::new(Disk::open(&env.image, read_only, direct).unwrap());
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let log = DirtyLog::new();
        let device = BlkDevice::new(disk, config, log.clone(), mem.clone()).unwrap();
        let backend = DirtyLogBackend::with_log(device.clone(), log);
        let mut daemon = VhostUserDaemon::new("blk-test".into(), backend, mem).unwrap();
        let mut listener = Listener::new(&env.sock, true).unwrap();
        let thread = std::thread::spawn(move || {
            daemon.start(&mut listener).unwrap();
            let _ = daemon.wait();
        });
        InProcess {
            env,
            device,
            thread: Some(thread),
        }
    }

    pub fn connect(&self) -> Connection {
        Connection::connect(&self.env.sock, T).expect("connect")
    }

    /// Waits for the serving thread (after the test dropped its connection).
    pub fn join(mut self) {
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

/// An in-process VMM + guest: RAM, a connection and started queues.
pub struct Vm {
    pub ram: Arc<GuestRam>,
    pub conn: Connection,
    pub queues: Vec<BlkQueue>,
}

impl Vm {
    /// Negotiates (virtio features `want` ∩ offered), sets the memory table for `layout` and
    /// starts `nq` queues of `qsize` entries.
    pub fn with(conn: Connection, layout: &[RegionSpec], nq: usize, qsize: u16, want: u64) -> Vm {
        let mut conn = conn;
        let ram = Arc::new(GuestRam::new(layout).unwrap());
        conn.negotiate(
            want,
            vhost::vhost_user::VhostUserProtocolFeatures::MQ
                | vhost::vhost_user::VhostUserProtocolFeatures::LOG_SHMFD
                | vhost::vhost_user::VhostUserProtocolFeatures::REPLY_ACK
                | vhost::vhost_user::VhostUserProtocolFeatures::CONFIG
                | vhost::vhost_user::VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS,
        )
        .unwrap();
        conn.set_mem_table(&ram).unwrap();
        let mut queues = Vec::new();
        for i in 0..nq {
            let layout = QueueLayout::new(QUEUE_BASE + i as u64 * QUEUE_STRIDE, qsize).unwrap();
            let q = BlkQueue::new(
                ram.clone(),
                layout,
                SCRATCH_BASE + i as u64 * SCRATCH_STRIDE,
                conn.event_idx(),
            )
            .unwrap();
            conn.start_queue(i, q.queue()).unwrap();
            queues.push(q);
        }
        Vm { ram, conn, queues }
    }

    /// Default: one 8 MiB region, `nq` queues of 128, all features but LOG_ALL.
    pub fn new(conn: Connection, nq: usize) -> Vm {
        Self::with(
            conn,
            &[RegionSpec::new(0, RAM_SIZE)],
            nq,
            128,
            !vhost_dirtylog::backend::VHOST_F_LOG_ALL,
        )
    }

    /// Attaches a fresh log covering the RAM (plus `extra` bytes of address space) and turns
    /// LOG_ALL on.
    pub fn start_logging(&mut self, gpa_end: u64) -> SharedLog {
        let log = SharedLog::new(gpa_end).unwrap();
        self.conn.set_log_base(log.dirty_log_region()).unwrap();
        self.conn.set_log_all(true).unwrap();
        log
    }
}

/// Pages (4 KiB) covering `[gpa, gpa + len)`.
pub fn pages(gpa: u64, len: u64) -> impl Iterator<Item = u64> {
    (gpa >> 12)..=((gpa + len - 1) >> 12)
}

/// Every set page of the log.
pub fn dirty_pages(log: &SharedLog) -> Vec<u64> {
    let r = log.region();
    (0..r.pages()).filter(|&p| r.test_page(p)).collect()
}

/// A raw connected stream, for tests that speak the protocol by hand.
pub fn raw_stream(sock: &Path) -> UnixStream {
    let deadline = Instant::now() + T;
    loop {
        match UnixStream::connect(sock) {
            Ok(s) => return s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => panic!("connect: {e}"),
        }
    }
}
