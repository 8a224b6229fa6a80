//! Upload records and storage use, in the JetStream key-value bucket `CHAT_MEDIA` (stream
//! `KV_CHAT_MEDIA`, declared in `nats/streams/`), so every replica sees the same state and admins
//! can read it (`nats kv get CHAT_MEDIA m.<media id>`).
//!
//! - `m.<media id>`: a [`MediaRecord`] (JSON).
//! - `p.<media id>`: empty, while no message references the upload: what the orphan cleanup
//!   lists (only these keys, however many referenced uploads there are).
//! - `q.<user>`: the bytes the user holds ([`Usage`], JSON).
//!
//! Every change of a record is a compare-and-set on its revision, so two replicas (or a
//! verification racing the orphan cleanup) never both win.

use std::time::Duration;

use async_nats::jetstream::{
    self,
    kv::{self, CreateErrorKind, Operation, UpdateErrorKind},
};
use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// What happened to an upload so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Upload URLs were issued; the bytes may or may not be in the object store yet.
    Pending,
    /// A multipart upload was completed: the object is in the store.
    Uploaded,
    /// A message references it: it is never cleaned up as an orphan.
    Referenced,
    /// The orphan cleanup is deleting it.
    Deleting,
}

/// A multipart upload in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Multipart {
    pub upload_id: String,
    pub part_size: u64,
    pub parts: u32,
}

/// The message that first referenced an upload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reference {
    /// The message's client message id (its sender is the uploader, its conversation `conv`).
    pub id: String,
    pub at_ms: u64,
}

/// One upload, `m.<id>` in the bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MediaRecord {
    pub id: String,
    /// The user who requested the upload.
    pub uploader: String,
    /// The conversation it was uploaded for: only its members may download it.
    pub conv: String,
    pub size: u64,
    pub content_type: String,
    pub state: State,
    /// When the upload was requested, ms since the epoch.
    pub created_ms: u64,
    /// The object key: built from the media id alone, never from user input.
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multipart: Option<Multipart>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub referenced_by: Option<Reference>,
}

/// The bytes a user holds, `q.<user>` in the bucket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub bytes: u64,
}

/// Why a bucket operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// Someone else changed the value since it was read (compare-and-set lost).
    #[error("changed concurrently")]
    Conflict,
    #[error("kv {op}: {message}")]
    Kv { op: &'static str, message: String },
    #[error("kv {op} timed out")]
    TimedOut { op: &'static str },
    #[error("corrupt value at {key}: {message}")]
    Corrupt { key: String, message: String },
}

/// The object key of a media id.
pub fn object_key(id: &str) -> String {
    format!("media/{id}")
}

fn record_key(id: &str) -> String {
    format!("m.{id}")
}

fn usage_key(user: &str) -> String {
    format!("q.{user}")
}

fn pending_key(id: &str) -> String {
    format!("p.{id}")
}

/// How many times a compare-and-set is retried against concurrent writers.
const CAS_RETRIES: usize = 16;

/// The bucket, with a deadline on every operation.
#[derive(Clone)]
pub struct Records {
    kv: kv::Store,
    client: async_nats::Client,
    timeout: Duration,
}

impl Records {
    /// Opens the provisioned bucket (`chat admin provision` creates it).
    pub async fn open(
        client: &async_nats::Client,
        js: &jetstream::Context,
        timeout: Duration,
    ) -> Result<Self, RecordError> {
        let bucket = chat_protocol::subjects::MEDIA_BUCKET;
        let kv = tokio::time::timeout(timeout, js.get_key_value(bucket))
            .await
            .map_err(|_| RecordError::TimedOut { op: "open" })?
            .map_err(|e| RecordError::Kv {
                op: "open",
                message: e.to_string(),
            })?;
        Ok(Self {
            kv,
            client: client.clone(),
            timeout,
        })
    }

    async fn bounded<T, E: std::fmt::Display>(
        &self,
        op: &'static str,
        work: impl Future<Output = Result<T, E>>,
    ) -> Result<T, RecordError> {
        tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| RecordError::TimedOut { op })?
            .map_err(|e| RecordError::Kv {
                op,
                message: e.to_string(),
            })
    }

    async fn entry<T: for<'de> Deserialize<'de>>(
        &self,
        key: String,
    ) -> Result<Option<(T, u64)>, RecordError> {
        let entry = self.bounded("get", self.kv.entry(key.clone())).await?;
        match entry {
            Some(e) if e.operation == Operation::Put => {
                let value =
                    serde_json::from_slice(&e.value).map_err(|err| RecordError::Corrupt {
                        key,
                        message: err.to_string(),
                    })?;
                Ok(Some((value, e.revision)))
            }
            _ => Ok(None),
        }
    }

    /// The record of `id` and its revision.
    pub async fn get(&self, id: &str) -> Result<Option<(MediaRecord, u64)>, RecordError> {
        self.entry(record_key(id)).await
    }

    /// Stores a new record; `Conflict` if the id exists.
    pub async fn create(&self, record: &MediaRecord) -> Result<u64, RecordError> {
        let value = Bytes::from(serde_json::to_vec(record).expect("records encode"));
        match tokio::time::timeout(self.timeout, self.kv.create(record_key(&record.id), value))
            .await
        {
            Err(_) => Err(RecordError::TimedOut { op: "create" }),
            Ok(Ok(revision)) => Ok(revision),
            Ok(Err(e)) if e.kind() == CreateErrorKind::AlreadyExists => Err(RecordError::Conflict),
            Ok(Err(e)) => Err(RecordError::Kv {
                op: "create",
                message: e.to_string(),
            }),
        }
    }

    /// Replaces the record if it is still at `revision`; `Conflict` otherwise.
    pub async fn update(&self, record: &MediaRecord, revision: u64) -> Result<u64, RecordError> {
        self.update_key(record_key(&record.id), record, revision)
            .await
    }

    async fn update_key<T: Serialize>(
        &self,
        key: String,
        value: &T,
        revision: u64,
    ) -> Result<u64, RecordError> {
        let value = Bytes::from(serde_json::to_vec(value).expect("values encode"));
        match tokio::time::timeout(self.timeout, self.kv.update(key, value, revision)).await {
            Err(_) => Err(RecordError::TimedOut { op: "update" }),
            Ok(Ok(revision)) => Ok(revision),
            Ok(Err(e)) if e.kind() == UpdateErrorKind::WrongLastRevision => {
                Err(RecordError::Conflict)
            }
            Ok(Err(e)) => Err(RecordError::Kv {
                op: "update",
                message: e.to_string(),
            }),
        }
    }

    /// Removes the record if it is still at `revision`.
    pub async fn remove(&self, id: &str, revision: u64) -> Result<(), RecordError> {
        match tokio::time::timeout(
            self.timeout,
            self.kv
                .purge_expect_revision(record_key(id), Some(revision)),
        )
        .await
        {
            Err(_) => Err(RecordError::TimedOut { op: "remove" }),
            Ok(Ok(())) => Ok(()),
            // The server refuses a stale expected revision: someone changed it meanwhile.
            Ok(Err(e)) if e.to_string().contains("wrong last sequence") => {
                Err(RecordError::Conflict)
            }
            Ok(Err(e)) => Err(RecordError::Kv {
                op: "remove",
                message: e.to_string(),
            }),
        }
    }

    /// Marks `id` as not referenced by any message (before its record is stored).
    pub async fn mark_pending(&self, id: &str) -> Result<(), RecordError> {
        self.bounded("put", self.kv.put(pending_key(id), Bytes::new()))
            .await
            .map(drop)
    }

    /// Removes the mark of `id` (it is referenced, or gone).
    pub async fn unmark(&self, id: &str) -> Result<(), RecordError> {
        self.bounded("purge", self.kv.purge(pending_key(id))).await
    }

    /// The marked ids (the orphan cleanup's candidates) and when each mark was written, ms since
    /// the epoch. Reads only the `p.` keys, headers only.
    pub async fn pending(&self) -> Result<Vec<(String, u64)>, RecordError> {
        use jetstream::consumer::{DeliverPolicy, ReplayPolicy, push::OrderedConfig};
        let kv_err = |message: String| RecordError::Kv {
            op: "list pending",
            message,
        };
        let prefix = format!("{}p.", self.kv.prefix);
        let work = async {
            let consumer = self
                .kv
                .stream
                .create_consumer(OrderedConfig {
                    deliver_subject: self.client.new_inbox(),
                    description: Some("media orphan cleanup".into()),
                    filter_subject: format!("{prefix}>"),
                    headers_only: true,
                    deliver_policy: DeliverPolicy::LastPerSubject,
                    replay_policy: ReplayPolicy::Instant,
                    ..Default::default()
                })
                .await
                .map_err(|e| kv_err(e.to_string()))?;
            let mut marked = Vec::new();
            if consumer.cached_info().num_pending == 0 {
                return Ok(marked);
            }
            let mut messages = consumer
                .messages()
                .await
                .map_err(|e| kv_err(e.to_string()))?;
            while let Some(message) = messages.next().await {
                let message = message.map_err(|e| kv_err(e.to_string()))?;
                let info = message.info().map_err(|e| kv_err(e.to_string()))?;
                let removed = message
                    .headers
                    .as_ref()
                    .is_some_and(|h| h.get("KV-Operation").is_some());
                if let Some(id) = message.subject.strip_prefix(prefix.as_str())
                    && !removed
                {
                    let at_ms = info.published.unix_timestamp_nanos() / 1_000_000;
                    marked.push((id.to_owned(), u64::try_from(at_ms).unwrap_or(0)));
                }
                if info.pending == 0 {
                    break;
                }
            }
            Ok(marked)
        };
        tokio::time::timeout(self.timeout.max(Duration::from_secs(30)), work)
            .await
            .map_err(|_| RecordError::TimedOut { op: "list pending" })?
    }

    /// The bytes `user` holds.
    pub async fn usage(&self, user: &str) -> Result<Usage, RecordError> {
        Ok(self
            .entry::<Usage>(usage_key(user))
            .await?
            .map(|(u, _)| u)
            .unwrap_or_default())
    }

    /// Adds `bytes` to `user`'s use unless that would exceed `quota`; `Err(Ok(used))` then.
    pub async fn reserve(
        &self,
        user: &str,
        bytes: u64,
        quota: u64,
    ) -> Result<Result<(), u64>, RecordError> {
        self.change_usage(user, |used| {
            let new = used.saturating_add(bytes);
            if new > quota { Err(used) } else { Ok(new) }
        })
        .await
    }

    /// Gives `bytes` of `user`'s use back (an upload was deleted).
    pub async fn release(&self, user: &str, bytes: u64) -> Result<(), RecordError> {
        self.change_usage(user, |used| Ok::<_, ()>(used.saturating_sub(bytes)))
            .await
            .map(|_| ())
    }

    async fn change_usage<E>(
        &self,
        user: &str,
        change: impl Fn(u64) -> Result<u64, E>,
    ) -> Result<Result<(), E>, RecordError> {
        let key = usage_key(user);
        for _ in 0..CAS_RETRIES {
            let current = self.entry::<Usage>(key.clone()).await?;
            let used = current.map_or(0, |(u, _)| u.bytes);
            let bytes = match change(used) {
                Ok(bytes) => bytes,
                Err(e) => return Ok(Err(e)),
            };
            let value = Usage { bytes };
            let written = match current {
                Some((_, revision)) => self.update_key(key.clone(), &value, revision).await,
                None => {
                    let raw = Bytes::from(serde_json::to_vec(&value).expect("usage encodes"));
                    match tokio::time::timeout(self.timeout, self.kv.create(key.clone(), raw)).await
                    {
                        Err(_) => Err(RecordError::TimedOut { op: "create" }),
                        Ok(Ok(rev)) => Ok(rev),
                        Ok(Err(e)) if e.kind() == CreateErrorKind::AlreadyExists => {
                            Err(RecordError::Conflict)
                        }
                        Ok(Err(e)) => Err(RecordError::Kv {
                            op: "create",
                            message: e.to_string(),
                        }),
                    }
                }
            };
            match written {
                Ok(_) => return Ok(Ok(())),
                Err(RecordError::Conflict) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(RecordError::Conflict)
    }
}
