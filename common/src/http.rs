//! HTTP answers shared by the services' public endpoints.

use axum::{
    http::{HeaderValue, header::RETRY_AFTER},
    response::Response,
};

/// Sets `Retry-After` (whole seconds, as HTTP has it) for a refusal that may be retried after
/// `retry_after_ms`: rounded up and at least 1, so a client that waits the header's time is
/// never early.
pub fn set_retry_after(response: &mut Response, retry_after_ms: u64) {
    let secs = retry_after_ms.div_ceil(1000).max(1);
    response
        .headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from(secs));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        for (ms, header) in [(0, "1"), (1, "1"), (1000, "1"), (1001, "2"), (2500, "3")] {
            let mut response = Response::default();
            set_retry_after(&mut response, ms);
            assert_eq!(response.headers()[RETRY_AFTER], header, "{ms} ms");
        }
    }
}
