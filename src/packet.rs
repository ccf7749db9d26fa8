//! A small pure IPv4/IPv6 header parser: protocol, addresses, TCP/UDP ports, TCP flags, ICMP
//! type. Never panics; short or garbage input gives an error.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// IP protocol numbers we look into.
pub mod proto {
    pub const ICMPV4: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const ICMPV6: u8 = 58;
    /// Tailscale's own in-tunnel protocol (TSMP).
    pub const TSMP: u8 = 99;
    pub const SCTP: u8 = 132;
}

/// TCP flag bits.
pub mod tcp_flags {
    pub const SYN: u8 = 0x02;
    pub const ACK: u8 = 0x10;
}

/// What the filter and router need to know about a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketSummary {
    pub proto: u8,
    pub src: IpAddr,
    pub dst: IpAddr,
    /// 0 unless TCP/UDP/SCTP with a transport header present.
    pub src_port: u16,
    pub dst_port: u16,
    /// TCP flags (byte 13 of the TCP header); 0 otherwise.
    pub tcp_flags: u8,
    /// ICMP/ICMPv6 type and code; 0 otherwise.
    pub icmp_type: u8,
    pub icmp_code: u8,
    /// An IPv4 fragment other than the first: it carries no transport header.
    pub later_fragment: bool,
}

/// Why a buffer is not a parseable IP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("empty packet")]
    Empty,
    #[error("IP version {0} not supported")]
    Version(u8),
    #[error("packet shorter than its headers")]
    Truncated,
    #[error("bad IPv4 header length")]
    BadHeaderLength,
}

impl PacketSummary {
    /// Parses the IP header and the start of the transport header.
    pub fn parse(packet: &[u8]) -> Result<Self, PacketError> {
        let first = *packet.first().ok_or(PacketError::Empty)?;
        match first >> 4 {
            4 => parse_v4(packet),
            6 => parse_v6(packet),
            v => Err(PacketError::Version(v)),
        }
    }

    /// Whether this is a TCP SYN without ACK (a new connection attempt).
    pub fn is_tcp_syn(&self) -> bool {
        self.proto == proto::TCP
            && self.tcp_flags & tcp_flags::SYN != 0
            && self.tcp_flags & tcp_flags::ACK == 0
    }
}

fn array<const N: usize>(b: &[u8], at: usize) -> Result<[u8; N], PacketError> {
    b.get(at..at + N)
        .and_then(|s| s.try_into().ok())
        .ok_or(PacketError::Truncated)
}

fn parse_v4(p: &[u8]) -> Result<PacketSummary, PacketError> {
    let ihl = usize::from(p.first().copied().unwrap_or(0) & 0x0f) * 4;
    if ihl < 20 {
        return Err(PacketError::BadHeaderLength);
    }
    if p.len() < ihl {
        return Err(PacketError::Truncated);
    }
    let frag = u16::from_be_bytes(array(p, 6)?);
    let proto = *p.get(9).ok_or(PacketError::Truncated)?;
    let src = IpAddr::V4(Ipv4Addr::from(array::<4>(p, 12)?));
    let dst = IpAddr::V4(Ipv4Addr::from(array::<4>(p, 16)?));
    let mut s = summary(proto, src, dst);
    if frag & 0x1fff != 0 {
        s.later_fragment = true;
        return Ok(s);
    }
    transport(&mut s, p.get(ihl..).unwrap_or(&[]))?;
    Ok(s)
}

fn parse_v6(p: &[u8]) -> Result<PacketSummary, PacketError> {
    let proto = *p.get(6).ok_or(PacketError::Truncated)?;
    let src = IpAddr::V6(Ipv6Addr::from(array::<16>(p, 8)?));
    let dst = IpAddr::V6(Ipv6Addr::from(array::<16>(p, 24)?));
    let mut s = summary(proto, src, dst);
    transport(&mut s, p.get(40..).unwrap_or(&[]))?;
    Ok(s)
}

fn summary(proto: u8, src: IpAddr, dst: IpAddr) -> PacketSummary {
    PacketSummary {
        proto,
        src,
        dst,
        src_port: 0,
        dst_port: 0,
        tcp_flags: 0,
        icmp_type: 0,
        icmp_code: 0,
        later_fragment: false,
    }
}

fn transport(s: &mut PacketSummary, l4: &[u8]) -> Result<(), PacketError> {
    match s.proto {
        proto::TCP => {
            s.src_port = u16::from_be_bytes(array(l4, 0)?);
            s.dst_port = u16::from_be_bytes(array(l4, 2)?);
            s.tcp_flags = *l4.get(13).ok_or(PacketError::Truncated)?;
        }
        proto::UDP | proto::SCTP => {
            s.src_port = u16::from_be_bytes(array(l4, 0)?);
            s.dst_port = u16::from_be_bytes(array(l4, 2)?);
        }
        proto::ICMPV4 | proto::ICMPV6 => {
            let [t, c] = array::<2>(l4, 0)?;
            s.icmp_type = t;
            s.icmp_code = c;
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn v4(proto: u8, l4: &[u8]) -> Vec<u8> {
        let mut p = vec![
            0x45, 0, 0, 0, 0, 0, 0, 0, 64, proto, 0, 0, 100, 64, 0, 1, 100, 64, 0, 2,
        ];
        p.extend_from_slice(l4);
        p
    }

    #[test]
    fn parses_tcp_syn_v4() {
        let mut tcp = vec![
            0x04,
            0xd2,
            0x00,
            0x16,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0x50,
            tcp_flags::SYN,
        ];
        tcp.extend_from_slice(&[0; 6]);
        let s = PacketSummary::parse(&v4(proto::TCP, &tcp)).unwrap();
        assert_eq!(s.src, "100.64.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(s.dst, "100.64.0.2".parse::<IpAddr>().unwrap());
        assert_eq!((s.src_port, s.dst_port), (1234, 22));
        assert!(s.is_tcp_syn());
    }

    #[test]
    fn parses_icmpv6_echo_reply() {
        let mut p = vec![0x60, 0, 0, 0, 0, 8, proto::ICMPV6, 64];
        p.extend_from_slice(&"fd7a:115c:a1e0::1".parse::<Ipv6Addr>().unwrap().octets());
        p.extend_from_slice(&"fd7a:115c:a1e0::2".parse::<Ipv6Addr>().unwrap().octets());
        p.extend_from_slice(&[129, 0, 0, 0, 0, 0, 0, 0]);
        let s = PacketSummary::parse(&p).unwrap();
        assert_eq!((s.proto, s.icmp_type), (proto::ICMPV6, 129));
    }

    #[test]
    fn later_fragments_have_no_ports() {
        let mut p = v4(proto::UDP, &[1, 2, 3, 4]);
        p[7] = 1; // fragment offset 8 bytes
        let s = PacketSummary::parse(&p).unwrap();
        assert!(s.later_fragment);
        assert_eq!(s.dst_port, 0);
    }

    #[test]
    fn short_and_garbage_input_is_an_error() {
        assert_eq!(PacketSummary::parse(&[]), Err(PacketError::Empty));
        assert_eq!(
            PacketSummary::parse(&[0x45, 0]),
            Err(PacketError::Truncated)
        );
        assert_eq!(
            PacketSummary::parse(&[0x41; 40]),
            Err(PacketError::BadHeaderLength)
        );
        assert_eq!(
            PacketSummary::parse(&[0x75; 40]),
            Err(PacketError::Version(7))
        );
        assert_eq!(
            PacketSummary::parse(&v4(proto::TCP, &[0; 4])),
            Err(PacketError::Truncated)
        );
    }

    proptest! {
        #[test]
        fn never_panics(data in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = PacketSummary::parse(&data);
        }
    }
}
