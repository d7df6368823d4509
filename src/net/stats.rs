//! Per-queue-pair counters ([`PairStats`]).
//!
//! Bad input (from the guest or the port) is counted here and logged rate-limited by the
//! dataplane ([`RateLimit`]): the first few occurrences of each kind at `warn`, the rest at
//! `debug`, so a hostile guest cannot flood the log.

/// Counters of one queue pair. Frames and bytes are Ethernet frames without the virtio-net
/// header.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct PairStats {
    /// Frames put in the guest's RX buffers.
    pub rx_frames: u64,
    /// Bytes of those frames.
    pub rx_bytes: u64,
    /// RX buffers (descriptor chains) used: more than `rx_frames` when frames span several
    /// mergeable buffers.
    pub rx_buffers: u64,
    /// RX bursts that published a used index (one index store and at most one interrupt each).
    pub rx_bursts: u64,
    /// Frames from the port shorter than an Ethernet header (dropped).
    pub rx_runts: u64,
    /// Frames from the port longer than `MAX_FRAME_LEN` (dropped).
    pub rx_oversized: u64,
    /// Frames that fit in no RX buffer the guest offers (without `MRG_RXBUF`), dropped.
    pub rx_too_big_for_buffer: u64,
    /// RX chains the device could not use (read-only or out-of-memory descriptors), returned
    /// with length 0.
    pub rx_bad_chains: u64,
    /// Times a frame had to wait for the guest to post RX buffers.
    pub rx_no_buffers: u64,
    /// Port read errors.
    pub rx_port_errors: u64,
    /// Frames taken from the guest's TX ring and sent.
    pub tx_frames: u64,
    /// Bytes of those frames.
    pub tx_bytes: u64,
    /// TX chains longer than `MAX_FRAME_LEN` + header (dropped, completed).
    pub tx_oversized: u64,
    /// TX frames shorter than an Ethernet header (dropped, completed).
    pub tx_runts: u64,
    /// TX chains with descriptors outside guest memory or device-writable (dropped, completed).
    pub tx_bad_chains: u64,
    /// TX frames the port had no peer for or failed to send (dropped).
    pub tx_dropped: u64,
    /// Times the port was full: TX waited for it to drain (back-pressure, nothing dropped).
    pub tx_blocked: u64,
    /// Times the rings of the pair were stopped (`GET_VRING_BASE`).
    pub stops: u64,
    /// RX writes marked through the pair's log batch while logging was on (batched marks
    /// only; `BatchStats::marks`).
    pub log_marks: u64,
    /// Atomic read-modify-writes the batch issued on the log for them (one per distinct log
    /// word per flush; `BatchStats::log_rmws`). Plain marks would issue at least one per mark.
    pub log_rmws: u64,
}

impl PairStats {
    /// Adds `o` to `self`.
    pub fn add(&mut self, o: &PairStats) {
        self.rx_frames += o.rx_frames;
        self.rx_bytes += o.rx_bytes;
        self.rx_buffers += o.rx_buffers;
        self.rx_bursts += o.rx_bursts;
        self.rx_runts += o.rx_runts;
        self.rx_oversized += o.rx_oversized;
        self.rx_too_big_for_buffer += o.rx_too_big_for_buffer;
        self.rx_bad_chains += o.rx_bad_chains;
        self.rx_no_buffers += o.rx_no_buffers;
        self.rx_port_errors += o.rx_port_errors;
        self.tx_frames += o.tx_frames;
        self.tx_bytes += o.tx_bytes;
        self.tx_oversized += o.tx_oversized;
        self.tx_runts += o.tx_runts;
        self.tx_bad_chains += o.tx_bad_chains;
        self.tx_dropped += o.tx_dropped;
        self.tx_blocked += o.tx_blocked;
        self.stops += o.stops;
        self.log_marks += o.log_marks;
        self.log_rmws += o.log_rmws;
    }

    /// Frames dropped for bad input, either direction.
    pub fn errors(&self) -> u64 {
        self.rx_runts
            + self.rx_oversized
            + self.rx_too_big_for_buffer
            + self.rx_bad_chains
            + self.rx_port_errors
            + self.tx_oversized
            + self.tx_runts
            + self.tx_bad_chains
    }
}

/// Rate limit for log lines about bad input: the first [`RateLimit::LOUD`] at `warn`, then
/// `debug`.
#[derive(Debug, Default, Clone, Copy)]
pub struct RateLimit(u64);

impl RateLimit {
    /// Lines logged at `warn` before switching to `debug`.
    pub const LOUD: u64 = 8;

    /// The level for the next line.
    pub fn level(&mut self) -> log::Level {
        self.0 += 1;
        if self.0 <= Self::LOUD {
            log::Level::Warn
        } else {
            log::Level::Debug
        }
    }
}
