//! What an operator scrapes from a service's admin endpoint, against a real nats-server:
//! - the backlog of a consumer the process pulls, as `chat_consumer_pending_messages` with
//!   stream, consumer and partition labels, back to 0 once the process stops pulling it;
//! - latency histograms with the fixed buckets, so percentiles aggregate over replicas;
//! - `/readyz` follows the NATS connection: not ready while the server is down, ready again
//!   after it is back.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use chat_common::{
    admin::{self, Readiness},
    lag::Lag,
};
use chat_testkit::NatsServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(15);

/// A service's admin endpoint on a random port, serving until the token is cancelled.
struct Endpoint {
    addr: std::net::SocketAddr,
    stop: CancellationToken,
}

impl Endpoint {
    async fn start(ready: &Readiness) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        tokio::spawn(admin::serve(listener, ready.clone(), stop.clone()));
        Self { addr, stop }
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// `GET path` over HTTP, as a scraper or a kubelet probe does: status and body.
async fn get(endpoint: &Endpoint, path: &str) -> (u16, String) {
    let mut tcp = tokio::net::TcpStream::connect(endpoint.addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n");
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    tcp.read_to_string(&mut response).await.unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {response}"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Waits until `/metrics` has a line with every one of `parts`.
async fn wait_metric(endpoint: &Endpoint, parts: &[&str]) -> String {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (_, body) = get(endpoint, "/metrics").await;
        if let Some(line) = body.lines().find(|l| parts.iter().all(|p| l.contains(p))) {
            return line.to_owned();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no metric line with {parts:?} in:\n{body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_ready(endpoint: &Endpoint, want: u16) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while get(endpoint, "/readyz").await.0 != want {
        assert!(
            tokio::time::Instant::now() < deadline,
            "/readyz never answered {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_lag_is_exported_while_pulled_and_zeroed_after() {
    let nats = NatsServer::start();
    let client = nats.client().await;
    let js = jetstream::new(client.clone());
    let s = js
        .create_stream(stream::Config {
            name: "LAGTEST".into(),
            subjects: vec!["lagtest.>".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    s.create_consumer(consumer::pull::Config {
        durable_name: Some("lag-p3".into()),
        ..Default::default()
    })
    .await
    .unwrap();
    for i in 0..7 {
        js.publish("lagtest.x", format!("{i}").into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let stop = CancellationToken::new();
    let lag = Lag::start(js.clone(), Duration::from_millis(100), stop.clone());
    let endpoint = Endpoint::start(&Readiness::default()).await;
    let labels = [
        "chat_consumer_pending_messages{",
        "stream=\"LAGTEST\"",
        "consumer=\"lag-p3\"",
        "partition=\"3\"",
    ];
    let tracked = lag.track("LAGTEST", "lag-p3", 3);
    let line = wait_metric(&endpoint, &[&labels[..], &["} 7"]].concat()).await;
    assert!(!line.contains("user") && !line.contains("conv"), "{line}");
    drop(tracked);
    wait_metric(&endpoint, &[&labels[..], &["} 0"]].concat()).await;
    stop.cancel();
}

#[tokio::test]
async fn latency_histograms_have_fixed_buckets() {
    let endpoint = Endpoint::start(&Readiness::default()).await;
    // The recorder is installed before anything is recorded, as every service does.
    admin::metrics_handle();
    metrics::histogram!("chat_test_delivery_seconds").record(0.003);
    let line = wait_metric(
        &endpoint,
        &["chat_test_delivery_seconds_bucket{le=\"0.005\"}", "} 1"],
    )
    .await;
    assert!(line.ends_with(" 1"), "{line}");
    wait_metric(
        &endpoint,
        &["chat_test_delivery_seconds_bucket{le=\"0.0025\"}", "} 0"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_nats_connection() {
    let mut nats = NatsServer::start();
    let client = nats.client().await;
    let ready = Readiness::default();
    let endpoint = Endpoint::start(&ready).await;
    let stop = CancellationToken::new();
    let task = tokio::spawn(admin::ready_while_connected(
        client.clone(),
        ready.clone(),
        || true,
        stop.clone(),
    ));
    assert_eq!(get(&endpoint, "/healthz").await.0, 200);
    wait_ready(&endpoint, 200).await;
    nats.kill();
    wait_ready(&endpoint, 503).await;
    assert_eq!(
        get(&endpoint, "/healthz").await.0,
        200,
        "alive while NATS is down"
    );
    nats.restart();
    wait_ready(&endpoint, 200).await;
    stop.cancel();
    task.await.unwrap();
    assert_eq!(
        get(&endpoint, "/readyz").await.0,
        503,
        "not ready once stopped"
    );
}
