use super::*;

#[tokio::test(start_paused = true)]
async fn large_group_events_reach_members_from_their_join_on() {
    // Alice is in three groups (two pages): joined g~a at 5, g~b at 1, left g~c at 3.
    let groups = vec![
        group_info("g~a", 5, None),
        group_info("g~b", 1, None),
        group_info("g~c", 1, Some(3)),
    ];
    let mut c = connect_in(config(), 16, HOUR, groups);
    assert!(matches!(c.frame().await, ServerFrame::Hello { .. }));
    assert_eq!(
        c.subscribed(),
        ["g~a", "g~b"],
        "subscribed before hello, not to g~c"
    );
    // Before alice joined: not forwarded. From her join on: forwarded unchanged.
    c.group_push("g~a", &group_message("g~a", 4, "bob", None))
        .await;
    let m5 = group_message("g~a", 5, "bob", None);
    c.group_push("g~a", &m5).await;
    assert_eq!(c.text().await, m5);
    // An event naming alice comes on her own subject, not on the group's: no duplicate.
    let added = group_message(
        "g~b",
        6,
        "bob",
        Some(r#"{"kind":"added","members":["alice","dan"]}"#),
    );
    c.group_push("g~b", &added).await;
    let m7 = group_message("g~b", 7, "bob", None);
    c.group_push("g~b", &m7).await;
    assert_eq!(c.text().await, m7);

    // Alice is removed from g~a: the event arrives on her subject, then nothing more.
    let removed = group_message(
        "g~a",
        8,
        "bob",
        Some(r#"{"kind":"removed","members":["alice"]}"#),
    );
    c.push(&removed, Some("_INBOX.r1")).await;
    assert_eq!(c.text().await, removed);
    c.group_push("g~a", &group_message("g~a", 9, "bob", None))
        .await;
    c.ping_pong().await;
    assert_eq!(
        c.subscribed(),
        ["g~b"],
        "the last member's leave ends the subscription"
    );

    // Added to g~d (on her own subject): subscribed, and its later events reach her.
    let added = group_message(
        "g~d",
        3,
        "bob",
        Some(r#"{"kind":"added","members":["alice"]}"#),
    );
    c.push(&added, None).await;
    assert_eq!(c.text().await, added);
    c.ping_pong().await;
    assert_eq!(c.subscribed(), ["g~b", "g~d"]);
    let m4 = group_message("g~d", 4, "carol", None);
    c.group_push("g~d", &m4).await;
    assert_eq!(c.text().await, m4);
    // She leaves g~b herself.
    let left = group_message("g~b", 8, "alice", Some(r#"{"kind":"left"}"#));
    c.push(&left, None).await;
    assert_eq!(c.text().await, left);
    c.group_push("g~b", &group_message("g~b", 9, "bob", None))
        .await;
    c.ping_pong().await;
    assert_eq!(c.subscribed(), ["g~d"]);
    c.shut_down();
    assert_eq!(c.close_code().await, close::GOING_AWAY);
    timeout(Duration::from_secs(60), c.task)
        .await
        .unwrap()
        .unwrap();
    assert!(
        c.shared.router.groups().is_empty(),
        "closed connections unsubscribe"
    );
}

#[tokio::test(start_paused = true)]
async fn a_group_subscription_is_shared_by_the_gateways_connections() {
    let mut a = connect_in(config(), 16, HOUR, vec![group_info("g~a", 1, None)]);
    a.frame().await;
    // A second connection on the same gateway (shared state), in the same group.
    let (to_server, mut from_server, second) = a.second_device("laptop");
    let _hello = from_server.next().await.unwrap();
    assert_eq!(a.subscribed(), ["g~a"]);
    let m2 = group_message("g~a", 2, "bob", None);
    a.group_push("g~a", &m2).await;
    assert_eq!(a.text().await, m2);
    match from_server.next().await.unwrap() {
        Message::Text(t) => assert_eq!(t.as_str(), m2),
        other => panic!("expected the push, got {other:?}"),
    }
    drop(to_server);
    timeout(Duration::from_secs(60), second)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        a.subscribed(),
        ["g~a"],
        "still held by the first connection"
    );
}
