//! Answers the request APIs from the local store, in queue group `api`:
//! - `chat.api.history`: a page of one conversation (before a seq, after a seq, or a range);
//! - `chat.api.sync`: what changed for a user since a sync token, with the missed messages;
//! - `chat.api.receipts`: every member's watermarks, and who has or read a given seq;
//! - `chat.api.conversations`: a user's conversations with names, counts and unread;
//! - `chat.api.group_info`: a group's name and current members (for clients, and for fan-out
//!   workers seeding their membership views);
//! - `chat.api.contacts`: which of some users share a conversation with a user (the presence
//!   service's privacy rule).
//!
//! A user reads a group only within its membership window (from the event that added it to
//! the one that removed it), see [`Window`].
//!
//! Nothing here runs per message: these are the read side, answered from the local store that
//! the store writer (`crate::per_message::store_writer`) keeps.
//!
//! Before reading, each makes sure the store has caught up with the stream (history: with the
//! conversation's last stamped message; sync and receipts: with everything in `CHAT_MSGS` when
//! the request arrived), so an answer never ends before something the client was already pushed,
//! and a sync token never claims a change the store has not applied.

use std::time::{Duration, Instant};

mod contacts;
mod conversations;
mod group_info;
mod history;
mod receipts;
mod sync;

use async_nats::jetstream;
use chat_protocol::{
    api::{
        CONVERSATIONS_PAGE_MAX, ConversationsReply, ConversationsRequest, GroupInfoReply,
        GroupInfoRequest, HISTORY_PAGE_MAX, HistoryReply, HistoryRequest, PAGE_MAX_BODY_BYTES,
        ReceiptsReply, ReceiptsRequest, SYNC_PAGE_MAX, SyncReply, SyncRequest,
    },
    frames::{
        ConvInfo, ConvState, ErrorCode, ErrorFrame, GroupMember, MemberMarks, Message,
        SYNC_MARKS_MAX_MEMBERS,
    },
    ids::{ConvId, UserId},
    jetstream::last_message,
    membership::Window,
    subjects,
};
use chat_store::{ConvSummary, MessageStore, PageQuery, StoredMessage};
use futures::StreamExt;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::{
    per_message::Applied,
    records::{decode_stamped, member, to_frame},
};

/// Most conversations one sync page lists.
pub const SYNC_CONVS_PER_PAGE: u32 = 200;

struct Responder<S> {
    client: async_nats::Client,
    store: S,
    stamped: StreamHead,
    applied: Applied,
    catch_up: Duration,
}

/// `CHAT_MSGS`'s last sequence, looked up by one request at a time: every read that arrived
/// before a lookup started shares its answer (the stream it saw is at least as new as the one
/// the read arrived to). A storm of reads, such as thousands of users reconnecting after their
/// gateway died and each listing its groups, then costs the JetStream API a few `STREAM.INFO`
/// requests instead of one each (the server queues its JetStream API and drops requests once
/// that queue is full).
struct StreamHead {
    stream: jetstream::stream::Stream,
    /// The last answer, with the moment its lookup started.
    latest: tokio::sync::Mutex<Option<(Instant, u64)>>,
}

impl StreamHead {
    fn new(stream: jetstream::stream::Stream) -> Self {
        Self {
            stream,
            latest: tokio::sync::Mutex::new(None),
        }
    }

    /// The stream's last sequence at some moment after this call began.
    async fn last_sequence(&self) -> Result<u64, CatchUpError> {
        let arrived = Instant::now();
        let mut latest = self.latest.lock().await;
        if let Some((started, last)) = *latest
            && started >= arrived
        {
            return Ok(last);
        }
        let started = Instant::now();
        let last = self
            .stream
            .clone()
            .info()
            .await
            .map_err(|e| CatchUpError::Stream(e.to_string()))?
            .state
            .last_sequence;
        *latest = Some((started, last));
        Ok(last)
    }
}

pub async fn serve<S: MessageStore + Clone>(
    client: async_nats::Client,
    store: S,
    applied: Applied,
    catch_up: Duration,
    shutdown: CancellationToken,
) -> Result<(), async_nats::Error> {
    let js = jetstream::new(client.clone());
    let stamped = js.get_stream(subjects::STREAM_STAMPED).await?;
    let mut requests = futures::stream::select_all([
        client
            .queue_subscribe(subjects::HISTORY_API, subjects::API_QUEUE.into())
            .await?,
        client
            .queue_subscribe(subjects::SYNC_API, subjects::API_QUEUE.into())
            .await?,
        client
            .queue_subscribe(subjects::RECEIPTS_API, subjects::API_QUEUE.into())
            .await?,
        client
            .queue_subscribe(subjects::CONVERSATIONS_API, subjects::API_QUEUE.into())
            .await?,
        client
            .queue_subscribe(subjects::GROUP_INFO_API, subjects::API_QUEUE.into())
            .await?,
        client
            .queue_subscribe(subjects::CONTACTS_API, subjects::API_QUEUE.into())
            .await?,
    ]);
    let responder = std::sync::Arc::new(Responder {
        client: client.clone(),
        store,
        stamped: StreamHead::new(stamped),
        applied,
        catch_up,
    });
    let tasks = tokio_util::task::TaskTracker::new();
    loop {
        let req = tokio::select! {
            req = requests.next() => req,
            _ = shutdown.cancelled() => break,
        };
        let Some(req) = req else { break };
        let Some(reply_to) = req.reply.clone() else {
            continue;
        };
        let (client, responder) = (client.clone(), responder.clone());
        tasks.spawn(async move {
            let started = Instant::now();
            let (api, payload) = match req.subject.as_str() {
                subjects::SYNC_API => ("sync", encode(&responder.sync(&req.payload).await)),
                subjects::RECEIPTS_API => {
                    ("receipts", encode(&responder.receipts(&req.payload).await))
                }
                subjects::CONVERSATIONS_API => (
                    "conversations",
                    encode(&responder.conversations(&req.payload).await),
                ),
                subjects::GROUP_INFO_API => (
                    "group_info",
                    encode(&responder.group_info(&req.payload).await),
                ),
                subjects::CONTACTS_API => (
                    "contacts",
                    encode(&contacts::answer(&responder.store, &req.payload).await),
                ),
                _ => ("history", encode(&responder.history(&req.payload).await)),
            };
            metrics::histogram!("sequencer_api_seconds", "api" => api)
                .record(started.elapsed().as_secs_f64());
            if let Err(err) = client.publish(reply_to, payload.into()).await {
                tracing::warn!(api, error = %err, "api reply failed");
            }
        });
    }
    tasks.close();
    tasks.wait().await;
    Ok(())
}

fn encode<T: Serialize>(reply: &T) -> Vec<u8> {
    serde_json::to_vec(reply).expect("reply encodes")
}

fn error_frame(code: ErrorCode, message: &str) -> ErrorFrame {
    ErrorFrame::new(code, message)
}

/// A request's failure, as the error frame the client gets.
type Refusal = ErrorFrame;

fn not_member() -> Refusal {
    error_frame(
        ErrorCode::NotMember,
        "you are not a member of this conversation",
    )
}

/// A request's page size: 1 up to `max` (larger asks are served `max`); 0 asks for nothing
/// and is refused, so a client bug does not read as "one item and more to come".
fn page_limit(limit: u32, max: u32) -> Result<u32, Refusal> {
    if limit == 0 {
        return Err(error_frame(
            ErrorCode::InvalidFrame,
            "limit must be at least 1",
        ));
    }
    Ok(limit.min(max))
}

fn unavailable() -> Refusal {
    error_frame(ErrorCode::Unavailable, "not available right now, retry")
}

fn internal() -> Refusal {
    error_frame(ErrorCode::Internal, "store read failed")
}

fn parse_ids(user: &str, conv: &str) -> Result<(UserId, ConvId), Refusal> {
    let (Ok(conv), Ok(user)) = (ConvId::parse(conv), UserId::parse(user)) else {
        return Err(error_frame(
            ErrorCode::InvalidId,
            "invalid conversation or user id",
        ));
    };
    Ok((user, conv))
}

fn store_failed(err: chat_store::StoreError) -> Refusal {
    tracing::error!(error = %err, "store read failed");
    internal()
}

/// The marks of `users` (those without stored marks at 0), in that order.
fn marks_of<'a>(
    users: impl IntoIterator<Item = &'a str>,
    stored: &[chat_store::Marks],
) -> Vec<MemberMarks> {
    users
        .into_iter()
        .map(|u| {
            let m = stored.iter().find(|m| m.user == u);
            MemberMarks {
                user: u.to_owned(),
                delivered: m.map_or(0, |m| m.delivered),
                read: m.map_or(0, |m| m.read),
            }
        })
        .collect()
}

/// Messages of a conversation the user has not read: after its read watermark and after it
/// joined. In a group the event that made the user a member does not count (it is the user's
/// own joining, not something to read); in a one-to-one conversation `joined` is 1 and every
/// message counts.
fn unread(conv: &ConvId, summary: &ConvSummary, read: u64) -> u64 {
    let seen = if conv.is_group() {
        summary.joined
    } else {
        summary.joined.saturating_sub(1)
    };
    summary.latest.saturating_sub(read.max(seen))
}

/// Member count as clients see it: a one-to-one conversation always has two.
fn member_count(conv: &ConvId, summary: &ConvSummary) -> u32 {
    if conv.is_group() {
        u32::try_from(summary.member_count).unwrap_or(u32::MAX)
    } else {
        2
    }
}

/// Rough encoded size of a message, to keep a reply under the NATS payload limit.
fn weight(m: &StoredMessage) -> usize {
    m.body.len() + m.conv.len() + m.from.len() + m.client_id.len() + 64
}

impl<S: MessageStore> Responder<S> {
    /// What `user` may read of `conv`.
    async fn window(&self, conv: &ConvId, user: &UserId) -> Result<Option<Window>, Refusal> {
        if !conv.is_group() {
            return Ok(conv.is_direct_member(user).then_some(Window::ALL));
        }
        Ok(self
            .store
            .member(conv.as_str(), user.as_str())
            .await
            .map_err(store_failed)?
            .map(|m| Window::of(&member(m))))
    }

    /// The current members of a conversation, sorted by id.
    async fn member_ids(&self, conv: &ConvId) -> Result<Vec<String>, Refusal> {
        if let Some(pair) = conv.direct_members() {
            return Ok(pair.iter().map(|u| u.to_string()).collect());
        }
        Ok(self
            .store
            .members(conv.as_str())
            .await
            .map_err(store_failed)?
            .into_iter()
            .filter(|m| m.left.is_none())
            .map(|m| m.user)
            .collect())
    }

    /// Waits until the store holds the conversation's last stamped message.
    async fn wait_for_conversation(&self, conv: &ConvId) -> Result<(), CatchUpError> {
        let last = last_message(
            &self.client,
            subjects::STREAM_STAMPED,
            &subjects::stamped_any(conv),
        )
        .await
        .map_err(|e| CatchUpError::Stream(e.to_string()))?;
        let Some(last) = last else { return Ok(()) };
        decode_stamped(&last.payload, last.sequence)
            .map_err(|e| CatchUpError::Stream(e.to_string()))?;
        Ok(self.applied.wait_for(last.sequence, self.catch_up).await?)
    }

    /// Waits until the store applied everything `CHAT_MSGS` held when this was called. A
    /// `floor` (a client's token) beyond that is [`CatchUpError::Future`].
    async fn wait_for_stream(&self, floor: Option<u64>) -> Result<(), CatchUpError> {
        let last = self.stamped.last_sequence().await?;
        if let Some(floor) = floor.filter(|f| *f > last) {
            return Err(CatchUpError::Future { floor, last });
        }
        Ok(self.applied.wait_for(last, self.catch_up).await?)
    }
}

#[derive(Debug, thiserror::Error)]
enum CatchUpError {
    #[error("reading the stream: {0}")]
    Stream(String),
    #[error(transparent)]
    Behind(#[from] crate::per_message::store_writer::Behind),
    #[error("position {floor} is beyond the stream's last sequence {last}")]
    Future { floor: u64, last: u64 },
}
