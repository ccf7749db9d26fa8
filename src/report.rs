//! The engine's answers as plain, serializable values: a disco ping's result (`tern ping`), a
//! netcheck report (`tern netcheck`, and `netcheck` in the status snapshot), and what the engine
//! learned of our own network for control ([`LocalNetInfo`]). They sit below the
//! engine, the LocalAPI and the CLI so that all three can name them without importing each other.

use serde::{Deserialize, Serialize};

/// The answer to one disco ping (the JSON of `POST /localapi/v0/ping`, plus the peer's name
/// and IP that the LocalAPI fills in).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct PingResult {
    /// The peer's name and first tailnet IP (filled by the LocalAPI, not the engine).
    #[serde(default)]
    pub node_name: String,
    #[serde(default)]
    pub node_ip: String,
    /// How the pong came back: `direct`, `peer-relay` or `derp`; `null` with `error` set.
    pub path: Option<String>,
    /// `ip:port` the pong came from, for `direct` / `peer-relay`.
    pub endpoint: Option<String>,
    /// The DERP region the pong came through, for `derp`.
    pub derp_region: Option<u16>,
    /// That region's `RegionCode` (e.g. `lab`), for `via DERP(lab)`.
    pub derp_region_code: Option<String>,
    /// Round-trip time in milliseconds.
    pub latency_ms: Option<f64>,
    /// Why there is no answer (`timeout`, `unknown peer`, `peer has no disco key`).
    pub error: Option<String>,
}

/// A netcheck report (`tern netcheck --json`, and `netcheck` in the status snapshot).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct NetcheckReport {
    /// When the report finished (RFC 3339).
    pub at: String,
    /// Any STUN answer at all.
    pub udp: bool,
    /// A STUN answer over IPv4, and our address as the STUN servers saw it.
    pub ipv4: bool,
    pub global_v4: Option<String>,
    pub ipv6: bool,
    pub global_v6: Option<String>,
    /// Whether this host can use IPv6 at all.
    pub os_has_ipv6: bool,
    /// Our NAT maps one local port to different public ports per destination ("hard NAT");
    /// `null` when fewer than two STUN servers answered.
    pub mapping_varies_by_dest_ip: Option<bool>,
    /// Home DERP region (0 = none).
    pub preferred_derp: u16,
    /// Every region in the DERP map, by id.
    pub regions: Vec<RegionLatency>,
    /// Our endpoints as sent to control (`ip:port` and kind: `local`, `stun`).
    pub endpoints: Vec<EndpointReport>,
}

/// One region's measurement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct RegionLatency {
    pub id: u16,
    pub code: String,
    pub name: String,
    /// Milliseconds; `null` = no answer.
    pub latency_ms: Option<f64>,
}

/// One of our endpoints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct EndpointReport {
    pub addr: String,
    /// `local` (an interface address) or `stun` (as a STUN server saw us).
    pub kind: String,
}

/// What the data plane knows of our own network, for control: reported in a lite map update
/// (`Endpoints`, `Hostinfo.NetInfo`) so that peers know where to reach us.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LocalNetInfo {
    /// Home DERP region (0 = unknown).
    pub home_derp: u16,
    /// Our UDP endpoints with their kinds (`MapRequest.Endpoints` / `EndpointTypes`).
    pub endpoints: Vec<(std::net::SocketAddr, crate::control::tailcfg::EndpointType)>,
    pub working_udp: Option<bool>,
    pub mapping_varies: Option<bool>,
    pub working_ipv6: Option<bool>,
    pub os_has_ipv6: Option<bool>,
    /// `"<region>-v4"` → seconds.
    pub derp_latency: std::collections::BTreeMap<String, f64>,
    /// Routes we offer (`Hostinfo.RoutableIPs`): advertised subnets and exit routes.
    pub routable_ips: Vec<ipnet::IpNet>,
    /// `Hostinfo.Services`: the peer API's listeners (empty until they exist).
    pub services: Vec<crate::control::tailcfg::Service>,
}
