//! What the media service does, independent of HTTP and NATS: issue upload and download URLs,
//! track multipart uploads, verify and claim uploads for messages, and clean up orphans.

use std::time::Duration;

use chat_protocol::{
    api::{MediaVerifyReply, MediaVerifyRequest},
    frames::{ErrorCode, ErrorFrame, MediaRef},
    ids::{ConvId, UserId},
    now_ms,
};

use crate::{
    Config,
    api::{
        CONTENT_TYPE_MAX_BYTES, DownloadTicket, MultipartStatus, MultipartTicket, PART_URLS_MAX,
        PartUrl, PartUrls, SIZE_MAX, SignedRequest, StoredPartInfo, UploadRequest, UploadStatus,
        UploadTicket,
    },
    error::ApiError,
    members::Membership,
    metrics,
    records::{MediaRecord, Multipart, RecordError, Records, Reference, State, object_key},
    s3::{ObjectStore, Presigned},
};

/// How many times a lost compare-and-set is retried.
const CAS_RETRIES: usize = 8;

impl From<RecordError> for ApiError {
    fn from(e: RecordError) -> Self {
        ApiError::unavailable(e)
    }
}

impl From<crate::s3::S3Error> for ApiError {
    fn from(e: crate::s3::S3Error) -> Self {
        ApiError::unavailable(e)
    }
}

impl From<crate::members::MembershipError> for ApiError {
    fn from(e: crate::members::MembershipError) -> Self {
        ApiError::unavailable(e)
    }
}

impl From<Presigned> for SignedRequest {
    fn from(p: Presigned) -> Self {
        Self {
            method: p.method,
            url: p.url,
            headers: p.headers,
        }
    }
}

/// A media id: 128 random bits in hex. Only ids of this shape are looked up.
pub fn new_media_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Whether `id` has the shape of a media id this service issues.
pub fn is_media_id(id: &str) -> bool {
    id.len() == 32
        && id
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

pub struct Service {
    pub config: Config,
    pub records: Records,
    pub store: ObjectStore,
    pub members: Membership,
}

impl Service {
    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn orphan_at(&self, record: &MediaRecord) -> u64 {
        record.created_ms + self.config.orphan_ttl_ms
    }

    /// Checks an upload request and reserves its bytes; returns the new record (not stored).
    async fn admit(
        &self,
        user: &UserId,
        req: &UploadRequest,
        max: u64,
    ) -> Result<MediaRecord, ApiError> {
        let conv =
            ConvId::parse(&req.conv).map_err(|e| ApiError::InvalidRequest(format!("conv: {e}")))?;
        let shape = MediaRef {
            id: "x".into(),
            content_type: req.content_type.clone(),
            size: req.size,
            width: None,
            height: None,
            duration_ms: None,
            thumbnail: None,
        };
        if req.size > SIZE_MAX {
            return Err(ApiError::InvalidRequest(format!(
                "size must be at most {SIZE_MAX}"
            )));
        }
        if req.content_type.len() > CONTENT_TYPE_MAX_BYTES {
            return Err(ApiError::InvalidRequest("content_type is too long".into()));
        }
        shape
            .check()
            .map_err(|m| ApiError::InvalidRequest(m.replace("media.", "")))?;
        if req.size > max {
            let hint = if max < self.config.max_upload_bytes {
                "; larger files upload in parts (POST /v1/uploads/multipart)"
            } else {
                ""
            };
            return Err(ApiError::TooLarge {
                size: req.size,
                max,
                hint,
            });
        }
        if !self.config.allows(&req.content_type) {
            return Err(ApiError::UnsupportedType(req.content_type.clone()));
        }
        if !self.members.is_member(&conv, user).await? {
            return Err(ApiError::NotMember);
        }
        let quota = self.config.quota_bytes;
        if let Err(used) = self.records.reserve(user.as_str(), req.size, quota).await? {
            return Err(ApiError::QuotaExceeded {
                size: req.size,
                used,
                quota,
            });
        }
        let id = new_media_id();
        Ok(MediaRecord {
            key: object_key(&id),
            id,
            uploader: user.to_string(),
            conv: conv.to_string(),
            size: req.size,
            content_type: req.content_type.clone(),
            state: State::Pending,
            created_ms: now_ms(),
            multipart: None,
            referenced_by: None,
        })
    }

    /// Stores a new record, marked for the orphan cleanup (the mark first: a record is never
    /// without one until a message references it), giving the reservation back if that fails.
    async fn store_record(&self, record: &MediaRecord) -> Result<(), ApiError> {
        let stored = match self.records.mark_pending(&record.id).await {
            Ok(()) => self.records.create(record).await.map(drop),
            Err(e) => Err(e),
        };
        if let Err(e) = stored {
            let _ = self.records.release(&record.uploader, record.size).await;
            return Err(e.into());
        }
        Ok(())
    }

    /// `POST /v1/uploads`.
    pub async fn create_upload(
        &self,
        user: &UserId,
        req: UploadRequest,
    ) -> Result<UploadTicket, ApiError> {
        let record = self
            .admit(user, &req, self.config.max_single_upload_bytes)
            .await?;
        let ttl = Self::secs(self.config.upload_url_ttl_secs);
        let presigned = match self
            .store
            .presign_put(&record.key, record.size, &record.content_type, ttl)
            .await
        {
            Ok(p) => p,
            Err(e) => {
                let _ = self.records.release(&record.uploader, record.size).await;
                return Err(e.into());
            }
        };
        self.store_record(&record).await?;
        ::metrics::counter!(metrics::UPLOADS, "kind" => "single").increment(1);
        tracing::info!(media = %record.id, conv = %record.conv, size = record.size, "upload issued");
        Ok(UploadTicket {
            media_id: record.id.clone(),
            upload: presigned.into(),
            expires_at_ms: now_ms() + ttl.as_millis() as u64,
            orphan_at_ms: self.orphan_at(&record),
        })
    }

    /// `POST /v1/uploads/multipart`.
    pub async fn create_multipart(
        &self,
        user: &UserId,
        req: UploadRequest,
    ) -> Result<MultipartTicket, ApiError> {
        let mut record = self.admit(user, &req, self.config.max_upload_bytes).await?;
        let part_size = self.config.part_size_bytes;
        let parts = record.size.div_ceil(part_size) as u32;
        let upload_id = match self
            .store
            .create_multipart(&record.key, &record.content_type)
            .await
        {
            Ok(id) => id,
            Err(e) => {
                let _ = self.records.release(&record.uploader, record.size).await;
                return Err(e.into());
            }
        };
        record.multipart = Some(Multipart {
            upload_id,
            part_size,
            parts,
        });
        self.store_record(&record).await?;
        ::metrics::counter!(metrics::UPLOADS, "kind" => "multipart").increment(1);
        tracing::info!(media = %record.id, conv = %record.conv, size = record.size, parts, "multipart upload started");
        Ok(MultipartTicket {
            media_id: record.id.clone(),
            part_size,
            parts,
            orphan_at_ms: self.orphan_at(&record),
        })
    }

    /// The record of `id` if `user` uploaded it (anyone else: not found).
    async fn own(&self, user: &UserId, id: &str) -> Result<(MediaRecord, u64), ApiError> {
        if !is_media_id(id) {
            return Err(ApiError::InvalidRequest(
                "a media id is 32 lowercase hex digits".into(),
            ));
        }
        match self.records.get(id).await? {
            Some((r, rev)) if r.uploader == user.as_str() && r.state != State::Deleting => {
                Ok((r, rev))
            }
            _ => Err(ApiError::NotFound),
        }
    }

    /// The size of part `n` (1-based) of `record`.
    fn part_len(record: &MediaRecord, mp: &Multipart, n: u32) -> u64 {
        let start = u64::from(n - 1) * mp.part_size;
        (record.size - start).min(mp.part_size)
    }

    /// `GET /v1/uploads/{id}`.
    pub async fn status(&self, user: &UserId, id: &str) -> Result<UploadStatus, ApiError> {
        let (record, _) = self.own(user, id).await?;
        let multipart = match &record.multipart {
            None => None,
            Some(mp) => {
                let stored = if record.state == State::Pending {
                    self.store
                        .list_parts(&record.key, &mp.upload_id)
                        .await?
                        .unwrap_or_default()
                } else {
                    Vec::new()
                };
                let missing = if record.state == State::Pending {
                    (1..=mp.parts)
                        .filter(|n| !stored.iter().any(|p| p.number == *n))
                        .collect()
                } else {
                    Vec::new()
                };
                Some(MultipartStatus {
                    part_size: mp.part_size,
                    parts: mp.parts,
                    stored: stored
                        .iter()
                        .map(|p| StoredPartInfo {
                            part_number: p.number,
                            size: p.size,
                        })
                        .collect(),
                    missing,
                })
            }
        };
        Ok(UploadStatus {
            media_id: record.id,
            conv: record.conv,
            content_type: record.content_type,
            size: record.size,
            state: record.state,
            created_ms: record.created_ms,
            multipart,
        })
    }

    /// `POST /v1/uploads/{id}/parts`.
    pub async fn part_urls(
        &self,
        user: &UserId,
        id: &str,
        numbers: &[u32],
    ) -> Result<PartUrls, ApiError> {
        let (record, _) = self.own(user, id).await?;
        if numbers.is_empty() || numbers.len() > PART_URLS_MAX {
            return Err(ApiError::InvalidRequest(format!(
                "part_numbers must list 1 to {PART_URLS_MAX} parts"
            )));
        }
        let Some(mp) = record.multipart.as_ref() else {
            return Err(ApiError::WrongState("not a multipart upload".into()));
        };
        if let Some(bad) = numbers.iter().find(|n| **n == 0 || **n > mp.parts) {
            return Err(ApiError::InvalidRequest(format!(
                "part {bad} is not between 1 and {}",
                mp.parts
            )));
        }
        if record.state != State::Pending {
            return Err(ApiError::WrongState(
                "the upload is already complete".into(),
            ));
        }
        let ttl = Self::secs(self.config.upload_url_ttl_secs);
        let mut parts = Vec::with_capacity(numbers.len());
        for &n in numbers {
            let size = Self::part_len(&record, mp, n);
            let presigned = self
                .store
                .presign_part(&record.key, &mp.upload_id, n, size, ttl)
                .await?;
            parts.push(PartUrl {
                part_number: n,
                size,
                upload: presigned.into(),
            });
        }
        Ok(PartUrls {
            parts,
            expires_at_ms: now_ms() + ttl.as_millis() as u64,
        })
    }

    /// `POST /v1/uploads/{id}/complete`: completes from the parts the store has, once every
    /// part is there with its exact size.
    pub async fn complete(&self, user: &UserId, id: &str) -> Result<UploadStatus, ApiError> {
        let (mut record, revision) = self.own(user, id).await?;
        let Some(mp) = record.multipart.clone() else {
            return Err(ApiError::WrongState("not a multipart upload".into()));
        };
        if record.state != State::Pending {
            // Completing twice is fine: the upload is complete.
            return self.status(user, id).await;
        }
        let stored = self
            .store
            .list_parts(&record.key, &mp.upload_id)
            .await?
            .unwrap_or_default();
        let missing: Vec<u32> = (1..=mp.parts)
            .filter(|n| {
                !stored
                    .iter()
                    .any(|p| p.number == *n && p.size == Self::part_len(&record, &mp, *n))
            })
            .collect();
        if !missing.is_empty() || stored.len() != mp.parts as usize {
            return Err(ApiError::Incomplete(format!(
                "parts missing or of the wrong size: {missing:?}"
            )));
        }
        self.store
            .complete(&record.key, &mp.upload_id, &stored)
            .await?;
        match self.store.head(&record.key).await? {
            Some(info) if info.size == record.size => {}
            other => {
                return Err(ApiError::unavailable(anyhow::anyhow!(
                    "completed object {} has {:?}, expected {} bytes",
                    record.key,
                    other,
                    record.size
                )));
            }
        }
        record.state = State::Uploaded;
        match self.records.update(&record, revision).await {
            Ok(_) | Err(RecordError::Conflict) => {}
            Err(e) => return Err(e.into()),
        }
        tracing::info!(media = %record.id, "multipart upload completed");
        self.status(user, id).await
    }

    /// `DELETE /v1/uploads/{id}`: aborts (multipart) or deletes an upload no message
    /// references; the store keeps nothing of it, and its bytes count no more.
    pub async fn abort(&self, user: &UserId, id: &str) -> Result<(), ApiError> {
        let (mut record, revision) = self.own(user, id).await?;
        if record.state == State::Referenced {
            return Err(ApiError::WrongState(
                "a message references this media; it cannot be deleted".into(),
            ));
        }
        // Claim it for deletion first, so a verification racing us fails cleanly.
        record.state = State::Deleting;
        let revision = match self.records.update(&record, revision).await {
            Ok(rev) => rev,
            Err(RecordError::Conflict) => {
                return Err(ApiError::WrongState(
                    "the upload changed meanwhile; try again".into(),
                ));
            }
            Err(e) => return Err(e.into()),
        };
        self.destroy(&record, revision).await?;
        tracing::info!(media = %record.id, "upload deleted by its uploader");
        Ok(())
    }

    /// Removes a record marked `Deleting`: the object (or multipart upload), then the record,
    /// then the reservation. Safe to repeat after a crash at any step.
    async fn destroy(&self, record: &MediaRecord, revision: u64) -> Result<(), ApiError> {
        if let Some(mp) = &record.multipart {
            self.store.abort(&record.key, &mp.upload_id).await?;
        }
        self.store.delete(&record.key).await?;
        match self.records.remove(&record.id, revision).await {
            Ok(()) => {}
            Err(RecordError::Conflict) => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        self.records.release(&record.uploader, record.size).await?;
        self.records.unmark(&record.id).await?;
        Ok(())
    }

    /// `GET /v1/media/{id}`: a download URL for members of the media's conversation, once a
    /// message references it (the uploader may download its own upload at any time).
    pub async fn download(&self, user: &UserId, id: &str) -> Result<DownloadTicket, ApiError> {
        if !is_media_id(id) {
            return Err(ApiError::InvalidRequest(
                "a media id is 32 lowercase hex digits".into(),
            ));
        }
        let Some((record, _)) = self.records.get(id).await? else {
            return Err(ApiError::NotFound);
        };
        let own = record.uploader == user.as_str();
        if record.state == State::Deleting || (!own && record.state != State::Referenced) {
            return Err(ApiError::NotFound);
        }
        let conv = ConvId::parse(&record.conv)
            .map_err(|e| ApiError::unavailable(anyhow::anyhow!("record {id}: {e}")))?;
        if !self.members.is_member(&conv, user).await? {
            return Err(ApiError::NotMember);
        }
        let ttl = Self::secs(self.config.download_url_ttl_secs);
        let presigned = self.store.presign_get(&record.key, ttl).await?;
        ::metrics::counter!(metrics::DOWNLOADS).increment(1);
        Ok(DownloadTicket {
            media_id: record.id,
            content_type: record.content_type,
            size: record.size,
            download: presigned.into(),
            expires_at_ms: now_ms() + ttl.as_millis() as u64,
        })
    }

    /// Answers `chat.api.media.verify`.
    pub async fn verify(&self, req: &MediaVerifyRequest) -> MediaVerifyReply {
        let result = self.verify_inner(req).await;
        let label = match &result {
            Ok(()) => "ok",
            Err((code, _)) => code.as_str(),
        };
        ::metrics::counter!(metrics::VERIFICATIONS, "result" => label).increment(1);
        match result {
            Ok(()) => MediaVerifyReply::Ok,
            Err((code, message)) => {
                let mut frame = ErrorFrame::new(code, message);
                frame.id = Some(req.id.clone());
                frame.conv = Some(req.conv.clone());
                MediaVerifyReply::Error(frame)
            }
        }
    }

    async fn verify_inner(&self, req: &MediaVerifyRequest) -> Result<(), (ErrorCode, String)> {
        req.media
            .check()
            .map_err(|m| (ErrorCode::InvalidFrame, m))?;
        let media = &req.media;
        // Check everything first and claim only then, so a refused message claims nothing.
        for _ in 0..CAS_RETRIES {
            let main = self
                .inspect(req, &media.id, Some((media.size, &media.content_type)))
                .await?;
            let thumb = match &media.thumbnail {
                Some(thumb) => self.inspect(req, thumb, None).await?,
                None => None,
            };
            let mut lost = false;
            for (mut record, revision) in [main, thumb].into_iter().flatten() {
                record.state = State::Referenced;
                record.referenced_by = Some(Reference {
                    id: req.id.clone(),
                    at_ms: now_ms(),
                });
                match self.records.update(&record, revision).await {
                    Ok(_) => {
                        tracing::info!(media = %record.id, conv = %req.conv, msg = %req.id, "media referenced");
                        // A mark left behind is removed by the cleanup, which finds it referenced.
                        if let Err(e) = self.records.unmark(&record.id).await {
                            tracing::warn!(media = %record.id, error = %e, "cannot unmark a referenced upload");
                        }
                    }
                    Err(RecordError::Conflict) => {
                        lost = true;
                        break;
                    }
                    Err(e) => return Err(verify_unavailable(&record.id, &e)),
                }
            }
            if !lost {
                return Ok(());
            }
        }
        Err(verify_unavailable(
            &media.id,
            &"too many concurrent changes",
        ))
    }

    /// Checks one upload against what the message declares (`expect`: size and type; none for
    /// thumbnails). Returns the record to claim, or `None` when a message already references it.
    async fn inspect(
        &self,
        req: &MediaVerifyRequest,
        id: &str,
        expect: Option<(u64, &str)>,
    ) -> Result<Option<(MediaRecord, u64)>, (ErrorCode, String)> {
        let not_found = |what: &str| (ErrorCode::MediaNotFound, format!("media {id}: {what}"));
        if !is_media_id(id) {
            return Err(not_found("no such media"));
        }
        let Some((record, revision)) = self
            .records
            .get(id)
            .await
            .map_err(|e| verify_unavailable(id, &e))?
        else {
            return Err(not_found("no such media"));
        };
        if record.uploader != req.user || record.conv != req.conv {
            return Err(not_found(
                "not uploaded by the sender for this conversation",
            ));
        }
        if let Some((size, content_type)) = expect
            && (record.size != size || record.content_type != content_type)
        {
            return Err((
                ErrorCode::MediaMismatch,
                format!(
                    "media {id} was uploaded as {} bytes of {}",
                    record.size, record.content_type
                ),
            ));
        }
        match record.state {
            State::Referenced => return Ok(None),
            State::Deleting => return Err(not_found("deleted")),
            State::Pending if record.multipart.is_some() => {
                return Err(not_found("the multipart upload is not completed"));
            }
            State::Pending | State::Uploaded => {}
        }
        match self
            .store
            .head(&record.key)
            .await
            .map_err(|e| verify_unavailable(id, &e))?
        {
            None => Err(not_found("not uploaded (yet)")),
            Some(info)
                if info.size != record.size
                    || info.content_type.as_deref() != Some(record.content_type.as_str()) =>
            {
                Err((
                    ErrorCode::MediaMismatch,
                    format!(
                        "the stored object has {} bytes of {}",
                        info.size,
                        info.content_type.as_deref().unwrap_or("no type")
                    ),
                ))
            }
            Some(_) => Ok(Some((record, revision))),
        }
    }

    /// One pass of the orphan cleanup: deletes every upload no message references that was
    /// requested more than `orphan_ttl_ms` ago. Returns how many it deleted.
    pub async fn sweep(&self) -> Result<usize, RecordError> {
        let now = now_ms();
        let mut deleted = 0;
        for (id, marked_ms) in self.records.pending().await? {
            let Some((mut record, revision)) = self.records.get(&id).await? else {
                // A mark whose record never came (the request failed after marking), or whose
                // record is gone: drop it once it is as old as an orphan.
                if now >= marked_ms + self.config.orphan_ttl_ms {
                    self.records.unmark(&id).await?;
                }
                continue;
            };
            if record.state == State::Referenced {
                self.records.unmark(&id).await?;
                continue;
            }
            if now < self.orphan_at(&record) {
                continue;
            }
            // Mark it first: a verification that wins the race keeps the upload, and a
            // crash after marking is finished by a later pass.
            let revision = if record.state == State::Deleting {
                revision
            } else {
                record.state = State::Deleting;
                match self.records.update(&record, revision).await {
                    Ok(rev) => rev,
                    Err(RecordError::Conflict) => continue,
                    Err(e) => return Err(e),
                }
            };
            match self.destroy(&record, revision).await {
                Ok(()) => {
                    deleted += 1;
                    ::metrics::counter!(metrics::ORPHANS_DELETED).increment(1);
                    tracing::info!(media = %id, age_ms = now - record.created_ms, "orphan upload deleted");
                }
                Err(e) => {
                    tracing::warn!(media = %id, error = %e, "orphan cleanup failed; retried next pass")
                }
            }
        }
        Ok(deleted)
    }
}

fn verify_unavailable(id: &str, e: &dyn std::fmt::Display) -> (ErrorCode, String) {
    tracing::warn!(media = %id, error = %e, "media verification failed");
    (
        ErrorCode::Unavailable,
        "the media could not be checked right now; retry with the same id".to_owned(),
    )
}
