//! DERP: the TCP/TLS relay addressed by node key.
//!
//! - [`frame`]: pure codec for frames and the ClientInfo/ServerInfo JSON.
//! - [`server`]: the relay (`tern derp`): HTTP front, handshake, routing, queues, metrics, STUN.
//! - [`client`]: a client connection (TLS or plain HTTP) and its reconnect policy.
//! - [`blocks`]: packet memory in blocks reused once their packets are dropped (the client's
//!   receive buffer, the engine's copies of packets queued for a region).

pub mod blocks;
pub mod client;
pub mod frame;
pub mod resolve;
pub mod server;
