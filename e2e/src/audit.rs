//! Reading `CHAT_MSGS` directly, with headers and server timestamps: who stamped what and when
//! (the `Chat-Stamper` header), every conversation's newest seq, and the takeover moment.

use std::collections::BTreeMap;

use async_nats::jetstream::{self, stream::DirectGetErrorKind};
use chat_protocol::{
    frames::{Message, Receipt, ServerFrame},
    ids::ConvId,
    subjects,
};

/// The header naming the sequencer instance that stamped a message (see the sequencer README).
pub const STAMPER_HEADER: &str = "Chat-Stamper";

/// What a `CHAT_MSGS` entry carries.
#[derive(Debug, Clone)]
pub enum Event {
    Message(Message),
    Receipt(Receipt),
    /// Anything else (undecodable): always a finding.
    Other(String),
}

/// One `CHAT_MSGS` entry.
#[derive(Debug, Clone)]
pub struct StreamEntry {
    pub stream_seq: u64,
    pub subject: String,
    /// `Chat-Stamper` header, if any.
    pub stamper: Option<String>,
    /// Server timestamp of the entry, ms since the epoch.
    pub time_ms: u64,
    pub event: Event,
}

impl StreamEntry {
    /// A stamped message (not a receipt).
    pub fn message(&self) -> Option<&Message> {
        match &self.event {
            Event::Message(m) => Some(m),
            _ => None,
        }
    }
}

/// Reads `CHAT_MSGS` entries by stream sequence with direct gets.
pub struct StreamReader {
    stream: jetstream::stream::Stream,
    /// Next stream sequence to read.
    pub next: u64,
}

impl StreamReader {
    pub async fn new(js: &jetstream::Context) -> Result<Self, String> {
        let stream = js
            .get_stream(subjects::STREAM_STAMPED)
            .await
            .map_err(|e| format!("get stream {}: {e}", subjects::STREAM_STAMPED))?;
        Ok(Self { stream, next: 1 })
    }

    /// The stream's last sequence right now.
    pub async fn last_sequence(&mut self) -> Result<u64, String> {
        self.stream
            .info()
            .await
            .map(|i| i.state.last_sequence)
            .map_err(|e| format!("stream info: {e}"))
    }

    /// Skips to after what the stream holds now.
    pub async fn skip_to_end(&mut self) -> Result<(), String> {
        self.next = self.last_sequence().await? + 1;
        Ok(())
    }

    /// Every entry from `next` to the current end of the stream.
    pub async fn read_new(&mut self) -> Result<Vec<StreamEntry>, String> {
        let last = self.last_sequence().await?;
        let mut out = Vec::new();
        while self.next <= last {
            let seq = self.next;
            match self.stream.direct_get(seq).await {
                Ok(raw) => out.push(entry(raw)),
                Err(e) if e.kind() == DirectGetErrorKind::NotFound => {}
                Err(e) => return Err(format!("direct get {seq}: {e}")),
            }
            self.next += 1;
        }
        Ok(out)
    }
}

fn entry(raw: jetstream::message::StreamMessage) -> StreamEntry {
    let event = match serde_json::from_slice::<ServerFrame>(&raw.payload) {
        Ok(ServerFrame::Message(m)) => Event::Message(m),
        Ok(ServerFrame::Receipt(r)) => Event::Receipt(r),
        Ok(other) => Event::Other(format!("{other:?}")),
        Err(e) => Event::Other(format!("undecodable: {e}")),
    };
    let time_ms = u64::try_from(raw.time.unix_timestamp_nanos() / 1_000_000).unwrap_or(0);
    StreamEntry {
        stream_seq: raw.sequence,
        subject: raw.subject.to_string(),
        stamper: raw
            .headers
            .get(STAMPER_HEADER)
            .map(|v| v.as_str().to_owned()),
        time_ms,
        event,
    }
}

/// Every entry of `CHAT_MSGS`.
pub async fn read_all(js: &jetstream::Context) -> Result<Vec<StreamEntry>, String> {
    StreamReader::new(js).await?.read_new().await
}

/// The newest stamped seq of each conversation (0 if none), from the last message on its
/// subject.
pub async fn latest_seqs(
    js: &jetstream::Context,
    convs: &[String],
) -> Result<BTreeMap<String, u64>, String> {
    let mut out = BTreeMap::new();
    for conv in convs {
        let id = ConvId::parse(conv).map_err(|e| format!("{conv}: {e}"))?;
        let last = chat_protocol::jetstream::last_message(
            &js.client(),
            subjects::STREAM_STAMPED,
            &subjects::stamped_any(&id),
        )
        .await
        .map_err(|e| format!("last of {conv}: {e}"))?;
        let seq = match last {
            Some(raw) => match serde_json::from_slice::<ServerFrame>(&raw.payload) {
                Ok(ServerFrame::Message(m)) => m.seq,
                _ => return Err(format!("last entry of {conv} is not a message")),
            },
            None => 0,
        };
        out.insert(conv.clone(), seq);
    }
    Ok(out)
}

/// The instance that stamped most of the last `window` messages in `entries`.
pub fn busiest_stamper(entries: &[StreamEntry], window: usize) -> Option<String> {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for e in entries
        .iter()
        .rev()
        .filter(|e| e.message().is_some())
        .take(window)
    {
        if let Some(s) = &e.stamper {
            *counts.entry(s.as_str()).or_default() += 1;
        }
    }
    counts
        .into_iter()
        .max_by_key(|(_, n)| *n)
        .map(|(s, _)| s.to_owned())
}
