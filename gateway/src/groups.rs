//! Large groups: the fan-out worker publishes each event of a large group once, on core NATS
//! `chat.grp.<conv>`, instead of once per member. The gateway holds one subscription per group
//! that any local connection's user belongs to (shared, counted, dropped with the last such
//! connection) and hands each event to the connections registered for it.
//!
//! Which connections may see an event is decided by the connection itself, in its forwarding
//! task, from its own record of the user's membership (`joined`, the seq from which the user
//! sees the group). That record is built at connect from `chat.api.conversations` and then
//! kept from the membership events that name the user, which the worker pushes on the user's
//! own subject (`chat.user.<user>`). Because the forwarding task takes the user's subject first,
//! a removal is always applied before any later event of the group is looked at: a removed user
//! never gets an event past its removal. An event that names the user (added, removed, left,
//! created) is skipped on `chat.grp`, since it arrives on the user's own subject too.
//!
//! Pushes are best effort like every push: an event published before this gateway's
//! subscription is live (the first member connecting, a user just added) is missed, and the
//! device fills the gap from the seqs with `history` or `sync`.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use axum::extract::ws::Utf8Bytes;
use chat_protocol::{
    frames::ServerFrame,
    ids::{ConvId, UserId},
    membership::{self, Turn},
};
use futures::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::{
    backend::{Backend, Push},
    metrics,
};

/// One event of a large group, decoded once per gateway and shared by its connections.
#[derive(Debug)]
pub(crate) struct GroupPush {
    pub conv: String,
    pub seq: u64,
    pub text: Utf8Bytes,
    /// Users a membership event is about: they get it on their own subject instead.
    pub named: Vec<String>,
}

/// A connection's end of the hub: where its groups' events go.
struct Link {
    tx: mpsc::Sender<Arc<GroupPush>>,
    /// Cancelled when the connection's group queue was full: it is a slow consumer.
    slow: CancellationToken,
}

struct Entry {
    links: Vec<(u64, Arc<Link>)>,
    stop: CancellationToken,
    /// Becomes true once the server has the subscription.
    live: watch::Receiver<bool>,
}

/// Resolves once a group's subscription is live (or failed).
pub(crate) struct Live(watch::Receiver<bool>);

impl Live {
    pub(crate) async fn wait(mut self) {
        let _ = self.0.wait_for(|live| *live).await;
    }
}

/// The gateway's `chat.grp.<conv>` subscriptions and the connections registered for each.
#[derive(Default)]
pub(crate) struct GroupHub {
    groups: Mutex<HashMap<String, Entry>>,
    next_id: AtomicU64,
}

impl GroupHub {
    /// The groups subscribed now.
    #[cfg(test)]
    pub(crate) fn subscribed(&self) -> Vec<String> {
        let groups = self.groups.lock().unwrap();
        groups.keys().cloned().collect()
    }

    /// Registers connection `id` for `conv`, starting the group's subscription if it is the
    /// first. The returned [`Live`] resolves once the subscription is live.
    fn register<B: Backend>(
        self: &Arc<Self>,
        backend: &B,
        conv: &ConvId,
        id: u64,
        link: &Arc<Link>,
    ) -> Live {
        let mut groups = self.groups.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = groups.get_mut(conv.as_str()) {
            if !entry.links.iter().any(|(i, _)| *i == id) {
                entry.links.push((id, link.clone()));
            }
            return Live(entry.live.clone());
        }
        let stop = CancellationToken::new();
        let (ready, live) = watch::channel(false);
        groups.insert(
            conv.to_string(),
            Entry {
                links: vec![(id, link.clone())],
                stop: stop.clone(),
                live: live.clone(),
            },
        );
        ::metrics::gauge!(metrics::GROUP_SUBSCRIPTIONS).increment(1.0);
        tokio::spawn(
            self.clone()
                .listen(backend.clone(), conv.clone(), stop, ready),
        );
        Live(live)
    }

    /// Unregisters connection `id` from `conv`; the last one ends the subscription.
    fn unregister(&self, conv: &str, id: u64) {
        let mut groups = self.groups.lock().unwrap_or_else(|e| e.into_inner());
        let Some(entry) = groups.get_mut(conv) else {
            return;
        };
        entry.links.retain(|(i, _)| *i != id);
        if entry.links.is_empty() {
            entry.stop.cancel();
            groups.remove(conv);
            ::metrics::gauge!(metrics::GROUP_SUBSCRIPTIONS).decrement(1.0);
        }
    }

    /// The group's subscription: every event goes to the registered connections.
    async fn listen<B: Backend>(
        self: Arc<Self>,
        backend: B,
        conv: ConvId,
        stop: CancellationToken,
        ready: watch::Sender<bool>,
    ) {
        let subscribed = tokio::select! {
            s = backend.subscribe_group(&conv) => s,
            _ = stop.cancelled() => return,
        };
        let mut pushes = match subscribed {
            Ok(pushes) => pushes,
            Err(err) => {
                // The connections stay registered; their devices recover by sync.
                tracing::warn!(conv = %conv, error = %err, "group subscription failed");
                ::metrics::counter!(metrics::GROUP_SUBSCRIBE_FAILURES).increment(1);
                return;
            }
        };
        let _ = ready.send(true);
        loop {
            let push = tokio::select! {
                push = pushes.next() => push,
                _ = stop.cancelled() => return,
            };
            let Some(Push { payload, .. }) = push else {
                return;
            };
            let Some(push) = decode(&conv, payload) else {
                continue;
            };
            let push = Arc::new(push);
            let groups = self.groups.lock().unwrap_or_else(|e| e.into_inner());
            let Some(entry) = groups.get(conv.as_str()) else {
                return;
            };
            for (_, link) in &entry.links {
                if let Err(mpsc::error::TrySendError::Full(_)) = link.tx.try_send(push.clone()) {
                    link.slow.cancel();
                }
            }
        }
    }
}

/// A `message` frame of `conv`, with the users its membership event names.
fn decode(conv: &ConvId, payload: bytes::Bytes) -> Option<GroupPush> {
    let Ok(ServerFrame::Message(m)) = serde_json::from_slice::<ServerFrame>(&payload) else {
        tracing::warn!(conv = %conv, "dropping an undecodable group push");
        return None;
    };
    if m.conv != conv.as_str() {
        return None;
    }
    let named = m
        .event
        .as_ref()
        .map(|e| {
            membership::named(e, &m.from)
                .into_iter()
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    Some(GroupPush {
        conv: m.conv,
        seq: m.seq,
        text: Utf8Bytes::try_from(payload).ok()?,
        named,
    })
}

/// How a membership event on the user's own subject changes what the user may see.
pub(crate) enum Change {
    Joined { conv: ConvId, seq: u64 },
    Left { conv: ConvId },
}

/// The membership change a push on the user's own subject makes, if it is a group event
/// naming `user`. Cheap for everything else: only payloads mentioning an event are decoded.
pub(crate) fn own_change(user: &UserId, payload: &[u8]) -> Option<Change> {
    const MARK: &[u8] = b"\"event\"";
    if !payload.windows(MARK.len()).any(|w| w == MARK) {
        return None;
    }
    let Ok(ServerFrame::Message(m)) = serde_json::from_slice::<ServerFrame>(payload) else {
        return None;
    };
    let event = m.event.as_ref()?;
    let conv = ConvId::parse(&m.conv).ok().filter(ConvId::is_group)?;
    match membership::turn_of(event, &m.from, user.as_str())? {
        Turn::Joined => Some(Change::Joined { conv, seq: m.seq }),
        Turn::Left => Some(Change::Left { conv }),
    }
}

/// One connection's groups: its registrations in the hub and the user's membership in each
/// (`joined`), consulted for every event before it is forwarded. Unregisters on drop.
pub(crate) struct ConnGroups<B: Backend> {
    hub: Arc<GroupHub>,
    backend: B,
    user: UserId,
    id: u64,
    link: Arc<Link>,
    rx: mpsc::Receiver<Arc<GroupPush>>,
    joined: HashMap<ConvId, u64>,
}

impl<B: Backend> ConnGroups<B> {
    pub(crate) fn new(hub: Arc<GroupHub>, backend: B, user: UserId, queue: usize) -> Self {
        let (tx, rx) = mpsc::channel(queue.max(1));
        Self {
            id: hub.next_id.fetch_add(1, Ordering::Relaxed),
            hub,
            backend,
            user,
            link: Arc::new(Link {
                tx,
                slow: CancellationToken::new(),
            }),
            rx,
            joined: HashMap::new(),
        }
    }

    /// The user sees `conv` from seq `joined` on. The returned [`Live`] resolves once the
    /// group's subscription is live.
    pub(crate) fn join(&mut self, conv: ConvId, joined: u64) -> Live {
        let ready = self.hub.register(&self.backend, &conv, self.id, &self.link);
        self.joined
            .entry(conv)
            .and_modify(|j| *j = (*j).min(joined))
            .or_insert(joined);
        ready
    }

    /// The user left `conv` (or was removed): nothing of it is forwarded any more.
    pub(crate) fn leave(&mut self, conv: &ConvId) {
        if self.joined.remove(conv).is_some() {
            self.hub.unregister(conv.as_str(), self.id);
        }
    }

    /// Applies a membership change; a join returns when the group's subscription goes live.
    pub(crate) fn apply(&mut self, change: Change) -> Option<Live> {
        match change {
            Change::Joined { conv, seq } => Some(self.join(conv, seq)),
            Change::Left { conv } => {
                self.leave(&conv);
                None
            }
        }
    }

    /// The next event of one of the user's groups that this connection may forward: the user
    /// is a member at its seq, and it does not name the user (those come on the user's own
    /// subject). `None` when the hub stopped.
    pub(crate) async fn next(&mut self) -> Option<Utf8Bytes> {
        loop {
            let push = self.rx.recv().await?;
            let Ok(conv) = ConvId::parse(&push.conv) else {
                continue;
            };
            let Some(joined) = self.joined.get(&conv) else {
                continue;
            };
            if push.seq < *joined {
                continue;
            }
            if push.named.iter().any(|u| u == self.user.as_str()) {
                continue;
            }
            ::metrics::counter!(metrics::GROUP_PUSHES).increment(1);
            return Some(push.text.clone());
        }
    }

    /// Cancelled when this connection's group queue overflowed (a slow consumer).
    pub(crate) fn slow_token(&self) -> CancellationToken {
        self.link.slow.clone()
    }
}

impl<B: Backend> Drop for ConnGroups<B> {
    fn drop(&mut self) {
        for conv in self.joined.keys() {
            self.hub.unregister(conv.as_str(), self.id);
        }
    }
}
