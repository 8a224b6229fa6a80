//! Presence and typing at the gateway: what the gateway tells the presence service, and how
//! its pushes reach the connections that watch.
//!
//! **Reports.** The gateway counts its connections per user. When a user's first connection
//! here opens or its last one closes, the change waits in a pending set; every `flush_ms` the
//! pending changes go out as one [`PresenceReport`] on `chat.presence.report.<gateway>` (a
//! connect and a disconnect within one flush collapse into the final state). Every
//! `heartbeat_ms` the gateway sends its whole state (every user with a connection here, every
//! user watched here) in parts of at most [`PRESENCE_REPORT_MAX`] users. No timer, task or
//! subscription per connection: a connection costs a [`Conn`] (three words, and the reader's
//! reference to it) and, per user, one map entry with a counter.
//!
//! **Subscriptions.** A connection's `presence_subscribe` asks `chat.api.presence` (which
//! checks that the asker shares a conversation with each user, see `docs/protocol.md`), then
//! replaces the connection's watch set with the users it may see. The gateway keeps, per
//! watched user, the local connections watching it, and reports `watch` / `unwatch` when the
//! first / last of them comes or goes. The presence service pushes the changes of every user
//! this gateway watches on one subject, `chat.presence.push.<gateway>`: one subscription per
//! gateway, whatever its connections watch, and the service publishes one batch per gateway per
//! tick. (A core NATS subscription per watched user would cost about 6 KiB each in the client.)
//!
//! **Shedding.** Presence pushes and typing indicators are ephemeral: they are dropped, never
//! queued, when a connection's outgoing queue is half full, so messages keep the other half and
//! a burst of presence can never close a connection as a slow consumer.
//!
//! **Typing.** A `typing` frame is rate-limited per user, then published on core NATS: for a
//! one-to-one conversation straight to the other member's subject (`chat.user.<user>`, reaching
//! only its connected devices), for a group to `chat.typing.<conv>`, where the presence service
//! relays it to the online members.

use std::{
    collections::{HashMap, HashSet},
    num::NonZeroU32,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::extract::ws::Utf8Bytes;
use bytes::Bytes;
use chat_protocol::{
    api::{
        PRESENCE_REPORT_MAX, PresencePush, PresenceReply, PresenceReport, PresenceRequest,
        PresenceSettingsReply, PresenceSettingsRequest, TypingRelay,
    },
    frames::{
        ClientFrame, ErrorCode, ErrorFrame, PRESENCE_BATCH_MAX, PRESENCE_WATCH_MAX, PresenceState,
        ServerFrame, TYPING_TTL_MS,
    },
    ids::{ClientMsgId, ConvId, GatewayId, UserId},
    subjects,
};
use futures::{FutureExt, StreamExt, future::BoxFuture};
use governor::{DefaultKeyedRateLimiter, Quota, clock::Clock};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::{Config, connection::Outbox};

/// Counter, label `kind` (`presence`, `typing`): ephemeral frames dropped because the
/// connection's queue was half full.
pub const SHED: &str = "gateway_presence_shed_total";
/// Counter, label `kind` (`events`, `heartbeat`): presence reports published.
pub const REPORTS: &str = "gateway_presence_reports_total";
/// Gauge: users watched by this gateway's connections.
pub const WATCHED: &str = "gateway_presence_watched_users";
/// Counter: presence frames pushed to connections.
pub const PUSHED: &str = "gateway_presence_pushes_total";

pub fn describe() {
    use metrics::{describe_counter, describe_gauge};
    describe_counter!(
        SHED,
        "Ephemeral frames dropped for a connection whose queue was half full"
    );
    describe_counter!(REPORTS, "Presence reports published, by kind");
    describe_gauge!(WATCHED, "Users watched by this gateway's connections");
    describe_counter!(PUSHED, "Presence frames pushed to connections");
}

/// The gateway's presence settings (`presence.*` in the gateway config).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PresenceConfig {
    /// This gateway's id in presence subjects and keys (default: host name, pid and a random
    /// part, made a valid id). Two live gateways must not share one.
    pub instance_id: String,
    /// How often the whole state is reported. The presence service's `online_ttl_ms` must
    /// exceed twice this.
    pub heartbeat_ms: u64,
    /// How often pending connect / disconnect / watch changes are reported (batched).
    pub flush_ms: u64,
    /// Sustained `typing` frames per second per user on this gateway, and their burst.
    pub typing_per_second: u32,
    pub typing_burst: u32,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        Self {
            instance_id: String::new(),
            heartbeat_ms: 30_000,
            flush_ms: 250,
            typing_per_second: 2,
            typing_burst: 5,
        }
    }
}

/// The presence and typing limits announced in `hello`.
pub(crate) fn limits(config: &Config) -> chat_protocol::frames::Limits {
    chat_protocol::frames::Limits {
        presence_batch_max: PRESENCE_BATCH_MAX as u32,
        presence_watch_max: PRESENCE_WATCH_MAX as u32,
        typing_per_second: config.presence.typing_per_second,
        typing_burst: config.presence.typing_burst,
        typing_ttl_ms: TYPING_TTL_MS,
        ..Default::default()
    }
}

/// A connection that watches: where its pushes go and whom it watches.
struct Watcher {
    out: Arc<Outbox>,
    users: Vec<String>,
}

#[derive(Default)]
struct Inner {
    /// Connections per user on this gateway.
    online: HashMap<UserId, u32>,
    /// Users whose first connection opened (true) or last closed (false) since the last flush.
    online_changed: HashMap<UserId, bool>,
    /// Watched user → the connections watching it.
    watched: HashMap<String, Vec<u64>>,
    /// Users that became watched (true) or unwatched (false) since the last flush.
    watch_changed: HashMap<String, bool>,
    /// Connections with a non-empty watch set.
    watchers: HashMap<u64, Watcher>,
    /// The latest `presence_subscribe` of each connection that sent one: an older answer that
    /// arrives later is not applied.
    generation: HashMap<u64, u64>,
}

/// The gateway's presence state, shared by its connections.
pub(crate) struct PresenceHub {
    gateway: GatewayId,
    heartbeat: Duration,
    flush: Duration,
    request_timeout: Duration,
    typing: DefaultKeyedRateLimiter<UserId>,
    inner: Mutex<Inner>,
    next_id: AtomicU64,
    client: OnceLock<async_nats::Client>,
}

/// One connection's presence: registered at open, reported gone on drop.
pub(crate) struct Conn<'a> {
    hub: &'a PresenceHub,
    user: &'a UserId,
    id: u64,
}

impl Drop for Conn<'_> {
    fn drop(&mut self) {
        self.hub.disconnect(self.user, self.id);
    }
}

impl PresenceHub {
    pub(crate) fn new(config: &Config) -> Self {
        let p = &config.presence;
        let gateway = if p.instance_id.is_empty() {
            // Host, pid and a random part: several gateways in one process stay apart.
            let id = chat_common::default_instance_id();
            GatewayId::sanitized(&format!("{id}-{:04x}", rand::random::<u16>()))
        } else {
            GatewayId::sanitized(&p.instance_id)
        };
        let per_second = NonZeroU32::new(p.typing_per_second).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(p.typing_burst).unwrap_or(NonZeroU32::MIN);
        Self {
            gateway,
            heartbeat: Config::ms(p.heartbeat_ms.max(1)),
            flush: Config::ms(p.flush_ms.max(1)),
            request_timeout: Config::ms(config.history_timeout_ms),
            typing: DefaultKeyedRateLimiter::keyed(
                Quota::per_second(per_second).allow_burst(burst),
            ),
            inner: Mutex::default(),
            next_id: AtomicU64::new(1),
            client: OnceLock::new(),
        }
    }

    /// This gateway's id in presence subjects.
    pub(crate) fn gateway(&self) -> &GatewayId {
        &self.gateway
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A connection of `user` opened.
    pub(crate) fn connect<'a>(&'a self, user: &'a UserId) -> Conn<'a> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut inner = self.lock();
        let count = inner.online.entry(user.clone()).or_insert(0);
        *count += 1;
        if *count == 1 {
            inner.online_changed.insert(user.clone(), true);
        }
        Conn {
            hub: self,
            user,
            id,
        }
    }

    fn disconnect(&self, user: &UserId, id: u64) {
        let mut inner = self.lock();
        if let Some(count) = inner.online.get_mut(user) {
            *count -= 1;
            if *count == 0 {
                inner.online.remove(user);
                inner.online_changed.insert(user.clone(), false);
            }
        }
        inner.generation.remove(&id);
        set_watch(&mut inner, id, None, Vec::new());
    }

    /// Forgets rate limiter state of users idle long enough to be back at full burst, and
    /// gives back the room of maps that shrank (after a wave of disconnects).
    pub(crate) fn prune(&self) {
        self.typing.retain_recent();
        self.typing.shrink_to_fit();
        let mut inner = self.lock();
        let (online, watched) = (inner.online.len(), inner.watched.len());
        inner.online.shrink_to(online * 2);
        inner.watched.shrink_to(watched * 2);
    }

    /// Takes the pending changes as one events report, if there are any.
    fn take_events(&self) -> Option<PresenceReport> {
        let mut inner = self.lock();
        if inner.online_changed.is_empty() && inner.watch_changed.is_empty() {
            return None;
        }
        let mut report = PresenceReport {
            ts: chat_protocol::now_ms(),
            ..PresenceReport::default()
        };
        // Taken, not drained: a burst of connects must not leave a large empty map behind.
        for (user, on) in std::mem::take(&mut inner.online_changed) {
            let list = if on {
                &mut report.online
            } else {
                &mut report.offline
            };
            list.push(user.to_string());
        }
        for (user, on) in std::mem::take(&mut inner.watch_changed) {
            let list = if on {
                &mut report.watch
            } else {
                &mut report.unwatch
            };
            list.push(user);
        }
        Some(report)
    }

    /// The whole state, in parts of at most [`PRESENCE_REPORT_MAX`] users per list.
    fn heartbeat_parts(&self) -> Vec<PresenceReport> {
        let (online, watched): (Vec<String>, Vec<String>) = {
            let inner = self.lock();
            (
                inner.online.keys().map(UserId::to_string).collect(),
                inner.watched.keys().cloned().collect(),
            )
        };
        let ts = chat_protocol::now_ms();
        let parts = online
            .len()
            .max(watched.len())
            .div_ceil(PRESENCE_REPORT_MAX);
        (0..parts)
            .map(|i| {
                let range = |v: &[String]| {
                    let start = (i * PRESENCE_REPORT_MAX).min(v.len());
                    let end = ((i + 1) * PRESENCE_REPORT_MAX).min(v.len());
                    v[start..end].to_vec()
                };
                PresenceReport {
                    ts,
                    online: range(&online),
                    watch: range(&watched),
                    heartbeat: true,
                    ..PresenceReport::default()
                }
            })
            .collect()
    }

    async fn publish(&self, client: &async_nats::Client, report: &PresenceReport, kind: &str) {
        let payload = serde_json::to_vec(report).expect("reports encode");
        ::metrics::counter!(REPORTS, "kind" => kind.to_owned()).increment(1);
        if let Err(err) = client
            .publish(subjects::presence_report(&self.gateway), payload.into())
            .await
        {
            tracing::warn!(error = %err, "presence report failed");
        }
    }

    /// Reports what is pending now (at shutdown, after the connections closed).
    pub(crate) async fn flush(&self) {
        let Some(client) = self.client.get() else {
            return;
        };
        if let Some(report) = self.take_events() {
            self.publish(client, &report, "events").await;
        }
        let _ = client.flush().await;
    }

    /// Hands the changes of watched users to the connections watching them, one frame per
    /// connection, shed when its queue is half full.
    fn deliver(&self, push: PresencePush) {
        let inner = self.lock();
        let mut per_conn: HashMap<u64, Vec<PresenceState>> = HashMap::new();
        for state in push.users {
            for id in inner.watched.get(&state.user).into_iter().flatten() {
                per_conn.entry(*id).or_default().push(state.clone());
            }
        }
        for (id, users) in per_conn {
            let Some(w) = inner.watchers.get(&id) else {
                continue;
            };
            let frame = ServerFrame::Presence { req: None, users };
            if w.out.offer(encode(&frame)) {
                ::metrics::counter!(PUSHED).increment(1);
            } else {
                ::metrics::counter!(SHED, "kind" => "presence").increment(1);
            }
        }
    }

    #[cfg(test)]
    fn watched(&self) -> Vec<String> {
        let mut v: Vec<String> = self.lock().watched.keys().cloned().collect();
        v.sort();
        v
    }
}

/// Replaces connection `id`'s watch set (`out` None: the connection is gone).
fn set_watch(inner: &mut Inner, id: u64, out: Option<Arc<Outbox>>, users: Vec<String>) {
    let old = inner
        .watchers
        .remove(&id)
        .map(|w| w.users)
        .unwrap_or_default();
    let new: HashSet<&String> = users.iter().collect();
    for user in old.iter().filter(|u| !new.contains(u)) {
        if let Some(ids) = inner.watched.get_mut(user) {
            ids.retain(|i| *i != id);
            if ids.is_empty() {
                inner.watched.remove(user);
                inner.watch_changed.insert(user.clone(), false);
            }
        }
    }
    let old: HashSet<&String> = old.iter().collect();
    for user in users.iter().filter(|u| !old.contains(u)) {
        let ids = inner.watched.entry(user.clone()).or_default();
        if ids.is_empty() {
            inner.watch_changed.insert(user.clone(), true);
        }
        ids.push(id);
    }
    if let Some(out) = out
        && !users.is_empty()
    {
        inner.watchers.insert(id, Watcher { out, users });
    }
    ::metrics::gauge!(WATCHED).set(inner.watched.len() as f64);
}

/// Runs the gateway's presence until `stop`: the push subscription (one per gateway), batched
/// event reports every `flush_ms`, and the full state every `heartbeat_ms`.
pub(crate) async fn run(
    hub: Arc<PresenceHub>,
    client: async_nats::Client,
    stop: CancellationToken,
) {
    let _ = hub.client.set(client.clone());
    let mut pushes = match client
        .subscribe(subjects::presence_push(&hub.gateway))
        .await
    {
        Ok(sub) => Some(sub),
        Err(err) => {
            tracing::error!(error = %err, "presence push subscription failed");
            None
        }
    };
    tracing::info!(gateway = %hub.gateway, "presence reporting");
    let mut flush = tokio::time::interval(hub.flush);
    let mut heartbeat = tokio::time::interval(hub.heartbeat);
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let next_push = async {
            match pushes.as_mut() {
                Some(p) => p.next().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = flush.tick() => {
                if let Some(report) = hub.take_events() {
                    hub.publish(&client, &report, "events").await;
                }
            }
            _ = heartbeat.tick() => {
                for part in hub.heartbeat_parts() {
                    hub.publish(&client, &part, "heartbeat").await;
                }
            }
            msg = next_push => match msg {
                Some(msg) => match serde_json::from_slice::<PresencePush>(&msg.payload) {
                    Ok(push) => hub.deliver(push),
                    Err(err) => tracing::warn!(error = %err, "undecodable presence push"),
                },
                None => {
                    tracing::error!("presence push subscription ended");
                    pushes = None;
                }
            },
        }
    }
}

/// How the connection handles a presence or typing frame.
pub(crate) enum Handled {
    /// Answer now.
    Reply(ServerFrame),
    /// Answer when this resolves (it counts against the connection's in-flight limit).
    Later(BoxFuture<'static, Option<ServerFrame>>),
}

/// Handles `presence`, `presence_subscribe`, `presence_settings` and `typing`.
pub(crate) fn on_frame(
    hub: &Arc<PresenceHub>,
    conn: &Conn<'_>,
    out: &Arc<Outbox>,
    frame: ClientFrame,
) -> Handled {
    match frame {
        ClientFrame::Presence { req, users } => {
            crate::metrics::frame_in("presence");
            match check_users(&req, &users, PRESENCE_BATCH_MAX) {
                Err(e) => Handled::Reply(ServerFrame::Error(e)),
                Ok(()) => {
                    let ask = hub.clone().ask(conn.user.to_string(), users);
                    Handled::Later(async move { Some(answer(req, ask.await)) }.boxed())
                }
            }
        }
        ClientFrame::PresenceSubscribe { req, users } => {
            crate::metrics::frame_in("presence_subscribe");
            if let Err(e) = check_users(&req, &users, PRESENCE_WATCH_MAX) {
                return Handled::Reply(ServerFrame::Error(e));
            }
            let id = conn.id;
            let generation = {
                let mut inner = hub.lock();
                let g = inner.generation.entry(id).or_insert(0);
                *g += 1;
                *g
            };
            if users.is_empty() {
                set_watch(&mut hub.lock(), id, None, Vec::new());
                return Handled::Reply(ServerFrame::Presence {
                    req: Some(req),
                    users: Vec::new(),
                });
            }
            let (hub, out) = (hub.clone(), out.clone());
            let ask = hub.clone().ask(conn.user.to_string(), users);
            Handled::Later(
                async move {
                    let reply = ask.await;
                    if let Ok(PresenceReply::Presence { users }) = &reply {
                        let mut inner = hub.lock();
                        // Only the latest subscription of a connection still open counts.
                        if inner.generation.get(&id) == Some(&generation) {
                            let allowed = users.iter().map(|s| s.user.clone()).collect();
                            set_watch(&mut inner, id, Some(out), allowed);
                        }
                    }
                    Some(answer(req, reply))
                }
                .boxed(),
            )
        }
        ClientFrame::PresenceSettings {
            req,
            hide_last_seen,
        } => {
            crate::metrics::frame_in("presence_settings");
            if let Err(e) = check_req(&req) {
                return Handled::Reply(ServerFrame::Error(e));
            }
            let request = PresenceSettingsRequest {
                user: conn.user.to_string(),
                hide_last_seen,
            };
            let hub = hub.clone();
            Handled::Later(
                async move {
                    let reply = hub
                        .request::<_, PresenceSettingsReply>(
                            subjects::PRESENCE_SETTINGS_API,
                            &request,
                        )
                        .await;
                    Some(match reply {
                        Ok(PresenceSettingsReply::Settings { hide_last_seen }) => {
                            ServerFrame::PresenceSettings {
                                req,
                                hide_last_seen,
                            }
                        }
                        Ok(PresenceSettingsReply::Error(mut e)) => {
                            e.req = Some(req);
                            ServerFrame::Error(e)
                        }
                        Err(mut e) => {
                            e.req = Some(req);
                            ServerFrame::Error(e)
                        }
                    })
                }
                .boxed(),
            )
        }
        ClientFrame::Typing { conv, active } => {
            crate::metrics::frame_in("typing");
            match hub.typing(conn.user, conv, active) {
                Ok(send) => Handled::Later(
                    async move {
                        send.await;
                        None
                    }
                    .boxed(),
                ),
                Err(e) => Handled::Reply(ServerFrame::Error(e)),
            }
        }
        other => Handled::Reply(ServerFrame::Error(ErrorFrame::new(
            ErrorCode::Internal,
            format!("not a presence frame: {other:?}"),
        ))),
    }
}

impl PresenceHub {
    /// Asks the presence service for the presence of `users` as `user` may see it.
    fn ask(
        self: Arc<Self>,
        user: String,
        users: Vec<String>,
    ) -> BoxFuture<'static, Result<PresenceReply, ErrorFrame>> {
        async move {
            self.request(subjects::PRESENCE_API, &PresenceRequest { user, users })
                .await
        }
        .boxed()
    }

    async fn request<Q: Serialize, A: for<'de> Deserialize<'de>>(
        &self,
        subject: &'static str,
        request: &Q,
    ) -> Result<A, ErrorFrame> {
        let unavailable = || {
            ErrorFrame::new(
                ErrorCode::Unavailable,
                "presence is unavailable right now; retry",
            )
        };
        let client = self.client.get().ok_or_else(unavailable)?;
        let payload = serde_json::to_vec(request).expect("requests encode");
        let reply = client
            .send_request(
                subject,
                async_nats::Request::new()
                    .payload(payload.into())
                    .timeout(Some(self.request_timeout)),
            )
            .await
            .map_err(|err| {
                tracing::warn!(error = %err, "presence request failed");
                unavailable()
            })?;
        serde_json::from_slice(&reply.payload).map_err(|err| {
            tracing::error!(error = %err, "presence reply not understood");
            ErrorFrame::new(ErrorCode::Internal, "presence failed")
        })
    }

    /// Checks and rate-limits a typing frame; the returned future publishes it.
    fn typing(
        &self,
        user: &UserId,
        conv: String,
        active: bool,
    ) -> Result<BoxFuture<'static, ()>, ErrorFrame> {
        let fail = |code, message: String| {
            let mut e = ErrorFrame::new(code, message);
            e.conv = Some(conv.clone());
            e
        };
        let id = ConvId::parse(&conv).map_err(|e| fail(ErrorCode::InvalidId, e.to_string()))?;
        if !id.is_group() && !id.is_direct_member(user) {
            return Err(fail(
                ErrorCode::NotMember,
                "you are not a member of this conversation".into(),
            ));
        }
        if let Err(not_until) = self.typing.check_key(user) {
            let wait = not_until.wait_time_from(self.typing.clock().now());
            let mut e = fail(ErrorCode::RateLimited, "typing rate exceeded".into());
            e.retry_after_ms = Some(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1));
            return Err(e);
        }
        let Some(client) = self.client.get().cloned() else {
            return Ok(async {}.boxed());
        };
        let (subject, payload): (String, Bytes) = match id.direct_members() {
            Some(pair) => {
                let other = if &pair[0] == user { &pair[1] } else { &pair[0] };
                let frame = ServerFrame::Typing {
                    conv,
                    user: user.to_string(),
                    active,
                    ttl_ms: TYPING_TTL_MS,
                };
                (
                    subjects::user(other),
                    serde_json::to_vec(&frame).expect("frames encode").into(),
                )
            }
            None => {
                let relay = TypingRelay {
                    conv,
                    user: user.to_string(),
                    active,
                };
                (
                    subjects::typing_group(&id),
                    serde_json::to_vec(&relay).expect("relays encode").into(),
                )
            }
        };
        Ok(async move {
            if let Err(err) = client.publish(subject, payload).await {
                tracing::debug!(error = %err, "typing publish failed");
            }
        }
        .boxed())
    }
}

/// The answer frame of a presence query or subscription.
fn answer(req: String, reply: Result<PresenceReply, ErrorFrame>) -> ServerFrame {
    match reply {
        Ok(PresenceReply::Presence { users }) => ServerFrame::Presence {
            req: Some(req),
            users,
        },
        Ok(PresenceReply::Error(mut e)) | Err(mut e) => {
            e.req = Some(req);
            ServerFrame::Error(e)
        }
    }
}

fn check_req(req: &str) -> Result<(), ErrorFrame> {
    ClientMsgId::parse(req).map(drop).map_err(|e| {
        let mut frame = ErrorFrame::new(
            ErrorCode::InvalidId,
            e.to_string().replace("client message id", "request id"),
        );
        frame.req = Some(req.to_owned());
        frame
    })
}

/// A valid request id, at most `max` users, each a valid user id.
fn check_users(req: &str, users: &[String], max: usize) -> Result<(), ErrorFrame> {
    check_req(req)?;
    let fail = |code, message: String| {
        let mut frame = ErrorFrame::new(code, message);
        frame.req = Some(req.to_owned());
        frame
    };
    if users.len() > max {
        return Err(fail(
            ErrorCode::InvalidFrame,
            format!("`users` lists {} users; the limit is {max}", users.len()),
        ));
    }
    if let Some(Err(e)) = users.iter().map(|u| UserId::parse(u)).find(Result::is_err) {
        return Err(fail(ErrorCode::InvalidId, format!("users: {e}")));
    }
    Ok(())
}

fn encode(frame: &ServerFrame) -> Utf8Bytes {
    Utf8Bytes::from(serde_json::to_string(frame).expect("server frames always serialize"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub() -> Arc<PresenceHub> {
        Arc::new(PresenceHub::new(&Config::default()))
    }

    #[test]
    fn first_and_last_connection_of_a_user_are_reported_once_per_flush() {
        let hub = hub();
        let alice = UserId::parse("alice").unwrap();
        let bob = UserId::parse("bob").unwrap();
        let phone = hub.connect(&alice);
        let laptop = hub.connect(&alice);
        let report = hub.take_events().unwrap();
        assert_eq!(report.online, vec!["alice"]);
        assert!(report.offline.is_empty());
        assert!(hub.take_events().is_none(), "nothing new");
        drop(phone);
        assert!(hub.take_events().is_none(), "the laptop is still here");
        drop(laptop);
        assert_eq!(hub.take_events().unwrap().offline, vec!["alice"]);
        // Connect and disconnect within one flush: the final state only.
        drop(hub.connect(&bob));
        let report = hub.take_events().unwrap();
        assert_eq!(
            (report.online.len(), report.offline),
            (0, vec!["bob".into()])
        );
    }

    #[test]
    fn heartbeats_list_everyone_in_bounded_parts() {
        let hub = hub();
        let users: Vec<UserId> = (0..PRESENCE_REPORT_MAX + 10)
            .map(|i| UserId::parse(&format!("u{i}")).unwrap())
            .collect();
        let conns: Vec<Conn<'_>> = users.iter().map(|u| hub.connect(u)).collect();
        let parts = hub.heartbeat_parts();
        assert_eq!(parts.len(), 2);
        assert!(
            parts
                .iter()
                .all(|p| p.heartbeat && p.online.len() <= PRESENCE_REPORT_MAX)
        );
        let listed: HashSet<&String> = parts.iter().flat_map(|p| &p.online).collect();
        assert_eq!(listed.len(), users.len());
        drop(conns);
        assert!(hub.heartbeat_parts().is_empty());
    }

    #[test]
    fn watches_are_counted_per_gateway_and_pushes_shed_when_the_queue_is_half_full() {
        let hub = hub();
        let (alice, carol) = (
            UserId::parse("alice").unwrap(),
            UserId::parse("carol").unwrap(),
        );
        let a = hub.connect(&alice);
        let c = hub.connect(&carol);
        let (a_out, c_out) = (Arc::new(Outbox::new(4)), Arc::new(Outbox::new(4)));
        let (a_rx, c_rx) = (a_out.clone(), c_out.clone());
        set_watch(
            &mut hub.lock(),
            a.id,
            Some(a_out.clone()),
            vec!["bob".into()],
        );
        set_watch(
            &mut hub.lock(),
            c.id,
            Some(c_out.clone()),
            vec!["bob".into(), "dave".into()],
        );
        assert_eq!(hub.watched(), vec!["bob", "dave"]);
        let report = hub.take_events().unwrap();
        let mut watch = report.watch.clone();
        watch.sort();
        assert_eq!(
            watch,
            vec!["bob", "dave"],
            "one watch per user, not per connection"
        );

        let push = |user: &str| PresencePush {
            users: vec![PresenceState {
                user: user.into(),
                online: true,
                last_seen: None,
            }],
        };
        hub.deliver(push("bob"));
        assert!(a_rx.pop().is_some() && c_rx.pop().is_some());
        hub.deliver(push("dave"));
        assert!(a_rx.pop().is_none(), "alice does not watch dave");
        assert!(c_rx.pop().is_some());

        // Fill alice's queue to half (2 of 4): the next push is dropped, not queued.
        let filler = || Utf8Bytes::from_static("{}");
        a_out.push(filler()).unwrap();
        a_out.push(filler()).unwrap();
        hub.deliver(push("bob"));
        let mut queued = 0;
        while a_rx.pop().is_some() {
            queued += 1;
        }
        assert_eq!(queued, 2, "only the fillers");

        // Replacing the view unwatches what left it; the last connection leaving unwatches.
        set_watch(&mut hub.lock(), a.id, Some(a_out), vec!["erin".into()]);
        drop(c);
        let report = hub.take_events().unwrap();
        let mut unwatch = report.unwatch.clone();
        unwatch.sort();
        assert_eq!(unwatch, vec!["bob", "dave"]);
        assert_eq!(report.watch, vec!["erin"]);
        drop(a);
        assert_eq!(hub.take_events().unwrap().unwatch, vec!["erin"]);
    }

    #[test]
    fn typing_is_checked_and_rate_limited_per_user() {
        let hub = hub();
        let alice = UserId::parse("alice").unwrap();
        let code = |r: Result<BoxFuture<'static, ()>, ErrorFrame>| r.err().map(|e| e.code);
        assert_eq!(
            code(hub.typing(&alice, "dm~bob~carol".into(), true)),
            Some(ErrorCode::NotMember)
        );
        assert_eq!(
            code(hub.typing(&alice, "dm.x".into(), true)),
            Some(ErrorCode::InvalidId)
        );
        // Burst 5, then refused with a retry hint.
        for _ in 0..5 {
            assert_eq!(code(hub.typing(&alice, "dm~alice~bob".into(), true)), None);
        }
        let refused = hub.typing(&alice, "g~team".into(), true).err().unwrap();
        assert_eq!(refused.code, ErrorCode::RateLimited);
        assert!(refused.retry_after_ms.unwrap() >= 1);
        assert_eq!(refused.conv.as_deref(), Some("g~team"));
    }
}
