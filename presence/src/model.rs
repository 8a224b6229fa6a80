//! What one presence replica knows, in memory: every user's devices per gateway (from the KV
//! bucket, through a watch), their last seen and settings, and which gateways watch which
//! users (from the gateways' reports). Every replica builds the same view; pure data, no I/O.

use std::{collections::HashMap, sync::Arc};

use chat_protocol::frames::PresenceState;

/// One user's presence as stored.
#[derive(Debug, Default, Clone)]
struct User {
    /// Gateways with a device of the user, and when their key was last written (ms).
    on: Vec<(Arc<str>, u64)>,
    seen: Option<u64>,
    hide_last_seen: bool,
}

impl User {
    fn is_empty(&self) -> bool {
        self.on.is_empty() && self.seen.is_none() && !self.hide_last_seen
    }
}

/// The replica's view.
#[derive(Debug, Default)]
pub struct Model {
    users: HashMap<String, User>,
    /// Gateway ids, shared by every entry naming them.
    gateways: HashMap<String, Arc<str>>,
    /// Watched user → gateway → when the gateway last said it watches the user (ms).
    watchers: HashMap<String, HashMap<Arc<str>, u64>>,
}

impl Model {
    fn gateway(&mut self, id: &str) -> Arc<str> {
        // Looked up first: every heartbeat refresh comes through here, and `entry` would
        // allocate the key each time.
        if let Some(gw) = self.gateways.get(id) {
            return gw.clone();
        }
        let gw: Arc<str> = Arc::from(id);
        self.gateways.insert(id.to_owned(), gw.clone());
        gw
    }

    /// What `user`'s contacts see now.
    pub fn state(&self, user: &str) -> PresenceState {
        let u = self.users.get(user);
        let online = u.is_some_and(|u| !u.on.is_empty());
        let last_seen = match u {
            Some(u) if !online && !u.hide_last_seen => u.seen,
            _ => None,
        };
        PresenceState {
            user: user.to_owned(),
            online,
            last_seen,
        }
    }

    /// Whether `user` has a device connected anywhere.
    pub fn is_online(&self, user: &str) -> bool {
        self.users.get(user).is_some_and(|u| !u.on.is_empty())
    }

    pub fn hides_last_seen(&self, user: &str) -> bool {
        self.users.get(user).is_some_and(|u| u.hide_last_seen)
    }

    /// The gateways `user` is online at, with the time each key was last written.
    pub fn online_at(&self, user: &str) -> Vec<(String, u64)> {
        self.users
            .get(user)
            .map(|u| u.on.iter().map(|(g, t)| (g.to_string(), *t)).collect())
            .unwrap_or_default()
    }

    /// `on.<user>.<gateway>` was written at `ts`.
    pub fn set_online(&mut self, user: &str, gateway: &str, ts: u64) {
        if let Some(entry) = self
            .users
            .get_mut(user)
            .and_then(|u| u.on.iter_mut().find(|(g, _)| &**g == gateway))
        {
            entry.1 = ts;
            return;
        }
        let gw = self.gateway(gateway);
        self.users
            .entry(user.to_owned())
            .or_default()
            .on
            .push((gw, ts));
    }

    /// `on.<user>.<gateway>` is gone; returns when it was last written, if it was there.
    pub fn remove_online(&mut self, user: &str, gateway: &str) -> Option<u64> {
        let u = self.users.get_mut(user)?;
        let i = u.on.iter().position(|(g, _)| &**g == gateway)?;
        let (_, ts) = u.on.swap_remove(i);
        if u.is_empty() {
            self.users.remove(user);
        }
        Some(ts)
    }

    pub fn set_seen(&mut self, user: &str, seen: Option<u64>) {
        let u = self.users.entry(user.to_owned()).or_default();
        u.seen = seen;
        if u.is_empty() {
            self.users.remove(user);
        }
    }

    pub fn set_hide_last_seen(&mut self, user: &str, hide: bool) {
        let u = self.users.entry(user.to_owned()).or_default();
        u.hide_last_seen = hide;
        if u.is_empty() {
            self.users.remove(user);
        }
    }

    /// Gateway `gateway` watches `user` (heard at `now`).
    pub fn watch(&mut self, gateway: &str, user: &str, now: u64) {
        if let Some(heard) = self.watchers.get_mut(user).and_then(|w| w.get_mut(gateway)) {
            *heard = now;
            return;
        }
        let gw = self.gateway(gateway);
        self.watchers
            .entry(user.to_owned())
            .or_default()
            .insert(gw, now);
    }

    /// Gateway `gateway` no longer watches `user`.
    pub fn unwatch(&mut self, gateway: &str, user: &str) {
        if let Some(w) = self.watchers.get_mut(user) {
            w.remove(gateway);
            if w.is_empty() {
                self.watchers.remove(user);
            }
        }
    }

    /// The gateways watching `user`.
    pub fn watchers(&self, user: &str) -> Vec<Arc<str>> {
        self.watchers
            .get(user)
            .map(|w| w.keys().cloned().collect())
            .unwrap_or_default()
    }

    pub fn is_watched(&self, user: &str) -> bool {
        self.watchers.contains_key(user)
    }

    /// Forgets watches not confirmed since `before` (a gateway that crashed, or an `unwatch`
    /// that was lost); returns how many went.
    pub fn expire_watches(&mut self, before: u64) -> usize {
        let mut gone = 0;
        self.watchers.retain(|_, gws| {
            let n = gws.len();
            gws.retain(|_, heard| *heard >= before);
            gone += n - gws.len();
            !gws.is_empty()
        });
        gone
    }

    /// Users with a device connected anywhere.
    pub fn online_users(&self) -> usize {
        self.users.values().filter(|u| !u.on.is_empty()).count()
    }

    /// (watched user, gateway) pairs.
    pub fn watch_count(&self) -> usize {
        self.watchers.values().map(HashMap::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn online_while_any_gateway_has_a_device_then_last_seen() {
        let mut m = Model::default();
        assert_eq!(
            m.state("bob"),
            PresenceState {
                user: "bob".into(),
                online: false,
                last_seen: None
            }
        );
        m.set_online("bob", "gw1", 10);
        m.set_online("bob", "gw2", 11);
        m.set_seen("bob", Some(5));
        assert!(m.state("bob").online);
        assert_eq!(m.state("bob").last_seen, None, "no last seen while online");
        assert_eq!(m.remove_online("bob", "gw1"), Some(10));
        assert!(m.state("bob").online, "still on gw2");
        assert_eq!(m.remove_online("bob", "gw1"), None);
        m.set_seen("bob", Some(20));
        assert_eq!(m.remove_online("bob", "gw2"), Some(11));
        assert_eq!(
            m.state("bob"),
            PresenceState {
                user: "bob".into(),
                online: false,
                last_seen: Some(20)
            }
        );
        m.set_hide_last_seen("bob", true);
        assert_eq!(m.state("bob").last_seen, None, "hidden");
        m.set_hide_last_seen("bob", false);
        m.set_seen("bob", None);
        assert!(m.users.is_empty(), "nothing kept for a user with nothing");
    }

    #[test]
    fn watches_expire_unless_confirmed() {
        let mut m = Model::default();
        m.watch("gw1", "bob", 100);
        m.watch("gw2", "bob", 100);
        m.watch("gw1", "carol", 100);
        assert_eq!(m.watch_count(), 3);
        m.watch("gw1", "bob", 200);
        m.watch("gw1", "carol", 200);
        assert_eq!(m.expire_watches(150), 1, "gw2 went quiet");
        assert_eq!(&*m.watchers("bob")[0], "gw1");
        m.unwatch("gw1", "carol");
        assert!(!m.is_watched("carol"));
        assert!(m.is_watched("bob"));
    }
}
