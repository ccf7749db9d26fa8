//! tern: a Tailscale-compatible node for Linux.
//!
//! Module map (see ARCHITECTURE.md): pure codecs (`stun`, `disco`, `derp::frame`,
//! `control::noise`), sans-IO state machines, and the small I/O tasks that drive them.

pub mod bugreport;
pub mod bypass;
pub mod cli;
pub mod control;
pub mod daemon;
pub mod demux;
pub mod derp;
pub mod disco;
pub mod dns;
pub mod duration_text;
pub mod engine;
pub mod filter;
pub mod keys;
pub mod lab_nodes;
pub mod localapi;
pub mod logring;
pub mod metrics;
pub mod naclbox;
pub mod netcheck;
pub mod netmap;
pub mod netstack;
pub mod packet;
pub mod paths;
pub mod peerapi;
pub mod proxy;
pub mod relay;
pub mod report;
pub mod rlimit;
pub mod routing;
pub mod runtime;
pub mod sd_notify;
pub mod state;
pub mod status;
pub mod stun;
pub mod tls;
pub mod trust;
pub mod udp;
pub mod vnet;
pub mod wg;
