//! A lean WebSocket client of the protocol for load generation: connect (optionally from a
//! chosen source address), wait for `hello`, then a writer task fed by a channel and a reader
//! that decodes only the fields the benchmarks need.

use std::{borrow::Cow, net::IpAddr, time::Duration};

use anyhow::{Context, Result, anyhow, bail};
use chat_protocol::{auth::mint_dev_token, frames::ServerFrame, ids::UserId};
use futures::{SinkExt, StreamExt, stream::SplitStream};
use serde::Deserialize;
use tokio::{
    net::{TcpSocket, TcpStream},
    sync::mpsc,
};
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{self, protocol::WebSocketConfig},
};

pub type Ws = WebSocketStream<TcpStream>;

/// How long connecting (TCP, upgrade and `hello`) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

/// The fields of a server frame the load generator looks at; everything else is skipped
/// without being decoded (the generator's CPU counts too).
#[derive(Debug, Deserialize)]
pub struct Lite<'a> {
    #[serde(rename = "type", borrow)]
    pub kind: Cow<'a, str>,
    #[serde(default, borrow)]
    pub id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub conv: Option<Cow<'a, str>>,
    #[serde(default)]
    pub seq: Option<u64>,
    #[serde(default, borrow)]
    pub body: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub code: Option<Cow<'a, str>>,
    #[serde(default)]
    pub retry_after_ms: Option<u64>,
}

/// Small buffers on the client side too: the generator holds many sockets.
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
}

/// Connects `user`/`device` to the gateway at `url` (`ws://host:port/ws`), from source
/// address `bind` if given, and returns the socket once `hello` arrived.
pub async fn connect(
    url: &str,
    secret: &[u8],
    user: &str,
    device: &str,
    bind: Option<IpAddr>,
) -> Result<Ws> {
    connect_with(url, secret, user, device, bind, None).await
}

/// Like [`connect`], with the socket's receive buffer set to `recv_buffer` bytes (the kernel
/// may round it): a client that reads slowly then fills the server's queue soon.
pub async fn connect_with(
    url: &str,
    secret: &[u8],
    user: &str,
    device: &str,
    bind: Option<IpAddr>,
    recv_buffer: Option<u32>,
) -> Result<Ws> {
    tokio::time::timeout(
        CONNECT_TIMEOUT,
        connect_inner(url, secret, user, device, bind, recv_buffer),
    )
    .await
    .map_err(|_| anyhow!("connect timed out after {CONNECT_TIMEOUT:?}"))?
}

async fn connect_inner(
    url: &str,
    secret: &[u8],
    user: &str,
    device: &str,
    bind: Option<IpAddr>,
    recv_buffer: Option<u32>,
) -> Result<Ws> {
    let user_id = UserId::parse(user).map_err(|e| anyhow!("user id {user}: {e}"))?;
    let token = mint_dev_token(secret, &user_id, 24 * 3600);
    let addr = url
        .trim_start_matches("ws://")
        .split('/')
        .next()
        .unwrap_or_default()
        .parse::<std::net::SocketAddr>()
        .with_context(|| format!("gateway address in {url}"))?;
    let socket = TcpSocket::new_v4().context("socket")?;
    if let Some(ip) = bind {
        socket
            .bind((ip, 0).into())
            .with_context(|| format!("bind {ip}"))?;
    }
    if let Some(bytes) = recv_buffer {
        socket.set_recv_buffer_size(bytes).context("SO_RCVBUF")?;
    }
    let stream = socket.connect(addr).await.context("tcp connect")?;
    stream.set_nodelay(true)?;
    let request = format!("{url}?token={token}&device={device}");
    let (mut ws, _) =
        tokio_tungstenite::client_async_with_config(request, stream, Some(ws_config()))
            .await
            .context("websocket upgrade")?;
    match next_text(&mut ws).await? {
        Some(text) => match serde_json::from_str::<ServerFrame>(&text) {
            Ok(ServerFrame::Hello { .. }) => Ok(ws),
            _ => bail!("first frame is not hello: {text}"),
        },
        None => bail!("closed before hello"),
    }
}

/// The next text frame (pings are answered by tungstenite), `None` once closed.
pub async fn next_text<S>(ws: &mut S) -> Result<Option<tungstenite::Utf8Bytes>>
where
    S: futures::Stream<Item = Result<tungstenite::Message, tungstenite::Error>> + Unpin,
{
    loop {
        match ws.next().await {
            None | Some(Ok(tungstenite::Message::Close(_))) => return Ok(None),
            Some(Ok(tungstenite::Message::Text(t))) => return Ok(Some(t)),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e.into()),
        }
    }
}

/// Splits a connected socket: frames queued on the returned sender are written in order
/// (flushed whenever the queue is empty); the stream half is the caller's to read.
pub fn split(ws: Ws) -> (mpsc::UnboundedSender<String>, SplitStream<Ws>) {
    let (mut sink, stream) = ws.split();
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        while let Some(first) = rx.recv().await {
            if sink.feed(tungstenite::Message::text(first)).await.is_err() {
                return;
            }
            while let Ok(more) = rx.try_recv() {
                if sink.feed(tungstenite::Message::text(more)).await.is_err() {
                    return;
                }
            }
            if sink.flush().await.is_err() {
                return;
            }
        }
        let _ = sink.close().await;
    });
    (tx, stream)
}
