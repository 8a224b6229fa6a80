//! A short run of every mode of the real `bench` binary against real processes (nats-server
//! and the service binaries built next to it: `cargo build --workspace --bins`). Each checks
//! that the tool works and that its accounting is right (nothing lost, nothing twice) by
//! reading the JSON it writes, as a user of the tool would. No timing is asserted: speed is
//! what the benchmarks measure (`BENCHMARKS.md`).

use std::{path::Path, process::Command};

use serde_json::Value;

/// Runs `bench <args> --out <dir>` and returns the JSON it wrote for `mode`.
fn bench(mode: &str, args: &[&str], dir: &Path) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_bench"))
        .arg(mode)
        .args(args)
        .arg("--out")
        .arg(dir)
        .output()
        .expect("run bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench {mode} failed: {}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("reproduce: ") && stdout.contains(mode),
        "no command line in the summary:\n{stdout}"
    );
    let path = dir.join(format!("{mode}.json"));
    let json = std::fs::read_to_string(&path).expect("the results file");
    let v: Value = serde_json::from_str(&json).expect("results are JSON");
    assert_eq!(v["mode"], mode);
    assert!(v["command"].as_str().is_some_and(|c| c.contains(mode)));
    v
}

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

/// Every message offered was acked, delivered once and echoed once, in dense order.
fn assert_accounting(t: &Value, expect_offered: u64) {
    assert_eq!(n(&t["offered"]), expect_offered, "{t:#}");
    for field in ["acked", "delivered", "echoed"] {
        assert_eq!(n(&t[field]), expect_offered, "{field}: {t:#}");
    }
    for field in [
        "duplicate_acks",
        "duplicate_deliveries",
        "duplicate_echoes",
        "seq_gaps",
        "seq_repeats",
        "sockets_closed",
    ] {
        assert_eq!(n(&t[field]), 0, "{field}: {t:#}");
    }
    assert_eq!(t["drained"], true);
    assert_eq!(
        n(&t["delivery_latency"]["count"]),
        expect_offered,
        "one latency sample per delivery"
    );
    // Every process of the run is sampled, the load generator included.
    let names: Vec<&str> = t["usage"]
        .as_array()
        .expect("usage")
        .iter()
        .filter_map(|u| u["name"].as_str())
        .collect();
    for p in ["bench", "nats-server", "gateway-1", "seq-a", "fanout-a"] {
        assert!(names.contains(&p), "{p} not sampled: {names:?}");
    }
}

fn assert_baseline(b: &Value, msgs: u64) {
    assert_eq!(n(&b["jetstream"]["published"]), msgs);
    assert_eq!(n(&b["jetstream"]["consumed"]), msgs);
    assert_eq!(n(&b["core"]["received"]), msgs);
    assert!(
        b["jetstream"]["msgs_per_s"]
            .as_f64()
            .is_some_and(|r| r > 0.0)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn baseline_publishes_and_consumes_every_message() {
    let dir = tempfile::tempdir().unwrap();
    let v = bench("baseline", &["--baseline-msgs", "2000"], dir.path());
    assert_baseline(&v["result"], 2000);
}

#[tokio::test(flavor = "multi_thread")]
async fn dm_delivers_every_message_once() {
    let dir = tempfile::tempdir().unwrap();
    let v = bench(
        "dm",
        &[
            "--rate",
            "100",
            "--duration",
            "2",
            "--pairs",
            "10",
            "--baseline-msgs",
            "1000",
            // The power-loss durability mode (`max` runs the default one), over TLS with
            // client certificates (the run fails unless every service connection is TLS).
            "--sync-always",
            "--tls",
        ],
        dir.path(),
    );
    let r = &v["result"];
    assert_baseline(&r["baseline"], 1000);
    assert_accounting(&r["trial"], 200);
    assert_eq!(r["accounting_ok"], true);
    assert!(r["ratio_to_jetstream"].as_f64().is_some());
    assert_eq!(v["settings"]["pipeline"]["pairs"], 10);
    assert_eq!(v["settings"]["pipeline"]["sync_always"], true);
    assert_eq!(v["settings"]["pipeline"]["tls"], true);
}

#[tokio::test(flavor = "multi_thread")]
async fn max_runs_its_steps_and_writes_a_csv() {
    let dir = tempfile::tempdir().unwrap();
    let v = bench(
        "max",
        &[
            "--start-rate",
            "50",
            "--duration",
            "1",
            "--steps",
            "2",
            "--pairs",
            "10",
            "--baseline-msgs",
            "1000",
        ],
        dir.path(),
    );
    let s = &v["result"]["search"];
    let steps = s["steps"].as_array().expect("steps");
    assert_eq!(steps.len(), 2);
    for st in steps {
        let t = &st["trial"];
        let rate = t["spec"]["rate"].as_f64().unwrap();
        assert_accounting(t, (rate * 1.0).round() as u64);
    }
    if let Some(h) = s["half"].as_object() {
        let rate = h["spec"]["rate"].as_f64().unwrap();
        assert_accounting(&s["half"], rate.round() as u64);
    }
    let csv = std::fs::read_to_string(dir.path().join("max.csv")).expect("max.csv");
    assert!(csv.starts_with("kind,offered_rate"));
    assert!(csv.lines().count() > steps.len());
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_holds_every_connection_subscribed() {
    let dir = tempfile::tempdir().unwrap();
    let v = bench(
        "idle",
        &["--connections", "300", "--per-ip", "100", "--hold", "1"],
        dir.path(),
    );
    let r = &v["result"];
    assert_eq!(n(&r["held"]), 300, "{r:#}");
    assert_eq!(
        n(&r["probed"]),
        300,
        "every connection is subscribed: {r:#}"
    );
    assert_eq!(n(&r["dropped"]), 0);
    assert_eq!(n(&r["source_addresses"]), 3);
    assert!(r["failures"].as_object().unwrap().is_empty(), "{r:#}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_fleet_survives_a_gateway_killed_and_churns() {
    let dir = tempfile::tempdir().unwrap();
    let v = bench(
        "idle",
        &[
            "--connections",
            "300",
            "--per-ip",
            "100",
            "--hold",
            "1",
            "--gateways",
            "3",
            "--clients",
            "2",
            "--churn",
            "1",
            "--kill",
        ],
        dir.path(),
    );
    let r = &v["result"];
    assert_eq!(n(&r["held"]), 300, "{r:#}");
    assert_eq!(
        n(&r["probed"]),
        300,
        "every connection is subscribed: {r:#}"
    );
    let held: Vec<u64> = r["per_gateway"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| n(&g["held"]))
        .collect();
    assert_eq!(held, [100, 100, 100], "user i on gateway i mod 3");
    assert!(n(&r["churn"]["connects"]) > 0, "{r:#}");
    let k = &r["kill"];
    assert_eq!(n(&k["victims"]), 100);
    assert_eq!(n(&k["held_after"]), 300, "every victim came back: {k:#}");
    assert_eq!(n(&k["probed_after"]), 300, "and gets pushes again: {k:#}");
    assert_eq!(
        n(&k["by_gateway_after"][0]),
        0,
        "nobody on the dead gateway"
    );
    let closes: u64 = k["closes"].as_object().unwrap().values().map(n).sum();
    assert_eq!(closes, 100, "only the victims' connections ended: {k:#}");
}

#[tokio::test(flavor = "multi_thread")]
async fn catchup_brings_back_every_missed_message_once() {
    let dir = tempfile::tempdir().unwrap();
    let v = bench(
        "catchup",
        &["--messages", "1500", "--senders", "3"],
        dir.path(),
    );
    let r = &v["result"];
    assert_eq!(n(&r["acked"]), 1500);
    assert_eq!(n(&r["received"]), 1500, "{r:#}");
    assert_eq!(n(&r["duplicates"]), 0);
    assert_eq!(n(&r["gaps"]), 0);
    assert!(n(&r["sync_pages"]) >= 2, "1,500 messages take two pages");
}

#[tokio::test(flavor = "multi_thread")]
async fn group_delivers_every_message_to_every_member_in_order() {
    let dir = tempfile::tempdir().unwrap();
    // 8 members take the small-group path (one push each), 70 the large one (chat.grp).
    let v = bench(
        "group",
        &[
            "--members",
            "8,70",
            "--rate",
            "20",
            "--duration",
            "2",
            "--senders",
            "4",
            "--dm-pairs",
            "5",
            "--dm-rate",
            "20",
            "--drain",
            "30",
        ],
        dir.path(),
    );
    let runs = v["result"].as_array().expect("one result per group size");
    assert_eq!(runs.len(), 2);
    for (r, members) in runs.iter().zip([8u64, 70]) {
        assert_eq!(n(&r["offered"]), 40, "{r:#}");
        assert_eq!(n(&r["acked"]), 40, "{r:#}");
        assert_eq!(n(&r["expected_deliveries"]), 40 * members);
        assert_eq!(n(&r["deliveries"]), 40 * members, "{r:#}");
        assert_eq!(n(&r["members_complete"]), members);
        assert_eq!(n(&r["repeats"]) + n(&r["gaps"]), 0, "{r:#}");
        assert_eq!(n(&r["delivery_latency"]["count"]), 40 * members);
        assert_accounting(&r["dm"], 40);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn overload_loses_nothing_acked_and_a_slow_recipient_recovers_through_sync() {
    let dir = tempfile::tempdir().unwrap();
    let v = bench(
        "overload",
        &[
            "--max-rate",
            "100",
            "--reference",
            "2",
            "--overload",
            "3",
            "--after",
            "3",
            "--pairs",
            "10",
            "--slow",
            "1",
            "--stall",
            "2",
            "--stall-lead",
            "1",
            "--slow-rate",
            "50",
            "--slow-size",
            "2048",
        ],
        dir.path(),
    );
    let r = &v["result"];
    // 2 s at 50/s, 3 s at 150/s, 3 s at 50/s.
    assert_accounting(&r["trial"], 100 + 450 + 150);
    let seconds = r["trial"]["delivery_p99_ms_by_second"]
        .as_array()
        .expect("per-second p99");
    assert!(seconds.len() >= 8, "{seconds:?}");
    let slow = &r["slow"][0];
    assert_eq!(n(&slow["acked"]), 100, "{slow:#}");
    for field in ["missing_seqs", "mismatched", "acked_not_found"] {
        assert_eq!(n(&slow[field]), 0, "{field}: {slow:#}");
    }
    // Cut (with the close code or, not reading at the time, without a close frame) or, on a
    // fast machine, never behind enough to be cut: each a documented ending.
    let ended = slow["ended"].as_str().expect("ended");
    assert!(["close 4001", "eof", "not cut"].contains(&ended), "{ended}");
    assert_eq!(r["nothing_lost"], true);
    let peaks: Vec<(&str, u64)> = r["peak_rss"]
        .as_array()
        .expect("peak RSS")
        .iter()
        .map(|p| (p["name"].as_str().unwrap_or(""), n(&p["peak_kib"])))
        .collect();
    for p in ["bench", "nats-server", "gateway-1", "seq-a", "fanout-a"] {
        assert!(
            peaks.iter().any(|(name, kib)| *name == p && *kib > 0),
            "{p}: {peaks:?}"
        );
    }
}
