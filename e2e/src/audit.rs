//! Reading `CHAT_MSGS` directly, with headers and server timestamps: who stamped what and when
//! (the `Chat-Stamper` header), every conversation's newest seq, and the takeover moment.

use std::{collections::BTreeMap, time::Duration};

use async_nats::jetstream::{self, consumer::DeliverPolicy, stream::DirectGetErrorKind};
use chat_protocol::{
    frames::{Message, Receipt, ServerFrame},
    ids::ConvId,
    subjects,
};
use futures::StreamExt;

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

/// Reads `CHAT_MSGS` (or the subjects of one conversation) in stream order, through an
/// ordered consumer: thousands of entries a second, where one direct get per entry cannot keep
/// up with the traffic.
pub struct StreamReader {
    stream: jetstream::stream::Stream,
    /// Only these subjects (empty: all).
    filter: String,
    /// Next stream sequence to read.
    pub next: u64,
    messages: Option<jetstream::consumer::pull::Ordered>,
}

/// How long [`StreamReader::read_new`] waits for an entry it knows exists.
const READ_STALL: Duration = Duration::from_secs(5);

impl StreamReader {
    pub async fn new(js: &jetstream::Context) -> Result<Self, String> {
        Self::filtered(js, String::new()).await
    }

    /// A reader of the entries on `filter` only.
    pub async fn filtered(js: &jetstream::Context, filter: String) -> Result<Self, String> {
        let stream = js
            .get_stream(subjects::STREAM_STAMPED)
            .await
            .map_err(|e| format!("get stream {}: {e}", subjects::STREAM_STAMPED))?;
        Ok(Self {
            stream,
            filter,
            next: 1,
            messages: None,
        })
    }

    /// The stream's last sequence (on the filter: the sequence of its last entry) right now.
    pub async fn last_sequence(&mut self) -> Result<u64, String> {
        if self.filter.is_empty() {
            return self
                .stream
                .info()
                .await
                .map(|i| i.state.last_sequence)
                .map_err(|e| format!("stream info: {e}"));
        }
        match self
            .stream
            .direct_get_last_for_subject(self.filter.as_str())
            .await
        {
            Ok(raw) => Ok(raw.sequence),
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(0),
            Err(e) => Err(format!("last of {}: {e}", self.filter)),
        }
    }

    /// Skips to after what the stream holds now.
    pub async fn skip_to_end(&mut self) -> Result<(), String> {
        self.next = self.last_sequence().await? + 1;
        self.messages = None;
        Ok(())
    }

    /// Every entry from `next` to what the stream held when called.
    pub async fn read_new(&mut self) -> Result<Vec<StreamEntry>, String> {
        let last = self.last_sequence().await?;
        let mut out = Vec::new();
        if self.next > last {
            return Ok(out);
        }
        if self.messages.is_none() {
            let consumer = self
                .stream
                .create_consumer(jetstream::consumer::pull::OrderedConfig {
                    filter_subject: self.filter.clone(),
                    deliver_policy: DeliverPolicy::ByStartSequence {
                        start_sequence: self.next,
                    },
                    ..Default::default()
                })
                .await
                .map_err(|e| format!("ordered consumer: {e}"))?;
            self.messages = Some(
                consumer
                    .messages()
                    .await
                    .map_err(|e| format!("ordered consumer messages: {e}"))?,
            );
        }
        let messages = self.messages.as_mut().expect("created above");
        while self.next <= last {
            match tokio::time::timeout(READ_STALL, messages.next()).await {
                Ok(Some(Ok(msg))) => {
                    let e = entry_of(&msg)?;
                    self.next = e.stream_seq + 1;
                    out.push(e);
                }
                Ok(Some(Err(e))) => {
                    self.messages = None;
                    return Err(format!("reading {}: {e}", subjects::STREAM_STAMPED));
                }
                Ok(None) | Err(_) => {
                    self.messages = None;
                    return Err(format!(
                        "{} stalled at {} of {last}",
                        subjects::STREAM_STAMPED,
                        self.next
                    ));
                }
            }
        }
        Ok(out)
    }
}

/// The stamped messages of one conversation (`chat.msg.*.<conv>` / `chat.gmsg.*.<conv>`).
pub struct ConvLog {
    reader: StreamReader,
    /// Every message read so far, in stream order.
    pub messages: Vec<Message>,
}

impl ConvLog {
    pub async fn new(js: &jetstream::Context, conv: &str) -> Result<Self, String> {
        let id = ConvId::parse(conv).map_err(|e| format!("{conv}: {e}"))?;
        Ok(Self {
            reader: StreamReader::filtered(js, subjects::stamped_any(&id)).await?,
            messages: Vec::new(),
        })
    }

    /// Reads the conversation's messages stamped since the last call.
    pub async fn read_new(&mut self) -> Result<(), String> {
        for e in self.reader.read_new().await? {
            if let Event::Message(m) = e.event {
                self.messages.push(m);
            }
        }
        Ok(())
    }
}

fn entry_of(msg: &jetstream::Message) -> Result<StreamEntry, String> {
    let info = msg.info().map_err(|e| format!("message info: {e}"))?;
    Ok(StreamEntry {
        stream_seq: info.stream_sequence,
        subject: msg.subject.to_string(),
        stamper: msg
            .headers
            .as_ref()
            .and_then(|h| h.get(STAMPER_HEADER))
            .map(|v| v.as_str().to_owned()),
        time_ms: u64::try_from(info.published.unix_timestamp_nanos() / 1_000_000).unwrap_or(0),
        event: event_of(&msg.payload),
    })
}

fn event_of(payload: &[u8]) -> Event {
    match serde_json::from_slice::<ServerFrame>(payload) {
        Ok(ServerFrame::Message(m)) => Event::Message(m),
        Ok(ServerFrame::Receipt(r)) => Event::Receipt(r),
        Ok(other) => Event::Other(format!("{other:?}")),
        Err(e) => Event::Other(format!("undecodable: {e}")),
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
