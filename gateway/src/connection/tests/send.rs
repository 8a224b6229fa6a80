use super::*;

#[tokio::test(start_paused = true)]
async fn publishes_in_order_and_answers_acks_as_they_come() {
    let mut c = connect(config(), 16, HOUR);
    c.frame().await;
    for id in ["m1", "m2", "m3"] {
        c.send(&send_json(id)).await;
    }
    let mut pending = Vec::new();
    for id in ["m1", "m2", "m3"] {
        let p = c.published().await;
        assert_eq!(p.conv, "dm~alice~bob");
        assert_eq!(p.msg_id, Some(api::dedupe_id("dm~alice~bob", "alice", id)));
        let json: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
        assert_eq!(json["kind"], "send");
        let Ok(Inbound::Send(inbound)) = serde_json::from_slice(&p.payload) else {
            panic!("not a send: {json}");
        };
        assert_eq!(
            (inbound.id.as_str(), inbound.device.as_str()),
            (id, "phone")
        );
        assert_eq!(inbound.from, "alice");
        pending.push(p.ack);
    }
    // Acks complete out of order; each `sent` follows its own ack.
    let m3 = pending.pop().unwrap();
    m3.send(Ok(())).unwrap();
    assert!(matches!(c.frame().await, ServerFrame::Sent { id, .. } if id == "m3"));
    for ack in pending {
        ack.send(Ok(())).unwrap();
    }
    assert!(matches!(c.frame().await, ServerFrame::Sent { id, .. } if id == "m1"));
    assert!(matches!(c.frame().await, ServerFrame::Sent { id, .. } if id == "m2"));
}

/// The sequencer's answer to a send (the sender's own stamped message, or a refusal) can
/// overtake the send's JetStream ack: the client still gets `sent` first, and the
/// conversation's later pushes keep their place behind the held answer.
#[tokio::test(start_paused = true)]
async fn sent_comes_before_what_answers_the_send() {
    let mut c = connect(config(), 16, HOUR);
    c.frame().await;
    c.send(&send_json("m1")).await;
    c.send(&send_json("m2")).await;
    let m1 = c.published().await;
    let m2 = c.published().await;
    let own = r#"{"type":"message","conv":"dm~alice~bob","seq":1,"from":"alice","id":"m1","ts":1,"body":"hi m1"}"#;
    let reply = r#"{"type":"message","conv":"dm~alice~bob","seq":2,"from":"bob","id":"b1","ts":2,"body":"hey"}"#;
    let refusal =
        r#"{"type":"error","code":"not_member","message":"no","id":"m2","conv":"dm~alice~bob"}"#;
    let other = r#"{"type":"message","conv":"dm~alice~carol","seq":7,"from":"carol","id":"c1","ts":3,"body":"yo"}"#;
    c.push(own, None).await;
    c.push(reply, None).await;
    c.push(refusal, None).await;
    c.push(other, None).await;
    // Another conversation is not held up.
    assert!(matches!(c.frame().await, ServerFrame::Message(m) if m.conv == "dm~alice~carol"));
    m2.ack.send(Ok(())).unwrap();
    // m2's `sent` may go, but its refusal waits behind m1's message, which waits for m1.
    assert!(matches!(c.frame().await, ServerFrame::Sent { id, .. } if id == "m2"));
    c.ping_pong().await;
    m1.ack.send(Ok(())).unwrap();
    assert!(matches!(c.frame().await, ServerFrame::Sent { id, .. } if id == "m1"));
    assert!(matches!(c.frame().await, ServerFrame::Message(m) if m.id == "m1"));
    assert!(matches!(c.frame().await, ServerFrame::Message(m) if m.id == "b1"));
    assert!(matches!(c.frame().await, ServerFrame::Error(e) if e.id.as_deref() == Some("m2")));
    // Nothing awaits any more: pushes go straight through.
    c.push(reply, None).await;
    assert!(matches!(c.frame().await, ServerFrame::Message(m) if m.id == "b1"));
}

/// A send whose publish fails releases what was held for it, after its error.
#[tokio::test(start_paused = true)]
async fn a_failed_send_releases_its_held_answer_after_the_error() {
    let mut c = connect(config(), 16, HOUR);
    c.frame().await;
    c.send(&send_json("m1")).await;
    let m1 = c.published().await;
    let own = r#"{"type":"message","conv":"dm~alice~bob","seq":1,"from":"alice","id":"m1","ts":1,"body":"hi m1"}"#;
    c.push(own, None).await;
    c.ping_pong().await;
    m1.ack.send(Err(BackendError::NoResponders)).unwrap();
    let e = c.error().await;
    assert_eq!(
        (e.code, e.id.as_deref()),
        (ErrorCode::Unavailable, Some("m1"))
    );
    assert!(matches!(c.frame().await, ServerFrame::Message(m) if m.id == "m1"));
}

#[tokio::test(start_paused = true)]
async fn media_sends_are_published_only_once_the_media_service_confirmed_them() {
    let mut c = connect(config(), 16, HOUR);
    c.frame().await;
    let media_send = |id: &str, media: &str| {
        format!(
            r#"{{"type":"send","conv":"dm~alice~bob","id":"{id}","body":"","media":{{"id":"{media}","content_type":"image/png","size":5}}}}"#
        )
    };
    for (id, media, code) in [
        ("m1", "missing", ErrorCode::MediaNotFound),
        ("m2", "big", ErrorCode::MediaMismatch),
        ("m3", "down", ErrorCode::Unavailable),
        ("m4", "a.b", ErrorCode::InvalidFrame),
    ] {
        c.send(&media_send(id, media)).await;
        let e = c.error().await;
        assert_eq!((e.code, e.id.as_deref()), (code, Some(id)), "{e:?}");
        assert_eq!(e.conv.as_deref(), Some("dm~alice~bob"));
    }
    c.send(&media_send("m5", "x1")).await;
    // The refused sends published nothing: the first publish is the confirmed one.
    let p = c.published().await;
    let Ok(Inbound::Send(inbound)) = serde_json::from_slice(&p.payload) else {
        panic!("not a send");
    };
    assert_eq!(inbound.id, "m5");
    assert_eq!(inbound.media.as_ref().map(|m| m.id.as_str()), Some("x1"));
    p.ack.send(Ok(())).unwrap();
    assert!(matches!(c.frame().await, ServerFrame::Sent { id, .. } if id == "m5"));
    let asked = c.asked.lock().unwrap().media.clone();
    // The malformed reference never reached the media service.
    assert_eq!(asked.len(), 4);
    assert_eq!(
        (asked[3].user.as_str(), asked[3].id.as_str()),
        ("alice", "m5")
    );
}

#[tokio::test(start_paused = true)]
async fn stops_reading_while_max_inflight_acks_are_outstanding() {
    let mut c = connect(
        Config {
            max_inflight_sends: 2,
            ..config()
        },
        16,
        HOUR,
    );
    c.frame().await;
    for id in ["m1", "m2", "m3"] {
        c.send(&send_json(id)).await;
    }
    c.send(r#"{"type":"ping"}"#).await;
    let m1 = c.published().await;
    let _m2 = c.published().await;
    // The third frame is not even read while two acks are outstanding.
    assert!(
        timeout(Duration::from_secs(1), c.published.recv())
            .await
            .is_err()
    );
    m1.ack.send(Ok(())).unwrap();
    assert!(matches!(c.frame().await, ServerFrame::Sent { id, .. } if id == "m1"));
    let m3 = c.published().await;
    assert_eq!(
        m3.msg_id,
        Some(api::dedupe_id("dm~alice~bob", "alice", "m3"))
    );
    // m2 and m3 outstanding: the ping is still unread until one of them completes.
    assert!(timeout(Duration::from_secs(1), c.frame()).await.is_err());
    m3.ack.send(Ok(())).unwrap();
    assert!(matches!(c.frame().await, ServerFrame::Sent { id, .. } if id == "m3"));
    assert_eq!(c.frame().await, ServerFrame::Pong);
}

#[tokio::test(start_paused = true)]
async fn failed_or_late_acks_answer_unavailable_with_the_id() {
    let mut c = connect(config(), 16, HOUR);
    c.frame().await;
    c.send(&send_json("m1")).await;
    c.published()
        .await
        .ack
        .send(Err(BackendError::NoResponders))
        .unwrap();
    match c.frame().await {
        ServerFrame::Error(e) => {
            assert_eq!(e.code, ErrorCode::Unavailable);
            assert_eq!(e.id.as_deref(), Some("m1"));
        }
        other => panic!("expected unavailable, got {other:?}"),
    }
    c.send(&send_json("m2")).await;
    let _never_acked = c.published().await;
    match c.frame().await {
        ServerFrame::Error(e) => {
            assert_eq!(e.code, ErrorCode::Unavailable);
            assert_eq!(e.id.as_deref(), Some("m2"));
        }
        other => panic!("expected unavailable, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn receipts_are_validated_then_published_without_msg_id() {
    let mut c = connect(config(), 16, HOUR);
    c.frame().await;
    let refused = [
        (
            r#"{"type":"read","conv":"dm~alice~*","seq":3}"#,
            ErrorCode::InvalidId,
            "dm~alice~*",
        ),
        (
            r#"{"type":"delivered","conv":"dm~bob~carol","seq":3}"#,
            ErrorCode::NotMember,
            "dm~bob~carol",
        ),
        (
            r#"{"type":"read","conv":"dm~alice~bob","seq":0}"#,
            ErrorCode::InvalidFrame,
            "dm~alice~bob",
        ),
    ];
    for (json, code, conv) in refused {
        c.send(json).await;
        let e = c.error().await;
        assert_eq!((e.code, e.conv.as_deref()), (code, Some(conv)), "{json}");
        assert_eq!((e.id, e.req), (None, None));
    }
    c.send(r#"{"type":"read","conv":"dm~alice~bob","seq":7}"#)
        .await;
    c.send(r#"{"type":"delivered","conv":"dm~alice~bob","seq":9}"#)
        .await;
    let read = c.published().await;
    let delivered = c.published().await;
    assert_eq!(
        (read.conv.as_str(), read.msg_id.as_deref()),
        ("dm~alice~bob", None)
    );
    assert_eq!(delivered.msg_id, None);
    let expected = |delivered, read| InboundReceipt {
        conv: "dm~alice~bob".into(),
        user: "alice".into(),
        device: "phone".into(),
        delivered,
        read,
    };
    assert_eq!(receipt_of(&read), expected(7, 7));
    assert_eq!(receipt_of(&delivered), expected(9, 0));
    // A stored receipt is not answered; one JetStream did not store is `unavailable`.
    read.ack.send(Ok(())).unwrap();
    delivered.ack.send(Err(BackendError::NoResponders)).unwrap();
    let e = c.error().await;
    assert_eq!(e.code, ErrorCode::Unavailable);
    assert_eq!(e.conv.as_deref(), Some("dm~alice~bob"));
    c.ping_pong().await;
    assert!(
        c.published.try_recv().is_err(),
        "refused receipts were not published"
    );
}

#[tokio::test(start_paused = true)]
async fn receipt_rate_is_limited_apart_from_sends() {
    let mut c = connect(
        Config {
            receipts_per_second: 1,
            receipt_burst: 2,
            sends_per_second: 1,
            send_burst: 1,
            ..config()
        },
        16,
        HOUR,
    );
    c.frame().await;
    for seq in 1..=3 {
        c.send(&format!(
            r#"{{"type":"read","conv":"dm~alice~bob","seq":{seq}}}"#
        ))
        .await;
    }
    let e = c.error().await;
    assert_eq!(e.code, ErrorCode::RateLimited);
    assert_eq!(e.conv.as_deref(), Some("dm~alice~bob"));
    let retry = e.retry_after_ms.expect("retry_after_ms");
    assert!((1..=1000).contains(&retry), "{retry}");
    for seq in 1..=2 {
        let p = c.published().await;
        assert_eq!(receipt_of(&p).read, seq);
        p.ack.send(Ok(())).unwrap();
    }
    // Receipts did not use up the send budget.
    c.send(&send_json("m1")).await;
    let m1 = c.published().await;
    assert!(m1.msg_id.is_some());
}

#[tokio::test(start_paused = true)]
async fn group_frames_are_validated_then_published_like_sends() {
    let mut c = connect(config(), 16, HOUR);
    c.frame().await;
    let long = "n".repeat(api::GROUP_NAME_MAX_BYTES + 1);
    let refused = [
        (
            r#"{"type":"group","op":"create","conv":"dm~alice~bob","id":"g1","name":"x"}"#
                .to_owned(),
            ErrorCode::InvalidId,
        ),
        (
            r#"{"type":"group","op":"create","conv":"g~t.x","id":"g1","name":"x"}"#.to_owned(),
            ErrorCode::InvalidId,
        ),
        (
            r#"{"type":"group","op":"create","conv":"g~t","id":"g 1","name":"x"}"#.to_owned(),
            ErrorCode::InvalidId,
        ),
        (
            r#"{"type":"group","op":"create","conv":"g~t","id":"g1"}"#.to_owned(),
            ErrorCode::InvalidFrame,
        ),
        (
            format!(r#"{{"type":"group","op":"create","conv":"g~t","id":"g1","name":"{long}"}}"#),
            ErrorCode::InvalidFrame,
        ),
        (
            r#"{"type":"group","op":"add","conv":"g~t","id":"g1"}"#.to_owned(),
            ErrorCode::InvalidFrame,
        ),
        (
            r#"{"type":"group","op":"add","conv":"g~t","id":"g1","members":["bob","c*"]}"#
                .to_owned(),
            ErrorCode::InvalidId,
        ),
        (
            r#"{"type":"group","op":"leave","conv":"g~t","id":"g1","members":["bob"]}"#.to_owned(),
            ErrorCode::InvalidFrame,
        ),
        (
            r#"{"type":"group","op":"remove","conv":"g~t","id":"g1","name":"x","members":["bob"]}"#
                .to_owned(),
            ErrorCode::InvalidFrame,
        ),
    ];
    for (json, code) in &refused {
        c.send(json).await;
        let e = c.error().await;
        assert_eq!(e.code, *code, "{json}");
        assert_eq!(e.id.as_deref().map(|i| !i.is_empty()), Some(true), "{json}");
        assert!(e.conv.is_some(), "{json}");
    }
    c.send(
        r#"{"type":"group","op":"create","conv":"g~t","id":"g1","name":"Team","members":["bob"]}"#,
    )
    .await;
    c.send(r#"{"type":"group","op":"leave","conv":"g~t","id":"g2"}"#)
        .await;
    let create = c.published().await;
    assert_eq!(create.conv, "g~t");
    assert_eq!(create.msg_id, Some(api::dedupe_id("g~t", "alice", "g1")));
    let Ok(Inbound::Group(group)) = serde_json::from_slice(&create.payload) else {
        panic!("not a group frame: {:?}", create.payload);
    };
    assert_eq!(
        group,
        InboundGroup {
            conv: "g~t".into(),
            from: "alice".into(),
            device: "phone".into(),
            id: "g1".into(),
            op: GroupOp::Create,
            name: Some("Team".into()),
            members: vec!["bob".into()],
        }
    );
    create.ack.send(Ok(())).unwrap();
    assert!(
        matches!(c.frame().await, ServerFrame::Sent { id, conv, .. } if id == "g1" && conv == "g~t")
    );
    let leave = c.published().await;
    leave.ack.send(Err(BackendError::NoResponders)).unwrap();
    let e = c.error().await;
    assert_eq!(
        (e.code, e.id.as_deref()),
        (ErrorCode::Unavailable, Some("g2"))
    );
    assert!(
        c.published.try_recv().is_err(),
        "refused frames were not published"
    );
}

#[tokio::test(start_paused = true)]
async fn group_frames_share_the_send_rate() {
    let mut c = connect(
        Config {
            sends_per_second: 1,
            send_burst: 1,
            ..config()
        },
        16,
        HOUR,
    );
    c.frame().await;
    c.send(&send_json("m1")).await;
    c.send(r#"{"type":"group","op":"rename","conv":"g~t","id":"g1","name":"x"}"#)
        .await;
    let e = c.error().await;
    assert_eq!(
        (e.code, e.id.as_deref()),
        (ErrorCode::RateLimited, Some("g1"))
    );
    assert!(e.retry_after_ms.is_some());
}
