//! Group fan-out against a real nats-server and the real sequencer (in-process, with a
//! temporary store): group frames go into `CHAT_IN` as a gateway publishes them, the sequencer
//! stamps them and answers `chat.api.group_info`, and the tests watch the subjects a gateway
//! would subscribe: `chat.user.<user>` and `chat.grp.<conv>`. Assertions are about which frames
//! each user gets and in which order, never about timing.

use std::time::Duration;

use async_nats::{HeaderMap, jetstream};
use chat_protocol::{
    api::{Inbound, InboundGroup, InboundMessage, InboundReceipt, dedupe_id},
    frames::{GroupEvent, GroupOp, Message, ServerFrame},
    ids::ConvId,
    jetstream::{Overrides, provision_all},
    subjects,
};
use chat_testkit::NatsServer;
use futures::StreamExt;
use tokio::{sync::mpsc, time::timeout};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(20);

struct Env {
    nats: NatsServer,
    client: async_nats::Client,
    js: jetstream::Context,
    _sequencer: (
        CancellationToken,
        tokio::task::JoinHandle<anyhow::Result<()>>,
        tempfile::TempDir,
    ),
}

async fn env() -> Env {
    let nats = NatsServer::start();
    let client = nats.client().await;
    provision_all(&client, &Overrides::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = chat_sequencer::Config {
        nats_url: nats.url(),
        admin_listen: String::new(),
        store_dir: dir.path().join("store"),
        ..Default::default()
    };
    let stop = CancellationToken::new();
    let task = tokio::spawn(chat_sequencer::run(config, None, stop.clone()));
    Env {
        js: jetstream::new(client.clone()),
        client,
        nats,
        _sequencer: (stop, task, dir),
    }
}

struct Worker {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Worker {
    /// Starts a worker and waits until it is ready (pulling its consumers).
    async fn start(env: &Env, tweak: impl FnOnce(&mut chat_fanout::Config)) -> Self {
        let mut config = chat_fanout::Config {
            nats_url: env.nats.url(),
            admin_listen: String::new(),
            ..Default::default()
        };
        tweak(&mut config);
        let stop = CancellationToken::new();
        let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = admin.local_addr().unwrap();
        let task = tokio::spawn(chat_fanout::run(config, Some(admin), stop.clone()));
        let deadline = tokio::time::Instant::now() + WAIT;
        while !get(addr, "/readyz").await.starts_with("HTTP/1.0 200")
            && !get(addr, "/readyz").await.starts_with("HTTP/1.1 200")
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "worker ready in time"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Self { stop, task }
    }

    async fn stop(self) {
        self.stop.cancel();
        timeout(WAIT, self.task)
            .await
            .expect("worker stops")
            .unwrap()
            .unwrap();
    }
}

impl Env {
    async fn publish(&self, conv: &str, from: &str, id: &str, inbound: Inbound) {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", dedupe_id(conv, from, id).as_str());
        self.js
            .publish_with_headers(
                subjects::inbound(&ConvId::parse(conv).unwrap()),
                headers,
                serde_json::to_vec(&inbound).unwrap().into(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }

    async fn group(&self, conv: &str, from: &str, id: &str, op: GroupOp, members: &[&str]) {
        let name = matches!(op, GroupOp::Create | GroupOp::Rename).then(|| "team".to_owned());
        let inbound = Inbound::Group(InboundGroup {
            conv: conv.into(),
            from: from.into(),
            device: "d".into(),
            id: id.into(),
            op,
            name,
            members: members.iter().map(|m| m.to_string()).collect(),
        });
        self.publish(conv, from, id, inbound).await;
    }

    async fn send(&self, conv: &str, from: &str, id: &str) {
        let inbound = Inbound::Send(InboundMessage {
            conv: conv.into(),
            from: from.into(),
            device: "d".into(),
            id: id.into(),
            body: format!("body {id}"),
            ts: 0,
            media: None,
        });
        self.publish(conv, from, id, inbound).await;
    }

    async fn read(&self, conv: &str, user: &str, seq: u64) {
        let inbound = Inbound::Receipt(InboundReceipt {
            conv: conv.into(),
            user: user.into(),
            device: "d".into(),
            delivered: seq,
            read: seq,
        });
        self.js
            .publish(
                subjects::inbound(&ConvId::parse(conv).unwrap()),
                serde_json::to_vec(&inbound).unwrap().into(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }

    /// Subscribes like a gateway holding a device of `user`: confirms pushes that ask for it,
    /// and hands every frame on.
    async fn device(&self, subject: String) -> Device {
        let mut sub = self.client.subscribe(subject).await.unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        let client = self.client.clone();
        tokio::spawn(async move {
            while let Some(m) = sub.next().await {
                if let Some(reply) = m.reply.clone() {
                    let _ = client.publish(reply, "".into()).await;
                }
                let _ = tx.send(serde_json::from_slice::<ServerFrame>(&m.payload).unwrap());
            }
        });
        // The server has the subscription once a request to nobody came back.
        let _ = self
            .client
            .request(self.client.new_inbox(), "".into())
            .await;
        Device { rx }
    }

    async fn user(&self, user: &str) -> Device {
        self.device(format!("chat.user.{user}")).await
    }
}

struct Device {
    rx: mpsc::UnboundedReceiver<ServerFrame>,
}

impl Device {
    async fn frame(&mut self) -> ServerFrame {
        timeout(WAIT, self.rx.recv())
            .await
            .expect("a push in time")
            .expect("subscription open")
    }

    /// The next `message` frame of `conv` (other frames skipped).
    async fn message(&mut self, conv: &str) -> Message {
        loop {
            if let ServerFrame::Message(m) = self.frame().await
                && m.conv == conv
            {
                return m;
            }
        }
    }

    /// The seqs of `conv`'s messages up to and including `last`.
    async fn seqs_until(&mut self, conv: &str, last: u64) -> Vec<u64> {
        let mut seqs = Vec::new();
        loop {
            let m = self.message(conv).await;
            seqs.push(m.seq);
            if m.seq >= last {
                return seqs;
            }
        }
    }

    /// Everything already received (no waiting).
    fn drained(&mut self) -> Vec<ServerFrame> {
        let mut out = Vec::new();
        while let Ok(f) = self.rx.try_recv() {
            out.push(f);
        }
        out
    }
}

fn event(m: &Message) -> Option<&GroupEvent> {
    m.event.as_ref()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_get_a_group_from_their_join_until_their_removal() {
    let env = env().await;
    let worker = Worker::start(&env, |_| {}).await;
    let (mut alice, mut bob, mut carol) = (
        env.user("alice").await,
        env.user("bob").await,
        env.user("carol").await,
    );
    let g = "g~team";
    env.group(g, "alice", "op1", GroupOp::Create, &["bob"])
        .await; // 1
    env.send(g, "bob", "m1").await; // 2
    env.group(g, "alice", "op2", GroupOp::Add, &["carol"]).await; // 3
    env.send(g, "carol", "m2").await; // 4
    env.group(g, "alice", "op3", GroupOp::Remove, &["bob"])
        .await; // 5
    env.send(g, "alice", "m3").await; // 6

    assert_eq!(alice.seqs_until(g, 6).await, [1, 2, 3, 4, 5, 6]);
    assert_eq!(
        carol.seqs_until(g, 6).await,
        [3, 4, 5, 6],
        "carol sees from her join on"
    );
    let bobs = bob.seqs_until(g, 5).await;
    assert_eq!(bobs, [1, 2, 3, 4, 5]);
    // Carol's copy of a later message is published after Bob's would have been: once it is
    // here, anything for Bob is here too.
    env.send(g, "carol", "m4").await; // 7
    assert_eq!(carol.message(g).await.seq, 7);
    let late: Vec<_> = bob
        .drained()
        .into_iter()
        .filter(|f| matches!(f, ServerFrame::Message(m) if m.conv == g))
        .collect();
    assert!(
        late.is_empty(),
        "bob got messages after his removal: {late:?}"
    );
    worker.stop().await;
}

/// Offline members of a small group get a push notification for each message, and for a
/// membership event only when it is about them (being added); a rename notifies nobody.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_events_notify_only_the_users_they_are_about() {
    let env = env().await;
    let worker = Worker::start(&env, |_| {}).await;
    // Only alice has a device; dave and erin are offline.
    let mut alice = env.user("alice").await;
    let g = "g~hike";
    env.group(g, "alice", "op1", GroupOp::Create, &["dave"])
        .await; // 1
    env.group(g, "alice", "op2", GroupOp::Rename, &[]).await; // 2
    env.group(g, "alice", "op3", GroupOp::Add, &["erin"]).await; // 3
    env.send(g, "alice", "m1").await; // 4
    assert_eq!(alice.seqs_until(g, 4).await, [1, 2, 3, 4]);
    let mut push = env.js.get_stream(subjects::STREAM_PUSH).await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    let notified = loop {
        let last = push.info().await.unwrap().state.last_sequence;
        let mut seen = Vec::new();
        for seq in 1..=last {
            let raw = push.get_raw_message(seq).await.unwrap();
            let n: chat_protocol::api::PushNotification =
                serde_json::from_slice(&raw.payload).unwrap();
            seen.push((n.user, n.seq));
        }
        seen.sort();
        // The message (seq 4) notifies both; it comes after every event before it.
        if seen.contains(&("dave".into(), 4)) && seen.contains(&("erin".into(), 4)) {
            break seen;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "notifications: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        notified,
        vec![
            ("dave".to_owned(), 1),
            ("dave".to_owned(), 4),
            ("erin".to_owned(), 3),
            ("erin".to_owned(), 4)
        ],
        "dave for his joining, erin for hers, both for the message; nobody for the rename"
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_worker_seeds_its_view_and_delivers_by_membership() {
    let env = env().await;
    let g = "g~restart";
    let (mut alice, mut bob, mut carol) = (
        env.user("alice").await,
        env.user("bob").await,
        env.user("carol").await,
    );
    let worker = Worker::start(&env, |_| {}).await;
    env.group(g, "alice", "op1", GroupOp::Create, &["bob"])
        .await; // 1
    env.send(g, "bob", "m1").await; // 2
    assert_eq!(bob.seqs_until(g, 2).await, [1, 2]);
    assert_eq!(alice.seqs_until(g, 2).await, [1, 2]);
    worker.stop().await;

    // While no worker runs: carol joins, bob is removed, and the group goes on.
    env.group(g, "alice", "op2", GroupOp::Add, &["carol"]).await; // 3
    env.send(g, "carol", "m2").await; // 4
    env.group(g, "alice", "op3", GroupOp::Remove, &["bob"])
        .await; // 5
    env.send(g, "alice", "m3").await; // 6

    // The new worker knows nothing: it asks group_info once (as of seq 6, with the former
    // members still in at seq 3) and delivers each older message to who was a member then.
    let worker = Worker::start(&env, |_| {}).await;
    assert_eq!(alice.seqs_until(g, 6).await, [3, 4, 5, 6]);
    assert_eq!(carol.seqs_until(g, 6).await, [3, 4, 5, 6]);
    // Bob, removed at 5, gets 3, 4 and his removal.
    assert_eq!(bob.message(g).await.seq, 3);
    assert_eq!(bob.message(g).await.seq, 4);
    let removal = bob.message(g).await;
    assert_eq!(removal.seq, 5);
    assert!(
        matches!(event(&removal), Some(GroupEvent::Removed { members }) if members == &["bob"])
    );
    env.send(g, "carol", "m4").await; // 7
    assert_eq!(carol.message(g).await.seq, 7);
    assert!(
        bob.drained()
            .iter()
            .all(|f| !matches!(f, ServerFrame::Message(m) if m.conv == g && m.seq > 5))
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_group_is_published_once_on_its_group_subject() {
    let env = env().await;
    let g = "g~big";
    let conv = ConvId::parse(g).unwrap();
    let mut grp = env.device(subjects::group(&conv)).await;
    let (mut alice, mut bob, mut carol, mut dave) = (
        env.user("alice").await,
        env.user("bob").await,
        env.user("carol").await,
        env.user("dave").await,
    );
    // Groups above two members are large here.
    let worker = Worker::start(&env, |c| c.small_group_max_members = 2).await;
    env.group(g, "alice", "op1", GroupOp::Create, &["bob", "carol"])
        .await; // 1
    env.send(g, "bob", "m1").await; // 2
    env.group(g, "alice", "op2", GroupOp::Add, &["dave"]).await; // 3
    env.send(g, "dave", "m2").await; // 4

    assert_eq!(
        grp.seqs_until(g, 4).await,
        [1, 2, 3, 4],
        "each message once, in order"
    );
    // Membership events also go to the users they name (their gateways start listening);
    // ordinary messages only on the group subject.
    for user in [&mut alice, &mut bob, &mut carol] {
        assert_eq!(user.message(g).await.seq, 1);
    }
    assert_eq!(dave.message(g).await.seq, 3);
    // A receipt of a large group goes to the reader's own devices only.
    env.read(g, "carol", 4).await;
    loop {
        match carol.frame().await {
            ServerFrame::Receipt(r) if r.user == "carol" && r.read == 4 => break,
            _ => continue,
        }
    }
    env.send(g, "alice", "m3").await; // 5
    assert_eq!(grp.message(g).await.seq, 5);
    let stray: Vec<ServerFrame> = [&mut alice, &mut bob, &mut dave]
        .into_iter()
        .flat_map(|u| u.drained())
        .collect();
    assert!(
        stray.is_empty(),
        "per-user pushes of a large group: {stray:?}"
    );
    assert!(
        grp.drained().is_empty(),
        "receipts do not go on the group subject"
    );
    worker.stop().await;
}

/// `GET /metrics` of a worker's admin endpoint.
async fn scrape(addr: std::net::SocketAddr) -> String {
    get(addr, "/metrics").await
}

/// The raw HTTP answer to `GET path` on a worker's admin endpoint.
async fn get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_group_waits_for_its_budget_without_holding_up_others() {
    let env = env().await;
    let (mut alice, mut bob) = (env.user("alice").await, env.user("bob").await);
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin_addr = admin.local_addr().unwrap();
    let stop = CancellationToken::new();
    let config = chat_fanout::Config {
        nats_url: env.nats.url(),
        admin_listen: String::new(),
        // Two deliveries per message (alice and bob): about two messages a second.
        group_conv_deliveries_per_second: 4,
        group_conv_burst: 2,
        ..Default::default()
    };
    let task = tokio::spawn(chat_fanout::run(config, Some(admin), stop.clone()));
    let worker = Worker { stop, task };

    let (flood, calm) = ("g~flood", "g~calm");
    env.group(flood, "alice", "f0", GroupOp::Create, &["bob"])
        .await;
    env.group(calm, "alice", "c0", GroupOp::Create, &["bob"])
        .await;
    for i in 1..=12 {
        env.send(flood, "alice", &format!("f{i}")).await;
    }
    env.send(calm, "alice", "c1").await;
    env.send("dm~alice~bob", "alice", "d1").await;

    // Bob gets the one-to-one message and the other group's before the flood is through,
    // and the whole flood, in order.
    let (mut flood_seqs, mut saw_dm, mut calm_seqs) = (Vec::new(), None, Vec::new());
    while flood_seqs.last() != Some(&13) {
        if let ServerFrame::Message(m) = bob.frame().await {
            match m.conv.as_str() {
                c if c == flood => flood_seqs.push(m.seq),
                c if c == calm => calm_seqs.push(m.seq),
                _ => saw_dm = saw_dm.or(Some(flood_seqs.len())),
            }
        }
    }
    assert_eq!(
        flood_seqs,
        (1..=13).collect::<Vec<_>>(),
        "nothing dropped, in order"
    );
    assert!(
        saw_dm.is_some_and(|n| n < 13),
        "the one-to-one message waited for the flood"
    );
    assert_eq!(calm_seqs, [1, 2], "the other group was not held up");
    assert_eq!(
        alice.seqs_until(flood, 13).await,
        (1..=13).collect::<Vec<_>>()
    );
    let text = scrape(admin_addr).await;
    assert!(
        metric(&text, "fanout_group_deferred_total") >= 1.0,
        "{text}"
    );
    worker.stop().await;
}

/// Which worker owns which consumer is tested in `common/tests/balance.rs` (the metrics
/// recorder is process-wide, so two in-process workers cannot be told apart here); this shows
/// two balanced workers deliver everything once and in order, also when one of them stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_balanced_workers_deliver_everything_once_in_order_and_survive_one_stopping() {
    let env = env().await;
    let mut bob = env.user("bob").await;
    let fast = |id: &'static str| {
        move |c: &mut chat_fanout::Config| {
            c.instance_id = id.into();
            c.balance_heartbeat_ms = 100;
            c.balance_expire_ms = 500;
        }
    };
    let (a, b) = tokio::join!(
        Worker::start(&env, fast("worker-a")),
        Worker::start(&env, fast("worker-b"))
    );
    let mut a = Some(a);
    // Conversations in every partition.
    let convs: Vec<String> = (0..24).map(|i| format!("dm~a{i:02}~bob")).collect();
    let mut seen: std::collections::BTreeMap<String, Vec<u64>> = Default::default();
    for round in 1..=3u64 {
        if round == 2 {
            // Worker a goes away: b takes over its share.
            a.take().expect("worker a runs").stop().await;
        }
        for (i, conv) in convs.iter().enumerate() {
            env.send(conv, &format!("a{i:02}"), &format!("m{round}"))
                .await;
        }
        while seen.values().map(Vec::len).sum::<usize>() < convs.len() * round as usize {
            if let ServerFrame::Message(m) = bob.frame().await {
                seen.entry(m.conv).or_default().push(m.seq);
            }
        }
    }
    assert_eq!(seen.len(), convs.len());
    assert!(seen.values().all(|s| s == &[1, 2, 3]), "{seen:?}");
    b.stop().await;
}
