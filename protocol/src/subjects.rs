//! Every NATS subject the system uses is built here and nowhere else. See `nats/README.md`.
//!
//! Conversations are spread over partitions: `CHAT_IN` maps `chat.in.<conv>` to
//! `chat.inp.<p>.<conv>` on ingest, with `p = partition(n, 1)` (FNV-1a of the conversation id
//! modulo the partition count `n`, a deployment choice, [`DEFAULT_PARTITIONS`] by default). Each
//! partition has one owner at a time. The stamped subjects carry the partition their inbound
//! message came from, and every lookup of a conversation's last stamped message matches any
//! partition ([`stamped_any`]), so a conversation keeps its order when the partition count
//! changes (`nats/README.md`, "Changing the partition count").

use crate::ids::{ConvId, GatewayId, UserId};

/// The partition count the files in `nats/` are written for. The live count is read from the
/// `CHAT_IN` subject transform ([`partitions_of_transform`]).
pub const DEFAULT_PARTITIONS: u32 = 16;

/// The largest partition count the services accept (a consumer per partition and kind).
pub const MAX_PARTITIONS: u32 = 4096;

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

/// Core NATS subject on which the processes of one kind (`sequencer`, `fanout.direct`,
/// `fanout.groups`) announce themselves to share the partition consumers
/// (`chat.ctl.<kind>.live`).
pub fn balance(kind: &str) -> String {
    format!("chat.ctl.{kind}.live")
}

/// Request subject for checking a media message's upload (payload:
/// [`crate::api::MediaVerifyRequest`]), answered by the media service.
pub const MEDIA_VERIFY_API: &str = "chat.api.media.verify";
/// Queue group of the media service's responders.
pub const MEDIA_QUEUE: &str = "media";
/// JetStream key-value bucket of the media service's upload records (stream `KV_CHAT_MEDIA`).
pub const MEDIA_BUCKET: &str = "CHAT_MEDIA";

/// JetStream key-value bucket of the gateways' per-user abuse budgets (stream
/// [`STREAM_LIMITS`]): groups created, members added, new conversations opened.
pub const LIMITS_BUCKET: &str = "CHAT_LIMITS";
/// The stream behind [`LIMITS_BUCKET`].
pub const STREAM_LIMITS: &str = "KV_CHAT_LIMITS";

/// KV key (in [`LIMITS_BUCKET`]) of `user`'s budget `budget` (`g` groups created, `m` members
/// added, `n` new conversations opened).
pub fn limits_key(budget: &str, user: &UserId) -> String {
    format!("{budget}.{user}")
}

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

/// The `CHAT_IN` subject transform destination for `partitions` partitions.
pub fn inbound_transform_dest(partitions: u32) -> String {
    format!("chat.inp.{{{{partition({partitions},1)}}}}.{{{{wildcard(1)}}}}")
}

/// The partition count of a `CHAT_IN` subject transform destination, if it is one that
/// [`inbound_transform_dest`] makes.
pub fn partitions_of_transform(dest: &str) -> Option<u32> {
    let n = dest
        .strip_prefix("chat.inp.{{partition(")?
        .strip_suffix(",1)}}.{{wildcard(1)}}")?
        .parse()
        .ok()?;
    (1..=MAX_PARTITIONS).contains(&n).then_some(n)
}

fn kind(conv: &ConvId, direct: &'static str, group: &'static str) -> &'static str {
    if conv.is_group() { group } else { direct }
}

/// The stamped subject of a conversation in partition `partition`: `chat.msg.<p>.<conv>` for
/// one-to-one conversations, `chat.gmsg.<p>.<conv>` for groups (so groups have fan-out consumers
/// of their own, and a flooding group cannot hold up one-to-one delivery in JetStream). The
/// sequencer stamps on the partition its inbound message came from.
pub fn stamped(conv: &ConvId, partition: u32) -> String {
    format!("chat.{}.{partition}.{conv}", kind(conv, "msg", "gmsg"))
}

/// A conversation's stamped messages in every partition: `chat.msg.*.<conv>`. The stamper's
/// fence (`Nats-Expected-Last-Subject-Sequence-Subject`) and every lookup of a conversation's
/// head use it, so they hold across a change of the partition count.
pub fn stamped_any(conv: &ConvId) -> String {
    format!("chat.{}.*.{conv}", kind(conv, "msg", "gmsg"))
}

/// The subject of a conversation's receipt events in `CHAT_MSGS`: `chat.rcpt.<p>.<conv>`
/// (`chat.grcpt.…` for groups). Separate from [`stamped`], so receipts never move the stamping
/// fence.
pub fn receipts(conv: &ConvId, partition: u32) -> String {
    format!("chat.{}.{partition}.{conv}", kind(conv, "rcpt", "grcpt"))
}

/// A conversation's receipt events in every partition: `chat.rcpt.*.<conv>`.
pub fn receipts_any(conv: &ConvId) -> String {
    format!("chat.{}.*.{conv}", kind(conv, "rcpt", "grcpt"))
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

/// The user token of a subject [`user`] built: `chat.user.<user>` (unvalidated).
pub fn split_user(subject: &str) -> Option<&str> {
    subject
        .strip_prefix("chat.user.")
        .filter(|u| !u.is_empty() && !u.contains('.'))
}

/// The conversation token of a subject [`group`] built: `chat.grp.<conv>` (unvalidated).
pub fn split_group(subject: &str) -> Option<&str> {
    subject
        .strip_prefix("chat.grp.")
        .filter(|c| !c.is_empty() && !c.contains('.'))
}

/// The last token of a delivery confirmation request's reply subject `<prefix>.<token>` names the
/// push; a gateway confirms several pushes of one requester at once with one message to
/// `<prefix>.c` ([`confirm_batch`]) whose payload lists their tokens, comma-separated.
pub const CONFIRM_BATCH_TOKEN: &str = "c";

/// `(prefix, token)` of a reply subject `<prefix>.<token>`.
pub fn split_reply(reply: &str) -> Option<(&str, &str)> {
    reply.rsplit_once('.')
}

/// Where the confirmations of several pushes whose reply subjects share `prefix` go.
pub fn confirm_batch(prefix: &str) -> String {
    format!("{prefix}.{CONFIRM_BATCH_TOKEN}")
}

/// The conversation id and partition token of a subject `chat.inp.<p>.<conv>`,
/// `chat.msg.<p>.<conv>` or `chat.rcpt.<p>.<conv>`.
pub fn split_partitioned(subject: &str) -> Option<(u32, &str)> {
    let mut parts = subject.splitn(4, '.');
    let (_chat, _kind) = (parts.next()?, parts.next()?);
    let p = parts.next()?.parse().ok()?;
    Some((p, parts.next()?))
}

/// The partition of a conversation among `partitions`, computed exactly as nats-server's
/// `partition(n, 1)` subject transform does (FNV-1a 32 of the token, modulo n), so services
/// agree with the stream.
pub fn partition_of(conv: &ConvId, partitions: u32) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in conv.as_str().bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h % partitions.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_and_splits_subjects() {
        let conv = ConvId::parse("dm~alice~bob").unwrap();
        let p = partition_of(&conv, DEFAULT_PARTITIONS);
        assert!(p < DEFAULT_PARTITIONS);
        let s = stamped(&conv, p);
        assert_eq!(split_partitioned(&s), Some((p, "dm~alice~bob")));
        assert_eq!(stamped_any(&conv), "chat.msg.*.dm~alice~bob");
        assert_eq!(inbound(&conv), "chat.in.dm~alice~bob");
        let r = receipts(&conv, p);
        assert!(is_receipt_subject(&r) && !is_receipt_subject(&s));
        assert_eq!(split_partitioned(&r), Some((p, "dm~alice~bob")));
        assert!(stamped_partition_filters(p).contains(&format!("chat.rcpt.{p}.*")));
        assert_eq!(push(&UserId::parse("bob").unwrap()), "chat.push.bob");
        assert_eq!(split_partitioned("chat.inp.3.dm~a~b"), Some((3, "dm~a~b")));
        let g = ConvId::parse("g~team").unwrap();
        let (gm, gr) = (stamped(&g, 5), receipts(&g, 5));
        assert!(gm.starts_with("chat.gmsg.5.") && gr.starts_with("chat.grcpt.5."));
        assert_eq!(stamped_any(&g), "chat.gmsg.*.g~team");
        assert_eq!(receipts_any(&g), "chat.grcpt.*.g~team");
        assert!(is_receipt_subject(&gr) && !is_receipt_subject(&gm));
        assert_eq!(split_partitioned(&gm), Some((5, "g~team")));
        assert_eq!(group(&g), "chat.grp.g~team");
        assert_eq!(split_group(&group(&g)), Some("g~team"));
        let bob = UserId::parse("bob").unwrap();
        assert_eq!(split_user(&user(&bob)), Some("bob"));
        assert_eq!(split_user("chat.user.a.b"), None);
        assert_eq!(split_user("chat.grp.g~team"), None);
        assert_eq!(split_group("chat.user.bob"), None);
        assert!(group_partition_filters(5).contains(&"chat.gmsg.5.*".to_owned()));
        assert_eq!(split_partitioned("chat.inp.x.dm~a~b"), None);
        assert_eq!(split_partitioned("chat.inp"), None);
        assert_eq!(balance("sequencer"), "chat.ctl.sequencer.live");
        assert_eq!(split_reply("_INBOX.abc.17"), Some(("_INBOX.abc", "17")));
        assert_eq!(confirm_batch("_INBOX.abc"), "_INBOX.abc.c");
    }

    #[test]
    fn the_partition_count_round_trips_through_the_transform() {
        for n in [1, 8, 64, 4096] {
            assert_eq!(partitions_of_transform(&inbound_transform_dest(n)), Some(n));
        }
        assert_eq!(
            inbound_transform_dest(8),
            "chat.inp.{{partition(8,1)}}.{{wildcard(1)}}"
        );
        for bad in [
            "",
            "chat.inp.{{partition(0,1)}}.{{wildcard(1)}}",
            "chat.inp.{{partition(4097,1)}}.{{wildcard(1)}}",
            "chat.inp.{{partition(8,2)}}.{{wildcard(1)}}",
            "chat.in.{{partition(8,1)}}.{{wildcard(1)}}",
        ] {
            assert_eq!(partitions_of_transform(bad), None, "{bad}");
        }
    }

    #[test]
    fn doubling_the_count_keeps_a_partition_or_moves_it_up_by_the_old_count() {
        for i in 0..500 {
            let conv = ConvId::parse(&format!("dm~u{i}~v{i}")).unwrap();
            let (old, new) = (partition_of(&conv, 64), partition_of(&conv, 128));
            assert!(new == old || new == old + 64, "{conv}: {old} -> {new}");
        }
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
