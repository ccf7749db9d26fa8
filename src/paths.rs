//! Per-peer path selection: DERP first, direct UDP once a disco pong proves it (Go
//! magicsock `endpoint`). Sans-IO: a [`Peer`] is handed disco messages, outgoing-traffic notices
//! and the current time, and is asked for disco messages to send ([`Peer::poll_transmit`]), its next
//! deadline ([`Peer::poll_timeout`]) and path-change events ([`Peer::poll_event`]).
//!
//! The caller seals and opens disco packets (it owns the keys), checks that a disco message really
//! came from this peer, and sends WireGuard where [`Peer::on_outgoing`] says.
//!
//! Behaviour mirrored from Go (constants in [`consts`]):
//! * candidates come from the netmap, CallMeMaybe (DERP only) and sources of UDP pings;
//! * a discovery round pings every candidate not pinged in the last 5 s and, if anything was sent
//!   and the round was not itself caused by a CallMeMaybe, sends our endpoints in a CallMeMaybe via
//!   DERP;
//! * the first UDP pong makes the pinged address `best` (later pongs replace it when [`better_addr`])
//!   and trusts it for 6.5 s: traffic then goes UDP only; heartbeats every 3 s keep the trust;
//! * without trust, traffic goes to both `best` and DERP, and discovery runs again;
//! * every ping is answered on the path it came in on.
//!
//! One addition to Go: a UDP ping that arrives while we are sending to the peer without a
//! trusted direct path is also pinged back at once (the peer's NAT has just opened towards us),
//! which brings both sides direct within a round trip of the peer's first ping instead of at our
//! next 5 s discovery round. Another: a peer we have no candidate address for gets our endpoints
//! in a CallMeMaybe anyway (at most every 10 s), so that its pings find us (see
//! `Peer::invite_to_ping_us`), and a `tern ping` that pings candidates sends our CallMeMaybe
//! with it rather than at the next heartbeat.
//!
//! On top of Go's behaviour this machine keeps a machine-readable [`PathReason`] and a short history
//! of path changes for `tern status` and the dashboard.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use crate::disco::{Message, Ping, Pong, TxId};
use crate::keys::{DiscoPublic, NodePublic};

/// Timing and size constants (Go magicsock names in the docs).
pub mod consts {
    use std::time::Duration;

    /// `heartbeatInterval`: ping the best path this often while the session is active.
    pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(3);
    /// `trustUDPAddrDuration`: after a pong on the best path, use it alone this long.
    pub const TRUST_UDP_ADDR_DURATION: Duration = Duration::from_millis(6500);
    /// `sessionActiveTimeout`: idle after this long without outgoing traffic; also the lifetime
    /// of candidates learned from incoming pings.
    pub const SESSION_ACTIVE_TIMEOUT: Duration = Duration::from_secs(45);
    /// `discoPingInterval`: minimum gap between discovery pings to one candidate.
    pub const DISCO_PING_INTERVAL: Duration = Duration::from_secs(5);
    /// `pingTimeoutDuration`: a ping without pong is forgotten after this.
    pub const PING_TIMEOUT: Duration = Duration::from_secs(5);
    /// `upgradeUDPDirectInterval`: with a working direct path, look for a better one this often.
    pub const UPGRADE_UDP_DIRECT_INTERVAL: Duration = Duration::from_secs(60);
    /// `goodEnoughLatency`: at or below this, never look for a better direct path.
    pub const GOOD_ENOUGH_LATENCY: Duration = Duration::from_millis(5);
    /// `endpointsFreshEnoughDuration`: our endpoints older than this are refreshed before a
    /// CallMeMaybe.
    pub const ENDPOINTS_FRESH_ENOUGH: Duration = Duration::from_secs(27);
    /// `pongHistoryCount`: pongs remembered per candidate.
    pub const PONG_HISTORY_COUNT: usize = 64;
    /// Above this many candidates, expired ones are pruned.
    pub const MAX_ENDPOINTS: usize = 100;
    /// Wire MTU assumed for a path proven by an unpadded ping.
    pub const DEFAULT_WIRE_MTU: u16 = 1360;
    /// Ours: the least gap between two CallMeMaybes to a peer we have no candidate for. Longer
    /// than a discovery round on purpose: each one makes the peer re-ping us (postponing its own
    /// round, which carries its CallMeMaybe), so inviting every 5 s could starve that round.
    pub const INVITE_INTERVAL: Duration = Duration::from_secs(10);
    /// Path changes kept per peer.
    pub const PATH_HISTORY_LEN: usize = 16;
}
use consts::*;

/// Go's stand-in address for "DERP region N": `127.3.3.40:N` (pong `Src` over DERP).
pub const DERP_MAGIC_IP: Ipv4Addr = Ipv4Addr::new(127, 3, 3, 40);

/// Where a disco message came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PathSource {
    /// Plain UDP from this source address.
    Udp(SocketAddr),
    /// A DERP RecvPacket on our connection to this region.
    Derp { region: u16 },
    /// Geneve from a peer relay: the relay's address and the endpoint's VNI.
    Relay(RelayAddr),
}

/// Where to send something.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dest {
    /// Plain UDP to this address.
    Direct(SocketAddr),
    /// Via DERP, addressed to the peer's node key, on the connection to this region.
    Derp(u16),
    /// Through a peer relay: Geneve (not control) with this VNI, to the relay's address.
    Relay(RelayAddr),
}

/// A disco message the caller must seal to the peer and send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    pub dest: Dest,
    pub msg: Message,
}

/// Where WireGuard packets to the peer go right now (see [`Peer::on_outgoing`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SendPlan {
    /// Send over UDP to this address.
    pub udp: Option<SocketAddr>,
    /// Also (or only) send via this DERP region.
    pub derp: Option<u16>,
    /// Send through this peer relay endpoint (Geneve around the WireGuard datagram).
    pub relay: Option<RelayAddr>,
}

/// The path packets take, as reported to status views.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// UDP only, to an address a pong proved in the last 6.5 s.
    Direct { addr: SocketAddr, latency: Duration },
    /// Through a peer relay endpoint a pong proved in the last few seconds.
    PeerRelay { relay: RelayAddr, latency: Duration },
    /// Via DERP (possibly also trying an unconfirmed direct address or relay).
    Derp { region: u16 },
    /// Nowhere to send.
    None,
}

impl Path {
    /// Same route, ignoring latency updates.
    pub fn same_route(&self, other: &Path) -> bool {
        match (self, other) {
            (Path::Direct { addr: a, .. }, Path::Direct { addr: b, .. }) => a == b,
            (Path::PeerRelay { relay: a, .. }, Path::PeerRelay { relay: b, .. }) => a == b,
            (a, b) => a == b,
        }
    }
}

/// Why the peer is on its current path (machine-readable; see [`PathReason::as_str`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PathReason {
    /// A pong on the direct path within the trust window.
    Direct,
    /// No traffic to this peer, so no probing (yet or any more).
    Idle,
    /// Pings are out and no verdict yet.
    Discovering,
    /// The peer has no candidate endpoints (netmap, CallMeMaybe or pings).
    NoEndpoints,
    /// Our own netcheck found no working UDP.
    UdpBlocked,
    /// Both NATs map per destination (MappingVariesByDestIP), and no pong came back.
    BothHardNat,
    /// Our NAT maps per destination, and no pong came back.
    LocalHardNat,
    /// The peer's NAT maps per destination, and no pong came back.
    PeerHardNat,
    /// The peer's netcheck found no working UDP, and no pong came back.
    PeerUdpBlocked,
    /// Pings to every candidate timed out, for no known reason.
    NoPongFromCandidates,
    /// The direct path stopped answering (no pong for 6.5 s); DERP carries traffic again, and the
    /// old address is still tried.
    DirectLost,
    /// Neither a direct address nor a DERP region is known.
    NoDerpRegion,
    /// On a peer relay: no direct path answers, a relayed pong did within the trust window.
    PeerRelay,
    /// The peer relay path stopped answering; DERP carries traffic again.
    RelayLost,
}

impl PathReason {
    /// The stable text form (`direct`, `no-pong-from-candidates`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            PathReason::Direct => "direct",
            PathReason::Idle => "idle",
            PathReason::Discovering => "discovering",
            PathReason::NoEndpoints => "no-endpoints",
            PathReason::UdpBlocked => "udp-blocked",
            PathReason::BothHardNat => "both-hard-nat",
            PathReason::LocalHardNat => "local-hard-nat",
            PathReason::PeerHardNat => "peer-hard-nat",
            PathReason::PeerUdpBlocked => "peer-udp-blocked",
            PathReason::NoPongFromCandidates => "no-pong-from-candidates",
            PathReason::DirectLost => "direct-lost",
            PathReason::NoDerpRegion => "no-derp-region",
            PathReason::PeerRelay => "peer-relay",
            PathReason::RelayLost => "relay-unreachable",
        }
    }
}

impl std::fmt::Display for PathReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One entry of the path history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathChange {
    pub at: Instant,
    pub from: Path,
    pub to: Path,
    pub reason: PathReason,
}

/// Something the driver should know about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The path or its reason changed.
    PathChanged(PathChange),
    /// WireGuard packets from this UDP address belong to this peer.
    AddrForPeer(SocketAddr),
    /// A CallMeMaybe waits for fresh own endpoints: re-STUN, then call [`Peer::set_local`].
    NeedEndpointRefresh,
    /// A pong answered one of our pings.
    Pong {
        tx_id: TxId,
        via: PathSource,
        latency: Duration,
        /// Our address as the peer saw it.
        src: SocketAddr,
        /// It answered a [`Peer::cli_ping`].
        cli: bool,
    },
    /// The peer asks our relay server for an endpoint (came over DERP and names the peer's own
    /// disco key; the caller checks the relay capability and answers with
    /// [`Peer::send_via_derp`]).
    RelayAllocRequest(crate::disco::AllocateRequest),
    /// Time to look for relay paths to this peer (Go `wantUDPRelayPathDiscoveryLocked`): allocate
    /// on every candidate relay server.
    WantRelayPaths,
    /// The peer allocated a relay endpoint for us both and tells us (came over DERP).
    CallMeMaybeVia(crate::disco::UdpRelayEndpoint),
    /// This peer, as a relay server, answered an allocation (came over DERP).
    RelayAllocResponse(crate::disco::AllocateResponse),
}

/// Which timer [`Peer::poll_timeout`] is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeoutReason {
    Heartbeat,
    PingTimeout,
    TrustExpires,
}

/// What the netmap says about the peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    pub node_key: NodePublic,
    pub disco_key: DiscoPublic,
    /// `HomeDERP` (None = 0 = no home).
    pub home_derp: Option<u16>,
    /// `Endpoints`.
    pub endpoints: Vec<SocketAddr>,
    /// The peer's `MappingVariesByDestIP`, if known (used only to explain a failure).
    pub mapping_varies: Option<bool>,
    /// The peer's `NetInfo.WorkingUDP`, if known (used only to explain a failure).
    pub udp_working: Option<bool>,
    /// The peer understands peer relay messages (`Cap` ≥ 121, Go `capVerIsRelayCapable`).
    pub relay_capable: bool,
}

/// What this node knows about its own network (from netcheck / endpoint discovery).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LocalNet {
    /// Our node key, sent in pings.
    pub node_key: NodePublic,
    /// Our endpoints, sent in CallMeMaybe.
    pub endpoints: Vec<SocketAddr>,
    /// Whether any STUN reply arrived (None = not measured yet).
    pub udp_working: Option<bool>,
    /// Our `MappingVariesByDestIP` (hard NAT).
    pub mapping_varies: Option<bool>,
}

/// A candidate address with what a pong told us about it (Go `addrQuality`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddrQuality {
    pub addr: SocketAddr,
    /// Set for a peer-relay path (Geneve VNI); such paths lose against any direct path.
    pub vni: Option<u32>,
    pub latency: Duration,
    pub wire_mtu: u16,
}

/// Whether candidate `a` should replace the current best `b` (Go `betterAddr`).
pub fn better_addr(a: &AddrQuality, b: Option<&AddrQuality>) -> bool {
    let Some(b) = b else { return true };
    if (a.addr, a.vni) == (b.addr, b.vni) {
        return a.wire_mtu > b.wire_mtu;
    }
    match (a.vni.is_some(), b.vni.is_some()) {
        (false, true) => return true,
        (true, false) => return false,
        _ => {}
    }
    let (mut a_points, mut b_points) = latency_points(a.latency, b.latency);
    a_points += address_points(a.addr.ip());
    b_points += address_points(b.addr.ip());
    // Less than 1 % better is not worth a switch.
    if a_points <= 1 && b_points == 0 {
        return false;
    }
    a_points > b_points
}

/// The faster address gets the percentage by which it beats the slower one.
fn latency_points(a: Duration, b: Duration) -> (u64, u64) {
    let (a, b) = (a.as_nanos(), b.as_nanos());
    // Points are at most 100, so the narrowing is lossless.
    let points = |fast: u128, slow: u128| {
        fast.saturating_mul(100)
            .checked_div(slow)
            .map_or(0, |pct| 100u128.saturating_sub(pct) as u64)
    };
    if a > b {
        (0, points(b, a))
    } else {
        (points(a, b), 0)
    }
}

/// Bonus for loopback, link-local and private addresses, and for IPv6.
fn address_points(ip: IpAddr) -> u64 {
    let class = if ip.is_loopback() {
        50
    } else if is_link_local_unicast(ip) {
        30
    } else if is_private(ip) {
        20
    } else {
        0
    };
    class + if ip.is_ipv6() { 10 } else { 0 }
}

fn is_link_local_unicast(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.segments()[0] & 0xffc0 == 0xfe80,
    }
}

fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_private(),
        IpAddr::V6(v6) => v6.octets()[0] & 0xfe == 0xfc,
    }
}

/// Why we sent a ping (affects only bookkeeping here).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PingPurpose {
    Discovery,
    Heartbeat,
    /// `tern ping`: does not count against the 5 s per-candidate limit.
    Cli,
}

#[derive(Debug, Clone, Copy)]
struct SentPing {
    to: Dest,
    at: Instant,
    purpose: PingPurpose,
}

/// A pong we received for a ping to a candidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PongRecord {
    pub at: Instant,
    pub latency: Duration,
    /// Our address as the peer saw it.
    pub src: SocketAddr,
}

/// Per-candidate state (Go `endpointState`).
#[derive(Debug, Clone, Default)]
struct EndpointState {
    from_netmap: bool,
    from_call_me_maybe: bool,
    /// Set when learned from (or refreshed by) an incoming UDP ping.
    last_got_ping: Option<Instant>,
    last_got_ping_tx: Option<TxId>,
    last_ping: Option<Instant>,
    pongs: VecDeque<PongRecord>,
}

impl EndpointState {
    /// A candidate with no standing source left (runtime ones live 45 s after their last ping).
    fn expired(&self, now: Instant) -> bool {
        if self.from_netmap || self.from_call_me_maybe {
            return false;
        }
        self.last_got_ping
            .is_none_or(|t| now.saturating_duration_since(t) > SESSION_ACTIVE_TIMEOUT)
    }
}

/// A snapshot of one candidate for status views.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CandidateStatus {
    pub addr: SocketAddr,
    pub from_netmap: bool,
    pub from_call_me_maybe: bool,
    pub from_ping: bool,
    /// When discovery or a heartbeat last pinged it (not `tern ping`); `None` right after the
    /// path state was reset, until the next ping goes out.
    pub last_ping: Option<Instant>,
    pub last_pong: Option<PongRecord>,
}

/// Path selection towards one peer.
#[derive(Debug, Clone)]
pub struct Peer {
    local: LocalNet,
    local_endpoints_at: Option<Instant>,
    info: PeerInfo,
    endpoints: BTreeMap<SocketAddr, EndpointState>,
    best: Option<AddrQuality>,
    trust_until: Option<Instant>,
    sent_pings: HashMap<TxId, SentPing>,
    last_send_ext: Option<Instant>,
    last_full_ping: Option<Instant>,
    heartbeat_at: Option<Instant>,
    /// The region we last heard this peer on (fallback when it has no home).
    derp_route: Option<u16>,
    call_me_maybe_pending: bool,
    /// When we last sent (or asked for fresh endpoints to send) a CallMeMaybe.
    call_me_maybe_at: Option<Instant>,
    /// When we last invited a peer without candidates to ping us (see [`Peer::invite_to_ping_us`]).
    invited_at: Option<Instant>,
    /// A discovery ping timed out while no best address existed.
    unanswered_discovery: bool,
    /// The peer relay path, once a bind handshake proved one (see `paths::relay`).
    relay: Option<RelayPath>,
    relay_trust_until: Option<Instant>,
    /// The relay path stopped answering and nothing replaced it yet.
    relay_lost: bool,
    /// How the last relay attempt for this peer ended, if it failed.
    relay_failure: Option<RelayReason>,
    /// Whether some peer other than this one may serve us as a relay (a `relay-target` grant).
    relay_candidates: bool,
    /// Control turned our relay client off (`disable-relay-client`): no new relay paths.
    relay_client_disabled: bool,
    last_relay_discovery: Option<Instant>,
    attributed: BTreeSet<SocketAddr>,
    reported: (Path, PathReason),
    history: VecDeque<PathChange>,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
}

impl Peer {
    /// A peer from its netmap entry; nothing is sent until traffic or a disco message arrives.
    pub fn new(now: Instant, local: LocalNet, info: PeerInfo) -> Peer {
        let mut peer = Peer {
            local,
            local_endpoints_at: Some(now),
            info: info.clone(),
            endpoints: BTreeMap::new(),
            best: None,
            trust_until: None,
            sent_pings: HashMap::new(),
            last_send_ext: None,
            last_full_ping: None,
            heartbeat_at: None,
            derp_route: None,
            call_me_maybe_pending: false,
            call_me_maybe_at: None,
            invited_at: None,
            unanswered_discovery: false,
            relay: None,
            relay_trust_until: None,
            relay_lost: false,
            relay_failure: None,
            relay_candidates: false,
            relay_client_disabled: false,
            last_relay_discovery: None,
            attributed: BTreeSet::new(),
            reported: (Path::None, PathReason::Idle),
            history: VecDeque::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
        };
        peer.apply_netmap_endpoints(&info.endpoints);
        peer.reported = peer.evaluate(now);
        peer
    }

    // ----- inputs -------------------------------------------------------------------------

    /// A disco message from this peer (the caller checked the sender's disco key, and for DERP that
    /// the DERP source node key belongs to this peer).
    pub fn handle_disco(&mut self, now: Instant, from: PathSource, msg: Message) {
        if let PathSource::Derp { region } = from {
            self.derp_route = Some(region);
        }
        match msg {
            Message::Ping(ping) => self.handle_ping(now, from, ping),
            Message::Pong(pong) => self.handle_pong(now, from, pong),
            Message::CallMeMaybe(eps) => match from {
                PathSource::Derp { .. } => self.handle_call_me_maybe(now, &eps),
                // Upstream ignores CallMeMaybe over UDP.
                _ => tracing::debug!("disco: call-me-maybe over UDP ignored"),
            },
            Message::CallMeMaybeVia(endpoint) => match from {
                PathSource::Derp { .. } => self.events.push_back(Event::CallMeMaybeVia(endpoint)),
                _ => tracing::debug!("disco: call-me-maybe-via over UDP ignored (DERP only)"),
            },
            Message::AllocateUdpRelayEndpointResponse(response) => match from {
                PathSource::Derp { .. } => {
                    self.events.push_back(Event::RelayAllocResponse(response))
                }
                _ => tracing::debug!("relay: allocation response over UDP ignored (DERP only)"),
            },
            Message::AllocateUdpRelayEndpointRequest(request) => {
                self.handle_relay_alloc_request(from, request)
            }
            other => tracing::trace!(kind = other.name(), "disco: message not for path selection"),
        }
        self.update_report(now);
    }

    /// Go's checks before a relay allocation: over DERP only, and the
    /// sender's own disco key must be one of the pair.
    fn handle_relay_alloc_request(
        &mut self,
        from: PathSource,
        request: crate::disco::AllocateRequest,
    ) {
        match from {
            PathSource::Udp(_) | PathSource::Relay(_) => {
                tracing::debug!("relay: allocation request over UDP ignored (DERP only)")
            }
            PathSource::Derp { .. } if !request.client_disco.contains(&self.info.disco_key) => {
                tracing::debug!("relay: allocation request without the sender's disco key ignored")
            }
            PathSource::Derp { .. } => self.events.push_back(Event::RelayAllocRequest(request)),
        }
    }

    /// Queues `msg` to the peer over DERP, to its home region (else the region we last heard it
    /// on). Returns false when neither is known (nothing is sent, as in Go).
    pub fn send_via_derp(&mut self, msg: Message) -> bool {
        let Some(region) = self.info.home_derp.or(self.derp_route) else {
            return false;
        };
        self.transmits.push_back(Transmit {
            dest: Dest::Derp(region),
            msg,
        });
        true
    }

    /// Outgoing WireGuard traffic to this peer: where to send it. Starts discovery when no trusted
    /// direct path exists and (re)starts heartbeats (Go `endpoint.send`).
    pub fn on_outgoing(&mut self, now: Instant) -> SendPlan {
        let plan = self.send_plan(now);
        if !self.trusted(now) {
            self.send_disco_pings(now, true);
            self.maybe_want_relay(now);
        }
        self.last_send_ext = Some(now);
        if self.heartbeat_at.is_none() {
            self.heartbeat_at = Some(now + HEARTBEAT_INTERVAL);
        }
        self.update_report(now);
        plan
    }

    /// A `tern ping` (Go `cliPing`): via DERP unless a direct path is trusted; to the trusted
    /// direct address, or else to every candidate when a full round is due. Replies arrive as
    /// [`Event::Pong`] with `cli: true`; a UDP reply upgrades the path like any pong. Returns the
    /// TxIDs sent.
    pub fn cli_ping(&mut self, now: Instant) -> Vec<TxId> {
        let plan = self.send_plan(now);
        let mut sent = Vec::new();
        if let Some(region) = plan.derp {
            sent.push(self.send_ping_to(now, Dest::Derp(region), PingPurpose::Cli));
        }
        if let Some(relay) = plan.relay {
            sent.push(self.send_ping_to(now, Dest::Relay(relay), PingPurpose::Cli));
        }
        if !self.trusted(now) {
            self.maybe_want_relay(now);
        }
        match (self.trusted(now), plan.udp) {
            (true, Some(addr)) => sent.push(self.send_ping(now, addr, PingPurpose::Cli)),
            _ if self.want_full_ping(now) => {
                let candidates: Vec<SocketAddr> = self.endpoints.keys().copied().collect();
                for addr in &candidates {
                    sent.push(self.send_ping(now, *addr, PingPurpose::Cli));
                }
                // Ours: Go leaves the CallMeMaybe to the heartbeat 3 s later, so behind a NAT
                // that filters by address the first pongs come only after that.
                let recently = self
                    .call_me_maybe_at
                    .is_some_and(|t| now.saturating_duration_since(t) < DISCO_PING_INTERVAL);
                if !candidates.is_empty() && !self.local.endpoints.is_empty() && !recently {
                    self.call_me_maybe(now);
                }
            }
            _ => {}
        }
        self.invite_to_ping_us(now);
        self.last_send_ext = Some(now);
        if self.heartbeat_at.is_none() {
            self.heartbeat_at = Some(now + HEARTBEAT_INTERVAL);
        }
        self.update_report(now);
        sent
    }

    /// Where WireGuard to this peer would go now, without side effects (Go `addrForSendLocked`).
    /// A trusted direct path alone, else a trusted relay alone, else DERP together with the
    /// relay path or the best direct address (untrusted: they may work again).
    pub fn send_plan(&self, now: Instant) -> SendPlan {
        let udp = self.best.map(|b| b.addr);
        if self.trusted(now) {
            return SendPlan {
                udp,
                derp: None,
                relay: None,
            };
        }
        let relay = self.relay.map(|r| r.addr);
        if self.relay_trusted(now) {
            return SendPlan {
                udp: None,
                derp: None,
                relay,
            };
        }
        SendPlan {
            udp: if relay.is_some() { None } else { udp },
            derp: self.info.home_derp.or(self.derp_route),
            relay,
        }
    }

    /// A new netmap entry for the peer. A changed disco key (peer restarted) resets path state.
    pub fn update_info(&mut self, now: Instant, info: PeerInfo) {
        if info.disco_key != self.info.disco_key {
            self.reset();
        }
        let endpoints = info.endpoints.clone();
        self.info = info;
        self.apply_netmap_endpoints(&endpoints);
        self.update_report(now);
    }

    /// New facts about our own network. New endpoints release a CallMeMaybe that waited for them.
    pub fn set_local(&mut self, now: Instant, local: LocalNet) {
        self.local = local;
        self.local_endpoints_at = Some(now);
        if std::mem::take(&mut self.call_me_maybe_pending) {
            self.queue_call_me_maybe();
        }
        self.update_report(now);
    }

    /// The network changed (link change, rebind): forget what we learned about paths.
    pub fn network_changed(&mut self, now: Instant) {
        self.best = None;
        self.trust_until = None;
        self.drop_relay();
        self.unanswered_discovery = false;
        for st in self.endpoints.values_mut() {
            st.pongs.clear();
            st.last_ping = None;
        }
        self.update_report(now);
    }

    /// A UDP send to `addr` failed with "host unreachable".
    pub fn send_unreachable(&mut self, now: Instant, addr: SocketAddr) {
        if self.best.is_some_and(|b| b.addr == addr) {
            self.best = None;
            self.trust_until = None;
        }
        if let Some(st) = self.endpoints.get_mut(&addr) {
            st.pongs.clear();
        }
        self.update_report(now);
    }

    /// Timers due at or before `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.expire_pings(now);
        if self.trust_until.is_some_and(|t| t <= now) {
            // Trust lapsed: drop the deadline so it is not reported again.
            self.trust_until = None;
        }
        if self.relay_trust_until.is_some_and(|t| t <= now) {
            self.relay_trust_until = None;
        }
        if self.heartbeat_at.is_some_and(|t| t <= now) {
            self.heartbeat(now);
        }
        self.update_report(now);
    }

    // ----- outputs ------------------------------------------------------------------------

    /// The next disco message to seal and send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Whether disco messages or events wait to be polled.
    pub fn has_output(&self) -> bool {
        !self.transmits.is_empty() || !self.events.is_empty()
    }

    /// When [`Peer::handle_timeout`] must next be called, and why.
    pub fn poll_timeout(&self) -> Option<(Instant, TimeoutReason)> {
        let heartbeat = self.heartbeat_at.map(|t| (t, TimeoutReason::Heartbeat));
        let ping = self
            .sent_pings
            .values()
            .map(|p| (p.at + PING_TIMEOUT, TimeoutReason::PingTimeout))
            .min_by_key(|(t, _)| *t);
        let trust = self.trust_until.map(|t| (t, TimeoutReason::TrustExpires));
        let relay_trust = self
            .relay_trust_deadline()
            .map(|t| (t, TimeoutReason::TrustExpires));
        [heartbeat, ping, trust, relay_trust]
            .into_iter()
            .flatten()
            .min_by_key(|(t, _)| *t)
    }

    /// The current path (as of the last input).
    pub fn current_path(&self) -> Path {
        self.reported.0
    }

    /// Why the peer is on its current path.
    pub fn path_reason(&self) -> PathReason {
        self.reported.1
    }

    /// Recent path changes, oldest first.
    pub fn history(&self) -> impl Iterator<Item = &PathChange> {
        self.history.iter()
    }

    /// The best UDP address known (trusted or not).
    pub fn best_addr(&self) -> Option<AddrQuality> {
        self.best
    }

    /// The peer's netmap entry.
    pub fn info(&self) -> &PeerInfo {
        &self.info
    }

    /// Whether outgoing traffic happened in the last 45 s.
    pub fn is_active(&self, now: Instant) -> bool {
        self.last_send_ext
            .is_some_and(|t| now.saturating_duration_since(t) <= SESSION_ACTIVE_TIMEOUT)
    }

    /// Candidates for status views.
    pub fn candidates(&self) -> Vec<CandidateStatus> {
        self.endpoints
            .iter()
            .map(|(addr, st)| CandidateStatus {
                addr: *addr,
                from_netmap: st.from_netmap,
                from_call_me_maybe: st.from_call_me_maybe,
                from_ping: st.last_got_ping.is_some(),
                last_ping: st.last_ping,
                last_pong: st.pongs.back().copied(),
            })
            .collect()
    }

    // ----- disco handling -----------------------------------------------------------------

    fn handle_ping(&mut self, now: Instant, from: PathSource, ping: Ping) {
        let src = match from {
            PathSource::Derp { region } => {
                // Over DERP: answer over DERP; no endpoint learning.
                self.transmits.push_back(Transmit {
                    dest: Dest::Derp(region),
                    msg: Message::Pong(Pong {
                        tx_id: ping.tx_id,
                        src: SocketAddr::new(DERP_MAGIC_IP.into(), region),
                    }),
                });
                return;
            }
            PathSource::Relay(relay) => {
                // Through a relay: always answered the same way (Go relies on it to finish
                // its handshake, and it answers heartbeats); no endpoint learning.
                self.transmits.push_back(Transmit {
                    dest: Dest::Relay(relay),
                    msg: Message::Pong(Pong {
                        tx_id: ping.tx_id,
                        src: relay.via,
                    }),
                });
                return;
            }
            PathSource::Udp(src) => src,
        };
        let st = self.endpoints.entry(src).or_default();
        if st.last_got_ping_tx == Some(ping.tx_id) {
            // The same ping seen twice (e.g. two sockets): answered already.
            return;
        }
        st.last_got_ping = Some(now);
        st.last_got_ping_tx = Some(ping.tx_id);
        self.attribute(src);
        self.transmits.push_back(Transmit {
            dest: Dest::Direct(src),
            msg: Message::Pong(Pong {
                tx_id: ping.tx_id,
                src,
            }),
        });
        if self.is_active(now) && !self.trusted(now) {
            // Ours, not Go's: the ping shows this address reaches us and that the peer's NAT
            // now expects us, so our own ping there (dropped a moment ago, before the peer had
            // sent anything) would pass now; without this we would wait up to 5 s for the next
            // discovery round.
            let _ = self.send_ping(now, src, PingPurpose::Discovery);
        }
        self.prune_if_large(now);
    }

    fn handle_pong(&mut self, now: Instant, from: PathSource, pong: Pong) {
        let Some(sent) = self.sent_pings.remove(&pong.tx_id) else {
            tracing::trace!("disco: pong with unknown tx id");
            return;
        };
        let latency = now.saturating_duration_since(sent.at);
        self.events.push_back(Event::Pong {
            tx_id: pong.tx_id,
            via: from,
            latency,
            src: pong.src,
            cli: sent.purpose == PingPurpose::Cli,
        });
        if let (PathSource::Relay(got), Dest::Relay(to)) = (from, sent.to) {
            return self.relay_pong(now, got, to, latency);
        }
        // Pongs via DERP (or to a ping sent via DERP) never change paths.
        let (PathSource::Udp(pong_src), Dest::Direct(to)) = (from, sent.to) else {
            return;
        };
        let Some(st) = self.endpoints.get_mut(&to) else {
            return; // no longer a candidate
        };
        if st.pongs.len() == PONG_HISTORY_COUNT {
            st.pongs.pop_front();
        }
        st.pongs.push_back(PongRecord {
            at: now,
            latency,
            src: pong.src,
        });
        self.attribute(pong_src);
        // The address adopted is the one we pinged, not the pong's source.
        let candidate = AddrQuality {
            addr: to,
            vni: None,
            latency,
            wire_mtu: DEFAULT_WIRE_MTU,
        };
        if better_addr(&candidate, self.best.as_ref()) {
            tracing::debug!(addr = %to, ?latency, "disco: now using direct path");
            self.best = Some(candidate);
        }
        if let Some(best) = self.best.as_mut().filter(|b| b.addr == to) {
            best.latency = latency;
            self.trust_until = Some(now + TRUST_UDP_ADDR_DURATION);
            self.unanswered_discovery = false;
            // A direct path always beats a relay (Go has one bestAddr; it is replaced).
            self.drop_relay();
            self.relay_lost = false;
        }
    }

    fn handle_call_me_maybe(&mut self, now: Instant, eps: &[SocketAddr]) {
        let wanted: BTreeSet<SocketAddr> = eps
            .iter()
            .copied()
            .filter(|ep| !(ep.is_ipv6() && is_link_local_unicast(ep.ip())))
            .collect();
        for st in self.endpoints.values_mut() {
            st.from_call_me_maybe = false;
        }
        for ep in &wanted {
            self.endpoints.entry(*ep).or_default().from_call_me_maybe = true;
        }
        self.drop_sourceless(now);
        // Ping everything now, even what was pinged in the last 5 s.
        for st in self.endpoints.values_mut() {
            st.last_ping = None;
        }
        self.send_disco_pings(now, false);
        self.maybe_want_relay(now);
    }

    // ----- discovery ----------------------------------------------------------------------

    /// One discovery round (Go `sendDiscoPingsLocked`).
    fn send_disco_pings(&mut self, now: Instant, send_call_me_maybe: bool) {
        self.last_full_ping = Some(now);
        self.drop_sourceless(now);
        let due: Vec<SocketAddr> = self
            .endpoints
            .iter()
            .filter(|(_, st)| {
                st.last_ping
                    .is_none_or(|t| now.saturating_duration_since(t) >= DISCO_PING_INTERVAL)
            })
            .map(|(addr, _)| *addr)
            .collect();
        for addr in &due {
            let _ = self.send_ping(now, *addr, PingPurpose::Discovery);
        }
        if !due.is_empty() && send_call_me_maybe {
            self.call_me_maybe(now);
        } else if send_call_me_maybe {
            self.invite_to_ping_us(now);
        }
    }

    /// Send our endpoints in a CallMeMaybe via the peer's home DERP, refreshing them first when
    /// they are stale.
    fn call_me_maybe(&mut self, now: Instant) {
        if self.info.home_derp.is_none() {
            return;
        }
        self.call_me_maybe_at = Some(now);
        let fresh = self
            .local_endpoints_at
            .is_some_and(|t| now.saturating_duration_since(t) <= ENDPOINTS_FRESH_ENOUGH);
        if fresh {
            self.queue_call_me_maybe();
        } else if !self.call_me_maybe_pending {
            self.call_me_maybe_pending = true;
            self.events.push_back(Event::NeedEndpointRefresh);
        }
    }

    /// Ours on top of Go: a peer we have no candidate for (nothing in the netmap yet, e.g. a Go
    /// node whose endpoint report raced with an empty one) cannot be pinged, so ask it to ping
    /// us: a CallMeMaybe with our endpoints, at most every [`INVITE_INTERVAL`]. Its pings then
    /// teach us its address and our ping-back completes the path in one round trip.
    fn invite_to_ping_us(&mut self, now: Instant) {
        let recently = self
            .invited_at
            .is_some_and(|t| now.saturating_duration_since(t) < INVITE_INTERVAL);
        if !self.endpoints.is_empty() || self.local.endpoints.is_empty() || recently {
            return;
        }
        self.invited_at = Some(now);
        self.call_me_maybe(now);
    }

    fn queue_call_me_maybe(&mut self) {
        if let Some(region) = self.info.home_derp {
            self.transmits.push_back(Transmit {
                dest: Dest::Derp(region),
                msg: Message::CallMeMaybe(self.local.endpoints.clone()),
            });
        }
    }

    fn send_ping(&mut self, now: Instant, to: SocketAddr, purpose: PingPurpose) -> TxId {
        if purpose != PingPurpose::Cli {
            if let Some(st) = self.endpoints.get_mut(&to) {
                st.last_ping = Some(now);
            }
        }
        self.send_ping_to(now, Dest::Direct(to), purpose)
    }

    fn send_ping_to(&mut self, now: Instant, dest: Dest, purpose: PingPurpose) -> TxId {
        let tx_id = TxId::random();
        self.sent_pings.insert(
            tx_id,
            SentPing {
                to: dest,
                at: now,
                purpose,
            },
        );
        let node_key = (!self.local.node_key.is_zero()).then_some(self.local.node_key);
        self.transmits.push_back(Transmit {
            dest,
            msg: Message::Ping(Ping {
                tx_id,
                node_key,
                padding: 0,
            }),
        });
        tx_id
    }

    fn heartbeat(&mut self, now: Instant) {
        self.heartbeat_at = None;
        if !self.is_active(now) {
            return; // idle: the next outgoing packet restarts heartbeats
        }
        if let Some(best) = self.best {
            let _ = self.send_ping(now, best.addr, PingPurpose::Heartbeat);
        }
        self.relay_heartbeat(now);
        if self.want_full_ping(now) {
            self.send_disco_pings(now, true);
        }
        if !self.trusted(now) {
            self.maybe_want_relay(now);
        }
        self.heartbeat_at = Some(now + HEARTBEAT_INTERVAL);
    }

    /// Go `wantFullPingLocked`.
    fn want_full_ping(&self, now: Instant) -> bool {
        let (Some(best), Some(last_full)) = (self.best, self.last_full_ping) else {
            return true;
        };
        if !self.trusted(now) {
            return true;
        }
        if best.latency <= GOOD_ENOUGH_LATENCY {
            return false;
        }
        now.saturating_duration_since(last_full) >= UPGRADE_UDP_DIRECT_INTERVAL
    }

    fn expire_pings(&mut self, now: Instant) {
        let expired: Vec<(TxId, SentPing)> = self
            .sent_pings
            .iter()
            .filter(|(_, p)| p.at + PING_TIMEOUT <= now)
            .map(|(tx, p)| (*tx, *p))
            .collect();
        for (tx, ping) in expired {
            self.sent_pings.remove(&tx);
            tracing::trace!(to = ?ping.to, purpose = ?ping.purpose, "disco: ping timed out");
            if ping.purpose == PingPurpose::Discovery && self.best.is_none() {
                self.unanswered_discovery = true;
            }
            if let Dest::Relay(relay) = ping.to {
                self.relay_ping_timed_out(now, relay);
            }
        }
    }

    // ----- candidate bookkeeping ----------------------------------------------------------

    fn apply_netmap_endpoints(&mut self, eps: &[SocketAddr]) {
        for st in self.endpoints.values_mut() {
            st.from_netmap = false;
        }
        for ep in eps {
            self.endpoints.entry(*ep).or_default().from_netmap = true;
        }
    }

    /// Removes candidates no source vouches for any more; forgets `best` if it was one.
    fn drop_sourceless(&mut self, now: Instant) {
        self.endpoints.retain(|_, st| !st.expired(now));
        if self
            .best
            .is_some_and(|b| !self.endpoints.contains_key(&b.addr))
        {
            self.best = None;
            self.trust_until = None;
        }
    }

    fn prune_if_large(&mut self, now: Instant) {
        if self.endpoints.len() > MAX_ENDPOINTS {
            self.drop_sourceless(now);
        }
    }

    fn attribute(&mut self, addr: SocketAddr) {
        if self.attributed.insert(addr) {
            self.events.push_back(Event::AddrForPeer(addr));
        }
    }

    /// Go `resetLocked`: after a disco key change.
    fn reset(&mut self) {
        self.best = None;
        self.trust_until = None;
        self.drop_relay();
        self.relay_lost = false;
        self.relay_failure = None;
        self.last_relay_discovery = None;
        self.sent_pings.clear();
        self.last_send_ext = None;
        self.last_full_ping = None;
        self.heartbeat_at = None;
        self.unanswered_discovery = false;
        for st in self.endpoints.values_mut() {
            st.last_ping = None;
        }
    }

    fn trusted(&self, now: Instant) -> bool {
        self.best.is_some() && self.trust_until.is_some_and(|t| now < t)
    }

    // ----- reporting ----------------------------------------------------------------------

    /// The path and its reason as the state stands at `now`.
    fn evaluate(&self, now: Instant) -> (Path, PathReason) {
        if let (true, Some(best)) = (self.trusted(now), self.best) {
            let path = Path::Direct {
                addr: best.addr,
                latency: best.latency,
            };
            return (path, PathReason::Direct);
        }
        if let (true, Some(relay)) = (self.relay_trusted(now), self.relay) {
            let path = Path::PeerRelay {
                relay: relay.addr,
                latency: relay.latency,
            };
            return (path, PathReason::PeerRelay);
        }
        let derp = self.info.home_derp.or(self.derp_route);
        let path = match (derp, self.best) {
            (Some(region), _) => Path::Derp { region },
            (None, Some(best)) => Path::Direct {
                addr: best.addr,
                latency: best.latency,
            },
            (None, None) => return (Path::None, PathReason::NoDerpRegion),
        };
        (path, self.why_not_direct(now))
    }

    fn why_not_direct(&self, now: Instant) -> PathReason {
        if self.local.udp_working == Some(false) {
            return PathReason::UdpBlocked;
        }
        if self.endpoints.is_empty() {
            return PathReason::NoEndpoints;
        }
        if !self.is_active(now) {
            return PathReason::Idle;
        }
        if self.relay_lost {
            return PathReason::RelayLost;
        }
        if self.best.is_some() {
            return PathReason::DirectLost;
        }
        if !self.unanswered_discovery {
            return PathReason::Discovering;
        }
        if self.info.udp_working == Some(false) {
            return PathReason::PeerUdpBlocked;
        }
        let local_hard = self.local.mapping_varies == Some(true);
        let peer_hard = self.info.mapping_varies == Some(true);
        match (local_hard, peer_hard) {
            (true, true) => PathReason::BothHardNat,
            (true, false) => PathReason::LocalHardNat,
            (false, true) => PathReason::PeerHardNat,
            (false, false) => PathReason::NoPongFromCandidates,
        }
    }

    /// Records a change of path or reason in the history and as an event.
    fn update_report(&mut self, now: Instant) {
        let (path, reason) = self.evaluate(now);
        let (old_path, old_reason) = self.reported;
        self.reported = (path, reason);
        if path.same_route(&old_path) && reason == old_reason {
            return;
        }
        let change = PathChange {
            at: now,
            from: old_path,
            to: path,
            reason,
        };
        tracing::debug!(from = ?old_path, to = ?path, %reason, "path change");
        if self.history.len() == PATH_HISTORY_LEN {
            self.history.pop_front();
        }
        self.history.push_back(change);
        self.events.push_back(Event::PathChanged(change));
    }
}

mod relay;
mod table;
pub use relay::{
    RelayAddr, RelayPath, RelayReason, DISCOVER_RELAY_INTERVAL, RELAY_TRUST_DURATION,
    UPGRADE_RELAY_INTERVAL,
};
pub use table::{DiscoCounters, DiscoDrop, Outgoing, PeerEvent, PeerTable};

#[cfg(test)]
mod tests;
