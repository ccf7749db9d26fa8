//! The SOCKS5 (`--socks5-server`) and HTTP (`--outbound-http-proxy-listen`) proxies: local
//! programs reach tailnet addresses and MagicDNS names through them, which is how they use the
//! tailnet when tern runs without a TUN (`--tun userspace-networking`).
//!
//! Both share [`dial`]: a MagicDNS name becomes its tailnet address; an address the tailnet
//! routes goes through the userspace stack (in TUN mode: through the kernel, which routes it
//! into the TUN); anything else is dialed from the host. The listeners ([`serve`]) bound what a
//! client can hold: [`MAX_CLIENTS`] at once, [`HANDSHAKE_TIMEOUT`] to say where it wants to go,
//! a bounded request.

pub mod http;
pub mod socks5;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

use crate::netstack::user::DialError;
pub use crate::netstack::user::TailnetDialer;

/// Proxy clients served at once; more are closed at accept.
pub const MAX_CLIENTS: usize = 512;
/// A client must have said where it wants to go by then.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Dialing the destination (from the host; the userspace stack has its own).
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a client wants to go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Addr(SocketAddr),
    Name(String, u16),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Addr(a) => write!(f, "{a}"),
            Target::Name(n, p) => write!(f, "{n}:{p}"),
        }
    }
}

/// Why a destination could not be reached; each maps to a SOCKS reply and an HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum ProxyDialError {
    #[error("{0}: no such host")]
    NoSuchHost(String),
    #[error("{0} is a tailnet address, but tern is not connected to the tailnet")]
    TailnetDown(SocketAddr),
    #[error("{0}: connection refused")]
    Refused(String),
    #[error("{0}: no answer within {1:?}")]
    Timeout(String, Duration),
    #[error("{0}: {1}")]
    Unreachable(String, String),
}

/// The byte stream to a destination.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// The dialer of the moment (`None` while the data plane is down).
pub type Dialers = watch::Receiver<Option<TailnetDialer>>;

/// Connects to `target` the way the proxies do (see the module docs).
pub async fn dial(target: &Target, dialers: &Dialers) -> Result<Box<dyn Stream>, ProxyDialError> {
    let dialer = dialers.borrow().clone();
    let addrs = resolve(target, dialer.as_ref()).await?;
    let mut last = None;
    for addr in addrs {
        match dial_addr(addr, dialer.as_ref()).await {
            Ok(stream) => return Ok(stream),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| ProxyDialError::NoSuchHost(target.to_string())))
}

/// The addresses of a target: MagicDNS first, then the host's resolver.
async fn resolve(
    target: &Target,
    dialer: Option<&TailnetDialer>,
) -> Result<Vec<SocketAddr>, ProxyDialError> {
    let (name, port) = match target {
        Target::Addr(a) => return Ok(vec![*a]),
        Target::Name(name, port) => (name, *port),
    };
    if let Ok(ip) = name
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
    {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    if let (Some(dialer), Some(key)) = (dialer, crate::dns::name::key_of_text(name)) {
        let config = dialer.dns.borrow().clone();
        if let Some(ips) = config.lookup(&key) {
            return Ok(ips.iter().map(|ip| SocketAddr::new(*ip, port)).collect());
        }
        if config.is_local(&key) {
            return Err(ProxyDialError::NoSuchHost(name.clone()));
        }
    }
    let found = tokio::time::timeout(DIAL_TIMEOUT, tokio::net::lookup_host((name.as_str(), port)))
        .await
        .map_err(|_| ProxyDialError::Timeout(name.clone(), DIAL_TIMEOUT))?
        .map_err(|_| ProxyDialError::NoSuchHost(name.clone()))?;
    Ok(found.collect())
}

async fn dial_addr(
    addr: SocketAddr,
    dialer: Option<&TailnetDialer>,
) -> Result<Box<dyn Stream>, ProxyDialError> {
    let routed = dialer.is_some_and(|d| d.routes.borrow().iter().any(|n| n.contains(&addr.ip())));
    let in_tailnet_range = IpNet::from(crate::routing::cgnat()).contains(&addr.ip())
        || IpNet::from(crate::routing::tailnet_ula()).contains(&addr.ip());
    match dialer.and_then(|d| d.stack.as_ref()) {
        Some(stack) if routed => stack
            .connect(addr)
            .await
            .map(|s| Box::new(s) as Box<dyn Stream>)
            .map_err(|e| stack_error(addr, e)),
        None if in_tailnet_range && dialer.is_none() => Err(ProxyDialError::TailnetDown(addr)),
        _ => dial_host(addr).await,
    }
}

fn stack_error(addr: SocketAddr, e: DialError) -> ProxyDialError {
    let to = addr.to_string();
    match e {
        DialError::Refused => ProxyDialError::Refused(to),
        DialError::Timeout(t) => ProxyDialError::Timeout(to, t),
        DialError::Gone => ProxyDialError::TailnetDown(addr),
        other => ProxyDialError::Unreachable(to, other.to_string()),
    }
}

async fn dial_host(addr: SocketAddr) -> Result<Box<dyn Stream>, ProxyDialError> {
    let to = addr.to_string();
    match tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(Box::new(s))
        }
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            Err(ProxyDialError::Refused(to))
        }
        Ok(Err(e)) => Err(ProxyDialError::Unreachable(to, e.to_string())),
        Err(_) => Err(ProxyDialError::Timeout(to, DIAL_TIMEOUT)),
    }
}

/// What the proxies counted (both kinds share one set).
#[derive(Debug, Default)]
pub struct ProxyCounters {
    pub accepted: AtomicU64,
    /// Closed at accept: [`MAX_CLIENTS`] were being served.
    pub over_limit: AtomicU64,
    /// Malformed or unsupported requests, and clients that said nothing in time.
    pub bad_requests: AtomicU64,
    pub dial_failures: AtomicU64,
    pub connected: AtomicU64,
}

impl ProxyCounters {
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// By name, for the status snapshot.
    pub fn named(&self) -> Vec<(&'static str, u64)> {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            ("accepted", get(&self.accepted)),
            ("over_limit", get(&self.over_limit)),
            ("bad_requests", get(&self.bad_requests)),
            ("dial_failures", get(&self.dial_failures)),
            ("connected", get(&self.connected)),
        ]
    }
}

/// Which protocol a listener speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Socks5,
    Http,
}

/// Accepts proxy clients on `listener` until the task is dropped; every accept error is
/// survived (a pause on descriptor exhaustion).
pub async fn serve(
    kind: Kind,
    listener: TcpListener,
    dialers: Dialers,
    counters: Arc<ProxyCounters>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
    loop {
        let (conn, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "proxy accept");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            ProxyCounters::bump(&counters.over_limit);
            continue; // dropped: closed
        };
        ProxyCounters::bump(&counters.accepted);
        let dialers = dialers.clone();
        let counters = counters.clone();
        tokio::spawn(async move {
            match kind {
                Kind::Socks5 => socks5::handle(conn, &dialers, &counters).await,
                Kind::Http => http::handle(conn, &dialers, &counters).await,
            }
            drop(permit);
        });
    }
}

/// Copies both ways until both sides are done.
pub(crate) async fn splice(mut client: TcpStream, mut upstream: Box<dyn Stream>) {
    let _ = client.set_nodelay(true);
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
}
