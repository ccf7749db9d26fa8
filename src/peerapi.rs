//! The peer API (Go's "peerapi"): an HTTP server on this node's tailnet addresses that peers
//! reach over WireGuard. tern serves one endpoint of it, `/dns-query`: DNS over HTTP (RFC 8484's
//! GET and POST framing, without TLS since WireGuard already encrypts) for peers that use this
//! node as their exit node.
//!
//! Why it matters: a Go client whose exit node has capability version 26 or later, or lists
//! `peerapi-dns-proxy` in `Hostinfo.Services`, sends *all* its DNS to
//! `http://<exit node>:<peerapi4 port>/dns-query`. Without this server such a client could
//! resolve nothing while it used tern as its exit node.
//!
//! Who may ask (Go `replyToDNSQueries`): a peer owned by the same user as this node; otherwise
//! only while this node offers an exit node and the packet filter would let the peer reach
//! `0.0.0.0:53` over TCP (`2000::` for IPv6), Go's stand-in for `autogroup:internet`.
//! Connections from addresses that are no peer's are closed at once; the packet filter lets
//! SYNs to the peerapi port through (as Go's does) because access is decided here.
//!
//! What is asked upstream (Go `HandlePeerDNSQuery` on Linux): names in the netmap's
//! `ExitNodeFilteredSet` are REFUSED; the rest goes to the first nameserver of the host's
//! `/etc/resolv.conf`, or, when that is quad-100 (tern manages the host's DNS), to the
//! upstreams MagicDNS would use for the name.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use crate::control::tailcfg::{Node, Service, UserId};
use crate::dns::config::MagicDnsConfig;
use crate::dns::forward::{self, Timeouts};
use crate::filter::{Filter, Verdict};
use crate::packet::{proto, tcp_flags, PacketSummary};

/// The DoH endpoint.
pub const DOH_PATH: &str = "/dns-query";
/// RFC 8484's media type, in requests (POST) and answers; Go's client insists on it.
pub const DOH_CONTENT_TYPE: &str = "application/dns-message";
/// Largest DNS query taken (what DNS over TCP can carry; Go allows more but no answer could).
pub const MAX_QUERY: usize = 65_535;
/// Connections served at once, all peers together.
pub const MAX_CONNS: usize = 64;
/// Connections one peer address may hold at once.
pub const MAX_CONNS_PER_PEER: usize = 8;
/// A connection is closed after this long, whatever it is doing (Go's DoH client keeps idle
/// connections for 30 s and redials when one is gone).
pub const CONN_LIFETIME: Duration = Duration::from_secs(60);
/// A request's headers must have arrived within this long.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one query may take upstream (Go: 5 s, "longer than real DNS timeouts").
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(5);
/// `Hostinfo.Services` proto names.
pub const SERVICE_V4: &str = "peerapi4";
pub const SERVICE_V6: &str = "peerapi6";
pub const SERVICE_DNS: &str = "peerapi-dns-proxy";

/// What decides who may use the peer API; the engine replaces it with every netmap and prefs
/// change.
#[derive(Debug, Default)]
pub struct Access {
    /// The user owning this node (`None` before the first netmap).
    pub self_user: Option<UserId>,
    /// Every tailnet address of every peer → the user owning that peer.
    pub peers: HashMap<IpAddr, UserId>,
    /// This node advertises an exit node.
    pub offering_exit_node: bool,
    /// The inbound packet filter, compiled for the networks this node serves.
    pub filter: Option<Filter>,
    /// `DNS.ExitNodeFilteredSet`: names (or `.suffix`es) not to resolve for peers.
    pub exit_node_filtered: Vec<String>,
}

impl Access {
    /// Whether `ip` is one of a peer's tailnet addresses.
    pub fn is_peer(&self, ip: IpAddr) -> bool {
        self.peers.contains_key(&ip)
    }

    /// Whether the peer at `ip` may have its DNS queries answered (Go `replyToDNSQueries`).
    pub fn may_query_dns(&self, ip: IpAddr) -> bool {
        let Some(owner) = self.peers.get(&ip) else {
            return false;
        };
        if Some(*owner) == self.self_user {
            return true;
        }
        self.offering_exit_node && self.filter_lets_reach_internet_dns(ip)
    }

    /// Would the filter accept a TCP SYN from `ip` to "the internet" port 53?
    fn filter_lets_reach_internet_dns(&self, ip: IpAddr) -> bool {
        let Some(filter) = &self.filter else {
            return false;
        };
        let internet = match ip {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            // autogroup:internet for IPv6 starts at 2000::/3.
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::new(0x2000, 0, 0, 0, 0, 0, 0, 0)),
        };
        let syn = PacketSummary {
            proto: proto::TCP,
            src: ip,
            dst: internet,
            src_port: 0,
            dst_port: 53,
            tcp_flags: tcp_flags::SYN,
            icmp_type: 0,
            icmp_code: 0,
            later_fragment: false,
        };
        filter.check(&syn) == Verdict::Accept
    }

    /// Whether a query for `name` may be forwarded (not in `ExitNodeFilteredSet`): a `.suffix`
    /// entry filters the names under it (not the suffix itself, as Go's `dnsname.HasSuffix`;
    /// `.` alone filters nothing), any other entry that one name; case and final dots ignored.
    pub fn serves_name(&self, name: &str) -> bool {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        !self.exit_node_filtered.iter().any(|entry| {
            let entry = entry.trim_end_matches('.');
            match entry.strip_prefix('.') {
                Some("") => false,
                Some(suffix) => name.ends_with(&format!(".{suffix}")),
                None => !entry.is_empty() && name == entry,
            }
        })
    }
}

/// The `Hostinfo.Services` entries for peer API listeners on `ports` (address → port): one
/// `peerapi4`/`peerapi6` per family and `peerapi-dns-proxy` (version 1) when there is any.
pub fn services(ports: &[(IpAddr, u16)]) -> Vec<Service> {
    let mut out = Vec::new();
    let first = |v4: bool| ports.iter().find(|(ip, _)| ip.is_ipv4() == v4);
    if let Some((_, port)) = first(true) {
        out.push(service(SERVICE_V4, *port));
    }
    if let Some((_, port)) = first(false) {
        out.push(service(SERVICE_V6, *port));
    }
    if !out.is_empty() {
        out.push(service(SERVICE_DNS, 1));
    }
    out
}

fn service(proto: &str, port: u16) -> Service {
    Service {
        proto: proto.into(),
        port,
        description: String::new(),
    }
}

/// The peer API base URLs a node's `Hostinfo.Services` announce for its addresses, as Go's
/// `PeerAPIURL` (`http://100.64.0.1:12345`, `http://[fd7a:…]:12345`).
pub fn urls(addresses: &[IpAddr], services: &[Service]) -> Vec<String> {
    addresses
        .iter()
        .filter_map(|ip| {
            let family = if ip.is_ipv4() { SERVICE_V4 } else { SERVICE_V6 };
            let port = service_port(services, family)?;
            Some(format!("http://{}", SocketAddr::new(*ip, port)))
        })
        .collect()
}

/// The port a service of that name announces (none for port 0).
fn service_port(services: &[Service], proto: &str) -> Option<u16> {
    services
        .iter()
        .find(|s| s.proto == proto && s.port != 0)
        .map(|s| s.port)
}

/// The first capability version whose nodes all answer DNS on their peer API (Go
/// `peerCanProxyDNS`: added in 25, so anything from 26 on).
pub const CAP_VERSION_DNS_PROXY: i32 = 26;

/// Where `node` answers DNS over HTTP, as Go's `exitNodeCanProxyDNS` finds it: the node says
/// it can (capability version, or `peerapi-dns-proxy` in its services) and announces a peer
/// API port for an address family this node has (IPv4 first).
pub fn doh_server(node: &Node, self_has_v4: bool, self_has_v6: bool) -> Option<SocketAddr> {
    let services = &node.hostinfo.services;
    let can_proxy =
        node.cap >= CAP_VERSION_DNS_PROXY || service_port(services, SERVICE_DNS).is_some();
    if !can_proxy {
        return None;
    }
    let address = |v4: bool| {
        node.addresses
            .iter()
            .find(|a| a.prefix_len() == a.max_prefix_len() && a.addr().is_ipv4() == v4)
            .map(|a| a.addr())
    };
    let server = |v4: bool, proto: &str| {
        Some(SocketAddr::new(
            address(v4)?,
            service_port(services, proto)?,
        ))
    };
    let v4 = self_has_v4.then(|| server(true, SERVICE_V4));
    let v6 = self_has_v6.then(|| server(false, SERVICE_V6));
    v4.flatten().or(v6.flatten())
}

/// Why a request carries no DNS query; the text goes back to the client (Go's words).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DohError {
    #[error("bad HTTP method")]
    BadMethod,
    #[error("missing 'dns' parameter; try '?dns=' (DoH standard)")]
    MissingDns,
    #[error("invalid 'dns' base64 encoding")]
    BadBase64,
    #[error("query too large")]
    TooLarge,
    #[error("unexpected Content-Type")]
    BadContentType,
    #[error("error reading post body with DNS query")]
    BodyRead,
    #[error("not a DNS query with a question")]
    NotAQuery,
}

/// The query of a GET request: the first `dns=` in the URL's query string (as Go's
/// `FormValue`), base64url (padding allowed).
pub fn query_from_get(query_string: Option<&str>) -> Result<Vec<u8>, DohError> {
    let value = query_string
        .unwrap_or_default()
        .split('&')
        .find_map(|pair| pair.strip_prefix("dns="))
        .filter(|v| !v.is_empty())
        .ok_or(DohError::MissingDns)?;
    let value = value.trim_end_matches("%3D").trim_end_matches('=');
    if value.is_empty() {
        return Err(DohError::BadBase64); // padding alone (Go's decoder refuses it too)
    }
    // Four base64 characters carry three bytes.
    if value.len() / 4 * 3 > MAX_QUERY {
        return Err(DohError::TooLarge);
    }
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(value)
        .map_err(|_| DohError::BadBase64)
}

/// Whether a POST's `Content-Type` is DoH's (parameters after `;` allowed).
pub fn is_doh_content_type(value: Option<&str>) -> bool {
    value
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case(DOH_CONTENT_TYPE))
}

/// The question's name of a DNS query (`None` if it is no query with a question).
pub fn question_name(query: &[u8]) -> Option<String> {
    let msg = hickory_proto::op::Message::from_vec(query).ok()?;
    let question = msg.queries.first()?;
    Some(question.name().to_ascii())
}

/// Upstreams for a peer's query (Go on Linux): the first nameserver of the host's resolv.conf
/// unless it is quad-100, else MagicDNS's upstreams for the name.
pub fn upstreams_for(resolv_conf: &str, magic: &MagicDnsConfig, name: &str) -> Vec<SocketAddr> {
    if let Some(first) = forward::os_base_resolvers(resolv_conf).first() {
        if first_nameserver_is(resolv_conf, first.ip()) {
            return vec![*first];
        }
    }
    let key = crate::dns::name::key_of_text(name).unwrap_or_else(|| ".".into());
    magic.upstreams_for(&key).to_vec()
}

/// Whether `ip` is the first `nameserver` line (os_base_resolvers skips quad-100 ones, and Go
/// only looks at the first line).
fn first_nameserver_is(resolv_conf: &str, ip: IpAddr) -> bool {
    let first = resolv_conf.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        (words.next() == Some("nameserver"))
            .then(|| words.next())
            .flatten()
    });
    first
        .and_then(|w| w.split(['#', ';', '%']).next())
        .and_then(|w| w.parse::<IpAddr>().ok())
        == Some(ip)
}

/// What the server counted; shown under `data_plane.peerapi` in status.
#[derive(Debug, Default)]
pub struct PeerApiCounters {
    pub connections: AtomicU64,
    /// Closed at accept: no peer's address, or over [`MAX_CONNS`] / [`MAX_CONNS_PER_PEER`].
    pub refused_not_peer: AtomicU64,
    pub refused_over_limit: AtomicU64,
    pub dns_queries: AtomicU64,
    pub dns_denied: AtomicU64,
    pub dns_bad_requests: AtomicU64,
    pub dns_refused_names: AtomicU64,
    pub dns_failures: AtomicU64,
}

impl PeerApiCounters {
    /// Name → value, for status.
    pub fn named(&self) -> Vec<(&'static str, u64)> {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            ("connections", get(&self.connections)),
            ("refused_not_peer", get(&self.refused_not_peer)),
            ("refused_over_limit", get(&self.refused_over_limit)),
            ("dns_queries", get(&self.dns_queries)),
            ("dns_denied", get(&self.dns_denied)),
            ("dns_bad_requests", get(&self.dns_bad_requests)),
            ("dns_refused_names", get(&self.dns_refused_names)),
            ("dns_failures", get(&self.dns_failures)),
        ]
    }
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Everything a peer API server answers with.
pub struct PeerApi {
    pub access: watch::Receiver<Arc<Access>>,
    pub dns: watch::Receiver<Arc<MagicDnsConfig>>,
    /// The host's resolv.conf (a test points it elsewhere).
    pub resolv_conf: PathBuf,
    pub counters: Arc<PeerApiCounters>,
    slots: Arc<Semaphore>,
    per_peer: Mutex<HashMap<IpAddr, usize>>,
}

impl PeerApi {
    pub fn new(
        access: watch::Receiver<Arc<Access>>,
        dns: watch::Receiver<Arc<MagicDnsConfig>>,
        resolv_conf: PathBuf,
    ) -> Arc<Self> {
        Arc::new(PeerApi {
            access,
            dns,
            resolv_conf,
            counters: Arc::default(),
            slots: Arc::new(Semaphore::new(MAX_CONNS)),
            per_peer: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for a connection from `ip`, unless the server or that peer is at its limit.
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<Admitted> {
        let permit = self.slots.clone().try_acquire_owned().ok()?;
        let mut per_peer = self.per_peer.lock().unwrap_or_else(|e| e.into_inner());
        let held = per_peer.entry(ip).or_insert(0);
        if *held >= MAX_CONNS_PER_PEER {
            return None;
        }
        *held += 1;
        Some(Admitted {
            api: self.clone(),
            ip,
            _permit: permit,
        })
    }
}

/// A connection's place; given back when dropped.
struct Admitted {
    api: Arc<PeerApi>,
    ip: IpAddr,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut per_peer = self.api.per_peer.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(held) = per_peer.get_mut(&self.ip) {
            *held = held.saturating_sub(1);
            if *held == 0 {
                per_peer.remove(&self.ip);
            }
        }
    }
}

/// Serves until the task is dropped; every accept error is survived.
pub async fn serve(listener: TcpListener, api: Arc<PeerApi>) {
    loop {
        let (stream, remote) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::debug!(error = %e, "peerapi accept");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let ip = canonical(remote.ip());
        if !api.access.borrow().is_peer(ip) {
            bump(&api.counters.refused_not_peer);
            tracing::debug!(%remote, "peerapi: not a peer; closed");
            continue;
        }
        let Some(admitted) = api.admit(ip) else {
            bump(&api.counters.refused_over_limit);
            continue;
        };
        bump(&api.counters.connections);
        tokio::spawn(serve_connection(stream, ip, admitted));
    }
}

/// IPv4-mapped IPv6 addresses as IPv4 (a dual-stack socket reports them so).
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

async fn serve_connection(stream: tokio::net::TcpStream, ip: IpAddr, admitted: Admitted) {
    let api = admitted.api.clone();
    let service = hyper::service::service_fn(move |req| {
        let api = api.clone();
        async move { Ok::<_, Infallible>(answer(req, ip, &api).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), service);
    let _ = tokio::time::timeout(CONN_LIFETIME, conn).await;
    drop(admitted);
}

/// One request: `/dns-query` (GET or POST); 404 elsewhere.
async fn answer(req: Request<Incoming>, ip: IpAddr, api: &PeerApi) -> Response<Full<Bytes>> {
    if req.uri().path() != DOH_PATH {
        return text(
            StatusCode::NOT_FOUND,
            "not found: tern serves /dns-query only",
        );
    }
    if !api.access.borrow().may_query_dns(ip) {
        bump(&api.counters.dns_denied);
        return text(StatusCode::FORBIDDEN, "DNS access denied");
    }
    let (query, name) = match read_query(req).await.and_then(|q| {
        let name = question_name(&q).ok_or(DohError::NotAQuery)?;
        Ok((q, name))
    }) {
        Ok(found) => found,
        Err(e) => {
            bump(&api.counters.dns_bad_requests);
            return text(StatusCode::BAD_REQUEST, &e.to_string());
        }
    };
    bump(&api.counters.dns_queries);
    match resolve(api, &query, &name).await {
        Ok(answer) => Response::builder()
            .status(StatusCode::OK)
            .header("content-type", DOH_CONTENT_TYPE)
            .body(Full::new(Bytes::from(answer)))
            .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()))),
        Err(why) => {
            bump(&api.counters.dns_failures);
            tracing::debug!(%ip, %why, "peerapi: DNS forwarding failed");
            text(StatusCode::INTERNAL_SERVER_ERROR, "DNS forwarding error")
        }
    }
}

async fn read_query(req: Request<Incoming>) -> Result<Vec<u8>, DohError> {
    match *req.method() {
        Method::GET => query_from_get(req.uri().query()),
        Method::POST => {
            let content_type = req
                .headers()
                .get(hyper::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok());
            if !is_doh_content_type(content_type) {
                return Err(DohError::BadContentType);
            }
            let body = Limited::new(req.into_body(), MAX_QUERY)
                .collect()
                .await
                .map_err(|e| {
                    if e.is::<http_body_util::LengthLimitError>() {
                        DohError::TooLarge
                    } else {
                        DohError::BodyRead
                    }
                })?;
            Ok(body.to_bytes().to_vec())
        }
        _ => Err(DohError::BadMethod),
    }
}

/// The answer to `query` (whose question is `name`), or why there is none.
async fn resolve(api: &PeerApi, query: &[u8], name: &str) -> Result<Vec<u8>, String> {
    if !api.access.borrow().serves_name(name) {
        bump(&api.counters.dns_refused_names);
        return crate::dns::magic::refused(query).ok_or_else(|| "no header to refuse".into());
    }
    let resolv_conf = tokio::fs::read_to_string(&api.resolv_conf)
        .await
        .unwrap_or_default();
    let magic = api.dns.borrow().clone();
    let upstreams = upstreams_for(&resolv_conf, &magic, name);
    let timeouts = Timeouts {
        udp: Duration::from_secs(2),
        overall: QUERY_TIMEOUT,
    };
    // UDP first, TCP when the answer is truncated: complete answers, and upstreams without
    // TCP still work (Go asks over TCP).
    forward::forward_with(&upstreams, query, false, timeouts)
        .await
        .map_err(|e| e.to_string())
}

fn text(code: StatusCode, body: &str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(code)
        .header("content-type", "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from(format!("{body}\n"))))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

#[cfg(test)]
mod tests;
