//! Why an API request was refused: an HTTP status plus a JSON body
//! `{"code": "...", "message": "..."}` whose `code` is documented (`docs/protocol.md`, "Media").
//! Causes of `unavailable` are logged, never sent.

use axum::{
    Json,
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde::Serialize;
use utoipa::ToSchema;

/// The body of every error answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// One of the documented codes; clients branch on it.
    pub code: &'static str,
    /// For humans; not stable.
    pub message: String,
    /// With `rate_limited`: when to retry.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Unauthorized(String),
    #[error("access token expired")]
    TokenExpired,
    #[error("too many requests; retry later")]
    RateLimited { retry_after_ms: u64 },
    #[error("{0}")]
    InvalidRequest(String),
    #[error("you are not a member of this conversation")]
    NotMember,
    #[error("upload of {size} bytes would exceed your quota ({used} of {quota} bytes in use)")]
    QuotaExceeded { size: u64, used: u64, quota: u64 },
    #[error("no such media")]
    NotFound,
    #[error("{0}")]
    WrongState(String),
    #[error("{0}")]
    Incomplete(String),
    #[error("{size} bytes is more than the limit of {max} bytes{hint}")]
    TooLarge {
        size: u64,
        max: u64,
        hint: &'static str,
    },
    #[error("content type {0} is not allowed")]
    UnsupportedType(String),
    #[error("the service is unavailable right now; retry with backoff")]
    Unavailable(#[source] anyhow::Error),
}

impl ApiError {
    pub fn unavailable(err: impl Into<anyhow::Error>) -> Self {
        Self::Unavailable(err.into())
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::Unauthorized(_) | Self::TokenExpired => StatusCode::UNAUTHORIZED,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::InvalidRequest(_) => StatusCode::BAD_REQUEST,
            Self::NotMember | Self::QuotaExceeded { .. } => StatusCode::FORBIDDEN,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::WrongState(_) | Self::Incomplete(_) => StatusCode::CONFLICT,
            Self::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Self::Unauthorized(_) => "unauthorized",
            Self::TokenExpired => "token_expired",
            Self::RateLimited { .. } => "rate_limited",
            Self::InvalidRequest(_) => "invalid_request",
            Self::NotMember => "not_member",
            Self::QuotaExceeded { .. } => "quota_exceeded",
            Self::NotFound => "not_found",
            Self::WrongState(_) => "wrong_state",
            Self::Incomplete(_) => "incomplete",
            Self::TooLarge { .. } => "too_large",
            Self::UnsupportedType(_) => "unsupported_type",
            Self::Unavailable(_) => "unavailable",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = self.code();
        metrics::counter!(crate::metrics::HTTP_ERRORS, "code" => code).increment(1);
        if let Self::Unavailable(err) = &self {
            tracing::warn!(error = format!("{err:#}"), "request failed");
        }
        let retry_after_ms = match self {
            Self::RateLimited { retry_after_ms } => Some(retry_after_ms),
            _ => None,
        };
        let body = ErrorBody {
            code,
            message: self.to_string(),
            retry_after_ms,
        };
        let mut response = (self.status(), Json(body)).into_response();
        if let Some(ms) = retry_after_ms {
            chat_common::http::set_retry_after(&mut response, ms);
        }
        response
    }
}
