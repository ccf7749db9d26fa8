//! `ControlDialPlan`: IP candidates control sends in the map for later dials (Go
//! `controlhttp` with a dial plan). The highest-priority candidates are raced, each starting
//! after its own delay and bounded by its own timeout; only if all of them fail are the next
//! priority's tried, and only if the whole plan fails does the dial fall back to the URL's host
//! name. Candidates by `ACEHost` (a proxy) are not supported and are skipped. Pure, except the
//! one remembered plan.

use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use super::tailcfg::ControlDialPlan;

/// One address to dial and when.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    pub ip: IpAddr,
    pub start_delay: Duration,
    pub timeout: Duration,
}

/// Longest candidate timeout honoured (the whole dial is bounded anyway).
const MAX_CANDIDATE_TIMEOUT: Duration = Duration::from_secs(10);

/// The plan's candidates grouped by priority, highest first; IP candidates only.
pub fn groups(plan: &ControlDialPlan) -> Vec<Vec<Candidate>> {
    let mut usable: Vec<(i32, Candidate)> = plan
        .candidates
        .iter()
        .filter_map(|c| {
            Some((
                c.priority,
                Candidate {
                    ip: c.ip?,
                    start_delay: seconds(c.dial_start_delay_sec, Duration::ZERO),
                    timeout: seconds(c.dial_timeout_sec, MAX_CANDIDATE_TIMEOUT)
                        .min(MAX_CANDIDATE_TIMEOUT),
                },
            ))
        })
        .collect();
    usable.sort_by_key(|(priority, _)| std::cmp::Reverse(*priority));
    let mut out: Vec<Vec<Candidate>> = Vec::new();
    let mut last = None;
    for (priority, candidate) in usable {
        match out.last_mut() {
            Some(group) if last == Some(priority) => group.push(candidate),
            _ => out.push(vec![candidate]),
        }
        last = Some(priority);
    }
    out
}

/// Seconds from JSON as a duration; zero, negative or not finite means `default`.
fn seconds(value: f64, default: Duration) -> Duration {
    if value.is_finite() && value > 0.0 {
        Duration::try_from_secs_f64(value).unwrap_or(default)
    } else {
        default
    }
}

/// The last plan control sent, for the control server it came from (`host[:port]`).
static PLAN: Mutex<Option<(String, ControlDialPlan)>> = Mutex::new(None);

/// Remembers `plan` for dials to `authority` (an empty plan forgets it).
pub fn remember(authority: &str, plan: &ControlDialPlan) {
    if let Ok(mut slot) = PLAN.lock() {
        *slot = (!plan.candidates.is_empty()).then(|| (authority.to_string(), plan.clone()));
    }
}

/// The plan remembered for `authority`, if any.
pub fn current(authority: &str) -> Option<ControlDialPlan> {
    let slot = PLAN.lock().ok()?;
    slot.as_ref()
        .filter(|(a, _)| a == authority)
        .map(|(_, plan)| plan.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::tailcfg::ControlIpCandidate;

    fn candidate(ip: &str, priority: i32, delay: f64, timeout: f64) -> ControlIpCandidate {
        ControlIpCandidate {
            ip: ip.parse().ok(),
            ace_host: String::new(),
            dial_start_delay_sec: delay,
            dial_timeout_sec: timeout,
            priority,
        }
    }

    #[test]
    fn candidates_are_grouped_by_priority_highest_first() {
        let plan = ControlDialPlan {
            candidates: vec![
                candidate("10.0.0.1", 1, 0.0, 0.0),
                candidate("10.0.0.2", 5, 0.3, 2.0),
                candidate("not-an-ip", 9, 0.0, 0.0),
                candidate("10.0.0.3", 5, -1.0, 99.0),
            ],
        };
        let groups = groups(&plan);
        assert_eq!(groups.len(), 2, "the ACEHost-only candidate is skipped");
        let ips = |g: &[Candidate]| g.iter().map(|c| c.ip.to_string()).collect::<Vec<_>>();
        assert_eq!(ips(&groups[0]), ["10.0.0.2", "10.0.0.3"]);
        assert_eq!(ips(&groups[1]), ["10.0.0.1"]);
        assert_eq!(groups[0][0].start_delay, Duration::from_millis(300));
        assert_eq!(groups[0][0].timeout, Duration::from_secs(2));
        assert_eq!(
            groups[0][1].start_delay,
            Duration::ZERO,
            "negative delay: none"
        );
        assert_eq!(groups[0][1].timeout, MAX_CANDIDATE_TIMEOUT, "capped");
        assert_eq!(groups[1][0].timeout, MAX_CANDIDATE_TIMEOUT, "zero: default");
    }

    #[test]
    fn a_plan_is_remembered_per_control_server() {
        let plan = ControlDialPlan {
            candidates: vec![candidate("10.0.0.1", 0, 0.0, 0.0)],
        };
        remember("ctl.example:443", &plan);
        assert_eq!(current("ctl.example:443"), Some(plan));
        assert_eq!(current("other.example"), None);
        remember("ctl.example:443", &ControlDialPlan::default());
        assert_eq!(current("ctl.example:443"), None);
    }
}
