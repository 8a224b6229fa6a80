//! Group rules: who may change a group and how, what each stamped group event does to the
//! store, and which part of a conversation a user may read.
//!
//! The sequencer owning a group's partition is the only one that decides ([`plan`]); everything
//! downstream (its own store, every other sequencer's follower, the fan-out workers) replays the
//! stamped events ([`changes`]), which carry everything needed to do so deterministically.

use std::collections::BTreeSet;

use chat_protocol::{
    api::{GROUP_NAME_MAX_BYTES, InboundGroup},
    frames::{ErrorCode, GroupEvent, GroupOp, Message},
    ids::{ConvId, UserId},
};
use chat_store::{Change, GroupChange, Member, MessageStore, StoreError};

use crate::stamper::stored;

/// A group operation refused for good, with the error the client gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub code: ErrorCode,
    pub message: String,
}

fn refuse(code: ErrorCode, message: impl Into<String>) -> Refused {
    Refused {
        code,
        message: message.into(),
    }
}

/// Decides what a `group` frame does to the group as it stands (`current`: its current
/// members; `exists`: anything was ever stamped in it), or why it is refused.
pub fn plan(
    op: &InboundGroup,
    exists: bool,
    current: &[Member],
    max_members: u32,
) -> Result<GroupEvent, Refused> {
    let actor = current.iter().find(|m| m.user == op.from);
    let targets = targets(op)?;
    let is_member = |u: &str| current.iter().any(|m| m.user == u);
    let too_many = |n: usize| {
        refuse(
            ErrorCode::GroupFull,
            format!("a group has at most {max_members} members; this would make {n}"),
        )
    };
    if op.op == GroupOp::Create {
        if exists {
            return Err(refuse(
                ErrorCode::AlreadyExists,
                "a conversation with this id exists; pick another id",
            ));
        }
        let name = valid_name(op.name.as_deref())?;
        let members: Vec<String> = targets.into_iter().filter(|u| *u != op.from).collect();
        if members.len() + 1 > max_members as usize {
            return Err(too_many(members.len() + 1));
        }
        return Ok(GroupEvent::Created { name, members });
    }
    if !exists {
        return Err(refuse(ErrorCode::NotFound, "no such group"));
    }
    let Some(actor) = actor else {
        return Err(refuse(
            ErrorCode::NotMember,
            "you are not a member of this conversation",
        ));
    };
    let admin_only = || {
        if actor.admin {
            Ok(())
        } else {
            Err(refuse(
                ErrorCode::NotAdmin,
                "only an admin of the group may do this",
            ))
        }
    };
    let members_of = |want_member: bool| -> Result<Vec<String>, Refused> {
        let picked: Vec<String> = targets
            .iter()
            .filter(|u| is_member(u) == want_member)
            .cloned()
            .collect();
        if picked.is_empty() {
            let what = if want_member {
                "none of these users is a member"
            } else {
                "every one of these users is a member already"
            };
            return Err(refuse(ErrorCode::InvalidFrame, what));
        }
        Ok(picked)
    };
    match op.op {
        GroupOp::Create => unreachable!("handled above"),
        GroupOp::Add => {
            admin_only()?;
            let added = members_of(false)?;
            let n = current.len() + added.len();
            if n > max_members as usize {
                return Err(too_many(n));
            }
            Ok(GroupEvent::Added { members: added })
        }
        GroupOp::Remove => {
            admin_only()?;
            if targets.contains(&op.from) {
                return Err(refuse(
                    ErrorCode::InvalidFrame,
                    "to remove yourself, leave the group",
                ));
            }
            Ok(GroupEvent::Removed {
                members: members_of(true)?,
            })
        }
        GroupOp::Leave => {
            let others: Vec<&Member> = current.iter().filter(|m| m.user != op.from).collect();
            let admin = if actor.admin && !others.iter().any(|m| m.admin) {
                // The longest-standing member (then the smallest id) takes over.
                others
                    .iter()
                    .min_by(|a, b| (a.joined, &a.user).cmp(&(b.joined, &b.user)))
                    .map(|m| m.user.clone())
            } else {
                None
            };
            Ok(GroupEvent::Left { admin })
        }
        GroupOp::Rename => Ok(GroupEvent::Renamed {
            name: valid_name(op.name.as_deref())?,
        }),
        GroupOp::Promote => {
            admin_only()?;
            Ok(GroupEvent::Promoted {
                members: members_of(true)?,
            })
        }
        GroupOp::Demote => {
            admin_only()?;
            let demoted = members_of(true)?;
            if !current
                .iter()
                .any(|m| m.admin && !demoted.contains(&m.user))
            {
                return Err(refuse(
                    ErrorCode::InvalidFrame,
                    "a group keeps at least one admin",
                ));
            }
            Ok(GroupEvent::Demoted { members: demoted })
        }
    }
}

/// The frame's `members`, validated and deduplicated (in the order given), and checked
/// against what the operation takes.
fn targets(op: &InboundGroup) -> Result<Vec<String>, Refused> {
    let mut seen = BTreeSet::new();
    let mut users = Vec::with_capacity(op.members.len());
    for u in &op.members {
        UserId::parse(u).map_err(|e| refuse(ErrorCode::InvalidId, format!("member {u:?}: {e}")))?;
        if seen.insert(u.as_str()) {
            users.push(u.clone());
        }
    }
    let takes_members = matches!(
        op.op,
        GroupOp::Create | GroupOp::Add | GroupOp::Remove | GroupOp::Promote | GroupOp::Demote
    );
    if !takes_members && !users.is_empty() {
        return Err(refuse(
            ErrorCode::InvalidFrame,
            "this operation takes no members",
        ));
    }
    if takes_members && op.op != GroupOp::Create && users.is_empty() {
        return Err(refuse(
            ErrorCode::InvalidFrame,
            "name at least one member in `members`",
        ));
    }
    Ok(users)
}

fn valid_name(name: Option<&str>) -> Result<String, Refused> {
    match name.map(str::trim) {
        None | Some("") => Err(refuse(ErrorCode::InvalidFrame, "a group needs a `name`")),
        Some(n) if n.len() > GROUP_NAME_MAX_BYTES => Err(refuse(
            ErrorCode::InvalidFrame,
            format!("a group name has at most {GROUP_NAME_MAX_BYTES} bytes"),
        )),
        Some(n) => Ok(n.to_owned()),
    }
}

/// What a stamped group event made by `from` does to the store.
pub fn changes(from: &str, event: &GroupEvent) -> Vec<GroupChange> {
    match event {
        GroupEvent::Created { name, members } => vec![
            GroupChange::Join {
                users: vec![from.to_owned()],
                admin: true,
            },
            GroupChange::Join {
                users: members.clone(),
                admin: false,
            },
            GroupChange::Rename { name: name.clone() },
        ],
        GroupEvent::Added { members } => vec![GroupChange::Join {
            users: members.clone(),
            admin: false,
        }],
        GroupEvent::Removed { members } => vec![GroupChange::Leave {
            users: members.clone(),
        }],
        GroupEvent::Left { admin } => {
            let mut changes = vec![GroupChange::Leave {
                users: vec![from.to_owned()],
            }];
            if let Some(admin) = admin {
                changes.push(GroupChange::Admin {
                    users: vec![admin.clone()],
                    admin: true,
                });
            }
            changes
        }
        GroupEvent::Renamed { name } => vec![GroupChange::Rename { name: name.clone() }],
        GroupEvent::Promoted { members } => vec![GroupChange::Admin {
            users: members.clone(),
            admin: true,
        }],
        GroupEvent::Demoted { members } => vec![GroupChange::Admin {
            users: members.clone(),
            admin: false,
        }],
    }
}

/// The store change of a stamped message: a one-to-one conversation's two members' index
/// entries, or a group's membership changes.
pub fn change_for(conv: &ConvId, m: Message, stream_seq: u64) -> Change {
    match conv.direct_members() {
        Some(members) => Change::message(
            stored(m, stream_seq),
            members.iter().map(|u| u.to_string()).collect(),
        ),
        None => {
            let group = m
                .event
                .as_ref()
                .map(|e| changes(&m.from, e))
                .unwrap_or_default();
            Change::group_message(stored(m, stream_seq), group)
        }
    }
}

/// The part of a conversation a user may see: seqs `from..=to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub from: u64,
    /// The seq of the event that removed the user (`None`: still a member).
    pub to: Option<u64>,
}

impl Window {
    pub fn contains(&self, seq: u64) -> bool {
        seq >= self.from && self.to.is_none_or(|to| seq <= to)
    }
}

/// What `user` may see of `conv`: all of a one-to-one conversation it is in, the part of a
/// group from its joining to its leaving; `None` if it never was a member.
pub async fn window<S: MessageStore>(
    store: &S,
    conv: &ConvId,
    user: &UserId,
) -> Result<Option<Window>, StoreError> {
    if !conv.is_group() {
        return Ok(conv
            .is_direct_member(user)
            .then_some(Window { from: 1, to: None }));
    }
    Ok(store
        .member(conv.as_str(), user.as_str())
        .await?
        .map(|m| Window {
            from: m.joined,
            to: m.left,
        }))
}

/// The current members of a group.
pub async fn current_members<S: MessageStore>(
    store: &S,
    conv: &ConvId,
) -> Result<Vec<Member>, StoreError> {
    let mut members = store.members(conv.as_str()).await?;
    members.retain(|m| m.left.is_none());
    Ok(members)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(op: GroupOp, from: &str, members: &[&str], name: Option<&str>) -> InboundGroup {
        InboundGroup {
            conv: "g~t".into(),
            from: from.into(),
            device: "d".into(),
            id: "x".into(),
            op,
            name: name.map(Into::into),
            members: members.iter().map(|s| (*s).into()).collect(),
        }
    }

    fn member(user: &str, joined: u64, admin: bool) -> Member {
        Member {
            user: user.into(),
            joined,
            left: None,
            admin,
        }
    }

    fn code(r: Result<GroupEvent, Refused>) -> ErrorCode {
        r.unwrap_err().code
    }

    #[test]
    fn create_checks_name_cap_and_existence() {
        let create = op(
            GroupOp::Create,
            "al",
            &["bo", "al", "bo", "cy"],
            Some(" T "),
        );
        assert_eq!(
            plan(&create, false, &[], 3),
            Ok(GroupEvent::Created {
                name: "T".into(),
                members: vec!["bo".into(), "cy".into()]
            })
        );
        assert_eq!(code(plan(&create, false, &[], 2)), ErrorCode::GroupFull);
        assert_eq!(code(plan(&create, true, &[], 9)), ErrorCode::AlreadyExists);
        let unnamed = op(GroupOp::Create, "al", &[], None);
        assert_eq!(code(plan(&unnamed, false, &[], 9)), ErrorCode::InvalidFrame);
        let long = "n".repeat(GROUP_NAME_MAX_BYTES + 1);
        let long = op(GroupOp::Create, "al", &[], Some(&long));
        assert_eq!(code(plan(&long, false, &[], 9)), ErrorCode::InvalidFrame);
        let bad = op(GroupOp::Create, "al", &["a.b"], Some("T"));
        assert_eq!(code(plan(&bad, false, &[], 9)), ErrorCode::InvalidId);
    }

    #[test]
    fn only_admins_add_and_remove_within_the_cap() {
        let current = [member("al", 1, true), member("bo", 1, false)];
        let add = |from| op(GroupOp::Add, from, &["cy", "bo"], None);
        assert_eq!(
            plan(&add("al"), true, &current, 3),
            Ok(GroupEvent::Added {
                members: vec!["cy".into()]
            })
        );
        assert_eq!(
            code(plan(&add("bo"), true, &current, 3)),
            ErrorCode::NotAdmin
        );
        assert_eq!(
            code(plan(&add("zed"), true, &current, 3)),
            ErrorCode::NotMember
        );
        assert_eq!(code(plan(&add("al"), false, &[], 3)), ErrorCode::NotFound);
        let two = op(GroupOp::Add, "al", &["cy", "dee"], None);
        assert_eq!(code(plan(&two, true, &current, 3)), ErrorCode::GroupFull);
        let again = op(GroupOp::Add, "al", &["bo"], None);
        assert_eq!(
            code(plan(&again, true, &current, 3)),
            ErrorCode::InvalidFrame
        );
        let remove = op(GroupOp::Remove, "al", &["bo", "cy"], None);
        assert_eq!(
            plan(&remove, true, &current, 3),
            Ok(GroupEvent::Removed {
                members: vec!["bo".into()]
            })
        );
        let me = op(GroupOp::Remove, "al", &["al"], None);
        assert_eq!(code(plan(&me, true, &current, 3)), ErrorCode::InvalidFrame);
        let none = op(GroupOp::Remove, "al", &[], None);
        assert_eq!(
            code(plan(&none, true, &current, 3)),
            ErrorCode::InvalidFrame
        );
    }

    #[test]
    fn the_last_admin_leaving_hands_over_to_the_longest_member() {
        let current = [
            member("al", 1, true),
            member("cy", 4, false),
            member("bo", 2, false),
        ];
        let leave = |from| op(GroupOp::Leave, from, &[], None);
        assert_eq!(
            plan(&leave("al"), true, &current, 9),
            Ok(GroupEvent::Left {
                admin: Some("bo".into())
            })
        );
        assert_eq!(
            plan(&leave("cy"), true, &current, 9),
            Ok(GroupEvent::Left { admin: None })
        );
        assert_eq!(
            plan(&leave("al"), true, &current[..1], 9),
            Ok(GroupEvent::Left { admin: None })
        );
        let demote = op(GroupOp::Demote, "al", &["al"], None);
        assert_eq!(
            code(plan(&demote, true, &current, 9)),
            ErrorCode::InvalidFrame
        );
        let with_members = op(GroupOp::Leave, "al", &["bo"], None);
        assert_eq!(
            code(plan(&with_members, true, &current, 9)),
            ErrorCode::InvalidFrame
        );
    }

    #[test]
    fn events_replay_into_store_changes() {
        assert_eq!(
            changes(
                "al",
                &GroupEvent::Left {
                    admin: Some("bo".into())
                }
            ),
            vec![
                GroupChange::Leave {
                    users: vec!["al".into()]
                },
                GroupChange::Admin {
                    users: vec!["bo".into()],
                    admin: true
                }
            ]
        );
        let w = Window {
            from: 3,
            to: Some(5),
        };
        assert!(!w.contains(2) && w.contains(3) && w.contains(5) && !w.contains(6));
    }
}
