//! The sequencer: gives every message of a conversation its place.
//!
//! **Per message** ([`per_message`]): consumes `CHAT_IN` through one pinned pull consumer per
//! partition (`seq-p<N>`, subjects `chat.inp.<N>.<conv>`), so exactly one process owns a
//! partition at a time; sequencers share the partitions among the live processes. The owner
//! works on many messages at once (different conversations in parallel, one conversation's in
//! stream order): for each it checks membership, assigns the conversation's next dense seq,
//! publishes the stamped `message` frame to `chat.msg.<N>.<conv>` (`chat.gmsg` for groups) in
//! `CHAT_MSGS` (fenced with `Nats-Expected-Last-Subject-Sequence` over the conversation's
//! subjects, deduplicated with `Nats-Msg-Id`), and acks the input once JetStream has the stamp.
//! Receipts come the same way; a run of them becomes at most one stamped `receipt` per member
//! on `chat.rcpt.<N>.<conv>`. Refusals go to the sender on `chat.user.<user>`. The store
//! writer follows `CHAT_MSGS` into the local store, one commit per batch: the stamped stream is
//! the record, the store a view of it.
//!
//! **Reads** ([`reads`]): answers `chat.api.history`, `chat.api.sync`, `chat.api.receipts`,
//! `chat.api.conversations`, `chat.api.group_info`, and `chat.api.contacts` for the presence
//! service's privacy rule (queue group `api`) from the local store.

pub mod config;
pub mod per_message;
mod reads;
pub mod records;
pub mod repair;
pub mod sync_token;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use anyhow::Context;
use chat_common::{
    admin::{self, Readiness},
    balance::{Balance, BalanceSettings},
    partitions,
};
use chat_protocol::{jetstream::live_partitions, subjects};
use chat_store::{AnyStore, Backend, MessageStore};
pub use config::Config;
pub use per_message::STAMPER_HEADER;
use per_message::{Applied, Ctx, PartitionSettings};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// Opens the configured message store backend.
pub async fn open_store(config: &Config) -> anyhow::Result<AnyStore> {
    match config.store {
        Backend::Embedded => AnyStore::embedded(&config.store_dir)
            .await
            .with_context(|| format!("cannot open the store in {}", config.store_dir.display())),
        Backend::Cassandra => AnyStore::cassandra(&config.cassandra)
            .await
            .with_context(|| {
                format!(
                    "cannot open the cassandra store (keyspace {})",
                    config.cassandra.keyspace
                )
            }),
    }
}

/// `sequencer migrate-store`: creates or upgrades the configured store's schema (idempotent)
/// and says what it did. The embedded store needs none (it creates its tables when opened).
pub async fn migrate_store(config: &Config) -> anyhow::Result<String> {
    match config.store {
        Backend::Embedded => Ok(format!(
            "embedded store in {}: nothing to migrate (it creates its tables when opened)",
            config.store_dir.display()
        )),
        Backend::Cassandra => {
            let c = &config.cassandra;
            let report = chat_store::cassandra::migrate(c).await.with_context(|| {
                format!(
                    "cannot migrate keyspace {} at {}",
                    c.keyspace,
                    c.contact_points.join(",")
                )
            })?;
            let latest = chat_store::cassandra::schema::LATEST;
            Ok(if report.applied.is_empty() {
                format!(
                    "keyspace {}: schema version {latest}, nothing to do",
                    c.keyspace
                )
            } else {
                format!(
                    "keyspace {}: applied schema versions {:?} (was {}), now at {latest}",
                    c.keyspace,
                    report.applied,
                    report.before.map_or("none".to_owned(), |v| v.to_string())
                )
            })
        }
    }
}

/// Runs the sequencer until `shutdown`, then drains: stop pulling (what is in flight is
/// finished and acked, the rest handed back), stop the store writer and the API responders,
/// drain the NATS client.
pub async fn run(
    config: Config,
    admin_listener: Option<tokio::net::TcpListener>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        config.follow_stamped || !config.serve_api,
        "serve_api needs follow_stamped: sync answers from a store that follows the stream"
    );
    anyhow::ensure!(
        config.group_max_members >= 1,
        "group_max_members must be at least 1"
    );
    let store = open_store(&config).await?;
    let client = chat_common::connect_nats(
        &config.nats_url,
        "sequencer",
        &config.nats_auth,
        &config.nats_tls,
    )
    .await?;
    let js = async_nats::jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(5))
        .backpressure_on_inflight(true)
        .build(client.clone());
    let count = live_partitions(&js).await?;
    let partitions = match config.partitions.as_deref() {
        Some(list) => per_message::Partitions::Fixed(partitions::select(Some(list), count)?),
        None => per_message::Partitions::All(count),
    };
    let instance = if config.instance_id.is_empty() {
        chat_common::default_instance_id()
    } else {
        config.instance_id.clone()
    };
    // Before stamping or following anything: a store ahead of the stream (power loss) puts
    // the stream's lost tail back first.
    // Built for the embedded store only: a Cassandra store left ahead of a stream that lost its
    // tail (a power cut of every NATS node in interval mode) is not repaired yet.
    if let chat_store::AnyStore::Embedded(embedded) = &store {
        repair::run(&js, embedded, count, &instance)
            .await
            .context("cannot repair the stamped stream from the store")?;
    }
    let (applied_tx, applied) = Applied::new(store.applied_stream_seq().await?);

    let ready = Readiness::default();
    let tasks = TaskTracker::new();
    // Consumers stop first; the store writer and the APIs stop after them.
    let stop_consuming = shutdown.child_token();
    let stop_rest = CancellationToken::new();
    if let Some(listener) = admin_listener {
        tasks.spawn(admin::serve(listener, ready.clone(), stop_rest.clone()));
    }
    // Ready while connected, consuming, and (when it follows the stream) the store writer is.
    let consuming_flag = Arc::new(AtomicBool::new(false));
    let store_healthy = Arc::new(AtomicBool::new(!config.follow_stamped));
    tasks.spawn(admin::ready_while_connected(
        client.clone(),
        ready.clone(),
        {
            let (consuming, store) = (consuming_flag.clone(), store_healthy.clone());
            move || consuming.load(Ordering::Relaxed) && store.load(Ordering::Relaxed)
        },
        stop_consuming.clone(),
    ));
    if config.follow_stamped {
        tasks.spawn(per_message::store_writer::run(
            js.clone(),
            store.clone(),
            applied_tx,
            store_healthy,
            stop_rest.clone(),
        ));
    }
    let lag = chat_common::lag::Lag::start(
        js.clone(),
        Duration::from_millis(config.lag_interval_ms),
        stop_rest.clone(),
    );
    if config.serve_api {
        let (client, store, applied, stop) = (
            client.clone(),
            store.clone(),
            applied.clone(),
            stop_rest.clone(),
        );
        let catch_up = Duration::from_millis(config.api_catch_up_ms);
        tasks.spawn(async move {
            if let Err(err) = reads::serve(client, store, applied, catch_up, stop).await {
                tracing::error!(error = %err, "api responder stopped");
            }
        });
    }
    let balance = if config.balance {
        let settings = BalanceSettings {
            subject: subjects::balance("sequencer"),
            instance: instance.clone(),
            heartbeat: Duration::from_millis(config.balance_heartbeat_ms),
            expire: Duration::from_millis(config.balance_expire_ms),
        };
        Some(Balance::start(client.clone(), settings, stop_rest.clone()).await?)
    } else {
        None
    };
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        js,
        store,
        applied,
        instance,
        group_max_members: config.group_max_members,
        catch_up: Duration::from_millis(config.api_catch_up_ms),
        held_bytes: AtomicUsize::new(0),
        max_held_bytes: config.max_held_mib.max(1) * 1024 * 1024,
        lag,
    });
    let settings = PartitionSettings {
        pull_batch: config.pull_batch.max(1),
        pull_expires: Duration::from_millis(500),
        conv_cache_max: (config.conv_cache_max / count.max(1) as usize).max(16),
    };
    let consuming = tokio::spawn(per_message::run(
        ctx,
        partitions.clone(),
        settings,
        balance,
        stop_consuming,
    ));
    consuming_flag.store(true, Ordering::Relaxed);
    tracing::info!(partitions = ?partitions, of = count, "sequencer running");

    shutdown.cancelled().await;
    ready.set(false);
    tracing::info!("sequencer draining");
    let grace = Duration::from_millis(config.shutdown_grace_ms);
    chat_common::within_grace("stop consumers", grace, consuming).await;
    stop_rest.cancel();
    tasks.close();
    chat_common::within_grace("stop store writer and api", grace, tasks.wait()).await;
    chat_common::within_grace("drain nats", grace, async {
        if let Err(err) = client.drain().await {
            tracing::warn!(error = %err, "nats drain failed");
        }
    })
    .await;
    tracing::info!("sequencer stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn migrate_store_on_the_embedded_backend_has_nothing_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            store_dir: dir.path().join("store"),
            ..Config::default()
        };
        let report = migrate_store(&config).await.unwrap();
        assert!(report.contains("nothing to migrate"), "{report}");
        let store = open_store(&config).await.unwrap();
        assert_eq!(store.backend(), Backend::Embedded);
    }

    #[tokio::test]
    async fn an_unreachable_cassandra_store_is_a_clear_error() {
        let mut config = Config {
            store: Backend::Cassandra,
            ..Config::default()
        };
        // Nothing listens on port 1 of the loopback address.
        config.cassandra.contact_points = vec!["127.0.0.1:1".into()];
        config.cassandra.connect_timeout_ms = 1000;
        let err = open_store(&config).await.unwrap_err();
        let shown = format!("{err:#}");
        assert!(shown.contains("cassandra store (keyspace chat)"), "{shown}");
        assert!(shown.contains("127.0.0.1:1"), "{shown}");
        let err = migrate_store(&config).await.unwrap_err();
        assert!(
            format!("{err:#}").contains("cannot migrate keyspace chat"),
            "{err:#}"
        );
        // A setting that cannot work is refused before connecting.
        config.cassandra.keyspace = "no spaces allowed".into();
        let err = open_store(&config).await.unwrap_err();
        assert!(format!("{err:#}").contains("keyspace"), "{err:#}");
    }
}
