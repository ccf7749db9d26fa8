//! Reads from a TUN with offloads: a checksum the kernel left for us to finish, or a TCP
//! super-packet (TSO) or UDP one (USO) to cut into packets of the size the kernel asked for.

use super::checksum::{fold, pseudo_header_sum, sum_words};
use super::header::{GsoType, VnetHeader, F_NEEDS_CSUM, HDR_LEN};
use super::{set_ip_header, tcp_layout, TcpLayout, VnetError, TCP, UDP};

const FIN: u8 = 0x01;
const PSH: u8 = 0x08;
const CWR: u8 = 0x80;
/// Longest IP + TCP headers: IPv4 with options (60) and TCP with options (60).
const MAX_HEADERS: usize = 120;
/// Offset of the checksum in a UDP header: a computed 0 is sent as 0xffff (0 means "none").
const UDP_CSUM_OFFSET: u16 = 6;
const UDP_HEADER: usize = 8;

/// Takes apart what one read of a vnet TUN returned (`frame`: header, then the packet): finishes
/// a partial checksum, or cuts a TCP or UDP super-packet into packets of `gso_size` payload bytes.
/// `emit` gets each resulting packet in order. Works in place: the frame is overwritten (each
/// segment's headers are written just in front of its payload, over what was already emitted).
pub fn split(frame: &mut [u8], mut emit: impl FnMut(&[u8])) -> Result<Split, VnetError> {
    let header = VnetHeader::decode(frame)?;
    let packet = frame.get_mut(HDR_LEN..).ok_or(VnetError::ShortHeader)?;
    let gso = header.gso()?;
    let packets = match gso {
        GsoType::None => {
            if header.flags & F_NEEDS_CSUM != 0 {
                complete_checksum(packet, &header)?;
            }
            emit(packet);
            1
        }
        GsoType::TcpV4 => segment_tcp(packet, false, &header, emit)?,
        GsoType::TcpV6 => segment_tcp(packet, true, &header, emit)?,
        GsoType::UdpL4 => segment_udp(packet, &header, emit)?,
    };
    Ok(Split { gso, packets })
}

/// What [`split`] made of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Split {
    /// What the frame's header said it held.
    pub gso: GsoType,
    /// How many packets were emitted.
    pub packets: usize,
}

/// The checksum field already holds the pseudo-header sum, so summing the range from
/// `csum_start` with the field in place gives the final checksum.
fn complete_checksum(packet: &mut [u8], header: &VnetHeader) -> Result<(), VnetError> {
    let start = usize::from(header.csum_start);
    let field = start + usize::from(header.csum_offset);
    if field + 2 > packet.len() {
        return Err(VnetError::BadChecksumOffsets);
    }
    let mut checksum = !fold(sum_words(0, &packet[start..]));
    if checksum == 0 && header.csum_offset == UDP_CSUM_OFFSET {
        checksum = 0xffff;
    }
    packet[field..field + 2].copy_from_slice(&checksum.to_be_bytes());
    Ok(())
}

fn segment_tcp(
    packet: &mut [u8],
    v6: bool,
    header: &VnetHeader,
    emit: impl FnMut(&[u8]),
) -> Result<usize, VnetError> {
    let layout = tcp_layout(packet, v6)?;
    let first_id = u16::from_be_bytes([packet[4], packet[5]]);
    let t = layout.ip_len;
    let first_seq =
        u32::from_be_bytes([packet[t + 4], packet[t + 5], packet[t + 6], packet[t + 7]]);
    let fix = |seg: &mut [u8], cut: Cut| {
        let id = first_id.wrapping_add(cut.index as u16);
        let seq = first_seq.wrapping_add(cut.offset as u32);
        fix_segment(seg, &layout, cut, id, seq)
    };
    cut_super_packet(packet, t + layout.tcp_len, header.gso_size, fix, emit)
}

/// Where one packet cut from a super-packet lies in it.
#[derive(Debug, Clone, Copy)]
struct Cut {
    /// Its place among the packets (0 for the first).
    index: usize,
    /// Where its payload starts in the super-packet's payload.
    offset: usize,
    last: bool,
}

/// Cuts `packet` (`headers` bytes of headers, then the payload) into packets of `gso_size`
/// payload bytes (the last may be shorter), in place: each gets a copy of the original headers
/// right before its payload, `fix` makes it a packet of its own, `emit` gets it. Returns how
/// many there were.
fn cut_super_packet(
    packet: &mut [u8],
    headers: usize,
    gso_size: u16,
    mut fix: impl FnMut(&mut [u8], Cut) -> Result<(), VnetError>,
    mut emit: impl FnMut(&[u8]),
) -> Result<usize, VnetError> {
    let segment = usize::from(gso_size);
    if segment == 0 {
        return Err(VnetError::ZeroSegment);
    }
    // At most 60 + 60 bytes (IPv4 and TCP with all options); kept, as the frame is overwritten.
    let mut original = [0u8; MAX_HEADERS];
    let original = original.get_mut(..headers).ok_or(VnetError::BadHeaders)?;
    original.copy_from_slice(packet.get(..headers).ok_or(VnetError::BadHeaders)?);
    let payload_len = packet.len() - headers;
    let (mut offset, mut index) = (0, 0);
    loop {
        let end = (offset + segment).min(payload_len);
        let last = end == payload_len;
        // The packet's payload lies at `headers + offset`; its headers go right before it.
        let piece = &mut packet[offset..headers + end];
        piece[..headers].copy_from_slice(original);
        fix(
            piece,
            Cut {
                index,
                offset,
                last,
            },
        )?;
        emit(piece);
        index += 1;
        offset = end;
        if last {
            return Ok(index);
        }
    }
}

/// Makes one segment a packet of its own: lengths, IPv4 ID and header checksum, sequence
/// number, flags that belong only to the first (CWR) or last (FIN, PSH) segment, TCP checksum.
fn fix_segment(
    seg: &mut [u8],
    layout: &TcpLayout,
    cut: Cut,
    id: u16,
    seq: u32,
) -> Result<(), VnetError> {
    let len = seg.len();
    let t = layout.ip_len;
    set_ip_header(seg, layout.v6, t, len, Some(id))?;
    seg[t + 4..t + 8].copy_from_slice(&seq.to_be_bytes());
    if !cut.last {
        seg[t + 13] &= !(FIN | PSH);
    }
    if cut.index > 0 {
        seg[t + 13] &= !CWR;
    }
    seg[t + 16..t + 18].fill(0);
    let pseudo = pseudo_header_sum(seg, layout.v6, TCP, len - t);
    let checksum = !fold(sum_words(pseudo, &seg[t..]));
    seg[t + 16..t + 18].copy_from_slice(&checksum.to_be_bytes());
    Ok(())
}

/// Cuts a UDP super-packet into datagrams of `gso_size` payload bytes (the last may be shorter),
/// each with its own IP and UDP header: lengths, IPv4 ID and header checksum, UDP checksum.
fn segment_udp(
    packet: &mut [u8],
    header: &VnetHeader,
    emit: impl FnMut(&[u8]),
) -> Result<usize, VnetError> {
    let (v6, ip_len) = udp_layout(packet)?;
    let first_id = u16::from_be_bytes([packet[4], packet[5]]);
    let fix = |datagram: &mut [u8], cut: Cut| {
        fix_datagram(
            datagram,
            v6,
            ip_len,
            first_id.wrapping_add(cut.index as u16),
        )
    };
    cut_super_packet(packet, ip_len + UDP_HEADER, header.gso_size, fix, emit)
}

/// Whether the packet is UDP directly in IPv4 (any IHL, not a fragment) or IPv6 (no extension
/// headers) with a whole UDP header, and its IP header length.
fn udp_layout(packet: &[u8]) -> Result<(bool, usize), VnetError> {
    let (v6, ip_len, protocol) = match packet.first().map(|b| b >> 4) {
        Some(6) if packet.len() >= 40 => (true, 40, packet[6]),
        Some(4) if packet.len() >= 20 => {
            let fragment = u16::from_be_bytes([packet[6], packet[7]]) & 0x3fff;
            if fragment != 0 {
                return Err(VnetError::NotUdp);
            }
            (false, usize::from(packet[0] & 0x0f) * 4, packet[9])
        }
        _ => return Err(VnetError::NotUdp),
    };
    if protocol != UDP || ip_len < 20 || ip_len + UDP_HEADER > packet.len() {
        return Err(VnetError::NotUdp);
    }
    Ok((v6, ip_len))
}

/// Makes one datagram of a UDP super-packet a packet of its own.
fn fix_datagram(datagram: &mut [u8], v6: bool, ip_len: usize, id: u16) -> Result<(), VnetError> {
    let len = datagram.len();
    set_ip_header(datagram, v6, ip_len, len, Some(id))?;
    let udp_len = u16::try_from(len - ip_len).map_err(|_| VnetError::BadHeaders)?;
    let u = ip_len;
    datagram[u + 4..u + 6].copy_from_slice(&udp_len.to_be_bytes());
    datagram[u + 6..u + 8].fill(0);
    let pseudo = pseudo_header_sum(datagram, v6, UDP, usize::from(udp_len));
    let checksum = match !fold(sum_words(pseudo, &datagram[u..])) {
        0 => 0xffff,
        c => c,
    };
    datagram[u + 6..u + 8].copy_from_slice(&checksum.to_be_bytes());
    Ok(())
}
