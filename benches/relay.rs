//! The relay server's per-packet cost: one WireGuard-sized datagram between two bound legs
//! through `RelayServer::handle_packet` (lookup by VNI, source match, counters). Socket I/O is
//! not included. Run: `cargo bench --bench relay`.

use std::net::SocketAddr;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tern::disco::{self, AllocateRequest, BindBody, Message};
use tern::keys::{DiscoPrivate, DiscoPublic};
use tern::relay::geneve::{Header, Vni, PROTOCOL_DISCO, PROTOCOL_WIREGUARD};
use tern::relay::server::{Action, RelayServer};

fn frame(vni: u32, protocol: u16, control: bool, body: &[u8]) -> Vec<u8> {
    let header = Header {
        version: 0,
        protocol,
        control,
        vni: Vni::new(vni),
    };
    let mut out = header.to_bytes().expect("header").to_vec();
    out.extend_from_slice(body);
    out
}

/// Bind + Answer for the leg of `me` at `from`.
fn bind(s: &mut RelayServer, me: &DiscoPrivate, other: DiscoPublic, from: SocketAddr, vni: u32) {
    let server = s.disco_public();
    let body = BindBody {
        vni,
        generation: 1,
        remote_key: other,
        challenge: [0; 32],
    };
    let sealed = disco::seal(me, &server, &Message::BindUdpRelayEndpoint(body));
    let Action::Reply { packet, .. } = s.handle_packet(
        Instant::now(),
        from,
        &frame(vni, PROTOCOL_DISCO, true, &sealed),
    ) else {
        panic!("no challenge");
    };
    let parsed = disco::parse_packet(&packet[8..]).expect("frame");
    let Ok(Message::BindUdpRelayEndpointChallenge(challenge)) =
        disco::open(&disco::shared_box(me, &server), &parsed)
    else {
        panic!("not a challenge");
    };
    let answer = disco::seal(me, &server, &Message::BindUdpRelayEndpointAnswer(challenge));
    let got = s.handle_packet(
        Instant::now(),
        from,
        &frame(vni, PROTOCOL_DISCO, true, &answer),
    );
    assert_eq!(got, Action::Accepted);
}

fn forwarding(c: &mut Criterion) {
    let mut s = RelayServer::new(Instant::now());
    s.set_addr_ports(vec!["198.51.100.7:40000".parse().expect("addr")]);
    // Other sessions around, so the VNI lookup is not trivially the only entry.
    for _ in 0..1000 {
        let pair = [
            DiscoPrivate::generate().public(),
            DiscoPrivate::generate().public(),
        ];
        s.allocate(
            Instant::now(),
            &AllocateRequest {
                client_disco: pair,
                generation: 1,
            },
        )
        .expect("allocated");
    }
    let (a, b) = (DiscoPrivate::generate(), DiscoPrivate::generate());
    let (from_a, from_b): (SocketAddr, SocketAddr) = (
        "192.0.2.1:1000".parse().expect("addr"),
        "192.0.2.2:2000".parse().expect("addr"),
    );
    let request = AllocateRequest {
        client_disco: [a.public(), b.public()],
        generation: 1,
    };
    let vni = s.allocate(Instant::now(), &request).expect("allocated").vni;
    bind(&mut s, &a, b.public(), from_a, vni);
    bind(&mut s, &b, a.public(), from_b, vni);
    let packet = frame(vni, PROTOCOL_WIREGUARD, false, &[0u8; 1300]);
    let now = Instant::now();
    let mut group = c.benchmark_group("relay");
    group.throughput(Throughput::Elements(1));
    group.bench_function("forward_1308_bytes_among_1001_sessions", |bench| {
        bench.iter(|| {
            let action = s.handle_packet(now, from_a, &packet);
            assert_eq!(action, Action::Forward(from_b));
        })
    });
    group.finish();
}

criterion_group!(benches, forwarding);
criterion_main!(benches);
