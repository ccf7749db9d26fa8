//! What to draw, computed without a terminal: the [`Tracker`] keeps what the previous snapshots
//! said (counter bases, sparkline samples) and [`ViewModel::build`] turns the current snapshot,
//! that history and the UI state into rows and lines. Rates come from counter deltas here, never
//! from the daemon.

use std::collections::{HashMap, VecDeque};

use crate::fmt::{self, DASH};
use crate::snapshot::{PathKind, Peer, Status};
use crate::why;

/// Counters are compared at most this often, so two snapshots close together (a path change
/// right after the 1 s tick) do not make a noisy rate.
const MIN_INTERVAL: f64 = 0.9;
/// Samples kept per sparkline (one per interval: two minutes at 1 Hz).
pub const HISTORY: usize = 120;

/// One peer's counter base and derived rates.
#[derive(Debug, Clone, Default)]
pub struct PeerTrack {
    base: Option<(f64, u64, u64)>,
    pub rx_rate: Option<f64>,
    pub tx_rate: Option<f64>,
    pub rtt: VecDeque<Option<f64>>,
}

/// The relay server's forwarded counters and rates.
#[derive(Debug, Clone, Default)]
pub struct RelayTrack {
    base: Option<(f64, u64, u64)>,
    pub pps: Option<f64>,
    pub bps: Option<f64>,
    pub pps_history: VecDeque<Option<f64>>,
    pub bps_history: VecDeque<Option<f64>>,
}

/// What earlier snapshots said, by peer node key.
#[derive(Debug, Clone, Default)]
pub struct Tracker {
    pub peers: HashMap<String, PeerTrack>,
    pub relay: RelayTrack,
}

fn push(samples: &mut VecDeque<Option<f64>>, v: Option<f64>) {
    if samples.len() == HISTORY {
        samples.pop_front();
    }
    samples.push_back(v);
}

/// `(rate_a, rate_b)` between the base and now, or `None` when a counter went backwards (a
/// daemon restart) or there is no base yet.
fn rates(base: Option<(f64, u64, u64)>, now: (f64, u64, u64)) -> Option<(f64, f64)> {
    let (t0, a0, b0) = base?;
    let dt = now.0 - t0;
    if dt <= 0.0 || now.1 < a0 || now.2 < b0 {
        return None;
    }
    Some(((now.1 - a0) as f64 / dt, (now.2 - b0) as f64 / dt))
}

impl Tracker {
    /// Take in a snapshot received at `at` (Unix seconds).
    pub fn observe(&mut self, status: &Status, at: f64) {
        self.peers
            .retain(|key, _| status.peers.iter().any(|p| &p.node_key == key));
        for peer in &status.peers {
            let track = self.peers.entry(peer.node_key.clone()).or_default();
            let now = (at, peer.rx_bytes, peer.tx_bytes);
            match track.base {
                Some((t0, _, _)) if at - t0 < MIN_INTERVAL => continue,
                _ => {}
            }
            let r = rates(track.base, now);
            track.rx_rate = r.map(|r| r.0);
            track.tx_rate = r.map(|r| r.1);
            track.base = Some(now);
            push(&mut track.rtt, peer.latency_ms);
        }
        self.observe_relay(status, at);
    }

    fn observe_relay(&mut self, status: &Status, at: f64) {
        let Some(relay) = &status.relay_server else {
            self.relay = RelayTrack::default();
            return;
        };
        let track = &mut self.relay;
        if matches!(track.base, Some((t0, _, _)) if at - t0 < MIN_INTERVAL) {
            return;
        }
        let now = (at, relay.forwarded_packets, relay.forwarded_bytes);
        let r = rates(track.base, now);
        track.pps = r.map(|r| r.0);
        track.bps = r.map(|r| r.1 * 8.0);
        track.base = Some(now);
        push(&mut track.pps_history, track.pps);
        push(&mut track.bps_history, track.bps);
    }
}

/// The peers table order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SortKey {
    Name,
    #[default]
    Path,
    Latency,
    Traffic,
}

impl SortKey {
    pub fn next(self) -> SortKey {
        match self {
            SortKey::Name => SortKey::Path,
            SortKey::Path => SortKey::Latency,
            SortKey::Latency => SortKey::Traffic,
            SortKey::Traffic => SortKey::Name,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            SortKey::Name => "name",
            SortKey::Path => "path",
            SortKey::Latency => "latency",
            SortKey::Traffic => "traffic",
        }
    }
}

/// A coarse bucket of a value, so the order only changes when the value really moves: rows do
/// not swap every second over a 0.1 ms difference. Factor-of-two buckets.
fn bucket(v: Option<f64>) -> i64 {
    match v {
        Some(v) if v > 0.0 => v.log2().floor() as i64,
        Some(_) => i64::MIN + 1,
        None => i64::MIN,
    }
}

/// Whether `peer` matches the filter text (name, IP, path badge or endpoint; any case).
pub fn matches(peer: &Peer, filter: &str) -> bool {
    if filter.is_empty() {
        return true;
    }
    let f = filter.to_lowercase();
    [
        peer.name.as_str(),
        peer.hostname.as_str(),
        peer.path_kind().badge(),
        peer.endpoint.as_deref().unwrap_or(""),
    ]
    .iter()
    .chain(
        peer.tailnet_ips
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .iter(),
    )
    .any(|field| field.to_lowercase().contains(&f))
}

/// Indices of the visible peers, in table order.
pub fn order(status: &Status, tracker: &Tracker, sort: SortKey, filter: &str) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..status.peers.len())
        .filter(|&i| matches(&status.peers[i], filter))
        .collect();
    let traffic = |p: &Peer| {
        tracker
            .peers
            .get(&p.node_key)
            .and_then(|t| match (t.rx_rate, t.tx_rate) {
                (Some(a), Some(b)) => Some(a + b),
                _ => None,
            })
    };
    // Peers arrive sorted by name; a stable sort keeps name order inside each group.
    match sort {
        SortKey::Name => {}
        SortKey::Path => idx.sort_by_key(|&i| status.peers[i].path_kind()),
        SortKey::Latency => idx.sort_by_key(|&i| {
            let l = status.peers[i].latency_ms;
            (l.is_none(), bucket(l))
        }),
        SortKey::Traffic => {
            idx.sort_by_key(|&i| std::cmp::Reverse(bucket(traffic(&status.peers[i]))))
        }
    }
    idx
}

/// How a piece of text should look; colour only repeats what the text says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tone {
    Normal,
    Dim,
    Good,
    Info,
    Warn,
    Bad,
    Strong,
}

impl Tone {
    pub fn of_path(kind: PathKind) -> Tone {
        match kind {
            PathKind::Direct => Tone::Good,
            PathKind::Relay => Tone::Info,
            PathKind::Derp => Tone::Warn,
            PathKind::None => Tone::Bad,
            PathKind::Unknown => Tone::Dim,
        }
    }
}

/// A run of text with a tone.
pub type Piece = (String, Tone);

/// One row of the peers table, as text.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerRow {
    pub key: String,
    pub kind: PathKind,
    pub online: &'static str,
    pub name: String,
    pub ip: String,
    pub via: String,
    pub rtt: String,
    pub spark: String,
    pub rx: String,
    pub tx: String,
    pub handshake: String,
}

fn online_mark(peer: &Peer) -> &'static str {
    match peer.online {
        Some(true) => "●",
        Some(false) => "○",
        None => "·",
    }
}

/// Endpoint, relay or DERP region: where the packets go.
pub fn via(status: &Status, peer: &Peer) -> String {
    match peer.path_kind() {
        PathKind::Direct | PathKind::Relay => peer.endpoint.clone().unwrap_or_else(|| DASH.into()),
        PathKind::Derp => match peer.derp_region {
            Some(id) => format!("{} ({id})", status.region_name(id)),
            None => "DERP".into(),
        },
        PathKind::None | PathKind::Unknown => DASH.into(),
    }
}

fn peer_row(status: &Status, tracker: &Tracker, peer: &Peer, now: f64) -> PeerRow {
    let track = tracker.peers.get(&peer.node_key);
    let rtt_samples: Vec<Option<f64>> = track
        .map(|t| t.rtt.iter().copied().collect())
        .unwrap_or_default();
    PeerRow {
        key: peer.node_key.clone(),
        kind: peer.path_kind(),
        online: online_mark(peer),
        name: peer.short_name().to_string(),
        ip: peer.ip().to_string(),
        via: via(status, peer),
        rtt: fmt::latency(peer.latency_ms),
        spark: fmt::sparkline(&rtt_samples, 8),
        rx: fmt::rate(track.and_then(|t| t.rx_rate)),
        tx: fmt::rate(track.and_then(|t| t.tx_rate)),
        handshake: fmt::age_of(peer.last_handshake_at.as_deref(), now),
    }
}

/// The selected peer's story.
#[derive(Debug, Clone, PartialEq)]
pub struct Detail {
    pub name: String,
    pub why: String,
    /// `path` strip over the last minutes, one column per time slice.
    pub strip: String,
    pub strip_note: String,
    pub rtt_spark: String,
    pub rtt_range: String,
    /// Facts, one `label: value` per line.
    pub facts: Vec<(String, String)>,
    /// Candidate endpoints, one table row each.
    pub candidates: Vec<CandidateRow>,
    /// Path history, newest first: time, path, where, reason.
    pub history: Vec<[String; 4]>,
}

/// One candidate endpoint as the detail view lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct CandidateRow {
    pub addr: String,
    /// `netmap+call-me-maybe`, or `advertised` from a daemon that reports no candidates.
    pub source: String,
    /// Ages of our last ping and its last pong (`4s`), or `–`.
    pub ping: String,
    pub pong: String,
    pub rtt: String,
    pub in_use: bool,
}

/// Minutes the path strip covers.
pub const STRIP_SECS: f64 = 300.0;

/// The path over the last [`STRIP_SECS`] as `width` characters: `█` direct, `▅` relay, `▂` DERP,
/// `·` none, blank before anything is known.
pub fn path_strip(peer: &Peer, now: f64, width: usize) -> String {
    let changes: Vec<(f64, PathKind)> = peer
        .path_history
        .iter()
        .filter_map(|h| Some((fmt::unix(Some(&h.at))?, PathKind::of(Some(&h.path)))))
        .collect();
    (0..width)
        .map(|col| {
            let t = now - STRIP_SECS + STRIP_SECS * (col as f64 + 1.0) / width as f64;
            let at = changes
                .iter()
                .rev()
                .find(|(when, _)| *when <= t)
                .map(|c| c.1);
            match at {
                Some(PathKind::Direct) => '█',
                Some(PathKind::Relay) => '▅',
                Some(PathKind::Derp) => '▂',
                Some(PathKind::None) => '·',
                _ => ' ',
            }
        })
        .collect()
}

fn strip_note(peer: &Peer) -> String {
    let mut last = peer.path_history.iter().rev().take(2);
    match (last.next(), last.next()) {
        (Some(new), Some(old)) => {
            let at = fmt::unix(Some(&new.at)).map(fmt::clock).unwrap_or_default();
            if old.path == new.path {
                // Same path, new reason (e.g. idle → both-hard-nat): the reason is the news.
                format!("{} {}→{} {at}", new.path, old.reason, new.reason)
            } else {
                format!("{}→{} {at}", old.path, new.path)
            }
        }
        (Some(new), None) => format!(
            "{} since {}",
            new.path,
            fmt::unix(Some(&new.at)).map(fmt::clock).unwrap_or_default()
        ),
        _ => "no path changes yet".into(),
    }
}

fn detail(status: &Status, tracker: &Tracker, peer: &Peer, now: f64, strip_width: usize) -> Detail {
    let track = tracker.peers.get(&peer.node_key);
    let rtts: Vec<Option<f64>> = track
        .map(|t| t.rtt.iter().copied().collect())
        .unwrap_or_default();
    let known: Vec<f64> = rtts.iter().flatten().copied().collect();
    let rtt_range = match (
        known.iter().copied().reduce(f64::min),
        known.iter().copied().reduce(f64::max),
    ) {
        (Some(lo), Some(hi)) if fmt::latency(Some(lo)) == fmt::latency(Some(hi)) => {
            fmt::latency(Some(lo))
        }
        (Some(lo), Some(hi)) => format!("{}–{}", fmt::latency(Some(lo)), fmt::latency(Some(hi))),
        _ => "no pong yet".into(),
    };
    let online = match peer.online {
        Some(true) => "online".to_string(),
        Some(false) => match peer.last_seen.as_deref() {
            Some(seen) => format!("offline, last seen {} ago", fmt::age_of(Some(seen), now)),
            None => "offline".into(),
        },
        None => "control does not say".into(),
    };
    let facts = vec![
        ("state".to_string(), online),
        ("addresses".to_string(), peer.tailnet_ips.join(" ")),
        (
            "path".to_string(),
            format!("{} {}", peer.path_kind().badge(), via(status, peer)),
        ),
        (
            "reason".to_string(),
            peer.path_reason.clone().unwrap_or_else(|| DASH.into()),
        ),
        ("latency".to_string(), fmt::latency(peer.latency_ms)),
        (
            "last pong".to_string(),
            age_text(peer.last_pong_at.as_deref(), now),
        ),
        (
            "handshake".to_string(),
            age_text(peer.last_handshake_at.as_deref(), now),
        ),
        (
            "traffic".to_string(),
            format!(
                "↓ {} ({}B total)  ↑ {} ({}B total)",
                fmt::rate(track.and_then(|t| t.rx_rate)),
                fmt::qty(peer.rx_bytes as f64),
                fmt::rate(track.and_then(|t| t.tx_rate)),
                fmt::qty(peer.tx_bytes as f64)
            ),
        ),
        (
            "home DERP".to_string(),
            peer.home_derp
                .map(|r| status.region_name(r))
                .unwrap_or_else(|| DASH.into()),
        ),
        ("relays".to_string(), relay_fact(peer)),
    ];
    let candidates = candidate_rows(peer, now);
    let history = peer
        .path_history
        .iter()
        .rev()
        .map(|h| {
            let at = fmt::unix(Some(&h.at))
                .map(fmt::clock)
                .unwrap_or_else(|| DASH.into());
            let place = match (&h.endpoint, h.derp_region) {
                (Some(ep), _) => ep.clone(),
                (None, Some(r)) => format!("{} ({r})", status.region_name(r)),
                _ => DASH.into(),
            };
            [at, h.path.clone(), place, h.reason.clone()]
        })
        .collect();
    Detail {
        name: peer.short_name().to_string(),
        why: why::sentence(status, peer),
        strip: path_strip(peer, now, strip_width),
        strip_note: strip_note(peer),
        rtt_spark: fmt::sparkline(&rtts, strip_width),
        rtt_range,
        facts,
        candidates,
        history,
    }
}

/// The path machine's candidates; from a daemon that does not report them (or a peer without
/// a disco key), the advertised endpoints, so the list is never emptier than before.
fn candidate_rows(peer: &Peer, now: f64) -> Vec<CandidateRow> {
    let in_use = |addr: &str| peer.endpoint.as_deref() == Some(addr);
    if peer.candidates.is_empty() {
        return peer
            .endpoints
            .iter()
            .map(|ep| CandidateRow {
                addr: ep.clone(),
                source: "advertised".into(),
                ping: DASH.into(),
                pong: DASH.into(),
                // The peer's latency belongs to the endpoint in use only.
                rtt: fmt::latency(peer.latency_ms.filter(|_| in_use(ep))),
                in_use: in_use(ep),
            })
            .collect();
    }
    peer.candidates
        .iter()
        .map(|c| CandidateRow {
            addr: c.addr.clone(),
            source: if c.sources.is_empty() {
                DASH.into()
            } else {
                c.sources.join("+")
            },
            ping: fmt::age_of(c.last_ping_at.as_deref(), now),
            pong: fmt::age_of(c.last_pong_at.as_deref(), now),
            rtt: fmt::latency(c.latency_ms),
            in_use: in_use(&c.addr),
        })
        .collect()
}

fn age_text(at: Option<&str>, now: f64) -> String {
    match fmt::unix(at) {
        Some(t) => format!("{} ago ({})", fmt::age(now - t), fmt::clock(t)),
        None => "never".into(),
    }
}

/// Relay candidates are not in the status yet: say what is known.
fn relay_fact(peer: &Peer) -> String {
    match (peer.path_kind(), peer.endpoint.as_deref()) {
        (PathKind::Relay, Some(ep)) => format!("on peer relay {ep}"),
        _ => "none in use (the daemon does not report relay candidates yet)".into(),
    }
}

/// The relay server panel.
#[derive(Debug, Clone, PartialEq)]
pub struct RelayPanel {
    pub on: bool,
    pub summary: Vec<String>,
    pub pps: String,
    pub bps: String,
    pub pps_spark: String,
    pub bps_spark: String,
    /// Leg A ↔ leg B, state, age, packets, bytes.
    pub sessions: Vec<[String; 5]>,
    pub drops: String,
}

fn leg_name(leg: Option<&crate::snapshot::RelayLeg>) -> String {
    match leg {
        Some(l) => l
            .peer
            .clone()
            .or_else(|| l.bound.clone())
            .unwrap_or_else(|| "(unbound)".into()),
        None => DASH.into(),
    }
}

fn bits(bps: Option<f64>) -> String {
    bps.map_or_else(|| DASH.into(), |b| format!("{}b/s", fmt::qty(b)))
}

fn relay_panel(status: &Status, tracker: &Tracker) -> RelayPanel {
    let Some(relay) = &status.relay_server else {
        let summary = match &status.relay_server_off {
            // The pref asks for a server that does not run: say why, and what r does now.
            Some(why) => vec![
                "relay server off, though this node asks for one:".into(),
                why.clone(),
                "press r to withdraw the request".into(),
            ],
            None => vec![
                "relay server off".into(),
                "press r to run one on this node (others can then use it".into(),
                "when their NATs are too hard for a direct path)".into(),
            ],
        };
        return RelayPanel {
            on: false,
            summary,
            pps: DASH.into(),
            bps: DASH.into(),
            pps_spark: String::new(),
            bps_spark: String::new(),
            sessions: Vec::new(),
            drops: String::new(),
        };
    };
    let t = &tracker.relay;
    let open = relay.sessions.iter().filter(|s| s.state == "open").count();
    let offers = if relay.addr_ports.is_empty() {
        "(discovering its addresses)".to_string()
    } else {
        relay.addr_ports.join(", ")
    };
    let sessions = relay
        .sessions
        .iter()
        .map(|s| {
            let packets: u64 = s.legs.iter().map(|l| l.packets_rx).sum();
            let bytes: u64 = s.legs.iter().map(|l| l.bytes_rx).sum();
            [
                format!("{} ↔ {}", leg_name(s.legs.first()), leg_name(s.legs.get(1))),
                s.state.clone(),
                fmt::age(s.age_secs as f64),
                fmt::qty(packets as f64),
                format!("{}B", fmt::qty(bytes as f64)),
            ]
        })
        .collect();
    let drops: Vec<String> = relay
        .drops
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    RelayPanel {
        on: true,
        summary: vec![
            format!("relay server on udp/{}, offers {offers}", relay.port),
            format!(
                "{} session{} ({open} open), {} allocation{}, {} pkts / {}B fwd",
                relay.sessions.len(),
                if relay.sessions.len() == 1 { "" } else { "s" },
                relay.allocations,
                if relay.allocations == 1 { "" } else { "s" },
                fmt::qty(relay.forwarded_packets as f64),
                fmt::qty(relay.forwarded_bytes as f64)
            ),
        ],
        pps: fmt::rate(t.pps).replace("/s", " pkt/s"),
        bps: bits(t.bps),
        pps_spark: fmt::sparkline(&t.pps_history.iter().copied().collect::<Vec<_>>(), 40),
        bps_spark: fmt::sparkline(&t.bps_history.iter().copied().collect::<Vec<_>>(), 40),
        sessions,
        drops: if drops.is_empty() {
            "no drops".into()
        } else {
            format!("drops: {}", drops.join(", "))
        },
    }
}

/// The two header lines.
fn header(status: &Status, read_only: bool) -> [Vec<Piece>; 2] {
    let (name, ips) = match &status.self_node {
        Some(me) => (me.short_name().to_string(), me.tailnet_ips.join(" ")),
        None => ("(not in a tailnet yet)".to_string(), String::new()),
    };
    let control = match status.control.state.as_str() {
        "connected" => ("● connected".to_string(), Tone::Good),
        "" => (format!("● {}", status.backend_state), Tone::Dim),
        "backoff" => (
            format!(
                "○ control unreachable ({} tries)",
                status.control.failed_attempts
            ),
            Tone::Bad,
        ),
        "login_failed" => ("○ login failed".to_string(), Tone::Bad),
        other => (format!("◌ {other}"), Tone::Warn),
    };
    let mut first = vec![
        (" tern top ".to_string(), Tone::Strong),
        (format!(" {name} "), Tone::Strong),
        (ips, Tone::Normal),
        ("  ".to_string(), Tone::Normal),
        control,
    ];
    if read_only {
        first.push(("  read-only".to_string(), Tone::Warn));
    }
    [first, facts_line(status)]
}

/// Home DERP and latency, UDP, NAT, public endpoint, relay mode, exit node.
fn facts_line(status: &Status) -> Vec<Piece> {
    let mut line = Vec::new();
    let home = status
        .self_node
        .as_ref()
        .and_then(|s| s.home_derp)
        .or_else(|| {
            status
                .netcheck
                .as_ref()
                .map(|n| n.preferred_derp)
                .filter(|r| *r != 0)
        });
    match home {
        Some(id) => {
            let ms = status
                .data_plane
                .derp_latency_ms
                .get(&id)
                .copied()
                .flatten();
            line.push((
                format!(" home {} {}", status.region_name(id), fmt::latency(ms)),
                Tone::Normal,
            ));
        }
        None => line.push((" home DERP –".into(), Tone::Dim)),
    }
    match &status.netcheck {
        Some(n) => {
            line.push((
                if n.udp { "  UDP ok" } else { "  UDP blocked" }.into(),
                if n.udp { Tone::Good } else { Tone::Bad },
            ));
            let (nat, tone) = match n.mapping_varies_by_dest_ip {
                Some(true) => ("  NAT hard", Tone::Warn),
                Some(false) => ("  NAT easy", Tone::Good),
                None => ("  NAT ?", Tone::Dim),
            };
            line.push((nat.into(), tone));
            if let Some(public) = n.global_v4.as_deref().or(n.global_v6.as_deref()) {
                line.push((format!("  public {public}"), Tone::Normal));
            }
        }
        None => line.push(("  no netcheck yet".into(), Tone::Dim)),
    }
    match &status.relay_server {
        Some(r) => line.push((format!("  relay udp/{}", r.port), Tone::Info)),
        None => line.push(("  relay off".into(), Tone::Dim)),
    }
    // Exit nodes are not in the status yet; their fact goes here when they are.
    line
}

/// The screen's content, for the render functions.
#[derive(Debug, Clone, PartialEq)]
pub struct ViewModel {
    pub header: [Vec<Piece>; 2],
    pub rows: Vec<PeerRow>,
    pub selected: Option<usize>,
    pub total_peers: usize,
    pub detail: Option<Detail>,
    pub relay: RelayPanel,
}

/// The inputs of [`ViewModel::build`] that are UI state.
#[derive(Debug, Clone, Copy)]
pub struct ViewInput<'a> {
    pub sort: SortKey,
    pub filter: &'a str,
    pub selected: Option<&'a str>,
    pub read_only: bool,
    /// Width of the path strip and RTT sparkline in the detail pane.
    pub strip_width: usize,
}

impl ViewModel {
    pub fn build(status: &Status, tracker: &Tracker, input: ViewInput<'_>, now: f64) -> ViewModel {
        let order = order(status, tracker, input.sort, input.filter);
        let rows: Vec<PeerRow> = order
            .iter()
            .map(|&i| peer_row(status, tracker, &status.peers[i], now))
            .collect();
        let selected = match input.selected {
            Some(key) => rows
                .iter()
                .position(|r| r.key == key)
                .or(if rows.is_empty() { None } else { Some(0) }),
            None if rows.is_empty() => None,
            None => Some(0),
        };
        let detail = selected.map(|i| {
            let peer = &status.peers[order[i]];
            detail(status, tracker, peer, now, input.strip_width)
        });
        ViewModel {
            header: header(status, input.read_only),
            rows,
            selected,
            total_peers: status.peers.len(),
            detail,
            relay: relay_panel(status, tracker),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(name: &str, rx: u64, latency: Option<f64>) -> Peer {
        Peer {
            name: format!("{name}.t"),
            node_key: format!("nodekey:{name}"),
            rx_bytes: rx,
            latency_ms: latency,
            ..Default::default()
        }
    }

    fn status(peers: Vec<Peer>) -> Status {
        Status {
            peers,
            ..Default::default()
        }
    }

    #[test]
    fn first_snapshot_has_no_rates_then_deltas_per_second() {
        let mut t = Tracker::default();
        t.observe(&status(vec![peer("a", 1000, None)]), 100.0);
        assert_eq!(t.peers["nodekey:a"].rx_rate, None);
        // Too soon: the base stays, no noisy rate.
        t.observe(&status(vec![peer("a", 1500, None)]), 100.3);
        assert_eq!(t.peers["nodekey:a"].rx_rate, None);
        t.observe(&status(vec![peer("a", 3000, None)]), 102.0);
        assert_eq!(t.peers["nodekey:a"].rx_rate, Some(1000.0));
    }

    #[test]
    fn a_counter_going_backwards_is_not_a_huge_rate() {
        let mut t = Tracker::default();
        t.observe(&status(vec![peer("a", 5000, None)]), 1.0);
        t.observe(&status(vec![peer("a", 10, None)]), 2.0);
        assert_eq!(t.peers["nodekey:a"].rx_rate, None);
        t.observe(&status(vec![peer("a", 1010, None)]), 3.0);
        assert_eq!(t.peers["nodekey:a"].rx_rate, Some(1000.0));
    }

    #[test]
    fn a_relay_server_asked_for_but_kept_off_says_why() {
        let t = Tracker::default();
        let mut s = status(Vec::new());
        let panel = relay_panel(&s, &t);
        assert!(!panel.on);
        assert!(panel.summary[1].contains("press r to run one"), "{panel:?}");
        s.relay_server_off = Some("control set the node attribute disable-relay-server".into());
        let panel = relay_panel(&s, &t);
        assert!(!panel.on);
        assert!(
            panel.summary[1].contains("disable-relay-server"),
            "{panel:?}"
        );
        assert!(panel.summary[2].contains("withdraw"), "{panel:?}");
    }

    #[test]
    fn gone_peers_are_forgotten() {
        let mut t = Tracker::default();
        t.observe(&status(vec![peer("a", 0, None), peer("b", 0, None)]), 1.0);
        t.observe(&status(vec![peer("b", 0, None)]), 2.0);
        assert!(!t.peers.contains_key("nodekey:a"));
    }

    #[test]
    fn latency_sort_ignores_jitter_inside_a_bucket() {
        let t = Tracker::default();
        let s = status(vec![
            peer("a", 0, Some(5.1)),
            peer("b", 0, Some(5.0)),
            peer("c", 0, Some(1.0)),
            peer("d", 0, None),
        ]);
        assert_eq!(order(&s, &t, SortKey::Latency, ""), vec![2, 0, 1, 3]);
        let s2 = status(vec![
            peer("a", 0, Some(4.9)),
            peer("b", 0, Some(5.2)),
            peer("c", 0, Some(1.0)),
            peer("d", 0, None),
        ]);
        assert_eq!(order(&s2, &t, SortKey::Latency, ""), vec![2, 0, 1, 3]);
    }

    #[test]
    fn filter_matches_name_ip_and_badge() {
        let mut p = peer("nas", 0, None);
        p.tailnet_ips = vec!["100.64.0.7".into()];
        p.path = Some("derp".into());
        assert!(matches(&p, "NAS"));
        assert!(matches(&p, "0.7"));
        assert!(matches(&p, "derp"));
        assert!(!matches(&p, "direct"));
    }

    #[test]
    fn selection_follows_the_peer_not_the_row() {
        let t = Tracker::default();
        let s = status(vec![peer("a", 0, None), peer("b", 0, None)]);
        let input = ViewInput {
            sort: SortKey::Name,
            filter: "",
            selected: Some("nodekey:b"),
            read_only: false,
            strip_width: 10,
        };
        let vm = ViewModel::build(&s, &t, input, 0.0);
        assert_eq!(vm.selected, Some(1));
        let s = status(vec![
            peer("0", 0, None),
            peer("a", 0, None),
            peer("b", 0, None),
        ]);
        let vm = ViewModel::build(&s, &t, input, 0.0);
        assert_eq!(vm.selected, Some(2));
    }
}
