//! Follows `CHAT_MSGS` into the local store, in stream order, from the store's applied
//! watermark. With several sequencer processes each owning some partitions, this keeps every
//! embedded store complete, so any of them can answer history, sync and receipts. Writes are
//! idempotent: a message this process stamped and stored itself is simply confirmed, and
//! receipts are max-watermarks.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::DeliverPolicy, consumer::pull::OrderedConfig};
use chat_protocol::{ids::ConvId, subjects};
use chat_store::{Change, MessageStore};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::stamper::{decode_receipt, decode_stamped, members};

/// Largest batch written in one store transaction.
const BATCH: usize = 256;

pub async fn run<S: MessageStore>(js: jetstream::Context, store: S, shutdown: CancellationToken) {
    let mut backoff = Duration::from_millis(100);
    while !shutdown.is_cancelled() {
        match follow(&js, &store, &shutdown).await {
            Ok(()) => return,
            Err(err) => {
                tracing::warn!(error = %err, "store follower failed, restarting");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {},
                    _ = shutdown.cancelled() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

async fn follow<S: MessageStore>(
    js: &jetstream::Context,
    store: &S,
    shutdown: &CancellationToken,
) -> Result<(), async_nats::Error> {
    let start = store.applied_stream_seq().await? + 1;
    let stream = js.get_stream(subjects::STREAM_STAMPED).await?;
    let consumer = stream
        .create_consumer(OrderedConfig {
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: start,
            },
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?.ready_chunks(BATCH);
    tracing::info!(
        from_stream_seq = start,
        "following stamped messages into the store"
    );
    loop {
        let chunk = tokio::select! {
            chunk = messages.next() => chunk,
            _ = shutdown.cancelled() => return Ok(()),
        };
        let Some(chunk) = chunk else { return Ok(()) };
        let mut batch = Vec::with_capacity(chunk.len());
        let mut through = 0;
        for msg in chunk {
            let msg = msg?;
            let stream_seq = msg.info()?.stream_sequence;
            through = stream_seq;
            match decode_change(&msg.subject, &msg.payload, stream_seq) {
                Ok(change) => batch.push(change),
                Err(err) => {
                    tracing::error!(stream_seq, error = %err, "skipping undecodable stamped message")
                }
            }
        }
        let n = batch.len();
        store.apply(batch, Some(through)).await?;
        metrics::counter!("sequencer_followed_total").increment(n as u64);
    }
}

fn decode_change(subject: &str, payload: &[u8], stream_seq: u64) -> anyhow::Result<Change> {
    let change = if subjects::is_receipt_subject(subject) {
        let r = decode_receipt(payload, stream_seq)?;
        let members = members(&ConvId::parse(&r.conv)?);
        Change::receipt(r, members)
    } else {
        let m = decode_stamped(payload, stream_seq)?;
        crate::groups::change_for(&ConvId::parse(&m.conv)?, m, stream_seq)
    };
    Ok(change)
}
