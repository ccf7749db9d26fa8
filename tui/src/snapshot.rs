//! The status JSON `tern top` reads (docs/status-json.md), as its own serde types: this crate
//! must not depend on `tern`. Unknown fields are ignored and missing ones take their default,
//! so an older or newer daemon still parses.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One status snapshot (`GET /localapi/v0/status`, one line of `GET /localapi/v0/watch`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Status {
    pub schema_version: u32,
    pub backend_state: String,
    pub control: Control,
    #[serde(rename = "self")]
    pub self_node: Option<SelfNode>,
    pub peers: Vec<Peer>,
    pub data_plane: DataPlane,
    pub daemon: Daemon,
    pub netcheck: Option<Netcheck>,
    pub relay_server: Option<RelayServer>,
    /// Why the relay server the pref asks for does not run (e.g. control's
    /// `disable-relay-server`); `None` when it runs or is not asked for.
    pub relay_server_off: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Control {
    pub url: Option<String>,
    pub state: String,
    pub last_error: Option<ErrorReport>,
    pub connected_since: Option<String>,
    pub next_attempt_at: Option<String>,
    pub failed_attempts: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ErrorReport {
    pub message: String,
    pub at: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SelfNode {
    pub name: String,
    pub hostname: String,
    pub tailnet_ips: Vec<String>,
    pub home_derp: Option<u16>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Peer {
    pub name: String,
    pub hostname: String,
    pub node_key: String,
    pub disco_key: Option<String>,
    pub tailnet_ips: Vec<String>,
    pub os: Option<String>,
    pub online: Option<bool>,
    pub last_seen: Option<String>,
    pub expired: bool,
    pub home_derp: Option<u16>,
    pub endpoints: Vec<String>,
    pub path: Option<String>,
    pub endpoint: Option<String>,
    pub derp_region: Option<u16>,
    pub latency_ms: Option<f64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub last_handshake_at: Option<String>,
    pub path_reason: Option<String>,
    pub last_pong_at: Option<String>,
    pub path_history: Vec<PathChange>,
    /// The path machine's candidates; `[]` from a daemon that does not report them.
    pub candidates: Vec<Candidate>,
    /// On `peer-relay`: the endpoint's VNI and the relay's node (when known).
    pub relay_vni: Option<u32>,
    pub relay_node: Option<String>,
    /// Why the peer is not on a peer relay (`relay-client-disabled`, `no-relay-granted`,
    /// `relay-bind-timeout`, …).
    pub relay_reason: Option<String>,
}

/// One candidate UDP endpoint and what disco knows of it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Candidate {
    pub addr: String,
    /// `netmap`, `call-me-maybe`, `ping`.
    pub sources: Vec<String>,
    pub last_ping_at: Option<String>,
    pub last_pong_at: Option<String>,
    pub latency_ms: Option<f64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PathChange {
    pub at: String,
    pub path: String,
    pub endpoint: Option<String>,
    pub derp_region: Option<u16>,
    pub reason: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DataPlane {
    pub tun: String,
    pub port: u16,
    pub active: bool,
    pub note: Option<String>,
    pub derp_latency_ms: BTreeMap<u16, Option<f64>>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Daemon {
    pub version: String,
    pub pid: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Netcheck {
    pub at: String,
    pub udp: bool,
    pub ipv4: bool,
    pub global_v4: Option<String>,
    pub ipv6: bool,
    pub global_v6: Option<String>,
    pub mapping_varies_by_dest_ip: Option<bool>,
    pub preferred_derp: u16,
    pub regions: Vec<Region>,
    pub endpoints: Vec<Endpoint>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Region {
    pub id: u16,
    pub code: String,
    pub name: String,
    pub latency_ms: Option<f64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Endpoint {
    pub addr: String,
    pub kind: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RelayServer {
    pub port: u16,
    pub addr_ports: Vec<String>,
    pub allocations: u64,
    pub forwarded_packets: u64,
    pub forwarded_bytes: u64,
    pub drops: BTreeMap<String, u64>,
    pub sessions: Vec<RelaySession>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RelaySession {
    pub vni: u32,
    pub state: String,
    pub age_secs: u64,
    pub legs: Vec<RelayLeg>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RelayLeg {
    pub disco_key: String,
    pub peer: Option<String>,
    pub bound: Option<String>,
    pub packets_rx: u64,
    pub bytes_rx: u64,
}

/// The way packets to a peer travel, from `path`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PathKind {
    Direct,
    Relay,
    Derp,
    None,
    /// `null`: the data plane does not know the peer (yet).
    Unknown,
}

impl PathKind {
    pub fn of(path: Option<&str>) -> PathKind {
        match path {
            Some("direct") => PathKind::Direct,
            Some("peer-relay") => PathKind::Relay,
            Some("derp") => PathKind::Derp,
            Some("none") => PathKind::None,
            _ => PathKind::Unknown,
        }
    }

    /// The badge text: readable without colour.
    pub fn badge(self) -> &'static str {
        match self {
            PathKind::Direct => "DIRECT",
            PathKind::Relay => "RELAY",
            PathKind::Derp => "DERP",
            PathKind::None => "none",
            PathKind::Unknown => "–",
        }
    }
}

impl Peer {
    pub fn path_kind(&self) -> PathKind {
        PathKind::of(self.path.as_deref())
    }

    /// The short name: the first label of the MagicDNS name, else the hostname.
    pub fn short_name(&self) -> &str {
        match self.name.split('.').next() {
            Some(label) if !label.is_empty() => label,
            _ => &self.hostname,
        }
    }

    /// First tailnet IP (IPv4 first by the schema).
    pub fn ip(&self) -> &str {
        self.tailnet_ips.first().map(String::as_str).unwrap_or("")
    }
}

impl SelfNode {
    pub fn short_name(&self) -> &str {
        match self.name.split('.').next() {
            Some(label) if !label.is_empty() => label,
            _ => &self.hostname,
        }
    }
}

impl Status {
    /// The DERP region's code (`lab`) when the netcheck names it, else its number.
    pub fn region_name(&self, id: u16) -> String {
        self.netcheck
            .as_ref()
            .and_then(|n| n.regions.iter().find(|r| r.id == id))
            .map(|r| r.code.clone())
            .filter(|c| !c.is_empty())
            .unwrap_or_else(|| id.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_are_ignored_and_missing_ones_default() {
        let s: Status = serde_json::from_str(
            r#"{"schema_version":1,"future":{"x":1},"peers":[{"name":"a.t","path":"peer-relay","new":true}]}"#,
        )
        .unwrap();
        assert_eq!(s.peers[0].path_kind(), PathKind::Relay);
        assert_eq!(s.peers[0].short_name(), "a");
        assert!(s.self_node.is_none());
        assert_eq!(s.control.state, "");
    }

    #[test]
    fn null_objects_parse() {
        let s: Status =
            serde_json::from_str(r#"{"self":null,"netcheck":null,"relay_server":null}"#).unwrap();
        assert!(s.netcheck.is_none());
    }
}
