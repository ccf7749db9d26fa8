//! `tern top`'s own cost per update with 500 peers: parsing one watch line, folding it into the
//! tracker, building the view and rendering 160×48. At 1 Hz, CPU share = (update + one more
//! redraw for the 1 s tick) per second. `cargo bench -p tern-tui`.

#[path = "../tests/fixtures/mod.rs"]
mod fixtures;

use criterion::{criterion_group, criterion_main, Criterion};
use tern_tui::ratatui::{backend::TestBackend, Terminal};
use tern_tui::{feed::parse_line, render, Feed};

fn bench(c: &mut Criterion) {
    let status = fixtures::many(500);
    let line = serde_json::to_string(&status).unwrap();
    eprintln!("500-peer snapshot line: {} bytes", line.len());
    c.bench_function("parse_line_500_peers", |b| {
        b.iter(|| parse_line(std::hint::black_box(&line)).unwrap())
    });
    let mut app = fixtures::app_with(status.clone());
    let mut terminal = Terminal::new(TestBackend::new(160, 48)).unwrap();
    c.bench_function("render_160x48_500_peers", |b| {
        b.iter(|| {
            terminal
                .draw(|f| render(f, &app, fixtures::NOW))
                .map(|_| ())
                .unwrap()
        })
    });
    let mut t = fixtures::NOW;
    c.bench_function("update_500_peers_parse_feed_render", |b| {
        b.iter(|| {
            t += 1.0;
            let s = parse_line(&line).unwrap();
            app.feed(Feed::Snapshot(Box::new(s)), t);
            terminal.draw(|f| render(f, &app, t)).map(|_| ()).unwrap();
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
