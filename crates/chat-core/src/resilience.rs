//! Retries, a retry budget and circuit breakers: the pure parts, with time
//! passed in so they are tested without sleeping.
//!
//! All of this acts only before the first byte reaches the client (see
//! [`crate::relay`]): a retry or a fallback after that would duplicate or
//! splice text.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Failures within `window` that open the circuit.
    pub failures: u32,
    pub window: Duration,
    /// How long an open circuit rejects calls before one probe may pass.
    pub cooldown: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

#[derive(Debug)]
struct BreakerInner {
    state: BreakerState,
    /// Failure times within the window (closed state).
    failures: Vec<Instant>,
    opened_at: Option<Instant>,
    probe_in_flight: bool,
}

/// One circuit breaker (per provider + model).
#[derive(Debug)]
pub struct Breaker {
    cfg: BreakerConfig,
    inner: Mutex<BreakerInner>,
}

/// What the breaker says about a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Go ahead.
    Allowed,
    /// Go ahead: this call is the half-open probe.
    Probe,
    /// The circuit is open: skip this model.
    Rejected,
}

impl Breaker {
    pub fn new(cfg: BreakerConfig) -> Self {
        Self {
            cfg,
            inner: Mutex::new(BreakerInner {
                state: BreakerState::Closed,
                failures: Vec::new(),
                opened_at: None,
                probe_in_flight: false,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BreakerInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn state(&self, now: Instant) -> BreakerState {
        let mut g = self.lock();
        Self::advance(&self.cfg, &mut g, now);
        g.state
    }

    fn advance(cfg: &BreakerConfig, g: &mut BreakerInner, now: Instant) {
        if g.state == BreakerState::Open
            && g.opened_at
                .is_some_and(|t| now.duration_since(t) >= cfg.cooldown)
        {
            g.state = BreakerState::HalfOpen;
            g.probe_in_flight = false;
        }
    }

    pub fn admit(&self, now: Instant) -> Admission {
        let mut g = self.lock();
        Self::advance(&self.cfg, &mut g, now);
        match g.state {
            BreakerState::Closed => Admission::Allowed,
            BreakerState::Open => Admission::Rejected,
            BreakerState::HalfOpen if g.probe_in_flight => Admission::Rejected,
            BreakerState::HalfOpen => {
                g.probe_in_flight = true;
                Admission::Probe
            }
        }
    }

    /// A probe that was admitted but never made: let the next one through.
    pub fn abandon_probe(&self) {
        self.lock().probe_in_flight = false;
    }

    pub fn on_success(&self) {
        let mut g = self.lock();
        g.state = BreakerState::Closed;
        g.failures.clear();
        g.opened_at = None;
        g.probe_in_flight = false;
    }

    pub fn on_failure(&self, now: Instant) {
        let mut g = self.lock();
        match g.state {
            BreakerState::HalfOpen => {
                // The probe failed: stay open for another cooldown.
                g.state = BreakerState::Open;
                g.opened_at = Some(now);
                g.probe_in_flight = false;
            }
            BreakerState::Open => {}
            BreakerState::Closed => {
                let window = self.cfg.window;
                g.failures.retain(|t| now.duration_since(*t) < window);
                g.failures.push(now);
                if g.failures.len() as u32 >= self.cfg.failures {
                    g.state = BreakerState::Open;
                    g.opened_at = Some(now);
                    g.failures.clear();
                }
            }
        }
    }
}

/// Breakers by `provider:model`, made on first use.
#[derive(Debug)]
pub struct Breakers {
    cfg: BreakerConfig,
    map: Mutex<HashMap<String, std::sync::Arc<Breaker>>>,
}

impl Breakers {
    pub fn new(cfg: BreakerConfig) -> Self {
        Self {
            cfg,
            map: Mutex::new(HashMap::new()),
        }
    }

    pub fn get(&self, key: &str) -> std::sync::Arc<Breaker> {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(key.to_owned())
            .or_insert_with(|| std::sync::Arc::new(Breaker::new(self.cfg)))
            .clone()
    }

    /// Every known breaker's state, for `/health`.
    pub fn states(&self, now: Instant) -> Vec<(String, BreakerState)> {
        let m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<_> = m.iter().map(|(k, b)| (k.clone(), b.state(now))).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
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

    fn breaker() -> Breaker {
        Breaker::new(BreakerConfig {
            failures: 3,
            window: 1000 * MS,
            cooldown: 500 * MS,
        })
    }

    #[test]
    fn breaker_opens_after_n_failures_in_the_window() {
        let b = breaker();
        let t = Instant::now();
        b.on_failure(t);
        b.on_failure(t + 100 * MS);
        assert_eq!(b.admit(t + 150 * MS), Admission::Allowed);
        b.on_failure(t + 200 * MS);
        assert_eq!(b.state(t + 200 * MS), BreakerState::Open);
        assert_eq!(b.admit(t + 300 * MS), Admission::Rejected);
    }

    #[test]
    fn failures_outside_the_window_do_not_count() {
        let b = breaker();
        let t = Instant::now();
        b.on_failure(t);
        b.on_failure(t + 100 * MS);
        b.on_failure(t + 1500 * MS);
        assert_eq!(b.state(t + 1500 * MS), BreakerState::Closed);
    }

    #[test]
    fn half_open_lets_one_probe_through_and_closes_on_success() {
        let b = breaker();
        let t = Instant::now();
        for i in 0..3 {
            b.on_failure(t + i * MS);
        }
        let later = t + 600 * MS;
        assert_eq!(b.state(later), BreakerState::HalfOpen);
        assert_eq!(b.admit(later), Admission::Probe);
        assert_eq!(
            b.admit(later),
            Admission::Rejected,
            "only one probe at a time"
        );
        b.on_success();
        assert_eq!(b.state(later), BreakerState::Closed);
        assert_eq!(b.admit(later), Admission::Allowed);
    }

    #[test]
    fn a_failed_probe_reopens_for_another_cooldown() {
        let b = breaker();
        let t = Instant::now();
        for i in 0..3 {
            b.on_failure(t + i * MS);
        }
        let probe_at = t + 600 * MS;
        assert_eq!(b.admit(probe_at), Admission::Probe);
        b.on_failure(probe_at);
        assert_eq!(b.admit(probe_at + 400 * MS), Admission::Rejected);
        assert_eq!(b.admit(probe_at + 600 * MS), Admission::Probe);
    }

    #[test]
    fn breakers_are_per_key() {
        let bs = Breakers::new(BreakerConfig {
            failures: 1,
            window: 1000 * MS,
            cooldown: 1000 * MS,
        });
        let now = Instant::now();
        bs.get("anthropic:a").on_failure(now);
        assert_eq!(bs.get("anthropic:a").admit(now), Admission::Rejected);
        assert_eq!(bs.get("anthropic:b").admit(now), Admission::Allowed);
        assert_eq!(bs.states(now).len(), 2);
    }
}
