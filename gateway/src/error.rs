//! Why an upgrade to WebSocket was refused: an HTTP status plus a JSON body
//! `{"code": "...", "message": "..."}` with a documented [`ErrorCode`]. Internals are logged,
//! never sent.

use axum::{
    Json,
    http::{HeaderValue, StatusCode, header::RETRY_AFTER},
    response::{IntoResponse, Response},
};
use chat_protocol::{auth::TokenError, frames::ErrorCode, ids::IdError};

use crate::metrics;

/// An upgrade refused before the WebSocket opened.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("no access token (use `?token=` or `Authorization: Bearer`)")]
    MissingToken,
    #[error("invalid access token")]
    InvalidToken(#[source] TokenError),
    #[error("access token expired")]
    TokenExpired,
    #[error("invalid device id: {0}")]
    InvalidDevice(#[source] IdError),
    #[error("too many connections for this user")]
    TooManyConnections,
    #[error("the gateway is at capacity; retry after {retry_after_s} s, with jittered backoff")]
    Overloaded { retry_after_s: u64 },
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
            Self::Unavailable(_) => ErrorCode::Unavailable,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::MissingToken | Self::InvalidToken(_) | Self::TokenExpired => {
                StatusCode::UNAUTHORIZED
            }
            Self::InvalidDevice(_) => StatusCode::BAD_REQUEST,
            Self::TooManyConnections => StatusCode::TOO_MANY_REQUESTS,
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
        let body = serde_json::json!({ "code": code, "message": self.to_string() });
        let mut response = (self.status(), Json(body)).into_response();
        if let Self::Overloaded { retry_after_s } = self {
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(retry_after_s));
        }
        response
    }
}

#[cfg(test)]
mod tests {
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
}
