//! Build script: decides whether the Cassandra tests run.
//!
//! `store/tests/cassandra.rs` needs a real Cassandra or ScyllaDB node, named by
//! `CHAT_TEST_CASSANDRA=host:port[,host:port...]`. When the variable is set at build time this
//! sets `cfg(cassandra_test_server)`; without it every Cassandra test is compiled
//! `#[ignore]`d, so the test harness reports it as *ignored* (never as passed). Changing the
//! variable rebuilds the tests.

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=CHAT_TEST_CASSANDRA");
    println!("cargo::rustc-check-cfg=cfg(cassandra_test_server)");
    let set = std::env::var("CHAT_TEST_CASSANDRA").is_ok_and(|v| !v.trim().is_empty());
    if set {
        println!("cargo::rustc-cfg=cassandra_test_server");
    }
}
