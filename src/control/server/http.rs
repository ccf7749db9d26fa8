//! HTTP/1.1 front: `GET /key`, `POST /ts2021` (Noise upgrade), `GET /generate_204`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use base64::Engine;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONNECTION, UPGRADE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tracing::{debug, warn};

use super::{count, machine, Shared};
use crate::control::noise::{Accepted, NoiseStream, Responder};
use crate::keys::MachinePublic;

/// The protocol name in `Upgrade` headers (§3.2).
const UPGRADE_PROTOCOL: &str = "tailscale-control-protocol";
/// Header carrying the base64 Noise initiation.
const HANDSHAKE_HEADER: &str = "x-tailscale-handshake";

type Body = Full<Bytes>;

/// Serves one TCP connection: HTTP/1.1 requests, and at most one upgrade to ts2021.
pub(super) async fn serve_connection<S>(shared: Arc<Shared>, stream: S, peer: SocketAddr)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(route(shared, peer, req)) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    if let Err(err) = conn.await {
        debug!(%peer, error = %err, "HTTP connection ended with an error");
    }
}

fn route(shared: Arc<Shared>, peer: SocketAddr, req: Request<Incoming>) -> Response<Body> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/key") => key_response(&shared),
        (_, "/ts2021") => upgrade(shared, peer, req),
        (&Method::GET, "/generate_204") => status(StatusCode::NO_CONTENT, ""),
        (method, path) if path.starts_with("/register/") => {
            login_page(&shared, method, &path["/register/".len()..])
        }
        (_, path) => {
            debug!(%peer, path, "unknown HTTP path");
            status(StatusCode::NOT_FOUND, "not found\n")
        }
    }
}

/// The interactive login page: `GET` shows which node asks, `POST` approves it (a lab server:
/// whoever can reach the page and knows the unguessable ID may approve).
fn login_page(shared: &Shared, method: &Method, id: &str) -> Response<Body> {
    let valid_id = !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_hexdigit());
    let request = valid_id
        .then(|| shared.tailnet().login_request(id))
        .flatten();
    let Some(request) = request else {
        return status(StatusCode::NOT_FOUND, "unknown or expired login\n");
    };
    let host = html_escape(&request.hostname);
    match *method {
        Method::GET if request.approved => html(&format!("<p>Node <b>{host}</b> is approved.</p>")),
        Method::GET => html(&format!(
            "<p>Node <b>{host}</b> asks to join this lab tailnet.</p>\
             <form method=\"post\"><button type=\"submit\">Approve</button></form>"
        )),
        Method::POST => {
            shared.tailnet().approve_login(id);
            shared.logins_approved.notify_waiters();
            tracing::info!(hostname = %request.hostname, "interactive login approved");
            html(&format!("<p>Node <b>{host}</b> is approved.</p>"))
        }
        _ => status(StatusCode::METHOD_NOT_ALLOWED, "use GET or POST\n"),
    }
}

fn html(body: &str) -> Response<Body> {
    let page = format!(
        "<!doctype html><html><head><title>tern lab login</title></head><body>{body}</body></html>\n"
    );
    Response::builder()
        .header("content-type", "text/html; charset=utf-8")
        .body(Full::new(Bytes::from(page)))
        .unwrap_or_else(|_| status(StatusCode::INTERNAL_SERVER_ERROR, ""))
}

fn html_escape(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '<' => "&lt;".to_string(),
            '>' => "&gt;".to_string(),
            '&' => "&amp;".to_string(),
            '"' => "&quot;".to_string(),
            c => c.to_string(),
        })
        .collect()
}

/// `GET /key?v=N` (§2): the Noise public key, and an all-zero legacy key.
fn key_response(shared: &Shared) -> Response<Body> {
    let body = crate::control::tailcfg::OverTLSPublicKeyResponse {
        legacy_public_key: MachinePublic::zero(),
        public_key: shared.noise_key.public(),
    };
    match serde_json::to_vec(&body) {
        Ok(json) => Response::builder()
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(json)))
            .unwrap_or_else(|_| status(StatusCode::INTERNAL_SERVER_ERROR, "")),
        Err(_) => status(StatusCode::INTERNAL_SERVER_ERROR, ""),
    }
}

/// `POST /ts2021`: checks the headers, runs the Noise responder, answers 101, and hands the
/// upgraded connection to the HTTP/2 server once hyper has written the 101.
fn upgrade(shared: Arc<Shared>, peer: SocketAddr, mut req: Request<Incoming>) -> Response<Body> {
    let accepted = match accept_handshake(&shared, &req) {
        Ok(accepted) => accepted,
        Err(reason) => {
            count(&shared.rejections.upgrades);
            warn!(%peer, reason, "refused /ts2021 upgrade");
            return status(StatusCode::BAD_REQUEST, &format!("{reason}\n"));
        }
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => run_noise(shared, peer, TokioIo::new(upgraded), accepted).await,
            Err(err) => debug!(%peer, error = %err, "ts2021 upgrade did not complete"),
        }
    });
    let mut resp = status(StatusCode::SWITCHING_PROTOCOLS, "");
    resp.headers_mut()
        .insert(UPGRADE, HeaderValue::from_static(UPGRADE_PROTOCOL));
    resp.headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("upgrade"));
    resp
}

fn accept_handshake(shared: &Shared, req: &Request<Incoming>) -> Result<Accepted, String> {
    let upgrade = header_str(req, UPGRADE.as_str()).to_ascii_lowercase();
    if upgrade.is_empty() {
        return Err("missing next protocol (Upgrade header)".into());
    }
    if upgrade != UPGRADE_PROTOCOL {
        return Err(format!("unsupported Upgrade protocol {upgrade:?}"));
    }
    let encoded = header_str(req, HANDSHAKE_HEADER);
    if encoded.is_empty() {
        return Err("missing X-Tailscale-Handshake header".into());
    }
    let initiation = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|err| format!("X-Tailscale-Handshake is not base64: {err}"))?;
    Responder::accept(&shared.noise_key, &initiation)
        .map_err(|err| format!("Noise handshake failed: {err}"))
}

fn header_str<'a>(req: &'a Request<Incoming>, name: &str) -> &'a str {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// Writes the Noise response after the 101 headers, then serves HTTP/2 over Noise records.
async fn run_noise(
    shared: Arc<Shared>,
    peer: SocketAddr,
    mut io: TokioIo<hyper::upgrade::Upgraded>,
    accepted: Accepted,
) {
    let Accepted {
        response,
        peer: machine,
        version,
        keys,
    } = accepted;
    if let Err(err) = io.write_all(&response).await {
        debug!(%peer, error = %err, "writing the Noise response failed");
        return;
    }
    debug!(%peer, %machine, version, "ts2021 session up");
    let stream = NoiseStream::new(io, keys);
    machine::serve_h2(shared, peer, machine, version, stream).await;
}

fn status(code: StatusCode, text: &str) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(text.to_string())));
    *resp.status_mut() = code;
    resp
}
