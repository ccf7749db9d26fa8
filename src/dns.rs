//! MagicDNS: the resolver tern answers on 100.100.100.100 (and fd7a:115c:a1e0::53).
//!
//! * [`config`]: what MagicDNS knows, computed from the netmap (host names and addresses, the
//!   domains answered locally, split-DNS routes, search domains) plus the OS's own resolvers.
//! * [`magic`]: answering one raw query, pure and sans-IO: a local answer, a request to forward
//!   the query unchanged to some upstreams, or nothing.
//! * [`doh`]: asking an exit node's peer API (DNS over HTTP) while it is in use.
//! * [`forward`]: the async relay of a raw query to upstream resolvers (UDP race, TCP when
//!   needed), and reading the OS's resolvers from resolv.conf.
//!
//! Behaviour follows Tailscale's quad-100 resolver (`net/dns/resolver` in the Go client).

pub mod config;
pub mod doh;
pub mod forward;
pub mod magic;
pub mod name;
pub mod os;
pub mod resolvconf;
pub mod resolved;

pub use config::MagicDnsConfig;
pub use forward::{forward, os_base_resolvers, ForwardError};
pub use magic::{respond, DnsCounters, Outcome};

#[cfg(test)]
mod testing;

/// The DNS message library tern uses, for callers (and the fuzz target) that build or read
/// messages.
pub use hickory_proto;
