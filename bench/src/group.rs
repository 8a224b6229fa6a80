//! Group fan-out: one group of `members` users, each with one WebSocket, created with a `group`
//! frame; a few of them send to it at a fixed offered rate, open loop, and every member must get
//! every message, in seq order. Deliveries per second count the `message` frames that reached
//! members (each message reaches every member, its sender included). At the same time, a
//! one-to-one load of `dm_pairs` conversations runs through the same system ([`Population`]),
//! so the summary shows what a flooding group does to one-to-one latency.
//!
//! A group message's body carries its index and intended send time (`<index>.<µs>.`, padded);
//! delivery latency is measured from the intended time at every member.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use chat_protocol::frames::{ClientFrame, GroupOp};
use futures::StreamExt;
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::{sync::mpsc, time::Instant};

use crate::{
    dm::{Population, TrialResult, TrialSpec},
    procstat::{self, Snapshot, Usage},
    stats::{self, Latency},
    system::{System, USER_SEND_LIMIT},
    ws::{self, Lite},
};

/// One group trial's shape.
#[derive(Debug, Clone, Serialize)]
pub struct GroupSpec {
    pub members: usize,
    /// Group messages offered per second (all senders together).
    pub rate: f64,
    pub duration_s: f64,
    pub size: usize,
    /// Members that send (round robin).
    pub senders: usize,
    /// One-to-one load at the same time (0 pairs: none).
    pub dm_pairs: usize,
    pub dm_rate: f64,
    /// After the window, how long to wait for every delivery.
    pub drain_s: f64,
    /// Run label (e.g. the fan-out budget it ran with).
    pub label: String,
}

/// What one group trial measured.
#[derive(Debug, Clone, Serialize)]
pub struct GroupResult {
    pub spec: GroupSpec,
    pub offered: u64,
    pub acked: u64,
    /// `offered × members`: every member gets every message.
    pub expected_deliveries: u64,
    pub deliveries: u64,
    /// A member got a seq it had, or one out of order.
    pub repeats: u64,
    pub gaps: u64,
    pub members_complete: usize,
    /// Deliveries over the time from the first intended send to the last delivery.
    pub deliveries_per_s: f64,
    pub delivery_latency: Latency,
    pub sent_latency: Latency,
    pub drained: bool,
    pub dm: Option<TrialResult>,
    pub usage: Vec<Usage>,
    /// CPU of gateway + sequencer + fan-out per group delivery, µs.
    pub services_cpu_us_per_delivery: Option<f64>,
}

impl GroupResult {
    pub fn accounting_ok(&self) -> bool {
        self.offered == self.acked
            && self.deliveries == self.expected_deliveries
            && self.repeats + self.gaps == 0
            && self.members_complete == self.spec.members
            && self.dm.as_ref().is_none_or(TrialResult::accounting_ok)
    }

    pub fn summary(&self) -> String {
        let s = &self.spec;
        let mut out = format!(
            "group of {} members [{}]: offered {:.0} msg/s for {:.0} s from {} senders\n  \
             offered {}  acked {}  deliveries {} of {}  members complete {}  repeats {}  gaps {}\n  \
             deliveries/s {:.0}\n  sent ack: {}\n  group delivery: {}\n",
            s.members,
            s.label,
            s.rate,
            s.duration_s,
            s.senders,
            self.offered,
            self.acked,
            self.deliveries,
            self.expected_deliveries,
            self.members_complete,
            self.repeats,
            self.gaps,
            self.deliveries_per_s,
            self.sent_latency.line(),
            self.delivery_latency.line(),
        );
        if let Some(cpu) = self.services_cpu_us_per_delivery {
            out.push_str(&format!("  services CPU per delivery: {cpu:.1} µs\n"));
        }
        out.push_str(&crate::report::usage_table(&self.usage));
        if let Some(dm) = &self.dm {
            out.push_str(&format!(
                "  meanwhile one-to-one ({} pairs, {:.0} msg/s): delivered {} of {}, delivery {}\n",
                dm.pairs,
                dm.spec.rate,
                dm.delivered,
                dm.offered,
                dm.delivery_latency.line()
            ));
        }
        out
    }
}

#[derive(Default)]
struct Recorder {
    start: Option<Instant>,
    rate: f64,
    created: usize,
    /// The seq of the trial's last message, once known; members reaching it are complete.
    final_seq: u64,
    complete: usize,
    acked: u64,
    deliveries: u64,
    repeats: u64,
    gaps: u64,
    last_delivery: Option<Instant>,
    delivery_h: Option<Histogram<u64>>,
    sent_h: Option<Histogram<u64>>,
}

impl Recorder {
    fn intended(&self, index: u64) -> Option<Instant> {
        Some(self.start? + Duration::from_secs_f64(index as f64 / self.rate))
    }
}

fn body(index: u64, intended_us: u64, size: usize) -> String {
    let mut b = format!("{index}.{intended_us}.");
    while b.len() < size {
        b.push('x');
    }
    b
}

fn parse_index(s: &str) -> Option<u64> {
    s.split('.').next()?.parse().ok()
}

/// Reads one member's socket: the group's `message` frames (seq order, latency) and, for
/// senders, the `sent` acks of their messages (ids `gm<index>`).
async fn read_member(
    mut stream: futures::stream::SplitStream<ws::Ws>,
    conv: String,
    rec: Arc<Mutex<Recorder>>,
) {
    let mut last = 0u64;
    while let Ok(Some(text)) = ws::next_text(&mut stream).await {
        let Ok(f) = serde_json::from_str::<Lite<'_>>(&text) else {
            continue;
        };
        let now = Instant::now();
        match f.kind.as_ref() {
            "message" if f.conv.as_deref() == Some(conv.as_str()) => {
                let seq = f.seq.unwrap_or(0);
                let mut r = rec.lock().expect("recorder");
                if seq <= last {
                    r.repeats += 1;
                    continue;
                }
                if seq > last + 1 {
                    r.gaps += 1;
                }
                last = seq;
                if seq == r.final_seq {
                    r.complete += 1;
                }
                if seq == 1 {
                    r.created += 1;
                } else if let Some(at) = f
                    .body
                    .as_deref()
                    .and_then(parse_index)
                    .and_then(|i| r.intended(i))
                {
                    r.deliveries += 1;
                    r.last_delivery = Some(now);
                    if let Some(h) = r.delivery_h.as_mut() {
                        stats::record(h, now.saturating_duration_since(at));
                    }
                }
            }
            "sent" => {
                let index =
                    f.id.as_deref()
                        .and_then(|id| id.strip_prefix("gm"))
                        .and_then(|i| i.parse().ok());
                let mut r = rec.lock().expect("recorder");
                if let Some(at) = index.and_then(|i| r.intended(i)) {
                    r.acked += 1;
                    if let Some(h) = r.sent_h.as_mut() {
                        stats::record(h, now.saturating_duration_since(at));
                    }
                }
            }
            _ => {}
        }
    }
}

/// Runs one group trial (and the one-to-one load beside it) on `sys`. `generation` keeps user
/// and group ids of several trials on one system apart.
pub async fn run(sys: &System, spec: GroupSpec, generation: u32) -> Result<GroupResult> {
    if spec.members < 2 || spec.senders == 0 || spec.senders > spec.members {
        bail!("need at least 2 members and 1..=members senders");
    }
    if spec.rate / spec.senders as f64 > USER_SEND_LIMIT * 0.9 {
        bail!("too many sends per sender for the gateway's per-user limit: use more --senders");
    }
    let conv = format!("g~bench{generation}n{}", spec.members);
    let users: Vec<String> = (0..spec.members)
        .map(|i| format!("g{generation}m{i}"))
        .collect();
    let rec = Arc::new(Mutex::new(Recorder::default()));
    let url = sys.gateway_url().to_owned();
    let secret = sys.secret();
    let sockets: Vec<Result<(usize, ws::Ws)>> = futures::stream::iter(users.iter().enumerate())
        .map(|(i, u)| {
            let url = url.clone();
            async move { Ok((i, ws::connect(&url, secret, u, "bench", None).await?)) }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    let mut writers = vec![None; spec.members];
    for s in sockets {
        let (i, socket) = s.context("connecting a member")?;
        let (tx, stream) = ws::split(socket);
        writers[i] = Some(tx);
        tokio::spawn(read_member(stream, conv.clone(), rec.clone()));
    }
    let writers: Vec<mpsc::UnboundedSender<String>> = writers
        .into_iter()
        .map(|w| w.expect("every member"))
        .collect();

    // Create the group; every member must see the creation before the load starts.
    let create = ClientFrame::Group {
        op: GroupOp::Create,
        conv: conv.clone(),
        id: "create".into(),
        name: Some(format!("bench {}", spec.members)),
        members: users[1..].to_vec(),
    };
    writers[0].send(serde_json::to_string(&create)?)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while rec.lock().expect("recorder").created < spec.members {
        if Instant::now() > deadline {
            bail!("the group's creation did not reach every member within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let mut population = if spec.dm_pairs > 0 {
        Some(Population::connect(sys, spec.dm_pairs, 1000 + generation).await?)
    } else {
        None
    };
    let total = (spec.rate * spec.duration_s).round() as u64;
    let procs = sys.procs();
    let before = Snapshot::take(&procs);
    let start = Instant::now() + Duration::from_millis(20);
    {
        let mut r = rec.lock().expect("recorder");
        r.start = Some(start);
        r.rate = spec.rate;
        r.final_seq = total + 1;
        r.delivery_h = Some(stats::histogram());
        r.sent_h = Some(stats::histogram());
    }
    let schedule = async {
        for i in 0..total {
            let at = start + Duration::from_secs_f64(i as f64 / spec.rate);
            tokio::time::sleep_until(at).await;
            let intended_us = (i as f64 * 1e6 / spec.rate) as u64;
            let frame = ClientFrame::Send {
                conv: conv.clone(),
                id: format!("gm{i}"),
                body: body(i, intended_us, spec.size),
                media: None,
            };
            let sender = &writers[(i % spec.senders as u64) as usize];
            let _ = sender.send(serde_json::to_string(&frame).expect("frame encodes"));
        }
    };
    let dm = async {
        match population.as_mut() {
            Some(pop) => {
                let dm_spec =
                    TrialSpec::steady(spec.dm_rate, spec.duration_s, spec.size, spec.drain_s);
                Some(pop.trial(sys, dm_spec).await)
            }
            None => None,
        }
    };
    let ((), dm) = tokio::join!(schedule, dm);
    let dm = dm.transpose()?;

    let expected = total * spec.members as u64;
    let window_end = start + Duration::from_secs_f64(spec.duration_s);
    let deadline = window_end.max(Instant::now()) + Duration::from_secs_f64(spec.drain_s);
    let drained = loop {
        let (delivered, acked) = {
            let r = rec.lock().expect("recorder");
            (r.deliveries, r.acked)
        };
        if delivered >= expected && acked >= total {
            break true;
        }
        if Instant::now() >= deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let after = Snapshot::take(&procs);
    let r = rec.lock().expect("recorder");
    let span = r
        .last_delivery
        .map_or(0.0, |l| l.duration_since(start).as_secs_f64());
    let usage = procstat::usage(&before, &after, r.deliveries);
    Ok(GroupResult {
        offered: total,
        acked: r.acked,
        expected_deliveries: expected,
        deliveries: r.deliveries,
        repeats: r.repeats,
        gaps: r.gaps,
        members_complete: r.complete,
        deliveries_per_s: if span > 0.0 {
            r.deliveries as f64 / span.max(spec.duration_s)
        } else {
            0.0
        },
        delivery_latency: Latency::of(r.delivery_h.as_ref().expect("set")),
        sent_latency: Latency::of(r.sent_h.as_ref().expect("set")),
        drained,
        dm,
        services_cpu_us_per_delivery: procstat::services_us_per_msg(&usage, r.deliveries),
        usage,
        spec,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_carry_their_index() {
        let b = body(42, 1_000, 64);
        assert_eq!(b.len(), 64);
        assert_eq!(parse_index(&b), Some(42));
    }
}
