//! The synchronisation primitives of the log core, in one place, so the concurrency model
//! checks (`tests/loom.rs`) can run the *real* algorithms on loom's instrumented types.
//!
//! In every normal build these are plain re-exports of `std` (no wrapper, no cost): the mark
//! path compiles to exactly the same code as if it named `std::sync::atomic` directly. Only
//! with `RUSTFLAGS="--cfg loom"` do they become `loom`'s, and then:
//! - `OnceLock` is a small loom-visible equivalent of `std::sync::OnceLock` (an atomic state,
//!   Release when the value is published, Acquire when it is read: the orderings of std's), so
//!   the binding handshake in `bitmap.rs` is explored against loom's memory model;
//! - [`spin_wait`] yields to loom's scheduler instead of spinning;
//! - the RCU read side takes its SeqCst-fence path (loom cannot model `membarrier(2)`), see
//!   `rcu.rs`.

#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{fence, AtomicBool, AtomicPtr, AtomicU64, AtomicU8};
#[cfg(not(loom))]
pub(crate) use std::sync::{Mutex, OnceLock};

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{fence, AtomicBool, AtomicPtr, AtomicU64, AtomicU8};
#[cfg(loom)]
pub(crate) use loom::sync::Mutex;
#[cfg(loom)]
pub(crate) use once::OnceLock;

/// One step of a wait loop: spin briefly, then give the CPU away (under loom: always yield to
/// the model's scheduler, which is how loom explores the other threads' progress).
#[inline]
pub(crate) fn spin_wait(spins: &mut u32) {
    #[cfg(not(loom))]
    {
        *spins += 1;
        if *spins < 128 {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
    #[cfg(loom)]
    {
        *spins += 1;
        loom::thread::yield_now();
    }
}

#[cfg(loom)]
mod once {
    use loom::cell::UnsafeCell;
    use loom::sync::atomic::{AtomicU8, Ordering};

    const EMPTY: u8 = 0;
    const BUSY: u8 = 1;
    const DONE: u8 = 2;

    /// `std::sync::OnceLock`'s contract on loom's types: the value is written once, then
    /// published with a Release store; `get` reads it after an Acquire load.
    pub(crate) struct OnceLock<T> {
        state: AtomicU8,
        value: UnsafeCell<Option<T>>,
    }

    // SAFETY: the value is written only by the one thread that moved `state` from EMPTY to BUSY,
    // before it stores DONE with Release, and read only after an Acquire load of DONE; it is
    // never written again. Shared access therefore never races, and handing out `&T` to several
    // threads needs `T: Sync` (and `T: Send`, as the initialising thread may not be the one that
    // drops it).
    unsafe impl<T: Send + Sync> Sync for OnceLock<T> {}

    impl<T> Default for OnceLock<T> {
        fn default() -> Self {
            OnceLock {
                state: AtomicU8::new(EMPTY),
                value: UnsafeCell::new(None),
            }
        }
    }

    impl<T> OnceLock<T> {
        pub(crate) fn get(&self) -> Option<&T> {
            if self.state.load(Ordering::Acquire) != DONE {
                return None;
            }
            // SAFETY: DONE is stored with Release after the value was written and the value is
            // never written again, so this Acquire reader sees it complete and unaliased by any
            // writer; the reference lives as long as `self`.
            self.value.with(|p| unsafe { (*p).as_ref() })
        }

        pub(crate) fn get_or_init(&self, f: impl FnOnce() -> T) -> &T {
            if let Some(v) = self.get() {
                return v;
            }
            if self
                .state
                .compare_exchange(EMPTY, BUSY, Ordering::Acquire, Ordering::Acquire)
                .is_ok()
            {
                let v = f();
                // SAFETY: this thread won EMPTY -> BUSY; until it stores DONE no other thread
                // reads or writes the value.
                self.value.with_mut(|p| unsafe { *p = Some(v) });
                self.state.store(DONE, Ordering::Release);
            } else {
                while self.state.load(Ordering::Acquire) != DONE {
                    loom::thread::yield_now();
                }
            }
            self.get().expect("published above")
        }
    }
}
