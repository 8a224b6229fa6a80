//! The embedded (redb) backend: the shared conformance suite plus
//! embedded-specific behaviour (durability across reopen and process kill,
//! directory handling, file locking).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use chat_store::conformance::{self, marks, messages, msg, range_msgs, rcpt, summary};
use chat_store::{Change, EmbeddedStore, MessageStore, PageQuery, StoreError, StoreErrorKind};
use tempfile::TempDir;

/// A fresh store in its own temporary directory (kept alive with the store).
fn fresh() -> (TempDir, EmbeddedStore) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = EmbeddedStore::open(dir.path()).expect("open store");
    (dir, store)
}

macro_rules! conformance_tests {
    ($($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let (_dir, store) = fresh();
                conformance::$case(store).await;
            }
        )*
    };
}

chat_store::conformance_cases!(conformance_tests);

/// `run_all` (the entry point other backends use) passes too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_all_conformance() {
    let dirs = std::sync::Mutex::new(Vec::new());
    conformance::run_all(|| {
        let (dir, store) = fresh();
        dirs.lock().unwrap().push(dir);
        async move { store }
    })
    .await;
}

async fn assert_contents(store: &EmbeddedStore) {
    let page = store
        .page(
            "c1",
            PageQuery::After {
                after: 0,
                limit: 100,
            },
        )
        .await
        .unwrap();
    assert_eq!(page.messages, range_msgs("c1", 1, 30, 1000));
    assert!(!page.more);
    let page = store
        .page(
            "c2",
            PageQuery::Before {
                before: None,
                limit: 100,
            },
        )
        .await
        .unwrap();
    assert_eq!(page.messages, vec![msg("c2", 1, "bob", "b1", 2000)]);
    assert_eq!(store.latest_seq("c1").await.unwrap(), Some(30));
    assert_eq!(store.latest_seq("c2").await.unwrap(), Some(1));
    assert_eq!(
        store.seq_for_client_id("c1", "alice", "c17").await.unwrap(),
        Some(17)
    );
    assert_eq!(
        store.seq_for_client_id("c2", "bob", "b1").await.unwrap(),
        Some(1)
    );
    assert_eq!(store.applied_stream_seq().await.unwrap(), 2000);
    assert_eq!(
        store.watermarks("c1").await.unwrap(),
        vec![marks("alice", 30, 30), marks("bob", 30, 25)]
    );
    assert_eq!(
        store.watermarks("c2").await.unwrap(),
        vec![marks("bob", 1, 1)]
    );
    for (user, want) in [
        ("alice", vec![summary("c1", 30, 1500)]),
        ("bob", vec![summary("c1", 30, 1500), summary("c2", 1, 2000)]),
        ("carol", vec![summary("c2", 1, 2000)]),
    ] {
        let page = store.user_conversations(user, 0, None, 10).await.unwrap();
        assert_eq!(page.convs, want, "{user}");
        assert_eq!(page.applied, 2000);
    }
}

fn members(users: &[&str]) -> Vec<String> {
    users.iter().map(|&u| u.to_owned()).collect()
}

async fn write_contents(store: &EmbeddedStore) {
    let c1 = members(&["alice", "bob"]);
    for chunk in range_msgs("c1", 1, 30, 1000).chunks(10) {
        let changes = chunk
            .iter()
            .map(|m| Change::message(m.clone(), c1.clone()))
            .collect();
        store.apply(changes, None).await.unwrap();
    }
    store
        .apply(
            vec![Change::receipt(rcpt("c1", "bob", 30, 25, 1500), c1)],
            None,
        )
        .await
        .unwrap();
    store
        .apply(
            vec![Change::message(
                msg("c2", 1, "bob", "b1", 2000),
                members(&["bob", "carol"]),
            )],
            Some(2000),
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn data_survives_drop_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = EmbeddedStore::open(dir.path()).unwrap();
        let clone = store.clone();
        write_contents(&clone).await;
        assert_contents(&store).await;
    }
    let store = EmbeddedStore::open(dir.path()).unwrap();
    assert_contents(&store).await;
    // The reopened store keeps enforcing conflicts against old data.
    let mut changed = msg("c2", 1, "bob", "b1", 2000);
    changed.body = "rewritten".into();
    let err = store
        .apply(messages(vec![changed]), None)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Conflict);
    drop(store);
    let store = EmbeddedStore::open(dir.path()).unwrap();
    assert_contents(&store).await;
}

const CRASH_CHILD_ENV: &str = "CHAT_STORE_CRASH_CHILD_DIR";
const CRASH_CHILD_MARKER: &str = "CHAT_STORE_CHILD_APPENDED";

/// In the child: apply, report, then wait to be killed (never shutting the
/// database down cleanly).
fn crash_child(dir: &Path) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = EmbeddedStore::open(dir).unwrap();
        write_contents(&store).await;
        println!("{CRASH_CHILD_MARKER}");
        std::io::Write::flush(&mut std::io::stdout()).unwrap();
        // Bounded so a lost child cannot linger forever.
        tokio::time::sleep(std::time::Duration::from_secs(120)).await;
        std::process::exit(3);
    });
}

/// A process SIGKILLed right after `apply` returned loses nothing.
#[test]
fn appended_data_survives_process_kill() {
    if let Some(dir) = std::env::var_os(CRASH_CHILD_ENV) {
        crash_child(Path::new(&dir));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "appended_data_survives_process_kill",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CRASH_CHILD_ENV, dir.path())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn child test process");
    let stdout = child.stdout.take().unwrap();
    let appended = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .any(|line| line.contains(CRASH_CHILD_MARKER));
    child.kill().expect("kill child");
    let status = child.wait().unwrap();
    assert!(
        appended,
        "child never reported its appends (status {status})"
    );
    assert!(!status.success(), "child should have been killed: {status}");

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = EmbeddedStore::open(dir.path()).unwrap();
        assert_contents(&store).await;
    });
}

#[test]
fn open_creates_missing_directories() {
    let dir = tempfile::tempdir().unwrap();
    let nested = dir.path().join("a").join("b").join("store");
    let store = EmbeddedStore::open(&nested).unwrap();
    assert_eq!(store.path(), nested.join(EmbeddedStore::DB_FILE));
    assert!(nested.join(EmbeddedStore::DB_FILE).is_file());
}

#[test]
fn open_fails_when_path_is_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"hello").unwrap();
    let err = EmbeddedStore::open(&file).unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Open, "{err:?}");
    assert!(matches!(&err, StoreError::Open { path, .. } if path == &file));
}

#[test]
fn open_fails_on_garbage_database_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join(EmbeddedStore::DB_FILE),
        vec![0xAB; 64 * 1024],
    )
    .unwrap();
    let err = EmbeddedStore::open(dir.path()).unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Open, "{err:?}");
}

#[test]
fn second_open_of_same_directory_fails_while_open() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path()).unwrap();
    let err = EmbeddedStore::open(dir.path()).unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Open, "{err:?}");
    drop(store);
    EmbeddedStore::open(dir.path()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_batch_in_one_apply() {
    let (_dir, store) = fresh();
    store
        .apply(messages(range_msgs("big", 1, 5000, 0)), Some(5000))
        .await
        .unwrap();
    assert_eq!(store.latest_seq("big").await.unwrap(), Some(5000));
    assert_eq!(store.applied_stream_seq().await.unwrap(), 5000);
    let page = store
        .page(
            "big",
            PageQuery::Before {
                before: Some(2501),
                limit: 500,
            },
        )
        .await
        .unwrap();
    assert_eq!(page.messages.first().unwrap().seq, 2001);
    assert_eq!(page.messages.last().unwrap().seq, 2500);
    assert!(page.more);
}

#[test]
fn errors_are_send_sync_and_static() {
    fn assert_traits<T: Send + Sync + 'static + std::error::Error>() {}
    assert_traits::<StoreError>();
    fn assert_store<T: MessageStore + Clone + std::fmt::Debug>() {}
    assert_store::<EmbeddedStore>();
}
