//! End-to-end test support for the chat backend.
//!
//! `tests/e2e.rs` runs the services in-process against a real nats-server. `tests/faults.rs`
//! is the fault-injection suite: the **real service binaries** as child processes, simulated
//! client devices over real WebSockets, and faults (SIGKILL, SIGSTOP, a nats-server restart)
//! while traffic runs. Its parts live here:
//!
//! - [`cluster`]: nats-server plus gateways, sequencers and fan-out workers as processes,
//!   configured by environment variables, with signals and logs;
//! - [`client`]: a simulated device that behaves like a real app (`docs/protocol.md`): pending
//!   sends and retries, dedupe by seq, gap filling with `history`, `sync` on reconnect,
//!   receipts, reconnecting to the other gateway;
//! - [`sim`]: the population (users, devices, conversations, groups), group operations and the
//!   waits for convergence;
//! - [`audit`]: reading `CHAT_MSGS` with headers (who stamped what, and when);
//! - [`check`]: the checker over both sequencers' stores, the stream and every device;
//! - [`harness`]: one scenario from start to summary line.

pub mod audit;
pub mod check;
pub mod client;
pub mod cluster;
pub mod harness;
pub mod sim;
