//! Media messages end to end: the media service, gateway, sequencer and fan-out worker
//! in-process against a real nats-server and a real SeaweedFS (both from the test kit); the
//! bytes go over HTTP to the object store, the message over the gateway's WebSocket.

use std::time::Duration;

use chat_protocol::{
    auth::mint_dev_token,
    frames::{ClientFrame, ErrorCode, GroupOp, MediaRef, Message, ServerFrame},
    ids::UserId,
    jetstream::{Overrides, provision_all},
};
use chat_testkit::{NatsServer, SeaweedFs};
use futures::{SinkExt, StreamExt};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, tungstenite};
use tokio_util::sync::CancellationToken;

const SECRET: &str = "e2e-media-secret";
const WAIT: Duration = Duration::from_secs(30);
const CONV: &str = "dm~alice~bob";

struct App {
    ws_url: String,
    media_url: String,
    http: reqwest::Client,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
    _nats: NatsServer,
    _weed: SeaweedFs,
    _dir: tempfile::TempDir,
}

async fn spawn_app() -> App {
    let weed = tokio::task::spawn_blocking(SeaweedFs::start).await.unwrap();
    let nats = NatsServer::start();
    provision_all(&nats.client().await, &Overrides::default())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let stop = CancellationToken::new();
    let sequencer = chat_sequencer::Config {
        nats_url: nats.url(),
        admin_listen: String::new(),
        store_dir: dir.path().join("store"),
        ..Default::default()
    };
    let fanout = chat_fanout::Config {
        nats_url: nats.url(),
        admin_listen: String::new(),
        ..Default::default()
    };
    let mut gateway = chat_gateway::Config {
        nats_url: nats.url(),
        ..Default::default()
    };
    gateway.auth.hs256_secret = Some(SECRET.into());
    let mut media = chat_media::Config {
        nats_url: nats.url(),
        ..Default::default()
    };
    media.auth.hs256_secret = Some(SECRET.into());
    media.s3.endpoint = weed.endpoint();
    media.s3.force_path_style = true;
    media.s3.bucket = weed.bucket().into();
    media.s3.access_key_id = Some(weed.access_key().into());
    media.s3.secret_access_key = Some(weed.secret_key().into());
    let ws = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ws_url = format!("ws://{}/ws", ws.local_addr().unwrap());
    let media_url = format!("http://{}", api.local_addr().unwrap());
    let admin_url = format!("http://{}/readyz", admin.local_addr().unwrap());
    let tasks = vec![
        tokio::spawn(chat_sequencer::run(sequencer, None, stop.clone())),
        tokio::spawn(chat_fanout::run(fanout, None, stop.clone())),
        tokio::spawn(chat_gateway::run(gateway, ws, None, stop.clone())),
        tokio::spawn(chat_media::run(media, api, Some(admin), stop.clone())),
    ];
    let http = reqwest::Client::builder().timeout(WAIT).build().unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while !http
        .get(&admin_url)
        .send()
        .await
        .is_ok_and(|r| r.status() == StatusCode::OK)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "media service not ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    App {
        ws_url,
        media_url,
        http,
        stop,
        tasks,
        _nats: nats,
        _weed: weed,
        _dir: dir,
    }
}

fn token(user: &str) -> String {
    mint_dev_token(SECRET.as_bytes(), &UserId::parse(user).unwrap(), 3600)
}

fn sha256(b: &[u8]) -> Vec<u8> {
    Sha256::digest(b).to_vec()
}

impl App {
    async fn connect(&self, user: &str) -> Device {
        let url = format!("{}?token={}&device=d1", self.ws_url, token(user));
        let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
            .await
            .expect("connect in time")
            .expect("upgrade accepted");
        let mut device = Device { ws };
        assert!(matches!(device.next().await, ServerFrame::Hello { .. }));
        device
    }

    /// Requests an upload for `conv` and PUTs `data` to the presigned URL: the media id.
    async fn upload(&self, user: &str, conv: &str, content_type: &str, data: &[u8]) -> String {
        let res = self
            .http
            .post(format!("{}/v1/uploads", self.media_url))
            .bearer_auth(token(user))
            .json(&json!({"conv": conv, "content_type": content_type, "size": data.len()}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::CREATED);
        let ticket: Value = res.json().await.unwrap();
        let upload = &ticket["upload"];
        let mut put = self.http.put(upload["url"].as_str().unwrap());
        for (name, value) in upload["headers"].as_object().unwrap() {
            if name != "content-length" {
                put = put.header(name, value.as_str().unwrap());
            }
        }
        let res = put.body(data.to_vec()).send().await.unwrap();
        assert_eq!(
            res.status(),
            StatusCode::OK,
            "{}",
            res.text().await.unwrap()
        );
        ticket["media_id"].as_str().unwrap().to_owned()
    }

    /// Asks for a download URL as `user`: its status, and the bytes when allowed.
    async fn download(&self, user: &str, media_id: &str) -> (StatusCode, Vec<u8>) {
        let res = self
            .http
            .get(format!("{}/v1/media/{media_id}", self.media_url))
            .bearer_auth(token(user))
            .send()
            .await
            .unwrap();
        let status = res.status();
        let ticket: Value = res.json().await.unwrap();
        if status != StatusCode::OK {
            return (status, Vec::new());
        }
        let res = self
            .http
            .get(ticket["download"]["url"].as_str().unwrap())
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        (status, res.bytes().await.unwrap().to_vec())
    }

    async fn shutdown(self) {
        self.stop.cancel();
        for task in self.tasks {
            tokio::time::timeout(WAIT, task)
                .await
                .expect("service stops in time")
                .unwrap()
                .unwrap();
        }
    }
}

struct Device {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl Device {
    async fn send_frame(&mut self, frame: &ClientFrame) {
        let text = serde_json::to_string(frame).unwrap();
        self.ws
            .send(tungstenite::Message::text(text))
            .await
            .unwrap();
    }

    async fn send(&mut self, conv: &str, id: &str, body: &str, media: Option<MediaRef>) {
        self.send_frame(&ClientFrame::Send {
            conv: conv.into(),
            id: id.into(),
            body: body.into(),
            media,
        })
        .await;
    }

    async fn next(&mut self) -> ServerFrame {
        loop {
            let msg = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("a frame in time")
                .expect("socket open")
                .expect("frame readable");
            if let tungstenite::Message::Text(t) = msg {
                return serde_json::from_str(&t).unwrap();
            }
        }
    }

    async fn next_message(&mut self) -> Message {
        match self.next().await {
            ServerFrame::Message(m) => m,
            other => panic!("expected a message, got {other:?}"),
        }
    }

    /// Waits for `sent` of `id` and the stamped message echoed back (in either order).
    async fn sent_and_echo(&mut self, id: &str) -> Message {
        let (mut sent, mut echo) = (false, None);
        while !sent || echo.is_none() {
            match self.next().await {
                ServerFrame::Sent { id: s, .. } if s == id => sent = true,
                ServerFrame::Message(m) if m.id == id => echo = Some(m),
                other => panic!("expected sent or message of {id}, got {other:?}"),
            }
        }
        echo.unwrap()
    }
}

fn photo_ref(id: &str, size: usize) -> MediaRef {
    MediaRef {
        id: id.into(),
        content_type: "image/jpeg".into(),
        size: size as u64,
        width: Some(1280),
        height: Some(960),
        duration_ms: None,
        thumbnail: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_photo_goes_from_alice_to_bob_through_the_gateway() {
    let app = spawn_app().await;
    let mut alice = app.connect("alice").await;
    let mut bob = app.connect("bob").await;

    let photo: Vec<u8> = (0..200_000u32)
        .map(|i| (i.wrapping_mul(7919) >> 3) as u8)
        .collect();
    let thumb: Vec<u8> = photo[..2000].to_vec();
    let media_id = app.upload("alice", CONV, "image/jpeg", &photo).await;
    let thumb_id = app.upload("alice", CONV, "image/jpeg", &thumb).await;
    let mut media = photo_ref(&media_id, photo.len());
    media.thumbnail = Some(thumb_id.clone());
    alice.send(CONV, "p1", "look", Some(media.clone())).await;
    let echo = alice.sent_and_echo("p1").await;
    assert_eq!(echo.media.as_deref(), Some(&media));

    let got = bob.next_message().await;
    assert_eq!(got, echo);
    let received = got.media.unwrap();
    let (status, bytes) = app.download("bob", &received.id).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(bytes.len() as u64, received.size);
    assert_eq!(sha256(&bytes), sha256(&photo));
    let (_, thumb_bytes) = app
        .download("bob", received.thumbnail.as_deref().unwrap())
        .await;
    assert_eq!(sha256(&thumb_bytes), sha256(&thumb));
    // A third user is no member of the conversation and gets no URL.
    assert_eq!(
        app.download("carol", &media_id).await.0,
        StatusCode::FORBIDDEN
    );

    // The store kept the reference: history carries it.
    bob.send_frame(&ClientFrame::History {
        req: "h".into(),
        conv: CONV.into(),
        before: None,
        after: None,
        limit: None,
    })
    .await;
    match bob.next().await {
        ServerFrame::History { messages, .. } => {
            assert_eq!(messages.len(), 1);
            assert_eq!(messages[0].media.as_deref(), Some(&media));
        }
        other => panic!("expected history, got {other:?}"),
    }

    // A retry of the same send is answered `sent` again and stamps nothing new.
    alice.send(CONV, "p1", "look", Some(media.clone())).await;
    assert!(matches!(alice.next().await, ServerFrame::Sent { id, .. } if id == "p1"));

    // References to missing or mismatched uploads are refused with the send's id and conv,
    // and nothing is published: the next message bob gets is the plain one that follows.
    let missing = photo_ref(&"0".repeat(32), 10);
    let mismatched = photo_ref(&media_id, photo.len() + 1);
    let mut swapped_type = photo_ref(&media_id, photo.len());
    swapped_type.content_type = "image/png".into();
    let other_conv = app
        .upload("alice", "dm~alice~carol", "image/jpeg", &thumb)
        .await;
    let cases = [
        ("x1", missing, ErrorCode::MediaNotFound),
        ("x2", mismatched, ErrorCode::MediaMismatch),
        ("x3", swapped_type, ErrorCode::MediaMismatch),
        (
            "x4",
            photo_ref(&other_conv, thumb.len()),
            ErrorCode::MediaNotFound,
        ),
    ];
    for (id, media, code) in cases {
        alice.send(CONV, id, "", Some(media)).await;
        match alice.next().await {
            ServerFrame::Error(e) => {
                assert_eq!(e.code, code, "{e:?}");
                assert_eq!(e.id.as_deref(), Some(id));
                assert_eq!(e.conv.as_deref(), Some(CONV));
            }
            other => panic!("expected an error for {id}, got {other:?}"),
        }
    }
    // Bob cannot pass off alice's upload as his own either.
    bob.send(CONV, "b1", "", Some(photo_ref(&media_id, photo.len())))
        .await;
    match bob.next().await {
        ServerFrame::Error(e) => assert_eq!(e.code, ErrorCode::MediaNotFound),
        other => panic!("expected an error, got {other:?}"),
    }
    alice.send(CONV, "t1", "plain", None).await;
    let plain = alice.sent_and_echo("t1").await;
    assert_eq!(plain.seq, 2, "the refused sends were never stamped");
    assert_eq!(bob.next_message().await, plain);
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_media_is_for_the_group_members() {
    let app = spawn_app().await;
    let mut alice = app.connect("alice").await;
    let mut carol = app.connect("carol").await;
    let group = "g~trip";
    alice
        .send_frame(&ClientFrame::Group {
            op: GroupOp::Create,
            conv: group.into(),
            id: "create".into(),
            name: Some("Trip".into()),
            members: vec!["carol".into()],
        })
        .await;
    alice.sent_and_echo("create").await;
    assert!(carol.next_message().await.event.is_some());

    let clip: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
    // A non-member cannot even upload for the group.
    let res = app
        .http
        .post(format!("{}/v1/uploads", app.media_url))
        .bearer_auth(token("bob"))
        .json(&json!({"conv": group, "content_type": "video/mp4", "size": clip.len()}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    let id = app.upload("alice", group, "video/mp4", &clip).await;
    let media = MediaRef {
        id: id.clone(),
        content_type: "video/mp4".into(),
        size: clip.len() as u64,
        width: None,
        height: None,
        duration_ms: Some(1500),
        thumbnail: None,
    };
    alice.send(group, "v1", "", Some(media.clone())).await;
    alice.sent_and_echo("v1").await;
    let got = carol.next_message().await;
    assert_eq!(got.media.as_deref(), Some(&media));
    let (status, bytes) = app.download("carol", &id).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(sha256(&bytes), sha256(&clip));
    assert_eq!(app.download("bob", &id).await.0, StatusCode::FORBIDDEN);
    app.shutdown().await;
}
