//! The simulated population and its traffic: users, devices, one-to-one conversations and
//! groups, who sends, who reads, who goes offline; the group operations a scenario makes (by
//! each group's admin, each waited for until it is stamped, so the harness knows every member's
//! window); and the waits that tell when everything has settled.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use chat_protocol::{
    frames::GroupOp,
    ids::{ConvId, UserId},
    membership::{Turn, turn_of},
};
use rand::{Rng, SeedableRng, rngs::StdRng};
use tokio::time::Instant;

use crate::{
    audit,
    client::{Command, Device, DeviceSpec, DeviceState, GroupCmd, Net},
};

/// A group of the population: who makes it, who is in it from the start, and who a scenario
/// may add later (their devices know the group, and see it only once added).
#[derive(Debug, Clone)]
pub struct GroupPlan {
    /// `g~<id>`.
    pub conv: String,
    pub name: String,
    /// Creates it and makes every change (its phone does).
    pub admin: String,
    /// Members besides the admin from the `create` on.
    pub founders: Vec<String>,
    /// Users a scenario may add.
    pub joiners: Vec<String>,
    /// Created while the cluster starts (else a scenario creates it).
    pub at_start: bool,
}

impl GroupPlan {
    /// Everyone who may ever be a member.
    pub fn everyone(&self) -> impl Iterator<Item = &String> {
        std::iter::once(&self.admin)
            .chain(&self.founders)
            .chain(&self.joiners)
    }
}

/// Users, conversations and devices of a simulation.
#[derive(Debug, Clone)]
pub struct Population {
    pub users: Vec<String>,
    /// `dm~<a>~<b>` ids, then the groups' `g~<id>`.
    pub convs: Vec<String>,
    pub groups: Vec<GroupPlan>,
    pub devices: Vec<DeviceSpec>,
    /// Indexes into `devices` of the devices that go offline now and then.
    pub flaky: Vec<usize>,
}

impl Population {
    /// The group plan of `conv`.
    pub fn group(&self, conv: &str) -> Option<&GroupPlan> {
        self.groups.iter().find(|g| g.conv == conv)
    }

    /// Index of `user`'s phone (the device that makes its group operations).
    pub fn phone_of(&self, user: &str) -> usize {
        self.devices
            .iter()
            .position(|d| d.user == user && d.device == "phone")
            .unwrap_or_else(|| panic!("{user} has no phone"))
    }
}

/// The conversations of `user`: its one-to-one conversations, and the groups it may ever be
/// in.
pub fn convs_of<'a>(convs: &'a [String], groups: &[GroupPlan], user: &str) -> Vec<&'a String> {
    convs
        .iter()
        .filter(|c| {
            ConvId::parse(c).is_ok_and(|id| {
                id.direct_members()
                    .into_iter()
                    .flatten()
                    .any(|m| m.as_str() == user)
            }) || groups
                .iter()
                .any(|g| g.conv == **c && g.everyone().any(|u| u == user))
        })
        .collect()
}

/// How often a sending phone creates a message (jittered ±50 %). Ten times the suite's earlier
/// traffic (about 32 msg/s) is 320 msg/s: sixteen phones at this interval offer about 600 on a
/// quiet box, and a loaded one (where every `sent` takes longer, and stop-and-wait per
/// conversation slows the senders down) still well over 320.
pub const PHONE_SEND_INTERVAL: Duration = Duration::from_millis(25);
/// How often a sending laptop creates a message.
pub const LAPTOP_SEND_INTERVAL: Duration = Duration::from_millis(150);

/// Sixteen users in forty one-to-one conversations (a ring, the ring of second neighbours, and
/// eight chords across: five per user) and three small groups (two made at the start, one a
/// scenario creates; each with users a scenario may add). The first six users have a phone
/// and a laptop, the others a phone. Every phone sends (about forty messages a second each,
/// spread over its conversations, stop-and-wait per conversation) and is its user's reading
/// device; the first two laptops send too. Half of the senders deliberately retry some
/// messages. Two laptops and three phones go offline now and then. Devices start spread over
/// `gateways` gateways.
pub fn standard_population(gateways: usize) -> Population {
    let users: Vec<String> = [
        "ann", "ben", "cat", "dan", "eve", "fay", "gus", "hal", "ivy", "jon", "kim", "lea", "max",
        "ned", "oli", "pam",
    ]
    .iter()
    .map(|u| (*u).to_owned())
    .collect();
    let n = users.len();
    let mut pairs: Vec<(usize, usize)> = (0..n).map(|i| (i, (i + 1) % n)).collect();
    pairs.extend((0..n).map(|i| (i, (i + 2) % n)));
    pairs.extend((0..n / 2).map(|i| (i, i + n / 2)));
    let mut convs: Vec<String> = pairs
        .iter()
        .map(|&(a, b)| {
            let a = UserId::parse(&users[a]).expect("user id");
            let b = UserId::parse(&users[b]).expect("user id");
            ConvId::direct(&a, &b).expect("dm id").as_str().to_owned()
        })
        .collect();
    let names = |v: &[&str]| v.iter().map(|u| (*u).to_owned()).collect::<Vec<_>>();
    let groups = vec![
        GroupPlan {
            conv: "g~alpha".into(),
            name: "Alpha".into(),
            admin: "ann".into(),
            founders: names(&["ben", "cat", "dan"]),
            joiners: names(&["eve", "fay"]),
            at_start: true,
        },
        GroupPlan {
            conv: "g~beta".into(),
            name: "Beta".into(),
            admin: "gus".into(),
            founders: names(&["hal", "ivy", "pam"]),
            joiners: names(&["jon", "oli"]),
            at_start: true,
        },
        GroupPlan {
            conv: "g~gamma".into(),
            name: "Gamma".into(),
            admin: "kim".into(),
            founders: names(&["lea", "max", "ann"]),
            joiners: names(&["ned"]),
            at_start: false,
        },
    ];
    convs.extend(groups.iter().map(|g| g.conv.clone()));
    let mut devices = Vec::new();
    let mut flaky = Vec::new();
    for (i, user) in users.iter().enumerate() {
        let mine: Vec<String> = convs_of(&convs, &groups, user)
            .into_iter()
            .cloned()
            .collect();
        let names: &[&str] = if i < 6 {
            &["phone", "laptop"]
        } else {
            &["phone"]
        };
        for name in names {
            let phone = *name == "phone";
            let index = devices.len();
            let retries = index % 2 == 0;
            devices.push(DeviceSpec {
                user: user.clone(),
                device: (*name).to_owned(),
                convs: mine.clone(),
                sends: phone || i < 2,
                send_interval: if phone {
                    PHONE_SEND_INTERVAL
                } else {
                    LAPTOP_SEND_INTERVAL
                },
                window: 1,
                dup_before_ack: if retries { 0.1 } else { 0.0 },
                dup_after_ack: if retries { 0.1 } else { 0.0 },
                reader: phone,
                reads_during_traffic: phone && i % 2 == 0,
                first_gateway: index % gateways.max(1),
                seed: 0x5eed_0000 + index as u64,
            });
            let goes_offline = (!phone && (i == 2 || i == 3)) || (phone && i >= 13);
            if goes_offline {
                flaky.push(index);
            }
        }
    }
    Population {
        users,
        convs,
        groups,
        devices,
        flaky,
    }
}

/// One member's window in a group, as the harness made it: the seq of the event that added
/// it, and of the one that removed it.
pub type Window = (u64, Option<u64>);

/// A group operation handed to the admin's device, not yet seen stamped.
#[derive(Debug, Clone)]
pub struct PendingOp {
    pub cmd: GroupCmd,
    pub from: String,
}

/// Every device of a population, running.
pub struct Simulation {
    pub population: Population,
    pub net: Arc<Net>,
    pub devices: Vec<Device>,
    /// Per group, each user's window as the harness made it (from the stamped events).
    pub members: BTreeMap<String, BTreeMap<String, Window>>,
    /// Per group, its stamped messages read so far.
    logs: BTreeMap<String, audit::ConvLog>,
    next_op: u64,
    chaos: Arc<AtomicBool>,
    chaos_tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Simulation {
    /// Starts every device (they connect at once). Sending starts disabled.
    pub fn start(population: Population, gateways: Vec<String>, secret: &[u8]) -> Self {
        let net = Arc::new(Net {
            gateways,
            secret: secret.to_vec(),
            sending: AtomicBool::new(false),
        });
        let devices = population
            .devices
            .iter()
            .map(|spec| Device::spawn(spec.clone(), net.clone()))
            .collect();
        let members = population
            .groups
            .iter()
            .map(|g| (g.conv.clone(), BTreeMap::new()))
            .collect();
        Self {
            population,
            net,
            devices,
            members,
            logs: BTreeMap::new(),
            next_op: 0,
            chaos: Arc::new(AtomicBool::new(false)),
            chaos_tasks: Vec::new(),
        }
    }

    /// Senders create new messages while `on`.
    pub fn set_sending(&self, on: bool) {
        self.net.sending.store(on, Ordering::Relaxed);
    }

    /// Starts taking the flaky devices offline for 2–4 s every few seconds.
    pub fn start_chaos(&mut self) {
        self.chaos.store(true, Ordering::Relaxed);
        for (k, &i) in self.population.flaky.iter().enumerate() {
            let commands = self.devices[i].command_sender();
            let chaos = self.chaos.clone();
            let mut rng = StdRng::seed_from_u64(0xc4a0_0000 + k as u64);
            self.chaos_tasks.push(tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(rng.random_range(300..2500))).await;
                while chaos.load(Ordering::Relaxed) {
                    let offline = Duration::from_millis(rng.random_range(2000..4000));
                    let _ = commands.send(Command::Offline(offline));
                    let online = Duration::from_millis(rng.random_range(1500..3500));
                    tokio::time::sleep(offline + online).await;
                }
            }));
        }
    }

    /// Stops taking devices offline (those offline come back when their time is up).
    pub async fn stop_chaos(&mut self) {
        self.chaos.store(false, Ordering::Relaxed);
        for t in self.chaos_tasks.drain(..) {
            t.abort();
            let _ = t.await;
        }
    }

    /// Sends `c` to every device.
    pub fn broadcast(&self, c: Command) {
        for d in &self.devices {
            d.command(c.clone());
        }
    }

    /// Messages created but not acknowledged, over all devices.
    pub fn pending(&self) -> usize {
        self.devices.iter().map(|d| d.lock().pending()).sum()
    }

    /// Stops every device and returns what each recorded.
    pub async fn stop(mut self) -> Vec<DeviceState> {
        self.stop_chaos().await;
        let mut out = Vec::new();
        for d in self.devices {
            out.push(d.stop().await);
        }
        out
    }

    /// The conversations that exist: every one-to-one conversation, and the groups created
    /// so far.
    fn existing_convs(&self) -> Vec<String> {
        self.population
            .convs
            .iter()
            .filter(|c| self.members.get(*c).is_none_or(|m| !m.is_empty()))
            .cloned()
            .collect()
    }

    /// Has the group's admin make a group operation (like a send: pending until `sent`,
    /// retried with the same id), without waiting for it to be stamped. Before a `remove`,
    /// the removed users stop creating messages in the group and every message they created
    /// there is acknowledged first (waits at most `limit`), so everything they sent comes
    /// before their removal in the group's order and nothing of theirs can be refused.
    pub async fn start_group_op(
        &mut self,
        conv: &str,
        op: GroupOp,
        members: &[&str],
        limit: Duration,
    ) -> Result<PendingOp, String> {
        let plan = self
            .population
            .group(conv)
            .ok_or_else(|| format!("{conv} is not a group of the population"))?
            .clone();
        let members: Vec<String> = match op {
            GroupOp::Create => plan.founders.clone(),
            _ => members.iter().map(|m| (*m).to_owned()).collect(),
        };
        if op == GroupOp::Remove {
            let devices: Vec<&Device> = self
                .devices
                .iter()
                .filter(|d| members.contains(&d.lock().spec.user))
                .collect();
            for d in &devices {
                d.command(Command::Mute(conv.to_owned()));
            }
            let deadline = Instant::now() + limit;
            while devices.iter().any(|d| d.lock().pending_in(conv) > 0) {
                if Instant::now() >= deadline {
                    return Err(format!(
                        "{members:?} still have unacknowledged messages in {conv} after {limit:?}"
                    ));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        self.next_op += 1;
        let cmd = GroupCmd {
            conv: conv.to_owned(),
            id: format!("op-{}-{}", conv.trim_start_matches("g~"), self.next_op),
            op,
            name: (op == GroupOp::Create).then(|| plan.name.clone()),
            members,
        };
        self.devices[self.population.phone_of(&plan.admin)].command(Command::Group(cmd.clone()));
        Ok(PendingOp {
            cmd,
            from: plan.admin.clone(),
        })
    }

    /// Waits (at most `limit`) until `op` is stamped, records the windows it opens or closes,
    /// and returns its seq.
    pub async fn wait_group_op(
        &mut self,
        js: &async_nats::jetstream::Context,
        op: &PendingOp,
        limit: Duration,
    ) -> Result<u64, String> {
        let conv = op.cmd.conv.clone();
        let deadline = Instant::now() + limit;
        let stamped = loop {
            let log = match self.logs.entry(conv.clone()) {
                std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::btree_map::Entry::Vacant(e) => {
                    match audit::ConvLog::new(js, &conv).await {
                        Ok(log) => e.insert(log),
                        Err(err) => return Err(err),
                    }
                }
            };
            if let Err(err) = log.read_new().await {
                eprintln!("reading {conv}: {err}");
            }
            let found = log
                .messages
                .iter()
                .find(|m| m.from == op.from && m.id == op.cmd.id)
                .cloned();
            if let Some(m) = found {
                break m;
            }
            if Instant::now() >= deadline {
                return Err(format!("{} was not stamped within {limit:?}", op.cmd.id));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let Some(event) = &stamped.event else {
            return Err(format!("{} was stamped without an event", op.cmd.id));
        };
        let plan = self.population.group(&conv).expect("a group").clone();
        let windows = self.members.entry(conv.clone()).or_default();
        for user in plan.everyone() {
            match turn_of(event, &stamped.from, user) {
                Some(Turn::Joined) => {
                    windows.insert(user.clone(), (stamped.seq, None));
                }
                Some(Turn::Left) => {
                    if let Some(w) = windows.get_mut(user) {
                        w.1 = Some(stamped.seq);
                    }
                }
                None => {}
            }
        }
        Ok(stamped.seq)
    }

    /// Creates the groups made at the start, and waits until each is stamped.
    pub async fn create_start_groups(
        &mut self,
        js: &async_nats::jetstream::Context,
        limit: Duration,
    ) -> Result<(), String> {
        let mut ops = Vec::new();
        let convs: Vec<String> = self
            .population
            .groups
            .iter()
            .filter(|g| g.at_start)
            .map(|g| g.conv.clone())
            .collect();
        for conv in convs {
            ops.push(
                self.start_group_op(&conv, GroupOp::Create, &[], limit)
                    .await?,
            );
        }
        for op in &ops {
            self.wait_group_op(js, op, limit).await?;
        }
        Ok(())
    }

    /// The seq range `user` should have of `conv` once settled, given its newest stamped seq:
    /// `None` if the user is not to see it at all (a group it was never added to).
    fn wanted(&self, conv: &str, user: &str, latest: u64) -> Option<u64> {
        match self.members.get(conv) {
            None => Some(latest),
            Some(windows) => windows
                .get(user)
                .map(|(_, left)| left.unwrap_or(latest).min(latest)),
        }
    }

    /// The users `user`'s devices should see the watermarks of in `conv` once settled (every
    /// member, while the user is one itself).
    fn marks_wanted(&self, conv: &str, user: &str) -> Vec<String> {
        match self.members.get(conv) {
            None => ConvId::parse(conv)
                .ok()
                .and_then(|id| id.direct_members().cloned())
                .map(|pair| pair.iter().map(|u| u.as_str().to_owned()).collect())
                .unwrap_or_default(),
            Some(windows) => {
                let current = |u: &str| windows.get(u).is_some_and(|(_, left)| left.is_none());
                if !current(user) {
                    return Vec::new();
                }
                windows.keys().filter(|u| current(u)).cloned().collect()
            }
        }
    }

    /// Waits until every conversation that exists has at least one stamped message.
    pub async fn wait_every_conv_stamped(
        &self,
        js: &async_nats::jetstream::Context,
        limit: Duration,
    ) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        let convs = self.existing_convs();
        loop {
            let latest = audit::latest_seqs(js, &convs).await;
            if let Ok(latest) = &latest
                && latest.values().all(|s| *s > 0)
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "not every conversation got a message within {limit:?}: {latest:?}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// What is still missing for the message phase to be settled, given each conversation's
    /// newest stamped seq: pending sends, offline devices, devices behind.
    fn message_lag(&self, latest: &BTreeMap<String, u64>) -> Vec<String> {
        let mut lag = Vec::new();
        for d in &self.devices {
            let st = d.lock();
            if st.pending() > 0 {
                lag.push(format!("{} has {} pending sends", st.name(), st.pending()));
            }
            if !st.online {
                lag.push(format!("{} is offline", st.name()));
            }
            for (conv, view) in &st.convs {
                let newest = latest.get(conv).copied().unwrap_or(0);
                let want = self.wanted(conv, &st.spec.user, newest).unwrap_or(0);
                if view.contiguous != want {
                    lag.push(format!(
                        "{} has {conv} up to {} of {want}",
                        st.name(),
                        view.contiguous
                    ));
                }
            }
        }
        lag
    }

    /// Waits until no send is pending, every device is online and every device has every
    /// stamped message of its conversations (of groups: of its window). Devices that are
    /// behind are told to sync every two seconds (pushes are best effort). Returns what was
    /// still missing at the deadline.
    pub async fn settle_messages(
        &self,
        js: &async_nats::jetstream::Context,
        limit: Duration,
    ) -> Result<(), Vec<String>> {
        let deadline = Instant::now() + limit;
        let mut next_nudge = Instant::now() + Duration::from_secs(2);
        loop {
            let lag = match audit::latest_seqs(js, &self.population.convs).await {
                Ok(latest) => self.message_lag(&latest),
                Err(e) => vec![e],
            };
            if lag.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(lag);
            }
            if Instant::now() >= next_nudge {
                next_nudge = Instant::now() + Duration::from_secs(2);
                for d in &self.devices {
                    let behind = {
                        let st = d.lock();
                        st.online && !st.syncing() && lag.iter().any(|l| l.starts_with(&st.name()))
                    };
                    if behind {
                        d.command(Command::Sync);
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Has every reading device send the final `read` of its conversations, then waits until
    /// every device sees every member of its conversations (of groups it is in: every current
    /// member) at (latest, latest). Stragglers are told to sync, and the final reads are
    /// repeated (receipts are idempotent), every two seconds. Returns what was still different
    /// at the deadline.
    pub async fn settle_receipts(
        &self,
        js: &async_nats::jetstream::Context,
        limit: Duration,
    ) -> Result<(), Vec<String>> {
        let deadline = Instant::now() + limit;
        let readers: Vec<&Device> = self
            .devices
            .iter()
            .filter(|d| d.lock().spec.reader)
            .collect();
        for d in &readers {
            d.command(Command::FinalRead);
        }
        let mut next_nudge = Instant::now() + Duration::from_secs(2);
        loop {
            let mut lag = Vec::new();
            match audit::latest_seqs(js, &self.population.convs).await {
                Ok(latest) => {
                    for d in &self.devices {
                        let st = d.lock();
                        for (conv, view) in &st.convs {
                            let want = latest.get(conv).copied().unwrap_or(0);
                            for member in self.marks_wanted(conv, &st.spec.user) {
                                let seen = view.marks.get(&member).copied();
                                if seen.unwrap_or((0, 0)) != (want, want) {
                                    lag.push(format!(
                                        "{} sees {member} at {seen:?} in {conv}, latest {want}",
                                        st.name()
                                    ));
                                }
                            }
                        }
                    }
                }
                Err(e) => lag.push(e),
            }
            if lag.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(lag);
            }
            if Instant::now() >= next_nudge {
                next_nudge = Instant::now() + Duration::from_secs(2);
                for d in &readers {
                    d.command(Command::FinalRead);
                }
                for d in &self.devices {
                    let idle = {
                        let st = d.lock();
                        st.online && !st.syncing()
                    };
                    if idle {
                        d.command(Command::Sync);
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
