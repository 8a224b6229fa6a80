//! The connection over channels: the client's socket is a pair of channels, NATS is a fake
//! backend (publishes acked by the test, API requests answered by fixed rules) and a fake
//! push connection (subscriptions recorded, live at once); the router is the real one, so
//! pushes take the path they take in the gateway. Split like the connection: its lifecycle
//! (hello, heartbeats, closes, shutdown, memory), the send path, the request proxies, groups.

mod groups;
mod lifecycle;
mod requests;
mod send;

use std::{
    collections::{BTreeMap, HashMap},
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use axum::extract::ws::Message;
use bytes::Bytes;
use chat_protocol::{
    api::{
        self, ConversationsReply, ConversationsRequest, GroupInfoReply, GroupInfoRequest,
        HistoryReply, HistoryRequest, Inbound, InboundGroup, InboundReceipt, MediaVerifyReply,
        MediaVerifyRequest, ReceiptsReply, ReceiptsRequest, SyncReply, SyncRequest,
    },
    frames::{
        ConvInfo, ConvState, ErrorCode, ErrorFrame, GroupMember, GroupOp, MemberMarks, ServerFrame,
        close,
    },
    ids::{ConvId, DeviceId, UserId},
    subjects,
};
use futures::{Sink, SinkExt, Stream, StreamExt, channel::mpsc as chan};
use tokio::{
    sync::oneshot,
    time::{Instant, timeout},
};

use super::*;
use crate::{
    backend::{ApiRequest, BackendError, PendingAck},
    push::{Handler, Interest},
    router::{self, Router},
};

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
    media: Vec<MediaVerifyRequest>,
}

/// Publishes go to the test; API requests are recorded and answered by fixed rules.
#[derive(Clone)]
struct FakeBackend {
    published: tokio::sync::mpsc::UnboundedSender<Published>,
    asked: Arc<Mutex<Asked>>,
    /// The user's groups the fake lists.
    groups: Arc<Mutex<Vec<ConvInfo>>>,
}

/// The one conversation the fake's sync answers with.
pub(super) fn synced_state() -> ConvState {
    ConvState {
        conv: "dm~alice~bob".into(),
        name: None,
        member_count: 2,
        latest: 4,
        unread: 2,
        members: vec![marks("alice", 4, 2), marks("bob", 4, 4)],
        left: None,
    }
}

fn marks(user: &str, delivered: u64, read: u64) -> MemberMarks {
    MemberMarks {
        user: user.into(),
        delivered,
        read,
    }
}

impl FakeBackend {
    fn history(&self, request: HistoryRequest) -> HistoryReply {
        self.asked.lock().unwrap().history.push(request);
        HistoryReply::Page {
            messages: vec![],
            more: false,
        }
    }

    /// A continuation `bad` is refused with `invalid_token`; anything else gets one page.
    fn sync(&self, request: SyncRequest) -> SyncReply {
        let bad = request.next.as_deref() == Some("bad");
        self.asked.lock().unwrap().sync.push(request);
        if bad {
            return SyncReply::Error(ErrorFrame::new(
                ErrorCode::InvalidToken,
                "unknown continuation",
            ));
        }
        SyncReply::Page {
            convs: vec![synced_state()],
            messages: vec![],
            more: false,
            next: None,
            token: Some("t1".into()),
        }
    }

    /// With a seq, who has it and who read it; seq 99 does not exist yet.
    fn receipts(&self, request: ReceiptsRequest) -> ReceiptsReply {
        let (conv, seq) = (request.conv.clone(), request.seq);
        self.asked.lock().unwrap().receipts.push(request);
        if seq == Some(99) {
            let mut frame = ErrorFrame::new(ErrorCode::InvalidFrame, "no such seq");
            frame.conv = Some(conv);
            return ReceiptsReply::Error(frame);
        }
        ReceiptsReply::Marks {
            members: vec![marks("alice", 4, 4), marks("bob", 3, 1)],
            delivered_to: seq.map(|_| vec!["alice".into(), "bob".into()]),
            read_by: seq.map(|_| vec!["alice".into()]),
        }
    }

    /// The configured groups, two per page.
    fn conversations(&self, request: ConversationsRequest) -> ConversationsReply {
        let list = self.groups.lock().unwrap().clone();
        let start = match &request.after {
            Some(after) => list
                .iter()
                .position(|c| &c.conv == after)
                .map_or(list.len(), |i| i + 1),
            None => 0,
        };
        self.asked.lock().unwrap().conversations.push(request);
        let convs: Vec<ConvInfo> = list[start..].iter().take(2).cloned().collect();
        let more = start + convs.len() < list.len();
        ConversationsReply::Page {
            next: convs.last().filter(|_| more).map(|c| c.conv.clone()),
            convs,
            more,
        }
    }

    /// `g~secret` is refused (not a member); any other group has alice and bob.
    fn group_info(&self, request: GroupInfoRequest) -> GroupInfoReply {
        let secret = request.conv == "g~secret";
        self.asked.lock().unwrap().group_info.push(request);
        if secret {
            return GroupInfoReply::Error(ErrorFrame::new(ErrorCode::NotMember, "not a member"));
        }
        let member = |user: &str, admin| GroupMember {
            user: user.into(),
            admin,
            joined: 1,
            left: None,
        };
        GroupInfoReply::Group {
            name: "team".into(),
            members: vec![member("alice", true), member("bob", false)],
            seq: 7,
        }
    }

    /// Media `missing` does not exist, `big` has another size, `down` finds no media
    /// service; any other media is fine.
    fn verify_media(&self, request: MediaVerifyRequest) -> Result<MediaVerifyReply, BackendError> {
        let id = request.media.id.clone();
        self.asked.lock().unwrap().media.push(request);
        let refuse = |code| Ok(MediaVerifyReply::Error(ErrorFrame::new(code, "no")));
        match id.as_str() {
            "missing" => refuse(ErrorCode::MediaNotFound),
            "big" => refuse(ErrorCode::MediaMismatch),
            "down" => Err(BackendError::NoResponders),
            _ => Ok(MediaVerifyReply::Ok),
        }
    }
}

/// The request, re-read as the API's own type; the reply, as JSON: the fake answers what a
/// responder would have received.
fn reply_json<Q: serde::de::DeserializeOwned, A: serde::Serialize>(
    request: serde_json::Value,
    answer: impl FnOnce(Q) -> A,
) -> serde_json::Value {
    serde_json::to_value(answer(serde_json::from_value(request).unwrap())).unwrap()
}

impl Backend for FakeBackend {
    async fn publish(
        &self,
        conv: &ConvId,
        msg_id: Option<String>,
        payload: Bytes,
    ) -> Result<PendingAck, BackendError> {
        let (ack, rx) = oneshot::channel();
        let _ = self.published.send(Published {
            conv: conv.to_string(),
            msg_id,
            payload,
            ack,
        });
        Ok(async move { rx.await.unwrap_or(Err(BackendError::NoResponders)) }.boxed())
    }

    async fn request<R: ApiRequest>(&self, request: &R) -> Result<R::Reply, BackendError> {
        let json = serde_json::to_value(request).unwrap();
        let reply = match R::SUBJECT {
            subjects::HISTORY_API => reply_json(json, |r| self.history(r)),
            subjects::SYNC_API => reply_json(json, |r| self.sync(r)),
            subjects::RECEIPTS_API => reply_json(json, |r| self.receipts(r)),
            subjects::CONVERSATIONS_API => reply_json(json, |r| self.conversations(r)),
            subjects::GROUP_INFO_API => reply_json(json, |r| self.group_info(r)),
            subjects::MEDIA_VERIFY_API => {
                let reply = self.verify_media(serde_json::from_value(json).unwrap())?;
                serde_json::to_value(reply).unwrap()
            }
            other => panic!("unexpected request to {other}"),
        };
        Ok(serde_json::from_value(reply).unwrap())
    }
}

/// The push connection, faked: subscriptions are recorded and live at once.
#[derive(Default)]
struct FakeInterest {
    subs: Mutex<HashMap<u64, String>>,
    next: AtomicU64,
}

impl FakeInterest {
    fn subjects(&self) -> Vec<String> {
        let mut v: Vec<String> = self.subs.lock().unwrap().values().cloned().collect();
        v.sort();
        v
    }
}

impl Interest for FakeInterest {
    fn subscribe(&self, subject: &str) -> u64 {
        let sid = self.next.fetch_add(1, Ordering::Relaxed);
        self.subs.lock().unwrap().insert(sid, subject.to_owned());
        sid
    }

    fn resubscribe(&self, sid: u64, subject: &str) {
        self.subs.lock().unwrap().insert(sid, subject.to_owned());
    }

    fn unsubscribe(&self, sid: u64) {
        self.subs.lock().unwrap().remove(&sid);
    }

    fn barrier(&self) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        let _ = tx.send(());
        rx
    }

    fn is_connected(&self) -> bool {
        true
    }
}

/// The client's socket: what the server reads, and where it writes.
struct Duplex {
    sink: chan::Sender<Message>,
    stream: chan::Receiver<Result<Message, axum::Error>>,
}

impl Stream for Duplex {
    type Item = Result<Message, axum::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.stream.poll_next_unpin(cx)
    }
}

impl Sink<Message> for Duplex {
    type Error = chan::SendError;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.sink.poll_ready_unpin(cx)
    }

    fn start_send(mut self: Pin<&mut Self>, item: Message) -> Result<(), Self::Error> {
        self.sink.start_send_unpin(item)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.sink.poll_flush_unpin(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.sink.poll_close_unpin(cx)
    }
}

struct Client {
    to_server: chan::Sender<Result<Message, axum::Error>>,
    from_server: chan::Receiver<Message>,
    published: tokio::sync::mpsc::UnboundedReceiver<Published>,
    asked: Arc<Mutex<Asked>>,
    confirmed: tokio::sync::mpsc::UnboundedReceiver<async_nats::Subject>,
    shared: Arc<Shared<FakeBackend>>,
    interest: Arc<FakeInterest>,
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

/// The shared state of a gateway whose NATS is `backend` and `interest`; confirmations go to
/// the returned channel.
fn gateway(
    config: &Config,
    backend: FakeBackend,
    interest: Arc<FakeInterest>,
) -> (
    Arc<Shared<FakeBackend>>,
    tokio::sync::mpsc::UnboundedReceiver<async_nats::Subject>,
) {
    let (confirmed_tx, confirmed) = tokio::sync::mpsc::unbounded_channel();
    let router = Arc::new(Router::new(
        interest,
        Arc::new(move |reply| {
            let _ = confirmed_tx.send(reply);
        }),
        router::Limits {
            max_per_user: config.max_connections_per_user,
            max_connections: config.max_connections,
            outgoing_queue: config.outgoing_queue,
            live_timeout: Config::ms(config.publish_timeout_ms),
        },
    ));
    (
        Arc::new(Shared::new(config, backend, router, None)),
        confirmed,
    )
}

/// Attaches a connection of `alice` from `device` to `shared`'s router and serves it over
/// channels.
fn spawn_device(
    shared: &Arc<Shared<FakeBackend>>,
    device: &str,
    sink_buffer: usize,
    token_ttl: Duration,
) -> (
    chan::Sender<Result<Message, axum::Error>>,
    chan::Receiver<Message>,
    tokio::task::JoinHandle<()>,
) {
    let (to_server, server_in) = chan::channel(16);
    let (server_out, from_server) = chan::channel(sink_buffer);
    let session = Arc::new(Session {
        user: UserId::parse("alice").unwrap(),
        device: DeviceId::parse(device).unwrap(),
        expires_at: Instant::now() + token_ttl,
    });
    let (attached, _live) = shared.router.attach(session).expect("attached");
    let socket = Duplex {
        sink: server_out,
        stream: server_in,
    };
    let task = tokio::spawn(serve(shared.clone(), attached, None, socket));
    (to_server, from_server, task)
}

/// [`connect`] for a user in `groups`.
fn connect_in(
    config: Config,
    sink_buffer: usize,
    token_ttl: Duration,
    groups: Vec<ConvInfo>,
) -> Client {
    let (published_tx, published) = tokio::sync::mpsc::unbounded_channel();
    let asked = Arc::new(Mutex::new(Asked::default()));
    let backend = FakeBackend {
        published: published_tx,
        asked: asked.clone(),
        groups: Arc::new(Mutex::new(groups)),
    };
    let interest = Arc::new(FakeInterest::default());
    let (shared, confirmed) = gateway(&config, backend, interest.clone());
    let (to_server, from_server, task) = spawn_device(&shared, "phone", sink_buffer, token_ttl);
    Client {
        to_server,
        from_server,
        published,
        asked,
        confirmed,
        shared,
        interest,
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

    /// Publishes `frame` on the user's subject, with a reply subject if `reply` is given: what
    /// the push connection hands the router.
    async fn push(&mut self, frame: &str, reply: Option<&str>) {
        let subject = subjects::user(&UserId::parse("alice").unwrap());
        self.shared
            .router
            .on_message(&subject, reply, frame.as_bytes());
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

    /// The gateway shuts down.
    fn shut_down(&self) {
        self.shared.router.shut_down();
    }

    /// Routes `frame` as if it arrived on the large group's subject `conv`: subscribed, or
    /// just unsubscribed with the message already on its way.
    async fn group_push(&mut self, conv: &str, frame: &str) {
        let subject = subjects::group(&ConvId::parse(conv).unwrap());
        self.shared
            .router
            .on_message(&subject, None, frame.as_bytes());
    }

    /// The large groups this gateway subscribes to now.
    fn subscribed(&self) -> Vec<String> {
        let groups = self.shared.router.groups();
        let subscribed: Vec<String> = self
            .interest
            .subjects()
            .iter()
            .filter_map(|s| subjects::split_group(s).map(str::to_owned))
            .collect();
        assert_eq!(groups, subscribed, "the router and its subscriptions agree");
        subscribed
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

    /// A second connection of alice, on the same gateway.
    fn second_device(
        &self,
        device: &str,
    ) -> (
        chan::Sender<Result<Message, axum::Error>>,
        chan::Receiver<Message>,
        tokio::task::JoinHandle<()>,
    ) {
        spawn_device(&self.shared, device, 16, HOUR)
    }
}

fn send_json(id: &str) -> String {
    format!(r#"{{"type":"send","conv":"dm~alice~bob","id":"{id}","body":"hi {id}"}}"#)
}

const HOUR: Duration = Duration::from_secs(3600);

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

/// Reads the receipt the fake backend was asked to publish.
fn receipt_of(p: &Published) -> InboundReceipt {
    let json: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
    assert_eq!(json["kind"], "receipt", "{json}");
    match serde_json::from_value(json) {
        Ok(Inbound::Receipt(r)) => r,
        other => panic!("not a receipt: {other:?}"),
    }
}
