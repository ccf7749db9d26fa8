//! `tern up` and `tern down`: connect to or leave the tailnet through the daemon's LocalAPI.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Args;

use crate::localapi::{Client, UpRequest};

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

/// `tern up`.
pub fn up(socket: &Path, args: &UpArgs) -> anyhow::Result<ExitCode> {
    let auth_key = args.auth_key.as_deref().map(resolve_auth_key).transpose()?;
    let req = UpRequest {
        login_server: args.login_server.clone(),
        auth_key,
        hostname: args.hostname.clone(),
    };
    super::runtime()?.block_on(Client::new(socket).up(&req))?;
    Ok(ExitCode::SUCCESS)
}

/// `tern down`.
pub fn down(socket: &Path) -> anyhow::Result<ExitCode> {
    super::runtime()?.block_on(Client::new(socket).down())?;
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
