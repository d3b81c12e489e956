//! How often and how patiently to retry, and a budget that keeps retries
//! from multiplying the load on a provider during an outage. Pure: the
//! random number is passed in, so backoff is tested without sleeping.
//!
//! Retries act only before the first byte reaches the client (see
//! [`crate::chat::attempt`]): after that they would duplicate or splice text.

use std::sync::Mutex;
use std::time::Duration;

/// How often and how patiently to retry one model before moving on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first attempt, per model in the chain.
    pub max_retries: u32,
    /// First backoff ceiling; doubles each retry.
    pub base: Duration,
    /// Largest wait we accept, including a provider's `retry-after`. A
    /// longer `retry-after` means: try the next model instead.
    pub max_backoff: Duration,
}

impl RetryPolicy {
    /// Full-jitter exponential backoff (a random wait in
    /// `[0, min(max, base * 2^retry)]`), but never less than the provider's
    /// `retry-after`. `None`: the provider asked for longer than we wait.
    /// `unit` is a random number in `[0, 1)`.
    pub fn backoff(
        &self,
        retry: u32,
        retry_after: Option<Duration>,
        unit: f64,
    ) -> Option<Duration> {
        let ceiling = self
            .base
            .saturating_mul(1u32.checked_shl(retry.min(20)).unwrap_or(u32::MAX))
            .min(self.max_backoff);
        let jittered = ceiling.mul_f64(unit.clamp(0.0, 1.0));
        match retry_after {
            Some(ra) if ra > self.max_backoff => None,
            Some(ra) => Some(ra.max(jittered)),
            None => Some(jittered),
        }
    }
}

/// Caps retries at a fraction of recent first attempts, so that during an
/// outage retries cannot multiply the load on the provider. Each request
/// deposits `ratio`; each retry withdraws 1; the balance never drops below
/// 0 or exceeds `cap`.
#[derive(Debug)]
pub struct RetryBudget {
    ratio: f64,
    cap: f64,
    balance: Mutex<f64>,
}

impl RetryBudget {
    /// Starts full, so a quiet function can still retry its first failures.
    pub fn new(ratio: f64, cap: f64) -> Self {
        Self {
            ratio,
            cap,
            balance: Mutex::new(cap),
        }
    }

    pub fn on_request(&self) {
        let mut b = self.balance.lock().unwrap_or_else(|p| p.into_inner());
        *b = (*b + self.ratio).min(self.cap);
    }

    /// Takes one retry from the budget, or says no.
    pub fn try_retry(&self) -> bool {
        let mut b = self.balance.lock().unwrap_or_else(|p| p.into_inner());
        if *b >= 1.0 {
            *b -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_retries: 3,
            base: 100 * MS,
            max_backoff: 1000 * MS,
        }
    }

    #[test]
    fn backoff_is_jittered_exponential_and_capped() {
        let p = policy();
        assert_eq!(
            p.backoff(0, None, 0.999_999).map(|d| d.as_millis()),
            Some(99)
        );
        assert_eq!(p.backoff(2, None, 0.5), Some(200 * MS));
        assert_eq!(
            p.backoff(10, None, 0.999_999).map(|d| d.as_millis()),
            Some(999)
        );
        assert_eq!(p.backoff(1, None, 0.0), Some(Duration::ZERO));
        assert_eq!(p.backoff(40, None, 1.0), Some(1000 * MS));
    }

    #[test]
    fn retry_after_is_a_floor_and_too_long_means_move_on() {
        let p = policy();
        assert_eq!(p.backoff(0, Some(700 * MS), 0.1), Some(700 * MS));
        assert_eq!(p.backoff(0, Some(5000 * MS), 0.1), None);
    }

    #[test]
    fn budget_limits_retries_to_a_share_of_requests() {
        let b = RetryBudget::new(0.2, 3.0);
        // Starts full: three retries, then none.
        assert!(b.try_retry() && b.try_retry() && b.try_retry());
        assert!(!b.try_retry());
        // Five requests earn one retry.
        for _ in 0..5 {
            b.on_request();
        }
        assert!(b.try_retry());
        assert!(!b.try_retry());
    }
}
