//! The data plane engine: a kernel TUN, one WireGuard peer table, the per-peer path machines
//! ([`PeerTable`]) that find direct UDP paths with disco, DERP, and the peer relay server it hosts.
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
//!
//! The engine's state is the [`Engine`] struct below; each concern is an `impl Engine` block in
//! its own file: `event_loop` (the `select!`), `wireguard` (packets in and out), `sockets` (UDP
//! and GSO sends), `derp` (region links), `netcheck` (reports → home region, endpoints),
//! `peers` (netmaps), `relay_host` (the relay server), `requests` (ping, netcheck) and
//! `publish` (status).

pub mod api;
mod device;
pub use linux_net::cleanup_host;
mod derp;
mod event_loop;
mod linux_net;
mod netcheck;
mod os_dns;
mod peerapi_host;
mod peers;
mod publish;
mod quad100;
mod relay_client;
mod relay_host;
mod requests;
mod routing;
mod sockets;
mod tun_offload;
mod wireguard;

pub use derp::{choose_region, client_config};

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use ipnet::IpNet;
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::task::JoinHandle;

use crate::control::tailcfg::DerpRegion;
use crate::derp::client::Delivery;
use crate::filter::Filter;
use crate::keys::{NodePrivate, NodePublic};
use crate::netcheck::{LatencyHistory, StunResponse, StunSockets};
use crate::netmap::NetworkMap;
use crate::paths::{self, PeerTable};
use crate::relay::io::RelayRuntime;
use crate::report::{self, LocalNetInfo};
use crate::status::Status;
use crate::udp::offload;
use crate::wg::{consts, PeerId, WgPeers};
use derp::DerpLink;
use device::Device;
use netcheck::{netcheck_task, STUN_QUEUE};
use peers::PeerInfo;
use requests::PendingPing;
use sockets::UdpSockets;
use tern_platform::tun::{LinuxTun, TunConfig, DEFAULT_MTU};

/// Largest packet handled: the TUN MTU leaves room, DERP caps packets at 64 KiB.
const BUF_LEN: usize = 65535;
/// DERP deliveries (bursts) waiting for the engine, from all regions.
const DERP_DELIVERY_QUEUE: usize = 256;

/// How the daemon runs the data plane.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub tun_name: String,
    /// Open the kernel TUN with offloads (see [`crate::vnet`]).
    pub tun_offload: bool,
    pub port: u16,
    pub node_key: NodePrivate,
    /// This process's disco key (control publishes its public half to peers).
    pub disco_key: crate::keys::DiscoPrivate,
    /// The peer relay server's UDP port from prefs (`tern set --relay-server-port`); `None` =
    /// no relay server. Changes apply live: the engine starts, restarts or stops the server.
    pub relay_server_port: tokio::sync::watch::Receiver<Option<u16>>,
    /// `prefs.relay_server_static_endpoints`: offered by the relay server besides what it finds.
    pub relay_static_endpoints: tokio::sync::watch::Receiver<Vec<std::net::SocketAddr>>,
    /// The node key as the control client renews it (a new key restarts every WireGuard
    /// session and DERP connection).
    pub node_keys: tokio::sync::watch::Receiver<NodePrivate>,
    /// Exit node, subnet routes and netfilter prefs; changes apply live.
    pub net_prefs: tokio::sync::watch::Receiver<crate::state::NetPrefs>,
    /// Where the engine publishes how the proxies reach the tailnet while it runs.
    pub dialer: Arc<watch::Sender<Option<crate::netstack::user::TailnetDialer>>>,
    /// The proxies' counters (`None` without `--socks5-server` or an HTTP proxy), for status.
    pub proxy_counters: Option<Arc<crate::proxy::ProxyCounters>>,
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
    /// WireGuard through a relay endpoint no peer of ours uses, that WireGuard did not know either.
    pub relay_unknown_peer: u64,
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
    /// UDP datagrams not sent because control set `only-tcp-443` on this node.
    pub udp_only_tcp_443: u64,
    /// From node keys that are not our peers.
    pub unknown_sender: u64,
}

/// Starts the engine: it waits for the first netmap, then brings the TUN up and runs until
/// aborted. `local` receives what control must know of us (home region, endpoints, NetInfo).
/// The [`api::EngineHandle`] asks the running engine for pings and netchecks.
/// `previous` is an engine being stopped: this one starts once it is gone (its host routing
/// undone), so the two never touch the rules at the same time.
pub fn spawn(
    config: EngineConfig,
    netmaps: watch::Receiver<Option<Arc<NetworkMap>>>,
    local: watch::Sender<LocalNetInfo>,
    status: watch::Sender<Status>,
    previous: Option<JoinHandle<()>>,
) -> (JoinHandle<()>, api::EngineHandle) {
    let (tx, requests) = mpsc::channel(api::REQUEST_QUEUE);
    let task = tokio::spawn(async move {
        if let Some(previous) = previous {
            let _ = previous.await;
        }
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
    let ipv6 = ipv6_enabled();
    let userspace = config.tun_name == crate::daemon::USERSPACE_NETWORKING;
    let tun = if userspace {
        Device::Userspace(device::UserDevice::start())
    } else {
        Device::Kernel(
            LinuxTun::create(&TunConfig {
                name: config.tun_name.clone(),
                mtu: DEFAULT_MTU,
                offload: config.tun_offload,
            })
            .await?,
        )
    };
    let mut linux = match tun.kernel() {
        Some(kernel) => {
            let mut linux = linux_net::LinuxNet::start(kernel, ipv6).await;
            linux.refresh_local_prefixes().await;
            Some(linux)
        }
        None => None,
    };
    let (_host_watch, host_changes) = linux.as_mut().and_then(|l| l.watch()).unzip();
    let sockets = UdpSockets::bind(config.port)?;
    tracing::info!(tun = tun.name(), port = config.port, "data plane up");

    // DERP deliveries: each is one read's packets (up to ~64 KiB); readers wait when it is full.
    let (inbound_tx, inbound_rx) = mpsc::channel(DERP_DELIVERY_QUEUE);
    let (regions_tx, regions_rx) = watch::channel(BTreeMap::new());
    let (report_tx, reports) = mpsc::channel(4);
    let (stun_tx, stun_rx) = mpsc::channel(STUN_QUEUE);
    let trigger = Arc::new(Notify::new());
    let (only_tcp_443, only_tcp_443_rx) = watch::channel(false);
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
        only_tcp_443_rx,
    )));
    let mut engine = Engine::new(&config, inbound_tx, local, regions_tx);
    engine.only_tcp_443 = only_tcp_443;
    let kernel = tun.kernel();
    engine.tun_offload.enable(
        kernel.is_some_and(|k| k.offload()),
        kernel.is_some_and(|k| k.udp_offload()),
    );
    engine.linux = linux;
    engine.host_changes = host_changes;
    // The host's resolver is tern's to point at quad-100 only with a TUN to route it.
    let os_dns = match tun.kernel() {
        Some(kernel) => Some(os_dns::OsDns::start(kernel.index()).await),
        None => None,
    };
    let base_resolvers = match &os_dns {
        Some(os_dns) => os_dns.base().nameservers.clone(),
        None => crate::dns::forward::os_base_resolvers(
            &std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
        ),
    };
    let (quad100, quad100_out) = quad100::Quad100::start(ipv6, base_resolvers);
    config
        .dialer
        .send_replace(Some(crate::netstack::user::TailnetDialer {
            stack: tun.userspace().map(|u| u.stack.clone()),
            dns: quad100.subscribe(),
            routes: engine.dial_routes.subscribe(),
        }));
    engine.peerapi = tun
        .kernel()
        .map(|_| peerapi_host::PeerApiHost::new(quad100.subscribe()));
    engine.quad100 = Some(quad100);
    engine.os_dns = os_dns;
    engine.user_stack = tun.userspace().map(|u| u.stack.clone());
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
        engine.netmap = Some(map);
    }
    status.send_modify(|s| {
        s.data_plane.active = true;
        s.data_plane.note = None;
    });
    let served = engine
        .serve(
            &tun,
            &sockets,
            netmaps,
            inbound_rx,
            reports,
            requests,
            status,
            quad100_out,
        )
        .await;
    drop(netcheck);
    config.dialer.send_replace(None);
    // DNS first, while the network still works (tailscaled's shutdown order).
    if let Some(mut os_dns) = engine.os_dns.take() {
        os_dns.restore().await;
    }
    if let Some(mut linux) = engine.linux.take() {
        linux.close().await;
    }
    served
}

/// Aborts a task when dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Whether this network namespace has IPv6 (the kernel refuses v6 addresses and routes when
/// `net.ipv6.conf.all.disable_ipv6` is 1).
fn ipv6_enabled() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv6/conf/all/disable_ipv6")
        .map(|v| v.trim() == "0")
        .unwrap_or(false)
}

/// Early handshake retransmissions to a peer DERP said was not there: the next one (if any)
/// and how many were sent since the session was last up.
#[derive(Debug, Clone, Copy, Default)]
struct HandshakeRetry {
    due: Option<Instant>,
    tries: u32,
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
    /// Control set `only-tcp-443` on this node: no UDP at all (Go `SetOnlyTCP443`). A plain
    /// copy for the per-datagram check; the watch tells the netcheck task.
    udp_off: bool,
    only_tcp_443: watch::Sender<bool>,
    pending_pings: Vec<PendingPing>,
    pending_netchecks: Vec<oneshot::Sender<report::NetcheckReport>>,
    /// The port our UDP sockets are bound to (our local endpoints use it).
    udp_port: u16,
    /// When each region last delivered a packet (updated at most every 5 s).
    last_frame: HashMap<u16, Instant>,
    inbound_tx: mpsc::Sender<Delivery>,
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
    /// `prefs.relay_server_static_endpoints` as the daemon publishes it.
    relay_static: watch::Receiver<Vec<std::net::SocketAddr>>,
    /// `prefs.relay_server_port` as the daemon publishes it.
    relay_port: watch::Receiver<Option<u16>>,
    /// The node key as control renews it.
    node_keys: watch::Receiver<NodePrivate>,
    /// The peer relay server, while the pref asks for one, and the pref it was started for.
    relay: Option<RelayRuntime>,
    relay_wanted: Option<u16>,
    /// Control set `disable-relay-server` on this node: no relay server, whatever the pref.
    relay_server_blocked: bool,
    /// Why the relay server the pref asks for does not run (status `relay_server_off`).
    relay_off: Option<String>,
    /// Our allocations and bind handshakes as a relay client.
    relay_client: crate::relay::manager::RelayManager,
    /// Whether our node attributes let us use peer relays (`disable-relay-client` does not);
    /// `None` until control described this node (then no relays, as in Go).
    relay_client_allowed: Option<bool>,
    /// Each peer's first tailnet address (Go `nodeHasCap` checks capabilities between first
    /// addresses).
    first_ip: HashMap<NodePublic, IpAddr>,
    /// The host's resolver pointed at quad-100 (`None` until the TUN exists).
    os_dns: Option<os_dns::OsDns>,
    /// Quad-100 (MagicDNS) on the netstack task (`None` until the TUN exists).
    quad100: Option<quad100::Quad100>,
    /// The peer API on a kernel TUN's addresses (`None` in userspace networking).
    peerapi: Option<peerapi_host::PeerApiHost>,
    /// Rules, table 52 and netfilter on the host (`None` until the TUN exists).
    linux: Option<linux_net::LinuxNet>,
    /// Announcements of host changes (rules, addresses, nftables), for `serve` to take.
    host_changes: Option<mpsc::Receiver<()>>,
    /// When the look for lost rules that an announced change asked for is due.
    host_check_due: Option<Instant>,
    /// Exit node, subnet route and netfilter prefs as the daemon publishes them.
    net_prefs: watch::Receiver<crate::state::NetPrefs>,
    /// Destinations this node serves (packet filter "local" networks).
    served: Vec<IpNet>,
    /// The netmap last applied, kept to drop peers whose keys expire before the next one.
    netmap: Option<Arc<NetworkMap>>,
    /// When the next peer key expires (the peers are synced again then).
    next_key_expiry: Option<Instant>,
    /// What the proxies send into the tailnet: its ranges and the accepted subnet routes.
    dial_routes: watch::Sender<Arc<Vec<IpNet>>>,
    /// The userspace stack (`--tun userspace-networking`), for its counters.
    user_stack: Option<crate::netstack::user::StackHandle>,
    /// WireGuard packets and bytes by path, for status and metrics.
    path_io: crate::metrics::PathIo,
    /// Path changes by (new path, reason).
    path_changes: BTreeMap<(&'static str, &'static str), u64>,
    proxy_counters: Option<Arc<crate::proxy::ProxyCounters>>,
    /// TUN offloads: splitting what the TUN gives, coalescing what we write to it.
    tun_offload: tun_offload::TunOffload,
}

impl Engine {
    fn new(
        config: &EngineConfig,
        inbound_tx: mpsc::Sender<Delivery>,
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
            udp_off: false,
            only_tcp_443: watch::channel(false).0,
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
            relay_static: config.relay_static_endpoints.clone(),
            node_keys: config.node_keys.clone(),
            relay: None,
            relay_wanted: None,
            relay_server_blocked: false,
            relay_off: None,
            relay_client: crate::relay::manager::RelayManager::new(
                config.disco_key.clone(),
                node_key,
            ),
            relay_client_allowed: None,
            first_ip: HashMap::new(),
            linux: None,
            host_changes: None,
            host_check_due: None,
            quad100: None,
            peerapi: None,
            os_dns: None,
            net_prefs: config.net_prefs.clone(),
            served: Vec::new(),
            netmap: None,
            next_key_expiry: None,
            dial_routes: watch::channel(Arc::new(Vec::new())).0,
            user_stack: None,
            path_io: Default::default(),
            path_changes: BTreeMap::new(),
            proxy_counters: config.proxy_counters.clone(),
            tun_offload: Default::default(),
        }
    }
}
