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
use chat_protocol::{
    api::{PushNotification, push_dedupe_id},
    frames::ServerFrame,
    ids::{ConvId, UserId},
    subjects,
};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

/// One stamped message waiting for its recipients to be resolved before it is acked.
struct Outstanding {
    remaining: AtomicUsize,
    failed: AtomicBool,
    msg: Mutex<Option<jetstream::Message>>,
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
        let result = if self.failed.load(Ordering::Acquire) {
            msg.ack_with(AckKind::Nak(Some(Duration::from_millis(500))))
                .await
        } else {
            msg.ack().await
        };
        if let Err(err) = result {
            tracing::warn!(error = %err, "ack failed; the message will be pushed again");
        }
    }
}

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
                self.push(member, None, &msg).await;
            }
            metrics::counter!("fanout_receipts_total").increment(1);
            return ack(&msg).await;
        };
        let recipients: Vec<&UserId> = conv
            .direct_members()
            .into_iter()
            .flatten()
            .filter(|u| u.as_str() != m.from)
            .collect();
        let outstanding = Arc::new(Outstanding {
            remaining: AtomicUsize::new(recipients.len() + 1),
            failed: AtomicBool::new(false),
            msg: Mutex::new(None),
        });
        for member in conv
            .direct_members()
            .into_iter()
            .flatten()
            .filter(|u| u.as_str() == m.from) {
            // The sender's own devices: no notification if none is connected.
            self.push(member, None, &msg).await;
        }
        for user in recipients {
            let token = self.next_token.fetch_add(1, Ordering::Relaxed);
            let notification = PushNotification {
                user: user.to_string(),
                conv: m.conv.clone(),
                seq: m.seq,
                from: m.from.clone(),
                id: m.id.clone(),
                ts: m.ts,
            };
            self.waiting.lock().expect("waiting lock").insert(
                token,
                Waiting {
                    notification,
                    outstanding: outstanding.clone(),
                    since: Instant::now(),
                },
            );
            if !self.push(user, Some(token), &msg).await {
                // Could not even publish: resolve now, the nak makes it come back.
                if let Some(w) = self.waiting.lock().expect("waiting lock").remove(&token) {
                    w.outstanding.failed.store(true, Ordering::Release);
                    // Resolved below with the others.
                    w.outstanding.remaining.fetch_sub(1, Ordering::AcqRel);
                }
            }
        }
        metrics::counter!("fanout_messages_total").increment(1);
        *outstanding.msg.lock().expect("outstanding lock") = Some(msg);
        // The extra count held the ack back until the message was in place.
        outstanding.resolve_one().await;
    }

    /// Publishes to `chat.user.<user>`, with a reply subject when `token` is given.
    async fn push(&self, user: &UserId, token: Option<u64>, msg: &jetstream::Message) -> bool {
        let subject = subjects::user(user);
        let result = match token {
            Some(t) => {
                self.client
                    .publish_with_reply(subject, format!("{}.{t}", self.inbox), msg.payload.clone())
                    .await
            }
            None => self.client.publish(subject, msg.payload.clone()).await,
        };
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
        loop {
            let reply = tokio::select! {
                r = replies.next() => r,
                _ = shutdown.cancelled() => return,
            };
            let Some(reply) = reply else { return };
            let Some(token) = reply
                .subject
                .rsplit('.')
                .next()
                .and_then(|t| t.parse::<u64>().ok())
            else {
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
            }
            waiting.outstanding.resolve_one().await;
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

async fn ack(msg: &jetstream::Message) {
    if let Err(err) = msg.ack().await {
        tracing::warn!(error = %err, "ack failed; the event will be pushed again");
    }
}
