//! Daemon fixtures: a vhost-user device served in this process by the stock
//! `VhostUserDaemon`, or a daemon program run as a child process; both on a socket in a
//! scratch directory, reached with the in-process frontend ([`Connection`]).

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tempfile::TempDir;
use vhost::vhost_user::Listener;
use vhost_user_backend::bitmap::BitmapReplace;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon};
use vm_memory::bitmap::Bitmap;
use vm_memory::mmap::NewBitmap;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::driver::Connection;

/// How long the fixtures wait for a daemon's socket to appear or accept.
pub const DAEMON_TIMEOUT: Duration = Duration::from_secs(10);

/// A scratch directory for one daemon, removed (with everything in it) on drop: the socket
/// path `sock` and the path `image` for a disk image (neither is created here).
#[derive(Debug)]
pub struct DaemonDir {
    /// The directory.
    pub dir: TempDir,
    /// `<dir>/vhost.sock`.
    pub sock: PathBuf,
    /// `<dir>/disk.img`.
    pub image: PathBuf,
}

impl DaemonDir {
    /// A new directory under the system's temp dir, its name starting with `prefix`.
    pub fn new(prefix: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir()
            .expect("create a scratch directory");
        DaemonDir {
            sock: dir.path().join("vhost.sock"),
            image: dir.path().join("disk.img"),
            dir,
        }
    }

    /// Writes `data` to [`image`](Self::image) (and syncs it).
    pub fn write_image(&self, data: &[u8]) {
        std::fs::write(&self.image, data).expect("write the disk image");
        std::fs::File::open(&self.image)
            .and_then(|f| f.sync_all())
            .expect("sync the disk image");
    }

    /// Makes [`image`](Self::image) a sparse file of `size` bytes (reads as zeroes).
    pub fn sparse_image(&self, size: u64) {
        std::fs::File::create(&self.image)
            .and_then(|f| f.set_len(size))
            .expect("create the disk image");
    }
}

/// A daemon program run as a child process (e.g. `vhost-dirtylog-blk`), killed and reaped on
/// drop, with the scratch directory it serves from.
#[derive(Debug)]
pub struct DaemonProcess {
    /// The process.
    pub child: Child,
    /// Its socket (and image); removed after the process is gone.
    pub env: DaemonDir,
}

impl DaemonProcess {
    /// Spawns `cmd` (which must make the program listen on `env.sock`) and waits until the
    /// socket exists. Waiting for the file, not probing with `connect`, matters: each probe
    /// would be a frontend session for a daemon that serves one at a time.
    pub fn spawn(cmd: &mut Command, env: DaemonDir) -> Self {
        let d = Self::adopt(cmd.spawn().expect("spawn the daemon"), env);
        d.wait_socket();
        d
    }

    /// Takes over a child started by the caller (not waiting for anything).
    pub fn adopt(child: Child, env: DaemonDir) -> Self {
        DaemonProcess { child, env }
    }

    /// Waits up to [`DAEMON_TIMEOUT`] until the socket exists (the daemon creates it when it
    /// listens).
    pub fn wait_socket(&self) {
        let deadline = Instant::now() + DAEMON_TIMEOUT;
        while !self.env.sock.exists() {
            assert!(
                Instant::now() < deadline,
                "daemon did not create its socket"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// A new frontend connection (retrying while the daemon starts, up to
    /// [`DAEMON_TIMEOUT`]).
    pub fn connect(&self) -> Connection {
        Connection::connect(&self.env.sock, DAEMON_TIMEOUT).expect("connect")
    }

    /// The disk image path.
    pub fn image(&self) -> &Path {
        &self.env.image
    }

    /// Whether the process is still running (reaps it if it is not).
    pub fn is_alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Panics unless the process is still running.
    pub fn assert_alive(&mut self) {
        assert!(self.is_alive(), "daemon exited unexpectedly");
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A device served in this process by the stock `VhostUserDaemon` on a thread: one frontend
/// connection, until it disconnects. The fixture keeps a clone of the daemon's guest memory
/// ([`mem`](Self::mem)), so a test can write guest memory exactly as the device's dataplane
/// would.
///
/// Dropping the fixture does not wait for the thread (it may still be waiting for a frontend);
/// [`join`](Self::join) does.
#[derive(Debug)]
pub struct InProcessDaemon<B: Bitmap + 'static> {
    /// The daemon's view of guest memory (shared with its handler).
    pub mem: GuestMemoryAtomic<GuestMemoryMmap<B>>,
    sock: PathBuf,
    /// The scratch directory, when the fixture made its own ([`start`](Self::start)).
    _dir: Option<DaemonDir>,
    thread: Option<JoinHandle<Result<(), String>>>,
}

impl<B> InProcessDaemon<B>
where
    B: Bitmap + BitmapReplace + NewBitmap + Clone + Send + Sync + 'static,
{
    /// Serves `backend` with fresh (empty) guest memory on a socket in a new scratch
    /// directory.
    pub fn start<T>(backend: T) -> Self
    where
        T: VhostUserBackend<Bitmap = B> + Clone + 'static,
        T::Vring: Clone + Send + Sync,
    {
        let dir = DaemonDir::new("vhost-test");
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut d = Self::serve(backend, mem, &dir.sock);
        d._dir = Some(dir);
        d
    }

    /// Serves `backend` with guest memory `mem` (the one the device was built with, if it
    /// keeps one) on `sock`, which must not exist yet.
    pub fn serve<T>(backend: T, mem: GuestMemoryAtomic<GuestMemoryMmap<B>>, sock: &Path) -> Self
    where
        T: VhostUserBackend<Bitmap = B> + Clone + 'static,
        T::Vring: Clone + Send + Sync,
    {
        Self::serve_with(backend, mem, sock, |_| {})
    }

    /// [`serve`](Self::serve), calling `setup` with the daemon before it starts listening
    /// (e.g. to register a device's own event fds with the daemon's epoll handlers).
    pub fn serve_with<T>(
        backend: T,
        mem: GuestMemoryAtomic<GuestMemoryMmap<B>>,
        sock: &Path,
        setup: impl FnOnce(&VhostUserDaemon<T>),
    ) -> Self
    where
        T: VhostUserBackend<Bitmap = B> + Clone + 'static,
        T::Vring: Clone + Send + Sync,
    {
        let mut listener = Listener::new(sock, true).expect("listen on the socket");
        let mut daemon = VhostUserDaemon::new("vhost-test".into(), backend, mem.clone())
            .expect("create the daemon");
        setup(&daemon);
        let thread = std::thread::Builder::new()
            .name("vhost-test-daemon".into())
            .spawn(move || {
                daemon.start(&mut listener).map_err(|e| e.to_string())?;
                daemon.wait().map_err(|e| e.to_string())
            })
            .expect("spawn the daemon thread");
        InProcessDaemon {
            mem,
            sock: sock.to_owned(),
            _dir: None,
            thread: Some(thread),
        }
    }

    /// The socket the daemon listens on.
    pub fn socket(&self) -> &Path {
        &self.sock
    }

    /// Connects the frontend (retrying up to [`DAEMON_TIMEOUT`] while the daemon starts).
    pub fn connect(&self) -> Connection {
        Connection::connect(&self.sock, DAEMON_TIMEOUT).expect("connect")
    }

    /// Waits for the daemon thread to end (after the frontend disconnected) and returns how
    /// the session ended: `Err` with the message if accepting or handling failed. Panics if
    /// the thread panicked.
    pub fn join(mut self) -> Result<(), String> {
        match self.thread.take() {
            Some(t) => t.join().expect("daemon thread panicked"),
            None => Ok(()),
        }
    }
}
