//! The delivery budget of group fan-out: one token bucket per conversation and one for the
//! whole worker (governor). Every NATS publish the worker makes for a group (a push to a
//! member's subject, a large group's one publish, a receipt) takes one delivery from both, so
//! one busy group is held to its own rate and the rest of the worker's group capacity stays
//! available to every other group. One-to-one traffic never waits here: it has consumers and
//! tasks of its own.

use std::{
    num::NonZeroU32,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota};
use tokio::time::Instant;

/// Per-conversation and global delivery rates.
pub struct Budget {
    per_conv: DefaultKeyedRateLimiter<String>,
    global: DefaultDirectRateLimiter,
}

fn quota(per_second: u32, burst: u32) -> Quota {
    let per_second = NonZeroU32::new(per_second).unwrap_or(NonZeroU32::MIN);
    let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
    Quota::per_second(per_second).allow_burst(burst)
}

impl Budget {
    pub fn new(conv_rate: u32, conv_burst: u32, global_rate: u32, global_burst: u32) -> Self {
        Self {
            per_conv: DefaultKeyedRateLimiter::keyed(quota(conv_rate, conv_burst)),
            global: DefaultDirectRateLimiter::direct(quota(global_rate, global_burst)),
        }
    }

    /// Takes one delivery for `conv`, waiting as long as either budget is spent. Returns how
    /// long it waited (zero when both had a token).
    pub async fn take(&self, conv: &str) -> Duration {
        let key = conv.to_owned();
        let mut waited = None;
        if self.per_conv.check_key(&key).is_err() {
            let start = Instant::now();
            self.per_conv.until_key_ready(&key).await;
            waited = Some(start);
        }
        if self.global.check().is_err() {
            let start = Instant::now();
            self.global.until_ready().await;
            waited = waited.or(Some(start));
        }
        let waited = waited.map(|t| t.elapsed()).unwrap_or_default();
        if !waited.is_zero() {
            metrics::counter!("fanout_group_deferred_deliveries_total").increment(1);
        }
        waited
    }

    /// Forgets the buckets of conversations idle long enough to be full again.
    pub fn prune(&self) {
        self.per_conv.retain_recent();
        self.per_conv.shrink_to_fit();
    }
}

/// The deliveries of one stamped event of conversation `conv`: takes them from the budget and
/// adds up how long they waited.
pub struct Spend<'a> {
    budget: &'a Budget,
    conv: &'a str,
    waited_ns: AtomicU64,
}

impl<'a> Spend<'a> {
    pub fn new(budget: &'a Budget, conv: &'a str) -> Self {
        Self {
            budget,
            conv,
            waited_ns: AtomicU64::new(0),
        }
    }

    /// Takes one delivery, waiting when the budget is spent.
    pub async fn take(&self) {
        let waited = self.budget.take(self.conv).await;
        let ns = u64::try_from(waited.as_nanos()).unwrap_or(u64::MAX);
        self.waited_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// How long this event's deliveries waited for the budget in all.
    pub fn waited(&self) -> Duration {
        Duration::from_nanos(self.waited_ns.load(Ordering::Relaxed))
    }
}
