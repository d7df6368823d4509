//! Whole-file open-file-description locks (`F_OFD_SETLK`), for the disk image and the socket
//! lock file.
//!
//! OFD locks belong to the open file description, not to the process: closing another
//! descriptor of the same file does not drop them (as it would a POSIX `F_SETLK` lock), and
//! they conflict between descriptions within one process too. QEMU locks images the same way
//! (`qemu_lock_fd` in util/osdep.c, used by block/file-posix.c; qemu-storage-daemon is QEMU's
//! block layer). QEMU locks single bytes (offsets 100+ and 200+, one per permission); this lock
//! covers the whole file, so it conflicts with each of QEMU's byte locks: a QEMU or
//! qemu-storage-daemon that has the image open for writing keeps us out, and our write lock
//! keeps them out (their `F_OFD_GETLK` probe finds it).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// The kind of lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockKind {
    /// Shared: other readers may lock too (`F_RDLCK`), for read-only users.
    Shared,
    /// Exclusive (`F_WRLCK`), for a writer.
    Exclusive,
}

/// Why a lock was not taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another open file description holds a conflicting lock.
    #[error("locked by another process")]
    Busy,
    /// `fcntl` failed otherwise (e.g. a file system without lock support).
    #[error("cannot lock: {0}")]
    Io(#[from] io::Error),
}

/// Takes a whole-file OFD lock on `file` without waiting (`F_OFD_SETLK`).
///
/// The lock lasts as long as the open file description (every duplicate of the descriptor
/// closed). Taking a lock the same description already holds converts it.
pub fn lock_file(file: &File, kind: LockKind) -> Result<(), LockError> {
    // SAFETY: an all-zero `flock` is a valid value (plain old data).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = match kind {
        LockKind::Shared => libc::F_RDLCK,
        LockKind::Exclusive => libc::F_WRLCK,
    } as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = 0;
    // To the end of the file, however large it grows; l_pid stays 0, as OFD locks require.
    fl.l_len = 0;
    // SAFETY: `fl` is a live, initialised `flock`; F_OFD_SETLK reads it and does not keep it.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    if rc == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EACCES) => Err(LockError::Busy),
        _ => Err(LockError::Io(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ofd_locks_conflict_between_descriptions() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let a = File::options()
            .read(true)
            .write(true)
            .open(f.path())
            .unwrap();
        let b = File::options()
            .read(true)
            .write(true)
            .open(f.path())
            .unwrap();
        lock_file(&a, LockKind::Exclusive).unwrap();
        assert!(matches!(
            lock_file(&b, LockKind::Shared),
            Err(LockError::Busy)
        ));
        assert!(matches!(
            lock_file(&b, LockKind::Exclusive),
            Err(LockError::Busy)
        ));
        drop(a);
        lock_file(&b, LockKind::Shared).unwrap();
        let c = File::open(f.path()).unwrap();
        lock_file(&c, LockKind::Shared).unwrap(); // readers share
        let d = File::options().write(true).open(f.path()).unwrap();
        assert!(matches!(
            lock_file(&d, LockKind::Exclusive),
            Err(LockError::Busy)
        ));
    }
}
