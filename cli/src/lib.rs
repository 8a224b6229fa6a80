//! `chat`, the terminal client of the chat backend, and the small WebSocket [`Client`] it is
//! built on (integration tests reuse it).
//!
//! The client speaks protocol version 1 (`docs/protocol.md`) to a gateway at
//! `ws://<host>/ws?token=<jwt>&device=<id>`: it reads the `hello` frame, sends `send`, `history`
//! and `ping` frames, and decodes every [`ServerFrame`]. It never talks to NATS; only
//! `chat admin provision` does, to apply the stream and consumer definitions in `nats/`.
//!
//! - [`Client`]: connect, send, receive with a timeout, wait for a stamped message or a history
//!   page.
//! - [`cli`]: the `chat` command line (clap) and its commands.
//! - [`format`]: how frames and provisioning outcomes are printed.

pub mod cli;
pub mod format;

use std::{collections::VecDeque, time::Duration};

use chat_protocol::{
    frames::{ClientFrame, ErrorCode, ErrorFrame, GroupOp, Limits, Message, ServerFrame},
    ids::{ConvId, UserId},
};
use futures::{SinkExt, StreamExt};
use tokio::{net::TcpStream, time::Instant};
use tokio_tungstenite::{
    MaybeTlsStream, WebSocketStream,
    tungstenite::{self, Message as WsMessage},
};

/// How long [`Client::connect`] waits for the TCP connect, the upgrade and the `hello` frame.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a client operation failed. [`ClientError::code`] gives the server's error code when the
/// server sent one.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid gateway URL `{url}`: {reason}")]
    BadUrl { url: String, reason: &'static str },
    /// The TCP connection or the WebSocket upgrade failed. `url` never contains the token.
    #[error("cannot connect to {url}: {source}")]
    Connect {
        url: String,
        source: tungstenite::Error,
    },
    /// The gateway answered the upgrade with an HTTP error (401 for a bad token, 429 for too
    /// many connections).
    #[error("gateway refused the connection (HTTP {status}): {}", refusal_text(*.code, .message))]
    Refused {
        status: u16,
        code: Option<ErrorCode>,
        message: String,
    },
    /// The server answered with an `error` frame.
    #[error("{}: {}", .0.code.as_str(), .0.message)]
    Server(ErrorFrame),
    /// The server closed the connection.
    #[error("connection closed by the server{}", close_text(*.code, .reason))]
    Closed { code: Option<u16>, reason: String },
    #[error("timed out after {}s waiting for {what}", .after.as_secs_f32())]
    Timeout { what: String, after: Duration },
    /// A frame the client cannot decode (for example a frame type newer than this client).
    /// Not fatal: the connection is still usable.
    #[error("undecodable frame from the server ({error}): {text}")]
    BadFrame { text: String, error: String },
    #[error("the server did not start with `hello`: {0}")]
    NoHello(String),
    #[error("websocket error: {0}")]
    Ws(#[from] tungstenite::Error),
}

fn refusal_text(code: Option<ErrorCode>, message: &str) -> String {
    match code {
        Some(code) => format!("{}: {message}", code.as_str()),
        None => message.to_owned(),
    }
}

fn close_text(code: Option<u16>, reason: &str) -> String {
    let mut s = String::new();
    if let Some(code) = code {
        s.push_str(&format!(" (code {code}"));
        if let Some(hint) = format::close_hint(code) {
            s.push_str(&format!(": {hint}"));
        }
        s.push(')');
    }
    if !reason.is_empty() {
        s.push_str(&format!(": {reason}"));
    }
    s
}

impl ClientError {
    /// The server's error code, for an `error` frame or a refused upgrade.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::Server(e) => Some(e.code),
            Self::Refused { code, .. } => *code,
            _ => None,
        }
    }

    /// Whether the connection is unusable after this error.
    pub fn is_fatal(&self) -> bool {
        !matches!(self, Self::BadFrame { .. } | Self::Server(_))
    }
}

/// What the server announced in `hello`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub version: u32,
    pub user: UserId,
    pub device: String,
    pub heartbeat_ms: u64,
    pub limits: Limits,
}

/// Which page of history to ask for. Without `before` or `after` the server returns the latest
/// messages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HistoryQuery {
    pub before: Option<u64>,
    pub after: Option<u64>,
    pub limit: Option<u32>,
}

/// A page of history, ascending by seq. `more` means further messages exist in the direction
/// asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryPage {
    pub messages: Vec<Message>,
    pub more: bool,
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// One WebSocket connection to a gateway.
///
/// Frames that a `wait_*` method reads but does not want are kept, in order, and returned by
/// the next [`Client::next_frame`], so nothing the server sent is lost.
pub struct Client {
    ws: Ws,
    session: Session,
    pending: VecDeque<ServerFrame>,
}

/// A random client id: 16 lowercase hex characters (a valid client message id).
pub fn new_client_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// A random device id for one run of the CLI: `cli-` and 8 hex characters.
pub fn new_device_id() -> String {
    format!("cli-{:08x}", rand::random::<u32>())
}

/// The gateway URL with `token` and `device` added to its query string.
pub fn ws_url(base: &str, token: &str, device: &str) -> Result<String, ClientError> {
    let bad = |reason| ClientError::BadUrl {
        url: base.to_owned(),
        reason,
    };
    let rest = base
        .strip_prefix("ws://")
        .or_else(|| base.strip_prefix("wss://"))
        .ok_or_else(|| bad("it must start with ws:// or wss://"))?;
    if rest.is_empty() || rest.starts_with('/') {
        return Err(bad("it has no host"));
    }
    if base.contains('#') {
        return Err(bad("it must not have a fragment"));
    }
    let sep = if base.contains('?') { '&' } else { '?' };
    Ok(format!(
        "{base}{sep}token={}&device={}",
        percent_encode(token),
        percent_encode(device)
    ))
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn decode_refusal(status: u16, body: Option<&[u8]>) -> ClientError {
    let body = body.unwrap_or_default();
    let frame = serde_json::from_slice::<ServerFrame>(body)
        .ok()
        .and_then(|f| match f {
            ServerFrame::Error(e) => Some(e),
            _ => None,
        })
        .or_else(|| serde_json::from_slice::<ErrorFrame>(body).ok());
    match frame {
        Some(e) => ClientError::Refused {
            status,
            code: Some(e.code),
            message: e.message,
        },
        None => ClientError::Refused {
            status,
            code: None,
            message: String::from_utf8_lossy(body).trim().to_owned(),
        },
    }
}

fn decode_frame(text: &str) -> Result<ServerFrame, ClientError> {
    serde_json::from_str(text).map_err(|e| ClientError::BadFrame {
        text: text.chars().take(200).collect(),
        error: e.to_string(),
    })
}

impl Client {
    /// Connects to the gateway at `url` (for example `ws://127.0.0.1:8080/ws`) as the holder of
    /// `token`, from device `device`, and reads the `hello` frame.
    pub async fn connect(url: &str, token: &str, device: &str) -> Result<Self, ClientError> {
        let full = ws_url(url, token, device)?;
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        let timeout = |what: &str| ClientError::Timeout {
            what: what.to_owned(),
            after: CONNECT_TIMEOUT,
        };
        let (ws, _response) =
            match tokio::time::timeout_at(deadline, tokio_tungstenite::connect_async(full)).await {
                Err(_) => return Err(timeout("the WebSocket upgrade")),
                Ok(Err(tungstenite::Error::Http(response))) => {
                    return Err(decode_refusal(
                        response.status().as_u16(),
                        response.body().as_deref(),
                    ));
                }
                Ok(Err(source)) => {
                    return Err(ClientError::Connect {
                        url: url.to_owned(),
                        source,
                    });
                }
                Ok(Ok(connected)) => connected,
            };
        let mut client = Self {
            ws,
            session: Session {
                version: 0,
                user: UserId::parse("unknown").expect("valid id"),
                device: device.to_owned(),
                heartbeat_ms: 0,
                limits: Limits::default(),
            },
            pending: VecDeque::new(),
        };
        let first = match tokio::time::timeout_at(deadline, client.read_wire()).await {
            Err(_) => return Err(timeout("the `hello` frame")),
            Ok(first) => first?,
        };
        match first {
            ServerFrame::Hello {
                version,
                user,
                device,
                heartbeat_ms,
                limits,
            } => {
                let user = UserId::parse(&user)
                    .map_err(|e| ClientError::NoHello(format!("hello names user {user:?}: {e}")))?;
                client.session = Session {
                    version,
                    user,
                    device,
                    heartbeat_ms,
                    limits,
                };
                Ok(client)
            }
            ServerFrame::Error(e) => Err(ClientError::Server(e)),
            other => Err(ClientError::NoHello(format!("{other:?}"))),
        }
    }

    /// What the server announced in `hello`: the authenticated user, limits, heartbeat.
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// The authenticated user.
    pub fn user(&self) -> &UserId {
        &self.session.user
    }

    async fn write(&mut self, frame: &ClientFrame) -> Result<(), ClientError> {
        let text = serde_json::to_string(frame).expect("client frames encode");
        self.ws.send(WsMessage::text(text)).await?;
        Ok(())
    }

    /// Sends `body` to `conv` with a fresh client id, and returns that id.
    pub async fn send(&mut self, conv: &ConvId, body: &str) -> Result<String, ClientError> {
        let id = new_client_id();
        self.send_with_id(conv, &id, body).await?;
        Ok(id)
    }

    /// Sends `body` to `conv` with client id `id` (reuse the id to retry).
    pub async fn send_with_id(
        &mut self,
        conv: &ConvId,
        id: &str,
        body: &str,
    ) -> Result<(), ClientError> {
        self.write(&ClientFrame::Send {
            conv: conv.to_string(),
            id: id.to_owned(),
            body: body.to_owned(),
            media: None,
        })
        .await
    }

    /// Asks for a page of `conv`'s history and returns the request id the answer will carry.
    pub async fn history(
        &mut self,
        conv: &ConvId,
        query: HistoryQuery,
    ) -> Result<String, ClientError> {
        let req = new_client_id();
        self.write(&ClientFrame::History {
            req: req.clone(),
            conv: conv.to_string(),
            before: query.before,
            after: query.after,
            limit: query.limit,
        })
        .await?;
        Ok(req)
    }

    /// Sends an application-level `ping` (answered by `pong`).
    pub async fn ping(&mut self) -> Result<(), ClientError> {
        self.write(&ClientFrame::Ping).await
    }

    /// Reads the next frame off the socket, answering WebSocket pings on the way.
    async fn read_wire(&mut self) -> Result<ServerFrame, ClientError> {
        loop {
            let msg = match self.ws.next().await {
                None => {
                    return Err(ClientError::Closed {
                        code: None,
                        reason: String::new(),
                    });
                }
                Some(msg) => msg?,
            };
            match msg {
                WsMessage::Text(text) => return decode_frame(&text),
                WsMessage::Binary(bytes) => return decode_frame(&String::from_utf8_lossy(&bytes)),
                WsMessage::Close(frame) => {
                    return Err(ClientError::Closed {
                        code: frame.as_ref().map(|f| u16::from(f.code)),
                        reason: frame.map(|f| f.reason.to_string()).unwrap_or_default(),
                    });
                }
                // tungstenite queues the pong itself and sends it with the next read or write.
                WsMessage::Ping(_) | WsMessage::Pong(_) | WsMessage::Frame(_) => {}
            }
        }
    }

    /// The next frame, waiting without limit. Cancel-safe (usable in `tokio::select!`).
    pub async fn recv(&mut self) -> Result<ServerFrame, ClientError> {
        match self.pending.pop_front() {
            Some(frame) => Ok(frame),
            None => self.read_wire().await,
        }
    }

    /// The next frame, waiting at most `timeout`.
    pub async fn next_frame(&mut self, timeout: Duration) -> Result<ServerFrame, ClientError> {
        tokio::time::timeout(timeout, self.recv())
            .await
            .map_err(|_| ClientError::Timeout {
                what: "a frame".into(),
                after: timeout,
            })?
    }

    /// Reads frames until `want` returns `Some`, at most until `timeout`. Frames it returns `None`
    /// for are kept for [`Client::next_frame`]. `what` names the wait in a timeout error.
    pub async fn wait_for<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut want: impl FnMut(&ServerFrame) -> Option<Result<T, ClientError>>,
    ) -> Result<T, ClientError> {
        let deadline = Instant::now() + timeout;
        // Frames kept earlier come first, in order.
        if let Some(i) = self.pending.iter().position(|f| want(f).is_some()) {
            let frame = self.pending.remove(i).expect("index in range");
            return want(&frame).expect("matched before");
        }
        loop {
            let frame = match tokio::time::timeout_at(deadline, self.read_wire()).await {
                Err(_) => {
                    return Err(ClientError::Timeout {
                        what: what.to_owned(),
                        after: timeout,
                    });
                }
                Ok(Err(e)) if e.is_fatal() => return Err(e),
                Ok(Err(_)) => continue,
                Ok(Ok(frame)) => frame,
            };
            match want(&frame) {
                Some(result) => return result,
                None => self.pending.push_back(frame),
            }
        }
    }

    /// Sends `body` to `conv` and waits until the message comes back stamped (with its seq).
    /// An `error` frame about this send (or about no frame in particular) fails it.
    pub async fn send_and_wait(
        &mut self,
        conv: &ConvId,
        body: &str,
        timeout: Duration,
    ) -> Result<Message, ClientError> {
        let id = self.send(conv, body).await?;
        let me = self.session.user.to_string();
        let mut sent = false;
        let result = self
            .wait_for("the stamped message", timeout, |frame| {
                match_send(frame, conv, &me, &id, &mut sent)
            })
            .await;
        match result {
            Err(ClientError::Timeout { after, .. }) => Err(ClientError::Timeout {
                what: if sent {
                    "the stamped message (the gateway acknowledged it as sent, so it is stored)"
                        .into()
                } else {
                    "the `sent` acknowledgement".into()
                },
                after,
            }),
            other => other,
        }
    }

    /// Sends a `group` frame and waits until its event comes back stamped. A refusal (an
    /// `error` with its id) fails it.
    pub async fn group_and_wait(
        &mut self,
        op: GroupOp,
        conv: &ConvId,
        name: Option<&str>,
        members: &[UserId],
        timeout: Duration,
    ) -> Result<Message, ClientError> {
        let id = new_client_id();
        self.write(&ClientFrame::Group {
            op,
            conv: conv.to_string(),
            id: id.clone(),
            name: name.map(str::to_owned),
            members: members.iter().map(ToString::to_string).collect(),
        })
        .await?;
        let me = self.session.user.to_string();
        let mut sent = false;
        self.wait_for("the stamped group event", timeout, |frame| {
            match_send(frame, conv, &me, &id, &mut sent)
        })
        .await
    }

    /// Sends a request frame built from a fresh request id and waits for the answer `pick`
    /// recognizes (by that id); an `error` with the id fails it.
    pub async fn request<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        frame: impl FnOnce(String) -> ClientFrame,
        mut pick: impl FnMut(&str, &ServerFrame) -> Option<T>,
    ) -> Result<T, ClientError> {
        let req = new_client_id();
        self.write(&frame(req.clone())).await?;
        self.wait_for(what, timeout, |f| match f {
            ServerFrame::Error(e)
                if e.req.as_deref() == Some(req.as_str())
                    || (e.req.is_none() && e.id.is_none()) =>
            {
                Some(Err(ClientError::Server(e.clone())))
            }
            other => pick(&req, other).map(Ok),
        })
        .await
    }

    /// Asks for a page of `conv`'s history and waits for it.
    pub async fn fetch_history(
        &mut self,
        conv: &ConvId,
        query: HistoryQuery,
        timeout: Duration,
    ) -> Result<HistoryPage, ClientError> {
        let req = self.history(conv, query).await?;
        self.wait_for("the history page", timeout, |frame| match frame {
            ServerFrame::History {
                req: r,
                messages,
                more,
                ..
            } if *r == req => Some(Ok(HistoryPage {
                messages: messages.clone(),
                more: *more,
            })),
            ServerFrame::Error(e)
                if e.req.as_deref() == Some(req.as_str())
                    || (e.req.is_none() && e.id.is_none()) =>
            {
                Some(Err(ClientError::Server(e.clone())))
            }
            _ => None,
        })
        .await
    }

    /// Closes the connection politely.
    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}

/// Whether `frame` settles the send of client id `id` by `me` to `conv`: its stamped message,
/// or an error about it. Records a `sent` acknowledgement in `sent`.
pub fn match_send(
    frame: &ServerFrame,
    conv: &ConvId,
    me: &str,
    id: &str,
    sent: &mut bool,
) -> Option<Result<Message, ClientError>> {
    match frame {
        ServerFrame::Sent { id: i, conv: c, .. } if i == id && c == conv.as_str() => {
            *sent = true;
            None
        }
        ServerFrame::Message(m) if m.id == id && m.from == me && m.conv == conv.as_str() => {
            Some(Ok(m.clone()))
        }
        ServerFrame::Error(e)
            if e.id.as_deref() == Some(id) || (e.id.is_none() && e.req.is_none()) =>
        {
            Some(Err(ClientError::Server(e.clone())))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[test]
    fn ws_url_adds_token_and_device() {
        assert_eq!(
            ws_url("ws://127.0.0.1:8080/ws", "a.b-c_d", "cli-1").unwrap(),
            "ws://127.0.0.1:8080/ws?token=a.b-c_d&device=cli-1"
        );
        assert_eq!(
            ws_url("ws://h/ws?x=1", "t", "d").unwrap(),
            "ws://h/ws?x=1&token=t&device=d"
        );
        assert_eq!(
            ws_url("wss://h/ws", "t+/=", "d d").unwrap(),
            "wss://h/ws?token=t%2B%2F%3D&device=d%20d"
        );
        for bad in [
            "http://h/ws",
            "127.0.0.1:8080",
            "ws://",
            "ws:///ws",
            "ws://h/ws#x",
        ] {
            assert!(
                matches!(ws_url(bad, "t", "d"), Err(ClientError::BadUrl { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn generated_ids_are_valid_ids() {
        let id = new_client_id();
        assert_eq!(id.len(), 16);
        assert!(chat_protocol::ids::ClientMsgId::parse(&id).is_ok());
        assert_ne!(new_client_id(), new_client_id());
        assert!(chat_protocol::ids::DeviceId::parse(&new_device_id()).is_ok());
    }

    #[test]
    fn refusals_carry_the_server_code() {
        let body = br#"{"type":"error","code":"unauthorized","message":"bad signature"}"#;
        let err = decode_refusal(401, Some(body));
        assert_eq!(err.code(), Some(ErrorCode::Unauthorized));
        assert_eq!(
            err.to_string(),
            "gateway refused the connection (HTTP 401): unauthorized: bad signature"
        );
        let err = decode_refusal(
            429,
            Some(br#"{"code":"too_many_connections","message":"x"}"#),
        );
        assert_eq!(err.code(), Some(ErrorCode::TooManyConnections));
        let err = decode_refusal(404, Some(b"not found\n"));
        assert_eq!(err.code(), None);
        assert_eq!(
            err.to_string(),
            "gateway refused the connection (HTTP 404): not found"
        );
    }

    #[test]
    fn a_send_is_settled_by_its_own_stamped_message_or_its_error() {
        let conv = ConvId::parse("dm~alice~bob").unwrap();
        let msg = |from: &str, id: &str| {
            ServerFrame::Message(Message {
                conv: conv.to_string(),
                seq: 3,
                from: from.into(),
                id: id.into(),
                ts: 1,
                body: "hi".into(),
                event: None,
                media: None,
            })
        };
        let mut sent = false;
        let sent_frame = ServerFrame::Sent {
            id: "m1".into(),
            conv: conv.to_string(),
            ts: 1,
        };
        assert!(match_send(&sent_frame, &conv, "alice", "m1", &mut sent).is_none());
        assert!(sent);
        assert!(match_send(&msg("bob", "m1"), &conv, "alice", "m1", &mut sent).is_none());
        assert!(match_send(&msg("alice", "m2"), &conv, "alice", "m1", &mut sent).is_none());
        let got = match_send(&msg("alice", "m1"), &conv, "alice", "m1", &mut sent);
        assert_eq!(got.unwrap().unwrap().seq, 3);
        let mut other = ErrorFrame::new(ErrorCode::RateLimited, "slow down");
        other.id = Some("m2".into());
        let other = ServerFrame::Error(other);
        assert!(match_send(&other, &conv, "alice", "m1", &mut sent).is_none());
        let mut mine = ErrorFrame::new(ErrorCode::NotMember, "no");
        mine.id = Some("m1".into());
        let err = match_send(&ServerFrame::Error(mine), &conv, "alice", "m1", &mut sent)
            .unwrap()
            .unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::NotMember));
    }

    /// A one-connection fake gateway: sends `hello`, then answers every `send` with `sent` and
    /// the stamped message, after an unrelated message.
    async fn fake_gateway() -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
            let hello = r#"{"type":"hello","version":1,"user":"alice","device":"d1","heartbeat_ms":30000,
                "limits":{"max_frame_bytes":1,"max_body_bytes":1,"sends_per_second":1,"send_burst":1,"history_page_max":1}}"#;
            ws.send(WsMessage::text(hello)).await.unwrap();
            let mut seq = 0;
            while let Some(Ok(WsMessage::Text(text))) = ws.next().await {
                if let Ok(ClientFrame::Send { conv, id, body, .. }) =
                    ClientFrame::decode(text.as_bytes())
                {
                    seq += 1;
                    let out = [
                        ServerFrame::Sent {
                            id: id.clone(),
                            conv: conv.clone(),
                            ts: 1,
                        },
                        ServerFrame::Message(Message {
                            conv: "dm~alice~carol".into(),
                            seq: 9,
                            from: "carol".into(),
                            id: "x".into(),
                            ts: 1,
                            body: "unrelated".into(),
                            event: None,
                            media: None,
                        }),
                        ServerFrame::Message(Message {
                            conv,
                            seq,
                            from: "alice".into(),
                            id,
                            ts: 2,
                            body,
                            event: None,
                            media: None,
                        }),
                    ];
                    for f in out {
                        let text = serde_json::to_string(&f).unwrap();
                        ws.send(WsMessage::text(text)).await.unwrap();
                    }
                }
            }
        });
        format!("ws://{addr}/ws")
    }

    #[tokio::test]
    async fn connects_sends_and_keeps_unrelated_frames() {
        let url = fake_gateway().await;
        let mut client = Client::connect(&url, "t", "d1").await.unwrap();
        assert_eq!(client.user().as_str(), "alice");
        assert_eq!(client.session().heartbeat_ms, 30000);
        let conv = ConvId::parse("dm~alice~bob").unwrap();
        let m = client
            .send_and_wait(&conv, "hello", Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!((m.seq, m.body.as_str()), (1, "hello"));
        // The `sent` frame and carol's message were read while waiting, and are kept.
        let f = client.next_frame(Duration::from_secs(1)).await.unwrap();
        assert!(matches!(f, ServerFrame::Sent { .. }), "{f:?}");
        let f = client.next_frame(Duration::from_secs(1)).await.unwrap();
        assert!(
            matches!(f, ServerFrame::Message(ref m) if m.from == "carol"),
            "{f:?}"
        );
        let err = client
            .next_frame(Duration::from_millis(50))
            .await
            .unwrap_err();
        assert!(matches!(err, ClientError::Timeout { .. }), "{err}");
        client.close().await;
    }

    #[tokio::test]
    async fn connection_refused_names_the_url_without_the_token() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let url = format!("ws://{addr}/ws");
        let err = Client::connect(&url, "secret-token", "d")
            .await
            .err()
            .expect("nothing listens");
        let text = err.to_string();
        assert!(text.contains(&url), "{text}");
        assert!(!text.contains("secret-token"), "{text}");
    }
}
