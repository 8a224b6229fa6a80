//! Delivery of one stamped event to the members of its conversation, and offline detection.
//!
//! A message is published to each recipient's `chat.user.<user>` with a reply subject under
//! this worker's inbox. A gateway holding a device of that user answers (empty reply) as soon
//! as the push is queued for the socket; when no device is connected anywhere, nats-server
//! itself answers with a 503 "no responders" status. That 503 is what turns into a
//! [`PushNotification`] on `chat.push.<user>` (stream `CHAT_PUSH`, deduplicated per recipient
//! and message). Pushes are published in stream order, replies are matched asynchronously, and
//! the stamped message is acked only when every recipient is resolved (answered, notified, or
//! timed out), so a crash never loses a notification: the redelivered message is pushed again
//! (devices dedupe by conversation and seq) and JetStream drops the duplicate notification.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use async_nats::{
    HeaderMap, StatusCode,
    jetstream::{self, AckKind},
};
use bytes::Bytes;
use chat_protocol::{
    api::{PushNotification, push_dedupe_id},
    frames::{Message, ServerFrame},
    ids::{ConvId, UserId},
    subjects,
};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::budget::Spend;

/// Stamped messages whose recipients are not all resolved yet (so not acked yet).
#[derive(Default)]
struct InFlight {
    count: AtomicUsize,
    changed: tokio::sync::Notify,
}

/// One stamped message waiting for its recipients to be resolved before it is acked.
struct Outstanding {
    inflight: Arc<InFlight>,
    /// When it was stamped (its `ts`), for the delivery latency.
    stamped_ms: u64,
    remaining: AtomicUsize,
    failed: AtomicBool,
    msg: Mutex<Option<jetstream::Message>>,
    /// Told once every recipient is resolved (dropped without a word otherwise).
    resolved: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
}

impl Outstanding {
    /// Marks one recipient resolved; the last one acks (or naks, if a notification failed).
    async fn resolve_one(&self) {
        if self.remaining.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        let Some(msg) = self.msg.lock().expect("outstanding lock").take() else {
            return;
        };
        if let Some(resolved) = self.resolved.lock().expect("outstanding lock").take() {
            let _ = resolved.send(());
        }
        let result = if self.failed.load(Ordering::Acquire) {
            msg.ack_with(AckKind::Nak(Some(Duration::from_millis(500))))
                .await
        } else {
            msg.ack().await
        };
        if let Err(err) = result {
            tracing::warn!(error = %err, "ack failed; the message will be pushed again");
        }
        self.inflight.count.fetch_sub(1, Ordering::AcqRel);
        self.inflight.changed.notify_waiters();
    }

    /// A gateway confirmed that a device's connection queued the message.
    fn confirmed(&self) {
        let age_ms = chat_protocol::now_ms().saturating_sub(self.stamped_ms);
        metrics::histogram!(DELIVERY_SECONDS).record(age_ms as f64 / 1000.0);
    }
}

/// Histogram: from a message's stamp (its `ts`) to a gateway's confirmation that a recipient's
/// device connection queued it (one sample per confirmed recipient).
pub const DELIVERY_SECONDS: &str = "fanout_delivery_seconds";

struct Waiting {
    notification: PushNotification,
    outstanding: Arc<Outstanding>,
    since: Instant,
}

/// Pushes stamped events to members and turns "nobody is connected" into push notifications.
pub struct Deliverer {
    client: async_nats::Client,
    js: jetstream::Context,
    inbox: String,
    next_token: AtomicU64,
    waiting: Mutex<HashMap<u64, Waiting>>,
    inflight: Arc<InFlight>,
}

impl Deliverer {
    /// Subscribes this worker's reply inbox and starts matching replies and expiring
    /// unanswered pushes after `presence_timeout` (counted as delivered: some gateway holds
    /// the user's subscription but is slow).
    pub async fn start(
        client: async_nats::Client,
        presence_timeout: Duration,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, async_nats::SubscribeError> {
        let inbox = client.new_inbox();
        let replies = client.subscribe(format!("{inbox}.*")).await?;
        let this = Arc::new(Self {
            js: jetstream::new(client.clone()),
            client,
            inbox,
            next_token: AtomicU64::new(0),
            waiting: Mutex::new(HashMap::new()),
            inflight: Arc::default(),
        });
        tokio::spawn(this.clone().match_replies(replies, shutdown.clone()));
        tokio::spawn(this.clone().expire(presence_timeout, shutdown));
        Ok(this)
    }

    /// Delivers one stamped event; acks it now (receipts, poison) or once its recipients are
    /// resolved (messages).
    pub async fn deliver(&self, msg: jetstream::Message) {
        let frame = match serde_json::from_slice::<ServerFrame>(&msg.payload) {
            Ok(frame) => frame,
            Err(_) => {
                tracing::error!(subject = %msg.subject, "skipping undecodable stamped event");
                return ack(&msg).await;
            }
        };
        let (conv, from) = match &frame {
            ServerFrame::Message(m) => (ConvId::parse(&m.conv), Some(m)),
            ServerFrame::Receipt(r) => (ConvId::parse(&r.conv), None),
            _ => {
                tracing::error!(subject = %msg.subject, "skipping unexpected stamped frame");
                return ack(&msg).await;
            }
        };
        let Ok(conv) = conv else {
            tracing::error!(subject = %msg.subject, "skipping stamped event with an invalid conversation");
            return ack(&msg).await;
        };
        let Some(m) = from else {
            // Receipts: every device of every member (the reader's other devices included).
            for member in conv.direct_members().into_iter().flatten() {
                self.push(member, None, &msg.payload, None).await;
            }
            metrics::counter!("fanout_receipts_total").increment(1);
            return ack(&msg).await;
        };
        let members: Vec<UserId> = conv
            .direct_members()
            .into_iter()
            .flatten()
            .cloned()
            .collect();
        let m = m.clone();
        // Nothing waits for the recipients here: the ack follows them.
        drop(self.push_message(msg, &m, &members, None).await);
        metrics::counter!("fanout_messages_total").increment(1);
    }

    /// Pushes stamped message `m` (the payload of `msg`) to each of `members`, in order: the
    /// sender's own devices without a confirmation request (no notification for the sender),
    /// every other member with one (for a membership event only the users it names: the
    /// others get no notification for it). `msg` is acked once every recipient is resolved, or naked
    /// when a publish or a notification failed. Each publish first takes one delivery from
    /// `budget` (group deliveries), if given. The returned receiver is told when every
    /// recipient is resolved (at the latest after the presence timeout).
    pub(crate) async fn push_message(
        &self,
        msg: jetstream::Message,
        m: &Message,
        members: &[UserId],
        budget: Option<&Spend<'_>>,
    ) -> tokio::sync::oneshot::Receiver<()> {
        let (resolved, on_resolved) = tokio::sync::oneshot::channel();
        self.inflight.count.fetch_add(1, Ordering::AcqRel);
        let outstanding = Arc::new(Outstanding {
            inflight: self.inflight.clone(),
            stamped_ms: m.ts,
            resolved: Mutex::new(Some(resolved)),
            // One per recipient asked for a confirmation, plus one held until `msg` is in place.
            remaining: AtomicUsize::new(1),
            failed: AtomicBool::new(false),
            msg: Mutex::new(None),
        });
        // A membership event notifies only the users it makes join or leave ("you were added
        // to …"); the group's other members learn of it when they next open the app.
        let named: Vec<&str> = m
            .event
            .as_ref()
            .map(|e| chat_protocol::membership::named(e, &m.from))
            .unwrap_or_default();
        for user in members {
            let notifies = m.event.is_none() || named.contains(&user.as_str());
            if user.as_str() == m.from || !notifies {
                // The sender's own devices, or nothing worth a notification: pushed, and no
                // notification if no device is connected.
                if !self.push(user, None, &msg.payload, budget).await {
                    outstanding.failed.store(true, Ordering::Release);
                }
                continue;
            }
            let token = self.next_token.fetch_add(1, Ordering::Relaxed);
            let notification = PushNotification {
                user: user.to_string(),
                conv: m.conv.clone(),
                seq: m.seq,
                from: m.from.clone(),
                id: m.id.clone(),
                ts: m.ts,
            };
            outstanding.remaining.fetch_add(1, Ordering::AcqRel);
            self.waiting.lock().expect("waiting lock").insert(
                token,
                Waiting {
                    notification,
                    outstanding: outstanding.clone(),
                    since: Instant::now(),
                },
            );
            if !self.push(user, Some(token), &msg.payload, budget).await {
                // Could not even publish: resolve now, the nak makes it come back.
                if let Some(w) = self.waiting.lock().expect("waiting lock").remove(&token) {
                    w.outstanding.failed.store(true, Ordering::Release);
                    // Resolved below with the others.
                    w.outstanding.remaining.fetch_sub(1, Ordering::AcqRel);
                }
            }
        }
        *outstanding.msg.lock().expect("outstanding lock") = Some(msg);
        // The extra count held the ack back until the message was in place.
        outstanding.resolve_one().await;
        on_resolved
    }

    /// Publishes `payload` to `subject` without a confirmation request (receipts, large
    /// groups), after taking one delivery from `budget`, if given.
    pub(crate) async fn publish(
        &self,
        subject: String,
        payload: &Bytes,
        budget: Option<&Spend<'_>>,
    ) -> bool {
        if let Some(spend) = budget {
            spend.take().await;
        }
        match self.client.publish(subject, payload.clone()).await {
            Ok(()) => {
                metrics::counter!("fanout_pushes_total").increment(1);
                true
            }
            Err(err) => {
                tracing::warn!(error = %err, "push failed");
                false
            }
        }
    }

    /// Publishes to `chat.user.<user>`, with a reply subject when `token` is given.
    pub(crate) async fn push(
        &self,
        user: &UserId,
        token: Option<u64>,
        payload: &Bytes,
        budget: Option<&Spend<'_>>,
    ) -> bool {
        let subject = subjects::user(user);
        let Some(t) = token else {
            return self.publish(subject, payload, budget).await;
        };
        if let Some(spend) = budget {
            spend.take().await;
        }
        let result = self
            .client
            .publish_with_reply(subject, format!("{}.{t}", self.inbox), payload.clone())
            .await;
        match result {
            Ok(()) => {
                metrics::counter!("fanout_pushes_total").increment(1);
                true
            }
            Err(err) => {
                tracing::warn!(error = %err, "push failed");
                false
            }
        }
    }

    async fn match_replies(
        self: Arc<Self>,
        mut replies: async_nats::Subscriber,
        shutdown: CancellationToken,
    ) {
        let stopped = shutdown.cancelled();
        tokio::pin!(stopped);
        loop {
            let reply = tokio::select! {
                r = replies.next() => r,
                _ = &mut stopped => return,
            };
            let Some(reply) = reply else { return };
            let Some((_, last)) = subjects::split_reply(&reply.subject) else {
                continue;
            };
            if last == subjects::CONFIRM_BATCH_TOKEN {
                // A gateway confirming several pushes at once.
                let tokens: Vec<u64> = std::str::from_utf8(&reply.payload)
                    .unwrap_or_default()
                    .split(',')
                    .filter_map(|t| t.parse().ok())
                    .collect();
                let resolved: Vec<Waiting> = {
                    let mut waiting = self.waiting.lock().expect("waiting lock");
                    tokens.iter().filter_map(|t| waiting.remove(t)).collect()
                };
                metrics::counter!("fanout_online_total").increment(resolved.len() as u64);
                for w in resolved {
                    w.outstanding.confirmed();
                    w.outstanding.resolve_one().await;
                }
                continue;
            }
            let Ok(token) = last.parse::<u64>() else {
                continue;
            };
            let Some(waiting) = self.waiting.lock().expect("waiting lock").remove(&token) else {
                continue; // expired already
            };
            if reply.status == Some(StatusCode::NO_RESPONDERS) {
                if !self.notify(&waiting.notification).await {
                    waiting.outstanding.failed.store(true, Ordering::Release);
                }
            } else {
                metrics::counter!("fanout_online_total").increment(1);
                waiting.outstanding.confirmed();
            }
            waiting.outstanding.resolve_one().await;
        }
    }

    /// Waits until every message pushed so far has all its recipients resolved and is acked
    /// (at most the presence timeout after its last push, while replies are still matched).
    pub async fn idle(&self) {
        loop {
            let changed = self.inflight.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.inflight.count.load(Ordering::Acquire) == 0 {
                return;
            }
            changed.await;
        }
    }

    /// Publishes an offline push notification; false when JetStream did not take it.
    async fn notify(&self, n: &PushNotification) -> bool {
        let Ok(user) = UserId::parse(&n.user) else {
            return true;
        };
        let mut headers = HeaderMap::new();
        headers.insert(
            async_nats::header::NATS_MESSAGE_ID,
            push_dedupe_id(&n.user, &n.conv, n.seq).as_str(),
        );
        let payload = serde_json::to_vec(n).expect("notification encodes");
        let ack = match self
            .js
            .publish_with_headers(subjects::push(&user), headers, payload.into())
            .await
        {
            Ok(fut) => fut.await,
            Err(e) => Err(e),
        };
        match ack {
            Ok(_) => {
                metrics::counter!("fanout_offline_notifications_total").increment(1);
                true
            }
            Err(err) => {
                tracing::warn!(error = %err, "offline notification failed; message will be retried");
                false
            }
        }
    }

    async fn expire(self: Arc<Self>, timeout: Duration, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(timeout.min(Duration::from_secs(1)));
        loop {
            tokio::select! {
                _ = tick.tick() => {},
                _ = shutdown.cancelled() => return,
            }
            let expired: Vec<Waiting> = {
                let mut waiting = self.waiting.lock().expect("waiting lock");
                let old: Vec<u64> = waiting
                    .iter()
                    .filter(|(_, w)| w.since.elapsed() >= timeout)
                    .map(|(t, _)| *t)
                    .collect();
                old.iter().filter_map(|t| waiting.remove(t)).collect()
            };
            for w in expired {
                metrics::counter!("fanout_presence_timeouts_total").increment(1);
                w.outstanding.resolve_one().await;
            }
        }
    }
}

pub(crate) async fn ack(msg: &jetstream::Message) {
    if let Err(err) = msg.ack().await {
        tracing::warn!(error = %err, "ack failed; the event will be pushed again");
    }
}
