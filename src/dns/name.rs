//! DNS names as lookup keys: lower-case text with a trailing dot (`c2.lab.tern.test.`).
//!
//! Labels come off the wire as bytes and may hold anything, including a `.`; every byte that is
//! not a letter, digit, `-` or `_` is written as `\DDD`, so a key's dots are exactly its label
//! boundaries and a suffix test on text is a suffix test on labels.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hickory_proto::rr::Name;

/// The key of a wire name (the root is `.`).
pub fn key_of(name: &Name) -> String {
    let mut key = String::with_capacity(name.len() + 1);
    for label in name.iter() {
        for &b in label {
            let b = b.to_ascii_lowercase();
            if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
                key.push(char::from(b));
            } else {
                // Writing to a String cannot fail.
                let _ = write!(key, "\\{b:03}");
            }
        }
        key.push('.');
    }
    if key.is_empty() {
        key.push('.');
    }
    key
}

/// The key of a name in text (from control: `c2.lab.tern.test.`, `Example.COM`); `None` if it is
/// not a valid DNS name.
pub fn key_of_text(text: &str) -> Option<String> {
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    Name::from_ascii(text).ok().map(|n| key_of(&n))
}

/// Whether `key` is `suffix` or a name under it (`.` is above everything).
pub fn is_under(key: &str, suffix: &str) -> bool {
    if suffix == "." {
        return true;
    }
    match key.strip_suffix(suffix) {
        Some("") => true,
        Some(head) => head.ends_with('.'),
        None => false,
    }
}

/// Labels in a key (0 for the root).
pub fn label_count(key: &str) -> usize {
    if key == "." {
        0
    } else {
        key.bytes().filter(|&b| b == b'.').count()
    }
}

/// The last label of a key (`""` for the root).
pub fn last_label(key: &str) -> &str {
    let trimmed = key.strip_suffix('.').unwrap_or(key);
    trimmed.rsplit('.').next().unwrap_or_default()
}

/// The address a reverse name stands for: exactly four octets under `in-addr.arpa.` or 32
/// nibbles under `ip6.arpa.`; `None` for shorter (zone) names and anything else.
pub fn reverse_ip(key: &str) -> Option<IpAddr> {
    if let Some(head) = key.strip_suffix(".in-addr.arpa.") {
        return reverse_v4(head).map(IpAddr::V4);
    }
    if let Some(head) = key.strip_suffix(".ip6.arpa.") {
        return reverse_v6(head).map(IpAddr::V6);
    }
    None
}

fn reverse_v4(head: &str) -> Option<Ipv4Addr> {
    let mut octets = [0u8; 4];
    let mut n = 0;
    // Labels are least significant first.
    for label in head.split('.') {
        let slot = 3usize.checked_sub(n)?;
        if label.is_empty() || label.len() > 3 || !label.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        octets[slot] = label.parse().ok()?;
        n += 1;
    }
    (n == 4).then(|| Ipv4Addr::from(octets))
}

fn reverse_v6(head: &str) -> Option<Ipv6Addr> {
    let mut value: u128 = 0;
    let mut n = 0;
    // Nibbles are least significant first.
    for label in head.split('.') {
        let nibble = match label.as_bytes() {
            [c] => char::from(*c).to_digit(16)?,
            _ => return None,
        };
        if n >= 32 {
            return None;
        }
        value |= u128::from(nibble) << (4 * n);
        n += 1;
    }
    (n == 32).then(|| Ipv6Addr::from(value))
}

/// The reverse name of an address (`2.0.64.100.in-addr.arpa.`), as a key.
pub fn reverse_key(ip: IpAddr) -> String {
    let mut key = String::new();
    match ip {
        IpAddr::V4(v4) => {
            for o in v4.octets().iter().rev() {
                let _ = write!(key, "{o}.");
            }
            key.push_str("in-addr.arpa.");
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            for i in 0..32 {
                let _ = write!(key, "{:x}.", (bits >> (4 * i)) & 0xf);
            }
            key.push_str("ip6.arpa.");
        }
    }
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_lower_case_with_escapes() {
        let n = Name::from_ascii("C2.Lab.Tern.Test").unwrap();
        assert_eq!(key_of(&n), "c2.lab.tern.test.");
        assert_eq!(key_of(&Name::root()), ".");
        let odd = Name::from_labels(vec![&b"a.lab"[..], b"tern"]).unwrap();
        assert_eq!(key_of(&odd), "a\\046lab.tern.");
        assert!(!is_under(&key_of(&odd), "lab.tern."));
        assert_eq!(key_of_text("Example.COM"), Some("example.com.".into()));
    }

    #[test]
    fn suffixes_on_label_boundaries() {
        assert!(is_under("a.b.c.", "b.c."));
        assert!(is_under("b.c.", "b.c."));
        assert!(!is_under("ab.c.", "b.c."));
        assert!(is_under("x.", "."));
        assert_eq!(label_count("."), 0);
        assert_eq!(label_count("c2."), 1);
        assert_eq!(last_label("x.onion."), "onion");
    }

    #[test]
    fn reverse_names_round_trip() {
        for ip in ["100.64.0.2", "fd7a:115c:a1e0::2", "0.0.0.0", "::"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(reverse_ip(&reverse_key(ip)), Some(ip));
        }
        assert_eq!(reverse_ip("64.100.in-addr.arpa."), None);
        assert_eq!(reverse_ip("256.0.64.100.in-addr.arpa."), None);
        assert_eq!(reverse_ip("1.2.3.4.5.in-addr.arpa."), None);
        assert_eq!(reverse_ip("0.e.1.a.c.5.1.1.a.7.d.f.ip6.arpa."), None);
    }
}
