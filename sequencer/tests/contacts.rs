//! `chat.api.contacts` against a real nats-server and the sequencer's real store: who shares a
//! conversation with whom, as the presence service's privacy rule needs it.

use std::time::Duration;

use async_nats::{HeaderMap, jetstream};
use chat_protocol::{
    api::{
        CONTACTS_MAX, ContactsReply, ContactsRequest, Inbound, InboundGroup, InboundMessage,
        dedupe_id,
    },
    frames::{ErrorCode, GroupOp},
    ids::ConvId,
    jetstream::{Overrides, provision_all},
    subjects,
};
use chat_sequencer::Config;
use chat_testkit::NatsServer;
use tokio_util::sync::CancellationToken;

async fn publish(js: &jetstream::Context, conv: &str, from: &str, id: &str, msg: &Inbound) {
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", dedupe_id(conv, from, id).as_str());
    js.publish_with_headers(
        subjects::inbound(&ConvId::parse(conv).unwrap()),
        headers,
        serde_json::to_vec(msg).unwrap().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
}

async fn send(js: &jetstream::Context, conv: &str, from: &str, id: &str) {
    let msg = Inbound::Send(InboundMessage {
        conv: conv.into(),
        from: from.into(),
        device: "d1".into(),
        id: id.into(),
        body: "hi".into(),
        ts: 0,
        media: None,
    });
    publish(js, conv, from, id, &msg).await;
}

async fn group(
    js: &jetstream::Context,
    conv: &str,
    from: &str,
    id: &str,
    op: GroupOp,
    who: &[&str],
) {
    let msg = Inbound::Group(InboundGroup {
        conv: conv.into(),
        from: from.into(),
        device: "d1".into(),
        id: id.into(),
        op,
        name: (op == GroupOp::Create).then(|| "Club".to_owned()),
        members: who.iter().map(|m| (*m).into()).collect(),
    });
    publish(js, conv, from, id, &msg).await;
}

async fn contacts(client: &async_nats::Client, user: &str, users: &[&str]) -> ContactsReply {
    let req = ContactsRequest {
        user: user.into(),
        users: users.iter().map(|u| (*u).into()).collect(),
    };
    // Until the sequencer's responders are up, the server answers "no responders".
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let asked = client.request(
            subjects::CONTACTS_API,
            serde_json::to_vec(&req).unwrap().into(),
        );
        match tokio::time::timeout(Duration::from_secs(10), asked).await {
            Ok(Ok(reply)) => return serde_json::from_slice(&reply.payload).unwrap(),
            other => assert!(
                tokio::time::Instant::now() < deadline,
                "no answer: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Asks until the answer is `want` (the store applies stamped messages asynchronously), and
/// returns the last answer.
async fn contacts_until(
    client: &async_nats::Client,
    user: &str,
    users: &[&str],
    want: &[&str],
) -> ContactsReply {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let reply = contacts(client, user, users).await;
        let done = matches!(&reply, ContactsReply::Contacts { users } if users == want);
        if done || tokio::time::Instant::now() > deadline {
            return reply;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn contacts_of(users: &[&str]) -> ContactsReply {
    ContactsReply::Contacts {
        users: users.iter().map(|u| (*u).into()).collect(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contacts_are_one_to_one_partners_and_current_group_members_only() {
    let nats = NatsServer::start();
    let client = nats.client().await;
    provision_all(&client, &Overrides::default()).await.unwrap();
    let js = jetstream::new(client.clone());
    let dir = tempfile::tempdir().unwrap();
    let stop = CancellationToken::new();
    let config = Config {
        nats_url: nats.url(),
        admin_listen: String::new(),
        store_dir: dir.path().join("store"),
        instance_id: "s1".into(),
        ..Config::default()
    };
    let task = tokio::spawn(chat_sequencer::run(config, None, stop.clone()));

    send(&js, "dm~alice~bob", "alice", "m1").await;
    group(
        &js,
        "g~club",
        "alice",
        "g1",
        GroupOp::Create,
        &["carol", "dave"],
    )
    .await;
    group(&js, "g~club", "alice", "g2", GroupOp::Remove, &["dave"]).await;
    // A group alice is not in: its members are not her contacts.
    group(&js, "g~other", "frank", "g3", GroupOp::Create, &["gina"]).await;

    let asked = [
        "gina", "bob", "carol", "dave", "eve", "alice", "bob", "frank",
    ];
    let want = ["bob", "carol", "alice"];
    assert_eq!(
        contacts_until(&client, "alice", &asked, &want).await,
        contacts_of(&want),
        "the partner, the current group member and herself; not the removed member or strangers"
    );
    // Symmetric: bob sees alice, and carol sees alice, but bob and carol share nothing.
    assert_eq!(
        contacts(&client, "bob", &["alice", "carol"]).await,
        contacts_of(&["alice"])
    );
    assert_eq!(
        contacts(&client, "carol", &["alice", "bob"]).await,
        contacts_of(&["alice"])
    );
    // dave was removed: alice is no longer his contact.
    assert_eq!(
        contacts(&client, "dave", &["alice", "carol"]).await,
        contacts_of(&[])
    );

    // Bad input is refused with a documented code and harms nothing else.
    let refused = |r: ContactsReply| match r {
        ContactsReply::Error(e) => e.code,
        other => panic!("expected a refusal, got {other:?}"),
    };
    assert_eq!(
        refused(contacts(&client, "alice", &["bob", "x.y"]).await),
        ErrorCode::InvalidId
    );
    assert_eq!(
        refused(contacts(&client, "a*", &["bob"]).await),
        ErrorCode::InvalidId
    );
    let many: Vec<String> = (0..=CONTACTS_MAX).map(|i| format!("u{i}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    assert_eq!(
        refused(contacts(&client, "alice", &many).await),
        ErrorCode::InvalidFrame
    );
    let garbage = client
        .request(subjects::CONTACTS_API, "{nope".into())
        .await
        .unwrap();
    let garbage: ContactsReply = serde_json::from_slice(&garbage.payload).unwrap();
    assert_eq!(refused(garbage), ErrorCode::InvalidFrame);
    assert_eq!(
        contacts(&client, "alice", &["bob"]).await,
        contacts_of(&["bob"])
    );

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(15), task)
        .await
        .expect("sequencer stops")
        .unwrap()
        .unwrap();
}
