//! What the rest of the daemon asks a running engine: a disco ping for `tern ping`, a fresh
//! netcheck for `tern netcheck`. The engine owns the sockets and path machines, so these travel
//! as requests on a channel ([`EngineHandle`]) and come back as plain, serializable values.

use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::keys::NodePublic;
use crate::report::{NetcheckReport, PingResult};

/// How many requests may wait for the engine.
pub(super) const REQUEST_QUEUE: usize = 16;

/// A request to the engine task.
#[derive(Debug)]
pub(super) enum EngineRequest {
    Ping {
        peer: NodePublic,
        timeout: Duration,
        reply: oneshot::Sender<PingResult>,
    },
    Netcheck {
        reply: oneshot::Sender<NetcheckReport>,
    },
}

/// The engine stopped (or never started): nothing to ask.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the data plane is not running")]
pub struct EngineGone;

/// A cheap handle to a running engine.
#[derive(Debug, Clone)]
pub struct EngineHandle {
    pub(super) tx: mpsc::Sender<EngineRequest>,
}

impl EngineHandle {
    /// One disco ping to `peer` (sent on every path the peer's machine would use); resolves at
    /// the first pong, or after `timeout` with [`PingResult::error`] set.
    pub async fn ping(
        &self,
        peer: NodePublic,
        timeout: Duration,
    ) -> Result<PingResult, EngineGone> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(EngineRequest::Ping {
                peer,
                timeout,
                reply,
            })
            .await
            .map_err(|_| EngineGone)?;
        rx.await.map_err(|_| EngineGone)
    }

    /// Runs a netcheck now (STUN on the data plane's own UDP socket) and returns its report.
    pub async fn netcheck(&self) -> Result<NetcheckReport, EngineGone> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(EngineRequest::Netcheck { reply })
            .await
            .map_err(|_| EngineGone)?;
        rx.await.map_err(|_| EngineGone)
    }
}
