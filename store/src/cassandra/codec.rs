//! Pure mappings between the store's values and their CQL form: buckets, bigints, write
//! timestamps and message rows. Nothing here talks to a server.

use crate::StoredMessage;

/// Seqs per message partition: `(conv, bucket)` holds seqs `bucket * BUCKET_SEQS + 1 ..=
/// (bucket + 1) * BUCKET_SEQS`. Part of the schema: changing it would hide stored messages.
pub const BUCKET_SEQS: u64 = 10_000;

/// The `user_feed` position of a group the user is in: after every real position, so a
/// `pos > since` read always returns it (its position is the conversation's).
pub const FOLLOW_POS: i64 = i64::MAX;

/// Largest value a write timestamp is derived from; larger ones share its timestamp. About
/// 10^15: a stream would need that many messages to reach it, and as microseconds it is in
/// 2005, so no server refuses it as a timestamp from the future.
pub const TS_CAP: u64 = 1 << 50;

/// The message partition of `seq` (seqs start at 1).
pub fn bucket(seq: u64) -> i64 {
    (seq.saturating_sub(1) / BUCKET_SEQS) as i64
}

/// The first and last seq of a bucket.
pub fn bucket_bounds(bucket: i64) -> (u64, u64) {
    let b = bucket.max(0) as u64;
    (b * BUCKET_SEQS + 1, (b + 1) * BUCKET_SEQS)
}

/// A u64 as a CQL bigint, bit for bit (values above `i64::MAX` come back unchanged through
/// [`from_big`], but sort as negative numbers: clustering columns refuse them, see
/// [`MAX_CLUSTERED`]).
pub fn big(v: u64) -> i64 {
    v as i64
}

/// The inverse of [`big`].
pub fn from_big(v: i64) -> u64 {
    v as u64
}

/// Largest seq or position stored in a clustering column (`messages.seq`, `user_feed.pos`):
/// they must sort as numbers, and `i64::MAX` itself is [`FOLLOW_POS`].
pub const MAX_CLUSTERED: u64 = i64::MAX as u64 - 1;

/// The write timestamp of a max-register write of `v`: the register keeps the value written
/// with the highest timestamp, so it keeps the greatest value, whatever order writes land in.
/// Never 0 or negative.
pub fn ts_max(v: u64) -> i64 {
    1 + v.min(TS_CAP) as i64
}

/// The write timestamp of a min-register write of `v` (the client id record: the earliest
/// stream position wins).
pub fn ts_min(v: u64) -> i64 {
    1 + (TS_CAP - v.min(TS_CAP)) as i64
}

/// The columns of a `messages` row after its key, in the order the statements use:
/// `from_user, client_id, ts_ms, body, stream_seq, event, media`.
pub type MessageColumns = (
    String,
    String,
    i64,
    String,
    i64,
    Option<String>,
    Option<String>,
);

/// A `messages` row (`seq` plus [`MessageColumns`]) as the message of `conv` it stores.
pub fn message_from_row(conv: &str, seq: i64, c: MessageColumns) -> StoredMessage {
    let (from, client_id, ts_ms, body, stream_seq, event, media) = c;
    StoredMessage {
        conv: conv.to_owned(),
        seq: from_big(seq),
        from,
        client_id,
        ts_ms: from_big(ts_ms),
        body,
        stream_seq: from_big(stream_seq),
        event,
        media,
    }
}

/// `m`'s [`MessageColumns`].
pub fn message_columns(m: &StoredMessage) -> MessageColumns {
    (
        m.from.clone(),
        m.client_id.clone(),
        big(m.ts_ms),
        m.body.clone(),
        big(m.stream_seq),
        m.event.clone(),
        m.media.clone(),
    )
}

/// Rough size of a message's values on the wire, for keeping batches under the server's
/// batch size limits.
pub fn message_weight(m: &StoredMessage) -> usize {
    64 + m.conv.len()
        + m.from.len()
        + m.client_id.len()
        + m.body.len()
        + m.event.as_ref().map_or(0, String::len)
        + m.media.as_ref().map_or(0, String::len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_hold_ten_thousand_seqs_each() {
        assert_eq!(bucket(1), 0);
        assert_eq!(bucket(10_000), 0);
        assert_eq!(bucket(10_001), 1);
        assert_eq!(bucket(20_000), 1);
        assert_eq!(bucket(20_001), 2);
        // Seq 0 is never stored; it maps to the first bucket rather than underflowing.
        assert_eq!(bucket(0), 0);
        assert_eq!(bucket_bounds(0), (1, 10_000));
        assert_eq!(bucket_bounds(3), (30_001, 40_000));
        for seq in [1, 9_999, 10_000, 10_001, 123_456_789] {
            let (lo, hi) = bucket_bounds(bucket(seq));
            assert!(lo <= seq && seq <= hi, "{seq} in {lo}..={hi}");
        }
        assert_eq!(bucket(MAX_CLUSTERED), (MAX_CLUSTERED - 1) as i64 / 10_000);
    }

    #[test]
    fn bigints_round_trip_every_u64() {
        for v in [
            0,
            1,
            42,
            i64::MAX as u64,
            i64::MAX as u64 + 1,
            u64::MAX - 1,
            u64::MAX,
        ] {
            assert_eq!(from_big(big(v)), v);
        }
    }

    #[test]
    fn max_register_timestamps_grow_with_the_value() {
        assert_eq!(ts_max(0), 1);
        assert!(ts_max(1) > ts_max(0));
        assert!(ts_max(1_000_000) > ts_max(999_999));
        // Beyond the cap they tie (the server then keeps the greater value).
        assert_eq!(ts_max(TS_CAP), ts_max(u64::MAX));
        assert!(ts_max(u64::MAX) > 0);
        // Far below "now" in microseconds (2020 is about 1.6e15).
        assert!(ts_max(u64::MAX) < 1_600_000_000_000_000);
    }

    #[test]
    fn min_register_timestamps_shrink_with_the_value() {
        assert!(ts_min(1) > ts_min(2));
        assert!(ts_min(0) > ts_min(1));
        assert_eq!(ts_min(u64::MAX), 1);
        assert!(ts_min(0) < 1_600_000_000_000_000);
    }

    #[test]
    fn message_rows_round_trip() {
        let m = StoredMessage {
            conv: "g~x".into(),
            seq: 7,
            from: "alice".into(),
            client_id: "c7".into(),
            ts_ms: u64::MAX,
            body: "héllo \0".into(),
            stream_seq: u64::MAX - 1,
            event: Some("{}".into()),
            media: None,
        };
        assert_eq!(message_from_row("g~x", 7, message_columns(&m)), m);
        assert!(message_weight(&m) > m.body.len());
    }
}
