//! Overload: more than the pipeline can take, then back to a moderate rate.
//!
//! One open-loop trial of the one-to-one population ([`crate::dm`]) with three phases: a
//! reference at `after_factor` × the max sustained rate (default half), `factor` × it (default
//! 1.5) for `overload_s` seconds, then the reference rate again for `after_s` seconds; then the
//! usual drain. Beside it, `slow` recipients stop reading for `stall_s` seconds (a phone in a
//! tunnel), starting `stall_lead_s` before the overload, while a sender of their own sends them
//! `slow_rate` messages/s of `slow_size` bytes and typing indicators: the gateway must shed their
//! typing first and then cut them as slow consumers; each reconnects and syncs at once, stays
//! connected through the overload, and once the pipeline drained must hold every message its
//! sender had acked.
//!
//! What it reports, each from what clients saw plus the gateway's own counters (its `/metrics`):
//!
//! - **Nothing acked is lost**: offered = acked = delivered (every copy) for the population
//!   after the drain, and every message acked to a slow client's sender is in its synced view,
//!   with no seq missing and no seq showing a different body than the one seen live.
//! - **Memory bounded**: the peak resident set (`VmHWM`) of every process.
//! - **Slow consumers cut with the documented ending** (`docs/protocol.md`: close 4001, or the
//!   end of the connection without a close frame when the client still is not reading after the
//!   gateway's `close_timeout_ms`), counted by the gateway as `reason="slow_consumer"`.
//! - **Ephemeral traffic shed first**: the gateway's `typing` shed counter moves before its first
//!   slow-consumer close.
//! - **Recovery**: seconds after the overload until the delivery p99 of every later second (by
//!   intended send time) is back within [`recovered_threshold_ms`] of the reference phase.

use std::{collections::BTreeMap, time::Duration};

use anyhow::{Context, Result, bail};
use chat_protocol::frames::ClientFrame;
use futures::StreamExt;
use serde::Serialize;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite;
use tokio_util::sync::CancellationToken;

use crate::{
    catchup,
    dm::{self, OverloadProfile, Population, TrialResult, TrialSpec},
    procstat::{self, Proc},
    system::System,
    ws,
};

#[derive(Debug, Clone, Copy, Serialize)]
pub struct OverloadSpec {
    /// The max sustained rate (`bench max`), messages/s.
    pub max_rate: f64,
    /// The overload phase offers `factor` × `max_rate`.
    pub factor: f64,
    /// The reference and after phases offer `after_factor` × `max_rate`.
    pub after_factor: f64,
    pub reference_s: f64,
    pub overload_s: f64,
    pub after_s: f64,
    pub size: usize,
    pub drain_s: f64,
    /// Slow recipients (each with a sender of its own).
    pub slow: usize,
    /// Seconds each slow recipient stops reading, and how long before the overload it starts
    /// (while the pipeline still keeps up, so its flood reaches the gateway at once).
    pub stall_s: f64,
    pub stall_lead_s: f64,
    /// Messages per second its sender sends it while it stalls, and their size.
    pub slow_rate: f64,
    pub slow_size: usize,
}

/// How one slow recipient fared.
#[derive(Debug, Clone, Serialize)]
pub struct SlowResult {
    pub user: String,
    /// Messages its sender had acked (`sent`).
    pub acked: u64,
    /// Typing indicators its sender sent (accepted by the gateway's typing limit or not).
    pub typing_sent: u64,
    /// Frames it read live before its connection ended, by type.
    pub live_frames: BTreeMap<String, u64>,
    /// How the connection ended: `close <code>`, `eof` (no close frame) or `error: ...`.
    pub ended: String,
    /// Seconds from the start of its stall to the end of its connection.
    pub ended_after_s: f64,
    /// Seconds from the end of the connection until it had reconnected and synced.
    pub resynced_after_s: f64,
    /// The conversation's messages in that first sync (what was stamped by then).
    pub synced_first: u64,
    /// The conversation's messages in the last sync, once the pipeline drained.
    pub synced: u64,
    /// Seqs 1..=newest absent from the last sync.
    pub missing_seqs: u64,
    /// Seqs shown with two different bodies over everything it saw (live before the cut,
    /// first sync, live after it, last sync): a seq given to two messages.
    pub mismatched: u64,
    /// Acked messages (by body) absent from the last sync.
    pub acked_not_found: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PeakRss {
    pub name: String,
    pub peak_kib: u64,
    pub end_kib: u64,
}

/// The gateway's counters (its `/metrics`), sampled every second.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GatewayCounters {
    /// Seconds into the overload phase of the first typing shed and of the first slow-consumer
    /// close (negative: before it).
    pub first_typing_shed_s: Option<f64>,
    pub first_slow_consumer_close_s: Option<f64>,
    pub typing_shed: u64,
    pub slow_consumer_closes: u64,
    /// Every connection the gateway closed, by reason, at the end.
    pub closes: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct OverloadResult {
    pub spec: OverloadSpec,
    pub trial: TrialResult,
    /// Delivery p99 of the reference phase, ms.
    pub reference_p99_ms: f64,
    pub recovered_threshold_ms: f64,
    /// Seconds after the overload phase until every later second is within the threshold.
    pub recovery_s: Option<f64>,
    pub slow: Vec<SlowResult>,
    pub gateway: GatewayCounters,
    pub peak_rss: Vec<PeakRss>,
    /// [`OverloadResult::lost_nothing`] and [`OverloadResult::shed_first`], for the JSON.
    pub nothing_lost: bool,
    pub ephemeral_shed_first: bool,
}

/// The delivery p99 a second must be back under to count as recovered: twice the reference
/// phase's, and never less than the half-rate target (30 ms).
pub fn recovered_threshold_ms(reference_p99_ms: f64) -> f64 {
    (2.0 * reference_p99_ms).max(crate::targets::DELIVERY_P99_MS)
}

/// Seconds of the rolling window [`recovery`] takes the median of.
pub const RECOVERY_WINDOW: usize = 10;

/// The first second (as an offset from `from`) from which the median p99 of every window of
/// [`RECOVERY_WINDOW`] seconds up to the end is at most `threshold`: latency is back, and a
/// lone slow second later (this box is shared by every process of the run) does not undo it.
/// Seconds with no delivery are skipped; `None` if it never holds.
pub fn recovery(p99_by_second: &[Option<f64>], from: usize, threshold: f64) -> Option<f64> {
    let tail: Vec<f64> = p99_by_second
        .get(from..)?
        .iter()
        .flatten()
        .copied()
        .collect();
    let offsets: Vec<usize> = p99_by_second[from..]
        .iter()
        .enumerate()
        .filter_map(|(i, p)| p.map(|_| i))
        .collect();
    if tail.len() < RECOVERY_WINDOW {
        return None;
    }
    let medians: Vec<f64> = tail
        .windows(RECOVERY_WINDOW)
        .map(|w| median(w).unwrap_or(f64::INFINITY))
        .collect();
    let last_bad = medians.iter().rposition(|m| *m > threshold);
    let first_ok = match last_bad {
        None => 0,
        Some(i) if i + 1 < medians.len() => i + 1,
        Some(_) => return None,
    };
    Some(offsets[first_ok] as f64)
}

impl OverloadResult {
    pub fn summary(&self) -> String {
        let s = &self.spec;
        let mut out = format!(
            "overload: {:.0} msg/s reference {:.0} s, {:.0} msg/s ({:.1}x max {:.0}) for {:.0} s, \
             then {:.0} msg/s for {:.0} s\n",
            s.max_rate * s.after_factor,
            s.reference_s,
            s.max_rate * s.factor,
            s.factor,
            s.max_rate,
            s.overload_s,
            s.max_rate * s.after_factor,
            s.after_s,
        );
        out.push_str(&self.trial.summary());
        out.push_str(&format!(
            "  nothing acked lost: {}\n  reference p99 {:.1} ms; recovered (every later second's \
             p99 <= {:.1} ms) {}\n",
            self.lost_nothing(),
            self.reference_p99_ms,
            self.recovered_threshold_ms,
            self.recovery_s
                .map_or("NOT within the run".to_owned(), |r| format!(
                    "{r:.0} s after the overload"
                )),
        ));
        let g = &self.gateway;
        out.push_str(&format!(
            "  gateway: typing shed {} (first at {}), slow-consumer closes {} (first at {}) \
             -> ephemeral shed first: {}; closes by reason {:?}\n",
            g.typing_shed,
            secs(g.first_typing_shed_s),
            g.slow_consumer_closes,
            secs(g.first_slow_consumer_close_s),
            self.shed_first(),
            g.closes,
        ));
        for c in &self.slow {
            out.push_str(&format!(
                "  slow {}: acked {} typing sent {} live {:?}, ended {} after {:.1} s; reconnected \
                 and synced {} in {:.2} s; finally synced {} missing {} mismatched {} \
                 acked-not-found {}\n",
                c.user,
                c.acked,
                c.typing_sent,
                c.live_frames,
                c.ended,
                c.ended_after_s,
                c.synced_first,
                c.resynced_after_s,
                c.synced,
                c.missing_seqs,
                c.mismatched,
                c.acked_not_found,
            ));
        }
        out.push_str("  peak RSS (VmHWM):");
        for p in &self.peak_rss {
            out.push_str(&format!(
                " {} {:.1} MiB (end {:.1});",
                p.name,
                p.peak_kib as f64 / 1024.0,
                p.end_kib as f64 / 1024.0
            ));
        }
        out.push('\n');
        out
    }

    /// Every acked message reached every copy (population) or the synced view (slow clients).
    pub fn lost_nothing(&self) -> bool {
        let t = &self.trial;
        t.acked == t.delivered
            && t.acked == t.echoed
            && t.duplicate_deliveries + t.duplicate_echoes == 0
            && self
                .slow
                .iter()
                .all(|c| c.missing_seqs + c.mismatched + c.acked_not_found == 0)
    }

    /// Typing was shed no later than the first slow-consumer cut (or nobody was cut).
    pub fn shed_first(&self) -> bool {
        match (
            self.gateway.first_typing_shed_s,
            self.gateway.first_slow_consumer_close_s,
        ) {
            (Some(shed), Some(cut)) => shed <= cut,
            (_, None) => true,
            (None, Some(_)) => false,
        }
    }
}

fn secs(s: Option<f64>) -> String {
    s.map_or("-".to_owned(), |s| format!("{s:.0} s"))
}

/// The environment the gateway needs for this mode: its `/metrics` on `admin`.
pub fn gateway_env(admin: &str) -> Vec<(&'static str, String)> {
    vec![("CHAT_GATEWAY_ADMIN_LISTEN", admin.to_owned())]
}

pub async fn run(
    sys: &System,
    pop: &mut Population,
    admin: &str,
    spec: OverloadSpec,
) -> Result<OverloadResult> {
    if spec.slow > 0 && spec.stall_lead_s > spec.reference_s {
        bail!("--stall-lead must be at most --reference");
    }
    let base = spec.max_rate * spec.after_factor;
    let trial_spec = TrialSpec {
        rate: base,
        duration_s: spec.reference_s,
        size: spec.size,
        drain_s: spec.drain_s,
        overload: Some(OverloadProfile {
            rate: spec.max_rate * spec.factor,
            duration_s: spec.overload_s,
            after_rate: base,
            after_s: spec.after_s,
        }),
    };
    let mut slow = Vec::new();
    for i in 0..spec.slow {
        slow.push(SlowPair::connect(sys, pop.generation(), i).await?);
    }
    // The trial starts 20 ms after it is called (dm::Population::trial).
    let overload_at =
        Instant::now() + Duration::from_millis(20) + Duration::from_secs_f64(spec.reference_s);
    let procs = sys.procs();
    let sampling = CancellationToken::new();
    let counters = tokio::spawn(sample_gateway(
        admin.to_owned(),
        overload_at,
        sampling.clone(),
    ));
    let stall_at = overload_at
        .checked_sub(Duration::from_secs_f64(spec.stall_lead_s))
        .unwrap_or(overload_at);
    let done = CancellationToken::new();
    let slow_runs = futures::future::join_all(
        slow.into_iter()
            .map(|p| p.run(sys, stall_at, done.clone(), spec)),
    );
    let trial = async {
        let t = pop.trial(sys, trial_spec).await;
        done.cancel();
        t
    };
    let (trial, slow) = tokio::join!(trial, slow_runs);
    let trial = trial?;
    sampling.cancel();
    let gateway = counters.await.context("gateway sampler")?;
    let slow: Vec<SlowResult> = slow.into_iter().collect::<Result<_>>()?;
    let peak_rss = peak_rss(&procs);

    let reference_s = spec.reference_s.floor() as usize;
    let reference: Vec<f64> = trial.delivery_p99_ms_by_second
        [..reference_s.min(trial.delivery_p99_ms_by_second.len())]
        .iter()
        .flatten()
        .copied()
        .collect();
    // The reference phase's p99: the median of its seconds' p99 (its first second warms up).
    let reference_p99_ms = median(&reference).unwrap_or(trial.delivery_latency.p99_ms);
    let threshold = recovered_threshold_ms(reference_p99_ms);
    let overload_end = (spec.reference_s + spec.overload_s).ceil() as usize;
    let recovery_s = recovery(&trial.delivery_p99_ms_by_second, overload_end, threshold);
    let mut r = OverloadResult {
        spec,
        reference_p99_ms,
        recovered_threshold_ms: threshold,
        recovery_s,
        trial,
        slow,
        gateway,
        peak_rss,
        nothing_lost: false,
        ephemeral_shed_first: false,
    };
    r.nothing_lost = r.lost_nothing();
    r.ephemeral_shed_first = r.shed_first();
    Ok(r)
}

fn median(v: &[f64]) -> Option<f64> {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

fn peak_rss(procs: &[Proc]) -> Vec<PeakRss> {
    procs
        .iter()
        .map(|p| PeakRss {
            name: p.name.clone(),
            peak_kib: procstat::peak_rss_kib(p.pid).unwrap_or(0),
            end_kib: procstat::sample(p.pid).map_or(0, |s| s.rss_kib),
        })
        .collect()
}

/// A slow recipient and the sender that floods it.
struct SlowPair {
    user: String,
    conv: String,
    sender: ws::Ws,
    recipient: ws::Ws,
}

impl SlowPair {
    async fn connect(sys: &System, generation: u32, i: usize) -> Result<Self> {
        let user = format!("g{generation}slow{i}");
        let peer = format!("g{generation}flood{i}");
        let conv = dm::conv_of(&peer, &user)?;
        let sender = ws::connect(sys.gateway_url(), sys.secret(), &peer, "bench", None).await?;
        // A small receive buffer: the gateway's queue fills soon after the socket's.
        let recipient = ws::connect_with(
            sys.gateway_url(),
            sys.secret(),
            &user,
            "slow",
            None,
            Some(4096),
        )
        .await?;
        Ok(Self {
            user,
            conv,
            sender,
            recipient,
        })
    }

    /// Stalls from `stall_at`, is cut (or not), reconnects at once and syncs, stays connected
    /// until `done` (the trial drained), then syncs everything again: that last view must hold
    /// every message its sender had acked, and agree with everything it saw before.
    async fn run(
        self,
        sys: &System,
        stall_at: Instant,
        done: CancellationToken,
        spec: OverloadSpec,
    ) -> Result<SlowResult> {
        let Self {
            user,
            conv,
            sender,
            recipient,
        } = self;
        let stall_end = stall_at + Duration::from_secs_f64(spec.stall_s);
        let flood = flood(sender, &conv, stall_at, stall_end, spec);
        let flooded = (spec.slow_rate * spec.stall_s).round() as usize;
        let read = read_until_cut(recipient, stall_end, flooded);
        let ((acked, typing_sent), (mut seen, live_frames, ended)) = tokio::join!(flood, read);
        let acked = acked?;
        let ended_after_s = ended.1.saturating_duration_since(stall_at).as_secs_f64();

        // What a client does: reconnect and sync at once.
        let mut ws = ws::connect(sys.gateway_url(), sys.secret(), &user, "slow", None).await?;
        let first = catchup::sync_all(&mut ws, None).await?;
        let resynced_after_s = ended.1.elapsed().as_secs_f64();
        let mut mismatched = 0;
        let mut note = |seen: &mut BTreeMap<u64, String>, seq: u64, body: String| {
            if seen.get(&seq).is_some_and(|b| *b != body) {
                mismatched += 1;
            }
            seen.insert(seq, body);
        };
        let synced_first = first.held.keys().filter(|(c, _)| *c == conv).count() as u64;
        for ((c, seq), body) in first.held {
            if c == conv {
                note(&mut seen, seq, body);
            }
        }
        // Live again until the pipeline drained the overload.
        loop {
            tokio::select! {
                () = done.cancelled() => break,
                text = ws::next_text(&mut ws) => {
                    let Ok(Some(text)) = text else { break };
                    if let Ok(f) = serde_json::from_str::<ws::Lite<'_>>(&text)
                        && f.kind == "message"
                        && f.conv.as_deref() == Some(conv.as_str())
                        && let (Some(seq), Some(body)) = (f.seq, f.body)
                    {
                        note(&mut seen, seq, body.into_owned());
                    }
                }
            }
        }
        let last = catchup::sync_all(&mut ws, None).await?;
        let _ = ws.close(None).await;
        let mut view: BTreeMap<u64, String> = BTreeMap::new();
        for ((c, seq), body) in last.held {
            if c == conv {
                view.insert(seq, body.clone());
                note(&mut seen, seq, body);
            }
        }
        let newest = view.keys().next_back().copied().unwrap_or(0);
        let missing_seqs = newest - view.len() as u64;
        let bodies: std::collections::HashSet<&str> = view.values().map(String::as_str).collect();
        let acked_not_found = acked
            .iter()
            .filter(|b| !bodies.contains(b.as_str()))
            .count() as u64;
        Ok(SlowResult {
            user,
            acked: acked.len() as u64,
            typing_sent,
            live_frames,
            ended: ended.0,
            ended_after_s,
            resynced_after_s,
            synced_first,
            synced: view.len() as u64,
            missing_seqs,
            mismatched,
            acked_not_found,
        })
    }
}

/// Sends `spec.slow_rate` messages/s (and 2 typing indicators/s, the gateway's default typing
/// limit) from `start` to `until`; returns the bodies answered by `sent` and the typing
/// frames sent.
async fn flood(
    ws: ws::Ws,
    conv: &str,
    start: Instant,
    until: Instant,
    spec: OverloadSpec,
) -> (Result<Vec<String>>, u64) {
    let (tx, mut stream) = ws::split(ws);
    tokio::time::sleep_until(start).await;
    let total = (spec.slow_rate * spec.stall_s).round() as u64;
    let mut bodies: BTreeMap<String, String> = BTreeMap::new();
    let mut typing = 0;
    let mut acked = Vec::new();
    let mut i = 0u64;
    let mut next_typing = start;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let deadline = until + Duration::from_secs_f64(spec.drain_s);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let now = Instant::now();
                let due = ((now.saturating_duration_since(start).as_secs_f64()
                    * spec.slow_rate) as u64)
                    .min(total);
                while i < due {
                    let id = format!("flood-{i}");
                    let mut body = format!("flood.{i}.");
                    while body.len() < spec.slow_size {
                        body.push('f');
                    }
                    let frame = ClientFrame::Send {
                        conv: conv.to_owned(),
                        id: id.clone(),
                        body: body.clone(),
                        media: None,
                    };
                    let _ = tx.send(serde_json::to_string(&frame).expect("encodes"));
                    bodies.insert(id, body);
                    i += 1;
                }
                if now >= next_typing && now < until {
                    let frame = ClientFrame::Typing { conv: conv.to_owned(), active: true };
                    let _ = tx.send(serde_json::to_string(&frame).expect("encodes"));
                    typing += 1;
                    next_typing += Duration::from_millis(500);
                }
                if (i >= total && acked.len() as u64 >= total) || now >= deadline {
                    break;
                }
            }
            text = ws::next_text(&mut stream) => {
                let Ok(Some(text)) = text else { break };
                if let Ok(f) = serde_json::from_str::<ws::Lite<'_>>(&text)
                    && f.kind == "sent"
                    && let Some(body) = f.id.as_deref().and_then(|id| bodies.get(id))
                {
                    acked.push(body.clone());
                }
            }
        }
    }
    drop(tx);
    (Ok(acked), typing)
}

/// Reads nothing until `stall_end`, then everything until the connection ends (or, when it
/// was not cut, until all `flooded` messages arrived live); returns the messages seen (by
/// seq), the frames by type, and how and when it ended.
async fn read_until_cut(
    ws: ws::Ws,
    stall_end: Instant,
    flooded: usize,
) -> (
    BTreeMap<u64, String>,
    BTreeMap<String, u64>,
    (String, Instant),
) {
    let (tx, mut stream) = ws::split(ws);
    tokio::time::sleep_until(stall_end).await;
    let mut live = BTreeMap::new();
    let mut frames: BTreeMap<String, u64> = BTreeMap::new();
    let give_up = Instant::now() + Duration::from_secs(120);
    let ended = loop {
        if live.len() >= flooded {
            break "not cut".to_owned();
        }
        let next = tokio::time::timeout_at(give_up, stream.next()).await;
        match next {
            Err(_) => break "stuck (neither cut nor delivered)".to_owned(),
            Ok(None) => break "eof".to_owned(),
            Ok(Some(Err(e))) => break format!("error: {e}"),
            Ok(Some(Ok(tungstenite::Message::Close(frame)))) => {
                break frame.map_or("close (no code)".to_owned(), |f| {
                    format!("close {}", u16::from(f.code))
                });
            }
            Ok(Some(Ok(tungstenite::Message::Text(text)))) => {
                let Ok(f) = serde_json::from_str::<ws::Lite<'_>>(&text) else {
                    continue;
                };
                *frames.entry(f.kind.to_string()).or_default() += 1;
                if f.kind == "message"
                    && let (Some(seq), Some(body)) = (f.seq, f.body)
                {
                    live.insert(seq, body.into_owned());
                }
            }
            Ok(Some(Ok(_))) => {}
        }
    };
    drop(tx);
    (live, frames, (ended, Instant::now()))
}

/// Polls the gateway's `/metrics` every second until `stop`.
async fn sample_gateway(
    admin: String,
    overload_at: Instant,
    stop: CancellationToken,
) -> GatewayCounters {
    let mut c = GatewayCounters::default();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let Ok(text) = scrape(&admin).await else {
            continue;
        };
        let now = Instant::now();
        let at = if now >= overload_at {
            now.duration_since(overload_at).as_secs_f64()
        } else {
            -overload_at.duration_since(now).as_secs_f64()
        };
        let shed = counter(&text, "gateway_presence_shed_total", "kind=\"typing\"");
        let cut = counter(&text, "gateway_closes_total", "reason=\"slow_consumer\"");
        if shed > 0 && c.first_typing_shed_s.is_none() {
            c.first_typing_shed_s = Some(at);
        }
        if cut > 0 && c.first_slow_consumer_close_s.is_none() {
            c.first_slow_consumer_close_s = Some(at);
        }
        c.typing_shed = shed;
        c.slow_consumer_closes = cut;
        c.closes = by_label(&text, "gateway_closes_total", "reason");
    }
    c
}

/// The sum of the samples of `name` whose labels contain `label`, in Prometheus text.
pub fn counter(text: &str, name: &str, label: &str) -> u64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') && rest.contains(label))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// The samples of `name` summed by the value of their label `key`, in Prometheus text.
pub fn by_label(text: &str, name: &str, key: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let pattern = format!("{key}=\"");
    for l in text.lines() {
        let Some(rest) = l.strip_prefix(name).filter(|r| r.starts_with('{')) else {
            continue;
        };
        let Some(value) = rest
            .split_once(&pattern)
            .and_then(|(_, v)| v.split_once('"'))
            .map(|(v, _)| v.to_owned())
        else {
            continue;
        };
        if let Some(n) = l.rsplit(' ').next().and_then(|n| n.parse::<f64>().ok()) {
            *out.entry(value).or_default() += n as u64;
        }
    }
    out
}

/// `GET /metrics` from the gateway's admin endpoint.
async fn scrape(admin: &str) -> Result<String> {
    crate::system::http_get(admin, "/metrics").await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovery_is_the_first_second_after_the_last_bad_one() {
        // 5 bad seconds, then good ones with a lone spike and a second without deliveries.
        let mut p: Vec<Option<f64>> = vec![Some(900.0); 5];
        p.extend((0..20).map(|i| match i {
            7 => Some(500.0),
            9 => None,
            _ => Some(10.0),
        }));
        // The first window whose median (its 6th value) is good starts at the 2nd bad second:
        // 4 bad of 10. The lone 500 ms second later does not undo it.
        assert_eq!(recovery(&p, 0, 30.0), Some(1.0));
        assert_eq!(recovery(&p, 5, 30.0), Some(0.0));
        // Still bad at the end: not recovered.
        let mut bad_end = vec![Some(10.0); 20];
        bad_end.extend(vec![Some(900.0); 10]);
        assert_eq!(recovery(&bad_end, 0, 30.0), None);
        // Too few seconds to judge.
        assert_eq!(recovery(&p, 20, 30.0), None);
    }

    #[test]
    fn counters_are_summed_over_matching_labels() {
        let text = "# TYPE gateway_closes_total counter\n\
                    gateway_closes_total{reason=\"slow_consumer\",gateway=\"a\"} 2\n\
                    gateway_closes_total{reason=\"client\"} 7\n\
                    gateway_closes_total_other{reason=\"slow_consumer\"} 9\n\
                    gateway_closes_total{reason=\"slow_consumer\",gateway=\"b\"} 3\n";
        assert_eq!(
            counter(text, "gateway_closes_total", "reason=\"slow_consumer\""),
            5
        );
        assert_eq!(
            counter(text, "gateway_closes_total", "reason=\"heartbeat\""),
            0
        );
        let by = by_label(text, "gateway_closes_total", "reason");
        assert_eq!(by.get("slow_consumer"), Some(&5));
        assert_eq!(by.get("client"), Some(&7));
        assert_eq!(by.len(), 2);
    }

    #[test]
    fn threshold_is_never_below_the_half_rate_target() {
        assert_eq!(recovered_threshold_ms(2.0), crate::targets::DELIVERY_P99_MS);
        assert_eq!(recovered_threshold_ms(40.0), 80.0);
    }
}
