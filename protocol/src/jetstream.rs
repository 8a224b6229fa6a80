//! The JetStream streams and consumers, as declared in `nats/` (the `nats` CLI's own JSON
//! format), and idempotent provisioning of them through the JetStream API.
//!
//! The files are the single source: they are embedded here at build time, so services, tests
//! and `chat admin provision` apply exactly what an admin would apply with
//! `nats stream add --config` / `nats consumer add --config`.

use std::fmt;

use serde_json::{Map, Value};

/// One stream or consumer definition file.
#[derive(Debug, Clone, Copy)]
pub struct Definition {
    /// Path relative to `nats/`.
    pub path: &'static str,
    pub json: &'static str,
}

macro_rules! defs {
    ($($path:literal),* $(,)?) => {
        &[$(Definition { path: $path, json: include_str!(concat!("../../nats/", $path)) }),*]
    };
}

/// Stream definitions.
pub const STREAMS: &[Definition] = defs![
    "streams/CHAT_IN.json",
    "streams/CHAT_MSGS.json",
    "streams/CHAT_PUSH.json",
    "streams/KV_PRESENCE.json",
];

/// Consumer definitions; the stream is the file's parent directory.
pub const CONSUMERS: &[Definition] = defs![
    "consumers/CHAT_IN/seq-p0.json",
    "consumers/CHAT_IN/seq-p1.json",
    "consumers/CHAT_IN/seq-p2.json",
    "consumers/CHAT_IN/seq-p3.json",
    "consumers/CHAT_IN/seq-p4.json",
    "consumers/CHAT_IN/seq-p5.json",
    "consumers/CHAT_IN/seq-p6.json",
    "consumers/CHAT_IN/seq-p7.json",
    "consumers/CHAT_MSGS/fanout-p0.json",
    "consumers/CHAT_MSGS/fanout-p1.json",
    "consumers/CHAT_MSGS/fanout-p2.json",
    "consumers/CHAT_MSGS/fanout-p3.json",
    "consumers/CHAT_MSGS/fanout-p4.json",
    "consumers/CHAT_MSGS/fanout-p5.json",
    "consumers/CHAT_MSGS/fanout-p6.json",
    "consumers/CHAT_MSGS/fanout-p7.json",
    "consumers/CHAT_MSGS/fanout-g-p0.json",
    "consumers/CHAT_MSGS/fanout-g-p1.json",
    "consumers/CHAT_MSGS/fanout-g-p2.json",
    "consumers/CHAT_MSGS/fanout-g-p3.json",
    "consumers/CHAT_MSGS/fanout-g-p4.json",
    "consumers/CHAT_MSGS/fanout-g-p5.json",
    "consumers/CHAT_MSGS/fanout-g-p6.json",
    "consumers/CHAT_MSGS/fanout-g-p7.json",
    "consumers/CHAT_PUSH/push-adapter.json",
];

/// Name of the push adapter's durable consumer on `CHAT_PUSH`.
pub const PUSH_CONSUMER: &str = "push-adapter";

/// Name of the sequencer's durable consumer for a partition.
pub fn sequencer_consumer(partition: u32) -> String {
    format!("seq-p{partition}")
}

/// Name of the fan-out worker's durable consumer for a partition.
pub fn fanout_consumer(partition: u32) -> String {
    format!("fanout-p{partition}")
}

/// Name of the fan-out worker's durable consumer for a partition's groups.
pub fn fanout_group_consumer(partition: u32) -> String {
    format!("fanout-g-p{partition}")
}

impl Definition {
    pub fn config(&self) -> Map<String, Value> {
        match serde_json::from_str(self.json) {
            Ok(Value::Object(map)) => map,
            _ => panic!("nats/{} is not a JSON object", self.path),
        }
    }

    /// The stream a consumer file belongs to (its directory), or the stream's own name.
    pub fn stream(&self) -> &'static str {
        let mut parts = self.path.split('/');
        match (parts.next(), parts.next()) {
            (Some("consumers"), Some(stream)) => stream,
            _ => self
                .path
                .trim_start_matches("streams/")
                .trim_end_matches(".json"),
        }
    }

    fn name(&self) -> String {
        let cfg = self.config();
        let key = if self.path.starts_with("consumers/") {
            "durable_name"
        } else {
            "name"
        };
        cfg[key].as_str().unwrap_or_default().to_owned()
    }
}

/// What provisioning did with one definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Created,
    Unchanged,
    Updated { fields: Vec<String> },
}

/// One field where the server's config differs from the file and JetStream refused the update.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldDiff {
    pub field: String,
    pub file: Value,
    pub server: Value,
}

/// Why provisioning failed.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("nats request {subject} failed: {source}")]
    Request {
        subject: String,
        source: async_nats::RequestError,
    },
    #[error("{what} {name}: JetStream error {code}: {description}")]
    Api {
        what: &'static str,
        name: String,
        code: u64,
        description: String,
    },
    #[error("{what} {name} exists with a config JetStream cannot update ({description}); differs in: {}", DisplayDiffs(.diffs))]
    Immutable {
        what: &'static str,
        name: String,
        description: String,
        diffs: Vec<FieldDiff>,
    },
}

struct DisplayDiffs<'a>(&'a [FieldDiff]);

impl fmt::Display for DisplayDiffs<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{} (file {}, server {})", d.field, d.file, d.server)?;
        }
        Ok(())
    }
}

/// Overrides applied to every definition at provisioning time (for example R3 in production).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub num_replicas: Option<u64>,
}

async fn api(
    client: &async_nats::Client,
    subject: String,
    body: &Value,
) -> Result<Value, ProvisionError> {
    // Info requests take an empty payload, not `null`.
    let payload = if body.is_null() {
        Vec::new()
    } else {
        serde_json::to_vec(body).expect("JSON value encodes")
    };
    let reply = client
        .request(subject.clone(), payload.into())
        .await
        .map_err(|source| ProvisionError::Request { subject, source })?;
    Ok(serde_json::from_slice(&reply.payload).unwrap_or(Value::Null))
}

fn api_error(v: &Value) -> Option<(u64, u64, String)> {
    let e = v.get("error")?;
    Some((
        e.get("code").and_then(Value::as_u64).unwrap_or(0),
        e.get("err_code").and_then(Value::as_u64).unwrap_or(0),
        e.get("description")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned(),
    ))
}

/// Fields of `file` whose value differs on the server.
pub fn diff(file: &Map<String, Value>, server: &Map<String, Value>) -> Vec<FieldDiff> {
    file.iter()
        .filter(|(k, v)| !same(v, server.get(*k).unwrap_or(&Value::Null)))
        .map(|(k, v)| FieldDiff {
            field: k.clone(),
            file: v.clone(),
            server: server.get(k).cloned().unwrap_or(Value::Null),
        })
        .collect()
}

// The server omits empty or false values and may add defaults; compare only what the file says,
// treating absent as the type's zero value.
fn same(file: &Value, server: &Value) -> bool {
    match (file, server) {
        (Value::Bool(false), Value::Null) | (Value::String(_), Value::Null) => {
            file.as_str().is_none_or(str::is_empty)
        }
        (Value::Array(a), Value::Null) => a.is_empty(),
        (Value::Object(a), Value::Null) => a.is_empty(),
        (Value::Number(n), Value::Null) => n.as_i64() == Some(0),
        (Value::Object(a), Value::Object(b)) => diff(a, b).is_empty(),
        _ => file == server,
    }
}

fn apply_overrides(cfg: &mut Map<String, Value>, overrides: &Overrides) {
    if let Some(r) = overrides.num_replicas {
        cfg.insert("num_replicas".into(), r.into());
    }
}

/// Creates or updates one stream from its definition.
pub async fn provision_stream(
    client: &async_nats::Client,
    def: &Definition,
    overrides: &Overrides,
) -> Result<Outcome, ProvisionError> {
    let name = def.name();
    let mut cfg = def.config();
    apply_overrides(&mut cfg, overrides);
    let info = api(client, format!("$JS.API.STREAM.INFO.{name}"), &Value::Null).await?;
    let current = match api_error(&info) {
        None => info["config"].as_object().cloned().unwrap_or_default(),
        Some((404, _, _)) => {
            let created = api(
                client,
                format!("$JS.API.STREAM.CREATE.{name}"),
                &Value::Object(cfg),
            )
            .await?;
            return match api_error(&created) {
                None => Ok(Outcome::Created),
                Some((code, _, description)) => Err(ProvisionError::Api {
                    what: "stream",
                    name,
                    code,
                    description,
                }),
            };
        }
        Some((code, _, description)) => {
            return Err(ProvisionError::Api {
                what: "stream",
                name,
                code,
                description,
            });
        }
    };
    update_if_needed(
        client,
        "stream",
        name.clone(),
        format!("$JS.API.STREAM.UPDATE.{name}"),
        cfg.clone(),
        &current,
        Value::Object(cfg),
    )
    .await
}

async fn update_if_needed(
    client: &async_nats::Client,
    what: &'static str,
    name: String,
    subject: String,
    cfg: Map<String, Value>,
    current: &Map<String, Value>,
    body: Value,
) -> Result<Outcome, ProvisionError> {
    let diffs = diff(&cfg, current);
    if diffs.is_empty() {
        return Ok(Outcome::Unchanged);
    }
    let updated = api(client, subject, &body).await?;
    match api_error(&updated) {
        None => Ok(Outcome::Updated {
            fields: diffs.into_iter().map(|d| d.field).collect(),
        }),
        Some((_, _, description)) => Err(ProvisionError::Immutable {
            what,
            name,
            description,
            diffs,
        }),
    }
}

/// Creates or updates one durable consumer from its definition.
pub async fn provision_consumer(
    client: &async_nats::Client,
    def: &Definition,
    overrides: &Overrides,
) -> Result<Outcome, ProvisionError> {
    let stream = def.stream();
    let name = def.name();
    let mut cfg = def.config();
    apply_overrides(&mut cfg, overrides);
    let info = api(
        client,
        format!("$JS.API.CONSUMER.INFO.{stream}.{name}"),
        &Value::Null,
    )
    .await?;
    let body =
        |action: &str| serde_json::json!({"stream_name": stream, "config": cfg, "action": action});
    let subject = format!("$JS.API.CONSUMER.CREATE.{stream}.{name}");
    match api_error(&info) {
        None => {
            let current = info["config"].as_object().cloned().unwrap_or_default();
            update_if_needed(
                client,
                "consumer",
                format!("{stream}/{name}"),
                subject,
                cfg.clone(),
                &current,
                body("update"),
            )
            .await
        }
        Some((404, _, _)) => {
            let created = api(client, subject, &body("create")).await?;
            match api_error(&created) {
                None => Ok(Outcome::Created),
                Some((code, _, description)) => Err(ProvisionError::Api {
                    what: "consumer",
                    name: format!("{stream}/{name}"),
                    code,
                    description,
                }),
            }
        }
        Some((code, _, description)) => Err(ProvisionError::Api {
            what: "consumer",
            name: format!("{stream}/{name}"),
            code,
            description,
        }),
    }
}

/// Provisions every stream, then every consumer. Returns one line per definition.
pub async fn provision_all(
    client: &async_nats::Client,
    overrides: &Overrides,
) -> Result<Vec<(&'static str, Outcome)>, ProvisionError> {
    let mut report = Vec::new();
    for def in STREAMS {
        report.push((def.path, provision_stream(client, def, overrides).await?));
    }
    for def in CONSUMERS {
        report.push((def.path, provision_consumer(client, def, overrides).await?));
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::subjects;

    #[test]
    fn definitions_match_the_code_that_uses_them() {
        let inbound = STREAMS[0].config();
        assert_eq!(inbound["name"], subjects::STREAM_INBOUND);
        let dest = inbound["subject_transform"]["dest"].as_str().unwrap();
        assert_eq!(
            dest,
            format!(
                "chat.inp.{{{{partition({},1)}}}}.{{{{wildcard(1)}}}}",
                subjects::PARTITIONS
            )
        );
        assert_eq!(STREAMS[1].config()["name"], subjects::STREAM_STAMPED);
        for p in 0..subjects::PARTITIONS {
            let seq = CONSUMERS
                .iter()
                .find(|d| {
                    d.stream() == subjects::STREAM_INBOUND && d.name() == sequencer_consumer(p)
                })
                .expect("sequencer consumer per partition");
            let cfg = seq.config();
            assert_eq!(cfg["filter_subject"], subjects::inbound_partition_filter(p));
            assert_eq!(cfg["priority_groups"][0], subjects::SEQUENCER_GROUP);
            let fan = CONSUMERS
                .iter()
                .find(|d| d.stream() == subjects::STREAM_STAMPED && d.name() == fanout_consumer(p))
                .expect("fan-out consumer per partition");
            let cfg = fan.config();
            let filters: Vec<String> =
                serde_json::from_value(cfg["filter_subjects"].clone()).unwrap();
            assert_eq!(filters, subjects::stamped_partition_filters(p));
            assert_eq!(cfg["priority_groups"][0], subjects::FANOUT_GROUP);
            let group = CONSUMERS
                .iter()
                .find(|d| {
                    d.stream() == subjects::STREAM_STAMPED && d.name() == fanout_group_consumer(p)
                })
                .expect("group fan-out consumer per partition");
            let cfg = group.config();
            let filters: Vec<String> =
                serde_json::from_value(cfg["filter_subjects"].clone()).unwrap();
            assert_eq!(filters, subjects::group_partition_filters(p));
            assert_eq!(cfg["priority_groups"][0], subjects::FANOUT_GROUP);
        }
        let stamped: Vec<String> =
            serde_json::from_value(STREAMS[1].config()["subjects"].clone()).unwrap();
        for conv in ["dm~a~b", "g~team"] {
            let conv = crate::ids::ConvId::parse(conv).unwrap();
            for subject in [subjects::stamped(&conv), subjects::receipts(&conv)] {
                let prefix = subject.split('.').take(2).collect::<Vec<_>>().join(".");
                assert!(stamped.contains(&format!("{prefix}.*.*")), "{subject}");
            }
        }
        let push = STREAMS[2].config();
        assert_eq!(push["name"], subjects::STREAM_PUSH);
        let push_subject = subjects::push(&crate::ids::UserId::parse("u").unwrap());
        assert_eq!(push["subjects"][0], push_subject.replace(".u", ".*"));
        let adapter = CONSUMERS.last().unwrap();
        assert_eq!(adapter.stream(), subjects::STREAM_PUSH);
        assert_eq!(adapter.name(), PUSH_CONSUMER);
        assert_eq!(CONSUMERS.len() as u32, 3 * subjects::PARTITIONS + 1);
        let presence = STREAMS[3].config();
        assert_eq!(presence["name"], subjects::STREAM_PRESENCE);
        assert_eq!(
            presence["subjects"][0],
            subjects::presence_kv_subject(">").as_str()
        );
        // A KV bucket with per-key TTL and markers for expired keys (nats-server 2.11+).
        assert_eq!(presence["allow_msg_ttl"], true);
        assert!(presence["subject_delete_marker_ttl"].as_u64().unwrap() > 0);
        assert_eq!(presence["max_msgs_per_subject"], 1);
    }

    #[test]
    fn diff_ignores_server_defaults_and_reports_changes() {
        let file: Map<String, Value> =
            serde_json::from_str(r#"{"a":1,"b":false,"c":"x","d":[]}"#).unwrap();
        let server: Map<String, Value> =
            serde_json::from_str(r#"{"a":1,"c":"x","extra":5}"#).unwrap();
        assert!(diff(&file, &server).is_empty());
        let server: Map<String, Value> = serde_json::from_str(r#"{"a":2,"c":"x"}"#).unwrap();
        let d = diff(&file, &server);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].field, "a");
    }
}
