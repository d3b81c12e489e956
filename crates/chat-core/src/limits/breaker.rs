//! One circuit breaker per `provider:model`, in this instance's memory:
//! the pure state machine, with time passed in so it is tested without
//! sleeping. [`super::circuit`] shares it across the fleet through Redis
//! and hands out the [`super::Permit`] that settles it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

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
    /// When the half-open probe in flight was admitted. A probe that is
    /// never settled (a bug, a process that lost its permit) expires after
    /// a cooldown, so the circuit cannot stay shut for good.
    probe_since: Option<Instant>,
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
                probe_since: None,
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
            g.probe_since = None;
        }
    }

    pub fn admit(&self, now: Instant) -> Admission {
        let mut g = self.lock();
        Self::advance(&self.cfg, &mut g, now);
        match g.state {
            BreakerState::Closed => Admission::Allowed,
            BreakerState::Open => Admission::Rejected,
            BreakerState::HalfOpen
                if g.probe_since
                    .is_some_and(|t| now.duration_since(t) < self.cfg.cooldown) =>
            {
                Admission::Rejected
            }
            BreakerState::HalfOpen => {
                g.probe_since = Some(now);
                Admission::Probe
            }
        }
    }

    /// A probe that was admitted but never made: let the next one through.
    pub fn abandon_probe(&self) {
        self.lock().probe_since = None;
    }

    pub fn on_success(&self) {
        let mut g = self.lock();
        g.state = BreakerState::Closed;
        g.failures.clear();
        g.opened_at = None;
        g.probe_since = None;
    }

    pub fn on_failure(&self, now: Instant) {
        let mut g = self.lock();
        match g.state {
            BreakerState::HalfOpen => {
                // The probe failed: stay open for another cooldown.
                g.state = BreakerState::Open;
                g.opened_at = Some(now);
                g.probe_since = None;
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
    fn a_probe_never_settled_expires_after_a_cooldown() {
        let b = breaker();
        let t = Instant::now();
        for i in 0..3 {
            b.on_failure(t + i * MS);
        }
        let probe_at = t + 600 * MS;
        assert_eq!(b.admit(probe_at), Admission::Probe);
        assert_eq!(b.admit(probe_at + 499 * MS), Admission::Rejected);
        assert_eq!(
            b.admit(probe_at + 500 * MS),
            Admission::Probe,
            "the lost probe's slot is free again"
        );
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
