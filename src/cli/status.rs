//! `tern status` and `tern ip`: what the daemon says about this node.

use std::path::Path;
use std::process::ExitCode;
use std::time::SystemTime;

use clap::Args;

use crate::localapi::Client;
use crate::status::{self, BackendState, ControlState};

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print the status as JSON.
    #[arg(long)]
    pub json: bool,
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

/// `tern status`.
pub fn status(socket: &Path, args: &StatusArgs) -> anyhow::Result<ExitCode> {
    let status = super::runtime()?.block_on(Client::new(socket).status())?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(ExitCode::SUCCESS);
    }
    print!("{}", status::render_human(&status, SystemTime::now()));
    // Like `tailscale status`: non-zero when the node is not up.
    let up = status.backend_state == BackendState::Running
        || status.control.state == ControlState::Connected;
    Ok(if up {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `tern ip`.
pub fn ip(socket: &Path, args: &IpArgs) -> anyhow::Result<ExitCode> {
    let ips = super::runtime()?.block_on(Client::new(socket).ip())?;
    let chosen: Vec<String> = match (args.v4, args.v6) {
        (true, _) => ips.ipv4,
        (_, true) => ips.ipv6,
        _ => ips.ipv4.into_iter().chain(ips.ipv6).collect(),
    };
    if chosen.is_empty() {
        anyhow::bail!("no tailnet address yet (see `tern status`)");
    }
    for ip in chosen {
        println!("{ip}");
    }
    Ok(ExitCode::SUCCESS)
}
