//! Hosting the peer relay server: started, restarted or stopped as the pref says; allocation
//! requests from peers answered over DERP when control grants them `cap/relay` towards us.

use super::Engine;
use crate::keys::NodePublic;
use crate::relay::io::RelayRuntime;
use crate::relay::ATTR_DISABLE_RELAY_SERVER;
use crate::status::RelayServerStatus;

impl Engine {
    /// Starts, restarts or stops the relay server to match the pref, unless control set
    /// `disable-relay-server` on this node (as Go, the pref is kept and applies once control
    /// lifts it). A port that cannot be bound leaves it off, with a warning (the node itself
    /// keeps running). Either way `relay_off` says why in status.
    pub(super) fn apply_relay_port(&mut self, want: Option<u16>) {
        // Any change of the pref restarts the server (as Go does); the same value keeps it.
        if self.relay.is_some() && want == self.relay_wanted && !self.relay_server_blocked {
            return;
        }
        self.relay_wanted = want;
        self.relay_off = None;
        if self.relay.take().is_some() {
            tracing::info!("relay server stopped");
        }
        let Some(port) = want else {
            return;
        };
        if self.relay_server_blocked {
            tracing::info!(
                port,
                "relay server off: control set disable-relay-server on this node"
            );
            self.relay_off = Some(format!(
                "control set the node attribute {ATTR_DISABLE_RELAY_SERVER} on this node"
            ));
            return;
        }
        match RelayRuntime::start(port, self.regions_tx.subscribe()) {
            Ok(relay) => {
                relay.set_static_addr_ports(self.relay_static.borrow().clone());
                self.relay = Some(relay);
            }
            Err(e) => {
                tracing::warn!(port, error = %e, "relay server not started: cannot bind its UDP port");
                self.relay_off = Some(format!("cannot bind udp/{port}: {e}"));
            }
        }
    }

    /// Control's `disable-relay-server` on our own node, from each netmap: the relay server
    /// stops (or starts again once it is lifted) without touching the pref.
    pub(super) fn update_relay_server_attr(&mut self, map: &crate::netmap::NetworkMap) {
        let blocked = map
            .self_node
            .as_ref()
            .is_some_and(|me| me.cap_map.contains_key(ATTR_DISABLE_RELAY_SERVER));
        if blocked != self.relay_server_blocked {
            self.relay_server_blocked = blocked;
            self.apply_relay_port(self.relay_wanted);
        }
    }

    /// New static endpoints: pushed to a running relay server without a restart (as Go does).
    pub(super) fn apply_relay_static(&mut self) {
        let endpoints = self.relay_static.borrow().clone();
        if let Some(relay) = &self.relay {
            relay.set_static_addr_ports(endpoints);
        }
    }

    /// An allocation request from `peer`: answered over DERP when our
    /// relay server runs and control granted the peer `tailscale.com/cap/relay` towards us.
    pub(super) fn answer_relay_allocation(
        &mut self,
        peer: NodePublic,
        request: &crate::disco::AllocateRequest,
    ) {
        let Some(relay) = &self.relay else {
            tracing::trace!(%peer, "relay: allocation request, but no relay server runs here");
            return;
        };
        if !self.peer_has_cap(&peer, crate::relay::CAP_RELAY) {
            tracing::debug!(%peer, "relay: allocation refused: the peer has no relay capability here");
            return;
        }
        match relay.allocate(request) {
            Ok(endpoint) => {
                let answer = crate::disco::Message::AllocateUdpRelayEndpointResponse(
                    crate::disco::AllocateResponse {
                        generation: request.generation,
                        endpoint,
                    },
                );
                if !self.paths.send_via_derp(&peer, answer) {
                    tracing::debug!(%peer, "relay: no DERP region to answer the allocation on");
                }
            }
            Err(e) => tracing::debug!(%peer, error = %e, "relay: allocation not answered"),
        }
    }

    /// Whether the packet filter grants `cap` from `peer` to us (Go `nodeHasCap`: the peer's
    /// first address against our first address of the same family).
    pub(super) fn peer_has_cap(&self, peer: &NodePublic, cap: &str) -> bool {
        let (Some(filter), Some(src)) = (&self.filter, self.first_ip.get(peer)) else {
            return false;
        };
        let Some(dst) = self
            .local
            .iter()
            .map(|net| net.addr())
            .find(|ip| ip.is_ipv4() == src.is_ipv4())
        else {
            return false;
        };
        filter.peer_caps(*src, dst).iter().any(|c| c == cap)
    }
}

/// The relay server's status with each leg's peer named when its disco key is a known peer's.
pub(super) fn relay_status(
    relay: &RelayRuntime,
    peers: &[crate::status::PeerStatus],
) -> RelayServerStatus {
    let mut status = relay.status();
    for leg in status.sessions.iter_mut().flat_map(|s| s.legs.iter_mut()) {
        leg.peer = peers
            .iter()
            .find(|p| p.disco_key.as_deref() == Some(leg.disco_key.as_str()))
            .map(|p| p.hostname.clone());
    }
    status
}
