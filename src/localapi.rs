//! LocalAPI: JSON over HTTP/1.1 on the daemon's Unix socket, for the CLI (and later `tern top`).
//!
//! | method + path               | body in        | body out            |
//! |-----------------------------|----------------|---------------------|
//! | `GET /localapi/v0/status`   | —              | [`Status`]          |
//! | `GET /localapi/v0/ip`       | —              | [`IpResponse`]      |
//! | `POST /localapi/v0/up`      | [`UpRequest`]  | `{}`                |
//! | `POST /localapi/v0/down`    | —              | `{}`                |
//!
//! Errors are a non-2xx status with `{"error": "..."}`. Access control is the socket file
//! itself: mode 0600, owned by root, or by the one `--operator` user the admin opted in.
//! The server reads status from the watch channel and sends commands to the daemon; it never
//! reaches into daemon internals.

use std::convert::Infallible;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, watch};

use crate::status::Status;

/// Largest request body the server reads.
const MAX_BODY: usize = 64 * 1024;
/// Largest response body the client reads (a big tailnet's status).
const MAX_RESPONSE: usize = 16 * 1024 * 1024;

/// `POST /localapi/v0/up`. Absent fields keep their stored value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct UpRequest {
    pub login_server: Option<String>,
    /// The key itself (the CLI resolves `file:PATH`, as the invoking user).
    pub auth_key: Option<String>,
    pub hostname: Option<String>,
}

/// `GET /localapi/v0/ip`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpResponse {
    pub ipv4: Vec<String>,
    pub ipv6: Vec<String>,
}

/// What the LocalAPI asks of the daemon; each carries the channel for the answer.
#[derive(Debug)]
pub enum Command {
    Up(UpRequest, oneshot::Sender<Result<(), String>>),
    Down(oneshot::Sender<Result<(), String>>),
}

#[derive(Debug, thiserror::Error)]
pub enum LocalApiError {
    #[error("socket {path}: {source}")]
    Socket {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("another daemon is already listening on {0}")]
    InUse(PathBuf),
    #[error("cannot reach the tern daemon at {path} (is `tern daemon` running?): {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("LocalAPI HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("LocalAPI request: {0}")]
    Request(#[from] http::Error),
    #[error("LocalAPI response too large or unreadable: {0}")]
    Body(String),
    #[error("daemon answered {status}: {message}")]
    Status { status: StatusCode, message: String },
    #[error("bad JSON from the daemon: {0}")]
    Json(#[from] serde_json::Error),
}

/// Who may use the socket besides root.
#[derive(Debug, Clone, Copy, Default)]
pub struct SocketOwner {
    /// The `--operator` user's uid/gid; `None` means root only.
    pub operator: Option<(u32, u32)>,
}

/// Bind the socket: refuse if a live daemon holds it, replace a stale file, mode 0600,
/// owned by root or the operator.
pub fn bind(path: &Path, owner: SocketOwner) -> Result<UnixListener, LocalApiError> {
    let sock_err = |source| LocalApiError::Socket {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(sock_err)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(LocalApiError::InUse(path.to_path_buf()));
            }
            std::fs::remove_file(path).map_err(sock_err)?;
        }
        Ok(_) => {
            return Err(sock_err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "exists and is not a socket",
            )))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(sock_err(e)),
    }
    // Bind under a restrictive umask so the socket is never connectable by others.
    let old_umask = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let listener = UnixListener::bind(path);
    nix::sys::stat::umask(old_umask);
    let listener = listener.map_err(sock_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(sock_err)?;
    if let Some((uid, gid)) = owner.operator {
        std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(sock_err)?;
    }
    Ok(listener)
}

/// Serve LocalAPI connections until the listener fails or the task is dropped.
pub async fn serve(
    listener: UnixListener,
    status: watch::Receiver<Status>,
    commands: mpsc::Sender<Command>,
) {
    let shared = Arc::new(Shared { status, commands });
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "LocalAPI accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(shared.handle(req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "LocalAPI connection ended with an error");
            }
        });
    }
}

struct Shared {
    status: watch::Receiver<Status>,
    commands: mpsc::Sender<Command>,
}

type Reply = Response<Full<Bytes>>;

impl Shared {
    async fn handle(&self, req: Request<Incoming>) -> Reply {
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        tracing::trace!(%method, %path, "LocalAPI request");
        match (method, path.as_str()) {
            (Method::GET, "/localapi/v0/status") => json_reply(&*self.status.borrow()),
            (Method::GET, "/localapi/v0/ip") => json_reply(&ip_response(&self.status.borrow())),
            (Method::POST, "/localapi/v0/up") => match read_json::<UpRequest>(req).await {
                Ok(up) => self.command(|tx| Command::Up(up, tx)).await,
                Err(reply) => reply,
            },
            (Method::POST, "/localapi/v0/down") => self.command(Command::Down).await,
            (
                _,
                "/localapi/v0/status" | "/localapi/v0/ip" | "/localapi/v0/up" | "/localapi/v0/down",
            ) => error_reply(StatusCode::METHOD_NOT_ALLOWED, "method not allowed"),
            _ => error_reply(
                StatusCode::NOT_FOUND,
                &format!("no LocalAPI endpoint {path}"),
            ),
        }
    }

    async fn command(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<(), String>>) -> Command,
    ) -> Reply {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(make(tx)).await.is_err() {
            return error_reply(StatusCode::SERVICE_UNAVAILABLE, "daemon is shutting down");
        }
        match rx.await {
            Ok(Ok(())) => json_reply(&serde_json::json!({})),
            Ok(Err(message)) => error_reply(StatusCode::BAD_REQUEST, &message),
            Err(_) => error_reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "daemon dropped the request",
            ),
        }
    }
}

fn ip_response(status: &Status) -> IpResponse {
    let (v4, v6): (Vec<String>, Vec<String>) = status
        .self_ips()
        .iter()
        .cloned()
        .partition(|ip| !ip.contains(':'));
    IpResponse { ipv4: v4, ipv6: v6 }
}

async fn read_json<T: serde::de::DeserializeOwned>(req: Request<Incoming>) -> Result<T, Reply> {
    let body = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| error_reply(StatusCode::PAYLOAD_TOO_LARGE, &format!("request body: {e}")))?;
    serde_json::from_slice(&body.to_bytes())
        .map_err(|e| error_reply(StatusCode::BAD_REQUEST, &format!("bad JSON: {e}")))
}

fn json_reply<T: Serialize>(value: &T) -> Reply {
    match serde_json::to_vec(value) {
        Ok(body) => Response::builder()
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()))),
        Err(e) => error_reply(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

fn error_reply(status: StatusCode, message: &str) -> Reply {
    let body = serde_json::json!({ "error": message }).to_string();
    let mut reply = Response::new(Full::new(Bytes::from(body)));
    *reply.status_mut() = status;
    reply
}

/// A LocalAPI client: one short HTTP/1.1 connection per call.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
}

impl Client {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
        }
    }

    pub async fn status(&self) -> Result<Status, LocalApiError> {
        self.call(Method::GET, "/localapi/v0/status", None).await
    }

    pub async fn ip(&self) -> Result<IpResponse, LocalApiError> {
        self.call(Method::GET, "/localapi/v0/ip", None).await
    }

    pub async fn up(&self, req: &UpRequest) -> Result<(), LocalApiError> {
        let body = serde_json::to_vec(req)?;
        let _: serde_json::Value = self
            .call(Method::POST, "/localapi/v0/up", Some(body))
            .await?;
        Ok(())
    }

    pub async fn down(&self) -> Result<(), LocalApiError> {
        let _: serde_json::Value = self
            .call(Method::POST, "/localapi/v0/down", Some(Vec::new()))
            .await?;
        Ok(())
    }

    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, LocalApiError> {
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|source| LocalApiError::Connect {
                    path: self.socket.clone(),
                    source,
                })?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        let driver = tokio::spawn(conn);
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "local-tern")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.unwrap_or_default())))?;
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        let bytes = Limited::new(resp.into_body(), MAX_RESPONSE)
            .collect()
            .await
            .map_err(|e| LocalApiError::Body(e.to_string()))?
            .to_bytes();
        driver.abort();
        if !status.is_success() {
            let message = serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
            return Err(LocalApiError::Status { status, message });
        }
        Ok(serde_json::from_slice(&bytes)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{DataPlaneStatus, Status};
    use std::time::SystemTime;

    fn initial() -> Status {
        Status::initial(
            DataPlaneStatus {
                tun: "t".into(),
                port: 1,
                active: false,
                note: None,
                derp_latency_ms: Default::default(),
                drops: Default::default(),
            },
            SystemTime::UNIX_EPOCH,
        )
    }

    /// A server whose "daemon" accepts `up` only with a login server, and records commands.
    async fn start(dir: &Path) -> (Client, watch::Sender<Status>, mpsc::Receiver<Command>) {
        let sock = dir.join("tern.sock");
        let listener = bind(&sock, SocketOwner::default()).unwrap();
        let (status_tx, status_rx) = watch::channel(initial());
        let (cmd_tx, cmd_rx) = mpsc::channel(4);
        tokio::spawn(serve(listener, status_rx, cmd_tx));
        (Client::new(sock), status_tx, cmd_rx)
    }

    #[tokio::test]
    async fn socket_is_private_and_status_is_served() {
        let tmp = tempfile::tempdir().unwrap();
        let (client, status_tx, _cmds) = start(tmp.path()).await;
        let mode = std::fs::metadata(tmp.path().join("tern.sock"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(client.status().await.unwrap(), initial());
        let mut changed = initial();
        changed.peers.clear();
        changed.control.failed_attempts = 4;
        status_tx.send(changed.clone()).unwrap();
        assert_eq!(client.status().await.unwrap(), changed);
    }

    #[tokio::test]
    async fn up_is_forwarded_and_errors_come_back() {
        let tmp = tempfile::tempdir().unwrap();
        let (client, _status, mut cmds) = start(tmp.path()).await;
        let daemon = tokio::spawn(async move {
            while let Some(cmd) = cmds.recv().await {
                match cmd {
                    Command::Up(req, tx) if req.login_server.is_some() => {
                        let _ = tx.send(Ok(()));
                    }
                    Command::Up(_, tx) => {
                        let _ = tx.send(Err("no login server".into()));
                    }
                    Command::Down(tx) => {
                        let _ = tx.send(Ok(()));
                    }
                }
            }
        });
        let up = UpRequest {
            login_server: Some("http://127.0.0.1:1".into()),
            ..Default::default()
        };
        client.up(&up).await.unwrap();
        let err = client.up(&UpRequest::default()).await.unwrap_err();
        assert!(err.to_string().contains("no login server"), "{err}");
        client.down().await.unwrap();
        daemon.abort();
    }

    #[tokio::test]
    async fn bad_json_is_a_400_with_context() {
        let tmp = tempfile::tempdir().unwrap();
        let (client, _status, _cmds) = start(tmp.path()).await;
        let err = client
            .call::<serde_json::Value>(Method::POST, "/localapi/v0/up", Some(b"{oops".to_vec()))
            .await
            .unwrap_err();
        match err {
            LocalApiError::Status { status, message } => {
                assert_eq!(status, StatusCode::BAD_REQUEST);
                assert!(message.starts_with("bad JSON"), "{message}");
            }
            other => panic!("expected a 400, got {other}"),
        }
        let err = client
            .call::<serde_json::Value>(Method::GET, "/nope", None)
            .await
            .unwrap_err();
        assert!(matches!(
            err,
            LocalApiError::Status {
                status: StatusCode::NOT_FOUND,
                ..
            }
        ));
    }

    #[tokio::test]
    async fn a_second_daemon_cannot_steal_a_live_socket_but_replaces_a_stale_one() {
        let tmp = tempfile::tempdir().unwrap();
        let sock = tmp.path().join("tern.sock");
        let first = bind(&sock, SocketOwner::default()).unwrap();
        assert!(matches!(
            bind(&sock, SocketOwner::default()),
            Err(LocalApiError::InUse(_))
        ));
        drop(first);
        bind(&sock, SocketOwner::default()).expect("stale socket file must be replaced");
    }

    #[tokio::test]
    async fn client_without_daemon_says_so() {
        let tmp = tempfile::tempdir().unwrap();
        let err = Client::new(tmp.path().join("none.sock"))
            .status()
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("is `tern daemon` running?"),
            "{err}"
        );
    }
}
