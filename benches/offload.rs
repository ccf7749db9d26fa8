//! The offloaded hot path in one process, both ends: a 64 KiB TCP super-packet as the TUN hands
//! it over (virtio-net header, TSO) is split into 1240-byte segments, each is encrypted by one
//! WireGuard peer table and decrypted by the other, and the decrypted segments are coalesced back
//! into the super-packet the receiving TUN would take. Criterion gives the throughput of one core
//! doing both ends; a counting global allocator gives the heap allocations per packet once the
//! buffers are warm (the goal is none). Also the checksum of one packet alone.
//! Run: `cargo bench --bench offload`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tern::vnet::{self, Coalescer, VnetHeader};
use tern::wg::{WgOutput, WgPeers};

#[path = "support/wg_pair.rs"]
mod wg_pair;
use wg_pair::established_pair;

/// Counts every allocation and reallocation; frees are not counted.
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// TCP payload per segment at tern's TUN MTU of 1280 (IPv4, no options).
const SEGMENT: usize = 1240;
/// Segments in one super-packet: 52 × 1240 = 64,480 payload bytes.
const SEGMENTS: usize = 52;

/// A TSO frame 100.64.0.1 → 100.64.0.2 as the kernel writes it: the checksum field holds the
/// pseudo-header sum, the virtio-net header asks for segments of [`SEGMENT`] bytes.
fn tso_frame() -> Vec<u8> {
    let payload = SEGMENT * SEGMENTS;
    let total = 40 + payload;
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[6] = 0x40;
    p[8] = 64;
    p[9] = 6;
    p[12..16].copy_from_slice(&[100, 64, 0, 1]);
    p[16..20].copy_from_slice(&[100, 64, 0, 2]);
    p[20..22].copy_from_slice(&40000u16.to_be_bytes());
    p[22..24].copy_from_slice(&5201u16.to_be_bytes());
    p[24..28].copy_from_slice(&1u32.to_be_bytes());
    p[28..32].copy_from_slice(&1u32.to_be_bytes());
    p[32] = 5 << 4;
    p[33] = 0x10;
    p[34..36].copy_from_slice(&[0xff, 0xff]);
    for (i, b) in p[40..].iter_mut().enumerate() {
        *b = i as u8;
    }
    let partial = vnet::fold(vnet::pseudo_header_sum(&p, false, 6, total - 20));
    p[36..38].copy_from_slice(&partial.to_be_bytes());
    let mut frame = VnetHeader::tcp_super_packet(false, 20, 20, SEGMENT)
        .encode()
        .to_vec();
    frame.extend_from_slice(&p);
    frame
}

/// Everything one super-packet goes through, with buffers that live across calls.
struct Pipeline {
    a: WgPeers,
    b: WgPeers,
    frame: Vec<u8>,
    tun_read: Vec<u8>,
    wire: Vec<u8>,
    plain: Vec<u8>,
    coalescer: Coalescer,
}

impl Pipeline {
    fn new() -> Self {
        let (a, b) = established_pair();
        let frame = tso_frame();
        Pipeline {
            a,
            b,
            tun_read: frame.clone(),
            frame,
            wire: vec![0u8; 2048],
            plain: vec![0u8; 2048],
            coalescer: Coalescer::new(),
        }
    }

    /// One super-packet through both ends; returns the bytes of the frame(s) written to the TUN.
    fn run(&mut self) -> usize {
        // The TUN read: split works in place, so each round starts from the kernel's frame.
        self.tun_read.copy_from_slice(&self.frame);
        let now = Instant::now();
        let Self {
            a,
            b,
            tun_read,
            wire,
            plain,
            coalescer,
            ..
        } = self;
        vnet::split(tun_read, |segment| {
            let (_, WgOutput::ToNetwork(n)) = a.encapsulate(now, segment, wire) else {
                panic!("encapsulate")
            };
            let (_, WgOutput::ToTunnel(m)) = b.decapsulate(now, &wire[..n], plain) else {
                panic!("decapsulate")
            };
            coalescer.push(&plain[..m]);
        })
        .expect("split");
        let mut written = 0;
        while let Some(out) = coalescer.next_output() {
            // What the engine hands `writev`: the parts, not a copy.
            written += out.parts().map(<[u8]>::len).sum::<usize>();
        }
        written
    }
}

fn offloaded_path(c: &mut Criterion) {
    let mut pipeline = Pipeline::new();
    // Warm up, then count: the buffers have their sizes after the first round.
    assert_eq!(
        pipeline.run(),
        pipeline.frame.len(),
        "one coalesced frame back"
    );
    const ROUNDS: u64 = 200;
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    for _ in 0..ROUNDS {
        pipeline.run();
    }
    let allocations = ALLOCATIONS.load(Ordering::Relaxed) - before;
    println!(
        "offloaded path: {allocations} heap allocations in {ROUNDS} super-packets ({} packets): {:.3} per packet",
        ROUNDS * SEGMENTS as u64,
        allocations as f64 / (ROUNDS * SEGMENTS as u64) as f64
    );

    let mut g = c.benchmark_group("offload");
    g.throughput(Throughput::Bytes((SEGMENT * SEGMENTS) as u64));
    g.bench_function(
        "64 KiB super-packet: split, encrypt, decrypt, coalesce",
        |bench| bench.iter(|| pipeline.run()),
    );
    let frame = tso_frame();
    let mut tun_read = frame.clone();
    g.bench_function(
        "split only (with the copy of the frame it overwrites)",
        |bench| {
            bench.iter(|| {
                tun_read.copy_from_slice(&frame);
                let mut n = 0;
                vnet::split(&mut tun_read, |s| n += s.len()).expect("split");
                n
            })
        },
    );
    g.finish();

    // The Internet checksum of one segment-sized packet: split sums every segment it cuts and
    // the coalescer every segment it joins, so this is paid twice per packet on a tunnel.
    let packet: Vec<u8> = (0..SEGMENT + 28).map(|i| (i * 131 + 7) as u8).collect();
    let mut g = c.benchmark_group("checksum");
    g.throughput(Throughput::Bytes(packet.len() as u64));
    g.bench_function("sum_words over 1268 bytes", |bench| {
        bench.iter(|| vnet::fold(vnet::sum_words(0, std::hint::black_box(&packet))))
    });
    g.finish();
}

criterion_group!(benches, offloaded_path);
criterion_main!(benches);
