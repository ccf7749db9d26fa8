//! Pure drawing: [`render`] paints an [`App`] into a ratatui frame at time `now`; nothing here
//! reads the terminal or the socket. [`frame_text`] renders into a buffer and returns the
//! characters, for `tern top --once` and the golden tests.

use ratatui::backend::TestBackend;
use ratatui::layout::{Alignment, Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Cell, Clear, Paragraph, Row, Table, TableState, Wrap};
use ratatui::{Frame, Terminal};

use crate::app::{App, Conn, Mode, View};
use crate::keys::{self, Action, KEYS};
use crate::model::{CandidateRow, Detail, PeerRow, Piece, RelayPanel, Tone, ViewModel};

/// Inner width from which the peers table shows the sparkline and handshake columns.
const WIDE_TABLE: u16 = 100;
/// Screen width from which the relay panel gets its own column (when the relay runs).
const RELAY_COLUMN: u16 = 140;

/// Colours, or none at all (NO_COLOR): text always carries the meaning.
#[derive(Debug, Clone, Copy)]
pub struct Theme {
    pub color: bool,
}

impl Theme {
    pub fn style(self, tone: Tone) -> Style {
        let base = Style::default();
        let fg = |c: Color| if self.color { base.fg(c) } else { base };
        match tone {
            Tone::Normal => base,
            Tone::Dim => fg(Color::DarkGray),
            Tone::Good => fg(Color::Green),
            Tone::Info => fg(Color::Cyan),
            Tone::Warn => fg(Color::Yellow),
            Tone::Bad => fg(Color::Red).add_modifier(Modifier::BOLD),
            Tone::Strong => base.add_modifier(Modifier::BOLD),
        }
    }

    fn line(self, pieces: &[Piece]) -> Line<'static> {
        Line::from(
            pieces
                .iter()
                .map(|(text, tone)| Span::styled(text.clone(), self.style(*tone)))
                .collect::<Vec<_>>(),
        )
    }
}

/// Draw the whole screen.
pub fn render(frame: &mut Frame, app: &App, now: f64) {
    let theme = Theme {
        color: !app.ui.no_color,
    };
    let area = frame.area();
    let vm = match (&app.conn, app.view(now, area.width)) {
        (Conn::Down { .. }, _) | (_, None) => return render_unreachable(frame, area, app, theme),
        (_, Some(vm)) => vm,
    };
    let [head, main, foot] = Layout::vertical([
        Constraint::Length(2),
        Constraint::Min(4),
        Constraint::Length(1),
    ])
    .areas(area);
    render_header(frame, head, &vm, theme);
    render_main(frame, main, app, &vm, theme);
    render_footer(frame, foot, app, theme);
    if app.ui.mode == Mode::Help {
        render_help(frame, area, theme);
    }
}

fn render_header(frame: &mut Frame, area: Rect, vm: &ViewModel, theme: Theme) {
    let lines: Vec<Line> = vm.header.iter().map(|l| theme.line(l)).collect();
    frame.render_widget(Paragraph::new(lines), area);
}

fn render_main(frame: &mut Frame, area: Rect, app: &App, vm: &ViewModel, theme: Theme) {
    let side_relay = area.width >= RELAY_COLUMN && vm.relay.on && app.ui.view != View::Relay;
    let area = if side_relay {
        let [left, right] =
            Layout::horizontal([Constraint::Min(80), Constraint::Length(58)]).areas(area);
        render_relay(frame, right, &vm.relay, theme);
        left
    } else {
        area
    };
    match app.ui.view {
        View::Relay => render_relay(frame, area, &vm.relay, theme),
        View::Detail => match &vm.detail {
            Some(d) => render_detail_full(frame, area, app, d, theme),
            None => render_peers(frame, area, app, vm, theme),
        },
        View::Peers => {
            let detail_height = if area.height >= 30 {
                area.height * 2 / 5
            } else {
                8
            };
            let [table, detail] =
                Layout::vertical([Constraint::Min(4), Constraint::Length(detail_height)])
                    .areas(area);
            render_peers(frame, table, app, vm, theme);
            if let Some(d) = &vm.detail {
                render_detail_pane(frame, detail, app, d, theme);
            } else {
                let block = Block::bordered().title(" no peer selected ");
                frame.render_widget(block, detail);
            }
        }
    }
}

fn badge_cell(row: &PeerRow, theme: Theme) -> Cell<'static> {
    let style = theme
        .style(Tone::of_path(row.kind))
        .add_modifier(Modifier::BOLD);
    Cell::from(Span::styled(row.kind.badge(), style))
}

fn render_peers(frame: &mut Frame, area: Rect, app: &App, vm: &ViewModel, theme: Theme) {
    let filter = if app.ui.filter.is_empty() {
        "–".to_string()
    } else {
        app.ui.filter.clone()
    };
    let title = if vm.rows.len() == vm.total_peers {
        format!(" peers {} ", vm.total_peers)
    } else {
        format!(" peers {} of {} ", vm.rows.len(), vm.total_peers)
    };
    let block = Block::bordered()
        .title(Line::from(title).style(theme.style(Tone::Strong)))
        .title(
            Line::from(format!(
                " sort: {} ▾  filter: {filter} ",
                app.ui.sort.label()
            ))
            .right_aligned(),
        );
    let wide = area.width.saturating_sub(2) >= WIDE_TABLE;
    let header: Vec<&str> = if wide {
        vec![
            "", "PATH", "NAME", "ADDRESS", "VIA", "RTT", "", "↓RX", "↑TX", "HS",
        ]
    } else {
        vec!["", "PATH", "NAME", "ADDRESS", "VIA", "RTT", "↓RX", "↑TX"]
    };
    let widths: Vec<Constraint> = if wide {
        [1, 6, 14, 15, 21, 6, 8, 8, 8, 4]
            .into_iter()
            .map(Constraint::Length)
            .collect()
    } else {
        [1, 6, 10, 14, 19, 6, 7, 7]
            .into_iter()
            .map(Constraint::Length)
            .collect()
    };
    let rows = vm.rows.iter().map(|r| {
        let mut cells = vec![
            Cell::from(r.online),
            badge_cell(r, theme),
            Cell::from(r.name.clone()),
            Cell::from(r.ip.clone()),
            Cell::from(r.via.clone()),
            Cell::from(Line::from(r.rtt.clone()).right_aligned()),
        ];
        if wide {
            cells.push(Cell::from(r.spark.clone()).style(theme.style(Tone::Dim)));
        }
        cells.push(Cell::from(Line::from(r.rx.clone()).right_aligned()));
        cells.push(Cell::from(Line::from(r.tx.clone()).right_aligned()));
        if wide {
            cells.push(Cell::from(Line::from(r.handshake.clone()).right_aligned()));
        }
        Row::new(cells)
    });
    let empty = vm.rows.is_empty();
    let table = Table::new(rows, widths)
        .header(Row::new(header).style(theme.style(Tone::Strong)))
        .block(block)
        .row_highlight_style(Style::default().add_modifier(Modifier::REVERSED))
        .highlight_symbol("›");
    let mut state = TableState::default().with_selected(vm.selected);
    frame.render_stateful_widget(table, area, &mut state);
    if empty {
        let msg = if vm.total_peers == 0 {
            "no peers in the network map yet"
        } else {
            "no peer matches the filter (/ to change it, Esc in it to clear)"
        };
        let inner = Rect {
            x: area.x + 2,
            y: area.y + 3,
            width: area.width.saturating_sub(4),
            height: 1.min(area.height.saturating_sub(4)),
        };
        frame.render_widget(Paragraph::new(msg).style(theme.style(Tone::Dim)), inner);
    }
}

fn ping_line(app: &App, d_key: Option<&str>) -> Option<String> {
    let (key, answer) = app.ui.ping.as_ref()?;
    if Some(key.as_str()) != d_key {
        return None;
    }
    Some(match answer {
        Some(text) => format!("ping: {text}"),
        None => "ping: waiting for a pong…".into(),
    })
}

fn strip_lines(d: &Detail, theme: Theme) -> Vec<Line<'static>> {
    vec![
        Line::from(vec![
            Span::styled("path ", theme.style(Tone::Dim)),
            Span::raw(d.strip.clone()),
            Span::raw(format!("  {}", d.strip_note)),
        ]),
        Line::from(vec![
            Span::styled("rtt  ", theme.style(Tone::Dim)),
            Span::raw(format!(
                "{:<width$}",
                d.rtt_spark,
                width = d.strip.chars().count()
            )),
            Span::raw(format!("  {}", d.rtt_range)),
        ]),
    ]
}

/// The bottom pane: why, the path strip and RTT sparkline, the last ping.
fn render_detail_pane(frame: &mut Frame, area: Rect, app: &App, d: &Detail, theme: Theme) {
    let block = Block::bordered().title(format!(" {} ─ ⏎ more ", d.name));
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let mut lines = strip_lines(d, theme);
    if let Some(p) = ping_line(app, app.selected_key().as_deref()) {
        lines.push(Line::from(p).style(theme.style(Tone::Info)));
    }
    let fixed = lines.len() as u16;
    // The why sentence first; on a tall screen the facts follow it.
    let spare = inner.height.saturating_sub(fixed + 4);
    let facts: Vec<Line> = d
        .facts
        .iter()
        .take(usize::from(spare))
        .map(|(label, value)| {
            Line::from(vec![
                Span::styled(format!("{label:>10}  "), theme.style(Tone::Dim)),
                Span::raw(value.clone()),
            ])
        })
        .collect();
    let [why, mid, rest] = Layout::vertical([
        Constraint::Min(1),
        Constraint::Length(facts.len() as u16),
        Constraint::Length(fixed),
    ])
    .areas(inner);
    frame.render_widget(Paragraph::new(d.why.clone()).wrap(Wrap { trim: true }), why);
    frame.render_widget(Paragraph::new(facts), mid);
    frame.render_widget(Paragraph::new(lines), rest);
}

/// The candidate table: a title row that names the columns, then one row per candidate, the
/// one in use marked. Columns are as wide as their longest cell, so IPv4 rows fit 80 columns.
fn candidate_lines(rows: &[CandidateRow], theme: Theme) -> Vec<Line<'static>> {
    const TITLE: &str = "candidate endpoints";
    if rows.is_empty() {
        return vec![
            Line::from(TITLE).style(theme.style(Tone::Strong)),
            Line::from("  none known"),
        ];
    }
    let addr_w = rows
        .iter()
        .map(|r| r.addr.chars().count())
        .max()
        .unwrap_or(0);
    let addr_w = addr_w.max(TITLE.len() - 2);
    let src_w = rows
        .iter()
        .map(|r| r.source.chars().count())
        .max()
        .unwrap_or(0);
    let src_w = src_w.max("source".len());
    let title = format!("{TITLE:<w$}", w = addr_w + 2);
    let columns = format!(
        "  {:<src_w$}  {:>6}  {:>6}  {:>6}",
        "source", "pinged", "ponged", "rtt"
    );
    let mut lines = vec![Line::from(vec![
        Span::styled(title, theme.style(Tone::Strong)),
        Span::styled(columns, theme.style(Tone::Dim)),
    ])];
    lines.extend(rows.iter().map(|r| {
        Line::from(format!(
            "  {:<addr_w$}  {:<src_w$}  {:>6}  {:>6}  {:>6}{}",
            r.addr,
            r.source,
            r.ping,
            r.pong,
            r.rtt,
            if r.in_use { "  in use" } else { "" }
        ))
    }));
    lines
}

/// The Enter view: everything the status knows about one peer.
fn render_detail_full(frame: &mut Frame, area: Rect, app: &App, d: &Detail, theme: Theme) {
    let block = Block::bordered().title(format!(" {} ─ Esc back  p ping ", d.name));
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let mut lines = vec![
        Line::from(d.why.clone()).style(theme.style(Tone::Strong)),
        Line::raw(""),
    ];
    if let Some(p) = ping_line(app, app.selected_key().as_deref()) {
        lines.push(Line::from(p).style(theme.style(Tone::Info)));
    }
    // The candidates are the evidence for the why sentence: on a short screen the facts and
    // the strips below them are cut rather than they.
    lines.extend(candidate_lines(&d.candidates, theme));
    for (label, value) in &d.facts {
        lines.push(Line::from(vec![
            Span::styled(format!("{label:>10}  "), theme.style(Tone::Dim)),
            Span::raw(value.clone()),
        ]));
    }
    lines.extend(strip_lines(d, theme));
    lines.push(Line::from("path history (newest first)").style(theme.style(Tone::Strong)));
    if d.history.is_empty() {
        lines.push(Line::from("  no changes yet"));
    }
    for [at, path, place, reason] in &d.history {
        lines.push(Line::from(format!(
            "  {at}  {path:<10} {place:<24} {reason}"
        )));
    }
    frame.render_widget(Paragraph::new(lines).wrap(Wrap { trim: false }), inner);
}

fn render_relay(frame: &mut Frame, area: Rect, panel: &RelayPanel, theme: Theme) {
    let block = Block::bordered().title(" relay server ─ r on/off ");
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let tone = if panel.on { Tone::Info } else { Tone::Dim };
    let mut lines: Vec<Line> = panel
        .summary
        .iter()
        .map(|s| Line::from(s.clone()).style(theme.style(tone)))
        .collect();
    if panel.on {
        let spark_w = (inner.width as usize).saturating_sub(22).min(40);
        let tail = |s: &str| {
            s.chars()
                .rev()
                .take(spark_w)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<String>()
        };
        lines.push(Line::from(format!(
            "fwd {:>12}  {}",
            panel.pps,
            tail(&panel.pps_spark)
        )));
        lines.push(Line::from(format!(
            "    {:>12}  {}",
            panel.bps,
            tail(&panel.bps_spark)
        )));
        lines.push(Line::from(panel.drops.clone()).style(theme.style(Tone::Dim)));
        lines.push(
            Line::from(format!(
                "{:<22} {:<10} {:>4} {:>6} {:>7}",
                "SESSION (A ↔ B)", "STATE", "AGE", "PKTS", "BYTES"
            ))
            .style(theme.style(Tone::Strong)),
        );
        if panel.sessions.is_empty() {
            lines.push(Line::from("no sessions yet").style(theme.style(Tone::Dim)));
        }
        for [legs, state, age, pkts, bytes] in &panel.sessions {
            lines.push(Line::from(format!(
                "{:<22} {state:<10} {age:>4} {pkts:>6} {bytes:>7}",
                crate::fmt::fit(legs, 22)
            )));
        }
    }
    frame.render_widget(Paragraph::new(lines).wrap(Wrap { trim: false }), inner);
}

fn render_footer(frame: &mut Frame, area: Rect, app: &App, theme: Theme) {
    let (text, tone) = match &app.ui.mode {
        Mode::Filter => (
            format!(" filter: {}▏ (⏎ keep, Esc clear)", app.ui.filter),
            Tone::Strong,
        ),
        Mode::RelayPort(port) => (
            format!(" relay server UDP port: {port}▏ (⏎ next, Esc cancel; 0 = any free port)"),
            Tone::Strong,
        ),
        Mode::ConfirmRelay(Some(port)) => (
            format!(" start the relay server on udp/{port}? (y/n)"),
            Tone::Warn,
        ),
        Mode::ConfirmRelay(None) => (" stop the relay server? (y/n)".to_string(), Tone::Warn),
        _ => match (&app.conn, &app.ui.message) {
            (Conn::Broken(err), _) => (format!(" ! {err}"), Tone::Bad),
            (_, Some(m)) => (
                format!(" {}", m.text),
                if m.error { Tone::Bad } else { Tone::Info },
            ),
            _ => (
                format!(
                    " {}",
                    keys::hint(&[
                        Action::Down,
                        Action::Details,
                        Action::Sort,
                        Action::Filter,
                        Action::Ping,
                        Action::RelayToggle,
                        Action::Help,
                        Action::Quit,
                    ])
                ),
                Tone::Dim,
            ),
        },
    };
    frame.render_widget(Paragraph::new(text).style(theme.style(tone)), area);
}

/// The `?` overlay, generated from the key table.
fn render_help(frame: &mut Frame, area: Rect, theme: Theme) {
    let mut lines: Vec<Line> = KEYS
        .iter()
        .map(|b| {
            Line::from(vec![
                Span::styled(format!(" {:<7}", b.label), theme.style(Tone::Strong)),
                Span::raw(b.help),
            ])
        })
        .collect();
    lines.push(Line::raw(""));
    lines.push(Line::raw(
        " paths: DIRECT (UDP) · RELAY (peer relay) · DERP · none",
    ));
    lines.push(Line::raw(" strip: █ direct  ▅ relay  ▂ DERP  · none"));
    let height = (lines.len() as u16 + 2).min(area.height);
    let width = 74.min(area.width);
    let popup = Rect {
        x: area.x + (area.width - width) / 2,
        y: area.y + (area.height - height) / 2,
        width,
        height,
    };
    frame.render_widget(Clear, popup);
    frame.render_widget(
        Paragraph::new(lines).block(Block::bordered().title(" help ─ any key closes ")),
        popup,
    );
}

/// No daemon (yet): say where we look, why it failed, and that we keep trying.
fn render_unreachable(frame: &mut Frame, area: Rect, app: &App, theme: Theme) {
    let mut lines = vec![Line::raw("")];
    match &app.conn {
        Conn::Down { error, attempts } => {
            lines.push(Line::from("tern daemon not reachable").style(theme.style(Tone::Bad)));
            lines.push(Line::raw(""));
            lines.push(Line::from(format!("socket  {}", app.socket)));
            lines.push(Line::from(format!("error   {error}")));
            lines.push(Line::raw(""));
            lines.push(Line::from(format!(
                "retrying every second (attempt {attempts}); start it with `tern daemon`"
            )));
        }
        _ => {
            lines.push(Line::from(format!(
                "connecting to the tern daemon at {}…",
                app.socket
            )));
        }
    }
    lines.push(Line::raw(""));
    lines.push(Line::from("q quits").style(theme.style(Tone::Dim)));
    let block = Block::bordered().title(" tern top ");
    frame.render_widget(
        Paragraph::new(lines)
            .alignment(Alignment::Center)
            .wrap(Wrap { trim: true })
            .block(block),
        area,
    );
}

/// Render one frame of `app` at `width`×`height` and return it as text: one line per row,
/// trailing blanks trimmed.
pub fn frame_text(app: &App, now: f64, width: u16, height: u16) -> String {
    let mut terminal = match Terminal::new(TestBackend::new(width, height)) {
        Ok(t) => t,
        Err(e) => return format!("cannot render: {e}\n"),
    };
    if let Err(e) = terminal.draw(|f| render(f, app, now)) {
        return format!("cannot render: {e}\n");
    }
    buffer_text(terminal.backend().buffer())
}

/// The characters of a buffer, one line per row, trailing blanks trimmed.
pub fn buffer_text(buffer: &ratatui::buffer::Buffer) -> String {
    let area = buffer.area;
    let mut out = String::new();
    for y in 0..area.height {
        let mut line = String::new();
        for x in 0..area.width {
            line.push_str(buffer[(area.x + x, area.y + y)].symbol());
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}
