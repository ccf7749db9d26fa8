//! Peer relays: wire pieces shared by the relay server and its clients.

pub mod client;
pub mod endpoint;
pub mod geneve;
pub mod io;
pub mod server;

/// The peer capability that lets a node allocate endpoints on a relay server (checked on the
/// server, between the client's and the server's first addresses).
pub const CAP_RELAY: &str = "tailscale.com/cap/relay";
