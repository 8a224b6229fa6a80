//! Identifiers that end up inside NATS subjects, validated before they get anywhere near one.
//!
//! Every id a client or token supplies goes through [`UserId::parse`], [`ConvId::parse`],
//! [`ClientMsgId::parse`] or [`DeviceId::parse`]. The accepted alphabets exclude `.`, `*`, `>`,
//! whitespace and control characters, so a validated id is always exactly one subject token and
//! subject injection is impossible by construction.

use std::fmt;

/// Longest user, device or client message id, in bytes.
pub const MAX_ID_LEN: usize = 64;

/// Why an id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{what} is empty")]
    Empty { what: &'static str },
    #[error("{what} is longer than {max} bytes")]
    TooLong { what: &'static str, max: usize },
    #[error("{what} contains a character outside [A-Za-z0-9_-]")]
    BadChar { what: &'static str },
    #[error(
        "conversation id must be `g~<id>` or `dm~<user>~<user>` with two different users in ascending order"
    )]
    BadConversation,
}

fn check_token(s: &str, what: &'static str) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty { what });
    }
    if s.len() > MAX_ID_LEN {
        return Err(IdError::TooLong {
            what,
            max: MAX_ID_LEN,
        });
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(IdError::BadChar { what });
    }
    Ok(())
}

macro_rules! token_id {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// Validates `s`: 1 to 64 bytes of `[A-Za-z0-9_-]`.
            pub fn parse(s: &str) -> Result<Self, IdError> {
                check_token(s, $what)?;
                Ok(Self(s.to_owned()))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        /// Hashes and compares like its text, so maps keyed by it are looked up by `&str`.
        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }
    };
}

token_id!(
    /// A user id, as carried in the token's `sub` claim.
    UserId,
    "user id"
);
token_id!(
    /// A device id, chosen by the client per installation.
    DeviceId,
    "device id"
);
token_id!(
    /// A client-generated message id (for example a UUID), unique per sender and conversation.
    ClientMsgId,
    "client message id"
);

token_id!(
    /// A gateway instance id: one token of the presence subjects and KV keys
    /// (`chat.presence.report.<gateway>`, `on.<user>.<gateway>`).
    GatewayId,
    "gateway id"
);

impl GatewayId {
    /// A valid gateway id made from any name (a host name may hold dots): every character
    /// outside `[A-Za-z0-9_-]` becomes `-`, and the result is cut to 64 bytes.
    pub fn sanitized(name: &str) -> Self {
        let mut s: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                    c
                } else {
                    '-'
                }
            })
            .take(MAX_ID_LEN)
            .collect();
        if s.is_empty() {
            s.push_str("gateway");
        }
        Self(s)
    }
}

/// A conversation id: a one-to-one conversation or a group.
///
/// - `dm~<a>~<b>`: the one-to-one conversation of users `a` and `b`, different, in ascending byte
///   order. Its membership is the id itself: it exists implicitly, from its first message.
/// - `g~<id>`: a group, `<id>` being 1 to 64 bytes of `[A-Za-z0-9_-]` chosen by its creator (a
///   random id, such as a UUID). Its members are whatever its stamped membership events made
///   them; only the sequencer's store and the fan-out workers' views know them.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConvId {
    id: String,
    direct: Option<[UserId; 2]>,
}

impl ConvId {
    const DM_PREFIX: &'static str = "dm~";
    const GROUP_PREFIX: &'static str = "g~";

    pub fn parse(s: &str) -> Result<Self, IdError> {
        if let Some(group) = s.strip_prefix(Self::GROUP_PREFIX) {
            check_token(group, "group id")?;
            return Ok(Self {
                id: s.to_owned(),
                direct: None,
            });
        }
        let rest = s
            .strip_prefix(Self::DM_PREFIX)
            .ok_or(IdError::BadConversation)?;
        let (a, b) = rest.split_once('~').ok_or(IdError::BadConversation)?;
        let a = UserId::parse(a)?;
        let b = UserId::parse(b)?;
        if a >= b {
            return Err(IdError::BadConversation);
        }
        Ok(Self {
            id: s.to_owned(),
            direct: Some([a, b]),
        })
    }

    /// The one-to-one conversation between two different users.
    pub fn direct(a: &UserId, b: &UserId) -> Result<Self, IdError> {
        let (lo, hi) = if a < b { (a, b) } else { (b, a) };
        Self::parse(&format!("{}{}~{}", Self::DM_PREFIX, lo, hi))
    }

    /// The group conversation `g~<id>`.
    pub fn group(id: &str) -> Result<Self, IdError> {
        Self::parse(&format!("{}{id}", Self::GROUP_PREFIX))
    }

    pub fn as_str(&self) -> &str {
        &self.id
    }

    /// Whether this is a group (`g~<id>`) rather than a one-to-one conversation.
    pub fn is_group(&self) -> bool {
        self.direct.is_none()
    }

    /// The two members of a one-to-one conversation; `None` for a group, whose members only
    /// the stamped membership events tell.
    pub fn direct_members(&self) -> Option<&[UserId; 2]> {
        self.direct.as_ref()
    }

    /// Whether `user` is one of the two members of this one-to-one conversation (always false
    /// for a group: ask the membership instead).
    pub fn is_direct_member(&self, user: &UserId) -> bool {
        self.direct.as_ref().is_some_and(|m| m.contains(user))
    }
}

impl fmt::Display for ConvId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_ids_from_host_names_are_one_token() {
        assert_eq!(
            GatewayId::sanitized("web.3.local-42").as_str(),
            "web-3-local-42"
        );
        assert_eq!(GatewayId::sanitized("").as_str(), "gateway");
        assert_eq!(
            GatewayId::sanitized(&"x".repeat(100)).as_str().len(),
            MAX_ID_LEN
        );
        assert!(GatewayId::parse(GatewayId::sanitized("a b*c>").as_str()).is_ok());
    }

    #[test]
    fn accepts_plain_ids() {
        for s in ["alice", "Bob_2", "a-b", "0", &"x".repeat(64)] {
            assert!(UserId::parse(s).is_ok(), "{s}");
        }
    }

    #[test]
    fn refuses_anything_that_could_change_a_subject() {
        for s in [
            "",
            "a.b",
            "*",
            ">",
            "a b",
            "a\tb",
            "a\nb",
            "a\0b",
            "é",
            "a~b",
            &"x".repeat(65),
        ] {
            assert!(UserId::parse(s).is_err(), "{s:?} must be refused");
            assert!(ClientMsgId::parse(s).is_err(), "{s:?} must be refused");
        }
    }

    #[test]
    fn direct_conversations_are_canonical() {
        let a = UserId::parse("alice").unwrap();
        let b = UserId::parse("bob").unwrap();
        let c = ConvId::direct(&b, &a).unwrap();
        assert_eq!(c.as_str(), "dm~alice~bob");
        assert_eq!(ConvId::parse("dm~alice~bob").unwrap(), c);
        assert!(c.is_direct_member(&a) && c.is_direct_member(&b));
        assert!(!c.is_direct_member(&UserId::parse("carol").unwrap()));
        assert!(!c.is_group());
        for bad in [
            "dm~bob~alice",
            "dm~alice~alice",
            "dm~alice",
            "alice~bob",
            "dm~alice~bob~carol",
            "dm~al.ice~bob",
            "dm~alice~b*",
            "dm~alice~>",
            "dm~ alice~bob",
        ] {
            assert!(ConvId::parse(bad).is_err(), "{bad:?} must be refused");
        }
        assert!(ConvId::direct(&a, &a).is_err());
    }

    #[test]
    fn group_ids_are_one_token() {
        let g = ConvId::parse("g~team-1").unwrap();
        assert!(g.is_group() && g.direct_members().is_none());
        assert!(!g.is_direct_member(&UserId::parse("team-1").unwrap()));
        assert_eq!(ConvId::group("team-1").unwrap(), g);
        for bad in [
            "g~",
            "g~a.b",
            "g~a~b",
            "g~*",
            "g~>",
            "g~ x",
            &format!("g~{}", "x".repeat(65)),
        ] {
            assert!(ConvId::parse(bad).is_err(), "{bad:?} must be refused");
        }
    }
}
