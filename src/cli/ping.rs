//! `tern ping`: disco pings through the daemon, printed like `tailscale ping`, with exit codes
//! that say which kind of path answered (see [`exit`]).

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

use crate::duration_text::{go_duration, ms_to_nanos};
use crate::localapi::{Client, LocalApiError, PingRequest, PING_ERROR_LOCAL};
use crate::report::PingResult;

#[derive(Debug, Args)]
#[command(after_help = EXIT_CODES_HELP)]
pub struct PingArgs {
    /// Maximum number of pings.
    #[arg(short = 'c', long = "c", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub count: u32,
    /// Stop as soon as a direct path answers (`--until-direct=false` to keep pinging).
    #[arg(long, default_value_t = true, num_args = 0..=1, require_equals = true,
          default_missing_value = "true", action = clap::ArgAction::Set)]
    pub until_direct: bool,
    /// Time to wait for each pong, e.g. `5s`, `500ms`, `1m`.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub timeout: std::time::Duration,
    /// Print each answer as a JSON line (the LocalAPI's PingResult).
    #[arg(long)]
    pub json: bool,
    /// Peer: MagicDNS name, short name, hostname, tailnet IP or `nodekey:…`.
    pub peer: String,
}

/// `tern ping` exit codes; scripts rely on them (cf. tailscale/tailscale#11439).
pub mod exit {
    /// A pong came back over a direct path.
    pub const DIRECT: u8 = 0;
    /// Other errors: daemon unreachable, unknown peer, data plane not running.
    pub const ERROR: u8 = 1;
    /// Usage error (clap).
    pub const USAGE: u8 = 2;
    /// Pongs came back, but only through DERP or a peer relay.
    pub const RELAYED: u8 = 3;
    /// No pong at all.
    pub const NO_REPLY: u8 = 4;
}

/// The exit-code table for `tern ping --help`.
pub const EXIT_CODES_HELP: &str = "Exit status: 0 = a pong came back over a direct path; \
3 = pongs came back, but only via DERP or a peer relay; 4 = no pong at all; \
1 = other errors (daemon unreachable, unknown peer, data plane not running); 2 = usage error.";

/// Pause between two pings after a pong (as `tailscale ping`).
const PAUSE: Duration = Duration::from_secs(1);

/// How one ping ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Direct,
    /// DERP or a peer relay.
    Relayed,
    NoReply,
}

impl Outcome {
    pub fn of(result: &PingResult) -> Self {
        match (result.error.as_deref(), result.path.as_deref()) {
            (None, Some("direct")) => Outcome::Direct,
            (None, Some(_)) => Outcome::Relayed,
            _ => Outcome::NoReply,
        }
    }
}

/// The best outcome of a run decides: any direct pong → 0, else any pong → 3, else 4.
pub fn exit_code(outcomes: &[Outcome]) -> u8 {
    if outcomes.contains(&Outcome::Direct) {
        exit::DIRECT
    } else if outcomes.contains(&Outcome::Relayed) {
        exit::RELAYED
    } else {
        exit::NO_REPLY
    }
}

/// What `tailscale ping` prints on stderr at the end of a run without a direct pong.
pub fn final_message(outcomes: &[Outcome], until_direct: bool) -> Option<&'static str> {
    match exit_code(outcomes) {
        exit::NO_REPLY => Some("no reply"),
        exit::RELAYED if until_direct => Some("direct connection not established"),
        _ => None,
    }
}

/// One line per ping, as `tailscale ping` prints it:
/// `pong from n2 (100.64.0.2) via 198.18.0.3:41641 in 3ms`, `… via DERP(lab) in 12ms`,
/// `… via peer-relay(ip:port) in 5ms`, or `ping "100.64.0.2" timed out`.
pub fn format_ping_line(result: &PingResult, target: &str) -> String {
    let ip = if result.node_ip.is_empty() {
        target
    } else {
        &result.node_ip
    };
    if let Some(error) = &result.error {
        return match error.as_str() {
            "timeout" => format!("ping {ip:?} timed out"),
            PING_ERROR_LOCAL => format!("{ip} is local Tailscale IP"),
            other => format!("ping {ip:?} failed: {other}"),
        };
    }
    let via = match (result.path.as_deref(), &result.endpoint) {
        (Some("peer-relay"), Some(ep)) => format!("peer-relay({ep})"),
        (Some("derp"), _) => format!(
            "DERP({})",
            result.derp_region_code.as_deref().unwrap_or_default()
        ),
        (_, Some(ep)) => ep.clone(),
        (_, None) => "disco".to_string(),
    };
    let latency = result
        .latency_ms
        .map(|ms| go_duration(ms_to_nanos(ms), 1_000_000))
        .unwrap_or_else(|| "?".into());
    format!(
        "pong from {} ({ip}) via {via} in {latency}",
        result.node_name
    )
}

/// Parse `--timeout`: a positive Go-style duration such as `5s`, `500ms`, `1m`, `1m30s`,
/// `1.5s` (units `ns`, `us`/`µs`, `ms`, `s`, `m`, `h`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad =
        || format!("invalid duration {text:?}: write a number and a unit, e.g. 5s, 500ms or 1m");
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let number: f64 = rest[..number_len].parse().map_err(|_| bad())?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let nanos_per_unit = match &rest[..unit_len] {
            "ns" => 1.0,
            "us" | "µs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return Err(bad()),
        };
        rest = &rest[unit_len..];
        total += number * nanos_per_unit;
    }
    if !(total.is_finite() && total < u64::MAX as f64) {
        return Err(bad());
    }
    let duration = Duration::from_nanos(total as u64);
    if duration < Duration::from_millis(1) {
        return Err(format!("invalid duration {text:?}: must be at least 1ms"));
    }
    Ok(duration)
}

/// `tern ping`.
pub fn run(socket: &Path, args: &PingArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let code = runtime.block_on(ping_loop(&Client::new(socket), args));
    Ok(ExitCode::from(code))
}

async fn ping_loop(client: &Client, args: &PingArgs) -> u8 {
    let timeout_ms = u64::try_from(args.timeout.as_millis()).unwrap_or(u64::MAX);
    let req = PingRequest {
        peer: args.peer.clone(),
        timeout_ms,
    };
    let mut outcomes = Vec::new();
    for n in 1..=args.count {
        let result = match client.ping(&req).await {
            Ok(result) => result,
            Err(e) => {
                eprintln!("tern: {}", api_error_text(&e));
                return exit::ERROR;
            }
        };
        if args.json {
            match serde_json::to_string(&result) {
                Ok(line) => println!("{line}"),
                Err(e) => {
                    eprintln!("tern: {e}");
                    return exit::ERROR;
                }
            }
        } else {
            match result.error.as_deref() {
                None | Some("timeout") | Some(PING_ERROR_LOCAL) => {
                    println!("{}", format_ping_line(&result, &args.peer))
                }
                Some(_) => eprintln!("tern: {}", format_ping_line(&result, &args.peer)),
            }
        }
        match result.error.as_deref() {
            Some(PING_ERROR_LOCAL) => return exit::DIRECT,
            None | Some("timeout") => {}
            Some(_) => return exit::ERROR,
        }
        let outcome = Outcome::of(&result);
        outcomes.push(outcome);
        if outcome == Outcome::Direct && args.until_direct {
            break;
        }
        if outcome != Outcome::NoReply && n < args.count {
            tokio::time::sleep(PAUSE).await;
        }
    }
    if let Some(message) = final_message(&outcomes, args.until_direct) {
        eprintln!("{message}");
    }
    exit_code(&outcomes)
}

/// The daemon's own words for a refused request, else the whole error.
pub fn api_error_text(err: &LocalApiError) -> String {
    match err {
        LocalApiError::Status { message, .. } => message.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pong(path: &str) -> PingResult {
        PingResult {
            node_name: "c2".into(),
            node_ip: "100.64.0.2".into(),
            path: Some(path.into()),
            latency_ms: Some(3.2),
            ..Default::default()
        }
    }

    #[test]
    fn ping_lines_match_tailscale() {
        let mut direct = pong("direct");
        direct.endpoint = Some("198.18.0.3:41641".into());
        assert_eq!(
            format_ping_line(&direct, "c2"),
            "pong from c2 (100.64.0.2) via 198.18.0.3:41641 in 3ms"
        );
        let mut derp = pong("derp");
        derp.derp_region = Some(900);
        derp.derp_region_code = Some("lab".into());
        derp.latency_ms = Some(12.49);
        assert_eq!(
            format_ping_line(&derp, "c2"),
            "pong from c2 (100.64.0.2) via DERP(lab) in 12ms"
        );
        let mut relay = pong("peer-relay");
        relay.endpoint = Some("198.18.0.9:7000".into());
        relay.latency_ms = Some(1234.4);
        assert_eq!(
            format_ping_line(&relay, "c2"),
            "pong from c2 (100.64.0.2) via peer-relay(198.18.0.9:7000) in 1.234s"
        );
        let timeout = PingResult {
            error: Some("timeout".into()),
            ..Default::default()
        };
        assert_eq!(format_ping_line(&timeout, "c2"), "ping \"c2\" timed out");
        let local = PingResult {
            node_ip: "100.64.0.1".into(),
            error: Some(PING_ERROR_LOCAL.into()),
            ..Default::default()
        };
        assert_eq!(
            format_ping_line(&local, "c1"),
            "100.64.0.1 is local Tailscale IP"
        );
    }

    #[test]
    fn durations_parse_like_go() {
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        for bad in ["", "nonsense", "5", "s", "5x", "1.2.3s", "-1s"] {
            let err = parse_duration(bad).unwrap_err();
            assert!(err.contains("e.g. 5s, 500ms or 1m"), "{bad:?}: {err}");
        }
        assert!(parse_duration("0s").unwrap_err().contains("at least 1ms"));
    }

    #[test]
    fn the_best_outcome_decides_the_exit_code() {
        use Outcome::*;
        assert_eq!(exit_code(&[NoReply, Relayed, Direct]), exit::DIRECT);
        assert_eq!(exit_code(&[Relayed, NoReply]), exit::RELAYED);
        assert_eq!(exit_code(&[NoReply, NoReply]), exit::NO_REPLY);
        assert_eq!(exit_code(&[]), exit::NO_REPLY);
        assert_eq!(final_message(&[NoReply], true), Some("no reply"));
        assert_eq!(
            final_message(&[Relayed], true),
            Some("direct connection not established")
        );
        assert_eq!(final_message(&[Relayed], false), None);
        assert_eq!(final_message(&[Relayed, Direct], true), None);
    }

    fn parse_ping(args: &[&str]) -> Result<PingArgs, clap::Error> {
        use clap::Parser as _;
        let cli = crate::cli::Cli::try_parse_from(["tern", "ping"].iter().chain(args))?;
        match cli.command {
            crate::cli::Command::Ping(args) => Ok(args),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn ping_flags_default_like_tailscale_and_parse() {
        let args = parse_ping(&["c2"]).unwrap();
        assert_eq!(
            (args.count, args.until_direct, args.timeout, args.json),
            (10, true, Duration::from_secs(5), false)
        );
        let args = parse_ping(&[
            "-c",
            "3",
            "--until-direct=false",
            "--timeout",
            "500ms",
            "--json",
            "c2",
        ])
        .unwrap();
        assert_eq!(
            (args.count, args.until_direct, args.timeout, args.json),
            (3, false, Duration::from_millis(500), true)
        );
        assert!(parse_ping(&["--until-direct", "c2"]).unwrap().until_direct);
        assert!(parse_ping(&["-c", "0", "c2"]).is_err());
        assert!(parse_ping(&["--timeout", "5", "c2"]).is_err());
        assert!(parse_ping(&[]).is_err(), "PEER is required");
    }

    #[test]
    fn outcomes_from_results() {
        assert_eq!(Outcome::of(&pong("direct")), Outcome::Direct);
        assert_eq!(Outcome::of(&pong("derp")), Outcome::Relayed);
        assert_eq!(Outcome::of(&pong("peer-relay")), Outcome::Relayed);
        let mut timed_out = pong("direct");
        timed_out.error = Some("timeout".into());
        assert_eq!(Outcome::of(&timed_out), Outcome::NoReply);
    }
}
