//! `backend_messages`: arbitrary memory and log messages into the real stock daemon.
//!
//! The backend is vhost-user-backend's stock `VhostUserDaemon` serving
//! [`DirtyLogBackend`]`<NullDevice>` (a one-queue device that never touches its queue) over a
//! real unix socket (an abstract-namespace socket: no files), driven by `vhost`'s `Frontend` in
//! the same process. After feature negotiation (LOG_SHMFD, REPLY_ACK, CONFIGURE_MEM_SLOTS) an
//! input sends an arbitrary stream of
//! `SET_FEATURES` (with and without `VHOST_F_LOG_ALL`, sometimes with junk bits),
//! `SET_MEM_TABLE`, `ADD_MEM_REGION`, `REM_MEM_REGION` (memfds of arbitrary sizes and offsets,
//! including fds shorter than the region), `SET_LOG_BASE` (memfds of arbitrary sizes, arbitrary
//! `mmap_size` / `mmap_offset`: fd shorter than the mapping, offsets past the end, logs too small
//! for guest memory), `SET_VRING_NUM` / `ADDR` / `BASE` and `GET_VRING_BASE`, interleaved with
//! *device writes*: `write_slice` through the daemon's own `GuestMemoryAtomic`, exactly as a
//! dataplane writes guest memory.
//!
//! Every message that takes no reply of its own is sent with `NEED_REPLY`, so when it returns
//! the daemon has handled it. A message the daemon refuses makes it drop the connection (that is
//! how the stock handler fails a message); the input then goes on with a fresh daemon and
//! connection (at most `MAX_SESSIONS` per input). Every daemon's threads are joined before the
//! next one starts, so an execution leaves no thread or fd behind.
//!
//! Checks:
//! - no panic, no SIGBUS / SIGSEGV in the daemon or in the device writes;
//! - a log the backend accepted is backed by its fd and covers every memory region; a plainly
//!   valid log is accepted;
//! - after each write made while LOG_ALL is on with a log attached, every page written and
//!   covered by that log is set in the log *as the frontend sees it* (read back from the memfd),
//!   and no bit anywhere in any log file lies outside the pages written while logging was on;
//! - pages past the end of the log are counted in `stats()` (and writes with no log are counted
//!   as such), never written;
//! - after a write made while LOG_ALL is on and *no* log is attached, the next log attached has
//!   every page marked (and nothing else does);
//! - a stock-mapped log is put to use only as far as guest memory reaches: the backend's view
//!   (`len_bytes`) is `min(mmap_size, need rounded up to a word)` for the memory at
//!   `SET_LOG_BASE`, widened (never narrowed) when memory grows; `capacity_bytes` is
//!   `mmap_size`; pages past the view are out of range;
//! - pages written past the end of the view while logging are *carried*: every one of them must
//!   be set in the next log (or wider view) that covers it, checked as soon as it is attached;
//!   the head of a write piece that straddles the end may be set too (the handle carries the
//!   piece's whole page range), and the hull of the carried ranges only after the handle
//!   merged them (its `carried_ranges` fell from 256 to 1); nothing else. `carried_ranges` is
//!   0 when nothing may be carried and at least 1 when something must be.
//!
//! What is deliberately not generated: touching the part of a region that has no file behind it
//! (a hostile `SET_MEM_TABLE` / `ADD_MEM_REGION` with an fd shorter than the region), by a device
//! write or by `SET_VRING_ADDR` (whose stock handler reads the used ring index from guest
//! memory). Either raises `SIGBUS` in *any* vhost-user-backend daemon, because neither
//! `vhost-user-backend` nor `vm-memory` checks the fd length when mapping guest memory; see
//! `contrib/fuzz/README.md` (finding F1). The target keeps sending such regions and only avoids
//! touching them, unless `VDL_FUZZ_UNBACKED=1` is set (which reproduces the crash at once).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use arbitrary::{Arbitrary, Unstructured};
use vhost::vhost_user::message::{
    VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, Listener, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserDirtyLogRegion, VhostUserMemoryRegionInfo, VringConfigData};
use vhost_dirtylog::backend::DirtyLogBackend;
use vhost_dirtylog::log::{GuestDirtyBitmap, LogStats};
use vhost_dirtylog::test_utils::{NullDevice, NullMem};
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

use super::{file_bytes, memfd, set_bits, PageSet, Reached};

const PAGE: u64 = 4096;
const MIB: u64 = 1 << 20;
/// `VHOST_F_LOG_ALL` as a feature-word bit.
const LOG_ALL: u64 = VhostUserVirtioFeatures::LOG_ALL.bits();
const MAX_OPS: usize = 40;
const MAX_SESSIONS: usize = 4;
const MAX_FILES: usize = 6;
/// A message that takes longer than this is a hang, not a refusal.
const TIMEOUT: Duration = Duration::from_secs(20);

/// One fuzz input.
#[derive(Arbitrary, Debug)]
pub struct Input {
    /// The messages and writes (at most `MAX_OPS`).
    pub ops: Vec<Op>,
}

/// A guest-physical address for a region.
#[derive(Arbitrary, Debug)]
pub enum RegionGpa {
    /// Whole MiB below 64 MiB.
    Mib(u8),
    /// Whole pages below 256 MiB.
    Pages(u16),
    /// Anything.
    Raw(u64),
}

/// A region size.
#[derive(Arbitrary, Debug)]
pub enum RegionSize {
    /// `n + 1` pages (up to 1 MiB).
    Pages(u8),
    /// Not a multiple of the page size.
    Bytes(u16),
    /// Anything.
    Raw(u64),
}

/// How long the fd behind a region or log is, relative to what the message claims.
#[derive(Arbitrary, Debug)]
pub enum FdLen {
    /// Exactly `offset + size`.
    Exact,
    /// `offset + size - n` (the mapping reaches past the end of the fd).
    Short(u16),
    /// `offset + size + n`.
    Long(u16),
    /// Anything up to 1 MiB.
    Any(u32),
}

/// An `mmap_offset`.
#[derive(Arbitrary, Debug)]
pub enum MmapOffset {
    /// 0.
    Zero,
    /// Whole pages.
    Pages(u8),
    /// Any byte (usually not page aligned).
    Bytes(u16),
    /// Anything.
    Raw(u64),
}

/// A region of a memory message.
#[derive(Arbitrary, Debug)]
pub struct RegionIn {
    /// `guest_phys_addr`.
    pub gpa: RegionGpa,
    /// `memory_size`.
    pub size: RegionSize,
    /// `mmap_offset`.
    pub offset: MmapOffset,
    /// The fd's length.
    pub fd: FdLen,
}

/// A log size.
#[derive(Arbitrary, Debug)]
pub enum LogSize {
    /// Exactly what the current regions need.
    Exact,
    /// What they need minus `n` bytes (too small unless `n == 0`).
    Less(u8),
    /// Whole words.
    Words(u16),
    /// Anything.
    Raw(u64),
}

/// Where a log lives.
#[derive(Arbitrary, Debug)]
pub enum LogFileSel {
    /// A new memfd whose length is chosen by this.
    New(FdLen),
    /// A memfd used before (index reduced).
    Existing(u8),
}

/// A ring address in `SET_VRING_ADDR`.
#[derive(Arbitrary, Debug)]
pub enum RingAddr {
    /// Inside region `which` (reduced), at `offset` (reduced), in the frontend's address space.
    In {
        /// Region.
        which: u8,
        /// Offset.
        offset: u32,
    },
    /// Anything.
    Raw(u64),
}

/// A device write's start.
#[derive(Arbitrary, Debug)]
pub enum WriteGpa {
    /// Inside region `which` (reduced), at `offset` (reduced).
    In {
        /// Region.
        which: u8,
        /// Offset.
        offset: u32,
    },
    /// `back` bytes before the end of region `which` (crosses into the next region or a hole).
    End {
        /// Region.
        which: u8,
        /// Distance from the end.
        back: u16,
    },
    /// Anything.
    Raw(u64),
}

/// One message or device write.
#[derive(Arbitrary, Debug)]
pub enum Op {
    /// `SET_FEATURES`.
    Features {
        /// `VHOST_F_LOG_ALL`.
        log_all: bool,
        /// Extra bits (the daemon refuses features it did not offer).
        junk: Option<u64>,
    },
    /// `SET_MEM_TABLE` (1 to 8 regions).
    MemTable(Vec<RegionIn>),
    /// `ADD_MEM_REGION`.
    AddRegion(RegionIn),
    /// `REM_MEM_REGION` of region `which` (reduced), or of an arbitrary range.
    RemRegion {
        /// Region.
        which: u8,
        /// Arbitrary (gpa, size) instead.
        other: Option<(u64, u64)>,
    },
    /// `SET_LOG_BASE`.
    LogBase {
        /// The memfd.
        file: LogFileSel,
        /// `mmap_offset`.
        offset: MmapOffset,
        /// `mmap_size`.
        size: LogSize,
    },
    /// `SET_VRING_NUM`.
    VringNum {
        /// Queue index (the device has one queue).
        index: u8,
        /// Size.
        num: u16,
    },
    /// `SET_VRING_ADDR`.
    VringAddr {
        /// Queue index.
        index: u8,
        /// Descriptor table.
        desc: RingAddr,
        /// Available ring.
        avail: RingAddr,
        /// Used ring.
        used: RingAddr,
        /// `VHOST_VRING_F_LOG` with this `log_guest_addr`.
        log: Option<u64>,
    },
    /// `SET_VRING_BASE`.
    VringBase {
        /// Queue index.
        index: u8,
        /// Base.
        base: u16,
    },
    /// `GET_VRING_BASE` (stops the ring).
    GetVringBase {
        /// Queue index.
        index: u8,
    },
    /// A device write through the daemon's guest memory.
    Write {
        /// Start.
        gpa: WriteGpa,
        /// Length (bytes).
        len: u16,
    },
    /// Close the connection and start a fresh daemon.
    Reconnect,
}

/// Decodes `data` and runs it.
pub fn run(data: &[u8]) -> Reached {
    match Input::arbitrary_take_rest(Unstructured::new(data)) {
        Ok(input) => exec(&input, Fault::None),
        Err(_) => Reached::default(),
    }
}

// ---------------------------------------------------------------------------------------------
// The device and the daemon.

/// The device: `test_utils`' null device (one queue, never processed: the fuzz input is the
/// dataplane), offering `REPLY_ACK | CONFIGURE_MEM_SLOTS`. vhost-user-backend 0.24 leaks one
/// exit-event fd per daemon (finding F3 in `contrib/fuzz/README.md`), which would exhaust the
/// process's fds after some ten thousand sessions; the harness reclaims them
/// ([`NullDevice::reclaim_exit_fds`]) once each daemon is gone.
type Device = NullDevice<GuestDirtyBitmap>;

type Mem = NullMem<GuestDirtyBitmap>;

/// The listening socket, made once per process (abstract namespace: nothing on disk).
struct Harness {
    listener: Listener,
    addr: SocketAddr,
}

fn harness() -> &'static Mutex<Harness> {
    static H: OnceLock<Mutex<Harness>> = OnceLock::new();
    H.get_or_init(|| {
        pin_to_one_cpu();
        static N: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "vhost-dirtylog-fuzz-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("abstract address");
        let listener = UnixListener::bind_addr(&addr).expect("bind the fuzz socket");
        Mutex::new(Harness {
            listener: Listener::from(listener),
            addr,
        })
    })
}

/// Pins the calling thread, and so every daemon thread it starts later (threads inherit their
/// creator's affinity), to the CPU it runs on now, unless `VDL_FUZZ_NO_PIN` is set.
///
/// Why: every message is a round trip between this thread (the frontend) and the daemon's
/// request thread, and every session starts and joins two threads. Spread over two CPUs, each
/// hop is a cross-CPU wake-up; on a VM whose idle vCPU halts, that is a wake-up of the halted
/// vCPU by the hypervisor. On one CPU the hop is a plain context switch: measured on the 2-vCPU
/// PVM guest this project is developed on (`exec_rate`, harness only), 1,305 exec/s spread
/// against 1,951 pinned. The protocol is strictly request/reply, so pinning hides no
/// interleaving the target could otherwise reach (concurrency is loom's job, `tests/loom.rs`).
/// Under `taskset -c N` the CPU is N, so two fuzz processes can be given a core each.
fn pin_to_one_cpu() {
    if std::env::var_os("VDL_FUZZ_NO_PIN").is_some() {
        return;
    }
    // SAFETY: sched_getcpu takes no arguments and only returns a number.
    let cpu = unsafe { libc::sched_getcpu() };
    let Ok(cpu) = usize::try_from(cpu) else {
        return;
    };
    // SAFETY: an all-zero cpu_set_t is a valid empty set (CPU_ZERO).
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET bounds-checks `cpu` against the set's size and writes only inside `set`.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t of the size passed; pid 0 is the calling thread. A
    // failure (e.g. a cgroup that forbids the CPU) leaves the affinity as it was.
    let _ = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
}

// ---------------------------------------------------------------------------------------------
// The model.

struct Region {
    gpa: u64,
    size: u64,
    offset: u64,
    /// Bytes from the region's start that have file behind them.
    backed: u64,
    /// The frontend's fd (kept open, as a VMM keeps guest RAM).
    _file: File,
    user_addr: u64,
}

impl Region {
    fn end(&self) -> u64 {
        self.gpa + self.size
    }
}

struct LogFile {
    file: File,
    len: u64,
    /// Bits that must be set (file bit coordinates: bit `i` is bit `i % 8` of byte `i / 8`).
    must: Vec<u8>,
    /// Bits that may be set.
    may: Vec<u8>,
}

impl LogFile {
    /// The file's bits `[first, last]` (file bit coordinates) are expected set: required when
    /// `must`, allowed otherwise. Bits past the end of the fd (an accepted log that ends inside
    /// its last page) are invisible to a reader of the file and left out. Returns whether any
    /// of them lies in the file.
    fn expect_bits(&mut self, first: u64, last: u64, must: bool) -> bool {
        let file_bits = self.len * 8;
        if first >= file_bits {
            return false;
        }
        let last = last.min(file_bits - 1);
        if must {
            set_bits(&mut self.must, first, last);
        }
        set_bits(&mut self.may, first, last);
        true
    }
}

#[derive(Clone, Copy)]
struct AttachedLog {
    file: usize,
    offset: u64,
    /// `mmap_size` (the mapping, `capacity_bytes`).
    size: u64,
    /// Bytes of it in use (`len_bytes`): as far as guest memory reaches.
    view: u64,
    /// Attached all-dirty (writes happened with LOG_ALL on and no log): the backend makes every
    /// wider view of it all-dirty over its new part too (`DirtyLog::replace_region`), also when
    /// memory grows later (finding F7: conservative over-marking, by design).
    all_dirty: bool,
}

/// The view of a `size`-byte log that the backend puts to use for guest memory up to `end`.
fn view_for(size: u64, end: u64) -> u64 {
    log_bytes_for(end).next_multiple_of(8).min(size)
}

struct Session {
    frontend: Frontend,
    daemon: VhostUserDaemon<DirtyLogBackend<Device>>,
    backend: DirtyLogBackend<Device>,
    mem: Mem,
    features: u64,
    regions: Vec<Region>,
    logging: bool,
    log: Option<AttachedLog>,
    stats: LogStats,
    /// A write happened with LOG_ALL on and no log attached: the backend marks every page of
    /// the next log it attaches (`DirtyLog::replace_region`).
    unlogged: bool,
    /// Pages written past the end of the log while logging: the next log (or wider view) that
    /// covers one must have it set.
    carry_must: PageSet,
    /// `carry_must` plus pages the backend may set along with them (see the module docs).
    carry_may: PageSet,
}

struct State<'h> {
    harness: &'h mut Harness,
    session: Option<Session>,
    sessions: usize,
    files: Vec<LogFile>,
    reached: Reached,
    fault: Fault,
    next_user_addr: u64,
}

/// A fault injected behind the backend's back, for the negative controls: the checks must fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// None: the real check.
    None,
    /// The log file is wiped after the first logged write.
    WipeLog,
    /// The first carried page the backend marks in a new log (or wider view) is cleared from
    /// the log file right after (as if the backend had dropped its carried marks).
    DropCarried,
}

/// Runs `input` with `fault` injected (negative controls: any fault must make the checks fail).
pub fn exec(input: &Input, fault: Fault) -> Reached {
    let mut guard = harness().lock().unwrap_or_else(|e| e.into_inner());
    let mut st = State {
        harness: &mut guard,
        session: None,
        sessions: 0,
        files: Vec::new(),
        reached: Reached::default(),
        fault,
        next_user_addr: 0x7000_0000_0000,
    };
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // Sessions start lazily: an input with no operation costs no daemon.
        for op in input.ops.iter().take(MAX_OPS) {
            if st.session.is_none() {
                if st.sessions >= MAX_SESSIONS {
                    break;
                }
                st.start();
            }
            let t0 = Instant::now();
            st.apply(op);
            if trace() {
                eprintln!("{:>9.3?} {op:?}", t0.elapsed());
            }
        }
        st.check_all_files();
    }));
    // Always join the daemon's threads, also when a check failed.
    st.end();
    if let Err(p) = result {
        std::panic::resume_unwind(p);
    }
    std::mem::take(&mut st.reached)
}

/// `VDL_FUZZ_TRACE=1` prints each operation and how long it took.
fn trace() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("VDL_FUZZ_TRACE").is_some())
}

/// `VDL_FUZZ_TOLERATE_F6=1`: finding F6 (`contrib/fuzz/README.md`: after a write with LOG_ALL
/// on and no log, `SET_LOG_BASE` marks only the part of the new log the lowest region needs) is
/// allowed, so a fuzzing run can look past it until it is fixed in `src/`. Off by default.
fn tolerate_f6() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("VDL_FUZZ_TOLERATE_F6").is_some())
}

/// `VDL_FUZZ_UNBACKED=1` also touches guest memory where a region has no file behind it (device
/// writes there, `SET_VRING_ADDR` while such a region exists), to reproduce finding F1 (see the
/// module docs).
fn unbacked() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("VDL_FUZZ_UNBACKED").is_some())
}

fn fd_len(sel: &FdLen, want: u64) -> u64 {
    match *sel {
        FdLen::Exact => want,
        FdLen::Short(n) => want.saturating_sub(n as u64 + 1),
        FdLen::Long(n) => want.saturating_add(n as u64),
        FdLen::Any(n) => n as u64 % (MIB + 1),
    }
    .min(64 * MIB)
}

fn mmap_offset(o: &MmapOffset) -> u64 {
    match *o {
        MmapOffset::Zero => 0,
        MmapOffset::Pages(p) => p as u64 * PAGE,
        MmapOffset::Bytes(b) => b as u64,
        MmapOffset::Raw(r) => r,
    }
}

/// Bytes of log for guest-physical `[0, end)`, as the backend checks it.
fn log_bytes_for(end: u64) -> u64 {
    end.div_ceil(PAGE).div_ceil(8)
}

impl State<'_> {
    fn session(&mut self) -> &mut Session {
        self.session.as_mut().expect("a live session")
    }

    fn start(&mut self) {
        let t0 = Instant::now();
        self.start_session();
        if trace() {
            eprintln!("{:>9.3?} (session start)", t0.elapsed());
        }
    }

    fn start_session(&mut self) {
        self.sessions += 1;
        let backend = DirtyLogBackend::new(Device::default());
        let mem: Mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut daemon = VhostUserDaemon::new("fuzz".into(), backend.clone(), mem.clone())
            .expect("daemon (spawns its worker thread)");
        let stream = UnixStream::connect_addr(&self.harness.addr).expect("connect");
        daemon
            .start(&mut self.harness.listener)
            .expect("accept the connection");
        let mut frontend = Frontend::from_stream(stream, 8);
        frontend.set_owner().expect("SET_OWNER");
        let offered = frontend.get_features().expect("GET_FEATURES");
        assert!(offered & LOG_ALL != 0, "the adapter must offer LOG_ALL");
        let features = offered & !LOG_ALL;
        frontend.set_features(features).expect("SET_FEATURES");
        let pf = frontend
            .get_protocol_features()
            .expect("GET_PROTOCOL_FEATURES");
        assert!(pf.contains(VhostUserProtocolFeatures::LOG_SHMFD));
        frontend
            .set_protocol_features(
                VhostUserProtocolFeatures::LOG_SHMFD
                    | VhostUserProtocolFeatures::REPLY_ACK
                    | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS,
            )
            .expect("SET_PROTOCOL_FEATURES");
        self.session = Some(Session {
            frontend,
            daemon,
            backend,
            mem,
            features,
            regions: Vec::new(),
            logging: false,
            log: None,
            stats: LogStats::default(),
            unlogged: false,
            carry_must: PageSet::default(),
            carry_may: PageSet::default(),
        });
        self.reached.hit("session");
    }

    /// Closes the connection and joins every thread of the daemon.
    fn end(&mut self) {
        let t0 = Instant::now();
        self.end_session();
        if trace() {
            eprintln!("{:>9.3?} (session end)", t0.elapsed());
        }
    }

    fn end_session(&mut self) {
        if let Some(s) = self.session.take() {
            let Session {
                frontend,
                mut daemon,
                backend,
                ..
            } = s;
            let device = backend.inner().clone();
            drop(backend);
            drop(frontend);
            let _ = daemon.wait();
            // Dropping the daemon drops the handler (its request thread has ended): that sends
            // the exit event and joins the vring worker.
            drop(daemon);
            // SAFETY: the daemon, its handler and its worker are gone (dropped and joined
            // above); nothing else serves this device.
            unsafe { device.reclaim_exit_fds() };
        }
    }

    /// Sends one message; on failure the session is over (the daemon closes the connection on
    /// any message it refuses). A message that hangs is a bug.
    fn send<R>(
        &mut self,
        what: &'static str,
        acked: bool,
        f: impl FnOnce(&mut Frontend) -> Result<R, vhost::Error>,
    ) -> Option<R> {
        let s = self.session();
        if acked {
            s.frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        let t0 = Instant::now();
        let r = f(&mut s.frontend);
        s.frontend.set_hdr_flags(VhostUserHeaderFlag::empty());
        assert!(
            t0.elapsed() < TIMEOUT,
            "{what}: the daemon took {:?} to answer",
            t0.elapsed()
        );
        match r {
            Ok(v) => {
                self.reached.hit("message-ok");
                Some(v)
            }
            Err(_) => {
                self.reached.hit("message-refused");
                self.end();
                None
            }
        }
    }

    fn region_info(&mut self, r: &RegionIn) -> Option<(VhostUserMemoryRegionInfo, Region)> {
        let gpa = match r.gpa {
            RegionGpa::Mib(m) => (m as u64 % 64) * MIB,
            RegionGpa::Pages(p) => p as u64 * PAGE,
            RegionGpa::Raw(g) => g,
        };
        let size = match r.size {
            RegionSize::Pages(p) => (p as u64 + 1) * PAGE,
            RegionSize::Bytes(b) => b as u64 + 1,
            RegionSize::Raw(s) => s,
        };
        let offset = mmap_offset(&r.offset);
        let want = offset.saturating_add(size);
        let len = fd_len(&r.fd, want);
        if size == 0 {
            return None; // refused by the frontend library itself
        }
        let file = memfd(len);
        let backed = len.saturating_sub(offset).min(size);
        let user_addr = self.next_user_addr;
        self.next_user_addr += 1 << 32;
        let info = VhostUserMemoryRegionInfo {
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: user_addr,
            mmap_offset: offset,
            mmap_handle: file.as_raw_fd(),
        };
        Some((
            info,
            Region {
                gpa,
                size,
                offset,
                backed,
                _file: file,
                user_addr,
            },
        ))
    }

    fn apply(&mut self, op: &Op) {
        match op {
            Op::Features { log_all, junk } => {
                let base = self.session().features;
                let mut f = if *log_all { base | LOG_ALL } else { base };
                if let Some(j) = junk {
                    f |= j;
                }
                if self
                    .send("SET_FEATURES", true, |fe| fe.set_features(f))
                    .is_some()
                {
                    let s = self.session();
                    s.logging = f & LOG_ALL != 0;
                    assert_eq!(
                        s.backend.log().is_logging(),
                        s.logging,
                        "LOG_ALL not applied"
                    );
                    if s.logging {
                        self.reached.hit("log-all-on");
                    }
                }
            }
            Op::MemTable(regions) => {
                let mut infos = Vec::new();
                let mut model = Vec::new();
                for r in regions.iter().take(8) {
                    if let Some((i, m)) = self.region_info(r) {
                        infos.push(i);
                        model.push(m);
                    }
                }
                if infos.is_empty() {
                    return;
                }
                // vm-memory (and so the stock handler) refuses a table not sorted by address
                // (finding F2 in contrib/fuzz/README.md): only a sorted one is plainly valid.
                let sorted = model.windows(2).all(|w| w[0].gpa < w[1].gpa);
                let plainly_valid = plainly_valid(&model) && sorted;
                if !sorted {
                    self.reached.hit("mem-table-unsorted");
                }
                let ok = self
                    .send("SET_MEM_TABLE", true, |fe| fe.set_mem_table(&infos))
                    .is_some();
                assert!(
                    ok || !plainly_valid,
                    "a plainly valid SET_MEM_TABLE was refused"
                );
                if ok {
                    self.session().regions = model;
                    self.reached.hit("mem-table");
                    self.memory_changed();
                }
            }
            Op::AddRegion(r) => {
                let Some((info, region)) = self.region_info(r) else {
                    return;
                };
                let mut all: Vec<&Region> = self.session().regions.iter().collect();
                all.push(&region);
                let plainly_valid = plainly_valid_refs(&all) && all.len() <= 8;
                let ok = self
                    .send("ADD_MEM_REGION", true, |fe| fe.add_mem_region(&info))
                    .is_some();
                assert!(
                    ok || !plainly_valid,
                    "a plainly valid ADD_MEM_REGION was refused"
                );
                if ok {
                    self.session().regions.push(region);
                    self.reached.hit("add-region");
                    self.memory_changed();
                }
            }
            Op::RemRegion { which, other } => {
                let s = self.session();
                let (gpa, size, idx) = match (other, s.regions.is_empty()) {
                    (Some((g, z)), _) => (*g, *z, None),
                    (None, true) => return,
                    (None, false) => {
                        let i = *which as usize % s.regions.len();
                        (s.regions[i].gpa, s.regions[i].size, Some(i))
                    }
                };
                let idx = idx.or_else(|| {
                    s.regions
                        .iter()
                        .position(|r| r.gpa == gpa && r.size == size)
                });
                let info = VhostUserMemoryRegionInfo {
                    guest_phys_addr: gpa,
                    memory_size: size,
                    userspace_addr: idx.map_or(0, |i| s.regions[i].user_addr),
                    mmap_offset: 0,
                    mmap_handle: -1,
                };
                let ok = self
                    .send("REM_MEM_REGION", true, |fe| fe.remove_mem_region(&info))
                    .is_some();
                if ok {
                    let i = idx.expect("REM_MEM_REGION of a region that does not exist succeeded");
                    self.session().regions.remove(i);
                    self.reached.hit("rem-region");
                    self.memory_changed();
                } else {
                    assert!(
                        idx.is_none() || size == 0,
                        "REM_MEM_REGION of an existing region was refused"
                    );
                }
            }
            Op::LogBase { file, offset, size } => self.log_base(file, offset, size),
            Op::VringNum { index, num } => {
                let (i, n) = (*index as usize % 2, *num);
                self.send("SET_VRING_NUM", true, |fe| fe.set_vring_num(i, n));
            }
            Op::VringAddr {
                index,
                desc,
                avail,
                used,
                log,
            } => {
                let cfg = VringConfigData {
                    queue_max_size: 256,
                    queue_size: 256,
                    flags: u32::from(log.is_some()),
                    desc_table_addr: self.ring_addr(desc),
                    used_ring_addr: self.ring_addr(used),
                    avail_ring_addr: self.ring_addr(avail),
                    log_addr: *log,
                };
                let i = *index as usize % 2;
                if !unbacked() && self.session().regions.iter().any(|r| r.backed < r.size) {
                    // The stock handler reads the used ring index from guest memory here; with
                    // an unbacked region that may be SIGBUS in the daemon (finding F1).
                    self.reached.hit("vring-addr-skipped-unbacked");
                    return;
                }
                if self
                    .send("SET_VRING_ADDR", true, |fe| fe.set_vring_addr(i, &cfg))
                    .is_some()
                {
                    self.reached.hit("vring-addr");
                }
            }
            Op::VringBase { index, base } => {
                let (i, b) = (*index as usize % 2, *base);
                self.send("SET_VRING_BASE", true, |fe| fe.set_vring_base(i, b));
            }
            Op::GetVringBase { index } => {
                let i = *index as usize % 2;
                // GET_* messages have a reply of their own: never NEED_REPLY on top.
                self.send("GET_VRING_BASE", false, |fe| fe.get_vring_base(i));
            }
            Op::Write { gpa, len } => self.write(gpa, *len as u64 + 1),
            Op::Reconnect => {
                self.end();
            }
        }
    }

    fn ring_addr(&mut self, a: &RingAddr) -> u64 {
        let s = self.session();
        match *a {
            RingAddr::In { which, offset } if !s.regions.is_empty() => {
                let r = &s.regions[which as usize % s.regions.len()];
                r.user_addr + (offset as u64 % r.size) / 16 * 16
            }
            RingAddr::In { offset, .. } => offset as u64,
            RingAddr::Raw(r) => r,
        }
    }

    fn log_base(&mut self, file: &LogFileSel, offset: &MmapOffset, size: &LogSize) {
        let end = self
            .session()
            .regions
            .iter()
            .map(|r| r.gpa.saturating_add(r.size))
            .max()
            .unwrap_or(0);
        let need = log_bytes_for(end);
        let offset = mmap_offset(offset);
        let size = match *size {
            LogSize::Exact => need.max(8),
            LogSize::Less(n) => need.saturating_sub(n as u64).max(1),
            LogSize::Words(w) => w as u64 * 8,
            LogSize::Raw(r) => r,
        };
        let fi = match *file {
            LogFileSel::Existing(i) if !self.files.is_empty() => i as usize % self.files.len(),
            LogFileSel::New(ref l) if self.files.len() < MAX_FILES => {
                self.new_log_file(fd_len(l, offset.saturating_add(size)))
            }
            LogFileSel::New(ref l) => {
                let i = size as usize % self.files.len();
                let _ = l;
                i
            }
            LogFileSel::Existing(_) => self.new_log_file(offset.saturating_add(size)),
        };
        let flen = self.files[fi].len;
        let region = VhostUserDirtyLogRegion {
            mmap_size: size,
            mmap_offset: offset,
            mmap_handle: self.files[fi].file.as_raw_fd(),
        };
        let s = self.session();
        let has_regions = !s.regions.is_empty();
        // Every byte of the log lies on a page that the fd reaches into.
        let backed = size > 0
            && offset
                .checked_add(size)
                .is_some_and(|e| flen > (e - 1) / PAGE * PAGE);
        let plainly_valid = size > 0
            && offset.is_multiple_of(PAGE)
            && offset.checked_add(size).is_some_and(|e| e <= flen)
            && size >= need;
        let ok = self
            .send("SET_LOG_BASE", false, |fe| fe.set_log_base(0, Some(region)))
            .is_some();
        if !ok {
            assert!(
                !(plainly_valid && has_regions),
                "a valid log ({size:#x} bytes at {offset:#x} of a {flen:#x}-byte fd, {need:#x} needed) was refused"
            );
            self.reached.hit("log-refused");
            return;
        }
        if !has_regions {
            // The stock handler maps the log but has no region to hand it to.
            self.reached.hit("log-without-regions");
            self.check_backend_log();
            return;
        }
        assert!(
            backed,
            "a log that its fd does not back was accepted: {size:#x} bytes at {offset:#x}, fd {flen:#x} bytes"
        );
        assert!(
            size >= need,
            "a log too small for guest memory was accepted: {size:#x} < {need:#x}"
        );
        if offset.saturating_add(size) > flen {
            self.reached.hit("log-accepted-ends-in-last-page");
        }
        let view = view_for(size, end);
        let all_dirty = self.session().unlogged;
        self.session().log = Some(AttachedLog {
            file: fi,
            offset,
            size,
            view,
            all_dirty,
        });
        self.reached.hit("log-attached");
        if view < size {
            self.reached.hit("log-view-smaller");
        }
        if std::mem::take(&mut self.session().unlogged) {
            // Every page of the new log's view (all guest memory; as far as the fd reaches)
            // is marked on attach.
            // With `VDL_FUZZ_TOLERATE_F6=1`, only the view the first region needs must be
            // (finding F6, reported, not fixed yet: the rest may stay clear).
            let must_view = if tolerate_f6() {
                let first_end = self
                    .session()
                    .regions
                    .iter()
                    .min_by_key(|r| r.gpa)
                    .map_or(0, |r| r.gpa.saturating_add(r.size));
                view_for(size, first_end)
            } else {
                view
            };
            let lf = &mut self.files[fi];
            if must_view > 0 {
                lf.expect_bits(offset * 8, (offset + must_view) * 8 - 1, true);
            }
            lf.expect_bits(offset * 8, (offset + view) * 8 - 1, false);
            self.reached.hit("log-attached-after-unlogged-writes");
            self.check_range(fi, offset, offset + view);
        }
        self.apply_carried();
        self.check_backend_log();
    }

    /// After an accepted memory message: the backend widens the log's view to the memory's end
    /// (as far as the mapping reaches), which marks the carried pages it now covers.
    fn memory_changed(&mut self) {
        let s = self.session();
        if let Some(l) = s.log.as_mut() {
            let end = s
                .regions
                .iter()
                .map(|r| r.gpa.saturating_add(r.size))
                .max()
                .unwrap_or(0);
            let view = view_for(l.size, end);
            if view > l.view {
                let old_view = l.view;
                l.view = view;
                let l = *l;
                self.reached.hit("log-view-widened");
                if l.all_dirty {
                    // The new part of an all-dirty log's view is marked whole on widening.
                    self.files[l.file].expect_bits(
                        (l.offset + old_view) * 8,
                        (l.offset + view) * 8 - 1,
                        true,
                    );
                    self.reached.hit("all-dirty-log-widened");
                }
                self.apply_carried();
            }
        }
        self.check_backend_log();
    }

    /// The current log (or view) was just put to use: every carried page it covers must be set
    /// in it, the pages the backend may over-mark may be; the rest stays carried.
    fn apply_carried(&mut self) {
        let s = self.session.as_mut().expect("a live session");
        let Some(l) = s.log else { return };
        let pages = l.view * 8;
        let must = s.carry_must.below(pages);
        let may = s.carry_may.below(pages);
        s.carry_must.remove_below(pages);
        s.carry_may.remove_below(pages);
        let (must_left, may_left) = (!s.carry_must.is_empty(), !s.carry_may.is_empty());
        let before = s.stats.carried_ranges;
        let now = s.backend.log().stats().carried_ranges;
        s.stats.carried_ranges = now;
        let lf = &mut self.files[l.file];
        for (set, is_must) in [(&must, true), (&may, false)] {
            for &(a, b) in set {
                lf.expect_bits(l.offset * 8 + a, l.offset * 8 + b, is_must);
            }
        }
        if !must.is_empty() {
            self.reached.hit("carry-marked");
            if self.fault == Fault::DropCarried {
                self.fault = Fault::None;
                use std::os::unix::fs::FileExt;
                let bit = l.offset * 8 + must[0].0;
                let mut b = [0u8];
                lf.file.read_exact_at(&mut b, bit / 8).unwrap();
                b[0] &= !(1 << (bit % 8));
                lf.file.write_all_at(&b, bit / 8).unwrap();
            }
            self.check_file(l.file);
        }
        if must_left {
            self.reached.hit("carry-still-past");
        }
        assert!(
            now <= before,
            "carried_ranges rose from {before} to {now} on an attach"
        );
        assert!(
            !must_left || now >= 1,
            "pages still past the end of the log but nothing carried"
        );
        assert!(
            may_left || now == 0,
            "{now} ranges carried, but the log covers every one"
        );
    }

    fn new_log_file(&mut self, len: u64) -> usize {
        let len = len.min(MIB);
        self.files.push(LogFile {
            file: memfd(len),
            len,
            must: vec![0; len as usize],
            may: vec![0; len as usize],
        });
        self.files.len() - 1
    }

    /// The backend's current log is the one the model says.
    fn check_backend_log(&mut self) {
        let s = self.session();
        let got = s
            .backend
            .log()
            .region()
            .map(|r| (r.len_bytes() as u64, r.capacity_bytes() as u64));
        let want = s.log.map(|l| (l.view, l.size));
        assert_eq!(
            got, want,
            "the backend's current log (view, mapping length)"
        );
    }

    fn write(&mut self, gpa: &WriteGpa, len: u64) {
        let s = self.session.as_ref().expect("a live session");
        let gpa = match *gpa {
            WriteGpa::In { which, offset } if !s.regions.is_empty() => {
                let r = &s.regions[which as usize % s.regions.len()];
                r.gpa + offset as u64 % r.size
            }
            WriteGpa::End { which, back } if !s.regions.is_empty() => {
                let r = &s.regions[which as usize % s.regions.len()];
                r.end().saturating_sub(back as u64)
            }
            WriteGpa::In { offset, .. } => offset as u64,
            WriteGpa::End { back, .. } => back as u64,
            WriteGpa::Raw(g) => g,
        };
        // What vm-memory writes: region by region from `gpa` while they are contiguous.
        let end = gpa.saturating_add(len);
        let mut pieces = Vec::new();
        let mut a = gpa;
        while a < end {
            let Some(r) = s.regions.iter().find(|r| a >= r.gpa && a < r.end()) else {
                break;
            };
            let e = end.min(r.end());
            if e > r.gpa + r.backed && !unbacked() {
                // The region has no file behind this part: a real device would get SIGBUS
                // (see the module docs). Not generated unless asked for.
                self.reached.hit("write-skipped-unbacked");
                return;
            }
            pieces.push((a, e));
            a = e;
        }
        let complete = a == end && gpa.checked_add(len).is_some();
        let buf = vec![0x5a; len as usize];
        let res = s.mem.memory().write_slice(&buf, GuestAddress(gpa));
        assert_eq!(
            res.is_ok(),
            complete,
            "write_slice({gpa:#x}, {len}): {res:?}, pieces {pieces:?}"
        );
        if pieces.is_empty() {
            return;
        }
        self.reached.hit("write");

        let stats = s.backend.log().stats();
        let before = s.stats;
        let (logging, log) = (s.logging, s.log);
        let mut oor = 0u64;
        let mut without_log = false;
        let mut marked = false;
        if logging {
            match log {
                None => without_log = true,
                Some(l) => {
                    let pages = l.view * 8;
                    let lf = &mut self.files[l.file];
                    let s = self.session.as_mut().expect("a live session");
                    for &(a, e) in &pieces {
                        let (fp, lp) = (a / PAGE, (e - 1) / PAGE);
                        if lp >= pages {
                            oor += lp - fp.max(pages) + 1;
                            s.carry_must.add(fp.max(pages), lp);
                            s.carry_may.add(fp, lp);
                        }
                        if fp < pages {
                            let (b0, b1) = (l.offset * 8 + fp, l.offset * 8 + lp.min(pages - 1));
                            marked |= lf.expect_bits(b0, b1, true);
                        }
                    }
                    self.reached.hit("write-logged");
                    if oor > 0 {
                        self.reached.hit("write-past-log");
                    }
                }
            }
        }
        let s = self.session();
        if oor > 0 {
            assert!(
                stats.out_of_range_pages >= before.out_of_range_pages + oor,
                "pages past the log not counted: {stats:?}, before {before:?}, {oor} expected"
            );
        } else {
            assert_eq!(
                stats.out_of_range_pages, before.out_of_range_pages,
                "out-of-range pages counted for a write inside the log"
            );
        }
        assert_eq!(
            stats.marks_without_log > before.marks_without_log,
            without_log,
            "marks without a log: {stats:?}, before {before:?}"
        );
        if oor > 0 {
            // Carried: `carried_ranges` falls on a write only when the handle, holding 256
            // ranges, merges them into their hull; only then may the hull be over-marked.
            let (was, now) = (before.carried_ranges, stats.carried_ranges);
            assert!(
                (1..=256).contains(&now),
                "carried_ranges {now} after a write past the log"
            );
            if now < was {
                assert!(
                    was == 256 && now == 1,
                    "carried_ranges fell from {was} to {now}"
                );
                s.carry_may.hull();
                self.reached.hit("carry-merged");
            }
        } else {
            assert_eq!(
                stats.carried_ranges, before.carried_ranges,
                "carried_ranges changed"
            );
        }
        let s = self.session();
        s.stats = stats;
        s.unlogged |= without_log;
        if let Some(l) = log.filter(|_| logging) {
            if self.fault == Fault::WipeLog && marked {
                self.fault = Fault::None;
                use std::os::unix::fs::FileExt;
                let lf = &self.files[l.file];
                lf.file.write_all_at(&vec![0; lf.len as usize], 0).unwrap();
            }
            // The bytes this write marked (the whole file is checked at the end of the input).
            for &(a, e) in &pieces {
                let lo = l.offset.saturating_add(a / PAGE / 8);
                let hi = l.offset.saturating_add((e - 1) / PAGE / 8 + 1);
                self.check_range(l.file, lo, hi);
            }
        }
    }

    /// Every byte of log file `fi`: must ⊆ content ⊆ may.
    fn check_file(&self, fi: usize) {
        let lf = &self.files[fi];
        self.check_bytes(fi, 0, &file_bytes(&lf.file));
    }

    /// Bytes `[lo, hi)` of log file `fi` (clipped to the file).
    fn check_range(&self, fi: usize, lo: u64, hi: u64) {
        use std::os::unix::fs::FileExt;
        let lf = &self.files[fi];
        let (lo, hi) = (lo.min(lf.len), hi.min(lf.len));
        let mut got = vec![0u8; (hi - lo) as usize];
        lf.file.read_exact_at(&mut got, lo).expect("pread");
        self.check_bytes(fi, lo as usize, &got);
    }

    fn check_bytes(&self, fi: usize, lo: usize, got: &[u8]) {
        let lf = &self.files[fi];
        let (must, may) = (&lf.must[lo..lo + got.len()], &lf.may[lo..lo + got.len()]);
        // Fast path (a `memcmp`, outside the sanitizer's and the fuzzer's instrumentation):
        // the model keeps `must ⊆ may`, so content equal to either bound is within both.
        if got == must || got == may {
            return;
        }
        for (i, ((&g, &must), &may)) in got.iter().zip(must).zip(may).enumerate() {
            let k = lo + i;
            if g & !may != 0 || must & !g != 0 {
                panic!(
                    "log file {fi}, byte {k:#x} (pages {}..{} of a log at offset 0): got {g:#010b}, \
                     must have {must:#010b}, may have {may:#010b}",
                    k * 8,
                    k * 8 + 8
                );
            }
        }
    }

    fn check_all_files(&self) {
        for fi in 0..self.files.len() {
            self.check_file(fi);
        }
    }
}

/// Regions the stock handler has no reason to refuse: small, page-aligned offsets, fully backed
/// fds, no overlap, no overflow.
fn plainly_valid(regions: &[Region]) -> bool {
    plainly_valid_refs(&regions.iter().collect::<Vec<_>>())
}

fn plainly_valid_refs(regions: &[&Region]) -> bool {
    regions.iter().all(|r| {
        r.size <= 64 * MIB
            && r.offset % PAGE == 0
            && r.backed == r.size
            && r.gpa.checked_add(r.size).is_some()
    }) && regions.iter().enumerate().all(|(i, a)| {
        regions
            .iter()
            .skip(i + 1)
            .all(|b| a.end() <= b.gpa || b.end() <= a.gpa)
    })
}
