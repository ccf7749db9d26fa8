//! DERP: the TCP/TLS relay addressed by node key.
//!
//! - [`frame`]: pure codec for frames and the ClientInfo/ServerInfo JSON.
//! - [`server`]: the relay (`tern derp`): HTTP front, handshake, routing, queues, metrics, STUN.
//! - [`client`]: a client connection (TLS or plain HTTP) and its reconnect policy.

pub mod client;
pub mod frame;
pub mod resolve;
pub mod server;
