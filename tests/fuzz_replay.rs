//! The fuzz targets as ordinary tests, so CI covers them on every change without cargo-fuzz.
//!
//! The target bodies live in `contrib/fuzz/src/targets/` and are compiled here unchanged. For
//! each target this file
//! - replays every committed input: the seed corpus `contrib/fuzz/corpus/<target>/` and the
//!   crash regressions `contrib/fuzz/artifacts-regressions/<target>/` (a failing input names its
//!   file);
//! - asserts that the seed corpus still reaches what it was chosen for (a decoding change that
//!   silently turned the seeds into no-ops would fail here);
//! - runs a few hundred pseudo-random inputs (fixed seeds: deterministic);
//! - runs a negative control: the same checks with a fault injected behind the code's back
//!   (a lost mark, a flipped bitmap bit, a wiped log, a request checked against a smaller
//!   disk) must fail, so the oracles are shown to be able to fail.

#[path = "../contrib/fuzz/src/targets/mod.rs"]
mod targets;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use arbitrary::{Arbitrary, Unstructured};
use targets::Reached;

fn dir(kind: &str, target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("contrib/fuzz")
        .join(kind)
        .join(target)
}

/// Every file of `corpus/<target>` and `artifacts-regressions/<target>`, sorted.
fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for kind in ["corpus", "artifacts-regressions"] {
        let Ok(rd) = std::fs::read_dir(dir(kind, target)) else {
            continue;
        };
        let mut paths: Vec<PathBuf> = rd
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .collect();
        paths.sort();
        for p in paths {
            let data = std::fs::read(&p).unwrap();
            out.push((p, data));
        }
    }
    out
}

fn message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "(non-string panic)".into())
}

/// Regressions for findings in `src/` that are reported and not fixed yet
/// (`contrib/fuzz/README.md`): replayed, and must still fail, so the day the fix lands this
/// test says to move the input back into the ordinary replay (delete its line here).
const PENDING_SRC_FIX: &[(&str, &str)] = &[
    // (none: F6, `backend_messages/unlogged-write-in-second-region`, is fixed in src/log and
    // replayed as an ordinary regression)
];

fn pending(target: &str, path: &Path) -> bool {
    PENDING_SRC_FIX
        .iter()
        .any(|&(t, name)| t == target && path == dir("artifacts-regressions", target).join(name))
}

#[test]
fn pending_src_fixes_still_fail() {
    for &(target, name) in PENDING_SRC_FIX {
        let data = std::fs::read(dir("artifacts-regressions", target).join(name)).unwrap();
        must_fail(
            &format!("{target}/{name} passes now: remove it from PENDING_SRC_FIX"),
            || {
                targets::run(target, &data);
            },
        );
    }
}

/// Replays all committed inputs of `target`; returns what they reached together.
fn replay(target: &str) -> Reached {
    let all = inputs(target);
    let seeds = all
        .iter()
        .filter(|(p, _)| p.starts_with(dir("corpus", target)))
        .count();
    assert!(
        seeds >= 3,
        "the seed corpus of {target} is missing or too small"
    );
    let mut reached = Reached::default();
    for (path, data) in all.iter().filter(|(p, _)| !pending(target, p)) {
        match catch_unwind(AssertUnwindSafe(|| targets::run(target, data))) {
            Ok(r) => reached.absorb(&r),
            Err(p) => panic!("{}: {}", path.display(), message(&*p)),
        }
    }
    reached
}

/// `n` pseudo-random inputs of varied lengths (xorshift64*, fixed seed).
fn random_inputs(target: &str, n: usize, max_len: usize) -> Reached {
    let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ target.len() as u64;
    let mut next = move || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    let mut reached = Reached::default();
    for i in 0..n {
        let len = (next() as usize) % max_len;
        let data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        match catch_unwind(AssertUnwindSafe(|| targets::run(target, &data))) {
            Ok(r) => reached.absorb(&r),
            Err(p) => panic!(
                "{target}: random input #{i} failed: {}\ninput: {data:02x?}",
                message(&*p)
            ),
        }
    }
    reached
}

/// The first seed whose run reached `event`, decoded as the target's input.
fn seed_reaching<I: for<'a> Arbitrary<'a>>(target: &str, event: &str) -> I {
    let (path, data) = inputs(target)
        .into_iter()
        .find(|(_, d)| targets::run(target, d).get(event) > 0)
        .unwrap_or_else(|| panic!("no {target} seed reaches {event}"));
    I::arbitrary_take_rest(Unstructured::new(&data))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn must_fail(what: &str, f: impl FnOnce()) {
    let r = catch_unwind(AssertUnwindSafe(f));
    assert!(r.is_err(), "negative control passed: {what}");
}

fn decoded_debug(target: &str, data: &[u8]) -> String {
    fn dbg<T: std::fmt::Debug + for<'a> Arbitrary<'a>>(data: &[u8]) -> String {
        format!(
            "{:?}",
            T::arbitrary_take_rest(Unstructured::new(data)).unwrap()
        )
    }
    match target {
        "log_region" => dbg::<targets::log_region::Input>(data),
        "merge" => dbg::<targets::merge::Input>(data),
        "backend_messages" => dbg::<targets::backend_messages::Input>(data),
        "blk_request" => dbg::<targets::blk_request::Input>(data),
        other => panic!("unknown target {other}"),
    }
}

/// The committed `seed-*` files are exactly what `targets::seeds` generates, and each decodes to
/// the input it was written from. `VDL_WRITE_SEEDS=1` (re)writes them.
#[test]
fn seed_corpus_is_generated() {
    let write = std::env::var_os("VDL_WRITE_SEEDS").is_some();
    for target in targets::TARGETS {
        let seeds = targets::seeds::seeds(target);
        assert!(seeds.len() >= 4);
        let d = dir("corpus", target);
        for s in seeds {
            assert_eq!(
                decoded_debug(target, &s.bytes),
                s.debug,
                "{target}/{}: the encoder and arbitrary disagree",
                s.name
            );
            let path = d.join(&s.name);
            write_or_compare(write, &d, &path, &s.bytes);
        }
        let d = dir("known-crashes", target);
        for s in targets::seeds::known_crashes(target) {
            assert_eq!(decoded_debug(target, &s.bytes), s.debug, "{}", s.name);
            write_or_compare(write, &d, &d.join(&s.name), &s.bytes);
        }
    }
}

fn write_or_compare(write: bool, d: &Path, path: &Path, bytes: &[u8]) {
    if write {
        std::fs::create_dir_all(d).unwrap();
        std::fs::write(path, bytes).unwrap();
    } else {
        let on_disk = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(on_disk, bytes, "{} is stale", path.display());
    }
}

#[test]
fn replay_log_region() {
    let r = replay("log_region");
    for event in [
        "attach",
        "attach-tail",
        "attach-refused",
        "mark-in-range",
        "mark-out-of-range",
        "mark-without-log",
        "sync-took-bits",
        "fetch-saw-bits",
        "clear-pages",
        "carry-marked",
        "carry-overmarked",
        "carry-merged",
        "carry-still-past",
    ] {
        assert!(
            r.get(event) > 0,
            "log_region seeds no longer reach {event}: {r:?}"
        );
    }
}

#[test]
fn replay_merge() {
    let r = replay("merge");
    for event in [
        "merge-aligned",
        "merge-shifted",
        "sync-tail",
        "sync-shifted",
        "clear-pages",
        "mark-after-fetch",
        "test-and-clear",
        "next-dirty",
        "grow",
    ] {
        assert!(
            r.get(event) > 0,
            "merge seeds no longer reach {event}: {r:?}"
        );
    }
}

#[test]
fn replay_backend_messages() {
    let r = replay("backend_messages");
    for event in [
        "mem-table",
        "add-region",
        "log-attached",
        "log-refused",
        "log-all-on",
        "write-logged",
        "write-past-log",
        "log-attached-after-unlogged-writes",
        "log-view-smaller",
        "log-view-widened",
        "all-dirty-log-widened",
        "carry-marked",
        "session",
    ] {
        assert!(
            r.get(event) > 0,
            "backend_messages seeds no longer reach {event}: {r:?}"
        );
    }
    assert!(r.get("session") > r.get("message-refused").min(1), "{r:?}");
}

#[test]
fn replay_blk_request() {
    let r = replay("blk_request");
    for event in [
        "ok-read",
        "ok-write",
        "refused",
        "reference-agrees-ok",
        "reference-agrees-err",
    ] {
        assert!(
            r.get(event) > 0,
            "blk_request seeds no longer reach {event}: {r:?}"
        );
    }
}

#[test]
fn random_inputs_all_targets() {
    random_inputs("log_region", 300, 600);
    random_inputs("merge", 300, 600);
    random_inputs("blk_request", 600, 400);
    random_inputs("backend_messages", 60, 400);
}

#[test]
fn negative_control_log_region_detects_a_lost_mark() {
    use targets::log_region::{exec, Fault};
    let input: targets::log_region::Input = seed_reaching("log_region", "mark-in-range");
    exec(&input, Fault::None);
    must_fail("a mark cleared behind the log's back", || {
        exec(&input, Fault::LoseMark);
    });
}

/// Marks past the end of the log are carried into the next log that covers them: a carried
/// page cleared from the new log right after the attach (as if the handle had dropped its
/// carried marks) must fail the model.
#[test]
fn negative_control_log_region_detects_a_dropped_carry() {
    use targets::log_region::{exec, Fault};
    let input: targets::log_region::Input = seed_reaching("log_region", "carry-marked");
    exec(&input, Fault::None);
    must_fail("a carried page cleared from the next log", || {
        exec(&input, Fault::DropCarried);
    });
}

#[test]
fn negative_control_merge_detects_a_flipped_bit() {
    let input: targets::merge::Input = seed_reaching("merge", "merge-aligned");
    targets::merge::exec(&input, false);
    must_fail("a bitmap bit cleared behind the model's back", || {
        targets::merge::exec(&input, true);
    });
}

#[test]
fn negative_control_backend_detects_a_wiped_log() {
    use targets::backend_messages::{exec, Fault};
    let input: targets::backend_messages::Input = seed_reaching("backend_messages", "write-logged");
    exec(&input, Fault::None);
    must_fail("the log wiped after a logged write", || {
        exec(&input, Fault::WipeLog);
    });
}

/// A write past the end of the log while logging is carried into the next log: a carried
/// page cleared from that log right after `SET_LOG_BASE` must fail the model.
#[test]
fn negative_control_backend_detects_a_dropped_carry() {
    use targets::backend_messages::{exec, Fault};
    let input: targets::backend_messages::Input = seed_reaching("backend_messages", "carry-marked");
    exec(&input, Fault::None);
    must_fail("a carried page cleared from the next log", || {
        exec(&input, Fault::DropCarried);
    });
}

#[test]
fn negative_control_blk_detects_a_request_past_the_disk() {
    let input: targets::blk_request::Input = seed_reaching("blk_request", "ok-rw-data");
    targets::blk_request::exec_with(&input, false);
    must_fail(
        "an accepted read checked against a disk one sector too small",
        || {
            targets::blk_request::exec_with(&input, true);
        },
    );
}

/// Developer tool: `VDL_DECODE=<target>:<file> cargo test --test fuzz_replay decode -- \
/// --ignored --nocapture` prints an input as the target sees it (e.g. a crash artifact), then
/// runs it.
#[test]
#[ignore]
fn decode() {
    let spec = std::env::var("VDL_DECODE").expect("VDL_DECODE=<target>:<file>");
    let (target, file) = spec.split_once(':').unwrap();
    let data = std::fs::read(file).unwrap();
    println!("{}", decoded_debug(target, &data));
    println!("{:?}", targets::run(target, &data));
}

/// Developer tool: `VDL_REPLAY_DIR=<target>:<dir> cargo test --release --test fuzz_replay \
/// replay_dir -- --ignored --nocapture` replays a whole directory (e.g. a fuzzer's working
/// corpus) and prints what it reached together.
#[test]
#[ignore]
fn replay_dir() {
    let spec = std::env::var("VDL_REPLAY_DIR").expect("VDL_REPLAY_DIR=<target>:<dir>");
    let (target, d) = spec.split_once(':').unwrap();
    let mut reached = Reached::default();
    let mut n = 0;
    for e in std::fs::read_dir(d).unwrap() {
        let data = std::fs::read(e.unwrap().path()).unwrap();
        reached.absorb(&targets::run(target, &data));
        n += 1;
    }
    println!("{n} inputs: {reached:?}");
}

/// Runs a `known-crashes/backend_messages/` input in a child process (a signal would take this
/// test binary down with it) and asserts the child survived.
fn known_crash_survives(name: &str, test: &str) {
    if std::env::var_os("VDL_KNOWN_CRASH_CHILD").is_some() {
        let path = dir("known-crashes", "backend_messages").join(name);
        let data = std::fs::read(path).unwrap();
        let _ = catch_unwind(AssertUnwindSafe(|| targets::run("backend_messages", &data)));
        return;
    }
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        test,
        "--include-ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("VDL_KNOWN_CRASH_CHILD", "1")
    // Let the harness touch unbacked guest memory (it avoids that otherwise).
    .env("VDL_FUZZ_UNBACKED", "1");
    let out = cmd.output().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        out.status.signal(),
        None,
        "{name}: the daemon process died of signal {:?} (7 = SIGBUS)",
        out.status.signal()
    );
}

/// Finding F1 (contrib/fuzz/README.md): a `SET_MEM_TABLE` whose memfd is shorter than the
/// region is accepted by vhost-user-backend / vm-memory without a length check, and the first
/// device write into the part without file behind it raises SIGBUS. The adapter now refuses such
/// a table (`DirtyLogBackend::update_memory`); this replays the input in a child process.
#[test]
fn short_region_fd_does_not_crash_the_device() {
    known_crash_survives(
        "seed-short-region-fd-sigbus",
        "short_region_fd_does_not_crash_the_device",
    );
}

/// Finding F1, reached by messages alone: an empty region memfd, then `SET_VRING_ADDR`; the
/// stock handler reads the used index from the unbacked page and the daemon dies of SIGBUS.
#[test]
fn empty_region_fd_does_not_crash_the_daemon() {
    known_crash_survives(
        "seed-empty-region-fd-vring-addr-sigbus",
        "empty_region_fd_does_not_crash_the_daemon",
    );
}

/// The backend target starts a daemon (two threads, a socket, memfds) per session: a long
/// fuzzing run must not accumulate fds or threads. (vhost-user-backend leaks one eventfd per
/// daemon, finding F3; the harness reclaims it.)
#[test]
fn backend_sessions_leave_no_fds_or_threads_behind() {
    let data = std::fs::read(dir("corpus", "backend_messages").join("seed-rings")).unwrap();
    let fds = || std::fs::read_dir("/proc/self/fd").unwrap().count();
    let threads = || std::fs::read_dir("/proc/self/task").unwrap().count();
    let reached = targets::run("backend_messages", &data);
    assert!(reached.get("session") >= 2, "{reached:?}");
    let (f0, t0) = (fds(), threads());
    for _ in 0..30 {
        targets::run("backend_messages", &data);
    }
    // Other tests run in parallel threads of this process: allow for their fds and threads,
    // but not for 60 sessions' worth.
    assert!(fds() < f0 + 20, "fds grew from {f0} to {}", fds());
    assert!(
        threads() < t0 + 20,
        "threads grew from {t0} to {}",
        threads()
    );
}

/// Developer tool: `VDL_RATE=<target>[:<seconds>] cargo test --release --test fuzz_replay \
/// exec_rate -- --ignored --nocapture` runs the committed inputs of a target round and round
/// for that long (default 10 s) and prints executions per second: the harness's own cost,
/// without libFuzzer, sanitizer or coverage instrumentation (profile it with `perf record`).
#[test]
#[ignore]
fn exec_rate() {
    let spec = std::env::var("VDL_RATE").expect("VDL_RATE=<target>[:<seconds>]");
    let (target, secs) = spec.split_once(':').unwrap_or((&spec, "10"));
    let secs: f64 = secs.parse().unwrap();
    let all: Vec<_> = inputs(target)
        .into_iter()
        .filter(|(p, _)| !pending(target, p))
        .collect();
    let t0 = std::time::Instant::now();
    let mut n = 0u64;
    while t0.elapsed().as_secs_f64() < secs {
        for (_, data) in &all {
            targets::run(target, data);
            n += 1;
        }
    }
    let dt = t0.elapsed().as_secs_f64();
    println!(
        "{target}: {n} executions in {dt:.1} s: {:.0} exec/s",
        n as f64 / dt
    );
}
