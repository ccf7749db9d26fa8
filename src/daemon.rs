//! `tern daemon`: one tokio runtime that wires the state directory, the LocalAPI, the control
//! client and the data plane ([`crate::engine`]) together.
//!
//! The daemon task owns the preferences, the control task and the data-plane task (started and
//! stopped together; the control task hands netmaps to the engine through an [`EngineLink`]). LocalAPI commands (`up`, `down`)
//! arrive on an mpsc channel; every view reads the [`Status`] watch channel.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use http::StatusCode;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::control::client::{self as control_client, ControlConfig, EngineLink, NodeIdentity};
use crate::engine::api::{EngineGone, EngineHandle};
use crate::engine::{self, EngineConfig};
use crate::keys::NodePublic;
use crate::localapi::{self, ApiError, Command, SetRequest, SocketOwner, UpRequest};
use crate::report::{NetcheckReport, PingResult};
use crate::state::{Prefs, StateDir};
use crate::status::{BackendState, ControlState, DataPlaneStatus, Status};

mod net_prefs;

/// How `tern daemon` was invoked.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    /// TUN name, or `userspace-networking` (no TUN: the userspace stack is the data plane).
    pub tun: String,
    /// TUN offloads (TSO, checksum offload, GRO on writes); off only to compare or work around.
    pub tun_offload: bool,
    pub port: u16,
    /// User (name or numeric uid) allowed to use the LocalAPI socket besides root.
    pub operator: Option<String>,
    /// `--socks5-server`, `--outbound-http-proxy-listen`.
    pub socks5_server: Option<std::net::SocketAddr>,
    pub http_proxy: Option<std::net::SocketAddr>,
    /// `--metrics-listen`.
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// Run the daemon until SIGINT/SIGTERM.
pub async fn run(config: DaemonConfig) -> anyhow::Result<()> {
    let state = StateDir::open(&config.state_dir)?;
    let identity = NodeIdentity::load(&state)
        .with_context(|| format!("keys in {}", config.state_dir.display()))?;
    let prefs = state.load_prefs()?;
    let owner = SocketOwner {
        operator: config.operator.as_deref().map(resolve_user).transpose()?,
    };
    let listener = localapi::bind(&config.socket, owner)?;
    let dialer = std::sync::Arc::new(watch::channel(None).0);
    let proxy_counters = std::sync::Arc::new(crate::proxy::ProxyCounters::default());
    let _proxies = start_proxies(&config, &dialer, &proxy_counters).await?;
    tracing::info!(
        socket = %config.socket.display(),
        state_dir = %config.state_dir.display(),
        tun = %config.tun,
        port = config.port,
        "tern daemon started"
    );

    let (status_tx, status_rx) = watch::channel(Status::initial(
        DataPlaneStatus {
            tun: config.tun.clone(),
            port: config.port,
            active: false,
            note: Some("waiting for the first network map".into()),
            ..Default::default()
        },
        SystemTime::now(),
    ));
    let (cmd_tx, cmd_rx) = mpsc::channel(16);
    let _metrics = match config.metrics_listen {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("--metrics-listen {addr}"))?;
            tracing::info!(%addr, "metrics at /metrics");
            Some(AbortOnDrop(tokio::spawn(crate::metrics::http::serve(
                listener,
                status_rx.clone(),
            ))))
        }
        None => None,
    };
    let api = tokio::spawn(localapi::serve(listener, status_rx, cmd_tx));
    // systemd Type=notify: every listener is bound, clients can connect from here on.
    crate::sd_notify::ready();

    if config.tun == USERSPACE_NETWORKING {
        crate::bypass::disable();
    } else {
        // A killed tern (or tailscaled) may have left rules, routes or chains: away with them
        // before anything else, as tailscaled does at every start.
        if let Err(e) = engine::cleanup_host().await {
            tracing::warn!(error = %e, "cleaning up what a previous run left");
        }
    }
    let relay_server_port = prefs.relay_server_port;
    let relay_static = prefs.relay_server_static_endpoints.clone();
    let net_prefs = prefs.net.clone();
    let mut daemon = Daemon {
        state,
        identity,
        prefs,
        status: status_tx,
        control: None,
        engine: None,
        engine_handle: None,
        tun: config.tun.clone(),
        tun_offload: config.tun_offload,
        port: config.port,
        backend_log_id: hex::encode(rand::random::<[u8; 32]>()),
        relay_server_port: watch::channel(relay_server_port).0,
        relay_static_endpoints: watch::channel(relay_static).0,
        net_prefs: watch::channel(net_prefs).0,
        stopping_engine: None,
        dialer,
        proxy_counters: (config.socks5_server.is_some() || config.http_proxy.is_some())
            .then_some(proxy_counters),
    };
    daemon.start_or_stop();
    let result = daemon.serve(cmd_rx).await;
    daemon.stop_control();
    // The engine undoes its rules, routes and chains as it goes; wait for that before exit.
    if let Some(engine) = daemon.stopping_engine.take() {
        let _ = tokio::time::timeout(Duration::from_secs(10), engine).await;
    }
    api.abort();
    let _ = std::fs::remove_file(&config.socket);
    tracing::info!("tern daemon stopped");
    result
}

struct Daemon {
    state: StateDir,
    identity: NodeIdentity,
    prefs: Prefs,
    status: watch::Sender<Status>,
    control: Option<JoinHandle<()>>,
    /// The data plane, running next to the control task.
    engine: Option<JoinHandle<()>>,
    /// Asks the running engine for pings and netchecks (`None` without one).
    engine_handle: Option<EngineHandle>,
    tun: String,
    tun_offload: bool,
    port: u16,
    /// Random per process, like the Go client's log id when logging is off.
    backend_log_id: String,
    /// `prefs.relay_server_port`, watched by the engine (which runs the relay server).
    relay_server_port: watch::Sender<Option<u16>>,
    /// `prefs.relay_server_static_endpoints`, watched by the engine too.
    relay_static_endpoints: watch::Sender<Vec<std::net::SocketAddr>>,
    /// An aborted engine until it is gone (the next one waits for it).
    stopping_engine: Option<JoinHandle<()>>,
    /// `prefs.net` (exit node, routes, netfilter), watched by the engine.
    net_prefs: watch::Sender<crate::state::NetPrefs>,
    /// How the proxies reach the tailnet; the running engine publishes it.
    dialer: std::sync::Arc<watch::Sender<Option<crate::netstack::user::TailnetDialer>>>,
    proxy_counters: Option<std::sync::Arc<crate::proxy::ProxyCounters>>,
}

impl Daemon {
    async fn serve(&mut self, mut commands: mpsc::Receiver<Command>) -> anyhow::Result<()> {
        let mut sigterm =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        loop {
            tokio::select! {
                cmd = commands.recv() => match cmd {
                    Some(Command::Up(req, reply)) => { let _ = reply.send(self.up(req)); }
                    Some(Command::Down(reply)) => { let _ = reply.send(self.down()); }
                    Some(Command::Logout(reply)) => self.logout(reply),
                    Some(Command::Set(req, reply)) => { let _ = reply.send(self.set(req)); }
                    Some(Command::Ping { peer, timeout, reply }) => self.ping(peer, timeout, reply),
                    Some(Command::Netcheck(reply)) => self.netcheck(reply),
                    None => return Ok(()),
                },
                _ = tokio::signal::ctrl_c() => return Ok(()),
                _ = sigterm.recv() => return Ok(()),
            }
        }
    }

    fn up(&mut self, req: UpRequest) -> Result<(), String> {
        let mut prefs = self.prefs.clone();
        if let Some(url) = req.login_server {
            prefs.login_server = Some(validate_login_server(&url)?);
        }
        if req.auth_key.is_some() {
            prefs.auth_key = req.auth_key;
        }
        if req.hostname.is_some() {
            prefs.hostname = req.hostname;
        }
        // Like `tailscale up`: no login server given or stored means Tailscale's own.
        prefs.login_server = Some(effective_login_server(prefs.login_server.take()));
        prefs.want_running = true;
        self.state.store_prefs(&prefs).map_err(|e| e.to_string())?;
        self.prefs = prefs;
        self.stop_control();
        self.start_or_stop();
        Ok(())
    }

    /// The engine to ask for pings and netchecks, or why there is none (503).
    fn engine_for_request(&self) -> Result<EngineHandle, ApiError> {
        self.engine_handle.clone().ok_or_else(engine_not_running)
    }

    /// Answers in a task of its own: a ping takes up to its timeout, and the command loop
    /// must stay responsive meanwhile.
    fn ping(
        &self,
        peer: NodePublic,
        timeout: Duration,
        reply: oneshot::Sender<Result<PingResult, ApiError>>,
    ) {
        let engine = match self.engine_for_request() {
            Ok(engine) => engine,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        tokio::spawn(async move {
            let answer = bounded(timeout + ENGINE_ANSWER_MARGIN, engine.ping(peer, timeout)).await;
            let _ = reply.send(answer);
        });
    }

    fn netcheck(&self, reply: oneshot::Sender<Result<NetcheckReport, ApiError>>) {
        let engine = match self.engine_for_request() {
            Ok(engine) => engine,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        tokio::spawn(async move {
            let _ = reply.send(bounded(NETCHECK_WAIT, engine.netcheck()).await);
        });
    }

    /// `tern set`: store the changed prefs, then apply them (the engine watches the relay port).
    fn set(&mut self, req: SetRequest) -> Result<(), String> {
        if !req.relay_server_port_set
            && !req.relay_server_static_endpoints_set
            && req.net.is_empty()
        {
            return Err(
                "nothing to change: mark a preference as set (relay_server_port_set, \
                 relay_server_static_endpoints_set) or give a routing pref in `net`"
                    .into(),
            );
        }
        if let Some(bad) = req
            .relay_server_static_endpoints
            .iter()
            .find(|a| a.port() == 0 || a.ip().is_unspecified())
        {
            return Err(format!(
                "static relay endpoint {bad} is not an address clients can reach: give ip:port \
                 with a real IP and a port"
            ));
        }
        let port_set = req.relay_server_port_set;
        if let Some(port) = req
            .relay_server_port
            .filter(|p| port_set && *p != 0 && *p == self.port)
        {
            return Err(format!(
                "UDP port {port} is this node's own WireGuard port (--port); pick another relay \
                 server port"
            ));
        }
        let mut prefs = self.prefs.clone();
        if req.relay_server_port_set {
            prefs.relay_server_port = req.relay_server_port;
        }
        if req.relay_server_static_endpoints_set {
            let mut endpoints = req.relay_server_static_endpoints;
            endpoints.sort();
            endpoints.dedup();
            prefs.relay_server_static_endpoints = endpoints;
        }
        let net = net_prefs::patched(&prefs.net, &req.net, &self.status.borrow())?;
        prefs.net = net;
        self.state.store_prefs(&prefs).map_err(|e| e.to_string())?;
        self.prefs = prefs;
        let net = self.prefs.net.clone();
        self.net_prefs
            .send_if_modified(|n| std::mem::replace(n, net.clone()) != *n);
        self.relay_server_port
            .send_if_modified(|p| std::mem::replace(p, self.prefs.relay_server_port) != *p);
        let statics = self.prefs.relay_server_static_endpoints.clone();
        self.relay_static_endpoints
            .send_if_modified(|s| std::mem::replace(s, statics.clone()) != *s);
        tracing::info!(
            port = ?self.prefs.relay_server_port,
            static_endpoints = ?self.prefs.relay_server_static_endpoints,
            "relay server preferences set"
        );
        Ok(())
    }

    fn down(&mut self) -> Result<(), String> {
        let mut prefs = self.prefs.clone();
        prefs.want_running = false;
        self.state.store_prefs(&prefs).map_err(|e| e.to_string())?;
        self.prefs = prefs;
        self.stop_control();
        self.start_or_stop();
        Ok(())
    }

    /// `tern logout`: stop talking to control, forget the auth key (the next `up` needs a new
    /// one or an interactive login), and tell control in the background to expire our node key.
    /// Keys and other preferences stay, as Go's logout keeps the machine.
    fn logout(&mut self, reply: oneshot::Sender<Result<(), String>>) {
        let config = self.control_config();
        let mut prefs = self.prefs.clone();
        prefs.want_running = false;
        prefs.auth_key = None;
        if let Err(e) = self.state.store_prefs(&prefs) {
            let _ = reply.send(Err(e.to_string()));
            return;
        }
        self.prefs = prefs;
        self.stop_control();
        self.status.send_modify(|s| {
            s.backend_state = BackendState::NeedsLogin;
            s.control.state = ControlState::Idle;
            s.control.next_attempt_at = None;
            s.control.connected_since = None;
            s.auth_url = None;
            s.self_node = None;
            s.peers.clear();
        });
        let identity = self.identity.clone();
        tokio::spawn(async move {
            let told = match config {
                Some(config) => control_client::logout(&config, &identity)
                    .await
                    .map_err(|e| format!("logged out here, but control could not be told: {e}")),
                None => Ok(()),
            };
            if let Err(e) = &told {
                tracing::warn!(error = %e, "logout");
            }
            let _ = reply.send(told);
        });
    }

    /// The control client's configuration from the preferences (`None` without a login server).
    fn control_config(&self) -> Option<ControlConfig> {
        Some(ControlConfig {
            url: self.prefs.login_server.clone()?,
            auth_key: self.prefs.auth_key.clone(),
            hostname: self.prefs.hostname.clone().unwrap_or_else(default_hostname),
            backend_log_id: self.backend_log_id.clone(),
            watchdog: control_client::MAP_WATCHDOG,
            routable_ips: self.prefs.net.routable_ips(),
        })
    }

    /// Start the control task if the preferences want it, else publish why we are idle.
    fn start_or_stop(&mut self) {
        let login_server = self.prefs.login_server.clone();
        match (self.prefs.want_running, login_server) {
            (true, Some(_)) => {
                if let Err(e) = self.identity.refresh_node_key(&self.state) {
                    tracing::warn!(error = %e, "re-reading the node key; using the one in memory");
                }
                let Some(config) = self.control_config() else {
                    return;
                };
                let link = self.start_engine();
                let task = control_client::spawn(
                    config,
                    self.identity.clone(),
                    self.state.clone(),
                    self.status.clone(),
                    link,
                );
                self.control = Some(task);
            }
            (want, url) => {
                let state = if want || url.is_none() {
                    BackendState::NoState
                } else {
                    BackendState::Stopped
                };
                self.status.send_modify(|s| {
                    s.backend_state = state;
                    s.control.url = url;
                    s.control.state = ControlState::Idle;
                    s.control.next_attempt_at = None;
                    s.control.connected_since = None;
                    s.peers.clear();
                });
            }
        }
    }

    /// Starts the data plane; it waits for the control task's first netmap.
    fn start_engine(&mut self) -> Option<EngineLink> {
        let (netmap_tx, netmap_rx) = watch::channel(None);
        let (local_tx, local_rx) = watch::channel(Default::default());
        let (node_key_tx, node_keys) = watch::channel(self.identity.node.clone());
        let config = EngineConfig {
            tun_name: self.tun.clone(),
            tun_offload: self.tun_offload,
            port: self.port,
            node_key: self.identity.node.clone(),
            disco_key: self.identity.disco.clone(),
            relay_server_port: self.relay_server_port.subscribe(),
            relay_static_endpoints: self.relay_static_endpoints.subscribe(),
            node_keys,
            net_prefs: self.net_prefs.subscribe(),
            dialer: self.dialer.clone(),
            proxy_counters: self.proxy_counters.clone(),
        };
        let previous = self.stopping_engine.take();
        let (task, handle) =
            engine::spawn(config, netmap_rx, local_tx, self.status.clone(), previous);
        self.engine = Some(task);
        self.engine_handle = Some(handle);
        Some(EngineLink {
            netmap: std::sync::Arc::new(netmap_tx),
            local: local_rx,
            node_key: std::sync::Arc::new(node_key_tx),
        })
    }

    fn stop_control(&mut self) {
        if let Some(task) = self.control.take() {
            task.abort();
        }
        // Dropping the engine task closes the TUN; its routes go with the device.
        self.engine_handle = None;
        if let Some(task) = self.engine.take() {
            task.abort();
            self.stopping_engine = Some(task);
            self.status.send_modify(|s| {
                s.data_plane.active = false;
                s.data_plane.note = Some("stopped".into());
            });
        }
    }
}

/// The SOCKS5 and HTTP proxies the flags ask for, listening before the daemon reports it
/// started (a taken port is an error at once); they stop with the returned tasks.
async fn start_proxies(
    config: &DaemonConfig,
    dialer: &watch::Sender<Option<crate::netstack::user::TailnetDialer>>,
    counters: &std::sync::Arc<crate::proxy::ProxyCounters>,
) -> anyhow::Result<Vec<AbortOnDrop>> {
    use crate::proxy::{self, Kind};
    let mut tasks = Vec::new();
    for (kind, addr, flag) in [
        (Kind::Socks5, config.socks5_server, "--socks5-server"),
        (
            Kind::Http,
            config.http_proxy,
            "--outbound-http-proxy-listen",
        ),
    ] {
        let Some(addr) = addr else { continue };
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("{flag} {addr}"))?;
        tracing::info!(%addr, ?kind, "proxy listening");
        tasks.push(AbortOnDrop(tokio::spawn(proxy::serve(
            kind,
            listener,
            dialer.subscribe(),
            counters.clone(),
        ))));
    }
    Ok(tasks)
}

/// Aborts a task when dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How much longer than the ping's own timeout we wait for the engine's answer.
const ENGINE_ANSWER_MARGIN: Duration = Duration::from_secs(2);
/// How long a netcheck may take before the LocalAPI gives up on the engine.
const NETCHECK_WAIT: Duration = Duration::from_secs(20);

fn engine_not_running() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "the data plane is not running; run tern up",
    )
}

/// An engine request with an upper bound: a gone engine is a 503, a silent one a 504.
async fn bounded<T>(
    limit: Duration,
    request: impl std::future::Future<Output = Result<T, EngineGone>>,
) -> Result<T, ApiError> {
    match tokio::time::timeout(limit, request).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(EngineGone)) => Err(engine_not_running()),
        Err(_) => Err(ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            format!(
                "the data plane did not answer within {}s",
                limit.as_secs_f64()
            ),
        )),
    }
}

/// Tailscale's coordination server, the default login server as in `tailscale up`.
pub const DEFAULT_LOGIN_SERVER: &str = "https://controlplane.tailscale.com";

/// The login server to use: the one given or stored, else Tailscale's.
fn effective_login_server(given: Option<String>) -> String {
    given.unwrap_or_else(|| DEFAULT_LOGIN_SERVER.to_string())
}

/// The `--tun` value that asks for no kernel TUN.
pub const USERSPACE_NETWORKING: &str = "userspace-networking";

/// Accept `http://` and `https://` URLs with a host and nothing else; trailing slashes are
/// dropped. The same rules the control client dials by, so a bad URL fails here, at `tern up`.
fn validate_login_server(url: &str) -> Result<String, String> {
    crate::control::url::ControlUrl::parse(url)
        .map(|_| url.trim_end_matches('/').to_string())
        .map_err(|e| format!("bad --login-server: {e}"))
}

fn default_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "tern".into())
}

/// `--operator alice` or `--operator 1000` → (uid, gid).
fn resolve_user(name: &str) -> anyhow::Result<(u32, u32)> {
    let user = match name.parse::<u32>() {
        Ok(uid) => nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))?,
        Err(_) => nix::unistd::User::from_name(name)?,
    };
    let user = user.with_context(|| format!("--operator {name}: no such user"))?;
    Ok((user.uid.as_raw(), user.gid.as_raw()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_server_defaults_to_tailscales_like_tailscale_up() {
        assert_eq!(
            effective_login_server(None),
            "https://controlplane.tailscale.com"
        );
        assert_eq!(
            effective_login_server(Some("http://10.0.0.1:8080".into())),
            "http://10.0.0.1:8080"
        );
        assert!(validate_login_server(DEFAULT_LOGIN_SERVER).is_ok());
    }

    #[test]
    fn login_server_validation() {
        assert_eq!(
            validate_login_server("http://127.0.0.1:8080/").unwrap(),
            "http://127.0.0.1:8080"
        );
        assert!(validate_login_server("ftp://x").is_err());
        assert!(validate_login_server("127.0.0.1:8080").is_err());
        assert!(validate_login_server("http://").is_err());
    }

    #[test]
    fn operator_resolves_root() {
        assert_eq!(resolve_user("root").unwrap(), (0, 0));
        assert_eq!(resolve_user("0").unwrap(), (0, 0));
        assert!(resolve_user("no-such-user-tern").is_err());
    }
}
