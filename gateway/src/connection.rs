//! One WebSocket connection, written over any `Sink`/`Stream` of WebSocket messages so it can be
//! driven by channels in tests.
//!
//! Three parts run concurrently inside the connection's task:
//! - the **reader** reads client frames, validates them, publishes sends and receipts (in arrival
//!   order) and keeps their JetStream acks (and history, sync and receipts requests) in flight,
//!   at most `max_inflight_sends` at a time: at the limit it stops reading the socket;
//! - the **forwarder** pushes every payload of the user's subject into the outgoing queue, and
//!   answers delivery confirmation requests once their frame is queued;
//! - the **writer** owns the socket sink: it drains the outgoing queue, pings every heartbeat
//!   interval, and writes the close frame.
//!
//! Everything sent to the client goes through one bounded queue (`outgoing_queue`). When it is
//! full the client reads too slowly: the connection is closed with 4001 and the client resyncs.

use std::{
    collections::BTreeMap,
    future::Future,
    num::NonZeroU32,
    sync::{Arc, OnceLock},
    time::Duration,
};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes};
use bytes::Bytes;
use chat_protocol::{
    api::{
        self, ConversationsReply, ConversationsRequest, GroupInfoReply, GroupInfoRequest,
        HistoryReply, HistoryRequest, Inbound, InboundGroup, InboundMessage, InboundReceipt,
        ReceiptsReply, ReceiptsRequest, SyncReply, SyncRequest,
    },
    frames::{
        ClientFrame, ErrorCode, ErrorFrame, GroupOp, Limits, MediaRef, PROTOCOL_VERSION,
        ServerFrame, close,
    },
    ids::{ClientMsgId, ConvId, DeviceId, UserId},
};
use futures::{
    FutureExt, Sink, SinkExt, Stream, StreamExt, future::BoxFuture, stream::FuturesUnordered,
};
use governor::{DefaultKeyedRateLimiter, Quota, clock::Clock};
use tokio::{
    sync::mpsc::{self, error::TrySendError},
    time::{Instant, MissedTickBehavior, timeout, timeout_at},
};
use tokio_util::sync::CancellationToken;

use crate::{
    Config,
    backend::{Backend, BackendError, Push, Pushes},
    groups::{ConnGroups, GroupHub, own_change},
    metrics,
    order::SentOrder,
    presence::{self, PresenceHub},
};

/// History page size when the client does not ask for one.
pub(crate) const DEFAULT_HISTORY_LIMIT: u32 = 50;

/// Most frames written to a socket before one flush.
const WRITE_BATCH: u64 = 64;

/// After a frame that was too large, the rest of it is still unread in the kernel; closing the
/// socket right away would answer with a reset that can destroy our close frame in flight.
const UNREAD_INPUT_LINGER: Duration = Duration::from_millis(500);

const UNAVAILABLE: &str = "the message could not be stored right now; retry with the same id";
const RECEIPT_UNAVAILABLE: &str = "the receipt could not be stored right now; send it again";
const NOT_MEMBER: &str = "you are not a member of this conversation";

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
                receipts_per_second: c.receipts_per_second,
                receipt_burst: c.receipt_burst,
                sync_page_max: api::SYNC_PAGE_MAX,
                ..presence::limits(c)
            },
        }
    }
}

/// What all connections of this gateway share.
pub(crate) struct Shared {
    pub settings: Settings,
    /// Send rate per user (all of the user's connections on this gateway).
    pub limiter: DefaultKeyedRateLimiter<UserId>,
    /// Receipt (`delivered`, `read`) rate per user, apart from sends: reading a conversation
    /// must not eat into the user's send budget.
    pub receipt_limiter: DefaultKeyedRateLimiter<UserId>,
    /// Cancelled when the gateway shuts down: connections finish in-flight work and close 1001.
    pub shutdown: CancellationToken,
    /// The large groups' subscriptions shared by the connections.
    pub groups: Arc<GroupHub>,
    /// Presence reports and pushes, typing (`presence.rs`).
    pub presence: Arc<PresenceHub>,
    /// Per-user abuse budgets: groups, members, new conversations (`limits.rs`).
    pub user_limits: crate::limits::UserLimits,
}

impl Shared {
    pub(crate) fn new(config: &Config, shutdown: CancellationToken) -> Self {
        let keyed = |per_second: u32, burst: u32| {
            let per_second = NonZeroU32::new(per_second).unwrap_or(NonZeroU32::MIN);
            let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
            DefaultKeyedRateLimiter::keyed(Quota::per_second(per_second).allow_burst(burst))
        };
        Self {
            settings: Settings::from_config(config),
            limiter: keyed(config.sends_per_second, config.send_burst),
            receipt_limiter: keyed(config.receipts_per_second, config.receipt_burst),
            shutdown,
            groups: Arc::default(),
            presence: Arc::new(PresenceHub::new(config)),
            user_limits: crate::limits::UserLimits::new(&config.abuse, None),
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
pub(crate) enum Outbound {
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
    // Before `hello`: from then on the user's large groups reach this connection.
    let groups = open_groups(&backend, &shared, &session.user).await;
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
    let presence = shared.presence.connect(&session.user);

    let confirmer = backend.clone();
    let order = SentOrder::default();
    let mut reader = Reader {
        backend,
        shared: &shared,
        session: &session,
        out: out_tx.clone(),
        closer: &closer,
        order: &order,
        inflight: FuturesUnordered::new(),
        presence: &presence,
    };
    tokio::join!(
        reader.run(&mut stream),
        write_loop(sink, out_rx, &closer, settings),
        forward(
            &confirmer,
            &shared,
            &session.user,
            groups,
            pushes,
            Outlet {
                out: out_tx,
                closer: &closer,
                order: &order,
            },
        ),
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
    /// Holds back pushes answering a send until its `sent` is queued.
    order: &'a SentOrder,
    /// Acks and API replies in flight, each resolving to the frame that answers it (a stored
    /// receipt is answered by none).
    inflight: FuturesUnordered<BoxFuture<'static, Option<ServerFrame>>>,
    presence: &'a presence::Conn<'a>,
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
        // Created once: a cancellation future or a timer made anew on every pass would register
        // and deregister itself each time (locks, timer wheel), for every frame.
        let stop = closer.stop.cancelled();
        let shutdown = shared.shutdown.cancelled();
        // One timer for both deadlines (token expiry, client silence), re-armed only when it
        // fires early: frames move `last_seen`, not the timer.
        let deadline = |last_seen: Instant| {
            session
                .expires_at
                .min(last_seen + settings.heartbeat_timeout)
        };
        let timer = tokio::time::sleep_until(deadline(last_seen));
        tokio::pin!(stop, shutdown, timer);
        loop {
            // At `max_inflight` the socket is not read (backpressure), and the client's silence
            // meanwhile is ours: the heartbeat deadline is off and restarts when reading resumes.
            let reading = self.inflight.len() < settings.max_inflight;
            tokio::select! {
                biased;
                _ = &mut stop => return Err(closer.reason()),
                _ = &mut shutdown => return Ok(()),
                _ = &mut timer => {
                    let now = Instant::now();
                    if now >= session.expires_at {
                        return Err(CloseReason::TokenExpired);
                    }
                    if !reading {
                        last_seen = now;
                    } else if now >= last_seen + settings.heartbeat_timeout {
                        return Err(CloseReason::HeartbeatTimeout);
                    }
                    timer.as_mut().reset(deadline(last_seen));
                }
                Some(frame) = self.inflight.next(), if !self.inflight.is_empty() => {
                    if !reading {
                        last_seen = Instant::now();
                    }
                    if let Some(frame) = frame {
                        self.answer(frame).await?;
                    }
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
                let Some(frame) = frame else { continue };
                if self.answer(frame).await.is_err() {
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
                return self.enqueue(ServerFrame::Error(err.into())).await;
            }
        };
        match frame {
            ClientFrame::Send {
                conv,
                id,
                body,
                media,
            } => {
                metrics::frame_in("send");
                self.on_send(conv, id, body, media).await
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
            ClientFrame::Delivered { conv, seq } => {
                metrics::frame_in("delivered");
                self.on_receipt(conv, seq, false).await
            }
            ClientFrame::Read { conv, seq } => {
                metrics::frame_in("read");
                self.on_receipt(conv, seq, true).await
            }
            ClientFrame::Sync {
                req,
                since,
                cursors,
                next,
                limit,
            } => {
                metrics::frame_in("sync");
                self.on_sync(req, since, cursors, next, limit).await
            }
            ClientFrame::Receipts { req, conv, seq } => {
                metrics::frame_in("receipts");
                self.on_receipts(req, conv, seq).await
            }
            ClientFrame::Group {
                op,
                conv,
                id,
                name,
                members,
            } => {
                metrics::frame_in("group");
                self.on_group(op, conv, id, name, members).await
            }
            ClientFrame::Conversations { req, after, limit } => {
                metrics::frame_in("conversations");
                self.on_conversations(req, after, limit).await
            }
            ClientFrame::GroupInfo { req, conv } => {
                metrics::frame_in("group_info");
                self.on_group_info(req, conv).await
            }
            ClientFrame::Ping => {
                metrics::frame_in("ping");
                self.enqueue(ServerFrame::Pong).await
            }
            frame @ (ClientFrame::Presence { .. }
            | ClientFrame::PresenceSubscribe { .. }
            | ClientFrame::PresenceSettings { .. }
            | ClientFrame::Typing { .. }) => {
                match presence::on_frame(&self.shared.presence, self.presence, &self.out, frame) {
                    presence::Handled::Reply(frame) => self.enqueue(frame).await,
                    presence::Handled::Later(answer) => {
                        self.inflight.push(answer);
                        Ok(())
                    }
                }
            }
        }
    }

    /// Validates a send, then publishes it to `CHAT_IN`; `sent` follows when JetStream acks.
    async fn on_send(
        &mut self,
        conv: String,
        id: String,
        body: String,
        media: Option<MediaRef>,
    ) -> Result<(), CloseReason> {
        let (settings, session) = (&self.shared.settings, self.session);
        let user = &session.user;
        let conv_id = match check_message_ids(&conv, &id) {
            Ok(conv_id) => conv_id,
            Err(message) => {
                return self
                    .send_failed(ErrorCode::InvalidId, message, id, conv, None)
                    .await;
            }
        };
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
        if !conv_id.is_group() && !conv_id.is_direct_member(user) {
            return self
                .send_failed(ErrorCode::NotMember, NOT_MEMBER.into(), id, conv, None)
                .await;
        }
        if let Err((code, message)) = crate::media::check_shape(media.as_ref()) {
            return self.send_failed(code, message, id, conv, None).await;
        }
        let inbound = Inbound::Send(InboundMessage {
            conv: conv.clone(),
            from: user.to_string(),
            device: session.device.to_string(),
            id: id.clone(),
            body,
            ts: chat_protocol::now_ms(),
            media,
        });
        self.submit(conv_id, conv.clone(), id.clone(), inbound)
            .await
    }

    /// Validates a `group` frame, then publishes it to `CHAT_IN` like a send (same rate limit,
    /// dedupe id and `sent`). Whether the user may make the change is the sequencer's to decide:
    /// its refusal comes as an `error` with the `id` after `sent`.
    async fn on_group(
        &mut self,
        op: GroupOp,
        conv: String,
        id: String,
        name: Option<String>,
        members: Vec<String>,
    ) -> Result<(), CloseReason> {
        let session = self.session;
        let conv_id = match check_message_ids(&conv, &id) {
            Ok(conv_id) => conv_id,
            Err(message) => {
                return self
                    .send_failed(ErrorCode::InvalidId, message, id, conv, None)
                    .await;
            }
        };
        if let Err((code, message)) = check_group_op(&conv_id, op, name.as_deref(), &members) {
            return self.send_failed(code, message, id, conv, None).await;
        }
        let inbound = Inbound::Group(InboundGroup {
            conv: conv.clone(),
            from: session.user.to_string(),
            device: session.device.to_string(),
            id: id.clone(),
            op,
            name,
            members,
        });
        self.submit(conv_id, conv, id, inbound).await
    }

    /// The common tail of `send` and `group`: the user's send rate and abuse budgets
    /// (`limits.rs`), then the publish to
    /// `CHAT_IN` with `Nats-Msg-Id` = [`api::dedupe_id`]; `sent` (with the gateway's receive
    /// time) once JetStream stored it, `unavailable` otherwise.
    async fn submit(
        &mut self,
        conv_id: ConvId,
        conv: String,
        id: String,
        inbound: Inbound,
    ) -> Result<(), CloseReason> {
        let user = &self.session.user;
        if let Err(retry_ms) = check_rate(&self.shared.limiter, user) {
            let message = "send rate exceeded; retry later with the same id".to_owned();
            return self
                .send_failed(ErrorCode::RateLimited, message, id, conv, Some(retry_ms))
                .await;
        }
        let limits = &self.shared.user_limits;
        if let Err(r) = crate::limits::admit(&self.backend, limits, user, &conv_id, &inbound).await
        {
            return self
                .send_failed(r.code, r.message, id, conv, r.retry_after_ms)
                .await;
        }
        // A media message is published only once the media service confirmed its upload.
        if let Err((code, message)) =
            crate::media::verify(&self.backend, &conv_id, user, &inbound).await
        {
            return self.send_failed(code, message, id, conv, None).await;
        }
        let ts = match &inbound {
            Inbound::Send(m) => m.ts,
            _ => chat_protocol::now_ms(),
        };
        let msg_id = api::dedupe_id(conv_id.as_str(), user.as_str(), &id);
        let payload = serde_json::to_vec(&inbound).expect("inbound messages always serialize");
        let (ack_id, ack_conv) = (id.clone(), conv.clone());
        // From now on the sequencer may answer this send: its answer waits for the `sent`.
        self.order.expect(&conv, &id);
        let published = self
            .publish(&conv_id, Some(msg_id), payload, move |stored| {
                let (id, conv) = (ack_id, ack_conv);
                if let Err(err) = stored {
                    tracing::warn!(conv = %conv, error = %err, "send not stored");
                    metrics::send_error(ErrorCode::Unavailable);
                    let mut frame = ErrorFrame::new(ErrorCode::Unavailable, UNAVAILABLE);
                    frame.id = Some(id);
                    frame.conv = Some(conv);
                    return Some(ServerFrame::Error(frame));
                }
                ::metrics::counter!(metrics::SENDS_PUBLISHED).increment(1);
                Some(ServerFrame::Sent { id, conv, ts })
            })
            .await;
        if let Err(err) = published {
            tracing::warn!(conv = %conv_id, error = %err, "publish failed");
            let (c, i) = (conv.clone(), id.clone());
            self.send_failed(ErrorCode::Unavailable, UNAVAILABLE.into(), id, conv, None)
                .await?;
            return self.release(&c, &i).await;
        }
        Ok(())
    }

    /// Queues the answer to something in flight; when it answers a send (`sent`, or its
    /// failure), the pushes held back for that send follow it.
    async fn answer(&mut self, frame: ServerFrame) -> Result<(), CloseReason> {
        let send = match &frame {
            ServerFrame::Sent { id, conv, .. } => Some((conv.clone(), id.clone())),
            ServerFrame::Error(ErrorFrame {
                id: Some(id),
                conv: Some(conv),
                ..
            }) => Some((conv.clone(), id.clone())),
            _ => None,
        };
        self.enqueue(frame).await?;
        match send {
            Some((conv, id)) => self.release(&conv, &id).await,
            None => Ok(()),
        }
    }

    /// The send `(conv, id)` is answered: queues what was held back for it.
    async fn release(&mut self, conv: &str, id: &str) -> Result<(), CloseReason> {
        self.order.answered(conv, id);
        while let Some(text) = self.order.next_releasable(conv) {
            push_frame(&self.out, text).await?;
            self.order.released(conv);
        }
        Ok(())
    }

    /// Validates a `delivered` (`read` false) or `read` frame, then publishes the receipt to
    /// `CHAT_IN`. Success is not answered; a receipt JetStream did not store is answered with
    /// `unavailable` and the `conv` (receipts are idempotent: the client sends it again).
    async fn on_receipt(&mut self, conv: String, seq: u64, read: bool) -> Result<(), CloseReason> {
        let (shared, session) = (self.shared, self.session);
        let user = &session.user;
        let conv_id = match ConvId::parse(&conv) {
            Ok(c) => c,
            Err(e) => {
                return self
                    .receipt_failed(ErrorCode::InvalidId, e.to_string(), conv, None)
                    .await;
            }
        };
        if !conv_id.is_group() && !conv_id.is_direct_member(user) {
            return self
                .receipt_failed(ErrorCode::NotMember, NOT_MEMBER.into(), conv, None)
                .await;
        }
        if seq == 0 {
            let message = "seq must be at least 1".to_owned();
            return self
                .receipt_failed(ErrorCode::InvalidFrame, message, conv, None)
                .await;
        }
        if let Err(retry_ms) = check_rate(&shared.receipt_limiter, user) {
            let message = "receipt rate exceeded; retry later".to_owned();
            return self
                .receipt_failed(ErrorCode::RateLimited, message, conv, Some(retry_ms))
                .await;
        }

        let payload = serde_json::to_vec(&Inbound::Receipt(InboundReceipt {
            conv: conv.clone(),
            user: user.to_string(),
            device: session.device.to_string(),
            // Whoever read a message has it: `read` raises both watermarks.
            delivered: seq,
            read: if read { seq } else { 0 },
        }))
        .expect("inbound receipts always serialize");
        let ack_conv = conv.clone();
        // No `Nats-Msg-Id`: watermarks only grow, so a duplicate changes nothing.
        let published = self
            .publish(&conv_id, None, payload, move |stored| {
                let conv = ack_conv;
                if let Err(err) = stored {
                    tracing::warn!(conv = %conv, error = %err, "receipt not stored");
                    let mut frame = ErrorFrame::new(ErrorCode::Unavailable, RECEIPT_UNAVAILABLE);
                    frame.conv = Some(conv);
                    return Some(ServerFrame::Error(frame));
                }
                ::metrics::counter!(metrics::RECEIPTS_PUBLISHED).increment(1);
                None
            })
            .await;
        if let Err(err) = published {
            tracing::warn!(conv = %conv_id, error = %err, "receipt publish failed");
            return self
                .receipt_failed(
                    ErrorCode::Unavailable,
                    RECEIPT_UNAVAILABLE.into(),
                    conv,
                    None,
                )
                .await;
        }
        Ok(())
    }

    fn receipt_failed(
        &self,
        code: ErrorCode,
        message: String,
        conv: String,
        retry_after_ms: Option<u64>,
    ) -> impl Future<Output = Result<(), CloseReason>> + Send + use<'_, B> {
        let mut frame = ErrorFrame::new(code, message);
        frame.conv = Some(conv);
        frame.retry_after_ms = retry_after_ms;
        self.enqueue(ServerFrame::Error(frame))
    }

    /// Publishes to `CHAT_IN`: in arrival order (awaited here, within the publish timeout), while
    /// the JetStream ack is awaited concurrently, in flight. `answer` turns the ack (or its
    /// failure, or its absence by the deadline) into the client's answer. `Err`: the publish
    /// itself failed, nothing is in flight.
    async fn publish(
        &mut self,
        conv: &ConvId,
        msg_id: Option<String>,
        payload: Vec<u8>,
        answer: impl FnOnce(Result<(), BackendError>) -> Option<ServerFrame> + Send + 'static,
    ) -> Result<(), BackendError> {
        let publish_timeout = self.shared.settings.publish_timeout;
        let deadline = Instant::now() + publish_timeout;
        let ack =
            match timeout_at(deadline, self.backend.publish(conv, msg_id, payload.into())).await {
                Ok(published) => published?,
                Err(_) => return Err(BackendError::TimedOut(publish_timeout)),
            };
        self.inflight.push(
            async move {
                let stored = match timeout_at(deadline, ack).await {
                    Ok(stored) => stored,
                    Err(_) => Err(BackendError::TimedOut(publish_timeout)),
                };
                answer(stored)
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
    /// `after` and `before` are forwarded as given: both together ask for the range between.
    async fn on_history(
        &mut self,
        req: String,
        conv: String,
        before: Option<u64>,
        after: Option<u64>,
        limit: Option<u32>,
    ) -> Result<(), CloseReason> {
        let conv_id = match self.check_request(&req, &conv) {
            Ok(conv_id) => conv_id,
            Err(frame) => return self.enqueue(ServerFrame::Error(frame)).await,
        };
        let request = HistoryRequest {
            user: self.session.user.to_string(),
            conv: conv_id.to_string(),
            before,
            after,
            limit: limit
                .unwrap_or(DEFAULT_HISTORY_LIMIT)
                .clamp(1, api::HISTORY_PAGE_MAX),
        };
        let (backend, deadline) = (self.backend.clone(), self.request_deadline());
        self.inflight.push(
            async move {
                let page = |reply| match reply {
                    HistoryReply::Page { messages, more } => Ok(ServerFrame::History {
                        req: req.clone(),
                        conv: conv.clone(),
                        messages,
                        more,
                    }),
                    HistoryReply::Error(frame) => Err(frame),
                };
                let reply = backend.history(&request);
                Some(answer("history", &req, Some(&conv), deadline, reply, page).await)
            }
            .boxed(),
        );
        Ok(())
    }

    /// Validates a sync request and asks the sync responders, without blocking reads.
    async fn on_sync(
        &mut self,
        req: String,
        since: Option<String>,
        cursors: BTreeMap<String, u64>,
        next: Option<String>,
        limit: Option<u32>,
    ) -> Result<(), CloseReason> {
        if let Err(message) = check_request_id(&req) {
            return self
                .enqueue(request_error(ErrorCode::InvalidId, message, req, None))
                .await;
        }
        // Cursors of other users' conversations are harmless (the sequencer only answers about
        // the user's own), but every id is checked before it goes anywhere.
        if let Some((conv, e)) = cursors
            .keys()
            .find_map(|conv| ConvId::parse(conv).err().map(|e| (conv, e)))
        {
            let frame = request_error(
                ErrorCode::InvalidId,
                format!("cursor: {e}"),
                req,
                Some(conv.clone()),
            );
            return self.enqueue(frame).await;
        }
        let request = SyncRequest {
            user: self.session.user.to_string(),
            since,
            cursors,
            next,
            limit: limit
                .unwrap_or(api::SYNC_PAGE_DEFAULT)
                .clamp(1, api::SYNC_PAGE_MAX),
        };
        let (backend, deadline) = (self.backend.clone(), self.request_deadline());
        self.inflight.push(
            async move {
                let page = |reply| match reply {
                    SyncReply::Page {
                        convs,
                        messages,
                        more,
                        next,
                        token,
                    } => Ok(ServerFrame::Sync {
                        req: req.clone(),
                        convs,
                        messages,
                        more,
                        next,
                        token,
                    }),
                    SyncReply::Error(frame) => Err(frame),
                };
                let reply = backend.sync(&request);
                Some(answer("sync", &req, None, deadline, reply, page).await)
            }
            .boxed(),
        );
        Ok(())
    }

    /// Validates a receipts request and asks the receipts responders, without blocking reads.
    async fn on_receipts(
        &mut self,
        req: String,
        conv: String,
        seq: Option<u64>,
    ) -> Result<(), CloseReason> {
        let conv_id = match self.check_request(&req, &conv) {
            Ok(conv_id) => conv_id,
            Err(frame) => return self.enqueue(ServerFrame::Error(frame)).await,
        };
        let request = ReceiptsRequest {
            user: self.session.user.to_string(),
            conv: conv_id.to_string(),
            seq,
        };
        let (backend, deadline) = (self.backend.clone(), self.request_deadline());
        self.inflight.push(
            async move {
                let marks = |reply| match reply {
                    ReceiptsReply::Marks {
                        members,
                        delivered_to,
                        read_by,
                    } => Ok(ServerFrame::Receipts {
                        req: req.clone(),
                        conv: conv.clone(),
                        members,
                        seq,
                        delivered_to,
                        read_by,
                    }),
                    ReceiptsReply::Error(frame) => Err(frame),
                };
                let reply = backend.receipts(&request);
                Some(answer("receipts", &req, Some(&conv), deadline, reply, marks).await)
            }
            .boxed(),
        );
        Ok(())
    }

    /// Asks for a page of the user's conversations, without blocking reads.
    async fn on_conversations(
        &mut self,
        req: String,
        after: Option<String>,
        limit: Option<u32>,
    ) -> Result<(), CloseReason> {
        if let Err(message) = check_request_id(&req) {
            return self
                .enqueue(request_error(ErrorCode::InvalidId, message, req, None))
                .await;
        }
        let request = ConversationsRequest {
            user: self.session.user.to_string(),
            after,
            limit: limit
                .unwrap_or(api::CONVERSATIONS_PAGE_DEFAULT)
                .clamp(1, api::CONVERSATIONS_PAGE_MAX),
            groups_only: false,
        };
        let (backend, deadline) = (self.backend.clone(), self.request_deadline());
        self.inflight.push(
            async move {
                let page = |reply| match reply {
                    ConversationsReply::Page { convs, more, next } => {
                        Ok(ServerFrame::Conversations {
                            req: req.clone(),
                            convs,
                            more,
                            next,
                        })
                    }
                    ConversationsReply::Error(frame) => Err(frame),
                };
                let reply = backend.conversations(&request);
                Some(answer("conversations", &req, None, deadline, reply, page).await)
            }
            .boxed(),
        );
        Ok(())
    }

    /// Asks for a group's name and members on behalf of the user (the sequencer checks that
    /// the user is a member), without blocking reads.
    async fn on_group_info(&mut self, req: String, conv: String) -> Result<(), CloseReason> {
        let conv_id = match self.check_request(&req, &conv) {
            Ok(conv_id) if conv_id.is_group() => conv_id,
            Ok(_) => {
                let message = "group_info needs a group id (g~<id>)".to_owned();
                let frame = request_error(ErrorCode::InvalidId, message, req, Some(conv));
                return self.enqueue(frame).await;
            }
            Err(frame) => return self.enqueue(ServerFrame::Error(frame)).await,
        };
        let request = GroupInfoRequest {
            conv: conv_id.to_string(),
            user: Some(self.session.user.to_string()),
            since: None,
        };
        let (backend, deadline) = (self.backend.clone(), self.request_deadline());
        self.inflight.push(
            async move {
                let info = |reply| match reply {
                    GroupInfoReply::Group { name, members, seq } => Ok(ServerFrame::GroupInfo {
                        req: req.clone(),
                        conv: conv.clone(),
                        name,
                        members,
                        seq,
                    }),
                    GroupInfoReply::Error(frame) => Err(frame),
                };
                let reply = backend.group_info(&request);
                Some(answer("group_info", &req, Some(&conv), deadline, reply, info).await)
            }
            .boxed(),
        );
        Ok(())
    }

    /// The request id and the conversation of a request about one conversation: both valid,
    /// and the user a member. Else the error frame that answers it.
    fn check_request(&self, req: &str, conv: &str) -> Result<ConvId, ErrorFrame> {
        let fail = |code, message| {
            let mut frame = ErrorFrame::new(code, message);
            frame.req = Some(req.to_owned());
            frame.conv = Some(conv.to_owned());
            frame
        };
        check_request_id(req).map_err(|message| fail(ErrorCode::InvalidId, message))?;
        let conv_id = ConvId::parse(conv).map_err(|e| fail(ErrorCode::InvalidId, e.to_string()))?;
        if !conv_id.is_group() && !conv_id.is_direct_member(&self.session.user) {
            return Err(fail(ErrorCode::NotMember, NOT_MEMBER.into()));
        }
        Ok(conv_id)
    }

    fn request_deadline(&self) -> Instant {
        Instant::now() + self.shared.settings.history_timeout
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

/// Lists the user's groups (`chat.api.conversations`, `groups_only`, every page) and
/// registers the connection for each one it is still a member of, waiting until new group
/// subscriptions are live. `None` when the user is in no group. A failure is logged and
/// counted: the connection opens anyway, and the devices recover group messages by sync.
async fn open_groups<B: Backend>(
    backend: &B,
    shared: &Shared,
    user: &UserId,
) -> Option<ConnGroups<B>> {
    let settings = &shared.settings;
    let deadline = Instant::now() + settings.history_timeout;
    let mut groups: Option<ConnGroups<B>> = None;
    let mut ready = Vec::new();
    let mut after = None;
    loop {
        let request = ConversationsRequest {
            user: user.to_string(),
            after: after.take(),
            limit: api::CONVERSATIONS_PAGE_MAX,
            groups_only: true,
        };
        let (convs, next) = match timeout_at(deadline, backend.conversations(&request)).await {
            Ok(Ok(ConversationsReply::Page { convs, more, next })) => {
                (convs, next.filter(|_| more))
            }
            Ok(Ok(ConversationsReply::Error(e))) => {
                tracing::warn!(
                    code = e.code.as_str(),
                    "listing the user's groups was refused"
                );
                ::metrics::counter!(metrics::GROUP_LIST_FAILURES).increment(1);
                break;
            }
            Ok(Err(err)) => {
                tracing::warn!(error = %err, "listing the user's groups failed");
                ::metrics::counter!(metrics::GROUP_LIST_FAILURES).increment(1);
                break;
            }
            Err(_) => {
                tracing::warn!("listing the user's groups timed out");
                ::metrics::counter!(metrics::GROUP_LIST_FAILURES).increment(1);
                break;
            }
        };
        for info in convs {
            let Some(conv) = ConvId::parse(&info.conv).ok().filter(ConvId::is_group) else {
                continue;
            };
            if info.left.is_some() {
                continue;
            }
            let groups = groups.get_or_insert_with(|| {
                ConnGroups::new(
                    shared.groups.clone(),
                    backend.clone(),
                    user.clone(),
                    settings.outgoing_queue,
                )
            });
            ready.push(groups.join(conv, info.joined.max(1)).wait());
        }
        match next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    let subscribed = futures::future::join_all(ready);
    if timeout_at(Instant::now() + settings.publish_timeout, subscribed)
        .await
        .is_err()
    {
        tracing::warn!("group subscriptions not confirmed in time");
    }
    groups
}

/// Waits for the next event of the user's groups that this connection may see (forever when
/// the user has no groups on this connection).
async fn next_group<B: Backend>(groups: &mut Option<ConnGroups<B>>) -> Utf8Bytes {
    match groups {
        Some(groups) => match groups.next().await {
            Some(text) => text,
            None => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

/// Where the forwarder puts what it forwards: the outgoing queue, the close decision, and the
/// pushes held back until a send's `sent`.
struct Outlet<'a> {
    out: mpsc::Sender<Outbound>,
    closer: &'a Closer,
    order: &'a SentOrder,
}

/// Pushes the user's subject into the queue, unchanged: those payloads are complete frames
/// (`message`, `receipt`, `error`). A push that asks for a delivery confirmation (it has a reply
/// subject) is confirmed once it is queued: a device of the user is there to take it. A push
/// that closes a slow consumer is not confirmed.
///
/// Also forwards the events of the user's large groups (see [`crate::groups`]). The user's own
/// subject goes first, so a membership event naming the user (which the worker pushes there)
/// changes what the connection may see before any later event of that group is looked at.
async fn forward<B: Backend>(
    backend: &B,
    shared: &Shared,
    user: &UserId,
    mut groups: Option<ConnGroups<B>>,
    mut pushes: Pushes,
    outlet: Outlet<'_>,
) {
    let Outlet { out, closer, order } = outlet;
    let stop = closer.stop.cancelled();
    let shutdown = shared.shutdown.cancelled();
    tokio::pin!(stop, shutdown);
    loop {
        let slow = groups.as_ref().map(ConnGroups::slow_token);
        let payload = tokio::select! {
            biased;
            _ = &mut stop => return,
            _ = &mut shutdown => return,
            payload = pushes.next() => payload,
            _ = async { match &slow {
                Some(slow) => slow.cancelled().await,
                None => std::future::pending().await,
            } } => {
                tracing::info!("group queue full, closing slow consumer");
                closer.close(CloseReason::SlowConsumer);
                return;
            }
            text = next_group(&mut groups) => {
                if let Some(text) = order.admit(user, text)
                    && let Err(reason) = push_frame(&out, text).await
                {
                    closer.close(reason);
                    return;
                }
                continue;
            }
        };
        let Some(Push { payload, reply }) = payload else {
            tracing::warn!("push subscription ended");
            closer.close(CloseReason::GoingAway);
            return;
        };
        if presence::shed(&payload, &out, shared.settings.outgoing_queue) {
            continue;
        }
        let change = own_change(user, &payload);
        let Ok(text) = Utf8Bytes::try_from(payload) else {
            tracing::warn!("dropping a push that is not utf-8");
            continue;
        };
        // A push answering a send still waiting for its `sent` is queued right after it.
        if let Some(text) = order.admit(user, text)
            && let Err(reason) = push_frame(&out, text).await
        {
            closer.close(reason);
            return;
        }
        if let Some(change) = change {
            let live = groups
                .get_or_insert_with(|| {
                    ConnGroups::new(
                        shared.groups.clone(),
                        backend.clone(),
                        user.clone(),
                        shared.settings.outgoing_queue,
                    )
                })
                .apply(change);
            // The worker waits for this confirmation before the group's next event: confirm a
            // join only once the group's subscription is live, so nothing after it is missed.
            if let Some(live) = live
                && timeout(shared.settings.publish_timeout, live.wait())
                    .await
                    .is_err()
            {
                tracing::warn!("group subscription not live in time");
            }
        }
        if let Some(reply) = reply {
            match backend.confirm(reply).await {
                Ok(()) => ::metrics::counter!(metrics::DELIVERIES_CONFIRMED).increment(1),
                Err(err) => tracing::debug!(error = %err, "delivery confirmation failed"),
            }
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
    let stop = closer.stop.cancelled();
    tokio::pin!(stop);
    let reason = loop {
        let msg = tokio::select! {
            biased;
            _ = &mut stop => break closer.reason(),
            // Before the queue, so a busy connection still pings (at most once an interval).
            _ = ping.tick() => Message::Ping(Bytes::new()),
            item = queue.recv() => match item {
                Some(Outbound::Frame(text)) => Message::Text(text),
                Some(Outbound::Close(reason)) => break reason,
                None => break closer.reason(),
            },
        };
        // Everything queued meanwhile goes into the same write: one flush (one syscall) for a
        // burst of frames.
        let mut frames = u64::from(matches!(msg, Message::Text(_)));
        let mut close = None;
        let write = async {
            sink.feed(msg).await?;
            while frames < WRITE_BATCH {
                match queue.try_recv() {
                    Ok(Outbound::Frame(text)) => {
                        frames += 1;
                        sink.feed(Message::Text(text)).await?;
                    }
                    Ok(Outbound::Close(reason)) => {
                        close = Some(reason);
                        break;
                    }
                    Err(_) => break,
                }
            }
            sink.flush().await?;
            Ok::<_, W::Error>(())
        };
        tokio::select! {
            biased;
            // A blocked write is abandoned when the connection must close now.
            _ = &mut stop => break closer.reason(),
            res = write => match res {
                Ok(()) => ::metrics::counter!(metrics::FRAMES_OUT).increment(frames),
                Err(err) => {
                    tracing::debug!(error = %err, "websocket write failed");
                    break CloseReason::Gone;
                }
            },
        }
        if let Some(reason) = close {
            break reason;
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

/// Takes one unit of `user`'s quota, or says in how many ms (at least 1) to retry.
fn check_rate(limiter: &DefaultKeyedRateLimiter<UserId>, user: &UserId) -> Result<(), u64> {
    limiter.check_key(user).map_err(|not_until| {
        let wait = not_until.wait_time_from(limiter.clock().now());
        u64::try_from(wait.as_micros().div_ceil(1000))
            .unwrap_or(u64::MAX)
            .max(1)
    })
}

/// Request ids follow the client message id rules; the error names them as request ids.
fn check_request_id(req: &str) -> Result<(), String> {
    ClientMsgId::parse(req)
        .map(drop)
        .map_err(|e| e.to_string().replace("client message id", "request id"))
}

/// The conversation and client message id of a `send` or `group` frame, both valid.
fn check_message_ids(conv: &str, id: &str) -> Result<ConvId, String> {
    let conv_id = ConvId::parse(conv).map_err(|e| e.to_string())?;
    ClientMsgId::parse(id).map_err(|e| e.to_string())?;
    Ok(conv_id)
}

/// What a `group` frame must carry: a group id; a name (at most
/// [`api::GROUP_NAME_MAX_BYTES`]) for `create` and `rename` and none otherwise; valid member
/// ids, at least one for `add`, `remove`, `promote` and `demote`, none for `leave` and `rename`.
fn check_group_op(
    conv: &ConvId,
    op: GroupOp,
    name: Option<&str>,
    members: &[String],
) -> Result<(), (ErrorCode, String)> {
    let invalid = |message: &str| Err((ErrorCode::InvalidFrame, message.to_owned()));
    if !conv.is_group() {
        return Err((
            ErrorCode::InvalidId,
            "group frames need a group id (g~<id>)".to_owned(),
        ));
    }
    if let Some(Err(e)) = members
        .iter()
        .map(|m| UserId::parse(m))
        .find(Result::is_err)
    {
        return Err((ErrorCode::InvalidId, format!("members: {e}")));
    }
    let named = matches!(op, GroupOp::Create | GroupOp::Rename);
    match name {
        None if named => return invalid("`name` is required"),
        Some(_) if !named => return invalid("`name` is only for create and rename"),
        Some("") => return invalid("`name` must not be empty"),
        Some(n) if n.len() > api::GROUP_NAME_MAX_BYTES => {
            return Err((
                ErrorCode::InvalidFrame,
                format!(
                    "`name` is {} bytes; the limit is {}",
                    n.len(),
                    api::GROUP_NAME_MAX_BYTES
                ),
            ));
        }
        _ => {}
    }
    match op {
        GroupOp::Add | GroupOp::Remove | GroupOp::Promote | GroupOp::Demote
            if members.is_empty() =>
        {
            invalid("`members` must name at least one user")
        }
        GroupOp::Leave | GroupOp::Rename if !members.is_empty() => {
            invalid("`members` is not taken by leave and rename")
        }
        _ => Ok(()),
    }
}

/// An error frame answering request `req` (about `conv`, if any).
fn request_error(
    code: ErrorCode,
    message: String,
    req: String,
    conv: Option<String>,
) -> ServerFrame {
    let mut frame = ErrorFrame::new(code, message);
    frame.req = Some(req);
    frame.conv = conv;
    ServerFrame::Error(frame)
}

/// Waits (until `deadline`) for the answer of API `what` to request `req` and turns it into the
/// client's frame: `map` makes the answer frame, or returns the responder's error frame, which
/// gets `req` (and `conv`, unless it names one) like every failure here.
async fn answer<T>(
    what: &'static str,
    req: &str,
    conv: Option<&str>,
    deadline: Instant,
    reply: impl Future<Output = Result<T, BackendError>>,
    map: impl FnOnce(T) -> Result<ServerFrame, ErrorFrame>,
) -> ServerFrame {
    let (code, message) = match timeout_at(deadline, reply).await {
        Ok(Ok(reply)) => match map(reply) {
            Ok(frame) => return frame,
            Err(mut frame) => {
                frame.req = Some(req.to_owned());
                if frame.conv.is_none() {
                    frame.conv = conv.map(str::to_owned);
                }
                return ServerFrame::Error(frame);
            }
        },
        Ok(Err(err @ BackendError::BadReply(_))) => {
            tracing::error!(api = what, error = %err, "api reply not understood");
            (ErrorCode::Internal, format!("{what} failed"))
        }
        Ok(Err(err)) => {
            tracing::warn!(api = what, error = %err, "api unavailable");
            (
                ErrorCode::Unavailable,
                format!("{what} is unavailable right now; retry"),
            )
        }
        Err(_) => {
            tracing::warn!(api = what, "api request timed out");
            (
                ErrorCode::Unavailable,
                format!("{what} is unavailable right now; retry"),
            )
        }
    };
    request_error(code, message, req.to_owned(), conv.map(str::to_owned))
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
    use std::{collections::HashMap, sync::Mutex};

    use chat_protocol::frames::{ConvInfo, ConvState, GroupMember, MemberMarks};
    use futures::channel::mpsc as chan;
    use tokio::sync::oneshot;

    use super::*;

    /// A publish the fake backend saw; the test decides its ack.
    struct Published {
        conv: String,
        msg_id: Option<String>,
        payload: Bytes,
        ack: oneshot::Sender<Result<(), BackendError>>,
    }

    /// The API requests the fake backend answered, in order.
    #[derive(Default)]
    struct Asked {
        history: Vec<HistoryRequest>,
        sync: Vec<SyncRequest>,
        receipts: Vec<ReceiptsRequest>,
        conversations: Vec<ConversationsRequest>,
        group_info: Vec<GroupInfoRequest>,
        media: Vec<api::MediaVerifyRequest>,
    }

    /// The user's groups the fake backend lists, and the group subscriptions it holds.
    #[derive(Default)]
    struct Groups {
        list: Vec<ConvInfo>,
        subscribed: HashMap<String, chan::Sender<Push>>,
    }

    /// Publishes go to the test; API requests are recorded and answered by fixed rules; delivery
    /// confirmations go to the test.
    #[derive(Clone)]
    struct FakeBackend {
        published: tokio::sync::mpsc::UnboundedSender<Published>,
        asked: Arc<Mutex<Asked>>,
        confirmed: tokio::sync::mpsc::UnboundedSender<async_nats::Subject>,
        groups: Arc<Mutex<Groups>>,
    }

    fn marks(user: &str, delivered: u64, read: u64) -> MemberMarks {
        MemberMarks {
            user: user.into(),
            delivered,
            read,
        }
    }

    impl Backend for FakeBackend {
        async fn publish(
            &self,
            conv: &ConvId,
            msg_id: Option<String>,
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
            self.asked.lock().unwrap().history.push(request.clone());
            Ok(HistoryReply::Page {
                messages: vec![],
                more: false,
            })
        }

        /// A continuation `bad` is refused with `invalid_token`; anything else gets one page.
        async fn sync(&self, request: &SyncRequest) -> Result<SyncReply, BackendError> {
            self.asked.lock().unwrap().sync.push(request.clone());
            if request.next.as_deref() == Some("bad") {
                return Ok(SyncReply::Error(ErrorFrame::new(
                    ErrorCode::InvalidToken,
                    "unknown continuation",
                )));
            }
            Ok(SyncReply::Page {
                convs: vec![ConvState {
                    conv: "dm~alice~bob".into(),
                    name: None,
                    member_count: 2,
                    latest: 4,
                    unread: 2,
                    members: vec![marks("alice", 4, 2), marks("bob", 4, 4)],
                    left: None,
                }],
                messages: vec![],
                more: false,
                next: None,
                token: Some("t1".into()),
            })
        }

        /// With a seq, who has it and who read it; seq 99 does not exist yet.
        async fn receipts(&self, request: &ReceiptsRequest) -> Result<ReceiptsReply, BackendError> {
            self.asked.lock().unwrap().receipts.push(request.clone());
            if request.seq == Some(99) {
                let mut frame = ErrorFrame::new(ErrorCode::InvalidFrame, "no such seq");
                frame.conv = Some(request.conv.clone());
                return Ok(ReceiptsReply::Error(frame));
            }
            let seq = request.seq;
            Ok(ReceiptsReply::Marks {
                members: vec![marks("alice", 4, 4), marks("bob", 3, 1)],
                delivered_to: seq.map(|_| vec!["alice".into(), "bob".into()]),
                read_by: seq.map(|_| vec!["alice".into()]),
            })
        }

        /// The configured groups, two per page.
        async fn conversations(
            &self,
            request: &ConversationsRequest,
        ) -> Result<ConversationsReply, BackendError> {
            self.asked
                .lock()
                .unwrap()
                .conversations
                .push(request.clone());
            let list = self.groups.lock().unwrap().list.clone();
            let start = match &request.after {
                Some(after) => list
                    .iter()
                    .position(|c| &c.conv == after)
                    .map_or(list.len(), |i| i + 1),
                None => 0,
            };
            let convs: Vec<ConvInfo> = list[start..].iter().take(2).cloned().collect();
            let more = start + convs.len() < list.len();
            Ok(ConversationsReply::Page {
                next: convs.last().filter(|_| more).map(|c| c.conv.clone()),
                convs,
                more,
            })
        }

        /// `g~secret` is refused (not a member); any other group has alice and bob.
        async fn group_info(
            &self,
            request: &GroupInfoRequest,
        ) -> Result<GroupInfoReply, BackendError> {
            self.asked.lock().unwrap().group_info.push(request.clone());
            if request.conv == "g~secret" {
                return Ok(GroupInfoReply::Error(ErrorFrame::new(
                    ErrorCode::NotMember,
                    "not a member",
                )));
            }
            let member = |user: &str, admin| GroupMember {
                user: user.into(),
                admin,
                joined: 1,
                left: None,
            };
            Ok(GroupInfoReply::Group {
                name: "team".into(),
                members: vec![member("alice", true), member("bob", false)],
                seq: 7,
            })
        }

        /// Media `missing` does not exist, `big` has another size, `down` finds no media
        /// service; any other media is fine.
        async fn verify_media(
            &self,
            request: &api::MediaVerifyRequest,
        ) -> Result<api::MediaVerifyReply, BackendError> {
            self.asked.lock().unwrap().media.push(request.clone());
            let refuse = |code| Ok(api::MediaVerifyReply::Error(ErrorFrame::new(code, "no")));
            match request.media.id.as_str() {
                "missing" => refuse(ErrorCode::MediaNotFound),
                "big" => refuse(ErrorCode::MediaMismatch),
                "down" => Err(BackendError::NoResponders),
                _ => Ok(api::MediaVerifyReply::Ok),
            }
        }

        async fn subscribe_group(&self, conv: &ConvId) -> Result<Pushes, BackendError> {
            let (tx, rx) = chan::channel(64);
            self.groups
                .lock()
                .unwrap()
                .subscribed
                .insert(conv.to_string(), tx);
            Ok(rx.boxed())
        }

        async fn confirm(&self, reply: async_nats::Subject) -> Result<(), BackendError> {
            let _ = self.confirmed.send(reply);
            Ok(())
        }
    }

    struct Client {
        to_server: chan::Sender<Result<Message, axum::Error>>,
        from_server: chan::Receiver<Message>,
        pushes: chan::Sender<Push>,
        published: tokio::sync::mpsc::UnboundedReceiver<Published>,
        asked: Arc<Mutex<Asked>>,
        confirmed: tokio::sync::mpsc::UnboundedReceiver<async_nats::Subject>,
        groups: Arc<Mutex<Groups>>,
        shared: Arc<Shared>,
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
        connect_in(config, sink_buffer, token_ttl, vec![])
    }

    /// [`connect`] for a user in `groups`.
    fn connect_in(
        config: Config,
        sink_buffer: usize,
        token_ttl: Duration,
        groups: Vec<ConvInfo>,
    ) -> Client {
        let (to_server, server_in) = chan::channel(16);
        let (server_out, from_server) = chan::channel(sink_buffer);
        let (pushes, pushes_rx) = chan::channel(1024);
        let (published_tx, published) = tokio::sync::mpsc::unbounded_channel();
        let (confirmed_tx, confirmed) = tokio::sync::mpsc::unbounded_channel();
        let asked = Arc::new(Mutex::new(Asked::default()));
        let shutdown = CancellationToken::new();
        let groups = Arc::new(Mutex::new(Groups {
            list: groups,
            ..Groups::default()
        }));
        let backend = FakeBackend {
            published: published_tx,
            asked: asked.clone(),
            confirmed: confirmed_tx,
            groups: groups.clone(),
        };
        let session = Session {
            user: UserId::parse("alice").unwrap(),
            device: DeviceId::parse("phone").unwrap(),
            expires_at: Instant::now() + token_ttl,
        };
        let shared = Arc::new(Shared::new(&config, shutdown.clone()));
        let task = tokio::spawn(serve(
            backend,
            shared.clone(),
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
            asked,
            confirmed,
            groups,
            shared,
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

        async fn error(&mut self) -> ErrorFrame {
            match self.frame().await {
                ServerFrame::Error(e) => e,
                other => panic!("expected an error frame, got {other:?}"),
            }
        }

        /// Publishes `frame` on the user's subject, with a reply subject if `reply` is given.
        async fn push(&mut self, frame: &str, reply: Option<&str>) {
            let push = Push {
                payload: Bytes::copy_from_slice(frame.as_bytes()),
                reply: reply.map(async_nats::Subject::from),
            };
            self.pushes.send(push).await.unwrap();
        }

        /// The next frame is `pong`: everything sent before the ping was handled.
        async fn ping_pong(&mut self) {
            self.send(r#"{"type":"ping"}"#).await;
            assert_eq!(self.frame().await, ServerFrame::Pong);
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
                assert_eq!(limits.sync_page_max, api::SYNC_PAGE_MAX);
                assert_eq!(
                    (limits.receipts_per_second, limits.receipt_burst),
                    (50, 100)
                );
            }
            other => panic!("expected hello, got {other:?}"),
        }
        c.ping_pong().await;
        let message = r#"{"type":"message","conv":"dm~alice~bob","seq":1,"from":"bob","id":"x","ts":1,"body":"yo"}"#;
        let receipt =
            r#"{"type":"receipt","conv":"dm~alice~bob","user":"bob","delivered":1,"read":1}"#;
        for push in [message, receipt] {
            c.push(push, None).await;
            match c.next_message().await {
                Message::Text(t) => assert_eq!(t.as_str(), push),
                other => panic!("expected the push, got {other:?}"),
            }
        }
        // Nothing asked for a confirmation, so none was sent.
        assert!(c.confirmed.try_recv().is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn pushes_with_a_reply_are_confirmed_once_queued() {
        let mut c = connect(config(), 16, HOUR);
        c.frame().await;
        let message = r#"{"type":"message","conv":"dm~alice~bob","seq":2,"from":"bob","id":"y","ts":1,"body":"yo"}"#;
        c.push(message, Some("_INBOX.fanout.1")).await;
        match c.next_message().await {
            Message::Text(t) => assert_eq!(t.as_str(), message),
            other => panic!("expected the push, got {other:?}"),
        }
        let confirmed = timeout(Duration::from_secs(1), c.confirmed.recv())
            .await
            .expect("a confirmation in time")
            .unwrap();
        assert_eq!(confirmed.as_str(), "_INBOX.fanout.1");
        c.push(message, None).await;
        c.next_message().await;
        c.ping_pong().await;
        assert!(
            c.confirmed.try_recv().is_err(),
            "one confirmation per request"
        );
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
            assert_eq!(p.msg_id, Some(api::dedupe_id("dm~alice~bob", "alice", id)));
            let json: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
            assert_eq!(json["kind"], "send");
            let Ok(Inbound::Send(inbound)) = serde_json::from_slice(&p.payload) else {
                panic!("not a send: {json}");
            };
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

    /// The sequencer's answer to a send (the sender's own stamped message, or a refusal) can
    /// overtake the send's JetStream ack: the client still gets `sent` first, and the
    /// conversation's later pushes keep their place behind the held answer.
    #[tokio::test(start_paused = true)]
    async fn sent_comes_before_what_answers_the_send() {
        let mut c = connect(config(), 16, HOUR);
        c.frame().await;
        c.send(&send_json("m1")).await;
        c.send(&send_json("m2")).await;
        let m1 = c.published().await;
        let m2 = c.published().await;
        let own = r#"{"type":"message","conv":"dm~alice~bob","seq":1,"from":"alice","id":"m1","ts":1,"body":"hi m1"}"#;
        let reply = r#"{"type":"message","conv":"dm~alice~bob","seq":2,"from":"bob","id":"b1","ts":2,"body":"hey"}"#;
        let refusal = r#"{"type":"error","code":"not_member","message":"no","id":"m2","conv":"dm~alice~bob"}"#;
        let other = r#"{"type":"message","conv":"dm~alice~carol","seq":7,"from":"carol","id":"c1","ts":3,"body":"yo"}"#;
        c.push(own, None).await;
        c.push(reply, None).await;
        c.push(refusal, None).await;
        c.push(other, None).await;
        // Another conversation is not held up.
        assert!(matches!(c.frame().await, ServerFrame::Message(m) if m.conv == "dm~alice~carol"));
        m2.ack.send(Ok(())).unwrap();
        // m2's `sent` may go, but its refusal waits behind m1's message, which waits for m1.
        assert!(matches!(c.frame().await, ServerFrame::Sent { id, .. } if id == "m2"));
        c.ping_pong().await;
        m1.ack.send(Ok(())).unwrap();
        assert!(matches!(c.frame().await, ServerFrame::Sent { id, .. } if id == "m1"));
        assert!(matches!(c.frame().await, ServerFrame::Message(m) if m.id == "m1"));
        assert!(matches!(c.frame().await, ServerFrame::Message(m) if m.id == "b1"));
        assert!(matches!(c.frame().await, ServerFrame::Error(e) if e.id.as_deref() == Some("m2")));
        // Nothing awaits any more: pushes go straight through.
        c.push(reply, None).await;
        assert!(matches!(c.frame().await, ServerFrame::Message(m) if m.id == "b1"));
    }

    /// A send whose publish fails releases what was held for it, after its error.
    #[tokio::test(start_paused = true)]
    async fn a_failed_send_releases_its_held_answer_after_the_error() {
        let mut c = connect(config(), 16, HOUR);
        c.frame().await;
        c.send(&send_json("m1")).await;
        let m1 = c.published().await;
        let own = r#"{"type":"message","conv":"dm~alice~bob","seq":1,"from":"alice","id":"m1","ts":1,"body":"hi m1"}"#;
        c.push(own, None).await;
        c.ping_pong().await;
        m1.ack.send(Err(BackendError::NoResponders)).unwrap();
        let e = c.error().await;
        assert_eq!(
            (e.code, e.id.as_deref()),
            (ErrorCode::Unavailable, Some("m1"))
        );
        assert!(matches!(c.frame().await, ServerFrame::Message(m) if m.id == "m1"));
    }

    #[tokio::test(start_paused = true)]
    async fn media_sends_are_published_only_once_the_media_service_confirmed_them() {
        let mut c = connect(config(), 16, HOUR);
        c.frame().await;
        let media_send = |id: &str, media: &str| {
            format!(
                r#"{{"type":"send","conv":"dm~alice~bob","id":"{id}","body":"","media":{{"id":"{media}","content_type":"image/png","size":5}}}}"#
            )
        };
        for (id, media, code) in [
            ("m1", "missing", ErrorCode::MediaNotFound),
            ("m2", "big", ErrorCode::MediaMismatch),
            ("m3", "down", ErrorCode::Unavailable),
            ("m4", "a.b", ErrorCode::InvalidFrame),
        ] {
            c.send(&media_send(id, media)).await;
            let e = c.error().await;
            assert_eq!((e.code, e.id.as_deref()), (code, Some(id)), "{e:?}");
            assert_eq!(e.conv.as_deref(), Some("dm~alice~bob"));
        }
        c.send(&media_send("m5", "x1")).await;
        // The refused sends published nothing: the first publish is the confirmed one.
        let p = c.published().await;
        let Ok(Inbound::Send(inbound)) = serde_json::from_slice(&p.payload) else {
            panic!("not a send");
        };
        assert_eq!(inbound.id, "m5");
        assert_eq!(inbound.media.as_ref().map(|m| m.id.as_str()), Some("x1"));
        p.ack.send(Ok(())).unwrap();
        assert!(matches!(c.frame().await, ServerFrame::Sent { id, .. } if id == "m5"));
        let asked = c.asked.lock().unwrap().media.clone();
        // The malformed reference never reached the media service.
        assert_eq!(asked.len(), 4);
        assert_eq!(
            (asked[3].user.as_str(), asked[3].id.as_str()),
            ("alice", "m5")
        );
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
        assert_eq!(
            m3.msg_id,
            Some(api::dedupe_id("dm~alice~bob", "alice", "m3"))
        );
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
        // A range (a gap to fill): both bounds go to the sequencer as given.
        c.send(
            r#"{"type":"history","req":"r5","conv":"dm~alice~bob","after":3,"before":9,"limit":0}"#,
        )
        .await;
        assert!(matches!(c.frame().await, ServerFrame::History { req, .. } if req == "r5"));
        let seen = c.asked.lock().unwrap().history.clone();
        assert_eq!(seen.len(), 3);
        assert_eq!(
            (seen[0].limit, seen[0].before, seen[0].after),
            (api::HISTORY_PAGE_MAX, Some(9), None)
        );
        assert_eq!(seen[1].limit, DEFAULT_HISTORY_LIMIT);
        assert_eq!(seen[0].user, "alice");
        assert_eq!(
            (seen[2].after, seen[2].before, seen[2].limit),
            (Some(3), Some(9), 1)
        );
    }

    /// Reads the receipt the fake backend was asked to publish.
    fn receipt_of(p: &Published) -> InboundReceipt {
        let json: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
        assert_eq!(json["kind"], "receipt", "{json}");
        match serde_json::from_value(json) {
            Ok(Inbound::Receipt(r)) => r,
            other => panic!("not a receipt: {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn receipts_are_validated_then_published_without_msg_id() {
        let mut c = connect(config(), 16, HOUR);
        c.frame().await;
        let refused = [
            (
                r#"{"type":"read","conv":"dm~alice~*","seq":3}"#,
                ErrorCode::InvalidId,
                "dm~alice~*",
            ),
            (
                r#"{"type":"delivered","conv":"dm~bob~carol","seq":3}"#,
                ErrorCode::NotMember,
                "dm~bob~carol",
            ),
            (
                r#"{"type":"read","conv":"dm~alice~bob","seq":0}"#,
                ErrorCode::InvalidFrame,
                "dm~alice~bob",
            ),
        ];
        for (json, code, conv) in refused {
            c.send(json).await;
            let e = c.error().await;
            assert_eq!((e.code, e.conv.as_deref()), (code, Some(conv)), "{json}");
            assert_eq!((e.id, e.req), (None, None));
        }
        c.send(r#"{"type":"read","conv":"dm~alice~bob","seq":7}"#)
            .await;
        c.send(r#"{"type":"delivered","conv":"dm~alice~bob","seq":9}"#)
            .await;
        let read = c.published().await;
        let delivered = c.published().await;
        assert_eq!(
            (read.conv.as_str(), read.msg_id.as_deref()),
            ("dm~alice~bob", None)
        );
        assert_eq!(delivered.msg_id, None);
        let expected = |delivered, read| InboundReceipt {
            conv: "dm~alice~bob".into(),
            user: "alice".into(),
            device: "phone".into(),
            delivered,
            read,
        };
        assert_eq!(receipt_of(&read), expected(7, 7));
        assert_eq!(receipt_of(&delivered), expected(9, 0));
        // A stored receipt is not answered; one JetStream did not store is `unavailable`.
        read.ack.send(Ok(())).unwrap();
        delivered.ack.send(Err(BackendError::NoResponders)).unwrap();
        let e = c.error().await;
        assert_eq!(e.code, ErrorCode::Unavailable);
        assert_eq!(e.conv.as_deref(), Some("dm~alice~bob"));
        c.ping_pong().await;
        assert!(
            c.published.try_recv().is_err(),
            "refused receipts were not published"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn receipt_rate_is_limited_apart_from_sends() {
        let mut c = connect(
            Config {
                receipts_per_second: 1,
                receipt_burst: 2,
                sends_per_second: 1,
                send_burst: 1,
                ..config()
            },
            16,
            HOUR,
        );
        c.frame().await;
        for seq in 1..=3 {
            c.send(&format!(
                r#"{{"type":"read","conv":"dm~alice~bob","seq":{seq}}}"#
            ))
            .await;
        }
        let e = c.error().await;
        assert_eq!(e.code, ErrorCode::RateLimited);
        assert_eq!(e.conv.as_deref(), Some("dm~alice~bob"));
        let retry = e.retry_after_ms.expect("retry_after_ms");
        assert!((1..=1000).contains(&retry), "{retry}");
        for seq in 1..=2 {
            let p = c.published().await;
            assert_eq!(receipt_of(&p).read, seq);
            p.ack.send(Ok(())).unwrap();
        }
        // Receipts did not use up the send budget.
        c.send(&send_json("m1")).await;
        let m1 = c.published().await;
        assert!(m1.msg_id.is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn sync_is_validated_clamped_and_answered() {
        let mut c = connect(config(), 16, HOUR);
        c.frame().await;
        c.send(r#"{"type":"sync","req":"s.1"}"#).await;
        let e = c.error().await;
        assert_eq!(
            (e.code, e.req.as_deref()),
            (ErrorCode::InvalidId, Some("s.1"))
        );
        c.send(r#"{"type":"sync","req":"s2","cursors":{"dm~alice~bob":1,"dm~alice~b.ob":2}}"#)
            .await;
        let e = c.error().await;
        assert_eq!(
            (e.code, e.req.as_deref()),
            (ErrorCode::InvalidId, Some("s2"))
        );
        assert_eq!(e.conv.as_deref(), Some("dm~alice~b.ob"));
        assert!(
            c.asked.lock().unwrap().sync.is_empty(),
            "refused before asking"
        );

        c.send(r#"{"type":"sync","req":"s4","since":"t0","cursors":{"dm~alice~bob":2},"limit":100000}"#)
            .await;
        assert_eq!(
            c.frame().await,
            ServerFrame::Sync {
                req: "s4".into(),
                convs: vec![ConvState {
                    conv: "dm~alice~bob".into(),
                    name: None,
                    member_count: 2,
                    latest: 4,
                    unread: 2,
                    members: vec![marks("alice", 4, 2), marks("bob", 4, 4)],
                    left: None,
                }],
                messages: vec![],
                more: false,
                next: None,
                token: Some("t1".into()),
            }
        );
        c.send(r#"{"type":"sync","req":"s5","next":"bad","limit":0}"#)
            .await;
        let e = c.error().await;
        assert_eq!(
            (e.code, e.req.as_deref()),
            (ErrorCode::InvalidToken, Some("s5"))
        );
        c.send(r#"{"type":"sync","req":"s6"}"#).await;
        assert!(matches!(c.frame().await, ServerFrame::Sync { req, .. } if req == "s6"));

        let seen = c.asked.lock().unwrap().sync.clone();
        assert_eq!(
            seen[0],
            SyncRequest {
                user: "alice".into(),
                since: Some("t0".into()),
                cursors: BTreeMap::from([("dm~alice~bob".into(), 2)]),
                next: None,
                limit: api::SYNC_PAGE_MAX,
            }
        );
        assert_eq!((seen[1].next.as_deref(), seen[1].limit), (Some("bad"), 1));
        assert_eq!(seen[2].limit, api::SYNC_PAGE_DEFAULT);
    }

    #[tokio::test(start_paused = true)]
    async fn receipts_requests_are_validated_and_answered() {
        let mut c = connect(config(), 16, HOUR);
        c.frame().await;
        let refused = [
            (
                r#"{"type":"receipts","req":"","conv":"dm~alice~bob"}"#,
                ErrorCode::InvalidId,
            ),
            (
                r#"{"type":"receipts","req":"q1","conv":"dm~alice"}"#,
                ErrorCode::InvalidId,
            ),
            (
                r#"{"type":"receipts","req":"q2","conv":"dm~bob~carol"}"#,
                ErrorCode::NotMember,
            ),
        ];
        for (json, code) in refused {
            c.send(json).await;
            let e = c.error().await;
            assert_eq!(e.code, code, "{json}");
            assert!(e.req.is_some() && e.conv.is_some(), "{e:?}");
        }
        c.send(r#"{"type":"receipts","req":"q3","conv":"dm~alice~bob","seq":3}"#)
            .await;
        assert_eq!(
            c.frame().await,
            ServerFrame::Receipts {
                req: "q3".into(),
                conv: "dm~alice~bob".into(),
                members: vec![marks("alice", 4, 4), marks("bob", 3, 1)],
                seq: Some(3),
                delivered_to: Some(vec!["alice".into(), "bob".into()]),
                read_by: Some(vec!["alice".into()]),
            }
        );
        c.send(r#"{"type":"receipts","req":"q4","conv":"dm~alice~bob"}"#)
            .await;
        match c.frame().await {
            ServerFrame::Receipts {
                seq,
                delivered_to,
                read_by,
                ..
            } => assert_eq!((seq, delivered_to, read_by), (None, None, None)),
            other => panic!("expected receipts, got {other:?}"),
        }
        c.send(r#"{"type":"receipts","req":"q5","conv":"dm~alice~bob","seq":99}"#)
            .await;
        let e = c.error().await;
        assert_eq!(
            (e.code, e.req.as_deref()),
            (ErrorCode::InvalidFrame, Some("q5"))
        );
        assert_eq!(e.conv.as_deref(), Some("dm~alice~bob"));

        let seen = c.asked.lock().unwrap().receipts.clone();
        assert_eq!(
            seen[0],
            ReceiptsRequest {
                user: "alice".into(),
                conv: "dm~alice~bob".into(),
                seq: Some(3),
            }
        );
        assert_eq!(seen.len(), 3);
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
        // The client reads nothing while pushes keep coming, each asking for a confirmation.
        for i in 0..20 {
            let frame = format!(r#"{{"type":"pong","n":{i}}}"#);
            c.push(&frame, Some(&format!("_INBOX.r{i}"))).await;
        }
        assert_eq!(c.close_code().await, close::SLOW_CONSUMER);
        timeout(Duration::from_secs(60), c.task)
            .await
            .unwrap()
            .unwrap();
        // Only the pushes that made it into the queue were confirmed: the one that found it
        // full, and every later one, were not.
        let mut confirmed = Vec::new();
        while let Ok(reply) = c.confirmed.try_recv() {
            confirmed.push(reply.to_string());
        }
        assert!(
            !confirmed.is_empty() && confirmed.len() < 20,
            "{confirmed:?}"
        );
        let expected: Vec<String> = (0..confirmed.len())
            .map(|i| format!("_INBOX.r{i}"))
            .collect();
        assert_eq!(confirmed, expected);
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

    fn group_info(conv: &str, joined: u64, left: Option<u64>) -> ConvInfo {
        ConvInfo {
            conv: conv.into(),
            name: Some("team".into()),
            member_count: 100,
            latest: 10,
            unread: 0,
            admin: false,
            joined,
            left,
        }
    }

    fn group_message(conv: &str, seq: u64, from: &str, event: Option<&str>) -> String {
        let event = event
            .map(|e| format!(r#","event":{e}"#))
            .unwrap_or_default();
        format!(
            r#"{{"type":"message","conv":"{conv}","seq":{seq},"from":"{from}","id":"m{seq}","ts":1,"body":""{event}}}"#
        )
    }

    impl Client {
        /// Publishes `frame` on the large group's subject `conv` (which must have been subscribed).
        async fn group_push(&mut self, conv: &str, frame: &str) {
            let mut tx = self
                .groups
                .lock()
                .unwrap()
                .subscribed
                .get(conv)
                .unwrap_or_else(|| panic!("{conv} is not subscribed"))
                .clone();
            let push = Push {
                payload: Bytes::copy_from_slice(frame.as_bytes()),
                reply: None,
            };
            // An ended subscription (the last member left) takes nothing.
            let _ = tx.send(push).await;
        }

        fn subscribed(&self) -> Vec<String> {
            let mut convs: Vec<String> = self.shared.groups.subscribed().into_iter().collect();
            convs.sort();
            convs
        }

        async fn text(&mut self) -> String {
            loop {
                match self.next_message().await {
                    Message::Text(t) => return t.to_string(),
                    Message::Ping(_) => continue,
                    other => panic!("expected a frame, got {other:?}"),
                }
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn group_frames_are_validated_then_published_like_sends() {
        let mut c = connect(config(), 16, HOUR);
        c.frame().await;
        let long = "n".repeat(api::GROUP_NAME_MAX_BYTES + 1);
        let refused = [
            (r#"{"type":"group","op":"create","conv":"dm~alice~bob","id":"g1","name":"x"}"#.to_owned(), ErrorCode::InvalidId),
            (r#"{"type":"group","op":"create","conv":"g~t.x","id":"g1","name":"x"}"#.to_owned(), ErrorCode::InvalidId),
            (r#"{"type":"group","op":"create","conv":"g~t","id":"g 1","name":"x"}"#.to_owned(), ErrorCode::InvalidId),
            (r#"{"type":"group","op":"create","conv":"g~t","id":"g1"}"#.to_owned(), ErrorCode::InvalidFrame),
            (format!(r#"{{"type":"group","op":"create","conv":"g~t","id":"g1","name":"{long}"}}"#), ErrorCode::InvalidFrame),
            (r#"{"type":"group","op":"add","conv":"g~t","id":"g1"}"#.to_owned(), ErrorCode::InvalidFrame),
            (r#"{"type":"group","op":"add","conv":"g~t","id":"g1","members":["bob","c*"]}"#.to_owned(), ErrorCode::InvalidId),
            (r#"{"type":"group","op":"leave","conv":"g~t","id":"g1","members":["bob"]}"#.to_owned(), ErrorCode::InvalidFrame),
            (r#"{"type":"group","op":"remove","conv":"g~t","id":"g1","name":"x","members":["bob"]}"#.to_owned(), ErrorCode::InvalidFrame),
        ];
        for (json, code) in &refused {
            c.send(json).await;
            let e = c.error().await;
            assert_eq!(e.code, *code, "{json}");
            assert_eq!(e.id.as_deref().map(|i| !i.is_empty()), Some(true), "{json}");
            assert!(e.conv.is_some(), "{json}");
        }
        c.send(r#"{"type":"group","op":"create","conv":"g~t","id":"g1","name":"Team","members":["bob"]}"#)
            .await;
        c.send(r#"{"type":"group","op":"leave","conv":"g~t","id":"g2"}"#)
            .await;
        let create = c.published().await;
        assert_eq!(create.conv, "g~t");
        assert_eq!(create.msg_id, Some(api::dedupe_id("g~t", "alice", "g1")));
        let Ok(Inbound::Group(group)) = serde_json::from_slice(&create.payload) else {
            panic!("not a group frame: {:?}", create.payload);
        };
        assert_eq!(
            group,
            InboundGroup {
                conv: "g~t".into(),
                from: "alice".into(),
                device: "phone".into(),
                id: "g1".into(),
                op: GroupOp::Create,
                name: Some("Team".into()),
                members: vec!["bob".into()],
            }
        );
        create.ack.send(Ok(())).unwrap();
        assert!(
            matches!(c.frame().await, ServerFrame::Sent { id, conv, .. } if id == "g1" && conv == "g~t")
        );
        let leave = c.published().await;
        leave.ack.send(Err(BackendError::NoResponders)).unwrap();
        let e = c.error().await;
        assert_eq!(
            (e.code, e.id.as_deref()),
            (ErrorCode::Unavailable, Some("g2"))
        );
        assert!(
            c.published.try_recv().is_err(),
            "refused frames were not published"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn group_frames_share_the_send_rate() {
        let mut c = connect(
            Config {
                sends_per_second: 1,
                send_burst: 1,
                ..config()
            },
            16,
            HOUR,
        );
        c.frame().await;
        c.send(&send_json("m1")).await;
        c.send(r#"{"type":"group","op":"rename","conv":"g~t","id":"g1","name":"x"}"#)
            .await;
        let e = c.error().await;
        assert_eq!(
            (e.code, e.id.as_deref()),
            (ErrorCode::RateLimited, Some("g1"))
        );
        assert!(e.retry_after_ms.is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn conversations_and_group_info_are_asked_for_the_user() {
        let mut c = connect(config(), 16, HOUR);
        c.frame().await;
        c.send(r#"{"type":"conversations","req":"c1","limit":100000}"#)
            .await;
        assert_eq!(
            c.frame().await,
            ServerFrame::Conversations {
                req: "c1".into(),
                convs: vec![],
                more: false,
                next: None,
            }
        );
        c.send(r#"{"type":"conversations","req":"c2","after":"g~a"}"#)
            .await;
        // The fake has no `g~a`; any answer will do, the request is what matters.
        let _ = timeout(Duration::from_secs(1), c.frame()).await;
        c.send(r#"{"type":"group_info","req":"i1","conv":"g~team"}"#)
            .await;
        match c.frame().await {
            ServerFrame::GroupInfo {
                req,
                conv,
                name,
                members,
                seq,
            } => {
                assert_eq!(
                    (req.as_str(), conv.as_str(), name.as_str(), seq),
                    ("i1", "g~team", "team", 7)
                );
                assert_eq!(members.len(), 2);
            }
            other => panic!("expected group_info, got {other:?}"),
        }
        c.send(r#"{"type":"group_info","req":"i2","conv":"g~secret"}"#)
            .await;
        let e = c.error().await;
        assert_eq!(
            (e.code, e.req.as_deref(), e.conv.as_deref()),
            (ErrorCode::NotMember, Some("i2"), Some("g~secret"))
        );
        c.send(r#"{"type":"group_info","req":"i3","conv":"dm~alice~bob"}"#)
            .await;
        let e = c.error().await;
        assert_eq!(
            (e.code, e.req.as_deref()),
            (ErrorCode::InvalidId, Some("i3"))
        );
        let asked = c.asked.lock().unwrap();
        // The first one is the connection's own group listing.
        assert!(asked.conversations[0].groups_only);
        assert_eq!(
            asked.conversations[1],
            ConversationsRequest {
                user: "alice".into(),
                after: None,
                limit: api::CONVERSATIONS_PAGE_MAX,
                groups_only: false,
            }
        );
        assert_eq!(
            asked.conversations[2].limit,
            api::CONVERSATIONS_PAGE_DEFAULT
        );
        assert_eq!(asked.conversations[2].after.as_deref(), Some("g~a"));
        assert_eq!(
            asked.group_info[0],
            GroupInfoRequest {
                conv: "g~team".into(),
                user: Some("alice".into()),
                since: None,
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn large_group_events_reach_members_from_their_join_on() {
        // Alice is in three groups (two pages): joined g~a at 5, g~b at 1, left g~c at 3.
        let groups = vec![
            group_info("g~a", 5, None),
            group_info("g~b", 1, None),
            group_info("g~c", 1, Some(3)),
        ];
        let mut c = connect_in(config(), 16, HOUR, groups);
        assert!(matches!(c.frame().await, ServerFrame::Hello { .. }));
        assert_eq!(
            c.subscribed(),
            ["g~a", "g~b"],
            "subscribed before hello, not to g~c"
        );
        // Before alice joined: not forwarded. From her join on: forwarded unchanged.
        c.group_push("g~a", &group_message("g~a", 4, "bob", None))
            .await;
        let m5 = group_message("g~a", 5, "bob", None);
        c.group_push("g~a", &m5).await;
        assert_eq!(c.text().await, m5);
        // An event naming alice comes on her own subject, not on the group's: no duplicate.
        let added = group_message(
            "g~b",
            6,
            "bob",
            Some(r#"{"kind":"added","members":["alice","dan"]}"#),
        );
        c.group_push("g~b", &added).await;
        let m7 = group_message("g~b", 7, "bob", None);
        c.group_push("g~b", &m7).await;
        assert_eq!(c.text().await, m7);

        // Alice is removed from g~a: the event arrives on her subject, then nothing more.
        let removed = group_message(
            "g~a",
            8,
            "bob",
            Some(r#"{"kind":"removed","members":["alice"]}"#),
        );
        c.push(&removed, Some("_INBOX.r1")).await;
        assert_eq!(c.text().await, removed);
        c.group_push("g~a", &group_message("g~a", 9, "bob", None))
            .await;
        c.ping_pong().await;
        assert_eq!(
            c.subscribed(),
            ["g~b"],
            "the last member's leave ends the subscription"
        );

        // Added to g~d (on her own subject): subscribed, and its later events reach her.
        let added = group_message(
            "g~d",
            3,
            "bob",
            Some(r#"{"kind":"added","members":["alice"]}"#),
        );
        c.push(&added, None).await;
        assert_eq!(c.text().await, added);
        c.ping_pong().await;
        assert_eq!(c.subscribed(), ["g~b", "g~d"]);
        let m4 = group_message("g~d", 4, "carol", None);
        c.group_push("g~d", &m4).await;
        assert_eq!(c.text().await, m4);
        // She leaves g~b herself.
        let left = group_message("g~b", 8, "alice", Some(r#"{"kind":"left"}"#));
        c.push(&left, None).await;
        assert_eq!(c.text().await, left);
        c.group_push("g~b", &group_message("g~b", 9, "bob", None))
            .await;
        c.ping_pong().await;
        assert_eq!(c.subscribed(), ["g~d"]);
        c.shutdown.cancel();
        assert_eq!(c.close_code().await, close::GOING_AWAY);
        timeout(Duration::from_secs(60), c.task)
            .await
            .unwrap()
            .unwrap();
        assert!(
            c.shared.groups.subscribed().is_empty(),
            "closed connections unsubscribe"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_group_subscription_is_shared_by_the_gateways_connections() {
        let mut a = connect_in(config(), 16, HOUR, vec![group_info("g~a", 1, None)]);
        a.frame().await;
        // A second connection on the same gateway (shared state), in the same group.
        let shared = a.shared.clone();
        let (to_server, server_in) = chan::channel(16);
        let (server_out, mut from_server) = chan::channel(16);
        let (_pushes, pushes_rx) = chan::channel::<Push>(16);
        let backend = FakeBackend {
            published: tokio::sync::mpsc::unbounded_channel().0,
            asked: Arc::default(),
            confirmed: tokio::sync::mpsc::unbounded_channel().0,
            groups: a.groups.clone(),
        };
        let session = Session {
            user: UserId::parse("alice").unwrap(),
            device: DeviceId::parse("laptop").unwrap(),
            expires_at: Instant::now() + HOUR,
        };
        let second = tokio::spawn(serve(
            backend,
            shared.clone(),
            session,
            pushes_rx.boxed(),
            server_out,
            server_in,
        ));
        let _hello = from_server.next().await.unwrap();
        assert_eq!(a.subscribed(), ["g~a"]);
        let m2 = group_message("g~a", 2, "bob", None);
        a.group_push("g~a", &m2).await;
        assert_eq!(a.text().await, m2);
        match from_server.next().await.unwrap() {
            Message::Text(t) => assert_eq!(t.as_str(), m2),
            other => panic!("expected the push, got {other:?}"),
        }
        drop(to_server);
        timeout(Duration::from_secs(60), second)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            a.subscribed(),
            ["g~a"],
            "still held by the first connection"
        );
    }
}
