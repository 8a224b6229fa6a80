//! Admission control: at most `max_handshakes` connection handshakes in progress at once.
//!
//! A handshake runs from the HTTP request to the connection's `hello`: the token check, the
//! user's subscription made live, the upgrade, and the user's group list from the sequencers.
//! When a gateway dies its clients all come back at once, to the other gateways; without a
//! bound each of those would hold a request, a socket buffer and a sequencer request at the
//! same moment. Beyond the bound a request is refused at once, before anything else is done,
//! with HTTP 503, code `overloaded` and `Retry-After` (`overloaded_retry_after_s`): cheap for
//! the gateway, and the client retries with jittered backoff (`docs/protocol.md`). A gateway at
//! `max_connections` refuses the same way.

use std::{sync::Arc, time::Duration};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::UpgradeError;

pub(crate) struct Admission {
    permits: Arc<Semaphore>,
    retry_after: Duration,
}

impl Admission {
    pub(crate) fn new(max_handshakes: usize, retry_after: Duration) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max_handshakes.max(1))),
            retry_after,
        }
    }

    /// A permit for one handshake (dropped once its `hello` is queued), or the refusal.
    pub(crate) fn try_admit(&self) -> Result<OwnedSemaphorePermit, UpgradeError> {
        self.permits
            .clone()
            .try_acquire_owned()
            .map_err(|_| self.overloaded())
    }

    /// The refusal of a gateway at one of its limits.
    pub(crate) fn overloaded(&self) -> UpgradeError {
        UpgradeError::Overloaded {
            retry_after_s: self.retry_after.as_secs().max(1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_beyond_the_limit_and_admits_again_once_a_handshake_ends() {
        let admission = Admission::new(2, Duration::from_secs(3));
        let a = admission.try_admit().unwrap();
        let _b = admission.try_admit().unwrap();
        let refused = admission.try_admit().unwrap_err();
        assert!(matches!(
            refused,
            UpgradeError::Overloaded { retry_after_s: 3 }
        ));
        drop(a);
        assert!(admission.try_admit().is_ok());
    }
}
