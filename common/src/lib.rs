//! Runtime plumbing shared by the service binaries: telemetry, layered config, shutdown signals,
//! the admin endpoint (`/healthz`, `/readyz`, `/metrics`), `Retry-After` on refusals, and the driver for per-partition
//! pinned JetStream consumers, NATS connections and credentials, and the consumer lag gauges.
//! Nothing here knows about chat semantics.

pub mod admin;
pub mod balance;
pub mod config;
pub mod http;
pub mod lag;
pub mod nats;
pub mod partitions;

use tokio_util::sync::CancellationToken;

/// Installs the `tracing` subscriber: `RUST_LOG` filter (default `info`), JSON lines when
/// `LOG_FORMAT=json`.
pub fn init_telemetry() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let _ = if std::env::var("LOG_FORMAT").as_deref() == Ok("json") {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// A token cancelled on the first SIGINT (Ctrl-C) or SIGTERM.
pub fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let term = std::future::pending::<()>();
        tokio::select! {
            _ = ctrl_c => {},
            _ = term => {},
        }
        tracing::info!("shutdown signal received");
        t.cancel();
    });
    token
}

/// The default id of a service instance: host name and process id (`web-3-4711`).
pub fn default_instance_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{}-{}", host.trim(), std::process::id())
}

/// The servers of a NATS URL setting: one URL, or several separated by commas (the nodes of a
/// cluster, tried in turn).
pub fn nats_servers(url: &str) -> anyhow::Result<Vec<async_nats::ServerAddr>> {
    use anyhow::Context;
    url.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|u| {
            u.parse::<async_nats::ServerAddr>()
                .with_context(|| format!("invalid NATS server URL {u:?}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()
        .and_then(|v| {
            anyhow::ensure!(!v.is_empty(), "no NATS server URL given");
            Ok(v)
        })
}

/// Connects to NATS as `service` (client name and inbox prefix, see [`nats::connect`]) with
/// the credentials of `auth`, over TLS as `tls` says.
pub async fn connect_nats(
    url: &str,
    service: &str,
    auth: &nats::NatsAuth,
    tls: &nats::NatsTls,
) -> anyhow::Result<async_nats::Client> {
    nats::connect(url, service, auth, tls).await
}

/// Binds `addr` unless it is empty (a disabled listener).
pub async fn bind_optional(addr: &str) -> anyhow::Result<Option<tokio::net::TcpListener>> {
    use anyhow::Context;
    if addr.is_empty() {
        return Ok(None);
    }
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    Ok(Some(listener))
}

/// The whole `main` of a service binary: telemetry, config (defaults, `--config FILE`, env vars
/// with `env_prefix`; a bad config exits 2 with a clear message), signals, then `run`.
pub async fn service_main<C, F, Fut>(name: &str, env_prefix: &str, run: F) -> std::process::ExitCode
where
    C: serde::Serialize + serde::de::DeserializeOwned + Default,
    F: FnOnce(C, CancellationToken) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    init_telemetry();
    let config = match config::config_path_from_args()
        .and_then(|path| config::load::<C>(path.as_deref(), env_prefix).map_err(|e| e.to_string()))
    {
        Ok(config) => config,
        Err(err) => {
            eprintln!("{name}: bad configuration: {err}");
            return std::process::ExitCode::from(2);
        }
    };
    match run(config, shutdown_on_signals()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("{name}: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Waits for `work` (a drain step) at most `grace`, and logs a warning naming `step` when it
/// overruns, so shutdown is bounded and an overrun is visible.
pub async fn within_grace<F: std::future::Future>(
    step: &'static str,
    grace: std::time::Duration,
    work: F,
) {
    if tokio::time::timeout(grace, work).await.is_err() {
        tracing::warn!(
            step,
            grace_ms = grace.as_millis() as u64,
            "shutdown step overran its grace period"
        );
    }
}
