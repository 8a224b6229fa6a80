//! Media messages: a `send` with `media` references an upload of the media service. Before
//! such a send is published, the gateway asks the media service (`chat.api.media.verify`, core
//! NATS request/reply) whether the upload exists in the object store with the declared size and
//! content type and was made by the sender for this conversation; the media service records
//! the reference, so the upload is never cleaned up as an orphan. A refusal is answered with
//! an `error` frame (the send's `id` and `conv`, code `media_not_found`, `media_mismatch` or
//! `unavailable`) and nothing is published.
//!
//! The check runs inline in the connection's reader, after the send rate limit and before the
//! publish, so the sender's messages keep their order; it is bounded by `history_timeout_ms`.

use chat_protocol::{
    api::{Inbound, MediaVerifyReply, MediaVerifyRequest},
    frames::{ErrorCode, MediaRef},
    ids::{ConvId, UserId},
};

use crate::backend::{Backend, BackendError};

/// Counter, label `result` (`ok`, `media_not_found`, `media_mismatch`, `invalid_frame`,
/// `unavailable`): media messages checked with the media service.
pub const MEDIA_VERIFICATIONS: &str = "gateway_media_verifications_total";

const UNAVAILABLE: &str = "the media could not be checked right now; retry with the same id";

/// The shape of a send's `media` (ids, content type, size); `invalid_frame` otherwise.
pub(crate) fn check_shape(media: Option<&MediaRef>) -> Result<(), (ErrorCode, String)> {
    match media.map(MediaRef::check) {
        Some(Err(message)) => Err((ErrorCode::InvalidFrame, message)),
        _ => Ok(()),
    }
}

/// Asks the media service to check and claim the upload of a send with `media`; sends without
/// media (and other frames) pass at once.
pub(crate) async fn verify<B: Backend>(
    backend: &B,
    conv: &ConvId,
    user: &UserId,
    inbound: &Inbound,
) -> Result<(), (ErrorCode, String)> {
    let Inbound::Send(message) = inbound else {
        return Ok(());
    };
    let Some(media) = &message.media else {
        return Ok(());
    };
    let request = MediaVerifyRequest {
        conv: conv.to_string(),
        user: user.to_string(),
        id: message.id.clone(),
        media: media.clone(),
    };
    let outcome = match backend.request(&request).await {
        Ok(MediaVerifyReply::Ok) => Ok(()),
        Ok(MediaVerifyReply::Error(e)) => Err((e.code, e.message)),
        Err(err) => {
            tracing::warn!(conv = %conv, error = %err, "media verification failed");
            let code = match err {
                BackendError::BadReply(_) => ErrorCode::Internal,
                _ => ErrorCode::Unavailable,
            };
            Err((code, UNAVAILABLE.to_owned()))
        }
    };
    let result = match &outcome {
        Ok(()) => "ok",
        Err((code, _)) => code.as_str(),
    };
    ::metrics::counter!(MEDIA_VERIFICATIONS, "result" => result).increment(1);
    outcome
}
