//! LocalAPI: JSON over HTTP/1.1 on the daemon's Unix socket, for the CLI (and later `tern top`).
//!
//! | method + path               | body in        | body out            |
//! |-----------------------------|----------------|---------------------|
//! | `GET /localapi/v0/status`   | —              | [`Status`]          |
//! | `GET /localapi/v0/ip`       | —              | [`IpResponse`]      |
//! | `POST /localapi/v0/up`      | [`UpRequest`]  | `{}`                |
//! | `POST /localapi/v0/down`    | —              | `{}`                |
//! | `POST /localapi/v0/ping`    | [`PingRequest`]| [`PingResult`]      |
//! | `POST /localapi/v0/netcheck`| —              | [`NetcheckReport`]  |
//! | `GET /localapi/v0/whois?nodekey=nodekey:<hex>` | — | [`WhoIsResponse`] |
//!
//! `whois` answers from the status snapshot whether a node key is this node's or one of its
//! netmap peers' (404 when neither, 400 when the key is malformed); `tern derp
//! --verify-clients` asks it, as Go's derper asks tailscaled.
//! | `GET /localapi/v0/watch`    | —              | [`Status`] lines    |
//!
//! `watch` streams newline-delimited [`Status`] JSON (chunked, `application/x-ndjson`): the
//! current snapshot at once, then one whenever it changes, at most one per
//! [`WATCH_MIN_INTERVAL`]. One producer task serializes each change once and shares the line
//! ([`Bytes`], reference-counted) with every client, and only while someone watches. Each client
//! holds at most one line in flight: a slow reader skips to the newest snapshot, and one that
//! reads nothing for [`WATCH_STALL`] is dropped, so the daemon never buffers without bound. The
//! stream ends when the client goes away.
//! `ping` resolves the peer from the status snapshot ([`resolve_peer`]): 404 when nothing
//! matches, 409 when several do, 503 without a running data plane, 504 when the engine does
//! not answer in time. A ping that reaches the engine but gets no pong is a 200 with
//! [`PingResult::error`] set (`timeout`, …); pinging this node itself is a 200 with `error`
//! = [`PING_ERROR_LOCAL`].
//!
//! [`request`] turns a method, path, query and body into an [`ApiRequest`] (or the error the
//! server answers); the server does the I/O around it.
//!
//! Errors are a non-2xx status with `{"error": "..."}`. Access control is the socket file
//! itself: mode 0600, owned by root, or by the one `--operator` user the admin opted in.
//! The server reads status from the watch channel and sends commands to the daemon; it never
//! reaches into daemon internals.

use std::convert::Infallible;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, watch};

use crate::keys::NodePublic;
use crate::report::{NetcheckReport, PingResult};
use crate::status::{PeerStatus, Status};

pub mod request;

pub use request::{ApiRequest, Endpoint, MAX_BODY};

/// Largest response body the client reads (a big tailnet's status).
const MAX_RESPONSE: usize = 16 * 1024 * 1024;
/// `GET /localapi/v0/watch`.
pub const WATCH_PATH: &str = "/localapi/v0/watch";
/// The watch stream sends at most one snapshot per this interval (coalescing bursts).
pub const WATCH_MIN_INTERVAL: std::time::Duration = std::time::Duration::from_millis(250);
/// A watch client that takes no line for this long is dropped.
pub const WATCH_STALL: std::time::Duration = std::time::Duration::from_secs(30);

/// `GET /localapi/v0/logs`: the daemon's recent log lines, oldest first (no redaction: the
/// socket is root's or the operator's; `tern bugreport` redacts).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogsResponse {
    pub lines: Vec<String>,
}

/// `GET /localapi/v0/check-ip-forwarding`: Go's shape, one text (empty when all is well).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardingCheck {
    #[serde(rename = "Warning")]
    pub warning: String,
}

/// `POST /localapi/v0/up`. Absent fields keep their stored value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct UpRequest {
    pub login_server: Option<String>,
    /// The key itself (the CLI resolves `file:PATH`, as the invoking user).
    pub auth_key: Option<String>,
    pub hostname: Option<String>,
}

/// `GET /localapi/v0/ip`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpResponse {
    pub ipv4: Vec<String>,
    pub ipv6: Vec<String>,
}

/// `GET /localapi/v0/whois?nodekey=…`: the node with that key, this one or a peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WhoIsResponse {
    /// `nodekey:<hex>`
    pub node_key: String,
    pub hostname: String,
    /// MagicDNS name without the trailing dot.
    pub name: String,
    /// The key is this node's own.
    pub is_self: bool,
}

/// The node with `key` in `status`: this node or one of its peers.
pub fn whois(status: &Status, key: &NodePublic) -> Option<WhoIsResponse> {
    let same = |text: &str| text.parse::<NodePublic>().is_ok_and(|k| k == *key);
    if let Some(me) = status.self_node.as_ref().filter(|me| same(&me.node_key)) {
        return Some(WhoIsResponse {
            node_key: me.node_key.clone(),
            hostname: me.hostname.clone(),
            name: me.name.clone(),
            is_self: true,
        });
    }
    status
        .peers
        .iter()
        .find(|p| same(&p.node_key))
        .map(|p| WhoIsResponse {
            node_key: p.node_key.clone(),
            hostname: p.hostname.clone(),
            name: p.name.clone(),
            is_self: false,
        })
}

/// `POST /localapi/v0/ping`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PingRequest {
    /// MagicDNS name (with or without the trailing dot), its first label, hostname, any
    /// tailnet IP, or `nodekey:…`.
    pub peer: String,
    /// How long to wait for the pong.
    #[serde(default = "default_ping_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_ping_timeout_ms() -> u64 {
    5000
}

/// Longest ping timeout the LocalAPI accepts (one minute).
pub const MAX_PING_TIMEOUT_MS: u64 = 60_000;

/// [`PingResult::error`] when the peer named is this node itself.
pub const PING_ERROR_LOCAL: &str = "local";

/// A LocalAPI failure the daemon reports: HTTP status and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
}

/// What the LocalAPI asks of the daemon; each carries the channel for the answer.
#[derive(Debug)]
pub enum Command {
    Up(UpRequest, oneshot::Sender<Result<(), String>>),
    Down(oneshot::Sender<Result<(), String>>),
    /// `tern logout`: leave the tailnet and expire the node key at control. The reply says
    /// whether control could be told (the local logout happens either way).
    Logout(oneshot::Sender<Result<(), String>>),
    /// Disco-ping the peer with this node key (already resolved by the LocalAPI).
    Ping {
        peer: NodePublic,
        timeout: std::time::Duration,
        reply: oneshot::Sender<Result<PingResult, ApiError>>,
    },
    Netcheck(oneshot::Sender<Result<NetcheckReport, ApiError>>),
    /// `tern set`: change the preferences the request marks as set.
    Set(SetRequest, oneshot::Sender<Result<(), String>>),
}

/// `PATCH /localapi/v0/prefs`: masked preferences (Go `MaskedPrefs`): a field changes only when its
/// `…_set` flag is true, so an absent field means "unchanged".
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SetRequest {
    /// The relay server's UDP port (`null` = off, 0 = a port the kernel picks).
    pub relay_server_port: Option<u16>,
    pub relay_server_port_set: bool,
    /// Addresses the relay server offers besides the discovered ones (empty = none).
    pub relay_server_static_endpoints: Vec<std::net::SocketAddr>,
    pub relay_server_static_endpoints_set: bool,
    /// Exit node, subnet routes, netfilter: each `Some` field changes that pref.
    pub net: NetPrefsPatch,
}

/// Changes to the routing prefs (`tern set` / `tern up` flags); `None` = unchanged.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct NetPrefsPatch {
    /// A peer's name or tailnet IP; `""` stops using an exit node.
    pub exit_node: Option<String>,
    pub exit_node_allow_lan_access: Option<bool>,
    pub advertise_exit_node: Option<bool>,
    pub advertise_routes: Option<Vec<ipnet::IpNet>>,
    pub accept_routes: Option<bool>,
    pub snat_subnet_routes: Option<bool>,
    /// `on`, `nodivert` or `off`.
    pub netfilter_mode: Option<String>,
    pub accept_dns: Option<bool>,
    pub stateful_filtering: Option<bool>,
}

impl NetPrefsPatch {
    /// Whether it changes nothing.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// Which node a `tern ping` argument names.
#[derive(Debug, Clone, PartialEq)]
pub enum PingTarget<'a> {
    Peer(&'a PeerStatus),
    /// This node; carries its first tailnet IP.
    SelfNode(String),
}

/// Find the node `query` names in `status`: the full MagicDNS name (trailing dot optional,
/// any case), a tailnet IP, the node key text, then the first label of the name or the
/// hostname (those two must be unique). Errors name no keys.
pub fn resolve_peer<'a>(status: &'a Status, query: &str) -> Result<PingTarget<'a>, ApiError> {
    let query = query.trim();
    let not_found = || ApiError::new(StatusCode::NOT_FOUND, format!("no peer matches {query:?}"));
    if query.is_empty() {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "no peer named"));
    }
    if status.self_node.is_none() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no network map yet (this node is not connected to the tailnet): run tern up, \
             see tern status",
        ));
    }
    let wanted_name = query.trim_end_matches('.').to_ascii_lowercase();
    let wanted_ip = query.parse::<std::net::IpAddr>().ok();
    let wanted_key = query.parse::<NodePublic>().ok();
    let exact = |name: &str, ips: &[String], key: &str| {
        name.trim_end_matches('.')
            .eq_ignore_ascii_case(&wanted_name)
            || wanted_ip.is_some_and(|want| {
                ips.iter()
                    .any(|ip| ip.parse::<std::net::IpAddr>().ok() == Some(want))
            })
            || wanted_key
                .as_ref()
                .is_some_and(|want| key.parse::<NodePublic>().ok().as_ref() == Some(want))
    };
    if let Some(me) = &status.self_node {
        if exact(&me.name, &me.tailnet_ips, &me.node_key) {
            return Ok(PingTarget::SelfNode(
                me.tailnet_ips.first().cloned().unwrap_or_default(),
            ));
        }
    }
    if let Some(peer) = status
        .peers
        .iter()
        .find(|p| exact(&p.name, &p.tailnet_ips, &p.node_key))
    {
        return Ok(PingTarget::Peer(peer));
    }
    if wanted_ip.is_some() || wanted_key.is_some() || wanted_name.contains('.') {
        return Err(not_found());
    }
    let short: Vec<&PeerStatus> = status
        .peers
        .iter()
        .filter(|p| {
            first_label(&p.name).eq_ignore_ascii_case(&wanted_name)
                || p.hostname.eq_ignore_ascii_case(&wanted_name)
        })
        .collect();
    match short.as_slice() {
        [] => {
            let is_me = status.self_node.as_ref().filter(|me| {
                first_label(&me.name).eq_ignore_ascii_case(&wanted_name)
                    || me.hostname.eq_ignore_ascii_case(&wanted_name)
            });
            match is_me {
                Some(me) => Ok(PingTarget::SelfNode(
                    me.tailnet_ips.first().cloned().unwrap_or_default(),
                )),
                None => Err(not_found()),
            }
        }
        [one] => Ok(PingTarget::Peer(one)),
        several => {
            let names: Vec<&str> = several.iter().map(|p| p.name.as_str()).collect();
            Err(ApiError::new(
                StatusCode::CONFLICT,
                format!(
                    "{query:?} matches several peers ({}); use the full name or an IP",
                    names.join(", ")
                ),
            ))
        }
    }
}

/// The first label of a MagicDNS name (`n2` of `n2.tailnet.example.`).
fn first_label(name: &str) -> &str {
    name.split('.').next().unwrap_or_default()
}

/// The name `tailscale ping` prints: the first label of the MagicDNS name, else the hostname.
pub fn ping_display_name(peer: &PeerStatus) -> String {
    match first_label(&peer.name) {
        "" => peer.hostname.clone(),
        label => label.to_string(),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LocalApiError {
    #[error("socket {path}: {source}")]
    Socket {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("another daemon is already listening on {0}")]
    InUse(PathBuf),
    #[error("cannot reach the tern daemon at {path} (is `tern daemon` running?): {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("LocalAPI HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("LocalAPI request: {0}")]
    Request(#[from] http::Error),
    #[error("LocalAPI response too large or unreadable: {0}")]
    Body(String),
    #[error("daemon answered {status}: {message}")]
    Status { status: StatusCode, message: String },
    #[error("bad JSON from the daemon: {0}")]
    Json(#[from] serde_json::Error),
}

/// Who may use the socket besides root.
#[derive(Debug, Clone, Copy, Default)]
pub struct SocketOwner {
    /// The `--operator` user's uid/gid; `None` means root only.
    pub operator: Option<(u32, u32)>,
}

/// Bind the socket: refuse if a live daemon holds it, replace a stale file, mode 0600,
/// owned by root or the operator.
pub fn bind(path: &Path, owner: SocketOwner) -> Result<UnixListener, LocalApiError> {
    let sock_err = |source| LocalApiError::Socket {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(sock_err)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(LocalApiError::InUse(path.to_path_buf()));
            }
            std::fs::remove_file(path).map_err(sock_err)?;
        }
        Ok(_) => {
            return Err(sock_err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "exists and is not a socket",
            )))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(sock_err(e)),
    }
    // Bind under a restrictive umask so the socket is never connectable by others.
    let old_umask = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let listener = UnixListener::bind(path);
    nix::sys::stat::umask(old_umask);
    let listener = listener.map_err(sock_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(sock_err)?;
    if let Some((uid, gid)) = owner.operator {
        std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(sock_err)?;
    }
    Ok(listener)
}

/// Serve LocalAPI connections until the listener fails or the task is dropped.
pub async fn serve(
    listener: UnixListener,
    status: watch::Receiver<Status>,
    commands: mpsc::Sender<Command>,
) {
    let shared = Arc::new(Shared {
        status,
        commands,
        feed: FeedSlot::default(),
    });
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "LocalAPI accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(shared.route(req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "LocalAPI connection ended with an error");
            }
        });
    }
}

struct Shared {
    status: watch::Receiver<Status>,
    commands: mpsc::Sender<Command>,
    feed: FeedSlot,
}

/// The shared watch lines while a producer runs ([`produce_lines`]); `None` while nobody
/// watches, so an unwatched daemon serializes nothing. Subscribing and retiring both happen
/// under the lock, so a client never subscribes to a producer that is about to stop.
type FeedSlot = Arc<std::sync::Mutex<Option<Arc<watch::Sender<Bytes>>>>>;

/// The slot, even if a thread panicked holding it: it only ever holds a complete `Option`.
fn lock_slot(slot: &FeedSlot) -> std::sync::MutexGuard<'_, Option<Arc<watch::Sender<Bytes>>>> {
    slot.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

type Reply = Response<Full<Bytes>>;

/// A reply with a whole body, or the watch stream.
type AnyReply = Response<Either<Full<Bytes>, WatchBody>>;

/// The watch stream's body: the lines its task sends, as chunks.
pub struct WatchBody {
    lines: mpsc::Receiver<Bytes>,
}

impl hyper::body::Body for WatchBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.lines
            .poll_recv(cx)
            .map(|line| line.map(|l| Ok(Frame::data(l))))
    }
}

/// One snapshot as a watch line: JSON and a newline.
fn status_line(status: &Status) -> Result<Bytes, serde_json::Error> {
    let mut line = serde_json::to_vec(status)?;
    line.push(b'\n');
    Ok(Bytes::from(line))
}

/// What the producer waits for next.
enum Next {
    /// The status changed (and [`WATCH_MIN_INTERVAL`] has passed since the last line).
    Changed,
    /// Every client is gone.
    Unwatched,
    /// The daemon dropped the status sender: it is stopping.
    Stopped,
}

/// Wait out the coalescing interval, then for a change, watching for the last client to leave.
async fn next_change(status: &mut watch::Receiver<Status>, lines: &watch::Sender<Bytes>) -> Next {
    tokio::select! {
        _ = tokio::time::sleep(WATCH_MIN_INTERVAL) => {}
        _ = lines.closed() => return Next::Unwatched,
    }
    tokio::select! {
        changed = status.changed() => match changed {
            Ok(()) => Next::Changed,
            Err(_) => Next::Stopped,
        },
        _ = lines.closed() => Next::Unwatched,
    }
}

/// Serialize each status change once for every watch client, at most one per
/// [`WATCH_MIN_INTERVAL`] (bursts coalesce into the newest), until no client is left.
async fn produce_lines(
    mut status: watch::Receiver<Status>,
    lines: Arc<watch::Sender<Bytes>>,
    slot: FeedSlot,
) {
    loop {
        match next_change(&mut status, &lines).await {
            Next::Changed => {}
            Next::Unwatched => {
                let mut feed = lock_slot(&slot);
                // A client may have subscribed since `closed()` fired; it keeps us going.
                if lines.receiver_count() == 0 {
                    *feed = None;
                    return;
                }
                continue;
            }
            Next::Stopped => break,
        }
        let line = status_line(&status.borrow_and_update());
        match line {
            Ok(line) => {
                lines.send_replace(line);
            }
            Err(e) => {
                tracing::warn!(error = %e, "watch: cannot serialize the status");
                break;
            }
        }
    }
    // Dropping our sender ends every client's stream; the next client starts a new producer.
    *lock_slot(&slot) = None;
}

/// Feed one watch client the shared lines: the newest now, then each new one. `out` holds one
/// line; while it is full the watch receiver keeps only the newest, so a slow client skips
/// ahead instead of queueing, and one that takes nothing for [`WATCH_STALL`] is dropped.
async fn feed_client(mut lines: watch::Receiver<Bytes>, out: mpsc::Sender<Bytes>) {
    loop {
        // A clone of `Bytes` shares the producer's buffer.
        let line = lines.borrow_and_update().clone();
        match tokio::time::timeout(WATCH_STALL, out.send(line)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return, // the client went away
            Err(_) => {
                tracing::debug!("watch: dropping a client that reads nothing");
                return;
            }
        }
        tokio::select! {
            changed = lines.changed() => if changed.is_err() { return },
            _ = out.closed() => return,
        }
    }
}

impl Shared {
    /// Answer one request: the watch stream, or a whole reply.
    async fn route(&self, req: Request<Incoming>) -> AnyReply {
        let request = match read_request(req).await {
            Ok(request) => request,
            Err(e) => return error_reply(e.status, &e.message).map(Either::Left),
        };
        let reply = match request {
            ApiRequest::Watch => return self.watch(),
            ApiRequest::Status => json_reply(&*self.status.borrow()),
            ApiRequest::Ip => json_reply(&ip_response(&self.status.borrow())),
            ApiRequest::Up(up) => self.command(|tx| Command::Up(up, tx)).await,
            ApiRequest::Down => self.command(Command::Down).await,
            ApiRequest::Logout => self.command(Command::Logout).await,
            ApiRequest::Set(set) => self.command(|tx| Command::Set(set, tx)).await,
            ApiRequest::Ping(ping) => self.ping(ping).await,
            ApiRequest::Netcheck => result_reply(self.ask(Command::Netcheck).await),
            ApiRequest::WhoIs(key) => result_reply(self.whois(&key)),
            ApiRequest::CheckIpForwarding => json_reply(&ForwardingCheck {
                warning: tern_platform::sysctl::forwarding_problems(true).join("\n"),
            }),
            ApiRequest::Logs => json_reply(&LogsResponse {
                lines: crate::logring::recent(crate::logring::MAX_LINES),
            }),
        };
        reply.map(Either::Left)
    }

    /// The shared lines, starting their producer if nobody was watching. The first client's
    /// line is serialized here, so it is there at once.
    fn subscribe(&self) -> Result<watch::Receiver<Bytes>, serde_json::Error> {
        let mut feed = lock_slot(&self.feed);
        if let Some(lines) = feed.as_ref() {
            return Ok(lines.subscribe());
        }
        let mut status = self.status.clone();
        let first = status_line(&status.borrow_and_update())?;
        let (tx, rx) = watch::channel(first);
        let tx = Arc::new(tx);
        *feed = Some(tx.clone());
        tokio::spawn(produce_lines(status, tx, self.feed.clone()));
        Ok(rx)
    }

    fn watch(&self) -> AnyReply {
        let lines = match self.subscribe() {
            Ok(lines) => lines,
            Err(e) => {
                tracing::warn!(error = %e, "watch: cannot serialize the status");
                let msg = format!("cannot serialize the status: {e}");
                return error_reply(StatusCode::INTERNAL_SERVER_ERROR, &msg).map(Either::Left);
            }
        };
        let (tx, rx) = mpsc::channel(1);
        tokio::spawn(feed_client(lines, tx));
        let mut reply = Response::new(Either::Right(WatchBody { lines: rx }));
        reply.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/x-ndjson"),
        );
        reply
    }

    fn whois(&self, key: &NodePublic) -> Result<WhoIsResponse, ApiError> {
        whois(&self.status.borrow(), key)
            .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "no node with that key"))
    }

    /// Resolve the peer here (from the snapshot), let the daemon ask the engine, and name the
    /// peer in the answer. [`request::parse`] has checked `timeout_ms`.
    async fn ping(&self, req: PingRequest) -> Reply {
        let (key, node_name, node_ip) = {
            let status = self.status.borrow();
            match resolve_peer(&status, &req.peer) {
                Ok(PingTarget::SelfNode(ip)) => {
                    return json_reply(&PingResult {
                        node_ip: ip,
                        error: Some(PING_ERROR_LOCAL.into()),
                        ..Default::default()
                    })
                }
                Ok(PingTarget::Peer(peer)) => match peer.node_key.parse::<NodePublic>() {
                    Ok(key) => (
                        key,
                        ping_display_name(peer),
                        peer.tailnet_ips.first().cloned().unwrap_or_default(),
                    ),
                    Err(_) => {
                        return error_reply(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "the peer's node key in the status snapshot is unreadable",
                        )
                    }
                },
                Err(e) => return error_reply(e.status, &e.message),
            }
        };
        let timeout = std::time::Duration::from_millis(req.timeout_ms);
        let answer = self
            .ask(|reply| Command::Ping {
                peer: key,
                timeout,
                reply,
            })
            .await
            .map(|result| PingResult {
                node_name,
                node_ip,
                ..result
            });
        result_reply(answer)
    }

    /// Send a command whose answer is a value or an [`ApiError`].
    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, ApiError>>) -> Command,
    ) -> Result<T, ApiError> {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(make(tx)).await.is_err() {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "daemon is shutting down",
            ));
        }
        rx.await.unwrap_or_else(|_| {
            Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "daemon dropped the request",
            ))
        })
    }

    async fn command(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<(), String>>) -> Command,
    ) -> Reply {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(make(tx)).await.is_err() {
            return error_reply(StatusCode::SERVICE_UNAVAILABLE, "daemon is shutting down");
        }
        match rx.await {
            Ok(Ok(())) => json_reply(&serde_json::json!({})),
            Ok(Err(message)) => error_reply(StatusCode::BAD_REQUEST, &message),
            Err(_) => error_reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "daemon dropped the request",
            ),
        }
    }
}

fn ip_response(status: &Status) -> IpResponse {
    let (v4, v6): (Vec<String>, Vec<String>) = status
        .self_ips()
        .iter()
        .cloned()
        .partition(|ip| !ip.contains(':'));
    IpResponse { ipv4: v4, ipv6: v6 }
}

/// The endpoint, then the body (only for endpoints that take one, at most [`MAX_BODY`] bytes),
/// then what the request asks ([`request::parse`]).
async fn read_request(req: Request<Incoming>) -> Result<ApiRequest, ApiError> {
    if !(req.method() == Method::GET && req.uri().path() == WATCH_PATH) {
        tracing::trace!(method = %req.method(), path = %req.uri().path(), "LocalAPI request");
    }
    let endpoint = request::endpoint(req.method(), req.uri().path())?;
    let query = req.uri().query().map(str::to_owned);
    let body = if endpoint.reads_body() {
        Limited::new(req.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(request::body_error)?
            .to_bytes()
    } else {
        Bytes::new()
    };
    request::parse(endpoint, query.as_deref(), &body)
}

fn result_reply<T: Serialize>(result: Result<T, ApiError>) -> Reply {
    match result {
        Ok(value) => json_reply(&value),
        Err(e) => error_reply(e.status, &e.message),
    }
}

fn json_reply<T: Serialize>(value: &T) -> Reply {
    match serde_json::to_vec(value) {
        Ok(body) => Response::builder()
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()))),
        Err(e) => error_reply(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

fn error_reply(status: StatusCode, message: &str) -> Reply {
    let body = serde_json::json!({ "error": message }).to_string();
    let mut reply = Response::new(Full::new(Bytes::from(body)));
    *reply.status_mut() = status;
    reply
}

/// A LocalAPI client: one short HTTP/1.1 connection per call.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
}

/// The daemon's error message from a non-2xx body (`{"error": …}`), else the body as text.
fn error_of(status: StatusCode, bytes: &[u8]) -> LocalApiError {
    let message = serde_json::from_slice::<serde_json::Value>(bytes)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(bytes).into_owned());
    LocalApiError::Status { status, message }
}

/// An open `GET /localapi/v0/watch` stream: one [`Status`] line after another.
pub struct WatchStream {
    body: Incoming,
    buf: Vec<u8>,
    ended: bool,
    driver: tokio::task::JoinHandle<()>,
}

impl WatchStream {
    /// The next line, without its newline; `None` once the daemon ended the stream. A last line
    /// without a newline (a cut stream) is returned as it is, for the reader to reject.
    pub async fn next_line(&mut self) -> Result<Option<String>, LocalApiError> {
        loop {
            if let Some(end) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=end).collect();
                return Ok(Some(String::from_utf8_lossy(&line[..end]).into_owned()));
            }
            if self.ended {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                let rest = std::mem::take(&mut self.buf);
                return Ok(Some(String::from_utf8_lossy(&rest).into_owned()));
            }
            match self.body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                    if self.buf.len() > MAX_RESPONSE {
                        return Err(LocalApiError::Body(format!(
                            "a watch line longer than {MAX_RESPONSE} bytes"
                        )));
                    }
                }
                Some(Err(e)) if !self.buf.is_empty() => {
                    return Err(LocalApiError::Body(format!(
                        "the stream was cut in the middle of a snapshot ({} bytes): {e}",
                        self.buf.len()
                    )))
                }
                Some(Err(e)) => return Err(e.into()),
                None => self.ended = true,
            }
        }
    }

    /// The next snapshot; `None` once the daemon ended the stream.
    pub async fn next(&mut self) -> Result<Option<Status>, LocalApiError> {
        match self.next_line().await? {
            Some(line) => Ok(Some(serde_json::from_str(&line)?)),
            None => Ok(None),
        }
    }
}

impl Drop for WatchStream {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

impl Client {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
        }
    }

    pub async fn status(&self) -> Result<Status, LocalApiError> {
        self.call(Method::GET, "/localapi/v0/status", None).await
    }

    pub async fn ip(&self) -> Result<IpResponse, LocalApiError> {
        self.call(Method::GET, "/localapi/v0/ip", None).await
    }

    pub async fn up(&self, req: &UpRequest) -> Result<(), LocalApiError> {
        let body = serde_json::to_vec(req)?;
        let _: serde_json::Value = self
            .call(Method::POST, "/localapi/v0/up", Some(body))
            .await?;
        Ok(())
    }

    pub async fn logout(&self) -> Result<(), LocalApiError> {
        let _: serde_json::Value = self
            .call(Method::POST, "/localapi/v0/logout", Some(Vec::new()))
            .await?;
        Ok(())
    }

    pub async fn down(&self) -> Result<(), LocalApiError> {
        let _: serde_json::Value = self
            .call(Method::POST, "/localapi/v0/down", Some(Vec::new()))
            .await?;
        Ok(())
    }

    /// `tern set`: change the marked preferences (see [`SetRequest`]).
    pub async fn set(&self, req: &SetRequest) -> Result<(), LocalApiError> {
        let body = serde_json::to_vec(req)?;
        let _: serde_json::Value = self
            .call(Method::PATCH, "/localapi/v0/prefs", Some(body))
            .await?;
        Ok(())
    }

    /// The daemon's recent log lines.
    pub async fn logs(&self) -> Result<LogsResponse, LocalApiError> {
        self.call(Method::GET, "/localapi/v0/logs", None).await
    }

    /// What keeps the daemon's host from forwarding (empty when nothing).
    pub async fn check_ip_forwarding(&self) -> Result<ForwardingCheck, LocalApiError> {
        self.call(Method::GET, "/localapi/v0/check-ip-forwarding", None)
            .await
    }

    /// One disco ping through the daemon (see [`PingRequest`]).
    pub async fn ping(&self, req: &PingRequest) -> Result<PingResult, LocalApiError> {
        let body = serde_json::to_vec(req)?;
        self.call(Method::POST, "/localapi/v0/ping", Some(body))
            .await
    }

    /// A fresh netcheck from the running data plane.
    pub async fn netcheck(&self) -> Result<NetcheckReport, LocalApiError> {
        self.call(Method::POST, "/localapi/v0/netcheck", Some(Vec::new()))
            .await
    }

    /// The node with `key` (this one or a peer), or `None` when the daemon knows no such node.
    pub async fn whois(&self, key: &NodePublic) -> Result<Option<WhoIsResponse>, LocalApiError> {
        let path = format!("/localapi/v0/whois?nodekey={key}");
        match self.call(Method::GET, &path, None).await {
            Ok(found) => Ok(Some(found)),
            Err(LocalApiError::Status { status, .. }) if status == StatusCode::NOT_FOUND => {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// `GET /localapi/v0/watch`: the status now and at every change (see [`WatchStream`]).
    pub async fn watch(&self) -> Result<WatchStream, LocalApiError> {
        let (resp, driver) = self.send(Method::GET, WATCH_PATH, None).await?;
        let status = resp.status();
        if !status.is_success() {
            let bytes = Limited::new(resp.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| LocalApiError::Body(e.to_string()))?
                .to_bytes();
            driver.abort();
            return Err(error_of(status, &bytes));
        }
        Ok(WatchStream {
            body: resp.into_body(),
            buf: Vec::new(),
            ended: false,
            driver,
        })
    }

    /// Open a connection and send one request; the caller reads the body and then stops the
    /// connection driver.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(Response<Incoming>, tokio::task::JoinHandle<()>), LocalApiError> {
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|source| LocalApiError::Connect {
                    path: self.socket.clone(),
                    source,
                })?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        let driver = tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "LocalAPI client connection ended with an error");
            }
        });
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "local-tern")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.unwrap_or_default())))?;
        match sender.send_request(req).await {
            Ok(resp) => Ok((resp, driver)),
            Err(e) => {
                driver.abort();
                Err(e.into())
            }
        }
    }

    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, LocalApiError> {
        let (resp, driver) = self.send(method, path, body).await?;
        let status = resp.status();
        let bytes = Limited::new(resp.into_body(), MAX_RESPONSE)
            .collect()
            .await
            .map_err(|e| LocalApiError::Body(e.to_string()));
        driver.abort();
        let bytes = bytes?.to_bytes();
        if !status.is_success() {
            return Err(error_of(status, &bytes));
        }
        Ok(serde_json::from_slice(&bytes)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{DataPlaneStatus, Status};
    use std::time::SystemTime;

    fn initial() -> Status {
        Status::initial(
            DataPlaneStatus {
                tun: "t".into(),
                port: 1,
                ..Default::default()
            },
            SystemTime::UNIX_EPOCH,
        )
    }

    /// A server whose "daemon" accepts `up` only with a login server, and records commands.
    async fn start(dir: &Path) -> (Client, watch::Sender<Status>, mpsc::Receiver<Command>) {
        let sock = dir.join("tern.sock");
        let listener = bind(&sock, SocketOwner::default()).unwrap();
        let (status_tx, status_rx) = watch::channel(initial());
        let (cmd_tx, cmd_rx) = mpsc::channel(4);
        tokio::spawn(serve(listener, status_rx, cmd_tx));
        (Client::new(sock), status_tx, cmd_rx)
    }

    #[tokio::test]
    async fn socket_is_private_and_status_is_served() {
        let tmp = tempfile::tempdir().unwrap();
        let (client, status_tx, _cmds) = start(tmp.path()).await;
        let mode = std::fs::metadata(tmp.path().join("tern.sock"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(client.status().await.unwrap(), initial());
        let mut changed = initial();
        changed.peers.clear();
        changed.control.failed_attempts = 4;
        status_tx.send(changed.clone()).unwrap();
        assert_eq!(client.status().await.unwrap(), changed);
    }

    #[tokio::test]
    async fn up_is_forwarded_and_errors_come_back() {
        let tmp = tempfile::tempdir().unwrap();
        let (client, _status, mut cmds) = start(tmp.path()).await;
        let daemon = tokio::spawn(async move {
            while let Some(cmd) = cmds.recv().await {
                match cmd {
                    Command::Up(req, tx) if req.login_server.is_some() => {
                        let _ = tx.send(Ok(()));
                    }
                    Command::Up(_, tx) => {
                        let _ = tx.send(Err("no login server".into()));
                    }
                    Command::Down(tx) => {
                        let _ = tx.send(Ok(()));
                    }
                    other => panic!("unexpected command {other:?}"),
                }
            }
        });
        let up = UpRequest {
            login_server: Some("http://127.0.0.1:1".into()),
            ..Default::default()
        };
        client.up(&up).await.unwrap();
        let err = client.up(&UpRequest::default()).await.unwrap_err();
        assert!(err.to_string().contains("no login server"), "{err}");
        client.down().await.unwrap();
        daemon.abort();
    }

    #[tokio::test]
    async fn set_patches_prefs_and_refusals_come_back_as_400() {
        let tmp = tempfile::tempdir().unwrap();
        let (client, _status, mut cmds) = start(tmp.path()).await;
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = seen.clone();
        let daemon = tokio::spawn(async move {
            while let Some(cmd) = cmds.recv().await {
                match cmd {
                    Command::Set(req, tx) => {
                        let answer = if req.relay_server_port == Some(41641) {
                            Err("port 41641 is taken".to_string())
                        } else {
                            Ok(())
                        };
                        log.lock().unwrap().push(req);
                        let _ = tx.send(answer);
                    }
                    other => panic!("unexpected command {other:?}"),
                }
            }
        });
        let on = SetRequest {
            relay_server_port: Some(40000),
            relay_server_port_set: true,
            ..Default::default()
        };
        client.set(&on).await.unwrap();
        let off = SetRequest {
            relay_server_port: None,
            relay_server_port_set: true,
            ..Default::default()
        };
        client.set(&off).await.unwrap();
        let taken = SetRequest {
            relay_server_port: Some(41641),
            relay_server_port_set: true,
            ..Default::default()
        };
        match client.set(&taken).await.unwrap_err() {
            LocalApiError::Status { status, message } => {
                assert_eq!(status, StatusCode::BAD_REQUEST);
                assert_eq!(message, "port 41641 is taken");
            }
            other => panic!("{other:?}"),
        }
        // An absent field means "unchanged": `{}` arrives as nothing set.
        let _: serde_json::Value = client
            .call(Method::PATCH, "/localapi/v0/prefs", Some(b"{}".to_vec()))
            .await
            .unwrap();
        assert_eq!(
            *seen.lock().unwrap(),
            vec![on, off, taken, SetRequest::default()]
        );
        // Only PATCH.
        let err = client
            .call::<serde_json::Value>(Method::POST, "/localapi/v0/prefs", Some(b"{}".to_vec()))
            .await
            .unwrap_err();
        assert!(
            matches!(err, LocalApiError::Status { status, .. } if status == StatusCode::METHOD_NOT_ALLOWED)
        );
        daemon.abort();
    }

    #[tokio::test]
    async fn bad_json_is_a_400_with_context() {
        let tmp = tempfile::tempdir().unwrap();
        let (client, _status, _cmds) = start(tmp.path()).await;
        let err = client
            .call::<serde_json::Value>(Method::POST, "/localapi/v0/up", Some(b"{oops".to_vec()))
            .await
            .unwrap_err();
        match err {
            LocalApiError::Status { status, message } => {
                assert_eq!(status, StatusCode::BAD_REQUEST);
                assert!(message.starts_with("bad JSON"), "{message}");
            }
            other => panic!("expected a 400, got {other}"),
        }
        let err = client
            .call::<serde_json::Value>(Method::GET, "/nope", None)
            .await
            .unwrap_err();
        assert!(matches!(
            err,
            LocalApiError::Status {
                status: StatusCode::NOT_FOUND,
                ..
            }
        ));
    }

    fn peer(name: &str, ip: &str, key_byte: u8) -> PeerStatus {
        PeerStatus {
            name: format!("{name}.tailnet.example"),
            hostname: format!("host-{name}"),
            node_id: 2,
            stable_id: name.into(),
            node_key: format!("nodekey:{}", hex::encode([key_byte; 32])),
            disco_key: None,
            tailnet_ips: vec![ip.into(), format!("fd7a:115c:a1e0::{key_byte:x}")],
            os: None,
            online: Some(true),
            last_seen: None,
            key_expiry: None,
            expired: false,
            home_derp: None,
            endpoints: vec![],
            // Filled by the data plane.
            ..Default::default()
        }
    }

    fn tailnet() -> Status {
        let mut s = initial();
        s.self_node = Some(crate::status::SelfStatus {
            name: "c1.tailnet.example".into(),
            hostname: "c1".into(),
            node_id: 1,
            stable_id: "c1".into(),
            user_id: 1,
            node_key: format!("nodekey:{}", "11".repeat(32)),
            machine_key: format!("mkey:{}", "33".repeat(32)),
            disco_key: format!("discokey:{}", "44".repeat(32)),
            tailnet_ips: vec!["100.64.0.1".into()],
            key_expiry: None,
            home_derp: None,
            peerapi_urls: Vec::new(),
        });
        s.peers = vec![
            peer("c2", "100.64.0.2", 0x22),
            peer("web", "100.64.0.3", 0x33),
            peer("web.other", "100.64.0.4", 0x44),
        ];
        s
    }

    #[tokio::test]
    async fn whois_knows_self_and_peers_and_nothing_else() {
        let tmp = tempfile::tempdir().unwrap();
        let (client, status_tx, _cmds) = start(tmp.path()).await;
        status_tx.send(tailnet()).unwrap();
        let key = |b: u8| NodePublic::from_bytes([b; 32]);
        let me = client.whois(&key(0x11)).await.unwrap().expect("self");
        assert!(me.is_self);
        assert_eq!(me.hostname, "c1");
        let peer = client.whois(&key(0x22)).await.unwrap().expect("peer");
        assert_eq!(
            (peer.hostname.as_str(), peer.is_self, peer.node_key),
            ("host-c2", false, format!("nodekey:{}", "22".repeat(32)))
        );
        assert_eq!(client.whois(&key(0x99)).await.unwrap(), None);
        let bad = client
            .call::<serde_json::Value>(Method::GET, "/localapi/v0/whois?nodekey=nodekey:zz", None)
            .await;
        assert!(
            matches!(bad, Err(LocalApiError::Status { status, .. }) if status == StatusCode::BAD_REQUEST),
            "{bad:?}"
        );
        let missing = client
            .call::<serde_json::Value>(Method::GET, "/localapi/v0/whois", None)
            .await;
        assert!(
            matches!(missing, Err(LocalApiError::Status { status, .. }) if status == StatusCode::BAD_REQUEST)
        );
    }

    fn resolved_name(status: &Status, query: &str) -> Result<String, ApiError> {
        resolve_peer(status, query).map(|t| match t {
            PingTarget::Peer(p) => p.name.clone(),
            PingTarget::SelfNode(ip) => format!("self {ip}"),
        })
    }

    #[test]
    fn peers_resolve_by_name_label_hostname_ip_and_key() {
        let s = tailnet();
        let c2 = Ok("c2.tailnet.example".to_string());
        for query in [
            "c2.tailnet.example",
            "c2.tailnet.example.",
            "C2.Tailnet.Example",
            "c2",
            "host-c2",
            "100.64.0.2",
            "fd7a:115c:a1e0::22",
            "fd7a:115c:a1e0:0::22",
            &format!("nodekey:{}", "22".repeat(32)),
        ] {
            assert_eq!(resolved_name(&s, query), c2, "{query}");
        }
        assert_eq!(
            resolved_name(&s, "web.tailnet.example"),
            Ok("web.tailnet.example".to_string())
        );
        assert_eq!(resolved_name(&s, "c1"), Ok("self 100.64.0.1".to_string()));
        assert_eq!(
            resolved_name(&s, "100.64.0.1"),
            Ok("self 100.64.0.1".to_string())
        );
    }

    #[test]
    fn unknown_and_ambiguous_peers_are_refused_without_secrets() {
        let s = tailnet();
        for query in ["nope", "100.64.9.9", "nope.tailnet.example", "c2.tailnet"] {
            let err = resolve_peer(&s, query).unwrap_err();
            assert_eq!(err.status, StatusCode::NOT_FOUND, "{query}");
            assert_eq!(err.message, format!("no peer matches {query:?}"));
        }
        let err = resolve_peer(&s, "web").unwrap_err();
        assert_eq!(err.status, StatusCode::CONFLICT);
        assert!(err
            .message
            .contains("web.tailnet.example, web.other.tailnet.example"));
        assert!(!err.message.contains("nodekey"), "{}", err.message);
        assert_eq!(
            resolve_peer(&s, " ").unwrap_err().status,
            StatusCode::BAD_REQUEST
        );
        let err = resolve_peer(&initial(), "c2").unwrap_err();
        assert_eq!(err.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            err.message.contains("no network map yet"),
            "{}",
            err.message
        );
    }

    /// A "daemon" that answers pings with a direct pong and netchecks with "no engine".
    fn fake_engine(mut cmds: mpsc::Receiver<Command>) -> Arc<std::sync::Mutex<Vec<String>>> {
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let pinged = log.clone();
        tokio::spawn(async move {
            while let Some(cmd) = cmds.recv().await {
                match cmd {
                    Command::Ping {
                        peer,
                        timeout,
                        reply,
                    } => {
                        if let Ok(mut pinged) = pinged.lock() {
                            pinged.push(format!("{peer} {}ms", timeout.as_millis()));
                        }
                        let _ = reply.send(Ok(PingResult {
                            path: Some("direct".into()),
                            endpoint: Some("198.18.0.3:41641".into()),
                            latency_ms: Some(2.0),
                            ..Default::default()
                        }));
                    }
                    Command::Netcheck(reply) => {
                        let _ = reply.send(Err(ApiError::new(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "the data plane is not running; run tern up",
                        )));
                    }
                    other => panic!("unexpected command {other:?}"),
                }
            }
        });
        log
    }

    #[tokio::test]
    async fn ping_resolves_the_peer_and_names_it_in_the_answer() {
        let tmp = tempfile::tempdir().unwrap();
        let (client, status_tx, cmds) = start(tmp.path()).await;
        status_tx.send(tailnet()).unwrap();
        let daemon = fake_engine(cmds);
        let answer = client
            .ping(&PingRequest {
                peer: "c2".into(),
                timeout_ms: 750,
            })
            .await
            .unwrap();
        assert_eq!(answer.node_name, "c2");
        assert_eq!(answer.node_ip, "100.64.0.2");
        assert_eq!(answer.path.as_deref(), Some("direct"));

        let local = client
            .ping(&PingRequest {
                peer: "c1".into(),
                timeout_ms: 750,
            })
            .await
            .unwrap();
        assert_eq!(local.error.as_deref(), Some(PING_ERROR_LOCAL));
        assert_eq!(local.node_ip, "100.64.0.1");

        let err = client
            .ping(&PingRequest {
                peer: "ghost".into(),
                timeout_ms: 750,
            })
            .await
            .unwrap_err();
        assert!(
            matches!(&err, LocalApiError::Status { status, message }
                if *status == StatusCode::NOT_FOUND && message == "no peer matches \"ghost\""),
            "{err}"
        );
        let err = client
            .ping(&PingRequest {
                peer: "c2".into(),
                timeout_ms: 0,
            })
            .await
            .unwrap_err();
        assert!(
            matches!(&err, LocalApiError::Status { status, .. } if *status == StatusCode::BAD_REQUEST),
            "{err}"
        );
        let err = client
            .call::<serde_json::Value>(Method::POST, "/localapi/v0/ping", Some(b"{}".to_vec()))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("bad JSON"), "{err}");

        let err = client.netcheck().await.unwrap_err();
        assert!(
            matches!(&err, LocalApiError::Status { status, message }
                if *status == StatusCode::SERVICE_UNAVAILABLE && message.contains("run tern up")),
            "{err}"
        );
        // Only the one resolvable, valid ping reached the daemon, with its key and timeout.
        assert_eq!(
            *daemon.lock().unwrap(),
            vec![format!("nodekey:{} 750ms", "22".repeat(32))]
        );
    }

    #[tokio::test]
    async fn a_second_daemon_cannot_steal_a_live_socket_but_replaces_a_stale_one() {
        let tmp = tempfile::tempdir().unwrap();
        let sock = tmp.path().join("tern.sock");
        let first = bind(&sock, SocketOwner::default()).unwrap();
        assert!(matches!(
            bind(&sock, SocketOwner::default()),
            Err(LocalApiError::InUse(_))
        ));
        drop(first);
        bind(&sock, SocketOwner::default()).expect("stale socket file must be replaced");
    }

    fn with_failures(n: u32) -> Status {
        let mut s = initial();
        s.control.failed_attempts = n;
        s
    }

    #[tokio::test]
    async fn watch_sends_the_snapshot_at_once_then_changes() {
        let tmp = tempfile::tempdir().unwrap();
        let (client, status_tx, _cmds) = start(tmp.path()).await;
        let mut watch = client.watch().await.unwrap();
        let first = tokio::time::timeout(std::time::Duration::from_secs(2), watch.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(first, Some(initial()));
        status_tx.send(with_failures(7)).unwrap();
        let next = tokio::time::timeout(std::time::Duration::from_secs(2), watch.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(next.map(|s| s.control.failed_attempts), Some(7));
    }

    #[tokio::test]
    async fn watch_coalesces_bursts_and_a_slow_client_skips_to_the_newest() {
        let tmp = tempfile::tempdir().unwrap();
        let (client, status_tx, _cmds) = start(tmp.path()).await;
        let mut watch = client.watch().await.unwrap();
        assert!(watch.next().await.unwrap().is_some());
        // 200 changes while the client reads nothing.
        for n in 1..=200 {
            status_tx.send(with_failures(n)).unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        // It gets at most a line or two of the past, then the newest one.
        let mut seen = Vec::new();
        while seen.last() != Some(&200) {
            let s = tokio::time::timeout(std::time::Duration::from_secs(3), watch.next())
                .await
                .expect("the newest snapshot arrives")
                .unwrap()
                .unwrap();
            seen.push(s.control.failed_attempts);
        }
        assert!(seen.len() <= 3, "a slow client must skip ahead: {seen:?}");
        // Coalescing: a second of changes every 10 ms is at most ~5 lines.
        let started = std::time::Instant::now();
        let sender = tokio::spawn(async move {
            for n in 201..=300 {
                status_tx.send(with_failures(n)).unwrap();
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            status_tx
        });
        let mut lines = 0;
        loop {
            let s = watch.next().await.unwrap().unwrap();
            lines += 1;
            if s.control.failed_attempts == 300 {
                break;
            }
        }
        let elapsed = started.elapsed().as_secs_f64();
        let status_tx = sender.await.unwrap();
        assert!(
            f64::from(lines) <= elapsed / WATCH_MIN_INTERVAL.as_secs_f64() + 2.0,
            "{lines} lines in {elapsed:.2} s"
        );
        // The stream's task ends with the client.
        drop(watch);
        for _ in 0..100 {
            if status_tx.receiver_count() == 1 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        // A closed client is noticed at the latest after the next change.
        status_tx.send(with_failures(1)).unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(400)).await;
        assert_eq!(status_tx.receiver_count(), 1, "the watch task must end");
    }

    /// The next watch line, within 3 s.
    async fn next(w: &mut WatchStream) -> String {
        tokio::time::timeout(std::time::Duration::from_secs(3), w.next_line())
            .await
            .expect("a line arrives")
            .unwrap()
            .expect("the stream goes on")
    }

    #[tokio::test]
    async fn two_watch_clients_get_byte_identical_lines() {
        let tmp = tempfile::tempdir().unwrap();
        let (client, status_tx, _cmds) = start(tmp.path()).await;
        let mut a = client.watch().await.unwrap();
        let mut b = client.watch().await.unwrap();
        assert_eq!(next(&mut a).await, next(&mut b).await);
        status_tx.send(with_failures(9)).unwrap();
        let (line_a, line_b) = (next(&mut a).await, next(&mut b).await);
        assert_eq!(line_a, line_b);
        let parsed: Status = serde_json::from_str(&line_a).unwrap();
        assert_eq!(parsed.control.failed_attempts, 9);
    }

    #[tokio::test]
    async fn watch_lines_are_serialized_once_and_only_while_watched() {
        let (status_tx, status_rx) = watch::channel(initial());
        let (commands, _cmds) = mpsc::channel(1);
        let shared = Shared {
            status: status_rx,
            commands,
            feed: FeedSlot::default(),
        };
        let mut a = shared.subscribe().unwrap();
        let mut b = shared.subscribe().unwrap();
        // Both see the same buffer, not two equal copies; one producer (plus `shared`).
        assert_eq!(a.borrow().as_ptr(), b.borrow().as_ptr());
        assert_eq!(status_tx.receiver_count(), 2);
        status_tx.send(with_failures(3)).unwrap();
        a.changed().await.unwrap();
        b.changed().await.unwrap();
        assert_eq!(
            a.borrow_and_update().as_ptr(),
            b.borrow_and_update().as_ptr()
        );
        // The producer stops with the last client.
        drop((a, b));
        for _ in 0..50 {
            if status_tx.receiver_count() == 1 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert_eq!(status_tx.receiver_count(), 1, "the producer must end");
        assert!(lock_slot(&shared.feed).is_none());
        // A later client starts a new one, with the newest snapshot at once.
        let c = shared.subscribe().unwrap();
        let newest: Status = serde_json::from_slice(&c.borrow()).unwrap();
        assert_eq!(newest.control.failed_attempts, 3);
    }

    #[tokio::test]
    async fn watch_is_get_only() {
        let tmp = tempfile::tempdir().unwrap();
        let (client, _status, _cmds) = start(tmp.path()).await;
        let err = client
            .call::<serde_json::Value>(Method::POST, WATCH_PATH, None)
            .await
            .unwrap_err();
        assert!(
            matches!(err, LocalApiError::Status { status, .. } if status == StatusCode::METHOD_NOT_ALLOWED),
            "{err}"
        );
    }

    #[tokio::test]
    async fn client_without_daemon_says_so() {
        let tmp = tempfile::tempdir().unwrap();
        let err = Client::new(tmp.path().join("none.sock"))
            .status()
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("is `tern daemon` running?"),
            "{err}"
        );
    }
}
