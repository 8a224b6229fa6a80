//! Who may upload to and download from a conversation: its members. A one-to-one
//! conversation's members follow from its id (`dm~a~b`); a group's are asked from the
//! sequencer over `chat.api.group_info` (with `user` set: it answers `not_member` for
//! non-members). A yes is reused for `membership_cache_ms`, so a member removed from a group may
//! still get download URLs for that long; a no is never cached (a new member is let in at once).

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use chat_protocol::{
    api::{GroupInfoReply, GroupInfoRequest},
    frames::ErrorCode,
    ids::{ConvId, UserId},
    subjects,
};

/// Why membership could not be decided.
#[derive(Debug, thiserror::Error)]
#[error("group membership unknown: {0}")]
pub struct MembershipError(String);

/// Most cached answers; the cache is emptied when it fills (it only saves round trips).
const CACHE_MAX: usize = 100_000;

pub struct Membership {
    nats: async_nats::Client,
    timeout: Duration,
    ttl: Duration,
    cache: Mutex<HashMap<(String, String), Instant>>,
}

impl Membership {
    pub fn new(nats: async_nats::Client, timeout: Duration, ttl: Duration) -> Self {
        Self {
            nats,
            timeout,
            ttl,
            cache: Mutex::default(),
        }
    }

    /// Whether `user` is a current member of `conv`.
    pub async fn is_member(&self, conv: &ConvId, user: &UserId) -> Result<bool, MembershipError> {
        if !conv.is_group() {
            return Ok(conv.is_direct_member(user));
        }
        let key = (conv.to_string(), user.to_string());
        if let Some(at) = self.cache.lock().expect("cache lock").get(&key)
            && at.elapsed() < self.ttl
        {
            return Ok(true);
        }
        let request = GroupInfoRequest {
            conv: conv.to_string(),
            user: Some(user.to_string()),
            since: None,
        };
        let payload = serde_json::to_vec(&request).expect("requests encode");
        let reply = self
            .nats
            .send_request(
                subjects::GROUP_INFO_API,
                async_nats::Request::new()
                    .payload(payload.into())
                    .timeout(Some(self.timeout)),
            )
            .await
            .map_err(|e| MembershipError(e.to_string()))?;
        match serde_json::from_slice::<GroupInfoReply>(&reply.payload) {
            Ok(GroupInfoReply::Group { .. }) => {
                let mut cache = self.cache.lock().expect("cache lock");
                if cache.len() >= CACHE_MAX {
                    cache.clear();
                }
                cache.insert(key, Instant::now());
                Ok(true)
            }
            Ok(GroupInfoReply::Error(e))
                if matches!(e.code, ErrorCode::NotMember | ErrorCode::NotFound) =>
            {
                Ok(false)
            }
            Ok(GroupInfoReply::Error(e)) => Err(MembershipError(format!(
                "{}: {}",
                e.code.as_str(),
                e.message
            ))),
            Err(e) => Err(MembershipError(format!("malformed reply: {e}"))),
        }
    }
}
