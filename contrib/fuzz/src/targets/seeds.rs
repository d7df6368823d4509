//! The seed corpus, written as typed inputs and encoded into the bytes `arbitrary` decodes.
//!
//! `tests/fuzz_replay.rs` checks that every `seed-*` file under `contrib/fuzz/corpus/<target>/`
//! is exactly what [`seeds`] produces (and regenerates them with
//! `VDL_WRITE_SEEDS=1 cargo test --test fuzz_replay seed_corpus`), and that each seed decodes
//! back to the input it was made from. The encoding mirrors `arbitrary` 1.x and its derive:
//! integers little-endian, `bool` as one byte, `Option` as a bool then the value, an enum as a
//! `u32` variant selector (`(x * variants) >> 32`) then its fields, a collection as
//! "continue" bytes each followed by an element, then a 0 byte (the last field of the input is
//! decoded with `arbitrary_take_rest`, so its elements simply run to the end of the data).

use super::{backend_messages as bm, blk_request as blk, log_region as lr, merge as mg};

/// Writes a value the way `arbitrary` reads it.
pub trait Enc {
    /// Appends the encoding of `self`.
    fn enc(&self, e: &mut Vec<u8>);
}

macro_rules! enc_int {
    ($($t:ty),*) => {$(
        impl Enc for $t {
            fn enc(&self, e: &mut Vec<u8>) {
                e.extend_from_slice(&self.to_le_bytes());
            }
        }
    )*};
}
enc_int!(u8, u16, u32, u64, i16);

impl Enc for bool {
    fn enc(&self, e: &mut Vec<u8>) {
        e.push(u8::from(*self));
    }
}

impl<T: Enc> Enc for Option<T> {
    fn enc(&self, e: &mut Vec<u8>) {
        self.is_some().enc(e);
        if let Some(v) = self {
            v.enc(e);
        }
    }
}

impl<T: Enc> Enc for Vec<T> {
    fn enc(&self, e: &mut Vec<u8>) {
        for v in self {
            e.push(1);
            v.enc(e);
        }
        e.push(0);
    }
}

impl<A: Enc, B: Enc> Enc for (A, B) {
    fn enc(&self, e: &mut Vec<u8>) {
        self.0.enc(e);
        self.1.enc(e);
    }
}

/// A collection decoded with `arbitrary_take_rest`: elements to the end of the data.
fn enc_rest<T: Enc>(v: &[T], e: &mut Vec<u8>) {
    for x in v {
        e.push(1);
        x.enc(e);
    }
}

/// The selector of variant `i` of `n`.
fn tag(e: &mut Vec<u8>, i: u32, n: u32) {
    let t = ((i as u64) << 32).div_ceil(n as u64) as u32;
    t.enc(e);
}

macro_rules! enc_enum {
    ($ty:ty, $n:expr, { $($pat:pat => $i:expr, [$($f:expr),*]),* $(,)? }) => {
        impl Enc for $ty {
            #[allow(unused_variables)]
            fn enc(&self, e: &mut Vec<u8>) {
                match self {
                    $($pat => { tag(e, $i, $n); $($f.enc(e);)* })*
                }
            }
        }
    };
}

// ---- log_region -------------------------------------------------------------------------------

enc_enum!(lr::FileSel, 2, { lr::FileSel::New(v) => 0, [v], lr::FileSel::Existing(v) => 1, [v] });
enc_enum!(lr::Offset, 3, {
    lr::Offset::Words(v) => 0, [v], lr::Offset::Bytes(v) => 1, [v], lr::Offset::Raw(v) => 2, [v]
});
enc_enum!(lr::Size, 3, {
    lr::Size::Bytes(v) => 0, [v], lr::Size::Words(v) => 1, [v], lr::Size::Raw(v) => 2, [v]
});
enc_enum!(lr::Gpa, 3, {
    lr::Gpa::Page { page, offset } => 0, [page, offset],
    lr::Gpa::NearEnd { delta, offset } => 1, [delta, offset],
    lr::Gpa::Raw(v) => 2, [v],
});
enc_enum!(lr::Len, 3, {
    lr::Len::Bytes(v) => 0, [v], lr::Len::Pages(v) => 1, [v], lr::Len::Raw(v) => 2, [v]
});
enc_enum!(lr::Op, 11, {
    lr::Op::Attach { file, offset, size } => 0, [file, offset, size],
    lr::Op::Detach => 1, [],
    lr::Op::Logging(on) => 2, [on],
    lr::Op::Mark { gpa, len } => 3, [gpa, len],
    lr::Op::Sync { log } => 4, [log],
    lr::Op::Fetch { log } => 5, [log],
    lr::Op::ClearFetched { chunk } => 6, [chunk],
    lr::Op::ClearPages { first, npages } => 7, [first, npages],
    lr::Op::ClearWrongLog { log } => 8, [log],
    lr::Op::Send { first, npages } => 9, [first, npages],
    lr::Op::Scatter { skip, stride, count } => 10, [skip, stride, count],
});

fn enc_log_region(i: &lr::Input) -> Vec<u8> {
    let mut e = Vec::new();
    i.bitmap_pages.enc(&mut e);
    enc_rest(&i.ops, &mut e);
    e
}

// ---- merge ------------------------------------------------------------------------------------

enc_enum!(mg::Page, 3, {
    mg::Page::Near { anchor, delta } => 0, [anchor, delta],
    mg::Page::Small(v) => 1, [v],
    mg::Page::Raw(v) => 2, [v],
});
enc_enum!(mg::Count, 3, {
    mg::Count::Small(v) => 0, [v], mg::Count::All => 1, [], mg::Count::Raw(v) => 2, [v]
});
enc_enum!(mg::Pages, 2, { mg::Pages::Bounded(v) => 0, [v], mg::Pages::Raw(v) => 1, [v] });
impl Enc for mg::LogSpec {
    fn enc(&self, e: &mut Vec<u8>) {
        self.words.enc(e);
        self.tail.enc(e);
    }
}
enc_enum!(mg::Clear, 4, {
    mg::Clear::Pages { first, npages } => 0, [first, npages],
    mg::Clear::All { chunk } => 1, [chunk],
    mg::Clear::Mark(p) => 2, [p],
    mg::Clear::WrongLog => 3, [],
});
enc_enum!(mg::Op, 8, {
    mg::Op::MergeLe { words, start, npages } => 0, [words, start, npages],
    mg::Op::Sync { log, base } => 1, [log, base],
    mg::Op::FetchClear { log, base, steps } => 2, [log, base, steps],
    mg::Op::TestAndClear { first, npages } => 3, [first, npages],
    mg::Op::SetRange { first, npages } => 4, [first, npages],
    mg::Op::NextDirty(p) => 5, [p],
    mg::Op::Iter { first, npages } => 6, [first, npages],
    mg::Op::Grow(p) => 7, [p],
});

fn enc_merge(i: &mg::Input) -> Vec<u8> {
    let mut e = Vec::new();
    i.pages.enc(&mut e);
    enc_rest(&i.ops, &mut e);
    e
}

// ---- backend_messages -------------------------------------------------------------------------

enc_enum!(bm::RegionGpa, 3, {
    bm::RegionGpa::Mib(v) => 0, [v], bm::RegionGpa::Pages(v) => 1, [v], bm::RegionGpa::Raw(v) => 2, [v]
});
enc_enum!(bm::RegionSize, 3, {
    bm::RegionSize::Pages(v) => 0, [v], bm::RegionSize::Bytes(v) => 1, [v], bm::RegionSize::Raw(v) => 2, [v]
});
enc_enum!(bm::FdLen, 4, {
    bm::FdLen::Exact => 0, [], bm::FdLen::Short(v) => 1, [v], bm::FdLen::Long(v) => 2, [v],
    bm::FdLen::Any(v) => 3, [v],
});
enc_enum!(bm::MmapOffset, 4, {
    bm::MmapOffset::Zero => 0, [], bm::MmapOffset::Pages(v) => 1, [v],
    bm::MmapOffset::Bytes(v) => 2, [v], bm::MmapOffset::Raw(v) => 3, [v],
});
impl Enc for bm::RegionIn {
    fn enc(&self, e: &mut Vec<u8>) {
        self.gpa.enc(e);
        self.size.enc(e);
        self.offset.enc(e);
        self.fd.enc(e);
    }
}
enc_enum!(bm::LogSize, 4, {
    bm::LogSize::Exact => 0, [], bm::LogSize::Less(v) => 1, [v], bm::LogSize::Words(v) => 2, [v],
    bm::LogSize::Raw(v) => 3, [v],
});
enc_enum!(bm::LogFileSel, 2, {
    bm::LogFileSel::New(l) => 0, [l], bm::LogFileSel::Existing(v) => 1, [v]
});
enc_enum!(bm::RingAddr, 2, {
    bm::RingAddr::In { which, offset } => 0, [which, offset], bm::RingAddr::Raw(v) => 1, [v]
});
enc_enum!(bm::WriteGpa, 3, {
    bm::WriteGpa::In { which, offset } => 0, [which, offset],
    bm::WriteGpa::End { which, back } => 1, [which, back],
    bm::WriteGpa::Raw(v) => 2, [v],
});
enc_enum!(bm::Op, 11, {
    bm::Op::Features { log_all, junk } => 0, [log_all, junk],
    bm::Op::MemTable(r) => 1, [r],
    bm::Op::AddRegion(r) => 2, [r],
    bm::Op::RemRegion { which, other } => 3, [which, other],
    bm::Op::LogBase { file, offset, size } => 4, [file, offset, size],
    bm::Op::VringNum { index, num } => 5, [index, num],
    bm::Op::VringAddr { index, desc, avail, used, log } => 6, [index, desc, avail, used, log],
    bm::Op::VringBase { index, base } => 7, [index, base],
    bm::Op::GetVringBase { index } => 8, [index],
    bm::Op::Write { gpa, len } => 9, [gpa, len],
    bm::Op::Reconnect => 10, [],
});

fn enc_backend(i: &bm::Input) -> Vec<u8> {
    let mut e = Vec::new();
    enc_rest(&i.ops, &mut e);
    e
}

// ---- blk_request ------------------------------------------------------------------------------

enc_enum!(blk::Sector, 3, {
    blk::Sector::Small(v) => 0, [v], blk::Sector::Huge(v) => 1, [v], blk::Sector::Raw(v) => 2, [v]
});
impl Enc for blk::LimitsIn {
    fn enc(&self, e: &mut Vec<u8>) {
        self.capacity.enc(e);
        self.seg_max.enc(e);
        self.read_only.enc(e);
        self.discard.enc(e);
        self.write_zeroes.enc(e);
        self.max_sectors.enc(e);
        self.max_segs.enc(e);
    }
}
enc_enum!(blk::ReqType, 7, {
    blk::ReqType::In => 0, [], blk::ReqType::Out => 1, [], blk::ReqType::Flush => 2, [],
    blk::ReqType::GetId => 3, [], blk::ReqType::Discard => 4, [],
    blk::ReqType::WriteZeroes => 5, [], blk::ReqType::Other(t) => 6, [t],
});
enc_enum!(blk::Flags, 3, {
    blk::Flags::None => 0, [], blk::Flags::Unmap => 1, [], blk::Flags::Raw(v) => 2, [v]
});
impl Enc for blk::SegIn {
    fn enc(&self, e: &mut Vec<u8>) {
        self.sector.enc(e);
        self.num.enc(e);
        self.flags.enc(e);
    }
}
enc_enum!(blk::Addr, 3, {
    blk::Addr::In { region, offset } => 0, [region, offset],
    blk::Addr::End { region, back } => 1, [region, back],
    blk::Addr::Raw(v) => 2, [v],
});
enc_enum!(blk::DescLen, 3, {
    blk::DescLen::Small(v) => 0, [v],
    blk::DescLen::Sectors { n, extra } => 1, [n, extra],
    blk::DescLen::Raw(v) => 2, [v],
});
impl Enc for blk::DescIn {
    fn enc(&self, e: &mut Vec<u8>) {
        self.addr.enc(e);
        self.len.enc(e);
        self.write.enc(e);
    }
}

fn enc_blk(i: &blk::Input) -> Vec<u8> {
    let mut e = Vec::new();
    i.limits.enc(&mut e);
    i.req_type.enc(&mut e);
    i.ioprio.enc(&mut e);
    i.sector.enc(&mut e);
    i.segments.enc(&mut e);
    i.trailer.enc(&mut e);
    i.descs.enc(&mut e);
    i.pad.enc(&mut e); // the last field: read with `arbitrary_take_rest`, same bytes
    e
}

// ---- the seeds --------------------------------------------------------------------------------

/// One seed: its file name, the bytes, and the input's `Debug` form (to check decoding).
pub struct Seed {
    /// File name under `corpus/<target>/`.
    pub name: String,
    /// The encoded input.
    pub bytes: Vec<u8>,
    /// `format!("{:?}", input)`.
    pub debug: String,
}

fn seed<T: std::fmt::Debug>(name: &str, input: &T, enc: fn(&T) -> Vec<u8>) -> Seed {
    Seed {
        name: format!("seed-{name}"),
        bytes: enc(input),
        debug: format!("{input:?}"),
    }
}

/// Known crashes that are not in this crate's code (see `contrib/fuzz/README.md`, "Findings"):
/// written to `contrib/fuzz/known-crashes/<target>/`, not replayed by default.
pub fn known_crashes(target: &str) -> Vec<Seed> {
    use bm::{FdLen, MmapOffset, Op::*, RegionGpa, RegionIn, RegionSize, RingAddr, WriteGpa};
    match target {
        "backend_messages" => {
            // SET_MEM_TABLE with a 16-page region whose memfd holds just under 8 pages, then a
            // device write to page 15 of the region: SIGBUS in vm-memory's copy (needs
            // VDL_FUZZ_UNBACKED=1, or any real device that writes there).
            let input = bm::Input {
                ops: vec![
                    MemTable(vec![RegionIn {
                        gpa: RegionGpa::Mib(1),
                        size: RegionSize::Pages(15),
                        offset: MmapOffset::Zero,
                        fd: FdLen::Short(32768),
                    }]),
                    Write {
                        gpa: WriteGpa::In {
                            which: 0,
                            offset: 15 * 4096,
                        },
                        len: 0,
                    },
                ],
            };
            // The same cause reached by protocol messages alone (found by the fuzzer): a region
            // whose memfd is empty, then SET_VRING_ADDR; the stock handler reads the used ring
            // index (`queue_used_idx`) from the unbacked page in its request thread: SIGBUS
            // kills the daemon. No device write, no environment switch needed.
            let by_messages = bm::Input {
                ops: vec![
                    MemTable(vec![RegionIn {
                        gpa: RegionGpa::Mib(1),
                        size: RegionSize::Pages(0),
                        offset: MmapOffset::Zero,
                        fd: FdLen::Any(0),
                    }]),
                    VringNum { index: 0, num: 256 },
                    VringAddr {
                        index: 0,
                        desc: RingAddr::In {
                            which: 0,
                            offset: 0,
                        },
                        avail: RingAddr::In {
                            which: 0,
                            offset: 0x800,
                        },
                        used: RingAddr::In {
                            which: 0,
                            offset: 0xc00,
                        },
                        log: None,
                    },
                ],
            };
            vec![
                seed("short-region-fd-sigbus", &input, enc_backend),
                seed(
                    "empty-region-fd-vring-addr-sigbus",
                    &by_messages,
                    enc_backend,
                ),
            ]
        }
        _ => Vec::new(),
    }
}

/// The seeds of `target`.
pub fn seeds(target: &str) -> Vec<Seed> {
    match target {
        "log_region" => log_region_seeds(),
        "merge" => merge_seeds(),
        "backend_messages" => backend_seeds(),
        "blk_request" => blk_seeds(),
        other => panic!("unknown target {other}"),
    }
}

fn log_region_seeds() -> Vec<Seed> {
    use lr::{FileSel::*, Gpa, Len, Offset, Op::*, Size};
    let attach = |len: u32, off: u16, size: Size| Attach {
        file: New(len),
        offset: Offset::Words(off),
        size,
    };
    let mark = |page: u32, offset: u16, len: Len| Mark {
        gpa: Gpa::Page { page, offset },
        len,
    };
    let basic = lr::Input {
        bitmap_pages: 4096,
        ops: vec![
            attach(4096, 0, Size::Words(64)),
            Logging(true),
            mark(3, 0, Len::Bytes(1)),
            mark(63, 4090, Len::Bytes(16)),
            mark(100, 0, Len::Pages(200)),
            mark(5000, 0, Len::Bytes(1)),
            Sync { log: 0 },
            Logging(false),
            mark(7, 0, Len::Bytes(1)),
            Sync { log: 0 },
            Send {
                first: 0,
                npages: 120,
            },
        ],
    };
    let tail_and_replace = lr::Input {
        bitmap_pages: 300,
        ops: vec![
            attach(200, 1, Size::Bytes(11)),
            Logging(true),
            mark(60, 0, Len::Pages(40)),
            mark(0, 0, Len::Raw(u64::MAX)),
            attach(8192, 8, Size::Words(40)),
            mark(80, 7, Len::Bytes(9000)),
            Sync { log: 0 },
            Sync { log: 1 },
            Detach,
            mark(1, 0, Len::Bytes(1)),
            Attach {
                file: Existing(1),
                offset: Offset::Words(16),
                size: Size::Words(16),
            },
            mark(2, 0, Len::Bytes(1)),
            Sync { log: 2 },
        ],
    };
    let deferred = lr::Input {
        bitmap_pages: 1 << 19,
        ops: vec![
            attach(65536, 0, Size::Words(8192)),
            Logging(true),
            mark(10, 0, Len::Pages(300)),
            mark(400_000, 0, Len::Pages(70)),
            Fetch { log: 0 },
            mark(11, 0, Len::Bytes(1)),
            mark(2000, 0, Len::Bytes(1)),
            ClearPages {
                first: 0,
                npages: 100,
            },
            ClearWrongLog { log: 1 },
            ClearFetched { chunk: 64 },
            Sync { log: 0 },
            Send {
                first: 0,
                npages: u32::MAX,
            },
        ],
    };
    let hostile = lr::Input {
        bitmap_pages: 64,
        ops: vec![
            Attach {
                file: New(4096),
                offset: Offset::Bytes(3),
                size: Size::Words(8),
            },
            Attach {
                file: Existing(0),
                offset: Offset::Raw(u64::MAX - 7),
                size: Size::Words(8),
            },
            Attach {
                file: Existing(0),
                offset: Offset::Words(0),
                size: Size::Raw(u64::MAX),
            },
            Attach {
                file: Existing(0),
                offset: Offset::Words(500),
                size: Size::Words(100),
            },
            Attach {
                file: Existing(0),
                offset: Offset::Words(0),
                size: Size::Bytes(0),
            },
            Logging(true),
            mark(1, 0, Len::Bytes(1)),
            attach(16, 0, Size::Bytes(16)),
            Mark {
                gpa: Gpa::Raw(u64::MAX - 4095),
                len: Len::Raw(u64::MAX),
            },
            Mark {
                gpa: Gpa::NearEnd {
                    delta: -2,
                    offset: 100,
                },
                len: Len::Pages(5),
            },
            Sync { log: 0 },
        ],
    };
    // Memory added past the end of the log while logging: the marks are carried into the next
    // log that covers them (a straddling mark, one far past, then enough scattered ones to make
    // the handle merge its ranges), a log that covers only part, a detach, then one that covers
    // the rest.
    let carry = lr::Input {
        bitmap_pages: 8192,
        ops: vec![
            attach(4096, 0, Size::Words(4)),
            Logging(true),
            mark(250, 0, Len::Pages(10)),
            mark(3000, 5, Len::Bytes(1)),
            Scatter {
                skip: 1000,
                stride: 1,
                count: 300,
            },
            attach(8192, 0, Size::Words(32)),
            Sync { log: 1 },
            mark(5000, 0, Len::Bytes(1)),
            Detach,
            attach(16384, 0, Size::Words(128)),
            Sync { log: 2 },
            Send {
                first: 0,
                npages: u32::MAX,
            },
        ],
    };
    vec![
        seed("carry", &carry, enc_log_region),
        seed("basic", &basic, enc_log_region),
        seed("tail-and-replace", &tail_and_replace, enc_log_region),
        seed("deferred", &deferred, enc_log_region),
        seed("hostile", &hostile, enc_log_region),
    ]
}

fn merge_seeds() -> Vec<Seed> {
    use mg::{Clear, Count, LogSpec, Op::*, Page, Pages};
    let near = |anchor: u8, delta: i16| Page::Near { anchor, delta };
    let aligned = mg::Input {
        pages: Pages::Bounded(1000),
        ops: vec![
            MergeLe {
                words: vec![0b1011, !0, 0, 1 << 63],
                start: Page::Small(64),
                npages: Count::All,
            },
            NextDirty(Page::Small(0)),
            TestAndClear {
                first: Page::Small(64),
                npages: Count::Small(3),
            },
            Iter {
                first: Page::Small(0),
                npages: Count::All,
            },
            SetRange {
                first: near(4, -10),
                npages: Count::All,
            },
            NextDirty(near(4, -1)),
        ],
    };
    let shifted = mg::Input {
        pages: Pages::Bounded(2 * (1 << 18)),
        ops: vec![
            MergeLe {
                words: vec![!0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0xf0],
                start: near(1, -3),
                npages: Count::Small(700),
            },
            Sync {
                log: LogSpec {
                    words: vec![0x8000_0000_0000_0001, 0, 5],
                    tail: vec![0xff, 0x81],
                },
                base: near(1, -5),
            },
            Sync {
                log: LogSpec {
                    words: vec![!0; 3],
                    tail: vec![0x0f],
                },
                base: near(4, -70),
            },
            TestAndClear {
                first: near(1, -64),
                npages: Count::Small(200),
            },
        ],
    };
    let deferred = mg::Input {
        pages: Pages::Bounded(640),
        ops: vec![
            FetchClear {
                log: LogSpec {
                    words: vec![0xffff, 0, 1 << 40, 3],
                    tail: vec![0x11, 0x22, 0x33],
                },
                base: Page::Small(64),
                steps: vec![
                    Clear::Mark(1),
                    Clear::Mark(100),
                    Clear::Pages {
                        first: Page::Small(64),
                        npages: Count::Small(10),
                    },
                    Clear::WrongLog,
                    Clear::All { chunk: 0 },
                    Clear::All { chunk: 17 },
                ],
            },
            FetchClear {
                log: LogSpec {
                    words: vec![!0; 2],
                    tail: vec![],
                },
                base: Page::Small(590),
                steps: vec![Clear::Pages {
                    first: Page::Small(0),
                    npages: Count::All,
                }],
            },
        ],
    };
    let grow = mg::Input {
        pages: Pages::Bounded(0),
        ops: vec![
            MergeLe {
                words: vec![1],
                start: Page::Small(0),
                npages: Count::All,
            },
            Grow(Pages::Bounded(100)),
            Grow(Pages::Bounded(3 * (1 << 18) + 5)),
            Grow(Pages::Raw(u64::MAX)),
            Grow(Pages::Bounded(10)),
            SetRange {
                first: near(3, 0),
                npages: Count::All,
            },
            MergeLe {
                words: vec![!0; 2],
                start: near(4, -40),
                npages: Count::All,
            },
            NextDirty(near(2, 0)),
        ],
    };
    vec![
        seed("aligned", &aligned, enc_merge),
        seed("shifted", &shifted, enc_merge),
        seed("deferred", &deferred, enc_merge),
        seed("grow", &grow, enc_merge),
    ]
}

fn backend_seeds() -> Vec<Seed> {
    use bm::{
        FdLen, LogFileSel, LogSize, MmapOffset, Op::*, RegionGpa, RegionIn, RegionSize, RingAddr,
        WriteGpa,
    };
    let region = |mib: u8, pages: u8| RegionIn {
        gpa: RegionGpa::Mib(mib),
        size: RegionSize::Pages(pages),
        offset: MmapOffset::Zero,
        fd: FdLen::Exact,
    };
    let log = |size: LogSize| LogBase {
        file: LogFileSel::New(FdLen::Exact),
        offset: MmapOffset::Zero,
        size,
    };
    let write = |which: u8, offset: u32, len: u16| Write {
        gpa: WriteGpa::In { which, offset },
        len,
    };
    let migrate = bm::Input {
        ops: vec![
            MemTable(vec![region(0, 255), region(4, 63)]),
            log(LogSize::Exact),
            write(0, 5000, 9),
            Features {
                log_all: true,
                junk: None,
            },
            write(0, 5000, 9),
            write(1, 4090, 20),
            Write {
                gpa: WriteGpa::End { which: 0, back: 10 },
                len: 100,
            },
            Features {
                log_all: false,
                junk: None,
            },
            write(0, 0x2000, 1),
        ],
    };
    let hotplug = bm::Input {
        ops: vec![
            MemTable(vec![region(0, 127)]),
            log(LogSize::Exact),
            Features {
                log_all: true,
                junk: None,
            },
            AddRegion(region(2, 15)),
            write(1, 3 * 4096, 1),
            log(LogSize::Exact),
            write(1, 5 * 4096, 1),
            RemRegion {
                which: 1,
                other: None,
            },
            write(0, 0, 4096),
        ],
    };
    let hostile_logs = bm::Input {
        ops: vec![
            MemTable(vec![region(0, 255)]),
            LogBase {
                file: LogFileSel::New(FdLen::Short(4095)),
                offset: MmapOffset::Zero,
                size: LogSize::Words(1024),
            },
            MemTable(vec![region(0, 255), region(32, 255)]),
            LogBase {
                file: LogFileSel::New(FdLen::Exact),
                offset: MmapOffset::Zero,
                size: LogSize::Less(8),
            },
            MemTable(vec![region(0, 63)]),
            LogBase {
                file: LogFileSel::New(FdLen::Exact),
                offset: MmapOffset::Bytes(100),
                size: LogSize::Exact,
            },
            MemTable(vec![region(0, 63)]),
            LogBase {
                file: LogFileSel::New(FdLen::Exact),
                offset: MmapOffset::Raw(u64::MAX - 4095),
                size: LogSize::Exact,
            },
        ],
    };
    let past_log = bm::Input {
        ops: vec![
            MemTable(vec![region(0, 15)]),
            log(LogSize::Exact),
            Features {
                log_all: true,
                junk: None,
            },
            AddRegion(region(8, 3)),
            write(1, 0, 100),
            write(0, 4096, 1),
            Write {
                gpa: WriteGpa::Raw(0x10_0000),
                len: 1,
            },
        ],
    };
    // A log bigger than guest memory is put to use only as far as memory reaches, widened
    // when memory grows; a write past its mapping is carried into the next log.
    let view = bm::Input {
        ops: vec![
            MemTable(vec![region(0, 255)]),
            log(LogSize::Words(64)),
            Features {
                log_all: true,
                junk: None,
            },
            AddRegion(region(8, 255)),
            write(1, 0x3000, 1),
            AddRegion(region(32, 3)),
            write(2, 0x1000, 1),
            write(0, 0x2000, 1),
            log(LogSize::Exact),
            write(2, 0x2000, 1),
        ],
    };
    let rings = bm::Input {
        ops: vec![
            MemTable(vec![region(0, 255)]),
            VringNum { index: 0, num: 256 },
            VringAddr {
                index: 0,
                desc: RingAddr::In {
                    which: 0,
                    offset: 0x1000,
                },
                avail: RingAddr::In {
                    which: 0,
                    offset: 0x3000,
                },
                used: RingAddr::In {
                    which: 0,
                    offset: 0x4000,
                },
                log: Some(0x4000),
            },
            VringBase { index: 0, base: 0 },
            GetVringBase { index: 0 },
            Features {
                log_all: true,
                junk: None,
            },
            log(LogSize::Exact),
            write(0, 0x4000, 64),
            VringNum { index: 1, num: 8 },
            MemTable(vec![RegionIn {
                gpa: RegionGpa::Pages(16),
                size: RegionSize::Pages(31),
                offset: MmapOffset::Pages(2),
                fd: FdLen::Short(8191),
            }]),
            Write {
                gpa: WriteGpa::In {
                    which: 0,
                    offset: 0x1000,
                },
                len: 16,
            },
            Features {
                log_all: true,
                junk: Some(1 << 40),
            },
        ],
    };
    vec![
        seed("migrate", &migrate, enc_backend),
        seed("hotplug", &hotplug, enc_backend),
        seed("hostile-logs", &hostile_logs, enc_backend),
        seed("past-log", &past_log, enc_backend),
        seed("rings", &rings, enc_backend),
        seed("log-view", &view, enc_backend),
    ]
}

fn blk_seeds() -> Vec<Seed> {
    use blk::{Addr, DescIn, DescLen, Flags, LimitsIn, ReqType, Sector, SegIn};
    let limits = |capacity: u16| LimitsIn {
        capacity: Sector::Small(capacity),
        seg_max: 4,
        read_only: false,
        discard: true,
        write_zeroes: true,
        max_sectors: (1 << 20, 1 << 20),
        max_segs: (4, 4),
    };
    let d = |region: u8, offset: u16, len: DescLen, write: bool| DescIn {
        addr: Addr::In { region, offset },
        len,
        write,
    };
    let sectors = |n: u8| DescLen::Sectors { n, extra: 0 };
    let read = blk::Input {
        limits: limits(2048),
        req_type: ReqType::In,
        ioprio: 0,
        sector: Sector::Small(8),
        segments: vec![],
        trailer: vec![],
        descs: vec![
            d(0, 0x100, DescLen::Small(16), false),
            d(0, 0x1000, sectors(8), true),
            d(1, 0x200, DescLen::Small(1), true),
        ],
        pad: 0,
    };
    let write_split = blk::Input {
        limits: limits(16),
        req_type: ReqType::Out,
        ioprio: 0,
        sector: Sector::Small(15),
        segments: vec![],
        trailer: vec![],
        descs: vec![
            d(0, 0x100, DescLen::Small(7), false),
            d(0, 0x300, DescLen::Sectors { n: 0, extra: 9 }, false),
            DescIn {
                addr: Addr::End { region: 0, back: 0 },
                len: DescLen::Sectors { n: 1, extra: 0 },
                write: false,
            },
            d(2, 0x10, DescLen::Small(1), true),
        ],
        pad: 0,
    };
    let discard = blk::Input {
        limits: limits(1000),
        req_type: ReqType::WriteZeroes,
        ioprio: 0,
        sector: Sector::Small(0),
        segments: vec![
            SegIn {
                sector: Sector::Small(10),
                num: 5,
                flags: Flags::Unmap,
            },
            SegIn {
                sector: Sector::Small(999),
                num: 1,
                flags: Flags::None,
            },
            SegIn {
                sector: Sector::Small(3),
                num: 0,
                flags: Flags::None,
            },
        ],
        trailer: vec![],
        descs: vec![
            d(0, 0x100, DescLen::Small(64), false),
            d(0, 0x800, DescLen::Small(1), true),
        ],
        pad: 0,
    };
    let edges = blk::Input {
        limits: LimitsIn {
            capacity: Sector::Huge(0),
            ..limits(0)
        },
        req_type: ReqType::In,
        ioprio: 0,
        sector: Sector::Huge(0),
        segments: vec![],
        trailer: vec![],
        descs: vec![
            d(0, 0x100, DescLen::Small(16), false),
            d(0, 0x1000, sectors(2), true),
            d(0, 0x2000, DescLen::Small(1), true),
        ],
        pad: 0,
    };
    let refused = blk::Input {
        limits: limits(100),
        req_type: ReqType::GetId,
        ioprio: 0,
        sector: Sector::Small(0),
        segments: vec![],
        trailer: vec![],
        descs: vec![
            d(0, 0x100, DescLen::Small(16), false),
            d(0, 0x1000, DescLen::Small(10), true),
            DescIn {
                addr: Addr::Raw(0x18000),
                len: DescLen::Small(1),
                write: true,
            },
        ],
        pad: 5000,
    };
    let flush_id = blk::Input {
        limits: limits(100),
        req_type: ReqType::GetId,
        ioprio: 0,
        sector: Sector::Small(0),
        segments: vec![],
        trailer: vec![],
        descs: vec![
            d(0, 0x100, DescLen::Small(16), false),
            DescIn {
                addr: Addr::End {
                    region: 0,
                    back: 10,
                },
                len: DescLen::Small(21),
                write: true,
            },
        ],
        pad: 0,
    };
    vec![
        seed("read", &read, enc_blk),
        seed("write-split-header", &write_split, enc_blk),
        seed("write-zeroes", &discard, enc_blk),
        seed("read-past-u64", &edges, enc_blk),
        seed("long-chain", &refused, enc_blk),
        seed("get-id-across-regions", &flush_id, enc_blk),
    ]
}
