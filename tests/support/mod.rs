//! Shared by tests and benches: a do-nothing vhost-user device served by the stock
//! `VhostUserDaemon` on a real unix socket, and a minimal `vhost` frontend that hands it
//! memfd guest memory and a memfd log. The test keeps a clone of the daemon's
//! `GuestMemoryAtomic`, so it can write guest memory exactly as a device's dataplane would.
#![allow(dead_code)]

use std::fs::File;
use std::marker::PhantomData;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::PathBuf;
use std::thread::JoinHandle;

use vhost::vhost_user::message::{
    VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, Listener, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserDirtyLogRegion, VhostUserMemoryRegionInfo};
use vhost_user_backend::bitmap::BitmapReplace;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock};
use vm_memory::mmap::NewBitmap;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

/// A new memfd of `len` bytes.
pub fn memfd(name: &str, len: u64) -> File {
    let cname = std::ffi::CString::new(name).unwrap();
    // SAFETY: memfd_create reads a valid NUL-terminated string and returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(len).unwrap();
    f
}

/// A device with one queue that never processes anything: the dataplane is the test itself.
pub struct NullDevice<B> {
    protocol: VhostUserProtocolFeatures,
    _b: PhantomData<fn() -> B>,
}

impl<B> Clone for NullDevice<B> {
    fn clone(&self) -> Self {
        NullDevice {
            protocol: self.protocol,
            _b: PhantomData,
        }
    }
}

impl<B> NullDevice<B> {
    pub fn new(protocol: VhostUserProtocolFeatures) -> Self {
        NullDevice {
            protocol,
            _b: PhantomData,
        }
    }
}

pub type Mem<B> = GuestMemoryAtomic<GuestMemoryMmap<B>>;

impl<B> VhostUserBackend for NullDevice<B>
where
    B: vm_memory::bitmap::Bitmap + Send + Sync + 'static,
{
    type Bitmap = B;
    type Vring = VringRwLock<Mem<B>>;

    fn num_queues(&self) -> usize {
        1
    }
    fn max_queue_size(&self) -> usize {
        256
    }
    fn features(&self) -> u64 {
        (1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }
    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.protocol
    }
    fn set_event_idx(&self, _enabled: bool) {}
    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // Without one, the handler cannot stop its worker threads when the daemon is dropped.
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()
    }
    fn update_memory(&self, _mem: Mem<B>) -> std::io::Result<()> {
        Ok(())
    }
    fn handle_event(
        &self,
        _device_event: u16,
        _evset: EventSet,
        _vrings: &[Self::Vring],
        _thread_id: usize,
    ) -> std::io::Result<()> {
        Ok(())
    }
}

/// A running daemon and the frontend connected to it.
pub struct Session<B: vm_memory::bitmap::Bitmap + 'static> {
    pub frontend: Frontend,
    /// The daemon's view of guest memory (shared with its handler).
    pub mem: Mem<B>,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub daemon: Option<JoinHandle<Result<(), String>>>,
    /// Guest RAM regions we handed over: (gpa, size, memfd).
    pub ram: Vec<(u64, u64, File)>,
}

/// Serves `backend` on a fresh socket in a thread and connects a frontend to it.
pub fn start<T>(backend: T) -> Session<T::Bitmap>
where
    T: VhostUserBackend + Clone + 'static,
    T::Bitmap: BitmapReplace + NewBitmap + Clone + Send + Sync,
    T::Vring: Clone + Send + Sync,
{
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vhost.sock");
    let mem: Mem<T::Bitmap> = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let mut listener = Listener::new(&socket, true).unwrap();
    let mut daemon = VhostUserDaemon::new("test".into(), backend, mem.clone()).unwrap();
    let handle = std::thread::spawn(move || {
        daemon.start(&mut listener).map_err(|e| e.to_string())?;
        daemon.wait().map_err(|e| e.to_string())
    });
    let frontend = Frontend::connect(&socket, 1).unwrap();
    Session {
        frontend,
        mem,
        dir,
        socket,
        daemon: Some(handle),
        ram: Vec::new(),
    }
}

impl<B: vm_memory::bitmap::Bitmap + 'static> Session<B> {
    /// SET_OWNER and feature negotiation (LOG_SHMFD + REPLY_ACK where offered), LOG_ALL off.
    pub fn negotiate(&mut self) {
        let f = &mut self.frontend;
        f.set_owner().unwrap();
        let feats = f.get_features().unwrap();
        assert!(feats & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0);
        f.set_features(feats & !(1 << 26)).unwrap();
        let pf = f.get_protocol_features().unwrap();
        assert!(
            pf.contains(VhostUserProtocolFeatures::LOG_SHMFD),
            "backend must offer LOG_SHMFD"
        );
        f.set_protocol_features(
            pf & (VhostUserProtocolFeatures::LOG_SHMFD
                | VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS),
        )
        .unwrap();
    }

    /// Runs `f` with NEED_REPLY set, so messages without a reply of their own are acknowledged:
    /// when `f` returns, the backend has handled them. (Never for GET_* messages: those have
    /// a reply already, and asking for an ack on top would desynchronise the stream.)
    fn acked<R>(&mut self, f: impl FnOnce(&mut Frontend) -> R) -> R {
        self.frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        let r = f(&mut self.frontend);
        self.frontend.set_hdr_flags(VhostUserHeaderFlag::empty());
        r
    }

    /// Features the backend offers.
    pub fn features(&self) -> u64 {
        self.frontend.get_features().unwrap()
    }

    /// SET_FEATURES with or without LOG_ALL.
    pub fn set_log_all(&mut self, on: bool) -> Result<(), vhost::Error> {
        let feats = self.frontend.get_features()?;
        let base = feats & !(1 << 26);
        self.acked(|f| f.set_features(if on { base | (1 << 26) } else { base }))
    }

    fn region_info(gpa: u64, size: u64, file: &File) -> VhostUserMemoryRegionInfo {
        VhostUserMemoryRegionInfo {
            guest_phys_addr: gpa,
            memory_size: size,
            // Any unique address works: the backend only uses it to translate vring addresses.
            userspace_addr: 0x7000_0000_0000 + gpa,
            mmap_offset: 0,
            mmap_handle: file.as_raw_fd(),
        }
    }

    /// SET_MEM_TABLE with memfd regions at the given (gpa, size) pairs.
    pub fn set_mem_table(&mut self, layout: &[(u64, u64)]) -> Result<(), vhost::Error> {
        let files: Vec<(u64, u64, File)> = layout
            .iter()
            .map(|&(g, s)| (g, s, memfd("ram", s)))
            .collect();
        let infos: Vec<_> = files
            .iter()
            .map(|(g, s, f)| Self::region_info(*g, *s, f))
            .collect();
        self.acked(|f| f.set_mem_table(&infos))?;
        self.ram = files;
        Ok(())
    }

    /// ADD_MEM_REGION (needs the CONFIGURE_MEM_SLOTS protocol feature on the backend).
    pub fn add_region(&mut self, gpa: u64, size: u64) -> Result<(), vhost::Error> {
        let f = memfd("ram-add", size);
        let info = Self::region_info(gpa, size, &f);
        self.acked(|fe| fe.add_mem_region(&info))?;
        self.ram.push((gpa, size, f));
        Ok(())
    }

    /// SET_LOG_BASE with `size` bytes at `offset` of `file`.
    pub fn set_log_base(
        &mut self,
        file: &File,
        offset: u64,
        size: u64,
    ) -> Result<(), vhost::Error> {
        self.frontend.set_log_base(
            0,
            Some(VhostUserDirtyLogRegion {
                mmap_size: size,
                mmap_offset: offset,
                mmap_handle: file.as_raw_fd(),
            }),
        )
    }

    /// Closes the connection and waits for the daemon thread to end; returns its result.
    pub fn finish(mut self) -> Result<(), String> {
        drop(std::mem::replace(
            &mut self.frontend,
            Frontend::from_stream(std::os::unix::net::UnixStream::pair().unwrap().0, 1),
        ));
        self.daemon.take().unwrap().join().unwrap()
    }
}
