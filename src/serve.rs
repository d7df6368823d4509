//! What the blk and net daemon loops share around `vhost-user-backend`'s one-connection daemon:
//! waiting for a frontend on the listener, refusing extra frontends while one is served, and the
//! negative-control switch of the `test-drop-marks` build.

use std::os::fd::AsRawFd;

use vhost::vhost_user::Listener;

/// Blocks until a frontend is waiting to be accepted on `listener` (`poll`, retried on `EINTR`).
pub(crate) fn wait_readable(listener: &Listener) -> std::io::Result<()> {
    loop {
        let mut fd = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `fd` is a live, initialised pollfd; poll only writes its `revents`.
        let rc = unsafe { libc::poll(&mut fd, 1, -1) };
        if rc > 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if rc < 0 && e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Runs `wait` (the connection being served) while further frontends are accepted and closed
/// with a log line (`daemon::socket::refusing_others`; without the `daemon` feature, just
/// `wait`).
#[cfg(feature = "daemon")]
pub(crate) fn wait_refusing_others<R>(listener: &Listener, wait: impl FnOnce() -> R) -> R {
    crate::daemon::socket::refusing_others(listener, wait)
}

#[cfg(not(feature = "daemon"))]
pub(crate) fn wait_refusing_others<R>(_listener: &Listener, wait: impl FnOnce() -> R) -> R {
    wait()
}

/// Whether this `test-drop-marks` build was asked (`VHOST_DIRTYLOG_TEST_DROP_MARKS=1`) to
/// advertise dirty logging and never turn it on: the negative control of the e2e tests.
#[cfg(not(feature = "test-drop-marks"))]
pub(crate) fn drop_marks_requested() -> bool {
    false
}

#[cfg(feature = "test-drop-marks")]
pub(crate) fn drop_marks_requested() -> bool {
    let on = std::env::var_os("VHOST_DIRTYLOG_TEST_DROP_MARKS").is_some_and(|v| v == "1");
    if on {
        log::warn!(
            "TEST MODE: VHOST_DIRTYLOG_TEST_DROP_MARKS=1: dirty logging is advertised but never \
             turned on; migrations WILL lose pages"
        );
    }
    on
}
