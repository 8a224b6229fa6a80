//! The media service: images, videos and documents travel directly between clients and the
//! object store (AWS S3 or any S3-compatible store); this service issues presigned URLs, and a
//! message carries only a reference (`media` of a `send`).
//!
//! **HTTP API** (`listen`, JWTs as for the gateway, OpenAPI document at `/openapi.json`):
//! - `POST /v1/uploads`: an upload with one presigned PUT whose `Content-Length` and
//!   `Content-Type` are signed, so the store refuses other bytes.
//! - `POST /v1/uploads/multipart`, `POST /v1/uploads/{id}/parts`, `GET /v1/uploads/{id}`,
//!   `POST /v1/uploads/{id}/complete`, `DELETE /v1/uploads/{id}`: large files in parts,
//!   resumable (the status lists the parts the store has), or aborted.
//! - `GET /v1/media/{id}`: a short-lived presigned GET, for members of the conversation.
//!
//! Object keys are `media/<media id>`, the id being 128 random bits: no user input ever
//! becomes part of a key. Sizes and content types are limited by the config; each user has a
//! request rate (governor, per replica) and a storage quota (shared).
//!
//! **Consumes** `chat.api.media.verify` (core NATS request/reply, queue group `media`): a
//! gateway's check of a media message before it is accepted ([`MediaVerifyRequest`]). The
//! upload must exist in the store with the declared size and content type, made by the sender
//! for that conversation; the answer records the reference (the upload is kept for good).
//!
//! **Requests** `chat.api.group_info` (answered by the sequencer) to learn whether a user is a
//! member of a group; one-to-one membership follows from the conversation id.
//!
//! **State** lives in the JetStream key-value bucket `CHAT_MEDIA` ([`records`]), shared by all
//! replicas. Every replica runs the orphan cleanup: uploads no message referenced within
//! `orphan_ttl_ms` of being requested are deleted from the store and the bucket.
//!
//! [`MediaVerifyRequest`]: chat_protocol::api::MediaVerifyRequest

pub mod api;
pub mod config;
pub mod error;
pub mod http;
pub mod members;
pub mod metrics;
pub mod records;
pub mod s3;
pub mod service;

use std::{sync::Arc, time::Duration};

use anyhow::Context;
use chat_common::admin::{self, Readiness};
use chat_protocol::{api::MediaVerifyRequest, subjects};
use futures::StreamExt;
use tokio::sync::Semaphore;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

pub use crate::config::{Config, ConfigError};
use crate::{
    http::AppState, members::Membership, records::Records, s3::ObjectStore, service::Service,
};

/// Verifications handled at once by one replica; more wait in the subscription.
const MAX_CONCURRENT_VERIFICATIONS: usize = 256;
/// How often readiness (NATS connected, bucket reachable) is checked.
const READINESS_INTERVAL: Duration = Duration::from_secs(2);

/// Runs the media service until `shutdown`: the API on `listener`, the admin endpoint on
/// `admin` (if any), the verification responder and the orphan cleanup.
///
/// Shutdown order: stop accepting requests and let in-flight ones finish, stop the responder
/// (in-flight verifications answer) and the cleanup, then drain the NATS client; each step
/// within `shutdown_grace_ms`.
pub async fn run(
    config: Config,
    listener: tokio::net::TcpListener,
    admin: Option<tokio::net::TcpListener>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let verifier = config.validate().context("invalid media configuration")?;
    if admin.is_some() {
        admin::metrics_handle();
        metrics::describe();
    }
    let stop = shutdown.child_token();
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

    let nats = chat_common::connect_nats(
        &config.nats_url,
        "media",
        &config.nats_auth,
        &config.nats_tls,
    )
    .await?;
    let timeout = Config::ms(config.nats_timeout_ms);
    let js = async_nats::jetstream::new(nats.clone());
    // The bucket is provisioned with the streams (`chat admin provision`); wait for it.
    let records = loop {
        match Records::open(&nats, &js, timeout).await {
            Ok(records) => break records,
            Err(err) => {
                tracing::warn!(error = %err, bucket = subjects::MEDIA_BUCKET, "media bucket not available yet (is it provisioned?)");
                if stop
                    .run_until_cancelled(tokio::time::sleep(Duration::from_secs(1)))
                    .await
                    .is_none()
                {
                    return Ok(());
                }
            }
        }
    };
    let store = ObjectStore::new(&config.s3, Config::ms(config.s3_timeout_ms)).await;
    if let Err(err) = store.check().await {
        tracing::warn!(error = %err, bucket = %config.s3.bucket, "object store bucket not reachable yet");
    }
    let members = Membership::new(
        nats.clone(),
        timeout,
        Config::ms(config.membership_cache_ms),
    );
    let grace = Config::ms(config.shutdown_grace_ms);
    let cleanup_every = Config::ms(config.cleanup_interval_ms);
    let service = Arc::new(Service {
        config,
        records,
        store,
        members,
    });
    let state = AppState::new(service.clone(), verifier);

    let verifications = nats
        .queue_subscribe(subjects::MEDIA_VERIFY_API, subjects::MEDIA_QUEUE.into())
        .await
        .context("cannot subscribe to the verification subject")?;
    let responder = tokio::spawn(respond(
        nats.clone(),
        service.clone(),
        verifications,
        stop.clone(),
    ));
    background.spawn(cleanup(service.clone(), cleanup_every, stop.clone()));
    background.spawn(watch_readiness(
        nats.clone(),
        service.clone(),
        ready.clone(),
        stop.clone(),
    ));
    background.spawn({
        let (state, stop) = (state.clone(), stop.clone());
        async move {
            let mut every = tokio::time::interval(Duration::from_secs(60));
            while stop.run_until_cancelled(every.tick()).await.is_some() {
                state.prune_rate_limits();
            }
        }
    });
    background.close();

    let (router, _) = http::app(state);
    tracing::info!(addr = %listener.local_addr()?, "media service listening");
    let served = axum::serve(listener, router)
        .with_graceful_shutdown(stop.clone().cancelled_owned())
        .await;
    stop.cancel();
    ready.set(false);
    tracing::info!("media service stopping");
    chat_common::within_grace("verification responder", grace, async {
        let _ = responder.await;
    })
    .await;
    chat_common::within_grace("background tasks", grace, background.wait()).await;
    chat_common::within_grace("nats drain", grace, async {
        if let Err(err) = nats.drain().await {
            tracing::warn!(error = %err, "nats drain failed");
        }
    })
    .await;
    tracing::info!("media service stopped");
    served.context("api listener failed")
}

/// Answers `chat.api.media.verify` until `stop`, then lets in-flight answers finish.
async fn respond(
    nats: async_nats::Client,
    service: Arc<Service>,
    mut requests: async_nats::Subscriber,
    stop: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(MAX_CONCURRENT_VERIFICATIONS));
    let inflight = TaskTracker::new();
    while let Some(Some(msg)) = stop.run_until_cancelled(requests.next()).await {
        let Some(reply) = msg.reply.clone() else {
            continue;
        };
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let (nats, service) = (nats.clone(), service.clone());
        inflight.spawn(async move {
            let _permit = permit;
            let answer = match serde_json::from_slice::<MediaVerifyRequest>(&msg.payload) {
                Ok(req) => service.verify(&req).await,
                Err(e) => chat_protocol::api::MediaVerifyReply::Error(
                    chat_protocol::frames::ErrorFrame::new(
                        chat_protocol::frames::ErrorCode::InvalidFrame,
                        format!("malformed verification request: {e}"),
                    ),
                ),
            };
            let payload = serde_json::to_vec(&answer).expect("replies encode");
            if let Err(err) = nats.publish(reply, payload.into()).await {
                tracing::warn!(error = %err, "verification reply failed");
            }
        });
    }
    let _ = requests.unsubscribe().await;
    inflight.close();
    inflight.wait().await;
}

/// Runs the orphan cleanup every `every` until `stop`.
async fn cleanup(service: Arc<Service>, every: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while stop.run_until_cancelled(tick.tick()).await.is_some() {
        match stop.run_until_cancelled(service.sweep()).await {
            None => break,
            Some(Ok(0)) => {}
            Some(Ok(n)) => tracing::debug!(deleted = n, "orphan cleanup pass"),
            Some(Err(err)) => {
                ::metrics::counter!(metrics::CLEANUP_FAILURES).increment(1);
                tracing::warn!(error = %err, "orphan cleanup pass failed");
            }
        }
    }
}

/// Ready while NATS is connected and the object store bucket answers.
async fn watch_readiness(
    nats: async_nats::Client,
    service: Arc<Service>,
    ready: Readiness,
    stop: CancellationToken,
) {
    let mut every = tokio::time::interval(READINESS_INTERVAL);
    while stop.run_until_cancelled(every.tick()).await.is_some() {
        let connected = nats.connection_state() == async_nats::connection::State::Connected;
        let store = service.store.check().await;
        if let Err(err) = &store {
            tracing::warn!(error = %err, "object store not reachable");
        }
        ready.set(connected && store.is_ok());
    }
    ready.set(false);
}
