//! Balancing against a real nats-server: every consumer has exactly one owner among the live
//! processes, and a process that stops has its consumers taken over.

use std::time::Duration;

use chat_common::balance::{Balance, BalanceSettings};
use chat_testkit::NatsServer;
use tokio_util::sync::CancellationToken;

fn settings(instance: &str) -> BalanceSettings {
    BalanceSettings {
        subject: "chat.ctl.test.live".into(),
        instance: instance.into(),
        heartbeat: Duration::from_millis(100),
        expire: Duration::from_millis(400),
    }
}

fn consumers() -> Vec<String> {
    (0..8).map(|p| format!("fanout-p{p}")).collect()
}

/// The owners of every consumer, once all processes agree (or after a deadline).
async fn owners(processes: &[(&str, &Balance)]) -> Vec<Vec<String>> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let owners: Vec<Vec<String>> = consumers()
            .iter()
            .map(|c| {
                processes
                    .iter()
                    .filter(|(_, b)| b.owns(c))
                    .map(|(name, _)| (*name).to_owned())
                    .collect()
            })
            .collect();
        if owners.iter().all(|o| o.len() == 1) || tokio::time::Instant::now() > deadline {
            return owners;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_consumer_has_one_owner_and_a_stopped_processs_share_moves() {
    let nats = NatsServer::start();
    let (stop_a, stop_b, stop_c) = (
        CancellationToken::new(),
        CancellationToken::new(),
        CancellationToken::new(),
    );
    let (a, b, c) = tokio::join!(
        Balance::start(nats.client().await, settings("a"), stop_a.clone()),
        Balance::start(nats.client().await, settings("b"), stop_b.clone()),
        Balance::start(nats.client().await, settings("c"), stop_c.clone()),
    );
    let (a, b, c) = (a.unwrap(), b.unwrap(), c.unwrap());
    let all = owners(&[("a", &a), ("b", &b), ("c", &c)]).await;
    assert!(all.iter().all(|o| o.len() == 1), "{all:?}");
    for name in ["a", "b", "c"] {
        assert!(
            all.iter().any(|o| o[0] == name),
            "{name} owns nothing: {all:?}"
        );
    }
    // c stops announcing itself: a and b split its consumers, and keep their own.
    stop_c.cancel();
    let two = owners(&[("a", &a), ("b", &b)]).await;
    assert!(two.iter().all(|o| o.len() == 1), "{two:?}");
    for (before, after) in all.iter().zip(&two) {
        if before[0] != "c" {
            assert_eq!(before, after);
        }
    }
    stop_a.cancel();
    stop_b.cancel();
}
