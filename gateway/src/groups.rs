//! Large groups: the fan-out worker publishes each event of a large group once, on core NATS
//! `chat.grp.<conv>`, instead of once per member. The gateway subscribes once per group that a
//! user connected here belongs to (on the push connection, shared by all its connections,
//! dropped with the last member's last connection) and the [router](crate::router) hands each
//! event to the connections of the members who may see it.
//!
//! Who may see an event is kept per user connected here ([`Membership`]): the seq from which
//! the user sees each group (`joined`). It is built at the user's first connection from
//! `chat.api.conversations` ([`list`]) and then kept from the membership events that name the
//! user, which the worker pushes on the user's own subject (`chat.user.<user>`). The user's
//! subject and the group's come over the same push connection, so the router sees them in the
//! order the worker published them: a removal is applied before any later event of the group
//! is routed, and a removed user never gets an event past its removal. An event that names the
//! user (added, removed, left, created) is skipped on `chat.grp`, since it arrives on the user's
//! own subject too.
//!
//! Pushes are best effort like every push: an event published before this gateway's
//! subscription is live (the first member connecting, a user just added) is missed, and the
//! device fills the gap from the seqs with `history` or `sync`.

use std::collections::HashMap;

use axum::extract::ws::Utf8Bytes;
use chat_protocol::{
    api::{self, ConversationsReply, ConversationsRequest},
    frames::ServerFrame,
    ids::{ConvId, UserId},
    membership::{self, Turn},
};
use tokio::time::{Instant, timeout_at};

use crate::{backend::Backend, metrics};

/// One event of a large group, decoded once per gateway and shared by its connections.
#[derive(Debug)]
pub(crate) struct GroupPush {
    pub seq: u64,
    pub text: Utf8Bytes,
    /// Users a membership event is about: they get it on their own subject instead.
    pub named: Vec<String>,
}

/// A `message` frame of `conv`, with the users its membership event names.
pub(crate) fn decode(conv: &str, payload: &[u8]) -> Option<GroupPush> {
    let Ok(ServerFrame::Message(m)) = serde_json::from_slice::<ServerFrame>(payload) else {
        tracing::warn!(conv, "dropping an undecodable group push");
        return None;
    };
    if m.conv != conv {
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
    let text = String::from_utf8(payload.to_vec()).ok()?;
    Some(GroupPush {
        seq: m.seq,
        text: Utf8Bytes::from(text),
        named,
    })
}

/// How a membership event on the user's own subject changes what the user may see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Change {
    Joined { conv: ConvId, seq: u64 },
    Left { conv: ConvId, seq: u64 },
}

/// The membership change a push on the user's own subject makes, if it is a group event
/// naming `user`. Cheap for everything else: only payloads mentioning an event are decoded.
pub(crate) fn own_change(user: &str, payload: &[u8]) -> Option<Change> {
    const MARK: &[u8] = b"\"event\"";
    if !payload.windows(MARK.len()).any(|w| w == MARK) {
        return None;
    }
    let Ok(ServerFrame::Message(m)) = serde_json::from_slice::<ServerFrame>(payload) else {
        return None;
    };
    let event = m.event.as_ref()?;
    let conv = ConvId::parse(&m.conv).ok().filter(ConvId::is_group)?;
    match membership::turn_of(event, &m.from, user)? {
        Turn::Joined => Some(Change::Joined { conv, seq: m.seq }),
        Turn::Left => Some(Change::Left { conv, seq: m.seq }),
    }
}

/// A connected user's large groups, as this gateway knows them.
#[derive(Debug, Default)]
pub(crate) struct Membership {
    /// Group → the seq from which the user sees it.
    pub joined: HashMap<ConvId, u64>,
    /// Group → the seq of the event that removed the user, while the user is connected here:
    /// a group list fetched before that event cannot add the group back.
    pub left: HashMap<ConvId, u64>,
}

impl Membership {
    /// Applies a change; true when it added a group the user was not in.
    pub(crate) fn apply(&mut self, change: &Change) -> bool {
        match change {
            Change::Joined { conv, seq } => {
                self.left.remove(conv);
                let new = !self.joined.contains_key(conv);
                let joined = self.joined.entry(conv.clone()).or_insert(*seq);
                *joined = (*joined).min(*seq);
                new
            }
            Change::Left { conv, seq } => {
                self.joined.remove(conv);
                self.left.insert(conv.clone(), *seq);
                false
            }
        }
    }

    /// Applies a group from a list fetched at connect, unless an event seen since says the
    /// list is stale (the user left after `joined`). True when the group was added.
    pub(crate) fn apply_listed(&mut self, conv: &ConvId, joined: u64) -> bool {
        if self.left.get(conv).is_some_and(|left| *left >= joined) {
            return false;
        }
        self.apply(&Change::Joined {
            conv: conv.clone(),
            seq: joined,
        })
    }
}

/// Lists `user`'s groups (`chat.api.conversations`, `groups_only`, every page): each group it
/// is still in, with the seq it sees it from. `None` when the list could not be fetched (logged
/// and counted; the devices recover group messages with sync).
pub(crate) async fn list<B: Backend>(
    backend: &B,
    user: &UserId,
    deadline: Instant,
) -> Option<Vec<(ConvId, u64)>> {
    let mut groups = Vec::new();
    let mut after = None;
    loop {
        let request = ConversationsRequest {
            user: user.to_string(),
            after: after.take(),
            limit: api::CONVERSATIONS_PAGE_MAX,
            groups_only: true,
        };
        let failed = |what: &str| {
            tracing::warn!(what, "listing the user's groups failed");
            ::metrics::counter!(metrics::GROUP_LIST_FAILURES).increment(1);
            None
        };
        let (convs, next) = match timeout_at(deadline, backend.request(&request)).await {
            Ok(Ok(ConversationsReply::Page { convs, more, next })) => {
                (convs, next.filter(|_| more))
            }
            Ok(Ok(ConversationsReply::Error(e))) => return failed(e.code.as_str()),
            Ok(Err(err)) => return failed(&err.to_string()),
            Err(_) => return failed("timed out"),
        };
        for info in convs {
            let Some(conv) = ConvId::parse(&info.conv).ok().filter(ConvId::is_group) else {
                continue;
            };
            if info.left.is_none() {
                groups.push((conv, info.joined.max(1)));
            }
        }
        match next {
            Some(next) => after = Some(next),
            None => return Some(groups),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conv(c: &str) -> ConvId {
        ConvId::parse(c).unwrap()
    }

    #[test]
    fn own_changes_are_found_only_in_events_naming_the_user() {
        let added = r#"{"type":"message","conv":"g~t","seq":4,"from":"bo","id":"o1","ts":1,"body":"","event":{"kind":"added","members":["al"]}}"#;
        assert_eq!(
            own_change("al", added.as_bytes()),
            Some(Change::Joined {
                conv: conv("g~t"),
                seq: 4
            })
        );
        assert_eq!(own_change("cy", added.as_bytes()), None);
        let left = r#"{"type":"message","conv":"g~t","seq":9,"from":"al","id":"o2","ts":1,"body":"","event":{"kind":"left"}}"#;
        assert_eq!(
            own_change("al", left.as_bytes()),
            Some(Change::Left {
                conv: conv("g~t"),
                seq: 9
            })
        );
        let plain = r#"{"type":"message","conv":"g~t","seq":5,"from":"bo","id":"x","ts":1,"body":"\"event\""}"#;
        assert_eq!(own_change("al", plain.as_bytes()), None);
    }

    #[test]
    fn a_stale_list_does_not_undo_a_removal_seen_since() {
        let mut m = Membership::default();
        assert!(m.apply(&Change::Joined {
            conv: conv("g~a"),
            seq: 3
        }));
        m.apply(&Change::Left {
            conv: conv("g~a"),
            seq: 8,
        });
        // A list fetched before the removal still says "member since 3".
        assert!(!m.apply_listed(&conv("g~a"), 3));
        assert!(!m.joined.contains_key(&conv("g~a")));
        // Added again at 12: a list that knows it adds the group back.
        assert!(m.apply_listed(&conv("g~a"), 12));
        assert_eq!(m.joined[&conv("g~a")], 12);
        // The earliest join counts.
        assert!(!m.apply_listed(&conv("g~a"), 10));
        assert_eq!(m.joined[&conv("g~a")], 10);
    }
}
