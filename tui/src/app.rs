//! The dashboard's state machine: stream events and keys in, UI state and [`Effect`]s out. No
//! terminal, no socket: the CLI performs the effects through its [`crate::Backend`].

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

use crate::keys::{self, Action};
use crate::model::{SortKey, Tracker, ViewInput, ViewModel};
use crate::snapshot::Status;

/// What the watch stream delivered.
#[derive(Debug, Clone)]
pub enum Feed {
    /// The stream is open (before its first snapshot).
    Connected,
    Snapshot(Box<Status>),
    /// A line that is not a status snapshot; the stream is dropped and reopened.
    Malformed(String),
    /// The daemon closed the stream or the connection broke.
    Closed(String),
    /// No connection at all (daemon not running, socket missing or refused).
    Unreachable(String),
}

/// The answer to a disco ping, as the LocalAPI reports it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PingAnswer {
    pub path: Option<String>,
    pub endpoint: Option<String>,
    pub derp_region: Option<u16>,
    pub latency_ms: Option<f64>,
    /// Why there is no pong (`timeout`, …).
    pub error: Option<String>,
}

impl PingAnswer {
    pub fn describe(&self) -> String {
        if let Some(err) = &self.error {
            return format!("no pong: {err}");
        }
        let via = match (self.path.as_deref(), &self.endpoint, self.derp_region) {
            (Some("derp"), _, Some(r)) => format!("DERP({r})"),
            (Some(p), Some(ep), _) => format!("{p} {ep}"),
            (Some(p), None, _) => p.to_string(),
            (None, _, _) => "?".into(),
        };
        format!("pong via {via} in {}", crate::fmt::latency(self.latency_ms))
    }
}

/// Something the CLI must do for the dashboard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    Quit,
    /// Disco-ping this peer (its first tailnet IP, or name).
    Ping {
        key: String,
        target: String,
    },
    /// Set the relay server port (`None` = off).
    SetRelayPort(Option<u16>),
}

/// The stream connection, as the screen shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Conn {
    Connecting,
    Live,
    /// The stream broke (bad line or closed): the last snapshot stays, with this error line.
    Broken(String),
    /// The daemon cannot be reached: the "not reachable" screen.
    Down {
        error: String,
        attempts: u32,
    },
}

/// Which text prompt, if any, has the keyboard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    Normal,
    Filter,
    /// Typing the relay server port.
    RelayPort(String),
    /// Waiting for y/n on a relay change.
    ConfirmRelay(Option<u16>),
    Help,
}

/// What the main area shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    Peers,
    Detail,
    Relay,
}

/// A line for the footer: a result, a question or an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub text: String,
    pub error: bool,
}

#[derive(Debug, Clone)]
pub struct Ui {
    pub sort: SortKey,
    pub filter: String,
    pub mode: Mode,
    pub view: View,
    pub selected: Option<String>,
    pub message: Option<Message>,
    /// The last ping: peer key and what came back (`None` while waiting).
    pub ping: Option<(String, Option<String>)>,
    pub no_color: bool,
    pub read_only: bool,
}

/// The dashboard.
#[derive(Debug, Clone)]
pub struct App {
    pub status: Option<Status>,
    pub tracker: Tracker,
    pub ui: Ui,
    pub conn: Conn,
    /// Where the daemon is, for the "not reachable" screen.
    pub socket: String,
    quit: bool,
}

/// The relay port offered when the prompt opens.
pub const DEFAULT_RELAY_PORT: &str = "40000";

impl App {
    pub fn new(socket: impl Into<String>, writable: bool, no_color: bool) -> App {
        App {
            status: None,
            tracker: Tracker::default(),
            ui: Ui {
                sort: SortKey::default(),
                filter: String::new(),
                mode: Mode::Normal,
                view: View::Peers,
                selected: None,
                message: None,
                ping: None,
                no_color,
                read_only: !writable,
            },
            conn: Conn::Connecting,
            socket: socket.into(),
            quit: false,
        }
    }

    pub fn should_quit(&self) -> bool {
        self.quit
    }

    /// Take in what the stream delivered at `now` (Unix seconds).
    pub fn feed(&mut self, feed: Feed, now: f64) {
        match feed {
            Feed::Connected => {
                if !matches!(self.conn, Conn::Broken(_)) {
                    self.conn = Conn::Connecting;
                }
            }
            Feed::Snapshot(status) => {
                self.tracker.observe(&status, now);
                self.status = Some(*status);
                self.conn = Conn::Live;
            }
            Feed::Malformed(err) => {
                self.conn = Conn::Broken(format!("bad data from the daemon: {err}; reconnecting"))
            }
            Feed::Closed(err) => {
                self.conn = Conn::Broken(format!("stream ended: {err}; reconnecting"))
            }
            Feed::Unreachable(error) => {
                let attempts = match &self.conn {
                    Conn::Down { attempts, .. } => attempts + 1,
                    _ => 1,
                };
                self.conn = Conn::Down { error, attempts };
            }
        }
    }

    /// The peer keys in table order, as the screen shows them.
    fn visible_keys(&self) -> Vec<String> {
        let Some(status) = &self.status else {
            return Vec::new();
        };
        crate::model::order(status, &self.tracker, self.ui.sort, &self.ui.filter)
            .into_iter()
            .map(|i| status.peers[i].node_key.clone())
            .collect()
    }

    /// The selected peer's key: the remembered one while visible, else the first row.
    pub fn selected_key(&self) -> Option<String> {
        let keys = self.visible_keys();
        match &self.ui.selected {
            Some(k) if keys.contains(k) => Some(k.clone()),
            _ => keys.first().cloned(),
        }
    }

    fn move_selection(&mut self, to: impl Fn(usize, usize) -> usize) {
        let keys = self.visible_keys();
        if keys.is_empty() {
            return;
        }
        let current = self
            .selected_key()
            .and_then(|k| keys.iter().position(|x| *x == k))
            .unwrap_or(0);
        self.ui.selected = Some(keys[to(current, keys.len()).min(keys.len() - 1)].clone());
    }

    /// Handle one key; returns what the CLI must do, if anything.
    pub fn key(&mut self, ev: KeyEvent) -> Option<Effect> {
        // Ctrl-C quits from anywhere, prompts included.
        if ev.modifiers.contains(KeyModifiers::CONTROL) && ev.code == KeyCode::Char('c') {
            self.quit = true;
            return Some(Effect::Quit);
        }
        match self.ui.mode.clone() {
            Mode::Normal => self.normal_key(&ev),
            Mode::Help => {
                self.ui.mode = Mode::Normal;
                None
            }
            Mode::Filter => {
                self.filter_key(&ev);
                None
            }
            Mode::RelayPort(text) => {
                self.port_key(&ev, text);
                None
            }
            Mode::ConfirmRelay(port) => self.confirm_key(&ev, port),
        }
    }

    fn normal_key(&mut self, ev: &KeyEvent) -> Option<Effect> {
        match keys::action_for(ev)? {
            Action::Up => self.move_selection(|i, _| i.saturating_sub(1)),
            Action::Down => self.move_selection(|i, _| i + 1),
            Action::First => self.move_selection(|_, _| 0),
            Action::Last => self.move_selection(|_, n| n - 1),
            Action::Details => {
                if self.selected_key().is_some() {
                    self.ui.view = View::Detail;
                }
            }
            Action::Back => {
                if self.ui.view == View::Peers {
                    self.quit = true;
                    return Some(Effect::Quit);
                }
                self.ui.view = View::Peers;
            }
            Action::Sort => self.ui.sort = self.ui.sort.next(),
            Action::Filter => self.ui.mode = Mode::Filter,
            Action::Ping => return self.ping(),
            Action::RelayToggle => self.relay_toggle(),
            Action::SwitchView => {
                self.ui.view = match self.ui.view {
                    View::Relay => View::Peers,
                    _ => View::Relay,
                }
            }
            Action::Help => self.ui.mode = Mode::Help,
            Action::Quit => {
                self.quit = true;
                return Some(Effect::Quit);
            }
        }
        None
    }

    fn refuse_read_only(&mut self, what: &str) -> bool {
        if self.ui.read_only {
            self.ui.message = Some(Message {
                text: format!(
                    "read-only: cannot {what} (the LocalAPI socket is not writable by you)"
                ),
                error: true,
            });
        }
        self.ui.read_only
    }

    fn ping(&mut self) -> Option<Effect> {
        if self.refuse_read_only("ping") {
            return None;
        }
        let key = self.selected_key()?;
        let peer = self
            .status
            .as_ref()?
            .peers
            .iter()
            .find(|p| p.node_key == key)?;
        let target = match peer.tailnet_ips.first() {
            Some(ip) => ip.clone(),
            None => peer.name.clone(),
        };
        self.ui.ping = Some((key.clone(), None));
        Some(Effect::Ping { key, target })
    }

    /// The answer to the ping started for `key`.
    pub fn ping_done(&mut self, key: &str, answer: Result<PingAnswer, String>) {
        let text = match answer {
            Ok(a) => a.describe(),
            Err(e) => format!("ping failed: {e}"),
        };
        self.ui.ping = Some((key.to_string(), Some(text)));
    }

    fn relay_toggle(&mut self) {
        if self.refuse_read_only("change the relay server") {
            return;
        }
        // The pref is on while a server runs or while one is asked for but kept off.
        let on = self
            .status
            .as_ref()
            .is_some_and(|s| s.relay_server.is_some() || s.relay_server_off.is_some());
        self.ui.mode = if on {
            Mode::ConfirmRelay(None)
        } else {
            Mode::RelayPort(DEFAULT_RELAY_PORT.into())
        };
    }

    fn port_key(&mut self, ev: &KeyEvent, mut text: String) {
        match ev.code {
            KeyCode::Esc => self.ui.mode = Mode::Normal,
            KeyCode::Backspace => {
                text.pop();
                self.ui.mode = Mode::RelayPort(text);
            }
            KeyCode::Char(c) if c.is_ascii_digit() && text.len() < 5 => {
                text.push(c);
                self.ui.mode = Mode::RelayPort(text);
            }
            KeyCode::Enter => match text.parse::<u16>() {
                Ok(port) => self.ui.mode = Mode::ConfirmRelay(Some(port)),
                Err(_) => {
                    self.ui.message = Some(Message {
                        text: format!("{text:?} is not a port (0–65535; 0 lets the kernel pick)"),
                        error: true,
                    });
                }
            },
            _ => {}
        }
    }

    fn confirm_key(&mut self, ev: &KeyEvent, port: Option<u16>) -> Option<Effect> {
        self.ui.mode = Mode::Normal;
        match ev.code {
            KeyCode::Char('y') | KeyCode::Char('Y') => {
                self.ui.message = Some(Message {
                    text: match port {
                        Some(p) => format!("starting the relay server on udp/{p}…"),
                        None => "stopping the relay server…".into(),
                    },
                    error: false,
                });
                Some(Effect::SetRelayPort(port))
            }
            _ => {
                self.ui.message = Some(Message {
                    text: "relay server unchanged".into(),
                    error: false,
                });
                None
            }
        }
    }

    /// The answer to [`Effect::SetRelayPort`].
    pub fn relay_done(&mut self, port: Option<u16>, result: Result<(), String>) {
        self.ui.message = Some(match (result, port) {
            (Ok(()), Some(p)) => Message {
                text: format!("relay server on (udp/{p})"),
                error: false,
            },
            (Ok(()), None) => Message {
                text: "relay server off".into(),
                error: false,
            },
            (Err(e), _) => Message {
                text: format!("relay server: {e}"),
                error: true,
            },
        });
    }

    fn filter_key(&mut self, ev: &KeyEvent) {
        match ev.code {
            KeyCode::Esc => {
                self.ui.filter.clear();
                self.ui.mode = Mode::Normal;
            }
            KeyCode::Enter => self.ui.mode = Mode::Normal,
            KeyCode::Backspace => {
                self.ui.filter.pop();
            }
            KeyCode::Char(c) if self.ui.filter.len() < 64 => self.ui.filter.push(c),
            _ => {}
        }
    }

    /// What to draw at `now`, for a screen `width` columns wide.
    pub fn view(&self, now: f64, width: u16) -> Option<ViewModel> {
        let status = self.status.as_ref()?;
        let selected = self.selected_key();
        let input = ViewInput {
            sort: self.ui.sort,
            filter: &self.ui.filter,
            selected: selected.as_deref(),
            read_only: self.ui.read_only,
            strip_width: if width >= 120 { 60 } else { 30 },
        };
        Some(ViewModel::build(status, &self.tracker, input, now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::{Peer, RelayServer};

    fn key(c: char) -> KeyEvent {
        KeyEvent::new(KeyCode::Char(c), KeyModifiers::NONE)
    }

    fn code(c: KeyCode) -> KeyEvent {
        KeyEvent::new(c, KeyModifiers::NONE)
    }

    fn app_with(names: &[&str]) -> App {
        let mut app = App::new("/run/tern/tern.sock", true, true);
        let peers = names
            .iter()
            .map(|n| Peer {
                name: format!("{n}.t"),
                node_key: format!("nodekey:{n}"),
                tailnet_ips: vec![format!("100.64.0.{}", n.len())],
                ..Default::default()
            })
            .collect();
        app.feed(
            Feed::Snapshot(Box::new(Status {
                peers,
                ..Default::default()
            })),
            1.0,
        );
        app
    }

    #[test]
    fn arrows_move_and_stop_at_the_ends() {
        let mut app = app_with(&["a", "b", "c"]);
        assert_eq!(app.selected_key().as_deref(), Some("nodekey:a"));
        app.key(code(KeyCode::Up));
        assert_eq!(app.selected_key().as_deref(), Some("nodekey:a"));
        app.key(key('j'));
        app.key(key('j'));
        app.key(key('j'));
        assert_eq!(app.selected_key().as_deref(), Some("nodekey:c"));
        app.key(key('g'));
        assert_eq!(app.selected_key().as_deref(), Some("nodekey:a"));
    }

    #[test]
    fn filter_typing_narrows_and_esc_clears() {
        let mut app = app_with(&["alpha", "beta"]);
        app.key(key('/'));
        for c in "bet".chars() {
            app.key(key(c));
        }
        // Typing into the filter does not trigger bindings (`b`, `e`, `t` are text here).
        assert_eq!(app.ui.filter, "bet");
        assert_eq!(app.selected_key().as_deref(), Some("nodekey:beta"));
        app.key(code(KeyCode::Esc));
        assert_eq!(app.ui.filter, "");
        assert_eq!(app.ui.mode, Mode::Normal);
    }

    #[test]
    fn relay_on_asks_port_then_confirmation() {
        let mut app = app_with(&["a"]);
        app.key(key('r'));
        assert_eq!(app.ui.mode, Mode::RelayPort(DEFAULT_RELAY_PORT.into()));
        for _ in 0..5 {
            app.key(code(KeyCode::Backspace));
        }
        for c in "41000".chars() {
            app.key(key(c));
        }
        assert_eq!(app.key(code(KeyCode::Enter)), None);
        assert_eq!(app.ui.mode, Mode::ConfirmRelay(Some(41000)));
        assert_eq!(app.key(key('y')), Some(Effect::SetRelayPort(Some(41000))));
        app.relay_done(Some(41000), Err("udp/41000 is in use".into()));
        let msg = app.ui.message.clone().unwrap();
        assert!(msg.error && msg.text.contains("in use"), "{msg:?}");
    }

    #[test]
    fn a_relay_server_kept_off_is_withdrawn_not_asked_for_again() {
        let mut app = app_with(&["a"]);
        if let Some(s) = app.status.as_mut() {
            s.relay_server_off = Some("control set disable-relay-server".into());
        }
        app.key(key('r'));
        assert_eq!(app.ui.mode, Mode::ConfirmRelay(None));
        assert_eq!(app.key(key('y')), Some(Effect::SetRelayPort(None)));
    }

    #[test]
    fn relay_off_only_confirms_and_n_cancels() {
        let mut app = app_with(&["a"]);
        if let Some(s) = app.status.as_mut() {
            s.relay_server = Some(RelayServer::default());
        }
        app.key(key('r'));
        assert_eq!(app.ui.mode, Mode::ConfirmRelay(None));
        assert_eq!(app.key(key('n')), None);
        app.key(key('r'));
        assert_eq!(app.key(key('y')), Some(Effect::SetRelayPort(None)));
    }

    #[test]
    fn read_only_refuses_changes_with_a_reason() {
        let mut app = app_with(&["a"]);
        app.ui.read_only = true;
        assert_eq!(app.key(key('p')), None);
        assert_eq!(app.key(key('r')), None);
        assert_eq!(app.ui.mode, Mode::Normal);
        assert!(app
            .ui
            .message
            .as_ref()
            .unwrap()
            .text
            .starts_with("read-only"));
    }

    #[test]
    fn ping_targets_the_selected_peer_and_shows_the_answer() {
        let mut app = app_with(&["a", "bb"]);
        app.key(key('j'));
        assert_eq!(
            app.key(key('p')),
            Some(Effect::Ping {
                key: "nodekey:bb".into(),
                target: "100.64.0.2".into()
            })
        );
        app.ping_done(
            "nodekey:bb",
            Ok(PingAnswer {
                path: Some("direct".into()),
                endpoint: Some("198.18.2.2:41641".into()),
                latency_ms: Some(0.7),
                ..Default::default()
            }),
        );
        assert_eq!(
            app.ui.ping,
            Some((
                "nodekey:bb".into(),
                Some("pong via direct 198.18.2.2:41641 in 0.7ms".into())
            ))
        );
    }

    #[test]
    fn esc_backs_out_of_details_then_quits() {
        let mut app = app_with(&["a"]);
        app.key(code(KeyCode::Enter));
        assert_eq!(app.ui.view, View::Detail);
        assert_eq!(app.key(code(KeyCode::Esc)), None);
        assert_eq!(app.ui.view, View::Peers);
        assert_eq!(app.key(code(KeyCode::Esc)), Some(Effect::Quit));
        assert!(app.should_quit());
    }

    #[test]
    fn broken_stream_keeps_data_and_unreachable_counts_attempts() {
        let mut app = app_with(&["a"]);
        app.feed(Feed::Malformed("expected value at line 1".into()), 2.0);
        assert!(matches!(&app.conn, Conn::Broken(e) if e.contains("bad data")));
        assert!(app.status.is_some());
        app.feed(Feed::Unreachable("refused".into()), 3.0);
        app.feed(Feed::Unreachable("refused".into()), 4.0);
        assert_eq!(
            app.conn,
            Conn::Down {
                error: "refused".into(),
                attempts: 2
            }
        );
    }
}
