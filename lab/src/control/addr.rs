//! Tailnet address allocation: IPv4 from 100.64.0.0/10, IPv6 from fd7a:115c:a1e0::/48.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, Ipv6Addr};

/// First address of the CGNAT range Tailscale uses (100.64.0.0/10).
const CGNAT_BASE: u32 = u32::from_be_bytes([100, 64, 0, 0]);
/// Number of addresses in 100.64.0.0/10.
const CGNAT_SIZE: u32 = 1 << 22;
/// Tailscale's ULA prefix, fd7a:115c:a1e0::/48.
const ULA_PREFIX: [u16; 3] = [0xfd7a, 0x115c, 0xa1e0];

/// Whether Tailscale reserves this address: the quad-100 resolver, ChromeOS's 100.115.92.0/23,
/// and the network and broadcast addresses of the range.
fn is_reserved(addr: Ipv4Addr) -> bool {
    let o = addr.octets();
    addr == Ipv4Addr::new(100, 100, 100, 100)
        || (o[0] == 100 && o[1] == 115 && (o[2] & 0xfe) == 92)
        || u32::from(addr) == CGNAT_BASE
        || u32::from(addr) == CGNAT_BASE + CGNAT_SIZE - 1
}

/// The lowest free, unreserved IPv4 address in 100.64.0.0/10, if any is left.
pub fn next_free_v4(used: &BTreeSet<Ipv4Addr>) -> Option<Ipv4Addr> {
    next_free_v4_by(|addr| used.contains(&addr))
}

/// Like [`next_free_v4`], with the "in use" test given as a function.
fn next_free_v4_by(is_used: impl Fn(Ipv4Addr) -> bool) -> Option<Ipv4Addr> {
    (1..CGNAT_SIZE - 1)
        .map(|offset| Ipv4Addr::from(CGNAT_BASE + offset))
        .find(|addr| !is_reserved(*addr) && !is_used(*addr))
}

/// The IPv6 address paired with an IPv4 tailnet address: its offset in 100.64.0.0/10 becomes the
/// low 32 bits under fd7a:115c:a1e0::/48 (100.64.0.1 ↔ fd7a:115c:a1e0::1), so the pair is unique.
pub fn v6_for(v4: Ipv4Addr) -> Ipv6Addr {
    let offset = u32::from(v4).wrapping_sub(CGNAT_BASE);
    let [a, b, c] = ULA_PREFIX;
    Ipv6Addr::new(a, b, c, 0, 0, 0, (offset >> 16) as u16, offset as u16)
}

/// Whether an address lies in 100.64.0.0/10.
pub fn in_cgnat(addr: Ipv4Addr) -> bool {
    u32::from(addr).wrapping_sub(CGNAT_BASE) < CGNAT_SIZE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_address_and_its_pair() {
        let v4 = next_free_v4(&BTreeSet::new()).unwrap();
        assert_eq!(v4, Ipv4Addr::new(100, 64, 0, 1));
        assert_eq!(v6_for(v4), "fd7a:115c:a1e0::1".parse::<Ipv6Addr>().unwrap());
        assert_eq!(
            v6_for(Ipv4Addr::new(100, 65, 1, 2)),
            "fd7a:115c:a1e0::1:102".parse::<Ipv6Addr>().unwrap()
        );
    }

    #[test]
    fn skips_used_and_reserved_addresses() {
        let used: BTreeSet<_> = [Ipv4Addr::new(100, 64, 0, 1), Ipv4Addr::new(100, 64, 0, 2)].into();
        assert_eq!(next_free_v4(&used), Some(Ipv4Addr::new(100, 64, 0, 3)));
        assert!(is_reserved(Ipv4Addr::new(100, 100, 100, 100)));
        assert!(is_reserved(Ipv4Addr::new(100, 115, 92, 7)));
        assert!(is_reserved(Ipv4Addr::new(100, 115, 93, 255)));
        assert!(!is_reserved(Ipv4Addr::new(100, 115, 94, 0)));
        assert!(in_cgnat(Ipv4Addr::new(100, 127, 255, 254)));
        assert!(!in_cgnat(Ipv4Addr::new(100, 128, 0, 0)));
    }

    #[test]
    fn allocation_never_returns_reserved_addresses() {
        let below_chromeos = |a: Ipv4Addr| a < Ipv4Addr::new(100, 115, 92, 0);
        assert_eq!(
            next_free_v4_by(below_chromeos),
            Some(Ipv4Addr::new(100, 115, 94, 0))
        );
        let below_quad100 = |a: Ipv4Addr| a < Ipv4Addr::new(100, 100, 100, 100);
        assert_eq!(
            next_free_v4_by(below_quad100),
            Some(Ipv4Addr::new(100, 100, 100, 101))
        );
        assert_eq!(next_free_v4_by(|_| true), None);
    }
}
