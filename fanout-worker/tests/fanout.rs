//! The fan-out worker against a real nats-server.

use std::time::Duration;

use async_nats::jetstream;
use chat_protocol::{
    api::PushNotification,
    frames::{Message, Receipt, ServerFrame},
    ids::ConvId,
    jetstream::{Overrides, provision_all},
    subjects,
};
use chat_testkit::NatsServer;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

/// The partition of a conversation with the default partition count (what the test kit
/// provisions).
fn part(conv: &ConvId) -> u32 {
    subjects::partition_of(conv, subjects::DEFAULT_PARTITIONS)
}

fn stamped(seq: u64) -> Vec<u8> {
    serde_json::to_vec(&ServerFrame::Message(Message {
        conv: "dm~alice~bob".into(),
        seq,
        from: "alice".into(),
        id: format!("m{seq}"),
        ts: 1,
        body: format!("body {seq}"),
        event: None,
        media: None,
    }))
    .unwrap()
}

/// Subscribes like a gateway holding a device: answers each push that asks for confirmation,
/// and hands the pushes on.
async fn gateway_like(
    client: &async_nats::Client,
    subject: &str,
) -> tokio::sync::mpsc::UnboundedReceiver<async_nats::Message> {
    let mut sub = client.subscribe(subject.to_owned()).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let client = client.clone();
    tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            if let Some(reply) = m.reply.clone() {
                client.publish(reply, "".into()).await.unwrap();
            }
            let _ = tx.send(m);
        }
    });
    rx
}

/// Everything in `CHAT_PUSH`, in order.
async fn push_events(js: &jetstream::Context) -> Vec<PushNotification> {
    let mut stream = js.get_stream(subjects::STREAM_PUSH).await.unwrap();
    let last = stream.info().await.unwrap().state.last_sequence;
    let mut out = Vec::new();
    for seq in 1..=last {
        if let Ok(raw) = stream.direct_get(seq).await {
            out.push(serde_json::from_slice(&raw.payload).unwrap());
        }
    }
    out
}

async fn start_worker(
    nats: &NatsServer,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<anyhow::Result<()>>,
) {
    let stop = CancellationToken::new();
    let config = chat_fanout::Config {
        nats_url: nats.url(),
        admin_listen: String::new(),
        ..Default::default()
    };
    let worker = tokio::spawn(chat_fanout::run(config, None, stop.clone()));
    (stop, worker)
}

async fn publish(js: &jetstream::Context, subject: &str, payload: Vec<u8>) {
    js.publish(subject.to_owned(), payload.into())
        .await
        .unwrap()
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_recipient_gets_one_push_notification_per_message() {
    let nats = NatsServer::start();
    let client = nats.client().await;
    provision_all(&client, &Overrides::default()).await.unwrap();
    // Alice (the sender) is online; Bob has no device connected anywhere.
    let mut alice = gateway_like(&client, "chat.user.alice").await;
    let _ = client.request("_CHECK.none", "".into()).await;
    let js = jetstream::new(client.clone());
    let conv = ConvId::parse("dm~alice~bob").unwrap();
    publish(&js, &subjects::stamped(&conv, part(&conv)), stamped(1)).await;
    // The same message again (as after a worker crash before its ack): no second notification.
    publish(&js, &subjects::stamped(&conv, part(&conv)), stamped(1)).await;
    publish(&js, &subjects::stamped(&conv, part(&conv)), stamped(2)).await;
    let (stop, worker) = start_worker(&nats).await;

    for seq in [1, 1, 2] {
        let got = tokio::time::timeout(Duration::from_secs(15), alice.recv())
            .await
            .expect("pushed in time")
            .unwrap();
        assert_eq!(got.payload.as_ref(), stamped(seq).as_slice());
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let events = loop {
        let events = push_events(&js).await;
        if events.len() >= 2 || tokio::time::Instant::now() > deadline {
            break events;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let expected: Vec<PushNotification> = [1, 2]
        .map(|seq| PushNotification {
            user: "bob".into(),
            conv: "dm~alice~bob".into(),
            seq,
            from: "alice".into(),
            id: format!("m{seq}"),
            ts: 1,
        })
        .into();
    assert_eq!(
        events, expected,
        "one notification per message, for Bob only"
    );
    let info = js
        .get_stream(subjects::STREAM_PUSH)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .clone();
    assert_eq!(info.config.subjects, vec!["chat.push.*".to_string()]);
    stop.cancel();
    worker.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_reach_every_member_without_notifications() {
    let nats = NatsServer::start();
    let client = nats.client().await;
    provision_all(&client, &Overrides::default()).await.unwrap();
    let mut alice = client.subscribe("chat.user.alice").await.unwrap();
    let mut bob = client.subscribe("chat.user.bob").await.unwrap();
    let _ = client.request("_CHECK.none", "".into()).await;
    let js = jetstream::new(client.clone());
    let conv = ConvId::parse("dm~alice~bob").unwrap();
    let receipt = serde_json::to_vec(&ServerFrame::Receipt(Receipt {
        conv: conv.to_string(),
        user: "bob".into(),
        delivered: 4,
        read: 3,
    }))
    .unwrap();
    publish(
        &js,
        &subjects::receipts(&conv, part(&conv)),
        receipt.clone(),
    )
    .await;
    let (stop, worker) = start_worker(&nats).await;
    for sub in [&mut alice, &mut bob] {
        let got = tokio::time::timeout(Duration::from_secs(15), sub.next())
            .await
            .expect("pushed in time")
            .unwrap();
        assert_eq!(got.payload.as_ref(), receipt.as_slice());
        assert!(got.reply.is_none(), "receipts ask for no confirmation");
    }
    assert!(push_events(&js).await.is_empty());
    stop.cancel();
    worker.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_each_stamped_message_unchanged_to_both_members_and_skips_poison() {
    let nats = NatsServer::start();
    let client = nats.client().await;
    provision_all(&client, &Overrides::default()).await.unwrap();
    let mut alice = client.subscribe("chat.user.alice").await.unwrap();
    let mut bob = gateway_like(&client, "chat.user.bob").await;
    let mut carol = client.subscribe("chat.user.carol").await.unwrap();
    // Make sure the server registered the subscriptions before anything is pushed.
    let _ = client.request("_CHECK.none", "".into()).await;

    let js = jetstream::new(client.clone());
    let conv = ConvId::parse("dm~alice~bob").unwrap();
    let subject = subjects::stamped(&conv, part(&conv));
    js.publish(subject.clone(), stamped(1).into())
        .await
        .unwrap()
        .await
        .unwrap();
    // An undecodable message must not block the partition behind it.
    js.publish(subject.clone(), "not a frame".into())
        .await
        .unwrap()
        .await
        .unwrap();
    js.publish(subject.clone(), stamped(2).into())
        .await
        .unwrap()
        .await
        .unwrap();

    let stop = CancellationToken::new();
    let config = chat_fanout::Config {
        nats_url: nats.url(),
        admin_listen: String::new(),
        ..Default::default()
    };
    let worker = tokio::spawn(chat_fanout::run(config, None, stop.clone()));

    for seq in [1, 2] {
        let got = tokio::time::timeout(Duration::from_secs(15), alice.next())
            .await
            .expect("pushed in time")
            .unwrap();
        assert_eq!(got.payload.as_ref(), stamped(seq).as_slice());
        let got = tokio::time::timeout(Duration::from_secs(15), bob.recv())
            .await
            .expect("pushed in time")
            .unwrap();
        assert_eq!(got.payload.as_ref(), stamped(seq).as_slice());
    }
    // Everything was acked, the poison message included; the non-member got nothing.
    let consumer_name =
        chat_protocol::jetstream::fanout_consumer(part(&ConvId::parse("dm~alice~bob").unwrap()));
    let mut consumer: jetstream::consumer::PullConsumer = js
        .get_stream(subjects::STREAM_STAMPED)
        .await
        .unwrap()
        .get_consumer(&consumer_name)
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let info = consumer.info().await.unwrap();
        if info.num_ack_pending == 0 && info.num_pending == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not all acked: {info:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(200), carol.next())
            .await
            .is_err(),
        "a non-member must receive nothing"
    );
    // Bob had a connected device: no offline notification.
    assert_eq!(push_events(&js).await, Vec::<PushNotification>::new());
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(15), worker)
        .await
        .expect("worker stops")
        .unwrap()
        .unwrap();
}
