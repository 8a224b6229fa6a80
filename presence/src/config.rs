//! Presence settings (`CHAT_PRESENCE_*` env vars or a TOML file), documented in
//! `presence/README.md`.

use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// NATS server URL.
    pub nats_url: String,
    /// How this replica authenticates to NATS (`chat_common::nats`).
    pub nats_auth: chat_common::nats::NatsAuth,
    /// TLS to NATS: CA, client certificate (`chat_common::nats::NatsTls`).
    pub nats_tls: chat_common::nats::NatsTls,
    /// Admin endpoint (`/healthz`, `/readyz`, `/metrics`); empty disables it.
    pub admin_listen: String,
    /// This replica's id among the live presence replicas (default: host name and pid).
    pub instance_id: String,
    /// Per-key TTL of `on.<user>.<gateway>`: a gateway that stops reporting (crashed, cut
    /// off) has its users offline this long after its last heartbeat. Whole seconds (the
    /// `Nats-TTL` header's unit), at least 1 s, and more than twice the gateways' heartbeat.
    pub online_ttl_ms: u64,
    /// A change waits this long before it is pushed, so changes close together go as one.
    pub debounce_ms: u64,
    /// Two pushes of one user's presence are at least this far apart.
    pub min_push_interval_ms: u64,
    /// Deadline of the `chat.api.contacts` request behind every query.
    pub contacts_timeout_ms: u64,
    /// How long a group's member list is kept for relaying typing indicators.
    pub group_cache_ms: u64,
    /// Groups with more members get no typing indicators (each costs one publish per online
    /// member).
    pub typing_group_max_members: usize,
    /// Typing relays in flight; beyond it typing indicators are dropped (shed first).
    pub typing_inflight: usize,
    /// How often this replica announces itself to the others, and after how long without a
    /// word another replica is taken for gone (its share of users moves).
    pub balance_heartbeat_ms: u64,
    pub balance_expire_ms: u64,
    /// Grace period for in-flight work at shutdown.
    pub shutdown_grace_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            nats_url: "nats://127.0.0.1:4222".into(),
            nats_auth: Default::default(),
            nats_tls: Default::default(),
            admin_listen: "127.0.0.1:9094".into(),
            instance_id: String::new(),
            online_ttl_ms: 90_000,
            debounce_ms: 1000,
            min_push_interval_ms: 5000,
            contacts_timeout_ms: 2000,
            group_cache_ms: 10_000,
            typing_group_max_members: 64,
            typing_inflight: 256,
            balance_heartbeat_ms: 1000,
            balance_expire_ms: 3000,
            shutdown_grace_ms: 5000,
        }
    }
}

/// A setting that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("online_ttl_ms must be a whole number of seconds, at least 1000 (got {0})")]
    OnlineTtl(u64),
    #[error("balance_expire_ms must exceed balance_heartbeat_ms")]
    Balance,
    #[error("typing_inflight must be at least 1")]
    TypingInflight,
}

impl Config {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.online_ttl_ms < 1000 || !self.online_ttl_ms.is_multiple_of(1000) {
            return Err(ConfigError::OnlineTtl(self.online_ttl_ms));
        }
        if self.balance_expire_ms <= self.balance_heartbeat_ms {
            return Err(ConfigError::Balance);
        }
        if self.typing_inflight == 0 {
            return Err(ConfigError::TypingInflight);
        }
        Ok(())
    }

    pub fn ms(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_field_is_documented_in_the_readme() {
        let readme = include_str!("../README.md");
        let value = serde_json::to_value(Config::default()).unwrap();
        for field in value.as_object().unwrap().keys() {
            let env = format!("CHAT_PRESENCE_{}", field.to_uppercase());
            assert!(
                readme.contains(&format!("| `{field}` | `{env}` |")),
                "README.md settings table lacks `{field}`"
            );
        }
    }

    #[test]
    fn defaults_are_valid_and_bad_ttls_are_refused() {
        Config::default().validate().unwrap();
        for ttl in [0, 500, 1500] {
            let c = Config {
                online_ttl_ms: ttl,
                ..Config::default()
            };
            assert!(matches!(c.validate(), Err(ConfigError::OnlineTtl(_))));
        }
    }
}
