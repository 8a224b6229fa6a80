//! Per-user connection counting on this gateway, so one user cannot hold unbounded sockets.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use chat_protocol::ids::UserId;

use crate::metrics;

/// Open connections per user. A [`Slot`] is one connection; dropping it frees the slot.
#[derive(Clone)]
pub(crate) struct Registry {
    max_per_user: usize,
    counts: Arc<Mutex<HashMap<UserId, usize>>>,
}

/// One counted connection of a user; released on drop.
pub(crate) struct Slot {
    user: UserId,
    counts: Arc<Mutex<HashMap<UserId, usize>>>,
}

impl Registry {
    pub(crate) fn new(max_per_user: usize) -> Self {
        Self {
            max_per_user,
            counts: Arc::default(),
        }
    }

    /// A slot for `user`, or `None` when the user already has the maximum.
    pub(crate) fn try_acquire(&self, user: &UserId) -> Option<Slot> {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let count = counts.entry(user.clone()).or_insert(0);
        if *count >= self.max_per_user {
            return None;
        }
        *count += 1;
        ::metrics::gauge!(metrics::CONNECTIONS).increment(1.0);
        Some(Slot {
            user: user.clone(),
            counts: self.counts.clone(),
        })
    }

    #[cfg(test)]
    fn count(&self, user: &UserId) -> usize {
        let counts = self.counts.lock().unwrap();
        counts.get(user).copied().unwrap_or(0)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = counts.get_mut(&self.user) {
            *count -= 1;
            // Forget users without connections, so the map stays as small as the live set.
            if *count == 0 {
                counts.remove(&self.user);
            }
        }
        ::metrics::gauge!(metrics::CONNECTIONS).decrement(1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_per_user_and_frees_on_drop() {
        let reg = Registry::new(2);
        let a = UserId::parse("alice").unwrap();
        let b = UserId::parse("bob").unwrap();
        let s1 = reg.try_acquire(&a).unwrap();
        let _s2 = reg.try_acquire(&a).unwrap();
        assert!(reg.try_acquire(&a).is_none());
        assert!(reg.try_acquire(&b).is_some(), "other users are unaffected");
        drop(s1);
        assert_eq!(reg.count(&a), 1);
        assert!(reg.try_acquire(&a).is_some());
    }
}
