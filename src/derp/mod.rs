//! DERP: the TCP/TLS relay addressed by node key.
//!
//! - [`frame`]: pure codec for frames and the ClientInfo/ServerInfo JSON.
//! - [`server`]: the relay (`tern derp`): HTTP front, handshake, routing, queues, metrics, STUN.
//! - [`client`]: a client connection (TLS or plain HTTP) and its reconnect policy.
//! - [`send_queue`]: the client's per-region write queue (32, drop-oldest, as Go).

pub mod client;
pub mod frame;
pub mod resolve;
pub mod send_queue;
pub mod server;
