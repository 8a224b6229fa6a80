//! The store writer: follows `CHAT_MSGS` into the local store, in stream order, from the
//! store's applied watermark, one store commit per batch.
//!
//! The stamped stream is the record; the store is a view of it that this writer keeps. It is
//! the only writer of the store in this process, so every stamped message is committed once
//! (whoever stamped it), and the stamper never waits for a store commit. A batch is whatever
//! arrived while the previous commit ran (up to [`BATCH`] messages), so under load one fsync
//! carries many messages (group commit). Each commit raises the applied watermark in the same
//! transaction; a writer killed mid-commit loses the whole batch and resumes after the last
//! committed watermark, and applying a message again is idempotent.
//!
//! Every commit is announced on [`Applied`], which is what readers (the APIs, the stamper
//! loading a conversation) wait on for read-your-writes.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use async_nats::jetstream::{self, consumer::DeliverPolicy, consumer::pull::OrderedConfig};
use chat_protocol::{ids::ConvId, subjects};
use chat_store::{Change, MessageStore};
use futures::StreamExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::records::{decode_receipt, decode_stamped, index_members, message_change};

/// Largest batch written in one store transaction.
const BATCH: usize = 2048;

/// After the first message of a batch, how long the writer waits for more before it commits:
/// at low rates this turns one commit (and fsync) per message into one per few milliseconds;
/// at high rates batches fill up while the previous commit runs anyway. Only readers wait for
/// the store, never the stamper.
const GATHER: Duration = Duration::from_millis(5);

/// How long the stream may stay silent (no message, no heartbeat) before the follow is
/// recreated: after a nats-server restart the ordered consumer is gone, and readers wait on
/// this writer.
const PULL_EXPIRY: Duration = Duration::from_millis(1000);

/// How long the follow may go without a message before the writer asks the stream whether it
/// holds more than the store applied, and if so follows again from the store's watermark.
/// The ordered consumer alone notices a consumer lost with a restarted server only ~16 s later
/// (its pull fails with "consumer not found"), and every read waits on this writer meanwhile.
const STALL: Duration = Duration::from_millis(1000);

/// The store's applied watermark as this process's writer last committed it.
#[derive(Debug, Clone)]
pub struct Applied(watch::Receiver<u64>);

/// The local store has not caught up in time.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the store applied the stamped stream up to {have}, not yet {want}")]
pub struct Behind {
    pub have: u64,
    pub want: u64,
}

impl Applied {
    /// A watermark and the sender the writer raises it with.
    pub fn new(initial: u64) -> (watch::Sender<u64>, Self) {
        let (tx, rx) = watch::channel(initial);
        (tx, Self(rx))
    }

    /// Every `CHAT_MSGS` message up to this stream sequence is in the store.
    pub fn get(&self) -> u64 {
        *self.0.borrow()
    }

    /// Waits until the store has applied stream sequence `want`, at most `limit`.
    pub async fn wait_for(&self, want: u64, limit: Duration) -> Result<(), Behind> {
        let mut rx = self.0.clone();
        let reached = tokio::time::timeout(limit, rx.wait_for(|have| *have >= want)).await;
        match reached {
            Ok(Ok(_)) => Ok(()),
            _ => Err(Behind {
                have: self.get(),
                want,
            }),
        }
    }
}

/// Follows the stream into `store` until `shutdown`, restarting after failures. `healthy` is
/// true while it follows (the readiness of the process), false after a failure until it
/// follows again.
pub async fn run<S: MessageStore>(
    js: jetstream::Context,
    store: S,
    applied: watch::Sender<u64>,
    healthy: Arc<AtomicBool>,
    shutdown: CancellationToken,
) {
    let mut backoff = Duration::from_millis(50);
    while !shutdown.is_cancelled() {
        match follow(&js, &store, &applied, &healthy, &shutdown).await {
            Ok(()) => return,
            Err(err) => {
                healthy.store(false, Ordering::Relaxed);
                tracing::warn!(error = %err, "store writer failed, restarting");
                metrics::counter!("sequencer_store_writer_restarts_total").increment(1);
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {},
                    _ = shutdown.cancelled() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

async fn follow<S: MessageStore>(
    js: &jetstream::Context,
    store: &S,
    applied: &watch::Sender<u64>,
    healthy: &AtomicBool,
    shutdown: &CancellationToken,
) -> Result<(), async_nats::Error> {
    let start = store.applied_stream_seq().await? + 1;
    applied.send_if_modified(|a| {
        let moved = start - 1 > *a;
        *a = (*a).max(start - 1);
        moved
    });
    let mut stream = js.get_stream(subjects::STREAM_STAMPED).await?;
    let consumer = stream
        .create_consumer(OrderedConfig {
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: start,
            },
            // Pull requests expire (and heartbeats come) this often, so a consumer lost with
            // a restarted server is noticed within about a second.
            max_expires: PULL_EXPIRY,
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    tracing::info!(
        from_stream_seq = start,
        "following stamped messages into the store"
    );
    let mut applied_through = start - 1;
    healthy.store(true, Ordering::Relaxed);
    let stopped = shutdown.cancelled();
    tokio::pin!(stopped);
    let stall = tokio::time::sleep(STALL);
    tokio::pin!(stall);
    loop {
        let first = tokio::select! {
            first = messages.next() => first,
            _ = &mut stall => {
                let last = stream.info().await?.state.last_sequence;
                if last > applied_through {
                    return Err(format!(
                        "no stamped message for {STALL:?} while the stream holds {last} and the \
                         store {applied_through}"
                    )
                    .into());
                }
                stall.as_mut().reset(tokio::time::Instant::now() + STALL);
                continue;
            }
            _ = &mut stopped => return Ok(()),
        };
        let Some(first) = first else { return Ok(()) };
        let mut chunk = vec![first];
        let deadline = tokio::time::Instant::now() + GATHER;
        while chunk.len() < BATCH {
            match tokio::time::timeout_at(deadline, messages.next()).await {
                Ok(Some(msg)) => chunk.push(msg),
                Ok(None) | Err(_) => break,
            }
        }
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
        let started = std::time::Instant::now();
        store.apply(batch, Some(through)).await?;
        metrics::histogram!("sequencer_store_commit_seconds")
            .record(started.elapsed().as_secs_f64());
        metrics::histogram!("sequencer_store_batch_size").record(n as f64);
        metrics::counter!("sequencer_followed_total").increment(n as u64);
        applied_through = applied_through.max(through);
        stall.as_mut().reset(tokio::time::Instant::now() + STALL);
        applied.send_if_modified(|a| {
            let moved = through > *a;
            *a = (*a).max(through);
            moved
        });
    }
}

fn decode_change(subject: &str, payload: &[u8], stream_seq: u64) -> anyhow::Result<Change> {
    let change = if subjects::is_receipt_subject(subject) {
        let r = decode_receipt(payload, stream_seq)?;
        let members = index_members(&ConvId::parse(&r.conv)?);
        Change::receipt(r, members)
    } else {
        let m = decode_stamped(payload, stream_seq)?;
        message_change(&ConvId::parse(&m.conv)?, m, stream_seq)
    };
    Ok(change)
}
