//! The daemon's control session: keep a ts2021 connection to the coordination server, register,
//! hold the streaming map poll open, and publish what it learns into the [`Status`] snapshot.
//!
//! Shape: [`Session`] is the pure part (what state are we in, what to publish, how long to back
//! off); [`run`] is the one I/O task that dials, registers and reads the map stream, handing
//! each outcome to the session.

use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::control::backoff::Backoff;
use crate::keys::{DiscoPrivate, MachinePrivate, NodePrivate};
use crate::state::{StateDir, StateError};
use crate::status::{rfc3339, BackendState, ControlState, ErrorReport, Status};

/// What the daemon tells the control client to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlConfig {
    /// Coordination server URL without trailing slash.
    pub url: String,
    pub auth_key: Option<String>,
    pub hostname: String,
}

/// This node's keys: machine and node keys from the state directory, a disco key made fresh for
/// this process (spec §8.6).
#[derive(Clone)]
pub struct NodeIdentity {
    pub machine: MachinePrivate,
    pub node: NodePrivate,
    pub disco: DiscoPrivate,
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
        })
    }
}

/// Why a control attempt ended.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Worth retrying: control down, connection lost, bad bytes on the wire, a timeout.
    #[error("{0}")]
    Transient(String),
    /// Control refused the login (e.g. a bad auth key); retrying without new input won't help.
    #[error("login refused: {0}")]
    LoginRefused(String),
}

impl ControlError {
    pub fn transient(context: &str, err: impl std::fmt::Display) -> Self {
        Self::Transient(format!("{context}: {err}"))
    }
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

    /// The map stream is open and the first netmap arrived.
    pub fn connected(&mut self, s: &mut Status, now: SystemTime) {
        self.backoff.succeeded();
        s.control.state = ControlState::Connected;
        s.control.connected_since = Some(rfc3339(now));
        s.control.failed_attempts = 0;
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
) -> JoinHandle<()> {
    tokio::spawn(run(config, identity, state, status))
}

/// The control I/O task: attempt, publish, back off, repeat.
pub async fn run(
    config: ControlConfig,
    mut identity: NodeIdentity,
    state: StateDir,
    status: watch::Sender<Status>,
) {
    let mut session = Session::new(config.url.clone());
    loop {
        status.send_modify(|s| session.connecting(s));
        let err = match connection::run_once(&config, &mut identity, &state, &status, &mut session)
            .await
        {
            Ok(()) => ControlError::Transient("control closed the map stream".into()),
            Err(e) => e,
        };
        tracing::warn!(url = %config.url, error = %err, "control connection failed");
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

    /// One connection's life: `/key`, dial, register, map stream until it ends.
    pub(super) async fn run_once(
        config: &ControlConfig,
        _identity: &mut NodeIdentity,
        _state: &StateDir,
        _status: &watch::Sender<Status>,
        _session: &mut Session,
    ) -> Result<(), ControlError> {
        let url = super::super::dial::ControlUrl::parse(&config.url)?;
        let _key = super::super::dial::fetch_key_body(&url, 130).await?;
        Err(ControlError::Transient(format!(
            "{}: ts2021 client not wired yet",
            config.url
        )))
    }
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
                active: false,
                note: None,
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
}
