//! GRO for the TUN write: decrypted TCP segments that continue one another in one flow are
//! joined into a super-packet the kernel takes in one write (and segments again only if it
//! forwards it). Everything else is written as it came, in arrival order.
//!
//! Segments join only when the kernel's own GRO would join them: same addresses, ports, ACK,
//! window, options and IP fields; flags ACK (PSH only on the last); contiguous sequence numbers;
//! the same payload size except a smaller last one; a valid checksum (the super-packet's
//! checksum is recomputed by the kernel, so a corrupt segment must not hide in it).

use super::checksum::{fold, pseudo_header_sum, sum_words};
use super::header::{VnetHeader, HDR_LEN};
use super::{set_ip_header, tcp_layout, TCP};

/// Packets held before the engine must write them out. Bytes bind first for full-size
/// segments (about 200 of 1280 bytes), so most writes are whole 64 KiB super-packets.
pub const MAX_PACKETS: usize = 256;
/// Most parts an [`Output`] has: its virtio-net header and one per packet.
pub const MAX_PARTS: usize = MAX_PACKETS + 1;
/// Bytes held before the engine must write them out.
const MAX_BYTES: usize = 256 * 1024;
/// An IP packet's length field is 16 bits.
const MAX_PACKET: usize = 65535;

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
    tcp_len: usize,
    seq: u32,
    payload: usize,
    psh: bool,
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
        let segment = coalescible(packet);
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
            next_seq: segment.map_or(0, |s| s.seq.wrapping_add(s.payload as u32)),
            segment_size: segment.map_or(0, |s| s.payload),
            len: packet.len(),
            open: segment.is_some_and(|s| !s.psh),
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
        let joins = seg.seq == group.next_seq
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
        group.next_seq = seg.seq.wrapping_add(seg.payload as u32);
        group.len += seg.payload;
        group.open = seg.payload == group.segment_size && !seg.psh;
        true
    }

    /// Makes the group's first packet the head of its super-packet, in place: lengths and IPv4
    /// checksum for the joined size, PSH if any segment had it, and the TCP checksum field
    /// holding the pseudo-header sum (NEEDS_CSUM: the kernel adds the rest).
    fn fix_super_packet(&mut self, group: &Group, seg: &Segment) -> VnetHeader {
        let mut push = false;
        let mut next = Some(group.first);
        while let Some(index) = next {
            let p = self.packets[index];
            push |= p.segment.is_some_and(|s| s.psh);
            next = p.next;
        }
        let start = self.packets[group.first].start;
        let (t, len) = (seg.ip_len, group.len);
        let head = &mut self.arena[start..start + t + seg.tcp_len];
        // A group never grows past MAX_PACKET, so the lengths fit.
        let _ = set_ip_header(head, seg.v6, t, len, None);
        if push {
            head[t + 13] |= PSH;
        }
        let partial = fold(pseudo_header_sum(head, seg.v6, TCP, len - t));
        head[t + 16..t + 18].copy_from_slice(&partial.to_be_bytes());
        VnetHeader::tcp_super_packet(seg.v6, t, seg.tcp_len, group.segment_size)
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

    /// The bytes to write, in order: at most [`MAX_PARTS`] pieces.
    pub fn parts(&self) -> impl Iterator<Item = &[u8]> {
        let c = self.coalescer;
        let headers = c.packets[self.group.first]
            .segment
            .map_or(0, |s| s.ip_len + s.tcp_len);
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

/// A TCP data segment that may be joined to others: IPv4 without options or fragmentation, or
/// IPv6 without extension headers; flags ACK (and PSH); a payload; a valid checksum.
fn coalescible(packet: &[u8]) -> Option<Segment> {
    let v6 = match packet.first()? >> 4 {
        4 => false,
        6 => true,
        _ => return None,
    };
    let layout = tcp_layout(packet, v6).ok()?;
    let consistent = if v6 {
        usize::from(u16::from_be_bytes([packet[4], packet[5]])) + 40 == packet.len()
    } else {
        let fragment = u16::from_be_bytes([packet[6], packet[7]]) & 0x3fff;
        layout.ip_len == 20
            && fragment == 0
            && usize::from(u16::from_be_bytes([packet[2], packet[3]])) == packet.len()
    };
    let t = layout.ip_len;
    let flags = packet[t + 13];
    let payload = packet.len() - t - layout.tcp_len;
    if !consistent || flags & !PSH != ACK || payload == 0 {
        return None;
    }
    let pseudo = pseudo_header_sum(packet, v6, TCP, packet.len() - t);
    if fold(sum_words(pseudo, &packet[t..])) != 0xffff {
        return None;
    }
    Some(Segment {
        v6,
        ip_len: t,
        tcp_len: layout.tcp_len,
        seq: u32::from_be_bytes([packet[t + 4], packet[t + 5], packet[t + 6], packet[t + 7]]),
        payload,
        psh: flags & PSH != 0,
    })
}

/// Addresses and ports of a TCP packet (any IPv4 IHL; IPv6 without extension headers).
fn flow_of(packet: &[u8]) -> Option<(&[u8], &[u8])> {
    let v6 = packet.first()? >> 4 == 6;
    let layout = tcp_layout(packet, v6).ok()?;
    let addrs = if v6 { &packet[8..40] } else { &packet[12..20] };
    Some((addrs, &packet[layout.ip_len..layout.ip_len + 4]))
}

/// Whether `b` can ride in `a`'s header: the IP fields the kernel compares, and the TCP ACK,
/// header length, flags but PSH, window and options.
fn same_shape(a: &[u8], b: &[u8], seg: &Segment) -> bool {
    let ip = if seg.v6 {
        a[..4] == b[..4] && a[7] == b[7]
    } else {
        a[..2] == b[..2] && a[6] & 0x40 == b[6] & 0x40 && a[8] == b[8]
    };
    let t = seg.ip_len;
    // Equal data offsets first: then both TCP headers have `seg.tcp_len` bytes.
    if a.get(t + 12) != b.get(t + 12) {
        return false;
    }
    let a_tcp = &a[t..t + seg.tcp_len];
    let b_tcp = b.get(t..t + seg.tcp_len);
    ip && b_tcp.is_some_and(|b_tcp| {
        a_tcp[8..13] == b_tcp[8..13]
            && a_tcp[13] & !PSH == b_tcp[13] & !PSH
            && a_tcp[14..16] == b_tcp[14..16]
            && a_tcp[20..] == b_tcp[20..]
    })
}
