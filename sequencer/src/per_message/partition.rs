//! One partition's owner: many inbound messages at once, different conversations in
//! parallel, one conversation's messages one at a time in their stream order.
//!
//! The pull consumer hands out up to `max_ack_pending` unacked messages. Each joins its
//! conversation's queue, kept sorted by stream sequence. A conversation with nothing in flight
//! dispatches its queue's head: a send or group operation is stamped with the next seq and
//! published with the conversation's fence; the receipts at the head of the queue are
//! coalesced into at most one stamped receipt per member. Publishes of different conversations
//! are in flight together; their inputs are acked as their PubAcks come back.
//!
//! Order across faults rests on three rules (`nats/README.md`, "Fencing"):
//! - a conversation's messages are stamped in stream order, and never while an older one of
//!   the same conversation might still come back: a released pin moves only after the old
//!   owner's deliveries were handed back for redelivery (which the server serves before new
//!   ones, in the order of the naks: oldest first); a new pull stream, which has just won the
//!   pin, stamps nothing after its first delivery until the consumer has no delivery out
//!   beyond what this process holds (at most [`HOLD_BACK`]), since what a killed or paused
//!   holder had in hand comes back only after `ack_wait`; and within one pull stream a
//!   gap in the consumer sequence (deliveries lost on the way) holds every dispatch back the
//!   same way;
//! - a fenced publish (someone else stamped a conversation this owner thought it owned) makes
//!   the owner abandon everything it holds: it naks its inputs (they go back, ahead of newer
//!   ones) and ends its pull stream; a pause long enough that the pin may have moved
//!   ([`FREEZE`]) does the same, since what that stream still brings
//!   (delivered before or during the pause, and meanwhile redelivered to the new owner) must
//!   not be stamped with a freshly loaded head: only a new stream that wins the pin again
//!   brings work. So a stale owner stamps nothing more;
//! - when it stops owning the partition (balance, shutdown) it finishes what is in flight,
//!   acks that, and naks the rest before the pin can move.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use async_nats::{
    HeaderMap,
    jetstream::{self, AckKind, context::PublishErrorKind, publish::PublishAck},
};
use chat_protocol::{
    api::{InboundReceipt, dedupe_id},
    frames::{ErrorCode, ErrorFrame, GroupEvent, Message, Receipt, ServerFrame},
    ids::ConvId,
    membership, subjects,
};
use chat_store::{ClientKey, MessageStore};
use futures::{FutureExt, StreamExt, future::BoxFuture, stream::FuturesUnordered};
use tokio_util::sync::CancellationToken;

use super::{
    Ctx, STAMPER_HEADER,
    conversation::{self, ConvState, Head, LoadError},
    inbound::{self, NOT_MEMBER, Reject, Valid},
};

/// A pause of the owner's loop this long means the pin may have moved meanwhile (it moves
/// after `priority_timeout`, 2.5 s, without pulls): everything held is abandoned.
pub const FREEZE: Duration = Duration::from_millis(1500);
/// How long dispatching waits after deliveries may have been lost or may still be out with an
/// earlier pin holder (a consumer sequence gap, the first delivery of a new pull stream):
/// longer than `ack_wait` (1.5 s), so every such delivery was redelivered and sorted into its
/// conversation's queue before anything after it is stamped.
pub const HOLD_BACK: Duration = Duration::from_millis(2000);
/// Held inputs older than this get a progress ack, so a long queue does not make the server
/// redeliver them (`ack_wait` is 1.5 s).
const PROGRESS_EVERY: Duration = Duration::from_millis(600);
/// How often the loop looks at the clock (freeze detection, progress acks, cache bound).
const TICK: Duration = Duration::from_millis(250);
/// Delay before a conversation whose load or publish failed is tried again.
const RETRY_DELAY: Duration = Duration::from_millis(200);
/// Delay before a publish refused with "in process" (R3: the server is still applying an
/// earlier write of the conversation) is tried again.
const IN_PROCESS_DELAY: Duration = Duration::from_millis(20);
/// Longest wait for in-flight publishes when the partition is released.
const RELEASE_WAIT: Duration = Duration::from_millis(1000);

/// Tunables of a partition owner.
#[derive(Debug, Clone)]
pub struct PartitionSettings {
    pub pull_batch: usize,
    pub pull_expires: Duration,
    /// Most conversations whose state is kept per partition; idle ones beyond are forgotten.
    pub conv_cache_max: usize,
}

/// One held input: the delivery to ack (the latest, if it was redelivered meanwhile).
struct Held {
    msg: jetstream::Message,
    bytes: usize,
    progress_at: Instant,
}

struct Queued {
    sseq: u64,
    valid: Valid,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Busy {
    Idle,
    /// Loading its state, stamping, or publishing receipts.
    Working,
    /// Waiting to be tried again.
    Waiting,
}

struct Conv {
    id: ConvId,
    state: Option<ConvState>,
    busy: Busy,
    queue: VecDeque<Queued>,
    last_used: Instant,
    /// Stream sequence of the newest input stamped in this conversation by this owner.
    stamped_sseq: u64,
}

impl Conv {
    /// Inserts in stream order (normally at the back; a redelivery after a loss goes earlier).
    fn enqueue(&mut self, item: Queued) {
        let at = self.queue.partition_point(|q| q.sseq < item.sseq);
        if self.queue.get(at).is_some_and(|q| q.sseq == item.sseq) {
            return;
        }
        self.queue.insert(at, item);
    }

    /// Takes the stamped input `sseq` out of the queue. It is not necessarily the front any
    /// more: a redelivery of an older input of the conversation may have been queued ahead of
    /// it while it was in flight (popping the front would drop that one, held but never
    /// stamped).
    fn done(&mut self, sseq: u64) {
        if let Some(at) = self.queue.iter().position(|q| q.sseq == sseq) {
            self.queue.remove(at);
        }
    }
}

/// What a tick found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tick {
    Ok,
    /// The loop was paused for [`FREEZE`] or longer.
    Froze,
}

/// How a publish failed.
#[derive(Debug)]
enum PublishFailure {
    /// The conversation's head moved under us: someone else stamped it.
    Fenced,
    /// R3: a write of the conversation is still being applied; try again shortly.
    InProcess,
    Other(String),
}

fn classify(err: async_nats::jetstream::context::PublishError) -> PublishFailure {
    use std::error::Error as _;
    if err.kind() == PublishErrorKind::WrongLastSequence {
        return PublishFailure::Fenced;
    }
    let code = err
        .source()
        .and_then(|s| s.downcast_ref::<async_nats::jetstream::Error>())
        .map(|e| e.error_code());
    if code == Some(async_nats::jetstream::ErrorCode::STREAM_WRONG_LAST_SEQUENCE_CONSTANT) {
        return PublishFailure::InProcess;
    }
    PublishFailure::Other(err.to_string())
}

enum Done {
    Loaded {
        conv: String,
        result: Result<ConvState, LoadError>,
    },
    Stamped {
        conv: String,
        sseq: u64,
        message: Message,
        result: Result<PublishAck, PublishFailure>,
    },
    Receipts {
        conv: String,
        sseqs: Vec<u64>,
        marks: Vec<(String, u64, u64)>,
        result: Result<(), PublishFailure>,
    },
    Retry {
        conv: String,
    },
    Resume,
}

/// The owner of one partition, for as long as it pulls it.
pub struct Partition<S> {
    ctx: Arc<Ctx<S>>,
    partition: u32,
    settings: PartitionSettings,
    convs: HashMap<String, Conv>,
    held: HashMap<u64, Held>,
    work: FuturesUnordered<BoxFuture<'static, (u64, Done)>>,
    /// Bumped when everything is abandoned: results of older work are ignored.
    epoch: u64,
    /// No dispatch before this instant (deliveries may be on their way back).
    paused_until: Option<Instant>,
    /// No dispatch at all: the partition is being released.
    releasing: bool,
    /// Holding back after the first delivery of a new pull stream, until no delivery is out
    /// with anyone but this process ([`Partition::settle`]).
    settling: bool,
    /// Set when fenced: the pull stream ends, like after a freeze, so only a stream pinned
    /// anew may bring this process more work.
    end_stream: bool,
    last_dseq: Option<u64>,
    last_tick: Instant,
    last_progress: Instant,
}

impl<S: MessageStore> Partition<S> {
    pub fn new(ctx: Arc<Ctx<S>>, partition: u32, settings: PartitionSettings) -> Self {
        Self {
            ctx,
            partition,
            settings,
            convs: HashMap::new(),
            held: HashMap::new(),
            work: FuturesUnordered::new(),
            epoch: 0,
            paused_until: None,
            releasing: false,
            settling: false,
            end_stream: false,
            last_dseq: None,
            last_tick: Instant::now(),
            last_progress: Instant::now(),
        }
    }

    /// Pulls and stamps the partition until `stop` (then releases it) or until the pull fails
    /// (`Err`: the caller pulls again; what is held was released).
    pub async fn run(&mut self, stop: &CancellationToken) -> Result<(), async_nats::Error> {
        let mut consumer: jetstream::consumer::PullConsumer = self
            .ctx
            .js
            .get_stream(subjects::STREAM_INBOUND)
            .await?
            .get_consumer(&chat_protocol::jetstream::sequencer_consumer(
                self.partition,
            ))
            .await?;
        let expires = self.settings.pull_expires;
        let messages = consumer
            .stream()
            .group(subjects::SEQUENCER_GROUP)
            .max_messages_per_batch(self.settings.pull_batch)
            .expires(expires)
            .heartbeat(expires / 2)
            .messages()
            .await?;
        let mut messages = messages.ready_chunks(self.settings.pull_batch.max(1));
        // A new pull stream starts without a pin: whatever an earlier stream of ours (or an
        // earlier owner) left unacked is redelivered before anything new once we are pinned.
        self.last_dseq = None;
        self.end_stream = false;
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.last_tick = Instant::now();
        let stopped = stop.cancelled();
        tokio::pin!(stopped);
        let result = loop {
            let full = self.ctx.held_bytes.load(Ordering::Relaxed) >= self.ctx.max_held_bytes;
            tokio::select! {
                biased;
                _ = &mut stopped => break Ok(()),
                _ = tick.tick() => {
                    if self.on_tick().await == Tick::Froze {
                        // Whatever this stream still brings was delivered to a process whose
                        // pin may have moved: only a new stream, pinned again, may bring work.
                        break Ok(());
                    }
                    if self.settling {
                        self.settle(&mut consumer).await;
                    }
                }
                Some((epoch, done)) = self.work.next(), if !self.work.is_empty() => {
                    if epoch == self.epoch {
                        self.on_done(done).await;
                        if std::mem::take(&mut self.end_stream) {
                            break Ok(());
                        }
                    }
                }
                chunk = messages.next(), if !full => match chunk {
                    Some(chunk) => {
                        if let Err(err) = self.intake(chunk).await {
                            break Err(err);
                        }
                    }
                    None => break Ok(()),
                },
            }
        };
        drop(messages);
        self.release().await;
        result
    }

    async fn on_tick(&mut self) -> Tick {
        let now = Instant::now();
        let gap = now.duration_since(self.last_tick);
        self.last_tick = now;
        if gap >= FREEZE {
            tracing::warn!(
                partition = self.partition,
                paused_ms = gap.as_millis() as u64,
                "the owner was paused long enough to lose its pin: abandoning what it holds \
                 and its pull stream"
            );
            metrics::counter!("sequencer_freezes_total").increment(1);
            self.give_back().await;
            return Tick::Froze;
        }
        if now.duration_since(self.last_progress) >= PROGRESS_EVERY / 2 {
            self.last_progress = now;
            for held in self.held.values_mut() {
                if now.duration_since(held.progress_at) >= PROGRESS_EVERY {
                    held.progress_at = now;
                    let _ = held.msg.ack_with(AckKind::Progress).await;
                }
            }
            self.evict();
            metrics::gauge!("sequencer_held_bytes")
                .set(self.ctx.held_bytes.load(Ordering::Relaxed) as f64);
        }
        Tick::Ok
    }

    /// Forgets idle conversations beyond the cache bound, least recently used first.
    fn evict(&mut self) {
        let max = self.settings.conv_cache_max.max(1);
        if self.convs.len() <= max {
            return;
        }
        let mut idle: Vec<(Instant, String)> = self
            .convs
            .iter()
            .filter(|(_, c)| c.queue.is_empty() && c.busy == Busy::Idle)
            .map(|(k, c)| (c.last_used, k.clone()))
            .collect();
        idle.sort_unstable();
        let excess = self.convs.len() - max * 9 / 10;
        for (_, key) in idle.into_iter().take(excess) {
            self.convs.remove(&key);
        }
    }

    /// Takes a chunk of deliveries: refusals are answered, duplicates acked, the rest queued.
    async fn intake(
        &mut self,
        chunk: Vec<
            Result<jetstream::Message, async_nats::jetstream::consumer::pull::MessagesError>,
        >,
    ) -> Result<(), async_nats::Error> {
        let mut fresh = Vec::with_capacity(chunk.len());
        for msg in chunk {
            let msg = msg?;
            let info = msg.info()?;
            let (sseq, dseq) = (info.stream_sequence, info.consumer_sequence);
            if self.last_dseq.is_none() {
                // The first delivery of a new pull stream: this process has just won the pin.
                // What the previous holder had in hand (a killed or paused owner, or this
                // process before it ended a stream) is redelivered only once its `ack_wait`
                // runs out, after newer inputs may already have been delivered here: hold
                // back until it is back and sorted into its conversations.
                tracing::info!(
                    partition = self.partition,
                    "pinned: holding back until earlier deliveries are redelivered"
                );
                self.hold_back();
                self.settling = true;
            } else if let Some(last) = self.last_dseq
                && dseq != last + 1
            {
                // Deliveries went missing on the way: they come back after `ack_wait`.
                tracing::info!(
                    partition = self.partition,
                    expected = last + 1,
                    got = dseq,
                    "deliveries lost on the way: holding back until they are redelivered"
                );
                metrics::counter!("sequencer_hold_backs_total").increment(1);
                self.hold_back();
            }
            self.last_dseq = Some(dseq);
            if let Some(held) = self.held.get_mut(&sseq) {
                // A redelivery of something in hand: ack the newest delivery.
                held.msg = msg;
                held.progress_at = Instant::now();
                continue;
            }
            match inbound::validate(self.partition, &msg.subject, &msg.payload) {
                Ok((valid, conv)) => fresh.push((sseq, msg, valid, conv)),
                Err(reject) => refuse(&self.ctx, reject, msg).await,
            }
        }
        if fresh.is_empty() {
            return Ok(());
        }
        // Client ids stamped long ago (beyond the JetStream dedupe window) are in the store.
        let keys: Vec<ClientKey> = fresh
            .iter()
            .filter_map(|(_, _, valid, conv)| {
                valid.client_id().map(|id| ClientKey {
                    conv: conv.to_string(),
                    from: valid.from().to_owned(),
                    client_id: id.to_owned(),
                })
            })
            .collect();
        let mut known = match self.ctx.store.seqs_for_client_ids(keys).await {
            Ok(known) => known.into_iter(),
            Err(err) => {
                // Not knowing is safe: JetStream's dedupe window still catches recent retries.
                tracing::warn!(error = %err, "client id lookup failed");
                Vec::new().into_iter()
            }
        };
        let mut touched = HashSet::new();
        let now = Instant::now();
        for (sseq, msg, valid, conv) in fresh {
            if valid.client_id().is_some() && known.next().flatten().is_some() {
                metrics::counter!("sequencer_duplicates_total").increment(1);
                ack(&msg).await;
                continue;
            }
            let bytes = msg.payload.len();
            self.ctx.held_bytes.fetch_add(bytes, Ordering::Relaxed);
            self.held.insert(
                sseq,
                Held {
                    msg,
                    bytes,
                    progress_at: now,
                },
            );
            let key = conv.to_string();
            let entry = self.convs.entry(key.clone()).or_insert_with(|| Conv {
                id: conv,
                state: None,
                busy: Busy::Idle,
                queue: VecDeque::new(),
                last_used: now,
                stamped_sseq: 0,
            });
            entry.last_used = now;
            entry.enqueue(Queued { sseq, valid });
            touched.insert(key);
        }
        for key in touched {
            self.dispatch(&key).await;
        }
        Ok(())
    }

    /// Ends a hold-back early once the consumer has no delivery outstanding beyond what this
    /// process holds: nothing another (killed, paused) holder had in hand is still to come
    /// back. Without an answer the hold-back runs its full [`HOLD_BACK`].
    async fn settle(&mut self, consumer: &mut jetstream::consumer::PullConsumer) {
        if self.paused_until.is_none() {
            self.settling = false;
            return;
        }
        let Ok(info) = consumer.info().await else {
            return;
        };
        if info.num_ack_pending <= self.held.len() {
            tracing::info!(
                partition = self.partition,
                "pinned: no earlier delivery outstanding, stamping"
            );
            self.resume().await;
        }
    }

    /// Ends a hold-back: every conversation with queued work is dispatched.
    async fn resume(&mut self) {
        self.paused_until = None;
        self.settling = false;
        let keys: Vec<String> = self.convs.keys().cloned().collect();
        for key in keys {
            self.dispatch(&key).await;
        }
    }

    fn hold_back(&mut self) {
        let until = Instant::now() + HOLD_BACK;
        self.paused_until = Some(until);
        let epoch = self.epoch;
        self.work.push(
            async move {
                tokio::time::sleep_until(until.into()).await;
                (epoch, Done::Resume)
            }
            .boxed(),
        );
    }

    fn retry_later(&mut self, conv: &str, delay: Duration) {
        if let Some(c) = self.convs.get_mut(conv) {
            c.busy = Busy::Waiting;
        }
        let (epoch, conv) = (self.epoch, conv.to_owned());
        self.work.push(
            async move {
                tokio::time::sleep(delay).await;
                (epoch, Done::Retry { conv })
            }
            .boxed(),
        );
    }

    /// Starts the next piece of work of `key`, if it has nothing in flight.
    async fn dispatch(&mut self, key: &str) {
        if self.releasing || self.paused_until.is_some() {
            return;
        }
        loop {
            let Some(conv) = self.convs.get_mut(key) else {
                return;
            };
            if conv.busy != Busy::Idle || conv.queue.is_empty() {
                return;
            }
            let Some(state) = conv.state.as_mut() else {
                conv.busy = Busy::Working;
                let (ctx, id, epoch) = (self.ctx.clone(), conv.id.clone(), self.epoch);
                let conv = key.to_owned();
                self.work.push(
                    async move {
                        let result = conversation::load(&ctx, &id).await;
                        (epoch, Done::Loaded { conv, result })
                    }
                    .boxed(),
                );
                return;
            };
            if matches!(conv.queue[0].valid, Valid::Receipt(_)) {
                let mut receipts = Vec::new();
                while let Some(Queued {
                    valid: Valid::Receipt(_),
                    ..
                }) = conv.queue.front()
                {
                    let Some(Queued {
                        sseq,
                        valid: Valid::Receipt(r),
                    }) = conv.queue.pop_front()
                    else {
                        unreachable!("checked above")
                    };
                    receipts.push((sseq, r));
                }
                let moved = coalesce(state, &receipts);
                let sseqs: Vec<u64> = receipts.iter().map(|(s, _)| *s).collect();
                metrics::counter!("sequencer_receipts_in_total").increment(sseqs.len() as u64);
                if moved.is_empty() {
                    for sseq in sseqs {
                        self.ack_input(sseq).await;
                    }
                    continue;
                }
                conv.busy = Busy::Working;
                let future = publish_receipts(
                    self.ctx.clone(),
                    conv.id.clone(),
                    self.partition,
                    key.to_owned(),
                    sseqs,
                    moved,
                );
                let epoch = self.epoch;
                self.work.push(future.map(move |d| (epoch, d)).boxed());
                return;
            }
            let front = &conv.queue[0];
            let sseq = front.sseq;
            let planned = plan(&conv.id, state, &front.valid, self.ctx.group_max_members);
            let (from, id, body, event, media) = match planned {
                Ok(p) => p,
                Err(refused) => {
                    let Some(Queued { valid, .. }) = conv.queue.pop_front() else {
                        unreachable!("front exists")
                    };
                    let reject = Reject::refused(refused.code, refused.message, &valid, &conv.id);
                    if let Some(held) = self.held.remove(&sseq) {
                        self.ctx.held_bytes.fetch_sub(held.bytes, Ordering::Relaxed);
                        refuse(&self.ctx, reject, held.msg).await;
                    }
                    continue;
                }
            };
            let message = Message {
                conv: conv.id.to_string(),
                seq: state.head.seq + 1,
                from,
                id,
                ts: chat_protocol::now_ms(),
                body,
                event,
                media,
            };
            conv.busy = Busy::Working;
            let future = publish_message(
                self.ctx.clone(),
                conv.id.clone(),
                self.partition,
                state.head,
                sseq,
                message,
            );
            let epoch = self.epoch;
            self.work.push(future.map(move |d| (epoch, d)).boxed());
            return;
        }
    }

    async fn on_done(&mut self, done: Done) {
        match done {
            Done::Resume => {
                if self
                    .paused_until
                    .is_some_and(|until| Instant::now() >= until)
                {
                    self.resume().await;
                }
            }
            Done::Retry { conv } => {
                if let Some(c) = self.convs.get_mut(&conv) {
                    c.busy = Busy::Idle;
                }
                self.dispatch(&conv).await;
            }
            Done::Loaded { conv, result } => match result {
                Ok(state) => {
                    if let Some(c) = self.convs.get_mut(&conv) {
                        c.state = Some(state);
                        c.busy = Busy::Idle;
                    }
                    self.dispatch(&conv).await;
                }
                Err(err) => {
                    tracing::warn!(conv = %conv, error = %err, "loading the conversation failed, retrying");
                    metrics::counter!("sequencer_stamp_errors_total").increment(1);
                    self.retry_later(&conv, RETRY_DELAY);
                }
            },
            Done::Stamped {
                conv,
                sseq,
                message,
                result,
            } => self.on_stamped(conv, sseq, message, result).await,
            Done::Receipts {
                conv,
                sseqs,
                marks,
                result,
            } => match result {
                Ok(()) => {
                    if let Some(c) = self.convs.get_mut(&conv) {
                        c.busy = Busy::Idle;
                        if let Some(state) = c.state.as_mut() {
                            for (user, d, r) in marks {
                                let m = state.marks.entry(user).or_default();
                                *m = (m.0.max(d), m.1.max(r));
                            }
                        }
                    }
                    metrics::counter!("sequencer_receipts_stamped_total").increment(1);
                    for sseq in sseqs {
                        self.ack_input(sseq).await;
                    }
                    self.dispatch(&conv).await;
                }
                Err(failure) => {
                    tracing::warn!(conv = %conv, error = ?failure, "publishing receipts failed, retrying");
                    metrics::counter!("sequencer_stamp_errors_total").increment(1);
                    self.requeue_receipts(&conv, sseqs);
                    self.retry_later(&conv, RETRY_DELAY);
                }
            },
        }
    }

    /// Puts receipts whose publish failed back into their queue (their inputs are still held).
    fn requeue_receipts(&mut self, conv: &str, sseqs: Vec<u64>) {
        let mut items = Vec::new();
        for sseq in sseqs {
            let Some(held) = self.held.get(&sseq) else {
                continue;
            };
            if let Ok((valid, _)) =
                inbound::validate(self.partition, &held.msg.subject, &held.msg.payload)
            {
                items.push(Queued { sseq, valid });
            }
        }
        if let Some(c) = self.convs.get_mut(conv) {
            // Watermarks may have moved in the store meanwhile: load them again.
            c.state = None;
            for item in items {
                c.enqueue(item);
            }
        }
    }

    async fn on_stamped(
        &mut self,
        conv: String,
        sseq: u64,
        message: Message,
        result: Result<PublishAck, PublishFailure>,
    ) {
        let Some(c) = self.convs.get_mut(&conv) else {
            return;
        };
        c.busy = Busy::Idle;
        match result {
            Ok(ack) => {
                c.done(sseq);
                if !ack.duplicate && sseq < c.stamped_sseq {
                    // Stamped after a newer input of its conversation: the fencing rules should
                    // make this impossible; count it, so an operator sees it if they ever fail.
                    tracing::error!(
                        partition = self.partition,
                        conv = %conv,
                        sseq,
                        newer = c.stamped_sseq,
                        "an input was stamped after a newer one of its conversation"
                    );
                    metrics::counter!("sequencer_late_inputs_total").increment(1);
                }
                c.stamped_sseq = c.stamped_sseq.max(sseq);
                if ack.duplicate {
                    // Stamped before (a redelivery, or a retry within the dedupe window): the
                    // original stands and the head is unchanged.
                    metrics::counter!("sequencer_duplicates_total").increment(1);
                } else if let Some(state) = c.state.as_mut() {
                    state.head = Head {
                        seq: message.seq,
                        stream_seq: ack.sequence,
                    };
                    state.exists = true;
                    // Sending implies having read everything before (as the store records it).
                    let m = state.marks.entry(message.from.clone()).or_default();
                    *m = (m.0.max(message.seq), m.1.max(message.seq));
                    if let (Some(roster), Some(event)) = (state.roster.as_mut(), &message.event) {
                        roster.apply(message.seq, &message.from, event);
                        metrics::counter!("sequencer_group_events_total").increment(1);
                    }
                    metrics::counter!("sequencer_stamped_total").increment(1);
                }
                if let Some(held) = self.held.get(&sseq)
                    && let Ok(info) = held.msg.info()
                {
                    let age = chat_protocol::now_ms()
                        .saturating_sub((info.published.unix_timestamp_nanos() / 1_000_000) as u64);
                    metrics::histogram!("sequencer_stamp_seconds").record(age as f64 / 1000.0);
                }
                self.ack_input(sseq).await;
                self.dispatch(&conv).await;
            }
            Err(PublishFailure::Fenced) => {
                tracing::warn!(
                    partition = self.partition,
                    conv = %conv,
                    "fenced: another owner stamped this conversation; abandoning the partition's \
                     work and its pull stream"
                );
                metrics::counter!("sequencer_fenced_total").increment(1);
                self.give_back().await;
                self.end_stream = true;
            }
            Err(PublishFailure::InProcess) => {
                c.state = None;
                self.retry_later(&conv, IN_PROCESS_DELAY);
            }
            Err(PublishFailure::Other(err)) => {
                tracing::warn!(conv = %conv, error = %err, "stamping failed, retrying");
                metrics::counter!("sequencer_stamp_errors_total").increment(1);
                // The publish may have landed: load the head again before the next try.
                c.state = None;
                self.retry_later(&conv, RETRY_DELAY);
            }
        }
    }

    async fn ack_input(&mut self, sseq: u64) {
        if let Some(held) = self.held.remove(&sseq) {
            self.ctx.held_bytes.fetch_sub(held.bytes, Ordering::Relaxed);
            ack(&held.msg).await;
        }
    }

    /// Naks everything held, forgets every conversation's state and ignores the results of
    /// work in flight.
    async fn give_back(&mut self) {
        metrics::counter!("sequencer_abandons_total").increment(1);
        self.epoch += 1;
        self.work = FuturesUnordered::new();
        self.convs.clear();
        self.nak_held().await;
    }

    /// Naks everything held, oldest stream seq first: the server redelivers naked messages in
    /// the order the naks arrive, so each conversation's inputs come back in their order.
    async fn nak_held(&mut self) {
        let mut held: Vec<(u64, Held)> = self.held.drain().collect();
        held.sort_unstable_by_key(|(sseq, _)| *sseq);
        for (_, held) in held {
            self.ctx.held_bytes.fetch_sub(held.bytes, Ordering::Relaxed);
            let _ = held.msg.ack_with(AckKind::Nak(None)).await;
        }
    }

    /// Stops owning the partition: no new dispatch, what is in flight is finished (bounded)
    /// and acked, everything else handed back.
    async fn release(&mut self) {
        self.releasing = true;
        let deadline = tokio::time::Instant::now() + RELEASE_WAIT;
        while !self.work.is_empty() {
            let Ok(next) = tokio::time::timeout_at(deadline, self.work.next()).await else {
                break;
            };
            let Some((epoch, done)) = next else { break };
            if epoch != self.epoch {
                continue;
            }
            match done {
                Done::Stamped {
                    conv,
                    sseq,
                    message,
                    result,
                } => self.on_stamped(conv, sseq, message, result).await,
                other @ Done::Receipts { .. } => self.on_done(other).await,
                _ => {}
            }
        }
        self.epoch += 1;
        self.work = FuturesUnordered::new();
        self.convs.clear();
        self.nak_held().await;
        self.paused_until = None;
        self.releasing = false;
    }
}

/// Refuses an inbound message for good: tells the sender (when there is one to tell) and
/// terminates the message, so it is never redelivered.
async fn refuse<S>(ctx: &Ctx<S>, reject: Reject, msg: jetstream::Message) {
    metrics::counter!("sequencer_refused_total").increment(1);
    tracing::info!(reason = %reject, "refusing inbound message");
    if let Reject::Refused {
        code,
        message,
        from,
        conv,
        id,
    } = reject
    {
        let mut frame = ErrorFrame::new(code, message);
        frame.id = id;
        frame.conv = Some(conv);
        let payload = serde_json::to_vec(&ServerFrame::Error(frame)).expect("frame encodes");
        let _ = ctx
            .client
            .publish(subjects::user(&from), payload.into())
            .await;
    }
    if let Err(err) = msg.ack_with(AckKind::Term).await {
        tracing::warn!(error = %err, "term of refused message failed");
    }
}

async fn ack(msg: &jetstream::Message) {
    if let Err(err) = msg.ack().await {
        // Redelivery is harmless: the dedupe id returns the stamped message, receipts only raise.
        tracing::warn!(error = %err, "ack failed");
    }
}

/// What a stamped message is made of: `(from, id, body, event, media)`.
type Planned = (
    String,
    String,
    String,
    Option<GroupEvent>,
    Option<Box<chat_protocol::frames::MediaRef>>,
);

/// What a send or group operation at the head of a queue becomes, or why it is refused.
fn plan(
    conv: &ConvId,
    state: &ConvState,
    valid: &Valid,
    group_max_members: u32,
) -> Result<Planned, membership::Refused> {
    match valid {
        Valid::Send(m) => {
            if state.roster.is_some() && !state.exists {
                return Err(membership::Refused {
                    code: ErrorCode::NotFound,
                    message: "no such group".into(),
                });
            }
            if let Some(roster) = &state.roster
                && !roster.contains(&m.from)
            {
                return Err(membership::Refused {
                    code: ErrorCode::NotMember,
                    message: NOT_MEMBER.into(),
                });
            }
            Ok((
                m.from.clone(),
                m.id.clone(),
                m.body.clone(),
                None,
                m.media.clone().map(Box::new),
            ))
        }
        Valid::Group(op) => {
            let current = state
                .roster
                .as_ref()
                .map(membership::Roster::members)
                .unwrap_or_default();
            debug_assert!(conv.is_group());
            let event = membership::plan(op, state.exists, &current, group_max_members)?;
            Ok((
                op.from.clone(),
                op.id.clone(),
                String::new(),
                Some(event),
                None,
            ))
        }
        Valid::Receipt(_) => unreachable!("receipts are coalesced, not planned"),
    }
}

/// The watermarks a run of receipts moves: per member, the highest of them, clamped to the
/// conversation's head (read implies delivered), where it is above what is stored. Receipts
/// of users who are not (or no longer) members of a group move nothing.
fn coalesce(state: &ConvState, receipts: &[(u64, InboundReceipt)]) -> Vec<(String, u64, u64)> {
    let head = state.head.seq;
    let mut wanted: HashMap<&str, (u64, u64)> = HashMap::new();
    for (_, r) in receipts {
        if state
            .roster
            .as_ref()
            .is_some_and(|roster| !roster.contains(&r.user))
        {
            continue;
        }
        let w = wanted.entry(r.user.as_str()).or_default();
        w.0 = w.0.max(r.delivered.max(r.read).min(head));
        w.1 = w.1.max(r.read.min(head));
    }
    let mut moved: Vec<(String, u64, u64)> = wanted
        .into_iter()
        .filter_map(|(user, (d, r))| {
            let (have_d, have_r) = state.marks.get(user).copied().unwrap_or((0, 0));
            (d > have_d || r > have_r).then(|| (user.to_owned(), d.max(have_d), r.max(have_r)))
        })
        .collect();
    moved.sort();
    moved
}

/// Publishes `message` as the conversation's next seq, fenced on `head` over every partition's
/// subject of the conversation, deduplicated by its client id.
async fn publish_message<S: MessageStore>(
    ctx: Arc<Ctx<S>>,
    conv: ConvId,
    partition: u32,
    head: Head,
    sseq: u64,
    message: Message,
) -> Done {
    let payload =
        serde_json::to_vec(&ServerFrame::Message(message.clone())).expect("frame encodes");
    let mut headers = HeaderMap::new();
    headers.insert(
        async_nats::header::NATS_MESSAGE_ID,
        dedupe_id(conv.as_str(), &message.from, &message.id).as_str(),
    );
    headers.insert(
        async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
        head.stream_seq.to_string().as_str(),
    );
    headers.insert(
        "Nats-Expected-Last-Subject-Sequence-Subject",
        subjects::stamped_any(&conv).as_str(),
    );
    headers.insert(STAMPER_HEADER, ctx.instance.as_str());
    let result = match ctx
        .js
        .publish_with_headers(subjects::stamped(&conv, partition), headers, payload.into())
        .await
    {
        Ok(ack) => ack.await.map_err(classify),
        Err(err) => Err(classify(err)),
    };
    Done::Stamped {
        conv: conv.to_string(),
        sseq,
        message,
        result,
    }
}

/// Publishes one `receipt` per member whose watermarks moved.
async fn publish_receipts<S: MessageStore>(
    ctx: Arc<Ctx<S>>,
    conv: ConvId,
    partition: u32,
    key: String,
    sseqs: Vec<u64>,
    marks: Vec<(String, u64, u64)>,
) -> Done {
    let mut acks = Vec::with_capacity(marks.len());
    let mut result = Ok(());
    for (user, delivered, read) in &marks {
        let receipt = Receipt {
            conv: conv.to_string(),
            user: user.clone(),
            delivered: *delivered,
            read: *read,
        };
        let payload = serde_json::to_vec(&ServerFrame::Receipt(receipt)).expect("frame encodes");
        let mut headers = HeaderMap::new();
        headers.insert(
            async_nats::header::NATS_MESSAGE_ID,
            format!("rcpt:{conv}:{user}:{delivered}:{read}").as_str(),
        );
        headers.insert(STAMPER_HEADER, ctx.instance.as_str());
        match ctx
            .js
            .publish_with_headers(
                subjects::receipts(&conv, partition),
                headers,
                payload.into(),
            )
            .await
        {
            Ok(ack) => acks.push(ack),
            Err(err) => {
                result = Err(classify(err));
                break;
            }
        }
    }
    for ack in acks {
        if let Err(err) = ack.await
            && result.is_ok()
        {
            result = Err(classify(err));
        }
    }
    Done::Receipts {
        conv: key,
        sseqs,
        marks,
        result,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receipt(user: &str, delivered: u64, read: u64) -> (u64, InboundReceipt) {
        (
            0,
            InboundReceipt {
                conv: "dm~a~b".into(),
                user: user.into(),
                device: "d".into(),
                delivered,
                read,
            },
        )
    }

    fn queued(sseq: u64) -> Queued {
        let (_, r) = receipt("a", sseq, 0);
        Queued {
            sseq,
            valid: Valid::Receipt(r),
        }
    }

    #[test]
    fn a_stamped_input_leaves_the_queue_even_when_an_older_one_was_queued_ahead_of_it() {
        let mut conv = Conv {
            id: ConvId::parse("dm~a~b").unwrap(),
            state: None,
            busy: Busy::Working,
            queue: VecDeque::new(),
            last_used: Instant::now(),
            stamped_sseq: 0,
        };
        conv.enqueue(queued(5));
        conv.enqueue(queued(7));
        // 5 is in flight when a redelivery of 3 arrives and goes ahead of it.
        conv.enqueue(queued(3));
        conv.done(5);
        let left: Vec<u64> = conv.queue.iter().map(|q| q.sseq).collect();
        assert_eq!(left, vec![3, 7]);
    }

    #[test]
    fn a_burst_of_receipts_is_one_watermark_per_member_clamped_to_the_head() {
        let mut state = ConvState {
            head: Head {
                seq: 10,
                stream_seq: 99,
            },
            ..ConvState::default()
        };
        state.marks.insert("a".into(), (4, 2));
        let burst = [
            receipt("a", 5, 0),
            receipt("a", 7, 0),
            receipt("b", 0, 3),
            receipt("a", 0, 6),
            receipt("b", 12, 0),
            receipt("a", 3, 3),
        ];
        assert_eq!(
            coalesce(&state, &burst),
            vec![("a".into(), 7, 6), ("b".into(), 10, 3)]
        );
        // Nothing above what is stored: nothing to stamp.
        state.marks.insert("a".into(), (7, 6));
        state.marks.insert("b".into(), (10, 3));
        assert!(coalesce(&state, &burst).is_empty());
    }

    #[test]
    fn receipts_of_non_members_of_a_group_move_nothing() {
        let mut roster = membership::Roster::default();
        roster.apply(
            1,
            "a",
            &GroupEvent::Created {
                name: "t".into(),
                members: vec![],
            },
        );
        let state = ConvState {
            head: Head {
                seq: 3,
                stream_seq: 3,
            },
            roster: Some(roster),
            ..ConvState::default()
        };
        assert_eq!(
            coalesce(&state, &[receipt("a", 2, 2), receipt("zed", 3, 3)]),
            vec![("a".into(), 2, 2)]
        );
    }
}
