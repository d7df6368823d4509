//! Fuzz targets for vhost-dirtylog. The target bodies are in [`targets`] (shared with the main
//! crate's `tests/fuzz_replay.rs`); `fuzz_targets/*.rs` are the libFuzzer entry points. See
//! `README.md` for how to build and run them on a stable toolchain.

pub mod targets;
