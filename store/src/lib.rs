//! Persistence of stamped chat messages.
//!
//! The sequencer stamps every accepted message with a dense per-conversation
//! sequence number (`seq`, starting at 1) and publishes it to the `CHAT_MSGS`
//! JetStream stream; this crate is where those stamped messages are stored so
//! that clients can page through history long after the broker has dropped
//! them, and so that the sequencer can deduplicate client message ids beyond
//! the broker's dedupe window.
//!
//! Callers program against the [`MessageStore`] trait. There is one backend
//! today, [`EmbeddedStore`], a single-node store in an embedded
//! [redb](https://docs.rs/redb) file with durable (fsync'd) commits. A
//! Cassandra backend is planned behind the same trait; the backend-independent
//! behaviour is pinned down by the test suite in [`conformance`], which every
//! backend must pass.
//!
//! The store does not validate ids (the caller has already checked that they
//! are ASCII `[A-Za-z0-9_~-]`) and never interprets message bodies.

use std::future::Future;
use std::path::PathBuf;

mod embedded;

#[doc(hidden)]
pub mod conformance;

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
        /// What the store was doing, e.g. "commit append".
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
    /// The blocking worker running a store operation panicked or was cancelled.
    #[error("message store worker failed to {op}")]
    Worker {
        op: &'static str,
        #[source]
        source: tokio::task::JoinError,
    },
}

/// The category of a [`StoreError`], for callers to branch on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StoreErrorKind {
    /// [`StoreError::Open`]: the store could not be opened.
    Open,
    /// [`StoreError::Backend`]: I/O or backend failure; may be transient.
    Backend,
    /// [`StoreError::Corrupt`]: a stored record is undecodable.
    Corrupt,
    /// [`StoreError::Conflict`]: a different message occupies `(conv, seq)`.
    Conflict,
    /// [`StoreError::Invalid`]: the caller passed an unacceptable message.
    Invalid,
    /// [`StoreError::Worker`]: internal failure (panic) of the store itself.
    Internal,
}

impl StoreError {
    /// The category of this error.
    pub fn kind(&self) -> StoreErrorKind {
        match self {
            StoreError::Open { .. } => StoreErrorKind::Open,
            StoreError::Backend { .. } => StoreErrorKind::Backend,
            StoreError::Corrupt { .. } => StoreErrorKind::Corrupt,
            StoreError::Conflict { .. } => StoreErrorKind::Conflict,
            StoreError::Invalid { .. } => StoreErrorKind::Invalid,
            StoreError::Worker { .. } => StoreErrorKind::Internal,
        }
    }
}

/// Persistence of stamped messages. Implemented by every storage backend.
///
/// All methods are cancel-safe in the sense that dropping the returned future
/// never leaves a partially applied `append`: a batch is either fully stored
/// or not at all (though a dropped `append` may still complete in the
/// background).
pub trait MessageStore: Send + Sync + 'static {
    /// Stores messages in one durable transaction: when this returns `Ok`,
    /// the batch survives a crash.
    ///
    /// Idempotent: re-putting an identical message at the same `(conv, seq)`
    /// is `Ok`; a different one at an occupied `(conv, seq)` is
    /// [`StoreError::Conflict`] and nothing of the batch is written. A message
    /// with seq 0 is [`StoreError::Invalid`] (nothing written). Also records
    /// the client-id index `(conv, from, client_id) -> seq` (the first seq
    /// recorded for a client id is kept), the per-conversation latest seq
    /// (never lowered). It does not move the applied watermark: a writer
    /// that stores messages out of stream order (the stamper) must not make
    /// a follower skip what it has not applied yet. An empty batch is a
    /// no-op.
    fn append(
        &self,
        msgs: Vec<StoredMessage>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Like [`MessageStore::append`], in the same transaction raising the
    /// applied watermark to `through` (never lowered): every `CHAT_MSGS`
    /// message up to stream sequence `through` is now stored. Used by the
    /// follower, which reads the stream in order.
    fn append_followed(
        &self,
        msgs: Vec<StoredMessage>,
        through: u64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

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
    ) -> impl Future<Output = Result<Option<u64>, StoreError>> + Send;

    /// Highest `CHAT_MSGS` stream sequence applied to this store (0 if none):
    /// a follower resumes after it.
    fn applied_stream_seq(&self) -> impl Future<Output = Result<u64, StoreError>> + Send;
}
