//! Access tokens: JWTs whose `sub` is the user id and whose `exp` is required and enforced.
//!
//! Development uses an HS256 shared secret ([`mint_dev_token`]); production verifies RS256 or
//! EdDSA signatures with public keys and never holds a signing key.
//!
//! A [`TokenVerifier`] holds a **set** of keys so keys can be rotated without downtime. Each key
//! has its own algorithm and an optional key id (`kid`):
//! - a token whose header names a `kid` is verified with the key of that `kid` only; no such key:
//!   refused ([`TokenError::UnknownKey`]);
//! - a token without `kid` is verified with the one key configured without a `kid` (at most one
//!   may lack it); when every key has a `kid`, it is refused ([`TokenError::MissingKid`]);
//! - the key's algorithm decides: a header `alg` that differs is refused
//!   ([`TokenError::WrongAlgorithm`]), before any signature check. So an HS256 token "signed"
//!   with an RS256 or EdDSA public key as its HMAC secret (key confusion) never verifies, and
//!   `alg: none` is no algorithm at all (the header does not even decode).
//!
//! `exp` must be present; `exp` and `nbf` (when present) are checked with a clock-skew leeway
//! ([`TokenVerifier::with_leeway`]): a token is accepted from `nbf - leeway` until
//! `exp + leeway`. The single-key constructors start with a leeway of 0.

pub mod settings;

use std::fmt;

pub use settings::{AuthConfig, AuthConfigError, KeyConfig};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::ids::{IdError, UserId};

/// The claims the gateway reads.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub exp: u64,
    #[serde(default)]
    pub iat: u64,
}

/// The longest key id echoed in an error (a `kid` is attacker-chosen text).
const KID_ECHO_MAX: usize = 64;

/// Why a token was refused.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("token expired")]
    Expired,
    #[error("token not valid yet (its nbf is in the future)")]
    NotYetValid,
    #[error("token lacks the required claim `{0}`")]
    MissingClaim(String),
    #[error("token names key id {0:?}, which is not configured")]
    UnknownKey(String),
    #[error("token has no key id (kid) and every configured key has one")]
    MissingKid,
    #[error("token algorithm {token} does not match the {key} key it names")]
    WrongAlgorithm {
        token: &'static str,
        key: &'static str,
    },
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("token subject is not a valid user id: {0}")]
    BadSubject(#[from] IdError),
}

/// A signature algorithm a verification key may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeyAlgorithm {
    /// HMAC-SHA256 with a shared secret (development).
    HS256,
    /// RSASSA-PKCS1-v1_5 with SHA-256, PEM public key.
    RS256,
    /// Ed25519, PEM public key.
    EdDSA,
}

impl KeyAlgorithm {
    fn jwt(self) -> Algorithm {
        match self {
            Self::HS256 => Algorithm::HS256,
            Self::RS256 => Algorithm::RS256,
            Self::EdDSA => Algorithm::EdDSA,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::HS256 => "HS256",
            Self::RS256 => "RS256",
            Self::EdDSA => "EdDSA",
        }
    }
}

/// Name of a header `alg`, for error messages.
fn alg_name(alg: Algorithm) -> &'static str {
    match alg {
        Algorithm::HS256 => "HS256",
        Algorithm::HS384 => "HS384",
        Algorithm::HS512 => "HS512",
        Algorithm::ES256 => "ES256",
        Algorithm::ES384 => "ES384",
        Algorithm::RS256 => "RS256",
        Algorithm::RS384 => "RS384",
        Algorithm::RS512 => "RS512",
        Algorithm::PS256 => "PS256",
        Algorithm::PS384 => "PS384",
        Algorithm::PS512 => "PS512",
        Algorithm::EdDSA => "EdDSA",
        _ => "an unknown algorithm",
    }
}

/// One verification key: its id (`kid`), its algorithm and the key itself.
#[derive(Clone)]
pub struct VerifyKey {
    kid: Option<String>,
    alg: KeyAlgorithm,
    key: DecodingKey,
}

// Hand-written: the key (an HMAC secret for HS256) never reaches a log line.
impl fmt::Debug for VerifyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifyKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

/// Why a verification key could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("cannot load {alg} verification key: {error}")]
pub struct KeyError {
    alg: &'static str,
    /// In the message, so not a `source` (a report of the chain would say it twice).
    error: jsonwebtoken::errors::Error,
}

impl VerifyKey {
    /// An HS256 key with a shared secret (development).
    pub fn hs256(kid: Option<String>, secret: &[u8]) -> Self {
        Self {
            kid,
            alg: KeyAlgorithm::HS256,
            key: DecodingKey::from_secret(secret),
        }
    }

    /// An RS256 key from a PEM public key.
    pub fn rs256_pem(kid: Option<String>, pem: &[u8]) -> Result<Self, KeyError> {
        let key = DecodingKey::from_rsa_pem(pem).map_err(|error| KeyError {
            alg: "RS256",
            error,
        })?;
        Ok(Self {
            kid,
            alg: KeyAlgorithm::RS256,
            key,
        })
    }

    /// An EdDSA (Ed25519) key from a PEM public key.
    pub fn eddsa_pem(kid: Option<String>, pem: &[u8]) -> Result<Self, KeyError> {
        let key = DecodingKey::from_ed_pem(pem).map_err(|error| KeyError {
            alg: "EdDSA",
            error,
        })?;
        Ok(Self {
            kid,
            alg: KeyAlgorithm::EdDSA,
            key,
        })
    }

    pub fn kid(&self) -> Option<&str> {
        self.kid.as_deref()
    }

    pub fn algorithm(&self) -> KeyAlgorithm {
        self.alg
    }
}

/// Why a set of keys cannot make a verifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeySetError {
    #[error("no verification key")]
    Empty,
    #[error("key id {0:?} is used by more than one key")]
    DuplicateKid(String),
    #[error("an empty key id: leave `kid` out instead")]
    EmptyKid,
    #[error("{0} keys have no key id; at most one may (it verifies tokens without `kid`)")]
    SeveralWithoutKid(usize),
}

/// A key with the validation rules it is used with.
#[derive(Clone)]
struct Slot {
    key: VerifyKey,
    validation: Validation,
}

/// How tokens are verified: a set of keys, selected by the token's `kid`.
#[derive(Clone)]
pub struct TokenVerifier {
    slots: Vec<Slot>,
    leeway_secs: u64,
}

impl fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenVerifier")
            .field(
                "keys",
                &self.slots.iter().map(|s| &s.key).collect::<Vec<_>>(),
            )
            .field("leeway_secs", &self.leeway_secs)
            .finish()
    }
}

fn validation(alg: KeyAlgorithm, leeway_secs: u64) -> Validation {
    let mut validation = Validation::new(alg.jwt());
    validation.leeway = leeway_secs;
    validation.validate_exp = true;
    validation.validate_nbf = true;
    validation.set_required_spec_claims(&["exp", "sub"]);
    validation
}

impl TokenVerifier {
    /// A verifier over `keys`: key ids unique and not empty, at most one key without one.
    pub fn new(keys: Vec<VerifyKey>, leeway_secs: u64) -> Result<Self, KeySetError> {
        if keys.is_empty() {
            return Err(KeySetError::Empty);
        }
        let mut kids = std::collections::HashSet::new();
        for key in &keys {
            match key.kid.as_deref() {
                Some("") => return Err(KeySetError::EmptyKid),
                Some(kid) if !kids.insert(kid) => {
                    return Err(KeySetError::DuplicateKid(kid.to_owned()));
                }
                _ => {}
            }
        }
        let without = keys.iter().filter(|k| k.kid.is_none()).count();
        if without > 1 {
            return Err(KeySetError::SeveralWithoutKid(without));
        }
        let slots = keys
            .into_iter()
            .map(|key| Slot {
                validation: validation(key.alg, leeway_secs),
                key,
            })
            .collect();
        Ok(Self { slots, leeway_secs })
    }

    fn single(key: VerifyKey) -> Self {
        Self::new(vec![key], 0).expect("one key without kid is a valid set")
    }

    /// HS256 with a shared secret (development): one key without `kid`, no leeway.
    pub fn hs256(secret: &[u8]) -> Self {
        Self::single(VerifyKey::hs256(None, secret))
    }

    /// RS256 with a PEM public key: one key without `kid`, no leeway.
    pub fn rs256_pem(pem: &[u8]) -> Result<Self, KeyError> {
        Ok(Self::single(VerifyKey::rs256_pem(None, pem)?))
    }

    /// EdDSA (Ed25519) with a PEM public key: one key without `kid`, no leeway.
    pub fn eddsa_pem(pem: &[u8]) -> Result<Self, KeyError> {
        Ok(Self::single(VerifyKey::eddsa_pem(None, pem)?))
    }

    /// The same keys with a clock-skew leeway of `secs` on `exp` and `nbf`.
    pub fn with_leeway(mut self, secs: u64) -> Self {
        self.leeway_secs = secs;
        for slot in &mut self.slots {
            slot.validation.leeway = secs;
        }
        self
    }

    /// The clock-skew leeway: a token is accepted until `exp` plus this many seconds.
    pub fn leeway_secs(&self) -> u64 {
        self.leeway_secs
    }

    /// The keys, in the order given.
    pub fn keys(&self) -> impl Iterator<Item = &VerifyKey> {
        self.slots.iter().map(|s| &s.key)
    }

    /// Picks the key by `kid`, checks that the token's `alg` is that key's, then verifies the
    /// signature, `exp` (required) and `nbf` (if present) with the leeway, and validates `sub` as
    /// a user id.
    pub fn verify(&self, token: &str) -> Result<(UserId, Claims), TokenError> {
        use jsonwebtoken::errors::ErrorKind;
        // A header that does not decode includes `alg: none` and any algorithm jsonwebtoken
        // does not know: there is nothing to verify it with.
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| TokenError::Invalid(format!("unreadable header: {e}")))?;
        let slot = match header.kid.as_deref() {
            Some(kid) => self
                .slots
                .iter()
                .find(|s| s.key.kid.as_deref() == Some(kid))
                .ok_or_else(|| TokenError::UnknownKey(kid.chars().take(KID_ECHO_MAX).collect()))?,
            None => self
                .slots
                .iter()
                .find(|s| s.key.kid.is_none())
                .ok_or(TokenError::MissingKid)?,
        };
        if header.alg != slot.key.alg.jwt() {
            return Err(TokenError::WrongAlgorithm {
                token: alg_name(header.alg),
                key: slot.key.alg.as_str(),
            });
        }
        // Decoded as plain JSON first: jsonwebtoken deserializes the claims type before it
        // validates, so a missing `exp` would otherwise be a JSON error, not a missing claim.
        let data =
            jsonwebtoken::decode::<serde_json::Value>(token, &slot.key.key, &slot.validation)
                .map_err(|e| match e.kind() {
                    ErrorKind::ExpiredSignature => TokenError::Expired,
                    ErrorKind::ImmatureSignature => TokenError::NotYetValid,
                    ErrorKind::MissingRequiredClaim(claim) => {
                        TokenError::MissingClaim(claim.clone())
                    }
                    _ => TokenError::Invalid(e.to_string()),
                })?;
        let claims: Claims = serde_json::from_value(data.claims)
            .map_err(|e| TokenError::Invalid(format!("claims: {e}")))?;
        let user = UserId::parse(&claims.sub)?;
        Ok((user, claims))
    }
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Mints an HS256 token for `user`, valid for `ttl_secs` (development and tests only).
pub fn mint_dev_token(secret: &[u8], user: &UserId, ttl_secs: u64) -> String {
    mint_dev_token_for_key(secret, None, user, ttl_secs)
}

/// [`mint_dev_token`] with the header's `kid` (a gateway whose keys all have a `kid`, or one
/// rotating its HS256 secret, needs it).
pub fn mint_dev_token_for_key(
    secret: &[u8],
    kid: Option<&str>,
    user: &UserId,
    ttl_secs: u64,
) -> String {
    let now = now_secs();
    mint_hs256(
        secret,
        kid,
        &Claims {
            sub: user.to_string(),
            iat: now,
            exp: now + ttl_secs,
        },
    )
}

/// Mints an HS256 token with arbitrary claims (tests use it for expired tokens).
pub fn mint_with_claims(secret: &[u8], claims: &Claims) -> String {
    mint_hs256(secret, None, claims)
}

/// Mints an HS256 token with header `kid` (if any) and any serializable claims (development
/// and tests only: rotation, missing `exp`, `nbf`).
pub fn mint_hs256(secret: &[u8], kid: Option<&str>, claims: &impl Serialize) -> String {
    let mut header = Header::new(Algorithm::HS256);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_secret(secret))
        .expect("HS256 encoding cannot fail")
}

#[cfg(test)]
mod tests {
    use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};

    use super::*;

    /// Test-only key pairs (`protocol/tests/fixtures/README.md`): never use them anywhere else.
    const RSA_PRIVATE: &[u8] = include_bytes!("../tests/fixtures/test-only-rsa-private.pem");
    const RSA_PUBLIC: &[u8] = include_bytes!("../tests/fixtures/test-only-rsa-public.pem");
    const RSA2_PRIVATE: &[u8] = include_bytes!("../tests/fixtures/test-only-rsa2-private.pem");
    const RSA2_PUBLIC: &[u8] = include_bytes!("../tests/fixtures/test-only-rsa2-public.pem");
    const ED_PRIVATE: &[u8] = include_bytes!("../tests/fixtures/test-only-ed25519-private.pem");
    const ED_PUBLIC: &[u8] = include_bytes!("../tests/fixtures/test-only-ed25519-public.pem");

    fn claims(sub: &str, exp: u64) -> Claims {
        Claims {
            sub: sub.into(),
            exp,
            iat: 0,
        }
    }

    fn sign(
        alg: Algorithm,
        kid: Option<&str>,
        key: &EncodingKey,
        claims: &impl Serialize,
    ) -> String {
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_owned);
        jsonwebtoken::encode(&header, claims, key).unwrap()
    }

    fn rs256(kid: Option<&str>, private: &[u8], claims: &impl Serialize) -> String {
        let key = EncodingKey::from_rsa_pem(private).unwrap();
        sign(Algorithm::RS256, kid, &key, claims)
    }

    fn eddsa(kid: Option<&str>, claims: &impl Serialize) -> String {
        let key = EncodingKey::from_ed_pem(ED_PRIVATE).unwrap();
        sign(Algorithm::EdDSA, kid, &key, claims)
    }

    fn later() -> u64 {
        now_secs() + 600
    }

    #[test]
    fn verifies_its_own_tokens_and_refuses_others() {
        let alice = UserId::parse("alice").unwrap();
        let token = mint_dev_token(b"s1", &alice, 60);
        let (user, _) = TokenVerifier::hs256(b"s1").verify(&token).unwrap();
        assert_eq!(user, alice);
        assert!(matches!(
            TokenVerifier::hs256(b"s2").verify(&token),
            Err(TokenError::Invalid(_))
        ));
        let old = mint_with_claims(b"s1", &claims("alice", now_secs() - 10));
        assert!(matches!(
            TokenVerifier::hs256(b"s1").verify(&old),
            Err(TokenError::Expired)
        ));
        let bad_sub = mint_with_claims(b"s1", &claims("a.b", now_secs() + 10));
        assert!(matches!(
            TokenVerifier::hs256(b"s1").verify(&bad_sub),
            Err(TokenError::BadSubject(_))
        ));
        assert!(TokenVerifier::hs256(b"s1").verify("not-a-jwt").is_err());
    }

    #[test]
    fn rs256_and_eddsa_tokens_verify_with_their_public_keys() {
        let rsa = TokenVerifier::rs256_pem(RSA_PUBLIC).unwrap();
        let (user, _) = rsa
            .verify(&rs256(None, RSA_PRIVATE, &claims("alice", later())))
            .unwrap();
        assert_eq!(user.as_str(), "alice");
        // Signed with another RSA key: the signature does not verify.
        assert!(matches!(
            rsa.verify(&rs256(None, RSA2_PRIVATE, &claims("alice", later()))),
            Err(TokenError::Invalid(_))
        ));
        let ed = TokenVerifier::eddsa_pem(ED_PUBLIC).unwrap();
        assert!(ed.verify(&eddsa(None, &claims("bob", later()))).is_ok());
        assert!(matches!(
            ed.verify(&rs256(None, RSA_PRIVATE, &claims("bob", later()))),
            Err(TokenError::WrongAlgorithm {
                token: "RS256",
                key: "EdDSA"
            })
        ));
    }

    /// The classic key confusion: the attacker knows the public key and signs an HS256 token
    /// with the PEM bytes as the HMAC secret, hoping the server verifies HS256 with "its key".
    #[test]
    fn hs256_signed_with_the_public_key_is_refused() {
        for (verifier, public) in [
            (TokenVerifier::rs256_pem(RSA_PUBLIC).unwrap(), RSA_PUBLIC),
            (TokenVerifier::eddsa_pem(ED_PUBLIC).unwrap(), ED_PUBLIC),
        ] {
            let forged = mint_with_claims(public, &claims("mallory", later()));
            let err = verifier.verify(&forged).unwrap_err();
            assert!(
                matches!(err, TokenError::WrongAlgorithm { token: "HS256", .. }),
                "{err}"
            );
        }
        // Also when it names the key's id.
        let keyed = TokenVerifier::new(
            vec![VerifyKey::rs256_pem(Some("k1".into()), RSA_PUBLIC).unwrap()],
            30,
        )
        .unwrap();
        let forged = mint_hs256(RSA_PUBLIC, Some("k1"), &claims("mallory", later()));
        assert!(matches!(
            keyed.verify(&forged),
            Err(TokenError::WrongAlgorithm {
                token: "HS256",
                key: "RS256"
            })
        ));
    }

    #[test]
    fn alg_none_is_refused() {
        let verifier = TokenVerifier::hs256(b"s1");
        let body = URL_SAFE_NO_PAD.encode(format!(r#"{{"sub":"alice","exp":{}}}"#, later()));
        for header in [
            r#"{"alg":"none","typ":"JWT"}"#,
            r#"{"alg":"None"}"#,
            r#"{"typ":"JWT"}"#,
        ] {
            let unsigned = format!("{}.{body}.", URL_SAFE_NO_PAD.encode(header));
            assert!(
                matches!(verifier.verify(&unsigned), Err(TokenError::Invalid(_))),
                "{header}"
            );
            // With a signature copied from a real token: still nothing to verify it with.
            let real = mint_dev_token(b"s1", &UserId::parse("alice").unwrap(), 60);
            let sig = real.rsplit('.').next().unwrap();
            assert!(
                verifier
                    .verify(&format!("{}.{body}.{sig}", URL_SAFE_NO_PAD.encode(header)))
                    .is_err()
            );
        }
    }

    #[test]
    fn exp_is_required() {
        let verifier = TokenVerifier::hs256(b"s1");
        let no_exp = mint_hs256(b"s1", None, &serde_json::json!({"sub": "alice"}));
        let err = verifier.verify(&no_exp).unwrap_err();
        assert!(
            matches!(&err, TokenError::MissingClaim(c) if c == "exp"),
            "{err}"
        );
        let no_sub = mint_hs256(b"s1", None, &serde_json::json!({"exp": later()}));
        assert!(matches!(verifier.verify(&no_sub), Err(TokenError::MissingClaim(c)) if c == "sub"));
        let text_exp = mint_hs256(b"s1", None, &serde_json::json!({"sub": "a", "exp": "soon"}));
        assert!(verifier.verify(&text_exp).is_err());
    }

    #[test]
    fn nbf_and_exp_allow_the_leeway_and_no_more() {
        let strict = TokenVerifier::hs256(b"s1");
        let lenient = TokenVerifier::hs256(b"s1").with_leeway(30);
        assert_eq!(lenient.leeway_secs(), 30);
        let now = now_secs();
        let token = |nbf: u64, exp: u64| {
            mint_hs256(
                b"s1",
                None,
                &serde_json::json!({"sub": "alice", "nbf": nbf, "exp": exp}),
            )
        };
        // nbf 10 s ahead (the issuer's clock runs fast): only within the leeway.
        let early = token(now + 10, now + 600);
        assert!(matches!(
            strict.verify(&early),
            Err(TokenError::NotYetValid)
        ));
        assert!(lenient.verify(&early).is_ok());
        let far = token(now + 120, now + 600);
        assert!(matches!(lenient.verify(&far), Err(TokenError::NotYetValid)));
        // exp 10 s ago: within the leeway; 120 s ago: expired.
        let late = token(now - 60, now - 10);
        assert!(matches!(strict.verify(&late), Err(TokenError::Expired)));
        assert!(lenient.verify(&late).is_ok());
        let stale = token(now - 600, now - 120);
        assert!(matches!(lenient.verify(&stale), Err(TokenError::Expired)));
        // A past nbf is fine.
        assert!(strict.verify(&token(now - 5, now + 600)).is_ok());
    }

    fn rotation_set() -> TokenVerifier {
        TokenVerifier::new(
            vec![
                VerifyKey::rs256_pem(Some("2024".into()), RSA_PUBLIC).unwrap(),
                VerifyKey::eddsa_pem(Some("2025".into()), ED_PUBLIC).unwrap(),
                VerifyKey::rs256_pem(Some("next".into()), RSA2_PUBLIC).unwrap(),
            ],
            30,
        )
        .unwrap()
    }

    #[test]
    fn kid_selects_the_key_and_its_algorithm() {
        let set = rotation_set();
        let c = claims("alice", later());
        assert!(set.verify(&rs256(Some("2024"), RSA_PRIVATE, &c)).is_ok());
        assert!(set.verify(&eddsa(Some("2025"), &c)).is_ok());
        assert!(set.verify(&rs256(Some("next"), RSA2_PRIVATE, &c)).is_ok());
        // The right algorithm under the wrong kid: that key's signature check fails.
        assert!(matches!(
            set.verify(&rs256(Some("next"), RSA_PRIVATE, &c)),
            Err(TokenError::Invalid(_))
        ));
        // A kid whose key has another algorithm: refused before any signature check.
        assert!(matches!(
            set.verify(&eddsa(Some("2024"), &c)),
            Err(TokenError::WrongAlgorithm {
                token: "EdDSA",
                key: "RS256"
            })
        ));
        let err = set
            .verify(&rs256(Some("1999"), RSA_PRIVATE, &c))
            .unwrap_err();
        assert!(
            matches!(&err, TokenError::UnknownKey(k) if k == "1999"),
            "{err}"
        );
        assert!(err.to_string().contains("\"1999\""), "{err}");
        let long = "k".repeat(1000);
        match set.verify(&rs256(Some(&long), RSA_PRIVATE, &c)) {
            Err(TokenError::UnknownKey(k)) => assert_eq!(k.len(), KID_ECHO_MAX),
            other => panic!("{other:?}"),
        }
        // Every key has a kid: a token without one is refused.
        assert!(matches!(
            set.verify(&rs256(None, RSA_PRIVATE, &c)),
            Err(TokenError::MissingKid)
        ));
    }

    #[test]
    fn a_token_without_kid_uses_the_key_without_kid() {
        let set = TokenVerifier::new(
            vec![
                VerifyKey::hs256(None, b"legacy"),
                VerifyKey::eddsa_pem(Some("new".into()), ED_PUBLIC).unwrap(),
            ],
            0,
        )
        .unwrap();
        let c = claims("alice", later());
        assert!(set.verify(&mint_with_claims(b"legacy", &c)).is_ok());
        assert!(set.verify(&eddsa(Some("new"), &c)).is_ok());
        // An EdDSA token without kid goes to the HS256 key, whose algorithm it is not.
        assert!(matches!(
            set.verify(&eddsa(None, &c)),
            Err(TokenError::WrongAlgorithm { .. })
        ));
        // A kid is never ignored, even when a key without kid exists.
        assert!(matches!(
            set.verify(&mint_hs256(b"legacy", Some("old"), &c)),
            Err(TokenError::UnknownKey(_))
        ));
    }

    #[test]
    fn key_sets_are_checked() {
        let hs = |kid: Option<&str>| VerifyKey::hs256(kid.map(str::to_owned), b"s");
        assert_eq!(
            TokenVerifier::new(vec![], 0).unwrap_err(),
            KeySetError::Empty
        );
        assert_eq!(
            TokenVerifier::new(vec![hs(Some("a")), hs(Some("a"))], 0).unwrap_err(),
            KeySetError::DuplicateKid("a".into())
        );
        assert_eq!(
            TokenVerifier::new(vec![hs(None), hs(None)], 0).unwrap_err(),
            KeySetError::SeveralWithoutKid(2)
        );
        assert_eq!(
            TokenVerifier::new(vec![hs(Some(""))], 0).unwrap_err(),
            KeySetError::EmptyKid
        );
        let set = TokenVerifier::new(vec![hs(None), hs(Some("b"))], 5).unwrap();
        let shown = format!("{set:?}");
        assert!(
            shown.contains("\"b\"") && shown.contains("HS256"),
            "{shown}"
        );
        assert_eq!(set.keys().count(), 2);
        assert!(VerifyKey::rs256_pem(None, b"not a pem").is_err());
        assert!(VerifyKey::eddsa_pem(None, RSA_PUBLIC).is_err());
    }
}
