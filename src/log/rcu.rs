//! A minimal read-copy-update scheme for the mark path (the "membarrier" flavour of userspace
//! RCU).
//!
//! Why not `arc-swap` alone: its `load` claims a debt slot with a locked exchange and releases
//! it with a compare-exchange. Those two extra atomic read-modify-writes per mark made an 8-byte
//! mark slower than vhost-user-backend's `RwLock` path, and each one drains the CPU's store
//! buffer right after the device's data copy. Here a reader only does two plain stores to its
//! own cache line; all the cost of ordering moves to the writer (`synchronize`), which runs
//! once per `SET_LOG_BASE`.
//!
//! How it works:
//! - Every thread that reads owns a [`Slot`] with a sequence number: odd while it is inside a
//!   read section, even outside. Only the owner writes it (plain stores, no RMW).
//! - The writer publishes the new pointer (SeqCst swap), then calls `membarrier(2)`
//!   (`MEMBARRIER_CMD_PRIVATE_EXPEDITED`), which runs a full memory barrier on every CPU running
//!   a thread of this process. After it, any reader that loaded the *old* pointer has its odd
//!   sequence number visible to the writer, and any reader that has not yet loaded will see the
//!   new pointer. The writer then waits for each slot that was odd to change.
//! - Where `membarrier` is unavailable, readers add a SeqCst fence after announcing themselves
//!   (the classic, slower, symmetric scheme) and `synchronize` is still correct.
//!
//! Slots are pooled: a thread takes one on its first read and returns it when it exits, so the
//! pool is bounded by the largest number of threads that were alive at once.

use std::cell::Cell;
use std::sync::atomic::{compiler_fence, AtomicBool as StdAtomicBool, Ordering};
use std::sync::Once;

use super::sync::{fence, spin_wait, AtomicBool, AtomicU64, Mutex};

/// One reader's sequence number, alone on its cache line.
#[repr(align(128))]
struct Slot {
    seq: AtomicU64,
    in_use: AtomicBool,
}

/// All slots ever created (leaked: they live as long as the process, and are reused).
#[cfg(not(loom))]
static SLOTS: Mutex<Vec<&'static Slot>> = Mutex::new(Vec::new());
// Under loom the registry must be created anew in each explored execution.
#[cfg(loom)]
loom::lazy_static! {
    static ref SLOTS: Mutex<Vec<&'static Slot>> = Mutex::new(Vec::new());
}

struct SlotRef(&'static Slot);

impl SlotRef {
    fn acquire() -> SlotRef {
        let mut slots = SLOTS.lock().unwrap_or_else(|e| e.into_inner());
        for s in slots.iter() {
            if s.in_use
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                return SlotRef(s);
            }
        }
        let s: &'static Slot = Box::leak(Box::new(Slot {
            seq: AtomicU64::new(0),
            in_use: AtomicBool::new(true),
        }));
        slots.push(s);
        SlotRef(s)
    }
}

impl Drop for SlotRef {
    fn drop(&mut self) {
        // The thread is exiting, so it is outside any read section: seq is even.
        let _ = SLOT_PTR.try_with(|p| p.set(None));
        self.0.in_use.store(false, Ordering::Release);
    }
}

#[cfg(not(loom))]
thread_local! {
    /// This thread's slot, for the fast path: const-initialised and without a destructor, so
    /// reading it is a plain thread-local load.
    static SLOT_PTR: Cell<Option<&'static Slot>> = const { Cell::new(None) };
    /// Owns the slot and gives it back when the thread exits.
    static SLOT_OWNER: SlotRef = SlotRef::acquire();
}
#[cfg(loom)]
loom::thread_local! {
    static SLOT_PTR: Cell<Option<&'static Slot>> = Cell::new(None);
    static SLOT_OWNER: SlotRef = SlotRef::acquire();
}

#[cold]
#[inline(never)]
fn this_thread_slot() -> &'static Slot {
    let slot = SLOT_OWNER.with(|o| o.0);
    SLOT_PTR.with(|p| p.set(Some(slot)));
    slot
}

/// Whether `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)` is registered and usable.
static MEMBARRIER: StdAtomicBool = StdAtomicBool::new(false);
static REGISTER: Once = Once::new();

const MEMBARRIER_CMD_PRIVATE_EXPEDITED: libc::c_long = 1 << 3;
const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED: libc::c_long = 1 << 4;

/// Registers this process for expedited membarriers (once). Must run before the first reader
/// relies on the writer-side barrier; [`crate::log::DirtyLog::new`] calls it.
///
/// Under `cfg(loom)` it registers nothing: loom cannot model `membarrier(2)`, so readers take
/// the SeqCst-fence path (the one used on kernels without membarrier).
pub(crate) fn init() {
    if cfg!(loom) {
        return;
    }
    REGISTER.call_once(|| {
        // SAFETY: membarrier takes plain integer arguments and touches no user memory.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_membarrier,
                MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED,
                0,
                0,
            )
        };
        if rc == 0 {
            MEMBARRIER.store(true, Ordering::SeqCst);
        } else {
            log::warn!(
                "membarrier(2) unavailable ({}); the mark path falls back to a SeqCst fence",
                std::io::Error::last_os_error()
            );
        }
    });
}

/// A full memory barrier on every thread of this process.
pub(crate) fn process_barrier() {
    init();
    fence(Ordering::SeqCst);
    if MEMBARRIER.load(Ordering::Relaxed) {
        // SAFETY: as in `init`; no memory arguments.
        let rc =
            unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_PRIVATE_EXPEDITED, 0, 0) };
        debug_assert_eq!(rc, 0);
    }
    fence(Ordering::SeqCst);
}

/// Runs `f` inside a read section: anything `f` loads from an RCU-published pointer stays
/// valid, and `synchronize` waits for `f` to finish if it may have seen the old value.
///
/// Read sections must not nest (`f` must not call `read`): the crate's only readers are the
/// mark path and short accessors, none of which call each other.
#[inline]
pub(crate) fn read<R>(f: impl FnOnce() -> R) -> R {
    let slot = match SLOT_PTR.with(|p| p.get()) {
        Some(s) => s,
        None => this_thread_slot(),
    };
    {
        let s = &slot.seq;
        let v = s.load(Ordering::Relaxed);
        debug_assert!(v & 1 == 0, "nested RCU read section");
        // Release, not Relaxed: the writer may miss our previous exit store (`v`) and first
        // see this one; it must still synchronise with everything the previous section did
        // (C++20 release sequences no longer extend through later plain stores). Found by
        // `tests/loom.rs::replace_vs_mark_grace_period`. On x86 this is the same `mov`.
        s.store(v + 1, Ordering::Release);
        if MEMBARRIER.load(Ordering::Relaxed) {
            // The writer's membarrier orders this store before our pointer load.
            compiler_fence(Ordering::SeqCst);
        } else {
            fence(Ordering::SeqCst);
        }
        let r = f();
        // Release: everything `f` did (the marks) happens-before the writer seeing us out.
        s.store(v + 2, Ordering::Release);
        r
    }
}

/// Waits until every read section that may have observed a pointer value replaced before
/// this call has finished.
pub(crate) fn synchronize() {
    process_barrier();
    let slots: Vec<&'static Slot> = SLOTS.lock().unwrap_or_else(|e| e.into_inner()).clone();
    for s in slots {
        let v = s.seq.load(Ordering::Acquire);
        if v & 1 == 0 {
            continue;
        }
        let mut spins = 0u32;
        while s.seq.load(Ordering::Acquire) == v {
            spin_wait(&mut spins);
        }
    }
    fence(Ordering::Acquire);
}
