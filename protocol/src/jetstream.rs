//! The JetStream streams and consumers, as declared in `nats/` (the `nats` CLI's own JSON
//! format), and idempotent provisioning of them through the JetStream API.
//!
//! Streams are files: they are embedded here at build time, so services, tests and
//! `chat admin provision` apply exactly what an admin would apply with `nats stream add --config`.
//! Consumers come one per partition and kind, so they are generated here ([`consumers`]) for a
//! partition count (a deployment choice, [`subjects::DEFAULT_PARTITIONS`] by default); the files in
//! `nats/consumers/` are that output for the default count, and a test keeps them identical
//! (`chat admin render --partitions N` writes the files for another count).

use std::fmt;

use serde_json::{Map, Value, json};

use crate::subjects;

/// One stream or consumer definition: its path relative to `nats/` and its config.
#[derive(Debug, Clone, PartialEq)]
pub struct Definition {
    pub path: String,
    pub config: Map<String, Value>,
}

macro_rules! files {
    ($($path:literal),* $(,)?) => {
        &[$(($path, include_str!(concat!("../../nats/", $path)))),*]
    };
}

/// Stream definition files (path relative to `nats/`, JSON text).
pub const STREAM_FILES: &[(&str, &str)] = files![
    "streams/CHAT_IN.json",
    "streams/CHAT_MSGS.json",
    "streams/CHAT_PUSH.json",
    "streams/KV_CHAT_MEDIA.json",
    "streams/KV_PRESENCE.json",
    "streams/KV_CHAT_LIMITS.json",
];

/// Consumer definitions that do not depend on the partition count.
const FIXED_CONSUMER_FILES: &[(&str, &str)] = files!["consumers/CHAT_PUSH/push-adapter.json"];

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

/// Unacknowledged messages a sequencer partition consumer hands out at once: the stamper works
/// on that many messages of a partition together (different conversations in parallel).
pub const SEQUENCER_MAX_ACK_PENDING: i64 = 1024;
/// How long a sequencer partition consumer waits for an ack before redelivering (1.5 s), and
/// how long a pinned sequencer may stop pulling before another one gets the partition (2.5 s).
/// A pin moves only after every message the old owner could still receive has been handed back
/// for redelivery (pull expiry + `ack_wait` < `priority_timeout`), so a new owner always gets
/// the old owner's unacked messages before any newer one (`nats/README.md`, "Sequencer
/// takeover").
pub const SEQUENCER_ACK_WAIT_NS: u64 = 1_500_000_000;
pub const SEQUENCER_PIN_TIMEOUT_NS: u64 = 2_500_000_000;

fn parse(path: &str, json: &str) -> Map<String, Value> {
    match serde_json::from_str(json) {
        Ok(Value::Object(map)) => map,
        _ => panic!("nats/{path} is not a JSON object"),
    }
}

/// The stream definitions for `partitions` partitions (the `CHAT_IN` subject transform names
/// the count).
pub fn streams(partitions: u32) -> Vec<Definition> {
    STREAM_FILES
        .iter()
        .map(|(path, json)| {
            let mut config = parse(path, json);
            if config["name"] == subjects::STREAM_INBOUND {
                config["subject_transform"]["dest"] =
                    subjects::inbound_transform_dest(partitions).into();
            }
            Definition {
                path: (*path).to_owned(),
                config,
            }
        })
        .collect()
}

/// Every durable consumer for `partitions` partitions: per partition the sequencer's, the
/// one-to-one fan-out's and the group fan-out's, then the fixed ones.
pub fn consumers(partitions: u32) -> Vec<Definition> {
    let mut defs = Vec::with_capacity(3 * partitions as usize + 1);
    let def = |stream: &str, name: String, config: Value| Definition {
        path: format!("consumers/{stream}/{name}.json"),
        config: match config {
            Value::Object(map) => map,
            _ => unreachable!("consumer configs are objects"),
        },
    };
    for p in 0..partitions {
        defs.push(def(
            subjects::STREAM_INBOUND,
            sequencer_consumer(p),
            json!({
                "durable_name": sequencer_consumer(p),
                "description": format!("Sequencer, partition {p}: one pinned owner stamps it"),
                "deliver_policy": "all",
                "ack_policy": "explicit",
                "ack_wait": SEQUENCER_ACK_WAIT_NS,
                "max_deliver": -1,
                "filter_subject": subjects::inbound_partition_filter(p),
                "replay_policy": "instant",
                "max_waiting": 512,
                "max_ack_pending": SEQUENCER_MAX_ACK_PENDING,
                "priority_groups": [subjects::SEQUENCER_GROUP],
                "priority_policy": "pinned_client",
                "priority_timeout": SEQUENCER_PIN_TIMEOUT_NS,
            }),
        ));
    }
    for p in 0..partitions {
        defs.push(def(
            subjects::STREAM_STAMPED,
            fanout_consumer(p),
            json!({
                "durable_name": fanout_consumer(p),
                "description": format!(
                    "Fan-out, partition {p}: one pinned worker pushes its messages and receipts to members"
                ),
                "deliver_policy": "all",
                "ack_policy": "explicit",
                "ack_wait": 30_000_000_000u64,
                "max_deliver": -1,
                "filter_subjects": subjects::stamped_partition_filters(p),
                "replay_policy": "instant",
                "max_waiting": 512,
                "max_ack_pending": 1024,
                "priority_groups": [subjects::FANOUT_GROUP],
                "priority_policy": "pinned_client",
                "priority_timeout": 5_000_000_000u64,
            }),
        ));
    }
    for p in 0..partitions {
        defs.push(def(
            subjects::STREAM_STAMPED,
            fanout_group_consumer(p),
            json!({
                "durable_name": fanout_group_consumer(p),
                "description": format!(
                    "Group fan-out, partition {p}: one pinned worker delivers its groups' messages and receipts, rate-limited per group"
                ),
                "deliver_policy": "all",
                "ack_policy": "explicit",
                "ack_wait": 30_000_000_000u64,
                "max_deliver": -1,
                "filter_subjects": subjects::group_partition_filters(p),
                "replay_policy": "instant",
                "max_waiting": 512,
                "max_ack_pending": 10000,
                "priority_groups": [subjects::FANOUT_GROUP],
                "priority_policy": "pinned_client",
                "priority_timeout": 5_000_000_000u64,
            }),
        ));
    }
    for (path, json) in FIXED_CONSUMER_FILES {
        defs.push(Definition {
            path: (*path).to_owned(),
            config: parse(path, json),
        });
    }
    defs
}

/// Renders a definition as the JSON file the `nats` CLI takes.
pub fn render(def: &Definition) -> String {
    let mut text =
        serde_json::to_string_pretty(&Value::Object(def.config.clone())).expect("JSON encodes");
    text.push('\n');
    text
}

impl Definition {
    /// The stream a consumer file belongs to (its directory), or the stream's own name.
    pub fn stream(&self) -> &str {
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
        let key = if self.path.starts_with("consumers/") {
            "durable_name"
        } else {
            "name"
        };
        self.config[key].as_str().unwrap_or_default().to_owned()
    }
}

/// The partition count a live system runs with: read from the `CHAT_IN` subject transform.
pub async fn live_partitions(js: &async_nats::jetstream::Context) -> Result<u32, LiveError> {
    let mut stream = js
        .get_stream(subjects::STREAM_INBOUND)
        .await
        .map_err(|e| LiveError::Stream(e.to_string()))?;
    let info = stream
        .info()
        .await
        .map_err(|e| LiveError::Stream(e.to_string()))?;
    let dest = info
        .config
        .subject_transform
        .as_ref()
        .map(|t| t.destination.clone())
        .unwrap_or_default();
    subjects::partitions_of_transform(&dest).ok_or(LiveError::Transform(dest))
}

/// Why [`live_partitions`] failed.
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    #[error("cannot read stream CHAT_IN: {0}")]
    Stream(String),
    #[error(
        "stream CHAT_IN has subject transform {0:?}, not chat.inp.{{{{partition(N,1)}}}}.{{{{wildcard(1)}}}}: provision it with `chat admin provision`"
    )]
    Transform(String),
}

/// The last message of a stream on `subject`, which may contain wildcards (the newest among
/// every matching subject), by a direct get: its stream sequence, subject and payload, or
/// `None` when no message matches.
pub async fn last_message(
    client: &async_nats::Client,
    stream: &str,
    subject: &str,
) -> Result<Option<LastMessage>, async_nats::Error> {
    let request = serde_json::to_vec(&json!({ "last_by_subj": subject }))?;
    let reply = client
        .request(format!("$JS.API.DIRECT.GET.{stream}"), request.into())
        .await?;
    if let Some(status) = reply.status {
        if status == async_nats::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        return Err(format!(
            "direct get of {subject:?}: status {status} {}",
            reply.description.unwrap_or_default()
        )
        .into());
    }
    let headers = reply.headers.ok_or("direct get reply without headers")?;
    let sequence = headers
        .get("Nats-Sequence")
        .and_then(|v| v.as_str().parse().ok())
        .ok_or("direct get reply without Nats-Sequence")?;
    let subject = headers
        .get("Nats-Subject")
        .map(|v| v.as_str().to_owned())
        .ok_or("direct get reply without Nats-Subject")?;
    Ok(Some(LastMessage {
        sequence,
        subject,
        payload: reply.payload,
    }))
}

/// A message found by [`last_message`].
#[derive(Debug, Clone)]
pub struct LastMessage {
    pub sequence: u64,
    pub subject: String,
    pub payload: bytes::Bytes,
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
    /// Partition count (default: [`subjects::DEFAULT_PARTITIONS`]).
    pub partitions: Option<u32>,
}

impl Overrides {
    /// The partition count to provision.
    pub fn partitions(&self) -> u32 {
        self.partitions.unwrap_or(subjects::DEFAULT_PARTITIONS)
    }
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
    let mut cfg = def.config.clone();
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
    let mut cfg = def.config.clone();
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

/// Provisions every stream, then every consumer, for the partition count of `overrides`.
/// Returns one line per definition.
pub async fn provision_all(
    client: &async_nats::Client,
    overrides: &Overrides,
) -> Result<Vec<(String, Outcome)>, ProvisionError> {
    let partitions = overrides.partitions();
    let mut report = Vec::new();
    for def in streams(partitions) {
        let outcome = provision_stream(client, &def, overrides).await?;
        report.push((def.path, outcome));
    }
    for def in consumers(partitions) {
        let outcome = provision_consumer(client, &def, overrides).await?;
        report.push((def.path, outcome));
    }
    Ok(report)
}

/// Why [`repartition`] stopped.
#[derive(Debug, thiserror::Error)]
pub enum RepartitionError {
    #[error(transparent)]
    Live(#[from] LiveError),
    #[error(
        "{to} partitions is not a multiple of the current {from}: only growth by a whole multiple keeps every conversation's order (nats/README.md, \"Changing the partition count\")"
    )]
    NotAMultiple { from: u32, to: u32 },
    #[error(transparent)]
    Provision(#[from] ProvisionError),
    #[error("{0}")]
    Nats(String),
}

/// The partition of a per-partition consumer name (`seq-p7`, `fanout-p7`, `fanout-g-p7`).
fn partition_of_consumer(name: &str) -> Option<u32> {
    ["seq-p", "fanout-g-p", "fanout-p"]
        .iter()
        .find_map(|prefix| name.strip_prefix(prefix)?.parse().ok())
}

/// Grows the partition count of a live system to `to`, a whole multiple of the current count,
/// without breaking any conversation's order (`nats/README.md`, "Changing the partition
/// count"): the new partitions' consumers are created paused, the `CHAT_IN` transform is
/// switched, and they are resumed once every old partition has stamped everything stored
/// before the switch. `step` hears what is being done.
pub async fn repartition(
    client: &async_nats::Client,
    to: u32,
    overrides: &Overrides,
    mut step: impl FnMut(String),
) -> Result<(), RepartitionError> {
    let js = async_nats::jetstream::new(client.clone());
    let from = live_partitions(&js).await?;
    if to == from {
        step(format!("already {to} partitions: nothing to do"));
        return Ok(());
    }
    if to < from || !to.is_multiple_of(from) || to > subjects::MAX_PARTITIONS {
        return Err(RepartitionError::NotAMultiple { from, to });
    }
    let overrides = Overrides {
        partitions: Some(to),
        ..overrides.clone()
    };
    let new: Vec<Definition> = consumers(to)
        .into_iter()
        .filter(|d| partition_of_consumer(&d.name()).is_some_and(|p| p >= from))
        .collect();
    step(format!(
        "1. creating {} consumers of partitions {from}..{to}, paused",
        new.len()
    ));
    for def in &new {
        let mut paused = def.clone();
        paused
            .config
            .insert("pause_until".into(), "2099-01-01T00:00:00Z".into());
        provision_consumer(client, &paused, &overrides).await?;
    }
    step(format!(
        "2. switching the {} subject transform to partition({to},1)",
        subjects::STREAM_INBOUND
    ));
    let inbound = streams(to)
        .into_iter()
        .find(|d| d.name() == subjects::STREAM_INBOUND)
        .expect("CHAT_IN is defined");
    provision_stream(client, &inbound, &overrides).await?;
    let mut stream = js
        .get_stream(subjects::STREAM_INBOUND)
        .await
        .map_err(|e| RepartitionError::Nats(e.to_string()))?;
    let switched_at = stream
        .info()
        .await
        .map_err(|e| RepartitionError::Nats(e.to_string()))?
        .state
        .last_sequence;
    step(format!(
        "3. waiting until partitions 0..{from} stamped everything up to stream sequence {switched_at}"
    ));
    for p in 0..from {
        loop {
            let first = first_message(client, &subjects::inbound_partition_filter(p)).await?;
            if first.is_none_or(|seq| seq > switched_at) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }
    step(format!(
        "4. resuming the consumers of partitions {from}..{to}"
    ));
    for def in &new {
        let subject = format!("$JS.API.CONSUMER.PAUSE.{}.{}", def.stream(), def.name());
        let reply = api(client, subject, &json!({})).await?;
        if let Some((code, _, description)) = api_error(&reply) {
            return Err(RepartitionError::Provision(ProvisionError::Api {
                what: "consumer",
                name: format!("{}/{}", def.stream(), def.name()),
                code,
                description,
            }));
        }
    }
    step(format!(
        "done: {to} partitions; sequencers and fan-out workers pick the new ones up within 5 s"
    ));
    Ok(())
}

/// The stream sequence of the first `CHAT_IN` message on `filter`, if any.
async fn first_message(
    client: &async_nats::Client,
    filter: &str,
) -> Result<Option<u64>, RepartitionError> {
    let request =
        serde_json::to_vec(&json!({ "seq": 1, "next_by_subj": filter })).expect("JSON encodes");
    let reply = client
        .request(
            format!("$JS.API.DIRECT.GET.{}", subjects::STREAM_INBOUND),
            request.into(),
        )
        .await
        .map_err(|e| RepartitionError::Nats(e.to_string()))?;
    if reply.status == Some(async_nats::StatusCode::NOT_FOUND) {
        return Ok(None);
    }
    reply
        .headers
        .as_ref()
        .and_then(|h| h.get("Nats-Sequence"))
        .and_then(|v| v.as_str().parse().ok())
        .map(Some)
        .ok_or_else(|| {
            RepartitionError::Nats(format!(
                "direct get of {filter}: {:?} {}",
                reply.status,
                reply.description.unwrap_or_default()
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nats_dir() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../nats")
    }

    #[test]
    fn the_files_are_the_definitions_for_the_default_partition_count() {
        let mut on_disk = std::collections::BTreeSet::new();
        for entry in walk(&nats_dir().join("consumers")) {
            let rel = entry
                .strip_prefix(nats_dir())
                .unwrap()
                .to_string_lossy()
                .into_owned();
            on_disk.insert(rel);
        }
        let defs = consumers(subjects::DEFAULT_PARTITIONS);
        let generated: std::collections::BTreeSet<String> =
            defs.iter().map(|d| d.path.clone()).collect();
        assert_eq!(
            on_disk, generated,
            "nats/consumers/ must hold exactly the generated consumers: run `chat admin render --out nats`"
        );
        for def in defs.iter().chain(&streams(subjects::DEFAULT_PARTITIONS)) {
            let text = std::fs::read_to_string(nats_dir().join(&def.path)).unwrap();
            let file: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(
                file,
                Value::Object(def.config.clone()),
                "nats/{} differs from its definition: run `chat admin render --out nats`",
                def.path
            );
        }
    }

    fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                out.extend(walk(&path));
            } else {
                out.push(path);
            }
        }
        out
    }

    #[test]
    fn definitions_match_the_code_that_uses_them() {
        let n = 12;
        let streams = streams(n);
        let inbound = &streams[0].config;
        assert_eq!(inbound["name"], subjects::STREAM_INBOUND);
        let dest = inbound["subject_transform"]["dest"].as_str().unwrap();
        assert_eq!(subjects::partitions_of_transform(dest), Some(n));
        assert_eq!(streams[1].config["name"], subjects::STREAM_STAMPED);
        let consumers = consumers(n);
        assert_eq!(consumers.len() as u32, 3 * n + 1);
        let find = |stream: &str, name: &str| {
            consumers
                .iter()
                .find(|d| d.stream() == stream && d.name() == name)
                .unwrap_or_else(|| panic!("{stream}/{name}"))
                .config
                .clone()
        };
        for p in 0..n {
            let cfg = find(subjects::STREAM_INBOUND, &sequencer_consumer(p));
            assert_eq!(cfg["filter_subject"], subjects::inbound_partition_filter(p));
            assert_eq!(cfg["priority_groups"][0], subjects::SEQUENCER_GROUP);
            // A pin moves only after the old owner's deliveries were handed back (pull expiry
            // of at most 0.5 s, then ack_wait).
            assert!(
                cfg["ack_wait"].as_u64().unwrap() + 500_000_000
                    < cfg["priority_timeout"].as_u64().unwrap()
            );
            let cfg = find(subjects::STREAM_STAMPED, &fanout_consumer(p));
            let filters: Vec<String> =
                serde_json::from_value(cfg["filter_subjects"].clone()).unwrap();
            assert_eq!(filters, subjects::stamped_partition_filters(p));
            assert_eq!(cfg["priority_groups"][0], subjects::FANOUT_GROUP);
            let cfg = find(subjects::STREAM_STAMPED, &fanout_group_consumer(p));
            let filters: Vec<String> =
                serde_json::from_value(cfg["filter_subjects"].clone()).unwrap();
            assert_eq!(filters, subjects::group_partition_filters(p));
        }
        let stamped: Vec<String> =
            serde_json::from_value(streams[1].config["subjects"].clone()).unwrap();
        for conv in ["dm~a~b", "g~team"] {
            let conv = crate::ids::ConvId::parse(conv).unwrap();
            for subject in [subjects::stamped(&conv, 3), subjects::receipts(&conv, 3)] {
                let prefix = subject.split('.').take(2).collect::<Vec<_>>().join(".");
                assert!(stamped.contains(&format!("{prefix}.*.*")), "{subject}");
            }
        }
        let push = &streams[2].config;
        assert_eq!(push["name"], subjects::STREAM_PUSH);
        let push_subject = subjects::push(&crate::ids::UserId::parse("u").unwrap());
        assert_eq!(push["subjects"][0], push_subject.replace(".u", ".*"));
        let adapter = consumers.last().unwrap();
        assert_eq!(adapter.stream(), subjects::STREAM_PUSH);
        assert_eq!(adapter.name(), PUSH_CONSUMER);
        // A key-value bucket is the stream `KV_<bucket>` over `$KV.<bucket>.>`, one value per key.
        let media = &streams[3].config;
        assert_eq!(media["name"], format!("KV_{}", subjects::MEDIA_BUCKET));
        assert_eq!(
            media["subjects"][0],
            format!("$KV.{}.>", subjects::MEDIA_BUCKET)
        );
        assert_eq!(media["max_msgs_per_subject"], 1);
        assert_eq!(media["allow_rollup_hdrs"], true);
        let presence = &streams[4].config;
        assert_eq!(presence["name"], subjects::STREAM_PRESENCE);
        assert_eq!(
            presence["subjects"][0],
            subjects::presence_kv_subject(">").as_str()
        );
        // A KV bucket with per-key TTL and markers for expired keys (nats-server 2.11+).
        assert_eq!(presence["allow_msg_ttl"], true);
        assert!(presence["subject_delete_marker_ttl"].as_u64().unwrap() > 0);
        assert_eq!(presence["max_msgs_per_subject"], 1);
        let limits = &streams[5].config;
        assert_eq!(limits["name"], subjects::STREAM_LIMITS);
        assert_eq!(limits["name"], format!("KV_{}", subjects::LIMITS_BUCKET));
        assert_eq!(
            limits["subjects"][0],
            format!("$KV.{}.>", subjects::LIMITS_BUCKET)
        );
        assert_eq!(limits["max_msgs_per_subject"], 1);
        assert_eq!(limits["allow_direct"], true);
        // A budget of "n per hour" is full again an hour after its last charge: a key may go
        // then, not before.
        assert_eq!(limits["max_age"].as_u64(), Some(3_600_000_000_000));
    }

    #[test]
    fn per_partition_consumers_name_their_partition() {
        for def in consumers(5) {
            let name = def.name();
            match partition_of_consumer(&name) {
                Some(p) => assert!(name.ends_with(&format!("-p{p}")) && p < 5, "{name}"),
                None => assert_eq!(name, PUSH_CONSUMER),
            }
        }
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
