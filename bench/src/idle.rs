//! Idle connections: `n` authenticated WebSockets (one user each, so the gateway subscribes a
//! user subject per connection), held open; the gateway's memory per connection
//! (`(RSS at n - RSS at 0) / n`) and its CPU while they idle (heartbeats included when the hold
//! is longer than the heartbeat interval, 15 s).
//!
//! Client sockets are spread over source addresses 127.0.0.2, 127.0.0.3, … (`per_ip` each), so
//! `n` is not bounded by the ephemeral port range of one address pair. Every process's open-file
//! limit is raised to its hard limit first (`bench` raises its own; nats-server and the services
//! inherit it). At the end every held connection is probed: one frame published on its user's
//! subject must come out of its socket, which proves it is subscribed.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Result, anyhow};
use chat_protocol::{ids::UserId, subjects};
use futures::StreamExt;
use serde::Serialize;
use tokio::time::Instant;

use crate::{
    procstat::{self, Snapshot, Usage},
    system::System,
    ws,
};

#[derive(Debug, Clone, Copy, Serialize)]
pub struct IdleSpec {
    pub connections: usize,
    pub per_ip: usize,
    pub concurrency: usize,
    pub hold_s: f64,
    pub settle_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct IdleResult {
    pub spec: IdleSpec,
    /// RLIMIT_NOFILE (soft, hard) in force for every process of the run.
    pub nofile_limit: (u64, u64),
    pub attempted: usize,
    /// Connections that got `hello` and stayed open through the hold.
    pub held: usize,
    /// Failed connection attempts by reason (first words of the error).
    pub failures: BTreeMap<String, u64>,
    /// Held connections that dropped before the end.
    pub dropped: u64,
    /// Held connections that received the probe frame published on their user's subject.
    pub probed: u64,
    pub source_addresses: usize,
    pub connect_s: f64,
    pub gateway_rss_0_kib: u64,
    pub gateway_rss_n_kib: u64,
    /// Gateway memory per held connection, bytes.
    pub gateway_bytes_per_conn: f64,
    pub nats_rss_0_kib: u64,
    pub nats_rss_n_kib: u64,
    pub bench_rss_n_kib: u64,
    /// Gateway CPU while the connections idled, share of one core.
    pub gateway_idle_cores: f64,
    /// Resources over the hold.
    pub usage: Vec<Usage>,
}

impl IdleResult {
    pub fn summary(&self) -> String {
        let mut s = format!(
            "idle: {} connections asked, {} held ({} dropped, {} probed ok) from {} source \
             addresses in {:.1} s; open-file limit {:?}\n  failures: {:?}\n  \
             gateway RSS {} KiB at 0 -> {} KiB at {}: {:.0} bytes ({:.2} KiB) per connection\n  \
             nats-server RSS {} -> {} KiB; bench RSS {} KiB\n  \
             gateway idle CPU over {:.0} s: {:.4} cores\n",
            self.attempted,
            self.held,
            self.dropped,
            self.probed,
            self.source_addresses,
            self.connect_s,
            self.nofile_limit,
            self.failures,
            self.gateway_rss_0_kib,
            self.gateway_rss_n_kib,
            self.held,
            self.gateway_bytes_per_conn,
            self.gateway_bytes_per_conn / 1024.0,
            self.nats_rss_0_kib,
            self.nats_rss_n_kib,
            self.bench_rss_n_kib,
            self.spec.hold_s,
            self.gateway_idle_cores,
        );
        s.push_str(&crate::report::usage_table(&self.usage));
        s
    }
}

/// The `k`-th source address: 127.0.0.2 upwards.
fn source(k: usize) -> Result<IpAddr> {
    let host = u8::try_from(k + 2)
        .ok()
        .filter(|h| *h < 255)
        .ok_or_else(|| anyhow!("more than 253 source addresses needed: raise --per-ip"))?;
    Ok(IpAddr::V4(Ipv4Addr::new(127, 0, 0, host)))
}

/// A short, stable name for a connection error.
fn reason(e: &anyhow::Error) -> String {
    let text = format!("{e:#}");
    let text = if let Some(os) = e
        .chain()
        .find_map(|c| c.downcast_ref::<std::io::Error>())
        .and_then(std::io::Error::raw_os_error)
    {
        format!("os error {os}")
    } else {
        text
    };
    text.chars().take(80).collect()
}

pub async fn run(sys: &System, spec: IdleSpec, nofile_limit: (u64, u64)) -> Result<IdleResult> {
    let procs = sys.procs();
    let gw = procs
        .iter()
        .find(|p| p.name.starts_with("gateway"))
        .ok_or_else(|| anyhow!("no gateway"))?
        .name
        .clone();
    // Settle, then RSS at 0 connections.
    if let Some(p) = procs.iter().find(|p| p.name == gw) {
        println!(
            "gateway pid {}; connecting in {:.1} s",
            p.pid, spec.settle_s
        );
    }
    tokio::time::sleep(Duration::from_secs_f64(spec.settle_s)).await;
    let zero = Snapshot::take(&procs);

    let url = sys.gateway_url().to_owned();
    let secret = sys.secret();
    let alive = Arc::new(AtomicU64::new(0));
    let probed = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let started = Instant::now();
    let results: Vec<Result<tokio::task::JoinHandle<()>>> =
        futures::stream::iter(0..spec.connections)
            .map(|i| {
                let url = url.clone();
                let (alive, probed, mut stop) = (alive.clone(), probed.clone(), stop_rx.clone());
                async move {
                    let ip = source(i / spec.per_ip.max(1))?;
                    let mut ws =
                        ws::connect(&url, secret, &format!("idle{i}"), "d", Some(ip)).await?;
                    alive.fetch_add(1, Ordering::Relaxed);
                    Ok(tokio::spawn(async move {
                        // Read (answering pings) until told to stop or the socket closes.
                        loop {
                            tokio::select! {
                                _ = stop.changed() => break,
                                f = ws::next_text(&mut ws) => match f {
                                    Ok(Some(t)) if t.as_str().contains("\"pong\"") => {
                                        probed.fetch_add(1, Ordering::Relaxed);
                                    }
                                    Ok(Some(_)) => {}
                                    _ => {
                                        alive.fetch_sub(1, Ordering::Relaxed);
                                        return;
                                    }
                                },
                            }
                        }
                        let _ = ws.close(None).await;
                    }))
                }
            })
            .buffer_unordered(spec.concurrency.max(1))
            .collect()
            .await;
    let connect_s = started.elapsed().as_secs_f64();
    let mut failures = BTreeMap::new();
    let mut tasks = Vec::new();
    for r in results {
        match r {
            Ok(t) => tasks.push(t),
            Err(e) => *failures.entry(reason(&e)).or_insert(0u64) += 1,
        }
    }
    let opened = tasks.len();

    // Let the gateway settle, then hold and measure.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let at_n = Snapshot::take(&procs);
    tokio::time::sleep(Duration::from_secs_f64(spec.hold_s)).await;
    let end = Snapshot::take(&procs);
    let usage = procstat::usage(&at_n, &end, 0);

    // Probe: a frame on every held user's subject must reach its socket.
    let client = sys.cluster.client();
    for i in 0..spec.connections {
        if let Ok(user) = UserId::parse(&format!("idle{i}")) {
            let _ = client
                .publish(subjects::user(&user), r#"{"type":"pong"}"#.into())
                .await;
        }
    }
    let _ = client.flush().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while probed.load(Ordering::Relaxed) < alive.load(Ordering::Relaxed)
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let held = alive.load(Ordering::Relaxed) as usize;
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }

    let rss0 = zero.rss_kib(&gw);
    let rssn = at_n.rss_kib(&gw);
    let gateway_idle_cores = usage.iter().find(|u| u.name == gw).map_or(0.0, |u| u.cores);
    Ok(IdleResult {
        spec,
        nofile_limit,
        attempted: spec.connections,
        held,
        failures,
        dropped: (opened - held.min(opened)) as u64,
        probed: probed.load(Ordering::Relaxed),
        source_addresses: spec.connections.div_ceil(spec.per_ip.max(1)),
        connect_s,
        gateway_rss_0_kib: rss0,
        gateway_rss_n_kib: rssn,
        gateway_bytes_per_conn: if opened > 0 {
            (rssn.saturating_sub(rss0) * 1024) as f64 / opened as f64
        } else {
            0.0
        },
        nats_rss_0_kib: zero.rss_kib("nats-server"),
        nats_rss_n_kib: at_n.rss_kib("nats-server"),
        bench_rss_n_kib: at_n.rss_kib("bench"),
        gateway_idle_cores,
        usage,
    })
}
