//! Status publishing: per-peer path, reason, history, counters and the drop counters copied
//! into the status snapshot every second and on every path change.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;

use super::relay_host::relay_status;
use super::Engine;
use crate::keys::NodePublic;
use crate::paths::{self, Path};
use crate::status::{rfc3339, Status};

impl Engine {
    /// Copies per-peer path, reason, history and counters into the status snapshot.
    pub(super) fn publish(&self, status: &watch::Sender<Status>) {
        let now = Instant::now();
        let wall = SystemTime::now();
        let at = |t: Instant| -> Option<String> {
            let ago = now.checked_duration_since(t)?;
            Some(rfc3339(wall.checked_sub(ago)?))
        };
        let drops = self.drop_counts();
        status.send_if_modified(|s| {
            let before = s.peers.clone();
            let drops_changed = s.data_plane.drops != drops;
            s.data_plane.drops = drops;
            s.data_plane.active = true;
            s.data_plane.note = None;
            for p in &mut s.peers {
                let Some(key) = p.node_key.parse::<NodePublic>().ok() else {
                    continue;
                };
                let Some(id) = self.peers.id_of(&key) else {
                    continue;
                };
                let Some(session) = self.peers.session(id) else {
                    continue;
                };
                let stats = session.stats();
                p.rx_bytes = stats.rx_bytes;
                p.tx_bytes = stats.tx_bytes;
                p.last_handshake_at = session.last_handshake().and_then(at);
                match self.paths.peer(&key) {
                    Some(machine) => self.describe_path(p, machine, &at),
                    None => {
                        // No disco key: DERP is all we can do.
                        let region = self
                            .last_region
                            .get(&id)
                            .copied()
                            .or_else(|| self.info.get(&id).map(|i| i.home_derp))
                            .filter(|r| *r != 0);
                        p.path = Some(if region.is_some() { "derp" } else { "none" }.into());
                        p.derp_region = region;
                        p.endpoint = None;
                        p.path_reason = Some("no-disco-key".into());
                        p.candidates.clear();
                    }
                }
            }
            let own_peerapi = self.peerapi_urls();
            let peerapi_changed = s.self_node.as_mut().is_some_and(|me| {
                std::mem::replace(&mut me.peerapi_urls, own_peerapi.clone()) != own_peerapi
            });
            let relay = self.relay.as_ref().map(|r| relay_status(r, &s.peers));
            let relay_changed = s.relay_server != relay || s.relay_server_off != self.relay_off;
            s.relay_server = relay;
            s.relay_server_off = self.relay_off.clone();
            let quad100 = self.quad100_counts();
            let quad100_changed = s.data_plane.quad100 != quad100;
            s.data_plane.quad100 = quad100;
            let named = |pairs: Vec<(&str, u64)>| {
                pairs
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v))
                    .collect::<BTreeMap<_, _>>()
            };
            let netstack = self
                .user_stack
                .as_ref()
                .map(|u| named(u.counters().named()))
                .unwrap_or_default();
            let proxies = self
                .proxy_counters
                .as_ref()
                .map(|p| named(p.named()))
                .unwrap_or_default();
            let tun_offload = named(self.tun_offload.named());
            let peerapi = self
                .peerapi
                .as_ref()
                .map(|p| named(p.counters()))
                .unwrap_or_default();
            let local_changed = s.data_plane.netstack != netstack
                || s.data_plane.proxies != proxies
                || s.data_plane.tun_offload != tun_offload
                || s.data_plane.peerapi != peerapi;
            s.data_plane.netstack = netstack;
            s.data_plane.peerapi = peerapi;
            s.data_plane.tun_offload = tun_offload;
            s.data_plane.proxies = proxies;
            let path_io = self.path_io.to_status();
            let path_changes: Vec<_> = self
                .path_changes
                .iter()
                .map(|((path, reason), count)| crate::status::PathChangeCount {
                    path: path.to_string(),
                    reason: reason.to_string(),
                    count: *count,
                })
                .collect();
            let derp_regions: BTreeMap<u16, _> = self
                .derp
                .iter()
                .map(|(region, link)| {
                    let state = crate::status::DerpRegionState {
                        connected: link.connected.load(std::sync::atomic::Ordering::Relaxed),
                        home: *region == self.home,
                    };
                    (*region, state)
                })
                .collect();
            let io_changed = s.data_plane.path_io != path_io
                || s.data_plane.path_changes != path_changes
                || s.data_plane.derp_regions != derp_regions;
            s.data_plane.path_io = path_io;
            s.data_plane.path_changes = path_changes;
            s.data_plane.derp_regions = derp_regions;
            let mut dns = self
                .os_dns
                .as_ref()
                .map(|d| d.status(self.net_prefs.borrow().accept_dns))
                .unwrap_or_default();
            dns.exit_node_doh = self
                .quad100
                .as_ref()
                .and_then(|q| q.exit_doh())
                .map(|server| format!("http://{server}{}", crate::peerapi::DOH_PATH));
            let dns_changed = s.dns != dns;
            s.dns = dns;
            let routing = self.routing_status();
            let routing_changed = s.routing != routing;
            s.routing = routing;
            s.peers != before
                || drops_changed
                || relay_changed
                || peerapi_changed
                || routing_changed
                || quad100_changed
                || local_changed
                || io_changed
                || dns_changed
        });
    }

    /// Quad-100's counters by name (empty without the netstack).
    pub(super) fn quad100_counts(&self) -> BTreeMap<String, u64> {
        let Some(quad) = &self.quad100 else {
            return BTreeMap::new();
        };
        let c = quad.counters();
        [
            ("udp_queries", c.udp_queries),
            ("tcp_queries", c.tcp_queries),
            ("tcp_connections", c.tcp_connections),
            ("tcp_aborted", c.tcp_aborted),
            ("oversized", c.oversized),
            ("queue_full", c.queue_full + quad.dropped),
            ("packets_in", c.packets_in),
            ("packets_out", c.packets_out),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// Every drop counter by name, for status (zeros left out).
    pub(super) fn drop_counts(&self) -> BTreeMap<String, u64> {
        let d = self.drops;
        let c = self.paths.counters();
        let r = self.relay_client.drops();
        [
            ("udp_unhandled", d.udp),
            ("udp_unknown_peer", d.udp_unknown_peer),
            ("relay_unknown_peer", d.relay_unknown_peer),
            ("relay_unsolicited_response", r.unsolicited_response),
            ("relay_unknown_control", r.unknown_control),
            ("relay_malformed", r.malformed),
            ("udp_send_failed", d.udp_send_failed),
            ("udp_only_tcp_443", d.udp_only_tcp_443),
            ("stun_unmatched", d.stun_unmatched),
            ("no_derp", d.no_derp),
            ("derp_queue_full", d.derp_queue_full),
            ("filtered", d.filtered),
            ("unknown_sender", d.unknown_sender),
            ("disco_not_disco", c.not_disco),
            ("disco_unknown_sender", c.unknown_sender),
            ("disco_derp_sender_mismatch", c.derp_sender_mismatch),
            ("disco_bad_box", c.bad_box),
            ("disco_malformed", c.malformed),
        ]
        .into_iter()
        .filter(|(_, n)| *n != 0)
        .map(|(k, n)| (k.to_string(), n))
        .collect()
    }

    /// Path, endpoint, latency, reason and history of one peer's machine.
    pub(super) fn describe_path(
        &self,
        p: &mut crate::status::PeerStatus,
        machine: &paths::Peer,
        at: &impl Fn(Instant) -> Option<String>,
    ) {
        let (path, endpoint, region) = path_fields(machine.current_path());
        p.path = Some(path.into());
        p.endpoint = endpoint;
        p.derp_region = region;
        p.path_reason = Some(machine.path_reason().as_str().into());
        let now = Instant::now();
        p.relay_reason = machine.relay_reason(now).map(|r| r.as_str().into());
        let relay = match machine.current_path() {
            Path::PeerRelay { .. } => machine.relay_path(),
            _ => None,
        };
        p.relay_vni = relay.map(|r| r.addr.vni);
        p.relay_node = relay
            .and_then(|r| {
                r.relay_node
                    .or_else(|| self.relay_client.relay_node_of(&r.server_disco))
            })
            .and_then(|node| self.node_name(&node));
        let candidates = machine.candidates();
        let last_pong = candidates
            .iter()
            .filter_map(|c| c.last_pong)
            .max_by_key(|pong| pong.at);
        if let Some(pong) = last_pong {
            p.latency_ms = Some(millis(pong.latency));
            p.last_pong_at = at(pong.at);
        }
        p.candidates = candidates.iter().map(|c| candidate_entry(c, at)).collect();
        // On a relay, the latency is the relay path's.
        if let Some(relay) = relay {
            p.latency_ms = Some(millis(relay.latency));
        }
        p.path_history = machine
            .history()
            .map(|change| {
                let (path, endpoint, derp_region) = path_fields(change.to);
                crate::status::PathHistoryEntry {
                    at: at(change.at).unwrap_or_default(),
                    path: path.into(),
                    endpoint,
                    derp_region,
                    reason: change.reason.as_str().into(),
                }
            })
            .collect();
    }
}

impl Engine {
    /// A peer's host name from the netmap.
    fn node_name(&self, node: &NodePublic) -> Option<String> {
        let map = self.netmap.as_ref()?;
        let peer = map.peers.values().find(|n| n.key == *node)?;
        Some(peer.hostinfo.hostname.clone())
    }
}

/// A path as status shows it: kind, endpoint, DERP region.
pub(super) fn path_fields(path: Path) -> (&'static str, Option<String>, Option<u16>) {
    match path {
        Path::Direct { addr, .. } => ("direct", Some(addr.to_string()), None),
        Path::PeerRelay { relay, .. } => ("peer-relay", Some(relay.via.to_string()), None),
        Path::Derp { region } => ("derp", None, Some(region)),
        Path::None => ("none", None, None),
    }
}

/// One candidate as status shows it.
fn candidate_entry(
    c: &paths::CandidateStatus,
    at: &impl Fn(Instant) -> Option<String>,
) -> crate::status::CandidateEntry {
    let sources = [
        (c.from_netmap, "netmap"),
        (c.from_call_me_maybe, "call-me-maybe"),
        (c.from_ping, "ping"),
    ];
    crate::status::CandidateEntry {
        addr: c.addr.to_string(),
        sources: sources
            .iter()
            .filter(|(from, _)| *from)
            .map(|(_, name)| name.to_string())
            .collect(),
        last_ping_at: c.last_ping.and_then(at),
        last_pong_at: c.last_pong.and_then(|pong| at(pong.at)),
        latency_ms: c.last_pong.map(|pong| millis(pong.latency)),
    }
}

/// Milliseconds with 0.1 ms precision.
pub(super) fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 10_000.0).round() / 10.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_candidate_lists_its_sources_in_order_with_times_and_rtt() {
        let base = Instant::now();
        let addr: std::net::SocketAddr = "198.18.2.2:41641".parse().unwrap();
        let c = paths::CandidateStatus {
            addr,
            from_netmap: true,
            from_call_me_maybe: false,
            from_ping: true,
            last_ping: Some(base),
            last_pong: Some(paths::PongRecord {
                at: base + Duration::from_secs(2),
                latency: Duration::from_micros(612),
                src: addr,
            }),
        };
        let now = base + Duration::from_secs(3);
        let at = |t: Instant| Some(format!("{}s ago", (now - t).as_secs()));
        let e = candidate_entry(&c, &at);
        assert_eq!(e.addr, "198.18.2.2:41641");
        assert_eq!(e.sources, ["netmap", "ping"]);
        assert_eq!(e.last_ping_at.as_deref(), Some("3s ago"));
        assert_eq!(e.last_pong_at.as_deref(), Some("1s ago"));
        assert_eq!(e.latency_ms, Some(0.6));
        let never = paths::CandidateStatus {
            last_ping: None,
            last_pong: None,
            from_netmap: false,
            from_call_me_maybe: true,
            ..c
        };
        let e = candidate_entry(&never, &at);
        assert_eq!(e.sources, ["call-me-maybe", "ping"]);
        assert_eq!(
            (e.last_ping_at, e.last_pong_at, e.latency_ms),
            (None, None, None)
        );
    }
}
