//! Presence and typing end to end over real WebSockets: the sequencer, fan-out worker, presence
//! service and two gateways in-process against a real nats-server. Gateway B runs on a runtime
//! of its own, so the test can kill it: the runtime is dropped with everything on it, no
//! goodbye is reported, and its users go offline only when their keys' TTL runs out.

use std::time::Duration;

use async_nats::jetstream;
use chat_protocol::{
    auth::mint_dev_token,
    frames::{ClientFrame, ErrorCode, GroupOp, PresenceState, ServerFrame},
    ids::{GatewayId, UserId},
    jetstream::{Overrides, provision_all},
    subjects,
};
use chat_testkit::NatsServer;
use futures::{SinkExt, StreamExt};
use tokio::{net::TcpStream, time::Instant};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, tungstenite};
use tokio_util::sync::CancellationToken;

const SECRET: &[u8] = b"e2e-presence-secret";
/// Bound on every wait for a condition.
const WAIT: Duration = Duration::from_secs(30);
const GW_A: &str = "gw-a";
const GW_B: &str = "gw-b";

fn gateway_config(nats: &NatsServer, id: &str) -> chat_gateway::Config {
    let mut c = chat_gateway::Config {
        nats_url: nats.url(),
        admin_listen: String::new(),
        sends_per_second: 1000,
        send_burst: 1000,
        ..Default::default()
    };
    c.auth.hs256_secret = Some(String::from_utf8(SECRET.to_vec()).unwrap());
    c.presence.instance_id = id.into();
    c.presence.flush_ms = 50;
    c.presence.heartbeat_ms = 500;
    c
}

/// A gateway on a runtime of its own thread; dropping the runtime is a crash.
struct Killable {
    url: String,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Killable {
    fn start(config: chat_gateway::Config) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let url = format!("ws://{}/ws", listener.local_addr().unwrap());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let _ = chat_gateway::run(config, listener, None, CancellationToken::new()).await;
        });
        Self {
            url,
            runtime: Some(runtime),
        }
    }

    /// Every task of the gateway stops where it is: nothing more is published.
    fn kill(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for Killable {
    fn drop(&mut self) {
        self.kill();
    }
}

struct App {
    nats: NatsServer,
    a_url: String,
    b: Killable,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
    _dir: tempfile::TempDir,
}

async fn spawn_app() -> App {
    let nats = NatsServer::start();
    let client = nats.client().await;
    provision_all(&client, &Overrides::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let stop = CancellationToken::new();
    let sequencer = chat_sequencer::Config {
        nats_url: nats.url(),
        admin_listen: String::new(),
        store_dir: dir.path().join("store"),
        ..Default::default()
    };
    let fanout = chat_fanout::Config {
        nats_url: nats.url(),
        admin_listen: String::new(),
        ..Default::default()
    };
    let presence = chat_presence::Config {
        nats_url: nats.url(),
        admin_listen: String::new(),
        online_ttl_ms: 2000,
        debounce_ms: 100,
        min_push_interval_ms: 200,
        balance_heartbeat_ms: 200,
        balance_expire_ms: 1000,
        ..Default::default()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a_url = format!("ws://{}/ws", listener.local_addr().unwrap());
    let tasks = vec![
        tokio::spawn(chat_sequencer::run(sequencer, None, stop.clone())),
        tokio::spawn(chat_fanout::run(fanout, None, stop.clone())),
        tokio::spawn(chat_presence::run(presence, None, stop.clone())),
        tokio::spawn(chat_gateway::run(
            gateway_config(&nats, GW_A),
            listener,
            None,
            stop.clone(),
        )),
    ];
    let b = Killable::start(gateway_config(&nats, GW_B));
    App {
        nats,
        a_url,
        b,
        stop,
        tasks,
        _dir: dir,
    }
}

impl App {
    async fn connect(&self, url: &str, user: &str, device: &str) -> Device {
        let token = mint_dev_token(SECRET, &UserId::parse(user).unwrap(), 3600);
        let url = format!("{url}?token={token}&device={device}");
        let deadline = Instant::now() + WAIT;
        // The gateways may still be starting.
        let ws = loop {
            match tokio_tungstenite::connect_async(&url).await {
                Ok((ws, _)) => break ws,
                Err(err) => assert!(Instant::now() < deadline, "cannot connect: {err}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let mut device = Device { ws };
        match device.next().await {
            ServerFrame::Hello {
                user: u, limits, ..
            } => {
                assert_eq!(u, user);
                assert_eq!(limits.presence_watch_max, 256);
            }
            other => panic!("expected hello, got {other:?}"),
        }
        device
    }

    async fn shutdown(mut self) {
        self.b.kill();
        self.stop.cancel();
        for task in self.tasks {
            tokio::time::timeout(Duration::from_secs(20), task)
                .await
                .expect("service stops in time")
                .unwrap()
                .unwrap();
        }
    }

    /// Waits until the bucket has (or has not) `on.<user>.<gateway>`.
    async fn until_key(&self, user: &str, gateway: &str, present: bool) {
        let client = self.nats.client().await;
        let kv = jetstream::new(client)
            .get_key_value(subjects::PRESENCE_BUCKET)
            .await
            .unwrap();
        let key = subjects::presence_online_key(
            &UserId::parse(user).unwrap(),
            &GatewayId::parse(gateway).unwrap(),
        );
        let deadline = Instant::now() + WAIT;
        while kv.get(&key).await.unwrap().is_some() != present {
            assert!(Instant::now() < deadline, "{key} present={present} never");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

struct Device {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl Device {
    async fn send_frame(&mut self, frame: &ClientFrame) {
        let text = serde_json::to_string(frame).unwrap();
        self.ws
            .send(tungstenite::Message::text(text))
            .await
            .unwrap();
    }

    async fn next(&mut self) -> ServerFrame {
        self.next_within(WAIT).await.expect("a frame in time")
    }

    async fn next_within(&mut self, wait: Duration) -> Option<ServerFrame> {
        loop {
            let msg = tokio::time::timeout(wait, self.ws.next()).await.ok()?;
            match msg.expect("socket open").expect("frame readable") {
                tungstenite::Message::Text(t) => return Some(serde_json::from_str(&t).unwrap()),
                tungstenite::Message::Close(c) => panic!("closed: {c:?}"),
                _ => continue,
            }
        }
    }

    /// Sends a message and waits until it comes back stamped.
    async fn send(&mut self, conv: &str, id: &str) {
        self.send_frame(&ClientFrame::Send {
            conv: conv.into(),
            id: id.into(),
            body: "hi".into(),
            media: None,
        })
        .await;
        loop {
            if let ServerFrame::Message(m) = self.next().await
                && m.id == id
            {
                return;
            }
        }
    }

    /// Frames until `pong`, which answers a ping sent now: everything the gateway queued for
    /// this connection before reading the ping.
    async fn until_pong(&mut self) -> Vec<ServerFrame> {
        self.send_frame(&ClientFrame::Ping).await;
        let mut seen = Vec::new();
        loop {
            match self.next().await {
                ServerFrame::Pong => return seen,
                other => seen.push(other),
            }
        }
    }

    /// Sends `frame` (a `presence` or `presence_subscribe` with `req`) and returns the states
    /// answered, skipping pushes and other frames.
    async fn ask(&mut self, frame: ClientFrame) -> Vec<PresenceState> {
        let want = match &frame {
            ClientFrame::Presence { req, .. } | ClientFrame::PresenceSubscribe { req, .. } => {
                req.clone()
            }
            other => panic!("not a presence request: {other:?}"),
        };
        self.send_frame(&frame).await;
        loop {
            match self.next().await {
                ServerFrame::Presence {
                    req: Some(req),
                    users,
                } if req == want => return users,
                ServerFrame::Error(e) if e.req.as_deref() == Some(&want) => {
                    panic!("refused: {e:?}")
                }
                _ => continue,
            }
        }
    }

    /// Asks (with `make`, given a fresh request id) until `ok` holds for the answer.
    async fn ask_until(
        &mut self,
        make: impl Fn(String) -> ClientFrame,
        ok: impl Fn(&[PresenceState]) -> bool,
    ) -> Vec<PresenceState> {
        let deadline = Instant::now() + WAIT;
        for i in 0.. {
            let got = self.ask(make(format!("q{i}"))).await;
            if ok(&got) {
                return got;
            }
            assert!(Instant::now() < deadline, "never: last answer {got:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        unreachable!()
    }
}

fn users(list: &[&str]) -> Vec<String> {
    list.iter().map(|u| (*u).into()).collect()
}

fn state<'a>(states: &'a [PresenceState], user: &str) -> Option<&'a PresenceState> {
    states.iter().find(|s| s.user == user)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_follows_the_devices_and_reaches_only_contacts_who_subscribed() {
    let mut app = spawn_app().await;
    let a = app.a_url.clone();
    // alice writes to bob, carol writes to alice: bob and carol are alice's contacts (not each
    // other's); dave shares nothing with anyone.
    let mut alice_laptop = app.connect(&a, "alice", "laptop").await;
    alice_laptop.send("dm~alice~bob", "m1").await;
    let mut carol = app.connect(&a, "carol", "phone").await;
    carol.send("dm~alice~carol", "m2").await;
    let mut bob = app.connect(&a, "bob", "phone").await;
    let mut dave = app.connect(&a, "dave", "phone").await;

    // bob subscribes to alice and dave: he gets alice (online), and nothing about dave.
    let subscribe = |req: String| ClientFrame::PresenceSubscribe {
        req,
        users: users(&["alice", "dave"]),
    };
    let got = bob
        .ask_until(subscribe, |s| state(s, "alice").is_some_and(|a| a.online))
        .await;
    assert!(state(&got, "dave").is_none(), "a stranger: {got:?}");

    // A second device of alice's on gateway B; the laptop on A goes: she is still online.
    let mut alice_phone = app.connect(&app.b.url.clone(), "alice", "phone").await;
    app.until_key("alice", GW_B, true).await;
    alice_laptop.ws.close(None).await.unwrap();
    drop(alice_laptop);
    app.until_key("alice", GW_A, false).await;
    let query = |req: String| ClientFrame::Presence {
        req,
        users: users(&["alice"]),
    };
    let got = bob.ask(query("after-laptop".into())).await;
    assert!(
        state(&got, "alice").unwrap().online,
        "the phone is connected"
    );

    // Gateway B dies without a word. Once her key's TTL (2 s) runs out, alice is offline:
    // bob, who subscribed, is pushed the change, with her last seen.
    let killed = chat_protocol::now_ms();
    app.b.kill();
    drop(alice_phone.ws.close(None).await);
    let deadline = Instant::now() + WAIT;
    let pushed = loop {
        match bob.next_within(deadline - Instant::now()).await {
            Some(ServerFrame::Presence { req: None, users }) => {
                if let Some(s) = state(&users, "alice")
                    && !s.online
                {
                    break s.clone();
                }
            }
            Some(_) => continue,
            None => panic!("no offline push for alice"),
        }
    };
    let seen = pushed.last_seen.expect("last seen after the gateway died");
    assert!(
        seen <= killed,
        "her last seen {seen} is before the crash {killed}"
    );
    let got = bob.ask(query("after-kill".into())).await;
    assert_eq!(state(&got, "alice"), Some(&pushed));

    // carol never subscribed: no presence frame reached her. (She shares gateway A with bob;
    // a push for her would have been queued with his, before her ping is read.)
    for frame in carol.until_pong().await {
        assert!(
            !matches!(frame, ServerFrame::Presence { .. }),
            "carol did not subscribe: {frame:?}"
        );
    }
    // dave shares no conversation with alice or bob: nothing about them.
    let got = dave
        .ask(ClientFrame::Presence {
            req: "d1".into(),
            users: users(&["alice", "bob"]),
        })
        .await;
    assert_eq!(got, vec![], "strangers see nothing");

    // Bad input is refused with a documented code, and the connection goes on.
    let too_many: Vec<String> = (0..=256).map(|i| format!("u{i}")).collect();
    bob.send_frame(&ClientFrame::PresenceSubscribe {
        req: "big".into(),
        users: too_many,
    })
    .await;
    bob.send_frame(&ClientFrame::Presence {
        req: "bad".into(),
        users: users(&["x.y"]),
    })
    .await;
    let mut codes = Vec::new();
    while codes.len() < 2 {
        if let ServerFrame::Error(e) = bob.next().await {
            codes.push((e.req.unwrap(), e.code));
        }
    }
    codes.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        codes,
        vec![
            ("bad".to_owned(), ErrorCode::InvalidId),
            ("big".to_owned(), ErrorCode::InvalidFrame)
        ]
    );
    // The subscription is still the one he had: alice comes back, he is told.
    let mut alice_again = app.connect(&a, "alice", "laptop").await;
    let deadline = Instant::now() + WAIT;
    loop {
        match bob.next_within(deadline - Instant::now()).await {
            Some(ServerFrame::Presence { req: None, users })
                if state(&users, "alice").is_some_and(|s| s.online) =>
            {
                break;
            }
            Some(_) => continue,
            None => panic!("no online push for alice"),
        }
    }
    // She closes her only device: bob is told she is offline, last seen at that moment.
    let closed = chat_protocol::now_ms();
    alice_again.ws.close(None).await.unwrap();
    let deadline = Instant::now() + WAIT;
    let seen = loop {
        match bob.next_within(deadline - Instant::now()).await {
            Some(ServerFrame::Presence { req: None, users }) => {
                if let Some(s) = state(&users, "alice")
                    && !s.online
                {
                    break s.last_seen.expect("a last seen after a disconnect");
                }
            }
            Some(_) => continue,
            None => panic!("no offline push after alice's disconnect"),
        }
    };
    assert!(
        seen >= closed,
        "last seen {seen} is when she left ({closed})"
    );
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typing_reaches_the_members_online_and_is_rate_limited() {
    let app = spawn_app().await;
    let a = app.a_url.clone();
    let mut alice = app.connect(&a, "alice", "laptop").await;
    let mut bob = app.connect(&a, "bob", "phone").await;
    let mut carol = app.connect(&a, "carol", "phone").await;

    // One-to-one: straight to bob's devices.
    let typing = |conv: &str| ClientFrame::Typing {
        conv: conv.into(),
        active: true,
    };
    alice.send_frame(&typing("dm~alice~bob")).await;
    let deadline = Instant::now() + WAIT;
    loop {
        match bob.next_within(deadline - Instant::now()).await {
            Some(ServerFrame::Typing {
                conv, user, ttl_ms, ..
            }) => {
                assert_eq!((conv.as_str(), user.as_str()), ("dm~alice~bob", "alice"));
                assert!(ttl_ms > 0);
                break;
            }
            Some(_) => continue,
            None => panic!("bob never saw alice typing"),
        }
    }

    // A group: relayed by the presence service to its online members.
    alice
        .send_frame(&ClientFrame::Group {
            op: GroupOp::Create,
            conv: "g~team".into(),
            id: "g1".into(),
            name: Some("Team".into()),
            members: users(&["bob", "carol"]),
        })
        .await;
    for d in [&mut alice, &mut bob, &mut carol] {
        loop {
            if let ServerFrame::Message(m) = d.next().await
                && m.conv == "g~team"
            {
                break;
            }
        }
    }
    // Until the relay has the group's members and knows carol online it may miss her: type
    // again (within the rate) until she sees it.
    let deadline = Instant::now() + WAIT;
    'carol: loop {
        alice.send_frame(&typing("g~team")).await;
        while let Some(f) = carol.next_within(Duration::from_millis(700)).await {
            if let ServerFrame::Typing { conv, user, .. } = f {
                assert_eq!((conv.as_str(), user.as_str()), ("g~team", "alice"));
                break 'carol;
            }
        }
        assert!(Instant::now() < deadline, "carol never saw alice typing");
    }

    // Rate limit: ten at once; the burst goes through, the rest is refused with a retry hint,
    // and bob sees exactly the ones that went through.
    alice.until_pong().await;
    tokio::time::sleep(Duration::from_secs(3)).await; // back to a full burst
    bob.until_pong().await;
    for _ in 0..10 {
        alice.send_frame(&typing("dm~alice~bob")).await;
    }
    let mut refused = 0;
    for f in alice.until_pong().await {
        if let ServerFrame::Error(e) = f {
            assert_eq!(e.code, ErrorCode::RateLimited);
            assert_eq!(e.conv.as_deref(), Some("dm~alice~bob"));
            assert!(e.retry_after_ms.unwrap() >= 1);
            refused += 1;
        }
    }
    assert!(refused >= 1, "10 at once exceed the burst of 5");
    let is_dm =
        |f: &ServerFrame| matches!(f, ServerFrame::Typing { conv, .. } if conv == "dm~alice~bob");
    let mut seen = 0;
    while seen < 10 - refused {
        if is_dm(&bob.next().await) {
            seen += 1;
        }
    }
    while let Some(f) = bob.next_within(Duration::from_millis(500)).await {
        assert!(!is_dm(&f), "a refused typing frame reached bob");
    }
    // A stranger's one-to-one conversation is refused.
    alice.send_frame(&typing("dm~bob~carol")).await;
    let e = loop {
        if let ServerFrame::Error(e) = alice.next().await {
            break e;
        }
    };
    assert_eq!(e.code, ErrorCode::NotMember);
    app.shutdown().await;
}
