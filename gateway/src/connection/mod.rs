//! One WebSocket connection, written over any `Sink` + `Stream` of WebSocket messages so it can
//! be driven by channels in tests.
//!
//! A connection is **one task with one loop** that reads client frames and writes what its
//! [`Outbox`] holds. Nothing else runs per connection: pushes are routed into the outbox by
//! the gateway's [router](crate::router) (the connection holds no NATS subscription), presence
//! changes by the presence hub, and the connection's own answers by itself. The loop waits on
//! one timer (heartbeat ping, client silence, token expiry, shutdown grace), the socket (read
//! and write), and, only while there are any, the frame being handled and the answers in
//! flight. An idle connection therefore holds its socket, its small read buffer, this loop's
//! state and an empty queue; what only a busy connection needs (a frame's handling, answers in
//! flight, the send order state, a burst's queue) is allocated when used and dropped after.
//!
//! The paths, by file:
//! - [`send`]: `send`, `group`, `delivered`/`read`: checked, then published to `CHAT_IN` in
//!   arrival order (the next frame is read once the publish is on its way), the JetStream ack
//!   awaited in flight;
//! - [`requests`]: the request proxies (`history`, `sync`, `receipts`, `conversations`,
//!   `group_info`), one generic helper;
//! - [`validate`]: id, membership, shape and rate checks;
//! - [`outbox`]: the bounded outgoing queue, and `sent` before whatever answers the same send;
//! - [`writer`]: feeding queued frames to the socket (one flush per burst), pings, the close;
//! - [`close`]: close reasons and codes.
//!
//! At most `max_inflight_sends` answers are awaited at a time: at the limit the socket is not
//! read. A full outgoing queue (`outgoing_queue`) means the client reads too slowly: the
//! connection is closed with 4001 and the client resyncs.

pub(crate) mod close;
pub(crate) mod outbox;
mod requests;
mod send;
mod validate;
mod writer;

#[cfg(test)]
mod tests;

use std::{num::NonZeroU32, pin::Pin, sync::Arc, task::Poll, time::Duration};

use axum::extract::ws::{Message, Utf8Bytes};
use chat_protocol::{
    api,
    frames::{ClientFrame, ErrorCode, ErrorFrame, Limits, PROTOCOL_VERSION, ServerFrame},
    ids::{DeviceId, UserId},
};
use futures::{
    FutureExt, Sink, Stream, StreamExt,
    future::{BoxFuture, poll_fn},
    stream::FuturesUnordered,
};
use governor::{DefaultKeyedRateLimiter, Quota};
use tokio::{sync::OwnedSemaphorePermit, time::Instant};

pub(crate) use self::{
    close::CloseReason,
    outbox::{Outbound, Outbox, Signal},
};
use self::{close::is_too_big, writer::Writer};
use crate::{
    Config,
    backend::Backend,
    metrics,
    presence::{self, PresenceHub},
    router::{Attached, Router},
};

#[cfg(test)]
use self::requests::DEFAULT_HISTORY_LIMIT;

/// Per-connection settings, derived from [`Config`].
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub max_body_bytes: usize,
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
                groups_per_hour: c.abuse.groups_per_hour,
                group_members_per_minute: c.abuse.group_members_per_minute,
                new_conversations_per_minute: c.abuse.new_conversations_per_minute,
                ..presence::limits(c)
            },
        }
    }
}

/// What all connections of this gateway share.
pub(crate) struct Shared<B> {
    pub backend: B,
    pub settings: Settings,
    /// Send rate per user (all of the user's connections on this gateway).
    pub limiter: DefaultKeyedRateLimiter<UserId>,
    /// Receipt (`delivered`, `read`) rate per user, apart from sends: reading a conversation
    /// must not eat into the user's send budget.
    pub receipt_limiter: DefaultKeyedRateLimiter<UserId>,
    /// Presence reports and pushes, typing (`presence.rs`).
    pub presence: Arc<PresenceHub>,
    /// Who is connected here, and where pushes go.
    pub router: Arc<Router>,
    /// Per-user abuse budgets: groups, members, new conversations (`limits.rs`), in the shared
    /// bucket when one was given (local to this gateway otherwise: tests).
    pub user_limits: crate::limits::UserLimits,
}

impl<B> Shared<B> {
    pub(crate) fn new(
        config: &Config,
        backend: B,
        router: Arc<Router>,
        limits_bucket: Option<async_nats::jetstream::Context>,
    ) -> Self {
        let keyed = |per_second: u32, burst: u32| {
            let per_second = NonZeroU32::new(per_second).unwrap_or(NonZeroU32::MIN);
            let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
            DefaultKeyedRateLimiter::keyed(Quota::per_second(per_second).allow_burst(burst))
        };
        Self {
            backend,
            settings: Settings::from_config(config),
            limiter: keyed(config.sends_per_second, config.send_burst),
            receipt_limiter: keyed(config.receipts_per_second, config.receipt_burst),
            presence: Arc::new(PresenceHub::new(config)),
            router,
            user_limits: crate::limits::UserLimits::new(&config.abuse, limits_bucket),
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

/// The answer to something in flight: the frame that answers it (a stored receipt: none).
pub(crate) type Answer = BoxFuture<'static, Option<ServerFrame>>;

/// What handling a frame left to do.
pub(crate) enum Step {
    /// Answered (or nothing to answer).
    Done,
    /// The connection must close.
    Close(CloseReason),
    /// An answer that comes later; the next frame is read meanwhile.
    Track(Answer),
    /// Work that must finish before the next frame is read (a publish, in arrival order),
    /// possibly leaving an answer in flight.
    Wait(BoxFuture<'static, Result<Option<Answer>, CloseReason>>),
}

/// What a frame handler needs; the parts cheap to clone into work that outlives the frame.
pub(crate) struct Ctx<B> {
    pub shared: Arc<Shared<B>>,
    pub session: Arc<Session>,
    pub outbox: Arc<Outbox>,
}

impl<B> Ctx<B> {
    /// Queues `frame` now.
    fn reply(&self, frame: ServerFrame) -> Step {
        match self.outbox.push(encode(&frame)) {
            Ok(()) => Step::Done,
            Err(reason) => Step::Close(reason),
        }
    }
}

/// Encodes a server frame, counting it when it is an error.
pub(crate) fn encode(frame: &ServerFrame) -> Utf8Bytes {
    if let ServerFrame::Error(e) = frame {
        metrics::error_frame(e.code);
    }
    Utf8Bytes::from(serde_json::to_string(frame).expect("server frames always serialize"))
}

/// Serves one connection until it closes. `attached` is its place in the router, made (and its
/// user's subscription confirmed live) before the upgrade, so nothing published after `hello`
/// is missed; pushes that came meanwhile wait in its outbox, behind `hello`. `permit` is the
/// connection's admission to the handshake: held until `hello` is queued.
#[tracing::instrument(name = "connection", skip_all, fields(user = %attached.session.user, device = %attached.session.device))]
pub(crate) async fn serve<B, S>(
    shared: Arc<Shared<B>>,
    attached: Attached,
    permit: Option<OwnedSemaphorePermit>,
    mut socket: S,
) where
    B: Backend,
    S: Sink<Message> + Stream<Item = Result<Message, axum::Error>> + Unpin + Send,
    <S as Sink<Message>>::Error: std::fmt::Display,
{
    let settings = &shared.settings;
    if attached.needs_listing {
        // Before `hello`: from then on the user's large groups reach this connection.
        open_groups(&shared, attached.router(), &attached.session.user).await;
    }
    let session = &attached.session;
    let hello = ServerFrame::Hello {
        version: PROTOCOL_VERSION,
        user: session.user.to_string(),
        device: session.device.to_string(),
        heartbeat_ms: settings.heartbeat_interval.as_millis() as u64,
        limits: settings.limits.clone(),
    };
    attached.outbox.push_front(encode(&hello));
    drop(permit);
    tracing::info!("connection opened");
    let presence = shared.presence.connect(&session.user);

    let mut conn = Conn {
        ctx: Ctx {
            shared: shared.clone(),
            session: session.clone(),
            outbox: attached.outbox.clone(),
        },
        writer: Writer::default(),
        handling: None,
        inflight: None,
        presence: &presence,
    };
    let reason = conn.run(&mut socket).await;
    drop(conn);
    writer::close(&mut socket, reason, settings.close_timeout).await;
    close::linger(&mut socket, reason, settings.close_timeout).await;
    ::metrics::counter!(metrics::CLOSES, "reason" => reason.label()).increment(1);
    if reason == CloseReason::SlowConsumer {
        ::metrics::counter!(metrics::SLOW_CONSUMERS).increment(1);
    }
    tracing::info!(reason = reason.label(), "connection closed");
}

/// Fetches the user's group list (boxed: its state is only needed while it runs) and applies
/// it, waiting (bounded) until new group subscriptions are live.
async fn open_groups<B: Backend>(shared: &Shared<B>, router: &Router, user: &UserId) {
    let settings = &shared.settings;
    let deadline = Instant::now() + settings.history_timeout;
    let listed = Box::pin(crate::groups::list(&shared.backend, user, deadline)).await;
    let Some(list) = listed else { return };
    if let Some(live) = router.apply_listing(user, list)
        && tokio::time::timeout(settings.publish_timeout, live)
            .await
            .is_err()
    {
        tracing::warn!("group subscriptions not confirmed in time");
    }
}

/// The connection loop's state.
struct Conn<'a, B> {
    ctx: Ctx<B>,
    writer: Writer,
    /// The frame being handled, when it must finish before the next one is read.
    handling: Option<BoxFuture<'static, Result<Option<Answer>, CloseReason>>>,
    /// Answers in flight; `None` (nothing allocated) while there are none.
    inflight: Option<FuturesUnordered<Answer>>,
    presence: &'a presence::Conn<'a>,
}

/// What woke the loop.
enum Event {
    Timer,
    Handled(Result<Option<Answer>, CloseReason>),
    Answered(Option<ServerFrame>),
    Read(Option<Result<Message, axum::Error>>),
    Signal(Signal),
    /// The queued close went out after everything before it.
    Closing(CloseReason),
    WriteFailed,
}

impl<B: Backend> Conn<'_, B> {
    fn inflight(&self) -> usize {
        self.inflight.as_ref().map_or(0, FuturesUnordered::len)
    }

    /// Reads and writes until the connection must close; returns why.
    async fn run<S>(&mut self, socket: &mut S) -> CloseReason
    where
        S: Sink<Message> + Stream<Item = Result<Message, axum::Error>> + Unpin,
        <S as Sink<Message>>::Error: std::fmt::Display,
    {
        let shared = self.ctx.shared.clone();
        let settings = &shared.settings;
        let expires_at = self.ctx.session.expires_at;
        let mut last_seen = Instant::now();
        let mut next_ping = last_seen + settings.heartbeat_interval;
        // Shutdown: finish in-flight work by then, and queue the close once done.
        let mut finish_by: Option<Instant> = None;
        let mut close_queued = false;
        let deadline = |last_seen: Instant, next_ping: Instant, finish_by: Option<Instant>| {
            let d = expires_at
                .min(last_seen + settings.heartbeat_timeout)
                .min(next_ping);
            finish_by.map_or(d, |f| d.min(f))
        };
        // One timer for every deadline, re-armed only when it fires: frames move `last_seen`,
        // not the timer.
        let timer = tokio::time::sleep_until(deadline(last_seen, next_ping, finish_by));
        tokio::pin!(timer);
        loop {
            // At `max_inflight` (or while a frame is handled) the socket is not read, and the
            // client's silence meanwhile is ours: the heartbeat deadline restarts after.
            let busy = self.handling.is_some() || self.inflight() >= settings.max_inflight;
            let reading = !busy && finish_by.is_none();
            if finish_by.is_some() && !busy && self.inflight() == 0 && !close_queued {
                self.ctx.outbox.push_close(CloseReason::GoingAway);
                close_queued = true;
            }
            let (handling, inflight, writer, outbox) = (
                &mut self.handling,
                &mut self.inflight,
                &mut self.writer,
                &*self.ctx.outbox,
            );
            let event = tokio::select! {
                biased;
                () = &mut timer => Event::Timer,
                done = poll_fn(|cx| handling.as_mut().map_or(Poll::Pending, |f| f.as_mut().poll(cx))),
                    if handling.is_some() => Event::Handled(done),
                Some(answer) = async { inflight.as_mut()?.next().await },
                    if inflight.as_ref().is_some_and(|f| !f.is_empty()) => Event::Answered(answer),
                event = poll_fn(|cx| poll_io(writer, outbox, socket, reading, cx)) => event,
            };
            let result = match event {
                Event::Timer => {
                    let now = Instant::now();
                    if now >= expires_at {
                        return CloseReason::TokenExpired;
                    }
                    if finish_by.is_some_and(|f| now >= f) {
                        return CloseReason::GoingAway;
                    }
                    if busy {
                        last_seen = now;
                    } else if now >= last_seen + settings.heartbeat_timeout {
                        return CloseReason::HeartbeatTimeout;
                    }
                    if now >= next_ping {
                        self.writer.ping();
                        next_ping = now + settings.heartbeat_interval;
                    }
                    timer
                        .as_mut()
                        .reset(deadline(last_seen, next_ping, finish_by));
                    Ok(())
                }
                Event::Handled(done) => {
                    self.handling = None;
                    done.map(|answer| self.track(answer))
                }
                Event::Answered(frame) => {
                    if busy {
                        last_seen = Instant::now();
                    }
                    if self
                        .inflight
                        .as_ref()
                        .is_some_and(FuturesUnordered::is_empty)
                    {
                        self.inflight = None;
                    }
                    match frame {
                        Some(frame) => answer(&self.ctx.outbox, &frame),
                        None => Ok(()),
                    }
                }
                Event::Read(msg) => {
                    last_seen = Instant::now();
                    self.on_message(msg)
                }
                Event::Signal(Signal::Stop(reason)) => return reason,
                Event::Signal(Signal::Shutdown) => {
                    let by = Instant::now() + settings.shutdown_grace;
                    finish_by = Some(by);
                    timer
                        .as_mut()
                        .reset(deadline(last_seen, next_ping, finish_by));
                    Ok(())
                }
                Event::Closing(reason) => return reason,
                Event::WriteFailed => return CloseReason::Gone,
            };
            if let Err(reason) = result {
                return reason;
            }
        }
    }

    /// Keeps `answer` in flight (allocating the set on first use).
    fn track(&mut self, answer: Option<Answer>) {
        if let Some(answer) = answer {
            self.inflight
                .get_or_insert_with(FuturesUnordered::new)
                .push(answer);
        }
    }

    fn step(&mut self, step: Step) -> Result<(), CloseReason> {
        match step {
            Step::Done => Ok(()),
            Step::Close(reason) => Err(reason),
            Step::Track(answer) => {
                self.track(Some(answer));
                Ok(())
            }
            // Most publishes are on their way at the first poll: only the rest is kept.
            Step::Wait(mut work) => match (&mut work).now_or_never() {
                Some(done) => done.map(|answer| self.track(answer)),
                None => {
                    self.handling = Some(work);
                    Ok(())
                }
            },
        }
    }

    fn on_message(&mut self, msg: Option<Result<Message, axum::Error>>) -> Result<(), CloseReason> {
        match msg {
            None => Err(CloseReason::Gone),
            Some(Err(err)) if is_too_big(&err) => Err(CloseReason::MessageTooBig),
            Some(Err(err)) => {
                tracing::debug!(error = %err, "websocket read failed");
                Err(CloseReason::Gone)
            }
            Some(Ok(Message::Text(text))) => {
                let step = self.on_frame(text.as_bytes());
                self.step(step)
            }
            Some(Ok(Message::Binary(_))) => {
                metrics::frame_in("invalid");
                let frame = ErrorFrame::new(
                    ErrorCode::InvalidFrame,
                    "frames are JSON text messages, not binary",
                );
                let step = self.ctx.reply(ServerFrame::Error(frame));
                self.step(step)
            }
            // Liveness only; tungstenite answers pings itself.
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => Ok(()),
            Some(Ok(Message::Close(_))) => Err(CloseReason::ClientClosed),
        }
    }

    fn on_frame(&mut self, bytes: &[u8]) -> Step {
        let ctx = &self.ctx;
        let frame = match ClientFrame::decode(bytes) {
            Ok(frame) => frame,
            Err(err) => {
                metrics::frame_in("invalid");
                return ctx.reply(ServerFrame::Error(err.into()));
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
                send::on_send(ctx, conv, id, body, media)
            }
            ClientFrame::Group {
                op,
                conv,
                id,
                name,
                members,
            } => {
                metrics::frame_in("group");
                send::on_group(ctx, op, conv, id, name, members)
            }
            ClientFrame::Delivered { conv, seq } => {
                metrics::frame_in("delivered");
                send::on_receipt(ctx, conv, seq, false)
            }
            ClientFrame::Read { conv, seq } => {
                metrics::frame_in("read");
                send::on_receipt(ctx, conv, seq, true)
            }
            ClientFrame::History {
                req,
                conv,
                before,
                after,
                limit,
            } => {
                metrics::frame_in("history");
                requests::on_history(ctx, req, conv, before, after, limit)
            }
            ClientFrame::Sync {
                req,
                since,
                cursors,
                next,
                limit,
            } => {
                metrics::frame_in("sync");
                requests::on_sync(ctx, req, since, cursors, next, limit)
            }
            ClientFrame::Receipts { req, conv, seq } => {
                metrics::frame_in("receipts");
                requests::on_receipts(ctx, req, conv, seq)
            }
            ClientFrame::Conversations { req, after, limit } => {
                metrics::frame_in("conversations");
                requests::on_conversations(ctx, req, after, limit)
            }
            ClientFrame::GroupInfo { req, conv } => {
                metrics::frame_in("group_info");
                requests::on_group_info(ctx, req, conv)
            }
            ClientFrame::Ping => {
                metrics::frame_in("ping");
                ctx.reply(ServerFrame::Pong)
            }
            frame @ (ClientFrame::Presence { .. }
            | ClientFrame::PresenceSubscribe { .. }
            | ClientFrame::PresenceSettings { .. }
            | ClientFrame::Typing { .. }) => {
                match presence::on_frame(&ctx.shared.presence, self.presence, &ctx.outbox, frame) {
                    presence::Handled::Reply(frame) => ctx.reply(frame),
                    presence::Handled::Later(answer) => Step::Track(answer),
                }
            }
        }
    }
}

/// Queues the answer to something in flight; when it answers a send (`sent`, or its failure),
/// the pushes held back for that send follow it.
fn answer(outbox: &Outbox, frame: &ServerFrame) -> Result<(), CloseReason> {
    let send = match frame {
        ServerFrame::Sent { id, conv, .. } => Some((conv.as_str(), id.as_str())),
        ServerFrame::Error(ErrorFrame {
            id: Some(id),
            conv: Some(conv),
            ..
        }) => Some((conv.as_str(), id.as_str())),
        _ => None,
    };
    outbox.push_answer(Some(encode(frame)), send)
}

/// The socket's side of the loop: writes what is queued (and pings), reports the outbox's
/// signals, and reads the next client message when `reading`.
fn poll_io<S>(
    writer: &mut Writer,
    outbox: &Outbox,
    socket: &mut S,
    reading: bool,
    cx: &mut std::task::Context<'_>,
) -> Poll<Event>
where
    S: Sink<Message> + Stream<Item = Result<Message, axum::Error>> + Unpin,
    <S as Sink<Message>>::Error: std::fmt::Display,
{
    // Every poll: a waker taken by an earlier wake-up would miss the next push or stop.
    outbox.register(cx.waker());
    if let Some(signal) = outbox.signal() {
        return Poll::Ready(Event::Signal(signal));
    }
    match writer.poll_write(outbox, socket, cx) {
        Poll::Ready(Ok(reason)) => return Poll::Ready(Event::Closing(reason)),
        Poll::Ready(Err(())) => return Poll::Ready(Event::WriteFailed),
        Poll::Pending => {}
    }
    if reading && let Poll::Ready(msg) = Pin::new(socket).poll_next(cx) {
        return Poll::Ready(Event::Read(msg));
    }
    Poll::Pending
}
