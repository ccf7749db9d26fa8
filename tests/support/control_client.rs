//! A small ts2021 test client for the lab control server: raw HTTP/1.1 upgrade, Noise initiator,
//! HTTP/2 client, register and map requests as JSON, and a map-stream reader.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use serde_json::{json, Value};
use tern::control::noise::{Initiator, NoiseStream, RESPONSE_LEN};
use tern::control::CAPABILITY_VERSION;
use tern::keys::{DiscoPrivate, MachinePrivate, MachinePublic, NodePrivate};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Bound on every wait in these tests.
pub const WAIT: Duration = Duration::from_secs(20);

pub async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after {WAIT:?} waiting for {what}"))
}

/// `GET /key?v=130` over a fresh TCP connection; returns status and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut tcp = within("connect", TcpStream::connect(addr))
        .await
        .expect("connect");
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    within("http response", tcp.read_to_end(&mut out))
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The server's Noise key from `/key`.
pub async fn server_key(addr: SocketAddr) -> MachinePublic {
    let (status, body) = http_get(addr, "/key?v=130").await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("/key JSON");
    assert_eq!(v["legacyPublicKey"], format!("mkey:{}", "0".repeat(64)));
    v["publicKey"].as_str().unwrap().parse().expect("publicKey")
}

/// Sends a raw `/ts2021` upgrade request; returns the TCP stream and what the server answered
/// up to the end of the header block, plus any bytes after it.
pub async fn raw_upgrade(addr: SocketAddr, headers: &str) -> (TcpStream, String, Vec<u8>) {
    let mut tcp = within("connect", TcpStream::connect(addr))
        .await
        .expect("connect");
    let req =
        format!("POST /ts2021 HTTP/1.1\r\nHost: {addr}\r\n{headers}Content-Length: 0\r\n\r\n");
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    loop {
        let mut chunk = [0u8; 1024];
        let n = within("upgrade answer", tcp.read(&mut chunk))
            .await
            .unwrap();
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            return (tcp, head, buf[end + 4..].to_vec());
        }
    }
    (tcp, String::from_utf8_lossy(&buf).into_owned(), Vec::new())
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

pub fn upgrade_headers(initiation: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(initiation);
    format!("Upgrade: tailscale-control-protocol\r\nConnection: upgrade\r\nX-Tailscale-Handshake: {b64}\r\n")
}

/// Upgrade + Noise handshake; returns the record stream.
pub async fn noise_connect(
    addr: SocketAddr,
    machine: &MachinePrivate,
    server: &MachinePublic,
) -> NoiseStream<TcpStream> {
    let (initiator, initiation) = Initiator::start(machine, server, CAPABILITY_VERSION).unwrap();
    let (mut tcp, head, mut rest) = raw_upgrade(addr, &upgrade_headers(&initiation)).await;
    assert!(head.starts_with("HTTP/1.1 101"), "upgrade refused: {head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("upgrade: tailscale-control-protocol"),
        "{head}"
    );
    while rest.len() < RESPONSE_LEN {
        let mut chunk = [0u8; 256];
        let n = within("noise response", tcp.read(&mut chunk))
            .await
            .unwrap();
        assert!(n > 0, "server closed before the Noise response");
        rest.extend_from_slice(&chunk[..n]);
    }
    let keys = initiator
        .finish(&rest[..RESPONSE_LEN])
        .expect("Noise response");
    NoiseStream::with_buffered(tcp, keys, &rest[RESPONSE_LEN..])
}

/// A test node: keys, and an HTTP/2 connection over Noise.
pub struct TestNode {
    pub machine: MachinePrivate,
    pub node: NodePrivate,
    pub disco: DiscoPrivate,
    pub hostname: String,
    pub h2: h2::client::SendRequest<Bytes>,
}

impl TestNode {
    pub async fn connect(addr: SocketAddr, hostname: &str) -> TestNode {
        Self::connect_with(
            addr,
            hostname,
            MachinePrivate::generate(),
            NodePrivate::generate(),
        )
        .await
    }

    pub async fn connect_with(
        addr: SocketAddr,
        hostname: &str,
        machine: MachinePrivate,
        node: NodePrivate,
    ) -> TestNode {
        let server = server_key(addr).await;
        let stream = noise_connect(addr, &machine, &server).await;
        let (h2, conn) = within("h2 handshake", h2::client::handshake(stream))
            .await
            .expect("h2 handshake");
        tokio::spawn(async move {
            let _ = conn.await;
        });
        TestNode {
            machine,
            node,
            disco: DiscoPrivate::generate(),
            hostname: hostname.into(),
            h2,
        }
    }

    /// POSTs a body; returns status and the response body stream.
    pub async fn post(&mut self, path: &str, body: Vec<u8>) -> (u16, h2::RecvStream) {
        let mut h2 = within("h2 ready", self.h2.clone().ready())
            .await
            .expect("h2 ready");
        let req = http::Request::builder()
            .method("POST")
            .uri(format!("https://control.lab{path}"))
            .body(())
            .unwrap();
        let (resp, mut send) = h2.send_request(req, false).expect("send request");
        send.send_data(body.into(), true).expect("send body");
        let resp = within("response headers", resp).await.expect("response");
        (resp.status().as_u16(), resp.into_body())
    }

    pub async fn post_json(&mut self, path: &str, body: &Value) -> (u16, Vec<u8>) {
        let (status, mut recv) = self.post(path, serde_json::to_vec(body).unwrap()).await;
        (status, read_all(&mut recv).await)
    }

    pub fn register_request(&self, auth_key: Option<&str>) -> Value {
        let mut req = json!({
            "Version": CAPABILITY_VERSION,
            "NodeKey": self.node.public().to_string(),
            "OldNodeKey": format!("nodekey:{}", "0".repeat(64)),
            "NLKey": format!("nlpub:{}", "0".repeat(64)),
            "Expiry": "0001-01-01T00:00:00Z",
            "Followup": "",
            "Hostinfo": {"Hostname": self.hostname, "OS": "linux", "BackendLogID": "test"},
            "NodeKeySignature": null,
        });
        if let Some(key) = auth_key {
            req["Auth"] = json!({"AuthKey": key});
        }
        req
    }

    /// Registers; returns status and the RegisterResponse JSON (or text).
    pub async fn register(&mut self, auth_key: Option<&str>) -> (u16, Value) {
        let req = self.register_request(auth_key);
        let (status, body) = self.post_json("/machine/register", &req).await;
        let value = serde_json::from_slice(&body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
        (status, value)
    }

    pub fn map_request(&self, stream: bool, endpoints: &[&str], preferred_derp: u32) -> Value {
        json!({
            "Version": CAPABILITY_VERSION,
            "Compress": "zstd",
            "KeepAlive": true,
            "NodeKey": self.node.public().to_string(),
            "DiscoKey": self.disco.public().to_string(),
            "Stream": stream,
            "OmitPeers": !stream,
            "Hostinfo": {"Hostname": self.hostname, "OS": "linux", "BackendLogID": "test",
                         "NetInfo": {"PreferredDERP": preferred_derp}},
            "Endpoints": endpoints,
            "EndpointTypes": endpoints.iter().map(|_| 1).collect::<Vec<_>>(),
        })
    }

    /// Opens the streaming map poll.
    pub async fn stream_map(&mut self, endpoints: &[&str]) -> MapStream {
        let req = self.map_request(true, endpoints, 0);
        let (status, recv) = self
            .post("/machine/map", serde_json::to_vec(&req).unwrap())
            .await;
        assert_eq!(status, 200, "map stream status");
        MapStream {
            recv,
            buf: Vec::new(),
        }
    }

    /// Sends a lite update; returns the status.
    pub async fn lite_update(&mut self, endpoints: &[&str], preferred_derp: u32) -> u16 {
        let req = self.map_request(false, endpoints, preferred_derp);
        self.post_json("/machine/map", &req).await.0
    }
}

pub async fn read_all(recv: &mut h2::RecvStream) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(chunk) = within("response body", recv.data()).await {
        let chunk = chunk.expect("body chunk");
        let _ = recv.flow_control().release_capacity(chunk.len());
        out.extend_from_slice(&chunk);
    }
    out
}

/// Reads `[u32 LE len][zstd JSON]` map messages.
pub struct MapStream {
    recv: h2::RecvStream,
    buf: Vec<u8>,
}

impl MapStream {
    /// The next message that is not a keep-alive.
    pub async fn next(&mut self) -> Value {
        loop {
            let msg = self.next_any().await;
            if msg.get("KeepAlive") != Some(&Value::Bool(true)) {
                return msg;
            }
        }
    }

    /// Waits for a message matching `pred`, skipping others.
    pub async fn wait_for(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        within(what, async {
            loop {
                let msg = self.next().await;
                if pred(&msg) {
                    return msg;
                }
            }
        })
        .await
    }

    pub async fn next_any(&mut self) -> Value {
        within("map frame", self.try_next_any())
            .await
            .expect("map stream ended")
    }

    /// The next message of any kind, or `None` when the stream ends or fails. No timeout.
    pub async fn try_next_any(&mut self) -> Option<Value> {
        loop {
            if self.buf.len() >= 4 {
                let len = u32::from_le_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]])
                    as usize;
                assert!(len > 0, "zero-length map frame");
                if self.buf.len() >= 4 + len {
                    let payload: Vec<u8> = self.buf.drain(..4 + len).skip(4).collect();
                    let json = zstd::decode_all(&payload[..]).expect("map frame is zstd");
                    return Some(serde_json::from_slice(&json).expect("map frame is JSON"));
                }
            }
            let chunk = self.recv.data().await?.ok()?;
            let _ = self.recv.flow_control().release_capacity(chunk.len());
            self.buf.extend_from_slice(&chunk);
        }
    }
}
