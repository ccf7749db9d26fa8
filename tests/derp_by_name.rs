//! DERP by host name, as Tailscale's and most Headscale DERP maps give it: the map's node has only
//! `HostName = derp.lab.test` (no IPv4/IPv6), a stub DNS server on the lab's public segment answers
//! for it, and `tern derp` presents a certificate from a lab CA made for this test (no
//! `InsecureForTests`). tern and the real Tailscale node (Caddy/tsnet v1.90.9), both with the lab
//! CA in `SSL_CERT_FILE` and the stub in their `/etc/resolv.conf`, sit behind hard NATs, so DERP
//! is their only path: traffic between them proves both resolved the name and verified the
//! certificate. Everything runs inside lab namespaces with no route out.

#[path = "support/dns_stub.rs"]
mod dns_stub;
#[path = "support/lab_nodes.rs"]
mod lab_nodes;
#[path = "support/lab_server.rs"]
mod lab_server;
mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use dns_stub::{DnsStub, ResolvConf};
use lab_nodes::{curl, tail, wait, Node, AUTH_KEY, DERP_REGION};
use lab_server::{test_config, LabServer};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use support::require_root;
use tern_lab::topology::{CONTROL_IP, RELAY_IPS, SERVER_IPS};
use tern_lab::{CaddyConfig, CaddyNode, NatMode, Netns, Process, Topology};

const DERP_NAME: &str = "derp.lab.test";
const CADDY_BODY: &str = "hello over a DERP server found by name";

/// A lab CA and a certificate for `name` it signed, as PEM files in `dir`.
fn make_ca(dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "tern DERP lab CA");
    let ca_key = KeyPair::generate().expect("CA key");
    let ca_cert = ca.self_signed(&ca_key).expect("CA certificate");
    let leaf_key = KeyPair::generate().expect("server key");
    let leaf = CertificateParams::new(vec![name.to_string()])
        .expect("server params")
        .signed_by(&leaf_key, &ca_cert, &ca_key)
        .expect("server certificate");
    let write = |file: &str, pem: String| {
        let path = dir.join(file);
        std::fs::write(&path, pem).expect("write PEM");
        path
    };
    (
        write("ca.pem", ca_cert.pem()),
        write("derp.pem", leaf.pem()),
        write("derp.key", leaf_key.serialize_pem()),
    )
}

/// `tern derp` on the relay host's first address with the lab CA's certificate.
fn start_derp(relay: &Netns, cert: &Path, key: &Path) -> Process {
    let ip = RELAY_IPS[0].to_string();
    let mut derp = Process::spawn(
        relay,
        "tern derp (by name)",
        env!("CARGO_BIN_EXE_tern"),
        &[
            "derp",
            "--addr",
            &format!("{ip}:8443"),
            "--certfile",
            &cert.display().to_string(),
            "--keyfile",
            &key.display().to_string(),
        ],
    )
    .expect("start tern derp");
    derp.wait_for_output("derp: serving", Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("tern derp did not start: {e}\n{}", derp.output()));
    derp
}

#[test]
fn tern_and_tsnet_talk_over_a_derp_server_named_only_by_host_name() {
    require_root();
    let topo = Topology::standard_unique(NatMode::Hard, NatMode::Hard).expect("build lab");
    let dir = tempfile::tempdir().expect("temp dir");
    let (ca, cert, key) = make_ca(dir.path(), DERP_NAME);
    let ns = |name: &str| topo.ns(name).expect("lab namespace");
    let dns = DnsStub::start(
        ns("server"),
        SocketAddr::from((SERVER_IPS[0], 53)),
        &[(DERP_NAME, RELAY_IPS[0])],
    );
    let _resolv = [
        ResolvConf::point(ns("c1"), SERVER_IPS[0]),
        ResolvConf::point(ns("c2"), SERVER_IPS[0]),
    ];
    let derp = start_derp(ns("relay"), &cert, &key);

    let mut config = test_config(
        &format!("{CONTROL_IP}:8080"),
        &dir.path().join("control"),
        &RELAY_IPS[0].to_string(),
        10,
    );
    let node = &mut config.derp_regions[0].nodes[0];
    node.host_name = DERP_NAME.into();
    node.ipv4 = String::new();
    node.ipv6 = "none".into();
    node.insecure_for_tests = false;
    config.validate().expect("host-name-only DERP map");
    let server_ns = ns("server").name().to_string();
    let _control = LabServer::start(config, Some(&server_ns));

    let a = Node::start_with_env(ns("c1"), dir.path(), "ta", &[("SSL_CERT_FILE", &ca)]);
    a.wait_for_api(20);
    a.up("ta");
    let mut caddy_config = CaddyConfig::new("tsb", &format!("http://{CONTROL_IP}:8080"), AUTH_KEY);
    caddy_config.site_body = format!("respond \"{CADDY_BODY}\"");
    caddy_config
        .env
        .push(("SSL_CERT_FILE".into(), ca.display().to_string()));
    let caddy = CaddyNode::start(ns("c2"), caddy_config).expect("start caddy");
    let report = || {
        format!(
            "== ta status\n{:#}\n{}\n== tsb (caddy) log\n{}\n== derp\n{}\nDNS queries answered: {}",
            a.status(),
            a.logs(),
            tail(&caddy.logs(), 120),
            tail(&derp.output(), 30),
            dns.queries.load(std::sync::atomic::Ordering::Relaxed)
        )
    };
    let peer = wait("tern to see tsb with home DERP 900", 90, report, || {
        a.peer("tsb")
    });
    let caddy_ip = peer["tailnet_ips"][0]
        .as_str()
        .expect("tsb's IP")
        .to_string();
    wait(
        "curl ta → Caddy's tailnet site over DERP",
        60,
        report,
        || {
            let body = curl(ns("c1"), "GET", &format!("http://{caddy_ip}/"))?;
            (body == CADDY_BODY.as_bytes()).then_some(())
        },
    );
    let path = a.peer_entry("tsb").expect("tsb in status");
    assert_eq!(
        path["path"],
        "derp",
        "hard×hard stays on DERP\n{}",
        report()
    );
    assert_eq!(path["derp_region"], DERP_REGION, "{}", report());
    assert!(
        a.status()["netcheck"]["regions"][0]["latency_ms"].is_number(),
        "netcheck measured the region by its resolved address\n{}",
        report()
    );
    assert!(
        dns.queries.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "the name was resolved through the stub\n{}",
        report()
    );
}

/// The certificate check is real: from c1, a DERP client that trusts the lab CA connects to
/// `derp.lab.test`, one that trusts nothing is refused with the reason, and one that trusts the
/// CA but expects another name (`CertName`) is refused too.
#[test]
fn derp_certificates_are_verified_against_the_trust_store() {
    require_root();
    let topo = Topology::standard_unique(NatMode::Easy, NatMode::Easy).expect("build lab");
    let dir = tempfile::tempdir().expect("temp dir");
    let (ca, cert, key) = make_ca(dir.path(), DERP_NAME);
    let _derp = start_derp(topo.ns("relay").expect("relay"), &cert, &key);
    let ca_pem = std::fs::read(&ca).expect("CA file");
    let outcomes = topo
        .ns("c1")
        .expect("c1")
        .run_in(move || Ok(connect_three_ways(&ca_pem)))
        .expect("run in c1");
    let [trusted, untrusted, wrong_name] = outcomes;
    assert_eq!(trusted, Ok(()), "the lab CA is trusted");
    let untrusted = untrusted.expect_err("no trusted root");
    assert!(untrusted.contains("UnknownIssuer"), "{untrusted}");
    let wrong_name = wrong_name.expect_err("CertName does not match");
    assert!(wrong_name.contains("not valid for name"), "{wrong_name}");
}

fn connect_three_ways(ca_pem: &[u8]) -> [Result<(), String>; 3] {
    use rustls::pki_types::pem::PemObject;
    use std::sync::Arc;
    use tern::derp::client::{ClientConfig, DerpClient, TlsVerify, Transport};
    let mut lab_roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem).flatten() {
        lab_roots.add(cert).expect("lab CA");
    }
    let lab_roots = Arc::new(lab_roots);
    let verifies = [
        TlsVerify::Roots(lab_roots.clone()),
        TlsVerify::Roots(Arc::new(rustls::RootCertStore::empty())),
        TlsVerify::RootsFor {
            roots: lab_roots,
            cert_name: "other.lab.test".into(),
        },
    ];
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    verifies.map(|verify| {
        let config = ClientConfig {
            addr: SocketAddr::from((RELAY_IPS[0], 8443)),
            host: DERP_NAME.into(),
            transport: Transport::Tls {
                server_name: DERP_NAME.into(),
                verify,
            },
            private_key: tern::keys::NodePrivate::generate(),
            preferred: false,
        };
        runtime
            .block_on(DerpClient::connect(&config))
            .map(drop)
            .map_err(|e| e.to_string())
    })
}
