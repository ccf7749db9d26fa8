//! The daemon's cost of serving `GET /localapi/v0/watch` to 10 clients with 500 peers: one
//! process, the real LocalAPI server on a temporary socket, 10 `Client::watch` readers that
//! only split lines (no parsing), and the status changing at 1 Hz (the engine's publish rate)
//! and at 20 Hz (bursts, coalesced to 4/s per client). Reports process CPU per second of wall
//! time, with the same run without clients subtracted. `cargo bench --bench watch`.

use std::time::{Duration, Instant, SystemTime};

use tern::localapi::{bind, serve, Client, SocketOwner};
use tern::status::{DataPlaneStatus, PeerStatus, Status};
use tokio::sync::{mpsc, watch};

fn status(n: usize, tick: u64) -> Status {
    let mut s = Status::initial(DataPlaneStatus::default(), SystemTime::UNIX_EPOCH);
    s.peers = (0..n)
        .map(|i| PeerStatus {
            name: format!("node{i:03}.tailnet.example"),
            hostname: format!("node{i:03}"),
            node_key: format!("nodekey:{i:064x}"),
            tailnet_ips: vec![format!("100.64.{}.{}", i / 250, i % 250 + 2)],
            endpoints: vec![format!("198.18.2.{}:41641", i % 250)],
            path: Some("direct".into()),
            endpoint: Some(format!("198.18.2.{}:41641", i % 250)),
            path_reason: Some("direct".into()),
            latency_ms: Some(0.5),
            rx_bytes: tick * 1_000_000 + i as u64,
            tx_bytes: tick * 10_000,
            ..Default::default()
        })
        .collect();
    s
}

fn cpu_secs() -> f64 {
    // SAFETY: getrusage only writes into the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// CPU share of one core over `secs` with `clients` watchers and the status changing every
/// `period`.
async fn run(clients: usize, period: Duration, secs: u64) -> (f64, u64) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("tern.sock");
    let listener = bind(&sock, SocketOwner::default()).unwrap();
    let (tx, rx) = watch::channel(status(500, 0));
    let (cmd_tx, _cmd_rx) = mpsc::channel(1);
    let server = tokio::spawn(serve(listener, rx, cmd_tx));
    let (count_tx, mut count_rx) = mpsc::unbounded_channel();
    let mut readers = Vec::new();
    for _ in 0..clients {
        let client = Client::new(&sock);
        let count_tx = count_tx.clone();
        readers.push(tokio::spawn(async move {
            let mut w = client.watch().await.unwrap();
            while let Ok(Some(_line)) = w.next_line().await {
                let _ = count_tx.send(());
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (cpu0, t0) = (cpu_secs(), Instant::now());
    let mut tick = 1;
    while t0.elapsed() < Duration::from_secs(secs) {
        tx.send(status(500, tick)).unwrap();
        tick += 1;
        tokio::time::sleep(period).await;
    }
    let share = (cpu_secs() - cpu0) / t0.elapsed().as_secs_f64();
    let mut lines = 0;
    while count_rx.try_recv().is_ok() {
        lines += 1;
    }
    for r in readers {
        r.abort();
    }
    server.abort();
    (share, lines)
}

fn main() {
    let s = status(500, 1);
    let n = 200;
    let t = Instant::now();
    let mut bytes = 0;
    for _ in 0..n {
        bytes = serde_json::to_vec(&s).unwrap().len();
    }
    println!(
        "serialize one 500-peer snapshot: {:.2} ms ({bytes} bytes)",
        t.elapsed().as_secs_f64() * 1e3 / f64::from(n)
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    for (label, period) in [
        ("1 Hz", Duration::from_secs(1)),
        ("20 Hz", Duration::from_millis(50)),
    ] {
        let (base, _) = rt.block_on(run(0, period, 10));
        let (with, lines) = rt.block_on(run(10, period, 10));
        println!(
            "10 watchers, status changing at {label}: {:.2} % of a core ({:.2} % without clients; \
             {lines} lines delivered in 10 s)",
            with * 100.0,
            base * 100.0
        );
    }
}
