//! The `tern` command line: one clap tree, dispatched to the module that owns each job.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

pub mod lab;
pub mod netcheck;
pub mod node_commands;
pub mod ping;

/// Exit code for a subcommand whose issue has not landed yet, and for usage errors.
pub const EXIT_NOT_IMPLEMENTED: u8 = 2;

/// Default LocalAPI socket of the daemon.
pub const DEFAULT_SOCKET: &str = "/run/tern/tern.sock";

#[derive(Debug, Parser)]
#[command(
    name = "tern",
    version,
    about = "A Tailscale-compatible node for Linux"
)]
pub struct Cli {
    /// Path of the daemon's LocalAPI socket.
    #[arg(long, global = true, env = "TERN_SOCKET", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node daemon.
    Daemon(DaemonArgs),
    /// Connect to the tailnet, registering if needed.
    Up(UpArgs),
    /// Disconnect from the tailnet (the daemon keeps running).
    Down,
    /// Show this node and its peers.
    Status(StatusArgs),
    /// Disco-ping a peer and report the path it answers on.
    Ping(PingArgs),
    /// Report UDP reachability, NAT type and DERP latency.
    Netcheck(NetcheckArgs),
    /// Change preferences without a full `up`.
    Set(SetArgs),
    /// Show this node's tailnet addresses.
    Ip(IpArgs),
    /// Print the daemon's metrics (Prometheus text format).
    Metrics,
    /// Live dashboard of peers, paths and relays.
    Top,
    /// Run a DERP relay server.
    Derp(DerpArgs),
    /// Network-namespace lab: topologies, NAT boxes, lab coordination server. Without a
    /// subcommand (for now): `lab up`, then `lab status`.
    Lab(LabArgs),
}

#[derive(Debug, Args)]
pub struct DaemonArgs {
    /// Directory for keys and preferences.
    #[arg(long, default_value = "/var/lib/tern")]
    pub state_dir: PathBuf,
    /// TUN device name, or `userspace-networking`.
    #[arg(long, default_value = "tern0")]
    pub tun: String,
    /// UDP port for WireGuard, disco and STUN (0 = pick one).
    #[arg(long, default_value_t = 41641)]
    pub port: u16,
    /// Also let this user (name or uid) use the LocalAPI socket (otherwise root only).
    #[arg(long)]
    pub operator: Option<String>,
}

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Coordination server URL.
    #[arg(long)]
    pub login_server: Option<String>,
    /// Pre-auth key, or `file:PATH` to read it from a file.
    #[arg(long)]
    pub auth_key: Option<String>,
    /// Hostname to register with.
    #[arg(long)]
    pub hostname: Option<String>,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print the status as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
#[command(after_help = ping::EXIT_CODES_HELP)]
pub struct PingArgs {
    /// Maximum number of pings.
    #[arg(short = 'c', long = "c", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub count: u32,
    /// Stop as soon as a direct path answers (`--until-direct=false` to keep pinging).
    #[arg(long, default_value_t = true, num_args = 0..=1, require_equals = true,
          default_missing_value = "true", action = clap::ArgAction::Set)]
    pub until_direct: bool,
    /// Time to wait for each pong, e.g. `5s`, `500ms`, `1m`.
    #[arg(long, default_value = "5s", value_parser = ping::parse_duration)]
    pub timeout: std::time::Duration,
    /// Print each answer as a JSON line (the LocalAPI's PingResult).
    #[arg(long)]
    pub json: bool,
    /// Peer: MagicDNS name, short name, hostname, tailnet IP or `nodekey:…`.
    pub peer: String,
}

#[derive(Debug, Args)]
pub struct NetcheckArgs {
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct SetArgs {
    /// Run a peer relay server on this UDP port (1-65535; 0 = a port the kernel picks); an empty
    /// value (`--relay-server-port=`) turns it off.
    #[arg(long, value_name = "PORT", value_parser = parse_relay_port)]
    pub relay_server_port: Option<RelayPort>,
}

/// `--relay-server-port`: off, or a UDP port (0 = any).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayPort {
    Off,
    Port(u16),
}

impl RelayPort {
    /// The pref value (`None` = off).
    pub fn pref(self) -> Option<u16> {
        match self {
            RelayPort::Off => None,
            RelayPort::Port(p) => Some(p),
        }
    }
}

/// Go's meaning: an empty string disables the relay server, `0` asks for a random port.
pub fn parse_relay_port(text: &str) -> Result<RelayPort, String> {
    if text.trim().is_empty() {
        return Ok(RelayPort::Off);
    }
    text.trim()
        .parse::<u16>()
        .map(RelayPort::Port)
        .map_err(|_| {
            format!(
                "`{text}` is not a UDP port: pass 1-65535, 0 for a port the kernel picks, or an \
             empty value (--relay-server-port=) to turn the relay server off"
            )
        })
}

#[derive(Debug, Args)]
pub struct IpArgs {
    /// Only the IPv4 address.
    #[arg(short = '4', conflicts_with = "v6")]
    pub v4: bool,
    /// Only the IPv6 address.
    #[arg(short = '6')]
    pub v6: bool,
}

#[derive(Debug, Args)]
pub struct DerpArgs {
    /// Address to serve DERP on (`:443` = all addresses, port 443).
    #[arg(long, default_value = ":443")]
    pub addr: String,
    /// PEM certificate chain for TLS (with --keyfile).
    #[arg(long, requires = "keyfile", conflicts_with_all = ["self_signed", "http"])]
    pub certfile: Option<PathBuf>,
    /// PEM private key for TLS (with --certfile).
    #[arg(long, requires = "certfile")]
    pub keyfile: Option<PathBuf>,
    /// Serve TLS with a fresh self-signed certificate for HOSTNAME (lab use); prints its
    /// `sha256-raw:` pin for the DERP map's CertName.
    #[arg(long, value_name = "HOSTNAME", conflicts_with = "http")]
    pub self_signed: Option<String>,
    /// Plain HTTP, no TLS (Go clients: TS_DEBUG_USE_DERP_HTTP=1, port 3340).
    #[arg(long)]
    pub http: bool,
    /// UDP port of the STUN responder (0 = off).
    #[arg(long, default_value_t = 3478)]
    pub stun_port: u16,
    /// Also answer STUN on this address of the host (same port; repeatable): a second STUN
    /// destination lets clients tell whether their NAT maps per destination ("hard NAT").
    #[arg(long, value_name = "IP")]
    pub stun_also: Vec<std::net::IpAddr>,
    /// File holding the server's private key (`privkey:` text); created if missing.
    /// Without it the key is random per run.
    #[arg(long)]
    pub key_file: Option<PathBuf>,
    /// Mesh key (64 hex digits) that privileged clients must present.
    #[arg(long, env = "TERN_DERP_MESH_KEY", hide_env_values = true)]
    pub mesh_key: Option<String>,
}

/// Without a subcommand (for now): build the standard lab like `tern lab up` with default NAT
/// modes, then print its status like `tern lab status`.
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
    /// Run the lab coordination server (for labs and tests only, not production).
    Control(LabControlArgs),
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
}

#[derive(Debug, Args)]
pub struct LabStatusArgs {
    /// Print the status as JSON (format: lab/README.md).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct LabDownArgs {
    /// Remove every object with the lab's prefix, even without a state file.
    #[arg(long)]
    pub force: bool,
}

/// Parse the command line and run it; returns the process exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("tern: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    if let Command::Lab(args) = &cli.command {
        return lab::run(args);
    }
    use node_commands as node;
    let name = match &cli.command {
        Command::Daemon(args) => return node::daemon(&cli.socket, args),
        Command::Up(args) => return node::up(&cli.socket, args),
        Command::Down => return node::down(&cli.socket),
        Command::Status(args) => return node::status(&cli.socket, args),
        Command::Ip(args) => return node::ip(&cli.socket, args),
        Command::Ping(args) => return ping::run(&cli.socket, args),
        Command::Netcheck(args) => return netcheck::run(&cli.socket, args),
        Command::Set(args) => return node::set(&cli.socket, args),
        Command::Metrics => "metrics",
        Command::Top => "top",
        Command::Derp(args) => return crate::derp::server::run_cli(args),
        Command::Lab(_) => "lab",
    };
    Ok(not_implemented(name))
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`). A second call is a no-op.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// What a subcommand whose issue has not landed yet does.
pub fn not_implemented(name: &str) -> ExitCode {
    eprintln!("tern: '{name}' is not implemented yet");
    ExitCode::from(EXIT_NOT_IMPLEMENTED)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set_args(args: &[&str]) -> Result<SetArgs, clap::Error> {
        let mut full = vec!["tern", "set"];
        full.extend_from_slice(args);
        match Cli::try_parse_from(full)?.command {
            Command::Set(args) => Ok(args),
            other => panic!("not set: {other:?}"),
        }
    }

    #[test]
    fn relay_server_port_takes_a_port_zero_or_empty_like_tailscale() {
        let port = |a: &[&str]| set_args(a).map(|s| s.relay_server_port);
        assert_eq!(
            port(&["--relay-server-port=40000"]).unwrap(),
            Some(RelayPort::Port(40000))
        );
        assert_eq!(
            port(&["--relay-server-port", "0"]).unwrap(),
            Some(RelayPort::Port(0))
        );
        assert_eq!(
            port(&["--relay-server-port="]).unwrap(),
            Some(RelayPort::Off)
        );
        assert_eq!(port(&[]).unwrap(), None);
        for bad in ["abc", "70000", "-1", "4.5"] {
            let err = port(&[&format!("--relay-server-port={bad}")]).unwrap_err();
            assert_eq!(err.exit_code(), 2);
            assert!(err.to_string().contains("is not a UDP port"), "{err}");
        }
        assert_eq!(RelayPort::Off.pref(), None);
        assert_eq!(RelayPort::Port(9).pref(), Some(9));
    }
}
