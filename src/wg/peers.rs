//! [`WgPeers`]: node key → session, inbound peer identification, outbound AllowedIPs routing.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn};
use boringtun::x25519::{PublicKey, StaticSecret};
use ipnet::IpNet;

use super::{min_deadline, AllowedIps, BoringSession, DropReason, WgError, WgOutput, WgSession};
use crate::keys::{NodePrivate, NodePublic};

/// Index of a peer in the table; also the upper 24 bits of its WireGuard receiver indices.
pub type PeerId = u32;

/// Handshakes per second accepted before cookies are demanded (boringtun's device default).
const HANDSHAKE_RATE_LIMIT: u64 = 100;
/// Receiver indices carry the peer id in 24 bits.
const MAX_PEERS: usize = 1 << 24;

struct Peer {
    key: NodePublic,
    session: Box<dyn WgSession>,
    allowed: AllowedIps<()>,
    /// The deadline this peer has in the timer heap (entries that differ are stale).
    scheduled: Option<Instant>,
}

/// All WireGuard peers of this node.
pub struct WgPeers {
    secret: StaticSecret,
    public: PublicKey,
    local: NodePrivate,
    rate_limiter: Arc<RateLimiter>,
    slots: Vec<Option<Peer>>,
    free: Vec<PeerId>,
    by_key: HashMap<NodePublic, PeerId>,
    routes: AllowedIps<PeerId>,
    /// The shared rate limiter's counter is reset once a second while handshakes arrive.
    limiter_reset_at: Option<Instant>,
    /// Peers' timer deadlines, earliest first; stale entries are skipped when popped. Keeps
    /// `next_deadline` O(log n) instead of a scan of every peer per packet.
    timers: BinaryHeap<Reverse<(Instant, PeerId)>>,
    /// Peers handed out by `session_mut` whose deadline may have changed.
    dirty: Vec<PeerId>,
}

impl WgPeers {
    /// An empty table for the node key `local`.
    pub fn new(local: NodePrivate) -> Self {
        let secret = StaticSecret::from(*local.as_bytes());
        let public = PublicKey::from(&secret);
        Self {
            rate_limiter: Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT)),
            secret,
            public,
            local,
            slots: Vec::new(),
            free: Vec::new(),
            by_key: HashMap::new(),
            routes: AllowedIps::new(),
            limiter_reset_at: None,
            timers: BinaryHeap::new(),
            dirty: Vec::new(),
        }
    }

    /// Adds a peer, or updates an existing peer's AllowedIPs (keeping its session).
    pub fn upsert(&mut self, key: NodePublic, allowed_ips: &[IpNet]) -> Result<PeerId, WgError> {
        if key.is_zero() {
            return Err(WgError::ZeroKey);
        }
        let id = match self.by_key.get(&key) {
            Some(&id) => id,
            None => self.insert_new(key)?,
        };
        self.routes.remove_value(&id);
        let mut allowed = AllowedIps::new();
        for net in allowed_ips {
            self.routes.insert(*net, id);
            allowed.insert(*net, ());
        }
        if let Some(Some(peer)) = self.slots.get_mut(id as usize) {
            peer.allowed = allowed;
        }
        Ok(id)
    }

    fn insert_new(&mut self, key: NodePublic) -> Result<PeerId, WgError> {
        let id = match self.free.pop() {
            Some(id) => id,
            None if self.slots.len() < MAX_PEERS => {
                self.slots.push(None);
                (self.slots.len() - 1) as PeerId
            }
            None => return Err(WgError::TableFull),
        };
        let session = BoringSession::new(&self.local, &key, id, Some(self.rate_limiter.clone()));
        if let Some(slot) = self.slots.get_mut(id as usize) {
            *slot = Some(Peer {
                key,
                session: Box::new(session),
                allowed: AllowedIps::new(),
                scheduled: None,
            });
        }
        self.by_key.insert(key, id);
        Ok(id)
    }

    /// Removes a peer and its routes.
    pub fn remove(&mut self, key: &NodePublic) {
        if let Some(id) = self.by_key.remove(key) {
            self.routes.remove_value(&id);
            if let Some(slot) = self.slots.get_mut(id as usize) {
                *slot = None;
                self.free.push(id);
            }
        }
    }

    /// Number of peers.
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    /// Whether the table has no peers.
    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// The id of the peer with node key `key`.
    pub fn id_of(&self, key: &NodePublic) -> Option<PeerId> {
        self.by_key.get(key).copied()
    }

    /// The node key of peer `id`.
    pub fn key_of(&self, id: PeerId) -> Option<&NodePublic> {
        self.peer(id).map(|p| &p.key)
    }

    /// The session of peer `id`.
    pub fn session(&self, id: PeerId) -> Option<&dyn WgSession> {
        self.peer(id).map(|p| p.session.as_ref())
    }

    /// The session of peer `id`, mutably.
    pub fn session_mut(&mut self, id: PeerId) -> Option<&mut (dyn WgSession + 'static)> {
        self.dirty.push(id);
        self.slots
            .get_mut(id as usize)
            .and_then(Option::as_mut)
            .map(|p| p.session.as_mut())
    }

    /// Puts peer `id`'s current deadline into the timer heap if it changed.
    fn reschedule(&mut self, id: PeerId) {
        let Some(peer) = self.slots.get_mut(id as usize).and_then(Option::as_mut) else {
            return;
        };
        let deadline = peer.session.next_deadline();
        if deadline != peer.scheduled {
            peer.scheduled = deadline;
            if let Some(t) = deadline {
                self.timers.push(Reverse((t, id)));
            }
        }
    }

    fn is_current(&self, t: Instant, id: PeerId) -> bool {
        self.peer(id).is_some_and(|p| p.scheduled == Some(t))
    }

    fn flush_dirty(&mut self) {
        while let Some(id) = self.dirty.pop() {
            self.reschedule(id);
        }
    }

    fn peer(&self, id: PeerId) -> Option<&Peer> {
        self.slots.get(id as usize).and_then(Option::as_ref)
    }

    fn peer_mut(&mut self, id: PeerId) -> Option<&mut Peer> {
        self.slots.get_mut(id as usize).and_then(Option::as_mut)
    }

    /// The peer whose AllowedIPs hold `dst` (longest prefix).
    pub fn route(&self, dst: IpAddr) -> Option<PeerId> {
        self.routes.lookup(dst).copied()
    }

    /// Encrypts an IP packet for the peer its destination routes to.
    pub fn encapsulate(
        &mut self,
        now: Instant,
        ip_packet: &[u8],
        out: &mut [u8],
    ) -> (Option<PeerId>, WgOutput) {
        let Some(id) = Tunn::dst_address(ip_packet).and_then(|dst| self.route(dst)) else {
            return (None, WgOutput::Dropped(DropReason::NoPeer));
        };
        let Some(peer) = self.peer_mut(id) else {
            return (None, WgOutput::Dropped(DropReason::NoPeer));
        };
        let res = peer.session.encapsulate(now, ip_packet, out);
        self.reschedule(id);
        (Some(id), res)
    }

    /// Encrypts an IP packet for peer `id`, whose route the caller already looked up (a later
    /// packet of a super-packet whose first went to `id`).
    pub fn encapsulate_for(
        &mut self,
        now: Instant,
        id: PeerId,
        ip_packet: &[u8],
        out: &mut [u8],
    ) -> WgOutput {
        let Some(peer) = self.peer_mut(id) else {
            return WgOutput::Dropped(DropReason::NoPeer);
        };
        let res = peer.session.encapsulate(now, ip_packet, out);
        self.reschedule(id);
        res
    }

    /// Which peer a WireGuard datagram is for: by receiver index, or for a handshake initiation
    /// by decrypting the initiator's static key.
    pub fn identify(&self, datagram: &[u8]) -> Option<PeerId> {
        match Tunn::parse_incoming_packet(datagram).ok()? {
            Packet::HandshakeInit(_) => self.id_of(&self.initiator_key(datagram)?),
            Packet::HandshakeResponse(p) => self.known(p.receiver_idx >> 8),
            Packet::PacketCookieReply(p) => self.known(p.receiver_idx >> 8),
            Packet::PacketData(p) => self.known(p.receiver_idx >> 8),
        }
    }

    /// The static key of whoever sent a handshake initiation to us, known peer or not.
    pub fn initiator_key(&self, datagram: &[u8]) -> Option<NodePublic> {
        let Packet::HandshakeInit(init) = Tunn::parse_incoming_packet(datagram).ok()? else {
            return None;
        };
        let half = parse_handshake_anon(&self.secret, &self.public, &init).ok()?;
        Some(NodePublic::from_bytes(half.peer_static_public))
    }

    /// Starts a handshake with peer `id` now (see [`WgSession::initiate_handshake`]).
    pub fn initiate_handshake(&mut self, now: Instant, id: PeerId, out: &mut [u8]) -> WgOutput {
        let Some(peer) = self.peer_mut(id) else {
            return WgOutput::Dropped(DropReason::NoPeer);
        };
        let res = peer.session.initiate_handshake(now, out);
        self.reschedule(id);
        res
    }

    /// Retransmits peer `id`'s pending handshake now (see [`WgSession::retry_handshake_now`]).
    pub fn retry_handshake_now(&mut self, now: Instant, id: PeerId, out: &mut [u8]) -> WgOutput {
        let Some(peer) = self.peer_mut(id) else {
            return WgOutput::Dropped(DropReason::NoPeer);
        };
        let res = peer.session.retry_handshake_now(now, out);
        self.reschedule(id);
        res
    }

    fn known(&self, id: PeerId) -> Option<PeerId> {
        self.peer(id).map(|_| id)
    }

    /// Handles a datagram from an unknown-or-known source address (UDP).
    pub fn decapsulate(
        &mut self,
        now: Instant,
        datagram: &[u8],
        out: &mut [u8],
    ) -> (Option<PeerId>, WgOutput) {
        match self.identify(datagram) {
            Some(id) => (Some(id), self.decapsulate_for(now, id, datagram, out)),
            None => (None, WgOutput::Dropped(DropReason::NoPeer)),
        }
    }

    /// Handles a datagram known to come from peer `id` (e.g. DERP gave its node key). A
    /// decrypted packet whose source is outside the peer's AllowedIPs is dropped.
    pub fn decapsulate_for(
        &mut self,
        now: Instant,
        id: PeerId,
        datagram: &[u8],
        out: &mut [u8],
    ) -> WgOutput {
        if datagram.first() == Some(&1) {
            self.limiter_reset_at
                .get_or_insert(now + Duration::from_secs(1));
        }
        let Some(peer) = self.peer_mut(id) else {
            return WgOutput::Dropped(DropReason::NoPeer);
        };
        let res = peer.session.decapsulate(now, datagram, out);
        let res = match res {
            WgOutput::ToTunnel(n) => {
                let allowed = out
                    .get(..n)
                    .and_then(source_addr)
                    .is_some_and(|src| peer.allowed.lookup(src).is_some());
                if allowed {
                    WgOutput::ToTunnel(n)
                } else {
                    WgOutput::Dropped(DropReason::NotAllowed)
                }
            }
            other => other,
        };
        self.reschedule(id);
        res
    }

    /// Runs every due timer, handing each packet to send to `emit(peer, bytes)`; also flushes
    /// packets queued behind a just-finished handshake.
    pub fn update_timers(
        &mut self,
        now: Instant,
        out: &mut [u8],
        mut emit: impl FnMut(PeerId, &[u8]),
    ) {
        if self.limiter_reset_at.is_some_and(|t| now >= t) {
            self.rate_limiter.reset_count();
            self.limiter_reset_at = None;
        }
        self.flush_dirty();
        while let Some(&Reverse((t, id))) = self.timers.peek() {
            if t > now {
                break;
            }
            self.timers.pop();
            if !self.is_current(t, id) {
                continue; // stale: the peer moved its deadline or is gone
            }
            if let Some(peer) = self.slots.get_mut(id as usize).and_then(Option::as_mut) {
                peer.scheduled = None;
                // Bounded: each round either sends or returns Done.
                for _ in 0..8 {
                    match peer.session.update_timers(now, out) {
                        WgOutput::ToNetwork(n) => {
                            if let Some(bytes) = out.get(..n) {
                                emit(id, bytes);
                            }
                        }
                        _ => break,
                    }
                }
            }
            self.reschedule(id);
        }
    }

    /// Emits packets that were queued on peer `id` while its handshake ran.
    pub fn drain(&mut self, now: Instant, id: PeerId, out: &mut [u8], mut emit: impl FnMut(&[u8])) {
        let Some(peer) = self.peer_mut(id) else {
            return;
        };
        while let WgOutput::ToNetwork(n) = peer.session.drain(now, out) {
            if let Some(bytes) = out.get(..n) {
                emit(bytes);
            }
        }
    }

    /// The earliest timer deadline over all peers (drops stale heap entries on the way).
    pub fn next_deadline(&mut self) -> Option<Instant> {
        self.flush_dirty();
        while let Some(&Reverse((t, id))) = self.timers.peek() {
            if self.is_current(t, id) {
                return min_deadline(Some(t), self.limiter_reset_at);
            }
            self.timers.pop();
        }
        self.limiter_reset_at
    }
}

/// Source address of an IPv4/IPv6 packet, if the header is long enough.
fn source_addr(packet: &[u8]) -> Option<IpAddr> {
    match packet.first()? >> 4 {
        4 => {
            let b: [u8; 4] = packet.get(12..16)?.try_into().ok()?;
            Some(IpAddr::V4(Ipv4Addr::from(b)))
        }
        6 => {
            let b: [u8; 16] = packet.get(8..24)?.try_into().ok()?;
            Some(IpAddr::V6(Ipv6Addr::from(b)))
        }
        _ => None,
    }
}
