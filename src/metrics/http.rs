//! `tern daemon --metrics-listen ADDR`: `GET /metrics` over HTTP/1.1 for Prometheus, rendered
//! from the current status snapshot on each scrape. Off by default. Bounded like every listener
//! of tern's: [`MAX_CONNS`] at once (more are closed at accept), [`CONN_LIFETIME`] per
//! connection, every accept error survived.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use crate::status::Status;

/// Scrapers served at once.
pub const MAX_CONNS: usize = 64;
/// A connection is closed after this long, whatever it is doing (idle or slow clients).
pub const CONN_LIFETIME: Duration = Duration::from_secs(30);
/// The exposition format's content type.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Serves until the task is dropped.
pub async fn serve(listener: TcpListener, status: watch::Receiver<Status>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNS));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::debug!(error = %e, "metrics accept");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue; // dropped: closed
        };
        let status = status.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let reply = answer(&req, &status.borrow());
                async move { Ok::<_, Infallible>(reply) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONN_LIFETIME, conn).await;
            drop(permit);
        });
    }
}

/// `GET /metrics` (also HEAD); 404 elsewhere, 405 for other methods.
pub fn answer<B>(req: &Request<B>, status: &Status) -> Response<Full<Bytes>> {
    let reply = |code: StatusCode, body: String| {
        Response::builder()
            .status(code)
            .header("content-type", CONTENT_TYPE)
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
    };
    if req.uri().path() != "/metrics" {
        return reply(StatusCode::NOT_FOUND, "not found: try /metrics\n".into());
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "GET /metrics\n".into());
    }
    reply(StatusCode::OK, super::render(status))
}
