//! The checker: after the services exited, reads the embedded store of **every** sequencer
//! directly (through the [`MessageStore`] trait), the whole `CHAT_MSGS` stream, and what every
//! simulated device recorded, and lists every violation of the guarantees:
//!
//! - every message acknowledged as sent is stored exactly once (by conversation, sender and
//!   client id), and nothing is stored that was never sent;
//! - seqs are dense `1..=n` in every conversation, every store holds the same messages,
//!   watermarks and per-user conversation index, and they match what `CHAT_MSGS` holds (no
//!   `(conv, seq)` stamped twice there either);
//! - each sender device's messages in a conversation have increasing seqs, in the order the
//!   device first sent them;
//! - every device of every member shows every stored message of its conversations, with the
//!   stored contents, and nothing twice;
//! - receipts converged: each member's stored read watermark is what the member last read (or
//!   wrote), its delivered watermark what its devices last acknowledged, and every device sees
//!   every member at the stored watermarks;
//! - no instance stamped anything after a moment the scenario forbids (a resumed old owner).
//!
//! The one-line [`Summary`] is what the suite prints per scenario.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
    path::PathBuf,
};

use chat_protocol::{
    frames::{GroupEvent, GroupOp},
    ids::ConvId,
    membership::{Roster, Turn, turn_of},
};
use chat_store::{
    ConvSummary, EmbeddedStore, MAX_PAGE_LIMIT, Marks, Member, MessageStore, PageQuery,
    StoredMessage,
};

use crate::{
    audit::{Event, StreamEntry},
    client::DeviceState,
};

/// Everything one store holds about the simulated conversations and users.
#[derive(Debug, Clone, Default)]
pub struct StoreDump {
    pub name: String,
    /// Every message of each conversation, ascending by seq.
    pub messages: BTreeMap<String, Vec<StoredMessage>>,
    pub marks: BTreeMap<String, Vec<Marks>>,
    /// Every member, current and former, of each group.
    pub members: BTreeMap<String, Vec<Member>>,
    pub user_convs: BTreeMap<String, Vec<ConvSummary>>,
    pub applied: u64,
}

/// Opens the store in `dir` (its process must have exited: redb locks the file) and reads
/// every page of every conversation, every conversation's watermarks and every user's index.
pub async fn dump_store(
    name: &str,
    dir: PathBuf,
    convs: &[String],
    users: &[String],
) -> Result<StoreDump, String> {
    let shown = dir.display().to_string();
    let store = tokio::task::spawn_blocking(move || EmbeddedStore::open(dir))
        .await
        .map_err(|e| format!("open {shown}: {e}"))?
        .map_err(|e| format!("open {shown}: {e}"))?;
    let fail = |what: &str, e: chat_store::StoreError| format!("{name}: {what}: {e}");
    let mut dump = StoreDump {
        name: name.to_owned(),
        applied: store
            .applied_stream_seq()
            .await
            .map_err(|e| fail("applied", e))?,
        ..Default::default()
    };
    for conv in convs {
        let mut all = Vec::new();
        let mut after = 0;
        loop {
            let page = store
                .page(
                    conv,
                    PageQuery::After {
                        after,
                        limit: MAX_PAGE_LIMIT,
                    },
                )
                .await
                .map_err(|e| fail("page", e))?;
            let Some(last) = page.messages.last() else {
                break;
            };
            after = last.seq;
            all.extend(page.messages);
            if !page.more {
                break;
            }
        }
        dump.messages.insert(conv.clone(), all);
        let marks = store
            .watermarks(conv)
            .await
            .map_err(|e| fail("watermarks", e))?;
        dump.marks.insert(conv.clone(), marks);
        if conv.starts_with("g~") {
            let mut members = store.members(conv).await.map_err(|e| fail("members", e))?;
            members.sort_by(|a, b| a.user.cmp(&b.user));
            dump.members.insert(conv.clone(), members);
        }
    }
    for user in users {
        let listed = store
            .user_conversations(user, 0, None, MAX_PAGE_LIMIT)
            .await
            .map_err(|e| fail("user_conversations", e))?;
        dump.user_convs.insert(user.clone(), listed.convs);
    }
    Ok(dump)
}

/// The per-scenario summary line.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub scenario: String,
    /// Messages the clients created (distinct client ids).
    pub sent: usize,
    /// Of those, acknowledged with `sent`.
    pub acked: usize,
    /// Messages in the store.
    pub stored: usize,
    /// Distinct (device, conv, seq) shown to users.
    pub delivered: usize,
    /// Duplicates shown to users (the same message twice): must be 0.
    pub duplicates: u64,
    /// `message` pushes of something a device already had (harmless, deduped by seq).
    pub raw_duplicate_pushes: u64,
    /// Holes: missing seqs in a store, plus stored messages a device never got. Must be 0.
    pub gaps: u64,
    /// Send frames that repeated a client id (retries, deliberate or after a fault).
    pub resent: u64,
    /// Group events stored (create, add, remove, ...).
    pub group_events: usize,
    /// Messages the clients created per second from the end of the warm-up until they stopped
    /// (the scenario's traffic, its fault included).
    pub offered_msg_s: f64,
    /// Messages stamped per second over the same time.
    pub rate_msg_s: f64,
    /// From the fault to the first message stamped by the new owner.
    pub takeover_ms: Option<u64>,
    /// Inputs the sequencer had pulled and not acked when the fault hit (`num_ack_pending`
    /// over its partition consumers).
    pub in_flight: Option<u64>,
    /// From nats-server being back to the first `history` and `sync` answered again.
    pub reads_back_ms: Option<u64>,
    /// Stamps of a resumed old owner in partitions whose pin it won anew after resuming.
    pub repinned_stamps: u64,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let opt = |o: Option<u64>| o.map_or_else(|| "-".to_owned(), |t| t.to_string());
        write!(
            f,
            "fault-summary scenario={} sent={} acked={} stored={} delivered={} duplicates={} \
             raw_duplicate_pushes={} gaps={} resent={} group_events={} offered_msg_s={:.0} \
             rate_msg_s={:.0} \
             takeover_ms={} in_flight={} reads_back_ms={} repinned_stamps={}",
            self.scenario,
            self.sent,
            self.acked,
            self.stored,
            self.delivered,
            self.duplicates,
            self.raw_duplicate_pushes,
            self.gaps,
            self.resent,
            self.group_events,
            self.offered_msg_s,
            self.rate_msg_s,
            opt(self.takeover_ms),
            opt(self.in_flight),
            opt(self.reads_back_ms),
            self.repinned_stamps,
        )
    }
}

/// What the checker looks at.
pub struct CheckInput<'a> {
    pub scenario: &'a str,
    pub users: &'a [String],
    pub convs: &'a [String],
    pub devices: &'a [DeviceState],
    /// Every sequencer's store; the first is the reference the others must equal.
    pub stores: &'a [StoreDump],
    /// Every `CHAT_MSGS` entry.
    pub stream: &'a [StreamEntry],
    /// Instances that must not have stamped anything after a moment.
    pub forbidden_after: &'a [Forbidden],
    /// Pin assignments seen on each partition's sequencer consumer (ms since the epoch), to
    /// explain an order violation.
    pub pins: &'a BTreeMap<u32, Vec<u64>>,
    pub takeover_ms: Option<u64>,
}

/// An instance that must stamp nothing after `after_ms` (ms since the epoch), e.g. an old
/// owner resumed after its partitions were taken over.
///
/// With `pins` (every pin assignment the server made on each partition's sequencer consumer
/// after `after_ms`, as watched), a stamp in a partition whose pin was assigned again after
/// `after_ms`, with nobody else stamping there between that assignment and the stamp, is
/// allowed: the instance won that partition anew (hot standbys compete for every partition,
/// and a pull stream that fails drops its pin). A stamp on a pin older than `after_ms` is
/// never allowed: that is a stale owner.
#[derive(Debug, Clone)]
pub struct Forbidden {
    pub instance: String,
    pub after_ms: u64,
    pub pins: Option<BTreeMap<u32, Vec<u64>>>,
}

/// The summary and every violation found.
#[derive(Debug, Clone, Default)]
pub struct Findings {
    pub summary: Summary,
    pub violations: Vec<String>,
}

/// Keeps at most `max` examples of one kind of violation.
fn examples<T: fmt::Debug>(items: &[T], max: usize) -> String {
    let shown: Vec<String> = items.iter().take(max).map(|i| format!("{i:?}")).collect();
    if items.len() > max {
        format!("{} … ({} in all)", shown.join(", "), items.len())
    } else {
        shown.join(", ")
    }
}

pub fn check(input: &CheckInput<'_>) -> Findings {
    let mut v: Vec<String> = Vec::new();
    let mut summary = Summary {
        scenario: input.scenario.to_owned(),
        takeover_ms: input.takeover_ms,
        ..Default::default()
    };
    let Some(reference) = input.stores.first() else {
        v.push("no store to check".into());
        return Findings {
            summary,
            violations: v,
        };
    };

    // Who may see what: one-to-one conversations their two members, groups each member's
    // windows, replayed from the stored events (and checked against the stored membership).
    let access = Access::of(input.convs, reference, &mut v);
    check_groups(input, reference, &access, &mut summary, &mut v);

    // Stores: dense seqs, and all alike.
    for store in input.stores {
        for (conv, msgs) in &store.messages {
            let seqs: Vec<u64> = msgs.iter().map(|m| m.seq).collect();
            let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
            if seqs != expected {
                let set: BTreeSet<u64> = seqs.iter().copied().collect();
                let max = seqs.iter().copied().max().unwrap_or(0);
                let holes: Vec<u64> = (1..=max).filter(|s| !set.contains(s)).collect();
                summary.gaps += holes.len() as u64;
                v.push(format!(
                    "{}: {conv} seqs are not dense 1..n: holes {}, {} seqs for {} distinct",
                    store.name,
                    examples(&holes, 10),
                    seqs.len(),
                    set.len()
                ));
            }
            if msgs.iter().any(|m| m.conv != *conv) {
                v.push(format!(
                    "{}: a page of {conv} holds another conversation",
                    store.name
                ));
            }
        }
    }
    for other in &input.stores[1..] {
        for conv in input.convs {
            let (a, b) = (&reference.messages[conv], &other.messages[conv]);
            if a != b {
                let diff: Vec<u64> = a
                    .iter()
                    .zip(b)
                    .filter(|(x, y)| x != y)
                    .map(|(x, _)| x.seq)
                    .collect();
                v.push(format!(
                    "stores disagree on {conv}: {} has {} messages, {} has {}; differing seqs {}",
                    reference.name,
                    a.len(),
                    other.name,
                    b.len(),
                    examples(&diff, 10)
                ));
            }
            if reference.members.get(conv) != other.members.get(conv) {
                v.push(format!(
                    "stores disagree on the members of {conv}: {} {:?}, {} {:?}",
                    reference.name,
                    reference.members.get(conv),
                    other.name,
                    other.members.get(conv)
                ));
            }
            if reference.marks[conv] != other.marks[conv] {
                v.push(format!(
                    "stores disagree on the watermarks of {conv}: {} {:?}, {} {:?}",
                    reference.name, reference.marks[conv], other.name, other.marks[conv]
                ));
            }
        }
        if reference.user_convs != other.user_convs {
            v.push(format!(
                "stores disagree on the user conversation index ({} vs {})",
                reference.name, other.name
            ));
        }
    }
    let last_stream_seq = input.stream.last().map_or(0, |e| e.stream_seq);
    for store in input.stores {
        if store.applied != last_stream_seq {
            v.push(format!(
                "{} applied the stream up to {}, the stream ends at {last_stream_seq}",
                store.name, store.applied
            ));
        }
        for user in input.users {
            // (latest the user sees, joined, left) of every conversation it is or was in.
            let want: BTreeMap<&str, (u64, u64, Option<u64>)> = input
                .convs
                .iter()
                .filter_map(|c| {
                    let n = store.messages[c].len() as u64;
                    let &(from, to) = access.windows(c, user).last()?;
                    let latest = to.unwrap_or(n).min(n);
                    (latest > 0).then_some((c.as_str(), (latest, from, to)))
                })
                .collect();
            let got: BTreeMap<&str, (u64, u64, Option<u64>)> = store.user_convs[user]
                .iter()
                .map(|s| (s.conv.as_str(), (s.latest, s.joined, s.left)))
                .collect();
            if want != got {
                v.push(format!(
                    "{}: the conversation index of {user} lists {got:?}, expected {want:?}",
                    store.name
                ));
            }
        }
    }

    // The stream: each (conv, seq) stamped once, and exactly what the store holds.
    let mut stamped: BTreeMap<(String, u64), Vec<&StreamEntry>> = BTreeMap::new();
    for e in input.stream {
        match &e.event {
            Event::Message(m) => stamped.entry((m.conv.clone(), m.seq)).or_default().push(e),
            Event::Receipt(_) => {}
            Event::Other(what) => v.push(format!(
                "CHAT_MSGS #{} on {} is neither a message nor a receipt: {what}",
                e.stream_seq, e.subject
            )),
        }
    }
    let twice: Vec<&(String, u64)> = stamped
        .iter()
        .filter(|(_, es)| es.len() > 1)
        .map(|(k, _)| k)
        .collect();
    if !twice.is_empty() {
        v.push(format!(
            "CHAT_MSGS holds these (conv, seq) more than once: {}",
            examples(&twice, 10)
        ));
    }
    let mut stream_vs_store = Vec::new();
    let mut stored_count = 0;
    for (conv, msgs) in &reference.messages {
        stored_count += msgs.len();
        for m in msgs {
            let same = stamped.get(&(conv.clone(), m.seq)).is_some_and(|es| {
                es.iter().any(|e| {
                    e.stream_seq == m.stream_seq
                        && e.message().is_some_and(|s| {
                            s.from == m.from
                                && s.id == m.client_id
                                && s.body == m.body
                                && s.ts == m.ts_ms
                        })
                })
            });
            if !same {
                stream_vs_store.push((conv.clone(), m.seq));
            }
        }
    }
    let in_stream = stamped
        .keys()
        .filter(|(c, _)| reference.messages.contains_key(c))
        .count();
    if !stream_vs_store.is_empty() || in_stream != stored_count {
        v.push(format!(
            "store and CHAT_MSGS differ: {in_stream} stamped, {stored_count} stored; stored \
             messages not matching the stream: {}",
            examples(&stream_vs_store, 10)
        ));
    }
    summary.stored = stored_count;

    // Exactly once, nothing invented.
    let mut stored_by_key: HashMap<(&str, &str, &str), Vec<u64>> = HashMap::new();
    for (conv, msgs) in &reference.messages {
        for m in msgs {
            stored_by_key
                .entry((conv.as_str(), m.from.as_str(), m.client_id.as_str()))
                .or_default()
                .push(m.seq);
        }
    }
    let mut sent_keys = BTreeSet::new();
    let (mut never_acked, mut lost, mut stored_twice) = (Vec::new(), Vec::new(), Vec::new());
    for d in input.devices {
        for s in &d.sends {
            summary.sent += 1;
            let key = (s.conv.as_str(), d.spec.user.as_str(), s.id.as_str());
            sent_keys.insert(key);
            if s.acked {
                summary.acked += 1;
            } else {
                never_acked.push(format!("{} {}", s.conv, s.id));
            }
            match stored_by_key.get(&key).map(Vec::len) {
                None | Some(0) if s.acked => lost.push(format!("{} {}", s.conv, s.id)),
                Some(n) if n > 1 => stored_twice.push(format!("{} {} x{n}", s.conv, s.id)),
                _ => {}
            }
        }
    }
    if !never_acked.is_empty() {
        v.push(format!(
            "sends never acknowledged: {}",
            examples(&never_acked, 10)
        ));
    }
    if !lost.is_empty() {
        v.push(format!(
            "acknowledged but not stored: {}",
            examples(&lost, 10)
        ));
    }
    if !stored_twice.is_empty() {
        v.push(format!(
            "stored more than once: {}",
            examples(&stored_twice, 10)
        ));
    }
    let invented: Vec<_> = stored_by_key
        .keys()
        .filter(|k| !sent_keys.contains(*k))
        .collect();
    if !invented.is_empty() {
        v.push(format!(
            "stored but never sent: {}",
            examples(&invented, 10)
        ));
    }

    // Each sender device's order.
    for d in input.devices {
        let mut by_conv: BTreeMap<&str, Vec<(&str, Option<u64>)>> = BTreeMap::new();
        for s in &d.sends {
            let key = (s.conv.as_str(), d.spec.user.as_str(), s.id.as_str());
            let seq = stored_by_key
                .get(&key)
                .and_then(|seqs| seqs.first().copied());
            by_conv.entry(&s.conv).or_default().push((&s.id, seq));
        }
        for (conv, sends) in by_conv {
            let seqs: Vec<(&str, u64)> = sends
                .iter()
                .filter_map(|(id, seq)| seq.map(|s| (*id, s)))
                .collect();
            let reordered: Vec<_> = seqs.windows(2).filter(|w| w[0].1 >= w[1].1).collect();
            if !reordered.is_empty() {
                // Who stamped the first pair, and when (for the report).
                let who = |seq: u64| {
                    stamped
                        .get(&(conv.to_owned(), seq))
                        .and_then(|es| es.first())
                        .map_or_else(
                            || "?".to_owned(),
                            |e| {
                                format!(
                                    "#{seq} by {} at {} (stream {})",
                                    e.stamper.as_deref().unwrap_or("?"),
                                    e.time_ms,
                                    e.stream_seq
                                )
                            },
                        )
                };
                let first = reordered[0];
                // The pins of the conversation's partition around the pair.
                let pins = stamped
                    .get(&(conv.to_owned(), first[0].1))
                    .and_then(|es| es.first())
                    .and_then(|e| chat_protocol::subjects::split_partitioned(&e.subject))
                    .map(|(p, _)| {
                        let times = input.pins.get(&p).cloned().unwrap_or_default();
                        format!("partition {p} pinned at {times:?}")
                    })
                    .unwrap_or_default();
                v.push(format!(
                    "{}: messages to {conv} stamped out of the order they were sent: {} (first: \
                     {} then {}; {pins})",
                    d.name(),
                    examples(&reordered, 5),
                    who(first[0].1),
                    who(first[1].1)
                ));
            }
        }
    }

    // Every device of every member has everything, once.
    for d in input.devices {
        summary.duplicates += d.stats.duplicates_shown;
        summary.raw_duplicate_pushes += d.stats.raw_duplicate_pushes;
        summary.resent += d.stats.resent;
        for p in &d.problems {
            v.push(format!("client saw: {p}"));
        }
        for (conv, view) in &d.convs {
            summary.delivered += view.shown.len();
            let stored = &reference.messages[conv];
            let mut missing = Vec::new();
            let mut different = Vec::new();
            for m in stored {
                if !access.sees(conv, &d.spec.user, m.seq) {
                    continue;
                }
                match view.shown.get(&m.seq) {
                    None => missing.push(m.seq),
                    Some(s) => {
                        let same = s.from == m.from
                            && s.id == m.client_id
                            && s.body == m.body
                            && s.ts == m.ts_ms;
                        if !same {
                            different.push(m.seq);
                        }
                    }
                }
            }
            // Nothing that is not stored, nothing outside the user's membership window.
            let extra: Vec<u64> = view
                .shown
                .keys()
                .filter(|s| {
                    **s == 0 || **s > stored.len() as u64 || !access.sees(conv, &d.spec.user, **s)
                })
                .copied()
                .collect();
            summary.gaps += missing.len() as u64;
            if !missing.is_empty() {
                v.push(format!(
                    "{} never got {conv} {} (has up to {}, heard of {})",
                    d.name(),
                    examples(&missing, 10),
                    view.contiguous,
                    view.latest_known
                ));
            }
            if !different.is_empty() || !extra.is_empty() {
                v.push(format!(
                    "{} shows {conv} messages that differ from the store {} or are not stored \
                     (or outside its membership window) {}",
                    d.name(),
                    examples(&different, 10),
                    examples(&extra, 10)
                ));
            }
        }
    }

    // Receipts.
    for conv in input.convs {
        let n = reference.messages[conv].len() as u64;
        let stored_marks = |user: &str| {
            reference.marks[conv]
                .iter()
                .find(|m| m.user == user)
                .map_or((0, 0), |m| (m.delivered, m.read))
        };
        // Current members (of a one-to-one conversation: both); a former member of a group
        // only never above its removal.
        let current = access.current_members(conv);
        for (user, windows) in access.members_ever(conv) {
            if let Some(&(_, Some(left))) = windows.last() {
                let have = stored_marks(&user);
                if have.0 > left || have.1 > left {
                    v.push(format!(
                        "{conv}: {user}, removed at {left}, has stored watermarks {have:?}"
                    ));
                }
            }
        }
        for user in current.iter().map(String::as_str) {
            let own = reference.messages[conv]
                .iter()
                .filter(|m| m.from == user)
                .map(|m| m.seq)
                .max()
                .unwrap_or(0);
            let devices = input.devices.iter().filter(|d| d.spec.user == user);
            let (mut read, mut delivered) = (own, own);
            for d in devices {
                if let Some(view) = d.convs.get(conv) {
                    read = read.max(view.read_sent);
                    delivered = delivered.max(view.delivered_sent).max(view.read_sent);
                }
            }
            let want = (delivered.min(n), read.min(n));
            let have = stored_marks(user);
            if have != want {
                v.push(format!(
                    "{conv}: {user}'s stored (delivered, read) is {have:?}, but the user \
                     acknowledged {want:?}"
                ));
            }
        }
        for d in input.devices {
            let Some(view) = d.convs.get(conv) else {
                continue;
            };
            if !current.contains(&d.spec.user) {
                continue;
            }
            for member in &current {
                let seen = view.marks.get(member).copied().unwrap_or((0, 0));
                let have = stored_marks(member);
                if seen != have {
                    v.push(format!(
                        "{} sees {member} in {conv} at {seen:?}, the store has {have:?}",
                        d.name()
                    ));
                }
            }
        }
    }

    // Fenced instances.
    for f in input.forbidden_after {
        let (late, repinned) = late_stamps(f, input.stream);
        summary.repinned_stamps += repinned;
        if !late.is_empty() {
            v.push(format!(
                "{} stamped after it was superseded, on a pin from before: {}",
                f.instance,
                examples(&late, 10)
            ));
        }
    }

    Findings {
        summary,
        violations: v,
    }
}

/// A window of a conversation: seqs `from..=to` (`to`: the event that removed the user).
type Window = (u64, Option<u64>);

/// Who may see what of every conversation.
#[derive(Debug, Default)]
struct Access {
    /// Groups: every user that was ever a member, with its windows in seq order.
    groups: BTreeMap<String, BTreeMap<String, Vec<Window>>>,
}

impl Access {
    /// Replays every group's stored events (reporting events that do not decode or make no
    /// sense, such as a removal of a non-member).
    fn of(convs: &[String], reference: &StoreDump, v: &mut Vec<String>) -> Self {
        let mut access = Access::default();
        for conv in convs.iter().filter(|c| c.starts_with("g~")) {
            let windows = access.groups.entry(conv.clone()).or_default();
            for m in &reference.messages[conv] {
                let Some(text) = &m.event else { continue };
                let event: GroupEvent = match serde_json::from_str(text) {
                    Ok(e) => e,
                    Err(e) => {
                        v.push(format!(
                            "{conv} #{}: undecodable event {text:?}: {e}",
                            m.seq
                        ));
                        continue;
                    }
                };
                for user in chat_protocol::membership::named(&event, &m.from) {
                    let list = windows.entry(user.to_owned()).or_default();
                    let open = list.last().is_some_and(|w| w.1.is_none());
                    match turn_of(&event, &m.from, user) {
                        Some(Turn::Joined) if !open => list.push((m.seq, None)),
                        Some(Turn::Left) if open => {
                            list.last_mut().expect("open window").1 = Some(m.seq);
                        }
                        turn => v.push(format!(
                            "{conv} #{}: event {event:?} by {} turns {user} {turn:?}, who is \
                             {} a member",
                            m.seq,
                            m.from,
                            if open { "already" } else { "not" }
                        )),
                    }
                }
            }
            windows.retain(|_, list| !list.is_empty());
        }
        access
    }

    /// The windows of `user` in `conv` (a one-to-one conversation: all of it for its members).
    fn windows(&self, conv: &str, user: &str) -> Vec<Window> {
        match self.groups.get(conv) {
            Some(users) => users.get(user).cloned().unwrap_or_default(),
            None if is_direct_member(conv, user) => vec![(1, None)],
            None => Vec::new(),
        }
    }

    /// Whether `user` may see seq `seq` of `conv`.
    fn sees(&self, conv: &str, user: &str, seq: u64) -> bool {
        self.windows(conv, user)
            .iter()
            .any(|(from, to)| seq >= *from && to.is_none_or(|to| seq <= to))
    }

    /// Everyone who ever was a member, with their windows.
    fn members_ever(&self, conv: &str) -> Vec<(String, Vec<Window>)> {
        match self.groups.get(conv) {
            Some(users) => users.iter().map(|(u, w)| (u.clone(), w.clone())).collect(),
            None => direct_members(conv)
                .into_iter()
                .map(|u| (u, vec![(1, None)]))
                .collect(),
        }
    }

    /// The members as of the conversation's last message.
    fn current_members(&self, conv: &str) -> Vec<String> {
        self.members_ever(conv)
            .into_iter()
            .filter(|(_, w)| w.last().is_some_and(|w| w.1.is_none()))
            .map(|(u, _)| u)
            .collect()
    }
}

/// Groups: the stored membership is what the stored events make it; every event is the group
/// operation its admin made (in the order made, each stored once: see the checks of every
/// send); no message of a user is stamped outside its window.
fn check_groups(
    input: &CheckInput<'_>,
    reference: &StoreDump,
    access: &Access,
    summary: &mut Summary,
    v: &mut Vec<String>,
) {
    // Expected event of every group operation a device made, by (conv, from, id).
    let mut made: HashMap<(&str, &str, &str), GroupEvent> = HashMap::new();
    for d in input.devices {
        for s in &d.sends {
            let Some(op) = &s.op else { continue };
            let members = op.members.clone();
            let event = match op.op {
                GroupOp::Create => GroupEvent::Created {
                    name: op.name.clone().unwrap_or_default(),
                    members,
                },
                GroupOp::Add => GroupEvent::Added { members },
                GroupOp::Remove => GroupEvent::Removed { members },
                other => {
                    v.push(format!("the checker knows no expected event for {other:?}"));
                    continue;
                }
            };
            made.insert(
                (s.conv.as_str(), d.spec.user.as_str(), s.id.as_str()),
                event,
            );
        }
    }
    for (conv, users) in &access.groups {
        let msgs = &reference.messages[conv];
        // Replay the events into the members the store should hold.
        let mut roster = Roster::default();
        for m in msgs {
            let event = m
                .event
                .as_deref()
                .and_then(|t| serde_json::from_str::<GroupEvent>(t).ok());
            match &event {
                Some(event) => {
                    summary.group_events += 1;
                    match made.get(&(conv.as_str(), m.from.as_str(), m.client_id.as_str())) {
                        Some(want) if want == event => {}
                        want => v.push(format!(
                            "{conv} #{}: stored event {event:?} by {} ({}), but the operation \
                             made was {want:?}",
                            m.seq, m.from, m.client_id
                        )),
                    }
                    let admin_ok =
                        m.seq == 1 || roster.members().iter().any(|r| r.user == m.from && r.admin);
                    if !admin_ok {
                        v.push(format!(
                            "{conv} #{}: {} made {event:?} without being an admin",
                            m.seq, m.from
                        ));
                    }
                    roster.apply(m.seq, &m.from, event);
                }
                None if !access.sees(conv, &m.from, m.seq) => {
                    v.push(format!(
                        "{conv} #{}: {} is stamped outside the sender's membership window {:?}",
                        m.seq,
                        m.from,
                        users.get(&m.from)
                    ));
                }
                None => {}
            }
        }
        let mut want: Vec<Member> = users
            .iter()
            .map(|(user, windows)| {
                let &(joined, left) = windows.last().expect("non-empty");
                let admin =
                    left.is_none() && roster.members().iter().any(|r| r.user == *user && r.admin);
                Member {
                    user: user.clone(),
                    joined,
                    left,
                    admin,
                }
            })
            .collect();
        want.sort_by(|a, b| a.user.cmp(&b.user));
        // A former member's admin flag is not part of what it sees: compare it only for the
        // current ones.
        let stored: Vec<Member> = reference
            .members
            .get(conv)
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .map(|mut m| {
                if m.left.is_some() {
                    m.admin = false;
                }
                m
            })
            .collect();
        if stored != want {
            v.push(format!(
                "{}: the stored members of {conv} are {stored:?}, the events make {want:?}",
                reference.name
            ));
        }
    }
}

/// The stamps `f` forbids (described), and how many stamps after `f.after_ms` were allowed
/// because the instance had won the partition's pin anew.
fn late_stamps(f: &Forbidden, stream: &[StreamEntry]) -> (Vec<String>, u64) {
    let partition = |e: &StreamEntry| {
        chat_protocol::subjects::split_partitioned(&e.subject).map_or(u32::MAX, |(p, _)| p)
    };
    let mut late = Vec::new();
    let mut repinned = 0;
    for e in stream
        .iter()
        .filter(|e| e.stamper.as_deref() == Some(f.instance.as_str()) && e.time_ms > f.after_ms)
    {
        let p = partition(e);
        // The latest pin assignment of the partition between the moment and the stamp.
        let pinned_at = f.pins.as_ref().and_then(|pins| {
            pins.get(&p)?
                .iter()
                .copied()
                .filter(|t| *t > f.after_ms && *t <= e.time_ms)
                .max()
        });
        let won_anew = pinned_at.is_some_and(|at| {
            !stream.iter().any(|o| {
                partition(o) == p
                    && o.stamper.as_deref() != Some(f.instance.as_str())
                    && (at..=e.time_ms).contains(&o.time_ms)
            })
        });
        if won_anew {
            repinned += 1;
        } else {
            late.push(format!(
                "#{} {} at +{} ms",
                e.stream_seq,
                e.subject,
                e.time_ms - f.after_ms
            ));
        }
    }
    (late, repinned)
}

fn is_direct_member(conv: &str, user: &str) -> bool {
    direct_members(conv).iter().any(|m| m == user)
}

fn direct_members(conv: &str) -> Vec<String> {
    ConvId::parse(conv)
        .ok()
        .and_then(|c| c.direct_members().cloned())
        .map(|pair| pair.iter().map(|u| u.as_str().to_owned()).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    //! The checker must not pass vacuously: each test breaks one guarantee in an otherwise
    //! clean world and expects a violation naming it.

    use std::time::Duration;

    use chat_protocol::frames::Message;

    use super::*;
    use crate::{
        audit::STAMPER_HEADER,
        client::{DeviceSpec, GroupCmd},
    };

    const CONV: &str = "dm~ann~ben";

    fn spec(user: &str) -> DeviceSpec {
        DeviceSpec {
            user: user.into(),
            device: "phone".into(),
            convs: vec![CONV.into()],
            sends: true,
            send_interval: Duration::from_millis(100),
            window: 1,
            dup_before_ack: 0.0,
            dup_after_ack: 0.0,
            reader: true,
            reads_during_traffic: false,
            first_gateway: 0,
            seed: 1,
        }
    }

    fn stored(seq: u64, from: &str, id: &str) -> StoredMessage {
        StoredMessage {
            conv: CONV.into(),
            seq,
            from: from.into(),
            client_id: id.into(),
            ts_ms: 1000 + seq,
            body: format!("body {id}"),
            stream_seq: seq,
            event: None,
            media: None,
        }
    }

    fn frame(m: &StoredMessage) -> Message {
        Message {
            conv: m.conv.clone(),
            seq: m.seq,
            from: m.from.clone(),
            id: m.client_id.clone(),
            ts: m.ts_ms,
            body: m.body.clone(),
            event: None,
            media: None,
        }
    }

    struct World {
        devices: Vec<DeviceState>,
        stores: Vec<StoreDump>,
        stream: Vec<StreamEntry>,
        users: Vec<String>,
        convs: Vec<String>,
    }

    /// ann sends a1, a2; ben sends b1; everyone has everything and read everything.
    fn clean() -> World {
        let msgs = vec![
            stored(1, "ann", "a1"),
            stored(2, "ben", "b1"),
            stored(3, "ann", "a2"),
        ];
        let mut devices = Vec::new();
        for (user, ids) in [("ann", vec!["a1", "a2"]), ("ben", vec!["b1"])] {
            let mut d = DeviceState::new(spec(user));
            for id in ids {
                d.record_acked_send(CONV, id);
            }
            for m in &msgs {
                d.show(frame(m));
            }
            let view = d.convs.get_mut(CONV).unwrap();
            view.delivered_sent = 3;
            view.read_sent = 3;
            view.marks.insert("ann".into(), (3, 3));
            view.marks.insert("ben".into(), (3, 3));
            devices.push(d);
        }
        let marks = vec![
            Marks {
                user: "ann".into(),
                delivered: 3,
                read: 3,
            },
            Marks {
                user: "ben".into(),
                delivered: 3,
                read: 3,
            },
        ];
        let summaries = |_: &str| vec![chat_store::conformance::summary(CONV, 3, 3)];
        let store = StoreDump {
            name: "seq-a".into(),
            messages: BTreeMap::from([(CONV.to_owned(), msgs.clone())]),
            marks: BTreeMap::from([(CONV.to_owned(), marks)]),
            members: BTreeMap::new(),
            user_convs: BTreeMap::from([
                ("ann".to_owned(), summaries("ann")),
                ("ben".to_owned(), summaries("ben")),
            ]),
            applied: 3,
        };
        let mut other = store.clone();
        other.name = "seq-b".into();
        let stream = msgs
            .iter()
            .map(|m| StreamEntry {
                stream_seq: m.stream_seq,
                subject: format!("chat.msg.0.{CONV}"),
                stamper: Some("seq-a".into()),
                time_ms: m.ts_ms,
                event: Event::Message(frame(m)),
            })
            .collect();
        World {
            devices,
            stores: vec![store, other],
            stream,
            users: vec!["ann".into(), "ben".into()],
            convs: vec![CONV.into()],
        }
    }

    const GROUP: &str = "g~team";

    /// A group: ann creates it with ben (#1), ben writes (#2), ann adds cat (#3), cat writes
    /// (#4), ann removes ben (#5), ann writes (#6). Everyone has exactly their window.
    fn group_world() -> World {
        let event = |e: GroupEvent| Some(serde_json::to_string(&e).unwrap());
        let names = |v: &[&str]| v.iter().map(|u| (*u).to_owned()).collect::<Vec<_>>();
        let mut msgs = vec![
            stored(1, "ann", "op1"),
            stored(2, "ben", "b1"),
            stored(3, "ann", "op2"),
            stored(4, "cat", "c1"),
            stored(5, "ann", "op3"),
            stored(6, "ann", "a1"),
        ];
        let events = [
            (
                0,
                GroupEvent::Created {
                    name: "Team".into(),
                    members: names(&["ben"]),
                },
            ),
            (
                2,
                GroupEvent::Added {
                    members: names(&["cat"]),
                },
            ),
            (
                4,
                GroupEvent::Removed {
                    members: names(&["ben"]),
                },
            ),
        ];
        for (i, e) in &events {
            msgs[*i].body = String::new();
            msgs[*i].event = event(e.clone());
        }
        for m in &mut msgs {
            m.conv = GROUP.into();
        }
        let to_frame = |m: &StoredMessage| Message {
            event: m.event.as_deref().map(|t| serde_json::from_str(t).unwrap()),
            ..frame(m)
        };
        let op = |id: &str, op: GroupOp, name: Option<&str>, members: &[&str]| GroupCmd {
            conv: GROUP.into(),
            id: id.into(),
            op,
            name: name.map(str::to_owned),
            members: names(members),
        };
        let windows = [("ann", 1, 6), ("ben", 1, 5), ("cat", 3, 6)];
        let mut devices = Vec::new();
        for (user, from, to) in windows {
            let mut d = DeviceState::new(DeviceSpec {
                convs: vec![GROUP.into()],
                ..spec(user)
            });
            match user {
                "ann" => {
                    d.record_acked_op(op("op1", GroupOp::Create, Some("Team"), &["ben"]));
                    d.record_acked_op(op("op2", GroupOp::Add, None, &["cat"]));
                    d.record_acked_op(op("op3", GroupOp::Remove, None, &["ben"]));
                    d.record_acked_send(GROUP, "a1");
                }
                "ben" => d.record_acked_send(GROUP, "b1"),
                _ => d.record_acked_send(GROUP, "c1"),
            }
            for m in msgs.iter().filter(|m| (from..=to).contains(&m.seq)) {
                d.show(to_frame(m));
            }
            let view = d.convs.get_mut(GROUP).unwrap();
            view.delivered_sent = to;
            view.read_sent = to;
            if to == 6 {
                view.marks.insert("ann".into(), (6, 6));
                view.marks.insert("cat".into(), (6, 6));
            }
            devices.push(d);
        }
        let marks = [("ann", 6), ("ben", 5), ("cat", 6)]
            .iter()
            .map(|(u, n)| Marks {
                user: (*u).into(),
                delivered: *n,
                read: *n,
            })
            .collect();
        let member = |user: &str, joined, left, admin| Member {
            user: user.into(),
            joined,
            left,
            admin,
        };
        let summary = |latest, joined, left| ConvSummary {
            joined,
            left,
            name: "Team".into(),
            member_count: 2,
            ..chat_store::conformance::summary(GROUP, latest, latest)
        };
        let store = StoreDump {
            name: "seq-a".into(),
            messages: BTreeMap::from([(GROUP.to_owned(), msgs.clone())]),
            marks: BTreeMap::from([(GROUP.to_owned(), marks)]),
            members: BTreeMap::from([(
                GROUP.to_owned(),
                vec![
                    member("ann", 1, None, true),
                    member("ben", 1, Some(5), false),
                    member("cat", 3, None, false),
                ],
            )]),
            user_convs: BTreeMap::from([
                ("ann".to_owned(), vec![summary(6, 1, None)]),
                ("ben".to_owned(), vec![summary(5, 1, Some(5))]),
                ("cat".to_owned(), vec![summary(6, 3, None)]),
            ]),
            applied: 6,
        };
        let mut other = store.clone();
        other.name = "seq-b".into();
        let stream = msgs
            .iter()
            .map(|m| StreamEntry {
                stream_seq: m.stream_seq,
                subject: format!("chat.gmsg.0.{GROUP}"),
                stamper: Some("seq-a".into()),
                time_ms: m.ts_ms,
                event: Event::Message(to_frame(m)),
            })
            .collect();
        World {
            devices,
            stores: vec![store, other],
            stream,
            users: vec!["ann".into(), "ben".into(), "cat".into()],
            convs: vec![GROUP.into()],
        }
    }

    fn run(w: &World, forbidden: &[Forbidden]) -> Findings {
        check(&CheckInput {
            scenario: "unit",
            users: &w.users,
            convs: &w.convs,
            devices: &w.devices,
            stores: &w.stores,
            stream: &w.stream,
            forbidden_after: forbidden,
            pins: &BTreeMap::new(),
            takeover_ms: None,
        })
    }

    fn expect(w: &World, needle: &str) {
        let f = run(w, &[]);
        assert!(
            f.violations.iter().any(|v| v.contains(needle)),
            "expected a violation containing {needle:?}, got {:#?}",
            f.violations
        );
    }

    #[test]
    fn a_clean_world_passes_and_is_summarized() {
        let w = clean();
        let f = run(&w, &[]);
        assert!(f.violations.is_empty(), "{:#?}", f.violations);
        assert_eq!(
            f.summary.to_string(),
            "fault-summary scenario=unit sent=3 acked=3 stored=3 delivered=6 duplicates=0 \
             raw_duplicate_pushes=0 gaps=0 resent=0 group_events=0 offered_msg_s=0 rate_msg_s=0 \
             takeover_ms=- in_flight=- reads_back_ms=- repinned_stamps=0"
        );
        assert_eq!(STAMPER_HEADER, "Chat-Stamper");
    }

    #[test]
    fn a_hole_in_the_store_is_a_gap() {
        let mut w = clean();
        for s in &mut w.stores {
            s.messages.get_mut(CONV).unwrap().remove(1);
        }
        expect(&w, "not dense");
        assert!(run(&w, &[]).summary.gaps >= 1);
    }

    #[test]
    fn stores_that_disagree_are_reported() {
        let mut w = clean();
        w.stores[1].messages.get_mut(CONV).unwrap().pop();
        expect(&w, "stores disagree");
    }

    #[test]
    fn an_acked_message_missing_from_the_store_is_lost() {
        let mut w = clean();
        w.devices[0].record_acked_send(CONV, "a3");
        expect(&w, "acknowledged but not stored");
    }

    #[test]
    fn a_message_stored_twice_or_never_sent_is_reported() {
        let mut w = clean();
        for s in &mut w.stores {
            let msgs = s.messages.get_mut(CONV).unwrap();
            msgs.push(stored(4, "ann", "a1"));
            msgs.push(stored(5, "ben", "never-sent"));
        }
        expect(&w, "stored more than once");
        expect(&w, "stored but never sent");
    }

    #[test]
    fn a_sender_order_inversion_is_reported() {
        let mut w = clean();
        w.devices[0].sends.reverse();
        expect(&w, "out of the order they were sent");
    }

    #[test]
    fn a_device_missing_a_message_is_a_gap() {
        let mut w = clean();
        w.devices[1].convs.get_mut(CONV).unwrap().shown.remove(&2);
        expect(&w, "never got");
        assert_eq!(run(&w, &[]).summary.gaps, 1);
    }

    #[test]
    fn receipts_that_did_not_converge_are_reported() {
        let mut w = clean();
        w.devices[1]
            .convs
            .get_mut(CONV)
            .unwrap()
            .marks
            .insert("ann".into(), (3, 2));
        expect(&w, "sees ann");
        let mut w = clean();
        for d in &mut w.devices {
            if d.spec.user == "ben" {
                d.convs.get_mut(CONV).unwrap().read_sent = 2;
            }
        }
        for s in &mut w.stores {
            s.marks.get_mut(CONV).unwrap()[1].read = 3;
        }
        expect(&w, "ben's stored (delivered, read)");
    }

    #[test]
    fn a_stamp_after_the_forbidden_moment_is_reported() {
        let forbid = |instance: &str, after_ms, pins: Option<Vec<u64>>| Forbidden {
            instance: instance.into(),
            after_ms,
            pins: pins.map(|p| BTreeMap::from([(0, p)])),
        };
        let stale = |f: &Findings| {
            f.violations
                .iter()
                .any(|v| v.contains("seq-a stamped after it was superseded"))
        };
        let mut w = clean();
        // seq-a stamps #3 at 1003, after the moment 1002: on its old pin.
        let f = run(&w, &[forbid("seq-a", 1002, None)]);
        assert!(stale(&f), "{:#?}", f.violations);
        let f = run(&w, &[forbid("seq-a", 1002, Some(vec![900]))]);
        assert!(stale(&f), "{:#?}", f.violations);
        assert!(run(&w, &[forbid("seq-b", 0, None)]).violations.is_empty());
        // The partition was pinned again at 1003 and nobody else stamped there since: seq-a
        // won it anew.
        let f = run(&w, &[forbid("seq-a", 1002, Some(vec![1003]))]);
        assert!(f.violations.is_empty(), "{:#?}", f.violations);
        assert_eq!(f.summary.repinned_stamps, 1);
        // Pinned again at 1002, but seq-b stamped there at 1002 before seq-a's 1003.
        w.stream[1].stamper = Some("seq-b".into());
        let f = run(&w, &[forbid("seq-a", 1001, Some(vec![1002]))]);
        assert!(stale(&f), "{:#?}", f.violations);
    }

    #[test]
    fn a_group_where_everyone_has_exactly_their_window_passes() {
        let w = group_world();
        let f = run(&w, &[]);
        assert!(f.violations.is_empty(), "{:#?}", f.violations);
        assert_eq!(f.summary.group_events, 3);
    }

    #[test]
    fn a_group_message_outside_the_window_is_reported() {
        // cat, added at #3, shows #2.
        let mut w = group_world();
        let m = w.devices[0].convs[GROUP].shown[&2].clone();
        w.devices[2].show(m);
        expect(&w, "outside its membership window");
        // ben, removed at #5, never got #6: that is right; missing #4 is a gap.
        let mut w = group_world();
        w.devices[1].convs.get_mut(GROUP).unwrap().shown.remove(&4);
        expect(&w, "ben/phone never got g~team 4");
    }

    #[test]
    fn stored_members_that_do_not_match_the_events_are_reported() {
        let mut w = group_world();
        for s in &mut w.stores {
            s.members.get_mut(GROUP).unwrap()[1].left = None;
        }
        expect(&w, "the stored members of g~team");
    }

    #[test]
    fn an_event_that_is_not_the_operation_made_is_reported() {
        let mut w = group_world();
        let op = w.devices[0].sends[1].op.as_mut().unwrap();
        op.members = vec!["dan".into()];
        expect(&w, "but the operation made was");
    }

    #[test]
    fn a_message_stamped_after_its_sender_was_removed_is_reported() {
        let mut w = group_world();
        for s in &mut w.stores {
            let msgs = s.messages.get_mut(GROUP).unwrap();
            msgs[5].from = "ben".into();
            msgs[5].client_id = "b1".into();
        }
        expect(&w, "outside the sender's membership window");
    }
}
