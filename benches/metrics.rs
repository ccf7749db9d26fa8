//! The cost of one scrape with 1,000 peers (issue 16): `metrics::render` of a status snapshot
//! whose peers all have a path, a latency and byte counts, plus a running relay server.
//! Run: `cargo bench --bench metrics`. Prints the time per render (median of 200) and the size
//! of the exposition.

use std::time::{Duration, Instant};

use tern::status::{DataPlaneStatus, PeerStatus, RelayServerStatus, Status};

const PEERS: usize = 1_000;

fn status() -> Status {
    let mut s = Status::initial(DataPlaneStatus::default(), std::time::SystemTime::now());
    let paths = ["direct", "derp", "peer-relay", "none"];
    s.peers = (0..PEERS)
        .map(|i| PeerStatus {
            name: format!("peer{i:04}.lab.tern.test"),
            path: Some(paths[i % 4].into()),
            latency_ms: Some(1.0 + i as f64 / 100.0),
            rx_bytes: 1_000_000 + i as u64,
            tx_bytes: 2_000_000 + i as u64,
            ..Default::default()
        })
        .collect();
    s.relay_server = Some(RelayServerStatus::default());
    s
}

fn main() {
    let s = status();
    let mut bytes = 0;
    let mut times: Vec<Duration> = (0..200)
        .map(|_| {
            let start = Instant::now();
            let text = tern::metrics::render(&s);
            let took = start.elapsed();
            bytes = text.len();
            took
        })
        .collect();
    times.sort();
    let median = times[times.len() / 2];
    let lines = tern::metrics::render(&s).lines().count();
    println!(
        "metrics render, {PEERS} peers: {:.2} ms per scrape (median of 200), {bytes} bytes, {lines} lines",
        median.as_secs_f64() * 1000.0
    );
}
