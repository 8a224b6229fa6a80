//! Settings of the Cassandra / ScyllaDB backend, their validation, and the driver session built
//! from them.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Connection and behaviour of the Cassandra / ScyllaDB store (the `[cassandra]` table of a
/// service's config). Every field has a default; see `store/README.md` for the table.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct CassandraConfig {
    /// `host:port` of some nodes; the driver discovers the rest of the cluster.
    pub contact_points: Vec<String>,
    /// Keyspace of the store's tables (created by the migration).
    pub keyspace: String,
    /// Prefer the nodes of this datacenter (empty: no preference). Set it with `LOCAL_*`
    /// consistencies in a multi-datacenter cluster.
    pub local_datacenter: String,
    /// Replication of the keyspace, used when the migration creates it.
    pub replication: Replication,
    /// Consistency of every write (messages, indexes, watermarks).
    pub write_consistency: Consistency,
    /// Consistency of every read.
    pub read_consistency: Consistency,
    /// User name for password authentication (empty: no authentication).
    pub username: String,
    /// Name of the environment variable holding the password (never the password itself, so
    /// config files and logs never carry it).
    pub password_env: String,
    /// TLS to the nodes.
    pub tls: TlsConfig,
    /// Deadline of one request, retries included.
    pub request_timeout_ms: u64,
    /// Deadline of opening a connection.
    pub connect_timeout_ms: u64,
    /// Requests one `apply` or read keeps in flight at most.
    pub max_concurrent_requests: usize,
    /// Largest unlogged batch (estimated bytes of values); larger partition writes are split.
    /// Keep it under the server's `batch_size_fail_threshold` (Cassandra: 50 KiB by default).
    pub max_batch_bytes: usize,
    /// `(user, conversation)` index positions remembered between batches, so moving an entry
    /// needs no read of its previous position; 0 disables the cache.
    pub position_cache_max: usize,
}

impl Default for CassandraConfig {
    fn default() -> Self {
        Self {
            contact_points: vec!["127.0.0.1:9042".into()],
            keyspace: "chat".into(),
            local_datacenter: String::new(),
            replication: Replication::default(),
            write_consistency: Consistency::LocalQuorum,
            read_consistency: Consistency::LocalQuorum,
            username: String::new(),
            password_env: "CHAT_CASSANDRA_PASSWORD".into(),
            tls: TlsConfig::default(),
            request_timeout_ms: 5_000,
            connect_timeout_ms: 5_000,
            max_concurrent_requests: 64,
            max_batch_bytes: 32 * 1024,
            position_cache_max: 200_000,
        }
    }
}

impl std::fmt::Debug for CassandraConfig {
    // Written out so that a future secret field cannot slip into logs by derive.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CassandraConfig")
            .field("contact_points", &self.contact_points)
            .field("keyspace", &self.keyspace)
            .field("local_datacenter", &self.local_datacenter)
            .field("replication", &self.replication)
            .field("write_consistency", &self.write_consistency)
            .field("read_consistency", &self.read_consistency)
            .field("username", &self.username)
            .field("password_env", &self.password_env)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

/// How the keyspace is replicated.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Replication {
    /// `SimpleStrategy` (one datacenter, tests) or `NetworkTopologyStrategy` (production).
    pub class: String,
    /// Replicas, for `SimpleStrategy`.
    pub replication_factor: u32,
    /// Replicas per datacenter, for `NetworkTopologyStrategy`.
    pub datacenters: BTreeMap<String, u32>,
}

impl Default for Replication {
    fn default() -> Self {
        Self {
            class: "SimpleStrategy".into(),
            replication_factor: 1,
            datacenters: BTreeMap::new(),
        }
    }
}

/// A CQL consistency level, spelled as in CQL (`"LOCAL_QUORUM"`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Consistency {
    Any,
    One,
    Two,
    Three,
    Quorum,
    All,
    LocalQuorum,
    EachQuorum,
    LocalOne,
}

impl Consistency {
    pub(crate) fn to_driver(self) -> scylla::statement::Consistency {
        use scylla::statement::Consistency as C;
        match self {
            Consistency::Any => C::Any,
            Consistency::One => C::One,
            Consistency::Two => C::Two,
            Consistency::Three => C::Three,
            Consistency::Quorum => C::Quorum,
            Consistency::All => C::All,
            Consistency::LocalQuorum => C::LocalQuorum,
            Consistency::EachQuorum => C::EachQuorum,
            Consistency::LocalOne => C::LocalOne,
        }
    }
}

/// TLS to the nodes (rustls). The driver checks each node's certificate against the node's IP
/// address, so node certificates need their addresses as subject alternative names.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    pub enabled: bool,
    /// PEM file of the certificate authorities that sign the nodes' certificates (required
    /// with `enabled`).
    pub ca_file: Option<PathBuf>,
    /// PEM certificate chain and private key of this client, for clusters that require client
    /// certificates (both or neither).
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

/// A setting that cannot work, found before connecting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cassandra setting `{field}`: {reason}")]
pub struct ConfigError {
    pub field: &'static str,
    pub reason: String,
}

fn bad(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        field,
        reason: reason.into(),
    }
}

/// Whether `name` is a CQL identifier that needs no quoting (keyspace and datacenter names are
/// spliced into statements, so nothing else is accepted).
pub fn is_plain_identifier(name: &str, max: usize) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.len() <= max
}

impl CassandraConfig {
    /// Checks every setting that can be checked without a server.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.contact_points.is_empty() {
            return Err(bad("contact_points", "at least one host:port is needed"));
        }
        for cp in &self.contact_points {
            let ok = cp
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !ok {
                return Err(bad("contact_points", format!("{cp:?} is not host:port")));
            }
        }
        // Cassandra limits keyspace names to 48 characters.
        if !is_plain_identifier(&self.keyspace, 48) {
            return Err(bad(
                "keyspace",
                "a letter, then letters, digits or `_`, at most 48 characters",
            ));
        }
        self.replication.cql()?;
        if !self.username.is_empty() && self.password_env.is_empty() {
            return Err(bad(
                "password_env",
                "names the variable holding the password of `username`",
            ));
        }
        if self.tls.enabled && self.tls.ca_file.is_none() {
            return Err(bad("tls.ca_file", "required when TLS is enabled"));
        }
        if self.tls.cert_file.is_some() != self.tls.key_file.is_some() {
            return Err(bad(
                "tls.cert_file",
                "a client certificate needs its key (tls.key_file) and the other way round",
            ));
        }
        if self.request_timeout_ms == 0 || self.connect_timeout_ms == 0 {
            return Err(bad("request_timeout_ms", "timeouts must be above 0"));
        }
        if self.max_concurrent_requests == 0 {
            return Err(bad("max_concurrent_requests", "must be at least 1"));
        }
        if self.max_batch_bytes < 1024 {
            return Err(bad("max_batch_bytes", "must be at least 1024"));
        }
        Ok(())
    }

    /// The password, read from the environment variable named by `password_env` (only when a
    /// username is set).
    pub fn password(&self) -> Result<Option<String>, ConfigError> {
        if self.username.is_empty() {
            return Ok(None);
        }
        match std::env::var(&self.password_env) {
            Ok(p) => Ok(Some(p)),
            Err(_) => Err(bad(
                "password_env",
                format!("`{}` is not set (it holds the password)", self.password_env),
            )),
        }
    }

    /// The driver session: contact points, credentials, TLS, consistency, timeouts and the
    /// store's retry policy ([`IdempotentRetryPolicy`](super::retry::IdempotentRetryPolicy):
    /// what may have run is retried only for requests marked idempotent, and all of this
    /// store's reads and writes are).
    pub(crate) async fn connect(
        &self,
    ) -> Result<scylla::client::session::Session, crate::StoreError> {
        use scylla::client::execution_profile::ExecutionProfile;
        use scylla::client::session_builder::SessionBuilder;
        use scylla::policies::load_balancing::DefaultPolicy;

        let open_err =
            |source: Box<dyn std::error::Error + Send + Sync>| crate::StoreError::Connect {
                contact_points: self.contact_points.join(","),
                source,
            };
        self.validate().map_err(|e| open_err(Box::new(e)))?;
        let mut lb = DefaultPolicy::builder().token_aware(true);
        if !self.local_datacenter.is_empty() {
            lb = lb.prefer_datacenter(self.local_datacenter.clone());
        }
        let profile = ExecutionProfile::builder()
            .consistency(self.read_consistency.to_driver())
            .request_timeout(Some(Duration::from_millis(self.request_timeout_ms)))
            .load_balancing_policy(lb.build())
            .retry_policy(Arc::new(super::retry::IdempotentRetryPolicy))
            .build();
        let mut builder = SessionBuilder::new()
            .known_nodes(&self.contact_points)
            .connection_timeout(Duration::from_millis(self.connect_timeout_ms))
            .default_execution_profile_handle(profile.into_handle());
        if let Some(password) = self.password().map_err(|e| open_err(Box::new(e)))? {
            builder = builder.user(self.username.clone(), password);
        }
        if self.tls.enabled {
            let tls = self.rustls().map_err(open_err)?;
            builder = builder.tls_context(Some(tls));
        }
        builder.build().await.map_err(|e| open_err(Box::new(e)))
    }

    fn rustls(
        &self,
    ) -> Result<Arc<rustls::ClientConfig>, Box<dyn std::error::Error + Send + Sync>> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};

        let ca_file = self.tls.ca_file.as_ref().ok_or("tls.ca_file is required")?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca_file)
            .map_err(|e| format!("tls.ca_file {}: {e}", ca_file.display()))?
        {
            roots.add(cert.map_err(|e| format!("tls.ca_file {}: {e}", ca_file.display()))?)?;
        }
        if roots.is_empty() {
            return Err(format!("tls.ca_file {}: no certificate in it", ca_file.display()).into());
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots);
        let config = match (&self.tls.cert_file, &self.tls.key_file) {
            (Some(cert_file), Some(key_file)) => {
                let chain = CertificateDer::pem_file_iter(cert_file)
                    .map_err(|e| format!("tls.cert_file {}: {e}", cert_file.display()))?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| format!("tls.cert_file {}: {e}", cert_file.display()))?;
                let key = PrivateKeyDer::from_pem_file(key_file)
                    .map_err(|e| format!("tls.key_file {}: {e}", key_file.display()))?;
                builder.with_client_auth_cert(chain, key)?
            }
            _ => builder.with_no_client_auth(),
        };
        Ok(Arc::new(config))
    }
}

impl Replication {
    /// The replication map of `CREATE KEYSPACE`, e.g.
    /// `{'class': 'NetworkTopologyStrategy', 'dc1': 3}`.
    pub fn cql(&self) -> Result<String, ConfigError> {
        match self.class.as_str() {
            "SimpleStrategy" => {
                if self.replication_factor == 0 {
                    return Err(bad("replication.replication_factor", "must be at least 1"));
                }
                if !self.datacenters.is_empty() {
                    return Err(bad(
                        "replication.datacenters",
                        "only for NetworkTopologyStrategy",
                    ));
                }
                Ok(format!(
                    "{{'class': 'SimpleStrategy', 'replication_factor': {}}}",
                    self.replication_factor
                ))
            }
            "NetworkTopologyStrategy" => {
                if self.datacenters.is_empty() {
                    return Err(bad(
                        "replication.datacenters",
                        "NetworkTopologyStrategy needs replicas per datacenter, e.g. { dc1 = 3 }",
                    ));
                }
                let mut out = String::from("{'class': 'NetworkTopologyStrategy'");
                for (dc, n) in &self.datacenters {
                    // Datacenter names may carry `-` and `.` (e.g. `us-east-1`); they are
                    // quoted, so only a quote could break out.
                    let ok = !dc.is_empty()
                        && dc
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c));
                    if !ok {
                        return Err(bad(
                            "replication.datacenters",
                            format!("{dc:?} is not a datacenter name"),
                        ));
                    }
                    if *n == 0 {
                        return Err(bad(
                            "replication.datacenters",
                            format!("{dc} needs at least 1 replica"),
                        ));
                    }
                    out.push_str(&format!(", '{dc}': {n}"));
                }
                out.push('}');
                Ok(out)
            }
            other => Err(bad(
                "replication.class",
                format!("{other:?}: SimpleStrategy or NetworkTopologyStrategy"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_local_quorum() {
        let c = CassandraConfig::default();
        c.validate().unwrap();
        assert_eq!(c.write_consistency, Consistency::LocalQuorum);
        assert_eq!(c.read_consistency, Consistency::LocalQuorum);
        assert_eq!(
            c.replication.cql().unwrap(),
            "{'class': 'SimpleStrategy', 'replication_factor': 1}"
        );
    }

    #[test]
    fn settings_parse_from_toml_like_values() {
        let c: CassandraConfig = serde_json::from_value(serde_json::json!({
            "contact_points": ["10.0.0.1:9042", "db.example:9142"],
            "keyspace": "chat_prod",
            "write_consistency": "EACH_QUORUM",
            "read_consistency": "LOCAL_ONE",
            "replication": { "class": "NetworkTopologyStrategy", "datacenters": { "eu-west": 3, "us_east": 2 } },
            "tls": { "enabled": true, "ca_file": "/etc/ca.pem" },
            "username": "chat",
        }))
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.write_consistency, Consistency::EachQuorum);
        assert_eq!(c.read_consistency, Consistency::LocalOne);
        assert_eq!(
            c.replication.cql().unwrap(),
            "{'class': 'NetworkTopologyStrategy', 'eu-west': 3, 'us_east': 2}"
        );
        // Unknown fields are refused, like every service setting.
        let err = serde_json::from_value::<CassandraConfig>(serde_json::json!({"keyspcae": "x"}))
            .unwrap_err();
        assert!(err.to_string().contains("keyspcae"), "{err}");
        let err = serde_json::from_value::<CassandraConfig>(
            serde_json::json!({"read_consistency": "SOMETIMES"}),
        )
        .unwrap_err();
        assert!(err.to_string().contains("SOMETIMES"), "{err}");
    }

    #[test]
    fn unusable_settings_name_their_field() {
        type Spoil = fn(&mut CassandraConfig);
        let cases: Vec<(&str, Spoil)> = vec![
            ("contact_points", |c| c.contact_points.clear()),
            ("contact_points", |c| c.contact_points = vec!["db1".into()]),
            ("contact_points", |c| {
                c.contact_points = vec!["db1:http".into()]
            }),
            ("keyspace", |c| c.keyspace = "chat; DROP KEYSPACE x".into()),
            ("keyspace", |c| c.keyspace = "1chat".into()),
            ("keyspace", |c| c.keyspace = "k".repeat(49)),
            ("replication.class", |c| {
                c.replication.class = "Local".into()
            }),
            ("replication.replication_factor", |c| {
                c.replication.replication_factor = 0
            }),
            ("replication.datacenters", |c| {
                c.replication.class = "NetworkTopologyStrategy".into()
            }),
            ("replication.datacenters", |c| {
                c.replication.class = "NetworkTopologyStrategy".into();
                c.replication.datacenters.insert("dc1'}; --".into(), 3);
            }),
            ("replication.datacenters", |c| {
                c.replication.datacenters.insert("dc1".into(), 3);
            }),
            ("password_env", |c| {
                c.username = "chat".into();
                c.password_env.clear();
            }),
            ("tls.ca_file", |c| c.tls.enabled = true),
            ("tls.cert_file", |c| c.tls.cert_file = Some("/c.pem".into())),
            ("request_timeout_ms", |c| c.request_timeout_ms = 0),
            ("max_concurrent_requests", |c| c.max_concurrent_requests = 0),
            ("max_batch_bytes", |c| c.max_batch_bytes = 10),
        ];
        for (field, spoil) in cases {
            let mut c = CassandraConfig::default();
            spoil(&mut c);
            let err = c.validate().unwrap_err();
            assert_eq!(err.field, field, "{err}");
        }
    }

    #[test]
    fn password_comes_only_from_the_named_variable() {
        let mut c = CassandraConfig::default();
        assert_eq!(c.password().unwrap(), None);
        c.username = "chat".into();
        c.password_env = "CHAT_STORE_TEST_PASSWORD_THAT_IS_NOT_SET".into();
        let err = c.password().unwrap_err();
        assert_eq!(err.field, "password_env");
        assert!(
            err.to_string()
                .contains("CHAT_STORE_TEST_PASSWORD_THAT_IS_NOT_SET")
        );
        // Debug output names the variable, never its value.
        let shown = format!("{c:?}");
        assert!(
            shown.contains("CHAT_STORE_TEST_PASSWORD_THAT_IS_NOT_SET"),
            "{shown}"
        );
    }

    #[test]
    fn consistency_names_are_cql_names() {
        for (name, c) in [
            ("\"LOCAL_QUORUM\"", Consistency::LocalQuorum),
            ("\"QUORUM\"", Consistency::Quorum),
            ("\"LOCAL_ONE\"", Consistency::LocalOne),
            ("\"EACH_QUORUM\"", Consistency::EachQuorum),
        ] {
            assert_eq!(serde_json::to_string(&c).unwrap(), name);
            assert_eq!(serde_json::from_str::<Consistency>(name).unwrap(), c);
        }
    }

    #[test]
    fn tls_without_a_readable_ca_file_is_an_error_not_a_panic() {
        let mut c = CassandraConfig::default();
        c.tls.enabled = true;
        c.tls.ca_file = Some("/nonexistent/ca.pem".into());
        let err = c.rustls().unwrap_err();
        assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        c.tls.ca_file = Some(empty);
        let err = c.rustls().unwrap_err();
        assert!(err.to_string().contains("no certificate"), "{err}");
    }
}
