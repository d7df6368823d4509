//! The adapter that gives any `vhost-user-backend` device dirty logging.
//!
//! [`DirtyLogBackend`] wraps a [`VhostUserBackend`] whose guest memory uses
//! [`GuestDirtyBitmap`] and makes the stock `vhost-user-backend` daemon migration-capable. The
//! wrapped device writes guest memory exactly as before (through vm-memory and virtio-queue, or
//! directly with an explicit [`DirtyLog::mark`]); everything below is the adapter's job.
//!
//! ## How each protocol event is handled, and why nothing is lost
//!
//! | frontend message | what the stock handler does | what the adapter adds |
//! |---|---|---|
//! | `GET_FEATURES` / `GET_PROTOCOL_FEATURES` | asks the backend | `VHOST_F_LOG_ALL` and `VHOST_USER_PROTOCOL_F_LOG_SHMFD` are added, so QEMU allows migration |
//! | `SET_FEATURES` | stores them, calls `acked_features` | LOG_ALL set → [`DirtyLog::set_logging`]`(true)`, which issues a process-wide barrier before the reply (see below); LOG_ALL clear → logging off. The device never sees the LOG_ALL bit. The stock crate ignores LOG_ALL entirely. |
//! | `SET_LOG_BASE` | maps the fd, calls `MemRegionBitmap::new` per region, then `replace` | the log is validated (length recovered and every page proven backed, coverage of each region checked) and swapped in as the handle's current log; a *second* `SET_LOG_BASE` swaps again and returns only after every mark still writing into the old log has finished (grace period), so the frontend can drain the old log as soon as it has the reply |
//! | `SET_MEM_TABLE` / `ADD_MEM_REGION` | maps the regions with bitmaps from `NewBitmap::with_len` (unbound, and in the stock crate *unlogged*), publishes the memory, then calls `update_memory` | every region of the new memory is bound to the log at its guest-physical address in `update_memory`; a write that lands in a region between publication and binding raises the region's flag, and binding marks the whole region (SeqCst handshake, see [`crate::log`]'s bitmap docs) |
//! | `REM_MEM_REGION` | drops the region | nothing: marks already made stay in the log |
//! | a region whose fd is shorter than the region | maps it anyway (vm-memory does not check), the first access raises `SIGBUS` | `update_memory` `fstat`s every file-backed region, puts the previous memory table back and fails the message |
//! | `SET_VRING_ADDR` on a running ring (QEMU re-sends it to flip `VHOST_VRING_F_LOG`) | sets the addresses, reads `used->idx` from guest memory and sets the ring's next used index to it, in three lock steps: a completion published in between is wound back | the adapter's vring type [`AdapterVring`] applies that index only while the ring is not started, so a running ring keeps its own next used index (see [`vring`](AdapterVring)'s docs) |
//! | `SET_VRING_ENABLE` before `SET_FEATURES` (QEMU's virtio-net, at device reset) | ends the connection (`InactiveFeature`) | nothing in the adapter: a daemon that serves QEMU's virtio-net puts the [`relay`] in front of the handler, which answers the message and replays it after `SET_FEATURES` |
//! | `GET_VRING_BASE` | stops the ring, calls `stop_vring` | delegated; the device completes (and, through the bitmap, marks) in-flight requests before returning, so the reply follows the last mark |
//!
//! **LOG_ALL racing a write.** The mark path reads the logging flag with a relaxed load (the
//! cheapest possible idle path, DESIGN invariant 5). A dataplane thread could store data, then
//! read "off" just before the flag flips, while its data store is still in its store buffer: the
//! VMM, which starts copying after the reply, could copy the old page contents and never learn
//! of the write. `set_logging(true)` therefore runs `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)`
//! before the handler replies: every thread of the process passes a full barrier, so such a
//! store is globally visible before the frontend can start copying.

use std::fs::File;
use std::io::Result;
use std::sync::{Arc, Mutex};

use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserProtocolFeatures,
    VhostUserShMemConfig, VhostUserSharedMsg, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Backend, GpuBackend};
use vhost_user_backend::VhostUserBackend;
use vm_memory::{
    Address, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap,
    GuestMemoryRegion,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use crate::log::{DirtyLog, GuestDirtyBitmap};

pub mod relay;
mod vring;
use vring::inner_vrings;
pub use vring::AdapterVring;

/// Checks that every file-backed region has file behind all of its pages.
///
/// vm-memory maps a region's fd without comparing the file's length with the region's, so a
/// frontend that sends a memfd shorter than `memory_size` would make the first access to the
/// missing part (a vring read in the stock handler, a device write) raise `SIGBUS` and kill
/// the backend. Regular files and memfds report their length in `fstat`; other kinds (devices,
/// hugetlbfs pipes) are left to the kernel.
fn check_backed(mem: &GuestMemoryMmap<GuestDirtyBitmap>) -> Result<()> {
    for region in mem.iter() {
        let Some(fo) = region.file_offset() else {
            continue;
        };
        let meta = fo.file().metadata()?;
        if !meta.file_type().is_file() {
            continue;
        }
        let need = fo.start().checked_add(region.len()).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "region offset + size overflows",
            )
        })?;
        if meta.len() < need {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "memory region at GPA {:#x} needs {need:#x} bytes of its fd (offset {:#x} + size {:#x}) but the file has {:#x}",
                    region.start_addr().raw_value(),
                    fo.start(),
                    region.len(),
                    meta.len()
                ),
            ));
        }
    }
    Ok(())
}

/// `VHOST_F_LOG_ALL` (virtio feature bit 26): the frontend wants every guest write logged.
const LOG_ALL: u64 = VhostUserVirtioFeatures::LOG_ALL.bits();

/// Guest memory as the adapter's devices see it.
pub type DirtyGuestMemory = GuestMemoryAtomic<GuestMemoryMmap<GuestDirtyBitmap>>;

/// Wraps a vhost-user backend and gives it migration support (dirty logging).
///
/// ```no_run
/// # use vhost_dirtylog::backend::DirtyLogBackend;
/// # fn demo<T>(device: T) where T: vhost_user_backend::VhostUserBackend<Bitmap = vhost_dirtylog::log::GuestDirtyBitmap> + Clone + 'static,
/// #   T::Vring: Clone + Send + Sync {
/// use vhost_user_backend::VhostUserDaemon;
/// use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
///
/// let backend = DirtyLogBackend::new(device);
/// let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
/// let mut daemon = VhostUserDaemon::new("blk".into(), backend, mem).unwrap();
/// daemon.serve("/tmp/blk.sock").unwrap();
/// # }
/// ```
#[derive(Clone)]
pub struct DirtyLogBackend<T> {
    inner: T,
    log: DirtyLog,
    /// The last memory table that passed [`check_backed`], put back if a new one fails.
    last_good: Arc<Mutex<Option<GuestMemoryMmap<GuestDirtyBitmap>>>>,
}

impl<T: std::fmt::Debug> std::fmt::Debug for DirtyLogBackend<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyLogBackend")
            .field("inner", &self.inner)
            .field("log", &self.log)
            .finish_non_exhaustive()
    }
}

impl<T> DirtyLogBackend<T> {
    /// Wraps `inner` with a fresh log handle.
    pub fn new(inner: T) -> Self {
        Self::with_log(inner, DirtyLog::new())
    }

    /// Wraps `inner`, marking through `log` (share it with the device for explicit marks of
    /// writes that bypass vm-memory).
    pub fn with_log(inner: T, log: DirtyLog) -> Self {
        DirtyLogBackend {
            inner,
            log,
            last_good: Arc::default(),
        }
    }

    /// The log handle the adapter attaches and switches.
    pub fn log(&self) -> &DirtyLog {
        &self.log
    }

    /// The wrapped backend.
    pub fn inner(&self) -> &T {
        &self.inner
    }
}

impl<T> VhostUserBackend for DirtyLogBackend<T>
where
    T: VhostUserBackend<Bitmap = GuestDirtyBitmap>,
{
    type Bitmap = GuestDirtyBitmap;
    type Vring = AdapterVring<T::Vring>;

    fn num_queues(&self) -> usize {
        self.inner.num_queues()
    }

    fn max_queue_size(&self) -> usize {
        self.inner.max_queue_size()
    }

    fn features(&self) -> u64 {
        self.inner.features() | LOG_ALL
    }

    fn acked_features(&self, features: u64) {
        self.log.set_logging(features & LOG_ALL != 0);
        let own = self.inner.features() & LOG_ALL;
        self.inner.acked_features(features & !(LOG_ALL & !own));
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.inner.protocol_features() | VhostUserProtocolFeatures::LOG_SHMFD
    }

    fn reset_device(&self) {
        self.log.set_logging(false);
        self.inner.reset_device()
    }

    fn set_event_idx(&self, enabled: bool) {
        self.inner.set_event_idx(enabled)
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.inner.get_config(offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> Result<()> {
        self.inner.set_config(offset, buf)
    }

    fn update_memory(&self, mem: DirtyGuestMemory) -> Result<()> {
        let current = mem.memory();
        if let Err(e) = check_backed(&current) {
            // The stock handler has already published this table: put the last good one back
            // before anyone touches the unbacked pages, and fail the message.
            log::error!("refusing memory table: {e}");
            let prev = self
                .last_good
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            mem.lock()
                .unwrap_or_else(|p| p.into_inner())
                .replace(prev.unwrap_or_default());
            return Err(e);
        }
        GuestDirtyBitmap::bind_memory(&current, &self.log);
        // The log is put to use only as far as guest memory reaches (DESIGN.md, "Oversized
        // and undersized logs"): memory that grew needs more of it. If the log is too small,
        // writes there are carried into the next log the frontend sends.
        let gpa_end = current
            .iter()
            .map(|r| r.start_addr().raw_value().saturating_add(r.len()))
            .max()
            .unwrap_or(0);
        match self.log.cover(gpa_end) {
            Ok(true) => {}
            Ok(false) => {
                if let Some(r) = self.log.region() {
                    log::warn!(
                        "guest memory reaches GPA {gpa_end:#x}, past the end of the log \
                         (GPA < {:#x}); writes there are carried into the next log",
                        r.covered_gpa_end()
                    );
                }
            }
            Err(e) => log::error!(
                "guest memory reaches GPA {gpa_end:#x} but the log cannot grow to cover it \
                 ({e}); writes there are carried into the next log"
            ),
        }
        *self.last_good.lock().unwrap_or_else(|p| p.into_inner()) = Some((*current).clone());
        self.inner.update_memory(mem)
    }

    fn set_backend_req_fd(&self, backend: Backend) {
        self.inner.set_backend_req_fd(backend)
    }

    fn get_shared_object(&self, uuid: VhostUserSharedMsg) -> Result<File> {
        self.inner.get_shared_object(uuid)
    }

    fn set_gpu_socket(&self, gpu_backend: GpuBackend) -> Result<()> {
        self.inner.set_gpu_socket(gpu_backend)
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        self.inner.queues_per_thread()
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        self.inner.exit_event(thread_index)
    }

    fn stop_vring(&self, queue_index: u32) -> Result<()> {
        self.inner.stop_vring(queue_index)
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Self::Vring],
        thread_id: usize,
    ) -> Result<()> {
        self.inner
            .handle_event(device_event, evset, inner_vrings(vrings), thread_id)
    }

    fn set_device_state_fd(
        &self,
        direction: VhostTransferStateDirection,
        phase: VhostTransferStatePhase,
        file: File,
    ) -> Result<Option<File>> {
        self.inner.set_device_state_fd(direction, phase, file)
    }

    fn check_device_state(&self) -> Result<()> {
        self.inner.check_device_state()
    }

    fn get_shmem_config(&self) -> Result<VhostUserShMemConfig> {
        self.inner.get_shmem_config()
    }
}
