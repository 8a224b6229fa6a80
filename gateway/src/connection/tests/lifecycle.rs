use super::*;

#[tokio::test(start_paused = true)]
async fn hello_first_then_pong_and_pushes_unchanged() {
    let mut cfg = config();
    cfg.abuse.groups_per_hour = 7;
    cfg.abuse.group_members_per_minute = 300;
    cfg.abuse.new_conversations_per_minute = 4;
    let mut c = connect(cfg, 16, HOUR);
    match c.frame().await {
        ServerFrame::Hello {
            user,
            device,
            limits,
            ..
        } => {
            assert_eq!((user.as_str(), device.as_str()), ("alice", "phone"));
            assert_eq!(limits.history_page_max, api::HISTORY_PAGE_MAX);
            assert_eq!(limits.sync_page_max, api::SYNC_PAGE_MAX);
            assert_eq!(
                (limits.receipts_per_second, limits.receipt_burst),
                (50, 100)
            );
            // The abuse budgets, as configured, so a client can pace itself.
            assert_eq!(
                (
                    limits.groups_per_hour,
                    limits.group_members_per_minute,
                    limits.new_conversations_per_minute
                ),
                (7, 300, 4)
            );
        }
        other => panic!("expected hello, got {other:?}"),
    }
    c.ping_pong().await;
    let message = r#"{"type":"message","conv":"dm~alice~bob","seq":1,"from":"bob","id":"x","ts":1,"body":"yo"}"#;
    let receipt = r#"{"type":"receipt","conv":"dm~alice~bob","user":"bob","delivered":1,"read":1}"#;
    for push in [message, receipt] {
        c.push(push, None).await;
        match c.next_message().await {
            Message::Text(t) => assert_eq!(t.as_str(), push),
            other => panic!("expected the push, got {other:?}"),
        }
    }
    // Nothing asked for a confirmation, so none was sent.
    assert!(c.confirmed.try_recv().is_err());
}

#[tokio::test(start_paused = true)]
async fn pushes_with_a_reply_are_confirmed_once_queued() {
    let mut c = connect(config(), 16, HOUR);
    c.frame().await;
    let message = r#"{"type":"message","conv":"dm~alice~bob","seq":2,"from":"bob","id":"y","ts":1,"body":"yo"}"#;
    c.push(message, Some("_INBOX.fanout.1")).await;
    match c.next_message().await {
        Message::Text(t) => assert_eq!(t.as_str(), message),
        other => panic!("expected the push, got {other:?}"),
    }
    let confirmed = timeout(Duration::from_secs(1), c.confirmed.recv())
        .await
        .expect("a confirmation in time")
        .unwrap();
    assert_eq!(confirmed.as_str(), "_INBOX.fanout.1");
    c.push(message, None).await;
    c.next_message().await;
    c.ping_pong().await;
    assert!(
        c.confirmed.try_recv().is_err(),
        "one confirmation per request"
    );
}

#[tokio::test(start_paused = true)]
async fn stalled_acks_do_not_count_as_client_silence() {
    let mut c = connect(
        Config {
            max_inflight_sends: 1,
            heartbeat_interval_ms: 1000,
            heartbeat_timeout_ms: 3000,
            publish_timeout_ms: 5000,
            ..config()
        },
        16,
        HOUR,
    );
    c.frame().await;
    c.send(&send_json("m1")).await;
    let _never_acked = c.published().await;
    // The client answers every ping, but its pongs stay unread until m1 times out.
    let mut answered_after_timeout = 0;
    while answered_after_timeout < 5 {
        match c.next_message().await {
            Message::Ping(_) => {
                c.to_server
                    .send(Ok(Message::Pong(Bytes::new())))
                    .await
                    .unwrap();
            }
            Message::Text(t) => {
                let frame: ServerFrame = serde_json::from_str(&t).unwrap();
                assert!(
                    matches!(&frame, ServerFrame::Error(e) if e.code == ErrorCode::Unavailable),
                    "{frame:?}"
                );
                answered_after_timeout = 1;
                continue;
            }
            other => panic!("unexpected {other:?}"),
        }
        if answered_after_timeout > 0 {
            answered_after_timeout += 1;
        }
    }
    assert!(!c.task.is_finished());
}

#[tokio::test(start_paused = true)]
async fn far_future_token_expiry_is_fine() {
    let mut c = connect(config(), 16, Duration::from_secs(86_400 * 365 * 30));
    c.frame().await;
    c.send(r#"{"type":"ping"}"#).await;
    assert_eq!(c.frame().await, ServerFrame::Pong);
}

#[tokio::test(start_paused = true)]
async fn silent_client_is_pinged_then_closed_with_4000() {
    let mut c = connect(
        Config {
            heartbeat_interval_ms: 1000,
            heartbeat_timeout_ms: 3000,
            ..config()
        },
        16,
        HOUR,
    );
    let start = Instant::now();
    c.frame().await;
    assert!(matches!(c.next_message().await, Message::Ping(_)));
    assert_eq!(c.close_code().await, close::HEARTBEAT_TIMEOUT);
    assert!(start.elapsed() >= Duration::from_secs(3));
}

#[tokio::test(start_paused = true)]
async fn answering_pings_keeps_the_connection() {
    let mut c = connect(
        Config {
            heartbeat_interval_ms: 1000,
            heartbeat_timeout_ms: 3000,
            ..config()
        },
        16,
        HOUR,
    );
    c.frame().await;
    for _ in 0..10 {
        assert!(matches!(c.next_message().await, Message::Ping(_)));
        c.to_server
            .send(Ok(Message::Pong(Bytes::new())))
            .await
            .unwrap();
    }
    assert!(!c.task.is_finished());
}

#[tokio::test(start_paused = true)]
async fn full_queue_closes_with_4001() {
    let mut c = connect(
        Config {
            outgoing_queue: 2,
            ..config()
        },
        0,
        HOUR,
    );
    // The client reads nothing while pushes keep coming, each asking for a confirmation.
    for i in 0..20 {
        let frame = format!(r#"{{"type":"pong","n":{i}}}"#);
        c.push(&frame, Some(&format!("_INBOX.r{i}"))).await;
    }
    assert_eq!(c.close_code().await, close::SLOW_CONSUMER);
    timeout(Duration::from_secs(60), c.task)
        .await
        .unwrap()
        .unwrap();
    // Only the pushes that made it into the queue were confirmed: the one that found it
    // full, and every later one, were not.
    let mut confirmed = Vec::new();
    while let Ok(reply) = c.confirmed.try_recv() {
        confirmed.push(reply.to_string());
    }
    assert!(
        !confirmed.is_empty() && confirmed.len() < 20,
        "{confirmed:?}"
    );
    let expected: Vec<String> = (0..confirmed.len())
        .map(|i| format!("_INBOX.r{i}"))
        .collect();
    assert_eq!(confirmed, expected);
}

#[tokio::test(start_paused = true)]
async fn expired_token_closes_with_4002() {
    let mut c = connect(config(), 16, Duration::from_secs(5));
    c.frame().await;
    let start = Instant::now();
    assert_eq!(c.close_code().await, close::TOKEN_EXPIRED);
    assert!(start.elapsed() >= Duration::from_secs(5));
}

#[tokio::test(start_paused = true)]
async fn shutdown_answers_inflight_sends_then_closes_1001() {
    let mut c = connect(config(), 16, HOUR);
    c.frame().await;
    c.send(&send_json("m1")).await;
    let m1 = c.published().await;
    c.shut_down();
    tokio::task::yield_now().await;
    m1.ack.send(Ok(())).unwrap();
    assert!(matches!(c.frame().await, ServerFrame::Sent { id, .. } if id == "m1"));
    assert_eq!(c.close_code().await, close::GOING_AWAY);
}

#[tokio::test(start_paused = true)]
async fn oversized_message_closes_with_1009() {
    let mut c = connect(config(), 16, HOUR);
    c.frame().await;
    let too_long =
        tungstenite::Error::Capacity(tungstenite::error::CapacityError::MessageTooLong {
            size: 1 << 20,
            max_size: 1 << 17,
        });
    c.to_server
        .send(Err(axum::Error::new(too_long)))
        .await
        .unwrap();
    assert_eq!(c.close_code().await, close::MESSAGE_TOO_BIG);
}

#[tokio::test(start_paused = true)]
async fn client_close_ends_the_connection() {
    let mut c = connect(config(), 16, HOUR);
    c.frame().await;
    c.to_server.send(Ok(Message::Close(None))).await.unwrap();
    timeout(Duration::from_secs(60), c.task)
        .await
        .unwrap()
        .unwrap();
}

/// What an idle connection's task holds: its future's state (the loop, its timer, the socket
/// inline). Measured with the test's socket and corrected to axum's `WebSocket`, the type the
/// gateway serves. The task adds a header of about 100 bytes; the socket's buffers, the outbox
/// and the routing entry are separate allocations (`BENCHMARKS.md`, "Idle connections").
#[tokio::test]
async fn an_idle_connections_state_is_small() {
    let c = connect(config(), 16, HOUR);
    let shared = c.shared.clone();
    let session = Arc::new(Session {
        user: UserId::parse("alice").unwrap(),
        device: DeviceId::parse("tablet").unwrap(),
        expires_at: Instant::now() + HOUR,
    });
    let (attached, _live) = shared.router.attach(session).unwrap();
    let (sink, _from) = chan::channel(1);
    let (_to, stream) = chan::channel(1);
    let fut = serve(shared, attached, None, Duplex { sink, stream });
    let size = std::mem::size_of_val(&fut) - std::mem::size_of::<Duplex>()
        + std::mem::size_of::<axum::extract::ws::WebSocket>();
    println!(
        "serve future: {size} bytes with axum's WebSocket ({} bytes of it)",
        std::mem::size_of::<axum::extract::ws::WebSocket>()
    );
    assert!(size <= 1536, "the connection's future grew to {size} bytes");
}
