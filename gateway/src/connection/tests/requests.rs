use super::*;

#[tokio::test(start_paused = true)]
async fn history_is_validated_and_clamped() {
    let mut c = connect(config(), 16, HOUR);
    c.frame().await;
    c.send(r#"{"type":"history","req":"r.1","conv":"dm~alice~bob"}"#)
        .await;
    match c.frame().await {
        ServerFrame::Error(e) => {
            assert_eq!(e.code, ErrorCode::InvalidId);
            assert_eq!(e.req.as_deref(), Some("r.1"));
        }
        other => panic!("expected invalid_id, got {other:?}"),
    }
    c.send(r#"{"type":"history","req":"r2","conv":"dm~bob~carol"}"#)
        .await;
    assert!(matches!(c.frame().await, ServerFrame::Error(e) if e.code == ErrorCode::NotMember));
    c.send(r#"{"type":"history","req":"r3","conv":"dm~alice~bob","limit":100000,"before":9}"#)
        .await;
    assert_eq!(
        c.frame().await,
        ServerFrame::History {
            req: "r3".into(),
            conv: "dm~alice~bob".into(),
            messages: vec![],
            more: false
        }
    );
    c.send(r#"{"type":"history","req":"r4","conv":"dm~alice~bob"}"#)
        .await;
    c.frame().await;
    // A range (a gap to fill): both bounds go to the sequencer as given.
    c.send(r#"{"type":"history","req":"r5","conv":"dm~alice~bob","after":3,"before":9,"limit":0}"#)
        .await;
    assert!(matches!(c.frame().await, ServerFrame::History { req, .. } if req == "r5"));
    let seen = c.asked.lock().unwrap().history.clone();
    assert_eq!(seen.len(), 3);
    assert_eq!(
        (seen[0].limit, seen[0].before, seen[0].after),
        (api::HISTORY_PAGE_MAX, Some(9), None)
    );
    assert_eq!(seen[1].limit, DEFAULT_HISTORY_LIMIT);
    assert_eq!(seen[0].user, "alice");
    assert_eq!(
        (seen[2].after, seen[2].before, seen[2].limit),
        (Some(3), Some(9), 1)
    );
}

#[tokio::test(start_paused = true)]
async fn sync_is_validated_clamped_and_answered() {
    let mut c = connect(config(), 16, HOUR);
    c.frame().await;
    c.send(r#"{"type":"sync","req":"s.1"}"#).await;
    let e = c.error().await;
    assert_eq!(
        (e.code, e.req.as_deref()),
        (ErrorCode::InvalidId, Some("s.1"))
    );
    c.send(r#"{"type":"sync","req":"s2","cursors":{"dm~alice~bob":1,"dm~alice~b.ob":2}}"#)
        .await;
    let e = c.error().await;
    assert_eq!(
        (e.code, e.req.as_deref()),
        (ErrorCode::InvalidId, Some("s2"))
    );
    assert_eq!(e.conv.as_deref(), Some("dm~alice~b.ob"));
    assert!(
        c.asked.lock().unwrap().sync.is_empty(),
        "refused before asking"
    );

    c.send(
        r#"{"type":"sync","req":"s4","since":"t0","cursors":{"dm~alice~bob":2},"limit":100000}"#,
    )
    .await;
    assert_eq!(
        c.frame().await,
        ServerFrame::Sync {
            req: "s4".into(),
            convs: vec![synced_state()],
            messages: vec![],
            more: false,
            next: None,
            token: Some("t1".into()),
        }
    );
    c.send(r#"{"type":"sync","req":"s5","next":"bad","limit":0}"#)
        .await;
    let e = c.error().await;
    assert_eq!(
        (e.code, e.req.as_deref()),
        (ErrorCode::InvalidToken, Some("s5"))
    );
    c.send(r#"{"type":"sync","req":"s6"}"#).await;
    assert!(matches!(c.frame().await, ServerFrame::Sync { req, .. } if req == "s6"));

    let seen = c.asked.lock().unwrap().sync.clone();
    assert_eq!(
        seen[0],
        SyncRequest {
            user: "alice".into(),
            since: Some("t0".into()),
            cursors: BTreeMap::from([("dm~alice~bob".into(), 2)]),
            next: None,
            limit: api::SYNC_PAGE_MAX,
        }
    );
    assert_eq!((seen[1].next.as_deref(), seen[1].limit), (Some("bad"), 1));
    assert_eq!(seen[2].limit, api::SYNC_PAGE_DEFAULT);
}

#[tokio::test(start_paused = true)]
async fn receipts_requests_are_validated_and_answered() {
    let mut c = connect(config(), 16, HOUR);
    c.frame().await;
    let refused = [
        (
            r#"{"type":"receipts","req":"","conv":"dm~alice~bob"}"#,
            ErrorCode::InvalidId,
        ),
        (
            r#"{"type":"receipts","req":"q1","conv":"dm~alice"}"#,
            ErrorCode::InvalidId,
        ),
        (
            r#"{"type":"receipts","req":"q2","conv":"dm~bob~carol"}"#,
            ErrorCode::NotMember,
        ),
    ];
    for (json, code) in refused {
        c.send(json).await;
        let e = c.error().await;
        assert_eq!(e.code, code, "{json}");
        assert!(e.req.is_some() && e.conv.is_some(), "{e:?}");
    }
    c.send(r#"{"type":"receipts","req":"q3","conv":"dm~alice~bob","seq":3}"#)
        .await;
    assert_eq!(
        c.frame().await,
        ServerFrame::Receipts {
            req: "q3".into(),
            conv: "dm~alice~bob".into(),
            members: vec![marks("alice", 4, 4), marks("bob", 3, 1)],
            seq: Some(3),
            delivered_to: Some(vec!["alice".into(), "bob".into()]),
            read_by: Some(vec!["alice".into()]),
        }
    );
    c.send(r#"{"type":"receipts","req":"q4","conv":"dm~alice~bob"}"#)
        .await;
    match c.frame().await {
        ServerFrame::Receipts {
            seq,
            delivered_to,
            read_by,
            ..
        } => assert_eq!((seq, delivered_to, read_by), (None, None, None)),
        other => panic!("expected receipts, got {other:?}"),
    }
    c.send(r#"{"type":"receipts","req":"q5","conv":"dm~alice~bob","seq":99}"#)
        .await;
    let e = c.error().await;
    assert_eq!(
        (e.code, e.req.as_deref()),
        (ErrorCode::InvalidFrame, Some("q5"))
    );
    assert_eq!(e.conv.as_deref(), Some("dm~alice~bob"));

    let seen = c.asked.lock().unwrap().receipts.clone();
    assert_eq!(
        seen[0],
        ReceiptsRequest {
            user: "alice".into(),
            conv: "dm~alice~bob".into(),
            seq: Some(3),
        }
    );
    assert_eq!(seen.len(), 3);
}

#[tokio::test(start_paused = true)]
async fn conversations_and_group_info_are_asked_for_the_user() {
    let mut c = connect(config(), 16, HOUR);
    c.frame().await;
    c.send(r#"{"type":"conversations","req":"c1","limit":100000}"#)
        .await;
    assert_eq!(
        c.frame().await,
        ServerFrame::Conversations {
            req: "c1".into(),
            convs: vec![],
            more: false,
            next: None,
        }
    );
    c.send(r#"{"type":"conversations","req":"c2","after":"g~a"}"#)
        .await;
    // The fake has no `g~a`; any answer will do, the request is what matters.
    let _ = timeout(Duration::from_secs(1), c.frame()).await;
    c.send(r#"{"type":"group_info","req":"i1","conv":"g~team"}"#)
        .await;
    match c.frame().await {
        ServerFrame::GroupInfo {
            req,
            conv,
            name,
            members,
            seq,
        } => {
            assert_eq!(
                (req.as_str(), conv.as_str(), name.as_str(), seq),
                ("i1", "g~team", "team", 7)
            );
            assert_eq!(members.len(), 2);
        }
        other => panic!("expected group_info, got {other:?}"),
    }
    c.send(r#"{"type":"group_info","req":"i2","conv":"g~secret"}"#)
        .await;
    let e = c.error().await;
    assert_eq!(
        (e.code, e.req.as_deref(), e.conv.as_deref()),
        (ErrorCode::NotMember, Some("i2"), Some("g~secret"))
    );
    c.send(r#"{"type":"group_info","req":"i3","conv":"dm~alice~bob"}"#)
        .await;
    let e = c.error().await;
    assert_eq!(
        (e.code, e.req.as_deref()),
        (ErrorCode::InvalidId, Some("i3"))
    );
    let asked = c.asked.lock().unwrap();
    // The first one is the connection's own group listing.
    assert!(asked.conversations[0].groups_only);
    assert_eq!(
        asked.conversations[1],
        ConversationsRequest {
            user: "alice".into(),
            after: None,
            limit: api::CONVERSATIONS_PAGE_MAX,
            groups_only: false,
        }
    );
    assert_eq!(
        asked.conversations[2].limit,
        api::CONVERSATIONS_PAGE_DEFAULT
    );
    assert_eq!(asked.conversations[2].after.as_deref(), Some("g~a"));
    assert_eq!(
        asked.group_info[0],
        GroupInfoRequest {
            conv: "g~team".into(),
            user: Some("alice".into()),
            since: None,
        }
    );
}
