//! `chat.api.receipts`: every member's watermarks, and who has or read a given seq.

use chat_store::MessageStore;

use super::*;

impl<S: MessageStore> Responder<S> {
    pub(super) async fn receipts(&self, payload: &[u8]) -> ReceiptsReply {
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
}
