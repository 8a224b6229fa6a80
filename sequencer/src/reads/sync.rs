//! `chat.api.sync`: what changed for a user since a sync token, with the missed messages.

use chat_store::MessageStore;

use super::*;

use crate::sync_token as token;

impl<S: MessageStore> Responder<S> {
    pub(super) async fn sync(&self, payload: &[u8]) -> SyncReply {
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
        let limit = page_limit(req.limit, SYNC_PAGE_MAX)? as usize;
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
                unread: unread(&conv, &summary, read),
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
            // The store pages at most `MAX_PAGE_LIMIT` messages at a time: read as many pages
            // as the request's limit takes.
            let mut after = cursor;
            let mut cut = false;
            'pages: while messages.len() < limit {
                let want = u32::try_from(limit - messages.len()).unwrap_or(u32::MAX);
                let page = self
                    .store
                    .page(conv.as_str(), PageQuery::After { after, limit: want })
                    .await
                    .map_err(store_failed)?;
                let full = page.more;
                for m in page.messages {
                    if m.seq > summary.latest {
                        // Stamped after the user left (or after the index was read).
                        break 'pages;
                    }
                    if budget + weight(&m) > PAGE_MAX_BODY_BYTES && !messages.is_empty() {
                        cut = true;
                        break 'pages;
                    }
                    budget += weight(&m);
                    after = m.seq;
                    messages.push(to_frame(m));
                }
                if !full {
                    break;
                }
                // More of this conversation remains: another page, or the client's next one.
                cut = true;
            }
            if cut && after < summary.latest {
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
