//! Home DERP region by measured latency, a small subset of Go's
//! netcheck: each region's first usable node is probed by STUN (its `STUNPort`, 0 = 3478);
//! a region that gives no STUN answer is timed by a TCP connect to its DERP port instead (the
//! HTTPS fallback, cheaper). [`select_home`] applies Go's home-region rules to the results.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use crate::control::tailcfg::{DerpNode, DerpRegion};
use crate::stun;

/// How long one region's STUN probe waits for an answer ( `stunProbeTimeout`).
pub const STUN_TIMEOUT: Duration = Duration::from_secs(3);
/// STUN tries per region, `STUN_RETRY` apart ( full plan: 3 tries, 100 ms apart).
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

/// The periodic re-measure interval: uniform in 20–26 s.
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

/// STUN destinations per region: the first few nodes that answer STUN, per address family.
const STUN_NODES_PER_REGION: usize = 3;

/// One STUN destination of a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StunTarget {
    pub region: u16,
    pub addr: SocketAddr,
}

/// The STUN destinations of every region that may be measured: up to three nodes per region
/// and family (IPv6 only when `ipv6`), STUN-only nodes included. Several destination IPs are
/// what lets a round see whether our NAT maps per destination.
pub fn stun_targets(regions: &BTreeMap<u16, DerpRegion>, ipv6: bool) -> Vec<StunTarget> {
    let mut out = Vec::new();
    for (id, region) in regions.iter().filter(|(_, r)| !r.no_measure_no_home) {
        let port = |n: &DerpNode| match n.stun_port {
            0 => Some(3478),
            p => u16::try_from(p).ok().filter(|p| *p != 0),
        };
        let v4 = region
            .nodes
            .iter()
            .filter_map(|n| Some(SocketAddr::new(probe_addr(n)?, port(n)?)));
        let v6 = region.nodes.iter().filter(|_| ipv6).filter_map(|n| {
            let ip: IpAddr = n.ipv6.parse().ok().filter(IpAddr::is_ipv6)?;
            Some(SocketAddr::new(ip, port(n)?))
        });
        for addrs in [v4.collect::<Vec<_>>(), v6.collect()] {
            out.extend(
                addrs
                    .into_iter()
                    .take(STUN_NODES_PER_REGION)
                    .map(|addr| StunTarget { region: *id, addr }),
            );
        }
    }
    out
}

/// A STUN response as the data plane's UDP socket received it.
#[derive(Debug, Clone)]
pub struct StunResponse {
    pub from: SocketAddr,
    pub at: Instant,
    pub bytes: Vec<u8>,
}

/// The bookkeeping of one STUN round (sans-IO): requests out, responses matched by
/// transaction ID and source, results per target.
#[derive(Debug)]
pub struct StunRound {
    targets: Vec<StunTarget>,
    pending: HashMap<stun::TxId, (usize, Instant)>,
    answers: Vec<Option<(Duration, SocketAddr)>>,
    unmatched: u64,
}

/// What one round found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StunResults {
    /// Lowest STUN RTT per region that answered.
    pub latency: BTreeMap<u16, Duration>,
    /// Our address as the first IPv4 / IPv6 server to answer saw it.
    pub global_v4: Option<SocketAddr>,
    pub global_v6: Option<SocketAddr>,
    /// Different IPv4 destinations saw different addresses (hard NAT); `None` with fewer than
    /// two IPv4 destinations answering.
    pub mapping_varies: Option<bool>,
    /// Responses that matched no request of this round (wrong transaction ID or source).
    pub unmatched: u64,
}

impl StunResults {
    /// Any STUN answer at all.
    pub fn udp(&self) -> bool {
        self.global_v4.is_some() || self.global_v6.is_some()
    }
}

impl StunRound {
    pub fn new(targets: Vec<StunTarget>) -> StunRound {
        let answers = vec![None; targets.len()];
        StunRound {
            targets,
            pending: HashMap::new(),
            answers,
            unmatched: 0,
        }
    }

    /// Targets not answered yet (indexes for [`Self::request`]).
    pub fn unanswered(&self) -> Vec<usize> {
        (0..self.targets.len())
            .filter(|i| self.answers.get(*i).is_some_and(Option::is_none))
            .collect()
    }

    /// A fresh binding request to target `index`, sent at `now`: where, and the bytes.
    pub fn request(&mut self, index: usize, now: Instant) -> Option<(SocketAddr, Vec<u8>)> {
        let target = self.targets.get(index)?;
        let tx = stun::TxId::random();
        self.pending.insert(tx, (index, now));
        Some((target.addr, stun::request(tx)))
    }

    /// A STUN datagram; returns whether it answered one of our requests.
    pub fn on_response(&mut self, response: &StunResponse) -> bool {
        let Ok((tx, mapped)) = stun::parse_response(&response.bytes) else {
            self.unmatched += 1;
            return false;
        };
        let Some(&(index, sent)) = self.pending.get(&tx) else {
            self.unmatched += 1;
            return false;
        };
        if self.targets.get(index).map(|t| t.addr) != Some(response.from) {
            self.unmatched += 1;
            return false;
        }
        self.pending.remove(&tx);
        let rtt = response.at.saturating_duration_since(sent);
        if let Some(slot) = self.answers.get_mut(index) {
            // The first answer counts; a retry's answer is not faster.
            slot.get_or_insert((rtt, mapped));
        }
        true
    }

    /// Every target answered.
    pub fn done(&self) -> bool {
        self.answers.iter().all(Option::is_some)
    }

    pub fn finish(self) -> StunResults {
        let mut out = StunResults {
            unmatched: self.unmatched,
            ..StunResults::default()
        };
        let mut mapped_by_dest: BTreeMap<IpAddr, SocketAddr> = BTreeMap::new();
        for (target, answer) in self.targets.iter().zip(&self.answers) {
            let Some((rtt, mapped)) = answer else {
                continue;
            };
            out.latency
                .entry(target.region)
                .and_modify(|l| *l = (*l).min(*rtt))
                .or_insert(*rtt);
            if target.addr.is_ipv4() {
                out.global_v4.get_or_insert(*mapped);
                mapped_by_dest.entry(target.addr.ip()).or_insert(*mapped);
            } else {
                out.global_v6.get_or_insert(*mapped);
            }
        }
        if mapped_by_dest.len() >= 2 {
            let first = mapped_by_dest.values().next().copied();
            out.mapping_varies = Some(mapped_by_dest.values().any(|m| Some(*m) != first));
        }
        out
    }
}

/// Where a round's requests go out: the data plane's own sockets, so that the mapped addresses
/// are those peers must use.
#[derive(Debug, Clone)]
pub struct StunSockets {
    pub v4: std::sync::Arc<UdpSocket>,
    pub v6: Option<std::sync::Arc<UdpSocket>>,
}

impl StunSockets {
    async fn send(&self, to: SocketAddr, bytes: &[u8]) {
        let socket = match (to.is_ipv4(), &self.v6) {
            (true, _) => &self.v4,
            (false, Some(v6)) => v6,
            (false, None) => return,
        };
        // A send error (no route) is not final: a retry may pass.
        if let Err(e) = socket.send_to(bytes, to).await {
            tracing::trace!(%to, error = %e, "STUN send failed");
        }
    }
}

/// One STUN round: requests to every target at 0, 100 and 200 ms (to those still unanswered),
/// answers read from `responses`, until all answered or [`STUN_TIMEOUT`].
pub async fn stun_round(
    sockets: &StunSockets,
    responses: &mut mpsc::Receiver<StunResponse>,
    targets: Vec<StunTarget>,
) -> StunResults {
    // Anything that arrived between rounds answers nothing we are waiting for.
    let mut stale = 0;
    while responses.try_recv().is_ok() {
        stale += 1;
    }
    let mut round = StunRound::new(targets);
    round.unmatched = stale;
    let start = tokio::time::Instant::now();
    let deadline = start + STUN_TIMEOUT;
    let mut tries = 0;
    while !round.done() {
        let retry_at = (start + STUN_RETRY * tries).min(deadline);
        tokio::select! {
            _ = tokio::time::sleep_until(retry_at), if tries < STUN_TRIES => {
                for index in round.unanswered() {
                    if let Some((to, bytes)) = round.request(index, Instant::now()) {
                        sockets.send(to, &bytes).await;
                    }
                }
                tries += 1;
            }
            response = responses.recv() => match response {
                Some(r) => { round.on_response(&r); }
                None => break,
            },
            _ = tokio::time::sleep_until(deadline) => break,
        }
    }
    round.finish()
}

/// A whole measurement: the STUN round on the data plane's sockets (unless `udp` is false:
/// control's `only-tcp-443`), then a TCP-connect timing for each region STUN did not answer
/// (bounded by [`TCP_TIMEOUT`]).
pub async fn measure_on(
    sockets: &StunSockets,
    responses: &mut mpsc::Receiver<StunResponse>,
    regions: &BTreeMap<u16, DerpRegion>,
    udp: bool,
) -> (StunResults, BTreeMap<u16, Option<Duration>>) {
    // Nodes the map names only by host name get their addresses from DNS first (Go does too).
    let regions = &crate::derp::resolve::resolve_regions(regions).await;
    let stun = if udp {
        let targets = stun_targets(regions, sockets.v6.is_some());
        stun_round(sockets, responses, targets).await
    } else {
        StunResults::default()
    };
    let fallbacks = regions
        .iter()
        .filter(|(id, r)| !r.no_measure_no_home && !stun.latency.contains_key(id))
        .map(|(id, r)| {
            let (id, region) = (*id, r.clone());
            tokio::spawn(async move { (id, tcp_latency(&region).await) })
        })
        .collect::<Vec<_>>();
    let mut latency: BTreeMap<u16, Option<Duration>> =
        stun.latency.iter().map(|(id, l)| (*id, Some(*l))).collect();
    for probe in fallbacks {
        if let Ok((id, l)) = probe.await {
            latency.insert(id, l);
        }
    }
    (stun, latency)
}

/// A region's latency by TCP connect to its first DERP node.
async fn tcp_latency(region: &DerpRegion) -> Option<Duration> {
    let target = region.nodes.iter().filter(|n| !n.stun_only).find_map(|n| {
        let port = match n.derp_port {
            0 => 443,
            p => u16::try_from(p).ok()?,
        };
        Some(SocketAddr::new(probe_addr(n)?, port))
    })?;
    tcp_connect_time(target).await
}

/// Time to open a TCP connection to `target`, bounded by [`TCP_TIMEOUT`].
pub async fn tcp_connect_time(target: SocketAddr) -> Option<Duration> {
    let start = Instant::now();
    match tokio::time::timeout(TCP_TIMEOUT, crate::bypass::tcp_connect(target)).await {
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

    fn target(region: u16, addr: &str) -> StunTarget {
        StunTarget {
            region,
            addr: addr.parse().unwrap(),
        }
    }

    fn answer(round: &mut StunRound, index: usize, sent: Instant, rtt: u64, mapped: &str) -> bool {
        let (to, request) = round.request(index, sent).unwrap();
        let tx = stun::parse_binding_request(&request).unwrap();
        round.on_response(&StunResponse {
            from: to,
            at: sent + ms(rtt),
            bytes: stun::response(tx, mapped.parse().unwrap()),
        })
    }

    #[test]
    fn a_round_matches_answers_and_sees_an_easy_nat() {
        let t0 = Instant::now();
        let mut round = StunRound::new(vec![
            target(900, "198.18.0.10:3478"),
            target(900, "198.18.0.11:3478"),
            target(901, "198.18.0.12:3478"),
        ]);
        assert!(answer(&mut round, 0, t0, 7, "198.18.0.3:41641"));
        assert!(answer(&mut round, 1, t0, 4, "198.18.0.3:41641"));
        assert!(!round.done());
        assert_eq!(round.unanswered(), vec![2]);
        let r = round.finish();
        assert_eq!(r.latency, BTreeMap::from([(900, ms(4))]));
        assert_eq!(r.global_v4, Some("198.18.0.3:41641".parse().unwrap()));
        assert_eq!(r.mapping_varies, Some(false));
        assert!(r.udp());
        assert_eq!(r.unmatched, 0);
    }

    #[test]
    fn a_round_sees_a_hard_nat_and_counts_strays() {
        let t0 = Instant::now();
        let mut round = StunRound::new(vec![
            target(900, "198.18.0.10:3478"),
            target(900, "198.18.0.11:3478"),
        ]);
        assert!(answer(&mut round, 0, t0, 5, "198.18.0.3:1024"));
        // A response with a transaction ID nobody asked for.
        let stray = StunResponse {
            from: "198.18.0.11:3478".parse().unwrap(),
            at: t0,
            bytes: stun::response(stun::TxId([7; 12]), "198.18.0.3:9".parse().unwrap()),
        };
        assert!(!round.on_response(&stray));
        // The right ID from the wrong source.
        let (_, request) = round.request(1, t0).unwrap();
        let tx = stun::parse_binding_request(&request).unwrap();
        let spoofed = StunResponse {
            from: "192.0.2.1:3478".parse().unwrap(),
            at: t0,
            bytes: stun::response(tx, "198.18.0.3:9".parse().unwrap()),
        };
        assert!(!round.on_response(&spoofed));
        assert!(!round.on_response(&StunResponse {
            from: "198.18.0.11:3478".parse().unwrap(),
            at: t0,
            bytes: b"garbage".to_vec(),
        }));
        assert!(answer(&mut round, 1, t0, 5, "198.18.0.3:1025"));
        assert!(round.done());
        let r = round.finish();
        assert_eq!(r.mapping_varies, Some(true));
        assert_eq!(r.unmatched, 3);
        // One destination only: whether the mapping varies is unknown.
        let mut one = StunRound::new(vec![target(900, "198.18.0.10:3478")]);
        assert!(answer(&mut one, 0, t0, 5, "198.18.0.3:1024"));
        assert_eq!(one.finish().mapping_varies, None);
        // Nothing answered: no UDP.
        let r = StunRound::new(vec![target(900, "198.18.0.10:3478")]).finish();
        assert!(!r.udp());
        assert!(r.latency.is_empty());
    }

    #[test]
    fn targets_take_every_stun_node_of_measured_regions() {
        let node = |ip: &str, stun_port: i32, stun_only: bool| DerpNode {
            host_name: ip.into(),
            ipv4: ip.into(),
            ipv6: "fd00::1".into(),
            stun_port,
            stun_only,
            ..Default::default()
        };
        let regions = BTreeMap::from([
            (
                900,
                DerpRegion {
                    nodes: vec![
                        node("198.18.0.10", 0, false),
                        node("198.18.0.11", 3479, true),
                        node("198.18.0.12", -1, false),
                    ],
                    ..Default::default()
                },
            ),
            (
                901,
                DerpRegion {
                    no_measure_no_home: true,
                    nodes: vec![node("198.18.0.13", 0, false)],
                    ..Default::default()
                },
            ),
        ]);
        let v4: Vec<String> = stun_targets(&regions, false)
            .iter()
            .map(|t| format!("{}:{}", t.region, t.addr))
            .collect();
        assert_eq!(v4, ["900:198.18.0.10:3478", "900:198.18.0.11:3479"]);
        assert_eq!(stun_targets(&regions, true).len(), 4);
    }

    /// A STUN round on a real socket against two local servers (127.0.0.1 and 127.0.0.2).
    #[tokio::test]
    async fn a_round_on_a_socket_measures_two_servers() {
        let mut targets = Vec::new();
        for ip in ["127.0.0.1", "127.0.0.2"] {
            let server = UdpSocket::bind(format!("{ip}:0")).await.unwrap();
            targets.push(StunTarget {
                region: 900,
                addr: server.local_addr().unwrap(),
            });
            tokio::spawn(async move {
                let mut buf = [0u8; 1500];
                while let Ok((n, from)) = server.recv_from(&mut buf).await {
                    if let Ok(tx) = stun::parse_binding_request(&buf[..n]) {
                        let _ = server.send_to(&stun::response(tx, from), from).await;
                    }
                }
            });
        }
        let client = std::sync::Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let (tx, mut rx) = mpsc::channel(8);
        let reader = client.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            while let Ok((n, from)) = reader.recv_from(&mut buf).await {
                let at = Instant::now();
                let bytes = buf[..n].to_vec();
                let _ = tx.send(StunResponse { from, at, bytes }).await;
            }
        });
        let sockets = StunSockets {
            v4: client.clone(),
            v6: None,
        };
        let r = stun_round(&sockets, &mut rx, targets).await;
        assert_eq!(r.global_v4, Some(client.local_addr().unwrap()));
        assert_eq!(r.mapping_varies, Some(false));
        assert!(r.latency.contains_key(&900));
    }
}
