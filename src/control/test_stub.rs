//! A scripted control server for the client's unit tests: real `/key`, real HTTP upgrade, the
//! real Noise responder and the real h2 server, but register/map answers (and, optionally, raw
//! bytes after the Noise handshake) are whatever the test says. Serves loopback only.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

use super::noise::{encode_early_payload, NoiseStream, Responder};
use crate::keys::MachinePrivate;

/// One scripted answer: HTTP status and body.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
    /// Keep the response stream open (silent) after the body, like an idle map poll.
    pub hold_open: bool,
}

impl Answer {
    pub fn ok(body: impl Into<Vec<u8>>) -> Self {
        Self {
            status: 200,
            body: body.into(),
            hold_open: false,
        }
    }
}

/// Answers a request (path, body).
pub type Handler = Arc<dyn Fn(&str, &[u8]) -> Answer + Send + Sync>;
/// Requests received: (path, body), in order.
pub type Requests = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// What the stub does after the Noise handshake.
#[derive(Clone)]
pub enum Script {
    /// Speak HTTP/2; answer each request with the handler's result.
    Http2 {
        early_payload: bool,
        handler: Handler,
    },
    /// Write these raw bytes on the TCP stream (bad records), then hang up.
    RawAfterHandshake(Vec<u8>),
    /// Replace the 51-byte Noise response with these bytes, then hang up unless they are 51.
    NoiseResponse(fn(Vec<u8>) -> Vec<u8>),
}

/// A running stub; its URL is `http://127.0.0.1:<port>`.
pub struct Stub {
    pub url: String,
    pub server_key: MachinePrivate,
    /// Request bodies received, in order, with their paths.
    pub requests: Requests,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Stub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Stub {
    pub async fn start(script: Script) -> Stub {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let url = format!("http://{}", listener.local_addr().expect("local addr"));
        let server_key = MachinePrivate::generate();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (key, reqs) = (server_key.clone(), requests.clone());
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (key, reqs, script) = (key.clone(), reqs.clone(), script.clone());
                tokio::spawn(async move {
                    let _ = serve_conn(tcp, key, script, reqs).await;
                });
            }
        });
        Stub {
            url,
            server_key,
            requests,
            task,
        }
    }

    pub fn paths(&self) -> Vec<String> {
        self.requests
            .lock()
            .map(|r| r.iter().map(|(p, _)| p.clone()).collect())
            .unwrap_or_default()
    }
}

async fn serve_conn(
    tcp: tokio::net::TcpStream,
    key: MachinePrivate,
    script: Script,
    reqs: Requests,
) -> Option<()> {
    use base64::Engine as _;
    let mut tcp = BufReader::new(tcp);
    let mut head = String::new();
    loop {
        let before = head.len();
        if tcp.read_line(&mut head).await.ok()? == 0 {
            return None;
        }
        if head[before..].trim().is_empty() {
            break;
        }
    }
    let mut tcp = tcp.into_inner();
    if head.starts_with("GET /key") {
        let body = format!(r#"{{"publicKey":"{}"}}"#, key.public());
        let resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        tcp.write_all(resp.as_bytes()).await.ok()?;
        return Some(());
    }
    let b64 = head
        .lines()
        .find_map(|l| l.strip_prefix("X-Tailscale-Handshake: "))?;
    let init = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()?;
    let accepted = Responder::accept(&key, &init).ok()?;
    tcp.write_all(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: tailscale-control-protocol\r\nConnection: upgrade\r\n\r\n",
    )
    .await
    .ok()?;
    let (early_payload, handler) = match script {
        Script::NoiseResponse(f) => {
            let answer = f(accepted.response.to_vec());
            tcp.write_all(&answer).await.ok()?;
            if answer.len() != accepted.response.len() {
                return None;
            }
            tokio::time::sleep(std::time::Duration::from_secs(30)).await;
            return Some(());
        }
        Script::RawAfterHandshake(bytes) => {
            tcp.write_all(&accepted.response).await.ok()?;
            tcp.write_all(&bytes).await.ok()?;
            return None;
        }
        Script::Http2 {
            early_payload,
            handler,
        } => (early_payload, handler),
    };
    tcp.write_all(&accepted.response).await.ok()?;
    let mut noise = NoiseStream::new(tcp, accepted.keys);
    if early_payload {
        noise
            .write_all(&encode_early_payload(&Default::default()))
            .await
            .ok()?;
    }
    let mut h2 = h2::server::handshake(noise).await.ok()?;
    while let Some(Ok((req, mut respond))) = h2.accept().await {
        let path = req.uri().path().to_string();
        let mut body = req.into_body();
        let mut bytes = Vec::new();
        while let Some(Ok(chunk)) = body.data().await {
            let _ = body.flow_control().release_capacity(chunk.len());
            bytes.extend_from_slice(&chunk);
        }
        if let Ok(mut r) = reqs.lock() {
            r.push((path.clone(), bytes.clone()));
        }
        let answer = handler(&path, &bytes);
        let resp = http::Response::builder()
            .status(answer.status)
            .body(())
            .ok()?;
        let mut send = respond.send_response(resp, false).ok()?;
        send.send_data(Bytes::from(answer.body), !answer.hold_open)
            .ok()?;
        if answer.hold_open {
            // Keep `send` alive (the stream open) while the connection lives.
            tokio::spawn(async move {
                tokio::time::sleep(std::time::Duration::from_secs(60)).await;
                drop(send);
            });
        }
    }
    Some(())
}
