//! `tern set`'s routing prefs: a patch checked against the live netmap and the host before any
//! of it is stored, so a bad value changes nothing.

use std::net::IpAddr;

use tern_platform::netfilter::{self, NetfilterMode};

use crate::localapi::{resolve_peer, NetPrefsPatch, PingTarget};
use crate::state::NetPrefs;
use crate::status::Status;

/// `current` with `patch` applied, or why the patch is refused (nothing applied then).
pub(super) fn patched(
    current: &NetPrefs,
    patch: &NetPrefsPatch,
    status: &Status,
) -> Result<NetPrefs, String> {
    let mut next = current.clone();
    if let Some(spec) = &patch.exit_node {
        next.exit_node = exit_node_ip(spec.trim(), status)?;
    }
    if let Some(v) = patch.exit_node_allow_lan_access {
        next.exit_node_allow_lan_access = v;
    }
    if let Some(v) = patch.advertise_exit_node {
        next.advertise_exit_node = v;
    }
    if let Some(routes) = &patch.advertise_routes {
        let text = routes
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",");
        next.advertise_routes =
            crate::routing::parse_advertised_routes(&text).map_err(|e| e.to_string())?;
    }
    if let Some(v) = patch.accept_routes {
        next.accept_routes = v;
    }
    if let Some(v) = patch.snat_subnet_routes {
        next.snat_subnet_routes = v;
    }
    if let Some(v) = patch.accept_dns {
        next.accept_dns = v;
    }
    if let Some(v) = patch.stateful_filtering {
        next.stateful_filtering = v;
    }
    if let Some(mode) = &patch.netfilter_mode {
        next.netfilter_mode = checked_netfilter_mode(mode)?;
    }
    if next.exit_node.is_some() && next.advertise_exit_node {
        return Err(
            "this node cannot use an exit node and offer one at the same time: pass \
             --exit-node= or --advertise-exit-node=false"
                .into(),
        );
    }
    Ok(next)
}

/// The tailnet IP of the peer `spec` names, which must offer an exit node; `""` = none.
fn exit_node_ip(spec: &str, status: &Status) -> Result<Option<IpAddr>, String> {
    if spec.is_empty() {
        return Ok(None);
    }
    let peer = match resolve_peer(status, spec) {
        Ok(PingTarget::Peer(peer)) => peer,
        Ok(PingTarget::SelfNode(_)) => {
            return Err(format!(
                "{spec:?} is this node; pick a peer as the exit node"
            ))
        }
        Err(e) if status.peers.is_empty() => {
            return Err(format!(
                "{}; no peers are known yet: run `tern up` first, the exit node is looked up \
                 in the tailnet",
                e.message
            ))
        }
        Err(e) => return Err(e.message),
    };
    if !peer.exit_node_option {
        return Err(format!(
            "peer {} does not offer an exit node (it must advertise one with \
             --advertise-exit-node and control must approve it); `tern exit-node list` shows \
             the ones that do",
            peer.name
        ));
    }
    peer.tailnet_ips
        .first()
        .and_then(|ip| ip.parse().ok())
        .map(Some)
        .ok_or_else(|| format!("peer {} has no tailnet address", peer.name))
}

/// A netfilter mode the host can do: `off` always; `on`/`nodivert` need nft or iptables.
fn checked_netfilter_mode(mode: &str) -> Result<String, String> {
    let parsed: NetfilterMode = mode
        .parse()
        .map_err(|_| format!("netfilter mode {mode:?}: pass on, nodivert or off"))?;
    if parsed != NetfilterMode::Off {
        netfilter::detect_kind().map_err(|e| e.to_string())?;
    }
    Ok(parsed.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{DataPlaneStatus, PeerStatus, SelfStatus};

    fn status_with(peers: Vec<PeerStatus>) -> Status {
        let mut s = Status::initial(DataPlaneStatus::default(), std::time::SystemTime::now());
        s.self_node = Some(SelfStatus {
            name: "c1.lab.ts.net".into(),
            hostname: "c1".into(),
            tailnet_ips: vec!["100.64.0.1".into()],
            ..Default::default()
        });
        s.peers = peers;
        s
    }

    fn peer(name: &str, ip: &str, exit: bool) -> PeerStatus {
        PeerStatus {
            name: format!("{name}.lab.ts.net"),
            hostname: name.into(),
            tailnet_ips: vec![ip.into()],
            exit_node_option: exit,
            ..Default::default()
        }
    }

    #[test]
    fn exit_node_must_name_one_peer_that_offers_it() {
        let status = status_with(vec![
            peer("c2", "100.64.0.2", true),
            peer("c3", "100.64.0.3", false),
        ]);
        let patch = |spec: &str| NetPrefsPatch {
            exit_node: Some(spec.into()),
            ..Default::default()
        };
        let ok = patched(&NetPrefs::default(), &patch("c2"), &status).unwrap();
        assert_eq!(ok.exit_node, Some("100.64.0.2".parse().unwrap()));
        let cleared = patched(&ok, &patch(""), &status).unwrap();
        assert_eq!(cleared.exit_node, None);
        let err = patched(&NetPrefs::default(), &patch("c3"), &status).unwrap_err();
        assert!(err.contains("does not offer an exit node"), "{err}");
        let err = patched(&NetPrefs::default(), &patch("nobody"), &status).unwrap_err();
        assert!(!err.is_empty());
        let mut none = status_with(vec![]);
        none.self_node = None;
        let err = patched(&NetPrefs::default(), &patch("c2"), &none).unwrap_err();
        assert!(err.contains("tern up"), "{err}");
    }

    #[test]
    fn using_and_offering_an_exit_node_together_is_refused() {
        let status = status_with(vec![peer("c2", "100.64.0.2", true)]);
        let both = NetPrefsPatch {
            exit_node: Some("c2".into()),
            advertise_exit_node: Some(true),
            ..Default::default()
        };
        let err = patched(&NetPrefs::default(), &both, &status).unwrap_err();
        assert!(err.contains("at the same time"), "{err}");
    }

    #[test]
    fn routes_are_validated_again_and_modes_checked() {
        let status = status_with(vec![]);
        let overlap = NetPrefsPatch {
            advertise_routes: Some(vec![
                "10.0.0.0/8".parse().unwrap(),
                "10.1.0.0/16".parse().unwrap(),
            ]),
            ..Default::default()
        };
        assert!(patched(&NetPrefs::default(), &overlap, &status)
            .unwrap_err()
            .contains("overlaps"));
        let off = NetPrefsPatch {
            netfilter_mode: Some("off".into()),
            ..Default::default()
        };
        assert_eq!(
            patched(&NetPrefs::default(), &off, &status)
                .unwrap()
                .netfilter_mode,
            "off"
        );
        let bad = NetPrefsPatch {
            netfilter_mode: Some("sometimes".into()),
            ..Default::default()
        };
        assert!(patched(&NetPrefs::default(), &bad, &status)
            .unwrap_err()
            .contains("on, nodivert or off"));
    }
}
