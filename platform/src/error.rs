//! The platform crate's error type.

/// Errors from TUN, netlink and netfilter operations.
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
    #[error("running {cmd}: {source}")]
    CommandSpawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{cmd} failed ({status}): {stderr}")]
    CommandFailed {
        cmd: String,
        status: String,
        stderr: String,
    },
    #[error("unexpected output from {cmd}: {reason}")]
    CommandOutput { cmd: String, reason: String },
    #[error(
        "no firewall tool found: install nftables (`apt install nftables`) or iptables \
         (`apt install iptables`), or run with --netfilter-mode=off"
    )]
    NoFirewallTool,
    #[error("{var}={value} needs `{tool}` on PATH: install it (`apt install {package}`) or run with --netfilter-mode=off")]
    MissingFirewallTool {
        var: &'static str,
        value: String,
        tool: &'static str,
        package: &'static str,
    },
    #[error("invalid netfilter mode {0:?}: expected on, nodivert or off")]
    InvalidNetfilterMode(String),
    #[error("invalid {var}={value:?}: expected nftables, iptables or auto")]
    InvalidFirewallMode { var: &'static str, value: String },
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, PlatformError>;
