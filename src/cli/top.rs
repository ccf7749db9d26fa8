//! `tern top`: the live dashboard (crate `tern-tui`) on this daemon's LocalAPI. This file is the
//! I/O half: the [`Backend`] over [`Client`] (watch stream, ping, prefs) and the terminal loop
//! (raw mode + alternate screen, restored on quit, panic, SIGTERM and SIGHUP).

use std::io::{IsTerminal as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use clap::Args;
use tern_tui::crossterm::event::{self, Event, KeyEventKind};
use tern_tui::crossterm::{cursor, execute, terminal};
use tern_tui::ratatui::backend::CrosstermBackend;
use tern_tui::ratatui::Terminal;
use tern_tui::{App, Backend, Effect, Feed, Lines, PingAnswer};

use crate::localapi::{Client, LocalApiError, PingRequest, SetRequest, WatchStream};

/// How long `tern top` waits before reconnecting after the stream failed.
const RETRY: Duration = Duration::from_secs(1);
/// How long `--once` waits for the first snapshot.
const ONCE_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, Args)]
pub struct TopArgs {
    /// Print one rendered frame as plain text and exit (for scripts and bug reports).
    #[arg(long)]
    pub once: bool,
    /// Frame size for `--once`, COLSxROWS.
    #[arg(long, default_value = "80x24", value_parser = parse_size)]
    pub size: (u16, u16),
}

fn parse_size(text: &str) -> Result<(u16, u16), String> {
    let (w, h) = text
        .split_once('x')
        .ok_or_else(|| format!("{text:?}: expected COLSxROWS, e.g. 160x48"))?;
    let parse = |v: &str| v.parse::<u16>().ok().filter(|n| (10..=1000).contains(n));
    match (parse(w), parse(h)) {
        (Some(w), Some(h)) => Ok((w, h)),
        _ => Err(format!("{text:?}: each side must be 10..=1000")),
    }
}

/// The LocalAPI as `tern-tui` sees it; blocking calls on a small runtime of its own.
struct LocalBackend {
    client: Client,
    socket: PathBuf,
    runtime: tokio::runtime::Runtime,
}

fn api_error(e: LocalApiError) -> String {
    match e {
        LocalApiError::Status { message, .. } | LocalApiError::Body(message) => message,
        other => other.to_string(),
    }
}

/// A watch stream as a blocking iterator of lines.
struct BlockingLines {
    stream: WatchStream,
    handle: tokio::runtime::Handle,
    done: bool,
}

impl Iterator for BlockingLines {
    type Item = Result<String, String>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.handle.block_on(self.stream.next_line()) {
            Ok(Some(line)) => Some(Ok(line)),
            Ok(None) => None,
            Err(e) => {
                self.done = true;
                Some(Err(api_error(e)))
            }
        }
    }
}

impl Backend for LocalBackend {
    fn watch(&self) -> Result<Lines, String> {
        let stream = self
            .runtime
            .block_on(self.client.watch())
            .map_err(api_error)?;
        Ok(Box::new(BlockingLines {
            stream,
            handle: self.runtime.handle().clone(),
            done: false,
        }))
    }

    fn ping(&self, target: &str) -> Result<PingAnswer, String> {
        let req = PingRequest {
            peer: target.to_string(),
            timeout_ms: 5000,
        };
        let r = self
            .runtime
            .block_on(self.client.ping(&req))
            .map_err(api_error)?;
        Ok(PingAnswer {
            path: r.path,
            endpoint: r.endpoint,
            derp_region: r.derp_region,
            latency_ms: r.latency_ms,
            error: r.error,
        })
    }

    fn set_relay_port(&self, port: Option<u16>) -> Result<(), String> {
        let req = SetRequest {
            relay_server_port: port,
            relay_server_port_set: true,
            ..Default::default()
        };
        self.runtime
            .block_on(self.client.set(&req))
            .map_err(api_error)
    }

    fn writable(&self) -> bool {
        // Connecting to a Unix socket needs write permission on it.
        nix::unistd::access(&self.socket, nix::unistd::AccessFlags::W_OK).is_ok()
    }
}

fn no_color() -> bool {
    std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty())
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// `tern top [--once]`.
pub fn run(socket: &Path, args: &TopArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let backend = Arc::new(LocalBackend {
        client: Client::new(socket),
        socket: socket.to_path_buf(),
        runtime,
    });
    let app = App::new(socket.display().to_string(), backend.writable(), no_color());
    if args.once {
        return once(backend, app, args.size);
    }
    if !std::io::stdout().is_terminal() {
        anyhow::bail!("tern top needs a terminal; use `tern top --once` for plain text");
    }
    interactive(backend, app)
}

/// One frame: the first snapshot (or why there is none) as text.
fn once(backend: Arc<LocalBackend>, mut app: App, (w, h): (u16, u16)) -> anyhow::Result<ExitCode> {
    let (tx, rx) = mpsc::channel();
    let feeder = backend.clone();
    std::thread::spawn(move || {
        tern_tui::pump(&*feeder, Duration::from_millis(200), |f| {
            let last = matches!(f, Feed::Snapshot(_) | Feed::Unreachable(_));
            tx.send(f).is_ok() && !last
        })
    });
    let deadline = std::time::Instant::now() + ONCE_WAIT;
    let mut ok = false;
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(feed) => {
                let done = matches!(feed, Feed::Snapshot(_) | Feed::Unreachable(_));
                ok = matches!(feed, Feed::Snapshot(_));
                app.feed(feed, now());
                if done {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    let mut out = std::io::stdout().lock();
    out.write_all(tern_tui::frame_text(&app, now(), w, h).as_bytes())?;
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Everything the loop reacts to.
enum Input {
    Feed(Feed),
    Key(event::KeyEvent),
    Redraw,
    Pinged(String, Result<PingAnswer, String>),
    RelaySet(Option<u16>, Result<(), String>),
    Signal(i32),
}

/// Raw mode and the alternate screen while alive; the terminal as it was after.
struct TerminalGuard;

impl TerminalGuard {
    fn enter() -> anyhow::Result<TerminalGuard> {
        terminal::enable_raw_mode().context("raw mode")?;
        // From here on, Drop restores even if the rest fails.
        let guard = TerminalGuard;
        execute!(
            std::io::stdout(),
            terminal::EnterAlternateScreen,
            cursor::Hide
        )
        .context("alternate screen")?;
        Ok(guard)
    }
}

/// Leave the alternate screen, show the cursor, end raw mode. Safe to call twice.
fn restore_terminal() {
    let _ = execute!(
        std::io::stdout(),
        terminal::LeaveAlternateScreen,
        cursor::Show
    );
    let _ = terminal::disable_raw_mode();
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        restore_terminal();
    }
}

/// A panic prints on a restored terminal, not into the alternate screen.
fn restore_on_panic() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        restore_terminal();
        previous(info);
    }));
}

/// SIGTERM, SIGHUP and SIGINT end the loop (and so restore the terminal).
fn forward_signals(backend: &LocalBackend, tx: mpsc::Sender<Input>) {
    use tokio::signal::unix::{signal, SignalKind};
    for kind in [
        SignalKind::terminate(),
        SignalKind::hangup(),
        SignalKind::interrupt(),
    ] {
        let tx = tx.clone();
        let _guard = backend.runtime.enter();
        match signal(kind) {
            Ok(mut stream) => {
                backend.runtime.spawn(async move {
                    if stream.recv().await.is_some() {
                        let _ = tx.send(Input::Signal(kind.as_raw_value()));
                    }
                });
            }
            Err(e) => tracing::warn!(error = %e, "cannot watch a signal"),
        }
    }
}

fn spawn_inputs(backend: &Arc<LocalBackend>, tx: &mpsc::Sender<Input>) {
    let feeder = backend.clone();
    let feed_tx = tx.clone();
    std::thread::spawn(move || {
        tern_tui::pump(&*feeder, RETRY, |f| feed_tx.send(Input::Feed(f)).is_ok())
    });
    let key_tx = tx.clone();
    std::thread::spawn(move || loop {
        let input = match event::read() {
            Ok(Event::Key(k)) if k.kind != KeyEventKind::Release => Input::Key(k),
            Ok(Event::Resize(..)) => Input::Redraw,
            Ok(_) => continue,
            Err(_) => return,
        };
        if key_tx.send(input).is_err() {
            return;
        }
    });
    forward_signals(backend, tx.clone());
}

/// Run an effect off the UI thread; its answer comes back as an input.
fn perform(effect: Effect, backend: &Arc<LocalBackend>, tx: &mpsc::Sender<Input>) {
    let backend = backend.clone();
    let tx = tx.clone();
    match effect {
        Effect::Quit => {}
        Effect::Ping { key, target } => {
            std::thread::spawn(move || {
                let _ = tx.send(Input::Pinged(key, backend.ping(&target)));
            });
        }
        Effect::SetRelayPort(port) => {
            std::thread::spawn(move || {
                let _ = tx.send(Input::RelaySet(port, backend.set_relay_port(port)));
            });
        }
    }
}

fn interactive(backend: Arc<LocalBackend>, mut app: App) -> anyhow::Result<ExitCode> {
    let (tx, rx) = mpsc::channel();
    restore_on_panic();
    let guard = TerminalGuard::enter()?;
    spawn_inputs(&backend, &tx);
    let mut terminal = Terminal::new(CrosstermBackend::new(std::io::stdout()))?;
    terminal.clear()?;
    let mut signal = None;
    while !app.should_quit() && signal.is_none() {
        terminal.draw(|f| tern_tui::render(f, &app, now()))?;
        // Wake at least every second so ages and the strip move; take every queued input
        // before drawing again.
        let mut next = rx.recv_timeout(Duration::from_secs(1)).ok();
        while let Some(input) = next {
            match input {
                Input::Feed(f) => app.feed(f, now()),
                Input::Key(k) => {
                    if let Some(effect) = app.key(k) {
                        perform(effect, &backend, &tx);
                    }
                }
                Input::Redraw => {}
                Input::Pinged(key, answer) => app.ping_done(&key, answer),
                Input::RelaySet(port, result) => app.relay_done(port, result),
                Input::Signal(n) => signal = Some(n),
            }
            next = rx.try_recv().ok();
        }
    }
    drop(terminal);
    drop(guard);
    Ok(match signal {
        Some(n) => ExitCode::from(128u8.saturating_add(n as u8)),
        None => ExitCode::SUCCESS,
    })
}
