//! Dialing control over ts2021: `GET /key`, the HTTP/1.1 `POST /ts2021` upgrade
//! carrying the Noise initiation, the Noise response, the optional early payload, and an HTTP/2
//! client (prior knowledge) over the Noise record stream.
//!
//! `/ts2021` is raced like Go's `controlhttp` dialer: plain HTTP first, TLS on the HTTPS port
//! 500 ms later (or as soon as plain HTTP fails), the first finished Noise handshake wins; after a
//! dial less than 2 minutes ago (or with `TS_FORCE_NOISE_443`) only TLS is tried. `GET /key` goes
//! to the URL's own scheme and port, with the certificate verified ([`super::tls`]).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use super::error::ControlError;
use super::noise::{handshake_answer_len, Initiator, NoiseStream, HEADER_LEN};
use super::tls;
pub use super::url::{ControlUrl, Scheme};
use super::CAPABILITY_VERSION;
use crate::keys::{MachinePrivate, MachinePublic, NodePublic};

/// Time allowed for TCP connect + upgrade + Noise handshake (10 s).
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest `/key` response body read (64 KiB).
const MAX_KEY_BODY: usize = 64 * 1024;
/// Largest HTTP/1.1 response head accepted during the upgrade.
const MAX_RESPONSE_HEAD: usize = 16 * 1024;

/// A byte stream control is reached over: plain TCP or TLS.
pub trait ControlIo: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> ControlIo for T {}

/// Connect TCP to `host:port`.
pub async fn connect_tcp(url: &ControlUrl, port: u16) -> Result<TcpStream, ControlError> {
    let target = format!("{}:{port}", url.host_for_dial());
    let stream = crate::bypass::tcp_connect_host(&target)
        .await
        .map_err(|e| ControlError::transient(&format!("dial {target}"), e))?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// TLS over `tcp` with `config`; the server name is the URL's host (an IP literal sends no SNI).
async fn connect_tls(
    url: &ControlUrl,
    tcp: TcpStream,
    config: Arc<rustls::ClientConfig>,
    ctx: &str,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, ControlError> {
    let name = rustls::pki_types::ServerName::try_from(url.host.clone())
        .map_err(|e| ControlError::transient(&format!("{ctx}: TLS server name"), e))?;
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| tls_error(ctx, &e))
}

/// A TLS failure with a hint when it is a certificate problem.
fn tls_error(ctx: &str, err: &std::io::Error) -> ControlError {
    let text = super::error::error_chain(err);
    match tls::certificate_hint(&text) {
        Some(hint) => ControlError::Transient(format!("{ctx}: TLS: {text} ({hint})")),
        None => ControlError::Transient(format!("{ctx}: TLS: {text}")),
    }
}

/// `GET /key?v=N` over the URL's scheme (HTTPS verified against the system's roots); returns the
/// response body (JSON) on 200. Bounded by [`DIAL_TIMEOUT`].
pub async fn fetch_key_body(url: &ControlUrl, version: u16) -> Result<Bytes, ControlError> {
    let ctx = format!("GET {}/key", url.origin());
    tokio::time::timeout(DIAL_TIMEOUT, fetch_key_body_inner(url, version, &ctx))
        .await
        .map_err(|_| ControlError::Transient(format!("{ctx}: no answer within {DIAL_TIMEOUT:?}")))?
}

async fn fetch_key_body_inner(
    url: &ControlUrl,
    version: u16,
    ctx: &str,
) -> Result<Bytes, ControlError> {
    let tcp = connect_tcp(url, url.port).await?;
    match url.scheme {
        Scheme::Http => get_key(tcp, url, version, ctx).await,
        Scheme::Https => {
            let config = tls::verifying_config(tls::root_store())
                .map_err(|e| ControlError::transient(ctx, e))?;
            let stream = connect_tls(url, tcp, config, ctx).await?;
            get_key(stream, url, version, ctx).await
        }
    }
}

async fn get_key<S: ControlIo>(
    stream: S,
    url: &ControlUrl,
    version: u16,
    ctx: &str,
) -> Result<Bytes, ControlError> {
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| ControlError::transient(ctx, e))?;
    let driver = tokio::spawn(conn);
    let req = http::Request::get(format!("/key?v={version}"))
        .header(http::header::HOST, &url.authority)
        .body(Empty::<Bytes>::new())
        .map_err(|e| ControlError::transient(ctx, e))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| ControlError::transient(ctx, e))?;
    let status = resp.status();
    let body = Limited::new(resp.into_body(), MAX_KEY_BODY)
        .collect()
        .await
        .map_err(|e| ControlError::transient(ctx, e))?
        .to_bytes();
    driver.abort();
    if status != http::StatusCode::OK {
        return Err(ControlError::Transient(format!("{ctx}: HTTP {status}")));
    }
    Ok(body)
}

/// Send the `POST /ts2021` upgrade carrying `initiation`, check the `101` answer, and return
/// the stream positioned at the first byte after the response head (the Noise response).
pub async fn upgrade<S: ControlIo>(
    stream: S,
    url: &ControlUrl,
    initiation: &[u8],
    ctx: &str,
) -> Result<BufReader<S>, ControlError> {
    use base64::Engine as _;
    let handshake = base64::engine::general_purpose::STANDARD.encode(initiation);
    let request = format!(
        "POST /ts2021 HTTP/1.1\r\nHost: {}\r\nUser-Agent: tern/{}\r\nUpgrade: tailscale-control-protocol\r\n\
         Connection: upgrade\r\nX-Tailscale-Handshake: {handshake}\r\nContent-Length: 0\r\n\r\n",
        url.authority,
        env!("CARGO_PKG_VERSION"),
    );
    let mut stream = BufReader::new(stream);
    stream
        .get_mut()
        .write_all(request.as_bytes())
        .await
        .map_err(|e| ControlError::transient(ctx, e))?;
    let head = read_response_head(&mut stream)
        .await
        .map_err(|e| ControlError::transient(ctx, e))?;
    check_upgrade_response(&head).map_err(|e| ControlError::Transient(format!("{ctx}: {e}")))?;
    Ok(stream)
}

/// Read lines up to the empty line that ends an HTTP/1.1 response head (bounded).
async fn read_response_head<S: ControlIo>(stream: &mut BufReader<S>) -> std::io::Result<String> {
    let mut head = String::new();
    loop {
        let before = head.len();
        let n = (&mut *stream)
            .take((MAX_RESPONSE_HEAD - before) as u64)
            .read_line(&mut head)
            .await?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed during the upgrade response",
            ));
        }
        if head.len() >= MAX_RESPONSE_HEAD {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "response head too large",
            ));
        }
        if head[before..].trim_end_matches(['\r', '\n']).is_empty() {
            return Ok(head);
        }
    }
}

/// The server must switch to exactly `tailscale-control-protocol`.
pub fn check_upgrade_response(head: &str) -> Result<(), String> {
    let mut lines = head.lines();
    let status_line = lines.next().unwrap_or_default();
    let code = status_line.split_whitespace().nth(1).unwrap_or_default();
    if code != "101" {
        return Err(format!(
            "server answered {status_line:?}, want 101 Switching Protocols"
        ));
    }
    let header = |name: &str| {
        head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    };
    match header("upgrade") {
        Some(v) if v == "tailscale-control-protocol" => Ok(()),
        other => Err(format!("server switched to unexpected protocol {other:?}")),
    }
}

/// The control server's Noise public key from a `/key` body: JSON with a non-zero
/// `publicKey`. A bare-hex legacy body means a server too old for ts2021.
pub fn parse_key_response(body: &[u8]) -> Result<MachinePublic, String> {
    let json: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| format!("/key body is not JSON (server too old for ts2021?): {e}"))?;
    let text = json
        .get("publicKey")
        .and_then(|v| v.as_str())
        .ok_or("/key response has no publicKey")?;
    let key: MachinePublic = text
        .parse()
        .map_err(|e| format!("/key publicKey {text:?}: {e}"))?;
    if key.is_zero() {
        return Err("control server is too old; no noise key".into());
    }
    Ok(key)
}

/// An HTTP/2 connection to control over Noise.
pub struct ControlConn {
    pub requests: Requester,
    /// Drives the HTTP/2 connection; ends (with the reason) when the connection dies.
    pub driver: JoinHandle<Result<(), hyper::Error>>,
}

/// Sends requests on a [`ControlConn`]; cheap to clone, so concurrent requests (a lite update
/// next to the map poll) share the one connection.
#[derive(Clone)]
pub struct Requester {
    sender: http2::SendRequest<Full<Bytes>>,
    authority: String,
}

impl Drop for ControlConn {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// How long plain HTTP has before TLS is tried too (Go `controlhttp`).
const TLS_HEAD_START: Duration = Duration::from_millis(500);
/// A Noise dial within this long of the previous one goes straight to TLS (Go's
/// `LastNoiseDialWasRecent`): a network that broke plain HTTP is not tried again first.
const RECENT_DIAL: Duration = Duration::from_secs(120);

/// When this process last dialed `/ts2021`.
static LAST_NOISE_DIAL: Mutex<Option<Instant>> = Mutex::new(None);

/// Notes a dial now; returns whether the previous one was recent.
fn note_noise_dial(now: Instant) -> bool {
    let Ok(mut last) = LAST_NOISE_DIAL.lock() else {
        return false;
    };
    let recent = last.is_some_and(|t| now.saturating_duration_since(t) < RECENT_DIAL);
    *last = Some(now);
    recent
}

/// Which transports to try: plain HTTP unless TLS is forced (a recent dial, or
/// `TS_FORCE_NOISE_443`) and there is a TLS port; TLS wherever the URL has a TLS port.
pub fn dial_ports(url: &ControlUrl, force_tls: bool) -> (Option<u16>, Option<u16>) {
    let plain = url
        .http_port
        .filter(|_| !(force_tls && url.https_port.is_some()));
    (plain, url.https_port)
}

fn force_noise_443() -> bool {
    std::env::var("TS_FORCE_NOISE_443").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

/// Dial control: `/ts2021` upgrade with the Noise initiation over plain HTTP and/or TLS (raced
/// as Go does), Noise response, optional early payload, then HTTP/2 with prior knowledge.
/// Bounded by [`DIAL_TIMEOUT`].
pub async fn connect(
    url: &ControlUrl,
    machine: &MachinePrivate,
    server: &MachinePublic,
) -> Result<ControlConn, ControlError> {
    let force_tls = note_noise_dial(Instant::now()) || force_noise_443();
    let (plain, tls_port) = dial_ports(url, force_tls);
    let plan = super::dial_plan::current(&url.authority);
    let dial = async {
        if let Some(plan) = plan {
            match connect_by_plan(url, &plan, machine, server, plain, tls_port).await {
                Ok(conn) => return Ok(conn),
                Err(e) => {
                    tracing::info!(error = %e, "control's dial plan failed; dialing its host name")
                }
            }
        }
        race(url, machine, server, plain, tls_port).await
    };
    tokio::time::timeout(DIAL_TIMEOUT, dial)
        .await
        .map_err(|_| {
            ControlError::Transient(format!(
                "ts2021 dial to {} timed out after {DIAL_TIMEOUT:?}",
                url.authority
            ))
        })?
}

/// Dials the plan's candidates, highest priority first (see [`super::dial_plan`]): within a
/// priority every candidate starts after its delay and has its own timeout, the first handshake
/// wins; a priority whose candidates all fail hands over to the next.
pub async fn connect_by_plan(
    url: &ControlUrl,
    plan: &super::tailcfg::ControlDialPlan,
    machine: &MachinePrivate,
    server: &MachinePublic,
    plain: Option<u16>,
    tls_port: Option<u16>,
) -> Result<ControlConn, ControlError> {
    let mut last_error = ControlError::Transient("the dial plan has no IP candidates".into());
    for group in super::dial_plan::groups(plan) {
        let mut dials = tokio::task::JoinSet::new();
        for candidate in group {
            let url = ControlUrl {
                dial_ip: Some(candidate.ip),
                ..url.clone()
            };
            let (machine, server) = (machine.clone(), *server);
            dials.spawn(async move {
                tokio::time::sleep(candidate.start_delay).await;
                tokio::time::timeout(
                    candidate.timeout,
                    race(&url, &machine, &server, plain, tls_port),
                )
                .await
                .unwrap_or_else(|_| {
                    Err(ControlError::Transient(format!(
                        "dial plan candidate {}: no handshake within {:?}",
                        candidate.ip, candidate.timeout
                    )))
                })
            });
        }
        while let Some(joined) = dials.join_next().await {
            match joined {
                Ok(Ok(conn)) => return Ok(conn),
                Ok(Err(e)) => last_error = e,
                Err(e) => last_error = ControlError::transient("dial plan task", e),
            }
        }
    }
    Err(last_error)
}

/// Plain HTTP at once, TLS after [`TLS_HEAD_START`] or as soon as plain fails; the first
/// handshake that completes wins. Both failing returns the plain error with the TLS one.
async fn race(
    url: &ControlUrl,
    machine: &MachinePrivate,
    server: &MachinePublic,
    plain: Option<u16>,
    tls_port: Option<u16>,
) -> Result<ControlConn, ControlError> {
    let (plain, tls_port) = match (plain, tls_port) {
        (Some(p), None) => return connect_plain(url, p, machine, server).await,
        (None, Some(t)) => return connect_tls_noise(url, t, machine, server).await,
        (None, None) => {
            return Err(ControlError::Transient(format!(
                "control URL {}: no port to dial",
                url.origin()
            )))
        }
        (Some(p), Some(t)) => (p, t),
    };
    let plain_dial = connect_plain(url, plain, machine, server);
    tokio::pin!(plain_dial);
    let head_start = tokio::time::sleep(TLS_HEAD_START);
    tokio::pin!(head_start);
    let mut plain_error: Option<ControlError> = None;
    // Phase 1: plain HTTP alone until it fails or its head start is over.
    tokio::select! {
        r = &mut plain_dial => match r {
            Ok(conn) => return Ok(conn),
            Err(e) => plain_error = Some(e),
        },
        _ = &mut head_start => {}
    }
    let tls_dial = connect_tls_noise(url, tls_port, machine, server);
    tokio::pin!(tls_dial);
    let Some(plain_error) = plain_error else {
        // Phase 2: both running; the first success wins, a failure waits for the other.
        return tokio::select! {
            r = &mut plain_dial => match r {
                Ok(conn) => Ok(conn),
                Err(e) => tls_dial.await.map_err(|t| both_failed(e, t)),
            },
            r = &mut tls_dial => match r {
                Ok(conn) => Ok(conn),
                Err(t) => plain_dial.await.map_err(|e| both_failed(e, t)),
            },
        };
    };
    tracing::debug!(error = %plain_error, "ts2021 over plain HTTP failed; trying TLS");
    tls_dial.await.map_err(|t| both_failed(plain_error, t))
}

fn both_failed(plain: ControlError, tls: ControlError) -> ControlError {
    ControlError::Transient(format!("{plain}; and over TLS: {tls}"))
}

async fn connect_plain(
    url: &ControlUrl,
    port: u16,
    machine: &MachinePrivate,
    server: &MachinePublic,
) -> Result<ControlConn, ControlError> {
    let ctx = format!("ts2021 to http://{}:{port}", url.host_for_dial());
    let tcp = connect_tcp(url, port).await?;
    connect_over(tcp, url, machine, server, &ctx).await
}

async fn connect_tls_noise(
    url: &ControlUrl,
    port: u16,
    machine: &MachinePrivate,
    server: &MachinePublic,
) -> Result<ControlConn, ControlError> {
    let ctx = format!("ts2021 to https://{}:{port}", url.host_for_dial());
    let config =
        tls::noise_config(tls::root_store()).map_err(|e| ControlError::transient(&ctx, e))?;
    let tcp = connect_tcp(url, port).await?;
    let stream = connect_tls(url, tcp, config, &ctx).await?;
    connect_over(stream, url, machine, server, &ctx).await
}

/// The upgrade, the Noise handshake and HTTP/2 over one established stream.
async fn connect_over<S: ControlIo>(
    stream: S,
    url: &ControlUrl,
    machine: &MachinePrivate,
    server: &MachinePublic,
    ctx: &str,
) -> Result<ControlConn, ControlError> {
    let (initiator, initiation) = Initiator::start(machine, server, CAPABILITY_VERSION)
        .map_err(|e| ControlError::transient(ctx, e))?;
    let mut stream = upgrade(stream, url, &initiation, ctx).await?;
    let mut header = [0u8; HEADER_LEN];
    stream
        .read_exact(&mut header)
        .await
        .map_err(|e| ControlError::transient(&format!("{ctx}: reading Noise response"), e))?;
    let total = handshake_answer_len(header).map_err(|e| ControlError::transient(ctx, e))?;
    let mut answer = vec![0u8; total];
    answer[..HEADER_LEN].copy_from_slice(&header);
    stream
        .read_exact(&mut answer[HEADER_LEN..])
        .await
        .map_err(|e| ControlError::transient(&format!("{ctx}: reading Noise response"), e))?;
    let keys = initiator
        .finish(&answer)
        .map_err(|e| ControlError::transient(&format!("{ctx}: Noise handshake"), e))?;
    let buffered = stream.buffer().to_vec();
    let mut noise = NoiseStream::with_buffered(stream.into_inner(), keys, &buffered);
    if let Some(early) = noise
        .read_early_payload()
        .await
        .map_err(|e| ControlError::transient(&format!("{ctx}: early payload"), e))?
    {
        tracing::debug!(challenge = %early.node_key_challenge, "control sent an early payload");
    }
    let (sender, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(noise))
        .await
        .map_err(|e| ControlError::transient(&format!("{ctx}: HTTP/2 handshake"), e))?;
    let driver = tokio::spawn(conn);
    let requests = Requester {
        sender,
        authority: url.authority.clone(),
    };
    tracing::debug!(via = ctx, "ts2021 connection up");
    Ok(ControlConn { requests, driver })
}

impl ControlConn {
    /// The control server's `host[:port]` as the URL named it.
    pub fn authority(&self) -> &str {
        &self.requests.authority
    }

    /// See [`Requester::post`].
    pub async fn post(
        &mut self,
        path: &str,
        body: Vec<u8>,
        ts_lb: &[NodePublic],
    ) -> Result<http::Response<Incoming>, ControlError> {
        self.requests.post(path, body, ts_lb).await
    }
}

impl Requester {
    /// `POST https://<authority><path>` with a JSON body and the `Ts-Lb` node-key hints.
    /// Returns the response with its body still streaming.
    pub async fn post(
        &mut self,
        path: &str,
        body: Vec<u8>,
        ts_lb: &[NodePublic],
    ) -> Result<http::Response<Incoming>, ControlError> {
        let ctx = format!("POST {path}");
        let mut req = http::Request::post(format!("https://{}{path}", self.authority));
        for key in ts_lb.iter().filter(|k| !k.is_zero()) {
            req = req.header("Ts-Lb", key.to_string());
        }
        let req = req
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| ControlError::transient(&ctx, e))?;
        self.sender
            .ready()
            .await
            .map_err(|e| ControlError::transient(&ctx, e))?;
        self.sender
            .send_request(req)
            .await
            .map_err(|e| ControlError::transient(&ctx, e))
    }
}

/// Read a whole (small) response body, bounded by `limit`.
pub async fn read_body(resp: http::Response<Incoming>, limit: usize) -> Result<Bytes, String> {
    Limited::new(resp.into_body(), limit)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upgrade_response_checks() {
        let ok = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: tailscale-control-protocol\r\nConnection: upgrade\r\n\r\n";
        assert!(check_upgrade_response(ok).is_ok());
        let wrong = ok.replace("tailscale-control-protocol", "websocket");
        assert!(check_upgrade_response(&wrong)
            .unwrap_err()
            .contains("unexpected protocol"));
        let denied = "HTTP/1.1 400 Bad Request\r\n\r\n";
        assert!(check_upgrade_response(denied)
            .unwrap_err()
            .contains("want 101"));
        assert!(check_upgrade_response("").is_err());
    }

    use crate::control::test_stub::{Answer, Script, Stub};
    use std::sync::Arc;

    /// Dial the stub the way the client does (`/key`, then ts2021) and POST once.
    async fn dial_and_post(stub: &Stub) -> Result<String, ControlError> {
        let url = ControlUrl::parse(&stub.url)?;
        let key = parse_key_response(&fetch_key_body(&url, CAPABILITY_VERSION).await?)
            .map_err(ControlError::Transient)?;
        assert_eq!(key, stub.server_key.public());
        let machine = MachinePrivate::generate();
        let mut conn = connect(&url, &machine, &key).await?;
        let resp = conn
            .post("/machine/register", b"{}".to_vec(), &[NodePublic::zero()])
            .await?;
        let body = read_body(resp, 1024)
            .await
            .map_err(ControlError::Transient)?;
        Ok(String::from_utf8_lossy(&body).into_owned())
    }

    fn echo_path(early_payload: bool) -> Script {
        Script::Http2 {
            early_payload,
            handler: Arc::new(|path, _| Answer::ok(format!("hello {path}"))),
        }
    }

    #[tokio::test]
    async fn dial_handshakes_and_speaks_http2_over_noise() {
        for early in [false, true] {
            let stub = Stub::start(echo_path(early)).await;
            let result = dial_and_post(&stub).await;
            assert_eq!(
                result.unwrap(),
                "hello /machine/register",
                "early payload: {early}"
            );
        }
    }

    async fn dial_error(script: Script) -> String {
        let stub = Stub::start(script).await;
        dial_and_post(&stub).await.unwrap_err().to_string()
    }

    #[tokio::test]
    async fn corrupt_or_truncated_noise_response_is_an_error() {
        let err = dial_error(Script::NoiseResponse(|mut r| {
            r[40] ^= 1;
            r
        }))
        .await;
        assert!(err.contains("Noise handshake"), "{err}");
        let err = dial_error(Script::NoiseResponse(|r| r[..20].to_vec())).await;
        assert!(err.contains("reading Noise response"), "{err}");
        let err = dial_error(Script::NoiseResponse(|_| {
            crate::control::noise::encode_error_frame("go away")
        }))
        .await;
        assert!(err.contains("go away"), "{err}");
    }

    #[tokio::test]
    async fn bad_noise_records_are_errors_not_panics() {
        // Header announcing 4096 bytes of ciphertext: more than a 4096-byte frame can hold.
        let err = dial_error(Script::RawAfterHandshake(vec![0x04, 0x10, 0x00])).await;
        assert!(
            err.contains("early payload") && err.contains("record length"),
            "{err}"
        );
        // A record cut short by the server hanging up.
        let err = dial_error(Script::RawAfterHandshake(vec![0x04, 0x00, 0x20, 1, 2, 3])).await;
        assert!(err.contains("early payload"), "{err}");
        // A record of the wrong type.
        let mut wrong = vec![0x05, 0x00, 0x10];
        wrong.extend_from_slice(&[0u8; 16]);
        let err = dial_error(Script::RawAfterHandshake(wrong)).await;
        assert!(err.contains("record type"), "{err}");
        // A record that does not decrypt.
        let mut forged = vec![0x04, 0x00, 0x14];
        forged.extend_from_slice(&[7u8; 20]);
        let err = dial_error(Script::RawAfterHandshake(forged)).await;
        assert!(err.contains("decryption failed"), "{err}");
    }

    #[tokio::test]
    async fn a_dial_plan_reaches_control_when_its_host_does_not() {
        use crate::control::tailcfg::{ControlDialPlan, ControlIpCandidate};
        let stub = Stub::start(echo_path(false)).await;
        let real = ControlUrl::parse(&stub.url).unwrap();
        let key =
            parse_key_response(&fetch_key_body(&real, CAPABILITY_VERSION).await.unwrap()).unwrap();
        // Same port on another loopback address: nothing listens there.
        let elsewhere = ControlUrl::parse(&format!("http://127.0.0.9:{}", real.port)).unwrap();
        let machine = MachinePrivate::generate();
        assert!(connect(&elsewhere, &machine, &key).await.is_err());
        let candidate = |ip: &str, priority| ControlIpCandidate {
            ip: ip.parse().ok(),
            priority,
            ..Default::default()
        };
        // The higher priority fails (nothing there), the lower one is control.
        let plan = ControlDialPlan {
            candidates: vec![candidate("127.0.0.1", 1), candidate("127.0.0.10", 5)],
        };
        crate::control::dial_plan::remember(&elsewhere.authority, &plan);
        let mut conn = connect(&elsewhere, &machine, &key)
            .await
            .expect("dialed by the plan");
        let resp = conn
            .post("/machine/register", b"{}".to_vec(), &[NodePublic::zero()])
            .await
            .unwrap();
        let body = read_body(resp, 1024).await.unwrap();
        assert_eq!(body, "hello /machine/register");
        crate::control::dial_plan::remember(&elsewhere.authority, &ControlDialPlan::default());
    }

    #[test]
    fn key_response_forms() {
        let key = MachinePrivate::generate().public();
        let body = format!(
            r#"{{"legacyPublicKey":"mkey:{}","publicKey":"{key}"}}"#,
            "0".repeat(64)
        );
        assert_eq!(parse_key_response(body.as_bytes()).unwrap(), key);
        let zero = format!(r#"{{"publicKey":"mkey:{}"}}"#, "0".repeat(64));
        assert!(parse_key_response(zero.as_bytes())
            .unwrap_err()
            .contains("too old"));
        assert!(parse_key_response(b"abcdef")
            .unwrap_err()
            .contains("not JSON"));
        assert!(parse_key_response(b"{}")
            .unwrap_err()
            .contains("no publicKey"));
    }

    /// A server that accepts TCP (the kernel does, from the backlog) but never answers.
    fn silent_server() -> (std::net::TcpListener, ControlUrl) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = ControlUrl::parse(&format!("http://{}", listener.local_addr().unwrap())).unwrap();
        (listener, url)
    }

    // Paused time jumps ahead whenever the runtime idles, so the 10 s timeouts fire at once.
    #[tokio::test(start_paused = true)]
    async fn a_silent_server_times_out_key_fetch_and_dial() {
        let (_listener, url) = silent_server();
        let err = fetch_key_body(&url, CAPABILITY_VERSION)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("/key: no answer within 10s"), "{err}");
        let server = MachinePrivate::generate().public();
        let err = connect(&url, &MachinePrivate::generate(), &server)
            .await
            .err()
            .unwrap();
        assert!(err.to_string().contains("timed out after 10s"), "{err}");
    }
}
