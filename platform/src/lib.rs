//! Linux integration: TUN, policy routing, nftables/iptables, DNS. Filled in by its issues.

pub mod error;
pub mod netfilter;
pub mod netlink;
pub mod policy;
pub mod router;
pub mod sysctl;
pub mod tun;
pub mod watch;

pub use error::{PlatformError, Result};
