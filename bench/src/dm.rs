//! One-to-one load through the whole pipeline: `pairs` conversations, each a sender and a
//! recipient with one WebSocket each. A trial offers a fixed rate, open loop: message `i` is
//! due at `start + i / rate` and goes to pair `i % pairs`; the scheduler queues it on the
//! sender's socket at that time whatever happened to earlier messages, and every latency is
//! measured from that intended time, so a stall shows as latency instead of a pause in sending.
//!
//! The body carries the trial, the index and the intended time (`<trial>.<index>.<µs>.` padded
//! to the message size). Measured per trial: `sent` frames at the sender (ack latency), `message`
//! frames at the recipient (delivery latency, per-conversation seq continuity) and at the sender
//! (its own copy), each counted once by index so duplicates and losses show.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Result, bail};
use chat_protocol::{
    frames::ClientFrame,
    ids::{ConvId, UserId},
};
use futures::{StreamExt, stream::SplitStream};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::{sync::mpsc, time::Instant};

use crate::{
    procstat::{self, Snapshot, Usage},
    stats::{self, Latency},
    system::{Backlog, System, USER_SEND_LIMIT},
    ws::{self, Lite, Ws},
};

/// How long after the end of the offered window a delivery still counts as on time for the
/// sustained-rate criterion (`delivered_on_time`).
pub const ON_TIME_GRACE: Duration = Duration::from_secs(1);

/// One trial's shape.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct TrialSpec {
    /// Offered messages per second (all pairs together).
    pub rate: f64,
    pub duration_s: f64,
    /// Body size in bytes.
    pub size: usize,
    /// After the offered window, how long to wait for every ack and delivery.
    pub drain_s: f64,
    /// After `duration_s` at `rate`: an overload phase and a phase after it (`bench overload`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub overload: Option<OverloadProfile>,
}

/// Two more phases of a trial: `rate` for `duration_s`, then `after_rate` for `after_s`.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct OverloadProfile {
    pub rate: f64,
    pub duration_s: f64,
    pub after_rate: f64,
    pub after_s: f64,
}

impl TrialSpec {
    /// A single-rate trial.
    pub fn steady(rate: f64, duration_s: f64, size: usize, drain_s: f64) -> Self {
        Self {
            rate,
            duration_s,
            size,
            drain_s,
            overload: None,
        }
    }

    /// The offered (rate, seconds) phases in order.
    fn phases(&self) -> Vec<(f64, f64)> {
        let mut phases = vec![(self.rate, self.duration_s)];
        if let Some(o) = self.overload {
            phases.push((o.rate, o.duration_s));
            phases.push((o.after_rate, o.after_s));
        }
        phases
    }

    /// The highest offered rate of any phase.
    pub fn peak_rate(&self) -> f64 {
        self.phases().iter().map(|p| p.0).fold(0.0, f64::max)
    }
}

/// When each message of a trial is due: phases of fixed rates back to back.
#[derive(Debug, Clone)]
struct Schedule {
    /// (start s, rate, first index, messages) per phase.
    phases: Vec<(f64, f64, u64, u64)>,
    total: u64,
    window_s: f64,
}

impl Schedule {
    fn of(spec: &TrialSpec) -> Self {
        let mut phases = Vec::new();
        let (mut start, mut first) = (0.0, 0);
        for (rate, secs) in spec.phases() {
            let n = (rate * secs).round() as u64;
            phases.push((start, rate, first, n));
            start += secs;
            first += n;
        }
        Self {
            phases,
            total: first,
            window_s: start,
        }
    }

    /// Seconds after the trial's start at which message `i` is due.
    fn intended_s(&self, i: u64) -> f64 {
        for &(start, rate, first, n) in &self.phases {
            if i < first + n {
                return start + (i - first) as f64 / rate;
            }
        }
        self.window_s
    }

    /// How many messages are due `elapsed_s` seconds after the start.
    fn due(&self, elapsed_s: f64) -> u64 {
        let mut due = 0;
        for &(start, rate, _, n) in &self.phases {
            if elapsed_s < start {
                break;
            }
            // The epsilon absorbs rounding: at its own intended time a message is due.
            due += ((((elapsed_s - start) * rate + 1e-7).floor() as u64) + 1).min(n);
        }
        due.min(self.total)
    }
}

/// What one trial measured.
#[derive(Debug, Clone, Serialize)]
pub struct TrialResult {
    pub trial: u32,
    pub spec: TrialSpec,
    pub pairs: usize,
    /// Sends queued on the senders' sockets (each exactly once, by index).
    pub offered: u64,
    /// Distinct messages answered by `sent`.
    pub acked: u64,
    /// Distinct messages that reached the recipient.
    pub delivered: u64,
    /// Distinct messages that reached the sender's own device (every member gets each message).
    pub echoed: u64,
    /// Delivered to the recipient no later than [`ON_TIME_GRACE`] after the offered window.
    pub delivered_on_time: u64,
    /// Delivered messages per second: `delivered` over the time from the first intended send
    /// to the last delivery (the offered rate when the system keeps up, its capacity when not).
    pub delivered_per_s: f64,
    pub duplicate_acks: u64,
    pub duplicate_deliveries: u64,
    pub duplicate_echoes: u64,
    /// A recipient saw seq n+k (k > 1) after n in a conversation: pushes lost on the way.
    pub seq_gaps: u64,
    /// A recipient saw a seq it already had.
    pub seq_repeats: u64,
    /// Sockets of the population that closed during the trial (a slow-consumer or heartbeat
    /// close by the gateway): their messages are lost to the trial.
    pub sockets_closed: u64,
    /// Sends repeated (same id) after `rate_limited` or `unavailable`.
    pub retries: u64,
    /// Error frames by code.
    pub errors: BTreeMap<String, u64>,
    /// The "sent" ack latency: intended send time to the `sent` frame.
    pub sent_latency: Latency,
    /// End-to-end: intended send time to the `message` frame at the recipient.
    pub delivery_latency: Latency,
    /// Delivery p99 (ms) of the messages due in each second of a phased trial (`None`: nothing
    /// delivered of that second); empty for single-rate trials.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub delivery_p99_ms_by_second: Vec<Option<f64>>,
    /// Consumer backlog sampled every second during the offered window.
    pub backlog: Vec<Backlog>,
    /// Least-squares growth of the backlog over the second half of the window, messages/s.
    pub backlog_growth_per_s: f64,
    /// Every ack and delivery arrived before the drain deadline.
    pub drained: bool,
    /// Time from the end of the offered window until drained (or the deadline).
    pub drain_s: f64,
    /// Resources from the trial's start to the end of the drain.
    pub usage: Vec<Usage>,
    /// CPU µs per delivered message of gateway + sequencer + fan-out worker.
    pub services_cpu_us_per_msg: Option<f64>,
}

impl TrialResult {
    /// offered == acked == delivered == echoed, nothing twice, no gap or repeat.
    pub fn accounting_ok(&self) -> bool {
        self.offered == self.acked
            && self.offered == self.delivered
            && self.offered == self.echoed
            && self.duplicate_acks + self.duplicate_deliveries + self.duplicate_echoes == 0
            && self.seq_gaps + self.seq_repeats == 0
            && self.sockets_closed == 0
    }

    pub fn summary(&self) -> String {
        let mut s = format!(
            "trial {}: offered {:.0} msg/s for {:.0} s ({} pairs, {} B bodies)\n  \
             offered {}  acked {}  delivered {}  (own copy {})  on time {}  \
             delivered/s {:.0}\n  \
             dup acks {}  dup deliveries {}  dup own {}  seq gaps {}  seq repeats {}  \
             retries {}  errors {:?}  sockets closed {}\n  \
             sent ack: {}\n  delivery: {}\n  \
             backlog growth {:.1} msg/s, drained {} in {:.2} s\n",
            self.trial,
            self.spec.rate,
            self.spec.duration_s,
            self.pairs,
            self.spec.size,
            self.offered,
            self.acked,
            self.delivered,
            self.echoed,
            self.delivered_on_time,
            self.delivered_per_s,
            self.duplicate_acks,
            self.duplicate_deliveries,
            self.duplicate_echoes,
            self.seq_gaps,
            self.seq_repeats,
            self.retries,
            self.errors,
            self.sockets_closed,
            self.sent_latency.line(),
            self.delivery_latency.line(),
            self.backlog_growth_per_s,
            self.drained,
            self.drain_s,
        );
        s.push_str(&crate::report::usage_table(&self.usage));
        if let Some(us) = self.services_cpu_us_per_msg {
            s.push_str(&format!(
                "  gateway + sequencer + fan-out: {us:.1} µs CPU per delivered message\n"
            ));
        }
        s
    }
}

const ACKED: u8 = 1;
const DELIVERED: u8 = 2;
const ECHOED: u8 = 4;

/// The state of the trial in progress, shared by every reader.
struct Trial {
    id: u32,
    spec: TrialSpec,
    schedule: Schedule,
    start: Instant,
    window_end: Instant,
    offered: u64,
    state: Vec<u8>,
    acked: u64,
    delivered: u64,
    echoed: u64,
    on_time: u64,
    last_delivery: Option<Instant>,
    dup: [u64; 3],
    retries: u64,
    errors: BTreeMap<String, u64>,
    sent_h: Histogram<u64>,
    delivery_h: Histogram<u64>,
    /// Delivery latency by the second of its intended send time (phased trials only).
    by_second: Vec<Histogram<u64>>,
}

impl Trial {
    fn intended(&self, index: u64) -> Instant {
        self.start + Duration::from_secs_f64(self.schedule.intended_s(index))
    }

    /// Marks `flag` for `index`; `false` if it was already set (a duplicate).
    fn mark(&mut self, index: u64, flag: u8) -> bool {
        let Some(s) = usize::try_from(index)
            .ok()
            .and_then(|i| self.state.get_mut(i))
        else {
            return false;
        };
        let fresh = *s & flag == 0;
        *s |= flag;
        fresh
    }
}

#[derive(Default)]
struct Recorder {
    trial: Option<Trial>,
    /// The recipient's newest seq per conversation (across trials).
    last_seq: HashMap<String, u64>,
    seq_gaps: u64,
    seq_repeats: u64,
    /// Frames about an earlier trial, or that could not be understood.
    stray: u64,
    closed_sockets: u64,
}

/// The client message id and body of message `index` of trial `trial`.
fn message(trial: u32, index: u64, intended_us: u64, size: usize) -> (String, String) {
    let mut body = format!("{trial}.{index}.{intended_us}.");
    while body.len() < size {
        body.push('x');
    }
    (format!("t{trial}-{index}"), body)
}

/// `(trial, index)` from a client message id `t<trial>-<index>`.
fn parse_id(id: &str) -> Option<(u32, u64)> {
    let (t, i) = id.strip_prefix('t')?.split_once('-')?;
    Some((t.parse().ok()?, i.parse().ok()?))
}

/// `(trial, index)` from a body `<trial>.<index>.<µs>.…`.
fn parse_body(body: &str) -> Option<(u32, u64)> {
    let mut parts = body.splitn(3, '.');
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

fn send_frame(conv: &str, id: String, body: String) -> String {
    serde_json::to_string(&ClientFrame::Send {
        conv: conv.to_owned(),
        id,
        body,
        media: None,
    })
    .expect("client frames encode")
}

impl Recorder {
    /// The current trial if the frame is about it.
    fn current(&mut self, trial: u32) -> Option<&mut Trial> {
        match &mut self.trial {
            Some(t) if t.id == trial => Some(t),
            _ => {
                self.stray += 1;
                None
            }
        }
    }

    fn on_sent(&mut self, id: &str, now: Instant) {
        let Some((trial, index)) = parse_id(id) else {
            self.stray += 1;
            return;
        };
        let Some(t) = self.current(trial) else { return };
        if t.mark(index, ACKED) {
            t.acked += 1;
            let at = t.intended(index);
            stats::record(&mut t.sent_h, now.saturating_duration_since(at));
        } else {
            t.dup[0] += 1;
        }
    }

    fn on_echo(&mut self, id: &str) {
        let Some((trial, index)) = parse_id(id) else {
            self.stray += 1;
            return;
        };
        let Some(t) = self.current(trial) else { return };
        if t.mark(index, ECHOED) {
            t.echoed += 1;
        } else {
            t.dup[2] += 1;
        }
    }

    fn on_delivered(&mut self, conv: &str, seq: u64, body: &str, now: Instant) {
        let last = self.last_seq.entry(conv.to_owned()).or_insert(0);
        if seq <= *last {
            self.seq_repeats += 1;
        } else {
            if seq > *last + 1 {
                self.seq_gaps += 1;
            }
            *last = seq;
        }
        let Some((trial, index)) = parse_body(body) else {
            self.stray += 1;
            return;
        };
        let Some(t) = self.current(trial) else { return };
        if t.mark(index, DELIVERED) {
            t.delivered += 1;
            if now <= t.window_end + ON_TIME_GRACE {
                t.on_time += 1;
            }
            t.last_delivery = Some(now);
            let at = t.intended(index);
            let latency = now.saturating_duration_since(at);
            stats::record(&mut t.delivery_h, latency);
            let second = at.saturating_duration_since(t.start).as_secs() as usize;
            if let Some(h) = t.by_second.get_mut(second) {
                stats::record(h, latency);
            }
        } else {
            t.dup[1] += 1;
        }
    }

    /// An error answered a send: the frame to send again and when, if it is worth retrying.
    fn on_error(&mut self, e: &Lite<'_>, conv: &str) -> Option<(Duration, String)> {
        let code = e.code.as_deref().unwrap_or("?").to_owned();
        let parsed = e.id.as_deref().and_then(parse_id);
        let Some(t) = self.trial.as_mut() else {
            self.stray += 1;
            return None;
        };
        *t.errors.entry(code.clone()).or_default() += 1;
        let (trial, index) = parsed?;
        if trial != t.id || !matches!(code.as_str(), "rate_limited" | "unavailable") {
            return None;
        }
        t.retries += 1;
        let intended_us = (t.schedule.intended_s(index) * 1e6) as u64;
        let (id, body) = message(trial, index, intended_us, t.spec.size);
        let wait = Duration::from_millis(e.retry_after_ms.unwrap_or(100));
        Some((wait, send_frame(conv, id, body)))
    }
}

/// Which side of a pair a socket is.
#[derive(Clone)]
enum Role {
    Sender {
        conv: String,
        tx: mpsc::UnboundedSender<String>,
    },
    Recipient,
}

async fn read_loop(mut stream: SplitStream<Ws>, role: Role, rec: Arc<Mutex<Recorder>>) {
    while let Ok(Some(text)) = ws::next_text(&mut stream).await {
        let now = Instant::now();
        let Ok(f) = serde_json::from_str::<Lite<'_>>(&text) else {
            rec.lock().expect("recorder").stray += 1;
            continue;
        };
        let mut r = rec.lock().expect("recorder");
        match (f.kind.as_ref(), &role) {
            ("sent", Role::Sender { .. }) => r.on_sent(f.id.as_deref().unwrap_or(""), now),
            ("message", Role::Sender { .. }) => r.on_echo(f.id.as_deref().unwrap_or("")),
            ("message", Role::Recipient) => r.on_delivered(
                f.conv.as_deref().unwrap_or(""),
                f.seq.unwrap_or(0),
                f.body.as_deref().unwrap_or(""),
                now,
            ),
            ("error", Role::Sender { conv, tx }) => {
                if let Some((wait, frame)) = r.on_error(&f, conv) {
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(wait).await;
                        let _ = tx.send(frame);
                    });
                }
            }
            ("error", Role::Recipient) => {
                let code = f.code.as_deref().unwrap_or("?").to_owned();
                match r.trial.as_mut() {
                    Some(t) => *t.errors.entry(code).or_default() += 1,
                    None => r.stray += 1,
                }
            }
            _ => {}
        }
    }
    rec.lock().expect("recorder").closed_sockets += 1;
}

/// `pairs` connected sender/recipient pairs, reused by every trial of a run.
pub struct Population {
    senders: Vec<(String, mpsc::UnboundedSender<String>)>,
    rec: Arc<Mutex<Recorder>>,
    next_trial: u32,
    generation: u32,
}

impl Population {
    /// Connects `pairs` senders (`g<generation>s<i>`) and recipients (`g<generation>r<i>`),
    /// 64 handshakes at a time. A new generation means new users and conversations.
    pub async fn connect(sys: &System, pairs: usize, generation: u32) -> Result<Self> {
        let rec = Arc::new(Mutex::new(Recorder::default()));
        let url = sys.gateway_url().to_owned();
        let secret = sys.secret();
        let conns: Vec<Result<(usize, bool, Ws)>> = futures::stream::iter(0..pairs * 2)
            .map(|k| {
                let url = url.clone();
                async move {
                    let (i, sender) = (k / 2, k % 2 == 0);
                    let user = if sender {
                        format!("g{generation}s{i}")
                    } else {
                        format!("g{generation}r{i}")
                    };
                    let ws = ws::connect(&url, secret, &user, "bench", None).await?;
                    Ok((i, sender, ws))
                }
            })
            .buffer_unordered(64)
            .collect()
            .await;
        let mut senders: Vec<Option<(String, mpsc::UnboundedSender<String>)>> = vec![None; pairs];
        for c in conns {
            let (i, sender, ws) = c?;
            let conv = conv_of(&format!("g{generation}s{i}"), &format!("g{generation}r{i}"))?;
            let (tx, stream) = ws::split(ws);
            let role = if sender {
                senders[i] = Some((conv.clone(), tx.clone()));
                Role::Sender { conv, tx }
            } else {
                // The recipient never sends; its writer stays open until the population drops.
                std::mem::forget(tx);
                Role::Recipient
            };
            tokio::spawn(read_loop(stream, role, rec.clone()));
        }
        Ok(Self {
            senders: senders
                .into_iter()
                .map(|s| s.expect("every pair"))
                .collect(),
            rec,
            next_trial: 1,
            generation,
        })
    }

    pub fn generation(&self) -> u32 {
        self.generation
    }

    pub fn pairs(&self) -> usize {
        self.senders.len()
    }

    /// Sockets closed so far (none should during a run).
    pub fn closed_sockets(&self) -> u64 {
        self.rec.lock().expect("recorder").closed_sockets
    }

    /// Runs one open-loop trial.
    pub async fn trial(&mut self, sys: &System, spec: TrialSpec) -> Result<TrialResult> {
        let pairs = self.senders.len();
        let per_user = spec.peak_rate() / pairs as f64;
        if per_user > USER_SEND_LIMIT * 0.9 {
            bail!(
                "{per_user:.0} sends/s per sender is too close to the gateway's per-user limit \
                 ({USER_SEND_LIMIT:.0}/s): use more --pairs"
            );
        }
        let id = self.next_trial;
        self.next_trial += 1;
        let schedule = Schedule::of(&spec);
        let total = schedule.total;
        let closed_before = self.closed_sockets();
        let procs = sys.procs();
        let before = Snapshot::take(&procs);
        let start = Instant::now() + Duration::from_millis(20);
        let window_end = start + Duration::from_secs_f64(schedule.window_s);
        let seconds = if spec.overload.is_some() {
            schedule.window_s.ceil() as usize + 1
        } else {
            0
        };
        self.rec.lock().expect("recorder").trial = Some(Trial {
            id,
            spec,
            schedule: schedule.clone(),
            start,
            window_end,
            offered: 0,
            state: vec![0; usize::try_from(total).expect("fits")],
            acked: 0,
            delivered: 0,
            echoed: 0,
            on_time: 0,
            last_delivery: None,
            dup: [0; 3],
            retries: 0,
            errors: BTreeMap::new(),
            sent_h: stats::histogram(),
            delivery_h: stats::histogram(),
            by_second: (0..seconds).map(|_| stats::histogram()).collect(),
        });

        let schedule = async {
            let mut i: u64 = 0;
            while i < total {
                let now = Instant::now();
                let due = if now < start {
                    0
                } else {
                    schedule.due(now.duration_since(start).as_secs_f64())
                };
                while i < due {
                    let (conv, tx) = &self.senders[(i % pairs as u64) as usize];
                    let intended_us = (schedule.intended_s(i) * 1e6) as u64;
                    let (mid, body) = message(id, i, intended_us, spec.size);
                    if tx.send(send_frame(conv, mid, body)).is_ok()
                        && let Some(t) = self.rec.lock().expect("recorder").trial.as_mut()
                    {
                        t.offered += 1;
                    }
                    i += 1;
                }
                if i < total {
                    let next = start + Duration::from_secs_f64(schedule.intended_s(i));
                    tokio::time::sleep_until(next).await;
                }
            }
        };
        let sample = async {
            let mut samples = Vec::new();
            let mut tick = tokio::time::interval_at(start, Duration::from_secs(1));
            loop {
                tick.tick().await;
                let now = Instant::now();
                if let Ok(mut b) = sys.backlog().await {
                    b.t_s = now.duration_since(start).as_secs_f64();
                    samples.push(b);
                }
                if now >= window_end {
                    return samples;
                }
            }
        };
        let ((), backlog) = tokio::join!(schedule, sample);

        // Drain: every ack and both copies of every message, or the deadline.
        let deadline = window_end.max(Instant::now()) + Duration::from_secs_f64(spec.drain_s);
        let drained = loop {
            let done = {
                let r = self.rec.lock().expect("recorder");
                let t = r.trial.as_ref().expect("trial in progress");
                t.acked == t.offered && t.delivered == t.offered && t.echoed == t.offered
            };
            if done {
                break true;
            }
            if Instant::now() >= deadline {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let drain_s = Instant::now().duration_since(window_end).as_secs_f64();
        let after = Snapshot::take(&procs);

        let mut r = self.rec.lock().expect("recorder");
        let (seq_gaps, seq_repeats) = (r.seq_gaps, r.seq_repeats);
        r.seq_gaps = 0;
        r.seq_repeats = 0;
        let t = r.trial.take().expect("trial in progress");
        drop(r);
        let usage = procstat::usage(&before, &after, t.delivered);
        let span = t
            .last_delivery
            .map_or(0.0, |l| l.duration_since(t.start).as_secs_f64());
        Ok(TrialResult {
            trial: id,
            spec,
            pairs,
            offered: t.offered,
            acked: t.acked,
            delivered: t.delivered,
            echoed: t.echoed,
            delivered_on_time: t.on_time,
            delivered_per_s: if span > 0.0 {
                t.delivered as f64 / span.max(spec.duration_s)
            } else {
                0.0
            },
            duplicate_acks: t.dup[0],
            duplicate_deliveries: t.dup[1],
            duplicate_echoes: t.dup[2],
            seq_gaps,
            seq_repeats,
            sockets_closed: self.closed_sockets() - closed_before,
            retries: t.retries,
            errors: t.errors,
            sent_latency: Latency::of(&t.sent_h),
            delivery_latency: Latency::of(&t.delivery_h),
            delivery_p99_ms_by_second: t
                .by_second
                .iter()
                .map(|h| (!h.is_empty()).then(|| h.value_at_quantile(0.99) as f64 / 1000.0))
                .collect(),
            backlog_growth_per_s: growth(&backlog),
            backlog,
            drained,
            drain_s,
            services_cpu_us_per_msg: procstat::services_us_per_msg(&usage, t.delivered),
            usage,
        })
    }
}

/// `dm~<a>~<b>` for two users.
pub fn conv_of(a: &str, b: &str) -> Result<String> {
    let parse = |u: &str| UserId::parse(u).map_err(|e| anyhow::anyhow!("user {u}: {e}"));
    let conv = ConvId::direct(&parse(a)?, &parse(b)?)
        .map_err(|e| anyhow::anyhow!("conversation of {a} and {b}: {e}"))?;
    Ok(conv.as_str().to_owned())
}

/// Least-squares slope of the total backlog over the second half of the samples, per second.
fn growth(samples: &[Backlog]) -> f64 {
    let half = &samples[samples.len() / 2..];
    if half.len() < 2 {
        return 0.0;
    }
    let n = half.len() as f64;
    let mx = half.iter().map(|b| b.t_s).sum::<f64>() / n;
    let my = half.iter().map(|b| b.total() as f64).sum::<f64>() / n;
    let (mut sxy, mut sxx) = (0.0, 0.0);
    for b in half {
        sxy += (b.t_s - mx) * (b.total() as f64 - my);
        sxx += (b.t_s - mx) * (b.t_s - mx);
    }
    if sxx == 0.0 { 0.0 } else { sxy / sxx }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_bodies_round_trip() {
        let (id, body) = message(3, 1234, 5678, 64);
        assert_eq!(parse_id(&id), Some((3, 1234)));
        assert_eq!(parse_body(&body), Some((3, 1234)));
        assert_eq!(body.len(), 64);
        assert!(chat_protocol::ids::ClientMsgId::parse(&id).is_ok());
    }

    #[test]
    fn phased_schedules_are_back_to_back() {
        let mut spec = TrialSpec::steady(10.0, 2.0, 16, 1.0);
        spec.overload = Some(OverloadProfile {
            rate: 100.0,
            duration_s: 1.0,
            after_rate: 10.0,
            after_s: 3.0,
        });
        let s = Schedule::of(&spec);
        assert_eq!(s.total, 20 + 100 + 30);
        assert!((s.window_s - 6.0).abs() < 1e-9);
        assert!((s.intended_s(19) - 1.9).abs() < 1e-9);
        assert!((s.intended_s(20) - 2.0).abs() < 1e-9);
        assert!((s.intended_s(120) - 3.0).abs() < 1e-9);
        // Every message is due once its time came, and not before.
        for i in 0..s.total {
            let t = s.intended_s(i);
            assert!(s.due(t) > i, "message {i} due at {t}");
            assert!(s.due(t - 1e-6) <= i, "message {i} due before {t}");
        }
        assert_eq!(s.due(100.0), s.total);
        assert_eq!(spec.peak_rate(), 100.0);
    }

    #[test]
    fn growth_is_the_slope_of_the_second_half() {
        let samples: Vec<Backlog> = (0..10)
            .map(|i: u32| Backlog {
                t_s: f64::from(i),
                inbound: if i < 5 { 0 } else { 100 * u64::from(i) },
                stamped: 0,
            })
            .collect();
        assert!((growth(&samples) - 100.0).abs() < 1e-9);
    }
}
