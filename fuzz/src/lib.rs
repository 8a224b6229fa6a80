//! The checks behind the fuzz targets, one function per target.
//!
//! Each takes the raw bytes of one input and panics when a property of the parser breaks; a
//! fuzz target (`fuzz_targets/<name>.rs`) is one line calling its check. The same functions
//! replay the seed corpora (`corpus/<name>/`) as an ordinary `cargo test` in CI
//! (`sequencer/tests/fuzz_corpus.rs` includes this file), so a parser regression is caught
//! without building the fuzz targets.
//!
//! Properties asserted beyond "does not panic":
//! - a frame or service message that decodes re-encodes to JSON that decodes to an equal value;
//! - a valid id is exactly one NATS subject token (no `.`, `*`, `>`, whitespace or control
//!   characters) and parses back to itself;
//! - a token the verifier accepts is HS256, unexpired, with a valid user id, and a token
//!   signed with the public key as an HMAC secret (key confusion) never verifies;
//! - sync tokens and continuations round-trip.

use chat_protocol::{
    api::{
        ContactsRequest, GroupInfoRequest, HistoryRequest, Inbound, MediaVerifyRequest,
        PresencePush, PresenceReport, PresenceRequest, PresenceSettingsRequest, ReceiptsRequest,
        SyncRequest, TypingRelay,
    },
    auth::{TokenVerifier, now_secs},
    frames::{ClientFrame, ServerFrame},
    ids::{ClientMsgId, ConvId, DeviceId, GatewayId, MAX_ID_LEN, UserId},
    subjects,
};
use serde::{Serialize, de::DeserializeOwned};

/// The names of the fuzz targets, which are also the corpus directories.
pub const TARGETS: &[&str] = &[
    "client_frame",
    "token",
    "ids",
    "sync_token",
    "inbound",
    "stamped",
    "service_api",
];

/// Runs the check of target `name` on `data`.
pub fn check(name: &str, data: &[u8]) {
    match name {
        "client_frame" => client_frame(data),
        "token" => token(data),
        "ids" => ids(data),
        "sync_token" => sync_token(data),
        "inbound" => inbound(data),
        "stamped" => stamped(data),
        "service_api" => service_api(data),
        other => panic!("no fuzz target {other}"),
    }
}

/// Decoding `bytes` as `T`, if it works, re-encodes to JSON that decodes to an equal `T`.
fn round_trips<T>(bytes: &[u8]) -> Option<T>
where
    T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let value: T = serde_json::from_slice(bytes).ok()?;
    let encoded = serde_json::to_vec(&value).expect("a decoded value encodes");
    let again: T = serde_json::from_slice(&encoded).expect("an encoded value decodes");
    assert_eq!(value, again, "re-encoded value differs");
    Some(value)
}

/// `s` is exactly one subject token: no separator, wildcard, whitespace or control character.
fn assert_one_token(s: &str) {
    assert!(!s.is_empty(), "empty token");
    assert!(
        !s.chars()
            .any(|c| matches!(c, '.' | '*' | '>') || c.is_whitespace() || c.is_control()),
        "{s:?} is not one subject token"
    );
}

/// A subject made of exactly `n` tokens, none empty.
fn assert_tokens(subject: &str, n: usize) {
    let tokens: Vec<&str> = subject.split('.').collect();
    assert_eq!(
        tokens.len(),
        n,
        "{subject:?} has the wrong number of tokens"
    );
    for t in tokens {
        assert_one_token(t);
    }
}

/// Client frames (JSON over the WebSocket), decoded as the gateway does.
pub fn client_frame(data: &[u8]) {
    match ClientFrame::decode(data) {
        Ok(frame) => {
            let encoded = serde_json::to_vec(&frame).expect("a decoded frame encodes");
            let again = ClientFrame::decode(&encoded).expect("an encoded frame decodes");
            assert_eq!(frame, again, "re-encoded frame differs");
            if let ClientFrame::Send {
                media: Some(media), ..
            } = &frame
            {
                let _ = media.check();
            }
        }
        Err(e) => {
            // What the error echoes back is bounded, whatever the frame held.
            for echoed in [&e.id, &e.req, &e.conv].into_iter().flatten() {
                assert!(echoed.len() <= 256, "echoed field is unbounded");
            }
            assert!(
                e.message.len() <= 64 * 1024 + data.len(),
                "unbounded message"
            );
        }
    }
}

const SECRET: &[u8] = b"fuzz-secret";
/// An Ed25519 public key (its private key was thrown away): nothing can sign for it.
const ED25519_PUBLIC_PEM: &[u8] = b"-----BEGIN PUBLIC KEY-----
MCowBQYDK2VwAyEAAELociZwgeEaPdaDo7XLCe1ySwrUa7atlxVzl2zq824=
-----END PUBLIC KEY-----
";

fn base64url(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

fn assert_accepted_token_is_sound(verifier: &TokenVerifier, token: &str) {
    if let Ok((user, claims)) = verifier.verify(token) {
        let header = jsonwebtoken::decode_header(token).expect("an accepted token has a header");
        assert_eq!(
            header.alg,
            jsonwebtoken::Algorithm::HS256,
            "wrong algorithm"
        );
        assert!(claims.exp > now_secs(), "expired token accepted");
        assert_eq!(user.as_str(), claims.sub);
        assert_one_token(user.as_str());
    }
}

/// Access tokens. Input: the raw token as text, or (after a first byte `0x01`) a header and
/// claims JSON separated by a `0x00` byte, which the check encodes and signs itself so the
/// fuzzer reaches claim validation past the signature check.
pub fn token(data: &[u8]) {
    let hs = TokenVerifier::hs256(SECRET);
    let ed = TokenVerifier::eddsa_pem(ED25519_PUBLIC_PEM).expect("valid public key");
    match data.split_first() {
        Some((1, rest)) => {
            let (header, claims) = match rest.iter().position(|b| *b == 0) {
                Some(i) => (&rest[..i], &rest[i + 1..]),
                None => (rest, &b"{}"[..]),
            };
            let signing_input = format!("{}.{}", base64url(header), base64url(claims));
            let hs256 = jsonwebtoken::Algorithm::HS256;
            let sign = |secret: &[u8]| {
                let key = jsonwebtoken::EncodingKey::from_secret(secret);
                let sig = jsonwebtoken::crypto::sign(signing_input.as_bytes(), &key, hs256)
                    .expect("HMAC signing cannot fail");
                format!("{signing_input}.{sig}")
            };
            let signed = sign(SECRET);
            assert_accepted_token_is_sound(&hs, &signed);
            if let Ok(h) = jsonwebtoken::decode_header(&signed) {
                // Whatever `kid` says, it is only text: it must never select another key.
                let _ = h.kid.map(|k| k.len());
            }
            // Key confusion: HS256 keyed with the public key never passes the EdDSA verifier.
            assert!(
                ed.verify(&sign(ED25519_PUBLIC_PEM)).is_err(),
                "HS256 token accepted by the EdDSA verifier"
            );
            // Unsigned (`alg: none` style) tokens never verify.
            assert!(hs.verify(&format!("{signing_input}.")).is_err());
        }
        _ => {
            let Ok(text) = std::str::from_utf8(data) else {
                return;
            };
            let _ = jsonwebtoken::decode_header(text);
            assert_accepted_token_is_sound(&hs, text);
            assert!(ed.verify(text).is_err(), "forged EdDSA token accepted");
        }
    }
}

/// Every id type, and the subjects built from valid ids.
pub fn ids(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(id) = UserId::parse(s) {
        assert_eq!(id.as_str(), s);
        assert!(s.len() <= MAX_ID_LEN);
        assert_one_token(id.as_str());
        assert_tokens(&subjects::user(&id), 3);
        assert_eq!(subjects::push(&id).split('.').count(), 3);
    }
    if let Ok(id) = DeviceId::parse(s) {
        assert_eq!(id.as_str(), s);
        assert_one_token(id.as_str());
    }
    if let Ok(id) = ClientMsgId::parse(s) {
        assert_eq!(id.as_str(), s);
        assert_one_token(id.as_str());
    }
    if let Ok(id) = GatewayId::parse(s) {
        assert_eq!(id.as_str(), s);
        assert_one_token(id.as_str());
    }
    let sanitized = GatewayId::sanitized(s);
    assert_one_token(sanitized.as_str());
    assert!(sanitized.as_str().len() <= MAX_ID_LEN);
    assert_eq!(
        GatewayId::parse(sanitized.as_str()).as_ref(),
        Ok(&sanitized)
    );
    assert_tokens(&subjects::presence_report(&sanitized), 4);
    if let Ok(conv) = ConvId::parse(s) {
        assert_eq!(conv.as_str(), s);
        assert_one_token(conv.as_str());
        assert_eq!(ConvId::parse(conv.as_str()).as_ref(), Ok(&conv));
        let partition = subjects::partition_of(&conv, 16);
        assert!(partition < 16);
        let stamped = subjects::stamped(&conv, partition);
        assert_eq!(
            subjects::split_partitioned(&stamped),
            Some((partition, conv.as_str()))
        );
        assert_tokens(&stamped, 4);
        assert_tokens(&subjects::inbound(&conv), 3);
        match conv.direct_members() {
            Some([a, b]) => {
                assert!(a < b);
                assert_eq!(ConvId::direct(b, a).as_ref(), Ok(&conv));
                assert!(conv.is_direct_member(a) && conv.is_direct_member(b));
            }
            None => assert!(conv.is_group()),
        }
    }
}

/// Sync tokens and continuations as the sync API decodes them, and the cursors of a sync.
pub fn sync_token(data: &[u8]) {
    use chat_sequencer::sync_token as t;
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(snapshot) = t::decode(s) {
        assert_eq!(t::decode(&t::encode(snapshot)), Some(snapshot));
    }
    if let Some((snapshot, conv)) = t::decode_next(s) {
        assert_eq!(
            t::decode_next(&t::encode_next(snapshot, conv)),
            Some((snapshot, conv))
        );
    }
    // A sync request's tokens, cursors and continuation (what the gateway forwards).
    if let Some(req) = round_trips::<SyncRequest>(data) {
        for conv in req.cursors.keys() {
            if let Ok(c) = ConvId::parse(conv) {
                assert_one_token(c.as_str());
            }
        }
        let _ = req.since.as_deref().map(t::decode);
        let _ = req.next.as_deref().map(t::decode_next);
    }
}

/// `CHAT_IN` messages as the sequencer validates them. Input: the subject, a newline, then the
/// payload.
pub fn inbound(data: &[u8]) {
    use chat_sequencer::per_message::inbound::validate;
    let (subject, payload) = match data.iter().position(|b| *b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (&b"chat.inp.0.dm~a~b"[..], data),
    };
    let Ok(subject) = std::str::from_utf8(subject) else {
        return;
    };
    round_trips::<Inbound>(payload);
    for partition in [0, 1, 7] {
        match validate(partition, subject, payload) {
            Ok((_, conv)) => {
                assert_one_token(conv.as_str());
                assert_eq!(
                    subjects::split_partitioned(subject),
                    Some((partition, conv.as_str()))
                );
            }
            Err(reject) => {
                let _ = reject.to_string();
            }
        }
    }
}

/// `CHAT_MSGS` payloads as the sequencer's store writer and the fan-out worker decode them.
pub fn stamped(data: &[u8]) {
    use chat_sequencer::records;
    if let Ok(m) = records::decode_stamped(data, 1) {
        let encoded = serde_json::to_vec(&ServerFrame::Message(m.clone())).expect("encodes");
        assert_eq!(records::decode_stamped(&encoded, 1).ok().as_ref(), Some(&m));
        let stored = records::stored(m.clone(), 1);
        assert_eq!((stored.conv.as_str(), stored.seq), (m.conv.as_str(), m.seq));
    }
    let _ = records::decode_receipt(data, 1);
    // The fan-out worker: a server frame, then the conversation id it routes by.
    if let Some(frame) = round_trips::<ServerFrame>(data) {
        let conv = match &frame {
            ServerFrame::Message(m) => Some(&m.conv),
            ServerFrame::Receipt(r) => Some(&r.conv),
            _ => None,
        };
        if let Some(Ok(conv)) = conv.map(|c| ConvId::parse(c)) {
            assert_one_token(conv.as_str());
        }
    }
}

/// Service-to-service requests (media verify, presence, typing, reads). The first byte picks
/// the message type, the rest is its JSON.
pub fn service_api(data: &[u8]) {
    let Some((kind, json)) = data.split_first() else {
        return;
    };
    match kind % 10 {
        0 => {
            if let Some(req) = round_trips::<MediaVerifyRequest>(json) {
                let _ = req.media.check();
            }
        }
        1 => drop(round_trips::<PresenceReport>(json)),
        2 => drop(round_trips::<PresencePush>(json)),
        3 => drop(round_trips::<TypingRelay>(json)),
        4 => drop(round_trips::<PresenceRequest>(json)),
        5 => drop(round_trips::<PresenceSettingsRequest>(json)),
        6 => drop(round_trips::<HistoryRequest>(json)),
        7 => drop(round_trips::<ReceiptsRequest>(json)),
        8 => drop(round_trips::<GroupInfoRequest>(json)),
        _ => drop(round_trips::<ContactsRequest>(json)),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64url_matches_the_rfc_examples() {
        assert_eq!(super::base64url(b""), "");
        assert_eq!(super::base64url(b"f"), "Zg");
        assert_eq!(super::base64url(b"fo"), "Zm8");
        assert_eq!(super::base64url(b"foo"), "Zm9v");
        assert_eq!(super::base64url(b"foob"), "Zm9vYg");
        assert_eq!(super::base64url(&[0xfb, 0xff]), "-_8");
    }
}
