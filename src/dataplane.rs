//! The data plane: a kernel TUN, one WireGuard peer table, the
//! per-peer path machines ([`PeerTable`]) that find direct UDP paths with disco, and DERP.
//!
//! One engine task owns the TUN, the [`WgPeers`] table, the path machines, the inbound filter
//! and the UDP sockets (one per family, shared by WireGuard, disco and STUN; inbound datagrams
//! are told apart by [`crate::demux`]). Each DERP region has a small task that keeps one
//! connection up (reconnecting with the Go back-off) and hands received packets back over a
//! channel; a netcheck task sends STUN on the engine's own sockets (so the mapped addresses are
//! the ones peers must use) and reports latency, endpoints and NAT facts. Flow:
//! TUN read → AllowedIPs route → encapsulate → the peer's [`SendPlan`]: UDP to its direct
//! address and/or DERP to its home region; UDP or DERP in → disco to the path machines, STUN to
//! the netcheck task, WireGuard → decapsulate → filter → TUN write.
//! WireGuard and path timers run at their next deadline (a sleep, not a tick).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

pub mod api;
pub(crate) mod offload;

use bytes::Bytes;
use ipnet::IpNet;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::task::JoinHandle;

use crate::report::LocalNetInfo;
use crate::control::tailcfg::{DerpMap, DerpNode, DerpRegion, EndpointType};
use crate::demux::Inbound;
use crate::derp::client::{ClientConfig, DerpClient, Event, Reconnector, TlsVerify, Transport};
use crate::filter::{Filter, Verdict};
use crate::keys::{NodePrivate, NodePublic};
use crate::netcheck::{self, LatencyHistory, RegionFacts, StunResponse, StunResults, StunSockets};
use crate::netmap::NetworkMap;
use crate::packet::PacketSummary;
use crate::paths::{self, Dest, Path, PeerTable, SendPlan};
use crate::relay::io::RelayRuntime;
use crate::report;
use crate::status::{rfc3339, RelayServerStatus, Status};
use crate::wg::{consts, PeerId, WgOutput, WgPeers};
use tern_platform::router::{default_routes, NetlinkRouter, Router};
use tern_platform::tun::{LinuxTun, Tun, TunConfig, DEFAULT_MTU};

/// Largest packet handled: the TUN MTU leaves room, DERP caps packets at 64 KiB.
const BUF_LEN: usize = 65535;
/// Packets queued towards one DERP region before new ones are dropped.
const DERP_QUEUE: usize = 512;
/// Early handshake retransmissions after a DERP "peer gone": 0.5 s, then doubling, 3 at most.
const HANDSHAKE_RETRY_FIRST: Duration = Duration::from_millis(500);
const HANDSHAKE_RETRIES: u32 = 3;
/// How long a packet from a not-yet-known node key makes us greet it when it joins the netmap.
const LATE_PEER_WINDOW: Duration = Duration::from_secs(10);
/// Not-yet-known senders remembered at most.
const HEARD_UNKNOWN_MAX: usize = 256;
/// Packets read from the TUN or the UDP sockets per wakeup at most (the rest waits for the next).
const BATCH: usize = 64;
/// Socket buffer size asked for on the UDP sockets (Go magicsock's `socketBufferSize`).
const UDP_BUFFER_BYTES: usize = 7 << 20;
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
    /// The peer relay server's UDP port from prefs (`tern set --relay-server-port`); `None` =
    /// no relay server. Changes apply live: the engine starts, restarts or stops the server.
    pub relay_server_port: tokio::sync::watch::Receiver<Option<u16>>,
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

/// Counters of packets the engine dropped, by cause (disco drops are counted by the
/// [`PeerTable`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DropCounters {
    /// UDP datagrams we do not handle: Geneve (peer relay, not yet), STUN requests to us.
    pub udp: u64,
    /// WireGuard over UDP that belongs to no peer.
    pub udp_unknown_peer: u64,
    /// UDP sends that failed (no route, socket buffer full).
    pub udp_send_failed: u64,
    /// STUN responses that answered nothing we asked (wrong transaction ID or source).
    pub stun_unmatched: u64,
    /// Packets to a peer without a DERP region we can reach.
    pub no_derp: u64,
    /// DERP queue full.
    pub derp_queue_full: u64,
    /// Refused by the inbound packet filter.
    pub filtered: u64,
    /// From node keys that are not our peers.
    pub unknown_sender: u64,
}

/// Starts the engine: it waits for the first netmap, then brings the TUN up and runs until
/// aborted. `local` receives what control must know of us (home region, endpoints, NetInfo).
/// The [`api::EngineHandle`] asks the running engine for pings and netchecks.
pub fn spawn(
    config: EngineConfig,
    netmaps: watch::Receiver<Option<Arc<NetworkMap>>>,
    local: watch::Sender<LocalNetInfo>,
    status: watch::Sender<Status>,
) -> (JoinHandle<()>, api::EngineHandle) {
    let (tx, requests) = mpsc::channel(api::REQUEST_QUEUE);
    let task = tokio::spawn(async move {
        let note = match run(config, netmaps, local, requests, &status).await {
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
    local: watch::Sender<LocalNetInfo>,
    requests: mpsc::Receiver<api::EngineRequest>,
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
    tracing::info!(tun = tun.name(), port = config.port, "data plane up");

    let (inbound_tx, inbound_rx) = mpsc::channel(1024);
    let (regions_tx, regions_rx) = watch::channel(BTreeMap::new());
    let (report_tx, reports) = mpsc::channel(4);
    let (stun_tx, stun_rx) = mpsc::channel(STUN_QUEUE);
    let trigger = Arc::new(Notify::new());
    let stun_sockets = StunSockets {
        v4: sockets.v4.clone(),
        v6: sockets.v6.clone().filter(|_| ipv6),
    };
    let netcheck = AbortOnDrop(tokio::spawn(netcheck_task(
        regions_rx,
        stun_sockets,
        stun_rx,
        trigger.clone(),
        report_tx,
    )));
    let mut engine = Engine::new(&config, inbound_tx, local, regions_tx);
    engine.stun_tx = Some(stun_tx);
    engine.netcheck_trigger = trigger;
    engine.udp_port = sockets
        .v4
        .local_addr()
        .map(|a| a.port())
        .unwrap_or(config.port);
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
        .serve(
            &tun, &sockets, netmaps, inbound_rx, reports, requests, status,
        )
        .await;
    drop(netcheck);
    served
}

/// STUN responses waiting for the netcheck task.
const STUN_QUEUE: usize = 64;

/// One measurement: latency of every region (`None` = no answer) and what STUN saw of us.
struct LatencyReport {
    started: Instant,
    latency: BTreeMap<u16, Option<Duration>>,
    stun: StunResults,
}

/// Aborts a task when dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Measures when the region set changes, when `trigger` fires (`tern netcheck`, a CallMeMaybe
/// that wants fresh endpoints) and every 20–26 s, handing each report to the engine.
async fn netcheck_task(
    mut regions: watch::Receiver<BTreeMap<u16, DerpRegion>>,
    sockets: StunSockets,
    mut stun: mpsc::Receiver<StunResponse>,
    trigger: Arc<Notify>,
    reports: mpsc::Sender<LatencyReport>,
) {
    loop {
        let map = regions.borrow_and_update().clone();
        if !map.is_empty() {
            let started = Instant::now();
            let (stun, latency) = netcheck::measure_on(&sockets, &mut stun, &map).await;
            tracing::debug!(?latency, ?stun, "netcheck report");
            let report = LatencyReport {
                started,
                latency,
                stun,
            };
            if reports.send(report).await.is_err() {
                return;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(netcheck::next_interval()), if !map.is_empty() => {}
            _ = trigger.notified() => {}
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

/// One UDP socket per address family on `--port` (one socket per family; WireGuard,
/// disco and STUN share it).
struct UdpSockets {
    v4: Arc<UdpSocket>,
    v6: Option<Arc<UdpSocket>>,
}

impl UdpSockets {
    fn bind(port: u16) -> Result<Self, EngineError> {
        let err = |source| EngineError::Udp { port, source };
        let v4 = bind_udp(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port)).map_err(err)?;
        // The v6 socket takes the port v4 got (they differ only with --port 0).
        let port6 = v4.local_addr().map(|a| a.port()).unwrap_or(port);
        let v6 = match bind_udp(SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port6)) {
            Ok(s) => Some(Arc::new(s)),
            Err(e) => {
                tracing::info!(error = %e, "no IPv6 UDP socket");
                None
            }
        };
        for socket in std::iter::once(&v4).chain(v6.as_deref()) {
            if !offload::enable_gro(socket) {
                tracing::debug!("UDP GRO not available: one datagram per read");
            }
        }
        Ok(Self {
            v4: Arc::new(v4),
            v6,
        })
    }

    /// The socket of `to`'s address family.
    fn socket_for(&self, to: SocketAddr) -> std::io::Result<&UdpSocket> {
        match (to.is_ipv4(), &self.v6) {
            (true, _) => Ok(&self.v4),
            (false, Some(v6)) => Ok(v6),
            (false, None) => Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "no IPv6 socket",
            )),
        }
    }

    /// Sends without waiting: a full socket buffer drops the datagram (as a network would).
    fn send(&self, to: SocketAddr, datagram: &[u8]) -> std::io::Result<()> {
        self.socket_for(to)?.try_send_to(datagram, to).map(|_| ())
    }

    /// Datagrams already waiting on either socket (`WouldBlock` when none are); with GRO on,
    /// one read may hold several (see [`offload::Received`]).
    fn try_recv(&self, buf: &mut [u8]) -> std::io::Result<offload::Received> {
        match offload::recv(&self.v4, buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => match &self.v6 {
                Some(v6) => offload::recv(v6, buf),
                None => Err(e),
            },
            other => other,
        }
    }

    /// Waits for datagrams on either socket.
    async fn recv(&self, buf: &mut [u8]) -> std::io::Result<offload::Received> {
        loop {
            let socket = match &self.v6 {
                Some(v6) => tokio::select! {
                    r = self.v4.readable() => r.map(|()| &self.v4)?,
                    r = v6.readable() => r.map(|()| v6)?,
                },
                None => {
                    self.v4.readable().await?;
                    &self.v4
                }
            };
            match offload::recv(socket, buf) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                other => return other,
            }
        }
    }
}

/// Large buffers as Go's magicsock asks for (7 MiB): bursts of WireGuard at line rate would
/// otherwise overflow the default ~200 KiB and be dropped. Like Go, the `…FORCE` options first
/// (root may exceed `net.core.{r,w}mem_max`, which a fresh network namespace keeps at the
/// default), then the plain ones (capped by the kernel).
fn set_buffer_sizes(socket: &socket2::Socket) {
    use std::os::fd::AsRawFd as _;
    let size = libc::c_int::try_from(UDP_BUFFER_BYTES).unwrap_or(libc::c_int::MAX);
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        let set = |option| {
            // SAFETY: a valid socket fd and a c_int option value of the right size.
            unsafe {
                libc::setsockopt(
                    socket.as_raw_fd(),
                    libc::SOL_SOCKET,
                    option,
                    std::ptr::addr_of!(size).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            }
        };
        if set(force) != 0 && set(plain) != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), "UDP socket buffer size");
        }
    }
}

pub(crate) fn bind_udp(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let domain = socket2::Domain::for_address(addr);
    let socket = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    set_buffer_sizes(&socket);
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

/// Non-home DERP connections unused for this long are closed.
const DERP_IDLE_CLOSE: Duration = Duration::from_secs(60);

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

/// Per-peer facts from the netmap the engine needs.
#[derive(Debug, Clone)]
struct PeerInfo {
    key: NodePublic,
    home_derp: u16,
    reach: Reach,
}

/// What in a peer's netmap entry says how to reach it; a change may make a lost handshake
/// worth sending again.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Reach {
    disco_key: crate::keys::DiscoPublic,
    home_derp: i32,
    endpoints: Vec<SocketAddr>,
    online: Option<bool>,
}

impl Reach {
    fn of(node: &crate::control::tailcfg::Node) -> Reach {
        Reach {
            disco_key: node.disco_key,
            home_derp: node.effective_home_derp(),
            endpoints: node.endpoints.clone(),
            online: node.online,
        }
    }
}

/// Early handshake retransmissions to a peer DERP said was not there: the next one (if any)
/// and how many were sent since the session was last up.
#[derive(Debug, Clone, Copy, Default)]
struct HandshakeRetry {
    due: Option<Instant>,
    tries: u32,
}

/// A `tern ping` waiting for its pong.
struct PendingPing {
    peer: NodePublic,
    tx_ids: Vec<crate::disco::TxId>,
    deadline: Instant,
    reply: oneshot::Sender<report::PingResult>,
}

struct Engine {
    peers: WgPeers,
    info: HashMap<PeerId, PeerInfo>,
    /// Path selection per peer (disco).
    paths: PeerTable,
    node_key: NodePublic,
    /// The inbound filter; `None` until a netmap compiled (everything is dropped until then).
    filter: Option<Filter>,
    local: Vec<IpNet>,
    derp_map: BTreeMap<u16, DerpRegion>,
    derp: HashMap<u16, DerpLink>,
    home: u16,
    /// What control must know of us.
    local_tx: watch::Sender<LocalNetInfo>,
    /// The region set the netcheck task measures.
    regions_tx: watch::Sender<BTreeMap<u16, DerpRegion>>,
    latency_history: LatencyHistory,
    /// STUN responses go to the netcheck task; `trigger` asks it for a report now.
    stun_tx: Option<mpsc::Sender<StunResponse>>,
    netcheck_trigger: Arc<Notify>,
    pending_pings: Vec<PendingPing>,
    pending_netchecks: Vec<oneshot::Sender<report::NetcheckReport>>,
    /// The port our UDP sockets are bound to (our local endpoints use it).
    udp_port: u16,
    /// When each region last delivered a packet (updated at most every 5 s).
    last_frame: HashMap<u16, Instant>,
    inbound_tx: mpsc::Sender<DerpEvent>,
    /// Where each peer's packets last came from over DERP.
    last_region: HashMap<PeerId, u16>,
    /// Node keys that sent us WireGuard or disco before our netmap had them, and when: if one
    /// joins the netmap soon after, we start the handshake instead of waiting for its retry.
    heard_unknown: HashMap<NodePublic, Instant>,
    /// Early handshake retransmissions after DERP said the peer is not there.
    handshake_retries: HashMap<PeerId, HandshakeRetry>,
    private_key: NodePrivate,
    /// Whether tailnet IPv6 addresses go on the TUN.
    ipv6: bool,
    drops: DropCounters,
    /// A path changed since the last status publish.
    paths_changed: bool,
    /// UDP datagrams waiting for one GSO send; off once the kernel refused GSO.
    gso: offload::GsoBatch,
    gso_enabled: bool,
    out: Vec<u8>,
    /// WireGuard datagrams to send, each to where its peer's send plan says.
    to_send: Vec<(PeerId, Vec<u8>)>,
    /// `prefs.relay_server_port` as the daemon publishes it.
    relay_port: watch::Receiver<Option<u16>>,
    /// The peer relay server, while the pref asks for one, and the pref it was started for.
    relay: Option<RelayRuntime>,
    relay_wanted: Option<u16>,
    /// Each peer's first tailnet address (Go `nodeHasCap` checks capabilities between first
    /// addresses).
    first_ip: HashMap<NodePublic, IpAddr>,
}

impl Engine {
    fn new(
        config: &EngineConfig,
        inbound_tx: mpsc::Sender<DerpEvent>,
        local_tx: watch::Sender<LocalNetInfo>,
        regions_tx: watch::Sender<BTreeMap<u16, DerpRegion>>,
    ) -> Self {
        let node_key = config.node_key.public();
        let local = paths::LocalNet {
            node_key,
            ..Default::default()
        };
        Self {
            peers: WgPeers::new(config.node_key.clone()),
            info: HashMap::new(),
            paths: PeerTable::new(config.disco_key.clone(), local),
            node_key,
            filter: None,
            local: Vec::new(),
            derp_map: BTreeMap::new(),
            derp: HashMap::new(),
            home: 0,
            local_tx,
            regions_tx,
            latency_history: LatencyHistory::default(),
            stun_tx: None,
            netcheck_trigger: Arc::new(Notify::new()),
            pending_pings: Vec::new(),
            pending_netchecks: Vec::new(),
            udp_port: config.port,
            last_frame: HashMap::new(),
            inbound_tx,
            last_region: HashMap::new(),
            heard_unknown: HashMap::new(),
            handshake_retries: HashMap::new(),
            private_key: config.node_key.clone(),
            ipv6: true,
            drops: DropCounters::default(),
            paths_changed: false,
            gso: offload::GsoBatch::default(),
            gso_enabled: true,
            out: vec![0u8; BUF_LEN + consts::DATA_OVERHEAD + consts::MIN_OUT_BUF],
            to_send: Vec::new(),
            relay_port: config.relay_server_port.clone(),
            relay: None,
            relay_wanted: None,
            first_ip: HashMap::new(),
        }
    }

    /// The earliest of the WireGuard timers, the path timers and the pending pings.
    fn next_deadline(&mut self) -> Option<Instant> {
        let wg = self.peers.next_deadline();
        let paths = self.paths.poll_timeout().map(|(t, _, _)| t);
        let pings = self.pending_pings.iter().map(|p| p.deadline).min();
        let retries = self.handshake_retries.values().filter_map(|r| r.due).min();
        [wg, paths, pings, retries].into_iter().flatten().min()
    }

    #[allow(clippy::too_many_arguments)]
    async fn serve(
        &mut self,
        tun: &LinuxTun,
        udp: &UdpSockets,
        mut netmaps: watch::Receiver<Option<Arc<NetworkMap>>>,
        mut inbound: mpsc::Receiver<DerpEvent>,
        mut reports: mpsc::Receiver<LatencyReport>,
        mut requests: mpsc::Receiver<api::EngineRequest>,
        status: &watch::Sender<Status>,
    ) -> Result<(), EngineError> {
        let mut tun_buf = vec![0u8; BUF_LEN];
        let mut udp_buf = vec![0u8; BUF_LEN];
        let mut status_tick = tokio::time::interval(STATUS_EVERY);
        status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut logged_drops = DropCounters::default();
        let mut relay_port = self.relay_port.clone();
        self.apply_relay_port(*relay_port.borrow_and_update());
        // Without a sender (daemon gone) `changed()` would be ready forever: stop watching.
        let mut relay_port_open = true;
        loop {
            let deadline = self.next_deadline();
            let sleep_until = deadline
                .map(tokio::time::Instant::from_std)
                .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
            // A decrypted packet for the TUN: its length in `self.out`.
            let mut to_tun: Option<usize> = None;
            tokio::select! {
                r = tun.recv(&mut tun_buf) => {
                    let n = r.map_err(EngineError::TunIo)?;
                    if let Some(packet) = tun_buf.get(..n) {
                        self.outbound(udp, packet);
                    }
                    self.drain_tun(tun, udp, &mut tun_buf)?;
                }
                Some(event) = inbound.recv() => match event {
                    DerpEvent::Packet { region, src, packet } => {
                        self.note_frame_from(region);
                        to_tun = self.inbound_derp(region, src, &packet);
                    }
                    DerpEvent::PeerGone { region, peer } => self.peer_gone(region, &peer),
                },
                Some(report) = reports.recv() => {
                    self.on_latency_report(report, status);
                }
                Some(request) = requests.recv() => self.on_request(request),
                r = udp.recv(&mut udp_buf) => {
                    if let Ok(received) = r {
                        self.received(tun, &udp_buf, received).await;
                    }
                    self.drain_udp(tun, udp, &mut udp_buf).await;
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
                    self.on_timers(Instant::now());
                }
                changed = relay_port.changed(), if relay_port_open => {
                    if changed.is_ok() {
                        self.apply_relay_port(*relay_port.borrow_and_update());
                        self.publish(status);
                    } else {
                        relay_port_open = false;
                    }
                }
                _ = status_tick.tick() => {
                    self.publish(status);
                    self.close_idle_derp(Instant::now());
                    let drops = self.drops;
                    if drops != logged_drops {
                        tracing::debug!(?drops, disco = ?self.paths.counters(), "data plane drop counters");
                        logged_drops = drops;
                    }
                }
            }
            self.write_tun(tun, to_tun).await;
            self.flush(udp);
            if std::mem::take(&mut self.paths_changed) {
                self.publish(status);
            }
        }
    }

    /// Packets that queued up on the TUN while we handled one: up to [`BATCH`] without going
    /// back to the event loop (its per-wakeup cost, timers included, is paid once per burst).
    fn drain_tun(
        &mut self,
        tun: &LinuxTun,
        udp: &UdpSockets,
        buf: &mut [u8],
    ) -> Result<(), EngineError> {
        for _ in 0..BATCH {
            match tun.try_recv(buf) {
                Ok(n) => {
                    if let Some(packet) = buf.get(..n) {
                        self.outbound(udp, packet);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(EngineError::TunIo(e)),
            }
        }
        Ok(())
    }

    /// Datagrams that queued up on the UDP sockets, up to [`BATCH`], each decrypted packet
    /// written to the TUN before the next is read (they share the output buffer).
    async fn drain_udp(&mut self, tun: &LinuxTun, udp: &UdpSockets, buf: &mut [u8]) {
        for _ in 0..BATCH {
            let Ok(received) = udp.try_recv(buf) else {
                break;
            };
            self.received(tun, buf, received).await;
        }
    }

    /// Handles what one UDP read brought: one datagram, or several that GRO coalesced.
    async fn received(&mut self, tun: &LinuxTun, buf: &[u8], received: offload::Received) {
        let data = buf.get(..received.len).unwrap_or_default();
        for datagram in offload::segments(data, received.segment) {
            let to_tun = self.udp_datagram(datagram, received.from);
            self.write_tun(tun, to_tun).await;
        }
    }

    /// Writes the decrypted packet of length `len` at the start of `self.out` to the TUN.
    async fn write_tun(&mut self, tun: &LinuxTun, len: Option<usize>) {
        write_tun(tun, len.and_then(|n| self.out.get(..n))).await;
    }

    /// Due WireGuard timers, path timers and `tern ping` timeouts.
    fn on_timers(&mut self, now: Instant) {
        let to_send = &mut self.to_send;
        self.peers.update_timers(now, &mut self.out, |id, b| {
            to_send.push((id, b.to_vec()));
        });
        self.paths.handle_timeout(now);
        self.run_handshake_retries(now);
        let (expired, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending_pings)
            .into_iter()
            .partition(|p| p.deadline <= now);
        self.pending_pings = waiting;
        for ping in expired {
            let error = if ping.tx_ids.is_empty() {
                "no path to the peer (no DERP region, no endpoints)"
            } else {
                "timeout"
            };
            let _ = ping.reply.send(report::PingResult {
                error: Some(error.into()),
                ..Default::default()
            });
        }
    }

    /// A request from the daemon (`tern ping`, `tern netcheck`).
    fn on_request(&mut self, request: api::EngineRequest) {
        match request {
            api::EngineRequest::Ping {
                peer,
                timeout,
                reply,
            } => {
                let now = Instant::now();
                match self.paths.cli_ping(now, &peer) {
                    // No path yet (a peer that just joined has no home DERP until its first
                    // netcheck): like Go, the ping waits for its timeout; unlike Go, it is sent
                    // as soon as a netmap gives the peer a path.
                    Some(tx_ids) => self.pending_pings.push(PendingPing {
                        peer,
                        tx_ids,
                        deadline: now + timeout,
                        reply,
                    }),
                    None => {
                        let why = if self.peers.id_of(&peer).is_some() {
                            "the peer has no disco key (too old, or not connected to control)"
                        } else {
                            "unknown peer"
                        };
                        let _ = reply.send(report::PingResult {
                            error: Some(why.into()),
                            ..Default::default()
                        });
                    }
                }
            }
            api::EngineRequest::Netcheck { reply } => {
                self.pending_netchecks.push(reply);
                self.netcheck_trigger.notify_one();
            }
        }
    }

    /// A packet from the TUN: route, encrypt, queue for its peer's path.
    fn outbound(&mut self, udp: &UdpSockets, packet: &[u8]) {
        if let (Ok(summary), Some(filter)) = (PacketSummary::parse(packet), &mut self.filter) {
            filter.note_outbound(&summary);
        }
        let now = Instant::now();
        match self.peers.encapsulate(now, packet, &mut self.out) {
            (Some(id), WgOutput::ToNetwork(n)) => {
                // Sent straight from the output buffer: no copy on the direct path.
                let out = std::mem::take(&mut self.out);
                if let Some(datagram) = out.get(..n) {
                    self.send_wireguard(udp, now, id, datagram);
                }
                self.out = out;
            }
            (_, WgOutput::Dropped(reason)) => {
                tracing::trace!(?reason, "outbound packet dropped");
            }
            _ => {}
        }
    }

    /// A packet from DERP: disco to the path machines; WireGuard decrypted for the sending
    /// peer, filtered, and handed back for the TUN.
    fn inbound_derp(&mut self, region: u16, src: NodePublic, packet: &[u8]) -> Option<usize> {
        if let Inbound::Disco { packet, .. } = crate::demux::classify_derp(packet) {
            let handled = self.paths.handle_derp(Instant::now(), region, src, packet);
            if handled == Err(paths::DiscoDrop::UnknownSender) {
                self.note_unknown(src);
            }
            return None;
        }
        let Some(id) = self.peers.id_of(&src) else {
            self.drops.unknown_sender += 1;
            self.note_unknown(src);
            return None;
        };
        self.last_region.insert(id, region);
        self.decapsulate(id, packet)
    }

    /// A UDP datagram: STUN to the netcheck task, disco to the path machines, WireGuard to its
    /// peer (by the address disco learned, else by WireGuard's own index or static key).
    fn udp_datagram(&mut self, datagram: &[u8], from: SocketAddr) -> Option<usize> {
        let from = unmap_v4(from);
        match crate::demux::classify_udp(datagram) {
            Inbound::Stun(bytes) => {
                self.stun_datagram(bytes, from);
                None
            }
            Inbound::Disco {
                geneve: None,
                packet,
            } => {
                let _ = self.paths.handle_udp(Instant::now(), from, packet);
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
                self.decapsulate(id, packet)
            }
            other => {
                // Peer relays (Geneve) come with a later issue.
                tracing::trace!(%from, geneve = other.is_geneve(), "UDP datagram dropped");
                self.drops.udp += 1;
                None
            }
        }
    }

    /// STUN responses go to the netcheck task (which matches them); requests to us are dropped.
    fn stun_datagram(&mut self, bytes: &[u8], from: SocketAddr) {
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
    fn decapsulate(&mut self, id: PeerId, packet: &[u8]) -> Option<usize> {
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
    fn note_unknown(&mut self, key: NodePublic) {
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
    fn peer_gone(&mut self, region: u16, peer: &NodePublic) {
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
    fn run_handshake_retries(&mut self, now: Instant) {
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
    fn flush(&mut self, udp: &UdpSockets) {
        let now = Instant::now();
        for (id, packet) in std::mem::take(&mut self.to_send) {
            self.send_wireguard(udp, now, id, &packet);
        }
        while let Some(out) = self.paths.poll_transmit() {
            match out.dest {
                Dest::Direct(addr) => self.send_udp(udp, addr, &out.packet),
                Dest::Derp(region) => self.send_derp(Some(region), out.peer, out.packet),
            }
        }
        while let Some(event) = self.paths.poll_event() {
            self.on_path_event(event);
        }
        // Answers that events asked for (relay allocations).
        while let Some(out) = self.paths.poll_transmit() {
            match out.dest {
                Dest::Direct(addr) => self.send_udp(udp, addr, &out.packet),
                Dest::Derp(region) => self.send_derp(Some(region), out.peer, out.packet),
            }
        }
        self.flush_udp(udp);
    }

    /// One WireGuard datagram to peer `id`, where its send plan says (UDP and/or DERP).
    fn send_wireguard(&mut self, udp: &UdpSockets, now: Instant, id: PeerId, datagram: &[u8]) {
        let Some(info) = self.info.get(&id) else {
            return;
        };
        let (key, home_derp) = (info.key, info.home_derp);
        let plan = self.paths.on_outgoing(now, &key).unwrap_or(SendPlan {
            udp: None,
            derp: Some(home_derp),
        });
        if let Some(addr) = plan.udp {
            self.send_udp(udp, addr, datagram);
        }
        if let Some(region) = plan.derp {
            let heard_on = self.last_region.get(&id).copied();
            let derp = &self.derp;
            let region = choose_region(region, heard_on, self.home, |r| derp.contains_key(&r));
            self.send_derp(region, key, datagram.to_vec());
        }
    }

    /// Queues a datagram for UDP: consecutive ones to one address go out in one GSO send at
    /// the end of this turn of the event loop (or when the batch is full).
    fn send_udp(&mut self, udp: &UdpSockets, to: SocketAddr, datagram: &[u8]) {
        if !self.gso_enabled {
            return self.send_udp_now(udp, to, datagram);
        }
        if let Some(ready) = self.gso.push(to, datagram) {
            self.send_batch(udp, ready);
        }
    }

    /// Sends what [`Self::send_udp`] batched.
    fn flush_udp(&mut self, udp: &UdpSockets) {
        if let Some(ready) = self.gso.take() {
            self.send_batch(udp, ready);
        }
    }

    fn send_batch(&mut self, udp: &UdpSockets, ready: offload::Ready) {
        if ready.count == 1 {
            return self.send_udp_now(udp, ready.dest, &ready.bytes);
        }
        let sent = udp
            .socket_for(ready.dest)
            .and_then(|socket| offload::send(socket, &ready));
        match sent {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                self.drops.udp_send_failed += ready.count as u64;
            }
            Err(e) => {
                tracing::info!(error = %e, "UDP GSO is not available here: sending datagrams one by one");
                self.gso_enabled = false;
                for datagram in ready.datagrams() {
                    self.send_udp_now(udp, ready.dest, datagram);
                }
            }
        }
    }

    fn send_udp_now(&mut self, udp: &UdpSockets, to: SocketAddr, datagram: &[u8]) {
        if let Err(e) = udp.send(to, datagram) {
            tracing::trace!(%to, error = %e, "UDP send failed");
            self.drops.udp_send_failed += 1;
        }
    }

    fn send_derp(&mut self, region: Option<u16>, to: NodePublic, packet: Vec<u8>) {
        let Some(link) = region.and_then(|r| self.derp_link(r)) else {
            self.drops.no_derp += 1;
            return;
        };
        link.last_write = Instant::now();
        if link.outbound.try_send((to, Bytes::from(packet))).is_err() {
            self.drops.derp_queue_full += 1;
        }
    }

    fn on_path_event(&mut self, event: paths::PeerEvent) {
        match event.event {
            paths::Event::PathChanged(change) => {
                tracing::info!(peer = %event.peer, from = ?change.from, to = ?change.to, reason = %change.reason, "path");
                self.paths_changed = true;
            }
            paths::Event::NeedEndpointRefresh => self.netcheck_trigger.notify_one(),
            paths::Event::Pong {
                tx_id,
                via,
                latency,
                cli: true,
                ..
            } => self.answer_ping(event.peer, tx_id, via, latency),
            paths::Event::Pong { .. } | paths::Event::AddrForPeer(_) => {}
            paths::Event::RelayAllocRequest(request) => {
                self.answer_relay_allocation(event.peer, &request)
            }
        }
    }

    /// Starts, restarts or stops the relay server to match the pref. A port that cannot be
    /// bound leaves it off, with a warning (the node itself keeps running).
    fn apply_relay_port(&mut self, want: Option<u16>) {
        // Any change of the pref restarts the server (as Go does); the same value keeps it.
        if self.relay.is_some() && want == self.relay_wanted {
            return;
        }
        self.relay_wanted = want;
        if self.relay.take().is_some() {
            tracing::info!("relay server stopped");
        }
        let Some(port) = want else {
            return;
        };
        match RelayRuntime::start(port, self.regions_tx.subscribe()) {
            Ok(relay) => self.relay = Some(relay),
            Err(e) => {
                tracing::warn!(port, error = %e, "relay server not started: cannot bind its UDP port")
            }
        }
    }

    /// An allocation request from `peer`: answered over DERP when our
    /// relay server runs and control granted the peer `tailscale.com/cap/relay` towards us.
    fn answer_relay_allocation(
        &mut self,
        peer: NodePublic,
        request: &crate::disco::AllocateRequest,
    ) {
        let Some(relay) = &self.relay else {
            tracing::trace!(%peer, "relay: allocation request, but no relay server runs here");
            return;
        };
        if !self.peer_has_cap(&peer, crate::relay::CAP_RELAY) {
            tracing::debug!(%peer, "relay: allocation refused: the peer has no relay capability here");
            return;
        }
        match relay.allocate(request) {
            Ok(endpoint) => {
                let answer = crate::disco::Message::AllocateUdpRelayEndpointResponse(
                    crate::disco::AllocateResponse {
                        generation: request.generation,
                        endpoint,
                    },
                );
                if !self.paths.send_via_derp(&peer, answer) {
                    tracing::debug!(%peer, "relay: no DERP region to answer the allocation on");
                }
            }
            Err(e) => tracing::debug!(%peer, error = %e, "relay: allocation not answered"),
        }
    }

    /// Whether the packet filter grants `cap` from `peer` to us (Go `nodeHasCap`: the peer's
    /// first address against our first address of the same family).
    fn peer_has_cap(&self, peer: &NodePublic, cap: &str) -> bool {
        let (Some(filter), Some(src)) = (&self.filter, self.first_ip.get(peer)) else {
            return false;
        };
        let Some(dst) = self
            .local
            .iter()
            .map(|net| net.addr())
            .find(|ip| ip.is_ipv4() == src.is_ipv4())
        else {
            return false;
        };
        filter.peer_caps(*src, dst).iter().any(|c| c == cap)
    }

    /// A pong for a `tern ping`: the first one answers it.
    fn answer_ping(
        &mut self,
        peer: NodePublic,
        tx_id: crate::disco::TxId,
        via: paths::PathSource,
        latency: Duration,
    ) {
        let Some(index) = self
            .pending_pings
            .iter()
            .position(|p| p.peer == peer && p.tx_ids.contains(&tx_id))
        else {
            return;
        };
        let ping = self.pending_pings.swap_remove(index);
        let mut result = report::PingResult {
            latency_ms: Some(millis(latency)),
            ..Default::default()
        };
        match via {
            paths::PathSource::Udp(addr) => {
                result.path = Some("direct".into());
                result.endpoint = Some(addr.to_string());
            }
            paths::PathSource::Derp { region } => {
                result.path = Some("derp".into());
                result.derp_region = Some(region);
                result.derp_region_code = self.derp_map.get(&region).map(|r| r.region_code.clone());
            }
        }
        let _ = ping.reply.send(result);
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
        self.send_unsent_pings(Instant::now());
        Ok(())
    }

    /// `tern ping`s that found no path to their peer: try again (after a netmap change).
    fn send_unsent_pings(&mut self, now: Instant) {
        for ping in self
            .pending_pings
            .iter_mut()
            .filter(|p| p.tx_ids.is_empty())
        {
            if let Some(tx_ids) = self.paths.cli_ping(now, &ping.peer) {
                ping.tx_ids = tx_ids;
            }
        }
    }

    fn sync_peers(&mut self, map: &NetworkMap) {
        let mut seen = std::collections::HashSet::with_capacity(map.peers.len());
        let mut path_peers = Vec::with_capacity(map.peers.len());
        let mut reachable_anew = Vec::new();
        self.first_ip = map
            .peers
            .values()
            .filter_map(|node| {
                let first = node
                    .addresses
                    .iter()
                    .find(|p| p.prefix_len() == p.max_prefix_len())?;
                Some((node.key, first.addr()))
            })
            .collect();
        for node in map.peers.values() {
            path_peers.push(paths::PeerInfo {
                node_key: node.key,
                disco_key: node.disco_key,
                home_derp: u16::try_from(node.effective_home_derp())
                    .ok()
                    .filter(|r| *r != 0),
                endpoints: node.endpoints.clone(),
                mapping_varies: node
                    .hostinfo
                    .net_info
                    .as_ref()
                    .and_then(|n| n.mapping_varies_by_dest_ip),
                udp_working: node.hostinfo.net_info.as_ref().and_then(|n| n.working_udp),
            });
            match self.peers.upsert(node.key, node.effective_allowed_ips()) {
                Ok(id) => {
                    seen.insert(id);
                    let info = PeerInfo {
                        key: node.key,
                        home_derp: u16::try_from(node.effective_home_derp()).unwrap_or(0),
                        reach: Reach::of(node),
                    };
                    match self.info.insert(id, info) {
                        None => self.greet_late_peer(id, node.key),
                        Some(old) if old.reach != Reach::of(node) => reachable_anew.push(id),
                        Some(_) => {}
                    }
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
            self.handshake_retries.remove(&id);
        }
        let now = Instant::now();
        self.paths.set_peers(now, path_peers);
        // A handshake sent while the peer was not there (it restarted, came online, got a new
        // address) goes again now rather than at its 5 s retransmission.
        for id in reachable_anew {
            if let WgOutput::ToNetwork(n) = self.peers.retry_handshake_now(now, id, &mut self.out) {
                if let Some(bytes) = self.out.get(..n) {
                    self.to_send.push((id, bytes.to_vec()));
                }
            }
        }
    }

    /// A peer that just joined our netmap: if it tried to reach us shortly before, start the
    /// WireGuard handshake now (its own retry would come only after 5 s).
    fn greet_late_peer(&mut self, id: PeerId, key: NodePublic) {
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

    /// A report from the netcheck task: choose the home region, update our endpoints and
    /// NAT facts for the path machines and control, answer waiting `tern netcheck`s.
    fn on_latency_report(&mut self, report: LatencyReport, status: &watch::Sender<Status>) {
        self.choose_home(&report);
        self.drops.stun_unmatched += report.stun.unmatched;
        let endpoints = local_endpoints(self.udp_port, &report.stun);
        let now = Instant::now();
        self.paths.set_local(
            now,
            paths::LocalNet {
                node_key: self.node_key,
                endpoints: endpoints.iter().map(|(a, _)| *a).collect(),
                udp_working: Some(report.stun.udp()),
                mapping_varies: report.stun.mapping_varies,
            },
        );
        let info = LocalNetInfo {
            home_derp: self.home,
            endpoints: endpoints.clone(),
            working_udp: Some(report.stun.udp()),
            mapping_varies: report.stun.mapping_varies,
            working_ipv6: Some(report.stun.global_v6.is_some()),
            os_has_ipv6: Some(self.ipv6),
            derp_latency: derp_latency_seconds(&report.latency),
        };
        self.local_tx.send_if_modified(|old| {
            let changed = *old != info;
            *old = info;
            changed
        });
        let netcheck = self.netcheck_report(&report, &endpoints);
        for reply in self.pending_netchecks.drain(..) {
            let _ = reply.send(netcheck.clone());
        }
        publish_latency(status, &report.latency);
        status.send_modify(|s| s.netcheck = Some(netcheck));
    }

    /// The report `tern netcheck` shows.
    fn netcheck_report(
        &self,
        report: &LatencyReport,
        endpoints: &[(SocketAddr, EndpointType)],
    ) -> report::NetcheckReport {
        let regions = self
            .derp_map
            .iter()
            .map(|(id, r)| report::RegionLatency {
                id: *id,
                code: r.region_code.clone(),
                name: r.region_name.clone(),
                latency_ms: report.latency.get(id).copied().flatten().map(millis),
            })
            .collect();
        let stun = &report.stun;
        report::NetcheckReport {
            at: rfc3339(SystemTime::now()),
            udp: stun.udp(),
            ipv4: stun.global_v4.is_some(),
            global_v4: stun.global_v4.map(|a| a.to_string()),
            ipv6: stun.global_v6.is_some(),
            global_v6: stun.global_v6.map(|a| a.to_string()),
            os_has_ipv6: self.ipv6,
            mapping_varies_by_dest_ip: stun.mapping_varies,
            preferred_derp: self.home,
            regions,
            endpoints: endpoints
                .iter()
                .map(|(addr, kind)| report::EndpointReport {
                    addr: addr.to_string(),
                    kind: endpoint_kind(*kind).into(),
                })
                .collect(),
        }
    }

    fn choose_home(&mut self, report: &LatencyReport) {
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
    /// NotePreferred(true) to the new one, and the news to control.
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
        self.local_tx.send_if_modified(|info| {
            let changed = info.home_derp != home;
            info.home_derp = home;
            changed
        });
    }

    /// Copies per-peer path, reason, history and counters into the status snapshot.
    fn publish(&self, status: &watch::Sender<Status>) {
        let now = Instant::now();
        let wall = SystemTime::now();
        let at = |t: Instant| -> Option<String> {
            let ago = now.checked_duration_since(t)?;
            Some(rfc3339(wall.checked_sub(ago)?))
        };
        let drops = self.drop_counts();
        status.send_if_modified(|s| {
            let before = s.peers.clone();
            let drops_changed = s.data_plane.drops != drops;
            s.data_plane.drops = drops;
            s.data_plane.active = true;
            s.data_plane.note = None;
            for p in &mut s.peers {
                let Some(key) = p.node_key.parse::<NodePublic>().ok() else {
                    continue;
                };
                let Some(id) = self.peers.id_of(&key) else {
                    continue;
                };
                let Some(session) = self.peers.session(id) else {
                    continue;
                };
                let stats = session.stats();
                p.rx_bytes = stats.rx_bytes;
                p.tx_bytes = stats.tx_bytes;
                p.last_handshake_at = session.last_handshake().and_then(at);
                match self.paths.peer(&key) {
                    Some(machine) => self.describe_path(p, machine, &at),
                    None => {
                        // No disco key: DERP is all we can do.
                        let region = self
                            .last_region
                            .get(&id)
                            .copied()
                            .or_else(|| self.info.get(&id).map(|i| i.home_derp))
                            .filter(|r| *r != 0);
                        p.path = Some(if region.is_some() { "derp" } else { "none" }.into());
                        p.derp_region = region;
                        p.endpoint = None;
                        p.path_reason = Some("no-disco-key".into());
                    }
                }
            }
            let relay = self.relay.as_ref().map(|r| relay_status(r, &s.peers));
            let relay_changed = s.relay_server != relay;
            s.relay_server = relay;
            s.peers != before || drops_changed || relay_changed
        });
    }

    /// Every drop counter by name, for status (zeros left out).
    fn drop_counts(&self) -> BTreeMap<String, u64> {
        let d = self.drops;
        let c = self.paths.counters();
        [
            ("udp_unhandled", d.udp),
            ("udp_unknown_peer", d.udp_unknown_peer),
            ("udp_send_failed", d.udp_send_failed),
            ("stun_unmatched", d.stun_unmatched),
            ("no_derp", d.no_derp),
            ("derp_queue_full", d.derp_queue_full),
            ("filtered", d.filtered),
            ("unknown_sender", d.unknown_sender),
            ("disco_not_disco", c.not_disco),
            ("disco_unknown_sender", c.unknown_sender),
            ("disco_derp_sender_mismatch", c.derp_sender_mismatch),
            ("disco_bad_box", c.bad_box),
            ("disco_malformed", c.malformed),
        ]
        .into_iter()
        .filter(|(_, n)| *n != 0)
        .map(|(k, n)| (k.to_string(), n))
        .collect()
    }

    /// Path, endpoint, latency, reason and history of one peer's machine.
    fn describe_path(
        &self,
        p: &mut crate::status::PeerStatus,
        machine: &paths::Peer,
        at: &impl Fn(Instant) -> Option<String>,
    ) {
        let (path, endpoint, region) = path_fields(machine.current_path());
        p.path = Some(path.into());
        p.endpoint = endpoint;
        p.derp_region = region;
        p.path_reason = Some(machine.path_reason().as_str().into());
        let last_pong = machine
            .candidates()
            .into_iter()
            .filter_map(|c| c.last_pong)
            .max_by_key(|pong| pong.at);
        if let Some(pong) = last_pong {
            p.latency_ms = Some(millis(pong.latency));
            p.last_pong_at = at(pong.at);
        }
        p.path_history = machine
            .history()
            .map(|change| {
                let (path, endpoint, derp_region) = path_fields(change.to);
                crate::status::PathHistoryEntry {
                    at: at(change.at).unwrap_or_default(),
                    path: path.into(),
                    endpoint,
                    derp_region,
                    reason: change.reason.as_str().into(),
                }
            })
            .collect();
    }
}

/// A path as status shows it: kind, endpoint, DERP region.
fn path_fields(path: Path) -> (&'static str, Option<String>, Option<u16>) {
    match path {
        Path::Direct { addr, .. } => ("direct", Some(addr.to_string()), None),
        Path::Derp { region } => ("derp", None, Some(region)),
        Path::None => ("none", None, None),
    }
}

async fn write_tun(tun: &LinuxTun, packet: Option<&[u8]>) {
    if let Some(packet) = packet {
        if let Err(e) = tun.send(packet).await {
            tracing::debug!(error = %e, "TUN write failed");
        }
    }
}

/// Milliseconds with 0.1 ms precision.
fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 10_000.0).round() / 10.0
}

/// An IPv4-mapped IPv6 source as the plain IPv4 address it is.
pub(crate) fn unmap_v4(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}

/// The relay server's status with each leg's peer named when its disco key is a known peer's.
fn relay_status(relay: &RelayRuntime, peers: &[crate::status::PeerStatus]) -> RelayServerStatus {
    let mut status = relay.status();
    for leg in status.sessions.iter_mut().flat_map(|s| s.legs.iter_mut()) {
        leg.peer = peers
            .iter()
            .find(|p| p.disco_key.as_deref() == Some(leg.disco_key.as_str()))
            .map(|p| p.hostname.clone());
    }
    status
}

/// Our endpoints: what STUN saw first, then every interface address with our port
/// (loopback, link-local and the tailnet's own 100.64.0.0/10 and fd7a:115c:a1e0::/48 left out).
pub fn local_endpoints(port: u16, stun: &StunResults) -> Vec<(SocketAddr, EndpointType)> {
    let mut out: Vec<(SocketAddr, EndpointType)> = Vec::new();
    let mut push = |addr: SocketAddr, kind: EndpointType| {
        if !out.iter().any(|(a, _)| *a == addr) {
            out.push((addr, kind));
        }
    };
    for mapped in [stun.global_v4, stun.global_v6].into_iter().flatten() {
        push(mapped, EndpointType::STUN);
    }
    for ip in interface_addresses() {
        if usable_local_ip(ip) {
            push(SocketAddr::new(ip, port), EndpointType::LOCAL);
        }
    }
    out
}

/// Whether an interface address is worth advertising to peers.
pub fn usable_local_ip(ip: IpAddr) -> bool {
    let tailnet_v4: IpNet = "100.64.0.0/10".parse().expect("valid prefix");
    let tailnet_v6: IpNet = "fd7a:115c:a1e0::/48".parse().expect("valid prefix");
    let link_local = match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.segments()[0] & 0xffc0 == 0xfe80,
    };
    !(ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        || link_local
        || tailnet_v4.contains(&ip)
        || tailnet_v6.contains(&ip))
}

/// Addresses of this namespace's interfaces that are up.
fn interface_addresses() -> Vec<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    addrs
        .filter(|a| a.flags.contains(nix::net::if_::InterfaceFlags::IFF_UP))
        .filter_map(|a| {
            let addr = a.address?;
            if let Some(v4) = addr.as_sockaddr_in() {
                return Some(IpAddr::V4(v4.ip()));
            }
            addr.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
        })
        .collect()
}

/// The text kind of an endpoint type for reports.
fn endpoint_kind(kind: EndpointType) -> &'static str {
    match kind {
        EndpointType::LOCAL => "local",
        EndpointType::STUN => "stun",
        EndpointType::PORTMAPPED => "portmapped",
        EndpointType::STUN4_LOCAL_PORT => "stun4localport",
        EndpointType::EXPLICIT_CONF => "explicit",
        _ => "unknown",
    }
}

/// `NetInfo.DERPLatency`: `"<region>-v4"` → seconds, for regions that answered.
fn derp_latency_seconds(latency: &BTreeMap<u16, Option<Duration>>) -> BTreeMap<String, f64> {
    latency
        .iter()
        .filter_map(|(id, l)| Some((format!("{id}-v4"), (*l)?.as_secs_f64())))
        .collect()
}

/// Tells a region task its preferred flag; only a change wakes it (only changes are sent).
fn note_preferred(flag: &watch::Sender<bool>, preferred: bool) {
    flag.send_if_modified(|p| std::mem::replace(p, preferred) != preferred);
}

/// Puts a latency report into the status snapshot (milliseconds, `None` = no answer).
fn publish_latency(status: &watch::Sender<Status>, report: &BTreeMap<u16, Option<Duration>>) {
    let ms = report.iter().map(|(id, l)| (*id, l.map(millis))).collect();
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
