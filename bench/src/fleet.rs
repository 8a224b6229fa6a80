//! `idle --clients P --gateways G`: idle connections the way a deployment holds them, past one
//! process's open-file limit. G gateway processes share one nats-server (user `i` connects to
//! gateway `i mod G`, each gateway capped at `--max-per-gateway`); P load-generator processes
//! (`bench idle-client`, this binary again) hold the sockets, each its share, and report on
//! stdout as JSON lines. Measured: connections held, connect rate, memory per connection of
//! each gateway (`(RSS at n - RSS at 0) / n`), idle CPU, nats-server memory; every held
//! connection is probed (a frame published on its user's subject must arrive). Optionally:
//!
//! - `--churn S`: every client process connects fresh users and closes them again for S
//!   seconds: connects + authentications + subscriptions per second;
//! - `--kill`: gateway-1 is SIGKILLed; its clients reconnect to the others with the jittered
//!   backoff of `docs/protocol.md` (full jitter, 500 ms doubling, capped at 30 s; an HTTP 503
//!   `overloaded` waits the gateways' `Retry-After`, 1 s, plus up to as much again); measured
//!   until every one is back and
//!   gets pushes again. (Message recovery through `sync` after a gateway's death is proven by
//!   the e2e fault test `sigkill_gateway`, with the whole pipeline.)

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    process::Stdio,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result, anyhow, bail};
use chat_e2e::cluster::SECRET;
use chat_protocol::{ids::UserId, subjects};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    process::{Child, ChildStdin, Command},
    time::Instant,
};
use tokio_tungstenite::tungstenite::Message;

use crate::{
    cli::{IdleArgs, IdleClientArgs},
    procstat::{Proc, Snapshot, Usage},
    system::System,
    ws,
};

/// What a client process reports, one JSON object per line.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
enum Report {
    /// The first connect round is over.
    Connected {
        held: u64,
        failures: BTreeMap<String, u64>,
        connect_s: f64,
    },
    /// Every 200 ms.
    Status {
        held: u64,
        /// Held, by gateway index.
        by_gateway: Vec<u64>,
        probed: u64,
        lost: u64,
        reconnected: u64,
        closes: BTreeMap<String, u64>,
    },
    Churned {
        connects: u64,
        failures: BTreeMap<String, u64>,
        secs: f64,
    },
}

/// The user name of global index `i`.
fn user(i: usize) -> String {
    format!("idle{i}")
}

/// The `k`-th source address of the held connections: 127.0.0.2 upwards.
fn source(k: usize) -> Result<IpAddr> {
    let host = u8::try_from(k + 2)
        .ok()
        .filter(|h| *h < 255)
        .ok_or_else(|| anyhow!("more than 253 source addresses needed: raise --per-ip"))?;
    Ok(IpAddr::V4(Ipv4Addr::new(127, 0, 0, host)))
}

/// A source address for the `n`-th churn connection of client process `index`: a fresh one
/// every 250 connections, so closed connections' TIME_WAIT ports never run out.
fn churn_source(index: usize, n: u64) -> IpAddr {
    let block = n / 250;
    IpAddr::V4(Ipv4Addr::new(
        127,
        (10 + index % 200) as u8,
        (block / 250 % 250) as u8 + 1,
        (block % 250) as u8 + 1,
    ))
}

/// A short, stable name for a connection error.
fn reason(e: &anyhow::Error) -> String {
    let text = format!("{e:#}");
    let text = match e
        .chain()
        .find_map(|c| c.downcast_ref::<std::io::Error>())
        .and_then(std::io::Error::raw_os_error)
    {
        Some(os) => format!("os error {os}"),
        None if text.contains("503") => "http 503".into(),
        None => text,
    };
    text.chars().take(60).collect()
}

/// The full-jitter backoff of `docs/protocol.md`: a random wait in 0..min(30 s, 500 ms × 2^n).
fn backoff(attempt: u32) -> Duration {
    let cap = Duration::from_millis(500)
        .saturating_mul(1 << attempt.min(6))
        .min(Duration::from_secs(30));
    cap.mul_f64(rand::random::<f64>())
}

struct Counters {
    held: AtomicU64,
    by_gateway: Vec<AtomicU64>,
    probed: AtomicU64,
    lost: AtomicU64,
    reconnected: AtomicU64,
    /// Why held connections ended: close code, error or end of stream.
    closes: Mutex<BTreeMap<String, u64>>,
}

/// One held connection: reads (pings are answered by tungstenite) and counts probes; when the
/// socket closes, reconnects with jittered backoff, to the next gateway each attempt.
async fn hold(
    mut socket: ws::Ws,
    mut gw: usize,
    i: usize,
    urls: Arc<Vec<String>>,
    ip: IpAddr,
    c: Arc<Counters>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let name = user(i);
    loop {
        loop {
            tokio::select! {
                _ = stop.changed() => {
                    let _ = socket.close(None).await;
                    return;
                }
                m = socket.next() => {
                    let why = match m {
                        Some(Ok(Message::Text(t))) => {
                            if t.as_str().contains("\"pong\"") {
                                c.probed.fetch_add(1, Ordering::Relaxed);
                            }
                            continue;
                        }
                        Some(Ok(Message::Close(Some(f)))) => format!("close {}", u16::from(f.code)),
                        Some(Ok(Message::Close(None))) => "close without code".to_owned(),
                        Some(Ok(_)) => continue,
                        Some(Err(e)) => format!("{e}").chars().take(40).collect(),
                        None => "eof".to_owned(),
                    };
                    let mut closes = c.closes.lock().unwrap_or_else(|e| e.into_inner());
                    *closes.entry(why).or_insert(0) += 1;
                    break;
                }
            }
        }
        c.held.fetch_sub(1, Ordering::Relaxed);
        c.by_gateway[gw].fetch_sub(1, Ordering::Relaxed);
        c.lost.fetch_add(1, Ordering::Relaxed);
        let mut attempt = 0;
        socket = loop {
            tokio::select! {
                _ = stop.changed() => return,
                _ = tokio::time::sleep(backoff(attempt)) => {}
            }
            attempt += 1;
            // Any other gateway, at random (docs/protocol.md): not all to the same next one.
            gw = (gw + rand::random_range(1..urls.len().max(2))) % urls.len();
            match ws::connect(&urls[gw], SECRET.as_bytes(), &name, "d", Some(ip)).await {
                Ok(s) => break s,
                // 503 `overloaded`: at least its Retry-After (the gateways' default, 1 s),
                // plus as much jitter, before the next attempt.
                Err(e) if reason(&e) == "http 503" => {
                    let wait = Duration::from_secs(1).mul_f64(1.0 + rand::random::<f64>());
                    tokio::select! {
                        _ = stop.changed() => return,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
                Err(_) => {}
            }
        };
        c.held.fetch_add(1, Ordering::Relaxed);
        c.by_gateway[gw].fetch_add(1, Ordering::Relaxed);
        c.reconnected.fetch_add(1, Ordering::Relaxed);
    }
}

fn emit(r: &Report) {
    println!(
        "{}",
        serde_json::to_string(r).expect("reports always serialize")
    );
}

/// `bench idle-client`: the load-generator process.
pub async fn client_main(a: IdleClientArgs) -> Result<()> {
    let urls: Arc<Vec<String>> = Arc::new(a.urls.split(',').map(str::to_owned).collect());
    let g = urls.len();
    let c = Arc::new(Counters {
        held: AtomicU64::new(0),
        by_gateway: (0..g).map(|_| AtomicU64::new(0)).collect(),
        probed: AtomicU64::new(0),
        lost: AtomicU64::new(0),
        reconnected: AtomicU64::new(0),
        closes: Mutex::default(),
    });
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let started = Instant::now();
    let results: Vec<Result<tokio::task::JoinHandle<()>>> =
        futures::stream::iter(a.first..a.first + a.count)
            .map(|i| {
                let (urls, c, stop) = (urls.clone(), c.clone(), stop_rx.clone());
                async move {
                    let ip = source(i / a.per_ip.max(1))?;
                    let gw = i % g;
                    let socket =
                        ws::connect(&urls[gw], SECRET.as_bytes(), &user(i), "d", Some(ip)).await?;
                    c.held.fetch_add(1, Ordering::Relaxed);
                    c.by_gateway[gw].fetch_add(1, Ordering::Relaxed);
                    Ok(tokio::spawn(hold(socket, gw, i, urls, ip, c, stop)))
                }
            })
            .buffer_unordered(a.concurrency.max(1))
            .collect()
            .await;
    let mut failures = BTreeMap::new();
    let mut tasks = Vec::new();
    for r in results {
        match r {
            Ok(t) => tasks.push(t),
            Err(e) => *failures.entry(reason(&e)).or_insert(0u64) += 1,
        }
    }
    emit(&Report::Connected {
        held: c.held.load(Ordering::Relaxed),
        failures,
        connect_s: started.elapsed().as_secs_f64(),
    });

    let status = {
        let c = c.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(200));
            loop {
                every.tick().await;
                emit(&Report::Status {
                    held: c.held.load(Ordering::Relaxed),
                    by_gateway: c
                        .by_gateway
                        .iter()
                        .map(|n| n.load(Ordering::Relaxed))
                        .collect(),
                    probed: c.probed.load(Ordering::Relaxed),
                    lost: c.lost.load(Ordering::Relaxed),
                    reconnected: c.reconnected.load(Ordering::Relaxed),
                    closes: c.closes.lock().unwrap_or_else(|e| e.into_inner()).clone(),
                });
            }
        })
    };
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("churn"), Some(secs)) => {
                let secs: f64 = secs.parse().context("churn seconds")?;
                emit(&churn(&a, &urls, secs).await);
            }
            (Some("stop"), _) | (None, _) => break,
            _ => bail!("unknown command {line:?}"),
        }
    }
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }
    status.abort();
    Ok(())
}

/// Connects fresh users and closes them again for `secs`, `concurrency` at a time.
async fn churn(a: &IdleClientArgs, urls: &Arc<Vec<String>>, secs: f64) -> Report {
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let next = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(Mutex::new(BTreeMap::<String, u64>::new()));
    let started = Instant::now();
    let workers: Vec<_> = (0..a.concurrency.max(1))
        .map(|_| {
            let (next, failures, urls, index) =
                (next.clone(), failures.clone(), urls.clone(), a.index);
            tokio::spawn(async move {
                let mut done = 0u64;
                while Instant::now() < end {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    let name = format!("churn{index}x{n}");
                    let url = &urls[n as usize % urls.len()];
                    match ws::connect(
                        url,
                        SECRET.as_bytes(),
                        &name,
                        "d",
                        Some(churn_source(index, n)),
                    )
                    .await
                    {
                        Ok(mut s) => {
                            done += 1;
                            let _ = s.close(None).await;
                        }
                        Err(e) => {
                            let mut f = failures.lock().unwrap_or_else(|e| e.into_inner());
                            *f.entry(reason(&e)).or_insert(0) += 1;
                        }
                    }
                }
                done
            })
        })
        .collect();
    let mut connects = 0;
    for w in workers {
        connects += w.await.unwrap_or(0);
    }
    let failures = failures.lock().unwrap_or_else(|e| e.into_inner()).clone();
    Report::Churned {
        connects,
        failures,
        secs: started.elapsed().as_secs_f64(),
    }
}

/// The parent's view of one client process.
#[derive(Default, Clone)]
struct ClientView {
    connected: Option<(u64, BTreeMap<String, u64>, f64)>,
    held: u64,
    by_gateway: Vec<u64>,
    probed: u64,
    lost: u64,
    reconnected: u64,
    closes: BTreeMap<String, u64>,
    churned: Option<(u64, BTreeMap<String, u64>, f64)>,
}

struct Client {
    child: Child,
    stdin: ChildStdin,
    view: Arc<Mutex<ClientView>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct GatewayIdle {
    pub name: String,
    pub held: u64,
    pub rss_0_kib: u64,
    pub rss_n_kib: u64,
    pub bytes_per_conn: f64,
    pub idle_cores: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Churn {
    pub seconds: f64,
    pub connects: u64,
    pub per_second: f64,
    pub failures: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Kill {
    /// Connections gateway-1 held when it was killed.
    pub victims: u64,
    /// From the SIGKILL until every victim saw its socket close.
    pub all_lost_s: f64,
    /// From the SIGKILL until half, 99 % and all of the victims were connected again.
    pub half_back_s: f64,
    pub p99_back_s: f64,
    pub all_back_s: f64,
    /// Held on each gateway afterwards.
    pub by_gateway_after: Vec<u64>,
    /// Every held connection got the probe published after the reconnect.
    pub probed_after: u64,
    pub held_after: u64,
    /// How held connections ended over the whole run (close code, error, end of stream).
    pub closes: BTreeMap<String, u64>,
    /// Every process's CPU and memory from the SIGKILL until everyone was back.
    pub usage: Vec<Usage>,
}

#[derive(Debug, Clone, Serialize)]
pub struct FleetResult {
    pub connections: usize,
    pub gateways: usize,
    pub clients: usize,
    pub nofile_limit: (u64, u64),
    pub held: u64,
    pub failures: BTreeMap<String, u64>,
    pub probed: u64,
    pub connect_s: f64,
    pub connects_per_s: f64,
    pub per_gateway: Vec<GatewayIdle>,
    /// Over every gateway: (sum RSS at n - sum RSS at 0) / held.
    pub bytes_per_conn: f64,
    pub nats_rss_0_kib: u64,
    pub nats_rss_n_kib: u64,
    pub clients_rss_n_kib: u64,
    pub hold_s: f64,
    pub usage: Vec<Usage>,
    pub churn: Option<Churn>,
    pub kill: Option<Kill>,
}

impl FleetResult {
    pub fn summary(&self) -> String {
        let mut s = format!(
            "idle fleet: {} connections asked over {} gateways and {} client processes; {} held \
             ({} probed ok) in {:.1} s = {:.0} connects/s; open-file limit {:?}\n  failures: {:?}\n",
            self.connections,
            self.gateways,
            self.clients,
            self.held,
            self.probed,
            self.connect_s,
            self.connects_per_s,
            self.nofile_limit,
            self.failures,
        );
        for g in &self.per_gateway {
            s += &format!(
                "  {}: {} held, RSS {} -> {} KiB: {:.0} bytes ({:.2} KiB) per connection, idle {:.4} cores\n",
                g.name,
                g.held,
                g.rss_0_kib,
                g.rss_n_kib,
                g.bytes_per_conn,
                g.bytes_per_conn / 1024.0,
                g.idle_cores
            );
        }
        s += &format!(
            "  all gateways: {:.0} bytes ({:.2} KiB) per connection; nats-server RSS {} -> {} KiB \
             ({:.0} bytes per connection); client processes {} KiB\n",
            self.bytes_per_conn,
            self.bytes_per_conn / 1024.0,
            self.nats_rss_0_kib,
            self.nats_rss_n_kib,
            (self.nats_rss_n_kib.saturating_sub(self.nats_rss_0_kib) * 1024) as f64
                / self.held.max(1) as f64,
            self.clients_rss_n_kib
        );
        s.push_str(&crate::report::usage_table(&self.usage));
        if let Some(c) = &self.churn {
            s += &format!(
                "  churn: {} connects (connect, authenticate, subscribe, hello, close) in {:.1} s = \
                 {:.0}/s; failures {:?}\n",
                c.connects, c.seconds, c.per_second, c.failures
            );
        }
        if let Some(k) = &self.kill {
            s += &format!(
                "  kill gateway-1 ({} connections): all lost after {:.2} s; back: half {:.2} s, \
                 99% {:.2} s, all {:.2} s; after: {} held {:?}, {} probed ok; closes {:?}\n",
                k.victims,
                k.all_lost_s,
                k.half_back_s,
                k.p99_back_s,
                k.all_back_s,
                k.held_after,
                k.by_gateway_after,
                k.probed_after,
                k.closes
            );
            s.push_str(&crate::report::usage_table(&k.usage));
        }
        s
    }
}

fn totals(clients: &[Client]) -> ClientView {
    let mut t = ClientView::default();
    for c in clients {
        let v = c.view.lock().unwrap_or_else(|e| e.into_inner());
        t.held += v.held;
        t.probed += v.probed;
        t.lost += v.lost;
        t.reconnected += v.reconnected;
        for (k, n) in &v.closes {
            *t.closes.entry(k.clone()).or_insert(0) += n;
        }
        if t.by_gateway.len() < v.by_gateway.len() {
            t.by_gateway.resize(v.by_gateway.len(), 0);
        }
        for (a, b) in t.by_gateway.iter_mut().zip(&v.by_gateway) {
            *a += b;
        }
    }
    t
}

/// Waits (polling the clients' reports) until `done` holds, at most `limit`.
async fn wait_for(
    clients: &[Client],
    limit: Duration,
    mut done: impl FnMut(&[ClientView], &ClientView) -> bool,
) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        let views: Vec<ClientView> = clients
            .iter()
            .map(|c| c.view.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .collect();
        if done(&views, &totals(clients)) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn spawn_client(
    a: &IdleArgs,
    urls: &str,
    index: usize,
    first: usize,
    count: usize,
) -> Result<Client> {
    let exe = std::env::current_exe().context("own executable")?;
    let mut child = Command::new(exe)
        .args([
            "idle-client",
            "--urls",
            urls,
            "--first",
            &first.to_string(),
            "--count",
            &count.to_string(),
            "--per-ip",
            &a.per_ip.to_string(),
            "--concurrency",
            &a.concurrency.to_string(),
            "--index",
            &index.to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("spawn a client process")?;
    let stdin = child.stdin.take().expect("piped");
    let stdout = child.stdout.take().expect("piped");
    let view = Arc::new(Mutex::new(ClientView::default()));
    tokio::spawn({
        let view = view.clone();
        async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let Ok(r) = serde_json::from_str::<Report>(&line) else {
                    continue;
                };
                let mut v = view.lock().unwrap_or_else(|e| e.into_inner());
                match r {
                    Report::Connected {
                        held,
                        failures,
                        connect_s,
                    } => {
                        v.held = held;
                        v.connected = Some((held, failures, connect_s));
                    }
                    Report::Status {
                        held,
                        by_gateway,
                        probed,
                        lost,
                        reconnected,
                        closes,
                    } => {
                        (
                            v.held,
                            v.by_gateway,
                            v.probed,
                            v.lost,
                            v.reconnected,
                            v.closes,
                        ) = (held, by_gateway, probed, lost, reconnected, closes);
                    }
                    Report::Churned {
                        connects,
                        failures,
                        secs,
                    } => v.churned = Some((connects, failures, secs)),
                }
            }
        }
    });
    Ok(Client { child, stdin, view })
}

async fn probe_all(sys: &System, n: usize) {
    let client = sys.cluster.client();
    for i in 0..n {
        if let Ok(user) = UserId::parse(&user(i)) {
            let _ = client
                .publish(subjects::user(&user), r#"{"type":"pong"}"#.into())
                .await;
        }
    }
    let _ = client.flush().await;
}

pub async fn run(sys: &mut System, a: &IdleArgs, nofile_limit: (u64, u64)) -> Result<FleetResult> {
    if a.clients == 0 {
        bail!("the fleet mode needs --clients >= 1");
    }
    if a.kill && a.gateways < 2 {
        bail!("--kill needs --gateways >= 2");
    }
    let urls = sys.cluster.gateway_urls.join(",");
    let gateways: Vec<String> = sys
        .cluster
        .gateways
        .iter()
        .map(|g| g.name().to_owned())
        .collect();
    println!(
        "{} gateways; connecting in {:.1} s",
        gateways.len(),
        a.settle
    );
    tokio::time::sleep(Duration::from_secs_f64(a.settle)).await;
    let mut procs = sys.procs();
    let zero = Snapshot::take(&procs);

    let started = Instant::now();
    let per = a.connections.div_ceil(a.clients);
    let mut clients = Vec::new();
    for k in 0..a.clients {
        let first = k * per;
        let count = per.min(a.connections.saturating_sub(first));
        if count == 0 {
            break;
        }
        clients.push(spawn_client(a, &urls, k, first, count)?);
    }
    for (k, c) in clients.iter().enumerate() {
        procs.push(Proc {
            name: format!("client-{}", k + 1),
            pid: c.child.id().unwrap_or(0),
        });
    }
    let limit = Duration::from_secs(600);
    if !wait_for(&clients, limit, |views, _| {
        views.iter().all(|v| v.connected.is_some())
    })
    .await
    {
        bail!("the client processes did not finish connecting in {limit:?}");
    }
    let connect_s = started.elapsed().as_secs_f64();
    let mut failures = BTreeMap::new();
    for c in &clients {
        let v = c.view.lock().unwrap_or_else(|e| e.into_inner());
        for (k, n) in v.connected.as_ref().map(|c| &c.1).into_iter().flatten() {
            *failures.entry(k.clone()).or_insert(0) += n;
        }
    }
    // Wait for the first status of every client (per-gateway counts), then measure.
    wait_for(&clients, Duration::from_secs(5), |views, _| {
        views.iter().all(|v| !v.by_gateway.is_empty())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let at_n = Snapshot::take(&procs);
    let held_at_n = totals(&clients);
    tokio::time::sleep(Duration::from_secs_f64(a.hold)).await;
    let end = Snapshot::take(&procs);
    let usage = crate::procstat::usage(&at_n, &end, 0);

    probe_all(sys, a.connections).await;
    let held = held_at_n.held;
    wait_for(&clients, Duration::from_secs(30), |_, t| t.probed >= t.held).await;
    let probed = totals(&clients).probed;

    let cores = |name: &str| {
        usage
            .iter()
            .find(|u| u.name == name)
            .map_or(0.0, |u| u.cores)
    };
    let per_gateway: Vec<GatewayIdle> = gateways
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let held = held_at_n.by_gateway.get(i).copied().unwrap_or(0);
            let (r0, rn) = (zero.rss_kib(name), at_n.rss_kib(name));
            GatewayIdle {
                name: name.clone(),
                held,
                rss_0_kib: r0,
                rss_n_kib: rn,
                bytes_per_conn: (rn.saturating_sub(r0) * 1024) as f64 / held.max(1) as f64,
                idle_cores: cores(name),
            }
        })
        .collect();
    let grown: u64 = per_gateway
        .iter()
        .map(|g| g.rss_n_kib.saturating_sub(g.rss_0_kib))
        .sum();

    let mut churn = None;
    if a.churn > 0.0 {
        for c in &mut clients {
            c.stdin
                .write_all(format!("churn {}\n", a.churn).as_bytes())
                .await?;
        }
        let limit = Duration::from_secs_f64(a.churn + 60.0);
        wait_for(&clients, limit, |views, _| {
            views.iter().all(|v| v.churned.is_some())
        })
        .await;
        let mut c = Churn {
            seconds: a.churn,
            connects: 0,
            per_second: 0.0,
            failures: BTreeMap::new(),
        };
        for cl in &clients {
            let v = cl.view.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((n, f, _)) = &v.churned {
                c.connects += n;
                for (k, n) in f {
                    *c.failures.entry(k.clone()).or_insert(0) += n;
                }
            }
        }
        c.per_second = c.connects as f64 / a.churn;
        churn = Some(c);
    }

    let mut kill = None;
    if a.kill {
        let before = totals(&clients);
        let victims = before.by_gateway.first().copied().unwrap_or(0);
        let total = before.held;
        let storm_start = Snapshot::take(&procs);
        println!("SIGKILL gateway-1 ({victims} connections)");
        let t0 = Instant::now();
        sys.cluster.gateways[0].sigkill();
        let lost_base = before.lost;
        let back_base = before.reconnected;
        let mut marks = [None::<f64>; 3];
        let mut all_lost = None;
        let storm = Duration::from_secs(180);
        wait_for(&clients, storm, |_, t| {
            let s = t0.elapsed().as_secs_f64();
            if all_lost.is_none() && t.lost - lost_base >= victims {
                all_lost = Some(s);
            }
            let back = t.reconnected - back_base;
            for (m, share) in marks.iter_mut().zip([0.5, 0.99, 1.0]) {
                if m.is_none() && back as f64 >= (victims as f64 * share).ceil() {
                    *m = Some(s);
                }
            }
            marks[2].is_some() && t.held >= total
        })
        .await;
        let storm_end = Snapshot::take(&procs);
        let after = totals(&clients);
        probe_all(sys, a.connections).await;
        let probed_before = after.probed;
        wait_for(&clients, Duration::from_secs(30), |_, t| {
            t.probed - probed_before >= t.held
        })
        .await;
        let nan = f64::NAN;
        kill = Some(Kill {
            victims,
            all_lost_s: all_lost.unwrap_or(nan),
            half_back_s: marks[0].unwrap_or(nan),
            p99_back_s: marks[1].unwrap_or(nan),
            all_back_s: marks[2].unwrap_or(nan),
            by_gateway_after: after.by_gateway.clone(),
            probed_after: totals(&clients).probed - probed_before,
            held_after: after.held,
            closes: totals(&clients).closes,
            usage: crate::procstat::usage(&storm_start, &storm_end, 0),
        });
    }

    for c in &mut clients {
        let _ = c.stdin.write_all(b"stop\n").await;
    }
    for c in &mut clients {
        let _ = tokio::time::timeout(Duration::from_secs(20), c.child.wait()).await;
    }
    let clients_rss: u64 = (1..=clients.len())
        .map(|k| at_n.rss_kib(&format!("client-{k}")))
        .sum();
    Ok(FleetResult {
        connections: a.connections,
        gateways: gateways.len(),
        clients: clients.len(),
        nofile_limit,
        held,
        failures,
        probed,
        connect_s,
        connects_per_s: held as f64 / connect_s.max(1e-9),
        per_gateway,
        bytes_per_conn: (grown * 1024) as f64 / held.max(1) as f64,
        nats_rss_0_kib: zero.rss_kib("nats-server"),
        nats_rss_n_kib: at_n.rss_kib("nats-server"),
        clients_rss_n_kib: clients_rss,
        hold_s: a.hold,
        usage,
        churn,
        kill,
    })
}
