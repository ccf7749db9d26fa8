//! The daemon's control session: keep a ts2021 connection to the coordination server, register,
//! hold the streaming map poll open, and publish what it learns into the [`Status`] snapshot.
//!
//! Shape: [`Session`] is the pure part (what state are we in, what to publish, how long to back
//! off); [`run`] is the one I/O task that dials, registers and reads the map stream, handing
//! each outcome to the session.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::control::backoff::Backoff;
use crate::control::error::{error_chain, ControlError};
use crate::control::tailcfg::{GoTime, MapResponse, Node};
use crate::keys::{DiscoPrivate, MachinePrivate, NodePrivate, NodePublic};
use crate::netmap::NetworkMap;
use crate::report::LocalNetInfo;
use crate::state::{StateDir, StateError};
use crate::status::{
    rfc3339, BackendState, ControlState, ErrorReport, PeerStatus, SelfStatus, Status,
};

/// The map poll is restarted when nothing arrives for this long.
pub const MAP_WATCHDOG: Duration = Duration::from_secs(120);

/// What the daemon tells the control client to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlConfig {
    /// Coordination server URL without trailing slash.
    pub url: String,
    pub auth_key: Option<String>,
    pub hostname: String,
    /// `Hostinfo.BackendLogID`: the Go client refuses to run without one; random per process.
    pub backend_log_id: String,
    /// Give up on register or the map poll after this long without an answer or a message
    /// ([`MAP_WATCHDOG`] outside tests).
    pub watchdog: Duration,
    /// `Hostinfo.RoutableIPs` at the start (later changes come with [`LocalNetInfo`]).
    pub routable_ips: Vec<ipnet::IpNet>,
}

/// The data plane's side of the control session: every netmap goes out on `netmap`, and what
/// the data plane learns of our network (`local`: home DERP region, endpoints, NAT facts) is
/// reported to control in a lite map update (`Endpoints`, `Hostinfo.NetInfo`), so peers know
/// where to reach us.
#[derive(Debug, Clone)]
pub struct EngineLink {
    pub netmap: Arc<watch::Sender<Option<Arc<NetworkMap>>>>,
    pub local: watch::Receiver<LocalNetInfo>,
    /// Our node key after each registration, so the engine follows a renewal.
    pub node_key: Arc<watch::Sender<NodePrivate>>,
}

/// This node's keys: machine and node keys from the state directory, a disco key made fresh for
/// this process.
#[derive(Clone)]
pub struct NodeIdentity {
    pub machine: MachinePrivate,
    pub node: NodePrivate,
    pub disco: DiscoPrivate,
    /// The previous node key while a renewal is being registered (`OldNodeKey`).
    pub old_node: Option<NodePublic>,
}

impl std::fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeIdentity")
            .field("machine", &self.machine.public())
            .field("node", &self.node.public())
            .field("disco", &self.disco.public())
            .finish()
    }
}

impl NodeIdentity {
    /// Load (or create on first start) the persistent keys; generate the disco key.
    pub fn load(state: &StateDir) -> Result<Self, StateError> {
        let machine = state.machine_key(|| *MachinePrivate::generate().as_bytes())?;
        let node = state.node_key(|| *NodePrivate::generate().as_bytes())?;
        Ok(Self {
            machine: MachinePrivate::from_bytes(machine),
            node: NodePrivate::from_bytes(node),
            disco: DiscoPrivate::generate(),
            old_node: None,
        })
    }

    /// Re-read the node key from the state directory (a control task may have renewed it since
    /// this copy was made); the disco key stays.
    pub fn refresh_node_key(&mut self, state: &StateDir) -> Result<(), StateError> {
        let stored = state.node_key(|| *self.node.as_bytes())?;
        if stored != *self.node.as_bytes() {
            self.old_node = None;
            self.node = NodePrivate::from_bytes(stored);
        }
        Ok(())
    }

    /// Make and store a new node key; the old one goes in `OldNodeKey` of the next register.
    pub fn renew_node_key(&mut self, state: &StateDir) -> Result<(), ControlError> {
        let fresh = NodePrivate::generate();
        state
            .store_node_key(fresh.as_bytes())
            .map_err(|e| ControlError::transient("storing the renewed node key", e))?;
        if self.old_node.is_none() {
            self.old_node = Some(self.node.public());
        }
        self.node = fresh;
        Ok(())
    }
}

/// Logs this node out at control (see [`connection::logout`]); bounded by `config.watchdog`
/// for the request and the dial timeouts for the rest.
pub async fn logout(config: &ControlConfig, identity: &NodeIdentity) -> Result<(), ControlError> {
    connection::logout(config, identity).await
}

/// The pure part of the control session: connection state, error and retry bookkeeping, and
/// how each of them shows in the status snapshot.
#[derive(Debug)]
pub struct Session {
    url: String,
    backoff: Backoff,
}

/// What the I/O task should do next after an attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    RetryAfter(Duration),
    Stop,
}

impl Session {
    pub fn new(url: String) -> Self {
        Self {
            url,
            backoff: Backoff::default(),
        }
    }

    /// An attempt is starting.
    pub fn connecting(&self, s: &mut Status) {
        s.control.url = Some(self.url.clone());
        s.control.state = ControlState::Connecting;
        s.control.next_attempt_at = None;
        if s.self_node.is_none() {
            s.backend_state = BackendState::Starting;
        }
    }

    /// Control wants a person to visit `auth_url`; the register request waits for it.
    pub fn needs_login(&self, s: &mut Status, auth_url: &str) {
        s.backend_state = BackendState::NeedsLogin;
        s.auth_url = Some(auth_url.to_string());
        s.control.state = ControlState::WaitingForLogin;
    }

    /// The map stream is open and the first netmap arrived.
    pub fn connected(&mut self, s: &mut Status, now: SystemTime) {
        s.auth_url = None;
        self.backoff.succeeded();
        s.control.state = ControlState::Connected;
        s.control.connected_since = Some(rfc3339(now));
        s.control.failed_attempts = 0;
        s.control.map_sessions += 1;
        s.control.last_error = None;
        s.control.next_attempt_at = None;
        s.backend_state = BackendState::Running;
    }

    /// The attempt ended with `err`; `jitter` in `[0, 1)`.
    pub fn failed(
        &mut self,
        s: &mut Status,
        err: &ControlError,
        now: SystemTime,
        jitter: f64,
    ) -> Next {
        s.control.last_error = Some(ErrorReport {
            message: err.to_string(),
            at: rfc3339(now),
        });
        s.control.connected_since = None;
        s.auth_url = None;
        match err {
            ControlError::LoginRefused(_) => {
                s.control.state = ControlState::LoginFailed;
                s.control.next_attempt_at = None;
                s.backend_state = BackendState::NeedsLogin;
                Next::Stop
            }
            ControlError::Transient(_) => {
                let delay = self.backoff.failed(jitter);
                s.control.state = ControlState::Backoff;
                s.control.failed_attempts = self.backoff.failures();
                s.control.next_attempt_at = Some(rfc3339(now + delay));
                Next::RetryAfter(delay)
            }
        }
    }
}

/// Start the control task. Abort the handle to stop it (`tern down`, new `tern up`).
pub fn spawn(
    config: ControlConfig,
    identity: NodeIdentity,
    state: StateDir,
    status: watch::Sender<Status>,
    link: Option<EngineLink>,
) -> JoinHandle<()> {
    tokio::spawn(run(config, identity, state, status, link))
}

/// The control I/O task: attempt, publish, back off, repeat.
pub async fn run(
    config: ControlConfig,
    mut identity: NodeIdentity,
    state: StateDir,
    status: watch::Sender<Status>,
    link: Option<EngineLink>,
) {
    let mut session = Session::new(config.url.clone());
    let mut last_error = String::new();
    loop {
        status.send_modify(|s| session.connecting(s));
        let err = match connection::run_once(
            &config,
            &mut identity,
            &state,
            &status,
            &mut session,
            link.as_ref(),
        )
        .await
        {
            Ok(()) => ControlError::Transient("control closed the map stream".into()),
            Err(e) => e,
        };
        // Warn once per distinct error; the same error again on every retry is noise.
        let message = err.to_string();
        if message != last_error {
            tracing::warn!(url = %config.url, error = %message, "control connection failed");
        } else {
            tracing::debug!(url = %config.url, error = %message, "control connection failed again");
        }
        last_error = message;
        let jitter: f64 = rand::random();
        let mut next = Next::Stop;
        status.send_modify(|s| next = session.failed(s, &err, SystemTime::now(), jitter));
        match next {
            Next::RetryAfter(delay) => tokio::time::sleep(delay).await,
            Next::Stop => return,
        }
    }
}

mod connection {
    use super::*;
    use crate::control::dial::{self, ControlConn, ControlUrl};
    use crate::control::framing::{Compression, MapFrameDecoder};
    use crate::control::tailcfg::{
        Hostinfo, MapRequest, RegisterRequest, RegisterResponse, RegisterResponseAuth,
    };
    use crate::control::CAPABILITY_VERSION;
    use http_body_util::BodyExt;

    /// Largest register response read (the client reads up to 1 MiB).
    const MAX_REGISTER_BODY: usize = 1 << 20;
    /// Largest single map message accepted (compressed or decompressed).
    pub(super) const MAX_MAP_MESSAGE: usize = 16 << 20;

    /// One connection's life: `/key`, dial, register, map stream until it ends.
    pub(super) async fn run_once(
        config: &ControlConfig,
        identity: &mut NodeIdentity,
        state: &StateDir,
        status: &watch::Sender<Status>,
        session: &mut Session,
        link: Option<&EngineLink>,
    ) -> Result<(), ControlError> {
        let mut conn = dial_control(config, identity).await?;
        let login = LoginWatch { status, session };
        register(&mut conn, config, identity, state, &login).await?;
        if let Some(link) = link {
            // A renewal during registration: the engine must use the key control accepted.
            let key = identity.node.clone();
            link.node_key.send_if_modified(|k| {
                let changed = k.public() != key.public();
                *k = key;
                changed
            });
        }
        let mut local_rx = link.map(|l| l.local.clone());
        let local = local_rx
            .as_mut()
            .map(|h| h.borrow_and_update().clone())
            .unwrap_or_default();
        let hostinfo = with_net_info(hostinfo(config), &local);
        send_lite_update(&conn, identity, &hostinfo, &local);
        let map = map_request(identity, &hostinfo, &local, true);
        let resp = tokio::time::timeout(
            config.watchdog,
            conn.post("/machine/map", map, &[identity.node.public()]),
        )
        .await
        .map_err(|_| {
            ControlError::Transient(format!(
                "POST /machine/map: no response within {:?}",
                config.watchdog
            ))
        })??;
        if resp.status() != http::StatusCode::OK {
            let code = resp.status();
            let body = dial::read_body(resp, 4096).await.unwrap_or_default();
            return Err(ControlError::Transient(format!(
                "POST /machine/map: HTTP {code}: {}",
                String::from_utf8_lossy(&body).trim()
            )));
        }
        let mut stream = MapStream {
            conn: &mut conn,
            identity,
            state,
            status,
            session,
            link,
            local_rx,
            local,
            hostinfo,
        };
        stream.read(resp.into_body(), config.watchdog).await
    }

    /// `POST /machine/register` until control accepts our node key.
    async fn register(
        conn: &mut ControlConn,
        config: &ControlConfig,
        identity: &mut NodeIdentity,
        state: &StateDir,
        login: &LoginWatch<'_>,
    ) -> Result<(), ControlError> {
        let mut followup = String::new();
        // One renewal per attempt: a second "expired" answer for a fresh key is control's bug.
        let mut renewed = false;
        loop {
            let answer = match register_once(conn, config, identity, &followup).await {
                Ok(answer) => answer,
                // A held follow-up that outlived the watchdog is asked again, as Go polls.
                Err(RegisterWait::TimedOut) if !followup.is_empty() => continue,
                Err(RegisterWait::TimedOut) => {
                    return Err(ControlError::Transient(format!(
                        "POST /machine/register: no answer within {:?}",
                        config.watchdog
                    )))
                }
                Err(RegisterWait::Failed(e)) => return Err(e),
            };
            match register_outcome(&answer) {
                RegisterOutcome::Accepted => {
                    tracing::info!(node_key = %identity.node.public(), user = answer.user.id, "registered with control");
                    identity.old_node = None;
                    return Ok(());
                }
                RegisterOutcome::NodeKeyExpired if !renewed => {
                    tracing::info!("control says our node key expired; renewing it");
                    identity.renew_node_key(state)?;
                    renewed = true;
                }
                RegisterOutcome::NodeKeyExpired => {
                    return Err(ControlError::Transient(
                        "control called a freshly renewed node key expired".into(),
                    ))
                }
                RegisterOutcome::NeedsAuth(url) => {
                    if followup != url {
                        tracing::info!(auth_url = %url, "control wants an interactive login");
                        login.show(&url);
                    } else {
                        // The same URL straight back: not approved yet; poll, gently.
                        tokio::time::sleep(FOLLOWUP_POLL).await;
                    }
                    followup = url;
                }
                RegisterOutcome::Refused(why) => return Err(ControlError::LoginRefused(why)),
            }
        }
    }

    /// `GET /key`, then the ts2021 connection with the key control gave.
    async fn dial_control(
        config: &ControlConfig,
        identity: &NodeIdentity,
    ) -> Result<ControlConn, ControlError> {
        let url = ControlUrl::parse(&config.url)?;
        let body = dial::fetch_key_body(&url, CAPABILITY_VERSION).await?;
        let server_key = dial::parse_key_response(&body)
            .map_err(|e| ControlError::Transient(format!("GET {}/key: {e}", url.origin())))?;
        let conn = dial::connect(&url, &identity.machine, &server_key).await?;
        tracing::debug!(server = %url.authority, "ts2021 connection up");
        Ok(conn)
    }

    /// Tells control this node logs out: a register request whose `Expiry` is in the past
    /// (Unix 123, as Go sends). Control expires the node key; the next login renews it.
    pub(super) async fn logout(
        config: &ControlConfig,
        identity: &NodeIdentity,
    ) -> Result<(), ControlError> {
        let mut conn = dial_control(config, identity).await?;
        let req = RegisterRequest {
            version: i32::from(CAPABILITY_VERSION),
            node_key: identity.node.public(),
            expiry: GoTime::from_unix(LOGOUT_EXPIRY_UNIX),
            hostinfo: Some(hostinfo(config)),
            ..Default::default()
        };
        let body = serde_json::to_vec(&req)
            .map_err(|e| ControlError::transient("encoding the logout request", e))?;
        let resp = tokio::time::timeout(
            config.watchdog,
            conn.post("/machine/register", body, &[identity.node.public()]),
        )
        .await
        .map_err(|_| ControlError::Transient("logout: no answer from control".into()))??;
        if resp.status() != http::StatusCode::OK {
            return Err(ControlError::Transient(format!(
                "logout: control answered HTTP {}",
                resp.status()
            )));
        }
        Ok(())
    }

    /// The expiry Go's client sends to log out (a time long past).
    const LOGOUT_EXPIRY_UNIX: i64 = 123;

    /// How long to wait before asking again when control answers a follow-up at once.
    const FOLLOWUP_POLL: Duration = Duration::from_secs(2);

    /// Where a pending interactive login is shown (the status snapshot).
    pub(super) struct LoginWatch<'a> {
        pub(super) status: &'a watch::Sender<Status>,
        pub(super) session: &'a Session,
    }

    impl LoginWatch<'_> {
        fn show(&self, url: &str) {
            self.status
                .send_modify(|s| self.session.needs_login(s, url));
        }
    }

    enum RegisterWait {
        TimedOut,
        Failed(ControlError),
    }

    /// One `POST /machine/register` (with `Followup` when waiting for a login), bounded by the
    /// watchdog.
    async fn register_once(
        conn: &mut ControlConn,
        config: &ControlConfig,
        identity: &NodeIdentity,
        followup: &str,
    ) -> Result<RegisterResponse, RegisterWait> {
        let old = identity.old_node.unwrap_or_default();
        let req = RegisterRequest {
            version: i32::from(CAPABILITY_VERSION),
            node_key: identity.node.public(),
            old_node_key: old,
            auth: config.auth_key.as_ref().map(|k| RegisterResponseAuth {
                auth_key: k.clone(),
                ..Default::default()
            }),
            expiry: GoTime::ZERO,
            followup: followup.to_string(),
            hostinfo: Some(hostinfo(config)),
            ..Default::default()
        };
        let failed = RegisterWait::Failed;
        let body = serde_json::to_vec(&req)
            .map_err(|e| failed(ControlError::transient("encoding RegisterRequest", e)))?;
        let exchange = async {
            let resp = conn
                .post("/machine/register", body, &[old, identity.node.public()])
                .await?;
            let code = resp.status();
            let body = dial::read_body(resp, MAX_REGISTER_BODY)
                .await
                .map_err(|e| ControlError::Transient(format!("POST /machine/register: {e}")))?;
            if code != http::StatusCode::OK {
                return Err(ControlError::Transient(format!(
                    "POST /machine/register: HTTP {code}: {}",
                    String::from_utf8_lossy(&body).trim()
                )));
            }
            serde_json::from_slice::<RegisterResponse>(&body).map_err(|e| {
                ControlError::Transient(format!("POST /machine/register: bad JSON: {e}"))
            })
        };
        match tokio::time::timeout(config.watchdog, exchange).await {
            Ok(result) => result.map_err(failed),
            Err(_) => Err(RegisterWait::TimedOut),
        }
    }

    /// A lite update: same connection, must not disturb the stream; its answer
    /// is discarded.
    fn send_lite_update(
        conn: &ControlConn,
        identity: &NodeIdentity,
        hostinfo: &Hostinfo,
        local: &LocalNetInfo,
    ) {
        let mut requests = conn.requests.clone();
        let body = map_request(identity, hostinfo, local, false);
        let node = identity.node.public();
        tokio::spawn(async move {
            match requests.post("/machine/map", body, &[node]).await {
                Ok(resp) if resp.status() == http::StatusCode::OK => {
                    let _ = dial::read_body(resp, 1 << 16).await;
                }
                Ok(resp) => tracing::debug!(status = %resp.status(), "lite map update refused"),
                Err(e) => tracing::debug!(error = %e, "lite map update failed"),
            }
        });
    }

    /// One open map stream and what it needs to follow our home DERP changes.
    struct MapStream<'a> {
        conn: &'a mut ControlConn,
        identity: &'a mut NodeIdentity,
        state: &'a StateDir,
        status: &'a watch::Sender<Status>,
        session: &'a mut Session,
        link: Option<&'a EngineLink>,
        local_rx: Option<watch::Receiver<LocalNetInfo>>,
        local: LocalNetInfo,
        hostinfo: Hostinfo,
    }

    impl MapStream<'_> {
        /// Read `[u32le][zstd]` messages until the stream ends, the connection dies, or 120 s
        /// pass without a message. A new home DERP goes out as a lite update.
        async fn read(
            &mut self,
            mut body: hyper::body::Incoming,
            watchdog: Duration,
        ) -> Result<(), ControlError> {
            let mut decoder = MapFrameDecoder::with_max_len(Compression::Zstd, MAX_MAP_MESSAGE);
            let mut netmap = MapState::default();
            loop {
                let key_expires = netmap.self_key_expiry().map(|t| {
                    let left = t.duration_since(SystemTime::now()).unwrap_or_default();
                    tokio::time::Instant::now() + left
                });
                let frame = tokio::select! {
                    // Our key expires even when control sends nothing (Go has a timer too).
                    _ = tokio::time::sleep_until(key_expires.unwrap_or_else(far_future)), if key_expires.is_some() => {
                        self.identity.renew_node_key(self.state)?;
                        return Err(ControlError::Transient(
                            "our node key expired; re-registering with a new one".into(),
                        ));
                    }
                    frame = tokio::time::timeout(watchdog, body.frame()) => frame.map_err(|_| {
                        ControlError::Transient(format!(
                            "map response long-poll timed out: nothing for {watchdog:?}"
                        ))
                    })?,
                    ended = &mut self.conn.driver => {
                        let why = match ended {
                            Ok(Ok(())) => "closed".to_string(),
                            Ok(Err(e)) => error_chain(&e),
                            Err(e) => e.to_string(),
                        };
                        return Err(ControlError::Transient(format!("control connection lost: {why}")));
                    }
                    local = local_changed(&mut self.local_rx) => {
                        tracing::info!(
                            home_derp = local.home_derp,
                            endpoints = ?local.endpoints.iter().map(|(a, _)| *a).collect::<Vec<_>>(),
                            "reporting our network to control"
                        );
                        self.hostinfo = with_net_info(self.hostinfo.clone(), &local);
                        self.local = local;
                        send_lite_update(self.conn, self.identity, &self.hostinfo, &self.local);
                        continue;
                    }
                };
                let Some(frame) = frame else {
                    return match decoder.buffered() {
                        0 => Ok(()),
                        n => Err(ControlError::Transient(format!(
                            "map stream ended inside a message ({n} bytes of it received)"
                        ))),
                    };
                };
                let frame =
                    frame.map_err(|e| ControlError::transient("reading the map stream", e))?;
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                decoder.push(&data);
                while let Some(msg) = decoder
                    .next_frame()
                    .map_err(|e| ControlError::transient("bad map message", e))?
                {
                    if let Some(plan) = &msg.control_dial_plan {
                        crate::control::dial_plan::remember(self.conn.authority(), plan);
                    }
                    handle_map_message(
                        msg,
                        &mut netmap,
                        self.identity,
                        self.state,
                        self.status,
                        self.session,
                    )?;
                    if let Some(link) = self.link {
                        if netmap.has_self() {
                            link.netmap
                                .send_replace(Some(Arc::new(netmap.netmap().clone())));
                        }
                    }
                }
            }
        }
    }

    /// The data plane's next news; never resolves without an engine or after it is gone.
    async fn local_changed(rx: &mut Option<watch::Receiver<LocalNetInfo>>) -> LocalNetInfo {
        if let Some(r) = rx {
            if r.changed().await.is_ok() {
                return r.borrow_and_update().clone();
            }
            *rx = None; // the engine is gone: stop watching
        }
        std::future::pending().await
    }

    /// Hostinfo with `NetInfo` from the data plane (none while nothing is known: home 0 and
    /// no measurement).
    pub(super) fn with_net_info(mut hostinfo: Hostinfo, local: &LocalNetInfo) -> Hostinfo {
        hostinfo.services = local.services.clone();
        if !local.routable_ips.is_empty() || local.home_derp != 0 || local.working_udp.is_some() {
            // The engine knows the prefs' routes once it runs; before that the config's stand.
            hostinfo.routable_ips = local.routable_ips.clone();
        }
        if local.home_derp == 0 && local.working_udp.is_none() {
            return hostinfo;
        }
        let mut info = hostinfo.net_info.take().unwrap_or_default();
        info.preferred_derp = i32::from(local.home_derp);
        info.working_udp = local.working_udp;
        info.mapping_varies_by_dest_ip = local.mapping_varies;
        info.working_ipv6 = local.working_ipv6;
        info.os_has_ipv6 = local.os_has_ipv6;
        info.derp_latency = local.derp_latency.clone();
        hostinfo.net_info = Some(info);
        hostinfo
    }

    fn far_future() -> tokio::time::Instant {
        tokio::time::Instant::now() + Duration::from_secs(86_400 * 365)
    }

    fn handle_map_message(
        msg: MapResponse,
        netmap: &mut MapState,
        identity: &mut NodeIdentity,
        state: &StateDir,
        status: &watch::Sender<Status>,
        session: &mut Session,
    ) -> Result<(), ControlError> {
        if msg.keep_alive {
            tracing::trace!("map keep-alive");
            return Ok(());
        }
        let first = !netmap.has_self();
        netmap.apply(&msg);
        if first && !netmap.has_self() {
            return Err(ControlError::Transient(
                "initial MapResponse lacked node".into(),
            ));
        }
        if netmap.self_key_expired(SystemTime::now()) {
            identity.renew_node_key(state)?;
            return Err(ControlError::Transient(
                "our node key expired; re-registering with a new one".into(),
            ));
        }
        let now = SystemTime::now();
        status.send_modify(|s| {
            if first {
                session.connected(s, now);
            }
            netmap.publish(s, identity);
        });
        Ok(())
    }

    /// Register outcome as the Go client classifies it.
    #[derive(Debug, PartialEq, Eq)]
    pub(super) enum RegisterOutcome {
        Accepted,
        NodeKeyExpired,
        /// Control wants a person to visit this URL (checked to be http or https).
        NeedsAuth(String),
        Refused(String),
    }

    pub(super) fn register_outcome(r: &RegisterResponse) -> RegisterOutcome {
        if !r.error.is_empty() {
            RegisterOutcome::Refused(r.error.clone())
        } else if !r.auth_url.is_empty() {
            match http::Uri::try_from(r.auth_url.as_str()) {
                Ok(uri)
                    if matches!(uri.scheme_str(), Some("http" | "https"))
                        && uri.host().is_some() =>
                {
                    RegisterOutcome::NeedsAuth(r.auth_url.clone())
                }
                _ => RegisterOutcome::Refused(format!(
                    "control sent a login URL that is not http(s), refused: {:?}",
                    r.auth_url
                )),
            }
        } else if r.node_key_expired {
            RegisterOutcome::NodeKeyExpired
        } else if r
            .node_key_signature
            .as_deref()
            .is_some_and(|s| !s.is_empty())
        {
            RegisterOutcome::Refused(
                "control requires tailnet lock signatures (unsupported)".into(),
            )
        } else {
            RegisterOutcome::Accepted
        }
    }

    pub(super) fn map_request(
        identity: &NodeIdentity,
        hostinfo: &Hostinfo,
        local: &LocalNetInfo,
        stream: bool,
    ) -> Vec<u8> {
        let req = MapRequest {
            version: i32::from(CAPABILITY_VERSION),
            compress: "zstd".into(),
            keep_alive: true,
            node_key: identity.node.public(),
            disco_key: identity.disco.public(),
            stream,
            omit_peers: !stream,
            hostinfo: Some(hostinfo.clone()),
            endpoints: local.endpoints.iter().map(|(a, _)| a.to_string()).collect(),
            endpoint_types: local.endpoints.iter().map(|(_, t)| *t).collect(),
            ..Default::default()
        };
        serde_json::to_vec(&req).unwrap_or_default()
    }

    pub(super) fn hostinfo(config: &ControlConfig) -> Hostinfo {
        Hostinfo {
            ipn_version: format!("tern-{}", env!("CARGO_PKG_VERSION")),
            backend_log_id: config.backend_log_id.clone(),
            os: "linux".into(),
            os_version: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|v| v.trim().to_string())
                .unwrap_or_default(),
            package: "tern".into(),
            hostname: config.hostname.clone(),
            routable_ips: config.routable_ips.clone(),
            go_arch: std::env::consts::ARCH.into(),
            ..Default::default()
        }
    }
}

/// The netmap as the control client keeps it for one map stream (a new stream starts empty).
#[derive(Debug, Default)]
pub struct MapState {
    netmap: NetworkMap,
}

impl MapState {
    pub fn has_self(&self) -> bool {
        self.netmap.self_node.is_some()
    }

    /// The netmap so far.
    pub fn netmap(&self) -> &NetworkMap {
        &self.netmap
    }

    pub fn apply(&mut self, msg: &MapResponse) {
        self.netmap.apply(msg);
    }

    /// Self `KeyExpiry` in the past means control will not accept this node key any more.
    /// When our node key expires, if control set an expiry.
    pub fn self_key_expiry(&self) -> Option<SystemTime> {
        self.netmap.self_node.as_ref()?.key_expiry_time()
    }

    pub fn self_key_expired(&self, now: SystemTime) -> bool {
        let Some(expiry) = self
            .netmap
            .self_node
            .as_ref()
            .and_then(|n| n.key_expiry.datetime())
        else {
            return false;
        };
        time::OffsetDateTime::from(now) > expiry
    }

    pub fn publish(&self, s: &mut Status, identity: &NodeIdentity) {
        if let Some(me) = &self.netmap.self_node {
            publish_nodes(s, me, self.netmap.peers.values(), identity);
        }
    }
}

/// Fill the status snapshot's `self` and `peers` from netmap nodes.
pub fn publish_nodes<'a>(
    s: &mut Status,
    self_node: &Node,
    peers: impl Iterator<Item = &'a Node>,
    identity: &NodeIdentity,
) {
    // The data plane fills our own peer API URLs (where it listens).
    let own_peerapi = s
        .self_node
        .as_ref()
        .map(|me| me.peerapi_urls.clone())
        .unwrap_or_default();
    s.self_node = Some(SelfStatus {
        name: self_node.name.trim_end_matches('.').to_string(),
        hostname: self_node.hostinfo.hostname.clone(),
        node_id: self_node.id,
        stable_id: self_node.stable_id.clone(),
        user_id: self_node.user,
        node_key: identity.node.public().to_string(),
        machine_key: identity.machine.public().to_string(),
        disco_key: identity.disco.public().to_string(),
        tailnet_ips: tailnet_ips(&self_node.addresses),
        key_expiry: go_time(&self_node.key_expiry),
        home_derp: region(self_node.effective_home_derp()),
        peerapi_urls: own_peerapi,
    });
    let mut peers: Vec<PeerStatus> = peers.map(peer_status).collect();
    // The data plane fills path and counters between netmaps; keep them for peers still here.
    for p in &mut peers {
        if let Some(old) = s.peers.iter().find(|o| o.node_key == p.node_key) {
            p.path = old.path.clone();
            p.endpoint = old.endpoint.clone();
            p.derp_region = old.derp_region;
            p.latency_ms = old.latency_ms;
            p.rx_bytes = old.rx_bytes;
            p.tx_bytes = old.tx_bytes;
            p.last_handshake_at = old.last_handshake_at.clone();
            p.path_reason = old.path_reason.clone();
            p.last_pong_at = old.last_pong_at.clone();
            p.path_history = old.path_history.clone();
        }
    }
    peers.sort_by(|a, b| a.name.cmp(&b.name).then(a.node_id.cmp(&b.node_id)));
    s.peers = peers;
}

fn peer_status(node: &Node) -> PeerStatus {
    let os = node.hostinfo.os.clone();
    PeerStatus {
        name: node.name.trim_end_matches('.').to_string(),
        hostname: node.hostinfo.hostname.clone(),
        node_id: node.id,
        stable_id: node.stable_id.clone(),
        node_key: node.key.to_string(),
        disco_key: (!node.disco_key.is_zero()).then(|| node.disco_key.to_string()),
        tailnet_ips: tailnet_ips(&node.addresses),
        os: (!os.is_empty()).then_some(os),
        online: node.online,
        last_seen: node.last_seen.as_ref().and_then(go_time),
        key_expiry: go_time(&node.key_expiry),
        expired: node.key_expired(SystemTime::now()),
        home_derp: region(node.effective_home_derp()),
        endpoints: node.endpoints.iter().map(|e| e.to_string()).collect(),
        peerapi_urls: peerapi_urls(node),
        exit_node_option: crate::routing::offers_exit_node(node),
        subnet_routes: crate::routing::subnet_routes(node)
            .map(ToString::to_string)
            .collect(),
        // Filled by the data plane.
        ..Default::default()
    }
}

/// The peer API URLs a node's Hostinfo announces, for its own addresses.
fn peerapi_urls(node: &Node) -> Vec<String> {
    let addrs: Vec<std::net::IpAddr> = node
        .addresses
        .iter()
        .filter(|p| p.prefix_len() == p.max_prefix_len())
        .map(|p| p.addr())
        .collect();
    crate::peerapi::urls(&addrs, &node.hostinfo.services)
}

/// Single-IP prefixes only (only those are the node's own addresses), IPv4 first.
fn tailnet_ips(addresses: &[ipnet::IpNet]) -> Vec<String> {
    let mut ips: Vec<std::net::IpAddr> = addresses
        .iter()
        .filter(|p| p.prefix_len() == p.max_prefix_len())
        .map(|p| p.addr())
        .collect();
    ips.sort_by_key(|ip| ip.is_ipv6());
    ips.iter().map(|ip| ip.to_string()).collect()
}

fn go_time(t: &GoTime) -> Option<String> {
    t.datetime().and_then(|t| {
        t.format(&time::format_description::well_known::Rfc3339)
            .ok()
    })
}

fn region(id: i32) -> Option<u16> {
    u16::try_from(id).ok().filter(|r| *r != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::DataPlaneStatus;

    fn status() -> Status {
        Status::initial(
            DataPlaneStatus {
                tun: "t".into(),
                port: 1,
                ..Default::default()
            },
            SystemTime::UNIX_EPOCH,
        )
    }

    #[test]
    fn transient_failures_back_off_and_show_why() {
        let mut session = Session::new("http://127.0.0.1:9".into());
        let mut s = status();
        session.connecting(&mut s);
        assert_eq!(s.backend_state, BackendState::Starting);
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let err = ControlError::transient("dial 127.0.0.1:9", "connection refused");
        assert_eq!(
            session.failed(&mut s, &err, now, 1.0),
            Next::RetryAfter(Duration::from_millis(500))
        );
        assert_eq!(
            session.failed(&mut s, &err, now, 1.0),
            Next::RetryAfter(Duration::from_secs(1))
        );
        assert_eq!(s.control.state, ControlState::Backoff);
        assert_eq!(s.control.failed_attempts, 2);
        assert_eq!(
            s.control.last_error.as_ref().unwrap().message,
            "dial 127.0.0.1:9: connection refused"
        );
        assert_eq!(
            s.control.next_attempt_at.as_deref(),
            Some("2023-11-14T22:13:21Z")
        );
        session.connected(&mut s, now);
        assert_eq!(s.control.state, ControlState::Connected);
        assert_eq!(s.control.failed_attempts, 0);
        assert!(s.control.last_error.is_none());
        assert_eq!(
            session.failed(&mut s, &err, now, 1.0),
            Next::RetryAfter(Duration::from_millis(500))
        );
    }

    #[test]
    fn refused_login_stops_and_needs_login() {
        let mut session = Session::new("http://127.0.0.1:9".into());
        let mut s = status();
        let err = ControlError::LoginRefused("invalid authkey".into());
        assert_eq!(
            session.failed(&mut s, &err, SystemTime::now(), 0.5),
            Next::Stop
        );
        assert_eq!(s.backend_state, BackendState::NeedsLogin);
        assert_eq!(s.control.state, ControlState::LoginFailed);
        assert!(s
            .control
            .last_error
            .as_ref()
            .unwrap()
            .message
            .contains("invalid authkey"));
    }

    #[test]
    fn identity_keeps_machine_and_node_keys_but_not_disco() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::open(tmp.path()).unwrap();
        let a = NodeIdentity::load(&state).unwrap();
        let b = NodeIdentity::load(&state).unwrap();
        assert_eq!(a.machine.public(), b.machine.public());
        assert_eq!(a.node.public(), b.node.public());
        assert_ne!(a.disco.public(), b.disco.public());
        assert_ne!(a.machine.public().as_bytes(), a.node.public().as_bytes());
    }

    fn node(id: i64, name: &str, addrs: &[&str]) -> Node {
        let mut n = Node {
            id,
            stable_id: format!("n{id}"),
            name: format!("{name}.tailnet.example."),
            addresses: addrs.iter().map(|a| a.parse().unwrap()).collect(),
            ..Default::default()
        };
        n.hostinfo.hostname = name.into();
        n.hostinfo.os = "linux".into();
        n
    }

    fn identity() -> NodeIdentity {
        NodeIdentity {
            machine: MachinePrivate::generate(),
            node: NodePrivate::generate(),
            disco: DiscoPrivate::generate(),
            old_node: None,
        }
    }

    #[test]
    fn nodes_become_status_entries() {
        let id = identity();
        let me = node(1, "n1", &["fd7a:115c:a1e0::1/128", "100.64.0.1/32"]);
        let mut p2 = node(2, "n2", &["100.64.0.2/32", "10.0.0.0/24"]);
        p2.online = Some(false);
        p2.last_seen = Some(GoTime::from_unix(1_700_000_000));
        p2.home_derp = 900;
        p2.endpoints = vec!["10.0.0.2:41641".parse().unwrap()];
        let p3 = node(3, "a3", &["100.64.0.3/32"]);
        let mut s = status();
        publish_nodes(&mut s, &me, [&p2, &p3].into_iter(), &id);
        let me = s.self_node.as_ref().unwrap();
        assert_eq!(me.name, "n1.tailnet.example");
        assert_eq!(
            me.tailnet_ips,
            ["100.64.0.1", "fd7a:115c:a1e0::1"],
            "IPv4 first"
        );
        assert_eq!(me.node_key, id.node.public().to_string());
        assert_eq!(me.disco_key, id.disco.public().to_string());
        assert_eq!(s.peers[0].hostname, "a3", "sorted by name");
        let p = &s.peers[1];
        assert_eq!(
            p.tailnet_ips,
            ["100.64.0.2"],
            "subnet routes are not tailnet IPs"
        );
        assert_eq!(p.online, Some(false));
        assert_eq!(p.last_seen.as_deref(), Some("2023-11-14T22:13:20Z"));
        assert_eq!(p.home_derp, Some(900));
        assert_eq!(p.endpoints, ["10.0.0.2:41641"]);
        assert_eq!(p.disco_key, None, "zero disco key shows as null");
    }

    #[test]
    fn register_outcomes() {
        use crate::control::tailcfg::RegisterResponse;
        use connection::{register_outcome, RegisterOutcome};
        let ok = RegisterResponse {
            machine_authorized: true,
            ..Default::default()
        };
        assert_eq!(register_outcome(&ok), RegisterOutcome::Accepted);
        let bad = RegisterResponse {
            error: "invalid authkey".into(),
            ..Default::default()
        };
        assert_eq!(
            register_outcome(&bad),
            RegisterOutcome::Refused("invalid authkey".into())
        );
        let expired = RegisterResponse {
            node_key_expired: true,
            ..Default::default()
        };
        assert_eq!(register_outcome(&expired), RegisterOutcome::NodeKeyExpired);
        let url = RegisterResponse {
            auth_url: "http://x/register/1".into(),
            ..Default::default()
        };
        assert_eq!(
            register_outcome(&url),
            RegisterOutcome::NeedsAuth("http://x/register/1".into())
        );
        for bad in ["javascript:alert(1)", "file:///etc/passwd", "x/register/1"] {
            let url = RegisterResponse {
                auth_url: bad.into(),
                ..Default::default()
            };
            assert!(
                matches!(register_outcome(&url), RegisterOutcome::Refused(m) if m.contains("not http(s)")),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_stale_copy_picks_up_a_renewed_node_key() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::open(tmp.path()).unwrap();
        let mut daemon_copy = NodeIdentity::load(&state).unwrap();
        let mut task_copy = daemon_copy.clone();
        task_copy.renew_node_key(&state).unwrap();
        daemon_copy.refresh_node_key(&state).unwrap();
        assert_eq!(daemon_copy.node.public(), task_copy.node.public());
        assert_eq!(
            daemon_copy.disco.public(),
            task_copy.disco.public(),
            "disco key kept"
        );
    }

    #[test]
    fn renewing_the_node_key_keeps_the_first_old_key_and_persists() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::open(tmp.path()).unwrap();
        let mut id = NodeIdentity::load(&state).unwrap();
        let original = id.node.public();
        id.renew_node_key(&state).unwrap();
        id.renew_node_key(&state).unwrap();
        assert_eq!(id.old_node, Some(original));
        assert_ne!(id.node.public(), original);
        assert_eq!(
            NodeIdentity::load(&state).unwrap().node.public(),
            id.node.public()
        );
    }

    #[test]
    fn home_derp_goes_into_hostinfo_netinfo() {
        let config = ControlConfig {
            url: "http://127.0.0.1:1".into(),
            auth_key: None,
            hostname: "n1".into(),
            backend_log_id: "ab".repeat(32),
            watchdog: MAP_WATCHDOG,
            routable_ips: Vec::new(),
        };
        let unknown = LocalNetInfo::default();
        let hi = connection::with_net_info(connection::hostinfo(&config), &unknown);
        assert!(hi.net_info.is_none(), "nothing measured: no NetInfo");
        let local = LocalNetInfo {
            home_derp: 900,
            working_udp: Some(true),
            mapping_varies: Some(true),
            derp_latency: [("900-v4".to_string(), 0.0012)].into(),
            ..Default::default()
        };
        let hi = connection::with_net_info(hi, &local);
        let json = serde_json::to_value(&hi).unwrap();
        assert_eq!(json["NetInfo"]["PreferredDERP"], 900, "{json}");
        assert_eq!(json["NetInfo"]["WorkingUDP"], true, "{json}");
        assert_eq!(json["NetInfo"]["MappingVariesByDestIP"], true, "{json}");
        assert_eq!(json["NetInfo"]["DERPLatency"]["900-v4"], 0.0012, "{json}");
        assert_eq!(json["Hostname"], "n1");
    }

    #[test]
    fn map_requests_follow_the_spec() {
        let id = identity();
        let config = ControlConfig {
            url: "http://127.0.0.1:1".into(),
            auth_key: None,
            hostname: "n1".into(),
            backend_log_id: "ab".repeat(32),
            watchdog: MAP_WATCHDOG,
            routable_ips: Vec::new(),
        };
        let hi = connection::hostinfo(&config);
        let local = LocalNetInfo {
            endpoints: vec![
                (
                    "198.18.0.3:41641".parse().unwrap(),
                    crate::control::tailcfg::EndpointType::STUN,
                ),
                (
                    "10.1.0.2:41641".parse().unwrap(),
                    crate::control::tailcfg::EndpointType::LOCAL,
                ),
            ],
            ..Default::default()
        };
        let stream: serde_json::Value =
            serde_json::from_slice(&connection::map_request(&id, &hi, &local, true)).unwrap();
        assert_eq!(
            stream["Endpoints"],
            serde_json::json!(["198.18.0.3:41641", "10.1.0.2:41641"])
        );
        assert_eq!(stream["EndpointTypes"], serde_json::json!([2, 1]));
        assert_eq!(stream["Version"], 130);
        assert_eq!(stream["Compress"], "zstd");
        assert_eq!(stream["KeepAlive"], true);
        assert_eq!(stream["Stream"], true);
        assert_eq!(stream["NodeKey"], id.node.public().to_string());
        assert_eq!(stream["DiscoKey"], id.disco.public().to_string());
        assert_eq!(stream["Hostinfo"]["Hostname"], "n1");
        assert_eq!(stream["Hostinfo"]["BackendLogID"], "ab".repeat(32));
        assert!(stream.get("OmitPeers").is_none_or(|v| v == false));
        let lite: serde_json::Value =
            serde_json::from_slice(&connection::map_request(&id, &hi, &local, false)).unwrap();
        assert_eq!(lite["Stream"], false);
        assert_eq!(lite["Endpoints"], stream["Endpoints"]);
        assert_eq!(lite["OmitPeers"], true);
    }

    #[test]
    fn self_key_expiry_is_detected() {
        let mut map = MapState::default();
        let mut me = node(1, "n1", &["100.64.0.1/32"]);
        me.key_expiry = GoTime::from_unix(1_000);
        map.apply(&MapResponse {
            node: Some(me),
            ..Default::default()
        });
        assert!(map.has_self());
        assert!(map.self_key_expired(SystemTime::UNIX_EPOCH + Duration::from_secs(2_000)));
        assert!(!map.self_key_expired(SystemTime::UNIX_EPOCH + Duration::from_secs(500)));
    }

    mod against_stub {
        use super::*;
        use crate::control::framing::{encode_frame, Compression};
        use crate::control::test_stub::{Answer, Script, Stub};
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;

        type Handler = Arc<dyn Fn(&str, &[u8]) -> Answer + Send + Sync>;

        /// Register answers `register`; the streaming map answers `map`; lite updates get 200.
        fn script(register: Answer, map: Answer) -> Script {
            let handler: Handler = Arc::new(move |path, body| {
                let req: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
                match path {
                    "/machine/register" => register.clone(),
                    "/machine/map" if req["Stream"] == true => map.clone(),
                    _ => Answer::ok(""),
                }
            });
            Script::Http2 {
                early_payload: true,
                handler,
            }
        }

        fn zstd(json: &str) -> Vec<u8> {
            encode_frame(json.as_bytes(), Compression::Zstd).unwrap()
        }

        struct Run {
            result: Result<(), ControlError>,
            status: Status,
            identity: NodeIdentity,
            stub: Stub,
            _state_dir: tempfile::TempDir,
        }

        async fn run_against(script: Script) -> Run {
            let stub = Stub::start(script).await;
            let tmp = tempfile::tempdir().unwrap();
            let state = StateDir::open(tmp.path()).unwrap();
            let mut identity = NodeIdentity::load(&state).unwrap();
            let config = ControlConfig {
                url: stub.url.clone(),
                auth_key: Some("tskey-test".into()),
                hostname: "n1".into(),
                backend_log_id: "ab".repeat(32),
                watchdog: Duration::from_millis(500),
                routable_ips: Vec::new(),
            };
            let (tx, _rx) = watch::channel(status());
            let mut session = Session::new(config.url.clone());
            let result = tokio::time::timeout(
                Duration::from_secs(20),
                connection::run_once(&config, &mut identity, &state, &tx, &mut session, None),
            )
            .await
            .expect("run_once must not hang");
            let status = tx.borrow().clone();
            Run {
                result,
                status,
                identity,
                stub,
                _state_dir: tmp,
            }
        }

        fn transient(run: &Run) -> String {
            match &run.result {
                Err(ControlError::Transient(m)) => m.clone(),
                other => panic!("expected a retryable error, got {other:?}"),
            }
        }

        const SELF_ONLY: &str = r#"{"Node":{"ID":1,"StableID":"s1","Name":"n1.t.example.","Addresses":["100.64.0.1/32","fd7a:115c:a1e0::1/128"],"MachineAuthorized":true,"Hostinfo":{"Hostname":"n1"}},"Peers":[{"ID":2,"StableID":"s2","Name":"n2.t.example.","Key":"nodekey:2222222222222222222222222222222222222222222222222222222222222222","Addresses":["100.64.0.2/32"],"Online":true,"Hostinfo":{"Hostname":"n2","OS":"linux"}}]}"#;

        #[tokio::test]
        async fn full_map_is_published_then_a_closed_stream_is_reported() {
            let mut body = zstd(r#"{"KeepAlive":true}"#);
            body.extend(zstd(SELF_ONLY));
            body.extend(zstd(r#"{"KeepAlive":true}"#));
            let run = run_against(script(Answer::ok("{}"), Answer::ok(body))).await;
            assert!(
                run.result.is_ok(),
                "a cleanly ended stream: {:?}",
                run.result
            );
            let me = run.status.self_node.as_ref().expect("self published");
            assert_eq!(me.tailnet_ips, ["100.64.0.1", "fd7a:115c:a1e0::1"]);
            assert_eq!(run.status.peers.len(), 1);
            assert_eq!(run.status.peers[0].online, Some(true));
            assert_eq!(run.status.backend_state, BackendState::Running);
            assert_eq!(run.status.control.map_sessions, 1);
            let reg = &run.stub.requests.lock().unwrap()[0];
            assert_eq!(reg.0, "/machine/register");
            let reg: serde_json::Value = serde_json::from_slice(&reg.1).unwrap();
            assert_eq!(reg["Auth"]["AuthKey"], "tskey-test");
            assert_eq!(reg["NodeKey"], run.identity.node.public().to_string());
            assert_eq!(reg["OldNodeKey"], NodePublic::zero().to_string());
        }

        #[tokio::test]
        async fn bad_register_answers() {
            let run = run_against(script(Answer::ok("{nope"), Answer::ok(""))).await;
            assert!(
                transient(&run).contains("POST /machine/register: bad JSON"),
                "{}",
                transient(&run)
            );
            let run = run_against(script(
                Answer {
                    status: 500,
                    body: b"boom".to_vec(),
                    hold_open: false,
                },
                Answer::ok(""),
            ))
            .await;
            assert_eq!(
                transient(&run),
                "POST /machine/register: HTTP 500 Internal Server Error: boom"
            );
            let refused = Answer::ok(r#"{"Error":"invalid authkey"}"#);
            let run = run_against(script(refused, Answer::ok(""))).await;
            assert!(
                matches!(&run.result, Err(ControlError::LoginRefused(m)) if m == "invalid authkey")
            );
            assert!(
                run.stub.paths().iter().all(|p| p != "/machine/map"),
                "no map poll after a refusal"
            );
        }

        #[tokio::test]
        async fn expired_node_key_is_renewed_and_registered_with_old_key() {
            let calls = Arc::new(AtomicUsize::new(0));
            let counter = calls.clone();
            let handler: Handler = Arc::new(move |path, _| match path {
                "/machine/register" if counter.fetch_add(1, Ordering::SeqCst) == 0 => {
                    Answer::ok(r#"{"NodeKeyExpired":true}"#)
                }
                "/machine/register" => Answer::ok("{}"),
                _ => Answer {
                    status: 404,
                    body: b"node not found".to_vec(),
                    hold_open: false,
                },
            });
            let run = run_against(Script::Http2 {
                early_payload: false,
                handler,
            })
            .await;
            assert!(
                transient(&run).contains("POST /machine/map: HTTP 404"),
                "{}",
                transient(&run)
            );
            let reqs = run.stub.requests.lock().unwrap().clone();
            let regs: Vec<serde_json::Value> = reqs
                .iter()
                .filter(|(p, _)| p == "/machine/register")
                .map(|(_, b)| serde_json::from_slice(b).unwrap())
                .collect();
            assert_eq!(regs.len(), 2);
            assert_eq!(regs[1]["OldNodeKey"], regs[0]["NodeKey"]);
            assert_ne!(regs[1]["NodeKey"], regs[0]["NodeKey"]);
            assert_eq!(regs[1]["NodeKey"], run.identity.node.public().to_string());
            assert_eq!(run.identity.old_node, None, "cleared once accepted");
        }

        #[tokio::test]
        async fn bad_map_streams_are_retryable_errors_with_context() {
            let cases: Vec<(Vec<u8>, &str)> = vec![
                (vec![0xff, 0xff, 0xff, 0x7f], "exceeds the limit"),
                (
                    {
                        let mut f = 5u32.to_le_bytes().to_vec();
                        f.extend_from_slice(b"hello");
                        f
                    },
                    "zstd",
                ),
                (zstd("not json"), "map JSON"),
                (zstd(r#"{"Peers":"wrong type"}"#), "map JSON"),
                (zstd(r#"{"Domain":"x"}"#), "initial MapResponse lacked node"),
            ];
            for (body, want) in cases {
                let run = run_against(script(Answer::ok("{}"), Answer::ok(body))).await;
                let err = transient(&run);
                assert!(err.contains(want), "want {want:?} in {err:?}");
                assert!(run.status.self_node.is_none());
            }
            let truncated = zstd(SELF_ONLY)[..10].to_vec();
            let run = run_against(script(Answer::ok("{}"), Answer::ok(truncated))).await;
            let err = transient(&run);
            assert!(err.contains("ended inside a message (10 bytes"), "{err}");
            assert!(
                run.status.self_node.is_none(),
                "a truncated message is not applied"
            );
        }

        #[tokio::test]
        async fn silent_map_stream_trips_the_watchdog() {
            let mut map = Answer::ok(zstd(SELF_ONLY));
            map.hold_open = true;
            let run = run_against(script(Answer::ok("{}"), map)).await;
            let err = transient(&run);
            assert!(err.contains("long-poll timed out"), "{err}");
            assert!(
                run.status.self_node.is_some(),
                "the map before the silence was applied"
            );
        }

        #[tokio::test]
        async fn expired_self_key_in_the_map_renews_the_node_key() {
            let expired = SELF_ONLY.replace(
                r#""MachineAuthorized":true"#,
                r#""MachineAuthorized":true,"KeyExpiry":"2001-01-01T00:00:00Z""#,
            );
            let run = run_against(script(Answer::ok("{}"), Answer::ok(zstd(&expired)))).await;
            let err = transient(&run);
            assert!(err.contains("node key expired; re-registering"), "{err}");
            let reg: serde_json::Value =
                serde_json::from_slice(&run.stub.requests.lock().unwrap()[0].1).unwrap();
            let first_key = reg["NodeKey"].as_str().unwrap().to_string();
            assert_eq!(
                run.identity.old_node.map(|k| k.to_string()),
                Some(first_key.clone())
            );
            assert_ne!(run.identity.node.public().to_string(), first_key);
        }
    }
}
