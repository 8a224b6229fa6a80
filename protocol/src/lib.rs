//! Wire protocol and shared contracts of the chat backend.
//!
//! - [`frames`]: WebSocket frames between clients and gateways (`docs/protocol.md`).
//! - [`ids`]: validation of every id that can become part of a NATS subject.
//! - [`subjects`]: every NATS subject, built in one place (`nats/README.md`).
//! - [`jetstream`]: stream and consumer definitions from `nats/`, and their provisioning.
//! - [`api`]: service-to-service messages over NATS.
//! - [`auth`]: access tokens.
//! - [`membership`]: group membership rules shared by the sequencer, fan-out and gateway.

pub mod api;
pub mod auth;
pub mod frames;
pub mod ids;
pub mod jetstream;
pub mod membership;
pub mod subjects;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
