//! The request proxies: `history`, `sync`, `receipts`, `conversations` and `group_info` are
//! checked here, asked of the sequencers (`chat.api.*`, core request/reply) on behalf of the
//! authenticated user, and answered with the request's `req`, without holding up the frames
//! that follow. Each one is a validation, a request and a mapping of the reply to a frame,
//! put together by [`proxy`].

use std::{collections::BTreeMap, future::Future};

use chat_protocol::{
    api::{
        self, ConversationsReply, ConversationsRequest, GroupInfoReply, GroupInfoRequest,
        HistoryReply, HistoryRequest, ReceiptsReply, ReceiptsRequest, SyncReply, SyncRequest,
    },
    frames::{ErrorCode, ErrorFrame, ServerFrame},
    ids::ConvId,
};
use futures::FutureExt;
use tokio::time::{Instant, timeout_at};

use super::{
    Ctx, Step,
    validate::{check_request, check_request_id},
};
use crate::backend::{ApiRequest, Backend, BackendError};

/// History page size when the client does not ask for one.
pub(crate) const DEFAULT_HISTORY_LIMIT: u32 = 50;

/// An error frame answering request `req` (about `conv`, if any).
pub(super) fn request_error(
    code: ErrorCode,
    message: impl Into<String>,
    req: String,
    conv: Option<String>,
) -> ServerFrame {
    let mut frame = ErrorFrame::new(code, message);
    frame.req = Some(req);
    frame.conv = conv;
    ServerFrame::Error(frame)
}

/// Asks API `what` with `request` and answers the client later (`Step::Track`): `map` turns
/// the reply into the answer frame, or returns the responder's error frame. Every failure
/// carries `req` (and `conv`, unless the responder named one); no answer within
/// `history_timeout_ms` is `unavailable`.
fn proxy<B, R, F>(
    ctx: &Ctx<B>,
    what: &'static str,
    req: String,
    conv: Option<String>,
    request: R,
    map: F,
) -> Step
where
    B: Backend,
    R: ApiRequest,
    F: FnOnce(R::Reply) -> Result<ServerFrame, ErrorFrame> + Send + 'static,
{
    let backend = ctx.shared.backend.clone();
    let deadline = Instant::now() + ctx.shared.settings.history_timeout;
    Step::Track(
        async move {
            let reply = backend.request(&request);
            Some(answer(what, &req, conv.as_deref(), deadline, reply, map).await)
        }
        .boxed(),
    )
}

/// Waits (until `deadline`) for the answer of API `what` to request `req` and turns it into the
/// client's frame.
async fn answer<T>(
    what: &'static str,
    req: &str,
    conv: Option<&str>,
    deadline: Instant,
    reply: impl Future<Output = Result<T, BackendError>>,
    map: impl FnOnce(T) -> Result<ServerFrame, ErrorFrame>,
) -> ServerFrame {
    let (code, message) = match timeout_at(deadline, reply).await {
        Ok(Ok(reply)) => match map(reply) {
            Ok(frame) => return frame,
            Err(mut frame) => {
                frame.req = Some(req.to_owned());
                if frame.conv.is_none() {
                    frame.conv = conv.map(str::to_owned);
                }
                return ServerFrame::Error(frame);
            }
        },
        Ok(Err(err @ BackendError::BadReply(_))) => {
            tracing::error!(api = what, error = %err, "api reply not understood");
            (ErrorCode::Internal, format!("{what} failed"))
        }
        Ok(Err(err)) => {
            tracing::warn!(api = what, error = %err, "api unavailable");
            (
                ErrorCode::Unavailable,
                format!("{what} is unavailable right now; retry"),
            )
        }
        Err(_) => {
            tracing::warn!(api = what, "api request timed out");
            (
                ErrorCode::Unavailable,
                format!("{what} is unavailable right now; retry"),
            )
        }
    };
    request_error(code, message, req.to_owned(), conv.map(str::to_owned))
}

/// A request about one conversation: valid ids and (one-to-one) membership, else its error.
fn about<B: Backend>(ctx: &Ctx<B>, req: &str, conv: &str) -> Result<ConvId, Step> {
    check_request(&ctx.session.user, req, conv)
        .map_err(|frame| ctx.reply(ServerFrame::Error(frame)))
}

pub(super) fn on_history<B: Backend>(
    ctx: &Ctx<B>,
    req: String,
    conv: String,
    before: Option<u64>,
    after: Option<u64>,
    limit: Option<u32>,
) -> Step {
    let conv_id = match about(ctx, &req, &conv) {
        Ok(conv_id) => conv_id,
        Err(step) => return step,
    };
    let request = HistoryRequest {
        user: ctx.session.user.to_string(),
        conv: conv_id.to_string(),
        before,
        after,
        limit: limit
            .unwrap_or(DEFAULT_HISTORY_LIMIT)
            .clamp(1, api::HISTORY_PAGE_MAX),
    };
    let (r, c) = (req.clone(), conv.clone());
    proxy(
        ctx,
        "history",
        req,
        Some(conv),
        request,
        move |reply| match reply {
            HistoryReply::Page { messages, more } => Ok(ServerFrame::History {
                req: r,
                conv: c,
                messages,
                more,
            }),
            HistoryReply::Error(frame) => Err(frame),
        },
    )
}

pub(super) fn on_sync<B: Backend>(
    ctx: &Ctx<B>,
    req: String,
    since: Option<String>,
    cursors: BTreeMap<String, u64>,
    next: Option<String>,
    limit: Option<u32>,
) -> Step {
    if let Err(message) = check_request_id(&req) {
        return ctx.reply(request_error(ErrorCode::InvalidId, message, req, None));
    }
    // Cursors of other users' conversations are harmless (the sequencer only answers about
    // the user's own), but every id is checked before it goes anywhere.
    if let Some((conv, e)) = cursors
        .keys()
        .find_map(|conv| ConvId::parse(conv).err().map(|e| (conv, e)))
    {
        let frame = request_error(
            ErrorCode::InvalidId,
            format!("cursor: {e}"),
            req,
            Some(conv.clone()),
        );
        return ctx.reply(frame);
    }
    let request = SyncRequest {
        user: ctx.session.user.to_string(),
        since,
        cursors,
        next,
        limit: limit
            .unwrap_or(api::SYNC_PAGE_DEFAULT)
            .clamp(1, api::SYNC_PAGE_MAX),
    };
    let r = req.clone();
    proxy(ctx, "sync", req, None, request, move |reply| match reply {
        SyncReply::Page {
            convs,
            messages,
            more,
            next,
            token,
        } => Ok(ServerFrame::Sync {
            req: r,
            convs,
            messages,
            more,
            next,
            token,
        }),
        SyncReply::Error(frame) => Err(frame),
    })
}

pub(super) fn on_receipts<B: Backend>(
    ctx: &Ctx<B>,
    req: String,
    conv: String,
    seq: Option<u64>,
) -> Step {
    let conv_id = match about(ctx, &req, &conv) {
        Ok(conv_id) => conv_id,
        Err(step) => return step,
    };
    let request = ReceiptsRequest {
        user: ctx.session.user.to_string(),
        conv: conv_id.to_string(),
        seq,
    };
    let (r, c) = (req.clone(), conv.clone());
    proxy(
        ctx,
        "receipts",
        req,
        Some(conv),
        request,
        move |reply| match reply {
            ReceiptsReply::Marks {
                members,
                delivered_to,
                read_by,
            } => Ok(ServerFrame::Receipts {
                req: r,
                conv: c,
                members,
                seq,
                delivered_to,
                read_by,
            }),
            ReceiptsReply::Error(frame) => Err(frame),
        },
    )
}

pub(super) fn on_conversations<B: Backend>(
    ctx: &Ctx<B>,
    req: String,
    after: Option<String>,
    limit: Option<u32>,
) -> Step {
    if let Err(message) = check_request_id(&req) {
        return ctx.reply(request_error(ErrorCode::InvalidId, message, req, None));
    }
    let request = ConversationsRequest {
        user: ctx.session.user.to_string(),
        after,
        limit: limit
            .unwrap_or(api::CONVERSATIONS_PAGE_DEFAULT)
            .clamp(1, api::CONVERSATIONS_PAGE_MAX),
        groups_only: false,
    };
    let r = req.clone();
    proxy(
        ctx,
        "conversations",
        req,
        None,
        request,
        move |reply| match reply {
            ConversationsReply::Page { convs, more, next } => Ok(ServerFrame::Conversations {
                req: r,
                convs,
                more,
                next,
            }),
            ConversationsReply::Error(frame) => Err(frame),
        },
    )
}

/// A group's name and members, for a member (the sequencer checks).
pub(super) fn on_group_info<B: Backend>(ctx: &Ctx<B>, req: String, conv: String) -> Step {
    let conv_id = match about(ctx, &req, &conv) {
        Ok(conv_id) if conv_id.is_group() => conv_id,
        Ok(_) => {
            let message = "group_info needs a group id (g~<id>)";
            return ctx.reply(request_error(
                ErrorCode::InvalidId,
                message,
                req,
                Some(conv),
            ));
        }
        Err(step) => return step,
    };
    let request = GroupInfoRequest {
        conv: conv_id.to_string(),
        user: Some(ctx.session.user.to_string()),
        since: None,
    };
    let (r, c) = (req.clone(), conv.clone());
    proxy(
        ctx,
        "group_info",
        req,
        Some(conv),
        request,
        move |reply| match reply {
            GroupInfoReply::Group { name, members, seq } => Ok(ServerFrame::GroupInfo {
                req: r,
                conv: c,
                name,
                members,
                seq,
            }),
            GroupInfoReply::Error(frame) => Err(frame),
        },
    )
}
