//! The HTTP API's request and answer bodies (also their OpenAPI schemas).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::records::State;

/// Longest content type accepted, in bytes.
pub const CONTENT_TYPE_MAX_BYTES: usize = chat_protocol::frames::MEDIA_CONTENT_TYPE_MAX_BYTES;
/// The largest size a request may state (2^53 - 1, exact in every JSON parser).
pub const SIZE_MAX: u64 = (1 << 53) - 1;
/// Most part URLs one request may ask for.
pub const PART_URLS_MAX: usize = 100;

/// Asks for an upload: what will be uploaded, for which conversation.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UploadRequest {
    /// The conversation the media is for (`dm~<a>~<b>` or `g~<id>`); the caller must be a
    /// member, and only its members may download the media.
    #[schema(
        example = "dm~alice~bob",
        pattern = "^(dm~[A-Za-z0-9_-]{1,64}~[A-Za-z0-9_-]{1,64}|g~[A-Za-z0-9_-]{1,64})$"
    )]
    pub conv: String,
    /// The MIME type, one of the service's allowed types. The upload must send exactly this
    /// `Content-Type`.
    #[schema(
        example = "image/jpeg",
        max_length = 127,
        pattern = "^[!-.0-~]+/[!-.0-~]+$"
    )]
    pub content_type: String,
    /// Size in bytes. The upload must be exactly this long.
    #[schema(example = 48213, minimum = 1, maximum = 9007199254740991_u64)]
    pub size: u64,
}

/// An HTTP request the client makes itself, straight to the object store.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct SignedRequest {
    /// `PUT` (uploads) or `GET` (downloads).
    pub method: String,
    /// The presigned URL.
    pub url: String,
    /// Headers to send exactly as given: they are part of the signature.
    pub headers: BTreeMap<String, String>,
}

/// A single-request upload: PUT the bytes to `upload.url` with `upload.headers`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct UploadTicket {
    /// The media id to put in the message's `media.id`.
    pub media_id: String,
    pub upload: SignedRequest,
    /// When the upload URL stops working, ms since the epoch.
    pub expires_at_ms: u64,
    /// When the upload is deleted unless a message references it, ms since the epoch.
    pub orphan_at_ms: u64,
}

/// A multipart upload: ask for part URLs, PUT each part, then complete.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct MultipartTicket {
    pub media_id: String,
    /// Every part but the last has exactly this many bytes; the last has the rest.
    pub part_size: u64,
    /// Number of parts, numbered from 1.
    pub parts: u32,
    /// When the upload is deleted unless completed and referenced by a message.
    pub orphan_at_ms: u64,
}

/// Which parts to get upload URLs for.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PartUrlsRequest {
    /// Part numbers, 1 to `parts`; at most 100 at a time.
    #[schema(min_items = 1, max_items = 100)]
    pub part_numbers: Vec<u32>,
}

/// A presigned PUT for one part.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PartUrl {
    pub part_number: u32,
    /// The part's exact size.
    pub size: u64,
    pub upload: SignedRequest,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PartUrls {
    pub parts: Vec<PartUrl>,
    /// When these URLs stop working, ms since the epoch.
    pub expires_at_ms: u64,
}

/// A part the object store already has.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct StoredPartInfo {
    pub part_number: u32,
    pub size: u64,
}

/// Progress of a multipart upload.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct MultipartStatus {
    pub part_size: u64,
    pub parts: u32,
    /// The parts the store has, ascending (empty once completed).
    pub stored: Vec<StoredPartInfo>,
    /// The parts still to upload, ascending (empty once completed).
    pub missing: Vec<u32>,
}

/// An upload as the uploader sees it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct UploadStatus {
    pub media_id: String,
    pub conv: String,
    pub content_type: String,
    pub size: u64,
    pub state: State,
    pub created_ms: u64,
    /// Present for multipart uploads.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub multipart: Option<MultipartStatus>,
}

/// A download: GET `download.url`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct DownloadTicket {
    pub media_id: String,
    pub content_type: String,
    pub size: u64,
    pub download: SignedRequest,
    /// When the URL stops working, ms since the epoch.
    pub expires_at_ms: u64,
}
