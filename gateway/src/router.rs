//! The routing table: which connections of this gateway each push goes to.
//!
//! **Interest.** A user connected here has one subscription, `chat.user.<user>`, on the
//! gateway's push connection ([`crate::push`]), shared by all of the user's connections here and
//! dropped with the last one; a large group one of them is in has one, `chat.grp.<conv>`,
//! shared the same way. So nats-server sends this gateway only the traffic of its own users,
//! once per gateway however many devices a user has here, and a user's devices on other
//! gateways get the same message through those gateways' own subscriptions.
//!
//! **Routing.** The push connection hands each message to [`Router::on_message`]: a user's
//! push goes into the outgoing queue of each of the user's connections ([`Outbox`]), a group's
//! event into those of the members who may see it ([`crate::groups`]). A push that asks for a
//! delivery confirmation (a fan-out worker's, with a reply subject) is confirmed **once per
//! gateway**, when at least one connection took it; a push that makes the user a member of a
//! large group is confirmed only once the group's subscription is live, so nothing after the
//! join is missed.
//!
//! **Limits.** The table also counts connections: per user (`max_connections_per_user`, HTTP
//! 429) and for the gateway (`max_connections`, HTTP 503 `overloaded`).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use async_nats::Subject;
use axum::extract::ws::Utf8Bytes;
use chat_protocol::{
    ids::{ConvId, UserId},
    subjects,
};
use tokio::sync::oneshot;

use crate::{
    connection::{Outbox, Session},
    groups::{self, Change, Membership},
    metrics,
    push::{Handler, Interest},
};

/// Where confirmations go (the backend's batching confirmer; a channel in unit tests).
pub(crate) type Confirm = Arc<dyn Fn(Subject) + Send + Sync>;

/// Why a connection cannot be attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AttachError {
    /// The user has `max_connections_per_user` connections here.
    TooManyConnections,
    /// The gateway has `max_connections` connections.
    Full,
    /// The gateway is shutting down.
    ShuttingDown,
}

/// Routing limits and timing (from the gateway config).
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    pub max_per_user: usize,
    /// 0: no limit.
    pub max_connections: usize,
    pub outgoing_queue: usize,
    /// How long a join's confirmation waits for the group's subscription.
    pub live_timeout: Duration,
}

/// A user's connections here: usually one, so the first is kept inline.
struct Conns {
    first: Arc<Outbox>,
    more: Vec<Arc<Outbox>>,
}

impl Conns {
    fn iter(&self) -> impl Iterator<Item = &Arc<Outbox>> {
        std::iter::once(&self.first).chain(&self.more)
    }

    fn len(&self) -> usize {
        1 + self.more.len()
    }

    /// Removes `conn`; false when it was the only one (the caller drops the entry).
    fn remove(&mut self, conn: &Arc<Outbox>) -> bool {
        if let Some(i) = self.more.iter().position(|c| Arc::ptr_eq(c, conn)) {
            self.more.swap_remove(i);
            return true;
        }
        if Arc::ptr_eq(&self.first, conn) {
            return match self.more.pop() {
                Some(next) => {
                    self.first = next;
                    true
                }
                None => false,
            };
        }
        true
    }
}

struct UserEntry {
    sid: u64,
    conns: Conns,
    /// A group list was applied for this user (later connections need none).
    listed: bool,
    /// The user's large groups; `None` for a user in none.
    groups: Option<Box<Membership>>,
}

struct GroupEntry {
    sid: u64,
    members: Vec<UserId>,
}

#[derive(Default)]
struct Table {
    users: HashMap<UserId, UserEntry>,
    groups: HashMap<String, GroupEntry>,
    connections: usize,
    shutting_down: bool,
}

pub(crate) struct Router {
    table: Mutex<Table>,
    interest: Arc<dyn Interest>,
    confirm: Confirm,
    limits: Limits,
}

/// One connection in the table; detached on drop.
pub(crate) struct Attached {
    router: Arc<Router>,
    pub session: Arc<Session>,
    pub outbox: Arc<Outbox>,
    /// The user has no group list here yet: the connection fetches one before `hello`.
    pub needs_listing: bool,
}

impl Drop for Attached {
    fn drop(&mut self) {
        self.router.detach(&self.session.user, &self.outbox);
    }
}

impl Attached {
    pub(crate) fn router(&self) -> &Arc<Router> {
        &self.router
    }
}

impl Router {
    pub(crate) fn new(interest: Arc<dyn Interest>, confirm: Confirm, limits: Limits) -> Self {
        Self {
            table: Mutex::default(),
            interest,
            confirm,
            limits,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a connection of `session.user`, subscribing to the user's subject if it is the
    /// first here. The returned barrier resolves once that subscription is live.
    pub(crate) fn attach(
        self: &Arc<Self>,
        session: Arc<Session>,
    ) -> Result<(Attached, oneshot::Receiver<()>), AttachError> {
        let outbox = Arc::new(Outbox::new(self.limits.outgoing_queue));
        let mut t = self.lock();
        if t.shutting_down {
            return Err(AttachError::ShuttingDown);
        }
        if self.limits.max_connections > 0 && t.connections >= self.limits.max_connections {
            return Err(AttachError::Full);
        }
        let listed = match t.users.get_mut(&session.user) {
            Some(entry) => {
                if entry.conns.len() >= self.limits.max_per_user {
                    return Err(AttachError::TooManyConnections);
                }
                entry.conns.more.push(outbox.clone());
                entry.listed
            }
            None => {
                if self.limits.max_per_user == 0 {
                    return Err(AttachError::TooManyConnections);
                }
                let sid = self.interest.subscribe(&subjects::user(&session.user));
                t.users.insert(
                    session.user.clone(),
                    UserEntry {
                        sid,
                        conns: Conns {
                            first: outbox.clone(),
                            more: Vec::new(),
                        },
                        listed: false,
                        groups: None,
                    },
                );
                false
            }
        };
        t.connections += 1;
        ::metrics::gauge!(metrics::CONNECTIONS).set(t.connections as f64);
        drop(t);
        let attached = Attached {
            router: self.clone(),
            session,
            outbox,
            needs_listing: !listed,
        };
        Ok((attached, self.interest.barrier()))
    }

    fn detach(&self, user: &UserId, outbox: &Arc<Outbox>) {
        let mut t = self.lock();
        let Table {
            users,
            groups,
            connections,
            ..
        } = &mut *t;
        *connections -= 1;
        ::metrics::gauge!(metrics::CONNECTIONS).set(*connections as f64);
        let Some(entry) = users.get_mut(user) else {
            return;
        };
        if entry.conns.remove(outbox) {
            return;
        }
        let entry = users.remove(user).expect("present");
        self.interest.unsubscribe(entry.sid);
        for conv in entry.groups.iter().flat_map(|m| m.joined.keys()) {
            self.leave_group(groups, conv.as_str(), user);
        }
    }

    /// Gives back the room of maps that shrank (after a wave of disconnects).
    pub(crate) fn prune(&self) {
        let mut t = self.lock();
        let (users, groups) = (t.users.len(), t.groups.len());
        t.users.shrink_to(users * 2);
        t.groups.shrink_to(groups * 2);
    }

    /// Shutdown: no new connections; every connection finishes and closes with 1001.
    pub(crate) fn shut_down(&self) {
        let mut t = self.lock();
        t.shutting_down = true;
        for entry in t.users.values() {
            for conn in entry.conns.iter() {
                conn.shut_down();
            }
        }
    }

    /// Applies the group list fetched for `user` at connect; the barrier (when it subscribed to
    /// a group) resolves once the new subscriptions are live.
    pub(crate) fn apply_listing(
        &self,
        user: &UserId,
        list: Vec<(ConvId, u64)>,
    ) -> Option<oneshot::Receiver<()>> {
        let mut t = self.lock();
        let Table { users, groups, .. } = &mut *t;
        let entry = users.get_mut(user)?;
        entry.listed = true;
        if list.is_empty() {
            return None;
        }
        let membership = entry.groups.get_or_insert_with(Box::default);
        let mut subscribed = false;
        for (conv, joined) in list {
            if membership.apply_listed(&conv, joined) {
                subscribed |= self.join_group(groups, &conv, user);
            }
        }
        if membership.joined.is_empty() && membership.left.is_empty() {
            entry.groups = None;
        }
        subscribed.then(|| self.interest.barrier())
    }

    /// Adds `user` to the members of `conv` here; true when that started a subscription.
    fn join_group(
        &self,
        groups: &mut HashMap<String, GroupEntry>,
        conv: &ConvId,
        user: &UserId,
    ) -> bool {
        let mut new = false;
        let entry = groups.entry(conv.as_str().to_owned()).or_insert_with(|| {
            new = true;
            ::metrics::gauge!(metrics::GROUP_SUBSCRIPTIONS).increment(1.0);
            GroupEntry {
                sid: self.interest.subscribe(&subjects::group(conv)),
                members: Vec::new(),
            }
        });
        if !entry.members.contains(user) {
            entry.members.push(user.clone());
        }
        new
    }

    fn leave_group(&self, groups: &mut HashMap<String, GroupEntry>, conv: &str, user: &UserId) {
        let Some(entry) = groups.get_mut(conv) else {
            return;
        };
        entry.members.retain(|m| m != user);
        if entry.members.is_empty() {
            self.interest.unsubscribe(entry.sid);
            groups.remove(conv);
            ::metrics::gauge!(metrics::GROUP_SUBSCRIPTIONS).decrement(1.0);
        }
    }

    /// A push on `chat.user.<user>`: into every connection of the user here, unchanged (the
    /// payloads are complete frames: `message`, `receipt`, `error`, `typing`).
    fn deliver_user(&self, user: &str, reply: Option<&str>, payload: &[u8]) {
        // Typing is ephemeral: dropped for a connection whose queue is half full.
        let ephemeral = payload.starts_with(br#"{"type":"typing""#);
        let change = if ephemeral {
            None
        } else {
            groups::own_change(user, payload)
        };
        let Ok(text) = String::from_utf8(payload.to_vec()) else {
            tracing::warn!("dropping a push that is not utf-8");
            return;
        };
        let text = Utf8Bytes::from(text);
        let mut t = self.lock();
        let Table { users, groups, .. } = &mut *t;
        let Some(entry) = users.get_mut(user) else {
            return;
        };
        let mut delivered = false;
        for conn in entry.conns.iter() {
            if ephemeral {
                if !conn.offer(text.clone()) {
                    ::metrics::counter!(crate::presence::SHED, "kind" => "typing").increment(1);
                }
            } else if conn.push_push(user, text.clone()) {
                delivered = true;
            }
        }
        let live = match (&change, UserId::parse(user)) {
            (Some(change), Ok(user)) => {
                let user = &user;
                let membership = entry.groups.get_or_insert_with(Box::default);
                let added = membership.apply(change);
                match change {
                    Change::Joined { conv, .. } => {
                        if added {
                            self.join_group(groups, conv, user);
                        }
                        // Live already or not, the barrier says so after one round trip.
                        Some(self.interest.barrier())
                    }
                    Change::Left { conv, .. } => {
                        self.leave_group(groups, conv.as_str(), user);
                        None
                    }
                }
            }
            _ => None,
        };
        drop(t);
        let Some(reply) = reply.filter(|_| delivered) else {
            return;
        };
        let reply = Subject::from(reply);
        ::metrics::counter!(metrics::DELIVERIES_CONFIRMED).increment(1);
        match live {
            None => (self.confirm)(reply),
            Some(live) => {
                // The worker holds the group's next event until this confirmation.
                let (confirm, limit) = (self.confirm.clone(), self.limits.live_timeout);
                tokio::spawn(async move {
                    if tokio::time::timeout(limit, live).await.is_err() {
                        tracing::warn!("group subscription not live in time");
                    }
                    confirm(reply);
                });
            }
        }
    }

    /// An event on `chat.grp.<conv>`: into the connections of the members who may see it.
    fn deliver_group(&self, conv: &str, payload: &[u8]) {
        let Some(push) = groups::decode(conv, payload) else {
            return;
        };
        let Ok(conv_id) = ConvId::parse(conv) else {
            return;
        };
        let t = self.lock();
        let Some(group) = t.groups.get(conv) else {
            return;
        };
        for member in &group.members {
            if push.named.iter().any(|u| u == member.as_str()) {
                continue;
            }
            let Some(entry) = t.users.get(member) else {
                continue;
            };
            let sees = entry
                .groups
                .as_ref()
                .and_then(|m| m.joined.get(&conv_id))
                .is_some_and(|joined| push.seq >= *joined);
            if !sees {
                continue;
            }
            for conn in entry.conns.iter() {
                if conn.push_push(member.as_str(), push.text.clone()) {
                    ::metrics::counter!(metrics::GROUP_PUSHES).increment(1);
                }
            }
        }
    }

    /// The large groups subscribed now (tests).
    #[cfg(test)]
    pub(crate) fn groups(&self) -> Vec<String> {
        let mut v: Vec<String> = self.lock().groups.keys().cloned().collect();
        v.sort();
        v
    }
}

impl Handler for Router {
    fn on_message(&self, subject: &str, reply: Option<&str>, payload: &[u8]) {
        if let Some(user) = subjects::split_user(subject) {
            self.deliver_user(user, reply, payload);
        } else if let Some(conv) = subjects::split_group(subject) {
            self.deliver_group(conv, payload);
        }
    }

    fn resubscribe(&self) {
        let t = self.lock();
        for (user, entry) in &t.users {
            self.interest.resubscribe(entry.sid, &subjects::user(user));
        }
        for (conv, entry) in &t.groups {
            if let Ok(conv) = ConvId::parse(conv) {
                self.interest
                    .resubscribe(entry.sid, &subjects::group(&conv));
            }
        }
    }
}
