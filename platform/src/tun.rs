//! The TUN device: created with tun-rs (no offloads yet, one queue), configured over netlink
//! (MTU, link up, addresses) so that adding and removing use one code path.

use std::future::Future;
use std::io;

use ipnet::IpNet;

use crate::error::{PlatformError, Result};
use crate::netlink::Netlink;

/// Default interface name (tailscaled uses `tailscale0`).
pub const DEFAULT_TUN_NAME: &str = "tern0";
/// Default MTU: the IPv6 minimum, which fits almost every path after 80 bytes of WireGuard.
pub const DEFAULT_MTU: u16 = 1280;

/// How to create the TUN device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunConfig {
    pub name: String,
    pub mtu: u16,
}

impl Default for TunConfig {
    fn default() -> Self {
        Self {
            name: DEFAULT_TUN_NAME.to_string(),
            mtu: DEFAULT_MTU,
        }
    }
}

/// A layer-3 packet device. A userspace-networking mode implements it without a kernel TUN.
pub trait Tun: Send + Sync {
    /// Interface name.
    fn name(&self) -> &str;
    /// Reads one IP packet into `buf`.
    fn recv(&self, buf: &mut [u8]) -> impl Future<Output = io::Result<usize>> + Send;
    /// Writes one IP packet.
    fn send(&self, packet: &[u8]) -> impl Future<Output = io::Result<usize>> + Send;
    /// Reads one IP packet if one is waiting (`WouldBlock` otherwise): lets a reader drain a
    /// burst without going back to its event loop for each packet.
    fn try_recv(&self, buf: &mut [u8]) -> io::Result<usize>;
}

/// A Linux kernel TUN device (`IFF_TUN | IFF_NO_PI`, not persistent: it goes away with the fd).
pub struct LinuxTun {
    device: tun_rs::AsyncDevice,
    name: String,
    index: u32,
    netlink: Netlink,
}

impl LinuxTun {
    /// Creates the device in the calling thread's network namespace, sets the MTU and brings it
    /// up. Must run inside a tokio runtime.
    pub async fn create(config: &TunConfig) -> Result<Self> {
        let tun_err = |source| PlatformError::Tun {
            name: config.name.clone(),
            source,
        };
        let device = tun_rs::DeviceBuilder::new()
            .name(config.name.clone())
            .enable(false)
            .build_async()
            .map_err(tun_err)?;
        let name = device.name().map_err(tun_err)?;
        let netlink = Netlink::connect()?;
        let index = netlink.link_index(&name).await?;
        netlink.set_link_up(index, u32::from(config.mtu)).await?;
        tracing::debug!(%name, index, mtu = config.mtu, "TUN up");
        Ok(Self {
            device,
            name,
            index,
            netlink,
        })
    }

    /// Interface index (for routes).
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The netlink connection used for this device (shared with a [`crate::router::NetlinkRouter`]).
    pub fn netlink(&self) -> &Netlink {
        &self.netlink
    }

    /// Makes the device's addresses exactly `addrs` (node addresses as given: v4 /32, v6 /128).
    pub async fn set_addresses(&self, addrs: &[IpNet]) -> Result<()> {
        for addr in addrs {
            self.netlink.replace_address(self.index, *addr).await?;
        }
        for old in self.netlink.addresses(self.index).await? {
            // The kernel adds an fe80:: address to links; that one is not ours to manage.
            let link_local =
                matches!(old, IpNet::V6(n) if n.addr().segments()[0] & 0xffc0 == 0xfe80);
            if !addrs.contains(&old) && !link_local {
                self.netlink.delete_address(self.index, old).await?;
            }
        }
        Ok(())
    }
}

impl Tun for LinuxTun {
    fn name(&self) -> &str {
        &self.name
    }

    fn recv(&self, buf: &mut [u8]) -> impl Future<Output = io::Result<usize>> + Send {
        self.device.recv(buf)
    }

    fn send(&self, packet: &[u8]) -> impl Future<Output = io::Result<usize>> + Send {
        self.device.send(packet)
    }

    fn try_recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.device.try_recv(buf)
    }
}
