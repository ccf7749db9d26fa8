//! `tern lab …`: the long-lived lab a person can enter with `ip netns exec`, driven by tern-lab.

use std::fmt::Write as _;
use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use tern_lab::state::{self, LabStatus};
use tern_lab::wan::{Shaping, WanProfile};
use tern_lab::NatMode;

/// Without a subcommand: build the standard lab like `tern lab up` with default NAT modes, then
/// open `tern top` on c1 when stdout is a terminal (print `tern lab status` otherwise).
#[derive(Debug, Args)]
pub struct LabArgs {
    /// Namespace name prefix of the lab (namespaces are `<prefix>-<node>`); for tests.
    #[arg(
        long,
        global = true,
        hide = true,
        env = "TERN_LAB_PREFIX",
        default_value = "tlab"
    )]
    pub prefix: String,
    #[command(subcommand)]
    pub command: Option<LabCommand>,
}

#[derive(Debug, Subcommand)]
pub enum LabCommand {
    /// Build the standard lab topology, start the lab coordination server and a registered tern
    /// node in c1 and c2, and leave it all running (`tern lab status` names each node's socket).
    Up(LabUpArgs),
    /// Describe the running lab.
    Status(LabStatusArgs),
    /// Tear the lab down: stop its processes, delete its namespaces and state.
    Down(LabDownArgs),
    /// Switch a NAT box of the running lab to another mode (e.g. `tern lab nat nat1 hard`).
    Nat(LabNatArgs),
    /// Shape the DERP host's link of the running lab (`none` or `long-haul`: 120 ms ± 30 ms and
    /// 1 % loss each way), so DERP is far while the peer relay stays near.
    Wan(LabWanArgs),
    /// Run the lab coordination server (for labs and tests only, not production).
    Control(LabControlArgs),
    /// Serve "your address" over HTTP on ADDR (the lab's internet host runs it).
    #[command(hide = true)]
    Whoami {
        /// ip:port to listen on.
        addr: std::net::SocketAddr,
    },
}

#[derive(Debug, Args)]
pub struct LabControlArgs {
    /// TOML configuration file (see lab/control.example.toml).
    #[arg(long)]
    pub config: PathBuf,
}

#[derive(Debug, Args)]
pub struct LabUpArgs {
    /// NAT mode of the first client's NAT box: easy, hard, fw, udpblock, portfwd or none.
    #[arg(long, default_value = "easy")]
    pub nat1: String,
    /// NAT mode of the second client's NAT box: easy, hard, fw, udpblock, portfwd or none.
    #[arg(long, default_value = "easy")]
    pub nat2: String,
    /// Dual stack: also give every host a global IPv6 address (2001:db8::/32, no NAT; the NAT
    /// boxes' firewall applies), and the DERP region IPv6 STUN.
    #[arg(long)]
    pub ipv6: bool,
    /// Also run a tern node named `relay` on the public `server` host with its peer relay
    /// server on (udp/40000): clients that cannot go direct (e.g. --nat1 hard --nat2 hard)
    /// then use it instead of DERP.
    #[arg(long)]
    pub relay: bool,
    /// Link conditions on the DERP host's link: none (default) or long-haul (120 ms ± 30 ms,
    /// 1 % loss each way); change it later with `tern lab wan`.
    #[arg(long, default_value = "none")]
    pub wan: String,
    /// Add an "internet" host (198.18.0.30, answering HTTP with the client's address) and make
    /// c2 an exit node for c1: c1's traffic to it leaves through c2.
    #[arg(long)]
    pub exit_node: bool,
    /// Register this many made-up nodes (offline, no endpoints, home DERP 900) with the control
    /// server before it starts, so every node's netmap has that many more peers: for measuring
    /// memory and netmap handling at scale (at most 5000).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=5000))]
    pub synthetic_peers: u32,
    /// Give every node this node attribute in its netmap, as Tailscale's `nodeAttrs` do (e.g.
    /// `disable-relay-client`), or only the node with hostname HOST (`c1=disable-relay-client`);
    /// repeat for more. Letters, digits and `-._:/` only.
    #[arg(long = "node-attr", value_name = "[HOST=]NAME", value_parser = parse_node_attr)]
    pub node_attrs: Vec<crate::lab_nodes::NodeAttr>,
}

/// A node attribute as `--node-attr` takes it (it goes into the control config as is).
fn parse_node_attr(text: &str) -> Result<crate::lab_nodes::NodeAttr, String> {
    let plain = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-._:/".contains(c))
    };
    let (host, attr) = match text.split_once('=') {
        Some((host, attr)) => (Some(host), attr),
        None => (None, text),
    };
    if !plain(attr) || host.is_some_and(|h| !plain(h)) {
        return Err(format!(
            "`{text}` is not [HOST=]NAME: use letters, digits and -._:/ (e.g. disable-relay-client or c1=disable-relay-client)"
        ));
    }
    Ok(crate::lab_nodes::NodeAttr {
        host: host.map(str::to_string),
        attr: attr.to_string(),
    })
}

#[derive(Debug, Args)]
pub struct LabStatusArgs {
    /// Print the status as JSON (format: lab/README.md).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct LabNatArgs {
    /// The NAT box: nat1 or nat2.
    pub nat_box: String,
    /// easy, hard, fw, udpblock, portfwd or none.
    pub mode: String,
}

#[derive(Debug, Args)]
pub struct LabWanArgs {
    /// none or long-haul.
    pub profile: String,
}

#[derive(Debug, Args)]
pub struct LabDownArgs {
    /// Remove every object with the lab's prefix, even without a state file.
    #[arg(long)]
    pub force: bool,
}

/// Run a `tern lab` subcommand.
pub fn run(args: &LabArgs) -> anyhow::Result<ExitCode> {
    let prefix = args.prefix.as_str();
    match &args.command {
        Some(LabCommand::Up(up_args)) => up(prefix, up_args),
        Some(LabCommand::Status(status_args)) => status(prefix, status_args),
        Some(LabCommand::Down(down_args)) => down(prefix, down_args),
        Some(LabCommand::Nat(nat_args)) => nat(prefix, nat_args),
        Some(LabCommand::Wan(wan_args)) => wan(prefix, &wan_args.profile),
        Some(LabCommand::Control(control_args)) => control(control_args),
        Some(LabCommand::Whoami { addr }) => whoami(*addr),
        None => {
            // The bare command is the demo: `up` (topology, control, two nodes) + `status`.
            let defaults = LabUpArgs {
                nat1: "easy".into(),
                nat2: "easy".into(),
                ipv6: false,
                relay: false,
                wan: "none".into(),
                exit_node: false,
                synthetic_peers: 0,
                node_attrs: Vec::new(),
            };
            up(prefix, &defaults)?;
            if !std::io::stdout().is_terminal() {
                return status(prefix, &LabStatusArgs { json: false });
            }
            let socket = state::state_dir(prefix).join("c1.sock");
            let top = super::top::TopArgs {
                once: false,
                size: (80, 24),
            };
            let code = super::top::run(&socket, &top)?;
            print!("{}", after_top(prefix));
            Ok(code)
        }
    }
}

/// What to do next, printed when `tern top` (opened by bare `tern lab`) quits.
fn after_top(prefix: &str) -> String {
    let env = if prefix == "tlab" {
        String::new()
    } else {
        format!("TERN_LAB_PREFIX={prefix} ")
    };
    format!(
        "the lab is still running.\n\
         watch it again:     {env}tern --socket {} top\n\
         change a NAT:       {env}tern lab nat nat1 hard   (nat1|nat2: easy, hard, fw, udpblock, portfwd, none)\n\
         describe it:        {env}tern lab status\n\
         tear it down:       {env}tern lab down\n",
        state::state_dir(prefix).join("c1.sock").display()
    )
}

fn nat(prefix: &str, args: &LabNatArgs) -> anyhow::Result<ExitCode> {
    let mode: NatMode = args.mode.parse().context("NAT mode")?;
    state::set_nat_mode(prefix, &args.nat_box, mode)?;
    println!("{} of lab `{prefix}` is now {mode}", args.nat_box);
    Ok(ExitCode::SUCCESS)
}

/// What the shaping could do on this kernel.
fn shaping_note(shaping: Shaping) -> &'static str {
    match shaping {
        Shaping::None => "",
        Shaping::Netem => " (4 Mbit/s, 1 % loss, 120 ms ± 30 ms each way)",
        Shaping::RateAndLoss => {
            " (4 Mbit/s, 1 % loss each way; no delay: this kernel has no sch_netem)"
        }
    }
}

fn wan(prefix: &str, profile: &str) -> anyhow::Result<ExitCode> {
    let profile: WanProfile = profile.parse().context("WAN profile")?;
    let shaping = tern_lab::wan::apply(prefix, profile)?;
    println!(
        "the DERP host's link of lab `{prefix}` is now {profile}{}",
        shaping_note(shaping)
    );
    Ok(ExitCode::SUCCESS)
}

fn up(prefix: &str, args: &LabUpArgs) -> anyhow::Result<ExitCode> {
    let nat1: NatMode = args.nat1.parse().context("--nat1")?;
    let nat2: NatMode = args.nat2.parse().context("--nat2")?;
    let wan_profile: WanProfile = args.wan.parse().context("--wan")?;
    let mut lab = state::up(prefix, nat1, nat2, args.ipv6, args.exit_node)?;
    let options = crate::lab_nodes::StartOptions {
        relay: args.relay,
        exit_node: args.exit_node,
        synthetic_peers: args.synthetic_peers,
        node_attrs: args.node_attrs.clone(),
    };
    let started = crate::lab_nodes::start(&mut lab, &options)
        .and_then(|()| Ok(tern_lab::wan::apply(prefix, wan_profile)?));
    let shaping = started.as_ref().map(|s| *s).unwrap_or(Shaping::None);
    if let Err(err) = started {
        // Never leave a half-started lab (or its processes) behind.
        if let Err(down_err) = state::down(prefix, true) {
            eprintln!("tern: tearing the half-started lab down also failed: {down_err:#}");
        }
        return Err(err.context(format!("starting lab `{prefix}` (torn down again)")));
    }
    println!(
        "lab `{prefix}` is up: {} namespaces (nat1 {nat1}, nat2 {nat2}{}), control server {}, tern nodes {}",
        lab.nodes.len(),
        if lab.ipv6 { ", dual-stack" } else { "" },
        crate::lab_nodes::control_url(),
        lab.tern_nodes
            .iter()
            .map(|n| n.hostname.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    if wan_profile != WanProfile::None {
        println!(
            "DERP host's link:   {wan_profile}{} (change with: tern lab wan none|long-haul)",
            shaping_note(shaping)
        );
    }
    if args.relay {
        println!(
            "peer relay:         {} on {} (udp/{})",
            crate::lab_nodes::RELAY_HOSTNAME,
            crate::lab_nodes::RELAY_NODE,
            crate::lab_nodes::RELAY_SERVER_PORT
        );
    }
    if args.exit_node {
        println!(
            "exit node:          c1 uses c2; try: ip netns exec {prefix}-c1 curl http://{}/ (answers \
             c2's side's address)",
            tern_lab::topology::INTERNET_IP
        );
    }
    for node in &lab.tern_nodes {
        println!(
            "ask {:<4} with:      {}",
            node.hostname, node.status_command
        );
    }
    println!("enter a node with:  ip netns exec {prefix}-c1 bash");
    println!("describe it with:   tern lab status [--json]");
    println!(
        "watch it live:      tern --socket {} top",
        state::state_dir(prefix).join("c1.sock").display()
    );
    println!("change a NAT with:  tern lab nat nat1 hard");
    println!("tear it down with:  tern lab down");
    Ok(ExitCode::SUCCESS)
}

/// The internet host's server: runs until killed (`tern lab down`).
fn whoami(addr: std::net::SocketAddr) -> anyhow::Result<ExitCode> {
    println!("whoami: serving on {addr}");
    tern_lab::whoami::serve_forever(addr)?;
    Ok(ExitCode::SUCCESS)
}

fn status(prefix: &str, args: &LabStatusArgs) -> anyhow::Result<ExitCode> {
    let mut status = state::status(prefix)?;
    crate::lab_nodes::fill_live(&mut status.lab);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", render_status(&status));
    }
    Ok(if status.running {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn down(prefix: &str, args: &LabDownArgs) -> anyhow::Result<ExitCode> {
    let report = state::down(prefix, args.force)?;
    if report.removed_netns.is_empty() && !report.removed_state {
        println!("nothing of lab `{prefix}` was left");
    } else {
        println!(
            "lab `{prefix}` is down: removed {} namespaces{}",
            report.removed_netns.len(),
            if report.removed_state {
                " and its state"
            } else {
                ""
            }
        );
    }
    if !report.killed.is_empty() {
        println!(
            "(SIGKILL after {} s: {})",
            state::STOP_GRACE.as_secs(),
            report.killed.join(", ")
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Human-readable status.
fn render_status(status: &LabStatus) -> String {
    let lab = &status.lab;
    let mut out = String::new();
    if !status.running {
        let _ = writeln!(out, "lab `{}` is not running", lab.prefix);
        return out;
    }
    let _ = writeln!(out, "lab `{}`", lab.prefix);
    for node in &lab.nodes {
        let addrs: Vec<String> = node
            .interfaces
            .iter()
            .filter(|iface| iface.name != "lo")
            .map(|iface| format!("{} {}", iface.name, iface.addrs.join(",")))
            .collect();
        let missing = if node.exists == Some(false) {
            "  (missing)"
        } else {
            ""
        };
        let _ = writeln!(
            out,
            "  {:<8} {:<14} {:<7} {}{missing}",
            node.name,
            node.netns,
            format!("{:?}", node.kind).to_lowercase(),
            addrs.join("  ")
        );
    }
    for site in &lab.nat_boxes {
        let _ = writeln!(
            out,
            "  {} -> {}: mode {}, wan {}, client {}",
            site.nat, site.client, site.mode, site.wan_ip, site.client_ip
        );
    }
    for process in &lab.processes {
        let _ = writeln!(
            out,
            "  process {} in {} pid {}{}",
            process.name,
            process.node,
            process.pid,
            if process.alive == Some(false) {
                " (exited)"
            } else {
                ""
            }
        );
    }
    for service in &lab.services {
        let _ = writeln!(
            out,
            "  {} {} in {}: {}",
            service.kind, service.name, service.node, service.url
        );
    }
    for node in &lab.tern_nodes {
        let _ = writeln!(
            out,
            "  tern node {} in {}: {} {}\n    socket {}\n    try:  {}",
            node.hostname,
            node.node,
            node.backend_state
                .as_deref()
                .unwrap_or("(daemon not answering)"),
            node.tailnet_ips.join(" "),
            node.socket.display(),
            node.status_command
        );
        for peer in &node.peers {
            let _ = writeln!(out, "    to {}: {}", peer.hostname, describe_path(peer));
        }
    }
    for ns in &status.unknown_netns {
        let _ = writeln!(
            out,
            "  unrecorded namespace {ns} (remove with `tern lab down --force`)"
        );
    }
    out
}

/// `direct 198.18.2.2:41641`, `derp(900), peer-hard-nat`, or `no path yet`.
fn describe_path(peer: &tern_lab::state::PeerPathState) -> String {
    let route = match (peer.path.as_deref(), &peer.endpoint, peer.derp_region) {
        (Some("direct" | "peer-relay"), Some(ep), _) => {
            format!("{} {ep}", peer.path.as_deref().unwrap_or_default())
        }
        (Some("derp"), _, Some(region)) => format!("derp({region})"),
        (Some(path), _, _) => path.to_string(),
        (None, _, _) => return "no path yet".into(),
    };
    match peer.path_reason.as_deref() {
        Some(reason) if !matches!(reason, "direct") => format!("{route}, {reason}"),
        _ => route,
    }
}

/// `tern lab control`: load and check the config, then serve until killed.
fn control(args: &LabControlArgs) -> anyhow::Result<ExitCode> {
    super::init_logging();
    let config = tern_lab::control::Config::load(&args.config)?;
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(crate::control::server::run_from_config(config))?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_lab::state::PeerPathState;

    fn peer(
        path: Option<&str>,
        endpoint: Option<&str>,
        region: Option<u16>,
        reason: Option<&str>,
    ) -> PeerPathState {
        PeerPathState {
            hostname: "c2".into(),
            path: path.map(str::to_string),
            endpoint: endpoint.map(str::to_string),
            derp_region: region,
            path_reason: reason.map(str::to_string),
        }
    }

    #[test]
    fn paths_read_like_tern_status() {
        let direct = peer(
            Some("direct"),
            Some("198.18.2.2:41641"),
            None,
            Some("direct"),
        );
        assert_eq!(describe_path(&direct), "direct 198.18.2.2:41641");
        let derp = peer(Some("derp"), None, Some(900), Some("both-hard-nat"));
        assert_eq!(describe_path(&derp), "derp(900), both-hard-nat");
        let none = peer(Some("none"), None, None, Some("no-derp-region"));
        assert_eq!(describe_path(&none), "none, no-derp-region");
        assert_eq!(describe_path(&peer(None, None, None, None)), "no path yet");
    }
}
