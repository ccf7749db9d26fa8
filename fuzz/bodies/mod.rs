//! The fuzz target bodies, shared by the libFuzzer wrappers in `fuzz/fuzz_targets/` and by the
//! root package's `tests/fuzz_regression.rs`, which replays the committed seeds and saved crash
//! inputs through them on stable. Each body is `pub fn run(data: &[u8])` and uses only tern's
//! public API and std, so both builds compile the same code.

// Each includer uses every body, but not necessarily every helper of `input`.
#![allow(dead_code)]

pub mod input;

pub mod derp_frame;
pub mod disco_ops;
pub mod disco_parse;
pub mod dns_request;
pub mod localapi_request;
pub mod map_decode;
pub mod noise_records;
pub mod peerapi_doh;
pub mod proxy_request;
pub mod relay_client;
pub mod relay_packet;
pub mod stun_parse;
pub mod tun_offload;

/// A target body.
pub type Body = fn(&[u8]);

/// Every target, by name (the directory names under `fuzz/seeds/` and `fuzz/regressions/`).
pub const TARGETS: &[(&str, Body)] = &[
    ("derp_frame", derp_frame::run),
    ("disco_parse", disco_parse::run),
    ("dns_request", dns_request::run),
    ("localapi_request", localapi_request::run),
    ("map_decode", map_decode::run),
    ("noise_records", noise_records::run),
    ("peerapi_doh", peerapi_doh::run),
    ("proxy_request", proxy_request::run),
    ("relay_client", relay_client::run),
    ("relay_packet", relay_packet::run),
    ("stun_parse", stun_parse::run),
    ("tun_offload", tun_offload::run),
];
