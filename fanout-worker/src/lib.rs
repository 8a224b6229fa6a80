//! The fan-out worker: delivers stamped messages and receipts to every device of every member.
//!
//! Consumes `CHAT_MSGS` through one pinned pull consumer per partition (`fanout-p<N>`, subjects
//! `chat.msg.<N>.<conv>` and `chat.rcpt.<N>.<conv>`), so one worker delivers a partition at a
//! time and each recipient sees a conversation's events in stream order. Each event's unchanged
//! frame goes to the core NATS subject `chat.user.<member>` of every member, the sender included
//! (the sender's other devices see it, and the sender learns the seq).
//!
//! Groups have consumers of their own (`fanout-g-p<N>`, subjects `chat.gmsg.<N>.<conv>` and
//! `chat.grcpt.<N>.<conv>`), rate-limited per conversation and per worker, with a membership
//! view per group kept from the stream and seeded from `chat.api.group_info`; large groups are
//! published once on `chat.grp.<conv>` (see [`groups`]). `direct` and `groups` choose which of
//! the two a worker runs, so they can be separate deployments. Several workers share the
//! consumers: each pulls only those it owns among the live workers ([`chat_common::balance`]).
//!
//! Pushes are best effort by design: a device that was offline or dropped a push recovers with
//! `sync` and its cursors. A recipient with no connected device gets an offline push
//! notification on `chat.push.<user>` (see [`deliver`]).

use std::time::Duration;

use chat_common::{
    admin::{self, Readiness},
    balance::{Balance, BalanceSettings},
    partitions::{self, PullSettings},
};
use chat_protocol::{
    jetstream::{fanout_consumer, fanout_group_consumer},
    subjects,
};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

pub mod budget;
pub mod deliver;
pub mod groups;
pub mod view;

/// Fan-out worker settings (`CHAT_FANOUT_*` env vars or a TOML file).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// NATS server URL.
    pub nats_url: String,
    /// How this worker authenticates to NATS (`chat_common::nats`).
    pub nats_auth: chat_common::nats::NatsAuth,
    /// TLS to NATS: CA, client certificate (`chat_common::nats::NatsTls`).
    pub nats_tls: chat_common::nats::NatsTls,
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
    /// Deliver one-to-one conversations (consumers `fanout-p<N>`).
    pub direct: bool,
    /// Deliver groups (consumers `fanout-g-p<N>`).
    pub groups: bool,
    /// Groups with at most this many members get one push per member (with offline
    /// notifications); larger ones one publish on `chat.grp.<conv>`.
    pub small_group_max_members: u32,
    /// Bound of the membership views cache, in members over all cached groups.
    pub group_view_max_members: usize,
    /// Deadline of a `chat.api.group_info` request seeding a view.
    pub group_info_timeout_ms: u64,
    /// Delay before a group event that could not be delivered (no view, publish failed) comes
    /// back.
    pub group_retry_delay_ms: u64,
    /// Group deliveries (NATS publishes) per second per conversation, and its burst.
    pub group_conv_deliveries_per_second: u32,
    pub group_conv_burst: u32,
    /// Group deliveries per second over all groups of this worker, and its burst.
    pub group_deliveries_per_second: u32,
    pub group_burst: u32,
    /// Share the partition consumers with the other live workers (rendezvous hashing over
    /// heartbeats on `chat.ctl.fanout.<kind>.live`); off: compete for every partition, and the
    /// first worker to pull owns it.
    pub balance: bool,
    /// How often a worker announces itself, and after how long without a heartbeat another
    /// worker takes over its share.
    pub balance_heartbeat_ms: u64,
    pub balance_expire_ms: u64,
    /// This worker's id among the live workers (default: host name and process id).
    pub instance_id: String,
    /// How often the lag of the consumers this worker pulls is read and exported
    /// (`chat_common::lag`); 0 disables it.
    pub lag_interval_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            nats_url: "nats://127.0.0.1:4222".into(),
            nats_auth: Default::default(),
            nats_tls: Default::default(),
            admin_listen: "127.0.0.1:9092".into(),
            partitions: None,
            pull_batch: 256,
            shutdown_grace_ms: 5000,
            presence_timeout_ms: 5000,
            direct: true,
            groups: true,
            small_group_max_members: 64,
            group_view_max_members: 500_000,
            group_info_timeout_ms: 5000,
            group_retry_delay_ms: 1000,
            group_conv_deliveries_per_second: 2000,
            group_conv_burst: 2000,
            group_deliveries_per_second: 50_000,
            group_burst: 50_000,
            balance: true,
            balance_heartbeat_ms: 1000,
            balance_expire_ms: 3000,
            instance_id: String::new(),
            lag_interval_ms: 10_000,
        }
    }
}

/// Drives `consumers` of `CHAT_MSGS`: this worker's share of them when balancing, else all.
async fn consume<H, Fut>(
    js: async_nats::jetstream::Context,
    consumers: Vec<(u32, String)>,
    settings: PullSettings,
    balance: Option<Balance>,
    handle: H,
    shutdown: CancellationToken,
) where
    H: Fn(u32, async_nats::jetstream::Message) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let stream = subjects::STREAM_STAMPED;
    match balance {
        Some(b) => {
            partitions::run_balanced(js, stream, consumers, settings, b, handle, shutdown).await
        }
        None => partitions::run(js, stream, consumers, settings, handle, shutdown).await,
    }
}

/// Runs the worker until `shutdown`, then drains: stop pulling (deliveries received but not
/// handled are handed back with a nak), finish the events in hand and wait until each of their
/// recipients is resolved, so they are acked (group events still queued behind their budget are
/// handed back), then drain the NATS client. Nothing is left to come back after `ack_wait`,
/// so the next owner delivers nothing twice.
pub async fn run(
    config: Config,
    admin_listener: Option<tokio::net::TcpListener>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let client = chat_common::connect_nats(
        &config.nats_url,
        "fanout",
        &config.nats_auth,
        &config.nats_tls,
    )
    .await?;
    let js = async_nats::jetstream::new(client.clone());
    let count = chat_protocol::jetstream::live_partitions(&js).await?;
    let partitions = partitions::select(config.partitions.as_deref(), count)?;
    let ready = Readiness::default();
    let stop_admin = CancellationToken::new();
    let admin_task =
        admin_listener.map(|l| tokio::spawn(admin::serve(l, ready.clone(), stop_admin.clone())));
    if !config.direct && !config.groups {
        anyhow::bail!("nothing to do: both `direct` and `groups` are off");
    }
    let stop_delivery = CancellationToken::new();
    let deliverer = deliver::Deliverer::start(
        client.clone(),
        Duration::from_millis(config.presence_timeout_ms),
        stop_delivery.clone(),
    )
    .await?;
    let settings = PullSettings {
        group: subjects::FANOUT_GROUP,
        batch: config.pull_batch,
        expires: Duration::from_secs(2),
        lag: chat_common::lag::Lag::start(
            js.clone(),
            Duration::from_millis(config.lag_interval_ms),
            stop_delivery.clone(),
        ),
    };
    let instance = if config.instance_id.is_empty() {
        chat_common::default_instance_id()
    } else {
        config.instance_id.clone()
    };
    let balance_for = |kind: &'static str| {
        let settings = BalanceSettings {
            subject: subjects::balance(&format!("fanout.{kind}")),
            instance: instance.clone(),
            heartbeat: Duration::from_millis(config.balance_heartbeat_ms),
            expire: Duration::from_millis(config.balance_expire_ms),
        };
        let (client, stop) = (client.clone(), stop_delivery.clone());
        let enabled = config.balance;
        async move {
            if !enabled {
                return Ok(None);
            }
            Balance::start(client, settings, stop).await.map(Some)
        }
    };
    // Both kinds listen for their peers at the same time.
    let (direct_balance, group_balance) = tokio::join!(
        async {
            match config.direct {
                true => balance_for("direct").await,
                false => Ok(None),
            }
        },
        async {
            match config.groups {
                true => balance_for("groups").await,
                false => Ok(None),
            }
        }
    );
    let (direct_balance, group_balance) = (direct_balance?, group_balance?);
    let mut consuming = tokio::task::JoinSet::new();
    let group_fanout = config.groups.then(|| {
        groups::GroupFanout::start(
            deliverer.clone(),
            client.clone(),
            budget::Budget::new(
                config.group_conv_deliveries_per_second,
                config.group_conv_burst,
                config.group_deliveries_per_second,
                config.group_burst,
            ),
            groups::GroupSettings {
                small_group_max_members: config.small_group_max_members as usize,
                view_max_members: config.group_view_max_members,
                group_info_timeout: Duration::from_millis(config.group_info_timeout_ms),
                retry_delay: Duration::from_millis(config.group_retry_delay_ms),
            },
            stop_delivery.clone(),
        )
    });
    // Starts delivering `partitions` (each kind this worker runs).
    let start = {
        let (js, settings, shutdown) = (js.clone(), settings.clone(), shutdown.clone());
        let deliverer = deliverer.clone();
        let group_fanout = group_fanout.clone();
        let direct = config.direct;
        move |consuming: &mut tokio::task::JoinSet<()>, partitions: &[u32]| {
            if direct {
                let consumers = partitions
                    .iter()
                    .map(|p| (*p, fanout_consumer(*p)))
                    .collect();
                let deliverer = deliverer.clone();
                consuming.spawn(consume(
                    js.clone(),
                    consumers,
                    settings.clone(),
                    direct_balance.clone(),
                    move |_p, msg| {
                        let deliverer = deliverer.clone();
                        async move { deliverer.deliver(msg).await }
                    },
                    shutdown.child_token(),
                ));
            }
            if let Some(groups) = &group_fanout {
                let consumers = partitions
                    .iter()
                    .map(|p| (*p, fanout_group_consumer(*p)))
                    .collect();
                let groups = groups.clone();
                consuming.spawn(consume(
                    js.clone(),
                    consumers,
                    settings.clone(),
                    group_balance.clone(),
                    // Only sorts the event into its conversation's queue: the pull loop never
                    // waits for a group's budget.
                    move |_p, msg| {
                        groups.enqueue(msg);
                        std::future::ready(())
                    },
                    shutdown.child_token(),
                ));
            }
        }
    };
    start(&mut consuming, &partitions);
    let readiness = tokio::spawn(admin::ready_while_connected(
        client.clone(),
        ready.clone(),
        || true,
        shutdown.clone(),
    ));
    tracing::info!(partitions = ?partitions, direct = config.direct, groups = config.groups, "fan-out worker running");
    // Every partition, those added when the count grows too (`nats/README.md`).
    let mut count = if config.partitions.is_none() {
        Some(count)
    } else {
        None
    };
    let mut every = tokio::time::interval(Duration::from_secs(5));
    every.tick().await;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = every.tick(), if count.is_some() => {}
        }
        let Some(have) = count else { continue };
        match chat_protocol::jetstream::live_partitions(&js).await {
            Ok(now) if now > have => {
                tracing::info!(from = have, to = now, "the partition count grew");
                let new: Vec<u32> = (have..now).collect();
                start(&mut consuming, &new);
                count = Some(now);
            }
            Ok(_) => {}
            Err(err) => tracing::debug!(error = %err, "reading the partition count failed"),
        }
    }
    tracing::info!("fan-out worker draining");
    let consuming = async move { while consuming.join_next().await.is_some() {} };
    ready.set(false);
    let _ = readiness.await;
    let grace = Duration::from_millis(config.shutdown_grace_ms);
    chat_common::within_grace("stop consumers", grace, consuming).await;
    // Group events not started yet go back; the one each group is delivering is finished.
    if let Some(groups) = &group_fanout {
        chat_common::within_grace("hand back queued group events", grace, groups.hand_back()).await;
    }
    // Acks follow the recipients: wait for the gateways' confirmations (at most the presence
    // timeout), or the pushes made would be made again by the next owner.
    chat_common::within_grace("resolve pushes in flight", grace, deliverer.idle()).await;
    stop_delivery.cancel();
    stop_admin.cancel();
    if let Some(task) = admin_task {
        let _ = task.await;
    }
    chat_common::within_grace("drain nats", grace, async {
        if let Err(err) = client.drain().await {
            tracing::warn!(error = %err, "nats drain failed");
        }
    })
    .await;
    tracing::info!("fan-out worker stopped");
    Ok(())
}
