//! The node's network map: what one map session has told us so far.
//!
//! A map session starts empty; the first non-keep-alive message is a full map and later ones
//! are deltas. [`NetworkMap::apply_owned`] implements the delta rules of the Go client
//! (`control/controlclient/map.go`) exactly, including nil-vs-empty semantics. Nodes are kept in
//! their wire form (`tailcfg::Node`), normalised on arrival as Go's `upgradeNode` does: a legacy
//! `DERP` string becomes `HomeDERP`, a null `AllowedIPs` becomes a copy of `Addresses`, and the
//! self node's deprecated `Capabilities` are merged into its `CapMap`.

use std::collections::{BTreeMap, HashMap};

use serde_json::Value;

use crate::control::tailcfg::{
    DerpMap, DisplayMessage, DnsConfig, FilterRule, GoTime, MapResponse, Node, NodeId, PeerChange,
    UserId, UserProfile,
};
use crate::keys::NodePublic;

/// Name under which the single `PacketFilter` list is stored.
pub const BASE_FILTER_NAME: &str = "base";

/// State accumulated from one map session.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NetworkMap {
    /// This node, as control describes it. `None` until the first full map.
    pub self_node: Option<Node>,
    /// Peers by node ID (never includes the self node if control follows the protocol).
    pub peers: BTreeMap<NodeId, Node>,
    /// Node key → node ID of the peers, kept in step with `peers`.
    peer_ids_by_key: HashMap<NodePublic, NodeId>,
    /// DERP map with per-field "keep previous" merging applied; null regions dropped.
    pub derp_map: Option<DerpMap>,
    /// Last DNS config (replaced whole).
    pub dns_config: Option<DnsConfig>,
    /// Named packet filters; the effective filter is their concatenation by name.
    pub named_packet_filters: BTreeMap<String, Vec<FilterRule>>,
    /// Tailscale SSH policy (opaque).
    pub ssh_policy: Option<Value>,
    /// Whether to report services in Hostinfo.
    pub collect_services: bool,
    /// Tailnet name.
    pub domain: String,
    /// Data-plane audit log ID of the tailnet.
    pub domain_audit_log_id: String,
    /// Profiles of users referenced by nodes (upsert-only).
    pub user_profiles: BTreeMap<UserId, UserProfile>,
    /// Control-side health messages.
    pub health: Vec<String>,
    /// Display messages by ID.
    pub display_messages: BTreeMap<String, DisplayMessage>,
    /// Tailnet-lock info (opaque; tern does not implement tailnet lock).
    pub tka_info: Option<Value>,
    /// Control's clock from the last message that carried it.
    pub control_time: Option<GoTime>,
}

/// What a message changed, so the caller reconfigures only what it must.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApplySummary {
    /// The message was a keep-alive (only `ControlTime` was looked at).
    pub keep_alive: bool,
    /// The self node was replaced.
    pub self_changed: bool,
    /// Peers were replaced, added, removed or patched.
    pub peers_changed: bool,
    /// The DERP map changed.
    pub derp_changed: bool,
    /// The packet filter changed.
    pub filter_changed: bool,
    /// The DNS config changed.
    pub dns_changed: bool,
}

impl NetworkMap {
    /// An empty map (start of a map session).
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies one message, using the current time for `PeerSeenChange: true`.
    pub fn apply(&mut self, resp: &MapResponse) -> ApplySummary {
        self.apply_at(resp, GoTime::now())
    }

    /// Applies one message; `now` is what `PeerSeenChange: true` records.
    pub fn apply_at(&mut self, resp: &MapResponse, now: GoTime) -> ApplySummary {
        if resp.keep_alive {
            return self.apply_keep_alive(resp);
        }
        self.apply_owned(resp.clone(), now)
    }

    /// Applies one message it may consume (avoids copying large peer lists).
    pub fn apply_owned(&mut self, resp: MapResponse, now: GoTime) -> ApplySummary {
        if resp.keep_alive {
            return self.apply_keep_alive(&resp);
        }
        let mut summary = ApplySummary::default();
        if let Some(t) = resp.control_time {
            self.control_time = Some(t);
        }
        summary.peers_changed = self.apply_peer_changes(
            resp.peers,
            resp.peers_removed,
            resp.peers_changed,
            &resp.peer_seen_change,
            &resp.online_change,
            resp.peers_changed_patch,
            now,
        );
        if let Some(mut node) = resp.node {
            upgrade_node(&mut node);
            merge_capabilities_into_cap_map(&mut node);
            self.self_node = Some(node);
            summary.self_changed = true;
        }
        for profile in resp.user_profiles {
            self.user_profiles.insert(profile.id, profile);
        }
        if let Some(dm) = resp.derp_map {
            self.merge_derp_map(dm);
            summary.derp_changed = true;
        }
        summary.filter_changed = self.apply_filters(resp.packet_filter, resp.packet_filters);
        if let Some(dns) = resp.dns_config {
            self.dns_config = Some(dns);
            summary.dns_changed = true;
        }
        self.apply_misc(
            resp.ssh_policy,
            resp.collect_services,
            resp.domain,
            resp.domain_data_plane_audit_log_id,
            resp.health,
            resp.display_messages,
            resp.tka_info,
        );
        summary
    }

    fn apply_keep_alive(&mut self, resp: &MapResponse) -> ApplySummary {
        if let Some(t) = resp.control_time {
            self.control_time = Some(t);
        }
        ApplySummary {
            keep_alive: true,
            ..ApplySummary::default()
        }
    }

    /// The peer with this node key.
    pub fn peer_by_key(&self, key: &NodePublic) -> Option<&Node> {
        self.peer_ids_by_key
            .get(key)
            .and_then(|id| self.peers.get(id))
    }

    /// The peer with this node ID.
    pub fn peer(&self, id: NodeId) -> Option<&Node> {
        self.peers.get(&id)
    }

    /// The effective packet filter: all named lists concatenated in name order.
    pub fn packet_filter(&self) -> Vec<FilterRule> {
        self.named_packet_filters
            .values()
            .flatten()
            .cloned()
            .collect()
    }

    // --- peers -----------------------------------------------------------------------------

    #[allow(clippy::too_many_arguments)]
    fn apply_peer_changes(
        &mut self,
        full: Vec<Node>,
        removed: Vec<NodeId>,
        changed: Vec<Node>,
        seen: &BTreeMap<NodeId, bool>,
        online: &BTreeMap<NodeId, bool>,
        patches: Vec<PeerChange>,
        now: GoTime,
    ) -> bool {
        if !full.is_empty() {
            // A full list precludes every other peer delta in the same message.
            self.replace_all_peers(full);
            return true;
        }
        let mut any = false;
        for id in removed {
            any |= self.remove_peer(id);
        }
        for node in changed {
            self.upsert_peer(node);
            any = true;
        }
        for (&id, &is_seen) in seen {
            if let Some(peer) = self.peers.get_mut(&id) {
                peer.last_seen = is_seen.then_some(now);
                any = true;
            }
        }
        for (&id, &is_online) in online {
            if let Some(peer) = self.peers.get_mut(&id) {
                peer.online = Some(is_online);
                any = true;
            }
        }
        for patch in patches {
            any |= self.patch_peer(patch);
        }
        any
    }

    fn replace_all_peers(&mut self, full: Vec<Node>) {
        self.peers.clear();
        self.peer_ids_by_key.clear();
        for node in full {
            self.upsert_peer(node);
        }
    }

    fn upsert_peer(&mut self, mut node: Node) {
        upgrade_node(&mut node);
        let id = node.id;
        let key = node.key;
        if let Some(old) = self.peers.insert(id, node) {
            self.unindex_key(&old.key, id);
        }
        self.peer_ids_by_key.insert(key, id);
    }

    fn remove_peer(&mut self, id: NodeId) -> bool {
        match self.peers.remove(&id) {
            Some(old) => {
                self.unindex_key(&old.key, id);
                true
            }
            None => false,
        }
    }

    /// Drops the key → id entry only if it still points at `id`.
    fn unindex_key(&mut self, key: &NodePublic, id: NodeId) {
        if self.peer_ids_by_key.get(key) == Some(&id) {
            self.peer_ids_by_key.remove(key);
        }
    }

    /// Field-wise update of a known peer; unknown IDs are ignored.
    fn patch_peer(&mut self, pc: PeerChange) -> bool {
        let Some(peer) = self.peers.get_mut(&pc.node_id) else {
            return false;
        };
        let old_key = peer.key;
        if pc.derp_region != 0 {
            peer.home_derp = pc.derp_region;
        }
        if pc.cap != 0 {
            peer.cap = pc.cap;
        }
        if let Some(endpoints) = pc.endpoints {
            peer.endpoints = endpoints;
        }
        if let Some(key) = pc.key {
            peer.key = key;
        }
        if let Some(disco) = pc.disco_key {
            peer.disco_key = disco;
        }
        if let Some(online) = pc.online {
            peer.online = Some(online);
        }
        if let Some(seen) = pc.last_seen {
            peer.last_seen = Some(seen);
        }
        if let Some(expiry) = pc.key_expiry {
            peer.key_expiry = expiry;
        }
        if let Some(sig) = pc.key_signature {
            peer.key_signature = Some(sig);
        }
        if let Some(cap_map) = pc.cap_map {
            peer.cap_map = cap_map;
        }
        let new_key = peer.key;
        if new_key != old_key {
            self.unindex_key(&old_key, pc.node_id);
            self.peer_ids_by_key.insert(new_key, pc.node_id);
        }
        true
    }

    // --- everything else -------------------------------------------------------------------

    /// Absent `Regions` keeps the previous regions (and `omitDefaultRegions`); absent
    /// `HomeParams` or `RegionScore` keeps the previous value.
    fn merge_derp_map(&mut self, mut dm: DerpMap) {
        if let Some(regions) = dm.regions.as_mut() {
            regions.retain(|_, r| r.is_some());
        }
        if let Some(prev) = self.derp_map.take() {
            if dm.regions.is_none() {
                dm.regions = prev.regions;
                dm.omit_default_regions = prev.omit_default_regions;
            }
            match (&mut dm.home_params, prev.home_params) {
                (None, prev_hp) => dm.home_params = prev_hp,
                (Some(hp), Some(prev_hp)) if hp.region_score.is_none() => {
                    hp.region_score = prev_hp.region_score;
                }
                _ => {}
            }
        }
        self.derp_map = Some(dm);
    }

    fn apply_filters(
        &mut self,
        base: Option<Vec<FilterRule>>,
        named: Option<BTreeMap<String, Option<Vec<FilterRule>>>>,
    ) -> bool {
        let mut changed = false;
        if let Some(rules) = base {
            self.named_packet_filters
                .insert(BASE_FILTER_NAME.to_owned(), rules);
            changed = true;
        }
        if let Some(named) = named {
            changed = true;
            if matches!(named.get("*"), Some(None)) {
                self.named_packet_filters.clear();
            }
            for (name, rules) in named {
                if name == "*" {
                    continue;
                }
                match rules {
                    Some(rules) => {
                        self.named_packet_filters.insert(name, rules);
                    }
                    None => {
                        self.named_packet_filters.remove(&name);
                    }
                }
            }
        }
        changed
    }

    #[allow(clippy::too_many_arguments)]
    fn apply_misc(
        &mut self,
        ssh_policy: Option<Value>,
        collect_services: Option<bool>,
        domain: String,
        audit_log_id: String,
        health: Option<Vec<String>>,
        display_messages: Option<BTreeMap<String, Option<DisplayMessage>>>,
        tka_info: Option<Value>,
    ) {
        if ssh_policy.is_some() {
            self.ssh_policy = ssh_policy;
        }
        if let Some(v) = collect_services {
            self.collect_services = v;
        }
        if !domain.is_empty() {
            self.domain = domain;
        }
        if !audit_log_id.is_empty() {
            self.domain_audit_log_id = audit_log_id;
        }
        if let Some(h) = health {
            self.health = h;
        }
        if let Some(msgs) = display_messages {
            if matches!(msgs.get("*"), Some(None)) {
                self.display_messages.clear();
            }
            for (id, msg) in msgs {
                if id == "*" {
                    continue;
                }
                match msg {
                    Some(m) => {
                        self.display_messages.insert(id, m);
                    }
                    None => {
                        self.display_messages.remove(&id);
                    }
                }
            }
        }
        if tka_info.is_some() {
            self.tka_info = tka_info;
        }
    }
}

/// Go's `upgradeNode`: legacy DERP string → `HomeDERP`; null `AllowedIPs` → `Addresses`.
fn upgrade_node(node: &mut Node) {
    if !node.legacy_derp.is_empty() {
        if node.home_derp == 0 {
            node.home_derp = node.effective_home_derp();
        }
        node.legacy_derp.clear();
    }
    if node.allowed_ips.is_none() {
        node.allowed_ips = Some(node.addresses.clone());
    }
}

/// Old servers send `Capabilities`; Go folds them into the self node's `CapMap`.
fn merge_capabilities_into_cap_map(node: &mut Node) {
    for cap in &node.capabilities {
        node.cap_map.entry(cap.clone()).or_insert(None);
    }
}

#[cfg(test)]
mod tests;
