//! The gateway: the WebSocket edge of the chat backend.
//!
//! Clients connect to `GET /ws` with a JWT (`?token=` or `Authorization: Bearer`), verified at
//! upgrade. The gateway is stateless: any gateway serves any user, and a user's devices may be
//! spread over several gateways.
//!
//! **Produces**
//! - `chat.in.<conv>` (JetStream, stream `CHAT_IN`), an [`Inbound`] per client frame:
//!   - `send`: [`Inbound::Send`], with `Nats-Msg-Id` = [`dedupe_id`] so a retry with the same
//!     client id is stored once. The client gets `sent` only after JetStream acked the publish
//!     (persist before ack).
//!   - `delivered`, `read`: [`Inbound::Receipt`], without `Nats-Msg-Id` (watermarks only grow,
//!     so duplicates are harmless). Success is not answered; a failed publish is `unavailable`.
//!   - `group`: [`Inbound::Group`], published exactly like a send (rate limit, `Nats-Msg-Id`,
//!     `sent`); the sequencer checks membership and admin rights.
//! - `chat.api.history`, `chat.api.sync`, `chat.api.receipts`, `chat.api.conversations`,
//!   `chat.api.group_info` (core NATS requests): [`HistoryRequest`], [`SyncRequest`],
//!   [`ReceiptsRequest`], [`ConversationsRequest`], [`GroupInfoRequest`] on behalf of the user,
//!   answered by the sequencer. At connect, before `hello`, the user's groups
//!   (`groups_only`).
//! - Delivery confirmations (see below): a plain empty reply, or several to the same fan-out
//!   worker within 2 ms as one batch to `<reply prefix>.c`.
//! - `$KV.CHAT_LIMITS.<budget>.<user>` (JetStream key-value, bucket `CHAT_LIMITS`): the user's
//!   abuse budgets, read and written with compare-and-set by every gateway, for group `create`
//!   and `add` frames and the first message of a one-to-one conversation (`limits.rs`).
//! - `chat.presence.report.<gateway>` (core NATS): batched connects, disconnects, watches and
//!   the periodic full state, for the presence service; `chat.api.presence` and
//!   `chat.api.presence_settings` requests; `typing` frames on `chat.user.<user>` (one-to-one)
//!   or `chat.typing.<conv>` (groups). See `presence.rs`.
//!
//! **Consumes**
//! - `chat.user.<user>` (core NATS), one subscription per user connected here, on the
//!   gateway's one push connection (`push/`, routed by `router.rs`): complete server frames
//!   (`message`, `receipt`, or `error` from the sequencer), forwarded unchanged to each of the
//!   user's connections here. Fan-out workers publish messages with a reply subject: the
//!   gateway confirms once one of the user's connections here queued the frame (once per
//!   gateway, however many devices), and when no device of the user is connected anywhere
//!   the requester gets "no responders" and notifies the user's phone instead.
//! - `chat.grp.<conv>` (core NATS), one subscription per large group with a member connected
//!   here, on the push connection too: each event once, forwarded to the members' connections
//!   within their membership (see `groups.rs`).
//! - `chat.presence.push.<gateway>` (core NATS), one subscription per gateway: the presence
//!   changes of the users its connections watch, handed to those connections.
//!
//! Every id that becomes part of a subject is validated first (`chat_protocol::ids`); subjects
//! come from `chat_protocol::subjects`. Every queue is bounded: the per-connection outgoing queue
//! (a full queue closes the connection with 4001), the publishes in flight per connection (at
//! the limit the socket is not read), and the WebSocket buffers.
//!
//! [`Inbound`]: chat_protocol::api::Inbound
//! [`Inbound::Send`]: chat_protocol::api::Inbound::Send
//! [`Inbound::Receipt`]: chat_protocol::api::Inbound::Receipt
//! [`Inbound::Group`]: chat_protocol::api::Inbound::Group
//! [`ConversationsRequest`]: chat_protocol::api::ConversationsRequest
//! [`GroupInfoRequest`]: chat_protocol::api::GroupInfoRequest
//! [`dedupe_id`]: chat_protocol::api::dedupe_id
//! [`HistoryRequest`]: chat_protocol::api::HistoryRequest
//! [`SyncRequest`]: chat_protocol::api::SyncRequest
//! [`ReceiptsRequest`]: chat_protocol::api::ReceiptsRequest

mod admission;
mod backend;
pub mod config;
mod connection;
pub mod error;
mod groups;
mod limits;
mod media;
pub mod metrics;
mod order;
mod presence;
mod push;
mod router;

use std::{sync::Arc, time::Duration};

use anyhow::Context;
use axum::{
    Router as Routes,
    extract::{
        Query, State,
        rejection::QueryRejection,
        ws::{WebSocketUpgrade, rejection::WebSocketUpgradeRejection},
    },
    http::{HeaderMap, header::AUTHORIZATION},
    response::{IntoResponse, Response},
    routing::get,
};
use chat_common::admin::{self, Readiness};
use chat_protocol::{auth::TokenVerifier, ids::DeviceId};
use serde::Deserialize;
use tokio::time::Instant;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    admission::Admission,
    backend::NatsBackend,
    connection::{Session, Shared},
    push::{Interest, PushAuth, PushClient, PushTls},
    router::{AttachError, Router},
};
pub use crate::{
    config::{AuthConfig, Config, ConfigError, KeyConfig},
    error::UpgradeError,
    limits::AbuseConfig,
    presence::PresenceConfig,
};

/// Room for a frame's envelope around the largest NATS payload, in the write buffer limit.
const FRAME_ENVELOPE_BYTES: usize = 4096;
/// The latest token expiry the gateway schedules (30 years, as tokio's `Sleep::far_future`).
const FAR_FUTURE: Duration = Duration::from_secs(86_400 * 365 * 30);
/// NATS's default `max_payload`, used until the server said otherwise.
const DEFAULT_MAX_PAYLOAD: usize = 1024 * 1024;

/// Everything the WebSocket route needs; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<StateInner>,
}

struct StateInner {
    verifier: TokenVerifier,
    backend: NatsBackend,
    shared: Arc<Shared<NatsBackend>>,
    /// Handshakes in progress (`max_handshakes`).
    admission: Admission,
    push: PushClient,
    read_buffer_bytes: usize,
    write_buffer_bytes: usize,
    max_frame_bytes: usize,
    /// Failed authentications per client address (`abuse.auth_failures_per_minute`).
    auth_failures: limits::AuthFailures,
    /// Upgraded connections, so shutdown can wait for them.
    connections: TaskTracker,
}

impl AppState {
    /// Builds the state from a validated config, a NATS client and the push connection (not
    /// connected yet: [`run`] runs it).
    fn new(
        config: &Config,
        nats: async_nats::Client,
        push: PushClient,
    ) -> Result<Self, ConfigError> {
        let verifier = config.validate()?;
        // Per-user budgets in the shared bucket, so they hold across gateways.
        let limits_bucket = Some(async_nats::jetstream::new(nats.clone()));
        let backend = NatsBackend::new(
            nats,
            Config::ms(config.publish_timeout_ms),
            Config::ms(config.history_timeout_ms),
        );
        let confirmer = backend.clone();
        let router = Arc::new(Router::new(
            Arc::new(push.clone()),
            Arc::new(move |reply| confirmer.confirm(reply)),
            router::Limits {
                max_per_user: config.max_connections_per_user,
                max_connections: config.max_connections,
                outgoing_queue: config.outgoing_queue,
                live_timeout: Config::ms(config.publish_timeout_ms),
            },
        ));
        Ok(Self {
            inner: Arc::new(StateInner {
                verifier,
                shared: Arc::new(Shared::new(config, backend.clone(), router, limits_bucket)),
                backend,
                admission: Admission::new(
                    config.max_handshakes,
                    Duration::from_secs(config.overloaded_retry_after_s),
                ),
                push,
                read_buffer_bytes: config.read_buffer_bytes,
                write_buffer_bytes: config.write_buffer_bytes,
                max_frame_bytes: config.max_frame_bytes,
                auth_failures: limits::AuthFailures::new(&config.abuse),
                connections: TaskTracker::new(),
            }),
        })
    }

    /// Waits until every connection ended. Call after shutdown began.
    pub async fn connections_closed(&self) {
        self.inner.connections.close();
        self.inner.connections.wait().await;
    }

    /// Forgets rate limiter state of users idle long enough to be back at full burst, and
    /// gives back the room of maps that shrank.
    fn prune(&self) {
        let shared = &self.inner.shared;
        for limiter in [&shared.limiter, &shared.receipt_limiter] {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
        shared.presence.prune();
        shared.router.prune();
        shared.user_limits.prune();
        self.inner.auth_failures.prune();
    }
}

/// The gateway's HTTP routes: `GET /ws`.
pub fn app(state: AppState) -> Routes {
    Routes::new()
        .route("/ws", get(ws_handler))
        .with_state(state)
}

#[derive(Debug, Default, Deserialize)]
struct WsParams {
    token: Option<String>,
    device: Option<String>,
}

/// Refuses addresses that failed to authenticate too often, admits the handshake,
/// authenticates, checks the device id and the connection limits, makes the user's
/// subscription live, then upgrades. Every refusal is an HTTP error with a JSON code.
async fn ws_handler(
    State(state): State<AppState>,
    limits::Peer(peer): limits::Peer,
    query: Result<Query<WsParams>, QueryRejection>,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, UpgradeError> {
    let inner = &state.inner;
    let address = inner.auth_failures.client(peer, &headers);
    // Before the token is looked at: guessing costs the guesser, not our CPU.
    inner
        .auth_failures
        .check(address)
        .map_err(|retry_after_ms| UpgradeError::TooManyAuthFailures { retry_after_ms })?;
    // A storm of (re)connects is refused here, before it costs anything else. The permit is
    // held until the connection's `hello` is queued.
    let permit = inner.admission.try_admit()?;
    // An unreadable query string carries no usable token: it is refused as unauthorized.
    let params = query.map(|Query(p)| p).unwrap_or_default();
    let verified = params
        .token
        .as_deref()
        .or_else(|| bearer(&headers))
        .ok_or(UpgradeError::MissingToken)
        .and_then(|token| inner.verifier.verify(token).map_err(UpgradeError::from));
    let (user, claims) = verified.inspect_err(|err| {
        if err.is_auth_failure() {
            inner.auth_failures.failed(address);
        }
    })?;
    let device = match params.device.as_deref() {
        Some(d) => DeviceId::parse(d).map_err(UpgradeError::InvalidDevice)?,
        None => generated_device_id(),
    };
    let upgrade = match upgrade {
        Ok(upgrade) => upgrade,
        Err(rejection) => return Ok(rejection.into_response()),
    };
    // A token accepted within the leeway after its `exp` lives as long as that leeway.
    let remaining = claims
        .exp
        .saturating_add(inner.verifier.leeway_secs())
        .saturating_mul(1000)
        .saturating_sub(chat_protocol::now_ms());
    let session = Arc::new(Session {
        user,
        device,
        // Capped like tokio's own "far future", so any `exp` is a valid deadline.
        expires_at: Instant::now() + Duration::from_millis(remaining).min(FAR_FUTURE),
    });
    let shared = &inner.shared;
    let (attached, live) = shared.router.attach(session).map_err(|e| match e {
        AttachError::TooManyConnections => UpgradeError::TooManyConnections,
        AttachError::Full => inner.admission.overloaded(),
        AttachError::ShuttingDown => {
            UpgradeError::Unavailable(anyhow::anyhow!("the gateway is shutting down"))
        }
    })?;
    // The user's subject is live at the server before anything is promised to the client.
    match tokio::time::timeout(shared.settings.publish_timeout, live).await {
        Ok(Ok(())) => {}
        _ => {
            return Err(UpgradeError::Unavailable(anyhow::anyhow!(
                "subscribing to the user subject timed out (push connection up: {})",
                inner.push.is_connected()
            )));
        }
    }

    // Small socket buffers: tungstenite's defaults (128 KiB each) per connection add up fast.
    // The write buffer must hold one whole outgoing frame, at most a NATS payload plus envelope.
    let max_payload = match inner.backend.client().server_info().max_payload {
        0 => DEFAULT_MAX_PAYLOAD,
        n => n,
    };
    let shared = shared.clone();
    let connections = inner.connections.clone();
    let response = upgrade
        .read_buffer_size(inner.read_buffer_bytes)
        .write_buffer_size(inner.write_buffer_bytes)
        .max_write_buffer_size(inner.write_buffer_bytes + max_payload + FRAME_ENVELOPE_BYTES)
        .max_message_size(inner.max_frame_bytes)
        .max_frame_size(inner.max_frame_bytes)
        .on_failed_upgrade(|err| tracing::debug!(error = %err, "websocket upgrade failed"))
        .on_upgrade(move |socket| {
            connections.track_future(connection::serve(shared, attached, Some(permit), socket))
        });
    Ok(response)
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

/// A device id for clients that did not send one (valid by construction).
fn generated_device_id() -> DeviceId {
    DeviceId::parse(&format!("anon-{:016x}", rand::random::<u64>()))
        .expect("a hex id is a valid device id")
}

/// Runs the gateway until `shutdown`: WebSocket connections on `listener`, the admin endpoint
/// on `admin` (if any).
///
/// Shutdown order: stop accepting; every connection stops reading, answers its in-flight sends
/// and closes with 1001; then the NATS client is drained. Connections get `shutdown_grace_ms`;
/// an overrun is logged and shutdown goes on.
pub async fn run(
    config: Config,
    listener: tokio::net::TcpListener,
    admin: Option<tokio::net::TcpListener>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    config.validate().context("invalid gateway configuration")?;
    if admin.is_some() {
        // Install the recorder before describing, or the descriptions go nowhere.
        admin::metrics_handle();
        metrics::describe();
        presence::describe();
        push::describe();
        limits::describe();
    }
    let servers = PushClient::servers(&config.nats_url).context("push connection")?;
    let push_auth = PushAuth::load(&config.nats_auth).context("push connection")?;
    let push_tls = PushTls::load(&config.nats_tls, &servers).context("push connection")?;
    let nats = chat_common::connect_nats(
        &config.nats_url,
        "gateway",
        &config.nats_auth,
        &config.nats_tls,
    )
    .await?;
    // A listener failure stops this gateway's connections without cancelling the caller's token.
    let stop = shutdown.child_token();
    let push = PushClient::new();
    let state = AppState::new(&config, nats.clone(), push.clone())?;
    let ready = Readiness::default();

    let background = TaskTracker::new();
    if let Some(admin) = admin {
        let (ready, stop) = (ready.clone(), stop.clone());
        background.spawn(async move {
            if let Err(err) = admin::serve(admin, ready, stop).await {
                tracing::error!(error = %err, "admin endpoint failed");
            }
        });
    }
    let router = state.inner.shared.router.clone();
    let hub = state.inner.shared.presence.clone();
    // Stopped last (after the connections closed): `push_stop`, not `stop`.
    let push_stop = CancellationToken::new();
    let push_task = tokio::spawn(push.clone().run(
        servers,
        push_auth,
        push_tls,
        format!("gateway-push {}", hub.gateway()),
        router.clone(),
        push_stop.clone(),
    ));
    // Ready while both connections to NATS are up and not shutting down.
    background.spawn(admin::ready_while_connected(
        nats.clone(),
        ready.clone(),
        {
            let push = push.clone();
            move || push.is_connected()
        },
        stop.clone(),
    ));
    // Connections finish what is in flight and close with 1001 as soon as shutdown begins.
    background.spawn({
        let (router, stop) = (router.clone(), stop.clone());
        async move {
            stop.cancelled().await;
            router.shut_down();
        }
    });
    background.spawn(presence::run(hub.clone(), nats.clone(), stop.clone()));
    background.spawn({
        let (state, stop) = (state.clone(), stop.clone());
        async move {
            let mut every = tokio::time::interval(Duration::from_secs(60));
            while stop.run_until_cancelled(every.tick()).await.is_some() {
                state.prune();
            }
        }
    });
    background.close();

    tracing::info!(addr = %listener.local_addr()?, "gateway listening");
    // With the peer address of each connection, for the failed-authentication limit.
    let service = app(state.clone()).into_make_service_with_connect_info::<std::net::SocketAddr>();
    let served = axum::serve(listener, service)
        .with_graceful_shutdown(stop.clone().cancelled_owned())
        .await;
    stop.cancel();
    ready.set(false);
    tracing::info!("gateway stopping");

    let grace = Config::ms(config.shutdown_grace_ms);
    if tokio::time::timeout(grace, state.connections_closed())
        .await
        .is_err()
    {
        tracing::warn!(
            grace_ms = config.shutdown_grace_ms,
            "connections still open after the shutdown grace period"
        );
    }
    // The closed connections' last devices go offline now, not when their keys expire.
    chat_common::within_grace("report presence", grace, hub.flush()).await;
    match tokio::time::timeout(grace, nats.drain()).await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => tracing::warn!(error = %err, "nats drain failed"),
        Err(_) => tracing::warn!("nats drain did not finish in time"),
    }
    push_stop.cancel();
    let _ = push_task.await;
    if tokio::time::timeout(grace, background.wait())
        .await
        .is_err()
    {
        tracing::warn!("background tasks did not stop in time");
    }
    tracing::info!("gateway stopped");
    served.context("websocket listener failed")
}
