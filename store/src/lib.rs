//! Persistence of stamped chat messages, receipt watermarks and each user's
//! conversation index.
//!
//! The sequencer stamps every accepted message with a dense per-conversation
//! sequence number (`seq`, starting at 1) and publishes it to the `CHAT_MSGS`
//! JetStream stream on `chat.msg.<p>.<conv>`; receipts (a member's delivered
//! and read watermarks) go through the same sequencer onto
//! `chat.rcpt.<p>.<conv>`. This crate is where both end up, so that clients
//! can page through history and sync long after the broker has dropped them.
//! The store holds:
//!
//! - **messages**, by `(conv, seq)`, paged with [`MessageStore::page`];
//! - **client ids**, `(conv, from, client_id) -> seq`, so the sequencer can
//!   deduplicate client message ids beyond the broker's dedupe window;
//! - **watermarks**, `(conv, user) -> (delivered, read)`, which only ever grow,
//!   so receipts can be applied in any order and more than once;
//! - **a per-user conversation index**, `(user, conv) -> position` (the highest
//!   `CHAT_MSGS` stream sequence of a change in that conversation), so a sync
//!   lists only the conversations that changed since the client's last token;
//! - **group membership**, `(conv, user) -> (joined, left, admin)`, and each
//!   conversation's name, member count and position, maintained from the
//!   group changes that stamped group events carry ([`GroupChange`]). A group
//!   member's index entry follows the conversation's position (one write per
//!   change, whatever the group's size) until it leaves, when it freezes at
//!   the position of its removal;
//! - **the applied watermark**: every `CHAT_MSGS` message up to it is stored.
//!
//! Every change goes through one method, [`MessageStore::apply`], which writes
//! a batch of changes (in one durable transaction where the backend has them).
//!
//! Callers program against the [`MessageStore`] trait. Two backends implement
//! it, and [`AnyStore`] is whichever one a service's configuration selects:
//! - [`EmbeddedStore`], a single-node store in an embedded
//!   [redb](https://docs.rs/redb) file with durable (fsync'd) commits, the
//!   default on one machine;
//! - `CassandraStore` (feature `cassandra`, on by default), a keyspace of a
//!   Cassandra or ScyllaDB cluster through the pure-Rust `scylla` driver, for
//!   production: see `store/README.md` for its schema, costs and setup.
//!
//! The backend-independent behaviour is pinned down by the test suite in
//! [`conformance`], which every backend passes (`store/tests/embedded.rs`,
//! `store/tests/cassandra.rs`).
//!
//! The store does not validate ids (the caller has already checked that they
//! are ASCII `[A-Za-z0-9_~-]`), does not decide who may join or leave (the
//! sequencer does; the store applies the [`GroupChange`]s it is given, and for
//! one-to-one conversations the caller passes the two members with each
//! [`Change`]) and never interprets message bodies or group event texts.

use std::future::Future;
use std::path::PathBuf;

mod any;
#[cfg(feature = "cassandra")]
pub mod cassandra;
mod embedded;

#[doc(hidden)]
pub mod conformance;

pub use any::{AnyStore, Backend};
#[cfg(feature = "cassandra")]
pub use cassandra::{CassandraConfig, CassandraStore};
pub use embedded::EmbeddedStore;

/// Largest number of messages a single [`MessageStore::page`] call returns.
pub const MAX_PAGE_LIMIT: u32 = 500;

/// One stamped message as stored. Ids are already validated by the caller
/// (ASCII `[A-Za-z0-9_~-]`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StoredMessage {
    /// Conversation id.
    pub conv: String,
    /// Dense per-conversation sequence, starts at 1.
    pub seq: u64,
    /// Sender user id.
    pub from: String,
    /// Sender's client-generated message id.
    pub client_id: String,
    /// Server time (ms since the Unix epoch) when the message was stamped.
    pub ts_ms: u64,
    /// Opaque payload; the server never interprets it.
    pub body: String,
    /// JetStream sequence of the stamped message in the `CHAT_MSGS` stream.
    pub stream_seq: u64,
    /// The group event this message is (its JSON text, opaque to the store),
    /// or `None` for a plain message.
    pub event: Option<String>,
    /// The media the message references (its JSON text, opaque to the store),
    /// or `None` for a message without media.
    pub media: Option<String>,
}

/// What a stamped group event does to the group, applied by
/// [`MessageStore::apply`] together with the message that carries it, at the
/// message's seq, and only the first time that message is stored (so
/// re-applying a message never repeats its membership effect).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupChange {
    /// These users become members from the message's seq on (a user who
    /// already is a member is left as it is). `admin`: they join as admins.
    Join { users: Vec<String>, admin: bool },
    /// These members leave at the message's seq: it is the last one they can
    /// see, and their index entry freezes at its stream seq.
    Leave { users: Vec<String> },
    /// These members get (`true`) or lose the admin role.
    Admin { users: Vec<String>, admin: bool },
    /// The group's name becomes `name`.
    Rename { name: String },
}

/// A member of a group, current or former.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub user: String,
    /// Seq of the event that made it a member (its latest joining).
    pub joined: u64,
    /// Seq of the event that removed it, if it is no longer a member.
    pub left: Option<u64>,
    pub admin: bool,
}

/// A conversation's name, member count and position.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConvMeta {
    /// The group's name (empty for one-to-one conversations and unnamed groups).
    pub name: String,
    /// Current members, as counted by group changes (0 for one-to-one
    /// conversations, which have none).
    pub member_count: u64,
    /// Highest `CHAT_MSGS` stream sequence of a change applied to it.
    pub pos: u64,
}

/// A receipt event: a member's watermarks in a conversation, as stamped on the
/// `chat.rcpt.<p>.<conv>` subject of `CHAT_MSGS` (stream sequence `stream_seq`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StoredReceipt {
    /// Conversation id.
    pub conv: String,
    /// The member whose watermarks these are.
    pub user: String,
    /// Some device of `user` has every message up to this seq.
    pub delivered: u64,
    /// `user` has read up to this seq.
    pub read: u64,
    /// JetStream sequence of the receipt in the `CHAT_MSGS` stream (at least 1).
    pub stream_seq: u64,
}

/// One event of a conversation, as carried by `CHAT_MSGS`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A stamped message (`chat.msg.<p>.<conv>`).
    Message(StoredMessage),
    /// A receipt (`chat.rcpt.<p>.<conv>`).
    Receipt(StoredReceipt),
}

/// One change to apply, and the users whose conversation index it touches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// What happened.
    pub event: Event,
    /// Users whose index entry for the event's conversation moves to the
    /// event's stream sequence: the two members of a one-to-one conversation
    /// (computed by the caller). Empty for groups, whose members' entries
    /// follow the conversation (see [`GroupChange`]).
    pub members: Vec<String>,
    /// What the event does to its group (only for [`Event::Message`]).
    pub group: Vec<GroupChange>,
}

impl Change {
    /// A stamped message, touching the index of `members`.
    pub fn message(m: StoredMessage, members: Vec<String>) -> Self {
        Change {
            event: Event::Message(m),
            members,
            group: Vec::new(),
        }
    }

    /// A stamped group message carrying `group` changes (none for a plain
    /// group message).
    pub fn group_message(m: StoredMessage, group: Vec<GroupChange>) -> Self {
        Change {
            event: Event::Message(m),
            members: Vec::new(),
            group,
        }
    }

    /// A receipt, touching the index of `members`.
    pub fn receipt(r: StoredReceipt, members: Vec<String>) -> Self {
        Change {
            event: Event::Receipt(r),
            members,
            group: Vec::new(),
        }
    }

    /// The `CHAT_MSGS` stream sequence of the event.
    pub fn stream_seq(&self) -> u64 {
        match &self.event {
            Event::Message(m) => m.stream_seq,
            Event::Receipt(r) => r.stream_seq,
        }
    }

    /// The conversation of the event.
    pub fn conv(&self) -> &str {
        match &self.event {
            Event::Message(m) => &m.conv,
            Event::Receipt(r) => &r.conv,
        }
    }
}

/// A sender's client message id in one conversation (see
/// [`MessageStore::seqs_for_client_ids`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClientKey {
    pub conv: String,
    pub from: String,
    pub client_id: String,
}

/// A member's watermarks in one conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Marks {
    /// The member.
    pub user: String,
    /// Some device of `user` has every message up to this seq.
    pub delivered: u64,
    /// `user` has read up to this seq; never above `delivered`.
    pub read: u64,
}

/// One conversation of a user, as listed by [`MessageStore::user_conversations`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvSummary {
    /// Conversation id.
    pub conv: String,
    /// The conversation's latest stored seq the user can see (0 if it has
    /// only receipts so far; at most `left`).
    pub latest: u64,
    /// The user's index position for the conversation: the highest
    /// `CHAT_MSGS` stream sequence of a change applied to it (frozen at the
    /// user's removal from a group).
    pub pos: u64,
    /// The group's name and current member count (empty and 0 for one-to-one
    /// conversations).
    pub name: String,
    pub member_count: u64,
    /// Group membership of the user: the seq it joined at (1 for one-to-one
    /// conversations), the seq it left at, and whether it is an admin.
    pub joined: u64,
    pub left: Option<u64>,
    pub admin: bool,
}

/// One page of a user's conversations, ascending by conversation id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserConversations {
    /// The applied watermark ([`MessageStore::applied_stream_seq`]) as of the
    /// read that produced this page: usable as the `since` of the next sync.
    pub applied: u64,
    /// The conversations of the page, ascending by conversation id.
    pub convs: Vec<ConvSummary>,
    /// Further conversations match after the last one of this page.
    pub more: bool,
}

impl UserConversations {
    /// The `from_conv` that continues after this page (`None` when there is
    /// no more): the smallest id sorting after the page's last conversation,
    /// since `from_conv` is inclusive. It is a cursor for the store, not a
    /// valid conversation id.
    pub fn next_from(&self) -> Option<String> {
        match self.convs.last() {
            Some(last) if self.more => Some(format!("{}\0", last.conv)),
            _ => None,
        }
    }
}

/// Which page of a conversation to read.
///
/// `limit` is clamped to `1..=`[`MAX_PAGE_LIMIT`] (a limit of 0 is treated as 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageQuery {
    /// The newest `limit` messages with `seq < before` (`before = None`: the
    /// newest messages of the conversation), returned in ascending seq order.
    Before { before: Option<u64>, limit: u32 },
    /// The oldest `limit` messages with `seq > after`, in ascending seq order.
    After { after: u64, limit: u32 },
}

impl PageQuery {
    /// The limit actually applied: clamped to `1..=`[`MAX_PAGE_LIMIT`].
    pub fn effective_limit(&self) -> u32 {
        let limit = match *self {
            PageQuery::Before { limit, .. } | PageQuery::After { limit, .. } => limit,
        };
        limit.clamp(1, MAX_PAGE_LIMIT)
    }
}

/// One page of a conversation, in ascending seq order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Page {
    /// The messages of the page, ascending by seq.
    pub messages: Vec<StoredMessage>,
    /// There are further messages beyond this page in the direction of the
    /// query (older ones for [`PageQuery::Before`], newer ones for
    /// [`PageQuery::After`]).
    pub more: bool,
}

/// A failed store operation.
///
/// Branch on [`StoreError::kind`], never on the message text.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The store could not be opened (directory or database file).
    #[error("cannot open message store at {}", path.display())]
    Open {
        /// The directory or file that could not be opened.
        path: PathBuf,
        #[source]
        source: redb::Error,
    },
    /// The storage backend failed while performing `op`.
    #[error("message store backend failed to {op}")]
    Backend {
        /// What the store was doing, e.g. "commit apply".
        op: &'static str,
        #[source]
        source: redb::Error,
    },
    /// A stored record could not be decoded.
    #[error("stored message {conv}/{seq} is corrupt: {reason}")]
    Corrupt {
        conv: String,
        seq: u64,
        reason: String,
    },
    /// A different message is already stored at `(conv, seq)`. Nothing of the
    /// batch that hit the conflict was written.
    #[error("a different message is already stored at {conv}/{seq}")]
    Conflict { conv: String, seq: u64 },
    /// The caller passed a message the store cannot accept (e.g. seq 0).
    /// Nothing of the batch was written.
    #[error("invalid message {conv}/{seq}: {reason}")]
    Invalid {
        conv: String,
        seq: u64,
        reason: &'static str,
    },
    /// The caller passed a receipt the store cannot accept (e.g. stream seq
    /// 0, which would never move a sync position). Nothing of the batch was
    /// written.
    #[error("invalid receipt of {user:?} in {conv:?}: {reason}")]
    InvalidReceipt {
        conv: String,
        user: String,
        reason: &'static str,
    },
    /// The blocking worker running a store operation panicked or was cancelled.
    #[error("message store worker failed to {op}")]
    Worker {
        op: &'static str,
        #[source]
        source: tokio::task::JoinError,
    },
    /// The Cassandra / ScyllaDB backend could not reach the cluster, or a setting is
    /// unusable (the source says which).
    #[error("cannot connect the message store to {contact_points}")]
    Connect {
        /// The configured contact points, comma-separated.
        contact_points: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The keyspace does not have the schema this build needs (`have`: the recorded version,
    /// `None` if there is no schema at all): run `sequencer migrate-store`.
    #[error(
        "keyspace {keyspace} has message store schema version {have:?}, this build needs {want}: \
         run `sequencer migrate-store`"
    )]
    Schema {
        keyspace: String,
        have: Option<i32>,
        want: i32,
    },
    /// A Cassandra / ScyllaDB request failed while performing `op` (a timeout, an unavailable
    /// replica, a lost connection: may be transient). Part of an `apply` may have been written,
    /// all of it correct; applying the batch again completes it.
    #[error("message store cluster failed to {op}")]
    Cassandra {
        /// What the store was doing, e.g. "write batch".
        op: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// The category of a [`StoreError`], for callers to branch on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StoreErrorKind {
    /// [`StoreError::Open`], [`StoreError::Connect`], [`StoreError::Schema`]: the store could
    /// not be opened.
    Open,
    /// [`StoreError::Backend`], [`StoreError::Cassandra`]: I/O or backend failure; may be
    /// transient.
    Backend,
    /// [`StoreError::Corrupt`]: a stored record is undecodable.
    Corrupt,
    /// [`StoreError::Conflict`]: a different message occupies `(conv, seq)`.
    Conflict,
    /// [`StoreError::Invalid`], [`StoreError::InvalidReceipt`]: the caller
    /// passed an unacceptable message or receipt.
    Invalid,
    /// [`StoreError::Worker`]: internal failure (panic) of the store itself.
    Internal,
}

impl StoreError {
    /// The category of this error.
    pub fn kind(&self) -> StoreErrorKind {
        match self {
            StoreError::Open { .. } | StoreError::Connect { .. } | StoreError::Schema { .. } => {
                StoreErrorKind::Open
            }
            StoreError::Backend { .. } | StoreError::Cassandra { .. } => StoreErrorKind::Backend,
            StoreError::Corrupt { .. } => StoreErrorKind::Corrupt,
            StoreError::Conflict { .. } => StoreErrorKind::Conflict,
            StoreError::Invalid { .. } | StoreError::InvalidReceipt { .. } => {
                StoreErrorKind::Invalid
            }
            StoreError::Worker { .. } => StoreErrorKind::Internal,
        }
    }
}

/// Persistence of stamped messages, watermarks and the per-user conversation
/// index. Implemented by every storage backend.
///
/// All methods are cancel-safe in the sense that dropping the returned future
/// never leaves a partially applied `apply`: a batch is either fully stored
/// or not at all (though a dropped `apply` may still complete in the
/// background).
pub trait MessageStore: Send + Sync + 'static {
    /// Applies `changes`: when this returns `Ok`, the whole batch survives a
    /// crash. A refused batch ([`StoreError::Conflict`], [`StoreError::Invalid`],
    /// [`StoreError::InvalidReceipt`]) writes nothing. On a backend failure the
    /// embedded store has written nothing either (one transaction); the
    /// Cassandra store, which has no transaction across partitions, may have
    /// written part of the batch, every row of it correct (a message is stored
    /// whole or not at all), and has not raised the applied watermark: applying
    /// the same batch again completes it. Either way, re-applying converges.
    ///
    /// For [`Event::Message`] `m`:
    /// - stores `m` at `(m.conv, m.seq)`. Idempotent: re-putting an identical
    ///   message is `Ok`; a different one at an occupied `(conv, seq)` is
    ///   [`StoreError::Conflict`]. Seq 0 is [`StoreError::Invalid`];
    /// - records the client id `(conv, from, client_id) -> seq` (the first
    ///   seq recorded for a client id is kept) and the conversation's latest
    ///   seq (never lowered);
    /// - raises the sender's watermarks in `m.conv`, delivered and read, to
    ///   `m.seq`: sending implies having read everything before.
    ///
    /// For [`Event::Receipt`] `r`: the watermarks of `(r.conv, r.user)`
    /// become `delivered = max(old, r.delivered, r.read)` and
    /// `read = max(old, r.read)`. Read implies delivered, and watermarks never
    /// go down, so receipts applied in any order, or twice, end in the same
    /// state. A receipt with stream seq 0, an empty conv or an empty user is
    /// [`StoreError::InvalidReceipt`].
    ///
    /// For either, each user in `members` gets its index entry for the
    /// event's conversation raised to the event's stream seq (see
    /// [`MessageStore::user_conversations`]), and the conversation's position
    /// ([`ConvMeta::pos`]) is raised to it.
    ///
    /// A message's [`GroupChange`]s are applied when the message is stored
    /// for the first time, in batch order; they change the members, the
    /// member count and the name, and start (`Join`) or freeze (`Leave`) the
    /// members' index entries.
    ///
    /// `through`: if `Some(n)`, raises the applied watermark to `n` in the
    /// same transaction (never lowered): every `CHAT_MSGS` message up to
    /// stream seq `n` is now stored. The store writer, which reads
    /// `CHAT_MSGS` in order, passes it; a writer that writes out of stream
    /// order passes `None`, so that the watermark never claims what was not
    /// applied. Empty `changes` with `Some` still raises the watermark; empty
    /// with `None` is a no-op.
    fn apply(
        &self,
        changes: Vec<Change>,
        through: Option<u64>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Every member with recorded watermarks in `conv` (by a receipt or by
    /// sending), sorted by user id; users never recorded are absent, and an
    /// unknown conversation is empty.
    fn watermarks(&self, conv: &str)
    -> impl Future<Output = Result<Vec<Marks>, StoreError>> + Send;

    /// One user's group membership in `conv` (current or former), or `None`
    /// if it never was a member (or `conv` is a one-to-one conversation).
    fn member(
        &self,
        conv: &str,
        user: &str,
    ) -> impl Future<Output = Result<Option<Member>, StoreError>> + Send;

    /// Every current and former member of group `conv`, sorted by user id.
    fn members(&self, conv: &str) -> impl Future<Output = Result<Vec<Member>, StoreError>> + Send;

    /// The name, member count and position of `conv`; `None` if nothing of it
    /// was ever applied.
    fn conversation(
        &self,
        conv: &str,
    ) -> impl Future<Output = Result<Option<ConvMeta>, StoreError>> + Send;

    /// The conversations of `user` whose index position is `> since`,
    /// ascending by conversation id, starting at `from_conv` (inclusive) when
    /// given: at most `limit` of them (clamped to `1..=`[`MAX_PAGE_LIMIT`]),
    /// with `more` when further ones match ([`UserConversations::next_from`]
    /// continues after the page).
    ///
    /// `applied` is the applied watermark read in the same snapshot, before
    /// the scan: a caller using it as the next `since` never misses a change,
    /// because every change up to it is already in the index.
    ///
    /// Cost: the embedded store scans the user's index entries from
    /// `from_conv` on, until `limit + 1` match, i.e. up to all of the user's
    /// conversations per call when few changed since `since`. The Cassandra
    /// store reads, for `since > 0`, only the entries that changed after
    /// `since` (one partition ordered by position, plus one row per group the
    /// user is in); for `since = 0`, the user's entries from `from_conv` on.
    fn user_conversations(
        &self,
        user: &str,
        since: u64,
        from_conv: Option<&str>,
        limit: u32,
    ) -> impl Future<Output = Result<UserConversations, StoreError>> + Send;

    /// Reads one page of a conversation (see [`PageQuery`]). An unknown
    /// conversation is an empty page with `more = false`.
    fn page(
        &self,
        conv: &str,
        q: PageQuery,
    ) -> impl Future<Output = Result<Page, StoreError>> + Send;

    /// Latest stored seq of a conversation (`None` if none).
    fn latest_seq(
        &self,
        conv: &str,
    ) -> impl Future<Output = Result<Option<u64>, StoreError>> + Send;

    /// The seq a sender's client message id got in this conversation, if
    /// stored (dedupe beyond the broker's window).
    fn seq_for_client_id(
        &self,
        conv: &str,
        from: &str,
        client_id: &str,
    ) -> impl Future<Output = Result<Option<u64>, StoreError>> + Send {
        let key = ClientKey {
            conv: conv.to_owned(),
            from: from.to_owned(),
            client_id: client_id.to_owned(),
        };
        async move { Ok(self.seqs_for_client_ids(vec![key]).await?.pop().flatten()) }
    }

    /// [`MessageStore::seq_for_client_id`] of many keys at once (one read
    /// for a batch of inbound messages), in the order given.
    fn seqs_for_client_ids(
        &self,
        keys: Vec<ClientKey>,
    ) -> impl Future<Output = Result<Vec<Option<u64>>, StoreError>> + Send;

    /// Highest `CHAT_MSGS` stream sequence applied to this store (0 if none):
    /// a follower resumes after it.
    fn applied_stream_seq(&self) -> impl Future<Output = Result<u64, StoreError>> + Send;
}

/// Rejects what no backend stores (seq 0, unusable receipts), before anything is written.
pub(crate) fn validate_changes(changes: &[Change]) -> Result<(), StoreError> {
    for change in changes {
        match &change.event {
            Event::Message(m) if m.seq == 0 => {
                return Err(StoreError::Invalid {
                    conv: m.conv.clone(),
                    seq: m.seq,
                    reason: "seq must be at least 1",
                });
            }
            Event::Message(_) => {}
            Event::Receipt(r) => {
                let reason = if r.conv.is_empty() {
                    "conv must not be empty"
                } else if r.user.is_empty() {
                    "user must not be empty"
                } else if r.stream_seq == 0 {
                    "stream seq must be at least 1"
                } else {
                    continue;
                };
                return Err(StoreError::InvalidReceipt {
                    conv: r.conv.clone(),
                    user: r.user.clone(),
                    reason,
                });
            }
        }
    }
    Ok(())
}
