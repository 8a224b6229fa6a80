//! Group fan-out: the messages and receipts of group conversations (`chat.gmsg.<p>.<conv>`,
//! `chat.grcpt.<p>.<conv>`, consumers `fanout-g-p<N>`).
//!
//! The partition's pull loop only sorts each event into its conversation's FIFO queue and goes
//! on pulling; one task per conversation with queued events delivers them in stream order,
//! waiting on the delivery [`Budget`] as long as it must. So a busy group waits for its own
//! budget without holding up the other groups of its partition, and nothing is dropped: each
//! event is acked only once delivered (naked with a delay when it could not be). Queued events
//! get an in-progress ack every [`PROGRESS_EVERY`], so a long wait is not mistaken for a lost
//! worker (`ack_wait` is 30 s). The queues are bounded by the consumers' `max_ack_pending`.
//!
//! Recipients come from the membership [`view`](crate::view) of the group. A group with at most
//! `small_group_max_members` members is delivered like a one-to-one conversation: one push per
//! member on `chat.user.<member>`, with offline notifications. A larger group's event is
//! published once on `chat.grp.<conv>`, where every gateway holding a member's connection
//! listens and filters by membership; the users a membership event is about also get it on
//! their own subject (so their gateways learn to listen, or to stop), and receipts go only to
//! the reader's own subject.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use async_nats::jetstream::{self, AckKind};
use chat_protocol::{
    api::{GroupInfoReply, GroupInfoRequest},
    frames::{Message, Receipt, ServerFrame},
    ids::{ConvId, UserId},
    subjects,
};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::{
    budget::{Budget, Spend},
    deliver::{Deliverer, ack},
    view::{View, Views},
};

/// How often queued events tell JetStream they are still being worked on.
pub const PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// Group delivery settings (from [`crate::Config`]).
#[derive(Debug, Clone)]
pub struct GroupSettings {
    pub small_group_max_members: usize,
    pub view_max_members: usize,
    pub group_info_timeout: Duration,
    pub retry_delay: Duration,
}

struct Queued {
    msg: jetstream::Message,
    since: Instant,
}

/// Delivers group events through per-conversation queues.
pub struct GroupFanout {
    deliverer: Arc<Deliverer>,
    client: async_nats::Client,
    budget: Budget,
    settings: GroupSettings,
    views: Mutex<Views>,
    queues: Mutex<HashMap<String, VecDeque<Queued>>>,
    /// Set by [`GroupFanout::hand_back`]: queued events are naked instead of delivered.
    handing_back: AtomicBool,
    stop: CancellationToken,
}

impl GroupFanout {
    /// Starts the in-progress acks of queued events and the budget pruning; both, and every
    /// conversation task, end with `stop` (queued events are then redelivered elsewhere).
    pub fn start(
        deliverer: Arc<Deliverer>,
        client: async_nats::Client,
        budget: Budget,
        settings: GroupSettings,
        stop: CancellationToken,
    ) -> Arc<Self> {
        let this = Arc::new(Self {
            deliverer,
            client,
            budget,
            views: Mutex::new(Views::new(settings.view_max_members)),
            settings,
            queues: Mutex::default(),
            handing_back: AtomicBool::new(false),
            stop,
        });
        tokio::spawn(this.clone().keep_alive());
        this
    }

    /// Queues one stamped group event behind the earlier ones of its conversation, starting the
    /// conversation's task if it has none. Returns at once.
    pub fn enqueue(self: &Arc<Self>, msg: jetstream::Message) {
        let Some((_, conv)) = subjects::split_partitioned(&msg.subject) else {
            tracing::error!(subject = %msg.subject, "skipping a group event on an unexpected subject");
            let msg = msg.clone();
            tokio::spawn(async move { ack(&msg).await });
            return;
        };
        let conv = conv.to_owned();
        let queued = Queued {
            msg,
            since: Instant::now(),
        };
        let mut queues = self.queues.lock().expect("queues lock");
        if let Some(queue) = queues.get_mut(&conv) {
            // A redelivery of an event still here (it waited past `ack_wait`, or a pin moved
            // back): the queued copy is delivered, this one would be a duplicate.
            let seq = stream_seq(&queued.msg);
            if seq.is_some() && queue.iter().any(|q| stream_seq(&q.msg) == seq) {
                metrics::counter!("fanout_group_redeliveries_skipped_total").increment(1);
                return;
            }
            metrics::gauge!("fanout_group_queued").increment(1.0);
            queue.push_back(queued);
            return;
        }
        metrics::gauge!("fanout_group_queued").increment(1.0);
        queues.insert(conv.clone(), VecDeque::from([queued]));
        tokio::spawn(self.clone().drain(conv));
    }

    /// At shutdown, once nothing more is pulled: every conversation finishes the event it is
    /// delivering and hands the rest of its queue back (nak). Returns when every queue is
    /// empty.
    pub async fn hand_back(&self) {
        self.handing_back.store(true, Ordering::Release);
        loop {
            if self.queues.lock().expect("queues lock").is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Delivers `conv`'s queued events in order until its queue is empty. The event being
    /// delivered stays at the front of the queue until it is done, so it keeps getting
    /// in-progress acks while it waits for the budget.
    async fn drain(self: Arc<Self>, conv: String) {
        loop {
            let next = {
                let mut queues = self.queues.lock().expect("queues lock");
                let Some(queue) = queues.get_mut(&conv) else {
                    return;
                };
                match queue.front() {
                    Some(q) => Queued {
                        msg: q.msg.clone(),
                        since: q.since,
                    },
                    None => {
                        queues.remove(&conv);
                        return;
                    }
                }
            };
            let done = || {
                let mut queues = self.queues.lock().expect("queues lock");
                if let Some(queue) = queues.get_mut(&conv) {
                    queue.pop_front();
                }
                metrics::gauge!("fanout_group_queued").decrement(1.0);
            };
            if self.stop.is_cancelled() {
                // Not acked: redelivered to whichever worker owns the partition next.
                done();
                continue;
            }
            if self.handing_back.load(Ordering::Acquire) {
                // Draining: handed back now, redelivered (ahead of newer events) to the next
                // owner, which delivers it once.
                if let Err(err) = next.msg.ack_with(AckKind::Nak(None)).await {
                    tracing::debug!(error = %err, "nak at drain failed; redelivered after ack_wait");
                }
                done();
                continue;
            }
            let since = next.since;
            let spend = Spend::new(&self.budget, &conv);
            self.deliver(&conv, next.msg, &spend).await;
            done();
            let waited = spend.waited();
            if !waited.is_zero() {
                metrics::counter!("fanout_group_deferred_total").increment(1);
            }
            metrics::histogram!("fanout_group_delay_seconds").record(since.elapsed().as_secs_f64());
        }
    }

    async fn deliver(&self, conv: &str, msg: jetstream::Message, spend: &Spend<'_>) {
        let frame = serde_json::from_slice::<ServerFrame>(&msg.payload);
        let parsed = ConvId::parse(conv);
        match (frame, parsed) {
            (Ok(ServerFrame::Message(m)), Ok(conv_id)) if m.conv == conv && conv_id.is_group() => {
                self.deliver_message(&conv_id, msg, m, spend).await
            }
            (Ok(ServerFrame::Receipt(r)), Ok(conv_id)) if r.conv == conv && conv_id.is_group() => {
                self.deliver_receipt(&conv_id, msg, r, spend).await
            }
            _ => {
                tracing::error!(subject = %msg.subject, "skipping an undecodable group event");
                ack(&msg).await;
            }
        }
    }

    async fn deliver_message(
        &self,
        conv: &ConvId,
        msg: jetstream::Message,
        m: Message,
        spend: &Spend<'_>,
    ) {
        let cached = self
            .views
            .lock()
            .expect("views lock")
            .plan(conv.as_str(), &m);
        let plan = match cached {
            Some(plan) => Some(plan),
            None => match self.seed(conv, Some(m.seq)).await {
                Some(view) => {
                    let mut views = self.views.lock().expect("views lock");
                    views.insert(conv.as_str(), view);
                    // None: the responder answered from before this message; ask again later.
                    views.plan(conv.as_str(), &m)
                }
                None => None,
            },
        };
        let Some(plan) = plan else {
            return self.retry(&msg).await;
        };
        metrics::counter!("fanout_group_messages_total").increment(1);
        if plan.members <= self.settings.small_group_max_members {
            let resolved = self
                .deliverer
                .push_message(msg, &m, &plan.recipients, Some(spend))
                .await;
            // The next event goes out meanwhile; the ack follows the recipients.
            drop(resolved);
            return;
        }
        // Large: one publish for every gateway with a member connected, then the users the
        // event is about on their own subjects (their gateways start or stop listening).
        metrics::counter!("fanout_group_large_total").increment(1);
        if !self
            .deliverer
            .publish(subjects::group(conv), &msg.payload, Some(spend))
            .await
        {
            return self.retry(&msg).await;
        }
        if plan.named.is_empty() {
            return ack(&msg).await;
        }
        // The users it names get it on their own subjects, and the group's next event waits
        // until their gateways confirmed (or the presence timeout passed): a gateway confirms
        // an event that makes its user a member only once its `chat.grp.<conv>` subscription
        // is live, so the new member's connections miss nothing that follows.
        let resolved = self
            .deliverer
            .push_message(msg, &m, &plan.named, Some(spend))
            .await;
        let _ = resolved.await;
    }

    async fn deliver_receipt(
        &self,
        conv: &ConvId,
        msg: jetstream::Message,
        r: Receipt,
        spend: &Spend<'_>,
    ) {
        let cached = self
            .views
            .lock()
            .expect("views lock")
            .members(conv.as_str());
        let members = match cached {
            Some(members) => Some(members),
            None => match self.seed(conv, None).await {
                Some(view) => {
                    let mut views = self.views.lock().expect("views lock");
                    views.insert(conv.as_str(), view);
                    views.members(conv.as_str())
                }
                None => None,
            },
        };
        let Some(members) = members else {
            return self.retry(&msg).await;
        };
        metrics::counter!("fanout_group_receipts_total").increment(1);
        let recipients = if members.len() <= self.settings.small_group_max_members {
            members
        } else {
            // Large groups: only the reader's own devices; the others ask `receipts`.
            UserId::parse(&r.user).into_iter().collect()
        };
        let mut ok = true;
        for user in &recipients {
            ok &= self
                .deliverer
                .publish(subjects::user(user), &msg.payload, Some(spend))
                .await;
        }
        if ok {
            ack(&msg).await
        } else {
            self.retry(&msg).await
        }
    }

    /// One `chat.api.group_info` request for the members of `conv`, and its former members
    /// that were still members at seq `since`.
    async fn seed(&self, conv: &ConvId, since: Option<u64>) -> Option<View> {
        let request = GroupInfoRequest {
            conv: conv.to_string(),
            user: None,
            since,
        };
        let payload = serde_json::to_vec(&request).expect("requests serialize");
        let reply = self
            .client
            .send_request(
                subjects::GROUP_INFO_API,
                async_nats::Request::new()
                    .payload(payload.into())
                    .timeout(Some(self.settings.group_info_timeout)),
            )
            .await;
        let view = match reply {
            Ok(reply) => match serde_json::from_slice::<GroupInfoReply>(&reply.payload) {
                Ok(GroupInfoReply::Error(e)) => {
                    tracing::warn!(conv = %conv, code = e.code.as_str(), "group info refused");
                    None
                }
                Ok(reply) => View::seeded(reply),
                Err(err) => {
                    tracing::error!(conv = %conv, error = %err, "group info reply not understood");
                    None
                }
            },
            Err(err) => {
                tracing::warn!(conv = %conv, error = %err, "group info unavailable");
                None
            }
        };
        match &view {
            Some(_) => metrics::counter!("fanout_group_view_seeds_total").increment(1),
            None => metrics::counter!("fanout_group_view_seed_failures_total").increment(1),
        }
        view
    }

    /// Hands the event back to JetStream for a later attempt: never dropped.
    async fn retry(&self, msg: &jetstream::Message) {
        if let Err(err) = msg
            .ack_with(AckKind::Nak(Some(self.settings.retry_delay)))
            .await
        {
            tracing::warn!(error = %err, "nak failed; the event comes back after ack_wait");
        }
    }

    /// In-progress acks for events queued longer than [`PROGRESS_EVERY`], and budget pruning.
    async fn keep_alive(self: Arc<Self>) {
        // (The front of each queue is the event being delivered: it is kept alive too.)
        let mut tick = tokio::time::interval(PROGRESS_EVERY);
        let mut prune = tokio::time::interval(Duration::from_secs(60));
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = prune.tick() => self.budget.prune(),
                _ = tick.tick() => {
                    let replies: Vec<async_nats::Subject> = {
                        let queues = self.queues.lock().expect("queues lock");
                        queues
                            .values()
                            .flatten()
                            .filter(|q| q.since.elapsed() >= PROGRESS_EVERY)
                            .filter_map(|q| q.msg.reply.clone())
                            .collect()
                    };
                    for reply in replies {
                        let _ = self.client.publish(reply, "+WPI".into()).await;
                    }
                }
            }
        }
    }
}

/// The `CHAT_MSGS` stream sequence of a delivered event.
fn stream_seq(msg: &jetstream::Message) -> Option<u64> {
    msg.info().ok().map(|i| i.stream_sequence)
}
