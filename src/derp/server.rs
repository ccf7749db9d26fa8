//! The DERP relay server (`tern derp`), Go `derp/derpserver`.
//!
//! Shape: one task per TCP connection. It reads the HTTP request head itself (so it controls the
//! exact 101 bytes and keeps pipelined fast-start bytes), then runs the DERP handshake, registers
//! the client by node key and runs a reader and a writer side by side. Senders never block on a
//! receiver: each connection has bounded drop-oldest queues (data and disco separately) that its
//! writer drains; a writer that cannot write within `write_timeout` closes its connection.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use subtle::ConstantTimeEq;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::Notify;

use super::frame::{self, ClientInfo, Frame, FrameError, PeerGoneReason, ServerInfo};
use crate::keys::{NodePrivate, NodePublic};
use crate::naclbox::SharedBox;
pub use limits::Refusal;
use limits::{Limits, Permit, RateLimitedLog};
pub use verify::{Verifier, VerifyError};

mod limits;
mod verify;

/// Default [`ServerConfig::handshake_timeout`].
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Default [`ServerConfig::max_conns`].
pub const DEFAULT_MAX_CONNS: usize = 10_000;
/// Default [`ServerConfig::max_unauth_per_ip`].
pub const DEFAULT_MAX_UNAUTH_PER_IP: usize = 32;
/// Largest ClientInfo frame before the handshake is done. A real one is a key, a nonce and a
/// sealed JSON object of a few fields (~200 bytes); the frame decoder reserves what the header
/// announces, so this bounds what an unauthenticated client can make us allocate.
pub const MAX_PRE_AUTH_CLIENT_INFO_LEN: usize = 4 << 10;
/// Accept errors are logged at most this often.
const ACCEPT_LOG_EVERY: Duration = Duration::from_secs(5);

/// Settings of a relay.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The server's DERP identity.
    pub private_key: NodePrivate,
    /// Clients presenting this key may use mesh frames (WatchConns, ClosePeer, ForwardPacket).
    pub mesh_key: Option<[u8; 32]>,
    /// Packets queued per destination connection, per queue (data and disco), at most
    /// [`QUEUE_BYTES_PER_SLOT`] bytes each on average; when full the oldest is dropped, as in
    /// Go. Go's depth is 32; ours is [`DEFAULT_QUEUE_DEPTH`]: a sender with TCP segmentation
    /// offload delivers bursts of ~50 packets at once, and 32 slots dropped most of each
    /// burst (bench/README.md: DERP 0.73 Gbit/s at 32, 1.68 at 128).
    pub queue_depth: usize,
    /// Longest a single write to a client may take before the connection is closed. Go: 2 s.
    pub write_timeout: Duration,
    /// KeepAlive period. Go: 60 s.
    pub keep_alive: Duration,
    /// Upper bound of the random per-connection extra added to `keep_alive`. Go: 5 s.
    pub keep_alive_jitter: Duration,
    /// One deadline, from accept, for TLS, the HTTP request head and the ClientInfo frame
    /// together (Go: 10 s, per step). Default 5 s.
    pub handshake_timeout: Duration,
    /// Connections open at once (any state); more are closed as soon as they are accepted.
    /// Default 10,000 (keep it below the open-file limit).
    pub max_conns: usize,
    /// Connections per source (IPv4 address, IPv6 /64) still in the handshake; more from that
    /// source are closed at once. Default 32.
    pub max_unauth_per_ip: usize,
    /// `--verify-clients`: the LocalAPI socket of the tern daemon whose tailnet may use the
    /// relay. `None`: anyone may.
    pub verify_clients: Option<PathBuf>,
}

impl ServerConfig {
    /// Go derper's defaults with the given key.
    pub fn new(private_key: NodePrivate) -> Self {
        ServerConfig {
            private_key,
            mesh_key: None,
            queue_depth: DEFAULT_QUEUE_DEPTH,
            write_timeout: Duration::from_secs(2),
            keep_alive: Duration::from_secs(60),
            keep_alive_jitter: Duration::from_secs(5),
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            max_conns: DEFAULT_MAX_CONNS,
            max_unauth_per_ip: DEFAULT_MAX_UNAUTH_PER_IP,
            verify_clients: None,
        }
    }
}

macro_rules! metrics {
    ($( $(#[doc = $doc:literal])* $name:ident : $kind:literal ),* $(,)?) => {
        /// What the relay has forwarded, dropped and refused. Rendered at `/debug/metrics`.
        #[derive(Debug, Default)]
        pub struct Metrics {
            $( $(#[doc = $doc])* pub $name: AtomicU64, )*
        }

        impl Metrics {
            /// Prometheus text exposition format: HELP (the field's doc), TYPE, value.
            pub fn render_prometheus(&self) -> String {
                let mut out = String::new();
                $(
                    let name = concat!("tern_derp_", stringify!($name));
                    let help = help_text(&[$($doc),*]);
                    out.push_str(&format!(
                        "# HELP {name} {help}\n# TYPE {name} {}\n{name} {}\n",
                        $kind,
                        self.$name.load(Ordering::Relaxed)
                    ));
                )*
                out
            }
        }
    };
}

/// A metric's doc comment lines as one HELP line (backslashes escaped, as the format asks).
fn help_text(lines: &[&str]) -> String {
    let joined: Vec<&str> = lines.iter().map(|l| l.trim()).collect();
    joined.join(" ").replace('\\', "\\\\")
}

metrics! {
    /// TCP connections accepted.
    connections_accepted_total: "counter",
    /// Failed accepts (e.g. EMFILE: out of descriptors); the server pauses briefly and goes on.
    accept_errors_total: "counter",
    /// Connections open now (any state).
    conns_current: "gauge",
    /// Connections closed at once: `max_conns` open already.
    conns_refused_max_conns_total: "counter",
    /// Connections closed at once: their source had `max_unauth_per_ip` mid-handshake.
    conns_refused_unauth_per_ip_total: "counter",
    /// Connections that did not finish TLS, HTTP head and ClientInfo within the deadline.
    handshake_timeouts_total: "counter",
    /// `--verify-clients`: clients refused, their node key not in the daemon's tailnet.
    clients_refused_unverified_total: "counter",
    /// `--verify-clients`: clients refused because the daemon could not be asked.
    clients_refused_verify_error_total: "counter",
    /// HTTP requests parsed (any path).
    http_requests_total: "counter",
    /// Connections that failed TLS, HTTP or the DERP handshake.
    handshakes_failed_total: "counter",
    /// Upgrades with `Derp-Fast-Start: 1` (client learnt the key from the meta certificate).
    fast_starts_total: "counter",
    /// DERP clients that completed the handshake.
    clients_accepted_total: "counter",
    /// DERP clients connected now.
    clients_current: "gauge",
    /// Connections that joined a key that already had one.
    duplicate_clients_total: "counter",
    /// Packets delivered into a destination's queue.
    packets_forwarded_total: "counter",
    /// Bytes of those packets.
    bytes_forwarded_total: "counter",
    /// Packets written to their destination's socket.
    packets_sent_total: "counter",
    /// Dropped: no client with that key.
    packets_dropped_unknown_dest_total: "counter",
    /// Dropped: the key has several connections and none is active.
    packets_dropped_dup_client_total: "counter",
    /// Dropped: the destination's queue was full (oldest dropped).
    packets_dropped_queue_full_total: "counter",
    /// Dropped: still queued when the destination closed.
    packets_dropped_gone_total: "counter",
    /// Connections closed for a malformed frame, over-long frame or forbidden frame.
    conns_closed_protocol_error_total: "counter",
    /// Connections closed because a write did not finish within the write timeout.
    conns_closed_write_timeout_total: "counter",
    /// Frames of unknown or client-irrelevant type that were skipped.
    frames_skipped_total: "counter",
    /// Pings answered.
    pings_total: "counter",
    /// Pings dropped because a Pong was still pending.
    pongs_dropped_total: "counter",
    /// PeerGone frames queued.
    peer_gone_sent_total: "counter",
    /// KeepAlive frames written.
    keep_alives_sent_total: "counter",
    /// STUN binding requests answered.
    stun_responses_total: "counter",
    /// UDP datagrams on the STUN port that were not a valid Tailscale binding request.
    stun_ignored_total: "counter",
}

fn inc(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Why a DERP connection ended badly.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("timed out")]
    Timeout,
    #[error("frame: {0}")]
    Frame(#[from] FrameError),
    #[error("handshake: {0}")]
    Handshake(String),
    #[error("protocol: {0}")]
    Protocol(&'static str),
    #[error("closed")]
    Closed,
    #[error("refused: {0}")]
    Refused(#[from] Refusal),
    #[error("{0}")]
    Unverified(#[from] VerifyError),
}

/// Frames waiting to be written to one client.
#[derive(Default)]
struct Outbox {
    control: VecDeque<Frame>,
    pong: Option<[u8; frame::PING_LEN]>,
    disco: PacketQueue,
    data: PacketQueue,
}

/// Room made in an authenticated client's receive buffer before each read.
const READ_SPACE: usize = 16 << 10;

/// Packets a reader's [`Batch`] keeps room for between reads.
const BATCH_KEEP: usize = 64;

/// Default [`ServerConfig::queue_depth`].
pub const DEFAULT_QUEUE_DEPTH: usize = 128;
/// Byte budget of a queue per slot: a queue of `depth` slots holds at most `depth` × this many
/// bytes, so a flood of 64 KiB packets to a client that does not read costs 256 KiB, not 8 MiB.
pub const QUEUE_BYTES_PER_SLOT: usize = 2048;

/// Packets waiting for one connection, bounded in count and bytes; full means the oldest go.
#[derive(Default)]
struct PacketQueue {
    packets: VecDeque<(NodePublic, Bytes)>,
    bytes: usize,
}

impl PacketQueue {
    /// Queues a packet, dropping the oldest while over either bound; returns how many went.
    fn push(&mut self, src: NodePublic, packet: Bytes, depth: usize) -> u64 {
        let depth = depth.max(1);
        let max_bytes = depth * QUEUE_BYTES_PER_SLOT;
        let mut dropped = 0;
        while !self.packets.is_empty()
            && (self.packets.len() >= depth || self.bytes + packet.len() > max_bytes)
        {
            self.pop_front();
            dropped += 1;
        }
        self.bytes += packet.len();
        self.packets.push_back((src, packet));
        dropped
    }

    fn pop_front(&mut self) -> Option<(NodePublic, Bytes)> {
        let (src, packet) = self.packets.pop_front()?;
        self.bytes -= packet.len();
        Some((src, packet))
    }

    fn len(&self) -> usize {
        self.packets.len()
    }
}

/// One registered DERP connection, shared between its tasks and the routing table.
struct Conn {
    id: u64,
    key: NodePublic,
    addr: SocketAddr,
    is_mesh: bool,
    is_prober: bool,
    outbox: Mutex<Outbox>,
    wake: Notify,
    closed: AtomicBool,
    close: Notify,
    /// Set while other connections share this key, so the reader knows to claim "active".
    in_dup_set: AtomicBool,
}

impl Conn {
    fn outbox(&self) -> MutexGuard<'_, Outbox> {
        self.outbox.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push_control(&self, frame: Frame) {
        self.outbox().control.push_back(frame);
        self.wake.notify_one();
    }

    /// Queues packets (disco and data each in their own queue), dropping the oldest of a full
    /// queue, and wakes the writer once. Returns drops.
    fn push_packets(
        &self,
        packets: impl Iterator<Item = (NodePublic, Bytes)>,
        depth: usize,
    ) -> u64 {
        let mut dropped = 0;
        {
            let mut outbox = self.outbox();
            for (src, packet) in packets {
                let queue = if frame::looks_like_disco(&packet) {
                    &mut outbox.disco
                } else {
                    &mut outbox.data
                };
                dropped += queue.push(src, packet, depth);
            }
        }
        self.wake.notify_one();
        dropped
    }

    fn shut(&self) {
        self.closed.store(true, Ordering::Release);
        self.close.notify_one();
        self.wake.notify_one();
    }

    fn peer_present_flags(&self) -> u8 {
        let mut flags = 0;
        if self.is_mesh {
            flags |= frame::peer_present_flags::IS_MESH_PEER;
        }
        if self.is_prober {
            flags |= frame::peer_present_flags::IS_PROBER;
        }
        if flags == 0 {
            flags = frame::peer_present_flags::IS_REGULAR;
        }
        flags
    }
}

/// All connections of one node key.
#[derive(Default)]
struct ClientSet {
    conns: Vec<Arc<Conn>>,
    /// Receiver of packets for this key; `None` in a dup set until one of them sends.
    active: Option<Arc<Conn>>,
    /// Keys this key has sent packets to: they get PeerGone when it leaves.
    sent_to: HashSet<NodePublic>,
}

#[derive(Default)]
struct Registry {
    clients: HashMap<NodePublic, ClientSet>,
    watchers: Vec<Arc<Conn>>,
}

/// A DERP relay. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct Server {
    shared: Arc<Shared>,
}

struct Shared {
    config: ServerConfig,
    public: NodePublic,
    registry: Mutex<Registry>,
    /// Bumped whenever a key's receiving connection may have changed: readers' cached routes
    /// older than this are looked up again.
    route_generation: AtomicU64,
    metrics: Metrics,
    next_id: AtomicU64,
    limits: Arc<Limits>,
    verifier: Option<Verifier>,
}

/// A connection that asked for the DERP upgrade: what is left of the handshake.
struct Hello {
    /// Bytes read after the request head (fast-start clients send ClientInfo at once).
    buf: BytesMut,
    addr: SocketAddr,
    fast_start: bool,
    /// End of the handshake deadline that began at accept.
    deadline: tokio::time::Instant,
}

/// What the HTTP front decided for a request.
enum Route {
    Upgrade { fast_start: bool },
    Respond(Vec<u8>),
}

const MAX_REQUEST_HEAD: usize = 16 << 10;

impl Server {
    pub fn new(config: ServerConfig) -> Self {
        let public = config.private_key.public();
        Server {
            shared: Arc::new(Shared {
                public,
                registry: Mutex::new(Registry::default()),
                metrics: Metrics::default(),
                route_generation: AtomicU64::new(0),
                next_id: AtomicU64::new(1),
                limits: Limits::new(config.max_conns, config.max_unauth_per_ip),
                verifier: config.verify_clients.clone().map(Verifier::new),
                config,
            }),
        }
    }

    /// The server's public key (what clients learn from ServerKey).
    pub fn public_key(&self) -> NodePublic {
        self.shared.public
    }

    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    fn registry(&self) -> MutexGuard<'_, Registry> {
        self.shared
            .registry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Number of node keys with at least one connection.
    pub fn client_count(&self) -> usize {
        self.registry().clients.len()
    }

    /// Accepts TCP connections forever, optionally wrapping each in TLS. An accept error (out
    /// of descriptors, say) is counted, logged at most every few seconds, and followed by a short
    /// pause; it never ends the loop.
    pub async fn serve(self, listener: TcpListener, tls: Option<tokio_rustls::TlsAcceptor>) {
        let mut log = RateLimitedLog::new(ACCEPT_LOG_EVERY);
        loop {
            match listener.accept().await {
                Ok((tcp, addr)) => self.accepted(tcp, addr, tls.clone()),
                Err(e) => {
                    inc(&self.shared.metrics.accept_errors_total);
                    if let Some(suppressed) = log.allow(Instant::now()) {
                        tracing::warn!(error = %e, suppressed, "derp: accept failed; going on");
                    }
                    tokio::time::sleep(limits::accept_pause(&e)).await;
                }
            }
        }
    }

    /// Admits (or closes at once) one accepted connection and serves it on its own task.
    fn accepted(
        &self,
        tcp: tokio::net::TcpStream,
        addr: SocketAddr,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) {
        inc(&self.shared.metrics.connections_accepted_total);
        // Dropping `tcp` on refusal closes it before any byte is read.
        let Ok(permit) = self.admit(addr) else { return };
        let _ = tcp.set_nodelay(true);
        let server = self.clone();
        let deadline = tokio::time::Instant::now() + self.shared.config.handshake_timeout;
        tokio::spawn(async move {
            let result = match tls {
                None => server.serve_admitted(tcp, addr, permit, deadline).await,
                Some(acceptor) => match tokio::time::timeout_at(deadline, acceptor.accept(tcp))
                    .await
                {
                    Ok(Ok(stream)) => server.serve_admitted(stream, addr, permit, deadline).await,
                    Ok(Err(e)) => {
                        server.handshake_failed(ConnError::Handshake(format!("tls: {e}")))
                    }
                    Err(_) => server.handshake_failed(ConnError::Timeout),
                },
            };
            if let Err(e) = result {
                tracing::debug!(%addr, error = %e, "derp connection ended");
            }
        });
    }

    /// A slot under the connection caps, or the refusal (counted).
    fn admit(&self, addr: SocketAddr) -> Result<Permit, Refusal> {
        let metrics = &self.shared.metrics;
        match self.shared.limits.admit(addr.ip()) {
            Ok(permit) => Ok(permit),
            Err(refusal) => {
                inc(match refusal {
                    Refusal::MaxConns => &metrics.conns_refused_max_conns_total,
                    Refusal::UnauthPerSource => &metrics.conns_refused_unauth_per_ip_total,
                });
                tracing::debug!(%addr, %refusal, "derp: connection refused");
                Err(refusal)
            }
        }
    }

    /// Counts a failed handshake (and a timeout separately) and passes the error on.
    fn handshake_failed<T>(&self, error: ConnError) -> Result<T, ConnError> {
        inc(&self.shared.metrics.handshakes_failed_total);
        if matches!(error, ConnError::Timeout) {
            inc(&self.shared.metrics.handshake_timeouts_total);
        }
        Err(error)
    }

    /// Serves one HTTP connection (already TLS-terminated if TLS is used), under the same caps
    /// and handshake deadline as the connections [`Server::serve`] accepts.
    pub async fn serve_conn<S>(&self, stream: S, addr: SocketAddr) -> Result<(), ConnError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let permit = self.admit(addr)?;
        let deadline = tokio::time::Instant::now() + self.shared.config.handshake_timeout;
        self.serve_admitted(stream, addr, permit, deadline).await
    }

    async fn serve_admitted<S>(
        &self,
        mut stream: S,
        addr: SocketAddr,
        mut permit: Permit,
        deadline: tokio::time::Instant,
    ) -> Result<(), ConnError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut buf = BytesMut::with_capacity(4096);
        let head = tokio::time::timeout_at(deadline, read_request_head(&mut stream, &mut buf));
        let head_len = match head.await {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => return self.handshake_failed(e),
            Err(_) => return self.handshake_failed(ConnError::Timeout),
        };
        inc(&self.shared.metrics.http_requests_total);
        let head = buf.split_to(head_len);
        match self.route(&head, addr) {
            Route::Respond(response) => {
                stream.write_all(&response).await?;
                stream.shutdown().await?;
                Ok(())
            }
            Route::Upgrade { fast_start } => {
                if fast_start {
                    inc(&self.shared.metrics.fast_starts_total);
                }
                let hello = Hello {
                    buf,
                    addr,
                    fast_start,
                    deadline,
                };
                self.run_derp(stream, hello, &mut permit).await
            }
        }
    }

    fn route(&self, head: &[u8], addr: SocketAddr) -> Route {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        if !matches!(req.parse(head), Ok(httparse::Status::Complete(_))) {
            return Route::Respond(http_response(400, "Bad Request", &[], b"bad request\n"));
        }
        let method = req.method.unwrap_or("");
        let path = req.path.unwrap_or("").split('?').next().unwrap_or("");
        let header = |name: &str| {
            req.headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .and_then(|h| std::str::from_utf8(h.value).ok())
                .map(str::trim)
        };
        match path {
            "/derp" => {
                let upgrade = header("Upgrade").unwrap_or("").to_ascii_lowercase();
                let ws_derp = header("Sec-WebSocket-Protocol").is_some_and(|p| p.contains("derp"));
                if upgrade == "websocket" && ws_derp {
                    return Route::Respond(http_response(
                        501,
                        "Not Implemented",
                        &[],
                        b"DERP over WebSocket is not supported\n",
                    ));
                }
                if upgrade != "derp" && upgrade != "websocket" {
                    return Route::Respond(http_response(
                        426,
                        "Upgrade Required",
                        &[],
                        b"DERP requires connection upgrade\n",
                    ));
                }
                Route::Upgrade {
                    fast_start: header("Derp-Fast-Start") == Some("1"),
                }
            }
            "/derp/probe" | "/derp/latency-check" => match method {
                "GET" | "HEAD" => Route::Respond(http_response(
                    200,
                    "OK",
                    &[("Access-Control-Allow-Origin", "*")],
                    b"",
                )),
                _ => Route::Respond(http_response(
                    405,
                    "Method Not Allowed",
                    &[],
                    b"bogus probe method\n",
                )),
            },
            "/generate_204" => Route::Respond(generate_204(header("X-Tailscale-Challenge"))),
            "/robots.txt" => Route::Respond(http_response(
                200,
                "OK",
                &[],
                b"User-agent: *\nDisallow: /\n",
            )),
            "/debug/metrics" if addr.ip().is_loopback() => {
                // The gauge is read from the admission counters when asked for.
                let open = self.shared.limits.open() as u64;
                self.shared
                    .metrics
                    .conns_current
                    .store(open, Ordering::Relaxed);
                let body = self.shared.metrics.render_prometheus();
                Route::Respond(http_response(
                    200,
                    "OK",
                    &[("Content-Type", "text/plain; version=0.0.4")],
                    body.as_bytes(),
                ))
            }
            "/" => Route::Respond(http_response(200, "OK", &[], b"tern DERP server\n")),
            _ => Route::Respond(http_response(404, "Not Found", &[], b"not found\n")),
        }
    }

    /// Handshake, registration, then the reader and writer until either ends.
    async fn run_derp<S>(
        &self,
        mut stream: S,
        hello: Hello,
        permit: &mut Permit,
    ) -> Result<(), ConnError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let config = &self.shared.config;
        let Hello {
            mut buf,
            addr,
            fast_start,
            deadline,
        } = hello;
        let handshake = self.handshake(&mut stream, &mut buf, fast_start);
        let (client_key, info, shared_box) =
            match tokio::time::timeout_at(deadline, handshake).await {
                Ok(Ok(v)) => v,
                Ok(Err(e)) => return self.handshake_failed(e),
                Err(_) => return self.handshake_failed(ConnError::Timeout),
            };
        let is_mesh = match (&info.mesh_key, &config.mesh_key) {
            (Some(a), Some(b)) => bool::from(a[..].ct_eq(&b[..])),
            _ => false,
        };
        // Mesh peers (other relays of the region) are trusted without asking, as in Go.
        if !is_mesh {
            if let Err(e) = self.verify(&client_key, deadline).await {
                tracing::debug!(key = %client_key, %addr, error = %e, "derp: client refused");
                return self.handshake_failed(e);
            }
        }
        permit.authenticated();
        let conn = Arc::new(Conn {
            id: self.shared.next_id.fetch_add(1, Ordering::Relaxed),
            key: client_key,
            addr,
            is_mesh,
            is_prober: info.is_prober,
            outbox: Mutex::new(Outbox::default()),
            wake: Notify::new(),
            closed: AtomicBool::new(false),
            close: Notify::new(),
            in_dup_set: AtomicBool::new(false),
        });
        // ServerInfo goes first in the outbox, so it precedes anything routed to this client.
        let server_info = shared_box.seal(ServerInfo::current().to_json().as_bytes());
        conn.push_control(Frame::ServerInfo {
            sealed: Bytes::from(server_info),
        });
        self.register(&conn);
        tracing::debug!(key = %client_key, %addr, mesh = is_mesh, "derp client connected");

        let (reader, writer) = tokio::io::split(stream);
        let result = tokio::select! {
            r = self.read_loop(&conn, reader, buf) => r,
            r = self.write_loop(&conn, writer) => r,
            _ = conn.close.notified() => Err(ConnError::Closed),
        };
        conn.shut();
        self.unregister(&conn);
        match &result {
            Err(ConnError::Frame(_)) | Err(ConnError::Protocol(_)) => {
                inc(&self.shared.metrics.conns_closed_protocol_error_total)
            }
            Err(ConnError::Timeout) => inc(&self.shared.metrics.conns_closed_write_timeout_total),
            _ => {}
        }
        tracing::debug!(key = %client_key, %addr, result = ?result.as_ref().err().map(ToString::to_string), "derp client disconnected");
        result
    }

    /// `--verify-clients`: whether the daemon knows `key` (within the handshake deadline).
    async fn verify(
        &self,
        key: &NodePublic,
        deadline: tokio::time::Instant,
    ) -> Result<(), ConnError> {
        let Some(verifier) = &self.shared.verifier else {
            return Ok(());
        };
        let metrics = &self.shared.metrics;
        match tokio::time::timeout_at(deadline, verifier.check(key)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                inc(match e {
                    VerifyError::NotInTailnet(_) => &metrics.clients_refused_unverified_total,
                    VerifyError::Daemon(_) => &metrics.clients_refused_verify_error_total,
                });
                Err(e.into())
            }
            Err(_) => {
                inc(&metrics.clients_refused_verify_error_total);
                Err(ConnError::Timeout)
            }
        }
    }

    /// Sends ServerKey (after the 101 unless fast start), reads and opens ClientInfo.
    async fn handshake<S>(
        &self,
        stream: &mut S,
        buf: &mut BytesMut,
        fast_start: bool,
    ) -> Result<(NodePublic, ClientInfo, SharedBox), ConnError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut out = Vec::with_capacity(256);
        if !fast_start {
            out.extend_from_slice(upgrade_response(&self.shared.public).as_bytes());
        }
        Frame::ServerKey {
            key: self.shared.public,
        }
        .encode(&mut out);
        stream.write_all(&out).await?;
        stream.flush().await?;

        // Not `frame::MAX_CLIENT_INFO_LEN` (Go's 256 KiB): nothing is allocated for more than a
        // real ClientInfo needs before the client has proved its key.
        let first = read_frame(stream, buf, MAX_PRE_AUTH_CLIENT_INFO_LEN).await?;
        let Frame::ClientInfo { key, sealed } = first else {
            return Err(ConnError::Handshake(format!(
                "first frame type {:#04x}, want ClientInfo",
                first.frame_type()
            )));
        };
        let shared_box = SharedBox::new(self.shared.config.private_key.as_bytes(), key.as_bytes());
        let json = shared_box
            .open(&sealed)
            .map_err(|e| ConnError::Handshake(format!("ClientInfo box: {e}")))?;
        let info = ClientInfo::from_json(&json)
            .map_err(|e| ConnError::Handshake(format!("ClientInfo: {e}")))?;
        Ok((key, info, shared_box))
    }

    fn register(&self, conn: &Arc<Conn>) {
        let metrics = &self.shared.metrics;
        inc(&metrics.clients_accepted_total);
        inc(&metrics.clients_current);
        let mut registry = self.registry();
        self.routes_changed();
        let set = registry.clients.entry(conn.key).or_default();
        set.conns.push(conn.clone());
        if set.conns.len() > 1 {
            inc(&metrics.duplicate_clients_total);
            for c in &set.conns {
                c.in_dup_set.store(true, Ordering::Relaxed);
            }
        }
        // The newest connection receives until another one of the set sends something.
        set.active = Some(conn.clone());
        let present = Frame::PeerPresent {
            peer: conn.key,
            endpoint: Some(conn.addr),
            flags: conn.peer_present_flags(),
        };
        for watcher in &registry.watchers {
            watcher.push_control(present.clone());
        }
    }

    fn unregister(&self, conn: &Arc<Conn>) {
        let metrics = &self.shared.metrics;
        metrics.clients_current.fetch_sub(1, Ordering::Relaxed);
        let leftover = {
            let mut outbox = conn.outbox();
            let n = outbox.data.len() + outbox.disco.len();
            *outbox = Outbox::default();
            n as u64
        };
        metrics
            .packets_dropped_gone_total
            .fetch_add(leftover, Ordering::Relaxed);

        let mut registry = self.registry();
        self.routes_changed();
        registry.watchers.retain(|w| w.id != conn.id);
        let Some(set) = registry.clients.get_mut(&conn.key) else {
            return;
        };
        set.conns.retain(|c| c.id != conn.id);
        if set.active.as_ref().is_some_and(|a| a.id == conn.id) {
            set.active = None;
        }
        if let [only] = set.conns.as_slice() {
            only.in_dup_set.store(false, Ordering::Relaxed);
            set.active = Some(only.clone());
        }
        if !set.conns.is_empty() {
            return;
        }
        let Some(set) = registry.clients.remove(&conn.key) else {
            return;
        };
        let gone = Frame::PeerGone {
            peer: conn.key,
            reason: PeerGoneReason::Disconnected,
        };
        for dst in &set.sent_to {
            if let Some(dst_set) = registry.clients.get(dst) {
                for c in &dst_set.conns {
                    c.push_control(gone.clone());
                    inc(&metrics.peer_gone_sent_total);
                }
            }
        }
        for watcher in &registry.watchers {
            watcher.push_control(gone.clone());
        }
    }

    /// The reader: frames from the client, until error or EOF.
    async fn read_loop<R: AsyncRead + Unpin>(
        &self,
        conn: &Arc<Conn>,
        mut reader: R,
        mut buf: BytesMut,
    ) -> Result<(), ConnError> {
        let mut state = ReaderState {
            recorded_dsts: HashSet::new(),
            not_here: TokenBucket::new(3.0, 1.0),
            route: None,
            batch: Batch::default(),
        };
        loop {
            let handled = self.handle_frames(conn, &mut buf, &mut state);
            // What the read's frames batched goes out before the reader yields, waits or ends.
            self.flush_batch(&mut state.batch);
            if handled? {
                // Let the writers of what this read queued run before the next read: on a
                // one-thread runtime a busy sender's reader would otherwise fill their queues
                // (and drop from them) for as long as its socket has data.
                tokio::task::yield_now().await;
            }
            // Room for many frames per read; a client's buffer is bounded by this plus one frame.
            buf.reserve(READ_SPACE);
            if reader.read_buf(&mut buf).await? == 0 {
                return Err(ConnError::Closed);
            }
        }
    }

    /// Handles every whole frame in `buf`; whether there was one.
    fn handle_frames(
        &self,
        conn: &Arc<Conn>,
        buf: &mut BytesMut,
        state: &mut ReaderState,
    ) -> Result<bool, ConnError> {
        let mut handled = false;
        while let Some(frame) = frame::decode(buf, frame::MAX_FRAME_LEN)? {
            if conn.in_dup_set.load(Ordering::Relaxed) {
                // Claiming may change routes: what is batched goes where it was routed.
                self.flush_batch(&mut state.batch);
                self.claim_active(conn);
            }
            self.handle_frame(conn, frame, state)?;
            handled = true;
        }
        Ok(handled)
    }

    /// Invalidates every reader's cached route (called with the registry locked).
    fn routes_changed(&self) {
        self.shared.route_generation.fetch_add(1, Ordering::Release);
    }

    /// In a dup set, the last connection to send anything becomes the receiver.
    fn claim_active(&self, conn: &Arc<Conn>) {
        let mut registry = self.registry();
        if let Some(set) = registry.clients.get_mut(&conn.key) {
            if set.active.as_ref().map(|a| a.id) != Some(conn.id) {
                set.active = Some(conn.clone());
                self.routes_changed();
            }
        }
    }

    fn handle_frame(
        &self,
        conn: &Arc<Conn>,
        frame: Frame,
        state: &mut ReaderState,
    ) -> Result<(), ConnError> {
        let metrics = &self.shared.metrics;
        match frame {
            Frame::SendPacket { dst, packet } => {
                self.route_packet(conn, conn.key, dst, packet, state)
            }
            Frame::ForwardPacket { src, dst, packet } => {
                if !conn.is_mesh {
                    return Err(ConnError::Protocol("ForwardPacket from a non-mesh client"));
                }
                self.route_packet(conn, src, dst, packet, state);
            }
            Frame::NotePreferred { preferred } => {
                tracing::trace!(key = %conn.key, preferred, "note preferred");
            }
            Frame::Ping { data } => {
                inc(&metrics.pings_total);
                let mut outbox = conn.outbox();
                if outbox.pong.is_some() {
                    inc(&metrics.pongs_dropped_total);
                } else {
                    outbox.pong = Some(data);
                }
                drop(outbox);
                conn.wake.notify_one();
            }
            Frame::WatchConns => {
                if !conn.is_mesh {
                    return Err(ConnError::Protocol("WatchConns from a non-mesh client"));
                }
                self.add_watcher(conn);
            }
            Frame::ClosePeer { peer } => {
                if !conn.is_mesh {
                    return Err(ConnError::Protocol("ClosePeer from a non-mesh client"));
                }
                let registry = self.registry();
                if let Some(set) = registry.clients.get(&peer) {
                    for c in &set.conns {
                        c.shut();
                    }
                }
            }
            other => {
                tracing::trace!(frame_type = other.frame_type(), "skipping frame");
                inc(&metrics.frames_skipped_total);
            }
        }
        Ok(())
    }

    fn add_watcher(&self, conn: &Arc<Conn>) {
        let mut registry = self.registry();
        for (key, set) in &registry.clients {
            if let Some(c) = set.conns.last() {
                conn.push_control(Frame::PeerPresent {
                    peer: *key,
                    endpoint: Some(c.addr),
                    flags: c.peer_present_flags(),
                });
            }
        }
        if !registry.watchers.iter().any(|w| w.id == conn.id) {
            registry.watchers.push(conn.clone());
        }
    }

    fn route_packet(
        &self,
        from: &Arc<Conn>,
        src: NodePublic,
        dst: NodePublic,
        packet: Bytes,
        state: &mut ReaderState,
    ) {
        let metrics = &self.shared.metrics;
        let generation = self.shared.route_generation.load(Ordering::Acquire);
        let cached = state
            .route
            .as_ref()
            .filter(|r| r.is_for(src, dst, generation));
        if let Some(route) = cached {
            self.batch_for(&mut state.batch, &route.to, src, packet);
            return;
        }
        let target = {
            let mut registry = self.registry();
            let target = match registry.clients.get(&dst) {
                Some(set) => match &set.active {
                    Some(active) => Ok(active.clone()),
                    None => Err(false),
                },
                None => Err(true),
            };
            if target.is_ok() && !state.recorded_dsts.contains(&dst) {
                if let Some(src_set) = registry.clients.get_mut(&src) {
                    src_set.sent_to.insert(dst);
                    state.recorded_dsts.insert(dst);
                }
            }
            if let Ok(to) = &target {
                state.route = Some(CachedRoute {
                    src,
                    dst,
                    generation,
                    to: to.clone(),
                });
            }
            target
        };
        match target {
            Ok(to) => self.batch_for(&mut state.batch, &to, src, packet),
            Err(false) => inc(&metrics.packets_dropped_dup_client_total),
            Err(true) => {
                inc(&metrics.packets_dropped_unknown_dest_total);
                if frame::looks_like_disco(&packet) && state.not_here.take(Instant::now()) {
                    from.push_control(Frame::PeerGone {
                        peer: dst,
                        reason: PeerGoneReason::NotHere,
                    });
                    inc(&metrics.peer_gone_sent_total);
                }
            }
        }
    }

    /// Adds a packet for `to` to the batch, flushing first what it holds for another receiver.
    fn batch_for(&self, batch: &mut Batch, to: &Arc<Conn>, src: NodePublic, packet: Bytes) {
        if !batch.is_for(to) {
            self.flush_batch(batch);
            batch.to = Some(to.clone());
        }
        batch.push(src, packet);
    }

    /// Queues the batch's packets for their receiver (oldest dropped when its queue is full),
    /// wakes its writer once and counts them.
    fn flush_batch(&self, batch: &mut Batch) {
        let Some(to) = batch.to.take() else {
            return;
        };
        let count = batch.packets.len() as u64;
        let dropped = to.push_packets(batch.packets.drain(..), self.shared.config.queue_depth);
        // A read of tiny frames can hold hundreds; a bulk flow holds about a dozen. Do not keep
        // a flood's capacity for the life of the connection.
        if batch.packets.capacity() > BATCH_KEEP {
            batch.packets.shrink_to(BATCH_KEEP);
        }
        let metrics = &self.shared.metrics;
        if dropped > 0 {
            metrics
                .packets_dropped_queue_full_total
                .fetch_add(dropped, Ordering::Relaxed);
        }
        metrics
            .packets_forwarded_total
            .fetch_add(count, Ordering::Relaxed);
        metrics
            .bytes_forwarded_total
            .fetch_add(std::mem::take(&mut batch.bytes), Ordering::Relaxed);
    }

    /// The writer: drains the outbox, sends keep-alives, enforces the write timeout.
    async fn write_loop<W: AsyncWrite + Unpin>(
        &self,
        conn: &Arc<Conn>,
        mut writer: W,
    ) -> Result<(), ConnError> {
        let config = &self.shared.config;
        let jitter = config.keep_alive_jitter.mul_f64(rand::random::<f64>());
        let period = config.keep_alive + jitter;
        let mut keep_alive = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        let mut out = BytesMut::with_capacity(64 << 10);
        loop {
            tokio::select! {
                _ = conn.wake.notified() => {}
                _ = keep_alive.tick() => {
                    Frame::KeepAlive.encode(&mut out);
                    inc(&self.shared.metrics.keep_alives_sent_total);
                }
            }
            if conn.closed.load(Ordering::Acquire) {
                return Err(ConnError::Closed);
            }
            loop {
                let sent = self.fill_batch(conn, &mut out);
                if out.is_empty() {
                    break;
                }
                match tokio::time::timeout(config.write_timeout, async {
                    writer.write_all(&out).await?;
                    writer.flush().await
                })
                .await
                {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return Err(e.into()),
                    Err(_) => return Err(ConnError::Timeout),
                }
                self.shared
                    .metrics
                    .packets_sent_total
                    .fetch_add(sent, Ordering::Relaxed);
                out.clear();
            }
        }
    }

    /// Moves queued frames into `out` (up to ~256 KiB); returns the number of packets taken.
    fn fill_batch(&self, conn: &Conn, out: &mut BytesMut) -> u64 {
        const BATCH: usize = 256 << 10;
        let mut packets = 0;
        let mut outbox = conn.outbox();
        while let Some(f) = outbox.control.pop_front() {
            f.encode(out);
        }
        if let Some(data) = outbox.pong.take() {
            Frame::Pong { data }.encode(out);
        }
        while out.len() < BATCH {
            let next = outbox.disco.pop_front().or_else(|| outbox.data.pop_front());
            let Some((src, packet)) = next else { break };
            frame::put_recv_packet(out, &src, &packet);
            packets += 1;
        }
        packets
    }

    /// Answers Tailscale STUN binding requests on `socket` forever.
    pub async fn serve_stun(self, socket: UdpSocket) -> std::io::Result<()> {
        let mut buf = vec![0u8; 2048];
        loop {
            let (n, from) = socket.recv_from(&mut buf).await?;
            let Some(request) = buf.get(..n) else {
                continue;
            };
            match stun_reply(request, from) {
                Some(reply) => {
                    inc(&self.shared.metrics.stun_responses_total);
                    if let Err(e) = socket.send_to(&reply, from).await {
                        tracing::debug!(%from, error = %e, "stun reply failed");
                    }
                }
                None => inc(&self.shared.metrics.stun_ignored_total),
            }
        }
    }
}

/// Per-reader state that needs no lock.
struct ReaderState {
    /// Destinations already recorded in this key's `sent_to`.
    recorded_dsts: HashSet<NodePublic>,
    /// PeerGone(NotHere) limiter: 1/s, burst 3 (Go).
    not_here: TokenBucket,
    /// The last route taken: a bulk flow skips the registry's lock and map for each packet.
    route: Option<CachedRoute>,
    /// Packets of the current read for one receiver, queued together (see [`Batch`]).
    batch: Batch,
}

/// Packets from one read on their way to one receiver: queued under one lock with one wake-up
/// and one update of the counters, instead of a lock, a wake-up, an `Arc` clone and three atomic
/// additions per packet. Flushed when the receiver changes and after every read.
#[derive(Default)]
struct Batch {
    to: Option<Arc<Conn>>,
    packets: Vec<(NodePublic, Bytes)>,
    bytes: u64,
}

impl Batch {
    fn is_for(&self, to: &Arc<Conn>) -> bool {
        self.to.as_ref().is_some_and(|t| Arc::ptr_eq(t, to))
    }

    fn push(&mut self, src: NodePublic, packet: Bytes) {
        self.bytes += packet.len() as u64;
        self.packets.push((src, packet));
    }
}

/// Where packets from `src` to `dst` went while the registry was at `generation`.
struct CachedRoute {
    src: NodePublic,
    dst: NodePublic,
    generation: u64,
    to: Arc<Conn>,
}

impl CachedRoute {
    fn is_for(&self, src: NodePublic, dst: NodePublic, generation: u64) -> bool {
        self.generation == generation && self.dst == dst && self.src == src
    }
}

/// A token bucket driven by the caller's clock.
struct TokenBucket {
    tokens: f64,
    burst: f64,
    per_second: f64,
    last: Option<Instant>,
}

impl TokenBucket {
    fn new(burst: f64, per_second: f64) -> Self {
        TokenBucket {
            tokens: burst,
            burst,
            per_second,
            last: None,
        }
    }

    fn take(&mut self, now: Instant) -> bool {
        if let Some(last) = self.last {
            let refill = now.saturating_duration_since(last).as_secs_f64() * self.per_second;
            self.tokens = (self.tokens + refill).min(self.burst);
        }
        self.last = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Reads until the end of the HTTP request head; returns its length (bytes after it stay in `buf`).
async fn read_request_head<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
) -> Result<usize, ConnError> {
    // Only the bytes not yet searched (and 3 before them): a client that trickles its head a
    // byte at a time must not make this quadratic.
    let mut searched: usize = 0;
    loop {
        let from = searched.saturating_sub(3);
        if let Some(pos) = buf[from..].windows(4).position(|w| w == b"\r\n\r\n") {
            return Ok(from + pos + 4);
        }
        searched = buf.len();
        if buf.len() > MAX_REQUEST_HEAD {
            return Err(ConnError::Handshake("request head too large".into()));
        }
        if stream.read_buf(buf).await? == 0 {
            return Err(ConnError::Handshake("eof before request head".into()));
        }
    }
}

/// Reads one frame, buffering as needed; EOF is an error.
pub(crate) async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
    max_len: usize,
) -> Result<Frame, ConnError> {
    loop {
        if let Some(frame) = frame::decode(buf, max_len)? {
            return Ok(frame);
        }
        if reader.read_buf(buf).await? == 0 {
            return Err(ConnError::Closed);
        }
    }
}

/// The exact 101 response Go's derper writes (vectors: `http_upgrade_response_template`).
pub fn upgrade_response(server_key: &NodePublic) -> String {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nConnection: Upgrade\r\nDerp-Version: {}\r\nDerp-Public-Key: {}\r\n\r\n",
        frame::PROTOCOL_VERSION,
        hex::encode(server_key.as_bytes())
    )
}

fn http_response(status: u16, reason: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {status} {reason}\r\n");
    for (name, value) in headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    if status != 204 {
        out.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    out.push_str("Connection: close\r\n\r\n");
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// `/generate_204`: captive-portal check, echoing a well-formed challenge.
fn generate_204(challenge: Option<&str>) -> Vec<u8> {
    let cache = (
        "Cache-Control",
        "no-cache, no-store, must-revalidate, no-transform, max-age=0",
    );
    let response = challenge
        .filter(|c| valid_challenge(c))
        .map(|c| format!("response {c}"));
    match &response {
        Some(r) => http_response(
            204,
            "No Content",
            &[cache, ("X-Tailscale-Response", r)],
            b"",
        ),
        None => http_response(204, "No Content", &[cache], b""),
    }
}

fn valid_challenge(c: &str) -> bool {
    !c.is_empty()
        && c.len() <= 64
        && c.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// STUN reply for a strict Tailscale binding request, else `None`.
fn stun_reply(request: &[u8], from: SocketAddr) -> Option<Vec<u8>> {
    let tx = crate::stun::parse_binding_request(request).ok()?;
    Some(crate::stun::response(tx, from))
}

/// Server TLS config from a PEM certificate chain and private key, plus the meta certificate
/// announcing `server_key`.
pub fn tls_from_pem_files(
    certfile: &Path,
    keyfile: &Path,
    server_key: &NodePublic,
) -> Result<rustls::ServerConfig, TlsSetupError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_file_iter(certfile)
        .map_err(|e| TlsSetupError::Pem(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsSetupError::Pem(e.to_string()))?;
    let key =
        PrivateKeyDer::from_pem_file(keyfile).map_err(|e| TlsSetupError::Pem(e.to_string()))?;
    tls_config(chain, key, server_key)
}

/// A self-signed certificate for `hostname` (lab use), plus the meta certificate. Returns the
/// config and the leaf DER, whose SHA-256 a client can pin (`sha256-raw:` in a DERP map).
pub fn tls_self_signed(
    hostname: &str,
    server_key: &NodePublic,
) -> Result<(rustls::ServerConfig, Vec<u8>), TlsSetupError> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    let certified = rcgen::generate_simple_self_signed(vec![hostname.to_string()])
        .map_err(|e| TlsSetupError::Generate(e.to_string()))?;
    let der = certified.cert.der().to_vec();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(certified.key_pair.serialize_der()));
    let config = tls_config(vec![CertificateDer::from(der.clone())], key, server_key)?;
    Ok((config, der))
}

/// The `derpkey` meta certificate: self-signed Ed25519, CN `derpkey<hex key>`,
/// serial = protocol version. Go clients on TLS 1.3 read the server key from it and use fast
/// start; others treat it as an unused extra certificate.
pub fn meta_cert(
    server_key: &NodePublic,
) -> Result<rustls::pki_types::CertificateDer<'static>, TlsSetupError> {
    let generate = |e: rcgen::Error| TlsSetupError::Generate(e.to_string());
    let key_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).map_err(generate)?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(generate)?;
    let mut name = rcgen::DistinguishedName::new();
    name.push(
        rcgen::DnType::CommonName,
        format!("derpkey{}", hex::encode(server_key.as_bytes())),
    );
    params.distinguished_name = name;
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&[
        frame::PROTOCOL_VERSION as u8
    ]));
    params.is_ca = rcgen::IsCa::ExplicitNoCa;
    let cert = params.self_signed(&key_pair).map_err(generate)?;
    Ok(cert.der().clone())
}

fn tls_config(
    mut chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
    server_key: &NodePublic,
) -> Result<rustls::ServerConfig, TlsSetupError> {
    chain.push(meta_cert(server_key)?);
    // HTTP/1.1 only: no ALPN, as derper.
    rustls::ServerConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsSetupError::Rustls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| TlsSetupError::Rustls(e.to_string()))
}

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("reading PEM: {0}")]
    Pem(String),
    #[error("generating certificate: {0}")]
    Generate(String),
    #[error("rustls: {0}")]
    Rustls(String),
}

/// What [`run`] serves: listen address, TLS, STUN, identity and mesh key. Plain data, filled
/// from `tern derp`'s flags; the text fields are checked by `run`, whose errors name those flags.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// Address to serve DERP on: `ip:port`, or `:port` for all addresses.
    pub addr: String,
    /// PEM certificate chain for TLS (with `keyfile`).
    pub certfile: Option<PathBuf>,
    /// PEM private key for TLS (with `certfile`).
    pub keyfile: Option<PathBuf>,
    /// Serve TLS with a fresh self-signed certificate for this hostname; its `sha256-raw:` pin
    /// is printed.
    pub self_signed: Option<String>,
    /// Plain HTTP, no TLS (wins over the TLS settings).
    pub http: bool,
    /// UDP port of the STUN responder (0 = off).
    pub stun_port: u16,
    /// More host addresses to answer STUN on (same port), besides the listen address.
    pub stun_also: Vec<IpAddr>,
    /// File holding the server's private key (`privkey:` text); created if missing. `None`: a
    /// random key per run.
    pub key_file: Option<PathBuf>,
    /// Mesh key (64 hex digits) that privileged clients must present.
    pub mesh_key: Option<String>,
    /// [`ServerConfig::max_conns`].
    pub max_conns: usize,
    /// [`ServerConfig::max_unauth_per_ip`].
    pub max_unauth_per_ip: usize,
    /// [`ServerConfig::handshake_timeout`].
    pub handshake_timeout: Duration,
    /// [`ServerConfig::verify_clients`].
    pub verify_clients: Option<PathBuf>,
    /// Runtime threads ([`crate::runtime::build`]: 1 = one thread, 0 = one per CPU).
    pub threads: usize,
}

/// Run the relay described by `config` until interrupted (Ctrl-C).
pub fn run(run_config: &RunConfig) -> anyhow::Result<()> {
    use anyhow::Context;
    let addr = parse_listen_addr(&run_config.addr)?;
    let private_key = load_or_create_key(run_config.key_file.as_deref())?;
    let public_key = private_key.public();
    let mut config = ServerConfig::new(private_key);
    anyhow::ensure!(run_config.max_conns > 0, "--max-conns must be at least 1");
    anyhow::ensure!(
        run_config.max_unauth_per_ip > 0,
        "--max-unauth-per-ip must be at least 1"
    );
    config.max_conns = run_config.max_conns;
    config.max_unauth_per_ip = run_config.max_unauth_per_ip;
    config.handshake_timeout = run_config.handshake_timeout;
    config.verify_clients = run_config.verify_clients.clone();
    if let Some(socket) = &config.verify_clients {
        tracing::info!(socket = %socket.display(), "derp: only nodes the tern daemon knows may connect");
    }
    warn_if_over_fd_limit(config.max_conns);
    if let Some(mesh) = &run_config.mesh_key {
        config.mesh_key = Some(
            crate::keys::parse_bare_hex(mesh.trim()).context("--mesh-key must be 64 hex digits")?,
        );
    }
    let tls = match (
        &run_config.certfile,
        &run_config.keyfile,
        &run_config.self_signed,
        run_config.http,
    ) {
        (_, _, _, true) => None,
        (Some(cert), Some(key), _, _) => Some(tls_from_pem_files(cert, key, &public_key)?),
        (_, _, Some(host), _) => {
            let (tls, der) = tls_self_signed(host, &public_key)?;
            println!(
                "certname: sha256-raw:{}",
                hex::encode(super::client::sha256(&der))
            );
            Some(tls)
        }
        _ => anyhow::bail!("choose --http, --self-signed HOSTNAME, or --certfile/--keyfile"),
    };
    let runtime = crate::runtime::build(run_config.threads).context("starting the runtime")?;
    runtime.block_on(async move {
        let server = Server::new(config);
        let listener = bind_listener(addr).await?;
        let local = listener.local_addr()?;
        println!(
            "derp: serving {} on {local}, key {}",
            if tls.is_some() { "https" } else { "http" },
            server.public_key()
        );
        let stun_ips = std::iter::once(local.ip()).chain(run_config.stun_also.iter().copied());
        for ip in stun_ips.filter(|_| run_config.stun_port != 0) {
            let stun_addr = SocketAddr::new(ip, run_config.stun_port);
            let socket = UdpSocket::bind(stun_addr)
                .await
                .with_context(|| format!("stun on {stun_addr}"))?;
            println!("stun: serving on {}", socket.local_addr()?);
            tokio::spawn(server.clone().serve_stun(socket));
        }
        let acceptor = tls.map(|t| tokio_rustls::TlsAcceptor::from(Arc::new(t)));
        tokio::select! {
            _ = server.serve(listener, acceptor) => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        Ok::<_, anyhow::Error>(())
    })
}

/// `max_conns` above the open-file limit cannot be reached: accept fails (EMFILE) first.
fn warn_if_over_fd_limit(max_conns: usize) {
    if let Ok((soft, _)) = crate::rlimit::nofile() {
        if max_conns as u64 > soft {
            tracing::warn!(
                max_conns,
                nofile = soft,
                "--max-conns is above the open-file limit; accepts will fail with EMFILE first"
            );
        }
    }
}

/// Binds `addr`; an all-addresses IPv6 bind falls back to IPv4 on hosts without IPv6.
async fn bind_listener(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    match TcpListener::bind(addr).await {
        Ok(listener) => Ok(listener),
        Err(e) if addr.ip() == std::net::Ipv6Addr::UNSPECIFIED => {
            tracing::debug!(error = %e, "no IPv6; listening on IPv4 only");
            let v4 = SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), addr.port());
            Ok(TcpListener::bind(v4).await?)
        }
        Err(e) => Err(anyhow::anyhow!("listen on {addr}: {e}")),
    }
}

/// Accepts `ip:port`, or `:port` for all addresses (`[::]`, which takes IPv4 too on Linux).
fn parse_listen_addr(text: &str) -> anyhow::Result<SocketAddr> {
    let full = match text.strip_prefix(':') {
        Some(port) => format!("[::]:{port}"),
        None => text.to_string(),
    };
    full.parse()
        .map_err(|e| anyhow::anyhow!("bad --addr {text:?}: {e}"))
}

fn load_or_create_key(path: Option<&Path>) -> anyhow::Result<NodePrivate> {
    use anyhow::Context;
    let Some(path) = path else {
        return Ok(NodePrivate::generate());
    };
    if path.exists() {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
        return text
            .trim()
            .parse()
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()));
    }
    let key = NodePrivate::generate();
    write_private(path, &format!("{key}\n"))
        .with_context(|| format!("write {}", path.display()))?;
    Ok(key)
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upgrade_response_matches_vector() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vectors/derp.json");
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let key: NodePublic =
            "nodekey:50d20b455ecf12bc453f83c2cfdb2a24925d06cf2598dcaa54e91af82ce9f765"
                .parse()
                .unwrap();
        let want = v["format"]["http_upgrade_response_example"]["text"]
            .as_str()
            .unwrap();
        assert_eq!(upgrade_response(&key), want);
    }

    #[test]
    fn generate_204_echoes_only_valid_challenges() {
        let text = |c: Option<&str>| String::from_utf8(generate_204(c)).unwrap();
        let long = "a".repeat(65);
        assert!(text(Some("abc.DEF_1:2-3"))
            .contains("X-Tailscale-Response: response abc.DEF_1:2-3\r\n"));
        assert!(!text(Some("bad challenge")).contains("X-Tailscale-Response"));
        assert!(!text(Some(&long)).contains("X-Tailscale-Response"));
        assert!(text(None).starts_with("HTTP/1.1 204 No Content\r\n"));
    }

    #[test]
    fn token_bucket_allows_burst_then_one_per_second() {
        let mut bucket = TokenBucket::new(3.0, 1.0);
        let t0 = Instant::now();
        assert!((0..3).all(|_| bucket.take(t0)));
        assert!(!bucket.take(t0));
        assert!(!bucket.take(t0 + Duration::from_millis(500)));
        assert!(bucket.take(t0 + Duration::from_millis(1001)));
    }

    /// The STUN request vector from stun.json (txid 00..0b) gets an answer; mutations do not.
    #[test]
    fn stun_responder_is_strict() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vectors/stun.json");
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let req = hex::decode(v["request_vectors"][0]["packet_hex"].as_str().unwrap()).unwrap();
        let from: SocketAddr = "1.2.3.4:5678".parse().unwrap();
        let reply = stun_reply(&req, from).expect("valid Tailscale request answered");
        assert_eq!(&reply[..2], &[0x01, 0x01]);
        assert_eq!(&reply[8..20], &req[8..20]);
        // XOR-MAPPED-ADDRESS: port 5678 ^ 0x2112, ip 1.2.3.4 ^ cookie.
        assert_eq!(&reply[20..24], &[0x00, 0x20, 0x00, 0x08]);
        assert_eq!(u16::from_be_bytes([reply[26], reply[27]]), 5678 ^ 0x2112);
        assert_eq!(&reply[28..32], &[1 ^ 0x21, 2 ^ 0x12, 3 ^ 0xa4, 4 ^ 0x42]);
        let mut bad_fp = req.clone();
        let last = bad_fp.len() - 1;
        bad_fp[last] ^= 1;
        assert!(stun_reply(&bad_fp, from).is_none());
        let mut response_type = req.clone();
        response_type[1] = 0x11;
        assert!(stun_reply(&response_type, from).is_none());
        assert!(stun_reply(&req[..30], from).is_none());
    }

    #[test]
    fn meta_cert_names_the_server_key_with_serial_2() {
        let key = NodePrivate::generate().public();
        let der = meta_cert(&key).unwrap();
        let cn = format!("derpkey{}", hex::encode(key.as_bytes()));
        assert!(der.windows(cn.len()).any(|w| w == cn.as_bytes()));
        // tbsCertificate starts with [0] version, then INTEGER serial 2: 02 01 02.
        assert!(der
            .windows(8)
            .any(|w| w == [0xa0, 0x03, 0x02, 0x01, 0x02, 0x02, 0x01, 0x02]));
    }

    #[test]
    fn metrics_render_as_prometheus_text() {
        let m = Metrics::default();
        m.packets_forwarded_total.store(7, Ordering::Relaxed);
        let text = m.render_prometheus();
        assert!(text.contains("# TYPE tern_derp_packets_forwarded_total counter\ntern_derp_packets_forwarded_total 7\n"));
        assert!(text.contains("# TYPE tern_derp_clients_current gauge\n"));
    }

    #[test]
    fn a_full_queue_drops_its_oldest_packets_by_count_and_by_bytes() {
        let src = NodePrivate::generate().public();
        let mut q = PacketQueue::default();
        let small = |i: u8| Bytes::from(vec![i; 100]);
        let dropped: u64 = (0..10).map(|i| q.push(src, small(i), 4)).sum();
        assert_eq!((dropped, q.len()), (6, 4));
        let left: Vec<u8> = std::iter::from_fn(|| q.pop_front())
            .map(|(_, p)| p[0])
            .collect();
        assert_eq!(left, [6, 7, 8, 9], "the newest stay");
        assert_eq!(q.bytes, 0);

        // 64 KiB packets: the byte budget (128 × 2 KiB = 256 KiB) holds 4, not 128.
        let big = Bytes::from(vec![0u8; 65_000]);
        for _ in 0..20 {
            q.push(src, big.clone(), DEFAULT_QUEUE_DEPTH);
        }
        assert_eq!(q.len(), 4);
        assert!(q.bytes <= DEFAULT_QUEUE_DEPTH * QUEUE_BYTES_PER_SLOT);
        // One packet larger than the whole budget still goes through alone.
        let mut one = PacketQueue::default();
        assert_eq!(one.push(src, big.clone(), 1), 0);
        assert_eq!(one.push(src, big, 1), 1);
        assert_eq!(one.len(), 1);
    }
}
