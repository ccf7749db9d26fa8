//! The peer API's DNS over HTTP (`/dns-query`), which Go clients use for all their DNS while
//! they use a tern node as their exit node:
//!
//! * against Caddy/tsnet (tailscale.com v1.90.9): in `tern lab up --exit-node`, c2 (the tern
//!   exit node) announces `peerapi4` and `peerapi-dns-proxy` in its Hostinfo (c1 sees its
//!   peerapi URL through control), and a Go node on the lab's internet host resolves a name
//!   through it over the tailnet, by GET and POST, answered by the upstream c2's host uses;
//! * behind a packet filter that lets nothing through to the tern node but port 9, the tsnet
//!   node still reaches its peer API (Go lets SYNs to the peerapi port through the filter and
//!   decides access per request), while an ordinary port stays closed;
//! * the server alone on loopback: answers GET and POST, refuses bad requests with the reason,
//!   closes connections from addresses that are no peer's, caps idle connections per peer and in
//!   all, closes silent ones, and keeps answering through a flood of them and of garbage.

#[path = "support/dns_stub.rs"]
mod dns_stub;
#[path = "support/lab_nodes.rs"]
mod lab_nodes;
#[path = "support/lab_server.rs"]
mod lab_server;
mod support;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use serde_json::Value;
use tern::dns::config::MagicDnsConfig;
use tern::peerapi::{self, Access, PeerApi};
use tokio::sync::watch;

const STUB_NAME: &str = "www.example.lab";
const STUB_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 99);

fn query(name: &str, id: u16) -> Vec<u8> {
    let mut msg = Message::new(id, MessageType::Query, OpCode::Query);
    msg.metadata.recursion_desired = true;
    msg.add_query(Query::query(
        Name::from_ascii(format!("{name}.")).expect("name"),
        RecordType::A,
    ));
    msg.to_vec().expect("encode query")
}

fn a_records(answer: &[u8]) -> Vec<Ipv4Addr> {
    let Ok(msg) = Message::from_vec(answer) else {
        return Vec::new();
    };
    msg.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect()
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A reply: status code, lower-case headers, body.
struct Reply {
    code: u16,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

/// Reads one HTTP/1.1 response to `Connection: close` (the server then closes).
fn read_reply(stream: &mut TcpStream) -> Option<Reply> {
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).ok()?;
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut lines = head.lines();
    let code = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Some(Reply {
        code,
        headers,
        body: raw[split + 4..].to_vec(),
    })
}

/// A TCP connection to `server` from the loopback address `from`.
fn connect_from(from: Ipv4Addr, server: SocketAddr) -> TcpStream {
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket
        .bind(&SocketAddr::new(from.into(), 0).into())
        .expect("bind a loopback source");
    socket.connect(&server.into()).expect("connect");
    let stream: TcpStream = socket.into();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("read timeout");
    stream
}

fn request(from: Ipv4Addr, server: SocketAddr, head: &str, body: &[u8]) -> Option<Reply> {
    let mut stream = connect_from(from, server);
    let mut bytes = format!("{head}\r\nHost: peerapi\r\nConnection: close\r\n").into_bytes();
    if !body.is_empty() {
        bytes.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
    }
    bytes.extend_from_slice(b"\r\n");
    bytes.extend_from_slice(body);
    stream.write_all(&bytes).ok()?;
    read_reply(&mut stream)
}

fn get(from: Ipv4Addr, server: SocketAddr, path: &str) -> Option<Reply> {
    request(from, server, &format!("GET {path} HTTP/1.1"), b"")
}

fn post(from: Ipv4Addr, server: SocketAddr, content_type: &str, body: &[u8]) -> Option<Reply> {
    let head = format!("POST /dns-query HTTP/1.1\r\nContent-Type: {content_type}");
    request(from, server, &head, body)
}

/// Whether the server closed `stream` (EOF or reset) within `within`.
fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    stream.set_read_timeout(Some(within)).expect("read timeout");
    let mut buf = [0u8; 64];
    match stream.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

const SAME_USER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
const FLOODER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const STRANGER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);
const OTHER_USER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 4);

/// A peer API on loopback: 127.0.0.1 and .2 are peers of our user, .4 another user's (no exit
/// node offered: denied), .3 no peer; MagicDNS forwards everything to a stub on loopback.
struct LoopbackApi {
    addr: SocketAddr,
    api: Arc<PeerApi>,
    _stub: UdpStub,
    _dir: tempfile::TempDir,
    _access: watch::Sender<Arc<Access>>,
    _dns: watch::Sender<Arc<MagicDnsConfig>>,
}

async fn loopback_api() -> LoopbackApi {
    let stub = UdpStub::start();
    let mut magic = MagicDnsConfig::default();
    magic.routes.insert(".".into(), vec![stub.addr]);
    let dir = tempfile::tempdir().expect("tempdir");
    let resolv_conf = dir.path().join("resolv.conf");
    std::fs::write(&resolv_conf, "nameserver 100.100.100.100\n").expect("resolv.conf");
    let access = Access {
        self_user: Some(1),
        peers: [(SAME_USER, 1), (FLOODER, 1), (OTHER_USER, 2)]
            .into_iter()
            .map(|(ip, user)| (IpAddr::V4(ip), user))
            .collect(),
        ..Default::default()
    };
    let (access_tx, access_rx) = watch::channel(Arc::new(access));
    let (dns_tx, dns_rx) = watch::channel(Arc::new(magic));
    let api = PeerApi::new(access_rx, dns_rx, resolv_conf);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(peerapi::serve(listener, api.clone()));
    LoopbackApi {
        addr,
        api,
        _stub: stub,
        _dir: dir,
        _access: access_tx,
        _dns: dns_tx,
    }
}

/// An upstream DNS server on loopback (UDP) that knows [`STUB_NAME`].
struct UdpStub {
    addr: SocketAddr,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl UdpStub {
    fn start() -> UdpStub {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("stub socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let addr = socket.local_addr().expect("stub addr");
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let table: HashMap<String, Ipv4Addr> = [(STUB_NAME.to_string(), STUB_IP)].into();
        std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok((n, from)) = socket.recv_from(&mut buf) {
                    if let Some(reply) = dns_stub::answer(&buf[..n], &table) {
                        let _ = socket.send_to(&reply, from);
                    }
                }
            }
        });
        UdpStub { addr, stop }
    }
}

impl Drop for UdpStub {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

fn counter(api: &PeerApi, name: &str) -> u64 {
    api.counters
        .named()
        .into_iter()
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v)
        .unwrap_or_else(|| panic!("no counter {name}"))
}

/// A request made on a client thread.
type Call = Box<dyn FnOnce() -> Option<Reply> + Send>;

/// Runs blocking client code off the runtime that serves.
async fn client<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("client thread")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_peerapi_answers_doh_and_refuses_bad_requests_with_the_reason() {
    let lab = loopback_api().await;
    let addr = lab.addr;
    let q = query(STUB_NAME, 0x1234);
    let path = format!("/dns-query?dns={}", b64(&q));
    let got = client(move || get(SAME_USER, addr, &path))
        .await
        .expect("GET");
    assert_eq!(got.code, 200, "{}", String::from_utf8_lossy(&got.body));
    assert_eq!(got.headers["content-type"], "application/dns-message");
    assert_eq!(a_records(&got.body), [STUB_IP]);
    assert_eq!(Message::from_vec(&got.body).unwrap().metadata.id, 0x1234);

    let q2 = query(STUB_NAME, 0x4321);
    let got = client(move || post(SAME_USER, addr, "application/dns-message", &q2))
        .await
        .expect("POST");
    assert_eq!(got.code, 200);
    assert_eq!(a_records(&got.body), [STUB_IP]);

    // Unknown name: the upstream's NXDOMAIN comes back as it is.
    let q3 = query("nowhere.example.lab", 7);
    let got = client(move || post(SAME_USER, addr, "application/dns-message", &q3))
        .await
        .expect("POST");
    assert_eq!(got.code, 200);
    let msg = Message::from_vec(&got.body).expect("answer");
    assert_eq!(msg.metadata.response_code, ResponseCode::NXDomain);

    let cases: Vec<(&str, Call, u16, &str)> = vec![
        (
            "no dns parameter",
            Box::new(move || get(SAME_USER, addr, "/dns-query")),
            400,
            "missing 'dns'",
        ),
        (
            "bad base64",
            Box::new(move || get(SAME_USER, addr, "/dns-query?dns=%%%")),
            400,
            "base64",
        ),
        (
            "not DNS",
            Box::new(move || get(SAME_USER, addr, "/dns-query?dns=AAAA")),
            400,
            "not a DNS query",
        ),
        (
            "wrong content type",
            Box::new(move || post(SAME_USER, addr, "application/json", b"{}")),
            400,
            "Content-Type",
        ),
        (
            "too large",
            Box::new(move || {
                post(
                    SAME_USER,
                    addr,
                    "application/dns-message",
                    &vec![0u8; 70_000],
                )
            }),
            400,
            "too large",
        ),
        (
            "other method",
            Box::new(move || request(SAME_USER, addr, "PUT /dns-query HTTP/1.1", b"")),
            400,
            "method",
        ),
        (
            "other path",
            Box::new(move || get(SAME_USER, addr, "/v0/sockstats")),
            404,
            "/dns-query",
        ),
        (
            "another user's node, no exit node offered",
            Box::new(move || get(OTHER_USER, addr, "/dns-query?dns=AAAA")),
            403,
            "denied",
        ),
    ];
    for (what, call, code, says) in cases {
        let got = client(call)
            .await
            .unwrap_or_else(|| panic!("{what}: no reply"));
        let body = String::from_utf8_lossy(&got.body).to_string();
        assert_eq!(got.code, code, "{what}: {body}");
        assert!(body.contains(says), "{what}: {body:?} should say {says:?}");
    }
    assert_eq!(counter(&lab.api, "dns_queries"), 3);
    assert_eq!(counter(&lab.api, "dns_denied"), 1);
    assert!(counter(&lab.api, "dns_bad_requests") >= 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_peerapi_survives_floods_of_idle_connections_strangers_and_garbage() {
    let lab = loopback_api().await;
    let addr = lab.addr;

    // A stranger's connection is closed at once, before any byte.
    let stranger_closed = client(move || {
        let mut s = connect_from(STRANGER, addr);
        closed_within(&mut s, Duration::from_secs(5))
    })
    .await;
    assert!(
        stranger_closed,
        "a connection from no peer's address must be closed"
    );

    // One peer opens 40 connections and says nothing: it keeps MAX_CONNS_PER_PEER of them.
    let idle = client(move || {
        (0..40)
            .map(|_| connect_from(FLOODER, addr))
            .collect::<Vec<_>>()
    })
    .await;
    let counted = |name: &'static str| counter(&lab.api, name);
    let deadline = Instant::now() + Duration::from_secs(5);
    while counted("refused_over_limit") < (40 - peerapi::MAX_CONNS_PER_PEER) as u64
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(counted("connections"), peerapi::MAX_CONNS_PER_PEER as u64);
    assert_eq!(
        counted("refused_over_limit"),
        (40 - peerapi::MAX_CONNS_PER_PEER) as u64
    );

    // Garbage from the same peer while its slots are full is refused; from another peer it gets
    // a 400 or a close, and the server goes on.
    let garbage = client(move || {
        let mut answered = 0;
        for i in 0..30u8 {
            let mut s = connect_from(SAME_USER, addr);
            let junk: Vec<u8> = (0..200u8)
                .map(|b| b.wrapping_mul(31).wrapping_add(i))
                .collect();
            let _ = s.write_all(&junk);
            let _ = s.write_all(b"\r\n\r\n");
            if read_reply(&mut s).is_some_and(|r| r.code == 400) {
                answered += 1;
            }
        }
        answered
    })
    .await;
    assert!(garbage > 0, "garbage should get 400s");

    // A real query from the other peer is answered throughout.
    let q = query(STUB_NAME, 99);
    let path = format!("/dns-query?dns={}", b64(&q));
    let got = client(move || get(SAME_USER, addr, &path))
        .await
        .expect("GET");
    assert_eq!(a_records(&got.body), [STUB_IP]);

    // Silent connections are closed once the header timeout passes.
    let silent_closed = client(move || {
        let mut idle = idle;
        let wait = peerapi::HEADER_TIMEOUT + Duration::from_secs(5);
        idle.iter_mut()
            .take(peerapi::MAX_CONNS_PER_PEER)
            .all(|s| closed_within(s, wait))
    })
    .await;
    assert!(
        silent_closed,
        "idle connections must be closed by the server"
    );
    // And the flooding peer may connect again.
    let q = query(STUB_NAME, 100);
    let path = format!("/dns-query?dns={}", b64(&q));
    let got = client(move || get(FLOODER, addr, &path))
        .await
        .expect("GET");
    assert_eq!(a_records(&got.body), [STUB_IP]);
}

/// `tern status --json` of the lab's node `node`.
fn lab_status(lab: &support::lab_cli::LabCli, node: &str) -> Value {
    let socket = lab.socket(node).display().to_string();
    let out = lab.tern(&["--socket", &socket, "status", "--json"]);
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

/// A stub DNS server knowing `name` at 127.0.0.1:53 in `ns`: the host resolver of a lab
/// namespace (its resolv.conf names 127.0.0.1).
fn host_resolver(ns: &tern_lab::Netns, name: &str, ip: Ipv4Addr) -> dns_stub::DnsStub {
    dns_stub::DnsStub::start(ns, "127.0.0.1:53".parse().unwrap(), &[(name, ip)])
}

/// `tern lab up --exit-node`: c2 is the tern exit node, a Go node on the internet host asks it.
#[test]
fn a_tsnet_node_resolves_names_through_a_tern_exit_nodes_peerapi() {
    use support::lab_cli::LabCli;
    use tern_lab::topology::{CONTROL_IP, INTERNET_HOST};
    use tern_lab::{CaddyConfig, CaddyNode};

    let lab = LabCli::up(&["--exit-node"]);
    let c2 = lab.ns("c2");
    // c2's host resolver (127.0.0.1 in the lab's resolv.conf) is this stub.
    let _stub = host_resolver(&c2, STUB_NAME, STUB_IP);
    let status = |node: &str| lab_status(&lab, node);
    let logs = || format!("c1: {:#}\nc2: {:#}", status("c1"), status("c2"));
    // c2 announces its peer API; control hands it to c1 (and to every other peer).
    let url = support::wait("c2's peerapi URL", 30, logs, || {
        status("c2")["self"]["peerapi_urls"][0]
            .as_str()
            .map(str::to_string)
    });
    support::wait("c1 to see c2's peerapi URL", 30, logs, || {
        let c1 = status("c1");
        let c2_seen = c1["peers"]
            .as_array()?
            .iter()
            .find(|p| p["hostname"] == "c2")?
            .clone();
        (c2_seen["peerapi_urls"][0] == url.as_str()).then_some(())
    });
    let target = url.trim_start_matches("http://").to_string();

    let mut config = CaddyConfig::new(
        "tsdns",
        &format!("http://{CONTROL_IP}:8080"),
        &lab.auth_key(),
    );
    config.extra_sites = format!(
        "http://127.0.0.1:8081 {{\n\treverse_proxy {{\n\t\tto http://{target}\n\t\ttransport tailscale tsdns\n\t}}\n}}\n"
    );
    let inet = lab.ns(INTERNET_HOST);
    let caddy = CaddyNode::start(&inet, config).expect("start tsdns");
    let logs = || format!("{}\n== tsdns\n{}", logs(), support::tail(&caddy.logs(), 60));

    let q = query(STUB_NAME, 0x77);
    let get_url = format!("http://127.0.0.1:8081/dns-query?dns={}", b64(&q));
    let answer = support::wait("tsdns to resolve through c2 (GET)", 90, logs, || {
        let out = inet
            .exec_unchecked(&["curl", "-sS", "--max-time", "10", "-f", &get_url])
            .ok()?;
        out.status.success().then_some(out.stdout)
    });
    assert_eq!(a_records(&answer), [STUB_IP], "{}", logs());

    let file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(file.path(), query(STUB_NAME, 0x78)).expect("query file");
    let out = inet
        .exec_unchecked(&[
            "curl",
            "-sS",
            "--max-time",
            "10",
            "-f",
            "-H",
            "Content-Type: application/dns-message",
            "--data-binary",
            &format!("@{}", file.path().display()),
            "http://127.0.0.1:8081/dns-query",
        ])
        .expect("curl POST");
    assert!(
        out.status.success(),
        "{}\n{}",
        support::output_text(&out),
        logs()
    );
    assert_eq!(a_records(&out.stdout), [STUB_IP]);

    // c2's status catches up within a status tick or two.
    let counters = support::wait("c2 to count both queries", 10, logs, || {
        let counters = status("c2")["data_plane"]["peerapi"].clone();
        (counters["dns_queries"].as_u64() >= Some(2)).then_some(counters)
    });
    assert_eq!(counters["dns_failures"], 0, "{counters:#}");
    assert_eq!(counters["dns_denied"], 0, "{counters:#}");
}

/// One UDP query to quad-100 from inside `ns`; the A records of the answer.
fn ask_quad_100(ns: &tern_lab::Netns, name: &str) -> Option<Vec<Ipv4Addr>> {
    let socket = ns.bind_udp("0.0.0.0:0".parse().ok()?).ok()?;
    socket.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    socket
        .send_to(&query(name, 0x55), "100.100.100.100:53")
        .ok()?;
    let mut buf = [0u8; 4096];
    let n = socket.recv(&mut buf).ok()?;
    let records = a_records(&buf[..n]);
    (!records.is_empty()).then_some(records)
}

/// The other way: tern as the client. c1 uses c2 as its exit node, so quad-100 on c1 sends
/// names the tailnet does not know to c2's peer API (c1's own resolver answers nothing), and
/// tern's DoH client gets answers from a Go node's peer API too (tsnet answers DNS for peers
/// of its own user, from its host's resolver).
#[test]
fn tern_asks_its_exit_nodes_peerapi_and_a_tsnet_nodes_for_dns() {
    use support::lab_cli::LabCli;
    use tern_lab::topology::{CONTROL_IP, INTERNET_HOST};
    use tern_lab::{CaddyConfig, CaddyNode};

    const GO_NAME: &str = "go.example.lab";
    const GO_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 98);
    let lab = LabCli::up(&["--exit-node"]);
    let (c1, c2, inet) = (lab.ns("c1"), lab.ns("c2"), lab.ns(INTERNET_HOST));
    let _c2_stub = host_resolver(&c2, STUB_NAME, STUB_IP);
    let inet_stub = host_resolver(&inet, GO_NAME, GO_IP);
    let status = |node: &str| lab_status(&lab, node);
    let logs = || format!("c1: {:#}\nc2: {:#}", status("c1"), status("c2"));

    let answer = support::wait("c1's quad-100 to answer through c2", 30, logs, || {
        ask_quad_100(&c1, STUB_NAME)
    });
    assert_eq!(answer, [STUB_IP]);
    let counters = support::wait("c2 to count c1's query", 10, logs, || {
        let counters = status("c2")["data_plane"]["peerapi"].clone();
        (counters["dns_queries"].as_u64() >= Some(1)).then_some(counters)
    });
    assert_eq!(counters["dns_denied"], 0, "{counters:#}");
    // Both status views say where c1's DNS goes.
    let c2_url = status("c2")["self"]["peerapi_urls"][0]
        .as_str()
        .map(str::to_string)
        .expect("c2's peerapi URL");
    let doh = format!("{c2_url}/dns-query");
    assert_eq!(
        status("c1")["dns"]["exit_node_doh"],
        doh.as_str(),
        "{}",
        logs()
    );
    let human = lab.tern(&[
        "--socket",
        &lab.socket("c1").display().to_string(),
        "status",
    ]);
    let human = String::from_utf8_lossy(&human.stdout);
    assert!(
        human.contains(&format!("resolved by the exit node ({doh})")),
        "{human}"
    );

    // A Go node announces its peer API in Hostinfo.Services; c1 reads it and asks it.
    let config = CaddyConfig::new(
        "tsgo",
        &format!("http://{CONTROL_IP}:8080"),
        &lab.auth_key(),
    );
    let caddy = CaddyNode::start(&inet, config).expect("start tsgo");
    let logs = || format!("{}\n== tsgo\n{}", logs(), support::tail(&caddy.logs(), 60));
    let url = support::wait("c1 to see tsgo's peerapi URL", 90, logs, || {
        status("c1")["peers"]
            .as_array()?
            .iter()
            .find(|p| p["hostname"] == "tsgo")?["peerapi_urls"][0]
            .as_str()
            .map(str::to_string)
    });
    let server: SocketAddr = url
        .trim_start_matches("http://")
        .parse()
        .expect("peerapi address");
    let ask_go = || -> Option<Vec<u8>> {
        c1.run_in(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| tern_lab::LabError::io("runtime", e))?;
            Ok(runtime
                .block_on(tern::dns::doh::exchange(server, &query(GO_NAME, 0x66)))
                .ok())
        })
        .ok()
        .flatten()
    };
    let answer = support::wait("tsgo's peer API to answer c1", 60, logs, ask_go);
    assert_eq!(a_records(&answer), [GO_IP]);
    assert!(
        inet_stub.queries.load(std::sync::atomic::Ordering::Relaxed) >= 1,
        "tsgo asked its own resolver"
    );
}

/// Control's filter allows only port 9: the tern node's other ports are closed to the tsnet
/// node, its peer API is not.
#[test]
fn the_peerapi_is_reachable_through_a_filter_that_allows_nothing_else() {
    use lab_nodes::{control_config, serve_http, start_control_with, start_derp, Node};
    use tern_lab::topology::CONTROL_IP;
    use tern_lab::{CaddyConfig, CaddyNode, NatMode, Topology};

    support::require_root();
    let topo = Topology::standard_unique(NatMode::Easy, NatMode::Easy).expect("lab");
    let _derp = start_derp(&topo);
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = control_config(dir.path());
    config.filters = vec![tern_lab::control::config::FilterConfig {
        src: vec!["*".into()],
        dst: vec!["*:9".into()],
        proto: Vec::new(),
    }];
    let _control = start_control_with(&topo, config);
    let c1 = topo.ns("c1").expect("c1");
    let ta = Node::start(c1, dir.path(), "ta");
    ta.wait_for_api(20);
    ta.up("ta");
    let _stub = host_resolver(c1, STUB_NAME, STUB_IP);
    let logs = || ta.logs();
    let url = support::wait("ta's peerapi URL", 30, logs, || {
        ta.status()["self"]["peerapi_urls"][0]
            .as_str()
            .map(str::to_string)
    });
    let ta_ip = ta.tailnet_ip().expect("ta's tailnet IP");
    let ordinary: SocketAddr = format!("{ta_ip}:8000").parse().expect("address");
    let (stop, server) = serve_http(c1, ordinary, b"should stay closed");

    let proxy = |port: u16, to: &str| {
        format!(
            "http://127.0.0.1:{port} {{\n\treverse_proxy {{\n\t\tto {to}\n\t\ttransport tailscale tsf\n\t}}\n}}\n"
        )
    };
    let mut caddy_config = CaddyConfig::new(
        "tsf",
        &format!("http://{CONTROL_IP}:8080"),
        lab_nodes::AUTH_KEY,
    );
    caddy_config.extra_sites = format!(
        "{}{}",
        proxy(8081, url.trim_start_matches("http://")),
        proxy(8082, &ordinary.to_string())
    );
    let c2 = topo.ns("c2").expect("c2");
    let caddy = CaddyNode::start(c2, caddy_config).expect("start tsf");
    let logs = || {
        format!(
            "{}\n== tsf\n{}",
            ta.logs(),
            support::tail(&caddy.logs(), 60)
        )
    };
    let get_url = format!(
        "http://127.0.0.1:8081/dns-query?dns={}",
        b64(&query(STUB_NAME, 0x99))
    );
    let answer = support::wait("tsf to resolve through ta's peer API", 90, logs, || {
        let out = c2
            .exec_unchecked(&["curl", "-sS", "--max-time", "10", "-f", &get_url])
            .ok()?;
        out.status.success().then_some(out.stdout)
    });
    assert_eq!(a_records(&answer), [STUB_IP]);
    // The filter is in force: port 8000 stays closed to the same node.
    let blocked = c2
        .exec_unchecked(&[
            "curl",
            "-sS",
            "--max-time",
            "10",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "http://127.0.0.1:8082/",
        ])
        .expect("curl");
    let code = String::from_utf8_lossy(&blocked.stdout).to_string();
    assert_ne!(code, "200", "port 8000 passed the filter: {}", logs());
    let filtered = support::wait("ta to count filtered packets", 10, logs, || {
        let dropped = ta.status()["data_plane"]["drops"]["filtered"].as_u64()?;
        (dropped > 0).then_some(dropped)
    });
    assert!(filtered > 0);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = server.join();
}

/// A loopback HTTP server that answers every connection with `reply` (after reading the
/// request head and body); the address.
fn canned_server(reply: Vec<u8>) -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf);
            let _ = conn.write_all(&reply);
        }
    });
    addr
}

fn http_reply(status: &str, content_type: &str, body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

#[tokio::test]
async fn the_doh_client_takes_only_a_dns_message_answered_with_200() {
    use tern::dns::doh::{exchange, DohError};
    let answer = dns_stub::answer(
        &query(STUB_NAME, 5),
        &[(STUB_NAME.to_string(), STUB_IP)].into(),
    )
    .expect("stub answer");
    let good = canned_server(http_reply("200 OK", "application/dns-message", &answer));
    let got = exchange(good, &query(STUB_NAME, 5)).await.expect("answer");
    assert_eq!(a_records(&got), [STUB_IP]);

    let failing = canned_server(http_reply(
        "500 Internal Server Error",
        "text/plain",
        b"DNS forwarding error",
    ));
    let err = exchange(failing, &query(STUB_NAME, 5)).await.unwrap_err();
    assert!(
        matches!(err, DohError::Status(_, s) if s.as_u16() == 500),
        "{err}"
    );

    let html = canned_server(http_reply("200 OK", "text/html", b"<html>"));
    let err = exchange(html, &query(STUB_NAME, 5)).await.unwrap_err();
    assert!(matches!(err, DohError::ContentType(..)), "{err}");

    let huge = canned_server(http_reply(
        "200 OK",
        "application/dns-message",
        &vec![0u8; peerapi::MAX_QUERY + 1],
    ));
    let err = exchange(huge, &query(STUB_NAME, 5)).await.unwrap_err();
    assert!(matches!(err, DohError::TooLong(..)), "{err}");

    // Nothing listening: a connect error naming the address.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let err = exchange(closed, &query(STUB_NAME, 5)).await.unwrap_err();
    assert!(
        matches!(err, DohError::Connect(a, _) if a == closed),
        "{err}"
    );
}

/// Queries one after another share one connection (as Go's DoH client keeps it), so a lookup
/// through an exit node costs no new TCP handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_doh_client_keeps_its_connection_for_the_next_query() {
    let lab = loopback_api().await;
    for id in 0..3u16 {
        let answer = tern::dns::doh::exchange(lab.addr, &query(STUB_NAME, id))
            .await
            .expect("answer");
        assert_eq!(a_records(&answer), [STUB_IP]);
    }
    assert_eq!(counter(&lab.api, "dns_queries"), 3);
    assert_eq!(
        counter(&lab.api, "connections"),
        1,
        "one connection for all"
    );
}
