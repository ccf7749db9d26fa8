//! A thin async rtnetlink wrapper: links, addresses and routes by interface index.

use std::net::IpAddr;

use futures_util::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::LinkFlags;
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

use crate::error::{PlatformError, Result};

/// The main routing table.
pub const TABLE_MAIN: u32 = 254;

/// One address of the host, with the interface it is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InterfacePrefix {
    pub index: u32,
    pub loopback: bool,
    pub prefix: IpNet,
}

/// A netlink connection bound to the network namespace of the thread that opened it.
#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
}

/// The address of an address message with its prefix length.
fn address_prefix(m: &AddressMessage) -> Option<IpNet> {
    let ip = m.attributes.iter().find_map(|a| match a {
        AddressAttribute::Address(ip) => Some(*ip),
        _ => None,
    })?;
    IpNet::new(ip, m.header.prefix_len).ok()
}

pub(crate) fn nl(op: &'static str) -> impl FnOnce(rtnetlink::Error) -> PlatformError {
    move |source| PlatformError::Netlink { op, source }
}

/// Whether a netlink error is the given errno (e.g. ESRCH for a route already gone).
pub(crate) fn is_errno(e: &rtnetlink::Error, errno: i32) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -errno)
}

impl Netlink {
    /// Opens a connection; must run inside a tokio runtime (it spawns the socket task).
    pub fn connect() -> Result<Self> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(PlatformError::Socket)?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    /// The rtnetlink handle, for the modules of this crate.
    pub(crate) fn handle(&self) -> &Handle {
        &self.handle
    }

    /// The index of interface `name`.
    pub async fn link_index(&self, name: &str) -> Result<u32> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match links.try_next().await {
            Ok(Some(link)) => Ok(link.header.index),
            Ok(None) => Err(PlatformError::NoSuchLink(name.to_string())),
            Err(e) if is_errno(&e, libc::ENODEV) => Err(PlatformError::NoSuchLink(name.into())),
            Err(e) => Err(nl("link get")(e)),
        }
    }

    /// Sets the MTU and brings the link up.
    pub async fn set_link_up(&self, index: u32, mtu: u32) -> Result<()> {
        let msg = LinkUnspec::new_with_index(index).mtu(mtu).up().build();
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(nl("link set"))
    }

    /// Adds (or replaces) an address on a link, e.g. `100.64.0.1/32`.
    pub async fn replace_address(&self, index: u32, addr: IpNet) -> Result<()> {
        self.handle
            .address()
            .add(index, addr.addr(), addr.prefix_len())
            .replace()
            .execute()
            .await
            .map_err(nl("address add"))
    }

    /// The addresses on a link.
    pub async fn addresses(&self, index: u32) -> Result<Vec<IpNet>> {
        let msgs: Vec<_> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(nl("address get"))?;
        Ok(msgs.iter().filter_map(address_prefix).collect())
    }

    /// Removes an address from a link; an address already gone is fine.
    pub async fn delete_address(&self, index: u32, addr: IpNet) -> Result<()> {
        let msgs: Vec<_> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .set_address_filter(addr.addr())
            .set_prefix_length_filter(addr.prefix_len())
            .execute()
            .try_collect()
            .await
            .map_err(nl("address get"))?;
        for m in msgs {
            match self.handle.address().del(m).execute().await {
                Err(e) if !is_errno(&e, libc::EADDRNOTAVAIL) => return Err(nl("address del")(e)),
                _ => {}
            }
        }
        Ok(())
    }

    /// Every address on every interface as (interface index, is-loopback, prefix): what
    /// routing needs to know of the host's own networks.
    pub async fn interface_prefixes(&self) -> Result<Vec<InterfacePrefix>> {
        let links: Vec<_> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(nl("link get"))?;
        let loopback: std::collections::HashSet<u32> = links
            .iter()
            .filter(|l| l.header.flags.contains(LinkFlags::Loopback))
            .map(|l| l.header.index)
            .collect();
        let msgs: Vec<_> = self
            .handle
            .address()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(nl("address get"))?;
        Ok(msgs
            .iter()
            .filter_map(|m| {
                Some(InterfacePrefix {
                    index: m.header.index,
                    loopback: loopback.contains(&m.header.index),
                    prefix: address_prefix(m)?,
                })
            })
            .collect())
    }

    fn route_message(index: u32, dst: IpNet, table: u32) -> Result<RouteMessage> {
        let builder = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(dst.network(), dst.prefix_len())
            .map_err(|e| PlatformError::InvalidRoute(dst, e.to_string()))?;
        Ok(builder.output_interface(index).table_id(table).build())
    }

    /// Adds (or replaces) a route to `dst` through link `index` in `table`.
    pub async fn replace_route(&self, index: u32, dst: IpNet, table: u32) -> Result<()> {
        let msg = Self::route_message(index, dst, table)?;
        self.handle
            .route()
            .add(msg)
            .replace()
            .execute()
            .await
            .map_err(nl("route add"))
    }

    /// Deletes a route; one already gone (ESRCH) is fine.
    pub async fn delete_route(&self, index: u32, dst: IpNet, table: u32) -> Result<()> {
        let msg = Self::route_message(index, dst, table)?;
        match self.handle.route().del(msg).execute().await {
            Err(e) if !is_errno(&e, libc::ESRCH) => Err(nl("route del")(e)),
            _ => Ok(()),
        }
    }

    /// Destinations of the routes we (not the kernel) put through link `index` in `table`.
    pub async fn routes_via(&self, index: u32, table: u32) -> Result<Vec<IpNet>> {
        let mut out = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut query = RouteMessageBuilder::<IpAddr>::new().build();
            query.header.address_family = family;
            let msgs: Vec<RouteMessage> = self
                .handle
                .route()
                .get(query)
                .execute()
                .try_collect()
                .await
                .map_err(nl("route get"))?;
            out.extend(msgs.iter().filter_map(|m| route_dst_via(m, index, table)));
        }
        Ok(out)
    }
}

fn route_dst_via(m: &RouteMessage, index: u32, table: u32) -> Option<IpNet> {
    let oif = m.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(i) => Some(*i),
        _ => None,
    })?;
    let msg_table = crate::policy::route_table(m);
    // The kernel adds its own (fe80::/64, IPv6 address prefixes); those are not ours.
    if oif != index || msg_table != table || m.header.protocol == RouteProtocol::Kernel {
        return None;
    }
    let ip: IpAddr = m.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(RouteAddress::Inet(v4)) => Some(IpAddr::V4(*v4)),
        RouteAttribute::Destination(RouteAddress::Inet6(v6)) => Some(IpAddr::V6(*v6)),
        _ => None,
    })?;
    IpNet::new(ip, m.header.destination_prefix_length).ok()
}
