//! Presence at scale, simulated at the NATS level: `gateways` simulated gateways hold `users`
//! online users between them and talk to the real `presence` binary exactly as gateways do
//! (`chat.presence.report.<gateway>`: batched events and the full state every heartbeat,
//! `docs/protocol.md` and `nats/README.md`); each one also watches `watched / gateways` users of
//! the other gateways and counts the pushes it gets on `chat.presence.push.<gateway>`.
//!
//! 1. **Ramp**: every gateway reports all of its users online at once; the time until the
//!    bucket holds every user's key gives the connect updates per second the service absorbs.
//! 2. **Steady state** for `duration` seconds: every gateway sends its full state every
//!    `heartbeat` seconds (staggered), `churn` users per second go offline and come back a
//!    second later (each cycle: last seen, a delete, a put), and `query_rate` presence queries of
//!    `query_batch` users each are asked (the bench plays `chat.api.contacts`, everyone being
//!    everyone's contact). Measured: KV writes (the bucket stream's sequence), pushes, CPU of
//!    the presence process and of nats-server, per online user.

use std::{
    collections::VecDeque,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result, bail};
use chat_protocol::{
    api::{
        ContactsReply, ContactsRequest, PRESENCE_REPORT_MAX, PresencePush, PresenceReply,
        PresenceReport, PresenceRequest,
    },
    ids::GatewayId,
    subjects,
};
use chat_testkit::ChildProcess;
use futures::StreamExt;
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::{
    procstat::{self, Proc, Snapshot, Usage},
    stats::{self, Latency},
    system::System,
};

#[derive(Debug, Clone, Copy, Serialize)]
pub struct PresenceSpec {
    pub users: usize,
    pub gateways: usize,
    pub heartbeat_s: f64,
    pub duration_s: f64,
    pub churn_per_s: f64,
    pub watched: usize,
    pub query_rate: f64,
    pub query_batch: usize,
    pub online_ttl_s: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Ramp {
    pub users: usize,
    pub seconds: f64,
    /// Online keys written per second while every user came online at once.
    pub updates_per_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Steady {
    pub wall_s: f64,
    /// Writes to the bucket's stream (puts, deletes, last seen) during the window.
    pub kv_writes: u64,
    pub kv_writes_per_s: f64,
    /// KV writes per online user per minute.
    pub kv_writes_per_user_per_min: f64,
    /// Reports the simulated gateways published (events and heartbeat parts).
    pub reports: u64,
    /// Churn cycles (a user going and coming back).
    pub churn_cycles: u64,
    /// Push messages the gateways got, and the user states they carried.
    pub pushes: u64,
    pub pushed_states: u64,
    pub query_latency: Latency,
    pub query_failures: u64,
    pub usage: Vec<Usage>,
    /// Presence CPU per online user, microseconds per second (= millionths of a core).
    pub presence_us_per_user_s: f64,
    pub nats_us_per_user_s: f64,
    /// Cores used by presence and by nats-server per 100,000 online users.
    pub presence_cores_per_100k: f64,
    pub nats_cores_per_100k: f64,
    /// Presence RSS growth from the empty service to all users online, bytes per user.
    pub presence_bytes_per_user: f64,
    /// The bucket's stored bytes per online user at the end.
    pub bucket_bytes_per_user: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PresenceResult {
    pub spec: PresenceSpec,
    pub ramp: Ramp,
    pub steady: Steady,
}

impl PresenceResult {
    pub fn summary(&self) -> String {
        let (s, r) = (&self.steady, &self.ramp);
        let mut out = format!(
            "presence: {} users on {} simulated gateways, heartbeat {} s, churn {}/s, {} \
             watched, TTL {} s\n  ramp: {} users online in {:.2} s = {:.0} updates/s\n  \
             steady {:.0} s: {} KV writes = {:.0}/s = {:.2} per online user per minute; \
             {} reports, {} churn cycles\n  pushes: {} messages carrying {} states\n  \
             queries ({} users each): {}  failures {}\n  \
             presence CPU {:.2} µs per online user per second ({:.3} cores per 100k users); \
             nats-server {:.2} µs ({:.3} cores per 100k)\n  \
             presence memory {:.0} bytes per online user; bucket {:.0} bytes per online user\n",
            self.spec.users,
            self.spec.gateways,
            self.spec.heartbeat_s,
            self.spec.churn_per_s,
            self.spec.watched,
            self.spec.online_ttl_s,
            r.users,
            r.seconds,
            r.updates_per_s,
            s.wall_s,
            s.kv_writes,
            s.kv_writes_per_s,
            s.kv_writes_per_user_per_min,
            s.reports,
            s.churn_cycles,
            s.pushes,
            s.pushed_states,
            self.spec.query_batch,
            s.query_latency.line(),
            s.query_failures,
            s.presence_us_per_user_s,
            s.presence_cores_per_100k,
            s.nats_us_per_user_s,
            s.nats_cores_per_100k,
            s.presence_bytes_per_user,
            s.bucket_bytes_per_user,
        );
        out.push_str(&crate::report::usage_table(&s.usage));
        out
    }
}

fn user(g: usize, i: usize) -> String {
    format!("u{g}x{i}")
}

/// Counters shared by the simulated gateways.
#[derive(Default)]
struct Counters {
    reports: AtomicU64,
    churn: AtomicU64,
    pushes: AtomicU64,
    states: AtomicU64,
}

async fn publish(client: &async_nats::Client, gw: &GatewayId, r: &PresenceReport, c: &Counters) {
    let payload = serde_json::to_vec(r).expect("reports encode");
    if client
        .publish(subjects::presence_report(gw), payload.into())
        .await
        .is_ok()
    {
        c.reports.fetch_add(1, Ordering::Relaxed);
    }
}

/// Reports `users` online and `watch` watched, in parts of at most [`PRESENCE_REPORT_MAX`]
/// users per list.
async fn in_parts(
    client: &async_nats::Client,
    gw: &GatewayId,
    users: &[String],
    watch: &[String],
    heartbeat: bool,
    c: &Counters,
) {
    let parts = users.len().max(watch.len()).div_ceil(PRESENCE_REPORT_MAX);
    for i in 0..parts {
        let slice = |v: &[String]| {
            let start = (i * PRESENCE_REPORT_MAX).min(v.len());
            v[start..((i + 1) * PRESENCE_REPORT_MAX).min(v.len())].to_vec()
        };
        let r = PresenceReport {
            ts: chat_protocol::now_ms(),
            online: slice(users),
            watch: slice(watch),
            heartbeat,
            ..PresenceReport::default()
        };
        publish(client, gw, &r, c).await;
    }
}

/// One simulated gateway during the steady window.
async fn gateway(
    client: async_nats::Client,
    g: usize,
    spec: PresenceSpec,
    watch: Vec<String>,
    counters: Arc<Counters>,
    stop: CancellationToken,
) {
    let gw = GatewayId::parse(&format!("bench-gw-{g}")).expect("valid id");
    let per_gw = spec.users / spec.gateways;
    let mut rng = StdRng::seed_from_u64(g as u64);
    let mut away: VecDeque<usize> = VecDeque::new();
    let churn_per_tick = spec.churn_per_s / spec.gateways as f64;
    let mut churn_debt = 0.0;
    // Heartbeats staggered over the interval, like independent gateways.
    let heartbeat = Duration::from_secs_f64(spec.heartbeat_s);
    let offset = heartbeat.mul_f64(g as f64 / spec.gateways as f64);
    let mut next_beat = Instant::now() + offset;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep_until(next_beat) => {
                next_beat += heartbeat;
                let online: Vec<String> = (0..per_gw)
                    .filter(|i| !away.contains(i))
                    .map(|i| user(g, i))
                    .collect();
                in_parts(&client, &gw, &online, &watch, true, &counters).await;
            }
            _ = tick.tick() => {
                // Last second's leavers come back; new ones leave.
                let back: Vec<String> = away.drain(..).map(|i| user(g, i)).collect();
                churn_debt += churn_per_tick;
                let n = churn_debt.floor() as usize;
                churn_debt -= n as f64;
                let mut gone = Vec::new();
                while away.len() < n.min(per_gw) {
                    let i = rng.random_range(0..per_gw);
                    if !away.contains(&i) {
                        away.push_back(i);
                        gone.push(user(g, i));
                    }
                }
                counters.churn.fetch_add(gone.len() as u64, Ordering::Relaxed);
                if !back.is_empty() || !gone.is_empty() {
                    let r = PresenceReport {
                        ts: chat_protocol::now_ms(),
                        online: back,
                        offline: gone,
                        ..PresenceReport::default()
                    };
                    publish(&client, &gw, &r, &counters).await;
                }
            }
        }
    }
}

/// Plays `chat.api.contacts`: everyone is everyone's contact.
async fn play_contacts(client: async_nats::Client, stop: CancellationToken) -> Result<()> {
    let mut sub = client.subscribe(subjects::CONTACTS_API).await?;
    tokio::spawn(async move {
        loop {
            let msg = tokio::select! {
                m = sub.next() => m,
                _ = stop.cancelled() => return,
            };
            let Some(msg) = msg else { return };
            let Some(reply) = msg.reply else { continue };
            let Ok(req) = serde_json::from_slice::<ContactsRequest>(&msg.payload) else {
                continue;
            };
            let answer = ContactsReply::Contacts { users: req.users };
            let payload = serde_json::to_vec(&answer).expect("reply encodes");
            let _ = client.publish(reply, payload.into()).await;
        }
    });
    Ok(())
}

async fn stream_state(js: &async_nats::jetstream::Context) -> Result<(u64, u64, u64)> {
    let mut stream = js.get_stream(subjects::STREAM_PRESENCE).await?;
    let info = stream.info().await?;
    Ok((
        info.state.messages,
        info.state.last_sequence,
        info.state.bytes,
    ))
}

pub async fn run(sys: &System, spec: PresenceSpec) -> Result<PresenceResult> {
    if spec.gateways == 0 || spec.users < spec.gateways {
        bail!("--gateways must be at least 1 and at most --users");
    }
    let url = sys.nats_url();
    let bin = chat_e2e::cluster::service_bin("presence");
    let mut cmd = std::process::Command::new(&bin);
    cmd.env("CHAT_PRESENCE_NATS_URL", &url)
        .env("CHAT_PRESENCE_ADMIN_LISTEN", "")
        .env("CHAT_PRESENCE_INSTANCE_ID", "bench")
        .env(
            "CHAT_PRESENCE_ONLINE_TTL_MS",
            (spec.online_ttl_s * 1000).to_string(),
        )
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null());
    let mut child = ChildProcess::spawn(&mut cmd).context("spawn presence")?;
    let client = async_nats::connect(&url).await?;
    let js = async_nats::jetstream::new(client.clone());
    let stop = CancellationToken::new();
    play_contacts(client.clone(), stop.clone()).await?;
    // Ready once it answers a query.
    let probe = serde_json::to_vec(&PresenceRequest {
        user: "probe".into(),
        users: vec![],
    })?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while client
        .request(subjects::PRESENCE_API, probe.clone().into())
        .await
        .is_err()
    {
        if Instant::now() > deadline {
            bail!("presence did not answer within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let procs = vec![
        Proc {
            name: "bench".into(),
            pid: std::process::id(),
        },
        Proc {
            name: "nats-server".into(),
            pid: sys.cluster.nats.pid(),
        },
        Proc {
            name: "presence".into(),
            pid: child.pid(),
        },
    ];
    let empty = Snapshot::take(&procs);
    let counters = Arc::new(Counters::default());

    // 1. Ramp: everyone comes online at once; each gateway also starts watching.
    let per_gw = spec.users / spec.gateways;
    let users = per_gw * spec.gateways;
    let mut rng = StdRng::seed_from_u64(7);
    let watches: Vec<Vec<String>> = (0..spec.gateways)
        .map(|g| {
            (0..spec.watched / spec.gateways)
                .map(|_| {
                    let other =
                        (g + 1 + rng.random_range(0..spec.gateways.max(2) - 1)) % spec.gateways;
                    user(other, rng.random_range(0..per_gw))
                })
                .collect()
        })
        .collect();
    let mut push_subs = Vec::new();
    for g in 0..spec.gateways {
        let gw = GatewayId::parse(&format!("bench-gw-{g}"))?;
        push_subs.push(client.subscribe(subjects::presence_push(&gw)).await?);
    }
    for sub in push_subs {
        let (c, stop) = (counters.clone(), stop.clone());
        tokio::spawn(async move {
            let mut sub = sub;
            loop {
                let msg = tokio::select! {
                    m = sub.next() => m,
                    _ = stop.cancelled() => return,
                };
                let Some(msg) = msg else { return };
                if let Ok(p) = serde_json::from_slice::<PresencePush>(&msg.payload) {
                    c.pushes.fetch_add(1, Ordering::Relaxed);
                    c.states.fetch_add(p.users.len() as u64, Ordering::Relaxed);
                }
            }
        });
    }
    client.flush().await?;
    let started = Instant::now();
    for (g, watch) in watches.iter().enumerate() {
        let gw = GatewayId::parse(&format!("bench-gw-{g}"))?;
        let all: Vec<String> = (0..per_gw).map(|i| user(g, i)).collect();
        in_parts(&client, &gw, &all, watch, false, &counters).await;
    }
    client.flush().await?;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let (messages, _, _) = stream_state(&js).await?;
        if messages as usize >= users {
            break;
        }
        if Instant::now() > deadline {
            bail!("only {messages} of {users} users online after 300 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ramp_s = started.elapsed().as_secs_f64();
    let ramp = Ramp {
        users,
        seconds: ramp_s,
        updates_per_s: users as f64 / ramp_s,
    };
    println!(
        "ramp: {users} users online in {ramp_s:.2} s ({:.0} updates/s)",
        ramp.updates_per_s
    );
    // Let the ramp's writes settle before measuring.
    tokio::time::sleep(Duration::from_secs(2)).await;

    // 2. Steady state.
    let (_, seq_before, _) = stream_state(&js).await?;
    let reports_before = counters.reports.load(Ordering::Relaxed);
    let pushes_before = counters.pushes.load(Ordering::Relaxed);
    let states_before = counters.states.load(Ordering::Relaxed);
    let before = Snapshot::take(&procs);
    let t0 = Instant::now();
    let window = stop.child_token();
    let mut tasks = Vec::new();
    for (g, watch) in watches.into_iter().enumerate() {
        let gw_client = async_nats::connect(&url).await?;
        tasks.push(tokio::spawn(gateway(
            gw_client,
            g,
            spec,
            watch,
            counters.clone(),
            window.clone(),
        )));
    }
    let queries = {
        let (client, stop) = (client.clone(), window.clone());
        tokio::spawn(async move {
            let mut hist = stats::histogram();
            let mut failures = 0u64;
            let mut rng = StdRng::seed_from_u64(11);
            if spec.query_rate <= 0.0 {
                return (hist, failures);
            }
            let mut every = tokio::time::interval(Duration::from_secs_f64(1.0 / spec.query_rate));
            while stop.run_until_cancelled(every.tick()).await.is_some() {
                let users: Vec<String> = (0..spec.query_batch)
                    .map(|_| {
                        user(
                            rng.random_range(0..spec.gateways),
                            rng.random_range(0..per_gw),
                        )
                    })
                    .collect();
                let req = PresenceRequest {
                    user: "asker".into(),
                    users,
                };
                let payload = serde_json::to_vec(&req).expect("encodes");
                let at = std::time::Instant::now();
                match client
                    .request(subjects::PRESENCE_API, payload.into())
                    .await
                    .ok()
                    .and_then(|m| serde_json::from_slice::<PresenceReply>(&m.payload).ok())
                {
                    Some(PresenceReply::Presence { .. }) => stats::record(&mut hist, at.elapsed()),
                    _ => failures += 1,
                }
            }
            (hist, failures)
        })
    };
    tokio::time::sleep(Duration::from_secs_f64(spec.duration_s)).await;
    window.cancel();
    for t in tasks {
        let _ = t.await;
    }
    let (hist, query_failures) = queries.await?;
    let after = Snapshot::take(&procs);
    let wall_s = t0.elapsed().as_secs_f64();
    let (_, seq_after, bytes) = stream_state(&js).await?;
    let usage = procstat::usage(&before, &after, 0);
    let cpu = |name: &str| {
        usage
            .iter()
            .find(|u| u.name == name)
            .map_or(0.0, |u| u.cpu_s)
    };
    let per_user_s = |cpu_s: f64| cpu_s * 1e6 / (users as f64 * wall_s);
    let kv_writes = seq_after - seq_before;
    let rss_growth_kib = after
        .rss_kib("presence")
        .saturating_sub(empty.rss_kib("presence"));
    let steady = Steady {
        wall_s,
        kv_writes,
        kv_writes_per_s: kv_writes as f64 / wall_s,
        kv_writes_per_user_per_min: kv_writes as f64 / users as f64 / (wall_s / 60.0),
        reports: counters.reports.load(Ordering::Relaxed) - reports_before,
        churn_cycles: counters.churn.load(Ordering::Relaxed),
        pushes: counters.pushes.load(Ordering::Relaxed) - pushes_before,
        pushed_states: counters.states.load(Ordering::Relaxed) - states_before,
        query_latency: Latency::of(&hist),
        query_failures,
        presence_us_per_user_s: per_user_s(cpu("presence")),
        nats_us_per_user_s: per_user_s(cpu("nats-server")),
        presence_cores_per_100k: cpu("presence") / wall_s * 100_000.0 / users as f64,
        nats_cores_per_100k: cpu("nats-server") / wall_s * 100_000.0 / users as f64,
        presence_bytes_per_user: rss_growth_kib as f64 * 1024.0 / users as f64,
        bucket_bytes_per_user: bytes as f64 / users as f64,
        usage,
    };
    stop.cancel();
    let _ = child.sigterm();
    let _ = child.wait_timeout(Duration::from_secs(10));
    Ok(PresenceResult { spec, ramp, steady })
}
