//! Linux integration: TUN, policy routing, nftables/iptables, DNS. Filled in by its issues.

pub mod error;
pub mod netfilter;
pub mod netlink;
pub mod router;
pub mod tun;

pub use error::{PlatformError, Result};
