//! The bodies of the fuzz targets, as plain library functions.
//!
//! This directory is compiled twice: by the cargo-fuzz crate (`contrib/fuzz`, through
//! `fuzz_targets/*.rs`) and by the main crate's `tests/fuzz_replay.rs` (through `#[path]`), which
//! replays every file of `contrib/fuzz/corpus/<target>/` and
//! `contrib/fuzz/artifacts-regressions/<target>/` on each `cargo test`. It may therefore only use
//! crates both have: the main crate's dependencies and `arbitrary` (a dev-dependency there).
//!
//! Each target module has `run(data: &[u8]) -> Reached`: decode the bytes with `arbitrary`,
//! drive the code under test, check it against a model, and panic on any disagreement. Input
//! that does not decode is ignored. `Reached` counts the interesting things an input did, so the
//! seed generator can keep inputs that go deep and the replay test can prove the committed
//! corpus still does.
//!
//! The fixtures (the null device, memfds, listing set bits) are the main crate's
//! `vhost_dirtylog::test_utils` (feature `test-utils`, enabled by both builds).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs::File;

pub mod backend_messages;
pub mod blk_request;
pub mod log_region;
pub mod merge;
pub mod seeds;

/// Names of the targets, as used for corpus directories.
pub const TARGETS: [&str; 4] = ["log_region", "merge", "backend_messages", "blk_request"];

/// Runs target `name` on `data`.
pub fn run(name: &str, data: &[u8]) -> Reached {
    match name {
        "log_region" => log_region::run(data),
        "merge" => merge::run(data),
        "backend_messages" => backend_messages::run(data),
        "blk_request" => blk_request::run(data),
        other => panic!("unknown fuzz target {other}"),
    }
}

/// What one input exercised: event name -> count.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reached(pub BTreeMap<&'static str, u64>);

impl Reached {
    /// Counts one `event`.
    pub fn hit(&mut self, event: &'static str) {
        *self.0.entry(event).or_default() += 1;
    }

    /// How often `event` happened.
    pub fn get(&self, event: &str) -> u64 {
        self.0.get(event).copied().unwrap_or(0)
    }

    /// Adds `other`'s counts to these.
    pub fn absorb(&mut self, other: &Reached) {
        for (k, v) in &other.0 {
            *self.0.entry(k).or_default() += v;
        }
    }
}

/// A new memfd of `len` bytes (sparse). Panics only if the system refuses one, which is not an
/// input-dependent condition.
pub fn memfd(len: u64) -> File {
    vhost_dirtylog::test_utils::memfd("vdl-fuzz", len).expect("memfd")
}

/// The whole content of `f` (at most a few hundred KiB in these targets).
pub fn file_bytes(f: &File) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let len = f.metadata().expect("fstat").len() as usize;
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, 0).expect("pread");
    buf
}

/// Sets bits `first..=last` (all inside `bytes`) a byte at a time.
pub fn set_bits(bytes: &mut [u8], first: u64, last: u64) {
    let mut i = first;
    while i <= last {
        if i.is_multiple_of(8) && last - i >= 7 {
            bytes[(i / 8) as usize] = 0xff;
            i += 8;
        } else {
            bytes[(i / 8) as usize] |= 1 << (i % 8);
            i += 1;
        }
    }
}

/// A set of page numbers as sorted, disjoint, non-adjacent inclusive ranges: the models' view
/// of the pages a [`DirtyLog`](vhost_dirtylog::log::DirtyLog) carries past the end of its log.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PageSet(pub Vec<(u64, u64)>);

impl PageSet {
    /// Adds pages `first..=last` (`first <= last`). Binary searches and one `memmove`: the
    /// scatter operations add hundreds of ranges per input.
    pub fn add(&mut self, first: u64, last: u64) {
        let v = &mut self.0;
        // Ranges before `i` end before `first - 1`; ranges from `j` on start after `last + 1`.
        let i = v.partition_point(|&(_, b)| b.saturating_add(1) < first);
        let j = v.partition_point(|&(a, _)| a <= last.saturating_add(1));
        if i == j {
            v.insert(i, (first, last));
        } else {
            let merged = (first.min(v[i].0), last.max(v[j - 1].1));
            v[i] = merged;
            v.drain(i + 1..j);
        }
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Replaces the set by its hull (one range from its lowest to its highest page).
    pub fn hull(&mut self) {
        if let (Some(&(lo, _)), Some(&(_, hi))) = (self.0.first(), self.0.last()) {
            self.0 = vec![(lo, hi)];
        }
    }

    /// Removes every page below `end`.
    pub fn remove_below(&mut self, end: u64) {
        self.0.retain_mut(|(a, b)| {
            *a = (*a).max(end);
            *a <= *b
        });
    }

    /// The ranges of the set that lie below `end`, clipped to it.
    pub fn below(&self, end: u64) -> Vec<(u64, u64)> {
        self.0
            .iter()
            .filter(|&&(a, _)| a < end)
            .map(|&(a, b)| (a, b.min(end - 1)))
            .collect()
    }

    /// Whether page `p` is in the set.
    pub fn contains(&self, p: u64) -> bool {
        self.0.iter().any(|&(a, b)| a <= p && p <= b)
    }
}
