//! The fan-out worker against a real nats-server.

use std::time::Duration;

use async_nats::jetstream;
use chat_protocol::{
    frames::{Message, ServerFrame},
    ids::ConvId,
    jetstream::{Overrides, provision_all},
    subjects,
};
use chat_testkit::NatsServer;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

fn stamped(seq: u64) -> Vec<u8> {
    serde_json::to_vec(&ServerFrame::Message(Message {
        conv: "dm~alice~bob".into(),
        seq,
        from: "alice".into(),
        id: format!("m{seq}"),
        ts: 1,
        body: format!("body {seq}"),
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_each_stamped_message_unchanged_to_both_members_and_skips_poison() {
    let nats = NatsServer::start();
    let client = nats.client().await;
    provision_all(&client, &Overrides::default()).await.unwrap();
    let mut alice = client.subscribe("chat.user.alice").await.unwrap();
    let mut bob = client.subscribe("chat.user.bob").await.unwrap();
    let mut carol = client.subscribe("chat.user.carol").await.unwrap();
    // Make sure the server registered the subscriptions before anything is pushed.
    let _ = client.request("_CHECK.none", "".into()).await;

    let js = jetstream::new(client.clone());
    let subject = subjects::stamped(&ConvId::parse("dm~alice~bob").unwrap());
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

    for sub in [&mut alice, &mut bob] {
        for seq in [1, 2] {
            let got = tokio::time::timeout(Duration::from_secs(15), sub.next())
                .await
                .expect("pushed in time")
                .unwrap();
            assert_eq!(got.payload.as_ref(), stamped(seq).as_slice());
        }
    }
    // Everything was acked, the poison message included; the non-member got nothing.
    let consumer_name = chat_protocol::jetstream::fanout_consumer(subjects::partition_of(
        &ConvId::parse("dm~alice~bob").unwrap(),
    ));
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
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(15), worker)
        .await
        .expect("worker stops")
        .unwrap()
        .unwrap();
}
