//! Rendering on fixed snapshots, compared with reviewed golden frames in tests/golden/.
//! `TERN_TOP_GOLDEN=update cargo test -p tern-tui --test golden` rewrites them (review the diff).

mod fixtures;

use std::path::PathBuf;

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use fixtures::*;
use tern_tui::snapshot::Status;
use tern_tui::{frame_text, App, Feed};

const SIZES: [(u16, u16); 2] = [(80, 24), (160, 48)];

fn golden_path(name: &str, w: u16, h: u16) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(format!("{name}_{w}x{h}.txt"))
}

/// Compare (or with `TERN_TOP_GOLDEN=update`, write) one frame.
fn check(name: &str, app: &App, w: u16, h: u16) {
    let got = frame_text(app, NOW, w, h);
    assert_eq!(
        got.lines().count(),
        usize::from(h),
        "{name}: one line per row"
    );
    for line in got.lines() {
        assert!(
            line.chars().count() <= usize::from(w),
            "{name}: line too wide: {line}"
        );
    }
    let path = golden_path(name, w, h);
    if std::env::var("TERN_TOP_GOLDEN").as_deref() == Ok("update") {
        std::fs::write(&path, &got).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run with TERN_TOP_GOLDEN=update to create it)",
            path.display()
        )
    });
    assert!(
        got == want,
        "{name} {w}x{h} differs from {}\n--- got ---\n{got}--- want ---\n{want}",
        path.display()
    );
}

fn check_sizes(name: &str, app: &App) {
    for (w, h) in SIZES {
        check(name, app, w, h);
    }
}

fn key(app: &mut App, code: KeyCode) {
    app.key(KeyEvent::new(code, KeyModifiers::NONE));
}

fn one_peer(p: tern_tui::snapshot::Peer) -> Status {
    let mut s = base();
    s.peers = vec![counted(p)];
    s
}

#[test]
fn direct_peer() {
    let app = app_with(one_peer(direct(peer("c2", 0), 0.6)));
    check_sizes("direct", &app);
    let got = frame_text(&app, NOW, 80, 24);
    assert!(got.contains("DIRECT"), "{got}");
    assert!(
        got.contains("Direct to 198.18.2.2:41641 since 12:06:42 (0.6 ms)."),
        "{got}"
    );
    assert!(got.contains("12.4M/s"), "{got}");
}

#[test]
fn first_snapshot_shows_dashes_for_rates() {
    let mut app = App::new("/run/tern/tern.sock", true, true);
    app.feed(
        Feed::Snapshot(Box::new(one_peer(direct(peer("c2", 0), 0.6)))),
        NOW,
    );
    let got = frame_text(&app, NOW, 80, 24);
    let row = got.lines().find(|l| l.contains("DIRECT")).unwrap();
    assert_eq!(row.matches("–").count(), 2, "{row}");
    check("first_snapshot", &app, 80, 24);
}

#[test]
fn peer_relay_and_the_relay_server() {
    let mut s = mixed();
    s.relay_server = Some(relay_server());
    let mut app = app_with(s);
    key(&mut app, KeyCode::Down);
    check_sizes("peer_relay", &app);
    let wide = frame_text(&app, NOW, 160, 48);
    assert!(wide.contains("RELAY"), "{wide}");
    assert!(wide.contains("nas ↔ phone"), "{wide}");
    assert!(wide.contains("20 pkt/s"), "{wide}");
    key(&mut app, KeyCode::Tab);
    check("relay_view", &app, 80, 24);
}

#[test]
fn derp_with_each_reason() {
    for reason in [
        "idle",
        "discovering",
        "no-endpoints",
        "udp-blocked",
        "both-hard-nat",
        "local-hard-nat",
        "peer-hard-nat",
        "peer-udp-blocked",
        "no-pong-from-candidates",
        "direct-lost",
        "no-derp-region",
        "no-disco-key",
    ] {
        let mut p = derp(peer("c2", 0), reason);
        if reason == "no-derp-region" {
            p.path = Some("none".into());
            p.derp_region = None;
        }
        let mut s = one_peer(p);
        if reason.contains("hard-nat") {
            if let Some(n) = s.netcheck.as_mut() {
                n.mapping_varies_by_dest_ip = Some(reason != "peer-hard-nat");
            }
        }
        if reason == "udp-blocked" {
            if let Some(n) = s.netcheck.as_mut() {
                n.udp = false;
            }
        }
        let app = app_with(s);
        check_sizes(&format!("derp_{reason}"), &app);
    }
}

#[test]
fn detail_view_of_a_derp_peer() {
    let mut app = app_with(mixed());
    key(&mut app, KeyCode::End);
    key(&mut app, KeyCode::Enter);
    app.ping_done(
        "nodekey:phone",
        Ok(tern_tui::PingAnswer {
            path: Some("derp".into()),
            derp_region: Some(900),
            latency_ms: Some(41.3),
            ..Default::default()
        }),
    );
    check_sizes("detail_derp", &app);
    let got = frame_text(&app, NOW, 80, 24);
    assert!(
        got.contains("On DERP (lab, 0.8 ms): both this node and phone"),
        "{got}"
    );
    assert!(got.contains("ping: pong via DERP(900) in 41ms"), "{got}");
}

#[test]
fn detail_view_lists_the_candidates() {
    let mut app = app_with(one_peer(with_candidates(direct(peer("c2", 7), 0.6))));
    key(&mut app, KeyCode::Enter);
    check_sizes("detail_candidates", &app);
    let small = frame_text(&app, NOW, 80, 24);
    // All three rows fit 80×24, with their columns.
    for row in [
        "candidate endpoints  source              pinged  ponged     rtt",
        "  10.2.0.9:41641     netmap                  3s       –       –",
        "  198.18.2.9:41641   netmap+ping             3s      1s   0.6ms  in use",
        "  198.18.2.9:7878    call-me-maybe+ping      3s      2m   1.3ms",
    ] {
        assert!(small.contains(row), "{row}\n{small}");
    }
}

#[test]
fn daemon_down() {
    let mut app = App::new("/run/tern/tern.sock", true, true);
    app.feed(
        Feed::Unreachable("connect: No such file or directory (os error 2)".into()),
        NOW,
    );
    check_sizes("daemon_down", &app);
    // Data that was there stays hidden behind the down screen until the daemon is back.
    let mut app = app_with(mixed());
    app.feed(Feed::Unreachable("connection refused".into()), NOW);
    assert!(frame_text(&app, NOW, 80, 24).contains("tern daemon not reachable"));
}

#[test]
fn broken_stream_shows_an_error_line_over_the_last_data() {
    let mut app = app_with(mixed());
    app.feed(
        Feed::Malformed("EOF while parsing an object at line 1 column 9".into()),
        NOW,
    );
    let got = frame_text(&app, NOW, 80, 24);
    let last = got.lines().last().unwrap();
    assert!(
        last.starts_with(" ! bad data from the daemon: EOF while parsing"),
        "{last}"
    );
    assert!(got.contains("c2"), "{got}");
    check("broken_stream", &app, 80, 24);
}

#[test]
fn zero_and_three_hundred_peers() {
    check_sizes("peers_0", &app_with(base()));
    let mut app = app_with(many(300));
    check_sizes("peers_300", &app);
    // Filtering narrows the table and says how many of how many.
    key(&mut app, KeyCode::Char('/'));
    for c in "node29".chars() {
        key(&mut app, KeyCode::Char(c));
    }
    key(&mut app, KeyCode::Enter);
    let got = frame_text(&app, NOW, 80, 24);
    assert!(got.contains(" peers 10 of 300 "), "{got}");
    assert!(got.contains("filter: node29"), "{got}");
}

#[test]
fn help_overlay_lists_the_key_table() {
    let mut app = app_with(mixed());
    key(&mut app, KeyCode::Char('?'));
    check_sizes("help", &app);
    let got = frame_text(&app, NOW, 80, 24);
    for b in tern_tui::keys::KEYS {
        assert!(got.contains(b.help), "help lacks {:?}:\n{got}", b.help);
    }
}

#[test]
fn relay_prompt_and_confirmation_in_the_footer() {
    let mut app = app_with(mixed());
    key(&mut app, KeyCode::Char('r'));
    let got = frame_text(&app, NOW, 80, 24);
    assert!(got.contains("relay server UDP port: 40000"), "{got}");
    key(&mut app, KeyCode::Enter);
    let got = frame_text(&app, NOW, 80, 24);
    assert!(
        got.contains("start the relay server on udp/40000? (y/n)"),
        "{got}"
    );
}

fn colored_cells(app: &App) -> usize {
    use tern_tui::ratatui::{backend::TestBackend, style::Color, Terminal};
    let mut t = Terminal::new(TestBackend::new(80, 24)).unwrap();
    t.draw(|f| tern_tui::render(f, app, NOW)).unwrap();
    t.backend()
        .buffer()
        .content()
        .iter()
        .filter(|c| c.fg != Color::Reset)
        .count()
}

#[test]
fn no_color_means_no_colour_and_colour_repeats_the_badge() {
    let no_color = app_with(mixed());
    assert_eq!(colored_cells(&no_color), 0);
    let mut color = no_color.clone();
    color.ui.no_color = false;
    assert!(colored_cells(&color) > 0);
    // Same text either way.
    assert_eq!(
        frame_text(&no_color, NOW, 80, 24),
        frame_text(&color, NOW, 80, 24)
    );
}
