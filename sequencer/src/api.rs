//! Answers the request APIs from the local store, in queue group `api`:
//! - `chat.api.history`: a page of one conversation (before a seq, after a seq, or a range);
//! - `chat.api.sync`: what changed for a user since a sync token, with the missed messages;
//! - `chat.api.receipts`: every member's watermarks, and who has or read a given seq;
//! - `chat.api.conversations`: a user's conversations with names, counts and unread;
//! - `chat.api.group_info`: a group's name and current members (for clients, and for fan-out
//!   workers seeding their membership views).
//!
//! A user reads a group only within its membership window (from the event that added it to
//! the one that removed it), see [`groups::Window`].
//!
//! Before reading, each makes sure the store has caught up with the stream (history: with the
//! conversation's last stamped message; sync and receipts: with everything in `CHAT_MSGS` when
//! the request arrived), so an answer never ends before something the client was already pushed,
//! and a sync token never claims a change the store has not applied.

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream::DirectGetErrorKind};
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
    subjects,
};
use chat_store::{ConvSummary, MessageStore, PageQuery, StoredMessage};
use futures::StreamExt;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::{
    groups::{self, Window},
    stamper::decode_stamped,
};

/// Most conversations one sync page lists.
pub const SYNC_CONVS_PER_PAGE: u32 = 200;

struct Responder<S> {
    store: S,
    stamped: jetstream::stream::Stream,
    catch_up: Duration,
}

pub async fn serve<S: MessageStore + Clone>(
    client: async_nats::Client,
    store: S,
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
        store,
        stamped,
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
                    encode(&crate::contacts::answer(&responder.store, &req.payload).await),
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

/// Sync tokens and continuations are opaque to clients: `v1.<stream seq>` and
/// `v1.<stream seq>.<conv>` (the snapshot a paged sync ends with, and where it goes on).
mod token {
    pub fn encode(snapshot: u64) -> String {
        format!("v1.{snapshot}")
    }

    pub fn encode_next(snapshot: u64, from_conv: &str) -> String {
        format!("v1.{snapshot}.{from_conv}")
    }

    /// The stream seq of a token.
    pub fn decode(token: &str) -> Option<u64> {
        token.strip_prefix("v1.")?.parse().ok()
    }

    /// The snapshot and the conversation a continuation resumes at.
    pub fn decode_next(next: &str) -> Option<(u64, &str)> {
        let (snapshot, conv) = next.strip_prefix("v1.")?.split_once('.')?;
        Some((snapshot.parse().ok()?, conv))
    }
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
/// joined.
fn unread(summary: &ConvSummary, read: u64) -> u64 {
    summary
        .latest
        .saturating_sub(read.max(summary.joined.saturating_sub(1)))
}

/// Member count as clients see it: a one-to-one conversation always has two.
fn member_count(conv: &ConvId, summary: &ConvSummary) -> u32 {
    if conv.is_group() {
        u32::try_from(summary.member_count).unwrap_or(u32::MAX)
    } else {
        2
    }
}

fn to_frame(m: StoredMessage) -> Message {
    Message {
        conv: m.conv,
        seq: m.seq,
        from: m.from,
        id: m.client_id,
        ts: m.ts_ms,
        body: m.body,
        event: m.event.and_then(|e| serde_json::from_str(&e).ok()),
    }
}

/// Rough encoded size of a message, to keep a reply under the NATS payload limit.
fn weight(m: &StoredMessage) -> usize {
    m.body.len() + m.conv.len() + m.from.len() + m.client_id.len() + 64
}

impl<S: MessageStore> Responder<S> {
    async fn history(&self, payload: &[u8]) -> HistoryReply {
        match self.history_page(payload).await {
            Ok((messages, more)) => HistoryReply::Page { messages, more },
            Err(e) => HistoryReply::Error(e),
        }
    }

    async fn history_page(&self, payload: &[u8]) -> Result<(Vec<Message>, bool), Refusal> {
        let req: HistoryRequest = serde_json::from_slice(payload)
            .map_err(|_| error_frame(ErrorCode::InvalidFrame, "undecodable history request"))?;
        let (user, conv) = parse_ids(&req.user, &req.conv)?;
        if let Err(err) = self.wait_for_conversation(&conv).await {
            tracing::warn!(conv = %conv, error = %err, "history catch-up check failed");
            return Err(unavailable());
        }
        let window = self.window(&conv, &user).await?.ok_or_else(not_member)?;
        // Only the user's window: after what precedes it, before what follows it.
        let floor = window.from - 1;
        let req_after = req.after.map(|a| a.max(floor));
        let req_before = match (req.before, window.to) {
            (Some(b), Some(to)) => Some(b.min(to + 1)),
            (None, Some(to)) => Some(to + 1),
            (b, None) => b,
        };
        let limit = req.limit.clamp(1, HISTORY_PAGE_MAX);
        let (query, before) = match (req_after, req_before) {
            (Some(after), Some(before)) if before <= after.saturating_add(1) => {
                return Ok((Vec::new(), false));
            }
            (Some(after), Some(before)) => {
                let gap = before - after - 1;
                let limit = limit.min(u32::try_from(gap).unwrap_or(u32::MAX));
                (PageQuery::After { after, limit }, Some(before))
            }
            (Some(after), None) => (PageQuery::After { after, limit }, None),
            (None, before) => (PageQuery::Before { before, limit }, None),
        };
        let page = self
            .store
            .page(conv.as_str(), query)
            .await
            .map_err(store_failed)?;
        let mut messages = page.messages;
        let mut more = page.more;
        if messages.first().is_some_and(|m| m.seq <= window.from) {
            // Nothing older is the user's to read.
            messages.retain(|m| window.contains(m.seq));
            if matches!(query, PageQuery::Before { .. }) {
                more = false;
            }
        }
        if let Some(before) = before {
            messages.retain(|m| m.seq < before);
            more = more && messages.last().is_some_and(|m| m.seq + 1 < before);
        }
        // Keep the reply under the payload limit: drop from the far end of the direction asked.
        let newest_first = matches!(query, PageQuery::Before { .. });
        let mut budget = 0usize;
        let keep = if newest_first {
            messages
                .iter()
                .rev()
                .take_while(|m| {
                    budget += weight(m);
                    budget <= PAGE_MAX_BODY_BYTES
                })
                .count()
        } else {
            messages
                .iter()
                .take_while(|m| {
                    budget += weight(m);
                    budget <= PAGE_MAX_BODY_BYTES
                })
                .count()
        }
        .max(1)
        .min(messages.len());
        if keep < messages.len() {
            more = true;
            if newest_first {
                messages.drain(..messages.len() - keep);
            } else {
                messages.truncate(keep);
            }
        }
        Ok((messages.into_iter().map(to_frame).collect(), more))
    }

    async fn receipts(&self, payload: &[u8]) -> ReceiptsReply {
        match self.receipt_marks(payload).await {
            Ok(reply) => reply,
            Err(e) => ReceiptsReply::Error(e),
        }
    }

    async fn receipt_marks(&self, payload: &[u8]) -> Result<ReceiptsReply, Refusal> {
        let req: ReceiptsRequest = serde_json::from_slice(payload)
            .map_err(|_| error_frame(ErrorCode::InvalidFrame, "undecodable receipts request"))?;
        let (user, conv) = parse_ids(&req.user, &req.conv)?;
        if let Err(err) = self.wait_for_stream(None).await {
            tracing::warn!(conv = %conv, error = %err, "receipts catch-up check failed");
            return Err(unavailable());
        }
        let window = self.window(&conv, &user).await?;
        if window.is_none_or(|w| w.to.is_some()) {
            return Err(not_member());
        }
        let stored = self
            .store
            .watermarks(conv.as_str())
            .await
            .map_err(store_failed)?;
        let users = self.member_ids(&conv).await?;
        let members = marks_of(users.iter().map(String::as_str), &stored);
        let who = |f: fn(&MemberMarks) -> u64, seq: u64| {
            members
                .iter()
                .filter(|m| f(m) >= seq)
                .map(|m| m.user.clone())
                .collect::<Vec<_>>()
        };
        let (delivered_to, read_by) = match req.seq {
            Some(seq) => (Some(who(|m| m.delivered, seq)), Some(who(|m| m.read, seq))),
            None => (None, None),
        };
        Ok(ReceiptsReply::Marks {
            members,
            delivered_to,
            read_by,
        })
    }

    async fn sync(&self, payload: &[u8]) -> SyncReply {
        match self.sync_page(payload).await {
            Ok(reply) => reply,
            Err(e) => SyncReply::Error(e),
        }
    }

    async fn sync_page(&self, payload: &[u8]) -> Result<SyncReply, Refusal> {
        let req: SyncRequest = serde_json::from_slice(payload)
            .map_err(|_| error_frame(ErrorCode::InvalidFrame, "undecodable sync request"))?;
        let user = UserId::parse(&req.user)
            .map_err(|_| error_frame(ErrorCode::InvalidId, "invalid user id"))?;
        let bad_token = || {
            error_frame(
                ErrorCode::InvalidToken,
                "unusable sync token or continuation: sync again without it",
            )
        };
        let since = match &req.since {
            None => 0,
            Some(t) => token::decode(t).ok_or_else(bad_token)?,
        };
        let resume = match &req.next {
            None => None,
            Some(n) => Some(token::decode_next(n).ok_or_else(bad_token)?),
        };
        // A continuation's snapshot is at least its since; the store must have applied both.
        let floor = resume.map_or(since, |(snapshot, _)| snapshot.max(since));
        match self.wait_for_stream(Some(floor)).await {
            Ok(()) => {}
            // A position the stream never reached: a token from another deployment or a reset.
            Err(CatchUpError::Future { .. }) => return Err(bad_token()),
            Err(err) => {
                tracing::warn!(user = %user, error = %err, "sync catch-up check failed");
                return Err(unavailable());
            }
        }
        let limit = req.limit.clamp(1, SYNC_PAGE_MAX) as usize;
        let from_conv = resume.map(|(_, conv)| conv);
        let listed = self
            .store
            .user_conversations(user.as_str(), since, from_conv, SYNC_CONVS_PER_PAGE + 1)
            .await
            .map_err(store_failed)?;
        let snapshot = resume.map_or(listed.applied, |(snapshot, _)| snapshot);
        let mut convs = Vec::new();
        let mut messages = Vec::new();
        let mut budget = 0usize;
        let mut next_conv = None;
        for (i, summary) in listed.convs.into_iter().enumerate() {
            if i == SYNC_CONVS_PER_PAGE as usize {
                next_conv = Some(summary.conv);
                break;
            }
            let Ok(conv) = ConvId::parse(&summary.conv) else {
                tracing::error!(conv = %summary.conv, "skipping invalid conversation id in the index");
                continue;
            };
            if messages.len() >= limit || budget >= PAGE_MAX_BODY_BYTES {
                next_conv = Some(summary.conv);
                break;
            }
            let stored = self
                .store
                .watermarks(conv.as_str())
                .await
                .map_err(store_failed)?;
            let count = member_count(&conv, &summary);
            let members = if count <= SYNC_MARKS_MAX_MEMBERS && summary.left.is_none() {
                let users = self.member_ids(&conv).await?;
                marks_of(users.iter().map(String::as_str), &stored)
            } else {
                marks_of([user.as_str()], &stored)
            };
            let read = members
                .iter()
                .find(|m| m.user == user.as_str())
                .map_or(0, |m| m.read);
            convs.push(ConvState {
                conv: summary.conv.clone(),
                name: (!summary.name.is_empty()).then(|| summary.name.clone()),
                member_count: count,
                latest: summary.latest,
                unread: unread(&summary, read),
                members,
                left: summary.left,
            });
            // Nothing before the user joined, nothing after it left (`latest` stops there).
            let cursor = req
                .cursors
                .get(&summary.conv)
                .copied()
                .unwrap_or(0)
                .max(summary.joined.saturating_sub(1));
            if summary.latest <= cursor {
                continue;
            }
            let want = u32::try_from(limit - messages.len()).unwrap_or(u32::MAX);
            let page = self
                .store
                .page(
                    conv.as_str(),
                    PageQuery::After {
                        after: cursor,
                        limit: want,
                    },
                )
                .await
                .map_err(store_failed)?;
            let mut cut = page.more;
            for m in page.messages {
                if m.seq > summary.latest {
                    // Stamped after the user left (or after the index was read).
                    cut = false;
                    break;
                }
                if budget + weight(&m) > PAGE_MAX_BODY_BYTES && !messages.is_empty() {
                    cut = true;
                    break;
                }
                budget += weight(&m);
                messages.push(to_frame(m));
            }
            if cut {
                // The client resumes this conversation from its updated cursor.
                next_conv = Some(summary.conv);
                break;
            }
        }
        let more = next_conv.is_some();
        Ok(SyncReply::Page {
            convs,
            messages,
            more,
            next: next_conv.map(|c| token::encode_next(snapshot, &c)),
            token: (!more).then(|| token::encode(snapshot)),
        })
    }

    async fn conversations(&self, payload: &[u8]) -> ConversationsReply {
        match self.conversations_page(payload).await {
            Ok(reply) => reply,
            Err(e) => ConversationsReply::Error(e),
        }
    }

    async fn conversations_page(&self, payload: &[u8]) -> Result<ConversationsReply, Refusal> {
        let req: ConversationsRequest = serde_json::from_slice(payload).map_err(|_| {
            error_frame(ErrorCode::InvalidFrame, "undecodable conversations request")
        })?;
        let user = UserId::parse(&req.user)
            .map_err(|_| error_frame(ErrorCode::InvalidId, "invalid user id"))?;
        if let Err(err) = self.wait_for_stream(None).await {
            tracing::warn!(user = %user, error = %err, "conversations catch-up check failed");
            return Err(unavailable());
        }
        // `after` is exclusive; the store's `from_conv` is inclusive.
        let from = req.after.as_ref().map(|a| format!("{a}\0"));
        let limit = req.limit.clamp(1, CONVERSATIONS_PAGE_MAX);
        let listed = self
            .store
            .user_conversations(user.as_str(), 0, from.as_deref(), limit)
            .await
            .map_err(store_failed)?;
        let mut convs = Vec::with_capacity(listed.convs.len());
        for summary in &listed.convs {
            let Ok(conv) = ConvId::parse(&summary.conv) else {
                continue;
            };
            if req.groups_only && (!conv.is_group() || summary.left.is_some()) {
                continue;
            }
            let stored = self
                .store
                .watermarks(conv.as_str())
                .await
                .map_err(store_failed)?;
            let read = stored
                .iter()
                .find(|m| m.user == user.as_str())
                .map_or(0, |m| m.read);
            convs.push(ConvInfo {
                conv: summary.conv.clone(),
                name: (!summary.name.is_empty()).then(|| summary.name.clone()),
                member_count: member_count(&conv, summary),
                latest: summary.latest,
                unread: unread(summary, read),
                admin: summary.admin,
                joined: summary.joined,
                left: summary.left,
            });
        }
        let next = if listed.more {
            listed.convs.last().map(|c| c.conv.clone())
        } else {
            None
        };
        Ok(ConversationsReply::Page {
            convs,
            more: listed.more,
            next,
        })
    }

    async fn group_info(&self, payload: &[u8]) -> GroupInfoReply {
        match self.group_members(payload).await {
            Ok(reply) => reply,
            Err(e) => GroupInfoReply::Error(e),
        }
    }

    async fn group_members(&self, payload: &[u8]) -> Result<GroupInfoReply, Refusal> {
        let req: GroupInfoRequest = serde_json::from_slice(payload)
            .map_err(|_| error_frame(ErrorCode::InvalidFrame, "undecodable group info request"))?;
        let conv = ConvId::parse(&req.conv)
            .ok()
            .filter(ConvId::is_group)
            .ok_or_else(|| error_frame(ErrorCode::InvalidId, "not a group id"))?;
        if let Err(err) = self.wait_for_stream(None).await {
            tracing::warn!(conv = %conv, error = %err, "group info catch-up check failed");
            return Err(unavailable());
        }
        // The seq first: the members read after it reflect at least every event up to it.
        let seq = self
            .store
            .latest_seq(conv.as_str())
            .await
            .map_err(store_failed)?
            .unwrap_or(0);
        let Some(meta) = self
            .store
            .conversation(conv.as_str())
            .await
            .map_err(store_failed)?
        else {
            return Err(error_frame(ErrorCode::NotFound, "no such group"));
        };
        let mut members = self
            .store
            .members(conv.as_str())
            .await
            .map_err(store_failed)?;
        // Former members only for internal requests asking for them.
        let since = if req.user.is_some() { None } else { req.since };
        members.retain(|m| match (m.left, since) {
            (None, _) => true,
            (Some(left), Some(since)) => left >= since,
            (Some(_), None) => false,
        });
        if let Some(user) = &req.user
            && !members.iter().any(|m| &m.user == user)
        {
            return Err(not_member());
        }
        Ok(GroupInfoReply::Group {
            name: meta.name,
            members: members
                .into_iter()
                .map(|m| GroupMember {
                    user: m.user,
                    admin: m.admin,
                    joined: m.joined,
                    left: m.left,
                })
                .collect(),
            seq,
        })
    }

    /// What `user` may read of `conv`.
    async fn window(&self, conv: &ConvId, user: &UserId) -> Result<Option<Window>, Refusal> {
        groups::window(&self.store, conv, user)
            .await
            .map_err(store_failed)
    }

    /// The current members of a conversation, sorted by id.
    async fn member_ids(&self, conv: &ConvId) -> Result<Vec<String>, Refusal> {
        if let Some(pair) = conv.direct_members() {
            return Ok(pair.iter().map(|u| u.to_string()).collect());
        }
        Ok(groups::current_members(&self.store, conv)
            .await
            .map_err(store_failed)?
            .into_iter()
            .map(|m| m.user)
            .collect())
    }

    /// Waits until the store holds the conversation's last stamped message.
    async fn wait_for_conversation(&self, conv: &ConvId) -> Result<(), CatchUpError> {
        let want = match self
            .stamped
            .direct_get_last_for_subject(subjects::stamped(conv))
            .await
        {
            Ok(last) => {
                decode_stamped(&last.payload, last.sequence)
                    .map_err(|e| CatchUpError::Stream(e.to_string()))?
                    .seq
            }
            Err(err) if err.kind() == DirectGetErrorKind::NotFound => return Ok(()),
            Err(err) => return Err(CatchUpError::Stream(err.to_string())),
        };
        wait_until(self.catch_up, want, || async {
            Ok(self.store.latest_seq(conv.as_str()).await?.unwrap_or(0))
        })
        .await
        .map_err(CatchUpError::from)
    }

    /// Waits until the store applied everything `CHAT_MSGS` held when this was called. A
    /// `floor` (a client's token) beyond that is [`CatchUpError::Future`].
    async fn wait_for_stream(&self, floor: Option<u64>) -> Result<(), CatchUpError> {
        let last = self
            .stamped
            .clone()
            .info()
            .await
            .map_err(|e| CatchUpError::Stream(e.to_string()))?
            .state
            .last_sequence;
        if let Some(floor) = floor.filter(|f| *f > last) {
            return Err(CatchUpError::Future { floor, last });
        }
        let want = last;
        wait_until(self.catch_up, want, || self.store.applied_stream_seq())
            .await
            .map_err(CatchUpError::from)
    }
}

/// Why [`wait_until`] gave up.
pub(crate) enum Behind {
    Store(chat_store::StoreError),
    At { have: u64, want: u64 },
}

/// Polls `have` until it reaches `want`, for at most `limit`: how every reader of the local
/// store waits for the follower (or the stamper) to catch up with the stream.
pub(crate) async fn wait_until<F, Fut>(
    limit: Duration,
    want: u64,
    mut have: F,
) -> Result<(), Behind>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<u64, chat_store::StoreError>>,
{
    let deadline = Instant::now() + limit;
    loop {
        let have = have().await.map_err(Behind::Store)?;
        if have >= want {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Behind::At { have, want });
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[derive(Debug, thiserror::Error)]
enum CatchUpError {
    #[error("reading the stream: {0}")]
    Stream(String),
    #[error("store: {0}")]
    Store(#[from] chat_store::StoreError),
    #[error("store at {have}, stream at {want}")]
    Behind { have: u64, want: u64 },
    #[error("position {floor} is beyond the stream's last sequence {last}")]
    Future { floor: u64, last: u64 },
}

impl From<Behind> for CatchUpError {
    fn from(e: Behind) -> Self {
        match e {
            Behind::Store(e) => CatchUpError::Store(e),
            Behind::At { have, want } => CatchUpError::Behind { have, want },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::token;

    #[test]
    fn tokens_round_trip_and_refuse_garbage() {
        assert_eq!(token::decode(&token::encode(42)), Some(42));
        assert_eq!(
            token::decode_next(&token::encode_next(7, "dm~a~b")),
            Some((7, "dm~a~b"))
        );
        for bad in ["", "42", "v2.1", "v1.x", "v1.-1"] {
            assert_eq!(token::decode(bad), None, "{bad}");
        }
        for bad in ["v1.7", "v1.x.dm~a~b", "x.7.dm~a~b"] {
            assert_eq!(token::decode_next(bad), None, "{bad}");
        }
    }
}
