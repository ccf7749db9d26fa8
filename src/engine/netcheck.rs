//! Netcheck in the engine: a task that runs STUN on the engine's own sockets (at start, on DERP
//! map changes, on request, every 20–26 s), and what the engine does with each report: home
//! region, our endpoints and NAT facts for the path machines and control, `tern netcheck` answers.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{mpsc, watch, Notify};

use super::derp::note_preferred;
use super::publish::millis;
use super::Engine;
use crate::control::tailcfg::{DerpRegion, EndpointType};
use crate::netcheck::{self, RegionFacts, StunResponse, StunResults, StunSockets};
use crate::paths;
use crate::report::{self, LocalNetInfo};
use crate::status::{rfc3339, Status};
use crate::udp;

/// STUN responses waiting for the netcheck task.
pub(super) const STUN_QUEUE: usize = 64;

/// One measurement: latency of every region (`None` = no answer) and what STUN saw of us.
pub(super) struct LatencyReport {
    pub(super) started: Instant,
    pub(super) latency: BTreeMap<u16, Option<Duration>>,
    pub(super) stun: StunResults,
}

/// Measures when the region set changes, when `trigger` fires (`tern netcheck`, a CallMeMaybe
/// that wants fresh endpoints) and every 20–26 s, handing each report to the engine.
pub(super) async fn netcheck_task(
    mut regions: watch::Receiver<BTreeMap<u16, DerpRegion>>,
    sockets: StunSockets,
    mut stun: mpsc::Receiver<StunResponse>,
    trigger: Arc<Notify>,
    reports: mpsc::Sender<LatencyReport>,
    only_tcp_443: watch::Receiver<bool>,
) {
    loop {
        let map = regions.borrow_and_update().clone();
        if !map.is_empty() {
            let started = Instant::now();
            let udp = !*only_tcp_443.borrow();
            let (stun, latency) = netcheck::measure_on(&sockets, &mut stun, &map, udp).await;
            tracing::debug!(?latency, ?stun, "netcheck report");
            let report = LatencyReport {
                started,
                latency,
                stun,
            };
            if reports.send(report).await.is_err() {
                return;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(netcheck::next_interval()), if !map.is_empty() => {}
            _ = trigger.notified() => {}
            changed = regions.changed() => if changed.is_err() { return },
        }
    }
}

impl Engine {
    pub(super) fn region_facts(&self) -> BTreeMap<u16, RegionFacts> {
        self.derp_map
            .iter()
            .map(|(id, r)| (*id, RegionFacts::of(r)))
            .collect()
    }

    /// A report from the netcheck task: choose the home region, update our endpoints and
    /// NAT facts for the path machines and control, answer waiting `tern netcheck`s.
    pub(super) fn on_latency_report(
        &mut self,
        report: LatencyReport,
        status: &watch::Sender<Status>,
    ) {
        self.choose_home(&report);
        self.drops.stun_unmatched += report.stun.unmatched;
        let endpoints = udp::endpoints::local_endpoints(self.udp_port, &report.stun);
        let now = Instant::now();
        self.paths.set_local(
            now,
            paths::LocalNet {
                node_key: self.node_key,
                endpoints: endpoints.iter().map(|(a, _)| *a).collect(),
                udp_working: Some(report.stun.udp()),
                mapping_varies: report.stun.mapping_varies,
            },
        );
        let info = LocalNetInfo {
            home_derp: self.home,
            endpoints: endpoints.clone(),
            working_udp: Some(report.stun.udp()),
            mapping_varies: report.stun.mapping_varies,
            working_ipv6: Some(report.stun.global_v6.is_some()),
            os_has_ipv6: Some(self.ipv6),
            derp_latency: derp_latency_seconds(&report.latency),
            routable_ips: self.net_prefs.borrow().routable_ips(),
            services: self.peerapi_services(),
        };
        self.local_tx.send_if_modified(|old| {
            let changed = *old != info;
            *old = info;
            changed
        });
        let netcheck = self.netcheck_report(&report, &endpoints);
        for reply in self.pending_netchecks.drain(..) {
            let _ = reply.send(netcheck.clone());
        }
        publish_latency(status, &report.latency);
        status.send_modify(|s| s.netcheck = Some(netcheck));
    }

    /// The report `tern netcheck` shows.
    pub(super) fn netcheck_report(
        &self,
        report: &LatencyReport,
        endpoints: &[(SocketAddr, EndpointType)],
    ) -> report::NetcheckReport {
        let regions = self
            .derp_map
            .iter()
            .map(|(id, r)| report::RegionLatency {
                id: *id,
                code: r.region_code.clone(),
                name: r.region_name.clone(),
                latency_ms: report.latency.get(id).copied().flatten().map(millis),
            })
            .collect();
        let stun = &report.stun;
        report::NetcheckReport {
            at: rfc3339(SystemTime::now()),
            udp: stun.udp(),
            ipv4: stun.global_v4.is_some(),
            global_v4: stun.global_v4.map(|a| a.to_string()),
            ipv6: stun.global_v6.is_some(),
            global_v6: stun.global_v6.map(|a| a.to_string()),
            os_has_ipv6: self.ipv6,
            mapping_varies_by_dest_ip: stun.mapping_varies,
            preferred_derp: self.home,
            regions,
            endpoints: endpoints
                .iter()
                .map(|(addr, kind)| report::EndpointReport {
                    addr: addr.to_string(),
                    kind: endpoint_kind(*kind).into(),
                })
                .collect(),
        }
    }

    pub(super) fn choose_home(&mut self, report: &LatencyReport) {
        let now = Instant::now();
        let measured = report
            .latency
            .iter()
            .filter_map(|(id, l)| Some((*id, (*l)?)))
            .collect();
        self.latency_history.add(now, measured);
        let home_heard = self.last_frame.get(&self.home).is_some_and(|t| {
            *t >= report.started || now.saturating_duration_since(*t) < netcheck::HOME_FRAME_WINDOW
        });
        let home = netcheck::select_home(
            &self.region_facts(),
            &report.latency,
            &self.latency_history.best_recent(),
            self.home,
            home_heard,
        );
        self.set_home(home);
    }

    /// Notes that `region` delivered a frame (at most once every 5 s, as Go).
    pub(super) fn note_frame_from(&mut self, region: u16, now: Instant) {
        let stale = self
            .last_frame
            .get(&region)
            .is_none_or(|t| now.saturating_duration_since(*t) >= Duration::from_secs(5));
        if stale {
            self.last_frame.insert(region, now);
        }
    }

    /// Makes `home` our home region: NotePreferred(false) to the old one, a connection with
    /// NotePreferred(true) to the new one, and the news to control.
    pub(super) fn set_home(&mut self, home: u16) {
        if home == self.home {
            return;
        }
        let old = std::mem::replace(&mut self.home, home);
        tracing::info!(region = home, previous = old, "home DERP region");
        if let Some(link) = self.derp.get(&old) {
            note_preferred(&link.preferred, false);
        }
        if home != 0 {
            if let Some(link) = self.derp_link(home) {
                note_preferred(&link.preferred, true);
            }
        }
        self.local_tx.send_if_modified(|info| {
            let changed = info.home_derp != home;
            info.home_derp = home;
            changed
        });
    }
}

/// The text kind of an endpoint type for reports.
pub(super) fn endpoint_kind(kind: EndpointType) -> &'static str {
    match kind {
        EndpointType::LOCAL => "local",
        EndpointType::STUN => "stun",
        EndpointType::PORTMAPPED => "portmapped",
        EndpointType::STUN4_LOCAL_PORT => "stun4localport",
        EndpointType::EXPLICIT_CONF => "explicit",
        _ => "unknown",
    }
}

/// `NetInfo.DERPLatency`: `"<region>-v4"` → seconds, for regions that answered.
pub(super) fn derp_latency_seconds(
    latency: &BTreeMap<u16, Option<Duration>>,
) -> BTreeMap<String, f64> {
    latency
        .iter()
        .filter_map(|(id, l)| Some((format!("{id}-v4"), (*l)?.as_secs_f64())))
        .collect()
}

/// Puts a latency report into the status snapshot (milliseconds, `None` = no answer).
pub(super) fn publish_latency(
    status: &watch::Sender<Status>,
    report: &BTreeMap<u16, Option<Duration>>,
) {
    let ms = report.iter().map(|(id, l)| (*id, l.map(millis))).collect();
    status.send_modify(|s| s.data_plane.derp_latency_ms = ms);
}
