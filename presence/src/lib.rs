//! The presence service: online, offline and last seen from the gateways' reports, kept in the
//! NATS KV bucket `PRESENCE`; queries and debounced pushes scoped to who may look; typing
//! indicators of groups.
//!
//! **Consumes**
//! - `chat.presence.report.<gateway>` (core NATS, every replica): a gateway's batched events
//!   (users whose first device connected or whose last device left there, users its
//!   connections began or stopped watching) and, every heartbeat, its whole state
//!   ([`PresenceReport`]).
//! - `chat.api.presence`, `chat.api.presence_settings` (requests, queue group `presence`).
//! - `chat.typing.<conv>` (core NATS, queue group `presence`): a group typing indicator.
//! - The KV bucket `PRESENCE` (a watch of every key), which every replica mirrors in memory
//!   ([`model::Model`]).
//!
//! **Produces**
//! - KV writes: `on.<user>.<gateway>` with a per-key TTL (`online_ttl_ms`) on connect and on
//!   every heartbeat; on the last device leaving a gateway, `seen.<user>` then a delete of
//!   `on.<user>.<gateway>`; when a key expires (its gateway stopped reporting), `seen.<user>`
//!   from the key's last write. `cfg.<user>` for the user's settings.
//! - `chat.presence.push.<gateway>` (core NATS): the changed states of the users that gateway
//!   watches, debounced and coalesced ([`debounce`]), one message per gateway per tick.
//! - `chat.user.<member>`: `typing` frames for each online member of a group.
//! - `chat.api.contacts` requests (answered by the sequencers) behind every query.
//!
//! **Replicas.** Any number may run. Each one receives every report and mirrors the bucket, so
//! each can answer any query. Users are split into [`USER_PARTITIONS`] partitions shared among
//! the live replicas by `chat_common::balance` (heartbeats on `chat.ctl.presence.live`): only
//! the owner of a user's partition writes its keys and pushes its changes. While two replicas
//! briefly disagree on the owners (one starting or dying), a write or push may happen twice
//! (harmless: the same value) or, for a changing user, be missed until the next heartbeat.

pub mod config;
pub mod debounce;
pub mod metrics;
pub mod model;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context;
use async_nats::jetstream::{
    self,
    kv::{Operation, Store},
    message::PublishMessage,
};
use bytes::Bytes;
use chat_common::{
    admin::{self, Readiness},
    balance::{Balance, BalanceSettings},
};
use chat_protocol::{
    api::{
        ContactsReply, ContactsRequest, GroupInfoReply, GroupInfoRequest, PresenceReply,
        PresenceReport, PresenceRequest, PresenceSettings, PresenceSettingsReply,
        PresenceSettingsRequest, TypingRelay,
    },
    frames::{ErrorCode, ErrorFrame, PRESENCE_BATCH_MAX, ServerFrame, TYPING_TTL_MS},
    ids::{ConvId, GatewayId, UserId},
    subjects::{self, PresenceKey},
};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, Semaphore};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

pub use crate::config::{Config, ConfigError};
use crate::debounce::{Debouncer, State};

/// Users are split into this many partitions, shared among the live replicas.
pub const USER_PARTITIONS: u32 = 16;

/// The value of `on.<user>.<gateway>` and `seen.<user>`: a time in ms since the epoch.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Stamp {
    pub ts: u64,
}

/// A user's partition: FNV-1a of its id.
fn partition_of(user: &str) -> usize {
    let mut h: u32 = 0x811c_9dc5;
    for b in user.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    (h % USER_PARTITIONS) as usize
}

/// The balance name of a partition.
fn partition_name(partition: usize) -> String {
    format!("presence-p{partition}")
}

struct Service {
    config: Config,
    client: async_nats::Client,
    js: jetstream::Context,
    kv: Store,
    balance: Balance,
    state: Arc<Mutex<State>>,
    wake: Arc<Notify>,
    /// Set once the KV watch has delivered what the bucket held at start.
    loaded: Readiness,
    groups: Mutex<HashMap<String, (Vec<String>, Instant)>>,
    typing_slots: Arc<Semaphore>,
    /// [`partition_name`] of every partition, made once.
    partitions: Vec<String>,
}

/// Longest wait for the bucket's initial load before the replica calls itself ready.
const LOAD_LIMIT: Duration = Duration::from_secs(30);

/// Most groups whose members are kept for typing.
const GROUP_CACHE_MAX: usize = 10_000;

/// Runs one presence replica until `shutdown`. The bucket must exist (`chat admin provision`).
///
/// Shutdown order: stop taking reports, requests and typing; stop pushing; drain the NATS
/// client (in-flight KV writes and replies go out), each within `shutdown_grace_ms`.
pub async fn run(
    config: Config,
    admin_listener: Option<tokio::net::TcpListener>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    config
        .validate()
        .context("invalid presence configuration")?;
    if admin_listener.is_some() {
        admin::metrics_handle();
        metrics::describe();
    }
    let client = chat_common::connect_nats(
        &config.nats_url,
        "presence",
        &config.nats_auth,
        &config.nats_tls,
    )
    .await?;
    let js = jetstream::new(client.clone());
    let kv = js
        .get_key_value(subjects::PRESENCE_BUCKET)
        .await
        .with_context(|| {
            format!(
                "cannot open KV bucket {} (provision it: chat admin provision)",
                subjects::PRESENCE_BUCKET
            )
        })?;
    let ready = Readiness::default();
    let tasks = TaskTracker::new();
    let stop = CancellationToken::new();
    if let Some(listener) = admin_listener {
        tasks.spawn(admin::serve(listener, ready.clone(), stop.clone()));
    }
    let instance = if config.instance_id.is_empty() {
        chat_common::default_instance_id()
    } else {
        config.instance_id.clone()
    };
    let balance = Balance::start(
        client.clone(),
        BalanceSettings {
            subject: subjects::PRESENCE_LIVE.into(),
            instance,
            heartbeat: Config::ms(config.balance_heartbeat_ms),
            expire: Config::ms(config.balance_expire_ms),
        },
        stop.clone(),
    )
    .await?;
    let state = Arc::new(Mutex::new(State {
        model: model::Model::default(),
        debouncer: Debouncer::new(
            Config::ms(config.debounce_ms),
            Config::ms(config.min_push_interval_ms),
        ),
    }));
    let svc = Arc::new(Service {
        typing_slots: Arc::new(Semaphore::new(config.typing_inflight)),
        config,
        client: client.clone(),
        js,
        kv,
        balance,
        state: state.clone(),
        wake: Arc::new(Notify::new()),
        loaded: Readiness::default(),
        groups: Mutex::default(),
        partitions: (0..USER_PARTITIONS as usize).map(partition_name).collect(),
    });

    // Subscribe before loading, so nothing between the two is missed.
    let reports = client.subscribe(subjects::PRESENCE_REPORTS).await?;
    let requests = futures::stream::select(
        client
            .queue_subscribe(subjects::PRESENCE_API, subjects::PRESENCE_QUEUE.into())
            .await?,
        client
            .queue_subscribe(
                subjects::PRESENCE_SETTINGS_API,
                subjects::PRESENCE_QUEUE.into(),
            )
            .await?,
    );
    let typing = client
        .queue_subscribe(subjects::TYPING_GROUPS, subjects::PRESENCE_QUEUE.into())
        .await?;
    let watch = svc
        .kv
        .watch_all()
        .await
        .context("cannot watch the bucket")?;
    let held = svc
        .js
        .get_stream(subjects::STREAM_PRESENCE)
        .await?
        .get_info()
        .await?
        .state
        .messages;
    tasks.spawn(svc.clone().follow(watch, held, stop.clone()));
    tasks.spawn(svc.clone().take_reports(reports, stop.clone()));
    tasks.spawn(svc.clone().answer(requests, stop.clone()));
    tasks.spawn(svc.clone().relay_typing(typing, stop.clone()));
    tasks.spawn(svc.clone().sweep(stop.clone()));
    {
        let client = client.clone();
        tasks.spawn(debounce::run(
            state,
            svc.wake.clone(),
            move |gw, push| {
                let client = client.clone();
                async move {
                    let Ok(gw) = GatewayId::parse(&gw) else {
                        return;
                    };
                    let payload = serde_json::to_vec(&push).expect("push encodes");
                    ::metrics::counter!(metrics::PUSHES).increment(1);
                    if let Err(err) = client
                        .publish(subjects::presence_push(&gw), payload.into())
                        .await
                    {
                        tracing::warn!(error = %err, "presence push failed");
                    }
                }
            },
            stop.clone(),
        ));
    }
    tasks.close();
    let loaded = svc.loaded.clone();
    let readiness = {
        let (ready, stop, client) = (ready.clone(), stop.clone(), client.clone());
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(200));
            while stop.run_until_cancelled(every.tick()).await.is_some() {
                ready.set(
                    loaded.get()
                        && client.connection_state() == async_nats::connection::State::Connected,
                );
            }
        })
    };
    tracing::info!("presence running");

    shutdown.cancelled().await;
    tracing::info!("presence stopping");
    ready.set(false);
    stop.cancel();
    let grace = Config::ms(svc.config.shutdown_grace_ms);
    chat_common::within_grace("stop presence tasks", grace, tasks.wait()).await;
    let _ = readiness.await;
    chat_common::within_grace("drain nats", grace, async {
        if let Err(err) = client.drain().await {
            tracing::warn!(error = %err, "nats drain failed");
        }
    })
    .await;
    tracing::info!("presence stopped");
    Ok(())
}

impl Service {
    fn owns(&self, user: &str) -> bool {
        self.balance.owns(&self.partitions[partition_of(user)])
    }

    fn ttl(&self) -> Duration {
        Config::ms(self.config.online_ttl_ms)
    }

    /// Applies every change of the bucket to the model; a user someone watches is touched for
    /// a push. An `on` key that expired by its TTL (its gateway stopped reporting) makes its
    /// last write the user's last seen, if no other gateway has the user.
    async fn follow(
        self: Arc<Self>,
        mut watch: jetstream::kv::Watch,
        held: u64,
        stop: CancellationToken,
    ) {
        if held == 0 {
            self.loaded.set(true);
        }
        // Keys held at start may expire before they are delivered, and then the entry that
        // says "caught up" never comes: do not stay unready for that.
        let give_up = tokio::time::sleep(LOAD_LIMIT);
        tokio::pin!(give_up);
        loop {
            let entry = tokio::select! {
                e = watch.next() => e,
                _ = &mut give_up, if !self.loaded.get() => {
                    tracing::warn!("presence bucket not seen loaded in time; serving anyway");
                    self.loaded.set(true);
                    continue;
                }
                _ = stop.cancelled() => return,
            };
            let entry = match entry {
                Some(Ok(entry)) => entry,
                Some(Err(err)) => {
                    tracing::warn!(error = %err, "presence watch error");
                    continue;
                }
                None => {
                    tracing::error!("presence watch ended");
                    return;
                }
            };
            if entry.delta == 0 {
                self.loaded.set(true);
            }
            let Some(key) = subjects::parse_presence_key(&entry.key) else {
                continue;
            };
            let stamp = |v: &Bytes| serde_json::from_slice::<Stamp>(v).ok().map(|s| s.ts);
            let put = entry.operation == Operation::Put;
            let mut expired_seen = None;
            let key_user = match key {
                PresenceKey::Online { user, .. }
                | PresenceKey::Seen { user }
                | PresenceKey::Settings { user } => user,
            };
            let user = {
                let mut st = self.state.lock().unwrap();
                // Only what watchers would see matters: a heartbeat's refresh of a key changes
                // nothing they see, and must not cost a push.
                let watched = self.loaded.get() && st.model.is_watched(key_user);
                let before = watched.then(|| st.model.state(key_user));
                let model = &mut st.model;
                let user = match key {
                    PresenceKey::Online { user, gateway } => {
                        if put {
                            let ts = stamp(&entry.value).unwrap_or_else(chat_protocol::now_ms);
                            model.set_online(user, gateway, ts);
                        } else {
                            let last = model.remove_online(user, gateway);
                            // Our own deletes are `Delete`; a TTL expiry is the server's
                            // `MaxAge` marker, which the client reports as `Purge`.
                            if entry.operation == Operation::Purge
                                && let Some(ts) = last
                            {
                                ::metrics::counter!(metrics::EXPIRED).increment(1);
                                if !model.is_online(user) {
                                    let seen = model.state(user).last_seen.unwrap_or(0).max(ts);
                                    model.set_seen(user, Some(seen));
                                    expired_seen = Some(seen);
                                }
                            }
                        }
                        user
                    }
                    PresenceKey::Seen { user } => {
                        model.set_seen(user, if put { stamp(&entry.value) } else { None });
                        user
                    }
                    PresenceKey::Settings { user } => {
                        let settings: PresenceSettings = if put {
                            serde_json::from_slice(&entry.value).unwrap_or_default()
                        } else {
                            PresenceSettings::default()
                        };
                        model.set_hide_last_seen(user, settings.hide_last_seen);
                        user
                    }
                };
                let user = user.to_owned();
                if let Some(before) = before
                    && before != st.model.state(&user)
                {
                    st.debouncer.baseline(before);
                    st.debouncer.touch(&user, tokio::time::Instant::now());
                    self.wake.notify_one();
                }
                user
            };
            if let Some(seen) = expired_seen
                && self.owns(&user)
                && let Ok(user) = UserId::parse(&user)
            {
                let key = subjects::presence_seen_key(&user);
                self.write(&key, Some(&Stamp { ts: seen }), None, "seen")
                    .await;
            }
        }
    }

    /// Publishes one KV write (`value` None: a delete), optionally with a per-key TTL, and
    /// waits for its ack.
    async fn write(&self, key: &str, value: Option<&Stamp>, ttl: Option<Duration>, op: &str) {
        if let Some(ack) = self.send_write(key, value, ttl, op).await {
            self.ack(ack).await;
        }
    }

    async fn send_write(
        &self,
        key: &str,
        value: Option<&Stamp>,
        ttl: Option<Duration>,
        op: &str,
    ) -> Option<jetstream::context::PublishAckFuture> {
        let mut msg = PublishMessage::build();
        match value {
            Some(v) => msg = msg.payload(serde_json::to_vec(v).expect("stamp encodes").into()),
            None => msg = msg.header("KV-Operation", "DEL"),
        }
        if let Some(ttl) = ttl {
            msg = msg.ttl(ttl);
        }
        ::metrics::counter!(metrics::KV_WRITES, "op" => op.to_owned()).increment(1);
        match self
            .js
            .send_publish(subjects::presence_kv_subject(key), msg)
            .await
        {
            Ok(ack) => Some(ack),
            Err(err) => {
                tracing::warn!(error = %err, key, "presence kv write failed");
                ::metrics::counter!(metrics::KV_WRITE_FAILURES).increment(1);
                None
            }
        }
    }

    async fn ack(&self, ack: jetstream::context::PublishAckFuture) {
        if let Err(err) = ack.await {
            tracing::warn!(error = %err, "presence kv write not acked");
            ::metrics::counter!(metrics::KV_WRITE_FAILURES).increment(1);
        }
    }

    /// Every gateway's reports: watches are kept by every replica; the owner of each user
    /// writes its keys. Writes of one report are pipelined.
    async fn take_reports(
        self: Arc<Self>,
        mut reports: async_nats::Subscriber,
        stop: CancellationToken,
    ) {
        loop {
            let msg = tokio::select! {
                m = reports.next() => m,
                _ = stop.cancelled() => return,
            };
            let Some(msg) = msg else { return };
            let Some(gw) = subjects::split_presence_report(&msg.subject)
                .and_then(|g| GatewayId::parse(g).ok())
            else {
                continue;
            };
            let Ok(report) = serde_json::from_slice::<PresenceReport>(&msg.payload) else {
                tracing::warn!(gateway = %gw, "undecodable presence report");
                continue;
            };
            let kind = if report.heartbeat {
                "heartbeat"
            } else {
                "events"
            };
            ::metrics::counter!(metrics::REPORTS, "kind" => kind).increment(1);
            self.on_report(&gw, report).await;
        }
    }

    async fn on_report(&self, gw: &GatewayId, report: PresenceReport) {
        let now = chat_protocol::now_ms();
        let valid = |u: &&String| UserId::parse(u).is_ok();
        {
            let mut st = self.state.lock().unwrap();
            for u in report.watch.iter().filter(valid) {
                st.model.watch(gw.as_str(), u, now);
            }
            for u in &report.unwatch {
                st.model.unwatch(gw.as_str(), u);
            }
        }
        let mut acks = Vec::new();
        let stamp = Stamp { ts: now };
        for user in report.online.iter().filter_map(|u| UserId::parse(u).ok()) {
            if !self.owns(user.as_str()) {
                continue;
            }
            let key = subjects::presence_online_key(&user, gw);
            let op = if report.heartbeat {
                "refresh"
            } else {
                "online"
            };
            acks.extend(
                self.send_write(&key, Some(&stamp), Some(self.ttl()), op)
                    .await,
            );
        }
        for user in report.offline.iter().filter_map(|u| UserId::parse(u).ok()) {
            if !self.owns(user.as_str()) {
                continue;
            }
            // Last seen first: a reader never sees the user gone without it.
            let seen = subjects::presence_seen_key(&user);
            acks.extend(self.send_write(&seen, Some(&stamp), None, "seen").await);
            let key = subjects::presence_online_key(&user, gw);
            acks.extend(self.send_write(&key, None, None, "offline").await);
        }
        futures::future::join_all(acks.into_iter().map(|a| self.ack(a))).await;
    }

    /// Forgets the watches of gateways that stopped confirming them (crashed gateways, lost
    /// `unwatch` events), after the same time their users' keys expire.
    async fn sweep(self: Arc<Self>, stop: CancellationToken) {
        let every = (self.ttl() / 3).max(Duration::from_millis(500));
        let mut tick = tokio::time::interval(every);
        while stop.run_until_cancelled(tick.tick()).await.is_some() {
            let before = chat_protocol::now_ms().saturating_sub(self.config.online_ttl_ms);
            let mut st = self.state.lock().unwrap();
            let gone = st.model.expire_watches(before);
            if gone > 0 {
                tracing::debug!(gone, "expired presence watches");
            }
            // Counted here, not per change: both walk the whole model.
            ::metrics::gauge!(metrics::WATCHES).set(st.model.watch_count() as f64);
            ::metrics::gauge!(metrics::ONLINE_USERS).set(st.model.online_users() as f64);
        }
    }

    async fn answer(
        self: Arc<Self>,
        mut requests: impl futures::Stream<Item = async_nats::Message> + Unpin,
        stop: CancellationToken,
    ) {
        let inflight = TaskTracker::new();
        loop {
            let req = tokio::select! {
                r = requests.next() => r,
                _ = stop.cancelled() => break,
            };
            let Some(req) = req else { break };
            let Some(reply) = req.reply.clone() else {
                continue;
            };
            let svc = self.clone();
            inflight.spawn(async move {
                let started = Instant::now();
                let payload = if req.subject.as_str() == subjects::PRESENCE_SETTINGS_API {
                    serde_json::to_vec(&svc.settings(&req.payload).await)
                } else {
                    let answer = svc.query(&req.payload).await;
                    let result = match &answer {
                        PresenceReply::Presence { .. } => "ok",
                        PresenceReply::Error(_) => "error",
                    };
                    ::metrics::counter!(metrics::QUERIES, "result" => result).increment(1);
                    ::metrics::histogram!(metrics::QUERY_SECONDS)
                        .record(started.elapsed().as_secs_f64());
                    serde_json::to_vec(&answer)
                }
                .expect("replies encode");
                if let Err(err) = svc.client.publish(reply, payload.into()).await {
                    tracing::warn!(error = %err, "presence reply failed");
                }
            });
        }
        inflight.close();
        inflight.wait().await;
    }

    /// The presence of the asked users who share a conversation with the asker.
    async fn query(&self, payload: &[u8]) -> PresenceReply {
        let req: PresenceRequest = match serde_json::from_slice(payload) {
            Ok(r) => r,
            Err(_) => return refuse(ErrorCode::InvalidFrame, "undecodable presence request"),
        };
        if UserId::parse(&req.user).is_err() {
            return refuse(ErrorCode::InvalidId, "invalid user id");
        }
        if req.users.len() > PRESENCE_BATCH_MAX {
            return refuse(
                ErrorCode::InvalidFrame,
                &format!("at most {PRESENCE_BATCH_MAX} users per query"),
            );
        }
        if let Some(bad) = req.users.iter().find(|u| UserId::parse(u).is_err()) {
            return refuse(ErrorCode::InvalidId, &format!("invalid user id {bad:?}"));
        }
        let mut users = req.users;
        users.dedup();
        let contacts = match self.contacts(&req.user, users).await {
            Ok(c) => c,
            Err(e) => return PresenceReply::Error(e),
        };
        let st = self.state.lock().unwrap();
        PresenceReply::Presence {
            users: contacts.iter().map(|u| st.model.state(u)).collect(),
        }
    }

    async fn contacts(&self, user: &str, users: Vec<String>) -> Result<Vec<String>, ErrorFrame> {
        if users.is_empty() {
            return Ok(users);
        }
        let request = ContactsRequest {
            user: user.to_owned(),
            users,
        };
        let payload = serde_json::to_vec(&request).expect("request encodes");
        let asked = self.client.send_request(
            subjects::CONTACTS_API,
            async_nats::Request::new()
                .payload(payload.into())
                .timeout(Some(Config::ms(self.config.contacts_timeout_ms))),
        );
        let unavailable =
            || ErrorFrame::new(ErrorCode::Unavailable, "presence is unavailable right now");
        match asked.await {
            Ok(reply) => match serde_json::from_slice::<ContactsReply>(&reply.payload) {
                Ok(ContactsReply::Contacts { users }) => Ok(users),
                Ok(ContactsReply::Error(e)) => Err(e),
                Err(err) => {
                    tracing::error!(error = %err, "contacts reply not understood");
                    Err(unavailable())
                }
            },
            Err(err) => {
                tracing::warn!(error = %err, "contacts request failed");
                Err(unavailable())
            }
        }
    }

    async fn settings(&self, payload: &[u8]) -> PresenceSettingsReply {
        let fail = |code, m: &str| PresenceSettingsReply::Error(ErrorFrame::new(code, m));
        let Ok(req) = serde_json::from_slice::<PresenceSettingsRequest>(payload) else {
            return fail(ErrorCode::InvalidFrame, "undecodable settings request");
        };
        let Ok(user) = UserId::parse(&req.user) else {
            return fail(ErrorCode::InvalidId, "invalid user id");
        };
        if let Some(hide) = req.hide_last_seen {
            let value = serde_json::to_vec(&PresenceSettings {
                hide_last_seen: hide,
            })
            .expect("settings encode");
            ::metrics::counter!(metrics::KV_WRITES, "op" => "settings").increment(1);
            if let Err(err) = self
                .kv
                .put(subjects::presence_settings_key(&user), value.into())
                .await
            {
                tracing::warn!(error = %err, "presence settings write failed");
                ::metrics::counter!(metrics::KV_WRITE_FAILURES).increment(1);
                return fail(
                    ErrorCode::Unavailable,
                    "settings could not be stored; retry",
                );
            }
            let mut st = self.state.lock().unwrap();
            st.model.set_hide_last_seen(user.as_str(), hide);
        }
        let st = self.state.lock().unwrap();
        PresenceSettingsReply::Settings {
            hide_last_seen: st.model.hides_last_seen(user.as_str()),
        }
    }

    /// Relays group typing indicators to the group's online members. Bounded: beyond
    /// `typing_inflight` relays in flight, indicators are dropped.
    async fn relay_typing(
        self: Arc<Self>,
        mut typing: async_nats::Subscriber,
        stop: CancellationToken,
    ) {
        loop {
            let msg = tokio::select! {
                m = typing.next() => m,
                _ = stop.cancelled() => return,
            };
            let Some(msg) = msg else { return };
            let Ok(permit) = self.typing_slots.clone().try_acquire_owned() else {
                ::metrics::counter!(metrics::TYPING_DROPPED, "reason" => "busy").increment(1);
                continue;
            };
            let svc = self.clone();
            tokio::spawn(async move {
                let _permit = permit;
                svc.relay(&msg.payload).await;
            });
        }
    }

    async fn relay(&self, payload: &[u8]) {
        let dropped = |reason: &'static str| {
            ::metrics::counter!(metrics::TYPING_DROPPED, "reason" => reason).increment(1);
        };
        let Ok(t) = serde_json::from_slice::<TypingRelay>(payload) else {
            return dropped("undecodable");
        };
        let (Ok(conv), Ok(_)) = (ConvId::parse(&t.conv), UserId::parse(&t.user)) else {
            return dropped("invalid");
        };
        if !conv.is_group() {
            return dropped("invalid");
        }
        let Some(members) = self.group_members(&conv).await else {
            return dropped("unavailable");
        };
        if !members.contains(&t.user) {
            return dropped("not_member");
        }
        if members.len() > self.config.typing_group_max_members {
            return dropped("large_group");
        }
        let online: Vec<String> = {
            let st = self.state.lock().unwrap();
            members
                .into_iter()
                .filter(|m| *m != t.user && st.model.is_online(m))
                .collect()
        };
        let frame = ServerFrame::Typing {
            conv: t.conv,
            user: t.user,
            active: t.active,
            ttl_ms: TYPING_TTL_MS,
        };
        let payload: Bytes = serde_json::to_vec(&frame).expect("frame encodes").into();
        for member in online.iter().filter_map(|m| UserId::parse(m).ok()) {
            ::metrics::counter!(metrics::TYPING_RELAYED).increment(1);
            if let Err(err) = self
                .client
                .publish(subjects::user(&member), payload.clone())
                .await
            {
                tracing::debug!(error = %err, "typing relay failed");
            }
        }
    }

    /// A group's current members, cached for `group_cache_ms`.
    async fn group_members(&self, conv: &ConvId) -> Option<Vec<String>> {
        let fresh = Config::ms(self.config.group_cache_ms);
        if let Some((members, at)) = self.groups.lock().unwrap().get(conv.as_str())
            && at.elapsed() < fresh
        {
            return Some(members.clone());
        }
        let request = GroupInfoRequest {
            conv: conv.to_string(),
            user: None,
            since: None,
        };
        let payload = serde_json::to_vec(&request).expect("request encodes");
        let reply = self
            .client
            .send_request(
                subjects::GROUP_INFO_API,
                async_nats::Request::new()
                    .payload(payload.into())
                    .timeout(Some(Config::ms(self.config.contacts_timeout_ms))),
            )
            .await
            .ok()?;
        let GroupInfoReply::Group { members, .. } = serde_json::from_slice(&reply.payload).ok()?
        else {
            return None;
        };
        let members: Vec<String> = members
            .into_iter()
            .filter(|m| m.left.is_none())
            .map(|m| m.user)
            .collect();
        let mut groups = self.groups.lock().unwrap();
        if groups.len() >= GROUP_CACHE_MAX {
            groups.retain(|_, (_, at)| at.elapsed() < fresh);
            if groups.len() >= GROUP_CACHE_MAX {
                groups.clear();
            }
        }
        groups.insert(conv.to_string(), (members.clone(), Instant::now()));
        Some(members)
    }
}

fn refuse(code: ErrorCode, message: &str) -> PresenceReply {
    PresenceReply::Error(ErrorFrame::new(code, message))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_spread_over_the_partitions() {
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..1000 {
            seen.insert(partition_of(&format!("user{i}")));
        }
        assert_eq!(seen.len(), USER_PARTITIONS as usize);
        assert!(seen.iter().all(|p| *p < USER_PARTITIONS as usize));
        assert_eq!(partition_of("alice"), partition_of("alice"));
    }
}
