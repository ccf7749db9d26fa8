//! A DERP client connection (–2.8).
//!
//! [`ClientCore`] is the sans-IO part: it builds the handshake frames, turns received frames
//! into [`Event`]s, queues Pong answers, and knows the read deadline. [`Reconnector`] is the
//! back-off policy (`n²·10 ms`, capped at 5 s, times a jitter factor in [0.5, 1.5)), driven by a
//! caller-supplied clock. [`DerpClient`] is the I/O edge: dial (plain HTTP or TLS), upgrade,
//! handshake, then one reader and one writer task.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::blocks::Blocks;
use super::frame::{self, ClientInfo, Frame, FrameError, PeerGoneReason, ServerInfo};
use crate::keys::{NodePrivate, NodePublic};
use crate::naclbox::SharedBox;

/// Go's client read timeout: two keep-alive periods without any frame.
pub const READ_TIMEOUT: Duration = Duration::from_secs(120);
/// Go's total connect budget (TCP + TLS + HTTP + DERP handshake).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Frames buffered towards the writer; beyond this, `try_send` drops (Go: 32).
pub const SEND_QUEUE: usize = 32;
/// Room made in the receive buffer before each read: under load one read takes many frames.
const READ_SPACE: usize = 64 << 10;
/// Receive blocks kept besides the one being read into, for reads while the engine still holds
/// packets of earlier ones: the reader may run as far ahead as the engine's delivery queue lets
/// it, and at 3 Gbit/s in the lab 15 spares still left ~2,000 page faults a second, 63 none.
/// 4 MiB per connection at most, and only under load: let go at the first read a second or
/// more after it (at the latest the server's next keep-alive).
const READ_SPARES: usize = 63;

/// Something the server told us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A relayed packet (WireGuard or disco) from `src`.
    Packet { src: NodePublic, packet: Bytes },
    /// `peer` left (or was never here, for `NotHere`).
    PeerGone {
        peer: NodePublic,
        reason: PeerGoneReason,
    },
    /// A watched peer connected (mesh clients only).
    PeerPresent {
        peer: NodePublic,
        endpoint: Option<SocketAddr>,
        flags: u8,
    },
    /// Answer to our Ping.
    Pong { data: [u8; 8] },
    /// Server health text; empty = healthy.
    Health { problem: String },
    /// The server is restarting.
    Restarting {
        reconnect_in: Duration,
        try_for: Duration,
    },
}

/// Relayed packets or a peer's departure, handed by a connection's reader straight to a
/// consumer that serves several connections (the engine), tagged with the connection's region.
#[derive(Debug)]
pub enum Delivery {
    /// The packets one read brought, in the order they came (one queue operation and one
    /// wakeup for a burst, not one per packet).
    Packets {
        region: u16,
        packets: PacketBatch,
    },
    PeerGone {
        region: u16,
        peer: NodePublic,
    },
}

/// The packets of one read. Dropping it drops the packets (so the reader can read into their
/// block again, see [`super::blocks`]) and hands the emptied vector back to the connection's
/// reader for a later read: a vector allocated per read and freed by the engine was, at 3 Gbit/s,
/// most of the page faults left on the DERP path.
pub struct PacketBatch {
    packets: Vec<(NodePublic, Bytes)>,
    spent: Arc<SpentBatches>,
}

impl std::ops::Deref for PacketBatch {
    type Target = [(NodePublic, Bytes)];
    fn deref(&self) -> &Self::Target {
        &self.packets
    }
}

impl Drop for PacketBatch {
    fn drop(&mut self) {
        self.spent.put(std::mem::take(&mut self.packets));
    }
}

impl std::fmt::Debug for PacketBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PacketBatch")
            .field("packets", &self.packets.len())
            .finish()
    }
}

/// Emptied batch vectors of one connection, waiting for the reader's next reads.
#[derive(Default)]
struct SpentBatches(std::sync::Mutex<Vec<Vec<(NodePublic, Bytes)>>>);

impl SpentBatches {
    /// Vectors kept: the engine's delivery queue may hold more batches, those are freed.
    const KEEP: usize = 64;
    /// Nor is a vector kept that grew past this many packets (a read of tiny frames).
    const KEEP_CAPACITY: usize = 1024;

    fn put(&self, mut packets: Vec<(NodePublic, Bytes)>) {
        packets.clear();
        if packets.capacity() == 0 || packets.capacity() > Self::KEEP_CAPACITY {
            return;
        }
        if let Ok(mut spent) = self.0.lock() {
            if spent.len() < Self::KEEP {
                spent.push(packets);
            }
        }
    }

    fn take(&self) -> Vec<(NodePublic, Bytes)> {
        self.0
            .lock()
            .ok()
            .and_then(|mut spent| spent.pop())
            .unwrap_or_default()
    }
}

/// Where [`DerpClient::connect_delivering`] sends packets and PeerGone frames.
#[derive(Clone, Debug)]
pub struct DeliverTo {
    pub region: u16,
    pub tx: mpsc::Sender<Delivery>,
}

/// Packets a consumer queues itself, one region's worth (the engine: its queue to a region,
/// which outlives connections). While a connection is up, its writer takes them from there
/// itself: no task between the queue and the socket.
pub type SendQueue = Arc<tokio::sync::Mutex<mpsc::Receiver<(NodePublic, Bytes)>>>;

/// Why a client connection failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("timed out")]
    Timeout,
    #[error("tls: {0}")]
    Tls(String),
    #[error("http upgrade: {0}")]
    Upgrade(String),
    #[error("frame: {0}")]
    Frame(#[from] FrameError),
    #[error("handshake: {0}")]
    Handshake(String),
    #[error("connection closed")]
    Closed,
    #[error("connection lost: {0}")]
    Disconnected(String),
    #[error("send queue full")]
    QueueFull,
}

/// The sans-IO state of one established connection.
#[derive(Debug)]
pub struct ClientCore {
    private_key: NodePrivate,
    server_key: Option<NodePublic>,
    shared: Option<SharedBox>,
    server_info: Option<ServerInfo>,
    last_recv: Instant,
    /// Frames the core wants written (Pong answers).
    outgoing: Vec<Frame>,
}

impl ClientCore {
    pub fn new(private_key: NodePrivate, now: Instant) -> Self {
        ClientCore {
            private_key,
            server_key: None,
            shared: None,
            server_info: None,
            last_recv: now,
            outgoing: Vec::new(),
        }
    }

    pub fn public_key(&self) -> NodePublic {
        self.private_key.public()
    }

    pub fn server_key(&self) -> Option<NodePublic> {
        self.server_key
    }

    /// ServerInfo once received (the server has registered us by then).
    pub fn server_info(&self) -> Option<&ServerInfo> {
        self.server_info.as_ref()
    }

    /// Learns the server key from the first frame.
    pub fn on_server_key(&mut self, frame: Frame) -> Result<(), ClientError> {
        let Frame::ServerKey { key } = frame else {
            return Err(ClientError::Handshake(format!(
                "first frame type {:#04x}, want ServerKey",
                frame.frame_type()
            )));
        };
        self.server_key = Some(key);
        self.shared = Some(SharedBox::new(self.private_key.as_bytes(), key.as_bytes()));
        Ok(())
    }

    /// The ClientInfo frame: our key and `info` sealed to the server.
    pub fn client_info_frame(&self, info: &ClientInfo) -> Result<Frame, ClientError> {
        let shared = self
            .shared
            .as_ref()
            .ok_or_else(|| ClientError::Handshake("no server key yet".into()))?;
        let sealed = shared.seal(info.to_json().as_bytes());
        Ok(Frame::ClientInfo {
            key: self.public_key(),
            sealed: Bytes::from(sealed),
        })
    }

    /// Handles one received frame; returns what the caller should surface.
    pub fn on_frame(&mut self, frame: Frame, now: Instant) -> Result<Option<Event>, ClientError> {
        self.last_recv = now;
        let event = match frame {
            Frame::RecvPacket { src, packet } => Some(Event::Packet { src, packet }),
            Frame::PeerGone { peer, reason } => Some(Event::PeerGone { peer, reason }),
            Frame::PeerPresent {
                peer,
                endpoint,
                flags,
            } => Some(Event::PeerPresent {
                peer,
                endpoint,
                flags,
            }),
            Frame::Ping { data } => {
                self.outgoing.push(Frame::Pong { data });
                None
            }
            Frame::Pong { data } => Some(Event::Pong { data }),
            Frame::Health { problem } => Some(Event::Health { problem }),
            Frame::Restarting {
                reconnect_in_ms,
                try_for_ms,
            } => Some(Event::Restarting {
                reconnect_in: Duration::from_millis(u64::from(reconnect_in_ms)),
                try_for: Duration::from_millis(u64::from(try_for_ms)),
            }),
            Frame::ServerInfo { sealed } => {
                self.open_server_info(&sealed)?;
                None
            }
            // After fast start the server still sends ServerKey: it must name the same key.
            Frame::ServerKey { key } if Some(key) != self.server_key => {
                return Err(ClientError::Handshake(
                    "ServerKey frame differs from the meta certificate's key".into(),
                ));
            }
            // KeepAlive is activity only; unknown types are skipped.
            _ => None,
        };
        Ok(event)
    }

    fn open_server_info(&mut self, sealed: &[u8]) -> Result<(), ClientError> {
        let shared = self
            .shared
            .as_ref()
            .ok_or_else(|| ClientError::Handshake("ServerInfo before ServerKey".into()))?;
        let json = shared
            .open(sealed)
            .map_err(|e| ClientError::Handshake(format!("ServerInfo box: {e}")))?;
        let info = ServerInfo::from_json(&json)
            .map_err(|e| ClientError::Handshake(format!("ServerInfo: {e}")))?;
        self.server_info = Some(info);
        Ok(())
    }

    /// Frames to write now (Pong answers).
    pub fn take_outgoing(&mut self) -> Vec<Frame> {
        std::mem::take(&mut self.outgoing)
    }

    /// When the connection counts as dead if nothing arrives.
    pub fn read_deadline(&self) -> Instant {
        self.last_recv + READ_TIMEOUT
    }
}

/// Back-off between reconnect attempts, as Go's derphttp reader loop does.
#[derive(Debug, Clone, Default)]
pub struct Reconnector {
    failures: u32,
    next_attempt: Option<Instant>,
}

impl Reconnector {
    /// Cap of the back-off before jitter.
    pub const MAX_DELAY: Duration = Duration::from_secs(5);

    /// Delay after `failures` consecutive failures, before jitter: `n²·10 ms`, capped at 5 s.
    pub fn base_delay(failures: u32) -> Duration {
        let n = u64::from(failures);
        Duration::from_millis(n.saturating_mul(n).saturating_mul(10)).min(Self::MAX_DELAY)
    }

    /// Records a failed attempt at `now`; `jitter` in [0.5, 1.5) scales the delay.
    /// Returns when the next attempt may start.
    pub fn on_failure(&mut self, now: Instant, jitter: f64) -> Instant {
        self.failures = self.failures.saturating_add(1);
        let delay = Self::base_delay(self.failures).mul_f64(jitter.clamp(0.5, 1.5));
        let at = now + delay;
        self.next_attempt = Some(at);
        at
    }

    /// A connection worked (a frame was read): start over.
    pub fn on_success(&mut self) {
        self.failures = 0;
        self.next_attempt = None;
    }

    /// Whether an attempt may start at `now`.
    pub fn ready(&self, now: Instant) -> bool {
        match self.next_attempt {
            Some(at) => now >= at,
            None => true,
        }
    }

    pub fn next_attempt(&self) -> Option<Instant> {
        self.next_attempt
    }

    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// A random jitter factor in [0.5, 1.5).
    pub fn random_jitter() -> f64 {
        0.5 + rand::random::<f64>()
    }
}

/// How to secure the connection.
#[derive(Debug, Clone)]
pub enum Transport {
    /// Plain HTTP (Go: `TS_DEBUG_USE_DERP_HTTP=1`, port 3340).
    Plain,
    /// TLS with SNI `server_name` (omitted if it is an IP literal).
    Tls {
        server_name: String,
        verify: TlsVerify,
    },
}

/// How to check the server certificate.
#[derive(Debug, Clone)]
pub enum TlsVerify {
    /// WebPKI validation against these roots, for the server name.
    Roots(Arc<rustls::RootCertStore>),
    /// WebPKI validation against these roots for `cert_name` instead of the server name (the
    /// DERP map's `CertName`: the name the certificate must carry while SNI stays `HostName`).
    RootsFor {
        roots: Arc<rustls::RootCertStore>,
        cert_name: String,
    },
    /// `sha256-raw:` pin: the leaf certificate's SHA-256 must match.
    PinSha256([u8; 32]),
    /// `InsecureForTests`: accept any certificate.
    Insecure,
}

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Address to dial.
    pub addr: SocketAddr,
    /// HTTP Host header (and TLS server name for `Transport::Tls`).
    pub host: String,
    pub transport: Transport,
    pub private_key: NodePrivate,
    /// Send NotePreferred(true) right after the handshake (home region).
    pub preferred: bool,
}

trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// An established DERP connection. Dropping it closes the connection.
pub struct DerpClient {
    server_key: NodePublic,
    server_info: ServerInfo,
    tx: mpsc::Sender<Frame>,
    events: mpsc::Receiver<Result<Event, String>>,
    /// Set once the reader delivered something to a [`DeliverTo`].
    delivered: Arc<AtomicBool>,
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
}

impl Drop for DerpClient {
    fn drop(&mut self) {
        self.reader.abort();
        self.writer.abort();
    }
}

impl DerpClient {
    /// Dials, upgrades and completes the handshake (waits for ServerInfo) within 10 s.
    pub async fn connect(config: &ClientConfig) -> Result<Self, ClientError> {
        tokio::time::timeout(
            CONNECT_TIMEOUT,
            Self::connect_inner(config, Queues::default()),
        )
        .await
        .map_err(|_| ClientError::Timeout)?
    }

    /// As [`connect`](Self::connect), but packets and PeerGone frames go to `deliver` as they
    /// are read (one queue less on the way to the engine), and with `send_from` the writer
    /// also sends what is queued there (a write error then ends the connection, reported by
    /// [`recv`](Self::recv)); [`recv`](Self::recv) yields the other events and the end of
    /// the connection.
    pub async fn connect_delivering(
        config: &ClientConfig,
        deliver: DeliverTo,
        send_from: Option<SendQueue>,
    ) -> Result<Self, ClientError> {
        let queues = Queues {
            deliver: Some(deliver),
            send_from,
        };
        tokio::time::timeout(CONNECT_TIMEOUT, Self::connect_inner(config, queues))
            .await
            .map_err(|_| ClientError::Timeout)?
    }

    /// Retries [`connect`](Self::connect) with the back-off of `reconnector` until it works or
    /// `attempts` attempts failed.
    pub async fn connect_with_retry(
        config: &ClientConfig,
        reconnector: &mut Reconnector,
        attempts: u32,
    ) -> Result<Self, ClientError> {
        let mut last_error = ClientError::Closed;
        for _ in 0..attempts {
            if let Some(at) = reconnector.next_attempt() {
                tokio::time::sleep_until(at.into()).await;
            }
            match Self::connect(config).await {
                Ok(client) => {
                    reconnector.on_success();
                    return Ok(client);
                }
                Err(e) => {
                    tracing::debug!(addr = %config.addr, error = %e, "derp connect failed");
                    reconnector.on_failure(Instant::now(), Reconnector::random_jitter());
                    last_error = e;
                }
            }
        }
        Err(last_error)
    }

    async fn connect_inner(config: &ClientConfig, queues: Queues) -> Result<Self, ClientError> {
        let tcp = crate::bypass::tcp_connect(config.addr).await?;
        let _ = tcp.set_nodelay(true);
        // Under TLS 1.3 a `derpkey` meta certificate gives the server key up front: fast start.
        let (mut stream, meta_key): (Box<dyn Io>, Option<NodePublic>) = match &config.transport {
            Transport::Plain => (Box::new(tcp), None),
            Transport::Tls {
                server_name,
                verify,
            } => {
                let tls = tls_connect(tcp, server_name, verify).await?;
                let key = meta_key_from_tls(&tls);
                (Box::new(tls), key)
            }
        };
        let mut core = ClientCore::new(config.private_key.clone(), Instant::now());
        let fast = if meta_key.is_some() {
            "Derp-Fast-Start: 1\r\n"
        } else {
            ""
        };
        let mut out = format!(
            "GET /derp HTTP/1.1\r\nHost: {}\r\nUser-Agent: tern\r\nConnection: Upgrade\r\n{fast}Upgrade: DERP\r\n\r\n",
            config.host
        )
        .into_bytes();
        let mut buf = BytesMut::with_capacity(4096);
        match meta_key {
            // The ServerKey frame still comes; `ClientCore` checks it against this key.
            Some(key) => core.on_server_key(Frame::ServerKey { key })?,
            None => {
                stream.write_all(&out).await?;
                stream.flush().await?;
                out.clear();
                read_upgrade_response(&mut stream, &mut buf).await?;
                let first = read_frame(&mut stream, &mut buf, frame::MAX_SERVER_KEY_LEN).await?;
                core.on_server_key(first)?;
            }
        }
        core.client_info_frame(&ClientInfo::regular())?
            .encode(&mut out);
        if config.preferred {
            Frame::NotePreferred { preferred: true }.encode(&mut out);
        }
        stream.write_all(&out).await?;
        stream.flush().await?;
        // Wait for ServerInfo: from then on the server routes packets to us.
        while core.server_info().is_none() {
            let frame = read_frame(&mut stream, &mut buf, frame::MAX_CLIENT_RECV_LEN).await?;
            let _ = core.on_frame(frame, Instant::now())?;
        }
        let server_key = core.server_key().ok_or(ClientError::Closed)?;
        let server_info = core.server_info().cloned().unwrap_or_default();

        let (read_half, write_half) = tokio::io::split(stream);
        let (tx, rx) = mpsc::channel(SEND_QUEUE);
        let (event_tx, events) = mpsc::channel(256);
        let delivered = Arc::new(AtomicBool::new(false));
        let outputs = ReaderOutputs {
            replies: tx.clone(),
            events: event_tx.clone(),
            deliver: queues.deliver,
            delivered: delivered.clone(),
            spent: Arc::default(),
        };
        let writer = tokio::spawn(write_loop(write_half, rx, queues.send_from, event_tx));
        let reader = tokio::spawn(read_loop(read_half, buf, core, outputs));
        Ok(DerpClient {
            server_key,
            server_info,
            tx,
            events,
            delivered,
            reader,
            writer,
        })
    }

    pub fn server_key(&self) -> NodePublic {
        self.server_key
    }

    /// Whether anything reached the [`DeliverTo`] of [`connect_delivering`](Self::connect_delivering).
    pub fn delivered_any(&self) -> bool {
        self.delivered.load(Ordering::Relaxed)
    }

    pub fn server_info(&self) -> &ServerInfo {
        &self.server_info
    }

    /// Sends `packet` to `dst`, waiting for queue space.
    pub async fn send(&self, dst: NodePublic, packet: Bytes) -> Result<(), ClientError> {
        if packet.len() > frame::MAX_PACKET_SIZE {
            return Err(ClientError::Frame(FrameError::PacketTooLarge(packet.len())));
        }
        self.tx
            .send(Frame::SendPacket { dst, packet })
            .await
            .map_err(|_| ClientError::Closed)
    }

    /// Sends `packet` to `dst` unless the queue is full (then the packet is dropped).
    pub fn try_send(&self, dst: NodePublic, packet: Bytes) -> Result<(), ClientError> {
        if packet.len() > frame::MAX_PACKET_SIZE {
            return Err(ClientError::Frame(FrameError::PacketTooLarge(packet.len())));
        }
        self.tx
            .try_send(Frame::SendPacket { dst, packet })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => ClientError::QueueFull,
                mpsc::error::TrySendError::Closed(_) => ClientError::Closed,
            })
    }

    /// Tells the server whether it is our home region.
    pub async fn note_preferred(&self, preferred: bool) -> Result<(), ClientError> {
        self.tx
            .send(Frame::NotePreferred { preferred })
            .await
            .map_err(|_| ClientError::Closed)
    }

    /// Sends a Ping; the Pong arrives as [`Event::Pong`].
    pub async fn ping(&self, data: [u8; 8]) -> Result<(), ClientError> {
        self.tx
            .send(Frame::Ping { data })
            .await
            .map_err(|_| ClientError::Closed)
    }

    /// Writes any frame as is (for tests of a server's handling of odd frames).
    pub async fn send_frame(&self, frame: Frame) -> Result<(), ClientError> {
        self.tx.send(frame).await.map_err(|_| ClientError::Closed)
    }

    /// The next event; `Err` once the connection has ended (with the reason).
    pub async fn recv(&mut self) -> Result<Event, ClientError> {
        match self.events.recv().await {
            Some(Ok(event)) => Ok(event),
            Some(Err(reason)) => Err(ClientError::Disconnected(reason)),
            None => Err(ClientError::Closed),
        }
    }
}

/// The consumer's own queues a connection reads into and writes from.
#[derive(Default)]
struct Queues {
    deliver: Option<DeliverTo>,
    send_from: Option<SendQueue>,
}

/// Where a connection's reader puts what it reads.
struct ReaderOutputs {
    /// The writer's queue, for Pong answers.
    replies: mpsc::Sender<Frame>,
    events: mpsc::Sender<Result<Event, String>>,
    deliver: Option<DeliverTo>,
    delivered: Arc<AtomicBool>,
    /// Batch vectors back from the consumer.
    spent: Arc<SpentBatches>,
}

impl ReaderOutputs {
    /// Passes `event` on; `false` once its consumer is gone. With a [`DeliverTo`], packets
    /// are gathered in `batch` (sent by [`Self::flush`]) and a PeerGone goes after them.
    async fn pass(&self, event: Event, batch: &mut Vec<(NodePublic, Bytes)>) -> bool {
        let Some(deliver) = &self.deliver else {
            return self.events.send(Ok(event)).await.is_ok();
        };
        let region = deliver.region;
        match event {
            Event::Packet { src, packet } => {
                batch.push((src, packet));
                true
            }
            Event::PeerGone { peer, reason } => {
                tracing::debug!(region, %peer, ?reason, "DERP peer gone");
                self.flush(batch).await
                    && self
                        .deliver(|region| Delivery::PeerGone { region, peer })
                        .await
            }
            other => self.events.send(Ok(other)).await.is_ok(),
        }
    }

    /// Delivers the gathered packets, if any; `false` once the consumer is gone.
    async fn flush(&self, batch: &mut Vec<(NodePublic, Bytes)>) -> bool {
        if batch.is_empty() {
            return true;
        }
        let packets = PacketBatch {
            packets: std::mem::replace(batch, self.spent.take()),
            spent: self.spent.clone(),
        };
        self.deliver(|region| Delivery::Packets { region, packets })
            .await
    }

    /// Hands `delivery(region)` to the [`DeliverTo`], if any; `false` once it is gone.
    async fn deliver(&self, delivery: impl FnOnce(u16) -> Delivery) -> bool {
        let Some(deliver) = &self.deliver else {
            return true;
        };
        if !self.delivered.load(Ordering::Relaxed) {
            self.delivered.store(true, Ordering::Relaxed);
        }
        deliver.tx.send(delivery(deliver.region)).await.is_ok()
    }
}

async fn read_loop<R: AsyncRead + Unpin>(
    mut reader: R,
    buf: BytesMut,
    mut core: ClientCore,
    outputs: ReaderOutputs,
) {
    let mut batch = Vec::new();
    let mut buf = Blocks::new(buf, READ_SPACE, READ_SPARES);
    let result: Result<(), ClientError> = async {
        loop {
            // Every frame one read brought, under one clock reading.
            let now = Instant::now();
            while let Some(frame) = frame::take(buf.bytes(), frame::MAX_CLIENT_RECV_LEN)? {
                let event = core.on_frame(frame, now)?;
                for reply in core.take_outgoing() {
                    // Best effort, as Go: a Pong is dropped when the send queue is full.
                    let _ = outputs.replies.try_send(reply);
                }
                if let Some(event) = event {
                    if !outputs.pass(event, &mut batch).await {
                        return Ok(());
                    }
                }
            }
            if !outputs.flush(&mut batch).await {
                return Ok(());
            }
            // Once per read, not per packet: the engine's arenas do it on their status tick.
            buf.let_spares_go_if_idle(now);
            buf.make_room(READ_SPACE, now);
            let read =
                tokio::time::timeout_at(core.read_deadline().into(), reader.read_buf(buf.bytes()));
            if read.await.map_err(|_| ClientError::Timeout)?? == 0 {
                return Err(ClientError::Closed);
            }
        }
    }
    .await;
    if let Err(e) = result {
        let _ = outputs.events.send(Err(e.to_string())).await;
    }
}

/// Bytes of frames gathered for one write.
const WRITE_BATCH: usize = 48 << 10;

/// Writes the client's frames and, with `send_from`, the packets queued there: whatever is
/// ready, up to [`WRITE_BATCH`], in one write. Ends when either queue closes or a write
/// fails (told to `events`, so the connection's owner learns of it).
async fn write_loop<W: AsyncWrite + Unpin>(
    mut writer: W,
    mut frames: mpsc::Receiver<Frame>,
    send_from: Option<SendQueue>,
    events: mpsc::Sender<Result<Event, String>>,
) {
    // Held for the connection's life: the next connection's writer waits for this one's end.
    let mut packets = match send_from {
        Some(queue) => Some(queue.lock_owned().await),
        None => None,
    };
    let mut out = BytesMut::with_capacity(64 << 10);
    loop {
        tokio::select! {
            biased;
            frame = frames.recv() => match frame {
                Some(frame) => frame.encode(&mut out),
                None => return,
            },
            packet = next_queued(&mut packets) => match packet {
                Some((dst, packet)) => put_queued(&mut out, &dst, &packet),
                None => return,
            },
        }
        while out.len() < WRITE_BATCH {
            if let Ok(frame) = frames.try_recv() {
                frame.encode(&mut out);
            } else if let Some(Ok((dst, packet))) = packets.as_mut().map(|q| q.try_recv()) {
                put_queued(&mut out, &dst, &packet);
            } else {
                break;
            }
        }
        let written = match writer.write_all(&out).await {
            Ok(()) => writer.flush().await,
            Err(e) => Err(e),
        };
        if let Err(e) = written {
            let _ = events.send(Err(format!("write: {e}"))).await;
            return;
        }
        out.clear();
    }
}

/// The next packet of a [`SendQueue`]; never, without one.
async fn next_queued(
    queue: &mut Option<tokio::sync::OwnedMutexGuard<mpsc::Receiver<(NodePublic, Bytes)>>>,
) -> Option<(NodePublic, Bytes)> {
    match queue {
        Some(queue) => queue.recv().await,
        None => std::future::pending().await,
    }
}

/// A queued packet as a SendPacket frame; one too large for a frame is dropped (the engine
/// never queues one: WireGuard packets are far smaller).
fn put_queued(out: &mut BytesMut, dst: &NodePublic, packet: &[u8]) {
    if packet.len() > frame::MAX_PACKET_SIZE {
        tracing::debug!(len = packet.len(), "queued DERP packet too large; dropped");
        return;
    }
    frame::put_send_packet(out, dst, packet);
}

async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
    max_len: usize,
) -> Result<Frame, ClientError> {
    loop {
        if let Some(frame) = frame::decode(buf, max_len)? {
            return Ok(frame);
        }
        if reader.read_buf(buf).await? == 0 {
            return Err(ClientError::Closed);
        }
    }
}

/// Reads the HTTP response head, requires 101, leaves any following bytes in `buf`.
async fn read_upgrade_response<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
) -> Result<(), ClientError> {
    let head_len = loop {
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break pos + 4;
        }
        if buf.len() > 16 << 10 {
            return Err(ClientError::Upgrade("response head too large".into()));
        }
        if stream.read_buf(buf).await? == 0 {
            return Err(ClientError::Upgrade("eof before response head".into()));
        }
    };
    let head = buf.split_to(head_len);
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    match response.parse(&head) {
        Ok(httparse::Status::Complete(_)) if response.code == Some(101) => Ok(()),
        Ok(httparse::Status::Complete(_)) => {
            Err(ClientError::Upgrade(format!("status {:?}", response.code)))
        }
        _ => Err(ClientError::Upgrade("malformed response head".into())),
    }
}

async fn tls_connect(
    tcp: TcpStream,
    server_name: &str,
    verify: &TlsVerify,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, ClientError> {
    let provider = crate::tls::provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Tls(e.to_string()))?;
    let config = match verify {
        TlsVerify::Roots(roots) => builder
            .with_root_certificates(roots.clone())
            .with_no_client_auth(),
        TlsVerify::RootsFor { roots, cert_name } => {
            let expected = rustls::pki_types::ServerName::try_from(cert_name.clone())
                .map_err(|e| ClientError::Tls(format!("CertName {cert_name:?}: {e}")))?;
            let verifier = crate::trust::WebPkiWrapper::new(roots.clone(), Some(expected), false)
                .map_err(|e| ClientError::Tls(e.to_string()))?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(verifier))
                .with_no_client_auth()
        }
        TlsVerify::PinSha256(pin) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinVerifier {
                pin: Some(*pin),
                provider,
            }))
            .with_no_client_auth(),
        TlsVerify::Insecure => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinVerifier {
                pin: None,
                provider,
            }))
            .with_no_client_auth(),
    };
    let name = rustls::pki_types::ServerName::try_from(server_name.to_string())
        .map_err(|e| ClientError::Tls(format!("server name {server_name:?}: {e}")))?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| ClientError::Tls(e.to_string()))
}

/// Accepts a server certificate by SHA-256 pin of the leaf (or any, with `pin: None`).
/// Handshake signatures are still verified, so the server must hold the certificate's key.
#[derive(Debug)]
struct PinVerifier {
    pin: Option<[u8; 32]>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        if let Some(pin) = &self.pin {
            let digest = ring::digest::digest(&ring::digest::SHA256, end_entity.as_ref());
            if digest.as_ref() != pin {
                return Err(rustls::Error::General(
                    "certificate does not match the sha256 pin".into(),
                ));
            }
        }
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The server key from a `derpkey` meta certificate, if TLS 1.3 was negotiated (under TLS 1.2 the
/// certificates travel in clear, so Go ignores it there too).
fn meta_key_from_tls(tls: &tokio_rustls::client::TlsStream<TcpStream>) -> Option<NodePublic> {
    let conn = tls.get_ref().1;
    if conn.protocol_version() != Some(rustls::ProtocolVersion::TLSv1_3) {
        return None;
    }
    conn.peer_certificates()?
        .iter()
        .find_map(|cert| meta_cert_key(cert.as_ref()))
}

/// The key named by a meta certificate's common name `derpkey<64 hex>`, found in its DER.
pub fn meta_cert_key(der: &[u8]) -> Option<NodePublic> {
    const CN_OID: [u8; 5] = [0x06, 0x03, 0x55, 0x04, 0x03];
    const PREFIX: &[u8] = b"derpkey";
    der.windows(CN_OID.len())
        .enumerate()
        .filter(|(_, w)| *w == CN_OID)
        .find_map(|(i, _)| {
            let rest = der.get(i + CN_OID.len()..)?;
            let (tag, len) = (*rest.first()?, usize::from(*rest.get(1)?));
            // UTF8String or PrintableString of exactly "derpkey" + 64 hex digits.
            if !matches!(tag, 0x0c | 0x13) || len != PREFIX.len() + 64 {
                return None;
            }
            let hex_part = rest.get(2..2 + len)?.strip_prefix(PREFIX)?;
            let text = std::str::from_utf8(hex_part).ok()?;
            crate::keys::parse_bare_hex(text)
                .ok()
                .map(NodePublic::from_bytes)
        })
}

/// SHA-256 of a certificate, for [`TlsVerify::PinSha256`].
pub fn sha256(der: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dropped_batch_drops_its_packets_and_returns_its_vector() {
        let spent = Arc::new(SpentBatches::default());
        let src = NodePrivate::generate().public();
        let packet = Bytes::from(vec![7u8; 100]);
        let mut packets = spent.take();
        packets.extend((0..40).map(|_| (src, packet.clone())));
        let room = packets.as_ptr();
        let batch = PacketBatch {
            packets,
            spent: spent.clone(),
        };
        assert_eq!(batch.len(), 40);
        assert!(batch
            .iter()
            .all(|(from, p)| *from == src && p[..] == packet[..]));
        drop(batch);
        // The packets went with the batch: `packet` is the last handle to its bytes again.
        assert!(packet.is_unique());
        // The next read fills the same vector, empty.
        let again = spent.take();
        assert!(again.is_empty());
        assert_eq!(again.as_ptr(), room);
        assert!(
            spent.take().capacity() == 0,
            "one vector was returned, not two"
        );
    }

    #[test]
    fn spent_batches_keep_a_bounded_number_of_modest_vectors() {
        let spent = SpentBatches::default();
        for _ in 0..SpentBatches::KEEP + 10 {
            spent.put(Vec::with_capacity(50));
        }
        spent.put(Vec::with_capacity(SpentBatches::KEEP_CAPACITY + 1));
        let kept = spent.0.lock().unwrap();
        assert_eq!(kept.len(), SpentBatches::KEEP);
        assert!(kept
            .iter()
            .all(|v| v.capacity() <= SpentBatches::KEEP_CAPACITY));
    }

    #[test]
    fn meta_cert_key_is_read_from_the_common_name() {
        let key = NodePrivate::generate().public();
        let der = crate::derp::server::meta_cert(&key).unwrap();
        assert_eq!(meta_cert_key(der.as_ref()), Some(key));
        let (_, leaf) = crate::derp::server::tls_self_signed("x.test", &key).unwrap();
        assert_eq!(meta_cert_key(&leaf), None);
        // Cut inside the first (issuer) common name: nothing complete is left.
        let at = der
            .as_ref()
            .windows(7)
            .position(|w| w == b"derpkey")
            .unwrap();
        assert_eq!(meta_cert_key(&der.as_ref()[..at + 20]), None);
    }

    #[test]
    fn core_checks_a_late_server_key_after_fast_start() {
        let (mut core, server) = core_pair();
        let now = Instant::now();
        assert_eq!(
            core.on_frame(
                Frame::ServerKey {
                    key: server.public()
                },
                now
            )
            .unwrap(),
            None
        );
        let other = NodePrivate::generate().public();
        assert!(core.on_frame(Frame::ServerKey { key: other }, now).is_err());
    }

    #[test]
    fn backoff_grows_quadratically_and_caps() {
        assert_eq!(Reconnector::base_delay(0), Duration::ZERO);
        assert_eq!(Reconnector::base_delay(1), Duration::from_millis(10));
        assert_eq!(Reconnector::base_delay(3), Duration::from_millis(90));
        assert_eq!(Reconnector::base_delay(22), Duration::from_millis(4840));
        assert_eq!(Reconnector::base_delay(23), Duration::from_secs(5));
        assert_eq!(Reconnector::base_delay(u32::MAX), Duration::from_secs(5));
    }

    #[test]
    fn reconnector_on_fake_clock() {
        let t0 = Instant::now();
        let mut r = Reconnector::default();
        assert!(r.ready(t0));
        let at = r.on_failure(t0, 1.0);
        assert_eq!(at, t0 + Duration::from_millis(10));
        assert!(!r.ready(t0 + Duration::from_millis(9)));
        assert!(r.ready(t0 + Duration::from_millis(10)));
        let t1 = t0 + Duration::from_millis(10);
        assert_eq!(r.on_failure(t1, 0.5), t1 + Duration::from_millis(20));
        let t2 = t1 + Duration::from_millis(20);
        assert_eq!(r.on_failure(t2, 1.5), t2 + Duration::from_millis(135));
        // Out-of-range jitter is clamped.
        let t3 = t2 + Duration::from_secs(1);
        assert_eq!(r.on_failure(t3, 9.0), t3 + Duration::from_millis(240));
        for _ in 0..50 {
            r.on_failure(t3, 1.0);
        }
        assert_eq!(r.next_attempt(), Some(t3 + Duration::from_secs(5)));
        r.on_success();
        assert_eq!(r.failures(), 0);
        assert!(r.ready(t3));
        assert_eq!(r.on_failure(t3, 1.0), t3 + Duration::from_millis(10));
    }

    #[test]
    fn random_jitter_in_range() {
        for _ in 0..1000 {
            let j = Reconnector::random_jitter();
            assert!((0.5..1.5).contains(&j));
        }
    }

    fn core_pair() -> (ClientCore, NodePrivate) {
        let server = NodePrivate::generate();
        let mut core = ClientCore::new(NodePrivate::generate(), Instant::now());
        core.on_server_key(Frame::ServerKey {
            key: server.public(),
        })
        .unwrap();
        (core, server)
    }

    #[test]
    fn core_handshake_frames_open_on_the_server_side() {
        let (core, server) = core_pair();
        let Frame::ClientInfo { key, sealed } =
            core.client_info_frame(&ClientInfo::regular()).unwrap()
        else {
            panic!("not ClientInfo");
        };
        assert_eq!(key, core.public_key());
        let json = crate::naclbox::open(server.as_bytes(), key.as_bytes(), &sealed).unwrap();
        assert_eq!(json, br#"{"version":2,"CanAckPings":true}"#);
    }

    #[test]
    fn core_rejects_wrong_first_frame_and_bad_server_info() {
        let mut core = ClientCore::new(NodePrivate::generate(), Instant::now());
        assert!(core.on_server_key(Frame::KeepAlive).is_err());
        let (mut core, _server) = core_pair();
        let forged = crate::naclbox::seal(
            NodePrivate::generate().as_bytes(),
            core.public_key().as_bytes(),
            b"{}",
        );
        assert!(core
            .on_frame(
                Frame::ServerInfo {
                    sealed: Bytes::from(forged)
                },
                Instant::now()
            )
            .is_err());
    }

    #[test]
    fn core_answers_pings_and_tracks_deadline() {
        let (mut core, server) = core_pair();
        let t0 = Instant::now();
        let sealed = crate::naclbox::seal(
            server.as_bytes(),
            core.public_key().as_bytes(),
            b"{\"version\":2}",
        );
        assert_eq!(
            core.on_frame(
                Frame::ServerInfo {
                    sealed: Bytes::from(sealed)
                },
                t0
            )
            .unwrap(),
            None
        );
        assert_eq!(core.server_info().unwrap().version, 2);
        let t1 = t0 + Duration::from_secs(30);
        assert_eq!(
            core.on_frame(Frame::Ping { data: [5; 8] }, t1).unwrap(),
            None
        );
        assert_eq!(core.take_outgoing(), vec![Frame::Pong { data: [5; 8] }]);
        assert!(core.take_outgoing().is_empty());
        assert_eq!(core.read_deadline(), t1 + READ_TIMEOUT);
        let src = NodePublic::from_bytes([1; 32]);
        assert_eq!(
            core.on_frame(
                Frame::RecvPacket {
                    src,
                    packet: Bytes::from_static(b"x")
                },
                t1
            )
            .unwrap(),
            Some(Event::Packet {
                src,
                packet: Bytes::from_static(b"x")
            })
        );
        assert_eq!(core.on_frame(Frame::KeepAlive, t1).unwrap(), None);
        let unknown = Frame::Unknown {
            frame_type: 0x0b,
            payload: Bytes::new(),
        };
        assert_eq!(core.on_frame(unknown, t1).unwrap(), None);
    }
}
