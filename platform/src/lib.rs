//! Linux integration: TUN, policy routing, nftables/iptables, DNS. Filled in by its issues.
