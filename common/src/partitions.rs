//! Drives one pinned pull consumer per partition.
//!
//! Each partition's durable consumer uses the `pinned_client` priority policy: of all processes
//! pulling it, the server delivers to exactly one (the pinned client) and moves the pin only after
//! that client stopped pulling for the consumer's `priority_timeout`. That gives one owner per
//! partition at a time; correctness across a pin move is the handler's business (the sequencer
//! fences its writes).

use std::{future::Future, sync::Arc, time::Duration};

use async_nats::jetstream::{self, AckKind, consumer::PullConsumer};
use futures::{FutureExt, StreamExt};
use tokio_util::sync::CancellationToken;

use crate::{balance::Balance, lag::Lag};

/// The partitions a process competes for: `requested`, or all of `0..total`. A partition that
/// does not exist is a configuration error.
pub fn select(requested: Option<&[u32]>, total: u32) -> anyhow::Result<Vec<u32>> {
    let Some(requested) = requested else {
        return Ok((0..total).collect());
    };
    if let Some(bad) = requested.iter().find(|p| **p >= total) {
        anyhow::bail!("partition {bad} does not exist (partitions are 0..{total})");
    }
    if requested.is_empty() {
        anyhow::bail!("the partition list is empty");
    }
    Ok(requested.to_vec())
}

/// How a partition consumer pulls.
#[derive(Debug, Clone)]
pub struct PullSettings {
    pub group: &'static str,
    pub batch: usize,
    /// Pull request expiry: also bounds how long a dead pin is kept by a live puller's requests.
    pub expires: Duration,
    /// Where the lag of each consumer is reported while this process pulls it.
    pub lag: Lag,
}

/// Runs `handle` for every message of every partition consumer, one message at a time per
/// partition (in stream order), until `shutdown`. Errors of the pull itself are logged and
/// retried with backoff; the handler acks or naks.
pub async fn run<H, Fut>(
    js: jetstream::Context,
    stream: &'static str,
    consumers: Vec<(u32, String)>,
    settings: PullSettings,
    handle: H,
    shutdown: CancellationToken,
) where
    H: Fn(u32, jetstream::Message) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    let handle = Arc::new(handle);
    let mut tasks = tokio::task::JoinSet::new();
    for (partition, name) in consumers {
        let js = js.clone();
        let handle = handle.clone();
        let settings = settings.clone();
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            consume_until(
                &js, stream, &name, partition, &settings, &*handle, &shutdown,
            )
            .await;
        });
    }
    while tasks.join_next().await.is_some() {}
}

/// Consumes one partition until `stop`, retrying failures of the pull itself with backoff.
async fn consume_until<H, Fut>(
    js: &jetstream::Context,
    stream: &'static str,
    name: &str,
    partition: u32,
    settings: &PullSettings,
    handle: &H,
    stop: &CancellationToken,
) where
    H: Fn(u32, jetstream::Message) -> Fut,
    Fut: Future<Output = ()>,
{
    let _lag = settings.lag.track(stream, name, partition);
    let mut backoff = Duration::from_millis(100);
    while !stop.is_cancelled() {
        match consume_partition(js, stream, name, partition, settings, handle, stop).await {
            Ok(()) => backoff = Duration::from_millis(100),
            Err(err) => {
                tracing::warn!(stream, consumer = %name, error = %err, "partition consumer failed, retrying");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {},
                    _ = stop.cancelled() => {},
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

async fn consume_partition<H, Fut>(
    js: &jetstream::Context,
    stream: &str,
    name: &str,
    partition: u32,
    settings: &PullSettings,
    handle: &H,
    shutdown: &CancellationToken,
) -> Result<(), async_nats::Error>
where
    H: Fn(u32, jetstream::Message) -> Fut,
    Fut: Future<Output = ()>,
{
    let consumer: PullConsumer = js.get_stream(stream).await?.get_consumer(name).await?;
    let mut messages = consumer
        .stream()
        .group(settings.group)
        .max_messages_per_batch(settings.batch)
        .expires(settings.expires)
        .messages()
        .await?;
    let stopped = shutdown.cancelled();
    tokio::pin!(stopped);
    loop {
        let next = tokio::select! {
            next = messages.next() => next,
            _ = &mut stopped => {
                // Deliveries already received but not handled go back now (a nak is
                // redelivered ahead of newer messages, to the next owner), instead of after
                // `ack_wait`. The stream is dropped first, so none comes back to it.
                let mut unhandled = Vec::new();
                while let Some(Some(Ok(msg))) = messages.next().now_or_never() {
                    unhandled.push(msg);
                }
                drop(messages);
                for msg in unhandled {
                    let _ = msg.ack_with(AckKind::Nak(None)).await;
                }
                return Ok(());
            }
        };
        match next {
            Some(Ok(msg)) => handle(partition, msg).await,
            Some(Err(err)) => return Err(err.into()),
            None => return Ok(()),
        }
    }
}

/// Like [`run`], but each process pulls only the consumers it owns among the live processes
/// of its kind (see [`crate::balance`]): it starts pulling a consumer when it becomes its owner
/// and stops (after the message in hand) when it no longer is; the server moves the pin once
/// the old owner has not pulled for the consumer's `priority_timeout`.
pub async fn run_balanced<H, Fut>(
    js: jetstream::Context,
    stream: &'static str,
    consumers: Vec<(u32, String)>,
    settings: PullSettings,
    balance: Balance,
    handle: H,
    shutdown: CancellationToken,
) where
    H: Fn(u32, jetstream::Message) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    let handle = Arc::new(handle);
    let mut tasks = tokio::task::JoinSet::new();
    for (partition, name) in consumers {
        let (js, handle, settings) = (js.clone(), handle.clone(), settings.clone());
        let (mut balance, shutdown) = (balance.clone(), shutdown.clone());
        tasks.spawn(async move {
            while balance.until_owned(&name, &shutdown).await {
                tracing::info!(stream, consumer = %name, "balance: pulling");
                metrics::gauge!("partition_consumers_owned").increment(1.0);
                let lost = shutdown.child_token();
                let watcher = {
                    let (mut balance, lost, name) = (balance.clone(), lost.clone(), name.clone());
                    tokio::spawn(async move {
                        balance.until_lost(&name, &lost).await;
                        lost.cancel();
                    })
                };
                consume_until(&js, stream, &name, partition, &settings, &*handle, &lost).await;
                watcher.abort();
                metrics::gauge!("partition_consumers_owned").decrement(1.0);
                if !shutdown.is_cancelled() {
                    tracing::info!(stream, consumer = %name, "balance: released to another process");
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::select;

    #[test]
    fn selects_all_or_the_requested_existing_partitions() {
        assert_eq!(select(None, 3).unwrap(), vec![0, 1, 2]);
        assert_eq!(select(Some(&[2, 0]), 3).unwrap(), vec![2, 0]);
        assert!(select(Some(&[3]), 3).is_err());
        assert!(select(Some(&[]), 3).is_err());
    }
}
