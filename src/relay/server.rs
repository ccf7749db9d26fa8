//! The peer relay server (Go `net/udprelay.Server`), sans-IO.
//!
//! Two clients that cannot reach each other directly each bind to an *endpoint* (identified by a
//! VNI) on this server; it then forwards their Geneve-framed datagrams to each other, unchanged
//! and unread. Allocation requests reach it through the node's disco-over-DERP path
//! ([`RelayServer::allocate`]); the bind handshake and the data arrive on the relay's own UDP
//! socket ([`RelayServer::handle_packet`]). The caller owns the sockets and the clock.
//!
//! The handshake follows Go v1.92+ (which we apply to every client version): every
//! valid Bind is answered with a Challenge whose cookie is a keyed BLAKE2s MAC over (VNI,
//! generation, the other client's disco key, the Bind's source address), so an Answer proves the
//! client receives at that address and no per-attempt state is kept. The MAC key rotates every
//! 2 minutes and the previous one is still accepted.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use blake2::digest::{FixedOutput, KeyInit, Update};
use blake2::Blake2sMac256;
use subtle::ConstantTimeEq;

use crate::disco::{self, AllocateRequest, BindBody, Message, UdpRelayEndpoint};
use crate::keys::{DiscoPrivate, DiscoPublic};
use crate::naclbox::SharedBox;
use crate::relay::geneve::{self, Header, Vni, PROTOCOL_DISCO, VNI_MAX};
use crate::status::{RelayLegStatus, RelayServerStatus, RelaySessionStatus};
use bind_limit::BindLimiter;
pub use bind_limit::{CHALLENGES_PER_SECOND, CHALLENGE_BURST};

/// How long both legs have to bind after allocation (`BindLifetime`, also the GC period).
pub const BIND_LIFETIME: Duration = Duration::from_secs(30);
/// A bound leg silent this long ends the session (`SteadyStateLifetime`).
pub const STEADY_STATE_LIFETIME: Duration = Duration::from_secs(300);
/// How often the challenge MAC key is replaced (the previous one stays valid).
pub const MAC_ROTATION: Duration = Duration::from_secs(120);

/// Why an allocation got no endpoint (Go answers none of these; the client retries at 3 s).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    #[error("no address to offer yet (address discovery has not found one)")]
    NotReady,
    #[error("a client disco key equals the server's")]
    ServerKeyClash,
    #[error("both client disco keys are the same")]
    SameClient,
    #[error("VNI pool exhausted")]
    VniExhausted,
}

/// What to do with one datagram that arrived on the relay socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send the datagram, unchanged, to this address (data between bound legs).
    Forward(SocketAddr),
    /// Send these bytes to this address (a Challenge).
    Reply { to: SocketAddr, packet: Vec<u8> },
    /// A control message was accepted; nothing to send (an Answer that bound a leg).
    Accepted,
    /// A STUN packet: the caller's address discovery wants it.
    Stun,
    /// Dropped; the reason is also counted.
    Drop(&'static str),
}

/// One client's side of an endpoint.
#[derive(Debug, Clone, Default)]
struct Leg {
    /// The generation of the Bind we challenged last (0 = none in progress).
    in_progress_generation: u32,
    bound: Option<SocketAddr>,
    last_seen: Option<Instant>,
    packets_rx: u64,
    bytes_rx: u64,
}

/// One relay endpoint (session) for an unordered pair of clients.
#[derive(Clone)]
struct Endpoint {
    disco: [DiscoPublic; 2],
    shared: [SharedBox; 2],
    vni: u32,
    lamport_id: u64,
    allocated_at: Instant,
    legs: [Leg; 2],
}

impl Endpoint {
    fn is_open(&self) -> bool {
        self.legs.iter().all(|l| l.bound.is_some())
    }

    fn expired(&self, now: Instant) -> bool {
        if !self.is_open() {
            return now.saturating_duration_since(self.allocated_at) > BIND_LIFETIME;
        }
        self.legs.iter().any(|l| {
            l.last_seen
                .is_none_or(|t| now.saturating_duration_since(t) > STEADY_STATE_LIFETIME)
        })
    }
}

/// The challenge MAC keys: the newest first.
#[derive(Clone)]
struct MacKeys {
    current: [u8; 32],
    previous: Option<[u8; 32]>,
    rotated_at: Instant,
}

/// The relay server's state: endpoints by VNI and by client pair, address list, counters.
#[derive(Clone)]
pub struct RelayServer {
    disco: DiscoPrivate,
    disco_public: DiscoPublic,
    addr_ports: Vec<SocketAddr>,
    /// What discovery found, and the operator's static endpoints (offered after those).
    discovered: Vec<SocketAddr>,
    static_addr_ports: Vec<SocketAddr>,
    endpoints: HashMap<u32, Endpoint>,
    by_pair: HashMap<[DiscoPublic; 2], u32>,
    next_vni: u32,
    lamport_id: u64,
    mac: MacKeys,
    allocations: u64,
    forwarded_packets: u64,
    forwarded_bytes: u64,
    /// Packets and bytes by (leg in is IPv6, leg out is IPv6).
    forwarded_by_family: [[(u64, u64); 2]; 2],
    drops: BTreeMap<&'static str, u64>,
    bind_limiter: BindLimiter,
}

impl std::fmt::Debug for RelayServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayServer")
            .field("disco", &self.disco_public)
            .field("addr_ports", &self.addr_ports)
            .field("endpoints", &self.endpoints.len())
            .finish_non_exhaustive()
    }
}

impl RelayServer {
    /// A server with a fresh ephemeral disco key (Go makes one per start).
    pub fn new(now: Instant) -> RelayServer {
        RelayServer::with_disco(DiscoPrivate::generate(), now)
    }

    /// A server with the given relay disco key.
    pub fn with_disco(disco: DiscoPrivate, now: Instant) -> RelayServer {
        RelayServer {
            disco_public: disco.public(),
            disco,
            addr_ports: Vec::new(),
            discovered: Vec::new(),
            static_addr_ports: Vec::new(),
            endpoints: HashMap::new(),
            by_pair: HashMap::new(),
            next_vni: 1,
            lamport_id: 0,
            mac: MacKeys {
                current: rand::random(),
                previous: None,
                rotated_at: now,
            },
            allocations: 0,
            forwarded_packets: 0,
            forwarded_bytes: 0,
            forwarded_by_family: [[(0, 0); 2]; 2],
            drops: BTreeMap::new(),
            bind_limiter: BindLimiter::default(),
        }
    }

    /// The relay's own disco public key (`ServerDisco`).
    pub fn disco_public(&self) -> DiscoPublic {
        self.disco_public
    }

    /// The addresses offered to clients (replaces the list; live endpoints get it on their next
    /// allocation).
    pub fn set_addr_ports(&mut self, addr_ports: Vec<SocketAddr>) {
        self.discovered = addr_ports;
        self.merge_addr_ports();
    }

    /// Addresses offered in addition to what discovery finds (Go
    /// `RelayServerStaticEndpoints`: a relay behind a port forward), pushed live.
    pub fn set_static_addr_ports(&mut self, addr_ports: Vec<SocketAddr>) {
        self.static_addr_ports = addr_ports;
        self.merge_addr_ports();
    }

    pub fn static_addr_ports(&self) -> &[SocketAddr] {
        &self.static_addr_ports
    }

    fn merge_addr_ports(&mut self) {
        let mut all = self.discovered.clone();
        for addr in &self.static_addr_ports {
            if !all.contains(addr) {
                all.push(*addr);
            }
        }
        self.addr_ports = all;
    }

    pub fn addr_ports(&self) -> &[SocketAddr] {
        &self.addr_ports
    }

    /// An endpoint for the unordered pair in `request` (Go `AllocateEndpoint`): the existing one
    /// (same VNI and LamportID, fresh addresses) or a new one.
    pub fn allocate(
        &mut self,
        now: Instant,
        request: &AllocateRequest,
    ) -> Result<UdpRelayEndpoint, AllocError> {
        if self.addr_ports.is_empty() {
            return Err(AllocError::NotReady);
        }
        let pair = sorted(request.client_disco);
        if pair.contains(&self.disco_public) {
            return Err(AllocError::ServerKeyClash);
        }
        if pair[0] == pair[1] {
            return Err(AllocError::SameClient);
        }
        let vni = match self.by_pair.get(&pair) {
            Some(vni) => *vni,
            None => self.new_endpoint(now, pair)?,
        };
        self.allocations += 1;
        let ep = self.endpoints.get(&vni).ok_or(AllocError::VniExhausted)?;
        Ok(UdpRelayEndpoint {
            server_disco: self.disco_public,
            client_disco: ep.disco,
            lamport_id: ep.lamport_id,
            vni,
            bind_lifetime: BIND_LIFETIME,
            steady_state_lifetime: STEADY_STATE_LIFETIME,
            addr_ports: self.addr_ports.clone(),
        })
    }

    fn new_endpoint(&mut self, now: Instant, pair: [DiscoPublic; 2]) -> Result<u32, AllocError> {
        let vni = self.next_free_vni()?;
        self.lamport_id += 1;
        let shared = pair.map(|d| disco::shared_box(&self.disco, &d));
        self.endpoints.insert(
            vni,
            Endpoint {
                disco: pair,
                shared,
                vni,
                lamport_id: self.lamport_id,
                allocated_at: now,
                legs: Default::default(),
            },
        );
        self.by_pair.insert(pair, vni);
        Ok(vni)
    }

    /// RFC 6056 "traditional BSD" scan from `next_vni`, wrapping to 1, skipping used VNIs.
    fn next_free_vni(&mut self) -> Result<u32, AllocError> {
        for _ in 0..VNI_MAX {
            let vni = self.next_vni;
            self.next_vni = if vni >= VNI_MAX { 1 } else { vni + 1 };
            if !self.endpoints.contains_key(&vni) {
                return Ok(vni);
            }
        }
        Err(AllocError::VniExhausted)
    }

    /// One datagram from `from` on the relay socket.
    pub fn handle_packet(&mut self, now: Instant, from: SocketAddr, packet: &[u8]) -> Action {
        let action = self.classify(now, from, packet);
        if let Action::Drop(reason) = action {
            *self.drops.entry(reason).or_default() += 1;
        }
        action
    }

    /// Counts `n` datagrams dropped for `reason` outside [`Self::handle_packet`] (e.g. by the
    /// caller's socket).
    pub fn count_drops(&mut self, reason: &'static str, n: u64) {
        *self.drops.entry(reason).or_default() += n;
    }

    fn classify(&mut self, now: Instant, from: SocketAddr, packet: &[u8]) -> Action {
        if crate::stun::is(packet) && packet.get(1) == Some(&0x01) {
            return Action::Stun;
        }
        let Ok(header) = geneve::parse(packet) else {
            return Action::Drop("short");
        };
        let vni = header.vni.get();
        if !self.endpoints.contains_key(&vni) {
            return Action::Drop("unknown_vni");
        }
        if header.control {
            if header.protocol != PROTOCOL_DISCO {
                return Action::Drop("bad_control");
            }
            let body = packet.get(geneve::HEADER_LEN..).unwrap_or_default();
            return self.handle_control(now, from, vni, body);
        }
        self.forward(now, from, vni, packet.len())
    }

    /// Data between bound legs (§5.1): the packet goes unchanged to the other leg.
    fn forward(&mut self, now: Instant, from: SocketAddr, vni: u32, len: usize) -> Action {
        let Some(ep) = self.endpoints.get_mut(&vni) else {
            return Action::Drop("unknown_vni");
        };
        let (Some(a), Some(b)) = (ep.legs[0].bound, ep.legs[1].bound) else {
            return Action::Drop("not_bound");
        };
        let (i, to) = if from == a {
            (0, b)
        } else if from == b {
            (1, a)
        } else {
            return Action::Drop("unknown_source");
        };
        let leg = &mut ep.legs[i];
        leg.last_seen = Some(now);
        leg.packets_rx += 1;
        leg.bytes_rx += len as u64;
        self.forwarded_packets += 1;
        self.forwarded_bytes += len as u64;
        let v6 = |a: SocketAddr| usize::from(crate::udp::unmap_v4(a).is_ipv6());
        let by_family = &mut self.forwarded_by_family[v6(from)][v6(to)];
        by_family.0 += 1;
        by_family.1 += len as u64;
        Action::Forward(to)
    }

    /// Bind and Answer (§4.2); every failure is a silent drop.
    fn handle_control(&mut self, now: Instant, from: SocketAddr, vni: u32, body: &[u8]) -> Action {
        self.maybe_rotate_mac(now);
        let Ok(packet) = disco::parse_packet(body) else {
            return Action::Drop("bad_control");
        };
        let Some(ep) = self.endpoints.get(&vni) else {
            return Action::Drop("unknown_vni");
        };
        let Some(i) = ep.disco.iter().position(|d| *d == packet.sender) else {
            return Action::Drop("unknown_client");
        };
        let Ok(msg) = disco::open(&ep.shared[i], &packet) else {
            return Action::Drop("bad_box");
        };
        let other = ep.disco[1 - i];
        match msg {
            Message::BindUdpRelayEndpoint(bind) => self.on_bind(now, from, vni, i, other, bind),
            Message::BindUdpRelayEndpointAnswer(answer) => {
                self.on_answer(now, from, vni, i, other, answer)
            }
            _ => Action::Drop("bad_control"),
        }
    }

    fn on_bind(
        &mut self,
        now: Instant,
        from: SocketAddr,
        vni: u32,
        i: usize,
        other: DiscoPublic,
        bind: BindBody,
    ) -> Action {
        if bind.vni != vni || bind.remote_key != other || bind.generation == 0 {
            return Action::Drop("bad_bind");
        }
        // A replayed Bind with a spoofed source must not turn the relay into a reflector.
        if !self.bind_limiter.allow(now, from.ip()) {
            return Action::Drop("bind_rate_limited");
        }
        let cookie = cookie(&self.mac.current, vni, bind.generation, &other, from);
        let Some(ep) = self.endpoints.get_mut(&vni) else {
            return Action::Drop("unknown_vni");
        };
        ep.legs[i].in_progress_generation = bind.generation;
        let challenge = Message::BindUdpRelayEndpointChallenge(BindBody {
            vni,
            generation: bind.generation,
            remote_key: other,
            challenge: cookie,
        });
        let sealed = disco::seal_with(&ep.shared[i], &self.disco_public, &challenge);
        Action::Reply {
            to: from,
            packet: control_frame(vni, &sealed),
        }
    }

    fn on_answer(
        &mut self,
        now: Instant,
        from: SocketAddr,
        vni: u32,
        i: usize,
        other: DiscoPublic,
        answer: BindBody,
    ) -> Action {
        let gen = answer.generation;
        let valid_cookie = [Some(self.mac.current), self.mac.previous]
            .into_iter()
            .flatten()
            // Constant time: an attacker timing the comparison must learn nothing of the cookie.
            .any(|key| {
                bool::from(cookie(&key, vni, gen, &other, from)[..].ct_eq(&answer.challenge[..]))
            });
        let Some(ep) = self.endpoints.get_mut(&vni) else {
            return Action::Drop("unknown_vni");
        };
        let leg = &mut ep.legs[i];
        let expected = leg.in_progress_generation != 0 && leg.in_progress_generation == gen;
        if answer.vni != vni || answer.remote_key != other || !expected || !valid_cookie {
            return Action::Drop("bad_answer");
        }
        leg.bound = Some(from);
        leg.last_seen = Some(now);
        // A replayed Answer finds no generation in progress.
        leg.in_progress_generation = 0;
        tracing::debug!(vni, leg = i, %from, "relay: leg bound");
        Action::Accepted
    }

    fn maybe_rotate_mac(&mut self, now: Instant) {
        if now.saturating_duration_since(self.mac.rotated_at) >= MAC_ROTATION {
            self.mac.previous = Some(self.mac.current);
            self.mac.current = rand::random();
            self.mac.rotated_at = now;
        }
    }

    /// Removes expired endpoints (§5.4); the caller runs this every [`BIND_LIFETIME`].
    pub fn expire(&mut self, now: Instant) -> usize {
        self.bind_limiter.expire(now);
        let expired: Vec<u32> = self
            .endpoints
            .values()
            .filter(|ep| ep.expired(now))
            .map(|ep| ep.vni)
            .collect();
        for vni in &expired {
            if let Some(ep) = self.endpoints.remove(vni) {
                self.by_pair.remove(&ep.disco);
                tracing::debug!(vni, "relay: endpoint expired");
            }
        }
        expired.len()
    }

    /// The live state for `status --json` (peer names are the caller's to fill).
    pub fn status(&self, now: Instant, port: u16) -> RelayServerStatus {
        let mut sessions: Vec<RelaySessionStatus> = self
            .endpoints
            .values()
            .map(|ep| session_status(ep, now))
            .collect();
        sessions.sort_by_key(|s| s.vni);
        RelayServerStatus {
            port,
            addr_ports: self.addr_ports.iter().map(ToString::to_string).collect(),
            static_endpoints: self
                .static_addr_ports
                .iter()
                .map(ToString::to_string)
                .collect(),
            server_disco_key: self.disco_public.to_string(),
            allocations: self.allocations,
            forwarded_packets: self.forwarded_packets,
            forwarded_bytes: self.forwarded_bytes,
            drops: self
                .drops
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect(),
            sessions,
            forwarded_by_transport: self.forwarded_by_transport(),
        }
    }

    /// The per-family counters with tailscaled's labels (`udp4`, `udp6`).
    fn forwarded_by_transport(&self) -> Vec<crate::status::RelayForwarded> {
        let name = |v6: usize| if v6 == 1 { "udp6" } else { "udp4" };
        let mut out = Vec::new();
        for (i, row) in self.forwarded_by_family.iter().enumerate() {
            for (o, (packets, bytes)) in row.iter().enumerate() {
                out.push(crate::status::RelayForwarded {
                    transport_in: name(i).into(),
                    transport_out: name(o).into(),
                    packets: *packets,
                    bytes: *bytes,
                });
            }
        }
        out
    }
}

fn session_status(ep: &Endpoint, now: Instant) -> RelaySessionStatus {
    RelaySessionStatus {
        vni: ep.vni,
        state: if ep.is_open() { "open" } else { "connecting" }.to_string(),
        age_secs: now.saturating_duration_since(ep.allocated_at).as_secs(),
        legs: ep
            .disco
            .iter()
            .zip(&ep.legs)
            .map(|(disco, leg)| RelayLegStatus {
                disco_key: disco.to_string(),
                peer: None,
                bound: leg.bound.map(|a| a.to_string()),
                packets_rx: leg.packets_rx,
                bytes_rx: leg.bytes_rx,
            })
            .collect(),
    }
}

/// The pair in Go's `SortedPairOfDiscoPublic` order (bytewise ascending).
fn sorted(pair: [DiscoPublic; 2]) -> [DiscoPublic; 2] {
    let [a, b] = pair;
    if a.as_bytes() <= b.as_bytes() {
        [a, b]
    } else {
        [b, a]
    }
}

/// The challenge cookie: BLAKE2s-256 keyed with `key` over VNI ‖ generation ‖ remote key ‖ the
/// source address bytes ‖ its port (little-endian, as Go's `AddrPort.AppendBinary`).
fn cookie(
    key: &[u8; 32],
    vni: u32,
    generation: u32,
    remote: &DiscoPublic,
    src: SocketAddr,
) -> [u8; 32] {
    let mut mac = match Blake2sMac256::new_from_slice(key) {
        Ok(mac) => mac,
        // A 32-byte key always fits BLAKE2s; an empty cookie would only fail the Answer.
        Err(_) => return [0; 32],
    };
    mac.update(&vni.to_be_bytes());
    mac.update(&generation.to_be_bytes());
    mac.update(remote.as_bytes());
    match src.ip() {
        IpAddr::V4(v4) => mac.update(&v4.octets()),
        IpAddr::V6(v6) => mac.update(&v6.octets()),
    }
    mac.update(&src.port().to_le_bytes());
    mac.finalize_fixed().into()
}

/// Geneve control header (C=1, disco) followed by a sealed disco frame.
fn control_frame(vni: u32, sealed: &[u8]) -> Vec<u8> {
    let header = Header {
        version: 0,
        protocol: PROTOCOL_DISCO,
        control: true,
        vni: Vni::new(vni),
    };
    let mut out = Vec::with_capacity(geneve::HEADER_LEN + sealed.len());
    // VNIs come from our own pool (1..=VNI_MAX), so the header always encodes.
    if let Ok(bytes) = header.to_bytes() {
        out.extend_from_slice(&bytes);
    }
    out.extend_from_slice(sealed);
    out
}

mod bind_limit;

#[cfg(test)]
mod tests;
