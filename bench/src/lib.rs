//! `bench`, the load generator: the chat pipeline measured against the broker's own ceiling in
//! the same run, on the same box, with the same message size (`BENCHMARKS.md` has the method
//! and the latest figures).
//!
//! Modes ([`cli::Mode`]): `baseline` (raw JetStream and core NATS through async-nats), `dm`
//! (one-to-one traffic over real WebSockets, open loop, through gateway, `CHAT_IN`, sequencer
//! with its store, `CHAT_MSGS`, fan-out worker and back), `max` (the highest sustained rate),
//! `overload` (1.5× the max for 2 minutes, then half: losses, peak memory, slow consumers, recovery),
//! `idle` (memory and CPU per idle connection), `catchup` (a device that missed K messages
//! reconnecting), `group` (fan-out to large groups, with one-to-one load beside it) and
//! `presence` (presence updates and their cost per online user, gateways simulated at the NATS
//! level). Each mode is a module with a `run`-style entry and a result type that
//! serializes to the JSON the run writes.
//!
//! Consumes and produces what a client does (WebSocket frames, `docs/protocol.md`); the baseline
//! uses its own stream `BENCH_BASELINE` and subjects `bench.baseline.*`, deleted after use.

pub mod baseline;
pub mod catchup;
pub mod cli;
pub mod dm;
pub mod fleet;
pub mod group;
pub mod idle;
pub mod max;
pub mod overload;
pub mod presence;
pub mod procstat;
pub mod report;
pub mod stats;
pub mod system;
pub mod ws;

use std::path::PathBuf;

use anyhow::{Result, bail};
use serde::Serialize;

use crate::{
    baseline::Baseline,
    cli::{Cli, Load, Mode, Output, Pipeline},
    dm::{Population, TrialResult, TrialSpec},
    report::Machine,
    system::System,
};

/// The targets on the 2-core box, checked in every summary that measures them.
pub mod targets {
    /// Delivered one-to-one messages/s at the max sustained rate over the JetStream baseline.
    pub const RATIO: f64 = 0.4;
    pub const DELIVERY_P50_MS: f64 = 5.0;
    pub const DELIVERY_P99_MS: f64 = 30.0;
    pub const SENT_P99_MS: f64 = 10.0;
    /// CPU of gateway + sequencer + fan-out worker per delivered message.
    pub const SERVICES_CPU_US: f64 = 50.0;
    pub const IDLE_BYTES_PER_CONN: f64 = 8.0 * 1024.0;
    pub const IDLE_CONNECTIONS: usize = 100_000;
    pub const CATCHUP_10K_MS: f64 = 1000.0;
}

/// `bench overload` waits at least this long for the last deliveries.
const OVERLOAD_MIN_DRAIN_S: f64 = 600.0;

fn out_dir(o: &Output) -> PathBuf {
    o.out
        .clone()
        .unwrap_or_else(|| chat_e2e::cluster::target_dir().join("bench"))
}

fn check(name: &str, ok: bool, measured: String) -> String {
    format!(
        "  target {name}: {measured} -> {}\n",
        if ok { "met" } else { "MISSED" }
    )
}

/// The idle targets: gateway memory per connection, and connections held.
fn idle_targets(bytes_per_conn: f64, held: usize) -> String {
    check(
        "gateway memory <= 8 KiB per idle connection",
        bytes_per_conn <= targets::IDLE_BYTES_PER_CONN,
        format!("{:.2} KiB", bytes_per_conn / 1024.0),
    ) + &check(
        "100,000 idle connections held",
        held >= targets::IDLE_CONNECTIONS,
        format!("{held} held"),
    )
}

fn latency_targets(t: &TrialResult) -> String {
    let d = &t.delivery_latency;
    let mut s = check(
        "delivery p50 <= 5 ms",
        d.p50_ms <= targets::DELIVERY_P50_MS,
        format!("{:.2} ms", d.p50_ms),
    );
    s += &check(
        "delivery p99 <= 30 ms",
        d.p99_ms <= targets::DELIVERY_P99_MS,
        format!("{:.2} ms", d.p99_ms),
    );
    s += &check(
        "sent ack p99 <= 10 ms",
        t.sent_latency.p99_ms <= targets::SENT_P99_MS,
        format!("{:.2} ms", t.sent_latency.p99_ms),
    );
    if let Some(us) = t.services_cpu_us_per_msg {
        s += &check(
            "services CPU <= 50 µs/msg",
            us <= targets::SERVICES_CPU_US,
            format!("{us:.1} µs"),
        );
    }
    s
}

#[derive(Serialize)]
struct DmRecord {
    baseline: Baseline,
    trial: TrialResult,
    /// delivered/s over the JetStream baseline's msgs/s.
    ratio_to_jetstream: f64,
    accounting_ok: bool,
}

#[derive(Serialize)]
struct MaxRecord {
    baseline: Baseline,
    search: max::SearchResult,
    /// Delivered/s at the max sustained rate over the JetStream baseline.
    ratio_to_jetstream: Option<f64>,
}

async fn baseline_on(sys: &System, load: &Load) -> Result<Baseline> {
    let b = baseline::measure(&sys.nats_url(), load.baseline_msgs, load.size).await?;
    print!("{}", b.summary());
    Ok(b)
}

/// The whole pipeline started, its baseline measured on its nats-server, the pairs connected,
/// and the shape of a trial at `rate` for `duration` seconds.
async fn pipeline(
    load: &Load,
    p: &Pipeline,
    rate: f64,
    duration: f64,
) -> Result<(System, Baseline, Population, TrialSpec)> {
    if p.pairs == 0 {
        bail!("--pairs must be at least 1");
    }
    let sys = System::start_configured(true, &[], &[], p.partitions, p.nats_mode()).await?;
    let b = baseline_on(&sys, load).await?;
    let pop = Population::connect(&sys, p.pairs, 1).await?;
    println!("{} pairs connected ({} sockets)", p.pairs, p.pairs * 2);
    let spec = TrialSpec::steady(rate, duration, load.size, p.drain);
    Ok((sys, b, pop, spec))
}

/// Runs one mode to the end: summary on stdout, results written under `--out`.
pub async fn run(cli: Cli) -> Result<()> {
    let nofile = procstat::raise_nofile();
    // A load-generator process of `idle --clients`: its stdout is its report to the parent.
    if let Mode::IdleClient(a) = cli.mode {
        return fleet::client_main(a).await;
    }
    let machine = Machine::probe();
    let mode = cli.mode.name();
    println!("bench {mode}\n{}", machine.line());
    let command = report::command_line();
    let (out, path) = match &cli.mode {
        Mode::Baseline(a) => {
            let sys = System::start(false).await?;
            let b = baseline_on(&sys, &a.load).await?;
            let _ = sys.stop();
            let o = out_dir(&a.output);
            (o.clone(), report::write(&o, mode, a, machine, &b)?)
        }
        Mode::Dm(a) => {
            let (sys, b, mut pop, spec) =
                pipeline(&a.load, &a.pipeline, a.rate, a.duration).await?;
            let t = pop.trial(&sys, spec).await?;
            let ratio = t.delivered_per_s / b.jetstream.msgs_per_s.max(1e-9);
            print!("{}", t.summary());
            println!(
                "delivered/s {:.0} / JetStream baseline {:.0} = ratio {ratio:.3}",
                t.delivered_per_s, b.jetstream.msgs_per_s
            );
            print!("{}", latency_targets(&t));
            println!(
                "accounting (offered == acked == delivered, no duplicates, no gaps): {}",
                if t.accounting_ok() { "ok" } else { "FAILED" }
            );
            drop(pop);
            let problems = sys.stop();
            if !problems.is_empty() {
                println!("shutdown: {problems:?}");
            }
            let rec = DmRecord {
                accounting_ok: t.accounting_ok(),
                baseline: b,
                trial: t,
                ratio_to_jetstream: ratio,
            };
            let o = out_dir(&a.output);
            (o.clone(), report::write(&o, mode, a, machine, &rec)?)
        }
        Mode::Max(a) => {
            let (sys, b, mut pop, base) =
                pipeline(&a.load, &a.pipeline, a.start_rate, a.duration).await?;
            let search = max::SearchSpec {
                start_rate: a.start_rate,
                growth: a.growth,
                steps: a.steps,
                precision: a.precision,
                half: !a.no_half,
            };
            let r = max::run(&sys, &mut pop, search, base).await?;
            let ratio = r
                .max_delivered_per_s
                .map(|d| d / b.jetstream.msgs_per_s.max(1e-9));
            match (r.max_sustained_rate, r.max_delivered_per_s, ratio) {
                (Some(rate), Some(d), Some(ratio)) => {
                    println!(
                        "max sustained: offered {rate:.0} msg/s, delivered {d:.0}/s; \
                         / JetStream baseline {:.0} = ratio {ratio:.3}",
                        b.jetstream.msgs_per_s
                    );
                    print!(
                        "{}",
                        check(
                            "ratio >= 0.4",
                            ratio >= targets::RATIO,
                            format!("{ratio:.3}")
                        )
                    );
                }
                _ => println!("no trial was sustained: lower --start-rate"),
            }
            if let Some(h) = &r.half {
                print!("at half rate:\n{}", h.summary());
                print!("{}", latency_targets(h));
            }
            drop(pop);
            let _ = sys.stop();
            let o = out_dir(&a.output);
            std::fs::create_dir_all(&o)?;
            std::fs::write(o.join("max.csv"), max::csv(&r))?;
            let rec = MaxRecord {
                baseline: b,
                search: r,
                ratio_to_jetstream: ratio,
            };
            (o.clone(), report::write(&o, mode, a, machine, &rec)?)
        }
        Mode::IdleClient(_) => unreachable!("handled above"),
        Mode::Idle(a) if a.clients > 0 => {
            let mut sys = System::start_fleet(a.gateways, a.max_per_gateway).await?;
            let r = fleet::run(&mut sys, a, nofile).await;
            let _ = sys.stop();
            let r = r?;
            print!("{}", r.summary());
            print!("{}", idle_targets(r.bytes_per_conn, r.held as usize));
            let o = out_dir(&a.output);
            (o.clone(), report::write(&o, mode, a, machine, &r)?)
        }
        Mode::Overload(a) => {
            if a.pipeline.pairs == 0 || a.max_rate <= 0.0 {
                bail!("--pairs and --max-rate must be positive");
            }
            let admin = format!("127.0.0.1:{}", chat_testkit::free_port());
            let sys = System::start_configured(
                true,
                &[],
                &overload::gateway_env(&admin),
                a.pipeline.partitions,
                a.pipeline.nats_mode(),
            )
            .await?;
            let mut pop = Population::connect(&sys, a.pipeline.pairs, 1).await?;
            println!(
                "{} pairs connected ({} sockets)",
                a.pipeline.pairs,
                a.pipeline.pairs * 2
            );
            let spec = overload::OverloadSpec {
                max_rate: a.max_rate,
                factor: a.factor,
                after_factor: a.after_factor,
                reference_s: a.reference,
                overload_s: a.overload,
                after_s: a.after,
                size: a.load.size,
                // Everything acked must arrive before the result says so: the backlog of the
                // overload can take minutes to drain (the wait ends as soon as it has).
                drain_s: a.pipeline.drain.max(OVERLOAD_MIN_DRAIN_S),
                slow: a.slow,
                stall_s: a.stall,
                stall_lead_s: a.stall_lead,
                slow_rate: a.slow_rate,
                slow_size: a.slow_size,
            };
            let r = overload::run(&sys, &mut pop, &admin, spec).await?;
            print!("{}", r.summary());
            drop(pop);
            let problems = sys.stop();
            if !problems.is_empty() {
                println!("shutdown: {problems:?}");
            }
            let o = out_dir(&a.output);
            (o.clone(), report::write(&o, mode, a, machine, &r)?)
        }
        Mode::Idle(a) => {
            let sys = System::start(true).await?;
            let spec = idle::IdleSpec {
                connections: a.connections,
                per_ip: a.per_ip,
                concurrency: a.concurrency,
                hold_s: a.hold,
                settle_s: a.settle,
            };
            let r = idle::run(&sys, spec, nofile).await?;
            print!("{}", r.summary());
            print!("{}", idle_targets(r.gateway_bytes_per_conn, r.held));
            let _ = sys.stop();
            let o = out_dir(&a.output);
            (o.clone(), report::write(&o, mode, a, machine, &r)?)
        }
        Mode::Group(a) => {
            let budget = a.conv_budget.map(|b| {
                vec![
                    (
                        "CHAT_FANOUT_GROUP_CONV_DELIVERIES_PER_SECOND",
                        b.to_string(),
                    ),
                    (
                        "CHAT_FANOUT_GROUP_CONV_BURST",
                        a.conv_burst.unwrap_or(b).to_string(),
                    ),
                ]
            });
            let sys = System::start_with(true, budget.as_deref().unwrap_or_default()).await?;
            let label = match a.conv_budget {
                Some(b) => format!(
                    "per-group budget {b}/s, burst {}",
                    a.conv_burst.unwrap_or(b)
                ),
                None => "default budgets".to_owned(),
            };
            let mut results = Vec::new();
            for (g, members) in a.members.iter().enumerate() {
                let spec = group::GroupSpec {
                    members: *members,
                    rate: a.rate,
                    duration_s: a.duration,
                    size: a.size,
                    senders: a.senders.min(*members),
                    dm_pairs: a.dm_pairs,
                    dm_rate: a.dm_rate,
                    drain_s: a.drain,
                    label: label.clone(),
                };
                let r = group::run(&sys, spec, g as u32 + 1).await?;
                print!("{}", r.summary());
                println!(
                    "accounting (every member got every message once, in order): {}",
                    if r.accounting_ok() { "ok" } else { "FAILED" }
                );
                results.push(r);
            }
            let _ = sys.stop();
            let o = out_dir(&a.output);
            (o.clone(), report::write(&o, mode, a, machine, &results)?)
        }
        Mode::Presence(a) => {
            let sys = System::start(false).await?;
            let spec = presence::PresenceSpec {
                users: a.users,
                gateways: a.gateways,
                heartbeat_s: a.heartbeat,
                duration_s: a.duration,
                churn_per_s: a.churn,
                watched: a.watched,
                query_rate: a.query_rate,
                query_batch: a.query_batch,
                online_ttl_s: a.online_ttl,
            };
            let r = presence::run(&sys, spec).await?;
            print!("{}", r.summary());
            let _ = sys.stop();
            let o = out_dir(&a.output);
            (o.clone(), report::write(&o, mode, a, machine, &r)?)
        }
        Mode::Catchup(a) => {
            let sys = System::start(true).await?;
            let spec = catchup::CatchupSpec {
                messages: a.messages,
                senders: a.senders,
                size: a.size,
            };
            let r = catchup::run(&sys, spec).await?;
            print!("{}", r.summary());
            if a.messages == 10_000 {
                print!(
                    "{}",
                    check(
                        "10,000 missed messages within 1 s of reconnecting",
                        r.catchup_ms <= targets::CATCHUP_10K_MS,
                        format!("{:.0} ms", r.catchup_ms)
                    )
                );
            }
            let _ = sys.stop();
            let o = out_dir(&a.output);
            (o.clone(), report::write(&o, mode, a, machine, &r)?)
        }
    };
    println!("results: {} (directory {})", path.display(), out.display());
    println!("reproduce: {command}");
    Ok(())
}
