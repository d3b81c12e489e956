//! Failed sign-ins per client address (`AUTH_FAILURES_PER_IP_PER_MINUTE`):
//! each failure is counted (fleet-wide where Redis or the table is); once
//! an address is over the limit this instance refuses it at once, before
//! any credential is looked up, until the minute ends. Other instances
//! refuse it from their own next failure on, so across the fleet an
//! address gets at most one more lookup per instance per minute.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::rate::{Decision, RateLimiter};

/// Addresses remembered as blocked before expired ones are swept.
const BLOCKED_SWEEP_AT: usize = 10_000;

pub struct FailedSignIns {
    counter: Arc<RateLimiter>,
    /// Address -> blocked until.
    blocked: Mutex<HashMap<String, (Instant, &'static str)>>,
}

/// An address refused for failing to sign in too often.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Blocked {
    pub retry_after: Duration,
    /// `fleet` or `local`: where the failures were counted.
    pub scope: &'static str,
}

impl FailedSignIns {
    pub fn new(counter: Arc<RateLimiter>) -> Self {
        Self {
            counter,
            blocked: Mutex::new(HashMap::new()),
        }
    }

    fn on(&self) -> bool {
        self.counter.limits().rpm > 0
    }

    /// Whether `address` is refused now (no I/O).
    pub fn blocked(&self, address: &str) -> Option<Blocked> {
        if !self.on() {
            return None;
        }
        let m = self.blocked.lock().unwrap_or_else(|p| p.into_inner());
        let (until, scope) = m.get(address)?;
        let left = until.checked_duration_since(Instant::now())?;
        Some(Blocked {
            retry_after: left,
            scope,
        })
    }

    /// Counts a failed sign-in from `address`; `Some` when that puts it
    /// over the limit (it is then refused until the minute ends).
    pub async fn failed(&self, address: &str) -> Option<Blocked> {
        if !self.on() {
            return None;
        }
        let (d, _): (Decision, _) = self.counter.check(&format!("authfail:{address}"), 0).await;
        if d.allowed {
            return None;
        }
        let b = Blocked {
            retry_after: d.reset,
            scope: d.scope,
        };
        let mut m = self.blocked.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() >= BLOCKED_SWEEP_AT {
            let now = Instant::now();
            m.retain(|_, (until, _)| *until > now);
        }
        m.insert(address.to_owned(), (Instant::now() + d.reset, d.scope));
        Some(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::RateLimits;

    #[tokio::test]
    async fn an_address_over_the_limit_is_refused_until_the_minute_ends() {
        let limiter = Arc::new(RateLimiter::new(None, RateLimits { rpm: 2, tpm: 0 }));
        let f = FailedSignIns::new(limiter);
        assert!(f.blocked("1.2.3.4").is_none());
        assert!(f.failed("1.2.3.4").await.is_none());
        assert!(f.failed("1.2.3.4").await.is_none());
        let b = f.failed("1.2.3.4").await.expect("third failure refused");
        assert_eq!(b.scope, "local");
        assert!(b.retry_after <= Duration::from_secs(60));
        assert!(f.blocked("1.2.3.4").is_some());
        assert!(f.blocked("5.6.7.8").is_none(), "another address is not");
        let off = FailedSignIns::new(Arc::new(RateLimiter::new(
            None,
            RateLimits { rpm: 0, tpm: 0 },
        )));
        for _ in 0..10 {
            assert!(off.failed("1.2.3.4").await.is_none());
        }
    }
}
