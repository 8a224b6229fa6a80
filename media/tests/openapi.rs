//! The OpenAPI document against the running service: every status it documents is reached
//! by a real request (and each request gets the status expected), and schemathesis, fuzzing
//! every operation, finds no answer the document does not describe and no server error.

mod support;

use std::{collections::BTreeSet, process::Command};

use chat_protocol::api::MediaVerifyReply;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use support::{bytes, media_ref, spawn_app, token};

const CONV: &str = "dm~alice~bob";

/// (method, path template, status) of every response the document describes.
fn documented(doc: &Value) -> BTreeSet<(String, String, u16)> {
    let mut all = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            for status in op["responses"].as_object().unwrap().keys() {
                all.insert((method.to_uppercase(), path.clone(), status.parse().unwrap()));
            }
        }
    }
    all
}

#[derive(Default)]
struct Reached {
    seen: BTreeSet<(String, String, u16)>,
}

impl Reached {
    /// Makes the request, asserts its status and records it under `template`.
    #[allow(clippy::too_many_arguments)]
    async fn expect(
        &mut self,
        app: &support::App,
        status: u16,
        method: Method,
        template: &str,
        path: &str,
        user: Option<&str>,
        body: Option<Value>,
    ) -> Value {
        let (got, answer) = app.call(method.clone(), path, user, body).await;
        assert_eq!(got.as_u16(), status, "{method} {path}: {answer}");
        self.seen
            .insert((method.to_string(), template.to_owned(), status));
        answer
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_status_is_reachable() {
    let mut app = spawn_app(|c| {
        c.max_single_upload_bytes = 1000;
        c.max_upload_bytes = 64 * 1024 * 1024;
        c.part_size_bytes = 5 * 1024 * 1024;
        c.quota_bytes = 100 * 1024 * 1024;
        c.requests_per_second = 1;
        c.request_burst = 200;
        c.nats_timeout_ms = 1000;
    })
    .await;
    let res = app
        .http
        .get(format!("{}/openapi.json", app.url))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let doc: Value = res.json().await.unwrap();
    let mut r = Reached::default();
    let upload =
        |size: u64, ct: &str| Some(json!({"conv": CONV, "content_type": ct, "size": size}));
    const UPLOADS: &str = "/v1/uploads";
    const MULTI: &str = "/v1/uploads/multipart";
    const ONE: &str = "/v1/uploads/{media_id}";
    const PARTS: &str = "/v1/uploads/{media_id}/parts";
    const COMPLETE: &str = "/v1/uploads/{media_id}/complete";
    const MEDIA: &str = "/v1/media/{media_id}";
    let none = "0".repeat(32);
    let parts1 = || Some(json!({"part_numbers": [1]}));

    for (template, path) in [(UPLOADS, UPLOADS), (MULTI, MULTI)] {
        r.expect(
            &app,
            400,
            Method::POST,
            template,
            path,
            Some("alice"),
            upload(0, "image/png"),
        )
        .await;
        r.expect(
            &app,
            401,
            Method::POST,
            template,
            path,
            None,
            upload(10, "image/png"),
        )
        .await;
        let other = Some(json!({"conv": "dm~bob~carol", "content_type": "image/png", "size": 10}));
        r.expect(
            &app,
            403,
            Method::POST,
            template,
            path,
            Some("alice"),
            other,
        )
        .await;
        r.expect(
            &app,
            413,
            Method::POST,
            template,
            path,
            Some("alice"),
            upload(1 << 40, "image/png"),
        )
        .await;
        r.expect(
            &app,
            415,
            Method::POST,
            template,
            path,
            Some("alice"),
            upload(10, "text/html"),
        )
        .await;
    }
    // A single upload, put and referenced by a message.
    let data = bytes(100, 1);
    let ticket = r
        .expect(
            &app,
            201,
            Method::POST,
            UPLOADS,
            UPLOADS,
            Some("alice"),
            upload(100, "image/png"),
        )
        .await;
    let single = ticket["media_id"].as_str().unwrap().to_owned();
    assert_eq!(
        app.put(&ticket["upload"], data, &[]).await.0,
        StatusCode::OK
    );
    assert_eq!(
        app.verify("alice", CONV, "m1", media_ref(&single, "image/png", 100))
            .await,
        MediaVerifyReply::Ok
    );
    // A one-part multipart upload (the last part may be small), and one left incomplete.
    let ticket = r
        .expect(
            &app,
            201,
            Method::POST,
            MULTI,
            MULTI,
            Some("alice"),
            upload(10, "video/mp4"),
        )
        .await;
    let multi = ticket["media_id"].as_str().unwrap().to_owned();
    let ticket = r
        .expect(
            &app,
            201,
            Method::POST,
            MULTI,
            MULTI,
            Some("alice"),
            upload(10, "video/mp4"),
        )
        .await;
    let unfinished = ticket["media_id"].as_str().unwrap().to_owned();

    let at = |template: &str, id: &str| template.replace("{media_id}", id);
    // GET /v1/uploads/{id}
    r.expect(
        &app,
        200,
        Method::GET,
        ONE,
        &at(ONE, &single),
        Some("alice"),
        None,
    )
    .await;
    r.expect(
        &app,
        400,
        Method::GET,
        ONE,
        &at(ONE, "not-an-id"),
        Some("alice"),
        None,
    )
    .await;
    r.expect(&app, 401, Method::GET, ONE, &at(ONE, &single), None, None)
        .await;
    r.expect(
        &app,
        404,
        Method::GET,
        ONE,
        &at(ONE, &single),
        Some("bob"),
        None,
    )
    .await;
    // parts
    let urls = r
        .expect(
            &app,
            200,
            Method::POST,
            PARTS,
            &at(PARTS, &multi),
            Some("alice"),
            parts1(),
        )
        .await;
    assert_eq!(
        app.put(&urls["parts"][0]["upload"], bytes(10, 2), &[])
            .await
            .0,
        StatusCode::OK
    );
    r.expect(
        &app,
        400,
        Method::POST,
        PARTS,
        &at(PARTS, &multi),
        Some("alice"),
        Some(json!({"part_numbers": [2]})),
    )
    .await;
    r.expect(
        &app,
        401,
        Method::POST,
        PARTS,
        &at(PARTS, &multi),
        None,
        parts1(),
    )
    .await;
    r.expect(
        &app,
        404,
        Method::POST,
        PARTS,
        &at(PARTS, &none),
        Some("alice"),
        parts1(),
    )
    .await;
    r.expect(
        &app,
        409,
        Method::POST,
        PARTS,
        &at(PARTS, &single),
        Some("alice"),
        parts1(),
    )
    .await;
    // complete
    r.expect(
        &app,
        409,
        Method::POST,
        COMPLETE,
        &at(COMPLETE, &unfinished),
        Some("alice"),
        None,
    )
    .await;
    r.expect(
        &app,
        200,
        Method::POST,
        COMPLETE,
        &at(COMPLETE, &multi),
        Some("alice"),
        None,
    )
    .await;
    r.expect(
        &app,
        400,
        Method::POST,
        COMPLETE,
        &at(COMPLETE, "x"),
        Some("alice"),
        None,
    )
    .await;
    r.expect(
        &app,
        401,
        Method::POST,
        COMPLETE,
        &at(COMPLETE, &multi),
        None,
        None,
    )
    .await;
    r.expect(
        &app,
        404,
        Method::POST,
        COMPLETE,
        &at(COMPLETE, &multi),
        Some("bob"),
        None,
    )
    .await;
    // download
    r.expect(
        &app,
        200,
        Method::GET,
        MEDIA,
        &at(MEDIA, &single),
        Some("bob"),
        None,
    )
    .await;
    r.expect(
        &app,
        400,
        Method::GET,
        MEDIA,
        &at(MEDIA, "x"),
        Some("bob"),
        None,
    )
    .await;
    r.expect(
        &app,
        401,
        Method::GET,
        MEDIA,
        &at(MEDIA, &single),
        None,
        None,
    )
    .await;
    r.expect(
        &app,
        403,
        Method::GET,
        MEDIA,
        &at(MEDIA, &single),
        Some("carol"),
        None,
    )
    .await;
    r.expect(
        &app,
        404,
        Method::GET,
        MEDIA,
        &at(MEDIA, &multi),
        Some("bob"),
        None,
    )
    .await;
    // delete
    r.expect(
        &app,
        409,
        Method::DELETE,
        ONE,
        &at(ONE, &single),
        Some("alice"),
        None,
    )
    .await;
    r.expect(
        &app,
        400,
        Method::DELETE,
        ONE,
        &at(ONE, "x"),
        Some("alice"),
        None,
    )
    .await;
    r.expect(
        &app,
        401,
        Method::DELETE,
        ONE,
        &at(ONE, &unfinished),
        None,
        None,
    )
    .await;
    r.expect(
        &app,
        404,
        Method::DELETE,
        ONE,
        &at(ONE, &unfinished),
        Some("bob"),
        None,
    )
    .await;
    r.expect(
        &app,
        204,
        Method::DELETE,
        ONE,
        &at(ONE, &unfinished),
        Some("alice"),
        None,
    )
    .await;

    // 429: a user who spent its burst (1 request per second after that) is refused on every
    // route. Each route is asked until it refuses, in case a token came back meanwhile.
    let refused = |status: StatusCode| status == StatusCode::TOO_MANY_REQUESTS;
    let mut tries = 0;
    while !refused(
        app.call(Method::GET, &at(ONE, "x"), Some("flood"), None)
            .await
            .0,
    ) {
        tries += 1;
        assert!(tries < 10_000, "the rate limit never applied");
    }
    let routes: [(Method, &str, Option<Value>); 7] = [
        (Method::POST, UPLOADS, upload(10, "image/png")),
        (Method::POST, MULTI, upload(10, "image/png")),
        (Method::GET, ONE, None),
        (Method::DELETE, ONE, None),
        (Method::POST, PARTS, parts1()),
        (Method::POST, COMPLETE, None),
        (Method::GET, MEDIA, None),
    ];
    for (method, template, body) in &routes {
        let path = at(template, &none);
        let mut tries = 0;
        while !refused(
            app.call(method.clone(), &path, Some("flood"), body.clone())
                .await
                .0,
        ) {
            tries += 1;
            assert!(tries < 100, "{method} {template} is not rate limited");
        }
        r.seen
            .insert((method.to_string(), template.to_string(), 429));
    }

    // 503: with NATS gone, nothing can be looked up or recorded.
    app.nats.kill();
    for (method, template, body) in &routes {
        let id = if *template == MEDIA { &single } else { &none };
        r.expect(
            &app,
            503,
            method.clone(),
            template,
            &at(template, id),
            Some("alice"),
            body.clone(),
        )
        .await;
    }

    let documented = documented(&doc);
    let unreached: Vec<_> = documented.difference(&r.seen).collect();
    let undocumented: Vec<_> = r.seen.difference(&documented).collect();
    assert!(
        unreached.is_empty(),
        "documented but never reached: {unreached:?}"
    );
    assert!(
        undocumented.is_empty(),
        "reached but not documented: {undocumented:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_nothing_undocumented_and_no_server_error() {
    let app = spawn_app(|c| {
        c.requests_per_second = 100_000;
        c.request_burst = 100_000;
    })
    .await;
    let bin = chat_testkit::workspace_root().join(".venv/bin/schemathesis");
    assert!(
        bin.exists(),
        "{} is missing: run `SETUP_SCHEMATHESIS=1 scripts/setup.sh` (scripts/test.sh does)",
        bin.display()
    );
    let report = tempfile::tempdir().unwrap();
    let url = format!("{}/openapi.json", app.url);
    let auth = format!("Authorization: Bearer {}", token("alice"));
    let dir = report.path().to_owned();
    let output = tokio::task::spawn_blocking(move || {
        Command::new(bin)
            .args(["run", &url, "-H", &auth])
            .args([
                "--checks",
                "all",
                "--exclude-checks",
                "positive_data_acceptance",
            ])
            .args(["--phases", "examples,coverage,fuzzing"])
            // One worker: hypothesis parses lambdas with `ast` on CPython 3.11, which is not
            // thread-safe ("AST constructor recursion depth mismatch" with two workers).
            .args(["--max-examples", "40", "--workers", "1", "--seed", "1"])
            .args(["--request-timeout", "20", "--no-color"])
            .env("SCHEMATHESIS_HOOKS", "")
            .current_dir(dir)
            .output()
            .expect("run schemathesis")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "schemathesis failed:\n{stdout}\n{stderr}"
    );
    // It did test every operation.
    assert!(stdout.contains("Selected: 7/7"), "{stdout}");
    // Its summary, for the test log (`--nocapture`).
    let summary: Vec<&str> = stdout
        .lines()
        .skip_while(|l| !l.contains("SUMMARY"))
        .collect();
    eprintln!("{}", summary.join("\n"));
    app.shutdown().await;
}
