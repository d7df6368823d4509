//! The vhost-user-net device: a virtio-net dataplane whose guest writes are all dirty-logged.
//!
//! Built like [`crate::blk`]: `virtio-queue` for the rings, `vm-memory` for guest memory,
//! `vhost-user-backend` for the protocol, and served through
//! [`DirtyLogBackend`] so the frontend can live-migrate the
//! guest. Its pieces:
//!
//! - [`NetDevice`]: the [`VhostUserBackend`] (features,
//!   config space, one worker thread per queue pair, quiescing); its `VhostUserBackend` impl is
//!   in `net/backend.rs`, the RX and TX paths ([`NetDevice`]'s `rx_burst` / `tx_burst`) here.
//! - [`port`]: packet ports ([`Port`], [`SocketPort`]).
//! - [`PairStats`]: per-queue-pair counters.
//! - [`daemon`]: the accept loop the `vhost-dirtylog-net` program runs.
//!
//! ## Queues
//! Queue `2 * p` is the RX queue of queue pair `p`, `2 * p + 1` its TX queue (virtio 1.2,
//! 5.1.2). One worker thread per pair (`queues_per_thread`); the pair's port fd is registered in
//! that thread's epoll set (edge-triggered) as device event `num_queues + 1`, and a resume
//! eventfd as `num_queues + 2`: a worker that stops after [`RX_BURSTS_PER_EVENT`] RX bursts or
//! [`TX_BURST`] TX chains with work left writes it and returns to epoll, so a flood in one
//! direction does not starve the other direction or the exit event. There is no
//! control queue: with QEMU's `-netdev vhost-user` the control queue is QEMU's own (its
//! virtio-net model answers `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET` and enables or disables our rings
//! with `SET_VRING_ENABLE`; `VIRTIO_NET_F_CTRL_VQ` is not among the features QEMU's
//! `vhost_net.c` `user_feature_bits` takes from the backend, `VIRTIO_NET_F_MQ` is). The virtio
//! spec makes `MQ` depend on `CTRL_VQ` (5.1.3.1) and Linux refuses `MQ` without it, so `MQ` is
//! offered only with more than one queue pair, for a frontend that supplies the control queue.
//!
//! ## Why every guest write is logged
//! Guest memory is `GuestMemoryMmap<GuestDirtyBitmap>`: the virtio-net header and frame bytes
//! (written with `write_slice`), the RX used elements (`write_obj`) and used index (`store`),
//! and virtio-queue's TX used-ring and notification updates all go through vm-memory and mark
//! their pages. The device has no explicit marks.
//!
//! ## RX: one used-index publication per burst
//! With `MRG_RXBUF` a frame may span several buffers; Linux's `receive_mergeable` reads
//! `num_buffers` from the first and then expects all of them in the used ring (a buffer
//! missing is a dropped frame). virtio-queue's `add_used` publishes the used index on every
//! call, so `rx_burst` writes the used elements of all the burst's frames itself and publishes
//! the index once, with one Release store, after every guest write of the burst (headers,
//! payloads, used elements). Interrupts are then decided by the EVENT_IDX rule
//! (`vring_need_event(used_event, new, old)`, virtio 1.2, 2.7.10) over the whole burst.
//!
//! ## Quiescing (`GET_VRING_BASE`, `SET_VRING_ENABLE(0)`)
//! Each pair's worker holds the pair's mutex and the ring's lock for a whole burst, and checks
//! `ready` / `enabled` under them before touching the ring. vhost-user-backend clears `ready`
//! (or `enabled`) under the ring lock, so it waits for a running burst; `stop_vring` also takes
//! the pair's mutex. Once either message is answered no burst of that ring is running and none
//! can start: no guest write (and so no mark) follows the reply. Frames waiting for RX buffers
//! stay in the pair's bounce buffer (one frame) and in the port's socket queue.

mod backend;
pub mod daemon;
pub mod port;
mod stats;
pub mod tap;

use std::io::{Error as IoError, ErrorKind, IoSlice, Result as IoResult};
use std::num::Wrapping;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringState, VringT};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestAddressSpace, GuestMemory};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::backend::{DirtyGuestMemory, DirtyLogBackend};
use crate::log::{DirtyLog, GuestDirtyBitmap, LogBatch};
use crate::virtio_net::{NetHdr, ETH_HLEN, MAX_FRAME_LEN, NET_HDR_SIZE};

pub use port::{Port, Sent, SocketPort};
pub use stats::{PairStats, RateLimit};
pub use tap::TapPort;

/// Guest memory as the device accesses it.
pub(crate) type Mem = vm_memory::GuestMemoryMmap<GuestDirtyBitmap>;

/// Most queue pairs (vhost-user-backend gives each worker thread a 64-bit queue mask; two
/// queues per pair).
pub const MAX_QUEUE_PAIRS: u16 = 32;
/// Largest queue size the device accepts (QEMU's and Linux's limit for virtio-net rings).
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// Most frames one RX burst puts in the guest before it publishes the used index.
pub const RX_BURST: usize = 64;
/// RX bursts one port or kick event runs before the worker yields to its other events (TX
/// kicks, exit); it comes back through the pair's resume eventfd.
pub const RX_BURSTS_PER_EVENT: usize = 4;
/// TX chains one kick event sends before the worker yields (and resumes as for RX).
pub const TX_BURST: usize = 256;
/// Most descriptors of one RX chain the device uses (longer chains are bad chains).
const MAX_RX_SEGS: usize = 1024;
/// MAC address used when none is given (QEMU's default prefix, locally administered).
pub const DEFAULT_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

/// Device settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// Queue pairs (1..=32): one RX and one TX queue each, one worker thread each.
    pub queue_pairs: u16,
    /// Maximum queue size (a power of two, 2..=1024).
    pub queue_size: u16,
    /// The MAC address in the config space (`VIRTIO_NET_F_MAC`).
    pub mac: [u8; 6],
    /// MTU in bytes to advertise (`VIRTIO_NET_F_MTU`); `None`: not offered.
    pub mtu: Option<u16>,
    /// Mark RX writes through a per-pair [`LogBatch`] (one `fetch_or` per distinct log word
    /// per burst, flushed before the used index is published) instead of one `fetch_or` per
    /// write. On by default; off only to compare the two (benchmarks).
    pub batch_marks: bool,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            queue_pairs: 1,
            queue_size: 256,
            mac: DEFAULT_MAC,
            mtu: None,
            batch_marks: true,
        }
    }
}

/// Invalid device settings.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Queue pair count out of range.
    #[error("number of queue pairs must be between 1 and {MAX_QUEUE_PAIRS}, got {0}")]
    QueuePairs(u16),
    /// Queue size not a power of two in range.
    #[error("queue size must be a power of two between 2 and {MAX_QUEUE_SIZE}, got {0}")]
    QueueSize(u16),
    /// MTU out of range.
    #[error("MTU must be between 68 and 65535 - 14 bytes, got {0}")]
    Mtu(u16),
    /// The device's eventfds could not be created.
    #[error("cannot create the device's eventfds: {0}")]
    Resources(String),
    /// One port per queue pair is needed.
    #[error("{ports} port(s) given for {pairs} queue pair(s); one per pair is needed")]
    Ports {
        /// Ports given.
        ports: usize,
        /// Queue pairs.
        pairs: u16,
    },
}

impl NetConfig {
    /// Checks the settings.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.queue_pairs == 0 || self.queue_pairs > MAX_QUEUE_PAIRS {
            return Err(ConfigError::QueuePairs(self.queue_pairs));
        }
        if self.queue_size < 2
            || self.queue_size > MAX_QUEUE_SIZE
            || !self.queue_size.is_power_of_two()
        {
            return Err(ConfigError::QueueSize(self.queue_size));
        }
        if let Some(m) = self.mtu {
            if !(68..=(65535 - ETH_HLEN as u16)).contains(&m) {
                return Err(ConfigError::Mtu(m));
            }
        }
        Ok(())
    }
}

/// The per-queue-pair state a worker owns while it runs a burst (behind the pair's mutex,
/// which `stop_vring` takes to quiesce).
#[derive(Debug, Default)]
struct Pair {
    /// RX bounce buffer: `NET_HDR_SIZE` bytes of room for the header, then the frame.
    rx_buf: Vec<u8>,
    /// Length of a frame kept in `rx_buf` because the guest had too few RX buffers.
    pending: Option<usize>,
    /// TX bounce buffer (header + frame).
    tx_buf: Vec<u8>,
    /// Used elements of the current RX burst: (head, bytes written).
    used: Vec<(u16, u32)>,
    /// Heads of unusable RX chains popped this burst (completed with length 0).
    bad: Vec<u16>,
    /// Writable segments of the chains gathered for the current frame: (GPA, length).
    segs: Vec<(u64, u32)>,
    /// The chains gathered for the current frame.
    chains: Vec<RxChain>,
    stats: PairStats,
    rx_rl: RateLimit,
    tx_rl: RateLimit,
    /// The RX path's batch of log marks (created at the first burst; see
    /// [`NetConfig::batch_marks`]).
    batch: Option<LogBatch>,
    /// RX used elements were published and the driver asked to be notified, but the ring had
    /// no call eventfd yet (QEMU sends `SET_VRING_KICK` before `SET_VRING_CALL`, and frames
    /// may already wait in the port when the ring starts): the interrupt is owed and raised
    /// at the next RX event once the call fd is there. Without this the driver, whose
    /// `used_event` stays behind, would never be told (EVENT_IDX suppresses later ones).
    rx_owed: bool,
    /// The port had no room for a TX frame: its chain was given back to the avail ring
    /// (`go_to_previous_position`) and TX waits for the port to become writable (`EPOLLOUT`).
    tx_blocked: bool,
}

#[derive(Debug, Clone, Copy)]
struct RxChain {
    head: u16,
    segs: (usize, usize),
}

/// Why an RX burst ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RxStop {
    /// The port has nothing more to read.
    PortEmpty,
    /// A frame waits for RX buffers.
    NoBuffers,
    /// [`RX_BURST`] frames were delivered; there may be more.
    BurstFull,
    /// The ring is unusable (used ring outside memory).
    Broken,
}

struct Inner {
    config: NetConfig,
    ports: Vec<Arc<dyn Port>>,
    log: DirtyLog,
    mem: RwLock<DirtyGuestMemory>,
    acked_features: AtomicU64,
    event_idx: AtomicBool,
    pairs: Vec<Mutex<Pair>>,
    /// The worker exit-event fds vhost-user-backend leaks (closed by `reclaim_exit_fds`).
    exit_fds: Mutex<Vec<RawFd>>,
    /// Per pair: written when a worker yields with work left (a flood on one side must not
    /// starve the other side or the exit event); its event runs both paths again.
    resume: Vec<EventFd>,
    /// Test hook (negative control): publish RX used elements one at a time.
    #[cfg(feature = "test-utils")]
    publish_early: AtomicBool,
}

/// The vhost-user-net device (see the module docs). Cheap to clone (shared state).
#[derive(Clone)]
pub struct NetDevice {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for NetDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetDevice")
            .field("config", &self.inner.config)
            .field("ports", &self.inner.ports)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl NetDevice {
    /// A device for `config` with one port per queue pair, marking through `log` (the handle
    /// the adapter switches), on guest memory `mem`.
    pub fn new(
        config: NetConfig,
        ports: Vec<Arc<dyn Port>>,
        log: DirtyLog,
        mem: DirtyGuestMemory,
    ) -> Result<Self, ConfigError> {
        config.validate()?;
        if ports.len() != usize::from(config.queue_pairs) {
            return Err(ConfigError::Ports {
                ports: ports.len(),
                pairs: config.queue_pairs,
            });
        }
        let pairs = (0..config.queue_pairs)
            .map(|_| {
                // The port is edge-triggered: every RX kick and resume event reads it again,
                // so frames that arrived while the ring was stopped are not stranded.
                Mutex::new(Pair::default())
            })
            .collect();
        let resume = (0..config.queue_pairs)
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<IoResult<Vec<_>>>()
            .map_err(|e| ConfigError::Resources(e.to_string()))?;
        Ok(NetDevice {
            inner: Arc::new(Inner {
                resume,
                config,
                ports,
                log,
                mem: RwLock::new(mem),
                acked_features: AtomicU64::new(0),
                event_idx: AtomicBool::new(false),
                pairs,
                exit_fds: Mutex::new(Vec::new()),
                #[cfg(feature = "test-utils")]
                publish_early: AtomicBool::new(false),
            }),
        })
    }

    /// Wraps a new device in the dirty-logging adapter, sharing one log handle.
    pub fn into_backend(
        config: NetConfig,
        ports: Vec<Arc<dyn Port>>,
        mem: DirtyGuestMemory,
    ) -> Result<DirtyLogBackend<NetDevice>, ConfigError> {
        let log = DirtyLog::new();
        let dev = NetDevice::new(config, ports, log.clone(), mem)?;
        Ok(DirtyLogBackend::with_log(dev, log))
    }

    /// The settings.
    pub fn config(&self) -> &NetConfig {
        &self.inner.config
    }

    /// Counters of queue pair `pair`.
    pub fn pair_stats(&self, pair: usize) -> Option<PairStats> {
        self.inner.pairs.get(pair).map(|p| lock(p).stats)
    }

    /// The log handle the device marks through.
    pub fn dirty_log(&self) -> &DirtyLog {
        &self.inner.log
    }

    /// Registers each pair's port fd in its worker's epoll set (edge-triggered, device event
    /// `num_queues + 1`). Call once, after `VhostUserDaemon::new` and before `start`: without
    /// it no frame is received (TX still works).
    pub fn attach<B>(&self, daemon: &VhostUserDaemon<B>) -> IoResult<()>
    where
        B: VhostUserBackend + Clone + 'static,
        B::Bitmap: vhost_user_backend::bitmap::BitmapReplace
            + vm_memory::bitmap::NewBitmap
            + Clone
            + Send
            + Sync,
        B::Vring: Clone + Send + Sync,
    {
        let handlers = daemon.get_epoll_handlers();
        let id = self.port_event();
        for (i, port) in self.inner.ports.iter().enumerate() {
            let h = handlers.get(i).ok_or_else(|| {
                IoError::new(
                    ErrorKind::InvalidInput,
                    format!("no worker thread for queue pair {i}"),
                )
            })?;
            h.register_listener(
                port.fd(),
                EventSet::IN | EventSet::OUT | EventSet::EDGE_TRIGGERED,
                id,
            )?;
            h.register_listener(self.inner.resume[i].as_raw_fd(), EventSet::IN, id + 1)?;
        }
        Ok(())
    }

    /// Closes the worker exit-event fds vhost-user-backend leaked. Call only after the
    /// `VhostUserDaemon` serving this device has been dropped (its workers joined).
    pub fn reclaim_exit_fds(&self) {
        let fds = std::mem::take(&mut *lock(&self.inner.exit_fds));
        for fd in fds {
            // Only close what is still the eventfd we created (defensive: never another fd).
            let link = std::fs::read_link(format!("/proc/self/fd/{fd}"));
            if link.is_ok_and(|l| l.as_os_str() == "anon_inode:[eventfd]") {
                // SAFETY: vhost-user-backend took this fd with `into_raw_fd()`, registered it in
                // a worker's epoll set and never closes it; the daemon (and so the worker and
                // its epoll set) is gone, so this is the only owner and the only close.
                drop(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
            }
        }
    }

    /// Test hook (negative control): while `on`, RX bursts publish the used index after each
    /// used element (as virtio-queue's `add_used` does), pausing 5 ms in between, so a frame
    /// spread over several buffers is visible to the driver before all its buffers are.
    #[cfg(feature = "test-utils")]
    pub fn publish_each_buffer_for_tests(&self, on: bool) {
        self.inner.publish_early.store(on, Ordering::SeqCst);
    }

    /// Device event of the pair's resume eventfd (`num_queues + 2`).
    fn resume_event(&self) -> u64 {
        self.port_event() + 1
    }

    /// Consumes the pair's resume event.
    fn take_resume(&self, pair: usize) {
        if let Some(e) = self.inner.resume.get(pair) {
            let _ = e.read();
        }
    }

    /// Makes the pair's worker come back (after its other ready events).
    fn yield_worker(&self, pair: usize) {
        if let Some(e) = self.inner.resume.get(pair) {
            if let Err(e) = e.write(1) {
                log::warn!("pair {pair}: cannot resume the worker: {e}");
            }
        }
    }

    fn stopped(&self, state: &VringState<DirtyGuestMemory>) -> bool {
        !state.get_queue().ready() || !state.is_enabled()
    }

    fn port_event(&self) -> u64 {
        2 * u64::from(self.inner.config.queue_pairs) + 1
    }

    fn acked(&self, bit: u32) -> bool {
        self.inner.acked_features.load(Ordering::Relaxed) & (1u64 << bit) != 0
    }

    /// Header bytes in front of every frame for the acked features.
    fn hdr_len(&self) -> usize {
        use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
        use virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;
        crate::virtio_net::hdr_size(
            self.acked(VIRTIO_F_VERSION_1),
            self.acked(VIRTIO_NET_F_MRG_RXBUF),
        )
    }

    /// Receives: moves frames from the pair's port into the RX queue until the port is empty
    /// or the guest has no more buffers (then asks to be kicked).
    fn rx_process(&self, pair: usize, vring: &VringRwLock<DirtyGuestMemory>) {
        let (Some(p), Some(port)) = (self.inner.pairs.get(pair), self.inner.ports.get(pair)) else {
            return;
        };
        let mut p = lock(p);
        let p = &mut *p;
        let mut state = vring.get_mut();
        if self.stopped(&state) {
            return;
        }
        let atomic = self
            .inner
            .mem
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mem = atomic.memory();
        if p.rx_buf.is_empty() {
            p.rx_buf = vec![0u8; NET_HDR_SIZE + MAX_FRAME_LEN];
        }
        use virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;
        let mrg = self.acked(VIRTIO_NET_F_MRG_RXBUF);
        let event_idx = self.inner.event_idx.load(Ordering::Relaxed);
        let hdr_len = self.hdr_len();
        // Kicks are not needed while buffers last.
        let _ = state.disable_notification();
        let mut bursts = 0;
        if p.rx_owed && state.get_call().is_some() {
            p.rx_owed = false;
            if let Err(e) = state.signal_used_queue() {
                log::warn!("pair {pair}: cannot signal the RX queue: {e}");
            }
        }
        if self.inner.config.batch_marks && p.batch.is_none() {
            p.batch = Some(self.inner.log.batch());
        }
        loop {
            let stop = match p.batch.take() {
                // Every guest write of the burst (headers, payload, used elements) is marked
                // into the batch, which the scope flushes when it ends: before the used index
                // is published below and before the ring lock is released (DESIGN.md
                // invariant 2).
                Some(batch) => {
                    let r = batch
                        .scope(|| self.rx_burst(p, &mut state, &mem, &**port, hdr_len, mrg, pair));
                    let s = batch.stats();
                    (p.stats.log_marks, p.stats.log_rmws) = (s.marks, s.log_rmws);
                    p.batch = Some(batch);
                    r
                }
                None => self.rx_burst(p, &mut state, &mem, &**port, hdr_len, mrg, pair),
            };
            let stop = match stop {
                (stop, Some(start)) => self
                    .rx_publish(p, &mut state, &mem, start, event_idx, pair)
                    .unwrap_or(stop),
                (stop, None) => stop,
            };
            match stop {
                RxStop::BurstFull => {
                    bursts += 1;
                    if bursts < RX_BURSTS_PER_EVENT {
                        continue;
                    }
                    // The (edge-triggered) port may still hold frames: come back later.
                    self.yield_worker(pair);
                    break;
                }
                RxStop::PortEmpty | RxStop::Broken => break,
                RxStop::NoBuffers => {
                    // Ask for a kick at the next buffer; if some arrived meanwhile, go on.
                    match state.enable_notification() {
                        Ok(true) => {
                            let _ = state.disable_notification();
                            continue;
                        }
                        Ok(false) => break,
                        Err(e) => {
                            log::warn!("pair {pair}: cannot enable RX notifications: {e}");
                            break;
                        }
                    }
                }
            }
        }
    }

    /// One RX burst, the guest-writing part: up to [`RX_BURST`] frames from the port into the
    /// guest's RX buffers, then their used elements. Returns why it stopped and, if elements
    /// were written, the used index they start at: the caller publishes the new index
    /// ([`rx_publish`](Self::rx_publish)) once the burst's marks are flushed.
    #[allow(clippy::too_many_arguments)]
    fn rx_burst(
        &self,
        p: &mut Pair,
        state: &mut VringState<DirtyGuestMemory>,
        mem: &Mem,
        port: &dyn Port,
        hdr_len: usize,
        mrg: bool,
        pair: usize,
    ) -> (RxStop, Option<Wrapping<u16>>) {
        p.used.clear();
        p.bad.clear();
        // A port with a virtio-net header (TAP) reads it in front of the frame, where the
        // header goes; a plain port reads the frame only and the device writes the header.
        let vnet = port.vnet_hdr();
        let (recv_at, extra) = if vnet {
            (NET_HDR_SIZE - hdr_len, hdr_len)
        } else {
            (NET_HDR_SIZE, 0)
        };
        let q = state.get_queue_mut();
        let mut frames = 0usize;
        let stop = loop {
            if frames == RX_BURST {
                break RxStop::BurstFull;
            }
            // 1. The next frame: one that waited for buffers, else one from the port.
            let len = match p.pending.take() {
                Some(l) => l,
                None => match port.recv(&mut p.rx_buf[recv_at..]) {
                    Ok(None) => {
                        break RxStop::PortEmpty;
                    }
                    Ok(Some(n)) if n > extra + MAX_FRAME_LEN => {
                        let n = n - extra;
                        p.stats.rx_oversized += 1;
                        log::log!(
                            p.rx_rl.level(),
                            "pair {pair}: dropping a {n}-byte frame from the port (more than {MAX_FRAME_LEN})"
                        );
                        continue;
                    }
                    Ok(Some(n)) if n < extra + ETH_HLEN => {
                        let n = n.saturating_sub(extra);
                        p.stats.rx_runts += 1;
                        log::log!(
                            p.rx_rl.level(),
                            "pair {pair}: dropping a {n}-byte runt frame from the port"
                        );
                        continue;
                    }
                    Ok(Some(n)) => n - extra,
                    Err(e) => {
                        p.stats.rx_port_errors += 1;
                        log::log!(p.rx_rl.level(), "pair {pair}: port read failed: {e}");
                        break RxStop::PortEmpty;
                    }
                },
            };
            // 2. Enough buffers for header + frame: several chains with MRG_RXBUF, else one.
            let need = hdr_len + len;
            p.chains.clear();
            p.segs.clear();
            let bad_before = p.bad.len();
            let mut popped = 0u16;
            let mut cap = 0usize;
            while cap < need {
                let Some(chain) = q.pop_descriptor_chain(mem) else {
                    break;
                };
                popped += 1;
                let head = chain.head_index();
                let start = p.segs.len();
                match collect_writable(chain, mem, &mut p.segs) {
                    Ok(c) => {
                        p.chains.push(RxChain {
                            head,
                            segs: (start, p.segs.len()),
                        });
                        cap += c;
                    }
                    Err(why) => {
                        p.segs.truncate(start);
                        p.bad.push(head);
                        p.stats.rx_bad_chains += 1;
                        log::log!(
                            p.rx_rl.level(),
                            "pair {pair}: RX chain {head} unusable ({why}); returned empty"
                        );
                    }
                }
                if !mrg && !p.chains.is_empty() {
                    break;
                }
            }
            if cap < need {
                if !mrg && !p.chains.is_empty() {
                    // The guest's buffers are smaller than this frame: drop it, keep the buffer.
                    q.go_to_previous_position();
                    p.stats.rx_too_big_for_buffer += 1;
                    log::log!(
                        p.rx_rl.level(),
                        "pair {pair}: a {len}-byte frame does not fit the guest's {cap}-byte RX buffer (no MRG_RXBUF); dropped"
                    );
                    continue;
                }
                // Not enough buffers: give back what this frame took and keep the frame.
                for _ in 0..popped {
                    q.go_to_previous_position();
                }
                let undone = p.bad.len() - bad_before;
                p.bad.truncate(bad_before);
                p.stats.rx_bad_chains -= undone as u64;
                p.pending = Some(len);
                p.stats.rx_no_buffers += 1;
                break RxStop::NoBuffers;
            }
            // 3. Header (num_buffers = chains used) and payload, through vm-memory.
            let n = p.chains.len();
            if !vnet {
                let hdr = NetHdr::rx(n as u16);
                p.rx_buf[NET_HDR_SIZE - hdr_len..NET_HDR_SIZE]
                    .copy_from_slice(&hdr.as_slice()[..hdr_len]);
            } else if hdr_len == NET_HDR_SIZE {
                // The port's header, with our num_buffers (the last two bytes).
                p.rx_buf[NET_HDR_SIZE - 2..NET_HDR_SIZE].copy_from_slice(&(n as u16).to_le_bytes());
            }
            let src = &p.rx_buf[NET_HDR_SIZE - hdr_len..NET_HDR_SIZE + len];
            let mut off = 0usize;
            for c in &p.chains {
                let mut written = 0u32;
                for &(gpa, seg_len) in &p.segs[c.segs.0..c.segs.1] {
                    if off == src.len() {
                        break;
                    }
                    let k = (seg_len as usize).min(src.len() - off);
                    if let Err(e) = mem.write_slice(&src[off..off + k], GuestAddress(gpa)) {
                        // Checked when gathered; only a memory change could get here.
                        log::log!(p.rx_rl.level(), "pair {pair}: RX write at {gpa:#x}: {e}");
                    }
                    off += k;
                    written += k as u32;
                }
                p.used.push((c.head, written));
            }
            p.stats.rx_frames += 1;
            p.stats.rx_bytes += len as u64;
            p.stats.rx_buffers += n as u64;
            frames += 1;
        };
        for &h in &p.bad {
            p.used.push((h, 0));
        }
        if p.used.is_empty() {
            return (stop, None);
        }
        // 4. The used elements, then the index. A frame's buffers are consecutive.
        let used_ring = q.used_ring();
        let size = q.size();
        let start = Wrapping(q.next_used());
        #[cfg(feature = "test-utils")]
        let early = self.inner.publish_early.load(Ordering::Relaxed);
        for (i, &(head, len)) in p.used.iter().enumerate() {
            #[cfg(feature = "test-utils")]
            if early && i > 0 {
                // Negative control: publish each element as virtio-queue's `add_used` would,
                // with a pause, so a driver sees frames whose buffers are not all there.
                let idx = (start + Wrapping(i as u16)).0.to_le();
                let _ = mem.store(
                    idx,
                    GuestAddress(used_ring).unchecked_add(2),
                    Ordering::Release,
                );
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            let slot = (start + Wrapping(i as u16)).0 % size;
            let addr = GuestAddress(used_ring).unchecked_add(4 + 8 * u64::from(slot));
            // struct virtq_used_elem { le32 id; le32 len; } as one little-endian u64.
            let elem = u64::from(head) | (u64::from(len) << 32);
            if let Err(e) = mem.write_obj(elem.to_le(), addr) {
                log::error!("pair {pair}: RX used ring at {used_ring:#x} not writable: {e}");
                return (RxStop::Broken, None);
            }
        }
        (stop, Some(start))
    }

    /// Publishes the used elements [`rx_burst`](Self::rx_burst) wrote from `start` on with ONE
    /// Release store of the used index, then raises at most one interrupt (EVENT_IDX).
    /// `Some(RxStop::Broken)` if the used ring cannot be written.
    fn rx_publish(
        &self,
        p: &mut Pair,
        state: &mut VringState<DirtyGuestMemory>,
        mem: &Mem,
        start: Wrapping<u16>,
        event_idx: bool,
        pair: usize,
    ) -> Option<RxStop> {
        let q = state.get_queue_mut();
        let used_ring = q.used_ring();
        let size = q.size();
        let new = start + Wrapping(p.used.len() as u16);
        if let Err(e) = mem.store(
            new.0.to_le(),
            GuestAddress(used_ring).unchecked_add(2),
            Ordering::Release,
        ) {
            log::error!("pair {pair}: RX used index not writable: {e}");
            return Some(RxStop::Broken);
        }
        q.set_next_used(new.0);
        p.stats.rx_bursts += 1;
        // 5. Interrupt, if the driver asked for one within [start, new).
        let notify = !event_idx || {
            // The index store must be visible before we read used_event (virtio 1.2, 2.7.10).
            fence(Ordering::SeqCst);
            let ue = GuestAddress(q.avail_ring()).unchecked_add(4 + 2 * u64::from(size));
            match mem.load::<u16>(ue, Ordering::Relaxed) {
                Ok(v) => {
                    let used_event = Wrapping(u16::from_le(v));
                    // vring_need_event(used_event, new, old)
                    new - used_event - Wrapping(1) < new - start
                }
                Err(_) => true,
            }
        };
        if notify || p.rx_owed {
            if state.get_call().is_none() {
                p.rx_owed = true;
            } else {
                p.rx_owed = false;
                if let Err(e) = state.signal_used_queue() {
                    log::warn!("pair {pair}: cannot signal the RX queue: {e}");
                }
            }
        }
        None
    }

    /// Transmits: every chain of the TX queue to the port, then one interrupt if needed
    /// (the standard EVENT_IDX loop, so no kick is lost).
    fn tx_process(&self, pair: usize, vring: &VringRwLock<DirtyGuestMemory>) {
        let (Some(p), Some(port)) = (self.inner.pairs.get(pair), self.inner.ports.get(pair)) else {
            return;
        };
        let mut p = lock(p);
        let p = &mut *p;
        let mut state = vring.get_mut();
        if !state.get_queue().ready() || !state.is_enabled() {
            return;
        }
        let atomic = self
            .inner
            .mem
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mem = atomic.memory();
        if p.tx_buf.is_empty() {
            p.tx_buf = vec![0u8; NET_HDR_SIZE + MAX_FRAME_LEN];
        }
        let hdr_len = self.hdr_len();
        p.tx_blocked = false;
        loop {
            let _ = state.disable_notification();
            if self.tx_burst(p, &mut state, &mem, &**port, hdr_len, pair) {
                // More chains wait; notifications stay off until we are back.
                self.yield_worker(pair);
                break;
            }
            if p.tx_blocked {
                // The port is full: the edge-triggered EPOLLOUT on its fd brings us back
                // (notifications stay off; the chains wait in the avail ring meanwhile).
                break;
            }
            match state.enable_notification() {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    log::warn!("pair {pair}: cannot enable TX notifications: {e}");
                    break;
                }
            }
        }
    }

    fn tx_burst(
        &self,
        p: &mut Pair,
        state: &mut VringState<DirtyGuestMemory>,
        mem: &Mem,
        port: &dyn Port,
        hdr_len: usize,
        pair: usize,
    ) -> bool {
        let mut used = 0usize;
        let limit = hdr_len + MAX_FRAME_LEN;
        while used < TX_BURST {
            let Some(chain) = state.get_queue_mut().pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let mut total = 0usize;
            let mut problem: Option<&'static str> = None;
            for d in chain {
                if d.is_write_only() {
                    problem = Some("device-writable descriptor");
                    break;
                }
                let len = d.len() as usize;
                if total + len > limit {
                    problem = Some("longer than the largest frame");
                    break;
                }
                if mem
                    .read_slice(&mut p.tx_buf[total..total + len], d.addr())
                    .is_err()
                {
                    problem = Some("descriptor outside guest memory");
                    break;
                }
                total += len;
            }
            match problem {
                Some(why) => {
                    if why.starts_with("longer") {
                        p.stats.tx_oversized += 1;
                    } else {
                        p.stats.tx_bad_chains += 1;
                    }
                    log::log!(
                        p.tx_rl.level(),
                        "pair {pair}: TX chain {head} dropped: {why}"
                    );
                }
                None if total < hdr_len + ETH_HLEN => {
                    p.stats.tx_runts += 1;
                    log::log!(
                        p.tx_rl.level(),
                        "pair {pair}: TX chain {head} dropped: {total} bytes, a runt"
                    );
                }
                None => {
                    let from = if port.vnet_hdr() { 0 } else { hdr_len };
                    let frame = &p.tx_buf[from..total];
                    match port.send(&[IoSlice::new(frame)]) {
                        Ok(Sent::Sent) => {
                            p.stats.tx_frames += 1;
                            p.stats.tx_bytes += (total - hdr_len) as u64;
                        }
                        Ok(Sent::WouldBlock) => {
                            // Back-pressure, as QEMU's netdevs do: the chain goes back to the
                            // avail ring and is sent when the port has room again. Nothing was
                            // written to guest memory for it.
                            state.get_queue_mut().go_to_previous_position();
                            p.tx_blocked = true;
                            p.stats.tx_blocked += 1;
                            break;
                        }
                        Ok(Sent::NoPeer) => p.stats.tx_dropped += 1,
                        Err(e) => {
                            p.stats.tx_dropped += 1;
                            log::log!(p.tx_rl.level(), "pair {pair}: port send failed: {e}");
                        }
                    }
                }
            }
            // The device writes nothing into TX buffers: used length 0.
            if let Err(e) = state.add_used(head, 0) {
                log::error!("pair {pair}: cannot add TX used entry for {head}: {e}");
                return false;
            }
            used += 1;
        }
        if used > 0 && state.needs_notification().unwrap_or(true) {
            if let Err(e) = state.signal_used_queue() {
                log::warn!("pair {pair}: cannot signal the TX queue: {e}");
            }
        }
        used == TX_BURST
    }
}

/// Appends the device-writable segments of an RX chain to `segs` and returns their total
/// length in bytes. A read-only descriptor, one outside guest memory, more than
/// [`MAX_RX_SEGS`] segments or no writable byte at all make the chain unusable.
fn collect_writable(
    chain: virtio_queue::DescriptorChain<&Mem>,
    mem: &Mem,
    segs: &mut Vec<(u64, u32)>,
) -> Result<usize, &'static str> {
    let mut cap = 0usize;
    let mut n = 0usize;
    for d in chain {
        if !d.is_write_only() {
            return Err("device-readable descriptor");
        }
        if d.len() == 0 {
            continue;
        }
        if !mem.check_range(d.addr(), d.len() as usize, vm_memory::Permissions::Write) {
            return Err("descriptor outside guest memory");
        }
        n += 1;
        if n > MAX_RX_SEGS {
            return Err("too many descriptors");
        }
        segs.push((d.addr().raw_value(), d.len()));
        cap += d.len() as usize;
    }
    if cap == 0 {
        return Err("no writable bytes");
    }
    Ok(cap)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_validation() {
        let mut c = NetConfig::default();
        assert!(c.validate().is_ok());
        c.queue_pairs = 0;
        assert!(c.validate().is_err());
        c.queue_pairs = 33;
        assert!(c.validate().is_err());
        c.queue_pairs = 2;
        c.queue_size = 100;
        assert!(c.validate().is_err());
        c.queue_size = 1024;
        c.mtu = Some(60);
        assert!(c.validate().is_err());
        c.mtu = Some(9000);
        assert!(c.validate().is_ok());
    }
}
