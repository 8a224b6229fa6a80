//! Checks of client frames before anything reaches NATS: ids (so no subject can be injected),
//! membership where the gateway can know it (one-to-one conversations), group frame shapes and
//! the per-user rates.

use chat_protocol::{
    api,
    frames::{ErrorCode, ErrorFrame, GroupOp},
    ids::{ClientMsgId, ConvId, UserId},
};
use governor::{DefaultKeyedRateLimiter, clock::Clock};

pub(super) const NOT_MEMBER: &str = "you are not a member of this conversation";

/// Takes one unit of `user`'s quota, or says in how many ms (at least 1) to retry.
pub(super) fn check_rate(
    limiter: &DefaultKeyedRateLimiter<UserId>,
    user: &UserId,
) -> Result<(), u64> {
    limiter.check_key(user).map_err(|not_until| {
        let wait = not_until.wait_time_from(limiter.clock().now());
        u64::try_from(wait.as_micros().div_ceil(1000))
            .unwrap_or(u64::MAX)
            .max(1)
    })
}

/// Request ids follow the client message id rules; the error names them as request ids.
pub(super) fn check_request_id(req: &str) -> Result<(), String> {
    ClientMsgId::parse(req)
        .map(drop)
        .map_err(|e| e.to_string().replace("client message id", "request id"))
}

/// The conversation and client message id of a `send` or `group` frame, both valid.
pub(super) fn check_message_ids(conv: &str, id: &str) -> Result<ConvId, String> {
    let conv_id = ConvId::parse(conv).map_err(|e| e.to_string())?;
    ClientMsgId::parse(id).map_err(|e| e.to_string())?;
    Ok(conv_id)
}

/// Whether `user` may be in `conv` as far as the gateway can tell: any group (the sequencer
/// decides), a one-to-one conversation only as one of its two members.
pub(super) fn may_be_member(conv: &ConvId, user: &UserId) -> bool {
    conv.is_group() || conv.is_direct_member(user)
}

/// The request id and the conversation of a request about one conversation: both valid,
/// and the user possibly a member. Else the error frame that answers it.
pub(super) fn check_request(user: &UserId, req: &str, conv: &str) -> Result<ConvId, ErrorFrame> {
    let fail = |code, message| {
        let mut frame = ErrorFrame::new(code, message);
        frame.req = Some(req.to_owned());
        frame.conv = Some(conv.to_owned());
        frame
    };
    check_request_id(req).map_err(|message| fail(ErrorCode::InvalidId, message))?;
    let conv_id = ConvId::parse(conv).map_err(|e| fail(ErrorCode::InvalidId, e.to_string()))?;
    if !may_be_member(&conv_id, user) {
        return Err(fail(ErrorCode::NotMember, NOT_MEMBER.into()));
    }
    Ok(conv_id)
}

/// What a `group` frame must carry: a group id; a name (at most
/// [`api::GROUP_NAME_MAX_BYTES`]) for `create` and `rename` and none otherwise; valid member
/// ids, at least one for `add`, `remove`, `promote` and `demote`, none for `leave` and `rename`.
pub(super) fn check_group_op(
    conv: &ConvId,
    op: GroupOp,
    name: Option<&str>,
    members: &[String],
) -> Result<(), (ErrorCode, String)> {
    let invalid = |message: &str| Err((ErrorCode::InvalidFrame, message.to_owned()));
    if !conv.is_group() {
        return Err((
            ErrorCode::InvalidId,
            "group frames need a group id (g~<id>)".to_owned(),
        ));
    }
    if let Some(Err(e)) = members
        .iter()
        .map(|m| UserId::parse(m))
        .find(Result::is_err)
    {
        return Err((ErrorCode::InvalidId, format!("members: {e}")));
    }
    let named = matches!(op, GroupOp::Create | GroupOp::Rename);
    match name {
        None if named => return invalid("`name` is required"),
        Some(_) if !named => return invalid("`name` is only for create and rename"),
        Some("") => return invalid("`name` must not be empty"),
        Some(n) if n.len() > api::GROUP_NAME_MAX_BYTES => {
            return Err((
                ErrorCode::InvalidFrame,
                format!(
                    "`name` is {} bytes; the limit is {}",
                    n.len(),
                    api::GROUP_NAME_MAX_BYTES
                ),
            ));
        }
        _ => {}
    }
    match op {
        GroupOp::Add | GroupOp::Remove | GroupOp::Promote | GroupOp::Demote
            if members.is_empty() =>
        {
            invalid("`members` must name at least one user")
        }
        GroupOp::Leave | GroupOp::Rename if !members.is_empty() => {
            invalid("`members` is not taken by leave and rename")
        }
        _ => Ok(()),
    }
}
