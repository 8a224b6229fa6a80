//! Messages between services over NATS (never seen by clients).

use serde::{Deserialize, Serialize};

use crate::frames::{ErrorFrame, Message};

/// What a gateway publishes to `chat.in.<conv>` for one client send. The JetStream message id
/// header is [`InboundMessage::dedupe_id`].
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
