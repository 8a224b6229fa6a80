//! The presence service against a real nats-server. Gateways are simulated at the NATS level
//! (they publish the reports `docs/protocol.md` and `nats/README.md` describe, and subscribe to
//! their push subject); where the sequencer would answer (`chat.api.contacts`,
//! `chat.api.group_info`), the test plays it, with a fixed set of conversations.

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use async_nats::jetstream::{self, kv::Operation};
use chat_presence::Config;
use chat_protocol::{
    api::{
        ContactsReply, ContactsRequest, GroupInfoReply, GroupInfoRequest, PresencePush,
        PresenceReply, PresenceReport, PresenceRequest, PresenceSettingsReply,
        PresenceSettingsRequest, TypingRelay,
    },
    frames::{ErrorCode, GroupMember, PRESENCE_BATCH_MAX, PresenceState, ServerFrame},
    ids::{ConvId, GatewayId, UserId},
    jetstream::{Overrides, provision_all},
    subjects,
};
use chat_testkit::NatsServer;
use futures::StreamExt;
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;

/// Bound on every wait for a condition.
const WAIT: Duration = Duration::from_secs(30);

struct Presence {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Presence {
    async fn stop(self) {
        self.stop.cancel();
        timeout(WAIT, self.task)
            .await
            .expect("presence stops")
            .unwrap()
            .unwrap();
    }
}

fn test_config(server: &NatsServer, instance: &str) -> Config {
    Config {
        nats_url: server.url(),
        admin_listen: String::new(),
        instance_id: instance.into(),
        online_ttl_ms: 2000,
        debounce_ms: 100,
        min_push_interval_ms: 200,
        balance_heartbeat_ms: 100,
        balance_expire_ms: 400,
        ..Config::default()
    }
}

/// Starts a replica and waits until it answers queries (then it also takes reports: it
/// subscribes to them first).
async fn spawn(config: Config) -> Presence {
    let client = async_nats::connect(&config.nats_url).await.unwrap();
    let stop = CancellationToken::new();
    let task = tokio::spawn(chat_presence::run(config, None, stop.clone()));
    let probe = serde_json::to_vec(&PresenceRequest {
        user: "probe".into(),
        users: vec![],
    })
    .unwrap();
    let deadline = Instant::now() + WAIT;
    while client
        .request(subjects::PRESENCE_API, probe.clone().into())
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "presence never answered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Presence { stop, task }
}

async fn setup() -> (NatsServer, async_nats::Client) {
    let server = NatsServer::start();
    let client = server.client().await;
    provision_all(&client, &Overrides::default()).await.unwrap();
    (server, client)
}

/// Plays the sequencer's `chat.api.contacts`: `pairs` share a conversation (each user is its
/// own contact too).
async fn play_contacts(client: &async_nats::Client, pairs: &[(&str, &str)]) {
    let mut graph: HashMap<String, HashSet<String>> = HashMap::new();
    for (a, b) in pairs {
        graph.entry((*a).into()).or_default().insert((*b).into());
        graph.entry((*b).into()).or_default().insert((*a).into());
    }
    let mut sub = client.subscribe(subjects::CONTACTS_API).await.unwrap();
    client.flush().await.unwrap();
    let client = client.clone();
    tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            let req: ContactsRequest = serde_json::from_slice(&msg.payload).unwrap();
            let mine = graph.get(&req.user).cloned().unwrap_or_default();
            let users = req
                .users
                .into_iter()
                .filter(|u| *u == req.user || mine.contains(u))
                .collect();
            let reply = serde_json::to_vec(&ContactsReply::Contacts { users }).unwrap();
            client
                .publish(msg.reply.unwrap(), reply.into())
                .await
                .unwrap();
        }
    });
}

async fn report(client: &async_nats::Client, gw: &str, report: PresenceReport) {
    let gw = GatewayId::parse(gw).unwrap();
    let payload = serde_json::to_vec(&report).unwrap();
    client
        .publish(subjects::presence_report(&gw), payload.into())
        .await
        .unwrap();
    client.flush().await.unwrap();
}

fn list(users: &[&str]) -> Vec<String> {
    users.iter().map(|u| (*u).into()).collect()
}

fn online(users: &[&str]) -> PresenceReport {
    PresenceReport {
        ts: chat_protocol::now_ms(),
        online: list(users),
        ..PresenceReport::default()
    }
}

fn offline(users: &[&str]) -> PresenceReport {
    PresenceReport {
        ts: chat_protocol::now_ms(),
        offline: list(users),
        ..PresenceReport::default()
    }
}

async fn query(client: &async_nats::Client, user: &str, users: &[&str]) -> PresenceReply {
    let req = PresenceRequest {
        user: user.into(),
        users: list(users),
    };
    let reply = timeout(
        WAIT,
        client.request(
            subjects::PRESENCE_API,
            serde_json::to_vec(&req).unwrap().into(),
        ),
    )
    .await
    .expect("answered in time")
    .expect("a presence replica answers");
    serde_json::from_slice(&reply.payload).unwrap()
}

fn states(reply: PresenceReply) -> Vec<PresenceState> {
    match reply {
        PresenceReply::Presence { users } => users,
        PresenceReply::Error(e) => panic!("refused: {e:?}"),
    }
}

/// Asks until `ok` holds for `user`'s state as `asker` sees it; returns that state.
async fn until_state(
    client: &async_nats::Client,
    asker: &str,
    user: &str,
    ok: impl Fn(&PresenceState) -> bool,
) -> PresenceState {
    let deadline = Instant::now() + WAIT;
    loop {
        let got = states(query(client, asker, &[user]).await);
        if let Some(s) = got.into_iter().find(|s| s.user == user)
            && ok(&s)
        {
            return s;
        }
        assert!(Instant::now() < deadline, "{user} never reached the state");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bucket_file_is_a_kv_bucket_with_per_key_ttl() {
    let (_server, client) = setup().await;
    // What JetStream made of nats/streams/KV_PRESENCE.json.
    let info = client
        .request(
            format!("$JS.API.STREAM.INFO.{}", subjects::STREAM_PRESENCE),
            "".into(),
        )
        .await
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.payload).unwrap();
    let config = &info["config"];
    assert_eq!(config["allow_msg_ttl"], true, "{info}");
    assert_eq!(config["subject_delete_marker_ttl"], 900_000_000_000u64);
    assert_eq!(config["max_msgs_per_subject"], 1);
    assert_eq!(config["allow_rollup_hdrs"], true);
    // The KV API accepts it as bucket PRESENCE, and a key written with a TTL expires, leaving a
    // marker that a watch sees.
    let js = jetstream::new(client.clone());
    let kv = js.get_key_value(subjects::PRESENCE_BUCKET).await.unwrap();
    let mut watch = kv.watch("probe").await.unwrap();
    kv.create_with_ttl("probe", "x".into(), Duration::from_secs(1))
        .await
        .unwrap();
    let first = timeout(WAIT, watch.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(first.operation, Operation::Put);
    let expired = timeout(WAIT, watch.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(expired.operation, Operation::Purge, "the expiry marker");
    assert_eq!(kv.get("probe").await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_on_any_gateway_then_offline_with_last_seen() {
    let (server, client) = setup().await;
    play_contacts(&client, &[("alice", "bob")]).await;
    let p = spawn(test_config(&server, "p1")).await;

    let before = chat_protocol::now_ms();
    report(&client, "gw1", online(&["alice"])).await;
    until_state(&client, "bob", "alice", |s| s.online).await;
    // A second device on another gateway; the first one leaves: still online.
    report(&client, "gw2", online(&["alice"])).await;
    let js = jetstream::new(client.clone());
    let kv = js.get_key_value(subjects::PRESENCE_BUCKET).await.unwrap();
    let deadline = Instant::now() + WAIT;
    while kv.get("on.alice.gw2").await.unwrap().is_none() {
        assert!(Instant::now() < deadline, "gw2's key is written");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    report(&client, "gw1", offline(&["alice"])).await;
    let deadline = Instant::now() + WAIT;
    while kv.get("on.alice.gw1").await.unwrap().is_some() {
        assert!(Instant::now() < deadline, "gw1's key is deleted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let s = until_state(&client, "bob", "alice", |_| true).await;
    assert!(s.online, "the device on gw2 is still there");
    assert_eq!(s.last_seen, None, "no last seen while online");

    report(&client, "gw2", offline(&["alice"])).await;
    let s = until_state(&client, "bob", "alice", |s| !s.online).await;
    let seen = s.last_seen.expect("last seen once the last device left");
    assert!(seen >= before && seen <= chat_protocol::now_ms(), "{seen}");
    assert!(kv.get("seen.alice").await.unwrap().is_some());

    // Queries of several users at once; bad input is refused and harms nothing.
    let got = states(query(&client, "alice", &["alice", "bob"]).await);
    assert_eq!(got.len(), 2);
    assert!(got.iter().all(|s| !s.online));
    let refused = |r: PresenceReply| match r {
        PresenceReply::Error(e) => e.code,
        other => panic!("expected a refusal, got {other:?}"),
    };
    assert_eq!(
        refused(query(&client, "bob", &["alice", "no.dots"]).await),
        ErrorCode::InvalidId
    );
    let many: Vec<String> = (0..=PRESENCE_BATCH_MAX).map(|i| format!("u{i}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    assert_eq!(
        refused(query(&client, "bob", &many).await),
        ErrorCode::InvalidFrame
    );
    // A report that is not one is ignored.
    client
        .publish("chat.presence.report.gw1", "{garbage".into())
        .await
        .unwrap();
    report(&client, "gw1", online(&["bad.user", "alice"])).await;
    until_state(&client, "bob", "alice", |s| s.online).await;
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_gateways_users_go_offline_when_their_keys_expire() {
    let (server, client) = setup().await;
    play_contacts(&client, &[("alice", "bob"), ("carol", "bob")]).await;
    let p = spawn(test_config(&server, "p1")).await;
    let js = jetstream::new(client.clone());
    let kv = js.get_key_value(subjects::PRESENCE_BUCKET).await.unwrap();

    // gw1 reports alice, then dies without a word. gw2 keeps heartbeating carol.
    report(&client, "gw1", online(&["alice"])).await;
    until_state(&client, "bob", "alice", |s| s.online).await;
    let beating = CancellationToken::new();
    let heartbeat = {
        let (client, stop) = (client.clone(), beating.clone());
        tokio::spawn(async move {
            while stop
                .run_until_cancelled(tokio::time::sleep(Duration::from_millis(500)))
                .await
                .is_some()
            {
                let r = PresenceReport {
                    heartbeat: true,
                    ..online(&["carol"])
                };
                report(&client, "gw2", r).await;
            }
        })
    };
    until_state(&client, "bob", "carol", |s| s.online).await;
    let killed = chat_protocol::now_ms();

    // The key's TTL (2 s here) runs out: the server removes it, alice is offline, and her last
    // seen is when her gateway last wrote her key.
    let s = until_state(&client, "bob", "alice", |s| !s.online).await;
    assert!(chat_protocol::now_ms() >= killed, "sanity");
    let seen = s.last_seen.expect("a last seen after expiry");
    assert!(
        seen <= killed,
        "last seen {seen} is from before the gateway went silent"
    );
    assert_eq!(kv.get("on.alice.gw1").await.unwrap(), None, "expired");
    let deadline = Instant::now() + WAIT;
    while kv.get("seen.alice").await.unwrap().is_none() {
        assert!(Instant::now() < deadline, "last seen written to the bucket");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // carol's gateway kept reporting: long past the TTL, she is online.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let s = until_state(&client, "bob", "carol", |_| true).await;
    assert!(s.online, "heartbeats keep a user online");
    beating.cancel();
    heartbeat.await.unwrap();
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_are_pushed_only_to_gateways_that_watch_and_strangers_see_nothing() {
    let (server, client) = setup().await;
    play_contacts(&client, &[("alice", "bob"), ("alice", "carol")]).await;
    let p = spawn(test_config(&server, "p1")).await;
    let watcher = GatewayId::parse("gw-watch").unwrap();
    let other = GatewayId::parse("gw-other").unwrap();
    let mut pushed = client
        .subscribe(subjects::presence_push(&watcher))
        .await
        .unwrap();
    let mut not_pushed = client
        .subscribe(subjects::presence_push(&other))
        .await
        .unwrap();
    client.flush().await.unwrap();
    // gw-watch has a connection watching alice; gw-other has one watching carol.
    report(
        &client,
        "gw-watch",
        PresenceReport {
            watch: list(&["alice"]),
            ..PresenceReport::default()
        },
    )
    .await;
    report(
        &client,
        "gw-other",
        PresenceReport {
            watch: list(&["carol"]),
            ..PresenceReport::default()
        },
    )
    .await;
    // Give the watch time to register: push a change of carol to gw-other and wait for it.
    let deadline = Instant::now() + WAIT;
    loop {
        report(&client, "gw-x", online(&["carol"])).await;
        if let Ok(Some(m)) = timeout(Duration::from_millis(500), not_pushed.next()).await {
            let push: PresencePush = serde_json::from_slice(&m.payload).unwrap();
            assert!(push.users.iter().all(|s| s.user == "carol"));
            break;
        }
        assert!(Instant::now() < deadline, "carol's change reached gw-other");
    }

    report(&client, "gw-x", online(&["alice"])).await;
    let m = timeout(WAIT, pushed.next()).await.unwrap().unwrap();
    let push: PresencePush = serde_json::from_slice(&m.payload).unwrap();
    assert_eq!(
        push.users,
        vec![PresenceState {
            user: "alice".into(),
            online: true,
            last_seen: None
        }]
    );
    // Pushes of one publisher reach one subscriber in order: had gw-other been sent alice's
    // change, it would be here by now.
    client.flush().await.unwrap();
    while let Ok(Some(m)) = timeout(Duration::from_millis(300), not_pushed.next()).await {
        let push: PresencePush = serde_json::from_slice(&m.payload).unwrap();
        assert!(
            push.users.iter().all(|s| s.user != "alice"),
            "gw-other does not watch alice: {push:?}"
        );
    }

    // alice hides her last seen: bob sees her offline without it.
    let hide = PresenceSettingsRequest {
        user: "alice".into(),
        hide_last_seen: Some(true),
    };
    let reply = client
        .request(
            subjects::PRESENCE_SETTINGS_API,
            serde_json::to_vec(&hide).unwrap().into(),
        )
        .await
        .unwrap();
    let reply: PresenceSettingsReply = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(
        reply,
        PresenceSettingsReply::Settings {
            hide_last_seen: true
        }
    );
    report(&client, "gw-x", offline(&["alice"])).await;
    let s = until_state(&client, "bob", "alice", |s| !s.online).await;
    assert_eq!(s.last_seen, None, "hidden");
    let m = timeout(WAIT, pushed.next()).await.unwrap().unwrap();
    let push: PresencePush = serde_json::from_slice(&m.payload).unwrap();
    assert_eq!(
        push.users,
        vec![PresenceState {
            user: "alice".into(),
            online: false,
            last_seen: None
        }],
        "the push hides it too"
    );

    // eve shares no conversation with alice: nothing about her.
    assert_eq!(
        states(query(&client, "eve", &["alice", "bob"]).await),
        vec![]
    );
    // bob and carol share nothing either, although both know alice.
    let got = states(query(&client, "bob", &["carol", "alice"]).await);
    assert_eq!(
        got.iter().map(|s| s.user.as_str()).collect::<Vec<_>>(),
        ["alice"]
    );
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_typing_reaches_online_members_only() {
    let (server, client) = setup().await;
    let p = spawn(test_config(&server, "p1")).await;
    // Plays chat.api.group_info: g~team is alice, bob and carol.
    let mut info = client.subscribe(subjects::GROUP_INFO_API).await.unwrap();
    client.flush().await.unwrap();
    {
        let client = client.clone();
        tokio::spawn(async move {
            while let Some(msg) = info.next().await {
                let req: GroupInfoRequest = serde_json::from_slice(&msg.payload).unwrap();
                assert_eq!(req.conv, "g~team");
                let member = |u: &str| GroupMember {
                    user: u.into(),
                    admin: false,
                    joined: 1,
                    left: None,
                };
                let reply = GroupInfoReply::Group {
                    name: "Team".into(),
                    members: vec![member("alice"), member("bob"), member("carol")],
                    seq: 1,
                };
                let payload = serde_json::to_vec(&reply).unwrap();
                client
                    .publish(msg.reply.unwrap(), payload.into())
                    .await
                    .unwrap();
            }
        });
    }
    let user = |u: &str| subjects::user(&UserId::parse(u).unwrap());
    let mut bob = client.subscribe(user("bob")).await.unwrap();
    let mut carol = client.subscribe(user("carol")).await.unwrap();
    let mut alice = client.subscribe(user("alice")).await.unwrap();
    client.flush().await.unwrap();
    // bob is online; carol has no device (her subscription here only shows what is sent).
    report(&client, "gw1", online(&["bob", "alice"])).await;
    let conv = ConvId::parse("g~team").unwrap();
    let typing = |from: &str| TypingRelay {
        conv: "g~team".into(),
        user: from.into(),
        active: true,
    };
    // Until bob's key is in, a relay may find him offline: repeat until he gets one.
    let deadline = Instant::now() + WAIT;
    let frame = loop {
        // dave is no member: never relayed.
        for t in [typing("dave"), typing("alice")] {
            client
                .publish(
                    subjects::typing_group(&conv),
                    serde_json::to_vec(&t).unwrap().into(),
                )
                .await
                .unwrap();
        }
        if let Ok(Some(m)) = timeout(Duration::from_millis(300), bob.next()).await {
            break serde_json::from_slice::<ServerFrame>(&m.payload).unwrap();
        }
        assert!(Instant::now() < deadline, "bob gets the typing indicator");
    };
    assert_eq!(
        frame,
        ServerFrame::Typing {
            conv: "g~team".into(),
            user: "alice".into(),
            active: true,
            ttl_ms: chat_protocol::frames::TYPING_TTL_MS,
        }
    );
    while let Ok(Some(m)) = timeout(Duration::from_millis(300), bob.next()).await {
        let f: ServerFrame = serde_json::from_slice(&m.payload).unwrap();
        assert!(
            matches!(&f, ServerFrame::Typing { user, .. } if user == "alice"),
            "only alice's: {f:?}"
        );
    }
    assert!(
        timeout(Duration::from_millis(300), carol.next())
            .await
            .is_err(),
        "carol is offline"
    );
    assert!(
        timeout(Duration::from_millis(300), alice.next())
            .await
            .is_err(),
        "not back to the typist"
    );
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_the_users_and_agree() {
    let (server, client) = setup().await;
    let users: Vec<String> = (0..40).map(|i| format!("u{i}")).collect();
    let pairs: Vec<(&str, &str)> = users.iter().map(|u| ("bob", u.as_str())).collect();
    play_contacts(&client, &pairs).await;
    // Slow balance heartbeats, and a generous expiry: on a loaded machine the replicas must
    // not lose sight of each other during the test.
    let config = |id| Config {
        balance_heartbeat_ms: 200,
        balance_expire_ms: 3000,
        ..test_config(&server, id)
    };
    let (p1, p2) = tokio::join!(spawn(config("p1")), spawn(config("p2")));
    // Let both see each other before the users come.
    tokio::time::sleep(Duration::from_millis(4000)).await;
    let names: Vec<&str> = users.iter().map(String::as_str).collect();
    report(&client, "gw1", online(&names)).await;
    let js = jetstream::new(client.clone());
    let kv = js.get_key_value(subjects::PRESENCE_BUCKET).await.unwrap();
    for u in &names {
        until_state(&client, "bob", u, |s| s.online).await;
    }
    // Every key was written once, by the owner of its user (never by both replicas).
    let stream = js.get_stream(subjects::STREAM_PRESENCE).await.unwrap();
    let info = stream.get_info().await.unwrap();
    assert_eq!(info.state.messages, 40);
    assert_eq!(info.state.last_sequence, 40, "one write per user");
    report(&client, "gw1", offline(&names)).await;
    for u in &names {
        until_state(&client, "bob", u, |s| !s.online && s.last_seen.is_some()).await;
    }
    assert!(kv.get("seen.u7").await.unwrap().is_some());

    // One replica goes: once the other stops hearing from it, it takes its share of users.
    p2.stop().await;
    report(&client, "gw1", online(&names)).await;
    let deadline = Instant::now() + WAIT;
    for u in &names {
        loop {
            let key = subjects::presence_online_key(
                &UserId::parse(u).unwrap(),
                &GatewayId::parse("gw1").unwrap(),
            );
            if kv.get(&key).await.unwrap().is_some() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{key} never written after the failover"
            );
            // Reports before the takeover reach no owner for those users: the next
            // heartbeat (here: the same report again) repairs it.
            report(
                &client,
                "gw1",
                PresenceReport {
                    heartbeat: true,
                    ..online(&names)
                },
            )
            .await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    p1.stop().await;
}
