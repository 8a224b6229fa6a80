//! A simulated client device that behaves like a real app, per `docs/protocol.md`.
//!
//! Each device is one tokio task holding one WebSocket to a gateway (tokio-tungstenite). It:
//! - **sends** (if it is a sender) a new message every `send_interval` (jittered; several per
//!   tick when the interval is shorter than a tick) to one of its user's conversations, each with a fresh client id `<user>-<device>-<n>`, keeping at most
//!   `window` unacknowledged messages per conversation (the suite uses 1, stop-and-wait per
//!   chat: with several in flight, a send refused with `unavailable` can be overtaken by the
//!   next one, which the server accepted, and the sender's order is lost on the client's side);
//! - keeps every send **pending until `sent`**, and resends it with the same id after
//!   `unavailable` (with backoff), `rate_limited` (after `retry_after_ms`), no `sent` within
//!   [`SEND_TIMEOUT`], and after every reconnect; some senders **deliberately retry** (the same
//!   frame again before `sent` arrives, or once more after it);
//! - keeps, per conversation, the messages **shown** to the user by seq (deduplicated by
//!   `(conv, seq)`; a repeated push is counted as a raw duplicate, never shown twice), the
//!   contiguous cursor (every seq up to it is shown), and every member's watermarks as last seen
//!   (highest of `receipt` frames and sync `convs[].members`);
//! - detects **gaps** from the seqs (and from sync's `latest`) and fills them with `history`
//!   (`after` + `before`: exactly the missing range);
//! - on every (re)connect sends **`sync`** with its token and cursors, pages until `more` is
//!   false and keeps the final token; resends its highest receipts (they are idempotent);
//! - sends `delivered` for what it has contiguously, and on the user's reading device `read`;
//! - on any socket close **reconnects**, alternating gateways (so a dead gateway is skipped: its
//!   connection fails and the next attempt goes to the other one);
//! - in **groups** (`g~…`) knows its membership window from the events (the one that added the
//!   user opens it, the one that removed it, or sync's `left`, closes it): it sends and
//!   acknowledges there only while it knows it is a member, and treats the seqs before its
//!   joining as none of its business (its cursor starts at the joining event).
//!
//! The harness steers a device with [`Command`]s (go offline for a while, sync now, final read,
//! a burst of messages, a group operation, stop writing to a group, stop) and reads its
//! [`DeviceState`] (shared behind a mutex) to wait for convergence and, at the end, to check
//! what the user saw. [`probe_reads`] is a separate one-shot client that measures how long
//! reads take to come back after a fault.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use chat_protocol::{
    auth::mint_dev_token,
    frames::{ClientFrame, ErrorCode, ErrorFrame, GroupOp, Message, ServerFrame},
    ids::UserId,
    membership::{Turn, turn_of},
};
use futures::{SinkExt, StreamExt};
use rand::{Rng, SeedableRng, rngs::StdRng, seq::IndexedRandom};
use tokio::{
    net::TcpStream,
    sync::mpsc,
    time::{Instant, timeout},
};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, tungstenite};

/// No `sent` this long after an attempt: send the same frame again.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(3);
/// A history or sync request unanswered this long is asked again.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(6);
/// Backoff after `unavailable` (sends, history, sync, receipts).
const RETRY_BACKOFF: Duration = Duration::from_millis(300);
/// How often `delivered` receipts are flushed (only the highest seq per conversation).
const RECEIPT_FLUSH: Duration = Duration::from_millis(250);
/// How often a reading device reads during traffic.
const READ_EVERY: Duration = Duration::from_secs(1);
/// Messages per sync page (small, so paging is exercised).
const SYNC_PAGE: u32 = 100;
/// The device's internal clock tick.
const TICK: Duration = Duration::from_millis(50);

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What a device is and does.
#[derive(Debug, Clone)]
pub struct DeviceSpec {
    pub user: String,
    pub device: String,
    /// The user's conversations.
    pub convs: Vec<String>,
    /// Creates new messages while sending is enabled.
    pub sends: bool,
    pub send_interval: Duration,
    /// Most unacknowledged messages per conversation (1: stop-and-wait per chat).
    pub window: usize,
    /// Probability that a new message is sent twice before its `sent` arrives.
    pub dup_before_ack: f64,
    /// Probability that a message is sent once more after its `sent` arrived.
    pub dup_after_ack: f64,
    /// The user's reading device: sends the final `read` of every conversation.
    pub reader: bool,
    /// Also reads (`read` frames) while traffic runs.
    pub reads_during_traffic: bool,
    /// Index of the gateway it connects to first.
    pub first_gateway: usize,
    pub seed: u64,
}

/// What every device shares: where the gateways are, and whether new messages are sent.
#[derive(Debug)]
pub struct Net {
    /// `ws://host:port/ws` of every gateway.
    pub gateways: Vec<String>,
    pub secret: Vec<u8>,
    /// While true, senders create new messages (pending ones are retried regardless).
    pub sending: AtomicBool,
}

/// A group operation the harness has a device make (a `group` frame).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupCmd {
    pub conv: String,
    /// The client id of the frame (chosen by the harness, so it can find the stamped event).
    pub id: String,
    pub op: GroupOp,
    pub name: Option<String>,
    pub members: Vec<String>,
}

/// Instructions from the harness.
#[derive(Debug, Clone)]
pub enum Command {
    /// Close the socket and stay offline this long, then reconnect (and sync).
    Offline(Duration),
    /// Sync now (like an app coming to the foreground). Pushes are best effort: this is how a
    /// device that lost a push of the last message of a conversation learns about it.
    Sync,
    /// On the reading device: read every conversation up to what it has.
    FinalRead,
    /// A sender creates a new message in every conversation it may send to right now (one
    /// without an unacknowledged message), at once: a burst for the sequencer.
    Burst,
    /// Make this group operation, as soon as the group has no unacknowledged message of this
    /// device (like any send: pending until `sent`, retried with the same id).
    Group(GroupCmd),
    /// Create no new message in this conversation any more (the harness is about to remove
    /// the user from the group).
    Mute(String),
    /// Close the socket and end the task.
    Stop,
}

/// One message (or group operation) this device created.
#[derive(Debug, Clone)]
pub struct SendRecord {
    pub conv: String,
    pub id: String,
    /// Empty for group operations (their stamped event has an empty body).
    pub body: String,
    /// A group operation rather than a message.
    pub op: Option<GroupCmd>,
    /// When the device created it (ms since the epoch).
    pub created_ms: u64,
    /// `sent` arrived (at least once).
    pub acked: bool,
    /// Frames sent with this id.
    pub attempts: u32,
    next_attempt: Option<Instant>,
    retry_after_ack: bool,
}

/// What a device knows of one conversation.
#[derive(Debug, Clone, Default)]
pub struct ConvView {
    /// Messages shown to the user, by seq.
    pub shown: BTreeMap<u64, Message>,
    /// `(from, client id)` of every shown message: the same message under two seqs would be a
    /// duplicate shown to the user.
    ids: HashSet<(String, String)>,
    /// Every seq up to this one is shown.
    pub contiguous: u64,
    /// Newest seq this device heard of (pushes, history, sync `latest`).
    pub latest_known: u64,
    /// Every member's (delivered, read) watermarks as this device last saw them (the highest).
    pub marks: BTreeMap<String, (u64, u64)>,
    /// Highest `delivered` / `read` seq this device sent.
    pub delivered_sent: u64,
    pub read_sent: u64,
    /// A group conversation (`g~…`): the user sees only its membership window.
    pub group: bool,
    /// Groups: the user knows it is a member (it saw the event that added it, and not the one
    /// that removed it). It sends, and acknowledges, only then.
    pub member: bool,
    /// Groups: the seq of the event that removed the user (from it or from sync's `left`).
    pub left_at: Option<u64>,
    /// The harness said to create no new message here.
    pub muted: bool,
    history: Option<HistoryAsk>,
    history_retry_at: Option<Instant>,
}

/// A `history` request in flight: the range asked for.
#[derive(Debug, Clone)]
struct HistoryAsk {
    req: String,
    at: Instant,
    after: u64,
    before: Option<u64>,
}

/// Counters of one device.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// `message` pushes of a `(conv, seq)` already shown.
    pub raw_duplicate_pushes: u64,
    /// History or sync answers overlapping what was already shown (expected, not duplicates).
    pub overlaps: u64,
    /// The same `(conv, from, id)` shown under two seqs: a duplicate the user would see.
    pub duplicates_shown: u64,
    /// A `(conv, seq)` that arrived twice with different contents.
    pub mismatches: u64,
    /// Frames that repeated an id already sent (retries, deliberate or not).
    pub resent: u64,
    /// `sent` frames for an id already acked (answers to repeated sends).
    pub repeat_acks: u64,
    pub connects: u64,
    pub connect_failures: u64,
    pub closes: u64,
    pub history_requests: u64,
    pub sync_pages: u64,
    /// Error frames received, by code.
    pub errors: BTreeMap<String, u64>,
}

#[derive(Debug, Clone)]
struct SyncInFlight {
    req: String,
    next: Option<String>,
    sent_at: Instant,
    /// After `unavailable`: ask for the same page again at this time.
    retry_at: Option<Instant>,
}

/// Everything a device knows; the harness reads it (and clones it at the end).
#[derive(Debug, Clone)]
pub struct DeviceState {
    pub spec: DeviceSpec,
    pub convs: BTreeMap<String, ConvView>,
    /// Every message this device created, in the order it first sent them.
    pub sends: Vec<SendRecord>,
    by_id: HashMap<(String, String), usize>,
    pub stats: Stats,
    /// Protocol violations this device saw (each fails the scenario).
    pub problems: Vec<String>,
    pub online: bool,
    /// Token of the last completed sync.
    pub since: Option<String>,
    /// Syncs completed (every page through `more: false`).
    pub syncs_completed: u64,
    sync: Option<SyncInFlight>,
    sync_again: bool,
    /// Group operations waiting for their group to have no unacknowledged message.
    ops: std::collections::VecDeque<GroupCmd>,
    next_req: u64,
    next_id: u64,
    next_send_at: Instant,
    next_receipts_at: Instant,
    next_read_at: Instant,
    rng: StdRng,
}

/// Where a message came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Push,
    History,
    Sync,
}

impl DeviceState {
    pub fn new(spec: DeviceSpec) -> Self {
        let now = Instant::now();
        let convs = spec
            .convs
            .iter()
            .map(|c| {
                let group = c.starts_with("g~");
                let view = ConvView {
                    group,
                    // One-to-one conversations: both users are members from the start.
                    member: !group,
                    ..ConvView::default()
                };
                (c.clone(), view)
            })
            .collect();
        let rng = StdRng::seed_from_u64(spec.seed);
        Self {
            spec,
            convs,
            sends: Vec::new(),
            by_id: HashMap::new(),
            stats: Stats::default(),
            problems: Vec::new(),
            online: false,
            since: None,
            syncs_completed: 0,
            sync: None,
            sync_again: false,
            ops: std::collections::VecDeque::new(),
            next_req: 0,
            next_id: 0,
            next_send_at: now,
            next_receipts_at: now,
            next_read_at: now,
            rng,
        }
    }

    /// `user/device`, for messages.
    pub fn name(&self) -> String {
        format!("{}/{}", self.spec.user, self.spec.device)
    }

    /// Messages (and group operations) created but not acknowledged yet, queued ones included.
    pub fn pending(&self) -> usize {
        self.sends.iter().filter(|s| !s.acked).count() + self.ops.len()
    }

    /// A sync is in flight or wanted.
    pub fn syncing(&self) -> bool {
        self.sync.is_some() || self.sync_again
    }

    fn problem(&mut self, what: String) {
        if self.problems.len() < 50 {
            self.problems.push(format!("{}: {what}", self.name()));
        }
    }

    fn req(&mut self, kind: char) -> String {
        self.next_req += 1;
        format!("{kind}{}", self.next_req)
    }

    fn cursors(&self) -> BTreeMap<String, u64> {
        self.convs
            .iter()
            .filter(|(_, v)| v.contiguous > 0)
            .map(|(c, v)| (c.clone(), v.contiguous))
            .collect()
    }

    fn sync_frame(&mut self, next: Option<String>) -> ClientFrame {
        let req = self.req('s');
        self.sync = Some(SyncInFlight {
            req: req.clone(),
            next: next.clone(),
            sent_at: Instant::now(),
            retry_at: None,
        });
        self.stats.sync_pages += 1;
        ClientFrame::Sync {
            req,
            since: self.since.clone(),
            cursors: self.cursors(),
            next,
            limit: Some(SYNC_PAGE),
        }
    }

    /// Starts a sync, or asks for another one after the one in flight.
    fn start_sync(&mut self, out: &mut Vec<ClientFrame>) {
        if self.sync.is_some() {
            self.sync_again = true;
        } else {
            self.sync_again = false;
            out.push(self.sync_frame(None));
        }
    }

    fn send_frame(&self, i: usize) -> ClientFrame {
        let s = &self.sends[i];
        match &s.op {
            Some(op) => ClientFrame::Group {
                op: op.op,
                conv: op.conv.clone(),
                id: op.id.clone(),
                name: op.name.clone(),
                members: op.members.clone(),
            },
            None => ClientFrame::Send {
                conv: s.conv.clone(),
                id: s.id.clone(),
                body: s.body.clone(),
                media: None,
            },
        }
    }

    /// A new connection said `hello`: sync, resend what is pending, resend receipts.
    fn on_connected(&mut self, out: &mut Vec<ClientFrame>) {
        self.online = true;
        self.stats.connects += 1;
        self.sync = None;
        for view in self.convs.values_mut() {
            view.history = None;
        }
        self.start_sync(out);
        let now = Instant::now();
        for i in 0..self.sends.len() {
            if !self.sends[i].acked {
                out.push(self.send_frame(i));
                let s = &mut self.sends[i];
                s.attempts += 1;
                s.next_attempt = Some(now + SEND_TIMEOUT);
                self.stats.resent += 1;
            }
        }
        for (conv, view) in &self.convs {
            if !view.member {
                continue;
            }
            if view.delivered_sent > 0 {
                out.push(ClientFrame::Delivered {
                    conv: conv.clone(),
                    seq: view.delivered_sent,
                });
            }
            if view.read_sent > 0 {
                out.push(ClientFrame::Read {
                    conv: conv.clone(),
                    seq: view.read_sent,
                });
            }
        }
    }

    fn on_closed(&mut self) {
        if self.online {
            self.stats.closes += 1;
        }
        self.online = false;
        self.sync = None;
        for view in self.convs.values_mut() {
            view.history = None;
        }
    }

    /// Shows `m` unless it is already shown.
    fn apply(&mut self, m: Message, source: Source) {
        let Some(view) = self.convs.get_mut(&m.conv) else {
            let what = format!("got {} #{} of a conversation it is not in", m.conv, m.seq);
            return self.problem(what);
        };
        if m.seq == 0 {
            return self.problem(format!("got seq 0 in {}", m.conv));
        }
        view.latest_known = view.latest_known.max(m.seq);
        if let Some(old) = view.shown.get(&m.seq) {
            if *old != m {
                self.stats.mismatches += 1;
                let what = format!("{} #{} arrived as {old:?} and as {m:?}", m.conv, m.seq);
                return self.problem(what);
            }
            match source {
                Source::Push => self.stats.raw_duplicate_pushes += 1,
                Source::History | Source::Sync => self.stats.overlaps += 1,
            }
            return;
        }
        let again = !view.ids.insert((m.from.clone(), m.id.clone()));
        let what = again.then(|| {
            format!(
                "{} from {} id {} shown again as #{}",
                m.conv, m.from, m.id, m.seq
            )
        });
        if view.group
            && let Some(event) = &m.event
        {
            // The user's window: from the event that added it to the one that removed it.
            match turn_of(event, &m.from, &self.spec.user) {
                Some(Turn::Joined) if view.left_at.is_none_or(|left| left < m.seq) => {
                    view.member = true;
                    view.left_at = None;
                    view.contiguous = view.contiguous.max(m.seq - 1);
                }
                Some(Turn::Left) => {
                    view.member = false;
                    view.left_at = Some(m.seq);
                }
                _ => {}
            }
        }
        view.shown.insert(m.seq, m);
        while view.shown.contains_key(&(view.contiguous + 1)) {
            view.contiguous += 1;
        }
        if let Some(what) = what {
            self.stats.duplicates_shown += 1;
            self.problem(what);
        }
    }

    fn on_frame(&mut self, frame: ServerFrame, out: &mut Vec<ClientFrame>) {
        match frame {
            ServerFrame::Sent { id, conv, .. } => self.on_sent(conv, id, out),
            ServerFrame::Message(m) => self.apply(m, Source::Push),
            ServerFrame::History {
                req,
                conv,
                messages,
                more: _,
            } => self.on_history(req, conv, messages),
            ServerFrame::Receipt(r) => {
                if let Some(view) = self.convs.get_mut(&r.conv) {
                    let mark = view.marks.entry(r.user).or_default();
                    *mark = (mark.0.max(r.delivered), mark.1.max(r.read));
                } else {
                    let what = format!("receipt of a conversation it is not in: {r:?}");
                    self.problem(what);
                }
            }
            ServerFrame::Sync {
                req,
                convs,
                messages,
                more,
                next,
                token,
            } => {
                if self.sync.as_ref().is_none_or(|s| s.req != req) {
                    return; // an answer to a request of an earlier connection or a timed-out one
                }
                for c in convs {
                    let Some(view) = self.convs.get_mut(&c.conv) else {
                        let what = format!("sync lists a conversation it is not in: {}", c.conv);
                        self.problem(what);
                        continue;
                    };
                    view.latest_known = view.latest_known.max(c.latest);
                    if view.group
                        && let Some(left) = c.left
                    {
                        view.member = false;
                        view.left_at = Some(view.left_at.map_or(left, |l| l.max(left)));
                    }
                    for m in c.members {
                        let mark = view.marks.entry(m.user).or_default();
                        *mark = (mark.0.max(m.delivered), mark.1.max(m.read));
                    }
                }
                for m in messages {
                    self.apply(m, Source::Sync);
                }
                match (more, next, token) {
                    (true, Some(next), _) => out.push(self.sync_frame(Some(next))),
                    (false, _, Some(token)) => {
                        self.since = Some(token);
                        self.sync = None;
                        self.syncs_completed += 1;
                        if self.sync_again {
                            self.start_sync(out);
                        }
                    }
                    (more, next, token) => {
                        let what =
                            format!("sync page with more={more} next={next:?} token={token:?}");
                        self.problem(what);
                        self.sync = None;
                    }
                }
            }
            ServerFrame::Error(e) => self.on_error(e, out),
            ServerFrame::Pong
            | ServerFrame::Receipts { .. }
            | ServerFrame::Conversations { .. }
            | ServerFrame::GroupInfo { .. }
            | ServerFrame::Presence { .. }
            | ServerFrame::PresenceSettings { .. }
            | ServerFrame::Typing { .. } => {}
            ServerFrame::Hello { .. } => self.problem("a second hello".into()),
        }
    }

    fn on_sent(&mut self, conv: String, id: String, out: &mut Vec<ClientFrame>) {
        let Some(&i) = self.by_id.get(&(conv.clone(), id.clone())) else {
            return self.problem(format!("sent for an id it never sent: {conv} {id}"));
        };
        if self.sends[i].acked {
            self.stats.repeat_acks += 1;
            return;
        }
        let s = &mut self.sends[i];
        s.acked = true;
        s.next_attempt = None;
        if s.retry_after_ack {
            // A deliberate retry of a message already sent: answered by `sent`, stored once.
            s.retry_after_ack = false;
            s.attempts += 1;
            self.stats.resent += 1;
            out.push(self.send_frame(i));
        }
    }

    fn on_history(&mut self, req: String, conv: String, messages: Vec<Message>) {
        let Some(view) = self.convs.get_mut(&conv) else {
            return self.problem(format!("history of a conversation it is not in: {conv}"));
        };
        let Some(ask) = view.history.take_if(|a| a.req == req) else {
            return; // stale answer
        };
        let mut last = ask.after;
        for m in messages {
            let in_range = m.seq > last && ask.before.is_none_or(|b| m.seq < b);
            if m.conv != conv || !in_range {
                let what = format!(
                    "history after {} before {:?} of {conv} returned #{} ({}) after #{last}",
                    ask.after, ask.before, m.seq, m.conv
                );
                self.problem(what);
            }
            last = last.max(m.seq);
            self.apply(m, Source::History);
        }
    }

    fn on_error(&mut self, e: ErrorFrame, out: &mut Vec<ClientFrame>) {
        *self
            .stats
            .errors
            .entry(e.code.as_str().to_owned())
            .or_default() += 1;
        let retryable = matches!(e.code, ErrorCode::Unavailable | ErrorCode::RateLimited);
        let backoff = e
            .retry_after_ms
            .map_or(RETRY_BACKOFF, Duration::from_millis);
        let retry_at = Instant::now() + backoff;
        if let Some(id) = &e.id {
            let conv = e.conv.clone().unwrap_or_default();
            match self.by_id.get(&(conv, id.clone())) {
                Some(&i) if retryable => {
                    if !self.sends[i].acked {
                        self.sends[i].next_attempt = Some(retry_at);
                    }
                }
                _ => self.problem(format!("send refused: {e:?}")),
            }
        } else if let Some(req) = &e.req {
            if self.sync.as_ref().is_some_and(|s| s.req == *req) {
                match e.code {
                    ErrorCode::InvalidToken => {
                        self.problem(format!("sync token refused: {e:?}"));
                        self.since = None;
                        self.sync = None;
                        self.start_sync(out);
                    }
                    _ if retryable => {
                        if let Some(s) = self.sync.as_mut() {
                            s.retry_at = Some(retry_at);
                        }
                    }
                    _ => self.problem(format!("sync refused: {e:?}")),
                }
            } else if let Some(view) = self
                .convs
                .values_mut()
                .find(|v| v.history.as_ref().is_some_and(|a| a.req == *req))
            {
                view.history = None;
                view.history_retry_at = Some(retry_at);
                if !retryable {
                    self.problem(format!("history refused: {e:?}"));
                }
            }
        } else if let Some(conv) = &e.conv {
            // A receipt was not stored: send the highest again with the next flush.
            match self.convs.get_mut(conv) {
                Some(view) if retryable => {
                    view.delivered_sent = 0;
                    let read = view.read_sent;
                    if read > 0 {
                        out.push(ClientFrame::Read {
                            conv: conv.clone(),
                            seq: read,
                        });
                    }
                }
                _ => self.problem(format!("receipt refused: {e:?}")),
            }
        } else {
            self.problem(format!("error without id, req or conv: {e:?}"));
        }
    }

    /// Time passes: new sends, retries, receipts, gap filling, request timeouts.
    fn on_tick(&mut self, sending: bool, out: &mut Vec<ClientFrame>) {
        let now = Instant::now();
        self.start_ops(now, out);
        // As many new messages as are due (the interval may be shorter than a tick), but no
        // catching up on more than two intervals (after being offline, or when every
        // conversation had a message in flight).
        let interval = self.spec.send_interval;
        if let Some(floor) = now.checked_sub(interval * 2) {
            self.next_send_at = self.next_send_at.max(floor);
        }
        while self.spec.sends && sending && now >= self.next_send_at {
            let jitter = self.rng.random_range(0.5..1.5);
            self.next_send_at += interval.mul_f64(jitter);
            if !self.new_send(now, out) {
                break;
            }
        }
        for i in 0..self.sends.len() {
            let due = self.sends[i].next_attempt.is_some_and(|t| now >= t);
            if due && !self.sends[i].acked {
                out.push(self.send_frame(i));
                let s = &mut self.sends[i];
                s.attempts += 1;
                s.next_attempt = Some(now + SEND_TIMEOUT);
                self.stats.resent += 1;
            }
        }
        if now >= self.next_receipts_at {
            self.next_receipts_at = now + RECEIPT_FLUSH;
            let read_now = self.spec.reads_during_traffic && sending && now >= self.next_read_at;
            if read_now {
                self.next_read_at = now + READ_EVERY;
            }
            for (conv, view) in &mut self.convs {
                if !view.member {
                    // Not (or no longer) a member of the group: its receipts would move nothing.
                    continue;
                }
                if view.contiguous > view.delivered_sent {
                    view.delivered_sent = view.contiguous;
                    out.push(ClientFrame::Delivered {
                        conv: conv.clone(),
                        seq: view.contiguous,
                    });
                }
                if read_now && view.contiguous > view.read_sent {
                    view.read_sent = view.contiguous;
                    out.push(ClientFrame::Read {
                        conv: conv.clone(),
                        seq: view.contiguous,
                    });
                }
            }
        }
        self.fill_gaps(now, out);
        if let Some(s) = &self.sync {
            let timed_out = now >= s.sent_at + REQUEST_TIMEOUT;
            let retry = s.retry_at.is_some_and(|t| now >= t);
            if timed_out || retry {
                let next = s.next.clone();
                out.push(self.sync_frame(next));
            }
        }
    }

    /// A command that arrived while disconnected: group operations and mutes are kept (they
    /// start once connected), the rest only makes sense online.
    fn while_offline(&mut self, c: Command) {
        match c {
            Command::Group(op) => self.ops.push_back(op),
            Command::Mute(conv) => self.mute(&conv),
            Command::Offline(_)
            | Command::Sync
            | Command::FinalRead
            | Command::Burst
            | Command::Stop => {}
        }
    }

    fn mute(&mut self, conv: &str) {
        if let Some(view) = self.convs.get_mut(conv) {
            view.muted = true;
        }
    }

    /// Messages (and group operations) not acknowledged yet in `conv`, queued ones included.
    pub fn pending_in(&self, conv: &str) -> usize {
        self.sends
            .iter()
            .filter(|s| !s.acked && s.conv == conv)
            .count()
            + self.ops.iter().filter(|o| o.conv == conv).count()
    }

    /// Unacknowledged messages per conversation.
    fn busy(&self) -> HashMap<&str, usize> {
        let mut busy: HashMap<&str, usize> = HashMap::new();
        for s in self.sends.iter().filter(|s| !s.acked) {
            *busy.entry(s.conv.as_str()).or_default() += 1;
        }
        busy
    }

    /// The conversations a new message may go to now: at most `window` unacknowledged
    /// messages per conversation (a group operation counts), and in groups only while the
    /// device knows the user is a member and was not told to stop.
    fn free_convs(&self) -> Vec<String> {
        let busy = self.busy();
        let blocked: HashSet<&str> = self.ops.iter().map(|o| o.conv.as_str()).collect();
        self.spec
            .convs
            .iter()
            .filter(|c| busy.get(c.as_str()).copied().unwrap_or(0) < self.spec.window)
            .filter(|c| !blocked.contains(c.as_str()))
            .filter(|c| self.convs.get(*c).is_some_and(|v| v.member && !v.muted))
            .cloned()
            .collect()
    }

    /// Starts the queued group operations whose group has no unacknowledged message.
    fn start_ops(&mut self, now: Instant, out: &mut Vec<ClientFrame>) {
        while let Some(op) = self.ops.front() {
            if self.busy().contains_key(op.conv.as_str()) {
                // One thing in flight per conversation keeps the operations in the order made.
                return;
            }
            let op = self.ops.pop_front().expect("front exists");
            self.by_id
                .insert((op.conv.clone(), op.id.clone()), self.sends.len());
            self.sends.push(SendRecord {
                conv: op.conv.clone(),
                id: op.id.clone(),
                body: String::new(),
                op: Some(op),
                created_ms: chat_protocol::now_ms(),
                acked: false,
                attempts: 1,
                next_attempt: Some(now + SEND_TIMEOUT),
                retry_after_ack: false,
            });
            out.push(self.send_frame(self.sends.len() - 1));
        }
    }

    /// A burst: a new message in every conversation that is free now.
    fn burst(&mut self, out: &mut Vec<ClientFrame>) {
        if !self.spec.sends {
            return;
        }
        let now = Instant::now();
        for conv in self.free_convs() {
            self.send_to(conv, now, out);
        }
    }

    /// A new message to one of the free conversations (`false`: none is free).
    fn new_send(&mut self, now: Instant, out: &mut Vec<ClientFrame>) -> bool {
        let free = self.free_convs();
        let Some(conv) = free.choose(&mut self.rng).cloned() else {
            return false;
        };
        self.send_to(conv, now, out);
        true
    }

    fn send_to(&mut self, conv: String, now: Instant, out: &mut Vec<ClientFrame>) {
        self.next_id += 1;
        let id = format!("{}-{}-{}", self.spec.user, self.spec.device, self.next_id);
        let body = format!("{} from {} #{}", conv, self.spec.device, self.next_id);
        let dup_before = self.rng.random_bool(self.spec.dup_before_ack);
        let retry_after_ack = self.rng.random_bool(self.spec.dup_after_ack);
        self.by_id
            .insert((conv.clone(), id.clone()), self.sends.len());
        self.sends.push(SendRecord {
            conv,
            id,
            body,
            op: None,
            created_ms: chat_protocol::now_ms(),
            acked: false,
            attempts: 1,
            next_attempt: Some(now + SEND_TIMEOUT),
            retry_after_ack,
        });
        let i = self.sends.len() - 1;
        out.push(self.send_frame(i));
        if dup_before {
            out.push(self.send_frame(i));
            self.sends[i].attempts += 1;
            self.stats.resent += 1;
        }
    }

    /// For each conversation with a hole below the newest known seq, asks `history` for exactly
    /// the missing range (`after` the contiguous cursor, `before` the next seq it has).
    fn fill_gaps(&mut self, now: Instant, out: &mut Vec<ClientFrame>) {
        let mut asks = Vec::new();
        for (conv, view) in &mut self.convs {
            if let Some(ask) = &view.history {
                if now < ask.at + REQUEST_TIMEOUT {
                    continue;
                }
                view.history = None;
            }
            if view.history_retry_at.is_some_and(|t| now < t) {
                continue;
            }
            if view.contiguous >= view.latest_known {
                continue;
            }
            let before = view
                .shown
                .range(view.contiguous + 1..)
                .next()
                .map(|(seq, _)| *seq);
            asks.push((conv.clone(), view.contiguous, before));
        }
        for (conv, after, before) in asks {
            let req = self.req('h');
            self.stats.history_requests += 1;
            if let Some(view) = self.convs.get_mut(&conv) {
                view.history = Some(HistoryAsk {
                    req: req.clone(),
                    at: now,
                    after,
                    before,
                });
                view.history_retry_at = None;
            }
            out.push(ClientFrame::History {
                req,
                conv,
                before,
                after: Some(after),
                limit: Some(200),
            });
        }
    }

    /// The final `read` of every conversation, up to what the device has.
    fn final_read(&mut self, out: &mut Vec<ClientFrame>) {
        for (conv, view) in &mut self.convs {
            if view.member && view.contiguous > 0 {
                view.read_sent = view.read_sent.max(view.contiguous);
                out.push(ClientFrame::Read {
                    conv: conv.clone(),
                    seq: view.read_sent,
                });
            }
        }
    }
}

/// A running device: its task, its state and its command channel.
pub struct Device {
    pub state: Arc<Mutex<DeviceState>>,
    commands: mpsc::UnboundedSender<Command>,
    task: tokio::task::JoinHandle<()>,
}

impl Device {
    /// Starts the device's task; it connects right away.
    pub fn spawn(spec: DeviceSpec, net: Arc<Net>) -> Self {
        let state = Arc::new(Mutex::new(DeviceState::new(spec)));
        let (commands, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(run(state.clone(), net, rx));
        Self {
            state,
            commands,
            task,
        }
    }

    pub fn command(&self, c: Command) {
        let _ = self.commands.send(c);
    }

    /// A handle to send it commands from another task.
    pub fn command_sender(&self) -> mpsc::UnboundedSender<Command> {
        self.commands.clone()
    }

    /// Locks the state (briefly: the device task needs it for every frame).
    pub fn lock(&self) -> std::sync::MutexGuard<'_, DeviceState> {
        self.state.lock().expect("device state lock")
    }

    /// Stops the device and returns what it recorded.
    pub async fn stop(self) -> DeviceState {
        self.command(Command::Stop);
        if timeout(Duration::from_secs(10), self.task).await.is_err() {
            let mut st = self.state.lock().expect("device state lock");
            st.problem("the device task did not stop within 10 s".into());
        }
        self.state.lock().expect("device state lock").clone()
    }
}

/// How a connection ended.
enum End {
    Closed,
    Offline(Duration),
    Stop,
}

async fn run(
    state: Arc<Mutex<DeviceState>>,
    net: Arc<Net>,
    mut commands: mpsc::UnboundedReceiver<Command>,
) {
    let (user, device, mut gateway) = {
        let st = state.lock().expect("state");
        (
            st.spec.user.clone(),
            st.spec.device.clone(),
            st.spec.first_gateway,
        )
    };
    let user_id = UserId::parse(&user).expect("valid user id");
    let mut backoff = Duration::from_millis(100);
    loop {
        let token = mint_dev_token(&net.secret, &user_id, 3600);
        let url = format!("{}?token={token}&device={device}", net.gateways[gateway]);
        // Whatever happens, the next attempt goes to the next gateway: alternate on every
        // reconnect, and skip a dead one.
        gateway = (gateway + 1) % net.gateways.len();
        let connected = timeout(
            Duration::from_secs(5),
            tokio_tungstenite::connect_async(url),
        )
        .await;
        let ws = match connected {
            Ok(Ok((ws, _))) => ws,
            _ => {
                state.lock().expect("state").stats.connect_failures += 1;
                let wait = tokio::time::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(1));
                tokio::pin!(wait);
                // Commands still count while disconnected.
                loop {
                    tokio::select! {
                        _ = &mut wait => break,
                        c = commands.recv() => match c {
                            None | Some(Command::Stop) => return,
                            Some(Command::Offline(d)) => {
                                if wait_offline(d, &state, &mut commands).await {
                                    return;
                                }
                                break;
                            }
                            Some(c) => state.lock().expect("state").while_offline(c),
                        }
                    }
                }
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        let end = session(ws, &state, &net, &mut commands).await;
        state.lock().expect("state").on_closed();
        match end {
            // Not in a tight loop if a gateway accepts and drops at once.
            End::Closed => tokio::time::sleep(Duration::from_millis(50)).await,
            End::Stop => return,
            End::Offline(d) => {
                if wait_offline(d, &state, &mut commands).await {
                    return;
                }
            }
        }
    }
}

/// Stays offline for `d`; `true` if told to stop meanwhile.
async fn wait_offline(
    d: Duration,
    state: &Mutex<DeviceState>,
    commands: &mut mpsc::UnboundedReceiver<Command>,
) -> bool {
    let wake = tokio::time::sleep(d);
    tokio::pin!(wake);
    loop {
        tokio::select! {
            _ = &mut wake => return false,
            c = commands.recv() => match c {
                None | Some(Command::Stop) => return true,
                Some(c) => state.lock().expect("state").while_offline(c),
            },
        }
    }
}

async fn session(
    mut ws: Ws,
    state: &Mutex<DeviceState>,
    net: &Net,
    commands: &mut mpsc::UnboundedReceiver<Command>,
) -> End {
    // The first frame is `hello`.
    match timeout(Duration::from_secs(5), next_frame(&mut ws)).await {
        Ok(Some(Ok(ServerFrame::Hello { .. }))) => {}
        Ok(Some(Ok(other))) => {
            state
                .lock()
                .expect("state")
                .problem(format!("first frame is not hello: {other:?}"));
            return End::Closed;
        }
        _ => return End::Closed,
    }
    let mut out = Vec::new();
    state.lock().expect("state").on_connected(&mut out);
    if write(&mut ws, &mut out).await.is_err() {
        return End::Closed;
    }
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            frame = next_frame(&mut ws) => match frame {
                Some(Ok(frame)) => state.lock().expect("state").on_frame(frame, &mut out),
                Some(Err(text)) => state
                    .lock()
                    .expect("state")
                    .problem(format!("undecodable server frame: {text}")),
                None => return End::Closed,
            },
            c = commands.recv() => match c {
                None | Some(Command::Stop) => {
                    close(&mut ws).await;
                    return End::Stop;
                }
                Some(Command::Offline(d)) => {
                    close(&mut ws).await;
                    return End::Offline(d);
                }
                Some(Command::Sync) => state.lock().expect("state").start_sync(&mut out),
                Some(Command::FinalRead) => state.lock().expect("state").final_read(&mut out),
                Some(Command::Burst) => state.lock().expect("state").burst(&mut out),
                Some(Command::Group(op)) => {
                    let mut st = state.lock().expect("state");
                    st.ops.push_back(op);
                    st.start_ops(Instant::now(), &mut out);
                }
                Some(Command::Mute(conv)) => state.lock().expect("state").mute(&conv),
            },
            _ = tick.tick() => {
                let sending = net.sending.load(Ordering::Relaxed);
                state.lock().expect("state").on_tick(sending, &mut out);
            }
        }
        if write(&mut ws, &mut out).await.is_err() {
            return End::Closed;
        }
    }
}

/// The next server frame: `None` when the socket closed or failed, `Some(Err)` for a text
/// frame that does not decode. Pings are answered by tungstenite.
async fn next_frame(ws: &mut Ws) -> Option<Result<ServerFrame, String>> {
    loop {
        match ws.next().await? {
            Ok(tungstenite::Message::Text(text)) => {
                return Some(
                    serde_json::from_str(text.as_str()).map_err(|e| format!("{e}: {text}")),
                );
            }
            Ok(tungstenite::Message::Close(_)) | Err(_) => return None,
            Ok(_) => continue,
        }
    }
}

async fn write(ws: &mut Ws, out: &mut Vec<ClientFrame>) -> Result<(), tungstenite::Error> {
    if out.is_empty() {
        return Ok(());
    }
    for frame in out.drain(..) {
        let text = serde_json::to_string(&frame).expect("client frames encode");
        ws.feed(tungstenite::Message::text(text)).await?;
    }
    ws.flush().await
}

async fn close(ws: &mut Ws) {
    let _ = timeout(Duration::from_secs(1), ws.close(None)).await;
}

/// How long, from now, until a `history` and a `sync` of `user` answer again with what was
/// stamped from now on, through any of `gateways`. `before` holds the newest seq of each of
/// the user's conversations as of now, and `conv` is a busy one of them: the probe (device
/// `probe`) asks `history` of `conv` after `before[conv]` and `sync` with `before` as its
/// cursors, every 100 ms, until the history answer holds a message and the sync answer lists
/// a conversation beyond its cursor (a store that answers from what it had before, or not at
/// all, does not count), at most `limit`. Returns (history, sync) in ms.
pub async fn probe_reads(
    gateways: &[String],
    secret: &[u8],
    user: &str,
    before: &BTreeMap<String, u64>,
    conv: &str,
    limit: Duration,
) -> Result<(u64, u64), String> {
    let started = Instant::now();
    let deadline = started + limit;
    let user_id = UserId::parse(user).map_err(|e| format!("{user}: {e}"))?;
    let after = before.get(conv).copied().unwrap_or(0);
    let (mut history_ms, mut sync_ms) = (None, None);
    let mut attempt = 0usize;
    let mut n = 0u64;
    while Instant::now() < deadline {
        let token = mint_dev_token(secret, &user_id, 3600);
        let url = format!(
            "{}?token={token}&device=probe",
            gateways[attempt % gateways.len()]
        );
        attempt += 1;
        let Ok(Ok((mut ws, _))) = timeout(
            Duration::from_secs(1),
            tokio_tungstenite::connect_async(url),
        )
        .await
        else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        // One connection for as long as it lasts: ask, wait up to 100 ms for answers, ask again.
        'connection: while Instant::now() < deadline {
            n += 1;
            let mut asks = Vec::new();
            if history_ms.is_none() {
                asks.push(ClientFrame::History {
                    req: format!("ph{n}"),
                    conv: conv.to_owned(),
                    before: None,
                    after: Some(after),
                    limit: Some(1),
                });
            }
            if sync_ms.is_none() {
                asks.push(ClientFrame::Sync {
                    req: format!("ps{n}"),
                    since: None,
                    cursors: before.clone(),
                    next: None,
                    limit: Some(100),
                });
            }
            if write(&mut ws, &mut asks).await.is_err() {
                break 'connection;
            }
            let round = Instant::now() + Duration::from_millis(100);
            loop {
                let left = round.saturating_duration_since(Instant::now());
                match timeout(left, next_frame(&mut ws)).await {
                    Err(_) => break,
                    Ok(None) => break 'connection,
                    Ok(Some(Ok(ServerFrame::History { messages, .. }))) => {
                        if !messages.is_empty() {
                            history_ms.get_or_insert(started.elapsed().as_millis() as u64);
                        }
                    }
                    Ok(Some(Ok(ServerFrame::Sync { convs, .. }))) => {
                        let newer = convs
                            .iter()
                            .any(|c| c.latest > before.get(&c.conv).copied().unwrap_or(0));
                        if newer {
                            sync_ms.get_or_insert(started.elapsed().as_millis() as u64);
                        }
                    }
                    Ok(Some(_)) => {}
                }
                if let (Some(h), Some(s)) = (history_ms, sync_ms) {
                    close(&mut ws).await;
                    return Ok((h, s));
                }
            }
        }
    }
    Err(format!(
        "reads did not answer with new messages within {limit:?}: history after {history_ms:?} \
         ms, sync after {sync_ms:?} ms"
    ))
}

#[cfg(test)]
impl DeviceState {
    /// Test helper: records a message this device sent and got `sent` for.
    pub(crate) fn record_acked_send(&mut self, conv: &str, id: &str) {
        self.by_id
            .insert((conv.to_owned(), id.to_owned()), self.sends.len());
        self.sends.push(SendRecord {
            conv: conv.to_owned(),
            id: id.to_owned(),
            body: format!("body {id}"),
            op: None,
            created_ms: 0,
            acked: true,
            attempts: 1,
            next_attempt: None,
            retry_after_ack: false,
        });
    }

    /// Test helper: records a group operation this device made and got `sent` for.
    pub(crate) fn record_acked_op(&mut self, op: GroupCmd) {
        self.record_acked_send(&op.conv.clone(), &op.id.clone());
        let last = self.sends.last_mut().expect("just pushed");
        last.body = String::new();
        last.op = Some(op);
    }

    /// Test helper: shows a message as if pushed.
    pub(crate) fn show(&mut self, m: Message) {
        self.apply(m, Source::Push);
    }
}

#[cfg(test)]
mod tests {
    use chat_protocol::frames::GroupEvent;

    use super::*;

    fn event(seq: u64, from: &str, event: GroupEvent) -> Message {
        Message {
            conv: "g~team".into(),
            seq,
            from: from.into(),
            id: format!("op{seq}"),
            ts: seq,
            body: String::new(),
            media: None,
            event: Some(event),
        }
    }

    #[test]
    fn a_device_sends_to_a_group_only_inside_its_window() {
        let mut d = DeviceState::new(DeviceSpec {
            user: "cat".into(),
            device: "phone".into(),
            convs: vec!["dm~ann~cat".into(), "g~team".into()],
            sends: true,
            send_interval: Duration::from_millis(10),
            window: 1,
            dup_before_ack: 0.0,
            dup_after_ack: 0.0,
            reader: true,
            reads_during_traffic: false,
            first_gateway: 0,
            seed: 1,
        });
        assert_eq!(d.free_convs(), vec!["dm~ann~cat".to_owned()]);
        // Added at #3: from there on it sends, and #1, #2 are none of its business.
        d.apply(
            event(
                3,
                "ann",
                GroupEvent::Added {
                    members: vec!["cat".into()],
                },
            ),
            Source::Push,
        );
        let view = &d.convs["g~team"];
        assert!(view.member);
        assert_eq!(view.contiguous, 3);
        assert_eq!(d.free_convs().len(), 2);
        // Muted before its removal, then removed at #5.
        d.mute("g~team");
        assert_eq!(d.free_convs(), vec!["dm~ann~cat".to_owned()]);
        d.apply(
            event(
                5,
                "ann",
                GroupEvent::Removed {
                    members: vec!["cat".into()],
                },
            ),
            Source::Push,
        );
        let view = &d.convs["g~team"];
        assert!(!view.member);
        assert_eq!(view.left_at, Some(5));
    }
}
