//! The sequencer: gives every message of a conversation its place.
//!
//! Consumes `CHAT_IN` through one pinned pull consumer per partition (`seq-p<N>`, subjects
//! `chat.inp.<N>.<conv>`), so exactly one process stamps a partition at a time. For each
//! message it checks membership, assigns the next dense seq of the conversation, publishes the
//! stamped `message` frame to `chat.msg.<N>.<conv>` in `CHAT_MSGS` (fenced with
//! `Nats-Expected-Last-Subject-Sequence`, deduplicated with `Nats-Msg-Id`), writes it to the
//! message store, and only then acks the input. Refusals go to the sender on `chat.user.<user>`.
//!
//! Receipts from clients come the same way; moved watermarks go to `chat.rcpt.<N>.<conv>`.
//!
//! It also follows `CHAT_MSGS` (messages and receipts) into its store and answers
//! `chat.api.history`, `chat.api.sync` and `chat.api.receipts` (queue group `api`), and
//! `chat.api.contacts` for the presence service's privacy rule (`contacts.rs`).

mod api;
pub mod config;
mod contacts;
mod follower;
pub mod groups;
pub mod stamper;

use std::time::Duration;

use anyhow::Context;
use chat_common::{
    admin::{self, Readiness},
    partitions::{self, PullSettings},
};
use chat_protocol::{jetstream::sequencer_consumer, subjects};
use chat_store::EmbeddedStore;
pub use config::Config;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// Runs the sequencer until `shutdown`, then drains: stop pulling, finish the message in hand
/// (its ack is sent), stop the follower and history, drain the NATS client.
pub async fn run(
    config: Config,
    admin_listener: Option<tokio::net::TcpListener>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let partitions = partitions::select(config.partitions.as_deref(), subjects::PARTITIONS)?;
    anyhow::ensure!(
        config.follow_stamped || !config.serve_api,
        "serve_api needs follow_stamped: sync answers from a store that follows the stream"
    );
    let store_dir = config.store_dir.clone();
    let store = tokio::task::spawn_blocking(move || EmbeddedStore::open(store_dir))
        .await?
        .with_context(|| format!("cannot open the store in {}", config.store_dir.display()))?;
    let client = chat_common::connect_nats(&config.nats_url, "sequencer").await?;
    let js = async_nats::jetstream::new(client.clone());
    let instance = if config.instance_id.is_empty() {
        chat_common::default_instance_id()
    } else {
        config.instance_id.clone()
    };
    anyhow::ensure!(
        config.group_max_members >= 1,
        "group_max_members must be at least 1"
    );
    let stamper = stamper::Stamper::new(
        client.clone(),
        store.clone(),
        instance,
        config.group_max_members,
    )
    .await
    .map_err(|e| anyhow::anyhow!("cannot open stream {}: {e}", subjects::STREAM_STAMPED))?;

    let ready = Readiness::default();
    let tasks = TaskTracker::new();
    // Consumers stop first; the follower and history stop after them.
    let stop_consuming = shutdown.child_token();
    let stop_rest = CancellationToken::new();
    if let Some(listener) = admin_listener {
        tasks.spawn(admin::serve(listener, ready.clone(), stop_rest.clone()));
    }
    if config.follow_stamped {
        tasks.spawn(follower::run(js.clone(), store.clone(), stop_rest.clone()));
    }
    if config.serve_api {
        let (client, store, stop) = (client.clone(), store.clone(), stop_rest.clone());
        let catch_up = Duration::from_millis(config.api_catch_up_ms);
        tasks.spawn(async move {
            if let Err(err) = api::serve(client, store, catch_up, stop).await {
                tracing::error!(error = %err, "api responder stopped");
            }
        });
    }
    let consumers = partitions
        .iter()
        .map(|p| (*p, sequencer_consumer(*p)))
        .collect();
    let consuming = tokio::spawn(partitions::run(
        js,
        subjects::STREAM_INBOUND,
        consumers,
        PullSettings {
            group: subjects::SEQUENCER_GROUP,
            batch: 64,
            expires: Duration::from_secs(1),
        },
        move |p, msg| {
            let stamper = stamper.clone();
            async move { stamper.handle(p, msg).await }
        },
        stop_consuming,
    ));
    ready.set(true);
    tracing::info!(partitions = ?partitions, "sequencer running");

    shutdown.cancelled().await;
    ready.set(false);
    let grace = Duration::from_millis(config.shutdown_grace_ms);
    chat_common::within_grace("stop consumers", grace, consuming).await;
    stop_rest.cancel();
    tasks.close();
    chat_common::within_grace("stop follower and api", grace, tasks.wait()).await;
    client.drain().await.ok();
    Ok(())
}
