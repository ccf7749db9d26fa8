//! The exposition: families once with HELP and TYPE, samples well-formed, labels escaped, the
//! per-peer series bounded.

use std::collections::{BTreeMap, HashSet};

use super::*;
use crate::status::{
    DataPlaneStatus, PathChangeCount, PeerStatus, RelayForwarded, RelayServerStatus,
    RelaySessionStatus,
};

fn peer(name: &str, path: &str, latency_ms: Option<f64>) -> PeerStatus {
    PeerStatus {
        name: name.into(),
        path: Some(path.into()),
        latency_ms,
        rx_bytes: 10,
        tx_bytes: 20,
        ..Default::default()
    }
}

fn status() -> Status {
    let mut s = Status::initial(DataPlaneStatus::default(), std::time::SystemTime::now());
    s.peers = vec![
        peer("a.lab.test", "direct", Some(1.5)),
        peer("b.lab.test", "derp", None),
        peer("we\"ird\\name", "peer-relay", Some(3.0)),
    ];
    let mut io = PathIo::default();
    io.count_in(PathKind::DirectV4, 100);
    io.count_out(PathKind::Derp, 50);
    io.count_out(PathKind::Derp, 50);
    s.data_plane.path_io = io.to_status();
    s.data_plane.drops = BTreeMap::from([("filtered".into(), 4), ("no_derp".into(), 2)]);
    s.data_plane.path_changes = vec![PathChangeCount {
        path: "derp".into(),
        reason: "direct-lost".into(),
        count: 3,
    }];
    s.relay_server = Some(RelayServerStatus {
        allocations: 2,
        forwarded_by_transport: vec![RelayForwarded {
            transport_in: "udp4".into(),
            transport_out: "udp6".into(),
            packets: 3,
            bytes: 300,
        }],
        sessions: vec![RelaySessionStatus {
            state: "open".into(),
            ..Default::default()
        }],
        ..Default::default()
    });
    s.data_plane.netstack = BTreeMap::from([("open_connections".into(), 2), ("udp_in".into(), 5)]);
    s.data_plane.peerapi = BTreeMap::from([("dns_queries".into(), 7)]);
    s
}

/// Each sample line: `name{labels} value`; returns (name, labels text, value).
fn samples(text: &str) -> Vec<(String, String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').expect("a value");
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            (name.into(), labels.into(), value.parse().expect("a number"))
        })
        .collect()
}

#[test]
fn every_family_has_help_and_type_once_before_its_samples() {
    let text = render(&status());
    let mut typed = HashSet::new();
    let mut helped = HashSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap_or_default();
            assert!(helped.insert(name.to_string()), "HELP twice: {name}");
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("name and kind");
            assert!(kind == "counter" || kind == "gauge", "{line}");
            assert!(
                !kind.eq("counter") || name.ends_with("_total"),
                "counters end in _total: {name}"
            );
            assert!(typed.insert(name.to_string()), "TYPE twice: {name}");
        }
    }
    let mut series = HashSet::new();
    for (name, labels, _) in samples(&text) {
        assert!(typed.contains(&name), "sample before its TYPE: {name}");
        assert!(
            series.insert(format!("{name}{{{labels}}}")),
            "duplicate {name}{{{labels}}}"
        );
    }
}

#[test]
fn values_and_labels_come_from_the_status() {
    let text = render(&status());
    for line in [
        "tern_peer_path{peer=\"a.lab.test\",path=\"direct\"} 1",
        "tern_peer_path{peer=\"a.lab.test\",path=\"derp\"} 0",
        "tern_peer_path{peer=\"b.lab.test\",path=\"derp\"} 1",
        "tern_peer_path{peer=\"we\\\"ird\\\\name\",path=\"peer-relay\"} 1",
        "tern_peer_latency_seconds{peer=\"a.lab.test\"} 0.0015",
        "tern_peers{path=\"direct\"} 1",
        "tern_peers{path=\"none\"} 0",
        "tailscaled_inbound_bytes_total{path=\"direct_ipv4\"} 100",
        "tailscaled_outbound_packets_total{path=\"derp\"} 2",
        "tailscaled_outbound_bytes_total{path=\"peer_relay_ipv6\"} 0",
        "tailscaled_inbound_dropped_packets_total{reason=\"filtered\"} 4",
        "tailscaled_outbound_dropped_packets_total{reason=\"no_derp\"} 2",
        "tern_path_changes_total{path=\"derp\",reason=\"direct-lost\"} 3",
        "tailscaled_peer_relay_forwarded_packets_total{transport_in=\"udp4\",transport_out=\"udp6\"} 3",
        "tailscaled_peer_relay_forwarded_bytes_total{transport_in=\"udp4\",transport_out=\"udp6\"} 300",
        "tailscaled_peer_relay_endpoints{state=\"open\"} 1",
        "tailscaled_peer_relay_endpoints{state=\"connecting\"} 0",
        "tern_netstack_open_connections 2",
        "tern_netstack_udp_in_total 5",
        "tern_peerapi_dns_queries_total 7",
        "tern_peer_series_omitted 0",
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
    }
    assert!(text.contains("# TYPE tern_netstack_open_connections gauge\n"));
    // No latency sample for a peer without one; no relay families without a relay server.
    assert!(!text.contains("tern_peer_latency_seconds{peer=\"b.lab.test\"}"));
    let mut no_relay = status();
    no_relay.relay_server = None;
    assert!(!render(&no_relay).contains("peer_relay_forwarded"));
}

#[test]
fn per_peer_series_stop_at_the_limit_and_say_how_many_were_left_out() {
    let mut s = status();
    s.peers = (0..MAX_PEER_SERIES + 5)
        .map(|i| peer(&format!("n{i:05}.lab.test"), "derp", Some(1.0)))
        .collect();
    let text = render(&s);
    let per_peer = samples(&text)
        .into_iter()
        .filter(|(n, _, _)| n == "tern_peer_path")
        .count();
    assert_eq!(per_peer, MAX_PEER_SERIES * 4);
    assert!(text.contains("\ntern_peer_series_omitted 5\n"));
    assert!(text.contains(&format!(
        "\ntern_peers{{path=\"derp\"}} {}\n",
        MAX_PEER_SERIES + 5
    )));
}

#[test]
fn the_http_endpoint_serves_metrics_and_nothing_else() {
    let s = status();
    let get = |method: &str, path: &str| {
        let req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .body(())
            .expect("request");
        http::answer(&req, &s)
    };
    let ok = get("GET", "/metrics");
    assert_eq!(ok.status(), 200);
    assert_eq!(ok.headers()["content-type"], http::CONTENT_TYPE);
    assert_eq!(get("GET", "/").status(), 404);
    assert_eq!(get("POST", "/metrics").status(), 405);
}
