//! "Why this path": one plain-language sentence from `path_reason`, the netcheck facts of this
//! node and what the status says about the peer and relays.

use crate::fmt;
use crate::snapshot::{PathKind, Peer, Status};

/// Where DERP traffic goes, as text: `DERP (lab, 0.8 ms)`.
pub fn via_derp(status: &Status, peer: &Peer) -> String {
    let region = peer.derp_region.or(peer.home_derp);
    match region {
        Some(id) => {
            let latency = status
                .data_plane
                .derp_latency_ms
                .get(&id)
                .copied()
                .flatten();
            let name = status.region_name(id);
            match latency {
                Some(ms) => format!("DERP ({name}, {})", spaced(fmt::latency(Some(ms)))),
                None => format!("DERP ({name})"),
            }
        }
        None => "DERP".into(),
    }
}

/// `0.8 ms` rather than `0.8ms` in running text.
fn spaced(latency: String) -> String {
    match latency.strip_suffix("ms") {
        Some(n) => format!("{n} ms"),
        None => latency,
    }
}

/// What relays do for this peer: in use, why none is, or the hint to set one up.
fn relay_hint(peer: &Peer) -> String {
    let name = peer.short_name();
    if let (PathKind::Relay, Some(ep)) = (peer.path_kind(), peer.endpoint.as_deref()) {
        let vni = peer
            .relay_vni
            .map(|v| format!(", VNI {v}"))
            .unwrap_or_default();
        let node = peer
            .relay_node
            .as_deref()
            .map(|n| format!(" run by {n}"))
            .unwrap_or_default();
        return format!("Using the peer relay at {ep}{vni}{node}.");
    }
    match peer.relay_reason.as_deref() {
        Some("relay-client-disabled") => "Control turned this node's peer relay client off \
             (node attribute `disable-relay-client` or `only-tcp-443`), so no relay is asked."
            .into(),
        Some("peer-not-relay-capable") => {
            format!("{name} runs a client too old for peer relays (capability below 121).")
        }
        Some("relay-discovering") => "Asking the peer relays for a path; DERP meanwhile.".into(),
        Some("relay-allocation-failed") => "No peer relay answered our allocation request within \
             10 s: is its relay server on (`tern set --relay-server-port=N`) and online?"
            .into(),
        Some("relay-bind-timeout") => "A peer relay gave us an endpoint, but nothing came back \
             through it (bind timed out): UDP to the relay may be blocked."
            .into(),
        Some("relay-unreachable") => "The peer relay stopped answering; DERP carries it until \
             a relay answers again."
            .into(),
        _ => "No peer relay carries it; one would help: run `tern set \
              --relay-server-port=N` on a node with a public address and grant it."
            .into(),
    }
}

/// When the latest history entry with this reason happened, as `12:04:07`.
fn since(peer: &Peer, reason: &str) -> Option<String> {
    peer.path_history
        .iter()
        .rev()
        .find(|h| h.reason == reason)
        .and_then(|h| fmt::unix(Some(&h.at)))
        .map(fmt::clock)
}

/// The last direct endpoint the history remembers (for `direct-lost`).
fn last_direct(peer: &Peer) -> Option<&str> {
    peer.path_history
        .iter()
        .rev()
        .find(|h| h.path == "direct")
        .and_then(|h| h.endpoint.as_deref())
}

/// This node's hard-NAT fact with its public address, from the last netcheck.
fn own_nat(status: &Status) -> String {
    let public = status
        .netcheck
        .as_ref()
        .and_then(|n| n.global_v4.as_deref())
        .map(|a| format!(", public {a}"))
        .unwrap_or_default();
    format!("this node's NAT changes the port for every destination (hard NAT{public})")
}

/// The sentence for the peer's current path and reason.
pub fn sentence(status: &Status, peer: &Peer) -> String {
    let name = peer.short_name();
    let rtt = spaced(fmt::latency(peer.latency_ms));
    let reason = peer.path_reason.as_deref().unwrap_or("");
    let kind = peer.path_kind();
    if kind == PathKind::Direct {
        let ep = peer.endpoint.as_deref().unwrap_or("?");
        return match since(peer, "direct") {
            Some(t) => format!("Direct to {ep} since {t} ({rtt})."),
            None => format!("Direct to {ep} ({rtt})."),
        };
    }
    let on = match kind {
        PathKind::Relay => format!(
            "On a peer relay ({}, {rtt})",
            peer.endpoint.as_deref().unwrap_or("?")
        ),
        PathKind::None => "No path".into(),
        _ => format!("On {}", via_derp(status, peer)),
    };
    // The path machine's own list when the daemon reports it (it also holds CallMeMaybe and
    // ping-learned addresses), else what the peer advertised.
    let candidates = if peer.candidates.is_empty() {
        peer.endpoints.len()
    } else {
        peer.candidates.len()
    };
    let why = match reason {
        "idle" => format!(
            "no traffic to {name} yet, so no direct path is probed; the first packet starts it."
        ),
        "discovering" => format!(
            "looking for a direct path: pinged {candidates} candidate{}, waiting for answers; \
             DERP carries traffic meanwhile.",
            plural(candidates)
        ),
        "no-endpoints" => format!("{name} has not told us any address yet."),
        "udp-blocked" => "this node cannot send UDP at all (netcheck saw no STUN answer, or \
                          control set only-tcp-443 on it); only TCP to DERP works."
            .into(),
        "peer-udp-blocked" => {
            format!("{name} cannot send UDP at all (it told control so); only TCP to DERP works.")
        }
        "both-hard-nat" => format!(
            "both this node and {name} are behind NATs that change the port for every \
             destination (hard NAT), so hole punching cannot work. {}",
            relay_hint(peer)
        ),
        "local-hard-nat" => format!(
            "{}, and no pong came back from {name}. {}",
            own_nat(status),
            relay_hint(peer)
        ),
        "peer-hard-nat" => format!(
            "{name}'s NAT changes the port for every destination (hard NAT), and no pong \
             came back. {}",
            relay_hint(peer)
        ),
        "no-pong-from-candidates" => format!(
            "{candidates} candidate address{} pinged{}; none answered. A firewall may drop \
             inbound UDP.",
            if candidates == 1 { " was" } else { "es were" },
            since(peer, reason)
                .map(|t| format!(" since {t}"))
                .unwrap_or_default()
        ),
        "direct-lost" => format!(
            "the direct path stopped answering{}; back on DERP while {} is retried.",
            since(peer, reason)
                .map(|t| format!(" at {t}"))
                .unwrap_or_default(),
            last_direct(peer).unwrap_or("the old address")
        ),
        "no-derp-region" => {
            format!("{name} has neither a direct address nor a DERP region we know.")
        }
        "peer-relay" => format!(
            "no direct path answers, pongs through the relay do. {}",
            relay_hint(peer)
        ),
        "relay-unreachable" => format!(
            "the peer relay stopped answering{}; DERP carries traffic until one answers again.",
            since(peer, reason)
                .map(|t| format!(" at {t}"))
                .unwrap_or_default()
        ),
        "no-disco-key" => format!(
            "{name} has no disco key (too old, or not connected to control), so no direct \
             path can be found."
        ),
        "" if kind == PathKind::Unknown => {
            return format!("No path yet: the data plane has not reported {name}.")
        }
        other => format!("reason `{other}`."),
    };
    format!("{on}: {why}")
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::{Netcheck, PathChange, Region};

    fn status() -> Status {
        let mut s = Status::default();
        s.data_plane.derp_latency_ms.insert(900, Some(0.8));
        s.netcheck = Some(Netcheck {
            global_v4: Some("198.18.1.2:41641".into()),
            regions: vec![Region {
                id: 900,
                code: "lab".into(),
                ..Default::default()
            }],
            ..Default::default()
        });
        s
    }

    fn derp_peer(reason: &str) -> Peer {
        Peer {
            name: "c2.tailnet.example".into(),
            path: Some("derp".into()),
            derp_region: Some(900),
            path_reason: Some(reason.into()),
            endpoints: vec!["198.18.2.2:41641".into(), "10.2.0.2:41641".into()],
            ..Default::default()
        }
    }

    #[test]
    fn hard_nat_on_both_sides_names_derp_latency_and_the_relay_hint() {
        let text = sentence(&status(), &derp_peer("both-hard-nat"));
        assert!(
            text.starts_with("On DERP (lab, 0.8 ms): both this node and c2"),
            "{text}"
        );
        assert!(text.contains("hard NAT"), "{text}");
        assert!(text.contains("--relay-server-port"), "{text}");
    }

    #[test]
    fn every_reason_the_daemon_emits_has_its_own_words() {
        let reasons = [
            "idle",
            "discovering",
            "no-endpoints",
            "udp-blocked",
            "both-hard-nat",
            "local-hard-nat",
            "peer-hard-nat",
            "peer-udp-blocked",
            "no-pong-from-candidates",
            "direct-lost",
            "no-derp-region",
            "no-disco-key",
            "relay-unreachable",
        ];
        let texts: Vec<String> = reasons
            .iter()
            .map(|r| sentence(&status(), &derp_peer(r)))
            .collect();
        for (reason, text) in reasons.iter().zip(&texts) {
            assert!(!text.contains("reason `"), "{reason}: {text}");
        }
        let distinct: std::collections::BTreeSet<_> = texts.iter().collect();
        assert_eq!(distinct.len(), reasons.len());
        assert!(texts[5].contains("public 198.18.1.2:41641"), "{}", texts[5]);
    }

    #[test]
    fn direct_names_endpoint_and_since_when() {
        let mut p = derp_peer("direct");
        p.path = Some("direct".into());
        p.endpoint = Some("198.18.2.2:41641".into());
        p.latency_ms = Some(0.6);
        p.path_history = vec![PathChange {
            at: "2026-11-22T12:04:07Z".into(),
            path: "direct".into(),
            reason: "direct".into(),
            ..Default::default()
        }];
        assert_eq!(
            sentence(&status(), &p),
            "Direct to 198.18.2.2:41641 since 12:04:07 (0.6 ms)."
        );
    }

    #[test]
    fn direct_lost_names_the_address_being_retried() {
        let mut p = derp_peer("direct-lost");
        p.path_history = vec![PathChange {
            at: "2026-11-22T12:04:07Z".into(),
            path: "direct".into(),
            endpoint: Some("198.18.2.2:41641".into()),
            reason: "direct".into(),
            ..Default::default()
        }];
        let text = sentence(&status(), &p);
        assert!(text.contains("while 198.18.2.2:41641 is retried"), "{text}");
    }

    #[test]
    fn peer_relay_paths_say_so() {
        let mut p = derp_peer("both-hard-nat");
        p.path = Some("peer-relay".into());
        p.endpoint = Some("203.0.113.9:40000".into());
        let text = sentence(&status(), &p);
        assert!(
            text.starts_with("On a peer relay (203.0.113.9:40000"),
            "{text}"
        );
        assert!(
            text.contains("Using the peer relay at 203.0.113.9:40000."),
            "{text}"
        );
    }

    #[test]
    fn relay_reasons_explain_why_a_relay_does_not_carry_it() {
        let mut texts = Vec::new();
        for why in [
            None,
            Some("no-relay-granted"),
            Some("peer-not-relay-capable"),
            Some("relay-discovering"),
            Some("relay-allocation-failed"),
            Some("relay-bind-timeout"),
            Some("relay-unreachable"),
            Some("relay-client-disabled"),
        ] {
            let mut p = derp_peer("both-hard-nat");
            p.relay_reason = why.map(str::to_string);
            texts.push(sentence(&status(), &p));
        }
        assert_eq!(
            texts[0], texts[1],
            "no grant: the set-up hint, as without the field"
        );
        assert!(texts[4].contains("allocation"), "{}", texts[4]);
        assert!(texts[5].contains("bind timed out"), "{}", texts[5]);
        assert!(texts[7].contains("disable-relay-client"), "{}", texts[7]);
        let distinct: std::collections::BTreeSet<_> = texts.iter().skip(1).collect();
        assert_eq!(distinct.len(), 7);
        // On the relay: its VNI and node.
        let mut p = derp_peer("peer-relay");
        p.path = Some("peer-relay".into());
        p.endpoint = Some("198.18.0.20:40000".into());
        p.relay_vni = Some(1);
        p.relay_node = Some("relay".into());
        let text = sentence(&status(), &p);
        assert!(
            text.contains("Using the peer relay at 198.18.0.20:40000, VNI 1 run by relay."),
            "{text}"
        );
        assert!(!text.contains("reason `"), "{text}");
    }

    #[test]
    fn unknown_codes_are_shown_not_hidden() {
        let text = sentence(&status(), &derp_peer("from-the-future"));
        assert!(text.ends_with("reason `from-the-future`."), "{text}");
    }
}
