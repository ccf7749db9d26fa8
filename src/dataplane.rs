//! The data plane (dataplane spec §2.8, §4, §9): a kernel TUN, one WireGuard peer table, and
//! DERP as the only path for now; the home region comes from [`crate::netcheck`].
//!
//! One engine task owns the TUN, the [`WgPeers`] table, the inbound filter and the UDP sockets;
//! each DERP region has a small task that keeps one connection up (reconnecting with the Go
//! back-off) and hands received packets back over a channel. Flow:
//! TUN read → AllowedIPs route → encapsulate → DERP to the peer's home region;
//! DERP packet from node key K → `decapsulate_for(K)` → filter → TUN write.
//! WireGuard timers run at `WgPeers::next_deadline` (a sleep, not a tick).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

pub mod api;

use bytes::Bytes;
use ipnet::IpNet;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::control::tailcfg::{DerpMap, DerpNode, DerpRegion};
use crate::derp::client::{ClientConfig, DerpClient, Event, Reconnector, TlsVerify, Transport};
use crate::filter::{Filter, Verdict};
use crate::keys::{NodePrivate, NodePublic};
use crate::netcheck::{self, LatencyHistory, RegionFacts};
use crate::netmap::NetworkMap;
use crate::packet::PacketSummary;
use crate::status::{rfc3339, Status};
use crate::wg::{consts, PeerId, WgOutput, WgPeers};
use tern_platform::router::{default_routes, NetlinkRouter, Router};
use tern_platform::tun::{LinuxTun, Tun, TunConfig, DEFAULT_MTU};

/// Largest packet handled: the TUN MTU leaves room, DERP caps packets at 64 KiB.
const BUF_LEN: usize = 65535;
/// Packets queued towards one DERP region before new ones are dropped.
const DERP_QUEUE: usize = 512;
/// How often per-peer counters are copied into the status snapshot.
const STATUS_EVERY: Duration = Duration::from_secs(1);

/// How the daemon runs the data plane.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub tun_name: String,
    pub port: u16,
    pub node_key: NodePrivate,
    /// This process's disco key (control publishes its public half to peers).
    pub disco_key: crate::keys::DiscoPrivate,
}

/// Errors that stop the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("TUN: {0}")]
    Platform(#[from] tern_platform::PlatformError),
    #[error("UDP socket on port {port}: {source}")]
    Udp { port: u16, source: std::io::Error },
    #[error("TUN i/o: {0}")]
    TunIo(std::io::Error),
}

/// Counters of packets the engine dropped, by cause.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DropCounters {
    /// UDP datagrams (no direct paths yet), by what they were.
    pub udp: u64,
    /// Packets to a peer without a DERP region we can reach.
    pub no_derp: u64,
    /// DERP queue full.
    pub derp_queue_full: u64,
    /// Refused by the inbound packet filter.
    pub filtered: u64,
    /// From node keys that are not our peers.
    pub unknown_sender: u64,
    /// Disco messages (no path discovery yet).
    pub disco: u64,
}

/// Starts the engine: it waits for the first netmap, then brings the TUN up and runs until
/// aborted. `home_derp` receives our home region for control. The [`api::EngineHandle`] asks
/// the running engine for pings and netchecks.
pub fn spawn(
    config: EngineConfig,
    netmaps: watch::Receiver<Option<Arc<NetworkMap>>>,
    home_derp: watch::Sender<u16>,
    status: watch::Sender<Status>,
) -> (JoinHandle<()>, api::EngineHandle) {
    let (tx, requests) = mpsc::channel(api::REQUEST_QUEUE);
    let task = tokio::spawn(async move {
        let _requests = requests; // answered once direct paths are wired in
        let note = match run(config, netmaps, home_derp, &status).await {
            Ok(()) => "stopped: the control session ended".to_string(),
            Err(e) => {
                tracing::error!(error = %e, "data plane stopped");
                format!("data plane failed: {e}")
            }
        };
        status.send_modify(|s| {
            s.data_plane.active = false;
            s.data_plane.note = Some(note);
        });
    });
    (task, api::EngineHandle { tx })
}

async fn run(
    config: EngineConfig,
    mut netmaps: watch::Receiver<Option<Arc<NetworkMap>>>,
    home_derp: watch::Sender<u16>,
    status: &watch::Sender<Status>,
) -> Result<(), EngineError> {
    let Ok(first) = netmaps
        .wait_for(|m| m.as_ref().is_some_and(|m| m.self_node.is_some()))
        .await
        .map(|m| m.clone())
    else {
        return Ok(()); // control went away before a netmap
    };
    let tun = LinuxTun::create(&TunConfig {
        name: config.tun_name.clone(),
        mtu: DEFAULT_MTU,
    })
    .await?;
    let ipv6 = ipv6_enabled();
    let routes: Vec<IpNet> = default_routes()
        .into_iter()
        .filter(|r| ipv6 || r.addr().is_ipv4())
        .collect();
    let mut router = NetlinkRouter::new(tun.netlink().clone(), tun.index());
    router.set_routes(&routes).await?;
    let sockets = UdpSockets::bind(config.port)?;
    tracing::info!(
        tun = tun.name(),
        port = config.port,
        "data plane up (DERP only)"
    );

    let (inbound_tx, inbound_rx) = mpsc::channel(1024);
    let (regions_tx, regions_rx) = watch::channel(BTreeMap::new());
    let (report_tx, reports) = mpsc::channel(4);
    let netcheck = AbortOnDrop(tokio::spawn(netcheck_task(regions_rx, report_tx)));
    let mut engine = Engine::new(config.node_key.clone(), inbound_tx, home_derp, regions_tx);
    engine.ipv6 = ipv6;
    if !ipv6 {
        tracing::info!("IPv6 is disabled here: tailnet IPv6 addresses and routes are skipped");
    }
    if let Some(map) = first {
        engine.apply_netmap(&map, &tun).await?;
    }
    status.send_modify(|s| {
        s.data_plane.active = true;
        s.data_plane.note = None;
    });
    let served = engine
        .serve(&tun, &sockets, netmaps, inbound_rx, reports, status)
        .await;
    drop(netcheck);
    served
}

/// One measurement of every region (`None` = no answer).
struct LatencyReport {
    started: Instant,
    latency: BTreeMap<u16, Option<Duration>>,
}

/// Aborts a task when dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Measures DERP latency when the region set changes and every 20–26 s (spec §5.2), handing
/// each report (latency per region, `None` = no answer) to the engine.
async fn netcheck_task(
    mut regions: watch::Receiver<BTreeMap<u16, DerpRegion>>,
    reports: mpsc::Sender<LatencyReport>,
) {
    loop {
        let map = regions.borrow_and_update().clone();
        if !map.is_empty() {
            let started = Instant::now();
            let latency = netcheck::measure(&map).await;
            tracing::debug!(?latency, "DERP latency report");
            if reports
                .send(LatencyReport { started, latency })
                .await
                .is_err()
            {
                return;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(netcheck::next_interval()), if !map.is_empty() => {}
            changed = regions.changed() => if changed.is_err() { return },
        }
    }
}

/// Whether this network namespace has IPv6 (the kernel refuses v6 addresses and routes when
/// `net.ipv6.conf.all.disable_ipv6` is 1).
fn ipv6_enabled() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv6/conf/all/disable_ipv6")
        .map(|v| v.trim() == "0")
        .unwrap_or(false)
}

/// One UDP socket per address family on `--port` (spec: one socket per family; WireGuard,
/// disco and STUN share it). Nothing is sent on them yet: DERP is the only path.
struct UdpSockets {
    v4: UdpSocket,
    v6: Option<UdpSocket>,
}

impl UdpSockets {
    fn bind(port: u16) -> Result<Self, EngineError> {
        let err = |source| EngineError::Udp { port, source };
        let v4 = bind_udp(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port)).map_err(err)?;
        let v6 = match bind_udp(SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port)) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::info!(error = %e, "no IPv6 UDP socket");
                None
            }
        };
        Ok(Self { v4, v6 })
    }

    async fn recv(&self, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddr)> {
        match &self.v6 {
            Some(v6) => {
                let mut buf6 = [0u8; 2048];
                tokio::select! {
                    r = self.v4.recv_from(buf) => r,
                    r = v6.recv_from(&mut buf6) => {
                        let (n, from) = r?;
                        let n = n.min(buf.len());
                        buf[..n].copy_from_slice(&buf6[..n]);
                        Ok((n, from))
                    }
                }
            }
            None => self.v4.recv_from(buf).await,
        }
    }
}

fn bind_udp(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let domain = socket2::Domain::for_address(addr);
    let socket = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

/// What a DERP region task passes to the engine.
enum DerpEvent {
    /// A packet from `src`.
    Packet {
        region: u16,
        src: NodePublic,
        packet: Bytes,
    },
    /// The server says `peer` left: forget that we heard it there.
    PeerGone { region: u16, peer: NodePublic },
}

/// Our side of one DERP region's task.
struct DerpLink {
    outbound: mpsc::Sender<(NodePublic, Bytes)>,
    /// Whether this is our home region (NotePreferred on change and after each dial).
    preferred: watch::Sender<bool>,
    task: JoinHandle<()>,
    nodes: Vec<DerpNode>,
    last_write: Instant,
}

/// Non-home DERP connections unused for this long are closed (spec §2.8).
const DERP_IDLE_CLOSE: Duration = Duration::from_secs(60);

/// Which region carries a packet to a peer (spec §2.8, Go `derpWriteChanForRegion`): its home
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

/// Per-peer facts from the netmap the engine needs.
#[derive(Debug, Clone)]
struct PeerInfo {
    key: NodePublic,
    home_derp: u16,
}

struct Engine {
    peers: WgPeers,
    info: HashMap<PeerId, PeerInfo>,
    /// The inbound filter; `None` until a netmap compiled (everything is dropped until then).
    filter: Option<Filter>,
    local: Vec<IpNet>,
    derp_map: BTreeMap<u16, DerpRegion>,
    derp: HashMap<u16, DerpLink>,
    home: u16,
    home_tx: watch::Sender<u16>,
    /// The region set the netcheck task measures.
    regions_tx: watch::Sender<BTreeMap<u16, DerpRegion>>,
    latency_history: LatencyHistory,
    /// When each region last delivered a packet (updated at most every 5 s, spec §5.6).
    last_frame: HashMap<u16, Instant>,
    inbound_tx: mpsc::Sender<DerpEvent>,
    /// Where each peer's packets last came from (what status shows while DERP is the path).
    last_region: HashMap<PeerId, u16>,
    private_key: NodePrivate,
    /// Whether tailnet IPv6 addresses go on the TUN.
    ipv6: bool,
    drops: DropCounters,
    out: Vec<u8>,
    to_send: Vec<(PeerId, Vec<u8>)>,
}

impl Engine {
    fn new(
        private_key: NodePrivate,
        inbound_tx: mpsc::Sender<DerpEvent>,
        home_tx: watch::Sender<u16>,
        regions_tx: watch::Sender<BTreeMap<u16, DerpRegion>>,
    ) -> Self {
        Self {
            peers: WgPeers::new(private_key.clone()),
            info: HashMap::new(),
            filter: None,
            local: Vec::new(),
            derp_map: BTreeMap::new(),
            derp: HashMap::new(),
            home: 0,
            home_tx,
            regions_tx,
            latency_history: LatencyHistory::default(),
            last_frame: HashMap::new(),
            inbound_tx,
            last_region: HashMap::new(),
            private_key,
            ipv6: true,
            drops: DropCounters::default(),
            out: vec![0u8; BUF_LEN + consts::DATA_OVERHEAD + consts::MIN_OUT_BUF],
            to_send: Vec::new(),
        }
    }

    async fn serve(
        &mut self,
        tun: &LinuxTun,
        udp: &UdpSockets,
        mut netmaps: watch::Receiver<Option<Arc<NetworkMap>>>,
        mut inbound: mpsc::Receiver<DerpEvent>,
        mut reports: mpsc::Receiver<LatencyReport>,
        status: &watch::Sender<Status>,
    ) -> Result<(), EngineError> {
        let mut tun_buf = vec![0u8; BUF_LEN];
        let mut udp_buf = vec![0u8; 2048];
        let mut status_tick = tokio::time::interval(STATUS_EVERY);
        status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut logged_drops = DropCounters::default();
        loop {
            let deadline = self.peers.next_deadline();
            let sleep_until = deadline
                .map(tokio::time::Instant::from_std)
                .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                r = tun.recv(&mut tun_buf) => {
                    let n = r.map_err(EngineError::TunIo)?;
                    if let Some(packet) = tun_buf.get(..n) {
                        self.outbound(packet);
                    }
                }
                Some(event) = inbound.recv() => match event {
                    DerpEvent::Packet { region, src, packet } => {
                        self.note_frame_from(region);
                        if let Some(packet) = self.inbound(region, src, &packet) {
                            if let Err(e) = tun.send(&packet).await {
                                tracing::debug!(error = %e, "TUN write failed");
                            }
                        }
                    }
                    DerpEvent::PeerGone { region, peer } => self.peer_gone(region, &peer),
                },
                Some(report) = reports.recv() => {
                    publish_latency(status, &report.latency);
                    self.on_latency_report(report);
                }
                r = udp.recv(&mut udp_buf) => {
                    if let Ok((n, from)) = r {
                        self.udp_datagram(udp_buf.get(..n).unwrap_or_default(), from);
                    }
                }
                changed = netmaps.changed() => {
                    if changed.is_err() {
                        return Ok(()); // control task gone: the daemon is stopping us
                    }
                    let map = netmaps.borrow_and_update().clone();
                    if let Some(map) = map {
                        self.apply_netmap(&map, tun).await?;
                    }
                }
                _ = tokio::time::sleep_until(sleep_until), if deadline.is_some() => {
                    let to_send = &mut self.to_send;
                    self.peers.update_timers(Instant::now(), &mut self.out, |id, b| {
                        to_send.push((id, b.to_vec()));
                    });
                }
                _ = status_tick.tick() => {
                    self.publish(status);
                    self.close_idle_derp(Instant::now());
                    if self.drops != logged_drops {
                        tracing::debug!(drops = ?self.drops, "data plane drop counters");
                        logged_drops = self.drops;
                    }
                }
            }
            self.flush();
        }
    }

    /// A packet from the TUN: route, encrypt, queue for DERP.
    fn outbound(&mut self, packet: &[u8]) {
        if let (Ok(summary), Some(filter)) = (PacketSummary::parse(packet), &mut self.filter) {
            filter.note_outbound(&summary);
        }
        let now = Instant::now();
        match self.peers.encapsulate(now, packet, &mut self.out) {
            (Some(id), WgOutput::ToNetwork(n)) => {
                if let Some(bytes) = self.out.get(..n) {
                    self.to_send.push((id, bytes.to_vec()));
                }
            }
            (_, WgOutput::Dropped(reason)) => {
                tracing::trace!(?reason, "outbound packet dropped");
            }
            _ => {}
        }
    }

    /// A packet from DERP: decrypt for the sending peer, filter, hand back for the TUN.
    fn inbound(&mut self, region: u16, src: NodePublic, packet: &[u8]) -> Option<Vec<u8>> {
        let Some(id) = self.peers.id_of(&src) else {
            self.drops.unknown_sender += 1;
            return None;
        };
        if matches!(
            crate::demux::classify_derp(packet),
            crate::demux::Inbound::Disco { .. }
        ) {
            self.drops.disco += 1;
            return None; // disco over DERP: no path discovery yet
        }
        self.last_region.insert(id, region);
        let now = Instant::now();
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
                    (Ok(s), Some(filter)) => filter.check(&s) == Verdict::Accept,
                    _ => false,
                };
                if accepted {
                    Some(packet.to_vec())
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

    /// No direct paths yet: every UDP datagram is classified and counted.
    fn udp_datagram(&mut self, datagram: &[u8], from: SocketAddr) {
        let kind = crate::demux::classify_udp(datagram);
        tracing::trace!(%from, ?kind, "UDP datagram dropped (DERP-only data plane)");
        self.drops.udp += 1;
    }

    /// The DERP server says `peer` left region `region`.
    fn peer_gone(&mut self, region: u16, peer: &NodePublic) {
        if let Some(id) = self.peers.id_of(peer) {
            if self.last_region.get(&id) == Some(&region) {
                self.last_region.remove(&id);
            }
        }
    }

    /// Sends everything queued to the peers' DERP regions.
    fn flush(&mut self) {
        let now = Instant::now();
        for (id, packet) in std::mem::take(&mut self.to_send) {
            let Some(info) = self.info.get(&id) else {
                continue;
            };
            let key = info.key;
            let derp = &self.derp;
            let heard_on = self.last_region.get(&id).copied();
            let region = choose_region(info.home_derp, heard_on, self.home, |r| {
                derp.contains_key(&r)
            });
            let Some(link) = region.and_then(|r| self.derp_link(r)) else {
                self.drops.no_derp += 1;
                continue;
            };
            link.last_write = now;
            if link.outbound.try_send((key, Bytes::from(packet))).is_err() {
                self.drops.derp_queue_full += 1;
            }
        }
    }

    /// Closes non-home DERP connections nothing was written to for [`DERP_IDLE_CLOSE`].
    fn close_idle_derp(&mut self, now: Instant) {
        let home = self.home;
        self.derp.retain(|region, link| {
            *region == home || now.saturating_duration_since(link.last_write) < DERP_IDLE_CLOSE
        });
    }

    /// The connection to `region`, dialed on first use.
    fn derp_link(&mut self, region: u16) -> Option<&mut DerpLink> {
        if !self.derp.contains_key(&region) {
            let nodes = self.derp_map.get(&region)?.nodes.clone();
            let configs: Vec<ClientConfig> = nodes
                .iter()
                .filter(|n| !n.stun_only)
                .filter_map(|n| client_config(n, &self.private_key, region == self.home))
                .collect();
            if configs.is_empty() {
                return None;
            }
            let (tx, rx) = mpsc::channel(DERP_QUEUE);
            let (preferred, preferred_rx) = watch::channel(region == self.home);
            let task = tokio::spawn(region_task(
                region,
                configs,
                rx,
                preferred_rx,
                self.inbound_tx.clone(),
            ));
            self.derp.insert(
                region,
                DerpLink {
                    outbound: tx,
                    preferred,
                    task,
                    nodes,
                    last_write: Instant::now(),
                },
            );
        }
        self.derp.get_mut(&region)
    }

    /// Brings addresses, peers, filter and DERP in line with a new netmap.
    async fn apply_netmap(&mut self, map: &NetworkMap, tun: &LinuxTun) -> Result<(), EngineError> {
        let Some(me) = &map.self_node else {
            return Ok(());
        };
        let local: Vec<IpNet> = me
            .addresses
            .iter()
            .filter(|p| p.prefix_len() == p.max_prefix_len())
            .filter(|p| self.ipv6 || p.addr().is_ipv4())
            .copied()
            .collect();
        if local != self.local {
            tun.set_addresses(&local).await?;
            self.local = local;
        }
        match Filter::from_rules(&map.packet_filter(), &self.local) {
            Ok(f) => self.filter = Some(f),
            Err(e) => {
                tracing::warn!(error = %e, "bad packet filter from control; keeping the old one")
            }
        }
        self.sync_peers(map);
        if let Some(derp_map) = &map.derp_map {
            self.set_derp_map(derp_map);
        }
        Ok(())
    }

    fn sync_peers(&mut self, map: &NetworkMap) {
        let mut seen = Vec::with_capacity(map.peers.len());
        for node in map.peers.values() {
            match self.peers.upsert(node.key, node.effective_allowed_ips()) {
                Ok(id) => {
                    seen.push(id);
                    self.info.insert(
                        id,
                        PeerInfo {
                            key: node.key,
                            home_derp: u16::try_from(node.effective_home_derp()).unwrap_or(0),
                        },
                    );
                }
                Err(e) => tracing::debug!(peer = %node.key, error = %e, "peer not added"),
            }
        }
        let gone: Vec<(PeerId, NodePublic)> = self
            .info
            .iter()
            .filter(|(id, _)| !seen.contains(id))
            .map(|(id, p)| (*id, p.key))
            .collect();
        for (id, key) in gone {
            self.peers.remove(&key);
            self.info.remove(&id);
            self.last_region.remove(&id);
        }
    }

    fn set_derp_map(&mut self, map: &DerpMap) {
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

    fn region_facts(&self) -> BTreeMap<u16, RegionFacts> {
        self.derp_map
            .iter()
            .map(|(id, r)| (*id, RegionFacts::of(r)))
            .collect()
    }

    /// A latency report from the netcheck task: choose the home by spec §5.6.
    fn on_latency_report(&mut self, report: LatencyReport) {
        let now = Instant::now();
        let measured = report
            .latency
            .iter()
            .filter_map(|(id, l)| Some((*id, (*l)?)))
            .collect();
        self.latency_history.add(now, measured);
        let home_heard = self.last_frame.get(&self.home).is_some_and(|t| {
            *t >= report.started || now.saturating_duration_since(*t) < netcheck::HOME_FRAME_WINDOW
        });
        let home = netcheck::select_home(
            &self.region_facts(),
            &report.latency,
            &self.latency_history.best_recent(),
            self.home,
            home_heard,
        );
        self.set_home(home);
    }

    /// Notes that `region` delivered a frame (at most once every 5 s, as Go).
    fn note_frame_from(&mut self, region: u16) {
        let now = Instant::now();
        let stale = self
            .last_frame
            .get(&region)
            .is_none_or(|t| now.saturating_duration_since(*t) >= Duration::from_secs(5));
        if stale {
            self.last_frame.insert(region, now);
        }
    }

    /// Makes `home` our home region: NotePreferred(false) to the old one, a connection with
    /// NotePreferred(true) to the new one, and the news to control (spec §2.8, §5.6 step 7).
    fn set_home(&mut self, home: u16) {
        if home == self.home {
            return;
        }
        let old = std::mem::replace(&mut self.home, home);
        tracing::info!(region = home, previous = old, "home DERP region");
        if let Some(link) = self.derp.get(&old) {
            note_preferred(&link.preferred, false);
        }
        if home != 0 {
            if let Some(link) = self.derp_link(home) {
                note_preferred(&link.preferred, true);
            }
        }
        self.home_tx.send_replace(home);
    }

    /// Copies per-peer path and counters into the status snapshot.
    fn publish(&self, status: &watch::Sender<Status>) {
        let now_instant = Instant::now();
        let now_wall = SystemTime::now();
        status.send_if_modified(|s| {
            let before = s.peers.clone();
            s.data_plane.active = true;
            s.data_plane.note = None;
            for p in &mut s.peers {
                let Some(id) = p.node_key.parse().ok().and_then(|k| self.peers.id_of(&k)) else {
                    continue;
                };
                let Some(session) = self.peers.session(id) else {
                    continue;
                };
                let stats = session.stats();
                let region = self
                    .last_region
                    .get(&id)
                    .copied()
                    .or_else(|| self.info.get(&id).map(|i| i.home_derp))
                    .filter(|r| *r != 0);
                p.path = region.map(|_| "derp".to_string());
                p.derp_region = region;
                p.rx_bytes = stats.rx_bytes;
                p.tx_bytes = stats.tx_bytes;
                p.last_handshake_at = session.last_handshake().and_then(|t| {
                    let ago = now_instant.checked_duration_since(t)?;
                    Some(rfc3339(now_wall.checked_sub(ago)?))
                });
                p.path_reason = region.map(|_| "DERP only: no direct paths yet".to_string());
            }
            s.peers != before
        });
    }
}

/// Tells a region task its preferred flag; only a change wakes it (only changes are sent).
fn note_preferred(flag: &watch::Sender<bool>, preferred: bool) {
    flag.send_if_modified(|p| std::mem::replace(p, preferred) != preferred);
}

/// Puts a latency report into the status snapshot (milliseconds, `None` = no answer).
fn publish_latency(status: &watch::Sender<Status>, report: &BTreeMap<u16, Option<Duration>>) {
    let ms = report
        .iter()
        .map(|(id, l)| (*id, l.map(|d| (d.as_secs_f64() * 10_000.0).round() / 10.0)))
        .collect();
    status.send_modify(|s| s.data_plane.derp_latency_ms = ms);
}

/// How to dial a DERP node from its map entry. `TS_DEBUG_USE_DERP_HTTP=1` dials plain HTTP on
/// port 3340 like the Go client.
pub fn client_config(node: &DerpNode, key: &NodePrivate, preferred: bool) -> Option<ClientConfig> {
    let plain = std::env::var("TS_DEBUG_USE_DERP_HTTP").is_ok_and(|v| v == "1" || v == "true");
    let ip: IpAddr = match node.ipv4.as_str() {
        "" | "none" => node.host_name.parse().ok()?,
        v4 => v4.parse().ok()?,
    };
    let port = match (plain, node.derp_port) {
        (true, _) => 3340,
        (false, 0) => 443,
        (false, p) => u16::try_from(p).ok()?,
    };
    let transport = if plain {
        Transport::Plain
    } else {
        let verify = if node.insecure_for_tests {
            TlsVerify::Insecure
        } else if let Some(pin) = node
            .cert_name
            .strip_prefix("sha256-raw:")
            .and_then(|h| hex::decode(h).ok())
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
        {
            TlsVerify::PinSha256(pin)
        } else {
            // No system trust store is loaded yet; public DERP is out of scope for the lab.
            TlsVerify::Roots(Arc::new(rustls::RootCertStore::empty()))
        };
        Transport::Tls {
            server_name: node.host_name.clone(),
            verify,
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

/// Keeps one connection to `region` up (nodes tried in order), sending what arrives on
/// `outbound` and passing received packets to `inbound`.
async fn region_task(
    region: u16,
    configs: Vec<ClientConfig>,
    mut outbound: mpsc::Receiver<(NodePublic, Bytes)>,
    mut preferred: watch::Receiver<bool>,
    inbound: mpsc::Sender<DerpEvent>,
) {
    let mut reconnector = Reconnector::default();
    let mut node = 0usize;
    loop {
        let Some(config) = configs.get(node % configs.len().max(1)) else {
            return;
        };
        if let Some(at) = reconnector.next_attempt() {
            tokio::time::sleep_until(at.into()).await;
        }
        let config = ClientConfig {
            preferred: *preferred.borrow_and_update(),
            ..config.clone()
        };
        let mut client = match DerpClient::connect(&config).await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(region, addr = %config.addr, error = %e, "DERP connect failed");
                reconnector.on_failure(Instant::now(), Reconnector::random_jitter());
                node += 1;
                continue;
            }
        };
        tracing::info!(region, addr = %config.addr, "DERP connected");
        let why = loop {
            tokio::select! {
                msg = outbound.recv() => {
                    let Some((dst, packet)) = msg else { return };
                    if let Err(e) = client.send(dst, packet).await {
                        break e.to_string();
                    }
                }
                changed = preferred.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let value = *preferred.borrow_and_update();
                    if let Err(e) = client.note_preferred(value).await {
                        break e.to_string();
                    }
                }
                event = client.recv() => match event {
                    Ok(Event::Packet { src, packet }) => {
                        reconnector.on_success();
                        let event = DerpEvent::Packet { region, src, packet };
                        if inbound.send(event).await.is_err() {
                            return;
                        }
                    }
                    Ok(Event::PeerGone { peer, reason }) => {
                        tracing::debug!(region, %peer, ?reason, "DERP peer gone");
                        if inbound.send(DerpEvent::PeerGone { region, peer }).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => reconnector.on_success(),
                    Err(e) => break e.to_string(),
                }
            }
        };
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
