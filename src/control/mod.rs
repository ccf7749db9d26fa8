//! The ts2021 control protocol: Noise transport, wire JSON, map framing.
//!
//! Pure building blocks (`noise`, `tailcfg`, `framing`), plus the node's side of the session:
//! `dial` (HTTP upgrade, Noise, HTTP/2), `backoff` and `client` (the control session task).

pub mod backoff;
pub mod client;
pub mod dial;
pub mod dial_plan;
pub mod error;
pub mod framing;
pub mod noise;
pub mod server;
pub mod tailcfg;
#[cfg(test)]
pub(crate) mod test_stub;
pub mod tls;
pub mod url;

/// The capability version we claim: in the Noise initiation header and prologue, `/key?v=`,
/// `RegisterRequest.Version` and `MapRequest.Version`.
///
/// 130 is what tailscale v1.90.9 (our reference peer) sends, and what tailscale-rs claims. The
/// numbers are cumulative: claiming 130 says we understand `HomeDERP` (111),
/// `AllowedIPs: null` = Addresses (112), `NoMeasureNoHome` (115), `DisplayMessages` (117),
/// `PacketFilters` (81), incremental DERPMaps (65), `PeersChangedPatch` (33/36) and `CapMap`
/// (74). `netmap::NetworkMap::apply` implements those; 131 (default-auto-update node attribute)
/// would add nothing we use.
pub const CAPABILITY_VERSION: u16 = 130;
