//! One fault scenario from start to verdict: [`Run::start`] brings up the cluster and the
//! simulated clients (the first sequencer and fan-out worker own every partition, the others
//! join as hot standbys), the scenario injects its fault while traffic runs, and
//! [`Run::finish`] lets everything settle, stops the services, runs the checker and prints the
//! summary line.

use std::{
    io::Write,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use crate::{
    audit::{self, StreamReader},
    check::{self, CheckInput},
    cluster::{Cluster, ClusterConfig, SECRET, target_dir},
    sim::{Simulation, standard_population},
};

/// Bound on waiting for pending sends and message convergence after the traffic stops.
const SETTLE_MESSAGES: Duration = Duration::from_secs(30);
/// Bound on waiting for receipts to converge after the final reads.
const SETTLE_RECEIPTS: Duration = Duration::from_secs(20);
/// Bound on each group of services draining after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// A running scenario.
pub struct Run {
    pub name: String,
    pub cluster: Cluster,
    pub sim: Simulation,
    started: Instant,
    /// `started`, in ms since the epoch (to place stream timestamps).
    started_ms: u64,
    /// Set by the scenario when it measured one.
    pub takeover_ms: Option<u64>,
    /// (instance, ms since the epoch) after which the instance must not stamp.
    pub forbidden_after: Vec<(String, u64)>,
    /// Violations found while the scenario ran (checked with the rest at the end).
    pub violations: Vec<String>,
}

fn log(name: &str, started: Instant, what: &str) {
    eprintln!("[{name} +{:>5} ms] {what}", started.elapsed().as_millis());
}

impl Run {
    /// Starts nats-server, the gateways, the first sequencer and fan-out worker, and every
    /// simulated device; turns traffic on; once every conversation has a stamped message (so
    /// the first sequencer pinned every partition in use) starts the other sequencers and
    /// fan-out workers as hot standbys, then starts taking flaky devices offline.
    pub async fn start(name: &str, config: ClusterConfig) -> Self {
        let started = Instant::now();
        let started_ms = chat_protocol::now_ms();
        let mut cluster = Cluster::new(config).await;
        cluster.spawn_gateways().await;
        cluster.sequencers[0].spawn();
        cluster.fanouts[0].spawn();
        let population = standard_population(cluster.gateway_urls.len());
        let mut sim =
            Simulation::start(population, cluster.gateway_urls.clone(), SECRET.as_bytes());
        sim.set_sending(true);
        log(name, started, "cluster up, traffic on");
        if let Err(e) = sim
            .wait_every_conv_stamped(&cluster.js(), Duration::from_secs(20))
            .await
        {
            panic!("{name}: warm-up failed: {e}\n{}", cluster.log_tails());
        }
        for s in cluster.sequencers.iter_mut().skip(1) {
            s.spawn();
        }
        for f in cluster.fanouts.iter_mut().skip(1) {
            f.spawn();
        }
        // Let the standbys connect, catch up their stores and start pulling.
        tokio::time::sleep(Duration::from_millis(1000)).await;
        sim.start_chaos();
        log(name, started, "standbys up, flaky devices on");
        Self {
            name: name.to_owned(),
            cluster,
            sim,
            started,
            started_ms,
            takeover_ms: None,
            forbidden_after: Vec::new(),
            violations: Vec::new(),
        }
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
        let busiest = audit::busiest_stamper(&entries, 50).expect("something was stamped");
        let recent: Vec<&str> = entries
            .iter()
            .rev()
            .filter(|e| e.message().is_some())
            .take(50)
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

    /// Waits (at most `limit`) for the first message stamped by `instance` after `reader`'s
    /// position, and returns its stream timestamp minus `since_ms`, the moment of the fault.
    pub async fn wait_first_stamp_by(
        &mut self,
        reader: &mut StreamReader,
        instance: &str,
        since_ms: u64,
        limit: Duration,
    ) -> Option<u64> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            match reader.read_new().await {
                Ok(entries) => {
                    let first = entries
                        .iter()
                        .find(|e| e.message().is_some() && e.stamper.as_deref() == Some(instance));
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
            takeover_ms,
            forbidden_after,
            mut violations,
        } = self;
        let users = sim.population.users.clone();
        let convs = sim.population.convs.clone();
        let devices = sim.stop().await;
        let stop_problems = tokio::task::block_in_place(|| cluster.stop_services(STOP_TIMEOUT));
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
            takeover_ms,
        });
        violations.append(&mut findings.violations);
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
