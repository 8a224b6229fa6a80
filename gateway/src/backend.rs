//! What a connection needs from NATS, behind a small trait so the connection logic can be
//! tested over channels with an in-memory backend.

use std::{future::Future, time::Duration};

use async_nats::{
    HeaderMap,
    jetstream::{self, message::PublishMessage},
};
use bytes::Bytes;
use chat_protocol::{
    api::{HistoryReply, HistoryRequest},
    ids::{ConvId, UserId},
    subjects,
};
use futures::{FutureExt, StreamExt, future::BoxFuture, stream::BoxStream};

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

/// The payloads arriving on one user's subject.
pub type Pushes = BoxStream<'static, Bytes>;

/// The gateway's side of NATS, as one connection uses it.
pub trait Backend: Clone + Send + Sync + 'static {
    /// Publishes one send to `CHAT_IN`. Resolves once the message is on its way (in order with
    /// earlier publishes); the returned [`PendingAck`] resolves when JetStream stored it.
    fn publish(
        &self,
        conv: &ConvId,
        msg_id: String,
        payload: Bytes,
    ) -> impl Future<Output = Result<PendingAck, BackendError>> + Send;

    /// Asks the history responders for a page.
    fn history(
        &self,
        request: &HistoryRequest,
    ) -> impl Future<Output = Result<HistoryReply, BackendError>> + Send;
}

/// The real backend: a NATS client and a JetStream context over it.
#[derive(Clone)]
pub struct NatsBackend {
    client: async_nats::Client,
    js: jetstream::Context,
    history_timeout: Duration,
}

impl NatsBackend {
    pub fn new(
        client: async_nats::Client,
        publish_timeout: Duration,
        history_timeout: Duration,
    ) -> Self {
        let js = jetstream::ContextBuilder::new()
            .timeout(publish_timeout)
            // Wait for a permit rather than fail when many acks are outstanding gateway-wide;
            // each connection bounds its own share (`max_inflight_sends`) and its deadline.
            .backpressure_on_inflight(true)
            .build(client.clone());
        Self {
            client,
            js,
            history_timeout,
        }
    }

    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// Subscribes to `user`'s push subject and waits until the server has registered the
    /// subscription, so nothing published after this returns is missed.
    pub async fn subscribe_user(&self, user: &UserId) -> Result<Pushes, BackendError> {
        let sub = self
            .client
            .subscribe(subjects::user(user))
            .await
            .map_err(|e| BackendError::Nats(e.to_string()))?;
        self.server_round_trip().await?;
        Ok(sub.map(|m| m.payload).boxed())
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
}

impl Backend for NatsBackend {
    async fn publish(
        &self,
        conv: &ConvId,
        msg_id: String,
        payload: Bytes,
    ) -> Result<PendingAck, BackendError> {
        let mut headers = HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, msg_id.as_str());
        let ack = self
            .js
            .send_publish(
                subjects::inbound(conv),
                PublishMessage::build().payload(payload).headers(headers),
            )
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
        use async_nats::RequestErrorKind;
        let payload = serde_json::to_vec(request).expect("history requests always serialize");
        let reply = self
            .client
            .send_request(
                subjects::HISTORY_API,
                async_nats::Request::new()
                    .payload(payload.into())
                    .timeout(Some(self.history_timeout)),
            )
            .await
            .map_err(|e| match e.kind() {
                RequestErrorKind::TimedOut => BackendError::TimedOut(self.history_timeout),
                RequestErrorKind::NoResponders => BackendError::NoResponders,
                _ => BackendError::Nats(e.to_string()),
            })?;
        serde_json::from_slice(&reply.payload).map_err(|e| BackendError::BadReply(e.to_string()))
    }
}
