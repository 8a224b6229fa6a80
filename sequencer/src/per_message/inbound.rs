//! Decoding and validating one inbound message of `CHAT_IN`, before it joins its
//! conversation's queue.

use chat_protocol::{
    api::{Inbound, InboundGroup, InboundMessage, InboundReceipt},
    frames::ErrorCode,
    ids::{ClientMsgId, ConvId, UserId},
    subjects,
};

/// A validated inbound message.
#[derive(Debug, Clone)]
pub enum Valid {
    Send(InboundMessage),
    Receipt(InboundReceipt),
    Group(InboundGroup),
}

impl Valid {
    /// Who sent it.
    pub fn from(&self) -> &str {
        match self {
            Valid::Send(m) => &m.from,
            Valid::Receipt(r) => &r.user,
            Valid::Group(g) => &g.from,
        }
    }

    /// Its client message id (sends and group operations).
    pub fn client_id(&self) -> Option<&str> {
        match self {
            Valid::Send(m) => Some(&m.id),
            Valid::Group(g) => Some(&g.id),
            Valid::Receipt(_) => None,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Valid::Send(_) => "send",
            Valid::Receipt(_) => "receipt",
            Valid::Group(_) => "group",
        }
    }
}

/// Why an inbound message is refused for good (never stamped).
#[derive(Debug, thiserror::Error)]
pub enum Reject {
    #[error("undecodable inbound message: {0}")]
    Undecodable(String),
    #[error("invalid id: {0}")]
    InvalidId(#[from] chat_protocol::ids::IdError),
    #[error("subject does not match the conversation")]
    SubjectMismatch,
    #[error("{code:?}: {message}")]
    Refused {
        code: ErrorCode,
        message: String,
        from: UserId,
        conv: String,
        id: Option<String>,
    },
}

impl Reject {
    /// A refusal the sender is told about.
    pub fn refused(
        code: ErrorCode,
        message: impl Into<String>,
        valid: &Valid,
        conv: &ConvId,
    ) -> Self {
        Reject::Refused {
            code,
            message: message.into(),
            from: UserId::parse(valid.from()).expect("validated"),
            conv: conv.to_string(),
            id: valid.client_id().map(str::to_owned),
        }
    }
}

pub const NOT_MEMBER: &str = "you are not a member of this conversation";

/// Decodes `payload` (delivered on `subject` of partition `partition`) and checks what can be
/// checked without the conversation's state: ids, the subject, one-to-one membership.
pub fn validate(partition: u32, subject: &str, payload: &[u8]) -> Result<(Valid, ConvId), Reject> {
    let inbound: Inbound =
        serde_json::from_slice(payload).map_err(|e| Reject::Undecodable(e.to_string()))?;
    let (conv, from, id) = match &inbound {
        Inbound::Send(m) => {
            ClientMsgId::parse(&m.id)?;
            (&m.conv, &m.from, Some(&m.id))
        }
        Inbound::Receipt(r) => (&r.conv, &r.user, None),
        Inbound::Group(g) => {
            ClientMsgId::parse(&g.id)?;
            (&g.conv, &g.from, Some(&g.id))
        }
    };
    let conv = ConvId::parse(conv)?;
    let from = UserId::parse(from)?;
    if subjects::split_partitioned(subject) != Some((partition, conv.as_str())) {
        return Err(Reject::SubjectMismatch);
    }
    let refuse = |code, message: &str| Reject::Refused {
        code,
        message: message.into(),
        from: from.clone(),
        conv: conv.to_string(),
        id: id.cloned(),
    };
    // Group membership is checked against the conversation's state once it is loaded.
    if !conv.is_group() && !conv.is_direct_member(&from) {
        return Err(refuse(ErrorCode::NotMember, NOT_MEMBER));
    }
    let valid = match inbound {
        Inbound::Send(m) => Valid::Send(m),
        Inbound::Receipt(r) => Valid::Receipt(r),
        Inbound::Group(_) if !conv.is_group() => {
            return Err(refuse(
                ErrorCode::InvalidId,
                "group operations need a group conversation (`g~<id>`)",
            ));
        }
        Inbound::Group(g) => Valid::Group(g),
    };
    Ok((valid, conv))
}
