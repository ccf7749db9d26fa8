//! The Internet checksum (RFC 1071), summed 32 bits at a time into a 64-bit accumulator.

/// Adds `data` as big-endian 16-bit words to `acc`. An odd trailing byte is padded with zero, so
/// only the last piece of a checksummed range may have an odd length.
pub fn sum_words(mut acc: u64, data: &[u8]) -> u64 {
    let mut words = data.chunks_exact(4);
    for w in &mut words {
        acc += u64::from(u32::from_be_bytes([w[0], w[1], w[2], w[3]]));
    }
    let rest = words.remainder();
    let mut pairs = rest.chunks_exact(2);
    for p in &mut pairs {
        acc += u64::from(u16::from_be_bytes([p[0], p[1]]));
    }
    if let [last] = pairs.remainder() {
        acc += u64::from(*last) << 8;
    }
    acc
}

/// Folds an accumulator into 16 bits (not complemented).
pub fn fold(mut acc: u64) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The sum of the TCP/UDP pseudo-header of an IPv4 or IPv6 packet (addresses taken from the IP
/// header in `ip`), for an L4 length of `l4_len`.
pub fn pseudo_header_sum(ip: &[u8], v6: bool, protocol: u8, l4_len: usize) -> u64 {
    let addrs = if v6 { ip.get(8..40) } else { ip.get(12..20) };
    let acc = sum_words(0, addrs.unwrap_or_default());
    acc + u64::from(protocol) + l4_len as u64
}

/// The IPv4 header checksum of `header` (its checksum field included in the sum as it is).
pub fn ipv4_header(header: &[u8]) -> u16 {
    !fold(sum_words(0, header))
}
