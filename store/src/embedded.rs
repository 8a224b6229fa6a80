//! The embedded backend: one redb database file per store directory.
//!
//! Layout (all keys are redb tuples, which compare element by element, so a
//! conversation id that is a prefix of another can never fall inside the
//! other's key range):
//!
//! | table        | key                        | value                         |
//! |--------------|----------------------------|-------------------------------|
//! | `messages`   | `(conv, seq)`              | JSON [`Record`] (other fields) |
//! | `client_ids` | `(conv, from, client_id)`  | seq                           |
//! | `latest_seq` | `conv`                     | highest stored seq            |
//! | `marks`      | `(conv, user)`             | `(delivered, read)`           |
//! | `user_convs` | `(user, conv)`             | index position (stream seq), or [`FOLLOW`] |
//! | `members`    | `(conv, user)`             | `(joined, left or 0, admin)`  |
//! | `convs`      | `conv`                     | `(position, member count, name)` |
//! | `meta`       | `"applied_stream_seq"`     | highest applied stream seq    |
//!
//! `marks` keyed by conversation first lists a conversation's members with one
//! range scan; `user_convs` keyed by user first lists a user's conversations
//! the same way, in conversation id order (the paging order of
//! [`MessageStore::user_conversations`]). A current group member's
//! `user_convs` entry is [`FOLLOW`]: its position is the conversation's, in
//! `convs`, so a group message writes one row however many members it has.

use std::collections::HashMap;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{
    Database, Durability, ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition,
    WriteTransaction,
};

use crate::{
    Change, ClientKey, ConvMeta, ConvSummary, Event, GroupChange, MAX_PAGE_LIMIT, Marks, Member,
    MessageStore, Page, PageQuery, StoreError, StoredMessage, StoredReceipt, UserConversations,
};

const MESSAGES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("messages");
const CLIENT_IDS: TableDefinition<(&str, &str, &str), u64> = TableDefinition::new("client_ids");
const LATEST_SEQ: TableDefinition<&str, u64> = TableDefinition::new("latest_seq");
const MARKS: TableDefinition<(&str, &str), (u64, u64)> = TableDefinition::new("marks");
const USER_CONVS: TableDefinition<(&str, &str), u64> = TableDefinition::new("user_convs");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const MEMBERS: TableDefinition<(&str, &str), (u64, u64, bool)> = TableDefinition::new("members");
const CONVS: TableDefinition<&str, (u64, u64, &str)> = TableDefinition::new("convs");

/// The `user_convs` value of a current group member: its position is the
/// conversation's (`convs`).
const FOLLOW: u64 = u64::MAX;

const APPLIED_STREAM_SEQ: &str = "applied_stream_seq";

/// The stored value of a message; `conv` and `seq` live in the key.
#[derive(serde::Serialize)]
struct RecordRef<'a> {
    from: &'a str,
    client_id: &'a str,
    ts_ms: u64,
    body: &'a str,
    stream_seq: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    event: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    media: Option<&'a str>,
}

#[derive(serde::Deserialize)]
struct Record {
    from: String,
    client_id: String,
    ts_ms: u64,
    body: String,
    stream_seq: u64,
    #[serde(default)]
    event: Option<String>,
    #[serde(default)]
    media: Option<String>,
}

impl Record {
    fn same_as(&self, m: &StoredMessage) -> bool {
        self.from == m.from
            && self.client_id == m.client_id
            && self.ts_ms == m.ts_ms
            && self.body == m.body
            && self.stream_seq == m.stream_seq
            && self.event == m.event
            && self.media == m.media
    }

    fn into_message(self, conv: &str, seq: u64) -> StoredMessage {
        StoredMessage {
            conv: conv.to_owned(),
            seq,
            from: self.from,
            client_id: self.client_id,
            ts_ms: self.ts_ms,
            body: self.body,
            stream_seq: self.stream_seq,
            event: self.event,
            media: self.media,
        }
    }
}

fn encode(m: &StoredMessage) -> Vec<u8> {
    let record = RecordRef {
        from: &m.from,
        client_id: &m.client_id,
        ts_ms: m.ts_ms,
        body: &m.body,
        stream_seq: m.stream_seq,
        event: m.event.as_deref(),
        media: m.media.as_deref(),
    };
    // Serializing a struct of strings and integers into a Vec cannot fail.
    serde_json::to_vec(&record).expect("record serialization is infallible")
}

fn decode(conv: &str, seq: u64, bytes: &[u8]) -> Result<Record, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        conv: conv.to_owned(),
        seq,
        reason: e.to_string(),
    })
}

/// Maps a redb error to [`StoreError::Backend`] with the operation as context.
fn backend<E: Into<redb::Error>>(op: &'static str) -> impl FnOnce(E) -> StoreError {
    move |e| StoreError::Backend {
        op,
        source: e.into(),
    }
}

/// The embedded message store: a redb database at `<dir>/messages.redb`.
///
/// Cheap to clone (the database handle is shared). Commits use redb's
/// immediate durability: once [`MessageStore::apply`] returns `Ok` the batch
/// survives a process crash or power loss. Blocking redb calls run on tokio's
/// blocking pool, so the async methods must be called inside a tokio runtime.
///
/// redb locks the file: a second `open` of the same directory while a store
/// is open (in this or another process) fails with [`StoreError::Open`].
#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

struct Inner {
    db: Database,
    path: PathBuf,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

impl EmbeddedStore {
    /// Name of the database file inside the store directory.
    pub const DB_FILE: &'static str = "messages.redb";

    /// Opens the store in directory `dir`, creating the directory and the
    /// database file if needed.
    ///
    /// Blocking (file I/O, and crash recovery if the previous process did not
    /// shut down cleanly): call it at startup or from `spawn_blocking`.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, StoreError> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Open {
            path: dir.to_path_buf(),
            source: e.into(),
        })?;
        let path = dir.join(Self::DB_FILE);
        let open_err = |e: redb::Error| StoreError::Open {
            path: path.clone(),
            source: e,
        };
        let db = Database::create(&path).map_err(|e| open_err(e.into()))?;
        // Create every table up front so read transactions can always open them.
        let mut txn = db.begin_write().map_err(|e| open_err(e.into()))?;
        txn.set_durability(Durability::Immediate)
            .map_err(|e| open_err(e.into()))?;
        txn.open_table(MESSAGES).map_err(|e| open_err(e.into()))?;
        txn.open_table(CLIENT_IDS).map_err(|e| open_err(e.into()))?;
        txn.open_table(LATEST_SEQ).map_err(|e| open_err(e.into()))?;
        txn.open_table(MARKS).map_err(|e| open_err(e.into()))?;
        txn.open_table(USER_CONVS).map_err(|e| open_err(e.into()))?;
        txn.open_table(MEMBERS).map_err(|e| open_err(e.into()))?;
        txn.open_table(CONVS).map_err(|e| open_err(e.into()))?;
        txn.open_table(META).map_err(|e| open_err(e.into()))?;
        txn.commit().map_err(|e| open_err(e.into()))?;
        Ok(EmbeddedStore {
            inner: Arc::new(Inner { db, path }),
        })
    }

    /// Path of the database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Every stored message whose stream seq is above `after`, in stream order: what a
    /// `CHAT_MSGS` that lost its tail in a power loss no longer holds, for the sequencer's
    /// startup repair to publish again. Scans every message (the table is keyed by
    /// conversation): for that rare repair, never for the message path.
    pub async fn messages_after_stream_seq(
        &self,
        after: u64,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        self.blocking("read messages after a stream seq", move |db| {
            let txn = begin_read(db)?;
            let table = txn
                .open_table(MESSAGES)
                .map_err(backend("open messages table"))?;
            let mut out = Vec::new();
            for row in table.iter().map_err(backend("scan messages"))? {
                let (key, value) = row.map_err(backend("scan messages"))?;
                let (conv, seq) = key.value();
                let record = decode(conv, seq, value.value())?;
                if record.stream_seq > after {
                    out.push(record.into_message(conv, seq));
                }
            }
            out.sort_by_key(|m| m.stream_seq);
            Ok(out)
        })
        .await
    }

    /// Lowers the applied watermark to `to` (it never rises here): after a power loss took
    /// `CHAT_MSGS` back to `to` and the store holds no message above it, the writer must
    /// follow the stream again from there. Only the sequencer's startup repair calls it.
    pub async fn rewind_applied_stream_seq(&self, to: u64) -> Result<(), StoreError> {
        self.blocking("rewind applied stream seq", move |db| {
            let mut txn = db
                .begin_write()
                .map_err(backend("begin write transaction"))?;
            txn.set_durability(Durability::Immediate)
                .map_err(backend("set durability"))?;
            {
                let mut meta = txn.open_table(META).map_err(backend("open meta table"))?;
                let applied = meta
                    .get(APPLIED_STREAM_SEQ)
                    .map_err(backend("read applied stream seq"))?
                    .map_or(0, |g| g.value());
                if to < applied {
                    meta.insert(APPLIED_STREAM_SEQ, to)
                        .map_err(backend("rewind applied stream seq"))?;
                }
            }
            txn.commit().map_err(backend("commit"))?;
            Ok(())
        })
        .await
    }

    /// Runs a blocking closure against the database on tokio's blocking pool.
    async fn blocking<T, F>(&self, op: &'static str, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || f(&inner.db))
            .await
            .map_err(|source| StoreError::Worker { op, source })?
    }
}

fn begin_read(db: &Database) -> Result<ReadTransaction, StoreError> {
    db.begin_read().map_err(backend("begin read transaction"))
}

fn apply_blocking(
    db: &Database,
    changes: &[Change],
    through: Option<u64>,
) -> Result<(), StoreError> {
    if changes.is_empty() && through.is_none() {
        return Ok(());
    }
    crate::validate_changes(changes)?;
    let mut txn = db
        .begin_write()
        .map_err(backend("begin write transaction"))?;
    txn.set_durability(Durability::Immediate)
        .map_err(backend("set durability"))?;
    match write_batch(&txn, changes, through) {
        Ok(()) => txn.commit().map_err(backend("commit apply")),
        Err(e) => {
            // Nothing of the batch may be written; an abort failure is less
            // interesting to the caller than the reason we aborted.
            let _ = txn.abort();
            Err(e)
        }
    }
}

/// Raises `map[key]` to `value` (inserting it if absent).
fn raise<K: Eq + std::hash::Hash>(map: &mut HashMap<K, u64>, key: K, value: u64) {
    let v = map.entry(key).or_insert(value);
    *v = (*v).max(value);
}

/// The maxima a batch raises, merged in memory first so that a batch of many
/// changes to one conversation touches each row once.
#[derive(Default)]
struct Raises<'a> {
    latest: HashMap<&'a str, u64>,
    marks: HashMap<(&'a str, &'a str), (u64, u64)>,
    positions: HashMap<(&'a str, &'a str), u64>,
    conv_positions: HashMap<&'a str, u64>,
    /// Group changes of newly stored messages, in batch order:
    /// `(conv, seq, stream seq, change)`.
    group: Vec<(&'a str, u64, u64, &'a GroupChange)>,
}

impl<'a> Raises<'a> {
    fn marks(&mut self, conv: &'a str, user: &'a str, delivered: u64, read: u64) {
        let entry = self.marks.entry((conv, user)).or_insert((0, 0));
        entry.0 = entry.0.max(delivered).max(read);
        entry.1 = entry.1.max(read);
    }

    fn positions(&mut self, change: &'a Change) {
        let conv = change.conv();
        raise(&mut self.conv_positions, conv, change.stream_seq());
        for user in &change.members {
            raise(
                &mut self.positions,
                (user.as_str(), conv),
                change.stream_seq(),
            );
        }
    }
}

fn write_batch(
    txn: &WriteTransaction,
    changes: &[Change],
    through: Option<u64>,
) -> Result<(), StoreError> {
    let mut raises = Raises::default();
    {
        let mut messages = txn
            .open_table(MESSAGES)
            .map_err(backend("open messages table"))?;
        let mut client_ids = txn
            .open_table(CLIENT_IDS)
            .map_err(backend("open client id table"))?;
        for change in changes {
            match &change.event {
                Event::Message(m) => {
                    if put_message(&mut messages, &mut client_ids, m)? {
                        for g in &change.group {
                            raises.group.push((&m.conv, m.seq, m.stream_seq, g));
                        }
                    }
                    raise(&mut raises.latest, m.conv.as_str(), m.seq);
                    // Sending implies having read everything before.
                    raises.marks(&m.conv, &m.from, m.seq, m.seq);
                }
                Event::Receipt(StoredReceipt {
                    conv,
                    user,
                    delivered,
                    read,
                    ..
                }) => raises.marks(conv, user, *delivered, *read),
            }
            raises.positions(change);
        }
    }

    let mut latest = txn
        .open_table(LATEST_SEQ)
        .map_err(backend("open latest seq table"))?;
    for (conv, seq) in raises.latest {
        let current = latest
            .get(conv)
            .map_err(backend("read latest seq"))?
            .map(|g| g.value());
        if current.is_none_or(|c| seq > c) {
            latest
                .insert(conv, seq)
                .map_err(backend("update latest seq"))?;
        }
    }

    let mut marks = txn.open_table(MARKS).map_err(backend("open marks table"))?;
    for (key, (delivered, read)) in raises.marks {
        let current = marks
            .get(key)
            .map_err(backend("read marks"))?
            .map(|g| g.value());
        let new = match current {
            None => (delivered, read),
            Some((d, r)) => (d.max(delivered), r.max(read)),
        };
        if current != Some(new) {
            marks.insert(key, new).map_err(backend("update marks"))?;
        }
    }

    let mut user_convs = txn
        .open_table(USER_CONVS)
        .map_err(backend("open user conversations table"))?;
    for (key, pos) in raises.positions {
        let current = user_convs
            .get(key)
            .map_err(backend("read user conversation"))?
            .map(|g| g.value());
        if current.is_none_or(|c| pos > c) {
            user_convs
                .insert(key, pos)
                .map_err(backend("update user conversation"))?;
        }
    }

    write_groups(txn, &mut user_convs, &raises.conv_positions, &raises.group)?;

    if let Some(through) = through {
        let mut meta = txn.open_table(META).map_err(backend("open meta table"))?;
        let applied = meta
            .get(APPLIED_STREAM_SEQ)
            .map_err(backend("read applied stream seq"))?
            .map_or(0, |g| g.value());
        if through > applied {
            meta.insert(APPLIED_STREAM_SEQ, through)
                .map_err(backend("update applied stream seq"))?;
        }
    }
    Ok(())
}

/// Raises the conversations' positions and applies the group changes of
/// newly stored messages, in batch order.
fn write_groups(
    txn: &WriteTransaction,
    user_convs: &mut redb::Table<(&str, &str), u64>,
    conv_positions: &HashMap<&str, u64>,
    group: &[(&str, u64, u64, &GroupChange)],
) -> Result<(), StoreError> {
    let mut convs = txn.open_table(CONVS).map_err(backend("open convs table"))?;
    let mut members = txn
        .open_table(MEMBERS)
        .map_err(backend("open members table"))?;
    let mut metas: HashMap<&str, ConvMeta> = HashMap::new();
    let load = |conv| -> Result<ConvMeta, StoreError> {
        Ok(convs
            .get(conv)
            .map_err(backend("read conversation"))?
            .map(|g| {
                let (pos, member_count, name) = g.value();
                ConvMeta {
                    name: name.to_owned(),
                    member_count,
                    pos,
                }
            })
            .unwrap_or_default())
    };
    for (&conv, &pos) in conv_positions {
        let mut meta = load(conv)?;
        meta.pos = meta.pos.max(pos);
        metas.insert(conv, meta);
    }
    for &(conv, seq, stream_seq, change) in group {
        let meta = metas.entry(conv).or_default();
        match change {
            GroupChange::Join { users, admin } => {
                for user in users {
                    let current = member_row(&members, conv, user)?;
                    if current.is_some_and(|(_, left, _)| left == 0) {
                        continue;
                    }
                    members
                        .insert((conv, user.as_str()), (seq, 0, *admin))
                        .map_err(backend("update member"))?;
                    user_convs
                        .insert((user.as_str(), conv), FOLLOW)
                        .map_err(backend("update user conversation"))?;
                    meta.member_count += 1;
                }
            }
            GroupChange::Leave { users } => {
                for user in users {
                    let current = member_row(&members, conv, user)?;
                    let Some((joined, 0, _)) = current else {
                        continue;
                    };
                    members
                        .insert((conv, user.as_str()), (joined, seq, false))
                        .map_err(backend("update member"))?;
                    user_convs
                        .insert((user.as_str(), conv), stream_seq)
                        .map_err(backend("update user conversation"))?;
                    meta.member_count = meta.member_count.saturating_sub(1);
                }
            }
            GroupChange::Admin { users, admin } => {
                for user in users {
                    let current = member_row(&members, conv, user)?;
                    if let Some((joined, 0, _)) = current {
                        members
                            .insert((conv, user.as_str()), (joined, 0, *admin))
                            .map_err(backend("update member"))?;
                    }
                }
            }
            GroupChange::Rename { name } => meta.name.clone_from(name),
        }
    }
    for (conv, meta) in metas {
        convs
            .insert(conv, (meta.pos, meta.member_count, meta.name.as_str()))
            .map_err(backend("update conversation"))?;
    }
    Ok(())
}

/// The `members` row of `(conv, user)`: `(joined, left or 0, admin)`.
fn member_row(
    members: &redb::Table<(&str, &str), (u64, u64, bool)>,
    conv: &str,
    user: &str,
) -> Result<Option<(u64, u64, bool)>, StoreError> {
    Ok(members
        .get((conv, user))
        .map_err(backend("read member"))?
        .map(|g| g.value()))
}

/// Stores one message and its client id; a different message already at its
/// `(conv, seq)` (stored earlier or earlier in this batch) is a conflict.
/// Returns whether the message is new (not stored before).
fn put_message(
    messages: &mut redb::Table<(&str, u64), &[u8]>,
    client_ids: &mut redb::Table<(&str, &str, &str), u64>,
    m: &StoredMessage,
) -> Result<bool, StoreError> {
    let key = (m.conv.as_str(), m.seq);
    let existing = messages
        .get(key)
        .map_err(backend("read message"))?
        .map(|guard| decode(&m.conv, m.seq, guard.value()))
        .transpose()?;
    let new = match existing {
        Some(stored) if stored.same_as(m) => false,
        Some(_) => {
            return Err(StoreError::Conflict {
                conv: m.conv.clone(),
                seq: m.seq,
            });
        }
        None => {
            messages
                .insert(key, encode(m).as_slice())
                .map_err(backend("insert message"))?;
            true
        }
    };

    let cid_key = (m.conv.as_str(), m.from.as_str(), m.client_id.as_str());
    let recorded = client_ids
        .get(cid_key)
        .map_err(backend("read client id"))?
        .is_some();
    if !recorded {
        client_ids
            .insert(cid_key, m.seq)
            .map_err(backend("insert client id"))?;
    }
    Ok(new)
}

fn client_ids_blocking(db: &Database, keys: &[ClientKey]) -> Result<Vec<Option<u64>>, StoreError> {
    let txn = begin_read(db)?;
    let table = txn
        .open_table(CLIENT_IDS)
        .map_err(backend("open client id table"))?;
    keys.iter()
        .map(|k| {
            Ok(table
                .get((k.conv.as_str(), k.from.as_str(), k.client_id.as_str()))
                .map_err(backend("read client id"))?
                .map(|g| g.value()))
        })
        .collect()
}

fn watermarks_blocking(db: &Database, conv: &str) -> Result<Vec<Marks>, StoreError> {
    let txn = begin_read(db)?;
    let table = txn.open_table(MARKS).map_err(backend("open marks table"))?;
    // Tuple keys sort by conv first, so `conv`'s members are one contiguous
    // run starting at `(conv, "")`; a longer conv id sorts after all of them.
    let range = table
        .range::<(&str, &str)>((conv, "")..)
        .map_err(backend("scan marks"))?;
    let mut members = Vec::new();
    for row in range {
        let (key, value) = row.map_err(backend("scan marks"))?;
        let (row_conv, user) = key.value();
        if row_conv != conv {
            break;
        }
        let (delivered, read) = value.value();
        members.push(Marks {
            user: user.to_owned(),
            delivered,
            read,
        });
    }
    Ok(members)
}

fn user_conversations_blocking(
    db: &Database,
    user: &str,
    since: u64,
    from_conv: Option<&str>,
    limit: u32,
) -> Result<UserConversations, StoreError> {
    let limit = limit.clamp(1, MAX_PAGE_LIMIT) as usize;
    // One read transaction is one snapshot: `applied` and the index agree.
    let txn = begin_read(db)?;
    let applied = txn
        .open_table(META)
        .map_err(backend("open meta table"))?
        .get(APPLIED_STREAM_SEQ)
        .map_err(backend("read applied stream seq"))?
        .map_or(0, |g| g.value());
    let index = txn
        .open_table(USER_CONVS)
        .map_err(backend("open user conversations table"))?;
    let latest = txn
        .open_table(LATEST_SEQ)
        .map_err(backend("open latest seq table"))?;
    let metas = txn.open_table(CONVS).map_err(backend("open convs table"))?;
    let members = txn
        .open_table(MEMBERS)
        .map_err(backend("open members table"))?;
    let range = index
        .range::<(&str, &str)>((user, from_conv.unwrap_or(""))..)
        .map_err(backend("scan user conversations"))?;

    let mut convs = Vec::with_capacity(limit);
    let mut more = false;
    for row in range {
        let (key, value) = row.map_err(backend("scan user conversations"))?;
        let (row_user, conv) = key.value();
        if row_user != user {
            break;
        }
        let entry = value.value();
        let meta = metas
            .get(conv)
            .map_err(backend("read conversation"))?
            .map(|g| {
                let (pos, count, name) = g.value();
                (pos, count, name.to_owned())
            });
        let pos = match (entry, &meta) {
            (FOLLOW, Some((pos, _, _))) => *pos,
            (FOLLOW, None) => 0,
            (frozen, _) => frozen,
        };
        if pos <= since {
            continue;
        }
        // One match beyond the page is enough to know there are more.
        if convs.len() == limit {
            more = true;
            break;
        }
        let member = members
            .get((conv, user))
            .map_err(backend("read member"))?
            .map(|g| g.value());
        let (joined, left, admin) = match member {
            Some((joined, left, admin)) => (joined, (left > 0).then_some(left), admin),
            None => (1, None, false),
        };
        let latest = latest
            .get(conv)
            .map_err(backend("read latest seq"))?
            .map_or(0, |g| g.value());
        let (_, member_count, name) = meta.unwrap_or_default();
        convs.push(ConvSummary {
            conv: conv.to_owned(),
            latest: left.map_or(latest, |l| latest.min(l)),
            pos,
            name,
            member_count,
            joined,
            left,
            admin,
        });
    }
    Ok(UserConversations {
        applied,
        convs,
        more,
    })
}

fn page_blocking(db: &Database, conv: &str, q: PageQuery) -> Result<Page, StoreError> {
    let limit = q.effective_limit() as usize;
    let (lower, upper) = match q {
        PageQuery::Before {
            before: Some(0), ..
        } => return Ok(Page::default()),
        PageQuery::Before { before, .. } => (
            Bound::Included((conv, 0)),
            before.map_or(Bound::Included((conv, u64::MAX)), |b| {
                Bound::Excluded((conv, b))
            }),
        ),
        PageQuery::After { after, .. } => (
            Bound::Excluded((conv, after)),
            Bound::Included((conv, u64::MAX)),
        ),
    };
    let txn = begin_read(db)?;
    let table = txn
        .open_table(MESSAGES)
        .map_err(backend("open messages table"))?;
    let range = table
        .range::<(&str, u64)>((lower, upper))
        .map_err(backend("scan messages"))?;
    // Read one extra message to know exactly whether there are more.
    let rows: Box<dyn Iterator<Item = _>> = match q {
        PageQuery::Before { .. } => Box::new(range.rev()),
        PageQuery::After { .. } => Box::new(range),
    };
    let mut messages = Vec::with_capacity(limit + 1);
    for row in rows.take(limit + 1) {
        let (key, value) = row.map_err(backend("scan messages"))?;
        let (row_conv, seq) = key.value();
        messages.push(decode(row_conv, seq, value.value())?.into_message(row_conv, seq));
    }
    let more = messages.len() > limit;
    messages.truncate(limit);
    if matches!(q, PageQuery::Before { .. }) {
        messages.reverse();
    }
    Ok(Page { messages, more })
}

fn to_member(user: &str, (joined, left, admin): (u64, u64, bool)) -> Member {
    Member {
        user: user.to_owned(),
        joined,
        left: (left > 0).then_some(left),
        admin,
    }
}

impl MessageStore for EmbeddedStore {
    async fn apply(&self, changes: Vec<Change>, through: Option<u64>) -> Result<(), StoreError> {
        if changes.is_empty() && through.is_none() {
            return Ok(());
        }
        self.blocking("apply", move |db| apply_blocking(db, &changes, through))
            .await
    }

    async fn watermarks(&self, conv: &str) -> Result<Vec<Marks>, StoreError> {
        let conv = conv.to_owned();
        self.blocking("read watermarks", move |db| watermarks_blocking(db, &conv))
            .await
    }

    async fn user_conversations(
        &self,
        user: &str,
        since: u64,
        from_conv: Option<&str>,
        limit: u32,
    ) -> Result<UserConversations, StoreError> {
        let user = user.to_owned();
        let from_conv = from_conv.map(str::to_owned);
        self.blocking("read user conversations", move |db| {
            user_conversations_blocking(db, &user, since, from_conv.as_deref(), limit)
        })
        .await
    }

    async fn member(&self, conv: &str, user: &str) -> Result<Option<Member>, StoreError> {
        let (conv, user) = (conv.to_owned(), user.to_owned());
        self.blocking("read member", move |db| {
            let txn = begin_read(db)?;
            let table = txn
                .open_table(MEMBERS)
                .map_err(backend("open members table"))?;
            let row = table
                .get((conv.as_str(), user.as_str()))
                .map_err(backend("read member"))?
                .map(|g| g.value());
            Ok(row.map(|row| to_member(&user, row)))
        })
        .await
    }

    async fn members(&self, conv: &str) -> Result<Vec<Member>, StoreError> {
        let conv = conv.to_owned();
        self.blocking("read members", move |db| {
            let txn = begin_read(db)?;
            let table = txn
                .open_table(MEMBERS)
                .map_err(backend("open members table"))?;
            let range = table
                .range::<(&str, &str)>((conv.as_str(), "")..)
                .map_err(backend("scan members"))?;
            let mut members = Vec::new();
            for row in range {
                let (key, value) = row.map_err(backend("scan members"))?;
                let (row_conv, user) = key.value();
                if row_conv != conv {
                    break;
                }
                members.push(to_member(user, value.value()));
            }
            Ok(members)
        })
        .await
    }

    async fn conversation(&self, conv: &str) -> Result<Option<ConvMeta>, StoreError> {
        let conv = conv.to_owned();
        self.blocking("read conversation", move |db| {
            let txn = begin_read(db)?;
            let table = txn.open_table(CONVS).map_err(backend("open convs table"))?;
            let row = table
                .get(conv.as_str())
                .map_err(backend("read conversation"))?
                .map(|g| {
                    let (pos, member_count, name) = g.value();
                    ConvMeta {
                        name: name.to_owned(),
                        member_count,
                        pos,
                    }
                });
            Ok(row)
        })
        .await
    }

    async fn page(&self, conv: &str, q: PageQuery) -> Result<Page, StoreError> {
        let conv = conv.to_owned();
        self.blocking("read page", move |db| page_blocking(db, &conv, q))
            .await
    }

    async fn latest_seq(&self, conv: &str) -> Result<Option<u64>, StoreError> {
        let conv = conv.to_owned();
        self.blocking("read latest seq", move |db| {
            let txn = begin_read(db)?;
            let table = txn
                .open_table(LATEST_SEQ)
                .map_err(backend("open latest seq table"))?;
            let seq = table
                .get(conv.as_str())
                .map_err(backend("read latest seq"))?
                .map(|g| g.value());
            Ok(seq)
        })
        .await
    }

    async fn seqs_for_client_ids(
        &self,
        keys: Vec<ClientKey>,
    ) -> Result<Vec<Option<u64>>, StoreError> {
        /// Up to this many keys are read on the calling thread: a few B-tree lookups in pages
        /// that are almost always cached cost less than a hand-off to the blocking pool.
        const INLINE: usize = 64;
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        if keys.len() <= INLINE {
            return client_ids_blocking(&self.inner.db, &keys);
        }
        self.blocking("read client ids", move |db| client_ids_blocking(db, &keys))
            .await
    }

    async fn applied_stream_seq(&self) -> Result<u64, StoreError> {
        self.blocking("read applied stream seq", |db| {
            let txn = begin_read(db)?;
            let table = txn.open_table(META).map_err(backend("open meta table"))?;
            let seq = table
                .get(APPLIED_STREAM_SEQ)
                .map_err(backend("read applied stream seq"))?
                .map_or(0, |g| g.value());
            Ok(seq)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::StoreErrorKind;

    fn write_raw(store: &EmbeddedStore, conv: &str, seq: u64, bytes: &[u8]) {
        let txn = store.inner.db.begin_write().unwrap();
        txn.open_table(MESSAGES)
            .unwrap()
            .insert((conv, seq), bytes)
            .unwrap();
        txn.commit().unwrap();
    }

    fn message(conv: &str, seq: u64) -> StoredMessage {
        StoredMessage {
            conv: conv.into(),
            seq,
            from: "alice".into(),
            client_id: format!("c{seq}"),
            ts_ms: 1,
            body: "hi".into(),
            stream_seq: seq,
            event: None,
            media: None,
        }
    }

    #[tokio::test]
    async fn undecodable_record_is_corrupt_with_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        store
            .apply(
                vec![
                    Change::message(message("c1", 1), vec![]),
                    Change::message(message("c1", 3), vec![]),
                ],
                None,
            )
            .await
            .unwrap();
        write_raw(&store, "c1", 2, b"\xffnot json");

        for q in [
            PageQuery::Before {
                before: None,
                limit: 10,
            },
            PageQuery::After {
                after: 0,
                limit: 10,
            },
        ] {
            let err = store.page("c1", q).await.unwrap_err();
            assert_eq!(err.kind(), StoreErrorKind::Corrupt);
            assert!(
                matches!(&err, StoreError::Corrupt { conv, seq: 2, .. } if conv == "c1"),
                "{err:?}"
            );
        }
        // Pages that do not touch the bad record still work.
        let page = store
            .page(
                "c1",
                PageQuery::After {
                    after: 2,
                    limit: 10,
                },
            )
            .await
            .unwrap();
        assert_eq!(page.messages, vec![message("c1", 3)]);

        // Re-putting over a corrupt record reports the corruption, not a conflict.
        let err = store
            .apply(vec![Change::message(message("c1", 2), vec![])], None)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), StoreErrorKind::Corrupt, "{err:?}");
    }

    #[test]
    fn record_encoding_round_trips() {
        let m = message("conv", 7);
        let back = decode("conv", 7, &encode(&m)).unwrap();
        assert!(back.same_as(&m));
        assert_eq!(back.into_message("conv", 7), m);
    }
}
