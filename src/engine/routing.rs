//! The engine's side of host routing: the exit node chosen in prefs resolved against the
//! netmap, WireGuard AllowedIPs, table 52, netfilter and the packet filter's served networks
//! recomputed whenever the netmap, the prefs or the host's own prefixes change.

use tern_platform::netfilter::NetfilterMode;

use super::linux_net::FirewallInputs;
use super::Engine;
use crate::netmap::NetworkMap;
use crate::routing::{self, RoutingPrefs};
use crate::state::NetPrefs;
use crate::status::RoutingStatus;

impl Engine {
    /// The routing prefs for this netmap: which peer is the exit node (if the one chosen is in
    /// the netmap and offers it), and whether the default routes stay regardless (fail closed).
    pub(super) fn routing_prefs(&self, map: &NetworkMap, prefs: &NetPrefs) -> RoutingPrefs {
        let exit_node = prefs.exit_node.and_then(|ip| {
            routing::resolve_exit_node(map, &ip.to_string())
                .map_err(|e| tracing::debug!(error = %e, "exit node"))
                .ok()
                .map(|n| n.key)
        });
        let policy = self.linux.as_ref().is_some_and(|l| l.policy_routing());
        RoutingPrefs {
            exit_node,
            // Without policy rules a default route would catch tern's own traffic too.
            exit_node_wanted: prefs.exit_node.is_some() && policy,
            exit_node_allow_lan_access: prefs.exit_node_allow_lan_access,
            accept_routes: prefs.accept_routes,
        }
    }

    /// The exit node's DNS over HTTP while one that offers it is in use (a kernel TUN routes
    /// its tailnet address; userspace networking uses no exit node).
    pub(super) fn exit_node_doh(&self, map: &NetworkMap) -> Option<std::net::SocketAddr> {
        self.linux.as_ref()?;
        let ip = self.net_prefs.borrow().exit_node?;
        let node = routing::resolve_exit_node(map, &ip.to_string()).ok()?;
        let has = |v4: bool| self.local.iter().any(|n| n.addr().is_ipv4() == v4);
        crate::peerapi::doh_server(node, has(true), has(false))
    }

    /// Table 52, netfilter and the served networks for `map` under the current prefs.
    pub(super) async fn apply_host_routing(&mut self, map: &NetworkMap) {
        let prefs = self.net_prefs.borrow().clone();
        let routing_prefs = self.routing_prefs(map, &prefs);
        self.dial_routes
            .send_replace(std::sync::Arc::new(dial_routes(map, prefs.accept_routes)));
        let Some(linux) = self.linux.as_mut() else {
            // No host routing (userspace networking): the node serves its own addresses.
            self.served =
                routing::served_networks(&self.local, &prefs.routable_ips(), &Default::default());
            return;
        };
        let plan = routing::route_plan(
            map,
            &self.local,
            &routing_prefs,
            linux.local_prefixes(),
            self.ipv6,
        );
        linux.apply_routes(&plan).await;
        let mode = prefs
            .netfilter_mode
            .parse::<NetfilterMode>()
            .unwrap_or_default();
        linux
            .apply_firewall(FirewallInputs {
                mode,
                addrs: self.local.clone(),
                port: self.udp_port,
                snat: prefs.snat_subnet_routes,
                stateful: prefs.stateful_filtering,
            })
            .await;
        self.served =
            routing::served_networks(&self.local, &prefs.routable_ips(), linux.local_prefixes());
    }

    /// MagicDNS for `map`, then the host's resolver (last: quad-100's route exists by now).
    pub(super) async fn apply_dns(&mut self, map: &NetworkMap) {
        let Some(quad100) = &self.quad100 else {
            return;
        };
        let magic = quad100.set_netmap(map, self.exit_node_doh(map));
        let accept = self.net_prefs.borrow().accept_dns;
        if let Some(os_dns) = &mut self.os_dns {
            os_dns.apply(&magic, accept).await;
        }
    }

    /// Everything that depends on the routing prefs, again (a `tern set` changed them).
    pub(super) async fn on_net_prefs(&mut self) {
        let routable = self.net_prefs.borrow().routable_ips();
        self.local_tx.send_if_modified(|info| {
            let changed = info.routable_ips != routable;
            info.routable_ips = routable;
            changed
        });
        if let Some(linux) = self.linux.as_mut() {
            linux.refresh_local_prefixes().await;
        }
        if let Some(map) = self.netmap.clone() {
            self.sync_peers(&map);
            self.apply_host_routing(&map).await;
            self.recompile_filter(&map);
            self.sync_peerapi(&map);
            self.apply_dns(&map).await;
        }
    }

    /// After an announced host change and every [`Self::host_poll_every`]: lost rules back, and
    /// routes redone when the host's own prefixes changed (a new LAN while an exit node is in use).
    pub(super) async fn maintain_host(&mut self) {
        let Some(linux) = self.linux.as_mut() else {
            return;
        };
        linux.maintain().await;
        let before = linux.local_prefixes().clone();
        linux.refresh_local_prefixes().await;
        if *linux.local_prefixes() != before {
            if let Some(map) = self.netmap.clone() {
                self.apply_host_routing(&map).await;
                self.recompile_filter(&map);
            }
        }
    }

    /// An announced host change: a look for lost rules shortly (one look for a burst).
    pub(super) fn host_check_soon(&mut self, now: std::time::Instant) {
        self.host_check_due
            .get_or_insert(now + super::linux_net::SETTLE);
    }

    /// The look [`Self::host_check_soon`] asked for, once it is due.
    pub(super) async fn run_due_host_check(&mut self, now: std::time::Instant) {
        if self.host_check_due.is_some_and(|due| due <= now) {
            self.host_check_due = None;
            self.maintain_host().await;
        }
    }

    /// How often to look for lost rules unprompted (userspace mode has none to look for).
    pub(super) fn host_poll_every(&self) -> std::time::Duration {
        self.linux
            .as_ref()
            .map_or(super::linux_net::WATCHED_POLL_EVERY, |l| l.poll_every())
    }

    /// The routing part of the status snapshot.
    pub(super) fn routing_status(&self) -> RoutingStatus {
        let prefs = self.net_prefs.borrow().clone();
        let mut out = RoutingStatus::default();
        if let Some(linux) = &self.linux {
            linux.status(&mut out);
        }
        out.advertised_routes = prefs
            .routable_ips()
            .iter()
            .map(ToString::to_string)
            .collect();
        if prefs.forwards() {
            out.forwarding_problems = tern_platform::sysctl::forwarding_problems(self.ipv6);
        }
        if let Some(ip) = prefs.exit_node {
            out.exit_node_ip = Some(ip.to_string());
            let node = self
                .netmap
                .as_ref()
                .and_then(|m| routing::resolve_exit_node(m, &ip.to_string()).ok());
            out.exit_node_available = node.is_some_and(|n| n.online != Some(false));
            // Gone from the netmap: its address is all we can name it by.
            out.exit_node = Some(node.map_or_else(|| ip.to_string(), routing::display_name));
        }
        out
    }
}

/// The prefixes the proxies dial through the tailnet: its address ranges, and with
/// `--accept-routes` the subnets peers offer.
fn dial_routes(map: &NetworkMap, accept_routes: bool) -> Vec<ipnet::IpNet> {
    let mut routes = vec![
        ipnet::IpNet::from(routing::cgnat()),
        ipnet::IpNet::from(routing::tailnet_ula()),
    ];
    if accept_routes {
        for peer in map.peers.values() {
            routes.extend(routing::subnet_routes(peer).copied());
        }
    }
    routes
}
