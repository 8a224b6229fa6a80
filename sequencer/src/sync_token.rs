//! Sync tokens and continuations of `chat.api.sync`, opaque to clients: `v1.<stream seq>` and
//! `v1.<stream seq>.<conv>` (the snapshot a paged sync ends with, and where it goes on).
//! Public so the fuzz targets (`fuzz/`) parse them exactly as the sync API does.

pub fn encode(snapshot: u64) -> String {
    format!("v1.{snapshot}")
}

pub fn encode_next(snapshot: u64, from_conv: &str) -> String {
    format!("v1.{snapshot}.{from_conv}")
}

/// The stream seq of a token.
pub fn decode(token: &str) -> Option<u64> {
    token.strip_prefix("v1.")?.parse().ok()
}

/// The snapshot and the conversation a continuation resumes at.
pub fn decode_next(next: &str) -> Option<(u64, &str)> {
    let (snapshot, conv) = next.strip_prefix("v1.")?.split_once('.')?;
    Some((snapshot.parse().ok()?, conv))
}
