//! HTTPS control end to end: the lab control server serves `/key` and `/ts2021` over TLS too, with
//! a certificate from a lab CA made for this test. tern (`SSL_CERT_FILE` = the lab CA) and the
//! real Tailscale node, Caddy/tsnet v1.90.9 (the same `SSL_CERT_FILE`), both join
//! `https://CONTROL_IP`, see each other and exchange traffic.
//!
//! * nat1 drops tern's plain HTTP to control (TCP port 80), so its `/ts2021` must fall back to TLS
//!   on 443 (the port-443 fallback); tsnet in c2 may use either.
//! * A daemon that trusts another CA is refused at `GET /key`, and the error names the problem.
//!
//! Everything runs inside lab namespaces with no route out.

#[path = "support/lab_nodes.rs"]
mod lab_nodes;
#[path = "support/lab_server.rs"]
mod lab_server;
mod support;

use std::path::{Path, PathBuf};

use lab_nodes::{curl, start_derp, tail, wait, Node, AUTH_KEY};
use lab_server::{test_config, LabServer};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use support::require_root;
use tern_lab::control::config::TlsConfig;
use tern_lab::topology::{CONTROL_IP, RELAY_IPS};
use tern_lab::{CaddyConfig, CaddyNode, NatMode, Netns, Process, Topology};

const CADDY_BODY: &str = "hello over a tailnet joined by https";

/// A CA and a server certificate it signed for `ip`, as PEM files in `dir`.
struct LabCa {
    ca_pem: PathBuf,
    cert_pem: PathBuf,
    key_pem: PathBuf,
}

fn make_ca(dir: &Path, name: &str, ip: &str) -> LabCa {
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, format!("{name} lab CA"));
    let ca_key = KeyPair::generate().expect("CA key");
    let ca_cert = ca.self_signed(&ca_key).expect("CA certificate");
    let leaf = CertificateParams::new(vec![ip.to_string()]).expect("server params");
    let leaf_key = KeyPair::generate().expect("server key");
    let leaf_cert = leaf
        .signed_by(&leaf_key, &ca_cert, &ca_key)
        .expect("server certificate");
    let write = |file: &str, pem: String| {
        let path = dir.join(format!("{name}-{file}"));
        std::fs::write(&path, pem).expect("write PEM");
        path
    };
    LabCa {
        ca_pem: write("ca.pem", ca_cert.pem()),
        cert_pem: write("cert.pem", leaf_cert.pem()),
        key_pem: write("key.pem", leaf_key.serialize_pem()),
    }
}

/// The lab: topology, `tern derp`, and the control server on CONTROL_IP:80 (plain) and :443
/// (TLS with the lab CA's certificate). Fields drop in order: servers before namespaces.
struct Lab {
    control: LabServer,
    derp: Process,
    ca: LabCa,
    dir: tempfile::TempDir,
    topo: Topology,
}

impl Lab {
    fn start() -> Lab {
        require_root();
        let topo = Topology::standard_unique(NatMode::Easy, NatMode::Easy).expect("build lab");
        let derp = start_derp(&topo);
        let dir = tempfile::tempdir().expect("temp dir");
        let ca = make_ca(dir.path(), "good", &CONTROL_IP.to_string());
        let mut config = test_config(
            &format!("{CONTROL_IP}:80"),
            &dir.path().join("control"),
            &RELAY_IPS[0].to_string(),
            10,
        );
        config.tls = Some(TlsConfig {
            listen: format!("{CONTROL_IP}:443").parse().expect("address"),
            cert: ca.cert_pem.clone(),
            key: ca.key_pem.clone(),
        });
        let server_ns = topo.ns("server").expect("server ns").name().to_string();
        let control = LabServer::start(config, Some(&server_ns));
        Lab {
            control,
            derp,
            ca,
            dir,
            topo,
        }
    }

    fn ns(&self, name: &str) -> &Netns {
        self.topo.ns(name).expect("lab namespace")
    }

    /// nat1 drops c1's TCP to port 80 (plain HTTP to control); 443 stays open.
    fn block_plain_http_at_nat1(&self) {
        let rules = "table inet noplainhttp {\n  chain forward {\n    type filter hook forward priority -10; policy accept;\n    tcp dport 80 drop\n  }\n}\n";
        self.ns("nat1").nft_apply(rules).expect("block port 80");
    }
}

fn url() -> String {
    format!("https://{CONTROL_IP}")
}

#[test]
fn tern_and_tsnet_join_an_https_control_server_and_talk() {
    let lab = Lab::start();
    lab.block_plain_http_at_nat1();
    let env = [("SSL_CERT_FILE", lab.ca.ca_pem.as_path())];
    let a = Node::start_with_env(lab.ns("c1"), lab.dir.path(), "ta", &env);
    a.wait_for_api(20);
    a.up_at(&url(), "ta");

    let mut config = CaddyConfig::new("tsb", &url(), AUTH_KEY);
    config.site_body = format!("respond \"{CADDY_BODY}\"");
    config
        .env
        .push(("SSL_CERT_FILE".into(), lab.ca.ca_pem.display().to_string()));
    let caddy = CaddyNode::start(lab.ns("c2"), config).expect("start caddy");
    let report = || {
        format!(
            "== ta status\n{:#}\n{}\n== tsb (caddy) log\n{}\n== derp\n{}",
            a.status(),
            a.logs(),
            tail(&caddy.logs(), 120),
            tail(&lab.derp.output(), 20)
        )
    };
    let peer = wait("tern to see tsb", 90, report, || a.peer("tsb"));
    let caddy_ip = peer["tailnet_ips"][0]
        .as_str()
        .expect("tsb's IP")
        .to_string();

    // Plain HTTP to control is dropped at nat1: tern's ts2021 connection went over TLS.
    let logs = a.process.output();
    assert!(
        logs.lines().any(|l| l.contains("ts2021 connection up")
            && l.contains(&format!("https://{CONTROL_IP}:443"))),
        "tern's ts2021 connection should be over TLS on 443\n{}",
        report()
    );
    let nodes = lab.control.handle.nodes();
    for host in ["ta", "tsb"] {
        assert!(
            nodes.iter().any(|n| n.hostname() == Some(host)),
            "{host} registered with the HTTPS control server"
        );
    }
    wait("curl ta → Caddy's tailnet site", 60, report, || {
        let body = curl(lab.ns("c1"), "GET", &format!("http://{caddy_ip}/"))?;
        (body == CADDY_BODY.as_bytes()).then_some(())
    });
}

#[test]
fn a_control_certificate_from_an_untrusted_ca_is_refused_with_the_reason() {
    let lab = Lab::start();
    let other = make_ca(lab.dir.path(), "other", &CONTROL_IP.to_string());
    let env = [("SSL_CERT_FILE", other.ca_pem.as_path())];
    let a = Node::start_with_env(lab.ns("c1"), lab.dir.path(), "tbad", &env);
    a.wait_for_api(20);
    a.up_at(&url(), "tbad");
    let error = wait(
        "the control error",
        30,
        || a.logs(),
        || {
            a.status()["control"]["last_error"]["message"]
                .as_str()
                .map(str::to_string)
        },
    );
    assert!(
        error.contains(&format!("GET https://{CONTROL_IP}/key"))
            && error.contains("UnknownIssuer")
            && error.contains("SSL_CERT_FILE"),
        "the error names the request and the certificate problem: {error}"
    );
    assert_ne!(a.status()["backend_state"], "Running");
    assert!(
        lab.control.handle.nodes().is_empty(),
        "nothing registered over an untrusted certificate"
    );
}
