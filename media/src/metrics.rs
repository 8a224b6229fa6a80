//! Metric names. Labels are low-cardinality: kinds, results and error codes, never a user,
//! conversation or media id.

/// Counter, label `kind` (`single`, `multipart`): uploads issued.
pub const UPLOADS: &str = "media_uploads_total";
/// Counter: download URLs issued.
pub const DOWNLOADS: &str = "media_downloads_total";
/// Counter, label `result` (`ok` or an error code): `chat.api.media.verify` answers.
pub const VERIFICATIONS: &str = "media_verifications_total";
/// Counter: unreferenced uploads deleted by the orphan cleanup.
pub const ORPHANS_DELETED: &str = "media_orphans_deleted_total";
/// Counter: orphan cleanup passes that failed (retried next interval).
pub const CLEANUP_FAILURES: &str = "media_cleanup_failures_total";
/// Counter, label `code`: API requests answered with an error.
pub const HTTP_ERRORS: &str = "media_http_errors_total";

/// Registers descriptions with the recorder (shown as `# HELP` lines).
pub fn describe() {
    use metrics::describe_counter;
    describe_counter!(UPLOADS, "Uploads issued, by kind");
    describe_counter!(DOWNLOADS, "Download URLs issued");
    describe_counter!(VERIFICATIONS, "Media message verifications, by result");
    describe_counter!(ORPHANS_DELETED, "Unreferenced uploads deleted");
    describe_counter!(CLEANUP_FAILURES, "Orphan cleanup passes that failed");
    describe_counter!(HTTP_ERRORS, "API requests answered with an error, by code");
}
