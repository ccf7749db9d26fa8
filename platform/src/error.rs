//! The platform crate's error type.

/// Errors from TUN and netlink operations.
#[derive(Debug, thiserror::Error)]
pub enum PlatformError {
    #[error("TUN device {name}: {source}")]
    Tun {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("netlink socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error("netlink {op}: {source}")]
    Netlink {
        op: &'static str,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("no network interface named {0:?}")]
    NoSuchLink(String),
    #[error("invalid route {0}: {1}")]
    InvalidRoute(ipnet::IpNet, String),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, PlatformError>;
