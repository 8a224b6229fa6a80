//! The part of the NATS client protocol the push connection speaks: it writes `CONNECT`, `SUB`,
//! `UNSUB`, `PING` and `PONG`, and reads `INFO`, `MSG`, `HMSG`, `PING`, `PONG`, `+OK` and
//! `-ERR` (<https://docs.nats.io/reference/reference-protocols/nats-protocol>). Parsing borrows
//! from the read buffer: nothing is allocated per message here.

use std::fmt::Write as _;

/// Longest control line accepted (nats-server's own default `max_control_line` is 4 KiB; an
/// `INFO` with many cluster URLs can be longer).
pub(crate) const MAX_CONTROL_LINE: usize = 64 * 1024;

/// One operation from the server, borrowing from the read buffer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ServerOp<'a> {
    Info(&'a [u8]),
    /// `MSG` or `HMSG`: headers are skipped, `payload` is the message body.
    Msg {
        subject: &'a str,
        reply: Option<&'a str>,
        payload: &'a [u8],
    },
    Ping,
    Pong,
    Ok,
    Err(&'a str),
}

/// Why the server's bytes are not the protocol.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum ProtoError {
    #[error("control line longer than {MAX_CONTROL_LINE} bytes")]
    LineTooLong,
    #[error("malformed {0} line")]
    Malformed(&'static str),
    #[error("unknown operation")]
    Unknown,
}

/// The next complete operation at the start of `buf` and how many bytes it took, or `None`
/// when more bytes are needed.
pub(crate) fn next_op(buf: &[u8]) -> Result<Option<(ServerOp<'_>, usize)>, ProtoError> {
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        if buf.len() > MAX_CONTROL_LINE {
            return Err(ProtoError::LineTooLong);
        }
        return Ok(None);
    };
    let line = &buf[..end];
    let after = end + 2;
    if let Some(args) = strip_op(line, b"MSG ") {
        let args = std::str::from_utf8(args).map_err(|_| ProtoError::Malformed("MSG"))?;
        let mut it = args.split_ascii_whitespace();
        let (subject, _sid, third, fourth) = (it.next(), it.next(), it.next(), it.next());
        let (reply, len) = match (third, fourth, it.next()) {
            (Some(reply), Some(len), None) => (Some(reply), len),
            (Some(len), None, None) => (None, len),
            _ => return Err(ProtoError::Malformed("MSG")),
        };
        let subject = subject.ok_or(ProtoError::Malformed("MSG"))?;
        let len: usize = len.parse().map_err(|_| ProtoError::Malformed("MSG"))?;
        return Ok(body(buf, after, 0, len).map(|(payload, used)| {
            (
                ServerOp::Msg {
                    subject,
                    reply,
                    payload,
                },
                used,
            )
        }));
    }
    if let Some(args) = strip_op(line, b"HMSG ") {
        let args = std::str::from_utf8(args).map_err(|_| ProtoError::Malformed("HMSG"))?;
        let mut it = args.split_ascii_whitespace();
        let (subject, _sid) = (it.next(), it.next());
        let (reply, headers, total) = match (it.next(), it.next(), it.next(), it.next()) {
            (Some(reply), Some(h), Some(t), None) => (Some(reply), h, t),
            (Some(h), Some(t), None, None) => (None, h, t),
            _ => return Err(ProtoError::Malformed("HMSG")),
        };
        let subject = subject.ok_or(ProtoError::Malformed("HMSG"))?;
        let headers: usize = headers.parse().map_err(|_| ProtoError::Malformed("HMSG"))?;
        let total: usize = total.parse().map_err(|_| ProtoError::Malformed("HMSG"))?;
        if headers > total {
            return Err(ProtoError::Malformed("HMSG"));
        }
        return Ok(body(buf, after, headers, total).map(|(payload, used)| {
            (
                ServerOp::Msg {
                    subject,
                    reply,
                    payload,
                },
                used,
            )
        }));
    }
    let op = if line.eq_ignore_ascii_case(b"PING") {
        ServerOp::Ping
    } else if line.eq_ignore_ascii_case(b"PONG") {
        ServerOp::Pong
    } else if line.eq_ignore_ascii_case(b"+OK") {
        ServerOp::Ok
    } else if let Some(info) = strip_op(line, b"INFO ") {
        ServerOp::Info(info)
    } else if let Some(text) = strip_op(line, b"-ERR") {
        let text = std::str::from_utf8(text).map_err(|_| ProtoError::Malformed("-ERR"))?;
        ServerOp::Err(text.trim().trim_matches('\''))
    } else {
        return Err(ProtoError::Unknown);
    };
    Ok(Some((op, after)))
}

/// `line` without its operation name (matched case-insensitively), if it is that operation.
fn strip_op<'a>(line: &'a [u8], op: &[u8]) -> Option<&'a [u8]> {
    (line.len() >= op.len() && line[..op.len()].eq_ignore_ascii_case(op)).then(|| &line[op.len()..])
}

/// The payload of a message whose body starts at `start` (`skip` header bytes, `total` bytes
/// in all, then CRLF), and the bytes used up to its end; `None` while incomplete.
fn body(buf: &[u8], start: usize, skip: usize, total: usize) -> Option<(&[u8], usize)> {
    let end = start.checked_add(total)?;
    if buf.len() < end + 2 {
        return None;
    }
    Some((&buf[start + skip..end], end + 2))
}

/// The credential fields of `CONNECT`, each sent only when set
/// (<https://docs.nats.io/reference/reference-protocols/nats-protocol#connect>). No `Debug`:
/// it holds secrets.
#[derive(Default)]
pub(crate) struct Credentials {
    pub user: Option<String>,
    pub pass: Option<String>,
    pub auth_token: Option<String>,
    /// The user JWT (decentralized authentication), with `sig`.
    pub jwt: Option<String>,
    /// The public nkey, with `sig`.
    pub nkey: Option<String>,
    /// The server's nonce signed with the seed, base64url without padding.
    pub sig: Option<String>,
}

/// `CONNECT {...}\r\nPING\r\n` for a client called `name`: no echo, no verbose acks, headers
/// understood (so a message published with headers is delivered as `HMSG`, not refused);
/// `tls`: the connection is TLS.
pub(crate) fn connect(name: &str, credentials: &Credentials, tls: bool) -> Vec<u8> {
    let mut info = serde_json::json!({
        "verbose": false,
        "pedantic": false,
        "tls_required": tls,
        "name": name,
        "lang": "rust",
        "version": env!("CARGO_PKG_VERSION"),
        "protocol": 1,
        "echo": false,
        "headers": true,
        "no_responders": true,
    });
    let obj = info.as_object_mut().expect("an object");
    let Credentials {
        user,
        pass,
        auth_token,
        jwt,
        nkey,
        sig,
    } = credentials;
    for (field, value) in [
        ("user", user),
        ("pass", pass),
        ("auth_token", auth_token),
        ("jwt", jwt),
        ("nkey", nkey),
        ("sig", sig),
    ] {
        if let Some(value) = value {
            obj.insert(field.into(), value.as_str().into());
        }
    }
    let mut out = b"CONNECT ".to_vec();
    out.extend_from_slice(info.to_string().as_bytes());
    out.extend_from_slice(b"\r\nPING\r\n");
    out
}

/// Appends `SUB <subject> <sid>\r\n`.
pub(crate) fn sub(out: &mut Vec<u8>, subject: &str, sid: u64) {
    let mut line = String::with_capacity(subject.len() + 32);
    let _ = write!(line, "SUB {subject} {sid}\r\n");
    out.extend_from_slice(line.as_bytes());
}

/// Appends `UNSUB <sid>\r\n`.
pub(crate) fn unsub(out: &mut Vec<u8>, sid: u64) {
    let mut line = String::with_capacity(32);
    let _ = write!(line, "UNSUB {sid}\r\n");
    out.extend_from_slice(line.as_bytes());
}

pub(crate) const PING: &[u8] = b"PING\r\n";
pub(crate) const PONG: &[u8] = b"PONG\r\n";

#[cfg(test)]
mod tests {
    use super::*;

    fn all(mut buf: &[u8]) -> Vec<ServerOp<'_>> {
        let mut ops = Vec::new();
        while let Some((op, used)) = next_op(buf).unwrap() {
            ops.push(op);
            buf = &buf[used..];
        }
        assert!(buf.is_empty(), "left over: {buf:?}");
        ops
    }

    #[test]
    fn parses_what_the_server_sends() {
        let wire = b"INFO {\"max_payload\":1048576}\r\nPING\r\n+OK\r\n\
            MSG chat.user.bob 7 11\r\nhello world\r\n\
            MSG chat.user.bob 7 _INBOX.x.17 2\r\nhi\r\n\
            HMSG chat.grp.g~t 9 _INBOX.y.1 12 14\r\nNATS/1.0\r\n\r\nok\r\n\
            HMSG chat.grp.g~t 9 12 12\r\nNATS/1.0\r\n\r\n\r\n\
            pong\r\n-ERR 'Stale Connection'\r\n";
        assert_eq!(
            all(wire),
            vec![
                ServerOp::Info(b"{\"max_payload\":1048576}"),
                ServerOp::Ping,
                ServerOp::Ok,
                ServerOp::Msg {
                    subject: "chat.user.bob",
                    reply: None,
                    payload: b"hello world"
                },
                ServerOp::Msg {
                    subject: "chat.user.bob",
                    reply: Some("_INBOX.x.17"),
                    payload: b"hi"
                },
                ServerOp::Msg {
                    subject: "chat.grp.g~t",
                    reply: Some("_INBOX.y.1"),
                    payload: b"ok"
                },
                ServerOp::Msg {
                    subject: "chat.grp.g~t",
                    reply: None,
                    payload: b""
                },
                ServerOp::Pong,
                ServerOp::Err("Stale Connection"),
            ]
        );
    }

    #[test]
    fn waits_for_whole_messages_and_payloads_may_hold_crlf() {
        let wire = b"MSG a 1 6\r\nx\r\ny\r\n\r\n";
        for cut in 0..wire.len() {
            assert_eq!(next_op(&wire[..cut]).unwrap(), None, "cut at {cut}");
        }
        assert_eq!(
            next_op(wire).unwrap(),
            Some((
                ServerOp::Msg {
                    subject: "a",
                    reply: None,
                    payload: b"x\r\ny\r\n"
                },
                wire.len()
            ))
        );
    }

    #[test]
    fn refuses_what_is_not_the_protocol() {
        assert_eq!(next_op(b"MSG a 1\r\n"), Err(ProtoError::Malformed("MSG")));
        assert_eq!(next_op(b"MSG a 1 x\r\n"), Err(ProtoError::Malformed("MSG")));
        assert_eq!(
            next_op(b"HMSG a 1 5 2\r\n"),
            Err(ProtoError::Malformed("HMSG"))
        );
        assert_eq!(next_op(b"HELLO\r\n"), Err(ProtoError::Unknown));
        let long = vec![b'x'; MAX_CONTROL_LINE + 1];
        assert_eq!(next_op(&long), Err(ProtoError::LineTooLong));
    }

    #[test]
    fn writes_connect_sub_and_unsub() {
        let c = connect(
            "gw",
            &Credentials {
                user: Some("u".into()),
                pass: Some("p".into()),
                ..Credentials::default()
            },
            true,
        );
        let text = String::from_utf8(c).unwrap();
        assert!(text.starts_with("CONNECT {") && text.ends_with("}\r\nPING\r\n"));
        let json: serde_json::Value =
            serde_json::from_str(&text["CONNECT ".len()..text.len() - 8]).unwrap();
        assert_eq!(json["headers"], true);
        assert_eq!(json["echo"], false);
        assert_eq!(json["tls_required"], true);
        assert_eq!(
            (json["user"].as_str(), json["pass"].as_str()),
            (Some("u"), Some("p"))
        );
        assert!(json.get("sig").is_none() && json.get("auth_token").is_none());
        let mut out = Vec::new();
        sub(&mut out, "chat.user.bob", 3);
        unsub(&mut out, 3);
        assert_eq!(out, b"SUB chat.user.bob 3\r\nUNSUB 3\r\n");
    }
}
