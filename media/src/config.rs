//! The media service's settings (`media/README.md` has the table). Loaded by
//! `chat_common::config` from defaults, `--config FILE` and `CHAT_MEDIA_…` env vars.

use std::time::Duration;

use chat_protocol::auth::{AuthConfigError, TokenVerifier};
use serde::{Deserialize, Serialize};

/// S3 never accepts more parts than this in one multipart upload.
pub const S3_MAX_PARTS: u64 = 10_000;
/// S3's smallest part (all but the last part of a multipart upload).
pub const S3_MIN_PART_BYTES: u64 = 5 * 1024 * 1024;
/// S3's largest single PUT and largest part.
pub const S3_MAX_PUT_BYTES: u64 = 5 * 1024 * 1024 * 1024;
/// The longest a presigned SigV4 URL may live (7 days).
pub const S3_MAX_PRESIGN_SECS: u64 = 7 * 24 * 3600;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// HTTP API listener.
    pub listen: String,
    /// Admin listener (`/healthz`, `/readyz`, `/metrics`); empty disables it.
    pub admin_listen: String,
    pub nats_url: String,
    /// How the service authenticates to NATS (`chat_common::nats`).
    pub nats_auth: chat_common::nats::NatsAuth,
    /// TLS to NATS: CA, client certificate (`chat_common::nats::NatsTls`).
    pub nats_tls: chat_common::nats::NatsTls,
    pub auth: AuthConfig,
    pub s3: S3Config,
    /// Largest upload with one presigned PUT.
    pub max_single_upload_bytes: u64,
    /// Largest upload at all (multipart).
    pub max_upload_bytes: u64,
    /// Size of every part of a multipart upload but the last.
    pub part_size_bytes: u64,
    /// Content types that may be uploaded: exact (`image/png`) or a whole type (`image/*`).
    pub allowed_content_types: Vec<String>,
    /// Lifetime of presigned upload URLs (PUT and parts).
    pub upload_url_ttl_secs: u64,
    /// Lifetime of presigned download URLs.
    pub download_url_ttl_secs: u64,
    /// Bytes one user may hold (uploads not yet cleaned up, referenced or not).
    pub quota_bytes: u64,
    /// Sustained API requests per second per user (this replica).
    pub requests_per_second: u32,
    /// Requests a user may make at once before `requests_per_second` applies.
    pub request_burst: u32,
    /// An upload no message references this long after it was requested is deleted.
    pub orphan_ttl_ms: u64,
    /// How often this replica looks for orphans.
    pub cleanup_interval_ms: u64,
    /// How long a positive group membership answer is reused.
    pub membership_cache_ms: u64,
    /// Deadline of NATS requests (group membership) and KV operations.
    pub nats_timeout_ms: u64,
    /// Deadline of one object store operation, retries included.
    pub s3_timeout_ms: u64,
    /// On shutdown, how long in-flight requests get to finish.
    pub shutdown_grace_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8070".into(),
            admin_listen: "127.0.0.1:9093".into(),
            nats_url: "nats://127.0.0.1:4222".into(),
            nats_auth: Default::default(),
            nats_tls: Default::default(),
            auth: AuthConfig::default(),
            s3: S3Config::default(),
            max_single_upload_bytes: 64 * 1024 * 1024,
            max_upload_bytes: 2 * 1024 * 1024 * 1024,
            part_size_bytes: 8 * 1024 * 1024,
            allowed_content_types: [
                "image/jpeg",
                "image/png",
                "image/gif",
                "image/webp",
                "image/heic",
                "video/mp4",
                "video/webm",
                "video/quicktime",
                "audio/mpeg",
                "audio/mp4",
                "audio/ogg",
                "audio/aac",
                "application/pdf",
                "application/zip",
                "application/octet-stream",
                "text/plain",
            ]
            .map(String::from)
            .to_vec(),
            upload_url_ttl_secs: 900,
            download_url_ttl_secs: 300,
            quota_bytes: 20 * 1024 * 1024 * 1024,
            requests_per_second: 10,
            request_burst: 50,
            orphan_ttl_ms: 24 * 3600 * 1000,
            cleanup_interval_ms: 5 * 60 * 1000,
            membership_cache_ms: 5000,
            nats_timeout_ms: 5000,
            s3_timeout_ms: 10_000,
            shutdown_grace_ms: 5000,
        }
    }
}

/// How access tokens are verified: the gateway's `auth` block (key set selected by `kid`,
/// clock-skew leeway), `gateway/README.md`.
pub use chat_protocol::auth::{AuthConfig, KeyConfig};

/// The object store: AWS S3 or any S3-compatible server.
#[derive(Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct S3Config {
    /// Endpoint URL; empty for AWS S3's own endpoints.
    pub endpoint: String,
    pub region: String,
    /// Path-style URLs (`endpoint/bucket/key`), as most S3-compatible servers need.
    pub force_path_style: bool,
    pub bucket: String,
    /// Static credentials; when unset, the standard AWS chain (env `AWS_ACCESS_KEY_ID` …,
    /// profile, web identity, instance metadata).
    pub access_key_id: Option<String>,
    /// Never logged.
    pub secret_access_key: Option<String>,
}

impl Default for S3Config {
    fn default() -> Self {
        Self {
            endpoint: String::new(),
            region: "us-east-1".into(),
            force_path_style: false,
            bucket: "chat-media".into(),
            access_key_id: None,
            secret_access_key: None,
        }
    }
}

impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Config")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("force_path_style", &self.force_path_style)
            .field("bucket", &self.bucket)
            .field("access_key_id", &self.access_key_id)
            .field(
                "secret_access_key",
                &self.secret_access_key.as_ref().map(|_| "…"),
            )
            .finish()
    }
}

/// Why a configuration is refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Auth(#[from] AuthConfigError),
    #[error("{0}")]
    Invalid(String),
}

impl Config {
    pub fn ms(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    /// Checks the limits and builds the token verifier.
    pub fn validate(&self) -> Result<TokenVerifier, ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if self.s3.bucket.is_empty() {
            return invalid("s3.bucket must be set".into());
        }
        if self.s3.access_key_id.is_some() != self.s3.secret_access_key.is_some() {
            return invalid(
                "s3.access_key_id and s3.secret_access_key are set together, or neither".into(),
            );
        }
        if self.part_size_bytes < S3_MIN_PART_BYTES || self.part_size_bytes > S3_MAX_PUT_BYTES {
            return invalid(format!(
                "part_size_bytes must be between {S3_MIN_PART_BYTES} and {S3_MAX_PUT_BYTES}"
            ));
        }
        if self.max_upload_bytes.div_ceil(self.part_size_bytes) > S3_MAX_PARTS {
            return invalid(format!(
                "max_upload_bytes / part_size_bytes exceeds S3's {S3_MAX_PARTS} parts"
            ));
        }
        if self.max_single_upload_bytes == 0
            || self.max_single_upload_bytes > S3_MAX_PUT_BYTES
            || self.max_single_upload_bytes > self.max_upload_bytes
        {
            return invalid(format!(
                "max_single_upload_bytes must be 1..={S3_MAX_PUT_BYTES} and at most max_upload_bytes"
            ));
        }
        for (name, secs) in [
            ("upload_url_ttl_secs", self.upload_url_ttl_secs),
            ("download_url_ttl_secs", self.download_url_ttl_secs),
        ] {
            if secs == 0 || secs > S3_MAX_PRESIGN_SECS {
                return invalid(format!("{name} must be 1..={S3_MAX_PRESIGN_SECS}"));
            }
        }
        // An upload must be able to finish before it may be taken for an orphan.
        if self.orphan_ttl_ms <= self.upload_url_ttl_secs * 1000 {
            return invalid("orphan_ttl_ms must exceed upload_url_ttl_secs".into());
        }
        if self.cleanup_interval_ms == 0 || self.nats_timeout_ms == 0 || self.s3_timeout_ms == 0 {
            return invalid(
                "cleanup_interval_ms, nats_timeout_ms and s3_timeout_ms must be > 0".into(),
            );
        }
        if self.allowed_content_types.is_empty() {
            return invalid("allowed_content_types must not be empty".into());
        }
        self.verifier()
    }

    fn verifier(&self) -> Result<TokenVerifier, ConfigError> {
        Ok(self.auth.verifier()?)
    }

    /// Whether `content_type` is on the allow-list (`type/subtype` exactly, or `type/*`).
    pub fn allows(&self, content_type: &str) -> bool {
        let ct = content_type.to_ascii_lowercase();
        self.allowed_content_types.iter().any(|a| {
            let a = a.to_ascii_lowercase();
            match a.strip_suffix("/*") {
                Some(kind) => ct.split_once('/').is_some_and(|(t, _)| t == kind),
                None => a == ct,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> Config {
        Config {
            auth: AuthConfig {
                hs256_secret: Some("s".into()),
                ..AuthConfig::default()
            },
            ..Config::default()
        }
    }

    #[test]
    fn defaults_with_a_secret_are_valid() {
        assert!(valid().validate().is_ok());
        assert!(matches!(
            Config::default().validate(),
            Err(ConfigError::Auth(AuthConfigError::NoKey))
        ));
    }

    #[test]
    fn limits_are_checked() {
        let bad = |f: fn(&mut Config)| {
            let mut c = valid();
            f(&mut c);
            c.validate().is_err()
        };
        assert!(bad(|c| c.part_size_bytes = 1024));
        assert!(bad(
            |c| c.max_upload_bytes = S3_MAX_PARTS * c.part_size_bytes + 1
        ));
        assert!(bad(|c| c.max_single_upload_bytes = c.max_upload_bytes + 1));
        assert!(bad(|c| c.upload_url_ttl_secs = 0));
        assert!(bad(|c| c.download_url_ttl_secs = S3_MAX_PRESIGN_SECS + 1));
        assert!(bad(|c| c.orphan_ttl_ms = 1000 * c.upload_url_ttl_secs));
        assert!(bad(|c| c.s3.access_key_id = Some("k".into())));
        assert!(bad(|c| c.allowed_content_types.clear()));
    }

    #[test]
    fn allow_list_matches_exact_types_and_whole_types() {
        let c = Config {
            allowed_content_types: vec!["image/*".into(), "application/pdf".into()],
            ..valid()
        };
        assert!(c.allows("image/png"));
        assert!(c.allows("IMAGE/JPEG"));
        assert!(c.allows("application/pdf"));
        assert!(!c.allows("application/pdfx"));
        assert!(!c.allows("imagex/png"));
        assert!(!c.allows("text/html"));
    }

    #[test]
    fn secrets_are_not_in_debug_output() {
        let mut c = valid();
        c.s3.secret_access_key = Some("very-secret".into());
        assert!(!format!("{:?}", c.s3).contains("very-secret"));
    }
}
