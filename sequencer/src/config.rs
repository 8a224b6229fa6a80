//! Sequencer settings (`CHAT_SEQUENCER_*` env vars or a TOML file), documented in
//! `sequencer/README.md`.

use std::path::PathBuf;

use chat_store::{Backend, CassandraConfig};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// NATS server URL.
    pub nats_url: String,
    /// How this process authenticates to NATS (`chat_common::nats`).
    pub nats_auth: chat_common::nats::NatsAuth,
    /// TLS to NATS: CA, client certificate (`chat_common::nats::NatsTls`).
    pub nats_tls: chat_common::nats::NatsTls,
    /// Admin endpoint (`/healthz`, `/readyz`, `/metrics`); empty disables it.
    pub admin_listen: String,
    /// Which backend holds the message store: `embedded` (in `store_dir`) or `cassandra`
    /// (the cluster of `[cassandra]`).
    pub store: Backend,
    /// Directory of the embedded message store.
    pub store_dir: PathBuf,
    /// The Cassandra / ScyllaDB cluster, keyspace and options, for `store = "cassandra"`.
    pub cassandra: CassandraConfig,
    /// Partitions this process competes for (default: all). Every partition needs at least one
    /// running sequencer.
    pub partitions: Option<Vec<u32>>,
    /// Share the partitions with the other live sequencers (rendezvous hashing over
    /// heartbeats on `chat.ctl.sequencer.live`); off: compete for every partition, and the
    /// first process to pull owns it.
    pub balance: bool,
    /// How often a sequencer announces itself, and after how long without a heartbeat the
    /// others take over its partitions.
    pub balance_heartbeat_ms: u64,
    pub balance_expire_ms: u64,
    /// Messages asked for per pull request of a partition.
    pub pull_batch: usize,
    /// Payload held in memory (pulled, not yet stamped) above which partitions stop pulling.
    pub max_held_mib: usize,
    /// Conversations whose state (head, watermarks, members) is kept in memory, over all
    /// partitions of this process.
    pub conv_cache_max: usize,
    /// Follow `CHAT_MSGS` into the local store, so that with several sequencer processes every
    /// embedded store holds every conversation (any of them can answer the APIs).
    pub follow_stamped: bool,
    /// Answer history, sync and receipts requests from the local store (needs `follow_stamped`).
    pub serve_api: bool,
    /// How long an API request, or the stamper loading a conversation, waits for the local
    /// store to catch up with the stream.
    pub api_catch_up_ms: u64,
    /// Grace period for in-flight work at shutdown.
    pub shutdown_grace_ms: u64,
    /// Name of this instance, recorded in the `Chat-Stamper` header of what it stamps
    /// (default: host name and process id).
    pub instance_id: String,
    /// Most members a group may have; a `create` or `add` beyond it is refused `group_full`.
    pub group_max_members: u32,
    /// How often the lag of the consumers this process pulls is read and exported
    /// (`chat_common::lag`); 0 disables it.
    pub lag_interval_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            nats_url: "nats://127.0.0.1:4222".into(),
            nats_auth: Default::default(),
            nats_tls: Default::default(),
            admin_listen: "127.0.0.1:9091".into(),
            store: Backend::Embedded,
            store_dir: PathBuf::from(".run/store"),
            cassandra: CassandraConfig::default(),
            partitions: None,
            balance: true,
            balance_heartbeat_ms: 500,
            balance_expire_ms: 1500,
            pull_batch: 256,
            max_held_mib: 64,
            conv_cache_max: 200_000,
            follow_stamped: true,
            serve_api: true,
            api_catch_up_ms: 2000,
            shutdown_grace_ms: 5000,
            instance_id: String::new(),
            group_max_members: chat_protocol::api::GROUP_MAX_MEMBERS_DEFAULT,
            lag_interval_ms: 10_000,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_store_backend_is_chosen_by_configuration() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sequencer.toml");
        std::fs::write(
            &file,
            r#"
store = "cassandra"

[cassandra]
contact_points = ["10.0.0.5:9042", "10.0.0.6:9042"]
keyspace = "chat_prod"
read_consistency = "LOCAL_ONE"

[cassandra.replication]
class = "NetworkTopologyStrategy"
datacenters = { dc1 = 3 }
"#,
        )
        .unwrap();
        let c: Config =
            chat_common::config::load(Some(&file), "CHAT_SEQUENCER_TEST_NONE_").unwrap();
        assert_eq!(c.store, Backend::Cassandra);
        assert_eq!(c.cassandra.keyspace, "chat_prod");
        assert_eq!(c.cassandra.contact_points.len(), 2);
        assert_eq!(
            c.cassandra.write_consistency,
            chat_store::cassandra::Consistency::LocalQuorum
        );
        assert_eq!(
            c.cassandra.read_consistency,
            chat_store::cassandra::Consistency::LocalOne
        );
        c.cassandra.validate().unwrap();
        // The default stays the embedded store in its directory.
        let d = Config::default();
        assert_eq!(d.store, Backend::Embedded);
        assert_eq!(d.store_dir, PathBuf::from(".run/store"));

        std::fs::write(&file, "[cassandra]\nkeyspce = \"x\"\n").unwrap();
        let err = chat_common::config::load::<Config>(Some(&file), "CHAT_SEQUENCER_TEST_NONE_")
            .unwrap_err();
        assert!(err.to_string().contains("keyspce"), "{err}");
    }
}
