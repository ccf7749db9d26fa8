//! The daemon's requests (`tern ping`, `tern netcheck`) inside the engine: pings wait for their
//! first pong or their deadline, netchecks for the next report.

use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::api;
use super::publish::millis;
use super::Engine;
use crate::keys::NodePublic;
use crate::paths;
use crate::report;

/// A `tern ping` waiting for its pong.
pub(super) struct PendingPing {
    pub(super) peer: NodePublic,
    pub(super) tx_ids: Vec<crate::disco::TxId>,
    pub(super) deadline: Instant,
    pub(super) reply: oneshot::Sender<report::PingResult>,
}

impl Engine {
    /// A request from the daemon (`tern ping`, `tern netcheck`).
    pub(super) fn on_request(&mut self, request: api::EngineRequest) {
        match request {
            api::EngineRequest::Ping {
                peer,
                timeout,
                reply,
            } => {
                let now = Instant::now();
                match self.paths.cli_ping(now, &peer) {
                    // No path yet (a peer that just joined has no home DERP until its first
                    // netcheck): like Go, the ping waits for its timeout; unlike Go, it is sent
                    // as soon as a netmap gives the peer a path.
                    Some(tx_ids) => self.pending_pings.push(PendingPing {
                        peer,
                        tx_ids,
                        deadline: now + timeout,
                        reply,
                    }),
                    None => {
                        let why = if self.peers.id_of(&peer).is_some() {
                            "the peer has no disco key (too old, or not connected to control)"
                        } else {
                            "unknown peer"
                        };
                        let _ = reply.send(report::PingResult {
                            error: Some(why.into()),
                            ..Default::default()
                        });
                    }
                }
            }
            api::EngineRequest::Netcheck { reply } => {
                self.pending_netchecks.push(reply);
                self.netcheck_trigger.notify_one();
            }
        }
    }

    /// A pong for a `tern ping`: the first one answers it.
    pub(super) fn answer_ping(
        &mut self,
        peer: NodePublic,
        tx_id: crate::disco::TxId,
        via: paths::PathSource,
        latency: Duration,
    ) {
        let Some(index) = self
            .pending_pings
            .iter()
            .position(|p| p.peer == peer && p.tx_ids.contains(&tx_id))
        else {
            return;
        };
        let ping = self.pending_pings.swap_remove(index);
        let mut result = report::PingResult {
            latency_ms: Some(millis(latency)),
            ..Default::default()
        };
        match via {
            paths::PathSource::Udp(addr) => {
                result.path = Some("direct".into());
                result.endpoint = Some(addr.to_string());
            }
            paths::PathSource::Relay(relay) => {
                result.path = Some("peer-relay".into());
                result.endpoint = Some(relay.to_string());
            }
            paths::PathSource::Derp { region } => {
                result.path = Some("derp".into());
                result.derp_region = Some(region);
                result.derp_region_code = self.derp_map.get(&region).map(|r| r.region_code.clone());
            }
        }
        let _ = ping.reply.send(result);
    }

    /// `tern ping`s that found no path to their peer: try again (after a netmap change).
    pub(super) fn send_unsent_pings(&mut self, now: Instant) {
        for ping in self
            .pending_pings
            .iter_mut()
            .filter(|p| p.tx_ids.is_empty())
        {
            if let Some(tx_ids) = self.paths.cli_ping(now, &ping.peer) {
                ping.tx_ids = tx_ids;
            }
        }
    }
}
