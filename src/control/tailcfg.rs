//! Control-plane wire JSON (Go `tailcfg`), with Go's exact key casing.
//!
//! Decoding follows Go: unknown fields are ignored, and `null` for any non-pointer field leaves
//! it at its zero value (the `nullable` deserializer). Where Go distinguishes nil from empty
//! (`PacketFilter`, `Health`, DERP `Regions`, `Node.AllowedIPs`, …) the field is an `Option`.
//! Encoding follows Go's `omitempty` rules field by field, so a Go peer sees what it expects;
//! Go's `*T` fields become `Option<T>`. `opt.Bool` is `Option<bool>`. Integer-keyed maps are
//! `BTreeMap<i64, _>`, which serde_json writes with decimal-string keys.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::keys::{ChallengePublic, DiscoPublic, MachinePublic, NlPublic, NodePublic};

/// `tailcfg.NodeID`: positive, non-zero.
pub type NodeId = i64;
/// `tailcfg.UserID`.
pub type UserId = i64;
/// DERP region ID (900–999 for self-run DERPs).
pub type RegionId = i32;
/// `tailcfg.NodeCapMap` / `PeerCapMap`: capability name to raw JSON values (`null` kept).
pub type CapMap = BTreeMap<String, Option<Vec<Value>>>;

// ---------------------------------------------------------------------------------------------
// serde helpers

/// Go leaves a field at its zero value on `null`; serde would reject it.
fn nullable<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_zero_i32(v: &i32) -> bool {
    *v == 0
}

fn is_zero_i64(v: &i64) -> bool {
    *v == 0
}

fn is_zero_f64(v: &f64) -> bool {
    *v == 0.0
}

/// Go `netip.Addr` where the zero Addr is `""`: `None` ⇔ `""` (or null).
mod empty_addr {
    use super::*;

    pub fn serialize<S: Serializer>(addr: &Option<IpAddr>, s: S) -> Result<S::Ok, S::Error> {
        match addr {
            Some(a) => s.collect_str(a),
            None => s.serialize_str(""),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<IpAddr>, D::Error> {
        match Option::<String>::deserialize(d)? {
            None => Ok(None),
            Some(s) if s.is_empty() => Ok(None),
            Some(s) => s.parse().map(Some).map_err(serde::de::Error::custom),
        }
    }
}

/// Endpoint lists from peers: entries we cannot use (zoned link-local, garbage) are dropped
/// instead of failing the whole message.
fn lenient_endpoints<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<SocketAddr>, D::Error> {
    let raw: Option<Vec<Option<String>>> = Option::deserialize(d)?;
    Ok(raw
        .unwrap_or_default()
        .into_iter()
        .flatten()
        .filter_map(|s| s.parse().ok())
        .collect())
}

fn lenient_endpoints_opt<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Vec<SocketAddr>>, D::Error> {
    let raw: Option<Vec<Option<String>>> = Option::deserialize(d)?;
    Ok(raw.map(|v| {
        v.into_iter()
            .flatten()
            .filter_map(|s| s.parse().ok())
            .collect()
    }))
}

// ---------------------------------------------------------------------------------------------
// Go time

/// A Go `time.Time` on the wire: RFC 3339 with optional fraction; the zero time
/// `0001-01-01T00:00:00Z` means "unset/never" and is kept distinct (`GoTime::ZERO`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct GoTime(Option<OffsetDateTime>);

/// Text of Go's zero time.
pub const GO_ZERO_TIME: &str = "0001-01-01T00:00:00Z";

impl GoTime {
    /// The zero time ("never").
    pub const ZERO: GoTime = GoTime(None);

    /// A non-zero instant.
    pub fn from_datetime(t: OffsetDateTime) -> Self {
        GoTime(Some(t))
    }

    /// Current wall-clock time (UTC).
    pub fn now() -> Self {
        GoTime(Some(OffsetDateTime::now_utc()))
    }

    /// Seconds since the Unix epoch (UTC).
    pub fn from_unix(secs: i64) -> Self {
        GoTime(OffsetDateTime::from_unix_timestamp(secs).ok())
    }

    /// Whether this is Go's zero time.
    pub fn is_zero(&self) -> bool {
        self.0.is_none()
    }

    /// The instant, or `None` for the zero time.
    pub fn datetime(&self) -> Option<OffsetDateTime> {
        self.0
    }
}

impl fmt::Display for GoTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.and_then(|t| t.format(&Rfc3339).ok()) {
            Some(s) => f.write_str(&s),
            None => f.write_str(GO_ZERO_TIME),
        }
    }
}

impl fmt::Debug for GoTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GoTime({self})")
    }
}

/// Error for an unparseable time string.
#[derive(Debug, thiserror::Error)]
#[error("invalid RFC 3339 time {0:?}")]
pub struct TimeParseError(String);

impl FromStr for GoTime {
    type Err = TimeParseError;
    fn from_str(s: &str) -> Result<Self, TimeParseError> {
        let t = OffsetDateTime::parse(s, &Rfc3339).map_err(|_| TimeParseError(s.to_owned()))?;
        let zero = time::macros::datetime!(0001-01-01 0:00 UTC);
        Ok(GoTime((t != zero).then_some(t)))
    }
}

impl Serialize for GoTime {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for GoTime {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Option::<std::borrow::Cow<'de, str>>::deserialize(d)? {
            None => Ok(GoTime::ZERO),
            Some(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// /key and early payload

/// Answer of `GET /key?v=N` (§2).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct OverTLSPublicKeyResponse {
    /// Old NaCl key; all zeros for modern servers.
    #[serde(rename = "legacyPublicKey", default)]
    pub legacy_public_key: MachinePublic,
    /// The server's Noise static key; must be non-zero.
    #[serde(rename = "publicKey", default)]
    pub public_key: MachinePublic,
}

/// Early payload JSON (§3.5).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EarlyNoise {
    /// Challenge key (unused by OSS v1.90 clients).
    #[serde(rename = "nodeKeyChallenge", default)]
    pub node_key_challenge: ChallengePublic,
}

// ---------------------------------------------------------------------------------------------
// Registration

/// `RegisterResponseAuth`: how a register request authenticates.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RegisterResponseAuth {
    /// Only for old Android clients.
    #[serde(
        rename = "Provider",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub provider: String,
    /// Only for old Android clients.
    #[serde(
        rename = "LoginName",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub login_name: String,
    /// Pre-auth key (`tskey-…`).
    #[serde(
        rename = "AuthKey",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub auth_key: String,
}

/// `POST /machine/register` body (§4.1).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RegisterRequest {
    /// Capability version.
    #[serde(rename = "Version", default, deserialize_with = "nullable")]
    pub version: i32,
    /// Node key being registered.
    #[serde(rename = "NodeKey", default)]
    pub node_key: NodePublic,
    /// Previous node key during rotation; zero when none.
    #[serde(rename = "OldNodeKey", default)]
    pub old_node_key: NodePublic,
    /// Tailnet-lock key (ignored by minimal servers).
    #[serde(rename = "NLKey", default)]
    pub nl_key: NlPublic,
    /// Present iff an auth key is configured.
    #[serde(rename = "Auth", default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<RegisterResponseAuth>,
    /// Zero normally; Unix 123 means logout.
    #[serde(rename = "Expiry", default)]
    pub expiry: GoTime,
    /// AuthURL previously returned, or "".
    #[serde(rename = "Followup", default, deserialize_with = "nullable")]
    pub followup: String,
    /// Host description (Go emits `null` when nil).
    #[serde(rename = "Hostinfo", default)]
    pub hostinfo: Option<Hostinfo>,
    /// Ephemeral node.
    #[serde(
        rename = "Ephemeral",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "is_false"
    )]
    pub ephemeral: bool,
    /// Tailnet-lock signature (std base64), `null` normally.
    #[serde(rename = "NodeKeySignature", default)]
    pub node_key_signature: Option<String>,
    /// Policy hint; ignored.
    #[serde(
        rename = "Tailnet",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub tailnet: String,
}

/// The logout value of `RegisterRequest.Expiry` (Unix 123).
pub fn logout_expiry() -> GoTime {
    GoTime::from_unix(123)
}

/// `tailcfg.User` as in RegisterResponse.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct User {
    #[serde(rename = "ID", default, deserialize_with = "nullable")]
    pub id: UserId,
    #[serde(rename = "DisplayName", default, deserialize_with = "nullable")]
    pub display_name: String,
    #[serde(rename = "ProfilePicURL", default, deserialize_with = "nullable")]
    pub profile_pic_url: String,
    #[serde(rename = "Created", default)]
    pub created: GoTime,
}

/// `tailcfg.Login`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Login {
    #[serde(rename = "ID", default, deserialize_with = "nullable")]
    pub id: i64,
    #[serde(rename = "Provider", default, deserialize_with = "nullable")]
    pub provider: String,
    #[serde(rename = "LoginName", default, deserialize_with = "nullable")]
    pub login_name: String,
    #[serde(rename = "DisplayName", default, deserialize_with = "nullable")]
    pub display_name: String,
    #[serde(rename = "ProfilePicURL", default, deserialize_with = "nullable")]
    pub profile_pic_url: String,
}

/// `POST /machine/register` answer (§4.2). No field is omitempty in Go.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RegisterResponse {
    #[serde(rename = "User", default, deserialize_with = "nullable")]
    pub user: User,
    #[serde(rename = "Login", default, deserialize_with = "nullable")]
    pub login: Login,
    /// True makes the client regenerate its node key.
    #[serde(rename = "NodeKeyExpired", default, deserialize_with = "nullable")]
    pub node_key_expired: bool,
    #[serde(rename = "MachineAuthorized", default, deserialize_with = "nullable")]
    pub machine_authorized: bool,
    /// Non-empty: the user must visit this URL.
    #[serde(rename = "AuthURL", default, deserialize_with = "nullable")]
    pub auth_url: String,
    /// Send `null`.
    #[serde(rename = "NodeKeySignature", default)]
    pub node_key_signature: Option<String>,
    /// Non-empty: login failed.
    #[serde(rename = "Error", default, deserialize_with = "nullable")]
    pub error: String,
}

// ---------------------------------------------------------------------------------------------
// Hostinfo

/// `tailcfg.Service`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Service {
    /// `tcp`, `udp`, `peerapi4`, `peerapi6`, `peerapi-dns-proxy`.
    #[serde(rename = "Proto", default, deserialize_with = "nullable")]
    pub proto: String,
    #[serde(rename = "Port", default, deserialize_with = "nullable")]
    pub port: u16,
    #[serde(
        rename = "Description",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub description: String,
}

/// `tailcfg.NetInfo` (§7.2). The opt.Bool fields are always emitted (`null` when unknown).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NetInfo {
    #[serde(rename = "MappingVariesByDestIP", default)]
    pub mapping_varies_by_dest_ip: Option<bool>,
    #[serde(rename = "HairPinning", default)]
    pub hair_pinning: Option<bool>,
    #[serde(rename = "WorkingIPv6", default)]
    pub working_ipv6: Option<bool>,
    #[serde(rename = "OSHasIPv6", default)]
    pub os_has_ipv6: Option<bool>,
    #[serde(rename = "WorkingUDP", default)]
    pub working_udp: Option<bool>,
    #[serde(rename = "WorkingICMPv4", default)]
    pub working_icmpv4: Option<bool>,
    #[serde(
        rename = "HavePortMap",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "is_false"
    )]
    pub have_port_map: bool,
    #[serde(rename = "UPnP", default)]
    pub upnp: Option<bool>,
    #[serde(rename = "PMP", default)]
    pub pmp: Option<bool>,
    #[serde(rename = "PCP", default)]
    pub pcp: Option<bool>,
    /// Home DERP region; 0 = unknown.
    #[serde(rename = "PreferredDERP", default, deserialize_with = "nullable")]
    pub preferred_derp: RegionId,
    #[serde(
        rename = "LinkType",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub link_type: String,
    /// `"<region>-v4"` / `"<region>-v6"` → seconds.
    #[serde(
        rename = "DERPLatency",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub derp_latency: BTreeMap<String, f64>,
    #[serde(
        rename = "FirewallMode",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub firewall_mode: String,
}

/// `tailcfg.Location`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Location {
    #[serde(
        rename = "Country",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub country: String,
    #[serde(
        rename = "CountryCode",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub country_code: String,
    #[serde(
        rename = "City",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub city: String,
    #[serde(
        rename = "CityCode",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub city_code: String,
    #[serde(
        rename = "Latitude",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "is_zero_f64"
    )]
    pub latitude: f64,
    #[serde(
        rename = "Longitude",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "is_zero_f64"
    )]
    pub longitude: f64,
    #[serde(
        rename = "Priority",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "is_zero_i32"
    )]
    pub priority: i32,
}

/// `tailcfg.Hostinfo` (§7.1). Every field is omitempty in Go.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Hostinfo {
    #[serde(
        rename = "IPNVersion",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub ipn_version: String,
    #[serde(
        rename = "FrontendLogID",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub frontend_log_id: String,
    #[serde(
        rename = "BackendLogID",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub backend_log_id: String,
    #[serde(
        rename = "OS",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub os: String,
    #[serde(
        rename = "OSVersion",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub os_version: String,
    #[serde(rename = "Container", default, skip_serializing_if = "Option::is_none")]
    pub container: Option<bool>,
    #[serde(
        rename = "Env",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub env: String,
    #[serde(
        rename = "Distro",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub distro: String,
    #[serde(
        rename = "DistroVersion",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub distro_version: String,
    #[serde(
        rename = "DistroCodeName",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub distro_code_name: String,
    #[serde(
        rename = "App",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub app: String,
    #[serde(rename = "Desktop", default, skip_serializing_if = "Option::is_none")]
    pub desktop: Option<bool>,
    #[serde(
        rename = "Package",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub package: String,
    #[serde(
        rename = "DeviceModel",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub device_model: String,
    #[serde(
        rename = "PushDeviceToken",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub push_device_token: String,
    #[serde(
        rename = "Hostname",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub hostname: String,
    #[serde(
        rename = "ShieldsUp",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "is_false"
    )]
    pub shields_up: bool,
    #[serde(
        rename = "ShareeNode",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "is_false"
    )]
    pub sharee_node: bool,
    #[serde(
        rename = "NoLogsNoSupport",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "is_false"
    )]
    pub no_logs_no_support: bool,
    #[serde(
        rename = "WireIngress",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "is_false"
    )]
    pub wire_ingress: bool,
    #[serde(
        rename = "IngressEnabled",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "is_false"
    )]
    pub ingress_enabled: bool,
    #[serde(
        rename = "AllowsUpdate",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "is_false"
    )]
    pub allows_update: bool,
    #[serde(
        rename = "Machine",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub machine: String,
    #[serde(
        rename = "GoArch",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub go_arch: String,
    #[serde(
        rename = "GoArchVar",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub go_arch_var: String,
    #[serde(
        rename = "GoVersion",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub go_version: String,
    /// Advertised subnet routes (incl. exit routes).
    #[serde(
        rename = "RoutableIPs",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub routable_ips: Vec<IpNet>,
    #[serde(
        rename = "RequestTags",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub request_tags: Vec<String>,
    #[serde(
        rename = "WoLMACs",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub wol_macs: Vec<String>,
    #[serde(
        rename = "Services",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub services: Vec<Service>,
    #[serde(rename = "NetInfo", default, skip_serializing_if = "Option::is_none")]
    pub net_info: Option<NetInfo>,
    /// Lower-case key on the wire.
    #[serde(
        rename = "sshHostKeys",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub ssh_host_keys: Vec<String>,
    #[serde(
        rename = "Cloud",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub cloud: String,
    #[serde(rename = "Userspace", default, skip_serializing_if = "Option::is_none")]
    pub userspace: Option<bool>,
    #[serde(
        rename = "UserspaceRouter",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub userspace_router: Option<bool>,
    #[serde(
        rename = "AppConnector",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub app_connector: Option<bool>,
    #[serde(
        rename = "ServicesHash",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub services_hash: String,
    #[serde(
        rename = "ExitNodeID",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub exit_node_id: String,
    #[serde(rename = "Location", default, skip_serializing_if = "Option::is_none")]
    pub location: Option<Location>,
    /// TPM description, carried opaquely.
    #[serde(rename = "TPM", default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<Value>,
    #[serde(
        rename = "StateEncrypted",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub state_encrypted: Option<bool>,
}

// ---------------------------------------------------------------------------------------------
// Map request

/// `tailcfg.EndpointType` (a JSON number).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct EndpointType(pub i32);

impl EndpointType {
    pub const UNKNOWN: EndpointType = EndpointType(0);
    pub const LOCAL: EndpointType = EndpointType(1);
    pub const STUN: EndpointType = EndpointType(2);
    pub const PORTMAPPED: EndpointType = EndpointType(3);
    pub const STUN4_LOCAL_PORT: EndpointType = EndpointType(4);
    pub const EXPLICIT_CONF: EndpointType = EndpointType(5);
}

/// `POST /machine/map` body (§5.2).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MapRequest {
    #[serde(rename = "Version", default, deserialize_with = "nullable")]
    pub version: i32,
    /// `"zstd"` or `""`.
    #[serde(rename = "Compress", default, deserialize_with = "nullable")]
    pub compress: String,
    #[serde(rename = "KeepAlive", default, deserialize_with = "nullable")]
    pub keep_alive: bool,
    #[serde(rename = "NodeKey", default)]
    pub node_key: NodePublic,
    #[serde(rename = "DiscoKey", default)]
    pub disco_key: DiscoPublic,
    /// v1.92+ with TPM only; kept as text.
    #[serde(
        rename = "HardwareAttestationKey",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub hardware_attestation_key: String,
    #[serde(rename = "Stream", default, deserialize_with = "nullable")]
    pub stream: bool,
    #[serde(rename = "Hostinfo", default)]
    pub hostinfo: Option<Hostinfo>,
    #[serde(
        rename = "MapSessionHandle",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub map_session_handle: String,
    #[serde(
        rename = "MapSessionSeq",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "is_zero_i64"
    )]
    pub map_session_seq: i64,
    /// `ip:port` strings as sent; clients may include zoned link-local addresses, so these are
    /// kept as text. See [`MapRequest::usable_endpoints`].
    #[serde(
        rename = "Endpoints",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub endpoints: Vec<String>,
    /// Parallel to `endpoints`.
    #[serde(
        rename = "EndpointTypes",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub endpoint_types: Vec<EndpointType>,
    #[serde(
        rename = "TKAHead",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub tka_head: String,
    #[serde(
        rename = "ReadOnly",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "is_false"
    )]
    pub read_only: bool,
    #[serde(
        rename = "OmitPeers",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "is_false"
    )]
    pub omit_peers: bool,
    #[serde(
        rename = "DebugFlags",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub debug_flags: Vec<String>,
    #[serde(
        rename = "ConnectionHandleForTest",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub connection_handle_for_test: String,
}

impl MapRequest {
    /// Endpoints that parse as `ip:port` without a zone and are not IPv6 link-local, with their
    /// type (unknown if the parallel list is short). What a server should distribute.
    pub fn usable_endpoints(&self) -> Vec<(SocketAddr, EndpointType)> {
        self.endpoints
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                let addr: SocketAddr = s.parse().ok()?;
                if let IpAddr::V6(v6) = addr.ip() {
                    if v6.segments()[0] & 0xffc0 == 0xfe80 {
                        return None;
                    }
                }
                let ty = self.endpoint_types.get(i).copied().unwrap_or_default();
                Some((addr, ty))
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Node and peer changes

/// `tailcfg.Node` (§6): the self node and every peer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Node {
    #[serde(rename = "ID", default, deserialize_with = "nullable")]
    pub id: NodeId,
    #[serde(rename = "StableID", default, deserialize_with = "nullable")]
    pub stable_id: String,
    /// MagicDNS FQDN with trailing dot.
    #[serde(rename = "Name", default, deserialize_with = "nullable")]
    pub name: String,
    #[serde(rename = "User", default, deserialize_with = "nullable")]
    pub user: UserId,
    #[serde(
        rename = "Sharer",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "is_zero_i64"
    )]
    pub sharer: UserId,
    /// WireGuard public key.
    #[serde(rename = "Key", default)]
    pub key: NodePublic,
    /// Zero = never expires.
    #[serde(rename = "KeyExpiry", default)]
    pub key_expiry: GoTime,
    #[serde(
        rename = "KeySignature",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub key_signature: Option<String>,
    #[serde(rename = "Machine", default)]
    pub machine: MachinePublic,
    #[serde(rename = "DiscoKey", default)]
    pub disco_key: DiscoPublic,
    /// The node's own single-IP prefixes.
    #[serde(rename = "Addresses", default, deserialize_with = "nullable")]
    pub addresses: Vec<IpNet>,
    /// `None` (null) = same as `addresses`; `Some([])` = route nothing.
    #[serde(rename = "AllowedIPs", default)]
    pub allowed_ips: Option<Vec<IpNet>>,
    #[serde(
        rename = "Endpoints",
        default,
        deserialize_with = "lenient_endpoints",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub endpoints: Vec<SocketAddr>,
    /// Legacy home DERP `"127.3.3.40:<region>"`.
    #[serde(
        rename = "DERP",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub legacy_derp: String,
    #[serde(
        rename = "HomeDERP",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "is_zero_i32"
    )]
    pub home_derp: RegionId,
    /// Always sent as an object (a `null` Hostinfo can crash Go peers).
    #[serde(rename = "Hostinfo", default, deserialize_with = "nullable")]
    pub hostinfo: Hostinfo,
    #[serde(rename = "Created", default)]
    pub created: GoTime,
    /// Capability version of this node.
    #[serde(
        rename = "Cap",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "is_zero_i32"
    )]
    pub cap: i32,
    #[serde(
        rename = "Tags",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub tags: Vec<String>,
    #[serde(
        rename = "PrimaryRoutes",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub primary_routes: Vec<IpNet>,
    #[serde(rename = "LastSeen", default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<GoTime>,
    /// `None` = unknown.
    #[serde(rename = "Online", default, skip_serializing_if = "Option::is_none")]
    pub online: Option<bool>,
    #[serde(
        rename = "MachineAuthorized",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "is_false"
    )]
    pub machine_authorized: bool,
    /// Deprecated list; merged into `cap_map` for the self node by clients.
    #[serde(
        rename = "Capabilities",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub capabilities: Vec<String>,
    #[serde(
        rename = "CapMap",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub cap_map: CapMap,
    #[serde(
        rename = "UnsignedPeerAPIOnly",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "is_false"
    )]
    pub unsigned_peer_api_only: bool,
    /// Client-computed; servers should not send it.
    #[serde(
        rename = "ComputedName",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub computed_name: String,
    #[serde(
        rename = "ComputedNameWithHost",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub computed_name_with_host: String,
    #[serde(
        rename = "DataPlaneAuditLogID",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub data_plane_audit_log_id: String,
    #[serde(
        rename = "Expired",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "is_false"
    )]
    pub expired: bool,
    #[serde(
        rename = "SelfNodeV4MasqAddrForThisPeer",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub self_node_v4_masq_addr_for_this_peer: Option<IpAddr>,
    #[serde(
        rename = "SelfNodeV6MasqAddrForThisPeer",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub self_node_v6_masq_addr_for_this_peer: Option<IpAddr>,
    #[serde(
        rename = "IsWireGuardOnly",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "is_false"
    )]
    pub is_wireguard_only: bool,
    #[serde(
        rename = "IsJailed",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "is_false"
    )]
    pub is_jailed: bool,
    #[serde(
        rename = "ExitNodeDNSResolvers",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub exit_node_dns_resolvers: Vec<Resolver>,
}

impl Node {
    /// Whether this node's key is expired at `now`: control says so (`Expired`), or its
    /// `KeyExpiry` has passed (Go's client checks the time itself too).
    pub fn key_expired(&self, now: std::time::SystemTime) -> bool {
        self.expired
            || self
                .key_expiry
                .datetime()
                .is_some_and(|t| time::OffsetDateTime::from(now) >= t)
    }

    /// When this node's key expires, if control set an expiry.
    pub fn key_expiry_time(&self) -> Option<std::time::SystemTime> {
        self.key_expiry.datetime().map(std::time::SystemTime::from)
    }

    /// Home DERP region: `HomeDERP`, else the legacy `"127.3.3.40:N"` string (as Go does).
    pub fn effective_home_derp(&self) -> RegionId {
        if self.home_derp != 0 {
            return self.home_derp;
        }
        self.legacy_derp
            .strip_prefix("127.3.3.40:")
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }

    /// Routes for this peer: `AllowedIPs`, or `Addresses` when it is null.
    pub fn effective_allowed_ips(&self) -> &[IpNet] {
        self.allowed_ips.as_deref().unwrap_or(&self.addresses)
    }
}

/// `tailcfg.PeerChange`: a partial update of a known peer (§5.4). Zero/absent = unchanged.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PeerChange {
    #[serde(rename = "NodeID", default, deserialize_with = "nullable")]
    pub node_id: NodeId,
    /// Non-zero sets the home DERP.
    #[serde(
        rename = "DERPRegion",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "is_zero_i32"
    )]
    pub derp_region: RegionId,
    /// Non-zero sets the capability version.
    #[serde(
        rename = "Cap",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "is_zero_i32"
    )]
    pub cap: i32,
    #[serde(rename = "CapMap", default, skip_serializing_if = "Option::is_none")]
    pub cap_map: Option<CapMap>,
    #[serde(
        rename = "Endpoints",
        default,
        deserialize_with = "lenient_endpoints_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub endpoints: Option<Vec<SocketAddr>>,
    #[serde(rename = "Key", default, skip_serializing_if = "Option::is_none")]
    pub key: Option<NodePublic>,
    #[serde(
        rename = "KeySignature",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub key_signature: Option<String>,
    #[serde(rename = "DiscoKey", default, skip_serializing_if = "Option::is_none")]
    pub disco_key: Option<DiscoPublic>,
    #[serde(rename = "Online", default, skip_serializing_if = "Option::is_none")]
    pub online: Option<bool>,
    #[serde(rename = "LastSeen", default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<GoTime>,
    #[serde(rename = "KeyExpiry", default, skip_serializing_if = "Option::is_none")]
    pub key_expiry: Option<GoTime>,
}

// ---------------------------------------------------------------------------------------------
// DERP map

/// `tailcfg.DERPMap` (§5.6).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DerpMap {
    /// `None` = keep previous.
    #[serde(
        rename = "HomeParams",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub home_params: Option<DerpHomeParams>,
    /// `None` = keep previous regions; `Some({})` = no regions. Null region values are dropped
    /// when applied.
    #[serde(rename = "Regions", default, skip_serializing_if = "Option::is_none")]
    pub regions: Option<BTreeMap<RegionId, Option<DerpRegion>>>,
    /// Lower-case key on the wire.
    #[serde(
        rename = "omitDefaultRegions",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "is_false"
    )]
    pub omit_default_regions: bool,
}

/// `tailcfg.DERPHomeParams`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DerpHomeParams {
    /// `None` = keep previous scores.
    #[serde(
        rename = "RegionScore",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub region_score: Option<BTreeMap<RegionId, f64>>,
}

/// `tailcfg.DERPRegion`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DerpRegion {
    #[serde(rename = "RegionID", default, deserialize_with = "nullable")]
    pub region_id: RegionId,
    #[serde(rename = "RegionCode", default, deserialize_with = "nullable")]
    pub region_code: String,
    #[serde(rename = "RegionName", default, deserialize_with = "nullable")]
    pub region_name: String,
    #[serde(
        rename = "Latitude",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "is_zero_f64"
    )]
    pub latitude: f64,
    #[serde(
        rename = "Longitude",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "is_zero_f64"
    )]
    pub longitude: f64,
    #[serde(
        rename = "Avoid",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "is_false"
    )]
    pub avoid: bool,
    #[serde(
        rename = "NoMeasureNoHome",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "is_false"
    )]
    pub no_measure_no_home: bool,
    #[serde(rename = "Nodes", default, deserialize_with = "nullable")]
    pub nodes: Vec<DerpNode>,
}

/// `tailcfg.DERPNode`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DerpNode {
    #[serde(rename = "Name", default, deserialize_with = "nullable")]
    pub name: String,
    #[serde(rename = "RegionID", default, deserialize_with = "nullable")]
    pub region_id: RegionId,
    #[serde(rename = "HostName", default, deserialize_with = "nullable")]
    pub host_name: String,
    /// `"sha256-raw:<hex>"` pins a self-signed certificate.
    #[serde(
        rename = "CertName",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub cert_name: String,
    /// `""` = use DNS, `"none"` = disabled, else a fixed IPv4.
    #[serde(
        rename = "IPv4",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub ipv4: String,
    /// As `ipv4`.
    #[serde(
        rename = "IPv6",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub ipv6: String,
    /// 0 = 3478, -1 = disabled.
    #[serde(
        rename = "STUNPort",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "is_zero_i32"
    )]
    pub stun_port: i32,
    #[serde(
        rename = "STUNOnly",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "is_false"
    )]
    pub stun_only: bool,
    /// 0 = 443.
    #[serde(
        rename = "DERPPort",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "is_zero_i32"
    )]
    pub derp_port: i32,
    #[serde(
        rename = "InsecureForTests",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "is_false"
    )]
    pub insecure_for_tests: bool,
    #[serde(
        rename = "STUNTestIP",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub stun_test_ip: String,
    #[serde(
        rename = "CanPort80",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "is_false"
    )]
    pub can_port80: bool,
}

// ---------------------------------------------------------------------------------------------
// DNS

/// `dnstype.Resolver`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Resolver {
    /// `"8.8.8.8"`, `"1.2.3.4:53"`, or a DoH URL.
    #[serde(
        rename = "Addr",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub addr: String,
    #[serde(
        rename = "BootstrapResolution",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub bootstrap_resolution: Vec<IpAddr>,
    #[serde(
        rename = "UseWithExitNode",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "is_false"
    )]
    pub use_with_exit_node: bool,
}

/// `tailcfg.DNSRecord`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DnsRecord {
    #[serde(rename = "Name", default, deserialize_with = "nullable")]
    pub name: String,
    #[serde(
        rename = "Type",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub record_type: String,
    #[serde(rename = "Value", default, deserialize_with = "nullable")]
    pub value: String,
}

/// `tailcfg.DNSConfig` (§5.7). All fields omitempty.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DnsConfig {
    #[serde(
        rename = "Resolvers",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub resolvers: Vec<Resolver>,
    /// Split DNS: suffix → resolvers; null/empty = answer with 100.100.100.100.
    #[serde(
        rename = "Routes",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub routes: BTreeMap<String, Option<Vec<Resolver>>>,
    #[serde(
        rename = "FallbackResolvers",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub fallback_resolvers: Vec<Resolver>,
    #[serde(
        rename = "Domains",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub domains: Vec<String>,
    #[serde(
        rename = "Proxied",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "is_false"
    )]
    pub proxied: bool,
    #[serde(
        rename = "Nameservers",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub nameservers: Vec<IpAddr>,
    #[serde(
        rename = "CertDomains",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub cert_domains: Vec<String>,
    #[serde(
        rename = "ExtraRecords",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub extra_records: Vec<DnsRecord>,
    #[serde(
        rename = "ExitNodeFilteredSet",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub exit_node_filtered_set: Vec<String>,
}

// ---------------------------------------------------------------------------------------------
// Packet filter

/// `tailcfg.PortRange` (inclusive).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PortRange {
    #[serde(rename = "First", default, deserialize_with = "nullable")]
    pub first: u16,
    #[serde(rename = "Last", default, deserialize_with = "nullable")]
    pub last: u16,
}

impl PortRange {
    /// All ports.
    pub const ANY: PortRange = PortRange {
        first: 0,
        last: 65535,
    };
}

/// `tailcfg.NetPortRange`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NetPortRange {
    /// `"*"`, an IP, a masked CIDR or an `a-b` range.
    #[serde(rename = "IP", default, deserialize_with = "nullable")]
    pub ip: String,
    /// Legacy; its presence makes Go reject the filter. Never sent by us.
    #[serde(rename = "Bits", default, skip_serializing_if = "Option::is_none")]
    pub bits: Option<i32>,
    #[serde(rename = "Ports", default, deserialize_with = "nullable")]
    pub ports: PortRange,
}

/// `tailcfg.CapGrant`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CapGrant {
    #[serde(rename = "Dsts", default, deserialize_with = "nullable")]
    pub dsts: Vec<IpNet>,
    #[serde(
        rename = "Caps",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub caps: Vec<String>,
    #[serde(
        rename = "CapMap",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub cap_map: CapMap,
}

/// `tailcfg.FilterRule` (§5.8): inbound rules.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FilterRule {
    #[serde(rename = "SrcIPs", default, deserialize_with = "nullable")]
    pub src_ips: Vec<String>,
    /// Legacy; its presence makes Go reject the whole filter. Never sent by us.
    #[serde(rename = "SrcBits", default, skip_serializing_if = "Option::is_none")]
    pub src_bits: Option<Vec<i32>>,
    #[serde(
        rename = "DstPorts",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub dst_ports: Vec<NetPortRange>,
    /// Empty = TCP, UDP, ICMPv4, ICMPv6.
    #[serde(
        rename = "IPProto",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub ip_proto: Vec<i32>,
    #[serde(
        rename = "CapGrant",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub cap_grant: Vec<CapGrant>,
}

impl FilterRule {
    /// Go's `FilterAllowAll`: every source, every destination and port.
    pub fn allow_all() -> FilterRule {
        FilterRule {
            src_ips: vec!["*".into()],
            dst_ports: vec![NetPortRange {
                ip: "*".into(),
                bits: None,
                ports: PortRange::ANY,
            }],
            ..FilterRule::default()
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Map response and its parts

/// `tailcfg.UserProfile`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UserProfile {
    #[serde(rename = "ID", default, deserialize_with = "nullable")]
    pub id: UserId,
    #[serde(rename = "LoginName", default, deserialize_with = "nullable")]
    pub login_name: String,
    #[serde(rename = "DisplayName", default, deserialize_with = "nullable")]
    pub display_name: String,
    #[serde(
        rename = "ProfilePicURL",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub profile_pic_url: String,
}

/// `tailcfg.Debug`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Debug {
    #[serde(
        rename = "SleepSeconds",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "is_zero_f64"
    )]
    pub sleep_seconds: f64,
    #[serde(
        rename = "DisableLogTail",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "is_false"
    )]
    pub disable_log_tail: bool,
    /// Makes Go clients exit. Never send it.
    #[serde(rename = "Exit", default, skip_serializing_if = "Option::is_none")]
    pub exit: Option<i32>,
}

/// `tailcfg.PingRequest`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PingRequest {
    #[serde(rename = "URL", default, deserialize_with = "nullable")]
    pub url: String,
    #[serde(
        rename = "URLIsNoise",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "is_false"
    )]
    pub url_is_noise: bool,
    #[serde(
        rename = "Log",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "is_false"
    )]
    pub log: bool,
    /// Comma-separated: `disco`, `TSMP`, `ICMP`, `peerapi`, `c2n`.
    #[serde(
        rename = "Types",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub types: String,
    /// `""` on the wire when unset.
    #[serde(rename = "IP", default, with = "empty_addr")]
    pub ip: Option<IpAddr>,
    /// Std base64 (`c2n`: a raw HTTP/1.1 request).
    #[serde(rename = "Payload", default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<String>,
}

impl PingRequest {
    /// The `Types` list.
    pub fn type_list(&self) -> Vec<&str> {
        self.types.split(',').filter(|t| !t.is_empty()).collect()
    }

    /// The decoded payload.
    pub fn payload_bytes(&self) -> Option<Vec<u8>> {
        use base64::Engine;
        let p = self.payload.as_ref()?;
        base64::engine::general_purpose::STANDARD.decode(p).ok()
    }
}

/// `tailcfg.ControlIPCandidate`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ControlIpCandidate {
    #[serde(
        rename = "IP",
        default,
        with = "empty_addr",
        skip_serializing_if = "Option::is_none"
    )]
    pub ip: Option<IpAddr>,
    #[serde(
        rename = "ACEHost",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub ace_host: String,
    #[serde(
        rename = "DialStartDelaySec",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "is_zero_f64"
    )]
    pub dial_start_delay_sec: f64,
    #[serde(
        rename = "DialTimeoutSec",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "is_zero_f64"
    )]
    pub dial_timeout_sec: f64,
    #[serde(
        rename = "Priority",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "is_zero_i32"
    )]
    pub priority: i32,
}

/// `tailcfg.ControlDialPlan`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ControlDialPlan {
    #[serde(rename = "Candidates", default, deserialize_with = "nullable")]
    pub candidates: Vec<ControlIpCandidate>,
}

/// `tailcfg.DisplayMessageAction`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DisplayMessageAction {
    #[serde(rename = "URL", default, deserialize_with = "nullable")]
    pub url: String,
    #[serde(rename = "Label", default, deserialize_with = "nullable")]
    pub label: String,
}

/// `tailcfg.DisplayMessage`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DisplayMessage {
    #[serde(rename = "Title", default, deserialize_with = "nullable")]
    pub title: String,
    #[serde(rename = "Text", default, deserialize_with = "nullable")]
    pub text: String,
    /// `high`, `medium`, `low`.
    #[serde(rename = "Severity", default, deserialize_with = "nullable")]
    pub severity: String,
    #[serde(
        rename = "ImpactsConnectivity",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "is_false"
    )]
    pub impacts_connectivity: bool,
    #[serde(
        rename = "PrimaryAction",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub primary_action: Option<DisplayMessageAction>,
}

/// One message of the map stream (§5.5). Every field is optional; see §5.4 for what absence,
/// `null` and empty mean, implemented by `netmap::NetworkMap::apply`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MapResponse {
    #[serde(
        rename = "MapSessionHandle",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub map_session_handle: String,
    #[serde(
        rename = "Seq",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "is_zero_i64"
    )]
    pub seq: i64,
    #[serde(
        rename = "KeepAlive",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "is_false"
    )]
    pub keep_alive: bool,
    #[serde(
        rename = "PingRequest",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub ping_request: Option<PingRequest>,
    #[serde(
        rename = "PopBrowserURL",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub pop_browser_url: String,
    /// Self node; required in the first non-keep-alive message.
    #[serde(rename = "Node", default, skip_serializing_if = "Option::is_none")]
    pub node: Option<Node>,
    #[serde(rename = "DERPMap", default, skip_serializing_if = "Option::is_none")]
    pub derp_map: Option<DerpMap>,
    /// Non-empty: the full peer list.
    #[serde(
        rename = "Peers",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub peers: Vec<Node>,
    #[serde(
        rename = "PeersChanged",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub peers_changed: Vec<Node>,
    #[serde(
        rename = "PeersRemoved",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub peers_removed: Vec<NodeId>,
    #[serde(
        rename = "PeersChangedPatch",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub peers_changed_patch: Vec<PeerChange>,
    /// true: last seen now; false: clear last seen.
    #[serde(
        rename = "PeerSeenChange",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub peer_seen_change: BTreeMap<NodeId, bool>,
    #[serde(
        rename = "OnlineChange",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub online_change: BTreeMap<NodeId, bool>,
    #[serde(rename = "DNSConfig", default, skip_serializing_if = "Option::is_none")]
    pub dns_config: Option<DnsConfig>,
    #[serde(
        rename = "Domain",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub domain: String,
    #[serde(
        rename = "CollectServices",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub collect_services: Option<bool>,
    /// `None` = unchanged; `Some([])` = deny all inbound.
    #[serde(
        rename = "PacketFilter",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub packet_filter: Option<Vec<FilterRule>>,
    /// Named filters; a `null` value deletes that name, `"*": null` clears all first.
    #[serde(
        rename = "PacketFilters",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub packet_filters: Option<BTreeMap<String, Option<Vec<FilterRule>>>>,
    #[serde(
        rename = "UserProfiles",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub user_profiles: Vec<UserProfile>,
    /// `None` = unchanged; `Some([])` = clear.
    #[serde(rename = "Health", default, skip_serializing_if = "Option::is_none")]
    pub health: Option<Vec<String>>,
    #[serde(
        rename = "DisplayMessages",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub display_messages: Option<BTreeMap<String, Option<DisplayMessage>>>,
    /// Tailscale SSH policy, carried opaquely.
    #[serde(rename = "SSHPolicy", default, skip_serializing_if = "Option::is_none")]
    pub ssh_policy: Option<Value>,
    #[serde(
        rename = "ControlTime",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub control_time: Option<GoTime>,
    /// Never send (enables tailnet lock).
    #[serde(rename = "TKAInfo", default, skip_serializing_if = "Option::is_none")]
    pub tka_info: Option<Value>,
    #[serde(
        rename = "DomainDataPlaneAuditLogID",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub domain_data_plane_audit_log_id: String,
    #[serde(rename = "Debug", default, skip_serializing_if = "Option::is_none")]
    pub debug: Option<Debug>,
    #[serde(
        rename = "ControlDialPlan",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub control_dial_plan: Option<ControlDialPlan>,
    #[serde(
        rename = "ClientVersion",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub client_version: Option<Value>,
    #[serde(
        rename = "DefaultAutoUpdate",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub default_auto_update: Option<bool>,
}

impl MapResponse {
    /// The keep-alive message `{"KeepAlive":true}`.
    pub fn keep_alive() -> MapResponse {
        MapResponse {
            keep_alive: true,
            ..MapResponse::default()
        }
    }
}

#[cfg(test)]
mod tests;
