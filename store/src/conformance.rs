//! Backend-independent behaviour every [`MessageStore`] must have.
//!
//! Each case is an `async fn` taking a fresh, empty store and panicking on
//! failure. A backend's test suite runs them all, either one test per case
//! (see `store/tests/embedded.rs`) or with [`run_all`]:
//!
//! ```no_run
//! # async fn demo() {
//! // Keep each store's directory alive for the whole run.
//! let dirs = std::sync::Mutex::new(Vec::new());
//! chat_store::conformance::run_all(|| {
//!     let dir = tempfile::tempdir().unwrap();
//!     let store = chat_store::EmbeddedStore::open(dir.path()).unwrap();
//!     dirs.lock().unwrap().push(dir);
//!     async move { store }
//! })
//! .await;
//! # }
//! ```
//!
//! Cases use the conversation ids they need freely, so give each case its own
//! store (or keyspace) rather than sharing one.

use std::future::Future;
use std::sync::Arc;

use crate::{
    Change, ConvSummary, GroupChange, MAX_PAGE_LIMIT, Marks, Member, MessageStore, Page, PageQuery,
    StoreErrorKind, StoredMessage, StoredReceipt, UserConversations,
};

/// Calls `$m!(case, case, ...)` with every conformance case: the one list that each
/// backend's test file expands into one test per case (see `store/tests/embedded.rs`).
#[macro_export]
macro_rules! conformance_cases {
    ($m:ident) => {
        $m!(
            empty_store,
            round_trip_preserves_fields,
            empty_apply_is_noop,
            page_before_boundaries,
            page_after_boundaries,
            page_limit_is_clamped,
            page_unknown_conversation,
            pages_cross_partition_boundaries,
            idempotent_reappend,
            conflicting_append_is_rejected_atomically,
            conflict_within_batch_is_rejected,
            seq_zero_is_invalid,
            seq_for_client_id,
            client_id_keeps_first_seq,
            latest_seq_tracks_max,
            applied_stream_seq_is_monotonic,
            conversations_do_not_interleave,
            index_keys_are_unambiguous,
            concurrent_appends,
            sender_watermarks_raised_by_own_message,
            receipt_watermarks_only_grow,
            receipts_converge_in_any_order,
            watermarks_sorted_and_isolated_per_conversation,
            invalid_receipt_is_rejected,
            user_index_positions_are_max,
            user_index_touches_only_members,
            user_conversations_since_filters,
            group_membership_follows_events,
            group_changes_apply_once,
            group_index_follows_conversation_until_leave,
            user_conversations_from_conv_is_inclusive,
            user_conversations_paging_visits_each_once,
            user_conversations_limit_is_clamped,
            user_index_prefix_ids_do_not_bleed,
            user_conversations_reports_applied,
            conflict_writes_no_receipts_or_index,
            apply_through_only,
            concurrent_receipts_converge,
            media_round_trips,
        );
    };
}

/// Runs every conformance case, each against a fresh store from `make`.
pub async fn run_all<S, F, Fut>(make: F)
where
    S: MessageStore,
    F: Fn() -> Fut,
    Fut: Future<Output = S>,
{
    empty_store(make().await).await;
    round_trip_preserves_fields(make().await).await;
    empty_apply_is_noop(make().await).await;
    page_before_boundaries(make().await).await;
    page_after_boundaries(make().await).await;
    page_limit_is_clamped(make().await).await;
    page_unknown_conversation(make().await).await;
    pages_cross_partition_boundaries(make().await).await;
    idempotent_reappend(make().await).await;
    conflicting_append_is_rejected_atomically(make().await).await;
    conflict_within_batch_is_rejected(make().await).await;
    seq_zero_is_invalid(make().await).await;
    seq_for_client_id(make().await).await;
    client_id_keeps_first_seq(make().await).await;
    latest_seq_tracks_max(make().await).await;
    applied_stream_seq_is_monotonic(make().await).await;
    conversations_do_not_interleave(make().await).await;
    index_keys_are_unambiguous(make().await).await;
    concurrent_appends(make().await).await;
    sender_watermarks_raised_by_own_message(make().await).await;
    receipt_watermarks_only_grow(make().await).await;
    receipts_converge_in_any_order(make().await).await;
    watermarks_sorted_and_isolated_per_conversation(make().await).await;
    invalid_receipt_is_rejected(make().await).await;
    user_index_positions_are_max(make().await).await;
    user_index_touches_only_members(make().await).await;
    user_conversations_since_filters(make().await).await;
    user_conversations_from_conv_is_inclusive(make().await).await;
    user_conversations_paging_visits_each_once(make().await).await;
    user_conversations_limit_is_clamped(make().await).await;
    user_index_prefix_ids_do_not_bleed(make().await).await;
    user_conversations_reports_applied(make().await).await;
    conflict_writes_no_receipts_or_index(make().await).await;
    apply_through_only(make().await).await;
    concurrent_receipts_converge(make().await).await;
    group_membership_follows_events(make().await).await;
    group_changes_apply_once(make().await).await;
    group_index_follows_conversation_until_leave(make().await).await;
    media_round_trips(make().await).await;
}

/// Builds a message with deterministic, seq-derived fields.
pub fn msg(conv: &str, seq: u64, from: &str, client_id: &str, stream_seq: u64) -> StoredMessage {
    StoredMessage {
        conv: conv.to_owned(),
        seq,
        from: from.to_owned(),
        client_id: client_id.to_owned(),
        ts_ms: 1_700_000_000_000 + seq,
        body: format!("body of {conv}/{seq}"),
        stream_seq,
        event: None,
        media: None,
    }
}

/// Messages `first..=last` of `conv` from sender "alice", client ids `c<seq>`,
/// stream seq = `stream_base + seq`.
pub fn range_msgs(conv: &str, first: u64, last: u64, stream_base: u64) -> Vec<StoredMessage> {
    (first..=last)
        .map(|seq| msg(conv, seq, "alice", &format!("c{seq}"), stream_base + seq))
        .collect()
}

/// Wraps messages into changes that touch nobody's conversation index.
pub fn messages(msgs: Vec<StoredMessage>) -> Vec<Change> {
    msgs.into_iter()
        .map(|m| Change::message(m, vec![]))
        .collect()
}

/// Builds a receipt.
pub fn rcpt(conv: &str, user: &str, delivered: u64, read: u64, stream_seq: u64) -> StoredReceipt {
    StoredReceipt {
        conv: conv.to_owned(),
        user: user.to_owned(),
        delivered,
        read,
        stream_seq,
    }
}

/// Builds watermarks as [`MessageStore::watermarks`] lists them.
pub fn marks(user: &str, delivered: u64, read: u64) -> Marks {
    Marks {
        user: user.to_owned(),
        delivered,
        read,
    }
}

fn members(users: &[&str]) -> Vec<String> {
    users.iter().map(|&u| u.to_owned()).collect()
}

fn seqs(page: &Page) -> Vec<u64> {
    page.messages.iter().map(|m| m.seq).collect()
}

async fn page<S: MessageStore>(store: &S, conv: &str, q: PageQuery) -> (Vec<u64>, bool) {
    let page = store.page(conv, q).await.expect("page");
    for m in &page.messages {
        assert_eq!(
            m.conv, conv,
            "page of {conv} returned a message of {}",
            m.conv
        );
    }
    (seqs(&page), page.more)
}

fn before(before: Option<u64>, limit: u32) -> PageQuery {
    PageQuery::Before { before, limit }
}

fn after(after: u64, limit: u32) -> PageQuery {
    PageQuery::After { after, limit }
}

/// A fresh store has nothing in it.
pub async fn empty_store<S: MessageStore>(store: S) {
    assert_eq!(store.latest_seq("c1").await.unwrap(), None);
    assert_eq!(
        store.seq_for_client_id("c1", "alice", "x").await.unwrap(),
        None
    );
    assert_eq!(store.applied_stream_seq().await.unwrap(), 0);
    assert_eq!(page(&store, "c1", before(None, 10)).await, (vec![], false));
    assert_eq!(page(&store, "c1", after(0, 10)).await, (vec![], false));
    assert_eq!(store.watermarks("c1").await.unwrap(), vec![]);
    assert_eq!(
        store
            .user_conversations("alice", 0, None, 10)
            .await
            .unwrap(),
        UserConversations::default()
    );
}

/// Every field of a message comes back exactly as stored.
pub async fn round_trip_preserves_fields<S: MessageStore>(store: S) {
    let odd = StoredMessage {
        conv: "conv_~-9".into(),
        seq: 1,
        from: "u-1_~".into(),
        client_id: "Client-ID_~1".into(),
        ts_ms: u64::MAX,
        body: "héllo \u{1F600} \"quoted\" \\ \n\t\0 {\"json\": true}".into(),
        stream_seq: u64::MAX - 1,
        event: Some(r#"{"kind":"renamed","name":"x\u00e9"}"#.into()),
        media: None,
    };
    let empty = StoredMessage {
        seq: 2,
        client_id: "c2".into(),
        ts_ms: 0,
        body: String::new(),
        stream_seq: 1,
        event: None,
        ..odd.clone()
    };
    let big = StoredMessage {
        seq: 3,
        client_id: "c3".into(),
        body: "x".repeat(256 * 1024),
        stream_seq: 2,
        ..odd.clone()
    };
    let all = vec![odd, empty, big];
    store.apply(messages(all.clone()), None).await.unwrap();
    let got = store.page("conv_~-9", before(None, 10)).await.unwrap();
    assert_eq!(got.messages, all);
    assert!(!got.more);
    let got = store.page("conv_~-9", after(0, 10)).await.unwrap();
    assert_eq!(got.messages, all);
}

/// A message's media reference comes back exactly as stored, through `apply` and `page`;
/// re-applying it is idempotent, and the same seq with other media is a conflict.
pub async fn media_round_trips<S: MessageStore>(store: S) {
    let media = r#"{"id":"m0a1","content_type":"image/png","size":1234,"width":640,"height":480,"thumbnail":"t9"}"#;
    let with_media = StoredMessage {
        body: "caption \u{1F600}".into(),
        media: Some(media.into()),
        ..msg("dm~a~b", 1, "a", "c1", 1)
    };
    let plain = msg("dm~a~b", 2, "b", "c2", 2);
    store
        .apply(messages(vec![with_media.clone(), plain.clone()]), None)
        .await
        .unwrap();
    let got = store.page("dm~a~b", after(0, 10)).await.unwrap();
    assert_eq!(got.messages, vec![with_media.clone(), plain.clone()]);
    assert_eq!(got.messages[0].media.as_deref(), Some(media));
    assert_eq!(got.messages[1].media, None);
    store
        .apply(messages(vec![with_media.clone()]), None)
        .await
        .unwrap();
    let swapped = StoredMessage {
        media: Some(media.replace("1234", "1235")),
        ..with_media.clone()
    };
    let err = store
        .apply(messages(vec![swapped]), None)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Conflict);
    let got = store.page("dm~a~b", before(None, 10)).await.unwrap();
    assert_eq!(got.messages, vec![with_media, plain]);
}

/// Applying an empty batch without `through` succeeds and changes nothing.
pub async fn empty_apply_is_noop<S: MessageStore>(store: S) {
    store.apply(vec![], None).await.unwrap();
    assert_eq!(store.applied_stream_seq().await.unwrap(), 0);
    store
        .apply(messages(range_msgs("c1", 1, 2, 10)), None)
        .await
        .unwrap();
    store.apply(vec![], None).await.unwrap();
    assert_eq!(store.applied_stream_seq().await.unwrap(), 0);
    assert_eq!(store.latest_seq("c1").await.unwrap(), Some(2));
}

/// Paging backwards through 10 messages, 3 at a time; `more` is exact.
pub async fn page_before_boundaries<S: MessageStore>(store: S) {
    store
        .apply(messages(range_msgs("c1", 1, 10, 0)), None)
        .await
        .unwrap();
    assert_eq!(
        page(&store, "c1", before(None, 3)).await,
        (vec![8, 9, 10], true)
    );
    assert_eq!(
        page(&store, "c1", before(Some(8), 3)).await,
        (vec![5, 6, 7], true)
    );
    assert_eq!(
        page(&store, "c1", before(Some(5), 3)).await,
        (vec![2, 3, 4], true)
    );
    assert_eq!(
        page(&store, "c1", before(Some(2), 3)).await,
        (vec![1], false)
    );
    assert_eq!(
        page(&store, "c1", before(Some(1), 3)).await,
        (vec![], false)
    );
    assert_eq!(
        page(&store, "c1", before(Some(0), 3)).await,
        (vec![], false)
    );
    // Exactly `limit` messages left: no more.
    assert_eq!(
        page(&store, "c1", before(Some(4), 3)).await,
        (vec![1, 2, 3], false)
    );
    // A cursor past the end behaves like None.
    assert_eq!(
        page(&store, "c1", before(Some(11), 3)).await,
        (vec![8, 9, 10], true)
    );
    assert_eq!(
        page(&store, "c1", before(Some(u64::MAX), 3)).await,
        (vec![8, 9, 10], true)
    );
    // Whole conversation in one page, exactly and with room to spare.
    let all: Vec<u64> = (1..=10).collect();
    assert_eq!(
        page(&store, "c1", before(None, 10)).await,
        (all.clone(), false)
    );
    assert_eq!(
        page(&store, "c1", before(None, 11)).await,
        (all.clone(), false)
    );
    assert_eq!(
        page(&store, "c1", before(None, 9)).await,
        (all[1..].to_vec(), true)
    );
}

/// Paging forwards through 10 messages, 3 at a time; `more` is exact.
pub async fn page_after_boundaries<S: MessageStore>(store: S) {
    store
        .apply(messages(range_msgs("c1", 1, 10, 0)), None)
        .await
        .unwrap();
    assert_eq!(page(&store, "c1", after(0, 3)).await, (vec![1, 2, 3], true));
    assert_eq!(page(&store, "c1", after(3, 3)).await, (vec![4, 5, 6], true));
    assert_eq!(page(&store, "c1", after(6, 3)).await, (vec![7, 8, 9], true));
    assert_eq!(page(&store, "c1", after(9, 3)).await, (vec![10], false));
    assert_eq!(page(&store, "c1", after(10, 3)).await, (vec![], false));
    assert_eq!(
        page(&store, "c1", after(u64::MAX, 3)).await,
        (vec![], false)
    );
    // Exactly `limit` messages left: no more.
    assert_eq!(
        page(&store, "c1", after(7, 3)).await,
        (vec![8, 9, 10], false)
    );
    let all: Vec<u64> = (1..=10).collect();
    assert_eq!(page(&store, "c1", after(0, 10)).await, (all.clone(), false));
    assert_eq!(
        page(&store, "c1", after(0, 9)).await,
        (all[..9].to_vec(), true)
    );
}

/// Limit 0 is treated as 1; limits above [`MAX_PAGE_LIMIT`] are clamped.
pub async fn page_limit_is_clamped<S: MessageStore>(store: S) {
    let total = u64::from(MAX_PAGE_LIMIT) + 100;
    store
        .apply(messages(range_msgs("c1", 1, total, 0)), None)
        .await
        .unwrap();

    assert_eq!(
        page(&store, "c1", before(None, 0)).await,
        (vec![total], true)
    );
    assert_eq!(page(&store, "c1", after(0, 0)).await, (vec![1], true));

    let (got, more) = page(&store, "c1", before(None, u32::MAX)).await;
    assert_eq!(got, (101..=total).collect::<Vec<_>>());
    assert!(more);
    let (got, more) = page(&store, "c1", after(0, MAX_PAGE_LIMIT + 1)).await;
    assert_eq!(got, (1..=u64::from(MAX_PAGE_LIMIT)).collect::<Vec<_>>());
    assert!(more);
    // Exactly MAX_PAGE_LIMIT left after the cursor.
    let (got, more) = page(&store, "c1", after(100, u32::MAX)).await;
    assert_eq!(got, (101..=total).collect::<Vec<_>>());
    assert!(!more);
}

/// An unknown conversation pages as empty, even next to a populated one.
pub async fn page_unknown_conversation<S: MessageStore>(store: S) {
    store
        .apply(messages(range_msgs("c1", 1, 3, 0)), None)
        .await
        .unwrap();
    for conv in ["c0", "c2", "c", "c10"] {
        assert_eq!(page(&store, conv, before(None, 10)).await, (vec![], false));
        assert_eq!(page(&store, conv, after(0, 10)).await, (vec![], false));
        assert_eq!(store.latest_seq(conv).await.unwrap(), None);
    }
}

/// Pages that start, end or pass over seqs 10,000 and 20,000 (where a backend may split a
/// conversation into partitions) see every message once, in order, with exact `more`.
pub async fn pages_cross_partition_boundaries<S: MessageStore>(store: S) {
    let mut all = range_msgs("long", 9_990, 10_010, 0);
    all.extend(range_msgs("long", 19_995, 20_005, 0));
    all.push(msg("long", 30_001, "bob", "b30001", 40_000));
    store.apply(messages(all.clone()), None).await.unwrap();
    let want: Vec<u64> = all.iter().map(|m| m.seq).collect();
    assert_eq!(store.latest_seq("long").await.unwrap(), Some(30_001));

    // Newest first, 7 at a time, back to the oldest.
    let mut got = Vec::new();
    let mut cursor = None;
    loop {
        let (seqs, more) = page(&store, "long", before(cursor, 7)).await;
        got.splice(0..0, seqs.iter().copied());
        if !more {
            break;
        }
        cursor = seqs.first().copied();
    }
    assert_eq!(got, want);
    // Oldest first, 9 at a time.
    let mut got: Vec<u64> = Vec::new();
    let mut cursor = 0;
    loop {
        let (seqs, more) = page(&store, "long", after(cursor, 9)).await;
        got.extend(&seqs);
        if !more {
            break;
        }
        cursor = *seqs.last().unwrap();
    }
    assert_eq!(got, want);
    // Right at the boundaries.
    assert_eq!(
        page(&store, "long", before(Some(10_001), 2)).await,
        (vec![9_999, 10_000], true)
    );
    assert_eq!(
        page(&store, "long", after(10_000, 2)).await,
        (vec![10_001, 10_002], true)
    );
    assert_eq!(
        page(&store, "long", after(20_005, 5)).await,
        (vec![30_001], false)
    );
    assert_eq!(
        page(&store, "long", before(Some(19_995), 3)).await,
        (vec![10_008, 10_009, 10_010], true)
    );
    let got = store.page("long", after(10_009, 3)).await.unwrap();
    assert_eq!(
        got.messages,
        vec![all[20].clone(), all[21].clone(), all[22].clone()]
    );
}

/// Re-appending identical messages (alone or mixed with new ones) is Ok.
pub async fn idempotent_reappend<S: MessageStore>(store: S) {
    let first = range_msgs("c1", 1, 5, 100);
    store.apply(messages(first.clone()), None).await.unwrap();
    store.apply(messages(first.clone()), None).await.unwrap();
    store
        .apply(messages(vec![first[2].clone()]), None)
        .await
        .unwrap();
    // Overlapping batch: 4, 5 already stored, 6..=8 new.
    store
        .apply(messages(range_msgs("c1", 4, 8, 100)), None)
        .await
        .unwrap();
    // An identical message twice in one batch.
    store
        .apply(messages(vec![first[0].clone(), first[0].clone()]), None)
        .await
        .unwrap();

    let got = store.page("c1", after(0, 100)).await.unwrap();
    assert_eq!(got.messages, range_msgs("c1", 1, 8, 100));
    assert!(!got.more);
    assert_eq!(store.latest_seq("c1").await.unwrap(), Some(8));
    assert_eq!(store.applied_stream_seq().await.unwrap(), 0);
    assert_eq!(
        store.seq_for_client_id("c1", "alice", "c3").await.unwrap(),
        Some(3)
    );
}

/// A different message at an occupied (conv, seq) is a Conflict, the old
/// message stays, and nothing else of the batch is written.
pub async fn conflicting_append_is_rejected_atomically<S: MessageStore>(store: S) {
    let original = msg("c1", 1, "alice", "a1", 10);
    store
        .apply(messages(vec![original.clone()]), None)
        .await
        .unwrap();

    let mut different = original.clone();
    different.body = "something else".into();
    let batch = vec![
        msg("c1", 2, "bob", "b2", 11),
        msg("c2", 1, "bob", "b1", 12),
        different,
        msg("c1", 3, "bob", "b3", 13),
    ];
    let err = store.apply(messages(batch), None).await.unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Conflict, "{err:?}");
    match &err {
        crate::StoreError::Conflict { conv, seq } => {
            assert_eq!((conv.as_str(), *seq), ("c1", 1));
        }
        other => panic!("expected Conflict, got {other:?}"),
    }

    let got = store.page("c1", before(None, 10)).await.unwrap();
    assert_eq!(got.messages, vec![original.clone()]);
    assert_eq!(page(&store, "c2", before(None, 10)).await, (vec![], false));
    assert_eq!(store.latest_seq("c1").await.unwrap(), Some(1));
    assert_eq!(store.latest_seq("c2").await.unwrap(), None);
    assert_eq!(
        store.seq_for_client_id("c1", "bob", "b2").await.unwrap(),
        None
    );
    assert_eq!(
        store.seq_for_client_id("c2", "bob", "b1").await.unwrap(),
        None
    );
    assert_eq!(store.applied_stream_seq().await.unwrap(), 0);

    // Each differing field alone is a conflict.
    let variants: Vec<fn(&mut StoredMessage)> = vec![
        |m| m.from = "mallory".into(),
        |m| m.client_id = "other".into(),
        |m| m.ts_ms += 1,
        |m| m.body.push('!'),
        |m| m.stream_seq += 1,
    ];
    for change in variants {
        let mut m = original.clone();
        change(&mut m);
        let err = store
            .apply(messages(vec![m.clone()]), None)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), StoreErrorKind::Conflict, "{m:?}: {err:?}");
    }
    // The store still accepts good batches afterwards.
    store
        .apply(
            messages(vec![original.clone(), msg("c1", 2, "bob", "b2", 11)]),
            None,
        )
        .await
        .unwrap();
    assert_eq!(page(&store, "c1", after(0, 10)).await, (vec![1, 2], false));
}

/// Two different messages for the same (conv, seq) in one batch: Conflict,
/// nothing written.
pub async fn conflict_within_batch_is_rejected<S: MessageStore>(store: S) {
    let a = msg("c1", 1, "alice", "a1", 1);
    let mut b = a.clone();
    b.body = "other".into();
    let err = store
        .apply(messages(vec![msg("c0", 1, "x", "y", 5), a, b]), None)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Conflict, "{err:?}");
    assert_eq!(page(&store, "c1", after(0, 10)).await, (vec![], false));
    assert_eq!(page(&store, "c0", after(0, 10)).await, (vec![], false));
    assert_eq!(store.applied_stream_seq().await.unwrap(), 0);
}

/// Seq 0 is not a valid stamped seq; the whole batch is rejected.
pub async fn seq_zero_is_invalid<S: MessageStore>(store: S) {
    let err = store
        .apply(
            messages(vec![
                msg("c1", 1, "alice", "a1", 1),
                msg("c1", 0, "alice", "a0", 2),
            ]),
            None,
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Invalid, "{err:?}");
    assert_eq!(store.latest_seq("c1").await.unwrap(), None);
    assert_eq!(store.applied_stream_seq().await.unwrap(), 0);
}

/// The client-id index maps (conv, from, client_id) to the stored seq.
pub async fn seq_for_client_id<S: MessageStore>(store: S) {
    store
        .apply(
            messages(vec![
                msg("c1", 1, "alice", "m1", 1),
                msg("c1", 2, "bob", "m1", 2),
                msg("c1", 3, "alice", "m2", 3),
                msg("c2", 1, "alice", "m1", 4),
            ]),
            None,
        )
        .await
        .unwrap();
    assert_eq!(
        store.seq_for_client_id("c1", "alice", "m1").await.unwrap(),
        Some(1)
    );
    assert_eq!(
        store.seq_for_client_id("c1", "bob", "m1").await.unwrap(),
        Some(2)
    );
    assert_eq!(
        store.seq_for_client_id("c1", "alice", "m2").await.unwrap(),
        Some(3)
    );
    assert_eq!(
        store.seq_for_client_id("c2", "alice", "m1").await.unwrap(),
        Some(1)
    );
    assert_eq!(
        store.seq_for_client_id("c2", "bob", "m1").await.unwrap(),
        None
    );
    assert_eq!(
        store.seq_for_client_id("c1", "alice", "m3").await.unwrap(),
        None
    );
    assert_eq!(
        store.seq_for_client_id("c3", "alice", "m1").await.unwrap(),
        None
    );
    let key = |conv: &str, from: &str, id: &str| crate::ClientKey {
        conv: conv.into(),
        from: from.into(),
        client_id: id.into(),
    };
    // Many at once, in the order asked, misses included.
    assert_eq!(
        store
            .seqs_for_client_ids(vec![
                key("c1", "alice", "m2"),
                key("c3", "alice", "m1"),
                key("c1", "bob", "m1"),
                key("c1", "alice", "m2"),
            ])
            .await
            .unwrap(),
        vec![Some(3), None, Some(2), Some(3)]
    );
    assert_eq!(store.seqs_for_client_ids(vec![]).await.unwrap(), vec![]);
}

/// If a client id shows up again at another seq, the first seq is kept.
pub async fn client_id_keeps_first_seq<S: MessageStore>(store: S) {
    store
        .apply(messages(vec![msg("c1", 1, "alice", "m1", 1)]), None)
        .await
        .unwrap();
    store
        .apply(messages(vec![msg("c1", 2, "alice", "m1", 2)]), None)
        .await
        .unwrap();
    assert_eq!(
        store.seq_for_client_id("c1", "alice", "m1").await.unwrap(),
        Some(1)
    );
    store
        .apply(
            messages(vec![
                msg("c1", 4, "bob", "m9", 4),
                msg("c1", 3, "bob", "m9", 3),
            ]),
            None,
        )
        .await
        .unwrap();
    assert_eq!(
        store.seq_for_client_id("c1", "bob", "m9").await.unwrap(),
        Some(4)
    );
}

/// latest_seq is the highest stored seq, whatever the arrival order.
pub async fn latest_seq_tracks_max<S: MessageStore>(store: S) {
    store
        .apply(messages(range_msgs("c1", 1, 3, 0)), None)
        .await
        .unwrap();
    assert_eq!(store.latest_seq("c1").await.unwrap(), Some(3));
    store
        .apply(messages(range_msgs("c1", 7, 9, 0)), None)
        .await
        .unwrap();
    assert_eq!(store.latest_seq("c1").await.unwrap(), Some(9));
    store
        .apply(messages(range_msgs("c1", 4, 6, 0)), None)
        .await
        .unwrap();
    assert_eq!(store.latest_seq("c1").await.unwrap(), Some(9));
    // Out of order inside one batch.
    let mut batch = range_msgs("c1", 10, 12, 0);
    batch.reverse();
    store.apply(messages(batch), None).await.unwrap();
    assert_eq!(store.latest_seq("c1").await.unwrap(), Some(12));
    assert_eq!(store.latest_seq("c2").await.unwrap(), None);
    store
        .apply(messages(range_msgs("c2", 1, 1, 0)), None)
        .await
        .unwrap();
    assert_eq!(store.latest_seq("c2").await.unwrap(), Some(1));
    assert_eq!(store.latest_seq("c1").await.unwrap(), Some(12));
}

/// Only `apply` with `through` moves the applied watermark, to `through`, and never lowers it;
/// `apply` without (the stamper's out-of-order writes) leaves it alone.
pub async fn applied_stream_seq_is_monotonic<S: MessageStore>(store: S) {
    store
        .apply(
            messages(vec![
                msg("c1", 1, "a", "x1", 10),
                msg("c1", 2, "a", "x2", 7),
            ]),
            None,
        )
        .await
        .unwrap();
    assert_eq!(store.applied_stream_seq().await.unwrap(), 0);
    store
        .apply(messages(vec![msg("c1", 1, "a", "x1", 10)]), Some(10))
        .await
        .unwrap();
    assert_eq!(store.applied_stream_seq().await.unwrap(), 10);
    // An older batch (e.g. a redelivery) does not lower it.
    store
        .apply(messages(vec![msg("c2", 1, "a", "x1", 5)]), Some(5))
        .await
        .unwrap();
    assert_eq!(store.applied_stream_seq().await.unwrap(), 10);
    // A batch with nothing new to store still records progress.
    store.apply(vec![], Some(20)).await.unwrap();
    assert_eq!(store.applied_stream_seq().await.unwrap(), 20);
    assert_eq!(store.latest_seq("c2").await.unwrap(), Some(1));
}

/// Conversations whose ids are prefixes of each other never leak into each
/// other's pages, latest seq or index.
pub async fn conversations_do_not_interleave<S: MessageStore>(store: S) {
    let convs = ["a", "ab", "a-", "a_b", "b", "A", "a~"];
    let mut batch = Vec::new();
    for (i, conv) in convs.iter().enumerate() {
        let n = 3 + i as u64;
        batch.extend(range_msgs(conv, 1, n, 100 * i as u64));
    }
    // Interleave the conversations inside the batch.
    batch.sort_by_key(|m| (m.seq, m.conv.clone()));
    store.apply(messages(batch), None).await.unwrap();

    for (i, conv) in convs.iter().enumerate() {
        let n = 3 + i as u64;
        let all: Vec<u64> = (1..=n).collect();
        assert_eq!(
            page(&store, conv, before(None, 100)).await,
            (all.clone(), false)
        );
        assert_eq!(
            page(&store, conv, after(0, 100)).await,
            (all.clone(), false)
        );
        assert_eq!(
            page(&store, conv, before(None, 2)).await,
            (vec![n - 1, n], true)
        );
        assert_eq!(
            page(&store, conv, after(n - 2, 2)).await,
            (vec![n - 1, n], false)
        );
        assert_eq!(store.latest_seq(conv).await.unwrap(), Some(n));
        let got = store.page(conv, after(0, 100)).await.unwrap();
        assert_eq!(got.messages, range_msgs(conv, 1, n, 100 * i as u64));
    }
    assert_eq!(page(&store, "", before(None, 100)).await, (vec![], false));
    assert_eq!(
        page(&store, "a-b", before(None, 100)).await,
        (vec![], false)
    );
}

/// (conv, from, client_id) keys cannot collide by shifting characters
/// between the components.
pub async fn index_keys_are_unambiguous<S: MessageStore>(store: S) {
    store
        .apply(
            messages(vec![
                msg("a", 1, "bc", "d", 1),
                msg("a", 2, "b", "cd", 2),
                msg("ab", 1, "c", "d", 3),
                msg("a", 3, "b-c", "d", 4),
                msg("a", 4, "b", "c-d", 5),
            ]),
            None,
        )
        .await
        .unwrap();
    assert_eq!(
        store.seq_for_client_id("a", "bc", "d").await.unwrap(),
        Some(1)
    );
    assert_eq!(
        store.seq_for_client_id("a", "b", "cd").await.unwrap(),
        Some(2)
    );
    assert_eq!(
        store.seq_for_client_id("ab", "c", "d").await.unwrap(),
        Some(1)
    );
    assert_eq!(
        store.seq_for_client_id("a", "b-c", "d").await.unwrap(),
        Some(3)
    );
    assert_eq!(
        store.seq_for_client_id("a", "b", "c-d").await.unwrap(),
        Some(4)
    );
    assert_eq!(store.seq_for_client_id("a", "b", "c").await.unwrap(), None);
    assert_eq!(store.seq_for_client_id("ab", "cd", "").await.unwrap(), None);
    assert_eq!(store.seq_for_client_id("a", "bcd", "").await.unwrap(), None);
}

/// Concurrent appends to different conversations all land.
pub async fn concurrent_appends<S: MessageStore>(store: S) {
    let store = Arc::new(store);
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..8u64 {
        let store = Arc::clone(&store);
        tasks.spawn(async move {
            let conv = format!("conv{t}");
            for chunk in 0..5u64 {
                let first = chunk * 4 + 1;
                let batch = range_msgs(&conv, first, first + 3, t * 1000);
                let through = batch.last().map_or(0, |m| m.stream_seq);
                store
                    .apply(messages(batch), Some(through))
                    .await
                    .expect("concurrent append");
            }
        });
    }
    while let Some(res) = tasks.join_next().await {
        res.expect("append task panicked");
    }
    for t in 0..8u64 {
        let conv = format!("conv{t}");
        let (got, more) = page(&*store, &conv, after(0, 100)).await;
        assert_eq!(got, (1..=20).collect::<Vec<_>>());
        assert!(!more);
        assert_eq!(store.latest_seq(&conv).await.unwrap(), Some(20));
    }
    assert_eq!(store.applied_stream_seq().await.unwrap(), 7 * 1000 + 20);
}

/// The summary of a one-to-one conversation (no name, no counted members,
/// seen from seq 1).
pub fn summary(conv: &str, latest: u64, pos: u64) -> ConvSummary {
    ConvSummary {
        conv: conv.to_owned(),
        latest,
        pos,
        name: String::new(),
        member_count: 0,
        joined: 1,
        left: None,
        admin: false,
    }
}

fn conv_ids(page: &UserConversations) -> Vec<&str> {
    page.convs.iter().map(|c| c.conv.as_str()).collect()
}

/// One change per apply, no `through`.
async fn apply_each<S: MessageStore>(store: &S, changes: Vec<Change>) {
    for change in changes {
        store.apply(vec![change], None).await.expect("apply");
    }
}

/// Sending a message raises the sender's delivered and read watermarks to its
/// seq (sending implies having read everything before), never lowering them.
pub async fn sender_watermarks_raised_by_own_message<S: MessageStore>(store: S) {
    let both = members(&["alice", "bob"]);
    let m3 = msg("c1", 3, "alice", "a3", 10);
    store
        .apply(vec![Change::message(m3.clone(), both.clone())], None)
        .await
        .unwrap();
    assert_eq!(
        store.watermarks("c1").await.unwrap(),
        vec![marks("alice", 3, 3)]
    );

    // An older message of hers, stored late, does not lower them.
    store
        .apply(
            vec![Change::message(
                msg("c1", 1, "alice", "a1", 8),
                both.clone(),
            )],
            None,
        )
        .await
        .unwrap();
    assert_eq!(
        store.watermarks("c1").await.unwrap(),
        vec![marks("alice", 3, 3)]
    );

    // Bob's message moves only his.
    store
        .apply(
            vec![Change::message(msg("c1", 5, "bob", "b5", 12), both.clone())],
            None,
        )
        .await
        .unwrap();
    assert_eq!(
        store.watermarks("c1").await.unwrap(),
        vec![marks("alice", 3, 3), marks("bob", 5, 5)]
    );

    // Her receipt below what her send implied does not lower them; one
    // above raises them; her next send below her read mark keeps it.
    apply_each(
        &store,
        vec![
            Change::receipt(rcpt("c1", "alice", 2, 1, 13), both.clone()),
            Change::receipt(rcpt("c1", "alice", 9, 5, 14), both.clone()),
            Change::message(msg("c1", 4, "alice", "a4", 11), both.clone()),
        ],
    )
    .await;
    assert_eq!(
        store.watermarks("c1").await.unwrap(),
        vec![marks("alice", 9, 5), marks("bob", 5, 5)]
    );

    // Re-putting an identical message is Ok and changes nothing.
    store
        .apply(vec![Change::message(m3, both)], None)
        .await
        .unwrap();
    assert_eq!(
        store.watermarks("c1").await.unwrap(),
        vec![marks("alice", 9, 5), marks("bob", 5, 5)]
    );
    assert_eq!(store.watermarks("c2").await.unwrap(), vec![]);
}

/// A receipt raises a member's watermarks and never lowers them; read implies
/// delivered.
pub async fn receipt_watermarks_only_grow<S: MessageStore>(store: S) {
    let steps = [
        ((3, 0), (3, 0)),
        // Lower delivered: kept.
        ((2, 1), (3, 1)),
        // Read beyond delivered: delivered follows.
        ((0, 5), (5, 5)),
        // Both lower: kept.
        ((4, 4), (5, 5)),
        ((8, 0), (8, 5)),
        ((0, 0), (8, 5)),
        ((8, 8), (8, 8)),
    ];
    for (i, ((delivered, read), (want_delivered, want_read))) in steps.into_iter().enumerate() {
        let r = rcpt("c1", "bob", delivered, read, 1 + i as u64);
        store
            .apply(vec![Change::receipt(r, vec![])], None)
            .await
            .unwrap();
        assert_eq!(
            store.watermarks("c1").await.unwrap(),
            vec![marks("bob", want_delivered, want_read)],
            "after receipt {i} ({delivered}, {read})"
        );
    }
}

/// The same receipts applied in any order, in one batch or one by one, and
/// with duplicates, end in the same watermarks.
pub async fn receipts_converge_in_any_order<S: MessageStore>(store: S) {
    // (user, delivered, read)
    let base = [
        ("alice", 1, 0),
        ("alice", 3, 1),
        ("bob", 2, 2),
        ("alice", 0, 4),
        ("bob", 6, 0),
        ("bob", 5, 5),
        ("alice", 2, 2),
    ];
    let n = base.len();
    let orders: Vec<(Vec<usize>, bool)> = vec![
        ((0..n).collect(), false),
        ((0..n).rev().collect(), false),
        ((0..n).collect(), true),
        ((0..n).map(|i| (i + 3) % n).collect(), false),
        ((0..n).map(|i| (i * 3) % n).collect(), true),
        // Every receipt twice, in reverse the second time.
        ((0..n).chain((0..n).rev()).collect(), false),
        ((0..n).chain(0..n).collect(), true),
    ];
    for (k, (order, one_batch)) in orders.iter().enumerate() {
        let conv = format!("c{k}");
        let changes: Vec<Change> = order
            .iter()
            .enumerate()
            .map(|(i, &j)| {
                let (user, delivered, read) = base[j];
                Change::receipt(rcpt(&conv, user, delivered, read, 1 + i as u64), vec![])
            })
            .collect();
        if *one_batch {
            store.apply(changes, None).await.unwrap();
        } else {
            apply_each(&store, changes).await;
        }
    }
    for (k, (order, one_batch)) in orders.iter().enumerate() {
        assert_eq!(
            store.watermarks(&format!("c{k}")).await.unwrap(),
            vec![marks("alice", 4, 4), marks("bob", 6, 5)],
            "order {order:?}, one batch: {one_batch}"
        );
    }
}

/// `watermarks` lists a conversation's members sorted by user id, and only
/// that conversation's, whatever ids are prefixes of others.
pub async fn watermarks_sorted_and_isolated_per_conversation<S: MessageStore>(store: S) {
    // Inserted out of order; listed in byte order.
    let users = ["carol", "alice", "bob", "al", "alice2", "Zed", "alice-"];
    let convs = ["dm~a~b", "dm~a~bb", "dm~a~b-", "dm~a"];
    let mut changes = Vec::new();
    for (c, conv) in convs.iter().enumerate() {
        for (u, user) in users.iter().enumerate().skip(c) {
            let v = (10 * c + u) as u64;
            changes.push(Change::receipt(
                rcpt(conv, user, v + 1, v, changes.len() as u64 + 1),
                vec![],
            ));
        }
    }
    store.apply(changes, None).await.unwrap();

    for (c, conv) in convs.iter().enumerate() {
        let mut want: Vec<Marks> = users
            .iter()
            .enumerate()
            .skip(c)
            .map(|(u, user)| {
                let v = (10 * c + u) as u64;
                marks(user, v + 1, v)
            })
            .collect();
        want.sort_by(|a, b| a.user.cmp(&b.user));
        assert_eq!(store.watermarks(conv).await.unwrap(), want, "{conv}");
    }
    assert_eq!(
        store
            .watermarks("dm~a~b")
            .await
            .unwrap()
            .iter()
            .map(|m| m.user.as_str())
            .collect::<Vec<_>>(),
        ["Zed", "al", "alice", "alice-", "alice2", "bob", "carol"]
    );
    for unknown in ["dm~a~", "dm", "", "dm~a~bbb", "dm~a~c"] {
        assert_eq!(
            store.watermarks(unknown).await.unwrap(),
            vec![],
            "{unknown}"
        );
    }
}

/// A receipt with stream seq 0, an empty conv or an empty user is Invalid, and
/// nothing of its batch is written.
pub async fn invalid_receipt_is_rejected<S: MessageStore>(store: S) {
    let both = members(&["alice", "bob"]);
    for bad in [
        rcpt("c1", "bob", 1, 1, 0),
        rcpt("", "bob", 1, 1, 5),
        rcpt("c1", "", 1, 1, 5),
    ] {
        let batch = vec![
            Change::message(msg("c1", 1, "alice", "a1", 1), both.clone()),
            Change::receipt(rcpt("c1", "bob", 1, 1, 2), both.clone()),
            Change::receipt(bad.clone(), both.clone()),
        ];
        let err = store.apply(batch, Some(10)).await.unwrap_err();
        assert_eq!(err.kind(), StoreErrorKind::Invalid, "{bad:?}: {err:?}");
        assert_eq!(store.latest_seq("c1").await.unwrap(), None);
        assert_eq!(store.watermarks("c1").await.unwrap(), vec![]);
        assert_eq!(store.watermarks("").await.unwrap(), vec![]);
        let page = store
            .user_conversations("alice", 0, None, 10)
            .await
            .unwrap();
        assert_eq!(page, UserConversations::default());
    }
}

/// A user's index position for a conversation is the highest stream seq of
/// the changes applied to it (messages and receipts, in any order); `latest`
/// is the conversation's latest seq, 0 with only receipts.
pub async fn user_index_positions_are_max<S: MessageStore>(store: S) {
    let both = members(&["alice", "bob"]);
    apply_each(
        &store,
        vec![
            Change::message(msg("c1", 1, "alice", "a1", 10), both.clone()),
            Change::receipt(rcpt("c1", "bob", 1, 1, 15), both.clone()),
            // Stored late: lower stream seq, higher seq.
            Change::message(msg("c1", 2, "alice", "a2", 12), both.clone()),
            // Receipts only.
            Change::receipt(rcpt("c2", "alice", 3, 3, 20), both.clone()),
            Change::receipt(rcpt("c2", "bob", 1, 0, 18), both.clone()),
        ],
    )
    .await;
    // Out of order inside one batch.
    store
        .apply(
            vec![
                Change::message(msg("c3", 2, "bob", "b2", 31), both.clone()),
                Change::message(msg("c3", 1, "bob", "b1", 30), both.clone()),
                Change::receipt(rcpt("c3", "alice", 2, 2, 29), both.clone()),
            ],
            None,
        )
        .await
        .unwrap();
    let want = vec![
        summary("c1", 2, 15),
        summary("c2", 0, 20),
        summary("c3", 2, 31),
    ];
    for user in ["alice", "bob"] {
        let page = store.user_conversations(user, 0, None, 10).await.unwrap();
        assert_eq!(page.convs, want, "{user}");
        assert!(!page.more);
    }
    // Re-applying older changes lowers nothing.
    store
        .apply(
            vec![
                Change::message(msg("c1", 1, "alice", "a1", 10), both.clone()),
                Change::receipt(rcpt("c2", "bob", 1, 0, 18), both),
            ],
            None,
        )
        .await
        .unwrap();
    let page = store.user_conversations("bob", 0, None, 10).await.unwrap();
    assert_eq!(page.convs, want);
}

/// Only the users passed as members get an index entry.
pub async fn user_index_touches_only_members<S: MessageStore>(store: S) {
    store
        .apply(
            vec![
                Change::message(msg("c1", 1, "alice", "a1", 1), members(&["alice", "bob"])),
                Change::message(msg("c2", 1, "alice", "a1", 2), vec![]),
                Change::receipt(rcpt("c3", "bob", 0, 0, 3), members(&["carol"])),
            ],
            None,
        )
        .await
        .unwrap();
    let convs = |user: &'static str| {
        let store = &store;
        async move {
            let page = store.user_conversations(user, 0, None, 10).await.unwrap();
            page.convs
        }
    };
    assert_eq!(convs("alice").await, vec![summary("c1", 1, 1)]);
    assert_eq!(convs("bob").await, vec![summary("c1", 1, 1)]);
    assert_eq!(convs("carol").await, vec![summary("c3", 0, 3)]);
    assert_eq!(convs("dave").await, vec![]);
    // The message without members is stored all the same.
    assert_eq!(store.latest_seq("c2").await.unwrap(), Some(1));
}

/// Five conversations of alice at positions 10, 20, ..., 50.
async fn five_conversations<S: MessageStore>(store: &S) {
    let changes = (1..=5u64)
        .map(|i| {
            let conv = format!("c{i}");
            Change::message(
                msg(&conv, i, "bob", "b", 10 * i),
                members(&["alice", "bob"]),
            )
        })
        .collect();
    store.apply(changes, None).await.unwrap();
}

/// `since` lists only the conversations whose position is above it.
pub async fn user_conversations_since_filters<S: MessageStore>(store: S) {
    five_conversations(&store).await;
    for (since, want) in [
        (0, vec!["c1", "c2", "c3", "c4", "c5"]),
        (9, vec!["c1", "c2", "c3", "c4", "c5"]),
        (10, vec!["c2", "c3", "c4", "c5"]),
        (29, vec!["c3", "c4", "c5"]),
        (30, vec!["c4", "c5"]),
        (49, vec!["c5"]),
        (50, vec![]),
        (u64::MAX, vec![]),
    ] {
        let page = store
            .user_conversations("alice", since, None, 10)
            .await
            .unwrap();
        assert_eq!(conv_ids(&page), want, "since {since}");
        assert!(!page.more, "since {since}");
    }
    let page = store
        .user_conversations("alice", 35, None, 10)
        .await
        .unwrap();
    assert_eq!(page.convs, vec![summary("c4", 4, 40), summary("c5", 5, 50)]);
    // A receipt moves the position again.
    store
        .apply(
            vec![Change::receipt(
                rcpt("c2", "alice", 2, 2, 60),
                members(&["alice", "bob"]),
            )],
            None,
        )
        .await
        .unwrap();
    let page = store.user_conversations("bob", 50, None, 10).await.unwrap();
    assert_eq!(page.convs, vec![summary("c2", 2, 60)]);
}

/// `from_conv` starts the listing at that conversation id, inclusive, whether
/// or not the user has a conversation by that id.
pub async fn user_conversations_from_conv_is_inclusive<S: MessageStore>(store: S) {
    five_conversations(&store).await;
    for (from, since, want) in [
        ("c3", 0, vec!["c3", "c4", "c5"]),
        ("c1", 0, vec!["c1", "c2", "c3", "c4", "c5"]),
        ("", 0, vec!["c1", "c2", "c3", "c4", "c5"]),
        ("c", 0, vec!["c1", "c2", "c3", "c4", "c5"]),
        ("c2a", 0, vec!["c3", "c4", "c5"]),
        ("c5", 0, vec!["c5"]),
        ("c6", 0, vec![]),
        ("d", 0, vec![]),
        // Combined with since: c3 (30) is filtered, c4 onwards listed.
        ("c3", 30, vec!["c4", "c5"]),
    ] {
        let page = store
            .user_conversations("alice", since, Some(from), 10)
            .await
            .unwrap();
        assert_eq!(conv_ids(&page), want, "from {from:?} since {since}");
        assert!(!page.more);
    }
    let page = store
        .user_conversations("alice", 0, Some("c4"), 1)
        .await
        .unwrap();
    assert_eq!(page.convs, vec![summary("c4", 4, 40)]);
    assert!(page.more);
}

/// Pages through a user's conversations with `limit`, following
/// `next_from`; returns the pages' conversation ids and `more` flags.
async fn pages<S: MessageStore>(
    store: &S,
    user: &str,
    since: u64,
    limit: u32,
) -> Vec<(Vec<String>, bool)> {
    let mut pages = Vec::new();
    let mut from: Option<String> = None;
    loop {
        let page = store
            .user_conversations(user, since, from.as_deref(), limit)
            .await
            .unwrap();
        let ids = conv_ids(&page).into_iter().map(str::to_owned).collect();
        pages.push((ids, page.more));
        match page.next_from() {
            Some(next) => from = Some(next),
            None => return pages,
        }
        assert!(pages.len() < 100, "paging does not end");
    }
}

/// Paging 7 conversations 3 at a time visits each exactly once, in order,
/// with an exact `more`.
pub async fn user_conversations_paging_visits_each_once<S: MessageStore>(store: S) {
    let convs = [
        "dm~alice~bob",
        "dm~alice~bobby",
        "dm~alice~bo",
        "dm~alice~carol",
        "dm~al~alice",
        "dm~alice~b",
        "dm~alice~zed",
    ];
    let changes = convs
        .iter()
        .enumerate()
        .map(|(i, conv)| {
            Change::receipt(
                rcpt(conv, "alice", 1, 1, 10 + i as u64),
                members(&["alice", "zoe"]),
            )
        })
        .collect();
    store.apply(changes, None).await.unwrap();
    let mut sorted: Vec<String> = convs.iter().map(|&c| c.to_owned()).collect();
    sorted.sort();

    let got = pages(&store, "alice", 0, 3).await;
    assert_eq!(
        got,
        vec![
            (sorted[0..3].to_vec(), true),
            (sorted[3..6].to_vec(), true),
            (sorted[6..7].to_vec(), false),
        ]
    );
    // Exactly a multiple of the limit: the last full page says no more.
    let got = pages(&store, "zoe", 0, 7).await;
    assert_eq!(got, vec![(sorted.clone(), false)]);
    // With `since` skipping some (positions 10, 11 and 12 are not above 12).
    let mut newer: Vec<String> = convs[3..].iter().map(|&c| c.to_owned()).collect();
    newer.sort();
    let got = pages(&store, "alice", 12, 2).await;
    assert_eq!(
        got,
        vec![(newer[0..2].to_vec(), true), (newer[2..4].to_vec(), false)]
    );
    // Limit 1: one page per conversation.
    let got = pages(&store, "zoe", 0, 1).await;
    assert_eq!(got.len(), 7);
    let visited: Vec<String> = got.iter().flat_map(|(ids, _)| ids.clone()).collect();
    assert_eq!(visited, sorted);
}

/// Limit 0 is treated as 1; limits above [`MAX_PAGE_LIMIT`] are clamped.
pub async fn user_conversations_limit_is_clamped<S: MessageStore>(store: S) {
    let total = MAX_PAGE_LIMIT as usize + 1;
    let changes = (0..total)
        .map(|i| {
            Change::receipt(
                rcpt(&format!("c{i:04}"), "alice", 0, 0, 1 + i as u64),
                members(&["alice"]),
            )
        })
        .collect();
    store.apply(changes, None).await.unwrap();

    let page = store.user_conversations("alice", 0, None, 0).await.unwrap();
    assert_eq!(conv_ids(&page), ["c0000"]);
    assert!(page.more);
    let page = store
        .user_conversations("alice", 0, None, u32::MAX)
        .await
        .unwrap();
    assert_eq!(page.convs.len(), MAX_PAGE_LIMIT as usize);
    assert!(page.more);
    let next = page.next_from();
    let page = store
        .user_conversations("alice", 0, next.as_deref(), u32::MAX)
        .await
        .unwrap();
    assert_eq!(conv_ids(&page), [format!("c{:04}", total - 1)]);
    assert!(!page.more);
}

/// Users and conversation ids that are prefixes of others never fall into
/// each other's index ranges.
pub async fn user_index_prefix_ids_do_not_bleed<S: MessageStore>(store: S) {
    // (conv, user whose index it goes to)
    let entries = [
        ("dm~a~b", "alice"),
        ("dm~a~bb", "alice2"),
        ("dm~a~b-", "al"),
        ("dm~a", "alice-"),
        ("dm~a~bb", "alice"),
        ("dm~a~b", "alic"),
    ];
    let changes = entries
        .iter()
        .enumerate()
        .map(|(i, (conv, user))| {
            Change::receipt(rcpt(conv, "x", 1, 1, 1 + i as u64), members(&[user]))
        })
        .collect();
    store.apply(changes, None).await.unwrap();

    for (user, want) in [
        (
            "alice",
            vec![summary("dm~a~b", 0, 1), summary("dm~a~bb", 0, 5)],
        ),
        ("alice2", vec![summary("dm~a~bb", 0, 2)]),
        ("al", vec![summary("dm~a~b-", 0, 3)]),
        ("alice-", vec![summary("dm~a", 0, 4)]),
        ("alic", vec![summary("dm~a~b", 0, 6)]),
        ("a", vec![]),
        ("alicea", vec![]),
        ("", vec![]),
    ] {
        let page = store.user_conversations(user, 0, None, 10).await.unwrap();
        assert_eq!(page.convs, want, "{user:?}");
        assert!(!page.more, "{user:?}");
    }
    // Starting at a conv id that is a prefix of the user's next one.
    let page = store
        .user_conversations("alice", 0, Some("dm~a~b\0"), 10)
        .await
        .unwrap();
    assert_eq!(page.convs, vec![summary("dm~a~bb", 0, 5)]);
    // Paging one at a time stays within the user.
    let got = pages(&store, "alice", 0, 1).await;
    assert_eq!(
        got,
        vec![
            (vec!["dm~a~b".to_owned()], true),
            (vec!["dm~a~bb".to_owned()], false),
        ]
    );
}

/// `user_conversations` reports the applied watermark, whether or not the
/// user has conversations, and however far the stamper's writes got ahead.
pub async fn user_conversations_reports_applied<S: MessageStore>(store: S) {
    let applied = |user: &'static str| {
        let store = &store;
        async move {
            store
                .user_conversations(user, 0, None, 10)
                .await
                .unwrap()
                .applied
        }
    };
    assert_eq!(applied("alice").await, 0);
    store
        .apply(
            vec![Change::message(
                msg("c1", 1, "bob", "b1", 7),
                members(&["alice", "bob"]),
            )],
            Some(7),
        )
        .await
        .unwrap();
    assert_eq!(store.applied_stream_seq().await.unwrap(), 7);
    assert_eq!(applied("alice").await, 7);
    assert_eq!(applied("nobody").await, 7);

    // The stamper writes ahead of the follower without moving it.
    store
        .apply(
            vec![Change::message(
                msg("c1", 2, "bob", "b2", 100),
                members(&["alice", "bob"]),
            )],
            None,
        )
        .await
        .unwrap();
    let page = store
        .user_conversations("alice", 0, None, 10)
        .await
        .unwrap();
    assert_eq!(page.applied, 7);
    assert_eq!(page.convs, vec![summary("c1", 2, 100)]);

    store.apply(vec![], Some(100)).await.unwrap();
    assert_eq!(applied("bob").await, 100);
    assert_eq!(store.applied_stream_seq().await.unwrap(), 100);
}

/// A batch that hits a conflicting message writes none of its receipts,
/// watermarks or index entries either.
pub async fn conflict_writes_no_receipts_or_index<S: MessageStore>(store: S) {
    let both = members(&["alice", "bob"]);
    let original = msg("c1", 1, "alice", "a1", 1);
    store
        .apply(vec![Change::message(original.clone(), both.clone())], None)
        .await
        .unwrap();

    let mut different = original.clone();
    different.body = "rewritten".into();
    let batch = vec![
        Change::receipt(rcpt("c1", "bob", 1, 1, 5), both.clone()),
        Change::message(msg("c2", 1, "bob", "b1", 6), both.clone()),
        Change::receipt(rcpt("c3", "carol", 4, 4, 7), members(&["carol"])),
        Change::message(different, both.clone()),
        Change::receipt(rcpt("c4", "bob", 1, 1, 8), both),
    ];
    let err = store.apply(batch, Some(50)).await.unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Conflict, "{err:?}");

    assert_eq!(
        store.watermarks("c1").await.unwrap(),
        vec![marks("alice", 1, 1)]
    );
    for conv in ["c2", "c3", "c4"] {
        assert_eq!(store.watermarks(conv).await.unwrap(), vec![], "{conv}");
    }
    assert_eq!(store.latest_seq("c2").await.unwrap(), None);
    for user in ["alice", "bob"] {
        let page = store.user_conversations(user, 0, None, 10).await.unwrap();
        assert_eq!(page.convs, vec![summary("c1", 1, 1)], "{user}");
        assert_eq!(page.applied, 0);
    }
    let page = store
        .user_conversations("carol", 0, None, 10)
        .await
        .unwrap();
    assert_eq!(page, UserConversations::default());
    assert_eq!(store.applied_stream_seq().await.unwrap(), 0);
}

/// `apply` with no changes and `through` raises the applied watermark (never
/// lowering it) and writes nothing else; without `through` it is a no-op.
pub async fn apply_through_only<S: MessageStore>(store: S) {
    store.apply(vec![], Some(5)).await.unwrap();
    assert_eq!(store.applied_stream_seq().await.unwrap(), 5);
    store.apply(vec![], None).await.unwrap();
    assert_eq!(store.applied_stream_seq().await.unwrap(), 5);
    store.apply(vec![], Some(3)).await.unwrap();
    assert_eq!(store.applied_stream_seq().await.unwrap(), 5);
    store.apply(vec![], Some(5)).await.unwrap();
    assert_eq!(store.applied_stream_seq().await.unwrap(), 5);
    store.apply(vec![], Some(u64::MAX)).await.unwrap();
    assert_eq!(store.applied_stream_seq().await.unwrap(), u64::MAX);

    let page = store
        .user_conversations("alice", 0, None, 10)
        .await
        .unwrap();
    assert_eq!(
        page,
        UserConversations {
            applied: u64::MAX,
            convs: vec![],
            more: false,
        }
    );
    assert_eq!(store.latest_seq("c1").await.unwrap(), None);
    assert_eq!(store.watermarks("c1").await.unwrap(), vec![]);
}

/// Receipts for the same members applied concurrently, each batch its own
/// transaction, still end in the maxima: no update is lost.
pub async fn concurrent_receipts_converge<S: MessageStore>(store: S) {
    const USERS: [&str; 3] = ["alice", "bob", "carol"];
    // Deterministic, scattered (delivered, read) for task t, step i.
    fn values(t: u64, i: u64) -> (u64, u64) {
        ((t * 31 + i * 17) % 97, (t * 13 + i * 7) % 89)
    }
    let store = Arc::new(store);
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..8u64 {
        let store = Arc::clone(&store);
        tasks.spawn(async move {
            for i in 0..20u64 {
                let user = USERS[((t + i) % 3) as usize];
                let (delivered, read) = values(t, i);
                let r = rcpt("shared", user, delivered, read, t * 100 + i + 1);
                store
                    .apply(vec![Change::receipt(r, members(&USERS))], None)
                    .await
                    .expect("concurrent receipt");
            }
        });
    }
    while let Some(res) = tasks.join_next().await {
        res.expect("receipt task panicked");
    }

    let mut want: Vec<Marks> = USERS.iter().map(|u| marks(u, 0, 0)).collect();
    for t in 0..8u64 {
        for i in 0..20u64 {
            let (delivered, read) = values(t, i);
            let m = &mut want[((t + i) % 3) as usize];
            m.delivered = m.delivered.max(delivered).max(read);
            m.read = m.read.max(read);
        }
    }
    assert_eq!(store.watermarks("shared").await.unwrap(), want);
    for user in USERS {
        let page = store.user_conversations(user, 0, None, 10).await.unwrap();
        assert_eq!(page.convs, vec![summary("shared", 0, 7 * 100 + 20)]);
    }
}

fn users(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| (*s).to_owned()).collect()
}

fn member(user: &str, joined: u64, left: Option<u64>, admin: bool) -> Member {
    Member {
        user: user.to_owned(),
        joined,
        left,
        admin,
    }
}

/// The first events of group `g`: created by alice (admin) with bob and carol
/// at seq 1, a message by bob at 2, dave added at 3, carol removed at 4, bob
/// promoted and the group renamed at 5 and 6. Stream seqs are 100 + seq.
fn group_history() -> Vec<Change> {
    let event = |seq, from: &str, group: Vec<GroupChange>| {
        let mut m = msg("g", seq, from, &format!("e{seq}"), 100 + seq);
        m.event = Some(format!("event {seq}"));
        Change::group_message(m, group)
    };
    vec![
        event(
            1,
            "alice",
            vec![
                GroupChange::Join {
                    users: users(&["alice"]),
                    admin: true,
                },
                GroupChange::Join {
                    users: users(&["bob", "carol"]),
                    admin: false,
                },
                GroupChange::Rename {
                    name: "Team".into(),
                },
            ],
        ),
        Change::group_message(msg("g", 2, "bob", "b2", 102), vec![]),
        event(
            3,
            "alice",
            vec![GroupChange::Join {
                users: users(&["dave"]),
                admin: false,
            }],
        ),
        event(
            4,
            "alice",
            vec![GroupChange::Leave {
                users: users(&["carol"]),
            }],
        ),
        event(
            5,
            "alice",
            vec![GroupChange::Admin {
                users: users(&["bob"]),
                admin: true,
            }],
        ),
        event(
            6,
            "bob",
            vec![GroupChange::Rename {
                name: "Team 2".into(),
            }],
        ),
    ]
}

/// Group changes make members join at their event's seq, leave at theirs,
/// gain the admin role and rename the group; the count follows.
pub async fn group_membership_follows_events<S: MessageStore>(store: S) {
    apply_each(&store, group_history()).await;
    assert_eq!(
        store.members("g").await.unwrap(),
        vec![
            member("alice", 1, None, true),
            member("bob", 1, None, true),
            member("carol", 1, Some(4), false),
            member("dave", 3, None, false),
        ]
    );
    assert_eq!(
        store.member("g", "dave").await.unwrap(),
        Some(member("dave", 3, None, false))
    );
    assert_eq!(store.member("g", "erin").await.unwrap(), None);
    let meta = store.conversation("g").await.unwrap().unwrap();
    assert_eq!(
        (meta.name.as_str(), meta.member_count, meta.pos),
        ("Team 2", 3, 106)
    );
    assert_eq!(store.conversation("nope").await.unwrap(), None);
    // The event text is stored with its message.
    let (page, _) = page(&store, "g", after(0, 10)).await;
    assert_eq!(page, vec![1, 2, 3, 4, 5, 6]);
    let stored = store.page("g", after(2, 1)).await.unwrap();
    assert_eq!(stored.messages[0].event.as_deref(), Some("event 3"));

    // Leaving and joining again starts a new membership at the new seq.
    let mut m = msg("g", 7, "alice", "e7", 107);
    m.event = Some("event 7".into());
    store
        .apply(
            vec![Change::group_message(
                m,
                vec![GroupChange::Join {
                    users: users(&["carol", "bob"]),
                    admin: false,
                }],
            )],
            None,
        )
        .await
        .unwrap();
    assert_eq!(
        store.member("g", "carol").await.unwrap(),
        Some(member("carol", 7, None, false))
    );
    // Bob was a member already: unchanged, still admin, counted once.
    assert_eq!(
        store.member("g", "bob").await.unwrap(),
        Some(member("bob", 1, None, true))
    );
    assert_eq!(
        store.conversation("g").await.unwrap().unwrap().member_count,
        4
    );
}

/// Re-applying a stored event (a redelivery, the follower confirming what the
/// stamper stored) never repeats its membership effect.
pub async fn group_changes_apply_once<S: MessageStore>(store: S) {
    let history = group_history();
    store.apply(history.clone(), None).await.unwrap();
    // Again, in one batch and one by one.
    store.apply(history.clone(), Some(106)).await.unwrap();
    apply_each(&store, history).await;
    let meta = store.conversation("g").await.unwrap().unwrap();
    assert_eq!(meta.member_count, 3);
    assert_eq!(
        store.member("g", "carol").await.unwrap(),
        Some(member("carol", 1, Some(4), false))
    );
}

/// A group member's index entry follows the conversation (each change moves
/// it, whatever the group's size) until the member leaves, when it freezes at
/// its removal: a removed member's sync never lists later changes, and its
/// latest seq is the removal.
pub async fn group_index_follows_conversation_until_leave<S: MessageStore>(store: S) {
    apply_each(&store, group_history()).await;
    let listed = |user: &'static str, since| {
        let store = &store;
        async move {
            store
                .user_conversations(user, since, None, 10)
                .await
                .unwrap()
                .convs
        }
    };
    let dave = listed("dave", 0).await;
    assert_eq!(
        dave,
        vec![ConvSummary {
            conv: "g".into(),
            latest: 6,
            pos: 106,
            name: "Team 2".into(),
            member_count: 3,
            joined: 3,
            left: None,
            admin: false,
        }]
    );
    let carol = listed("carol", 0).await;
    assert_eq!(
        (carol[0].latest, carol[0].pos, carol[0].left),
        (4, 104, Some(4))
    );
    // A receipt moves the members' entries (the conversation's position)...
    store
        .apply(
            vec![Change::receipt(rcpt("g", "bob", 6, 6, 110), vec![])],
            None,
        )
        .await
        .unwrap();
    assert_eq!(listed("alice", 106).await.len(), 1);
    assert_eq!(listed("alice", 110).await.len(), 0);
    // ... but not a removed member's.
    assert!(listed("carol", 104).await.is_empty());
    assert_eq!(listed("carol", 103).await[0].pos, 104);
    assert!(listed("erin", 0).await.is_empty());
}
