//! The worker's membership view of the groups it delivers, kept from the stamped stream itself.
//!
//! A view is seeded with one `chat.api.group_info` request (members as of the group's seq `S`,
//! where `S` is at least the seq `s` of the message being delivered: the responder waits for
//! its store; with the former members still in at `s`), then kept by applying the membership events that follow in stream order. No store
//! read per message. A view stays trustworthy only while the worker sees every seq of the
//! group: a message more than one past the view (another worker delivered the seqs between,
//! say after a pin move) makes it stale, and it is seeded again.
//!
//! Memory: about 70 bytes per member (the user id, its join seq, the hash table slot) plus
//! about 150 bytes per group; [`Views`] evicts the least recently used groups once the cached
//! members exceed the configured bound.

use std::collections::HashMap;

use chat_protocol::{
    api::GroupInfoReply,
    frames::{GroupEvent, Message},
    ids::UserId,
    membership,
};

/// One group's members as of seq `seq` (every membership event up to it applied).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct View {
    pub seq: u64,
    /// Member -> seq from which it sees the group.
    pub members: HashMap<UserId, u64>,
    /// Former members from the seed, with the seqs they saw (`joined..=left`): an older
    /// message the view is seeded after still reaches who was a member then. Dropped once the
    /// view has passed the last of them.
    former: Vec<(UserId, u64, u64)>,
    last_used: u64,
}

/// Who gets one stamped message of a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Members at the message's seq (the sender included), plus the members a `removed` or
    /// `left` event is about: the event is the last message they get.
    pub recipients: Vec<UserId>,
    /// The users a membership event is about (created: the creator and the founding members;
    /// added, removed: its members; left: who left). Empty for other messages.
    pub named: Vec<UserId>,
    /// Current number of members, after the event.
    pub members: usize,
}

impl View {
    /// A view from a `group_info` answer; `None` for an error answer.
    pub fn seeded(reply: GroupInfoReply) -> Option<Self> {
        match reply {
            GroupInfoReply::Group { members, seq, .. } => {
                let (current, former): (Vec<_>, Vec<_>) =
                    members.into_iter().partition(|m| m.left.is_none());
                Some(Self {
                    seq,
                    members: current
                        .into_iter()
                        .filter_map(|m| UserId::parse(&m.user).ok().map(|u| (u, m.joined)))
                        .collect(),
                    former: former
                        .into_iter()
                        .filter_map(|m| {
                            let left = m.left?;
                            UserId::parse(&m.user).ok().map(|u| (u, m.joined, left))
                        })
                        .collect(),
                    last_used: 0,
                })
            }
            GroupInfoReply::Error(_) => None,
        }
    }

    /// Whether the view can deliver seq `seq`: it covers it, or `seq` is the very next one.
    pub fn covers(&self, seq: u64) -> bool {
        seq <= self.seq.saturating_add(1)
    }

    /// Plans the delivery of `m` and applies its membership event, if the view has not already
    /// (events up to `self.seq` are reflected). A message older than the view goes to the
    /// members of its seq: those that had joined by then, and the former members the seed
    /// listed (those that left at or after the seq the seed was asked for).
    pub fn plan(&mut self, m: &Message) -> Plan {
        let s = m.seq;
        let fresh = s > self.seq;
        let named = m
            .event
            .as_ref()
            .map(|e| named(e, &m.from))
            .unwrap_or_default();
        let leaving = matches!(
            m.event,
            Some(GroupEvent::Removed { .. } | GroupEvent::Left { .. })
        );
        if fresh
            && matches!(
                m.event,
                Some(GroupEvent::Created { .. } | GroupEvent::Added { .. })
            )
        {
            for user in &named {
                self.members.entry(user.clone()).or_insert(s);
            }
        }
        let mut recipients: Vec<UserId> = self
            .members
            .iter()
            .filter(|(_, joined)| **joined <= s)
            .map(|(u, _)| u.clone())
            .collect();
        self.former.retain(|(_, _, left)| *left >= s);
        for (user, joined, _) in &self.former {
            if *joined <= s && !recipients.contains(user) {
                recipients.push(user.clone());
            }
        }
        if leaving {
            for user in &named {
                if !recipients.contains(user) {
                    recipients.push(user.clone());
                }
                if fresh {
                    self.members.remove(user);
                }
            }
        }
        recipients.sort_unstable();
        self.seq = self.seq.max(s);
        Plan {
            recipients,
            named,
            members: self.members.len(),
        }
    }
}

/// The users a membership event is about ([`membership::named`]), as ids.
fn named(event: &GroupEvent, from: &str) -> Vec<UserId> {
    membership::named(event, from)
        .into_iter()
        .filter_map(|u| UserId::parse(u).ok())
        .collect()
}

/// The cached views, bounded by their total number of members.
pub struct Views {
    map: HashMap<String, View>,
    members: usize,
    max_members: usize,
    clock: u64,
}

impl Views {
    pub fn new(max_members: usize) -> Self {
        Self {
            map: HashMap::new(),
            members: 0,
            max_members: max_members.max(1),
            clock: 0,
        }
    }

    /// Plans `m` with the cached view of `conv`, if there is one that covers it.
    pub fn plan(&mut self, conv: &str, m: &Message) -> Option<Plan> {
        let view = self.map.get_mut(conv)?;
        if !view.covers(m.seq) {
            return None;
        }
        Some(self.update(conv, |v| v.plan(m)))
    }

    /// Runs `f` on the view of `conv` (which must exist), keeping the member count.
    fn update<T>(&mut self, conv: &str, f: impl FnOnce(&mut View) -> T) -> T {
        self.clock += 1;
        let view = self.map.get_mut(conv).expect("view exists");
        let before = view.members.len();
        view.last_used = self.clock;
        let out = f(view);
        self.members = self.members - before + view.members.len();
        out
    }

    /// The members of `conv`'s cached view, for a receipt (which has no seq of its own).
    pub fn members(&mut self, conv: &str) -> Option<Vec<UserId>> {
        self.map.contains_key(conv).then(|| {
            self.update(conv, |v| {
                let mut members: Vec<UserId> = v.members.keys().cloned().collect();
                members.sort_unstable();
                members
            })
        })
    }

    /// Caches a freshly seeded view of `conv` (replacing any older one), then evicts the least
    /// recently used other views while the cache is over its bound.
    pub fn insert(&mut self, conv: &str, view: View) {
        if let Some(old) = self.map.remove(conv) {
            self.members -= old.members.len();
        }
        self.members += view.members.len();
        self.map.insert(conv.to_owned(), view);
        self.update(conv, |_| ());
        if self.members > self.max_members {
            // Down to 90% at once, so a full cache does not scan on every insert.
            let target = self.max_members - self.max_members / 10;
            let mut by_age: Vec<(u64, String)> = self
                .map
                .iter()
                .filter(|(c, _)| c.as_str() != conv)
                .map(|(c, v)| (v.last_used, c.clone()))
                .collect();
            by_age.sort_unstable();
            for (_, old) in by_age {
                if self.members <= target {
                    break;
                }
                if let Some(v) = self.map.remove(&old) {
                    self.members -= v.members.len();
                    metrics::counter!("fanout_group_view_evictions_total").increment(1);
                }
            }
        }
        metrics::gauge!("fanout_group_views").set(self.map.len() as f64);
        metrics::gauge!("fanout_group_view_members").set(self.members as f64);
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use chat_protocol::frames::GroupMember;

    use super::*;

    fn u(s: &str) -> UserId {
        UserId::parse(s).unwrap()
    }

    fn msg(seq: u64, from: &str, event: Option<GroupEvent>) -> Message {
        Message {
            conv: "g~team".into(),
            seq,
            from: from.into(),
            id: format!("m{seq}"),
            ts: 1,
            body: String::new(),
            event,
            media: None,
        }
    }

    fn names(users: &[UserId]) -> Vec<&str> {
        users.iter().map(UserId::as_str).collect()
    }

    fn strings(users: &[&str]) -> Vec<String> {
        users.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn follows_membership_events_in_stream_order() {
        let mut v = View::default();
        let created = GroupEvent::Created {
            name: "t".into(),
            members: strings(&["bob"]),
        };
        let p = v.plan(&msg(1, "alice", Some(created)));
        assert_eq!(names(&p.recipients), ["alice", "bob"]);
        assert_eq!(names(&p.named), ["alice", "bob"]);
        assert_eq!(
            names(&v.plan(&msg(2, "bob", None)).recipients),
            ["alice", "bob"]
        );
        let added = GroupEvent::Added {
            members: strings(&["carol"]),
        };
        let p = v.plan(&msg(3, "alice", Some(added)));
        assert_eq!(names(&p.recipients), ["alice", "bob", "carol"]);
        assert_eq!(v.members[&u("carol")], 3);
        let removed = GroupEvent::Removed {
            members: strings(&["bob"]),
        };
        let p = v.plan(&msg(4, "alice", Some(removed)));
        assert_eq!(
            names(&p.recipients),
            ["alice", "bob", "carol"],
            "bob gets his removal"
        );
        assert_eq!((p.members, v.seq), (2, 4));
        assert_eq!(
            names(&v.plan(&msg(5, "carol", None)).recipients),
            ["alice", "carol"]
        );
        let p = v.plan(&msg(6, "carol", Some(GroupEvent::Left { admin: None })));
        assert_eq!(names(&p.recipients), ["alice", "carol"]);
        assert_eq!(names(&v.plan(&msg(7, "alice", None)).recipients), ["alice"]);
    }

    #[test]
    fn a_seeded_view_delivers_older_messages_to_who_had_joined() {
        // Seeded at seq 10 for a message at 7: alice founded, dave added at 8; erin (a member
        // since 1) was removed at 9.
        let reply = GroupInfoReply::Group {
            name: "t".into(),
            members: vec![
                GroupMember {
                    user: "alice".into(),
                    admin: true,
                    joined: 1,
                    left: None,
                },
                GroupMember {
                    user: "dave".into(),
                    admin: false,
                    joined: 8,
                    left: None,
                },
                GroupMember {
                    user: "erin".into(),
                    admin: false,
                    joined: 1,
                    left: Some(9),
                },
            ],
            seq: 10,
        };
        let mut v = View::seeded(reply).unwrap();
        assert!(v.covers(7) && v.covers(11) && !v.covers(12));
        assert_eq!(
            names(&v.plan(&msg(7, "alice", None)).recipients),
            ["alice", "erin"]
        );
        // Old events are not applied again; erin is still a member at 8 and gets her removal.
        let added = GroupEvent::Added {
            members: strings(&["dave"]),
        };
        assert_eq!(
            names(&v.plan(&msg(8, "alice", Some(added))).recipients),
            ["alice", "dave", "erin"]
        );
        let removed = GroupEvent::Removed {
            members: strings(&["erin"]),
        };
        let p = v.plan(&msg(9, "alice", Some(removed)));
        assert_eq!(names(&p.recipients), ["alice", "dave", "erin"]);
        assert_eq!((p.members, v.seq), (2, 10));
        assert_eq!(
            names(&v.plan(&msg(11, "dave", None)).recipients),
            ["alice", "dave"]
        );
        assert_eq!(v.seq, 11);
    }

    #[test]
    fn evicts_least_recently_used_views_over_the_member_bound() {
        let view = |n: usize| View {
            seq: 1,
            members: (0..n).map(|i| (u(&format!("u{i}")), 1)).collect(),
            former: Vec::new(),
            last_used: 0,
        };
        let mut views = Views::new(10);
        views.insert("g~a", view(4));
        views.insert("g~b", view(4));
        assert!(views.plan("g~a", &msg(2, "u0", None)).is_some());
        views.insert("g~c", view(4));
        assert_eq!(views.len(), 2);
        assert!(
            views.members("g~b").is_none(),
            "b was the least recently used"
        );
        assert!(views.members("g~a").is_some() && views.members("g~c").is_some());
        assert!(
            views.plan("g~a", &msg(9, "u0", None)).is_none(),
            "a gap: seed again"
        );
        views.insert("g~huge", view(50));
        assert_eq!(
            views.len(),
            1,
            "the new view stays even alone over the bound"
        );
    }
}
