//! vhost-user-blk fixtures: a disk image with a known pattern, the device served in-process or
//! the real daemon binary spawned on it, and an in-process VM (RAM, connection, started queues)
//! with a fixed guest-physical layout.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use super::{DaemonDir, DaemonProcess, InProcessDaemon};
use crate::blk::disk::Disk;
use crate::blk::{BlkConfig, BlkDevice};
use crate::driver::{BlkQueue, Connection, DriverError, GuestRam, QueueLayout, RegionSpec};
use crate::log::GuestDirtyBitmap;
use crate::vmm::SharedLog;

/// Default image: 4 MiB = 8192 sectors.
pub const IMAGE_SIZE: u64 = 4 << 20;
/// Default guest RAM: 8 MiB at guest-physical 0.
pub const RAM_SIZE: u64 = 8 << 20;
/// Queue `i`'s rings live at `QUEUE_BASE + i * QUEUE_STRIDE` (guest-physical).
pub const QUEUE_BASE: u64 = 0x10000;
/// See [`QUEUE_BASE`].
pub const QUEUE_STRIDE: u64 = 0x10000;
/// Scratch (headers, status bytes) of queue `i`: `SCRATCH_BASE + i * SCRATCH_STRIDE`.
pub const SCRATCH_BASE: u64 = 0x100000;
/// See [`SCRATCH_BASE`].
pub const SCRATCH_STRIDE: u64 = 0x40000;
/// Data buffers go from here up (guest-physical).
pub const DATA_BASE: u64 = 0x400000;

/// Byte at offset `off` of the pattern image ([`disk_dir`]).
pub fn image_byte(off: u64) -> u8 {
    ((off / 512) as u8).wrapping_mul(31) ^ (off as u8)
}

/// `len` bytes of the pattern image from offset `off`.
pub fn image_bytes(off: u64, len: usize) -> Vec<u8> {
    (0..len as u64).map(|i| image_byte(off + i)).collect()
}

/// A scratch directory whose image holds `size` bytes of the [`image_byte`] pattern.
pub fn disk_dir(size: u64) -> DaemonDir {
    let env = DaemonDir::new("blk-test");
    env.write_image(&image_bytes(0, size as usize));
    env
}

/// Runs the daemon binary `bin` (`vhost-dirtylog-blk`, found by the caller, e.g. with
/// `env!("CARGO_BIN_EXE_vhost-dirtylog-blk")`) as `bin --socket-path <sock> <args> <image>`,
/// logging at `RUST_LOG=<rust_log>`, and waits for its socket.
pub fn spawn_blk(
    bin: impl AsRef<Path>,
    env: DaemonDir,
    args: &[&str],
    rust_log: &str,
) -> DaemonProcess {
    let mut cmd = Command::new(bin.as_ref());
    cmd.arg("--socket-path")
        .arg(&env.sock)
        .args(args)
        .arg(&env.image)
        .env("RUST_LOG", rust_log)
        .stdin(Stdio::null());
    DaemonProcess::spawn(&mut cmd, env)
}

/// Our vhost-user-blk device, served in this process (so a test can read its counters) for
/// one connection.
#[derive(Debug)]
pub struct InProcessBlk {
    /// The image and socket.
    pub env: DaemonDir,
    /// The device (a clone of the one the daemon serves).
    pub device: BlkDevice,
    daemon: InProcessDaemon<GuestDirtyBitmap>,
}

impl InProcessBlk {
    /// Serves a device for `env.image` (opened read-only and/or with `O_DIRECT` as asked) on
    /// `env.sock`.
    pub fn start(env: DaemonDir, read_only: bool, direct: bool, config: BlkConfig) -> Self {
        let disk = Arc::new(Disk::open(&env.image, read_only, direct).expect("open the image"));
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let backend = BlkDevice::into_backend(disk, config, mem.clone()).expect("the device");
        let device = backend.inner().clone();
        // As the daemon does: the io_uring dataplane when the device's config asks for it.
        let daemon = InProcessDaemon::serve_with(backend, mem, &env.sock, |d| {
            device.attach(d).expect("attach the io_uring dataplane")
        });
        InProcessBlk {
            env,
            device,
            daemon,
        }
    }

    /// Connects the frontend.
    pub fn connect(&self) -> Connection {
        self.daemon.connect()
    }

    /// Waits for the daemon thread (after the frontend disconnected); see
    /// [`InProcessDaemon::join`].
    pub fn join(self) -> Result<(), String> {
        self.daemon.join()
    }
}

/// An in-process VMM and guest for a vhost-user-blk backend: RAM, the connection and started
/// queues (queue `i` at [`QUEUE_BASE`]` + i * `[`QUEUE_STRIDE`], its scratch at
/// [`SCRATCH_BASE`]` + i * `[`SCRATCH_STRIDE`]).
#[derive(Debug)]
pub struct Vm {
    /// Guest RAM.
    pub ram: Arc<GuestRam>,
    /// The vhost-user connection.
    pub conn: Connection,
    /// The started queues.
    pub queues: Vec<BlkQueue>,
}

impl Vm {
    /// Negotiates (virtio features `want` ∩ offered; protocol features `MQ`, `LOG_SHMFD`,
    /// `REPLY_ACK`, `CONFIG`, `CONFIGURE_MEM_SLOTS` ∩ offered), sets the memory table for
    /// `layout` and starts `nq` queues of `qsize` entries.
    pub fn with(conn: Connection, layout: &[RegionSpec], nq: usize, qsize: u16, want: u64) -> Vm {
        Self::try_with(conn, layout, nq, qsize, want).expect("set up the VM")
    }

    fn try_with(
        mut conn: Connection,
        layout: &[RegionSpec],
        nq: usize,
        qsize: u16,
        want: u64,
    ) -> Result<Vm, DriverError> {
        let ram = Arc::new(GuestRam::new(layout)?);
        conn.negotiate(
            want,
            VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::LOG_SHMFD
                | VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS,
        )?;
        conn.set_mem_table(&ram)?;
        let mut queues = Vec::new();
        for i in 0..nq {
            let layout = QueueLayout::new(QUEUE_BASE + i as u64 * QUEUE_STRIDE, qsize)?;
            let q = BlkQueue::new(
                ram.clone(),
                layout,
                SCRATCH_BASE + i as u64 * SCRATCH_STRIDE,
                conn.event_idx(),
            )?;
            conn.start_queue(i, q.queue())?;
            queues.push(q);
        }
        Ok(Vm { ram, conn, queues })
    }

    /// One region of [`RAM_SIZE`] at 0, `nq` queues of 128, every offered feature but
    /// `LOG_ALL`.
    pub fn new(conn: Connection, nq: usize) -> Vm {
        Self::with(
            conn,
            &[RegionSpec::new(0, RAM_SIZE)],
            nq,
            128,
            !VhostUserVirtioFeatures::LOG_ALL.bits(),
        )
    }

    /// Attaches a fresh log covering guest-physical `[0, gpa_end)` and turns `LOG_ALL` on.
    pub fn start_logging(&mut self, gpa_end: u64) -> SharedLog {
        let log = SharedLog::new(gpa_end).expect("allocate the log");
        self.conn
            .set_log_base(log.dirty_log_region())
            .expect("SET_LOG_BASE");
        self.conn.set_log_all(true).expect("LOG_ALL on");
        log
    }
}
