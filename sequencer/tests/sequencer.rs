//! The sequencer against a real nats-server: stamping, fencing, dedupe, history, ownership.

use std::{collections::HashMap, time::Duration};

use async_nats::{HeaderMap, jetstream};
use chat_protocol::{
    api::{
        ConversationsReply, ConversationsRequest, GroupInfoReply, GroupInfoRequest, HistoryReply,
        HistoryRequest, Inbound, InboundGroup, InboundMessage, InboundReceipt, ReceiptsReply,
        ReceiptsRequest, SyncReply, SyncRequest, dedupe_id,
    },
    frames::{ConvState, ErrorCode, GroupEvent, GroupOp, MemberMarks, Receipt, ServerFrame},
    ids::ConvId,
    jetstream::{Overrides, provision_all},
    subjects,
};
use chat_sequencer::{Config, STAMPER_HEADER};
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
        Self::spawn_with(nats, instance, Config::default())
    }

    fn spawn_with(nats: &NatsServer, instance: &str, config: Config) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            nats_url: nats.url(),
            admin_listen: String::new(),
            store_dir: dir.path().join("store"),
            instance_id: instance.into(),
            ..config
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
    let msg = Inbound::Send(InboundMessage {
        conv: conv.into(),
        from: from.into(),
        device: "d1".into(),
        id: id.into(),
        body: body.into(),
        ts: 0,
        media: None,
    });
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

fn inbound_send(conv: &str, from: &str, id: &str) -> (String, HeaderMap, bytes::Bytes) {
    let msg = Inbound::Send(InboundMessage {
        conv: conv.into(),
        from: from.into(),
        device: "d1".into(),
        id: id.into(),
        body: format!("body of {id}"),
        ts: 0,
        media: None,
    });
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", dedupe_id(conv, from, id).as_str());
    (
        subjects::inbound(&ConvId::parse(conv).unwrap()),
        headers,
        serde_json::to_vec(&msg).unwrap().into(),
    )
}

/// Publishes every `(conv, from, id)` send pipelined (all published, then every ack awaited),
/// in the order given: the order JetStream stores them in, as a gateway's would be.
async fn send_pipelined(js: &jetstream::Context, sends: &[(String, String, String)]) {
    let mut acks = Vec::with_capacity(sends.len());
    for (conv, from, id) in sends {
        let (subject, headers, payload) = inbound_send(conv, from, id);
        acks.push(
            js.publish_with_headers(subject, headers, payload)
                .await
                .unwrap(),
        );
    }
    for ack in acks {
        ack.await.unwrap();
    }
}

/// Asserts what every conversation's stamped messages must be: each send stamped exactly once,
/// seqs dense from 1, in the order the sends were stored.
fn assert_dense_in_send_order(
    all: &[(chat_protocol::frames::Message, String)],
    sends: &[(String, String, String)],
) {
    let mut by_conv: HashMap<&str, Vec<(u64, &str)>> = HashMap::new();
    for (m, _) in all {
        by_conv.entry(&m.conv).or_default().push((m.seq, &m.id));
    }
    let mut sent: HashMap<&str, Vec<&str>> = HashMap::new();
    for (conv, _, id) in sends {
        sent.entry(conv).or_default().push(id);
    }
    assert_eq!(by_conv.len(), sent.len(), "every conversation stamped");
    for (conv, msgs) in &mut by_conv {
        msgs.sort();
        let seqs: Vec<u64> = msgs.iter().map(|m| m.0).collect();
        let want = sent[conv].len() as u64;
        assert_eq!(
            seqs,
            (1..=want).collect::<Vec<_>>(),
            "{conv}: dense, once each"
        );
        let ids: Vec<&str> = msgs.iter().map(|m| m.1).collect();
        assert_eq!(ids, sent[conv], "{conv}: send order kept");
    }
}

/// Every stamped message in CHAT_MSGS, with the instance that stamped it.
async fn stamped(
    js: &jetstream::Context,
    expect: usize,
) -> Vec<(chat_protocol::frames::Message, String)> {
    let stream = js.get_stream(subjects::STREAM_STAMPED).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let mut out = Vec::new();
        let n = stream.get_info().await.unwrap().state.last_sequence;
        for seq in 1..=n {
            let raw = stream.get_raw_message(seq).await.unwrap();
            // Receipts, and what tests publish by hand (no stamper), are not stamps.
            if subjects::is_receipt_subject(&raw.subject)
                || raw.headers.get(STAMPER_HEADER).is_none()
            {
                continue;
            }
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
        if out.len() >= expect || tokio::time::Instant::now() > deadline {
            return out;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A request to one of the sequencer's APIs, decoded.
async fn ask<Q: serde::Serialize, A: serde::de::DeserializeOwned>(
    client: &async_nats::Client,
    subject: &'static str,
    req: &Q,
) -> A {
    let reply = tokio::time::timeout(
        Duration::from_secs(10),
        client.request(subject, serde_json::to_vec(req).unwrap().into()),
    )
    .await
    .expect("answered in time")
    .unwrap();
    serde_json::from_slice(&reply.payload).unwrap()
}

async fn history(client: &async_nats::Client, user: &str, conv: &str, after: u64) -> HistoryReply {
    history_range(client, user, conv, Some(after), None, 200).await
}

async fn history_range(
    client: &async_nats::Client,
    user: &str,
    conv: &str,
    after: Option<u64>,
    before: Option<u64>,
    limit: u32,
) -> HistoryReply {
    let req = HistoryRequest {
        user: user.into(),
        conv: conv.into(),
        before,
        after,
        limit,
    };
    ask(client, subjects::HISTORY_API, &req).await
}

fn page_seqs(reply: HistoryReply) -> (Vec<u64>, bool) {
    let HistoryReply::Page { messages, more } = reply else {
        panic!("expected a page, got {reply:?}")
    };
    (messages.iter().map(|m| m.seq).collect(), more)
}

async fn receipt(js: &jetstream::Context, conv: &str, user: &str, delivered: u64, read: u64) {
    let inbound = Inbound::Receipt(InboundReceipt {
        conv: conv.into(),
        user: user.into(),
        device: "d1".into(),
        delivered,
        read,
    });
    js.publish(
        subjects::inbound(&ConvId::parse(conv).unwrap()),
        serde_json::to_vec(&inbound).unwrap().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
}

/// Every receipt event in CHAT_MSGS, once at least `expect` are there (or after a timeout).
async fn receipt_events(js: &jetstream::Context, expect: usize) -> Vec<Receipt> {
    let stream = js.get_stream(subjects::STREAM_STAMPED).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut out = Vec::new();
        let n = stream.get_info().await.unwrap().state.last_sequence;
        for seq in 1..=n {
            let raw = stream.get_raw_message(seq).await.unwrap();
            if subjects::is_receipt_subject(&raw.subject) {
                let ServerFrame::Receipt(r) = serde_json::from_slice(&raw.payload).unwrap() else {
                    panic!("not a receipt frame")
                };
                out.push(r);
            }
        }
        if out.len() >= expect || tokio::time::Instant::now() > deadline {
            return out;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn marks(user: &str, delivered: u64, read: u64) -> MemberMarks {
    MemberMarks {
        user: user.into(),
        delivered,
        read,
    }
}

async fn sync(
    client: &async_nats::Client,
    user: &str,
    since: Option<&str>,
    cursors: &[(&str, u64)],
    next: Option<&str>,
    limit: u32,
) -> SyncReply {
    let req = SyncRequest {
        user: user.into(),
        since: since.map(str::to_owned),
        cursors: cursors.iter().map(|(c, s)| (c.to_string(), *s)).collect(),
        next: next.map(str::to_owned),
        limit,
    };
    ask(client, subjects::SYNC_API, &req).await
}

struct SyncPage {
    convs: Vec<ConvState>,
    messages: Vec<(String, u64)>,
    next: Option<String>,
    token: Option<String>,
}

fn sync_page(reply: SyncReply) -> SyncPage {
    let SyncReply::Page {
        convs,
        messages,
        more,
        next,
        token,
    } = reply
    else {
        panic!("expected a sync page, got {reply:?}")
    };
    assert_eq!(more, next.is_some(), "`next` comes exactly with `more`");
    assert_eq!(
        more,
        token.is_none(),
        "`token` comes exactly on the last page"
    );
    SyncPage {
        convs,
        messages: messages.into_iter().map(|m| (m.conv, m.seq)).collect(),
        next,
        token,
    }
}

fn in_conv(conv: &str, seqs: std::ops::RangeInclusive<u64>) -> Vec<(String, u64)> {
    seqs.map(|s| (conv.to_owned(), s)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_ranges_fill_exactly_a_gap() {
    let (nats, client, js) = setup().await;
    let seq = Sequencer::spawn(&nats, "s1");
    for i in 1..=10 {
        send(&js, "dm~alice~bob", "alice", &format!("m{i}"), "x").await;
    }
    assert_eq!(stamped(&js, 10).await.len(), 10);
    let conv = "dm~alice~bob";
    let range = |after, before, limit| history_range(&client, "bob", conv, after, before, limit);
    assert_eq!(
        page_seqs(range(Some(3), Some(7), 50).await),
        (vec![4, 5, 6], false)
    );
    assert_eq!(
        page_seqs(range(Some(5), Some(6), 50).await),
        (vec![], false)
    );
    assert_eq!(
        page_seqs(range(Some(6), Some(2), 50).await),
        (vec![], false)
    );
    assert_eq!(
        page_seqs(range(Some(3), Some(100), 2).await),
        (vec![4, 5], true)
    );
    assert_eq!(
        page_seqs(range(Some(8), Some(100), 5).await),
        (vec![9, 10], false)
    );
    assert_eq!(
        page_seqs(range(None, Some(4), 50).await),
        (vec![1, 2, 3], false)
    );
    seq.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_only_raise_watermarks_and_say_who_read_a_message() {
    let (nats, client, js) = setup().await;
    let seq = Sequencer::spawn(&nats, "s1");
    let conv = "dm~alice~bob";
    for i in 1..=5 {
        send(&js, conv, "alice", &format!("m{i}"), "x").await;
    }
    assert_eq!(stamped(&js, 5).await.len(), 5);
    receipt(&js, conv, "bob", 3, 0).await;
    receipt(&js, conv, "bob", 3, 2).await;
    // Beyond the newest message: lowered to it.
    receipt(&js, conv, "bob", 99, 0).await;
    // Lower than what is stored, and a repeat: nothing moves, nothing is published.
    receipt(&js, conv, "bob", 1, 1).await;
    receipt(&js, conv, "bob", 5, 2).await;
    // Not a member: refused by the sequencer even if a gateway let it through.
    receipt(&js, conv, "carol", 5, 5).await;
    // Receipts come in order with the conversation's messages: once this send is stamped,
    // everything before it was handled.
    send(&js, conv, "alice", "marker", "x").await;
    assert_eq!(stamped(&js, 6).await.len(), 6);
    let events = receipt_events(&js, 1).await;
    // Bursts may be coalesced: every event moves bob's marks up, never beyond the newest
    // message, and the last is where the receipts lead.
    assert!(!events.is_empty() && events.len() <= 3, "{events:?}");
    assert!(
        events
            .iter()
            .all(|r| r.user == "bob" && r.delivered <= 5 && r.read <= r.delivered)
    );
    assert!(
        events.windows(2).all(
            |w| (w[1].delivered, w[1].read) > (w[0].delivered, w[0].read)
                && w[1].delivered >= w[0].delivered
                && w[1].read >= w[0].read
        ),
        "{events:?}"
    );
    let last = events.last().unwrap();
    assert_eq!((last.delivered, last.read), (5, 2));

    let req = |user: &str, seq| ReceiptsRequest {
        user: user.into(),
        conv: conv.into(),
        seq,
    };
    let reply: ReceiptsReply = ask(&client, subjects::RECEIPTS_API, &req("alice", Some(3))).await;
    assert_eq!(
        reply,
        ReceiptsReply::Marks {
            // Alice's own messages (the marker too) moved her watermarks.
            members: vec![marks("alice", 6, 6), marks("bob", 5, 2)],
            delivered_to: Some(vec!["alice".into(), "bob".into()]),
            read_by: Some(vec!["alice".into()]),
        }
    );
    let reply: ReceiptsReply = ask(&client, subjects::RECEIPTS_API, &req("bob", None)).await;
    assert!(
        matches!(&reply, ReceiptsReply::Marks { delivered_to: None, read_by: None, members } if members.len() == 2),
        "{reply:?}"
    );
    let reply: ReceiptsReply = ask(&client, subjects::RECEIPTS_API, &req("carol", None)).await;
    assert!(
        matches!(&reply, ReceiptsReply::Error(e) if e.code == ErrorCode::NotMember),
        "{reply:?}"
    );
    // Nothing moved after the marker, so nothing more was stamped.
    send(&js, conv, "alice", "marker2", "x").await;
    assert_eq!(stamped(&js, 7).await.len(), 7);
    assert_eq!(receipt_events(&js, 0).await.len(), events.len());
    seq.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_pages_through_changed_conversations_and_resumes_from_its_token() {
    let (nats, client, js) = setup().await;
    let seq = Sequencer::spawn(&nats, "s1");
    let (ab, bc) = ("dm~alice~bob", "dm~bob~carol");
    for i in 1..=30 {
        send(&js, ab, "alice", &format!("a{i}"), "x").await;
    }
    for i in 1..=5 {
        send(&js, bc, "carol", &format!("c{i}"), "x").await;
    }
    assert_eq!(stamped(&js, 35).await.len(), 35);

    // A new device: no token, no cursors. Pages of 20 messages.
    let p1 = sync_page(sync(&client, "bob", None, &[], None, 20).await);
    assert_eq!(p1.messages, in_conv(ab, 1..=20));
    assert_eq!(p1.convs.len(), 1);
    assert_eq!((p1.convs[0].latest, p1.convs[0].unread), (30, 30));
    assert_eq!(
        p1.convs[0].members,
        vec![marks("alice", 30, 30), marks("bob", 0, 0)]
    );
    let next = p1.next.expect("more to come");
    let p2 = sync_page(sync(&client, "bob", None, &[(ab, 20)], Some(&next), 20).await);
    let mut want = in_conv(ab, 21..=30);
    want.extend(in_conv(bc, 1..=5));
    assert_eq!(p2.messages, want);
    assert_eq!(
        p2.convs.iter().map(|c| c.conv.as_str()).collect::<Vec<_>>(),
        vec![ab, bc]
    );
    let token = p2.token.expect("last page carries the token");

    // Nothing changed since: nothing to do.
    let p = sync_page(sync(&client, "bob", Some(&token), &[(ab, 30), (bc, 5)], None, 20).await);
    assert!(p.convs.is_empty() && p.messages.is_empty(), "{:?}", p.convs);
    assert_eq!(p.token.as_deref(), Some(token.as_str()));

    // Bob reads on another device and Alice writes again: one changed conversation.
    receipt(&js, ab, "bob", 30, 25).await;
    send(&js, ab, "alice", "a31", "x").await;
    assert_eq!(stamped(&js, 36).await.len(), 36);
    assert_eq!(receipt_events(&js, 1).await.len(), 1);
    let p = sync_page(sync(&client, "bob", Some(&token), &[(ab, 30), (bc, 5)], None, 20).await);
    assert_eq!(p.messages, in_conv(ab, 31..=31));
    assert_eq!(p.convs.len(), 1);
    assert_eq!((p.convs[0].latest, p.convs[0].unread), (31, 6));
    assert_eq!(
        p.convs[0].members,
        vec![marks("alice", 31, 31), marks("bob", 30, 25)]
    );
    // Carol's view of her own conversation is untouched by all that.
    let c = sync_page(sync(&client, "carol", Some(&token), &[], None, 20).await);
    assert!(c.convs.is_empty(), "{:?}", c.convs);

    for bad in ["garbage", "v1.999999999"] {
        let reply = sync(&client, "bob", Some(bad), &[], None, 20).await;
        assert!(
            matches!(&reply, SyncReply::Error(e) if e.code == ErrorCode::InvalidToken),
            "{bad}: {reply:?}"
        );
    }
    let reply = sync(&client, "bob", None, &[], Some("v1.x"), 20).await;
    assert!(matches!(&reply, SyncReply::Error(e) if e.code == ErrorCode::InvalidToken));
    seq.stop().await;
}

/// `hello` announces `sync_page_max` 1000 and `limit` is honoured up to it, also within one
/// conversation (the store pages at most 500 at a time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_page_carries_up_to_its_limit_of_one_conversation() {
    let (nats, client, js) = setup().await;
    let seq = Sequencer::spawn(&nats, "s1");
    let sends: Vec<(String, String, String)> = (0..1200)
        .map(|i| {
            (
                "dm~alice~bob".to_owned(),
                "alice".to_owned(),
                format!("m{i}"),
            )
        })
        .collect();
    send_pipelined(&js, &sends).await;
    assert_eq!(stamped(&js, 1200).await.len(), 1200);
    for (limit, want, more) in [
        (600, 600, true),
        (1000, 1000, true),
        (5000, 1000, true),
        (7, 7, true),
    ] {
        let page = sync_page(sync(&client, "bob", None, &[], None, limit).await);
        assert_eq!(page.messages.len(), want, "limit {limit}");
        assert_eq!(
            page.messages,
            in_conv("dm~alice~bob", 1..=want as u64),
            "limit {limit}"
        );
        assert_eq!(page.next.is_some(), more, "limit {limit}");
    }
    // The rest on the next page, from the updated cursor.
    let first = sync_page(sync(&client, "bob", None, &[], None, 1000).await);
    let rest = sync(
        &client,
        "bob",
        None,
        &[("dm~alice~bob", 1000)],
        first.next.as_deref(),
        1000,
    )
    .await;
    let rest = sync_page(rest);
    assert_eq!(rest.messages, in_conv("dm~alice~bob", 1001..=1200));
    assert!(rest.next.is_none() && rest.token.is_some());

    // A limit of 0 asks for nothing: refused, never "one item and more to come".
    let SyncReply::Error(e) = sync(&client, "bob", None, &[], None, 0).await else {
        panic!("sync with limit 0 must be refused")
    };
    assert_eq!(e.code, ErrorCode::InvalidFrame);
    let HistoryReply::Error(e) = history_range(&client, "bob", "dm~alice~bob", None, None, 0).await
    else {
        panic!("history with limit 0 must be refused")
    };
    assert_eq!(e.code, ErrorCode::InvalidFrame);
    let reply: ConversationsReply = ask(
        &client,
        subjects::CONVERSATIONS_API,
        &ConversationsRequest {
            user: "bob".into(),
            after: None,
            limit: 0,
            groups_only: false,
        },
    )
    .await;
    let ConversationsReply::Error(e) = reply else {
        panic!("conversations with limit 0 must be refused")
    };
    assert_eq!(e.code, ErrorCode::InvalidFrame);
    seq.stop().await;
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
            format!(
                "chat.inp.{}.{conv}",
                subjects::partition_of(&conv, subjects::DEFAULT_PARTITIONS)
            )
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_balanced_sequencer_processes_share_the_partitions_and_keep_every_order() {
    let (nats, client, js) = setup().await;
    let dir = tempfile::tempdir().unwrap();
    let process = |name: &str| {
        chat_testkit::ChildProcess::spawn(
            std::process::Command::new(env!("CARGO_BIN_EXE_sequencer"))
                .env("CHAT_SEQUENCER_NATS_URL", nats.url())
                .env("CHAT_SEQUENCER_ADMIN_LISTEN", "")
                .env("CHAT_SEQUENCER_STORE_DIR", dir.path().join(name))
                .env("CHAT_SEQUENCER_INSTANCE_ID", name)
                .env("RUST_LOG", "warn"),
        )
        .expect("sequencer binary starts")
    };
    let mut a = process("a");
    let mut b = process("b");
    let convs: Vec<String> = (0..24).map(|i| format!("dm~p{i}~q{i}")).collect();
    let rounds = 20;
    // Pipelined: many messages of each conversation are in CHAT_IN, and so in the owners'
    // hands, at once; sends start while the two are still dividing the partitions.
    let sends: Vec<(String, String, String)> = (0..rounds)
        .flat_map(|r| {
            convs
                .iter()
                .enumerate()
                .map(move |(i, conv)| (conv.clone(), format!("p{i}"), format!("r{r}")))
        })
        .collect();
    send_pipelined(&js, &sends).await;
    let total = sends.len();
    let all = stamped(&js, total).await;
    assert_eq!(all.len(), total, "every message stamped exactly once");
    assert_dense_in_send_order(&all, &sends);
    // Both stores can answer for every conversation (each follows the stamped stream).
    for (i, conv) in convs.iter().enumerate() {
        let user = format!("q{i}");
        let HistoryReply::Page { messages, .. } = history(&client, &user, conv, 0).await else {
            panic!("expected a page")
        };
        assert_eq!(messages.len(), rounds);
    }
    // Once both have heard each other, each owns a share of the partitions.
    let more: Vec<(String, String, String)> = (0..64)
        .map(|i| (format!("dm~x{i}~y{i}"), format!("x{i}"), "m".to_owned()))
        .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut round = 0;
    loop {
        let batch: Vec<(String, String, String)> = more
            .iter()
            .map(|(c, f, _)| (c.clone(), f.clone(), format!("m{round}")))
            .collect();
        send_pipelined(&js, &batch).await;
        round += 1;
        let recent = stamped(&js, total + 64 * round).await;
        let stampers: std::collections::BTreeSet<&str> = recent[recent.len() - 64..]
            .iter()
            .map(|(_, by)| by.as_str())
            .collect();
        if stampers.len() == 2 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the two processes never shared the partitions: {stampers:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
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

/// Receipts published while no sequencer runs are in the owner's hands at once when it starts:
/// a burst of one member's `delivered` and `read` frames costs one stamped receipt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_receipts_is_stamped_once() {
    let (nats, _client, js) = setup().await;
    let conv = "dm~alice~bob";
    let seq = Sequencer::spawn(&nats, "s1");
    for i in 1..=5 {
        send(&js, conv, "alice", &format!("m{i}"), "x").await;
    }
    assert_eq!(stamped(&js, 5).await.len(), 5);
    seq.stop().await;
    for s in 1..=5 {
        receipt(&js, conv, "bob", s, 0).await;
        receipt(&js, conv, "bob", 0, s.min(4)).await;
    }
    let seq = Sequencer::spawn(&nats, "s2");
    let events = receipt_events(&js, 1).await;
    // Give a second (wrong) receipt every chance to show up before looking.
    send(&js, conv, "alice", "after", "x").await;
    assert_eq!(stamped(&js, 6).await.len(), 6);
    let events = if events.len() == 1 {
        receipt_events(&js, 2).await
    } else {
        events
    };
    let bob: Vec<&Receipt> = events.iter().filter(|r| r.user == "bob").collect();
    assert_eq!(
        bob.len(),
        1,
        "one stamped receipt for the burst: {events:?}"
    );
    assert_eq!((bob[0].delivered, bob[0].read), (5, 4));
    seq.stop().await;
}

/// The stamper against a 3-node cluster with R3 streams: there JetStream refuses a second
/// in-flight publish with a check on the same subject, so the stamper keeps one per
/// conversation while many conversations are in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_a_three_node_cluster_with_r3_streams_stamps_stay_dense_and_in_order() {
    let cluster = chat_testkit::NatsCluster::start(3).await;
    let client = cluster.client().await;
    provision_all(
        &client,
        &Overrides {
            num_replicas: Some(3),
            ..Overrides::default()
        },
    )
    .await
    .unwrap();
    let js = jetstream::new(client.clone());
    check_fence(&js).await;
    let dir = tempfile::tempdir().unwrap();
    let stop = CancellationToken::new();
    let task = tokio::spawn(chat_sequencer::run(
        Config {
            nats_url: cluster.url(),
            admin_listen: String::new(),
            store_dir: dir.path().join("store"),
            instance_id: "r3".into(),
            ..Config::default()
        },
        None,
        stop.clone(),
    ));
    // A few hot conversations (many messages each in flight) and many quiet ones.
    let mut sends = Vec::new();
    for r in 0..30 {
        for i in 0..4 {
            sends.push((format!("dm~h{i}~k{i}"), format!("h{i}"), format!("r{r}")));
        }
        sends.push((format!("dm~q{r}~w{r}"), format!("q{r}"), "only".to_owned()));
    }
    send_pipelined(&js, &sends).await;
    let all = stamped(&js, sends.len()).await;
    assert_eq!(all.len(), sends.len(), "every message stamped exactly once");
    assert_dense_in_send_order(&all, &sends);
    let HistoryReply::Page { messages, .. } = history(&client, "k0", "dm~h0~k0", 0).await else {
        panic!("expected a page")
    };
    assert_eq!(messages.len(), 30, "history answers from the store");
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(15), task)
        .await
        .expect("sequencer stops")
        .unwrap()
        .unwrap();
}

/// Growing the partition count under traffic: conversations that move to a new partition
/// keep their dense seqs and their senders' order, and the running sequencer picks the new
/// partitions up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_partition_count_grows_under_traffic_without_breaking_any_order() {
    let nats = NatsServer::start();
    let client = nats.client().await;
    provision_all(
        &client,
        &Overrides {
            partitions: Some(4),
            ..Overrides::default()
        },
    )
    .await
    .unwrap();
    let js = jetstream::new(client.clone());
    let seq = Sequencer::spawn(&nats, "s1");
    let convs: Vec<String> = (0..16).map(|i| format!("dm~a{i}~b{i}")).collect();
    let round = |r: usize| -> Vec<(String, String, String)> {
        convs
            .iter()
            .enumerate()
            .map(|(i, c)| (c.clone(), format!("a{i}"), format!("r{r}")))
            .collect()
    };
    let mut sends = Vec::new();
    for r in 0..10 {
        let batch = round(r);
        send_pipelined(&js, &batch).await;
        sends.extend(batch);
    }
    // The sequencer runs with 4 partitions (it has stamped them).
    assert_eq!(stamped(&js, sends.len()).await.len(), sends.len());
    // Traffic goes on while the count grows from 4 to 8.
    let traffic = {
        let (js, more) = (js.clone(), (10..40).map(round).collect::<Vec<_>>());
        tokio::spawn(async move {
            for batch in more {
                send_pipelined(&js, &batch).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let mut steps = Vec::new();
    chat_protocol::jetstream::repartition(&client, 8, &Overrides::default(), |s| steps.push(s))
        .await
        .unwrap();
    traffic.await.unwrap();
    sends.extend((10..40).flat_map(round));
    assert_eq!(
        chat_protocol::jetstream::live_partitions(&js)
            .await
            .unwrap(),
        8
    );
    let all = stamped(&js, sends.len()).await;
    assert_eq!(
        all.len(),
        sends.len(),
        "every message stamped exactly once: {steps:?}"
    );
    assert_dense_in_send_order(&all, &sends);
    // Some conversations moved: their later stamps are on the new partitions' subjects.
    let moved = convs.iter().any(|c| {
        let conv = ConvId::parse(c).unwrap();
        subjects::partition_of(&conv, 8) >= 4
    });
    assert!(moved, "the test's conversations cover the new partitions");
    for c in &convs {
        let conv = ConvId::parse(c).unwrap();
        let last = chat_protocol::jetstream::last_message(
            &client,
            subjects::STREAM_STAMPED,
            &subjects::stamped_any(&conv),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(
            last.subject,
            subjects::stamped(&conv, subjects::partition_of(&conv, 8))
        );
    }
    // Not a multiple: refused, nothing changed.
    let err = chat_protocol::jetstream::repartition(&client, 12, &Overrides::default(), |_| {})
        .await
        .unwrap_err();
    assert!(err.to_string().contains("multiple"), "{err}");
    assert_eq!(
        chat_protocol::jetstream::live_partitions(&js)
            .await
            .unwrap(),
        8
    );
    seq.stop().await;
}

/// The fence the stamper relies on: a publish that expects a stale head of the conversation
/// is refused, including "expects no message yet" (0) once one exists, and the head is the
/// conversation's last message in any partition (so the fence holds when the partition count
/// changes and a conversation's stamps move to another partition's subject).
async fn check_fence(js: &jetstream::Context) {
    use async_nats::jetstream::context::PublishErrorKind;
    let conv = ConvId::parse("dm~alice~bob").unwrap();
    let publish = |partition: u32, expected: u64| {
        let js = js.clone();
        let subject = subjects::stamped(&conv, partition);
        let any = subjects::stamped_any(&conv);
        async move {
            let mut headers = HeaderMap::new();
            headers.insert(
                "Nats-Expected-Last-Subject-Sequence",
                expected.to_string().as_str(),
            );
            headers.insert("Nats-Expected-Last-Subject-Sequence-Subject", any.as_str());
            match js.publish_with_headers(subject, headers, "x".into()).await {
                Ok(ack) => ack.await,
                Err(e) => Err(e),
            }
        }
    };
    let first = publish(3, 0)
        .await
        .expect("first stamp expects an empty conversation");
    let err = publish(3, 0)
        .await
        .expect_err("a second 'first' stamp is fenced");
    assert_eq!(err.kind(), PublishErrorKind::WrongLastSequence);
    let err = publish(40, 0)
        .await
        .expect_err("a 'first' stamp in another partition is fenced too");
    assert_eq!(err.kind(), PublishErrorKind::WrongLastSequence);
    let second = publish(40, first.sequence)
        .await
        .expect("the current head may stamp, in another partition too");
    let err = publish(3, first.sequence)
        .await
        .expect_err("the old head is fenced in every partition");
    assert_eq!(err.kind(), PublishErrorKind::WrongLastSequence);
    let last = chat_protocol::jetstream::last_message(
        &js.client(),
        subjects::STREAM_STAMPED,
        &subjects::stamped_any(&conv),
    )
    .await
    .unwrap()
    .expect("the conversation has a last message");
    assert_eq!(last.sequence, second.sequence);
    assert_eq!(last.subject, subjects::stamped(&conv, 40));
    let none = chat_protocol::jetstream::last_message(
        &js.client(),
        subjects::STREAM_STAMPED,
        &subjects::stamped_any(&ConvId::parse("dm~else~nobody").unwrap()),
    )
    .await
    .unwrap();
    assert!(none.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_head_cannot_stamp() {
    let (_nats, _client, js) = setup().await;
    check_fence(&js).await;
}

async fn group_op(
    js: &jetstream::Context,
    conv: &str,
    from: &str,
    id: &str,
    op: GroupOp,
    name: Option<&str>,
    members: &[&str],
) {
    let msg = Inbound::Group(InboundGroup {
        conv: conv.into(),
        from: from.into(),
        device: "d1".into(),
        id: id.into(),
        op,
        name: name.map(Into::into),
        members: members.iter().map(|m| (*m).into()).collect(),
    });
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", dedupe_id(conv, from, id).as_str());
    js.publish_with_headers(
        subjects::inbound(&ConvId::parse(conv).unwrap()),
        headers,
        serde_json::to_vec(&msg).unwrap().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
}

/// The next error frame on a user's subject.
async fn refusal(sub: &mut async_nats::Subscriber) -> (ErrorCode, Option<String>) {
    let frame = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .expect("the user is told")
        .unwrap();
    let ServerFrame::Error(e) = serde_json::from_slice(&frame.payload).unwrap() else {
        panic!("expected an error frame")
    };
    (e.code, e.id)
}

async fn group_info(client: &async_nats::Client, conv: &str, user: Option<&str>) -> GroupInfoReply {
    let req = GroupInfoRequest {
        conv: conv.into(),
        user: user.map(Into::into),
        since: None,
    };
    ask(client, subjects::GROUP_INFO_API, &req).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_membership_changes_take_their_place_in_the_order_and_bound_what_members_read() {
    let (nats, client, js) = setup().await;
    let mut bob_inbox = client.subscribe("chat.user.bob").await.unwrap();
    let mut carol_inbox = client.subscribe("chat.user.carol").await.unwrap();
    let mut alice_inbox = client.subscribe("chat.user.alice").await.unwrap();
    client.flush().await.unwrap();
    let seq = Sequencer::spawn(&nats, "s1");
    const G: &str = "g~team";
    group_op(
        &js,
        G,
        "alice",
        "op1",
        GroupOp::Create,
        Some("Team"),
        &["bob"],
    )
    .await;
    send(&js, G, "bob", "b1", "hello team").await;
    group_op(&js, G, "alice", "op2", GroupOp::Add, None, &["carol"]).await;
    send(&js, G, "carol", "c1", "hi, I am new").await;
    group_op(&js, G, "alice", "op3", GroupOp::Remove, None, &["bob"]).await;
    send(&js, G, "alice", "a1", "bob is gone").await;
    // Refused: bob after his removal, carol (not an admin) adding, a second create.
    send(&js, G, "bob", "b2", "wait").await;
    group_op(&js, G, "carol", "op4", GroupOp::Add, None, &["dave"]).await;
    group_op(&js, G, "alice", "op5", GroupOp::Create, Some("Again"), &[]).await;
    // A retried operation is the same event, not a second one.
    group_op(&js, G, "alice", "op2", GroupOp::Add, None, &["carol"]).await;
    send(&js, G, "carol", "c2", "ok").await;

    assert_eq!(
        refusal(&mut bob_inbox).await,
        (ErrorCode::NotMember, Some("b2".into()))
    );
    assert_eq!(
        refusal(&mut carol_inbox).await,
        (ErrorCode::NotAdmin, Some("op4".into()))
    );
    assert_eq!(
        refusal(&mut alice_inbox).await,
        (ErrorCode::AlreadyExists, Some("op5".into()))
    );
    let all: Vec<_> = stamped(&js, 7).await.into_iter().map(|(m, _)| m).collect();
    let order: Vec<(u64, &str, Option<&GroupEvent>)> = all
        .iter()
        .map(|m| (m.seq, m.id.as_str(), m.event.as_ref()))
        .collect();
    let created = GroupEvent::Created {
        name: "Team".into(),
        members: vec!["bob".into()],
    };
    let added = GroupEvent::Added {
        members: vec!["carol".into()],
    };
    let removed = GroupEvent::Removed {
        members: vec!["bob".into()],
    };
    assert_eq!(
        order,
        vec![
            (1, "op1", Some(&created)),
            (2, "b1", None),
            (3, "op2", Some(&added)),
            (4, "c1", None),
            (5, "op3", Some(&removed)),
            (6, "a1", None),
            (7, "c2", None),
        ]
    );
    assert!(all.iter().all(|m| m.conv == G));

    // Carol reads from her joining on, Bob up to his removal, Dave nothing.
    assert_eq!(
        page_seqs(history(&client, "carol", G, 0).await),
        (vec![3, 4, 5, 6, 7], false)
    );
    let newest = history_range(&client, "carol", G, None, None, 200).await;
    assert_eq!(page_seqs(newest), (vec![3, 4, 5, 6, 7], false));
    let older = history_range(&client, "carol", G, None, Some(5), 200).await;
    assert_eq!(page_seqs(older), (vec![3, 4], false));
    assert_eq!(
        page_seqs(history(&client, "bob", G, 0).await),
        (vec![1, 2, 3, 4, 5], false)
    );
    let bob_newest = history_range(&client, "bob", G, None, None, 2).await;
    assert_eq!(page_seqs(bob_newest), (vec![4, 5], true));
    assert_eq!(
        page_seqs(history(&client, "bob", G, 5).await),
        (vec![], false)
    );
    let HistoryReply::Error(e) = history(&client, "dave", G, 0).await else {
        panic!("dave is no member")
    };
    assert_eq!(e.code, ErrorCode::NotMember);

    // Sync: Bob's state stops at his removal; Carol's starts at her joining.
    let bob = sync_page(sync(&client, "bob", None, &[], None, 100).await);
    assert_eq!(bob.messages, in_conv(G, 1..=5));
    assert_eq!(
        (
            bob.convs[0].latest,
            bob.convs[0].left,
            bob.convs[0].member_count
        ),
        (5, Some(5), 2)
    );
    let carol = sync_page(sync(&client, "carol", None, &[], None, 100).await);
    assert_eq!(carol.messages, in_conv(G, 3..=7));
    let state = &carol.convs[0];
    assert_eq!(state.name.as_deref(), Some("Team"));
    assert_eq!((state.latest, state.unread, state.left), (7, 0, None));
    assert_eq!(
        state.members,
        vec![marks("alice", 6, 6), marks("carol", 7, 7)]
    );
    // Bob's next sync from his token lists nothing new, though the group moved on.
    let bob_again = sync_page(sync(&client, "bob", bob.token.as_deref(), &[], None, 100).await);
    assert!(bob_again.convs.is_empty() && bob_again.messages.is_empty());

    // The conversation list and the group's members.
    let ConversationsReply::Page { convs, more, .. } = ask(
        &client,
        subjects::CONVERSATIONS_API,
        &ConversationsRequest {
            user: "alice".into(),
            after: None,
            limit: 10,
            groups_only: false,
        },
    )
    .await
    else {
        panic!("expected a page")
    };
    assert!(!more);
    assert_eq!(convs.len(), 1);
    let info = &convs[0];
    assert_eq!(
        (
            info.name.as_deref(),
            info.member_count,
            info.latest,
            info.unread
        ),
        (Some("Team"), 2, 7, 1)
    );
    assert!(info.admin && info.joined == 1 && info.left.is_none());
    let GroupInfoReply::Group {
        name,
        members,
        seq: at,
    } = group_info(&client, G, None).await
    else {
        panic!("expected the group")
    };
    assert_eq!((name.as_str(), at), ("Team", 7));
    let who: Vec<(&str, bool, u64)> = members
        .iter()
        .map(|m| (m.user.as_str(), m.admin, m.joined))
        .collect();
    assert_eq!(who, vec![("alice", true, 1), ("carol", false, 3)]);
    let GroupInfoReply::Error(e) = group_info(&client, G, Some("bob")).await else {
        panic!("bob is no longer a member")
    };
    assert_eq!(e.code, ErrorCode::NotMember);
    let GroupInfoReply::Error(e) = group_info(&client, "g~nope", None).await else {
        panic!("no such group")
    };
    assert_eq!(e.code, ErrorCode::NotFound);

    // A send to a group that does not exist; demoting the last admin.
    send(&js, "g~nope", "alice", "a2", "anyone?").await;
    assert_eq!(
        refusal(&mut alice_inbox).await,
        (ErrorCode::NotFound, Some("a2".into()))
    );
    group_op(&js, G, "alice", "op6", GroupOp::Demote, None, &["alice"]).await;
    assert_eq!(
        refusal(&mut alice_inbox).await,
        (ErrorCode::LastAdmin, Some("op6".into()))
    );
    // Being added is nothing to read: a new member starts with no unread message.
    group_op(&js, G, "alice", "op7", GroupOp::Add, None, &["dave"]).await;
    assert_eq!(stamped(&js, 8).await.len(), 8);
    let ConversationsReply::Page { convs, .. } = ask(
        &client,
        subjects::CONVERSATIONS_API,
        &ConversationsRequest {
            user: "dave".into(),
            after: None,
            limit: 10,
            groups_only: false,
        },
    )
    .await
    else {
        panic!("expected a page")
    };
    assert_eq!(
        convs
            .iter()
            .map(|c| (c.conv.as_str(), c.joined, c.latest, c.unread))
            .collect::<Vec<_>>(),
        vec![(G, 8, 8, 0)]
    );
    seq.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_holds_1024_members_and_not_one_more() {
    let (nats, client, js) = setup().await;
    let mut owner_inbox = client.subscribe("chat.user.u0000").await.unwrap();
    client.flush().await.unwrap();
    let seq = Sequencer::spawn(&nats, "s1");
    const G: &str = "g~big";
    let users: Vec<String> = (0..1025).map(|i| format!("u{i:04}")).collect();
    let others: Vec<&str> = users[1..1024].iter().map(String::as_str).collect();
    group_op(
        &js,
        G,
        "u0000",
        "create",
        GroupOp::Create,
        Some("Big"),
        &others,
    )
    .await;
    group_op(
        &js,
        G,
        "u0000",
        "add",
        GroupOp::Add,
        None,
        &[users[1024].as_str()],
    )
    .await;
    send(&js, G, "u1023", "m1", "the last one in").await;
    assert_eq!(
        refusal(&mut owner_inbox).await,
        (ErrorCode::GroupFull, Some("add".into()))
    );
    let all = stamped(&js, 2).await;
    assert_eq!(all.len(), 2);
    assert_eq!((all[1].0.seq, all[1].0.from.as_str()), (2, "u1023"));
    let GroupInfoReply::Group { members, .. } = group_info(&client, G, None).await else {
        panic!("expected the group")
    };
    assert_eq!(members.len(), 1024);
    seq.stop().await;

    // A smaller configured cap refuses a create beyond it.
    let small = Sequencer::spawn_with(
        &nats,
        "s2",
        Config {
            group_max_members: 3,
            ..Config::default()
        },
    );
    group_op(
        &js,
        "g~small",
        "u0000",
        "c2",
        GroupOp::Create,
        Some("S"),
        &others[..3],
    )
    .await;
    assert_eq!(
        refusal(&mut owner_inbox).await,
        (ErrorCode::GroupFull, Some("c2".into()))
    );
    small.stop().await;
}
