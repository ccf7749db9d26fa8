//! What the routes should be, from the netmap and the preferences, as tailscaled decides it
//! (`routerConfigLocked`, `peerRoutes`, `nmcfg`): pure functions, no I/O. The engine hands the
//! result to the platform router (table 52) and to WireGuard.
//!
//! - Each peer's tailnet IPv4 as a /32, or `100.64.0.0/10` once there are more than 10,000.
//! - The ULA /48 once any peer has a single IPv6 in it; quad-100 while we have an address.
//! - Peers' subnet routes only with `--accept-routes`.
//! - With an exit node: `0.0.0.0/0` and `::/0` (even before the netmap offers them, so nothing
//!   leaks), the LAN routed *into* the tunnel unless LAN access is allowed, `throw` routes for
//!   loopback prefixes and (with LAN access) the LAN.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::control::tailcfg::Node;
use crate::keys::NodePublic;
use crate::netmap::NetworkMap;

/// Above this many peer CGNAT addresses, one `100.64.0.0/10` route replaces the /32s.
pub const MAX_PEER_HOST_ROUTES: usize = 10_000;
pub use crate::netstack::{QUAD_100_V4, QUAD_100_V6};

/// The tailnet's IPv4 range.
pub fn cgnat() -> Ipv4Net {
    Ipv4Net::new(Ipv4Addr::new(100, 64, 0, 0), 10).unwrap_or_default()
}
/// The tailnet's IPv6 range.
pub fn tailnet_ula() -> Ipv6Net {
    Ipv6Net::new(Ipv6Addr::new(0xfd7a, 0x115c, 0xa1e0, 0, 0, 0, 0, 0), 48).unwrap_or_default()
}
/// `0.0.0.0/0`.
pub fn default_v4() -> IpNet {
    IpNet::V4(Ipv4Net::default())
}
/// `::/0`.
pub fn default_v6() -> IpNet {
    IpNet::V6(Ipv6Net::default())
}

/// Whether `net` is inside the tailnet's own ranges.
pub fn is_tailnet_range(net: &IpNet) -> bool {
    match net {
        IpNet::V4(n) => cgnat().contains(n),
        IpNet::V6(n) => tailnet_ula().contains(n),
    }
}

/// Whether `net` is an exit route (a default route).
pub fn is_exit_route(net: &IpNet) -> bool {
    net.prefix_len() == 0
}

/// The host's own prefixes, from its interface addresses: `internal` on loopback interfaces,
/// `external` (the LAN) elsewhere; single addresses and tailnet ranges are not in either.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LocalPrefixes {
    pub internal: Vec<IpNet>,
    pub external: Vec<IpNet>,
    /// The host's own non-tailnet addresses (as /32 and /128).
    pub host_ips: Vec<IpNet>,
}

impl LocalPrefixes {
    /// Sorts interface addresses into the three sets (Go `internalAndExternalInterfacesFrom`,
    /// skipping link-local and multicast, which never belong in a routing table of ours).
    pub fn from_interfaces<'a>(addrs: impl IntoIterator<Item = (bool, &'a IpNet)>) -> Self {
        let mut out = LocalPrefixes::default();
        for (loopback, net) in addrs {
            if is_tailnet_range(net) || is_link_local_or_multicast(&net.addr()) {
                continue;
            }
            out.host_ips.push(IpNet::from(net.addr()));
            if net.prefix_len() == net.max_prefix_len() {
                continue;
            }
            let set = if loopback {
                &mut out.internal
            } else {
                &mut out.external
            };
            set.push(net.trunc());
        }
        for set in [&mut out.internal, &mut out.external, &mut out.host_ips] {
            set.sort();
            set.dedup();
        }
        out
    }
}

fn is_link_local_or_multicast(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local() || v4.is_multicast(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80 || v6.is_multicast(),
    }
}

/// Preferences that shape routing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoutingPrefs {
    /// The selected exit node's key (resolved from the name or IP the user gave).
    pub exit_node: Option<NodePublic>,
    /// Whether an exit node was asked for at all (also when it is not in the netmap now: then
    /// the default routes stay, fail closed).
    pub exit_node_wanted: bool,
    pub exit_node_allow_lan_access: bool,
    pub accept_routes: bool,
}

/// Routes into the TUN and throw routes, for table 52.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoutePlan {
    pub via_tun: Vec<IpNet>,
    pub throw: Vec<IpNet>,
}

/// The single-address prefixes of a node (its tailnet addresses).
fn single_addresses(node: &Node) -> impl Iterator<Item = &IpNet> {
    node.addresses
        .iter()
        .filter(|p| p.prefix_len() == p.max_prefix_len())
}

/// The peer's subnet routes: AllowedIPs that are neither its own addresses nor exit routes.
pub fn subnet_routes(node: &Node) -> impl Iterator<Item = &IpNet> {
    node.effective_allowed_ips()
        .iter()
        .filter(|p| !is_exit_route(p) && !node.addresses.contains(p))
}

/// Whether control lets this peer serve as an exit node (both default routes approved).
pub fn offers_exit_node(node: &Node) -> bool {
    let allowed = node.effective_allowed_ips();
    allowed.contains(&default_v4()) && allowed.contains(&default_v6())
}

/// The AllowedIPs WireGuard gets for a peer (Go `nmcfg`): its addresses always, its default
/// routes only as the selected exit node, its subnet routes only with `--accept-routes`.
pub fn wg_allowed_ips(node: &Node, is_exit_node: bool, accept_routes: bool) -> Vec<IpNet> {
    node.effective_allowed_ips()
        .iter()
        .filter(|p| {
            if node.addresses.contains(p) {
                true
            } else if is_exit_route(p) {
                is_exit_node
            } else {
                accept_routes
            }
        })
        .copied()
        .collect()
}

/// The routes for table 52 (see the module comment). `self_addrs` are our own tailnet
/// addresses; IPv6 routes only when `ipv6`.
pub fn route_plan(
    map: &NetworkMap,
    self_addrs: &[IpNet],
    prefs: &RoutingPrefs,
    local: &LocalPrefixes,
    ipv6: bool,
) -> RoutePlan {
    let mut via_tun = peer_routes(map, prefs, ipv6);
    if self_addrs.iter().any(|a| a.addr().is_ipv4()) {
        via_tun.push(IpNet::from(IpAddr::V4(QUAD_100_V4)));
    }
    if ipv6 && self_addrs.iter().any(|a| a.addr().is_ipv6()) {
        via_tun.push(IpNet::from(IpAddr::V6(QUAD_100_V6)));
    }
    let mut throw = Vec::new();
    if prefs.exit_node_wanted {
        via_tun.push(default_v4());
        if ipv6 {
            via_tun.push(default_v6());
        }
        throw.extend(local.internal.iter().copied());
        if prefs.exit_node_allow_lan_access {
            throw.extend(local.external.iter().copied());
        } else {
            // Go: "explicitly add routes to the local network so that we do not leak".
            via_tun.extend(local.external.iter().copied());
        }
    }
    let keep = |n: &IpNet| ipv6 || n.addr().is_ipv4();
    via_tun.retain(keep);
    throw.retain(keep);
    via_tun.sort();
    via_tun.dedup();
    throw.sort();
    throw.dedup();
    RoutePlan { via_tun, throw }
}

/// Peer addresses (per-host or aggregated) and, with `--accept-routes`, their subnet routes.
fn peer_routes(map: &NetworkMap, prefs: &RoutingPrefs, ipv6: bool) -> Vec<IpNet> {
    let mut cgnat_hosts = Vec::new();
    let mut any_ula = false;
    let mut routes = Vec::new();
    for node in map.peers.values() {
        for addr in single_addresses(node) {
            match addr {
                IpNet::V4(v4) if cgnat().contains(v4) => cgnat_hosts.push(*addr),
                IpNet::V6(v6) if tailnet_ula().contains(v6) => any_ula = true,
                // A single address outside the tailnet ranges is routed as given.
                other => routes.push(*other),
            }
        }
        if prefs.accept_routes {
            routes.extend(subnet_routes(node).copied());
        }
    }
    if cgnat_hosts.len() > MAX_PEER_HOST_ROUTES {
        routes.push(IpNet::V4(cgnat()));
    } else {
        routes.extend(cgnat_hosts);
    }
    if any_ula && ipv6 {
        routes.push(IpNet::V6(tailnet_ula()));
    }
    routes
}

/// The destinations this node serves (the packet filter's "local" networks): its addresses,
/// its advertised subnet routes and, as an exit node, the internet: everything but its own
/// LAN and host addresses (Go's `shrinkDefaultRoute`: an exit node is "guest Wi-Fi", its LAN
/// must be advertised to be reachable).
pub fn served_networks(
    self_addrs: &[IpNet],
    advertised: &[IpNet],
    local: &LocalPrefixes,
) -> Vec<IpNet> {
    let mut out = self_addrs.to_vec();
    out.extend(advertised.iter().filter(|r| !is_exit_route(r)).copied());
    let mut holes: Vec<IpNet> = local.external.clone();
    holes.extend(local.host_ips.iter().copied());
    holes.push(IpNet::V4(cgnat()));
    holes.push(IpNet::V6(tailnet_ula()));
    for exit in advertised.iter().filter(|r| is_exit_route(r)) {
        let same_family: Vec<IpNet> = holes
            .iter()
            .filter(|h| h.addr().is_ipv4() == exit.addr().is_ipv4())
            .copied()
            .collect();
        out.extend(subtract(*exit, &same_family));
    }
    out
}

/// `base` minus `holes`, as a list of prefixes (each hole splits at most one prefix per bit).
pub fn subtract(base: IpNet, holes: &[IpNet]) -> Vec<IpNet> {
    if holes.iter().any(|h| h.contains(&base)) {
        return Vec::new();
    }
    if !holes.iter().any(|h| base.contains(h)) {
        return vec![base];
    }
    match base.subnets(base.prefix_len() + 1) {
        Ok(halves) => halves.flat_map(|half| subtract(half, holes)).collect(),
        Err(_) => Vec::new(),
    }
}

/// Why an exit node name or IP cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExitNodeError {
    #[error(
        "no peer is called or has the address {0:?}; `tern exit-node list` shows the exit nodes"
    )]
    NotFound(String),
    #[error("{0:?} matches several peers ({1}); give the full name or the IP")]
    Ambiguous(String, String),
    #[error("peer {0} does not offer an exit node (it must advertise 0.0.0.0/0 and ::/0 and control must approve them); `tern exit-node list` shows the ones that do")]
    NotOffered(String),
}

/// Whether `node` is the one the user named: an IP of its, its full MagicDNS name (with or
/// without the final dot), its short name or its Hostinfo hostname (case-insensitive).
fn names_node(node: &Node, spec: &str) -> bool {
    if let Ok(ip) = spec.parse::<IpAddr>() {
        return node.addresses.iter().any(|a| a.addr() == ip);
    }
    let spec = spec.trim_end_matches('.').to_ascii_lowercase();
    let full = node.name.trim_end_matches('.').to_ascii_lowercase();
    let short = full.split('.').next().unwrap_or_default();
    spec == full || spec == short || spec == node.hostinfo.hostname.to_ascii_lowercase()
}

/// The peer the user's `--exit-node` names; it must offer an exit node.
pub fn resolve_exit_node<'a>(map: &'a NetworkMap, spec: &str) -> Result<&'a Node, ExitNodeError> {
    let found: Vec<&Node> = map.peers.values().filter(|n| names_node(n, spec)).collect();
    match found.as_slice() {
        [] => Err(ExitNodeError::NotFound(spec.to_string())),
        [node] if offers_exit_node(node) => Ok(node),
        [node] => Err(ExitNodeError::NotOffered(display_name(node))),
        many => Err(ExitNodeError::Ambiguous(
            spec.to_string(),
            many.iter()
                .map(|n| display_name(n))
                .collect::<Vec<_>>()
                .join(", "),
        )),
    }
}

/// A peer's name for messages: its MagicDNS name without the final dot.
pub fn display_name(node: &Node) -> String {
    node.name.trim_end_matches('.').to_string()
}

/// Why advertised routes are refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdvertiseError {
    #[error("{0} is not a network address (host bits set): write {1}")]
    HostBits(String, IpNet),
    #[error("{0} is inside the tailnet's own range (100.64.0.0/10 or fd7a:115c:a1e0::/48); tailnet addresses are routed already")]
    TailnetRange(IpNet),
    #[error("{0} is a single host; advertise the subnet it is on (e.g. a /24)")]
    HostRoute(IpNet),
    #[error("{0} overlaps {1}; advertise each network once")]
    Overlap(IpNet, IpNet),
    #[error("{0} is a default route: use --advertise-exit-node to offer an exit node")]
    DefaultRoute(IpNet),
    #[error("{0:?} is not a CIDR such as 10.0.0.0/24")]
    Syntax(String),
}

/// Parses `--advertise-routes=CIDR,…` (an empty value clears them), refusing what Go refuses
/// or what would break routing: host bits, tailnet ranges, host routes, overlaps, `/0`.
pub fn parse_advertised_routes(text: &str) -> Result<Vec<IpNet>, AdvertiseError> {
    let mut routes: Vec<IpNet> = Vec::new();
    for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let net: IpNet = item
            .parse()
            .map_err(|_| AdvertiseError::Syntax(item.to_string()))?;
        if net.trunc() != net {
            return Err(AdvertiseError::HostBits(item.to_string(), net.trunc()));
        }
        if is_exit_route(&net) {
            return Err(AdvertiseError::DefaultRoute(net));
        }
        if net.prefix_len() == net.max_prefix_len() {
            return Err(AdvertiseError::HostRoute(net));
        }
        if is_tailnet_range(&net) || net.contains(&IpNet::V4(cgnat())) {
            return Err(AdvertiseError::TailnetRange(net));
        }
        if let Some(other) = routes
            .iter()
            .find(|r| r.contains(&net) || net.contains(&**r))
        {
            return Err(AdvertiseError::Overlap(net, *other));
        }
        routes.push(net);
    }
    routes.sort();
    Ok(routes)
}

#[cfg(test)]
mod tests;
