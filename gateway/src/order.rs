//! `sent` before whatever answers the same send.
//!
//! A send's `sent` comes from its JetStream ack, while the sequencer's answer to it (the
//! sender's own stamped `message`, or a refusal `error` with the send's `id`) comes through
//! the user's subject, or a large group's: two paths that race. The protocol promises `sent`
//! first. So while a send of this connection waits for its ack, the forwarder holds back a push
//! that answers it, together with every later push of the same conversation (so the
//! conversation's pushes keep their order), and the reader releases them right after it
//! queued the `sent` (or the failure) of that send.
//!
//! Pushes are only looked into while a send of the connection awaits its ack, and then only the
//! few fields that say whom a frame answers. The state lives under the lock of the connection's
//! outgoing queue ([`crate::connection::Outbox`]), and only while the connection has a send in
//! flight or a push held: an idle connection holds none of it.

use std::collections::{HashMap, VecDeque};

use axum::extract::ws::Utf8Bytes;
use serde::Deserialize;

type Key = (String, String);

/// One connection's sends awaiting their `sent`, and the pushes held back for them.
#[derive(Default)]
pub(crate) struct SentOrder {
    /// `(conv, id)` of sends published and not yet answered, with how many.
    awaiting: HashMap<Key, u32>,
    /// Per conversation, the pushes held back, in arrival order, with the send each answers.
    held: HashMap<String, VecDeque<(Option<Key>, Utf8Bytes)>>,
}

/// The fields of a server frame that say whom it answers.
#[derive(Deserialize)]
struct Peek<'a> {
    #[serde(rename = "type", borrow)]
    kind: &'a str,
    #[serde(default, borrow)]
    conv: Option<&'a str>,
    #[serde(default, borrow)]
    id: Option<&'a str>,
    #[serde(default, borrow)]
    from: Option<&'a str>,
}

impl SentOrder {
    /// A send of `(conv, id)` is about to be published.
    pub(crate) fn expect(&mut self, conv: &str, id: &str) {
        *self
            .awaiting
            .entry((conv.to_owned(), id.to_owned()))
            .or_default() += 1;
    }

    /// A push for `user`'s connection: `Some` to queue it now, `None` when it is held back.
    pub(crate) fn admit(&mut self, user: &str, text: Utf8Bytes) -> Option<Utf8Bytes> {
        let inner = self;
        if inner.awaiting.is_empty() && inner.held.is_empty() {
            return Some(text);
        }
        let Ok(peek) = serde_json::from_str::<Peek>(text.as_str()) else {
            return Some(text);
        };
        let Some(conv) = peek.conv else {
            return Some(text);
        };
        let answers = match (peek.kind, peek.id) {
            ("message", Some(id)) if peek.from == Some(user) => Some(id),
            ("error", Some(id)) => Some(id),
            _ => None,
        }
        .map(|id| (conv.to_owned(), id.to_owned()));
        if let Some(queue) = inner.held.get_mut(conv) {
            queue.push_back((answers, text));
            return None;
        }
        match answers {
            Some(key) if inner.awaiting.contains_key(&key) => {
                inner
                    .held
                    .entry(conv.to_owned())
                    .or_default()
                    .push_back((Some(key), text));
                None
            }
            _ => Some(text),
        }
    }

    /// The send `(conv, id)` got its `sent` (or its failure), which is queued.
    pub(crate) fn answered(&mut self, conv: &str, id: &str) {
        let inner = self;
        let key = (conv.to_owned(), id.to_owned());
        if let Some(n) = inner.awaiting.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                inner.awaiting.remove(&key);
            }
        }
    }

    /// The next held push of `conv` that may go now (it answers no send still awaiting its
    /// `sent`); it stays held until [`SentOrder::released`], so pushes arriving meanwhile queue
    /// behind it.
    pub(crate) fn next_releasable(&mut self, conv: &str) -> Option<Utf8Bytes> {
        let Self { awaiting, held } = self;
        let queue = held.get(conv)?;
        match queue.front() {
            None => {
                held.remove(conv);
                None
            }
            Some((Some(key), _)) if awaiting.contains_key(key) => None,
            Some((_, text)) => Some(text.clone()),
        }
    }

    /// The push [`SentOrder::next_releasable`] gave is queued.
    pub(crate) fn released(&mut self, conv: &str) {
        if let Some(queue) = self.held.get_mut(conv) {
            queue.pop_front();
            if queue.is_empty() {
                self.held.remove(conv);
            }
        }
    }

    /// Nothing awaits and nothing is held: the state can go.
    pub(crate) fn is_idle(&self) -> bool {
        self.awaiting.is_empty() && self.held.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: &str) -> Utf8Bytes {
        Utf8Bytes::from(s.to_owned())
    }

    fn drain(order: &mut SentOrder, conv: &str) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(t) = order.next_releasable(conv) {
            out.push(t.as_str().to_owned());
            order.released(conv);
        }
        out
    }

    #[test]
    fn answers_wait_for_their_sent_and_later_pushes_of_the_conversation_wait_behind_them() {
        let mut order = SentOrder::default();
        let me = "al";
        let other =
            r#"{"type":"message","conv":"dm~al~bo","seq":1,"from":"bo","id":"x","ts":1,"body":""}"#;
        // Nothing awaits: everything goes through untouched.
        assert!(order.admit(me, text(other)).is_some());
        order.expect("dm~al~bo", "m1");
        let own = r#"{"type":"message","conv":"dm~al~bo","seq":2,"from":"al","id":"m1","ts":1,"body":""}"#;
        let later =
            r#"{"type":"message","conv":"dm~al~bo","seq":3,"from":"bo","id":"y","ts":1,"body":""}"#;
        let elsewhere =
            r#"{"type":"message","conv":"dm~al~cy","seq":9,"from":"cy","id":"z","ts":1,"body":""}"#;
        assert!(
            order.admit(me, text(own)).is_none(),
            "its own message waits"
        );
        assert!(
            order.admit(me, text(later)).is_none(),
            "and what follows it"
        );
        assert!(
            order.admit(me, text(elsewhere)).is_some(),
            "other conversations go on"
        );
        assert!(
            drain(&mut order, "dm~al~bo").is_empty(),
            "not before the sent"
        );
        order.answered("dm~al~bo", "m1");
        assert_eq!(drain(&mut order, "dm~al~bo"), vec![own, later]);
        assert!(order.admit(me, text(later)).is_some());
    }

    #[test]
    fn a_refusal_waits_for_its_sent_too() {
        let mut order = SentOrder::default();
        let me = "al";
        order.expect("g~t", "m1");
        order.expect("g~t", "m2");
        let refusal =
            r#"{"type":"error","code":"not_member","message":"no","id":"m1","conv":"g~t"}"#;
        let second =
            r#"{"type":"error","code":"not_member","message":"no","id":"m2","conv":"g~t"}"#;
        assert!(order.admit(me, text(refusal)).is_none());
        assert!(order.admit(me, text(second)).is_none());
        order.answered("g~t", "m1");
        assert_eq!(
            drain(&mut order, "g~t"),
            vec![refusal],
            "m2 still awaits its sent"
        );
        order.answered("g~t", "m2");
        assert_eq!(drain(&mut order, "g~t"), vec![second]);
    }
}
