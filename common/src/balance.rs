//! Spreads partition consumers over the live processes of one kind.
//!
//! A pinned-client consumer goes to whichever process pulled first, so with every process
//! pulling every partition, the first one to start would own them all and the others would
//! idle as standbys. Instead, each process announces itself on a core NATS subject every
//! `heartbeat`, keeps the set of processes it heard from within `expire`, and pulls only the
//! consumers it owns by rendezvous hashing over that set: the owner of a consumer is the live
//! process with the highest hash of (process, consumer). Every process computes the same owners
//! from the same set, a process joining or leaving moves only its share, and a dead process's
//! consumers are taken over once its heartbeats have been missing for `expire` (then the server
//! moves the pin after the consumer's `priority_timeout`).
//!
//! While the sets of two processes briefly disagree (a join or a death being noticed), both may
//! pull a consumer: the server still delivers it to one pinned client only.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use futures::StreamExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// How processes of one kind find each other.
#[derive(Debug, Clone)]
pub struct BalanceSettings {
    /// Core NATS subject the processes announce themselves on (one per kind of process).
    pub subject: String,
    /// This process's id, unique among the live processes of its kind.
    pub instance: String,
    /// How often this process announces itself.
    pub heartbeat: Duration,
    /// A process not heard from for this long is considered gone.
    pub expire: Duration,
}

/// The live processes of one kind, as this process sees them.
#[derive(Debug, Clone)]
pub struct Balance {
    instance: String,
    live: watch::Receiver<BTreeSet<String>>,
}

impl Balance {
    /// Starts announcing this process and listening to the others until `shutdown`. Waits one
    /// `expire` before returning, so the first owners are computed from a complete set.
    pub async fn start(
        client: async_nats::Client,
        settings: BalanceSettings,
        shutdown: CancellationToken,
    ) -> Result<Self, async_nats::SubscribeError> {
        let mut heard = client.subscribe(settings.subject.clone()).await?;
        let me = settings.instance.clone();
        let (tx, live) = watch::channel(BTreeSet::from([me.clone()]));
        let announce = {
            let (client, subject, me) = (client.clone(), settings.subject.clone(), me.clone());
            move || {
                let (client, subject, me) = (client.clone(), subject.clone(), me.clone());
                async move {
                    if let Err(err) = client.publish(subject, me.into_bytes().into()).await {
                        tracing::warn!(error = %err, "balance heartbeat failed");
                    }
                }
            }
        };
        announce().await;
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let mut seen: BTreeMap<String, Instant> = BTreeMap::new();
            let mut tick = tokio::time::interval(settings.heartbeat);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => announce().await,
                    msg = heard.next() => match msg {
                        Some(m) => {
                            if let Ok(id) = std::str::from_utf8(&m.payload) {
                                seen.insert(id.to_owned(), Instant::now());
                            }
                        }
                        None => return,
                    },
                }
                seen.retain(|_, at| at.elapsed() < settings.expire);
                let mut now: BTreeSet<String> = seen.keys().cloned().collect();
                now.insert(me.clone());
                tx.send_if_modified(|set| {
                    if *set == now {
                        return false;
                    }
                    tracing::info!(live = ?now, "balance: live processes changed");
                    *set = now;
                    true
                });
            }
        });
        tokio::select! {
            _ = tokio::time::sleep(settings.expire) => {},
            _ = shutdown.cancelled() => {},
        }
        Ok(Self {
            instance: settings.instance,
            live,
        })
    }

    /// Whether this process owns `consumer` among the live processes it knows.
    pub fn owns(&self, consumer: &str) -> bool {
        owner(&self.live.borrow(), consumer).is_some_and(|o| o == self.instance)
    }

    /// Waits until this process owns `consumer` (true), or `shutdown` (false).
    pub async fn until_owned(&mut self, consumer: &str, shutdown: &CancellationToken) -> bool {
        loop {
            if shutdown.is_cancelled() {
                return false;
            }
            if self.owns(consumer) {
                return true;
            }
            tokio::select! {
                changed = self.live.changed() => if changed.is_err() { return false },
                _ = shutdown.cancelled() => return false,
            }
        }
    }

    /// Waits until this process no longer owns `consumer`, or `shutdown`.
    pub async fn until_lost(&mut self, consumer: &str, shutdown: &CancellationToken) {
        loop {
            if !self.owns(consumer) {
                return;
            }
            tokio::select! {
                changed = self.live.changed() => if changed.is_err() { return },
                _ = shutdown.cancelled() => return,
            }
        }
    }
}

/// The owner of `consumer` among `live`: the highest rendezvous hash.
pub fn owner<'a>(live: &'a BTreeSet<String>, consumer: &str) -> Option<&'a str> {
    live.iter()
        .max_by_key(|p| score(p, consumer))
        .map(String::as_str)
}

/// FNV-1a 64 of `process`, a separator and `consumer`, finished with a mixer so that similar
/// names spread well.
fn score(process: &str, consumer: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in process.bytes().chain([0xff]).chain(consumer.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // splitmix64 finalizer
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ids: &[&str]) -> BTreeSet<String> {
        ids.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn owners_spread_and_move_only_the_leavers_share() {
        let consumers: Vec<String> = (0..8)
            .flat_map(|p| [format!("fanout-p{p}"), format!("fanout-g-p{p}")])
            .collect();
        let three = set(&["w-a", "w-b", "w-c"]);
        let mut count = BTreeMap::new();
        for c in &consumers {
            *count.entry(owner(&three, c).unwrap()).or_insert(0) += 1;
        }
        assert_eq!(count.len(), 3, "every process owns something: {count:?}");
        assert!(count.values().all(|n| *n >= 2), "{count:?}");
        // w-c leaves: what w-a and w-b owned stays where it was.
        let two = set(&["w-a", "w-b"]);
        for c in &consumers {
            let before = owner(&three, c).unwrap();
            if before != "w-c" {
                assert_eq!(owner(&two, c).unwrap(), before, "{c}");
            }
        }
        assert_eq!(owner(&set(&[]), "x"), None);
        assert_eq!(owner(&set(&["solo"]), "x"), Some("solo"));
    }
}
