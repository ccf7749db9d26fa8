//! The peer relay side of a peer's path machine (Go magicsock `endpoint` with a relay
//! `bestAddr`): when relay discovery is due, a relay path installed once a bind handshake proves
//! it, heartbeats through the relay that keep it trusted, and the reasons a peer is not on a
//! relay. The handshakes themselves run in [`crate::relay::manager`]; this file only decides.
//!
//! Priority is Go's: a trusted direct path beats any relay, a trusted relay beats DERP. Ours on
//! top: a relay path is trusted for [`RELAY_TRUST_DURATION`] after its last pong (Go: 6.5 s),
//! so that with heartbeats every 3 s a dead relay puts traffic back on DERP within 5 s.

use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::consts::*;
use super::{better_addr, AddrQuality, Dest, Event, Peer, PingPurpose};
use crate::keys::{DiscoPublic, NodePublic};

/// How long one relayed pong keeps a relay path trusted (ours; see the module docs).
pub const RELAY_TRUST_DURATION: Duration = Duration::from_secs(5);
/// `discoverUDPRelayPathsInterval`: at least this long between two relay discoveries.
pub const DISCOVER_RELAY_INTERVAL: Duration = Duration::from_secs(30);
/// `upgradeUDPRelayInterval`: with a working relay path, look for a better one this often.
pub const UPGRADE_RELAY_INTERVAL: Duration = Duration::from_secs(60);

/// A peer relay endpoint as seen from this node: the relay's address and the VNI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RelayAddr {
    pub via: SocketAddr,
    pub vni: u32,
}

impl fmt::Display for RelayAddr {
    /// Go's `epAddr` text: `ip:port:vni:N`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:vni:{}", self.via, self.vni)
    }
}

/// A relay path a bind handshake proved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayPath {
    pub addr: RelayAddr,
    /// The relay server's disco key (one relay server may offer several addresses).
    pub server_disco: DiscoPublic,
    /// The relay's node, when we allocated the endpoint ourselves (a CallMeMaybeVia does not
    /// say which node runs the relay).
    pub relay_node: Option<NodePublic>,
    pub latency: Duration,
}

/// Why a peer is not on a peer relay (status `relay_reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RelayReason {
    /// Control turned this node's relay client off (node attribute `disable-relay-client`, or
    /// `only-tcp-443`).
    ClientDisabled,
    /// No other node gives us `tailscale.com/cap/relay-target`: no relay to ask.
    NoRelayGranted,
    /// The peer's capability version is below 121: it cannot use relays.
    PeerNotRelayCapable,
    /// Allocations or a bind handshake are under way.
    Discovering,
    /// No relay server answered our allocation requests within 10 s.
    AllocationFailed,
    /// An endpoint was allocated but the bind handshake got no pong through the relay.
    BindTimeout,
    /// The relay path stopped answering pings.
    Unreachable,
}

impl RelayReason {
    /// The stable text form (`no-relay-granted`, `relay-bind-timeout`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            RelayReason::ClientDisabled => "relay-client-disabled",
            RelayReason::NoRelayGranted => "no-relay-granted",
            RelayReason::PeerNotRelayCapable => "peer-not-relay-capable",
            RelayReason::Discovering => "relay-discovering",
            RelayReason::AllocationFailed => "relay-allocation-failed",
            RelayReason::BindTimeout => "relay-bind-timeout",
            RelayReason::Unreachable => "relay-unreachable",
        }
    }
}

impl fmt::Display for RelayReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Peer {
    /// Whether some node other than this peer may serve us as a relay.
    pub fn set_relay_candidates(&mut self, now: Instant, any: bool) {
        self.relay_candidates = any;
        self.update_report(now);
    }

    /// Whether control turned our relay client off (the candidates are then empty too).
    pub fn set_relay_client_disabled(&mut self, now: Instant, disabled: bool) {
        self.relay_client_disabled = disabled;
        self.update_report(now);
    }

    /// The relay path, trusted or not.
    pub fn relay_path(&self) -> Option<RelayPath> {
        self.relay
    }

    /// Whether a relayed pong arrived within the trust window.
    pub fn relay_trusted(&self, now: Instant) -> bool {
        self.relay.is_some() && self.relay_trust_until.is_some_and(|t| now < t)
    }

    /// A bind handshake ended with a pong through `path` (Go `udpRelayEndpointReady`). It is
    /// installed unless a trusted direct path exists or the current relay path is trusted,
    /// on another server and better. Returns whether it was installed.
    pub fn relay_ready(&mut self, now: Instant, path: RelayPath) -> bool {
        if self.trusted(now) {
            return false;
        }
        let install = match self.relay {
            None => true,
            Some(current) => {
                !self.relay_trusted(now)
                    || current.server_disco == path.server_disco
                    || better_addr(&quality(&path), Some(&quality(&current)))
            }
        };
        if install {
            tracing::debug!(relay = %path.addr, latency = ?path.latency, "disco: now using peer relay");
            self.relay = Some(path);
            self.relay_trust_until = Some(now + RELAY_TRUST_DURATION);
            self.relay_lost = false;
            self.relay_failure = None;
        }
        self.update_report(now);
        install
    }

    /// A relay attempt for this peer failed (allocation or bind handshake).
    pub fn relay_failed(&mut self, now: Instant, reason: RelayReason) {
        if self.relay.is_none() {
            self.relay_failure = Some(reason);
        }
        self.update_report(now);
    }

    /// Why the peer is not on a relay, while it is on neither a trusted direct path nor a relay.
    pub fn relay_reason(&self, now: Instant) -> Option<RelayReason> {
        if self.trusted(now) || self.relay_trusted(now) {
            return None;
        }
        if self.relay_client_disabled {
            return Some(RelayReason::ClientDisabled);
        }
        if !self.relay_candidates {
            return Some(RelayReason::NoRelayGranted);
        }
        if !self.info.relay_capable {
            return Some(RelayReason::PeerNotRelayCapable);
        }
        if self.relay_lost {
            return Some(RelayReason::Unreachable);
        }
        self.relay_failure
            .or(self.last_relay_discovery.map(|_| RelayReason::Discovering))
    }

    /// Go `wantUDPRelayPathDiscoveryLocked`, evaluated at every checkpoint (outgoing traffic,
    /// heartbeat, CallMeMaybe, `tern ping`): asks the driver to allocate on every candidate.
    pub(super) fn maybe_want_relay(&mut self, now: Instant) {
        if self.relay_client_disabled
            || !self.relay_candidates
            || !self.info.relay_capable
            || self.trusted(now)
        {
            return;
        }
        if let Some(last) = self.last_relay_discovery {
            let since = now.saturating_duration_since(last);
            if since < DISCOVER_RELAY_INTERVAL
                || (self.relay_trusted(now) && since < UPGRADE_RELAY_INTERVAL)
            {
                return;
            }
        }
        self.last_relay_discovery = Some(now);
        self.events.push_back(Event::WantRelayPaths);
    }

    /// A pong through the relay at `got` for a ping we sent to `to`: it keeps that path trusted.
    pub(super) fn relay_pong(
        &mut self,
        now: Instant,
        got: RelayAddr,
        to: RelayAddr,
        latency: Duration,
    ) {
        let Some(relay) = self.relay.as_mut().filter(|r| r.addr == to && got == to) else {
            return;
        };
        relay.latency = latency;
        self.relay_trust_until = Some(now + RELAY_TRUST_DURATION);
        self.relay_lost = false;
    }

    /// A heartbeat through the relay (while the session is active).
    pub(super) fn relay_heartbeat(&mut self, now: Instant) {
        if let Some(relay) = self.relay {
            let _ = self.send_ping_to(now, Dest::Relay(relay.addr), PingPurpose::Heartbeat);
        }
    }

    /// A ping through the relay at `to` timed out: an untrusted relay path is given up (Go
    /// `discoPingTimeout` clears a relay `bestAddr`), and DERP carries the traffic.
    pub(super) fn relay_ping_timed_out(&mut self, now: Instant, to: RelayAddr) {
        let current = self.relay.is_some_and(|r| r.addr == to);
        if current && !self.relay_trusted(now) {
            tracing::debug!(relay = %to, "disco: peer relay stopped answering");
            self.drop_relay();
            self.relay_lost = true;
        }
    }

    /// Forgets the relay path (a direct path won, the network changed, the peer restarted).
    pub(super) fn drop_relay(&mut self) {
        self.relay = None;
        self.relay_trust_until = None;
    }

    /// When relay trust lapses (for the timer), while it is trusted.
    pub(super) fn relay_trust_deadline(&self) -> Option<Instant> {
        self.relay.and(self.relay_trust_until)
    }
}

fn quality(path: &RelayPath) -> AddrQuality {
    AddrQuality {
        addr: path.addr.via,
        vni: Some(path.addr.vni),
        latency: path.latency,
        wire_mtu: DEFAULT_WIRE_MTU,
    }
}

#[cfg(test)]
mod tests;
