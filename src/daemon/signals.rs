//! The daemons' signal handling: `SIGUSR1` prints statistics, `SIGHUP` is logged, `SIGINT` /
//! `SIGTERM` print the statistics, clean up and exit 0.
//!
//! The signals are blocked in every thread ([`block`], called before any thread exists, so all
//! inherit the mask) and taken synchronously with `sigwait` by one thread ([`spawn`]): the
//! handlers can then log, lock and allocate, which an asynchronous signal handler could not.

/// The signals the daemons handle.
pub const SIGNALS: [libc::c_int; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGUSR1];

/// Blocks [`SIGNALS`] in the calling thread (and every thread it starts later). Call it before
/// any other thread exists.
///
/// Errors: a signal cannot be blocked (an already blocked one is fine).
pub fn block() -> Result<(), String> {
    for sig in SIGNALS {
        if let Err(e) = vmm_sys_util::signal::block_signal(sig) {
            if !matches!(e, vmm_sys_util::signal::Error::SignalAlreadyBlocked(_)) {
                return Err(format!("cannot block signal {sig}: {e}"));
            }
        }
    }
    Ok(())
}

/// What the signal thread does for each signal.
#[derive(Debug)]
pub struct Handlers<S, H, E> {
    /// The statistics report, printed to stderr on `SIGUSR1` and before exiting.
    pub stats: S,
    /// Called on `SIGHUP`.
    pub hup: H,
    /// Called on `SIGINT` / `SIGTERM` after the report, before `exit(0)`: remove the socket,
    /// flush, and so on.
    pub exit: E,
}

/// Starts the thread that waits for [`SIGNALS`] (blocked first with [`block`]).
///
/// Errors: the signal set or the thread cannot be created.
pub fn spawn<S, H, E>(h: Handlers<S, H, E>) -> Result<(), String>
where
    S: Fn() -> String + Send + 'static,
    H: Fn() + Send + 'static,
    E: Fn() + Send + 'static,
{
    let set = vmm_sys_util::signal::create_sigset(&SIGNALS)
        .map_err(|e| format!("cannot create signal set: {e}"))?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: `set` is an initialised sigset_t and `sig` a live local for the result.
            let rc = unsafe { libc::sigwait(&set, &mut sig) };
            if rc != 0 {
                continue;
            }
            match sig {
                libc::SIGUSR1 => eprint!("{}", (h.stats)()),
                libc::SIGHUP => (h.hup)(),
                _ => {
                    log::info!("received signal {sig}, exiting");
                    eprint!("{}", (h.stats)());
                    (h.exit)();
                    std::process::exit(0);
                }
            }
        })
        .map(|_| ())
        .map_err(|e| format!("cannot start signal thread: {e}"))
}
