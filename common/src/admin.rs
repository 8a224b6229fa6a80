//! The admin HTTP endpoint of every service: `/healthz` (the process runs), `/readyz` (it is
//! connected and consuming) and `/metrics` (Prometheus text format).
//!
//! Latency metrics (names ending in `_seconds`) and batch sizes (`_size`) are exported as
//! Prometheus histograms with fixed buckets, so percentiles can be aggregated over every
//! replica (`histogram_quantile(0.99, sum by (le) (rate(x_bucket[5m])))`).

use std::sync::{
    Arc, OnceLock,
    atomic::{AtomicBool, Ordering},
};

use axum::{Router, extract::State, http::StatusCode, routing::get};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

/// Histogram buckets of every `_seconds` metric: 1 ms to 30 s.
pub const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Histogram buckets of every `_size` metric (batch sizes).
pub const SIZE_BUCKETS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0,
];

/// The process-wide Prometheus recorder, installed on first use.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Suffix("_size".into()), SIZE_BUCKETS)
                })
                .expect("bucket lists are not empty")
                .build_recorder();
            let handle = recorder.handle();
            // Several services may share a process in tests; the first recorder wins.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// Readiness flag flipped by the service once it consumes.
#[derive(Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Relaxed);
    }

    pub fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// The admin router; tests call it without a socket.
pub fn router(ready: Readiness) -> Router {
    let handle = metrics_handle();
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|State(ready): State<Readiness>| async move {
                if ready.get() {
                    (StatusCode::OK, "ready")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "not ready")
                }
            }),
        )
        .route("/metrics", get(move || async move { handle.render() }))
        .with_state(ready)
}

/// Keeps `ready` in step with `nats`'s connection and `also` (another condition, e.g. the
/// store), checked every 500 ms until `stop`; then not ready. `ready` is set only once `also`
/// holds, so a service marks itself ready by making it true.
pub async fn ready_while_connected(
    nats: async_nats::Client,
    ready: Readiness,
    also: impl Fn() -> bool,
    stop: CancellationToken,
) {
    let mut every = tokio::time::interval(std::time::Duration::from_millis(500));
    while stop.run_until_cancelled(every.tick()).await.is_some() {
        let connected = nats.connection_state() == async_nats::connection::State::Connected;
        ready.set(connected && also());
    }
    ready.set(false);
}

/// Serves the admin router on `listener` until `shutdown`. The metrics recorder is installed
/// when this is called, not when the returned future first runs, so what the caller records
/// right after spawning it is kept.
pub fn serve(
    listener: tokio::net::TcpListener,
    ready: Readiness,
    shutdown: CancellationToken,
) -> impl Future<Output = std::io::Result<()>> + Send {
    let router = router(ready);
    async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
    }
}
