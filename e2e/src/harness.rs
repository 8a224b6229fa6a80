//! One fault scenario from start to verdict: [`Run::start`] brings up the cluster and the
//! simulated clients (with the sequencers as hot standbys, the first one owns every partition
//! and the others only pull; balanced, they share the partitions from the start), the scenario
//! injects its fault while traffic runs, and [`Run::finish`] lets everything settle, stops the
//! services, runs the checker and prints the summary line.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use chat_protocol::{
    jetstream::{live_partitions, sequencer_consumer},
    subjects,
};

use crate::{
    audit::{self, StreamEntry, StreamReader},
    check::{self, CheckInput},
    client,
    cluster::{Cluster, ClusterConfig, SECRET, target_dir},
    sim::{Simulation, standard_population},
};

/// Bound on waiting for pending sends and message convergence after the traffic stops.
const SETTLE_MESSAGES: Duration = Duration::from_secs(30);
/// Bound on waiting for receipts to converge after the final reads.
const SETTLE_RECEIPTS: Duration = Duration::from_secs(20);
/// Bound on each group of services draining after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// Bound on the start: the first stamps, the groups, the standbys pulling.
const WARM_UP: Duration = Duration::from_secs(30);

/// A running scenario.
pub struct Run {
    pub name: String,
    pub cluster: Cluster,
    pub sim: Simulation,
    started: Instant,
    /// `started`, in ms since the epoch (to place stream timestamps).
    started_ms: u64,
    /// Start of the measured traffic (ms since the epoch): the end of the warm-up, so the rate
    /// is that of the scenario itself, fault included.
    measured_since_ms: u64,
    /// Set by the scenario when it measured one.
    pub takeover_ms: Option<u64>,
    pub in_flight: Option<u64>,
    pub reads_back_ms: Option<u64>,
    /// Instances that must not stamp after a moment (except where they won a pin anew).
    forbidden: Vec<(String, u64)>,
    /// Every pin assignment on the sequencer consumers from the end of the warm-up on.
    pins: Option<PinWatch>,
    /// Violations found while the scenario ran (checked with the rest at the end).
    pub violations: Vec<String>,
}

fn log(name: &str, started: Instant, what: &str) {
    eprintln!("[{name} +{:>5} ms] {what}", started.elapsed().as_millis());
}

impl Run {
    /// Starts nats-server, the gateways, the sequencers and fan-out workers, and every
    /// simulated device; turns traffic on and creates the groups made at the start.
    ///
    /// With hot-standby sequencers (`sequencer_balance: false`) only the first sequencer runs
    /// until every conversation has a stamped message (so it pinned every partition in use);
    /// then the others start and the run waits until they pull every partition too. Balanced,
    /// every sequencer starts at once and the run waits until each has stamped something (they
    /// have claimed their shares). Other fan-out workers start after the warm-up. Then the
    /// flaky devices start going offline.
    pub async fn start(name: &str, config: ClusterConfig) -> Self {
        let started = Instant::now();
        let started_ms = chat_protocol::now_ms();
        let mut cluster = Cluster::new(config).await;
        cluster.spawn_gateways().await;
        let first_sequencers = if config.sequencer_balance {
            cluster.sequencers.len()
        } else {
            1
        };
        for s in cluster.sequencers.iter_mut().take(first_sequencers) {
            s.spawn();
        }
        cluster.fanouts[0].spawn();
        let population = standard_population(cluster.gateway_urls.len());
        let mut sim =
            Simulation::start(population, cluster.gateway_urls.clone(), SECRET.as_bytes());
        sim.set_sending(true);
        log(name, started, "cluster up, traffic on");
        let js = cluster.js();
        let warm = async {
            sim.create_start_groups(&js, WARM_UP).await?;
            sim.wait_every_conv_stamped(&js, WARM_UP).await
        };
        if let Err(e) = warm.await {
            panic!("{name}: warm-up failed: {e}\n{}", cluster.log_tails());
        }
        for s in cluster.sequencers.iter_mut().skip(first_sequencers) {
            s.spawn();
        }
        for f in cluster.fanouts.iter_mut().skip(1) {
            f.spawn();
        }
        let mut run = Self {
            name: name.to_owned(),
            cluster,
            sim,
            started,
            started_ms,
            measured_since_ms: 0,
            takeover_ms: None,
            in_flight: None,
            reads_back_ms: None,
            forbidden: Vec::new(),
            pins: None,
            violations: Vec::new(),
        };
        let ready = if config.sequencer_balance {
            run.wait_every_sequencer_stamps(WARM_UP).await
        } else {
            run.wait_every_partition_pulled_by(config.sequencers, WARM_UP)
                .await
        };
        if let Err(e) = ready {
            panic!("{name}: warm-up failed: {e}\n{}", run.cluster.log_tails());
        }
        run.pins = Some(run.watch_pins().await);
        run.sim.start_chaos();
        run.measured_since_ms = chat_protocol::now_ms();
        run.step("every sequencer ready, flaky devices on");
        run
    }

    /// Waits until every sequencer consumer has `n` pull requests waiting (every hot standby
    /// pulls every partition, so it can take over at once).
    async fn wait_every_partition_pulled_by(
        &self,
        n: usize,
        limit: Duration,
    ) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        loop {
            let waiting = self.sequencer_consumers(|i| i.num_waiting).await?;
            let short: Vec<&String> = waiting
                .iter()
                .filter(|(_, w)| **w < n)
                .map(|(c, _)| c)
                .collect();
            if short.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "after {limit:?}, fewer than {n} sequencers pull {}",
                    short
                        .iter()
                        .take(8)
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until every sequencer has stamped a message (balanced: each claimed its share).
    async fn wait_every_sequencer_stamps(&self, limit: Duration) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        let mut reader = StreamReader::new(&self.cluster.js()).await?;
        let mut seen = BTreeSet::new();
        let want: BTreeSet<String> = self
            .cluster
            .sequencers
            .iter()
            .map(|s| s.name().to_owned())
            .collect();
        loop {
            for e in reader.read_new().await? {
                if e.message().is_some()
                    && let Some(s) = e.stamper
                {
                    seen.insert(s);
                }
            }
            if want.is_subset(&seen) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "after {limit:?} only {seen:?} of {want:?} stamped anything"
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `f` of the info of every sequencer consumer (`seq-p<N>` of `CHAT_IN`), asked all at
    /// once.
    pub async fn sequencer_consumers<T>(
        &self,
        f: impl Fn(&async_nats::jetstream::consumer::Info) -> T,
    ) -> Result<BTreeMap<String, T>, String> {
        let js = self.cluster.js();
        let partitions = live_partitions(&js)
            .await
            .map_err(|e| format!("partitions: {e}"))?;
        let stream = js
            .get_stream(subjects::STREAM_INBOUND)
            .await
            .map_err(|e| format!("{}: {e}", subjects::STREAM_INBOUND))?;
        let infos = futures::future::join_all(
            (0..partitions).map(|p| stream.consumer_info(sequencer_consumer(p))),
        )
        .await;
        let mut out = BTreeMap::new();
        for (p, info) in infos.into_iter().enumerate() {
            let info = info.map_err(|e| format!("consumer info seq-p{p}: {e}"))?;
            out.insert(info.name.clone(), f(&info));
        }
        Ok(out)
    }

    /// Inputs delivered to a sequencer and not acked yet, over every partition.
    pub async fn inputs_in_flight(&self) -> Result<u64, String> {
        let pending = self.sequencer_consumers(|i| i.num_ack_pending).await?;
        Ok(pending.values().map(|n| *n as u64).sum())
    }

    /// Waits until the sequencers hold at least `min` unacked inputs (a batch in flight), with
    /// bursts of messages from every sender to make one: each round every sender creates a
    /// message in each of its free conversations at once, and `CHAT_IN` (a work queue: it
    /// holds exactly what is not acked yet, and the owner pulls at once) is watched for the
    /// next 300 ms. Returns as soon as it holds `min`, or `Err` after `limit`. Inject the fault
    /// right away.
    pub async fn wait_batch_in_flight(&self, min: u64, limit: Duration) -> Result<u64, String> {
        let js = self.cluster.js();
        let mut stream = js
            .get_stream(subjects::STREAM_INBOUND)
            .await
            .map_err(|e| format!("{}: {e}", subjects::STREAM_INBOUND))?;
        let deadline = Instant::now() + limit;
        let mut most = 0;
        while Instant::now() < deadline {
            self.sim.broadcast(client::Command::Burst);
            let round = Instant::now() + Duration::from_millis(300);
            while Instant::now() < round {
                let held = stream
                    .info()
                    .await
                    .map_err(|e| format!("{} info: {e}", subjects::STREAM_INBOUND))?
                    .state
                    .messages;
                if held >= min {
                    return Ok(held);
                }
                most = most.max(held);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        Err(format!(
            "CHAT_IN never held {min} inputs within {limit:?} (at most {most})"
        ))
    }

    /// Logs a step (stderr, with the time since the start).
    pub fn step(&self, what: &str) {
        log(&self.name, self.started, what);
    }

    /// Lets traffic run for `d`.
    pub async fn traffic(&self, d: Duration) {
        tokio::time::sleep(d).await;
    }

    /// Index of the sequencer that stamped most of the recent messages.
    pub async fn stamping_sequencer(&self) -> usize {
        let entries = audit::read_all(&self.cluster.js())
            .await
            .expect("read CHAT_MSGS");
        let busiest = audit::busiest_stamper(&entries, 200).expect("something was stamped");
        let recent: Vec<&str> = entries
            .iter()
            .rev()
            .filter(|e| e.message().is_some())
            .take(200)
            .filter_map(|e| e.stamper.as_deref())
            .collect();
        let by_owner = recent.iter().filter(|s| **s == busiest).count();
        // With the start order of `Run::start` the owner stamps all of them; a split (the
        // standby won a partition) would make the takeover time meaningless: say so.
        self.step(&format!(
            "{busiest} stamped {by_owner} of the last {} messages",
            recent.len()
        ));
        self.cluster
            .sequencers
            .iter()
            .position(|s| s.name() == busiest)
            .unwrap_or_else(|| panic!("stamped by unknown instance {busiest}"))
    }

    /// A reader positioned at the current end of `CHAT_MSGS` (take it right before a fault).
    pub async fn stream_mark(&self) -> StreamReader {
        let mut reader = StreamReader::new(&self.cluster.js())
            .await
            .expect("CHAT_MSGS");
        reader.skip_to_end().await.expect("CHAT_MSGS info");
        reader
    }

    /// The partitions whose latest stamped message (in the stream up to now) `instance`
    /// stamped.
    pub async fn partitions_last_stamped_by(&self, instance: &str) -> BTreeSet<u32> {
        let entries = audit::read_all(&self.cluster.js())
            .await
            .expect("read CHAT_MSGS");
        let mut last: BTreeMap<u32, String> = BTreeMap::new();
        for e in entries.iter().filter(|e| e.message().is_some()) {
            if let (Some((p, _)), Some(by)) = (subjects::split_partitioned(&e.subject), &e.stamper)
            {
                last.insert(p, by.clone());
            }
        }
        last.into_iter()
            .filter(|(_, by)| by == instance)
            .map(|(p, _)| p)
            .collect()
    }

    /// Waits (at most `limit`) for the first message stamped by `instance` in `partitions`
    /// (all: `None`) after `reader`'s position, and returns its stream timestamp minus
    /// `since_ms`, the moment of the fault.
    pub async fn wait_first_stamp_in(
        &mut self,
        reader: &mut StreamReader,
        instance: &str,
        partitions: Option<&BTreeSet<u32>>,
        since_ms: u64,
        limit: Duration,
    ) -> Option<u64> {
        let deadline = Instant::now() + limit;
        let counts = |e: &StreamEntry| {
            e.message().is_some()
                && e.stamper.as_deref() == Some(instance)
                && partitions.is_none_or(|ps| {
                    subjects::split_partitioned(&e.subject).is_some_and(|(p, _)| ps.contains(&p))
                })
        };
        while Instant::now() < deadline {
            match reader.read_new().await {
                Ok(entries) => {
                    let first = entries.iter().find(|e| counts(e));
                    if let Some(e) = first {
                        return Some(e.time_ms.saturating_sub(since_ms));
                    }
                }
                Err(e) => self.step(&format!("reading CHAT_MSGS: {e}")),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.violations.push(format!(
            "{instance} stamped nothing within {limit:?} of the fault (no takeover)"
        ));
        None
    }

    /// From now on `instance` must stamp nothing, except in a partition whose pin it wins anew
    /// (the pins are watched until the services stop; see [`check::Forbidden`]).
    pub async fn forbid_stamps_by(&mut self, instance: &str) -> u64 {
        let after = chat_protocol::now_ms();
        self.forbidden.push((instance.to_owned(), after));
        after
    }

    /// Records every pin assignment of the sequencer consumers (their `pinned_ts`), polling
    /// them every 200 ms.
    async fn watch_pins(&self) -> PinWatch {
        let js = self.cluster.js();
        let seen: Arc<std::sync::Mutex<BTreeMap<u32, Vec<u64>>>> = Arc::default();
        let record = seen.clone();
        let task = tokio::spawn(async move {
            let Ok(partitions) = live_partitions(&js).await else {
                return;
            };
            let Ok(stream) = js.get_stream(subjects::STREAM_INBOUND).await else {
                return;
            };
            loop {
                let infos = futures::future::join_all(
                    (0..partitions).map(|p| stream.consumer_info(sequencer_consumer(p))),
                )
                .await;
                for (p, info) in infos.into_iter().enumerate() {
                    let Ok(info) = info else { continue };
                    let pinned = info
                        .priority_groups
                        .iter()
                        .filter_map(|g| g.pinned_ts)
                        .map(|t| u64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(0));
                    let mut seen = record.lock().expect("pins lock");
                    let list = seen.entry(p as u32).or_default();
                    for t in pinned {
                        if !list.contains(&t) {
                            list.push(t);
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        PinWatch { task, seen }
    }

    /// Starts counting what `instance` publishes on the stamped subjects (core NATS sees every
    /// publish, also those JetStream refuses: a fenced stale owner shows up here but never in
    /// the stream).
    pub async fn watch_publishes_by(&self, instance: &str) -> PublishWatch {
        let mut subs = Vec::new();
        for subject in ["chat.msg.>", "chat.rcpt.>"] {
            subs.push(
                self.cluster
                    .client()
                    .subscribe(subject)
                    .await
                    .expect("subscribe to stamped subjects"),
            );
        }
        // Make sure the server registered the subscriptions before anything can be missed.
        self.cluster.client().flush().await.expect("flush");
        let instance = instance.to_owned();
        let mut all = futures::stream::select_all(subs);
        let seen = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
        let count = seen.clone();
        let task = tokio::spawn(async move {
            while let Some(msg) = futures::StreamExt::next(&mut all).await {
                let by = msg
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(audit::STAMPER_HEADER))
                    .map(|v| v.as_str().to_owned());
                if by.as_deref() == Some(instance.as_str()) {
                    let receipt = chat_protocol::subjects::is_receipt_subject(&msg.subject);
                    count[usize::from(receipt)].fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        PublishWatch { task, seen }
    }

    /// Stops the traffic, lets clients settle, sends the final reads, stops everything, runs
    /// the checker, prints (and appends to `target/fault-summaries.txt`) the summary line, and
    /// panics listing every violation.
    pub async fn finish(mut self) {
        let js = self.cluster.js();
        self.sim.stop_chaos().await;
        self.sim.set_sending(false);
        let sending_until_ms = chat_protocol::now_ms();
        self.step("traffic off, settling");
        if let Err(lag) = self.sim.settle_messages(&js, SETTLE_MESSAGES).await {
            self.violations.push(format!(
                "messages did not converge within {SETTLE_MESSAGES:?}: {}",
                lag.iter().take(15).cloned().collect::<Vec<_>>().join("; ")
            ));
        }
        self.step("messages settled, final reads");
        if let Err(lag) = self.sim.settle_receipts(&js, SETTLE_RECEIPTS).await {
            self.violations.push(format!(
                "receipts did not converge within {SETTLE_RECEIPTS:?}: {}",
                lag.iter().take(15).cloned().collect::<Vec<_>>().join("; ")
            ));
        }
        self.step("receipts settled, stopping");
        let Run {
            name,
            mut cluster,
            sim,
            started,
            started_ms,
            measured_since_ms,
            takeover_ms,
            in_flight,
            reads_back_ms,
            forbidden,
            pins,
            mut violations,
        } = self;
        let users = sim.population.users.clone();
        let convs = sim.population.convs.clone();
        let devices = sim.stop().await;
        let stop_problems = tokio::task::block_in_place(|| cluster.stop_services(STOP_TIMEOUT));
        // Nothing stamps any more: the pins seen until now are all that matter.
        let pins = match pins {
            Some(watch) => watch.stop().await,
            None => BTreeMap::new(),
        };
        let forbidden_after: Vec<check::Forbidden> = forbidden
            .into_iter()
            .map(|(instance, after_ms)| check::Forbidden {
                instance,
                after_ms,
                pins: Some(pins.clone()),
            })
            .collect();
        violations.extend(stop_problems);
        log(&name, started, "services stopped, checking");
        let stream = match audit::read_all(&js).await {
            Ok(s) => s,
            Err(e) => panic!("{name}: cannot read CHAT_MSGS: {e}"),
        };
        let mut stores = Vec::new();
        for (s, dir) in cluster.sequencers.iter().zip(&cluster.store_dirs) {
            match check::dump_store(s.name(), dir.clone(), &convs, &users).await {
                Ok(d) => stores.push(d),
                Err(e) => violations.push(format!("cannot read the store of {}: {e}", s.name())),
            }
        }
        let mut findings = check::check(&CheckInput {
            scenario: &name,
            users: &users,
            convs: &convs,
            devices: &devices,
            stores: &stores,
            stream: &stream,
            forbidden_after: &forbidden_after,
            pins: &pins,
            takeover_ms,
        });
        violations.append(&mut findings.violations);
        let stamped_while_sending = stream
            .iter()
            .filter(|e| {
                e.message().is_some() && (measured_since_ms..=sending_until_ms).contains(&e.time_ms)
            })
            .count();
        let sending_s = sending_until_ms.saturating_sub(measured_since_ms) as f64 / 1000.0;
        findings.summary.rate_msg_s = stamped_while_sending as f64 / sending_s.max(0.001);
        let created = devices
            .iter()
            .flat_map(|d| &d.sends)
            .filter(|s| (measured_since_ms..=sending_until_ms).contains(&s.created_ms))
            .count();
        findings.summary.offered_msg_s = created as f64 / sending_s.max(0.001);
        findings.summary.in_flight = in_flight;
        findings.summary.reads_back_ms = reads_back_ms;
        let line = findings.summary.to_string();
        println!("{line}");
        let path = target_dir().join("fault-summaries.txt");
        match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
        {
            Ok(mut f) => {
                let _ = writeln!(f, "{line}");
            }
            Err(e) => eprintln!("cannot append to {}: {e}", path.display()),
        }
        let errors: BTreeCount = devices.iter().flat_map(|d| d.stats.errors.iter()).fold(
            BTreeCount::new(),
            |mut acc, (code, n)| {
                *acc.entry(code.clone()).or_default() += n;
                acc
            },
        );
        // The longest pause between two consecutive stamps (stream time): how long stamping
        // stopped around the fault.
        let stamp_times: Vec<u64> = stream
            .iter()
            .filter(|e| e.message().is_some())
            .map(|e| e.time_ms)
            .collect();
        let (pause_ms, pause_at) = stamp_times
            .windows(2)
            .map(|w| (w[1].saturating_sub(w[0]), w[0]))
            .max()
            .unwrap_or((0, 0));
        let pause_at = pause_at.saturating_sub(started_ms);
        let total = |f: fn(&crate::client::Stats) -> u64| -> u64 {
            devices.iter().map(|d| f(&d.stats)).sum()
        };
        log(
            &name,
            started,
            &format!(
                "done in {:.1} s; longest stamping pause {pause_ms} ms (from +{pause_at} ms); \
                 connects {} (failed {}), history requests {}, sync pages {}, overlaps {}, \
                 repeat acks {}; error frames {errors:?}; stream entries {}",
                started.elapsed().as_secs_f64(),
                total(|s| s.connects),
                total(|s| s.connect_failures),
                total(|s| s.history_requests),
                total(|s| s.sync_pages),
                total(|s| s.overlaps),
                total(|s| s.repeat_acks),
                stream.len()
            ),
        );
        if !violations.is_empty() {
            let shown: Vec<String> = violations.iter().take(60).cloned().collect();
            panic!(
                "{name}: {} violation(s):\n  - {}",
                violations.len(),
                shown.join("\n  - ")
            );
        }
    }
}

type BTreeCount = std::collections::BTreeMap<String, u64>;

/// The pin assignments seen on each partition's sequencer consumer (ms since the epoch).
struct PinWatch {
    task: tokio::task::JoinHandle<()>,
    seen: Arc<std::sync::Mutex<BTreeMap<u32, Vec<u64>>>>,
}

impl PinWatch {
    async fn stop(self) -> BTreeMap<u32, Vec<u64>> {
        self.task.abort();
        let _ = self.task.await;
        std::mem::take(&mut *self.seen.lock().expect("pins lock"))
    }
}

/// Counts publishes of one instance on the stamped subjects; see [`Run::watch_publishes_by`].
pub struct PublishWatch {
    task: tokio::task::JoinHandle<()>,
    /// Messages, receipts.
    seen: Arc<[AtomicUsize; 2]>,
}

impl PublishWatch {
    /// Stops watching; how many (message, receipt) publishes were seen.
    pub async fn stop(self) -> (usize, usize) {
        self.task.abort();
        let _ = self.task.await;
        (
            self.seen[0].load(Ordering::Relaxed),
            self.seen[1].load(Ordering::Relaxed),
        )
    }
}
