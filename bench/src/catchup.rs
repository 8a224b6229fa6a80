//! Catching up: a device syncs once (it is up to date), goes offline, `messages` arrive for it
//! from `senders` users (one conversation each), and it reconnects and pages through `sync`
//! (the protocol's catch-up, `docs/protocol.md`). Measured: from the start of the reconnect to
//! the moment it holds every message, with per-conversation seqs checked dense and no message
//! twice.
//!
//! The senders send closed loop (64 unacknowledged each, the gateway's in-flight limit) and the
//! reconnect starts only once every message is stamped (each sender saw its own copy) and the
//! pipeline's consumers are idle, so the measurement is the catch-up alone.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use chat_protocol::frames::{ClientFrame, ErrorCode, ServerFrame};
use futures::SinkExt;
use serde::Serialize;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite;

use crate::{
    dm::conv_of,
    system::System,
    ws::{self, Lite, Ws},
};

const RECIPIENT: &str = "catchup-r";
const WINDOW: u64 = 64;
/// Most messages per sync page the protocol allows.
const SYNC_PAGE: u32 = 1000;
/// `unavailable` answers to sync a catch-up tolerates (200 ms apart).
const MAX_RETRIES: u32 = 100;

#[derive(Debug, Clone, Copy, Serialize)]
pub struct CatchupSpec {
    pub messages: u64,
    pub senders: usize,
    pub size: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct CatchupResult {
    pub spec: CatchupSpec,
    /// Messages acknowledged with `sent` (each once, by id).
    pub acked: u64,
    /// Distinct messages the device holds after catching up.
    pub received: u64,
    /// Messages that came twice (same conversation and seq).
    pub duplicates: u64,
    /// Conversations whose seqs were not exactly 1..=n.
    pub gaps: u64,
    pub sync_pages: u64,
    /// Sync requests of the measured catch-up repeated after `unavailable` (each costs 200 ms).
    pub sync_retries: u32,
    /// Seconds to send everything and see it stamped.
    pub send_s: f64,
    /// Reconnect started -> `hello`.
    pub hello_ms: f64,
    /// Reconnect started -> first sync page.
    pub first_page_ms: f64,
    /// Reconnect started -> every message held.
    pub catchup_ms: f64,
}

impl CatchupResult {
    pub fn summary(&self) -> String {
        format!(
            "catchup: {} messages from {} senders ({} B) while offline; acked {}, sent and \
             stamped in {:.2} s\n  reconnect: hello after {:.1} ms, first page after {:.1} ms, \
             all {} held after {:.1} ms ({} pages, {} retried); duplicates {}, conversations with gaps \
             {}\n",
            self.spec.messages,
            self.spec.senders,
            self.spec.size,
            self.acked,
            self.send_s,
            self.hello_ms,
            self.first_page_ms,
            self.received,
            self.catchup_ms,
            self.sync_pages,
            self.sync_retries,
            self.duplicates,
            self.gaps,
        )
    }
}

async fn send(ws: &mut Ws, frame: &ClientFrame) -> Result<()> {
    let text = serde_json::to_string(frame).expect("client frames encode");
    ws.send(tungstenite::Message::text(text))
        .await
        .context("write")
}

/// One sender: `n` messages to the recipient, `WINDOW` unacknowledged at most; returns when
/// every message is acked and its own copy (stamped) has come back.
async fn send_all(sys: &System, k: usize, n: u64, size: usize) -> Result<u64> {
    let user = format!("catchup-s{k}");
    let conv = conv_of(&user, RECIPIENT)?;
    let mut ws = ws::connect(sys.gateway_url(), sys.secret(), &user, "d", None).await?;
    let frame = |i: u64| {
        let mut body = format!("{k}.{i}.");
        while body.len() < size {
            body.push('x');
        }
        ClientFrame::Send {
            conv: conv.clone(),
            id: format!("c{i}"),
            body,
            media: None,
        }
    };
    let (mut next, mut acked, mut stamped) = (0u64, HashSet::new(), HashSet::new());
    let mut retries: Vec<(Instant, u64)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while acked.len() as u64 != n || stamped.len() as u64 != n {
        if Instant::now() > deadline {
            bail!(
                "{user}: {} acked, {} stamped of {n}",
                acked.len(),
                stamped.len()
            );
        }
        let now = Instant::now();
        let due: Vec<u64> = retries
            .iter()
            .filter(|(at, _)| *at <= now)
            .map(|(_, i)| *i)
            .collect();
        retries.retain(|(at, _)| *at > now);
        for i in due {
            send(&mut ws, &frame(i)).await?;
        }
        while next < n && next - (acked.len() as u64) < WINDOW {
            send(&mut ws, &frame(next)).await?;
            next += 1;
        }
        let Ok(text) =
            tokio::time::timeout(Duration::from_millis(50), ws::next_text(&mut ws)).await
        else {
            continue;
        };
        let Some(text) = text? else {
            bail!("{user}: socket closed");
        };
        let f: Lite<'_> = serde_json::from_str(&text)?;
        let index =
            f.id.as_deref()
                .and_then(|id| id.strip_prefix('c')?.parse::<u64>().ok());
        match (f.kind.as_ref(), index) {
            ("sent", Some(i)) => {
                acked.insert(i);
            }
            ("message", Some(i)) => {
                stamped.insert(i);
            }
            ("error", Some(i)) => {
                let wait = Duration::from_millis(f.retry_after_ms.unwrap_or(100));
                retries.push((Instant::now() + wait, i));
            }
            _ => {}
        }
    }
    let _ = ws.close(None).await;
    Ok(acked.len() as u64)
}

/// Syncs from `since` until the last page; returns the messages by (conv, seq), the pages,
/// the duplicates, the time of the first page and the final token.
pub(crate) struct SyncOutcome {
    pub(crate) held: HashMap<(String, u64), String>,
    pages: u64,
    duplicates: u64,
    first_page: Option<Instant>,
    token: Option<String>,
    /// Requests repeated after `unavailable`.
    retries: u32,
}

pub(crate) async fn sync_all(ws: &mut Ws, since: Option<String>) -> Result<SyncOutcome> {
    let mut out = SyncOutcome {
        held: HashMap::new(),
        pages: 0,
        duplicates: 0,
        first_page: None,
        token: None,
        retries: 0,
    };
    let mut cursors: BTreeMap<String, u64> = BTreeMap::new();
    let mut next = None;
    loop {
        let req = format!("s{}-{}", out.pages, out.retries);
        send(
            ws,
            &ClientFrame::Sync {
                req: req.clone(),
                since: since.clone(),
                cursors: cursors.clone(),
                next: next.clone(),
                limit: Some(SYNC_PAGE),
            },
        )
        .await?;
        let page = loop {
            let text = tokio::time::timeout(Duration::from_secs(30), ws::next_text(ws))
                .await
                .context("sync page timed out")??
                .context("socket closed during sync")?;
            match serde_json::from_str::<ServerFrame>(&text) {
                Ok(ServerFrame::Sync {
                    req: r,
                    messages,
                    more,
                    next,
                    token,
                    ..
                }) if r == req => break Ok((messages, more, next, token)),
                Ok(ServerFrame::Error(e)) if e.req.as_deref() == Some(req.as_str()) => {
                    break Err(e);
                }
                _ => continue,
            }
        };
        let (messages, more, page_next, token) = match page {
            Ok(page) => page,
            // `unavailable` (the sequencer is starting or busy): the same request again.
            Err(e) if e.code == ErrorCode::Unavailable && out.retries < MAX_RETRIES => {
                out.retries += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            Err(e) => bail!("sync refused: {e:?}"),
        };
        out.first_page.get_or_insert_with(Instant::now);
        out.pages += 1;
        for m in messages {
            let c = cursors.entry(m.conv.clone()).or_insert(0);
            *c = (*c).max(m.seq);
            if out.held.insert((m.conv, m.seq), m.body).is_some() {
                out.duplicates += 1;
            }
        }
        if !more {
            out.token = token;
            return Ok(out);
        }
        next = page_next;
    }
}

pub async fn run(sys: &System, spec: CatchupSpec) -> Result<CatchupResult> {
    // The device is up to date, then goes offline.
    let mut ws = ws::connect(sys.gateway_url(), sys.secret(), RECIPIENT, "phone", None).await?;
    let first = sync_all(&mut ws, None).await?;
    let since = first.token.context("the first sync gave no token")?;
    let _ = ws.close(None).await;
    drop(ws);

    // Messages arrive while it is away.
    let started = Instant::now();
    let senders = spec.senders.max(1);
    let per = spec.messages / senders as u64;
    let extra = spec.messages % senders as u64;
    let sends = (0..senders).map(|k| {
        let n = per + u64::from((k as u64) < extra);
        send_all(sys, k, n, spec.size)
    });
    let acked: u64 = futures::future::try_join_all(sends).await?.iter().sum();
    let send_s = started.elapsed().as_secs_f64();
    if !sys.wait_idle(Duration::from_secs(60)).await {
        bail!("the pipeline did not go idle within 60 s of the last message");
    }

    // Reconnect and catch up.
    let t0 = Instant::now();
    let mut ws = ws::connect(sys.gateway_url(), sys.secret(), RECIPIENT, "phone", None).await?;
    let hello = t0.elapsed();
    let got = sync_all(&mut ws, Some(since)).await?;
    let done = t0.elapsed();
    let _ = ws.close(None).await;

    let mut per_conv: HashMap<&str, Vec<u64>> = HashMap::new();
    for (conv, seq) in got.held.keys() {
        per_conv.entry(conv.as_str()).or_default().push(*seq);
    }
    let mut gaps = 0;
    for seqs in per_conv.values_mut() {
        seqs.sort_unstable();
        if seqs.iter().enumerate().any(|(i, s)| *s != i as u64 + 1) {
            gaps += 1;
        }
    }
    Ok(CatchupResult {
        spec,
        acked,
        received: got.held.len() as u64,
        duplicates: got.duplicates,
        gaps,
        sync_pages: got.pages,
        sync_retries: got.retries,
        send_s,
        hello_ms: hello.as_secs_f64() * 1e3,
        first_page_ms: got
            .first_page
            .map_or(0.0, |f| f.duration_since(t0).as_secs_f64() * 1e3),
        catchup_ms: done.as_secs_f64() * 1e3,
    })
}
