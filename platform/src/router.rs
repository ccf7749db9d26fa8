//! Routes into the TUN. This issue installs plain routes (main table by default); policy
//! routing (table 52, ip rules, throw routes) comes later behind the same trait.

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

/// Routes via netlink through one interface, in one table.
pub struct NetlinkRouter {
    netlink: Netlink,
    index: u32,
    table: u32,
    installed: Vec<IpNet>,
}

impl NetlinkRouter {
    /// A router for interface `index`, using the main table.
    pub fn new(netlink: Netlink, index: u32) -> Self {
        Self {
            netlink,
            index,
            table: TABLE_MAIN,
            installed: Vec::new(),
        }
    }

    /// Uses `table` instead of main (e.g. 52 once policy rules exist).
    pub fn with_table(mut self, table: u32) -> Self {
        self.table = table;
        self
    }

    /// The routes installed now, as the kernel reports them.
    pub async fn kernel_routes(&self) -> Result<Vec<IpNet>> {
        self.netlink.routes_via(self.index, self.table).await
    }
}

impl Router for NetlinkRouter {
    async fn set_routes(&mut self, routes: &[IpNet]) -> Result<()> {
        let wanted: Vec<IpNet> = routes.iter().map(IpNet::trunc).collect();
        for dst in &wanted {
            self.netlink
                .replace_route(self.index, *dst, self.table)
                .await?;
        }
        for old in std::mem::take(&mut self.installed) {
            if !wanted.contains(&old) {
                self.netlink
                    .delete_route(self.index, old, self.table)
                    .await?;
            }
        }
        self.installed = wanted;
        Ok(())
    }

    async fn close(&mut self) -> Result<()> {
        self.set_routes(&[]).await
    }
}
