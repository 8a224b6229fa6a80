//! The fan-out worker: delivers stamped messages and receipts to every device of every member.
//!
//! Consumes `CHAT_MSGS` through one pinned pull consumer per partition (`fanout-p<N>`, subjects
//! `chat.msg.<N>.<conv>` and `chat.rcpt.<N>.<conv>`), so one worker delivers a partition at a
//! time and each recipient sees a conversation's events in stream order. Each event's unchanged
//! frame goes to the core NATS subject `chat.user.<member>` of every member, the sender included
//! (the sender's other devices see it, and the sender learns the seq).
//!
//! Pushes are best effort by design: a device that was offline or dropped a push recovers with
//! `sync` and its cursors. A recipient with no connected device gets an offline push
//! notification on `chat.push.<user>` (see [`deliver`]).

use std::time::Duration;

use chat_common::{
    admin::{self, Readiness},
    partitions::{self, PullSettings},
};
use chat_protocol::{jetstream::fanout_consumer, subjects};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

pub mod deliver;

/// Fan-out worker settings (`CHAT_FANOUT_*` env vars or a TOML file).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// NATS server URL.
    pub nats_url: String,
    /// Admin endpoint (`/healthz`, `/readyz`, `/metrics`); empty disables it.
    pub admin_listen: String,
    /// Partitions this worker competes for (default: all).
    pub partitions: Option<Vec<u32>>,
    /// Messages pulled per request.
    pub pull_batch: usize,
    /// Grace period for in-flight work at shutdown.
    pub shutdown_grace_ms: u64,
    /// How long a push waits for a gateway to confirm a connected device before the recipient
    /// is counted as online anyway (no notification).
    pub presence_timeout_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            nats_url: "nats://127.0.0.1:4222".into(),
            admin_listen: "127.0.0.1:9092".into(),
            partitions: None,
            pull_batch: 256,
            shutdown_grace_ms: 5000,
            presence_timeout_ms: 5000,
        }
    }
}

/// Runs the worker until `shutdown`, then stops pulling, finishes the message in hand, and
/// drains the NATS client.
pub async fn run(
    config: Config,
    admin_listener: Option<tokio::net::TcpListener>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let partitions = partitions::select(config.partitions.as_deref(), subjects::PARTITIONS)?;
    let client = chat_common::connect_nats(&config.nats_url, "fanout-worker").await?;
    let js = async_nats::jetstream::new(client.clone());
    let ready = Readiness::default();
    let stop_admin = CancellationToken::new();
    let admin_task =
        admin_listener.map(|l| tokio::spawn(admin::serve(l, ready.clone(), stop_admin.clone())));
    let consumers = partitions
        .iter()
        .map(|p| (*p, fanout_consumer(*p)))
        .collect();
    let stop_delivery = CancellationToken::new();
    let deliverer = deliver::Deliverer::start(
        client.clone(),
        Duration::from_millis(config.presence_timeout_ms),
        stop_delivery.clone(),
    )
    .await?;
    let consuming = tokio::spawn(partitions::run(
        js,
        subjects::STREAM_STAMPED,
        consumers,
        PullSettings {
            group: subjects::FANOUT_GROUP,
            batch: config.pull_batch,
            expires: Duration::from_secs(2),
        },
        move |_p, msg| {
            let deliverer = deliverer.clone();
            async move { deliverer.deliver(msg).await }
        },
        shutdown.child_token(),
    ));
    ready.set(true);
    tracing::info!(partitions = ?partitions, "fan-out worker running");
    shutdown.cancelled().await;
    ready.set(false);
    let grace = Duration::from_millis(config.shutdown_grace_ms);
    chat_common::within_grace("stop consumers", grace, consuming).await;
    // Unresolved pushes are not acked: their messages come back to the next worker.
    stop_delivery.cancel();
    stop_admin.cancel();
    if let Some(task) = admin_task {
        let _ = task.await;
    }
    client.drain().await.ok();
    Ok(())
}
