//! Hot-path pieces of the data plane: WireGuard encapsulate/decapsulate of a 1280-byte packet,
//! the AllowedIPs route lookup with 10,000 peers, and the packet parse + filter check.
//! Run: `cargo bench --bench dataplane`.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ipnet::IpNet;
use tern::control::tailcfg::FilterRule;
use tern::filter::Filter;
use tern::packet::PacketSummary;
use tern::wg::{AllowedIps, WgOutput};

#[path = "support/wg_pair.rs"]
mod wg_pair;
use wg_pair::established_pair;

const A_IP: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);
const B_IP: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);

fn udp4(len: usize) -> Vec<u8> {
    let mut p = vec![0u8; len];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[9] = 17;
    p[12..16].copy_from_slice(&A_IP.octets());
    p[16..20].copy_from_slice(&B_IP.octets());
    p[22..24].copy_from_slice(&443u16.to_be_bytes());
    p
}

fn wireguard(c: &mut Criterion) {
    let (mut a, mut b) = established_pair();
    let packet = udp4(1280);
    let (mut wire, mut plain) = (vec![0u8; 2048], vec![0u8; 2048]);
    let mut g = c.benchmark_group("wg");
    g.throughput(Throughput::Bytes(packet.len() as u64));
    g.bench_function("encapsulate+decapsulate 1280 B", |bench| {
        bench.iter(|| {
            let now = Instant::now();
            let (_, WgOutput::ToNetwork(n)) = a.encapsulate(now, &packet, &mut wire) else {
                panic!("encapsulate")
            };
            let (_, out) = b.decapsulate(now, &wire[..n], &mut plain);
            assert!(matches!(out, WgOutput::ToTunnel(1280)));
        })
    });
    g.finish();
}

fn routing(c: &mut Criterion) {
    let mut table = AllowedIps::new();
    for i in 0..10_000u32 {
        let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 0)) + i);
        table.insert(IpNet::from(IpAddr::V4(ip)), i);
    }
    table.insert("10.0.0.0/8".parse().unwrap(), 99_999);
    let dst = IpAddr::V4(Ipv4Addr::new(100, 64, 30, 7));
    c.bench_function("route lookup, 10k peers", |bench| {
        bench.iter(|| table.lookup(std::hint::black_box(dst)).copied())
    });
}

fn filtering(c: &mut Criterion) {
    let rules: Vec<FilterRule> = serde_json::from_str(
        r#"[{"SrcIPs":["100.64.0.0/10"],"DstPorts":[{"IP":"*","Ports":{"First":443,"Last":443}}]},
            {"SrcIPs":["*"],"DstPorts":[{"IP":"100.64.0.2","Ports":{"First":22,"Last":22}}]}]"#,
    )
    .unwrap();
    let filter = Filter::from_rules(&rules, &["100.64.0.2/32".parse().unwrap()]).unwrap();
    let packet = udp4(1280);
    c.bench_function("parse + filter check", |bench| {
        bench.iter(|| {
            let s = PacketSummary::parse(std::hint::black_box(&packet)).unwrap();
            filter.check(&s)
        })
    });
}

criterion_group!(benches, wireguard, routing, filtering);
criterion_main!(benches);
