//! Netmaps into the engine: TUN addresses, the packet filter, WireGuard peers and path machines
//! kept in step with the netmap's peers, the DERP map.

use std::net::SocketAddr;
use std::time::{Instant, SystemTime};

use ipnet::IpNet;

use super::device::Device;
use super::{Engine, EngineError};
use crate::control::tailcfg::Node;
use crate::filter::Filter;
use crate::keys::{NodePrivate, NodePublic};
use crate::netmap::NetworkMap;
use crate::paths::{self, LocalNet};
use crate::wg::{PeerId, WgOutput, WgPeers};

/// Per-peer facts from the netmap the engine needs.
#[derive(Debug, Clone)]
pub(super) struct PeerInfo {
    pub(super) key: NodePublic,
    pub(super) home_derp: u16,
    pub(super) reach: Reach,
}

/// What in a peer's netmap entry says how to reach it; a change may make a lost handshake
/// worth sending again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Reach {
    pub(super) disco_key: crate::keys::DiscoPublic,
    pub(super) home_derp: i32,
    pub(super) endpoints: Vec<SocketAddr>,
    pub(super) online: Option<bool>,
}

impl Reach {
    pub(super) fn of(node: &crate::control::tailcfg::Node) -> Reach {
        Reach {
            disco_key: node.disco_key,
            home_derp: node.effective_home_derp(),
            endpoints: node.endpoints.clone(),
            online: node.online,
        }
    }
}

impl Engine {
    /// Brings addresses, peers, filter and DERP in line with a new netmap.
    pub(super) async fn apply_netmap(
        &mut self,
        map: &NetworkMap,
        tun: &Device,
    ) -> Result<(), EngineError> {
        let Some(me) = &map.self_node else {
            return Ok(());
        };
        let local: Vec<IpNet> = me
            .addresses
            .iter()
            .filter(|p| p.prefix_len() == p.max_prefix_len())
            .filter(|p| self.ipv6 || p.addr().is_ipv4())
            .copied()
            .collect();
        if local != self.local {
            tun.set_addresses(&local).await?;
            self.local = local;
        }
        self.sync_peers(map);
        self.apply_host_routing(map).await;
        self.apply_dns(map).await;
        self.recompile_filter(map);
        self.sync_peerapi(map);
        self.update_relay_candidates(map);
        self.update_relay_server_attr(map);
        self.update_only_tcp_443(map);
        if let Some(derp_map) = &map.derp_map {
            self.set_derp_map(derp_map);
        }
        self.send_unsent_pings(Instant::now());
        Ok(())
    }

    /// The inbound filter for `map`; destinations are the networks this node serves (its
    /// addresses, advertised subnets, the internet as an exit node).
    pub(super) fn recompile_filter(&mut self, map: &NetworkMap) {
        let served = if self.served.is_empty() {
            &self.local
        } else {
            &self.served
        };
        match Filter::from_rules(&map.packet_filter(), served) {
            Ok(f) => self.filter = Some(f),
            Err(e) => {
                tracing::warn!(error = %e, "bad packet filter from control; keeping the old one")
            }
        }
    }

    pub(super) fn sync_peers(&mut self, map: &NetworkMap) {
        let wall = SystemTime::now();
        let routing = self.routing_prefs(map, &self.net_prefs.borrow().clone());
        self.next_key_expiry = next_key_expiry(map, wall, Instant::now());
        // Peers whose node keys expired are not used (Go leaves them out of WireGuard).
        let live: Vec<&Node> = map
            .peers
            .values()
            .filter(|n| !n.key_expired(wall))
            .collect();
        let mut seen = std::collections::HashSet::with_capacity(map.peers.len());
        let mut path_peers = Vec::with_capacity(map.peers.len());
        let mut reachable_anew = Vec::new();
        self.first_ip = live
            .iter()
            .filter_map(|node| {
                let first = node
                    .addresses
                    .iter()
                    .find(|p| p.prefix_len() == p.max_prefix_len())?;
                Some((node.key, first.addr()))
            })
            .collect();
        for node in live {
            path_peers.push(paths::PeerInfo {
                node_key: node.key,
                disco_key: node.disco_key,
                home_derp: u16::try_from(node.effective_home_derp())
                    .ok()
                    .filter(|r| *r != 0),
                endpoints: node.endpoints.clone(),
                mapping_varies: node
                    .hostinfo
                    .net_info
                    .as_ref()
                    .and_then(|n| n.mapping_varies_by_dest_ip),
                udp_working: node.hostinfo.net_info.as_ref().and_then(|n| n.working_udp),
                relay_capable: node.cap >= crate::relay::MIN_RELAY_CAP_VERSION,
            });
            let allowed = crate::routing::wg_allowed_ips(
                node,
                routing.exit_node == Some(node.key),
                routing.accept_routes,
            );
            match self.peers.upsert(node.key, &allowed) {
                Ok(id) => {
                    seen.insert(id);
                    let info = PeerInfo {
                        key: node.key,
                        home_derp: u16::try_from(node.effective_home_derp()).unwrap_or(0),
                        reach: Reach::of(node),
                    };
                    match self.info.insert(id, info) {
                        None => self.greet_late_peer(id, node.key),
                        Some(old) if old.reach != Reach::of(node) => reachable_anew.push(id),
                        Some(_) => {}
                    }
                }
                Err(e) => tracing::debug!(peer = %node.key, error = %e, "peer not added"),
            }
        }
        let gone: Vec<(PeerId, NodePublic)> = self
            .info
            .iter()
            .filter(|(id, _)| !seen.contains(id))
            .map(|(id, p)| (*id, p.key))
            .collect();
        for (id, key) in gone {
            self.peers.remove(&key);
            self.info.remove(&id);
            self.last_region.remove(&id);
            self.handshake_retries.remove(&id);
        }
        let now = Instant::now();
        self.paths.set_peers(now, path_peers);
        // A handshake sent while the peer was not there (it restarted, came online, got a new
        // address) goes again now rather than at its 5 s retransmission.
        for id in reachable_anew {
            if let WgOutput::ToNetwork(n) = self.peers.retry_handshake_now(now, id, &mut self.out) {
                if let Some(bytes) = self.out.get(..n) {
                    self.to_send.push((id, bytes.to_vec()));
                }
            }
        }
    }
}

/// When the next peer key expires, as an `Instant` (keys already expired are not counted).
fn next_key_expiry(map: &NetworkMap, wall: SystemTime, now: Instant) -> Option<Instant> {
    map.peers
        .values()
        .filter_map(Node::key_expiry_time)
        .filter_map(|t| t.duration_since(wall).ok())
        .min()
        .map(|left| now + left)
}

impl Engine {
    /// Control renewed our node key: WireGuard sessions (keyed to the old one) and DERP
    /// connections (authenticated by it) start over with the new key; the peers are the same.
    pub(super) fn set_node_key(&mut self, key: NodePrivate) {
        if key.public() == self.node_key {
            return;
        }
        tracing::info!(node_key = %key.public(), "node key renewed: WireGuard sessions and DERP connections start over");
        self.peers = WgPeers::new(key.clone());
        self.info.clear();
        self.last_region.clear();
        self.handshake_retries.clear();
        self.node_key = key.public();
        self.relay_client.set_node_key(self.node_key);
        self.private_key = key;
        self.derp.clear();
        let local = LocalNet {
            node_key: self.node_key,
            ..self.paths.local().clone()
        };
        self.paths.set_local(Instant::now(), local);
        if let Some(map) = self.netmap.clone() {
            self.sync_peers(&map);
        }
    }
}
