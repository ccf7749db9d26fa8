#![no_main]
//! Thin libFuzzer wrapper; the body (and what it checks) is in `fuzz/bodies/tun_offload.rs`, shared with
//! `tests/fuzz_regression.rs`.

#[path = "../bodies/mod.rs"]
mod bodies;

libfuzzer_sys::fuzz_target!(|data: &[u8]| bodies::tun_offload::run(data));
