//! Group membership rules, in one place for every service: who may change a group and how
//! ([`plan`], used by the sequencer that decides), what a stamped group event does ([`effects`],
//! [`named`], [`Roster::apply`], replayed by the sequencers' stores, the fan-out workers' views
//! and the gateways), and which part of a conversation a user may see ([`Window`]).
//!
//! The sequencer owning a group's partition is the only one that decides; everything
//! downstream replays the stamped events, which carry everything needed to do so
//! deterministically.

use std::collections::{BTreeMap, BTreeSet};

use crate::{
    api::{GROUP_NAME_MAX_BYTES, InboundGroup},
    frames::{ErrorCode, GroupEvent, GroupOp},
    ids::UserId,
};

/// A member of a group, current (`left` is `None`) or former.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub user: String,
    /// Seq of the event that made it a member (its latest joining).
    pub joined: u64,
    /// Seq of the event that removed it, if it is no longer a member.
    pub left: Option<u64>,
    pub admin: bool,
}

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
                    ErrorCode::LastAdmin,
                    "a group keeps at least one admin: promote another member first",
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

/// One effect of a stamped group event, applied at the event's seq.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// These users become members from the event's seq on (a current member stays as it is).
    /// `admin`: they join as admins.
    Join { users: Vec<String>, admin: bool },
    /// These members leave: the event is the last message they see.
    Leave { users: Vec<String> },
    /// These current members get (`true`) or lose the admin role.
    Admin { users: Vec<String>, admin: bool },
    /// The group's name becomes `name`.
    Rename { name: String },
}

/// What a stamped group event made by `from` does, in order.
pub fn effects(from: &str, event: &GroupEvent) -> Vec<Effect> {
    match event {
        GroupEvent::Created { name, members } => vec![
            Effect::Join {
                users: vec![from.to_owned()],
                admin: true,
            },
            Effect::Join {
                users: members.clone(),
                admin: false,
            },
            Effect::Rename { name: name.clone() },
        ],
        GroupEvent::Added { members } => vec![Effect::Join {
            users: members.clone(),
            admin: false,
        }],
        GroupEvent::Removed { members } => vec![Effect::Leave {
            users: members.clone(),
        }],
        GroupEvent::Left { admin } => {
            let mut effects = vec![Effect::Leave {
                users: vec![from.to_owned()],
            }];
            if let Some(admin) = admin {
                effects.push(Effect::Admin {
                    users: vec![admin.clone()],
                    admin: true,
                });
            }
            effects
        }
        GroupEvent::Renamed { name } => vec![Effect::Rename { name: name.clone() }],
        GroupEvent::Promoted { members } => vec![Effect::Admin {
            users: members.clone(),
            admin: true,
        }],
        GroupEvent::Demoted { members } => vec![Effect::Admin {
            users: members.clone(),
            admin: false,
        }],
    }
}

/// The users a membership event is about (created: the creator and the founding members;
/// added, removed: its members; left: who left), sorted and deduplicated. Empty for renames and
/// role changes.
pub fn named<'a>(event: &'a GroupEvent, from: &'a str) -> Vec<&'a str> {
    let mut users: Vec<&str> = match event {
        GroupEvent::Created { members, .. } => std::iter::once(from)
            .chain(members.iter().map(String::as_str))
            .collect(),
        GroupEvent::Added { members } | GroupEvent::Removed { members } => {
            members.iter().map(String::as_str).collect()
        }
        GroupEvent::Left { .. } => vec![from],
        GroupEvent::Renamed { .. } | GroupEvent::Promoted { .. } | GroupEvent::Demoted { .. } => {
            vec![]
        }
    };
    users.sort_unstable();
    users.dedup();
    users
}

/// How an event changes one user's membership.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turn {
    /// The user sees the group from this event on.
    Joined,
    /// This event is the last the user sees.
    Left,
}

/// Whether `event` (made by `from`) makes `user` join or leave.
pub fn turn_of(event: &GroupEvent, from: &str, user: &str) -> Option<Turn> {
    if !named(event, from).contains(&user) {
        return None;
    }
    match event {
        GroupEvent::Created { .. } | GroupEvent::Added { .. } => Some(Turn::Joined),
        GroupEvent::Removed { .. } | GroupEvent::Left { .. } => Some(Turn::Left),
        _ => None,
    }
}

/// A group's current members, kept by applying its events in seq order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Roster {
    /// Member -> (seq it joined at, admin).
    members: BTreeMap<String, (u64, bool)>,
}

impl Roster {
    /// The roster of these members (former members are skipped).
    pub fn from_members(members: impl IntoIterator<Item = Member>) -> Self {
        Self {
            members: members
                .into_iter()
                .filter(|m| m.left.is_none())
                .map(|m| (m.user, (m.joined, m.admin)))
                .collect(),
        }
    }

    /// Applies the event stamped at `seq` by `from`.
    pub fn apply(&mut self, seq: u64, from: &str, event: &GroupEvent) {
        for effect in effects(from, event) {
            match effect {
                Effect::Join { users, admin } => {
                    for u in users {
                        self.members.entry(u).or_insert((seq, admin));
                    }
                }
                Effect::Leave { users } => {
                    for u in users {
                        self.members.remove(&u);
                    }
                }
                Effect::Admin { users, admin } => {
                    for u in users {
                        if let Some(m) = self.members.get_mut(&u) {
                            m.1 = admin;
                        }
                    }
                }
                Effect::Rename { .. } => {}
            }
        }
    }

    pub fn contains(&self, user: &str) -> bool {
        self.members.contains_key(user)
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The current members, sorted by id.
    pub fn members(&self) -> Vec<Member> {
        self.members
            .iter()
            .map(|(user, (joined, admin))| Member {
                user: user.clone(),
                joined: *joined,
                left: None,
                admin: *admin,
            })
            .collect()
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
    /// All of a conversation (one-to-one conversations, for their two members).
    pub const ALL: Window = Window { from: 1, to: None };

    /// The window of a group member.
    pub fn of(member: &Member) -> Self {
        Window {
            from: member.joined,
            to: member.left,
        }
    }

    pub fn contains(&self, seq: u64) -> bool {
        seq >= self.from && self.to.is_none_or(|to| seq <= to)
    }
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
        assert_eq!(code(plan(&demote, true, &current, 9)), ErrorCode::LastAdmin);
        let with_members = op(GroupOp::Leave, "al", &["bo"], None);
        assert_eq!(
            code(plan(&with_members, true, &current, 9)),
            ErrorCode::InvalidFrame
        );
    }

    #[test]
    fn a_roster_replays_events_as_plan_sees_them() {
        let mut roster = Roster::default();
        let created = GroupEvent::Created {
            name: "T".into(),
            members: vec!["bo".into(), "cy".into()],
        };
        roster.apply(1, "al", &created);
        assert_eq!(roster.len(), 3);
        assert!(roster.members().iter().any(|m| m.user == "al" && m.admin));
        roster.apply(
            2,
            "al",
            &GroupEvent::Left {
                admin: Some("bo".into()),
            },
        );
        roster.apply(
            3,
            "bo",
            &GroupEvent::Added {
                members: vec!["cy".into(), "dee".into()],
            },
        );
        let members = roster.members();
        assert_eq!(
            members,
            vec![
                member("bo", 1, true),
                member("cy", 1, false),
                member("dee", 3, false)
            ]
        );
        let leave = op(GroupOp::Leave, "bo", &[], None);
        assert_eq!(
            plan(&leave, true, &members, 9),
            Ok(GroupEvent::Left {
                admin: Some("cy".into())
            })
        );
        assert_eq!(Roster::from_members(members.clone()), roster);
    }

    #[test]
    fn events_name_their_users_and_turns() {
        let removed = GroupEvent::Removed {
            members: vec!["bo".into(), "al".into(), "bo".into()],
        };
        assert_eq!(named(&removed, "x"), vec!["al", "bo"]);
        assert_eq!(turn_of(&removed, "x", "bo"), Some(Turn::Left));
        assert_eq!(turn_of(&removed, "x", "x"), None);
        let left = GroupEvent::Left { admin: None };
        assert_eq!(turn_of(&left, "x", "x"), Some(Turn::Left));
        let renamed = GroupEvent::Renamed { name: "n".into() };
        assert!(named(&renamed, "x").is_empty());
        assert_eq!(
            effects(
                "al",
                &GroupEvent::Left {
                    admin: Some("bo".into())
                }
            ),
            vec![
                Effect::Leave {
                    users: vec!["al".into()]
                },
                Effect::Admin {
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
        assert!(Window::ALL.contains(1));
    }
}
