//! Stamping: one inbound message at a time per partition, in stream order.
//!
//! The next seq of a conversation is the last stamped seq + 1, where "last" comes from the
//! conversation's own subject in `CHAT_MSGS`. The publish carries
//! `Nats-Expected-Last-Subject-Sequence` (the stream sequence of that last message), so a stale
//! owner — paused, partitioned, or simply racing — is refused by JetStream instead of stamping a
//! duplicate or out-of-place seq. It carries `Nats-Msg-Id` too, so re-stamping a redelivered
//! message returns the original instead of a second copy.
//!
//! Receipts (`delivered` / `read`) come through the same partition, so they are checked by the
//! same owner. They are clamped to the conversation's head, merged with the member's stored
//! watermarks (which only grow) and, when they moved, published to `chat.rcpt.<p>.<conv>` — a
//! subject of their own, so the message fence never sees them.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use async_nats::{
    HeaderMap,
    jetstream::{self, AckKind, context::PublishErrorKind, stream::DirectGetErrorKind},
};
use chat_protocol::{
    api::{Inbound, InboundGroup, InboundMessage, InboundReceipt, dedupe_id},
    frames::{ErrorCode, ErrorFrame, GroupEvent, MediaRef, Message, Receipt, ServerFrame},
    ids::{ClientMsgId, ConvId, UserId},
    subjects,
};
use chat_store::{Change, MessageStore, StoredMessage, StoredReceipt};

use crate::groups;

/// Last stamped position of a conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Head {
    seq: u64,
    /// Stream sequence of that message in `CHAT_MSGS` (0: none on the subject).
    stream_seq: u64,
}

/// Failures of one stamping attempt.
#[derive(Debug, thiserror::Error)]
pub enum StampError {
    #[error("reading the conversation head failed: {0}")]
    Head(String),
    #[error("publishing the stamped message failed: {0}")]
    Publish(String),
    #[error("store: {0}")]
    Store(#[from] chat_store::StoreError),
    #[error("fenced {0} times in a row")]
    Fenced(u32),
    #[error("the store holds seq {have} of the conversation, the stream {want}")]
    StoreBehind { have: u64, want: u64 },
}

/// Why an inbound message is refused for good (never stamped).
#[derive(Debug, thiserror::Error)]
enum Reject {
    #[error("undecodable inbound message: {0}")]
    Undecodable(String),
    #[error("invalid id: {0}")]
    InvalidId(#[from] chat_protocol::ids::IdError),
    #[error("subject does not match the conversation")]
    SubjectMismatch,
    #[error("{code:?}: {message}")]
    Refused {
        code: ErrorCode,
        message: String,
        from: UserId,
        conv: String,
        id: Option<String>,
    },
}

/// How handling a valid inbound message can fail.
#[derive(Debug)]
enum Failure {
    /// Refused for good: the sender gets this error.
    Refused(groups::Refused),
    /// Try again (the message is redelivered).
    Retry(StampError),
}

impl<E: Into<StampError>> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure::Retry(e.into())
    }
}

fn not_member() -> Failure {
    Failure::Refused(groups::Refused {
        code: ErrorCode::NotMember,
        message: "you are not a member of this conversation".into(),
    })
}

/// A validated inbound message.
enum Valid {
    Send(InboundMessage),
    Receipt(InboundReceipt),
    Group(InboundGroup),
}

const MAX_FENCE_RETRIES: u32 = 5;

/// How long stamping a conversation waits for the store follower to reach the conversation's
/// head (after a takeover or a restart) before handing the message back for redelivery.
const STORE_CATCH_UP: Duration = Duration::from_secs(2);

pub struct Stamper<S> {
    js: jetstream::Context,
    client: async_nats::Client,
    stamped: jetstream::stream::Stream,
    store: S,
    heads: Mutex<HashMap<String, Head>>,
    instance: String,
    group_max_members: u32,
}

/// Header naming the sequencer instance that stamped a message (for operators and tests).
pub const STAMPER_HEADER: &str = "Chat-Stamper";

impl<S: MessageStore> Stamper<S> {
    pub async fn new(
        client: async_nats::Client,
        store: S,
        instance: String,
        group_max_members: u32,
    ) -> Result<Arc<Self>, async_nats::Error> {
        let js = jetstream::new(client.clone());
        let stamped = js.get_stream(subjects::STREAM_STAMPED).await?;
        Ok(Arc::new(Self {
            js,
            client,
            stamped,
            store,
            heads: Mutex::new(HashMap::new()),
            instance,
            group_max_members,
        }))
    }

    /// Handles one delivery of the partition consumer: stamp, store, then ack.
    pub async fn handle(&self, partition: u32, msg: jetstream::Message) {
        let started = std::time::Instant::now();
        let (valid, conv) = match self.validate(partition, &msg) {
            Ok(valid) => valid,
            Err(reject) => return self.refuse(reject, msg).await,
        };
        let (kind, from, id) = match &valid {
            Valid::Send(m) => ("send", m.from.clone(), Some(m.id.clone())),
            Valid::Receipt(r) => ("receipt", r.user.clone(), None),
            Valid::Group(g) => ("group", g.from.clone(), Some(g.id.clone())),
        };
        let outcome = match &valid {
            Valid::Send(inbound) => self.stamp(inbound, &conv).await.map(|seq| {
                tracing::debug!(conv = %conv, seq, "stamped");
                "stamped"
            }),
            Valid::Receipt(receipt) => self
                .receipt(receipt, &conv)
                .await
                .map(|moved| if moved { "moved" } else { "unchanged" }),
            Valid::Group(op) => self.group(op, &conv).await.map(|_| "stamped"),
        };
        match outcome {
            Ok(result) => {
                if let Err(err) = msg.ack().await {
                    // Redelivery is harmless: the dedupe id returns the stored message, and
                    // receipts only raise.
                    tracing::warn!(error = %err, "ack failed after handling");
                }
                metrics::counter!("sequencer_handled_total", "kind" => kind, "result" => result)
                    .increment(1);
                if kind == "send" {
                    metrics::counter!("sequencer_stamped_total").increment(1);
                    metrics::histogram!("sequencer_stamp_seconds")
                        .record(started.elapsed().as_secs_f64());
                }
            }
            Err(Failure::Refused(r)) => {
                let reject = Reject::Refused {
                    code: r.code,
                    message: r.message,
                    from: UserId::parse(&from).expect("validated"),
                    conv: conv.to_string(),
                    id,
                };
                self.refuse(reject, msg).await;
            }
            Err(Failure::Retry(err)) => {
                metrics::counter!("sequencer_stamp_errors_total").increment(1);
                tracing::warn!(conv = %conv, kind, error = %err, "handling failed, will be redelivered");
                let _ = msg
                    .ack_with(AckKind::Nak(Some(Duration::from_millis(200))))
                    .await;
            }
        }
    }

    fn validate(
        &self,
        partition: u32,
        msg: &jetstream::Message,
    ) -> Result<(Valid, ConvId), Reject> {
        let inbound: Inbound =
            serde_json::from_slice(&msg.payload).map_err(|e| Reject::Undecodable(e.to_string()))?;
        let (conv, from, id) = match &inbound {
            Inbound::Send(m) => {
                ClientMsgId::parse(&m.id)?;
                (&m.conv, &m.from, Some(&m.id))
            }
            Inbound::Receipt(r) => (&r.conv, &r.user, None),
            Inbound::Group(g) => {
                ClientMsgId::parse(&g.id)?;
                (&g.conv, &g.from, Some(&g.id))
            }
        };
        let conv = ConvId::parse(conv)?;
        let from = UserId::parse(from)?;
        if subjects::split_partitioned(&msg.subject) != Some((partition, conv.as_str())) {
            return Err(Reject::SubjectMismatch);
        }
        // Group membership is checked against the store once the head is loaded.
        let refuse = |code, message: &str| Reject::Refused {
            code,
            message: message.into(),
            from: from.clone(),
            conv: conv.to_string(),
            id: id.cloned(),
        };
        if !conv.is_group() && !conv.is_direct_member(&from) {
            return Err(refuse(
                ErrorCode::NotMember,
                "you are not a member of this conversation",
            ));
        }
        let valid = match inbound {
            Inbound::Send(m) => Valid::Send(m),
            Inbound::Receipt(r) => Valid::Receipt(r),
            Inbound::Group(_) if !conv.is_group() => {
                return Err(refuse(
                    ErrorCode::InvalidId,
                    "group operations need a group conversation (`g~<id>`)",
                ));
            }
            Inbound::Group(g) => Valid::Group(g),
        };
        Ok((valid, conv))
    }

    /// Refuses an inbound message for good: tells the sender (when there is one to tell) and
    /// terminates the message, so it is never redelivered.
    async fn refuse(&self, reject: Reject, msg: jetstream::Message) {
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
            let _ = self
                .client
                .publish(subjects::user(&from), payload.into())
                .await;
        }
        if let Err(err) = msg.ack_with(AckKind::Term).await {
            tracing::warn!(error = %err, "term of refused message failed");
        }
    }

    /// Refuses a message of a group the sender is not (or no longer) a member of. The head
    /// must be loaded first: only then does the store hold the group's latest membership.
    async fn check_member(&self, conv: &ConvId, user: &str) -> Result<(), Failure> {
        if !conv.is_group() {
            return Ok(());
        }
        match self.store.member(conv.as_str(), user).await? {
            Some(m) if m.left.is_none() => Ok(()),
            _ => Err(not_member()),
        }
    }

    /// Applies one `group` frame: checks it against the group as it stands and stamps the
    /// resulting event. Returns its seq.
    async fn group(&self, op: &InboundGroup, conv: &ConvId) -> Result<u64, Failure> {
        if let Some(seq) = self
            .store
            .seq_for_client_id(conv.as_str(), &op.from, &op.id)
            .await?
        {
            return Ok(seq);
        }
        let head = self.head(conv, &subjects::stamped(conv)).await?;
        let exists = head.seq > 0 || self.store.conversation(conv.as_str()).await?.is_some();
        let current = groups::current_members(&self.store, conv).await?;
        let event =
            groups::plan(op, exists, &current, self.group_max_members).map_err(Failure::Refused)?;
        let seq = self
            .publish(conv, &op.from, &op.id, String::new(), Some(event), None)
            .await?;
        metrics::counter!("sequencer_group_events_total").increment(1);
        Ok(seq)
    }

    /// Stamps one message (or finds its earlier stamp) and stores it. Returns its seq.
    async fn stamp(&self, inbound: &InboundMessage, conv: &ConvId) -> Result<u64, Failure> {
        if let Some(seq) = self
            .store
            .seq_for_client_id(conv.as_str(), &inbound.from, &inbound.id)
            .await?
        {
            return Ok(seq);
        }
        self.head(conv, &subjects::stamped(conv)).await?;
        self.check_member(conv, &inbound.from).await?;
        let (body, media) = (inbound.body.clone(), inbound.media.clone());
        let seq = self
            .publish(conv, &inbound.from, &inbound.id, body, None, media)
            .await?;
        Ok(seq)
    }

    /// Publishes the next message of `conv` (fenced on its head, deduplicated by the client
    /// id) and stores it, or, when it was stamped before, stores the original. Returns its seq.
    async fn publish(
        &self,
        conv: &ConvId,
        from: &str,
        id: &str,
        body: String,
        event: Option<GroupEvent>,
        media: Option<MediaRef>,
    ) -> Result<u64, StampError> {
        let subject = subjects::stamped(conv);
        for _ in 0..MAX_FENCE_RETRIES {
            let head = self.head(conv, &subject).await?;
            let message = Message {
                conv: conv.to_string(),
                seq: head.seq + 1,
                from: from.to_owned(),
                id: id.to_owned(),
                ts: chat_protocol::now_ms(),
                body: body.clone(),
                event: event.clone(),
                media: media.clone().map(Box::new),
            };
            let payload =
                serde_json::to_vec(&ServerFrame::Message(message.clone())).expect("frame encodes");
            let mut headers = HeaderMap::new();
            headers.insert(
                async_nats::header::NATS_MESSAGE_ID,
                dedupe_id(conv.as_str(), from, id).as_str(),
            );
            headers.insert(
                async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
                head.stream_seq.to_string().as_str(),
            );
            headers.insert(STAMPER_HEADER, self.instance.as_str());
            let ack = match self
                .js
                .publish_with_headers(subject.clone(), headers, payload.into())
                .await
            {
                Ok(fut) => fut.await,
                Err(e) => Err(e),
            };
            match ack {
                Ok(ack) if !ack.duplicate => {
                    self.set_head(
                        conv,
                        Head {
                            seq: message.seq,
                            stream_seq: ack.sequence,
                        },
                    );
                    self.store
                        .apply(vec![groups::change_for(conv, message, ack.sequence)], None)
                        .await?;
                    return Ok(head.seq + 1);
                }
                Ok(ack) => {
                    // Stamped before (a redelivery, or a retry through another gateway): store
                    // the original, never a second copy.
                    self.forget_head(conv);
                    let original = self.load_stamped(ack.sequence).await?;
                    let seq = original.seq;
                    self.store
                        .apply(vec![groups::change_for(conv, original, ack.sequence)], None)
                        .await?;
                    metrics::counter!("sequencer_duplicates_total").increment(1);
                    return Ok(seq);
                }
                Err(err) if err.kind() == PublishErrorKind::WrongLastSequence => {
                    // Someone else stamped this conversation since we read its head.
                    metrics::counter!("sequencer_fenced_total").increment(1);
                    tracing::info!(conv = %conv, "fenced: conversation head moved, reloading");
                    self.forget_head(conv);
                }
                Err(err) => {
                    self.forget_head(conv);
                    return Err(StampError::Publish(err.to_string()));
                }
            }
        }
        Err(StampError::Fenced(MAX_FENCE_RETRIES))
    }

    /// Applies one receipt: clamps it to the conversation's head, merges it with the member's
    /// stored watermarks and, if they moved, publishes and stores the new ones. Returns whether
    /// they moved.
    async fn receipt(&self, r: &InboundReceipt, conv: &ConvId) -> Result<bool, Failure> {
        let subject = subjects::stamped(conv);
        let wanted = r.delivered.max(r.read);
        let mut head = self.head(conv, &subject).await?;
        self.check_member(conv, &r.user).await?;
        if wanted > head.seq {
            // The cached head may predate stamps by another owner: never clamp against it.
            self.forget_head(conv);
            head = self.head(conv, &subject).await?;
        }
        let (delivered, read) = (wanted.min(head.seq), r.read.min(head.seq));
        let marks = self.store.watermarks(conv.as_str()).await?;
        let current = marks.iter().find(|m| m.user == r.user);
        let (have_delivered, have_read) = current.map_or((0, 0), |m| (m.delivered, m.read));
        if delivered <= have_delivered && read <= have_read {
            return Ok(false);
        }
        let receipt = Receipt {
            conv: r.conv.clone(),
            user: r.user.clone(),
            delivered: delivered.max(have_delivered),
            read: read.max(have_read),
        };
        let payload =
            serde_json::to_vec(&ServerFrame::Receipt(receipt.clone())).expect("frame encodes");
        let mut headers = HeaderMap::new();
        headers.insert(
            async_nats::header::NATS_MESSAGE_ID,
            format!(
                "rcpt:{}:{}:{}:{}",
                receipt.conv, receipt.user, receipt.delivered, receipt.read
            )
            .as_str(),
        );
        headers.insert(STAMPER_HEADER, self.instance.as_str());
        let ack = match self
            .js
            .publish_with_headers(subjects::receipts(conv), headers, payload.into())
            .await
        {
            Ok(fut) => fut.await,
            Err(e) => Err(e),
        }
        .map_err(|e| StampError::Publish(e.to_string()))?;
        let stored = StoredReceipt {
            conv: receipt.conv,
            user: receipt.user,
            delivered: receipt.delivered,
            read: receipt.read,
            stream_seq: ack.sequence,
        };
        self.store
            .apply(vec![Change::receipt(stored, members(conv))], None)
            .await?;
        Ok(true)
    }

    async fn head(&self, conv: &ConvId, subject: &str) -> Result<Head, StampError> {
        if let Some(head) = self.heads.lock().expect("heads lock").get(conv.as_str()) {
            return Ok(*head);
        }
        let head = match self.stamped.direct_get_last_for_subject(subject).await {
            Ok(last) => {
                let msg = decode_stamped(&last.payload, last.sequence)?;
                // The client-id index is what dedupes retries older than the JetStream window;
                // it only answers for this conversation once the store holds its head.
                self.wait_for_store(conv, msg.seq).await?;
                Head {
                    seq: msg.seq,
                    stream_seq: last.sequence,
                }
            }
            Err(err) if err.kind() == DirectGetErrorKind::NotFound => {
                // Nothing on the subject (new conversation, or aged out of the stream): continue
                // after what the store has, and expect no message on the subject.
                let seq = self.store.latest_seq(conv.as_str()).await?.unwrap_or(0);
                Head { seq, stream_seq: 0 }
            }
            Err(err) => return Err(StampError::Head(err.to_string())),
        };
        self.set_head(conv, head);
        Ok(head)
    }

    async fn wait_for_store(&self, conv: &ConvId, seq: u64) -> Result<(), StampError> {
        crate::api::wait_until(STORE_CATCH_UP, seq, || async {
            Ok(self.store.latest_seq(conv.as_str()).await?.unwrap_or(0))
        })
        .await
        .map_err(|e| match e {
            crate::api::Behind::Store(e) => StampError::Store(e),
            crate::api::Behind::At { have, want } => StampError::StoreBehind { have, want },
        })
    }

    async fn load_stamped(&self, stream_seq: u64) -> Result<Message, StampError> {
        let raw = self
            .stamped
            .direct_get(stream_seq)
            .await
            .map_err(|e| StampError::Head(e.to_string()))?;
        decode_stamped(&raw.payload, stream_seq)
    }

    fn set_head(&self, conv: &ConvId, head: Head) {
        self.heads
            .lock()
            .expect("heads lock")
            .insert(conv.as_str().to_owned(), head);
    }

    fn forget_head(&self, conv: &ConvId) {
        self.heads.lock().expect("heads lock").remove(conv.as_str());
    }
}

/// Decodes a `CHAT_MSGS` payload (a `message` frame).
pub fn decode_stamped(payload: &[u8], stream_seq: u64) -> Result<Message, StampError> {
    match serde_json::from_slice(payload) {
        Ok(ServerFrame::Message(m)) => Ok(m),
        _ => Err(StampError::Head(format!(
            "stream message {stream_seq} is not a message frame"
        ))),
    }
}

/// Decodes a `CHAT_MSGS` receipt event (a `receipt` frame on `chat.rcpt.<p>.<conv>`).
pub fn decode_receipt(payload: &[u8], stream_seq: u64) -> Result<StoredReceipt, StampError> {
    match serde_json::from_slice(payload) {
        Ok(ServerFrame::Receipt(r)) => Ok(StoredReceipt {
            conv: r.conv,
            user: r.user,
            delivered: r.delivered,
            read: r.read,
            stream_seq,
        }),
        _ => Err(StampError::Head(format!(
            "stream message {stream_seq} is not a receipt frame"
        ))),
    }
}

/// The users whose conversation index a change of `conv` touches.
pub fn members(conv: &ConvId) -> Vec<String> {
    conv.direct_members()
        .map(|m| m.iter().map(|u| u.to_string()).collect())
        .unwrap_or_default()
}

/// The store record of a stamped message.
pub fn stored(m: Message, stream_seq: u64) -> StoredMessage {
    StoredMessage {
        conv: m.conv,
        seq: m.seq,
        from: m.from,
        client_id: m.id,
        ts_ms: m.ts,
        body: m.body,
        stream_seq,
        event: m
            .event
            .map(|e| serde_json::to_string(&e).expect("event encodes")),
        media: m
            .media
            .map(|e| serde_json::to_string(&e).expect("media encodes")),
    }
}
