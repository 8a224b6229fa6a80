//! The sequencer against a real nats-server: stamping, fencing, dedupe, history, ownership.

use std::{collections::HashMap, time::Duration};

use async_nats::{HeaderMap, jetstream};
use chat_protocol::{
    api::{HistoryReply, HistoryRequest, InboundMessage, dedupe_id},
    frames::{ErrorCode, ServerFrame},
    ids::ConvId,
    jetstream::{Overrides, provision_all},
    subjects,
};
use chat_sequencer::{Config, stamper::STAMPER_HEADER};
use chat_testkit::NatsServer;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

struct Sequencer {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    _dir: tempfile::TempDir,
}

impl Sequencer {
    fn spawn(nats: &NatsServer, instance: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            nats_url: nats.url(),
            admin_listen: String::new(),
            store_dir: dir.path().join("store"),
            instance_id: instance.into(),
            ..Config::default()
        };
        let stop = CancellationToken::new();
        let task = tokio::spawn(chat_sequencer::run(config, None, stop.clone()));
        Self {
            stop,
            task,
            _dir: dir,
        }
    }

    async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(15), self.task)
            .await
            .expect("sequencer stops")
            .unwrap()
            .unwrap();
    }
}

async fn setup() -> (NatsServer, async_nats::Client, jetstream::Context) {
    let nats = NatsServer::start();
    let client = nats.client().await;
    provision_all(&client, &Overrides::default()).await.unwrap();
    let js = jetstream::new(client.clone());
    (nats, client, js)
}

async fn send(js: &jetstream::Context, conv: &str, from: &str, id: &str, body: &str) {
    let conv_id = ConvId::parse(conv).unwrap();
    let msg = InboundMessage {
        conv: conv.into(),
        from: from.into(),
        device: "d1".into(),
        id: id.into(),
        body: body.into(),
        ts: 0,
    };
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", dedupe_id(conv, from, id).as_str());
    js.publish_with_headers(
        subjects::inbound(&conv_id),
        headers,
        serde_json::to_vec(&msg).unwrap().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
}

/// Every stamped message in CHAT_MSGS, with the instance that stamped it.
async fn stamped(
    js: &jetstream::Context,
    expect: usize,
) -> Vec<(chat_protocol::frames::Message, String)> {
    let stream = js.get_stream(subjects::STREAM_STAMPED).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let n = stream.get_info().await.unwrap().state.messages as usize;
        if n >= expect || tokio::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut out = Vec::new();
    let n = stream.get_info().await.unwrap().state.last_sequence;
    for seq in 1..=n {
        let raw = stream.get_raw_message(seq).await.unwrap();
        let ServerFrame::Message(m) = serde_json::from_slice(&raw.payload).unwrap() else {
            panic!("not a message frame")
        };
        let by = raw
            .headers
            .get(STAMPER_HEADER)
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default();
        out.push((m, by));
    }
    out
}

async fn history(client: &async_nats::Client, user: &str, conv: &str, after: u64) -> HistoryReply {
    let req = HistoryRequest {
        user: user.into(),
        conv: conv.into(),
        before: None,
        after: Some(after),
        limit: 200,
    };
    let reply = tokio::time::timeout(
        Duration::from_secs(10),
        client.request(
            subjects::HISTORY_API,
            serde_json::to_vec(&req).unwrap().into(),
        ),
    )
    .await
    .expect("history answered in time")
    .unwrap();
    serde_json::from_slice(&reply.payload).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stamps_dense_seqs_in_send_order_and_serves_history() {
    let (nats, client, js) = setup().await;
    let seq = Sequencer::spawn(&nats, "s1");
    for i in 0..50 {
        send(
            &js,
            "dm~alice~bob",
            "alice",
            &format!("m{i}"),
            &format!("hello {i}"),
        )
        .await;
    }
    // A retry of an already-sent id (another gateway, after a lost ack) is not a new message.
    send(&js, "dm~alice~bob", "alice", "m3", "hello 3").await;
    let all = stamped(&js, 50).await;
    assert_eq!(all.len(), 50);
    for (i, (m, by)) in all.iter().enumerate() {
        assert_eq!(m.seq, i as u64 + 1);
        assert_eq!(m.id, format!("m{i}"));
        assert_eq!(m.body, format!("hello {i}"));
        assert_eq!(by, "s1");
    }
    let HistoryReply::Page { messages, more } = history(&client, "bob", "dm~alice~bob", 0).await
    else {
        panic!("expected a page")
    };
    assert!(!more);
    assert_eq!(
        messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        (1..=50).collect::<Vec<_>>()
    );
    let HistoryReply::Page { messages, more } = history(&client, "bob", "dm~alice~bob", 45).await
    else {
        panic!("expected a page")
    };
    assert_eq!(
        messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![46, 47, 48, 49, 50]
    );
    assert!(!more);
    // A third user may not read it.
    let HistoryReply::Error(e) = history(&client, "carol", "dm~alice~bob", 0).await else {
        panic!("carol must be refused")
    };
    assert_eq!(e.code, ErrorCode::NotMember);
    seq.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_member_send_is_refused_to_the_sender_and_never_stamped() {
    let (nats, client, js) = setup().await;
    let mut carol = client.subscribe("chat.user.carol").await.unwrap();
    client.flush().await.unwrap();
    let seq = Sequencer::spawn(&nats, "s1");
    // Bypassing the gateway's own check: the sequencer is the authority.
    send(&js, "dm~alice~bob", "carol", "c1", "let me in").await;
    send(&js, "dm~alice~bob", "alice", "a1", "hi").await;
    let frame = tokio::time::timeout(Duration::from_secs(10), carol.next())
        .await
        .expect("carol is told")
        .unwrap();
    let ServerFrame::Error(e) = serde_json::from_slice(&frame.payload).unwrap() else {
        panic!("expected an error frame")
    };
    assert_eq!(e.code, ErrorCode::NotMember);
    assert_eq!(e.id.as_deref(), Some("c1"));
    let all = stamped(&js, 1).await;
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].0.from, "alice");
    assert_eq!(all[0].0.seq, 1);
    seq.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_match_the_servers_subject_transform() {
    let (_nats, _client, js) = setup().await;
    let stream = js.get_stream(subjects::STREAM_INBOUND).await.unwrap();
    for i in 0..40 {
        let conv = format!("dm~u{i}~v{i}");
        send(&js, &conv, &format!("u{i}"), "x", "b").await;
        let raw = stream.get_raw_message(i + 1).await.unwrap();
        let conv = ConvId::parse(&conv).unwrap();
        assert_eq!(
            raw.subject.as_str(),
            format!("chat.inp.{}.{conv}", subjects::partition_of(&conv))
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sequencer_processes_never_stamp_the_same_conversation() {
    let (nats, client, js) = setup().await;
    let dir = tempfile::tempdir().unwrap();
    // Overlapping partition sets: both processes are active, and partitions 2..=5 are contested.
    let process = |name: &str, partitions: &str| {
        chat_testkit::ChildProcess::spawn(
            std::process::Command::new(env!("CARGO_BIN_EXE_sequencer"))
                .env("CHAT_SEQUENCER_NATS_URL", nats.url())
                .env("CHAT_SEQUENCER_ADMIN_LISTEN", "")
                .env("CHAT_SEQUENCER_STORE_DIR", dir.path().join(name))
                .env("CHAT_SEQUENCER_INSTANCE_ID", name)
                .env("CHAT_SEQUENCER_PARTITIONS", partitions)
                .env("RUST_LOG", "warn"),
        )
        .expect("sequencer binary starts")
    };
    let mut a = process("a", "[0,1,2,3,4,5]");
    let mut b = process("b", "[2,3,4,5,6,7]");
    let convs: Vec<String> = (0..24).map(|i| format!("dm~p{i}~q{i}")).collect();
    let rounds = 10;
    for r in 0..rounds {
        for (i, conv) in convs.iter().enumerate() {
            send(&js, conv, &format!("p{i}"), &format!("r{r}"), "x").await;
        }
    }
    let total = convs.len() * rounds;
    let all = stamped(&js, total).await;
    assert_eq!(all.len(), total, "every message stamped exactly once");
    let mut by_conv: HashMap<&str, Vec<(u64, &str, &str)>> = HashMap::new();
    for (m, by) in &all {
        by_conv.entry(&m.conv).or_default().push((m.seq, &m.id, by));
    }
    for (conv, msgs) in &by_conv {
        let seqs: Vec<u64> = msgs.iter().map(|m| m.0).collect();
        assert_eq!(
            seqs,
            (1..=rounds as u64).collect::<Vec<_>>(),
            "{conv}: dense and in order"
        );
        let ids: Vec<&str> = msgs.iter().map(|m| m.1).collect();
        let sent: Vec<String> = (0..rounds).map(|r| format!("r{r}")).collect();
        assert_eq!(ids, sent, "{conv}: send order kept");
        let owners: std::collections::HashSet<&str> = msgs.iter().map(|m| m.2).collect();
        assert_eq!(owners.len(), 1, "{conv} stamped by {owners:?}");
    }
    // Both stores can answer for every conversation (each follows the stamped stream).
    for (i, conv) in convs.iter().enumerate() {
        let user = format!("q{i}");
        let HistoryReply::Page { messages, .. } = history(&client, &user, conv, 0).await else {
            panic!("expected a page")
        };
        assert_eq!(messages.len(), rounds);
    }
    let stampers: std::collections::BTreeSet<&str> =
        all.iter().map(|(_, by)| by.as_str()).collect();
    assert_eq!(stampers.len(), 2, "both processes stamped: {stampers:?}");
    // Both processes are alive and competing the whole time.
    assert!(a.is_running() && b.is_running());
    a.sigterm().unwrap();
    b.sigterm().unwrap();
    for p in [&mut a, &mut b] {
        let status = p.wait_timeout(Duration::from_secs(15)).unwrap();
        assert!(
            status.is_some_and(|s| s.success()),
            "clean exit on SIGTERM: {status:?}"
        );
    }
}

/// The fence the stamper relies on: a publish that expects a stale head of the conversation's
/// subject is refused, including "expects no message yet" (0) once one exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_head_cannot_stamp() {
    use async_nats::jetstream::context::PublishErrorKind;
    let (_nats, _client, js) = setup().await;
    let conv = ConvId::parse("dm~alice~bob").unwrap();
    let publish = |expected: u64| {
        let js = js.clone();
        let subject = subjects::stamped(&conv);
        async move {
            let mut headers = HeaderMap::new();
            headers.insert(
                "Nats-Expected-Last-Subject-Sequence",
                expected.to_string().as_str(),
            );
            match js.publish_with_headers(subject, headers, "x".into()).await {
                Ok(ack) => ack.await,
                Err(e) => Err(e),
            }
        }
    };
    let first = publish(0)
        .await
        .expect("first stamp expects an empty subject");
    let err = publish(0)
        .await
        .expect_err("a second 'first' stamp is fenced");
    assert_eq!(err.kind(), PublishErrorKind::WrongLastSequence);
    publish(first.sequence)
        .await
        .expect("the current head may stamp");
    let err = publish(first.sequence)
        .await
        .expect_err("the old head is fenced");
    assert_eq!(err.kind(), PublishErrorKind::WrongLastSequence);
}
