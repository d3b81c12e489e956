//! State shared by every instance of the function, through Redis: rate
//! limits and circuit breakers. When Redis is not configured, or does not
//! answer within `REDIS_TIMEOUT_MS`, each instance falls back to its own
//! in-memory state (documented as per-instance): never an open door, never
//! an outage because the cache is down.
//!
//! Every operation is one Lua script, so one round trip and atomic. Keys
//! carry a `{hash tag}` so each script's keys live in one slot, which
//! cluster-mode Redis (ElastiCache Serverless) requires.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redis::Script;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::resilience::{Admission, BreakerConfig, Breakers};

/// A Redis connection that is skipped for a while after it fails, so a
/// dead Redis costs one timeout, not one per request.
pub struct RedisLink {
    client: redis::Client,
    conn: ConnectionManager,
    timeout: Duration,
    skip_until: Mutex<Option<Instant>>,
}

/// How long Redis is skipped after a failure before it is tried again.
const REDIS_RETRY_AFTER: Duration = Duration::from_secs(2);

impl RedisLink {
    /// Connects lazily: a Redis that is down at init is not fatal.
    pub fn new(url: &str, timeout: Duration) -> Result<Self, redis::RedisError> {
        Self::with_client(redis::Client::open(url)?, timeout)
    }

    /// From a client built elsewhere (e.g. TLS with a private CA).
    pub fn with_client(
        client: redis::Client,
        timeout: Duration,
    ) -> Result<Self, redis::RedisError> {
        let cfg = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout.max(Duration::from_millis(200))))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        Ok(Self {
            conn: ConnectionManager::new_lazy_with_config(client.clone(), cfg)?,
            client,
            timeout,
            skip_until: Mutex::new(None),
        })
    }

    fn skipping(&self) -> bool {
        let g = self.skip_until.lock().unwrap_or_else(|p| p.into_inner());
        g.is_some_and(|t| Instant::now() < t)
    }

    fn mark_down(&self, why: &str) {
        let mut g = self.skip_until.lock().unwrap_or_else(|p| p.into_inner());
        if g.is_none_or(|t| Instant::now() >= t) {
            tracing::warn!(
                error = why,
                "redis unavailable; using per-instance state for {:?}",
                REDIS_RETRY_AFTER
            );
        }
        *g = Some(Instant::now() + REDIS_RETRY_AFTER);
    }

    /// Awaits one Redis call within `timeout`, recording the outcome: a
    /// success clears the skip, a failure or timeout starts one.
    async fn guarded<T>(
        &self,
        timeout: Duration,
        call: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Option<T> {
        match tokio::time::timeout(timeout, call).await {
            Ok(Ok(v)) => {
                *self.skip_until.lock().unwrap_or_else(|p| p.into_inner()) = None;
                Some(v)
            }
            Ok(Err(e)) => {
                self.mark_down(&e.to_string());
                None
            }
            Err(_) => {
                self.mark_down("timed out");
                None
            }
        }
    }

    /// `ok` or `down`; with `probe`, a live PING, else the last known state.
    pub async fn health(&self, probe: bool) -> &'static str {
        if !probe {
            return if self.skipping() { "down" } else { "ok" };
        }
        let mut conn = self.conn.clone();
        let cmd = redis::cmd("PING");
        let ping = cmd.query_async::<String>(&mut conn);
        match self
            .guarded(self.timeout.max(Duration::from_millis(500)), ping)
            .await
        {
            Some(_) => "ok",
            None => "down",
        }
    }

    /// Runs a pipeline (atomic when built with `.atomic()`); `None` when
    /// Redis is skipped, slow or failing.
    pub async fn pipe<T: redis::FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
        timeout: Duration,
    ) -> Option<T> {
        if self.skipping() {
            return None;
        }
        let mut conn = self.conn.clone();
        self.guarded(timeout, pipe.query_async::<T>(&mut conn))
            .await
    }

    /// A connection of the caller's own, for blocking reads (`XREAD
    /// BLOCK`) that must not hold up the shared connection. Its responses
    /// may take `block` plus the usual timeout.
    pub async fn dedicated(&self, block: Duration) -> Option<redis::aio::MultiplexedConnection> {
        if self.skipping() {
            return None;
        }
        let cfg = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout.max(Duration::from_millis(200))))
            .set_response_timeout(Some(block + self.timeout.max(Duration::from_millis(200))));
        let connect = self
            .client
            .get_multiplexed_async_connection_with_config(&cfg);
        self.guarded(self.timeout.max(Duration::from_millis(500)), connect)
            .await
    }

    /// Runs a script with string arguments within `timeout`; `None` when
    /// Redis is skipped, slow or failing.
    pub async fn script<T: redis::FromRedisValue>(
        &self,
        script: &Script,
        keys: &[&str],
        args: &[&str],
        timeout: Duration,
    ) -> Option<T> {
        if self.skipping() {
            return None;
        }
        let mut inv = script.prepare_invoke();
        for k in keys {
            inv.key(*k);
        }
        for a in args {
            inv.arg(*a);
        }
        let mut conn = self.conn.clone();
        self.guarded(timeout, inv.invoke_async::<T>(&mut conn))
            .await
    }

    /// Runs a script; `None` when Redis is skipped, slow or failing.
    async fn eval<T: redis::FromRedisValue>(
        &self,
        script: &Script,
        keys: &[String],
        args: &[i64],
    ) -> Option<T> {
        if self.skipping() {
            return None;
        }
        let mut inv = script.prepare_invoke();
        for k in keys {
            inv.key(k);
        }
        for a in args {
            inv.arg(*a);
        }
        let mut conn = self.conn.clone();
        self.guarded(self.timeout, inv.invoke_async::<T>(&mut conn))
            .await
    }
}

/// Keys must not contain braces of their own: they would change the slot.
pub(crate) fn tag(s: &str) -> String {
    s.replace(['{', '}'], "_")
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

const WINDOW_MS: u64 = 60_000;

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
    /// `fleet` (Redis) or `local` (this instance only).
    pub scope: &'static str,
}

/// Sliding-window estimate over two fixed one-minute windows: the previous
/// window's count weighted by how much of it still overlaps the last
/// minute, plus the current window's. Checks both limits, then counts the
/// request. KEYS: req cur, req prev, tok cur, tok prev. ARGV: rpm, tpm,
/// ms into the window, window ms.
const RATE_LUA: &str = r"
local rpm = tonumber(ARGV[1])
local tpm = tonumber(ARGV[2])
local weight = 1 - tonumber(ARGV[3]) / tonumber(ARGV[4])
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
local prev = tonumber(redis.call('GET', KEYS[2]) or '0')
local tcur = tonumber(redis.call('GET', KEYS[3]) or '0')
local tprev = tonumber(redis.call('GET', KEYS[4]) or '0')
local req = prev * weight + cur
local tok = tprev * weight + tcur
if rpm > 0 and req + 1 > rpm then return {0, 0, 1} end
if tpm > 0 and tok >= tpm then return {0, math.max(0, math.floor(rpm - req)), 2} end
redis.call('INCR', KEYS[1])
redis.call('PEXPIRE', KEYS[1], 2 * tonumber(ARGV[4]))
return {1, math.max(0, math.floor(rpm - req - 1)), 0}
";

/// KEYS: tok cur. ARGV: tokens, window ms.
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

/// Fleet-wide state with a per-instance fallback.
pub struct Fleet {
    redis: Option<std::sync::Arc<RedisLink>>,
    limits: RateLimits,
    local_windows: Mutex<HashMap<String, LocalWindow>>,
    breakers: Breakers,
    breaker_cfg: BreakerConfig,
    rate: Script,
    tokens: Script,
    admit: Script,
    fail: Script,
    success: Script,
    release: Script,
}

/// Local map size at which old windows are swept out.
const LOCAL_SWEEP_AT: usize = 10_000;

impl Fleet {
    pub fn new(
        redis: Option<std::sync::Arc<RedisLink>>,
        limits: RateLimits,
        breaker_cfg: BreakerConfig,
    ) -> Self {
        Self {
            redis,
            limits,
            local_windows: Mutex::new(HashMap::new()),
            breakers: Breakers::new(breaker_cfg),
            breaker_cfg,
            rate: Script::new(RATE_LUA),
            tokens: Script::new(TOKENS_LUA),
            admit: Script::new(ADMIT_LUA),
            fail: Script::new(FAIL_LUA),
            success: Script::new(SUCCESS_LUA),
            release: Script::new("redis.call('DEL', KEYS[1]) return 1"),
        }
    }

    pub fn limits(&self) -> RateLimits {
        self.limits
    }

    pub fn has_redis(&self) -> bool {
        self.redis.is_some()
    }

    /// Redis as a dependency: `not_configured`, `ok` or `down` (then rate
    /// limits and breakers are per instance).
    pub async fn redis_health(&self, probe: bool) -> &'static str {
        match &self.redis {
            None => "not_configured",
            Some(r) => r.health(probe).await,
        }
    }

    /// The local breakers (also the fallback when Redis is away).
    pub fn local_breakers(&self) -> &Breakers {
        &self.breakers
    }

    /// Checks and counts one request by `caller`.
    pub async fn check_rate(&self, caller: &str) -> Decision {
        let now = now_ms();
        let index = now / WINDOW_MS;
        let into = now % WINDOW_MS;
        let reset = Duration::from_millis(WINDOW_MS - into);
        let limit = self.limits.rpm;
        if self.limits.rpm == 0 && self.limits.tpm == 0 {
            return Decision {
                allowed: true,
                limit,
                remaining: u32::MAX,
                reset,
                exceeded: None,
                scope: "off",
            };
        }
        if let Some(r) = &self.redis {
            let c = tag(caller);
            let keys = [
                format!("rl:{{{c}}}:r:{index}"),
                format!("rl:{{{c}}}:r:{}", index.saturating_sub(1)),
                format!("rl:{{{c}}}:t:{index}"),
                format!("rl:{{{c}}}:t:{}", index.saturating_sub(1)),
            ];
            let args = [
                i64::from(self.limits.rpm),
                i64::from(self.limits.tpm),
                into as i64,
                WINDOW_MS as i64,
            ];
            if let Some((allowed, remaining, why)) =
                r.eval::<(i64, i64, i64)>(&self.rate, &keys, &args).await
            {
                return Decision {
                    allowed: allowed == 1,
                    limit,
                    remaining: remaining.clamp(0, i64::from(u32::MAX)) as u32,
                    reset,
                    exceeded: match why {
                        1 => Some("requests"),
                        2 => Some("tokens"),
                        _ => None,
                    },
                    scope: "fleet",
                };
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
        }
        Decision {
            allowed,
            limit,
            remaining,
            reset,
            exceeded,
            scope: "local",
        }
    }

    /// Adds the tokens a finished answer used to `caller`'s minute.
    pub async fn add_tokens(&self, caller: &str, tokens: u32) {
        if self.limits.tpm == 0 || tokens == 0 {
            return;
        }
        let now = now_ms();
        let index = now / WINDOW_MS;
        if let Some(r) = &self.redis {
            let key = format!("rl:{{{}}}:t:{index}", tag(caller));
            if r.eval::<i64>(&self.tokens, &[key], &[i64::from(tokens), WINDOW_MS as i64])
                .await
                .is_some()
            {
                return;
            }
        }
        let mut m = self.local_windows.lock().unwrap_or_else(|p| p.into_inner());
        let w = m.entry(caller.to_owned()).or_default();
        w.roll(index);
        w.tok += u64::from(tokens);
    }

    fn breaker_keys(model_key: &str) -> Vec<String> {
        let k = tag(model_key);
        ["fails", "open", "tripped", "probe"]
            .iter()
            .map(|s| format!("cb:{{{k}}}:{s}"))
            .collect()
    }

    /// May `model_key` be called now? Fleet-wide when Redis answers.
    pub async fn admit(&self, model_key: &str) -> Admission {
        if let Some(r) = &self.redis {
            // A probe may take up to a whole first-token wait; after that
            // another instance may probe.
            let probe_ttl = self.breaker_cfg.cooldown.as_millis() as i64;
            if let Some(v) = r
                .eval::<i64>(&self.admit, &Self::breaker_keys(model_key), &[probe_ttl])
                .await
            {
                return match v {
                    0 => Admission::Allowed,
                    1 => Admission::Probe,
                    _ => Admission::Rejected,
                };
            }
        }
        self.breakers.get(model_key).admit(Instant::now())
    }

    /// Releases a probe slot that will not be used.
    pub async fn abandon_probe(&self, model_key: &str) {
        if let Some(r) = &self.redis {
            let keys = Self::breaker_keys(model_key);
            let _ = r.eval::<i64>(&self.release, &keys[3..], &[]).await;
        }
        self.breakers.get(model_key).abandon_probe();
    }

    pub async fn on_failure(&self, model_key: &str) {
        self.breakers.get(model_key).on_failure(Instant::now());
        if let Some(r) = &self.redis {
            let c = &self.breaker_cfg;
            let args = [
                c.window.as_millis() as i64,
                i64::from(c.failures),
                c.cooldown.as_millis() as i64,
                (c.cooldown.as_millis() as i64) * 4,
            ];
            let _ = r
                .eval::<i64>(&self.fail, &Self::breaker_keys(model_key), &args)
                .await;
        }
    }

    /// Records a success. Only a probe's success needs the fleet (to close
    /// the circuit for everyone); ordinary successes stay local, so the
    /// healthy path costs no extra round trip.
    pub async fn on_success(&self, model_key: &str, admission: Admission) {
        self.breakers.get(model_key).on_success();
        if admission == Admission::Probe {
            if let Some(r) = &self.redis {
                let _ = r
                    .eval::<i64>(&self.success, &Self::breaker_keys(model_key), &[])
                    .await;
            }
        }
    }
}

/// KEYS: fails, open, tripped, probe. ARGV: probe ttl ms.
/// 0 allowed, 1 probe, 2 rejected.
const ADMIT_LUA: &str = r"
if redis.call('EXISTS', KEYS[2]) == 1 then return 2 end
if redis.call('EXISTS', KEYS[3]) == 1 then
  if redis.call('SET', KEYS[4], '1', 'NX', 'PX', ARGV[1]) then return 1 end
  return 2
end
return 0
";

/// KEYS: fails, open, tripped, probe. ARGV: window ms, threshold,
/// cooldown ms, tripped ttl ms. Returns 1 if the circuit is (now) open.
const FAIL_LUA: &str = r"
if redis.call('EXISTS', KEYS[2]) == 1 then return 1 end
if redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('SET', KEYS[2], '1', 'PX', ARGV[3])
  redis.call('PEXPIRE', KEYS[3], ARGV[4])
  redis.call('DEL', KEYS[4])
  return 1
end
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
if n >= tonumber(ARGV[2]) then
  redis.call('SET', KEYS[2], '1', 'PX', ARGV[3])
  redis.call('SET', KEYS[3], '1', 'PX', ARGV[4])
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
";

/// KEYS: fails, open, tripped, probe.
const SUCCESS_LUA: &str = r"
redis.call('DEL', KEYS[1], KEYS[3], KEYS[4])
return 1
";

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

    #[test]
    fn zero_turns_a_limit_off() {
        let off = RateLimits { rpm: 0, tpm: 0 };
        assert!(window_decision(off, 1_000_000, 0, 1_000_000, 0, 0).0);
    }

    #[tokio::test]
    async fn local_fallback_limits_per_caller() {
        let f = Fleet::new(
            None,
            RateLimits { rpm: 3, tpm: 0 },
            BreakerConfig {
                failures: 1,
                window: Duration::from_secs(1),
                cooldown: Duration::from_secs(1),
            },
        );
        for _ in 0..3 {
            let d = f.check_rate("ip:1").await;
            assert!(d.allowed);
            assert_eq!(d.scope, "local");
        }
        let d = f.check_rate("ip:1").await;
        assert!(!d.allowed);
        assert_eq!(d.exceeded, Some("requests"));
        assert!(
            f.check_rate("ip:2").await.allowed,
            "another caller has its own limit"
        );
    }

    #[test]
    fn keys_keep_their_hash_tag() {
        assert_eq!(tag("a{b}c"), "a_b_c");
        assert!(
            Fleet::breaker_keys("anthropic:m")
                .iter()
                .all(|k| k.contains("{anthropic:m}"))
        );
    }
}
