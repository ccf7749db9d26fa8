//! The long-lived lab (`tern lab up`): its state file under /run/tern-lab/<prefix>/ and the JSON
//! status that scripts drive it with. Status is read live from the namespaces; the state file only
//! adds what cannot be seen from outside (node roles, NAT modes, processes, services).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{LabError, Result};
use crate::netns::{delete_named, Netns};
use crate::process::Process;
use crate::topology::{namespaces_with_prefix, NatSite, NodeKind, Topology};

/// Where long-lived labs keep their state (tmpfs: gone after a reboot, like the namespaces).
pub const STATE_ROOT: &str = "/run/tern-lab";
/// Version of the JSON below; bumped only on incompatible changes (fields are only ever added).
pub const STATE_VERSION: u32 = 1;

/// A lab as recorded when it was built, plus what was started in it since.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabState {
    /// Format version (`STATE_VERSION`).
    pub version: u32,
    /// Namespace name prefix: every namespace is `<prefix>-<node>`.
    pub prefix: String,
    /// Creation time, seconds since the Unix epoch.
    pub created_unix: u64,
    /// The namespaces.
    pub nodes: Vec<NodeState>,
    /// Client sites: NAT box, client, mode, addresses.
    pub nat_boxes: Vec<NatSite>,
    /// Processes started in the lab (later: tern nodes, Caddy peers, servers).
    #[serde(default)]
    pub processes: Vec<ProcessState>,
    /// Sockets the lab's own services listen on.
    #[serde(default)]
    pub sockets: Vec<SocketState>,
    /// Services: coordination (`control`), `derp`, `stun` servers, with their URLs.
    #[serde(default)]
    pub services: Vec<ServiceState>,
    /// tern nodes (daemons) with their LocalAPI sockets.
    #[serde(default)]
    pub tern_nodes: Vec<TernNodeState>,
    /// Dual-stack: IPv6 besides IPv4 (`tern lab up --ipv6`).
    #[serde(default)]
    pub ipv6: bool,
}

/// One namespace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeState {
    /// Short name (`c1`, `nat1`, `rtr`, `relay`, `server`, …).
    pub name: String,
    /// Namespace name, for `ip netns exec`.
    pub netns: String,
    /// Role.
    pub kind: NodeKind,
    /// Addresses given at build time (first = primary).
    pub addrs: Vec<Ipv4Addr>,
    /// Live: whether the namespace exists (status only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exists: Option<bool>,
    /// Live: interfaces and their addresses (status only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<InterfaceState>,
}

/// A live interface of a namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceState {
    /// Interface name (`eth0`, `lan0`, `wan0`, `pub0`, …).
    pub name: String,
    /// Operational state as `ip` reports it.
    pub state: String,
    /// IPv4 addresses with prefix length.
    pub addrs: Vec<String>,
}

/// A process started in the lab.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessState {
    /// Label (`caddy:peer1`, `tern:c1`, …).
    pub name: String,
    /// Node it runs in.
    pub node: String,
    /// Namespace it runs in.
    pub netns: String,
    /// PID.
    pub pid: u32,
    /// Command line.
    pub command: String,
    /// Log file, if its output goes to one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<PathBuf>,
    /// Live: whether it still runs (status only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alive: Option<bool>,
    /// Start time (clock ticks since boot, `/proc/<pid>/stat` field 22): with the PID it names
    /// the process for good, so `down` never signals a reused PID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<u64>,
}

/// A tern node (`tern daemon`) of the lab, driven with `tern --socket <socket> …`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TernNodeState {
    /// Tailnet hostname it registered with (`c1`, `c2`).
    pub hostname: String,
    /// Lab node (namespace) it runs in.
    pub node: String,
    /// Namespace it runs in.
    pub netns: String,
    /// Its LocalAPI socket (a host path: Unix sockets are not bound to a network namespace).
    pub socket: PathBuf,
    /// Its state directory.
    pub state_dir: PathBuf,
    /// The command that shows its status.
    pub status_command: String,
    /// Live: `backend_state` from its daemon (status only; absent if it did not answer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_state: Option<String>,
    /// Live: its tailnet addresses from its daemon (status only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tailnet_ips: Vec<String>,
    /// Live: how it reaches each peer, from its daemon (status only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<PeerPathState>,
}

/// One peer of a tern node and the path to it, as the node's `status --json` has it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerPathState {
    pub hostname: String,
    /// `direct`, `peer-relay`, `derp` or `none`; absent before the data plane runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub derp_region: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_reason: Option<String>,
}

/// A socket a lab service listens on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SocketState {
    /// What it is (`stun`, `control`, `derp`, …).
    pub name: String,
    /// Node it is in.
    pub node: String,
    /// `udp` or `tcp`.
    pub proto: String,
    /// Bound address.
    pub addr: SocketAddr,
}

/// A service in the lab, e.g. `{"kind":"control","url":"http://10.99.0.20:8080",...}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceState {
    /// `control`, `derp`, `stun`, …
    pub kind: String,
    /// Label.
    pub name: String,
    /// Node it runs in.
    pub node: String,
    /// How to reach it.
    pub url: String,
}

/// `tern lab status --json`: the state plus what is live.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabStatus {
    /// Whether any namespace with the prefix exists.
    pub running: bool,
    /// The state file, if there is one.
    pub state_file: Option<PathBuf>,
    /// Namespaces with the prefix that the state file does not list (e.g. after a crash).
    pub unknown_netns: Vec<String>,
    /// The lab.
    #[serde(flatten)]
    pub lab: LabState,
}

impl LabState {
    /// Describe a topology as just built.
    pub fn from_topology(topo: &Topology) -> LabState {
        LabState {
            version: STATE_VERSION,
            prefix: topo.prefix().to_string(),
            created_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            nodes: topo
                .nodes()
                .iter()
                .map(|node| NodeState {
                    name: node.name().to_string(),
                    netns: node.ns().name().to_string(),
                    kind: node.kind(),
                    addrs: node.addrs().to_vec(),
                    exists: None,
                    interfaces: Vec::new(),
                })
                .collect(),
            nat_boxes: topo.sites().to_vec(),
            processes: Vec::new(),
            sockets: Vec::new(),
            services: Vec::new(),
            tern_nodes: Vec::new(),
            ipv6: topo.ipv6(),
        }
    }

    /// Record a process started in node `node`.
    pub fn record_process(&mut self, node: &str, process: &Process, log: Option<PathBuf>) {
        self.processes.push(ProcessState {
            name: process.name().to_string(),
            node: node.to_string(),
            netns: process.netns().to_string(),
            pid: process.pid(),
            command: process.command_line().to_string(),
            log,
            alive: None,
            start_time: crate::detached::start_time(process.pid()),
        });
    }

    /// The state file of lab `prefix`.
    pub fn path(prefix: &str) -> PathBuf {
        state_dir(prefix).join("state.json")
    }

    /// Write the state file (atomically).
    pub fn save(&self) -> Result<()> {
        let dir = state_dir(&self.prefix);
        std::fs::create_dir_all(&dir)
            .map_err(|err| LabError::io(format!("creating {dir:?}"), err))?;
        let text = serde_json::to_string_pretty(self)
            .map_err(|err| LabError::Invalid(format!("encoding lab state: {err}")))?;
        let tmp = dir.join("state.json.tmp");
        std::fs::write(&tmp, text).map_err(|err| LabError::io(format!("writing {tmp:?}"), err))?;
        let path = LabState::path(&self.prefix);
        std::fs::rename(&tmp, &path).map_err(|err| LabError::io(format!("writing {path:?}"), err))
    }

    /// Read the state file of lab `prefix`, if there is one.
    pub fn load(prefix: &str) -> Result<Option<LabState>> {
        let path = LabState::path(prefix);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(err) => return Err(LabError::io(format!("reading {path:?}"), err)),
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|err| LabError::Invalid(format!("{path:?} is not a lab state file: {err}")))
    }
}

/// The directory of lab `prefix`: `/run/tern-lab/<prefix>/`.
pub fn state_dir(prefix: &str) -> PathBuf {
    PathBuf::from(STATE_ROOT).join(prefix)
}

/// Build the standard topology with `prefix` (dual-stack when `ipv6`), keep it after we exit, and
/// record it.
pub fn up(
    prefix: &str,
    nat1: crate::NatMode,
    nat2: crate::NatMode,
    ipv6: bool,
    internet: bool,
) -> Result<LabState> {
    let mut topo = Topology::standard_with(prefix, nat1, nat2, ipv6)?;
    if internet {
        topo.add_internet_host()?;
    }
    let state = LabState::from_topology(&topo);
    state.save()?;
    topo.persist();
    Ok(state)
}

/// Switch NAT box `nat_box` of the long-lived lab `prefix` to `mode` (conntrack flushed) and
/// record it in the state file.
pub fn set_nat_mode(prefix: &str, nat_box: &str, mode: crate::NatMode) -> Result<()> {
    let mut lab = LabState::load(prefix)?
        .ok_or_else(|| LabError::Invalid(format!("no lab with prefix `{prefix}` is recorded")))?;
    let site = lab
        .nat_boxes
        .iter_mut()
        .find(|site| site.nat == nat_box)
        .ok_or_else(|| LabError::Invalid(format!("lab `{prefix}` has no NAT box {nat_box}")))?;
    let ns = Netns::open(&format!("{prefix}-{nat_box}"))?;
    crate::nat::apply(&ns, mode, site.client_ip)?;
    site.mode = mode;
    lab.save()
}

/// The live status of lab `prefix` (works without a state file, e.g. after a crash).
pub fn status(prefix: &str) -> Result<LabStatus> {
    let existing = namespaces_with_prefix(prefix)?;
    let state_file = LabState::path(prefix);
    let recorded = LabState::load(prefix)?;
    let has_file = recorded.is_some();
    let mut lab = recorded.unwrap_or_else(|| LabState {
        version: STATE_VERSION,
        prefix: prefix.to_string(),
        created_unix: 0,
        nodes: Vec::new(),
        nat_boxes: Vec::new(),
        processes: Vec::new(),
        sockets: Vec::new(),
        services: Vec::new(),
        tern_nodes: Vec::new(),
        ipv6: false,
    });
    for node in &mut lab.nodes {
        node.exists = Some(existing.contains(&node.netns));
        node.interfaces = interfaces(&node.netns).unwrap_or_default();
    }
    for process in &mut lab.processes {
        process.alive = Some(crate::detached::is_alive(process));
    }
    let unknown_netns = existing
        .iter()
        .filter(|ns| !lab.nodes.iter().any(|node| &node.netns == *ns))
        .cloned()
        .collect();
    Ok(LabStatus {
        running: !existing.is_empty(),
        state_file: has_file.then_some(state_file),
        unknown_netns,
        lab,
    })
}

/// Live interfaces of a namespace (`ip -j addr show`).
fn interfaces(netns: &str) -> Result<Vec<InterfaceState>> {
    if !Netns::exists(netns) {
        return Ok(Vec::new());
    }
    let out = crate::netns::run(
        std::process::Command::new("ip").args(["-j", "-4", "-n", netns, "addr", "show"]),
    )?;
    let parsed: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|err| LabError::Invalid(format!("parsing `ip -j addr` output: {err}")))?;
    let links = parsed.as_array().cloned().unwrap_or_default();
    Ok(links
        .iter()
        .filter_map(|link| {
            let name = link.get("ifname")?.as_str()?.to_string();
            let state = link
                .get("operstate")
                .and_then(|s| s.as_str())
                .unwrap_or("UNKNOWN")
                .to_string();
            let addrs = link
                .get("addr_info")
                .and_then(|a| a.as_array())
                .map(|infos| {
                    infos
                        .iter()
                        .filter_map(|info| {
                            let local = info.get("local")?.as_str()?;
                            let len = info.get("prefixlen")?.as_u64()?;
                            Some(format!("{local}/{len}"))
                        })
                        .collect()
                })
                .unwrap_or_default();
            Some(InterfaceState { name, state, addrs })
        })
        .collect())
}

/// What `down` removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DownReport {
    /// Namespaces deleted (with every process in them).
    pub removed_netns: Vec<String>,
    /// Whether a state file was removed.
    pub removed_state: bool,
    /// Recorded processes that ignored SIGTERM for `STOP_GRACE` and got SIGKILL.
    pub killed: Vec<String>,
}

/// How long `down` waits after SIGTERM before SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// Tear lab `prefix` down: every namespace named `<prefix>-*` (killing its processes; the NAT
/// boxes' nft tables live inside them) and the state directory. Without `force` a state file must
/// exist; with it, only the prefix counts (after a crash). Only objects with the prefix are touched.
pub fn down(prefix: &str, force: bool) -> Result<DownReport> {
    crate::netns::preflight()?;
    crate::topology::validate_prefix(prefix)?;
    let recorded = LabState::load(prefix)?;
    let existing = namespaces_with_prefix(prefix)?;
    if recorded.is_none() && !force {
        return Err(LabError::Invalid(if existing.is_empty() {
            format!("no lab with prefix `{prefix}` is running")
        } else {
            format!(
                "no state file for lab `{prefix}` ({}), but its namespaces exist: use `tern lab down --force`",
                LabState::path(prefix).display()
            )
        }));
    }
    let mut report = DownReport::default();
    // Recorded processes get SIGTERM first (a daemon removes its socket, a server its state);
    // deleting the namespaces below SIGKILLs whatever is left in them, recorded or not.
    if let Some(lab) = &recorded {
        report.killed = crate::detached::stop_all(&lab.processes, STOP_GRACE);
    }
    let mut first_error = None;
    for name in existing {
        match delete_named(&name) {
            Ok(()) => report.removed_netns.push(name),
            Err(err) => {
                first_error.get_or_insert(err);
            }
        }
    }
    let dir = state_dir(prefix);
    if dir.exists() {
        std::fs::remove_dir_all(&dir)
            .map_err(|err| LabError::io(format!("removing {dir:?}"), err))?;
        report.removed_state = true;
    }
    match first_error {
        Some(err) if !force => Err(err),
        _ => Ok(report),
    }
}
