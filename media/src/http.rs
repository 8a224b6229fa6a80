//! The HTTP API. Every route is registered through its `#[utoipa::path]` annotation
//! (`utoipa_axum::routes!`), so the OpenAPI document served at `/openapi.json` lists exactly the
//! routes the router serves, with the statuses each documents; the integration tests reach
//! every documented status and schemathesis checks that nothing else comes back.

use std::{num::NonZeroU32, sync::Arc};

use axum::{
    Json,
    extract::{FromRequest, FromRequestParts, Path, Request, State, rejection::PathRejection},
    http::{StatusCode, header::AUTHORIZATION, request::Parts},
    response::IntoResponse,
    routing::get,
};
use chat_protocol::{
    auth::{TokenError, TokenVerifier},
    ids::UserId,
};
use governor::{DefaultKeyedRateLimiter, Quota, clock::Clock};
use serde::de::DeserializeOwned;
use utoipa::{
    Modify, OpenApi,
    openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme},
};
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{
    api::{
        DownloadTicket, MultipartTicket, PartUrls, PartUrlsRequest, UploadRequest, UploadStatus,
        UploadTicket,
    },
    error::{ApiError, ErrorBody},
    service::Service,
};

/// Everything a request needs; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    service: Arc<Service>,
    verifier: TokenVerifier,
    limiter: DefaultKeyedRateLimiter<UserId>,
}

impl AppState {
    pub fn new(service: Arc<Service>, verifier: TokenVerifier) -> Self {
        let c = &service.config;
        let per_second = NonZeroU32::new(c.requests_per_second).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(c.request_burst).unwrap_or(NonZeroU32::MIN);
        let limiter =
            DefaultKeyedRateLimiter::keyed(Quota::per_second(per_second).allow_burst(burst));
        Self {
            inner: Arc::new(Inner {
                service,
                verifier,
                limiter,
            }),
        }
    }

    fn service(&self) -> &Service {
        &self.inner.service
    }

    /// Forgets rate limiter state of users idle long enough to be back at full burst.
    pub fn prune_rate_limits(&self) {
        self.inner.limiter.retain_recent();
        self.inner.limiter.shrink_to_fit();
    }
}

/// The authenticated caller: a valid bearer token within the user's request rate.
pub struct Caller(pub UserId);

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = parts
            .headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(|| {
                ApiError::Unauthorized("no access token (use Authorization: Bearer <jwt>)".into())
            })?;
        let (user, _) = state.inner.verifier.verify(token).map_err(|e| match e {
            TokenError::Expired => ApiError::TokenExpired,
            _ => ApiError::Unauthorized("invalid access token".into()),
        })?;
        let limiter = &state.inner.limiter;
        if let Err(not_until) = limiter.check_key(&user) {
            let wait = not_until.wait_time_from(limiter.clock().now());
            let retry_after_ms = u64::try_from(wait.as_micros().div_ceil(1000))
                .unwrap_or(u64::MAX)
                .max(1);
            return Err(ApiError::RateLimited { retry_after_ms });
        }
        Ok(Caller(user))
    }
}

/// A JSON body; any problem with it is `400 invalid_request`.
pub struct Body<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Body(v)),
            Err(rejection) => Err(ApiError::InvalidRequest(rejection.body_text())),
        }
    }
}

fn media_id(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    path.map(|Path(id)| id)
        .map_err(|e| ApiError::InvalidRequest(e.body_text()))
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "chat media API",
        version = "1",
        description = "Presigned uploads and downloads of chat media. Every request carries \
                       `Authorization: Bearer <jwt>` (the gateway's tokens). Errors are JSON \
                       `{\"code\", \"message\"}`; see docs/protocol.md, \"Media\"."
    ),
    modifiers(&BearerAuth),
    tags((name = "uploads"), (name = "downloads"))
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
    }
}

/// Every API route, each registered with its OpenAPI operation.
fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(create_upload))
        .routes(routes!(create_multipart))
        .routes(routes!(upload_status, delete_upload))
        .routes(routes!(part_urls))
        .routes(routes!(complete_upload))
        .routes(routes!(download))
}

/// The OpenAPI document of the API (what `/openapi.json` serves).
pub fn openapi() -> utoipa::openapi::OpenApi {
    routes().into_openapi()
}

/// The router and the OpenAPI document describing it. `/openapi.json` serves the document.
pub fn app(state: AppState) -> (axum::Router, utoipa::openapi::OpenApi) {
    let (router, doc) = routes().with_state(state).split_for_parts();
    let json = doc.to_pretty_json().expect("the OpenAPI document encodes");
    let router = router.route(
        "/openapi.json",
        get(move || async move {
            (
                [(axum::http::header::CONTENT_TYPE, "application/json")],
                json.clone(),
            )
        }),
    );
    (router, doc)
}

/// Request an upload with one presigned PUT.
///
/// The answer's `upload` is a PUT of exactly `size` bytes with exactly `content_type`: both
/// headers are signed, so the object store refuses anything else.
#[utoipa::path(
    post, path = "/v1/uploads", tag = "uploads",
    request_body = UploadRequest,
    security(("bearer" = [])),
    responses(
        (status = 201, description = "Upload URL issued", body = UploadTicket),
        (status = 400, description = "`invalid_request`: malformed body, conversation id, content type or size", body = ErrorBody),
        (status = 401, description = "`unauthorized` or `token_expired`", body = ErrorBody),
        (status = 403, description = "`not_member` of the conversation, or `quota_exceeded`", body = ErrorBody),
        (status = 413, description = "`too_large`: over `max_single_upload_bytes` (use multipart)", body = ErrorBody),
        (status = 415, description = "`unsupported_type`: not on the allow-list", body = ErrorBody),
        (status = 429, description = "`rate_limited`", body = ErrorBody),
        (status = 503, description = "`unavailable`: retry with backoff", body = ErrorBody),
    )
)]
async fn create_upload(
    State(state): State<AppState>,
    Caller(user): Caller,
    Body(req): Body<UploadRequest>,
) -> Result<impl IntoResponse, ApiError> {
    let ticket = state.service().create_upload(&user, req).await?;
    Ok((StatusCode::CREATED, Json(ticket)))
}

/// Start a multipart upload (large files, resumable).
#[utoipa::path(
    post, path = "/v1/uploads/multipart", tag = "uploads",
    request_body = UploadRequest,
    security(("bearer" = [])),
    responses(
        (status = 201, description = "Multipart upload started", body = MultipartTicket),
        (status = 400, description = "`invalid_request`", body = ErrorBody),
        (status = 401, description = "`unauthorized` or `token_expired`", body = ErrorBody),
        (status = 403, description = "`not_member` or `quota_exceeded`", body = ErrorBody),
        (status = 413, description = "`too_large`: over `max_upload_bytes`", body = ErrorBody),
        (status = 415, description = "`unsupported_type`", body = ErrorBody),
        (status = 429, description = "`rate_limited`", body = ErrorBody),
        (status = 503, description = "`unavailable`", body = ErrorBody),
    )
)]
async fn create_multipart(
    State(state): State<AppState>,
    Caller(user): Caller,
    Body(req): Body<UploadRequest>,
) -> Result<impl IntoResponse, ApiError> {
    let ticket = state.service().create_multipart(&user, req).await?;
    Ok((StatusCode::CREATED, Json(ticket)))
}

/// An upload's state; for multipart uploads, which parts the store has (to resume).
#[utoipa::path(
    get, path = "/v1/uploads/{media_id}", tag = "uploads",
    params(("media_id" = String, Path, description = "The media id", pattern = "^[0-9a-f]{32}$")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The upload", body = UploadStatus),
        (status = 400, description = "`invalid_request`: not a media id", body = ErrorBody),
        (status = 401, description = "`unauthorized` or `token_expired`", body = ErrorBody),
        (status = 404, description = "`not_found`: no such upload of the caller", body = ErrorBody),
        (status = 429, description = "`rate_limited`", body = ErrorBody),
        (status = 503, description = "`unavailable`", body = ErrorBody),
    )
)]
async fn upload_status(
    State(state): State<AppState>,
    Caller(user): Caller,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<UploadStatus>, ApiError> {
    let id = media_id(path)?;
    Ok(Json(state.service().status(&user, &id).await?))
}

/// Abort or delete an upload no message references: the store keeps nothing of it.
#[utoipa::path(
    delete, path = "/v1/uploads/{media_id}", tag = "uploads",
    params(("media_id" = String, Path, description = "The media id", pattern = "^[0-9a-f]{32}$")),
    security(("bearer" = [])),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "`invalid_request`: not a media id", body = ErrorBody),
        (status = 401, description = "`unauthorized` or `token_expired`", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
        (status = 409, description = "`wrong_state`: a message references it", body = ErrorBody),
        (status = 429, description = "`rate_limited`", body = ErrorBody),
        (status = 503, description = "`unavailable`", body = ErrorBody),
    )
)]
async fn delete_upload(
    State(state): State<AppState>,
    Caller(user): Caller,
    path: Result<Path<String>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    let id = media_id(path)?;
    state.service().abort(&user, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Presigned PUTs for parts of a multipart upload (each of its exact size).
#[utoipa::path(
    post, path = "/v1/uploads/{media_id}/parts", tag = "uploads",
    params(("media_id" = String, Path, description = "The media id", pattern = "^[0-9a-f]{32}$")),
    request_body = PartUrlsRequest,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Part URLs", body = PartUrls),
        (status = 400, description = "`invalid_request`: bad media id or part numbers", body = ErrorBody),
        (status = 401, description = "`unauthorized` or `token_expired`", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
        (status = 409, description = "`wrong_state`: not multipart, or already completed", body = ErrorBody),
        (status = 429, description = "`rate_limited`", body = ErrorBody),
        (status = 503, description = "`unavailable`", body = ErrorBody),
    )
)]
async fn part_urls(
    State(state): State<AppState>,
    Caller(user): Caller,
    path: Result<Path<String>, PathRejection>,
    Body(req): Body<PartUrlsRequest>,
) -> Result<Json<PartUrls>, ApiError> {
    let id = media_id(path)?;
    Ok(Json(
        state
            .service()
            .part_urls(&user, &id, &req.part_numbers)
            .await?,
    ))
}

/// Complete a multipart upload once the store has every part.
#[utoipa::path(
    post, path = "/v1/uploads/{media_id}/complete", tag = "uploads",
    params(("media_id" = String, Path, description = "The media id", pattern = "^[0-9a-f]{32}$")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Completed (also when it already was)", body = UploadStatus),
        (status = 400, description = "`invalid_request`: not a media id", body = ErrorBody),
        (status = 401, description = "`unauthorized` or `token_expired`", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
        (status = 409, description = "`incomplete`: parts missing; or `wrong_state`: not multipart", body = ErrorBody),
        (status = 429, description = "`rate_limited`", body = ErrorBody),
        (status = 503, description = "`unavailable`", body = ErrorBody),
    )
)]
async fn complete_upload(
    State(state): State<AppState>,
    Caller(user): Caller,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<UploadStatus>, ApiError> {
    let id = media_id(path)?;
    Ok(Json(state.service().complete(&user, &id).await?))
}

/// A short-lived download URL, for members of the media's conversation.
#[utoipa::path(
    get, path = "/v1/media/{media_id}", tag = "downloads",
    params(("media_id" = String, Path, description = "The media id (a message's `media.id`)", pattern = "^[0-9a-f]{32}$")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Download URL issued", body = DownloadTicket),
        (status = 400, description = "`invalid_request`: not a media id", body = ErrorBody),
        (status = 401, description = "`unauthorized` or `token_expired`", body = ErrorBody),
        (status = 403, description = "`not_member` of the media's conversation", body = ErrorBody),
        (status = 404, description = "`not_found`: no such media, or no message references it yet", body = ErrorBody),
        (status = 429, description = "`rate_limited`", body = ErrorBody),
        (status = 503, description = "`unavailable`", body = ErrorBody),
    )
)]
async fn download(
    State(state): State<AppState>,
    Caller(user): Caller,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<DownloadTicket>, ApiError> {
    let id = media_id(path)?;
    Ok(Json(state.service().download(&user, &id).await?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every operation is authenticated and rate limited and depends on the bucket, so each
    /// documents 401, 429 and 503 besides its own answers; every error answer is `ErrorBody`.
    #[test]
    fn every_operation_documents_the_statuses_every_request_can_get() {
        let doc = serde_json::to_value(openapi()).unwrap();
        assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
        assert_eq!(
            doc["components"]["securitySchemes"]["bearer"]["scheme"],
            "bearer"
        );
        let paths = doc["paths"].as_object().unwrap();
        let mut operations = 0;
        for (path, item) in paths {
            for (method, op) in item.as_object().unwrap() {
                operations += 1;
                let responses = op["responses"].as_object().unwrap();
                for status in ["401", "429", "503"] {
                    assert!(
                        responses.contains_key(status),
                        "{method} {path} lacks {status}"
                    );
                }
                assert!(op["security"][0].get("bearer").is_some(), "{method} {path}");
                for (status, r) in responses {
                    if status.starts_with('4') || status.starts_with('5') {
                        let schema = &r["content"]["application/json"]["schema"]["$ref"];
                        assert_eq!(
                            schema, "#/components/schemas/ErrorBody",
                            "{method} {path} {status}"
                        );
                    }
                }
            }
        }
        assert_eq!(operations, 7, "{:?}", paths.keys().collect::<Vec<_>>());
    }
}
