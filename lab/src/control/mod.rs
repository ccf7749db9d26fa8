//! Policy of the lab coordination server: configuration, node database, address allocation,
//! pre-auth keys, packet filter and capability grants.
//!
//! This is the server's state and its rules, with no protocol in it. The protocol side (Noise,
//! HTTP/2, map streaming) lives in `tern::control::server` and drives a [`Tailnet`]. Keys are
//! plain strings in Tailscale text form and Hostinfo is opaque JSON, so this crate does not
//! depend on `tern`.

pub mod addr;
pub mod config;
pub mod db;
mod policy;

use std::path::PathBuf;

pub use config::{ApprovedRoutesConfig, Config, CAP_RELAY, CAP_RELAY_TARGET};
pub use db::{NodeDb, NodeRecord};
pub use policy::login::LoginRequest;
pub use policy::routes::{advertised_routes, primary_routes};
pub use policy::{
    CapGrantRule, DstPortRange, FilterRule, NodeChanges, NodeUpdate, RegisterInput,
    RegisterOutcome, Tailnet, LAB_USER_ID,
};

/// Errors of the lab control policy.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The configuration is invalid; the message says what to fix.
    #[error("bad lab control config: {0}")]
    Config(String),
    /// A file in the state directory could not be read or written.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// The node database or key file is corrupt.
    #[error("bad state file {path}: {reason}")]
    Database { path: PathBuf, reason: String },
    /// The address pool is exhausted.
    #[error("no free tailnet address left in 100.64.0.0/10")]
    AddressesExhausted,
    /// No node has this node key.
    #[error("unknown node key")]
    UnknownNode,
    /// The node key belongs to a node of another machine.
    #[error("node key belongs to another machine")]
    MachineMismatch,
}
