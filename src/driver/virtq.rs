//! A split virtqueue, driver side, living in [`GuestRam`].
//!
//! The layout is the virtio 1.x split ring: descriptor table (16 bytes per entry), available
//! ring (`flags`, `idx`, `ring[N]`, `used_event`) and used ring (`flags`, `idx`,
//! `ring[N] {id, len}`, `avail_event`). The driver writes descriptors and the avail ring, and
//! publishes the avail index with a Release store; it reads the used index with an Acquire load
//! before it reads the used elements — the same ordering a guest kernel uses, so the backend is
//! exercised exactly as under a real guest.

use std::collections::VecDeque;
use std::num::Wrapping;
use std::os::fd::AsRawFd;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_USED_F_NO_NOTIFY};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{DriverError, GuestRam};

/// Where a queue's three parts live in guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLayout {
    /// Queue size (power of two, 1..=32768).
    pub size: u16,
    /// Descriptor table (16-byte aligned).
    pub desc: u64,
    /// Available ring (2-byte aligned).
    pub avail: u64,
    /// Used ring (4-byte aligned).
    pub used: u64,
}

impl QueueLayout {
    /// Descriptor table at `base`, the available ring right after it and the used ring at the
    /// next 4 KiB boundary (on pages of its own, so tests can tell used-ring marks apart).
    pub fn new(base: u64, size: u16) -> Result<Self, DriverError> {
        if size == 0 || !size.is_power_of_two() || size > 32768 {
            return Err(DriverError::Layout(format!(
                "queue size {size} is not a power of two in 1..=32768"
            )));
        }
        if !base.is_multiple_of(16) {
            return Err(DriverError::Layout(format!(
                "descriptor table at {base:#x} is not 16-byte aligned"
            )));
        }
        let desc = base;
        let avail = desc + Self::desc_bytes(size);
        let used = (avail + Self::avail_bytes(size)).next_multiple_of(4096);
        Ok(QueueLayout {
            size,
            desc,
            avail,
            used,
        })
    }

    /// Bytes of the descriptor table.
    pub fn desc_bytes(size: u16) -> u64 {
        16 * u64::from(size)
    }
    /// Bytes of the available ring, `used_event` included.
    pub fn avail_bytes(size: u16) -> u64 {
        6 + 2 * u64::from(size)
    }
    /// Bytes of the used ring, `avail_event` included.
    pub fn used_bytes(size: u16) -> u64 {
        6 + 8 * u64::from(size)
    }
    /// One past the last byte of the queue.
    pub fn end(&self) -> u64 {
        self.used + Self::used_bytes(self.size)
    }
    /// Guest pages (4 KiB) of the used ring — the only queue pages the device writes.
    pub fn used_pages(&self) -> std::ops::RangeInclusive<u64> {
        (self.used >> 12)..=((self.end() - 1) >> 12)
    }
    fn used_event_addr(&self) -> u64 {
        self.avail + 4 + 2 * u64::from(self.size)
    }
    fn avail_event_addr(&self) -> u64 {
        self.used + 4 + 8 * u64::from(self.size)
    }
}

/// One buffer of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buf {
    /// Guest-physical address.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u32,
    /// The device may write it (`VRING_DESC_F_WRITE`).
    pub writable: bool,
}

impl Buf {
    /// A device-readable buffer.
    pub fn readable(gpa: u64, len: u32) -> Self {
        Buf {
            gpa,
            len,
            writable: false,
        }
    }
    /// A device-writable buffer.
    pub fn writable(gpa: u64, len: u32) -> Self {
        Buf {
            gpa,
            len,
            writable: true,
        }
    }
}

/// A completed chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsedElem {
    /// Head descriptor index.
    pub head: u16,
    /// Bytes the device says it wrote.
    pub len: u32,
    /// The token given to [`SplitQueue::add_chain`].
    pub token: u64,
}

struct InFlight {
    descs: Vec<u16>,
    token: u64,
}

/// A split virtqueue driver (see the module docs).
pub struct SplitQueue {
    ram: Arc<GuestRam>,
    layout: QueueLayout,
    kick: EventFd,
    call: EventFd,
    epoll: Epoll,
    free: VecDeque<u16>,
    in_flight: Vec<Option<InFlight>>,
    avail_idx: Wrapping<u16>,
    last_used: Wrapping<u16>,
    kicked_idx: Wrapping<u16>,
    event_idx: bool,
}

impl std::fmt::Debug for SplitQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SplitQueue")
            .field("layout", &self.layout)
            .field("avail_idx", &self.avail_idx.0)
            .field("last_used", &self.last_used.0)
            .field("in_flight", &self.in_flight())
            .field("event_idx", &self.event_idx)
            .finish()
    }
}

impl SplitQueue {
    /// A queue at `layout` in `ram`, its rings zeroed. `event_idx`: `VIRTIO_RING_F_EVENT_IDX` was
    /// negotiated (the driver then maintains `used_event` and honours `avail_event`).
    pub fn new(
        ram: Arc<GuestRam>,
        layout: QueueLayout,
        event_idx: bool,
    ) -> Result<Self, DriverError> {
        // Each part must be inside one region, so the backend can map it contiguously.
        ram.host_ptr(layout.desc, QueueLayout::desc_bytes(layout.size))?;
        ram.host_ptr(layout.avail, QueueLayout::avail_bytes(layout.size))?;
        ram.host_ptr(layout.used, QueueLayout::used_bytes(layout.size))?;
        let kick = EventFd::new(EFD_NONBLOCK)?;
        let call = EventFd::new(EFD_NONBLOCK)?;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            call.as_raw_fd(),
            EpollEvent::new(EventSet::IN, 0),
        )?;
        let mut q = SplitQueue {
            ram,
            layout,
            kick,
            call,
            epoll,
            free: VecDeque::new(),
            in_flight: Vec::new(),
            avail_idx: Wrapping(0),
            last_used: Wrapping(0),
            kicked_idx: Wrapping(0),
            event_idx,
        };
        q.reset()?;
        Ok(q)
    }

    /// Zeroes the rings and forgets every chain (for a device reset or a fresh start).
    pub fn reset(&mut self) -> Result<(), DriverError> {
        let l = self.layout;
        self.ram
            .fill(l.desc, QueueLayout::desc_bytes(l.size) as usize, 0)?;
        self.ram
            .fill(l.avail, QueueLayout::avail_bytes(l.size) as usize, 0)?;
        self.ram
            .fill(l.used, QueueLayout::used_bytes(l.size) as usize, 0)?;
        self.free = (0..l.size).collect();
        self.in_flight = (0..l.size).map(|_| None).collect();
        self.avail_idx = Wrapping(0);
        self.last_used = Wrapping(0);
        self.kicked_idx = Wrapping(0);
        let _ = self.call.read();
        Ok(())
    }

    /// The layout.
    pub fn layout(&self) -> QueueLayout {
        self.layout
    }
    /// Queue size.
    pub fn size(&self) -> u16 {
        self.layout.size
    }
    /// The guest RAM the queue lives in.
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }
    /// The kick eventfd (`SET_VRING_KICK`).
    pub fn kick_fd(&self) -> &EventFd {
        &self.kick
    }
    /// The call eventfd (`SET_VRING_CALL`).
    pub fn call_fd(&self) -> &EventFd {
        &self.call
    }
    /// Whether EVENT_IDX is in use.
    pub fn event_idx(&self) -> bool {
        self.event_idx
    }
    /// Switches EVENT_IDX handling (must match what was negotiated).
    pub fn set_event_idx(&mut self, on: bool) {
        self.event_idx = on;
    }
    /// The driver's avail index (chains published so far, mod 2^16). After every chain
    /// completed this is also the base a restarted device must resume from.
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx.0
    }
    /// Used entries consumed so far (mod 2^16).
    pub fn last_used(&self) -> u16 {
        self.last_used.0
    }
    /// The avail index a (re)started device should begin at (`SET_VRING_BASE`): the oldest
    /// chain not yet completed.
    pub fn device_base(&self) -> u16 {
        self.last_used.0
    }
    /// Free descriptors.
    pub fn num_free(&self) -> usize {
        self.free.len()
    }
    /// Chains published and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.in_flight.iter().filter(|c| c.is_some()).count()
    }

    /// Writes a chain of `bufs` (in order) and publishes it on the available ring. Returns
    /// the head descriptor index. Does not kick.
    pub fn add_chain(&mut self, bufs: &[Buf], token: u64) -> Result<u16, DriverError> {
        if bufs.is_empty() {
            return Err(DriverError::Invalid("empty chain".into()));
        }
        if bufs.len() > self.free.len() {
            return Err(DriverError::QueueFull {
                need: bufs.len(),
                free: self.free.len(),
            });
        }
        let descs: Vec<u16> = self.free.drain(..bufs.len()).collect();
        for (i, (b, &d)) in bufs.iter().zip(&descs).enumerate() {
            let mut flags = 0u16;
            if b.writable {
                flags |= VRING_DESC_F_WRITE as u16;
            }
            let next = descs.get(i + 1).copied();
            if next.is_some() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let mut raw = [0u8; 16];
            raw[0..8].copy_from_slice(&b.gpa.to_le_bytes());
            raw[8..12].copy_from_slice(&b.len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..16].copy_from_slice(&next.unwrap_or(0).to_le_bytes());
            if let Err(e) = self.ram.write(self.layout.desc + 16 * u64::from(d), &raw) {
                self.free.extend(descs.iter().copied());
                return Err(e);
            }
        }
        let head = descs[0];
        let slot = u64::from(self.avail_idx.0 % self.layout.size);
        self.ram
            .write(self.layout.avail + 4 + 2 * slot, &head.to_le_bytes())?;
        self.in_flight[usize::from(head)] = Some(InFlight { descs, token });
        self.avail_idx += Wrapping(1);
        // Release: descriptors and ring entry are visible before the new index.
        self.ram.store(
            self.avail_idx.0.to_le(),
            self.layout.avail + 2,
            Ordering::Release,
        )?;
        Ok(head)
    }

    /// Notifies the device unconditionally.
    pub fn kick(&mut self) -> Result<(), DriverError> {
        self.kicked_idx = self.avail_idx;
        self.kick.write(1)?;
        Ok(())
    }

    /// Notifies the device only if it asked for it: with EVENT_IDX, when the avail index
    /// crossed `avail_event`; otherwise unless `VRING_USED_F_NO_NOTIFY` is set. Returns whether
    /// it kicked.
    pub fn kick_if_needed(&mut self) -> Result<bool, DriverError> {
        // The index store must be visible before we read the device's suppression state.
        fence(Ordering::SeqCst);
        let need = if self.event_idx {
            let ev: u16 = self
                .ram
                .load::<u16>(self.layout.avail_event_addr(), Ordering::Acquire)?;
            let ev = u16::from_le(ev);
            let (new, old) = (self.avail_idx, self.kicked_idx);
            // vring_need_event(event, new, old)
            (new - Wrapping(ev) - Wrapping(1)) < (new - old)
        } else {
            let flags = u16::from_le(self.ram.load::<u16>(self.layout.used, Ordering::Acquire)?);
            flags & VRING_USED_F_NO_NOTIFY as u16 == 0
        };
        if need {
            self.kick()?;
        } else {
            self.kicked_idx = self.avail_idx;
        }
        Ok(need)
    }

    /// Takes the next used entry, if the device published one.
    pub fn pop_used(&mut self) -> Result<Option<UsedElem>, DriverError> {
        let used_idx = Wrapping(u16::from_le(
            self.ram
                .load::<u16>(self.layout.used + 2, Ordering::Acquire)?,
        ));
        if used_idx == self.last_used {
            return Ok(None);
        }
        let pending = (used_idx - self.last_used).0;
        if pending > self.layout.size {
            return Err(DriverError::Backend(format!(
                "used index {} is {pending} entries ahead of the last consumed {} (queue size {})",
                used_idx.0, self.last_used.0, self.layout.size
            )));
        }
        let slot = u64::from(self.last_used.0 % self.layout.size);
        let elem = self.layout.used + 4 + 8 * slot;
        let id = u32::from_le(self.ram.read_obj::<u32>(elem)?);
        let len = u32::from_le(self.ram.read_obj::<u32>(elem + 4)?);
        let chain = usize::try_from(id)
            .ok()
            .and_then(|i| self.in_flight.get_mut(i))
            .and_then(Option::take)
            .ok_or_else(|| {
                DriverError::Backend(format!(
                    "used entry names descriptor {id}, which is not an in-flight chain head"
                ))
            })?;
        self.free.extend(chain.descs.iter().copied());
        self.last_used += Wrapping(1);
        if self.event_idx {
            self.ram.store(
                self.last_used.0.to_le(),
                self.layout.used_event_addr(),
                Ordering::Release,
            )?;
        }
        Ok(Some(UsedElem {
            head: id as u16,
            len,
            token: chain.token,
        }))
    }

    /// Waits up to `timeout` for the next used entry, sleeping on the call eventfd: a device
    /// that does not signal when it must is caught as a timeout.
    pub fn wait_used(&mut self, timeout: Duration) -> Result<UsedElem, DriverError> {
        self.wait_inner(timeout, false)
    }

    /// Like [`wait_used`](Self::wait_used) but also polls the used ring every millisecond, for
    /// callers that do not want to depend on the device's interrupts.
    pub fn poll_used(&mut self, timeout: Duration) -> Result<UsedElem, DriverError> {
        self.wait_inner(timeout, true)
    }

    fn wait_inner(&mut self, timeout: Duration, poll: bool) -> Result<UsedElem, DriverError> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.event_idx {
                // Ask for an interrupt at the next entry, then re-check (no lost wake-up).
                self.ram.store(
                    self.last_used.0.to_le(),
                    self.layout.used_event_addr(),
                    Ordering::Release,
                )?;
                fence(Ordering::SeqCst);
            }
            if let Some(e) = self.pop_used()? {
                return Ok(e);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(DriverError::Timeout(timeout, "a used entry"));
            }
            let mut left = deadline - now;
            if poll {
                left = left.min(Duration::from_millis(1));
            }
            let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
            let mut events = [EpollEvent::default()];
            match self.epoll.wait(ms, &mut events) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
            // Drain the eventfd (non-blocking; EAGAIN when it was not the wake-up).
            let _ = self.call.read();
        }
    }

    /// Collects exactly `n` used entries within `timeout` in total.
    pub fn wait_n(&mut self, n: usize, timeout: Duration) -> Result<Vec<UsedElem>, DriverError> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            out.push(self.wait_used(left).map_err(|e| match e {
                DriverError::Timeout(..) => DriverError::Timeout(timeout, "all used entries"),
                e => e,
            })?);
        }
        Ok(out)
    }

    /// Number of times the device signalled since the last call (reads the call eventfd).
    pub fn take_interrupts(&self) -> u64 {
        self.call.read().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::RegionSpec;
    use virtio_queue::{Queue, QueueT};
    use vm_memory::GuestAddress;

    fn setup() -> (Arc<GuestRam>, SplitQueue, Queue) {
        let ram = Arc::new(GuestRam::new(&[RegionSpec::new(0, 1 << 20)]).unwrap());
        let layout = QueueLayout::new(0x1000, 16).unwrap();
        let q = SplitQueue::new(ram.clone(), layout, true).unwrap();
        let mut dev = Queue::new(16).unwrap();
        dev.set_size(16);
        dev.try_set_desc_table_address(GuestAddress(layout.desc))
            .unwrap();
        dev.try_set_avail_ring_address(GuestAddress(layout.avail))
            .unwrap();
        dev.try_set_used_ring_address(GuestAddress(layout.used))
            .unwrap();
        dev.set_event_idx(true);
        dev.set_ready(true);
        (ram, q, dev)
    }

    #[test]
    fn loopback_with_virtio_queue_device() {
        let (ram, mut q, mut dev) = setup();
        let mem = ram.memory();
        for round in 0..40u64 {
            let head = q
                .add_chain(
                    &[Buf::readable(0x8000, 16), Buf::writable(0x9000 + round, 1)],
                    round,
                )
                .unwrap();
            let chain = dev
                .pop_descriptor_chain(&*mem)
                .expect("device sees the chain");
            assert_eq!(chain.head_index(), head);
            let descs: Vec<_> = chain.collect();
            assert_eq!(descs.len(), 2);
            assert_eq!(descs[0].addr().0, 0x8000);
            assert!(!descs[0].is_write_only());
            assert_eq!(descs[1].len(), 1);
            assert!(descs[1].is_write_only());
            dev.add_used(&*mem, head, 1).unwrap();
            let e = q.pop_used().unwrap().expect("driver sees the used entry");
            assert_eq!((e.head, e.len, e.token), (head, 1, round));
            assert_eq!(q.num_free(), 16);
        }
        assert_eq!(q.avail_idx(), 40);
        assert_eq!(q.last_used(), 40);
    }

    #[test]
    fn bogus_used_entries_are_errors() {
        let (ram, mut q, _dev) = setup();
        let l = q.layout();
        q.add_chain(&[Buf::writable(0x9000, 1)], 7).unwrap();
        // A used id that is not an in-flight head.
        ram.write(l.used + 4, &999u32.to_le_bytes()).unwrap();
        ram.store(1u16.to_le(), l.used + 2, Ordering::Release)
            .unwrap();
        assert!(matches!(q.pop_used(), Err(DriverError::Backend(_))));
        // A used index far ahead of the ring.
        ram.store(100u16.to_le(), l.used + 2, Ordering::Release)
            .unwrap();
        assert!(matches!(q.pop_used(), Err(DriverError::Backend(_))));
        // Nothing published: a timeout, not a hang.
        let (_ram, mut q, _dev) = setup();
        assert!(matches!(
            q.wait_used(Duration::from_millis(20)),
            Err(DriverError::Timeout(..))
        ));
    }

    #[test]
    fn layout_checks() {
        assert!(QueueLayout::new(0, 3).is_err());
        assert!(QueueLayout::new(8, 16).is_err());
        let l = QueueLayout::new(0x10000, 256).unwrap();
        assert_eq!(l.avail, 0x11000);
        assert_eq!(l.used, 0x12000);
        assert_eq!(l.used_pages(), 0x12..=0x12);
        let ram = Arc::new(GuestRam::new(&[RegionSpec::new(0, 0x4000)]).unwrap());
        // Queue past the end of RAM.
        assert!(SplitQueue::new(ram, QueueLayout::new(0x3000, 256).unwrap(), false).is_err());
    }
}
