//! `chat.api.contacts`: which of a bounded list of users share a conversation with a user, for
//! the presence service's privacy rule (a user sees the presence and last seen only of its
//! contacts). A contact is the other member of a one-to-one conversation with at least one
//! message, or a current member of a group the user is currently in; the user itself counts.
//!
//! Answered from the local store without waiting for it to catch up with the stream: a
//! conversation a few milliseconds old may not count yet, which errs on the private side.
//!
//! Cost: one scan of the user's conversation index, plus one member list per group the user is
//! in, stopping as soon as every asked user was found.

use std::collections::HashSet;

use chat_protocol::{
    api::{CONTACTS_MAX, ContactsReply, ContactsRequest},
    frames::{ErrorCode, ErrorFrame},
    ids::{ConvId, UserId},
};
use chat_store::{MAX_PAGE_LIMIT, MessageStore};

/// Answers one contacts request.
pub(crate) async fn answer<S: MessageStore>(store: &S, payload: &[u8]) -> ContactsReply {
    match contacts(store, payload).await {
        Ok(users) => ContactsReply::Contacts { users },
        Err(e) => ContactsReply::Error(e),
    }
}

async fn contacts<S: MessageStore>(store: &S, payload: &[u8]) -> Result<Vec<String>, ErrorFrame> {
    let req: ContactsRequest = serde_json::from_slice(payload)
        .map_err(|_| ErrorFrame::new(ErrorCode::InvalidFrame, "undecodable contacts request"))?;
    let user = UserId::parse(&req.user)
        .map_err(|e| ErrorFrame::new(ErrorCode::InvalidId, e.to_string()))?;
    if req.users.len() > CONTACTS_MAX {
        return Err(ErrorFrame::new(
            ErrorCode::InvalidFrame,
            format!("at most {CONTACTS_MAX} users per contacts request"),
        ));
    }
    if let Some(bad) = req.users.iter().find(|u| UserId::parse(u).is_err()) {
        return Err(ErrorFrame::new(
            ErrorCode::InvalidId,
            format!("invalid user id {bad:?}"),
        ));
    }
    let mut wanted: HashSet<&str> = req.users.iter().map(String::as_str).collect();
    let mut found: HashSet<String> = HashSet::new();
    if wanted.remove(user.as_str()) {
        found.insert(user.to_string());
    }
    let failed = |err: chat_store::StoreError| {
        tracing::error!(error = %err, "contacts: store read failed");
        ErrorFrame::new(ErrorCode::Internal, "store read failed")
    };
    let mut from: Option<String> = None;
    let mut groups = Vec::new();
    while !wanted.is_empty() {
        let page = store
            .user_conversations(user.as_str(), 0, from.as_deref(), MAX_PAGE_LIMIT)
            .await
            .map_err(failed)?;
        for conv in &page.convs {
            let Ok(id) = ConvId::parse(&conv.conv) else {
                continue;
            };
            if conv.left.is_some() {
                continue;
            }
            if id.is_group() {
                groups.push(conv.conv.clone());
            } else if conv.latest > 0
                && let Some(pair) = id.direct_members()
            {
                let other = if pair[0] == user { &pair[1] } else { &pair[0] };
                if wanted.remove(other.as_str()) {
                    found.insert(other.to_string());
                }
            }
        }
        match page.next_from() {
            Some(next) => from = Some(next),
            None => break,
        }
    }
    for group in groups {
        if wanted.is_empty() {
            break;
        }
        for member in store.members(&group).await.map_err(failed)? {
            if member.left.is_none() && wanted.remove(member.user.as_str()) {
                found.insert(member.user);
            }
        }
    }
    Ok(req
        .users
        .into_iter()
        .filter(|u| found.contains(u))
        .fold(Vec::new(), |mut acc, u| {
            if !acc.contains(&u) {
                acc.push(u);
            }
            acc
        }))
}
