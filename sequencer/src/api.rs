//! Answers history requests (`chat.api.history`, queue group `history`) from the local store.
//!
//! Before reading, it makes sure the store has caught up with the conversation's last stamped
//! message, so a client that was just pushed seq N never gets a page that ends before N.

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream::DirectGetErrorKind};
use chat_protocol::{
    api::{HISTORY_PAGE_MAX, HistoryReply, HistoryRequest},
    frames::{ErrorCode, ErrorFrame, Message},
    ids::{ConvId, UserId},
    subjects,
};
use chat_store::{MessageStore, PageQuery};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::stamper::decode_stamped;

pub async fn serve<S: MessageStore + Clone>(
    client: async_nats::Client,
    store: S,
    catch_up: Duration,
    shutdown: CancellationToken,
) -> Result<(), async_nats::Error> {
    let js = jetstream::new(client.clone());
    let stamped = js.get_stream(subjects::STREAM_STAMPED).await?;
    let mut requests = client
        .queue_subscribe(subjects::HISTORY_API, subjects::API_QUEUE.into())
        .await?;
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
        let (client, store, stamped) = (client.clone(), store.clone(), stamped.clone());
        tasks.spawn(async move {
            let reply = answer(&store, &stamped, &req.payload, catch_up).await;
            let payload = serde_json::to_vec(&reply).expect("reply encodes");
            if let Err(err) = client.publish(reply_to, payload.into()).await {
                tracing::warn!(error = %err, "history reply failed");
            }
        });
    }
    tasks.close();
    tasks.wait().await;
    Ok(())
}

fn error(code: ErrorCode, message: &str) -> HistoryReply {
    HistoryReply::Error(ErrorFrame::new(code, message))
}

async fn answer<S: MessageStore>(
    store: &S,
    stamped: &jetstream::stream::Stream,
    payload: &[u8],
    catch_up: Duration,
) -> HistoryReply {
    let Ok(req) = serde_json::from_slice::<HistoryRequest>(payload) else {
        return error(ErrorCode::InvalidFrame, "undecodable history request");
    };
    let (Ok(conv), Ok(user)) = (ConvId::parse(&req.conv), UserId::parse(&req.user)) else {
        return error(ErrorCode::InvalidId, "invalid conversation or user id");
    };
    if !conv.is_member(&user) {
        return error(
            ErrorCode::NotMember,
            "you are not a member of this conversation",
        );
    }
    if let Err(err) = wait_for_store(store, stamped, &conv, catch_up).await {
        tracing::warn!(conv = %conv, error = %err, "history catch-up check failed");
        return error(ErrorCode::Unavailable, "history is not available right now");
    }
    let limit = req.limit.clamp(1, HISTORY_PAGE_MAX);
    let query = match (req.before, req.after) {
        (_, Some(after)) => PageQuery::After { after, limit },
        (before, None) => PageQuery::Before { before, limit },
    };
    match store.page(conv.as_str(), query).await {
        Ok(page) => HistoryReply::Page {
            messages: page
                .messages
                .into_iter()
                .map(|m| Message {
                    conv: m.conv,
                    seq: m.seq,
                    from: m.from,
                    id: m.client_id,
                    ts: m.ts_ms,
                    body: m.body,
                })
                .collect(),
            more: page.more,
        },
        Err(err) => {
            tracing::error!(conv = %conv, error = %err, "history read failed");
            error(ErrorCode::Internal, "history read failed")
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum CatchUpError {
    #[error("reading the last stamped message: {0}")]
    Stream(String),
    #[error("store: {0}")]
    Store(#[from] chat_store::StoreError),
    #[error("store still at seq {have}, stream at {want}")]
    Behind { have: u64, want: u64 },
}

async fn wait_for_store<S: MessageStore>(
    store: &S,
    stamped: &jetstream::stream::Stream,
    conv: &ConvId,
    catch_up: Duration,
) -> Result<(), CatchUpError> {
    let want = match stamped
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
    let deadline = Instant::now() + catch_up;
    loop {
        let have = store.latest_seq(conv.as_str()).await?.unwrap_or(0);
        if have >= want {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(CatchUpError::Behind { have, want });
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
