//! A power loss that takes `CHAT_MSGS` back further than the (fsynced) store: the sequencer
//! restarts against a store that is ahead of the stream, and nothing acked is lost, reordered
//! or given a second seq.
//!
//! The loss is simulated exactly: the server's JetStream directory is copied after a kill (what
//! reached the disk), more messages are stamped and stored, then the server is killed again and
//! its directory replaced by the copy, so both streams lose their tail while the store keeps it.

use std::{path::Path, time::Duration};

use async_nats::{HeaderMap, jetstream};
use chat_protocol::{
    api::{HistoryReply, HistoryRequest, Inbound, InboundMessage, InboundReceipt, dedupe_id},
    frames::ServerFrame,
    ids::ConvId,
    jetstream::{Overrides, provision_all},
    subjects,
};
use chat_sequencer::Config;
use chat_testkit::NatsServer;
use tokio_util::sync::CancellationToken;

const CONV: &str = "dm~alice~bob";

struct Sequencer {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Sequencer {
    fn spawn(nats: &NatsServer, store_dir: &Path, instance: &str) -> Self {
        let config = Config {
            nats_url: nats.url(),
            admin_listen: String::new(),
            store_dir: store_dir.to_path_buf(),
            instance_id: instance.into(),
            ..Config::default()
        };
        let stop = CancellationToken::new();
        let task = tokio::spawn(chat_sequencer::run(config, None, stop.clone()));
        Self { stop, task }
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

/// A client's send, acked once `CHAT_IN` has it (what the gateway acks as "sent").
async fn send(js: &jetstream::Context, id: &str) {
    let msg = Inbound::Send(InboundMessage {
        conv: CONV.into(),
        from: "alice".into(),
        device: "d1".into(),
        id: id.into(),
        body: format!("body of {id}"),
        ts: 0,
        media: None,
    });
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", dedupe_id(CONV, "alice", id).as_str());
    js.publish_with_headers(
        subjects::inbound(&ConvId::parse(CONV).unwrap()),
        headers,
        serde_json::to_vec(&msg).unwrap().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
}

async fn read_receipt(js: &jetstream::Context, seq: u64) {
    let inbound = Inbound::Receipt(InboundReceipt {
        conv: CONV.into(),
        user: "bob".into(),
        device: "d1".into(),
        delivered: seq,
        read: seq,
    });
    js.publish(
        subjects::inbound(&ConvId::parse(CONV).unwrap()),
        serde_json::to_vec(&inbound).unwrap().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
}

/// Bob's history, `(seq, client id)`, once it holds `n` messages.
async fn history(client: &async_nats::Client, n: usize) -> Vec<(u64, String)> {
    let req = HistoryRequest {
        user: "bob".into(),
        conv: CONV.into(),
        before: None,
        after: Some(0),
        limit: 200,
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let reply = client
            .request(
                subjects::HISTORY_API,
                serde_json::to_vec(&req).unwrap().into(),
            )
            .await;
        let page = match reply.map(|r| serde_json::from_slice::<HistoryReply>(&r.payload)) {
            Ok(Ok(HistoryReply::Page { messages, .. })) => messages
                .into_iter()
                .map(|m| (m.seq, m.id))
                .collect::<Vec<_>>(),
            _ => Vec::new(),
        };
        if page.len() >= n {
            return page;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "history never reached {n} messages: {page:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every stamped message of `CHAT_MSGS` in stream order, `(seq, client id)`.
async fn stamped(js: &jetstream::Context) -> Vec<(u64, String)> {
    let stream = js.get_stream(subjects::STREAM_STAMPED).await.unwrap();
    let last = stream.get_info().await.unwrap().state.last_sequence;
    let mut out = Vec::new();
    for seq in 1..=last {
        let raw = stream.get_raw_message(seq).await.unwrap();
        if let Ok(ServerFrame::Message(m)) = serde_json::from_slice(&raw.payload) {
            out.push((m.seq, m.id));
        }
    }
    out
}

fn copy_dir(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(
        status.success(),
        "cp -a {} {}",
        from.display(),
        to.display()
    );
}

fn want(ids: std::ops::RangeInclusive<u64>) -> Vec<(u64, String)> {
    ids.map(|i| (i, format!("m{i}"))).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_ahead_of_the_stream_after_a_power_loss_puts_the_lost_tail_back() {
    let mut nats = NatsServer::start();
    let client = nats.client().await;
    provision_all(&client, &Overrides::default()).await.unwrap();
    let js = jetstream::new(client.clone());
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let on_disk = dir.path().join("js-on-disk");

    let seq = Sequencer::spawn(&nats, &store, "s1");
    for i in 1..=3 {
        send(&js, &format!("m{i}")).await;
    }
    assert_eq!(history(&client, 3).await, want(1..=3));
    seq.stop().await;
    drop((js, client));

    // What JetStream has on disk now is all it will have after the power loss.
    nats.kill();
    copy_dir(&nats.store_dir(), &on_disk);
    nats.restart();
    let client = nats.client().await;
    let js = jetstream::new(client.clone());
    let seq = Sequencer::spawn(&nats, &store, "s2");
    send(&js, "m4").await;
    read_receipt(&js, 4).await;
    send(&js, "m5").await;
    // Stamped, stored, and so shown on some device already.
    assert_eq!(history(&client, 5).await, want(1..=5));
    seq.stop().await;
    drop((js, client));

    // The power loss: JetStream's unsynced tail (m4, the receipt, m5, and their inputs) is gone;
    // the store, which fsyncs each commit, still has them.
    nats.kill();
    copy_dir(&on_disk, &nats.store_dir());
    nats.restart();
    let client = nats.client().await;
    let js = jetstream::new(client.clone());
    assert_eq!(stamped(&js).await, want(1..=3), "the stream lost its tail");

    let seq = Sequencer::spawn(&nats, &store, "s3");
    send(&js, "m6").await;
    // The device that showed m4 and m5 still sees them at their seqs, and m6 comes after.
    assert_eq!(history(&client, 6).await, want(1..=6));
    // The record agrees: every message once, dense, in send order.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let all = stamped(&js).await;
        if all.len() >= 6 || tokio::time::Instant::now() > deadline {
            assert_eq!(all, want(1..=6));
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    seq.stop().await;
}

/// One send, `Err` when it was not acked (the server was down): the client retries it with the
/// same client id.
async fn try_send(js: &jetstream::Context, id: &str) -> Result<(), String> {
    let msg = Inbound::Send(InboundMessage {
        conv: CONV.into(),
        from: "alice".into(),
        device: "d1".into(),
        id: id.into(),
        body: format!("body of {id}"),
        ts: 0,
        media: None,
    });
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", dedupe_id(CONV, "alice", id).as_str());
    js.publish_with_headers(
        subjects::inbound(&ConvId::parse(CONV).unwrap()),
        headers,
        serde_json::to_vec(&msg).unwrap().into(),
    )
    .await
    .map_err(|e| e.to_string())?
    .await
    .map_err(|e| e.to_string())?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_sync_interval_always_a_sigkilled_server_under_load_keeps_every_acked_message() {
    use std::sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    };
    const N: usize = 60;
    let mut nats = NatsServer::start_with_config("jetstream {\n  sync_interval: always\n}\n");
    let client = nats.client().await;
    provision_all(&client, &Overrides::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let seq = Sequencer::spawn(&nats, &dir.path().join("store"), "s1");

    let acked = Arc::new(AtomicUsize::new(0));
    let sender = {
        let (js, acked) = (jetstream::new(client.clone()), acked.clone());
        tokio::spawn(async move {
            for i in 1..=N {
                let id = format!("m{i}");
                while try_send(&js, &id).await.is_err() {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                acked.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while acked.load(Ordering::SeqCst) < N / 3 {
        assert!(tokio::time::Instant::now() < deadline, "sends are acked");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // SIGKILL in the middle of the sends, then the same server (same store directory) again.
    nats.restart();
    tokio::time::timeout(Duration::from_secs(120), sender)
        .await
        .expect("every send is acked in the end")
        .unwrap();
    let client = nats.client().await;
    // Every acked message once, dense, in the order sent.
    assert_eq!(history(&client, N).await, want(1..=N as u64));
    seq.stop().await;
}
