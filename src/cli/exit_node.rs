//! `tern exit-node list`: the peers that offer an exit node, with the path and latency to each
//! (a slow or DERP-only exit node is a poor choice), as `tailscale exit-node list`.

use std::path::Path;
use std::process::ExitCode;

use clap::{Args, Subcommand};

use crate::localapi::Client;
use crate::status::{PeerStatus, Status};

#[derive(Debug, Args)]
pub struct ExitNodeArgs {
    #[command(subcommand)]
    pub command: ExitNodeCommand,
}

#[derive(Debug, Subcommand)]
pub enum ExitNodeCommand {
    /// The peers that offer an exit node.
    List {
        /// Print them as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `tern exit-node …`.
pub fn run(socket: &Path, args: &ExitNodeArgs) -> anyhow::Result<ExitCode> {
    let ExitNodeCommand::List { json } = &args.command;
    let status = super::runtime()?.block_on(Client::new(socket).status())?;
    let offers: Vec<&PeerStatus> = status.peers.iter().filter(|p| p.exit_node_option).collect();
    if *json {
        println!("{}", serde_json::to_string_pretty(&offers)?);
        return Ok(ExitCode::SUCCESS);
    }
    print!("{}", render_list(&status));
    Ok(ExitCode::SUCCESS)
}

/// The table: IP, name, path, latency, status (selected / online / offline).
pub fn render_list(status: &Status) -> String {
    let offers: Vec<&PeerStatus> = status.peers.iter().filter(|p| p.exit_node_option).collect();
    if offers.is_empty() {
        return "No peer offers an exit node. A node offers one with `tern set \
                --advertise-exit-node` (and control must approve it).\n"
            .to_string();
    }
    let selected = status.routing.exit_node_ip.as_deref();
    let mut rows = vec![[
        "IP".to_string(),
        "NAME".to_string(),
        "PATH".to_string(),
        "LATENCY".to_string(),
        "STATUS".to_string(),
    ]];
    for p in offers {
        let ip = p.tailnet_ips.first().cloned().unwrap_or_else(|| "-".into());
        let state = if Some(ip.as_str()) == selected {
            "selected"
        } else if p.online == Some(false) {
            "offline"
        } else {
            "-"
        };
        rows.push([
            ip,
            p.name.clone(),
            p.path.clone().unwrap_or_else(|| "-".into()),
            p.latency_ms
                .map_or_else(|| "-".into(), |ms| format!("{ms:.1} ms")),
            state.to_string(),
        ]);
    }
    let widths: Vec<usize> = (0..5)
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out.push_str("\n# Use one with `tern set --exit-node=NAME` (stop with `--exit-node=`).\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::DataPlaneStatus;

    #[test]
    fn lists_only_offers_and_marks_the_selected_one() {
        let mut status = Status::initial(DataPlaneStatus::default(), std::time::SystemTime::now());
        let offer = |name: &str, ip: &str, exit: bool| PeerStatus {
            name: name.into(),
            tailnet_ips: vec![ip.into()],
            exit_node_option: exit,
            path: Some("direct".into()),
            latency_ms: Some(1.5),
            online: Some(true),
            ..Default::default()
        };
        status.peers = vec![
            offer("c2.lab.ts.net", "100.64.0.2", true),
            offer("c3.lab.ts.net", "100.64.0.3", false),
        ];
        status.routing.exit_node_ip = Some("100.64.0.2".into());
        let text = render_list(&status);
        assert!(text.contains("c2.lab.ts.net"), "{text}");
        assert!(!text.contains("c3.lab.ts.net"), "{text}");
        assert!(text.contains("selected"), "{text}");
        assert!(text.contains("1.5 ms"), "{text}");
        status.peers.truncate(0);
        assert!(render_list(&status).contains("--advertise-exit-node"));
    }
}
