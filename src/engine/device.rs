//! Where the engine's cleartext packets come from and go to: a kernel TUN, or in
//! `--tun userspace-networking` the userspace stack ([`crate::netstack::user`]) whose packets
//! cross in memory. The engine reads and writes both the same way.

use std::io;
use std::sync::Mutex;

use ipnet::IpNet;
use tokio::sync::mpsc;

use super::AbortOnDrop;
use crate::netstack::user::{self, StackHandle, StackIo};
use tern_platform::tun::{LinuxTun, Tun};

/// Packets queued between the engine and the userspace stack, each way.
const QUEUE: usize = 1024;

pub(super) enum Device {
    Kernel(LinuxTun),
    Userspace(UserDevice),
}

pub(super) struct UserDevice {
    to_stack: mpsc::Sender<Vec<u8>>,
    /// Only the engine reads; the lock is never contended nor held across an await.
    from_stack: Mutex<mpsc::Receiver<Vec<u8>>>,
    pub(super) stack: StackHandle,
    _task: AbortOnDrop,
}

impl UserDevice {
    /// Starts the userspace stack.
    pub(super) fn start() -> Self {
        let (to_stack, inbound) = mpsc::channel(QUEUE);
        let (outbound, from_stack) = mpsc::channel(QUEUE);
        let (stack, task) = user::spawn(StackIo { inbound, outbound });
        UserDevice {
            to_stack,
            from_stack: Mutex::new(from_stack),
            stack,
            _task: AbortOnDrop(task),
        }
    }

    fn copy_into(packet: Vec<u8>, buf: &mut [u8]) -> usize {
        let n = packet.len().min(buf.len());
        buf[..n].copy_from_slice(&packet[..n]);
        n
    }
}

impl Device {
    pub(super) fn name(&self) -> &str {
        match self {
            Device::Kernel(tun) => tun.name(),
            Device::Userspace(_) => crate::daemon::USERSPACE_NETWORKING,
        }
    }

    /// The kernel TUN, if this is one.
    pub(super) fn kernel(&self) -> Option<&LinuxTun> {
        match self {
            Device::Kernel(tun) => Some(tun),
            Device::Userspace(_) => None,
        }
    }

    /// The userspace stack, if this is one.
    pub(super) fn userspace(&self) -> Option<&UserDevice> {
        match self {
            Device::Kernel(_) => None,
            Device::Userspace(user) => Some(user),
        }
    }

    /// The next packet for the network.
    pub(super) async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Device::Kernel(tun) => tun.recv(buf).await,
            Device::Userspace(user) => {
                let packet = std::future::poll_fn(|cx| match user.from_stack.lock() {
                    Ok(mut rx) => rx.poll_recv(cx),
                    Err(_) => std::task::Poll::Ready(None),
                })
                .await;
                match packet {
                    Some(p) => Ok(UserDevice::copy_into(p, buf)),
                    None => Err(io::Error::other("the userspace stack stopped")),
                }
            }
        }
    }

    /// A packet for the network if one is waiting (`WouldBlock` otherwise).
    pub(super) fn try_recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Device::Kernel(tun) => tun.try_recv(buf),
            Device::Userspace(user) => {
                let packet = user
                    .from_stack
                    .lock()
                    .ok()
                    .and_then(|mut rx| rx.try_recv().ok());
                packet
                    .map(|p| UserDevice::copy_into(p, buf))
                    .ok_or_else(|| io::ErrorKind::WouldBlock.into())
            }
        }
    }

    /// A packet from the network for this node.
    pub(super) async fn send(&self, packet: &[u8]) -> io::Result<usize> {
        match self {
            Device::Kernel(tun) => tun.send(packet).await,
            Device::Userspace(user) => {
                if user.to_stack.try_send(packet.to_vec()).is_err() {
                    user.stack.note_dropped();
                }
                Ok(packet.len())
            }
        }
    }

    /// The node's tailnet addresses.
    pub(super) async fn set_addresses(
        &self,
        addrs: &[IpNet],
    ) -> Result<(), tern_platform::PlatformError> {
        match self {
            Device::Kernel(tun) => tun.set_addresses(addrs).await,
            Device::Userspace(user) => {
                user.stack
                    .set_addresses(addrs.iter().map(IpNet::addr).collect());
                Ok(())
            }
        }
    }
}
