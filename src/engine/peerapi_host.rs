//! The peer API ([`crate::peerapi`]) on the kernel TUN's tailnet addresses: a listener per
//! address (the same port for both families when it is free, as Go picks), its `Hostinfo.Services`
//! announced to control, and who may use it kept in step with the netmap and the prefs.
//! Not in userspace networking, where nothing but the userspace stack owns the addresses.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::watch;

use super::{AbortOnDrop, Engine};
use crate::control::tailcfg::Service;
use crate::dns::config::MagicDnsConfig;
use crate::filter::Filter;
use crate::netmap::NetworkMap;
use crate::packet::PacketSummary;
use crate::peerapi::{self, Access, PeerApi};

pub(super) struct PeerApiHost {
    api: Arc<PeerApi>,
    access: watch::Sender<Arc<Access>>,
    listeners: Vec<Listener>,
    /// Addresses to listen on (a new IPv6 address may refuse binds until DAD is done).
    wanted: Vec<IpAddr>,
}

struct Listener {
    ip: IpAddr,
    port: u16,
    _task: AbortOnDrop,
}

impl PeerApiHost {
    pub(super) fn new(dns: watch::Receiver<Arc<MagicDnsConfig>>) -> Self {
        let (access, access_rx) = watch::channel(Arc::new(Access::default()));
        PeerApiHost {
            api: PeerApi::new(access_rx, dns, PathBuf::from("/etc/resolv.conf")),
            access,
            listeners: Vec::new(),
            wanted: Vec::new(),
        }
    }

    /// Listeners on exactly `addrs` (those that can be bound now); true if the set changed.
    pub(super) fn listen_on(&mut self, addrs: &[IpAddr]) -> bool {
        self.wanted = addrs.to_vec();
        let before = self.ports();
        self.listeners.retain(|l| addrs.contains(&l.ip));
        for ip in addrs {
            if self.listeners.iter().any(|l| l.ip == *ip) {
                continue;
            }
            let preferred = self.listeners.first().map(|l| l.port);
            match bind(*ip, preferred) {
                Ok(listener) => self.start(*ip, listener),
                Err(e) => tracing::debug!(%ip, error = %e, "peerapi: cannot listen yet"),
            }
        }
        self.ports() != before
    }

    /// Binds what [`Self::listen_on`] could not yet; true if a listener was added.
    pub(super) fn retry(&mut self) -> bool {
        if self.listeners.len() == self.wanted.len() {
            return false;
        }
        let wanted = self.wanted.clone();
        self.listen_on(&wanted)
    }

    fn start(&mut self, ip: IpAddr, listener: tokio::net::TcpListener) {
        let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
        tracing::info!(%ip, port, "peerapi listening (DNS over HTTP for exit node users)");
        let task = tokio::spawn(peerapi::serve(listener, self.api.clone()));
        self.listeners.push(Listener {
            ip,
            port,
            _task: AbortOnDrop(task),
        });
    }

    /// Address → port of each listener.
    pub(super) fn ports(&self) -> Vec<(IpAddr, u16)> {
        self.listeners.iter().map(|l| (l.ip, l.port)).collect()
    }

    /// Whether `p` is a TCP SYN to one of our peerapi listeners (let through the packet filter:
    /// access is decided by the server, as in Go).
    pub(super) fn is_syn_to_listener(&self, p: &PacketSummary) -> bool {
        p.is_tcp_syn()
            && self
                .listeners
                .iter()
                .any(|l| l.ip == p.dst && l.port == p.dst_port)
    }

    pub(super) fn services(&self) -> Vec<Service> {
        peerapi::services(&self.ports())
    }

    pub(super) fn set_access(&self, access: Access) {
        self.access.send_replace(Arc::new(access));
    }

    pub(super) fn counters(&self) -> Vec<(&'static str, u64)> {
        self.api.counters.named()
    }
}

/// A listener on `ip`, on `preferred` if that is free, else on a port the kernel picks.
fn bind(ip: IpAddr, preferred: Option<u16>) -> std::io::Result<tokio::net::TcpListener> {
    let try_port = |port: u16| -> std::io::Result<tokio::net::TcpListener> {
        let std = std::net::TcpListener::bind(SocketAddr::new(ip, port))?;
        std.set_nonblocking(true)?;
        tokio::net::TcpListener::from_std(std)
    };
    match preferred {
        Some(port) => try_port(port).or_else(|_| try_port(0)),
        None => try_port(0),
    }
}

/// Who may use the peer API under `map` (see [`Access`]).
pub(super) fn access_for(map: &NetworkMap, served: &[ipnet::IpNet], offering_exit: bool) -> Access {
    let peers = map
        .peers
        .values()
        .flat_map(|node| {
            node.addresses
                .iter()
                .filter(|a| a.prefix_len() == a.max_prefix_len())
                .map(move |a| (a.addr(), node.user))
        })
        .collect();
    Access {
        self_user: map.self_node.as_ref().map(|n| n.user),
        peers,
        offering_exit_node: offering_exit,
        filter: Filter::from_rules(&map.packet_filter(), served).ok(),
        exit_node_filtered: map
            .dns_config
            .as_ref()
            .map(|d| d.exit_node_filtered_set.clone())
            .unwrap_or_default(),
    }
}

impl Engine {
    /// Listeners on our addresses, announced in Hostinfo, and the access rules, for `map`.
    pub(super) fn sync_peerapi(&mut self, map: &NetworkMap) {
        let Some(host) = self.peerapi.as_mut() else {
            return;
        };
        let addrs: Vec<IpAddr> = self.local.iter().map(|n| n.addr()).collect();
        if host.listen_on(&addrs) {
            self.announce_peerapi();
        }
        let served = if self.served.is_empty() {
            &self.local
        } else {
            &self.served
        };
        let offering_exit = self.net_prefs.borrow().advertise_exit_node;
        if let Some(host) = &self.peerapi {
            host.set_access(access_for(map, served, offering_exit));
        }
    }

    /// Called every status tick: listeners that could not be bound yet.
    pub(super) fn retry_peerapi(&mut self) {
        if self.peerapi.as_mut().is_some_and(|h| h.retry()) {
            self.announce_peerapi();
        }
    }

    /// Our peerapi services into what control hears of us.
    fn announce_peerapi(&mut self) {
        let services = self.peerapi_services();
        self.local_tx.send_if_modified(|info| {
            let changed = info.services != services;
            info.services = services;
            changed
        });
    }

    /// Where our peer API listens, as URLs (status `self.peerapi_urls`).
    pub(super) fn peerapi_urls(&self) -> Vec<String> {
        let ports = self
            .peerapi
            .as_ref()
            .map(PeerApiHost::ports)
            .unwrap_or_default();
        let addrs: Vec<IpAddr> = ports.iter().map(|(ip, _)| *ip).collect();
        peerapi::urls(&addrs, &peerapi::services(&ports))
    }

    pub(super) fn peerapi_services(&self) -> Vec<Service> {
        self.peerapi
            .as_ref()
            .map(PeerApiHost::services)
            .unwrap_or_default()
    }

    /// Whether an inbound packet the filter dropped is a SYN to the peer API.
    pub(super) fn is_syn_to_peerapi(&self, p: &PacketSummary) -> bool {
        self.peerapi
            .as_ref()
            .is_some_and(|h| h.is_syn_to_listener(p))
    }
}
