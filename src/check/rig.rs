//! The rig: everything a run sets up before its workload starts — the connection and the
//! backend handshake (features, the check that the backend can log at all, its limits), the
//! memory plan mapped as memfd guest RAM with the emulated hypervisor log, the started rings —
//! and the disk filled with the pattern.
//!
//! [`Shared`] is what the VMM thread and the queue workers both hold afterwards; its helpers
//! (a protocol call with context, `LOG_ALL` with the ring addresses, a ring's used index) are
//! used by the session, the faults and the benchmark alike.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use vhost::vhost_user::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{VIRTIO_NET_F_MQ, VIRTIO_NET_F_MRG_RXBUF};

use super::error::{proto, vmm_err, CheckError};
use super::options::{CheckOptions, Device, Fault, Workload};
use super::pattern::{self, BLOCK};
use super::plan::{plan, MemPlan};
use super::report::BackendInfo;
use crate::driver::blk::{BlkConfigInfo, BlkOp, BlkStatus};
use crate::driver::net::{self as netdrv, NetConfigInfo};
use crate::driver::{BlkQueue, Connection, DriverError, GuestRam, QueueLayout, SplitQueue};
use crate::log::{log_size_for, LogRegion, LOG_PAGE_SIZE};
use crate::vmm::MigrationBitmap;

/// What the VMM thread and the workers share.
pub(super) struct Shared {
    pub ram: Arc<GuestRam>,
    conn: Mutex<Option<Connection>>,
    /// Pages the device wrote while logging was on (derived from completed requests).
    pub written: MigrationBitmap,
    /// Logging is on: workers record device-written pages.
    pub logging: AtomicBool,
    /// A worker failed: the VMM thread stops the run.
    pub abort: AtomicBool,
    /// Send a barrier after unacknowledged messages ([`CheckOptions::barrier`]).
    pub barrier: bool,
}

/// The handshake of a run (and of a reconnect), `REPLY_ACK` only if `reply_ack`. blk:
/// [`Connection::negotiate_blk`]'s features (everything offered but `LOG_ALL`); net: what the
/// net driver handles ([`net::DRIVER_FEATURES`](crate::driver::net::DRIVER_FEATURES): no
/// offloads), and the protocol features `MQ`, `LOG_SHMFD`, `CONFIG`, `CONFIGURE_MEM_SLOTS`.
pub(super) fn negotiate(
    conn: &mut Connection,
    device: Device,
    reply_ack: bool,
) -> Result<u64, DriverError> {
    let mut protocol = VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::LOG_SHMFD
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS;
    if reply_ack {
        protocol |= VhostUserProtocolFeatures::REPLY_ACK;
    }
    let want = match device {
        Device::Blk => !0,
        Device::Net => netdrv::DRIVER_FEATURES,
    };
    conn.negotiate(want & !VhostUserVirtioFeatures::LOG_ALL.bits(), protocol)
}

/// A started ring, before a worker takes it.
pub(super) enum Ring {
    /// A virtio-blk request queue.
    Blk(BlkQueue),
    /// A virtio-net queue (even index: RX of pair `index / 2`; odd: its TX).
    Net(SplitQueue),
}

impl Shared {
    /// A `GET_FEATURES` round trip ([`Connection::barrier`]) after messages the backend may
    /// not have acknowledged (`what` names them for an error): once it returns, the backend
    /// has processed them. Sent whether or not `REPLY_ACK` was negotiated (one round trip);
    /// skipped only when [`CheckOptions::barrier`] is off.
    pub fn barrier(&self, what: &str) -> Result<(), CheckError> {
        if !self.barrier {
            return Ok(());
        }
        self.call(&format!("barrier after {what}"), |c| c.barrier())
    }

    /// The connection (locked).
    pub fn conn(&self) -> ConnGuard<'_> {
        ConnGuard(self.conn.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Replaces the connection (`None`: disconnected, the backend sees the socket close).
    pub fn set_conn(&self, conn: Option<Connection>) {
        *self.conn.lock().unwrap_or_else(|e| e.into_inner()) = conn;
    }

    /// Runs `f` on the connection; an error says it happened during `what`.
    pub fn call<T>(
        &self,
        what: &str,
        f: impl FnOnce(&mut Connection) -> Result<T, DriverError>,
    ) -> Result<T, CheckError> {
        let mut g = self.conn();
        let c = g.get().map_err(|e| proto(what, e))?;
        f(c).map_err(|e| proto(what, e))
    }

    /// `LOG_ALL` on or off, and the ring addresses of `queues` again (with the log flag when
    /// on), as QEMU does when a migration starts or is cancelled.
    pub fn set_log_all(&self, queues: &[QueueLayout], on: bool) -> Result<(), CheckError> {
        let ram = &self.ram;
        self.call("SET_FEATURES (LOG_ALL)", |c| {
            c.set_log_all(on)?;
            for (i, l) in queues.iter().enumerate() {
                c.set_vring_addr_at(i, ram, *l)?;
            }
            Ok(())
        })?;
        self.barrier("SET_FEATURES (LOG_ALL) and SET_VRING_ADDR")
    }

    /// Re-sends the same addresses of the rings of `queues` `times` times each (a
    /// `SET_VRING_ADDR` storm, flags as `LOG_ALL` dictates), then a barrier. Returns the
    /// messages sent.
    pub fn vring_addr_storm(&self, queues: &[QueueLayout], times: u32) -> Result<u64, CheckError> {
        let ram = &self.ram;
        let mut n = 0;
        self.call("SET_VRING_ADDR (storm)", |c| {
            for _ in 0..times {
                for (i, l) in queues.iter().enumerate() {
                    c.set_vring_addr_at(i, ram, *l)?;
                    n += 1;
                }
            }
            Ok(())
        })?;
        self.barrier("SET_VRING_ADDR (storm)")?;
        Ok(n)
    }

    /// The used index the device of the ring at `queue` has published.
    pub fn used_idx(&self, queue: &QueueLayout) -> Result<u16, CheckError> {
        self.ram
            .load(queue.used + 2, Ordering::Acquire)
            .map(u16::from_le)
            .map_err(|e| CheckError::Setup(e.to_string()))
    }

    /// `Err` once a worker has failed (it raised [`abort`](Self::abort)).
    pub fn check_abort(&self) -> Result<(), CheckError> {
        if self.abort.load(Ordering::SeqCst) {
            return Err(CheckError::Protocol("a queue worker failed".into()));
        }
        Ok(())
    }
}

/// The locked connection; dereferences to it (it is present except during a reconnect).
pub(super) struct ConnGuard<'a>(MutexGuard<'a, Option<Connection>>);

impl ConnGuard<'_> {
    /// Runs a frontend operation on the connection.
    pub fn start_queue(
        &mut self,
        index: usize,
        q: &crate::driver::SplitQueue,
    ) -> Result<(), DriverError> {
        self.get()?.start_queue(index, q)
    }

    /// Runs `f` on the connection.
    pub fn with<T>(
        &mut self,
        f: impl FnOnce(&mut Connection) -> Result<T, DriverError>,
    ) -> Result<T, CheckError> {
        let c = self.get()?;
        f(c).map_err(CheckError::from)
    }

    fn get(&mut self) -> Result<&mut Connection, DriverError> {
        self.0
            .as_mut()
            .ok_or_else(|| DriverError::Invalid("not connected".into()))
    }
}

/// Everything set up before the workload starts.
pub(super) struct Rig {
    pub shared: Arc<Shared>,
    pub plan: MemPlan,
    /// The started rings, one per queue (taken by the worker pool).
    pub queues: Vec<Ring>,
    /// net: queue pairs driven (0 for blk).
    pub pairs: u16,
    /// net: the RX buffer size in effect (bytes).
    pub rx_buf: u32,
    pub backend: BackendInfo,
    /// The emulated hypervisor log of the guest's own writes.
    pub kvm: Arc<LogRegion>,
    pub depth: usize,
    pub max_segs: usize,
    pub max_seg_len: u64,
    /// Largest request the backend's segment limits allow (a multiple of 4 KiB).
    pub max_req: u64,
    pub salt: u64,
}

/// `Err(Unsupported)` unless the backend offers what dirty logging needs: `VHOST_F_LOG_ALL`
/// among its virtio features (`offered`) and `VHOST_USER_PROTOCOL_F_LOG_SHMFD` among its
/// protocol features (`protocol`, valid only if it offers `VHOST_USER_F_PROTOCOL_FEATURES`).
fn require_logging(offered: u64, protocol: VhostUserProtocolFeatures) -> Result<(), CheckError> {
    let virtio = VhostUserVirtioFeatures::from_bits_truncate(offered);
    if !virtio.contains(VhostUserVirtioFeatures::LOG_ALL) {
        return Err(CheckError::Unsupported(
            "it does not offer VHOST_F_LOG_ALL".into(),
        ));
    }
    if !virtio.contains(VhostUserVirtioFeatures::PROTOCOL_FEATURES)
        || !protocol.contains(VhostUserProtocolFeatures::LOG_SHMFD)
    {
        return Err(CheckError::Unsupported(
            "it does not offer VHOST_USER_PROTOCOL_F_LOG_SHMFD, so it cannot map a shared-memory log"
                .into(),
        ));
    }
    Ok(())
}

impl Rig {
    /// Connects, negotiates, checks that the backend can log, plans memory (data slots of `slot`
    /// bytes) and starts the rings.
    pub fn new(opts: &CheckOptions, slot: u64) -> Result<Rig, CheckError> {
        opts.validate()?;
        let sock = opts.socket.display().to_string();
        let mut conn = Connection::connect(&opts.socket, opts.timeout)
            .map_err(|e| proto(&format!("cannot connect to {sock}"), e))?;
        conn.set_timeout(Some(opts.timeout))
            .map_err(|e| CheckError::Setup(format!("watchdog: {e}")))?;
        negotiate(&mut conn, opts.device, opts.reply_ack)
            .map_err(|e| proto("feature negotiation", e))?;
        let offered = conn.offered_features();
        require_logging(offered, conn.offered_protocol_features())?;
        match opts.device {
            Device::Blk => Self::blk(opts, slot, conn, sock),
            Device::Net => Self::net(opts, conn, sock),
        }
    }

    /// The net part of [`new`](Self::new): queue pairs, the RX buffer size, the memory plan
    /// (data slots hold RX buffers; each ring's scratch area TX frame slots), the rings.
    fn net(opts: &CheckOptions, mut conn: Connection, sock: String) -> Result<Rig, CheckError> {
        let offered = conn.offered_features();
        let acked = conn.acked_features();
        let protocol = conn.protocol_features();
        let has = |bit: u32| acked & (1u64 << bit) != 0;
        if !has(VIRTIO_F_VERSION_1) {
            return Err(CheckError::Unsupported(
                "it does not offer VIRTIO_F_VERSION_1 (the checker drives virtio 1.x net devices only)"
                    .into(),
            ));
        }
        let cfg = if protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            let raw = conn.get_config(0, 12).map_err(|e| proto("GET_CONFIG", e))?;
            Some(NetConfigInfo::parse(&raw))
        } else {
            None
        };
        let queue_num = if protocol.contains(VhostUserProtocolFeatures::MQ) {
            conn.queue_num()
        } else {
            2
        };
        // Several pairs need VIRTIO_NET_F_MQ (virtio spec 5.1.6.5.5); the config space may
        // lower the count.
        let mut max_pairs = if has(VIRTIO_NET_F_MQ) {
            (queue_num / 2).max(1)
        } else {
            1
        };
        if let Some(c) = &cfg {
            if has(VIRTIO_NET_F_MQ) && c.max_virtqueue_pairs > 0 {
                max_pairs = max_pairs.min(u64::from(c.max_virtqueue_pairs));
            }
        }
        let pairs = opts.queues.unwrap_or(max_pairs.clamp(1, 2) as u16);
        if u64::from(pairs) > max_pairs {
            return Err(CheckError::Invalid(format!(
                "the backend supports {max_pairs} queue pair(s), {pairs} requested"
            )));
        }
        // Without mergeable RX buffers every frame must fit one buffer (virtio spec
        // 5.1.6.3.1).
        let mut rx_buf = opts.net.rx_buf;
        if !has(VIRTIO_NET_F_MRG_RXBUF) {
            rx_buf = rx_buf.max((opts.net.frame_max + 12).next_multiple_of(8));
        }
        let slot = (2 * u64::from(rx_buf)).next_multiple_of(4096).max(8192);
        let nq = 2 * pairs;
        let plan = plan(
            Device::Net,
            &opts.layout,
            nq,
            opts.queue_size,
            opts.isolate_avail_event,
            slot,
            opts.faults.contains(&Fault::MemTable),
        )?;
        let need = 2 * usize::from(opts.queue_size);
        if plan.slots.len() / usize::from(pairs) < need {
            return Err(CheckError::Invalid(format!(
                "not enough guest memory: {} RX buffer slots of {} KiB per queue pair, {need} wanted",
                plan.slots.len() / usize::from(pairs),
                slot >> 10
            )));
        }
        let (ram, kvm) = Self::ram(&plan, &mut conn)?;
        let mut queues = Vec::new();
        for i in 0..usize::from(nq) {
            let q = SplitQueue::new(ram.clone(), plan.queues[i], conn.event_idx())
                .map_err(|e| CheckError::Setup(e.to_string()))?;
            conn.start_queue(i, &q)
                .map_err(|e| proto(&format!("starting queue {i}"), e))?;
            queues.push(Ring::Net(q));
        }
        let backend = BackendInfo {
            socket: sock,
            features: format!("{offered:#x}"),
            protocol_features: format!("{:#x}", conn.offered_protocol_features().bits()),
            queue_num,
            event_idx: conn.event_idx(),
            mem_slots: protocol.contains(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS),
            reply_ack: protocol.contains(VhostUserProtocolFeatures::REPLY_ACK),
            mergeable_rx: has(VIRTIO_NET_F_MRG_RXBUF),
            mac: cfg.map(|c| {
                c.mac
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<Vec<_>>()
                    .join(":")
            }),
            ..BackendInfo::default()
        };
        Self::assemble(
            opts, conn, ram, kvm, plan, queues, backend, 1, pairs, rx_buf,
        )
    }

    /// Guest RAM for `plan` with the emulated hypervisor log of the guest's own writes, handed
    /// to the backend with `SET_MEM_TABLE`.
    fn ram(
        plan: &MemPlan,
        conn: &mut Connection,
    ) -> Result<(Arc<GuestRam>, Arc<LogRegion>), CheckError> {
        let ram =
            Arc::new(GuestRam::new(&plan.regions).map_err(|e| CheckError::Setup(e.to_string()))?);
        let kvm_size = log_size_for(plan.max_gpa_end())
            .ok_or_else(|| CheckError::Invalid("guest memory too large".into()))?;
        let kvm = Arc::new(
            LogRegion::anonymous(kvm_size as usize)
                .map_err(|e| CheckError::Setup(format!("guest dirty log: {e}")))?,
        );
        ram.track_writes(Some(kvm.clone()));
        conn.set_mem_table(&ram)
            .map_err(|e| proto("SET_MEM_TABLE", e))?;
        Ok((ram, kvm))
    }

    /// The rig from its parts (blk's limits default for net).
    #[allow(clippy::too_many_arguments)]
    fn assemble(
        opts: &CheckOptions,
        conn: Connection,
        ram: Arc<GuestRam>,
        kvm: Arc<LogRegion>,
        plan: MemPlan,
        queues: Vec<Ring>,
        backend: BackendInfo,
        depth: usize,
        pairs: u16,
        rx_buf: u32,
    ) -> Result<Rig, CheckError> {
        let written =
            MigrationBitmap::new(plan.max_gpa_end().div_ceil(LOG_PAGE_SIZE)).map_err(vmm_err)?;
        Ok(Rig {
            shared: Arc::new(Shared {
                ram,
                conn: Mutex::new(Some(conn)),
                written,
                logging: AtomicBool::new(false),
                abort: AtomicBool::new(false),
                barrier: opts.barrier,
            }),
            plan,
            queues,
            pairs,
            rx_buf,
            backend,
            kvm,
            depth,
            max_segs: 1,
            max_seg_len: 4096,
            max_req: 4096,
            salt: pattern::salt_for(opts.seed),
        })
    }

    /// The blk part of [`new`](Self::new).
    fn blk(
        opts: &CheckOptions,
        slot: u64,
        mut conn: Connection,
        sock: String,
    ) -> Result<Rig, CheckError> {
        let offered = conn.offered_features();
        let acked = conn.acked_features();
        let protocol = conn.protocol_features();
        let cfg = if protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            let raw = conn
                .get_config(0, BlkConfigInfo::LEN as u32)
                .map_err(|e| proto("GET_CONFIG", e))?;
            Some(BlkConfigInfo::parse(&raw))
        } else {
            None
        };
        let has = |bit: u32| acked & (1u64 << bit) != 0;
        let mut queue_num = if protocol.contains(VhostUserProtocolFeatures::MQ) {
            conn.queue_num()
        } else {
            1
        };
        if has(VIRTIO_BLK_F_MQ) {
            if let Some(c) = &cfg {
                queue_num = queue_num.min(u64::from(c.num_queues.max(1)));
            }
        }
        let nq = opts.queues.unwrap_or(queue_num.clamp(1, 2) as u16);
        if u64::from(nq) > queue_num {
            return Err(CheckError::Invalid(format!(
                "the backend supports {queue_num} queue(s), {nq} requested"
            )));
        }
        let capacity = cfg.map_or(0, |c| c.capacity.saturating_mul(512));
        let span = if capacity > 0 {
            opts.disk_span.min(capacity)
        } else {
            opts.disk_span
        } / BLOCK
            * BLOCK;
        let per_queue = if opts.workload == Workload::Read {
            span
        } else {
            span / u64::from(nq) / BLOCK * BLOCK
        };
        if per_queue < opts.min_io {
            return Err(CheckError::Invalid(format!(
            "the disk span ({span} bytes) is too small for {nq} queue(s) and requests of at least {} bytes",
            opts.min_io
        )));
        }
        let read_only = has(VIRTIO_BLK_F_RO);
        if read_only && opts.workload != Workload::Read {
            return Err(CheckError::Invalid(
                "the device is read-only: use --workload read".into(),
            ));
        }
        if read_only && opts.prepare.unwrap_or(true) {
            return Err(CheckError::Invalid(
            "the device is read-only, so the checker cannot write its pattern: create the image with \
             `vhost-dirtylog-check --write-image PATH` (same --seed and --disk-span) and pass --no-prepare"
                .into(),
        ));
        }
        let seg_max = match &cfg {
            Some(c) if has(VIRTIO_BLK_F_SEG_MAX) => c.seg_max.max(1) as usize,
            _ => 4,
        };
        let max_segs = seg_max.min(4);
        let size_max = match &cfg {
            Some(c) if has(VIRTIO_BLK_F_SIZE_MAX) && c.size_max >= 512 => u64::from(c.size_max),
            _ => u64::MAX,
        };
        let max_seg_len = slot.min(size_max) / 512 * 512;
        if max_seg_len * max_segs as u64 / BLOCK * BLOCK < opts.min_io {
            return Err(CheckError::Invalid(format!(
            "the backend's limits (size_max {size_max}, seg_max {seg_max}) cannot carry requests of {} bytes",
            opts.min_io
        )));
        }
        let depth = usize::from(opts.depth).min(usize::from(opts.queue_size) / (max_segs + 2));
        if depth == 0 {
            return Err(CheckError::Invalid(format!(
                "a queue of {} entries cannot hold a request of {} descriptors",
                opts.queue_size,
                max_segs + 2
            )));
        }
        let plan = plan(
            Device::Blk,
            &opts.layout,
            nq,
            opts.queue_size,
            opts.isolate_avail_event,
            slot,
            opts.faults.contains(&Fault::MemTable),
        )?;
        let per_queue_slots = plan.slots.len() / usize::from(nq);
        if per_queue_slots < depth * max_segs {
            return Err(CheckError::Invalid(format!(
            "not enough guest memory: {per_queue_slots} buffer slots of {} KiB per queue, {} needed for {depth} requests in flight",
            slot >> 10,
            depth * max_segs
        )));
        }
        let (ram, kvm) = Self::ram(&plan, &mut conn)?;
        let mut queues = Vec::new();
        for i in 0..usize::from(nq) {
            let q = BlkQueue::new(
                ram.clone(),
                plan.queues[i],
                plan.scratch[i],
                conn.event_idx(),
            )
            .map_err(|e| CheckError::Setup(e.to_string()))?;
            conn.start_queue(i, q.queue())
                .map_err(|e| proto(&format!("starting queue {i}"), e))?;
            queues.push(Ring::Blk(q));
        }
        let backend = BackendInfo {
            socket: sock,
            features: format!("{offered:#x}"),
            protocol_features: format!("{:#x}", conn.offered_protocol_features().bits()),
            queue_num,
            capacity,
            span,
            read_only,
            event_idx: conn.event_idx(),
            mem_slots: protocol.contains(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS),
            reply_ack: protocol.contains(VhostUserProtocolFeatures::REPLY_ACK),
            ..BackendInfo::default()
        };
        let mut rig = Self::assemble(opts, conn, ram, kvm, plan, queues, backend, depth, 0, 0)?;
        rig.max_segs = max_segs;
        rig.max_seg_len = max_seg_len;
        rig.max_req = (max_seg_len * max_segs as u64 / BLOCK * BLOCK).min(opts.max_io);
        Ok(rig)
    }

    /// Writes the generation-0 pattern over the disk span through queue 0.
    pub fn prepare(&mut self, opts: &CheckOptions) -> Result<(), CheckError> {
        let s = self;
        let span = s.backend.span;
        let chunk = s.max_req.min(128 << 10);
        let ram = s.shared.ram.clone();
        let Some(Ring::Blk(q)) = s.queues.first_mut() else {
            return Err(CheckError::Invalid(
                "no blk queue to prepare the disk with".into(),
            ));
        };
        let depth = s.depth.min(s.plan.slots.len() / s.max_segs).max(1);
        let mut free: Vec<usize> = (0..depth).collect();
        let mut buf = vec![0u8; s.max_seg_len as usize];
        let mut off = 0u64;
        let mut done = 0u64;
        let deadline_each = opts.timeout;
        while done < span {
            while off < span {
                let Some(k) = free.pop() else { break };
                let len = chunk.min(span - off);
                let mut segs = Vec::new();
                let mut at = 0;
                for j in 0..s.max_segs {
                    if at >= len {
                        break;
                    }
                    let l = s.max_seg_len.min(len - at);
                    let gpa = s.plan.slots[k * s.max_segs + j];
                    pattern::fill(&mut buf[..l as usize], off + at, 0, s.salt);
                    ram.write(gpa, &buf[..l as usize])?;
                    segs.push((gpa, l as u32));
                    at += l;
                }
                q.submit(
                    BlkOp::Write {
                        sector: off / 512,
                        data: &segs,
                    },
                    k as u64,
                )?;
                off += len;
            }
            q.kick()?;
            let c = q
                .wait(deadline_each)
                .map_err(|e| proto("preparing the disk", e))?;
            if c.blk_status() != BlkStatus::Ok {
                return Err(CheckError::Protocol(format!(
                    "preparing the disk: a write completed with status {:?}",
                    c.blk_status()
                )));
            }
            free.push(c.token as usize);
            done += chunk;
        }
        // Everything completed (one completion per chunk); flush so the pattern is durable.
        let c = q.flush(opts.timeout).map_err(|e| proto("flush", e))?;
        if !c.is_ok() && c.blk_status() != BlkStatus::Unsupp {
            return Err(CheckError::Protocol(format!(
                "flush after preparing the disk: status {:?}",
                c.blk_status()
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logging_needs_log_all_and_log_shmfd() {
        let all = VhostUserVirtioFeatures::LOG_ALL | VhostUserVirtioFeatures::PROTOCOL_FEATURES;
        let shm = VhostUserProtocolFeatures::LOG_SHMFD | VhostUserProtocolFeatures::MQ;
        assert!(require_logging(all.bits() | 1 << VIRTIO_BLK_F_RO, shm).is_ok());
        let no_log_all = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let e = require_logging(no_log_all, shm).unwrap_err();
        assert!(matches!(&e, CheckError::Unsupported(m) if m.contains("VHOST_F_LOG_ALL")));
        let e = require_logging(all.bits(), VhostUserProtocolFeatures::MQ).unwrap_err();
        assert!(matches!(&e, CheckError::Unsupported(m) if m.contains("LOG_SHMFD")));
        // Protocol features mean nothing unless VHOST_USER_F_PROTOCOL_FEATURES is offered.
        let e = require_logging(VhostUserVirtioFeatures::LOG_ALL.bits(), shm).unwrap_err();
        assert_eq!(e.exit_code(), super::super::error::EXIT_UNSUPPORTED);
    }
}
