//! The key table: one list drives both dispatch and the `?` overlay, so help never drifts from
//! what the keys do.

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

/// What a key asks for (in the normal mode; text prompts read keys themselves).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Up,
    Down,
    First,
    Last,
    Details,
    /// Close the overlay/detail/view that is open, or quit when nothing is.
    Back,
    Sort,
    Filter,
    Ping,
    RelayToggle,
    SwitchView,
    Help,
    Quit,
}

/// A key as the table names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key {
    Char(char),
    Ctrl(char),
    Code(KeyCode),
}

impl Key {
    fn matches(self, ev: &KeyEvent) -> bool {
        let ctrl = ev.modifiers.contains(KeyModifiers::CONTROL);
        match self {
            Key::Char(c) => !ctrl && ev.code == KeyCode::Char(c),
            Key::Ctrl(c) => ctrl && ev.code == KeyCode::Char(c),
            Key::Code(code) => ev.code == code,
        }
    }
}

/// One row of the table: the keys, how help names them, the action and what it does.
#[derive(Debug, Clone, Copy)]
pub struct Binding {
    pub keys: &'static [Key],
    pub label: &'static str,
    pub action: Action,
    pub help: &'static str,
}

pub const KEYS: &[Binding] = &[
    Binding {
        keys: &[Key::Code(KeyCode::Up), Key::Char('k')],
        label: "↑ k",
        action: Action::Up,
        help: "select the previous peer",
    },
    Binding {
        keys: &[Key::Code(KeyCode::Down), Key::Char('j')],
        label: "↓ j",
        action: Action::Down,
        help: "select the next peer",
    },
    Binding {
        keys: &[Key::Code(KeyCode::Home), Key::Char('g')],
        label: "Home g",
        action: Action::First,
        help: "first peer",
    },
    Binding {
        keys: &[Key::Code(KeyCode::End), Key::Char('G')],
        label: "End G",
        action: Action::Last,
        help: "last peer",
    },
    Binding {
        keys: &[Key::Code(KeyCode::Enter)],
        label: "⏎",
        action: Action::Details,
        help: "details of the selected peer: why this path, candidates, history",
    },
    Binding {
        keys: &[Key::Char('s')],
        label: "s",
        action: Action::Sort,
        help: "sort by name → path → latency → traffic",
    },
    Binding {
        keys: &[Key::Char('/')],
        label: "/",
        action: Action::Filter,
        help: "filter peers by name, IP or path (⏎ keeps, Esc clears)",
    },
    Binding {
        keys: &[Key::Char('p')],
        label: "p",
        action: Action::Ping,
        help: "disco-ping the selected peer",
    },
    Binding {
        keys: &[Key::Char('r')],
        label: "r",
        action: Action::RelayToggle,
        help: "relay server on/off (asks for the port, then confirms)",
    },
    Binding {
        keys: &[Key::Code(KeyCode::Tab)],
        label: "Tab",
        action: Action::SwitchView,
        help: "switch between the peers and the relay server view",
    },
    Binding {
        keys: &[Key::Char('?')],
        label: "?",
        action: Action::Help,
        help: "this help",
    },
    Binding {
        keys: &[Key::Code(KeyCode::Esc)],
        label: "Esc",
        action: Action::Back,
        help: "close help/details, else quit",
    },
    Binding {
        keys: &[Key::Char('q'), Key::Ctrl('c')],
        label: "q ^C",
        action: Action::Quit,
        help: "quit (the daemon keeps running)",
    },
];

/// The action the table binds to this key, if any.
pub fn action_for(ev: &KeyEvent) -> Option<Action> {
    KEYS.iter()
        .find(|b| b.keys.iter().any(|k| k.matches(ev)))
        .map(|b| b.action)
}

/// The footer hint: the few keys worth a reminder, from the same table.
pub fn hint(actions: &[Action]) -> String {
    actions
        .iter()
        .filter_map(|a| KEYS.iter().find(|b| b.action == *a))
        .map(|b| format!("{} {}", b.label, short(b.action)))
        .collect::<Vec<_>>()
        .join("  ")
}

fn short(action: Action) -> &'static str {
    match action {
        Action::Up | Action::Down => "select",
        Action::First => "first",
        Action::Last => "last",
        Action::Details => "details",
        Action::Back => "back",
        Action::Sort => "sort",
        Action::Filter => "filter",
        Action::Ping => "ping",
        Action::RelayToggle => "relay",
        Action::SwitchView => "view",
        Action::Help => "help",
        Action::Quit => "quit",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(code: KeyCode) -> KeyEvent {
        KeyEvent::new(code, KeyModifiers::NONE)
    }

    #[test]
    fn table_dispatches_vim_and_arrow_keys_alike() {
        assert_eq!(action_for(&key(KeyCode::Char('j'))), Some(Action::Down));
        assert_eq!(action_for(&key(KeyCode::Down)), Some(Action::Down));
        assert_eq!(action_for(&key(KeyCode::Char('x'))), None);
        let ctrl_c = KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL);
        assert_eq!(action_for(&ctrl_c), Some(Action::Quit));
        // A plain `c` is not Ctrl-C.
        assert_eq!(action_for(&key(KeyCode::Char('c'))), None);
    }

    #[test]
    fn every_action_has_one_binding() {
        for b in KEYS {
            assert_eq!(KEYS.iter().filter(|o| o.action == b.action).count(), 1);
        }
    }
}
