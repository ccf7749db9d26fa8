//! Fuzz the TUN offload code ([`tern::vnet`]): arbitrary bytes as a frame read from a TUN
//! (virtio-net header, then a packet, TCP or UDP super-packets included) never panic `split`; the packets it cuts go through the
//! coalescer, once joining TCP only and once UDP too (a TUN with USO), and every frame the
//! coalescer writes splits again into as many packets of the same total length, each packet of
//! a joined frame with a valid TCP or UDP checksum.

use tern::vnet::{self, Coalescer};

pub fn run(data: &[u8]) {
    let mut frame = data.to_vec();
    let mut packets: Vec<Vec<u8>> = Vec::new();
    if vnet::split(&mut frame, |p| packets.push(p.to_vec())).is_err() {
        return;
    }
    for udp in [false, true] {
        coalesce_and_split_back(&packets, udp);
    }
}

fn coalesce_and_split_back(packets: &[Vec<u8>], udp: bool) {
    let mut coalescer = Coalescer::new();
    coalescer.set_udp(udp);
    for p in packets {
        coalescer.push(p);
    }
    let mut frames = Vec::new();
    while let Some(out) = coalescer.next_output() {
        frames.push((out.to_vec(), out.joined()));
    }
    let (mut count, mut bytes) = (0, 0);
    for (mut f, coalesced) in frames {
        assert_eq!(
            coalesced,
            vnet::VnetHeader::decode(&f).is_ok_and(|h| h.gso_size != 0),
            "a joined frame and only a joined frame asks for segmentation"
        );
        let n = vnet::split(&mut f, |p| {
            bytes += p.len();
            if coalesced {
                assert!(
                    l4_checksum_ok(p),
                    "a segment of a coalesced frame has a bad checksum"
                );
            }
        })
        .expect("a frame the coalescer wrote splits")
        .packets;
        count += n;
    }
    assert_eq!(
        count,
        packets.len(),
        "packets lost or made up by coalescing"
    );
    assert_eq!(bytes, packets.iter().map(Vec::len).sum::<usize>());
}

fn l4_checksum_ok(p: &[u8]) -> bool {
    let v6 = p[0] >> 4 == 6;
    let t = if v6 { 40 } else { usize::from(p[0] & 0xf) * 4 };
    let protocol = if v6 { p[6] } else { p[9] };
    let pseudo = vnet::pseudo_header_sum(p, v6, protocol, p.len() - t);
    vnet::fold(vnet::sum_words(pseudo, &p[t..])) == 0xffff
}
