//! A connection's outgoing queue: everything sent to the client goes through it, from the
//! connection's own answers to the router's pushes and the presence hub's changes.
//!
//! A bounded FIFO (`outgoing_queue` frames) behind a mutex, with the connection task's waker.
//! It allocates nothing until a frame is queued and gives its room back once drained after a
//! burst, so an idle connection holds a few words here. The state of
//! [`SentOrder`](crate::order::SentOrder) lives under the same lock, and only while a send is in
//! flight: a push answering a send waits until the send's `sent` is queued, atomically with
//! respect to the pushes that arrive meanwhile.
//!
//! A full queue means the client reads too slowly: the connection is told to close now (4001)
//! and nothing more is queued.

use std::{collections::VecDeque, sync::Mutex, task::Waker};

use axum::extract::ws::Utf8Bytes;
use futures::task::AtomicWaker;

use super::close::CloseReason;
use crate::order::SentOrder;

/// An entry of the outgoing queue.
#[derive(Debug)]
pub(crate) enum Outbound {
    Frame(Utf8Bytes),
    /// Close after everything queued before it (graceful shutdown).
    Close(CloseReason),
}

/// What the connection task should do, besides writing what is queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Signal {
    /// Close now, dropping what is still queued.
    Stop(CloseReason),
    /// The gateway is shutting down: finish what is in flight, then close 1001.
    Shutdown,
}

#[derive(Default)]
struct Queue {
    items: VecDeque<Outbound>,
    stop: Option<CloseReason>,
    shutdown: bool,
    /// Told the task about `shutdown` already.
    shutdown_seen: bool,
    order: Option<Box<SentOrder>>,
}

/// Room kept after the queue drained: more than this is given back.
const KEEP: usize = 8;

pub(crate) struct Outbox {
    queue: Mutex<Queue>,
    waker: AtomicWaker,
    capacity: usize,
}

impl Outbox {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            queue: Mutex::default(),
            waker: AtomicWaker::new(),
            capacity: capacity.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `text` under an already held lock; a full queue stops the connection.
    fn queue(&self, q: &mut Queue, text: Utf8Bytes) -> Result<(), CloseReason> {
        if let Some(reason) = q.stop {
            return Err(reason);
        }
        if q.items.len() >= self.capacity {
            tracing::info!("outgoing queue full, closing slow consumer");
            q.stop = Some(CloseReason::SlowConsumer);
            q.items = VecDeque::new();
            return Err(CloseReason::SlowConsumer);
        }
        q.items.push_back(Outbound::Frame(text));
        Ok(())
    }

    /// Queues a frame of the connection's own (an answer, an error).
    pub(crate) fn push(&self, text: Utf8Bytes) -> Result<(), CloseReason> {
        let result = self.queue(&mut self.lock(), text);
        self.waker.wake();
        result
    }

    /// Queues a push for `user`'s connection, unless it answers a send still waiting for its
    /// `sent` (then it is held, see [`SentOrder`]). False when the connection is closing (a
    /// full queue closes it now).
    pub(crate) fn push_push(&self, user: &str, text: Utf8Bytes) -> bool {
        let mut q = self.lock();
        let text = match q.order.as_mut() {
            Some(order) => match order.admit(user, text) {
                Some(text) => text,
                None => return q.stop.is_none(),
            },
            None => text,
        };
        let queued = self.queue(&mut q, text).is_ok();
        drop(q);
        self.waker.wake();
        queued
    }

    /// Queues an ephemeral frame (presence, typing) unless the queue is half full; true when
    /// queued. Ephemeral frames never close a connection.
    pub(crate) fn offer(&self, text: Utf8Bytes) -> bool {
        let mut q = self.lock();
        if q.stop.is_some() || q.items.len() >= self.capacity / 2 {
            return false;
        }
        q.items.push_back(Outbound::Frame(text));
        drop(q);
        self.waker.wake();
        true
    }

    /// Puts `hello` in front of whatever was pushed while the connection was opening.
    pub(crate) fn push_front(&self, text: Utf8Bytes) {
        self.lock().items.push_front(Outbound::Frame(text));
        self.waker.wake();
    }

    /// Closes after everything queued so far (beyond the capacity: it is not a frame).
    pub(crate) fn push_close(&self, reason: CloseReason) {
        self.lock().items.push_back(Outbound::Close(reason));
        self.waker.wake();
    }

    /// A send `(conv, id)` is about to be published: what answers it waits for its `sent`.
    pub(crate) fn expect(&self, conv: &str, id: &str) {
        self.lock()
            .order
            .get_or_insert_with(Box::default)
            .expect(conv, id);
    }

    /// Queues the answer to a send (`sent`, or its failure) and, right behind it, the pushes
    /// held back for it; `(conv, id)` names the send.
    pub(crate) fn push_answer(
        &self,
        text: Option<Utf8Bytes>,
        send: Option<(&str, &str)>,
    ) -> Result<(), CloseReason> {
        let mut q = self.lock();
        let mut result = match text {
            Some(text) => self.queue(&mut q, text),
            None => Ok(()),
        };
        if let Some((conv, id)) = send
            && let Some(mut order) = q.order.take()
        {
            order.answered(conv, id);
            while result.is_ok()
                && let Some(text) = order.next_releasable(conv)
            {
                result = self.queue(&mut q, text);
                order.released(conv);
            }
            if !order.is_idle() {
                q.order = Some(order);
            }
        }
        drop(q);
        self.waker.wake();
        result
    }

    /// The gateway is shutting down.
    pub(crate) fn shut_down(&self) {
        self.lock().shutdown = true;
        self.waker.wake();
    }

    /// For the connection task: wake it on the next push, stop or shutdown.
    pub(crate) fn register(&self, waker: &Waker) {
        self.waker.register(waker);
    }

    /// For the connection task: the next entry to write.
    pub(crate) fn pop(&self) -> Option<Outbound> {
        let mut q = self.lock();
        if q.stop.is_some() {
            return None;
        }
        let item = q.items.pop_front();
        if q.items.is_empty() && q.items.capacity() > KEEP {
            q.items = VecDeque::new();
        }
        item
    }

    /// A signal the task has not seen yet (a stop is repeated until the task ends).
    pub(crate) fn signal(&self) -> Option<Signal> {
        let mut q = self.lock();
        if let Some(reason) = q.stop {
            return Some(Signal::Stop(reason));
        }
        if q.shutdown && !q.shutdown_seen {
            q.shutdown_seen = true;
            return Some(Signal::Shutdown);
        }
        None
    }

    /// Frames queued now.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().items.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: &str) -> Utf8Bytes {
        Utf8Bytes::from(s.to_owned())
    }

    fn frames(out: &Outbox) -> Vec<String> {
        let mut v = Vec::new();
        while let Some(item) = out.pop() {
            match item {
                Outbound::Frame(t) => v.push(t.as_str().to_owned()),
                Outbound::Close(r) => v.push(format!("close {}", r.label())),
            }
        }
        v
    }

    #[test]
    fn a_full_queue_stops_the_connection_and_takes_nothing_more() {
        let out = Outbox::new(2);
        out.push(text("a")).unwrap();
        assert!(out.push_push("al", text("b")));
        assert_eq!(out.push(text("c")), Err(CloseReason::SlowConsumer));
        assert!(!out.push_push("al", text("d")));
        assert_eq!(out.signal(), Some(Signal::Stop(CloseReason::SlowConsumer)));
        assert!(
            frames(&out).is_empty(),
            "a stopped connection writes nothing more"
        );
    }

    #[test]
    fn ephemeral_frames_are_shed_at_half_and_never_stop_it() {
        let out = Outbox::new(4);
        assert!(out.offer(text("p1")));
        assert!(out.offer(text("p2")));
        assert!(!out.offer(text("p3")), "half full: shed");
        out.push(text("m1")).unwrap();
        out.push(text("m2")).unwrap();
        assert_eq!(out.signal(), None);
        assert_eq!(frames(&out), ["p1", "p2", "m1", "m2"]);
    }

    #[test]
    fn a_held_answer_follows_its_sent() {
        let out = Outbox::new(8);
        out.expect("dm~al~bo", "m1");
        let own = r#"{"type":"message","conv":"dm~al~bo","seq":1,"from":"al","id":"m1","ts":1,"body":""}"#;
        assert!(out.push_push("al", text(own)));
        assert_eq!(out.len(), 0, "held");
        out.push_answer(Some(text("sent m1")), Some(("dm~al~bo", "m1")))
            .unwrap();
        assert_eq!(frames(&out), ["sent m1", own]);
        // Nothing awaits: the state is gone, pushes go straight through.
        assert!(out.lock().order.is_none());
    }

    #[test]
    fn shutdown_is_signalled_once_and_hello_goes_first() {
        let out = Outbox::new(4);
        assert!(out.push_push("al", text("early push")));
        out.push_front(text("hello"));
        out.shut_down();
        assert_eq!(out.signal(), Some(Signal::Shutdown));
        assert_eq!(out.signal(), None);
        out.push_close(CloseReason::GoingAway);
        assert_eq!(frames(&out), ["hello", "early push", "close going_away"]);
    }
}
