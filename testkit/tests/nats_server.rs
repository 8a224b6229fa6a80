//! Integration tests for `chat_testkit::NatsServer` against a real nats-server.

use std::net::TcpStream;
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use chat_testkit::{NatsServer, free_port, nats_server_bin};
use futures::StreamExt;

const WAIT: Duration = Duration::from_secs(10);

async fn create_file_stream(js: &jetstream::Context, name: &str, subject: &str) -> stream::Stream {
    js.create_stream(stream::Config {
        name: name.to_owned(),
        subjects: vec![subject.to_owned()],
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .expect("create stream")
}

#[test]
fn binary_is_found() {
    let bin = nats_server_bin();
    assert!(bin.exists(), "{}", bin.display());
}

#[test]
fn free_port_is_bindable() {
    let port = free_port();
    assert_ne!(port, 0);
    std::net::TcpListener::bind(("127.0.0.1", port)).expect("port returned by free_port is free");
}

#[tokio::test]
async fn core_publish_subscribe() {
    let server = NatsServer::start();
    assert!(server.url().starts_with("nats://127.0.0.1:"));
    assert_eq!(server.url(), format!("nats://127.0.0.1:{}", server.port()));
    assert!(server.pid() > 0);

    let client = server.client().await;
    let mut sub = client.subscribe("greet.joe").await.unwrap();
    client.flush().await.unwrap();

    let other = server.client().await;
    other.publish("greet.joe", "hello".into()).await.unwrap();
    other.flush().await.unwrap();

    let msg = tokio::time::timeout(WAIT, sub.next())
        .await
        .expect("message within timeout")
        .expect("subscription open");
    assert_eq!(msg.subject.as_str(), "greet.joe");
    assert_eq!(&msg.payload[..], b"hello");
}

#[tokio::test]
async fn jetstream_message_survives_kill_and_restart() {
    let mut server = NatsServer::start();
    let (port, pid, store_dir) = (server.port(), server.pid(), server.store_dir());

    let client = server.client().await;
    let js = jetstream::new(client.clone());
    create_file_stream(&js, "EVENTS", "events.>").await;
    for payload in ["first", "second"] {
        let ack = js
            .publish("events.created", payload.into())
            .await
            .unwrap()
            .await
            .expect("publish ack");
        assert_eq!(ack.stream, "EVENTS");
    }
    assert!(store_dir.join("jetstream").is_dir());

    // Hard kill: nothing is listening any more.
    server.kill();
    assert!(!server.is_running());
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
    server.kill(); // idempotent

    server.restart();
    assert!(server.is_running());
    assert_eq!(server.port(), port, "restart keeps the port");
    assert_ne!(server.pid(), pid, "restart spawns a new process");
    assert_eq!(server.store_dir(), store_dir, "restart keeps the store dir");

    // A fresh client sees both messages.
    let js2 = jetstream::new(server.client().await);
    let mut events = js2.get_stream("EVENTS").await.expect("stream survived");
    assert_eq!(events.info().await.unwrap().state.messages, 2);
    let msg = events.get_raw_message(1).await.unwrap();
    assert_eq!(&msg.payload[..], b"first");
    let msg = events.get_raw_message(2).await.unwrap();
    assert_eq!(&msg.payload[..], b"second");

    // The original client reconnects by itself (same URL) and can publish
    // (the message id dedupes retries whose ack got lost).
    let ack = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let publish = jetstream::message::PublishMessage::build()
                .payload("third".into())
                .message_id("third");
            if let Ok(ack) = js.send_publish("events.created", publish).await
                && let Ok(ack) = ack.await
            {
                break ack;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("old client reconnected");
    assert_eq!(ack.sequence, 3);

    // Restart while running also works.
    server.restart();
    assert_eq!(server.port(), port);
    let js3 = jetstream::new(server.client().await);
    let mut events = js3.get_stream("EVENTS").await.unwrap();
    assert_eq!(events.info().await.unwrap().state.messages, 3);
}

#[test]
fn two_servers_get_different_ports_and_dirs() {
    let a = NatsServer::start();
    let b = NatsServer::start();
    assert_ne!(a.port(), b.port());
    assert_ne!(a.url(), b.url());
    assert_ne!(a.store_dir(), b.store_dir());
    assert_ne!(a.pid(), b.pid());
}

#[test]
fn drop_kills_server_and_removes_dir() {
    let server = NatsServer::start();
    let (port, dir, pid) = (server.port(), server.dir().to_path_buf(), server.pid());
    assert!(TcpStream::connect(("127.0.0.1", port)).is_ok());
    drop(server);
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
    assert!(!dir.exists());
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
}

#[tokio::test]
async fn start_with_config_applies_extra_options() {
    // A `jetstream {}` block in the extra config must not drop the store dir.
    let mut server = NatsServer::start_with_config(
        "max_payload: 2048\njetstream {\n  max_memory_store: 64MB\n  max_file_store: 256MB\n}\n",
    );
    let config = std::fs::read_to_string(server.config_path().unwrap()).unwrap();
    assert!(config.contains("max_payload: 2048"));

    let client = server.client().await;
    assert_eq!(client.server_info().max_payload, 2048);

    let js = jetstream::new(client);
    let logs = server.logs();
    assert!(
        logs.lines()
            .any(|l| l.contains("Max Memory:") && l.contains("64.00 MB")),
        "{logs}"
    );
    create_file_stream(&js, "CFG", "cfg.>").await;
    js.publish("cfg.x", "persisted".into())
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(server.store_dir().join("jetstream").is_dir());

    let port = server.port();
    server.restart();
    assert_eq!(server.port(), port);
    let client = server.client().await;
    assert_eq!(client.server_info().max_payload, 2048);
    let js = jetstream::new(client);
    let stream = js.get_stream("CFG").await.unwrap();
    let msg = stream.get_raw_message(1).await.unwrap();
    assert_eq!(&msg.payload[..], b"persisted");
}

#[tokio::test]
async fn sigstop_freezes_and_sigcont_resumes() {
    let mut server = NatsServer::start();
    let client = server.client().await;
    // A JetStream API request is answered by the server itself.
    let ask = || client.request("$JS.API.INFO", "".into());
    ask().await.expect("server answers");

    server.sigstop();
    assert!(server.is_running(), "a stopped server is still running");
    let frozen = tokio::time::timeout(Duration::from_millis(500), ask()).await;
    assert!(
        !matches!(frozen, Ok(Ok(_))),
        "no reply while the server is stopped"
    );

    server.sigcont();
    tokio::time::timeout(WAIT, ask())
        .await
        .expect("reply after SIGCONT")
        .expect("request succeeds");
}

#[test]
fn logs_are_kept() {
    let server = NatsServer::start();
    let logs = server.logs();
    assert!(logs.contains("Server is ready"), "{logs}");
    assert!(server.log_path().starts_with(server.dir()));
}

/// The streams of `nats/*.json` reserve their `max_bytes` (CHAT_IN: 10 GiB) against the
/// server's store limit, which by default is 75 % of the free disk: the test kit sets an
/// explicit limit, so a stream reserving more than this disk holds is still created, with or
/// without a `jetstream` block of the test's own.
#[tokio::test]
async fn streams_may_reserve_more_than_the_free_disk() {
    const RESERVE: i64 = 512 << 30; // 512 GiB: more than this disk (and CI's) holds
    for server in [
        NatsServer::start(),
        NatsServer::start_with_config("jetstream {\n  max_memory_store: 64MB\n}\n"),
    ] {
        let client = async_nats::connect(server.url()).await.expect("connect");
        let js = jetstream::new(client);
        let created = js
            .create_stream(stream::Config {
                name: "BIG".to_owned(),
                subjects: vec!["big.>".to_owned()],
                storage: stream::StorageType::File,
                max_bytes: RESERVE,
                ..Default::default()
            })
            .await;
        let info = created
            .unwrap_or_else(|e| panic!("a {RESERVE}-byte reservation was refused: {e}"))
            .cached_info()
            .clone();
        assert_eq!(info.config.max_bytes, RESERVE);
    }
}
