//! The virtio-net header (`struct virtio_net_hdr`, 10 bytes) in the host's byte order, which is
//! what a TUN uses unless told otherwise (TUNSETVNETLE/BE).

use super::VnetError;

/// Length of the header in front of every packet.
pub const HDR_LEN: usize = 10;

/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: the L4 checksum is to be completed from `csum_start`.
pub const F_NEEDS_CSUM: u8 = 1;

const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;
/// `VIRTIO_NET_HDR_GSO_UDP_L4`: UDP segmentation (USO), IPv4 or IPv6 alike.
const GSO_UDP_L4: u8 = 5;
/// `VIRTIO_NET_HDR_GSO_ECN`: a flag on the GSO type (the segments carry ECN's CWR).
const GSO_ECN: u8 = 0x80;

/// What kind of super-packet follows the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GsoType {
    /// One ordinary packet.
    None,
    TcpV4,
    TcpV6,
    /// UDP datagrams of `gso_size` payload bytes each (the last may be shorter).
    UdpL4,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VnetHeader {
    pub flags: u8,
    pub gso_type: u8,
    /// Length of the IP and TCP headers of a super-packet.
    pub hdr_len: u16,
    /// Payload bytes per segment.
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VnetHeader {
    pub fn decode(bytes: &[u8]) -> Result<Self, VnetError> {
        let b = bytes.get(..HDR_LEN).ok_or(VnetError::ShortHeader)?;
        let u16_at = |i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
        Ok(VnetHeader {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
        })
    }

    pub fn encode(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_ne_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_ne_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_ne_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_ne_bytes());
        b
    }

    /// The kind of packet, with the ECN flag ignored (segmentation clears CWR after the first
    /// segment either way).
    pub fn gso(&self) -> Result<GsoType, VnetError> {
        match self.gso_type & !GSO_ECN {
            GSO_NONE => Ok(GsoType::None),
            GSO_TCPV4 => Ok(GsoType::TcpV4),
            GSO_TCPV6 => Ok(GsoType::TcpV6),
            GSO_UDP_L4 => Ok(GsoType::UdpL4),
            other => Err(VnetError::UnsupportedGso(other)),
        }
    }

    /// The header of a TCP super-packet whose checksum field holds the pseudo-header sum.
    pub fn tcp_super_packet(v6: bool, ip_len: usize, tcp_len: usize, segment: usize) -> Self {
        VnetHeader {
            flags: F_NEEDS_CSUM,
            gso_type: if v6 { GSO_TCPV6 } else { GSO_TCPV4 },
            hdr_len: (ip_len + tcp_len) as u16,
            gso_size: segment as u16,
            csum_start: ip_len as u16,
            csum_offset: 16,
        }
    }

    /// The header of a UDP super-packet (IPv4 or IPv6 alike) whose checksum field holds the
    /// pseudo-header sum.
    pub fn udp_super_packet(ip_len: usize, segment: usize) -> Self {
        VnetHeader {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_UDP_L4,
            hdr_len: (ip_len + 8) as u16,
            gso_size: segment as u16,
            csum_start: ip_len as u16,
            csum_offset: 6,
        }
    }
}
