//! The simulated population and its traffic: users, devices, one-to-one conversations, who
//! sends, who reads, who goes offline; and the waits that tell when everything has settled.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use chat_protocol::ids::{ConvId, UserId};
use rand::{Rng, SeedableRng, rngs::StdRng};
use tokio::time::Instant;

use crate::{
    audit,
    client::{Command, Device, DeviceSpec, DeviceState, Net},
};

/// Users, conversations and devices of a simulation.
#[derive(Debug, Clone)]
pub struct Population {
    pub users: Vec<String>,
    /// `dm~<a>~<b>` ids.
    pub convs: Vec<String>,
    pub devices: Vec<DeviceSpec>,
    /// Indexes into `devices` of the devices that go offline now and then.
    pub flaky: Vec<usize>,
}

/// The conversations of `user`.
pub fn convs_of<'a>(convs: &'a [String], user: &str) -> Vec<&'a String> {
    convs
        .iter()
        .filter(|c| {
            ConvId::parse(c).is_ok_and(|id| {
                id.direct_members()
                    .into_iter()
                    .flatten()
                    .any(|m| m.as_str() == user)
            })
        })
        .collect()
}

/// Ten users in fifteen conversations (a ring of ten plus five chords, three per user); the
/// first four users have a phone and a laptop, the others a phone. Every phone sends (about
/// three messages a second each) and is its user's reading device; the first two laptops send
/// too. Half of the senders deliberately retry some messages. Two laptops and two phones go
/// offline now and then. Devices start spread over `gateways` gateways.
pub fn standard_population(gateways: usize) -> Population {
    let users: Vec<String> = [
        "ann", "ben", "cat", "dan", "eve", "fay", "gus", "hal", "ivy", "jon",
    ]
    .iter()
    .map(|u| (*u).to_owned())
    .collect();
    let n = users.len();
    let mut pairs: Vec<(usize, usize)> = (0..n).map(|i| (i, (i + 1) % n)).collect();
    pairs.extend((0..n / 2).map(|i| (i, i + n / 2)));
    let convs: Vec<String> = pairs
        .iter()
        .map(|&(a, b)| {
            let a = UserId::parse(&users[a]).expect("user id");
            let b = UserId::parse(&users[b]).expect("user id");
            ConvId::direct(&a, &b).expect("dm id").as_str().to_owned()
        })
        .collect();
    let mut devices = Vec::new();
    let mut flaky = Vec::new();
    for (i, user) in users.iter().enumerate() {
        let mine: Vec<String> = convs_of(&convs, user).into_iter().cloned().collect();
        let names: &[&str] = if i < 4 {
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
                    Duration::from_millis(300)
                } else {
                    Duration::from_millis(1000)
                },
                window: 1,
                dup_before_ack: if retries { 0.1 } else { 0.0 },
                dup_after_ack: if retries { 0.1 } else { 0.0 },
                reader: phone,
                reads_during_traffic: phone && i % 2 == 0,
                first_gateway: index % gateways.max(1),
                seed: 0x5eed_0000 + index as u64,
            });
            let goes_offline = (!phone && (i == 2 || i == 3)) || (phone && i >= 8);
            if goes_offline {
                flaky.push(index);
            }
        }
    }
    Population {
        users,
        convs,
        devices,
        flaky,
    }
}

/// Every device of a population, running.
pub struct Simulation {
    pub population: Population,
    pub net: Arc<Net>,
    pub devices: Vec<Device>,
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
        Self {
            population,
            net,
            devices,
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
            d.command(c);
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

    /// Waits until every conversation has at least one stamped message.
    pub async fn wait_every_conv_stamped(
        &self,
        js: &async_nats::jetstream::Context,
        limit: Duration,
    ) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        loop {
            let latest = audit::latest_seqs(js, &self.population.convs).await;
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
                let want = latest.get(conv).copied().unwrap_or(0);
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
    /// stamped message of its conversations. Devices that are behind are told to sync every
    /// two seconds (pushes are best effort). Returns what was still missing at the deadline.
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
    /// every device sees every member of its conversations at (latest, latest). Stragglers are
    /// told to sync, and the final reads are repeated (receipts are idempotent), every two
    /// seconds. Returns what was still different at the deadline.
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
                            let id = ConvId::parse(conv).expect("conv id");
                            for member in id.direct_members().into_iter().flatten() {
                                let seen = view.marks.get(member.as_str()).copied();
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
