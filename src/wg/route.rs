//! [`AllowedIps`]: longest-prefix match from a destination IP to a peer.
//!
//! One hash map per (family, prefix length), searched from the longest length down: a lookup
//! costs one masked hash probe per distinct length (Tailscale netmaps have few: /32, /128, a few
//! subnet lengths) and never allocates.

use std::collections::HashMap;
use std::net::IpAddr;

use ipnet::IpNet;

/// Prefix → value table with longest-prefix-match lookup.
#[derive(Debug, Clone)]
pub struct AllowedIps<T> {
    v4: Vec<(u8, HashMap<u32, T>)>,
    v6: Vec<(u8, HashMap<u128, T>)>,
}

impl<T> Default for AllowedIps<T> {
    fn default() -> Self {
        Self {
            v4: Vec::new(),
            v6: Vec::new(),
        }
    }
}

fn mask_v4(addr: u32, len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        addr & (u32::MAX << (32 - u32::from(len)))
    }
}

fn mask_v6(addr: u128, len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        addr & (u128::MAX << (128 - u32::from(len)))
    }
}

fn slot<K, T>(levels: &mut Vec<(u8, HashMap<K, T>)>, len: u8) -> &mut HashMap<K, T> {
    let pos = match levels.iter().position(|(l, _)| *l <= len) {
        Some(i) if levels[i].0 == len => i,
        Some(i) => {
            levels.insert(i, (len, HashMap::new()));
            i
        }
        None => {
            levels.push((len, HashMap::new()));
            levels.len() - 1
        }
    };
    &mut levels[pos].1
}

impl<T: Clone + PartialEq> AllowedIps<T> {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `prefix` (host bits ignored) to `value`, replacing an earlier value for it.
    pub fn insert(&mut self, prefix: IpNet, value: T) {
        let len = prefix.prefix_len();
        match prefix {
            IpNet::V4(n) => {
                let key = mask_v4(u32::from(n.addr()), len);
                slot(&mut self.v4, len).insert(key, value);
            }
            IpNet::V6(n) => {
                let key = mask_v6(u128::from(n.addr()), len);
                slot(&mut self.v6, len).insert(key, value);
            }
        }
    }

    /// Removes every prefix mapped to `value`.
    pub fn remove_value(&mut self, value: &T) {
        for (_, m) in &mut self.v4 {
            m.retain(|_, v| v != value);
        }
        for (_, m) in &mut self.v6 {
            m.retain(|_, v| v != value);
        }
        self.v4.retain(|(_, m)| !m.is_empty());
        self.v6.retain(|(_, m)| !m.is_empty());
    }

    /// The value of the longest prefix containing `addr`.
    pub fn lookup(&self, addr: IpAddr) -> Option<&T> {
        match addr {
            IpAddr::V4(a) => {
                let a = u32::from(a);
                self.v4.iter().find_map(|(len, m)| m.get(&mask_v4(a, *len)))
            }
            IpAddr::V6(a) => {
                let a = u128::from(a);
                self.v6.iter().find_map(|(len, m)| m.get(&mask_v6(a, *len)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn longest_prefix_wins_in_both_families() {
        let mut t = AllowedIps::new();
        t.insert(net("0.0.0.0/0"), 0);
        t.insert(net("10.0.0.0/8"), 1);
        t.insert(net("10.1.0.0/16"), 2);
        t.insert(net("100.64.0.1/32"), 3);
        t.insert(net("fd7a:115c:a1e0::/48"), 4);
        t.insert(net("fd7a:115c:a1e0::1/128"), 5);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(t.lookup(ip("10.1.2.3")), Some(&2));
        assert_eq!(t.lookup(ip("10.2.2.3")), Some(&1));
        assert_eq!(t.lookup(ip("100.64.0.1")), Some(&3));
        assert_eq!(t.lookup(ip("100.64.0.2")), Some(&0));
        assert_eq!(t.lookup(ip("fd7a:115c:a1e0::1")), Some(&5));
        assert_eq!(t.lookup(ip("fd7a:115c:a1e0::2")), Some(&4));
        assert_eq!(t.lookup(ip("2001:db8::1")), None);
        t.remove_value(&2);
        assert_eq!(t.lookup(ip("10.1.2.3")), Some(&1));
        t.remove_value(&0);
        assert_eq!(t.lookup(ip("8.8.8.8")), None);
    }

    #[test]
    fn host_bits_in_prefix_are_ignored() {
        let mut t = AllowedIps::new();
        t.insert(net("192.168.1.77/24"), 'a');
        assert_eq!(t.lookup("192.168.1.1".parse().unwrap()), Some(&'a'));
    }
}
