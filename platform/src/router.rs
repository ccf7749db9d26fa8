//! Routes into the TUN: plain routes in main (tests, hosts without policy routing) or, with
//! [`crate::policy`]'s rules, table 52 with throw routes.

use std::collections::BTreeSet;
use std::future::Future;

use ipnet::IpNet;

use crate::error::Result;
use crate::netlink::{Netlink, TABLE_MAIN};

/// The Tailscale CGNAT range (IPv4 node addresses).
pub const CGNAT_V4: &str = "100.64.0.0/10";
/// The Tailscale ULA range (IPv6 node addresses).
pub const TAILSCALE_ULA_V6: &str = "fd7a:115c:a1e0::/48";

/// The two routes every node needs: the CGNAT range and the Tailscale ULA.
pub fn default_routes() -> Vec<IpNet> {
    [CGNAT_V4, TAILSCALE_ULA_V6]
        .iter()
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// Installs the routes that send traffic into the TUN.
pub trait Router: Send {
    /// Makes the installed routes exactly `routes` (adds missing, removes stale).
    fn set_routes(&mut self, routes: &[IpNet]) -> impl Future<Output = Result<()>> + Send;
    /// Removes every route this router installed.
    fn close(&mut self) -> impl Future<Output = Result<()>> + Send;
}

/// What a router installs: routes into the TUN and `throw` routes (lookups that leave the
/// table and continue in main, e.g. the LAN while an exit node is in use).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteSet {
    pub via_tun: Vec<IpNet>,
    pub throw: Vec<IpNet>,
}

/// Routes via netlink through one interface, in one table. Changes are diffs against what it
/// installed (add new, then delete old), so a netmap that changes one peer costs one message.
pub struct NetlinkRouter {
    netlink: Netlink,
    index: u32,
    table: u32,
    installed: BTreeSet<IpNet>,
    throws: BTreeSet<IpNet>,
    messages: u64,
}

impl NetlinkRouter {
    /// A router for interface `index`, using the main table.
    pub fn new(netlink: Netlink, index: u32) -> Self {
        Self {
            netlink,
            index,
            table: TABLE_MAIN,
            installed: BTreeSet::new(),
            throws: BTreeSet::new(),
            messages: 0,
        }
    }

    /// Uses `table` instead of main (52 with policy rules).
    pub fn with_table(mut self, table: u32) -> Self {
        self.table = table;
        self
    }

    /// The interface the routes go through.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The table this router writes.
    pub fn table(&self) -> u32 {
        self.table
    }

    /// The routes installed now, as the kernel reports them.
    pub async fn kernel_routes(&self) -> Result<Vec<IpNet>> {
        self.netlink.routes_via(self.index, self.table).await
    }

    /// Netlink route messages sent so far (adds and deletes).
    pub fn messages_sent(&self) -> u64 {
        self.messages
    }

    /// Makes the installed routes exactly `set`. Order as tailscaled: throw routes first (so LAN
    /// sessions survive a default route appearing), then new routes, then the stale ones go.
    pub async fn set(&mut self, set: &RouteSet) -> Result<()> {
        let throws: BTreeSet<IpNet> = set.throw.iter().map(IpNet::trunc).collect();
        let routes: BTreeSet<IpNet> = set.via_tun.iter().map(IpNet::trunc).collect();
        for dst in throws.difference(&self.throws) {
            self.netlink.replace_throw_route(*dst, self.table).await?;
            self.messages += 1;
        }
        for dst in routes.difference(&self.installed) {
            self.netlink
                .replace_route(self.index, *dst, self.table)
                .await?;
            self.messages += 1;
        }
        for dst in self.installed.difference(&routes) {
            self.netlink
                .delete_route(self.index, *dst, self.table)
                .await?;
            self.messages += 1;
        }
        for dst in self.throws.difference(&throws) {
            self.netlink.delete_throw_route(*dst, self.table).await?;
            self.messages += 1;
        }
        self.installed = routes;
        self.throws = throws;
        Ok(())
    }
}

impl Router for NetlinkRouter {
    async fn set_routes(&mut self, routes: &[IpNet]) -> Result<()> {
        let throw = self.throws.iter().copied().collect();
        self.set(&RouteSet {
            via_tun: routes.to_vec(),
            throw,
        })
        .await
    }

    async fn close(&mut self) -> Result<()> {
        self.set(&RouteSet::default()).await
    }
}
