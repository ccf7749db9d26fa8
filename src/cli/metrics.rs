//! `tern metrics`: the daemon's status in Prometheus text format (what `--metrics-listen`
//! serves), printed once.

use std::path::Path;
use std::process::ExitCode;

use crate::localapi::Client;

/// `tern metrics`.
pub fn run(socket: &Path) -> anyhow::Result<ExitCode> {
    let status = super::runtime()?.block_on(Client::new(socket).status())?;
    print!("{}", crate::metrics::render(&status));
    Ok(ExitCode::SUCCESS)
}
