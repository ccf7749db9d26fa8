//! All peers' path machines behind one disco key: opens inbound disco packets, checks who sent
//! them, hands them to the right [`Peer`], and seals what the peers want
//! to send. Still sans-IO: the driver gives it datagrams and the time, and sends [`Outgoing`]
//! packets on the UDP socket or via DERP.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::time::Instant;

use super::{
    Dest, Event, LocalNet, Path, PathSource, Peer, PeerInfo, RelayAddr, RelayPath, RelayReason,
    SendPlan, TimeoutReason,
};
use crate::disco::{self, DiscoError, Message};
use crate::keys::{DiscoPrivate, DiscoPublic, NodePublic};
use crate::naclbox::SharedBox;

/// A sealed disco packet to send to `peer`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// Node key of the peer (the DERP routing key when `dest` is DERP).
    pub peer: NodePublic,
    pub dest: Dest,
    /// The whole disco packet (magic, our disco key, nonce, box).
    pub packet: Vec<u8>,
}

/// An event of one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerEvent {
    pub peer: NodePublic,
    pub event: Event,
}

/// Why an inbound disco packet was dropped (each is counted in [`DiscoCounters`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiscoDrop {
    #[error("not a disco packet: {0}")]
    NotDisco(DiscoError),
    #[error("disco from an unknown disco key")]
    UnknownSender,
    #[error("disco via DERP from a node key whose disco key differs")]
    DerpSenderMismatch,
    #[error("disco box did not open")]
    BadBox,
    #[error("disco message did not parse: {0}")]
    Malformed(DiscoError),
}

/// Counters of inbound disco handling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DiscoCounters {
    pub accepted: u64,
    pub not_disco: u64,
    pub unknown_sender: u64,
    pub derp_sender_mismatch: u64,
    pub bad_box: u64,
    pub malformed: u64,
}

#[derive(Clone)]
struct Entry {
    peer: Peer,
    shared: SharedBox,
}

/// The path machines of every peer, keyed by node key.
#[derive(Clone)]
pub struct PeerTable {
    disco_private: DiscoPrivate,
    disco_public: DiscoPublic,
    local: LocalNet,
    peers: BTreeMap<NodePublic, Entry>,
    by_disco: HashMap<DiscoPublic, NodePublic>,
    by_addr: HashMap<SocketAddr, NodePublic>,
    /// Relay endpoints in use, for WireGuard that arrives through them.
    by_relay: HashMap<RelayAddr, NodePublic>,
    /// Nodes that may serve us as relays (`relay-target` grants).
    relay_candidates: BTreeSet<NodePublic>,
    /// Control turned our relay client off; each peer knows it too.
    relay_client_disabled: bool,
    counters: DiscoCounters,
    /// Peers handed input since their output was last drained: only they can have something
    /// for `poll_transmit` / `poll_event`, so those never scan every peer.
    touched: BTreeSet<NodePublic>,
    /// Every peer's next deadline, earliest first (`deadline_of` is the reverse index), so
    /// `poll_timeout` costs O(log n) per call, not a scan.
    deadlines: BTreeSet<(Instant, NodePublic)>,
    deadline_of: HashMap<NodePublic, Instant>,
}

impl std::fmt::Debug for PeerTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerTable")
            .field("disco_public", &self.disco_public)
            .field("peers", &self.peers.len())
            .field("counters", &self.counters)
            .finish()
    }
}

impl PeerTable {
    /// A table for this node's disco key and network facts.
    pub fn new(disco_private: DiscoPrivate, local: LocalNet) -> PeerTable {
        PeerTable {
            disco_public: disco_private.public(),
            disco_private,
            local,
            peers: BTreeMap::new(),
            by_disco: HashMap::new(),
            by_addr: HashMap::new(),
            by_relay: HashMap::new(),
            relay_candidates: BTreeSet::new(),
            relay_client_disabled: false,
            counters: DiscoCounters::default(),
            touched: BTreeSet::new(),
            deadlines: BTreeSet::new(),
            deadline_of: HashMap::new(),
        }
    }

    /// After `key`'s machine got input: its output may be waiting and its deadline moved.
    fn touch(&mut self, key: NodePublic) {
        let deadline = match self.peers.get(&key) {
            Some(entry) => {
                self.touched.insert(key);
                entry.peer.poll_timeout().map(|(at, _)| at)
            }
            None => {
                self.touched.remove(&key);
                None
            }
        };
        // Every outgoing packet touches its peer, and its deadline rarely moves: re-index only
        // when it did.
        let old = self.deadline_of.get(&key).copied();
        if old == deadline {
            return;
        }
        if let Some(old) = old {
            self.deadlines.remove(&(old, key));
            self.deadline_of.remove(&key);
        }
        if let Some(at) = deadline {
            self.deadlines.insert((at, key));
            self.deadline_of.insert(key, at);
        }
    }

    fn touch_all(&mut self) {
        let keys: Vec<NodePublic> = self
            .peers
            .keys()
            .chain(self.deadline_of.keys())
            .copied()
            .collect();
        for key in keys {
            self.touch(key);
        }
    }

    /// Our disco public key (what control must publish for us).
    pub fn disco_public(&self) -> DiscoPublic {
        self.disco_public
    }

    /// Replaces the peer set with the netmap's peers that have a disco key.
    pub fn set_peers(&mut self, now: Instant, peers: Vec<PeerInfo>) {
        let wanted: BTreeMap<NodePublic, PeerInfo> = peers
            .into_iter()
            .filter(|p| !p.disco_key.is_zero())
            .map(|p| (p.node_key, p))
            .collect();
        self.peers.retain(|key, _| wanted.contains_key(key));
        for (key, info) in wanted {
            match self.peers.get_mut(&key) {
                Some(entry) => {
                    if entry.peer.info().disco_key != info.disco_key {
                        entry.shared = disco::shared_box(&self.disco_private, &info.disco_key);
                    }
                    entry.peer.update_info(now, info);
                }
                None => {
                    let shared = disco::shared_box(&self.disco_private, &info.disco_key);
                    let mut peer = Peer::new(now, self.local.clone(), info);
                    let others = self.relay_candidates.iter().any(|c| *c != key);
                    peer.set_relay_candidates(now, others);
                    peer.set_relay_client_disabled(now, self.relay_client_disabled);
                    self.peers.insert(key, Entry { peer, shared });
                }
            }
        }
        self.by_disco = self
            .peers
            .iter()
            .map(|(key, e)| (e.peer.info().disco_key, *key))
            .collect();
        self.by_addr.retain(|_, key| self.peers.contains_key(key));
        self.by_relay.retain(|_, key| self.peers.contains_key(key));
        self.touch_all();
    }

    /// The nodes that may serve us as peer relays; each peer learns whether one other than
    /// itself exists.
    pub fn set_relay_candidates(&mut self, now: Instant, candidates: BTreeSet<NodePublic>) {
        self.relay_candidates = candidates;
        for (key, entry) in self.peers.iter_mut() {
            let others = self.relay_candidates.iter().any(|c| c != key);
            entry.peer.set_relay_candidates(now, others);
        }
        self.touch_all();
    }

    /// Whether control turned our relay client off: peers then say so as the reason they are
    /// not on a relay (relay paths in use are left to end by themselves, as in Go).
    pub fn set_relay_client_disabled(&mut self, now: Instant, disabled: bool) {
        if self.relay_client_disabled == disabled {
            return;
        }
        self.relay_client_disabled = disabled;
        for entry in self.peers.values_mut() {
            entry.peer.set_relay_client_disabled(now, disabled);
        }
        self.touch_all();
    }

    /// A disco packet (starting at the magic) that came through the relay endpoint `relay`.
    pub fn handle_relay(
        &mut self,
        now: Instant,
        relay: RelayAddr,
        packet: &[u8],
    ) -> Result<NodePublic, DiscoDrop> {
        let result = self.open(packet, None);
        self.deliver(now, PathSource::Relay(relay), result)
    }

    /// A bind handshake with `peer` ended with a pong through `path`: installed as its relay
    /// path unless a better one is in use (see [`Peer::relay_ready`]).
    pub fn relay_ready(&mut self, now: Instant, peer: &NodePublic, path: RelayPath) -> bool {
        let installed = self
            .peers
            .get_mut(peer)
            .is_some_and(|e| e.peer.relay_ready(now, path));
        if installed {
            // One relay endpoint per peer, as Go keeps it: the map stays as small as the peers.
            self.by_relay.retain(|_, key| key != peer);
            self.by_relay.insert(path.addr, *peer);
        }
        self.touch(*peer);
        installed
    }

    /// A relay attempt for `peer` failed.
    pub fn relay_failed(&mut self, now: Instant, peer: &NodePublic, reason: RelayReason) {
        if let Some(entry) = self.peers.get_mut(peer) {
            entry.peer.relay_failed(now, reason);
        }
        self.touch(*peer);
    }

    /// The peer that owns WireGuard arriving through the relay endpoint `relay`.
    pub fn peer_for_relay(&self, relay: &RelayAddr) -> Option<NodePublic> {
        self.by_relay.get(relay).copied()
    }

    /// What we last told the peers about ourselves.
    pub fn local(&self) -> &LocalNet {
        &self.local
    }

    /// New facts about our own network, for every peer.
    pub fn set_local(&mut self, now: Instant, local: LocalNet) {
        self.local = local;
        for entry in self.peers.values_mut() {
            entry.peer.set_local(now, self.local.clone());
        }
        self.touch_all();
    }

    /// A disco packet (starting at the magic) from UDP source `src`.
    pub fn handle_udp(
        &mut self,
        now: Instant,
        src: SocketAddr,
        packet: &[u8],
    ) -> Result<NodePublic, DiscoDrop> {
        let result = self.open(packet, None);
        self.deliver(now, PathSource::Udp(src), result)
    }

    /// A disco packet from a DERP RecvPacket of `src_node` on our connection to `region`.
    pub fn handle_derp(
        &mut self,
        now: Instant,
        region: u16,
        src_node: NodePublic,
        packet: &[u8],
    ) -> Result<NodePublic, DiscoDrop> {
        let result = self.open(packet, Some(src_node));
        self.deliver(now, PathSource::Derp { region }, result)
    }

    /// Outgoing WireGuard to `peer`: where to send it (None for an unknown peer).
    pub fn on_outgoing(&mut self, now: Instant, peer: &NodePublic) -> Option<SendPlan> {
        let plan = self.peers.get_mut(peer).map(|e| e.peer.on_outgoing(now));
        if plan.is_some() {
            self.touch(*peer);
        }
        plan
    }

    /// `tern ping` to `peer` (see [`Peer::cli_ping`]); None for an unknown peer.
    pub fn cli_ping(&mut self, now: Instant, peer: &NodePublic) -> Option<Vec<disco::TxId>> {
        let sent = self.peers.get_mut(peer).map(|e| e.peer.cli_ping(now));
        if sent.is_some() {
            self.touch(*peer);
        }
        sent
    }

    /// Queues a disco message to `peer` over DERP (see [`Peer::send_via_derp`]).
    pub fn send_via_derp(&mut self, peer: &NodePublic, msg: Message) -> bool {
        let sent = self
            .peers
            .get_mut(peer)
            .is_some_and(|e| e.peer.send_via_derp(msg));
        if sent {
            self.touch(*peer);
        }
        sent
    }

    /// The peer that owns WireGuard packets from `addr`, as learned from disco.
    pub fn peer_for_addr(&self, addr: &SocketAddr) -> Option<NodePublic> {
        self.by_addr.get(addr).copied()
    }

    /// One peer's machine, for status.
    pub fn peer(&self, key: &NodePublic) -> Option<&Peer> {
        self.peers.get(key).map(|e| &e.peer)
    }

    /// Every peer's current path.
    pub fn paths(&self) -> impl Iterator<Item = (&NodePublic, Path)> {
        self.peers.iter().map(|(k, e)| (k, e.peer.current_path()))
    }

    /// Inbound disco counters.
    pub fn counters(&self) -> DiscoCounters {
        self.counters
    }

    /// The next sealed disco packet to send.
    pub fn poll_transmit(&mut self) -> Option<Outgoing> {
        let me = self.disco_public;
        let peers = &mut self.peers;
        self.touched.iter().find_map(|key| {
            let entry = peers.get_mut(key)?;
            let t = entry.peer.poll_transmit()?;
            Some(Outgoing {
                peer: *key,
                dest: t.dest,
                packet: disco::seal_with(&entry.shared, &me, &t.msg),
            })
        })
    }

    /// The next peer event; address attributions are also recorded for [`Self::peer_for_addr`].
    /// When none is left, peers whose output is all drained stop being looked at.
    pub fn poll_event(&mut self) -> Option<PeerEvent> {
        let peers = &mut self.peers;
        let found = self
            .touched
            .iter()
            .find_map(|key| Some((*key, peers.get_mut(key)?.peer.poll_event()?)));
        let Some((peer, event)) = found else {
            let peers = &self.peers;
            self.touched
                .retain(|key| peers.get(key).is_some_and(|e| e.peer.has_output()));
            return None;
        };
        if let Event::AddrForPeer(addr) = event {
            self.by_addr.insert(addr, peer);
        }
        Some(PeerEvent { peer, event })
    }

    /// The earliest deadline over all peers.
    pub fn poll_timeout(&self) -> Option<(Instant, NodePublic, TimeoutReason)> {
        let (_, key) = self.deadlines.first()?;
        let (at, reason) = self.peers.get(key)?.peer.poll_timeout()?;
        Some((at, *key, reason))
    }

    /// Runs the timers of every peer that has one due.
    pub fn handle_timeout(&mut self, now: Instant) {
        let due: Vec<NodePublic> = self
            .deadlines
            .iter()
            .take_while(|(at, _)| *at <= now)
            .map(|(_, key)| *key)
            .collect();
        for key in due {
            if let Some(entry) = self.peers.get_mut(&key) {
                entry.peer.handle_timeout(now);
            }
            self.touch(key);
        }
    }

    /// Identifies the sender, opens and parses.
    fn open(
        &self,
        packet: &[u8],
        derp_src: Option<NodePublic>,
    ) -> Result<(NodePublic, Message), DiscoDrop> {
        let header = disco::parse_packet(packet).map_err(DiscoDrop::NotDisco)?;
        let node = *self
            .by_disco
            .get(&header.sender)
            .ok_or(DiscoDrop::UnknownSender)?;
        // Over DERP the relay vouches for the node key: it must be the disco key's owner.
        if derp_src.is_some_and(|src| src != node) {
            return Err(DiscoDrop::DerpSenderMismatch);
        }
        let entry = self.peers.get(&node).ok_or(DiscoDrop::UnknownSender)?;
        let plain = entry
            .shared
            .open(header.sealed)
            .map_err(|_| DiscoDrop::BadBox)?;
        let msg = disco::parse(&plain).map_err(DiscoDrop::Malformed)?;
        Ok((node, msg))
    }

    fn deliver(
        &mut self,
        now: Instant,
        from: PathSource,
        result: Result<(NodePublic, Message), DiscoDrop>,
    ) -> Result<NodePublic, DiscoDrop> {
        let (node, msg) = result.inspect_err(|drop| {
            tracing::trace!(%drop, ?from, "disco: dropped");
            let c = &mut self.counters;
            match drop {
                DiscoDrop::NotDisco(_) => c.not_disco += 1,
                DiscoDrop::UnknownSender => c.unknown_sender += 1,
                DiscoDrop::DerpSenderMismatch => c.derp_sender_mismatch += 1,
                DiscoDrop::BadBox => c.bad_box += 1,
                DiscoDrop::Malformed(_) => c.malformed += 1,
            }
        })?;
        self.counters.accepted += 1;
        if let Some(entry) = self.peers.get_mut(&node) {
            entry.peer.handle_disco(now, from, msg);
        }
        self.touch(node);
        Ok(node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    struct Side {
        table: PeerTable,
        node_key: NodePublic,
        public: SocketAddr,
        home: u16,
    }

    fn side(n: u8, public: &str, home: u16) -> Side {
        let node_key = NodePublic::from_bytes([n; 32]);
        let local = LocalNet {
            node_key,
            endpoints: vec![addr(public)],
            udp_working: Some(true),
            mapping_varies: Some(false),
        };
        Side {
            table: PeerTable::new(DiscoPrivate::generate(), local),
            node_key,
            public: addr(public),
            home,
        }
    }

    fn info_of(s: &Side) -> PeerInfo {
        PeerInfo {
            node_key: s.node_key,
            disco_key: s.table.disco_public(),
            home_derp: Some(s.home),
            endpoints: vec![s.public],
            mapping_varies: Some(false),
            udp_working: Some(true),
            relay_capable: true,
        }
    }

    /// Moves every sealed packet from `from` to `to` (no loss, no NAT), returning how many.
    fn pump(now: Instant, from: &mut Side, to: &mut Side) -> usize {
        let mut n = 0;
        while let Some(out) = from.table.poll_transmit() {
            assert_eq!(out.peer, to.node_key);
            let got = match out.dest {
                Dest::Direct(a) => {
                    assert_eq!(a, to.public);
                    to.table.handle_udp(now, from.public, &out.packet)
                }
                Dest::Derp(region) => to
                    .table
                    .handle_derp(now, region, from.node_key, &out.packet),
                Dest::Relay(relay) => to.table.handle_relay(now, relay, &out.packet),
            };
            assert_eq!(got, Ok(from.node_key));
            n += 1;
        }
        while from.table.poll_event().is_some() {}
        n
    }

    #[test]
    fn two_tables_reach_direct_with_real_sealed_packets() {
        let t0 = Instant::now();
        let mut a = side(1, "203.0.113.1:41641", 1);
        let mut b = side(2, "198.51.100.2:41641", 2);
        a.table.set_peers(t0, vec![info_of(&b)]);
        b.table.set_peers(t0, vec![info_of(&a)]);
        let plan = a.table.on_outgoing(t0, &b.node_key).unwrap();
        assert_eq!(
            plan,
            SendPlan {
                udp: None,
                derp: Some(2),
                relay: None
            }
        );
        let mut now = t0;
        for _ in 0..10 {
            now += Duration::from_millis(10);
            pump(now, &mut a, &mut b);
            pump(now, &mut b, &mut a);
        }
        assert!(matches!(
            a.table.peer(&b.node_key).unwrap().current_path(),
            Path::Direct { addr, .. } if addr == b.public
        ));
        assert_eq!(a.table.peer_for_addr(&b.public), Some(b.node_key));
        assert_eq!(b.table.peer_for_addr(&a.public), Some(a.node_key));
        assert!(a.table.counters().accepted > 0);
        // A CLI ping on the direct path is answered over UDP, reported as a CLI pong.
        let tx = a.table.cli_ping(now, &b.node_key).unwrap();
        assert_eq!(tx.len(), 1);
        pump(now, &mut a, &mut b);
        let out = b.table.poll_transmit().unwrap();
        assert_eq!(out.dest, Dest::Direct(a.public));
        assert_eq!(
            a.table.handle_udp(now, b.public, &out.packet),
            Ok(b.node_key)
        );
        let cli_pong = std::iter::from_fn(|| a.table.poll_event())
            .any(|e| matches!(e.event, Event::Pong { cli: true, tx_id, .. } if tx_id == tx[0]));
        assert!(cli_pong);
        assert_eq!(a.table.poll_timeout().map(|(_, k, _)| k), Some(b.node_key));
    }

    /// The table's earliest deadline, and its index, agree with the peers' own deadlines through
    /// traffic (which touches a peer per packet and mostly leaves its deadline where it was),
    /// discovery and timers.
    #[test]
    fn the_deadline_index_follows_every_peers_own_deadline() {
        let t0 = Instant::now();
        let mut a = side(1, "203.0.113.1:41641", 1);
        let mut b = side(2, "198.51.100.2:41641", 2);
        let c = side(3, "192.0.2.3:41641", 3);
        a.table.set_peers(t0, vec![info_of(&b), info_of(&c)]);
        b.table.set_peers(t0, vec![info_of(&a)]);
        let check = |table: &PeerTable, step: &str| {
            let mut expected: Vec<(Instant, NodePublic)> = table
                .paths()
                .filter_map(|(k, _)| Some((table.peer(k)?.poll_timeout()?.0, *k)))
                .collect();
            expected.sort();
            let earliest = table.poll_timeout().map(|(t, k, _)| (t, k));
            assert_eq!(earliest, expected.first().copied(), "{step}");
            let indexed: Vec<(Instant, NodePublic)> = table.deadlines.iter().copied().collect();
            assert_eq!(indexed, expected, "{step}: index");
            assert_eq!(
                table.deadline_of.len(),
                expected.len(),
                "{step}: reverse index"
            );
        };
        let mut now = t0;
        for round in 0..400u32 {
            now += Duration::from_millis(25);
            a.table.on_outgoing(now, &b.node_key);
            if round % 7 == 0 {
                a.table.on_outgoing(now, &c.node_key);
            }
            check(&a.table, &format!("round {round}, after sends"));
            // b answers over its direct address; c never answers, so its pings time out.
            while let Some(out) = a.table.poll_transmit() {
                if let (true, Dest::Direct(_)) = (out.peer == b.node_key, out.dest) {
                    let _ = b.table.handle_udp(now, a.public, &out.packet);
                }
            }
            while a.table.poll_event().is_some() {}
            pump(now, &mut b, &mut a);
            a.table.handle_timeout(now);
            b.table.handle_timeout(now);
            check(&a.table, &format!("round {round}, after timers"));
        }
        a.table.set_peers(now, vec![info_of(&b)]);
        check(&a.table, "after c left");
    }

    #[test]
    fn unknown_senders_tampering_and_impostors_are_dropped_and_counted() {
        let t0 = Instant::now();
        let mut a = side(1, "203.0.113.1:41641", 1);
        let b = side(2, "198.51.100.2:41641", 2);
        let stranger = DiscoPrivate::generate();
        a.table.set_peers(t0, vec![info_of(&b)]);
        let ping = Message::Ping(disco::Ping {
            tx_id: disco::TxId([1; 12]),
            node_key: None,
            padding: 0,
        });
        let from_stranger = disco::seal(&stranger, &a.table.disco_public(), &ping);
        assert_eq!(
            a.table.handle_udp(t0, b.public, &from_stranger),
            Err(DiscoDrop::UnknownSender)
        );
        // Sealed by b's key (as b), then tampered.
        let b_private = DiscoPrivate::generate();
        let mut b2 = info_of(&b);
        b2.disco_key = b_private.public();
        a.table.set_peers(t0, vec![b2]);
        let mut wire = disco::seal(&b_private, &a.table.disco_public(), &ping);
        let good = wire.clone();
        let last = wire.len() - 1;
        wire[last] ^= 1;
        assert_eq!(
            a.table.handle_udp(t0, b.public, &wire),
            Err(DiscoDrop::BadBox)
        );
        // Via DERP from another node key: an impostor.
        let other = NodePublic::from_bytes([9; 32]);
        assert_eq!(
            a.table.handle_derp(t0, 1, other, &good),
            Err(DiscoDrop::DerpSenderMismatch)
        );
        assert!(matches!(
            a.table.handle_udp(t0, b.public, b"not disco at all"),
            Err(DiscoDrop::NotDisco(_))
        ));
        assert_eq!(a.table.handle_udp(t0, b.public, &good), Ok(b.node_key));
        let c = a.table.counters();
        assert_eq!(
            (
                c.unknown_sender,
                c.bad_box,
                c.derp_sender_mismatch,
                c.not_disco,
                c.accepted
            ),
            (1, 1, 1, 1, 1)
        );
        // The accepted ping is answered with a pong sealed to b.
        let out = a.table.poll_transmit().unwrap();
        assert_eq!(out.dest, Dest::Direct(b.public));
        let header = disco::parse_packet(&out.packet).unwrap();
        let opened = disco::open(&disco::shared_box(&b_private, &header.sender), &header);
        assert!(matches!(opened, Ok(Message::Pong(_))));
    }

    #[test]
    fn deadlines_and_output_follow_the_peers_that_got_input() {
        let t0 = Instant::now();
        let mut a = side(1, "203.0.113.1:41641", 1);
        let others: Vec<Side> = (2..6)
            .map(|n| side(n, &format!("198.51.100.{n}:41641"), 2))
            .collect();
        a.table.set_peers(t0, others.iter().map(info_of).collect());
        // Idle peers: no deadline, nothing to send.
        assert_eq!(a.table.poll_timeout(), None);
        assert_eq!(a.table.poll_transmit(), None);
        assert_eq!(a.table.poll_event(), None);
        // Traffic to one peer: its pings go out and its deadline is the table's.
        let busy = others[2].node_key;
        a.table.on_outgoing(t0, &busy).unwrap();
        let out: Vec<Outgoing> = std::iter::from_fn(|| a.table.poll_transmit()).collect();
        assert!(!out.is_empty());
        assert!(out.iter().all(|o| o.peer == busy));
        while a.table.poll_event().is_some() {}
        let (at, key, _) = a.table.poll_timeout().unwrap();
        assert_eq!(key, busy);
        // Its timers run when due (ping timeouts at 5 s, heartbeats at 3 s)…
        a.table.handle_timeout(at);
        assert!(a
            .table
            .poll_timeout()
            .is_some_and(|(t, k, _)| t > at && k == busy));
        // …and a peer that leaves the netmap takes its deadline along.
        a.table
            .set_peers(t0, others.iter().take(2).map(info_of).collect());
        assert_eq!(a.table.poll_timeout(), None);
    }

    #[test]
    fn peers_without_disco_key_or_removed_from_the_netmap_are_gone() {
        let t0 = Instant::now();
        let mut a = side(1, "203.0.113.1:41641", 1);
        let b = side(2, "198.51.100.2:41641", 2);
        let mut no_disco = info_of(&side(3, "192.0.2.3:1", 3));
        no_disco.disco_key = DiscoPublic::zero();
        a.table.set_peers(t0, vec![info_of(&b), no_disco]);
        assert_eq!(a.table.paths().count(), 1);
        a.table.set_peers(t0, vec![]);
        assert_eq!(a.table.paths().count(), 0);
        assert_eq!(a.table.on_outgoing(t0, &b.node_key), None);
    }
}
