//! TUN offloads (Linux `IFF_VNET_HDR`): every packet that crosses a TUN opened this way carries a
//! virtio-net header. With TSO enabled the kernel hands us TCP super-packets of up to 64 KiB that
//! [`split`] cuts into MTU-sized packets for WireGuard (with USO, Linux 6.2 and later, also UDP
//! super-packets from senders that use `UDP_SEGMENT`, such as QUIC stacks); on the way in, [`Coalescer`] joins the
//! decrypted TCP segments of one flow into super-packets before the TUN write (GRO), so the
//! kernel's TCP stack sees a few large packets instead of many small ones.
//!
//! Pure code: the engine reads and writes the TUN, these functions only rewrite bytes.

mod checksum;
pub mod coalesce;
mod header;
mod split;
#[cfg(test)]
mod tests;

pub use checksum::{fold, pseudo_header_sum, sum_words};
pub use coalesce::Coalescer;
pub use header::{GsoType, VnetHeader, HDR_LEN};
pub use split::{split, Split};

/// A TUN packet we could not take apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VnetError {
    #[error("shorter than its virtio-net header")]
    ShortHeader,
    #[error("unsupported GSO type {0:#x}")]
    UnsupportedGso(u8),
    #[error("GSO packet with segment size 0")]
    ZeroSegment,
    #[error("checksum offsets outside the packet")]
    BadChecksumOffsets,
    #[error("GSO packet is not TCP in IPv4/IPv6 as its header says")]
    NotTcp,
    #[error("UDP GSO packet is not UDP in IPv4/IPv6, or its lengths disagree")]
    NotUdp,
    #[error("IP or TCP header truncated or inconsistent")]
    BadHeaders,
}

/// IP protocol numbers of TCP and UDP.
const TCP: u8 = 6;
const UDP: u8 = 17;

/// Sets the length field of an IP header for a packet of `len` bytes and, for IPv4, the ID (when
/// given) and the header checksum. `ip` holds at least the IP header (`ip_len` bytes; 40 for
/// IPv6, whose length field counts what follows it).
fn set_ip_header(
    ip: &mut [u8],
    v6: bool,
    ip_len: usize,
    len: usize,
    id: Option<u16>,
) -> Result<(), VnetError> {
    if v6 {
        let payload_len = u16::try_from(len - 40).map_err(|_| VnetError::BadHeaders)?;
        ip[4..6].copy_from_slice(&payload_len.to_be_bytes());
        return Ok(());
    }
    let total = u16::try_from(len).map_err(|_| VnetError::BadHeaders)?;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    if let Some(id) = id {
        ip[4..6].copy_from_slice(&id.to_be_bytes());
    }
    ip[10..12].fill(0);
    let checksum = checksum::ipv4_header(&ip[..ip_len]);
    ip[10..12].copy_from_slice(&checksum.to_be_bytes());
    Ok(())
}

/// Where the TCP header of a packet starts and how long it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TcpLayout {
    v6: bool,
    ip_len: usize,
    tcp_len: usize,
}

/// The layout of a TCP packet directly in IPv4 (any IHL) or IPv6 (no extension headers).
fn tcp_layout(packet: &[u8], v6: bool) -> Result<TcpLayout, VnetError> {
    let version = packet.first().ok_or(VnetError::NotTcp)? >> 4;
    let (ip_len, protocol) = match (v6, version) {
        (true, 6) if packet.len() >= 40 => (40, packet[6]),
        (false, 4) if packet.len() >= 20 => (usize::from(packet[0] & 0x0f) * 4, packet[9]),
        _ => return Err(VnetError::NotTcp),
    };
    if protocol != TCP || ip_len < 20 {
        return Err(VnetError::NotTcp);
    }
    let data_offset = *packet.get(ip_len + 12).ok_or(VnetError::BadHeaders)?;
    let tcp_len = usize::from(data_offset >> 4) * 4;
    if tcp_len < 20 || ip_len + tcp_len > packet.len() {
        return Err(VnetError::BadHeaders);
    }
    Ok(TcpLayout {
        v6,
        ip_len,
        tcp_len,
    })
}
