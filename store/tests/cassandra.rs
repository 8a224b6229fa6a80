//! The conformance suite against a real Cassandra or ScyllaDB node, plus the migration.
//!
//! Set `CHAT_TEST_CASSANDRA` to the node's `host:port` (several, comma-separated) and run
//! `cargo test -p chat-store --test cassandra`. Each case gets a keyspace of its own
//! (`chat_test_<pid>_<n>`, replication factor 1), migrated first and dropped afterwards.
//!
//! Without the variable at build time every test here is compiled `#[ignore]`d
//! (`store/build.rs` sets `cfg(cassandra_test_server)` only when it is set), so the harness
//! reports each as `ignored` with the reason, and its summary line counts them as ignored, not
//! passed. `scripts/test.sh` repeats that count at the end of its run.
#![cfg(feature = "cassandra")]

use std::sync::atomic::{AtomicU32, Ordering};

use chat_store::cassandra::{self, CassandraConfig};
use chat_store::{CassandraStore, MessageStore, StoreError, StoreErrorKind};

const ENV: &str = "CHAT_TEST_CASSANDRA";

/// Schema changes one at a time: concurrent DDL makes clusters disagree on the schema.
static DDL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The node addresses of `CHAT_TEST_CASSANDRA`. Only called from tests that are not ignored,
/// i.e. when the variable was set at build time (`store/build.rs`); if it has since been unset,
/// the test fails rather than claim a pass.
fn nodes() -> Vec<String> {
    let nodes: Vec<String> = std::env::var(ENV)
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    assert!(
        !nodes.is_empty(),
        "{ENV} was set when these tests were built but is empty now: set it to host:port"
    );
    nodes
}

fn config(nodes: Vec<String>, keyspace: &str) -> CassandraConfig {
    CassandraConfig {
        contact_points: nodes,
        keyspace: keyspace.to_owned(),
        request_timeout_ms: 30_000,
        ..Default::default()
    }
}

fn fresh_keyspace() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "chat_test_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A migrated, empty keyspace and its store; the keyspace is dropped by [`finish`].
async fn fresh(nodes: Vec<String>) -> (CassandraConfig, CassandraStore) {
    let config = config(nodes, &fresh_keyspace());
    {
        let _ddl = DDL.lock().await;
        cassandra::migrate(&config).await.expect("migrate");
    }
    let store = CassandraStore::open(&config).await.expect("open store");
    (config, store)
}

async fn finish(config: &CassandraConfig) {
    let _ddl = DDL.lock().await;
    if let Err(err) = cassandra::schema::drop_keyspace(config).await {
        eprintln!("could not drop test keyspace {}: {err}", config.keyspace);
    }
}

macro_rules! conformance_tests {
    ($($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            #[cfg_attr(not(cassandra_test_server), ignore = "needs a Cassandra or ScyllaDB node: set CHAT_TEST_CASSANDRA=host:port")]
            async fn $case() {
                let nodes = nodes();
                let (config, store) = fresh(nodes).await;
                chat_store::conformance::$case(store).await;
                finish(&config).await;
            }
        )*
    };
}

chat_store::conformance_cases!(conformance_tests);

/// Migrating twice applies nothing the second time and records the version once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(cassandra_test_server),
    ignore = "needs a Cassandra or ScyllaDB node: set CHAT_TEST_CASSANDRA=host:port"
)]
async fn migration_is_idempotent_and_recorded() {
    let nodes = nodes();
    let config = config(nodes, &fresh_keyspace());
    let _ddl = DDL.lock().await;
    let first = cassandra::migrate(&config).await.unwrap();
    assert_eq!(first.before, None);
    assert_eq!(first.applied, vec![cassandra::schema::LATEST]);
    let again = cassandra::migrate(&config).await.unwrap();
    assert_eq!(again.before, Some(cassandra::schema::LATEST));
    assert!(again.applied.is_empty());
    drop(_ddl);
    CassandraStore::open(&config).await.unwrap();
    finish(&config).await;
}

/// A keyspace that was never migrated is refused at open, naming the command that fixes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(cassandra_test_server),
    ignore = "needs a Cassandra or ScyllaDB node: set CHAT_TEST_CASSANDRA=host:port"
)]
async fn unmigrated_keyspace_is_refused_at_open() {
    let nodes = nodes();
    let config = config(nodes, &fresh_keyspace());
    let err = CassandraStore::open(&config).await.unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Open, "{err:?}");
    assert!(
        matches!(err, StoreError::Schema { have: None, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("migrate-store"), "{err}");
}

/// A batch written again after the store was reopened (a writer restarted after a crash)
/// changes nothing, and the stored state is what a second process sees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(cassandra_test_server),
    ignore = "needs a Cassandra or ScyllaDB node: set CHAT_TEST_CASSANDRA=host:port"
)]
async fn a_second_process_sees_and_reapplies_the_same_state() {
    use chat_store::Change;
    use chat_store::conformance::{msg, summary};
    let nodes = nodes();
    let (config, first) = fresh(nodes).await;
    let both = vec!["alice".to_owned(), "bob".to_owned()];
    let batch: Vec<Change> = (1..=30)
        .map(|seq| {
            Change::message(
                msg("dm~alice~bob", seq, "alice", &format!("c{seq}"), seq),
                both.clone(),
            )
        })
        .collect();
    first.apply(batch.clone(), Some(30)).await.unwrap();
    let second = CassandraStore::open(&config).await.unwrap();
    second.apply(batch, Some(30)).await.unwrap();
    for store in [&first, &second] {
        let page = store.user_conversations("bob", 0, None, 10).await.unwrap();
        assert_eq!(page.convs, vec![summary("dm~alice~bob", 30, 30)]);
        let changed = store.user_conversations("bob", 29, None, 10).await.unwrap();
        assert_eq!(changed.convs, vec![summary("dm~alice~bob", 30, 30)]);
        assert_eq!(store.applied_stream_seq().await.unwrap(), 30);
    }
    finish(&config).await;
}
