//! `tern daemon`: run the node daemon in the foreground.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;

use crate::daemon::{self, DaemonConfig};

#[derive(Debug, Args)]
pub struct DaemonArgs {
    /// Directory for keys and preferences.
    #[arg(long, default_value = "/var/lib/tern")]
    pub state_dir: PathBuf,
    /// TUN device name, or `userspace-networking`.
    #[arg(long, default_value = "tern0")]
    pub tun: String,
    /// TUN offloads: read 64 KiB TCP super-packets from the kernel and hand it coalesced ones
    /// (`false` = one packet per read and write; for comparison or an odd kernel). Without offload
    /// support in the kernel the TUN opens without them either way.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL", env = "TERN_TUN_OFFLOAD")]
    pub tun_offload: bool,
    /// Threads of the async runtime: 1 (default) runs every task on one thread, which moves
    /// packets between the engine and its DERP connections without waking other threads; 0 =
    /// one per CPU.
    #[arg(long, default_value_t = 1, value_name = "N", env = "TERN_THREADS")]
    pub threads: usize,
    /// UDP port for WireGuard, disco and STUN (0 = pick one).
    #[arg(long, default_value_t = 41641)]
    pub port: u16,
    /// Also let this user (name or uid) use the LocalAPI socket (otherwise root only).
    #[arg(long)]
    pub operator: Option<String>,
    /// Run a SOCKS5 proxy on ADDR (e.g. `localhost:1080`) into the tailnet: tailnet addresses
    /// and MagicDNS names go through tern, other destinations are dialed from this host.
    #[arg(long, value_name = "ADDR", value_parser = parse_listen_addr)]
    pub socks5_server: Option<std::net::SocketAddr>,
    /// Run an HTTP proxy (CONNECT and plain http:// requests) on ADDR, as the SOCKS5 one.
    #[arg(long, value_name = "ADDR", value_parser = parse_listen_addr)]
    pub outbound_http_proxy_listen: Option<std::net::SocketAddr>,
    /// Serve Prometheus metrics at http://ADDR/metrics (off by default). ADDR as for the proxies.
    #[arg(long, value_name = "ADDR", value_parser = parse_listen_addr)]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Remove what a previous run left (ip rules, table 52 throw routes, netfilter chains and
    /// jumps, also a Go tailscaled's) and exit; for the systemd unit's ExecStopPost.
    #[arg(long)]
    pub cleanup: bool,
}

/// `tern daemon`.
pub fn run(socket: &Path, args: &DaemonArgs) -> anyhow::Result<ExitCode> {
    init_logging();
    if args.cleanup {
        return match super::runtime()?.block_on(crate::engine::cleanup_host()) {
            Ok(()) => Ok(ExitCode::SUCCESS),
            Err(e) => {
                eprintln!("tern daemon --cleanup: {e}");
                Ok(ExitCode::FAILURE)
            }
        };
    }
    crate::rlimit::raise_nofile_logged();
    let config = DaemonConfig {
        state_dir: args.state_dir.clone(),
        socket: socket.to_path_buf(),
        tun: args.tun.clone(),
        tun_offload: args.tun_offload,
        port: args.port,
        operator: args.operator.clone(),
        socks5_server: args.socks5_server,
        http_proxy: args.outbound_http_proxy_listen,
        metrics_listen: args.metrics_listen,
    };
    crate::runtime::build(args.threads)
        .map_err(|e| anyhow::anyhow!("starting the tokio runtime: {e}"))?
        .block_on(daemon::run(config))?;
    Ok(ExitCode::SUCCESS)
}

/// The daemon's logs go to stderr, filtered by `TERN_LOG` alone (default `info`): a `RUST_LOG`
/// meant for some other program in the service's environment does not change them.
fn init_logging() {
    super::init_logging_from(&["TERN_LOG"], true);
}

/// A listen address for the proxies and metrics: `IP:PORT` or `localhost:PORT`. A bare `:PORT`
/// (every interface) is refused: a proxy there opens the tailnet to anyone who reaches this
/// host; give `0.0.0.0:PORT` when that is really meant.
fn parse_listen_addr(text: &str) -> Result<std::net::SocketAddr, String> {
    if let Some(port) = text.strip_prefix("localhost:") {
        return port
            .parse::<u16>()
            .map(|p| std::net::SocketAddr::from(([127, 0, 0, 1], p)))
            .map_err(|_| format!("{text:?}: the port must be a number 0-65535"));
    }
    if text.starts_with(':') {
        return Err(format!(
            "{text:?}: give the address to listen on, e.g. localhost{text} (on every interface \
             anyone who reaches this host could use it; write 0.0.0.0{text} if you mean that)"
        ));
    }
    text.parse()
        .map_err(|_| format!("{text:?}: expected IP:PORT or localhost:PORT, e.g. localhost:1080"))
}

#[cfg(test)]
mod tests {
    use super::parse_listen_addr;

    #[test]
    fn proxy_addresses() {
        assert_eq!(
            parse_listen_addr("localhost:1080"),
            Ok("127.0.0.1:1080".parse().unwrap())
        );
        assert_eq!(
            parse_listen_addr("[::1]:8080"),
            Ok("[::1]:8080".parse().unwrap())
        );
        assert!(parse_listen_addr(":1080")
            .unwrap_err()
            .contains("localhost:1080"));
        assert!(parse_listen_addr("localhost:x").is_err());
        assert!(parse_listen_addr("nowhere")
            .unwrap_err()
            .contains("IP:PORT"));
    }
}
