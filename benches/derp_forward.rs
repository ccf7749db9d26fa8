//! DERP forwarding rate: `tern derp --http` as a separate process on loopback, two tern DERP
//! clients in this process (one sends, one receives). Prints packets/s, Mbit/s and the server's
//! CPU time per packet (from /proc/<pid>/stat), plus the server's own drop counters.
//!
//! Run: `cargo bench --bench derp_forward` (env DERP_BENCH_PACKETS, DERP_BENCH_SIZE to vary).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tern::derp::client::{ClientConfig, DerpClient, Event, Transport};
use tern::keys::NodePrivate;
use tokio::sync::Notify;

struct ServerProcess(Child);

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn start_server() -> (ServerProcess, SocketAddr) {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args([
            "derp",
            "--http",
            "--stun-port",
            "0",
            "--addr",
            &addr.to_string(),
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn tern derp");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("server banner");
    assert!(line.contains("serving http"), "unexpected banner: {line}");
    (ServerProcess(child), addr)
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read stat");
    let after_comm = stat.rsplit(')').next().unwrap_or("");
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    // Fields 14 and 15 of stat (1-based) are utime and stime; after the comm they are 12 and 13.
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks / hz
}

fn metric(addr: SocketAddr, name: &str) -> u64 {
    let mut s = TcpStream::connect(addr).expect("metrics connect");
    s.write_all(b"GET /debug/metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text.lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{name} "))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `window`: most packets in flight (sent, not yet received); `None` = flood (drops expected).
async fn run(addr: SocketAddr, pid: u32, packets: usize, size: usize, window: Option<usize>) {
    let config = |key: NodePrivate| ClientConfig {
        addr,
        host: "bench".into(),
        transport: Transport::Plain,
        private_key: key,
        preferred: true,
    };
    let sender = DerpClient::connect(&config(NodePrivate::generate()))
        .await
        .expect("sender");
    let rx_key = NodePrivate::generate();
    let dst = rx_key.public();
    let mut receiver = DerpClient::connect(&config(rx_key))
        .await
        .expect("receiver");
    let payload = Bytes::from(vec![0x42u8; size]);

    let received = Arc::new(AtomicUsize::new(0));
    let progress = Arc::new(Notify::new());
    let (received2, progress2) = (received.clone(), progress.clone());
    let dropped_before = metric(addr, "tern_derp_packets_dropped_queue_full_total");
    let cpu_before = cpu_seconds(pid);
    let start = Instant::now();
    let recv_task = tokio::spawn(async move {
        let (received, progress) = (received2, progress2);
        let mut got = 0usize;
        let mut last = Instant::now();
        // Stop when everything arrived or the stream goes quiet (drops).
        while got < packets {
            match tokio::time::timeout(Duration::from_secs(1), receiver.recv()).await {
                Ok(Ok(Event::Packet { .. })) => {
                    got += 1;
                    last = Instant::now();
                    received.store(got, Ordering::Release);
                    progress.notify_one();
                }
                Ok(Ok(_)) => {}
                Ok(Err(_)) | Err(_) => break,
            }
        }
        (got, last)
    });
    for sent in 0..packets {
        if let Some(window) = window {
            while sent - received.load(Ordering::Acquire) >= window {
                progress.notified().await;
            }
        }
        sender.send(dst, payload.clone()).await.expect("send");
    }
    let (got, end) = recv_task.await.expect("receiver task");
    let elapsed = end.duration_since(start).as_secs_f64();
    let cpu = cpu_seconds(pid) - cpu_before;
    let forwarded = metric(addr, "tern_derp_packets_forwarded_total");
    let mode = match window {
        Some(w) => format!("window={w}"),
        None => "flood".to_string(),
    };
    let dropped = metric(addr, "tern_derp_packets_dropped_queue_full_total") - dropped_before;
    println!(
        "derp_forward {mode} size={size}B sent={packets} delivered={got} ({:.1}%) in {elapsed:.2}s: \
         {:.0} pkt/s, {:.0} Mbit/s; server CPU {cpu:.2}s = {:.0}% of one core, {:.2} µs/pkt; \
         server counters: forwarded(total)={forwarded} dropped_queue_full={dropped}",
        100.0 * got as f64 / packets as f64,
        got as f64 / elapsed,
        got as f64 * size as f64 * 8.0 / elapsed / 1e6,
        100.0 * cpu / elapsed,
        1e6 * cpu / got.max(1) as f64,
    );
}

fn main() {
    // `cargo bench` passes `--bench`; ignore arguments.
    let packets = env_or("DERP_BENCH_PACKETS", 300_000);
    let sizes = [env_or("DERP_BENCH_SIZE", 1280), 64];
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    for size in sizes {
        let (server, addr) = start_server();
        for window in [Some(32), None] {
            runtime.block_on(run(addr, server.0.id(), packets, size, window));
        }
    }
}
