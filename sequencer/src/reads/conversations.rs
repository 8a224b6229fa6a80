//! `chat.api.conversations`: a user's conversations with names, counts and unread.

use chat_store::MessageStore;

use super::*;

impl<S: MessageStore> Responder<S> {
    pub(super) async fn conversations(&self, payload: &[u8]) -> ConversationsReply {
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
        let limit = page_limit(req.limit, CONVERSATIONS_PAGE_MAX)?;
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
                unread: unread(&conv, summary, read),
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
}
