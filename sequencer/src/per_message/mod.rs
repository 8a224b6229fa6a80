//! The code that runs for every message: pulling `CHAT_IN` partitions, stamping, publishing to
//! `CHAT_MSGS`, acking, and writing the local store from the stamped stream.
//!
//! - [`partition`]: one partition's owner (many messages in flight, one per conversation);
//! - [`conversation`]: what the owner knows of a conversation (head, watermarks, members);
//! - [`inbound`]: decoding and validating what gateways published;
//! - [`store_writer`]: the stamped stream into the store, one commit per batch.
//!
//! Processes share the partitions: each pulls only those it owns among the live sequencers
//! ([`chat_common::balance`], heartbeats on `chat.ctl.sequencer.live`), and the server's pin
//! makes one of them the owner of each partition at a time.

pub mod conversation;
pub mod inbound;
pub mod partition;
pub mod store_writer;

use std::{
    sync::{Arc, atomic::AtomicUsize},
    time::Duration,
};

use chat_common::balance::Balance;
use chat_protocol::jetstream::sequencer_consumer;
use chat_store::MessageStore;
use tokio_util::sync::CancellationToken;

pub use partition::PartitionSettings;
pub use store_writer::Applied;

/// Header naming the sequencer instance that stamped a message (for operators and tests).
pub const STAMPER_HEADER: &str = "Chat-Stamper";

/// What every partition owner of a process shares.
pub struct Ctx<S> {
    pub client: async_nats::Client,
    pub js: async_nats::jetstream::Context,
    pub store: S,
    pub applied: Applied,
    /// Written to the `Chat-Stamper` header.
    pub instance: String,
    pub group_max_members: u32,
    /// How long loading a conversation waits for the local store.
    pub catch_up: Duration,
    /// Payload bytes of the inputs held by every partition of this process, and the bound
    /// above which they stop pulling.
    pub held_bytes: AtomicUsize,
    pub max_held_bytes: usize,
    /// Where the lag of each owned partition's consumer is reported.
    pub lag: chat_common::lag::Lag,
}

/// How often a process that competes for every partition looks for new ones (the partition
/// count grew, `nats/README.md`).
const NEW_PARTITIONS_EVERY: Duration = Duration::from_secs(5);

/// Which partitions a process competes for.
#[derive(Debug, Clone)]
pub enum Partitions {
    /// These, whatever the count.
    Fixed(Vec<u32>),
    /// Every partition: `0..count` now, and those added when the count grows.
    All(u32),
}

/// Owns and stamps its partitions until `shutdown`: all of them, or with `balance` those this
/// process owns among the live sequencers, as ownership moves.
pub async fn run<S: MessageStore>(
    ctx: Arc<Ctx<S>>,
    partitions: Partitions,
    settings: PartitionSettings,
    balance: Option<Balance>,
    shutdown: CancellationToken,
) {
    let mut tasks = tokio::task::JoinSet::new();
    let spawn = |tasks: &mut tokio::task::JoinSet<()>, p: u32| {
        let (ctx, settings, balance, shutdown) = (
            ctx.clone(),
            settings.clone(),
            balance.clone(),
            shutdown.clone(),
        );
        tasks.spawn(async move { own(ctx, p, settings, balance, shutdown).await });
    };
    let mut count = match &partitions {
        Partitions::Fixed(list) => {
            for p in list {
                spawn(&mut tasks, *p);
            }
            while tasks.join_next().await.is_some() {}
            return;
        }
        Partitions::All(count) => *count,
    };
    for p in 0..count {
        spawn(&mut tasks, p);
    }
    let mut every = tokio::time::interval(NEW_PARTITIONS_EVERY);
    every.tick().await;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = every.tick() => {}
        }
        match chat_protocol::jetstream::live_partitions(&ctx.js).await {
            Ok(now) if now > count => {
                tracing::info!(from = count, to = now, "the partition count grew");
                for p in count..now {
                    spawn(&mut tasks, p);
                }
                count = now;
            }
            Ok(_) => {}
            Err(err) => tracing::debug!(error = %err, "reading the partition count failed"),
        }
    }
    while tasks.join_next().await.is_some() {}
}

async fn own<S: MessageStore>(
    ctx: Arc<Ctx<S>>,
    p: u32,
    settings: PartitionSettings,
    mut balance: Option<Balance>,
    shutdown: CancellationToken,
) {
    let name = sequencer_consumer(p);
    let lag = ctx.lag.clone();
    let mut owner = partition::Partition::new(ctx, p, settings);
    loop {
        if let Some(b) = balance.as_mut()
            && !b.until_owned(&name, &shutdown).await
        {
            return;
        }
        if shutdown.is_cancelled() {
            return;
        }
        let lost = shutdown.child_token();
        let watcher = balance.clone().map(|mut b| {
            let (lost, name) = (lost.clone(), name.clone());
            tokio::spawn(async move {
                b.until_lost(&name, &lost).await;
                lost.cancel();
            })
        });
        tracing::info!(partition = p, "pulling partition");
        metrics::gauge!("sequencer_partitions_pulled").increment(1.0);
        let tracked = lag.track(chat_protocol::subjects::STREAM_INBOUND, &name, p);
        let mut backoff = Duration::from_millis(100);
        while !lost.is_cancelled() {
            match owner.run(&lost).await {
                Ok(()) => backoff = Duration::from_millis(100),
                Err(err) => {
                    tracing::warn!(partition = p, error = %err, "partition consumer failed, pulling again");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {},
                        _ = lost.cancelled() => {},
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
        metrics::gauge!("sequencer_partitions_pulled").decrement(1.0);
        drop(tracked);
        if let Some(w) = watcher {
            w.abort();
        }
        if shutdown.is_cancelled() || balance.is_none() {
            return;
        }
        tracing::info!(partition = p, "released partition to another sequencer");
    }
}
