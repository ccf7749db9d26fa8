//! `tern derp`: run a DERP relay server.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

use crate::derp::server::{self, RunConfig};

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
    /// Most connections open at once; more are closed as soon as they are accepted.
    #[arg(long, default_value_t = server::DEFAULT_MAX_CONNS, value_name = "N")]
    pub max_conns: usize,
    /// Most connections per source (IPv4 address, IPv6 /64) still in the handshake.
    #[arg(long, default_value_t = server::DEFAULT_MAX_UNAUTH_PER_IP, value_name = "N")]
    pub max_unauth_per_ip: usize,
    /// Time from accept to a finished handshake (TLS, HTTP head, ClientInfo; Go-style: `5s`,
    /// `500ms`).
    #[arg(long, default_value = "5s", value_parser = super::ping::parse_duration, value_name = "DURATION")]
    pub handshake_timeout: Duration,
    /// Only nodes of our tailnet may connect: each client's node key must be the local tern
    /// daemon's own or one of its peers' (asked over the LocalAPI; refused if it cannot be asked).
    #[arg(long)]
    pub verify_clients: bool,
    /// Threads forwarding packets: 1 (default) serves every client on one thread, the cheapest
    /// per packet; 0 = one per CPU, for many busy clients.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub threads: usize,
    /// LocalAPI socket asked by --verify-clients (default: the global --socket).
    #[arg(long, value_name = "PATH", requires = "verify_clients")]
    pub verify_socket: Option<PathBuf>,
}

/// `tern derp`: run the relay until interrupted.
pub fn run(socket: &Path, args: &DerpArgs) -> anyhow::Result<ExitCode> {
    super::init_logging();
    crate::rlimit::raise_nofile_logged();
    server::run(&config(socket, args))?;
    Ok(ExitCode::SUCCESS)
}

/// The flags as the server's plain configuration.
fn config(socket: &Path, args: &DerpArgs) -> RunConfig {
    let verify_socket = args.verify_socket.as_deref().unwrap_or(socket);
    RunConfig {
        addr: args.addr.clone(),
        threads: args.threads,
        certfile: args.certfile.clone(),
        keyfile: args.keyfile.clone(),
        self_signed: args.self_signed.clone(),
        http: args.http,
        stun_port: args.stun_port,
        stun_also: args.stun_also.clone(),
        key_file: args.key_file.clone(),
        mesh_key: args.mesh_key.clone(),
        max_conns: args.max_conns,
        max_unauth_per_ip: args.max_unauth_per_ip,
        handshake_timeout: args.handshake_timeout,
        verify_clients: args.verify_clients.then(|| verify_socket.to_path_buf()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;

    fn parsed(args: &[&str]) -> (PathBuf, RunConfig) {
        let cli = Cli::try_parse_from(args).expect("parses");
        let Command::Derp(derp) = cli.command else {
            panic!("not derp")
        };
        let config = config(&cli.socket, &derp);
        (cli.socket, config)
    }

    #[test]
    fn limits_have_defaults_and_verify_asks_the_global_socket_unless_told() {
        let (_, plain) = parsed(&["tern", "derp", "--http"]);
        assert_eq!(plain.max_conns, server::DEFAULT_MAX_CONNS);
        assert_eq!(plain.max_unauth_per_ip, server::DEFAULT_MAX_UNAUTH_PER_IP);
        assert_eq!(plain.handshake_timeout, Duration::from_secs(5));
        assert_eq!(plain.verify_clients, None);

        let (socket, verify) = parsed(&[
            "tern",
            "--socket",
            "/tmp/t.sock",
            "derp",
            "--verify-clients",
            "--handshake-timeout",
            "1500ms",
            "--max-conns",
            "7",
        ]);
        assert_eq!(verify.verify_clients, Some(socket));
        assert_eq!(verify.handshake_timeout, Duration::from_millis(1500));
        assert_eq!(verify.max_conns, 7);

        let (_, own) = parsed(&[
            "tern",
            "derp",
            "--verify-clients",
            "--verify-socket",
            "/run/x.sock",
        ]);
        assert_eq!(own.verify_clients, Some(PathBuf::from("/run/x.sock")));
        // --verify-socket alone means nothing: it needs --verify-clients.
        assert!(Cli::try_parse_from(["tern", "derp", "--verify-socket", "/x"]).is_err());
    }
}
