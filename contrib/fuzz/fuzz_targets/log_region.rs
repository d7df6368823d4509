#![no_main]
//! cargo-fuzz entry point; the body lives in `src/targets/log_region.rs`, shared with the main
//! crate's `tests/fuzz_replay.rs` so every corpus input is also a `cargo test` case.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vhost_dirtylog_fuzz::targets::log_region::run(data);
});
