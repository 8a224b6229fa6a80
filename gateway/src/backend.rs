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
    ids::{ConvId, UserId},
    subjects,
};
use futures::{FutureExt, StreamExt, future::BoxFuture, stream::BoxStream};
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

/// One message of a user's subject: a complete server frame, and the reply subject of a
/// delivery confirmation request (fan-out workers ask whether any device took the message).
#[derive(Debug, Clone)]
pub struct Push {
    pub payload: Bytes,
    pub reply: Option<Subject>,
}

/// The messages arriving on one user's subject.
pub type Pushes = BoxStream<'static, Push>;

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

    /// Asks the history responders for a page.
    fn history(
        &self,
        request: &HistoryRequest,
    ) -> impl Future<Output = Result<HistoryReply, BackendError>> + Send;

    /// Asks the sync responders for a page.
    fn sync(
        &self,
        request: &SyncRequest,
    ) -> impl Future<Output = Result<SyncReply, BackendError>> + Send;

    /// Asks the receipts responders for a conversation's watermarks.
    fn receipts(
        &self,
        request: &ReceiptsRequest,
    ) -> impl Future<Output = Result<ReceiptsReply, BackendError>> + Send;

    /// Asks for a page of the user's conversations.
    fn conversations(
        &self,
        request: &ConversationsRequest,
    ) -> impl Future<Output = Result<ConversationsReply, BackendError>> + Send;

    /// Asks for a group's members.
    fn group_info(
        &self,
        request: &GroupInfoRequest,
    ) -> impl Future<Output = Result<GroupInfoReply, BackendError>> + Send;

    /// Asks the media service to check (and claim) the upload a media message references.
    fn verify_media(
        &self,
        request: &MediaVerifyRequest,
    ) -> impl Future<Output = Result<MediaVerifyReply, BackendError>> + Send;

    /// Subscribes to a large group's subject (`chat.grp.<conv>`); resolves once the server has
    /// the subscription.
    fn subscribe_group(
        &self,
        conv: &ConvId,
    ) -> impl Future<Output = Result<Pushes, BackendError>> + Send;

    /// Answers a delivery confirmation request: this device took the push. Core NATS, not
    /// flushed; confirmations to the same requester within 2 ms go as one message.
    fn confirm(&self, reply: Subject) -> impl Future<Output = Result<(), BackendError>> + Send;
}

/// The real backend: a NATS client and a JetStream context over it.
#[derive(Clone)]
pub struct NatsBackend {
    client: async_nats::Client,
    js: jetstream::Context,
    /// Deadline of history, sync and receipts requests.
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
/// reply each (`chat_protocol::subjects::confirm_batch`).
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
            if let [reply] = replies.as_slice() {
                // Alone: a plain empty reply, which any requester understands.
                let _ = client.publish((*reply).clone(), Bytes::new()).await;
                continue;
            }
            let tokens: Vec<&str> = replies
                .iter()
                .filter_map(|r| subjects::split_reply(r).map(|(_, t)| t))
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

    /// Subscribes to `user`'s subject and waits until the server has registered the
    /// subscription, so nothing published after this returns is missed.
    pub async fn subscribe_user(&self, user: &UserId) -> Result<Pushes, BackendError> {
        self.subscribe(subjects::user(user)).await
    }

    async fn subscribe(&self, subject: String) -> Result<Pushes, BackendError> {
        let sub = self
            .client
            .subscribe(subject)
            .await
            .map_err(|e| BackendError::Nats(e.to_string()))?;
        self.server_round_trip().await?;
        Ok(sub
            .map(|m| Push {
                payload: m.payload,
                reply: m.reply,
            })
            .boxed())
    }

    /// Returns once the server processed everything this client sent before. (`flush` only
    /// empties the local write buffer.) A request to a fresh inbox nobody serves is answered
    /// "no responders" by the server itself, in order with our earlier commands.
    async fn server_round_trip(&self) -> Result<(), BackendError> {
        match self
            .client
            .request(self.client.new_inbox(), Bytes::new())
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => Ok(()),
            Err(e) => Err(BackendError::Nats(e.to_string())),
        }
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

    async fn history(&self, request: &HistoryRequest) -> Result<HistoryReply, BackendError> {
        self.api_request(subjects::HISTORY_API, request).await
    }

    async fn sync(&self, request: &SyncRequest) -> Result<SyncReply, BackendError> {
        self.api_request(subjects::SYNC_API, request).await
    }

    async fn receipts(&self, request: &ReceiptsRequest) -> Result<ReceiptsReply, BackendError> {
        self.api_request(subjects::RECEIPTS_API, request).await
    }

    async fn conversations(
        &self,
        request: &ConversationsRequest,
    ) -> Result<ConversationsReply, BackendError> {
        self.api_request(subjects::CONVERSATIONS_API, request).await
    }

    async fn group_info(&self, request: &GroupInfoRequest) -> Result<GroupInfoReply, BackendError> {
        self.api_request(subjects::GROUP_INFO_API, request).await
    }

    async fn verify_media(
        &self,
        request: &MediaVerifyRequest,
    ) -> Result<MediaVerifyReply, BackendError> {
        self.api_request(subjects::MEDIA_VERIFY_API, request).await
    }

    async fn subscribe_group(&self, conv: &ConvId) -> Result<Pushes, BackendError> {
        self.subscribe(subjects::group(conv)).await
    }

    async fn confirm(&self, reply: Subject) -> Result<(), BackendError> {
        match self.confirms.try_send(reply) {
            Ok(()) => Ok(()),
            Err(tokio::sync::mpsc::error::TrySendError::Full(reply)) => self
                .client
                .publish(reply, Bytes::new())
                .await
                .map_err(|e| BackendError::Nats(e.to_string())),
            Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => {
                Err(BackendError::Nats("the confirmation sender stopped".into()))
            }
        }
    }
}
