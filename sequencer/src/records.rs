//! Conversions between the stamped stream's frames and the store's records, used by both the
//! message path (the store writer) and the read side (the APIs).

use chat_protocol::{
    frames::{Message, ServerFrame},
    ids::ConvId,
    membership::{self, Effect},
};
use chat_store::{Change, GroupChange, StoredMessage, StoredReceipt};

/// A `CHAT_MSGS` payload that is not what its subject says.
#[derive(Debug, thiserror::Error)]
#[error("stream message {stream_seq} is not a {expected} frame")]
pub struct Undecodable {
    pub stream_seq: u64,
    pub expected: &'static str,
}

/// Decodes a `CHAT_MSGS` message payload (a `message` frame).
pub fn decode_stamped(payload: &[u8], stream_seq: u64) -> Result<Message, Undecodable> {
    match serde_json::from_slice(payload) {
        Ok(ServerFrame::Message(m)) => Ok(m),
        _ => Err(Undecodable {
            stream_seq,
            expected: "message",
        }),
    }
}

/// Decodes a `CHAT_MSGS` receipt event (a `receipt` frame on `chat.rcpt.<p>.<conv>`).
pub fn decode_receipt(payload: &[u8], stream_seq: u64) -> Result<StoredReceipt, Undecodable> {
    match serde_json::from_slice(payload) {
        Ok(ServerFrame::Receipt(r)) => Ok(StoredReceipt {
            conv: r.conv,
            user: r.user,
            delivered: r.delivered,
            read: r.read,
            stream_seq,
        }),
        _ => Err(Undecodable {
            stream_seq,
            expected: "receipt",
        }),
    }
}

/// The users whose conversation index a change of `conv` touches (the two members of a
/// one-to-one conversation; none for groups, whose members follow the conversation).
pub fn index_members(conv: &ConvId) -> Vec<String> {
    conv.direct_members()
        .map(|m| m.iter().map(|u| u.to_string()).collect())
        .unwrap_or_default()
}

/// The store record of a stamped message.
pub fn stored(m: Message, stream_seq: u64) -> StoredMessage {
    StoredMessage {
        conv: m.conv,
        seq: m.seq,
        from: m.from,
        client_id: m.id,
        ts_ms: m.ts,
        body: m.body,
        stream_seq,
        event: m
            .event
            .map(|e| serde_json::to_string(&e).expect("event encodes")),
        media: m
            .media
            .map(|e| serde_json::to_string(&e).expect("media encodes")),
    }
}

/// The frame of a stored message.
pub fn to_frame(m: StoredMessage) -> Message {
    Message {
        conv: m.conv,
        seq: m.seq,
        from: m.from,
        id: m.client_id,
        ts: m.ts_ms,
        body: m.body,
        event: m.event.and_then(|e| serde_json::from_str(&e).ok()),
        media: m.media.and_then(|e| serde_json::from_str(&e).ok()),
    }
}

fn group_change(effect: Effect) -> GroupChange {
    match effect {
        Effect::Join { users, admin } => GroupChange::Join { users, admin },
        Effect::Leave { users } => GroupChange::Leave { users },
        Effect::Admin { users, admin } => GroupChange::Admin { users, admin },
        Effect::Rename { name } => GroupChange::Rename { name },
    }
}

/// The store change of a stamped message: a one-to-one conversation's two members' index
/// entries, or a group's membership changes.
pub fn message_change(conv: &ConvId, m: Message, stream_seq: u64) -> Change {
    if conv.is_group() {
        let group = m
            .event
            .as_ref()
            .map(|e| {
                membership::effects(&m.from, e)
                    .into_iter()
                    .map(group_change)
                    .collect()
            })
            .unwrap_or_default();
        Change::group_message(stored(m, stream_seq), group)
    } else {
        Change::message(stored(m, stream_seq), index_members(conv))
    }
}

/// A store member as the membership rules see it.
pub fn member(m: chat_store::Member) -> membership::Member {
    membership::Member {
        user: m.user,
        joined: m.joined,
        left: m.left,
        admin: m.admin,
    }
}
