//! Why a connection ends, the close code it gets, and the wait for the client's close frame.

use std::time::Duration;

use axum::extract::ws::Message;
use chat_protocol::frames::close;
use futures::{Stream, StreamExt};
use tokio::time::timeout;

/// After a frame that was too large, the rest of it is still unread in the kernel; closing the
/// socket right away would answer with a reset that can destroy our close frame in flight.
const UNREAD_INPUT_LINGER: Duration = Duration::from_millis(500);

/// Why a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CloseReason {
    GoingAway,
    MessageTooBig,
    HeartbeatTimeout,
    SlowConsumer,
    TokenExpired,
    /// The client sent a close frame; tungstenite answers it.
    ClientClosed,
    /// The socket failed or ended without a close frame: nothing can be sent.
    Gone,
}

impl CloseReason {
    /// The close code to send, if a close frame can and must be sent.
    pub(crate) fn code(self) -> Option<u16> {
        match self {
            Self::GoingAway => Some(close::GOING_AWAY),
            Self::MessageTooBig => Some(close::MESSAGE_TOO_BIG),
            Self::HeartbeatTimeout => Some(close::HEARTBEAT_TIMEOUT),
            Self::SlowConsumer => Some(close::SLOW_CONSUMER),
            Self::TokenExpired => Some(close::TOKEN_EXPIRED),
            Self::ClientClosed | Self::Gone => None,
        }
    }

    /// Metric label and close frame reason text.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::GoingAway => "going_away",
            Self::MessageTooBig => "message_too_big",
            Self::HeartbeatTimeout => "heartbeat_timeout",
            Self::SlowConsumer => "slow_consumer",
            Self::TokenExpired => "token_expired",
            Self::ClientClosed => "client_closed",
            Self::Gone => "gone",
        }
    }
}

/// After our close frame: wait (bounded) for the client's close frame or the end of the stream,
/// so the client reads our close frame before the socket goes away.
pub(crate) async fn linger<R>(stream: &mut R, reason: CloseReason, limit: Duration)
where
    R: Stream<Item = Result<Message, axum::Error>> + Unpin,
{
    match reason {
        CloseReason::Gone => {}
        CloseReason::MessageTooBig => tokio::time::sleep(limit.min(UNREAD_INPUT_LINGER)).await,
        _ => {
            let _ = timeout(limit, async {
                while let Some(Ok(msg)) = stream.next().await {
                    if matches!(msg, Message::Close(_)) {
                        break;
                    }
                }
            })
            .await;
        }
    }
}

/// Whether a read failed because the client's message exceeded `max_frame_bytes`.
pub(crate) fn is_too_big(err: &axum::Error) -> bool {
    std::error::Error::source(err)
        .and_then(|e| e.downcast_ref::<tungstenite::Error>())
        .is_some_and(|e| matches!(e, tungstenite::Error::Capacity(_)))
}
