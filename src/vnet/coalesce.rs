//! GRO for the TUN write: decrypted TCP segments that continue one another in one flow are
//! joined into a super-packet the kernel takes in one write (and segments again only if it
//! forwards it or a socket wants single datagrams). With [`Coalescer::set_udp`] (a TUN with USO,
//! Linux 6.2 and later) back-to-back UDP datagrams of one flow are joined the same way. Everything
//! else is written as it came, in arrival order.
//!
//! Segments join only when the kernel's own GRO would join them: same addresses, ports and IP
//! fields; for TCP the same ACK, window and options, flags ACK (PSH only on the last) and
//! contiguous sequence numbers; for UDP at most [`MAX_UDP_SEGMENTS`] datagrams; the same payload
//! size except a smaller last one; a valid checksum (the super-packet's checksum is recomputed by
//! the kernel, so a corrupt segment must not hide in it).

use super::checksum::{fold, pseudo_header_sum, sum_words};
use super::header::{VnetHeader, HDR_LEN};
use super::{set_ip_header, tcp_layout, TCP, UDP};

/// Packets held before the engine must write them out. Bytes bind first for full-size
/// segments (about 200 of 1280 bytes), so most writes are whole 64 KiB super-packets.
pub const MAX_PACKETS: usize = 256;
/// Most parts an [`Output`] has: its virtio-net header and one per packet.
pub const MAX_PARTS: usize = MAX_PACKETS + 1;
/// Bytes held before the engine must write them out.
const MAX_BYTES: usize = 256 * 1024;
/// An IP packet's length field is 16 bits.
const MAX_PACKET: usize = 65535;
/// Datagrams in one UDP super-packet at most: Linux's own UDP GRO stops at 64
/// (`UDP_GRO_CNT_MAX`), and its virtio-net header check allows no more than 128 segments.
pub const MAX_UDP_SEGMENTS: usize = 64;
const UDP_HEADER: usize = 8;

const ACK: u8 = 0x10;
const PSH: u8 = 0x08;

/// Packets waiting for the TUN, grouped into super-packets as they arrive. Its buffers are kept
/// from batch to batch: no allocation per packet once warm.
#[derive(Default)]
pub struct Coalescer {
    arena: Vec<u8>,
    packets: Vec<Pending>,
    groups: Vec<Group>,
    /// The next group [`Coalescer::next_output`] returns.
    cursor: usize,
    /// Whether UDP datagrams are joined too (the TUN takes UDP super-packets).
    udp: bool,
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    start: usize,
    len: usize,
    /// Set when the packet may join (or start) a super-packet.
    segment: Option<Segment>,
    /// The next packet of the same group.
    next: Option<usize>,
}

#[derive(Debug, Clone, Copy)]
struct Segment {
    v6: bool,
    ip_len: usize,
    /// The TCP header's length, or the UDP header's (8).
    l4_len: usize,
    payload: usize,
    kind: Kind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Tcp { seq: u32, psh: bool },
    Udp,
}

impl Segment {
    /// Whether a packet may follow this one in its group (TCP: not after PSH).
    fn may_be_followed(&self) -> bool {
        !matches!(self.kind, Kind::Tcp { psh: true, .. })
    }

    /// The sequence number the next TCP segment must have (0 for UDP: unused).
    fn next_seq(&self) -> u32 {
        match self.kind {
            Kind::Tcp { seq, .. } => seq.wrapping_add(self.payload as u32),
            Kind::Udp => 0,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Group {
    first: usize,
    last: usize,
    count: usize,
    next_seq: u32,
    segment_size: usize,
    /// Header and payload bytes of the joined packet.
    len: usize,
    /// Whether another segment may still join.
    open: bool,
}

impl Coalescer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Joins UDP datagrams too from now on; only for a TUN that takes UDP super-packets (USO).
    pub fn set_udp(&mut self, on: bool) {
        self.udp = on;
    }

    /// Nothing waiting.
    pub fn is_empty(&self) -> bool {
        self.cursor >= self.groups.len()
    }

    /// Enough is waiting that it should be written out before more is pushed.
    pub fn is_full(&self) -> bool {
        self.packets.len() >= MAX_PACKETS || self.arena.len() >= MAX_BYTES
    }

    /// Packets pushed since the last time everything was written.
    pub fn pending(&self) -> usize {
        self.packets.len()
    }

    /// Takes a copy of `packet` (one IP packet) for the next write.
    pub fn push(&mut self, packet: &[u8]) {
        let index = self.packets.len();
        let segment = coalescible(packet, self.udp);
        self.packets.push(Pending {
            start: self.arena.len(),
            len: packet.len(),
            segment,
            next: None,
        });
        self.arena.extend_from_slice(packet);
        let open = self.open_group_of(packet);
        if let (Some(seg), Some(g)) = (segment, open) {
            if self.try_append(g, index, &seg) {
                return;
            }
        }
        // What follows a packet that did not join must not be written before it.
        if let Some(g) = open {
            self.groups[g].open = false;
        }
        self.groups.push(Group {
            first: index,
            last: index,
            count: 1,
            next_seq: segment.map_or(0, |s| s.next_seq()),
            segment_size: segment.map_or(0, |s| s.payload),
            len: packet.len(),
            open: segment.is_some_and(|s| s.may_be_followed()),
        });
    }

    /// The next packet to write to the TUN (in parts, virtio-net header first, so that a
    /// super-packet is written with one `writev` and never copied together); `None` once all
    /// are out, and the coalescer is empty again.
    pub fn next_output(&mut self) -> Option<Output<'_>> {
        let Some(group) = self.groups.get(self.cursor).copied() else {
            self.clear();
            return None;
        };
        // Written out: nothing may join it any more.
        self.groups[self.cursor].open = false;
        self.cursor += 1;
        let header = match self.packets[group.first].segment {
            Some(seg) if group.count > 1 => self.fix_super_packet(&group, &seg),
            _ => VnetHeader::default(),
        };
        Some(Output {
            header: header.encode(),
            coalescer: self,
            group,
        })
    }

    fn clear(&mut self) {
        self.arena.clear();
        self.packets.clear();
        self.groups.clear();
        self.cursor = 0;
    }

    fn bytes(&self, index: usize) -> &[u8] {
        let p = &self.packets[index];
        &self.arena[p.start..p.start + p.len]
    }

    /// The open group of the flow `packet` belongs to (searched newest first).
    fn open_group_of(&self, packet: &[u8]) -> Option<usize> {
        let flow = flow_of(packet)?;
        (0..self.groups.len()).rev().find(|&g| {
            self.groups[g].open && flow_of(self.bytes(self.groups[g].first)) == Some(flow)
        })
    }

    fn try_append(&mut self, g: usize, index: usize, seg: &Segment) -> bool {
        let group = self.groups[g];
        let continues = match seg.kind {
            Kind::Tcp { seq, .. } => seq == group.next_seq,
            Kind::Udp => group.count < MAX_UDP_SEGMENTS,
        };
        let joins = continues
            && seg.payload <= group.segment_size
            && group.len + seg.payload <= MAX_PACKET
            && same_shape(self.bytes(group.first), self.bytes(index), seg);
        if !joins {
            return false;
        }
        self.packets[group.last].next = Some(index);
        let group = &mut self.groups[g];
        group.last = index;
        group.count += 1;
        group.next_seq = seg.next_seq();
        group.len += seg.payload;
        group.open = seg.payload == group.segment_size
            && seg.may_be_followed()
            && (seg.kind != Kind::Udp || group.count < MAX_UDP_SEGMENTS);
        true
    }

    /// Makes the group's first packet the head of its super-packet, in place: lengths and IPv4
    /// checksum for the joined size, for TCP PSH if any segment had it, and the TCP or UDP
    /// checksum field holding the pseudo-header sum (NEEDS_CSUM: the kernel adds the rest).
    fn fix_super_packet(&mut self, group: &Group, seg: &Segment) -> VnetHeader {
        let push = seg.kind != Kind::Udp && self.any_push(group);
        let start = self.packets[group.first].start;
        let (t, len) = (seg.ip_len, group.len);
        let head = &mut self.arena[start..start + t + seg.l4_len];
        // A group never grows past MAX_PACKET, so the lengths fit.
        let _ = set_ip_header(head, seg.v6, t, len, None);
        let (protocol, field) = match seg.kind {
            Kind::Tcp { .. } => (TCP, t + 16),
            Kind::Udp => (UDP, t + 6),
        };
        if push {
            head[t + 13] |= PSH;
        }
        if seg.kind == Kind::Udp {
            head[t + 4..t + 6].copy_from_slice(&((len - t) as u16).to_be_bytes());
        }
        let partial = fold(pseudo_header_sum(head, seg.v6, protocol, len - t));
        head[field..field + 2].copy_from_slice(&partial.to_be_bytes());
        match seg.kind {
            Kind::Tcp { .. } => {
                VnetHeader::tcp_super_packet(seg.v6, t, seg.l4_len, group.segment_size)
            }
            Kind::Udp => VnetHeader::udp_super_packet(t, group.segment_size),
        }
    }

    /// Whether any TCP segment of the group had PSH.
    fn any_push(&self, group: &Group) -> bool {
        let mut next = Some(group.first);
        while let Some(index) = next {
            let p = self.packets[index];
            if p.segment
                .is_some_and(|s| matches!(s.kind, Kind::Tcp { psh: true, .. }))
            {
                return true;
            }
            next = p.next;
        }
        false
    }
}

/// One write for the TUN: a virtio-net header, then a packet as it came or a super-packet made
/// of the first segment whole and the payload of the others.
pub struct Output<'a> {
    header: [u8; HDR_LEN],
    coalescer: &'a Coalescer,
    group: Group,
}

impl Output<'_> {
    /// Whether it joins several segments.
    pub fn joined(&self) -> bool {
        self.group.count > 1
    }

    /// Whether it joins several UDP datagrams.
    pub fn joined_udp(&self) -> bool {
        self.joined()
            && self.coalescer.packets[self.group.first]
                .segment
                .is_some_and(|s| s.kind == Kind::Udp)
    }

    /// The bytes to write, in order: at most [`MAX_PARTS`] pieces.
    pub fn parts(&self) -> impl Iterator<Item = &[u8]> {
        let c = self.coalescer;
        let headers = c.packets[self.group.first]
            .segment
            .map_or(0, |s| s.ip_len + s.l4_len);
        let first = self.group.first;
        let packets = std::iter::successors(Some(first), |&i| c.packets[i].next).map(move |i| {
            let p = c.packets[i];
            let from = if i == first { 0 } else { headers };
            &c.arena[p.start + from..p.start + p.len]
        });
        std::iter::once(&self.header[..]).chain(packets)
    }

    /// The whole frame in one buffer (tests and benches; the engine writes the parts).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut frame = Vec::with_capacity(HDR_LEN + self.group.len);
        for part in self.parts() {
            frame.extend_from_slice(part);
        }
        frame
    }
}

/// A packet that may be joined to others: a TCP data segment ([`tcp_segment`]) or, when `udp`,
/// a UDP datagram ([`udp_datagram`]); IPv4 without options or fragmentation, or IPv6 without
/// extension headers; a payload; a valid checksum.
fn coalescible(packet: &[u8], udp: bool) -> Option<Segment> {
    let v6 = match packet.first()? >> 4 {
        4 => false,
        6 => true,
        _ => return None,
    };
    let protocol = if v6 { *packet.get(6)? } else { *packet.get(9)? };
    match protocol {
        TCP => tcp_segment(packet, v6),
        UDP if udp => udp_datagram(packet, v6),
        _ => None,
    }
}

/// Whether the IP header is one a super-packet can repeat: IPv4 of 20 bytes, not a fragment,
/// or IPv6 (the caller checked the next header); and its length field covers exactly `packet`.
fn plain_ip(packet: &[u8], v6: bool) -> bool {
    if v6 {
        return packet.len() >= 40
            && usize::from(u16::from_be_bytes([packet[4], packet[5]])) + 40 == packet.len();
    }
    packet.len() >= 20
        && packet[0] & 0x0f == 5
        && u16::from_be_bytes([packet[6], packet[7]]) & 0x3fff == 0
        && usize::from(u16::from_be_bytes([packet[2], packet[3]])) == packet.len()
}

/// Whether the TCP or UDP checksum of the L4 part from `t` is right.
fn checksum_ok(packet: &[u8], v6: bool, protocol: u8, t: usize) -> bool {
    let pseudo = pseudo_header_sum(packet, v6, protocol, packet.len() - t);
    fold(sum_words(pseudo, &packet[t..])) == 0xffff
}

/// A TCP segment with flags ACK (and PSH) and a payload.
fn tcp_segment(packet: &[u8], v6: bool) -> Option<Segment> {
    let layout = tcp_layout(packet, v6).ok()?;
    let t = layout.ip_len;
    let flags = packet[t + 13];
    let payload = packet.len() - t - layout.tcp_len;
    if !plain_ip(packet, v6) || flags & !PSH != ACK || payload == 0 {
        return None;
    }
    if !checksum_ok(packet, v6, TCP, t) {
        return None;
    }
    Some(Segment {
        v6,
        ip_len: t,
        l4_len: layout.tcp_len,
        payload,
        kind: Kind::Tcp {
            seq: u32::from_be_bytes([packet[t + 4], packet[t + 5], packet[t + 6], packet[t + 7]]),
            psh: flags & PSH != 0,
        },
    })
}

/// A UDP datagram with a payload whose length field agrees with the IP header's. An IPv4
/// checksum of 0 means "none" (nothing to check); IPv6 requires one.
fn udp_datagram(packet: &[u8], v6: bool) -> Option<Segment> {
    let t = if v6 { 40 } else { 20 };
    if !plain_ip(packet, v6) || packet.len() <= t + UDP_HEADER {
        return None;
    }
    let udp_len = usize::from(u16::from_be_bytes([packet[t + 4], packet[t + 5]]));
    let checksum = u16::from_be_bytes([packet[t + 6], packet[t + 7]]);
    if udp_len != packet.len() - t || (checksum == 0 && v6) {
        return None;
    }
    if checksum != 0 && !checksum_ok(packet, v6, UDP, t) {
        return None;
    }
    Some(Segment {
        v6,
        ip_len: t,
        l4_len: UDP_HEADER,
        payload: packet.len() - t - UDP_HEADER,
        kind: Kind::Udp,
    })
}

/// Protocol, addresses and ports of a TCP or UDP packet (any IPv4 IHL, not a later fragment;
/// IPv6 without extension headers).
fn flow_of(packet: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (ip_len, protocol, addrs) = match packet.first()? >> 4 {
        6 if packet.len() >= 40 => (40, packet[6], &packet[8..40]),
        4 if packet.len() >= 20 => {
            if u16::from_be_bytes([packet[6], packet[7]]) & 0x1fff != 0 {
                return None; // no ports in a later fragment
            }
            (
                usize::from(packet[0] & 0x0f) * 4,
                packet[9],
                &packet[12..20],
            )
        }
        _ => return None,
    };
    if protocol != TCP && protocol != UDP {
        return None;
    }
    Some((protocol, addrs, packet.get(ip_len..ip_len + 4)?))
}

/// Whether `b` can ride in `a`'s header: the IP fields the kernel compares and, for TCP, the
/// ACK, header length, flags but PSH, window and options.
fn same_shape(a: &[u8], b: &[u8], seg: &Segment) -> bool {
    let ip = if seg.v6 {
        a[..4] == b[..4] && a[7] == b[7]
    } else {
        a[..2] == b[..2] && a[6] & 0x40 == b[6] & 0x40 && a[8] == b[8]
    };
    if seg.kind == Kind::Udp {
        return ip;
    }
    let t = seg.ip_len;
    // Equal data offsets first: then both TCP headers have `seg.l4_len` bytes.
    if a.get(t + 12) != b.get(t + 12) {
        return false;
    }
    let a_tcp = &a[t..t + seg.l4_len];
    let b_tcp = b.get(t..t + seg.l4_len);
    ip && b_tcp.is_some_and(|b_tcp| {
        a_tcp[8..13] == b_tcp[8..13]
            && a_tcp[13] & !PSH == b_tcp[13] & !PSH
            && a_tcp[14..16] == b_tcp[14..16]
            && a_tcp[20..] == b_tcp[20..]
    })
}
