//! The media service against a real SeaweedFS and a real nats-server: uploads, downloads,
//! verification of media messages, multipart uploads, limits and the orphan cleanup.

mod support;

use std::time::{Duration, Instant};

use chat_protocol::{api::MediaVerifyReply, frames::ErrorCode};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use support::{WAIT, bytes, media_ref, sha256, spawn_app};
use tokio::io::AsyncWriteExt;

const CONV: &str = "dm~alice~bob";

fn code(v: &Value) -> &str {
    v["code"].as_str().unwrap_or_default()
}

fn refused(reply: &MediaVerifyReply) -> ErrorCode {
    match reply {
        MediaVerifyReply::Error(e) => e.code,
        MediaVerifyReply::Ok => panic!("expected a refusal"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_reference_and_download_identical_bytes() {
    let app = spawn_app(|_| {}).await;
    let photo = bytes(300_000, 7);
    let ticket = app.ticket("alice", CONV, "image/jpeg", photo.len()).await;
    let id = ticket["media_id"].as_str().unwrap().to_owned();
    // The signed request fixes size and type, and the key is the media id alone.
    let upload = &ticket["upload"];
    assert_eq!(upload["method"], "PUT");
    assert_eq!(upload["headers"]["content-type"], "image/jpeg");
    assert_eq!(upload["headers"]["content-length"], photo.len().to_string());
    let url = upload["url"].as_str().unwrap();
    assert!(url.contains(&format!("/media/{id}?")), "{url}");
    let signed = url.split("X-Amz-SignedHeaders=").nth(1).unwrap();
    assert!(
        signed.starts_with("content-length%3Bcontent-type%3Bhost%3Bif-none-match"),
        "{url}"
    );
    let (status, body) = app.put(upload, photo.clone(), &[]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // The URL creates the object once: other bytes of the same size cannot replace it.
    let (status, body) = app.put(upload, bytes(photo.len(), 8), &[]).await;
    assert_eq!(status, StatusCode::PRECONDITION_FAILED, "{body}");
    let (status, _) = app
        .put(upload, photo.clone(), &[("if-none-match", "")])
        .await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "the condition is signed: it cannot be left out"
    );

    // Before a message references it, only the uploader can fetch it.
    let (status, err) = app
        .call(Method::GET, &format!("/v1/media/{id}"), Some("bob"), None)
        .await;
    assert_eq!((status, code(&err)), (StatusCode::NOT_FOUND, "not_found"));
    let record = app.record(&id).await.unwrap();
    assert_eq!(record["state"], "pending");
    assert_eq!(
        (record["uploader"].as_str(), record["conv"].as_str()),
        (Some("alice"), Some(CONV))
    );

    let media = media_ref(&id, "image/jpeg", photo.len());
    assert_eq!(
        app.verify("alice", CONV, "msg-1", media.clone()).await,
        MediaVerifyReply::Ok
    );
    // Asking again for the same message succeeds again.
    assert_eq!(
        app.verify("alice", CONV, "msg-1", media).await,
        MediaVerifyReply::Ok
    );
    let record = app.record(&id).await.unwrap();
    assert_eq!(record["state"], "referenced");
    assert_eq!(record["referenced_by"]["id"], "msg-1");

    let (status, ticket) = app
        .call(Method::GET, &format!("/v1/media/{id}"), Some("bob"), None)
        .await;
    assert_eq!(status, StatusCode::OK, "{ticket}");
    assert_eq!(ticket["content_type"], "image/jpeg");
    assert_eq!(ticket["size"], photo.len());
    let (status, got) = app.fetch(&ticket["download"]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(sha256(&got), sha256(&photo));

    // A message may not reference an upload it no longer... a referenced upload stays.
    let (status, err) = app
        .call(
            Method::DELETE,
            &format!("/v1/uploads/{id}"),
            Some("alice"),
            None,
        )
        .await;
    assert_eq!((status, code(&err)), (StatusCode::CONFLICT, "wrong_state"));
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_uploads_and_bad_references_are_refused() {
    let app = spawn_app(|c| {
        c.max_single_upload_bytes = 1000;
        c.max_upload_bytes = 20 * 1024 * 1024;
        c.part_size_bytes = 5 * 1024 * 1024;
    })
    .await;
    let post = |body: Value| app.call(Method::POST, "/v1/uploads", Some("alice"), Some(body));

    // Too large, disallowed type, not a member, malformed: refused before any URL exists.
    let (status, err) =
        post(json!({"conv": CONV, "content_type": "image/png", "size": 1001})).await;
    assert_eq!(
        (status, code(&err)),
        (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
        "{err}"
    );
    let (status, err) = app
        .call(
            Method::POST,
            "/v1/uploads/multipart",
            Some("alice"),
            Some(json!({"conv": CONV, "content_type": "video/mp4", "size": 20 * 1024 * 1024 + 1})),
        )
        .await;
    assert_eq!(
        (status, code(&err)),
        (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
        "{err}"
    );
    let (status, err) = post(json!({"conv": CONV, "content_type": "text/html", "size": 10})).await;
    assert_eq!(
        (status, code(&err)),
        (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_type")
    );
    let (status, err) =
        post(json!({"conv": "dm~bob~carol", "content_type": "image/png", "size": 10})).await;
    assert_eq!((status, code(&err)), (StatusCode::FORBIDDEN, "not_member"));
    for body in [
        json!({"conv": "dm~alice~bob/../../x", "content_type": "image/png", "size": 10}),
        json!({"conv": CONV, "content_type": "image/png", "size": 0}),
        json!({"conv": CONV, "content_type": "image/png"}),
        json!({"conv": CONV, "content_type": "image/png", "size": 1, "key": "../etc"}),
    ] {
        let (status, err) = post(body.clone()).await;
        assert_eq!(
            (status, code(&err)),
            (StatusCode::BAD_REQUEST, "invalid_request"),
            "{body}"
        );
    }
    let (status, err) = app
        .call(
            Method::POST,
            "/v1/uploads",
            None,
            Some(json!({"conv": CONV, "content_type": "image/png", "size": 1})),
        )
        .await;
    assert_eq!(
        (status, code(&err)),
        (StatusCode::UNAUTHORIZED, "unauthorized")
    );

    // The upload URL works only for the declared size and type, with its signature intact.
    let data = bytes(500, 1);
    let ticket = app.ticket("alice", CONV, "image/png", data.len()).await;
    let upload = &ticket["upload"];
    let (status, _) = app.put(upload, bytes(501, 1), &[]).await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "a longer body is refused by the store"
    );
    let (status, _) = app.put(upload, bytes(499, 1), &[]).await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "a shorter body is refused by the store"
    );
    let (status, _) = app
        .put(upload, data.clone(), &[("content-type", "text/html")])
        .await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "another type is refused by the store"
    );
    let url = upload["url"].as_str().unwrap();
    let sig_at = url.find("X-Amz-Signature=").unwrap() + "X-Amz-Signature=".len();
    let mut tampered = url.to_owned();
    let flipped = if &url[sig_at..sig_at + 1] == "0" {
        "1"
    } else {
        "0"
    };
    tampered.replace_range(sig_at..sig_at + 1, flipped);
    let mut forged = upload.clone();
    forged["url"] = json!(tampered);
    let (status, body) = app.put(&forged, data.clone(), &[]).await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "a tampered signature is refused: {body}"
    );
    assert!(body.contains("SignatureDoesNotMatch"), "{body}");
    let id = ticket["media_id"].as_str().unwrap().to_owned();
    assert_eq!(
        app.store()
            .await
            .head(&format!("media/{id}"))
            .await
            .unwrap(),
        None,
        "nothing was stored"
    );

    // A message referencing an upload that is not there yet, or not as declared, is refused.
    let reply = app
        .verify("alice", CONV, "m1", media_ref(&id, "image/png", 500))
        .await;
    assert_eq!(refused(&reply), ErrorCode::MediaNotFound);
    let (status, _) = app.put(upload, data.clone(), &[]).await;
    assert_eq!(status, StatusCode::OK);
    for (media, why) in [
        (media_ref(&id, "image/png", 499), "another size"),
        (media_ref(&id, "image/jpeg", 500), "another type"),
    ] {
        let reply = app.verify("alice", CONV, "m1", media).await;
        assert_eq!(refused(&reply), ErrorCode::MediaMismatch, "{why}");
    }
    let good = media_ref(&id, "image/png", 500);
    for (user, conv, why) in [
        ("bob", CONV, "another sender"),
        ("alice", "dm~alice~carol", "another conversation"),
    ] {
        let reply = app.verify(user, conv, "m1", good.clone()).await;
        assert_eq!(refused(&reply), ErrorCode::MediaNotFound, "{why}");
    }
    let unknown = media_ref(&"0".repeat(32), "image/png", 500);
    assert_eq!(
        refused(&app.verify("alice", CONV, "m1", unknown).await),
        ErrorCode::MediaNotFound
    );
    let mut with_thumb = good.clone();
    with_thumb.thumbnail = Some("f".repeat(32));
    assert_eq!(
        refused(&app.verify("alice", CONV, "m1", with_thumb).await),
        ErrorCode::MediaNotFound
    );
    // None of that claimed it: the upload is still unreferenced, then a right one is accepted.
    assert_eq!(app.record(&id).await.unwrap()["state"], "pending");
    assert_eq!(
        app.verify("alice", CONV, "m1", good).await,
        MediaVerifyReply::Ok
    );

    // Download: members only.
    let (status, err) = app
        .call(Method::GET, &format!("/v1/media/{id}"), Some("carol"), None)
        .await;
    assert_eq!((status, code(&err)), (StatusCode::FORBIDDEN, "not_member"));
    let (status, err) = app
        .call(Method::GET, "/v1/media/..%2F..%2Fetc", Some("bob"), None)
        .await;
    assert_eq!(
        (status, code(&err)),
        (StatusCode::BAD_REQUEST, "invalid_request"),
        "{err}"
    );
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_urls_are_refused_by_the_store() {
    let app = spawn_app(|c| {
        c.upload_url_ttl_secs = 1;
        c.download_url_ttl_secs = 1;
        c.orphan_ttl_ms = 60_000;
    })
    .await;
    let data = bytes(100, 3);
    // A fresh URL works (asking again if this machine was too slow to use it within 1 s).
    let deadline = Instant::now() + WAIT;
    let id = loop {
        let ticket = app.ticket("alice", CONV, "image/gif", data.len()).await;
        if app.put(&ticket["upload"], data.clone(), &[]).await.0 == StatusCode::OK {
            break ticket["media_id"].as_str().unwrap().to_owned();
        }
        assert!(Instant::now() < deadline);
    };
    let expired = app.ticket("alice", CONV, "image/gif", data.len()).await;
    wait_past(expired["expires_at_ms"].as_u64().unwrap()).await;
    let (status, body) = app.put(&expired["upload"], data.clone(), &[]).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");

    assert_eq!(
        app.verify("alice", CONV, "m", media_ref(&id, "image/gif", 100))
            .await,
        MediaVerifyReply::Ok
    );
    let (_, download) = app
        .call(Method::GET, &format!("/v1/media/{id}"), Some("bob"), None)
        .await;
    wait_past(download["expires_at_ms"].as_u64().unwrap()).await;
    let (status, _) = app.fetch(&download["download"]).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    app.shutdown().await;
}

/// Waits until the wall clock is a second past `ms` (presigned expiry has 1 s granularity).
async fn wait_past(ms: u64) {
    while chat_protocol::now_ms() < ms + 1000 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_and_rate_limits_are_per_user() {
    let app = spawn_app(|c| {
        c.quota_bytes = 1000;
        c.requests_per_second = 1;
        c.request_burst = 8;
    })
    .await;
    let body = |size: u64| Some(json!({"conv": CONV, "content_type": "image/png", "size": size}));
    let (status, first) = app
        .call(Method::POST, "/v1/uploads", Some("alice"), body(600))
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, err) = app
        .call(Method::POST, "/v1/uploads", Some("alice"), body(600))
        .await;
    assert_eq!(
        (status, code(&err)),
        (StatusCode::FORBIDDEN, "quota_exceeded"),
        "{err}"
    );
    // Another user has a quota of its own.
    let (status, _) = app
        .call(Method::POST, "/v1/uploads", Some("bob"), body(600))
        .await;
    assert_eq!(status, StatusCode::CREATED);
    // Deleting an upload gives its bytes back.
    let id = first["media_id"].as_str().unwrap();
    let (status, _) = app
        .call(
            Method::DELETE,
            &format!("/v1/uploads/{id}"),
            Some("alice"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = app
        .call(Method::POST, "/v1/uploads", Some("alice"), body(600))
        .await;
    assert_eq!(status, StatusCode::CREATED);

    // Past the burst, a user is refused with a retry hint; others are not affected.
    let mut limited = None;
    for _ in 0..40 {
        let res = app
            .http
            .get(format!("{}/v1/uploads/{}", app.url, "0".repeat(32)))
            .bearer_auth(support::token("alice"))
            .send()
            .await
            .unwrap();
        if res.status() == StatusCode::TOO_MANY_REQUESTS {
            let retry = res.headers()["retry-after"]
                .to_str()
                .unwrap()
                .parse::<u64>()
                .unwrap();
            limited = Some((retry, res.json::<Value>().await.unwrap()));
            break;
        }
    }
    let (retry, err) = limited.expect("the rate limit applies");
    assert!(retry >= 1);
    assert_eq!(code(&err), "rate_limited");
    assert!(err["retry_after_ms"].as_u64().unwrap() >= 1);
    let (status, _) = app
        .call(
            Method::GET,
            &format!("/v1/uploads/{}", "0".repeat(32)),
            Some("carol"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    app.shutdown().await;
}

const MIB: usize = 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multipart_upload_resumes_after_a_dropped_connection() {
    let app = spawn_app(|c| {
        c.part_size_bytes = 5 * MIB as u64;
        c.max_upload_bytes = 64 * MIB as u64;
    })
    .await;
    let video = bytes(12 * MIB + 12_345, 9);
    let (status, ticket) = app
        .call(
            Method::POST,
            "/v1/uploads/multipart",
            Some("alice"),
            Some(json!({"conv": CONV, "content_type": "video/mp4", "size": video.len()})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{ticket}");
    assert_eq!(
        (ticket["parts"].as_u64(), ticket["part_size"].as_u64()),
        (Some(3), Some(5 * MIB as u64))
    );
    let id = ticket["media_id"].as_str().unwrap().to_owned();
    let part = |n: usize| video[(n - 1) * 5 * MIB..(n * 5 * MIB).min(video.len())].to_vec();
    let urls = |numbers: Value| {
        let path = format!("/v1/uploads/{id}/parts");
        let app = &app;
        async move {
            let (status, urls) = app
                .call(
                    Method::POST,
                    &path,
                    Some("alice"),
                    Some(json!({"part_numbers": numbers})),
                )
                .await;
            assert_eq!(status, StatusCode::OK, "{urls}");
            urls["parts"].as_array().unwrap().clone()
        }
    };
    let first = urls(json!([1, 2, 3])).await;
    assert_eq!(first[2]["size"], video.len() - 10 * MIB);
    for n in [1, 3] {
        let (status, body) = app.put(&first[n - 1]["upload"], part(n), &[]).await;
        assert_eq!(status, StatusCode::OK, "part {n}: {body}");
    }
    // Part 2's connection drops halfway.
    drop_halfway(first[1]["upload"]["url"].as_str().unwrap(), &part(2)).await;
    let (status, err) = app
        .call(
            Method::POST,
            &format!("/v1/uploads/{id}/complete"),
            Some("alice"),
            None,
        )
        .await;
    assert_eq!(
        (status, code(&err)),
        (StatusCode::CONFLICT, "incomplete"),
        "{err}"
    );

    // Resume: ask which parts the store has, upload the rest with fresh URLs, complete.
    let (status, progress) = app
        .call(
            Method::GET,
            &format!("/v1/uploads/{id}"),
            Some("alice"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(progress["state"], "pending");
    assert_eq!(progress["multipart"]["missing"], json!([2]), "{progress}");
    let stored: Vec<u64> = progress["multipart"]["stored"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["part_number"].as_u64().unwrap())
        .collect();
    assert_eq!(stored, vec![1, 3]);
    let again = urls(json!([2])).await;
    let (status, body) = app.put(&again[0]["upload"], part(2), &[]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // Not completed yet: a message cannot reference it.
    let reply = app
        .verify(
            "alice",
            CONV,
            "v1",
            media_ref(&id, "video/mp4", video.len()),
        )
        .await;
    assert_eq!(refused(&reply), ErrorCode::MediaNotFound);
    let (status, done) = app
        .call(
            Method::POST,
            &format!("/v1/uploads/{id}/complete"),
            Some("alice"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{done}");
    assert_eq!(done["state"], "uploaded");

    let reply = app
        .verify(
            "alice",
            CONV,
            "v1",
            media_ref(&id, "video/mp4", video.len()),
        )
        .await;
    assert_eq!(reply, MediaVerifyReply::Ok);
    let (status, download) = app
        .call(Method::GET, &format!("/v1/media/{id}"), Some("bob"), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, got) = app.fetch(&download["download"]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(got.len(), video.len());
    assert_eq!(sha256(&got), sha256(&video));
    app.shutdown().await;
}

/// Sends the head of a PUT and half its body, then closes the connection.
async fn drop_halfway(url: &str, body: &[u8]) {
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_at(rest.find('/').unwrap());
    let mut socket = tokio::net::TcpStream::connect(host).await.unwrap();
    let head = format!(
        "PUT {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    socket.write_all(&body[..body.len() / 2]).await.unwrap();
    socket.flush().await.unwrap();
    drop(socket);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_multipart_upload_leaves_nothing_behind() {
    let app = spawn_app(|c| c.quota_bytes = 20 * MIB as u64).await;
    let size = 9 * MIB;
    let (status, ticket) = app
        .call(
            Method::POST,
            "/v1/uploads/multipart",
            Some("alice"),
            Some(json!({"conv": CONV, "content_type": "application/pdf", "size": size})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{ticket}");
    let id = ticket["media_id"].as_str().unwrap().to_owned();
    let (_, urls) = app
        .call(
            Method::POST,
            &format!("/v1/uploads/{id}/parts"),
            Some("alice"),
            Some(json!({"part_numbers": [1]})),
        )
        .await;
    let data = bytes(8 * MIB, 4);
    let (status, _) = app.put(&urls["parts"][0]["upload"], data, &[]).await;
    assert_eq!(status, StatusCode::OK);
    let record = app.record(&id).await.unwrap();
    let upload_id = record["multipart"]["upload_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let store = app.store().await;
    let key = format!("media/{id}");
    assert_eq!(
        store
            .list_parts(&key, &upload_id)
            .await
            .unwrap()
            .map(|p| p.len()),
        Some(1)
    );

    let (status, _) = app
        .call(
            Method::DELETE,
            &format!("/v1/uploads/{id}"),
            Some("alice"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(
        store
            .list_parts(&key, &upload_id)
            .await
            .unwrap()
            .unwrap_or_default(),
        vec![]
    );
    assert_eq!(store.head(&key).await.unwrap(), None);
    assert_eq!(app.record(&id).await, None);
    assert_eq!(app.kv(&format!("p.{id}")).await, None);
    let (status, _) = app
        .call(
            Method::GET,
            &format!("/v1/uploads/{id}"),
            Some("alice"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // Its bytes no longer count against the quota: the whole quota is free again.
    let (status, _) = app
        .call(
            Method::POST,
            "/v1/uploads/multipart",
            Some("alice"),
            Some(json!({"conv": CONV, "content_type": "application/pdf", "size": 20 * MIB})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphans_are_cleaned_up_and_referenced_uploads_never() {
    let app = spawn_app(|c| {
        c.upload_url_ttl_secs = 1;
        c.orphan_ttl_ms = 8000;
        c.cleanup_interval_ms = 200;
    })
    .await;
    let data = bytes(1000, 5);
    let kept = app.upload("alice", CONV, "image/webp", &data).await;
    assert_eq!(
        app.verify("alice", CONV, "k1", media_ref(&kept, "image/webp", 1000))
            .await,
        MediaVerifyReply::Ok
    );
    // The cleanup lists only unreferenced uploads: `kept` is no longer among them.
    assert_eq!(app.kv(&format!("p.{kept}")).await, None);
    // Requested after `kept`, so once it is gone, `kept` was past its orphan time in that pass.
    let orphan = app.upload("alice", CONV, "image/webp", &data).await;
    assert!(app.kv(&format!("p.{orphan}")).await.is_some());
    let store = app.store().await;
    assert!(
        store
            .head(&format!("media/{orphan}"))
            .await
            .unwrap()
            .is_some()
    );
    let deadline = Instant::now() + WAIT;
    while app.record(&orphan).await.is_some() {
        assert!(Instant::now() < deadline, "the orphan was not cleaned up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(app.kv(&format!("p.{orphan}")).await, None);
    assert_eq!(store.head(&format!("media/{orphan}")).await.unwrap(), None);
    let reply = app
        .verify(
            "alice",
            CONV,
            "late",
            media_ref(&orphan, "image/webp", 1000),
        )
        .await;
    assert_eq!(
        refused(&reply),
        ErrorCode::MediaNotFound,
        "a message cannot reference a deleted upload"
    );

    assert_eq!(app.record(&kept).await.unwrap()["state"], "referenced");
    let (status, download) = app
        .call(Method::GET, &format!("/v1/media/{kept}"), Some("bob"), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    let (_, got) = app.fetch(&download["download"]).await;
    assert_eq!(sha256(&got), sha256(&data));
    app.shutdown().await;
}
