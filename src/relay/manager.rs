//! The relay client's work list (Go `relayManager`), sans-IO: allocations on candidate relay
//! servers, CallMeMaybeVia to the peer for endpoints we allocated, and one bind handshake per
//! (peer, relay server) for endpoints from either side. The driver hands it allocation
//! responses, CallMeMaybeVia messages and Geneve datagrams, and takes [`Step`]s out: disco
//! messages for DERP (the path machines seal them), Geneve datagrams for the UDP socket, and
//! the outcome of each attempt.
//!
//! Dedup follows Go: one allocation per (relay node, peer) at a time; a handshake for the same
//! (peer, relay server) is kept unless the new endpoint has a higher LamportID; an endpoint on
//! the relay server the peer already uses (trusted) is not bound again.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::Instant;

use super::client::{AllocStep, Allocation, Boxes, Handshake, Outcome, Transmit};
use super::geneve;
use crate::disco::{self, AllocateResponse, Message, UdpRelayEndpoint};
use crate::keys::{DiscoPrivate, DiscoPublic, NodePublic};
use crate::naclbox::SharedBox;
use crate::paths::{RelayAddr, RelayPath, RelayReason};

/// What the driver must do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Send this disco message over DERP to node `to` (sealed to its disco key).
    Derp { to: NodePublic, msg: Message },
    /// Send this Geneve datagram on the node's UDP socket.
    Udp(Transmit),
    /// A handshake with `peer` ended with a pong through the relay.
    Ready { peer: NodePublic, path: RelayPath },
    /// Every attempt for `peer` ended without a path.
    Failed {
        peer: NodePublic,
        reason: RelayReason,
    },
}

/// Inputs the manager dropped, by cause.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ManagerDrops {
    /// An allocation response that answers nothing we asked (wrong node, generation or pair).
    pub unsolicited_response: u64,
    /// Geneve control (from a relay server) for no handshake of ours.
    pub unknown_control: u64,
    /// Geneve that does not parse, or a disco frame inside that does not.
    pub malformed: u64,
}

#[derive(Clone)]
struct AllocWork {
    peer: NodePublic,
    peer_disco: DiscoPublic,
    alloc: Allocation,
}

#[derive(Clone)]
struct BindWork {
    peer: NodePublic,
    relay_node: Option<NodePublic>,
    handshake: Handshake,
}

/// Whether a Geneve datagram was the manager's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    /// Consumed (or dropped and counted).
    Consumed,
    /// Disco from a peer through a relay, for no running handshake: the path machines' (an
    /// always-answered ping, a heartbeat pong).
    NotMine,
}

/// Shared keys kept at most (relay servers and peers we handshake with); a full cache starts
/// over, which only costs recomputing.
const MAX_BOXES: usize = 1024;

/// The relay client's allocations and handshakes.
#[derive(Clone)]
pub struct RelayManager {
    disco: DiscoPrivate,
    disco_public: DiscoPublic,
    node_key: NodePublic,
    candidates: BTreeSet<NodePublic>,
    allocs: Vec<AllocWork>,
    binds: Vec<BindWork>,
    alloc_gen: u32,
    bind_gen: u32,
    steps: VecDeque<Step>,
    drops: ManagerDrops,
    /// Which node runs each relay server we got an allocation from (server disco → node), so
    /// an endpoint the peer sent names its relay node too. Only candidates' entries are kept.
    servers: BTreeMap<DiscoPublic, NodePublic>,
    /// Our shared key with each relay server and peer disco key (Go precomputes them too).
    boxes: HashMap<DiscoPublic, SharedBox>,
}

impl RelayManager {
    pub fn new(disco: DiscoPrivate, node_key: NodePublic) -> RelayManager {
        RelayManager {
            disco_public: disco.public(),
            disco,
            node_key,
            candidates: BTreeSet::new(),
            allocs: Vec::new(),
            binds: Vec::new(),
            alloc_gen: 0,
            bind_gen: 0,
            steps: VecDeque::new(),
            drops: ManagerDrops::default(),
            servers: BTreeMap::new(),
            boxes: HashMap::new(),
        }
    }

    /// Our node key (sent in relayed pings) after control renewed it.
    pub fn set_node_key(&mut self, key: NodePublic) {
        self.node_key = key;
    }

    /// The nodes that may serve us as relays (`relay-target` grants, capability ≥ 121).
    pub fn set_candidates(&mut self, candidates: BTreeSet<NodePublic>) {
        self.servers.retain(|_, node| candidates.contains(node));
        self.candidates = candidates;
    }

    /// Computes the shared keys with `keys` ahead of their first handshake.
    pub fn prime(&mut self, keys: &[DiscoPublic]) {
        for key in keys {
            let _ = self.shared_box(key);
        }
    }

    fn shared_box(&mut self, key: &DiscoPublic) -> SharedBox {
        if let Some(shared) = self.boxes.get(key) {
            return shared.clone();
        }
        if self.boxes.len() >= MAX_BOXES {
            self.boxes.clear();
        }
        let shared = disco::shared_box(&self.disco, key);
        self.boxes.insert(*key, shared.clone());
        shared
    }

    /// The node that runs relay server `server`, if one of our allocations told us.
    pub fn relay_node_of(&self, server: &DiscoPublic) -> Option<NodePublic> {
        self.servers.get(server).copied()
    }

    pub fn candidates(&self) -> &BTreeSet<NodePublic> {
        &self.candidates
    }

    pub fn drops(&self) -> ManagerDrops {
        self.drops
    }

    /// Handshakes and allocations running now.
    pub fn pending(&self) -> (usize, usize) {
        (self.allocs.len(), self.binds.len())
    }

    /// Relay discovery for `peer`: one allocation on every candidate but the peer itself.
    pub fn discover(&mut self, now: Instant, peer: NodePublic, peer_disco: DiscoPublic) {
        let relays: Vec<NodePublic> = self
            .candidates
            .iter()
            .filter(|relay| **relay != peer)
            .filter(|relay| {
                !self
                    .allocs
                    .iter()
                    .any(|w| w.peer == peer && w.alloc.relay() == **relay)
            })
            .copied()
            .collect();
        for relay in relays {
            self.alloc_gen = self.alloc_gen.wrapping_add(1).max(1);
            let alloc = Allocation::new(now, relay, self.disco_public, peer_disco, self.alloc_gen);
            self.allocs.push(AllocWork {
                peer,
                peer_disco,
                alloc,
            });
        }
        self.handle_timeout(now);
    }

    /// An allocation response that came over DERP from node `from`. `current` tells, for a
    /// peer, the relay server its path uses and whether that path is trusted.
    pub fn on_alloc_response(
        &mut self,
        now: Instant,
        from: NodePublic,
        response: &AllocateResponse,
        current: impl Fn(&NodePublic) -> Option<(DiscoPublic, bool)>,
    ) {
        let found = self
            .allocs
            .iter()
            .position(|w| w.alloc.accept(&from, response).is_some());
        let Some(index) = found else {
            self.drops.unsolicited_response += 1;
            tracing::debug!(relay = %from, "relay: allocation response that answers nothing of ours dropped");
            return;
        };
        let work = self.allocs.remove(index);
        let endpoint = response.endpoint.clone();
        self.servers.insert(endpoint.server_disco, from);
        tracing::debug!(relay = %from, peer = %work.peer, vni = endpoint.vni, "relay: endpoint allocated");
        self.steps.push_back(Step::Derp {
            to: work.peer,
            msg: Message::CallMeMaybeVia(endpoint.clone()),
        });
        let now_using = current(&work.peer);
        self.new_endpoint(
            now,
            work.peer,
            work.peer_disco,
            endpoint,
            Some(from),
            now_using,
        );
    }

    /// The peer allocated an endpoint for us both and sent it in a CallMeMaybeVia.
    pub fn on_call_me_maybe_via(
        &mut self,
        now: Instant,
        peer: NodePublic,
        peer_disco: DiscoPublic,
        endpoint: UdpRelayEndpoint,
        current: Option<(DiscoPublic, bool)>,
    ) {
        self.new_endpoint(now, peer, peer_disco, endpoint, None, current);
    }

    /// Go `handleNewServerEndpointRunLoop`: dedup by LamportID, skip the relay in use, else bind.
    fn new_endpoint(
        &mut self,
        now: Instant,
        peer: NodePublic,
        peer_disco: DiscoPublic,
        endpoint: UdpRelayEndpoint,
        relay_node: Option<NodePublic>,
        current: Option<(DiscoPublic, bool)>,
    ) {
        // An endpoint nobody can bind (no address, bad VNI) must not cancel one that may work.
        if endpoint.addr_ports.is_empty() || !(1..=geneve::VNI_MAX).contains(&endpoint.vni) {
            tracing::debug!(%peer, vni = endpoint.vni, "relay: endpoint not usable (no address or bad VNI)");
            return;
        }
        let same = self.binds.iter().position(|w| {
            w.peer == peer && w.handshake.endpoint().server_disco == endpoint.server_disco
        });
        if let Some(index) = same {
            if self.binds[index].handshake.endpoint().lamport_id >= endpoint.lamport_id {
                return;
            }
            self.binds.remove(index);
        }
        if current == Some((endpoint.server_disco, true)) {
            tracing::trace!(%peer, "relay: endpoint on the relay in use; not binding again");
            return;
        }
        self.bind_gen = self.bind_gen.wrapping_add(1).max(1);
        let boxes = Boxes {
            mine: self.disco_public,
            server: self.shared_box(&endpoint.server_disco),
            peer: self.shared_box(&peer_disco),
        };
        match Handshake::start_with(
            now,
            boxes,
            self.node_key,
            peer_disco,
            endpoint,
            self.bind_gen,
        ) {
            Ok(handshake) => {
                self.binds.push(BindWork {
                    peer,
                    relay_node,
                    handshake,
                });
                self.collect(now);
            }
            Err(e) => tracing::debug!(%peer, error = %e, "relay: endpoint not usable"),
        }
    }

    /// A Geneve datagram (disco inside) from `from` on our UDP socket.
    pub fn handle_geneve(&mut self, now: Instant, from: SocketAddr, datagram: &[u8]) -> Handled {
        let parsed = geneve::parse(datagram).ok().and_then(|header| {
            let inner = datagram.get(geneve::HEADER_LEN..)?;
            let frame = disco::parse_packet(inner).ok()?;
            Some((header, frame.sender))
        });
        let Some((header, sender)) = parsed else {
            self.drops.malformed += 1;
            return Handled::Consumed;
        };
        let vni = header.vni.get();
        let work = self.binds.iter_mut().find(|w| {
            let endpoint = w.handshake.endpoint();
            let expected = if header.control {
                endpoint.server_disco
            } else {
                w.handshake.peer_disco()
            };
            endpoint.vni == vni && expected == sender
        });
        match (work, header.control) {
            (Some(work), _) => {
                work.handshake.handle_packet(now, from, datagram);
                self.collect(now);
                Handled::Consumed
            }
            (None, true) => {
                self.drops.unknown_control += 1;
                Handled::Consumed
            }
            (None, false) => Handled::NotMine,
        }
    }

    /// When [`RelayManager::handle_timeout`] is next due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let allocs = self.allocs.iter().map(|w| w.alloc.next_deadline());
        let binds = self.binds.iter().filter_map(|w| w.handshake.poll_timeout());
        allocs.chain(binds).min()
    }

    /// Retransmits and gives up allocations, times out handshakes.
    pub fn handle_timeout(&mut self, now: Instant) {
        let mut gave_up = Vec::new();
        let steps = &mut self.steps;
        self.allocs.retain_mut(|w| {
            while let Some(step) = w.alloc.poll(now) {
                match step {
                    AllocStep::Send { relay, request } => steps.push_back(Step::Derp {
                        to: relay,
                        msg: Message::AllocateUdpRelayEndpointRequest(request),
                    }),
                    AllocStep::GaveUp => {
                        tracing::debug!(relay = %w.alloc.relay(), peer = %w.peer, "relay: allocation not answered");
                        gave_up.push(w.peer);
                        return false;
                    }
                }
            }
            true
        });
        for peer in gave_up {
            self.fail_if_idle(peer, RelayReason::AllocationFailed);
        }
        for work in &mut self.binds {
            work.handshake.handle_timeout(now);
        }
        self.collect(now);
    }

    /// The next thing to do.
    pub fn poll(&mut self) -> Option<Step> {
        self.steps.pop_front()
    }

    /// Drops the work of peers that left the netmap.
    pub fn retain_peers(&mut self, keep: impl Fn(&NodePublic) -> bool) {
        self.allocs.retain(|w| keep(&w.peer));
        self.binds.retain(|w| keep(&w.peer));
    }

    /// Moves handshake output to the steps; finished handshakes leave.
    fn collect(&mut self, _now: Instant) {
        let mut failed = BTreeSet::new();
        let steps = &mut self.steps;
        self.binds.retain_mut(|w| {
            while let Some(t) = w.handshake.poll_transmit() {
                steps.push_back(Step::Udp(t));
            }
            match w.handshake.outcome() {
                None => true,
                Some(Outcome::Bound { via, vni, latency }) => {
                    let path = RelayPath {
                        addr: RelayAddr {
                            via: *via,
                            vni: *vni,
                        },
                        server_disco: w.handshake.endpoint().server_disco,
                        relay_node: w.relay_node,
                        latency: *latency,
                    };
                    steps.push_back(Step::Ready { peer: w.peer, path });
                    false
                }
                Some(Outcome::TimedOut) => {
                    tracing::debug!(peer = %w.peer, vni = w.handshake.endpoint().vni, "relay: bind handshake timed out");
                    failed.insert(w.peer);
                    false
                }
            }
        });
        for peer in failed {
            self.fail_if_idle(peer, RelayReason::BindTimeout);
        }
    }

    /// Reports a failure for `peer` once nothing else for it is still running.
    fn fail_if_idle(&mut self, peer: NodePublic, reason: RelayReason) {
        let busy =
            self.allocs.iter().any(|w| w.peer == peer) || self.binds.iter().any(|w| w.peer == peer);
        if !busy {
            self.steps.push_back(Step::Failed { peer, reason });
        }
    }
}

#[cfg(test)]
mod tests;
