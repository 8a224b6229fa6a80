//! The gateway against a real nats-server, with real WebSocket clients. Every test starts its
//! own nats-server and gateway (`spawn_gateway`) and asserts what a client sees: frames, close
//! codes, HTTP statuses and JSON error codes, and what JetStream stored. Where the sequencer
//! would answer (history, sync, receipts), the test subscribes to the API subject and plays it.

use std::{net::SocketAddr, time::Duration};

use async_nats::jetstream;
use chat_gateway::Config;
use std::collections::BTreeMap;

use chat_protocol::{
    api::{
        self, ConversationsReply, ConversationsRequest, GroupInfoReply, GroupInfoRequest,
        HistoryReply, HistoryRequest, Inbound, InboundMessage, InboundReceipt, ReceiptsReply,
        ReceiptsRequest, SyncReply, SyncRequest,
    },
    auth::{Claims, mint_dev_token, mint_with_claims, now_secs},
    frames::{
        ConvInfo, ConvState, ErrorCode, ErrorFrame, GroupEvent, GroupOp, MemberMarks,
        Message as ChatMessage, Receipt, ServerFrame, close,
    },
    ids::{ConvId, UserId},
    jetstream::provision_all,
    subjects,
};
use chat_testkit::NatsServer;
use futures::{SinkExt, StreamExt};
use tokio::{net::TcpSocket, task::JoinHandle, time::timeout};
use tokio_tungstenite::{
    MaybeTlsStream, WebSocketStream,
    tungstenite::{self, Message, client::IntoClientRequest},
};
use tokio_util::sync::CancellationToken;

const SECRET: &[u8] = b"gateway-test-secret";
/// Bound on every wait that could hang.
const WAIT: Duration = Duration::from_secs(10);

type Ws = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

struct TestGateway {
    addr: SocketAddr,
    nats: async_nats::Client,
    js: jetstream::Context,
    shutdown: CancellationToken,
    task: Option<JoinHandle<anyhow::Result<()>>>,
    _server: NatsServer,
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A nats-server with the streams provisioned, and a gateway on a random port with test
/// settings adjusted by `tweak`.
async fn spawn_gateway(tweak: impl FnOnce(&mut Config)) -> TestGateway {
    spawn_gateway_with(true, tweak).await
}

async fn spawn_gateway_with(provision: bool, tweak: impl FnOnce(&mut Config)) -> TestGateway {
    let server = NatsServer::start();
    let nats = server.client().await;
    if provision {
        provision_all(&nats, &Default::default()).await.unwrap();
    }
    let (addr, shutdown, task) = start_gateway(&server.url(), tweak).await;
    TestGateway {
        addr,
        js: jetstream::new(nats.clone()),
        nats,
        shutdown,
        task: Some(task),
        _server: server,
    }
}

/// A gateway on the nats-server at `nats_url`, listening on a random port.
async fn start_gateway(
    nats_url: &str,
    tweak: impl FnOnce(&mut Config),
) -> (
    SocketAddr,
    CancellationToken,
    JoinHandle<anyhow::Result<()>>,
) {
    let mut config = Config {
        nats_url: nats_url.to_owned(),
        admin_listen: String::new(),
        sends_per_second: 1000,
        send_burst: 1000,
        ..Config::default()
    };
    config.auth.hs256_secret = Some(String::from_utf8(SECRET.to_vec()).unwrap());
    // These tests expire tokens on purpose: no clock-skew leeway (tests/abuse.rs covers it).
    config.auth.leeway_secs = 0;
    tweak(&mut config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(chat_gateway::run(config, listener, None, shutdown.clone()));
    (addr, shutdown, task)
}

/// Another gateway on the same nats-server as a [`TestGateway`]; stopped on drop.
struct OtherGateway {
    addr: SocketAddr,
    shutdown: CancellationToken,
}

impl Drop for OtherGateway {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl OtherGateway {
    async fn connect(&self, user: &str, device: &str) -> Ws {
        connect_at(self.addr, user, device).await
    }
}

/// Connects `user` from `device` to the gateway at `addr` and checks the `hello`.
async fn connect_at(addr: SocketAddr, user: &str, device: &str) -> Ws {
    let url = format!("ws://{addr}/ws?token={}&device={device}", token(user));
    let mut ws = try_connect(url, None).await.expect("upgrade accepted");
    match next_frame(&mut ws).await {
        ServerFrame::Hello {
            user: u, device: d, ..
        } => assert_eq!((u.as_str(), d.as_str()), (user, device)),
        other => panic!("expected hello, got {other:?}"),
    }
    ws
}

fn token(user: &str) -> String {
    mint_dev_token(SECRET, &UserId::parse(user).unwrap(), 300)
}

/// Why a connection attempt failed: HTTP status, JSON body and `Retry-After`.
#[derive(Debug)]
struct Refused {
    status: u16,
    body: serde_json::Value,
    retry_after: Option<String>,
}

impl TestGateway {
    fn url(&self, query: &str) -> String {
        format!("ws://{}/ws?{query}", self.addr)
    }

    /// Connects `user` from `device` and checks the `hello`.
    async fn connect(&self, user: &str, device: &str) -> Ws {
        connect_at(self.addr, user, device).await
    }

    /// Another gateway on the same nats-server.
    async fn another(&self, tweak: impl FnOnce(&mut Config)) -> OtherGateway {
        let (addr, shutdown, _task) = start_gateway(&self._server.url(), tweak).await;
        OtherGateway { addr, shutdown }
    }

    async fn chat_in(&self) -> jetstream::stream::Stream {
        self.js.get_stream(subjects::STREAM_INBOUND).await.unwrap()
    }

    async fn chat_in_count(&self) -> u64 {
        self.chat_in()
            .await
            .get_info()
            .await
            .unwrap()
            .state
            .messages
    }

    /// Waits until `CHAT_IN` holds `n` messages (receipts are not answered, so the client
    /// cannot tell when they are stored).
    async fn wait_chat_in(&self, n: u64) {
        timeout(WAIT, async {
            while self.chat_in_count().await < n {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("CHAT_IN never reached {n} messages"));
        assert_eq!(self.chat_in_count().await, n);
    }

    /// Plays the sequencer's responder on `subject`: returns once the server registered it.
    async fn responder(&self, subject: &'static str) -> async_nats::Subscriber {
        let sub = self.nats.subscribe(subject).await.unwrap();
        // A request to an inbox nobody serves comes back (no responders) only after the server
        // processed everything this client sent before, the subscription included.
        let _ = self.nats.request(self.nats.new_inbox(), "".into()).await;
        sub
    }

    /// Answers request `msg` with `reply` as JSON.
    async fn reply(&self, msg: &async_nats::Message, reply: &impl serde::Serialize) {
        let to = msg.reply.clone().expect("a request has a reply subject");
        let payload = serde_json::to_vec(reply).unwrap();
        self.nats.publish(to, payload.into()).await.unwrap();
    }
}

/// The next request a test responder got, decoded.
async fn next_request<T: serde::de::DeserializeOwned>(
    sub: &mut async_nats::Subscriber,
) -> (T, async_nats::Message) {
    let msg = timeout(WAIT, sub.next())
        .await
        .expect("a request in time")
        .expect("subscription open");
    let request = serde_json::from_slice(&msg.payload)
        .unwrap_or_else(|e| panic!("bad request {:?}: {e}", msg.payload));
    (request, msg)
}

/// Opens a WebSocket; `recv_buffer` shrinks the client's socket receive buffer (slow clients).
async fn try_connect(
    request: impl IntoClientRequest + Unpin,
    recv_buffer: Option<u32>,
) -> Result<Ws, Refused> {
    let request = request.into_client_request().unwrap();
    let authority = request.uri().authority().unwrap().as_str().to_owned();
    let addr: SocketAddr = authority.parse().unwrap();
    let socket = TcpSocket::new_v4().unwrap();
    if let Some(size) = recv_buffer {
        socket.set_recv_buffer_size(size).unwrap();
    }
    let stream = timeout(WAIT, socket.connect(addr))
        .await
        .expect("tcp connect in time")
        .unwrap();
    let connecting = tokio_tungstenite::client_async(request, MaybeTlsStream::Plain(stream));
    match timeout(WAIT, connecting).await.expect("handshake in time") {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::Error::Http(resp)) => {
            let body = resp.body().clone().unwrap_or_default();
            Err(Refused {
                retry_after: resp
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned),
                status: resp.status().as_u16(),
                body: serde_json::from_slice(&body)
                    .unwrap_or_else(|e| panic!("refusal body is not JSON ({e}): {body:?}")),
            })
        }
        Err(other) => panic!("websocket handshake failed: {other}"),
    }
}

async fn refused(request: impl IntoClientRequest + Unpin) -> Refused {
    match try_connect(request, None).await {
        Ok(_) => panic!("upgrade unexpectedly accepted"),
        Err(r) => r,
    }
}

async fn send(ws: &mut Ws, json: &str) {
    timeout(WAIT, ws.send(Message::text(json)))
        .await
        .expect("send in time")
        .unwrap();
}

fn send_json(conv: &str, id: &str, body: &str) -> String {
    serde_json::json!({"type": "send", "conv": conv, "id": id, "body": body}).to_string()
}

/// The next text frame as sent by the server, skipping pings.
async fn next_text(ws: &mut Ws) -> String {
    loop {
        let msg = timeout(WAIT, ws.next())
            .await
            .expect("a frame in time")
            .expect("connection still open")
            .expect("no websocket error");
        match msg {
            Message::Text(t) => return t.as_str().to_owned(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

async fn next_frame(ws: &mut Ws) -> ServerFrame {
    let text = next_text(ws).await;
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("bad server frame {text}: {e}"))
}

async fn next_error(ws: &mut Ws) -> ErrorFrame {
    match next_frame(ws).await {
        ServerFrame::Error(e) => e,
        other => panic!("expected an error frame, got {other:?}"),
    }
}

/// Reads (and discards) until the server's close frame; returns its code.
async fn close_code(ws: &mut Ws) -> u16 {
    loop {
        let msg = timeout(WAIT, ws.next())
            .await
            .expect("the close frame in time")
            .expect("a close frame before the end of the stream")
            .expect("no websocket error before the close frame");
        if let Message::Close(frame) = msg {
            return frame.expect("close frame with a code").code.into();
        }
    }
}

/// Asserts that no text frame arrives within `within`.
async fn assert_silent(ws: &mut Ws, within: Duration) {
    let _ = timeout(within, async {
        while let Some(msg) = ws.next().await {
            if let Ok(Message::Text(t)) = msg {
                panic!("unexpected frame {t}");
            }
        }
    })
    .await;
}

async fn ping_pong(ws: &mut Ws) {
    send(ws, r#"{"type":"ping"}"#).await;
    assert_eq!(next_frame(ws).await, ServerFrame::Pong);
}

fn message_frame(conv: &str, seq: u64, body: &str) -> String {
    serde_json::to_string(&ServerFrame::Message(ChatMessage {
        conv: conv.into(),
        seq,
        from: "bob".into(),
        id: format!("b{seq}"),
        ts: 1,
        body: body.into(),
        event: None,
        media: None,
    }))
    .unwrap()
}

async fn push_to(gw: &TestGateway, user: &str, payload: String) {
    gw.nats
        .publish(
            subjects::user(&UserId::parse(user).unwrap()),
            payload.into(),
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn send_is_acked_after_jetstream_stored_it_once() {
    let gw = spawn_gateway(|_| {}).await;
    let mut ws = gw.connect("alice", "phone").await;
    send(&mut ws, &send_json("dm~alice~bob", "m1", "hello bob")).await;
    let ts = match next_frame(&mut ws).await {
        ServerFrame::Sent { id, conv, ts } => {
            assert_eq!((id.as_str(), conv.as_str()), ("m1", "dm~alice~bob"));
            ts
        }
        other => panic!("expected sent, got {other:?}"),
    };

    assert_eq!(gw.chat_in_count().await, 1);
    let stored = gw.chat_in().await.get_raw_message(1).await.unwrap();
    let json: serde_json::Value = serde_json::from_slice(&stored.payload).unwrap();
    assert_eq!(json["kind"], "send", "{json}");
    let inbound: Inbound = serde_json::from_value(json).unwrap();
    assert_eq!(
        inbound,
        Inbound::Send(InboundMessage {
            conv: "dm~alice~bob".into(),
            from: "alice".into(),
            device: "phone".into(),
            id: "m1".into(),
            body: "hello bob".into(),
            ts,
            media: None,
        })
    );
    let msg_id = stored
        .headers
        .get(async_nats::header::NATS_MESSAGE_ID)
        .expect("Nats-Msg-Id header");
    assert_eq!(
        msg_id.as_str(),
        api::dedupe_id("dm~alice~bob", "alice", "m1")
    );
    let conv = chat_protocol::ids::ConvId::parse("dm~alice~bob").unwrap();
    let partition = subjects::inbound_partition_filter(subjects::partition_of(
        &conv,
        subjects::DEFAULT_PARTITIONS,
    ));
    assert!(stored.subject.starts_with(partition.trim_end_matches('*')));

    // A retry with the same id, here from another device, is acked again but stored once.
    send(&mut ws, &send_json("dm~alice~bob", "m1", "hello bob")).await;
    assert!(matches!(next_frame(&mut ws).await, ServerFrame::Sent { id, .. } if id == "m1"));
    let mut laptop = gw.connect("alice", "laptop").await;
    send(&mut laptop, &send_json("dm~alice~bob", "m1", "hello bob")).await;
    assert!(matches!(next_frame(&mut laptop).await, ServerFrame::Sent { id, .. } if id == "m1"));
    assert_eq!(gw.chat_in_count().await, 1);

    send(&mut ws, &send_json("dm~alice~bob", "m2", "again")).await;
    assert!(matches!(next_frame(&mut ws).await, ServerFrame::Sent { id, .. } if id == "m2"));
    assert_eq!(gw.chat_in_count().await, 2);
}

#[tokio::test]
async fn pushes_reach_every_device_of_the_user_and_nobody_else() {
    let gw = spawn_gateway(|_| {}).await;
    let mut phone = gw.connect("alice", "phone").await;
    let mut laptop = gw.connect("alice", "laptop").await;
    let mut bob = gw.connect("bob", "phone").await;

    let frame = message_frame("dm~alice~bob", 1, "for alice");
    push_to(&gw, "alice", frame.clone()).await;
    assert_eq!(next_text(&mut phone).await, frame, "forwarded unchanged");
    assert_eq!(next_text(&mut laptop).await, frame);
    assert_silent(&mut bob, Duration::from_millis(300)).await;

    let for_bob = message_frame("dm~alice~bob", 2, "for bob");
    push_to(&gw, "bob", for_bob.clone()).await;
    assert_eq!(next_text(&mut bob).await, for_bob);
    assert_silent(&mut phone, Duration::from_millis(300)).await;
}

#[tokio::test]
async fn upgrade_refusals_are_http_errors_with_codes() {
    let gw = spawn_gateway(|_| {}).await;
    let check = |r: Refused, status: u16, code: &str| {
        assert_eq!(r.status, status, "{:?}", r.body);
        assert_eq!(r.body["code"], code, "{:?}", r.body);
        assert!(r.body["message"].as_str().is_some_and(|m| !m.is_empty()));
    };
    check(refused(gw.url("device=phone")).await, 401, "unauthorized");
    check(
        refused(gw.url("token=not-a-jwt")).await,
        401,
        "unauthorized",
    );
    let other_key = mint_dev_token(b"another-secret", &UserId::parse("alice").unwrap(), 300);
    check(
        refused(gw.url(&format!("token={other_key}"))).await,
        401,
        "unauthorized",
    );
    let bad_sub = mint_with_claims(
        SECRET,
        &Claims {
            sub: "al.ice".into(),
            exp: now_secs() + 300,
            iat: 0,
        },
    );
    check(
        refused(gw.url(&format!("token={bad_sub}"))).await,
        401,
        "unauthorized",
    );
    let expired = mint_with_claims(
        SECRET,
        &Claims {
            sub: "alice".into(),
            exp: now_secs() - 10,
            iat: 0,
        },
    );
    check(
        refused(gw.url(&format!("token={expired}"))).await,
        401,
        "token_expired",
    );
    let url = gw.url(&format!("token={}&device=ph.one", token("alice")));
    check(refused(url).await, 400, "invalid_id");

    // The token may also come in the Authorization header; the device id is then generated.
    let mut request = gw.url("").into_client_request().unwrap();
    request.headers_mut().insert(
        "Authorization",
        format!("Bearer {}", token("alice")).parse().unwrap(),
    );
    let mut ws = try_connect(request, None)
        .await
        .expect("bearer token accepted");
    assert!(
        matches!(next_frame(&mut ws).await, ServerFrame::Hello { user, .. } if user == "alice")
    );
}

#[tokio::test]
async fn bad_frames_get_error_codes_and_nothing_reaches_nats() {
    let gw = spawn_gateway(|_| {}).await;
    let mut alice = gw.connect("alice", "phone").await;
    let mut bob = gw.connect("bob", "phone").await;
    // Everything published from now on, on any subject, except JetStream's own API traffic.
    let mut everything = gw.nats.subscribe(">").await.unwrap();
    gw.nats.flush().await.unwrap();

    let cases: Vec<(String, ErrorCode, Option<&str>)> = vec![
        ("{not json".into(), ErrorCode::BadJson, None),
        (r#"{"type":"dance"}"#.into(), ErrorCode::UnknownType, None),
        // A send that fails to decode (no body) still names the send it answers.
        (
            r#"{"type":"send","conv":"dm~alice~bob","id":"m1"}"#.into(),
            ErrorCode::InvalidFrame,
            Some("m1"),
        ),
        (
            r#"{"conv":"dm~alice~bob"}"#.into(),
            ErrorCode::InvalidFrame,
            None,
        ),
        (
            send_json("dm~alice~b.ob", "m1", "x"),
            ErrorCode::InvalidId,
            Some("m1"),
        ),
        (
            send_json("dm~alice~bob.>", "m2", "x"),
            ErrorCode::InvalidId,
            Some("m2"),
        ),
        (
            send_json("dm~alice~*", "m3", "x"),
            ErrorCode::InvalidId,
            Some("m3"),
        ),
        (
            send_json("dm~alice~>", "m4", "x"),
            ErrorCode::InvalidId,
            Some("m4"),
        ),
        (
            send_json("dm~alice~b ob", "m5", "x"),
            ErrorCode::InvalidId,
            Some("m5"),
        ),
        (
            send_json("dm~alice~b\u{1}ob", "m6", "x"),
            ErrorCode::InvalidId,
            Some("m6"),
        ),
        (
            send_json("dm~alice~bob\n", "m7", "x"),
            ErrorCode::InvalidId,
            Some("m7"),
        ),
        (
            send_json("dm~alice~alice", "m8", "x"),
            ErrorCode::InvalidId,
            Some("m8"),
        ),
        (
            send_json("dm~bob~carol", "m9", "x"),
            ErrorCode::NotMember,
            Some("m9"),
        ),
        (
            send_json("dm~alice~bob", "m.10", "x"),
            ErrorCode::InvalidId,
            Some("m.10"),
        ),
        (
            send_json("dm~alice~bob", "", "x"),
            ErrorCode::InvalidId,
            Some(""),
        ),
        (
            r#"{"type":"history","req":"h1","conv":"dm~alice~*"}"#.into(),
            ErrorCode::InvalidId,
            None,
        ),
        (
            r#"{"type":"history","req":"h2","conv":"dm~bob~carol"}"#.into(),
            ErrorCode::NotMember,
            None,
        ),
    ];
    for (json, code, id) in &cases {
        send(&mut alice, json).await;
        let err = next_error(&mut alice).await;
        assert_eq!(err.code, *code, "{json} -> {err:?}");
        assert_eq!(err.id.as_deref(), *id, "{json} -> {err:?}");
        assert!(!err.message.is_empty());
    }

    // Nothing was published: not to CHAT_IN, not to any other subject (but the presence
    // reports of alice's and bob's connections).
    assert_silent(&mut bob, Duration::from_millis(100)).await;
    gw.nats.flush().await.unwrap();
    while let Ok(Some(msg)) = timeout(Duration::from_millis(200), everything.next()).await {
        assert!(
            msg.subject.starts_with("$JS.")
                || msg.subject.starts_with("_INBOX.")
                || msg.subject.starts_with("chat.presence.report."),
            "unexpected publish on {}",
            msg.subject
        );
    }
    drop(everything);
    assert_eq!(gw.chat_in_count().await, 0);

    // The same connection still works, and the other user never noticed.
    send(&mut alice, &send_json("dm~alice~bob", "ok1", "fine")).await;
    assert!(matches!(next_frame(&mut alice).await, ServerFrame::Sent { id, .. } if id == "ok1"));
    ping_pong(&mut bob).await;
    send(&mut bob, &send_json("dm~alice~bob", "ok2", "fine too")).await;
    assert!(matches!(next_frame(&mut bob).await, ServerFrame::Sent { id, .. } if id == "ok2"));
    assert_eq!(gw.chat_in_count().await, 2);
}

#[tokio::test]
async fn oversized_frames_close_1009_and_large_bodies_are_refused() {
    let gw = spawn_gateway(|c| {
        c.max_frame_bytes = 4096;
        c.max_body_bytes = 1024;
    })
    .await;
    let mut ws = gw.connect("alice", "phone").await;
    send(
        &mut ws,
        &send_json("dm~alice~bob", "big", &"x".repeat(2000)),
    )
    .await;
    let err = next_error(&mut ws).await;
    assert_eq!(err.code, ErrorCode::BodyTooLarge);
    assert_eq!(err.id.as_deref(), Some("big"));
    ping_pong(&mut ws).await;

    send(
        &mut ws,
        &send_json("dm~alice~bob", "huge", &"x".repeat(8000)),
    )
    .await;
    assert_eq!(close_code(&mut ws).await, close::MESSAGE_TOO_BIG);
    assert_eq!(gw.chat_in_count().await, 0);
}

#[tokio::test]
async fn send_rate_is_limited_per_user() {
    let gw = spawn_gateway(|c| {
        c.sends_per_second = 1;
        c.send_burst = 3;
    })
    .await;
    let mut alice = gw.connect("alice", "phone").await;
    let mut bob = gw.connect("bob", "phone").await;
    for i in 1..=4 {
        send(
            &mut alice,
            &send_json("dm~alice~bob", &format!("m{i}"), "x"),
        )
        .await;
    }
    let (mut sent, mut limited) = (Vec::new(), Vec::new());
    for _ in 0..4 {
        match next_frame(&mut alice).await {
            ServerFrame::Sent { id, .. } => sent.push(id),
            ServerFrame::Error(e) if e.code == ErrorCode::RateLimited => limited.push(e),
            other => panic!("unexpected {other:?}"),
        }
    }
    sent.sort();
    assert_eq!(sent, ["m1", "m2", "m3"]);
    assert_eq!(limited.len(), 1);
    assert_eq!(limited[0].id.as_deref(), Some("m4"));
    let retry = limited[0].retry_after_ms.expect("retry_after_ms");
    assert!((1..=1000).contains(&retry), "{retry}");

    // Bob has his own budget.
    send(&mut bob, &send_json("dm~alice~bob", "b1", "x")).await;
    assert!(matches!(next_frame(&mut bob).await, ServerFrame::Sent { id, .. } if id == "b1"));
    assert_eq!(gw.chat_in_count().await, 4);
}

#[tokio::test]
async fn connections_per_user_are_limited() {
    let gw = spawn_gateway(|c| c.max_connections_per_user = 2).await;
    let mut first = gw.connect("alice", "d1").await;
    let _second = gw.connect("alice", "d2").await;
    let r = refused(gw.url(&format!("token={}&device=d3", token("alice")))).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.body["code"], "too_many_connections");
    let _bob = gw.connect("bob", "d1").await;

    // Closing one frees its slot.
    first.close(None).await.unwrap();
    let url = gw.url(&format!("token={}&device=d3", token("alice")));
    timeout(WAIT, async {
        loop {
            match try_connect(url.as_str(), None).await {
                Ok(_) => break,
                Err(r) => assert_eq!(r.status, 429),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("slot freed in time");
}

#[tokio::test]
async fn silent_clients_are_closed_with_4000() {
    let gw = spawn_gateway(|c| {
        c.heartbeat_interval_ms = 100;
        c.heartbeat_timeout_ms = 300;
    })
    .await;
    let mut silent = gw.connect("alice", "silent").await;
    let mut lively = gw.connect("alice", "lively").await;
    // `lively` keeps reading, so its client answers the server's pings; `silent` reads nothing.
    let _ = timeout(Duration::from_millis(1000), async {
        while let Some(Ok(_)) = lively.next().await {}
    })
    .await;
    assert_eq!(close_code(&mut silent).await, close::HEARTBEAT_TIMEOUT);
    ping_pong(&mut lively).await;
}

#[tokio::test]
async fn slow_consumer_is_closed_with_4001_and_other_devices_keep_receiving() {
    let gw = spawn_gateway(|c| {
        c.outgoing_queue = 8;
        c.close_timeout_ms = 30_000;
    })
    .await;
    let url = gw.url(&format!("token={}&device=slow", token("alice")));
    let mut slow = try_connect(url, Some(4096))
        .await
        .expect("slow client connects");
    assert!(matches!(
        next_frame(&mut slow).await,
        ServerFrame::Hello { .. }
    ));
    let mut fast = gw.connect("alice", "fast").await;

    // Flood alice's subject while the slow device reads nothing. The flood is paced by the fast
    // device in bursts smaller than the queue; in total it is several times what the kernel
    // buffers of the slow socket can hold (its send buffer grows to at most 4 MiB here).
    let body = "x".repeat(64 * 1024);
    let mut seq = 0;
    for _batch in 0..100 {
        for _ in 0..4 {
            seq += 1;
            push_to(&gw, "alice", message_frame("dm~alice~bob", seq, &body)).await;
        }
        for _ in 0..4 {
            assert!(matches!(
                next_frame(&mut fast).await,
                ServerFrame::Message(_)
            ));
        }
    }
    assert_eq!(close_code(&mut slow).await, close::SLOW_CONSUMER);

    seq += 1;
    push_to(
        &gw,
        "alice",
        message_frame("dm~alice~bob", seq, "still there"),
    )
    .await;
    match next_frame(&mut fast).await {
        ServerFrame::Message(m) => assert_eq!(m.body, "still there"),
        other => panic!("expected the message, got {other:?}"),
    }
}

#[tokio::test]
async fn history_without_responder_is_unavailable() {
    let gw = spawn_gateway(|c| c.history_timeout_ms = 500).await;
    let mut ws = gw.connect("alice", "phone").await;
    send(
        &mut ws,
        r#"{"type":"history","req":"h1","conv":"dm~alice~bob","limit":10}"#,
    )
    .await;
    let err = next_error(&mut ws).await;
    assert_eq!(err.code, ErrorCode::Unavailable);
    assert_eq!(err.req.as_deref(), Some("h1"));
    ping_pong(&mut ws).await;
}

#[tokio::test]
async fn send_without_stream_is_unavailable_with_its_id() {
    let gw = spawn_gateway_with(false, |c| c.publish_timeout_ms = 1000).await;
    let mut ws = gw.connect("alice", "phone").await;
    send(&mut ws, &send_json("dm~alice~bob", "m1", "x")).await;
    let err = next_error(&mut ws).await;
    assert_eq!(err.code, ErrorCode::Unavailable);
    assert_eq!(err.id.as_deref(), Some("m1"));
    ping_pong(&mut ws).await;
}

#[tokio::test]
async fn open_connection_closes_with_4002_when_the_token_expires() {
    let gw = spawn_gateway(|_| {}).await;
    let short = mint_with_claims(
        SECRET,
        &Claims {
            sub: "alice".into(),
            exp: now_secs() + 2,
            iat: 0,
        },
    );
    let mut ws = try_connect(gw.url(&format!("token={short}")), None)
        .await
        .expect("token still valid");
    assert!(matches!(
        next_frame(&mut ws).await,
        ServerFrame::Hello { .. }
    ));
    assert_eq!(close_code(&mut ws).await, close::TOKEN_EXPIRED);
}

#[tokio::test]
async fn shutdown_closes_connections_with_1001_and_returns() {
    let mut gw = spawn_gateway(|c| c.shutdown_grace_ms = 2000).await;
    let mut a = gw.connect("alice", "phone").await;
    let mut b = gw.connect("bob", "phone").await;
    gw.shutdown.cancel();
    assert_eq!(close_code(&mut a).await, close::GOING_AWAY);
    assert_eq!(close_code(&mut b).await, close::GOING_AWAY);
    let task = gw.task.take().unwrap();
    timeout(WAIT, task)
        .await
        .expect("run returns within the grace period")
        .unwrap()
        .unwrap();
    // Nothing listens any more.
    assert!(tokio::net::TcpStream::connect(gw.addr).await.is_err());
}

#[tokio::test]
async fn read_and_delivered_frames_land_in_chat_in_as_receipts() {
    let gw = spawn_gateway(|_| {}).await;
    let mut ws = gw.connect("alice", "phone").await;
    send(&mut ws, r#"{"type":"read","conv":"dm~alice~bob","seq":5}"#).await;
    gw.wait_chat_in(1).await;
    send(
        &mut ws,
        r#"{"type":"delivered","conv":"dm~alice~bob","seq":8}"#,
    )
    .await;
    gw.wait_chat_in(2).await;
    // A stored receipt is not answered.
    ping_pong(&mut ws).await;

    let conv = chat_protocol::ids::ConvId::parse("dm~alice~bob").unwrap();
    let partition = subjects::inbound_partition_filter(subjects::partition_of(
        &conv,
        subjects::DEFAULT_PARTITIONS,
    ));
    let chat_in = gw.chat_in().await;
    for (seq, delivered, read) in [(1, 5, 5), (2, 8, 0)] {
        let msg = chat_in.get_raw_message(seq).await.unwrap();
        assert!(msg.subject.starts_with(partition.trim_end_matches('*')));
        assert!(
            msg.headers
                .get(async_nats::header::NATS_MESSAGE_ID)
                .is_none(),
            "receipts are idempotent and carry no Nats-Msg-Id"
        );
        let json: serde_json::Value = serde_json::from_slice(&msg.payload).unwrap();
        assert_eq!(json["kind"], "receipt", "{json}");
        assert_eq!(
            serde_json::from_value::<Inbound>(json).unwrap(),
            Inbound::Receipt(InboundReceipt {
                conv: "dm~alice~bob".into(),
                user: "alice".into(),
                device: "phone".into(),
                delivered,
                read,
            })
        );
    }

    // The same receipt again is stored again (no dedupe), and changes nothing downstream.
    send(&mut ws, r#"{"type":"read","conv":"dm~alice~bob","seq":5}"#).await;
    gw.wait_chat_in(3).await;
}

#[tokio::test]
async fn refused_receipts_are_errors_and_nothing_is_published() {
    let gw = spawn_gateway(|_| {}).await;
    let mut alice = gw.connect("alice", "phone").await;
    let mut everything = gw.nats.subscribe(">").await.unwrap();
    gw.nats.flush().await.unwrap();

    let cases = [
        (
            r#"{"type":"read","conv":"dm~bob~carol","seq":1}"#,
            ErrorCode::NotMember,
            "dm~bob~carol",
        ),
        (
            r#"{"type":"delivered","conv":"dm~bob~carol","seq":1}"#,
            ErrorCode::NotMember,
            "dm~bob~carol",
        ),
        (
            r#"{"type":"read","conv":"dm~alice~bob.>","seq":1}"#,
            ErrorCode::InvalidId,
            "dm~alice~bob.>",
        ),
        (
            r#"{"type":"delivered","conv":"dm~alice~bob","seq":0}"#,
            ErrorCode::InvalidFrame,
            "dm~alice~bob",
        ),
    ];
    for (json, code, conv) in cases {
        send(&mut alice, json).await;
        let err = next_error(&mut alice).await;
        assert_eq!(err.code, code, "{json} -> {err:?}");
        assert_eq!(err.conv.as_deref(), Some(conv), "{json} -> {err:?}");
        assert!(!err.message.is_empty());
    }
    send(
        &mut alice,
        r#"{"type":"read","conv":"dm~alice~bob","seq":-1}"#,
    )
    .await;
    assert_eq!(next_error(&mut alice).await.code, ErrorCode::InvalidFrame);

    ping_pong(&mut alice).await;
    gw.nats.flush().await.unwrap();
    while let Ok(Some(msg)) = timeout(Duration::from_millis(200), everything.next()).await {
        assert!(
            msg.subject.starts_with("$JS.") || msg.subject.starts_with("_INBOX."),
            "unexpected publish on {}",
            msg.subject
        );
    }
    assert_eq!(gw.chat_in_count().await, 0);
}

#[tokio::test]
async fn receipt_rate_is_limited_per_user_apart_from_sends() {
    let gw = spawn_gateway(|c| {
        c.receipts_per_second = 1;
        c.receipt_burst = 2;
        c.sends_per_second = 1;
        c.send_burst = 1;
    })
    .await;
    let mut phone = gw.connect("alice", "phone").await;
    let mut laptop = gw.connect("alice", "laptop").await;
    for seq in [1, 2] {
        let read = format!(r#"{{"type":"read","conv":"dm~alice~bob","seq":{seq}}}"#);
        send(&mut phone, &read).await;
    }
    ping_pong(&mut phone).await;
    // The budget is the user's, on every device.
    send(
        &mut laptop,
        r#"{"type":"delivered","conv":"dm~alice~bob","seq":3}"#,
    )
    .await;
    let err = next_error(&mut laptop).await;
    assert_eq!(err.code, ErrorCode::RateLimited);
    assert_eq!(err.conv.as_deref(), Some("dm~alice~bob"));
    let retry = err.retry_after_ms.expect("retry_after_ms");
    assert!((1..=1000).contains(&retry), "{retry}");
    // Sends have their own budget, untouched by receipts.
    send(&mut laptop, &send_json("dm~alice~bob", "m1", "x")).await;
    assert!(matches!(next_frame(&mut laptop).await, ServerFrame::Sent { id, .. } if id == "m1"));
    gw.wait_chat_in(3).await;
}

fn marks(user: &str, delivered: u64, read: u64) -> MemberMarks {
    MemberMarks {
        user: user.into(),
        delivered,
        read,
    }
}

#[tokio::test]
async fn sync_is_asked_for_the_user_with_a_clamped_limit_and_answered() {
    let gw = spawn_gateway(|_| {}).await;
    let mut sequencer = gw.responder(subjects::SYNC_API).await;
    let mut ws = gw.connect("alice", "phone").await;

    send(
        &mut ws,
        r#"{"type":"sync","req":"s1","since":"tok-0","cursors":{"dm~alice~bob":2,"dm~alice~carol":0},"limit":5000}"#,
    )
    .await;
    let (request, msg) = next_request::<SyncRequest>(&mut sequencer).await;
    assert_eq!(
        request,
        SyncRequest {
            user: "alice".into(),
            since: Some("tok-0".into()),
            cursors: BTreeMap::from([("dm~alice~bob".into(), 2), ("dm~alice~carol".into(), 0)]),
            next: None,
            limit: api::SYNC_PAGE_MAX,
        }
    );
    let convs = vec![ConvState {
        conv: "dm~alice~bob".into(),
        name: None,
        member_count: 2,
        latest: 3,
        unread: 1,
        members: vec![marks("alice", 3, 2), marks("bob", 3, 3)],
        left: None,
    }];
    let messages = vec![ChatMessage {
        conv: "dm~alice~bob".into(),
        seq: 3,
        from: "bob".into(),
        id: "b3".into(),
        ts: 7,
        body: "while you were away".into(),
        event: None,
        media: None,
    }];
    gw.reply(
        &msg,
        &SyncReply::Page {
            convs: convs.clone(),
            messages: messages.clone(),
            more: true,
            next: Some("page-2".into()),
            token: None,
        },
    )
    .await;
    assert_eq!(
        next_frame(&mut ws).await,
        ServerFrame::Sync {
            req: "s1".into(),
            convs,
            messages,
            more: true,
            next: Some("page-2".into()),
            token: None,
        }
    );

    // The next page: the default limit; the sequencer refuses the continuation.
    send(&mut ws, r#"{"type":"sync","req":"s2","next":"page-2"}"#).await;
    let (request, msg) = next_request::<SyncRequest>(&mut sequencer).await;
    assert_eq!(request.limit, api::SYNC_PAGE_DEFAULT);
    assert_eq!(request.next.as_deref(), Some("page-2"));
    assert!(request.cursors.is_empty() && request.since.is_none());
    let refusal = ErrorFrame::new(ErrorCode::InvalidToken, "continuation expired");
    gw.reply(&msg, &SyncReply::Error(refusal)).await;
    let err = next_error(&mut ws).await;
    assert_eq!(err.code, ErrorCode::InvalidToken);
    assert_eq!(err.req.as_deref(), Some("s2"));

    // Refused by the gateway itself: the sequencer is not asked.
    for (json, code) in [
        (r#"{"type":"sync","req":"s 3"}"#, ErrorCode::InvalidId),
        (
            r#"{"type":"sync","req":"s4","cursors":{"dm~alice~*":1}}"#,
            ErrorCode::InvalidId,
        ),
    ] {
        send(&mut ws, json).await;
        let err = next_error(&mut ws).await;
        assert_eq!(err.code, code, "{json} -> {err:?}");
        assert!(err.req.is_some(), "{err:?}");
    }
    send(&mut ws, r#"{"type":"sync","req":"s6","limit":0}"#).await;
    let (request, msg) = next_request::<SyncRequest>(&mut sequencer).await;
    assert_eq!(request.limit, 1, "the first request after the refused ones");
    gw.reply(
        &msg,
        &SyncReply::Page {
            convs: vec![],
            messages: vec![],
            more: false,
            next: None,
            token: Some("tok-1".into()),
        },
    )
    .await;
    assert!(matches!(
        next_frame(&mut ws).await,
        ServerFrame::Sync { req, token: Some(token), .. } if req == "s6" && token == "tok-1"
    ));
}

#[tokio::test]
async fn receipts_are_asked_for_members_and_answered() {
    let gw = spawn_gateway(|_| {}).await;
    let mut sequencer = gw.responder(subjects::RECEIPTS_API).await;
    let mut ws = gw.connect("alice", "phone").await;

    send(
        &mut ws,
        r#"{"type":"receipts","req":"q1","conv":"dm~alice~bob","seq":4}"#,
    )
    .await;
    let (request, msg) = next_request::<ReceiptsRequest>(&mut sequencer).await;
    assert_eq!(
        request,
        ReceiptsRequest {
            user: "alice".into(),
            conv: "dm~alice~bob".into(),
            seq: Some(4),
        }
    );
    let members = vec![marks("alice", 4, 4), marks("bob", 4, 2)];
    gw.reply(
        &msg,
        &ReceiptsReply::Marks {
            members: members.clone(),
            delivered_to: Some(vec!["alice".into(), "bob".into()]),
            read_by: Some(vec!["alice".into()]),
        },
    )
    .await;
    assert_eq!(
        next_frame(&mut ws).await,
        ServerFrame::Receipts {
            req: "q1".into(),
            conv: "dm~alice~bob".into(),
            members,
            seq: Some(4),
            delivered_to: Some(vec!["alice".into(), "bob".into()]),
            read_by: Some(vec!["alice".into()]),
        }
    );

    send(
        &mut ws,
        r#"{"type":"receipts","req":"q2","conv":"dm~alice~bob"}"#,
    )
    .await;
    let (request, msg) = next_request::<ReceiptsRequest>(&mut sequencer).await;
    assert_eq!(request.seq, None);
    gw.reply(
        &msg,
        &ReceiptsReply::Error(ErrorFrame::new(ErrorCode::Internal, "store failed")),
    )
    .await;
    let err = next_error(&mut ws).await;
    assert_eq!(err.code, ErrorCode::Internal);
    assert_eq!(err.req.as_deref(), Some("q2"));
    assert_eq!(err.conv.as_deref(), Some("dm~alice~bob"));

    send(
        &mut ws,
        r#"{"type":"receipts","req":"q3","conv":"dm~bob~carol"}"#,
    )
    .await;
    let err = next_error(&mut ws).await;
    assert_eq!(err.code, ErrorCode::NotMember);
    assert_eq!(err.req.as_deref(), Some("q3"));
    // The sequencer was never asked about a conversation alice is not in.
    assert!(
        timeout(Duration::from_millis(200), sequencer.next())
            .await
            .is_err()
    );
}

#[tokio::test]
async fn history_range_is_asked_as_given() {
    let gw = spawn_gateway(|_| {}).await;
    let mut sequencer = gw.responder(subjects::HISTORY_API).await;
    let mut ws = gw.connect("alice", "phone").await;
    send(
        &mut ws,
        r#"{"type":"history","req":"h1","conv":"dm~alice~bob","after":3,"before":7}"#,
    )
    .await;
    let (request, msg) = next_request::<HistoryRequest>(&mut sequencer).await;
    assert_eq!(
        request,
        HistoryRequest {
            user: "alice".into(),
            conv: "dm~alice~bob".into(),
            before: Some(7),
            after: Some(3),
            limit: 50,
        }
    );
    let gap: Vec<ChatMessage> = (4..7)
        .map(|seq| ChatMessage {
            conv: "dm~alice~bob".into(),
            seq,
            from: "bob".into(),
            id: format!("b{seq}"),
            ts: seq,
            body: "x".into(),
            event: None,
            media: None,
        })
        .collect();
    gw.reply(
        &msg,
        &HistoryReply::Page {
            messages: gap.clone(),
            more: false,
        },
    )
    .await;
    assert_eq!(
        next_frame(&mut ws).await,
        ServerFrame::History {
            req: "h1".into(),
            conv: "dm~alice~bob".into(),
            messages: gap,
            more: false,
        }
    );
}

#[tokio::test]
async fn sync_and_receipts_without_responder_are_unavailable() {
    let gw = spawn_gateway(|c| c.history_timeout_ms = 500).await;
    let mut ws = gw.connect("alice", "phone").await;
    send(&mut ws, r#"{"type":"sync","req":"s1"}"#).await;
    let err = next_error(&mut ws).await;
    assert_eq!(err.code, ErrorCode::Unavailable);
    assert_eq!(err.req.as_deref(), Some("s1"));
    send(
        &mut ws,
        r#"{"type":"receipts","req":"q1","conv":"dm~alice~bob","seq":1}"#,
    )
    .await;
    let err = next_error(&mut ws).await;
    assert_eq!(err.code, ErrorCode::Unavailable);
    assert_eq!(err.req.as_deref(), Some("q1"));
    ping_pong(&mut ws).await;
}

#[tokio::test]
async fn delivery_requests_are_answered_while_a_device_is_connected() {
    let gw = spawn_gateway(|_| {}).await;
    let bob_subject = subjects::user(&UserId::parse("bob").unwrap());
    let ask = |payload: String| {
        gw.nats.send_request(
            bob_subject.clone(),
            async_nats::Request::new()
                .payload(payload.into())
                .timeout(Some(Duration::from_secs(2))),
        )
    };
    let mut bob = gw.connect("bob", "phone").await;
    let _alice = gw.connect("alice", "phone").await;

    // What a fan-out worker does: publish the frame with a reply subject.
    let frame = message_frame("dm~alice~bob", 1, "are you there?");
    let answer = ask(frame.clone()).await.expect("bob's gateway answers");
    assert!(answer.payload.is_empty());
    assert_eq!(next_text(&mut bob).await, frame, "forwarded unchanged");

    // Receipt frames travel the same way and reach the socket verbatim.
    let receipt = serde_json::to_string(&ServerFrame::Receipt(Receipt {
        conv: "dm~alice~bob".into(),
        user: "alice".into(),
        delivered: 1,
        read: 1,
    }))
    .unwrap();
    ask(receipt.clone()).await.expect("answered");
    assert_eq!(next_text(&mut bob).await, receipt);

    // Once bob is gone, nobody answers: the worker learns no device took it.
    bob.close(None).await.unwrap();
    timeout(WAIT, async {
        loop {
            match ask(message_frame("dm~alice~bob", 2, "gone?")).await {
                Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => break,
                // The unsubscription may still be on its way.
                Ok(_) | Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    })
    .await
    .expect("no responders once bob disconnected");
}

fn group_event_frame(conv: &str, seq: u64, from: &str, event: GroupEvent) -> String {
    serde_json::to_string(&ServerFrame::Message(ChatMessage {
        conv: conv.into(),
        seq,
        from: from.into(),
        id: format!("op{seq}"),
        ts: 1,
        body: String::new(),
        event: Some(event),
        media: None,
    }))
    .unwrap()
}

#[tokio::test]
async fn group_frames_are_stored_once_and_answered_sent() {
    let gw = spawn_gateway(|_| {}).await;
    let mut ws = gw.connect("alice", "phone").await;
    let create = r#"{"type":"group","op":"create","conv":"g~team","id":"op1","name":"Team","members":["bob"]}"#;
    for _ in 0..2 {
        // The retry of the same id is stored once.
        send(&mut ws, create).await;
        match next_frame(&mut ws).await {
            ServerFrame::Sent { id, conv, .. } => {
                assert_eq!((id.as_str(), conv.as_str()), ("op1", "g~team"))
            }
            other => panic!("expected sent, got {other:?}"),
        }
    }
    send(
        &mut ws,
        r#"{"type":"group","op":"add","conv":"g~team","id":"op2"}"#,
    )
    .await;
    let e = next_error(&mut ws).await;
    assert_eq!(
        (e.code, e.id.as_deref(), e.conv.as_deref()),
        (ErrorCode::InvalidFrame, Some("op2"), Some("g~team"))
    );
    gw.wait_chat_in(1).await;
    let stored = gw
        .chat_in()
        .await
        .get_last_raw_message_by_subject("chat.inp.>")
        .await;
    let stored = match stored {
        Ok(m) => m,
        Err(_) => gw.chat_in().await.get_raw_message(1).await.unwrap(),
    };
    let inbound: Inbound = serde_json::from_slice(&stored.payload).unwrap();
    let Inbound::Group(group) = inbound else {
        panic!("not a group frame: {inbound:?}")
    };
    assert_eq!(
        (group.from.as_str(), group.op, group.members),
        ("alice", GroupOp::Create, vec!["bob".to_owned()])
    );
}

#[tokio::test]
async fn conversations_and_group_info_are_answered_for_the_user() {
    let gw = spawn_gateway(|_| {}).await;
    let mut convs = gw.responder(subjects::CONVERSATIONS_API).await;
    let mut info = gw.responder(subjects::GROUP_INFO_API).await;
    let url = gw.url(&format!("token={}&device=phone", token("alice")));
    let connecting = tokio::spawn(try_connect(url, None));
    // At connect: the user's groups (none here), before hello.
    let (request, msg): (ConversationsRequest, _) = next_request(&mut convs).await;
    assert!(request.groups_only && request.user == "alice");
    gw.reply(
        &msg,
        &ConversationsReply::Page {
            convs: vec![],
            more: false,
            next: None,
        },
    )
    .await;
    let mut ws = connecting.await.unwrap().expect("upgrade accepted");
    assert!(matches!(
        next_frame(&mut ws).await,
        ServerFrame::Hello { .. }
    ));

    send(
        &mut ws,
        r#"{"type":"conversations","req":"c1","limit":9999}"#,
    )
    .await;
    let (request, msg): (ConversationsRequest, _) = next_request(&mut convs).await;
    assert_eq!(
        (request.limit, request.groups_only, request.user.as_str()),
        (api::CONVERSATIONS_PAGE_MAX, false, "alice")
    );
    let entry = ConvInfo {
        conv: "g~team".into(),
        name: Some("Team".into()),
        member_count: 2,
        latest: 3,
        unread: 1,
        admin: true,
        joined: 1,
        left: None,
    };
    gw.reply(
        &msg,
        &ConversationsReply::Page {
            convs: vec![entry.clone()],
            more: false,
            next: None,
        },
    )
    .await;
    assert_eq!(
        next_frame(&mut ws).await,
        ServerFrame::Conversations {
            req: "c1".into(),
            convs: vec![entry],
            more: false,
            next: None
        }
    );

    send(
        &mut ws,
        r#"{"type":"group_info","req":"i1","conv":"g~team"}"#,
    )
    .await;
    let (request, msg): (GroupInfoRequest, _) = next_request(&mut info).await;
    assert_eq!(
        request,
        GroupInfoRequest {
            conv: "g~team".into(),
            user: Some("alice".into()),
            since: None,
        }
    );
    let mut refusal = ErrorFrame::new(ErrorCode::NotMember, "not a member");
    refusal.conv = Some("g~team".into());
    gw.reply(&msg, &GroupInfoReply::Error(refusal)).await;
    let e = next_error(&mut ws).await;
    assert_eq!(
        (e.code, e.req.as_deref()),
        (ErrorCode::NotMember, Some("i1"))
    );
}

#[tokio::test]
async fn large_group_messages_reach_connected_members_within_their_membership() {
    let gw = spawn_gateway(|_| {}).await;
    let mut convs = gw.responder(subjects::CONVERSATIONS_API).await;
    // Answers every group listing: alice joined g~big at 5, bob at 1, carol is in no group.
    let nats = gw.nats.clone();
    tokio::spawn(async move {
        while let Some(msg) = convs.next().await {
            let request: ConversationsRequest = serde_json::from_slice(&msg.payload).unwrap();
            let joined = if request.user == "alice" { 5 } else { 1 };
            let entry = ConvInfo {
                conv: "g~big".into(),
                name: Some("Big".into()),
                member_count: 500,
                latest: 6,
                unread: 0,
                admin: false,
                joined,
                left: None,
            };
            let convs = if request.user == "carol" {
                vec![]
            } else {
                vec![entry]
            };
            let reply = ConversationsReply::Page {
                convs,
                more: false,
                next: None,
            };
            let payload = serde_json::to_vec(&reply).unwrap();
            nats.publish(msg.reply.unwrap(), payload.into())
                .await
                .unwrap();
        }
    });
    let mut alice = gw.connect("alice", "phone").await;
    let mut bob = gw.connect("bob", "phone").await;
    let mut carol = gw.connect("carol", "phone").await;
    let conv = ConvId::parse("g~big").unwrap();
    let publish = |payload: String| {
        let nats = gw.nats.clone();
        let subject = subjects::group(&conv);
        async move { nats.publish(subject, payload.into()).await.unwrap() }
    };
    // Before alice's join: bob only. From it on: both, unchanged.
    publish(message_frame("g~big", 4, "old")).await;
    let m6 = message_frame("g~big", 6, "new");
    publish(m6.clone()).await;
    assert_eq!(next_text(&mut bob).await, message_frame("g~big", 4, "old"));
    assert_eq!(next_text(&mut bob).await, m6);
    assert_eq!(next_text(&mut alice).await, m6);

    // Alice is removed at 7: her removal comes on her own subject (the fan-out worker sends
    // the users an event names there), the group's copy is not forwarded to her twice.
    let removed = group_event_frame(
        "g~big",
        7,
        "bob",
        GroupEvent::Removed {
            members: vec!["alice".into()],
        },
    );
    publish(removed.clone()).await;
    push_to(&gw, "alice", removed.clone()).await;
    assert_eq!(next_text(&mut bob).await, removed);
    assert_eq!(next_text(&mut alice).await, removed);
    let m8 = message_frame("g~big", 8, "after");
    publish(m8.clone()).await;
    assert_eq!(next_text(&mut bob).await, m8);
    // Carol, not a member, is added at 9 on her own subject; from then on she gets the group.
    let added = group_event_frame(
        "g~big",
        9,
        "bob",
        GroupEvent::Added {
            members: vec!["carol".into()],
        },
    );
    push_to(&gw, "carol", added.clone()).await;
    assert_eq!(next_text(&mut carol).await, added);
    ping_pong(&mut carol).await;
    publish(added.clone()).await;
    let m10 = message_frame("g~big", 10, "welcome");
    publish(m10.clone()).await;
    assert_eq!(next_text(&mut bob).await, added);
    assert_eq!(next_text(&mut bob).await, m10);
    assert_eq!(
        next_text(&mut carol).await,
        m10,
        "the added event is not repeated"
    );
    assert_silent(&mut alice, Duration::from_millis(300)).await;
}

/// The tokens a delivery confirmation message confirms: one (an ordinary reply to
/// `<inbox>.<token>`) or several (a batch to `<inbox>.c`).
fn confirmed_tokens(msg: &async_nats::Message) -> Vec<u64> {
    let (_, last) = subjects::split_reply(&msg.subject).expect("a token");
    if last == subjects::CONFIRM_BATCH_TOKEN {
        std::str::from_utf8(&msg.payload)
            .unwrap()
            .split(',')
            .map(|t| t.parse().unwrap())
            .collect()
    } else {
        vec![last.parse().unwrap()]
    }
}

#[tokio::test]
async fn a_users_devices_on_two_gateways_all_get_every_push_confirmed_once_per_gateway() {
    let gw1 = spawn_gateway(|_| {}).await;
    let gw2 = gw1.another(|_| {}).await;
    let mut phone = gw1.connect("alice", "phone").await;
    let mut tablet = gw1.connect("alice", "tablet").await;
    let mut laptop = gw2.connect("alice", "laptop").await;
    let mut bob = gw2.connect("bob", "phone").await;

    // What a fan-out worker does: each push with a reply subject under its own inbox.
    let inbox = gw1.nats.new_inbox();
    let mut confirmations = gw1.nats.subscribe(format!("{inbox}.*")).await.unwrap();
    let _ = gw1.nats.request(gw1.nats.new_inbox(), "".into()).await;
    let alice = subjects::user(&UserId::parse("alice").unwrap());
    let frames: Vec<String> = (1..=20)
        .map(|seq| message_frame("dm~alice~bob", seq, &format!("push {seq}")))
        .collect();
    for (seq, frame) in (1..).zip(&frames) {
        gw1.nats
            .publish_with_reply(
                alice.clone(),
                format!("{inbox}.{seq}"),
                frame.clone().into(),
            )
            .await
            .unwrap();
    }
    for device in [&mut phone, &mut tablet, &mut laptop] {
        for frame in &frames {
            assert_eq!(&next_text(device).await, frame, "every push, in order");
        }
    }

    // Each gateway holding a device of alice confirms each push once: twice in all, however
    // many of her devices a gateway holds. Push 21 is confirmed after everything before it
    // (each gateway confirms in order), so any extra confirmation would have come first.
    let last = message_frame("dm~alice~bob", 21, "last");
    gw1.nats
        .publish_with_reply(alice.clone(), format!("{inbox}.21"), last.into())
        .await
        .unwrap();
    let mut counts: BTreeMap<u64, u32> = BTreeMap::new();
    timeout(WAIT, async {
        while counts.get(&21).copied().unwrap_or(0) < 2 {
            let msg = confirmations.next().await.expect("subscription open");
            for token in confirmed_tokens(&msg) {
                *counts.entry(token).or_default() += 1;
            }
        }
    })
    .await
    .expect("every push confirmed in time");
    assert_eq!(
        counts,
        (1..=21).map(|t| (t, 2)).collect::<BTreeMap<u64, u32>>()
    );
    assert_silent(&mut bob, Duration::from_millis(100)).await;
}

#[tokio::test]
async fn handshakes_beyond_the_limit_are_refused_503_overloaded_then_admitted_again() {
    let gw = spawn_gateway(|c| {
        c.max_handshakes = 1;
        c.overloaded_retry_after_s = 2;
    })
    .await;
    // Playing the sequencer: the group list each handshake asks for before its `hello`.
    let mut lists = gw.responder(subjects::CONVERSATIONS_API).await;
    let url = |user: &str| gw.url(&format!("token={}&device=phone", token(user)));
    let first = tokio::spawn(try_connect(url("alice"), None));
    // The first handshake is in progress (its group list is asked for and not answered yet).
    let (request, msg): (ConversationsRequest, _) = next_request(&mut lists).await;
    assert!(request.groups_only);

    let r = refused(url("bob")).await;
    assert_eq!(
        (r.status, r.body["code"].as_str()),
        (503, Some("overloaded"))
    );
    assert_eq!(r.retry_after.as_deref(), Some("2"));
    assert!(r.body["message"].as_str().is_some_and(|m| !m.is_empty()));

    let empty = ConversationsReply::Page {
        convs: vec![],
        more: false,
        next: None,
    };
    gw.reply(&msg, &empty).await;
    let mut phone = first.await.unwrap().expect("the first handshake completes");
    assert!(matches!(
        next_frame(&mut phone).await,
        ServerFrame::Hello { .. }
    ));

    // Its handshake is over: the next one is admitted.
    let second = tokio::spawn(try_connect(url("bob"), None));
    let (request, msg): (ConversationsRequest, _) = next_request(&mut lists).await;
    assert_eq!(request.user, "bob");
    gw.reply(&msg, &empty).await;
    let mut bob = second.await.unwrap().expect("admitted again");
    assert!(matches!(
        next_frame(&mut bob).await,
        ServerFrame::Hello { .. }
    ));
}

/// The gateway logs in to a nats-server that requires authentication with each way of
/// `nats_auth`, its push connection included: the upgrade is answered only once the user's
/// subscription on the push connection is live, and a push published after `hello` arrives.
#[tokio::test]
async fn the_push_connection_logs_in_with_a_password_file_or_an_nkey_seed() {
    let key = nkeys::KeyPair::new_user();
    let server = NatsServer::start_with_config(&format!(
        "authorization {{\n  users: [\n    {{ user: gw, password: \"pw-gw\" }}\n    \
         {{ user: admin, password: \"pw-admin\" }}\n    {{ nkey: {} }}\n  ]\n}}\n",
        key.public_key()
    ));
    let admin =
        async_nats::ConnectOptions::with_user_and_password("admin".into(), "pw-admin".into())
            .connect(server.url())
            .await
            .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let password_file = dir.path().join("password");
    std::fs::write(&password_file, "pw-gw\n").unwrap();
    let seed_file = dir.path().join("seed");
    std::fs::write(&seed_file, key.seed().unwrap()).unwrap();
    let ways = [
        chat_common::nats::NatsAuth {
            user: Some("gw".into()),
            password_file: Some(password_file),
            ..Default::default()
        },
        chat_common::nats::NatsAuth {
            nkey_seed_file: Some(seed_file),
            ..Default::default()
        },
    ];
    for (n, auth) in ways.into_iter().enumerate() {
        let way = format!("{auth:?}");
        let (addr, shutdown, task) =
            start_gateway(&server.url(), |c| c.nats_auth = auth.clone()).await;
        let mut ws = connect_at(addr, "alice", "phone").await;
        let frame = message_frame("dm~alice~bob", n as u64 + 1, "logged in");
        assert_eq!(push_to_alice(&admin, &mut ws, &frame).await, frame, "{way}");
        stop_gateway(shutdown, task).await;
    }
    assert!(
        !server.logs().contains("Authorization Violation"),
        "{}",
        server.logs()
    );
}

/// Over a nats-server that requires TLS and client certificates, the gateway's two connections
/// (async-nats for JetStream, the push connection for deliveries) both verify the server with
/// `nats_tls.ca_file` and present `cert_file`: a send is stored and answered `sent`, and a push
/// published after `hello` arrives.
#[tokio::test]
async fn over_tls_with_client_certificates_sends_are_stored_and_pushes_arrive() {
    use chat_testkit::tls::{fixture as tls_fixture, server_config};
    let server = NatsServer::start_with_config(&server_config(""));
    let tls = chat_common::nats::NatsTls {
        ca_file: Some(tls_fixture("test-only-ca.pem")),
        cert_file: Some(tls_fixture("test-only-client.pem")),
        key_file: Some(tls_fixture("test-only-client-key.pem")),
        handshake_first: false,
    };
    let url = format!("tls://127.0.0.1:{}", server.port());
    let admin = tls
        .apply(async_nats::ConnectOptions::new())
        .unwrap()
        .connect(&url)
        .await
        .unwrap();
    provision_all(&admin, &Default::default()).await.unwrap();
    let (addr, shutdown, task) = start_gateway(&url, |c| c.nats_tls = tls.clone()).await;
    let mut ws = connect_at(addr, "alice", "phone").await;
    send(&mut ws, &send_json("dm~alice~bob", "t1", "over tls")).await;
    match next_frame(&mut ws).await {
        ServerFrame::Sent { id, .. } => assert_eq!(id, "t1"),
        other => panic!("expected sent, got {other:?}\n{}", server.logs()),
    }
    let stream = jetstream::new(admin.clone())
        .get_stream(subjects::STREAM_INBOUND)
        .await
        .unwrap();
    assert_eq!(stream.get_info().await.unwrap().state.messages, 1);
    let frame = message_frame("dm~alice~bob", 1, "pushed over tls");
    assert_eq!(push_to_alice(&admin, &mut ws, &frame).await, frame);
    stop_gateway(shutdown, task).await;
}

/// Publishes `frame` on alice's push subject with `nats`; returns the next text her device
/// `ws` reads.
async fn push_to_alice(nats: &async_nats::Client, ws: &mut Ws, frame: &str) -> String {
    let alice = subjects::user(&UserId::parse("alice").unwrap());
    nats.publish(alice, frame.to_owned().into()).await.unwrap();
    next_text(ws).await
}

/// Stops a gateway of [`start_gateway`] and checks that it returned without an error.
async fn stop_gateway(shutdown: CancellationToken, task: JoinHandle<anyhow::Result<()>>) {
    shutdown.cancel();
    timeout(WAIT, task)
        .await
        .expect("the gateway stops")
        .unwrap()
        .unwrap();
}
