//! End to end over real WebSockets: gateway, sequencer and fan-out worker running in-process
//! against a real nats-server started by the test kit.

use std::time::Duration;

use chat_protocol::{
    api::PushNotification,
    auth::mint_dev_token,
    frames::{
        ClientFrame, ConvState, ErrorCode, GroupEvent, GroupOp, MemberMarks, Message, Receipt,
        ServerFrame,
    },
    ids::UserId,
    jetstream::{Overrides, provision_all},
};
use chat_testkit::NatsServer;
use futures::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, tungstenite};
use tokio_util::sync::CancellationToken;

const SECRET: &[u8] = b"e2e-secret";
const WAIT: Duration = Duration::from_secs(15);

/// The whole system, in-process, on a fresh nats-server. Stopped (and cleaned up) on drop.
struct App {
    ws_url: String,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
    nats: NatsServer,
    _dir: tempfile::TempDir,
}

async fn spawn_app() -> App {
    spawn_app_with(|_| {}).await
}

/// [`spawn_app`] with the gateway's settings adjusted by `tweak`.
async fn spawn_app_with(tweak: impl FnOnce(&mut chat_gateway::Config)) -> App {
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
    let mut gateway = chat_gateway::Config {
        nats_url: nats.url(),
        ..Default::default()
    };
    gateway.auth.hs256_secret = Some(String::from_utf8(SECRET.to_vec()).unwrap());
    gateway.sends_per_second = 1000;
    gateway.send_burst = 1000;
    tweak(&mut gateway);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ws_url = format!("ws://{}/ws", listener.local_addr().unwrap());
    let tasks = vec![
        tokio::spawn(chat_sequencer::run(sequencer, None, stop.clone())),
        tokio::spawn(chat_fanout::run(fanout, None, stop.clone())),
        tokio::spawn(chat_gateway::run(gateway, listener, None, stop.clone())),
    ];
    App {
        ws_url,
        stop,
        tasks,
        nats,
        _dir: dir,
    }
}

impl App {
    async fn connect(&self, user: &str, device: &str) -> Device {
        let token = mint_dev_token(SECRET, &UserId::parse(user).unwrap(), 3600);
        let url = format!("{}?token={token}&device={device}", self.ws_url);
        let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
            .await
            .expect("connect in time")
            .expect("upgrade accepted");
        let mut device = Device { ws };
        match device.next().await {
            ServerFrame::Hello { user: u, .. } => assert_eq!(u, user),
            other => panic!("expected hello, got {other:?}"),
        }
        device
    }

    async fn shutdown(self) {
        self.stop.cancel();
        for task in self.tasks {
            tokio::time::timeout(Duration::from_secs(20), task)
                .await
                .expect("service stops in time")
                .unwrap()
                .unwrap();
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

    async fn send(&mut self, conv: &str, id: &str, body: &str) {
        self.send_frame(&ClientFrame::Send {
            conv: conv.into(),
            id: id.into(),
            body: body.into(),
            media: None,
        })
        .await;
    }

    /// The next server frame (pings are answered by tungstenite while reading).
    async fn next(&mut self) -> ServerFrame {
        loop {
            let msg = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("a frame in time")
                .expect("socket open")
                .expect("frame readable");
            match msg {
                tungstenite::Message::Text(t) => return serde_json::from_str(&t).unwrap(),
                tungstenite::Message::Close(c) => panic!("closed: {c:?}"),
                _ => continue,
            }
        }
    }

    /// Sends each id and waits for all of them to be `sent` and come back stamped (the two
    /// kinds of frames may interleave). Returns the stamped messages.
    async fn send_all(&mut self, conv: &str, ids: &[String]) -> Vec<Message> {
        for id in ids {
            self.send(conv, id, &format!("body of {id}")).await;
        }
        let (mut sent, mut stamped) = (Vec::new(), Vec::new());
        while sent.len() < ids.len() || stamped.len() < ids.len() {
            match self.next().await {
                ServerFrame::Sent { id, .. } => sent.push(id),
                ServerFrame::Message(m) => stamped.push(m),
                other => panic!("expected sent or message, got {other:?}"),
            }
        }
        sent.sort();
        let mut want = ids.to_vec();
        want.sort();
        assert_eq!(sent, want);
        stamped
    }

    async fn next_receipt(&mut self) -> Receipt {
        match self.next().await {
            ServerFrame::Receipt(r) => r,
            other => panic!("expected a receipt, got {other:?}"),
        }
    }

    /// One sync page: (convs, messages, next, token).
    async fn sync(
        &mut self,
        since: Option<&str>,
        cursors: &[(&str, u64)],
        next: Option<String>,
    ) -> (Vec<ConvState>, Vec<Message>, Option<String>, Option<String>) {
        self.send_frame(&ClientFrame::Sync {
            req: "s".into(),
            since: since.map(str::to_owned),
            cursors: cursors.iter().map(|(c, s)| (c.to_string(), *s)).collect(),
            next,
            limit: Some(2),
        })
        .await;
        match self.next().await {
            ServerFrame::Sync {
                convs,
                messages,
                next,
                token,
                ..
            } => (convs, messages, next, token),
            other => panic!("expected sync, got {other:?}"),
        }
    }

    /// Syncs page by page (the page size is 2 here), moving the cursors like an app does.
    async fn sync_all(
        &mut self,
        since: Option<&str>,
        cursors: &mut Vec<(String, u64)>,
    ) -> (Vec<ConvState>, Vec<Message>, String) {
        let (mut all_convs, mut all_messages, mut next) = (Vec::new(), Vec::new(), None);
        loop {
            let view: Vec<(&str, u64)> = cursors.iter().map(|(c, s)| (c.as_str(), *s)).collect();
            let (convs, messages, more, token) = self.sync(since, &view, next).await;
            for m in &messages {
                match cursors.iter_mut().find(|(c, _)| *c == m.conv) {
                    Some(cursor) => cursor.1 = m.seq,
                    None => cursors.push((m.conv.clone(), m.seq)),
                }
            }
            all_convs.extend(convs);
            all_messages.extend(messages);
            match (more, token) {
                (Some(n), None) => next = Some(n),
                (None, Some(token)) => return (all_convs, all_messages, token),
                other => panic!("a page has either next or token: {other:?}"),
            }
        }
    }

    async fn next_message(&mut self) -> Message {
        match self.next().await {
            ServerFrame::Message(m) => m,
            other => panic!("expected a message, got {other:?}"),
        }
    }

    async fn history(
        &mut self,
        conv: &str,
        after: Option<u64>,
        before: Option<u64>,
        limit: u32,
    ) -> (Vec<Message>, bool) {
        self.send_frame(&ClientFrame::History {
            req: "h1".into(),
            conv: conv.into(),
            before,
            after,
            limit: Some(limit),
        })
        .await;
        match self.next().await {
            ServerFrame::History {
                req,
                messages,
                more,
                ..
            } => {
                assert_eq!(req, "h1");
                (messages, more)
            }
            other => panic!("expected history, got {other:?}"),
        }
    }
}

impl Device {
    /// Sends a `group` frame and waits for its `sent`.
    async fn group(
        &mut self,
        op: GroupOp,
        conv: &str,
        id: &str,
        name: Option<&str>,
        members: &[&str],
    ) {
        self.send_frame(&ClientFrame::Group {
            op,
            conv: conv.into(),
            id: id.into(),
            name: name.map(Into::into),
            members: members.iter().map(|m| (*m).into()).collect(),
        })
        .await;
        match self.next().await {
            ServerFrame::Sent { id: sent, .. } => assert_eq!(sent, id),
            other => panic!("expected sent, got {other:?}"),
        }
    }

    /// Sends one message and waits for its `sent`.
    async fn send_acked(&mut self, conv: &str, id: &str, body: &str) {
        self.send(conv, id, body).await;
        match self.next().await {
            ServerFrame::Sent { id: sent, .. } => assert_eq!(sent, id),
            other => panic!("expected sent, got {other:?}"),
        }
    }

    /// The (seq, event) of the next message, which must be in `conv`.
    async fn next_in(&mut self, conv: &str) -> (u64, Option<GroupEvent>) {
        let m = self.next_message().await;
        assert_eq!(m.conv, conv, "unexpected message {m:?}");
        (m.seq, m.event)
    }
}

const CONV: &str = "dm~alice~bob";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alice_to_bob_on_every_device_in_order_with_history() {
    let app = spawn_app().await;
    let mut alice = app.connect("alice", "phone").await;
    let mut alice_laptop = app.connect("alice", "laptop").await;
    let mut bob_phone = app.connect("bob", "phone").await;
    let mut bob_laptop = app.connect("bob", "laptop").await;

    // Sent first (JetStream has it), then the stamped message back with seq 1.
    alice.send(CONV, "first", "hello bob").await;
    match alice.next().await {
        ServerFrame::Sent { id, conv, .. } => {
            assert_eq!(id, "first");
            assert_eq!(conv, CONV);
        }
        other => panic!("expected sent, got {other:?}"),
    }
    let echo = alice.next_message().await;
    assert_eq!(
        (echo.seq, echo.id.as_str(), echo.from.as_str()),
        (1, "first", "alice")
    );
    assert_eq!(echo.body, "hello bob");
    for device in [&mut bob_phone, &mut bob_laptop, &mut alice_laptop] {
        let m = device.next_message().await;
        assert_eq!(
            m, echo,
            "every device of both members gets the same message"
        );
    }

    // 100 back to back: sent acks for all, then every device sees seqs 2..=101 in order.
    for i in 0..100 {
        alice
            .send(CONV, &format!("m{i}"), &format!("message {i}"))
            .await;
    }
    let mut sent = Vec::new();
    let mut echoed = Vec::new();
    while echoed.len() < 100 {
        match alice.next().await {
            ServerFrame::Sent { id, .. } => sent.push(id),
            ServerFrame::Message(m) => echoed.push(m),
            other => panic!("unexpected {other:?}"),
        }
    }
    // Every message is acked as sent before (or while) it comes back stamped.
    while sent.len() < 100 {
        match alice.next().await {
            ServerFrame::Sent { id, .. } => sent.push(id),
            other => panic!("unexpected {other:?}"),
        }
    }
    let expected_ids: Vec<String> = (0..100).map(|i| format!("m{i}")).collect();
    // Acks answer each send as its PubAck arrives (the protocol promises no ack order);
    // every id is acked exactly once.
    let mut acked = sent.clone();
    acked.sort();
    let mut want = expected_ids.clone();
    want.sort();
    assert_eq!(acked, want, "every send acked exactly once");
    let check = |msgs: &[Message]| {
        assert_eq!(
            msgs.iter().map(|m| m.seq).collect::<Vec<_>>(),
            (2..=101).collect::<Vec<_>>()
        );
        assert_eq!(
            msgs.iter().map(|m| m.id.clone()).collect::<Vec<_>>(),
            expected_ids
        );
    };
    check(&echoed);
    for device in [&mut bob_phone, &mut bob_laptop, &mut alice_laptop] {
        let mut got = Vec::new();
        for _ in 0..100 {
            got.push(device.next_message().await);
        }
        check(&got);
    }

    // History: newest page first with `more`, then the rest; the same messages as pushed.
    let (page, more) = bob_phone.history(CONV, None, None, 60).await;
    assert!(more);
    assert_eq!(
        page.iter().map(|m| m.seq).collect::<Vec<_>>(),
        (42..=101).collect::<Vec<_>>()
    );
    let (older, more) = bob_phone.history(CONV, None, Some(42), 60).await;
    assert!(!more);
    assert_eq!(
        older.iter().map(|m| m.seq).collect::<Vec<_>>(),
        (1..=41).collect::<Vec<_>>()
    );
    assert_eq!(older[0], echo);
    let (tail, more) = bob_laptop.history(CONV, Some(99), None, 50).await;
    assert!(!more);
    assert_eq!(
        tail.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![100, 101]
    );

    // A third user can neither send to nor read the conversation, and learns nothing of it.
    let mut carol = app.connect("carol", "phone").await;
    carol.send(CONV, "sneak", "hi").await;
    match carol.next().await {
        ServerFrame::Error(e) => {
            assert_eq!(e.code, ErrorCode::NotMember);
            assert_eq!(e.id.as_deref(), Some("sneak"));
        }
        other => panic!("expected not_member, got {other:?}"),
    }
    carol
        .send_frame(&ClientFrame::History {
            req: "peek".into(),
            conv: CONV.into(),
            before: None,
            after: None,
            limit: None,
        })
        .await;
    match carol.next().await {
        ServerFrame::Error(e) => {
            assert_eq!(e.code, ErrorCode::NotMember);
            assert_eq!(e.req.as_deref(), Some("peek"));
        }
        other => panic!("expected not_member, got {other:?}"),
    }
    // Nothing carol did reached the conversation.
    let (page, _) = alice.history(CONV, Some(100), None, 10).await;
    assert_eq!(page.len(), 1);
    assert_eq!(page[0].id, "m99");

    // A retry of an already-sent id is acked again but never becomes a second message.
    alice.send(CONV, "m50", "message 50").await;
    match alice.next().await {
        ServerFrame::Sent { id, .. } => assert_eq!(id, "m50"),
        other => panic!("expected sent, got {other:?}"),
    }
    alice.send(CONV, "after-retry", "x").await;
    let mut next = None;
    while next.is_none() {
        match alice.next().await {
            ServerFrame::Message(m) => next = Some(m),
            ServerFrame::Sent { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    let next = next.unwrap();
    assert_eq!((next.seq, next.id.as_str()), (102, "after-retry"));

    app.shutdown().await;
}

fn marks(user: &str, delivered: u64, read: u64) -> MemberMarks {
    MemberMarks {
        user: user.into(),
        delivered,
        read,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_and_read_state_move_across_devices_and_sync_catches_up() {
    let app = spawn_app().await;
    let mut alice = app.connect("alice", "phone").await;
    let mut bob_phone = app.connect("bob", "phone").await;
    let mut bob_laptop = app.connect("bob", "laptop").await;
    let ids = |r: std::ops::RangeInclusive<u32>| r.map(|i| format!("m{i}")).collect::<Vec<_>>();
    let stamped = alice.send_all(CONV, &ids(1..=3)).await;
    assert_eq!(stamped.iter().map(|m| m.seq).collect::<Vec<_>>(), [1, 2, 3]);
    for device in [&mut bob_phone, &mut bob_laptop] {
        for seq in 1..=3 {
            assert_eq!(device.next_message().await.seq, seq);
        }
    }

    // Bob's phone has everything, then Bob reads two: every device of both sees it.
    bob_phone
        .send_frame(&ClientFrame::Delivered {
            conv: CONV.into(),
            seq: 3,
        })
        .await;
    let delivered = Receipt {
        conv: CONV.into(),
        user: "bob".into(),
        delivered: 3,
        read: 0,
    };
    for device in [&mut alice, &mut bob_phone, &mut bob_laptop] {
        assert_eq!(device.next_receipt().await, delivered);
    }
    bob_phone
        .send_frame(&ClientFrame::Read {
            conv: CONV.into(),
            seq: 2,
        })
        .await;
    for device in [&mut alice, &mut bob_phone, &mut bob_laptop] {
        assert_eq!(device.next_receipt().await.read, 2);
    }

    // The laptop's unread count reflects what was read on the phone.
    let mut cursors = vec![(CONV.to_owned(), 3)];
    let (convs, messages, token) = bob_laptop.sync_all(None, &mut cursors).await;
    assert!(messages.is_empty());
    assert_eq!(
        convs,
        vec![ConvState {
            conv: CONV.into(),
            name: None,
            member_count: 2,
            latest: 3,
            unread: 1,
            members: vec![marks("alice", 3, 3), marks("bob", 3, 2)],
            left: None,
        }]
    );

    // Who read what, for Alice's ticks.
    alice
        .send_frame(&ClientFrame::Receipts {
            req: "r".into(),
            conv: CONV.into(),
            seq: Some(3),
        })
        .await;
    match alice.next().await {
        ServerFrame::Receipts {
            req,
            members,
            delivered_to,
            read_by,
            ..
        } => {
            assert_eq!(req, "r");
            assert_eq!(members, vec![marks("alice", 3, 3), marks("bob", 3, 2)]);
            assert_eq!(delivered_to, Some(vec!["alice".into(), "bob".into()]));
            assert_eq!(read_by, Some(vec!["alice".into()]));
        }
        other => panic!("expected receipts, got {other:?}"),
    }

    // The laptop goes offline; five messages later it comes back and pages through them.
    drop(bob_laptop);
    alice.send_all(CONV, &ids(4..=8)).await;
    for seq in 4..=8 {
        assert_eq!(bob_phone.next_message().await.seq, seq);
    }
    let mut bob_laptop = app.connect("bob", "laptop").await;
    let (convs, messages, _) = bob_laptop.sync_all(Some(&token), &mut cursors).await;
    assert_eq!(
        messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![4, 5, 6, 7, 8]
    );
    let last = convs.last().expect("the conversation changed");
    assert_eq!((last.latest, last.unread), (8, 6));
    assert_eq!(cursors, vec![(CONV.to_owned(), 8)]);

    // With no device of Bob's connected, a message becomes one push notification.
    drop(bob_phone);
    drop(bob_laptop);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(alice.send_all(CONV, &ids(9..=9)).await[0].seq, 9);
    let js = async_nats::jetstream::new(app.nats.client().await);
    let stream = js
        .get_stream(chat_protocol::subjects::STREAM_PUSH)
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    let raw = loop {
        if let Ok(raw) = stream.direct_get_last_for_subject("chat.push.bob").await {
            break raw;
        }
        assert!(tokio::time::Instant::now() < deadline, "no notification");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let n: PushNotification = serde_json::from_slice(&raw.payload).unwrap();
    assert_eq!(
        (n.conv.as_str(), n.seq, n.from.as_str()),
        (CONV, 9, "alice")
    );
    assert_eq!(raw.sequence, 1, "only the message nobody got is notified");
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_members_get_exactly_their_window_and_outsiders_are_refused() {
    const G: &str = "g~team";
    let app = spawn_app().await;
    let mut alice = app.connect("alice", "phone").await;
    let mut bob = app.connect("bob", "phone").await;
    let mut carol = app.connect("carol", "phone").await;
    let mut dave = app.connect("dave", "phone").await;

    alice
        .group(GroupOp::Create, G, "op1", Some("Team"), &["bob"])
        .await;
    let created = Some(GroupEvent::Created {
        name: "Team".into(),
        members: vec!["bob".into()],
    });
    assert_eq!(alice.next_in(G).await, (1, created.clone()));
    assert_eq!(bob.next_in(G).await, (1, created));

    bob.send_acked(G, "b1", "hi all").await;
    for d in [&mut alice, &mut bob] {
        assert_eq!(d.next_in(G).await, (2, None));
    }

    // Carol, added at 3, gets the event and what follows, never seq 1 or 2.
    alice.group(GroupOp::Add, G, "op2", None, &["carol"]).await;
    let added = Some(GroupEvent::Added {
        members: vec!["carol".into()],
    });
    for d in [&mut alice, &mut bob, &mut carol] {
        assert_eq!(d.next_in(G).await, (3, added.clone()));
    }
    carol.send_acked(G, "c1", "thanks").await;
    for d in [&mut alice, &mut bob, &mut carol] {
        assert_eq!(d.next_in(G).await, (4, None));
    }

    // Bob, removed at 5, gets his removal and nothing after it.
    alice.group(GroupOp::Remove, G, "op3", None, &["bob"]).await;
    let removed = Some(GroupEvent::Removed {
        members: vec!["bob".into()],
    });
    for d in [&mut alice, &mut bob, &mut carol] {
        assert_eq!(d.next_in(G).await, (5, removed.clone()));
    }
    alice.send_acked(G, "a1", "bye bob").await;
    for d in [&mut alice, &mut carol] {
        assert_eq!(d.next_in(G).await, (6, None));
    }
    // The next thing Bob gets is a direct message sent after seq 6, not seq 6.
    alice.send_acked(CONV, "dm1", "sorry").await;
    assert_eq!(alice.next_in(CONV).await.0, 1);
    assert_eq!(bob.next_in(CONV).await.0, 1);

    // Bob cannot send any more; Dave never could: `sent`, then the sequencer's refusal.
    for (device, id) in [(&mut bob, "b2"), (&mut dave, "d1")] {
        device.send_acked(G, id, "let me in").await;
        match device.next().await {
            ServerFrame::Error(e) => {
                assert_eq!((e.code, e.id.as_deref()), (ErrorCode::NotMember, Some(id)));
            }
            other => panic!("expected not_member, got {other:?}"),
        }
    }
    // Carol is no admin.
    carol.group(GroupOp::Add, G, "op4", None, &["dave"]).await;
    match carol.next().await {
        ServerFrame::Error(e) => assert_eq!(e.code, ErrorCode::NotAdmin),
        other => panic!("expected not_admin, got {other:?}"),
    }

    // History: each member's window.
    let seqs = |page: (Vec<Message>, bool)| page.0.iter().map(|m| m.seq).collect::<Vec<_>>();
    assert_eq!(
        seqs(carol.history(G, Some(0), None, 50).await),
        vec![3, 4, 5, 6]
    );
    assert_eq!(
        seqs(bob.history(G, None, None, 50).await),
        vec![1, 2, 3, 4, 5]
    );

    // The conversation list: names, counts, unread, the window.
    carol
        .send_frame(&ClientFrame::Conversations {
            req: "l1".into(),
            after: None,
            limit: None,
        })
        .await;
    match carol.next().await {
        ServerFrame::Conversations {
            req, convs, more, ..
        } => {
            assert_eq!((req.as_str(), more), ("l1", false));
            assert_eq!(convs.len(), 1);
            let c = &convs[0];
            assert_eq!(
                (
                    c.conv.as_str(),
                    c.name.as_deref(),
                    c.member_count,
                    c.latest,
                    c.joined
                ),
                (G, Some("Team"), 2, 6, 3)
            );
            assert_eq!(c.unread, 2, "seq 5 and 6 came after her own message 4");
        }
        other => panic!("expected conversations, got {other:?}"),
    }
    bob.send_frame(&ClientFrame::Conversations {
        req: "l2".into(),
        after: None,
        limit: None,
    })
    .await;
    match bob.next().await {
        ServerFrame::Conversations { convs, .. } => {
            let ids: Vec<(&str, u64, Option<u64>)> = convs
                .iter()
                .map(|c| (c.conv.as_str(), c.latest, c.left))
                .collect();
            assert_eq!(ids, vec![(CONV, 1, None), (G, 5, Some(5))]);
        }
        other => panic!("expected conversations, got {other:?}"),
    }
    carol
        .send_frame(&ClientFrame::GroupInfo {
            req: "i1".into(),
            conv: G.into(),
        })
        .await;
    match carol.next().await {
        ServerFrame::GroupInfo { name, members, .. } => {
            assert_eq!(name, "Team");
            let who: Vec<(&str, bool)> =
                members.iter().map(|m| (m.user.as_str(), m.admin)).collect();
            assert_eq!(who, vec![("alice", true), ("carol", false)]);
        }
        other => panic!("expected group_info, got {other:?}"),
    }
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1024_member_group_reaches_every_online_member_in_order() {
    const G: &str = "g~big";
    const MEMBERS: usize = 1024;
    const SENDERS: usize = 4;
    const EACH: usize = 5;
    let app = spawn_app().await;
    let users: Vec<String> = (0..MEMBERS).map(|i| format!("m{i:04}")).collect();
    let mut devices = Vec::with_capacity(MEMBERS);
    for chunk in users.chunks(64) {
        let connected =
            futures::future::join_all(chunk.iter().map(|u| app.connect(u, "phone"))).await;
        devices.extend(connected);
    }
    let others: Vec<&str> = users[1..].iter().map(String::as_str).collect();
    devices[0]
        .group(GroupOp::Create, G, "create", Some("Everyone"), &others)
        .await;
    // Every member gets the creation, then the senders' messages: seqs 2.. in order.
    let last = (1 + SENDERS * EACH) as u64;
    let readers: Vec<_> = devices
        .drain(SENDERS..)
        .map(|mut d| {
            tokio::spawn(async move {
                let mut seqs = Vec::new();
                while seqs.last() != Some(&last) {
                    seqs.push(d.next_in(G).await.0);
                }
                seqs
            })
        })
        .collect();
    let mut senders = devices;
    for s in &mut senders {
        assert_eq!(s.next_in(G).await.0, 1);
    }
    for round in 0..EACH {
        for (i, s) in senders.iter_mut().enumerate() {
            s.send(G, &format!("s{i}-{round}"), "hello everyone").await;
        }
    }
    let want: Vec<u64> = (1..=last).collect();
    for s in &mut senders {
        let mut seqs = vec![1];
        while seqs.len() < want.len() {
            match s.next().await {
                ServerFrame::Message(m) => seqs.push(m.seq),
                ServerFrame::Sent { .. } => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(seqs, want);
    }
    for (i, reader) in readers.into_iter().enumerate() {
        let seqs = tokio::time::timeout(Duration::from_secs(60), reader)
            .await
            .expect("every member gets every message")
            .unwrap();
        assert_eq!(seqs, want, "member {} saw {seqs:?}", users[SENDERS + i]);
    }
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abuse_limits_refuse_only_the_frames_over_budget() {
    let app = spawn_app_with(|g| {
        g.abuse.new_conversations_per_minute = 2;
        g.abuse.groups_per_hour = 1;
    })
    .await;
    let mut alice = app.connect("alice", "phone").await;
    let mut bob = app.connect("bob", "phone").await;
    // Bob opens their conversation (from his own budget).
    bob.send_acked(CONV, "b1", "hi alice").await;
    assert_eq!(bob.next_in(CONV).await.0, 1);
    assert_eq!(alice.next_in(CONV).await.0, 1);
    // Alice writes to two people she never talked to: her whole budget for the minute.
    for (conv, id) in [("dm~alice~carol", "a1"), ("dm~alice~dan", "a2")] {
        alice.send_acked(conv, id, "hello stranger").await;
        assert_eq!(alice.next_in(conv).await.0, 1);
    }
    let refused = |frame: ServerFrame, id: &str| match frame {
        ServerFrame::Error(e) => {
            assert_eq!(
                (e.code, e.id.as_deref()),
                (ErrorCode::RateLimited, Some(id))
            );
            assert!(e.retry_after_ms.is_some_and(|ms| ms > 0), "{e:?}");
        }
        other => panic!("expected rate_limited for {id}, got {other:?}"),
    };
    alice.send("dm~alice~eve", "a3", "hello stranger").await;
    refused(alice.next().await, "a3");
    // Her conversation with bob has a message: not new; stamped and delivered as always.
    alice.send_acked(CONV, "a4", "hi bob").await;
    assert_eq!(alice.next_in(CONV).await.0, 2);
    let m = bob.next_message().await;
    assert_eq!((m.seq, m.id.as_str()), (2, "a4"));
    // Groups: the hour's one create is stamped, a second one refused; the group works.
    alice
        .group(GroupOp::Create, "g~team", "g1", Some("Team"), &["bob"])
        .await;
    assert_eq!(alice.next_in("g~team").await.0, 1);
    assert_eq!(bob.next_in("g~team").await.0, 1);
    alice
        .send_frame(&ClientFrame::Group {
            op: GroupOp::Create,
            conv: "g~more".into(),
            id: "g2".into(),
            name: Some("More".into()),
            members: vec![],
        })
        .await;
    refused(alice.next().await, "g2");
    alice.send_acked("g~team", "a5", "welcome").await;
    assert_eq!(alice.next_in("g~team").await.0, 2);
    assert_eq!(bob.next_in("g~team").await.0, 2);
    // Nothing of the refused send was stored.
    let (messages, more) = alice.history("dm~alice~eve", None, None, 10).await;
    assert!(messages.is_empty() && !more, "{messages:?}");
    app.shutdown().await;
}
