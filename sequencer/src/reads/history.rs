//! `chat.api.history`: a page of one conversation (before a seq, after a seq, or a range),
//! within the reader's membership window.

use chat_store::MessageStore;

use super::*;

impl<S: MessageStore> Responder<S> {
    pub(super) async fn history(&self, payload: &[u8]) -> HistoryReply {
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
        let limit = page_limit(req.limit, HISTORY_PAGE_MAX)?;
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
}
