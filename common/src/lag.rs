//! JetStream consumer lag as Prometheus gauges, exported by the process that pulls each
//! consumer.
//!
//! A process registers each consumer while it pulls it ([`Lag::track`]); every `interval` it
//! asks the server for the info of those consumers only, one request after the other, and sets
//! - `chat_consumer_pending_messages{stream, consumer, partition}`: messages of the consumer's
//!   filter not delivered yet (the backlog);
//! - `chat_consumer_ack_pending_messages{stream, consumer, partition}`: delivered, not acked yet
//!   (in flight, bounded by `max_ack_pending`);
//! - `chat_consumer_redelivered_messages{...}`: of those, delivered more than once.
//!
//! So the fleet makes one consumer info request per consumer and interval, whatever the number
//! of replicas, and a consumer nobody pulls is not reported at all (alert on the pulling
//! service being down instead). When a process stops pulling a consumer its gauges go to 0:
//! sum or max over instances (`max by (stream, consumer)`) gives the owner's value.
//! Labels are stream and consumer names (a few per partition), never a user or conversation.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio_util::sync::CancellationToken;

/// Gauge: messages of a consumer not delivered yet.
pub const PENDING: &str = "chat_consumer_pending_messages";
/// Gauge: messages of a consumer delivered and not acked yet.
pub const ACK_PENDING: &str = "chat_consumer_ack_pending_messages";
/// Gauge: messages of a consumer delivered more than once and not acked yet.
pub const REDELIVERED: &str = "chat_consumer_redelivered_messages";
/// Counter: consumer info requests that failed.
pub const ERRORS: &str = "chat_consumer_info_errors_total";

type Key = (&'static str, String);

/// The consumers this process pulls, and the task that reports their lag.
#[derive(Debug, Clone, Default)]
pub struct Lag {
    tracked: Arc<Mutex<BTreeMap<Key, u32>>>,
}

/// Registration of one consumer; dropping it stops the reports and zeroes its gauges.
pub struct Tracked {
    lag: Lag,
    key: Key,
    partition: u32,
}

impl Lag {
    /// Starts reporting every `interval` until `stop`; a zero `interval` reports nothing (the
    /// registrations still work).
    pub fn start(
        js: async_nats::jetstream::Context,
        interval: Duration,
        stop: CancellationToken,
    ) -> Self {
        let lag = Self::default();
        if interval.is_zero() {
            return lag;
        }
        metrics::describe_gauge!(
            PENDING,
            "Messages of a JetStream consumer not delivered yet"
        );
        metrics::describe_gauge!(
            ACK_PENDING,
            "Messages of a JetStream consumer delivered and not acked yet"
        );
        metrics::describe_gauge!(
            REDELIVERED,
            "Messages of a JetStream consumer delivered more than once, not acked yet"
        );
        let this = lag.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while stop.run_until_cancelled(tick.tick()).await.is_some() {
                this.report(&js).await;
            }
        });
        lag
    }

    /// Reports `consumer` of `stream` (partition `partition`) until the guard is dropped.
    pub fn track(&self, stream: &'static str, consumer: &str, partition: u32) -> Tracked {
        let key = (stream, consumer.to_owned());
        self.tracked
            .lock()
            .expect("lag lock")
            .insert(key.clone(), partition);
        Tracked {
            lag: self.clone(),
            key,
            partition,
        }
    }

    async fn report(&self, js: &async_nats::jetstream::Context) {
        let now: Vec<(Key, u32)> = self
            .tracked
            .lock()
            .expect("lag lock")
            .iter()
            .map(|(k, p)| (k.clone(), *p))
            .collect();
        for ((stream, consumer), partition) in now {
            let info = match js.get_stream_no_info(stream).await {
                Ok(s) => s.consumer_info(&consumer).await.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match info {
                Ok(info) => {
                    // Released meanwhile: its gauges were zeroed and stay so.
                    let still = self
                        .tracked
                        .lock()
                        .expect("lag lock")
                        .contains_key(&(stream, consumer.clone()));
                    if still {
                        set(stream, &consumer, partition, &info);
                    }
                }
                Err(err) => {
                    metrics::counter!(ERRORS).increment(1);
                    tracing::debug!(stream, consumer = %consumer, error = %err, "consumer info failed");
                }
            }
        }
    }
}

fn labels(stream: &'static str, consumer: &str, partition: u32) -> [(&'static str, String); 3] {
    [
        ("stream", stream.to_owned()),
        ("consumer", consumer.to_owned()),
        ("partition", partition.to_string()),
    ]
}

fn set(
    stream: &'static str,
    consumer: &str,
    partition: u32,
    info: &async_nats::jetstream::consumer::Info,
) {
    let l = labels(stream, consumer, partition);
    metrics::gauge!(PENDING, &l).set(info.num_pending as f64);
    metrics::gauge!(ACK_PENDING, &l).set(info.num_ack_pending as f64);
    metrics::gauge!(REDELIVERED, &l).set(info.num_redelivered as f64);
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.lag.tracked.lock().expect("lag lock").remove(&self.key);
        let l = labels(self.key.0, &self.key.1, self.partition);
        metrics::gauge!(PENDING, &l).set(0.0);
        metrics::gauge!(ACK_PENDING, &l).set(0.0);
        metrics::gauge!(REDELIVERED, &l).set(0.0);
    }
}
