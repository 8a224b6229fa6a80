//! Server-less tests of the write path: the plan of a batch (which partitions, how many
//! requests), the statements' bind values, and, with a small model of the server's
//! last-write-wins cells, that replays and late writes converge.

use std::collections::{BTreeMap, HashMap};

use scylla::value::CqlValue;

use super::codec::FOLLOW_POS;
use super::plan::{self, Known, MemberRow, Partition, Plan, Stmt, Write};
use super::*;
use crate::conformance::{msg, range_msgs, rcpt};
use crate::{GroupChange, StoreErrorKind};

fn users(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| (*s).to_owned()).collect()
}

fn dm(seq: u64, from: &str, stream_seq: u64) -> Change {
    Change::message(
        msg("dm~alice~bob", seq, from, &format!("c{seq}"), stream_seq),
        users(&["alice", "bob"]),
    )
}

fn kinds(plan: &Plan) -> Vec<&'static str> {
    plan.partitions
        .keys()
        .map(|p| match p {
            Partition::Messages { .. } => "messages",
            Partition::ClientIds { .. } => "client_ids",
            Partition::Conversation { .. } => "conversations",
            Partition::Marks { .. } => "marks",
            Partition::Members { .. } => "members",
            Partition::User { .. } => "user",
            Partition::Meta => "meta",
        })
        .collect()
}

/// Requests the plan takes with batches of at most `max` bytes.
fn requests(plan: &Plan, max: usize) -> usize {
    plan.partitions
        .values()
        .map(|w| plan::chunks(w, max).len())
        .sum()
}

#[test]
fn every_statement_binds_as_many_values_as_it_has_markers() {
    let m = msg("c", 1, "a", "x", 1);
    let row = MemberRow {
        joined: 1,
        left: None,
        admin: true,
        event_seq: 1,
    };
    let samples = vec![
        Write::Message(m.clone()),
        Write::ClientId {
            conv: "c".into(),
            from: "a".into(),
            client_id: "x".into(),
            seq: 1,
            stream_seq: 1,
        },
        Write::Latest {
            conv: "c".into(),
            seq: 1,
        },
        Write::ConvPos {
            conv: "c".into(),
            pos: 1,
        },
        Write::Name {
            conv: "c".into(),
            name: "n".into(),
            at: 1,
        },
        Write::MemberCount {
            conv: "c".into(),
            count: 1,
            at: 1,
        },
        Write::Delivered {
            conv: "c".into(),
            user: "u".into(),
            seq: 1,
        },
        Write::Read {
            conv: "c".into(),
            user: "u".into(),
            seq: 1,
        },
        Write::Member {
            conv: "c".into(),
            user: "u".into(),
            row,
            at: 1,
        },
        Write::UserPos {
            user: "u".into(),
            conv: "c".into(),
            pos: 1,
        },
        Write::Follow {
            user: "u".into(),
            conv: "c".into(),
            follow: true,
            at: 1,
        },
        Write::FeedInsert {
            user: "u".into(),
            pos: 1,
            conv: "c".into(),
            at: 1,
        },
        Write::FeedDelete {
            user: "u".into(),
            pos: 1,
            conv: "c".into(),
            at: 2,
        },
        Write::Applied { through: 1 },
    ];
    let mut covered: Vec<Stmt> = samples.iter().map(Write::stmt).collect();
    covered.sort();
    covered.dedup();
    assert_eq!(covered.len(), Stmt::ALL.len(), "a sample per statement");
    for w in samples {
        let markers = w.stmt().cql().matches('?').count();
        assert_eq!(markers, w.values().len(), "{:?}", w.stmt());
        // Every write carries its own timestamp: replays and late writes cannot win.
        assert!(
            w.stmt().cql().contains("USING TIMESTAMP ?"),
            "{:?}",
            w.stmt()
        );
    }
    for r in Read::ALL {
        assert!(r.cql().starts_with("SELECT "), "{r:?}");
        assert!(!r.cql().contains("ALLOW FILTERING"), "{r:?}");
    }
}

#[test]
fn a_one_to_one_message_writes_six_partitions() {
    let plan = plan::plan(&[dm(1, "alice", 10)], &Known::default());
    assert_eq!(
        kinds(&plan),
        [
            "messages",
            "client_ids",
            "conversations",
            "marks",
            "user",
            "user"
        ]
    );
    assert_eq!(requests(&plan, 32 * 1024), 6);
    // First entry of each user: nothing to delete.
    let user_writes: Vec<Stmt> = plan.partitions[&Partition::User { user: "bob".into() }]
        .iter()
        .map(Write::stmt)
        .collect();
    assert_eq!(user_writes, [Stmt::UserPos, Stmt::FeedInsert]);
}

#[test]
fn a_moved_index_entry_deletes_its_older_feed_row_in_the_same_partition() {
    let mut known = Known::default();
    known
        .positions
        .insert(("bob".into(), "dm~alice~bob".into()), 7);
    let plan = plan::plan(&[dm(2, "alice", 11)], &known);
    let bob = &plan.partitions[&Partition::User { user: "bob".into() }];
    assert!(bob.contains(&Write::FeedInsert {
        user: "bob".into(),
        pos: 11,
        conv: "dm~alice~bob".into(),
        at: 11
    }));
    assert!(bob.contains(&Write::FeedDelete {
        user: "bob".into(),
        pos: 7,
        conv: "dm~alice~bob".into(),
        at: 11
    }));
    // A replay of an older change moves nothing.
    known
        .positions
        .insert(("bob".into(), "dm~alice~bob".into()), 50);
    known
        .positions
        .insert(("alice".into(), "dm~alice~bob".into()), 50);
    let plan = plan::plan(&[dm(2, "alice", 11)], &known);
    assert!(!kinds(&plan).contains(&"user"));
}

#[test]
fn a_batch_of_one_conversation_costs_per_partition_not_per_message() {
    // 200 messages of one conversation by two senders, in one bucket.
    let changes: Vec<Change> = (1..=200)
        .map(|seq| dm(seq, if seq % 2 == 0 { "alice" } else { "bob" }, 1000 + seq))
        .collect();
    let plan = plan::plan(&changes, &Known::default());
    assert_eq!(
        kinds(&plan),
        [
            "messages",
            "client_ids",
            "client_ids",
            "conversations",
            "marks",
            "user",
            "user"
        ]
    );
    // The registers are written once per batch, with the batch's maxima.
    let conv = &plan.partitions[&Partition::Conversation {
        conv: "dm~alice~bob".into(),
    }];
    assert!(conv.contains(&Write::Latest {
        conv: "dm~alice~bob".into(),
        seq: 200
    }));
    assert!(conv.contains(&Write::ConvPos {
        conv: "dm~alice~bob".into(),
        pos: 1200
    }));
    assert_eq!(conv.len(), 2);
    // Seven partitions; the message partition's rows split under the batch size limit.
    let small = requests(&plan, 32 * 1024);
    assert!(
        (7..=10).contains(&small),
        "{small} requests for 200 messages"
    );
}

#[test]
fn a_batch_crossing_a_bucket_boundary_writes_both_partitions() {
    let changes: Vec<Change> = range_msgs("big", 9_996, 10_005, 0)
        .into_iter()
        .map(|m| Change::message(m, vec![]))
        .collect();
    let plan = plan::plan(&changes, &Known::default());
    let buckets: Vec<i64> = plan
        .partitions
        .iter()
        .filter_map(|(p, w)| match p {
            Partition::Messages { bucket, .. } => Some((*bucket, w.len())),
            _ => None,
        })
        .map(|(b, n)| {
            assert_eq!(n, 5, "bucket {b}");
            b
        })
        .collect();
    assert_eq!(buckets, [0, 1]);
}

#[test]
fn a_group_message_costs_the_same_whatever_the_group_size() {
    let m = msg("g~team", 5, "alice", "a5", 500);
    let plan = plan::plan(&[Change::group_message(m, vec![])], &Known::default());
    assert_eq!(
        kinds(&plan),
        ["messages", "client_ids", "conversations", "marks"]
    );
}

#[test]
fn re_applying_stored_messages_rewrites_no_message_rows() {
    let mut known = Known::default();
    known.stored.insert(("dm~alice~bob".into(), 1));
    let plan = plan::plan(&[dm(1, "alice", 10)], &known);
    assert!(!kinds(&plan).contains(&"messages"));
    // The client id record is written again: a crash may have lost it after the message.
    assert!(kinds(&plan).contains(&"client_ids"));
}

#[test]
fn the_first_client_id_of_a_batch_counts() {
    let changes = vec![
        Change::message(msg("c", 4, "bob", "m9", 4), vec![]),
        Change::message(msg("c", 3, "bob", "m9", 3), vec![]),
    ];
    let plan = plan::plan(&changes, &Known::default());
    let ids = &plan.partitions[&Partition::ClientIds {
        conv: "c".into(),
        from: "bob".into(),
    }];
    assert_eq!(ids.len(), 1);
    assert!(matches!(ids[0], Write::ClientId { seq: 4, .. }));
}

#[test]
fn receipts_raise_delivered_with_read() {
    let changes = vec![
        Change::receipt(rcpt("c", "bob", 3, 0, 1), vec![]),
        Change::receipt(rcpt("c", "bob", 0, 5, 2), vec![]),
    ];
    let plan = plan::plan(&changes, &Known::default());
    let marks = &plan.partitions[&Partition::Marks { conv: "c".into() }];
    assert!(marks.contains(&Write::Delivered {
        conv: "c".into(),
        user: "bob".into(),
        seq: 5
    }));
    assert!(marks.contains(&Write::Read {
        conv: "c".into(),
        user: "bob".into(),
        seq: 5
    }));
}

fn event(seq: u64, group: Vec<GroupChange>) -> Change {
    let mut m = msg("g", seq, "alice", &format!("e{seq}"), 100 + seq);
    m.event = Some(format!("event {seq}"));
    Change::group_message(m, group)
}

fn join(names: &[&str], admin: bool) -> GroupChange {
    GroupChange::Join {
        users: users(names),
        admin,
    }
}

#[test]
fn group_events_write_member_rows_count_and_the_members_index() {
    let changes = vec![
        event(
            1,
            vec![join(&["alice"], true), join(&["bob", "carol"], false)],
        ),
        event(
            2,
            vec![GroupChange::Leave {
                users: users(&["carol"]),
            }],
        ),
    ];
    let plan = plan::plan(&changes, &Known::default());
    let members = &plan.partitions[&Partition::Members { conv: "g".into() }];
    let carol = members
        .iter()
        .find_map(|w| match w {
            Write::Member { user, row, at, .. } if user == "carol" => Some((*row, *at)),
            _ => None,
        })
        .unwrap();
    assert_eq!(
        carol,
        (
            MemberRow {
                joined: 1,
                left: Some(2),
                admin: false,
                event_seq: 2
            },
            102
        )
    );
    let conv = &plan.partitions[&Partition::Conversation { conv: "g".into() }];
    assert!(conv.contains(&Write::MemberCount {
        conv: "g".into(),
        count: 2,
        at: 102
    }));
    // Bob follows the group (one feed row, whatever happens in the group later) ...
    let bob = &plan.partitions[&Partition::User { user: "bob".into() }];
    assert!(bob.contains(&Write::FeedInsert {
        user: "bob".into(),
        pos: FOLLOW_POS,
        conv: "g".into(),
        at: 101
    }));
    // ... carol's entry froze at her removal.
    let carol = &plan.partitions[&Partition::User {
        user: "carol".into(),
    }];
    assert!(carol.contains(&Write::FeedDelete {
        user: "carol".into(),
        pos: FOLLOW_POS,
        conv: "g".into(),
        at: 102
    }));
    assert!(carol.contains(&Write::FeedInsert {
        user: "carol".into(),
        pos: 102,
        conv: "g".into(),
        at: 102
    }));
}

#[test]
fn replayed_group_events_change_no_member_but_rewrite_count_and_index() {
    let changes = vec![event(1, vec![join(&["alice", "bob"], false)])];
    let first = plan::plan(&changes, &Known::default());
    // What the server holds after the first application (member rows written; suppose the
    // index and count writes were lost in a crash).
    let mut rows = HashMap::new();
    for w in &first.partitions[&Partition::Members { conv: "g".into() }] {
        if let Write::Member { user, row, .. } = w {
            rows.insert(user.clone(), *row);
        }
    }
    let known = Known {
        members: HashMap::from([("g".to_owned(), rows)]),
        ..Default::default()
    };
    let replay = plan::plan(&changes, &known);
    assert!(!kinds(&replay).contains(&"members"), "no member row again");
    let conv = &replay.partitions[&Partition::Conversation { conv: "g".into() }];
    assert!(conv.contains(&Write::MemberCount {
        conv: "g".into(),
        count: 2,
        at: 101
    }));
    assert_eq!(
        replay.partitions[&Partition::User { user: "bob".into() }],
        first.partitions[&Partition::User { user: "bob".into() }]
    );
}

#[test]
fn large_partitions_split_into_batches_under_the_limit() {
    let mut big = msg("c", 1, "a", "x", 1);
    big.body = "x".repeat(20_000);
    let writes: Vec<Write> = (1..=10)
        .map(|seq| Write::Message(StoredMessage { seq, ..big.clone() }))
        .collect();
    let chunks = plan::chunks(&writes, 32 * 1024);
    assert_eq!(chunks.len(), 10, "each 20 kB message alone under 32 kB");
    let mut huge = big.clone();
    huge.body = "y".repeat(300_000);
    let alone = [Write::Message(huge)];
    assert_eq!(plan::chunks(&alone, 32 * 1024).len(), 1);
    let small: Vec<Write> = (1..=100)
        .map(|seq| Write::Latest {
            conv: "c".into(),
            seq,
        })
        .collect();
    let chunks = plan::chunks(&small, 1024);
    assert!(chunks.len() > 1);
    assert!(
        chunks
            .iter()
            .all(|c| c.iter().map(Write::weight).sum::<usize>() <= 1024)
    );
    assert_eq!(chunks.iter().map(|c| c.len()).sum::<usize>(), 100);
}

#[test]
fn refused_batches_are_refused_before_any_read() {
    let mut other = msg("c", 1, "a", "x", 1);
    let same = other.clone();
    other.body = "different".into();
    let err = conflict_within(&[
        Change::message(same.clone(), vec![]),
        Change::message(same.clone(), vec![]),
        Change::message(other, vec![]),
    ])
    .unwrap_err();
    assert!(matches!(err, StoreError::Conflict { ref conv, seq: 1 } if conv == "c"));
    conflict_within(&[
        Change::message(same.clone(), vec![]),
        Change::message(same, vec![]),
    ])
    .unwrap();

    let mut too_big = msg("c", 1, "a", "x", 1);
    too_big.seq = u64::MAX;
    let err = validate_limits(&[Change::message(too_big, vec![])]).unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Invalid);
    let far = msg("c", 1, "a", "x", u64::MAX);
    validate_limits(&[Change::message(far.clone(), vec![])]).unwrap();
    let err = validate_limits(&[Change::message(far, users(&["a"]))]).unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Invalid);
}

/// A model of the server's cells: each cell keeps the write with the highest timestamp; on a
/// tie a deletion wins, then the greater value (Cassandra's and ScyllaDB's rule).
#[derive(Default, Debug, PartialEq)]
struct Cells(BTreeMap<String, (i64, Option<String>)>);

impl Cells {
    fn put(&mut self, key: String, ts: i64, value: Option<String>) {
        let e = self.0.entry(key).or_insert((i64::MIN, None));
        let wins = ts > e.0 || (ts == e.0 && (value.is_none() || (e.1.is_some() && value > e.1)));
        if wins {
            *e = (ts, value);
        }
    }

    fn apply(&mut self, plan: &Plan) {
        for w in plan.partitions.values().flatten() {
            let v = w.values();
            let show = |i: usize| v[i].as_ref().map(|c| format!("{c:?}"));
            let ts = |i: usize| match v[i] {
                Some(CqlValue::BigInt(t)) => t,
                _ => panic!("timestamp"),
            };
            match w {
                Write::Latest { conv, .. } => self.put(format!("latest/{conv}"), ts(0), show(1)),
                Write::ConvPos { conv, .. } => self.put(format!("pos/{conv}"), ts(0), show(1)),
                Write::UserPos { user, conv, .. } => {
                    self.put(format!("upos/{user}/{conv}"), ts(0), show(1))
                }
                Write::Delivered { conv, user, .. } => {
                    self.put(format!("dlv/{conv}/{user}"), ts(0), show(1))
                }
                Write::Read { conv, user, .. } => {
                    self.put(format!("read/{conv}/{user}"), ts(0), show(1))
                }
                Write::ClientId {
                    conv,
                    from,
                    client_id,
                    ..
                } => self.put(format!("cid/{conv}/{from}/{client_id}"), ts(4), show(3)),
                Write::FeedInsert {
                    user, pos, conv, ..
                } => self.put(
                    format!("feed/{user}/{pos:020}/{conv}"),
                    ts(3),
                    Some("row".into()),
                ),
                Write::FeedDelete {
                    user, pos, conv, ..
                } => self.put(format!("feed/{user}/{pos:020}/{conv}"), ts(0), None),
                _ => {}
            }
        }
    }

    fn live(&self, prefix: &str) -> Vec<(&str, &str)> {
        self.0
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .filter_map(|(k, (_, v))| Some((k.as_str(), v.as_deref()?)))
            .collect()
    }
}

/// Plans `batches` in order against the model, with the position reads a real store would
/// make (`known.positions` from the model's `upos` cells).
fn run(batches: &[Vec<Change>]) -> Cells {
    let mut cells = Cells::default();
    for batch in batches {
        let mut known = Known::default();
        for (user, conv) in plan::moved_entries(batch) {
            if let Some((_, Some(v))) = cells.0.get(&format!("upos/{user}/{conv}")) {
                let pos = v.trim_start_matches("BigInt(").trim_end_matches(')');
                known.positions.insert((user, conv), pos.parse().unwrap());
            }
        }
        cells.apply(&plan::plan(batch, &known));
    }
    cells
}

#[test]
fn replays_and_late_batches_converge_to_the_same_cells() {
    let a = vec![dm(1, "alice", 10), dm(2, "bob", 11)];
    let b = vec![
        Change::receipt(
            rcpt("dm~alice~bob", "bob", 2, 2, 12),
            users(&["alice", "bob"]),
        ),
        dm(3, "alice", 13),
    ];
    let c = vec![dm(4, "bob", 20)];
    let in_order = run(&[a.clone(), b.clone(), c.clone()]);
    for order in [
        vec![a.clone(), b.clone(), c.clone(), a.clone(), b.clone()],
        vec![a.clone(), b.clone(), b.clone(), c.clone()],
        vec![c.clone(), a.clone(), b.clone()],
        vec![b.clone(), c.clone(), a.clone(), c.clone()],
    ] {
        let cells = run(&order);
        for prefix in ["latest/", "pos/", "upos/", "dlv/", "read/", "cid/"] {
            assert_eq!(cells.live(prefix), in_order.live(prefix), "{prefix}");
        }
        // Whatever the order, every user's feed ends with a row at the latest position.
        for user in ["alice", "bob"] {
            let rows = cells.live(&format!("feed/{user}/"));
            assert!(
                rows.iter()
                    .any(|(k, _)| k.contains("/00000000000000000020/")),
                "{user}: {rows:?}"
            );
        }
    }
    // In stream order, moving entries leaves exactly one feed row per user and conversation.
    assert_eq!(
        in_order.live("feed/bob/").len(),
        1,
        "{:?}",
        in_order.live("feed/")
    );
    assert_eq!(
        in_order.live("latest/"),
        [("latest/dm~alice~bob", "BigInt(4)")]
    );
    assert_eq!(
        in_order.live("dlv/dm~alice~bob/bob"),
        [("dlv/dm~alice~bob/bob", "BigInt(4)")]
    );
}

#[test]
fn a_client_id_keeps_its_first_seq_against_later_writes() {
    let first = vec![Change::message(msg("c", 1, "alice", "m1", 1), vec![])];
    let again = vec![Change::message(msg("c", 2, "alice", "m1", 2), vec![])];
    for order in [vec![first.clone(), again.clone()], vec![again, first]] {
        assert_eq!(
            run(&order).live("cid/"),
            [("cid/c/alice/m1", "BigInt(1)")],
            "the lowest stream position wins"
        );
    }
}
