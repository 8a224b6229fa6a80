//! What the partition owner knows of one conversation while it stamps it: the head (last
//! stamped seq and its stream sequence, the fence), every member's watermarks, and for groups
//! the current members. Loaded once when the conversation is first touched (after the local
//! store has applied everything the stream held of it), then kept up to date by the owner's
//! own stamps: while a process owns a partition nobody else stamps its conversations, and a
//! fenced publish says when that assumption broke.

use std::collections::HashMap;

use chat_protocol::{ids::ConvId, jetstream::last_message, membership::Roster, subjects};
use chat_store::MessageStore;

use super::{Ctx, store_writer::Behind};
use crate::records::{decode_stamped, member};

/// Last stamped position of a conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Head {
    pub seq: u64,
    /// Stream sequence of that message in `CHAT_MSGS` (0: none in the stream).
    pub stream_seq: u64,
}

/// One conversation's state at its owner.
#[derive(Debug, Clone, Default)]
pub struct ConvState {
    pub head: Head,
    /// Member -> (delivered, read), as stored.
    pub marks: HashMap<String, (u64, u64)>,
    /// A group's current members (`None` for one-to-one conversations).
    pub roster: Option<Roster>,
    /// Anything was ever stamped in it (a group id that exists cannot be created again).
    pub exists: bool,
}

/// Why a conversation's state could not be loaded (it is tried again).
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("reading the stream: {0}")]
    Stream(String),
    #[error(transparent)]
    Behind(#[from] Behind),
    #[error("store: {0}")]
    Store(#[from] chat_store::StoreError),
}

/// Loads `conv`'s state: its last stamped message and receipt from the stream (whatever
/// partition they were stamped in), then, once the local store has applied both, its
/// watermarks and members from the store.
pub async fn load<S: MessageStore>(ctx: &Ctx<S>, conv: &ConvId) -> Result<ConvState, LoadError> {
    let stream = subjects::STREAM_STAMPED;
    let (messages, receipts) = (subjects::stamped_any(conv), subjects::receipts_any(conv));
    let (last, last_receipt) = tokio::join!(
        last_message(&ctx.client, stream, &messages),
        last_message(&ctx.client, stream, &receipts),
    );
    let last = last.map_err(|e| LoadError::Stream(e.to_string()))?;
    let last_receipt = last_receipt.map_err(|e| LoadError::Stream(e.to_string()))?;
    let want = last
        .as_ref()
        .map_or(0, |m| m.sequence)
        .max(last_receipt.as_ref().map_or(0, |m| m.sequence));
    ctx.applied.wait_for(want, ctx.catch_up).await?;
    let head = match last {
        Some(m) => Head {
            seq: decode_stamped(&m.payload, m.sequence)
                .map_err(|e| LoadError::Stream(e.to_string()))?
                .seq,
            stream_seq: m.sequence,
        },
        // Nothing in the stream (a new conversation, or aged out of it): continue after what
        // the store has, expecting no message on the conversation's subjects.
        None => Head {
            seq: ctx.store.latest_seq(conv.as_str()).await?.unwrap_or(0),
            stream_seq: 0,
        },
    };
    let marks = ctx
        .store
        .watermarks(conv.as_str())
        .await?
        .into_iter()
        .map(|m| (m.user, (m.delivered, m.read)))
        .collect();
    let (roster, exists) = if conv.is_group() {
        let members = ctx.store.members(conv.as_str()).await?;
        let exists = head.seq > 0 || ctx.store.conversation(conv.as_str()).await?.is_some();
        (
            Some(Roster::from_members(members.into_iter().map(member))),
            exists,
        )
    } else {
        (None, head.seq > 0)
    };
    Ok(ConvState {
        head,
        marks,
        roster,
        exists,
    })
}
