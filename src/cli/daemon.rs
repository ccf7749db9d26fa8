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
    /// UDP port for WireGuard, disco and STUN (0 = pick one).
    #[arg(long, default_value_t = 41641)]
    pub port: u16,
    /// Also let this user (name or uid) use the LocalAPI socket (otherwise root only).
    #[arg(long)]
    pub operator: Option<String>,
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
        port: args.port,
        operator: args.operator.clone(),
    };
    super::runtime()?.block_on(daemon::run(config))?;
    Ok(ExitCode::SUCCESS)
}

/// The daemon's logs go to stderr, filtered by `TERN_LOG` alone (default `info`): a `RUST_LOG`
/// meant for some other program in the service's environment does not change them.
fn init_logging() {
    super::init_logging_from(&["TERN_LOG"]);
}
