//! Packets through WireGuard: TUN → encapsulate → the peer's send plan, and UDP or DERP in →
//! demux → decapsulate → filter → TUN; handshake retries and greeting peers that reached us
//! before our netmap had them.

use crate::metrics::PathKind;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::derp::choose_region;
use super::sockets::UdpSockets;
use super::Engine;
use crate::demux::Inbound;
use crate::filter::Verdict;
use crate::keys::NodePublic;
use crate::netcheck::StunResponse;
use crate::packet::PacketSummary;
use crate::paths::{self, Dest, SendPlan};
use crate::udp;
use crate::wg::{PeerId, WgOutput};

/// Early handshake retransmissions after a DERP "peer gone": 0.5 s, then doubling, 3 at most.
pub(super) const HANDSHAKE_RETRY_FIRST: Duration = Duration::from_millis(500);

pub(super) const HANDSHAKE_RETRIES: u32 = 3;

/// How long a packet from a not-yet-known node key makes us greet it when it joins the netmap.
pub(super) const LATE_PEER_WINDOW: Duration = Duration::from_secs(10);

/// Not-yet-known senders remembered at most.
pub(super) const HEARD_UNKNOWN_MAX: usize = 256;

/// Where the WireGuard datagrams to one peer go for now: its send plan with the DERP region
/// chosen (see [`Engine::plan_for`]).
#[derive(Debug, Clone, Copy)]
pub(super) struct FrameRoute {
    id: PeerId,
    key: NodePublic,
    plan: SendPlan,
    /// `None` when the plan has no DERP leg; else the region chosen for it (`Some(None)`: none
    /// to use, counted as a `no_derp` drop).
    derp_region: Option<Option<u16>>,
}

impl Engine {
    /// A packet from the TUN at `now`: route, encrypt, queue for its peer's path.
    pub(super) fn outbound(&mut self, udp: &UdpSockets, now: Instant, packet: &[u8]) {
        self.outbound_in_frame(udp, now, packet, &mut None);
    }

    /// Like [`Self::outbound`] for one of the packets cut from a TUN frame. They share one flow
    /// and one clock reading, so the route, filter note and send plan of the first (kept in
    /// `route`) hold for the rest: those are only encrypted and sent.
    pub(super) fn outbound_in_frame(
        &mut self,
        udp: &UdpSockets,
        now: Instant,
        packet: &[u8],
        route: &mut Option<FrameRoute>,
    ) {
        if let Some(known) = *route {
            let out = self
                .peers
                .encapsulate_for(now, known.id, packet, &mut self.out);
            self.send_encapsulated(out, |engine, datagram| {
                engine.send_planned(udp, now, &known, datagram);
            });
            return;
        }
        if crate::netstack::to_quad_100(packet) {
            if let Some(quad100) = &mut self.quad100 {
                quad100.divert(packet);
                return;
            }
        }
        if let (Ok(summary), Some(filter)) = (PacketSummary::parse(packet), &mut self.filter) {
            filter.note_outbound(&summary);
        }
        let (id, out) = self.peers.encapsulate(now, packet, &mut self.out);
        let Some(id) = id else {
            if let WgOutput::Dropped(reason) = out {
                tracing::trace!(?reason, "outbound packet dropped");
            }
            return;
        };
        self.send_encapsulated(out, |engine, datagram| {
            *route = engine.plan_for(now, id);
            if let Some(planned) = route {
                engine.send_planned(udp, now, planned, datagram);
            }
        });
    }

    /// What encapsulation gave: a datagram in `self.out` is handed to `send` straight from the
    /// output buffer (no copy on the direct path); a drop is logged.
    fn send_encapsulated(&mut self, out: WgOutput, send: impl FnOnce(&mut Self, &[u8])) {
        match out {
            WgOutput::ToNetwork(n) => {
                let buffer = std::mem::take(&mut self.out);
                if let Some(datagram) = buffer.get(..n) {
                    send(self, datagram);
                }
                self.out = buffer;
            }
            WgOutput::Dropped(reason) => {
                tracing::trace!(?reason, "outbound packet dropped");
            }
            _ => {}
        }
    }

    /// A packet from DERP: disco to the path machines; WireGuard decrypted for the sending
    /// peer, filtered, and handed back for the TUN. `sender` is the last WireGuard sender of
    /// this burst from `region` and its peer id: looked up and noted once, not per packet.
    pub(super) fn inbound_derp(
        &mut self,
        now: Instant,
        region: u16,
        src: NodePublic,
        packet: &[u8],
        sender: &mut Option<(NodePublic, PeerId)>,
    ) -> Option<usize> {
        if let Inbound::Disco { packet, .. } = crate::demux::classify_derp(packet) {
            let handled = self.paths.handle_derp(now, region, src, packet);
            if handled == Err(paths::DiscoDrop::UnknownSender) {
                self.note_unknown(src);
            }
            return None;
        }
        let id = match *sender {
            Some((key, id)) if key == src => id,
            _ => {
                let Some(id) = self.peers.id_of(&src) else {
                    self.drops.unknown_sender += 1;
                    self.note_unknown(src);
                    return None;
                };
                self.last_region.insert(id, region);
                *sender = Some((src, id));
                id
            }
        };
        self.path_io.count_in(PathKind::Derp, packet.len());
        self.decapsulate(now, id, packet)
    }

    /// A UDP datagram: STUN to the netcheck task, disco to the path machines, WireGuard to its
    /// peer (by the address disco learned, else by WireGuard's own index or static key).
    pub(super) fn udp_datagram(
        &mut self,
        now: Instant,
        datagram: &[u8],
        from: SocketAddr,
    ) -> Option<usize> {
        let from = udp::unmap_v4(from);
        match crate::demux::classify_udp(datagram) {
            Inbound::Stun(bytes) => {
                self.stun_datagram(bytes, from);
                None
            }
            Inbound::Disco {
                geneve: None,
                packet,
            } => {
                let _ = self.paths.handle_udp(now, from, packet);
                None
            }
            Inbound::WireGuard {
                geneve: None,
                packet,
            } => {
                let by_addr = self
                    .paths
                    .peer_for_addr(&from)
                    .and_then(|k| self.peers.id_of(&k));
                let Some(id) = by_addr.or_else(|| self.peers.identify(packet)) else {
                    self.drops.udp_unknown_peer += 1;
                    if let Some(key) = self.peers.initiator_key(packet) {
                        self.note_unknown(key);
                    }
                    return None;
                };
                self.path_io.count_in(PathKind::direct(&from), packet.len());
                self.decapsulate(now, id, packet)
            }
            Inbound::Disco {
                geneve: Some(header),
                packet,
            } => {
                self.relayed_disco(from, header, datagram, packet);
                None
            }
            Inbound::WireGuard {
                geneve: Some(header),
                packet,
            } => self.relayed_wireguard(now, from, header, packet),
        }
    }

    /// STUN responses go to the netcheck task (which matches them); requests to us are dropped.
    pub(super) fn stun_datagram(&mut self, bytes: &[u8], from: SocketAddr) {
        if crate::demux::is_stun_binding(bytes) && crate::stun::parse_binding_request(bytes).is_ok()
        {
            self.drops.udp += 1;
            return;
        }
        let response = StunResponse {
            from,
            at: Instant::now(),
            bytes: bytes.to_vec(),
        };
        let queued = self
            .stun_tx
            .as_ref()
            .is_some_and(|tx| tx.try_send(response).is_ok());
        if !queued {
            self.drops.stun_unmatched += 1;
        }
    }

    /// Decrypts a WireGuard datagram of peer `id`; handshake answers are queued for sending.
    /// Returns the length of an accepted packet for the TUN, left at the start of `self.out`.
    pub(super) fn decapsulate(&mut self, now: Instant, id: PeerId, packet: &[u8]) -> Option<usize> {
        match self.peers.decapsulate_for(now, id, packet, &mut self.out) {
            WgOutput::ToNetwork(n) => {
                if let Some(bytes) = self.out.get(..n) {
                    self.to_send.push((id, bytes.to_vec()));
                }
                let to_send = &mut self.to_send;
                self.peers
                    .drain(now, id, &mut self.out, |b| to_send.push((id, b.to_vec())));
                None
            }
            WgOutput::ToTunnel(n) => {
                let packet = self.out.get(..n)?;
                let accepted = match (PacketSummary::parse(packet), &self.filter) {
                    (Ok(s), Some(filter)) => {
                        filter.check(&s) == Verdict::Accept || self.is_syn_to_peerapi(&s)
                    }
                    _ => false,
                };
                if accepted {
                    Some(n)
                } else {
                    self.drops.filtered += 1;
                    None
                }
            }
            WgOutput::Dropped(reason) => {
                tracing::trace!(?reason, "inbound packet dropped");
                None
            }
            WgOutput::Done => None,
        }
    }

    /// Remembers that `key`, not (yet) our peer, tried to reach us. Bounded: entries older than
    /// [`LATE_PEER_WINDOW`] go first, and a full map takes no more.
    pub(super) fn note_unknown(&mut self, key: NodePublic) {
        let now = Instant::now();
        if self.heard_unknown.len() >= HEARD_UNKNOWN_MAX {
            self.heard_unknown
                .retain(|_, at| now.saturating_duration_since(*at) < LATE_PEER_WINDOW);
        }
        if self.heard_unknown.len() < HEARD_UNKNOWN_MAX || self.heard_unknown.contains_key(&key) {
            self.heard_unknown.insert(key, now);
        }
    }

    /// The DERP server says `peer` left region `region`.
    /// The server also says this when we sent to a peer that is not connected (yet): a
    /// handshake of ours just got lost, so it is tried again soon (0.5 s, 1 s, 2 s after the
    /// first loss) rather than at WireGuard's 5 s retransmission; a peer that is starting up
    /// is usually on DERP by then.
    pub(super) fn peer_gone(&mut self, region: u16, peer: &NodePublic) {
        let Some(id) = self.peers.id_of(peer) else {
            return;
        };
        if self.last_region.get(&id) == Some(&region) {
            self.last_region.remove(&id);
        }
        let now = Instant::now();
        if self
            .peers
            .session(id)
            .is_some_and(|s| s.is_established(now))
        {
            // Nothing of ours was lost: a later loss gets the full set of early retries again.
            self.handshake_retries.remove(&id);
            return;
        }
        let retry = self.handshake_retries.entry(id).or_default();
        if retry.due.is_none() && retry.tries < HANDSHAKE_RETRIES {
            retry.due = Some(now + HANDSHAKE_RETRY_FIRST * (1 << retry.tries));
        }
    }

    /// Early handshake retransmissions that are due (see [`Self::peer_gone`]).
    pub(super) fn run_handshake_retries(&mut self, now: Instant) {
        let due: Vec<PeerId> = self
            .handshake_retries
            .iter()
            .filter(|(_, r)| r.due.is_some_and(|t| t <= now))
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            if let Some(retry) = self.handshake_retries.get_mut(&id) {
                retry.due = None;
                retry.tries += 1;
            }
            if let WgOutput::ToNetwork(n) = self.peers.retry_handshake_now(now, id, &mut self.out) {
                tracing::debug!(
                    peer = id,
                    "handshake lost on DERP (peer not there yet): sent again"
                );
                if let Some(bytes) = self.out.get(..n) {
                    self.to_send.push((id, bytes.to_vec()));
                }
            } else {
                // Established (or nothing pending): no more early retries.
                self.handshake_retries.remove(&id);
            }
        }
    }

    /// Sends queued WireGuard where each peer's send plan says, then the disco messages the
    /// path machines want out, then handles their events.
    pub(super) fn flush(&mut self, udp: &UdpSockets) {
        let now = Instant::now();
        for (id, packet) in std::mem::take(&mut self.to_send) {
            self.send_wireguard(udp, now, id, &packet);
        }
        // Events and relay steps can queue more disco (allocation answers, CallMeMaybeVia,
        // handshakes), and relay steps more events: a few rounds settle it.
        for _ in 0..4 {
            self.send_disco(udp);
            let mut more = false;
            while let Some(event) = self.paths.poll_event() {
                more = true;
                self.on_path_event(event);
            }
            more |= self.run_relay_steps(udp);
            if !more {
                break;
            }
        }
        self.send_disco(udp);
        self.flush_udp(udp);
    }

    /// The sealed disco messages the path machines want out.
    fn send_disco(&mut self, udp: &UdpSockets) {
        while let Some(out) = self.paths.poll_transmit() {
            match out.dest {
                Dest::Direct(addr) => self.send_udp(udp, addr, &out.packet),
                Dest::Derp(region) => {
                    self.send_derp(Instant::now(), Some(region), out.peer, &out.packet)
                }
                Dest::Relay(relay) => {
                    self.send_relayed(udp, relay, super::relay_client::DISCO, &out.packet)
                }
            }
        }
    }

    /// One WireGuard datagram to peer `id`, where its send plan says (UDP and/or DERP).
    pub(super) fn send_wireguard(
        &mut self,
        udp: &UdpSockets,
        now: Instant,
        id: PeerId,
        datagram: &[u8],
    ) {
        if let Some(planned) = self.plan_for(now, id) {
            self.send_planned(udp, now, &planned, datagram);
        }
    }

    /// Where WireGuard datagrams to peer `id` go now (the path machine's plan, DERP to its home
    /// region without one, the DERP region chosen); `None` for a peer we do not know.
    pub(super) fn plan_for(&mut self, now: Instant, id: PeerId) -> Option<FrameRoute> {
        let info = self.info.get(&id)?;
        let (key, home_derp) = (info.key, info.home_derp);
        let plan = self.paths.on_outgoing(now, &key).unwrap_or(SendPlan {
            udp: None,
            derp: Some(home_derp),
            relay: None,
        });
        let derp_region = plan.derp.map(|region| {
            let heard_on = self.last_region.get(&id).copied();
            let derp = &self.derp;
            choose_region(region, heard_on, self.home, |r| derp.contains_key(&r))
        });
        Some(FrameRoute {
            id,
            key,
            plan,
            derp_region,
        })
    }

    /// Sends one WireGuard datagram the way `planned` says.
    pub(super) fn send_planned(
        &mut self,
        udp: &UdpSockets,
        now: Instant,
        planned: &FrameRoute,
        datagram: &[u8],
    ) {
        let plan = planned.plan;
        if let Some(addr) = plan.udp {
            self.path_io
                .count_out(PathKind::direct(&addr), datagram.len());
            self.send_udp(udp, addr, datagram);
        }
        if let Some(relay) = plan.relay {
            self.path_io
                .count_out(PathKind::relay(&relay.via), datagram.len());
            self.send_relayed(udp, relay, super::relay_client::WIREGUARD, datagram);
        }
        if let Some(region) = planned.derp_region {
            self.path_io.count_out(PathKind::Derp, datagram.len());
            self.send_derp(now, region, planned.key, datagram);
        }
    }

    /// A peer that just joined our netmap: if it tried to reach us shortly before, start the
    /// WireGuard handshake now (its own retry would come only after 5 s).
    pub(super) fn greet_late_peer(&mut self, id: PeerId, key: NodePublic) {
        let Some(at) = self.heard_unknown.remove(&key) else {
            return;
        };
        let now = Instant::now();
        if now.saturating_duration_since(at) > LATE_PEER_WINDOW {
            return;
        }
        if let WgOutput::ToNetwork(n) = self.peers.initiate_handshake(now, id, &mut self.out) {
            tracing::debug!(peer = %key, "peer tried to reach us before our netmap had it: handshaking now");
            if let Some(bytes) = self.out.get(..n) {
                self.to_send.push((id, bytes.to_vec()));
            }
        }
    }
}
