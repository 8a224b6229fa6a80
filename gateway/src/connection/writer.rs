//! The connection's writing side: queued frames go to the socket as fast as it takes them,
//! every frame queued so far fed before one flush (a burst costs one write, not one per
//! frame); a heartbeat ping goes before the queue; a queued close ends it after everything
//! before. And the close frame at the end.

use std::{pin::Pin, task::Poll, time::Duration};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes};
use bytes::Bytes;
use futures::{Sink, SinkExt};
use tokio::time::timeout;

use super::{CloseReason, Outbound, Outbox};
use crate::metrics;

/// What the writer is in the middle of.
#[derive(Default)]
pub(super) struct Writer {
    /// Taken from the queue, not accepted by the socket yet.
    pending: Option<Message>,
    ping_due: bool,
    /// Fed and not flushed.
    unflushed: bool,
    /// Frames fed since the last flush (for the metric).
    frames: u64,
    /// A queued close, reached: it goes once everything before it is flushed.
    closing: Option<CloseReason>,
}

impl Writer {
    /// A heartbeat ping goes out next, ahead of the queue (a busy connection still pings).
    pub(super) fn ping(&mut self) {
        self.ping_due = true;
    }

    /// Writes what it can. `Ready(Ok(reason))`: a queued close was reached and everything
    /// before it is flushed. `Ready(Err)`: the socket failed.
    pub(super) fn poll_write<S>(
        &mut self,
        outbox: &Outbox,
        socket: &mut S,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<Result<CloseReason, ()>>
    where
        S: Sink<Message> + Unpin,
        S::Error: std::fmt::Display,
    {
        loop {
            if self.pending.is_none() {
                if self.ping_due {
                    self.ping_due = false;
                    self.pending = Some(Message::Ping(Bytes::new()));
                } else if self.closing.is_none() {
                    match outbox.pop() {
                        Some(Outbound::Frame(text)) => {
                            self.frames += 1;
                            self.pending = Some(Message::Text(text));
                        }
                        Some(Outbound::Close(reason)) => self.closing = Some(reason),
                        None => {}
                    }
                }
            }
            let Some(msg) = self.pending.take() else {
                break;
            };
            match Pin::new(&mut *socket).poll_ready(cx) {
                Poll::Ready(Ok(())) => {
                    if let Err(err) = Pin::new(&mut *socket).start_send(msg) {
                        tracing::debug!(error = %err, "websocket write failed");
                        return Poll::Ready(Err(()));
                    }
                    self.unflushed = true;
                }
                Poll::Ready(Err(err)) => {
                    tracing::debug!(error = %err, "websocket write failed");
                    return Poll::Ready(Err(()));
                }
                Poll::Pending => {
                    self.pending = Some(msg);
                    break;
                }
            }
        }
        if self.unflushed {
            match Pin::new(&mut *socket).poll_flush(cx) {
                Poll::Ready(Ok(())) => {
                    self.unflushed = false;
                    ::metrics::counter!(metrics::FRAMES_OUT).increment(self.frames);
                    self.frames = 0;
                }
                Poll::Ready(Err(err)) => {
                    tracing::debug!(error = %err, "websocket write failed");
                    return Poll::Ready(Err(()));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
        if self.pending.is_none()
            && let Some(reason) = self.closing.take()
        {
            return Poll::Ready(Ok(reason));
        }
        Poll::Pending
    }
}

/// Sends the close frame for `reason` (if it has a code), or completes the client's close,
/// within `limit`.
pub(super) async fn close<S>(socket: &mut S, reason: CloseReason, limit: Duration)
where
    S: Sink<Message> + Unpin,
    S::Error: std::fmt::Display,
{
    let closing = async {
        match reason.code() {
            Some(code) => {
                let frame = CloseFrame {
                    code,
                    reason: Utf8Bytes::from_static(reason.label()),
                };
                socket.send(Message::Close(Some(frame))).await
            }
            // Flushes tungstenite's automatic answer to the client's close frame.
            None if reason == CloseReason::ClientClosed => socket.close().await,
            None => Ok(()),
        }
    };
    match timeout(limit, closing).await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => tracing::debug!(error = %err, "close frame not sent"),
        Err(_) => tracing::debug!("close frame not delivered in time"),
    }
}
