//! Why a run could not produce a verdict, and the process exit statuses the checker maps its
//! outcomes to.
//!
//! A leaf of the module graph: every other file of `check` may use it, it uses none of them.

use crate::driver::DriverError;

/// Exit status: no lost page, no bad data.
pub const EXIT_OK: i32 = 0;
/// Exit status: at least one lost page.
pub const EXIT_LOST: i32 = 1;
/// Exit status: protocol error, backend failure, or the run could not complete.
pub const EXIT_PROTOCOL: i32 = 2;
/// Exit status: the backend does not support dirty logging.
pub const EXIT_UNSUPPORTED: i32 = 3;
/// Exit status: no lost page, but the device returned wrong data or I/O errors.
pub const EXIT_DATA: i32 = 4;
/// Exit status: invalid options.
pub const EXIT_USAGE: i32 = 64;

/// Why a run could not produce a verdict.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// The backend cannot be migrated at all (no `VHOST_F_LOG_ALL` / `LOG_SHMFD`).
    #[error("backend does not support dirty logging: migration impossible ({0})")]
    Unsupported(String),
    /// The backend broke the protocol, failed a request, stalled, or went away.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A local failure (memory, file descriptors).
    #[error("{0}")]
    Setup(String),
    /// The options cannot work (with this backend).
    #[error("invalid options: {0}")]
    Invalid(String),
}

impl CheckError {
    /// The process exit status for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            CheckError::Unsupported(_) => EXIT_UNSUPPORTED,
            CheckError::Protocol(_) | CheckError::Setup(_) => EXIT_PROTOCOL,
            CheckError::Invalid(_) => EXIT_USAGE,
        }
    }
}

impl From<DriverError> for CheckError {
    fn from(e: DriverError) -> Self {
        CheckError::Protocol(e.to_string())
    }
}

/// A protocol error with what the checker was doing (`"SET_LOG_BASE: ..."`).
pub(super) fn proto(context: &str, e: impl std::fmt::Display) -> CheckError {
    CheckError::Protocol(format!("{context}: {e}"))
}

/// A local failure of the VMM side (allocating a log or a bitmap).
pub(super) fn vmm_err(e: crate::vmm::VmmError) -> CheckError {
    CheckError::Setup(format!("migration bitmap: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes() {
        assert_eq!(CheckError::Invalid("x".into()).exit_code(), EXIT_USAGE);
        assert_eq!(
            CheckError::Unsupported("x".into()).exit_code(),
            EXIT_UNSUPPORTED
        );
        assert_eq!(CheckError::Protocol("x".into()).exit_code(), EXIT_PROTOCOL);
        assert_eq!(CheckError::Setup("x".into()).exit_code(), EXIT_PROTOCOL);
    }
}
