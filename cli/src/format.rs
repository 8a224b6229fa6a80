//! How `chat` prints what it receives: one line per message or error, safe for a terminal.

use chat_protocol::{
    frames::{ErrorFrame, Message, close},
    jetstream::Outcome,
};

/// `[dm~alice~bob #3] alice: hello`
pub fn message_line(m: &Message) -> String {
    format!(
        "[{} #{}] {}: {}",
        terminal_safe(&m.conv),
        m.seq,
        terminal_safe(&m.from),
        terminal_safe(&m.body)
    )
}

/// `error rate_limited: too many sends (retry after 250 ms)`
pub fn error_line(e: &ErrorFrame) -> String {
    let mut line = format!("error {}: {}", e.code.as_str(), terminal_safe(&e.message));
    if let Some(ms) = e.retry_after_ms {
        line.push_str(&format!(" (retry after {ms} ms)"));
    }
    line
}

/// `streams/CHAT_IN.json: created`, `...: updated (max_age, num_replicas)`.
pub fn outcome_line(path: &str, outcome: &Outcome) -> String {
    match outcome {
        Outcome::Created => format!("{path}: created"),
        Outcome::Unchanged => format!("{path}: unchanged"),
        Outcome::Updated { fields } => format!("{path}: updated ({})", fields.join(", ")),
    }
}

/// What a WebSocket close code of the gateway means for the user.
pub fn close_hint(code: u16) -> Option<&'static str> {
    Some(match code {
        close::NORMAL => "normal close",
        close::GOING_AWAY => "the gateway is shutting down; reconnect",
        close::MESSAGE_TOO_BIG => "a frame was too large",
        close::HEARTBEAT_TIMEOUT => "heartbeat timeout",
        close::SLOW_CONSUMER => "reading too slowly; reconnect and sync",
        close::TOKEN_EXPIRED => "the token expired; reconnect with a fresh one",
        _ => return None,
    })
}

/// Bodies are opaque and may hold anything: control characters (newlines, terminal escape
/// sequences) are shown escaped so one message stays one harmless line.
pub fn terminal_safe(s: &str) -> String {
    if !s.chars().any(char::is_control) {
        return s.to_owned();
    }
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use chat_protocol::frames::ErrorCode;

    use super::*;

    fn msg(body: &str) -> Message {
        Message {
            conv: "dm~alice~bob".into(),
            seq: 3,
            from: "alice".into(),
            id: "m1".into(),
            ts: 0,
            body: body.into(),
            event: None,
        }
    }

    #[test]
    fn messages_print_on_one_line() {
        assert_eq!(
            message_line(&msg("hello")),
            "[dm~alice~bob #3] alice: hello"
        );
        assert_eq!(
            message_line(&msg("two\nlines \u{1b}[31mred")),
            r"[dm~alice~bob #3] alice: two\nlines \u{1b}[31mred"
        );
        assert_eq!(
            message_line(&msg("héllo ✓")),
            "[dm~alice~bob #3] alice: héllo ✓"
        );
    }

    #[test]
    fn errors_show_code_message_and_retry() {
        let mut e = ErrorFrame::new(ErrorCode::RateLimited, "too many sends");
        assert_eq!(error_line(&e), "error rate_limited: too many sends");
        e.retry_after_ms = Some(250);
        assert_eq!(
            error_line(&e),
            "error rate_limited: too many sends (retry after 250 ms)"
        );
    }

    #[test]
    fn outcomes_print_one_line_per_definition() {
        assert_eq!(
            outcome_line("streams/CHAT_IN.json", &Outcome::Created),
            "streams/CHAT_IN.json: created"
        );
        assert_eq!(
            outcome_line("consumers/CHAT_IN/seq-p0.json", &Outcome::Unchanged),
            "consumers/CHAT_IN/seq-p0.json: unchanged"
        );
        assert_eq!(
            outcome_line(
                "streams/CHAT_MSGS.json",
                &Outcome::Updated {
                    fields: vec!["max_age".into(), "num_replicas".into()]
                }
            ),
            "streams/CHAT_MSGS.json: updated (max_age, num_replicas)"
        );
    }

    #[test]
    fn close_codes_have_hints() {
        assert!(close_hint(close::SLOW_CONSUMER).unwrap().contains("slowly"));
        assert!(close_hint(close::TOKEN_EXPIRED).unwrap().contains("token"));
        assert_eq!(close_hint(4999), None);
    }
}
