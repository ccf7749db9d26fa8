//! One node's map stream: the full map, then deltas and keep-alives (§5.3, §5.4), and the
//! node's online state around it.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::SendStream;
use http::{Response, StatusCode};
use tokio::sync::{broadcast, oneshot};
use tracing::{debug, info, warn};

use super::{count, mapper, now_unix, Event, SessionEntry, Shared};
use crate::control::framing::{encode_map_response, Compression};
use crate::control::tailcfg::MapResponse;

/// Starts a streaming map session for `node_id` in its own task.
pub(super) fn start(
    shared: Arc<Shared>,
    node_id: u64,
    compression: Compression,
    mut respond: SendResponse<Bytes>,
) {
    let Ok(resp) = Response::builder().status(StatusCode::OK).body(()) else {
        return;
    };
    let send = match respond.send_response(resp, false) {
        Ok(send) => send,
        Err(err) => return debug!(node_id, error = %err, "map stream closed before the response"),
    };
    let (cancel_tx, cancel_rx) = oneshot::channel();
    let session_id = shared.next_session.fetch_add(1, Ordering::Relaxed);
    // A new stream for a node replaces its older one: dropping the old sender ends it.
    shared.sessions().insert(
        node_id,
        SessionEntry {
            id: session_id,
            _cancel: cancel_tx,
        },
    );
    tokio::spawn(async move {
        let events = shared.events.subscribe();
        go_online(&shared, node_id);
        let mut stream = MapStream {
            shared: shared.clone(),
            node_id,
            compression,
            send,
            state: mapper::StreamState::default(),
        };
        stream.run(events, cancel_rx).await;
        session_ended(shared, node_id, session_id);
    });
}

/// Answers a non-streaming, non-lite map request with one full map.
pub(super) fn send_one(
    shared: &Arc<Shared>,
    node_id: u64,
    compression: Compression,
    mut respond: SendResponse<Bytes>,
) {
    let Ok(resp) = Response::builder().status(StatusCode::OK).body(()) else {
        return;
    };
    let Ok(send) = respond.send_response(resp, false) else {
        return;
    };
    let mut stream = MapStream {
        shared: shared.clone(),
        node_id,
        compression,
        send,
        state: mapper::StreamState::default(),
    };
    if stream.send_full().is_ok() {
        let _ = stream.send.send_data(Bytes::new(), true);
    }
}

fn go_online(shared: &Shared, node_id: u64) {
    if shared.tailnet().set_online(node_id, true, now_unix()) {
        info!(node_id, "node online");
        shared.publish(Event::Online(node_id, true));
    }
}

/// After a stream ends: unless the node reconnects within the grace period, it goes offline,
/// and an ephemeral node is removed.
fn session_ended(shared: Arc<Shared>, node_id: u64, session_id: u64) {
    {
        let mut sessions = shared.sessions();
        if sessions.get(&node_id).is_none_or(|s| s.id != session_id) {
            return; // replaced by a newer stream
        }
        sessions.remove(&node_id);
    }
    tokio::spawn(async move {
        tokio::time::sleep(shared.offline_grace).await;
        if shared.sessions().contains_key(&node_id) {
            return;
        }
        let (went_offline, ephemeral) = {
            let mut tailnet = shared.tailnet();
            let changed = tailnet.set_online(node_id, false, now_unix());
            (changed, tailnet.node(node_id).is_some_and(|n| n.ephemeral))
        };
        if went_offline {
            info!(node_id, "node offline");
            shared.publish(Event::Online(node_id, false));
        }
        if ephemeral {
            match shared.tailnet().remove_node(node_id) {
                Ok(true) => {
                    info!(node_id, "ephemeral node removed");
                    shared.publish(Event::Removed(node_id));
                }
                Ok(false) => {}
                Err(err) => warn!(node_id, error = %err, "removing ephemeral node failed"),
            }
        }
    });
}

/// The writing side of one map stream.
struct MapStream {
    shared: Arc<Shared>,
    node_id: u64,
    compression: Compression,
    send: SendStream<Bytes>,
    state: mapper::StreamState,
}

/// Why a stream stopped.
struct Closed;

impl MapStream {
    async fn run(
        &mut self,
        mut events: broadcast::Receiver<Event>,
        mut cancel: oneshot::Receiver<()>,
    ) {
        if self.send_full().is_err() {
            return;
        }
        // The client's watchdog fires after 120 s of silence; the config keeps this at most 60 s.
        let period = self.shared.keep_alive;
        let mut keep_alive = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        loop {
            let result = tokio::select! {
                event = events.recv() => match event {
                    Ok(event) => self.send_delta(&event),
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        debug!(node_id = self.node_id, missed, "map stream lagged; resending the full map");
                        self.send_full()
                    }
                    Err(broadcast::error::RecvError::Closed) => Err(Closed),
                },
                _ = keep_alive.tick() => self.send_message(&mapper::keep_alive()).map(|_| count(&self.shared.sent.keep_alives)),
                _ = &mut cancel => {
                    debug!(node_id = self.node_id, "map stream replaced by a newer one");
                    Err(Closed)
                }
                reset = std::future::poll_fn(|cx| self.send.poll_reset(cx)) => {
                    debug!(node_id = self.node_id, reason = ?reset.ok(), "map stream closed by the client");
                    Err(Closed)
                }
            };
            if result.is_err() {
                return;
            }
        }
    }

    fn send_full(&mut self) -> Result<(), Closed> {
        let message = mapper::full_map(&self.shared.tailnet(), self.node_id, &mut self.state)
            .ok_or(Closed)?;
        self.send_message(&message)?;
        count(&self.shared.sent.full_maps);
        Ok(())
    }

    fn send_delta(&mut self, event: &Event) -> Result<(), Closed> {
        if *event == Event::Removed(self.node_id) {
            return Err(Closed);
        }
        let delta = mapper::delta(&self.shared.tailnet(), self.node_id, event, &mut self.state);
        if let Some(message) = delta {
            self.send_message(&message)?;
            count(&self.shared.sent.deltas);
        }
        Ok(())
    }

    fn send_message(&mut self, message: &MapResponse) -> Result<(), Closed> {
        let frame = encode_map_response(message, self.compression).map_err(|err| {
            warn!(node_id = self.node_id, error = %err, "encoding a map message failed");
            Closed
        })?;
        self.send
            .send_data(Bytes::from(frame), false)
            .map_err(|err| {
                debug!(node_id = self.node_id, error = %err, "map stream write failed");
                Closed
            })
    }
}
