//! Topologies of namespaces: a router with a bridged public segment, public hosts, and client sites
//! (a client behind its own NAT box). Everything is torn down on Drop, also on panic.
//!
//! ```text
//! c1 10.1.0.2 -- nat1 [lan0 10.1.0.1 | wan0 198.18.1.2] --\                 /-- relay  198.18.0.10 + .11
//!                                                           rtr (bridge pub0 198.18.0.1/24)
//! c2 10.2.0.2 -- nat2 [lan0 10.2.0.1 | wan0 198.18.2.2] --/                 \-- server 198.18.0.20 + .21
//!                                                                              (+ 10.99.0.20, control)
//! ```
//! `rtr` has no default route and nothing links to the root namespace, so the lab is a closed world:
//! every namespace routes only 198.18.0.0/15 and the private /24s the lab uses (10.N.0.0/24 per
//! client site, 10.99.0.0/24 for control), so `ip route get` fails for anything else.
//!
//! A dual-stack lab ([`Topology::standard_with`] with `ipv6`) adds IPv6 the way most ISPs hand it
//! out: global addresses without NAT, routed within 2001:db8::/32 only (public 198.18.A.B is
//! 2001:db8:A::B, client-site 10.N.0.B is 2001:db8:N:1::B; see [`v6_of`]). The NAT boxes' filter
//! table is `inet`, so their firewall (established-only from the WAN) applies to IPv6 too;
//! `udpblock` blocks IPv6 UDP as well.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicU32, Ordering};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::error::{LabError, Result};
use crate::nat::{self, NatMode};
use crate::netns::{run_with_stdin, Netns};

/// The router's address on the public bridge.
pub const RTR_PUBLIC_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The relay host's two public addresses.
pub const RELAY_IPS: [Ipv4Addr; 2] = [Ipv4Addr::new(198, 18, 0, 10), Ipv4Addr::new(198, 18, 0, 11)];
/// The server host's two public addresses.
pub const SERVER_IPS: [Ipv4Addr; 2] =
    [Ipv4Addr::new(198, 18, 0, 20), Ipv4Addr::new(198, 18, 0, 21)];
/// The internet host `inet`: a public host standing for "somewhere on the internet", e.g. the
/// destination an exit node's traffic should reach (run a whoami server there).
pub const INTERNET_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 30);
/// Name of the internet host.
pub const INTERNET_HOST: &str = "inet";
/// Interface of a client `cN` towards its site LAN.
pub const SITE_LAN_IF: &str = "lan0";
/// A private (RFC 1918) address on the server host for coordination servers: tsnet never races
/// TLS to :443 for a private control IP.
pub const CONTROL_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 20);
/// The public segment (RFC 2544 benchmarking range).
pub const PUBLIC_NET: &str = "198.18.0.0/15";
/// The IPv6 part of a dual-stack lab (the documentation prefix).
pub const PUBLIC_NET6: &str = "2001:db8::/32";

/// The IPv6 address a dual-stack lab gives the host that has `v4`: 198.18.A.B → 2001:db8:A::B,
/// 10.N.0.B → 2001:db8:N:1::B (decimal digits read as hex groups: easy to recognise); none for
/// other addresses (control's private address stays IPv4 only).
pub fn v6_of(v4: Ipv4Addr) -> Option<Ipv6Addr> {
    let text = match v4.octets() {
        [198, 18, a, b] => format!("2001:db8:{a}::{b}"),
        [10, n, 0, b] if n != 99 => format!("2001:db8:{n}:1::{b}"),
        _ => return None,
    };
    text.parse().ok()
}
/// The LAN behind client `cN` ([`Topology::add_site_lan`]): `10.N.9.0/24`.
pub fn site_lan_net(index: u8) -> Ipv4Net {
    Ipv4Net::new_assert(Ipv4Addr::new(10, index, 9, 0), 24)
}

/// `cN`'s address on its site LAN, `10.N.9.1`: the LAN host's gateway.
pub fn site_lan_gateway(index: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, index, 9, 1)
}

/// The host on the LAN behind `cN` (namespace `lanN`), `10.N.9.2`.
pub fn site_lan_host(index: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, index, 9, 2)
}

/// Name of the host on the LAN behind `cN`: `lanN`.
pub fn site_lan_name(index: u8) -> String {
    format!("lan{index}")
}

/// Name of the router node.
pub const ROUTER: &str = "rtr";
/// Name of the bridge in the router.
pub const BRIDGE: &str = "pub0";
/// Interface name of every host's single link.
pub const HOST_IF: &str = "eth0";

/// What a node is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeKind {
    /// The router holding the public bridge.
    Router,
    /// A NAT box between a client and the public segment.
    Nat,
    /// A client behind a NAT box.
    Client,
    /// A host on the public segment.
    Public,
    /// A host on the LAN behind a client (reached only through that client, e.g. as a subnet
    /// router).
    Lan,
}

/// One namespace of a topology.
#[derive(Debug)]
pub struct Node {
    name: String,
    kind: NodeKind,
    addrs: Vec<Ipv4Addr>,
    /// Next hop for lab-wide routes (none for the router, which routes each net itself).
    gateway: Option<Ipv4Addr>,
    ns: Netns,
}

impl Node {
    /// Short name within the topology (`c1`, `nat1`, `relay`, …).
    pub fn name(&self) -> &str {
        &self.name
    }
    /// What it is for.
    pub fn kind(&self) -> NodeKind {
        self.kind
    }
    /// Its addresses (first = primary).
    pub fn addrs(&self) -> &[Ipv4Addr] {
        &self.addrs
    }
    /// Its namespace.
    pub fn ns(&self) -> &Netns {
        &self.ns
    }
}

/// A client site: client `cN` behind NAT box `natN`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NatSite {
    /// Site number N (1..=200).
    pub index: u8,
    /// NAT box node name (`natN`).
    pub nat: String,
    /// Client node name (`cN`).
    pub client: String,
    /// Current mode.
    pub mode: NatMode,
    /// Client address `10.N.0.2`.
    pub client_ip: Ipv4Addr,
    /// NAT box LAN address `10.N.0.1`.
    pub lan_ip: Ipv4Addr,
    /// NAT box public address `198.18.N.2`.
    pub wan_ip: Ipv4Addr,
}

impl NatSite {
    fn new(index: u8, mode: NatMode) -> NatSite {
        NatSite {
            index,
            nat: format!("nat{index}"),
            client: format!("c{index}"),
            mode,
            client_ip: Ipv4Addr::new(10, index, 0, 2),
            lan_ip: Ipv4Addr::new(10, index, 0, 1),
            wan_ip: Ipv4Addr::new(198, 18, index, 2),
        }
    }

    /// The router's address on the site's uplink, `198.18.N.1`.
    pub fn uplink_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, self.index, 1)
    }
}

/// A topology of namespaces named `<prefix>-<node>`. Dropping it kills every process in its
/// namespaces and deletes them (unless `persist` was called).
#[derive(Debug)]
pub struct Topology {
    prefix: String,
    nodes: Vec<Node>,
    sites: Vec<NatSite>,
    /// Private /24s in use and the nodes that own them (connected there, routed elsewhere).
    private_nets: Vec<(String, Vec<String>)>,
    /// Dual stack: IPv6 addresses and routes besides the IPv4 ones.
    ipv6: bool,
}

static NEXT_PREFIX: AtomicU32 = AtomicU32::new(0);

/// A short prefix unique to this process and call, and not used by any existing namespace, so tests
/// can build topologies in parallel (`tl<pid>x<n>`).
pub fn unique_prefix() -> String {
    reap_dead_test_labs();
    loop {
        let n = NEXT_PREFIX.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("tl{:x}x{n:x}", std::process::id());
        if namespaces_with_prefix(&prefix).map_or(true, |found| found.is_empty()) {
            return prefix;
        }
    }
}

/// Delete namespaces of `unique_prefix` labs whose process is gone (a test binary that was killed
/// and could not run its Drop). Labs of live processes, and any other name, are left alone.
pub fn reap_dead_test_labs() {
    let Ok(names) = Netns::list() else { return };
    for name in names {
        let Some(pid) = test_lab_pid(&name) else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            tracing::info!(netns = %name, pid, "removing namespace of a dead test run");
            let _ = crate::netns::delete_named(&name);
        }
    }
    // Their long-lived lab state too (`tern lab up` in a test), after the namespaces (and so the
    // daemons in them) are gone.
    let Ok(dirs) = std::fs::read_dir(crate::state::STATE_ROOT) else {
        return;
    };
    for dir in dirs.flatten() {
        let name = dir.file_name().to_string_lossy().into_owned();
        let Some(pid) = test_lab_pid(&format!("{name}-state")) else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            tracing::info!(dir = ?dir.path(), pid, "removing lab state of a dead test run");
            let _ = std::fs::remove_dir_all(dir.path());
        }
    }
}

/// The PID encoded in a `unique_prefix` namespace name (`tl<pid hex>x<n hex>-<node>`).
fn test_lab_pid(netns: &str) -> Option<u32> {
    let (prefix, node) = netns.split_once('-')?;
    let (pid, n) = prefix.strip_prefix("tl")?.split_once('x')?;
    let hex = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_hexdigit());
    if !(hex(pid) && hex(n) && !node.is_empty()) {
        return None;
    }
    u32::from_str_radix(pid, 16).ok()
}

/// Existing namespaces named `<prefix>-*`.
pub fn namespaces_with_prefix(prefix: &str) -> Result<Vec<String>> {
    let start = format!("{prefix}-");
    Ok(Netns::list()?
        .into_iter()
        .filter(|name| name.starts_with(&start))
        .collect())
}

/// Check that a prefix is short and plain enough for namespace names.
pub fn validate_prefix(prefix: &str) -> Result<()> {
    let ok = !prefix.is_empty()
        && prefix.len() <= 16
        && prefix
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(LabError::Invalid(format!(
            "lab prefix `{prefix}` must be 1-16 characters of a-z and 0-9"
        )))
    }
}

impl Topology {
    /// The standard lab: router + bridge, relay and server hosts, and two client sites (c1 behind
    /// nat1 in `nat1` mode, c2 behind nat2 in `nat2` mode).
    pub fn standard(prefix: &str, nat1: NatMode, nat2: NatMode) -> Result<Topology> {
        Topology::standard_with(prefix, nat1, nat2, false)
    }

    /// The standard lab, dual-stack when `ipv6` (see the module docs).
    pub fn standard_with(
        prefix: &str,
        nat1: NatMode,
        nat2: NatMode,
        ipv6: bool,
    ) -> Result<Topology> {
        let mut topo = Topology::router_with(prefix, ipv6)?;
        topo.add_public_host("relay", &RELAY_IPS)?;
        topo.add_public_host("server", &SERVER_IPS)?;
        topo.add_control_ip("server", CONTROL_IP)?;
        topo.add_nat_site(1, nat1)?;
        topo.add_nat_site(2, nat2)?;
        Ok(topo)
    }

    /// The standard lab with a fresh unique prefix (for tests).
    pub fn standard_unique(nat1: NatMode, nat2: NatMode) -> Result<Topology> {
        Topology::standard(&unique_prefix(), nat1, nat2)
    }

    /// Only the router with its public bridge; add hosts and sites to it.
    pub fn router_only(prefix: &str) -> Result<Topology> {
        Topology::router_with(prefix, false)
    }

    /// Only the router, dual-stack when `ipv6`.
    pub fn router_with(prefix: &str, ipv6: bool) -> Result<Topology> {
        crate::netns::preflight()?;
        validate_prefix(prefix)?;
        if let Some(name) = namespaces_with_prefix(prefix)?.into_iter().next() {
            return Err(LabError::NameClash {
                prefix: prefix.to_string(),
                name,
            });
        }
        let mut topo = Topology {
            prefix: prefix.to_string(),
            nodes: Vec::new(),
            sites: Vec::new(),
            private_nets: Vec::new(),
            ipv6,
        };
        topo.create_nodes(&[(ROUTER, NodeKind::Router, vec![RTR_PUBLIC_IP])])?;
        let rtr = topo.ns(ROUTER)?;
        rtr.sysctl("net.ipv4.ip_forward", "1")?;
        let mut batch = format!(
            "link add {BRIDGE} type bridge\nlink set {BRIDGE} up\naddr add {RTR_PUBLIC_IP}/24 dev {BRIDGE}\n"
        );
        if ipv6 {
            rtr.sysctl("net.ipv6.conf.all.forwarding", "1")?;
            batch += &topo.v6_addr(RTR_PUBLIC_IP, BRIDGE);
        }
        rtr.ip_batch(&batch)?;
        Ok(topo)
    }

    /// Whether this lab is dual-stack.
    pub fn ipv6(&self) -> bool {
        self.ipv6
    }

    /// `ip` batch line giving `dev` the /64 IPv6 twin of `v4` (nothing in an IPv4-only lab).
    /// `nodad`: no 1-2 s of duplicate address detection before the address can be used.
    fn v6_addr(&self, v4: Ipv4Addr, dev: &str) -> String {
        match v6_of(v4).filter(|_| self.ipv6) {
            Some(v6) => format!("addr add {v6}/64 dev {dev} nodad\n"),
            None => String::new(),
        }
    }

    /// `ip` batch line routing the lab's IPv6 via the twin of `gateway` (nothing in IPv4-only).
    fn v6_route(&self, dest: &str, gateway: Ipv4Addr) -> String {
        match v6_of(gateway).filter(|_| self.ipv6) {
            Some(v6) => format!("route add {dest} via {v6}\n"),
            None => String::new(),
        }
    }

    /// Add a host on the public bridge with these addresses (first = primary, all /24 in
    /// 198.18.0.0/24). Its interface is `eth0`.
    pub fn add_public_host(&mut self, name: &str, addrs: &[Ipv4Addr]) -> Result<()> {
        self.create_nodes(&[(name, NodeKind::Public, addrs.to_vec())])?;
        let (host, rtr) = (self.netns_name(name), self.netns_name(ROUTER));
        // The router-side end is named after the host, truncated to the 15-byte interface limit.
        let port: String = name.chars().take(15).collect();
        run_with_stdin(
            std::process::Command::new("ip").args(["-batch", "-"]),
            &format!("link add {HOST_IF} netns {host} type veth peer name {port} netns {rtr}\n"),
        )?;
        self.ns(ROUTER)?.ip_batch(&format!(
            "link set {port} master {BRIDGE}\nlink set {port} up\n"
        ))?;
        let mut batch = String::new();
        for addr in addrs {
            batch += &format!("addr add {addr}/24 dev {HOST_IF}\n");
            batch += &self.v6_addr(*addr, HOST_IF);
        }
        batch += &format!("link set {HOST_IF} up\n");
        batch += &format!("route add {PUBLIC_NET} via {RTR_PUBLIC_IP}\n");
        batch += &self.v6_route(PUBLIC_NET6, RTR_PUBLIC_IP);
        self.ns(name)?.ip_batch(&batch)?;
        self.set_gateway(name, RTR_PUBLIC_IP)
    }

    /// Add the internet host `inet` at [`INTERNET_IP`]: a public host like the others, meant for
    /// servers that stand for the internet (see [`crate::whoami`]).
    pub fn add_internet_host(&mut self) -> Result<()> {
        self.add_public_host(INTERNET_HOST, &[INTERNET_IP])
    }

    /// Add a LAN behind client `cN`: host `lanN` ([`site_lan_host`], `10.N.9.2/24` on `eth0`,
    /// default route via `cN`) linked to `cN` (`10.N.9.1/24` on `lan0`). No other node routes
    /// [`site_lan_net`], so only the tailnet (with `cN` as subnet router) can reach it.
    /// IP forwarding in `cN` is left off: making `cN` a router is the test's (or tern's) job.
    pub fn add_site_lan(&mut self, index: u8) -> Result<()> {
        let client = self
            .sites
            .iter()
            .find(|s| s.index == index)
            .map(|s| s.client.clone())
            .ok_or_else(|| {
                LabError::Invalid(format!(
                    "no client site {index}: add it (add_nat_site) before its LAN"
                ))
            })?;
        let (lan, host, gateway) = (
            site_lan_name(index),
            site_lan_host(index),
            site_lan_gateway(index),
        );
        self.create_nodes(&[(&lan, NodeKind::Lan, vec![host])])?;
        run_with_stdin(
            std::process::Command::new("ip").args(["-batch", "-"]),
            &format!(
                "link add {SITE_LAN_IF} netns {} type veth peer name {HOST_IF} netns {}
",
                self.netns_name(&client),
                self.netns_name(&lan)
            ),
        )?;
        self.ns(&client)?.ip_batch(&format!(
            "addr add {gateway}/24 dev {SITE_LAN_IF}
link set {SITE_LAN_IF} up
"
        ))?;
        // No lab gateway for the LAN host (set_gateway): lab-wide routes would bypass cN.
        self.ns(&lan)?.ip_batch(&format!(
            "addr add {host}/24 dev {HOST_IF}
link set {HOST_IF} up
route add default via {gateway}
"
        ))
    }

    /// Give a public host an extra private address reachable from the whole lab (the router
    /// routes its /24 to the host).
    pub fn add_control_ip(&mut self, name: &str, ip: Ipv4Addr) -> Result<()> {
        let via = *self
            .node(name)?
            .addrs
            .first()
            .ok_or_else(|| LabError::Invalid(format!("node {name} has no address")))?;
        self.ns(name)?
            .ip_batch(&format!("addr add {ip}/32 dev {HOST_IF}\n"))?;
        let [a, b, c, _] = ip.octets();
        let net = format!("{a}.{b}.{c}.0/24");
        self.ns(ROUTER)?
            .ip_batch(&format!("route add {net} via {via}\n"))?;
        if let Ok(node) = self.node_mut(name) {
            node.addrs.push(ip);
        }
        self.add_private_net(net, &[name])
    }

    /// Add client site N: `cN` (10.N.0.2) behind NAT box `natN` (lan 10.N.0.1, wan 198.18.N.2)
    /// in `mode`.
    pub fn add_nat_site(&mut self, index: u8, mode: NatMode) -> Result<()> {
        if index == 0 || index > 200 || self.sites.iter().any(|s| s.index == index) {
            return Err(LabError::Invalid(format!(
                "NAT site {index} is taken or out of range (1-200)"
            )));
        }
        let site = NatSite::new(index, mode);
        self.create_nodes(&[
            (&site.nat, NodeKind::Nat, vec![site.wan_ip, site.lan_ip]),
            (&site.client, NodeKind::Client, vec![site.client_ip]),
        ])?;
        let (rtr, nat, client) = (
            self.netns_name(ROUTER),
            self.netns_name(&site.nat),
            self.netns_name(&site.client),
        );
        let uplink = &site.nat;
        run_with_stdin(
            std::process::Command::new("ip").args(["-batch", "-"]),
            &format!(
                "link add {} netns {nat} type veth peer name {uplink} netns {rtr}\n\
                 link add {HOST_IF} netns {client} type veth peer name {} netns {nat}\n",
                nat::WAN_IF,
                nat::LAN_IF
            ),
        )?;
        let up = site.uplink_ip();
        let client_net6 = v6_of(site.client_ip).map(|c| format!("{c}/64"));
        let mut rtr_batch = format!(
            "addr add {up}/24 dev {uplink}\nlink set {uplink} up\n\
             route add 10.{index}.0.0/24 via {}\n",
            site.wan_ip
        );
        rtr_batch += &self.v6_addr(up, uplink);
        if let Some(net) = &client_net6 {
            rtr_batch += &self.v6_route(net, site.wan_ip);
        }
        self.ns(ROUTER)?.ip_batch(&rtr_batch)?;
        let (wan, lan) = (nat::WAN_IF, nat::LAN_IF);
        let mut nat_batch = format!(
            "addr add {}/24 dev {wan}\nlink set {wan} up\n\
             addr add {}/24 dev {lan}\nlink set {lan} up\n\
             route add {PUBLIC_NET} via {up}\n",
            site.wan_ip, site.lan_ip,
        );
        nat_batch += &self.v6_addr(site.wan_ip, wan);
        nat_batch += &self.v6_addr(site.lan_ip, lan);
        nat_batch += &self.v6_route(PUBLIC_NET6, up);
        let nat_ns = self.ns(&site.nat)?;
        nat_ns.sysctl("net.ipv4.ip_forward", "1")?;
        if self.ipv6 {
            nat_ns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        }
        nat_ns.ip_batch(&nat_batch)?;
        nat_ns.nft_apply(&nat::ruleset(mode, site.client_ip))?;
        let mut client_batch = format!(
            "addr add {}/24 dev {HOST_IF}\nlink set {HOST_IF} up\n\
             route add {PUBLIC_NET} via {lan}\n",
            site.client_ip,
            lan = site.lan_ip,
        );
        client_batch += &self.v6_addr(site.client_ip, HOST_IF);
        client_batch += &self.v6_route(PUBLIC_NET6, site.lan_ip);
        self.ns(&site.client)?.ip_batch(&client_batch)?;
        self.set_gateway(&site.nat, up)?;
        self.set_gateway(&site.client, site.lan_ip)?;
        let net = format!("10.{index}.0.0/24");
        let owners = [site.nat.clone(), site.client.clone()];
        self.sites.push(site);
        self.add_private_net(net, &[&owners[0], &owners[1]])
    }

    /// Switch a NAT box (`natN`) to another mode at run time; its conntrack table is flushed.
    pub fn set_nat_mode(&mut self, nat_box: &str, mode: NatMode) -> Result<()> {
        let site = self
            .sites
            .iter()
            .find(|s| s.nat == nat_box)
            .cloned()
            .ok_or_else(|| LabError::Invalid(format!("no NAT box named {nat_box}")))?;
        nat::apply(self.ns(nat_box)?, mode, site.client_ip)?;
        if let Some(s) = self.sites.iter_mut().find(|s| s.nat == nat_box) {
            s.mode = mode;
        }
        Ok(())
    }

    /// The prefix of every namespace name.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `<prefix>-<node>`.
    pub fn netns_name(&self, node: &str) -> String {
        format!("{}-{node}", self.prefix)
    }

    /// The nodes, in creation order.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The client sites.
    pub fn sites(&self) -> &[NatSite] {
        &self.sites
    }

    /// The site whose NAT box or client is `name`.
    pub fn site(&self, name: &str) -> Result<&NatSite> {
        self.sites
            .iter()
            .find(|s| s.nat == name || s.client == name)
            .ok_or_else(|| LabError::Invalid(format!("no client site with node {name}")))
    }

    /// A node by short name.
    pub fn node(&self, name: &str) -> Result<&Node> {
        self.nodes.iter().find(|n| n.name == name).ok_or_else(|| {
            LabError::Invalid(format!("no node named {name} in lab {}", self.prefix))
        })
    }

    fn node_mut(&mut self, name: &str) -> Result<&mut Node> {
        let prefix = self.prefix.clone();
        self.nodes
            .iter_mut()
            .find(|n| n.name == name)
            .ok_or_else(|| LabError::Invalid(format!("no node named {name} in lab {prefix}")))
    }

    /// A node's namespace by short name.
    pub fn ns(&self, name: &str) -> Result<&Netns> {
        self.node(name).map(|n| &n.ns)
    }

    /// Keep the namespaces after Drop (a long-lived lab); `tern lab down` removes them.
    pub fn persist(&mut self) {
        for node in &mut self.nodes {
            node.ns.persist();
        }
    }

    /// Set a node's next hop for lab-wide routes and give it a route to every private net in use.
    fn set_gateway(&mut self, name: &str, gateway: Ipv4Addr) -> Result<()> {
        self.node_mut(name)?.gateway = Some(gateway);
        let batch: String = self
            .private_nets
            .iter()
            .filter(|(_, owners)| !owners.iter().any(|o| o == name))
            .map(|(net, _)| format!("route add {net} via {gateway}\n"))
            .collect();
        if batch.is_empty() {
            Ok(())
        } else {
            self.ns(name)?.ip_batch(&batch)
        }
    }

    /// Route a new private net from every node that has a gateway and does not own it.
    fn add_private_net(&mut self, net: String, owners: &[&str]) -> Result<()> {
        for node in &self.nodes {
            let Some(gateway) = node.gateway else {
                continue;
            };
            if owners.contains(&node.name.as_str()) {
                continue;
            }
            node.ns
                .ip_batch(&format!("route add {net} via {gateway}\n"))?;
        }
        self.private_nets
            .push((net, owners.iter().map(|o| o.to_string()).collect()));
        Ok(())
    }

    /// Create namespaces in one `ip -batch`, IPv6 off unless the lab is dual-stack (this keeps
    /// link-local chatter and DAD out of an IPv4 lab).
    fn create_nodes(&mut self, specs: &[(&str, NodeKind, Vec<Ipv4Addr>)]) -> Result<()> {
        let mut batch = String::new();
        for (name, _, _) in specs {
            if self.nodes.iter().any(|n| n.name == *name) {
                return Err(LabError::Invalid(format!("node {name} exists already")));
            }
            let ns = self.netns_name(name);
            if Netns::exists(&ns) {
                return Err(LabError::NameClash {
                    prefix: self.prefix.clone(),
                    name: ns,
                });
            }
            batch += &format!("netns add {ns}\n");
        }
        let created = run_with_stdin(
            std::process::Command::new("ip").args(["-batch", "-"]),
            &batch,
        );
        // Adopt whatever exists now, so a partial failure is still cleaned up on Drop.
        for (name, kind, addrs) in specs {
            let ns = self.netns_name(name);
            if Netns::exists(&ns) {
                self.nodes.push(Node {
                    name: name.to_string(),
                    kind: *kind,
                    addrs: addrs.clone(),
                    gateway: None,
                    ns: Netns::adopt(&ns),
                });
            }
        }
        created?;
        let disable_ipv6 = if self.ipv6 { "0" } else { "1" };
        for (name, _, _) in specs {
            let ns = self.ns(name)?;
            ns.sysctl("net.ipv6.conf.all.disable_ipv6", disable_ipv6)?;
            ns.sysctl("net.ipv6.conf.default.disable_ipv6", disable_ipv6)?;
            if self.ipv6 {
                // No duplicate address detection: link-local addresses (neighbour discovery's
                // source) are usable at once instead of after a second or two.
                ns.sysctl("net.ipv6.conf.all.accept_dad", "0")?;
                ns.sysctl("net.ipv6.conf.default.accept_dad", "0")?;
            }
            ns.ip_batch("link set lo up\n")?;
            ns.write_resolv_conf()?;
        }
        Ok(())
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        // Namespaces delete themselves (Netns::drop), killing their processes; newest first.
        while let Some(node) = self.nodes.pop() {
            drop(node);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_lab_names_encode_their_pid() {
        assert_eq!(test_lab_pid("tl1f2ax3-c1"), Some(0x1f2a));
        assert_eq!(test_lab_pid("tlab-c1"), None);
        assert_eq!(test_lab_pid("tl12x-c1"), None);
        assert_eq!(test_lab_pid("tl12x3"), None);
        assert_eq!(test_lab_pid("other"), None);
    }

    #[test]
    fn ipv6_twins_of_lab_addresses() {
        let v6 = |s: &str| v6_of(s.parse().unwrap()).map(|a| a.to_string());
        assert_eq!(v6("198.18.0.10").as_deref(), Some("2001:db8::10"));
        assert_eq!(v6("198.18.2.2").as_deref(), Some("2001:db8:2::2"));
        assert_eq!(v6("10.1.0.2").as_deref(), Some("2001:db8:1:1::2"));
        assert_eq!(v6("10.99.0.20"), None);
        assert_eq!(v6("192.0.2.1"), None);
    }

    #[test]
    fn prefixes_are_validated() {
        assert!(validate_prefix("tlab").is_ok());
        assert!(validate_prefix("tl1f2ax3").is_ok());
        assert!(validate_prefix("").is_err());
        assert!(validate_prefix("Lab").is_err());
        assert!(validate_prefix("a-b").is_err());
        assert!(validate_prefix("abcdefghijklmnopq").is_err());
    }
}
