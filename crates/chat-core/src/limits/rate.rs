//! Requests and tokens per minute, per caller: a sliding window shared by
//! the fleet through Redis (one Lua script, so one round trip, atomic);
//! without Redis, fixed one-minute windows shared through the DynamoDB
//! table (one conditional update, see [`super::table`]); kept per instance
//! when neither is configured or answering.
//!
//! Keys carry a `{hash tag}` so each script's keys live in one slot, which
//! cluster-mode Redis (ElastiCache Serverless) requires.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::Script;

use super::table::{Counted, TableCounters};
use crate::redis::{RedisLink, tag};

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub(super) const WINDOW_MS: u64 = 60_000;

/// Requests and tokens per minute, per caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimits {
    /// 0 turns the request limit off.
    pub rpm: u32,
    /// 0 turns the token limit off.
    pub tpm: u32,
}

/// The outcome of a rate-limit check, and what the headers say.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub allowed: bool,
    pub limit: u32,
    pub remaining: u32,
    /// Until the current window ends.
    pub reset: Duration,
    /// Which limit refused: `requests` or `tokens`.
    pub exceeded: Option<&'static str>,
    /// `fleet` (Redis or the table) or `local` (this instance only).
    pub scope: &'static str,
}

impl Decision {
    /// `X-RateLimit-*` headers (none when limits are off).
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        if self.scope == "off" || self.limit == 0 {
            return Vec::new();
        }
        vec![
            ("x-ratelimit-limit", self.limit.to_string()),
            ("x-ratelimit-remaining", self.remaining.to_string()),
            (
                "x-ratelimit-reset",
                self.reset.as_secs_f64().ceil().to_string(),
            ),
            ("x-ratelimit-scope", self.scope.to_owned()),
        ]
    }
}

/// Sliding-window estimate over two fixed one-minute windows: the previous
/// window's count weighted by how much of it still overlaps the last
/// minute, plus the current window's. Checks both limits, then counts the
/// request and reserves its tokens. KEYS: req cur, req prev, tok cur, tok
/// prev. ARGV: rpm, tpm, ms into the window, window ms, tokens to reserve.
pub(super) const RATE_LUA: &str = r"
local rpm = tonumber(ARGV[1])
local tpm = tonumber(ARGV[2])
local weight = 1 - tonumber(ARGV[3]) / tonumber(ARGV[4])
local v = redis.call('MGET', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
local cur = tonumber(v[1] or '0')
local prev = tonumber(v[2] or '0')
local tcur = tonumber(v[3] or '0')
local tprev = tonumber(v[4] or '0')
local req = prev * weight + cur
local tok = tprev * weight + tcur
if rpm > 0 and req + 1 > rpm then return {0, 0, 1} end
if tpm > 0 and tok >= tpm then return {0, math.max(0, math.floor(rpm - req)), 2} end
redis.call('INCR', KEYS[1])
redis.call('PEXPIRE', KEYS[1], 2 * tonumber(ARGV[4]))
if tonumber(ARGV[5]) > 0 then
  redis.call('INCRBY', KEYS[3], ARGV[5])
  redis.call('PEXPIRE', KEYS[3], 2 * tonumber(ARGV[4]))
end
return {1, math.max(0, math.floor(rpm - req - 1)), 0}
";

/// KEYS: tok of the reservation's window. ARGV: tokens (negative gives
/// back), window ms.
const TOKENS_LUA: &str = r"
redis.call('INCRBY', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[1], 2 * tonumber(ARGV[2]))
return 1
";

#[derive(Debug, Default, Clone, Copy)]
struct LocalWindow {
    index: u64,
    req: u64,
    prev_req: u64,
    tok: u64,
    prev_tok: u64,
}

impl LocalWindow {
    fn roll(&mut self, index: u64) {
        if index == self.index {
            return;
        }
        if index == self.index + 1 {
            self.prev_req = self.req;
            self.prev_tok = self.tok;
        } else {
            self.prev_req = 0;
            self.prev_tok = 0;
        }
        self.index = index;
        self.req = 0;
        self.tok = 0;
    }
}

/// The pure sliding-window rule, shared by the local limiter and tests.
/// Returns (allowed, remaining, exceeded).
pub fn window_decision(
    limits: RateLimits,
    req: u64,
    prev_req: u64,
    tok: u64,
    prev_tok: u64,
    into_window_ms: u64,
) -> (bool, u32, Option<&'static str>) {
    let weight = 1.0 - into_window_ms as f64 / WINDOW_MS as f64;
    let r = prev_req as f64 * weight + req as f64;
    let t = prev_tok as f64 * weight + tok as f64;
    let rpm = f64::from(limits.rpm);
    if limits.rpm > 0 && r + 1.0 > rpm {
        return (false, 0, Some("requests"));
    }
    let remaining = if limits.rpm > 0 {
        (rpm - r - 1.0).max(0.0) as u32
    } else {
        u32::MAX
    };
    if limits.tpm > 0 && t >= f64::from(limits.tpm) {
        return (false, remaining, Some("tokens"));
    }
    (true, remaining, None)
}

/// Per-caller rate limits, fleet-wide with Redis or the table, per
/// instance without.
pub struct RateLimiter {
    redis: Option<Arc<RedisLink>>,
    table: Option<Arc<TableCounters>>,
    limits: RateLimits,
    local_windows: Mutex<HashMap<String, LocalWindow>>,
    rate: Script,
    tokens: Script,
}

/// Local map size at which old windows are swept out.
const LOCAL_SWEEP_AT: usize = 10_000;

impl RateLimiter {
    pub fn new(redis: Option<Arc<RedisLink>>, limits: RateLimits) -> Self {
        Self::shared(redis, None, limits)
    }

    /// Counts in Redis when given, else in the table when given, else in
    /// this instance.
    pub fn shared(
        redis: Option<Arc<RedisLink>>,
        table: Option<Arc<TableCounters>>,
        limits: RateLimits,
    ) -> Self {
        let table = if redis.is_some() { None } else { table };
        Self {
            redis,
            table,
            limits,
            local_windows: Mutex::new(HashMap::new()),
            rate: Script::new(RATE_LUA),
            tokens: Script::new(TOKENS_LUA),
        }
    }

    pub fn limits(&self) -> RateLimits {
        self.limits
    }

    /// Checks and counts one request by `caller`, and reserves `reserve`
    /// tokens (its `max_tokens` plus an estimate of its input) against the
    /// token limit, so requests in flight count before their answers end.
    /// The reservation is settled to the real usage when the answer ends,
    /// on every exit path (see [`Reservation`]).
    pub async fn check(
        self: &Arc<Self>,
        caller: &str,
        reserve: u32,
    ) -> (Decision, Option<Reservation>) {
        let d = self.decide(caller, reserve).await;
        let reservation =
            (d.0.allowed && reserve > 0 && self.limits.tpm > 0).then(|| Reservation {
                limiter: self.clone(),
                caller: caller.to_owned(),
                reserved: reserve,
                index: d.1,
                fleet: d.0.scope == "fleet",
                settled: false,
            });
        (d.0, reservation)
    }

    async fn decide(&self, caller: &str, reserve: u32) -> (Decision, u64) {
        let reserve = if self.limits.tpm == 0 { 0 } else { reserve };
        let now = now_ms();
        let index = now / WINDOW_MS;
        let into = now % WINDOW_MS;
        let reset = Duration::from_millis(WINDOW_MS - into);
        let limit = self.limits.rpm;
        if self.limits.rpm == 0 && self.limits.tpm == 0 {
            let d = Decision {
                allowed: true,
                limit,
                remaining: u32::MAX,
                reset,
                exceeded: None,
                scope: "off",
            };
            return (d, index);
        }
        if let Some((r, check)) = self.redis_check(caller, reserve) {
            if let Some((allowed, remaining, why)) = r
                .eval::<(i64, i64, i64)>(&self.rate, &check.keys, &check.args)
                .await
            {
                return (check.decision(allowed, remaining, why), check.index);
            }
        } else if let Some(t) = &self.table {
            let expires = (index + 2) * WINDOW_MS / 1000;
            let counted = t
                .count_minute(
                    caller,
                    index,
                    self.limits.rpm,
                    self.limits.tpm,
                    reserve,
                    expires,
                )
                .await;
            if let Some(c) = counted {
                let rpm = u64::from(self.limits.rpm);
                let (allowed, requests, exceeded) = match c {
                    Counted::Yes { requests, .. } => (true, requests, None),
                    Counted::No { requests, .. } => {
                        let why = if rpm > 0 && requests >= rpm {
                            "requests"
                        } else {
                            "tokens"
                        };
                        (false, requests, Some(why))
                    }
                };
                let remaining = if rpm == 0 {
                    u32::MAX
                } else {
                    rpm.saturating_sub(requests).min(u64::from(u32::MAX)) as u32
                };
                let d = Decision {
                    allowed,
                    limit,
                    remaining,
                    reset,
                    exceeded,
                    scope: "fleet",
                };
                return (d, index);
            }
        }
        let mut m = self.local_windows.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() >= LOCAL_SWEEP_AT {
            m.retain(|_, w| w.index + 1 >= index);
        }
        let w = m.entry(caller.to_owned()).or_default();
        w.roll(index);
        let (allowed, remaining, exceeded) =
            window_decision(self.limits, w.req, w.prev_req, w.tok, w.prev_tok, into);
        if allowed {
            w.req += 1;
            w.tok = w.tok.saturating_add(u64::from(reserve));
        }
        let d = Decision {
            allowed,
            limit,
            remaining,
            reset,
            exceeded,
            scope: "local",
        };
        (d, index)
    }

    /// The Redis script's keys and arguments for one check of `caller`
    /// (see [`RATE_LUA`]); `None` without Redis or with both limits off.
    pub(super) fn redis_check(
        &self,
        caller: &str,
        reserve: u32,
    ) -> Option<(&Arc<RedisLink>, RedisCheck)> {
        let r = self.redis.as_ref()?;
        if self.limits.rpm == 0 && self.limits.tpm == 0 {
            return None;
        }
        let reserve = if self.limits.tpm == 0 { 0 } else { reserve };
        let now = now_ms();
        let index = now / WINDOW_MS;
        let into = now % WINDOW_MS;
        let c = tag(caller);
        Some((
            r,
            RedisCheck {
                keys: [
                    format!("rl:{{{c}}}:r:{index}"),
                    format!("rl:{{{c}}}:r:{}", index.saturating_sub(1)),
                    format!("rl:{{{c}}}:t:{index}"),
                    format!("rl:{{{c}}}:t:{}", index.saturating_sub(1)),
                ],
                args: [
                    i64::from(self.limits.rpm),
                    i64::from(self.limits.tpm),
                    into as i64,
                    WINDOW_MS as i64,
                    i64::from(reserve),
                ],
                index,
                reset: Duration::from_millis(WINDOW_MS - into),
                limit: self.limits.rpm,
            },
        ))
    }

    /// A check the script answered, with its reservation (as [`Self::check`]).
    pub(super) fn checked(
        self: &Arc<Self>,
        caller: &str,
        check: &RedisCheck,
        (allowed, remaining, why): (i64, i64, i64),
    ) -> (Decision, Option<Reservation>) {
        let d = check.decision(allowed, remaining, why);
        let reserve = check.args[4] as u32;
        let reservation = (d.allowed && reserve > 0 && self.limits.tpm > 0).then(|| Reservation {
            limiter: self.clone(),
            caller: caller.to_owned(),
            reserved: reserve,
            index: check.index,
            fleet: true,
            settled: false,
        });
        (d, reservation)
    }

    /// Moves `caller`'s token count of window `index` by `delta` (a
    /// reservation settled to the real usage), where it was reserved.
    async fn adjust(&self, caller: &str, index: u64, delta: i64, fleet: bool) {
        if delta == 0 {
            return;
        }
        if fleet {
            if let Some(r) = &self.redis {
                let key = format!("rl:{{{}}}:t:{index}", tag(caller));
                let _ = r
                    .eval::<i64>(&self.tokens, &[key], &[delta, WINDOW_MS as i64])
                    .await;
            } else if let Some(t) = &self.table {
                t.adjust_tokens(caller, index, delta).await;
            }
            return;
        }
        self.adjust_local(caller, index, delta);
    }

    fn adjust_local(&self, caller: &str, index: u64, delta: i64) {
        let mut m = self.local_windows.lock().unwrap_or_else(|p| p.into_inner());
        let Some(w) = m.get_mut(caller) else { return };
        let slot = if w.index == index {
            &mut w.tok
        } else if w.index == index + 1 {
            &mut w.prev_tok
        } else {
            return;
        };
        *slot = slot.saturating_add_signed(delta);
    }
}

/// One check in Redis: the script's keys and arguments, and what its
/// answer needs to become a [`Decision`].
pub(super) struct RedisCheck {
    pub keys: [String; 4],
    pub args: [i64; 5],
    index: u64,
    reset: Duration,
    limit: u32,
}

impl RedisCheck {
    fn decision(&self, allowed: i64, remaining: i64, why: i64) -> Decision {
        Decision {
            allowed: allowed == 1,
            limit: self.limit,
            remaining: remaining.clamp(0, i64::from(u32::MAX)) as u32,
            reset: self.reset,
            exceeded: match why {
                1 => Some("requests"),
                2 => Some("tokens"),
                _ => None,
            },
            scope: "fleet",
        }
    }
}

/// Tokens reserved for one request. Settle it with the tokens the answer
/// really used; dropped unsettled (an error before the answer, a client
/// that left) it settles in the background with no usage, so no exit path
/// leaves tokens reserved. Counts expire with their window in any case.
#[must_use = "settle the reservation with the tokens used"]
pub struct Reservation {
    limiter: Arc<RateLimiter>,
    caller: String,
    reserved: u32,
    index: u64,
    /// Reserved in Redis (else in this instance's window).
    fleet: bool,
    settled: bool,
}

impl Reservation {
    /// The Redis link of a reservation held there (not yet settled).
    pub(super) fn fleet_link(&self) -> Option<&Arc<RedisLink>> {
        self.limiter
            .redis
            .as_ref()
            .filter(|_| self.fleet && !self.settled)
    }

    /// The Redis key, link and token change of settling to `used`, for a
    /// reservation held in Redis; marks it settled (the caller sends it).
    pub(super) fn take_fleet(&mut self, used: u32) -> Option<(Arc<RedisLink>, String, i64)> {
        if !self.fleet || self.settled {
            return None;
        }
        let r = self.limiter.redis.clone()?;
        self.settled = true;
        let key = format!("rl:{{{}}}:t:{}", tag(&self.caller), self.index);
        Some((r, key, i64::from(used) - i64::from(self.reserved)))
    }

    /// Replaces the reservation by `used` tokens.
    pub async fn settle(mut self, used: u32) {
        self.settled = true;
        let delta = i64::from(used) - i64::from(self.reserved);
        self.limiter
            .adjust(&self.caller, self.index, delta, self.fleet)
            .await;
    }

    /// [`settle`](Self::settle) from where nothing can be awaited.
    pub fn settle_soon(mut self, used: u32) {
        self.settled = true;
        let delta = i64::from(used) - i64::from(self.reserved);
        if !self.fleet {
            self.limiter.adjust_local(&self.caller, self.index, delta);
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let limiter = self.limiter.clone();
            let caller = std::mem::take(&mut self.caller);
            let index = self.index;
            rt.spawn(async move { limiter.adjust(&caller, index, delta, true).await });
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        let r = Reservation {
            limiter: self.limiter.clone(),
            caller: std::mem::take(&mut self.caller),
            reserved: self.reserved,
            index: self.index,
            fleet: self.fleet,
            settled: false,
        };
        self.settled = true;
        r.settle_soon(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: RateLimits = RateLimits { rpm: 10, tpm: 1000 };

    #[test]
    fn requests_over_the_limit_are_refused() {
        assert_eq!(window_decision(LIMITS, 9, 0, 0, 0, 0), (true, 0, None));
        assert_eq!(
            window_decision(LIMITS, 10, 0, 0, 0, 0),
            (false, 0, Some("requests"))
        );
        assert_eq!(window_decision(LIMITS, 3, 0, 0, 0, 0).1, 6);
    }

    #[test]
    fn the_previous_minute_fades_out() {
        // 10 requests last minute: at its end they all still count...
        assert!(!window_decision(LIMITS, 0, 10, 0, 0, 0).0);
        // ...half-way through this one, half of them do.
        assert_eq!(
            window_decision(LIMITS, 0, 10, 0, 0, 30_000),
            (true, 4, None)
        );
    }

    #[test]
    fn tokens_over_the_limit_are_refused() {
        assert_eq!(window_decision(LIMITS, 0, 0, 1000, 0, 0).2, Some("tokens"));
        assert!(window_decision(LIMITS, 0, 0, 999, 0, 0).0);
    }

    #[tokio::test]
    async fn reservations_count_at_once_and_settle_to_the_real_usage() {
        let f = Arc::new(RateLimiter::new(None, RateLimits { rpm: 0, tpm: 1000 }));
        // Two answers in flight reserve 600 each: a third is refused.
        let (a, ra) = f.check("u", 600).await;
        let (b, rb) = f.check("u", 600).await;
        assert!(a.allowed && b.allowed);
        let (c, rc) = f.check("u", 600).await;
        assert_eq!((c.allowed, c.exceeded), (false, Some("tokens")));
        assert!(rc.is_none());
        // They used 10 each: the window holds 20, so more fit.
        ra.unwrap().settle(10).await;
        rb.unwrap().settle(10).await;
        let (d, rd) = f.check("u", 600).await;
        assert!(d.allowed);
        // Dropped unsettled (an error before the answer): given back.
        drop(rd);
        for _ in 0..3 {
            let (e, re) = f.check("u", 300).await;
            assert!(e.allowed);
            re.unwrap().settle(0).await;
        }
    }

    #[test]
    fn zero_turns_a_limit_off() {
        let off = RateLimits { rpm: 0, tpm: 0 };
        assert!(window_decision(off, 1_000_000, 0, 1_000_000, 0, 0).0);
    }

    #[tokio::test]
    async fn local_fallback_limits_per_caller() {
        let f = Arc::new(RateLimiter::new(None, RateLimits { rpm: 3, tpm: 0 }));
        for _ in 0..3 {
            let d = f.check("ip:1", 0).await.0;
            assert!(d.allowed);
            assert_eq!(d.scope, "local");
        }
        let d = f.check("ip:1", 0).await.0;
        assert!(!d.allowed);
        assert_eq!(d.exceeded, Some("requests"));
        assert!(
            f.check("ip:2", 0).await.0.allowed,
            "another caller has its own limit"
        );
    }
}
