//! The relay server's I/O: its own UDP sockets on the relay port
//! (IPv4 required, IPv6 when the host has it), a reader per socket that hands each datagram to
//! the sans-IO [`RelayServer`] and does what it says, and a housekeeping task that discovers the
//! addresses to offer (interface addresses, and what STUN from the relay socket itself sees)
//! every 20–26 s and expires idle endpoints every 30 s.
//!
//! Allocation requests do not come here: they arrive as disco over DERP at the engine, which
//! calls [`RelayRuntime::allocate`].

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::control::tailcfg::DerpRegion;
use crate::disco::{AllocateRequest, UdpRelayEndpoint};
use crate::netcheck::{self, StunResponse, StunSockets};
use crate::relay::server::{Action, AllocError, RelayServer, BIND_LIFETIME};
use crate::status::RelayServerStatus;
use crate::udp::offload::{self, GsoBatch};

/// Largest datagram read (Go uses 65 535-byte buffers).
const BUF_LEN: usize = 65_535;
/// STUN answers waiting for address discovery.
const STUN_QUEUE: usize = 16;

/// A running relay server. Dropping it stops its tasks and closes its sockets.
pub struct RelayRuntime {
    port: u16,
    server: Arc<Mutex<RelayServer>>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for RelayRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayRuntime")
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl Drop for RelayRuntime {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// The relay's sockets (one per family).
#[derive(Clone)]
struct Sockets {
    v4: Arc<UdpSocket>,
    v6: Option<Arc<UdpSocket>>,
}

impl Sockets {
    fn bind(port: u16) -> std::io::Result<Sockets> {
        let v4 = crate::udp::bind(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port))?;
        let port = v4.local_addr()?.port();
        let v6 = crate::udp::bind(SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port))
            .map_err(|e| tracing::debug!(error = %e, "relay: no IPv6 socket"))
            .ok()
            .map(Arc::new);
        Ok(Sockets {
            v4: Arc::new(v4),
            v6,
        })
    }

    fn port(&self) -> u16 {
        self.v4.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    fn for_dest(&self, to: SocketAddr) -> Option<&UdpSocket> {
        match to {
            SocketAddr::V4(_) => Some(&self.v4),
            SocketAddr::V6(_) => self.v6.as_deref(),
        }
    }

    fn stun(&self) -> StunSockets {
        StunSockets {
            v4: self.v4.clone(),
            v6: self.v6.clone(),
        }
    }
}

impl RelayRuntime {
    /// Binds the relay port (0 = any) and starts serving. STUN targets come from `regions`
    /// (the DERP map), re-read when it changes.
    pub fn start(
        port: u16,
        regions: watch::Receiver<BTreeMap<u16, DerpRegion>>,
    ) -> std::io::Result<RelayRuntime> {
        let sockets = Sockets::bind(port)?;
        let port = sockets.port();
        let server = Arc::new(Mutex::new(RelayServer::new(Instant::now())));
        let (stun_tx, stun_rx) = mpsc::channel(STUN_QUEUE);
        let mut tasks = vec![tokio::spawn(read_loop(
            sockets.clone(),
            false,
            server.clone(),
            stun_tx.clone(),
        ))];
        if sockets.v6.is_some() {
            tasks.push(tokio::spawn(read_loop(
                sockets.clone(),
                true,
                server.clone(),
                stun_tx,
            )));
        }
        tasks.push(tokio::spawn(housekeeping(
            sockets,
            server.clone(),
            regions,
            stun_rx,
        )));
        tracing::info!(port, "relay server listening");
        Ok(RelayRuntime {
            port,
            server,
            tasks,
        })
    }

    /// The UDP port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// An endpoint for an allocation request (the caller checked who asks).
    pub fn allocate(&self, request: &AllocateRequest) -> Result<UdpRelayEndpoint, AllocError> {
        self.lock().allocate(Instant::now(), request)
    }

    /// Static addresses to offer besides the discovered ones.
    pub fn set_static_addr_ports(&self, addr_ports: Vec<SocketAddr>) {
        self.lock().set_static_addr_ports(addr_ports);
    }

    /// The live state for status.
    pub fn status(&self) -> RelayServerStatus {
        self.lock().status(Instant::now(), self.port)
    }

    fn lock(&self) -> MutexGuard<'_, RelayServer> {
        lock(&self.server)
    }
}

/// The server's lock; a panic elsewhere while holding it leaves usable state (plain counters
/// and maps), so a poisoned lock is taken over rather than propagated.
fn lock(server: &Mutex<RelayServer>) -> MutexGuard<'_, RelayServer> {
    server
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Datagrams (or GRO batches) read per wakeup before what they produced is sent.
const BATCH: usize = 64;

/// Reads one socket until it fails (Go closes the server on a read error; we log and stop
/// this reader). Reads are batched (up to [`BATCH`] per wakeup, `UDP_GRO` where the kernel
/// coalesces a flow's datagrams) and forwards to one address leave in one `UDP_SEGMENT` send.
async fn read_loop(
    sockets: Sockets,
    v6: bool,
    server: Arc<Mutex<RelayServer>>,
    stun: mpsc::Sender<StunResponse>,
) {
    let socket = match (v6, &sockets.v6) {
        (false, _) => sockets.v4.clone(),
        (true, Some(s)) => s.clone(),
        (true, None) => return,
    };
    if !offload::enable_gro(&socket) {
        tracing::debug!("relay: UDP GRO not available: one datagram per read");
    }
    let mut buf = vec![0u8; BUF_LEN];
    let mut out = Forwarder::new(sockets);
    loop {
        if let Err(e) = socket.readable().await {
            tracing::warn!(error = %e, "relay: socket failed; reader stopped");
            return;
        }
        for _ in 0..BATCH {
            let received = match offload::recv(&socket, &mut buf) {
                Ok(received) => received,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                // Larger than any datagram we relay: dropped, not truncated.
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "relay: socket read failed; reader stopped");
                    return;
                }
            };
            let data = buf.get(..received.len).unwrap_or_default();
            let from = crate::udp::unmap_v4(received.from);
            let now = Instant::now();
            let mut server = lock(&server);
            for datagram in offload::segments(data, received.segment) {
                match server.handle_packet(now, from, datagram) {
                    Action::Forward(to) => out.forward(to, datagram),
                    Action::Reply { to, packet } => out.send_one(to, &packet),
                    Action::Stun => {
                        let response = StunResponse {
                            from,
                            at: now,
                            bytes: datagram.to_vec(),
                        };
                        // Discovery not listening right now: a stray answer, nothing to keep.
                        let _ = stun.try_send(response);
                    }
                    Action::Accepted => {}
                    Action::Drop(reason) => tracing::trace!(%from, reason, "relay: dropped"),
                }
            }
        }
        out.flush();
        let failed = std::mem::take(&mut out.failed);
        if failed > 0 {
            lock(&server).count_drops("send_failed", failed);
        }
    }
}

/// Sends what the server says: forwards batched per destination (GSO), replies at once.
struct Forwarder {
    sockets: Sockets,
    batch: GsoBatch,
    gso: bool,
    /// Datagrams the kernel would not take (send buffer full): dropped, like a full link.
    failed: u64,
}

impl Forwarder {
    fn new(sockets: Sockets) -> Forwarder {
        Forwarder {
            sockets,
            batch: GsoBatch::default(),
            gso: true,
            failed: 0,
        }
    }

    fn forward(&mut self, to: SocketAddr, datagram: &[u8]) {
        if !self.gso {
            return self.send_one(to, datagram);
        }
        if let Some(ready) = self.batch.push(to, datagram) {
            self.send_ready(ready);
        }
    }

    fn flush(&mut self) {
        if let Some(ready) = self.batch.take() {
            self.send_ready(ready);
        }
    }

    fn send_ready(&mut self, ready: offload::Ready) {
        if ready.count == 1 {
            return self.send_one(ready.dest, &ready.bytes);
        }
        let Some(socket) = self.sockets.for_dest(ready.dest) else {
            return;
        };
        match offload::send(socket, &ready) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                self.failed += ready.count as u64;
            }
            Err(e) => {
                tracing::info!(error = %e, "relay: UDP GSO not available: sending one by one");
                self.gso = false;
                for datagram in ready.datagrams() {
                    self.send_one(ready.dest, datagram);
                }
            }
        }
    }

    fn send_one(&mut self, to: SocketAddr, datagram: &[u8]) {
        let Some(socket) = self.sockets.for_dest(to) else {
            tracing::trace!(%to, "relay: no socket for that family");
            return;
        };
        if let Err(e) = socket.try_send_to(datagram, to) {
            tracing::trace!(%to, error = %e, "relay: send failed");
            self.failed += 1;
        }
    }
}

/// Address discovery every 20–26 s (and when the DERP map changes), endpoint expiry every
/// [`BIND_LIFETIME`].
async fn housekeeping(
    sockets: Sockets,
    server: Arc<Mutex<RelayServer>>,
    mut regions: watch::Receiver<BTreeMap<u16, DerpRegion>>,
    mut stun: mpsc::Receiver<StunResponse>,
) {
    let mut gc = tokio::time::interval(BIND_LIFETIME);
    gc.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let map = regions.borrow_and_update().clone();
        let addrs = discover_addresses(&sockets, &map, &mut stun).await;
        tracing::debug!(?addrs, "relay: addresses to offer");
        lock(&server).set_addr_ports(addrs);
        let rediscover = tokio::time::sleep(netcheck::next_interval());
        tokio::pin!(rediscover);
        loop {
            tokio::select! {
                _ = &mut rediscover => break,
                changed = regions.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    break;
                }
                _ = gc.tick() => {
                    let _ = lock(&server).expire(Instant::now());
                }
            }
        }
    }
}

/// What STUN from the relay socket sees (its mapped addresses), then every usable interface
/// address with the relay port (as Go v1.90: interfaces plus STUN's global v4/v6).
async fn discover_addresses(
    sockets: &Sockets,
    regions: &BTreeMap<u16, DerpRegion>,
    stun: &mut mpsc::Receiver<StunResponse>,
) -> Vec<SocketAddr> {
    let port = sockets.port();
    let results = if regions.is_empty() {
        netcheck::StunResults::default()
    } else {
        let regions = &crate::derp::resolve::resolve_regions(regions).await;
        let targets = netcheck::stun_targets(regions, sockets.v6.is_some());
        netcheck::stun_round(&sockets.stun(), stun, targets).await
    };
    crate::udp::endpoints::local_endpoints(port, &results)
        .into_iter()
        .map(|(addr, _)| addr)
        .filter(|addr| sockets.for_dest(*addr).is_some())
        .collect()
}
