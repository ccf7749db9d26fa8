#![no_main]
//! Thin libFuzzer wrapper; the body (and what it checks) is in `fuzz/bodies/proxy_request.rs`, shared with
//! `tests/fuzz_regression.rs`.

#[path = "../bodies/mod.rs"]
mod bodies;

libfuzzer_sys::fuzz_target!(|data: &[u8]| bodies::proxy_request::run(data));
