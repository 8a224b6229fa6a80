//! Why an upgrade to WebSocket was refused: an HTTP status plus a JSON body
//! `{"code": "...", "message": "..."}` with a documented [`ErrorCode`]. Internals are logged,
//! never sent.

use axum::{
    Json,
    http::StatusCode,
    response::{IntoResponse, Response},
};
use chat_protocol::{auth::TokenError, frames::ErrorCode, ids::IdError};

use crate::metrics;

/// An upgrade refused before the WebSocket opened.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("no access token (use `?token=` or `Authorization: Bearer`)")]
    MissingToken,
    #[error("invalid access token{}", token_reason(.0))]
    InvalidToken(#[source] TokenError),
    #[error("access token expired")]
    TokenExpired,
    #[error("invalid device id: {0}")]
    InvalidDevice(#[source] IdError),
    #[error("too many connections for this user")]
    TooManyConnections,
    /// The gateway is at `max_handshakes` handshakes in progress or `max_connections` connections.
    #[error("the gateway is at capacity; retry after {retry_after_s} s, with jittered backoff")]
    Overloaded { retry_after_s: u64 },
    /// The client's address used up its failed authentications (`abuse.auth_failures_per_minute`).
    #[error("too many failed authentications from this address; retry after {retry_after_ms} ms")]
    TooManyAuthFailures { retry_after_ms: u64 },
    #[error("service temporarily unavailable")]
    Unavailable(#[source] anyhow::Error),
}

impl UpgradeError {
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::MissingToken | Self::InvalidToken(_) => ErrorCode::Unauthorized,
            Self::TokenExpired => ErrorCode::TokenExpired,
            Self::InvalidDevice(_) => ErrorCode::InvalidId,
            Self::TooManyConnections => ErrorCode::TooManyConnections,
            Self::Overloaded { .. } => ErrorCode::Overloaded,
            Self::TooManyAuthFailures { .. } => ErrorCode::RateLimited,
            Self::Unavailable(_) => ErrorCode::Unavailable,
        }
    }

    /// Whether the refusal is a failed authentication (counted per client address).
    pub fn is_auth_failure(&self) -> bool {
        matches!(
            self,
            Self::MissingToken | Self::InvalidToken(_) | Self::TokenExpired
        )
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::MissingToken | Self::InvalidToken(_) | Self::TokenExpired => {
                StatusCode::UNAUTHORIZED
            }
            Self::InvalidDevice(_) => StatusCode::BAD_REQUEST,
            Self::TooManyConnections | Self::TooManyAuthFailures { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            Self::Overloaded { .. } | Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

impl From<TokenError> for UpgradeError {
    fn from(err: TokenError) -> Self {
        match err {
            TokenError::Expired => Self::TokenExpired,
            other => Self::InvalidToken(other),
        }
    }
}

impl IntoResponse for UpgradeError {
    fn into_response(self) -> Response {
        let code = self.code();
        match &self {
            Self::Unavailable(source) => {
                tracing::warn!(error = %format!("{source:#}"), "upgrade refused, backend unavailable")
            }
            Self::InvalidToken(source) => {
                tracing::debug!(code = code.as_str(), error = %source, "upgrade refused")
            }
            _ => tracing::debug!(code = code.as_str(), "upgrade refused"),
        }
        ::metrics::counter!(metrics::UPGRADE_REJECTIONS, "code" => code.as_str()).increment(1);
        // The Display strings above are written for clients: they name the problem, not the
        // internals (those stay in `source`, which is only logged).
        let mut body = serde_json::json!({ "code": code, "message": self.to_string() });
        let retry_after_ms = match self {
            Self::TooManyAuthFailures { retry_after_ms } => Some(retry_after_ms),
            Self::Overloaded { retry_after_s } => Some(retry_after_s.saturating_mul(1000)),
            _ => None,
        };
        if let Some(ms) = retry_after_ms {
            body["retry_after_ms"] = ms.into();
        }
        let mut response = (self.status(), Json(body)).into_response();
        if let Some(ms) = retry_after_ms {
            chat_common::http::set_retry_after(&mut response, ms);
        }
        response
    }
}

/// What a client may learn of why its token was refused: the checks of this project
/// (unknown key id, algorithm, `nbf`, missing claims, subject), not the JWT library's
/// internals (a bad signature or encoding is just "invalid").
fn token_reason(err: &TokenError) -> String {
    match err {
        TokenError::Invalid(_) => String::new(),
        other => format!(": {other}"),
    }
}

#[cfg(test)]
mod tests {
    use axum::http::header::RETRY_AFTER;

    use super::*;

    #[tokio::test]
    async fn responses_carry_status_and_code_without_internals() {
        let err = UpgradeError::Unavailable(anyhow::anyhow!("nats at 10.0.0.7 refused"));
        let resp = err.into_response();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        let body = axum::body::to_bytes(resp.into_body(), 1024).await.unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["code"], "unavailable");
        assert!(!v["message"].as_str().unwrap().contains("10.0.0.7"));

        let expired: UpgradeError = TokenError::Expired.into();
        assert_eq!(expired.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(expired.code(), ErrorCode::TokenExpired);
        assert_eq!(
            UpgradeError::TooManyConnections.status(),
            StatusCode::TOO_MANY_REQUESTS
        );
        let resp = UpgradeError::Overloaded { retry_after_s: 2 }.into_response();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(resp.headers()[RETRY_AFTER], "2");
        let body = axum::body::to_bytes(resp.into_body(), 1024).await.unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["code"], "overloaded");
    }

    #[tokio::test]
    async fn auth_failure_refusals_say_when_to_retry() {
        let resp = UpgradeError::TooManyAuthFailures {
            retry_after_ms: 2500,
        }
        .into_response();
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(resp.headers()[RETRY_AFTER], "3");
        let body = axum::body::to_bytes(resp.into_body(), 1024).await.unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            (v["code"].as_str(), v["retry_after_ms"].as_u64()),
            (Some("rate_limited"), Some(2500))
        );
    }

    #[test]
    fn token_refusals_name_the_project_checks_not_the_library_internals() {
        let unknown: UpgradeError = TokenError::UnknownKey("k9".into()).into();
        assert_eq!(unknown.code(), ErrorCode::Unauthorized);
        assert!(unknown.to_string().contains("\"k9\""), "{unknown}");
        assert!(unknown.is_auth_failure());
        let internal: UpgradeError =
            TokenError::Invalid("InvalidSignature at byte 7".into()).into();
        assert_eq!(internal.to_string(), "invalid access token");
        assert!(!UpgradeError::TooManyConnections.is_auth_failure());
    }
}
