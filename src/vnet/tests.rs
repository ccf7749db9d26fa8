//! Hand-made packets through split and coalesce, checked with a plain 16-bit checksum written
//! separately from the module's 32-bit one.

use super::*;

const ACK: u8 = 0x10;
const PSH: u8 = 0x08;
const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const CWR: u8 = 0x80;

/// RFC 1071 the slow way: 16-bit words, folded at the end.
fn naive_sum(data: &[u8]) -> u32 {
    let mut sum = 0u32;
    for pair in data.chunks(2) {
        let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    sum
}

fn naive_fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

fn ip_len(packet: &[u8]) -> usize {
    if packet[0] >> 4 == 6 {
        40
    } else {
        usize::from(packet[0] & 0xf) * 4
    }
}

/// Whether the L4 checksum of a TCP or UDP packet verifies.
fn l4_checksum_ok(packet: &[u8]) -> bool {
    let t = ip_len(packet);
    let v6 = packet[0] >> 4 == 6;
    let (addrs, proto) = if v6 {
        (&packet[8..40], packet[6])
    } else {
        (&packet[12..20], packet[9])
    };
    let l4 = &packet[t..];
    let sum = naive_sum(addrs) + u32::from(proto) + l4.len() as u32 + naive_sum(l4);
    naive_fold(sum) == 0xffff
}

fn ipv4_checksum_ok(packet: &[u8]) -> bool {
    naive_fold(naive_sum(&packet[..ip_len(packet)])) == 0xffff
}

/// TCP options: NOP, NOP, timestamps.
fn timestamps(tsval: u32) -> Vec<u8> {
    let mut o = vec![1, 1, 8, 10];
    o.extend_from_slice(&tsval.to_be_bytes());
    o.extend_from_slice(&7u32.to_be_bytes());
    o
}

struct Tcp {
    v6: bool,
    sport: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    options: Vec<u8>,
    payload: Vec<u8>,
    id: u16,
}

impl Tcp {
    fn v4(seq: u32, payload: Vec<u8>) -> Self {
        Tcp {
            v6: false,
            sport: 40000,
            seq,
            ack: 99,
            flags: ACK,
            options: Vec::new(),
            payload,
            id: 0x1234,
        }
    }

    fn v6(seq: u32, payload: Vec<u8>) -> Self {
        Tcp {
            v6: true,
            ..Tcp::v4(seq, payload)
        }
    }

    /// A complete packet with correct checksums.
    fn build(&self) -> Vec<u8> {
        let mut p = self.build_headers_only();
        let t = ip_len(&p);
        let sum = pseudo(&p, t) + naive_sum(&p[t..]);
        let checksum = !naive_fold(sum);
        p[t + 16..t + 18].copy_from_slice(&checksum.to_be_bytes());
        p
    }

    /// Checksums zero (IPv4 header checksum filled in).
    fn build_headers_only(&self) -> Vec<u8> {
        let tcp_len = 20 + self.options.len();
        let l4_len = tcp_len + self.payload.len();
        let mut p = ip_header(self.v6, 6, l4_len, self.id);
        p.extend_from_slice(&self.sport.to_be_bytes());
        p.extend_from_slice(&443u16.to_be_bytes());
        p.extend_from_slice(&self.seq.to_be_bytes());
        p.extend_from_slice(&self.ack.to_be_bytes());
        p.push(((tcp_len / 4) as u8) << 4);
        p.push(self.flags);
        p.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0]);
        p.extend_from_slice(&self.options);
        p.extend_from_slice(&self.payload);
        p
    }
}

/// An IP header 100.64.0.1 → 100.64.0.2 (IPv4, DF, checksum filled in) or fd7a:115c:a1e0::1 →
/// ::2 (IPv6, flow label 0x1234) for `l4_len` bytes of `protocol`.
fn ip_header(v6: bool, protocol: u8, l4_len: usize, id: u16) -> Vec<u8> {
    let mut p = Vec::new();
    if v6 {
        p.extend_from_slice(&[0x60, 0x00, 0x12, 0x34]);
        p.extend_from_slice(&(l4_len as u16).to_be_bytes());
        p.extend_from_slice(&[protocol, 64]);
        p.extend_from_slice(&[
            0xfd, 0x7a, 0x11, 0x5c, 0xa1, 0xe0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1,
        ]);
        p.extend_from_slice(&[
            0xfd, 0x7a, 0x11, 0x5c, 0xa1, 0xe0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2,
        ]);
    } else {
        p.extend_from_slice(&[0x45, 0x00]);
        p.extend_from_slice(&((20 + l4_len) as u16).to_be_bytes());
        p.extend_from_slice(&id.to_be_bytes());
        p.extend_from_slice(&[0x40, 0x00, 64, protocol, 0, 0]);
        p.extend_from_slice(&[100, 64, 0, 1, 100, 64, 0, 2]);
        let c = !naive_fold(naive_sum(&p));
        p[10..12].copy_from_slice(&c.to_be_bytes());
    }
    p
}

fn pseudo(p: &[u8], t: usize) -> u32 {
    let v6 = p[0] >> 4 == 6;
    let addrs = if v6 { &p[8..40] } else { &p[12..20] };
    naive_sum(addrs) + 6 + (p.len() - t) as u32
}

fn payload(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// What the kernel hands us for TSO: the vnet header, then one packet whose TCP checksum field
/// holds the pseudo-header sum.
fn tso_frame(tcp: &Tcp, segment: u16) -> Vec<u8> {
    let mut p = tcp.build_headers_only();
    let t = ip_len(&p);
    let partial = naive_fold(pseudo(&p, t));
    p[t + 16..t + 18].copy_from_slice(&partial.to_be_bytes());
    let header =
        VnetHeader::tcp_super_packet(tcp.v6, t, 20 + tcp.options.len(), usize::from(segment));
    let mut frame = header.encode().to_vec();
    frame.extend_from_slice(&p);
    frame
}

fn split_all(frame: &[u8]) -> Result<Vec<Vec<u8>>, VnetError> {
    let mut frame = frame.to_vec();
    let mut out = Vec::new();
    let split = split(&mut frame, |p| out.push(p.to_vec()))?;
    assert_eq!(split.packets, out.len());
    Ok(out)
}

fn coalesce_all(packets: &[Vec<u8>]) -> Vec<Vec<u8>> {
    coalesce_all_with(packets, false)
}

/// [`coalesce_all`] with UDP datagrams joined too when `udp` (a TUN with USO).
fn coalesce_all_with(packets: &[Vec<u8>], udp: bool) -> Vec<Vec<u8>> {
    let mut c = Coalescer::new();
    c.set_udp(udp);
    for p in packets {
        c.push(p);
    }
    let mut out = Vec::new();
    while let Some(output) = c.next_output() {
        let p = output.to_vec();
        let gso = VnetHeader::decode(&p).expect("header").gso_size != 0;
        assert_eq!(
            output.joined(),
            gso,
            "joined exactly when the header asks for segmentation"
        );
        assert!(output.parts().count() <= coalesce::MAX_PARTS);
        out.push(p);
    }
    assert!(c.is_empty());
    out
}

fn seq_of(p: &[u8]) -> u32 {
    let t = ip_len(p);
    u32::from_be_bytes([p[t + 4], p[t + 5], p[t + 6], p[t + 7]])
}

fn flags_of(p: &[u8]) -> u8 {
    p[ip_len(p) + 13]
}

#[test]
fn checksum_matches_rfc1071_example_and_the_slow_sum() {
    // RFC 1071 §3: 00 01 f2 03 f4 f5 f6 f7 sums to ddf2.
    let example = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
    assert_eq!(fold(sum_words(0, &example)), 0xddf2);
    // Lengths around the 4-byte words and the 32-byte blocks the fast sum takes at a time.
    for len in [
        0, 1, 2, 3, 5, 7, 8, 9, 31, 32, 33, 35, 63, 64, 65, 1279, 1280, 65535,
    ] {
        let data = payload(len, len as u8);
        assert_eq!(
            fold(sum_words(0, &data)),
            naive_fold(naive_sum(&data)),
            "length {len}"
        );
        // Chained after another sum, as the pseudo-header is.
        assert_eq!(
            fold(sum_words(0x1_2345, &data)),
            naive_fold(0x1_2345 + naive_sum(&data)),
            "length {len} after a pseudo-header"
        );
    }
    // All ones (the largest words) and all zeros (a sum of 0, which must stay 0).
    for (byte, len) in [(0xff, 65535), (0xff, 1280), (0, 1280)] {
        let data = vec![byte; len];
        assert_eq!(
            fold(sum_words(0, &data)),
            naive_fold(naive_sum(&data)),
            "{len} bytes of {byte:#x}"
        );
    }
}

#[test]
fn header_round_trips_in_host_order() {
    let h = VnetHeader::tcp_super_packet(true, 40, 32, 1208);
    let bytes = h.encode();
    assert_eq!(VnetHeader::decode(&bytes), Ok(h));
    assert_eq!(h.gso(), Ok(GsoType::TcpV6));
    assert_eq!(u16::from_ne_bytes([bytes[4], bytes[5]]), 1208);
    assert_eq!(VnetHeader::decode(&bytes[..9]), Err(VnetError::ShortHeader));
}

#[test]
fn tso_v4_is_cut_into_segments_with_their_own_headers() {
    let data = payload(3000, 1);
    let mut tcp = Tcp::v4(1_000_000, data.clone());
    tcp.flags = ACK | PSH | FIN | CWR;
    let segments = split_all(&tso_frame(&tcp, 1000)).unwrap();
    assert_eq!(segments.len(), 3);
    let mut joined = Vec::new();
    for (i, s) in segments.iter().enumerate() {
        assert_eq!(s.len(), 40 + 1000);
        assert_eq!(u16::from_be_bytes([s[2], s[3]]) as usize, s.len());
        assert_eq!(u16::from_be_bytes([s[4], s[5]]), 0x1234 + i as u16, "IP ID");
        assert!(ipv4_checksum_ok(s), "IPv4 checksum of segment {i}");
        assert!(l4_checksum_ok(s), "TCP checksum of segment {i}");
        assert_eq!(seq_of(s), 1_000_000 + 1000 * i as u32);
        let last = i == 2;
        assert_eq!(
            flags_of(s) & (FIN | PSH) != 0,
            last,
            "FIN/PSH only on the last"
        );
        assert_eq!(flags_of(s) & CWR != 0, i == 0, "CWR only on the first");
        joined.extend_from_slice(&s[40..]);
    }
    assert_eq!(joined, data);
}

#[test]
fn tso_v6_with_options_keeps_them_and_ends_with_a_short_segment() {
    let data = payload(2500, 9);
    let mut tcp = Tcp::v6(u32::MAX - 100, data.clone());
    tcp.options = timestamps(5);
    let segments = split_all(&tso_frame(&tcp, 1208)).unwrap();
    let lens: Vec<usize> = segments.iter().map(|s| s.len() - 72).collect();
    assert_eq!(lens, [1208, 1208, 84]);
    let mut joined = Vec::new();
    for (i, s) in segments.iter().enumerate() {
        assert_eq!(usize::from(u16::from_be_bytes([s[4], s[5]])), s.len() - 40);
        assert_eq!(&s[60..72], &timestamps(5)[..]);
        assert!(l4_checksum_ok(s), "TCP checksum of segment {i}");
        // The sequence number wraps past 2^32.
        assert_eq!(seq_of(s), (u32::MAX - 100).wrapping_add(1208 * i as u32));
        joined.extend_from_slice(&s[72..]);
    }
    assert_eq!(joined, data);
}

#[test]
fn a_partial_checksum_is_completed_for_udp_and_tcp() {
    // UDP over IPv4, 20 + 8 + 13 bytes, checksum field holding the pseudo-header sum.
    let mut p = vec![
        0x45, 0, 0, 41, 0, 1, 0x40, 0, 64, 17, 0, 0, 100, 64, 0, 1, 100, 64, 0, 2,
    ];
    p.extend_from_slice(&[0x30, 0x39, 0x00, 0x35, 0, 21, 0, 0]);
    p.extend_from_slice(b"hello, tern!!");
    let partial = naive_fold(naive_sum(&p[12..20]) + 17 + 21);
    p[26..28].copy_from_slice(&partial.to_be_bytes());
    let header = VnetHeader {
        flags: 1,
        csum_start: 20,
        csum_offset: 6,
        ..Default::default()
    };
    let mut frame = header.encode().to_vec();
    frame.extend_from_slice(&p);
    let out = split_all(&frame).unwrap();
    assert_eq!(out.len(), 1);
    assert!(l4_checksum_ok(&out[0]));

    // A small TCP packet the kernel did not segment but left the checksum to us.
    let tcp = Tcp::v4(7, payload(100, 3));
    let mut frame = tso_frame(&tcp, 0);
    frame[1] = 0; // GSO none
    let out = split_all(&frame).unwrap();
    assert_eq!(out, vec![tcp.build()]);
}

/// What the kernel hands us for USO: the vnet header (GSO_UDP_L4), then one UDP packet with
/// `payload`, whose checksum field holds the pseudo-header sum.
fn uso_frame(v6: bool, payload: &[u8], segment: u16) -> Vec<u8> {
    let udp_len = (8 + payload.len()) as u16;
    let mut p = ip_header(v6, 17, usize::from(udp_len), 0x1234);
    let u = p.len();
    p.extend_from_slice(&[0x30, 0x39, 0x01, 0xbb]);
    p.extend_from_slice(&udp_len.to_be_bytes());
    let addrs = if v6 { &p[8..40] } else { &p[12..20] };
    let partial = naive_fold(naive_sum(addrs) + 17 + u32::from(udp_len));
    p.extend_from_slice(&partial.to_be_bytes());
    p.extend_from_slice(payload);
    let header = VnetHeader {
        flags: 1,
        gso_type: 5,
        hdr_len: (u + 8) as u16,
        gso_size: segment,
        csum_start: u as u16,
        csum_offset: 6,
    };
    let mut frame = header.encode().to_vec();
    frame.extend_from_slice(&p);
    frame
}

#[test]
fn uso_is_cut_into_datagrams_with_their_own_headers() {
    for v6 in [false, true] {
        let data = payload(3000, 4);
        let datagrams = split_all(&uso_frame(v6, &data, 1200)).unwrap();
        let ip = if v6 { 40 } else { 20 };
        let lens: Vec<usize> = datagrams.iter().map(|d| d.len() - ip - 8).collect();
        assert_eq!(lens, [1200, 1200, 600], "v6 {v6}");
        let mut joined = Vec::new();
        for (i, d) in datagrams.iter().enumerate() {
            let udp_len = u16::from_be_bytes([d[ip + 4], d[ip + 5]]);
            assert_eq!(usize::from(udp_len), d.len() - ip, "UDP length of {i}");
            if v6 {
                assert_eq!(usize::from(u16::from_be_bytes([d[4], d[5]])), d.len() - 40);
            } else {
                assert_eq!(usize::from(u16::from_be_bytes([d[2], d[3]])), d.len());
                assert_eq!(
                    u16::from_be_bytes([d[4], d[5]]),
                    0x1234 + i as u16,
                    "IPv4 ID"
                );
                assert!(ipv4_checksum_ok(d), "IPv4 checksum of datagram {i}");
            }
            assert_eq!(&d[ip..ip + 4], &[0x30, 0x39, 0x01, 0xbb], "ports of {i}");
            assert!(l4_checksum_ok(d), "UDP checksum of datagram {i} (v6 {v6})");
            joined.extend_from_slice(&d[ip + 8..]);
        }
        assert_eq!(joined, data, "v6 {v6}");
        // What split says it did is what the counters show.
        let mut frame = uso_frame(v6, &data, 1200);
        let said = split(&mut frame, |_| {});
        let want = Split {
            gso: GsoType::UdpL4,
            packets: 3,
        };
        assert_eq!(said, Ok(want), "v6 {v6}");
    }
}

#[test]
fn a_uso_datagram_whose_checksum_computes_to_zero_sends_all_ones() {
    // Pick the last payload word so that the second datagram's sum folds to 0xffff: its
    // checksum computes to 0, which UDP means as "none", so it must go out as 0xffff.
    let mut data = payload(2400, 8);
    data[2398..].fill(0);
    let second = &split_all(&uso_frame(true, &data, 1200)).unwrap()[1];
    let mut zeroed = second.clone();
    zeroed[46..48].fill(0);
    let sum = naive_fold(pseudo_udp(&zeroed) + naive_sum(&zeroed[40..]));
    data[2398..].copy_from_slice(&(0xffff - sum).to_be_bytes());
    let second = &split_all(&uso_frame(true, &data, 1200)).unwrap()[1];
    assert_eq!(&second[46..48], &[0xff, 0xff]);
    assert!(l4_checksum_ok(second));
}

fn pseudo_udp(p: &[u8]) -> u32 {
    naive_sum(&p[8..40]) + 17 + (p.len() - 40) as u32
}

#[test]
fn bad_uso_frames_are_refused() {
    let good = uso_frame(false, &payload(3000, 1), 1000);
    assert_eq!(split_all(&good).map(|d| d.len()), Ok(3));
    let mut zero = good.clone();
    zero[4..6].fill(0);
    assert_eq!(split_all(&zero), Err(VnetError::ZeroSegment));
    let mut fragment = good.clone();
    fragment[10 + 6] |= 0x20; // more fragments
    assert_eq!(split_all(&fragment), Err(VnetError::NotUdp));
    let mut tcp = good.clone();
    tcp[10 + 9] = 6;
    assert_eq!(split_all(&tcp), Err(VnetError::NotUdp));
    assert_eq!(split_all(&good[..10 + 24]), Err(VnetError::NotUdp));
    survives_truncation_and_corruption(&good, 120, 60);
}

#[test]
fn a_plain_packet_passes_untouched() {
    let packet = Tcp::v6(1, payload(10, 0)).build();
    let mut frame = VnetHeader::default().encode().to_vec();
    frame.extend_from_slice(&packet);
    assert_eq!(split_all(&frame).unwrap(), vec![packet]);
}

#[test]
fn bad_frames_are_refused_not_panicked_on() {
    let good = tso_frame(&Tcp::v4(1, payload(3000, 0)), 1000);
    assert_eq!(split_all(&good[..5]), Err(VnetError::ShortHeader));
    let mut ufo = good.clone();
    ufo[1] = 3; // UDP fragmentation offload: never enabled, refused
    assert_eq!(split_all(&ufo), Err(VnetError::UnsupportedGso(3)));
    let mut udp_l4 = good.clone();
    udp_l4[1] = 5; // USO on a TCP packet
    assert_eq!(split_all(&udp_l4), Err(VnetError::NotUdp));
    let mut zero = good.clone();
    zero[4..6].fill(0);
    assert_eq!(split_all(&zero), Err(VnetError::ZeroSegment));
    let mut wrong_family = good.clone();
    wrong_family[1] = 4; // TCPV6 on an IPv4 packet
    assert_eq!(split_all(&wrong_family), Err(VnetError::NotTcp));
    assert_eq!(split_all(&good[..10 + 30]), Err(VnetError::BadHeaders));
    let mut far_checksum = VnetHeader {
        flags: 1,
        csum_start: 60,
        csum_offset: 16,
        ..Default::default()
    }
    .encode()
    .to_vec();
    far_checksum.extend_from_slice(&[0x45; 40]);
    assert_eq!(split_all(&far_checksum), Err(VnetError::BadChecksumOffsets));
    survives_truncation_and_corruption(&good, 200, 80);
}

/// Every prefix of `good` up to `prefixes` bytes and every single-byte corruption of its first
/// `flips` bytes: an answer from `split`, never a panic.
fn survives_truncation_and_corruption(good: &[u8], prefixes: usize, flips: usize) {
    for len in 0..good.len().min(prefixes) {
        let _ = split_all(&good[..len]);
    }
    for i in 0..flips.min(good.len()) {
        let mut bad = good.to_vec();
        bad[i] ^= 0xff;
        let _ = split_all(&bad);
    }
}

#[test]
fn consecutive_segments_become_one_super_packet_that_splits_back_to_them() {
    for v6 in [false, true] {
        let mut packets = Vec::new();
        for i in 0..5u32 {
            let len = if i == 4 { 300 } else { 1200 };
            let mut tcp = if v6 {
                Tcp::v6(5000 + 1200 * i, payload(len, i as u8))
            } else {
                Tcp::v4(5000 + 1200 * i, payload(len, i as u8))
            };
            tcp.options = timestamps(77);
            tcp.id = 0x1234 + i as u16;
            tcp.flags = if i == 4 { ACK | PSH } else { ACK };
            packets.push(tcp.build());
        }
        let out = coalesce_all(&packets);
        assert_eq!(out.len(), 1, "v6={v6}");
        let header = VnetHeader::decode(&out[0]).unwrap();
        let t = if v6 { 40 } else { 20 };
        assert_eq!(
            header.gso().unwrap(),
            if v6 { GsoType::TcpV6 } else { GsoType::TcpV4 }
        );
        assert_eq!(header.gso_size, 1200);
        assert_eq!(usize::from(header.hdr_len), t + 32);
        assert_eq!((header.csum_start, header.csum_offset), (t as u16, 16));
        let packet = &out[0][HDR_LEN..];
        assert_eq!(packet.len(), t + 32 + 4 * 1200 + 300);
        if !v6 {
            assert!(ipv4_checksum_ok(packet));
        }
        assert_eq!(flags_of(packet), ACK | PSH, "PSH of the last segment kept");
        // Splitting it again (what the kernel does if it forwards it) gives the originals back.
        assert_eq!(split_all(&out[0]).unwrap(), packets, "v6={v6}");
    }
}

fn run(count: u32, seg: usize, make: impl Fn(u32) -> Tcp) -> Vec<Vec<u8>> {
    (0..count)
        .map(|i| {
            let mut tcp = make(i);
            if tcp.payload.is_empty() && tcp.flags == ACK {
                tcp.payload = payload(seg, i as u8);
            }
            tcp.build()
        })
        .collect()
}

fn segment_counts(out: &[Vec<u8>]) -> Vec<usize> {
    out.iter()
        .map(|o| {
            let h = VnetHeader::decode(o).unwrap();
            if h.gso_size == 0 {
                1
            } else {
                let t = ip_len(&o[HDR_LEN..]);
                (o.len() - HDR_LEN - usize::from(h.hdr_len))
                    .div_ceil(usize::from(h.gso_size))
                    .max(if t > 0 { 1 } else { 0 })
            }
        })
        .collect()
}

#[test]
fn segments_that_do_not_continue_each_other_stay_apart() {
    let at = |i: u32| 1000 * i;
    // A gap in sequence numbers.
    let gap = run(3, 1000, |i| {
        Tcp::v4(if i == 2 { at(3) } else { at(i) }, Vec::new())
    });
    assert_eq!(segment_counts(&coalesce_all(&gap)), [2, 1]);
    // A new ACK number.
    let acks = run(3, 1000, |i| Tcp {
        ack: if i == 2 { 100 } else { 99 },
        ..Tcp::v4(at(i), Vec::new())
    });
    assert_eq!(segment_counts(&coalesce_all(&acks)), [2, 1]);
    // Different timestamps (options).
    let ts = run(3, 1000, |i| Tcp {
        options: timestamps(if i == 0 { 1 } else { 2 }),
        ..Tcp::v4(at(i), Vec::new())
    });
    assert_eq!(segment_counts(&coalesce_all(&ts)), [1, 2]);
    // PSH in the middle ends the super-packet.
    let push = run(4, 1000, |i| Tcp {
        flags: if i == 1 { ACK | PSH } else { ACK },
        payload: payload(1000, 0),
        ..Tcp::v4(at(i), Vec::new())
    });
    assert_eq!(segment_counts(&coalesce_all(&push)), [2, 2]);
    // A short segment ends it too; so does a larger one that cannot follow.
    let short = run(3, 1000, |i| Tcp {
        payload: payload(if i == 1 { 500 } else { 1000 }, 0),
        ..Tcp::v4(if i == 2 { 1500 } else { at(i) }, Vec::new())
    });
    assert_eq!(segment_counts(&coalesce_all(&short)), [2, 1]);
}

#[test]
fn packets_that_may_not_join_pass_alone_and_in_order() {
    let a = Tcp::v4(0, payload(1000, 0)).build();
    let b = Tcp::v4(1000, payload(1000, 1)).build();
    let mut fin = Tcp::v4(2000, payload(1000, 2));
    fin.flags = ACK | FIN;
    let fin = fin.build();
    let after_fin = Tcp::v4(3000, payload(1000, 3)).build();
    let mut syn = Tcp::v4(0, Vec::new());
    syn.flags = SYN;
    let syn = syn.build();
    let pure_ack = Tcp::v4(4000, Vec::new()).build();
    let mut corrupt = Tcp::v4(4000, payload(1000, 4)).build();
    corrupt[100] ^= 1;
    let udp = vec![
        0x45, 0, 0, 28, 0, 0, 0, 0, 64, 17, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 0, 1, 0, 2, 0, 8, 0, 0,
    ];
    let input = vec![
        a.clone(),
        b.clone(),
        fin.clone(),
        after_fin.clone(),
        syn.clone(),
        pure_ack.clone(),
        corrupt.clone(),
        udp.clone(),
    ];
    let out = coalesce_all(&input);
    assert_eq!(segment_counts(&out), [2, 1, 1, 1, 1, 1, 1]);
    let singles: Vec<&[u8]> = out[1..].iter().map(|o| &o[HDR_LEN..]).collect();
    assert_eq!(
        singles,
        [&fin[..], &after_fin, &syn, &pure_ack, &corrupt, &udp]
    );
    for o in &out[1..] {
        assert_eq!(
            &o[..HDR_LEN],
            &[0u8; HDR_LEN],
            "a lone packet has an empty header"
        );
    }
}

#[test]
fn interleaved_flows_are_joined_each_on_its_own() {
    let flow = |sport: u16, i: u32| {
        Tcp {
            sport,
            ..Tcp::v4(1000 * i, payload(1000, i as u8))
        }
        .build()
    };
    let input: Vec<Vec<u8>> = (0..4).flat_map(|i| [flow(1, i), flow(2, i)]).collect();
    let out = coalesce_all(&input);
    assert_eq!(segment_counts(&out), [4, 4]);
    let ports: Vec<u16> = out
        .iter()
        .map(|o| u16::from_be_bytes([o[30], o[31]]))
        .collect();
    assert_eq!(ports, [1, 2]);
}

#[test]
fn a_super_packet_stays_within_64_kib() {
    let input = run(60, 1400, |i| Tcp::v4(1400 * i, Vec::new()));
    let out = coalesce_all(&input);
    for o in &out {
        assert!(o.len() - HDR_LEN <= 65535);
    }
    let counts = segment_counts(&out);
    assert_eq!(counts.iter().sum::<usize>(), 60);
    assert_eq!(counts[0], (65535 - 40) / 1400);
}

#[test]
fn the_coalescer_says_when_to_write_and_starts_over_empty() {
    let mut c = Coalescer::new();
    let p = Tcp::v4(0, payload(100, 0)).build();
    for i in 0..coalesce::MAX_PACKETS {
        assert!(!c.is_full(), "{i}");
        c.push(&p);
    }
    assert!(c.is_full());
    assert_eq!(c.pending(), coalesce::MAX_PACKETS);
    let mut n = 0;
    while c.next_output().is_some() {
        n += 1;
    }
    // Same sequence number every time: none continues another.
    assert_eq!(n, coalesce::MAX_PACKETS);
    assert!(c.is_empty() && !c.is_full() && c.pending() == 0);
}

/// A UDP datagram 100.64.0.1 → 100.64.0.2 (or the IPv6 pair) from port `sport` to 443 with a
/// correct checksum; IPv4 ID `id`.
fn udp_datagram(v6: bool, sport: u16, id: u16, data: &[u8]) -> Vec<u8> {
    let udp_len = 8 + data.len();
    let mut p = ip_header(v6, 17, udp_len, id);
    let u = p.len();
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&443u16.to_be_bytes());
    p.extend_from_slice(&(udp_len as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(data);
    let addrs = if v6 { &p[8..40] } else { &p[12..20] };
    let sum = naive_sum(addrs) + 17 + udp_len as u32 + naive_sum(&p[u..]);
    let checksum = match !naive_fold(sum) {
        0 => 0xffff,
        c => c,
    };
    p[u + 6..u + 8].copy_from_slice(&checksum.to_be_bytes());
    p
}

/// `sizes.len()` datagrams of one flow with consecutive IPv4 IDs, as a sender's kernel makes them.
fn udp_run(v6: bool, sizes: &[usize]) -> Vec<Vec<u8>> {
    sizes
        .iter()
        .enumerate()
        .map(|(i, &len)| udp_datagram(v6, 4000, 0x2000 + i as u16, &payload(len, i as u8)))
        .collect()
}

#[test]
fn udp_datagrams_of_one_flow_become_one_uso_super_packet_that_splits_back_to_them() {
    for v6 in [false, true] {
        let datagrams = udp_run(v6, &[1000, 1000, 1000, 1000, 400]);
        let out = coalesce_all_with(&datagrams, true);
        assert_eq!(out.len(), 1, "v6={v6}");
        let header = VnetHeader::decode(&out[0]).unwrap();
        let t = if v6 { 40 } else { 20 };
        assert_eq!(header.gso(), Ok(GsoType::UdpL4));
        assert_eq!(header.gso_size, 1000);
        assert_eq!(usize::from(header.hdr_len), t + 8);
        assert_eq!(
            (header.flags, header.csum_start, header.csum_offset),
            (1, t as u16, 6)
        );
        let packet = &out[0][HDR_LEN..];
        assert_eq!(packet.len(), t + 8 + 4 * 1000 + 400);
        let udp_len = u16::from_be_bytes([packet[t + 4], packet[t + 5]]);
        assert_eq!(
            usize::from(udp_len),
            packet.len() - t,
            "UDP length of the whole"
        );
        if !v6 {
            assert!(ipv4_checksum_ok(packet));
        }
        // The checksum field holds the pseudo-header sum for the whole length (NEEDS_CSUM).
        let addrs = if v6 { &packet[8..40] } else { &packet[12..20] };
        let want = naive_fold(naive_sum(addrs) + 17 + u32::from(udp_len));
        assert_eq!(&packet[t + 6..t + 8], &want.to_be_bytes());
        // What the kernel does with it for a socket without UDP_GRO: the datagrams again.
        assert_eq!(split_all(&out[0]).unwrap(), datagrams, "v6={v6}");
    }
}

#[test]
fn udp_datagrams_pass_alone_unless_the_tun_takes_udp_super_packets() {
    let datagrams = udp_run(false, &[1000, 1000, 1000]);
    let out = coalesce_all_with(&datagrams, false);
    let alone: Vec<&[u8]> = out.iter().map(|o| &o[HDR_LEN..]).collect();
    assert_eq!(alone, datagrams.iter().map(|d| &d[..]).collect::<Vec<_>>());
}

#[test]
fn udp_datagrams_join_only_as_the_kernels_gro_would() {
    let counts = |input: &[Vec<u8>]| segment_counts(&coalesce_all_with(input, true));
    // A shorter datagram ends the super-packet; a longer one after it starts a new one.
    assert_eq!(
        counts(&udp_run(false, &[1000, 1000, 500, 1000, 1000])),
        [3, 2]
    );
    // Another source port is another flow, joined on its own.
    let mut two_flows = Vec::new();
    for i in 0..3u16 {
        two_flows.push(udp_datagram(false, 1, i, &payload(800, 1)));
        two_flows.push(udp_datagram(false, 2, i, &payload(800, 2)));
    }
    assert_eq!(counts(&two_flows), [3, 3]);
    // A corrupt checksum, an IPv6 datagram without a checksum, a fragment: alone, in order.
    let mut corrupt = udp_run(false, &[1000, 1000, 1000]);
    corrupt[1][40] ^= 1;
    assert_eq!(counts(&corrupt), [1, 1, 1]);
    let mut unchecked_v6 = udp_run(true, &[1000, 1000]);
    for d in &mut unchecked_v6 {
        d[46..48].fill(0);
    }
    assert_eq!(counts(&unchecked_v6), [1, 1]);
    let mut fragment = udp_run(false, &[1000, 1000, 1000]);
    fragment[2][6] |= 0x20; // more fragments
    let c = !naive_fold(naive_sum(&{
        let mut h = fragment[2][..20].to_vec();
        h[10..12].fill(0);
        h
    }));
    fragment[2][10..12].copy_from_slice(&c.to_be_bytes());
    assert_eq!(counts(&fragment), [2, 1]);
    // IPv4 without a checksum (0: none) joins; a different TTL does not.
    let mut unchecked = udp_run(false, &[1000, 1000]);
    for d in &mut unchecked {
        d[26..28].fill(0);
    }
    assert_eq!(counts(&unchecked), [2]);
    let out = coalesce_all_with(&unchecked, true);
    let resplit = split_all(&out[0]).unwrap();
    assert!(
        resplit.iter().all(|d| l4_checksum_ok(d)),
        "the kernel fills checksums in"
    );
    let mut ttl = udp_run(false, &[1000, 1000]);
    ttl[1][8] = 1;
    assert_eq!(counts(&ttl), [1, 1]);
}

#[test]
fn a_udp_super_packet_holds_at_most_64_datagrams_and_64_kib() {
    let many = udp_run(false, &[200; 150]);
    assert_eq!(
        segment_counts(&coalesce_all_with(&many, true)),
        [coalesce::MAX_UDP_SEGMENTS, coalesce::MAX_UDP_SEGMENTS, 22]
    );
    let big = udp_run(true, &[1400; 60]);
    let out = coalesce_all_with(&big, true);
    assert!(out.iter().all(|o| o.len() - HDR_LEN <= 65535));
    assert_eq!(segment_counts(&out)[0], (65535 - 48) / 1400);
    assert_eq!(segment_counts(&out).iter().sum::<usize>(), 60);
}

#[test]
fn truncated_or_corrupted_udp_datagrams_are_written_alone_not_panicked_on() {
    let good = udp_run(true, &[600, 600]);
    for len in 0..good[1].len() {
        let input = vec![good[0].clone(), good[1][..len].to_vec()];
        let out = coalesce_all_with(&input, true);
        assert_eq!(out.len(), 2, "a datagram cut to {len} bytes joined");
    }
    // Any byte flipped in the second breaks its checksum, length or shape: never joined.
    for i in 0..good[1].len() {
        let mut bad = good.clone();
        bad[1][i] ^= 0xff;
        let out = coalesce_all_with(&bad, true);
        assert_eq!(out.len(), 2, "byte {i} flipped, yet joined");
        assert_eq!(&out[1][HDR_LEN..], &bad[1][..], "byte {i} flipped: changed");
    }
}
