//! Abuse limits (settings `abuse.*`, documented in `gateway/README.md` and `docs/protocol.md`).
//!
//! **Per user, across every gateway**: groups created per hour, members added to groups per
//! minute (`create` and `add` frames), and new one-to-one conversations opened per minute. A
//! user's devices may be connected to several gateways, so these budgets live in the JetStream
//! key-value bucket `CHAT_LIMITS` (stream `KV_CHAT_LIMITS`, `nats/streams/`), one key per user
//! and budget, shared by all gateways. Each key holds a GCRA "theoretical arrival time" (ms
//! since the epoch): `n` per period means one unit every `period / n`, at most `n` at once.
//! Charging is a read and a compare-and-set write (2 round trips) and happens only for group
//! `create` and `add` frames and for the first message of a conversation, never for ordinary
//! sends. Keys vanish an hour after their last write (the bucket's `max_age`), when every
//! budget is full again anyway.
//!
//! A `send` to a one-to-one conversation is the opening of a new conversation when the
//! conversation has no message yet: the gateway asks `chat.api.history` (limit 1) on the user's
//! behalf. Conversations known to have messages (or already counted) are remembered by this
//! gateway for [`KNOWN_FOR`], so an ongoing conversation costs one such question per gateway
//! every ten minutes, not one per message.
//!
//! Over a budget, the frame is answered with `error` `rate_limited`, its `id` and `conv`, and
//! `retry_after_ms`; nothing is published, so a retry with the same `id` after that time is an
//! ordinary first attempt. The limited user's other traffic (sends to existing conversations,
//! receipts, reads) is not affected.
//!
//! When the bucket or the history responders cannot be reached, the frame is let through
//! (`gateway_abuse_check_failures_total`): abuse limits must not stop messaging.
//!
//! **Per IP, at this gateway**: failed authentications at the WebSocket upgrade (no token, an
//! invalid or expired one). Once an address used up `auth_failures_per_minute`, its upgrades are
//! refused with HTTP 429 `rate_limited` and `Retry-After` before the token is even looked at.
//! Kept in memory: an address is naturally served by one gateway per connection attempt, and a
//! per-gateway budget times the fleet is still a hard bound on guessing.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    str::FromStr,
    sync::Mutex,
    time::Duration,
};

use async_nats::jetstream::{
    self,
    kv::{self, Operation},
};
use axum::{
    extract::{ConnectInfo, FromRequestParts},
    http::{HeaderMap, HeaderName, header::InvalidHeaderName, request::Parts},
};
use chat_protocol::{
    api::{HistoryReply, HistoryRequest, Inbound, InboundGroup},
    frames::{ErrorCode, GroupOp},
    ids::{ConvId, UserId},
    subjects,
};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::backend::{Backend, BackendError};

/// Counter, label `limit` (`groups`, `group_members`, `new_conversations`, `auth_failures`):
/// frames and upgrades refused by an abuse limit.
pub const ABUSE_LIMITED: &str = "gateway_abuse_limited_total";
/// Counter, label `limit`: abuse checks that could not be made (bucket or history responders
/// unreachable); the frame was let through.
pub const ABUSE_CHECK_FAILURES: &str = "gateway_abuse_check_failures_total";

/// How long a one-to-one conversation known to have messages is remembered.
pub const KNOWN_FOR: Duration = Duration::from_secs(600);
/// Most conversations remembered (about 100 bytes each); beyond, new ones are asked about again.
const KNOWN_MAX: usize = 100_000;
/// Most addresses whose failed authentications are tracked (about 64 bytes each).
const TRACKED_ADDRESSES_MAX: usize = 100_000;
/// Bound on charging the shared budgets (the connection's reader waits for it): beyond, the
/// frame is let through.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);
/// Compare-and-set attempts on a budget key written concurrently by other gateways.
const CAS_ATTEMPTS: usize = 5;

const HOUR_MS: u64 = 3_600_000;
const MINUTE_MS: u64 = 60_000;

/// The `abuse` settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AbuseConfig {
    /// Groups a user may create per hour (all gateways).
    pub groups_per_hour: u32,
    /// Members a user may add per minute, counting the `members` of `create` and `add` frames
    /// (all gateways). Also the most one frame may name.
    pub group_members_per_minute: u32,
    /// One-to-one conversations without messages a user may open per minute (all gateways).
    pub new_conversations_per_minute: u32,
    /// Failed authentications per client address per minute at this gateway.
    pub auth_failures_per_minute: u32,
    /// The header naming the client's address when a proxy is in front (e.g.
    /// `x-forwarded-for`; its rightmost entry is used). Unset: the TCP peer address.
    pub client_ip_header: Option<String>,
}

impl Default for AbuseConfig {
    fn default() -> Self {
        Self {
            groups_per_hour: 20,
            group_members_per_minute: 1024,
            new_conversations_per_minute: 10,
            auth_failures_per_minute: 20,
            client_ip_header: None,
        }
    }
}

impl AbuseConfig {
    /// The settings that must be positive, by name (checked with the rest of the config).
    pub(crate) fn counts(&self) -> [(&'static str, u64); 4] {
        [
            ("abuse.groups_per_hour", self.groups_per_hour.into()),
            (
                "abuse.group_members_per_minute",
                self.group_members_per_minute.into(),
            ),
            (
                "abuse.new_conversations_per_minute",
                self.new_conversations_per_minute.into(),
            ),
            (
                "abuse.auth_failures_per_minute",
                self.auth_failures_per_minute.into(),
            ),
        ]
    }

    /// `client_ip_header` as a header name, if it is one.
    pub(crate) fn ip_header(&self) -> Result<Option<HeaderName>, InvalidHeaderName> {
        self.client_ip_header
            .as_deref()
            .map(HeaderName::from_str)
            .transpose()
    }
}

/// `count` units per `period_ms`, all `count` at once at most.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Quota {
    pub count: u32,
    pub period_ms: u64,
}

impl Quota {
    fn interval_ms(self) -> u64 {
        (self.period_ms / u64::from(self.count.max(1))).max(1)
    }

    /// GCRA: with the stored theoretical arrival time `tat` (none: a full budget), admits
    /// `cost` units at `now` (`Ok`: the new `tat`), or says how many ms until they fit
    /// (`Err`). `cost` must not exceed `count`.
    fn admit(self, tat: Option<u64>, now: u64, cost: u64) -> Result<u64, u64> {
        let step = self.interval_ms();
        let limit = step * u64::from(self.count);
        let next = tat.unwrap_or(now).max(now) + cost * step;
        match next - now {
            ahead if ahead <= limit => Ok(next),
            ahead => Err(ahead - limit),
        }
    }

    /// The new `tat` after charging `cost` whatever the budget says (a charge that raced
    /// another one: the budget may go negative, later charges wait longer).
    fn force(self, tat: Option<u64>, now: u64, cost: u64) -> u64 {
        tat.unwrap_or(now).max(now) + cost * self.interval_ms()
    }
}

/// One budget of one user to charge.
struct Charge {
    key: String,
    cost: u64,
    quota: Quota,
    /// The budget's name in metrics.
    limit: &'static str,
    /// The refusal's message when this budget is used up.
    refused: String,
}

/// A budget that is used up: which charge, and when it fits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Limited {
    index: usize,
    wait_ms: u64,
}

/// Why a budget could not be read or written.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct BudgetError(String);

/// The `CHAT_LIMITS` bucket: opened on first use, again after a failure.
struct Bucket {
    js: jetstream::Context,
    store: tokio::sync::OnceCell<kv::Store>,
}

/// Where the per-user budgets live.
enum Budgets {
    /// The shared bucket (every gateway).
    Shared(Box<Bucket>),
    /// This process only: tests of the connection logic, which run without NATS.
    Local {
        since: Instant,
        tats: Mutex<HashMap<String, u64>>,
    },
}

impl Budgets {
    /// Charges every budget, or none when one of them is used up (`Ok(Err(_))`).
    async fn charge(&self, charges: &[Charge]) -> Result<Result<(), Limited>, BudgetError> {
        match self {
            Budgets::Local { since, tats } => {
                let now = since.elapsed().as_millis() as u64;
                let mut tats = tats.lock().expect("budgets lock");
                let mut next = Vec::with_capacity(charges.len());
                for (index, c) in charges.iter().enumerate() {
                    match c.quota.admit(tats.get(&c.key).copied(), now, c.cost) {
                        Ok(tat) => next.push(tat),
                        Err(wait_ms) => return Ok(Err(Limited { index, wait_ms })),
                    }
                }
                for (c, tat) in charges.iter().zip(next) {
                    tats.insert(c.key.clone(), tat);
                }
                Ok(Ok(()))
            }
            Budgets::Shared(bucket) => {
                let Bucket { js, store } = &**bucket;
                let charged = async {
                    let store = store
                        .get_or_try_init(|| js.get_key_value(subjects::LIMITS_BUCKET))
                        .await
                        .map_err(|e| BudgetError(format!("opening the limits bucket: {e}")))?;
                    charge_shared(store, charges).await
                };
                tokio::time::timeout(CHECK_TIMEOUT, charged)
                    .await
                    .unwrap_or_else(|_| {
                        Err(BudgetError(format!("no answer within {CHECK_TIMEOUT:?}")))
                    })
            }
        }
    }

    fn prune(&self) {
        if let Budgets::Local { since, tats } = self {
            let now = since.elapsed().as_millis() as u64;
            tats.lock()
                .expect("budgets lock")
                .retain(|_, tat| *tat > now);
        }
    }
}

/// The `tat` a bucket entry holds (a deleted or unreadable one: none).
fn tat_of(entry: &Option<kv::Entry>) -> Option<u64> {
    let entry = entry.as_ref().filter(|e| e.operation == Operation::Put)?;
    std::str::from_utf8(&entry.value).ok()?.parse().ok()
}

/// Reads every budget; if all admit their cost, writes each with compare-and-set. A write that
/// lost a race (another gateway charged the same budget meanwhile) reads again and charges on
/// top, so a user's concurrent frames on several gateways may overshoot a budget by one frame.
async fn charge_shared(
    store: &kv::Store,
    charges: &[Charge],
) -> Result<Result<(), Limited>, BudgetError> {
    let read = |key: &str| {
        let key = key.to_owned();
        async move {
            store
                .entry(key)
                .await
                .map_err(|e| BudgetError(format!("reading a budget: {e}")))
        }
    };
    let now = chat_protocol::now_ms();
    let mut entries = Vec::with_capacity(charges.len());
    for (index, c) in charges.iter().enumerate() {
        let entry = read(&c.key).await?;
        if let Err(wait_ms) = c.quota.admit(tat_of(&entry), now, c.cost) {
            return Ok(Err(Limited { index, wait_ms }));
        }
        entries.push(entry);
    }
    for (c, mut entry) in charges.iter().zip(entries) {
        for attempt in 1..=CAS_ATTEMPTS {
            let tat = c.quota.force(tat_of(&entry), now, c.cost);
            let value = tat.to_string().into();
            let written = match &entry {
                Some(e) => store
                    .update(&c.key, value, e.revision)
                    .await
                    .map(drop)
                    .map_err(|e| {
                        (
                            e.kind() == kv::UpdateErrorKind::WrongLastRevision,
                            e.to_string(),
                        )
                    }),
                None => store.create(&c.key, value).await.map(drop).map_err(|e| {
                    (
                        e.kind() == kv::CreateErrorKind::AlreadyExists,
                        e.to_string(),
                    )
                }),
            };
            match written {
                Ok(()) => break,
                Err((true, _)) if attempt < CAS_ATTEMPTS => entry = read(&c.key).await?,
                Err((_, e)) => return Err(BudgetError(format!("writing a budget: {e}"))),
            }
        }
    }
    Ok(Ok(()))
}

/// A frame refused by an abuse limit: the `error` it is answered with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub code: ErrorCode,
    pub message: String,
    pub retry_after_ms: Option<u64>,
}

/// The per-user budgets, shared by this gateway's connections.
pub(crate) struct UserLimits {
    groups: Quota,
    members: Quota,
    conversations: Quota,
    budgets: Budgets,
    /// One-to-one conversations known to have messages (or counted already), and since when.
    known: Mutex<HashMap<String, Instant>>,
}

impl UserLimits {
    /// Budgets in the shared bucket when `js` is given, else in this process.
    pub(crate) fn new(config: &AbuseConfig, js: Option<jetstream::Context>) -> Self {
        let budgets = match js {
            Some(js) => Budgets::Shared(Box::new(Bucket {
                js,
                store: tokio::sync::OnceCell::new(),
            })),
            None => Budgets::Local {
                since: Instant::now(),
                tats: Mutex::default(),
            },
        };
        Self {
            groups: Quota {
                count: config.groups_per_hour,
                period_ms: HOUR_MS,
            },
            members: Quota {
                count: config.group_members_per_minute,
                period_ms: MINUTE_MS,
            },
            conversations: Quota {
                count: config.new_conversations_per_minute,
                period_ms: MINUTE_MS,
            },
            budgets,
            known: Mutex::default(),
        }
    }

    /// Forgets what no longer matters: expired local budgets and old known conversations.
    pub(crate) fn prune(&self) {
        self.budgets.prune();
        let now = Instant::now();
        self.known
            .lock()
            .expect("known lock")
            .retain(|_, since| now.duration_since(*since) < KNOWN_FOR);
    }

    fn is_known(&self, conv: &ConvId) -> bool {
        self.known
            .lock()
            .expect("known lock")
            .get(conv.as_str())
            .is_some_and(|since| since.elapsed() < KNOWN_FOR)
    }

    fn remember(&self, conv: &ConvId) {
        let mut known = self.known.lock().expect("known lock");
        if known.len() < KNOWN_MAX || known.contains_key(conv.as_str()) {
            known.insert(conv.as_str().to_owned(), Instant::now());
        }
    }

    /// Charges every budget of `charges`, or refuses (charging none) when one is used up.
    async fn charge(&self, charges: Vec<Charge>) -> Result<(), Refusal> {
        match self.budgets.charge(&charges).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(Limited { index, wait_ms })) => {
                let Charge { limit, refused, .. } = charges
                    .into_iter()
                    .nth(index)
                    .expect("the index of a charge");
                ::metrics::counter!(ABUSE_LIMITED, "limit" => limit).increment(1);
                Err(Refusal {
                    code: ErrorCode::RateLimited,
                    message: refused,
                    retry_after_ms: Some(wait_ms.max(1)),
                })
            }
            Err(err) => {
                let limit = charges.first().map_or("", |c| c.limit);
                tracing::warn!(limit, error = %err, "abuse budget unavailable: letting the frame through");
                ::metrics::counter!(ABUSE_CHECK_FAILURES, "limit" => limit).increment(1);
                Ok(())
            }
        }
    }

    /// A group `create` (one group, its initial members) or `add` (its members).
    async fn group_op(&self, user: &UserId, group: &InboundGroup) -> Result<(), Refusal> {
        let members = group.members.len() as u64;
        if !matches!(group.op, GroupOp::Create | GroupOp::Add) {
            return Ok(());
        }
        if members > u64::from(self.members.count) {
            ::metrics::counter!(ABUSE_LIMITED, "limit" => "group_members").increment(1);
            return Err(Refusal {
                code: ErrorCode::InvalidFrame,
                message: format!(
                    "a group frame may name at most {} members (the server's member budget per minute); add the others later",
                    self.members.count
                ),
                retry_after_ms: None,
            });
        }
        let mut charges = Vec::with_capacity(2);
        if group.op == GroupOp::Create {
            charges.push(Charge {
                key: subjects::limits_key(BUDGET_GROUPS, user),
                cost: 1,
                quota: self.groups,
                limit: "groups",
                refused: format!(
                    "group creation limit reached: at most {} groups per hour; retry after retry_after_ms with the same id",
                    self.groups.count
                ),
            });
        }
        if members > 0 {
            charges.push(Charge {
                key: subjects::limits_key(BUDGET_MEMBERS, user),
                cost: members,
                quota: self.members,
                limit: "group_members",
                refused: format!(
                    "member limit reached: at most {} members added to groups per minute; retry after retry_after_ms with the same id",
                    self.members.count
                ),
            });
        }
        self.charge(charges).await
    }

    /// A send to a one-to-one conversation: the opening of a new conversation if it has no
    /// message yet (`history` answers whether it has).
    async fn first_message(
        &self,
        user: &UserId,
        conv: &ConvId,
        history: impl Future<Output = Result<HistoryReply, BackendError>>,
    ) -> Result<(), Refusal> {
        if self.is_known(conv) {
            return Ok(());
        }
        match history.await {
            Ok(HistoryReply::Page { messages, .. }) if !messages.is_empty() => {
                self.remember(conv);
                Ok(())
            }
            Ok(HistoryReply::Page { .. }) => {
                let charge = Charge {
                    key: subjects::limits_key(BUDGET_CONVERSATIONS, user),
                    cost: 1,
                    quota: self.conversations,
                    limit: "new_conversations",
                    refused: format!(
                        "new conversation limit reached: at most {} new one-to-one conversations per minute; retry after retry_after_ms with the same id",
                        self.conversations.count
                    ),
                };
                self.charge(vec![charge]).await?;
                // Counted once: the following messages of the conversation are not new.
                self.remember(conv);
                Ok(())
            }
            Ok(HistoryReply::Error(e)) => {
                tracing::debug!(conv = %conv, code = e.code.as_str(), "new conversation check refused: letting the send through");
                ::metrics::counter!(ABUSE_CHECK_FAILURES, "limit" => "new_conversations")
                    .increment(1);
                Ok(())
            }
            Err(err) => {
                tracing::warn!(conv = %conv, error = %err, "new conversation check failed: letting the send through");
                ::metrics::counter!(ABUSE_CHECK_FAILURES, "limit" => "new_conversations")
                    .increment(1);
                Ok(())
            }
        }
    }
}

/// Budget key prefixes in `CHAT_LIMITS` (`<prefix>.<user>`).
const BUDGET_GROUPS: &str = "g";
const BUDGET_MEMBERS: &str = "m";
const BUDGET_CONVERSATIONS: &str = "n";

/// Checks a send or group frame against the user's budgets before it is published. Ordinary
/// sends to conversations with messages and every other frame pass without a charge.
pub(crate) async fn admit<B: Backend>(
    backend: &B,
    limits: &UserLimits,
    user: &UserId,
    conv: &ConvId,
    inbound: &Inbound,
) -> Result<(), Refusal> {
    match inbound {
        Inbound::Group(group) => limits.group_op(user, group).await,
        Inbound::Send(_) if !conv.is_group() => {
            let request = HistoryRequest {
                user: user.to_string(),
                conv: conv.to_string(),
                before: None,
                after: None,
                limit: 1,
            };
            limits
                .first_message(user, conv, backend.request(&request))
                .await
        }
        _ => Ok(()),
    }
}

/// Whom failed authentications are counted against: an IPv4 address, or an IPv6 /64 (one
/// subscriber's network: a client picks any address in it at no cost).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Address(IpAddr);

impl Address {
    pub(crate) fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Self(IpAddr::V4(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Self(IpAddr::V4(v4)),
                None => {
                    let s = v6.segments();
                    Self(IpAddr::V6(Ipv6Addr::new(
                        s[0], s[1], s[2], s[3], 0, 0, 0, 0,
                    )))
                }
            },
        }
    }
}

/// The TCP peer of a request (none when served without connect info, as in router tests).
pub(crate) struct Peer(pub Option<SocketAddr>);

impl<S: Send + Sync> FromRequestParts<S> for Peer {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(Peer(
            parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|ConnectInfo(addr)| *addr),
        ))
    }
}

/// Failed authentications per client address, at this gateway.
pub(crate) struct AuthFailures {
    quota: Quota,
    header: Option<HeaderName>,
    since: Instant,
    tats: Mutex<HashMap<Address, u64>>,
}

impl AuthFailures {
    pub(crate) fn new(config: &AbuseConfig) -> Self {
        Self {
            quota: Quota {
                count: config.auth_failures_per_minute,
                period_ms: MINUTE_MS,
            },
            header: config.ip_header().ok().flatten(),
            since: Instant::now(),
            tats: Mutex::default(),
        }
    }

    fn now(&self) -> u64 {
        self.since.elapsed().as_millis() as u64
    }

    /// The client's address: the rightmost entry of the configured header, else the peer.
    pub(crate) fn client(&self, peer: Option<SocketAddr>, headers: &HeaderMap) -> Option<Address> {
        let forwarded = self.header.as_ref().and_then(|name| {
            let last = headers.get_all(name).iter().next_back()?;
            let entry = last.to_str().ok()?.rsplit(',').next()?.trim();
            entry
                .parse::<IpAddr>()
                .ok()
                .or_else(|| entry.parse::<SocketAddr>().ok().map(|s| s.ip()))
        });
        forwarded.or(peer.map(|p| p.ip())).map(Address::of)
    }

    /// `Err(wait_ms)` while `address` has used up its failures: refuse before verifying.
    pub(crate) fn check(&self, address: Option<Address>) -> Result<(), u64> {
        let Some(address) = address else {
            return Ok(());
        };
        let tat = self
            .tats
            .lock()
            .expect("auth failures lock")
            .get(&address)
            .copied();
        match self.quota.admit(tat, self.now(), 1) {
            Ok(_) => Ok(()),
            Err(wait) => {
                ::metrics::counter!(ABUSE_LIMITED, "limit" => "auth_failures").increment(1);
                Err(wait.max(1))
            }
        }
    }

    /// Counts a failed authentication of `address`.
    pub(crate) fn failed(&self, address: Option<Address>) {
        let Some(address) = address else { return };
        let now = self.now();
        let mut tats = self.tats.lock().expect("auth failures lock");
        if tats.len() >= TRACKED_ADDRESSES_MAX && !tats.contains_key(&address) {
            tats.retain(|_, tat| *tat > now);
            if tats.len() >= TRACKED_ADDRESSES_MAX {
                // A flood from very many addresses: each is still refused by its token.
                ::metrics::counter!(ABUSE_CHECK_FAILURES, "limit" => "auth_failures").increment(1);
                return;
            }
        }
        let tat = tats.get(&address).copied();
        tats.insert(address, self.quota.force(tat, now, 1));
    }

    /// Forgets addresses whose budget is full again.
    pub(crate) fn prune(&self) {
        let now = self.now();
        self.tats
            .lock()
            .expect("auth failures lock")
            .retain(|_, tat| *tat > now);
    }
}

/// Registers the descriptions of this module's metrics.
pub fn describe() {
    metrics::describe_counter!(
        ABUSE_LIMITED,
        "Frames and upgrades refused by an abuse limit, by limit"
    );
    metrics::describe_counter!(
        ABUSE_CHECK_FAILURES,
        "Abuse checks that could not be made (the frame was let through), by limit"
    );
}

#[cfg(test)]
mod tests {
    use chat_protocol::frames::Message;

    use super::*;

    const PER_MINUTE_10: Quota = Quota {
        count: 10,
        period_ms: MINUTE_MS,
    };

    #[test]
    fn gcra_admits_a_burst_then_one_per_interval() {
        let q = PER_MINUTE_10;
        let mut tat = None;
        for _ in 0..10 {
            tat = Some(q.admit(tat, 1000, 1).unwrap());
        }
        // The 11th waits one interval (6 s); at that time it fits, not before.
        assert_eq!(q.admit(tat, 1000, 1), Err(6000));
        assert_eq!(q.admit(tat, 6999, 1), Err(1));
        assert!(q.admit(tat, 7000, 1).is_ok());
        // Costs of several units, and a budget that refilled completely.
        assert_eq!(q.admit(None, 0, 10), Ok(60_000));
        assert_eq!(q.admit(Some(60_000), 0, 3), Err(18_000));
        assert_eq!(q.admit(Some(60_000), 120_000, 10), Ok(180_000));
        // A forced charge goes beyond the limit and makes the next one wait longer.
        let over = q.force(Some(60_000), 0, 1);
        assert_eq!(q.admit(Some(over), 0, 1), Err(12_000));
    }

    fn group(op: GroupOp, members: usize) -> InboundGroup {
        InboundGroup {
            conv: "g~t".into(),
            from: "alice".into(),
            device: "phone".into(),
            id: "g1".into(),
            op,
            name: None,
            members: (0..members).map(|i| format!("u{i}")).collect(),
        }
    }

    fn limits(config: AbuseConfig) -> UserLimits {
        UserLimits::new(&config, None)
    }

    #[tokio::test(start_paused = true)]
    async fn groups_and_members_have_budgets_per_user() {
        let l = limits(AbuseConfig {
            groups_per_hour: 2,
            group_members_per_minute: 5,
            ..AbuseConfig::default()
        });
        let (alice, bob) = (
            UserId::parse("alice").unwrap(),
            UserId::parse("bob").unwrap(),
        );
        assert!(l.group_op(&alice, &group(GroupOp::Create, 2)).await.is_ok());
        assert!(l.group_op(&alice, &group(GroupOp::Create, 0)).await.is_ok());
        let refused = l
            .group_op(&alice, &group(GroupOp::Create, 0))
            .await
            .unwrap_err();
        assert_eq!(refused.code, ErrorCode::RateLimited);
        // One group every 30 minutes.
        let wait = refused.retry_after_ms.unwrap();
        assert!((1_799_000..=1_800_000).contains(&wait), "{wait}");
        assert!(
            refused.message.contains("2 groups per hour"),
            "{}",
            refused.message
        );
        // Bob's budgets are his own; renames and leaves cost nothing.
        assert!(l.group_op(&bob, &group(GroupOp::Create, 5)).await.is_ok());
        assert!(l.group_op(&alice, &group(GroupOp::Rename, 0)).await.is_ok());
        // Alice has 3 members left this minute: adding 4 is refused, and charges nothing.
        let refused = l
            .group_op(&alice, &group(GroupOp::Add, 4))
            .await
            .unwrap_err();
        assert_eq!(refused.code, ErrorCode::RateLimited);
        assert!(refused.message.contains("5 members"), "{}", refused.message);
        assert!(l.group_op(&alice, &group(GroupOp::Add, 3)).await.is_ok());
        // More members than a whole minute's budget can never pass: a frame error.
        let too_many = l.group_op(&bob, &group(GroupOp::Add, 6)).await.unwrap_err();
        assert_eq!(
            (too_many.code, too_many.retry_after_ms),
            (ErrorCode::InvalidFrame, None)
        );
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(l.group_op(&alice, &group(GroupOp::Add, 5)).await.is_ok());
        // A refused create charges no member either.
        assert!(
            l.group_op(&alice, &group(GroupOp::Create, 1))
                .await
                .is_err()
        );
        tokio::time::advance(Duration::from_secs(12)).await;
        assert!(l.group_op(&alice, &group(GroupOp::Add, 1)).await.is_ok());
    }

    async fn unasked() -> Result<HistoryReply, BackendError> {
        panic!("a known conversation is not asked about")
    }

    fn page(n: u64) -> Result<HistoryReply, BackendError> {
        let messages = (1..=n)
            .map(|seq| Message {
                conv: "dm~alice~bob".into(),
                seq,
                from: "bob".into(),
                id: format!("m{seq}"),
                ts: 1,
                body: String::new(),
                event: None,
                media: None,
            })
            .collect();
        Ok(HistoryReply::Page {
            messages,
            more: false,
        })
    }

    #[tokio::test(start_paused = true)]
    async fn only_conversations_without_messages_count_and_each_once() {
        let l = limits(AbuseConfig {
            new_conversations_per_minute: 2,
            ..AbuseConfig::default()
        });
        let alice = UserId::parse("alice").unwrap();
        let dm = |peer: &str| ConvId::direct(&alice, &UserId::parse(peer).unwrap()).unwrap();
        // An existing conversation: never counted, and remembered.
        assert!(
            l.first_message(&alice, &dm("bob"), async { page(3) })
                .await
                .is_ok()
        );
        assert!(l.first_message(&alice, &dm("bob"), unasked()).await.is_ok());
        // Two new ones fit; their next messages are not new again.
        assert!(
            l.first_message(&alice, &dm("cat"), async { page(0) })
                .await
                .is_ok()
        );
        assert!(l.first_message(&alice, &dm("cat"), unasked()).await.is_ok());
        assert!(
            l.first_message(&alice, &dm("dan"), async { page(0) })
                .await
                .is_ok()
        );
        let refused = l
            .first_message(&alice, &dm("eve"), async { page(0) })
            .await
            .unwrap_err();
        assert_eq!(refused.code, ErrorCode::RateLimited);
        assert_eq!(refused.retry_after_ms, Some(30_000));
        // Still fine: an existing conversation, and a check that fails (let through).
        assert!(l.first_message(&alice, &dm("bob"), unasked()).await.is_ok());
        assert!(
            l.first_message(&alice, &dm("fay"), async {
                Err(BackendError::NoResponders)
            })
            .await
            .is_ok()
        );
        tokio::time::advance(Duration::from_secs(30)).await;
        assert!(
            l.first_message(&alice, &dm("eve"), async { page(0) })
                .await
                .is_ok()
        );
        // Remembered conversations are forgotten after a while and asked about again.
        tokio::time::advance(KNOWN_FOR).await;
        l.prune();
        assert!(l.known.lock().unwrap().is_empty());
        assert!(
            l.first_message(&alice, &dm("bob"), async { page(3) })
                .await
                .is_ok()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn failed_authentications_are_counted_per_address() {
        let failures = AuthFailures::new(&AbuseConfig {
            auth_failures_per_minute: 3,
            ..AbuseConfig::default()
        });
        let peer: SocketAddr = "192.0.2.7:5000".parse().unwrap();
        let here = failures.client(Some(peer), &HeaderMap::new());
        assert_eq!(here, Some(Address::of("192.0.2.7".parse().unwrap())));
        for _ in 0..3 {
            assert!(failures.check(here).is_ok());
            failures.failed(here);
        }
        assert_eq!(failures.check(here), Err(20_000));
        // Another address, and requests without one, are not affected.
        let other = failures.client(Some("192.0.2.8:1".parse().unwrap()), &HeaderMap::new());
        assert!(failures.check(other).is_ok());
        assert!(failures.check(None).is_ok());
        tokio::time::advance(Duration::from_secs(20)).await;
        assert!(failures.check(here).is_ok());
        tokio::time::advance(Duration::from_secs(60)).await;
        failures.prune();
        assert!(failures.tats.lock().unwrap().is_empty());
    }

    #[test]
    fn the_client_address_comes_from_the_configured_header() {
        let failures = AuthFailures::new(&AbuseConfig {
            client_ip_header: Some("X-Forwarded-For".into()),
            ..AbuseConfig::default()
        });
        let proxy: SocketAddr = "10.0.0.1:443".parse().unwrap();
        let mut headers = HeaderMap::new();
        assert_eq!(
            failures.client(Some(proxy), &headers),
            Some(Address::of("10.0.0.1".parse().unwrap())),
            "no header: the peer"
        );
        // The rightmost entry is the one the (trusted) proxy added.
        headers.insert("x-forwarded-for", "6.6.6.6, 198.51.100.4".parse().unwrap());
        assert_eq!(
            failures.client(Some(proxy), &headers),
            Some(Address::of("198.51.100.4".parse().unwrap()))
        );
        headers.insert("x-forwarded-for", "garbage".parse().unwrap());
        assert_eq!(
            failures.client(Some(proxy), &headers),
            Some(Address::of("10.0.0.1".parse().unwrap()))
        );
        // IPv6 counts per /64; IPv4-mapped addresses as IPv4.
        let a = Address::of("2001:db8:1:2:aaaa::1".parse().unwrap());
        let b = Address::of("2001:db8:1:2:bbbb::2".parse().unwrap());
        let c = Address::of("2001:db8:1:3::1".parse().unwrap());
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(
            Address::of("::ffff:192.0.2.1".parse().unwrap()),
            Address::of("192.0.2.1".parse().unwrap())
        );
        assert!(
            AbuseConfig {
                client_ip_header: Some("bad header".into()),
                ..AbuseConfig::default()
            }
            .ip_header()
            .is_err()
        );
    }
}
