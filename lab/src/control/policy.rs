//! [`Tailnet`]: the registered nodes and the rules that decide who may join and what they see.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use serde_json::Value;
use tracing::info;

use super::addr;
use super::config::{parse_dst, Config, GrantConfig, CAP_RELAY, CAP_RELAY_TARGET};
use super::db::{ensure_state_dir, NodeDb, NodeRecord};
use super::ControlError;

/// The one user every lab node belongs to.
pub const LAB_USER_ID: u64 = 1;

/// What a `/machine/register` request asks, reduced to what policy needs.
#[derive(Debug, Clone, Default)]
pub struct RegisterInput {
    /// Machine key from the Noise session (`mkey:…`).
    pub machine_key: String,
    /// Node key being registered (`nodekey:…`).
    pub node_key: String,
    /// Previous node key during rotation; `None` when absent or all-zero.
    pub old_node_key: Option<String>,
    /// Pre-auth key, if the node sent one.
    pub auth_key: Option<String>,
    /// Hostinfo as sent.
    pub hostinfo: Value,
    /// Whether the node asks to be ephemeral.
    pub ephemeral: bool,
    /// Whether the request is a logout (expiry in the past).
    pub logout: bool,
    /// Capability version of the client.
    pub version: u32,
    /// The login URL of an earlier answer that this request waits on (`Followup`), if any.
    pub followup: Option<String>,
}

/// Result of a registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegisterOutcome {
    /// The node is registered; `created` when it is new to the tailnet.
    Accepted { node_id: u64, created: bool },
    /// The node logged out; `deleted` when it was ephemeral and is gone.
    LoggedOut { node_id: Option<u64>, deleted: bool },
    /// Registration refused; the text goes into `RegisterResponse.Error`.
    Rejected(String),
    /// The node key belongs to another machine (answer 401).
    MachineMismatch,
    /// The node key has expired: the node must make a new one and log in again.
    KeyExpired { node_id: u64 },
    /// An interactive login is pending: the node must visit `/register/<login_id>` (and wait
    /// for it to be approved there).
    NeedsLogin { login_id: String },
}

/// Node state carried by a `/machine/map` request.
#[derive(Debug, Clone, Default)]
pub struct NodeUpdate {
    /// Disco key (`discokey:…`), if the request had a non-zero one.
    pub disco_key: Option<String>,
    /// Hostinfo, if the request had one.
    pub hostinfo: Option<Value>,
    /// Endpoints, if the request had any.
    pub endpoints: Option<Vec<String>>,
    /// Capability version.
    pub version: u32,
}

/// Which parts of a node a [`NodeUpdate`] or registration changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeChanges {
    pub endpoints: bool,
    pub home_derp: bool,
    pub disco_key: bool,
    pub node_key: bool,
    pub cap_version: bool,
    pub hostinfo: bool,
    /// The node's approved routes changed (peers need the whole node: `AllowedIPs`).
    pub routes: bool,
}

impl NodeChanges {
    /// Whether anything peers can see changed.
    pub fn any(&self) -> bool {
        self.endpoints
            || self.home_derp
            || self.disco_key
            || self.node_key
            || self.cap_version
            || self.hostinfo
            || self.routes
    }
}

/// One packet filter rule for a node, in plain form (the protocol side renders tailcfg JSON).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterRule {
    /// Source IP sets (`*`, IP, CIDR, range).
    pub src_ips: Vec<String>,
    /// Destination ports (empty for capability-only rules).
    pub dst_ports: Vec<DstPortRange>,
    /// IP protocols; empty = default set.
    pub ip_proto: Vec<u8>,
    /// Capability grants (empty for network rules).
    pub cap_grants: Vec<CapGrantRule>,
}

/// A destination and port range of a network rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DstPortRange {
    pub ip: String,
    pub first: u16,
    pub last: u16,
}

/// Capabilities granted to a rule's sources on some destination prefixes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapGrantRule {
    /// Destination prefixes (`/32`, `/128`).
    pub dsts: Vec<String>,
    /// Capability names; values are empty.
    pub caps: Vec<String>,
}

/// The lab tailnet: configuration plus node database.
#[derive(Debug)]
pub struct Tailnet {
    config: Config,
    db: NodeDb,
    /// Interactive logins waiting for approval, by login ID (memory only: a restart forgets them).
    logins: login::PendingLogins,
}

impl Tailnet {
    /// Opens the tailnet: creates the state directory and loads the node database.
    pub fn open(config: Config) -> Result<Self, ControlError> {
        ensure_state_dir(&config.state_dir)?;
        let db = NodeDb::load(&config.state_dir)?;
        Ok(Tailnet {
            config,
            db,
            logins: login::PendingLogins::default(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// All nodes, sorted by ID.
    pub fn nodes(&self) -> &[NodeRecord] {
        &self.db.nodes
    }

    /// The node with this ID.
    pub fn node(&self, id: u64) -> Option<&NodeRecord> {
        self.db.nodes.iter().find(|n| n.id == id)
    }

    fn node_mut(&mut self, id: u64) -> Option<&mut NodeRecord> {
        self.db.nodes.iter_mut().find(|n| n.id == id)
    }

    fn node_by_node_key(&self, node_key: &str) -> Option<&NodeRecord> {
        self.db.nodes.iter().find(|n| n.node_key == node_key)
    }

    /// The routes `node` advertises and this tailnet approves (subnet routes and exit routes).
    pub fn approved_routes(&self, node: &NodeRecord) -> Vec<IpNet> {
        routes::approved_routes(&self.config, node)
    }

    /// The node a map request speaks for: its node key must exist, belong to this machine, and
    /// not be logged out.
    pub fn authorize_map(
        &self,
        node_key: &str,
        machine_key: &str,
    ) -> Result<&NodeRecord, ControlError> {
        let node = self
            .node_by_node_key(node_key)
            .ok_or(ControlError::UnknownNode)?;
        if node.machine_key != machine_key {
            return Err(ControlError::MachineMismatch);
        }
        if node.logged_out {
            return Err(ControlError::UnknownNode);
        }
        Ok(node)
    }

    /// The pre-auth-key registration flow (control.md §4.3).
    pub fn register(
        &mut self,
        req: &RegisterInput,
        now_unix: u64,
    ) -> Result<RegisterOutcome, ControlError> {
        if req.logout {
            return self.logout(req);
        }
        if let Some(node) = self.node_by_node_key(&req.node_key) {
            if node.machine_key != req.machine_key {
                return Ok(RegisterOutcome::MachineMismatch);
            }
            if node.key_expired(now_unix) && !node.logged_out {
                // Go's client answers this by making a new key and registering it with
                // `OldNodeKey`, which then needs a login (below).
                return Ok(RegisterOutcome::KeyExpired { node_id: node.id });
            }
            if !node.logged_out {
                // A restart re-sends the same key (and auth key, maybe already used): idempotent.
                let node_id = node.id;
                self.refresh_hostinfo(node_id, &req.hostinfo, req.version)?;
                return Ok(RegisterOutcome::Accepted {
                    node_id,
                    created: false,
                });
            }
        }
        if let Some(old) = req.old_node_key.as_deref() {
            // A rotation of a live key is free; an expired key is renewed only by a login.
            if let Some(node) = self
                .node_by_node_key(old)
                .filter(|n| !n.key_expired(now_unix) && !n.logged_out)
            {
                if node.machine_key != req.machine_key {
                    return Ok(RegisterOutcome::MachineMismatch);
                }
                let node_id = node.id;
                self.rekey(node_id, &req.node_key, now_unix)?;
                self.refresh_hostinfo(node_id, &req.hostinfo, req.version)?;
                return Ok(RegisterOutcome::Accepted {
                    node_id,
                    created: false,
                });
            }
        }
        let Some(auth_key) = req.auth_key.as_deref() else {
            return self.interactive(req, now_unix);
        };
        if let Err(reason) = self.check_auth_key(auth_key, &req.machine_key) {
            return Ok(RegisterOutcome::Rejected(reason));
        }
        self.admit(req, Some(auth_key), now_unix)
    }

    /// Checks a pre-auth key: known, and unused unless reusable or used by this same machine.
    fn check_auth_key(&self, auth_key: &str, machine_key: &str) -> Result<(), String> {
        let Some(key) = self.config.auth_key(auth_key) else {
            return Err("invalid authkey".into());
        };
        if !key.reusable {
            if let Some(user) = self.db.used_auth_keys.get(auth_key) {
                if user != machine_key {
                    return Err("authkey already used".into());
                }
            }
        }
        Ok(())
    }

    /// Admits a machine with a valid pre-auth key: reuses its node (and addresses) if it has
    /// one, otherwise creates a node.
    fn admit(
        &mut self,
        req: &RegisterInput,
        auth_key: Option<&str>,
        now_unix: u64,
    ) -> Result<RegisterOutcome, ControlError> {
        let key = auth_key.and_then(|k| self.config.auth_key(k));
        let ephemeral = req.ephemeral || key.is_some_and(|k| k.ephemeral);
        if let Some(auth_key) = auth_key.filter(|_| !key.is_some_and(|k| k.reusable)) {
            self.db
                .used_auth_keys
                .insert(auth_key.to_string(), req.machine_key.clone());
        }
        let existing = self
            .db
            .nodes
            .iter()
            .find(|n| n.machine_key == req.machine_key)
            .map(|n| n.id);
        if let Some(node_id) = existing {
            self.rekey(node_id, &req.node_key, now_unix)?;
            if let Some(node) = self.node_mut(node_id) {
                node.logged_out = false;
                node.ephemeral = ephemeral;
            }
            self.refresh_hostinfo(node_id, &req.hostinfo, req.version)?;
            return Ok(RegisterOutcome::Accepted {
                node_id,
                created: false,
            });
        }
        let ipv4 =
            addr::next_free_v4(&self.db.used_v4()).ok_or(ControlError::AddressesExhausted)?;
        let id = self.db.next_id;
        self.db.next_id += 1;
        let hostname = req
            .hostinfo
            .get("Hostname")
            .and_then(Value::as_str)
            .unwrap_or("");
        let name = self.unique_name(hostname, id);
        self.db.nodes.push(NodeRecord {
            id,
            stable_id: format!("nLab{id:08}"),
            machine_key: req.machine_key.clone(),
            node_key: req.node_key.clone(),
            disco_key: String::new(),
            name,
            ipv4,
            ipv6: addr::v6_for(ipv4),
            hostinfo: object_or_empty(&req.hostinfo),
            endpoints: Vec::new(),
            home_derp: 0,
            cap_version: req.version,
            ephemeral,
            logged_out: false,
            created_unix: now_unix,
            key_expiry_unix: self.key_expiry_from(now_unix),
            online: false,
            last_seen_unix: None,
        });
        self.save()?;
        Ok(RegisterOutcome::Accepted {
            node_id: id,
            created: true,
        })
    }

    fn logout(&mut self, req: &RegisterInput) -> Result<RegisterOutcome, ControlError> {
        let Some(node) = self.node_by_node_key(&req.node_key) else {
            return Ok(RegisterOutcome::LoggedOut {
                node_id: None,
                deleted: false,
            });
        };
        if node.machine_key != req.machine_key {
            return Ok(RegisterOutcome::MachineMismatch);
        }
        let (node_id, ephemeral) = (node.id, node.ephemeral);
        if ephemeral {
            self.remove_node(node_id)?;
        } else if let Some(node) = self.node_mut(node_id) {
            node.logged_out = true;
            self.save()?;
        }
        Ok(RegisterOutcome::LoggedOut {
            node_id: Some(node_id),
            deleted: ephemeral,
        })
    }

    /// Gives node `node_id` the key `node_key`; a new key gets a new expiry.
    fn rekey(&mut self, node_id: u64, node_key: &str, now_unix: u64) -> Result<(), ControlError> {
        let expiry = self.key_expiry_from(now_unix);
        if let Some(node) = self.node_mut(node_id) {
            if node.node_key != node_key || node.key_expired(now_unix) {
                node.node_key = node_key.to_string();
                node.key_expiry_unix = expiry;
                self.save()?;
            }
        }
        Ok(())
    }

    /// The expiry a key registered at `now_unix` gets (`node_key_expiry_secs`).
    fn key_expiry_from(&self, now_unix: u64) -> Option<u64> {
        self.config
            .node_key_expiry_secs
            .map(|secs| now_unix.saturating_add(secs))
    }

    fn refresh_hostinfo(
        &mut self,
        node_id: u64,
        hostinfo: &Value,
        version: u32,
    ) -> Result<(), ControlError> {
        let update = NodeUpdate {
            hostinfo: Some(hostinfo.clone()),
            version,
            ..NodeUpdate::default()
        };
        self.update_node(node_id, &update).map(|_| ())
    }

    /// Applies the state a map request carries; returns what changed. NetInfo is kept when the
    /// new Hostinfo omits it, and the home DERP follows `NetInfo.PreferredDERP`.
    pub fn update_node(
        &mut self,
        node_id: u64,
        update: &NodeUpdate,
    ) -> Result<NodeChanges, ControlError> {
        let routes_before = self
            .node(node_id)
            .map(|n| self.approved_routes(n))
            .ok_or(ControlError::UnknownNode)?;
        let changes = self.apply_update(node_id, update)?;
        let routes_after = self
            .node(node_id)
            .map(|n| self.approved_routes(n))
            .unwrap_or_default();
        let changes = NodeChanges {
            routes: routes_before != routes_after,
            ..changes
        };
        if routes_before != routes_after {
            info!(node_id, routes = ?routes_after, "approved routes changed");
        }
        // NetInfo-only changes (latencies) are kept in memory but not worth a disk write.
        if changes.any() {
            self.save()?;
        }
        Ok(changes)
    }

    /// [`Tailnet::update_node`] without the route bookkeeping and the save.
    fn apply_update(
        &mut self,
        node_id: u64,
        update: &NodeUpdate,
    ) -> Result<NodeChanges, ControlError> {
        let node = self.node_mut(node_id).ok_or(ControlError::UnknownNode)?;
        let mut changes = NodeChanges::default();
        if let Some(disco) = &update.disco_key {
            changes.disco_key = set_if_changed(&mut node.disco_key, disco.clone());
        }
        if let Some(hostinfo) = &update.hostinfo {
            let merged = merge_hostinfo(&node.hostinfo, hostinfo);
            let derp = preferred_derp(&merged);
            // NetInfo churns (DERP latencies); peers care about its home DERP and the NAT facts
            // that explain why a direct path fails (rare changes).
            changes.hostinfo = without_netinfo(&node.hostinfo) != without_netinfo(&merged)
                || nat_facts(&node.hostinfo) != nat_facts(&merged);
            node.hostinfo = merged;
            if derp != 0 {
                changes.home_derp = set_if_changed(&mut node.home_derp, derp);
            }
        }
        if let Some(endpoints) = &update.endpoints {
            changes.endpoints = set_if_changed(&mut node.endpoints, usable_endpoints(endpoints));
        }
        if update.version != 0 {
            changes.cap_version = set_if_changed(&mut node.cap_version, update.version);
        }
        Ok(changes)
    }

    /// Records whether a node has a live map stream; returns whether that changed.
    pub fn set_online(&mut self, node_id: u64, online: bool, now_unix: u64) -> bool {
        let Some(node) = self.node_mut(node_id) else {
            return false;
        };
        node.last_seen_unix = Some(now_unix);
        set_if_changed(&mut node.online, online)
    }

    /// Removes a node; returns whether it existed.
    pub fn remove_node(&mut self, node_id: u64) -> Result<bool, ControlError> {
        let before = self.db.nodes.len();
        self.db.nodes.retain(|n| n.id != node_id);
        let removed = self.db.nodes.len() != before;
        if removed {
            self.save()?;
        }
        Ok(removed)
    }

    /// The packet filter for one node: the configured rules (allow-all when none) followed by
    /// the capability grants whose destination is this node.
    pub fn packet_filter(&self, node_id: u64) -> Vec<FilterRule> {
        let Some(node) = self.node(node_id) else {
            return Vec::new();
        };
        let mut rules = self.network_rules();
        for grant in &self.config.grants {
            rules.extend(self.grant_rules(grant, node));
        }
        rules
    }

    fn network_rules(&self) -> Vec<FilterRule> {
        if self.config.filters.is_empty() {
            return vec![FilterRule {
                src_ips: vec!["*".into()],
                dst_ports: vec![DstPortRange {
                    ip: "*".into(),
                    first: 0,
                    last: u16::MAX,
                }],
                ip_proto: Vec::new(),
                cap_grants: Vec::new(),
            }];
        }
        self.config
            .filters
            .iter()
            .map(|f| FilterRule {
                src_ips: f.src.clone(),
                dst_ports: f
                    .dst
                    .iter()
                    .filter_map(|d| parse_dst(d).ok())
                    .map(|(ip, first, last)| DstPortRange { ip, first, last })
                    .collect(),
                ip_proto: f.proto.clone(),
                cap_grants: Vec::new(),
            })
            .collect()
    }

    /// Rules one grant contributes to `node`'s filter: the grant itself when `node` is a
    /// destination, and the companion `relay-target` rule when `node` is a source of a relay
    /// grant (peer-relay.md §1.3).
    fn grant_rules(&self, grant: &GrantConfig, node: &NodeRecord) -> Vec<FilterRule> {
        let mut rules = Vec::new();
        let own = vec![format!("{}/32", node.ipv4), format!("{}/128", node.ipv6)];
        if self.selects(&grant.dst, node) {
            if let Some(src_ips) = self.selector_ips(&grant.src) {
                rules.push(cap_rule(src_ips, own.clone(), grant.caps.clone()));
            }
        }
        if grant.caps.iter().any(|c| c == CAP_RELAY) && self.selects(&grant.src, node) {
            if let Some(src_ips) = self.selector_ips(&grant.dst) {
                rules.push(cap_rule(src_ips, own, vec![CAP_RELAY_TARGET.to_string()]));
            }
        }
        rules
    }

    /// Whether a grant selector (`*`, hostname, node name or tailnet IP) matches a node.
    fn selects(&self, selector: &[String], node: &NodeRecord) -> bool {
        selector.iter().any(|s| {
            s == "*"
                || s == &node.name
                || Some(s.as_str()) == node.hostname()
                || s.parse::<IpAddr>()
                    .is_ok_and(|ip| ip == IpAddr::V4(node.ipv4) || ip == IpAddr::V6(node.ipv6))
        })
    }

    /// Source IPs for a selector: `*` stays `*`; otherwise the addresses of matching nodes.
    /// `None` when nothing matches (the rule would be empty).
    fn selector_ips(&self, selector: &[String]) -> Option<Vec<String>> {
        if selector.iter().any(|s| s == "*") {
            return Some(vec!["*".into()]);
        }
        let ips: Vec<String> = self
            .db
            .nodes
            .iter()
            .filter(|n| self.selects(selector, n))
            .flat_map(|n| [n.ipv4.to_string(), n.ipv6.to_string()])
            .collect();
        (!ips.is_empty()).then_some(ips)
    }

    /// A DNS label from a hostname, unique among the other nodes.
    fn unique_name(&self, hostname: &str, id: u64) -> String {
        let base = dns_label(hostname);
        let taken = |name: &str| self.db.nodes.iter().any(|n| n.id != id && n.name == name);
        if !taken(&base) {
            return base;
        }
        (2..)
            .map(|i| format!("{base}-{i}"))
            .find(|n| !taken(n))
            .unwrap_or(base)
    }

    fn save(&self) -> Result<(), ControlError> {
        self.db.save(&self.config.state_dir)
    }
}

fn cap_rule(src_ips: Vec<String>, dsts: Vec<String>, caps: Vec<String>) -> FilterRule {
    FilterRule {
        src_ips,
        dst_ports: Vec::new(),
        ip_proto: Vec::new(),
        cap_grants: vec![CapGrantRule { dsts, caps }],
    }
}

fn set_if_changed<T: PartialEq>(slot: &mut T, value: T) -> bool {
    if *slot == value {
        return false;
    }
    *slot = value;
    true
}

fn object_or_empty(value: &Value) -> Value {
    if value.is_object() {
        value.clone()
    } else {
        Value::Object(Default::default())
    }
}

/// The new Hostinfo, with the old `NetInfo` carried over when the new one lacks it.
fn merge_hostinfo(old: &Value, new: &Value) -> Value {
    let mut merged = object_or_empty(new);
    let new_has_netinfo = new.get("NetInfo").is_some_and(|n| !n.is_null());
    if let (false, Some(old_netinfo), Some(map)) =
        (new_has_netinfo, old.get("NetInfo"), merged.as_object_mut())
    {
        if !old_netinfo.is_null() {
            map.insert("NetInfo".into(), old_netinfo.clone());
        }
    }
    merged
}

fn without_netinfo(hostinfo: &Value) -> Value {
    let mut copy = hostinfo.clone();
    if let Some(map) = copy.as_object_mut() {
        map.remove("NetInfo");
    }
    copy
}

/// `NetInfo.MappingVariesByDestIP` and `WorkingUDP`: what peers show as the reason for a
/// DERP-only path.
fn nat_facts(hostinfo: &Value) -> (Option<&Value>, Option<&Value>) {
    let net_info = hostinfo.get("NetInfo");
    (
        net_info.and_then(|n| n.get("MappingVariesByDestIP")),
        net_info.and_then(|n| n.get("WorkingUDP")),
    )
}

fn preferred_derp(hostinfo: &Value) -> u32 {
    hostinfo
        .get("NetInfo")
        .and_then(|n| n.get("PreferredDERP"))
        .and_then(Value::as_u64)
        .and_then(|d| u32::try_from(d).ok())
        .unwrap_or(0)
}

/// Endpoints worth giving to peers: parseable, and not IPv6 link-local or zoned.
fn usable_endpoints(endpoints: &[String]) -> Vec<String> {
    endpoints
        .iter()
        .filter(|e| match e.parse::<SocketAddr>() {
            Ok(SocketAddr::V6(v6)) => (v6.ip().segments()[0] & 0xffc0) != 0xfe80,
            Ok(SocketAddr::V4(_)) => true,
            Err(_) => false,
        })
        .cloned()
        .collect()
}

/// A DNS label from a hostname: lowercase a-z, 0-9 and '-', at most 63 characters.
fn dns_label(hostname: &str) -> String {
    let mapped: String = hostname
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let trimmed: String = mapped.trim_matches('-').chars().take(63).collect();
    let trimmed = trimmed.trim_end_matches('-').to_string();
    if trimmed.is_empty() {
        "node".into()
    } else {
        trimmed
    }
}

pub mod login;
pub mod routes;
#[cfg(test)]
mod tests;
