//! Fault injection with real processes: nats-server, two gateways, two sequencers (the first
//! owns every partition, the second is a hot standby) and the fan-out worker(s) run as child
//! processes; ten simulated users on fourteen devices talk in fifteen conversations while a
//! process is killed, frozen or restarted. Afterwards the checker reads both sequencers' stores
//! and what every device saw (see `chat_e2e::check`), and each scenario prints one
//! `fault-summary ...` line (also appended to `target/fault-summaries.txt`).
//!
//! Needs the service binaries: `cargo build --workspace --bins` (or `cargo test --workspace`).
//! The scenarios run one at a time (each starts a whole cluster; CI boxes have two cores).
//! Progress goes to stderr (`--nocapture` shows it); `FAULTS_KEEP_DIR=1` keeps each scenario's
//! temp dir (service logs, both stores) for a look afterwards.

use std::time::Duration;

use chat_e2e::{cluster::ClusterConfig, harness::Run};

/// One scenario at a time, whatever `--test-threads` says.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const CLUSTER: ClusterConfig = ClusterConfig {
    gateways: 2,
    sequencers: 2,
    fanouts: 1,
};

/// Traffic before the fault.
const BEFORE: Duration = Duration::from_secs(4);
/// Traffic after the fault (or after recovery).
const AFTER: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_gateway() {
    let _serial = SERIAL.lock().await;
    let mut run = Run::start("sigkill_gateway", CLUSTER).await;
    run.traffic(BEFORE).await;
    run.step("SIGKILL gateway-1");
    run.cluster.gateways[0].sigkill();
    // Its clients reconnect to gateway-2, resend what was pending and sync.
    run.traffic(AFTER).await;
    run.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_sequencer() {
    let _serial = SERIAL.lock().await;
    let mut run = Run::start("sigkill_sequencer", CLUSTER).await;
    run.traffic(BEFORE).await;
    let owner = run.stamping_sequencer().await;
    let survivor = 1 - owner;
    let survivor_name = run.cluster.sequencers[survivor].name().to_owned();
    let mut mark = run.stream_mark().await;
    run.step(&format!(
        "SIGKILL {} (the owner)",
        run.cluster.sequencers[owner].name()
    ));
    let killed_at = chat_protocol::now_ms();
    run.cluster.sequencers[owner].sigkill();
    run.takeover_ms = run
        .wait_first_stamp_by(
            &mut mark,
            &survivor_name,
            killed_at,
            Duration::from_secs(15),
        )
        .await;
    run.step(&format!(
        "{survivor_name} took over after {:?} ms",
        run.takeover_ms
    ));
    // Back as the standby: its store catches up from where the crash left it.
    run.cluster.sequencers[owner].spawn();
    run.traffic(AFTER).await;
    run.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigstop_sequencer() {
    let _serial = SERIAL.lock().await;
    let mut run = Run::start("sigstop_sequencer", CLUSTER).await;
    run.traffic(BEFORE).await;
    let owner = run.stamping_sequencer().await;
    let survivor = 1 - owner;
    let owner_name = run.cluster.sequencers[owner].name().to_owned();
    let survivor_name = run.cluster.sequencers[survivor].name().to_owned();
    let mut mark = run.stream_mark().await;
    run.step(&format!("SIGSTOP {owner_name} (the owner)"));
    let stopped_at = chat_protocol::now_ms();
    run.cluster.sequencers[owner].sigstop();
    run.takeover_ms = run
        .wait_first_stamp_by(
            &mut mark,
            &survivor_name,
            stopped_at,
            Duration::from_secs(15),
        )
        .await;
    run.step(&format!(
        "{survivor_name} took over after {:?} ms",
        run.takeover_ms
    ));
    // Keep the old owner frozen a little longer, with a message of its own possibly in hand.
    run.traffic(Duration::from_secs(2)).await;
    let attempts = run.watch_publishes_by(&owner_name).await;
    let resumed_at = chat_protocol::now_ms();
    run.cluster.sequencers[owner].sigcont();
    run.step(&format!(
        "SIGCONT {owner_name}: it must stamp nothing from now on"
    ));
    run.forbidden_after.push((owner_name.clone(), resumed_at));
    run.traffic(AFTER).await;
    // Publishes it attempted after waking up (with a message in hand): the checker shows that
    // none of them reached CHAT_MSGS.
    let (messages, receipts) = attempts.stop().await;
    run.step(&format!(
        "{owner_name} attempted {messages} message and {receipts} receipt publish(es) after \
         SIGCONT"
    ));
    run.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_fanout() {
    let _serial = SERIAL.lock().await;
    // Two workers: fanout-a pulls first and owns every partition, fanout-b is a hot standby.
    // Production runs several replicas, and the point is that nobody has to restart anything:
    // the pins move to the survivor after `priority_timeout` (5 s). What the dead worker had in
    // hand comes back only after `ack_wait` (30 s); until then clients recover by gap fill and
    // sync.
    let config = ClusterConfig {
        fanouts: 2,
        ..CLUSTER
    };
    let mut run = Run::start("sigkill_fanout", config).await;
    run.traffic(BEFORE).await;
    run.step("SIGKILL fanout-a (the owner)");
    run.cluster.fanouts[0].sigkill();
    run.traffic(Duration::from_secs(7)).await;
    run.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restart_nats() {
    let _serial = SERIAL.lock().await;
    let mut run = Run::start("restart_nats", CLUSTER).await;
    run.traffic(BEFORE).await;
    run.step("SIGKILL nats-server");
    tokio::task::block_in_place(|| run.cluster.nats.kill());
    tokio::time::sleep(Duration::from_secs(1)).await;
    tokio::task::block_in_place(|| run.cluster.nats.restart());
    run.step("nats-server restarted on the same port and store");
    run.traffic(Duration::from_secs(6)).await;
    run.finish().await;
}
