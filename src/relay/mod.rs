//! Peer relays: wire pieces shared by the relay server and its clients.

pub mod client;
pub mod endpoint;
pub mod geneve;
pub mod io;
pub mod manager;
pub mod server;

/// The peer capability that lets a node allocate endpoints on a relay server (checked on the
/// server, between the client's and the server's first addresses).
pub const CAP_RELAY: &str = "tailscale.com/cap/relay";

/// The peer capability control gives a client towards each node it may use as a relay server
/// (checked on the client, between the relay's and the client's first addresses).
pub const CAP_RELAY_TARGET: &str = "tailscale.com/cap/relay-target";

/// The least capability version of a node that understands relay allocation (Go
/// `capVerIsRelayCapable`).
pub const MIN_RELAY_CAP_VERSION: i32 = 121;
