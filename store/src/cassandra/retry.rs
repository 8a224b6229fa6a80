//! The driver retry policy of the store: retries a request only where running it twice cannot
//! change the outcome.
//!
//! It is the driver's [`DefaultRetryPolicy`] (a broken connection, an overloaded or failing
//! node: retried on the next node only for idempotent requests; unavailable replicas, where the
//! server says it ran nothing: once on the next node; a read timeout with enough replies: once),
//! plus one retry, on the next node, of a **write timeout** of an idempotent request, whatever
//! its write type: the default retries only batch-log timeouts, but every write of this store is
//! idempotent (explicit timestamps, see `store/README.md`), so a write that timed out is
//! safe to send again. Statements not marked idempotent (the migration's DDL and its
//! `schema_migrations` insert) never get that retry.

use scylla::errors::{DbError, RequestAttemptError};
use scylla::policies::retry::{
    DefaultRetrySession, RequestInfo, RetryDecision, RetryPolicy, RetrySession,
};
use scylla::statement::Consistency;

/// See the module docs.
#[derive(Debug, Default, Clone, Copy)]
pub struct IdempotentRetryPolicy;

impl RetryPolicy for IdempotentRetryPolicy {
    fn new_session(&self) -> Box<dyn RetrySession> {
        Box::new(IdempotentRetrySession::default())
    }
}

/// The per-request state of [`IdempotentRetryPolicy`].
#[derive(Default)]
pub struct IdempotentRetrySession {
    default: DefaultRetrySession,
    write_timeout_retried: bool,
}

impl IdempotentRetrySession {
    /// Whether this failure is the write timeout of an idempotent request that gets its one
    /// extra retry (the driver's `RequestInfo` cannot be built outside it, so tests call this).
    fn retries_write_timeout(
        &mut self,
        error: &RequestAttemptError,
        is_idempotent: bool,
        consistency: Consistency,
    ) -> bool {
        let write_timeout = matches!(
            error,
            RequestAttemptError::DbError(DbError::WriteTimeout { .. }, _)
        );
        if write_timeout && is_idempotent && !consistency.is_serial() && !self.write_timeout_retried
        {
            self.write_timeout_retried = true;
            return true;
        }
        false
    }
}

impl RetrySession for IdempotentRetrySession {
    fn decide_should_retry(&mut self, info: RequestInfo) -> RetryDecision {
        if self.retries_write_timeout(info.error, info.is_idempotent, info.consistency) {
            return RetryDecision::RetryNextTarget(None);
        }
        // Everything else, write timeouts of non-idempotent requests included (the default
        // retries those only for batch-log timeouts, which this store never sends).
        self.default.decide_should_retry(info)
    }

    fn reset(&mut self) {
        self.default.reset();
        self.write_timeout_retried = false;
    }
}

#[cfg(test)]
mod tests {
    use scylla::errors::WriteType;

    use super::*;

    fn write_timeout(write_type: WriteType) -> RequestAttemptError {
        RequestAttemptError::DbError(
            DbError::WriteTimeout {
                consistency: Consistency::LocalQuorum,
                received: 1,
                required: 2,
                write_type,
            },
            "timed out".into(),
        )
    }

    #[test]
    fn idempotent_write_timeouts_are_retried_once_per_request() {
        for write_type in [WriteType::Simple, WriteType::UnloggedBatch] {
            let err = write_timeout(write_type);
            let mut s = IdempotentRetrySession::default();
            assert!(s.retries_write_timeout(&err, true, Consistency::LocalQuorum));
            assert!(!s.retries_write_timeout(&err, true, Consistency::LocalQuorum));
            s.reset();
            assert!(s.retries_write_timeout(&err, true, Consistency::LocalQuorum));
        }
    }

    #[test]
    fn other_failures_get_no_extra_retry() {
        let err = write_timeout(WriteType::Simple);
        let mut s = IdempotentRetrySession::default();
        assert!(!s.retries_write_timeout(&err, false, Consistency::LocalQuorum));
        assert!(!s.retries_write_timeout(&err, true, Consistency::Serial));
        let overloaded = RequestAttemptError::DbError(DbError::Overloaded, "busy".into());
        assert!(!s.retries_write_timeout(&overloaded, true, Consistency::LocalQuorum));
        // Still unused: a later idempotent write timeout gets its retry.
        assert!(s.retries_write_timeout(&err, true, Consistency::LocalQuorum));
    }
}
