//! The backend a service runs with, chosen by configuration: [`AnyStore`] is whichever of the
//! backends was configured, behind the same [`MessageStore`] trait.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{
    Change, ClientKey, ConvMeta, EmbeddedStore, Marks, Member, MessageStore, Page, PageQuery,
    StoreError, UserConversations,
};

#[cfg(feature = "cassandra")]
use crate::{CassandraConfig, CassandraStore};

/// Which backend stores the messages (`store = "embedded"` or `"cassandra"` in a service's
/// config).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// [`EmbeddedStore`] in a local directory: one machine, one process per directory.
    #[default]
    Embedded,
    /// `CassandraStore`: a keyspace of a Cassandra or ScyllaDB cluster, shared by every
    /// process.
    Cassandra,
}

/// The configured backend.
#[derive(Debug, Clone)]
pub enum AnyStore {
    Embedded(EmbeddedStore),
    #[cfg(feature = "cassandra")]
    Cassandra(CassandraStore),
}

impl AnyStore {
    /// Opens the embedded store in `dir` (blocking file I/O runs on the blocking pool).
    pub async fn embedded(dir: &Path) -> Result<Self, StoreError> {
        let dir = dir.to_path_buf();
        let store = tokio::task::spawn_blocking(move || EmbeddedStore::open(dir))
            .await
            .map_err(|source| StoreError::Worker {
                op: "open store",
                source,
            })??;
        Ok(AnyStore::Embedded(store))
    }

    /// Connects to the cluster of `config` (its schema must be migrated).
    #[cfg(feature = "cassandra")]
    pub async fn cassandra(config: &CassandraConfig) -> Result<Self, StoreError> {
        Ok(AnyStore::Cassandra(CassandraStore::open(config).await?))
    }

    /// The backend this store is.
    pub fn backend(&self) -> Backend {
        match self {
            AnyStore::Embedded(_) => Backend::Embedded,
            #[cfg(feature = "cassandra")]
            AnyStore::Cassandra(_) => Backend::Cassandra,
        }
    }
}

macro_rules! each {
    ($self:ident, $s:ident => $e:expr) => {
        match $self {
            AnyStore::Embedded($s) => $e,
            #[cfg(feature = "cassandra")]
            AnyStore::Cassandra($s) => $e,
        }
    };
}

impl MessageStore for AnyStore {
    async fn apply(&self, changes: Vec<Change>, through: Option<u64>) -> Result<(), StoreError> {
        each!(self, s => s.apply(changes, through).await)
    }

    async fn watermarks(&self, conv: &str) -> Result<Vec<Marks>, StoreError> {
        each!(self, s => s.watermarks(conv).await)
    }

    async fn member(&self, conv: &str, user: &str) -> Result<Option<Member>, StoreError> {
        each!(self, s => s.member(conv, user).await)
    }

    async fn members(&self, conv: &str) -> Result<Vec<Member>, StoreError> {
        each!(self, s => s.members(conv).await)
    }

    async fn conversation(&self, conv: &str) -> Result<Option<ConvMeta>, StoreError> {
        each!(self, s => s.conversation(conv).await)
    }

    async fn user_conversations(
        &self,
        user: &str,
        since: u64,
        from_conv: Option<&str>,
        limit: u32,
    ) -> Result<UserConversations, StoreError> {
        each!(self, s => s.user_conversations(user, since, from_conv, limit).await)
    }

    async fn page(&self, conv: &str, q: PageQuery) -> Result<Page, StoreError> {
        each!(self, s => s.page(conv, q).await)
    }

    async fn latest_seq(&self, conv: &str) -> Result<Option<u64>, StoreError> {
        each!(self, s => s.latest_seq(conv).await)
    }

    async fn seq_for_client_id(
        &self,
        conv: &str,
        from: &str,
        client_id: &str,
    ) -> Result<Option<u64>, StoreError> {
        each!(self, s => s.seq_for_client_id(conv, from, client_id).await)
    }

    async fn seqs_for_client_ids(
        &self,
        keys: Vec<ClientKey>,
    ) -> Result<Vec<Option<u64>>, StoreError> {
        each!(self, s => s.seqs_for_client_ids(keys).await)
    }

    async fn applied_stream_seq(&self) -> Result<u64, StoreError> {
        each!(self, s => s.applied_stream_seq().await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_names_are_lowercase() {
        assert_eq!(
            serde_json::to_string(&Backend::Cassandra).unwrap(),
            "\"cassandra\""
        );
        assert_eq!(
            serde_json::from_str::<Backend>("\"embedded\"").unwrap(),
            Backend::Embedded
        );
        assert!(serde_json::from_str::<Backend>("\"redis\"").is_err());
        assert_eq!(Backend::default(), Backend::Embedded);
    }

    #[tokio::test]
    async fn the_embedded_backend_opens_and_stores() {
        let dir = tempfile::tempdir().unwrap();
        let store = AnyStore::embedded(dir.path()).await.unwrap();
        assert_eq!(store.backend(), Backend::Embedded);
        let m = crate::conformance::msg("c1", 1, "alice", "a1", 1);
        store
            .apply(vec![Change::message(m.clone(), vec![])], Some(1))
            .await
            .unwrap();
        assert_eq!(store.latest_seq("c1").await.unwrap(), Some(1));
        assert_eq!(
            store.seq_for_client_id("c1", "alice", "a1").await.unwrap(),
            Some(1)
        );
        assert_eq!(store.applied_stream_seq().await.unwrap(), 1);
    }
}
