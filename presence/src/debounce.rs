//! Debounced, coalesced pushes of presence changes.
//!
//! A change of a watched user's presence is not pushed at once: it waits `debounce` (more
//! changes of the same user meanwhile join it), and two pushes of one user are at least
//! `min_interval` apart. When the wait is over, the user's state *then* is compared with the
//! last state pushed for it, and pushed only if it differs: a connection that drops and comes
//! back within the wait (a flapping phone) pushes nothing at all. So each user costs its
//! watchers at most one push per `min_interval`, however often its devices come and go.
//!
//! One push per gateway per tick: every due user's new state goes to the gateways that watch
//! it, batched into one [`PresencePush`] per gateway.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    future::Future,
    sync::{Arc, Mutex},
    time::Duration,
};

use chat_protocol::{api::PresencePush, frames::PresenceState};
use tokio::{sync::Notify, time::Instant};
use tokio_util::sync::CancellationToken;

use crate::model::Model;

/// How long a pushed state is remembered for coalescing.
const REMEMBER: Duration = Duration::from_secs(300);

/// Which users are due to be pushed, and what was pushed last.
#[derive(Debug)]
pub struct Debouncer {
    debounce: Duration,
    min_interval: Duration,
    due: BTreeSet<(Instant, String)>,
    pending: HashMap<String, Instant>,
    /// The last state pushed of each user, and when (`None`: not pushed, only what watchers
    /// had seen before the first change: see [`Debouncer::baseline`]).
    last: HashMap<String, (PresenceState, Option<Instant>)>,
}

impl Debouncer {
    pub fn new(debounce: Duration, min_interval: Duration) -> Self {
        Self {
            debounce,
            min_interval,
            due: BTreeSet::new(),
            pending: HashMap::new(),
            last: HashMap::new(),
        }
    }

    /// `user`'s presence may have changed at `now`.
    pub fn touch(&mut self, user: &str, now: Instant) {
        if self.pending.contains_key(user) {
            return;
        }
        let mut at = now + self.debounce;
        if let Some((_, Some(sent))) = self.last.get(user) {
            at = at.max(*sent + self.min_interval);
        }
        self.pending.insert(user.to_owned(), at);
        self.due.insert((at, user.to_owned()));
    }

    /// When the next user is due.
    pub fn next_due(&self) -> Option<Instant> {
        self.due.first().map(|(at, _)| *at)
    }

    /// The users due at `now`.
    pub fn take_due(&mut self, now: Instant) -> Vec<String> {
        let mut out = Vec::new();
        while let Some((at, _)) = self.due.first() {
            if *at > now {
                break;
            }
            let (_, user) = self.due.pop_first().expect("first exists");
            self.pending.remove(&user);
            out.push(user);
        }
        out
    }

    /// What watchers saw of a user before its first change since it was last remembered:
    /// the state a push is compared with when nothing was pushed yet (so a user that drops and
    /// comes back before its first push pushes nothing).
    pub fn baseline(&mut self, state: PresenceState) {
        self.last.entry(state.user.clone()).or_insert((state, None));
    }

    /// Whether `state` must be pushed (it differs from the last one pushed); records it.
    pub fn decide(&mut self, state: &PresenceState, now: Instant) -> bool {
        if let Some((last, _)) = self.last.get(&state.user)
            && last == state
        {
            return false;
        }
        self.last
            .insert(state.user.clone(), (state.clone(), Some(now)));
        true
    }

    /// Forgets pushed states older than [`REMEMBER`] (a later change is then pushed even if it
    /// equals what was pushed long ago; harmless).
    pub fn prune(&mut self, now: Instant) {
        let pending = &self.pending;
        self.last.retain(|user, (_, sent)| {
            pending.contains_key(user)
                || sent.is_some_and(|sent| now.saturating_duration_since(sent) < REMEMBER)
        });
    }

    pub fn pending(&self) -> usize {
        self.pending.len()
    }
}

/// The model and the debouncer, behind one lock.
pub struct State {
    pub model: Model,
    pub debouncer: Debouncer,
}

/// Pushes due users' states until `stop`: waits for the next due time (or `wake`, when a user
/// was touched), then publishes one [`PresencePush`] per watching gateway with `publish`.
pub async fn run<P, Fut>(
    state: Arc<Mutex<State>>,
    wake: Arc<Notify>,
    mut publish: P,
    stop: CancellationToken,
) where
    P: FnMut(String, PresencePush) -> Fut,
    Fut: Future<Output = ()>,
{
    let mut pruned = Instant::now();
    loop {
        let next = state.lock().unwrap().debouncer.next_due();
        let sleep = async {
            match next {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = wake.notified() => continue,
            _ = sleep => {}
        }
        let now = Instant::now();
        let batches = {
            let mut st = state.lock().unwrap();
            let State { model, debouncer } = &mut *st;
            let mut batches: BTreeMap<Arc<str>, PresencePush> = BTreeMap::new();
            for user in debouncer.take_due(now) {
                let watchers = model.watchers(&user);
                if watchers.is_empty() {
                    continue;
                }
                let s = model.state(&user);
                if !debouncer.decide(&s, now) {
                    metrics::counter!(crate::metrics::COALESCED).increment(1);
                    continue;
                }
                for gw in watchers {
                    batches.entry(gw).or_default().users.push(s.clone());
                }
            }
            if now.duration_since(pruned) > REMEMBER {
                debouncer.prune(now);
                pruned = now;
            }
            batches
        };
        for (gw, push) in batches {
            metrics::counter!(crate::metrics::PUSHED_STATES).increment(push.users.len() as u64);
            publish(gw.to_string(), push).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(debounce_ms: u64, min_ms: u64) -> (Arc<Mutex<State>>, Arc<Notify>) {
        let state = State {
            model: Model::default(),
            debouncer: Debouncer::new(
                Duration::from_millis(debounce_ms),
                Duration::from_millis(min_ms),
            ),
        };
        (Arc::new(Mutex::new(state)), Arc::new(Notify::new()))
    }

    type Pushed = Arc<Mutex<Vec<(String, PresencePush)>>>;

    fn spawn(state: &Arc<Mutex<State>>, wake: &Arc<Notify>) -> (Pushed, CancellationToken) {
        let pushed: Pushed = Arc::default();
        let stop = CancellationToken::new();
        let sink = pushed.clone();
        tokio::spawn(run(
            state.clone(),
            wake.clone(),
            move |gw, push| {
                sink.lock().unwrap().push((gw, push));
                async {}
            },
            stop.clone(),
        ));
        (pushed, stop)
    }

    /// Applies a change to the model and touches the user, as the KV watch does.
    fn change(state: &Arc<Mutex<State>>, wake: &Notify, f: impl FnOnce(&mut Model), user: &str) {
        let mut st = state.lock().unwrap();
        let before = st.model.state(user);
        f(&mut st.model);
        st.debouncer.baseline(before);
        st.debouncer.touch(user, Instant::now());
        drop(st);
        wake.notify_one();
    }

    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_change_is_pushed_once_after_the_debounce_to_each_watching_gateway() {
        let (state, wake) = setup(1000, 5000);
        {
            let mut st = state.lock().unwrap();
            st.model.watch("gw1", "bob", 0);
            st.model.watch("gw2", "bob", 0);
        }
        let (pushed, _stop) = spawn(&state, &wake);
        change(&state, &wake, |m| m.set_online("bob", "gwx", 1), "bob");
        tokio::time::advance(Duration::from_millis(999)).await;
        settle().await;
        assert!(pushed.lock().unwrap().is_empty(), "not before the debounce");
        tokio::time::advance(Duration::from_millis(2)).await;
        settle().await;
        let got = pushed.lock().unwrap().clone();
        assert_eq!(got.len(), 2, "{got:?}");
        let gws: BTreeSet<&str> = got.iter().map(|(g, _)| g.as_str()).collect();
        assert_eq!(gws, BTreeSet::from(["gw1", "gw2"]));
        assert!(
            got.iter()
                .all(|(_, p)| p.users.len() == 1 && p.users[0].online)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_flapping_connection_pushes_at_most_once_per_interval_and_nothing_if_it_came_back() {
        let (state, wake) = setup(1000, 5000);
        state.lock().unwrap().model.watch("gw1", "bob", 0);
        let (pushed, _stop) = spawn(&state, &wake);
        change(&state, &wake, |m| m.set_online("bob", "gwx", 1), "bob");
        tokio::time::advance(Duration::from_millis(1001)).await;
        settle().await;
        assert_eq!(pushed.lock().unwrap().len(), 1, "online pushed");

        // Ten drops and returns within the next 5 seconds.
        for i in 0..10 {
            change(
                &state,
                &wake,
                |m| {
                    m.remove_online("bob", "gwx");
                },
                "bob",
            );
            tokio::time::advance(Duration::from_millis(200)).await;
            settle().await;
            change(&state, &wake, |m| m.set_online("bob", "gwx", i), "bob");
            tokio::time::advance(Duration::from_millis(200)).await;
            settle().await;
        }
        tokio::time::advance(Duration::from_secs(10)).await;
        settle().await;
        assert_eq!(
            pushed.lock().unwrap().len(),
            1,
            "it ended online, as last pushed: nothing more"
        );

        // Now it really goes: one push, no earlier than 5 s after the previous one.
        change(
            &state,
            &wake,
            |m| {
                m.remove_online("bob", "gwx");
            },
            "bob",
        );
        change(&state, &wake, |m| m.set_seen("bob", Some(77)), "bob");
        tokio::time::advance(Duration::from_millis(1001)).await;
        settle().await;
        let got = pushed.lock().unwrap().clone();
        assert_eq!(got.len(), 2);
        assert_eq!(
            got[1].1.users,
            vec![PresenceState {
                user: "bob".into(),
                online: false,
                last_seen: Some(77)
            }]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_user_that_drops_and_returns_before_its_first_push_pushes_nothing() {
        let (state, wake) = setup(1000, 5000);
        {
            let mut st = state.lock().unwrap();
            st.model.set_online("bob", "gwx", 1);
            st.model.watch("gw1", "bob", 0);
        }
        let (pushed, _stop) = spawn(&state, &wake);
        change(
            &state,
            &wake,
            |m| {
                m.remove_online("bob", "gwx");
            },
            "bob",
        );
        tokio::time::advance(Duration::from_millis(300)).await;
        settle().await;
        change(&state, &wake, |m| m.set_online("bob", "gwx", 2), "bob");
        tokio::time::advance(Duration::from_secs(10)).await;
        settle().await;
        assert!(
            pushed.lock().unwrap().is_empty(),
            "watchers saw him online all along"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn unwatched_users_push_nothing() {
        let (state, wake) = setup(100, 100);
        let (pushed, _stop) = spawn(&state, &wake);
        change(&state, &wake, |m| m.set_online("carol", "gwx", 1), "carol");
        tokio::time::advance(Duration::from_secs(1)).await;
        settle().await;
        assert!(pushed.lock().unwrap().is_empty());
        assert_eq!(state.lock().unwrap().debouncer.pending(), 0);
    }

    #[test]
    fn min_interval_holds_back_the_next_push() {
        let mut d = Debouncer::new(Duration::from_millis(100), Duration::from_secs(5));
        let t0 = Instant::now();
        d.touch("u", t0);
        assert_eq!(d.next_due(), Some(t0 + Duration::from_millis(100)));
        assert_eq!(d.take_due(t0 + Duration::from_millis(100)), vec!["u"]);
        let s = PresenceState {
            user: "u".into(),
            online: true,
            last_seen: None,
        };
        assert!(d.decide(&s, t0 + Duration::from_millis(100)));
        assert!(!d.decide(&s, t0 + Duration::from_millis(100)), "same state");
        d.touch("u", t0 + Duration::from_millis(200));
        assert_eq!(
            d.next_due(),
            Some(t0 + Duration::from_millis(5100)),
            "5 s after the last push"
        );
    }
}
