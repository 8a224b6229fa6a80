//! Gateway settings. Every field is documented in `gateway/README.md`; loaded with
//! `chat_common::config::load` (defaults, then `--config FILE`, then `CHAT_GATEWAY_...` env vars).

use std::time::Duration;

use chat_protocol::auth::{AuthConfigError, TokenVerifier};
use serde::{Deserialize, Serialize};

/// The gateway's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// WebSocket listener address.
    pub listen: String,
    /// Admin listener (`/healthz`, `/readyz`, `/metrics`); empty disables it.
    pub admin_listen: String,
    pub nats_url: String,
    /// How the gateway authenticates to NATS (`chat_common::nats`).
    pub nats_auth: chat_common::nats::NatsAuth,
    /// TLS to NATS: CA, client certificate (`chat_common::nats::NatsTls`).
    pub nats_tls: chat_common::nats::NatsTls,
    pub auth: AuthConfig,
    /// Largest inbound WebSocket message; larger closes the connection with 1009.
    pub max_frame_bytes: usize,
    /// Largest `send` body; larger is answered with `body_too_large`.
    pub max_body_bytes: usize,
    /// Sustained sends per second per user (all devices, this gateway).
    pub sends_per_second: u32,
    /// Sends a user may make at once before `sends_per_second` applies.
    pub send_burst: u32,
    /// Sustained `delivered` and `read` frames per second per user (all devices, this gateway),
    /// limited apart from sends.
    pub receipts_per_second: u32,
    /// Receipts a user may send at once before `receipts_per_second` applies.
    pub receipt_burst: u32,
    /// WebSocket connections per user on this gateway; more are refused with HTTP 429.
    pub max_connections_per_user: usize,
    /// WebSocket connections on this gateway (0: no limit); more are refused with HTTP 503
    /// `overloaded`. Keep it below the process's open-file limit.
    pub max_connections: usize,
    /// Connection handshakes (from the HTTP request to `hello`) in progress at once; more are
    /// refused with HTTP 503 `overloaded`.
    pub max_handshakes: usize,
    /// The `Retry-After` of an `overloaded` refusal, in seconds.
    pub overloaded_retry_after_s: u64,
    /// Frames queued for one connection; a full queue closes it with 4001 (slow consumer).
    pub outgoing_queue: usize,
    /// Sends, receipts and requests (history, sync, receipts) of one connection awaiting their
    /// answer; at the limit the gateway stops reading that socket until one completes.
    pub max_inflight_sends: usize,
    pub heartbeat_interval_ms: u64,
    /// Nothing received for this long closes the connection with 4000.
    pub heartbeat_timeout_ms: u64,
    pub read_buffer_bytes: usize,
    pub write_buffer_bytes: usize,
    /// Deadline for a send to be stored by JetStream (publish plus ack).
    pub publish_timeout_ms: u64,
    /// Deadline for a history, sync or receipts answer.
    pub history_timeout_ms: u64,
    /// How long a closing connection waits to deliver its close frame and see the client's.
    pub close_timeout_ms: u64,
    /// How long shutdown waits for connections to finish in-flight sends and close.
    pub shutdown_grace_ms: u64,
    /// Presence reports and typing (`presence.rs`).
    pub presence: crate::presence::PresenceConfig,
    /// Abuse limits: groups, members and new conversations per user, failed authentications
    /// per address (`limits.rs`).
    pub abuse: crate::limits::AbuseConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            admin_listen: "127.0.0.1:9090".into(),
            nats_url: "nats://127.0.0.1:4222".into(),
            nats_auth: Default::default(),
            nats_tls: Default::default(),
            auth: AuthConfig::default(),
            max_frame_bytes: 131_072,
            max_body_bytes: 65_536,
            sends_per_second: 20,
            send_burst: 40,
            receipts_per_second: 50,
            receipt_burst: 100,
            max_connections_per_user: 10,
            max_connections: 0,
            max_handshakes: 256,
            overloaded_retry_after_s: 1,
            outgoing_queue: 256,
            max_inflight_sends: 64,
            heartbeat_interval_ms: 15_000,
            heartbeat_timeout_ms: 45_000,
            read_buffer_bytes: 1024,
            write_buffer_bytes: 4096,
            publish_timeout_ms: 5000,
            history_timeout_ms: 5000,
            close_timeout_ms: 5000,
            shutdown_grace_ms: 5000,
            presence: Default::default(),
            abuse: Default::default(),
        }
    }
}

/// How access tokens are verified (shared with the media service): see
/// [`chat_protocol::auth::settings`].
pub use chat_protocol::auth::{AuthConfig, KeyConfig};

/// Why a configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Auth(#[from] AuthConfigError),
    #[error("`{field}` {reason}")]
    Invalid {
        field: &'static str,
        reason: &'static str,
    },
}

impl Config {
    /// Checks the settings that have no sensible meaning at zero or out of order, and the
    /// auth keys. [`crate::run`] calls it; `main` reports its error and exits non-zero.
    pub fn validate(&self) -> Result<TokenVerifier, ConfigError> {
        let positive: [(&'static str, u64); 16] = [
            ("max_frame_bytes", self.max_frame_bytes as u64),
            ("max_body_bytes", self.max_body_bytes as u64),
            ("sends_per_second", self.sends_per_second.into()),
            ("send_burst", self.send_burst.into()),
            ("receipts_per_second", self.receipts_per_second.into()),
            ("receipt_burst", self.receipt_burst.into()),
            (
                "max_connections_per_user",
                self.max_connections_per_user as u64,
            ),
            ("max_handshakes", self.max_handshakes as u64),
            ("overloaded_retry_after_s", self.overloaded_retry_after_s),
            ("outgoing_queue", self.outgoing_queue as u64),
            ("max_inflight_sends", self.max_inflight_sends as u64),
            ("heartbeat_interval_ms", self.heartbeat_interval_ms),
            ("heartbeat_timeout_ms", self.heartbeat_timeout_ms),
            ("read_buffer_bytes", self.read_buffer_bytes as u64),
            ("publish_timeout_ms", self.publish_timeout_ms),
            ("history_timeout_ms", self.history_timeout_ms),
        ];
        for (field, value) in positive.into_iter().chain(self.abuse.counts()) {
            if value == 0 {
                return Err(ConfigError::Invalid {
                    field,
                    reason: "must be greater than 0",
                });
            }
        }
        if self.max_body_bytes >= self.max_frame_bytes {
            return Err(ConfigError::Invalid {
                field: "max_body_bytes",
                reason: "must be smaller than `max_frame_bytes` (a send frame carries the body)",
            });
        }
        if self.heartbeat_timeout_ms <= self.heartbeat_interval_ms {
            return Err(ConfigError::Invalid {
                field: "heartbeat_timeout_ms",
                reason: "must be greater than `heartbeat_interval_ms`",
            });
        }
        if self.abuse.ip_header().is_err() {
            return Err(ConfigError::Invalid {
                field: "abuse.client_ip_header",
                reason: "is not a valid HTTP header name",
            });
        }
        Ok(self.auth.verifier()?)
    }

    pub(crate) fn ms(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(c: &Config) -> ConfigError {
        match c.validate() {
            Ok(_) => panic!("config unexpectedly valid"),
            Err(e) => e,
        }
    }

    fn dev() -> Config {
        let mut c = Config::default();
        c.auth.hs256_secret = Some("s3cret-value".into());
        c
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let c = Config::default();
        assert_eq!(c.listen, "127.0.0.1:8080");
        assert_eq!(c.admin_listen, "127.0.0.1:9090");
        assert_eq!(c.nats_url, "nats://127.0.0.1:4222");
        assert_eq!(c.max_frame_bytes, 131_072);
        assert_eq!(c.max_body_bytes, 65_536);
        assert_eq!((c.sends_per_second, c.send_burst), (20, 40));
        assert_eq!((c.receipts_per_second, c.receipt_burst), (50, 100));
        assert_eq!(c.max_connections_per_user, 10);
        assert_eq!((c.outgoing_queue, c.max_inflight_sends), (256, 64));
        assert_eq!(
            (c.heartbeat_interval_ms, c.heartbeat_timeout_ms),
            (15_000, 45_000)
        );
        assert_eq!((c.read_buffer_bytes, c.write_buffer_bytes), (1024, 4096));
        assert_eq!((c.max_connections, c.max_handshakes), (0, 256));
        assert_eq!(c.overloaded_retry_after_s, 1);
        assert!(dev().validate().is_ok());
    }

    #[test]
    fn key_settings_are_checked() {
        let none = Config::default();
        let err = refusal(&none);
        assert!(
            matches!(err, ConfigError::Auth(AuthConfigError::NoKey)),
            "{err}"
        );
        let mut two = dev();
        two.auth.eddsa_public_key_file = Some("/nonexistent.pem".into());
        let err = refusal(&two);
        assert!(matches!(
            err,
            ConfigError::Auth(AuthConfigError::SingleKeyCount(2))
        ));
        assert!(err.to_string().contains("at most one"), "{err}");
        let mut missing = Config::default();
        missing.auth.rs256_public_key_file = Some("/nonexistent/key.pem".into());
        let err = refusal(&missing);
        assert!(err.to_string().contains("/nonexistent/key.pem"), "{err}");
        let report = format!("{:#}", anyhow::Error::new(err));
        assert_eq!(report.matches("os error 2").count(), 1, "{report}");
        let mut garbage = Config::default();
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), "not a pem").unwrap();
        garbage.auth.eddsa_public_key_file = Some(file.path().into());
        let err = garbage.validate().unwrap_err();
        assert!(
            matches!(err, ConfigError::Auth(AuthConfigError::Key { .. })),
            "{err}"
        );
        // The file is named once, and the reason is said once (not again as a source).
        let report = format!("{:#}", anyhow::Error::new(err));
        assert!(
            report.contains(&file.path().display().to_string()),
            "{report}"
        );
        assert_eq!(report.matches("cannot load EdDSA").count(), 1, "{report}");
        // Keys with ids, beside or instead of the single-key setting.
        let mut keyed = Config::default();
        keyed.auth.keys = vec![KeyConfig {
            kid: Some("2025-06".into()),
            alg: chat_protocol::auth::KeyAlgorithm::HS256,
            secret: Some("rotated".into()),
            public_key_file: None,
        }];
        let verifier = keyed.validate().unwrap();
        assert_eq!(verifier.keys().count(), 1);
        assert_eq!(verifier.leeway_secs(), 30);
    }

    #[test]
    fn abuse_limits_are_checked() {
        let c = Config::default();
        assert_eq!(c.abuse.groups_per_hour, 20);
        assert_eq!(c.abuse.group_members_per_minute, 1024);
        assert_eq!(c.abuse.new_conversations_per_minute, 10);
        assert_eq!(c.abuse.auth_failures_per_minute, 20);
        assert_eq!(c.abuse.client_ip_header, None);
        let mut c = dev();
        c.abuse.new_conversations_per_minute = 0;
        let err = refusal(&c);
        assert!(
            err.to_string()
                .contains("abuse.new_conversations_per_minute"),
            "{err}"
        );
        let mut c = dev();
        c.abuse.client_ip_header = Some("x forwarded".into());
        assert!(refusal(&c).to_string().contains("client_ip_header"));
        c.abuse.client_ip_header = Some("X-Forwarded-For".into());
        assert!(c.validate().is_ok());
    }

    #[test]
    fn refuses_nonsense_limits() {
        let mut c = dev();
        c.outgoing_queue = 0;
        assert!(refusal(&c).to_string().contains("outgoing_queue"));
        let mut c = dev();
        c.receipt_burst = 0;
        assert!(refusal(&c).to_string().contains("receipt_burst"));
        let mut c = dev();
        c.max_body_bytes = c.max_frame_bytes;
        assert!(refusal(&c).to_string().contains("max_body_bytes"));
        let mut c = dev();
        c.heartbeat_timeout_ms = c.heartbeat_interval_ms;
        assert!(c.validate().is_err());
    }

    #[test]
    fn every_field_is_documented_in_the_readme() {
        let readme = include_str!("../README.md");
        let value = serde_json::to_value(Config::default()).unwrap();
        let mut fields = Vec::new();
        for (key, v) in value.as_object().unwrap() {
            match v.as_object() {
                Some(nested) => fields.extend(nested.keys().map(|k| format!("{key}.{k}"))),
                None => fields.push(key.clone()),
            }
        }
        for field in fields {
            assert!(
                readme.contains(&format!("| `{field}` |")),
                "README.md config table lacks `{field}`"
            );
        }
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let mut c = dev();
        c.auth.keys = vec![KeyConfig {
            kid: Some("k".into()),
            alg: chat_protocol::auth::KeyAlgorithm::HS256,
            secret: Some("s3cret-value-two".into()),
            public_key_file: None,
        }];
        let shown = format!("{c:?}");
        assert!(!shown.contains("s3cret-value"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
    }

    #[test]
    fn loads_file_and_env_and_rejects_unknown_fields() {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(
            file.path(),
            "max_body_bytes = 1000\n[auth]\nhs256_secret = \"x\"\n",
        )
        .unwrap();
        let c: Config =
            chat_common::config::load(Some(file.path()), "CHAT_GATEWAY_TEST_UNSET_").unwrap();
        assert_eq!(c.max_body_bytes, 1000);
        assert_eq!(c.auth.hs256_secret.as_deref(), Some("x"));
        assert_eq!(c.max_frame_bytes, 131_072);

        // Rotation: keys with ids as a TOML array of tables, and the leeway.
        std::fs::write(
            file.path(),
            "[auth]\nleeway_secs = 5\nhs256_secret = \"old\"\n\
             [[auth.keys]]\nkid = \"2025-06\"\nalg = \"EdDSA\"\npublic_key_file = \"/keys/ed.pem\"\n\
             [abuse]\ngroups_per_hour = 3\n",
        )
        .unwrap();
        let c: Config =
            chat_common::config::load(Some(file.path()), "CHAT_GATEWAY_TEST_UNSET_").unwrap();
        assert_eq!(c.auth.leeway_secs, 5);
        assert_eq!(c.auth.keys[0].kid.as_deref(), Some("2025-06"));
        assert_eq!(c.auth.keys[0].alg, chat_protocol::auth::KeyAlgorithm::EdDSA);
        assert_eq!(c.abuse.groups_per_hour, 3);
        assert_eq!(c.abuse.new_conversations_per_minute, 10);

        // The same keys as one environment variable (CHAT_GATEWAY_AUTH__KEYS), whose value
        // figment parses with its inline array and table syntax.
        let value: figment::value::Value =
            r#"[{kid="2025-06", alg="RS256", public_key_file="/etc/chat/jwt/2025-06.pem"}]"#
                .parse()
                .unwrap();
        let keys: Vec<KeyConfig> = value.deserialize().unwrap();
        assert_eq!(keys[0].alg, chat_protocol::auth::KeyAlgorithm::RS256);
        assert_eq!(keys[0].kid.as_deref(), Some("2025-06"));

        std::fs::write(file.path(), "max_bodies = 1\n").unwrap();
        let err =
            chat_common::config::load::<Config>(Some(file.path()), "CHAT_GATEWAY_TEST_UNSET_")
                .unwrap_err();
        assert!(err.to_string().contains("max_bodies"), "{err}");
    }
}
