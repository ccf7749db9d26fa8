//! `tern set`: change preferences without a full `up`.

use std::path::Path;
use std::process::ExitCode;

use clap::Args;

use crate::localapi::{Client, SetRequest};

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

/// `tern set`: at least one flag; each given flag changes that preference only.
pub fn run(socket: &Path, args: &SetArgs) -> anyhow::Result<ExitCode> {
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
    super::runtime()?.block_on(Client::new(socket).set(&req))?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser as _;

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
