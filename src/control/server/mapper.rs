//! Builds wire messages (tailcfg) from the lab policy's plain records: register answers, the
//! full map, and deltas per event.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use tern_lab::control::{
    self as policy, NodeChanges, NodeRecord, NodeUpdate, RegisterInput, Tailnet, LAB_USER_ID,
};

use super::Event;
use crate::control::tailcfg::{
    CapGrant, CapMap, Debug, DerpMap, DerpNode, DerpRegion, DnsConfig, FilterRule, GoTime,
    Hostinfo, Login, MapRequest, MapResponse, NetPortRange, Node, PeerChange, PortRange,
    RegisterRequest, RegisterResponse, Resolver, User, UserProfile,
};
use crate::keys::MachinePublic;

/// "Everything may have changed": peers get the whole node again.
pub(super) const ALL_CHANGED: NodeChanges = NodeChanges {
    endpoints: true,
    home_derp: true,
    disco_key: true,
    node_key: true,
    cap_version: true,
    hostinfo: true,
    routes: true,
};

/// What one map stream has told its node so far.
#[derive(Debug, Default)]
pub(super) struct StreamState {
    last_filter: Option<Vec<FilterRule>>,
}

/// The policy's view of a register request. A non-zero expiry in the past is a logout.
pub(super) fn register_input(req: &RegisterRequest, machine: &MachinePublic) -> RegisterInput {
    let now = time::OffsetDateTime::now_utc();
    let logout = req.expiry.datetime().is_some_and(|t| t < now);
    let hostinfo = req
        .hostinfo
        .as_ref()
        .and_then(|h| serde_json::to_value(h).ok())
        .unwrap_or_else(|| serde_json::json!({}));
    RegisterInput {
        machine_key: machine.to_string(),
        node_key: req.node_key.to_string(),
        old_node_key: (!req.old_node_key.is_zero()).then(|| req.old_node_key.to_string()),
        auth_key: req
            .auth
            .as_ref()
            .map(|a| a.auth_key.clone())
            .filter(|k| !k.is_empty()),
        hostinfo,
        ephemeral: req.ephemeral,
        logout,
        version: u32::try_from(req.version).unwrap_or(0),
        followup: (!req.followup.is_empty()).then(|| req.followup.clone()),
    }
}

/// The policy's view of the node state a map request carries.
pub(super) fn node_update(req: &MapRequest) -> NodeUpdate {
    NodeUpdate {
        disco_key: (!req.disco_key.is_zero()).then(|| req.disco_key.to_string()),
        hostinfo: req
            .hostinfo
            .as_ref()
            .and_then(|h| serde_json::to_value(h).ok()),
        endpoints: (!req.endpoints.is_empty()).then(|| req.endpoints.clone()),
        version: u32::try_from(req.version).unwrap_or(0),
    }
}

fn lab_user(tailnet: &Tailnet) -> (User, Login, UserProfile) {
    let domain = &tailnet.config().domain;
    let login_name = format!("lab@{domain}");
    let user = User {
        id: LAB_USER_ID as i64,
        display_name: "lab".into(),
        profile_pic_url: String::new(),
        created: GoTime::from_unix(0),
    };
    let login = Login {
        id: LAB_USER_ID as i64,
        provider: "tern-lab".into(),
        login_name: login_name.clone(),
        display_name: "lab".into(),
        profile_pic_url: String::new(),
    };
    let profile = UserProfile {
        id: LAB_USER_ID as i64,
        login_name,
        display_name: "lab".into(),
        profile_pic_url: String::new(),
    };
    (user, login, profile)
}

pub(super) fn register_success(tailnet: &Tailnet, _node_id: u64) -> RegisterResponse {
    let (user, login, _) = lab_user(tailnet);
    RegisterResponse {
        user,
        login,
        machine_authorized: true,
        ..RegisterResponse::default()
    }
}

pub(super) fn register_logged_out() -> RegisterResponse {
    RegisterResponse {
        node_key_expired: true,
        ..RegisterResponse::default()
    }
}

/// "Visit this URL" (an interactive login that is not approved yet).
pub(super) fn register_needs_login(auth_url: String) -> RegisterResponse {
    RegisterResponse {
        auth_url,
        ..RegisterResponse::default()
    }
}

pub(super) fn register_error(reason: &str) -> RegisterResponse {
    RegisterResponse {
        error: reason.to_string(),
        ..RegisterResponse::default()
    }
}

pub(super) fn keep_alive() -> MapResponse {
    MapResponse::keep_alive()
}

/// The first message of a stream: self, DERP map, every peer, filter, domain, user.
pub(super) fn full_map(
    tailnet: &Tailnet,
    node_id: u64,
    state: &mut StreamState,
) -> Option<MapResponse> {
    let me = tailnet.node(node_id)?;
    let (_, _, profile) = lab_user(tailnet);
    let filter = packet_filter(tailnet, node_id);
    state.last_filter = Some(filter.clone());
    Some(MapResponse {
        node: Some(wire_node(tailnet, me, true)),
        derp_map: Some(derp_map(tailnet.config())),
        peers: peers_of(tailnet, node_id)
            .map(|n| wire_node(tailnet, n, false))
            .collect(),
        packet_filter: Some(filter),
        domain: tailnet.config().domain.clone(),
        dns_config: Some(dns_config(tailnet.config())),
        user_profiles: vec![profile],
        collect_services: Some(false),
        debug: Some(Debug {
            disable_log_tail: true,
            ..Debug::default()
        }),
        control_time: Some(GoTime::now()),
        ..MapResponse::default()
    })
}

/// `[dns]` as Tailscale's control sends it: with MagicDNS the tailnet domain leads the search
/// domains and `Proxied` is set; nameservers become `Resolvers`, split routes `Routes`.
fn dns_config(config: &policy::Config) -> DnsConfig {
    let resolvers = |ips: &[IpAddr]| -> Vec<Resolver> {
        ips.iter()
            .map(|ip| Resolver {
                addr: ip.to_string(),
                ..Resolver::default()
            })
            .collect()
    };
    let dns = &config.dns;
    let mut domains = Vec::new();
    if dns.magic_dns {
        domains.push(config.domain.clone());
    }
    domains.extend(dns.search_domains.iter().cloned());
    DnsConfig {
        resolvers: resolvers(&dns.nameservers),
        routes: dns
            .routes
            .iter()
            .map(|r| {
                let suffix = format!("{}.", r.suffix.trim_end_matches('.'));
                (suffix, Some(resolvers(&r.resolvers)))
            })
            .collect(),
        domains,
        proxied: dns.magic_dns,
        ..DnsConfig::default()
    }
}

fn peers_of(tailnet: &Tailnet, node_id: u64) -> impl Iterator<Item = &NodeRecord> {
    tailnet
        .nodes()
        .iter()
        .filter(move |n| n.id != node_id && !n.logged_out)
}

/// What node `node_id` must hear about `event`, if anything.
pub(super) fn delta(
    tailnet: &Tailnet,
    node_id: u64,
    event: &Event,
    state: &mut StreamState,
) -> Option<MapResponse> {
    let mut msg = MapResponse::default();
    match *event {
        Event::Added(id) if id != node_id => {
            msg.peers_changed = tailnet
                .node(id)
                .map(|n| wire_node(tailnet, n, false))
                .into_iter()
                .collect();
            msg.user_profiles = vec![lab_user(tailnet).2];
        }
        Event::Changed(id, changes) if id != node_id => {
            let node = tailnet.node(id)?;
            if node.logged_out {
                msg.peers_removed = vec![id as i64];
            } else if changes.hostinfo || changes.node_key || changes.routes {
                // PeerChange has no AllowedIPs: a route change needs the whole node.
                msg.peers_changed = vec![wire_node(tailnet, node, false)];
            } else if changes.any() {
                msg.peers_changed_patch = vec![patch(node, &changes)];
            }
        }
        Event::Changed(id, changes) if changes.routes => {
            // The node's own AllowedIPs / PrimaryRoutes changed: tell it which routes it serves.
            msg.node = tailnet.node(id).map(|n| wire_node(tailnet, n, true));
        }
        Event::Removed(id) if id != node_id => msg.peers_removed = vec![id as i64],
        Event::Online(id, online) if id != node_id => {
            msg.online_change = BTreeMap::from([(id as i64, online)]);
        }
        _ => {}
    }
    if !matches!(event, Event::Online(..)) {
        let filter = packet_filter(tailnet, node_id);
        if state.last_filter.as_ref() != Some(&filter) {
            state.last_filter = Some(filter.clone());
            msg.packet_filter = Some(filter);
        }
    }
    (msg != MapResponse::default()).then_some(msg)
}

fn patch(node: &NodeRecord, changes: &NodeChanges) -> PeerChange {
    let wire = |n: &NodeRecord| (n.disco_key.parse().ok(), n.node_key.parse().ok());
    let (disco, key) = wire(node);
    PeerChange {
        node_id: node.id as i64,
        derp_region: if changes.home_derp {
            node.home_derp as i32
        } else {
            0
        },
        cap: if changes.cap_version {
            node.cap_version as i32
        } else {
            0
        },
        endpoints: changes.endpoints.then(|| {
            node.endpoints
                .iter()
                .filter_map(|e| e.parse().ok())
                .collect()
        }),
        disco_key: if changes.disco_key { disco } else { None },
        key: if changes.node_key { key } else { None },
        ..PeerChange::default()
    }
}

/// A policy node record as a tailcfg Node. The self node gets the configured node attributes.
fn wire_node(tailnet: &Tailnet, n: &NodeRecord, is_self: bool) -> Node {
    let hostinfo: Hostinfo = serde_json::from_value(n.hostinfo.clone()).unwrap_or_default();
    let addresses = vec![
        IpNet::from(IpAddr::V4(n.ipv4)),
        IpNet::from(IpAddr::V6(n.ipv6)),
    ];
    let routes = tailnet.approved_routes(n);
    // As Tailscale's control: AllowedIPs = addresses + approved routes (exit routes included),
    // PrimaryRoutes = the approved subnet routes only.
    let allowed_ips = addresses.iter().chain(&routes).copied().collect();
    let cap_map: CapMap = if is_self {
        tailnet
            .config()
            .node_attributes_of(n.hostname().unwrap_or(""))
            .into_iter()
            .map(|a| (a, None))
            .collect()
    } else {
        CapMap::new()
    };
    Node {
        id: n.id as i64,
        stable_id: n.stable_id.clone(),
        name: format!("{}.{}.", n.name, tailnet.config().domain),
        user: LAB_USER_ID as i64,
        key: n.node_key.parse().unwrap_or_default(),
        key_expiry: n.key_expiry_unix.map_or(GoTime::ZERO, |t| {
            GoTime::from_unix(i64::try_from(t).unwrap_or(i64::MAX))
        }),
        machine: n.machine_key.parse().unwrap_or_default(),
        disco_key: n.disco_key.parse().unwrap_or_default(),
        addresses,
        allowed_ips: Some(allowed_ips),
        primary_routes: policy::primary_routes(&routes),
        endpoints: n.endpoints.iter().filter_map(|e| e.parse().ok()).collect(),
        home_derp: n.home_derp as i32,
        hostinfo,
        created: GoTime::from_unix(n.created_unix as i64),
        cap: n.cap_version as i32,
        online: Some(n.online),
        last_seen: (!n.online)
            .then(|| n.last_seen_unix.map(|t| GoTime::from_unix(t as i64)))
            .flatten(),
        machine_authorized: true,
        cap_map,
        expired: n.key_expired(super::now_unix()),
        ..Node::default()
    }
}

fn derp_map(config: &policy::Config) -> DerpMap {
    let regions = config
        .derp_regions
        .iter()
        .map(|r| {
            let region = DerpRegion {
                region_id: r.id as i32,
                region_code: r.code.clone(),
                region_name: r.name.clone(),
                no_measure_no_home: r.no_measure_no_home,
                nodes: r
                    .nodes
                    .iter()
                    .map(|d| DerpNode {
                        name: d.name.clone(),
                        region_id: r.id as i32,
                        host_name: d.host_name.clone(),
                        cert_name: d.cert_name.clone(),
                        ipv4: d.ipv4.clone(),
                        ipv6: d.ipv6.clone(),
                        stun_port: d.stun_port,
                        stun_only: d.stun_only,
                        derp_port: i32::from(d.derp_port),
                        insecure_for_tests: d.insecure_for_tests,
                        stun_test_ip: d.stun_test_ip.clone(),
                        can_port80: d.can_port80,
                    })
                    .collect(),
                ..DerpRegion::default()
            };
            (r.id as i32, Some(region))
        })
        .collect();
    DerpMap {
        regions: Some(regions),
        omit_default_regions: true,
        ..DerpMap::default()
    }
}

fn packet_filter(tailnet: &Tailnet, node_id: u64) -> Vec<FilterRule> {
    tailnet
        .packet_filter(node_id)
        .into_iter()
        .map(wire_rule)
        .collect()
}

fn wire_rule(rule: policy::FilterRule) -> FilterRule {
    FilterRule {
        src_ips: rule.src_ips,
        dst_ports: rule
            .dst_ports
            .into_iter()
            .map(|d| NetPortRange {
                ip: d.ip,
                bits: None,
                ports: PortRange {
                    first: d.first,
                    last: d.last,
                },
            })
            .collect(),
        ip_proto: rule.ip_proto.into_iter().map(i32::from).collect(),
        cap_grant: rule
            .cap_grants
            .into_iter()
            .map(|g| CapGrant {
                dsts: g.dsts.iter().filter_map(|d| d.parse().ok()).collect(),
                caps: Vec::new(),
                cap_map: g.caps.into_iter().map(|c| (c, Some(Vec::new()))).collect(),
            })
            .collect(),
        ..FilterRule::default()
    }
}

#[cfg(test)]
mod tests;
