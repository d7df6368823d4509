//! Flip sync: a pair of logs handed to the backend in turn (cloud-hypervisor's way); see
//! [`LogFlip`].

use std::time::{Duration, Instant};

use vhost::VhostUserDirtyLogRegion;

use super::{MigrationBitmap, SharedLog, VmmError};

/// Where a [`LogFlip`] is in its round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlipState {
    /// The active log is attached (or about to be); the standby log is clean.
    Idle,
    /// The standby log was handed out by [`LogFlip::begin`]; its `SET_LOG_BASE` is in flight.
    Pending,
    /// The backend switched: the previous log is retired and waits for
    /// [`LogFlip::merge_retired`].
    Retired,
}

impl FlipState {
    fn name(self) -> &'static str {
        match self {
            FlipState::Idle => "idle",
            FlipState::Pending => "pending",
            FlipState::Retired => "retired",
        }
    }
}

/// What one [`LogFlip::flip`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FlipStats {
    /// Pages the merge found newly dirty in the bitmap.
    pub newly_dirty: u64,
    /// Time spent in the caller's send closure (the `SET_LOG_BASE` round trip).
    pub send: Duration,
    /// Time the merge and clear of the retired log took.
    pub merge: Duration,
}

/// Flip sync: two logs, handed to the backend in turn, so the VMM reads a log nobody writes.
///
/// The swap sync ([`MigrationBitmap::sync_from_log`]) consumes the log the backend is writing,
/// so every dirty word costs one atomic swap (DESIGN.md invariant 3). cloud-hypervisor's VMM
/// does it the other way round: every round it gives the backend a *fresh* log with
/// `VHOST_USER_SET_LOG_BASE` and, once the backend has replied, reads the previous log with
/// plain loads. No swap is needed because no one can write that log any more: a backend replies
/// to `SET_LOG_BASE` only after it stopped writing the old log (this crate's backend:
/// `DirtyLog::replace_region` returns after an RCU grace period over every mark in flight).
///
/// [`LogFlip`] keeps a pair of [`SharedLog`]s: the *active* one (attached to the backend) and
/// the *standby* one (clean, attached nowhere). One round:
///
/// 1. [`begin`](Self::begin) returns the standby log's [`VhostUserDirtyLogRegion`];
/// 2. the caller sends it with `SET_LOG_BASE` to **every** backend sharing the log and waits
///    for each reply (vhost's `Frontend::set_log_base` does, with `PROTOCOL_F_LOG_SHMFD`);
/// 3. [`commit`](Self::commit): the standby becomes active, the old active log is *retired*
///    ([`abort`](Self::abort) instead if a send failed: nothing changes);
/// 4. [`merge_retired`](Self::merge_retired) ORs the retired log into the
///    [`MigrationBitmap`] with plain loads and clears exactly its dirty words with plain stores
///    (the merge loop of `merge_lebitmap`), after which it is the clean standby for the next
///    round.
///
/// [`flip`](Self::flip) does the four steps around a closure that sends and waits, and
/// times the round trip and the merge separately ([`FlipStats`]).
///
/// ## Why plain stores, not a hole punch
/// Clearing only the dirty words costs one store per dirty word, inside the merge loop where
/// the line is already in cache. Punching the log's pages out of the memfd
/// (`fallocate(PUNCH_HOLE)`, `MADV_REMOVE`) would be cheaper for the VMM only on a dense log,
/// and it moves the cost into the backend: its mapping loses the pages it proved backed at
/// `SET_LOG_BASE` (`MADV_POPULATE_WRITE`), so the next marks take page faults on the dataplane.
/// So there is no hole punch.
///
/// ## Invariant 3, restated
/// A log bit is cleared only by an atomic swap that returns it, or after its log was retired by
/// a replied `SET_LOG_BASE`. `LogFlip` enforces the order of the steps (each step in the wrong
/// state is a [`VmmError::FlipOrder`], never a panic), but it cannot see the reply: calling
/// [`commit`](Self::commit) before every backend replied is the one way to lose marks with
/// this type. The standby log is never cleared while attached: it is handed out clean and only
/// cleared after it was retired again.
///
/// ## Memory hotplug
/// [`grow`](Self::grow) raises the guest-physical end the logs must cover. The standby log
/// is replaced at once (nothing has it); the active one cannot be resized under the backend,
/// so it is replaced when it comes back retired, after its merge. One flip after `grow`, the
/// backend writes a log that covers the new memory; grow the [`MigrationBitmap`] *before* the
/// merge that needs it: a retired log with marks past the end of the bitmap is refused
/// ([`VmmError::LogPastBitmap`]) and kept, so no mark is dropped.
///
/// ```no_run
/// # fn example(
/// #     frontend: &vhost::vhost_user::Frontend,
/// #     bitmap: &vhost_dirtylog::vmm::MigrationBitmap,
/// # ) -> Result<(), Box<dyn std::error::Error>> {
/// use vhost::VhostBackend;
/// use vhost_dirtylog::vmm::LogFlip;
///
/// let mut logs = LogFlip::new(64 << 30)?;
/// frontend.set_log_base(0, Some(logs.active().dirty_log_region()))?; // before LOG_ALL
/// // ... every pre-copy round:
/// let round = logs.flip(bitmap, |next| frontend.set_log_base(0, Some(next)))?;
/// println!("{} new pages; SET_LOG_BASE {:?}, merge {:?}", round.newly_dirty, round.send, round.merge);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct LogFlip {
    logs: [SharedLog; 2],
    /// Index of the log the backend writes (or will, once the first `SET_LOG_BASE` is sent).
    active: usize,
    state: FlipState,
    /// The guest-physical end every log must cover (raised by [`grow`](Self::grow)).
    gpa_end: u64,
    /// A flip was aborted, so the backend may have switched to the standby log after all (a
    /// lost reply): the standby must not be replaced (dropped) until it is retired again.
    standby_exposed: bool,
}

impl LogFlip {
    /// Two zeroed logs covering guest-physical addresses `[0, gpa_end)`. Send
    /// [`active`](Self::active)'s region with the first `SET_LOG_BASE`.
    ///
    /// Errors: as [`SharedLog::new`].
    pub fn new(gpa_end: u64) -> Result<Self, VmmError> {
        Ok(LogFlip {
            logs: [SharedLog::new(gpa_end)?, SharedLog::new(gpa_end)?],
            active: 0,
            state: FlipState::Idle,
            gpa_end,
            standby_exposed: false,
        })
    }

    /// The log the backend writes. A swap sync of it
    /// ([`MigrationBitmap::sync_from_log`]) is always safe, e.g. for a last round without a
    /// flip.
    pub fn active(&self) -> &SharedLog {
        &self.logs[self.active]
    }

    /// The other log: clean and attached nowhere when [`Idle`](FlipState::Idle), handed out
    /// when [`Pending`](FlipState::Pending), retired when [`Retired`](FlipState::Retired).
    pub fn standby(&self) -> &SharedLog {
        &self.logs[1 - self.active]
    }

    /// Where the round stands.
    pub fn state(&self) -> FlipState {
        self.state
    }

    /// The guest-physical end the logs are made (or being replaced) for.
    pub fn gpa_end(&self) -> u64 {
        self.gpa_end
    }

    /// Guest pages below [`gpa_end`](Self::gpa_end): the size the [`MigrationBitmap`] needs.
    pub fn guest_pages(&self) -> u64 {
        self.gpa_end.div_ceil(1 << crate::log::LOG_PAGE_SHIFT)
    }

    fn expect(&self, want: FlipState, op: &'static str) -> Result<(), VmmError> {
        if self.state != want {
            return Err(VmmError::FlipOrder {
                op,
                state: self.state.name(),
            });
        }
        Ok(())
    }

    /// Step 1: the standby log's region, to send with `SET_LOG_BASE`. Idle → pending.
    ///
    /// Errors: not idle ([`VmmError::FlipOrder`]); replacing a standby log that is too small
    /// after [`grow`](Self::grow) failed (then nothing changed).
    pub fn begin(&mut self) -> Result<VhostUserDirtyLogRegion, VmmError> {
        self.expect(FlipState::Idle, "begin")?;
        let s = 1 - self.active;
        if self.logs[s].gpa_end() < self.gpa_end && !self.standby_exposed {
            self.logs[s] = SharedLog::new(self.gpa_end)?;
        }
        self.state = FlipState::Pending;
        Ok(self.logs[s].dirty_log_region())
    }

    /// Step 3: every backend replied to `SET_LOG_BASE` with [`begin`](Self::begin)'s region.
    /// The standby log becomes active; the previous one is retired. Pending → retired.
    ///
    /// Contract: only after the replies. A backend that may still write the retired log
    /// breaks invariant 3 (its late marks can be erased by the merge's plain clear).
    pub fn commit(&mut self) -> Result<(), VmmError> {
        self.expect(FlipState::Pending, "commit")?;
        self.active = 1 - self.active;
        self.state = FlipState::Retired;
        self.standby_exposed = false;
        Ok(())
    }

    /// A `SET_LOG_BASE` failed or was not sent: the backend keeps the active log. Pending →
    /// idle. A backend that did switch (its reply was lost) loses nothing either: the standby
    /// log is handed out again next round and is neither cleared nor replaced (even after
    /// [`grow`](Self::grow)) until a committed flip has retired it.
    pub fn abort(&mut self) -> Result<(), VmmError> {
        self.expect(FlipState::Pending, "abort")?;
        self.state = FlipState::Idle;
        self.standby_exposed = true;
        Ok(())
    }

    /// Step 4: ORs the retired log into `bitmap` (log page `i` = bitmap page `i`) with plain
    /// loads, clears exactly the merged bits with plain stores, and returns the number of
    /// newly dirty pages. The log becomes the clean standby (replaced by a larger one if
    /// [`grow`](Self::grow) asked for it). Retired → idle.
    ///
    /// Errors: not retired; the retired log has marks past the end of `bitmap`
    /// ([`VmmError::LogPastBitmap`]: grow the bitmap and call again; nothing was merged or
    /// cleared); a replacement log cannot be created (the merge is done, the old log stays
    /// as the standby and is replaced at the next [`begin`](Self::begin)).
    pub fn merge_retired(&mut self, bitmap: &MigrationBitmap) -> Result<u64, VmmError> {
        self.expect(FlipState::Retired, "merge_retired")?;
        let r = 1 - self.active;
        let log = self.logs[r].region();
        let pages = bitmap.pages();
        if let Some(page) = first_set_at_or_after(log, pages) {
            return Err(VmmError::LogPastBitmap {
                page,
                bitmap_pages: pages,
            });
        }
        let newly = bitmap.merge_retired(log, 0);
        self.state = FlipState::Idle;
        if self.logs[r].gpa_end() < self.gpa_end {
            self.logs[r] = SharedLog::new(self.gpa_end)?;
        }
        Ok(newly)
    }

    /// One whole round: [`begin`](Self::begin), `send(region)` (send `SET_LOG_BASE` to every
    /// backend and wait for the replies), [`commit`](Self::commit) and
    /// [`merge_retired`](Self::merge_retired). If `send` fails the flip is
    /// [aborted](Self::abort) and its error returned as [`VmmError::SetLogBase`].
    ///
    /// Errors: `send`'s, and those of the steps.
    pub fn flip<E>(
        &mut self,
        bitmap: &MigrationBitmap,
        send: impl FnOnce(VhostUserDirtyLogRegion) -> Result<(), E>,
    ) -> Result<FlipStats, VmmError>
    where
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let region = self.begin()?;
        let t0 = Instant::now();
        if let Err(e) = send(region) {
            self.abort()?;
            return Err(VmmError::SetLogBase(e.into()));
        }
        let send = t0.elapsed();
        self.commit()?;
        let t1 = Instant::now();
        let newly_dirty = self.merge_retired(bitmap)?;
        Ok(FlipStats {
            newly_dirty,
            send,
            merge: t1.elapsed(),
        })
    }

    /// Memory hotplug: from now on the logs cover `[0, gpa_end)`. A smaller or equal
    /// `gpa_end` changes nothing. When idle the standby log is replaced at once; the active
    /// log is replaced after the next flip retires and merges it (see the
    /// [type docs](LogFlip)).
    ///
    /// Errors: as [`SharedLog::new`] (then nothing changed); a flip is pending (its
    /// `SET_LOG_BASE` is in flight with the old standby: grow after commit or abort).
    pub fn grow(&mut self, gpa_end: u64) -> Result<(), VmmError> {
        if gpa_end <= self.gpa_end {
            return Ok(());
        }
        self.expect_not_pending()?;
        let fresh = SharedLog::new(gpa_end)?;
        if self.state == FlipState::Idle && !self.standby_exposed {
            self.logs[1 - self.active] = fresh;
        }
        self.gpa_end = gpa_end;
        Ok(())
    }

    fn expect_not_pending(&self) -> Result<(), VmmError> {
        if self.state == FlipState::Pending {
            return Err(VmmError::FlipOrder {
                op: "grow",
                state: self.state.name(),
            });
        }
        Ok(())
    }
}

/// The first set bit of `log` at or after page `from`, if any (relaxed loads; the log is
/// retired, so nothing changes it).
fn first_set_at_or_after(log: &crate::log::LogRegion, from: u64) -> Option<u64> {
    use std::sync::atomic::Ordering::Relaxed;
    let words = log.words();
    let whole = words.len() as u64 * 64;
    let mut p = from;
    while p < whole {
        let w = words[(p / 64) as usize].load(Relaxed) & (!0u64 << (p % 64));
        if w != 0 {
            return Some(p / 64 * 64 + w.trailing_zeros() as u64);
        }
        p = (p / 64 + 1) * 64;
    }
    let tail = log.tail();
    let mut p = from.max(whole);
    while p < log.pages() {
        let k = p - whole;
        if tail[(k / 8) as usize].load(Relaxed) & (1 << (k % 8)) != 0 {
            return Some(p);
        }
        p += 1;
    }
    None
}
