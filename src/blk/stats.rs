//! Per-queue counters: [`QueueStats`] and the page accounting behind `pages_marked`.
//!
//! Separate from the device (`blk/mod.rs`) because both dataplanes fill it — the synchronous
//! worker there and the io_uring engine in [`super::uring`] — and the daemon reports it.
//! Re-exported from [`crate::blk`].

use super::request;
use crate::log::LOG_PAGE_SHIFT;

/// Counters of one queue.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct QueueStats {
    /// Requests completed.
    pub completed: u64,
    /// Requests completed with an error status (or without a status byte).
    pub errors: u64,
    /// Reads/writes served zero-copy with `O_DIRECT`.
    pub direct_zero_copy: u64,
    /// Reads/writes served through an `O_DIRECT` bounce buffer.
    pub direct_bounce: u64,
    /// Times the ring was stopped (`GET_VRING_BASE`).
    pub stops: u64,
    /// Data bytes of completed reads and writes (and `GET_ID`), in either direction.
    pub bytes: u64,
    /// Guest pages (4 KiB) this queue wrote with dirty logging on: data of reads and `GET_ID`
    /// plus the status byte's page, counted per request (a page written by two requests counts
    /// twice). Used-ring entries are marked by the adapter and not counted here.
    pub pages_marked: u64,
}

impl QueueStats {
    /// Counts a completed request's bytes (if it succeeded) and, with logging on, the guest
    /// pages it wrote: the data of reads / `GET_ID`, and the status byte's page.
    pub(crate) fn account(&mut self, req: &request::Request, ok: bool, logging: bool) {
        if ok {
            self.bytes += req.data_len;
        }
        if logging {
            if matches!(
                req.kind,
                request::RequestKind::Read | request::RequestKind::GetId
            ) {
                self.pages_marked += req
                    .data
                    .iter()
                    .map(|s| page_span(s.addr.0, u64::from(s.len)))
                    .sum::<u64>();
            }
            self.pages_marked += 1;
        }
    }

    pub(crate) fn add(&mut self, o: &QueueStats) {
        self.completed += o.completed;
        self.errors += o.errors;
        self.direct_zero_copy += o.direct_zero_copy;
        self.direct_bounce += o.direct_bounce;
        self.stops += o.stops;
        self.bytes += o.bytes;
        self.pages_marked += o.pages_marked;
    }
}

/// Number of 4 KiB log pages `[addr, addr + len)` touches (`len > 0`).
pub(crate) fn page_span(addr: u64, len: u64) -> u64 {
    let last = addr.saturating_add(len.saturating_sub(1));
    (last >> LOG_PAGE_SHIFT) - (addr >> LOG_PAGE_SHIFT) + 1
}
