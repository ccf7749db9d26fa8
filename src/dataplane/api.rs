//! What the rest of the daemon asks a running engine: a disco ping for `tern ping`, a fresh
//! netcheck for `tern netcheck`. The engine owns the sockets and path machines, so these travel
//! as requests on a channel ([`EngineHandle`]) and come back as plain, serializable values.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::keys::NodePublic;

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

/// The answer to one disco ping (the JSON of `POST /localapi/v0/ping`, plus the peer's name
/// and IP that the LocalAPI fills in).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct PingResult {
    /// The peer's name and first tailnet IP (filled by the LocalAPI, not the engine).
    #[serde(default)]
    pub node_name: String,
    #[serde(default)]
    pub node_ip: String,
    /// How the pong came back: `direct`, `peer-relay` or `derp`; `null` with `error` set.
    pub path: Option<String>,
    /// `ip:port` the pong came from, for `direct` / `peer-relay`.
    pub endpoint: Option<String>,
    /// The DERP region the pong came through, for `derp`.
    pub derp_region: Option<u16>,
    /// That region's `RegionCode` (e.g. `lab`), for `via DERP(lab)`.
    pub derp_region_code: Option<String>,
    /// Round-trip time in milliseconds.
    pub latency_ms: Option<f64>,
    /// Why there is no answer (`timeout`, `unknown peer`, `peer has no disco key`).
    pub error: Option<String>,
}

/// A netcheck report (`tern netcheck --json`, and `netcheck` in the status snapshot).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct NetcheckReport {
    /// When the report finished (RFC 3339).
    pub at: String,
    /// Any STUN answer at all.
    pub udp: bool,
    /// A STUN answer over IPv4, and our address as the STUN servers saw it.
    pub ipv4: bool,
    pub global_v4: Option<String>,
    pub ipv6: bool,
    pub global_v6: Option<String>,
    /// Whether this host can use IPv6 at all.
    pub os_has_ipv6: bool,
    /// Our NAT maps one local port to different public ports per destination ("hard NAT");
    /// `null` when fewer than two STUN servers answered.
    pub mapping_varies_by_dest_ip: Option<bool>,
    /// Home DERP region (0 = none).
    pub preferred_derp: u16,
    /// Every region in the DERP map, by id.
    pub regions: Vec<RegionLatency>,
    /// Our endpoints as sent to control (`ip:port` and kind: `local`, `stun`).
    pub endpoints: Vec<EndpointReport>,
}

/// One region's measurement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct RegionLatency {
    pub id: u16,
    pub code: String,
    pub name: String,
    /// Milliseconds; `null` = no answer.
    pub latency_ms: Option<f64>,
}

/// One of our endpoints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct EndpointReport {
    pub addr: String,
    /// `local` (an interface address) or `stun` (as a STUN server saw us).
    pub kind: String,
}

/// Region id → milliseconds, as the status snapshot has it.
pub fn latency_map(report: &NetcheckReport) -> BTreeMap<u16, Option<f64>> {
    report
        .regions
        .iter()
        .map(|r| (r.id, r.latency_ms))
        .collect()
}
