//! How `chat` prints what it receives: one line per message or error, safe for a terminal.

use chat_protocol::{
    frames::{ErrorFrame, GroupEvent, Message, close},
    jetstream::Outcome,
};

/// `[dm~alice~bob #3] alice: hello`, or for a group event `[g~team #4] alice added dave`.
pub fn message_line(m: &Message) -> String {
    let head = format!("[{} #{}]", terminal_safe(&m.conv), m.seq);
    let from = terminal_safe(&m.from);
    match &m.event {
        None => format!("{head} {from}: {}", terminal_safe(&m.body)),
        Some(e) => format!("{head} {from} {}", event_text(e)),
    }
}

/// `added dave, erin`, `renamed the group to "Team"`, ...
pub fn event_text(e: &GroupEvent) -> String {
    let list = |users: &[String]| terminal_safe(&users.join(", "));
    match e {
        GroupEvent::Created { name, members } if members.is_empty() => {
            format!("created the group \"{}\"", terminal_safe(name))
        }
        GroupEvent::Created { name, members } => format!(
            "created the group \"{}\" with {}",
            terminal_safe(name),
            list(members)
        ),
        GroupEvent::Added { members } => format!("added {}", list(members)),
        GroupEvent::Removed { members } => format!("removed {}", list(members)),
        GroupEvent::Left { admin: None } => "left".into(),
        GroupEvent::Left { admin: Some(a) } => {
            format!("left; {} is now an admin", terminal_safe(a))
        }
        GroupEvent::Renamed { name } => format!("renamed the group to \"{}\"", terminal_safe(name)),
        GroupEvent::Promoted { members } => format!("made {} admin", list(members)),
        GroupEvent::Demoted { members } => format!("took the admin role from {}", list(members)),
    }
}

/// `g~team "Team" (3 members, admin): #42, 2 unread` or `dm~alice~bob: #7`.
pub fn conversation_line(c: &chat_protocol::frames::ConvInfo) -> String {
    let mut line = terminal_safe(&c.conv);
    if let Some(name) = &c.name {
        line.push_str(&format!(" \"{}\"", terminal_safe(name)));
    }
    if c.conv.starts_with("g~") {
        let admin = if c.admin { ", admin" } else { "" };
        line.push_str(&format!(" ({} members{admin})", c.member_count));
    }
    line.push_str(&format!(": #{}", c.latest));
    if c.unread > 0 {
        line.push_str(&format!(", {} unread", c.unread));
    }
    if let Some(left) = c.left {
        line.push_str(&format!(" (you left at #{left})"));
    }
    line
}

/// `bob: online`, `carol: offline, last seen 42 s ago`, `dave: offline`.
pub fn presence_line(p: &chat_protocol::frames::PresenceState) -> String {
    let user = terminal_safe(&p.user);
    match (p.online, p.last_seen) {
        (true, _) => format!("{user}: online"),
        (false, Some(ts)) => {
            let ago = chat_protocol::now_ms().saturating_sub(ts) / 1000;
            format!("{user}: offline, last seen {ago} s ago")
        }
        (false, None) => format!("{user}: offline"),
    }
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

    #[test]
    fn presence_reads_as_a_state() {
        use chat_protocol::frames::PresenceState;
        let p = |online, last_seen| PresenceState {
            user: "bob".into(),
            online,
            last_seen,
        };
        assert_eq!(presence_line(&p(true, None)), "bob: online");
        assert_eq!(presence_line(&p(false, None)), "bob: offline");
        let ago = chat_protocol::now_ms() - 42_000;
        assert_eq!(
            presence_line(&p(false, Some(ago))),
            "bob: offline, last seen 42 s ago"
        );
    }

    #[test]
    fn group_events_read_as_sentences() {
        let mut m = msg("");
        m.conv = "g~team".into();
        m.event = Some(GroupEvent::Added {
            members: vec!["dave".into(), "erin".into()],
        });
        assert_eq!(message_line(&m), "[g~team #3] alice added dave, erin");
        m.event = Some(GroupEvent::Left {
            admin: Some("bob".into()),
        });
        assert_eq!(
            message_line(&m),
            "[g~team #3] alice left; bob is now an admin"
        );
    }

    fn msg(body: &str) -> Message {
        Message {
            conv: "dm~alice~bob".into(),
            seq: 3,
            from: "alice".into(),
            id: "m1".into(),
            ts: 0,
            body: body.into(),
            event: None,
            media: None,
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
