//! The NATS users of `nats/auth.conf`, on a real nats-server started with that file:
//! - every service runs with its own user (in-process: gateway, with its push connection logged
//!   in as `gateway` too, sequencer, fan-out worker, presence, media with a real SeaweedFS) and
//!   a user sees what it should: a message delivered, its history, a presence answer, a media
//!   message verified and downloaded, an offline push notification pulled by the push
//!   adapter's user; the server logs no permission violation;
//! - the server refuses what a user must not do (a gateway publishing a stamped message, a
//!   fan-out worker publishing to the input stream, a gateway reading another service's
//!   replies, ...): the client gets the server's "Permissions Violation" and nothing arrives.
//!
//! The same test checks that `nats/dev.conf`, `nats/durable.conf` and `nats/cluster.conf` are valid server configs
//! (`nats-server -t`).

use std::time::Duration;

use async_nats::{ConnectOptions, Event, jetstream};
use chat_protocol::{
    auth::mint_dev_token,
    frames::{ClientFrame, MediaRef, ServerFrame},
    ids::UserId,
    jetstream::{Overrides, last_message, provision_all},
    subjects,
};
use chat_testkit::{NatsServer, SeaweedFs};
use futures::{SinkExt, StreamExt};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::{net::TcpStream, sync::mpsc};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, tungstenite};
use tokio_util::sync::CancellationToken;

const SECRET: &str = "e2e-permissions-secret";
const WAIT: Duration = Duration::from_secs(30);
const CONV: &str = "dm~alice~bob";
const USERS: [&str; 8] = [
    "gateway",
    "sequencer",
    "fanout",
    "presence",
    "media",
    "push",
    "admin",
    "sys",
];

fn password(user: &str) -> String {
    format!("pw-{user}-e2e")
}

/// `nats/auth.conf` with its password variables defined in front (nats-server resolves `$VAR`
/// from earlier definitions before the environment).
fn server_config() -> String {
    let mut config = String::new();
    for user in USERS {
        config.push_str(&format!(
            "CHAT_NATS_{}_PASSWORD: \"{}\"\n",
            user.to_uppercase(),
            password(user)
        ));
    }
    config.push_str(include_str!("../../nats/auth.conf"));
    config
}

/// A client as `user`, and the server errors it receives.
async fn client_as(
    nats: &NatsServer,
    user: &str,
    inbox: &str,
) -> (async_nats::Client, mpsc::UnboundedReceiver<String>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let client = ConnectOptions::with_user_and_password(user.into(), password(user))
        .custom_inbox_prefix(inbox)
        .event_callback(move |event| {
            let tx = tx.clone();
            async move {
                if let Event::ServerError(err) = event {
                    let _ = tx.send(err.to_string());
                }
            }
        })
        .connect(nats.url())
        .await
        .unwrap_or_else(|e| panic!("{user} cannot log in: {e}"));
    (client, rx)
}

/// Waits for the server's permission violation naming `subject`.
async fn refused(errors: &mut mpsc::UnboundedReceiver<String>, what: &str, subject: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let err = tokio::time::timeout_at(deadline, errors.recv())
            .await
            .unwrap_or_else(|_| panic!("the server did not refuse: {what} ({subject})"))
            .expect("error channel open");
        let lower = err.to_lowercase();
        if lower.contains("permissions violation") && err.contains(subject) {
            return;
        }
    }
}

fn auth_of(user: &str) -> chat_common::nats::NatsAuth {
    chat_common::nats::NatsAuth {
        user: Some(user.into()),
        password: Some(password(user)),
        ..Default::default()
    }
}

struct App {
    nats: NatsServer,
    ws_url: String,
    media_url: String,
    http: reqwest::Client,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
    _weed: SeaweedFs,
    _dir: tempfile::TempDir,
}

async fn spawn_app() -> App {
    let weed = tokio::task::spawn_blocking(SeaweedFs::start).await.unwrap();
    let nats = tokio::task::spawn_blocking(|| NatsServer::start_with_config(&server_config()))
        .await
        .unwrap();
    let (admin, _) = client_as(&nats, "admin", "_INBOX.admin").await;
    provision_all(&admin, &Overrides::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let stop = CancellationToken::new();

    let mut sequencer = chat_sequencer::Config {
        nats_url: nats.url(),
        admin_listen: String::new(),
        store_dir: dir.path().join("store"),
        ..Default::default()
    };
    sequencer.nats_auth = auth_of("sequencer");
    let mut fanout = chat_fanout::Config {
        nats_url: nats.url(),
        admin_listen: String::new(),
        ..Default::default()
    };
    fanout.nats_auth = auth_of("fanout");
    let mut gateway = chat_gateway::Config {
        nats_url: nats.url(),
        admin_listen: String::new(),
        ..Default::default()
    };
    gateway.nats_auth = auth_of("gateway");
    gateway.auth.hs256_secret = Some(SECRET.into());
    gateway.presence.flush_ms = 50;
    let mut presence = chat_presence::Config {
        nats_url: nats.url(),
        admin_listen: String::new(),
        ..Default::default()
    };
    presence.nats_auth = auth_of("presence");
    let mut media = chat_media::Config {
        nats_url: nats.url(),
        ..Default::default()
    };
    media.nats_auth = auth_of("media");
    media.auth.hs256_secret = Some(SECRET.into());
    media.s3.endpoint = weed.endpoint();
    media.s3.force_path_style = true;
    media.s3.bucket = weed.bucket().into();
    media.s3.access_key_id = Some(weed.access_key().into());
    media.s3.secret_access_key = Some(weed.secret_key().into());

    let ws = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ws_url = format!("ws://{}/ws", ws.local_addr().unwrap());
    let media_url = format!("http://{}", api.local_addr().unwrap());
    let ready_url = format!("http://{}/readyz", admin_listener.local_addr().unwrap());
    let tasks = vec![
        tokio::spawn(chat_sequencer::run(sequencer, None, stop.clone())),
        tokio::spawn(chat_fanout::run(fanout, None, stop.clone())),
        tokio::spawn(chat_presence::run(presence, None, stop.clone())),
        tokio::spawn(chat_gateway::run(gateway, ws, None, stop.clone())),
        tokio::spawn(chat_media::run(
            media,
            api,
            Some(admin_listener),
            stop.clone(),
        )),
    ];
    let http = reqwest::Client::builder().timeout(WAIT).build().unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while !http
        .get(&ready_url)
        .send()
        .await
        .is_ok_and(|r| r.status() == StatusCode::OK)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "media service not ready\n{}",
            nats.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    App {
        nats,
        ws_url,
        media_url,
        http,
        stop,
        tasks,
        _weed: weed,
        _dir: dir,
    }
}

fn token(user: &str) -> String {
    mint_dev_token(SECRET.as_bytes(), &UserId::parse(user).unwrap(), 3600)
}

struct Device {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl Device {
    async fn connect(app: &App, user: &str) -> Self {
        let url = format!("{}?token={}&device=d1", app.ws_url, token(user));
        let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
            .await
            .expect("connect in time")
            .expect("upgrade accepted");
        let mut device = Self { ws };
        assert!(matches!(device.next().await, ServerFrame::Hello { .. }));
        device
    }

    async fn send(&mut self, frame: ClientFrame) {
        let text = serde_json::to_string(&frame).unwrap();
        self.ws
            .send(tungstenite::Message::text(text))
            .await
            .unwrap();
    }

    async fn next(&mut self) -> ServerFrame {
        loop {
            let msg = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("a frame in time")
                .expect("socket open")
                .expect("frame readable");
            if let tungstenite::Message::Text(t) = msg {
                return serde_json::from_str(&t).unwrap();
            }
        }
    }

    /// The next frame `pick` accepts, skipping the others (pushes, echoes).
    async fn wait_for<T>(&mut self, mut pick: impl FnMut(ServerFrame) -> Option<T>) -> T {
        loop {
            if let Some(t) = pick(self.next().await) {
                return t;
            }
        }
    }
}

impl App {
    /// Requests an upload as `user` and PUTs `data` to the presigned URL: the media id.
    async fn upload(&self, user: &str, data: &[u8]) -> String {
        let res = self
            .http
            .post(format!("{}/v1/uploads", self.media_url))
            .bearer_auth(token(user))
            .json(&json!({"conv": CONV, "content_type": "image/jpeg", "size": data.len()}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::CREATED);
        let ticket: Value = res.json().await.unwrap();
        let upload = &ticket["upload"];
        let mut put = self.http.put(upload["url"].as_str().unwrap());
        for (name, value) in upload["headers"].as_object().unwrap() {
            if name != "content-length" {
                put = put.header(name, value.as_str().unwrap());
            }
        }
        let res = put.body(data.to_vec()).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        ticket["media_id"].as_str().unwrap().to_owned()
    }

    /// Asks the media service for a download URL as `user`: its HTTP status.
    async fn download_status(&self, user: &str, media_id: &str) -> StatusCode {
        self.http
            .get(format!("{}/v1/media/{media_id}", self.media_url))
            .bearer_auth(token(user))
            .send()
            .await
            .unwrap()
            .status()
    }

    async fn shutdown(self) {
        self.stop.cancel();
        for task in self.tasks {
            tokio::time::timeout(WAIT, task)
                .await
                .expect("service stops in time")
                .unwrap()
                .unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_service_works_with_its_own_user_and_the_server_refuses_the_rest() {
    let app = spawn_app().await;
    let mut alice = Device::connect(&app, "alice").await;
    let mut bob = Device::connect(&app, "bob").await;

    // A message: gateway -> CHAT_IN -> sequencer -> CHAT_MSGS -> fan-out -> bob's gateway.
    alice
        .send(ClientFrame::Send {
            conv: CONV.into(),
            id: "m1".into(),
            body: "hello".into(),
            media: None,
        })
        .await;
    alice
        .wait_for(|f| matches!(f, ServerFrame::Sent { id, .. } if id == "m1").then_some(()))
        .await;
    let m = bob
        .wait_for(|f| match f {
            ServerFrame::Message(m) => Some(m),
            _ => None,
        })
        .await;
    assert_eq!((m.seq, m.body.as_str()), (1, "hello"));

    // History (the sequencer's API, through the gateway).
    bob.send(ClientFrame::History {
        req: "h1".into(),
        conv: CONV.into(),
        before: None,
        after: None,
        limit: None,
    })
    .await;
    let history = bob
        .wait_for(|f| match f {
            ServerFrame::History { req, messages, .. } if req == "h1" => Some(messages),
            _ => None,
        })
        .await;
    assert_eq!(history.len(), 1);

    // Presence: bob is online for alice (gateway reports -> presence -> KV; query -> contacts).
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut n = 0;
    loop {
        n += 1;
        let req = format!("p{n}");
        alice
            .send(ClientFrame::Presence {
                req: req.clone(),
                users: vec!["bob".into()],
            })
            .await;
        let users = alice
            .wait_for(|f| match f {
                ServerFrame::Presence {
                    req: Some(r),
                    users,
                } if r == req => Some(users),
                ServerFrame::Error(e) if e.req.as_deref() == Some(req.as_str()) => Some(Vec::new()),
                _ => None,
            })
            .await;
        if users.iter().any(|u| u.user == "bob" && u.online) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "bob never online\n{}",
            app.nats.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Typing in a one-to-one conversation goes from the gateway to bob's subject.
    alice
        .send(ClientFrame::Typing {
            conv: CONV.into(),
            active: true,
        })
        .await;
    bob.wait_for(|f| {
        matches!(f, ServerFrame::Typing { user, .. } if user == "alice").then_some(())
    })
    .await;

    // Media: upload, a message referencing it (verified by the media service), download.
    let photo = vec![7u8; 2048];
    let media_id = app.upload("alice", &photo).await;
    alice
        .send(ClientFrame::Send {
            conv: CONV.into(),
            id: "m2".into(),
            body: String::new(),
            media: Some(MediaRef {
                id: media_id.clone(),
                content_type: "image/jpeg".into(),
                size: photo.len() as u64,
                width: None,
                height: None,
                duration_ms: None,
                thumbnail: None,
            }),
        })
        .await;
    alice
        .wait_for(|f| match f {
            ServerFrame::Sent { id, .. } if id == "m2" => Some(()),
            ServerFrame::Error(e) if e.id.as_deref() == Some("m2") => {
                panic!("media message refused: {e:?}")
            }
            _ => None,
        })
        .await;
    bob.wait_for(|f| matches!(f, ServerFrame::Message(m) if m.id == "m2").then_some(()))
        .await;
    assert_eq!(app.download_status("bob", &media_id).await, StatusCode::OK);

    // An offline recipient: the fan-out worker stores a push notification, which the push
    // adapter's user pulls and acks.
    alice
        .send(ClientFrame::Send {
            conv: "dm~alice~carol".into(),
            id: "m3".into(),
            body: "are you there?".into(),
            media: None,
        })
        .await;
    alice
        .wait_for(|f| matches!(f, ServerFrame::Sent { id, .. } if id == "m3").then_some(()))
        .await;
    let (push, _) = client_as(&app.nats, "push", "_INBOX.push").await;
    let push_js = jetstream::new(push);
    let consumer: jetstream::consumer::PullConsumer = push_js
        .get_stream(subjects::STREAM_PUSH)
        .await
        .expect("the push user reads its stream")
        .get_consumer("push-adapter")
        .await
        .expect("and its consumer");
    let mut notifications = consumer
        .stream()
        .expires(Duration::from_secs(1))
        .messages()
        .await
        .unwrap();
    let n = tokio::time::timeout(WAIT, notifications.next())
        .await
        .expect("a notification in time")
        .unwrap()
        .unwrap();
    let body: Value = serde_json::from_slice(&n.payload).unwrap();
    assert_eq!(
        (body["user"].as_str(), body["seq"].as_u64()),
        (Some("carol"), Some(1))
    );
    n.ack().await.unwrap();
    drop(notifications);

    // Everything above needed no permission the users lack.
    let logs = app.nats.logs();
    assert!(
        !logs.contains("Violation"),
        "a service was refused something it needs:\n{}",
        logs.lines()
            .filter(|l| l.contains("Violation"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // What each user must not do. Core publishes and subscriptions are refused with an error
    // the client receives; nothing reaches a subscriber or a stream.
    let (admin, _) = client_as(&app.nats, "admin", "_INBOX.admin").await;
    let stamped = subjects::stamped(&chat_protocol::ids::ConvId::parse(CONV).unwrap(), 0);
    let mut watch = admin.subscribe("chat.>").await.unwrap();
    admin.flush().await.unwrap();

    let (gw, mut gw_errors) = client_as(&app.nats, "gateway", "_INBOX.gateway").await;
    // A gateway cannot stamp: neither a core publish nor a JetStream publish reaches CHAT_MSGS.
    gw.publish(stamped.clone(), "{\"type\":\"message\"}".into())
        .await
        .unwrap();
    refused(
        &mut gw_errors,
        "gateway publishes a stamped message",
        &stamped,
    )
    .await;
    let ack = jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(2))
        .build(gw.clone())
        .publish(stamped.clone(), "{}".into())
        .await;
    let acked = match ack {
        Ok(future) => future.await.is_ok(),
        Err(_) => false,
    };
    assert!(!acked, "JetStream stored a gateway's stamped message");
    refused(
        &mut gw_errors,
        "gateway publishes a stamped message",
        &stamped,
    )
    .await;
    // It cannot answer API requests in a sequencer's place, nor read other services' replies.
    let _ = gw.subscribe(subjects::HISTORY_API).await;
    refused(
        &mut gw_errors,
        "gateway subscribes to an API",
        subjects::HISTORY_API,
    )
    .await;
    let _ = gw.subscribe("_INBOX.sequencer.>").await;
    refused(
        &mut gw_errors,
        "gateway reads the sequencers' inboxes",
        "_INBOX.sequencer.>",
    )
    .await;
    // Nor offline notifications.
    gw.publish("chat.push.bob", "{}".into()).await.unwrap();
    refused(
        &mut gw_errors,
        "gateway publishes a push notification",
        "chat.push.bob",
    )
    .await;

    // A fan-out worker cannot publish to the input stream.
    let (fo, mut fo_errors) = client_as(&app.nats, "fanout", "_INBOX.fanout").await;
    let inbound = format!("chat.in.{CONV}");
    fo.publish(inbound.clone(), "{}".into()).await.unwrap();
    refused(
        &mut fo_errors,
        "fan-out worker publishes to CHAT_IN",
        &inbound,
    )
    .await;
    // A sequencer cannot publish push notifications or presence.
    let (sq, mut sq_errors) = client_as(&app.nats, "sequencer", "_INBOX.sequencer").await;
    sq.publish("chat.push.bob", "{}".into()).await.unwrap();
    refused(
        &mut sq_errors,
        "sequencer publishes a push notification",
        "chat.push.bob",
    )
    .await;
    // Presence cannot write the media bucket; media cannot delete a stream.
    let (pr, mut pr_errors) = client_as(&app.nats, "presence", "_INBOX.presence").await;
    pr.publish("$KV.CHAT_MEDIA.m.x", "{}".into()).await.unwrap();
    refused(
        &mut pr_errors,
        "presence writes the media bucket",
        "$KV.CHAT_MEDIA.m.x",
    )
    .await;
    let (md, mut md_errors) = client_as(&app.nats, "media", "_INBOX.media").await;
    let deleted = jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(2))
        .build(md)
        .delete_stream(subjects::STREAM_STAMPED)
        .await;
    assert!(deleted.is_err(), "the media user deleted CHAT_MSGS");
    refused(
        &mut md_errors,
        "media deletes a stream",
        "$JS.API.STREAM.DELETE.CHAT_MSGS",
    )
    .await;

    // Nothing refused arrived anywhere: the admin's catch-all subscription saw none of it, and
    // CHAT_MSGS holds only the real messages.
    admin.flush().await.unwrap();
    while let Ok(Some(msg)) = tokio::time::timeout(Duration::from_millis(200), watch.next()).await {
        assert!(
            msg.subject.as_str() != stamped.as_str()
                && msg.subject.as_str() != "chat.push.bob"
                && msg.subject.as_str() != inbound.as_str(),
            "a refused publish was delivered: {}",
            msg.subject
        );
    }
    let conv = chat_protocol::ids::ConvId::parse(CONV).unwrap();
    let last = last_message(
        &admin,
        subjects::STREAM_STAMPED,
        &subjects::stamped_any(&conv),
    )
    .await
    .unwrap()
    .expect("the real messages are there");
    let last: Value = serde_json::from_slice(&last.payload).unwrap();
    assert_eq!(
        last["id"], "m2",
        "the last stamped message is alice's photo"
    );

    app.shutdown().await;
}

/// `nats-server -t` accepts both server configs (with the variables they read from the
/// environment set).
#[test]
fn dev_and_cluster_configs_are_valid() {
    let bin = chat_testkit::nats_server_bin();
    let root = chat_testkit::workspace_root();
    for file in ["nats/dev.conf", "nats/durable.conf", "nats/cluster.conf"] {
        let mut cmd = std::process::Command::new(&bin);
        cmd.arg("-t").arg("-c").arg(root.join(file));
        for user in USERS {
            cmd.env(
                format!("CHAT_NATS_{}_PASSWORD", user.to_uppercase()),
                password(user),
            );
        }
        cmd.env("NATS_SERVER_NAME", "nats-1");
        for i in 1..=3 {
            cmd.env(
                format!("NATS_ROUTE_{i}"),
                format!("nats-route://nats-{i}:6222"),
            );
        }
        let out = cmd.output().expect("run nats-server -t");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && text.contains("is valid"),
            "{file}: {text}"
        );
        // A setting nats-server ignores (an unquoted duration) is only a warning: none allowed.
        assert!(!text.contains("invalid use of field"), "{file}: {text}");
    }
}
