//! What MagicDNS knows, computed from the netmap: host names, the domains answered locally,
//! split-DNS routes and search domains (Go: `dnsConfigForNetmap` and `net/dns` `Config`).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use tracing::{debug, warn};

use super::name::{is_under, key_of_text, label_count};
use crate::control::tailcfg::{DnsRecord, Node, Resolver};
use crate::netmap::NetworkMap;

/// The IPv6 reverse zone of the tailnet ULA range fd7a:115c:a1e0::/48.
pub const TAILNET_V6_REVERSE_ZONE: &str = "0.e.1.a.c.5.1.1.a.7.d.f.ip6.arpa.";

/// Port of plain DNS.
pub const DNS_PORT: u16 = 53;

/// The root route: names no other route matches.
pub const ROOT: &str = ".";

/// MagicDNS's view of the tailnet. Names are keys: lower case, trailing dot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MagicDnsConfig {
    /// FQDN → the node's single-IP addresses (IPv4 and IPv6, in control's order), and the
    /// A/AAAA `ExtraRecords`.
    pub hosts: BTreeMap<String, Vec<IpAddr>>,
    /// Address → FQDN (as control spelt it, trailing dot) for PTR answers; the first node to
    /// claim an address keeps it.
    pub ptr: BTreeMap<IpAddr, String>,
    /// Names under these are answered locally or NXDOMAIN, never forwarded.
    pub local_domains: Vec<String>,
    /// Split-DNS suffix → upstreams; `.` holds control's global resolvers when it sent some. An
    /// empty list (every resolver unsupported) means SERVFAIL, not a leak to the global ones.
    pub routes: BTreeMap<String, Vec<SocketAddr>>,
    /// Search domains, in order (keys).
    pub search_domains: Vec<String>,
    /// The tailnet's MagicDNS domain (`lab.tern.test.`), from the self node's name.
    pub tailnet_domain: Option<String>,
    /// What the OS used before tern (set by the caller), for `.` when control gives none.
    pub base_resolvers: Vec<SocketAddr>,
    /// Control's `FallbackResolvers`: for `.` when neither control nor the OS give any.
    pub fallback_resolvers: Vec<SocketAddr>,
    /// Resolvers from control that tern cannot use (DoH/DoT URLs, unparseable).
    pub unsupported_resolvers: usize,
    /// The exit node's DNS over HTTP (its peer API) while one that offers it is in use: names
    /// no split route takes go there instead of `.`'s resolvers.
    pub exit_doh: Option<SocketAddr>,
}

/// Where a name MagicDNS does not answer itself is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upstream<'a> {
    /// Plain DNS to these resolvers (none: SERVFAIL).
    Dns(&'a [SocketAddr]),
    /// The exit node's DNS over HTTP.
    Doh(SocketAddr),
}

impl MagicDnsConfig {
    /// MagicDNS as the netmap describes it (`base_resolvers` left empty for the caller).
    pub fn from_netmap(map: &NetworkMap) -> MagicDnsConfig {
        let mut cfg = MagicDnsConfig::default();
        // Hosts are answered whether or not MagicDNS is on, as in Go (tailscale#1886).
        let family = map
            .self_node
            .as_ref()
            .map_or(Family::Both, Family::for_self);
        if let Some(me) = &map.self_node {
            cfg.add_node(me, family);
            cfg.tailnet_domain = tailnet_domain(&me.name);
        }
        for peer in map.peers.values() {
            cfg.add_node(peer, family);
        }
        if let Some(dns) = &map.dns_config {
            if dns.proxied {
                cfg.add_magic_domains();
            }
            for (suffix, resolvers) in &dns.routes {
                cfg.add_route(suffix, resolvers.as_deref().unwrap_or_default());
            }
            let global = cfg.parse_resolvers(&dns.resolvers);
            if !global.is_empty() {
                cfg.routes.insert(ROOT.to_string(), global);
            }
            cfg.fallback_resolvers = cfg.parse_resolvers(&dns.fallback_resolvers);
            cfg.search_domains = dns.domains.iter().filter_map(|d| key_of_text(d)).collect();
            for record in &dns.extra_records {
                cfg.add_extra_record(record);
            }
        }
        debug!(
            hosts = cfg.hosts.len(),
            local_domains = cfg.local_domains.len(),
            routes = cfg.routes.len(),
            unsupported = cfg.unsupported_resolvers,
            "magicdns config"
        );
        cfg
    }

    /// Adds a host: its name (any case, with or without the trailing dot) and addresses.
    pub fn add_host(&mut self, fqdn: &str, addrs: &[IpAddr]) {
        let Some(key) = key_of_text(fqdn) else {
            warn!(
                name = fqdn,
                "magicdns: node name is not a DNS name, skipped"
            );
            return;
        };
        let mut spelt = fqdn.trim().to_string();
        if !spelt.ends_with('.') {
            spelt.push('.');
        }
        for ip in addrs {
            self.ptr.entry(*ip).or_insert_with(|| spelt.clone());
        }
        self.hosts.entry(key).or_default().extend_from_slice(addrs);
    }

    /// An `ExtraRecords` entry: an A or AAAA record (type empty = by the address), answered
    /// like a host; other types are not served.
    fn add_extra_record(&mut self, record: &DnsRecord) {
        let ip = record.value.trim().parse::<IpAddr>();
        let fits = |ip: &IpAddr| match record.record_type.as_str() {
            "" => true,
            "A" => ip.is_ipv4(),
            "AAAA" => ip.is_ipv6(),
            _ => false,
        };
        match ip {
            Ok(ip) if fits(&ip) => self.add_host(&record.name, &[ip]),
            _ => {
                debug!(name = %record.name, kind = %record.record_type, "magicdns: extra record skipped")
            }
        }
    }

    fn add_node(&mut self, node: &Node, family: Family) {
        if node.name.is_empty() {
            return;
        }
        // Only single addresses name the node; a wider prefix is a route, not the node.
        let addrs: Vec<IpAddr> = node
            .addresses
            .iter()
            .filter(|p| p.prefix_len() == p.max_prefix_len())
            .map(|p| p.addr())
            .collect();
        let has_v4 = addrs.iter().any(IpAddr::is_ipv4);
        let addrs: Vec<IpAddr> = addrs
            .into_iter()
            .filter(|ip| match family {
                Family::V6Only => ip.is_ipv6(),
                // Go leaves out the IPv6 of a node that has IPv4 (tailscale#1152): nothing
                // says the peer speaks IPv6 well, and a v4-only host would try it first.
                Family::PreferV4 => ip.is_ipv4() || !has_v4,
                Family::Both => true,
            })
            .collect();
        self.add_host(&node.name, &addrs);
    }

    /// The tailnet domain and the CGNAT and ULA reverse zones.
    fn add_magic_domains(&mut self) {
        if let Some(domain) = self.tailnet_domain.clone() {
            self.add_local_domain(domain);
        }
        // 100.64.0.0/10 is 100.64-127.*.
        for second in 64..=127 {
            self.add_local_domain(format!("{second}.100.in-addr.arpa."));
        }
        self.add_local_domain(TAILNET_V6_REVERSE_ZONE.to_string());
    }

    fn add_local_domain(&mut self, key: String) {
        if !self.local_domains.contains(&key) {
            self.local_domains.push(key);
        }
    }

    /// A `Routes` entry: no resolvers means "answer with 100.100.100.100" (a local domain).
    fn add_route(&mut self, suffix: &str, resolvers: &[Resolver]) {
        let Some(key) = key_of_text(suffix) else {
            warn!(
                suffix,
                "magicdns: split-DNS suffix is not a DNS name, skipped"
            );
            return;
        };
        if resolvers.is_empty() {
            self.add_local_domain(key);
            return;
        }
        let upstreams = self.parse_resolvers(resolvers);
        self.routes.insert(key, upstreams);
    }

    /// The usable resolvers (plain IP or IP:port), counting the others as unsupported.
    fn parse_resolvers(&mut self, resolvers: &[Resolver]) -> Vec<SocketAddr> {
        let mut out = Vec::new();
        for r in resolvers {
            match parse_resolver_addr(&r.addr) {
                Some(sa) if !out.contains(&sa) => out.push(sa),
                Some(_) => {}
                None => {
                    debug!(addr = %r.addr, "magicdns: unsupported resolver");
                    self.unsupported_resolvers += 1;
                }
            }
        }
        out
    }

    /// Whether `key` is under a domain answered only locally.
    pub fn is_local(&self, key: &str) -> bool {
        self.local_domains.iter().any(|d| is_under(key, d))
    }

    /// While an exit node that answers DNS is in use (Go `dnsConfigForNetmap`): only routes
    /// and global resolvers marked `UseWithExitNode` stay (routes without resolvers, which are
    /// local domains, too); names no route takes go to the exit node's DNS over HTTP at `doh`,
    /// unless control gave global resolvers for use with exit nodes.
    pub fn use_exit_node_dns(&mut self, map: &NetworkMap, doh: SocketAddr) {
        let for_exit_nodes = |resolvers: &[Resolver]| -> Vec<Resolver> {
            resolvers
                .iter()
                .filter(|r| r.use_with_exit_node)
                .cloned()
                .collect()
        };
        // Resolvers were counted as unsupported once, in from_netmap.
        let unsupported = self.unsupported_resolvers;
        self.routes.clear();
        let mut global = Vec::new();
        if let Some(dns) = &map.dns_config {
            for (suffix, resolvers) in &dns.routes {
                let kept = for_exit_nodes(resolvers.as_deref().unwrap_or_default());
                if !kept.is_empty() {
                    self.add_route(suffix, &kept);
                }
            }
            global = self.parse_resolvers(&for_exit_nodes(&dns.resolvers));
        }
        self.unsupported_resolvers = unsupported;
        if global.is_empty() {
            self.exit_doh = Some(doh);
        } else {
            self.routes.insert(ROOT.to_string(), global);
        }
    }

    /// Where a name goes: a split route, else the exit node's DoH while one is used, else
    /// [`Self::upstreams_for`].
    pub fn upstream_for(&self, key: &str) -> Upstream<'_> {
        match (self.split_route(key), self.exit_doh) {
            (Some(upstreams), _) => Upstream::Dns(upstreams),
            (None, Some(doh)) => Upstream::Doh(doh),
            (None, None) => Upstream::Dns(self.upstreams_for(key)),
        }
    }

    /// The longest split-DNS route `key` is under (not `.`).
    fn split_route(&self, key: &str) -> Option<&[SocketAddr]> {
        self.routes
            .iter()
            .filter(|(suffix, _)| suffix.as_str() != ROOT && is_under(key, suffix))
            .max_by_key(|(suffix, _)| label_count(suffix))
            .map(|(_, upstreams)| upstreams.as_slice())
    }

    /// The upstreams for a name: the longest matching route, else the root route, the OS's
    /// resolvers, control's fallback ones; empty when there is none.
    pub fn upstreams_for(&self, key: &str) -> &[SocketAddr] {
        if let Some(upstreams) = self.split_route(key) {
            return upstreams;
        }
        if let Some(root) = self.routes.get(ROOT) {
            return root;
        }
        if !self.base_resolvers.is_empty() {
            return &self.base_resolvers;
        }
        &self.fallback_resolvers
    }

    /// The addresses of a host; a single label is also tried under each search domain, then
    /// under the tailnet domain.
    pub fn lookup(&self, key: &str) -> Option<&[IpAddr]> {
        if let Some(addrs) = self.hosts.get(key) {
            return Some(addrs);
        }
        if label_count(key) != 1 {
            return None;
        }
        self.search_domains
            .iter()
            .chain(self.tailnet_domain.iter())
            .find_map(|domain| self.hosts.get(&format!("{key}{domain}")))
            .map(Vec::as_slice)
    }
}

/// `c2.lab.tern.test.` → `lab.tern.test.`; `None` for a single label or an invalid name.
fn tailnet_domain(self_name: &str) -> Option<String> {
    let key = key_of_text(self_name)?;
    let (_, rest) = key.split_once('.')?;
    (!rest.is_empty()).then(|| rest.to_string())
}

/// Which addresses names get (Go's `dnsConfigForNetmap`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    /// This node has IPv4: IPv6 only for nodes without IPv4.
    PreferV4,
    /// This node has only IPv6: only IPv6.
    V6Only,
    /// Everything (the `magicdns-aaaa` node attribute).
    Both,
}

/// The node attribute that asks for peers' AAAA records too.
const ATTR_MAGICDNS_AAAA: &str = "magicdns-aaaa";

impl Family {
    fn for_self(me: &Node) -> Family {
        let has = |v4: bool| {
            me.addresses
                .iter()
                .any(|p| p.prefix_len() == p.max_prefix_len() && p.addr().is_ipv4() == v4)
        };
        if me.cap_map.contains_key(ATTR_MAGICDNS_AAAA) {
            Family::Both
        } else if !has(true) && has(false) {
            Family::V6Only
        } else {
            Family::PreferV4
        }
    }
}

/// `1.2.3.4`, `1.2.3.4:5353`, `[fd00::1]:53`, `fd00::1` → a socket address (port 53 unless
/// given); URLs (DoH) and anything else → `None`.
pub fn parse_resolver_addr(addr: &str) -> Option<SocketAddr> {
    let addr = addr.trim();
    if let Ok(ip) = addr.parse::<IpAddr>() {
        return Some(SocketAddr::new(ip, DNS_PORT));
    }
    addr.parse::<SocketAddr>().ok()
}

#[cfg(test)]
mod tests;
