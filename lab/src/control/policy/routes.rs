//! Route approval: which of the routes a node advertises (`Hostinfo.RoutableIPs`) the lab
//! tailnet lets it offer to its peers.

use ipnet::IpNet;
use serde_json::Value;
use tracing::debug;

use crate::control::config::{is_tailnet_range, Config};
use crate::control::db::NodeRecord;

/// `0.0.0.0/0` and `::/0`: what an exit node advertises, always together.
fn is_exit_route(route: &IpNet) -> bool {
    route.prefix_len() == 0
}

/// The routes a node advertises in its Hostinfo: masked, outside the tailnet ranges, sorted and
/// without duplicates. Anything else is ignored (a Go client only sends masked prefixes).
pub fn advertised_routes(hostinfo: &Value) -> Vec<IpNet> {
    let Some(list) = hostinfo.get("RoutableIPs").and_then(Value::as_array) else {
        return Vec::new();
    };
    let mut routes: Vec<IpNet> = list
        .iter()
        .filter_map(|v| {
            let net = v.as_str()?.parse::<IpNet>().ok();
            if net.is_none_or(|n| n.trunc() != n || is_tailnet_range(&n)) {
                debug!(route = %v, "ignoring unusable advertised route");
                return None;
            }
            net
        })
        .collect();
    routes.sort();
    routes.dedup();
    routes
}

/// The routes of `node` that are advertised and approved. Exit routes come as a pair or not at
/// all: one of them alone would make a half exit node.
pub fn approved_routes(config: &Config, node: &NodeRecord) -> Vec<IpNet> {
    let hostname = node.hostname().unwrap_or("");
    let mut routes: Vec<IpNet> = advertised_routes(&node.hostinfo)
        .into_iter()
        .filter(|r| config.route_approved(hostname, r))
        .collect();
    if routes.iter().filter(|r| is_exit_route(r)).count() != 2 {
        routes.retain(|r| !is_exit_route(r));
    }
    routes
}

/// Approved routes a peer should route to this node as a subnet router (`Node.PrimaryRoutes`):
/// the exit routes are not among them, as in Tailscale's control.
pub fn primary_routes(approved: &[IpNet]) -> Vec<IpNet> {
    approved
        .iter()
        .filter(|r| !is_exit_route(r))
        .copied()
        .collect()
}
