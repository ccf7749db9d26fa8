//! The TUN device: created with tun-rs (one queue), configured over netlink (MTU, link up,
//! addresses) so that adding and removing use one code path. With offloads on, every packet
//! read or written carries a virtio-net header and the kernel may hand us 64 KiB TCP
//! super-packets (TSO, checksum offload) and, on Linux 6.2 and later, UDP ones (USO); the engine
//! splits them and coalesces what it writes.

use std::future::Future;
use std::io;
use std::io::IoSlice;
use std::os::fd::AsRawFd;

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
    /// Ask for the virtio-net header with TSO and checksum offload (falls back without).
    pub offload: bool,
}

/// Length of the virtio-net header in front of each packet when offloads are on.
pub const VNET_HDR_LEN: usize = 10;

/// `TUNSETOFFLOAD`: `_IOW('T', 208, unsigned int)`; its argument is passed by value.
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
/// Checksum offload and TCP segmentation offload for IPv4 and IPv6.
const TCP_OFFLOADS: libc::c_ulong =
    (libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6) as libc::c_ulong;
/// Those and UDP segmentation offload (USO, Linux 6.2 and later; older kernels refuse the
/// flags with EINVAL and we keep the TCP ones).
const TCP_UDP_OFFLOADS: libc::c_ulong =
    TCP_OFFLOADS | (libc::TUN_F_USO4 | libc::TUN_F_USO6) as libc::c_ulong;

impl Default for TunConfig {
    fn default() -> Self {
        Self {
            name: DEFAULT_TUN_NAME.to_string(),
            mtu: DEFAULT_MTU,
            offload: true,
        }
    }
}

/// A layer-3 packet device. A userspace-networking mode implements it without a kernel TUN.
pub trait Tun: Send + Sync {
    /// Interface name.
    fn name(&self) -> &str;
    /// Reads one IP packet into `buf` (a [`LinuxTun`] with offloads puts its virtio-net header
    /// first, and the packet may be a TCP super-packet).
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
    /// Packets carry a virtio-net header (offloads on).
    vnet: bool,
    /// The kernel may also hand us UDP super-packets (USO).
    uso: bool,
}

impl LinuxTun {
    /// Creates the device in the calling thread's network namespace, sets the MTU and brings it
    /// up. Must run inside a tokio runtime.
    pub async fn create(config: &TunConfig) -> Result<Self> {
        let tun_err = |source| PlatformError::Tun {
            name: config.name.clone(),
            source,
        };
        let (device, vnet, uso) = match Self::build(config, config.offload) {
            Ok(device) if config.offload => match set_offloads(&device) {
                Ok(uso) => (device, true, uso),
                Err(e) => {
                    tracing::info!(error = %e, "TUN offloads refused by the kernel: without them");
                    drop(device);
                    (Self::build(config, false).map_err(tun_err)?, false, false)
                }
            },
            Ok(device) => (device, false, false),
            Err(e) if config.offload => {
                tracing::info!(error = %e, "TUN with a virtio-net header refused: without offloads");
                (Self::build(config, false).map_err(tun_err)?, false, false)
            }
            Err(e) => return Err(tun_err(e)),
        };
        let name = device.name().map_err(tun_err)?;
        let netlink = Netlink::connect()?;
        let index = netlink.link_index(&name).await?;
        netlink.set_link_up(index, u32::from(config.mtu)).await?;
        tracing::debug!(%name, index, mtu = config.mtu, offload = vnet, uso, "TUN up");
        Ok(Self {
            device,
            name,
            index,
            netlink,
            vnet,
            uso,
        })
    }

    fn build(config: &TunConfig, offload: bool) -> io::Result<tun_rs::AsyncDevice> {
        tun_rs::DeviceBuilder::new()
            .name(config.name.clone())
            .enable(false)
            .offload(offload)
            .build_async()
    }

    /// Whether reads and writes carry a virtio-net header (see [`Self::send_frame_vectored`]).
    pub fn offload(&self) -> bool {
        self.vnet
    }

    /// Whether reads may also be UDP super-packets (USO on; implies [`Self::offload`]).
    pub fn udp_offload(&self) -> bool {
        self.uso
    }

    /// Writes a frame given in parts, its virtio-net header first (offloads on): one `writev`.
    pub async fn send_frame_vectored(&self, parts: &[IoSlice<'_>]) -> io::Result<usize> {
        self.device.send_vectored(parts).await
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

/// Sets the device's offloads to exactly the ones we split: TCP and UDP where the kernel has
/// USO, else TCP only. Returns whether USO is on.
fn set_offloads(device: &tun_rs::AsyncDevice) -> io::Result<bool> {
    match set_offload_flags(device, TCP_UDP_OFFLOADS) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            tracing::debug!("TUN: no UDP segmentation offload (kernel before 6.2): TCP only");
            set_offload_flags(device, TCP_OFFLOADS).map(|()| false)
        }
        Err(e) => Err(e),
    }
}

fn set_offload_flags(device: &tun_rs::AsyncDevice, flags: libc::c_ulong) -> io::Result<()> {
    // SAFETY: the descriptor is the live TUN the device owns; TUNSETOFFLOAD takes an integer.
    let rc = unsafe { libc::ioctl(device.as_raw_fd(), TUNSETOFFLOAD as _, flags) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Tun for LinuxTun {
    fn name(&self) -> &str {
        &self.name
    }

    fn recv(&self, buf: &mut [u8]) -> impl Future<Output = io::Result<usize>> + Send {
        self.device.recv(buf)
    }

    /// With offloads on, the packet goes out behind an empty virtio-net header (no GSO, its
    /// checksums complete).
    async fn send(&self, packet: &[u8]) -> io::Result<usize> {
        if self.vnet {
            let empty = [0u8; VNET_HDR_LEN];
            let parts = [IoSlice::new(&empty), IoSlice::new(packet)];
            let n = self.device.send_vectored(&parts).await?;
            Ok(n.saturating_sub(VNET_HDR_LEN))
        } else {
            self.device.send(packet).await
        }
    }

    fn try_recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.device.try_recv(buf)
    }
}
