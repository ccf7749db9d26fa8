//! The engine's event loop: one `select!` over the TUN, the UDP sockets, DERP events, netcheck
//! reports, daemon requests, netmaps, the relay-port pref, the next timer and the status tick.
//! Each wakeup handles what woke it, drains up to [`BATCH`] more packets of the same source, then
//! flushes what is queued for the network.

use std::io::IoSlice;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use super::api;
use super::device::Device;
use super::netcheck::LatencyReport;
use super::sockets::UdpSockets;
use super::{DropCounters, Engine, EngineError, BUF_LEN};
use crate::derp::client::Delivery;
use crate::netmap::NetworkMap;
use crate::paths;
use crate::report;
use crate::status::Status;
use crate::udp::offload;

/// Packets read from the TUN or the UDP sockets per wakeup at most (the rest waits for the next).
pub(super) const BATCH: usize = 64;

/// How often per-peer counters are copied into the status snapshot.
pub(super) const STATUS_EVERY: Duration = Duration::from_secs(1);

impl Engine {
    /// The earliest of the WireGuard timers, the path timers, the pending pings and a look for
    /// lost rules that a host change asked for.
    pub(super) fn next_deadline(&mut self) -> Option<Instant> {
        let wg = self.peers.next_deadline();
        let paths = self.paths.poll_timeout().map(|(t, _, _)| t);
        let pings = self.pending_pings.iter().map(|p| p.deadline).min();
        let retries = self.handshake_retries.values().filter_map(|r| r.due).min();
        let relays = self.relay_client.poll_timeout();
        [
            wg,
            paths,
            pings,
            retries,
            relays,
            self.next_key_expiry,
            self.host_check_due,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) async fn serve(
        &mut self,
        tun: &Device,
        udp: &UdpSockets,
        mut netmaps: watch::Receiver<Option<Arc<NetworkMap>>>,
        mut inbound: mpsc::Receiver<Delivery>,
        mut reports: mpsc::Receiver<LatencyReport>,
        mut requests: mpsc::Receiver<api::EngineRequest>,
        status: &watch::Sender<Status>,
        mut quad100_out: mpsc::Receiver<Vec<u8>>,
    ) -> Result<(), EngineError> {
        let mut tun_buf = vec![0u8; BUF_LEN + tern_platform::tun::VNET_HDR_LEN];
        let mut udp_buf = vec![0u8; BUF_LEN];
        let mut status_tick = tokio::time::interval(STATUS_EVERY);
        status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut logged_drops = DropCounters::default();
        let mut relay_port = self.relay_port.clone();
        let mut node_keys = self.node_keys.clone();
        let mut node_keys_open = true;
        self.apply_relay_port(*relay_port.borrow_and_update());
        // Without a sender (daemon gone) `changed()` would be ready forever: stop watching.
        let mut relay_port_open = true;
        let mut relay_static = self.relay_static.clone();
        let mut relay_static_open = true;
        let mut net_prefs = self.net_prefs.clone();
        let mut net_prefs_open = true;
        let mut host_changes = self.host_changes.take();
        let mut maintain_tick = maintain_interval(self.host_poll_every());
        loop {
            let deadline = self.next_deadline();
            let sleep_until = deadline
                .map(tokio::time::Instant::from_std)
                .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                r = tun.recv(&mut tun_buf) => {
                    let n = r.map_err(EngineError::TunIo)?;
                    self.read_from_tun(udp, &mut tun_buf, n);
                    self.drain_tun(tun, udp, &mut tun_buf)?;
                    if self.derp_backlogged() {
                        // Let the DERP tasks write before the next TUN read: on a one-thread
                        // runtime they run only when we yield, and one TUN batch of super-packets
                        // is thousands of packets, more than their queue holds.
                        tokio::task::yield_now().await;
                    }
                }
                Some(event) = inbound.recv() => {
                    let now = Instant::now();
                    self.on_derp_event(tun, event, now).await;
                    // A burst from DERP is handled in one wakeup, like UDP's: its packets can
                    // be coalesced for the TUN and the loop's fixed costs are paid once.
                    for _ in 0..BATCH {
                        let Ok(event) = inbound.try_recv() else { break };
                        self.on_derp_event(tun, event, now).await;
                    }
                }
                Some(report) = reports.recv() => {
                    self.on_latency_report(report, status);
                }
                Some(request) = requests.recv() => self.on_request(request),
                r = udp.recv(&mut udp_buf) => {
                    if let Ok(received) = r {
                        self.received(tun, &udp_buf, received).await;
                    }
                    self.drain_udp(tun, udp, &mut udp_buf).await;
                }
                changed = netmaps.changed() => {
                    if changed.is_err() {
                        return Ok(()); // control task gone: the daemon is stopping us
                    }
                    let map = netmaps.borrow_and_update().clone();
                    if let Some(map) = map {
                        self.apply_netmap(&map, tun).await?;
                        self.netmap = Some(map);
                        release_freed_heap();
                    }
                }
                _ = tokio::time::sleep_until(sleep_until), if deadline.is_some() => {
                    let now = Instant::now();
                    self.on_timers(now);
                    self.run_due_host_check(now).await;
                }
                changed = node_keys.changed(), if node_keys_open => {
                    if changed.is_ok() {
                        let key = node_keys.borrow_and_update().clone();
                        self.set_node_key(key);
                    } else {
                        node_keys_open = false;
                    }
                }
                changed = relay_port.changed(), if relay_port_open => {
                    if changed.is_ok() {
                        self.apply_relay_port(*relay_port.borrow_and_update());
                        self.publish(status);
                    } else {
                        relay_port_open = false;
                    }
                }
                changed = relay_static.changed(), if relay_static_open => {
                    if changed.is_ok() {
                        relay_static.borrow_and_update();
                        self.apply_relay_static();
                        self.publish(status);
                    } else {
                        relay_static_open = false;
                    }
                }
                changed = net_prefs.changed(), if net_prefs_open => {
                    if changed.is_ok() {
                        net_prefs.borrow_and_update();
                        self.on_net_prefs().await;
                        self.publish(status);
                    } else {
                        net_prefs_open = false;
                    }
                }
                _ = maintain_tick.tick() => self.maintain_host().await,
                changed = next_host_change(&mut host_changes) => match changed {
                    Some(()) => self.host_check_soon(Instant::now()),
                    None => {
                        host_changes = None;
                        if let Some(linux) = self.linux.as_mut() {
                            linux.watch_ended();
                        }
                    }
                },
                Some(packet) = quad100_out.recv() => write_tun(tun, Some(&packet)).await,
                _ = status_tick.tick() => {
                    // Netfilter's kind (legacy iptables announces nothing) is learnt late.
                    let poll_every = self.host_poll_every();
                    if poll_every != maintain_tick.period() {
                        maintain_tick = maintain_interval(poll_every);
                    }
                    self.retry_peerapi();
                    self.publish(status);
                    self.close_idle_derp(Instant::now());
                    let drops = self.drops;
                    if drops != logged_drops {
                        tracing::debug!(?drops, disco = ?self.paths.counters(), "data plane drop counters");
                        logged_drops = drops;
                    }
                }
            }
            self.flush_tun(tun).await;
            self.flush(udp);
            if std::mem::take(&mut self.paths_changed) {
                self.publish(status);
            }
        }
    }

    /// Packets that queued up on the TUN while we handled one: up to [`BATCH`] without going
    /// back to the event loop (its per-wakeup cost, timers included, is paid once per burst).
    pub(super) fn drain_tun(
        &mut self,
        tun: &Device,
        udp: &UdpSockets,
        buf: &mut [u8],
    ) -> Result<(), EngineError> {
        for _ in 0..BATCH {
            if self.derp_backlogged() {
                break;
            }
            match tun.try_recv(buf) {
                Ok(n) => self.read_from_tun(udp, buf, n),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(EngineError::TunIo(e)),
            }
        }
        Ok(())
    }

    /// Datagrams that queued up on the UDP sockets, up to [`BATCH`], each decrypted packet
    /// written to the TUN before the next is read (they share the output buffer).
    pub(super) async fn drain_udp(&mut self, tun: &Device, udp: &UdpSockets, buf: &mut [u8]) {
        for _ in 0..BATCH {
            let Ok(received) = udp.try_recv(buf) else {
                break;
            };
            self.received(tun, buf, received).await;
        }
    }

    /// Packets or a "peer gone" from a DERP region's connection.
    async fn on_derp_event(&mut self, tun: &Device, event: Delivery, now: Instant) {
        match event {
            Delivery::Packets { region, packets } => {
                self.note_frame_from(region, now);
                // A burst is mostly one peer's: its table lookups are done once.
                let mut sender = None;
                for (src, packet) in packets.iter() {
                    let to_tun = self.inbound_derp(now, region, *src, packet, &mut sender);
                    self.write_tun(tun, to_tun).await;
                }
            }
            Delivery::PeerGone { region, peer } => self.peer_gone(region, &peer),
        }
    }

    /// Handles what one UDP read brought: one datagram, or several that GRO coalesced.
    pub(super) async fn received(&mut self, tun: &Device, buf: &[u8], received: offload::Received) {
        let data = buf.get(..received.len).unwrap_or_default();
        let now = Instant::now();
        for datagram in offload::segments(data, received.segment) {
            let to_tun = self.udp_datagram(now, datagram, received.from);
            self.write_tun(tun, to_tun).await;
        }
    }

    /// What one TUN read brought (`n` bytes of `buf`): a packet, or with offloads a frame that
    /// may hold a TCP or UDP super-packet to cut into packets first.
    pub(super) fn read_from_tun(&mut self, udp: &UdpSockets, buf: &mut [u8], n: usize) {
        let Some(frame) = buf.get_mut(..n) else {
            return;
        };
        // One clock reading for the frame's packets (a super-packet is up to ~50 of them).
        let now = Instant::now();
        if !self.tun_offload.enabled {
            self.outbound(udp, now, frame);
            return;
        }
        // The packets of one frame are one flow: routed and planned once (see outbound_in_frame).
        let mut route = None;
        let result = crate::vnet::split(frame, |packet| {
            self.outbound_in_frame(udp, now, packet, &mut route)
        });
        self.tun_offload.note_split(result);
    }

    /// The decrypted packet of length `len` at the start of `self.out`, for the TUN: written
    /// now, or with offloads queued for [`Self::flush_tun`] at the end of the wakeup.
    pub(super) async fn write_tun(&mut self, tun: &Device, len: Option<usize>) {
        let packet = len.and_then(|n| self.out.get(..n));
        if !self.tun_offload.enabled {
            write_tun(tun, packet).await;
            return;
        }
        if let Some(packet) = packet {
            if self.tun_offload.push(packet) {
                self.flush_tun(tun).await;
            }
        }
    }

    /// Writes what the coalescer holds (offloads on; nothing otherwise).
    pub(super) async fn flush_tun(&mut self, tun: &Device) {
        let Some(kernel) = tun.kernel().filter(|_| self.tun_offload.enabled) else {
            return;
        };
        while let Some(frame) = self.tun_offload.next_frame() {
            let mut iov = [IoSlice::new(&[]); crate::vnet::coalesce::MAX_PARTS];
            let mut parts = 0;
            for (slot, part) in iov.iter_mut().zip(frame.parts()) {
                *slot = IoSlice::new(part);
                parts += 1;
            }
            if let Err(e) = kernel.send_frame_vectored(&iov[..parts]).await {
                tracing::debug!(error = %e, "TUN write failed");
            }
        }
    }

    /// Due WireGuard timers, path timers and `tern ping` timeouts.
    pub(super) fn on_timers(&mut self, now: Instant) {
        let to_send = &mut self.to_send;
        self.peers.update_timers(now, &mut self.out, |id, b| {
            to_send.push((id, b.to_vec()));
        });
        self.paths.handle_timeout(now);
        self.relay_client.handle_timeout(now);
        self.run_handshake_retries(now);
        if self.next_key_expiry.is_some_and(|t| t <= now) {
            // A peer's key just expired: it is no longer a peer (Go drops it from WireGuard).
            if let Some(map) = self.netmap.clone() {
                self.sync_peers(&map);
            }
        }
        let (expired, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending_pings)
            .into_iter()
            .partition(|p| p.deadline <= now);
        self.pending_pings = waiting;
        for ping in expired {
            let error = if ping.tx_ids.is_empty() {
                "no path to the peer (no DERP region, no endpoints)"
            } else {
                "timeout"
            };
            let _ = ping.reply.send(report::PingResult {
                error: Some(error.into()),
                ..Default::default()
            });
        }
    }

    pub(super) fn on_path_event(&mut self, event: paths::PeerEvent) {
        match event.event {
            paths::Event::PathChanged(change) => {
                tracing::info!(peer = %event.peer, from = ?change.from, to = ?change.to, reason = %change.reason, "path");
                let to = super::publish::path_fields(change.to).0;
                *self
                    .path_changes
                    .entry((to, change.reason.as_str()))
                    .or_default() += 1;
                self.paths_changed = true;
            }
            paths::Event::NeedEndpointRefresh => self.netcheck_trigger.notify_one(),
            paths::Event::Pong {
                tx_id,
                via,
                latency,
                cli: true,
                ..
            } => self.answer_ping(event.peer, tx_id, via, latency),
            paths::Event::Pong { .. } | paths::Event::AddrForPeer(_) => {}
            paths::Event::RelayAllocRequest(request) => {
                self.answer_relay_allocation(event.peer, &request)
            }
            paths::Event::WantRelayPaths => self.discover_relays(event.peer),
            paths::Event::CallMeMaybeVia(endpoint) => {
                self.on_call_me_maybe_via(event.peer, endpoint)
            }
            paths::Event::RelayAllocResponse(response) => {
                self.on_relay_alloc_response(event.peer, &response)
            }
        }
    }
}

/// The fallback look for lost rules, every `period` from now on.
fn maintain_interval(period: Duration) -> tokio::time::Interval {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick
}

/// The next announced host change; never, without a watch.
async fn next_host_change(changes: &mut Option<mpsc::Receiver<()>>) -> Option<()> {
    match changes {
        Some(changes) => changes.recv().await,
        None => std::future::pending().await,
    }
}

/// Hands the heap pages freed since the last netmap back to the kernel. Decoding and applying a
/// large netmap leaves megabytes of freed temporaries that glibc would keep mapped (counted in
/// RSS) until reused; netmaps are rare, the trim takes about a millisecond.
fn release_freed_heap() {
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::malloc_trim(0);
    }
}

pub(super) async fn write_tun(tun: &Device, packet: Option<&[u8]>) {
    if let Some(packet) = packet {
        if let Err(e) = tun.send(packet).await {
            tracing::debug!(error = %e, "TUN write failed");
        }
    }
}
