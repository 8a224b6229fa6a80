//! The versioned schema (`store/cql/NNNN_name.cql`) and the migration that applies it.
//!
//! [`migrate`] creates the keyspace if needed (with the configured replication), then the
//! `schema_migrations` table, and runs, in version order, every file whose version is not
//! recorded there yet, recording each once all its statements succeeded. Every statement is
//! `CREATE ... IF NOT EXISTS` (checked by a test), so running the migration again, or after it
//! was interrupted, converges. [`CassandraStore::open`](super::CassandraStore::open) refuses a
//! keyspace whose recorded version is older than [`LATEST`].

use scylla::client::session::Session;

use super::config::CassandraConfig;
use crate::StoreError;

/// One schema file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub cql: &'static str,
}

/// Every schema file, in version order.
pub const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "0001_init",
    cql: include_str!("../../cql/0001_init.cql"),
}];

/// The schema version this code reads and writes.
pub const LATEST: i32 = MIGRATIONS[MIGRATIONS.len() - 1].version;

/// Table of the applied versions (in the store's keyspace).
const MIGRATIONS_TABLE: &str = "CREATE TABLE IF NOT EXISTS schema_migrations (\
     version int PRIMARY KEY, name text, applied_at timestamp)";

/// The statements of a schema file: comments (`--` to the end of the line) dropped, split at
/// semicolons that end a line, whitespace collapsed.
pub fn statements(cql: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in cql.lines() {
        let line = match line.find("--") {
            Some(i) => &line[..i],
            None => line,
        };
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let (body, ends) = match line.strip_suffix(';') {
            Some(body) => (body.trim_end(), true),
            None => (line, false),
        };
        if !current.is_empty() && !body.is_empty() {
            current.push(' ');
        }
        current.push_str(body);
        if ends && !current.is_empty() {
            out.push(std::mem::take(&mut current));
        }
    }
    if !current.trim().is_empty() {
        out.push(current);
    }
    out
}

/// `CREATE KEYSPACE IF NOT EXISTS` with the configured replication.
pub fn create_keyspace(config: &CassandraConfig) -> Result<String, StoreError> {
    let replication = config.replication.cql().map_err(|e| StoreError::Connect {
        contact_points: config.contact_points.join(","),
        source: Box::new(e),
    })?;
    Ok(format!(
        "CREATE KEYSPACE IF NOT EXISTS {} WITH replication = {replication}",
        config.keyspace
    ))
}

/// What [`migrate`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrateReport {
    /// Versions recorded before this run.
    pub before: Option<i32>,
    /// Versions this run applied, in order.
    pub applied: Vec<i32>,
}

fn cass(op: &'static str) -> impl FnOnce(Box<dyn std::error::Error + Send + Sync>) -> StoreError {
    move |source| StoreError::Cassandra { op, source }
}

/// Creates or upgrades the schema in `config.keyspace` (idempotent).
pub async fn migrate(config: &CassandraConfig) -> Result<MigrateReport, StoreError> {
    let session = config.connect().await?;
    run_ddl(&session, &create_keyspace(config)?, "create keyspace").await?;
    session
        .use_keyspace(&config.keyspace, false)
        .await
        .map_err(|e| cass("use keyspace")(Box::new(e)))?;
    run_ddl(&session, MIGRATIONS_TABLE, "create schema_migrations").await?;
    let before = recorded_version(&session).await?;
    let mut applied = Vec::new();
    for m in MIGRATIONS {
        if before.is_some_and(|v| v >= m.version) {
            continue;
        }
        for statement in statements(m.cql) {
            run_ddl(&session, &statement, "apply schema migration").await?;
        }
        session
            .query_unpaged(
                "INSERT INTO schema_migrations (version, name, applied_at) \
                 VALUES (?, ?, toTimestamp(now()))",
                (m.version, m.name),
            )
            .await
            .map_err(|e| cass("record schema migration")(Box::new(e)))?;
        tracing::info!(
            version = m.version,
            name = m.name,
            "applied store schema migration"
        );
        applied.push(m.version);
    }
    Ok(MigrateReport { before, applied })
}

/// Drops the keyspace of `config` with everything in it (for test keyspaces; there is no
/// command for it).
pub async fn drop_keyspace(config: &CassandraConfig) -> Result<(), StoreError> {
    let session = config.connect().await?;
    run_ddl(
        &session,
        &format!("DROP KEYSPACE IF EXISTS {}", config.keyspace),
        "drop keyspace",
    )
    .await
}

async fn run_ddl(session: &Session, cql: &str, op: &'static str) -> Result<(), StoreError> {
    session
        .query_unpaged(cql, ())
        .await
        .map_err(|e| cass(op)(Box::new(e)))?;
    // Later statements (and other nodes) must see the new schema.
    session
        .await_schema_agreement()
        .await
        .map_err(|e| cass("await schema agreement")(Box::new(e)))?;
    Ok(())
}

/// The highest recorded version, if any.
pub(crate) async fn recorded_version(session: &Session) -> Result<Option<i32>, StoreError> {
    let rows = session
        .query_unpaged("SELECT version FROM schema_migrations", ())
        .await
        .map_err(|e| cass("read schema version")(Box::new(e)))?
        .into_rows_result()
        .map_err(|e| cass("read schema version")(Box::new(e)))?;
    let mut max = None;
    for row in rows
        .rows::<(i32,)>()
        .map_err(|e| cass("read schema version")(Box::new(e)))?
    {
        let (v,) = row.map_err(|e| cass("read schema version")(Box::new(e)))?;
        max = max.max(Some(v));
    }
    Ok(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_drop_comments_and_split_at_line_end_semicolons() {
        let cql = "-- header\nCREATE TABLE IF NOT EXISTS a (\n  x int, -- the x\n  PRIMARY KEY (x)\n);\n\n\
                   CREATE TABLE IF NOT EXISTS b (y int PRIMARY KEY) ;\n-- trailing\n";
        assert_eq!(
            statements(cql),
            vec![
                "CREATE TABLE IF NOT EXISTS a ( x int, PRIMARY KEY (x) )".to_owned(),
                "CREATE TABLE IF NOT EXISTS b (y int PRIMARY KEY)".to_owned(),
            ]
        );
        assert_eq!(statements("-- nothing\n\n"), Vec::<String>::new());
    }

    #[test]
    fn versions_are_dense_and_every_statement_is_idempotent() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version, i as i32 + 1, "{}", m.name);
            assert!(
                m.name.starts_with(&format!("{:04}_", m.version)),
                "{}",
                m.name
            );
            let statements = statements(m.cql);
            assert!(!statements.is_empty(), "{}", m.name);
            for s in statements {
                assert!(
                    s.starts_with("CREATE TABLE IF NOT EXISTS ")
                        || s.starts_with("CREATE INDEX IF NOT EXISTS ")
                        || s.starts_with("ALTER TABLE "),
                    "{}: not re-runnable: {s}",
                    m.name
                );
                // The keyspace comes from the session, never from the file.
                assert!(!s.contains('.'), "{}: qualified name in {s}", m.name);
            }
        }
        assert_eq!(LATEST, MIGRATIONS.len() as i32);
    }

    #[test]
    fn the_first_schema_has_every_table_the_store_uses() {
        let all = statements(MIGRATIONS[0].cql).join("\n");
        for table in [
            "messages",
            "client_ids",
            "conversations",
            "marks",
            "members",
            "user_convs",
            "user_feed",
            "store_meta",
        ] {
            assert!(
                all.contains(&format!("CREATE TABLE IF NOT EXISTS {table} (")),
                "{table}"
            );
        }
        // Keys the code relies on.
        assert!(all.contains("PRIMARY KEY ((conv, bucket), seq)"));
        assert!(all.contains("PRIMARY KEY ((conv, from_user), client_id)"));
        assert!(all.contains("PRIMARY KEY ((user_id), pos, conv)"));
        assert!(all.contains("PRIMARY KEY ((user_id), conv)"));
    }

    #[test]
    fn keyspace_statement_uses_the_configured_replication() {
        let mut c = CassandraConfig {
            keyspace: "chat_eu".into(),
            ..Default::default()
        };
        c.replication.class = "NetworkTopologyStrategy".into();
        c.replication.datacenters.insert("dc1".into(), 3);
        assert_eq!(
            create_keyspace(&c).unwrap(),
            "CREATE KEYSPACE IF NOT EXISTS chat_eu WITH replication = \
             {'class': 'NetworkTopologyStrategy', 'dc1': 3}"
        );
        c.replication.datacenters.clear();
        assert!(create_keyspace(&c).is_err());
    }
}
