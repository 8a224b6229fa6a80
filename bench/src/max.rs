//! The highest offered rate the pipeline sustains: trials of `duration` seconds at increasing
//! rates (times `growth` while they pass), then bisection between the best pass and the lowest
//! failure until they are within `precision`, at most `steps` trials. A trial passes when
//!
//! - at least 99.9 % of the offered messages reached their recipient by one second after the
//!   offered window ([`crate::dm::ON_TIME_GRACE`]),
//! - the consumer backlog did not grow over the second half of the window (least-squares slope
//!   at most 1 % of the offered rate, or 10 msg/s, whichever is larger),
//! - delivery p99 < 500 ms.
//!
//! All trials share one cluster and one population of connections; between trials the pipeline
//! drains. Then, unless told otherwise, one more trial at half the best rate gives the latency
//! at moderate load.

use std::time::Duration;

use anyhow::Result;
use serde::Serialize;

use crate::{
    dm::{Population, TrialResult, TrialSpec},
    report,
    system::{Backlog, System},
};

#[derive(Debug, Clone, Copy, Serialize)]
pub struct SearchSpec {
    pub start_rate: f64,
    pub growth: f64,
    pub steps: u32,
    pub precision: f64,
    pub half: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub pass: bool,
    /// Why it failed (empty when it passed).
    pub reasons: Vec<String>,
    /// Backlog when the trial started (0 unless the previous trial did not drain).
    pub backlog_at_start: Backlog,
    pub trial: TrialResult,
}

#[derive(Debug, Clone, Serialize)]
pub struct SearchResult {
    pub steps: Vec<Step>,
    /// Highest offered rate that passed.
    pub max_sustained_rate: Option<f64>,
    /// Delivered messages per second in that trial.
    pub max_delivered_per_s: Option<f64>,
    /// The trial at half the best rate.
    pub half: Option<TrialResult>,
}

/// Why `t` does not count as sustained (empty: it does).
pub fn verdict(t: &TrialResult) -> Vec<String> {
    let mut reasons = Vec::new();
    if t.sockets_closed > 0 {
        reasons.push(format!(
            "{} sockets closed by the gateway (slow consumer or heartbeat)",
            t.sockets_closed
        ));
    }
    let need = (t.offered as f64 * 0.999).ceil() as u64;
    if t.delivered_on_time < need {
        reasons.push(format!(
            "delivered on time {} < 99.9% of offered {}",
            t.delivered_on_time, t.offered
        ));
    }
    let allowed = (t.spec.rate * 0.01).max(10.0);
    if t.backlog_growth_per_s > allowed {
        reasons.push(format!(
            "backlog growing {:.0} msg/s > {allowed:.0}",
            t.backlog_growth_per_s
        ));
    }
    if t.delivery_latency.p99_ms >= 500.0 {
        reasons.push(format!(
            "delivery p99 {:.0} ms >= 500",
            t.delivery_latency.p99_ms
        ));
    }
    reasons
}

pub async fn run(
    sys: &System,
    pop: &mut Population,
    search: SearchSpec,
    base: TrialSpec,
) -> Result<SearchResult> {
    let mut steps: Vec<Step> = Vec::new();
    let (mut lo, mut hi): (Option<f64>, Option<f64>) = (None, None);
    let mut rate = search.start_rate;
    for _ in 0..search.steps {
        let mut attempt = 0;
        let (backlog_at_start, trial, reasons) = loop {
            attempt += 1;
            let backlog_at_start = sys.backlog().await.unwrap_or_default();
            let trial = pop.trial(sys, TrialSpec { rate, ..base }).await?;
            let reasons = verdict(&trial);
            if trial.sockets_closed > 0 {
                // The population lost sockets: later trials get a fresh one (new users).
                sys.wait_idle(Duration::from_secs_f64(base.drain_s)).await;
                *pop = Population::connect(sys, pop.pairs(), pop.generation() + 1).await?;
            }
            let other = report::other_cores(&trial.usage);
            if reasons.is_empty() || other <= report::NOISY_CORES || attempt > 1 {
                break (backlog_at_start, trial, reasons);
            }
            // Something outside the run (a build) took CPU: measure this rate once more.
            println!(
                "  {rate:.0} msg/s failed while other processes used {other:.2} cores: repeating"
            );
            sys.wait_idle(Duration::from_secs_f64(base.drain_s)).await;
        };
        let pass = reasons.is_empty();
        println!(
            "  step {}: {:.0} msg/s -> {} (delivered/s {:.0}, p99 {:.1} ms, other load {:.2} \
             cores){}",
            steps.len() + 1,
            rate,
            if pass { "sustained" } else { "NOT sustained" },
            trial.delivered_per_s,
            trial.delivery_latency.p99_ms,
            report::other_cores(&trial.usage),
            if pass {
                String::new()
            } else {
                format!(": {}", reasons.join("; "))
            }
        );
        steps.push(Step {
            pass,
            reasons,
            backlog_at_start,
            trial,
        });
        if pass {
            lo = Some(rate);
        } else {
            hi = Some(rate);
        }
        rate = match (lo, hi) {
            (Some(l), Some(h)) => {
                if (h - l) / l <= search.precision {
                    break;
                }
                (l + h) / 2.0
            }
            (Some(l), None) => l * search.growth,
            (None, Some(h)) => h / search.growth,
            (None, None) => unreachable!("a trial either passed or failed"),
        };
        // Let whatever is left of an overloaded trial drain before the next one.
        sys.wait_idle(Duration::from_secs_f64(base.drain_s)).await;
    }
    let best = steps
        .iter()
        .filter(|s| s.pass)
        .max_by(|a, b| a.trial.spec.rate.total_cmp(&b.trial.spec.rate));
    let max_sustained_rate = best.map(|s| s.trial.spec.rate);
    let max_delivered_per_s = best.map(|s| s.trial.delivered_per_s);
    let half = match max_sustained_rate {
        Some(r) if search.half => {
            println!("  half rate: {:.0} msg/s", r / 2.0);
            Some(
                pop.trial(
                    sys,
                    TrialSpec {
                        rate: r / 2.0,
                        ..base
                    },
                )
                .await?,
            )
        }
        _ => None,
    };
    Ok(SearchResult {
        steps,
        max_sustained_rate,
        max_delivered_per_s,
        half,
    })
}

/// One CSV line per step (plus the half-rate trial), for spreadsheets and the plot script.
pub fn csv(r: &SearchResult) -> String {
    let mut s = String::from(
        "kind,offered_rate,delivered_per_s,pass,offered,delivered,sent_p50_ms,sent_p99_ms,\
         p50_ms,p90_ms,p99_ms,p999_ms,max_ms,services_cpu_us_per_msg\n",
    );
    let rows = r
        .steps
        .iter()
        .map(|st| ("step", st.pass, &st.trial))
        .chain(r.half.iter().map(|t| ("half", true, t)));
    for (kind, pass, t) in rows {
        let l = &t.delivery_latency;
        s.push_str(&format!(
            "{kind},{:.0},{:.1},{pass},{},{},{:.3},{:.3},{:.3},{:.3},{:.3},{:.3},{:.3},{}\n",
            t.spec.rate,
            t.delivered_per_s,
            t.offered,
            t.delivered,
            t.sent_latency.p50_ms,
            t.sent_latency.p99_ms,
            l.p50_ms,
            l.p90_ms,
            l.p99_ms,
            l.p999_ms,
            l.max_ms,
            t.services_cpu_us_per_msg
                .map_or_else(String::new, |v| format!("{v:.1}")),
        ));
    }
    s
}
