//! The object store, through aws-sdk-s3: presigned URLs for clients (the bytes never pass
//! through this service) and the few calls the service makes itself (HEAD, multipart
//! bookkeeping, deletes).

use std::{collections::BTreeMap, time::Duration};

use aws_sdk_s3::{
    Client,
    config::{
        BehaviorVersion, Credentials, Region, RequestChecksumCalculation,
        ResponseChecksumValidation, timeout::TimeoutConfig,
    },
    error::{DisplayErrorContext, SdkError},
    presigning::{PresignedRequest, PresigningConfig},
    types::{CompletedMultipartUpload, CompletedPart},
};

use crate::config::S3Config;

/// Why an object store call failed.
#[derive(Debug, thiserror::Error)]
#[error("s3 {op}: {message}")]
pub struct S3Error {
    pub op: &'static str,
    pub message: String,
}

fn s3_error<E: std::error::Error + 'static, R: std::fmt::Debug>(
    op: &'static str,
) -> impl FnOnce(SdkError<E, R>) -> S3Error {
    move |e| S3Error {
        op,
        message: DisplayErrorContext(&e).to_string(),
    }
}

/// A presigned request a client makes itself: method, URL and the headers it must send
/// exactly (they are signed).
#[derive(Debug, Clone)]
pub struct Presigned {
    pub method: String,
    pub url: String,
    pub headers: BTreeMap<String, String>,
}

impl From<PresignedRequest> for Presigned {
    fn from(p: PresignedRequest) -> Self {
        Self {
            method: p.method().to_owned(),
            url: p.uri().to_owned(),
            headers: p
                .headers()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.to_owned()))
                .collect(),
        }
    }
}

/// What a HEAD of an object found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub size: u64,
    pub content_type: Option<String>,
}

/// One stored part of a multipart upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredPart {
    pub number: u32,
    pub size: u64,
    pub etag: String,
}

#[derive(Clone)]
pub struct ObjectStore {
    client: Client,
    bucket: String,
}

impl ObjectStore {
    /// Builds the client: static credentials from the config, or the standard AWS chain.
    pub async fn new(cfg: &S3Config, timeout: Duration) -> Self {
        let mut loader =
            aws_config::defaults(BehaviorVersion::latest()).region(Region::new(cfg.region.clone()));
        if let (Some(key), Some(secret)) = (&cfg.access_key_id, &cfg.secret_access_key) {
            loader = loader.credentials_provider(Credentials::new(
                key,
                secret,
                None,
                None,
                "chat-media-config",
            ));
        }
        let shared = loader.load().await;
        let mut builder = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(cfg.force_path_style)
            // Presigned URLs carry no checksum the client cannot know; the service's own calls
            // send checksums only where S3 requires them (S3-compatible stores vary).
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .timeout_config(
                TimeoutConfig::builder()
                    .operation_timeout(timeout)
                    .connect_timeout(timeout.min(Duration::from_secs(3)))
                    .build(),
            );
        if !cfg.endpoint.is_empty() {
            builder = builder.endpoint_url(&cfg.endpoint);
        }
        Self {
            client: Client::from_conf(builder.build()),
            bucket: cfg.bucket.clone(),
        }
    }

    fn presigning(ttl: Duration) -> PresigningConfig {
        PresigningConfig::expires_in(ttl).expect("ttl validated in the config")
    }

    /// Checks that the bucket exists and the credentials work.
    pub async fn check(&self) -> Result<(), S3Error> {
        self.client
            .head_bucket()
            .bucket(&self.bucket)
            .send()
            .await
            .map(|_| ())
            .map_err(s3_error("head bucket"))
    }

    /// A PUT of exactly `size` bytes of `content_type` to `key`: both headers are signed, and
    /// so is `If-None-Match: *`, so the URL creates the object once and cannot overwrite it
    /// (no swapping the bytes after a message referenced them).
    pub async fn presign_put(
        &self,
        key: &str,
        size: u64,
        content_type: &str,
        ttl: Duration,
    ) -> Result<Presigned, S3Error> {
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_length(size as i64)
            .content_type(content_type)
            .if_none_match("*")
            .presigned(Self::presigning(ttl))
            .await
            .map(Presigned::from)
            .map_err(s3_error("presign put"))
    }

    /// A GET of `key`.
    pub async fn presign_get(&self, key: &str, ttl: Duration) -> Result<Presigned, S3Error> {
        self.client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .presigned(Self::presigning(ttl))
            .await
            .map(Presigned::from)
            .map_err(s3_error("presign get"))
    }

    /// Size and content type of `key`, or `None` when there is no such object.
    pub async fn head(&self, key: &str) -> Result<Option<ObjectInfo>, S3Error> {
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(out) => Ok(Some(ObjectInfo {
                size: out.content_length().unwrap_or(0).max(0) as u64,
                content_type: out.content_type().map(str::to_owned),
            })),
            Err(SdkError::ServiceError(e)) if e.err().is_not_found() => Ok(None),
            Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 404) => Ok(None),
            Err(e) => Err(s3_error("head")(e)),
        }
    }

    /// Deletes `key` (nothing happens if it is absent).
    pub async fn delete(&self, key: &str) -> Result<(), S3Error> {
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map(|_| ())
            .map_err(s3_error("delete"))
    }

    /// Starts a multipart upload of `content_type` to `key`; returns its upload id.
    pub async fn create_multipart(&self, key: &str, content_type: &str) -> Result<String, S3Error> {
        let out = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .content_type(content_type)
            .send()
            .await
            .map_err(s3_error("create multipart upload"))?;
        out.upload_id().map(str::to_owned).ok_or_else(|| S3Error {
            op: "create multipart upload",
            message: "no upload id in the answer".into(),
        })
    }

    /// A PUT of part `number` (exactly `size` bytes, signed) of a multipart upload.
    pub async fn presign_part(
        &self,
        key: &str,
        upload_id: &str,
        number: u32,
        size: u64,
        ttl: Duration,
    ) -> Result<Presigned, S3Error> {
        self.client
            .upload_part()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .part_number(number as i32)
            .content_length(size as i64)
            .presigned(Self::presigning(ttl))
            .await
            .map(Presigned::from)
            .map_err(s3_error("presign part"))
    }

    /// The parts the store has of a multipart upload, ascending; `None` when the upload is
    /// unknown (completed or aborted).
    pub async fn list_parts(
        &self,
        key: &str,
        upload_id: &str,
    ) -> Result<Option<Vec<StoredPart>>, S3Error> {
        let mut parts = Vec::new();
        let mut marker: Option<String> = None;
        loop {
            let out = match self
                .client
                .list_parts()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(upload_id)
                .set_part_number_marker(marker.clone())
                .send()
                .await
            {
                Ok(out) => out,
                Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 404) => {
                    return Ok(None);
                }
                Err(e) => return Err(s3_error("list parts")(e)),
            };
            for p in out.parts() {
                parts.push(StoredPart {
                    number: p.part_number().unwrap_or(0).max(0) as u32,
                    size: p.size().unwrap_or(0).max(0) as u64,
                    etag: p.e_tag().unwrap_or_default().to_owned(),
                });
            }
            match (out.is_truncated(), out.next_part_number_marker()) {
                (Some(true), Some(next)) if Some(next) != marker.as_deref() => {
                    marker = Some(next.to_owned());
                }
                _ => break,
            }
        }
        parts.sort_by_key(|p| p.number);
        Ok(Some(parts))
    }

    /// Completes a multipart upload from the parts the store has.
    pub async fn complete(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[StoredPart],
    ) -> Result<(), S3Error> {
        let completed = CompletedMultipartUpload::builder()
            .set_parts(Some(
                parts
                    .iter()
                    .map(|p| {
                        CompletedPart::builder()
                            .part_number(p.number as i32)
                            .e_tag(&p.etag)
                            .build()
                    })
                    .collect(),
            ))
            .build();
        self.client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .multipart_upload(completed)
            .send()
            .await
            .map(|_| ())
            .map_err(s3_error("complete multipart upload"))
    }

    /// Aborts a multipart upload: the store drops its parts. An unknown upload is fine.
    pub async fn abort(&self, key: &str, upload_id: &str) -> Result<(), S3Error> {
        match self
            .client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(SdkError::ServiceError(e)) if e.err().is_no_such_upload() => Ok(()),
            Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 404) => Ok(()),
            Err(e) => Err(s3_error("abort multipart upload")(e)),
        }
    }
}
