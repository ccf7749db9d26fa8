//! HTTP/2 over Noise: `/machine/register` and `/machine/map`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::RecvStream;
use http::{Request, Response, StatusCode};
use tern_lab::control::{ControlError, NodeUpdate, RegisterInput, RegisterOutcome};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, info, warn};

use super::{count, mapper, now_unix, session, Event, Shared};
use crate::control::framing::Compression;
use crate::control::noise::NoiseStream;
use crate::control::tailcfg::{MapRequest, RegisterRequest, RegisterResponse};
use crate::keys::MachinePublic;

/// Largest register or map request body we read (the client's own limit for answers is 1 MiB).
const MAX_REQUEST_BODY: usize = 1 << 20;
/// Oldest capability version we serve (Headscale's minimum).
const MIN_CAPABILITY_VERSION: i32 = 113;

/// Who is on the other end of a Noise session.
#[derive(Clone, Copy)]
pub(super) struct Peer {
    pub addr: SocketAddr,
    pub machine: MachinePublic,
}

/// Serves HTTP/2 (server side, prior knowledge) on a finished Noise session.
pub(super) async fn serve_h2<S>(
    shared: Arc<Shared>,
    addr: SocketAddr,
    machine: MachinePublic,
    version: u16,
    stream: NoiseStream<S>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let peer = Peer { addr, machine };
    let mut conn = match h2::server::Builder::new()
        .max_concurrent_streams(64)
        .handshake(stream)
        .await
    {
        Ok(conn) => conn,
        Err(err) => {
            count(&shared.rejections.connections);
            warn!(%addr, %machine, version, error = %err, "HTTP/2 over Noise failed to start");
            return;
        }
    };
    while let Some(next) = conn.accept().await {
        match next {
            Ok((req, respond)) => {
                tokio::spawn(handle_request(shared.clone(), peer, req, respond));
            }
            Err(err) => {
                log_connection_end(&shared, &peer, &err);
                return;
            }
        }
    }
    debug!(%addr, %machine, "Noise connection ended");
}

/// Logs why an HTTP/2-over-Noise connection ended; bad records and protocol errors are counted.
fn log_connection_end(shared: &Shared, peer: &Peer, err: &h2::Error) {
    let bad_record = err
        .get_io()
        .is_some_and(|e| e.kind() == std::io::ErrorKind::InvalidData);
    if bad_record || !(err.is_io() || err.is_go_away()) {
        count(&shared.rejections.connections);
        warn!(addr = %peer.addr, machine = %peer.machine, error = %err, "bad input on a Noise connection; closed it");
    } else {
        debug!(addr = %peer.addr, machine = %peer.machine, error = %err, "Noise connection closed");
    }
}

async fn handle_request(
    shared: Arc<Shared>,
    peer: Peer,
    req: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) {
    let path = req.uri().path().to_string();
    let body = match read_body(req.into_body()).await {
        Ok(body) => body,
        Err(reason) => {
            reject(
                &shared,
                &mut respond,
                &peer,
                &path,
                StatusCode::BAD_REQUEST,
                &reason,
            );
            return;
        }
    };
    match path.as_str() {
        "/machine/register" => register(&shared, peer, &body, respond).await,
        "/machine/map" => map(shared, peer, &body, respond),
        p if p.starts_with("/machine/") => {
            debug!(addr = %peer.addr, path = p, "unimplemented /machine endpoint");
            send_simple(
                &mut respond,
                StatusCode::NOT_IMPLEMENTED,
                b"not implemented in the lab server\n",
            );
        }
        _ => send_simple(&mut respond, StatusCode::NOT_FOUND, b"not found\n"),
    }
}

async fn read_body(mut body: RecvStream) -> Result<Vec<u8>, String> {
    let mut data = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(|err| format!("reading request body: {err}"))?;
        let _ = body.flow_control().release_capacity(chunk.len());
        if data.len() + chunk.len() > MAX_REQUEST_BODY {
            return Err(format!("request body over {MAX_REQUEST_BODY} bytes"));
        }
        data.extend_from_slice(&chunk);
    }
    Ok(data)
}

/// Answers a request with a 4xx, counts and logs it with context.
fn reject(
    shared: &Shared,
    respond: &mut SendResponse<Bytes>,
    peer: &Peer,
    path: &str,
    code: StatusCode,
    reason: &str,
) {
    count(&shared.rejections.requests);
    warn!(addr = %peer.addr, machine = %peer.machine, path, status = code.as_u16(), reason, "refused request");
    send_simple(respond, code, format!("{reason}\n").as_bytes());
}

fn send_simple(respond: &mut SendResponse<Bytes>, code: StatusCode, body: &[u8]) {
    let Ok(resp) = Response::builder().status(code).body(()) else {
        return;
    };
    if let Ok(mut send) = respond.send_response(resp, body.is_empty()) {
        if !body.is_empty() {
            let _ = send.send_data(Bytes::copy_from_slice(body), true);
        }
    }
}

fn send_json<T: serde::Serialize>(respond: &mut SendResponse<Bytes>, value: &T) {
    match serde_json::to_vec(value) {
        Ok(json) => send_simple(respond, StatusCode::OK, &json),
        Err(_) => send_simple(respond, StatusCode::INTERNAL_SERVER_ERROR, b""),
    }
}

/// Decode a register or map request body and refuse clients older than we serve.
fn decode_request<T: serde::de::DeserializeOwned>(
    body: &[u8],
    what: &str,
    version: impl Fn(&T) -> i32,
) -> Result<T, String> {
    let req: T = serde_json::from_slice(body).map_err(|err| format!("bad {what} JSON: {err}"))?;
    let got = version(&req);
    if got < MIN_CAPABILITY_VERSION {
        return Err(format!(
            "capability version {got} is older than {MIN_CAPABILITY_VERSION}"
        ));
    }
    Ok(req)
}

/// `/machine/register` with the pre-auth-key flow (§4.3).
/// How long a follow-up registration is held open waiting for its login to be approved (the
/// client asks again after that).
const LOGIN_HOLD: Duration = Duration::from_secs(60);

async fn register(shared: &Shared, peer: Peer, body: &[u8], mut respond: SendResponse<Bytes>) {
    let path = "/machine/register";
    let req: RegisterRequest =
        match decode_request(body, "RegisterRequest", |r: &RegisterRequest| r.version) {
            Ok(req) => req,
            Err(reason) => {
                return reject(
                    shared,
                    &mut respond,
                    &peer,
                    path,
                    StatusCode::BAD_REQUEST,
                    &reason,
                )
            }
        };
    let input = mapper::register_input(&req, &peer.machine);
    let outcome = register_or_hold(shared, &input).await;
    let outcome = match outcome {
        Ok(outcome) => outcome,
        Err(err) => {
            warn!(machine = %peer.machine, error = %err, "registration failed");
            // Transient (e.g. disk) failures are non-200 so the client retries (§11.33).
            return send_simple(
                &mut respond,
                StatusCode::INTERNAL_SERVER_ERROR,
                b"registration failed\n",
            );
        }
    };
    let response = match outcome {
        RegisterOutcome::Accepted { node_id, created } => {
            info!(node_id, created, machine = %peer.machine, "node registered");
            shared.publish(if created {
                Event::Added(node_id)
            } else {
                Event::Changed(node_id, mapper::ALL_CHANGED)
            });
            mapper::register_success(&shared.tailnet(), node_id)
        }
        RegisterOutcome::LoggedOut { node_id, deleted } => {
            info!(?node_id, deleted, machine = %peer.machine, "node logged out");
            match (node_id, deleted) {
                (Some(id), true) => shared.publish(Event::Removed(id)),
                // Peers drop a logged-out node (the mapper sends PeersRemoved).
                (Some(id), false) => shared.publish(Event::Changed(id, mapper::ALL_CHANGED)),
                (None, _) => {}
            }
            mapper::register_logged_out()
        }
        RegisterOutcome::Rejected(reason) => {
            count(&shared.rejections.registrations);
            warn!(machine = %peer.machine, reason, "registration refused");
            mapper::register_error(&reason)
        }
        RegisterOutcome::KeyExpired { node_id } => {
            info!(node_id, machine = %peer.machine, "node key expired; the node must log in again");
            mapper::register_logged_out()
        }
        RegisterOutcome::NeedsLogin { login_id } => {
            info!(machine = %peer.machine, "interactive login pending");
            mapper::register_needs_login(format!("{}/register/{login_id}", shared.public_url))
        }
        RegisterOutcome::MachineMismatch => {
            return reject(
                shared,
                &mut respond,
                &peer,
                path,
                StatusCode::UNAUTHORIZED,
                "node key belongs to another machine",
            );
        }
    };
    send_json::<RegisterResponse>(&mut respond, &response);
}

/// Runs the registration; a follow-up whose login is still pending is held (up to
/// [`LOGIN_HOLD`]) until an approval wakes it, as Tailscale's control does.
async fn register_or_hold(
    shared: &Shared,
    input: &RegisterInput,
) -> Result<RegisterOutcome, ControlError> {
    let deadline = tokio::time::Instant::now() + LOGIN_HOLD;
    loop {
        // Registered before checking, so an approval between the check and the wait is seen.
        let approved = shared.logins_approved.notified();
        tokio::pin!(approved);
        approved.as_mut().enable();
        let outcome = shared.tailnet().register(input, now_unix());
        let waiting = matches!(outcome, Ok(RegisterOutcome::NeedsLogin { .. }));
        if !waiting || input.followup.is_none() {
            return outcome;
        }
        if tokio::time::timeout_at(deadline, approved).await.is_err() {
            return outcome;
        }
    }
}

/// `/machine/map`: streaming poll, lite update, or one-shot (§5.1).
fn map(shared: Arc<Shared>, peer: Peer, body: &[u8], mut respond: SendResponse<Bytes>) {
    let path = "/machine/map";
    let req: MapRequest = match decode_request(body, "MapRequest", |r: &MapRequest| r.version) {
        Ok(req) => req,
        Err(reason) => {
            return reject(
                &shared,
                &mut respond,
                &peer,
                path,
                StatusCode::BAD_REQUEST,
                &reason,
            )
        }
    };
    let compression = match Compression::from_request(&req.compress) {
        Ok(compression) => compression,
        Err(err) => {
            let reason = err.to_string();
            return reject(
                &shared,
                &mut respond,
                &peer,
                path,
                StatusCode::BAD_REQUEST,
                &reason,
            );
        }
    };
    let node_id = {
        let tailnet = shared.tailnet();
        match tailnet.authorize_map(&req.node_key.to_string(), &peer.machine.to_string()) {
            Ok(node) => node.id,
            Err(ControlError::MachineMismatch) => {
                drop(tailnet);
                return reject(
                    &shared,
                    &mut respond,
                    &peer,
                    path,
                    StatusCode::UNAUTHORIZED,
                    "node key belongs to another machine",
                );
            }
            Err(_) => {
                drop(tailnet);
                return reject(
                    &shared,
                    &mut respond,
                    &peer,
                    path,
                    StatusCode::NOT_FOUND,
                    "node not found",
                );
            }
        }
    };
    let update: NodeUpdate = mapper::node_update(&req);
    match shared.tailnet().update_node(node_id, &update) {
        Ok(changes) if changes.any() => {
            debug!(node_id, ?changes, "node state changed");
            shared.publish(Event::Changed(node_id, changes));
        }
        Ok(_) => {}
        Err(err) => warn!(node_id, error = %err, "storing node state failed"),
    }
    if req.stream {
        session::start(shared, node_id, compression, respond);
    } else if req.omit_peers {
        send_simple(&mut respond, StatusCode::OK, b"");
    } else {
        session::send_one(&shared, node_id, compression, respond);
    }
}
