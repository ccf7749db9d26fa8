//! Using peer relays: the candidate relay servers from the `relay-target` grants, the path
//! machines' requests for relay discovery and the relay messages they pass on
//! (CallMeMaybeVia, allocation responses) into `relay::manager`, its steps out (DERP messages,
//! Geneve datagrams, paths ready or failed), and the Geneve data path in both directions.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Instant;

use super::sockets::UdpSockets;
use super::Engine;
use crate::disco::{AllocateResponse, UdpRelayEndpoint};
use crate::keys::NodePublic;
use crate::netmap::NetworkMap;
use crate::paths::RelayAddr;
use crate::relay::geneve::{self, Header, Vni};
use crate::relay::manager::{Handled, Step};
use crate::relay::{relay_client_allowed, CAP_RELAY_TARGET, MIN_RELAY_CAP_VERSION};

impl Engine {
    /// Recomputes which peers may serve us as relays (Go `updateRelayServersSet`): capability
    /// version ≥ 121, a disco key, and `relay-target` granted from them to us; none at all while
    /// our node attributes turn the relay client off (`disable-relay-client`, `only-tcp-443`).
    pub(super) fn update_relay_candidates(&mut self, map: &NetworkMap) {
        let allowed = relay_client_allowed(map.self_node.as_ref());
        // Before the first netmap it counts as on: only "off", and later changes, are news.
        if self.relay_client_allowed.replace(allowed).unwrap_or(true) != allowed {
            tracing::info!(
                "relay: peer relay client {} (node attributes disable-relay-client, only-tcp-443)",
                if allowed { "on again" } else { "off" }
            );
        }
        let candidates: BTreeSet<NodePublic> = if allowed {
            map.peers
                .values()
                .filter(|node| node.cap >= MIN_RELAY_CAP_VERSION && !node.disco_key.is_zero())
                .map(|node| node.key)
                .filter(|key| self.peer_has_cap(key, CAP_RELAY_TARGET))
                .collect()
        } else {
            BTreeSet::new()
        };
        if &candidates != self.relay_client.candidates() {
            tracing::debug!(count = candidates.len(), "relay: candidate relay servers");
        }
        let known: BTreeSet<NodePublic> = map.peers.values().map(|n| n.key).collect();
        self.relay_client.retain_peers(|peer| known.contains(peer));
        self.relay_client.set_candidates(candidates.clone());
        let now = Instant::now();
        self.paths.set_relay_client_disabled(now, !allowed);
        self.paths.set_relay_candidates(now, candidates);
    }

    /// A path machine wants relay paths to `peer`: allocate on every candidate.
    pub(super) fn discover_relays(&mut self, peer: NodePublic) {
        let Some(disco) = self.paths.peer(&peer).map(|p| p.info().disco_key) else {
            return;
        };
        self.relay_client.discover(Instant::now(), peer, disco);
    }

    /// `peer` allocated an endpoint for us both: bind it too (if it may use relays at all).
    pub(super) fn on_call_me_maybe_via(&mut self, peer: NodePublic, endpoint: UdpRelayEndpoint) {
        if self.relay_client_allowed != Some(true) {
            // As Go, logged each time: a peer keeps allocating for us every 30 s or so.
            tracing::info!(%peer, "relay: call-me-maybe-via ignored: disable-relay-client is set");
            return;
        }
        let Some(machine) = self.paths.peer(&peer) else {
            return;
        };
        if !machine.info().relay_capable {
            tracing::debug!(%peer, "relay: call-me-maybe-via from a peer below capability 121 ignored");
            return;
        }
        let now = Instant::now();
        let disco = machine.info().disco_key;
        let current = machine
            .relay_path()
            .map(|r| (r.server_disco, machine.relay_trusted(now)));
        self.relay_client
            .on_call_me_maybe_via(now, peer, disco, endpoint, current);
    }

    /// Relay node `from` answered an allocation.
    pub(super) fn on_relay_alloc_response(
        &mut self,
        from: NodePublic,
        response: &AllocateResponse,
    ) {
        let now = Instant::now();
        let paths = &self.paths;
        self.relay_client
            .on_alloc_response(now, from, response, |peer| {
                let machine = paths.peer(peer)?;
                let relay = machine.relay_path()?;
                Some((relay.server_disco, machine.relay_trusted(now)))
            });
    }

    /// Carries out what the relay manager wants; true when it wanted anything.
    pub(super) fn run_relay_steps(&mut self, udp: &UdpSockets) -> bool {
        let mut any = false;
        while let Some(step) = self.relay_client.poll() {
            any = true;
            match step {
                Step::Derp { to, msg } => {
                    if !self.paths.send_via_derp(&to, msg) {
                        tracing::debug!(node = %to, "relay: no DERP region to reach the node on");
                    }
                }
                Step::Udp(t) => self.send_udp(udp, t.to, &t.packet),
                Step::Ready { peer, path } => {
                    let installed = self.paths.relay_ready(Instant::now(), &peer, path);
                    tracing::info!(%peer, relay = %path.addr, latency = ?path.latency, installed, "relay: handshake done");
                }
                Step::Failed { peer, reason } => {
                    tracing::debug!(%peer, %reason, "relay: no relay path");
                    self.paths.relay_failed(Instant::now(), &peer, reason);
                }
            }
        }
        any
    }

    /// Geneve with disco inside from `from`: the relay manager's handshakes first, else a peer's
    /// disco through the relay (pings always answered, heartbeat pongs).
    pub(super) fn relayed_disco(
        &mut self,
        from: SocketAddr,
        header: Header,
        datagram: &[u8],
        packet: &[u8],
    ) {
        let now = Instant::now();
        if self.relay_client.handle_geneve(now, from, datagram) == Handled::NotMine {
            let relay = RelayAddr {
                via: from,
                vni: header.vni.get(),
            };
            let _ = self.paths.handle_relay(now, relay, packet);
        }
    }

    /// WireGuard through a relay: the peer that bound this endpoint, else WireGuard's own
    /// index or static key (a peer whose relay path we have not installed yet).
    pub(super) fn relayed_wireguard(
        &mut self,
        now: Instant,
        from: SocketAddr,
        header: Header,
        packet: &[u8],
    ) -> Option<usize> {
        let relay = RelayAddr {
            via: from,
            vni: header.vni.get(),
        };
        let by_relay = self
            .paths
            .peer_for_relay(&relay)
            .and_then(|k| self.peers.id_of(&k));
        let Some(id) = by_relay.or_else(|| self.peers.identify(packet)) else {
            self.drops.relay_unknown_peer += 1;
            return None;
        };
        self.path_io
            .count_in(crate::metrics::PathKind::relay(&from), packet.len());
        self.decapsulate(now, id, packet)
    }

    /// One datagram through a relay endpoint: Geneve (not control) with `protocol`, then
    /// `payload`.
    pub(super) fn send_relayed(
        &mut self,
        udp: &UdpSockets,
        relay: RelayAddr,
        protocol: u16,
        payload: &[u8],
    ) {
        let header = Header {
            version: 0,
            protocol,
            control: false,
            vni: Vni::new(relay.vni),
        };
        let Ok(prefix) = header.to_bytes() else {
            return; // a VNI from a path the handshake checked always encodes
        };
        self.send_udp_parts(udp, relay.via, &prefix, payload);
    }
}

/// The Geneve protocol of WireGuard inside.
pub(super) const WIREGUARD: u16 = geneve::PROTOCOL_WIREGUARD;
/// The Geneve protocol of disco inside.
pub(super) const DISCO: u16 = geneve::PROTOCOL_DISCO;
