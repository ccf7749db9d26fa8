//! The lab coordination server's protocol side: HTTP/1.1 `/key` and
//! the `/ts2021` upgrade, the Noise responder, HTTP/2 over Noise, `/machine/register` and
//! `/machine/map` streaming.
//!
//! Policy (who may join, addresses, filters) is `tern_lab::control::Tailnet`; this module turns
//! it into wire messages and keeps every node's map stream current. A lab server, not a
//! production one.

mod http;
mod machine;
mod mapper;
mod session;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tern_lab::control::{Config, ControlError, NodeChanges, NodeRecord, Tailnet};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, oneshot};
use tracing::{debug, info, warn};

use crate::keys::{MachinePrivate, MachinePublic};

/// Errors that stop the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Configuration, state directory or database problem.
    #[error(transparent)]
    Policy(#[from] ControlError),
    /// The listening socket could not be set up.
    #[error("listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The HTTPS certificate or key could not be loaded.
    #[error("TLS: {0}")]
    Tls(String),
}

/// A change to the tailnet that map streams turn into deltas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A node joined.
    Added(u64),
    /// A node's state changed.
    Changed(u64, NodeChanges),
    /// A node left.
    Removed(u64),
    /// A node came online or went offline.
    Online(u64, bool),
}

/// Counts of bad input the server refused (each also logged with context).
#[derive(Debug, Default)]
pub struct Rejections {
    /// `/ts2021` requests refused before or during the Noise handshake.
    pub upgrades: AtomicU64,
    /// Noise or HTTP/2 connections that died on bad input.
    pub connections: AtomicU64,
    /// `/machine/*` requests answered with a 4xx.
    pub requests: AtomicU64,
    /// Registrations answered with `RegisterResponse.Error`.
    pub registrations: AtomicU64,
}

/// Map-stream messages sent, by kind (for tests and the log).
#[derive(Debug, Default)]
pub struct Sent {
    pub full_maps: AtomicU64,
    pub deltas: AtomicU64,
    pub keep_alives: AtomicU64,
}

/// A live map stream of one node.
struct SessionEntry {
    id: u64,
    /// Dropping this ends the stream (a newer stream replaced it).
    _cancel: oneshot::Sender<()>,
}

/// State shared by every connection.
pub(crate) struct Shared {
    tailnet: Mutex<Tailnet>,
    noise_key: MachinePrivate,
    events: broadcast::Sender<Event>,
    sessions: Mutex<HashMap<u64, SessionEntry>>,
    next_session: AtomicU64,
    offline_grace: Duration,
    keep_alive: Duration,
    rejections: Rejections,
    sent: Sent,
    /// Woken when an interactive login is approved (held follow-up registrations re-check).
    logins_approved: tokio::sync::Notify,
    /// Where people reach this server, for login URLs.
    public_url: String,
}

impl Shared {
    fn tailnet(&self) -> MutexGuard<'_, Tailnet> {
        // A panic while holding the lock leaves consistent data (every mutation saves first).
        self.tailnet.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn sessions(&self) -> MutexGuard<'_, HashMap<u64, SessionEntry>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish(&self, event: Event) {
        // No receivers just means no map streams are open.
        let _ = self.events.send(event);
    }
}

/// Seconds since the Unix epoch.
pub(crate) fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A bound, not yet running, lab coordination server.
pub struct ControlServer {
    shared: Arc<Shared>,
    listener: TcpListener,
    /// The HTTPS listener and its certificate, when the config has `[tls]`.
    tls: Option<(TcpListener, tokio_rustls::TlsAcceptor)>,
}

/// A cheap handle for watching a running server (node list, events, counters).
#[derive(Clone)]
pub struct ServerHandle {
    shared: Arc<Shared>,
}

impl ControlServer {
    /// Opens the state directory (Noise key, node database) and binds the listen address.
    pub async fn bind(config: Config) -> Result<Self, ServerError> {
        tern_lab::control::db::ensure_state_dir(&config.state_dir)?;
        let key = tern_lab::control::db::load_or_create_noise_key(&config.state_dir)?;
        let listen = config.listen;
        let tls_config = config.tls.clone();
        let public_url = config.public_url();
        let offline_grace = Duration::from_secs(config.offline_grace_secs);
        let keep_alive = Duration::from_secs(config.keep_alive_secs);
        let tailnet = Tailnet::open(config)?;
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|source| ServerError::Listen {
                addr: listen,
                source,
            })?;
        let (events, _) = broadcast::channel(1024);
        let shared = Arc::new(Shared {
            tailnet: Mutex::new(tailnet),
            noise_key: MachinePrivate::from_bytes(key),
            events,
            sessions: Mutex::new(HashMap::new()),
            next_session: AtomicU64::new(1),
            offline_grace,
            keep_alive,
            rejections: Rejections::default(),
            sent: Sent::default(),
            logins_approved: tokio::sync::Notify::new(),
            public_url,
        });
        let tls = match tls_config {
            Some(tls) => Some(bind_tls(&tls).await?),
            None => None,
        };
        Ok(ControlServer {
            shared,
            listener,
            tls,
        })
    }

    /// The HTTPS address actually bound, when serving HTTPS.
    pub fn tls_local_addr(&self) -> Option<SocketAddr> {
        self.tls.as_ref().and_then(|(l, _)| l.local_addr().ok())
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// A handle for watching the server.
    pub fn handle(&self) -> ServerHandle {
        ServerHandle {
            shared: self.shared.clone(),
        }
    }

    /// Serves until the task is dropped. Each connection runs in its own task; an accept error
    /// (out of file descriptors, say) is logged and the loop goes on after a pause.
    pub async fn run(self) {
        info!(
            addr = %self.listener.local_addr().map_or_else(|e| e.to_string(), |a| a.to_string()),
            https = ?self.tls_local_addr(),
            key = %self.shared.noise_key.public(),
            "lab control server listening (a lab server: not for production tailnets)"
        );
        let plain = accept_plain(self.shared.clone(), self.listener);
        match self.tls {
            Some((listener, acceptor)) => {
                tokio::join!(plain, accept_tls(self.shared, listener, acceptor));
            }
            None => plain.await,
        }
    }
}

/// How long a client has to finish the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

async fn accept_plain(shared: Arc<Shared>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                tokio::spawn(http::serve_connection(shared.clone(), stream, peer));
            }
            Err(err) => accept_failed(&err).await,
        }
    }
}

async fn accept_tls(
    shared: Arc<Shared>,
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let (shared, acceptor) = (shared.clone(), acceptor.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await
                    {
                        Ok(Ok(tls)) => http::serve_connection(shared, tls, peer).await,
                        Ok(Err(err)) => debug!(%peer, error = %err, "TLS handshake failed"),
                        Err(_) => debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
            Err(err) => accept_failed(&err).await,
        }
    }
}

async fn accept_failed(err: &std::io::Error) {
    warn!(error = %err, "accept failed");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// Binds the HTTPS listener and loads its certificate and key (PEM).
async fn bind_tls(
    tls: &tern_lab::control::config::TlsConfig,
) -> Result<(TcpListener, tokio_rustls::TlsAcceptor), ServerError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let pem_error =
        |what: &str, e: &dyn std::fmt::Display| ServerError::Tls(format!("{what}: {e}"));
    let chain = CertificateDer::pem_file_iter(&tls.cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| pem_error(&format!("tls.cert {}", tls.cert.display()), &e))?;
    let key = PrivateKeyDer::from_pem_file(&tls.key)
        .map_err(|e| pem_error(&format!("tls.key {}", tls.key.display()), &e))?;
    let config = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| pem_error("TLS", &e))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| pem_error("tls.cert/tls.key", &e))?;
    let listener = TcpListener::bind(tls.listen)
        .await
        .map_err(|source| ServerError::Listen {
            addr: tls.listen,
            source,
        })?;
    Ok((listener, tokio_rustls::TlsAcceptor::from(Arc::new(config))))
}

impl ServerHandle {
    /// The server's Noise public key (as served on `/key`).
    pub fn noise_public(&self) -> MachinePublic {
        self.shared.noise_key.public()
    }

    /// A snapshot of every node.
    pub fn nodes(&self) -> Vec<NodeRecord> {
        self.shared.tailnet().nodes().to_vec()
    }

    /// Events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.shared.events.subscribe()
    }

    /// Bad input refused so far.
    pub fn rejections(&self) -> &Rejections {
        &self.shared.rejections
    }

    /// Map-stream messages sent so far.
    pub fn sent(&self) -> &Sent {
        &self.shared.sent
    }

    /// Number of open map streams.
    pub fn open_streams(&self) -> usize {
        self.shared.sessions().len()
    }
}

/// Loads a config, starts the server, and serves forever (`tern lab control`).
pub async fn run_from_config(config: Config) -> Result<(), ServerError> {
    let server = ControlServer::bind(config).await?;
    server.run().await;
    Ok(())
}

fn count(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}
