//! Graceful drain with real processes (the fault suite's cluster: nats-server and the service
//! binaries as child processes). Users in one-to-one conversations send steadily while a
//! sequencer or a fan-out worker gets SIGTERM; then:
//! - the drained process exited by itself, successfully, without overrunning a drain step;
//! - every message a client got `sent` for is stamped exactly once (dense seqs, each client id
//!   once) and nothing is left in `CHAT_IN` or unacked on any consumer;
//! - every device got every message of its conversation exactly once: nothing lost, nothing
//!   pushed twice (a fan-out worker that left deliveries unacked would have them pushed again
//!   by the next owner).
//!
//! Needs the service binaries: `cargo build --workspace --bins` (or `cargo test --workspace`).

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use chat_e2e::{
    audit,
    cluster::{Cluster, ClusterConfig, SECRET},
};
use chat_protocol::{
    auth::mint_dev_token,
    frames::{ClientFrame, ErrorCode, ServerFrame},
    ids::{ConvId, UserId},
    subjects,
};
use futures::{SinkExt, StreamExt, TryStreamExt};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message as WsMessage;

/// One scenario at a time (each runs a whole cluster; CI boxes have two cores).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Conversations (two users each). With 16 partitions shared by two processes, 12
/// conversations land on both processes' partitions but for a chance of 1 in 4000.
const PAIRS: usize = 12;
/// Each user sends one message, waits for its `sent`, and sends the next this much later.
const SEND_EVERY: Duration = Duration::from_millis(150);
/// How long a drained process may take to exit (its steps are bounded by a 5 s grace each).
const EXIT_WITHIN: Duration = Duration::from_secs(20);
/// How long everything may take to arrive after the senders stopped (a delivery that was on
/// the wire when a worker stopped pulling comes back after `ack_wait`, 30 s).
const SETTLE: Duration = Duration::from_secs(90);

/// What one device saw.
#[derive(Default)]
struct Log {
    /// Client ids answered `sent`, in order.
    acked: Vec<String>,
    /// Every message frame: (conv, seq) -> how many times.
    got: HashMap<(String, u64), u32>,
    /// A send is waiting for its `sent`.
    in_flight: bool,
}

struct Device {
    user: String,
    conv: String,
    log: Arc<Mutex<Log>>,
    task: tokio::task::JoinHandle<()>,
}

/// Connects `user` to `url` and runs its device: sends to `conv` while `sending` (one message
/// in flight, resent with the same id on `unavailable` or after 5 s without an answer) and
/// records everything it gets, until `quit`.
async fn device(
    url: &str,
    user: &str,
    conv: &str,
    sending: Arc<AtomicBool>,
    quit: Arc<AtomicBool>,
) -> Device {
    let token = mint_dev_token(SECRET.as_bytes(), &UserId::parse(user).unwrap(), 3600);
    let url = format!("{url}?token={token}&device=d1");
    let (ws, _) = tokio::time::timeout(
        Duration::from_secs(15),
        tokio_tungstenite::connect_async(url),
    )
    .await
    .expect("connect in time")
    .expect("upgrade accepted");
    let (mut tx, mut rx) = ws.split();
    let log = Arc::new(Mutex::new(Log::default()));
    let task = {
        let (log, user, conv) = (log.clone(), user.to_owned(), conv.to_owned());
        tokio::spawn(async move {
            let mut next = 0u64;
            // (id, when it was last sent)
            let mut pending: Option<(String, Instant)> = None;
            let mut tick = tokio::time::interval(SEND_EVERY);
            loop {
                if quit.load(Ordering::Relaxed) && pending.is_none() {
                    return;
                }
                tokio::select! {
                    _ = tick.tick() => {
                        let resend = pending
                            .as_ref()
                            .filter(|(_, at)| at.elapsed() > Duration::from_secs(5))
                            .map(|(id, _)| id.clone());
                        let id = match (&pending, resend) {
                            (_, Some(id)) => id,
                            (None, None) if sending.load(Ordering::Relaxed) => {
                                next += 1;
                                format!("{user}-{next}")
                            }
                            _ => continue,
                        };
                        let frame = ClientFrame::Send {
                            conv: conv.clone(),
                            id: id.clone(),
                            body: format!("message {id}"),
                            media: None,
                        };
                        let text = serde_json::to_string(&frame).unwrap();
                        if tx.send(WsMessage::text(text)).await.is_err() {
                            panic!("{user}: the gateway closed the connection");
                        }
                        pending = Some((id, Instant::now()));
                        log.lock().unwrap().in_flight = true;
                    }
                    msg = rx.next() => {
                        let text = match msg {
                            Some(Ok(WsMessage::Text(text))) => text,
                            Some(Ok(_)) => continue,
                            other => panic!("{user}: connection ended: {other:?}"),
                        };
                        match serde_json::from_str::<ServerFrame>(&text) {
                            Ok(ServerFrame::Sent { id, .. })
                                if pending.as_ref().is_some_and(|(p, _)| *p == id) =>
                            {
                                pending = None;
                                let mut log = log.lock().unwrap();
                                log.acked.push(id);
                                log.in_flight = false;
                            }
                            Ok(ServerFrame::Message(m)) => {
                                *log.lock().unwrap().got.entry((m.conv, m.seq)).or_default() += 1;
                            }
                            Ok(ServerFrame::Error(e)) if e.code == ErrorCode::Unavailable => {
                                // Resent with the same id at the next tick.
                                if let Some(p) = pending.as_mut() {
                                    p.1 = Instant::now() - Duration::from_secs(10);
                                }
                            }
                            Ok(ServerFrame::Error(e)) => panic!("{user}: unexpected error {e:?}"),
                            _ => {}
                        }
                    }
                }
            }
        })
    };
    Device {
        user: user.to_owned(),
        conv: conv.to_owned(),
        log,
        task,
    }
}

struct Traffic {
    devices: Vec<Device>,
    sending: Arc<AtomicBool>,
    quit: Arc<AtomicBool>,
}

impl Traffic {
    async fn start(gateway_url: &str) -> Self {
        let sending = Arc::new(AtomicBool::new(true));
        let quit = Arc::new(AtomicBool::new(false));
        let mut devices = Vec::new();
        for i in 0..PAIRS {
            let (a, b) = (format!("u{i:02}a"), format!("u{i:02}b"));
            let conv = ConvId::direct(&UserId::parse(&a).unwrap(), &UserId::parse(&b).unwrap())
                .unwrap()
                .to_string();
            for user in [&a, &b] {
                devices.push(device(gateway_url, user, &conv, sending.clone(), quit.clone()).await);
            }
        }
        Self {
            devices,
            sending,
            quit,
        }
    }

    /// Stops sending new messages and waits until every pending one was answered `sent`.
    async fn stop_sending(&self) {
        self.sending.store(false, Ordering::Relaxed);
        let deadline = Instant::now() + SETTLE;
        while self.devices.iter().any(|d| d.log.lock().unwrap().in_flight) {
            assert!(Instant::now() < deadline, "sends never answered `sent`");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Waits until `CHAT_MSGS` holds every acked client id, then checks the stream: per
/// conversation dense seqs from 1, each client id once, nothing stamped that was never sent.
/// Returns the newest seq of each conversation.
async fn check_stamped(cluster: &Cluster, traffic: &Traffic) -> BTreeMap<String, u64> {
    let js = cluster.js();
    let acked: BTreeMap<String, Vec<String>> = {
        let mut by_conv: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for d in &traffic.devices {
            by_conv
                .entry(d.conv.clone())
                .or_default()
                .extend(d.log.lock().unwrap().acked.iter().cloned());
        }
        by_conv
    };
    let total: usize = acked.values().map(Vec::len).sum();
    assert!(
        total > PAIRS * 20,
        "too little traffic: {total} messages acked"
    );
    let deadline = Instant::now() + SETTLE;
    loop {
        let entries = audit::read_all(&js).await.expect("read CHAT_MSGS");
        let mut ids: BTreeMap<String, Vec<(u64, String)>> = BTreeMap::new();
        for e in &entries {
            if let Some(m) = e.message() {
                ids.entry(m.conv.clone())
                    .or_default()
                    .push((m.seq, m.id.clone()));
            }
        }
        let missing: Vec<&String> = acked
            .iter()
            .flat_map(|(conv, want)| {
                let have = ids.get(conv);
                want.iter()
                    .filter(move |id| !have.is_some_and(|h| h.iter().any(|(_, i)| i == *id)))
            })
            .collect();
        if missing.is_empty() {
            let mut newest = BTreeMap::new();
            for (conv, mut stamped) in ids {
                stamped.sort();
                let seqs: Vec<u64> = stamped.iter().map(|(s, _)| *s).collect();
                let dense: Vec<u64> = (1..=seqs.len() as u64).collect();
                assert_eq!(seqs, dense, "{conv}: seqs are not 1..n, each once");
                let mut unique: Vec<&String> = stamped.iter().map(|(_, i)| i).collect();
                unique.sort();
                unique.dedup();
                assert_eq!(
                    unique.len(),
                    stamped.len(),
                    "{conv}: a client id was stamped twice"
                );
                let sent = &acked[&conv];
                assert_eq!(
                    stamped.len(),
                    sent.len(),
                    "{conv}: stamped {} messages, {} were answered sent",
                    stamped.len(),
                    sent.len()
                );
                newest.insert(conv, seqs.len() as u64);
            }
            return newest;
        }
        assert!(
            Instant::now() < deadline,
            "{} acked message(s) never stamped, e.g. {:?}\n{}",
            missing.len(),
            &missing[..missing.len().min(5)],
            cluster.log_tails()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Waits until every device has every message of its conversation, then checks that none came
/// twice.
async fn check_delivered(cluster: &Cluster, traffic: &Traffic, newest: &BTreeMap<String, u64>) {
    let deadline = Instant::now() + SETTLE;
    loop {
        let mut missing = Vec::new();
        for d in &traffic.devices {
            let log = d.log.lock().unwrap();
            let n = newest.get(&d.conv).copied().unwrap_or(0);
            for seq in 1..=n {
                if !log.got.contains_key(&(d.conv.clone(), seq)) {
                    missing.push(format!("{} {}#{seq}", d.user, d.conv));
                }
            }
        }
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} message(s) never delivered, e.g. {:?}\n{}",
            missing.len(),
            &missing[..missing.len().min(5)],
            cluster.log_tails()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let twice: Vec<String> = traffic
        .devices
        .iter()
        .flat_map(|d| {
            let log = d.log.lock().unwrap();
            log.got
                .iter()
                .filter(|(_, n)| **n > 1)
                .map(|((c, s), n)| format!("{} {c}#{s} x{n}", d.user))
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(twice.is_empty(), "pushed more than once: {twice:?}");
}

/// Nothing left unstamped in `CHAT_IN`, and no consumer holds an unacked delivery.
async fn check_nothing_left(cluster: &Cluster) {
    let js = cluster.js();
    let deadline = Instant::now() + SETTLE;
    loop {
        let mut left = Vec::new();
        for stream in [subjects::STREAM_INBOUND, subjects::STREAM_STAMPED] {
            let mut s = js.get_stream(stream).await.expect("stream");
            if stream == subjects::STREAM_INBOUND {
                let n = s.info().await.expect("stream info").state.messages;
                if n > 0 {
                    left.push(format!("{stream}: {n} message(s)"));
                }
            }
            // One listing of every consumer's state: the audit's ordered consumers are
            // ephemeral and can be gone between a list of names and a lookup by name.
            let infos: Vec<_> = s.consumers().try_collect().await.expect("list consumers");
            for info in infos {
                if info.num_ack_pending > 0 || info.num_pending > 0 {
                    left.push(format!(
                        "{stream}/{}: {} pending, {} unacked",
                        info.name, info.num_pending, info.num_ack_pending
                    ));
                }
            }
        }
        if left.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "left behind: {left:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// SIGTERMs `service`, waits for its exit and checks it drained within every step's grace.
fn drain(service: &mut chat_e2e::cluster::Service) {
    let started = std::time::Instant::now();
    service.sigterm();
    let exit = tokio::task::block_in_place(|| service.wait_exit(EXIT_WITHIN));
    assert!(exit.is_ok(), "{}", exit.unwrap_err());
    let log = service.log_tail(64 * 1024);
    assert!(
        !log.contains("overran its grace period"),
        "{} overran a drain step:\n{log}",
        service.name()
    );
    eprintln!(
        "drain: {} exited {:?} after SIGTERM",
        service.name(),
        started.elapsed()
    );
}

/// Waits until a stamp by `instance` is in `CHAT_MSGS` (it owns some of the traffic).
async fn wait_stamp_by(cluster: &Cluster, instance: &str) {
    let js = cluster.js();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let entries = audit::read_all(&js).await.expect("read CHAT_MSGS");
        if entries
            .iter()
            .any(|e| e.stamper.as_deref() == Some(instance))
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{instance} stamped nothing\n{}",
            cluster.log_tails()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// How many times the log of `service` has `needle` (the services run with `RUST_LOG=info`).
fn log_count(service: &chat_e2e::cluster::Service, needle: &str) -> usize {
    service.log_tail(1 << 22).matches(needle).count()
}

/// Waits until the log of `service` has `needle` more than `seen` times.
async fn wait_log(
    cluster: &Cluster,
    service: &chat_e2e::cluster::Service,
    needle: &str,
    seen: usize,
) {
    let deadline = Instant::now() + SETTLE;
    while log_count(service, needle) <= seen {
        assert!(
            Instant::now() < deadline,
            "{} never logged {needle:?} again\n{}",
            service.name(),
            cluster.log_tails()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until every device got `sent` for `more` further messages: every conversation flows
/// (before a drain: each process has work in flight; after it: the moved partitions were
/// taken over).
async fn wait_every_conversation_flows(cluster: &Cluster, traffic: &Traffic, more: usize) {
    let base: Vec<usize> = traffic
        .devices
        .iter()
        .map(|d| d.log.lock().unwrap().acked.len())
        .collect();
    let deadline = Instant::now() + SETTLE;
    loop {
        let stuck: Vec<&str> = traffic
            .devices
            .iter()
            .zip(&base)
            .filter(|(d, n)| d.log.lock().unwrap().acked.len() < *n + more)
            .map(|(d, _)| d.user.as_str())
            .collect();
        if stuck.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no more sends answered for {stuck:?}\n{}",
            cluster.log_tails()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn finish(cluster: &mut Cluster, traffic: Traffic) {
    traffic.stop_sending().await;
    let newest = check_stamped(cluster, &traffic).await;
    check_delivered(cluster, &traffic, &newest).await;
    check_nothing_left(cluster).await;
    traffic.quit.store(true, Ordering::Relaxed);
    for d in traffic.devices {
        d.task.abort();
    }
    let problems = tokio::task::block_in_place(|| cluster.stop_services(EXIT_WITHIN));
    assert!(problems.is_empty(), "{problems:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_drained_sequencer_loses_and_duplicates_nothing() {
    let _serial = SERIAL.lock().await;
    let mut cluster = Cluster::new(ClusterConfig {
        gateways: 1,
        sequencers: 2,
        fanouts: 1,
        sequencer_balance: true,
    })
    .await;
    for s in &mut cluster.sequencers {
        s.set_env("RUST_LOG", "info");
        s.spawn();
    }
    cluster.fanouts[0].spawn();
    cluster.spawn_gateways().await;
    let traffic = Traffic::start(&cluster.gateway_urls[0]).await;
    // Both sequencers stamp their share of the conversations, with stamps in flight.
    wait_stamp_by(&cluster, "seq-a").await;
    wait_stamp_by(&cluster, "seq-b").await;
    wait_every_conversation_flows(&cluster, &traffic, 3).await;
    let pulled = log_count(&cluster.sequencers[1], "pulling partition");
    drain(&mut cluster.sequencers[0]);
    // seq-b takes seq-a's partitions over, and their conversations flow again.
    wait_log(
        &cluster,
        &cluster.sequencers[1],
        "pulling partition",
        pulled,
    )
    .await;
    wait_every_conversation_flows(&cluster, &traffic, 3).await;
    finish(&mut cluster, traffic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_drained_fanout_worker_loses_and_duplicates_nothing() {
    let _serial = SERIAL.lock().await;
    let mut cluster = Cluster::new(ClusterConfig {
        gateways: 1,
        sequencers: 1,
        fanouts: 2,
        sequencer_balance: true,
    })
    .await;
    cluster.sequencers[0].spawn();
    for f in &mut cluster.fanouts {
        f.set_env("RUST_LOG", "info");
        f.spawn();
    }
    cluster.spawn_gateways().await;
    let traffic = Traffic::start(&cluster.gateway_urls[0]).await;
    // Both workers pull their share (each listens `balance_expire_ms` before claiming it),
    // and pushes are in flight when the drain starts.
    wait_log(&cluster, &cluster.fanouts[0], "balance: pulling", 0).await;
    wait_log(&cluster, &cluster.fanouts[1], "balance: pulling", 0).await;
    wait_every_conversation_flows(&cluster, &traffic, 3).await;
    let pulled = log_count(&cluster.fanouts[1], "balance: pulling");
    drain(&mut cluster.fanouts[0]);
    // fanout-b takes fanout-a's consumers over (balance_expire_ms plus priority_timeout).
    wait_log(&cluster, &cluster.fanouts[1], "balance: pulling", pulled).await;
    wait_every_conversation_flows(&cluster, &traffic, 3).await;
    finish(&mut cluster, traffic).await;
}
