//! The push connection: one plain TCP connection per gateway to nats-server that carries every
//! subscription the gateway's connections need (`chat.user.<user>` for each user connected
//! here, `chat.grp.<conv>` for each large group one of them is in), and hands each message to a
//! [`Handler`] (the [router](crate::router)) by subject.
//!
//! Why not async-nats for these: its `Subscriber` is one tokio channel per subscription, which
//! allocates a 32-slot block of messages (about 6 KiB) the moment it is created, and can buffer
//! 64 Ki messages before it drops any. Per user that was the largest part of a connection's
//! memory. Here a subscription costs a line in the server and an entry in the router's table;
//! what arrives is read once, into one buffer, and routed from there.
//!
//! It speaks only what it needs of the NATS client protocol ([`proto`]): `CONNECT`, `SUB`,
//! `UNSUB`, `PING`/`PONG`, and reading `MSG`/`HMSG`. Publishing, requests and JetStream stay on
//! the gateway's async-nats client.
//!
//! - **Live before use.** [`PushClient::barrier`] resolves once the server answered a `PING`
//!   written after every `SUB` sent before it: the server handles a connection's operations in
//!   order, so those subscriptions are registered. A connection's `hello` waits for it; many
//!   waiters share one `PING`.
//! - **Reconnects.** When the connection breaks, the client reconnects (to the next server of
//!   `nats_url`, with backoff), sends a `SUB` for every subscription the handler still has
//!   ([`Handler::resubscribe`]), and only then answers the barriers that were waiting. What
//!   was published while it was away is lost, as with any core NATS subscription: devices
//!   recover it with `sync` and the seqs (`docs/protocol.md`).
//! - **Keepalive.** It pings the server every [`KEEPALIVE`]; a ping (keepalive or barrier)
//!   unanswered for two of those means a dead connection, and it reconnects. (Counting pings
//!   instead would take a burst of barriers, during a wave of connects, for a dead server.) It
//!   answers the server's pings.
//! - **Credentials** ([`auth`]): the gateway's `nats_auth`, as its async-nats client uses it (a
//!   user and password, an nkey seed, or a credentials file whose seed signs the server's
//!   nonce); without it, a user and password or a token in `nats_url`. It logs in as the same
//!   NATS user, which must be allowed to subscribe `chat.user.*` and `chat.grp.*`
//!   (`nats/auth.conf`).
//! - **TLS** ([`link`]): as the gateway's async-nats client does it, with the same `nats_tls`
//!   settings (CA, client certificate, handshake first): TLS when the URL is `tls://`, when
//!   `nats_tls` is set, or when the server requires it; the server's certificate is verified
//!   against `nats_tls.ca_file` (the system's roots without it) and the URL's host. No
//!   credentials are sent before the TLS handshake succeeded.

mod auth;
mod link;
pub(crate) mod proto;

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use async_nats::{ServerAddr, ServerInfo};
use bytes::{Buf, BytesMut};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::{Notify, oneshot},
};
use tokio_util::sync::CancellationToken;

pub(crate) use self::{auth::PushAuth, link::PushTls};
use self::{link::Link, proto::ServerOp};

/// How often the push connection pings the server to find out that it is gone.
pub(crate) const KEEPALIVE: Duration = Duration::from_secs(20);
/// Keepalive periods a ping may go unanswered before the connection counts as dead.
const MAX_PINGS_OUT: u32 = 2;
/// Deadline for connecting, up to the server's first `PONG`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Initial size of the read buffer (it grows to hold the largest message).
const READ_BUFFER: usize = 64 * 1024;

/// Counter: push connection (re)connects.
pub const RECONNECTS: &str = "gateway_push_connects_total";
/// Gauge: 1 while the push connection is up.
pub const CONNECTED: &str = "gateway_push_connected";
/// Gauge: subscriptions held on the push connection.
pub const SUBSCRIPTIONS: &str = "gateway_push_subscriptions";
/// Counter: messages read from the push connection.
pub const MESSAGES: &str = "gateway_push_messages_total";

pub fn describe() {
    use metrics::{describe_counter, describe_gauge};
    describe_counter!(
        RECONNECTS,
        "Push connection connects, the first one included"
    );
    describe_gauge!(CONNECTED, "1 while the push connection to NATS is up");
    describe_gauge!(SUBSCRIPTIONS, "Subscriptions held on the push connection");
    describe_counter!(MESSAGES, "Messages read from the push connection");
}

/// Where the push connection's messages go, and who knows its subscriptions.
pub(crate) trait Handler: Send + Sync + 'static {
    /// A message on `subject`; `reply` when the publisher asked for an answer.
    fn on_message(&self, subject: &str, reply: Option<&str>, payload: &[u8]);
    /// After a reconnect: subscribe again to everything (with [`Interest::resubscribe`] on
    /// the same sids), atomically with respect to new subscriptions.
    fn resubscribe(&self);
}

/// Subscriptions as the router uses them (faked in unit tests).
pub(crate) trait Interest: Send + Sync + 'static {
    /// Subscribes to `subject`; returns its sid. Not live before a later [`Interest::barrier`].
    fn subscribe(&self, subject: &str) -> u64;
    /// Subscribes again (after a reconnect) with the sid it had.
    fn resubscribe(&self, sid: u64, subject: &str);
    fn unsubscribe(&self, sid: u64);
    /// Resolves once every subscription made before the call is live at the server (an error:
    /// the client stopped).
    fn barrier(&self) -> oneshot::Receiver<()>;
    /// Whether the connection is up now.
    fn is_connected(&self) -> bool;
}

#[derive(Default)]
struct State {
    /// Protocol bytes waiting to be written.
    out: Vec<u8>,
    next_sid: u64,
    subscriptions: usize,
    /// Barriers waiting for the next `PING` to be written.
    waiting: Vec<oneshot::Sender<()>>,
    /// `PING`s written and not answered yet, oldest first, each with the barriers it answers.
    pings: VecDeque<(tokio::time::Instant, Vec<oneshot::Sender<()>>)>,
    /// `SUB`/`UNSUB` are queued for the current connection (from the moment it is up, before
    /// the handler resubscribed: a subscription made meanwhile is then sent twice, which the
    /// server ignores; before that, the resubscription covers it).
    accepting: bool,
    /// The writer may write: the handler resubscribed on this connection.
    writable: bool,
}

struct Inner {
    state: Mutex<State>,
    /// Wakes the writer: bytes or barriers are waiting.
    wake: Notify,
    connected: AtomicBool,
}

/// The gateway's push connection (cheap to clone).
#[derive(Clone)]
pub(crate) struct PushClient {
    inner: Arc<Inner>,
}

/// Why the push connection cannot be used at all.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error("{0}")]
    Url(String),
}

impl PushClient {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A client that is not connected yet; [`PushClient::run`] connects it.
    pub(crate) fn new() -> Self {
        Self {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    next_sid: 1,
                    ..State::default()
                }),
                wake: Notify::new(),
                connected: AtomicBool::new(false),
            }),
        }
    }

    /// The servers of `nats_url`.
    pub(crate) fn servers(nats_url: &str) -> Result<Vec<ServerAddr>, PushError> {
        chat_common::nats_servers(nats_url).map_err(|e| PushError::Url(format!("{e:#}")))
    }

    fn push_bytes(&self, write: impl FnOnce(&mut State)) {
        let mut state = self.lock();
        write(&mut state);
        drop(state);
        self.inner.wake.notify_one();
    }

    /// Connects, and keeps the connection (reconnecting) until `stop`: reads and routes to
    /// `handler`, writes what is queued, pings.
    pub(crate) async fn run(
        self,
        servers: Vec<ServerAddr>,
        auth: PushAuth,
        tls: PushTls,
        name: String,
        handler: Arc<dyn Handler>,
        stop: CancellationToken,
    ) {
        let mut next = 0;
        let mut backoff = BACKOFF_MIN;
        loop {
            let server = &servers[next % servers.len()];
            next += 1;
            let connected = tokio::select! {
                c = tokio::time::timeout(CONNECT_TIMEOUT, connect(server, &auth, &tls, &name)) => c,
                _ = stop.cancelled() => return,
            };
            match connected {
                Ok(Ok((stream, leftover))) => {
                    backoff = BACKOFF_MIN;
                    ::metrics::counter!(RECONNECTS).increment(1);
                    tracing::info!(server = %server.as_url_str(), "push connection up");
                    let ended = self.serve(stream, leftover, &*handler, &stop).await;
                    self.disconnected();
                    match ended {
                        Ok(()) => return,
                        Err(err) => tracing::warn!(error = %err, "push connection lost"),
                    }
                }
                Ok(Err(err)) => {
                    tracing::warn!(server = %server.as_url_str(), error = %err, "push connection failed")
                }
                Err(_) => {
                    tracing::warn!(server = %server.as_url_str(), "push connection timed out")
                }
            }
            let jitter = rand::random_range(0.5..1.0);
            let wait = backoff.mul_f64(jitter);
            backoff = (backoff * 2).min(BACKOFF_MAX);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.cancelled() => return,
            }
        }
    }

    /// The connection broke: nothing queued for it is written, and the barriers it would have
    /// answered wait for the next connection's.
    fn disconnected(&self) {
        self.inner.connected.store(false, Ordering::Release);
        ::metrics::gauge!(CONNECTED).set(0.0);
        let mut state = self.lock();
        state.accepting = false;
        state.writable = false;
        state.out.clear();
        let pings = std::mem::take(&mut state.pings);
        for (_, waiters) in pings {
            state.waiting.extend(waiters);
        }
    }

    async fn serve(
        &self,
        stream: Link,
        mut buf: BytesMut,
        handler: &dyn Handler,
        stop: &CancellationToken,
    ) -> std::io::Result<()> {
        // Every subscription again, then the barriers: their `PING` follows the `SUB`s.
        self.lock().accepting = true;
        handler.resubscribe();
        self.lock().writable = true;
        self.inner.connected.store(true, Ordering::Release);
        ::metrics::gauge!(CONNECTED).set(1.0);
        self.inner.wake.notify_one();

        let (mut read, mut write) = tokio::io::split(stream);
        let writer = async {
            let mut keepalive = tokio::time::interval(KEEPALIVE);
            keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            keepalive.tick().await;
            let mut bytes = Vec::new();
            loop {
                tokio::select! {
                    _ = self.inner.wake.notified() => {}
                    _ = keepalive.tick() => {
                        let mut state = self.lock();
                        if state
                            .pings
                            .front()
                            .is_some_and(|(at, _)| at.elapsed() >= KEEPALIVE * MAX_PINGS_OUT)
                        {
                            return Err(std::io::Error::new(
                                std::io::ErrorKind::TimedOut,
                                "no pong from the server",
                            ));
                        }
                        state.out.extend_from_slice(proto::PING);
                        state.pings.push_back((tokio::time::Instant::now(), Vec::new()));
                    }
                }
                {
                    let mut state = self.lock();
                    if !state.waiting.is_empty() && state.writable {
                        let waiters = std::mem::take(&mut state.waiting);
                        state.out.extend_from_slice(proto::PING);
                        state
                            .pings
                            .push_back((tokio::time::Instant::now(), waiters));
                    }
                    std::mem::swap(&mut bytes, &mut state.out);
                }
                if !bytes.is_empty() {
                    write.write_all(&bytes).await?;
                    // TLS may hold the last record until flushed (a no-op on plain TCP).
                    write.flush().await?;
                    bytes.clear();
                    // Keep the room of a burst of subscriptions only while it is used.
                    if bytes.capacity() > READ_BUFFER {
                        bytes = Vec::new();
                    }
                }
            }
        };
        let reader = async {
            loop {
                loop {
                    let parsed = proto::next_op(&buf)
                        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
                    let Some((op, used)) = parsed else { break };
                    match op {
                        ServerOp::Msg {
                            subject,
                            reply,
                            payload,
                        } => {
                            ::metrics::counter!(MESSAGES).increment(1);
                            handler.on_message(subject, reply, payload);
                        }
                        ServerOp::Ping => self.push_bytes(|s| s.out.extend_from_slice(proto::PONG)),
                        ServerOp::Pong => self.pong(),
                        ServerOp::Info(info) => {
                            if serde_json::from_slice::<ServerInfo>(info)
                                .is_ok_and(|i| i.lame_duck_mode)
                            {
                                return Err(std::io::Error::other(
                                    "the server entered lame duck mode",
                                ));
                            }
                        }
                        ServerOp::Ok => {}
                        ServerOp::Err(text) => {
                            tracing::warn!(error = text, "push connection: server error")
                        }
                    }
                    buf.advance(used);
                }
                if buf.capacity() - buf.len() < 4096 {
                    buf.reserve(READ_BUFFER);
                }
                if read.read_buf(&mut buf).await? == 0 {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the server closed the push connection",
                    ));
                }
            }
        };
        tokio::select! {
            r = writer => r,
            r = reader => r,
            _ = stop.cancelled() => Ok(()),
        }
    }

    /// A `PONG`: the barriers of the oldest `PING` are live.
    fn pong(&self) {
        let waiters = self.lock().pings.pop_front();
        for w in waiters.into_iter().flat_map(|(_, w)| w) {
            let _ = w.send(());
        }
    }
}

impl Interest for PushClient {
    fn subscribe(&self, subject: &str) -> u64 {
        let mut sid = 0;
        self.push_bytes(|s| {
            sid = s.next_sid;
            s.next_sid += 1;
            s.subscriptions += 1;
            ::metrics::gauge!(SUBSCRIPTIONS).set(s.subscriptions as f64);
            if s.accepting {
                proto::sub(&mut s.out, subject, sid);
            }
        });
        sid
    }

    fn resubscribe(&self, sid: u64, subject: &str) {
        let mut state = self.lock();
        proto::sub(&mut state.out, subject, sid);
    }

    fn unsubscribe(&self, sid: u64) {
        self.push_bytes(|s| {
            s.subscriptions = s.subscriptions.saturating_sub(1);
            ::metrics::gauge!(SUBSCRIPTIONS).set(s.subscriptions as f64);
            if s.accepting {
                proto::unsub(&mut s.out, sid);
            }
        });
    }

    fn barrier(&self) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        self.push_bytes(|s| s.waiting.push(tx));
        rx
    }

    fn is_connected(&self) -> bool {
        self.inner.connected.load(Ordering::Acquire)
    }
}

/// Opens a TCP connection to `server`, reads its `INFO` (upgrading to TLS where `tls` or the
/// server asks for it, before or after the `INFO`), sends `CONNECT` with the credentials of
/// `auth` and waits for the `PONG` that says the server took it. Returns the stream and
/// whatever was read past the `PONG`.
async fn connect(
    server: &ServerAddr,
    auth: &PushAuth,
    tls: &PushTls,
    name: &str,
) -> std::io::Result<(Link, BytesMut)> {
    let tcp = TcpStream::connect((server.host(), server.port())).await?;
    tcp.set_nodelay(true)?;
    let mut stream = Link::Plain(tcp);
    if tls.handshake_first() {
        stream = stream.upgrade(tls, server).await?;
    }
    let mut buf = BytesMut::with_capacity(READ_BUFFER);
    let mut sent_connect = false;
    loop {
        while let Some((op, used)) = proto::next_op(&buf)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?
        {
            match op {
                ServerOp::Info(raw) if !sent_connect => {
                    let info: ServerInfo = serde_json::from_slice(raw)
                        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
                    if !stream.is_tls() && (info.tls_required || tls.wanted(server)) {
                        if !link::offers_tls(raw) {
                            return Err(std::io::Error::new(
                                std::io::ErrorKind::Unsupported,
                                "TLS is asked for (a tls:// URL or nats_tls) but the server does not offer it",
                            ));
                        }
                        // The server says nothing more until the client's TLS hello.
                        if buf.len() != used {
                            return Err(std::io::Error::new(
                                std::io::ErrorKind::InvalidData,
                                "the server sent more than its INFO before TLS",
                            ));
                        }
                        stream = stream.upgrade(tls, server).await?;
                    }
                    let credentials = auth.credentials(server, &info.nonce).map_err(|e| {
                        std::io::Error::new(
                            std::io::ErrorKind::PermissionDenied,
                            format!("cannot sign the server's nonce: {e}"),
                        )
                    })?;
                    let hello = proto::connect(name, &credentials, stream.is_tls());
                    stream.write_all(&hello).await?;
                    stream.flush().await?;
                    sent_connect = true;
                }
                ServerOp::Pong if sent_connect => {
                    buf.advance(used);
                    return Ok((stream, buf));
                }
                ServerOp::Err(text) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::PermissionDenied,
                        format!("server refused the push connection: {text}"),
                    ));
                }
                ServerOp::Ping => {
                    stream.write_all(proto::PONG).await?;
                    stream.flush().await?;
                }
                _ => {}
            }
            buf.advance(used);
        }
        if stream.read_buf(&mut buf).await? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the server closed the connection while connecting",
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use chat_common::nats::NatsTls;
    use chat_testkit::{
        NatsServer,
        tls::{fixture, server_config},
    };

    use super::*;

    /// A nats-server that requires TLS and verifies client certificates (`extra`: more of
    /// its `tls` block).
    fn tls_server(extra: &str) -> NatsServer {
        NatsServer::start_with_config(&server_config(extra))
    }

    fn settings(ca: &str, client_certificate: bool) -> NatsTls {
        NatsTls {
            ca_file: Some(fixture(ca)),
            cert_file: client_certificate.then(|| fixture("test-only-client.pem")),
            key_file: client_certificate.then(|| fixture("test-only-client-key.pem")),
            handshake_first: false,
        }
    }

    async fn try_connect(url: &str, settings: &NatsTls) -> std::io::Result<Link> {
        let server: ServerAddr = url.parse().unwrap();
        let tls = PushTls::load(settings, std::slice::from_ref(&server)).unwrap();
        let auth = PushAuth::load(&Default::default()).unwrap();
        let connecting = connect(&server, &auth, &tls, "push-test");
        let (link, _) = tokio::time::timeout(CONNECT_TIMEOUT * 2, connecting)
            .await
            .expect("connected or refused in time")?;
        Ok(link)
    }

    #[tokio::test]
    async fn tls_verifies_the_server_and_presents_the_client_certificate() {
        let server = tls_server("");
        let port = server.port();
        // The CA that signed the server, and a client certificate: up, CONNECT answered.
        for url in [
            format!("tls://127.0.0.1:{port}"),
            format!("nats://127.0.0.1:{port}"),
        ] {
            let link = try_connect(&url, &settings("test-only-ca.pem", true))
                .await
                .unwrap_or_else(|e| panic!("{url}: {e}\n{}", server.logs()));
            assert!(link.is_tls(), "{url}");
        }
        // Another CA: the server's certificate is refused before any credentials go out.
        let other = try_connect(
            &format!("tls://127.0.0.1:{port}"),
            &settings("test-only-other-ca.pem", true),
        )
        .await;
        let err = other.err().expect("an untrusted server is refused");
        assert!(err.to_string().contains("TLS handshake failed"), "{err}");
        // No client certificate where the server verifies clients: the server refuses.
        let anonymous = try_connect(
            &format!("tls://127.0.0.1:{port}"),
            &settings("test-only-ca.pem", false),
        )
        .await;
        assert!(anonymous.is_err(), "connected without a client certificate");
        // TLS asked for by a plain server: refused with the reason, nothing sent in clear.
        let plain = NatsServer::start();
        let err = try_connect(
            &format!("tls://127.0.0.1:{}", plain.port()),
            &NatsTls::default(),
        )
        .await
        .err()
        .expect("a server without TLS is refused");
        assert!(err.to_string().contains("does not offer"), "{err}");
    }

    #[tokio::test]
    async fn handshake_first_starts_tls_before_the_servers_info() {
        let server = tls_server("handshake_first: true");
        let url = format!("tls://127.0.0.1:{}", server.port());
        let first = NatsTls {
            handshake_first: true,
            ..settings("test-only-ca.pem", true)
        };
        let link = try_connect(&url, &first)
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", server.logs()));
        assert!(link.is_tls());
        // Waiting for an INFO such a server never sends in clear: refused.
        assert!(
            try_connect(&url, &settings("test-only-ca.pem", true))
                .await
                .is_err()
        );
    }
}
