//! Every NATS subject the system uses is built here and nowhere else. See `nats/README.md`.

use crate::ids::{ConvId, GatewayId, UserId};

/// Number of conversation partitions. Fixed by the `CHAT_IN` subject transform
/// (`partition(8,1)`) and by the per-partition consumers in `nats/consumers/`.
pub const PARTITIONS: u32 = 8;

/// Stream holding client sends and receipts until the sequencer handled them.
pub const STREAM_INBOUND: &str = "CHAT_IN";
/// Stream holding stamped messages, one subject per conversation.
pub const STREAM_STAMPED: &str = "CHAT_MSGS";

/// Priority group of the sequencer's partition consumers.
pub const SEQUENCER_GROUP: &str = "sequencer";
/// Priority group of the fan-out workers' partition consumers.
pub const FANOUT_GROUP: &str = "fanout";

/// Stream holding offline push notifications, `chat.push.<user>`.
pub const STREAM_PUSH: &str = "CHAT_PUSH";

/// Queue group of the request responders (history, sync, receipts).
pub const API_QUEUE: &str = "api";
/// Request subject for history pages (payload: [`crate::api::HistoryRequest`]).
pub const HISTORY_API: &str = "chat.api.history";
/// Request subject for sync pages (payload: [`crate::api::SyncRequest`]).
pub const SYNC_API: &str = "chat.api.sync";
/// Request subject for receipt watermarks (payload: [`crate::api::ReceiptsRequest`]).
pub const RECEIPTS_API: &str = "chat.api.receipts";

/// Request subject for a user's conversation list (payload:
/// [`crate::api::ConversationsRequest`]).
pub const CONVERSATIONS_API: &str = "chat.api.conversations";
/// Request subject for a group's members (payload: [`crate::api::GroupInfoRequest`]).
pub const GROUP_INFO_API: &str = "chat.api.group_info";

/// Request subject: which of a bounded list of users share a conversation with a user
/// (payload: [`crate::api::ContactsRequest`]), answered by the sequencers (queue group `api`).
pub const CONTACTS_API: &str = "chat.api.contacts";

/// Queue group of the presence service's request responders and typing relays.
pub const PRESENCE_QUEUE: &str = "presence";
/// Request subject: the presence of a bounded list of users, as one user may see it (payload:
/// [`crate::api::PresenceRequest`]), answered by the presence service.
pub const PRESENCE_API: &str = "chat.api.presence";
/// Request subject: a user's presence settings (payload:
/// [`crate::api::PresenceSettingsRequest`]), answered by the presence service.
pub const PRESENCE_SETTINGS_API: &str = "chat.api.presence_settings";
/// Every gateway's presence reports, `chat.presence.report.<gateway>`: every presence replica
/// subscribes to all of them (not a queue group; each keeps the same view).
pub const PRESENCE_REPORTS: &str = "chat.presence.report.*";
/// Where presence replicas announce themselves to share the user partitions
/// (`chat_common::balance`).
pub const PRESENCE_LIVE: &str = "chat.ctl.presence.live";
/// Name of the KV bucket holding presence (stream `KV_PRESENCE`, see `nats/README.md`).
pub const PRESENCE_BUCKET: &str = "PRESENCE";
/// The stream behind [`PRESENCE_BUCKET`].
pub const STREAM_PRESENCE: &str = "KV_PRESENCE";
/// Typing indicators of groups, relayed by the presence service (queue group `presence`).
pub const TYPING_GROUPS: &str = "chat.typing.*";

/// Where gateway `gateway` reports its devices: [`crate::api::PresenceReport`].
pub fn presence_report(gateway: &GatewayId) -> String {
    format!("chat.presence.report.{gateway}")
}

/// Where the presence service pushes changes of the users watched at gateway `gateway`:
/// [`crate::api::PresencePush`]. One subscription per gateway, whatever its connections watch.
pub fn presence_push(gateway: &GatewayId) -> String {
    format!("chat.presence.push.{gateway}")
}

/// A typing indicator in a group, for the presence service to relay to its online members.
pub fn typing_group(conv: &ConvId) -> String {
    format!("chat.typing.{conv}")
}

/// The gateway id of a report subject `chat.presence.report.<gateway>`.
pub fn split_presence_report(subject: &str) -> Option<&str> {
    subject.strip_prefix("chat.presence.report.")
}

/// KV key (in [`PRESENCE_BUCKET`]) of `user`'s devices on `gateway`: present, with a per-key
/// TTL, while the user has a device there.
pub fn presence_online_key(user: &UserId, gateway: &GatewayId) -> String {
    format!("on.{user}.{gateway}")
}

/// KV key of the last time `user` went offline.
pub fn presence_seen_key(user: &UserId) -> String {
    format!("seen.{user}")
}

/// KV key of `user`'s presence settings.
pub fn presence_settings_key(user: &UserId) -> String {
    format!("cfg.{user}")
}

/// The subject a KV key of [`PRESENCE_BUCKET`] is stored under, for writes the KV API does not
/// offer (a put with a per-key TTL).
pub fn presence_kv_subject(key: &str) -> String {
    format!("$KV.{PRESENCE_BUCKET}.{key}")
}

/// What a KV key of [`PRESENCE_BUCKET`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PresenceKey<'a> {
    Online { user: &'a str, gateway: &'a str },
    Seen { user: &'a str },
    Settings { user: &'a str },
}

/// Parses a key built by the `presence_*_key` functions.
pub fn parse_presence_key(key: &str) -> Option<PresenceKey<'_>> {
    let mut parts = key.split('.');
    let key = match (parts.next()?, parts.next()?, parts.next()) {
        ("on", user, Some(gateway)) => PresenceKey::Online { user, gateway },
        ("seen", user, None) => PresenceKey::Seen { user },
        ("cfg", user, None) => PresenceKey::Settings { user },
        _ => return None,
    };
    parts.next().is_none().then_some(key)
}

/// Where a gateway publishes a client's send or receipt: `chat.in.<conv>`. `CHAT_IN` rewrites it to
/// `chat.inp.<partition>.<conv>` on ingest.
pub fn inbound(conv: &ConvId) -> String {
    format!("chat.in.{conv}")
}

/// The filter of the sequencer consumer of one partition.
pub fn inbound_partition_filter(partition: u32) -> String {
    format!("chat.inp.{partition}.*")
}

/// The stamped subject of a conversation: `chat.msg.<partition>.<conv>` for one-to-one
/// conversations, `chat.gmsg.<partition>.<conv>` for groups (so groups have fan-out consumers
/// of their own, and a flooding group cannot hold up one-to-one delivery in JetStream). One
/// subject per conversation, so `Nats-Expected-Last-Subject-Sequence` fences its stamper.
pub fn stamped(conv: &ConvId) -> String {
    let kind = if conv.is_group() { "gmsg" } else { "msg" };
    format!("chat.{kind}.{}.{conv}", partition_of(conv))
}

/// The subject of a conversation's receipt events in `CHAT_MSGS`: `chat.rcpt.<partition>.<conv>`
/// (`chat.grcpt.…` for groups). Separate from [`stamped`], so receipts never move the stamping
/// fence.
pub fn receipts(conv: &ConvId) -> String {
    let kind = if conv.is_group() { "grcpt" } else { "rcpt" };
    format!("chat.{kind}.{}.{conv}", partition_of(conv))
}

/// The filters of the one-to-one fan-out consumer of one partition: its messages and receipts.
pub fn stamped_partition_filters(partition: u32) -> [String; 2] {
    [
        format!("chat.msg.{partition}.*"),
        format!("chat.rcpt.{partition}.*"),
    ]
}

/// The filters of the group fan-out consumer of one partition: its messages and receipts.
pub fn group_partition_filters(partition: u32) -> [String; 2] {
    [
        format!("chat.gmsg.{partition}.*"),
        format!("chat.grcpt.{partition}.*"),
    ]
}

/// Whether a `CHAT_MSGS` subject carries receipts (`chat.rcpt.…`, `chat.grcpt.…`) rather than
/// messages.
pub fn is_receipt_subject(subject: &str) -> bool {
    subject.starts_with("chat.rcpt.") || subject.starts_with("chat.grcpt.")
}

/// Where offline push notifications for `user` go: `chat.push.<user>` in `CHAT_PUSH`.
pub fn push(user: &UserId) -> String {
    format!("chat.push.{user}")
}

/// Core NATS subject of a large group: a fan-out worker publishes each of its events here once,
/// and every gateway with a connected member subscribes (see `nats/README.md`, "Groups").
pub fn group(conv: &ConvId) -> String {
    format!("chat.grp.{conv}")
}

/// Core NATS subject on which every device of `user` receives its pushes.
pub fn user(user: &UserId) -> String {
    format!("chat.user.{user}")
}

/// The conversation id and partition token of a subject `chat.inp.<p>.<conv>`,
/// `chat.msg.<p>.<conv>` or `chat.rcpt.<p>.<conv>`.
pub fn split_partitioned(subject: &str) -> Option<(u32, &str)> {
    let mut parts = subject.splitn(4, '.');
    let (_chat, _kind) = (parts.next()?, parts.next()?);
    let p = parts.next()?.parse().ok()?;
    Some((p, parts.next()?))
}

/// The partition of a conversation, computed exactly as nats-server's `partition(n, 1)` subject
/// transform does (FNV-1a 32 of the token, modulo n), so services agree with the stream.
pub fn partition_of(conv: &ConvId) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in conv.as_str().bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h % PARTITIONS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_and_splits_subjects() {
        let conv = ConvId::parse("dm~alice~bob").unwrap();
        let s = stamped(&conv);
        let (p, c) = split_partitioned(&s).unwrap();
        assert_eq!(c, "dm~alice~bob");
        assert_eq!(p, partition_of(&conv));
        assert!(p < PARTITIONS);
        assert_eq!(inbound(&conv), "chat.in.dm~alice~bob");
        let r = receipts(&conv);
        assert!(is_receipt_subject(&r) && !is_receipt_subject(&s));
        assert_eq!(split_partitioned(&r), Some((p, "dm~alice~bob")));
        assert!(stamped_partition_filters(p).contains(&format!("chat.rcpt.{p}.*")));
        assert_eq!(push(&UserId::parse("bob").unwrap()), "chat.push.bob");
        assert_eq!(split_partitioned("chat.inp.3.dm~a~b"), Some((3, "dm~a~b")));
        let g = ConvId::parse("g~team").unwrap();
        let (gm, gr) = (stamped(&g), receipts(&g));
        assert!(gm.starts_with("chat.gmsg.") && gr.starts_with("chat.grcpt."));
        assert!(is_receipt_subject(&gr) && !is_receipt_subject(&gm));
        assert_eq!(split_partitioned(&gm), Some((partition_of(&g), "g~team")));
        assert_eq!(group(&g), "chat.grp.g~team");
        let pg = partition_of(&g);
        assert!(group_partition_filters(pg).contains(&format!("chat.gmsg.{pg}.*")));
        assert_eq!(split_partitioned("chat.inp.x.dm~a~b"), None);
        assert_eq!(split_partitioned("chat.inp"), None);
    }

    #[test]
    fn presence_subjects_and_keys() {
        let gw = GatewayId::parse("gw-1").unwrap();
        let u = UserId::parse("alice").unwrap();
        assert_eq!(presence_report(&gw), "chat.presence.report.gw-1");
        assert_eq!(split_presence_report(&presence_report(&gw)), Some("gw-1"));
        assert_eq!(presence_push(&gw), "chat.presence.push.gw-1");
        let on = presence_online_key(&u, &gw);
        assert_eq!(
            parse_presence_key(&on),
            Some(PresenceKey::Online {
                user: "alice",
                gateway: "gw-1"
            })
        );
        assert_eq!(
            parse_presence_key(&presence_seen_key(&u)),
            Some(PresenceKey::Seen { user: "alice" })
        );
        assert_eq!(
            parse_presence_key(&presence_settings_key(&u)),
            Some(PresenceKey::Settings { user: "alice" })
        );
        assert_eq!(parse_presence_key("on.alice"), None);
        assert_eq!(parse_presence_key("seen.a.b"), None);
        assert_eq!(parse_presence_key("x.alice"), None);
        assert_eq!(presence_kv_subject(&on), "$KV.PRESENCE.on.alice.gw-1");
        let g = ConvId::parse("g~team").unwrap();
        assert_eq!(typing_group(&g), "chat.typing.g~team");
        assert!(PRESENCE_REPORTS.ends_with(".*") && TYPING_GROUPS.ends_with(".*"));
    }
}
