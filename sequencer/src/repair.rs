//! Startup repair when the store is ahead of `CHAT_MSGS` (after a power loss).
//!
//! The embedded store fsyncs every commit; a single nats-server with the default
//! `sync_interval` (2 min) does not. A power loss can therefore leave the store holding stamped
//! messages whose stream tail is gone: the store's applied watermark `W` is above the stream's
//! last sequence `L`. Left alone, the stamper would give the lost messages' seqs to new
//! messages (two different messages at one seq, and devices that showed the first would be
//! shown the second), and the store writer would skip the new stream sequences up to `W`.
//!
//! **The store wins for what it has; the stream is repaired from it.** Before this process
//! stamps or follows anything, every stream sequence in `L+1..=W` is published again, in order,
//! each fenced with `Nats-Expected-Last-Sequence` so it lands at exactly its old stream
//! sequence: a stored message as the same `message` frame (same seq, same client id, same
//! `Nats-Msg-Id`), a sequence the store has no message for (it was a receipt, whose effect the
//! store keeps only as watermarks) as a `receipt` frame restating the current watermarks of the
//! sender of the nearest repaired message (true, and idempotent: watermarks only grow). The
//! store then agrees with the stream row for row, the writer re-applies the range idempotently,
//! and seqs stay dense with nothing acked lost. When the store holds no message above `L`,
//! nothing of the messages was lost: the watermark is only rewound to `L`.
//!
//! If the fence fails (another process stamped meanwhile), the repair cannot restore the
//! order and the sequencer refuses to start with an error naming both positions: rebuild that
//! store from the stream (delete its directory) and start again.

use async_nats::{HeaderMap, jetstream};
use chat_protocol::{
    api::dedupe_id,
    frames::{Receipt, ServerFrame},
    ids::ConvId,
    subjects,
};
use chat_store::{EmbeddedStore, MessageStore, StoredMessage};

use crate::{STAMPER_HEADER, records::to_frame};

/// Why the repair could not run.
#[derive(Debug, thiserror::Error)]
pub enum RepairError {
    #[error("cannot read the stamped stream: {0}")]
    Stream(String),
    #[error("store: {0}")]
    Store(#[from] chat_store::StoreError),
    #[error(
        "the store is ahead of the stamped stream (store {store}, stream {stream}) and \
         republishing stream seq {at} failed: {reason}; rebuild the store from the stream \
         (remove its directory) and start again"
    )]
    Republish {
        store: u64,
        stream: u64,
        at: u64,
        reason: String,
    },
}

/// What the repair did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repair {
    /// The store was not ahead of the stream.
    None,
    /// The stream's lost tail was published again from the store: `messages` stored messages
    /// and `fillers` receipts.
    Republished { messages: u64, fillers: u64 },
    /// The store held no message past the stream: only its watermark went back.
    Rewound { to: u64 },
}

/// Repairs `CHAT_MSGS` from `store` when the store is ahead of it (see the module doc).
pub async fn run(
    js: &jetstream::Context,
    store: &EmbeddedStore,
    partitions: u32,
    instance: &str,
) -> Result<Repair, RepairError> {
    let applied = store.applied_stream_seq().await?;
    let mut stream = js
        .get_stream(subjects::STREAM_STAMPED)
        .await
        .map_err(|e| RepairError::Stream(e.to_string()))?;
    let last = stream
        .info()
        .await
        .map_err(|e| RepairError::Stream(e.to_string()))?
        .state
        .last_sequence;
    if applied <= last {
        return Ok(Repair::None);
    }
    tracing::warn!(
        store = applied,
        stream = last,
        "the store is ahead of the stamped stream (power loss?): repairing the stream"
    );
    let lost = store.messages_after_stream_seq(last).await?;
    if lost.is_empty() {
        store.rewind_applied_stream_seq(last).await?;
        tracing::warn!(
            to = last,
            "no stored message was lost: store watermark rewound"
        );
        return Ok(Repair::Rewound { to: last });
    }
    let mut next = lost.iter().peekable();
    let (mut messages, mut fillers) = (0, 0);
    let mut nearest: &StoredMessage = &lost[0];
    for at in last + 1..=applied {
        let fail = |reason: String| RepairError::Republish {
            store: applied,
            stream: last,
            at,
            reason,
        };
        let (subject, headers, payload) = match next.next_if(|m| m.stream_seq == at) {
            Some(m) => {
                nearest = m;
                messages += 1;
                message(m, partitions, instance).map_err(fail)?
            }
            None => {
                fillers += 1;
                filler(store, nearest, at, partitions, instance)
                    .await
                    .map_err(fail)?
            }
        };
        let mut headers = headers;
        headers.insert(
            async_nats::header::NATS_EXPECTED_LAST_SEQUENCE,
            (at - 1).to_string().as_str(),
        );
        let ack = js
            .publish_with_headers(subject, headers, payload.into())
            .await
            .map_err(|e| fail(e.to_string()))?
            .await
            .map_err(|e| fail(e.to_string()))?;
        if ack.sequence != at {
            return Err(fail(format!("it landed at stream seq {}", ack.sequence)));
        }
    }
    tracing::warn!(messages, fillers, "stamped stream repaired from the store");
    Ok(Repair::Republished { messages, fillers })
}

type Publish = (String, HeaderMap, Vec<u8>);

fn message(m: &StoredMessage, partitions: u32, instance: &str) -> Result<Publish, String> {
    let conv = ConvId::parse(&m.conv).map_err(|e| e.to_string())?;
    let mut headers = HeaderMap::new();
    headers.insert(
        async_nats::header::NATS_MESSAGE_ID,
        dedupe_id(conv.as_str(), &m.from, &m.client_id).as_str(),
    );
    headers.insert(STAMPER_HEADER, instance);
    let frame = ServerFrame::Message(to_frame(m.clone()));
    let subject = subjects::stamped(&conv, subjects::partition_of(&conv, partitions));
    Ok((
        subject,
        headers,
        serde_json::to_vec(&frame).expect("frame encodes"),
    ))
}

async fn filler(
    store: &EmbeddedStore,
    nearest: &StoredMessage,
    at: u64,
    partitions: u32,
    instance: &str,
) -> Result<Publish, String> {
    let conv = ConvId::parse(&nearest.conv).map_err(|e| e.to_string())?;
    let marks = store
        .watermarks(conv.as_str())
        .await
        .map_err(|e| e.to_string())?;
    let (delivered, read) = marks
        .iter()
        .find(|m| m.user == nearest.from)
        .map_or((nearest.seq, nearest.seq), |m| (m.delivered, m.read));
    let receipt = Receipt {
        conv: conv.to_string(),
        user: nearest.from.clone(),
        delivered,
        read,
    };
    let mut headers = HeaderMap::new();
    headers.insert(
        async_nats::header::NATS_MESSAGE_ID,
        format!("repair:{at}").as_str(),
    );
    headers.insert(STAMPER_HEADER, instance);
    let subject = subjects::receipts(&conv, subjects::partition_of(&conv, partitions));
    Ok((
        subject,
        headers,
        serde_json::to_vec(&ServerFrame::Receipt(receipt)).expect("frame encodes"),
    ))
}
