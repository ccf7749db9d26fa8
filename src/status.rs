//! The node's `Status` snapshot: one immutable value, published on a `tokio::sync::watch`
//! channel, that every view reads (`tern status`, later `tern top` and metrics).
//!
//! The JSON form is a stable, documented interface (`docs/status-json.md`): fields are only ever
//! added; existing ones keep their name, type and meaning. Fields that later issues fill
//! (per-peer path, endpoint, latency, counters) are present now with `null`/`0`.

use std::fmt::Write as _;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::duration_text::{go_duration, ms_to_nanos};

/// Version of the JSON schema; bumped only for incompatible changes (none so far).
pub const SCHEMA_VERSION: u32 = 1;

/// The whole node, as of one moment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub schema_version: u32,
    /// `NoState`, `NeedsLogin`, `Stopped`, `Starting`, `Running` (Tailscale's names).
    pub backend_state: BackendState,
    pub control: ControlStatus,
    /// This node; `null` until control has sent the first netmap.
    #[serde(rename = "self")]
    pub self_node: Option<SelfStatus>,
    /// Peers, sorted by name.
    pub peers: Vec<PeerStatus>,
    pub data_plane: DataPlaneStatus,
    pub daemon: DaemonInfo,
    /// The last netcheck report; `null` until the data plane measured once.
    #[serde(default)]
    pub netcheck: Option<crate::report::NetcheckReport>,
    /// The peer relay server (`tern set --relay-server-port`); `null` when it is off.
    #[serde(default)]
    pub relay_server: Option<RelayServerStatus>,
    /// Why the relay server the pref asks for does not run (control's `disable-relay-server`,
    /// a port that cannot be bound); `null` when it runs or is not asked for.
    #[serde(default)]
    pub relay_server_off: Option<String>,
    /// The URL to visit while control waits for an interactive login (`NeedsLogin`); else `null`.
    #[serde(default)]
    pub auth_url: Option<String>,
    /// Routes, rules, firewall and the exit node, as the data plane applied them.
    #[serde(default)]
    pub routing: RoutingStatus,
    /// The host's resolver configuration (`--accept-dns`).
    #[serde(default)]
    pub dns: DnsStatus,
}

/// What tern did to the host's DNS.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct DnsStatus {
    pub accept_dns: bool,
    /// Who manages /etc/resolv.conf: `direct`, `systemd-resolved`, `network-manager`,
    /// `resolvconf` (empty without a data plane).
    pub manager: String,
    /// What tern wrote (empty: the host's own file is in place).
    pub nameservers: Vec<String>,
    pub search_domains: Vec<String>,
    /// Why the host's DNS was not set, in words.
    pub error: Option<String>,
    /// While an exit node is in use that answers DNS: its DNS over HTTP URL, where MagicDNS
    /// sends the names it does not answer itself.
    #[serde(default)]
    pub exit_node_doh: Option<String>,
}

/// What the data plane did to the host's routing and firewall.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct RoutingStatus {
    /// The routing table tern's routes are in (52 with policy rules, 254 = main without).
    pub table: u32,
    /// Whether the ip rules 5210–5270 are installed.
    pub policy_rules: bool,
    /// Routes into the TUN and throw routes installed now.
    pub routes: Vec<String>,
    pub throw_routes: Vec<String>,
    /// `nftables` or `iptables` (`null` with netfilter off or unavailable).
    pub netfilter_kind: Option<String>,
    /// `on`, `nodivert` or `off`.
    pub netfilter_mode: String,
    /// Why netfilter could not be set up, in words.
    pub netfilter_error: Option<String>,
    /// The exit node in use: its name, and whether it is in the netmap now (when it is not,
    /// traffic stays in the tunnel and is dropped: fail closed).
    pub exit_node: Option<String>,
    pub exit_node_ip: Option<String>,
    pub exit_node_available: bool,
    /// The routes this node offers (`Hostinfo.RoutableIPs`).
    pub advertised_routes: Vec<String>,
    /// What keeps forwarding from working here (ip_forward off, strict rp_filter), as advice.
    pub forwarding_problems: Vec<String>,
    /// Netlink route messages sent since the data plane started.
    pub route_messages: u64,
    /// Looks for rules and firewall objects someone removed, since the data plane started.
    pub host_checks: u64,
    /// Whether the host announces rule, address and firewall changes to tern (netlink groups);
    /// a look follows each announcement.
    pub host_changes_announced: bool,
    /// How often tern looks without being told (30 s while changes are announced, else 2 s).
    pub host_poll_secs: u64,
}

/// A running peer relay server, as `status --json` shows it (docs/status-json.md).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RelayServerStatus {
    /// The UDP port it listens on (both families).
    pub port: u16,
    /// The addresses it offers clients in allocations (`ip:port`), empty until discovered.
    pub addr_ports: Vec<String>,
    /// `tern set --relay-server-static-endpoints`: offered after the discovered ones.
    #[serde(default)]
    pub static_endpoints: Vec<String>,
    /// Its ephemeral relay disco key (`discokey:…`, fresh every start; not the node's).
    pub server_disco_key: String,
    /// Allocation requests answered since start.
    pub allocations: u64,
    /// Packets and bytes forwarded between bound legs since start (Geneve header included).
    pub forwarded_packets: u64,
    pub forwarded_bytes: u64,
    /// Packets dropped, by cause (`unknown_vni`, `not_bound`, `unknown_source`, `bad_bind`, …).
    pub drops: std::collections::BTreeMap<String, u64>,
    /// Live sessions (endpoints), by VNI.
    pub sessions: Vec<RelaySessionStatus>,
    /// Forwarded packets and bytes by the address families of the two legs.
    #[serde(default)]
    pub forwarded_by_transport: Vec<RelayForwarded>,
}

/// Forwarding from a leg of one family (`udp4`, `udp6`) to a leg of another.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayForwarded {
    pub transport_in: String,
    pub transport_out: String,
    pub packets: u64,
    pub bytes: u64,
}

/// One relay endpoint: a pair of clients and the VNI they share.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RelaySessionStatus {
    pub vni: u32,
    /// `connecting` (allocated, a leg unbound) or `open` (both bound, forwarding).
    pub state: String,
    /// Seconds since allocation.
    pub age_secs: u64,
    /// The two legs, in the allocation's sorted disco-key order.
    pub legs: Vec<RelayLegStatus>,
}

/// One client of a relay session.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RelayLegStatus {
    /// The client's disco key (`discokey:…`) and, when it is a known peer, its hostname.
    pub disco_key: String,
    pub peer: Option<String>,
    /// The address its bind handshake proved (`ip:port`); `null` until bound.
    pub bound: Option<String>,
    /// Packets and bytes received from this leg (and forwarded to the other).
    pub packets_rx: u64,
    pub bytes_rx: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BackendState {
    /// Daemon started, no preferences yet (never ran `tern up`).
    NoState,
    /// Control rejected the login (bad auth key, expired key without a way to renew).
    NeedsLogin,
    /// `tern down`: registered before, but not talking to control now.
    Stopped,
    /// Talking to control (or trying to), no netmap yet.
    Starting,
    /// Registered and holding a netmap from control.
    Running,
}

/// The control connection as the daemon sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ControlStatus {
    /// The coordination server URL, if one was configured.
    pub url: Option<String>,
    pub state: ControlState,
    /// The last error talking to control; kept until the next success.
    pub last_error: Option<ErrorReport>,
    /// When the current map stream started, RFC 3339.
    pub connected_since: Option<String>,
    /// When the next connection attempt is due (while `state` is `backoff`), RFC 3339.
    pub next_attempt_at: Option<String>,
    /// Consecutive failed attempts since the last success.
    pub failed_attempts: u32,
    /// Map streams opened (first netmap received) since the daemon started.
    pub map_sessions: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ControlState {
    /// Not asked to connect (`tern down`, or no `tern up` yet).
    Idle,
    /// Dialing, handshaking or registering.
    Connecting,
    /// Map stream open.
    Connected,
    /// The last attempt failed; waiting before the next one.
    Backoff,
    /// Control refused our credentials; not retrying until `tern up` is run again.
    LoginFailed,
    /// Control wants a person to visit `auth_url`; the registration waits for it.
    WaitingForLogin,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReport {
    /// The error with its context chain, e.g. `dial 127.0.0.1:9: connection refused`.
    pub message: String,
    /// RFC 3339.
    pub at: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SelfStatus {
    /// MagicDNS name without the trailing dot (e.g. `n1.tailnet.example`).
    pub name: String,
    pub hostname: String,
    pub node_id: i64,
    pub stable_id: String,
    pub user_id: i64,
    /// `nodekey:<hex>`
    pub node_key: String,
    /// `mkey:<hex>`
    pub machine_key: String,
    /// `discokey:<hex>` (new on every daemon start)
    pub disco_key: String,
    /// Tailnet addresses, IPv4 first (no prefix length).
    pub tailnet_ips: Vec<String>,
    /// RFC 3339, or `null` for "never expires".
    pub key_expiry: Option<String>,
    pub home_derp: Option<u16>,
    /// The peer API as control announces it (`http://100.64.0.1:PORT`; empty without one).
    #[serde(default)]
    pub peerapi_urls: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct PeerStatus {
    pub name: String,
    pub hostname: String,
    pub node_id: i64,
    pub stable_id: String,
    pub node_key: String,
    pub disco_key: Option<String>,
    pub tailnet_ips: Vec<String>,
    pub os: Option<String>,
    /// What control says: `true`, `false`, or `null` when control does not know.
    pub online: Option<bool>,
    /// RFC 3339; control sets it for offline peers.
    pub last_seen: Option<String>,
    pub key_expiry: Option<String>,
    pub expired: bool,
    /// The peer's home DERP region (from the netmap).
    pub home_derp: Option<u16>,
    /// The peer's advertised UDP endpoints (from the netmap), `ip:port`.
    pub endpoints: Vec<String>,
    /// The peer's peer API (from its `Hostinfo.Services`), as Go's `PeerAPIURL`.
    #[serde(default)]
    pub peerapi_urls: Vec<String>,
    // --- Filled by the data plane (later issues); null/0 until then. ---
    /// `direct`, `peer-relay`, `derp` or `none`; `null` before the data plane knows the peer.
    pub path: Option<String>,
    /// The endpoint in use for `direct`/`relay`, `ip:port`.
    pub endpoint: Option<String>,
    /// The DERP region in use when `path` is `derp`.
    pub derp_region: Option<u16>,
    pub latency_ms: Option<f64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// RFC 3339.
    pub last_handshake_at: Option<String>,
    /// Why the path is what it is: a short machine-readable code (`direct`, `discovering`,
    /// `no-pong-from-candidates`, `peer-hard-nat`, `udp-blocked`, `no-endpoints`, …).
    pub path_reason: Option<String>,
    /// RFC 3339: the last disco pong from this peer.
    #[serde(default)]
    pub last_pong_at: Option<String>,
    /// The last path changes, oldest first (at most 16).
    #[serde(default)]
    pub path_history: Vec<PathHistoryEntry>,
    /// The path machine's candidate UDP endpoints, by address; `[]` without a disco key.
    #[serde(default)]
    pub candidates: Vec<CandidateEntry>,
    /// On `peer-relay`: the endpoint's VNI.
    #[serde(default)]
    pub relay_vni: Option<u32>,
    /// On `peer-relay`: the name of the node that runs the relay, when we allocated the
    /// endpoint ourselves (an endpoint the peer allocated does not say).
    #[serde(default)]
    pub relay_node: Option<String>,
    /// Why the peer is not on a peer relay while it is on DERP (`relay-client-disabled`,
    /// `no-relay-granted`, `peer-not-relay-capable`, `relay-discovering`, `relay-allocation-failed`,
    /// `relay-bind-timeout`, `relay-unreachable`); `null` on a direct or relay path.
    #[serde(default)]
    pub relay_reason: Option<String>,
    /// Control lets this peer serve as an exit node (0.0.0.0/0 and ::/0 approved).
    #[serde(default)]
    pub exit_node_option: bool,
    /// The subnet routes control approved for this peer (installed here only with
    /// `--accept-routes`).
    #[serde(default)]
    pub subnet_routes: Vec<String>,
}

/// One candidate UDP endpoint of a peer, as disco sees it.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct CandidateEntry {
    /// `ip:port`.
    pub addr: String,
    /// Where we learned it, in this order: `netmap`, `call-me-maybe`, `ping` (the peer pinged
    /// us from there). A candidate can have several.
    pub sources: Vec<String>,
    /// RFC 3339: our last discovery or heartbeat ping to it.
    pub last_ping_at: Option<String>,
    /// RFC 3339: the last pong from it.
    pub last_pong_at: Option<String>,
    /// Round trip of that pong, 0.1 ms precision.
    pub latency_ms: Option<f64>,
}

/// One change of a peer's path.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PathHistoryEntry {
    /// RFC 3339.
    pub at: String,
    /// The new path: `direct`, `peer-relay`, `derp` or `none`.
    pub path: String,
    pub endpoint: Option<String>,
    pub derp_region: Option<u16>,
    /// Why (same codes as `path_reason`).
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct DataPlaneStatus {
    /// The `--tun` setting: an interface name or `userspace-networking`.
    pub tun: String,
    /// The UDP port setting.
    pub port: u16,
    /// Whether packets can flow. `false` until the data plane exists.
    pub active: bool,
    /// Why not, in words.
    pub note: Option<String>,
    /// Last measured latency to each DERP region in milliseconds (`null` = no answer).
    #[serde(default)]
    pub derp_latency_ms: std::collections::BTreeMap<u16, Option<f64>>,
    /// Packets the data plane dropped, by cause (`disco_bad_box`, `stun_unmatched`, …).
    #[serde(default)]
    pub drops: std::collections::BTreeMap<String, u64>,
    /// Quad-100 (MagicDNS on the netstack): `udp_queries`, `tcp_queries`, `tcp_connections`,
    /// `tcp_aborted`, `oversized`, `queue_full`, `packets_in`, `packets_out`.
    #[serde(default)]
    pub quad100: std::collections::BTreeMap<String, u64>,
    /// The userspace stack with `--tun userspace-networking` (empty otherwise): `packets_in`,
    /// `packets_out`, `queue_full`, `tcp_inbound`, `tcp_outbound`, `tcp_refused_full`,
    /// `handshake_timeouts`, `open_connections`.
    #[serde(default)]
    pub netstack: std::collections::BTreeMap<String, u64>,
    /// The peer API (empty without one): `connections`, `refused_not_peer`,
    /// `refused_over_limit`, `dns_queries`, `dns_denied`, `dns_bad_requests`,
    /// `dns_refused_names`, `dns_failures`.
    #[serde(default)]
    pub peerapi: std::collections::BTreeMap<String, u64>,
    /// TUN offloads (empty when off or without a kernel TUN): `super_packets_read`,
    /// `segments_split`, `udp_super_packets_read`, `datagrams_split`, `frames_refused`,
    /// `packets_to_tun`, `tun_writes`, `super_packets_written`.
    #[serde(default)]
    pub tun_offload: std::collections::BTreeMap<String, u64>,
    /// The SOCKS5 and HTTP proxies together (empty without either): `accepted`, `over_limit`,
    /// `bad_requests`, `dial_failures`, `connected`.
    #[serde(default)]
    pub proxies: std::collections::BTreeMap<String, u64>,
    /// WireGuard packets and bytes by path (`direct_ipv4`, `direct_ipv6`, `derp`,
    /// `peer_relay_ipv4`, `peer_relay_ipv6`), since the data plane started.
    #[serde(default)]
    pub path_io: std::collections::BTreeMap<String, PathIoStatus>,
    /// Peer path changes since the data plane started, by new path and reason.
    #[serde(default)]
    pub path_changes: Vec<PathChangeCount>,
    /// The DERP regions with a connection task, by region id.
    #[serde(default)]
    pub derp_regions: std::collections::BTreeMap<u16, DerpRegionState>,
}

/// Packets and bytes on one path.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathIoStatus {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
}

/// How often peers moved to `path` for `reason`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathChangeCount {
    pub path: String,
    pub reason: String,
    pub count: u64,
}

/// One DERP region's connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DerpRegionState {
    /// The connection is up now.
    pub connected: bool,
    /// It is our home region.
    pub home: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DaemonInfo {
    pub version: String,
    pub pid: u32,
    /// RFC 3339.
    pub started_at: String,
}

impl Status {
    /// The snapshot of a daemon that has just started and not talked to anyone.
    pub fn initial(data_plane: DataPlaneStatus, started_at: SystemTime) -> Self {
        Self {
            schema_version: SCHEMA_VERSION,
            backend_state: BackendState::NoState,
            control: ControlStatus {
                url: None,
                state: ControlState::Idle,
                last_error: None,
                connected_since: None,
                next_attempt_at: None,
                failed_attempts: 0,
                map_sessions: 0,
            },
            self_node: None,
            peers: Vec::new(),
            data_plane,
            daemon: DaemonInfo {
                version: env!("CARGO_PKG_VERSION").to_string(),
                pid: std::process::id(),
                started_at: rfc3339(started_at),
            },
            netcheck: None,
            relay_server: None,
            relay_server_off: None,
            auth_url: None,
            routing: RoutingStatus::default(),
            dns: DnsStatus::default(),
        }
    }

    /// IPv4 then IPv6 tailnet addresses of this node.
    pub fn self_ips(&self) -> &[String] {
        self.self_node
            .as_ref()
            .map(|s| s.tailnet_ips.as_slice())
            .unwrap_or_default()
    }
}

/// Format a time as RFC 3339 UTC (seconds precision is enough for people and scripts).
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    time::OffsetDateTime::from_unix_timestamp(secs as i64)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| "1970-01-01T00:00:00Z".to_string())
}

/// Parse an RFC 3339 string back to a `SystemTime`.
pub fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    let secs = u64::try_from(t.unix_timestamp()).ok()?;
    Some(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs))
}

/// `tern status` in the style of `tailscale status`: one line per node, then health notes.
///
/// ```text
/// 100.64.0.1   n1   linux  -
/// 100.64.0.2   n2   linux  active; offline, last seen 5m ago
/// ```
pub fn render_human(status: &Status, now: SystemTime) -> String {
    let mut out = String::new();
    let control_line = describe_control(&status.control, now);
    match (&status.backend_state, &status.self_node) {
        (BackendState::NoState, _) => {
            let _ = writeln!(
                out,
                "Logged out. Run `tern up --login-server URL --auth-key KEY`."
            );
        }
        (BackendState::Stopped, _) => {
            let _ = writeln!(out, "Stopped (tern down). Run `tern up` to connect.");
        }
        (BackendState::NeedsLogin, _) => match &status.auth_url {
            Some(url) => {
                let _ = writeln!(out, "Logged out.\n\nTo authenticate, visit:\n\n\t{url}\n");
            }
            None => {
                let _ = writeln!(out, "Logged out: control refused the login.");
            }
        },
        (_, None) => {
            let _ = writeln!(out, "Starting: no network map from control yet.");
        }
        (_, Some(me)) => {
            let mut rows = vec![self_row(me)];
            let active = status.data_plane.active;
            let exit_ip = status.routing.exit_node_ip.as_deref();
            rows.extend(
                status
                    .peers
                    .iter()
                    .map(|p| peer_row(p, active, now, exit_ip)),
            );
            out.push_str(&format_rows(&rows));
        }
    }
    if let Some(line) = control_line {
        let _ = writeln!(out, "\n# {line}");
    }
    if !status.data_plane.active {
        let note = status
            .data_plane
            .note
            .as_deref()
            .unwrap_or("data plane is not running");
        let _ = writeln!(out, "# Health: no packets flow yet: {note}");
    }
    out.push_str(&render_routing(&status.routing));
    if let Some(url) = &status.dns.exit_node_doh {
        let _ = writeln!(
            out,
            "# DNS: names outside the tailnet are resolved by the exit node ({url})"
        );
    }
    if let Some(e) = &status.dns.error {
        let _ = writeln!(out, "# Health: DNS: {e}");
    }
    if let Some(relay) = &status.relay_server {
        out.push_str(&render_relay_server(relay));
    }
    if let Some(why) = &status.relay_server_off {
        let _ = writeln!(out, "# Relay server: off: {why}");
    }
    out
}

/// The exit node in use, the routes offered and what keeps forwarding from working.
fn render_routing(routing: &RoutingStatus) -> String {
    let mut out = String::new();
    if let Some(name) = &routing.exit_node {
        let ip = routing.exit_node_ip.as_deref().unwrap_or("-");
        if routing.exit_node_available {
            let _ = writeln!(
                out,
                "# Exit node: {name} ({ip}): all traffic goes through it"
            );
        } else {
            let _ = writeln!(
                out,
                "# Exit node {name} ({ip}) is not available: traffic to the internet is dropped \
                 until it is back (fail closed) or `tern set --exit-node=`"
            );
        }
    }
    if !routing.advertised_routes.is_empty() {
        let _ = writeln!(
            out,
            "# Offering: {} (control must approve)",
            routing.advertised_routes.join(", ")
        );
    }
    for problem in &routing.forwarding_problems {
        let _ = writeln!(out, "# Health: {problem}");
    }
    if let Some(e) = &routing.netfilter_error {
        let _ = writeln!(out, "# Health: firewall rules not installed: {e}");
    }
    out
}

/// The relay server block of `tern status`: where it listens, what it offers, each session.
pub fn render_relay_server(relay: &RelayServerStatus) -> String {
    let mut out = String::new();
    let offers = if relay.addr_ports.is_empty() {
        "no address found yet".to_string()
    } else {
        format!("offers {}", relay.addr_ports.join(", "))
    };
    let statics = if relay.static_endpoints.is_empty() {
        String::new()
    } else {
        format!(" (static: {})", relay.static_endpoints.join(", "))
    };
    let _ = writeln!(out, "\nrelay server: udp/{}, {offers}{statics}", relay.port);
    let open = relay.sessions.iter().filter(|s| s.state == "open").count();
    let _ = writeln!(
        out,
        "  {} session{} ({open} open), {} allocation{}, {} packets / {} forwarded",
        relay.sessions.len(),
        plural(relay.sessions.len()),
        relay.allocations,
        plural(relay.allocations as usize),
        relay.forwarded_packets,
        human_bytes(relay.forwarded_bytes),
    );
    for session in &relay.sessions {
        let legs: Vec<String> = session.legs.iter().map(describe_leg).collect();
        let _ = writeln!(
            out,
            "  vni {:<6} {:<10} {}",
            session.vni,
            session.state,
            legs.join("  <->  ")
        );
    }
    out
}

fn describe_leg(leg: &RelayLegStatus) -> String {
    let who = leg.peer.clone().unwrap_or_else(|| {
        let key = leg.disco_key.trim_start_matches("discokey:");
        format!("[{}]", key.get(..8).unwrap_or(key))
    });
    match &leg.bound {
        Some(addr) => format!("{who} @ {addr} ({} pkts)", leg.packets_rx),
        None => format!("{who} (not bound)"),
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// Bytes in B, KiB, MiB or GiB with one decimal.
fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 3] = ["KiB", "MiB", "GiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = UNITS[0];
    for next in &UNITS[1..] {
        if value < 1024.0 {
            break;
        }
        value /= 1024.0;
        unit = next;
    }
    format!("{value:.1} {unit}")
}

fn self_row(me: &SelfStatus) -> [String; 4] {
    [
        first_ip(&me.tailnet_ips),
        short_name(&me.name, &me.hostname),
        "linux".into(),
        "-".into(),
    ]
}

fn peer_row(
    peer: &PeerStatus,
    data_plane_active: bool,
    now: SystemTime,
    exit_ip: Option<&str>,
) -> [String; 4] {
    let state = match peer.online {
        _ if peer.expired => "expired".to_string(),
        Some(true) => "online".to_string(),
        Some(false) => match peer.last_seen.as_deref().and_then(parse_rfc3339) {
            Some(seen) => format!("offline, last seen {}", ago(seen, now)),
            None => "offline".to_string(),
        },
        None => "-".to_string(),
    };
    let state = match describe_path(peer) {
        Some(path) => format!("{state}; {path}"),
        // With a running data plane, say plainly that this peer has no path.
        None if data_plane_active => format!("{state}; -"),
        None => state,
    };
    let state = if exit_ip.is_some_and(|ip| peer.tailnet_ips.iter().any(|p| p == ip)) {
        format!("{state}; exit node")
    } else if peer.exit_node_option {
        format!("{state}; offers exit node")
    } else {
        state
    };
    [
        first_ip(&peer.tailnet_ips),
        short_name(&peer.name, &peer.hostname),
        peer.os.clone().unwrap_or_else(|| "-".into()),
        state,
    ]
}

/// The path column: `direct 198.18.0.3:41641`, `peer-relay ip:port` or `derp(900)`, then the
/// last measured latency and, once counted, the bytes (like `tailscale status`'s
/// `, tx N rx M`).
fn describe_path(peer: &PeerStatus) -> Option<String> {
    let path = peer.path.as_deref().filter(|p| *p != "none")?;
    let mut text = match (path, &peer.endpoint, peer.derp_region) {
        ("derp", _, Some(region)) => format!("derp({region})"),
        ("derp", _, None) => "derp".to_string(),
        (path, Some(endpoint), _) => format!("{path} {endpoint}"),
        (path, None, _) => path.to_string(),
    };
    if let Some(vni) = peer.relay_vni {
        let _ = write!(text, " vni {vni}");
    }
    if let Some(node) = &peer.relay_node {
        let _ = write!(text, " (relay {node})");
    }
    if let Some(ms) = peer.latency_ms {
        let nanos = ms_to_nanos(ms);
        let _ = write!(text, ", {}", go_duration(nanos, 100_000));
    }
    if peer.tx_bytes > 0 || peer.rx_bytes > 0 {
        let _ = write!(text, ", tx {} rx {}", peer.tx_bytes, peer.rx_bytes);
    }
    Some(text)
}

fn format_rows(rows: &[[String; 4]]) -> String {
    let mut widths = [0usize; 3];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row.iter()) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for [ip, name, os, state] in rows {
        let _ = writeln!(
            out,
            "{ip:<w0$}  {name:<w1$}  {os:<w2$}  {state}",
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2]
        );
    }
    out
}

fn describe_control(control: &ControlStatus, now: SystemTime) -> Option<String> {
    let url = control.url.as_deref().unwrap_or("(none)");
    let error = control
        .last_error
        .as_ref()
        .map(|e| e.message.as_str())
        .unwrap_or("unknown");
    match control.state {
        ControlState::Idle | ControlState::Connected => None,
        ControlState::Connecting if control.failed_attempts == 0 => {
            Some(format!("Connecting to control at {url}…"))
        }
        ControlState::Connecting | ControlState::Backoff => {
            let retry = control
                .next_attempt_at
                .as_deref()
                .and_then(parse_rfc3339)
                .map(|t| format!("; retrying in {}", until(t, now)))
                .unwrap_or_default();
            Some(format!(
                "Control {url} unreachable ({} failed attempts): {error}{retry}",
                control.failed_attempts
            ))
        }
        ControlState::LoginFailed => Some(format!("Login to {url} failed: {error}")),
        ControlState::WaitingForLogin => {
            Some(format!("Waiting for the login at {url} to be approved"))
        }
    }
}

fn first_ip(ips: &[String]) -> String {
    ips.first().cloned().unwrap_or_else(|| "-".into())
}

/// The first label of the MagicDNS name, as `tailscale status` prints it.
fn short_name(name: &str, hostname: &str) -> String {
    match name.split('.').next() {
        Some(label) if !label.is_empty() => label.to_string(),
        _ if !hostname.is_empty() => hostname.to_string(),
        _ => "-".to_string(),
    }
}

fn ago(then: SystemTime, now: SystemTime) -> String {
    let secs = now.duration_since(then).map(|d| d.as_secs()).unwrap_or(0);
    format!("{} ago", human_duration(secs))
}

fn until(then: SystemTime, now: SystemTime) -> String {
    human_duration(then.duration_since(now).map(|d| d.as_secs()).unwrap_or(0))
}

fn human_duration(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m", s / 60),
        s if s < 86400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn data_plane() -> DataPlaneStatus {
        DataPlaneStatus {
            tun: "tern0".into(),
            port: 41641,
            active: false,
            note: Some("no WireGuard data plane in this version".into()),
            ..Default::default()
        }
    }

    fn peer(name: &str, ip: &str, online: Option<bool>, last_seen: Option<&str>) -> PeerStatus {
        PeerStatus {
            name: format!("{name}.tailnet.example"),
            hostname: name.into(),
            node_id: 2,
            stable_id: "n2".into(),
            node_key: format!("nodekey:{}", "22".repeat(32)),
            disco_key: None,
            tailnet_ips: vec![ip.into()],
            os: Some("linux".into()),
            online,
            last_seen: last_seen.map(Into::into),
            key_expiry: None,
            expired: false,
            home_derp: Some(900),
            endpoints: vec![],
            // Filled by the data plane.
            ..Default::default()
        }
    }

    fn running() -> Status {
        let mut s = Status::initial(data_plane(), at(1_700_000_000));
        s.backend_state = BackendState::Running;
        s.control.state = ControlState::Connected;
        s.self_node = Some(SelfStatus {
            name: "n1.tailnet.example".into(),
            hostname: "n1".into(),
            node_id: 1,
            stable_id: "n1".into(),
            user_id: 1,
            node_key: format!("nodekey:{}", "11".repeat(32)),
            machine_key: format!("mkey:{}", "33".repeat(32)),
            disco_key: format!("discokey:{}", "44".repeat(32)),
            tailnet_ips: vec!["100.64.0.1".into(), "fd7a:115c:a1e0::1".into()],
            key_expiry: None,
            home_derp: None,
            peerapi_urls: Vec::new(),
        });
        s.peers = vec![
            peer("n2", "100.64.0.2", Some(true), None),
            peer(
                "n3",
                "100.64.0.3",
                Some(false),
                Some("2023-11-14T22:13:20Z"),
            ),
        ];
        s
    }

    #[test]
    fn json_round_trips_and_uses_the_documented_names() {
        let s = running();
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["schema_version"], 1);
        assert_eq!(json["backend_state"], "Running");
        assert_eq!(json["control"]["state"], "connected");
        assert_eq!(json["self"]["tailnet_ips"][0], "100.64.0.1");
        let p = &json["peers"][0];
        for field in [
            "path",
            "endpoint",
            "derp_region",
            "latency_ms",
            "last_handshake_at",
            "path_reason",
        ] {
            assert!(
                p.get(field).is_some_and(|v| v.is_null()),
                "peer field {field}: {p}"
            );
        }
        assert_eq!(p["rx_bytes"], 0);
        let back: Status = serde_json::from_value(json).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn human_output_lists_self_then_peers_with_liveness() {
        // 2023-11-14T22:13:20Z is 1_700_000_000; "now" is 5 minutes later.
        let text = render_human(&running(), at(1_700_000_300));
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("100.64.0.1  n1"), "{text}");
        assert!(
            lines[1].starts_with("100.64.0.2  n2") && lines[1].ends_with("online"),
            "{text}"
        );
        assert!(lines[2].ends_with("offline, last seen 5m ago"), "{text}");
        assert!(
            text.contains("no packets flow yet"),
            "must not pretend: {text}"
        );
    }

    #[test]
    fn human_output_shows_the_derp_path_once_the_data_plane_runs() {
        let mut s = running();
        s.data_plane.active = true;
        s.data_plane.note = None;
        s.peers[0].path = Some("derp".into());
        s.peers[0].derp_region = Some(900);
        let text = render_human(&s, at(1_700_000_300));
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[1].ends_with("online; derp(900)"), "{text}");
        s.peers[1].path = Some("none".into());
        let text = render_human(&s, at(1_700_000_300));
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[2].ends_with("offline, last seen 5m ago; -"),
            "no path while the data plane runs: {text}"
        );
        assert!(!text.contains("no packets flow"), "{text}");
    }

    #[test]
    fn human_output_says_where_dns_goes_with_an_exit_node() {
        let mut s = running();
        assert!(!render_human(&s, at(1_700_000_300)).contains("# DNS"));
        s.dns.exit_node_doh = Some("http://100.64.0.2:41539/dns-query".into());
        let text = render_human(&s, at(1_700_000_300));
        assert!(
            text.contains(
                "# DNS: names outside the tailnet are resolved by the exit node \
                 (http://100.64.0.2:41539/dns-query)"
            ),
            "{text}"
        );
    }

    #[test]
    fn human_output_says_why_the_relay_server_asked_for_is_off() {
        let mut s = running();
        assert!(!render_human(&s, at(1_700_000_300)).contains("Relay server"));
        s.relay_server_off = Some("control set the node attribute disable-relay-server".into());
        let text = render_human(&s, at(1_700_000_300));
        assert!(
            text.ends_with(
                "# Relay server: off: control set the node attribute disable-relay-server\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn human_output_shows_direct_endpoint_latency_and_bytes() {
        let mut s = running();
        s.data_plane.active = true;
        s.peers[0].path = Some("direct".into());
        s.peers[0].endpoint = Some("198.18.0.3:41641".into());
        s.peers[0].latency_ms = Some(1.234);
        s.peers[0].tx_bytes = 1200;
        s.peers[0].rx_bytes = 3400;
        s.peers[1].path = Some("derp".into());
        s.peers[1].derp_region = Some(900);
        s.peers[1].latency_ms = Some(12.0);
        let text = render_human(&s, at(1_700_000_300));
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[1].ends_with("online; direct 198.18.0.3:41641, 1.2ms, tx 1200 rx 3400"),
            "{text}"
        );
        assert!(lines[2].ends_with("; derp(900), 12ms"), "{text}");
        s.peers[0].path = Some("peer-relay".into());
        s.peers[0].endpoint = Some("198.18.0.9:7000".into());
        s.peers[0].latency_ms = None;
        s.peers[0].tx_bytes = 0;
        s.peers[0].rx_bytes = 0;
        let text = render_human(&s, at(1_700_000_300));
        assert!(
            text.lines()
                .nth(1)
                .is_some_and(|l| l.ends_with("online; peer-relay 198.18.0.9:7000")),
            "{text}"
        );
    }

    #[test]
    fn human_output_says_why_control_is_unreachable() {
        let mut s = running();
        s.control.url = Some("http://127.0.0.1:9".into());
        s.control.state = ControlState::Backoff;
        s.control.failed_attempts = 3;
        s.control.last_error = Some(ErrorReport {
            message: "dial 127.0.0.1:9: connection refused".into(),
            at: rfc3339(at(1_700_000_000)),
        });
        s.control.next_attempt_at = Some(rfc3339(at(1_700_000_010)));
        let text = render_human(&s, at(1_700_000_000));
        assert!(
            text.contains(
                "Control http://127.0.0.1:9 unreachable (3 failed attempts): \
                 dial 127.0.0.1:9: connection refused; retrying in 10s"
            ),
            "{text}"
        );
    }

    #[test]
    fn rfc3339_round_trip() {
        assert_eq!(rfc3339(at(1_700_000_000)), "2023-11-14T22:13:20Z");
        assert_eq!(
            parse_rfc3339("2023-11-14T22:13:20Z"),
            Some(at(1_700_000_000))
        );
        assert_eq!(parse_rfc3339("yesterday"), None);
    }

    #[test]
    fn relay_server_block_names_sessions_legs_and_totals() {
        let leg = |peer: Option<&str>, bound: Option<&str>, packets_rx| RelayLegStatus {
            disco_key: "discokey:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
                .into(),
            peer: peer.map(str::to_string),
            bound: bound.map(str::to_string),
            packets_rx,
            bytes_rx: 0,
        };
        let relay = RelayServerStatus {
            port: 40000,
            addr_ports: vec!["198.18.0.20:40000".into(), "[2001:db8::20]:40000".into()],
            static_endpoints: Vec::new(),
            server_disco_key: "discokey:00".into(),
            allocations: 3,
            forwarded_packets: 150,
            forwarded_bytes: 12_595,
            drops: Default::default(),
            forwarded_by_transport: Vec::new(),
            sessions: vec![
                RelaySessionStatus {
                    vni: 1,
                    state: "open".into(),
                    age_secs: 20,
                    legs: vec![
                        leg(Some("c1"), Some("198.18.1.2:33011"), 120),
                        leg(Some("tsb"), Some("198.18.2.2:40123"), 30),
                    ],
                },
                RelaySessionStatus {
                    vni: 2,
                    state: "connecting".into(),
                    age_secs: 3,
                    legs: vec![leg(None, None, 0), leg(Some("c2"), Some("198.18.2.2:1"), 0)],
                },
            ],
        };
        assert_eq!(
            render_relay_server(&relay),
            "\nrelay server: udp/40000, offers 198.18.0.20:40000, [2001:db8::20]:40000\n\
             \x20 2 sessions (1 open), 3 allocations, 150 packets / 12.3 KiB forwarded\n\
             \x20 vni 1      open       c1 @ 198.18.1.2:33011 (120 pkts)  <->  tsb @ 198.18.2.2:40123 (30 pkts)\n\
             \x20 vni 2      connecting [01234567] (not bound)  <->  c2 @ 198.18.2.2:1 (0 pkts)\n"
        );
        let empty = RelayServerStatus {
            port: 7,
            ..Default::default()
        };
        assert_eq!(
            render_relay_server(&empty),
            "\nrelay server: udp/7, no address found yet\n\
             \x20 0 sessions (0 open), 0 allocations, 0 packets / 0 B forwarded\n"
        );
        assert_eq!(human_bytes(5 << 30), "5.0 GiB");
    }
}
