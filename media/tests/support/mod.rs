//! `spawn_app`: a media service in-process against a real nats-server and a real SeaweedFS,
//! both started by the test kit on random ports; plus an HTTP client that talks to it and to
//! the object store the way an app does.

#![allow(dead_code)]

use std::time::{Duration, Instant};

use chat_media::{Config, s3::ObjectStore};
use chat_protocol::{
    api::{MediaVerifyReply, MediaVerifyRequest},
    auth::mint_dev_token,
    frames::MediaRef,
    ids::UserId,
    jetstream::{Overrides, provision_all},
    subjects,
};
use chat_testkit::{NatsServer, SeaweedFs};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

pub const SECRET: &str = "media-test-secret";
pub const WAIT: Duration = Duration::from_secs(60);

pub struct App {
    pub url: String,
    pub http: reqwest::Client,
    pub nats: NatsServer,
    pub weed: SeaweedFs,
    pub client: async_nats::Client,
    pub config: Config,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

/// A media service with test-friendly limits; `tweak` changes the config before it starts.
pub async fn spawn_app(tweak: impl FnOnce(&mut Config)) -> App {
    let weed = tokio::task::spawn_blocking(SeaweedFs::start).await.unwrap();
    let nats = NatsServer::start();
    let client = nats.client().await;
    provision_all(&client, &Overrides::default()).await.unwrap();
    let mut config = Config {
        nats_url: nats.url(),
        nats_timeout_ms: 2000,
        ..Config::default()
    };
    config.auth.hs256_secret = Some(SECRET.into());
    config.s3.endpoint = weed.endpoint();
    config.s3.region = weed.region().into();
    config.s3.force_path_style = true;
    config.s3.bucket = weed.bucket().into();
    config.s3.access_key_id = Some(weed.access_key().into());
    config.s3.secret_access_key = Some(weed.secret_key().into());
    config.requests_per_second = 1000;
    config.request_burst = 1000;
    tweak(&mut config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let admin_url = format!("http://{}", admin.local_addr().unwrap());
    let stop = CancellationToken::new();
    let task = tokio::spawn(chat_media::run(
        config.clone(),
        listener,
        Some(admin),
        stop.clone(),
    ));
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    // Ready once NATS, the bucket and the object store answer.
    let deadline = Instant::now() + WAIT;
    loop {
        let ready = http.get(format!("{admin_url}/readyz")).send().await;
        if ready.is_ok_and(|r| r.status() == StatusCode::OK) {
            break;
        }
        assert!(
            !task.is_finished(),
            "the media service stopped during startup"
        );
        assert!(
            Instant::now() < deadline,
            "the media service was not ready in time"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    App {
        url,
        http,
        nats,
        weed,
        client,
        config,
        stop,
        task: Some(task),
    }
}

pub fn token(user: &str) -> String {
    mint_dev_token(SECRET.as_bytes(), &UserId::parse(user).unwrap(), 3600)
}

pub fn sha256(bytes: &[u8]) -> Vec<u8> {
    Sha256::digest(bytes).to_vec()
}

/// Deterministic bytes that differ from offset to offset.
pub fn bytes(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[i % 4] ^ seed)
        .collect()
}

impl App {
    /// One API request as `user` (no token for `None`): status and JSON body (`Null` if none).
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        user: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.url));
        if let Some(user) = user {
            req = req.bearer_auth(token(user));
        }
        if let Some(body) = body {
            req = req.json(&body);
        }
        let res = req.send().await.expect("the media service answers");
        let status = res.status();
        let text = res.text().await.unwrap();
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{status}: not JSON ({e}): {text}"))
        };
        (status, value)
    }

    /// `POST /v1/uploads`; panics unless 201.
    pub async fn ticket(&self, user: &str, conv: &str, content_type: &str, size: usize) -> Value {
        let (status, ticket) = self
            .call(
                Method::POST,
                "/v1/uploads",
                Some(user),
                Some(json!({"conv": conv, "content_type": content_type, "size": size})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{ticket}");
        ticket
    }

    /// Requests an upload and PUTs `data`; returns the media id.
    pub async fn upload(&self, user: &str, conv: &str, content_type: &str, data: &[u8]) -> String {
        let ticket = self.ticket(user, conv, content_type, data.len()).await;
        let (status, body) = self.put(&ticket["upload"], data.to_vec(), &[]).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        ticket["media_id"].as_str().unwrap().to_owned()
    }

    /// Makes a presigned request as an app would: its method, URL and signed headers
    /// (`overrides` replace or, with an empty value, drop some), with `body`.
    pub async fn put(
        &self,
        signed: &Value,
        body: Vec<u8>,
        overrides: &[(&str, &str)],
    ) -> (StatusCode, String) {
        let method = Method::from_bytes(signed["method"].as_str().unwrap().as_bytes()).unwrap();
        let mut req = self.http.request(method, signed["url"].as_str().unwrap());
        for (name, value) in signed["headers"].as_object().unwrap() {
            // The client library sets Content-Length from the body itself.
            if name == "content-length" || overrides.iter().any(|(n, _)| n == name) {
                continue;
            }
            req = req.header(name, value.as_str().unwrap());
        }
        for (name, value) in overrides {
            if !value.is_empty() {
                req = req.header(*name, *value);
            }
        }
        let res = req
            .body(body)
            .send()
            .await
            .expect("the object store answers");
        (res.status(), res.text().await.unwrap_or_default())
    }

    /// GETs a presigned download: status and bytes.
    pub async fn fetch(&self, signed: &Value) -> (StatusCode, Vec<u8>) {
        let res = self
            .http
            .get(signed["url"].as_str().unwrap())
            .send()
            .await
            .expect("the object store answers");
        (res.status(), res.bytes().await.unwrap().to_vec())
    }

    /// What a gateway asks before accepting a media message.
    pub async fn verify(
        &self,
        user: &str,
        conv: &str,
        msg_id: &str,
        media: MediaRef,
    ) -> MediaVerifyReply {
        let request = MediaVerifyRequest {
            conv: conv.into(),
            user: user.into(),
            id: msg_id.into(),
            media,
        };
        let reply = tokio::time::timeout(
            WAIT,
            self.client.request(
                subjects::MEDIA_VERIFY_API,
                serde_json::to_vec(&request).unwrap().into(),
            ),
        )
        .await
        .expect("a verification answer in time")
        .expect("the media service answers");
        serde_json::from_slice(&reply.payload).unwrap()
    }

    /// The object store as the service sees it.
    pub async fn store(&self) -> ObjectStore {
        ObjectStore::new(&self.config.s3, Duration::from_secs(10)).await
    }

    /// The raw KV record of a media id, if any.
    pub async fn record(&self, id: &str) -> Option<Value> {
        self.kv(&format!("m.{id}"))
            .await
            .map(|v| serde_json::from_slice(&v).unwrap())
    }

    /// The value of a key of the media bucket, if any.
    pub async fn kv(&self, key: &str) -> Option<bytes::Bytes> {
        let js = async_nats::jetstream::new(self.client.clone());
        let kv = js.get_key_value(subjects::MEDIA_BUCKET).await.unwrap();
        kv.get(key).await.unwrap()
    }

    pub async fn shutdown(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(WAIT, task)
                .await
                .expect("the media service stops in time")
                .unwrap()
                .unwrap();
        }
    }
}

pub fn media_ref(id: &str, content_type: &str, size: usize) -> MediaRef {
    MediaRef {
        id: id.into(),
        content_type: content_type.into(),
        size: size as u64,
        width: None,
        height: None,
        duration_ms: None,
        thumbnail: None,
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
