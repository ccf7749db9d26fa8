//! The host side of the data plane: ip rules, table 52 and netfilter, applied in tailscaled's
//! order and taken away on every way out (clean stop, abort, panic; SIGKILL is for the next
//! start's cleanup pass, [`cleanup_host`]).
//!
//! Start: rules (safe before any route: table 52 is empty) → netfilter. Per netmap or pref
//! change: throw routes → new routes → stale routes go → netfilter addresses/port/SNAT.
//! When the host announces a change to rules, addresses or nftables ([`HostWatch`]), and every
//! 30 s anyway (every 2 s where changes go unannounced: legacy iptables, no netlink groups):
//! rules or netfilter objects that someone deleted are put back.
//! Stop: rules → routes and throw routes → netfilter.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipnet::IpNet;
use tern_platform::netfilter::{self, Netfilter, NetfilterConfig, NetfilterMode};
use tern_platform::netlink::{Netlink, TABLE_MAIN};
use tern_platform::policy::{self, TS_TABLE};
use tern_platform::router::{NetlinkRouter, RouteSet};
use tern_platform::tun::{LinuxTun, Tun as _};
use tern_platform::watch::HostWatch;
use tokio::sync::mpsc;

use crate::routing::{LocalPrefixes, RoutePlan};
use crate::status::RoutingStatus;

/// How often lost rules and netfilter objects are looked for when nobody would tell us.
pub(super) const POLL_EVERY: Duration = Duration::from_secs(2);

/// How often they are looked for anyway while changes are announced (a lost announcement).
pub(super) const WATCHED_POLL_EVERY: Duration = Duration::from_secs(30);

/// How long after an announced change the look happens: one look for a burst of changes (a
/// firewall reload is many messages over some milliseconds).
pub(super) const SETTLE: Duration = Duration::from_millis(200);

/// What the engine asks the host for, besides the plan: netfilter inputs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct FirewallInputs {
    pub mode: NetfilterMode,
    pub addrs: Vec<IpNet>,
    pub port: u16,
    pub snat: bool,
    pub stateful: bool,
}

pub(super) struct LinuxNet {
    netlink: Netlink,
    router: NetlinkRouter,
    /// Whether the kernel does policy routing (else routes go to main and no rules exist).
    policy: bool,
    ipv6: bool,
    tun_name: String,
    /// Shared with blocking tasks (netfilter runs subprocesses).
    netfilter: Option<Arc<Mutex<Netfilter>>>,
    netfilter_error: Option<String>,
    firewall: Option<FirewallInputs>,
    local: LocalPrefixes,
    plan: RoutePlan,
    closed: bool,
    /// Whether rule and address changes are announced to us (the host watch runs).
    watching: bool,
    /// Whether nftables changes are too (nfnetlink could be joined).
    watching_netfilter: bool,
    /// Whether our netfilter kind's changes reach nfnetlink (nft, iptables-nft).
    netfilter_announced: bool,
    /// Looks for lost rules since start.
    checks: u64,
}

impl LinuxNet {
    /// Installs the ip rules for `tun` (netfilter follows with the first [`Self::apply_firewall`]).
    pub(super) async fn start(tun: &LinuxTun, ipv6: bool) -> Self {
        let netlink = tun.netlink().clone();
        let policy = netlink.rules_supported().await;
        if policy {
            if let Err(e) = netlink.add_policy_rules(ipv6).await {
                tracing::warn!(error = %e, "ip rules");
            }
        } else {
            tracing::warn!(
                "no policy routing in this kernel (ip rule fails): routes go to main and an exit \
                 node cannot be used safely"
            );
        }
        let table = if policy { TS_TABLE } else { TABLE_MAIN };
        Self {
            router: NetlinkRouter::new(netlink.clone(), tun.index()).with_table(table),
            netlink,
            policy,
            ipv6,
            tun_name: tun.name().to_string(),
            netfilter: None,
            netfilter_error: None,
            firewall: None,
            local: LocalPrefixes::default(),
            plan: RoutePlan::default(),
            closed: false,
            watching: false,
            watching_netfilter: false,
            netfilter_announced: false,
            checks: 0,
        }
    }

    /// Starts hearing of host changes: a task forwards each burst as one pending `()` (a channel
    /// of one), and the channel closes if the watch fails. None where netlink groups cannot be
    /// joined: then only polling finds lost rules.
    pub(super) fn watch(&mut self) -> Option<(super::AbortOnDrop, mpsc::Receiver<()>)> {
        let watch = match HostWatch::open() {
            Ok(watch) => watch,
            Err(e) => {
                tracing::info!(error = %e, "no host change notifications: polling every {POLL_EVERY:?}");
                return None;
            }
        };
        self.watching = true;
        self.watching_netfilter = watch.sees_netfilter();
        let (tx, rx) = mpsc::channel(1);
        let task = tokio::spawn(forward_host_changes(watch, tx));
        Some((super::AbortOnDrop(task), rx))
    }

    /// The watch ended (its task logged why): from now on, polling.
    pub(super) fn watch_ended(&mut self) {
        self.watching = false;
    }

    /// How often to look for lost rules without being told to.
    pub(super) fn poll_every(&self) -> Duration {
        let firewall_heard =
            self.netfilter.is_none() || (self.watching_netfilter && self.netfilter_announced);
        if self.watching && firewall_heard {
            WATCHED_POLL_EVERY
        } else {
            POLL_EVERY
        }
    }

    /// Whether policy routing is on (exit nodes need it).
    pub(super) fn policy_routing(&self) -> bool {
        self.policy
    }

    /// The host's own prefixes as last read.
    pub(super) fn local_prefixes(&self) -> &LocalPrefixes {
        &self.local
    }

    /// Re-reads the host's interface prefixes (the TUN's own are not the LAN).
    pub(super) async fn refresh_local_prefixes(&mut self) {
        match self.netlink.interface_prefixes().await {
            Ok(all) => {
                let tun = self.router.index();
                self.local = LocalPrefixes::from_interfaces(
                    all.iter()
                        .filter(|p| p.index != tun)
                        .map(|p| (p.loopback, &p.prefix)),
                );
            }
            Err(e) => tracing::warn!(error = %e, "reading interface addresses"),
        }
    }

    /// Makes table 52 exactly `plan` (throw routes first, then new routes, then stale ones go).
    pub(super) async fn apply_routes(&mut self, plan: &RoutePlan) {
        if *plan == self.plan {
            return;
        }
        let set = RouteSet {
            via_tun: plan.via_tun.clone(),
            throw: if self.policy {
                plan.throw.clone()
            } else {
                Vec::new() // throw routes mean nothing without the rules
            },
        };
        match self.router.set(&set).await {
            Ok(()) => self.plan = plan.clone(),
            Err(e) => tracing::warn!(error = %e, "routes"),
        }
    }

    /// Brings netfilter in line with `inputs` (detecting the kind the first time).
    pub(super) async fn apply_firewall(&mut self, inputs: FirewallInputs) {
        if self.firewall.as_ref() == Some(&inputs) {
            return;
        }
        if inputs.mode != NetfilterMode::Off && self.netfilter.is_none() {
            match tokio::task::spawn_blocking(netfilter::detect_kind).await {
                Ok(Ok(kind)) => self.netfilter = Some(Arc::new(Mutex::new(Netfilter::new(kind)))),
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "netfilter");
                    self.netfilter_error = Some(e.to_string());
                }
                Err(e) => self.netfilter_error = Some(e.to_string()),
            }
        }
        let Some(nf) = self.netfilter.clone() else {
            self.firewall = Some(inputs);
            return;
        };
        let config = NetfilterConfig {
            tun_name: self.tun_name.clone(),
            mode: inputs.mode,
            addrs: inputs.addrs.clone(),
            magicsock_port: (inputs.port != 0).then_some(inputs.port),
            snat_subnet_routes: inputs.snat,
            stateful_filtering: inputs.stateful,
            ipv6: self.ipv6,
        };
        let applied = tokio::task::spawn_blocking(move || {
            let mut nf = nf
                .lock()
                .map_err(|_| "netfilter lock poisoned".to_string())?;
            nf.apply(&config).map_err(|e| e.to_string())?;
            Ok(nf.changes_announced())
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r);
        match applied {
            Ok(announced) => {
                self.netfilter_error = None;
                self.netfilter_announced = announced;
            }
            Err(e) => {
                tracing::error!(error = %e, "netfilter");
                self.netfilter_error = Some(e);
            }
        }
        self.firewall = Some(inputs);
    }

    /// Puts back rules and netfilter objects someone removed (systemd-networkd drops foreign
    /// rules, a firewall reload flushes chains). Returns whether anything was restored.
    pub(super) async fn maintain(&mut self) -> bool {
        self.checks += 1;
        let mut restored = false;
        if self.policy && !matches!(self.netlink.policy_rules_present(self.ipv6).await, Ok(true)) {
            tracing::warn!("ip rules 5210-5270 went missing; adding them again");
            if let Err(e) = self.netlink.add_policy_rules(self.ipv6).await {
                tracing::warn!(error = %e, "ip rules");
            }
            restored = true;
        }
        if let Some(nf) = self.netfilter.clone() {
            let result = tokio::task::spawn_blocking(move || {
                nf.lock()
                    .map_err(|_| "netfilter lock poisoned".to_string())?
                    .restore_if_missing()
                    .map_err(|e| e.to_string())
            })
            .await;
            match result {
                Ok(Ok(again)) => restored |= again,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "restoring netfilter");
                    self.netfilter_error = Some(e);
                }
                Err(e) => tracing::warn!(error = %e, "restoring netfilter"),
            }
        }
        restored
    }

    /// The status view of what is applied.
    pub(super) fn status(&self, into: &mut RoutingStatus) {
        into.table = self.router.table();
        into.policy_rules = self.policy;
        into.routes = self.plan.via_tun.iter().map(ToString::to_string).collect();
        into.throw_routes = self.plan.throw.iter().map(ToString::to_string).collect();
        into.netfilter_kind = self
            .netfilter
            .as_ref()
            .and_then(|nf| nf.lock().ok().map(|n| n.kind().to_string()));
        into.netfilter_mode = self
            .firewall
            .as_ref()
            .map(|f| f.mode.to_string())
            .unwrap_or_default();
        into.netfilter_error = self.netfilter_error.clone();
        into.route_messages = self.router.messages_sent();
        into.host_checks = self.checks;
        into.host_changes_announced = self.watching;
        into.host_poll_secs = self.poll_every().as_secs();
    }

    /// Clean stop, in tailscaled's order: rules, routes, netfilter. Marked closed only at the
    /// end: when the task is aborted halfway (the daemon aborts it right after ending the
    /// control session), `Drop` does it all again (every step is idempotent).
    pub(super) async fn close(&mut self) {
        if self.closed {
            return;
        }
        if self.policy {
            if let Err(e) = self.netlink.delete_policy_rules(self.ipv6).await {
                tracing::warn!(error = %e, "removing ip rules");
            }
        }
        if let Err(e) = self.router.set(&RouteSet::default()).await {
            tracing::warn!(error = %e, "removing routes");
        }
        if let Some(nf) = self.netfilter.clone() {
            let _ = tokio::task::spawn_blocking(move || remove_netfilter(&nf)).await;
        }
        self.closed = true;
    }
}

/// Hands the watch's announcements on until it fails or the engine is gone.
async fn forward_host_changes(watch: HostWatch, changes: mpsc::Sender<()>) {
    loop {
        if let Err(e) = watch.changed().await {
            tracing::warn!(error = %e, "host change notifications failed: polling every {POLL_EVERY:?}");
            return;
        }
        // Full: a look is pending already, which will see this change too.
        if let Err(mpsc::error::TrySendError::Closed(())) = changes.try_send(()) {
            return;
        }
    }
}

fn remove_netfilter(nf: &Mutex<Netfilter>) {
    if let Ok(mut nf) = nf.lock() {
        if let Err(e) = nf.remove() {
            tracing::warn!(error = %e, "removing netfilter");
        }
    }
}

impl Drop for LinuxNet {
    /// An aborted or panicking engine never reaches `close`: undo the host changes here, on a
    /// thread of its own (netlink needs a runtime, and this may run inside one).
    fn drop(&mut self) {
        if self.closed {
            return;
        }
        let netfilter = self.netfilter.take();
        let (policy, ipv6) = (self.policy, self.ipv6);
        let cleanup = std::thread::spawn(move || {
            if let Some(nf) = netfilter {
                remove_netfilter(&nf);
            }
            if policy {
                let _ = remove_routing(ipv6);
            }
        });
        let _ = cleanup.join();
    }
}

/// Rules and table 52's throw routes, from a runtime of its own.
fn remove_routing(ipv6: bool) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async {
        let netlink = Netlink::connect().map_err(|e| e.to_string())?;
        netlink
            .delete_policy_rules(ipv6)
            .await
            .map_err(|e| e.to_string())?;
        netlink
            .flush_tunnel_independent_routes(TS_TABLE)
            .await
            .map_err(|e| e.to_string())
            .map(drop)
    })
}

/// The cleanup pass of a daemon start and `tern daemon --cleanup`: whatever a killed tern (or
/// Go tailscaled) left: /etc/resolv.conf pointing at quad-100, netfilter chains and jumps, ip
/// rules 5210–5270, table 52's throw and unreachable routes. Each step runs even when one fails; the errors are returned together.
pub async fn cleanup_host() -> Result<(), String> {
    let mut errors = Vec::new();
    // DNS first: a resolv.conf still pointing at a dead quad-100 breaks every lookup.
    match crate::dns::os::DirectFiles::system().restore() {
        Ok(true) => {
            tracing::info!("restored /etc/resolv.conf a previous run left pointing at quad-100")
        }
        Ok(false) => {}
        Err(e) => errors.push(format!("DNS: {e}")),
    }
    // openresolv: a record a killed run left (removing none is no error).
    let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    if crate::dns::os::Manager::detect(&text) == crate::dns::os::Manager::Resolvconf
        && crate::dns::resolvconf::flavor().await
            == Some(crate::dns::resolvconf::Flavor::Openresolv)
    {
        if let Err(e) = crate::dns::resolvconf::clear().await {
            errors.push(format!("DNS: {e}"));
        }
    }
    match tokio::task::spawn_blocking(netfilter::cleanup_all).await {
        Ok(Err(e)) => errors.push(format!("netfilter: {e}")),
        Err(e) => errors.push(format!("netfilter: {e}")),
        Ok(Ok(())) => {}
    }
    match Netlink::connect() {
        Ok(netlink) => match policy::cleanup(&netlink).await {
            Ok(done) if done.rules + done.routes > 0 => tracing::info!(
                rules = done.rules,
                routes = done.routes,
                "removed rules and routes a previous run left"
            ),
            Ok(_) => {}
            Err(e) => errors.push(format!("routing: {e}")),
        },
        Err(e) => errors.push(format!("routing: {e}")),
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}
