//! The node's CLI commands (`daemon`, `up`, `down`, `status`, `ip`): thin wrappers that run the
//! daemon or call it through the LocalAPI client.

use std::path::Path;
use std::process::ExitCode;
use std::time::SystemTime;

use anyhow::Context as _;

use crate::cli::{DaemonArgs, IpArgs, SetArgs, StatusArgs, UpArgs};
use crate::daemon::{self, DaemonConfig};
use crate::localapi::{Client, SetRequest, UpRequest};
use crate::status::{self, BackendState, ControlState};

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")
}

pub fn daemon(socket: &Path, args: &DaemonArgs) -> anyhow::Result<ExitCode> {
    init_logging();
    let config = DaemonConfig {
        state_dir: args.state_dir.clone(),
        socket: socket.to_path_buf(),
        tun: args.tun.clone(),
        port: args.port,
        operator: args.operator.clone(),
    };
    runtime()?.block_on(daemon::run(config))?;
    Ok(ExitCode::SUCCESS)
}

pub fn up(socket: &Path, args: &UpArgs) -> anyhow::Result<ExitCode> {
    let auth_key = args.auth_key.as_deref().map(resolve_auth_key).transpose()?;
    let req = UpRequest {
        login_server: args.login_server.clone(),
        auth_key,
        hostname: args.hostname.clone(),
    };
    runtime()?.block_on(Client::new(socket).up(&req))?;
    Ok(ExitCode::SUCCESS)
}

/// `tern set`: at least one flag; each given flag changes that preference only.
pub fn set(socket: &Path, args: &SetArgs) -> anyhow::Result<ExitCode> {
    let Some(relay) = args.relay_server_port else {
        eprintln!(
            "tern set: nothing to change; pass a flag, e.g. --relay-server-port=40000 (or \
             --relay-server-port= to turn the relay server off); see `tern set --help`"
        );
        return Ok(ExitCode::from(2));
    };
    let req = SetRequest {
        relay_server_port: relay.pref(),
        relay_server_port_set: true,
    };
    runtime()?.block_on(Client::new(socket).set(&req))?;
    Ok(ExitCode::SUCCESS)
}

pub fn down(socket: &Path) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(Client::new(socket).down())?;
    Ok(ExitCode::SUCCESS)
}

pub fn status(socket: &Path, args: &StatusArgs) -> anyhow::Result<ExitCode> {
    let status = runtime()?.block_on(Client::new(socket).status())?;
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

pub fn ip(socket: &Path, args: &IpArgs) -> anyhow::Result<ExitCode> {
    let ips = runtime()?.block_on(Client::new(socket).ip())?;
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

/// `KEY` or `file:PATH` (read as the user running the CLI; surrounding whitespace dropped).
fn resolve_auth_key(arg: &str) -> anyhow::Result<String> {
    let key = match arg.strip_prefix("file:") {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("reading auth key from {path}"))?,
        None => arg.to_string(),
    };
    let key = key.trim();
    anyhow::ensure!(!key.is_empty(), "the auth key is empty");
    Ok(key.to_string())
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TERN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_key_from_file_or_literal() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("key");
        std::fs::write(&path, "tskey-abc\n").unwrap();
        assert_eq!(
            resolve_auth_key(&format!("file:{}", path.display())).unwrap(),
            "tskey-abc"
        );
        assert_eq!(resolve_auth_key("tskey-lit").unwrap(), "tskey-lit");
        let err = resolve_auth_key("file:/nonexistent/k").unwrap_err();
        assert!(format!("{err:#}").contains("/nonexistent/k"));
        std::fs::write(&path, "  \n").unwrap();
        assert!(resolve_auth_key(&format!("file:{}", path.display())).is_err());
    }
}
