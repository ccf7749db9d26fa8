//! The peer relay under a replayed-Bind flood, on real sockets in a namespace of its own
//! (192.0.2.1 on a veth is its only address): one source replays the same valid Bind 2,000
//! times and gets no more Challenges back than the per-source limit allows.

#[path = "support/relay_client.rs"]
#[allow(dead_code)]
mod relay_client;
mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use relay_client::{geneve, wait_until, Client};
use tern::disco::{self, AllocateRequest, BindBody, Message};
use tern::relay::geneve::PROTOCOL_DISCO;
use tern::relay::io::RelayRuntime;
use tern::relay::server::{CHALLENGES_PER_SECOND, CHALLENGE_BURST};
use tokio::sync::watch;

const RELAY_IP: &str = "192.0.2.1";
const REPLAYS: usize = 2000;

async fn replayed_binds() {
    let (_regions_tx, regions) = watch::channel(BTreeMap::new());
    let relay = RelayRuntime::start(0, regions).expect("relay starts on a free port");
    let relay_addr: SocketAddr = format!("{RELAY_IP}:{}", relay.port()).parse().unwrap();
    wait_until("address discovery", || {
        !relay.status().addr_ports.is_empty()
    })
    .await;
    let (a, b) = (Client::new(RELAY_IP).await, Client::new(RELAY_IP).await);
    let endpoint = relay
        .allocate(&AllocateRequest {
            client_disco: [a.public(), b.public()],
            generation: 1,
        })
        .expect("allocated");
    let bind = Message::BindUdpRelayEndpoint(BindBody {
        vni: endpoint.vni,
        generation: 11,
        remote_key: b.public(),
        challenge: [0; 32],
    });
    let mut packet = geneve(endpoint.vni, PROTOCOL_DISCO, true);
    packet.extend_from_slice(&disco::seal(&a.disco, &endpoint.server_disco, &bind));

    // The same datagram, byte for byte, as a replay would be.
    let start = Instant::now();
    for _ in 0..REPLAYS {
        a.socket.send_to(&packet, relay_addr).await.expect("send");
    }
    let challenges = count_challenges(&a, relay_addr, Duration::from_millis(500)).await;
    let elapsed = start.elapsed().as_secs_f64();
    let limit = (CHALLENGE_BURST + CHALLENGES_PER_SECOND * elapsed).floor() as usize;
    println!("{REPLAYS} Binds in {elapsed:.2} s: {challenges} Challenges (limit {limit})");
    assert!(challenges >= 1, "the first Binds are answered");
    assert!(
        challenges <= limit,
        "{challenges} Challenges for {REPLAYS} replays in {elapsed:.2} s; limit {limit}"
    );
    let limited = relay.status().drops.get("bind_rate_limited").copied();
    assert!(
        limited.unwrap_or(0) > 0,
        "drops counted: {:?}",
        relay.status().drops
    );

    // The limit refills: once the flood stops, both legs bind as usual.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let server = endpoint.server_disco;
    a.bind(relay_addr, &server, endpoint.vni, b.public()).await;
    b.bind(relay_addr, &server, endpoint.vni, a.public()).await;
    wait_until("both legs bound after the flood", || {
        relay
            .status()
            .sessions
            .first()
            .is_some_and(|s| s.state == "open")
    })
    .await;
}

/// Challenges (Geneve control + disco) from the relay until `quiet` passes without one.
async fn count_challenges(client: &Client, relay: SocketAddr, quiet: Duration) -> usize {
    let mut buf = vec![0u8; 2048];
    let mut count = 0;
    while let Ok(got) = tokio::time::timeout(quiet, client.socket.recv_from(&mut buf)).await {
        let (n, from) = got.expect("recv");
        let header = tern::relay::geneve::parse(&buf[..n]).expect("geneve from the relay");
        assert_eq!(from, relay);
        assert!(header.control && header.protocol == PROTOCOL_DISCO);
        count += 1;
    }
    count
}

#[test]
fn a_replayed_bind_flood_gets_at_most_the_rate_limit_of_challenges() {
    support::in_namespace_with_address("rflood", RELAY_IP, replayed_binds);
}
