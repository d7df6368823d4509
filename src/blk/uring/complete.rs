//! The completion side of the io_uring engine: reaping CQEs, advancing or finishing each
//! request (short transfers resumed, bounce chunks copied, writethrough syncs queued), the
//! explicit dirty-log marks for zero-copy reads, the status byte and the used ring.
//!
//! Separate from the submission side ([`super::submit`]) and the engine's state and run loop
//! ([`super`]): these are the `impl Engine` methods that *take* work out of the ring, where
//! DESIGN invariant 2 (data before mark) is kept.

use std::io;

use vhost_user_backend::VringT;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};
use vm_memory::Bytes;

use super::{Engine, Step};
use crate::blk::disk::unsupported;
use crate::blk::io::{gather, scatter, DataPath, IoContext, Mem};
use crate::blk::request::{Request, RequestKind};
use crate::blk::vring::BlkVring;

impl Engine {
    /// Processes every available completion; true if any request finished or moved on.
    pub(super) fn reap(&mut self, vring: &BlkVring, ctx: &IoContext<'_>, qidx: usize) -> bool {
        self.cqes.clear();
        for c in self.ring.completion() {
            self.cqes.push((c.user_data(), c.result()));
        }
        self.submitted = self.submitted.saturating_sub(self.cqes.len());
        if let Some(old) = &mut self.retired {
            for c in old.completion() {
                self.cqes.push((c.user_data(), c.result()));
            }
        }
        if self.cqes.is_empty() {
            return false;
        }
        let cqes = std::mem::take(&mut self.cqes);
        for &(ud, res) in &cqes {
            self.on_cqe(ud, res, ctx, qidx);
            if self.publish_now {
                // A device completion: the driver may be idle waiting for it. Hand it over
                // now, not after the rest of the batch (EVENT_IDX still decides the signal).
                self.publish_now = false;
                self.publish(vring, qidx);
                self.signal(vring, qidx);
            }
        }
        self.cqes = cqes;
        self.publish(vring, qidx);
        true
    }

    /// Puts the finished requests in the used ring and releases them from the quiesce gate.
    fn publish(&mut self, vring: &BlkVring, qidx: usize) {
        if !self.done.is_empty() {
            let mut state = vring.get_mut();
            for &(head, len) in &self.done {
                if let Err(e) = state.add_used(head, len) {
                    log::error!("queue {qidx}: cannot add used entry for descriptor {head}: {e}");
                }
            }
            drop(state);
            vring.gate().sub(self.done.len());
            self.done.clear();
            self.need_signal = true;
        }
    }

    fn on_cqe(&mut self, ud: u64, res: i32, ctx: &IoContext<'_>, qidx: usize) {
        if ud == super::submit::DELAY_USER_DATA {
            return;
        }
        let slot = (ud & 0xffff_ffff) as usize;
        let sub = (ud >> 32) as usize;
        let Some(f) = self.slots.get_mut(slot).and_then(|s| s.as_deref_mut()) else {
            log::error!("queue {qidx}: completion for unknown slot {slot}");
            return;
        };
        f.pending = f.pending.saturating_sub(1);
        let data_len = f.req.data_len;
        let mut again = false;
        match &mut f.step {
            Step::Vectored {
                write,
                iovs,
                next,
                offset,
                ..
            } => {
                if res < 0 {
                    f.err.get_or_insert(io::Error::from_raw_os_error(-res));
                } else if res == 0 {
                    f.err.get_or_insert(io::Error::from(if *write {
                        io::ErrorKind::WriteZero
                    } else {
                        io::ErrorKind::UnexpectedEof
                    }));
                } else {
                    // Short transfer: resume after the bytes that moved.
                    let mut n = res as usize;
                    *offset += n as u64;
                    while n > 0 && *next < iovs.len() {
                        let v = &mut iovs[*next];
                        if n >= v.iov_len {
                            n -= v.iov_len;
                            *next += 1;
                        } else {
                            // SAFETY: `n < iov_len`: the pointer stays inside the same buffer.
                            v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n).cast() };
                            v.iov_len -= n;
                            n = 0;
                        }
                    }
                    again = *next < iovs.len();
                }
            }
            Step::Bounce {
                write, buf, pos, n, ..
            } => {
                if res <= 0 {
                    f.err.get_or_insert(if res < 0 {
                        io::Error::from_raw_os_error(-res)
                    } else {
                        io::ErrorKind::UnexpectedEof.into()
                    });
                } else {
                    let got = (res as usize).min(*n);
                    let r = if *write {
                        Ok(())
                    } else {
                        // Through vm-memory: marked by the region bitmap.
                        scatter(&f.mem, &f.req.data, *pos, &buf.as_slice()[..got])
                    };
                    match r {
                        Err(e) => {
                            f.err.get_or_insert(e);
                        }
                        Ok(()) => {
                            *pos += got as u64;
                            if *pos < data_len {
                                let chunk = buf.as_slice().len() as u64;
                                *n = (data_len - *pos).min(chunk) as usize;
                                if *write {
                                    if let Err(e) = gather(
                                        &f.mem,
                                        &f.req.data,
                                        *pos,
                                        &mut buf.as_mut_slice()[..*n],
                                    ) {
                                        f.err.get_or_insert(e);
                                    } else {
                                        again = true;
                                    }
                                } else {
                                    again = true;
                                }
                            }
                        }
                    }
                }
            }
            Step::Flush | Step::Sync => {
                if res < 0 {
                    f.err.get_or_insert(io::Error::from_raw_os_error(-res));
                }
            }
            Step::Ranges { ranges, discard } => {
                if res < 0 {
                    let e = io::Error::from_raw_os_error(-res);
                    if !unsupported(&e) {
                        f.err.get_or_insert(e);
                    } else if !*discard {
                        // No fallocate mode for this file system: the synchronous fallback
                        // (zero range, else written zeroes). Discard is a hint: done.
                        if let Some(r) = ranges.get(sub) {
                            if let Err(e) = ctx.disk.write_zeroes(r.offset(), r.len_bytes(), false)
                            {
                                f.err.get_or_insert(e);
                            }
                        }
                    }
                }
            }
        }
        if again {
            self.push_step(slot, ctx);
            return;
        }
        if f.pending > 0 {
            return;
        }
        let writes = matches!(
            f.req.kind,
            RequestKind::Write | RequestKind::Discard(_) | RequestKind::WriteZeroes(_)
        );
        if writes && !ctx.writeback && !f.synced && f.err.is_none() {
            f.synced = true;
            f.step = Step::Sync;
            self.push_step(slot, ctx);
            return;
        }
        self.finish(slot, ctx, qidx);
    }

    fn finish(&mut self, slot: usize, ctx: &IoContext<'_>, qidx: usize) {
        let Some(f) = self.slots[slot].take() else {
            return;
        };
        self.free.push(slot);
        let f = *f;
        if let Step::Vectored { mark: true, .. } = f.step {
            // The kernel wrote these guest bytes behind vm-memory: mark them now that the
            // completion arrived, also on error (part of the data may have landed).
            for seg in &f.req.data {
                ctx.log.mark(seg.addr.0, u64::from(seg.len));
            }
        }
        self.stats.completed += 1;
        match f.path {
            DataPath::DirectZeroCopy => self.stats.direct_zero_copy += 1,
            DataPath::DirectBounce => self.stats.direct_bounce += 1,
            _ => {}
        }
        // Page-cache completions mostly arrive inside the submit call, in a stream the driver
        // is busy with; one notification per batch serves them (a signal after every reap
        // cost 5-9% of page-cache IOPS here).
        self.publish_now = matches!(f.path, DataPath::DirectZeroCopy | DataPath::DirectBounce);
        let ok = match &f.err {
            None => true,
            Some(e) => {
                self.stats.errors += 1;
                log::warn!(
                    "queue {qidx}: {:?} at sector {} failed: {e}",
                    f.req.kind,
                    f.req.sector
                );
                false
            }
        };
        self.stats.account(&f.req, ok, ctx.log.is_logging());
        let written = match f.req.kind {
            RequestKind::Read => u32::try_from(f.req.data_len).unwrap_or(u32::MAX),
            _ => 0,
        };
        let len = finish_status(&f.mem, &f.req, ok, written, qidx);
        self.done.push((f.head, len));
    }
}

/// Writes the status byte (through vm-memory: marked) and returns the used length.
pub(super) fn finish_status(mem: &Mem, req: &Request, ok: bool, written: u32, qidx: usize) -> u32 {
    let (status, written) = if ok {
        (VIRTIO_BLK_S_OK as u8, written)
    } else {
        (VIRTIO_BLK_S_IOERR as u8, 0)
    };
    if let Err(e) = mem.write_obj(status, req.status) {
        log::warn!("queue {qidx}: cannot write status byte: {e}");
        return written;
    }
    written.saturating_add(1)
}
