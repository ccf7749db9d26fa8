#![no_main]
//! Thin libFuzzer wrapper; the body (and what it checks) is in `fuzz/bodies/peerapi_doh.rs`, shared with
//! `tests/fuzz_regression.rs`.

#[path = "../bodies/mod.rs"]
mod bodies;

libfuzzer_sys::fuzz_target!(|data: &[u8]| bodies::peerapi_doh::run(data));
