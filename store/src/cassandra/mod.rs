//! The Cassandra / ScyllaDB backend, on the pure-Rust `scylla` driver (CQL protocol v4, which
//! both servers speak). Schema, keys and costs are described in `store/README.md`; the
//! schema itself is `store/cql/*.cql`.
//!
//! **Writes.** Cassandra has no transaction across partitions, so [`MessageStore::apply`] is
//! made convergent instead of atomic:
//! 1. everything that can refuse the batch is checked before anything is written: the
//!    validation, the messages already stored at the batch's seqs (one range read per message
//!    partition; a different message is [`StoreError::Conflict`]), so a refused batch writes
//!    nothing. The same reads fetch the member rows of the groups the batch changes and the
//!    previous index positions the batch moves (remembered between batches, so usually none);
//! 2. the [`plan`] lists the rows to write, grouped by partition; each partition's rows go in
//!    one unlogged batch (split under `max_batch_bytes`), partitions concurrently, at most
//!    `max_concurrent_requests` at a time;
//! 3. only when every partition is written is the applied watermark raised.
//!
//! Every write carries an explicit timestamp derived from its cause (the stream position or
//! seq it raises a register to), so re-applying a batch after a crash, or two processes
//! writing the same stream, converge to the same state, and every statement is idempotent and
//! marked so: the [`retry`] policy retries them (a write timeout included) once on another
//! node. A batch that fails half-way has
//! written only rows that are correct (each message row is written whole or not at all), and
//! its watermark is not raised, so the writer applies it again.
//!
//! **Reads** page through partitions with the driver's paging; history walks message buckets
//! from the one its cursor falls in.

mod codec;
pub mod config;
pub mod plan;
pub mod retry;
pub mod schema;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use futures::{StreamExt, TryStreamExt, stream};
use scylla::client::session::Session;
use scylla::deserialize::row::DeserializeRow;
use scylla::serialize::row::SerializeRow;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;

pub use config::{CassandraConfig, ConfigError, Consistency, Replication, TlsConfig};
pub use schema::{MigrateReport, migrate};

use self::codec::{
    FOLLOW_POS, MAX_CLUSTERED, MessageColumns, big, bucket, bucket_bounds, from_big,
};
use self::plan::{Known, MemberRow, Plan, Stmt, Write};
use crate::{
    Change, ClientKey, ConvMeta, ConvSummary, Event, MAX_PAGE_LIMIT, Marks, Member, MessageStore,
    Page, PageQuery, StoreError, StoredMessage, UserConversations,
};

/// Page size of every paged read.
const PAGE_SIZE: i32 = 1000;

/// Most client ids in one `client_id IN ?` read: ScyllaDB refuses more than 100 clustering key
/// restrictions per query by default (`max_clustering_key_restrictions_per_query`).
const MAX_IN_IDS: usize = 100;

const MESSAGE_COLUMNS: &str = "seq, from_user, client_id, ts_ms, body, stream_seq, event, media";

/// The read statements, by what they read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Read {
    MessageRange,
    MessagesBefore,
    MessagesAfter,
    ClientIds,
    Conversation,
    Marks,
    Members,
    Member,
    UserConv,
    UserConvsFrom,
    FeedSince,
    Applied,
}

impl Read {
    const ALL: [Read; 12] = [
        Read::MessageRange,
        Read::MessagesBefore,
        Read::MessagesAfter,
        Read::ClientIds,
        Read::Conversation,
        Read::Marks,
        Read::Members,
        Read::Member,
        Read::UserConv,
        Read::UserConvsFrom,
        Read::FeedSince,
        Read::Applied,
    ];

    fn cql(self) -> String {
        match self {
            Read::MessageRange => format!(
                "SELECT {MESSAGE_COLUMNS} FROM messages WHERE conv = ? AND bucket = ? \
                 AND seq >= ? AND seq <= ?"
            ),
            Read::MessagesBefore => format!(
                "SELECT {MESSAGE_COLUMNS} FROM messages WHERE conv = ? AND bucket = ? \
                 AND seq < ? ORDER BY seq DESC LIMIT ?"
            ),
            Read::MessagesAfter => format!(
                "SELECT {MESSAGE_COLUMNS} FROM messages WHERE conv = ? AND bucket = ? \
                 AND seq > ? ORDER BY seq ASC LIMIT ?"
            ),
            Read::ClientIds => "SELECT client_id, seq FROM client_ids \
                                WHERE conv = ? AND from_user = ? AND client_id IN ?"
                .into(),
            Read::Conversation => "SELECT latest_seq, pos, name, member_count FROM conversations \
                                   WHERE conv = ?"
                .into(),
            Read::Marks => "SELECT user_id, delivered, read_seq FROM marks WHERE conv = ?".into(),
            Read::Members => "SELECT user_id, joined, left_seq, admin, event_seq FROM members \
                              WHERE conv = ?"
                .into(),
            Read::Member => "SELECT user_id, joined, left_seq, admin, event_seq FROM members \
                             WHERE conv = ? AND user_id = ?"
                .into(),
            Read::UserConv => "SELECT pos FROM user_convs WHERE user_id = ? AND conv = ?".into(),
            Read::UserConvsFrom => "SELECT conv, pos, follow FROM user_convs \
                                    WHERE user_id = ? AND conv >= ?"
                .into(),
            Read::FeedSince => {
                "SELECT pos, conv FROM user_feed WHERE user_id = ? AND pos > ?".into()
            }
            Read::Applied => "SELECT val FROM store_meta WHERE name = 'applied'".into(),
        }
    }
}

/// The message store in a Cassandra or ScyllaDB keyspace. Cheap to clone (one shared driver
/// session). Open it with [`CassandraStore::open`] after the schema was created with
/// [`migrate`] (`sequencer migrate-store`).
#[derive(Clone)]
pub struct CassandraStore {
    inner: Arc<Inner>,
}

struct Inner {
    session: Session,
    keyspace: String,
    writes: HashMap<Stmt, PreparedStatement>,
    reads: HashMap<Read, PreparedStatement>,
    write_consistency: scylla::statement::Consistency,
    concurrency: usize,
    max_batch_bytes: usize,
    positions: Mutex<HashMap<(String, String), u64>>,
    positions_max: usize,
}

impl std::fmt::Debug for CassandraStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CassandraStore")
            .field("keyspace", &self.inner.keyspace)
            .finish_non_exhaustive()
    }
}

/// Maps a driver error to [`StoreError::Cassandra`] with the operation as context.
fn cass<E: std::error::Error + Send + Sync + 'static>(
    op: &'static str,
) -> impl Fn(E) -> StoreError {
    move |e| StoreError::Cassandra {
        op,
        source: Box::new(e),
    }
}

/// Refuses what this backend cannot store, before anything is read or written.
fn validate_limits(changes: &[Change]) -> Result<(), StoreError> {
    for change in changes {
        let indexed = !change.members.is_empty() || !change.group.is_empty();
        if let Event::Message(m) = &change.event {
            if m.seq > MAX_CLUSTERED {
                return Err(StoreError::Invalid {
                    conv: m.conv.clone(),
                    seq: m.seq,
                    reason: "seq above 2^63 - 2 (a clustering bigint)",
                });
            }
            if m.conv.is_empty() {
                return Err(StoreError::Invalid {
                    conv: m.conv.clone(),
                    seq: m.seq,
                    reason: "conv must not be empty",
                });
            }
        }
        if indexed && change.stream_seq() > MAX_CLUSTERED {
            return Err(StoreError::Invalid {
                conv: change.conv().to_owned(),
                seq: 0,
                reason: "stream seq above 2^63 - 2 cannot be an index position",
            });
        }
        if change.members.iter().any(String::is_empty) {
            return Err(StoreError::Invalid {
                conv: change.conv().to_owned(),
                seq: 0,
                reason: "index member ids must not be empty",
            });
        }
    }
    Ok(())
}

/// The first of two different messages at one `(conv, seq)` inside the batch.
fn conflict_within(changes: &[Change]) -> Result<(), StoreError> {
    let mut first: HashMap<(&str, u64), &StoredMessage> = HashMap::new();
    for change in changes {
        if let Event::Message(m) = &change.event {
            match first.get(&(m.conv.as_str(), m.seq)) {
                Some(prev) if *prev != m => {
                    return Err(StoreError::Conflict {
                        conv: m.conv.clone(),
                        seq: m.seq,
                    });
                }
                Some(_) => {}
                None => {
                    first.insert((&m.conv, m.seq), m);
                }
            }
        }
    }
    Ok(())
}

/// A `messages` row as [`MESSAGE_COLUMNS`] selects it: seq, then [`MessageColumns`].
type MessageRow = (
    i64,
    String,
    String,
    i64,
    String,
    i64,
    Option<String>,
    Option<String>,
);

/// A `conversations` row: latest seq, position, name, member count.
type ConvRow = (Option<i64>, Option<i64>, Option<String>, Option<i64>);

/// A `members` row after its conversation: user, joined, left, admin, event seq.
type MemberCols = (String, Option<i64>, Option<i64>, Option<bool>, Option<i64>);

fn member_row(c: &MemberCols) -> MemberRow {
    MemberRow {
        joined: c.1.map_or(0, from_big),
        left: c.2.map(from_big),
        admin: c.3.unwrap_or(false),
        event_seq: c.4.map_or(0, from_big),
    }
}

fn to_member(c: MemberCols) -> Member {
    let row = member_row(&c);
    Member {
        user: c.0,
        joined: row.joined,
        left: row.left,
        admin: row.admin,
    }
}

impl CassandraStore {
    /// Connects, checks that the keyspace has the schema this build needs, and prepares every
    /// statement.
    pub async fn open(config: &CassandraConfig) -> Result<Self, StoreError> {
        let session = config.connect().await?;
        let schema_err = |have| StoreError::Schema {
            keyspace: config.keyspace.clone(),
            have,
            want: schema::LATEST,
        };
        if session.use_keyspace(&config.keyspace, false).await.is_err() {
            return Err(schema_err(None));
        }
        let have = schema::recorded_version(&session)
            .await
            .map_err(|_| schema_err(None))?;
        if have.is_none_or(|v| v < schema::LATEST) {
            return Err(schema_err(have));
        }
        let write_consistency = config.write_consistency.to_driver();
        let read_consistency = config.read_consistency.to_driver();
        let mut writes = HashMap::new();
        for stmt in Stmt::ALL {
            let mut p = session
                .prepare(stmt.cql())
                .await
                .map_err(cass("prepare write statement"))?;
            p.set_consistency(write_consistency);
            p.set_is_idempotent(true);
            writes.insert(stmt, p);
        }
        let mut reads = HashMap::new();
        for read in Read::ALL {
            let mut p = session
                .prepare(read.cql())
                .await
                .map_err(cass("prepare read statement"))?;
            p.set_consistency(read_consistency);
            p.set_is_idempotent(true);
            p.set_page_size(PAGE_SIZE);
            reads.insert(read, p);
        }
        Ok(CassandraStore {
            inner: Arc::new(Inner {
                session,
                keyspace: config.keyspace.clone(),
                writes,
                reads,
                write_consistency,
                concurrency: config.max_concurrent_requests.max(1),
                max_batch_bytes: config.max_batch_bytes,
                positions: Mutex::new(HashMap::new()),
                positions_max: config.position_cache_max,
            }),
        })
    }

    /// The keyspace this store uses.
    pub fn keyspace(&self) -> &str {
        &self.inner.keyspace
    }

    fn read_stmt(&self, r: Read) -> &PreparedStatement {
        &self.inner.reads[&r]
    }

    /// Every row of a (paged) read.
    async fn rows<R>(
        &self,
        r: Read,
        values: impl SerializeRow,
        op: &'static str,
    ) -> Result<Vec<R>, StoreError>
    where
        R: for<'f, 'm> DeserializeRow<'f, 'm> + Send + 'static,
    {
        let pager = self
            .inner
            .session
            .execute_iter(self.read_stmt(r).clone(), values)
            .await
            .map_err(cass(op))?;
        pager
            .rows_stream::<R>()
            .map_err(cass(op))?
            .map_err(cass(op))
            .try_collect()
            .await
    }

    /// The first row of a single-partition point read, if any.
    async fn first<R>(
        &self,
        r: Read,
        values: impl SerializeRow,
        op: &'static str,
    ) -> Result<Option<R>, StoreError>
    where
        R: for<'f, 'm> DeserializeRow<'f, 'm>,
    {
        let result = self
            .inner
            .session
            .execute_unpaged(self.read_stmt(r), values)
            .await
            .map_err(cass(op))?
            .into_rows_result()
            .map_err(cass(op))?;
        result.maybe_first_row::<R>().map_err(cass(op))
    }

    async fn conv_row(&self, conv: &str) -> Result<Option<ConvRow>, StoreError> {
        if conv.is_empty() {
            return Ok(None);
        }
        self.first(Read::Conversation, (conv,), "read conversation")
            .await
    }

    async fn latest(&self, conv: &str) -> Result<Option<u64>, StoreError> {
        Ok(self
            .conv_row(conv)
            .await?
            .and_then(|row| row.0)
            .map(from_big))
    }

    async fn applied(&self) -> Result<u64, StoreError> {
        let row: Option<(Option<i64>,)> = self
            .first(Read::Applied, (), "read applied stream seq")
            .await?;
        Ok(row.and_then(|r| r.0).map_or(0, from_big))
    }

    /// Step 1 of `apply`: refuses a conflicting batch and reads what the plan needs.
    async fn read_known(&self, changes: &[Change]) -> Result<Known, StoreError> {
        // (conv, bucket) -> the batch's first message at each seq.
        let mut by_partition: BTreeMap<(&str, i64), BTreeMap<u64, &StoredMessage>> =
            BTreeMap::new();
        for change in changes {
            if let Event::Message(m) = &change.event {
                by_partition
                    .entry((&m.conv, bucket(m.seq)))
                    .or_default()
                    .entry(m.seq)
                    .or_insert(m);
            }
        }
        // Futures collected first: a stream over a `map` closure that borrows trips the
        // compiler's higher-ranked `Send` check of the trait's futures.
        let stored: Vec<_> = by_partition
            .into_iter()
            .map(|((conv, b), msgs)| async move {
                let lo = *msgs.keys().next().expect("a partition has messages");
                let hi = *msgs.keys().next_back().expect("a partition has messages");
                let rows: Vec<MessageRow> = self
                    .rows(
                        Read::MessageRange,
                        (conv, b, big(lo), big(hi)),
                        "read stored messages",
                    )
                    .await?;
                let mut found = Vec::new();
                for (seq, from, client_id, ts_ms, body, stream_seq, event, media) in rows {
                    let columns: MessageColumns =
                        (from, client_id, ts_ms, body, stream_seq, event, media);
                    let have = codec::message_from_row(conv, seq, columns);
                    if let Some(want) = msgs.get(&have.seq) {
                        if **want != have {
                            return Err(StoreError::Conflict {
                                conv: conv.to_owned(),
                                seq: have.seq,
                            });
                        }
                        found.push((conv.to_owned(), have.seq));
                    }
                }
                Ok::<_, StoreError>(found)
            })
            .collect();
        let stored = stream::iter(stored)
            .buffer_unordered(self.inner.concurrency)
            .try_collect::<Vec<_>>();

        let groups = plan::changed_groups(changes);
        let members = stream::iter(groups.into_iter().map(|conv| async move {
            let rows: Vec<MemberCols> = self
                .rows(Read::Members, (conv.as_str(),), "read group members")
                .await?;
            let rows = rows
                .iter()
                .map(|c| (c.0.clone(), member_row(c)))
                .collect::<HashMap<_, _>>();
            Ok::<_, StoreError>((conv, rows))
        }))
        .buffer_unordered(self.inner.concurrency)
        .try_collect::<HashMap<_, _>>();

        let mut positions = HashMap::new();
        let mut missing = Vec::new();
        {
            let cache = self
                .inner
                .positions
                .lock()
                .expect("position cache poisoned");
            for key in plan::moved_entries(changes) {
                match cache.get(&key) {
                    Some(&pos) => {
                        positions.insert(key, pos);
                    }
                    None => missing.push(key),
                }
            }
        }
        let looked_up = stream::iter(missing.into_iter().map(|key| async move {
            let row: Option<(Option<i64>,)> = self
                .first(
                    Read::UserConv,
                    (key.0.as_str(), key.1.as_str()),
                    "read index position",
                )
                .await?;
            Ok::<_, StoreError>((key, row.and_then(|r| r.0).map(from_big)))
        }))
        .buffer_unordered(self.inner.concurrency)
        .try_collect::<Vec<_>>();

        let (stored, members, looked_up) = futures::try_join!(stored, members, looked_up)?;
        positions.extend(looked_up.into_iter().filter_map(|(k, p)| Some((k, p?))));
        Ok(Known {
            stored: stored.into_iter().flatten().collect::<HashSet<_>>(),
            members,
            positions,
        })
    }

    /// Step 2 of `apply`: every partition of the plan, concurrently, each in as few unlogged
    /// batches as its size allows.
    async fn execute(&self, plan: &Plan) -> Result<(), StoreError> {
        let max = self.inner.max_batch_bytes;
        let requests: Vec<&[Write]> = plan
            .partitions
            .values()
            .flat_map(|writes| plan::chunks(writes, max))
            .collect();
        let requests: Vec<_> = requests
            .into_iter()
            .map(|chunk| self.write_chunk(chunk))
            .collect();
        stream::iter(requests)
            .buffer_unordered(self.inner.concurrency)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }

    async fn write_chunk(&self, chunk: &[Write]) -> Result<(), StoreError> {
        let session = &self.inner.session;
        if let [one] = chunk {
            session
                .execute_unpaged(&self.inner.writes[&one.stmt()], one.values())
                .await
                .map_err(cass("write"))?;
            return Ok(());
        }
        let mut batch = Batch::new(BatchType::Unlogged);
        batch.set_consistency(self.inner.write_consistency);
        batch.set_is_idempotent(true);
        let mut values = Vec::with_capacity(chunk.len());
        for w in chunk {
            batch.append_statement(self.inner.writes[&w.stmt()].clone());
            values.push(w.values());
        }
        session
            .batch(&batch, values)
            .await
            .map_err(cass("write batch"))?;
        Ok(())
    }

    fn remember_positions(&self, plan: &Plan) {
        if self.inner.positions_max == 0 {
            return;
        }
        let mut cache = self
            .inner
            .positions
            .lock()
            .expect("position cache poisoned");
        if cache.len() + plan.positions.len() > self.inner.positions_max {
            // Forgetting costs one read per entry moved next; no bookkeeping on the hot path.
            cache.clear();
        }
        for (key, pos) in &plan.positions {
            let e = cache.entry(key.clone()).or_insert(*pos);
            *e = (*e).max(*pos);
        }
    }

    /// The conversation rows of `convs`, in order, `buffered` so that order is kept.
    async fn conv_rows(&self, convs: &[String]) -> Result<Vec<Option<ConvRow>>, StoreError> {
        let reads: Vec<_> = convs.iter().map(|c| self.conv_row(c)).collect();
        stream::iter(reads)
            .buffered(self.inner.concurrency)
            .try_collect()
            .await
    }

    /// Resolves candidate index entries `(conv, explicit position, follows the group)` to
    /// those whose position is above `since`, with their conversation rows.
    async fn resolve(
        &self,
        candidates: Vec<(String, u64, bool)>,
        since: u64,
    ) -> Result<Vec<(String, u64, Option<ConvRow>)>, StoreError> {
        let convs: Vec<String> = candidates.iter().map(|c| c.0.clone()).collect();
        let rows = self.conv_rows(&convs).await?;
        Ok(candidates
            .into_iter()
            .zip(rows)
            .filter_map(|((conv, explicit, follow), row)| {
                let conv_pos = row.as_ref().and_then(|r| r.1).map_or(0, from_big);
                let pos = if follow {
                    explicit.max(conv_pos)
                } else {
                    explicit
                };
                (pos > since).then_some((conv, pos, row))
            })
            .collect())
    }

    /// The changed entries of `user` since `since` (> 0), from its feed partition: one read.
    async fn feed_candidates(
        &self,
        user: &str,
        since: u64,
        from_conv: &str,
    ) -> Result<Vec<(String, u64, bool)>, StoreError> {
        let rows: Vec<(i64, String)> = self
            .rows(
                Read::FeedSince,
                (user, big(since.min(MAX_CLUSTERED))),
                "read user feed",
            )
            .await?;
        let mut by_conv: BTreeMap<String, (u64, bool)> = BTreeMap::new();
        for (pos, conv) in rows {
            if conv.as_str() < from_conv {
                continue;
            }
            let e = by_conv.entry(conv).or_insert((0, false));
            if pos == FOLLOW_POS {
                e.1 = true;
            } else {
                // Older rows of a moved entry may survive a lost delete: the highest counts.
                e.0 = e.0.max(from_big(pos));
            }
        }
        Ok(by_conv
            .into_iter()
            .map(|(conv, (pos, follow))| (conv, pos, follow))
            .collect())
    }

    /// Builds the summaries of the selected entries (member rows read concurrently).
    async fn summaries(
        &self,
        user: &str,
        selected: Vec<(String, u64, Option<ConvRow>)>,
    ) -> Result<Vec<ConvSummary>, StoreError> {
        stream::iter(selected.into_iter().map(|(conv, pos, row)| async move {
            let member: Option<MemberCols> = self
                .first(Read::Member, (conv.as_str(), user), "read member")
                .await?;
            let (joined, left, admin) = match member.as_ref().map(member_row) {
                Some(r) => (r.joined, r.left, r.admin),
                None => (1, None, false),
            };
            let (latest, _, name, count) = row.unwrap_or_default();
            let latest = latest.map_or(0, from_big);
            Ok::<_, StoreError>(ConvSummary {
                conv,
                latest: left.map_or(latest, |l| latest.min(l)),
                pos,
                name: name.unwrap_or_default(),
                member_count: count.map_or(0, from_big),
                joined,
                left,
                admin,
            })
        }))
        .buffered(self.inner.concurrency)
        .try_collect()
        .await
    }

    /// One history read: the messages of bucket `b` beyond `cursor` (exclusive), at most
    /// `limit`, newest first for `desc`.
    async fn bucket_page(
        &self,
        conv: &str,
        b: i64,
        cursor: u64,
        limit: usize,
        desc: bool,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let (read, op) = if desc {
            (Read::MessagesBefore, "read page before")
        } else {
            (Read::MessagesAfter, "read page after")
        };
        let rows: Vec<MessageRow> = self
            .rows(read, (conv, b, big(cursor), limit as i32), op)
            .await?;
        Ok(rows
            .into_iter()
            .map(
                |(seq, from, client_id, ts_ms, body, stream_seq, event, media)| {
                    codec::message_from_row(
                        conv,
                        seq,
                        (from, client_id, ts_ms, body, stream_seq, event, media),
                    )
                },
            )
            .collect())
    }
}

impl MessageStore for CassandraStore {
    async fn apply(&self, changes: Vec<Change>, through: Option<u64>) -> Result<(), StoreError> {
        if changes.is_empty() && through.is_none() {
            return Ok(());
        }
        crate::validate_changes(&changes)?;
        validate_limits(&changes)?;
        conflict_within(&changes)?;
        if !changes.is_empty() {
            let known = self.read_known(&changes).await?;
            let plan = plan::plan(&changes, &known);
            self.execute(&plan).await?;
            self.remember_positions(&plan);
        }
        if let Some(through) = through {
            // Only now: every change up to `through` is written.
            self.write_chunk(&[Write::Applied { through }]).await?;
        }
        Ok(())
    }

    async fn watermarks(&self, conv: &str) -> Result<Vec<Marks>, StoreError> {
        if conv.is_empty() {
            return Ok(Vec::new());
        }
        let rows: Vec<(String, Option<i64>, Option<i64>)> =
            self.rows(Read::Marks, (conv,), "read watermarks").await?;
        Ok(rows
            .into_iter()
            .map(|(user, delivered, read)| Marks {
                user,
                delivered: delivered.map_or(0, from_big),
                read: read.map_or(0, from_big),
            })
            .collect())
    }

    async fn member(&self, conv: &str, user: &str) -> Result<Option<Member>, StoreError> {
        if conv.is_empty() || user.is_empty() {
            return Ok(None);
        }
        let row: Option<MemberCols> = self
            .first(Read::Member, (conv, user), "read member")
            .await?;
        Ok(row.map(to_member))
    }

    async fn members(&self, conv: &str) -> Result<Vec<Member>, StoreError> {
        if conv.is_empty() {
            return Ok(Vec::new());
        }
        let rows: Vec<MemberCols> = self.rows(Read::Members, (conv,), "read members").await?;
        Ok(rows.into_iter().map(to_member).collect())
    }

    async fn conversation(&self, conv: &str) -> Result<Option<ConvMeta>, StoreError> {
        Ok(self
            .conv_row(conv)
            .await?
            .map(|(_, pos, name, count)| ConvMeta {
                name: name.unwrap_or_default(),
                member_count: count.map_or(0, from_big),
                pos: pos.map_or(0, from_big),
            }))
    }

    async fn user_conversations(
        &self,
        user: &str,
        since: u64,
        from_conv: Option<&str>,
        limit: u32,
    ) -> Result<UserConversations, StoreError> {
        let limit = limit.clamp(1, MAX_PAGE_LIMIT) as usize;
        // Before the index: every change up to it is already in the index.
        let applied = self.applied().await?;
        if user.is_empty() {
            return Ok(UserConversations {
                applied,
                ..Default::default()
            });
        }
        let from_conv = from_conv.unwrap_or("");
        let mut selected = Vec::with_capacity(limit + 1);
        if since > 0 {
            // What changed: the user's feed partition, ordered by position.
            let candidates = self.feed_candidates(user, since, from_conv).await?;
            for chunk in candidates.chunks(limit + 1) {
                selected.extend(self.resolve(chunk.to_vec(), since).await?);
                if selected.len() > limit {
                    break;
                }
            }
        } else {
            // Everything, by conversation id: the user's index partition from `from_conv`.
            let pager = self
                .inner
                .session
                .execute_iter(
                    self.read_stmt(Read::UserConvsFrom).clone(),
                    (user, from_conv),
                )
                .await
                .map_err(cass("read user conversations"))?;
            let mut rows = pager
                .rows_stream::<(String, Option<i64>, Option<bool>)>()
                .map_err(cass("read user conversations"))?;
            let mut chunk = Vec::new();
            loop {
                let row = rows
                    .try_next()
                    .await
                    .map_err(cass("read user conversations"))?;
                let done = row.is_none();
                if let Some((conv, pos, follow)) = row {
                    chunk.push((conv, pos.map_or(0, from_big), follow.unwrap_or(false)));
                }
                if chunk.len() > limit - selected.len() || (done && !chunk.is_empty()) {
                    selected.extend(self.resolve(std::mem::take(&mut chunk), since).await?);
                }
                if done || selected.len() > limit {
                    break;
                }
            }
        }
        let more = selected.len() > limit;
        selected.truncate(limit);
        let convs = self.summaries(user, selected).await?;
        Ok(UserConversations {
            applied,
            convs,
            more,
        })
    }

    async fn page(&self, conv: &str, q: PageQuery) -> Result<Page, StoreError> {
        let limit = q.effective_limit() as usize;
        if conv.is_empty()
            || matches!(
                q,
                PageQuery::Before {
                    before: Some(0),
                    ..
                }
            )
        {
            return Ok(Page::default());
        }
        // The latest seq bounds the walk over buckets (seqs are dense, so every bucket below
        // it holds messages).
        let Some(latest) = self.latest(conv).await? else {
            return Ok(Page::default());
        };
        let mut messages = Vec::with_capacity(limit + 1);
        match q {
            PageQuery::Before { before, .. } => {
                let top = before.map_or(latest, |b| (b - 1).min(latest));
                if top == 0 {
                    return Ok(Page::default());
                }
                let mut b = bucket(top);
                let mut cursor = top + 1;
                loop {
                    let want = limit + 1 - messages.len();
                    messages.extend(self.bucket_page(conv, b, cursor, want, true).await?);
                    if messages.len() > limit || b == 0 {
                        break;
                    }
                    b -= 1;
                    cursor = bucket_bounds(b).1 + 1;
                }
                let more = messages.len() > limit;
                messages.truncate(limit);
                messages.reverse();
                Ok(Page { messages, more })
            }
            PageQuery::After { after, .. } => {
                if after >= latest {
                    return Ok(Page::default());
                }
                let mut b = bucket(after + 1);
                let mut cursor = after;
                loop {
                    let want = limit + 1 - messages.len();
                    messages.extend(self.bucket_page(conv, b, cursor, want, false).await?);
                    let (_, last) = bucket_bounds(b);
                    if messages.len() > limit || last >= latest {
                        break;
                    }
                    b += 1;
                    cursor = last;
                }
                let more = messages.len() > limit;
                messages.truncate(limit);
                Ok(Page { messages, more })
            }
        }
    }

    async fn latest_seq(&self, conv: &str) -> Result<Option<u64>, StoreError> {
        self.latest(conv).await
    }

    async fn seqs_for_client_ids(
        &self,
        keys: Vec<ClientKey>,
    ) -> Result<Vec<Option<u64>>, StoreError> {
        // One read per (conversation, sender), of at most MAX_IN_IDS ids: a pulled batch is
        // mostly a few of them.
        let mut groups: BTreeMap<(&str, &str), Vec<String>> = BTreeMap::new();
        for k in &keys {
            if k.conv.is_empty() || k.from.is_empty() {
                continue;
            }
            groups
                .entry((&k.conv, &k.from))
                .or_default()
                .push(k.client_id.clone());
        }
        let mut lookups: Vec<(&str, &str, Vec<String>)> = Vec::new();
        for ((conv, from), mut ids) in groups {
            ids.sort();
            ids.dedup();
            for chunk in ids.chunks(MAX_IN_IDS) {
                lookups.push((conv, from, chunk.to_vec()));
            }
        }
        let reads: Vec<_> = lookups
            .into_iter()
            .map(|(conv, from, ids)| async move {
                let rows: Vec<(String, Option<i64>)> = self
                    .rows(Read::ClientIds, (conv, from, ids), "read client ids")
                    .await?;
                Ok::<_, StoreError>(
                    rows.into_iter()
                        .filter_map(|(id, seq)| Some(((conv, from, id), from_big(seq?))))
                        .collect::<Vec<_>>(),
                )
            })
            .collect();
        let found = stream::iter(reads)
            .buffer_unordered(self.inner.concurrency)
            .try_collect::<Vec<_>>()
            .await?;
        let found: HashMap<(&str, &str, String), u64> = found.into_iter().flatten().collect();
        Ok(keys
            .iter()
            .map(|k| {
                found
                    .get(&(k.conv.as_str(), k.from.as_str(), k.client_id.clone()))
                    .copied()
            })
            .collect())
    }

    async fn applied_stream_seq(&self) -> Result<u64, StoreError> {
        self.applied().await
    }
}

#[cfg(test)]
mod tests;
