//! Device settings: the limits the device advertises (`MAX_*`), [`BlkConfig`] and its
//! validation, [`ConfigError`], and [`parse_serial`] for the command line.
//!
//! Separate from the device (`blk/mod.rs`) because it is plain data checked before any device
//! exists: the daemon and the `vhost-dirtylog-blk` program parse and validate it on their own.
//! Re-exported from [`crate::blk`], which is where callers name it.

use super::{io_uring_available, AioMode};
use crate::virtio_blk::ID_BYTES;

/// Largest queue size the device accepts.
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// Most queues the device supports (one worker thread each; vhost-user-backend uses a 64-bit
/// queue mask per thread).
pub const MAX_QUEUES: u16 = 64;

/// Per-segment sector limit advertised for discard and write-zeroes (2 GiB).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 22;
/// Segments per discard / write-zeroes request.
pub const MAX_DISCARD_SEG: u32 = 32;

/// Device settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlkConfig {
    /// Number of request queues (1..=64).
    pub num_queues: u16,
    /// Maximum queue size (a power of two, 2..=1024).
    pub queue_size: u16,
    /// `GET_ID` serial (at most 20 bytes; shorter is zero-padded).
    pub serial: Vec<u8>,
    /// Dataplane: io_uring (default when available) or synchronous.
    pub aio: AioMode,
}

impl Default for BlkConfig {
    fn default() -> Self {
        BlkConfig {
            num_queues: 1,
            queue_size: 256,
            serial: Vec::new(),
            aio: AioMode::Auto,
        }
    }
}

/// Invalid device settings.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Queue count out of range.
    #[error("number of queues must be between 1 and {MAX_QUEUES}, got {0}")]
    NumQueues(u16),
    /// Queue size not a power of two in range.
    #[error("queue size must be a power of two between 2 and {MAX_QUEUE_SIZE}, got {0}")]
    QueueSize(u16),
    /// Serial too long.
    #[error("serial must be at most 20 bytes, got {0}")]
    Serial(usize),
    /// `--aio io_uring` asked for but io_uring cannot be used.
    #[error("--aio io_uring: {0}")]
    Aio(String),
}

impl BlkConfig {
    /// Checks the settings.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.num_queues == 0 || self.num_queues > MAX_QUEUES {
            return Err(ConfigError::NumQueues(self.num_queues));
        }
        if self.queue_size < 2
            || self.queue_size > MAX_QUEUE_SIZE
            || !self.queue_size.is_power_of_two()
        {
            return Err(ConfigError::QueueSize(self.queue_size));
        }
        if self.serial.len() > ID_BYTES {
            return Err(ConfigError::Serial(self.serial.len()));
        }
        match self.aio {
            AioMode::IoUring => io_uring_available().map_err(ConfigError::Aio)?,
            // Probed (and its outcome logged) once per process.
            AioMode::Auto => {
                let _ = io_uring_available();
            }
            AioMode::Sync => {}
        }
        Ok(())
    }
}

/// Parses a serial given on the command line: at most 20 bytes.
pub fn parse_serial(s: &str) -> Result<Vec<u8>, ConfigError> {
    if s.len() > ID_BYTES {
        return Err(ConfigError::Serial(s.len()));
    }
    Ok(s.as_bytes().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_validation() {
        let mut c = BlkConfig::default();
        assert!(c.validate().is_ok());
        c.queue_size = 1000;
        assert!(c.validate().is_err());
        c.queue_size = 2048;
        assert!(c.validate().is_err());
        c.queue_size = 1024;
        c.num_queues = 0;
        assert!(c.validate().is_err());
        c.num_queues = 65;
        assert!(c.validate().is_err());
        assert!(parse_serial("123456789012345678901").is_err());
    }
}
