//! The `auth` settings of the services that verify client tokens (gateway, media): which keys
//! verify tokens, and the clock-skew leeway. Documented in `gateway/README.md` (the media
//! service takes the same block).
//!
//! Two ways to name keys, which may be combined:
//! - one of the single-key settings `hs256_secret`, `rs256_public_key_file`,
//!   `eddsa_public_key_file` (the original form): a key **without** `kid`, for tokens without a
//!   `kid` header;
//! - `keys`, a list of `{kid, alg, secret | public_key_file}`: each verifies the tokens whose
//!   header names its `kid` (one entry may leave `kid` out, if no single-key setting is used).

use std::{fmt, path::PathBuf};

use serde::{Deserialize, Serialize};

use super::{KeyAlgorithm, KeyError, KeySetError, TokenVerifier, VerifyKey};

/// The default clock-skew leeway on `exp` and `nbf`, in seconds.
pub const DEFAULT_LEEWAY_SECS: u64 = 30;
/// The largest leeway accepted: more would keep expired tokens alive for long.
pub const MAX_LEEWAY_SECS: u64 = 300;

/// How access tokens are verified.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// HS256 shared secret (development only); a key without `kid`.
    pub hs256_secret: Option<String>,
    /// PEM file with the RS256 public key; a key without `kid`.
    pub rs256_public_key_file: Option<PathBuf>,
    /// PEM file with the Ed25519 (EdDSA) public key; a key without `kid`.
    pub eddsa_public_key_file: Option<PathBuf>,
    /// Keys selected by the token's `kid` header (rotation).
    pub keys: Vec<KeyConfig>,
    /// Clock-skew leeway on `exp` and `nbf`, seconds.
    pub leeway_secs: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            hs256_secret: None,
            rs256_public_key_file: None,
            eddsa_public_key_file: None,
            keys: Vec::new(),
            leeway_secs: DEFAULT_LEEWAY_SECS,
        }
    }
}

/// One entry of `auth.keys`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// The `kid` tokens name this key by; absent: the key for tokens without `kid`.
    #[serde(default)]
    pub kid: Option<String>,
    /// `HS256`, `RS256` or `EdDSA`: the only algorithm this key verifies.
    pub alg: KeyAlgorithm,
    /// The shared secret (`HS256` only).
    #[serde(default)]
    pub secret: Option<String>,
    /// PEM file with the public key (`RS256`, `EdDSA`).
    #[serde(default)]
    pub public_key_file: Option<PathBuf>,
}

// Hand-written so secrets never reach a log line.
impl fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthConfig")
            .field(
                "hs256_secret",
                &self.hs256_secret.as_ref().map(|_| "<redacted>"),
            )
            .field("rs256_public_key_file", &self.rs256_public_key_file)
            .field("eddsa_public_key_file", &self.eddsa_public_key_file)
            .field("keys", &self.keys)
            .field("leeway_secs", &self.leeway_secs)
            .finish()
    }
}

impl fmt::Debug for KeyConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyConfig")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("public_key_file", &self.public_key_file)
            .finish()
    }
}

/// Why the `auth` settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    #[error(
        "auth: no verification key: set one of `hs256_secret`, `rs256_public_key_file`, `eddsa_public_key_file`, or `keys`"
    )]
    NoKey,
    #[error(
        "auth: at most one of `hs256_secret`, `rs256_public_key_file`, `eddsa_public_key_file` may be set ({0} are); more keys go in `keys`, each with a `kid`"
    )]
    SingleKeyCount(usize),
    #[error("auth: `hs256_secret` is empty")]
    EmptySecret,
    #[error("auth.keys[{index}]: {reason}")]
    BadKey { index: usize, reason: &'static str },
    /// The reason is in the message, not a `source`: with both, a report of the error chain
    /// (`{:#}`) says it twice.
    #[error("auth: cannot read {path}: {error}")]
    KeyFile {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("auth: {path}: {error}")]
    Key { path: PathBuf, error: KeyError },
    #[error("auth: {0}")]
    Set(KeySetError),
    #[error("auth: `leeway_secs` is {0}; at most {MAX_LEEWAY_SECS} is accepted")]
    Leeway(u64),
}

fn read(path: &PathBuf) -> Result<Vec<u8>, AuthConfigError> {
    std::fs::read(path).map_err(|error| AuthConfigError::KeyFile {
        path: path.clone(),
        error,
    })
}

/// Reads the PEM file at `path` and loads it with `load`, naming the file in either error.
fn pem_key(
    path: &PathBuf,
    load: fn(Option<String>, &[u8]) -> Result<VerifyKey, KeyError>,
    kid: Option<String>,
) -> Result<VerifyKey, AuthConfigError> {
    load(kid, &read(path)?).map_err(|error| AuthConfigError::Key {
        path: path.clone(),
        error,
    })
}

impl AuthConfig {
    /// Reads the key files and builds the verifier these settings describe.
    pub fn verifier(&self) -> Result<TokenVerifier, AuthConfigError> {
        if self.leeway_secs > MAX_LEEWAY_SECS {
            return Err(AuthConfigError::Leeway(self.leeway_secs));
        }
        let single = usize::from(self.hs256_secret.is_some())
            + usize::from(self.rs256_public_key_file.is_some())
            + usize::from(self.eddsa_public_key_file.is_some());
        if single > 1 {
            return Err(AuthConfigError::SingleKeyCount(single));
        }
        if single == 0 && self.keys.is_empty() {
            return Err(AuthConfigError::NoKey);
        }
        let mut keys = Vec::with_capacity(single + self.keys.len());
        if let Some(secret) = &self.hs256_secret {
            if secret.is_empty() {
                return Err(AuthConfigError::EmptySecret);
            }
            keys.push(VerifyKey::hs256(None, secret.as_bytes()));
        } else if let Some(path) = &self.rs256_public_key_file {
            keys.push(pem_key(path, VerifyKey::rs256_pem, None)?);
        } else if let Some(path) = &self.eddsa_public_key_file {
            keys.push(pem_key(path, VerifyKey::eddsa_pem, None)?);
        }
        for (index, key) in self.keys.iter().enumerate() {
            keys.push(key.load(index)?);
        }
        TokenVerifier::new(keys, self.leeway_secs).map_err(AuthConfigError::Set)
    }
}

impl KeyConfig {
    fn load(&self, index: usize) -> Result<VerifyKey, AuthConfigError> {
        let bad = |reason| AuthConfigError::BadKey { index, reason };
        let kid = self.kid.clone();
        match (self.alg, &self.secret, &self.public_key_file) {
            (KeyAlgorithm::HS256, Some(secret), None) => {
                if secret.is_empty() {
                    return Err(bad("`secret` is empty"));
                }
                Ok(VerifyKey::hs256(kid, secret.as_bytes()))
            }
            (KeyAlgorithm::HS256, _, _) => Err(bad(
                "an HS256 key takes `secret` (and no `public_key_file`)",
            )),
            (KeyAlgorithm::RS256, None, Some(path)) => pem_key(path, VerifyKey::rs256_pem, kid),
            (KeyAlgorithm::EdDSA, None, Some(path)) => pem_key(path, VerifyKey::eddsa_pem, kid),
            (KeyAlgorithm::RS256 | KeyAlgorithm::EdDSA, _, _) => Err(bad(
                "an RS256 or EdDSA key takes `public_key_file` (and no `secret`)",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{Claims, TokenError, mint_hs256, now_secs};

    const ED_PUBLIC: &[u8] = include_bytes!("../../tests/fixtures/test-only-ed25519-public.pem");

    fn claims() -> Claims {
        Claims {
            sub: "alice".into(),
            exp: now_secs() + 60,
            iat: 0,
        }
    }

    #[test]
    fn single_key_settings_and_keys_combine() {
        let file = tempfile_with(ED_PUBLIC);
        let config = AuthConfig {
            hs256_secret: Some("legacy".into()),
            keys: vec![
                KeyConfig {
                    kid: Some("hs-2".into()),
                    alg: KeyAlgorithm::HS256,
                    secret: Some("second".into()),
                    public_key_file: None,
                },
                KeyConfig {
                    kid: Some("ed-1".into()),
                    alg: KeyAlgorithm::EdDSA,
                    secret: None,
                    public_key_file: Some(file.clone()),
                },
            ],
            ..AuthConfig::default()
        };
        let verifier = config.verifier().unwrap();
        assert_eq!(verifier.leeway_secs(), DEFAULT_LEEWAY_SECS);
        assert!(
            verifier
                .verify(&mint_hs256(b"legacy", None, &claims()))
                .is_ok()
        );
        assert!(
            verifier
                .verify(&mint_hs256(b"second", Some("hs-2"), &claims()))
                .is_ok()
        );
        assert!(matches!(
            verifier.verify(&mint_hs256(b"legacy", Some("ed-1"), &claims())),
            Err(TokenError::WrongAlgorithm { .. })
        ));
        std::fs::remove_file(file).unwrap();
    }

    fn tempfile_with(bytes: &[u8]) -> PathBuf {
        let path = std::env::temp_dir().join(format!(
            "chat-auth-test-{}-{}.pem",
            std::process::id(),
            crate::now_ms()
        ));
        std::fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn bad_settings_say_what_is_wrong() {
        let err = AuthConfig::default().verifier().unwrap_err();
        assert!(matches!(err, AuthConfigError::NoKey), "{err}");
        let two = AuthConfig {
            hs256_secret: Some("x".into()),
            eddsa_public_key_file: Some("/nonexistent.pem".into()),
            ..AuthConfig::default()
        };
        assert!(matches!(
            two.verifier(),
            Err(AuthConfigError::SingleKeyCount(2))
        ));
        let key = |kid: Option<&str>, alg, secret: Option<&str>, file: Option<&str>| KeyConfig {
            kid: kid.map(str::to_owned),
            alg,
            secret: secret.map(str::to_owned),
            public_key_file: file.map(PathBuf::from),
        };
        let with = |keys: Vec<KeyConfig>| AuthConfig {
            keys,
            ..AuthConfig::default()
        };
        let err = with(vec![key(Some("a"), KeyAlgorithm::RS256, Some("s"), None)])
            .verifier()
            .unwrap_err();
        assert!(err.to_string().contains("auth.keys[0]"), "{err}");
        let err = with(vec![key(Some("a"), KeyAlgorithm::HS256, None, Some("/k"))])
            .verifier()
            .unwrap_err();
        assert!(err.to_string().contains("secret"), "{err}");
        let err = with(vec![key(
            Some("a"),
            KeyAlgorithm::EdDSA,
            None,
            Some("/nonexistent/key.pem"),
        )])
        .verifier()
        .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/key.pem"), "{err}");
        let dup = with(vec![
            key(Some("a"), KeyAlgorithm::HS256, Some("s"), None),
            key(Some("a"), KeyAlgorithm::HS256, Some("t"), None),
        ]);
        assert!(matches!(
            dup.verifier(),
            Err(AuthConfigError::Set(KeySetError::DuplicateKid(_)))
        ));
        // The single-key setting is the key without kid: a `keys` entry without kid besides it
        // would make two.
        let two_without = AuthConfig {
            hs256_secret: Some("x".into()),
            keys: vec![key(None, KeyAlgorithm::HS256, Some("s"), None)],
            ..AuthConfig::default()
        };
        assert!(matches!(
            two_without.verifier(),
            Err(AuthConfigError::Set(KeySetError::SeveralWithoutKid(2)))
        ));
        let lenient = AuthConfig {
            hs256_secret: Some("x".into()),
            leeway_secs: MAX_LEEWAY_SECS + 1,
            ..AuthConfig::default()
        };
        assert!(matches!(
            lenient.verifier(),
            Err(AuthConfigError::Leeway(_))
        ));
    }

    #[test]
    fn debug_never_shows_secrets() {
        let config = AuthConfig {
            hs256_secret: Some("s3cret-one".into()),
            keys: vec![KeyConfig {
                kid: Some("k".into()),
                alg: KeyAlgorithm::HS256,
                secret: Some("s3cret-two".into()),
                public_key_file: None,
            }],
            ..AuthConfig::default()
        };
        let shown = format!("{config:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(
            shown.contains("<redacted>") && shown.contains("\"k\""),
            "{shown}"
        );
    }

    #[test]
    fn keys_deserialize_from_toml_shaped_json() {
        let config: AuthConfig = serde_json::from_value(serde_json::json!({
            "keys": [{"kid": "2025-06", "alg": "EdDSA", "public_key_file": "/keys/ed.pem"}],
            "leeway_secs": 5
        }))
        .unwrap();
        assert_eq!(config.keys[0].alg, KeyAlgorithm::EdDSA);
        assert_eq!(config.leeway_secs, 5);
        assert!(
            serde_json::from_value::<AuthConfig>(serde_json::json!({
                "keys": [{"kid": "a", "alg": "none", "secret": "s"}]
            }))
            .is_err(),
            "alg none is no algorithm"
        );
        assert!(
            serde_json::from_value::<AuthConfig>(serde_json::json!({
                "keys": [{"kid": "a", "alg": "HS256", "secret": "s", "extra": 1}]
            }))
            .is_err()
        );
    }
}
