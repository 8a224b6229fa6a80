//! The write plan of one `apply`: which rows of which partitions a batch of changes writes,
//! computed without a server from the batch and what was read before it ([`Known`]).
//!
//! Every write carries its own write timestamp (see [`codec`](super::codec)): a register that
//! only grows is written with a timestamp that grows with its value, and a row that follows
//! events is written with the timestamp of the event's stream position. So the plan of a batch
//! applied twice, or of an old batch applied after a newer one, leaves the same state: the
//! server keeps, cell by cell, what the newest cause wrote.

use std::collections::{BTreeMap, HashMap, HashSet};

use scylla::value::CqlValue;

use super::codec::{self, FOLLOW_POS, big, bucket, ts_max, ts_min};
use crate::{Change, Event, GroupChange, StoredMessage};

/// One partition of one table (or, for [`Partition::User`], the same partition key of the two
/// per-user tables, which live on the same replicas).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Partition {
    Messages { conv: String, bucket: i64 },
    ClientIds { conv: String, from: String },
    Conversation { conv: String },
    Marks { conv: String },
    Members { conv: String },
    User { user: String },
    Meta,
}

/// One statement of the plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    Message(StoredMessage),
    ClientId {
        conv: String,
        from: String,
        client_id: String,
        seq: u64,
        stream_seq: u64,
    },
    Latest {
        conv: String,
        seq: u64,
    },
    ConvPos {
        conv: String,
        pos: u64,
    },
    Name {
        conv: String,
        name: String,
        at: u64,
    },
    MemberCount {
        conv: String,
        count: u64,
        at: u64,
    },
    Delivered {
        conv: String,
        user: String,
        seq: u64,
    },
    Read {
        conv: String,
        user: String,
        seq: u64,
    },
    Member {
        conv: String,
        user: String,
        row: MemberRow,
        at: u64,
    },
    UserPos {
        user: String,
        conv: String,
        pos: u64,
    },
    Follow {
        user: String,
        conv: String,
        follow: bool,
        at: u64,
    },
    FeedInsert {
        user: String,
        pos: i64,
        conv: String,
        at: u64,
    },
    FeedDelete {
        user: String,
        pos: i64,
        conv: String,
        at: u64,
    },
    Applied {
        through: u64,
    },
}

/// Which prepared statement a [`Write`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stmt {
    Message,
    ClientId,
    Latest,
    ConvPos,
    Name,
    MemberCount,
    Delivered,
    Read,
    Member,
    UserPos,
    Follow,
    FeedInsert,
    FeedDelete,
    Applied,
}

impl Stmt {
    pub const ALL: [Stmt; 14] = [
        Stmt::Message,
        Stmt::ClientId,
        Stmt::Latest,
        Stmt::ConvPos,
        Stmt::Name,
        Stmt::MemberCount,
        Stmt::Delivered,
        Stmt::Read,
        Stmt::Member,
        Stmt::UserPos,
        Stmt::Follow,
        Stmt::FeedInsert,
        Stmt::FeedDelete,
        Stmt::Applied,
    ];

    /// The CQL of the statement; its bind markers are in the order of [`Write::values`].
    pub fn cql(self) -> &'static str {
        match self {
            Stmt::Message => {
                "INSERT INTO messages (conv, bucket, seq, from_user, client_id, ts_ms, body, \
                 stream_seq, event, media) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) USING TIMESTAMP ?"
            }
            Stmt::ClientId => {
                "INSERT INTO client_ids (conv, from_user, client_id, seq) VALUES (?, ?, ?, ?) \
                 USING TIMESTAMP ?"
            }
            Stmt::Latest => {
                "UPDATE conversations USING TIMESTAMP ? SET latest_seq = ? WHERE conv = ?"
            }
            Stmt::ConvPos => "UPDATE conversations USING TIMESTAMP ? SET pos = ? WHERE conv = ?",
            Stmt::Name => "UPDATE conversations USING TIMESTAMP ? SET name = ? WHERE conv = ?",
            Stmt::MemberCount => {
                "UPDATE conversations USING TIMESTAMP ? SET member_count = ? WHERE conv = ?"
            }
            Stmt::Delivered => {
                "UPDATE marks USING TIMESTAMP ? SET delivered = ? WHERE conv = ? AND user_id = ?"
            }
            Stmt::Read => {
                "UPDATE marks USING TIMESTAMP ? SET read_seq = ? WHERE conv = ? AND user_id = ?"
            }
            Stmt::Member => {
                "INSERT INTO members (conv, user_id, joined, left_seq, admin, event_seq) \
                 VALUES (?, ?, ?, ?, ?, ?) USING TIMESTAMP ?"
            }
            Stmt::UserPos => {
                "UPDATE user_convs USING TIMESTAMP ? SET pos = ? WHERE user_id = ? AND conv = ?"
            }
            Stmt::Follow => {
                "UPDATE user_convs USING TIMESTAMP ? SET follow = ? WHERE user_id = ? AND conv = ?"
            }
            Stmt::FeedInsert => {
                "INSERT INTO user_feed (user_id, pos, conv) VALUES (?, ?, ?) USING TIMESTAMP ?"
            }
            Stmt::FeedDelete => {
                "DELETE FROM user_feed USING TIMESTAMP ? WHERE user_id = ? AND pos = ? AND conv = ?"
            }
            Stmt::Applied => {
                "UPDATE store_meta USING TIMESTAMP ? SET val = ? WHERE name = 'applied'"
            }
        }
    }
}

/// A group member's row (`members`): `event_seq` is the seq of the last event applied to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemberRow {
    pub joined: u64,
    pub left: Option<u64>,
    pub admin: bool,
    pub event_seq: u64,
}

/// What the store read before planning a batch.
#[derive(Debug, Clone, Default)]
pub struct Known {
    /// `(conv, seq)` of the batch's messages that are stored already (identical: a differing
    /// one is a conflict, refused before planning).
    pub stored: HashSet<(String, u64)>,
    /// The member rows of each group the batch changes.
    pub members: HashMap<String, HashMap<String, MemberRow>>,
    /// The index position each `(user, conv)` the batch moves had before it (absent: none).
    pub positions: HashMap<(String, String), u64>,
}

/// The writes of one batch, by partition.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub partitions: BTreeMap<Partition, Vec<Write>>,
    /// `(user, conv) -> position` after the batch, for the position cache.
    pub positions: Vec<((String, String), u64)>,
}

impl Plan {
    /// Statements of the plan, over all partitions.
    pub fn writes(&self) -> usize {
        self.partitions.values().map(Vec::len).sum()
    }
}

/// The `(user, conv)` entries whose previous position the plan of `changes` needs (every
/// explicit member of a change).
pub fn moved_entries(changes: &[Change]) -> HashSet<(String, String)> {
    let mut out = HashSet::new();
    for c in changes {
        for user in &c.members {
            out.insert((user.clone(), c.conv().to_owned()));
        }
    }
    out
}

/// The groups whose member rows the plan of `changes` needs.
pub fn changed_groups(changes: &[Change]) -> HashSet<String> {
    changes
        .iter()
        .filter(|c| matches!(c.event, Event::Message(_)) && !c.group.is_empty())
        .map(|c| c.conv().to_owned())
        .collect()
}

fn raise<K: Eq + std::hash::Hash>(map: &mut HashMap<K, u64>, key: K, v: u64) {
    let e = map.entry(key).or_insert(v);
    *e = (*e).max(v);
}

/// The plan of `changes` (validated, conflict-free) given what was read.
pub fn plan(changes: &[Change], known: &Known) -> Plan {
    let mut writes: Vec<Write> = Vec::new();
    let mut seen_messages: HashSet<(&str, u64)> = HashSet::new();
    let mut seen_client_ids: HashSet<(&str, &str, &str)> = HashSet::new();
    let mut latest: HashMap<&str, u64> = HashMap::new();
    let mut conv_pos: HashMap<&str, u64> = HashMap::new();
    let mut marks: HashMap<(&str, &str), (u64, u64)> = HashMap::new();
    let mut positions: HashMap<(&str, &str), u64> = HashMap::new();
    // (conv, seq, stream seq, change), first occurrence of each message, in batch order.
    let mut group: Vec<(&str, u64, u64, &GroupChange)> = Vec::new();

    for change in changes {
        match &change.event {
            Event::Message(m) => {
                let first = seen_messages.insert((m.conv.as_str(), m.seq));
                if first && !known.stored.contains(&(m.conv.clone(), m.seq)) {
                    writes.push(Write::Message(m.clone()));
                }
                // Always written (a crash may have stored the message but not its client id);
                // within a batch the first occurrence of a client id counts.
                if seen_client_ids.insert((m.conv.as_str(), m.from.as_str(), m.client_id.as_str()))
                {
                    writes.push(Write::ClientId {
                        conv: m.conv.clone(),
                        from: m.from.clone(),
                        client_id: m.client_id.clone(),
                        seq: m.seq,
                        stream_seq: m.stream_seq,
                    });
                }
                if first {
                    for g in &change.group {
                        group.push((m.conv.as_str(), m.seq, m.stream_seq, g));
                    }
                }
                raise(&mut latest, m.conv.as_str(), m.seq);
                // Sending implies having read everything before.
                let e = marks
                    .entry((m.conv.as_str(), m.from.as_str()))
                    .or_insert((0, 0));
                *e = (e.0.max(m.seq), e.1.max(m.seq));
            }
            Event::Receipt(r) => {
                let e = marks
                    .entry((r.conv.as_str(), r.user.as_str()))
                    .or_insert((0, 0));
                *e = (e.0.max(r.delivered).max(r.read), e.1.max(r.read));
            }
        }
        raise(&mut conv_pos, change.conv(), change.stream_seq());
        for user in &change.members {
            raise(
                &mut positions,
                (user.as_str(), change.conv()),
                change.stream_seq(),
            );
        }
    }

    for (conv, seq) in latest {
        writes.push(Write::Latest {
            conv: conv.to_owned(),
            seq,
        });
    }
    for (conv, pos) in conv_pos {
        writes.push(Write::ConvPos {
            conv: conv.to_owned(),
            pos,
        });
    }
    for ((conv, user), (delivered, read)) in marks {
        writes.push(Write::Delivered {
            conv: conv.to_owned(),
            user: user.to_owned(),
            seq: delivered,
        });
        writes.push(Write::Read {
            conv: conv.to_owned(),
            user: user.to_owned(),
            seq: read,
        });
    }
    let mut cache = Vec::new();
    for ((user, conv), pos) in positions {
        let key = (user.to_owned(), conv.to_owned());
        let old = known.positions.get(&key).copied();
        if old.is_some_and(|old| old >= pos) {
            // Nothing newer for this entry (a replay): its rows already say as much.
            cache.push((key, old.unwrap_or(pos)));
            continue;
        }
        writes.push(Write::UserPos {
            user: key.0.clone(),
            conv: key.1.clone(),
            pos,
        });
        writes.push(Write::FeedInsert {
            user: key.0.clone(),
            pos: big(pos),
            conv: key.1.clone(),
            at: pos,
        });
        if let Some(old) = old {
            writes.push(Write::FeedDelete {
                user: key.0.clone(),
                pos: big(old),
                conv: key.1.clone(),
                at: pos,
            });
        }
        cache.push((key, pos));
    }
    plan_groups(&group, known, &mut writes);

    let mut partitions: BTreeMap<Partition, Vec<Write>> = BTreeMap::new();
    for w in writes {
        partitions.entry(w.partition()).or_default().push(w);
    }
    Plan {
        partitions,
        positions: cache,
    }
}

/// Replays the batch's group changes over the member rows that were read. An event is applied
/// to a row only if the row has not seen it (its `event_seq` is lower); its index writes are
/// made whenever the row's state is the event's doing, so a replay after a crash between the
/// member rows and the index rows writes the index rows it lost.
fn plan_groups(group: &[(&str, u64, u64, &GroupChange)], known: &Known, writes: &mut Vec<Write>) {
    struct Conv {
        rows: HashMap<String, MemberRow>,
        /// Rows changed by this plan, with the stream seq of their last change.
        dirty: HashMap<String, u64>,
        /// Stream seq of the last join or leave, if any (the member count is rewritten).
        counted_at: Option<u64>,
        name: Option<(String, u64)>,
    }
    let mut convs: Vec<(&str, Conv)> = Vec::new();
    for &(conv, seq, stream_seq, change) in group {
        let i = match convs.iter().position(|(c, _)| *c == conv) {
            Some(i) => i,
            None => {
                convs.push((
                    conv,
                    Conv {
                        rows: known.members.get(conv).cloned().unwrap_or_default(),
                        dirty: HashMap::new(),
                        counted_at: None,
                        name: None,
                    },
                ));
                convs.len() - 1
            }
        };
        let state = &mut convs[i].1;
        // May `user`'s row take (or re-announce) the event at `seq`?
        let fresh = |row: Option<&MemberRow>| row.is_none_or(|r| r.event_seq < seq);
        match change {
            GroupChange::Join { users, admin } => {
                state.counted_at = Some(stream_seq);
                for user in users {
                    let row = state.rows.get(user).copied();
                    if fresh(row.as_ref()) && row.is_none_or(|r| r.left.is_some()) {
                        state.rows.insert(
                            user.clone(),
                            MemberRow {
                                joined: seq,
                                left: None,
                                admin: *admin,
                                event_seq: seq,
                            },
                        );
                        state.dirty.insert(user.clone(), stream_seq);
                    }
                    let row = state.rows.get(user).copied();
                    // The membership that started at this event (also when a replay finds the
                    // row already written and later events of the batch changed it since).
                    if row.is_some_and(|r| r.left.is_none() && r.joined == seq) {
                        writes.push(Write::Follow {
                            user: user.clone(),
                            conv: conv.to_owned(),
                            follow: true,
                            at: stream_seq,
                        });
                        writes.push(Write::FeedInsert {
                            user: user.clone(),
                            pos: FOLLOW_POS,
                            conv: conv.to_owned(),
                            at: stream_seq,
                        });
                    }
                }
            }
            GroupChange::Leave { users } => {
                state.counted_at = Some(stream_seq);
                for user in users {
                    let row = state.rows.get(user).copied();
                    if let Some(r) = row
                        && fresh(Some(&r))
                        && r.left.is_none()
                    {
                        state.rows.insert(
                            user.clone(),
                            MemberRow {
                                joined: r.joined,
                                left: Some(seq),
                                admin: false,
                                event_seq: seq,
                            },
                        );
                        state.dirty.insert(user.clone(), stream_seq);
                    }
                    let row = state.rows.get(user).copied();
                    if row.is_some_and(|r| r.left == Some(seq)) {
                        writes.push(Write::Follow {
                            user: user.clone(),
                            conv: conv.to_owned(),
                            follow: false,
                            at: stream_seq,
                        });
                        writes.push(Write::UserPos {
                            user: user.clone(),
                            conv: conv.to_owned(),
                            pos: stream_seq,
                        });
                        writes.push(Write::FeedDelete {
                            user: user.clone(),
                            pos: FOLLOW_POS,
                            conv: conv.to_owned(),
                            at: stream_seq,
                        });
                        writes.push(Write::FeedInsert {
                            user: user.clone(),
                            pos: big(stream_seq),
                            conv: conv.to_owned(),
                            at: stream_seq,
                        });
                    }
                }
            }
            GroupChange::Admin { users, admin } => {
                for user in users {
                    let row = state.rows.get(user).copied();
                    if let Some(r) = row
                        && fresh(Some(&r))
                        && r.left.is_none()
                    {
                        state.rows.insert(
                            user.clone(),
                            MemberRow {
                                admin: *admin,
                                event_seq: seq,
                                ..r
                            },
                        );
                        state.dirty.insert(user.clone(), stream_seq);
                    }
                }
            }
            GroupChange::Rename { name } => state.name = Some((name.clone(), stream_seq)),
        }
    }
    for (conv, state) in convs {
        let mut dirty: Vec<_> = state.dirty.into_iter().collect();
        dirty.sort();
        for (user, at) in dirty {
            let row = state.rows[&user];
            writes.push(Write::Member {
                conv: conv.to_owned(),
                user,
                row,
                at,
            });
        }
        if let Some(at) = state.counted_at {
            let count = state.rows.values().filter(|r| r.left.is_none()).count() as u64;
            writes.push(Write::MemberCount {
                conv: conv.to_owned(),
                count,
                at,
            });
        }
        if let Some((name, at)) = state.name {
            writes.push(Write::Name {
                conv: conv.to_owned(),
                name,
                at,
            });
        }
    }
}

fn text(s: &str) -> Option<CqlValue> {
    Some(CqlValue::Text(s.to_owned()))
}

fn int(v: i64) -> Option<CqlValue> {
    Some(CqlValue::BigInt(v))
}

impl Write {
    /// The partition the write lands in.
    pub fn partition(&self) -> Partition {
        match self {
            Write::Message(m) => Partition::Messages {
                conv: m.conv.clone(),
                bucket: bucket(m.seq),
            },
            Write::ClientId { conv, from, .. } => Partition::ClientIds {
                conv: conv.clone(),
                from: from.clone(),
            },
            Write::Latest { conv, .. }
            | Write::ConvPos { conv, .. }
            | Write::Name { conv, .. }
            | Write::MemberCount { conv, .. } => Partition::Conversation { conv: conv.clone() },
            Write::Delivered { conv, .. } | Write::Read { conv, .. } => {
                Partition::Marks { conv: conv.clone() }
            }
            Write::Member { conv, .. } => Partition::Members { conv: conv.clone() },
            Write::UserPos { user, .. }
            | Write::Follow { user, .. }
            | Write::FeedInsert { user, .. }
            | Write::FeedDelete { user, .. } => Partition::User { user: user.clone() },
            Write::Applied { .. } => Partition::Meta,
        }
    }

    /// The statement the write runs.
    pub fn stmt(&self) -> Stmt {
        match self {
            Write::Message(_) => Stmt::Message,
            Write::ClientId { .. } => Stmt::ClientId,
            Write::Latest { .. } => Stmt::Latest,
            Write::ConvPos { .. } => Stmt::ConvPos,
            Write::Name { .. } => Stmt::Name,
            Write::MemberCount { .. } => Stmt::MemberCount,
            Write::Delivered { .. } => Stmt::Delivered,
            Write::Read { .. } => Stmt::Read,
            Write::Member { .. } => Stmt::Member,
            Write::UserPos { .. } => Stmt::UserPos,
            Write::Follow { .. } => Stmt::Follow,
            Write::FeedInsert { .. } => Stmt::FeedInsert,
            Write::FeedDelete { .. } => Stmt::FeedDelete,
            Write::Applied { .. } => Stmt::Applied,
        }
    }

    /// The bind values, in the order of the statement's markers (write timestamp included).
    pub fn values(&self) -> Vec<Option<CqlValue>> {
        match self {
            Write::Message(m) => {
                let (from, client_id, ts_ms, body, stream_seq, event, media) =
                    codec::message_columns(m);
                vec![
                    text(&m.conv),
                    int(bucket(m.seq)),
                    int(big(m.seq)),
                    Some(CqlValue::Text(from)),
                    Some(CqlValue::Text(client_id)),
                    int(ts_ms),
                    Some(CqlValue::Text(body)),
                    int(stream_seq),
                    event.map(CqlValue::Text),
                    media.map(CqlValue::Text),
                    int(ts_max(m.stream_seq)),
                ]
            }
            Write::ClientId {
                conv,
                from,
                client_id,
                seq,
                stream_seq,
            } => vec![
                text(conv),
                text(from),
                text(client_id),
                int(big(*seq)),
                int(ts_min(*stream_seq)),
            ],
            Write::Latest { conv, seq } => vec![int(ts_max(*seq)), int(big(*seq)), text(conv)],
            Write::ConvPos { conv, pos } => vec![int(ts_max(*pos)), int(big(*pos)), text(conv)],
            Write::Name { conv, name, at } => vec![int(ts_max(*at)), text(name), text(conv)],
            Write::MemberCount { conv, count, at } => {
                vec![int(ts_max(*at)), int(big(*count)), text(conv)]
            }
            Write::Delivered { conv, user, seq } | Write::Read { conv, user, seq } => {
                vec![int(ts_max(*seq)), int(big(*seq)), text(conv), text(user)]
            }
            Write::Member {
                conv,
                user,
                row,
                at,
            } => vec![
                text(conv),
                text(user),
                int(big(row.joined)),
                row.left.map(|l| CqlValue::BigInt(big(l))),
                Some(CqlValue::Boolean(row.admin)),
                int(big(row.event_seq)),
                int(ts_max(*at)),
            ],
            Write::UserPos { user, conv, pos } => {
                vec![int(ts_max(*pos)), int(big(*pos)), text(user), text(conv)]
            }
            Write::Follow {
                user,
                conv,
                follow,
                at,
            } => vec![
                int(ts_max(*at)),
                Some(CqlValue::Boolean(*follow)),
                text(user),
                text(conv),
            ],
            Write::FeedInsert {
                user,
                pos,
                conv,
                at,
            } => vec![text(user), int(*pos), text(conv), int(ts_max(*at))],
            Write::FeedDelete {
                user,
                pos,
                conv,
                at,
            } => vec![int(ts_max(*at)), text(user), int(*pos), text(conv)],
            Write::Applied { through } => vec![int(ts_max(*through)), int(big(*through))],
        }
    }

    /// Rough size on the wire, for splitting a partition's writes into batches.
    pub fn weight(&self) -> usize {
        match self {
            Write::Message(m) => codec::message_weight(m),
            Write::ClientId {
                conv,
                from,
                client_id,
                ..
            } => 48 + conv.len() + from.len() + client_id.len(),
            Write::Name { conv, name, .. } => 32 + conv.len() + name.len(),
            Write::Delivered { conv, user, .. }
            | Write::Read { conv, user, .. }
            | Write::Member { conv, user, .. }
            | Write::UserPos { user, conv, .. }
            | Write::Follow { user, conv, .. }
            | Write::FeedInsert { user, conv, .. }
            | Write::FeedDelete { user, conv, .. } => 48 + conv.len() + user.len(),
            Write::Latest { conv, .. }
            | Write::ConvPos { conv, .. }
            | Write::MemberCount { conv, .. } => 32 + conv.len(),
            Write::Applied { .. } => 32,
        }
    }
}

/// Splits one partition's writes into batches of at most `max_bytes` (estimated); a write
/// larger than that goes alone.
pub fn chunks(writes: &[Write], max_bytes: usize) -> Vec<&[Write]> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut size = 0;
    for (i, w) in writes.iter().enumerate() {
        let weight = w.weight();
        if i > start && size + weight > max_bytes {
            out.push(&writes[start..i]);
            start = i;
            size = 0;
        }
        size += weight;
    }
    if start < writes.len() {
        out.push(&writes[start..]);
    }
    out
}
