//! Prometheus text format (exposition format 0.0.4) from the status snapshot: what
//! `tern metrics` prints, the LocalAPI's `/localapi/v0/metrics` and `tern daemon
//! --metrics-listen` serve.
//!
//! Names follow tailscaled's where the meaning is the same (`tailscaled_inbound_bytes_total
//! {path}`, `tailscaled_peer_relay_forwarded_packets_total{transport_in,transport_out}`, …);
//! tern's own start with `tern_`. Cardinality is bounded: per-peer series exist for at most
//! [`MAX_PEER_SERIES`] peers (by name; `tern_peer_series_omitted` says how many were left out),
//! and every other label takes values from a fixed set (paths, reasons, drop causes, regions
//! of the DERP map).

pub mod http;

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::status::Status;

/// Peers with per-peer series at most.
pub const MAX_PEER_SERIES: usize = 1000;

/// The paths a WireGuard packet can take, with tailscaled's label values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathKind {
    DirectV4,
    DirectV6,
    Derp,
    PeerRelayV4,
    PeerRelayV6,
}

impl PathKind {
    pub const ALL: [PathKind; 5] = [
        PathKind::DirectV4,
        PathKind::DirectV6,
        PathKind::Derp,
        PathKind::PeerRelayV4,
        PathKind::PeerRelayV6,
    ];

    pub fn label(self) -> &'static str {
        match self {
            PathKind::DirectV4 => "direct_ipv4",
            PathKind::DirectV6 => "direct_ipv6",
            PathKind::Derp => "derp",
            PathKind::PeerRelayV4 => "peer_relay_ipv4",
            PathKind::PeerRelayV6 => "peer_relay_ipv6",
        }
    }

    /// Direct UDP to or from `addr`.
    pub fn direct(addr: &std::net::SocketAddr) -> Self {
        if crate::udp::unmap_v4(*addr).is_ipv4() {
            PathKind::DirectV4
        } else {
            PathKind::DirectV6
        }
    }

    /// Through the peer relay at `addr`.
    pub fn relay(addr: &std::net::SocketAddr) -> Self {
        if crate::udp::unmap_v4(*addr).is_ipv4() {
            PathKind::PeerRelayV4
        } else {
            PathKind::PeerRelayV6
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Packets and bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoCount {
    pub packets: u64,
    pub bytes: u64,
}

/// WireGuard datagrams in and out of the node by path (the engine counts them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PathIo {
    inbound: [IoCount; 5],
    outbound: [IoCount; 5],
}

impl PathIo {
    pub fn count_in(&mut self, path: PathKind, len: usize) {
        let c = &mut self.inbound[path.index()];
        c.packets += 1;
        c.bytes += len as u64;
    }

    pub fn count_out(&mut self, path: PathKind, len: usize) {
        let c = &mut self.outbound[path.index()];
        c.packets += 1;
        c.bytes += len as u64;
    }

    /// For the status snapshot: by path label.
    pub fn to_status(&self) -> BTreeMap<String, crate::status::PathIoStatus> {
        PathKind::ALL
            .iter()
            .map(|&p| {
                let (i, o) = (self.inbound[p.index()], self.outbound[p.index()]);
                (
                    p.label().to_string(),
                    crate::status::PathIoStatus {
                        rx_packets: i.packets,
                        rx_bytes: i.bytes,
                        tx_packets: o.packets,
                        tx_bytes: o.bytes,
                    },
                )
            })
            .collect()
    }
}

/// One counter of a path's I/O.
type PathIoField = fn(&crate::status::PathIoStatus) -> u64;

/// Drop causes that happen on the way out (the rest are inbound).
const OUTBOUND_DROPS: [&str; 3] = ["no_derp", "derp_queue_full", "udp_send_failed"];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
}

/// One metric family being written: HELP and TYPE once, then its samples.
struct Writer {
    out: String,
}

impl Writer {
    fn family(&mut self, name: &str, kind: Kind, help: &str) {
        let kind = match kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        };
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {}", number(value));
    }

    /// A family with one unlabelled sample.
    fn single(&mut self, name: &str, kind: Kind, help: &str, value: f64) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }
}

/// A label value with `\`, `"` and newlines escaped (the text format's rules).
fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

fn number(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

/// The whole exposition for one status snapshot.
pub fn render(status: &Status) -> String {
    let mut w = Writer { out: String::new() };
    node(&mut w, status);
    path_io(&mut w, status);
    drops(&mut w, status);
    peers(&mut w, status);
    path_changes(&mut w, status);
    derp(&mut w, status);
    relay_server(&mut w, status);
    local_services(&mut w, status);
    w.out
}

fn node(w: &mut Writer, s: &Status) {
    let running = s.backend_state == crate::status::BackendState::Running;
    w.single(
        "tern_up",
        Kind::Gauge,
        "1 while the node is Running (registered, holding a network map).",
        f64::from(u8::from(running)),
    );
    let connected = s.control.state == crate::status::ControlState::Connected;
    w.single(
        "tern_control_connected",
        Kind::Gauge,
        "1 while the map stream to control is open.",
        f64::from(u8::from(connected)),
    );
    w.single(
        "tern_control_map_sessions_total",
        Kind::Counter,
        "Map streams opened since the daemon started.",
        s.control.map_sessions as f64,
    );
    if let Some(home) = s.self_node.as_ref().and_then(|me| me.home_derp) {
        w.single(
            "tailscaled_home_derp_region_id",
            Kind::Gauge,
            "The node's home DERP region.",
            f64::from(home),
        );
    }
    w.single(
        "tailscaled_advertised_routes",
        Kind::Gauge,
        "Routes this node advertises (subnets and exit node).",
        s.routing.advertised_routes.len() as f64,
    );
}

fn path_io(w: &mut Writer, s: &Status) {
    let io = &s.data_plane.path_io;
    let families: [(&str, &str, PathIoField); 4] = [
        (
            "tailscaled_inbound_packets_total",
            "WireGuard packets received, by path.",
            |c| c.rx_packets,
        ),
        (
            "tailscaled_inbound_bytes_total",
            "WireGuard bytes received, by path.",
            |c| c.rx_bytes,
        ),
        (
            "tailscaled_outbound_packets_total",
            "WireGuard packets sent, by path.",
            |c| c.tx_packets,
        ),
        (
            "tailscaled_outbound_bytes_total",
            "WireGuard bytes sent, by path.",
            |c| c.tx_bytes,
        ),
    ];
    for (name, help, get) in families {
        w.family(name, Kind::Counter, help);
        for path in PathKind::ALL {
            let value = io.get(path.label()).map(get).unwrap_or(0);
            w.sample(name, &[("path", path.label())], value as f64);
        }
    }
}

fn drops(w: &mut Writer, s: &Status) {
    let split = |outbound: bool| {
        s.data_plane
            .drops
            .iter()
            .filter(move |(k, _)| OUTBOUND_DROPS.contains(&k.as_str()) == outbound)
    };
    w.family(
        "tailscaled_inbound_dropped_packets_total",
        Kind::Counter,
        "Packets dropped on the way in, by reason.",
    );
    for (reason, n) in split(false) {
        w.sample(
            "tailscaled_inbound_dropped_packets_total",
            &[("reason", reason)],
            *n as f64,
        );
    }
    w.family(
        "tailscaled_outbound_dropped_packets_total",
        Kind::Counter,
        "Packets dropped on the way out, by reason.",
    );
    for (reason, n) in split(true) {
        w.sample(
            "tailscaled_outbound_dropped_packets_total",
            &[("reason", reason)],
            *n as f64,
        );
    }
}

const PEER_PATHS: [&str; 4] = ["direct", "peer-relay", "derp", "none"];

fn peers(w: &mut Writer, s: &Status) {
    let mut by_path: BTreeMap<&str, u64> = PEER_PATHS.iter().map(|p| (*p, 0)).collect();
    for p in &s.peers {
        let path = p.path.as_deref().unwrap_or("none");
        if let Some(n) = by_path.get_mut(path) {
            *n += 1;
        }
    }
    w.family(
        "tern_peers",
        Kind::Gauge,
        "Peers by current path (direct, peer-relay, derp, none).",
    );
    for (path, n) in &by_path {
        w.sample("tern_peers", &[("path", path)], *n as f64);
    }
    let shown = &s.peers[..s.peers.len().min(MAX_PEER_SERIES)];
    w.single(
        "tern_peer_series_omitted",
        Kind::Gauge,
        "Peers left out of the per-peer series (over the limit of 1000).",
        (s.peers.len() - shown.len()) as f64,
    );
    w.family(
        "tern_peer_path",
        Kind::Gauge,
        "1 for each peer's current path, 0 for the others.",
    );
    for p in shown {
        let current = p.path.as_deref().unwrap_or("none");
        for path in PEER_PATHS {
            let value = f64::from(u8::from(path == current));
            w.sample(
                "tern_peer_path",
                &[("peer", &p.name), ("path", path)],
                value,
            );
        }
    }
    w.family(
        "tern_peer_latency_seconds",
        Kind::Gauge,
        "Round trip of the last disco pong from each peer.",
    );
    for p in shown {
        if let Some(ms) = p.latency_ms {
            w.sample(
                "tern_peer_latency_seconds",
                &[("peer", &p.name)],
                ms / 1000.0,
            );
        }
    }
    for (name, help, get) in [
        (
            "tern_peer_rx_bytes_total",
            "WireGuard bytes received from each peer.",
            (|p: &crate::status::PeerStatus| p.rx_bytes) as fn(&_) -> u64,
        ),
        (
            "tern_peer_tx_bytes_total",
            "WireGuard bytes sent to each peer.",
            |p| p.tx_bytes,
        ),
    ] {
        w.family(name, Kind::Counter, help);
        for p in shown {
            w.sample(name, &[("peer", &p.name)], get(p) as f64);
        }
    }
}

fn path_changes(w: &mut Writer, s: &Status) {
    w.family(
        "tern_path_changes_total",
        Kind::Counter,
        "Peer path changes by the new path and the reason.",
    );
    for c in &s.data_plane.path_changes {
        w.sample(
            "tern_path_changes_total",
            &[("path", &c.path), ("reason", &c.reason)],
            c.count as f64,
        );
    }
}

fn derp(w: &mut Writer, s: &Status) {
    w.family(
        "tern_derp_connected",
        Kind::Gauge,
        "1 while the DERP connection to a region is up.",
    );
    for (region, state) in &s.data_plane.derp_regions {
        w.sample(
            "tern_derp_connected",
            &[("region", &region.to_string())],
            f64::from(u8::from(state.connected)),
        );
    }
    w.family(
        "tern_derp_latency_seconds",
        Kind::Gauge,
        "Last measured latency to each DERP region (STUN, or TCP connect).",
    );
    for (region, ms) in &s.data_plane.derp_latency_ms {
        if let Some(ms) = ms {
            w.sample(
                "tern_derp_latency_seconds",
                &[("region", &region.to_string())],
                ms / 1000.0,
            );
        }
    }
}

fn relay_server(w: &mut Writer, s: &Status) {
    let Some(relay) = &s.relay_server else {
        return;
    };
    for (name, help, get) in [
        (
            "tailscaled_peer_relay_forwarded_packets_total",
            "Number of packets forwarded via Peer Relay",
            (|f: &crate::status::RelayForwarded| f.packets) as fn(&_) -> u64,
        ),
        (
            "tailscaled_peer_relay_forwarded_bytes_total",
            "Number of bytes forwarded via Peer Relay",
            |f| f.bytes,
        ),
    ] {
        w.family(name, Kind::Counter, help);
        for f in &relay.forwarded_by_transport {
            w.sample(
                name,
                &[
                    ("transport_in", &f.transport_in),
                    ("transport_out", &f.transport_out),
                ],
                get(f) as f64,
            );
        }
    }
    w.family(
        "tailscaled_peer_relay_endpoints",
        Kind::Gauge,
        "Peer relay endpoints (sessions) by state.",
    );
    for state in ["connecting", "open"] {
        let n = relay.sessions.iter().filter(|x| x.state == state).count();
        w.sample(
            "tailscaled_peer_relay_endpoints",
            &[("state", state)],
            n as f64,
        );
    }
    w.single(
        "tern_relay_server_allocations_total",
        Kind::Counter,
        "Allocation requests the peer relay server answered.",
        relay.allocations as f64,
    );
    w.family(
        "tern_relay_server_dropped_packets_total",
        Kind::Counter,
        "Packets the peer relay server dropped, by cause.",
    );
    for (reason, n) in &relay.drops {
        w.sample(
            "tern_relay_server_dropped_packets_total",
            &[("reason", reason)],
            *n as f64,
        );
    }
}

fn local_services(w: &mut Writer, s: &Status) {
    for (prefix, help, counters) in [
        (
            "tern_quad100",
            "MagicDNS at 100.100.100.100",
            &s.data_plane.quad100,
        ),
        (
            "tern_netstack",
            "the userspace stack (userspace networking)",
            &s.data_plane.netstack,
        ),
        (
            "tern_proxy",
            "the SOCKS5 and HTTP proxies",
            &s.data_plane.proxies,
        ),
        (
            "tern_peerapi",
            "the peer API (DNS over HTTP for peers)",
            &s.data_plane.peerapi,
        ),
    ] {
        for (key, n) in counters {
            // Open connections are a level; everything else counts events.
            let (name, kind) = if key == "open_connections" {
                (format!("{prefix}_{key}"), Kind::Gauge)
            } else {
                (format!("{prefix}_{key}_total"), Kind::Counter)
            };
            w.single(
                &name,
                kind,
                &format!("{help}: {}.", key.replace('_', " ")),
                *n as f64,
            );
        }
    }
}

#[cfg(test)]
mod tests;
