//! One WebSocket connection, written over any `Sink`/`Stream` of WebSocket messages so it can be
//! driven by channels in tests.
//!
//! Three parts run concurrently inside the connection's task:
//! - the **reader** reads client frames, validates them, publishes sends (in arrival order) and
//!   keeps their JetStream acks (and history requests) in flight, at most
//!   `max_inflight_sends` at a time: at the limit it stops reading the socket;
//! - the **forwarder** pushes every payload of the user's subject into the outgoing queue;
//! - the **writer** owns the socket sink: it drains the outgoing queue, pings every heartbeat
//!   interval, and writes the close frame.
//!
//! Everything sent to the client goes through one bounded queue (`outgoing_queue`). When it is
//! full the client reads too slowly: the connection is closed with 4001 and the client resyncs.

use std::{
    future::Future,
    num::NonZeroU32,
    sync::{Arc, OnceLock},
    time::Duration,
};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes};
use bytes::Bytes;
use chat_protocol::{
    api::{self, HistoryReply, HistoryRequest, InboundMessage},
    frames::{ClientFrame, ErrorCode, ErrorFrame, Limits, PROTOCOL_VERSION, ServerFrame, close},
    ids::{ClientMsgId, ConvId, DeviceId, UserId},
};
use futures::{
    FutureExt, Sink, SinkExt, Stream, StreamExt, future::BoxFuture, stream::FuturesUnordered,
};
use governor::{DefaultKeyedRateLimiter, Quota, clock::Clock};
use tokio::{
    sync::mpsc::{self, error::TrySendError},
    time::{Instant, MissedTickBehavior, sleep_until, timeout, timeout_at},
};
use tokio_util::sync::CancellationToken;

use crate::{
    Config,
    backend::{Backend, BackendError, Pushes},
    metrics,
};

/// History page size when the client does not ask for one.
pub(crate) const DEFAULT_HISTORY_LIMIT: u32 = 50;

/// After a frame that was too large, the rest of it is still unread in the kernel; closing the
/// socket right away would answer with a reset that can destroy our close frame in flight.
const UNREAD_INPUT_LINGER: Duration = Duration::from_millis(500);

const UNAVAILABLE: &str = "the message could not be stored right now; retry with the same id";

/// Per-connection settings, derived from [`Config`].
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub max_body_bytes: usize,
    pub outgoing_queue: usize,
    pub max_inflight: usize,
    pub heartbeat_interval: Duration,
    pub heartbeat_timeout: Duration,
    pub publish_timeout: Duration,
    pub history_timeout: Duration,
    pub close_timeout: Duration,
    pub shutdown_grace: Duration,
    pub limits: Limits,
}

impl Settings {
    pub(crate) fn from_config(c: &Config) -> Self {
        Self {
            max_body_bytes: c.max_body_bytes,
            outgoing_queue: c.outgoing_queue.max(1),
            max_inflight: c.max_inflight_sends.max(1),
            heartbeat_interval: Config::ms(c.heartbeat_interval_ms),
            heartbeat_timeout: Config::ms(c.heartbeat_timeout_ms),
            publish_timeout: Config::ms(c.publish_timeout_ms),
            history_timeout: Config::ms(c.history_timeout_ms),
            close_timeout: Config::ms(c.close_timeout_ms),
            shutdown_grace: Config::ms(c.shutdown_grace_ms),
            limits: Limits {
                max_frame_bytes: c.max_frame_bytes,
                max_body_bytes: c.max_body_bytes,
                sends_per_second: c.sends_per_second,
                send_burst: c.send_burst,
                history_page_max: api::HISTORY_PAGE_MAX,
            },
        }
    }
}

/// What all connections of this gateway share.
pub(crate) struct Shared {
    pub settings: Settings,
    /// Send rate per user (all of the user's connections on this gateway).
    pub limiter: DefaultKeyedRateLimiter<UserId>,
    /// Cancelled when the gateway shuts down: connections finish in-flight work and close 1001.
    pub shutdown: CancellationToken,
}

impl Shared {
    pub(crate) fn new(config: &Config, shutdown: CancellationToken) -> Self {
        let per_second = NonZeroU32::new(config.sends_per_second).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(config.send_burst).unwrap_or(NonZeroU32::MIN);
        Self {
            settings: Settings::from_config(config),
            limiter: DefaultKeyedRateLimiter::keyed(
                Quota::per_second(per_second).allow_burst(burst),
            ),
            shutdown,
        }
    }
}

/// Who is on the other end.
pub(crate) struct Session {
    pub user: UserId,
    pub device: DeviceId,
    /// When the token's `exp` passes.
    pub expires_at: Instant,
}

/// Why a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CloseReason {
    GoingAway,
    MessageTooBig,
    HeartbeatTimeout,
    SlowConsumer,
    TokenExpired,
    /// The client sent a close frame; tungstenite answers it.
    ClientClosed,
    /// The socket failed or ended without a close frame: nothing can be sent.
    Gone,
}

impl CloseReason {
    /// The close code to send, if a close frame can and must be sent.
    fn code(self) -> Option<u16> {
        match self {
            Self::GoingAway => Some(close::GOING_AWAY),
            Self::MessageTooBig => Some(close::MESSAGE_TOO_BIG),
            Self::HeartbeatTimeout => Some(close::HEARTBEAT_TIMEOUT),
            Self::SlowConsumer => Some(close::SLOW_CONSUMER),
            Self::TokenExpired => Some(close::TOKEN_EXPIRED),
            Self::ClientClosed | Self::Gone => None,
        }
    }

    /// Metric label and close frame reason text.
    fn label(self) -> &'static str {
        match self {
            Self::GoingAway => "going_away",
            Self::MessageTooBig => "message_too_big",
            Self::HeartbeatTimeout => "heartbeat_timeout",
            Self::SlowConsumer => "slow_consumer",
            Self::TokenExpired => "token_expired",
            Self::ClientClosed => "client_closed",
            Self::Gone => "gone",
        }
    }
}

/// An entry of the outgoing queue.
enum Outbound {
    Frame(Utf8Bytes),
    /// Close after everything queued before it (graceful shutdown).
    Close(CloseReason),
}

/// The connection's close decision: the first reason wins; `stop` tells every part to end now.
#[derive(Default)]
struct Closer {
    stop: CancellationToken,
    reason: OnceLock<CloseReason>,
}

impl Closer {
    /// Closes now, dropping whatever is still queued.
    fn close(&self, reason: CloseReason) {
        let _ = self.reason.set(reason);
        self.stop.cancel();
    }

    fn reason(&self) -> CloseReason {
        self.reason.get().copied().unwrap_or(CloseReason::Gone)
    }
}

/// Serves one connection until it closes. `pushes` is the user's subscription, opened before
/// the upgrade so nothing published after `hello` is missed.
#[tracing::instrument(name = "connection", skip_all, fields(user = %session.user, device = %session.device))]
pub(crate) async fn serve<B, W, R>(
    backend: B,
    shared: Arc<Shared>,
    session: Session,
    pushes: Pushes,
    sink: W,
    mut stream: R,
) where
    B: Backend,
    W: Sink<Message> + Unpin + Send,
    W::Error: std::fmt::Display,
    R: Stream<Item = Result<Message, axum::Error>> + Unpin + Send,
{
    let settings = &shared.settings;
    let (out_tx, out_rx) = mpsc::channel(settings.outgoing_queue);
    let closer = Closer::default();
    let hello = ServerFrame::Hello {
        version: PROTOCOL_VERSION,
        user: session.user.to_string(),
        device: session.device.to_string(),
        heartbeat_ms: settings.heartbeat_interval.as_millis() as u64,
        limits: settings.limits.clone(),
    };
    // The queue is new and holds at least one frame: `hello` is always first.
    let _ = out_tx.try_send(Outbound::Frame(encode(&hello)));
    tracing::info!("connection opened");

    let mut reader = Reader {
        backend,
        shared: &shared,
        session: &session,
        out: out_tx.clone(),
        closer: &closer,
        inflight: FuturesUnordered::new(),
    };
    tokio::join!(
        reader.run(&mut stream),
        write_loop(sink, out_rx, &closer, settings),
        forward(pushes, out_tx, &closer, &shared.shutdown),
    );
    drop(reader);

    let reason = closer.reason();
    linger(&mut stream, reason, settings.close_timeout).await;
    ::metrics::counter!(metrics::CLOSES, "reason" => reason.label()).increment(1);
    if reason == CloseReason::SlowConsumer {
        ::metrics::counter!(metrics::SLOW_CONSUMERS).increment(1);
    }
    tracing::info!(reason = reason.label(), "connection closed");
}

/// After our close frame: wait (bounded) for the client's close frame or the end of the stream,
/// so the client reads our close frame before the socket goes away.
async fn linger<R>(stream: &mut R, reason: CloseReason, limit: Duration)
where
    R: Stream<Item = Result<Message, axum::Error>> + Unpin,
{
    match reason {
        CloseReason::Gone => {}
        CloseReason::MessageTooBig => tokio::time::sleep(limit.min(UNREAD_INPUT_LINGER)).await,
        _ => {
            let _ = timeout(limit, async {
                while let Some(Ok(msg)) = stream.next().await {
                    if matches!(msg, Message::Close(_)) {
                        break;
                    }
                }
            })
            .await;
        }
    }
}

struct Reader<'a, B> {
    backend: B,
    shared: &'a Shared,
    session: &'a Session,
    out: mpsc::Sender<Outbound>,
    closer: &'a Closer,
    /// Acks and history replies in flight, each resolving to the frame that answers it.
    inflight: FuturesUnordered<BoxFuture<'static, ServerFrame>>,
}

impl<B: Backend> Reader<'_, B> {
    async fn run<R>(&mut self, stream: &mut R)
    where
        R: Stream<Item = Result<Message, axum::Error>> + Unpin,
    {
        match self.read(stream).await {
            Ok(()) => self.finish().await,
            Err(reason) => self.closer.close(reason),
        }
    }

    /// Reads until the connection must close (`Err`) or the gateway shuts down (`Ok`).
    async fn read<R>(&mut self, stream: &mut R) -> Result<(), CloseReason>
    where
        R: Stream<Item = Result<Message, axum::Error>> + Unpin,
    {
        let (shared, session, closer) = (self.shared, self.session, self.closer);
        let settings = &shared.settings;
        let mut last_seen = Instant::now();
        loop {
            // At `max_inflight` the socket is not read (backpressure), and the client's silence
            // meanwhile is ours: the heartbeat deadline is off and restarts when reading resumes.
            let reading = self.inflight.len() < settings.max_inflight;
            tokio::select! {
                biased;
                _ = closer.stop.cancelled() => return Err(closer.reason()),
                _ = shared.shutdown.cancelled() => return Ok(()),
                _ = sleep_until(session.expires_at) => return Err(CloseReason::TokenExpired),
                _ = sleep_until(last_seen + settings.heartbeat_timeout), if reading => {
                    return Err(CloseReason::HeartbeatTimeout);
                }
                Some(frame) = self.inflight.next(), if !self.inflight.is_empty() => {
                    if !reading {
                        last_seen = Instant::now();
                    }
                    self.enqueue(frame).await?;
                }
                msg = stream.next(), if reading => {
                    last_seen = Instant::now();
                    self.on_message(msg).await?;
                }
            }
        }
    }

    /// Graceful shutdown: stop reading, answer what is in flight, then close 1001 after the
    /// queued frames, all within the shutdown grace period.
    async fn finish(&mut self) {
        let _ = self.closer.reason.set(CloseReason::GoingAway);
        let deadline = Instant::now() + self.shared.settings.shutdown_grace;
        let drained = timeout_at(deadline, async {
            while let Some(frame) = self.inflight.next().await {
                count_error(&frame);
                if self
                    .out
                    .send(Outbound::Frame(encode(&frame)))
                    .await
                    .is_err()
                {
                    return false;
                }
            }
            self.out
                .send(Outbound::Close(CloseReason::GoingAway))
                .await
                .is_ok()
        })
        .await;
        if drained != Ok(true) {
            self.closer.close(CloseReason::GoingAway);
        }
    }

    async fn on_message(
        &mut self,
        msg: Option<Result<Message, axum::Error>>,
    ) -> Result<(), CloseReason> {
        match msg {
            None => Err(CloseReason::Gone),
            Some(Err(err)) if is_too_big(&err) => Err(CloseReason::MessageTooBig),
            Some(Err(err)) => {
                tracing::debug!(error = %err, "websocket read failed");
                Err(CloseReason::Gone)
            }
            Some(Ok(Message::Text(text))) => self.on_frame(text.as_bytes()).await,
            Some(Ok(Message::Binary(_))) => {
                metrics::frame_in("invalid");
                self.enqueue(ServerFrame::Error(ErrorFrame::new(
                    ErrorCode::InvalidFrame,
                    "frames are JSON text messages, not binary",
                )))
                .await
            }
            // Liveness only; tungstenite answers pings itself.
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => Ok(()),
            Some(Ok(Message::Close(_))) => Err(CloseReason::ClientClosed),
        }
    }

    async fn on_frame(&mut self, bytes: &[u8]) -> Result<(), CloseReason> {
        let frame = match ClientFrame::decode(bytes) {
            Ok(frame) => frame,
            Err(err) => {
                metrics::frame_in("invalid");
                return self
                    .enqueue(ServerFrame::Error(ErrorFrame::new(err.code, err.message)))
                    .await;
            }
        };
        match frame {
            ClientFrame::Send { conv, id, body } => {
                metrics::frame_in("send");
                self.on_send(conv, id, body).await
            }
            ClientFrame::History {
                req,
                conv,
                before,
                after,
                limit,
            } => {
                metrics::frame_in("history");
                self.on_history(req, conv, before, after, limit).await
            }
            ClientFrame::Ping => {
                metrics::frame_in("ping");
                self.enqueue(ServerFrame::Pong).await
            }
        }
    }

    /// Validates a send, then publishes it to `CHAT_IN`; `sent` follows when JetStream acks.
    async fn on_send(&mut self, conv: String, id: String, body: String) -> Result<(), CloseReason> {
        let (shared, session) = (self.shared, self.session);
        let settings = &shared.settings;
        let user = &session.user;
        let conv_id = match ConvId::parse(&conv) {
            Ok(c) => c,
            Err(e) => {
                return self
                    .send_failed(ErrorCode::InvalidId, e.to_string(), id, conv, None)
                    .await;
            }
        };
        if let Err(e) = ClientMsgId::parse(&id) {
            return self
                .send_failed(ErrorCode::InvalidId, e.to_string(), id, conv, None)
                .await;
        }
        if body.len() > settings.max_body_bytes {
            let message = format!(
                "body is {} bytes; the limit is {}",
                body.len(),
                settings.max_body_bytes
            );
            return self
                .send_failed(ErrorCode::BodyTooLarge, message, id, conv, None)
                .await;
        }
        if !conv_id.is_member(user) {
            let message = "you are not a member of this conversation".to_owned();
            return self
                .send_failed(ErrorCode::NotMember, message, id, conv, None)
                .await;
        }
        if let Err(not_until) = shared.limiter.check_key(user) {
            let wait = not_until.wait_time_from(shared.limiter.clock().now());
            let retry_ms = u64::try_from(wait.as_micros().div_ceil(1000)).unwrap_or(u64::MAX);
            let message = "send rate exceeded; retry later with the same id".to_owned();
            return self
                .send_failed(
                    ErrorCode::RateLimited,
                    message,
                    id,
                    conv,
                    Some(retry_ms.max(1)),
                )
                .await;
        }

        let ts = chat_protocol::now_ms();
        let msg_id = api::dedupe_id(conv_id.as_str(), user.as_str(), &id);
        let payload = serde_json::to_vec(&InboundMessage {
            conv: conv.clone(),
            from: user.to_string(),
            device: session.device.to_string(),
            id: id.clone(),
            body,
            ts,
        })
        .expect("inbound messages always serialize");
        // Publishes leave in arrival order (awaited here); their acks are awaited concurrently.
        let publish_timeout = settings.publish_timeout;
        let deadline = Instant::now() + publish_timeout;
        let ack = match timeout_at(
            deadline,
            self.backend.publish(&conv_id, msg_id, payload.into()),
        )
        .await
        {
            Ok(Ok(ack)) => ack,
            Ok(Err(err)) => {
                tracing::warn!(conv = %conv_id, error = %err, "publish failed");
                return self
                    .send_failed(ErrorCode::Unavailable, UNAVAILABLE.into(), id, conv, None)
                    .await;
            }
            Err(_) => {
                tracing::warn!(conv = %conv_id, "publish timed out");
                return self
                    .send_failed(ErrorCode::Unavailable, UNAVAILABLE.into(), id, conv, None)
                    .await;
            }
        };
        self.inflight.push(
            async move {
                let err = match timeout_at(deadline, ack).await {
                    Ok(Ok(())) => {
                        ::metrics::counter!(metrics::SENDS_PUBLISHED).increment(1);
                        return ServerFrame::Sent { id, conv, ts };
                    }
                    Ok(Err(err)) => err,
                    Err(_) => BackendError::TimedOut(publish_timeout),
                };
                tracing::warn!(conv = %conv, error = %err, "send not stored");
                metrics::send_error(ErrorCode::Unavailable);
                let mut frame = ErrorFrame::new(ErrorCode::Unavailable, UNAVAILABLE);
                frame.id = Some(id);
                frame.conv = Some(conv);
                ServerFrame::Error(frame)
            }
            .boxed(),
        );
        Ok(())
    }

    fn send_failed(
        &self,
        code: ErrorCode,
        message: String,
        id: String,
        conv: String,
        retry_after_ms: Option<u64>,
    ) -> impl Future<Output = Result<(), CloseReason>> + Send + use<'_, B> {
        metrics::send_error(code);
        let mut frame = ErrorFrame::new(code, message);
        frame.id = Some(id);
        frame.conv = Some(conv);
        frame.retry_after_ms = retry_after_ms;
        self.enqueue(ServerFrame::Error(frame))
    }

    /// Validates a history request and asks the history responders, without blocking reads.
    async fn on_history(
        &mut self,
        req: String,
        conv: String,
        before: Option<u64>,
        after: Option<u64>,
        limit: Option<u32>,
    ) -> Result<(), CloseReason> {
        let fail = |code, message: String, req: String, conv: String| {
            let mut frame = ErrorFrame::new(code, message);
            frame.req = Some(req);
            frame.conv = Some(conv);
            ServerFrame::Error(frame)
        };
        if let Err(e) = ClientMsgId::parse(&req) {
            let message = e.to_string().replace("client message id", "request id");
            return self
                .enqueue(fail(ErrorCode::InvalidId, message, req, conv))
                .await;
        }
        let conv_id = match ConvId::parse(&conv) {
            Ok(c) => c,
            Err(e) => {
                return self
                    .enqueue(fail(ErrorCode::InvalidId, e.to_string(), req, conv))
                    .await;
            }
        };
        if !conv_id.is_member(&self.session.user) {
            let message = "you are not a member of this conversation".to_owned();
            return self
                .enqueue(fail(ErrorCode::NotMember, message, req, conv))
                .await;
        }
        let request = HistoryRequest {
            user: self.session.user.to_string(),
            conv: conv.clone(),
            before,
            after,
            limit: limit
                .unwrap_or(DEFAULT_HISTORY_LIMIT)
                .clamp(1, api::HISTORY_PAGE_MAX),
        };
        let backend = self.backend.clone();
        let deadline = Instant::now() + self.shared.settings.history_timeout;
        self.inflight.push(
            async move {
                let (code, message) = match timeout_at(deadline, backend.history(&request)).await {
                    Ok(Ok(HistoryReply::Page { messages, more })) => {
                        return ServerFrame::History {
                            req,
                            conv,
                            messages,
                            more,
                        };
                    }
                    Ok(Ok(HistoryReply::Error(mut frame))) => {
                        frame.req = Some(req);
                        frame.conv.get_or_insert(conv);
                        return ServerFrame::Error(frame);
                    }
                    Ok(Err(err @ BackendError::BadReply(_))) => {
                        tracing::error!(error = %err, "history reply not understood");
                        (ErrorCode::Internal, "history failed")
                    }
                    Ok(Err(err)) => {
                        tracing::warn!(error = %err, "history unavailable");
                        (
                            ErrorCode::Unavailable,
                            "history is unavailable right now; retry",
                        )
                    }
                    Err(_) => {
                        tracing::warn!("history timed out");
                        (
                            ErrorCode::Unavailable,
                            "history is unavailable right now; retry",
                        )
                    }
                };
                fail(code, message.to_owned(), req, conv)
            }
            .boxed(),
        );
        Ok(())
    }

    /// Queues a frame for the writer; a full queue means a slow consumer. (The future borrows
    /// only the queue, not the reader, which is not `Sync`.)
    fn enqueue(
        &self,
        frame: ServerFrame,
    ) -> impl Future<Output = Result<(), CloseReason>> + Send + use<'_, B> {
        count_error(&frame);
        let (out, text) = (&self.out, encode(&frame));
        async move { push_frame(out, text).await }
    }
}

/// Pushes the user's subject into the queue, unchanged: those payloads are complete frames.
async fn forward(
    mut pushes: Pushes,
    out: mpsc::Sender<Outbound>,
    closer: &Closer,
    shutdown: &CancellationToken,
) {
    loop {
        let payload = tokio::select! {
            biased;
            _ = closer.stop.cancelled() => return,
            _ = shutdown.cancelled() => return,
            payload = pushes.next() => payload,
        };
        let Some(payload) = payload else {
            tracing::warn!("push subscription ended");
            closer.close(CloseReason::GoingAway);
            return;
        };
        let Ok(text) = Utf8Bytes::try_from(payload) else {
            tracing::warn!("dropping a push that is not utf-8");
            continue;
        };
        if let Err(reason) = push_frame(&out, text).await {
            closer.close(reason);
            return;
        }
    }
}

/// Owns the sink: queued frames, pings, and finally the close frame.
async fn write_loop<W>(
    mut sink: W,
    mut queue: mpsc::Receiver<Outbound>,
    closer: &Closer,
    settings: &Settings,
) where
    W: Sink<Message> + Unpin,
    W::Error: std::fmt::Display,
{
    let every = settings.heartbeat_interval;
    let mut ping = tokio::time::interval_at(Instant::now() + every, every);
    ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let reason = loop {
        let msg = tokio::select! {
            biased;
            _ = closer.stop.cancelled() => break closer.reason(),
            // Before the queue, so a busy connection still pings (at most once an interval).
            _ = ping.tick() => Message::Ping(Bytes::new()),
            item = queue.recv() => match item {
                Some(Outbound::Frame(text)) => Message::Text(text),
                Some(Outbound::Close(reason)) => break reason,
                None => break closer.reason(),
            },
        };
        let is_frame = matches!(msg, Message::Text(_));
        // Flush only when nothing else is queued, so bursts share writes.
        let write = async {
            sink.feed(msg).await?;
            if queue.is_empty() {
                sink.flush().await?;
            }
            Ok::<_, W::Error>(())
        };
        tokio::select! {
            biased;
            // A blocked write is abandoned when the connection must close now.
            _ = closer.stop.cancelled() => break closer.reason(),
            res = write => match res {
                Ok(()) if is_frame => ::metrics::counter!(metrics::FRAMES_OUT).increment(1),
                Ok(()) => {}
                Err(err) => {
                    tracing::debug!(error = %err, "websocket write failed");
                    break CloseReason::Gone;
                }
            },
        }
    };
    closer.close(reason);
    let reason = closer.reason();
    let closing = async {
        match reason.code() {
            Some(code) => {
                let frame = CloseFrame {
                    code,
                    reason: Utf8Bytes::from_static(reason.label()),
                };
                sink.send(Message::Close(Some(frame))).await
            }
            // Flushes tungstenite's automatic answer to the client's close frame.
            None if reason == CloseReason::ClientClosed => sink.close().await,
            None => Ok(()),
        }
    };
    match timeout(settings.close_timeout, closing).await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => tracing::debug!(error = %err, "close frame not sent"),
        Err(_) => tracing::debug!("close frame not delivered in time"),
    }
}

/// Queues a frame. When the queue is full, the writer (which shares this task) gets one turn to
/// drain it into the socket first: still full then means the socket takes no more data, that is
/// a slow consumer, and not merely a burst that arrived within one poll.
async fn push_frame(out: &mpsc::Sender<Outbound>, text: Utf8Bytes) -> Result<(), CloseReason> {
    let item = match out.try_send(Outbound::Frame(text)) {
        Ok(()) => return Ok(()),
        Err(TrySendError::Closed(_)) => return Err(CloseReason::Gone),
        Err(TrySendError::Full(item)) => item,
    };
    tokio::task::yield_now().await;
    match out.try_send(item) {
        Ok(()) => Ok(()),
        Err(TrySendError::Full(_)) => {
            tracing::info!("outgoing queue full, closing slow consumer");
            Err(CloseReason::SlowConsumer)
        }
        Err(TrySendError::Closed(_)) => Err(CloseReason::Gone),
    }
}

fn encode(frame: &ServerFrame) -> Utf8Bytes {
    Utf8Bytes::from(serde_json::to_string(frame).expect("server frames always serialize"))
}

fn count_error(frame: &ServerFrame) {
    if let ServerFrame::Error(e) = frame {
        metrics::error_frame(e.code);
    }
}

/// Whether a read failed because the client's message exceeded `max_frame_bytes`.
fn is_too_big(err: &axum::Error) -> bool {
    std::error::Error::source(err)
        .and_then(|e| e.downcast_ref::<tungstenite::Error>())
        .is_some_and(|e| matches!(e, tungstenite::Error::Capacity(_)))
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use futures::channel::mpsc as chan;
    use tokio::sync::oneshot;

    use super::*;

    /// A publish the fake backend saw; the test decides its ack.
    struct Published {
        conv: String,
        msg_id: String,
        payload: Bytes,
        ack: oneshot::Sender<Result<(), BackendError>>,
    }

    #[derive(Clone)]
    struct FakeBackend {
        published: tokio::sync::mpsc::UnboundedSender<Published>,
        history: Arc<Mutex<Vec<HistoryRequest>>>,
    }

    impl Backend for FakeBackend {
        async fn publish(
            &self,
            conv: &ConvId,
            msg_id: String,
            payload: Bytes,
        ) -> Result<crate::backend::PendingAck, BackendError> {
            let (ack, rx) = oneshot::channel();
            let _ = self.published.send(Published {
                conv: conv.to_string(),
                msg_id,
                payload,
                ack,
            });
            Ok(async move { rx.await.unwrap_or(Err(BackendError::NoResponders)) }.boxed())
        }

        async fn history(&self, request: &HistoryRequest) -> Result<HistoryReply, BackendError> {
            self.history.lock().unwrap().push(request.clone());
            Ok(HistoryReply::Page {
                messages: vec![],
                more: false,
            })
        }
    }

    struct Client {
        to_server: chan::Sender<Result<Message, axum::Error>>,
        from_server: chan::Receiver<Message>,
        pushes: chan::Sender<Bytes>,
        published: tokio::sync::mpsc::UnboundedReceiver<Published>,
        history: Arc<Mutex<Vec<HistoryRequest>>>,
        shutdown: CancellationToken,
        task: tokio::task::JoinHandle<()>,
    }

    fn config() -> Config {
        Config {
            heartbeat_interval_ms: 30_000,
            heartbeat_timeout_ms: 90_000,
            sends_per_second: 1000,
            send_burst: 1000,
            ..Config::default()
        }
    }

    /// Starts a connection of `alice` over channels. `sink_buffer` 0 makes the "socket" block
    /// as soon as the client stops reading.
    fn connect(config: Config, sink_buffer: usize, token_ttl: Duration) -> Client {
        let (to_server, server_in) = chan::channel(16);
        let (server_out, from_server) = chan::channel(sink_buffer);
        let (pushes, pushes_rx) = chan::channel(1024);
        let (published_tx, published) = tokio::sync::mpsc::unbounded_channel();
        let history = Arc::new(Mutex::new(Vec::new()));
        let shutdown = CancellationToken::new();
        let backend = FakeBackend {
            published: published_tx,
            history: history.clone(),
        };
        let session = Session {
            user: UserId::parse("alice").unwrap(),
            device: DeviceId::parse("phone").unwrap(),
            expires_at: Instant::now() + token_ttl,
        };
        let shared = Arc::new(Shared::new(&config, shutdown.clone()));
        let task = tokio::spawn(serve(
            backend,
            shared,
            session,
            pushes_rx.boxed(),
            server_out,
            server_in,
        ));
        Client {
            to_server,
            from_server,
            pushes,
            published,
            history,
            shutdown,
            task,
        }
    }

    impl Client {
        async fn send(&mut self, json: &str) {
            self.to_server
                .send(Ok(Message::Text(json.into())))
                .await
                .unwrap();
        }

        /// The next message, pings included.
        async fn next_message(&mut self) -> Message {
            timeout(Duration::from_secs(600), self.from_server.next())
                .await
                .expect("a message in time")
                .expect("connection still open")
        }

        /// The next frame, skipping pings.
        async fn frame(&mut self) -> ServerFrame {
            loop {
                match self.next_message().await {
                    Message::Text(t) => return serde_json::from_str(&t).unwrap(),
                    Message::Ping(_) => continue,
                    other => panic!("expected a frame, got {other:?}"),
                }
            }
        }

        async fn close_code(&mut self) -> u16 {
            loop {
                match self.next_message().await {
                    Message::Close(Some(frame)) => return frame.code,
                    Message::Close(None) => panic!("close without code"),
                    _ => continue,
                }
            }
        }

        async fn published(&mut self) -> Published {
            timeout(Duration::from_secs(600), self.published.recv())
                .await
                .expect("a publish in time")
                .expect("backend alive")
        }
    }

    fn send_json(id: &str) -> String {
        format!(r#"{{"type":"send","conv":"dm~alice~bob","id":"{id}","body":"hi {id}"}}"#)
    }

    const HOUR: Duration = Duration::from_secs(3600);

    #[tokio::test(start_paused = true)]
    async fn hello_first_then_pong_and_pushes_unchanged() {
        let mut c = connect(config(), 16, HOUR);
        match c.frame().await {
            ServerFrame::Hello {
                user,
                device,
                limits,
                ..
            } => {
                assert_eq!((user.as_str(), device.as_str()), ("alice", "phone"));
                assert_eq!(limits.history_page_max, api::HISTORY_PAGE_MAX);
            }
            other => panic!("expected hello, got {other:?}"),
        }
        c.send(r#"{"type":"ping"}"#).await;
        assert_eq!(c.frame().await, ServerFrame::Pong);
        let push = r#"{"type":"message","conv":"dm~alice~bob","seq":1,"from":"bob","id":"x","ts":1,"body":"yo"}"#;
        c.pushes
            .send(Bytes::from_static(push.as_bytes()))
            .await
            .unwrap();
        match c.next_message().await {
            Message::Text(t) => assert_eq!(t.as_str(), push),
            other => panic!("expected the push, got {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn publishes_in_order_and_answers_acks_as_they_come() {
        let mut c = connect(config(), 16, HOUR);
        c.frame().await;
        for id in ["m1", "m2", "m3"] {
            c.send(&send_json(id)).await;
        }
        let mut pending = Vec::new();
        for id in ["m1", "m2", "m3"] {
            let p = c.published().await;
            assert_eq!(p.conv, "dm~alice~bob");
            assert_eq!(p.msg_id, api::dedupe_id("dm~alice~bob", "alice", id));
            let inbound: InboundMessage = serde_json::from_slice(&p.payload).unwrap();
            assert_eq!(
                (inbound.id.as_str(), inbound.device.as_str()),
                (id, "phone")
            );
            assert_eq!(inbound.from, "alice");
            pending.push(p.ack);
        }
        // Acks complete out of order; each `sent` follows its own ack.
        let m3 = pending.pop().unwrap();
        m3.send(Ok(())).unwrap();
        assert!(matches!(c.frame().await, ServerFrame::Sent { id, .. } if id == "m3"));
        for ack in pending {
            ack.send(Ok(())).unwrap();
        }
        assert!(matches!(c.frame().await, ServerFrame::Sent { id, .. } if id == "m1"));
        assert!(matches!(c.frame().await, ServerFrame::Sent { id, .. } if id == "m2"));
    }

    #[tokio::test(start_paused = true)]
    async fn stops_reading_while_max_inflight_acks_are_outstanding() {
        let mut c = connect(
            Config {
                max_inflight_sends: 2,
                ..config()
            },
            16,
            HOUR,
        );
        c.frame().await;
        for id in ["m1", "m2", "m3"] {
            c.send(&send_json(id)).await;
        }
        c.send(r#"{"type":"ping"}"#).await;
        let m1 = c.published().await;
        let _m2 = c.published().await;
        // The third frame is not even read while two acks are outstanding.
        assert!(
            timeout(Duration::from_secs(1), c.published.recv())
                .await
                .is_err()
        );
        m1.ack.send(Ok(())).unwrap();
        assert!(matches!(c.frame().await, ServerFrame::Sent { id, .. } if id == "m1"));
        let m3 = c.published().await;
        assert_eq!(m3.msg_id, api::dedupe_id("dm~alice~bob", "alice", "m3"));
        // m2 and m3 outstanding: the ping is still unread until one of them completes.
        assert!(timeout(Duration::from_secs(1), c.frame()).await.is_err());
        m3.ack.send(Ok(())).unwrap();
        assert!(matches!(c.frame().await, ServerFrame::Sent { id, .. } if id == "m3"));
        assert_eq!(c.frame().await, ServerFrame::Pong);
    }

    #[tokio::test(start_paused = true)]
    async fn stalled_acks_do_not_count_as_client_silence() {
        let mut c = connect(
            Config {
                max_inflight_sends: 1,
                heartbeat_interval_ms: 1000,
                heartbeat_timeout_ms: 3000,
                publish_timeout_ms: 5000,
                ..config()
            },
            16,
            HOUR,
        );
        c.frame().await;
        c.send(&send_json("m1")).await;
        let _never_acked = c.published().await;
        // The client answers every ping, but its pongs stay unread until m1 times out.
        let mut answered_after_timeout = 0;
        while answered_after_timeout < 5 {
            match c.next_message().await {
                Message::Ping(_) => {
                    c.to_server
                        .send(Ok(Message::Pong(Bytes::new())))
                        .await
                        .unwrap();
                }
                Message::Text(t) => {
                    let frame: ServerFrame = serde_json::from_str(&t).unwrap();
                    assert!(
                        matches!(&frame, ServerFrame::Error(e) if e.code == ErrorCode::Unavailable),
                        "{frame:?}"
                    );
                    answered_after_timeout = 1;
                    continue;
                }
                other => panic!("unexpected {other:?}"),
            }
            if answered_after_timeout > 0 {
                answered_after_timeout += 1;
            }
        }
        assert!(!c.task.is_finished());
    }

    #[tokio::test(start_paused = true)]
    async fn far_future_token_expiry_is_fine() {
        let mut c = connect(config(), 16, Duration::from_secs(86_400 * 365 * 30));
        c.frame().await;
        c.send(r#"{"type":"ping"}"#).await;
        assert_eq!(c.frame().await, ServerFrame::Pong);
    }

    #[tokio::test(start_paused = true)]
    async fn failed_or_late_acks_answer_unavailable_with_the_id() {
        let mut c = connect(config(), 16, HOUR);
        c.frame().await;
        c.send(&send_json("m1")).await;
        c.published()
            .await
            .ack
            .send(Err(BackendError::NoResponders))
            .unwrap();
        match c.frame().await {
            ServerFrame::Error(e) => {
                assert_eq!(e.code, ErrorCode::Unavailable);
                assert_eq!(e.id.as_deref(), Some("m1"));
            }
            other => panic!("expected unavailable, got {other:?}"),
        }
        c.send(&send_json("m2")).await;
        let _never_acked = c.published().await;
        match c.frame().await {
            ServerFrame::Error(e) => {
                assert_eq!(e.code, ErrorCode::Unavailable);
                assert_eq!(e.id.as_deref(), Some("m2"));
            }
            other => panic!("expected unavailable, got {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn history_is_validated_and_clamped() {
        let mut c = connect(config(), 16, HOUR);
        c.frame().await;
        c.send(r#"{"type":"history","req":"r.1","conv":"dm~alice~bob"}"#)
            .await;
        match c.frame().await {
            ServerFrame::Error(e) => {
                assert_eq!(e.code, ErrorCode::InvalidId);
                assert_eq!(e.req.as_deref(), Some("r.1"));
            }
            other => panic!("expected invalid_id, got {other:?}"),
        }
        c.send(r#"{"type":"history","req":"r2","conv":"dm~bob~carol"}"#)
            .await;
        assert!(matches!(c.frame().await, ServerFrame::Error(e) if e.code == ErrorCode::NotMember));
        c.send(r#"{"type":"history","req":"r3","conv":"dm~alice~bob","limit":100000,"before":9}"#)
            .await;
        assert_eq!(
            c.frame().await,
            ServerFrame::History {
                req: "r3".into(),
                conv: "dm~alice~bob".into(),
                messages: vec![],
                more: false
            }
        );
        c.send(r#"{"type":"history","req":"r4","conv":"dm~alice~bob"}"#)
            .await;
        c.frame().await;
        let seen = c.history.lock().unwrap().clone();
        assert_eq!(seen.len(), 2);
        assert_eq!(
            (seen[0].limit, seen[0].before),
            (api::HISTORY_PAGE_MAX, Some(9))
        );
        assert_eq!(seen[1].limit, DEFAULT_HISTORY_LIMIT);
        assert_eq!(seen[0].user, "alice");
    }

    #[tokio::test(start_paused = true)]
    async fn silent_client_is_pinged_then_closed_with_4000() {
        let mut c = connect(
            Config {
                heartbeat_interval_ms: 1000,
                heartbeat_timeout_ms: 3000,
                ..config()
            },
            16,
            HOUR,
        );
        let start = Instant::now();
        c.frame().await;
        assert!(matches!(c.next_message().await, Message::Ping(_)));
        assert_eq!(c.close_code().await, close::HEARTBEAT_TIMEOUT);
        assert!(start.elapsed() >= Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn answering_pings_keeps_the_connection() {
        let mut c = connect(
            Config {
                heartbeat_interval_ms: 1000,
                heartbeat_timeout_ms: 3000,
                ..config()
            },
            16,
            HOUR,
        );
        c.frame().await;
        for _ in 0..10 {
            assert!(matches!(c.next_message().await, Message::Ping(_)));
            c.to_server
                .send(Ok(Message::Pong(Bytes::new())))
                .await
                .unwrap();
        }
        assert!(!c.task.is_finished());
    }

    #[tokio::test(start_paused = true)]
    async fn full_queue_closes_with_4001() {
        let mut c = connect(
            Config {
                outgoing_queue: 2,
                ..config()
            },
            0,
            HOUR,
        );
        // The client reads nothing while pushes keep coming.
        for i in 0..20 {
            let frame = format!(r#"{{"type":"pong","n":{i}}}"#);
            c.pushes.send(Bytes::from(frame)).await.unwrap();
        }
        assert_eq!(c.close_code().await, close::SLOW_CONSUMER);
        timeout(Duration::from_secs(60), c.task)
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn expired_token_closes_with_4002() {
        let mut c = connect(config(), 16, Duration::from_secs(5));
        c.frame().await;
        let start = Instant::now();
        assert_eq!(c.close_code().await, close::TOKEN_EXPIRED);
        assert!(start.elapsed() >= Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_answers_inflight_sends_then_closes_1001() {
        let mut c = connect(config(), 16, HOUR);
        c.frame().await;
        c.send(&send_json("m1")).await;
        let m1 = c.published().await;
        c.shutdown.cancel();
        tokio::task::yield_now().await;
        m1.ack.send(Ok(())).unwrap();
        assert!(matches!(c.frame().await, ServerFrame::Sent { id, .. } if id == "m1"));
        assert_eq!(c.close_code().await, close::GOING_AWAY);
    }

    #[tokio::test(start_paused = true)]
    async fn oversized_message_closes_with_1009() {
        let mut c = connect(config(), 16, HOUR);
        c.frame().await;
        let too_long =
            tungstenite::Error::Capacity(tungstenite::error::CapacityError::MessageTooLong {
                size: 1 << 20,
                max_size: 1 << 17,
            });
        c.to_server
            .send(Err(axum::Error::new(too_long)))
            .await
            .unwrap();
        assert_eq!(c.close_code().await, close::MESSAGE_TOO_BIG);
    }

    #[tokio::test(start_paused = true)]
    async fn client_close_ends_the_connection() {
        let mut c = connect(config(), 16, HOUR);
        c.frame().await;
        c.to_server.send(Ok(Message::Close(None))).await.unwrap();
        timeout(Duration::from_secs(60), c.task)
            .await
            .unwrap()
            .unwrap();
    }
}
