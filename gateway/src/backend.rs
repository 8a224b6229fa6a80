//! What a connection needs from NATS, behind a small trait so the connection logic can be
//! tested over channels with an in-memory backend.

use std::{future::Future, time::Duration};

use async_nats::{
    Subject,
    jetstream::{self, message::PublishMessage},
};
use bytes::Bytes;
use chat_protocol::{
    api::{
        ConversationsReply, ConversationsRequest, GroupInfoReply, GroupInfoRequest, HistoryReply,
        HistoryRequest, MediaVerifyReply, MediaVerifyRequest, ReceiptsReply, ReceiptsRequest,
        SyncReply, SyncRequest,
    },
    ids::ConvId,
    subjects,
};
use futures::{FutureExt, future::BoxFuture};
use serde::{Serialize, de::DeserializeOwned};

/// Why the backend could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("no answer within {0:?}")]
    TimedOut(Duration),
    #[error("no responders")]
    NoResponders,
    #[error("nats: {0}")]
    Nats(String),
    #[error("malformed reply: {0}")]
    BadReply(String),
}

/// The JetStream ack of one publish, awaited separately so several can be outstanding while
/// publishes still leave in order.
pub type PendingAck = BoxFuture<'static, Result<(), BackendError>>;

/// A request to one of the APIs the gateway asks on a client's behalf (core NATS
/// request/reply, JSON both ways): the subject it goes to and the reply it gets.
pub trait ApiRequest: Serialize + Send + Sync + 'static {
    const SUBJECT: &'static str;
    type Reply: DeserializeOwned + Send + 'static;
}

macro_rules! api_request {
    ($($req:ty => $rep:ty, $subject:expr;)*) => {$(
        impl ApiRequest for $req {
            const SUBJECT: &'static str = $subject;
            type Reply = $rep;
        }
    )*};
}

api_request! {
    HistoryRequest => HistoryReply, subjects::HISTORY_API;
    SyncRequest => SyncReply, subjects::SYNC_API;
    ReceiptsRequest => ReceiptsReply, subjects::RECEIPTS_API;
    ConversationsRequest => ConversationsReply, subjects::CONVERSATIONS_API;
    GroupInfoRequest => GroupInfoReply, subjects::GROUP_INFO_API;
    MediaVerifyRequest => MediaVerifyReply, subjects::MEDIA_VERIFY_API;
}

/// The gateway's side of NATS, as one connection uses it.
pub trait Backend: Clone + Send + Sync + 'static {
    /// Publishes one send or receipt to `CHAT_IN`. `msg_id` is the `Nats-Msg-Id` (sends; receipts
    /// are idempotent and go without). Resolves once the message is on its way (in order with
    /// earlier publishes); the returned [`PendingAck`] resolves when JetStream stored it.
    fn publish(
        &self,
        conv: &ConvId,
        msg_id: Option<String>,
        payload: Bytes,
    ) -> impl Future<Output = Result<PendingAck, BackendError>> + Send;

    /// Asks the API responders of `R` (history, sync, receipts, conversations, group info,
    /// media check), bounded by the request timeout.
    fn request<R: ApiRequest>(
        &self,
        request: &R,
    ) -> impl Future<Output = Result<R::Reply, BackendError>> + Send;
}

/// The real backend: a NATS client and a JetStream context over it.
#[derive(Clone)]
pub struct NatsBackend {
    client: async_nats::Client,
    js: jetstream::Context,
    /// Deadline of API requests.
    request_timeout: Duration,
    /// Delivery confirmations, batched per requester by [`confirm_batches`].
    confirms: tokio::sync::mpsc::Sender<Subject>,
}

/// Confirmations waiting to be batched, gateway-wide; beyond it they are sent one by one.
const CONFIRM_QUEUE: usize = 65_536;
/// How long a confirmation may wait for others of the same requester.
const CONFIRM_GATHER: Duration = Duration::from_millis(2);
/// Most confirmations in one batch message.
const CONFIRM_BATCH: usize = 512;

/// Sends queued delivery confirmations: those whose reply subjects share a prefix (one fan-out
/// worker's inbox) as one message to `<prefix>.c` listing their tokens, instead of one empty
/// reply each (`chat_protocol::subjects::confirm_batch`); a confirmation with no other of its
/// requester in the batch is an ordinary empty reply.
async fn confirm_batches(client: async_nats::Client, mut rx: tokio::sync::mpsc::Receiver<Subject>) {
    use std::collections::HashMap;
    let mut batch = Vec::with_capacity(CONFIRM_BATCH);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        let deadline = tokio::time::Instant::now() + CONFIRM_GATHER;
        while batch.len() < CONFIRM_BATCH {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(reply)) => batch.push(reply),
                Ok(None) | Err(_) => break,
            }
        }
        let mut by_prefix: HashMap<&str, Vec<&Subject>> = HashMap::new();
        for reply in &batch {
            match subjects::split_reply(reply) {
                Some((prefix, _)) => by_prefix.entry(prefix).or_default().push(reply),
                None => {
                    let _ = client.publish(reply.clone(), Bytes::new()).await;
                }
            }
        }
        for (prefix, replies) in by_prefix {
            // One alone is an ordinary reply, which any requester understands.
            if let [reply] = replies[..] {
                let _ = client.publish(reply.clone(), Bytes::new()).await;
                continue;
            }
            let tokens: Vec<&str> = replies
                .iter()
                .filter_map(|r| subjects::split_reply(r).map(|(_, token)| token))
                .collect();
            let _ = client
                .publish(subjects::confirm_batch(prefix), tokens.join(",").into())
                .await;
        }
        batch.clear();
    }
}

impl NatsBackend {
    pub fn new(
        client: async_nats::Client,
        publish_timeout: Duration,
        request_timeout: Duration,
    ) -> Self {
        let js = jetstream::ContextBuilder::new()
            .timeout(publish_timeout)
            // Wait for a permit rather than fail when many acks are outstanding gateway-wide;
            // each connection bounds its own share (`max_inflight_sends`) and its deadline.
            .backpressure_on_inflight(true)
            .build(client.clone());
        let (confirms, rx) = tokio::sync::mpsc::channel(CONFIRM_QUEUE);
        tokio::spawn(confirm_batches(client.clone(), rx));
        Self {
            client,
            js,
            request_timeout,
            confirms,
        }
    }

    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// One request to an API responder (history, sync, receipts), bounded by the request
    /// timeout; the reply is decoded as `Rep`.
    async fn api_request<Req, Rep>(
        &self,
        subject: &'static str,
        request: &Req,
    ) -> Result<Rep, BackendError>
    where
        Req: Serialize,
        Rep: DeserializeOwned,
    {
        use async_nats::RequestErrorKind;
        let payload = serde_json::to_vec(request).expect("api requests always serialize");
        let reply = self
            .client
            .send_request(
                subject,
                async_nats::Request::new()
                    .payload(payload.into())
                    .timeout(Some(self.request_timeout)),
            )
            .await
            .map_err(|e| match e.kind() {
                RequestErrorKind::TimedOut => BackendError::TimedOut(self.request_timeout),
                RequestErrorKind::NoResponders => BackendError::NoResponders,
                _ => BackendError::Nats(e.to_string()),
            })?;
        serde_json::from_slice(&reply.payload).map_err(|e| BackendError::BadReply(e.to_string()))
    }
}

impl Backend for NatsBackend {
    async fn publish(
        &self,
        conv: &ConvId,
        msg_id: Option<String>,
        payload: Bytes,
    ) -> Result<PendingAck, BackendError> {
        let mut message = PublishMessage::build().payload(payload);
        if let Some(msg_id) = msg_id {
            message = message.message_id(msg_id);
        }
        let ack = self
            .js
            .send_publish(subjects::inbound(conv), message)
            .await
            .map_err(|e| BackendError::Nats(e.to_string()))?;
        Ok(async move {
            ack.await
                .map(|_| ())
                .map_err(|e| BackendError::Nats(e.to_string()))
        }
        .boxed())
    }

    async fn request<R: ApiRequest>(&self, request: &R) -> Result<R::Reply, BackendError> {
        self.api_request(R::SUBJECT, request).await
    }
}

impl NatsBackend {
    /// Answers a delivery confirmation request: a device here took the push. Core NATS, not
    /// flushed; confirmations to the same requester within 2 ms go as one message.
    pub(crate) fn confirm(&self, reply: Subject) {
        match self.confirms.try_send(reply) {
            Ok(()) => {}
            Err(tokio::sync::mpsc::error::TrySendError::Full(reply)) => {
                let client = self.client.clone();
                tokio::spawn(async move {
                    if let Err(err) = client.publish(reply, Bytes::new()).await {
                        tracing::debug!(error = %err, "delivery confirmation failed");
                    }
                });
            }
            Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => {
                tracing::debug!("the confirmation sender stopped");
            }
        }
    }
}
