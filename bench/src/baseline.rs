//! The broker's ceiling on this box, measured in the same run on the same nats-server as the
//! pipeline, with the same payload size, through async-nats (the way `nats bench` measures):
//!
//! - **JetStream**: async publish to a file-backed stream (the storage `CHAT_IN` uses) with a
//!   window of unacknowledged publishes, while a durable pull consumer (explicit ack, like the
//!   services') consumes concurrently on its own connection. The rate is messages consumed over
//!   the time from the first publish to the last message consumed.
//! - **core NATS**: publish as fast as the client takes them, one subscriber on its own
//!   connection; the rate is messages received over the same span.
//!
//! Both are closed loop at saturation: their latencies are those of a full pipe, shown for
//! reference only. The pipeline's ratio is its delivered/s over the JetStream rate.

use std::time::Duration;

use anyhow::{Context, Result};
use async_nats::jetstream::{self, consumer::pull, stream};
use bytes_util::payload;
use futures::{StreamExt, stream::FuturesOrdered};
use serde::Serialize;
use tokio::time::Instant;

use crate::stats::{self, Latency};

/// Stream and subjects of the baseline (not chat subjects: the pipeline never sees them).
const JS_STREAM: &str = "BENCH_BASELINE";
const JS_SUBJECT: &str = "bench.baseline.js";
const CORE_SUBJECT: &str = "bench.baseline.core";
/// Unacknowledged JetStream publishes in flight.
const WINDOW: usize = 256;
/// Give up waiting for the consumer or subscriber after this long without progress.
const STALL: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Serialize)]
pub struct Baseline {
    pub messages: u64,
    pub size: usize,
    pub jetstream: JsResult,
    pub core: CoreResult,
}

#[derive(Debug, Clone, Serialize)]
pub struct JsResult {
    pub published: u64,
    pub consumed: u64,
    /// Publishes acknowledged per second (publisher alone).
    pub publish_per_s: f64,
    /// Messages consumed per second, first publish to last consumed: the ceiling.
    pub msgs_per_s: f64,
    pub publish_ack_latency: Latency,
    pub end_to_end_latency: Latency,
}

#[derive(Debug, Clone, Serialize)]
pub struct CoreResult {
    pub published: u64,
    pub received: u64,
    pub msgs_per_s: f64,
}

impl Baseline {
    pub fn summary(&self) -> String {
        format!(
            "baseline ({} msgs of {} B on this nats-server):\n  \
             JetStream publish+consume: {:.0} msg/s (publish alone {:.0}/s), consumed {}/{}\n    \
             publish ack (saturated): {}\n    end to end (saturated): {}\n  \
             core NATS pub/sub: {:.0} msg/s, received {}/{}\n",
            self.messages,
            self.size,
            self.jetstream.msgs_per_s,
            self.jetstream.publish_per_s,
            self.jetstream.consumed,
            self.jetstream.published,
            self.jetstream.publish_ack_latency.line(),
            self.jetstream.end_to_end_latency.line(),
            self.core.msgs_per_s,
            self.core.received,
            self.core.published,
        )
    }
}

/// Both baselines, `messages` each, payloads of `size` bytes.
pub async fn measure(nats_url: &str, messages: u64, size: usize) -> Result<Baseline> {
    let jetstream = measure_js(nats_url, messages, size).await?;
    let core = measure_core(nats_url, messages, size).await?;
    Ok(Baseline {
        messages,
        size,
        jetstream,
        core,
    })
}

/// Helpers for timestamped payloads.
mod bytes_util {
    use tokio::time::Instant;

    /// `size` bytes (at least 8) starting with the µs since `base`.
    pub fn payload(base: Instant, size: usize) -> Vec<u8> {
        let us = u64::try_from(base.elapsed().as_micros()).unwrap_or(u64::MAX);
        let mut p = vec![b'x'; size.max(8)];
        p[..8].copy_from_slice(&us.to_le_bytes());
        p
    }

    /// The send time a payload carries.
    pub fn sent_at(base: Instant, p: &[u8]) -> Option<Instant> {
        let us = u64::from_le_bytes(p.get(..8)?.try_into().ok()?);
        Some(base + std::time::Duration::from_micros(us))
    }
}

async fn measure_js(url: &str, messages: u64, size: usize) -> Result<JsResult> {
    let pub_client = async_nats::connect(url)
        .await
        .context("connect publisher")?;
    let sub_client = async_nats::connect(url).await.context("connect consumer")?;
    let js = jetstream::new(pub_client.clone());
    let _ = js.delete_stream(JS_STREAM).await;
    let stream = js
        .create_stream(stream::Config {
            name: JS_STREAM.into(),
            subjects: vec![JS_SUBJECT.into()],
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .context("create baseline stream")?;
    stream
        .create_consumer(pull::Config {
            durable_name: Some("bench".into()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await
        .context("create baseline consumer")?;
    let consumer: pull::Stream = jetstream::new(sub_client)
        .get_consumer_from_stream::<pull::Config, _, _>("bench", JS_STREAM)
        .await
        .context("baseline consumer")?
        .stream()
        .max_messages_per_batch(1000)
        .messages()
        .await
        .context("consume")?;

    let base = Instant::now();
    let consume = async move {
        let mut consumer = consumer;
        let mut h = stats::histogram();
        let mut n = 0u64;
        let mut last = Instant::now();
        while n < messages {
            match tokio::time::timeout(STALL, consumer.next()).await {
                Ok(Some(Ok(m))) => {
                    let now = Instant::now();
                    if let Some(at) = bytes_util::sent_at(base, &m.payload) {
                        stats::record(&mut h, now.saturating_duration_since(at));
                    }
                    let _ = m.ack().await;
                    n += 1;
                    last = now;
                }
                _ => break,
            }
        }
        (n, last, h)
    };
    let publish = async {
        let mut h = stats::histogram();
        let mut inflight = FuturesOrdered::new();
        let mut acked = 0u64;
        for _ in 0..messages {
            if inflight.len() >= WINDOW
                && let Some(r) = inflight.next().await
            {
                acked += ack_done(r, &mut h);
            }
            let sent = Instant::now();
            let ack = js
                .publish(JS_SUBJECT, payload(base, size).into())
                .await
                .context("publish")?;
            inflight.push_back(async move { (ack.await, sent) });
        }
        while let Some(r) = inflight.next().await {
            acked += ack_done(r, &mut h);
        }
        anyhow::Ok((acked, base.elapsed(), h))
    };
    let (published, (consumed, last, e2e)) = tokio::join!(publish, consume);
    let (published, pub_elapsed, ack_h) = published?;
    let _ = js.delete_stream(JS_STREAM).await;
    Ok(JsResult {
        published,
        consumed,
        publish_per_s: published as f64 / pub_elapsed.as_secs_f64().max(1e-9),
        msgs_per_s: consumed as f64 / last.duration_since(base).as_secs_f64().max(1e-9),
        publish_ack_latency: Latency::of(&ack_h),
        end_to_end_latency: Latency::of(&e2e),
    })
}

fn ack_done<E>(
    (r, sent): (Result<jetstream::publish::PublishAck, E>, Instant),
    h: &mut hdrhistogram::Histogram<u64>,
) -> u64 {
    stats::record(h, sent.elapsed());
    u64::from(r.is_ok())
}

async fn measure_core(url: &str, messages: u64, size: usize) -> Result<CoreResult> {
    let pub_client = async_nats::connect(url)
        .await
        .context("connect publisher")?;
    let sub_client = async_nats::connect(url)
        .await
        .context("connect subscriber")?;
    let mut sub = sub_client
        .subscribe(CORE_SUBJECT)
        .await
        .context("subscribe")?;
    // A request on the subscriber's connection is answered (no responders) only after the
    // server has processed everything before it, the SUB included: then publishing may start.
    let _ = sub_client
        .request(format!("{CORE_SUBJECT}.ready"), bytes::Bytes::new())
        .await;
    let base = Instant::now();
    let receive = async move {
        let mut n = 0u64;
        let mut last = Instant::now();
        while n < messages {
            match tokio::time::timeout(STALL, sub.next()).await {
                Ok(Some(_)) => {
                    n += 1;
                    last = Instant::now();
                }
                _ => break,
            }
        }
        (n, last)
    };
    let publish = async {
        let body: bytes::Bytes = payload(base, size).into();
        for _ in 0..messages {
            pub_client.publish(CORE_SUBJECT, body.clone()).await?;
        }
        pub_client.flush().await?;
        anyhow::Ok(())
    };
    let (published, (received, last)) = tokio::join!(publish, receive);
    published?;
    Ok(CoreResult {
        published: messages,
        received,
        msgs_per_s: received as f64 / last.duration_since(base).as_secs_f64().max(1e-9),
    })
}
