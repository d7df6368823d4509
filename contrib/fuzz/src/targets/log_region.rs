//! `log_region`: the backend's log handle and the VMM's sync against a byte-level model.
//!
//! An input is a sequence of operations on one [`DirtyLog`] (the backend side) and one
//! [`MigrationBitmap`] (the VMM side):
//! - attach a log with [`LogRegion::from_fd`] on a memfd of arbitrary length, at an arbitrary
//!   offset and size (including hostile ones: zero, overflowing, misaligned, past the end of the
//!   file); the expected outcome (which error, or success) is computed independently;
//! - detach; switch LOG_ALL; mark arbitrary `(gpa, len)` pairs (any `u64`s);
//! - VMM side, on any log attached so far (current or retired): `sync_from_log`, deferred
//!   `fetch_log` + `clear_fetched` / `FetchedLog::clear_pages` (arbitrary chunks), a clear with
//!   the wrong log, and `test_and_clear` as a sender would.
//!
//! The model keeps the expected content of every memfd byte by byte and the expected migration
//! bitmap. After every operation the handle's `stats()` must equal the model's counters; after
//! every VMM operation, the synced file and the bitmap must equal the model exactly. So: every
//! in-range page marked while logging was on with a log attached is found by the sync (or stays
//! in the log, if it maps past the bitmap); out-of-range pages are counted and never written;
//! nothing else is ever set, in the log range or anywhere else in the file.
//!
//! Marks past the end of the log while logging (memory added past the log before the frontend
//! sends a bigger one) are counted *and carried*: the model keeps the pages such a mark reached
//! past the end of the log it was made into (`must`), and the next log attached with
//! `replace_region` must have every one of them that it covers set (checked right after the
//! attach, and by every later comparison of the file); what it does not cover stays carried
//! for the log after it. Over-marking is allowed in exactly two places, both a superset of
//! `must` kept as `may`:
//! - the head of a mark that straddles the end of the log (pages it covered, which were written
//!   with logging on and set in that log too): the handle carries the whole range of the mark;
//! - the hull of the carried ranges when the handle merged them because it already held
//!   `MAX_CARRIED` (256) ranges: observed as `stats().carried_ranges` falling from 256 to 1 on
//!   a mark, and allowed only then, and only inside the hull.
//!
//! Right after an attach, the new log's bits at `may`-but-not-`must` pages are read back (either
//! value is correct) and adopted into the model, so the model is exact again from there on.
//! `carried_ranges` is checked against the model: 0 when nothing may be carried, at least 1
//! when something must be, never above 256, never falling on a mark except by that merge, and
//! never rising on an attach.

use std::fs::File;
use std::os::fd::AsFd;
use std::sync::Arc;

use arbitrary::{Arbitrary, Unstructured};
use vhost_dirtylog::log::{DirtyLog, LogError, LogRegion, LogStats};
use vhost_dirtylog::vmm::{FetchedLog, MigrationBitmap, VmmError};

use super::{file_bytes, memfd, PageSet, Reached};

/// Largest log the target attaches successfully (bytes): 512 Ki pages, 2 GiB of guest memory.
pub const MAX_LOG: u64 = 64 * 1024;
const MAX_FILE: u64 = MAX_LOG + 4096;
const MAX_FILES: usize = 6;
const MAX_OPS: usize = 48;
const PAGE_SHIFT: u32 = 12;
/// Most ranges the handle carries before it merges them (`log::handle::MAX_CARRIED`).
pub const MAX_CARRIED: u64 = 256;

/// A fault injected behind the code's back, for the negative controls: the checks must fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// None: the real check.
    None,
    /// The first page a mark sets is cleared from the memfd.
    LoseMark,
    /// The first carried page the handle marks in a new log is cleared from the memfd right
    /// after the attach (as if the handle had dropped its carried marks).
    DropCarried,
}

/// One fuzz input.
#[derive(Arbitrary, Debug)]
pub struct Input {
    /// Size of the VMM's migration bitmap (reduced modulo a bound).
    pub bitmap_pages: u32,
    /// The operations, in order (at most `MAX_OPS` are run).
    pub ops: Vec<Op>,
}

/// Which memfd a log lives in.
#[derive(Arbitrary, Debug)]
pub enum FileSel {
    /// A new memfd of this many bytes (modulo a bound).
    New(u32),
    /// One made earlier (index modulo the count).
    Existing(u8),
}

/// A log offset inside its file.
#[derive(Arbitrary, Debug)]
pub enum Offset {
    /// Whole 8-byte words.
    Words(u16),
    /// Any byte (usually misaligned).
    Bytes(u16),
    /// Anything.
    Raw(u64),
}

/// A log size.
#[derive(Arbitrary, Debug)]
pub enum Size {
    /// Any small byte count (tail bytes when not a multiple of 8).
    Bytes(u16),
    /// Whole words.
    Words(u16),
    /// Anything.
    Raw(u64),
}

/// A guest-physical address to mark.
#[derive(Arbitrary, Debug)]
pub enum Gpa {
    /// Inside (or just past) the largest log.
    Page {
        /// Page number (reduced).
        page: u32,
        /// Byte offset inside the page (reduced).
        offset: u16,
    },
    /// Pages around the end of the current log.
    NearEnd {
        /// Page delta from the log's end.
        delta: i16,
        /// Byte offset inside the page (reduced).
        offset: u16,
    },
    /// Anything.
    Raw(u64),
}

/// A mark length.
#[derive(Arbitrary, Debug)]
pub enum Len {
    /// Short writes.
    Bytes(u16),
    /// Whole pages.
    Pages(u16),
    /// Anything.
    Raw(u64),
}

/// One operation.
#[derive(Arbitrary, Debug)]
pub enum Op {
    /// `LogRegion::from_fd` + `DirtyLog::replace_region` (SET_LOG_BASE).
    Attach {
        /// The memfd.
        file: FileSel,
        /// `mmap_offset`.
        offset: Offset,
        /// `mmap_size`.
        size: Size,
    },
    /// `replace_region(None)`.
    Detach,
    /// `set_logging` (LOG_ALL on / off).
    Logging(bool),
    /// `DirtyLog::mark`.
    Mark {
        /// Start.
        gpa: Gpa,
        /// Length in bytes.
        len: Len,
    },
    /// `MigrationBitmap::sync_from_log` on log `log` (modulo the number attached so far).
    Sync {
        /// Which log.
        log: u8,
    },
    /// `MigrationBitmap::fetch_log` (deferred mode, step 1).
    Fetch {
        /// Which log.
        log: u8,
    },
    /// `MigrationBitmap::clear_fetched` with this chunk (0 must be refused).
    ClearFetched {
        /// Chunk in pages (reduced).
        chunk: u32,
    },
    /// `FetchedLog::clear_pages`.
    ClearPages {
        /// First page (reduced).
        first: u32,
        /// Number of pages.
        npages: u32,
    },
    /// Clearing a fetch with a log it was not taken from must be refused.
    ClearWrongLog {
        /// Which log.
        log: u8,
    },
    /// `MigrationBitmap::test_and_clear`, as the sender takes pages.
    Send {
        /// First page.
        first: u32,
        /// Number of pages.
        npages: u32,
    },
    /// Many one-byte marks on separate pages past the current log's end (`count` modulo 400,
    /// `stride + 2` pages apart, from `skip` pages past the end): enough disjoint carried
    /// ranges to make the handle merge them (more than `MAX_CARRIED`).
    Scatter {
        /// Pages past the end of the current log where the first mark lands (reduced).
        skip: u16,
        /// Gap between marks, minus 2 (so no two are adjacent).
        stride: u8,
        /// Number of marks (modulo 400).
        count: u16,
    },
}

/// Decodes `data` and runs it.
pub fn run(data: &[u8]) -> Reached {
    match Input::arbitrary_take_rest(Unstructured::new(data)) {
        Ok(input) => exec(&input, Fault::None),
        Err(_) => Reached::default(),
    }
}

/// Runs `input` with `fault` injected (negative controls: any fault must make the checks fail).
pub fn exec(input: &Input, fault: Fault) -> Reached {
    let mut st = State::new(input.bitmap_pages as u64 % (MAX_LOG * 8 + 1025));
    st.fault = fault;
    for op in input.ops.iter().take(MAX_OPS) {
        st.apply(op);
    }
    st.check_all();
    st.reached
}

struct FileState {
    file: File,
    /// Expected content, byte for byte.
    model: Vec<u8>,
}

struct Log {
    file: usize,
    offset: u64,
    size: u64,
    /// The VMM's own mapping of the log.
    vmm: LogRegion,
}

impl Log {
    fn pages(&self) -> u64 {
        self.size * 8
    }
    /// Bit index in the file of log page `p`.
    fn bit(&self, p: u64) -> u64 {
        self.offset * 8 + p
    }
}

struct PendingFetch {
    log: usize,
    fetched: FetchedLog,
    /// Log pages fetched and not yet cleared.
    pages: Vec<u64>,
}

struct State {
    dl: DirtyLog,
    logging: bool,
    files: Vec<FileState>,
    logs: Vec<Log>,
    current: Option<(usize, Arc<LogRegion>)>,
    stats: LogStats,
    bm: MigrationBitmap,
    bm_pages: u64,
    /// Expected migration bitmap, as little-endian words.
    bm_model: Vec<u64>,
    fetch: Option<PendingFetch>,
    reached: Reached,
    lost: bool,
    /// A mark was made with logging on and no log: the next attached log is all dirty.
    unlogged: bool,
    /// Pages marked past the end of the log while logging: the next log that covers one must
    /// have it set.
    must: PageSet,
    /// `must` plus where the handle may over-mark (see the module documentation).
    may: PageSet,
    fault: Fault,
}

/// The outcome `LogRegion::from_fd` must have, from the documented rules.
fn expected_attach(offset: u64, size: u64, file_len: u64) -> Result<(), &'static str> {
    if size == 0 {
        return Err("ZeroSize");
    }
    let Some(end) = offset.checked_add(size) else {
        return Err("Overflow");
    };
    if size > isize::MAX as u64 / 2 {
        return Err("TooLarge");
    }
    if !offset.is_multiple_of(8) {
        return Err("Misaligned");
    }
    if end > file_len {
        return Err("PastEnd");
    }
    Ok(())
}

/// Clears bit `bit` of `file` behind the code's back (negative controls).
fn clear_file_bit(file: &File, bit: u64) {
    use std::os::unix::fs::FileExt;
    let mut b = [0u8];
    file.read_exact_at(&mut b, bit / 8).unwrap();
    b[0] &= !(1 << (bit % 8));
    file.write_all_at(&b, bit / 8).unwrap();
}

fn error_name(e: &LogError) -> &'static str {
    match e {
        LogError::ZeroSize => "ZeroSize",
        LogError::Overflow { .. } => "Overflow",
        LogError::TooLarge { .. } => "TooLarge",
        LogError::Misaligned { .. } => "Misaligned",
        LogError::PastEnd { .. } => "PastEnd",
        LogError::TooSmall { .. } => "TooSmall",
        LogError::NotBacked => "NotBacked",
        LogError::Absurd { .. } => "Absurd",
        LogError::Stat(_) => "Stat",
        LogError::Map(_) => "Map",
    }
}

impl State {
    fn new(bm_pages: u64) -> Self {
        State {
            dl: DirtyLog::new(),
            logging: false,
            files: Vec::new(),
            logs: Vec::new(),
            current: None,
            stats: LogStats::default(),
            bm: MigrationBitmap::new(bm_pages).expect("bitmap of at most 3 blocks"),
            bm_pages,
            bm_model: vec![0; bm_pages.div_ceil(64) as usize],
            fetch: None,
            reached: Reached::default(),
            lost: false,
            unlogged: false,
            must: PageSet::default(),
            may: PageSet::default(),
            fault: Fault::None,
        }
    }

    fn file(&mut self, sel: &FileSel) -> usize {
        match *sel {
            FileSel::Existing(i) if !self.files.is_empty() => i as usize % self.files.len(),
            FileSel::New(len) if self.files.len() < MAX_FILES => {
                let len = len as u64 % (MAX_FILE + 1);
                self.files.push(FileState {
                    file: memfd(len),
                    model: vec![0; len as usize],
                });
                self.files.len() - 1
            }
            FileSel::New(i) => i as usize % self.files.len(),
            FileSel::Existing(_) => {
                self.files.push(FileState {
                    file: memfd(4096),
                    model: vec![0; 4096],
                });
                self.files.len() - 1
            }
        }
    }

    fn apply(&mut self, op: &Op) {
        match op {
            Op::Attach { file, offset, size } => self.attach(file, offset, size),
            Op::Detach => {
                let old = self.dl.replace_region(None);
                self.check_replaced(old);
                self.current = None;
                self.reached.hit("detach");
            }
            Op::Logging(on) => {
                self.dl.set_logging(*on);
                self.logging = *on;
                assert_eq!(self.dl.is_logging(), *on);
            }
            Op::Mark { gpa, len } => self.mark(gpa, len),
            Op::Scatter {
                skip,
                stride,
                count,
            } => {
                let end = self
                    .current
                    .as_ref()
                    .map_or(0, |(i, _)| self.logs[*i].pages());
                let step = *stride as u64 + 2;
                for k in 0..(*count % 400) as u64 {
                    let page = end + (*skip as u64 % 4096) + k * step;
                    self.mark_at(page << PAGE_SHIFT, 1);
                }
            }
            Op::Sync { log } => self.sync(*log),
            Op::Fetch { log } => self.fetch(*log),
            Op::ClearFetched { chunk } => self.clear_fetched(*chunk),
            Op::ClearPages { first, npages } => self.clear_pages(*first, *npages),
            Op::ClearWrongLog { log } => self.clear_wrong(*log),
            Op::Send { first, npages } => self.send(*first as u64, *npages as u64),
        }
    }

    fn check_replaced(&self, old: Option<Arc<LogRegion>>) {
        match (&self.current, old) {
            (None, None) => {}
            (Some((_, cur)), Some(old)) => assert!(
                cur.same_memory(&old),
                "replace_region returned a log other than the current one"
            ),
            (cur, old) => panic!(
                "replace_region returned {:?}, but the current log was {:?}",
                old.is_some(),
                cur.is_some()
            ),
        }
    }

    fn attach(&mut self, file: &FileSel, offset: &Offset, size: &Size) {
        let f = self.file(file);
        let file_len = self.files[f].model.len() as u64;
        let offset = match *offset {
            Offset::Words(w) => (w as u64 * 8) % (MAX_FILE + 8),
            Offset::Bytes(b) => b as u64,
            Offset::Raw(r) => r,
        };
        let size = match *size {
            Size::Bytes(b) => b as u64,
            Size::Words(w) => w as u64 * 8,
            Size::Raw(r) => r,
        };
        let got = LogRegion::from_fd(self.files[f].file.as_fd(), offset, size);
        let want = expected_attach(offset, size, file_len);
        let region = match (got, want) {
            (Ok(r), Ok(())) => r,
            (Err(e), Err(name)) => {
                assert_eq!(error_name(&e), name, "from_fd({offset:#x}, {size:#x}) on {file_len} bytes: {e}");
                self.reached.hit("attach-refused");
                return;
            }
            (got, want) => panic!(
                "from_fd(offset {offset:#x}, size {size:#x}) on a {file_len}-byte fd: got {:?}, want {want:?}",
                got.map(|_| ())
            ),
        };
        assert_eq!(region.len_bytes() as u64, size);
        assert_eq!(region.pages(), size * 8);
        let vmm = LogRegion::from_fd(self.files[f].file.as_fd(), offset, size)
            .expect("a second mapping of a range that mapped once");
        let region = Arc::new(region);
        let old = self.dl.replace_region(Some(region.clone()));
        self.check_replaced(old);
        self.logs.push(Log {
            file: f,
            offset,
            size,
            vmm,
        });
        self.current = Some((self.logs.len() - 1, region));
        if std::mem::take(&mut self.unlogged) {
            let log = &self.logs[self.logs.len() - 1];
            let (first, last) = (log.bit(0), log.bit(log.pages() - 1));
            super::set_bits(&mut self.files[f].model, first, last);
            self.reached.hit("attach-after-unlogged-writes");
        }
        self.apply_carried(self.logs.len() - 1);
        self.reached.hit("attach");
        if size % 8 != 0 {
            self.reached.hit("attach-tail");
        }
    }

    fn mark(&mut self, gpa: &Gpa, len: &Len) {
        let cur_pages = self
            .current
            .as_ref()
            .map_or(0, |(i, _)| self.logs[*i].pages());
        let gpa = match *gpa {
            Gpa::Page { page, offset } => {
                ((page as u64 % (MAX_LOG * 8 + 128)) << PAGE_SHIFT) | (offset as u64 % 4096)
            }
            Gpa::NearEnd { delta, offset } => {
                (cur_pages.saturating_add_signed(delta as i64) << PAGE_SHIFT)
                    | (offset as u64 % 4096)
            }
            Gpa::Raw(r) => r,
        };
        let len = match *len {
            Len::Bytes(b) => b as u64,
            Len::Pages(p) => p as u64 * 4096,
            Len::Raw(r) => r,
        };
        self.mark_at(gpa, len);
    }

    fn mark_at(&mut self, gpa: u64, len: u64) {
        let lose_mark = self.fault == Fault::LoseMark;
        self.dl.mark(gpa, len);

        // The model.
        if self.logging && len != 0 {
            match &self.current {
                None => {
                    self.stats.marks_without_log += 1;
                    self.unlogged = true;
                    self.reached.hit("mark-without-log");
                }
                Some((i, _)) => {
                    let log = &self.logs[*i];
                    let (last, overflow) = match gpa.checked_add(len - 1) {
                        Some(l) => (l, 0),
                        None => (u64::MAX, 1),
                    };
                    let (fp, lp) = (gpa >> PAGE_SHIFT, last >> PAGE_SHIFT);
                    let pages = log.pages();
                    let mut dropped = overflow;
                    if lp >= pages {
                        dropped += lp - fp.max(pages) + 1;
                    }
                    if fp < pages {
                        let model = &mut self.files[log.file].model;
                        super::set_bits(model, log.bit(fp), log.bit(lp.min(pages - 1)));
                        self.reached.hit("mark-in-range");
                        if lose_mark && !self.lost {
                            // Negative control: the mark "gets lost" on its way to the log.
                            self.lost = true;
                            clear_file_bit(&self.files[log.file].file, log.bit(fp));
                        }
                    }
                    if dropped != 0 {
                        self.stats.out_of_range_pages += dropped;
                        self.stats.out_of_range_marks += 1;
                        self.reached.hit("mark-out-of-range");
                        // Carried: the pages past the end must reach the next log that
                        // covers them; the head of a straddling mark may.
                        if lp >= pages {
                            self.must.add(fp.max(pages), lp);
                        }
                        self.may.add(fp, lp);
                        self.check_carried_after_mark();
                    }
                }
            }
        } else if !self.logging {
            self.reached.hit("mark-logging-off");
        }
        assert_eq!(
            self.dl.stats(),
            self.stats,
            "after mark({gpa:#x}, {len:#x})"
        );
    }

    /// After a mark that carried pages: `carried_ranges` never falls except when the handle,
    /// already holding `MAX_CARRIED` ranges, merges them into their hull; only then may the
    /// next logs be over-marked inside that hull.
    fn check_carried_after_mark(&mut self) {
        let before = self.stats.carried_ranges;
        let now = self.dl.stats().carried_ranges;
        assert!(
            (1..=MAX_CARRIED).contains(&now),
            "carried_ranges {now} after a mark past the end (was {before})"
        );
        if now < before {
            assert!(
                before == MAX_CARRIED && now == 1,
                "carried_ranges fell from {before} to {now} on a mark (only a merge of \
                 {MAX_CARRIED} ranges into one may do that)"
            );
            self.may.hull();
            self.reached.hit("carry-merged");
        }
        self.stats.carried_ranges = now;
    }

    /// The log `li` was just attached: every carried page it covers must be set in it; pages
    /// the handle may over-mark are read back and adopted; the rest stays carried.
    fn apply_carried(&mut self, li: usize) {
        let log = &self.logs[li];
        let (f, pages) = (log.file, log.pages());
        let must = self.must.below(pages);
        if self.fault == Fault::DropCarried && !self.lost {
            if let Some(&(p, _)) = must.first() {
                self.lost = true;
                clear_file_bit(&self.files[f].file, log.bit(p));
            }
        }
        for &(a, b) in &must {
            super::set_bits(&mut self.files[f].model, log.bit(a), log.bit(b));
        }
        let may = self.may.below(pages);
        if may != must {
            // Pages the handle may or may not have set: adopt what it did.
            let got = file_bytes(&self.files[f].file);
            let model = &mut self.files[f].model;
            let mut adopted = false;
            for &(a, b) in &may {
                let (first, last) = (log.bit(a), log.bit(b));
                let (b0, b1) = ((first / 8) as usize, (last / 8) as usize);
                for (i, byte) in model[b0..=b1].iter_mut().enumerate() {
                    let i = b0 + i;
                    let lo = if i == b0 { first % 8 } else { 0 };
                    let hi = if i == b1 { last % 8 } else { 7 };
                    let mask = ((0xffu16 << lo) & (0xffu16 >> (7 - hi))) as u8;
                    adopted |= got[i] & mask & !*byte != 0;
                    *byte |= got[i] & mask;
                }
            }
            if adopted {
                self.reached.hit("carry-overmarked");
            }
        }
        if !must.is_empty() {
            self.reached.hit("carry-marked");
        }
        self.check_file(f);
        self.must.remove_below(pages);
        self.may.remove_below(pages);
        if !self.must.is_empty() {
            self.reached.hit("carry-still-past");
        }
        let before = self.stats.carried_ranges;
        let now = self.dl.stats().carried_ranges;
        assert!(
            now <= before,
            "carried_ranges rose from {before} to {now} on an attach"
        );
        assert!(
            self.must.is_empty() || now >= 1,
            "pages still past the end of the new log ({:?}) but nothing carried",
            self.must.0.first()
        );
        assert!(
            !self.may.is_empty() || now == 0,
            "{now} ranges carried, but the new log covers every page marked past an earlier one"
        );
        self.stats.carried_ranges = now;
    }

    fn pick(&self, log: u8) -> Option<usize> {
        (!self.logs.is_empty()).then(|| log as usize % self.logs.len())
    }

    /// Log pages `p` of `log` that are set in the model and map into the bitmap.
    fn model_set_pages(&self, li: usize) -> Vec<u64> {
        let log = &self.logs[li];
        let model = &self.files[log.file].model;
        let n = log.pages().min(self.bm_pages);
        let mut out = Vec::new();
        let first_byte = log.offset as usize;
        for k in 0..n.div_ceil(8) {
            let b = model[first_byte + k as usize];
            if b == 0 {
                continue;
            }
            for j in 0..8 {
                let p = k * 8 + j;
                if p < n && b & (1 << j) != 0 {
                    out.push(p);
                }
            }
        }
        out
    }

    fn clear_model_bit(&mut self, li: usize, p: u64) {
        let log = &self.logs[li];
        let bit = log.bit(p);
        self.files[log.file].model[(bit / 8) as usize] &= !(1 << (bit % 8));
    }

    fn bm_set(&mut self, pages: &[u64]) -> u64 {
        let mut newly = 0;
        for &p in pages {
            let (w, m) = ((p / 64) as usize, 1u64 << (p % 64));
            if self.bm_model[w] & m == 0 {
                self.bm_model[w] |= m;
                newly += 1;
            }
        }
        newly
    }

    fn sync(&mut self, log: u8) {
        let Some(li) = self.pick(log) else { return };
        let newly = self.bm.sync_from_log(&self.logs[li].vmm, 0);
        let set = self.model_set_pages(li);
        for &p in &set {
            self.clear_model_bit(li, p);
        }
        let want = self.bm_set(&set);
        assert_eq!(newly, want, "sync_from_log: newly dirty pages");
        if !set.is_empty() {
            self.reached.hit("sync-took-bits");
        }
        self.check_file(self.logs[li].file);
        self.check_bitmap();
    }

    fn fetch(&mut self, log: u8) {
        let Some(li) = self.pick(log) else { return };
        let fetched = self.bm.fetch_log(&self.logs[li].vmm, 0);
        let set = self.model_set_pages(li);
        let want = self.bm_set(&set);
        assert_eq!(fetched.newly_dirty(), want, "fetch_log: newly dirty pages");
        assert_eq!(
            fetched.pending_pages(),
            set.len() as u64,
            "fetch_log: pending"
        );
        if !set.is_empty() {
            self.reached.hit("fetch-saw-bits");
        }
        self.fetch = Some(PendingFetch {
            log: li,
            fetched,
            pages: set,
        });
        self.check_file(self.logs[li].file);
        self.check_bitmap();
    }

    fn clear_fetched(&mut self, chunk: u32) {
        let Some(mut pf) = self.fetch.take() else {
            return;
        };
        let chunk = chunk as u64 % 70_000;
        let res = self
            .bm
            .clear_fetched(&self.logs[pf.log].vmm, &mut pf.fetched, chunk);
        if chunk == 0 {
            assert!(matches!(res, Err(VmmError::ZeroChunk)), "chunk 0: {res:?}");
            self.fetch = Some(pf);
            return;
        }
        let cleared = res.expect("clear_fetched with the log it was fetched from");
        assert_eq!(cleared, pf.pages.len() as u64, "clear_fetched count");
        for &p in &pf.pages {
            self.clear_model_bit(pf.log, p);
        }
        if cleared != 0 {
            self.reached.hit("clear-fetched");
        }
        assert_eq!(pf.fetched.pending_pages(), 0);
        self.check_file(self.logs[pf.log].file);
    }

    fn clear_pages(&mut self, first: u32, npages: u32) {
        let Some(pf) = self.fetch.as_mut() else {
            return;
        };
        let li = pf.log;
        let first = first as u64 % (self.logs[li].pages() + 128);
        let npages = npages as u64;
        let cleared = pf
            .fetched
            .clear_pages(&self.logs[li].vmm, first, npages)
            .expect("clear_pages with the log it was fetched from");
        let end = first.saturating_add(npages);
        let (inside, rest): (Vec<u64>, Vec<u64>) =
            pf.pages.iter().partition(|&&p| p >= first && p < end);
        pf.pages = rest;
        assert_eq!(
            cleared,
            inside.len() as u64,
            "clear_pages({first}, {npages})"
        );
        assert_eq!(pf.fetched.pending_pages(), pf.pages.len() as u64);
        for p in inside {
            self.clear_model_bit(li, p);
        }
        if cleared != 0 {
            self.reached.hit("clear-pages");
        }
        self.check_file(self.logs[li].file);
    }

    fn clear_wrong(&mut self, log: u8) {
        let Some(other) = self.pick(log) else { return };
        let Some(pf) = self.fetch.as_mut() else {
            return;
        };
        if other == pf.log {
            return;
        }
        let res = pf.fetched.clear_pages(&self.logs[other].vmm, 0, u64::MAX);
        assert!(
            matches!(res, Err(VmmError::FetchMismatch)),
            "clearing with another log: {res:?}"
        );
        self.reached.hit("clear-wrong-log");
    }

    fn send(&mut self, first: u64, npages: u64) {
        let taken = self.bm.test_and_clear(first, npages);
        let end = first.saturating_add(npages).min(self.bm_pages);
        let mut want = 0;
        let mut p = first;
        while p < end {
            let (w, b) = ((p / 64) as usize, p % 64);
            let n = (64 - b).min(end - p);
            let m = (!0u64 >> (64 - n)) << b;
            want += (self.bm_model[w] & m).count_ones() as u64;
            self.bm_model[w] &= !m;
            p += n;
        }
        assert_eq!(taken, want, "test_and_clear({first}, {npages})");
    }

    fn check_file(&self, f: usize) {
        let fs = &self.files[f];
        let got = file_bytes(&fs.file);
        if got != fs.model {
            let i = got
                .iter()
                .zip(&fs.model)
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            panic!(
                "memfd {f} differs from the model at byte {i:#x}: got {:#04x}, want {:#04x}",
                got[i], fs.model[i]
            );
        }
    }

    fn check_bitmap(&self) {
        let words = self.bm.snapshot();
        assert_eq!(words.len() as u64, self.bm_pages.div_ceil(64));
        if words != self.bm_model {
            let w = words
                .iter()
                .zip(&self.bm_model)
                .position(|(a, b)| a != b)
                .unwrap();
            panic!(
                "migration bitmap word {w} (pages {}..): got {:#018x}, want {:#018x}",
                w * 64,
                words[w],
                self.bm_model[w]
            );
        }
    }

    fn check_all(&self) {
        for f in 0..self.files.len() {
            self.check_file(f);
        }
        self.check_bitmap();
        assert_eq!(self.dl.stats(), self.stats);
    }
}
