//! Metric names and their recording. Labels are low-cardinality by construction: frame kinds,
//! error codes and close reasons, never a user, device or conversation id.

use chat_protocol::frames::ErrorCode;

/// Gauge: open WebSocket connections (counted from the accepted upgrade to the end).
pub const CONNECTIONS: &str = "gateway_connections";
/// Counter, label `kind` (`send`, `history`, `delivered`, `read`, `sync`, `receipts`, `group`,
/// `conversations`, `group_info`, `ping`, `invalid`): frames read from clients.
pub const FRAMES_IN: &str = "gateway_frames_in_total";
/// Counter: frames written to clients (including forwarded pushes, excluding pings).
pub const FRAMES_OUT: &str = "gateway_frames_out_total";
/// Counter: sends stored by JetStream and answered with `sent`.
pub const SENDS_PUBLISHED: &str = "gateway_sends_published_total";
/// Counter: receipts (`delivered`, `read`) stored by JetStream.
pub const RECEIPTS_PUBLISHED: &str = "gateway_receipts_published_total";
/// Counter: delivery confirmation requests answered (a push with a reply subject was queued).
pub const DELIVERIES_CONFIRMED: &str = "gateway_deliveries_confirmed_total";
/// Counter, label `code`: sends answered with an `error` frame.
pub const SEND_ERRORS: &str = "gateway_send_errors_total";
/// Counter, label `code`: every `error` frame sent.
pub const ERROR_FRAMES: &str = "gateway_error_frames_total";
/// Counter: connections closed with 4001 because their outgoing queue was full.
pub const SLOW_CONSUMERS: &str = "gateway_slow_consumer_disconnects_total";
/// Counter, label `reason`: connections closed, by reason.
pub const CLOSES: &str = "gateway_closes_total";
/// Counter, label `code`: upgrades refused before the WebSocket opened.
pub const UPGRADE_REJECTIONS: &str = "gateway_upgrade_rejections_total";

/// Gauge: `chat.grp.<conv>` subscriptions held (large groups with a member connected here).
pub const GROUP_SUBSCRIPTIONS: &str = "gateway_group_subscriptions";
/// Counter: connections whose group list could not be fetched at connect.
pub const GROUP_LIST_FAILURES: &str = "gateway_group_list_failures_total";
/// Counter: large-group events forwarded to connections.
pub const GROUP_PUSHES: &str = "gateway_group_pushes_total";

/// Registers descriptions with the recorder (shown as `# HELP` lines).
pub fn describe() {
    use metrics::{describe_counter, describe_gauge};
    describe_gauge!(CONNECTIONS, "Open WebSocket connections");
    describe_counter!(FRAMES_IN, "Frames read from clients, by kind");
    describe_counter!(FRAMES_OUT, "Frames written to clients");
    describe_counter!(
        SENDS_PUBLISHED,
        "Sends stored by JetStream and acked as sent"
    );
    describe_counter!(RECEIPTS_PUBLISHED, "Receipts stored by JetStream");
    describe_counter!(
        DELIVERIES_CONFIRMED,
        "Pushes confirmed to their sender as queued for a device"
    );
    describe_counter!(SEND_ERRORS, "Sends answered with an error, by code");
    describe_counter!(ERROR_FRAMES, "Error frames sent, by code");
    describe_counter!(
        SLOW_CONSUMERS,
        "Connections closed because their queue was full"
    );
    describe_counter!(CLOSES, "Connections closed, by reason");
    describe_counter!(UPGRADE_REJECTIONS, "Upgrades refused, by error code");
    describe_gauge!(
        GROUP_SUBSCRIPTIONS,
        "Large-group subscriptions shared by this gateway's connections"
    );
    describe_counter!(
        GROUP_LIST_FAILURES,
        "Connections whose group list could not be fetched at connect"
    );
    describe_counter!(GROUP_PUSHES, "Large-group events forwarded to connections");
}

pub(crate) fn frame_in(kind: &'static str) {
    metrics::counter!(FRAMES_IN, "kind" => kind).increment(1);
}

pub(crate) fn error_frame(code: ErrorCode) {
    metrics::counter!(ERROR_FRAMES, "code" => code.as_str()).increment(1);
}

pub(crate) fn send_error(code: ErrorCode) {
    metrics::counter!(SEND_ERRORS, "code" => code.as_str()).increment(1);
}
