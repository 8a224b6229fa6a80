//! `chat.api.group_info`: a group's name and current members (for clients, and for fan-out
//! workers seeding their membership views).

use chat_store::MessageStore;

use super::*;

impl<S: MessageStore> Responder<S> {
    pub(super) async fn group_info(&self, payload: &[u8]) -> GroupInfoReply {
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
}
