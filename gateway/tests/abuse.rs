//! Token hardening and abuse limits, against a real nats-server (with the `CHAT_LIMITS` bucket
//! provisioned from `nats/streams/`) and real gateways, over real WebSockets. Where two
//! gateways share one nats-server, a user's budgets are shown to hold across them. Where the
//! sequencer would answer `chat.api.history` (is a conversation new?), the test plays it.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use async_nats::jetstream;
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use chat_gateway::{Config, KeyConfig};
use chat_protocol::{
    api::{HistoryReply, HistoryRequest},
    auth::{Claims, KeyAlgorithm, mint_dev_token, mint_hs256, now_secs},
    frames::{ErrorCode, ErrorFrame, Message as ChatMessage, ServerFrame},
    ids::UserId,
    jetstream::provision_all,
    subjects,
};
use chat_testkit::NatsServer;
use futures::{SinkExt, StreamExt};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use tokio::{task::JoinHandle, time::timeout};
use tokio_tungstenite::{
    MaybeTlsStream, WebSocketStream,
    tungstenite::{self, Message, client::IntoClientRequest},
};
use tokio_util::sync::CancellationToken;

const SECRET: &str = "abuse-test-secret";
const WAIT: Duration = Duration::from_secs(10);

/// Test-only keys (`protocol/tests/fixtures/README.md`).
const RSA_PRIVATE: &[u8] =
    include_bytes!("../../protocol/tests/fixtures/test-only-rsa-private.pem");
const RSA_PUBLIC: &[u8] = include_bytes!("../../protocol/tests/fixtures/test-only-rsa-public.pem");
const ED_PRIVATE: &[u8] =
    include_bytes!("../../protocol/tests/fixtures/test-only-ed25519-private.pem");

type Ws = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("../protocol/tests/fixtures/{name}"))
}

/// Gateways sharing one nats-server with the streams provisioned.
struct Fleet {
    nats: async_nats::Client,
    js: jetstream::Context,
    addrs: Vec<SocketAddr>,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<anyhow::Result<()>>>,
    _server: NatsServer,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn fleet(gateways: usize, tweak: impl Fn(&mut Config)) -> Fleet {
    let server = NatsServer::start();
    let nats = server.client().await;
    provision_all(&nats, &Default::default()).await.unwrap();
    let shutdown = CancellationToken::new();
    let (mut addrs, mut tasks) = (Vec::new(), Vec::new());
    for _ in 0..gateways {
        let mut config = Config {
            nats_url: server.url(),
            admin_listen: String::new(),
            sends_per_second: 1000,
            send_burst: 1000,
            ..Config::default()
        };
        config.auth.hs256_secret = Some(SECRET.into());
        tweak(&mut config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        addrs.push(listener.local_addr().unwrap());
        tasks.push(tokio::spawn(chat_gateway::run(
            config,
            listener,
            None,
            shutdown.clone(),
        )));
    }
    Fleet {
        js: jetstream::new(nats.clone()),
        nats,
        addrs,
        shutdown,
        tasks,
        _server: server,
    }
}

/// An upgrade refused: status, `Retry-After`, JSON body.
#[derive(Debug)]
struct Refused {
    status: u16,
    retry_after: Option<String>,
    body: serde_json::Value,
}

impl Fleet {
    fn url(&self, gateway: usize, token: &str) -> String {
        format!("ws://{}/ws?token={token}&device=d1", self.addrs[gateway])
    }

    /// Connects `user` to gateway `gateway` and reads its `hello`.
    async fn connect(&self, gateway: usize, user: &str) -> Ws {
        let token = mint_dev_token(SECRET.as_bytes(), &UserId::parse(user).unwrap(), 300);
        let mut ws = upgrade(self.url(gateway, &token)).await.expect("accepted");
        assert!(matches!(
            next_frame(&mut ws).await,
            ServerFrame::Hello { .. }
        ));
        ws
    }

    async fn chat_in_count(&self) -> u64 {
        let stream = self.js.get_stream(subjects::STREAM_INBOUND).await.unwrap();
        stream.get_info().await.unwrap().state.messages
    }

    /// Plays the sequencer's history responder: conversations in `existing` have one message,
    /// every other conversation none. Returns once the server registered the subscription.
    async fn history_responder(&self, existing: &'static [&'static str]) -> JoinHandle<()> {
        let mut sub = self
            .nats
            .subscribe(subjects::HISTORY_API.to_owned())
            .await
            .unwrap();
        let _ = self.nats.request(self.nats.new_inbox(), "".into()).await;
        let nats = self.nats.clone();
        tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                let req: HistoryRequest = serde_json::from_slice(&msg.payload).unwrap();
                assert_eq!(
                    req.limit, 1,
                    "the new-conversation check asks for one message"
                );
                let messages = if existing.contains(&req.conv.as_str()) {
                    vec![ChatMessage {
                        conv: req.conv.clone(),
                        seq: 1,
                        from: "bob".into(),
                        id: "b1".into(),
                        ts: 1,
                        body: "hi".into(),
                        event: None,
                        media: None,
                    }]
                } else {
                    vec![]
                };
                let reply = HistoryReply::Page {
                    messages,
                    more: false,
                };
                let payload = serde_json::to_vec(&reply).unwrap();
                let _ = nats.publish(msg.reply.unwrap(), payload.into()).await;
            }
        })
    }
}

async fn upgrade(request: impl IntoClientRequest + Unpin) -> Result<Ws, Refused> {
    let connecting = tokio_tungstenite::connect_async(request);
    match timeout(WAIT, connecting).await.expect("handshake in time") {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::Error::Http(resp)) => {
            let body = resp.body().clone().unwrap_or_default();
            Err(Refused {
                status: resp.status().as_u16(),
                retry_after: resp
                    .headers()
                    .get("retry-after")
                    .map(|v| v.to_str().unwrap().to_owned()),
                body: serde_json::from_slice(&body).unwrap(),
            })
        }
        Err(other) => panic!("handshake failed: {other}"),
    }
}

async fn refused(request: impl IntoClientRequest + Unpin) -> Refused {
    match upgrade(request).await {
        Ok(_) => panic!("upgrade unexpectedly accepted"),
        Err(r) => r,
    }
}

async fn send(ws: &mut Ws, frame: serde_json::Value) {
    timeout(WAIT, ws.send(Message::text(frame.to_string())))
        .await
        .expect("send in time")
        .unwrap();
}

async fn next_frame(ws: &mut Ws) -> ServerFrame {
    loop {
        let msg = timeout(WAIT, ws.next())
            .await
            .expect("a frame in time")
            .expect("open")
            .expect("readable");
        match msg {
            Message::Text(t) => return serde_json::from_str(t.as_str()).unwrap(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

async fn expect_sent(ws: &mut Ws, want: &str) {
    match next_frame(ws).await {
        ServerFrame::Sent { id, .. } => assert_eq!(id, want),
        other => panic!("expected sent {want}, got {other:?}"),
    }
}

async fn expect_error(ws: &mut Ws) -> ErrorFrame {
    match next_frame(ws).await {
        ServerFrame::Error(e) => e,
        other => panic!("expected an error, got {other:?}"),
    }
}

fn group(op: &str, conv: &str, id: &str, members: &[&str]) -> serde_json::Value {
    let mut frame = serde_json::json!({"type": "group", "op": op, "conv": conv, "id": id});
    if op == "create" {
        frame["name"] = "team".into();
    }
    if !members.is_empty() {
        frame["members"] = members.into();
    }
    frame
}

fn dm(conv: &str, id: &str) -> serde_json::Value {
    serde_json::json!({"type": "send", "conv": conv, "id": id, "body": "hello"})
}

fn sign(alg: Algorithm, kid: Option<&str>, key: &EncodingKey, claims: serde_json::Value) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, &claims, key).unwrap()
}

fn claims(exp: u64) -> serde_json::Value {
    serde_json::json!({"sub": "alice", "exp": exp})
}

#[tokio::test]
async fn refused_tokens_get_401_with_the_reason_at_the_handshake() {
    let f = fleet(1, |c| {
        // Production-like: no shared secret, two public keys selected by kid.
        c.auth.hs256_secret = None;
        c.auth.leeway_secs = 30;
        c.auth.keys = vec![
            KeyConfig {
                kid: Some("rsa-2025".into()),
                alg: KeyAlgorithm::RS256,
                secret: None,
                public_key_file: Some(fixture("test-only-rsa-public.pem")),
            },
            KeyConfig {
                kid: Some("ed-2026".into()),
                alg: KeyAlgorithm::EdDSA,
                secret: None,
                public_key_file: Some(fixture("test-only-ed25519-public.pem")),
            },
        ];
    })
    .await;
    let rsa = EncodingKey::from_rsa_pem(RSA_PRIVATE).unwrap();
    let ed = EncodingKey::from_ed_pem(ED_PRIVATE).unwrap();
    let later = now_secs() + 300;
    let unauthorized = |r: Refused, reason: &str| {
        assert_eq!(r.status, 401, "{:?}", r.body);
        assert_eq!(r.body["code"], "unauthorized", "{:?}", r.body);
        let message = r.body["message"].as_str().unwrap();
        assert!(message.contains(reason), "{message:?} lacks {reason:?}");
    };

    // Both keys work during a rotation.
    for token in [
        sign(Algorithm::RS256, Some("rsa-2025"), &rsa, claims(later)),
        sign(Algorithm::EdDSA, Some("ed-2026"), &ed, claims(later)),
    ] {
        let mut ws = upgrade(f.url(0, &token)).await.expect("accepted");
        assert!(matches!(
            next_frame(&mut ws).await,
            ServerFrame::Hello { .. }
        ));
    }
    // Key confusion: HS256 "signed" with the RS256 public key as the HMAC secret.
    let forged = mint_hs256(RSA_PUBLIC, Some("rsa-2025"), &claims(later));
    unauthorized(refused(f.url(0, &forged)).await, "does not match");
    let forged = mint_hs256(RSA_PUBLIC, None, &claims(later));
    unauthorized(refused(f.url(0, &forged)).await, "no key id");
    // The EdDSA key's id on an RS256 token: the key decides the algorithm.
    let swapped = sign(Algorithm::RS256, Some("ed-2026"), &rsa, claims(later));
    unauthorized(refused(f.url(0, &swapped)).await, "does not match");
    let retired = sign(Algorithm::RS256, Some("rsa-2024"), &rsa, claims(later));
    unauthorized(refused(f.url(0, &retired)).await, "\"rsa-2024\"");
    // alg none: an unsigned token.
    let unsigned = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT","kid":"rsa-2025"}"#),
        URL_SAFE_NO_PAD.encode(claims(later).to_string())
    );
    unauthorized(refused(f.url(0, &unsigned)).await, "invalid access token");
    // exp is required; nbf beyond the leeway is refused, within it accepted.
    let no_exp = sign(
        Algorithm::RS256,
        Some("rsa-2025"),
        &rsa,
        serde_json::json!({"sub": "alice"}),
    );
    unauthorized(refused(f.url(0, &no_exp)).await, "exp");
    let now = now_secs();
    let early = serde_json::json!({"sub": "alice", "exp": later, "nbf": now + 120});
    let early = sign(Algorithm::RS256, Some("rsa-2025"), &rsa, early);
    unauthorized(refused(f.url(0, &early)).await, "not valid yet");
    let skewed = serde_json::json!({"sub": "alice", "exp": later, "nbf": now + 10});
    let skewed = sign(Algorithm::RS256, Some("rsa-2025"), &rsa, skewed);
    assert!(
        upgrade(f.url(0, &skewed)).await.is_ok(),
        "within the leeway"
    );
    // exp: 10 s ago is within the leeway, 120 s ago is expired.
    let just = sign(Algorithm::RS256, Some("rsa-2025"), &rsa, claims(now - 10));
    assert!(upgrade(f.url(0, &just)).await.is_ok(), "within the leeway");
    let stale = sign(Algorithm::RS256, Some("rsa-2025"), &rsa, claims(now - 120));
    let r = refused(f.url(0, &stale)).await;
    assert_eq!(
        (r.status, r.body["code"].as_str()),
        (401, Some("token_expired"))
    );
}

#[tokio::test]
async fn an_address_that_keeps_failing_is_refused_429_before_its_token_is_read() {
    let f = fleet(1, |c| {
        c.abuse.auth_failures_per_minute = 3;
        c.abuse.client_ip_header = Some("x-forwarded-for".into());
    })
    .await;
    let good = mint_dev_token(SECRET.as_bytes(), &UserId::parse("alice").unwrap(), 300);
    let expired = mint_hs256(
        SECRET.as_bytes(),
        None,
        &Claims {
            sub: "alice".into(),
            exp: now_secs() - 3600,
            iat: 0,
        },
    );
    let from = |ip: &str, token: &str| {
        let mut request = f.url(0, token).into_client_request().unwrap();
        let forwarded = format!("203.0.113.9, {ip}").parse().unwrap();
        request.headers_mut().insert("x-forwarded-for", forwarded);
        request
    };
    let attacker = "198.51.100.1";
    for token in ["garbage", &expired, "another.bad.token"] {
        let r = refused(from(attacker, token)).await;
        assert_eq!(r.status, 401, "{:?}", r.body);
    }
    // The budget is used up: refused before the token is looked at, even a valid one.
    let r = refused(from(attacker, &good)).await;
    assert_eq!(r.status, 429, "{:?}", r.body);
    assert_eq!(r.body["code"], "rate_limited");
    let retry_ms = r.body["retry_after_ms"].as_u64().expect("retry_after_ms");
    assert!(retry_ms > 0 && retry_ms <= 20_000, "{retry_ms}");
    let secs: u64 = r.retry_after.expect("Retry-After").parse().unwrap();
    assert!((1..=20).contains(&secs), "{secs}");
    // Another address behind the same proxy is not affected, and gets in.
    let mut ws = upgrade(from("198.51.100.2", &good))
        .await
        .expect("accepted");
    assert!(matches!(
        next_frame(&mut ws).await,
        ServerFrame::Hello { .. }
    ));
}

#[tokio::test]
async fn group_budgets_are_per_user_across_gateways_and_spare_other_traffic() {
    let f = fleet(2, |c| {
        c.abuse.groups_per_hour = 2;
        c.abuse.group_members_per_minute = 3;
    })
    .await;
    let _history = f.history_responder(&["dm~alice~bob"]).await;
    let mut a1 = f.connect(0, "alice").await;
    let mut a2 = f.connect(1, "alice").await;
    send(&mut a1, group("create", "g~one", "c1", &["bob"])).await;
    expect_sent(&mut a1, "c1").await;
    send(&mut a2, group("create", "g~two", "c2", &[])).await;
    expect_sent(&mut a2, "c2").await;
    // The third group this hour, whichever gateway it comes through.
    send(&mut a1, group("create", "g~three", "c3", &[])).await;
    let e = expect_error(&mut a1).await;
    assert_eq!(e.code, ErrorCode::RateLimited, "{e:?}");
    assert_eq!(
        (e.id.as_deref(), e.conv.as_deref()),
        (Some("c3"), Some("g~three"))
    );
    let retry = e.retry_after_ms.expect("retry_after_ms");
    assert!(retry > 0 && retry <= 3_600_000, "{retry}");
    assert!(e.message.contains("2 groups per hour"), "{}", e.message);
    // Bob has his own budget.
    let mut b = f.connect(1, "bob").await;
    send(&mut b, group("create", "g~bobs", "b1", &[])).await;
    expect_sent(&mut b, "b1").await;

    // Members: one used by the first create; a frame naming more than a minute's budget can
    // never pass; two more fit, the next does not.
    send(
        &mut a2,
        group("add", "g~one", "a1", &["u1", "u2", "u3", "u4"]),
    )
    .await;
    let e = expect_error(&mut a2).await;
    assert_eq!(
        (e.code, e.id.as_deref()),
        (ErrorCode::InvalidFrame, Some("a1"))
    );
    send(&mut a2, group("add", "g~one", "a2", &["u1", "u2"])).await;
    expect_sent(&mut a2, "a2").await;
    send(&mut a1, group("add", "g~one", "a3", &["u3"])).await;
    let e = expect_error(&mut a1).await;
    assert_eq!(
        (e.code, e.id.as_deref()),
        (ErrorCode::RateLimited, Some("a3"))
    );
    assert!(e.retry_after_ms.is_some_and(|ms| ms > 0 && ms <= 60_000));

    // The limited user's other traffic goes on: a send to an existing conversation, a rename.
    send(&mut a1, dm("dm~alice~bob", "m1")).await;
    expect_sent(&mut a1, "m1").await;
    let mut rename = group("rename", "g~one", "r1", &[]);
    rename["name"] = "renamed".into();
    send(&mut a2, rename).await;
    expect_sent(&mut a2, "r1").await;
    // Stored: 2 creates, bob's create, 1 add, the send, the rename; nothing refused.
    assert_eq!(f.chat_in_count().await, 6);
}

#[tokio::test]
async fn new_conversations_are_capped_per_user_and_existing_ones_are_not() {
    let f = fleet(2, |c| c.abuse.new_conversations_per_minute = 2).await;
    let _history = f.history_responder(&["dm~alice~bob"]).await;
    let mut a1 = f.connect(0, "alice").await;
    let mut a2 = f.connect(1, "alice").await;
    send(&mut a1, dm("dm~alice~carol", "m1")).await;
    expect_sent(&mut a1, "m1").await;
    send(&mut a2, dm("dm~alice~dan", "m2")).await;
    expect_sent(&mut a2, "m2").await;
    // A third peer she never talked to, through either gateway: refused, nothing stored.
    send(&mut a1, dm("dm~alice~eve", "m3")).await;
    let e = expect_error(&mut a1).await;
    assert_eq!(e.code, ErrorCode::RateLimited, "{e:?}");
    assert_eq!(
        (e.id.as_deref(), e.conv.as_deref()),
        (Some("m3"), Some("dm~alice~eve"))
    );
    assert!(e.retry_after_ms.is_some_and(|ms| ms > 0 && ms <= 60_000));
    assert!(
        e.message.contains("new one-to-one conversations"),
        "{}",
        e.message
    );
    send(&mut a2, dm("dm~alice~fay", "m4")).await;
    assert_eq!(expect_error(&mut a2).await.code, ErrorCode::RateLimited);
    // Conversations with messages, and those she already opened, are not new.
    send(&mut a1, dm("dm~alice~bob", "m5")).await;
    expect_sent(&mut a1, "m5").await;
    send(&mut a1, dm("dm~alice~carol", "m6")).await;
    expect_sent(&mut a1, "m6").await;
    // Her other peers are not limited by her budget: eve may open one with her.
    let mut eve = f.connect(1, "eve").await;
    send(&mut eve, dm("dm~alice~eve", "e1")).await;
    expect_sent(&mut eve, "e1").await;
    assert_eq!(f.chat_in_count().await, 5);
}

#[tokio::test]
async fn without_the_limits_bucket_frames_are_let_through() {
    let f = fleet(1, |c| c.abuse.groups_per_hour = 1).await;
    f.js.delete_stream(subjects::STREAM_LIMITS).await.unwrap();
    let mut a = f.connect(0, "alice").await;
    for id in ["c1", "c2"] {
        send(&mut a, group("create", &format!("g~{id}"), id, &[])).await;
        expect_sent(&mut a, id).await;
    }
    for task in &f.tasks {
        assert!(!task.is_finished(), "the gateway keeps running");
    }
}
