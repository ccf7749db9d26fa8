//! Quad-100 in TUN mode: the kernel routes 100.100.100.100 (and fd7a:115c:a1e0::53) into the
//! TUN (table 52); the engine hands those packets to the netstack task instead of WireGuard
//! and writes what it answers back to the TUN. MagicDNS answers from the netmap; other names
//! are forwarded to control's resolvers or the host's own (what /etc/resolv.conf said before
//! tern pointed it here).

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::{mpsc, watch};

use super::AbortOnDrop;
use crate::dns::config::MagicDnsConfig;
use crate::dns::magic::{self, Outcome};
use crate::netmap::NetworkMap;
use crate::netstack::{self, DnsService, NetstackCounters, Reply};

/// Packets queued towards the netstack task at most (more are dropped and counted).
const QUEUE: usize = 256;

pub(super) struct Quad100 {
    inbound: mpsc::Sender<Vec<u8>>,
    config: watch::Sender<Arc<MagicDnsConfig>>,
    counters: watch::Receiver<NetstackCounters>,
    base_resolvers: Vec<SocketAddr>,
    /// Packets for quad-100 dropped because the netstack's queue was full.
    pub(super) dropped: u64,
    _task: AbortOnDrop,
}

impl Quad100 {
    /// Starts the netstack task; its packets for the TUN arrive on the returned receiver.
    /// `base_resolvers`: the host's own nameservers, for names nothing else routes.
    pub(super) fn start(
        ipv6: bool,
        base_resolvers: Vec<SocketAddr>,
    ) -> (Self, mpsc::Receiver<Vec<u8>>) {
        let (in_tx, in_rx) = mpsc::channel(QUEUE);
        let (out_tx, out_rx) = mpsc::channel(QUEUE);
        let (config_tx, config_rx) = watch::channel(Arc::new(MagicDnsConfig::default()));
        let (counters_tx, counters_rx) = watch::channel(NetstackCounters::default());
        let service = Arc::new(MagicDns { config: config_rx });
        let task = tokio::spawn(netstack::run(ipv6, in_rx, out_tx, service, counters_tx));
        let quad = Quad100 {
            inbound: in_tx,
            config: config_tx,
            counters: counters_rx,
            base_resolvers,
            dropped: 0,
            _task: AbortOnDrop(task),
        };
        (quad, out_rx)
    }

    /// A packet from the TUN for quad-100.
    pub(super) fn divert(&mut self, packet: &[u8]) {
        if self.inbound.try_send(packet.to_vec()).is_err() {
            self.dropped += 1;
        }
    }

    /// MagicDNS follows the netmap (and the exit node's DNS over HTTP while one that offers it
    /// is in use); returns the config it now answers with.
    pub(super) fn set_netmap(
        &self,
        map: &NetworkMap,
        exit_doh: Option<SocketAddr>,
    ) -> Arc<MagicDnsConfig> {
        let mut config = MagicDnsConfig::from_netmap(map);
        config.base_resolvers = self.base_resolvers.clone();
        if let Some(doh) = exit_doh {
            config.use_exit_node_dns(map, doh);
        }
        let config = Arc::new(config);
        self.config.send_replace(config.clone());
        config
    }

    /// The exit node's DNS over HTTP that MagicDNS forwards to now, if any.
    pub(super) fn exit_doh(&self) -> Option<SocketAddr> {
        self.config.borrow().exit_doh
    }

    /// MagicDNS as it answers now, for the proxies' name lookups.
    pub(super) fn subscribe(&self) -> watch::Receiver<Arc<MagicDnsConfig>> {
        self.config.subscribe()
    }

    pub(super) fn counters(&self) -> NetstackCounters {
        *self.counters.borrow()
    }
}

/// The DNS service of quad-100: MagicDNS, else the forwarder.
struct MagicDns {
    config: watch::Receiver<Arc<MagicDnsConfig>>,
}

impl DnsService for MagicDns {
    fn query(&self, query: &[u8], tcp: bool) -> Reply {
        let config = self.config.borrow().clone();
        let max_len = if tcp {
            magic::MAX_TCP_RESPONSE
        } else {
            magic::MAX_UDP_RESPONSE
        };
        match magic::respond(&config, query, max_len) {
            Outcome::Answer(answer) => Reply::Now(answer),
            Outcome::Drop => Reply::None,
            Outcome::Forward { upstreams, query } => Reply::Later(Box::pin(async move {
                match crate::dns::forward::forward(&upstreams, &query, tcp).await {
                    Ok(answer) => magic::fit_reply(&answer, max_len),
                    Err(e) => {
                        tracing::debug!(error = %e, "forwarding a DNS query");
                        magic::servfail(&query)
                    }
                }
            })),
            Outcome::ForwardDoh { server, query } => Reply::Later(Box::pin(async move {
                match crate::dns::doh::exchange(server, &query).await {
                    Ok(answer) => magic::fit_reply(&answer, max_len),
                    Err(e) => {
                        tracing::debug!(error = %e, "asking the exit node's DNS");
                        magic::servfail(&query)
                    }
                }
            })),
        }
    }
}
