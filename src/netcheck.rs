//! Home DERP region by measured latency (dataplane spec §5.2–§5.6), a small subset of Go's
//! netcheck: each region's first usable node is probed by STUN (its `STUNPort`, 0 = 3478);
//! a region that gives no STUN answer is timed by a TCP connect to its DERP port instead (the
//! spec's HTTPS fallback, cheaper). [`select_home`] applies the §5.6 rules to the results.

use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use tokio::net::{TcpStream, UdpSocket};

use crate::control::tailcfg::{DerpNode, DerpRegion};
use crate::stun;

/// How long one region's STUN probe waits for an answer (spec `stunProbeTimeout`).
pub const STUN_TIMEOUT: Duration = Duration::from_secs(3);
/// STUN tries per region, `STUN_RETRY` apart (spec full plan: 3 tries, 100 ms apart).
const STUN_TRIES: u32 = 3;
const STUN_RETRY: Duration = Duration::from_millis(100);
/// How long the TCP-connect fallback may take.
pub const TCP_TIMEOUT: Duration = Duration::from_secs(2);
/// Reports older than this no longer count towards a region's best latency (§5.6 step 1).
pub const HISTORY: Duration = Duration::from_secs(5 * 60);
/// Keep the current home when it is less than this much slower than the best (§5.6 step 3).
const KEEP_WITHIN: Duration = Duration::from_millis(10);
/// A home that delivered a DERP frame this recently counts as accessible (Go
/// `PreferredDERPFrameTime`, §5.6 step 3).
pub const HOME_FRAME_WINDOW: Duration = Duration::from_secs(8);

/// The periodic re-measure interval: uniform in 20–26 s (spec §5.2).
pub fn next_interval() -> Duration {
    Duration::from_millis(20_000 + rand::random::<u64>() % 6_000)
}

/// What the selection knows about one region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RegionFacts {
    /// Has a DERP (not STUN-only) node: can be a home at all.
    pub has_derp: bool,
    /// Marked `Avoid`: never chosen as a new home (kept if it already is one).
    pub avoid: bool,
    /// Marked `NoMeasureNoHome`: never measured, never home.
    pub no_home: bool,
}

impl RegionFacts {
    pub fn of(region: &DerpRegion) -> Self {
        Self {
            has_derp: region.nodes.iter().any(|n| !n.stun_only),
            avoid: region.avoid,
            no_home: region.no_measure_no_home,
        }
    }
}

/// Latency reports of the last [`HISTORY`] (sans-IO: callers pass `now`).
#[derive(Debug, Default)]
pub struct LatencyHistory {
    reports: VecDeque<(Instant, BTreeMap<u16, Duration>)>,
}

impl LatencyHistory {
    /// Adds a report and forgets those older than [`HISTORY`].
    pub fn add(&mut self, now: Instant, report: BTreeMap<u16, Duration>) {
        self.reports
            .retain(|(at, _)| now.saturating_duration_since(*at) < HISTORY);
        self.reports.push_back((now, report));
    }

    /// Per region, the lowest latency over the kept reports (§5.6 step 1).
    pub fn best_recent(&self) -> BTreeMap<u16, Duration> {
        let mut best: BTreeMap<u16, Duration> = BTreeMap::new();
        for (_, report) in &self.reports {
            for (region, latency) in report {
                best.entry(*region)
                    .and_modify(|b| *b = (*b).min(*latency))
                    .or_insert(*latency);
            }
        }
        best
    }
}

/// The home region after a report (§5.6; 0 = none).
///
/// `current`: this report's latency per region (`None` = no answer); `best_recent`: the
/// lowest latency per region over recent reports; `home`: the current home (0 = none);
/// `home_heard`: a DERP frame came from the home region since the report started or within
/// [`HOME_FRAME_WINDOW`].
/// Candidates are regions that answered in this report, have a DERP node, are not
/// `NoMeasureNoHome`, and are not `Avoid` unless already home; the one with the smallest
/// `best_recent` wins (ties: lower id). The current home is kept when it answered (or was
/// heard) and the winner is not clearly better: less than 10 ms faster, or faster by less than a third.
/// When nothing answered, the current home is kept; with no home yet, the lowest usable
/// region is taken (Go picks a random one) so that packets have somewhere to go.
pub fn select_home(
    facts: &BTreeMap<u16, RegionFacts>,
    current: &BTreeMap<u16, Option<Duration>>,
    best_recent: &BTreeMap<u16, Duration>,
    home: u16,
    home_heard: bool,
) -> u16 {
    let eligible = |id: u16| {
        facts
            .get(&id)
            .is_some_and(|f| f.has_derp && !f.no_home && (!f.avoid || id == home))
    };
    let score = |id: u16| best_recent.get(&id).copied().or(current.get(&id).copied()?);
    let best = current
        .iter()
        .filter(|(id, l)| l.is_some() && eligible(**id))
        .filter_map(|(id, _)| Some((score(*id)?, *id)))
        .min();
    let Some((best_latency, best_id)) = best else {
        if home != 0 && facts.contains_key(&home) {
            return home;
        }
        return fallback_home(facts);
    };
    if home != 0 && home != best_id && eligible(home) {
        let home_latency = current.get(&home).copied().flatten();
        if home_latency.is_some() || home_heard {
            // Heard but not measured: Go compares against 0, so the home stays.
            let home_latency = home_latency.unwrap_or_default();
            let clearly_better = home_latency.saturating_sub(best_latency) >= KEEP_WITHIN
                && best_latency * 3 <= home_latency * 2;
            if !clearly_better {
                return home;
            }
        }
    }
    best_id
}

/// The lowest region id that could be a home (0 = none).
pub fn fallback_home(facts: &BTreeMap<u16, RegionFacts>) -> u16 {
    facts
        .iter()
        .find(|(_, f)| f.has_derp && !f.avoid && !f.no_home)
        .map(|(id, _)| *id)
        .unwrap_or(0)
}

/// The node a region is measured at: its first node with an IPv4 literal (STUN-only nodes
/// count; the TCP fallback needs a DERP node and uses the first one).
fn probe_addr(node: &DerpNode) -> Option<IpAddr> {
    match node.ipv4.as_str() {
        "" => node.host_name.parse().ok(),
        "none" => None,
        v4 => v4.parse().ok(),
    }
}

/// Measures every region that may be measured, in parallel; each wait is bounded, so the
/// whole report takes at most [`STUN_TIMEOUT`] + [`TCP_TIMEOUT`].
pub async fn measure(regions: &BTreeMap<u16, DerpRegion>) -> BTreeMap<u16, Option<Duration>> {
    let probes = regions
        .iter()
        .filter(|(_, r)| !r.no_measure_no_home)
        .map(|(id, r)| {
            let region = r.clone();
            let id = *id;
            tokio::spawn(async move { (id, measure_region(&region).await) })
        })
        .collect::<Vec<_>>();
    let mut out = BTreeMap::new();
    for probe in probes {
        if let Ok((id, latency)) = probe.await {
            out.insert(id, latency);
        }
    }
    out
}

/// One region's latency: STUN to the first node that does STUN, else TCP connect to the
/// first DERP node.
pub async fn measure_region(region: &DerpRegion) -> Option<Duration> {
    let stun_target = region.nodes.iter().find_map(|n| {
        let port = match n.stun_port {
            0 => 3478,
            p => u16::try_from(p).ok()?,
        };
        Some(SocketAddr::new(probe_addr(n)?, port))
    });
    if let Some(target) = stun_target {
        if let Some(rtt) = stun_rtt(target).await {
            return Some(rtt);
        }
    }
    let tcp_target = region.nodes.iter().filter(|n| !n.stun_only).find_map(|n| {
        let port = match n.derp_port {
            0 => 443,
            p => u16::try_from(p).ok()?,
        };
        Some(SocketAddr::new(probe_addr(n)?, port))
    })?;
    tcp_connect_time(tcp_target).await
}

/// RTT of a STUN binding request to `target` from a short-lived socket, or `None` when no
/// matching answer came within [`STUN_TIMEOUT`].
pub async fn stun_rtt(target: SocketAddr) -> Option<Duration> {
    let bind: SocketAddr = if target.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()
    .ok()?;
    let socket = UdpSocket::bind(bind).await.ok()?;
    let tx = stun::TxId::random();
    let request = stun::request(tx);
    let start = Instant::now();
    let deadline = tokio::time::Instant::now() + STUN_TIMEOUT;
    let mut buf = [0u8; 1500];
    let mut sent = 0;
    loop {
        let retry_at = tokio::time::Instant::from_std(start + STUN_RETRY * sent).min(deadline);
        tokio::select! {
            _ = tokio::time::sleep_until(retry_at), if sent < STUN_TRIES => {
                // A send error (no route) is not final: a later try may pass.
                let _ = socket.send_to(&request, target).await;
                sent += 1;
            }
            r = socket.recv_from(&mut buf) => {
                let Ok((n, from)) = r else { continue };
                let answer = buf.get(..n).and_then(|b| stun::parse_response(b).ok());
                if from == target && answer.is_some_and(|(id, _)| id == tx) {
                    return Some(start.elapsed());
                }
            }
            _ = tokio::time::sleep_until(deadline) => return None,
        }
    }
}

/// Time to open a TCP connection to `target`, bounded by [`TCP_TIMEOUT`].
pub async fn tcp_connect_time(target: SocketAddr) -> Option<Duration> {
    let start = Instant::now();
    match tokio::time::timeout(TCP_TIMEOUT, TcpStream::connect(target)).await {
        Ok(Ok(_)) => Some(start.elapsed()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const USABLE: RegionFacts = RegionFacts {
        has_derp: true,
        avoid: false,
        no_home: false,
    };

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    fn facts(ids: &[u16]) -> BTreeMap<u16, RegionFacts> {
        ids.iter().map(|id| (*id, USABLE)).collect()
    }

    fn report(entries: &[(u16, Option<u64>)]) -> BTreeMap<u16, Option<Duration>> {
        entries.iter().map(|(id, l)| (*id, l.map(ms))).collect()
    }

    fn best(r: &BTreeMap<u16, Option<Duration>>) -> BTreeMap<u16, Duration> {
        r.iter().filter_map(|(id, l)| Some((*id, (*l)?))).collect()
    }

    fn select(f: &BTreeMap<u16, RegionFacts>, r: &[(u16, Option<u64>)], home: u16) -> u16 {
        let r = report(r);
        select_home(f, &r, &best(&r), home, false)
    }

    #[test]
    fn lowest_latency_wins() {
        let f = facts(&[1, 2, 3]);
        assert_eq!(
            select(&f, &[(1, Some(50)), (2, Some(20)), (3, Some(30))], 0),
            2
        );
        // Ties go to the lower id.
        assert_eq!(select(&f, &[(2, Some(20)), (3, Some(20))], 0), 2);
    }

    #[test]
    fn hysteresis_keeps_the_home_unless_clearly_better() {
        let f = facts(&[1, 2]);
        // 9 ms faster: keep.
        assert_eq!(select(&f, &[(1, Some(100)), (2, Some(91))], 1), 1);
        // 20 ms faster but not by a third (80 > 100·2/3): keep.
        assert_eq!(select(&f, &[(1, Some(100)), (2, Some(80))], 1), 1);
        // Faster by more than a third and 10 ms: switch.
        assert_eq!(select(&f, &[(1, Some(100)), (2, Some(60))], 1), 2);
        // A third faster but under 10 ms: keep.
        assert_eq!(select(&f, &[(1, Some(9)), (2, Some(3))], 1), 1);
        // The home did not answer this time: the best that did wins, unless the home
        // delivered DERP frames just now.
        assert_eq!(select(&f, &[(1, None), (2, Some(80))], 1), 2);
        let r = report(&[(1, None), (2, Some(80))]);
        assert_eq!(select_home(&f, &r, &best(&r), 1, true), 1);
    }

    #[test]
    fn unreachable_regions_are_never_chosen() {
        let f = facts(&[1, 2, 3]);
        assert_eq!(select(&f, &[(1, None), (2, None), (3, Some(500))], 0), 3);
        // Nothing answered: keep the home; with none, the lowest usable region.
        assert_eq!(select(&f, &[(1, None), (2, None)], 2), 2);
        assert_eq!(select(&f, &[(1, None), (2, None)], 0), 1);
    }

    #[test]
    fn avoid_no_home_and_stun_only_regions() {
        let mut f = facts(&[1, 2, 3, 4]);
        f.insert(
            1,
            RegionFacts {
                avoid: true,
                ..USABLE
            },
        );
        f.insert(
            2,
            RegionFacts {
                no_home: true,
                ..USABLE
            },
        );
        f.insert(
            3,
            RegionFacts {
                has_derp: false,
                ..USABLE
            },
        );
        let r = [(1, Some(1)), (2, Some(1)), (3, Some(1)), (4, Some(90))];
        assert_eq!(select(&f, &r, 0), 4);
        // An avoided region that is already home stays home (it is still measured).
        assert_eq!(select(&f, &r, 1), 1);
        assert_eq!(fallback_home(&f), 4);
    }

    #[test]
    fn best_recent_latency_counts_and_history_expires() {
        let f = facts(&[1, 2]);
        let t0 = Instant::now();
        let mut h = LatencyHistory::default();
        h.add(t0, BTreeMap::from([(1, ms(10)), (2, ms(100))]));
        h.add(t0 + ms(20_000), BTreeMap::from([(1, ms(80)), (2, ms(50))]));
        let now = report(&[(1, Some(80)), (2, Some(50))]);
        // Region 1 was 10 ms a moment ago: its recent best still wins.
        assert_eq!(select_home(&f, &now, &h.best_recent(), 0, false), 1);
        // Five minutes later the old report is gone.
        h.add(
            t0 + HISTORY + ms(1),
            BTreeMap::from([(1, ms(80)), (2, ms(50))]),
        );
        assert_eq!(select_home(&f, &now, &h.best_recent(), 0, false), 2);
    }

    #[tokio::test]
    async fn stun_probe_times_a_local_server_and_gives_up_on_silence() {
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = server.local_addr().unwrap();
        let serve = tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            let (n, from) = server.recv_from(&mut buf).await.unwrap();
            let tx = stun::parse_binding_request(&buf[..n]).unwrap();
            server
                .send_to(&stun::response(tx, from), from)
                .await
                .unwrap();
        });
        assert!(stun_rtt(addr).await.is_some());
        serve.await.unwrap();
        // A bound socket that never answers: the probe ends at its timeout with None.
        let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        tokio::time::pause();
        assert_eq!(stun_rtt(silent.local_addr().unwrap()).await, None);
    }
}
