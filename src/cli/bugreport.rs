//! `tern bugreport`: the daemon's status, a fresh netcheck and its recent log, redacted (see
//! [`crate::bugreport`]), on stdout for an issue report.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

use crate::bugreport::{assemble, Redaction};
use crate::localapi::Client;

#[derive(Debug, Args)]
pub struct BugreportArgs {
    /// Keep IP:port endpoints (ours, peers', relays', DERP's) in the report; keys and auth
    /// keys are removed regardless.
    #[arg(long)]
    pub include_endpoints: bool,
    /// Log lines to include (the daemon keeps the last 2000).
    #[arg(long, default_value_t = 300)]
    pub log_lines: usize,
}

/// How long the netcheck may take before the report goes without it.
const NETCHECK_WAIT: Duration = Duration::from_secs(15);

/// `tern bugreport`.
pub fn run(socket: &Path, args: &BugreportArgs) -> anyhow::Result<ExitCode> {
    let client = Client::new(socket);
    let (status, netcheck, logs) = super::runtime()?.block_on(async {
        let status = client.status().await;
        let netcheck = tokio::time::timeout(NETCHECK_WAIT, client.netcheck()).await;
        let logs = client.logs().await;
        (status, netcheck, logs)
    });
    // Without a daemon there is nothing to report: say so as every verb does.
    let status = serde_json::to_value(status?)?;
    let netcheck = match netcheck {
        Ok(Ok(report)) => Ok(serde_json::to_value(report)?),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {}s", NETCHECK_WAIT.as_secs())),
    };
    let lines = logs.map(|l| l.lines).unwrap_or_default();
    let tail = &lines[lines.len().saturating_sub(args.log_lines)..];
    let how = Redaction {
        include_endpoints: args.include_endpoints,
    };
    print!(
        "{}",
        assemble(
            env!("CARGO_PKG_VERSION"),
            Some(&status),
            netcheck.as_ref().map_err(String::as_str),
            tail,
            how
        )
    );
    Ok(ExitCode::SUCCESS)
}
