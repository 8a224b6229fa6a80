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

use crate::{MAX_PAGE_LIMIT, MessageStore, Page, PageQuery, StoreErrorKind, StoredMessage};

/// Runs every conformance case, each against a fresh store from `make`.
pub async fn run_all<S, F, Fut>(make: F)
where
    S: MessageStore,
    F: Fn() -> Fut,
    Fut: Future<Output = S>,
{
    empty_store(make().await).await;
    round_trip_preserves_fields(make().await).await;
    empty_append_is_noop(make().await).await;
    page_before_boundaries(make().await).await;
    page_after_boundaries(make().await).await;
    page_limit_is_clamped(make().await).await;
    page_unknown_conversation(make().await).await;
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
    }
}

/// Messages `first..=last` of `conv` from sender "alice", client ids `c<seq>`,
/// stream seq = `stream_base + seq`.
pub fn range_msgs(conv: &str, first: u64, last: u64, stream_base: u64) -> Vec<StoredMessage> {
    (first..=last)
        .map(|seq| msg(conv, seq, "alice", &format!("c{seq}"), stream_base + seq))
        .collect()
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
    };
    let empty = StoredMessage {
        seq: 2,
        client_id: "c2".into(),
        ts_ms: 0,
        body: String::new(),
        stream_seq: 1,
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
    store.append(all.clone()).await.unwrap();
    let got = store.page("conv_~-9", before(None, 10)).await.unwrap();
    assert_eq!(got.messages, all);
    assert!(!got.more);
    let got = store.page("conv_~-9", after(0, 10)).await.unwrap();
    assert_eq!(got.messages, all);
}

/// Appending an empty batch succeeds and changes nothing.
pub async fn empty_append_is_noop<S: MessageStore>(store: S) {
    store.append(vec![]).await.unwrap();
    assert_eq!(store.applied_stream_seq().await.unwrap(), 0);
    store.append(range_msgs("c1", 1, 2, 10)).await.unwrap();
    store.append(vec![]).await.unwrap();
    assert_eq!(store.applied_stream_seq().await.unwrap(), 0);
    assert_eq!(store.latest_seq("c1").await.unwrap(), Some(2));
}

/// Paging backwards through 10 messages, 3 at a time; `more` is exact.
pub async fn page_before_boundaries<S: MessageStore>(store: S) {
    store.append(range_msgs("c1", 1, 10, 0)).await.unwrap();
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
    store.append(range_msgs("c1", 1, 10, 0)).await.unwrap();
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
    store.append(range_msgs("c1", 1, total, 0)).await.unwrap();

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
    store.append(range_msgs("c1", 1, 3, 0)).await.unwrap();
    for conv in ["c0", "c2", "c", "c10"] {
        assert_eq!(page(&store, conv, before(None, 10)).await, (vec![], false));
        assert_eq!(page(&store, conv, after(0, 10)).await, (vec![], false));
        assert_eq!(store.latest_seq(conv).await.unwrap(), None);
    }
}

/// Re-appending identical messages (alone or mixed with new ones) is Ok.
pub async fn idempotent_reappend<S: MessageStore>(store: S) {
    let first = range_msgs("c1", 1, 5, 100);
    store.append(first.clone()).await.unwrap();
    store.append(first.clone()).await.unwrap();
    store.append(vec![first[2].clone()]).await.unwrap();
    // Overlapping batch: 4, 5 already stored, 6..=8 new.
    store.append(range_msgs("c1", 4, 8, 100)).await.unwrap();
    // An identical message twice in one batch.
    store
        .append(vec![first[0].clone(), first[0].clone()])
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
    store.append(vec![original.clone()]).await.unwrap();

    let mut different = original.clone();
    different.body = "something else".into();
    let batch = vec![
        msg("c1", 2, "bob", "b2", 11),
        msg("c2", 1, "bob", "b1", 12),
        different,
        msg("c1", 3, "bob", "b3", 13),
    ];
    let err = store.append(batch).await.unwrap_err();
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
        let err = store.append(vec![m.clone()]).await.unwrap_err();
        assert_eq!(err.kind(), StoreErrorKind::Conflict, "{m:?}: {err:?}");
    }
    // The store still accepts good batches afterwards.
    store
        .append(vec![original.clone(), msg("c1", 2, "bob", "b2", 11)])
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
        .append(vec![msg("c0", 1, "x", "y", 5), a, b])
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
        .append(vec![
            msg("c1", 1, "alice", "a1", 1),
            msg("c1", 0, "alice", "a0", 2),
        ])
        .await
        .unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Invalid, "{err:?}");
    assert_eq!(store.latest_seq("c1").await.unwrap(), None);
    assert_eq!(store.applied_stream_seq().await.unwrap(), 0);
}

/// The client-id index maps (conv, from, client_id) to the stored seq.
pub async fn seq_for_client_id<S: MessageStore>(store: S) {
    store
        .append(vec![
            msg("c1", 1, "alice", "m1", 1),
            msg("c1", 2, "bob", "m1", 2),
            msg("c1", 3, "alice", "m2", 3),
            msg("c2", 1, "alice", "m1", 4),
        ])
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
}

/// If a client id shows up again at another seq, the first seq is kept.
pub async fn client_id_keeps_first_seq<S: MessageStore>(store: S) {
    store
        .append(vec![msg("c1", 1, "alice", "m1", 1)])
        .await
        .unwrap();
    store
        .append(vec![msg("c1", 2, "alice", "m1", 2)])
        .await
        .unwrap();
    assert_eq!(
        store.seq_for_client_id("c1", "alice", "m1").await.unwrap(),
        Some(1)
    );
    store
        .append(vec![
            msg("c1", 4, "bob", "m9", 4),
            msg("c1", 3, "bob", "m9", 3),
        ])
        .await
        .unwrap();
    assert_eq!(
        store.seq_for_client_id("c1", "bob", "m9").await.unwrap(),
        Some(4)
    );
}

/// latest_seq is the highest stored seq, whatever the arrival order.
pub async fn latest_seq_tracks_max<S: MessageStore>(store: S) {
    store.append(range_msgs("c1", 1, 3, 0)).await.unwrap();
    assert_eq!(store.latest_seq("c1").await.unwrap(), Some(3));
    store.append(range_msgs("c1", 7, 9, 0)).await.unwrap();
    assert_eq!(store.latest_seq("c1").await.unwrap(), Some(9));
    store.append(range_msgs("c1", 4, 6, 0)).await.unwrap();
    assert_eq!(store.latest_seq("c1").await.unwrap(), Some(9));
    // Out of order inside one batch.
    let mut batch = range_msgs("c1", 10, 12, 0);
    batch.reverse();
    store.append(batch).await.unwrap();
    assert_eq!(store.latest_seq("c1").await.unwrap(), Some(12));
    assert_eq!(store.latest_seq("c2").await.unwrap(), None);
    store.append(range_msgs("c2", 1, 1, 0)).await.unwrap();
    assert_eq!(store.latest_seq("c2").await.unwrap(), Some(1));
    assert_eq!(store.latest_seq("c1").await.unwrap(), Some(12));
}

/// Only `append_followed` moves the applied watermark, to `through`, and never lowers it; plain
/// `append` (the stamper's out-of-order writes) leaves it alone.
pub async fn applied_stream_seq_is_monotonic<S: MessageStore>(store: S) {
    store
        .append(vec![
            msg("c1", 1, "a", "x1", 10),
            msg("c1", 2, "a", "x2", 7),
        ])
        .await
        .unwrap();
    assert_eq!(store.applied_stream_seq().await.unwrap(), 0);
    store
        .append_followed(vec![msg("c1", 1, "a", "x1", 10)], 10)
        .await
        .unwrap();
    assert_eq!(store.applied_stream_seq().await.unwrap(), 10);
    // An older batch (e.g. a redelivery) does not lower it.
    store
        .append_followed(vec![msg("c2", 1, "a", "x1", 5)], 5)
        .await
        .unwrap();
    assert_eq!(store.applied_stream_seq().await.unwrap(), 10);
    // A batch with nothing new to store still records progress.
    store.append_followed(vec![], 20).await.unwrap();
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
    store.append(batch).await.unwrap();

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
        .append(vec![
            msg("a", 1, "bc", "d", 1),
            msg("a", 2, "b", "cd", 2),
            msg("ab", 1, "c", "d", 3),
            msg("a", 3, "b-c", "d", 4),
            msg("a", 4, "b", "c-d", 5),
        ])
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
                    .append_followed(batch, through)
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
