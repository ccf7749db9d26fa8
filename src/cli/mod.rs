//! The `tern` command line: one clap tree, dispatched to one file per verb.
//!
//! Each verb's file holds its clap arguments and its handler; nothing below the CLI imports
//! from here.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

pub mod bugreport;
pub mod daemon;
pub mod derp;
pub mod exit_node;
pub mod gen;
pub mod lab;
pub mod metrics;
pub mod net_flags;
pub mod netcheck;
pub mod ping;
pub mod set;
pub mod status;
pub mod top;
pub mod up;

use bugreport::BugreportArgs;
use daemon::DaemonArgs;
use derp::DerpArgs;
use exit_node::ExitNodeArgs;
use gen::{CompletionArgs, GenManArgs};
use lab::LabArgs;
use netcheck::NetcheckArgs;
use ping::PingArgs;
use set::SetArgs;
use status::{IpArgs, StatusArgs};
use top::TopArgs;
use up::UpArgs;

/// Default LocalAPI socket of the daemon.
pub const DEFAULT_SOCKET: &str = "/run/tern/tern.sock";

#[derive(Debug, Parser)]
#[command(
    name = "tern",
    version,
    about = "A Tailscale-compatible node for Linux"
)]
pub struct Cli {
    /// Path of the daemon's LocalAPI socket.
    #[arg(long, global = true, env = "TERN_SOCKET", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node daemon.
    Daemon(DaemonArgs),
    /// Connect to the tailnet, registering if needed.
    Up(UpArgs),
    /// Disconnect from the tailnet (the daemon keeps running).
    Down,
    /// Log in to the tailnet (as `up`: with --auth-key, or by visiting the URL control gives).
    Login(UpArgs),
    /// Log out: disconnect, forget the auth key, and have control expire this node's key.
    Logout,
    /// Show this node and its peers.
    Status(StatusArgs),
    /// Disco-ping a peer and report the path it answers on.
    Ping(PingArgs),
    /// Report UDP reachability, NAT type and DERP latency.
    Netcheck(NetcheckArgs),
    /// Change preferences without a full `up`.
    Set(SetArgs),
    /// Exit nodes: `tern exit-node list`.
    #[command(name = "exit-node")]
    ExitNode(ExitNodeArgs),
    /// Show this node's tailnet addresses.
    Ip(IpArgs),
    /// Print the daemon's metrics (Prometheus text format).
    Metrics,
    /// Print a redacted status, netcheck and recent log for an issue report.
    Bugreport(BugreportArgs),
    /// Live dashboard of peers, paths and relays.
    Top(TopArgs),
    /// Run a DERP relay server.
    Derp(DerpArgs),
    /// Network-namespace lab: topologies, NAT boxes, lab coordination server. Without a
    /// subcommand (for now): `lab up`, then `lab status`.
    Lab(LabArgs),
    /// Print the shell completion script for bash, zsh or fish, e.g.
    /// `source <(tern completion bash)`.
    Completion(CompletionArgs),
    /// Write one manual page per subcommand into a directory (for packaging).
    #[command(name = "gen-man", hide = true)]
    GenMan(GenManArgs),
}

/// Parse the command line and run it; returns the process exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("tern: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let socket = cli.socket.as_path();
    match &cli.command {
        Command::Daemon(args) => daemon::run(socket, args),
        command => client_command(socket, command),
    }
}

/// Every command but the daemon. Kept out of `run` so that their code is not part of the
/// function the daemon starts in, which release builds link among the daemon's (`link/hot.ld`).
#[inline(never)]
fn client_command(socket: &Path, command: &Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Daemon(args) => daemon::run(socket, args),
        Command::Up(args) => up::up(socket, args),
        Command::Down => up::down(socket),
        Command::Login(args) => up::up(socket, args),
        Command::Logout => up::logout(socket),
        Command::Status(args) => status::status(socket, args),
        Command::Ip(args) => status::ip(socket, args),
        Command::Ping(args) => ping::run(socket, args),
        Command::Netcheck(args) => netcheck::run(socket, args),
        Command::Set(args) => set::run(socket, args),
        Command::ExitNode(args) => exit_node::run(socket, args),
        Command::Metrics => metrics::run(socket),
        Command::Bugreport(args) => bugreport::run(socket, args),
        Command::Top(args) => top::run(socket, args),
        Command::Derp(args) => derp::run(socket, args),
        Command::Lab(args) => lab::run(args),
        Command::Completion(args) => gen::completion(args),
        Command::GenMan(args) => gen::gen_man(args),
    }
}

/// The multi-thread runtime the node commands (`daemon`, `up`, `set`, …) run on.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")
}

/// Logs to stderr, filtered by `TERN_LOG`, else `RUST_LOG` (default `info`). A second call is a
/// no-op.
pub fn init_logging() {
    init_logging_from(&["TERN_LOG", "RUST_LOG"], false);
}

/// Logs to stderr, filtered by the first of `vars` that is set (default `info`); colours only
/// when stderr is a terminal (journald and log files get plain text). With `keep_recent` (the
/// daemon) every line is also kept in [`crate::logring`] for `tern bugreport`. A second call is
/// a no-op. The filter is a list of `level` and `target=level` directives ([`log_filter`]).
pub fn init_logging_from(vars: &[&str], keep_recent: bool) {
    use std::io::IsTerminal as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter = match vars.iter().find_map(|var| {
        let spec = std::env::var(var).ok().filter(|v| !v.trim().is_empty())?;
        Some((*var, spec))
    }) {
        Some((var, spec)) => log_filter(&spec).unwrap_or_else(|e| {
            eprintln!("tern: ignoring {var}={spec:?} ({e}); logging at info");
            info_filter()
        }),
        None => info_filter(),
    };
    let ansi = std::io::stderr().is_terminal();
    let _ = if keep_recent {
        log_subscriber(filter, crate::logring::TeeWriter, ansi).try_init()
    } else {
        log_subscriber(filter, std::io::stderr, ansi).try_init()
    };
}

/// Formatted lines to `writer`, the events `filter` lets through. On a bare registry: the `fmt()`
/// builder would cap every level at its default `info` before the filter is asked.
fn log_subscriber<W>(
    filter: tracing_subscriber::filter::Targets,
    writer: W,
    ansi: bool,
) -> impl tracing::Subscriber + Send + Sync
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    use tracing_subscriber::layer::SubscriberExt as _;
    tracing_subscriber::registry().with(filter).with(
        tracing_subscriber::fmt::layer()
            .with_ansi(ansi)
            .with_writer(writer),
    )
}

/// The filter when `TERN_LOG` is unset or unusable: `info` for everything.
fn info_filter() -> tracing_subscriber::filter::Targets {
    tracing_subscriber::filter::Targets::new().with_default(tracing::Level::INFO)
}

/// A log filter from `TERN_LOG` text: `level` sets the default, `target=level` a module's.
/// `Targets`, not `EnvFilter`: no span or field filters, whose regex engine would add some
/// 170 KB of code that the daemon keeps resident.
fn log_filter(spec: &str) -> Result<tracing_subscriber::filter::Targets, String> {
    spec.parse().map_err(|e| format!("{e}"))
}

#[cfg(test)]
mod tests {
    use super::log_filter;
    use tracing::Level;

    #[test]
    fn log_filters_take_a_default_level_and_per_module_levels() {
        let filter = log_filter("info,tern::relay=debug").expect("parses");
        assert!(filter.would_enable("tern::relay::server", &Level::DEBUG));
        assert!(!filter.would_enable("tern::relay::server", &Level::TRACE));
        assert!(!filter.would_enable("tern::engine", &Level::DEBUG));
        assert!(filter.would_enable("h2::codec", &Level::INFO));
        let quiet = log_filter("warn").expect("parses");
        assert!(!quiet.would_enable("tern", &Level::INFO));
        assert!(quiet.would_enable("tern", &Level::WARN));
    }

    /// What a subscriber wrote, shared with the test.
    #[derive(Clone, Default)]
    struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_daemons_subscriber_writes_debug_lines_a_filter_asks_for() {
        let captured = Captured::default();
        let writer = captured.clone();
        let filter = log_filter("info,tern=debug").expect("parses");
        let subscriber = super::log_subscriber(filter, move || writer.clone(), false);
        tracing::subscriber::with_default(subscriber, || {
            tracing::debug!(target: "tern::control", "debug-from-tern");
            tracing::trace!(target: "tern::control", "trace-from-tern");
            tracing::debug!(target: "h2::codec", "debug-from-h2");
            tracing::info!(target: "h2::codec", "info-from-h2");
        });
        let text = String::from_utf8(captured.0.lock().expect("lock").clone()).expect("utf-8");
        assert!(text.contains("debug-from-tern"), "{text}");
        assert!(text.contains("info-from-h2"), "{text}");
        assert!(!text.contains("trace-from-tern"), "{text}");
        assert!(!text.contains("debug-from-h2"), "{text}");
    }

    #[test]
    fn a_log_filter_that_does_not_parse_is_an_error() {
        assert!(log_filter("tern=loud").is_err());
    }
}
