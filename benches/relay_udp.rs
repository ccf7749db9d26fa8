//! The relay server's forwarding rate on real sockets: a `RelayRuntime` in a namespace of its own
//! (needs root), two bound clients, client A sends 1308-byte WireGuard-framed datagrams through
//! the relay to client B as fast as it can for a few seconds; B counts what arrives (it stops after 0.5 s of silence). Prints
//! datagrams/s and Gbit/s received, and the loss. Run: `cargo bench --bench relay_udp`.

#[path = "../tests/support/relay_client.rs"]
mod relay_client;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use relay_client::{bound_pair, geneve};
use tern::relay::geneve::PROTOCOL_WIREGUARD;
use tern::relay::io::RelayRuntime;
use tern_lab::topology::unique_prefix;
use tern_lab::Netns;
use tokio::sync::watch;

const RELAY_IP: &str = "192.0.2.1";
const PAYLOAD: usize = 1300;
const RUN: Duration = Duration::from_secs(5);

async fn measure() -> (u64, u64, Duration) {
    let (_regions_tx, regions) = watch::channel(BTreeMap::new());
    let relay = RelayRuntime::start(0, regions).expect("relay starts");
    let (a, b, relay_addr, endpoint) = bound_pair(&relay, RELAY_IP).await;
    let mut packet = geneve(endpoint.vni, PROTOCOL_WIREGUARD, false);
    packet.extend_from_slice(&[0x55; PAYLOAD]);

    let received = Arc::new(AtomicU64::new(0));
    let counter = received.clone();
    let receiver = tokio::spawn(async move {
        let mut buf = vec![0u8; 2048];
        while let Ok(Ok(_)) =
            tokio::time::timeout(Duration::from_millis(500), b.socket.recv_from(&mut buf)).await
        {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    });
    let started = Instant::now();
    let mut sent = 0u64;
    while started.elapsed() < RUN {
        for _ in 0..64 {
            if a.socket.send_to(&packet, relay_addr).await.is_ok() {
                sent += 1;
            }
        }
        tokio::task::yield_now().await;
    }
    let elapsed = started.elapsed();
    let _ = receiver.await;
    (sent, received.load(Ordering::Relaxed), elapsed)
}

fn main() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this bench makes a network namespace: run it as root"
    );
    let ns = Netns::create(&format!("{}-relaybench", unique_prefix())).expect("namespace");
    ns.ip_batch(&format!(
        "link add r0 type veth peer name r1\naddr add {RELAY_IP}/24 dev r0\nlink set r0 up\nlink set r1 up\n"
    ))
    .expect("veth with the relay's address");
    let (sent, received, elapsed) = ns
        .run_in(|| {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .map_err(|e| tern_lab::LabError::io("tokio runtime", e))?;
            Ok(runtime.block_on(measure()))
        })
        .expect("bench in the namespace");
    let secs = elapsed.as_secs_f64();
    let rate = received as f64 / secs;
    let bits = rate * ((PAYLOAD + 8) * 8) as f64;
    println!(
        "relay_udp: {received} of {sent} datagrams of {} bytes in {secs:.1} s through the relay: \
         {:.0} k datagrams/s, {:.2} Gbit/s, loss {:.1} %",
        PAYLOAD + 8,
        rate / 1e3,
        bits / 1e9,
        100.0 * (sent.saturating_sub(received)) as f64 / sent.max(1) as f64
    );
}
