//! `tern set`: change preferences without a full `up`.

use std::net::SocketAddr;
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
    /// Addresses the relay server offers besides the ones it discovers, e.g. a port forward on
    /// the router: `ip:port,[v6]:port` (deduplicated and sorted); an empty value clears them.
    #[arg(long, value_name = "IP:PORT,...", value_parser = parse_static_endpoints)]
    pub relay_server_static_endpoints: Option<StaticEndpoints>,
    #[command(flatten)]
    pub net: super::net_flags::NetFlags,
}

/// `--relay-server-static-endpoints`: a sorted list without duplicates (empty = none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticEndpoints(pub Vec<SocketAddr>);

/// Go's format: comma-separated `ip:port` (IPv6 in brackets); an empty string clears the list.
pub fn parse_static_endpoints(text: &str) -> Result<StaticEndpoints, String> {
    let mut endpoints = Vec::new();
    for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let addr: SocketAddr = item.parse().map_err(|_| {
            format!("`{item}` is not ip:port: write e.g. 203.0.113.7:40000 or [2001:db8::7]:40000")
        })?;
        if addr.port() == 0 || addr.ip().is_unspecified() {
            return Err(format!(
                "`{item}` cannot be reached by clients: give a real IP and a port (1-65535)"
            ));
        }
        endpoints.push(addr);
    }
    endpoints.sort();
    endpoints.dedup();
    Ok(StaticEndpoints(endpoints))
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
    let net = args.net.patch();
    if args.relay_server_port.is_none()
        && args.relay_server_static_endpoints.is_none()
        && net.is_empty()
    {
        eprintln!(
            "tern set: nothing to change; pass a flag, e.g. --relay-server-port=40000, \
             --exit-node=NAME or --advertise-routes=10.0.0.0/24; see `tern set --help`"
        );
        return Ok(ExitCode::from(2));
    }
    let statics = args.relay_server_static_endpoints.clone();
    let req = SetRequest {
        relay_server_port: args.relay_server_port.and_then(RelayPort::pref),
        relay_server_port_set: args.relay_server_port.is_some(),
        relay_server_static_endpoints_set: statics.is_some(),
        relay_server_static_endpoints: statics.map(|s| s.0).unwrap_or_default(),
        net,
    };
    super::runtime()?.block_on(async {
        let client = Client::new(socket);
        client.set(&req).await?;
        super::net_flags::print_forwarding_advice(&client, &req.net).await;
        anyhow::Ok(())
    })?;
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
