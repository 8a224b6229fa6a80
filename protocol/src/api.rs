//! Messages between services over NATS (never seen by clients).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::frames::{
    ConvInfo, ConvState, ErrorFrame, GroupMember, GroupOp, MediaRef, MemberMarks, Message,
    PresenceState,
};

/// What a gateway publishes to `chat.in.<conv>`: a client's send or receipt. Both go through the
/// conversation's sequencer, which checks membership and orders them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Inbound {
    Send(InboundMessage),
    Receipt(InboundReceipt),
    Group(InboundGroup),
}

/// A client's `group` frame. Deduplicated like a send ([`dedupe_id`] of its `id`), and
/// stamped, when the sequencer accepts it, as a message carrying a
/// [`GroupEvent`](crate::frames::GroupEvent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboundGroup {
    pub conv: String,
    /// The member making the change.
    pub from: String,
    pub device: String,
    /// Client message id of the `group` frame.
    pub id: String,
    pub op: GroupOp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<String>,
}

/// Longest group name, in bytes.
pub const GROUP_NAME_MAX_BYTES: usize = 256;

/// Default cap on a group's members (the sequencer's `group_max_members`).
pub const GROUP_MAX_MEMBERS_DEFAULT: u32 = 1024;

/// A client's `delivered` or `read` frame. Watermarks only grow, so receipts need no dedupe:
/// applying one twice, or two out of order, ends in the same state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboundReceipt {
    pub conv: String,
    pub user: String,
    pub device: String,
    /// Raise the delivered watermark to this seq (0: leave it).
    pub delivered: u64,
    /// Raise the read watermark to this seq (0: leave it).
    pub read: u64,
}

/// One client send. The JetStream message id header is [`dedupe_id`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboundMessage {
    pub conv: String,
    pub from: String,
    pub device: String,
    /// Client message id.
    pub id: String,
    pub body: String,
    /// Gateway receive time, ms since the Unix epoch.
    pub ts: u64,
    /// The media the message references, verified by the gateway (see [`MediaVerifyRequest`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media: Option<MediaRef>,
}

/// The `Nats-Msg-Id` of a send: the same client id from the same sender in the same conversation
/// is the same message, whichever gateway or connection it came through.
pub fn dedupe_id(conv: &str, from: &str, client_id: &str) -> String {
    format!("{conv}:{from}:{client_id}")
}

/// A history page request to `chat.api.history`, made by a gateway on behalf of `user`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryRequest {
    pub user: String,
    pub conv: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<u64>,
    pub limit: u32,
}

/// The answer to a [`HistoryRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "result")]
pub enum HistoryReply {
    Page { messages: Vec<Message>, more: bool },
    Error(ErrorFrame),
}

/// Largest page a history request returns.
pub const HISTORY_PAGE_MAX: u32 = 200;

/// A sync page request to `chat.api.sync`, made by a gateway on behalf of `user` (the client's
/// `sync` frame, see `docs/protocol.md`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncRequest {
    pub user: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub cursors: BTreeMap<String, u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
    pub limit: u32,
}

/// The answer to a [`SyncRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "result")]
pub enum SyncReply {
    Page {
        convs: Vec<ConvState>,
        messages: Vec<Message>,
        more: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        next: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<String>,
    },
    Error(ErrorFrame),
}

/// Default number of messages in one sync page.
pub const SYNC_PAGE_DEFAULT: u32 = 500;
/// Largest number of messages in one sync page.
pub const SYNC_PAGE_MAX: u32 = 1000;
/// Most body bytes one history or sync page carries, whatever its limit: a reply must stay under
/// the NATS `max_payload` (1 MiB by default). A page cut by this limit says `more`.
pub const PAGE_MAX_BODY_BYTES: usize = 512 * 1024;

/// A receipts request to `chat.api.receipts`, made by a gateway on behalf of `user`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiptsRequest {
    pub user: String,
    pub conv: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
}

/// The answer to a [`ReceiptsRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "result")]
pub enum ReceiptsReply {
    Marks {
        members: Vec<MemberMarks>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        delivered_to: Option<Vec<String>>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        read_by: Option<Vec<String>>,
    },
    Error(ErrorFrame),
}

/// The event a fan-out worker publishes to `chat.push.<user>` (stream `CHAT_PUSH`) when a message
/// reached none of `user`'s devices, for an external push service (APNs, FCM). It carries no
/// body: bodies may be end-to-end encrypted, and push payloads leave our infrastructure. The
/// JetStream message id is [`push_dedupe_id`], so a redelivered message makes no second event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushNotification {
    pub user: String,
    pub conv: String,
    pub seq: u64,
    pub from: String,
    /// The sender's client message id.
    pub id: String,
    /// Stamp time of the message, ms since the Unix epoch.
    pub ts: u64,
}

/// The `Nats-Msg-Id` of a push notification: one per recipient per message.
pub fn push_dedupe_id(user: &str, conv: &str, seq: u64) -> String {
    format!("push:{user}:{conv}:{seq}")
}

/// A conversation list request to `chat.api.conversations`, made by a gateway on behalf of
/// `user` (the client's `conversations` frame).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConversationsRequest {
    pub user: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
    pub limit: u32,
    /// Only groups (what a gateway subscribes to when a device connects).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub groups_only: bool,
}

/// The answer to a [`ConversationsRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "result")]
pub enum ConversationsReply {
    Page {
        convs: Vec<ConvInfo>,
        more: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        next: Option<String>,
    },
    Error(ErrorFrame),
}

/// Default and largest number of conversations in one `conversations` page.
pub const CONVERSATIONS_PAGE_DEFAULT: u32 = 100;
pub const CONVERSATIONS_PAGE_MAX: u32 = 500;

/// A group's members, from `chat.api.group_info`: for a client's `group_info` frame (`user` set:
/// it must be a member) or for a fan-out worker seeding its membership view (`user` absent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupInfoRequest {
    pub conv: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Internal requests only: also list the former members whose membership ended at or
    /// after this seq (with `left`), so a view seeded late still knows who was a member at
    /// an older message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<u64>,
}

/// The answer to a [`GroupInfoRequest`]: the current members, as of the conversation's seq
/// `seq` (every membership event up to `seq` is reflected, none after).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "result")]
pub enum GroupInfoReply {
    Group {
        name: String,
        members: Vec<GroupMember>,
        seq: u64,
    },
    Error(ErrorFrame),
}

/// A gateway's request to `chat.api.media.verify`, answered by the media service, before it
/// accepts a `send` with `media`: does the upload exist in the object store with the declared
/// size and content type, made by `user` for `conv`? A yes also records the message's
/// reference (the upload is never cleaned up as an orphan). Asking again for the same
/// (`conv`, `user`, `id`) is answered the same way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MediaVerifyRequest {
    pub conv: String,
    /// The sender.
    pub user: String,
    /// The message's client message id.
    pub id: String,
    pub media: MediaRef,
}

/// The answer to a [`MediaVerifyRequest`]: `ok`, or an error (`media_not_found`,
/// `media_mismatch`, `invalid_frame`, `unavailable`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "result")]
pub enum MediaVerifyReply {
    Ok,
    Error(ErrorFrame),
}

/// Which of `users` share a conversation with `user` (`chat.api.contacts`, answered by the
/// sequencers from the message store): a one-to-one conversation with at least one message, or
/// a group both are current members of. At most [`CONTACTS_MAX`] users per request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContactsRequest {
    pub user: String,
    pub users: Vec<String>,
}

/// The answer to a [`ContactsRequest`]: the contacts among the asked users, in the order asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "result")]
pub enum ContactsReply {
    Contacts { users: Vec<String> },
    Error(ErrorFrame),
}

/// Most users one [`ContactsRequest`] may ask about.
pub const CONTACTS_MAX: usize = 256;

/// The presence of `users` as `user` may see it (`chat.api.presence`, answered by the presence
/// service): only users who share a conversation with `user`, `last_seen` only of users who do
/// not hide it. At most [`crate::frames::PRESENCE_BATCH_MAX`] users.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceRequest {
    pub user: String,
    pub users: Vec<String>,
}

/// The answer to a [`PresenceRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "result")]
pub enum PresenceReply {
    Presence { users: Vec<PresenceState> },
    Error(ErrorFrame),
}

/// Reads (and with `hide_last_seen`, changes) `user`'s presence settings
/// (`chat.api.presence_settings`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceSettingsRequest {
    pub user: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hide_last_seen: Option<bool>,
}

/// The answer to a [`PresenceSettingsRequest`]: the settings now in force.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "result")]
pub enum PresenceSettingsReply {
    Settings { hide_last_seen: bool },
    Error(ErrorFrame),
}

/// A user's presence settings, as stored in the presence bucket (`cfg.<user>`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceSettings {
    #[serde(default)]
    pub hide_last_seen: bool,
}

/// What a gateway tells the presence service, on `chat.presence.report.<gateway>` (core NATS,
/// every presence replica receives it). Events are sent in batches, at most one report per
/// `flush_ms`; the full state every heartbeat, in parts of at most [`PRESENCE_REPORT_MAX`]
/// users each.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceReport {
    /// Gateway send time, ms since the epoch.
    pub ts: u64,
    /// Events (no `heartbeat`): users whose first device here connected. Heartbeat: users with
    /// a device here (this part of them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub online: Vec<String>,
    /// Users whose last device here went away (events only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub offline: Vec<String>,
    /// Events: users a connection here began to watch (the first one). Heartbeat: users
    /// watched here (this part of them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub watch: Vec<String>,
    /// Users no connection here watches any more (events only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unwatch: Vec<String>,
    /// Set on the heartbeat's parts: the state, not changes.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub heartbeat: bool,
}

/// Most users in one list of a [`PresenceReport`] (keeps a report far below `max_payload`).
pub const PRESENCE_REPORT_MAX: usize = 4096;

/// Presence changes of users watched at one gateway, on `chat.presence.push.<gateway>`:
/// debounced and coalesced by the presence service, one message per gateway per tick.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresencePush {
    pub users: Vec<PresenceState>,
}

/// A typing indicator in a group, on `chat.typing.<conv>`, for the presence service to relay to
/// the group's online members (the gateway cannot know a group's members).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TypingRelay {
    pub conv: String,
    pub user: String,
    pub active: bool,
}
