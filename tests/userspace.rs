//! `--tun userspace-networking` (issue 14) with a real Tailscale node: tern runs as an
//! unprivileged user (uid 65534, no capabilities) in lab namespace c1, with no TUN, and a
//! Caddy/tsnet node (tailscale.com v1.90.9) in c2.
//!
//! * curl in c1 reaches the tsnet node through tern's SOCKS5 proxy (`--socks5-hostname`, by
//!   MagicDNS name and by tailnet IP) and through its HTTP proxy (plain and CONNECT);
//! * the tsnet node reaches an HTTP server on c1's 127.0.0.1 through tern's tailnet IP (inbound
//!   TCP forwarded to loopback, as Go does);
//! * `tern ping` and `tern netcheck` work without a TUN;
//! * the proxies answer bad requests with the protocol's error (SOCKS reply codes, 400/502)
//!   and survive a flood of junk and idle clients.

#[path = "support/lab_nodes.rs"]
mod lab_nodes;
#[path = "support/lab_server.rs"]
mod lab_server;
mod support;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use lab_nodes::{serve_http, start_control, start_derp, tail, wait, Node};
use support::require_root;
use tern_lab::topology::CONTROL_IP;
use tern_lab::{CaddyConfig, CaddyNode, NatMode, Netns, Process, Topology};

const SOCKS: &str = "127.0.0.1:1080";
const HTTP_PROXY: &str = "127.0.0.1:8088";
/// nobody:nogroup on Debian.
const NOBODY: &str = "65534";

/// `tern daemon --tun userspace-networking` as uid 65534 with no capabilities.
fn start_unprivileged(ns: &Netns, dir: &Path, name: &str) -> Node {
    let home = dir.join(name);
    std::fs::create_dir_all(&home).expect("node dir");
    std::os::unix::fs::chown(&home, Some(65534), Some(65534)).expect("chown node dir");
    // The test's temp dir is root's 0700: let uid 65534 walk into it.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).expect("chmod");
    let socket = home.join("tern.sock");
    let mut cmd = ns.command("setpriv");
    cmd.args([
        "--reuid",
        NOBODY,
        "--regid",
        NOBODY,
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
        "--no-new-privs",
        env!("CARGO_BIN_EXE_tern"),
        "daemon",
        "--tun",
        "userspace-networking",
        "--port",
        "41641",
        "--socks5-server",
        SOCKS,
        "--outbound-http-proxy-listen",
        HTTP_PROXY,
        "--state-dir",
    ])
    .arg(home.join("state"))
    .arg("--socket")
    .arg(&socket)
    .env("TERN_LOG", lab_nodes::DAEMON_LOG)
    .env("NO_COLOR", "1");
    let process = Process::spawn_command(ns, name, cmd).expect("start tern daemon");
    Node {
        process,
        socket,
        name: name.to_string(),
    }
}

/// curl in `ns` with extra arguments; the body on success.
fn curl(ns: &Netns, args: &[&str], url: &str) -> Option<String> {
    let mut all = vec!["curl", "-sS", "--max-time", "10"];
    all.extend_from_slice(args);
    all.push(url);
    let out = ns.exec_unchecked(&all).ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The HTTP status line curl reports (`-w %{http_code}`), even for an error answer.
fn http_code(ns: &Netns, args: &[&str], url: &str) -> String {
    let mut all = vec![
        "curl",
        "-s",
        "--max-time",
        "15",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
    ];
    all.extend_from_slice(args);
    all.push(url);
    ns.exec_unchecked(&all)
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// Raw bytes to the SOCKS5 proxy from inside `ns`; what it answered before closing.
fn socks_exchange(ns: &Netns, request: Vec<u8>) -> Vec<u8> {
    ns.run_in(move || {
        let io = |e| tern_lab::LabError::io("socks", e);
        let mut conn = std::net::TcpStream::connect(SOCKS).map_err(io)?;
        conn.set_read_timeout(Some(Duration::from_secs(20)))
            .map_err(io)?;
        conn.write_all(&request).map_err(io)?;
        let mut answer = Vec::new();
        let _ = conn.read_to_end(&mut answer);
        Ok(answer)
    })
    .expect("SOCKS exchange")
}

#[test]
fn userspace_networking_proxies_and_inbound_forwarding_with_tsnet() {
    require_root();
    let topo = Topology::standard_unique(NatMode::Easy, NatMode::Easy).expect("lab");
    let _derp = start_derp(&topo);
    let dir = tempfile::tempdir().expect("temp dir");
    let _control = start_control(&topo, dir.path());
    let c1 = topo.ns("c1").expect("c1");
    let c2 = topo.ns("c2").expect("c2");
    let tu = start_unprivileged(c1, dir.path(), "tu");
    tu.wait_for_api(20);
    tu.up("tu");
    let tu_ip: String = wait("tu's tailnet IP", 30, || tu.logs(), || tu.tailnet_ip());
    // A local service on c1's loopback only, for the tsnet node to reach through tern.
    let (stop_http, http_thread) = serve_http(
        c1,
        "127.0.0.1:8000".parse().expect("addr"),
        b"from tu's loopback",
    );
    let mut caddy = CaddyConfig::new(
        "tsd",
        &format!("http://{CONTROL_IP}:8080"),
        lab_nodes::AUTH_KEY,
    );
    caddy.extra_sites = format!(
        "http://127.0.0.1:8081 {{\n\treverse_proxy {{\n\t\tto http://{tu_ip}:8000\n\t\ttransport tailscale tsd\n\t}}\n}}\n"
    );
    let tsd = CaddyNode::start(c2, caddy).expect("start tsd");
    let logs = || format!("{}\n== tsd\n{}", tu.logs(), tail(&tsd.logs(), 40));
    let tsd_ip: String = wait("tu sees tsd", 90, logs, || {
        tu.peer("tsd")?["tailnet_ips"][0]
            .as_str()
            .map(str::to_string)
    });
    let status = tu.status();
    assert_eq!(
        status["data_plane"]["tun"], "userspace-networking",
        "{status}"
    );
    let uid = c1
        .exec(&["ps", "-o", "uid=", "-p", &tu.process.pid().to_string()])
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    assert_eq!(uid, NOBODY, "the daemon runs unprivileged");
    assert!(
        c1.exec(&["ip", "-br", "link"])
            .map(|o| !String::from_utf8_lossy(&o.stdout).contains("tern"))
            .unwrap_or(false),
        "no TUN device"
    );

    // SOCKS5 by MagicDNS name (short and full) and by tailnet IP.
    let socks = ["--socks5-hostname", SOCKS];
    let by_name = wait("SOCKS5 to tsd by name", 60, logs, || {
        curl(c1, &socks, "http://tsd/")
    });
    assert_eq!(by_name, "hi");
    let domain = status["self"]["name"]
        .as_str()
        .and_then(|n| n.split_once('.'))
        .map(|(_, domain)| domain.trim_end_matches('.').to_string())
        .expect("tailnet domain");
    let fqdn = format!("tsd.{domain}");
    assert_eq!(
        curl(c1, &socks, &format!("http://{fqdn}/")).as_deref(),
        Some("hi")
    );
    assert_eq!(
        curl(c1, &socks, &format!("http://{tsd_ip}/")).as_deref(),
        Some("hi")
    );
    // HTTP proxy: plain request and a CONNECT tunnel.
    let proxy = ["-x", &format!("http://{HTTP_PROXY}")];
    assert_eq!(curl(c1, &proxy, "http://tsd/").as_deref(), Some("hi"));
    let tunnel = ["-p", "-x", &format!("http://{HTTP_PROXY}")];
    assert_eq!(
        curl(c1, &tunnel, &format!("http://{tsd_ip}/")).as_deref(),
        Some("hi")
    );

    // The tsnet node reaches c1's loopback service through tern's tailnet IP.
    let through = wait("tsd → tu:8000 → 127.0.0.1:8000", 60, logs, || {
        lab_nodes::curl(c2, "GET", "http://127.0.0.1:8081/")
    });
    assert_eq!(String::from_utf8_lossy(&through), "from tu's loopback");

    // ping and netcheck without a TUN.
    let ping = tu.cli(&["ping", "-c", "3", "--timeout", "2s", "tsd"]);
    let ping_text = String::from_utf8_lossy(&ping.stdout).to_string();
    assert!(
        ping_text.contains("pong from tsd"),
        "{ping_text}\n{}",
        String::from_utf8_lossy(&ping.stderr)
    );
    let netcheck = tu.cli(&["netcheck"]);
    let netcheck_text = String::from_utf8_lossy(&netcheck.stdout).to_string();
    assert!(netcheck.status.success(), "{netcheck_text}");
    assert!(netcheck_text.contains("UDP: true"), "{netcheck_text}");

    // Errors the protocols' way.
    let missing = format!("http://nope.{domain}/");
    assert_eq!(
        http_code(c1, &proxy, &missing),
        "502",
        "unknown tailnet name"
    );
    let closed_port = format!("http://{tsd_ip}:9/");
    assert_eq!(http_code(c1, &proxy, &closed_port), "502", "closed port");
    assert_eq!(http_code(c1, &proxy, "http://tsd"), "200");
    let mut bind_request = vec![5, 1, 0];
    bind_request.extend_from_slice(&[5, 2, 0, 1, 100, 64, 0, 1, 0, 80]);
    assert_eq!(
        socks_exchange(c1, bind_request),
        [5, 0, 5, 7, 0, 1, 0, 0, 0, 0, 0, 0],
        "BIND: command not supported"
    );
    let mut unknown_name = vec![5, 1, 0, 5, 1, 0, 3];
    let name = format!("nope.{domain}");
    unknown_name.push(name.len() as u8);
    unknown_name.extend_from_slice(name.as_bytes());
    unknown_name.extend_from_slice(&[0, 80]);
    assert_eq!(
        socks_exchange(c1, unknown_name)[..4],
        [5, 0, 5, 4],
        "unknown tailnet name: host unreachable"
    );

    // A flood of junk and idle clients on both proxies; then they still serve.
    let idle = c1
        .run_in(|| {
            let mut held = Vec::new();
            for i in 0..300 {
                let addr = if i % 2 == 0 { SOCKS } else { HTTP_PROXY };
                if let Ok(mut c) = std::net::TcpStream::connect(addr) {
                    let junk: &[u8] = match i % 3 {
                        0 => b"",
                        1 => b"\x05\xff\xff\xff",
                        _ => b"GARBAGE\r\n\r\n",
                    };
                    let _ = c.write_all(junk);
                    held.push(c);
                }
            }
            Ok(held)
        })
        .expect("flood");
    assert_eq!(
        curl(c1, &socks, "http://tsd/").as_deref(),
        Some("hi"),
        "serving while 300 junk/idle clients are held\n{}",
        logs()
    );
    let counted = wait("the proxies' counters in the status", 20, logs, || {
        let proxies = tu.status()["data_plane"]["proxies"].clone();
        (proxies["bad_requests"].as_u64() >= Some(100)).then_some(proxies)
    });
    assert!(counted["dial_failures"].as_u64() >= Some(3), "{counted}");
    assert!(counted["connected"].as_u64() >= Some(6), "{counted}");
    let netstack = tu.status()["data_plane"]["netstack"].clone();
    assert!(netstack["tcp_inbound"].as_u64() >= Some(1), "{netstack}");
    assert!(netstack["tcp_outbound"].as_u64() >= Some(6), "{netstack}");
    drop(idle);
    let _ = (stop_http, http_thread);
    // The daemon is still the same process.
    let mut tu = tu;
    assert!(
        matches!(tu.process.try_wait(), Ok(None)),
        "the daemon survived\n{}",
        tu.logs()
    );
}
