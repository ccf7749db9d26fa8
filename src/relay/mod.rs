//! Peer relays (spec peer-relay.md): wire pieces shared by the relay server and its clients.

pub mod endpoint;
pub mod geneve;
