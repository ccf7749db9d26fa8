//! The relay client's bind handshake with one peer relay endpoint (Go `relayManager`'s handshake
//! work, v1.90–v1.94 client procedure), sans-IO. Given an endpoint (from our allocation or the
//! peer's CallMeMaybeVia) it sends one Bind to every address of the relay, answers the first
//! Challenge with the cookie echoed, then pings the peer through the relay (at most 10 pings) until
//! a Pong proves the path. A relayed Ping from the peer is always answered with a Pong through the
//! relay (Go peers rely on that). Nothing is retransmitted; after `min(BindLifetime, 30 s)` without
//! a Pong the work fails and DERP (or a direct path) stays in use.
//!
//! [`Allocation`] is the step before: asking a relay node (over DERP) for an endpoint for us and a
//! peer, retransmitted once after 3 s, given up after 10 s, and the answer accepted only from that
//! relay for that pair and generation.
//!
//! [`crate::relay::manager`] runs these per peer and relay server; `paths` decides which path is
//! used.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::disco::{self, BindBody, Message, Ping, Pong, TxId, UdpRelayEndpoint};
use crate::keys::{DiscoPrivate, DiscoPublic, NodePublic};
use crate::naclbox::SharedBox;
use crate::relay::geneve::{self, Header, Vni, PROTOCOL_DISCO};

/// Our disco key and the shared keys with the relay server and the peer, for
/// [`Handshake::start_with`].
pub struct Boxes {
    pub mine: DiscoPublic,
    pub server: SharedBox,
    pub peer: SharedBox,
}

/// Longest a handshake may run, whatever the relay's `BindLifetime` says (Go
/// `maxHandshakeLifetime`).
pub const MAX_HANDSHAKE_LIFETIME: Duration = Duration::from_secs(30);
/// Pings per handshake at most (Go `limitPings`).
pub const MAX_PINGS: usize = 10;

/// A datagram to send on the node's UDP socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    pub to: SocketAddr,
    pub packet: Vec<u8>,
}

/// How a handshake ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The peer answered through the relay at `via`: a usable path.
    Bound {
        via: SocketAddr,
        vni: u32,
        latency: Duration,
    },
    /// No Pong before the deadline.
    TimedOut,
}

/// Why a handshake could not start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StartError {
    #[error("the endpoint offers no relay address")]
    NoAddress,
    #[error("the endpoint's VNI {0} is not a valid VNI")]
    BadVni(u32),
}

/// Where the handshake stands (Go `BindUDPRelayHandshakeState`, client side).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    BindSent,
    /// The Answer went to the relay at this address; pings go there too.
    AnswerSent(SocketAddr),
    Done,
}

/// Packets the handshake dropped, by cause.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Drops {
    /// Not Geneve disco for this VNI, or not a disco frame.
    pub malformed: u64,
    /// Sealed by a key that is neither the relay's nor the peer's, or failed to open.
    pub bad_box: u64,
    /// A well-formed message this state does not expect (a second Challenge, a stray Pong).
    pub unexpected: u64,
}

/// One bind handshake: this node and `peer` on one relay endpoint.
#[derive(Clone)]
pub struct Handshake {
    endpoint: UdpRelayEndpoint,
    node_key: NodePublic,
    my_disco: DiscoPublic,
    peer_disco: DiscoPublic,
    generation: u32,
    server_box: SharedBox,
    peer_box: SharedBox,
    state: State,
    started: Instant,
    deadline: Instant,
    pings: Vec<(TxId, Instant)>,
    out: VecDeque<Transmit>,
    outcome: Option<Outcome>,
    drops: Drops,
}

impl Handshake {
    /// Starts the handshake: one Bind to every relay address.
    pub fn start(
        now: Instant,
        me: &DiscoPrivate,
        node_key: NodePublic,
        peer_disco: DiscoPublic,
        endpoint: UdpRelayEndpoint,
        generation: u32,
    ) -> Result<Handshake, StartError> {
        let boxes = Boxes {
            mine: me.public(),
            server: disco::shared_box(me, &endpoint.server_disco),
            peer: disco::shared_box(me, &peer_disco),
        };
        Handshake::start_with(now, boxes, node_key, peer_disco, endpoint, generation)
    }

    /// [`Handshake::start`] with the shared keys already computed (X25519 is the costly part;
    /// the relay manager keeps them per disco key).
    pub fn start_with(
        now: Instant,
        boxes: Boxes,
        node_key: NodePublic,
        peer_disco: DiscoPublic,
        endpoint: UdpRelayEndpoint,
        generation: u32,
    ) -> Result<Handshake, StartError> {
        if endpoint.addr_ports.is_empty() {
            return Err(StartError::NoAddress);
        }
        if !(1..=geneve::VNI_MAX).contains(&endpoint.vni) {
            return Err(StartError::BadVni(endpoint.vni));
        }
        let lifetime = endpoint.bind_lifetime.min(MAX_HANDSHAKE_LIFETIME);
        let lifetime = if lifetime.is_zero() {
            MAX_HANDSHAKE_LIFETIME
        } else {
            lifetime
        };
        let mut handshake = Handshake {
            server_box: boxes.server,
            peer_box: boxes.peer,
            my_disco: boxes.mine,
            node_key,
            peer_disco,
            generation,
            state: State::BindSent,
            started: now,
            deadline: now + lifetime,
            pings: Vec::new(),
            out: VecDeque::new(),
            outcome: None,
            drops: Drops::default(),
            endpoint,
        };
        let bind = Message::BindUdpRelayEndpoint(handshake.bind_body([0; 32]));
        for to in handshake.endpoint.addr_ports.clone() {
            handshake.send_control(to, &bind);
        }
        Ok(handshake)
    }

    /// The endpoint this handshake binds to.
    pub fn endpoint(&self) -> &UdpRelayEndpoint {
        &self.endpoint
    }

    /// The peer's disco key (relayed pings and pongs are sealed by it).
    pub fn peer_disco(&self) -> DiscoPublic {
        self.peer_disco
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn drops(&self) -> Drops {
        self.drops
    }

    /// The result, once there is one.
    pub fn outcome(&self) -> Option<&Outcome> {
        self.outcome.as_ref()
    }

    /// The next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.out.pop_front()
    }

    /// When [`Handshake::handle_timeout`] is due, while the handshake runs.
    pub fn poll_timeout(&self) -> Option<Instant> {
        (self.outcome.is_none()).then_some(self.deadline)
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if self.outcome.is_none() && now >= self.deadline {
            self.outcome = Some(Outcome::TimedOut);
            self.state = State::Done;
        }
    }

    /// A datagram from `from` that starts with a Geneve header for this endpoint's VNI: a
    /// Challenge from the relay (control), or a Ping/Pong from the peer through the relay (data).
    /// Anything else is dropped and counted.
    pub fn handle_packet(&mut self, now: Instant, from: SocketAddr, datagram: &[u8]) {
        let Some((header, sealed)) = self.split(datagram) else {
            self.drops.malformed += 1;
            return;
        };
        let Ok(frame) = disco::parse_packet(sealed) else {
            self.drops.malformed += 1;
            return;
        };
        let (expected_sender, shared) = if header.control {
            (self.endpoint.server_disco, &self.server_box)
        } else {
            (self.peer_disco, &self.peer_box)
        };
        if frame.sender != expected_sender {
            self.drops.bad_box += 1;
            return;
        }
        let Ok(msg) = disco::open(shared, &frame) else {
            self.drops.bad_box += 1;
            return;
        };
        match (header.control, msg) {
            (true, Message::BindUdpRelayEndpointChallenge(body)) => {
                self.on_challenge(now, from, &body)
            }
            (false, Message::Ping(ping)) => self.on_peer_ping(now, from, &ping),
            (false, Message::Pong(pong)) => self.on_peer_pong(now, from, &pong),
            _ => self.drops.unexpected += 1,
        }
    }

    /// The Geneve header (disco, this VNI) and what follows it.
    fn split<'a>(&self, datagram: &'a [u8]) -> Option<(Header, &'a [u8])> {
        let header = geneve::parse(datagram).ok()?;
        let ours = header.protocol == PROTOCOL_DISCO && header.vni.get() == self.endpoint.vni;
        ours.then(|| {
            (
                header,
                datagram.get(geneve::HEADER_LEN..).unwrap_or_default(),
            )
        })
    }

    /// The first Challenge is answered (our own VNI, generation and peer key, the cookie
    /// echoed) and followed by a Ping to the peer through the relay; later ones are ignored.
    fn on_challenge(&mut self, now: Instant, from: SocketAddr, body: &BindBody) {
        if self.state != State::BindSent
            || body.vni != self.endpoint.vni
            || body.remote_key != self.peer_disco
        {
            self.drops.unexpected += 1;
            return;
        }
        let answer = Message::BindUdpRelayEndpointAnswer(self.bind_body(body.challenge));
        self.send_control(from, &answer);
        self.state = State::AnswerSent(from);
        self.ping_peer(now, from);
    }

    /// The peer pinged us through the relay: always a Pong; while waiting, another Ping of ours
    /// (our first one was likely dropped before the peer's leg was bound).
    fn on_peer_ping(&mut self, now: Instant, from: SocketAddr, ping: &Ping) {
        let pong = Message::Pong(Pong {
            tx_id: ping.tx_id,
            src: from,
        });
        self.send_data(from, &pong);
        if self.state == State::AnswerSent(from) {
            self.ping_peer(now, from);
        }
    }

    fn on_peer_pong(&mut self, now: Instant, from: SocketAddr, pong: &Pong) {
        let sent = self
            .pings
            .iter()
            .find(|(tx, _)| *tx == pong.tx_id)
            .map(|(_, at)| *at);
        match (sent, self.state) {
            (Some(at), State::AnswerSent(via)) if via == from => {
                self.outcome = Some(Outcome::Bound {
                    via,
                    vni: self.endpoint.vni,
                    latency: now.saturating_duration_since(at),
                });
                self.state = State::Done;
            }
            _ => self.drops.unexpected += 1,
        }
    }

    fn ping_peer(&mut self, now: Instant, via: SocketAddr) {
        if self.pings.len() >= MAX_PINGS {
            return;
        }
        let tx_id = TxId::random();
        self.pings.push((tx_id, now));
        let ping = Message::Ping(Ping {
            tx_id,
            node_key: Some(self.node_key),
            padding: 0,
        });
        self.send_data(via, &ping);
    }

    fn bind_body(&self, challenge: [u8; 32]) -> BindBody {
        BindBody {
            vni: self.endpoint.vni,
            generation: self.generation,
            remote_key: self.peer_disco,
            challenge,
        }
    }

    /// Geneve C=1 + a disco frame sealed to the relay.
    fn send_control(&mut self, to: SocketAddr, msg: &Message) {
        let sealed = disco::seal_with(&self.server_box, &self.my_disco, msg);
        self.push(to, true, &sealed);
    }

    /// Geneve C=0 + a disco frame sealed to the peer (forwarded by the relay unchanged).
    fn send_data(&mut self, to: SocketAddr, msg: &Message) {
        let sealed = disco::seal_with(&self.peer_box, &self.my_disco, msg);
        self.push(to, false, &sealed);
    }

    fn push(&mut self, to: SocketAddr, control: bool, sealed: &[u8]) {
        let header = Header {
            version: 0,
            protocol: PROTOCOL_DISCO,
            control,
            vni: Vni::new(self.endpoint.vni),
        };
        // The VNI was checked at start, so the header always encodes.
        let Ok(bytes) = header.to_bytes() else {
            return;
        };
        let mut packet = Vec::with_capacity(bytes.len() + sealed.len());
        packet.extend_from_slice(&bytes);
        packet.extend_from_slice(sealed);
        self.out.push_back(Transmit { to, packet });
    }

    /// How long the handshake has run.
    pub fn age(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.started)
    }
}

/// When an unanswered allocation request is sent again (Go `udprelay.ServerRetryAfter`).
pub const ALLOC_RETRY_AFTER: Duration = Duration::from_secs(3);
/// When an unanswered allocation is given up (Go `allocateUDPRelayEndpointRequestTimeout`).
pub const ALLOC_TIMEOUT: Duration = Duration::from_secs(10);

/// One allocation request to one relay node for us and one peer.
#[derive(Debug, Clone)]
pub struct Allocation {
    relay: NodePublic,
    request: disco::AllocateRequest,
    started: Instant,
    next_send: Option<Instant>,
}

/// What an allocation wants done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllocStep {
    /// Send this request over DERP to the relay node (as `AllocateUdpRelayEndpointRequest`).
    Send {
        relay: NodePublic,
        request: disco::AllocateRequest,
    },
    /// Nothing came back within [`ALLOC_TIMEOUT`].
    GaveUp,
}

impl Allocation {
    /// An allocation for the pair (`me`, `peer`), sorted as Go sends it; the first request is due
    /// at once.
    pub fn new(
        now: Instant,
        relay: NodePublic,
        me: DiscoPublic,
        peer: DiscoPublic,
        generation: u32,
    ) -> Allocation {
        let mut pair = [me, peer];
        pair.sort();
        Allocation {
            relay,
            request: disco::AllocateRequest {
                client_disco: pair,
                generation,
            },
            started: now,
            next_send: Some(now),
        }
    }

    /// The relay node asked.
    pub fn relay(&self) -> NodePublic {
        self.relay
    }

    /// What is due at `now`: the request (at start and once more after 3 s), or giving up.
    pub fn poll(&mut self, now: Instant) -> Option<AllocStep> {
        if now.saturating_duration_since(self.started) >= ALLOC_TIMEOUT {
            self.next_send = None;
            return Some(AllocStep::GaveUp);
        }
        let due = self.next_send.filter(|t| *t <= now)?;
        let retry = self.started + ALLOC_RETRY_AFTER;
        self.next_send = (due < retry).then_some(retry);
        Some(AllocStep::Send {
            relay: self.relay,
            request: self.request.clone(),
        })
    }

    /// When [`Allocation::poll`] has something to do next.
    pub fn next_deadline(&self) -> Instant {
        self.next_send
            .unwrap_or(self.started + ALLOC_TIMEOUT)
            .min(self.started + ALLOC_TIMEOUT)
    }

    /// The endpoint, if `response` (which came over DERP from node `from`) answers this request:
    /// the same relay, generation and pair, and at least one address.
    pub fn accept(
        &self,
        from: &NodePublic,
        response: &disco::AllocateResponse,
    ) -> Option<UdpRelayEndpoint> {
        let mut pair = response.endpoint.client_disco;
        pair.sort();
        let ours = *from == self.relay
            && response.generation == self.request.generation
            && pair == self.request.client_disco
            && !response.endpoint.addr_ports.is_empty();
        ours.then(|| response.endpoint.clone())
    }
}

#[cfg(test)]
mod tests;
