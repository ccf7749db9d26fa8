//! Decoding and applying a full map of 1,000 and 10,000 peers (goal at 10,000: ≤ 200 ms and
//! ≤ 64 KiB per peer). Run: `cargo bench --bench netmap`.
//!
//! Before the criterion timings it prints one measured pass per size: the wire size, the time
//! to decode (zstd + JSON) and apply, the live heap held by the `NetworkMap` per peer, and the
//! peak heap during decode+apply per peer (a counting global allocator measures both).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use tern::control::framing::{encode_map_response, Compression, MapFrameDecoder};
use tern::control::tailcfg::{
    DerpMap, DerpNode, DerpRegion, FilterRule, GoTime, Hostinfo, MapResponse, NetInfo, Node,
    Service, UserProfile,
};
use tern::keys::{DiscoPublic, MachinePublic, NodePublic};
use tern::netmap::NetworkMap;

/// Counts live and peak heap bytes.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn key32(tag: u8, i: usize) -> [u8; 32] {
    let mut b = [tag; 32];
    b[..8].copy_from_slice(&(i as u64).to_be_bytes());
    b
}

/// A peer shaped like the SaaS sample in tests/vectors: keys, two addresses, endpoints,
/// Hostinfo with services and NetInfo, a few CapMap entries, tags.
fn peer(i: usize) -> Node {
    let id = i as i64 + 100;
    let a = (i >> 8) as u8;
    let b = i as u8;
    let mut cap_map = std::collections::BTreeMap::new();
    cap_map.insert("https://tailscale.com/cap/file-sharing".to_owned(), None);
    cap_map.insert(
        "tailscale.com/cap/drive".to_owned(),
        Some(vec![serde_json::json!({"shares":["*"],"access":"rw"})]),
    );
    Node {
        id,
        stable_id: format!("nStable{id}CNTRL"),
        name: format!("host-{i}.tail252fff.ts.net."),
        user: 1 + (i % 50) as i64,
        key: NodePublic::from_bytes(key32(1, i)),
        key_expiry: "2026-01-25T18:31:27Z".parse().unwrap(),
        machine: MachinePublic::from_bytes(key32(2, i)),
        disco_key: DiscoPublic::from_bytes(key32(3, i)),
        addresses: vec![
            format!("100.64.{a}.{b}/32").parse().unwrap(),
            format!("fd7a:115c:a1e0::{a:x}{b:02x}/128").parse().unwrap(),
        ],
        allowed_ips: None,
        endpoints: vec![
            format!("198.51.{a}.{b}:41641").parse().unwrap(),
            format!("192.168.{a}.{b}:41641").parse().unwrap(),
        ],
        home_derp: 1 + (i % 20) as i32,
        hostinfo: Hostinfo {
            os: "linux".into(),
            hostname: format!("host-{i}"),
            ipn_version: "1.90.9-t1234567-gabcdef".into(),
            services: vec![
                Service {
                    proto: "peerapi4".into(),
                    port: 36297,
                    description: String::new(),
                },
                Service {
                    proto: "peerapi6".into(),
                    port: 40008,
                    description: String::new(),
                },
            ],
            net_info: Some(NetInfo {
                preferred_derp: 1,
                working_udp: Some(true),
                ..NetInfo::default()
            }),
            ..Hostinfo::default()
        },
        created: "2025-07-29T18:31:27.550535802Z".parse().unwrap(),
        cap: 130,
        tags: vec!["tag:server".into()],
        online: Some(!matches!(i % 3, 0)),
        machine_authorized: true,
        cap_map,
        ..Node::default()
    }
}

fn full_map(peers: usize) -> MapResponse {
    let region = |id: i32| DerpRegion {
        region_id: id,
        region_code: format!("r{id}"),
        region_name: format!("Region {id}"),
        nodes: vec![DerpNode {
            name: format!("{id}a"),
            region_id: id,
            host_name: format!("derp{id}.example.com"),
            ipv4: "192.0.2.1".into(),
            ..DerpNode::default()
        }],
        ..DerpRegion::default()
    };
    MapResponse {
        node: Some(peer(usize::MAX >> 20)),
        peers: (0..peers).map(peer).collect(),
        derp_map: Some(DerpMap {
            regions: Some((1..=20).map(|id| (id, Some(region(id)))).collect()),
            ..DerpMap::default()
        }),
        packet_filter: Some(vec![FilterRule::allow_all()]),
        user_profiles: (1..=50)
            .map(|id| UserProfile {
                id,
                login_name: format!("user{id}@example.com"),
                display_name: format!("User {id}"),
                profile_pic_url: String::new(),
            })
            .collect(),
        domain: "tail252fff.ts.net".into(),
        control_time: Some(GoTime::now()),
        ..MapResponse::default()
    }
}

fn decode_and_apply(wire: &[u8]) -> NetworkMap {
    let mut dec = MapFrameDecoder::new(Compression::Zstd);
    dec.push(wire);
    let resp = dec.next_frame().expect("decode").expect("complete frame");
    let mut nm = NetworkMap::new();
    nm.apply_owned(resp, GoTime::now());
    nm
}

fn report(peers: usize, json_len: usize, wire: &[u8]) {
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let start = Instant::now();
    let nm = decode_and_apply(wire);
    let elapsed = start.elapsed();
    let held = LIVE.load(Ordering::Relaxed) - before;
    let peak = PEAK.load(Ordering::Relaxed) - before;
    assert_eq!(nm.peers.len(), peers);
    eprintln!(
        "netmap {peers:>6} peers: JSON {:>9} B ({} B/peer), zstd {:>8} B, decode+apply {:>8.1} ms, \
         held {:>6} B/peer, peak {:>6} B/peer",
        json_len,
        json_len / peers,
        wire.len(),
                elapsed.as_secs_f64() * 1e3,
        held / peers,
        peak / peers,
    );
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("netmap_full_map");
    group.sample_size(10);
    for peers in [1_000, 10_000] {
        let map = full_map(peers);
        let json_len = serde_json::to_vec(&map).expect("json").len();
        let wire = encode_map_response(&map, Compression::Zstd).expect("encode");
        report(peers, json_len, &wire);
        group.bench_function(format!("decode_apply_{peers}"), |b| {
            b.iter_batched(|| (), |_| decode_and_apply(&wire), BatchSize::PerIteration)
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
