//! DERP region links: one task per region keeps a connection up (Go back-off, nodes in order,
//! `NotePreferred` on the home region), dialed on first use, closed after idling when not home.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::Engine;
use crate::control::tailcfg::{DerpMap, DerpNode, DerpRegion};
use crate::derp::blocks::Blocks;
use crate::derp::client::{
    ClientConfig, DeliverTo, Delivery, DerpClient, Reconnector, SendQueue, TlsVerify, Transport,
};
use crate::derp::resolve::{self, MapAddr};
use crate::keys::{NodePrivate, NodePublic};
use crate::netcheck;

/// Packets queued towards one DERP region before new ones are dropped.
pub(super) const DERP_QUEUE: usize = 512;

/// Bytes of one [`PacketArena`] block.
const ARENA_BLOCK: usize = 64 << 10;
/// Arena blocks kept besides the current one: a full region queue (512 packets) fills ~11.
const ARENA_SPARES: usize = 15;

/// Owned copies of DERP-bound packets without an allocation each: packets are copied into a
/// block and split off as `Bytes` sharing it; a full block is used again once its last packet
/// was written (see [`Blocks`]).
pub(super) struct PacketArena {
    blocks: Blocks,
}

impl Default for PacketArena {
    fn default() -> Self {
        Self {
            blocks: Blocks::new(BytesMut::new(), ARENA_BLOCK, ARENA_SPARES),
        }
    }
}

impl PacketArena {
    pub(super) fn copy(&mut self, packet: &[u8], now: Instant) -> Bytes {
        self.blocks.make_room(packet.len(), now);
        let block = self.blocks.bytes();
        block.extend_from_slice(packet);
        block.split().freeze()
    }
}

/// Our side of one DERP region's task.
pub(super) struct DerpLink {
    pub(super) outbound: mpsc::Sender<(NodePublic, Bytes)>,
    /// Where packets for `outbound` are copied.
    pub(super) arena: PacketArena,
    /// Whether this is our home region (NotePreferred on change and after each dial).
    pub(super) preferred: watch::Sender<bool>,
    pub(super) task: JoinHandle<()>,
    pub(super) nodes: Vec<DerpNode>,
    pub(super) last_write: Instant,
    /// Set by the region's task while its connection is up (status and metrics read it).
    pub(super) connected: Arc<AtomicBool>,
}

/// Non-home DERP connections unused for this long are closed.
pub(super) const DERP_IDLE_CLOSE: Duration = Duration::from_secs(60);

/// Which region carries a packet to a peer (Go `derpWriteChanForRegion`): its home
/// region if we are connected there; else the region we last heard it on, if still connected;
/// else its home region (dialed now); with no home, the region it was heard on; else our own
/// home (`our_home`, 0 = none). That last step is ours: Go drops the packet, but a peer that
/// just came up has no home in our netmap yet, and its first handshake would wait 5 s for a
/// retransmission; sending via our home costs nothing and works whenever we share a region.
pub fn choose_region(
    peer_home: u16,
    heard_on: Option<u16>,
    our_home: u16,
    connected: impl Fn(u16) -> bool,
) -> Option<u16> {
    if peer_home != 0 && connected(peer_home) {
        return Some(peer_home);
    }
    if let Some(r) = heard_on.filter(|r| connected(*r)) {
        return Some(r);
    }
    if peer_home != 0 {
        return Some(peer_home);
    }
    heard_on.or((our_home != 0).then_some(our_home))
}

impl Drop for DerpLink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Engine {
    pub(super) fn send_derp(
        &mut self,
        now: Instant,
        region: Option<u16>,
        to: NodePublic,
        packet: &[u8],
    ) {
        let Some(link) = region.and_then(|r| self.derp_link(r)) else {
            self.drops.no_derp += 1;
            return;
        };
        link.last_write = now;
        // A full queue costs no copy.
        let queued = match link.outbound.try_reserve() {
            Ok(permit) => {
                permit.send((to, link.arena.copy(packet, now)));
                true
            }
            Err(_) => false,
        };
        if !queued {
            self.drops.derp_queue_full += 1;
        }
    }

    /// Whether some region's queue is over half full: time to let its task write.
    pub(super) fn derp_backlogged(&self) -> bool {
        self.derp
            .values()
            .any(|link| link.outbound.capacity() < DERP_QUEUE / 2)
    }

    /// Closes non-home DERP connections nothing was written to for [`DERP_IDLE_CLOSE`], and
    /// frees the spare packet blocks of those that went quiet.
    pub(super) fn close_idle_derp(&mut self, now: Instant) {
        let home = self.home;
        self.derp.retain(|region, link| {
            *region == home || now.saturating_duration_since(link.last_write) < DERP_IDLE_CLOSE
        });
        for link in self.derp.values_mut() {
            link.arena.blocks.let_spares_go_if_idle(now);
        }
    }

    /// The connection to `region`, dialed on first use.
    pub(super) fn derp_link(&mut self, region: u16) -> Option<&mut DerpLink> {
        if !self.derp.contains_key(&region) {
            let nodes = self.derp_map.get(&region)?.nodes.clone();
            let dialable: Vec<DerpNode> = nodes.iter().filter(|n| !n.stun_only).cloned().collect();
            if dialable.is_empty() {
                return None;
            }
            let (tx, rx) = mpsc::channel(DERP_QUEUE);
            let (preferred, preferred_rx) = watch::channel(region == self.home);
            let connected = Arc::new(AtomicBool::new(false));
            let task = tokio::spawn(region_task(
                region,
                RegionNodes {
                    nodes: dialable,
                    key: self.private_key.clone(),
                },
                RegionIo {
                    outbound: rx,
                    preferred: preferred_rx,
                    inbound: self.inbound_tx.clone(),
                    connected: connected.clone(),
                },
            ));
            self.derp.insert(
                region,
                DerpLink {
                    outbound: tx,
                    arena: PacketArena::default(),
                    preferred,
                    task,
                    nodes,
                    last_write: Instant::now(),
                    connected,
                },
            );
        }
        self.derp.get_mut(&region)
    }

    pub(super) fn set_derp_map(&mut self, map: &DerpMap) {
        let regions: BTreeMap<u16, DerpRegion> = map
            .regions
            .iter()
            .flatten()
            .filter_map(|(id, r)| Some((u16::try_from(*id).ok()?, r.clone()?)))
            .collect();
        self.derp_map = regions;
        // Links to regions that went away or whose nodes changed are closed (redialed on use).
        let map = &self.derp_map;
        self.derp
            .retain(|id, link| map.get(id).is_some_and(|r| r.nodes == link.nodes));
        // The netcheck task measures the new set and reports back; a home that left the map
        // is replaced at once (by the fallback until a report arrives).
        let regions = self.derp_map.clone();
        self.regions_tx.send_if_modified(|r| {
            let changed = *r != regions;
            *r = regions;
            changed
        });
        if self.home != 0 && !self.region_facts().contains_key(&self.home) {
            let home = netcheck::fallback_home(&self.region_facts());
            self.set_home(home);
        }
    }
}

/// Tells a region task its preferred flag; only a change wakes it (only changes are sent).
pub(super) fn note_preferred(flag: &watch::Sender<bool>, preferred: bool) {
    flag.send_if_modified(|p| std::mem::replace(p, preferred) != preferred);
}

/// How to dial a DERP node from its map entry. `TS_DEBUG_USE_DERP_HTTP=1` dials plain HTTP on
/// port 3340 like the Go client.
pub fn client_config(node: &DerpNode, key: &NodePrivate, preferred: bool) -> Option<ClientConfig> {
    let plain = std::env::var("TS_DEBUG_USE_DERP_HTTP").is_ok_and(|v| v == "1" || v == "true");
    let ip = dial_ip(node)?;
    let port = match (plain, node.derp_port) {
        (true, _) => 3340,
        (false, 0) => 443,
        (false, p) => u16::try_from(p).ok()?,
    };
    let transport = if plain {
        Transport::Plain
    } else {
        Transport::Tls {
            server_name: node.host_name.clone(),
            verify: tls_verify(node),
        }
    };
    Some(ClientConfig {
        addr: SocketAddr::new(ip, port),
        host: node.host_name.clone(),
        transport,
        private_key: key.clone(),
        preferred,
    })
}

/// The address to dial: the map's IPv4, else its IPv6, else a `HostName` that is an IP literal.
/// A node named only by host name has none until [`resolve::resolve_node`] filled them in.
fn dial_ip(node: &DerpNode) -> Option<IpAddr> {
    match (
        resolve::map_addr(&node.ipv4, false),
        resolve::map_addr(&node.ipv6, true),
    ) {
        (MapAddr::Ip(ip), _) | (_, MapAddr::Ip(ip)) => Some(ip),
        _ => node.host_name.parse().ok(),
    }
}

/// The map's certificate rule for a node (Go `derphttp`): `InsecureForTests` accepts anything,
/// `CertName: "sha256-raw:<hex>"` pins the leaf, another `CertName` is the name the certificate
/// must carry, and otherwise the certificate must verify for `HostName` against the system's
/// roots (and `SSL_CERT_FILE`/`SSL_CERT_DIR`).
fn tls_verify(node: &DerpNode) -> TlsVerify {
    if node.insecure_for_tests {
        return TlsVerify::Insecure;
    }
    if let Some(pin) = node
        .cert_name
        .strip_prefix("sha256-raw:")
        .and_then(|h| hex::decode(h).ok())
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
    {
        return TlsVerify::PinSha256(pin);
    }
    let roots = crate::trust::root_store();
    if node.cert_name.is_empty() {
        TlsVerify::Roots(roots)
    } else {
        TlsVerify::RootsFor {
            roots,
            cert_name: node.cert_name.clone(),
        }
    }
}

/// The nodes a region task dials, in order, and our key.
pub(super) struct RegionNodes {
    nodes: Vec<DerpNode>,
    key: NodePrivate,
}

impl RegionNodes {
    /// How to dial the `attempt`-th node (round robin): its host name resolved when the map
    /// gives no address, its certificate rules from the map.
    async fn config(&self, attempt: usize, preferred: bool) -> Result<ClientConfig, String> {
        let node = self
            .nodes
            .get(attempt % self.nodes.len().max(1))
            .ok_or("the region has no DERP nodes")?;
        let node = resolve::resolve_node(node)
            .await
            .map_err(|e| e.to_string())?;
        client_config(&node, &self.key, preferred)
            .ok_or_else(|| format!("DERP node {} has no usable address", node.name))
    }
}

/// What a region's task exchanges with the engine.
pub(super) struct RegionIo {
    /// Packets to send.
    pub(super) outbound: mpsc::Receiver<(NodePublic, Bytes)>,
    /// Whether this is our home region.
    pub(super) preferred: watch::Receiver<bool>,
    /// Packets and events received.
    pub(super) inbound: mpsc::Sender<Delivery>,
    /// Set while the connection is up.
    pub(super) connected: Arc<AtomicBool>,
}

/// Clears the connected flag however the task ends (aborted included).
struct ConnectedFlag(Arc<AtomicBool>);

impl Drop for ConnectedFlag {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

/// Keeps one connection to `region` up (nodes tried in order), sending what arrives on
/// `outbound` and passing received packets to `inbound`.
pub(super) async fn region_task(region: u16, dial: RegionNodes, io: RegionIo) {
    let RegionIo {
        outbound,
        mut preferred,
        inbound,
        connected,
    } = io;
    let connected = ConnectedFlag(connected);
    // Each connection's writer takes packets from here itself while it is up.
    let outbound: SendQueue = Arc::new(tokio::sync::Mutex::new(outbound));
    let mut reconnector = Reconnector::default();
    let mut node = 0usize;
    loop {
        if let Some(at) = reconnector.next_attempt() {
            tokio::time::sleep_until(at.into()).await;
        }
        let is_preferred = *preferred.borrow_and_update();
        let config = match dial.config(node, is_preferred).await {
            Ok(config) => config,
            Err(e) => {
                tracing::debug!(region, error = %e, "DERP node not dialable");
                reconnector.on_failure(Instant::now(), Reconnector::random_jitter());
                node += 1;
                continue;
            }
        };
        let deliver = DeliverTo {
            region,
            tx: inbound.clone(),
        };
        let connecting = DerpClient::connect_delivering(&config, deliver, Some(outbound.clone()));
        let mut client = match connecting.await {
            Ok(c) => c,
            Err(e) => {
                let error = e.to_string();
                match crate::trust::certificate_hint(&error) {
                    // A certificate problem will not fix itself: say so where people look.
                    Some(hint) => {
                        tracing::warn!(region, addr = %config.addr, %error, hint, "DERP server's certificate refused")
                    }
                    None => {
                        tracing::debug!(region, addr = %config.addr, %error, "DERP connect failed")
                    }
                }
                reconnector.on_failure(Instant::now(), Reconnector::random_jitter());
                node += 1;
                continue;
            }
        };
        tracing::info!(region, addr = %config.addr, "DERP connected");
        connected.0.store(true, Ordering::Relaxed);
        let why = loop {
            tokio::select! {
                changed = preferred.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let value = *preferred.borrow_and_update();
                    if let Err(e) = client.note_preferred(value).await {
                        break e.to_string();
                    }
                }
                // Packets went between the engine's queues and the socket directly; here
                // the rest, and a failed read or write.
                event = client.recv() => match event {
                    Ok(_) => reconnector.on_success(),
                    Err(e) => break e.to_string(),
                }
            }
        };
        if client.delivered_any() {
            reconnector.on_success();
        }
        connected.0.store(false, Ordering::Relaxed);
        tracing::info!(region, error = %why, "DERP connection lost; reconnecting");
        reconnector.on_failure(Instant::now(), Reconnector::random_jitter());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(id: u16, stun_only: bool, avoid: bool) -> DerpRegion {
        DerpRegion {
            region_id: i32::from(id),
            avoid,
            nodes: vec![DerpNode {
                name: format!("{id}a"),
                region_id: i32::from(id),
                host_name: "198.18.0.10".into(),
                ipv4: "198.18.0.10".into(),
                stun_only,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn the_arena_copies_packets_intact_a_block_for_dozens() {
        let mut arena = PacketArena::default();
        let packets: Vec<Vec<u8>> = (0..200u32)
            .map(|i| vec![i as u8; 1200 + (i as usize * 7) % 200])
            .collect();
        let now = Instant::now();
        let mut copies: Vec<Bytes> = packets.iter().map(|p| arena.copy(p, now)).collect();
        for (packet, copy) in packets.iter().zip(&copies) {
            assert_eq!(&copy[..], &packet[..]);
        }
        // ~260 KB in 64 KiB blocks: a copy not right after the one before starts a block.
        let blocks = 1 + copies
            .windows(2)
            .filter(|w| w[1].as_ptr() != w[0].as_ptr().wrapping_add(w[0].len()))
            .count();
        assert!((4..=5).contains(&blocks), "{blocks} blocks");
        // A packet larger than a block gets a block of its own size.
        let big = vec![0xee; ARENA_BLOCK + 1];
        assert_eq!(&arena.copy(&big, now)[..], &big[..]);
        // Copies outlive the arena and the others of their block.
        drop(arena);
        let rest = copies.split_off(100);
        drop(copies);
        for (packet, copy) in packets[100..].iter().zip(&rest) {
            assert_eq!(&copy[..], &packet[..]);
        }
    }

    #[test]
    fn region_choice_follows_go() {
        let connected = |set: &'static [u16]| move |r: u16| set.contains(&r);
        // Home region connected: use it, even if the peer was heard elsewhere.
        let both = connected(&[901, 902]);
        assert_eq!(choose_region(901, Some(902), 900, both), Some(901));
        // Not connected to its home but heard on a connected region: reply there.
        assert_eq!(
            choose_region(901, Some(902), 900, connected(&[902])),
            Some(902)
        );
        // Heard on a region we are no longer connected to: dial its home.
        assert_eq!(
            choose_region(901, Some(902), 900, connected(&[])),
            Some(901)
        );
        // No home: the region it was heard on, else our own home.
        assert_eq!(choose_region(0, Some(902), 900, connected(&[])), Some(902));
        assert_eq!(choose_region(0, None, 900, connected(&[900])), Some(900));
        assert_eq!(choose_region(0, None, 0, connected(&[])), None);
    }

    #[test]
    fn client_config_follows_the_derp_node() {
        let key = NodePrivate::generate();
        let mut node = region(900, false, false).nodes.remove(0);
        node.derp_port = 8443;
        node.insecure_for_tests = true;
        let c = client_config(&node, &key, true).unwrap();
        assert_eq!(c.addr, "198.18.0.10:8443".parse().unwrap());
        assert!(c.preferred);
        assert!(matches!(
            c.transport,
            Transport::Tls {
                verify: TlsVerify::Insecure,
                ..
            }
        ));
        node.insecure_for_tests = false;
        node.cert_name = format!("sha256-raw:{}", "ab".repeat(32));
        node.derp_port = 0;
        let c = client_config(&node, &key, false).unwrap();
        assert_eq!(c.addr.port(), 443);
        assert!(matches!(
            c.transport,
            Transport::Tls {
                verify: TlsVerify::PinSha256(p),
                ..
            } if p == [0xab; 32]
        ));
        node.ipv4 = "none".into();
        node.host_name = "derp.example".into();
        assert!(client_config(&node, &key, false).is_none());
    }
}
