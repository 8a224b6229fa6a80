//! Access tokens: JWTs whose `sub` is the user id and whose `exp` is enforced.
//!
//! Development uses an HS256 shared secret ([`mint_dev_token`]); production verifies RS256 or
//! EdDSA signatures with a public key and never holds a signing key.

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

/// Why a token was refused.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("token expired")]
    Expired,
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("token subject is not a valid user id: {0}")]
    BadSubject(#[from] IdError),
}

/// How tokens are verified.
#[derive(Clone)]
pub struct TokenVerifier {
    key: DecodingKey,
    validation: Validation,
}

/// Why a verification key could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("cannot load {alg} verification key: {source}")]
pub struct KeyError {
    alg: &'static str,
    source: jsonwebtoken::errors::Error,
}

impl TokenVerifier {
    fn with(key: DecodingKey, alg: Algorithm) -> Self {
        let mut validation = Validation::new(alg);
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Self { key, validation }
    }

    /// HS256 with a shared secret (development).
    pub fn hs256(secret: &[u8]) -> Self {
        Self::with(DecodingKey::from_secret(secret), Algorithm::HS256)
    }

    /// RS256 with a PEM public key (production).
    pub fn rs256_pem(pem: &[u8]) -> Result<Self, KeyError> {
        let key = DecodingKey::from_rsa_pem(pem).map_err(|source| KeyError {
            alg: "RS256",
            source,
        })?;
        Ok(Self::with(key, Algorithm::RS256))
    }

    /// EdDSA (Ed25519) with a PEM public key (production).
    pub fn eddsa_pem(pem: &[u8]) -> Result<Self, KeyError> {
        let key = DecodingKey::from_ed_pem(pem).map_err(|source| KeyError {
            alg: "EdDSA",
            source,
        })?;
        Ok(Self::with(key, Algorithm::EdDSA))
    }

    /// Verifies signature, algorithm and `exp`, and validates `sub` as a user id.
    pub fn verify(&self, token: &str) -> Result<(UserId, Claims), TokenError> {
        use jsonwebtoken::errors::ErrorKind;
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(
            |e| match e.kind() {
                ErrorKind::ExpiredSignature => TokenError::Expired,
                _ => TokenError::Invalid(e.to_string()),
            },
        )?;
        let user = UserId::parse(&data.claims.sub)?;
        Ok((user, data.claims))
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
    let now = now_secs();
    mint_with_claims(
        secret,
        &Claims {
            sub: user.to_string(),
            iat: now,
            exp: now + ttl_secs,
        },
    )
}

/// Mints an HS256 token with arbitrary claims (tests use it for expired tokens).
pub fn mint_with_claims(secret: &[u8], claims: &Claims) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret),
    )
    .expect("HS256 encoding cannot fail")
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let old = mint_with_claims(
            b"s1",
            &Claims {
                sub: "alice".into(),
                exp: now_secs() - 10,
                iat: 0,
            },
        );
        assert!(matches!(
            TokenVerifier::hs256(b"s1").verify(&old),
            Err(TokenError::Expired)
        ));
        let bad_sub = mint_with_claims(
            b"s1",
            &Claims {
                sub: "a.b".into(),
                exp: now_secs() + 10,
                iat: 0,
            },
        );
        assert!(matches!(
            TokenVerifier::hs256(b"s1").verify(&bad_sub),
            Err(TokenError::BadSubject(_))
        ));
        assert!(TokenVerifier::hs256(b"s1").verify("not-a-jwt").is_err());
    }
}
