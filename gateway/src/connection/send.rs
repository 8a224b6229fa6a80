//! The per-message path: `send` and `group` frames (published to `CHAT_IN` with their dedupe
//! id, answered `sent` once JetStream stored them) and `delivered`/`read` receipts (published
//! without one, answered only when they fail).
//!
//! Each frame is checked first (ids, body size, what the gateway can know of membership, the
//! user's rate); a refusal is an `error` frame with the frame's `id` (or `conv`) and nothing
//! reaches NATS. The publish itself runs before the next frame is read, so a sender's messages
//! keep their order; its JetStream ack is awaited in flight, beside later frames.

use chat_protocol::{
    api::{self, Inbound, InboundGroup, InboundMessage, InboundReceipt},
    frames::{ErrorCode, ErrorFrame, GroupOp, MediaRef, ServerFrame},
    ids::ConvId,
};
use futures::FutureExt;
use tokio::time::{Instant, timeout_at};

use super::{
    Ctx, Step, encode,
    validate::{NOT_MEMBER, check_group_op, check_message_ids, check_rate, may_be_member},
};
use crate::{
    backend::{Backend, BackendError, PendingAck},
    metrics,
};

const UNAVAILABLE: &str = "the message could not be stored right now; retry with the same id";
const RECEIPT_UNAVAILABLE: &str = "the receipt could not be stored right now; send it again";

/// An error answering send `id` in `conv`.
fn send_error(
    code: ErrorCode,
    message: impl Into<String>,
    id: String,
    conv: String,
    retry_after_ms: Option<u64>,
) -> ServerFrame {
    metrics::send_error(code);
    let mut frame = ErrorFrame::new(code, message);
    frame.id = Some(id);
    frame.conv = Some(conv);
    frame.retry_after_ms = retry_after_ms;
    ServerFrame::Error(frame)
}

/// An error answering a receipt in `conv`.
fn receipt_error(
    code: ErrorCode,
    message: impl Into<String>,
    conv: String,
    retry_after_ms: Option<u64>,
) -> ServerFrame {
    let mut frame = ErrorFrame::new(code, message);
    frame.conv = Some(conv);
    frame.retry_after_ms = retry_after_ms;
    ServerFrame::Error(frame)
}

/// Validates a send, then publishes it to `CHAT_IN`; `sent` follows when JetStream acks.
pub(super) fn on_send<B: Backend>(
    ctx: &Ctx<B>,
    conv: String,
    id: String,
    body: String,
    media: Option<MediaRef>,
) -> Step {
    let (settings, session) = (&ctx.shared.settings, &*ctx.session);
    let conv_id = match check_message_ids(&conv, &id) {
        Ok(conv_id) => conv_id,
        Err(message) => {
            return ctx.reply(send_error(ErrorCode::InvalidId, message, id, conv, None));
        }
    };
    if body.len() > settings.max_body_bytes {
        let message = format!(
            "body is {} bytes; the limit is {}",
            body.len(),
            settings.max_body_bytes
        );
        return ctx.reply(send_error(ErrorCode::BodyTooLarge, message, id, conv, None));
    }
    if !may_be_member(&conv_id, &session.user) {
        return ctx.reply(send_error(ErrorCode::NotMember, NOT_MEMBER, id, conv, None));
    }
    if let Err((code, message)) = crate::media::check_shape(media.as_ref()) {
        return ctx.reply(send_error(code, message, id, conv, None));
    }
    let inbound = Inbound::Send(InboundMessage {
        conv: conv.clone(),
        from: session.user.to_string(),
        device: session.device.to_string(),
        id: id.clone(),
        body,
        ts: chat_protocol::now_ms(),
        media,
    });
    submit(ctx, conv_id, conv, id, inbound)
}

/// Validates a `group` frame, then publishes it to `CHAT_IN` like a send (same rate limit,
/// dedupe id and `sent`). Whether the user may make the change is the sequencer's to decide:
/// its refusal comes as an `error` with the `id` after `sent`.
pub(super) fn on_group<B: Backend>(
    ctx: &Ctx<B>,
    op: GroupOp,
    conv: String,
    id: String,
    name: Option<String>,
    members: Vec<String>,
) -> Step {
    let conv_id = match check_message_ids(&conv, &id) {
        Ok(conv_id) => conv_id,
        Err(message) => {
            return ctx.reply(send_error(ErrorCode::InvalidId, message, id, conv, None));
        }
    };
    if let Err((code, message)) = check_group_op(&conv_id, op, name.as_deref(), &members) {
        return ctx.reply(send_error(code, message, id, conv, None));
    }
    let session = &*ctx.session;
    let inbound = Inbound::Group(InboundGroup {
        conv: conv.clone(),
        from: session.user.to_string(),
        device: session.device.to_string(),
        id: id.clone(),
        op,
        name,
        members,
    });
    submit(ctx, conv_id, conv, id, inbound)
}

/// The common tail of `send` and `group`: the user's send rate, abuse budgets (`limits.rs`),
/// the media check (sends with `media`), then the publish to `CHAT_IN` with `Nats-Msg-Id` = [`api::dedupe_id`]; `sent`
/// (with the gateway's receive time) once JetStream stored it, `unavailable` otherwise.
fn submit<B: Backend>(
    ctx: &Ctx<B>,
    conv_id: ConvId,
    conv: String,
    id: String,
    inbound: Inbound,
) -> Step {
    let user = &ctx.session.user;
    if let Err(retry_ms) = check_rate(&ctx.shared.limiter, user) {
        let message = "send rate exceeded; retry later with the same id";
        return ctx.reply(send_error(
            ErrorCode::RateLimited,
            message,
            id,
            conv,
            Some(retry_ms),
        ));
    }
    let (shared, outbox, user) = (ctx.shared.clone(), ctx.outbox.clone(), user.clone());
    Step::Wait(
        async move {
            // The user's abuse budgets (groups, members, new conversations), shared by every
            // gateway: nothing over a budget is published.
            let limits = &shared.user_limits;
            if let Err(r) =
                crate::limits::admit(&shared.backend, limits, &user, &conv_id, &inbound).await
            {
                let frame = send_error(r.code, r.message, id, conv, r.retry_after_ms);
                outbox.push(encode(&frame))?;
                return Ok(None);
            }
            // A media message is published only once the media service confirmed its upload.
            if let Err((code, message)) =
                crate::media::verify(&shared.backend, &conv_id, &user, &inbound).await
            {
                outbox.push(encode(&send_error(code, message, id, conv, None)))?;
                return Ok(None);
            }
            let ts = match &inbound {
                Inbound::Send(m) => m.ts,
                _ => chat_protocol::now_ms(),
            };
            let msg_id = api::dedupe_id(conv_id.as_str(), user.as_str(), &id);
            let payload = serde_json::to_vec(&inbound).expect("inbound messages always serialize");
            // From now on the sequencer may answer this send: its answer waits for the `sent`.
            outbox.expect(&conv, &id);
            let publish = shared
                .backend
                .publish(&conv_id, Some(msg_id), payload.into());
            match within(&shared.settings, publish).await {
                Ok((ack, deadline)) => Ok(Some(
                    async move {
                        Some(match stored(deadline, ack).await {
                            Ok(()) => {
                                ::metrics::counter!(metrics::SENDS_PUBLISHED).increment(1);
                                ServerFrame::Sent { id, conv, ts }
                            }
                            Err(err) => stored_failed(err, id, conv),
                        })
                    }
                    .boxed(),
                )),
                Err(err) => {
                    tracing::warn!(conv = %conv_id, error = %err, "publish failed");
                    let send = (conv.clone(), id.clone());
                    let frame = send_error(ErrorCode::Unavailable, UNAVAILABLE, id, conv, None);
                    outbox.push_answer(Some(encode(&frame)), Some((&send.0, &send.1)))?;
                    Ok(None)
                }
            }
        }
        .boxed(),
    )
}

/// Publishes within the publish timeout (in arrival order: awaited before the next frame);
/// the same deadline then bounds the JetStream ack, awaited in flight.
async fn within(
    settings: &super::Settings,
    publish: impl std::future::Future<Output = Result<PendingAck, BackendError>>,
) -> Result<(PendingAck, Instant), BackendError> {
    let deadline = Instant::now() + settings.publish_timeout;
    match timeout_at(deadline, publish).await {
        Ok(ack) => Ok((ack?, deadline)),
        Err(_) => Err(BackendError::TimedOut(settings.publish_timeout)),
    }
}

/// The JetStream ack of a publish, by `deadline`.
async fn stored(deadline: Instant, ack: PendingAck) -> Result<(), BackendError> {
    match timeout_at(deadline, ack).await {
        Ok(stored) => stored,
        Err(_) => Err(BackendError::TimedOut(
            deadline.saturating_duration_since(Instant::now()),
        )),
    }
}

fn stored_failed(err: BackendError, id: String, conv: String) -> ServerFrame {
    tracing::warn!(conv = %conv, error = %err, "send not stored");
    send_error(ErrorCode::Unavailable, UNAVAILABLE, id, conv, None)
}

/// Validates a `delivered` (`read` false) or `read` frame, then publishes the receipt to
/// `CHAT_IN`. Success is not answered; a receipt JetStream did not store is answered with
/// `unavailable` and the `conv` (receipts are idempotent: the client sends it again).
pub(super) fn on_receipt<B: Backend>(ctx: &Ctx<B>, conv: String, seq: u64, read: bool) -> Step {
    let (shared, session) = (&ctx.shared, &*ctx.session);
    let user = &session.user;
    let conv_id = match ConvId::parse(&conv) {
        Ok(c) => c,
        Err(e) => {
            return ctx.reply(receipt_error(
                ErrorCode::InvalidId,
                e.to_string(),
                conv,
                None,
            ));
        }
    };
    if !may_be_member(&conv_id, user) {
        return ctx.reply(receipt_error(ErrorCode::NotMember, NOT_MEMBER, conv, None));
    }
    if seq == 0 {
        let message = "seq must be at least 1";
        return ctx.reply(receipt_error(ErrorCode::InvalidFrame, message, conv, None));
    }
    if let Err(retry_ms) = check_rate(&shared.receipt_limiter, user) {
        let message = "receipt rate exceeded; retry later";
        return ctx.reply(receipt_error(
            ErrorCode::RateLimited,
            message,
            conv,
            Some(retry_ms),
        ));
    }
    let payload = serde_json::to_vec(&Inbound::Receipt(InboundReceipt {
        conv: conv.clone(),
        user: user.to_string(),
        device: session.device.to_string(),
        // Whoever read a message has it: `read` raises both watermarks.
        delivered: seq,
        read: if read { seq } else { 0 },
    }))
    .expect("inbound receipts always serialize");
    let (shared, outbox) = (shared.clone(), ctx.outbox.clone());
    Step::Wait(
        async move {
            // No `Nats-Msg-Id`: watermarks only grow, so a duplicate changes nothing.
            let publish = shared.backend.publish(&conv_id, None, payload.into());
            match within(&shared.settings, publish).await {
                Ok((ack, deadline)) => Ok(Some(
                    async move {
                        match stored(deadline, ack).await {
                            Ok(()) => {
                                ::metrics::counter!(metrics::RECEIPTS_PUBLISHED).increment(1);
                                None
                            }
                            Err(err) => {
                                tracing::warn!(conv = %conv, error = %err, "receipt not stored");
                                let code = ErrorCode::Unavailable;
                                Some(receipt_error(code, RECEIPT_UNAVAILABLE, conv, None))
                            }
                        }
                    }
                    .boxed(),
                )),
                Err(err) => {
                    tracing::warn!(conv = %conv_id, error = %err, "receipt publish failed");
                    let frame =
                        receipt_error(ErrorCode::Unavailable, RECEIPT_UNAVAILABLE, conv, None);
                    outbox.push(encode(&frame))?;
                    Ok(None)
                }
            }
        }
        .boxed(),
    )
}
