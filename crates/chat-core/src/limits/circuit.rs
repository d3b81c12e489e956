//! Circuit breakers shared by the fleet through Redis, with this
//! instance's [`Breakers`] as the fallback when Redis is absent or slow.
//!
//! A call to a model starts with [`Circuits::admit`], which gives a
//! [`Permit`] (or `None`: the circuit is open, skip the model). The permit
//! is settled by what became of the call: [`Permit::success`],
//! [`Permit::failure`] or [`Permit::unused`]. Dropped unsettled (an early
//! return, a client that left, a cancelled future) it counts as unused, so
//! no exit path can leave a half-open probe in flight. Probes also expire
//! by time, locally and in Redis, in case a process dies holding one.
//!
//! Every Redis operation is one round trip: a Lua script (atomic) for
//! each change, and for the check a plain `MGET` of the circuit's two
//! flags, with the script only when a probe may be due. The keys of a
//! circuit share a `{hash tag}`, so cluster mode accepts them.
//!
//! A circuit Redis found closed is taken as closed, without asking again,
//! for [`CLOSED_READ_FOR`] (100 ms): a busy instance reads each circuit
//! ten times a second, not once per request. A failure this instance
//! sees forgets that at once, so an instance learns of a circuit another
//! one opened by its own next failure or within 100 ms, whichever is
//! first.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::Script;
use tokio::time::Instant;

use super::breaker::{Admission, BreakerConfig, Breakers};
use crate::redis::{RedisLink, tag};

/// The fleet's circuit breakers, one per `provider:model`. Cheap to clone.
#[derive(Clone)]
pub struct Circuits(Arc<Inner>);

/// How long a circuit Redis found closed is taken as closed.
pub const CLOSED_READ_FOR: Duration = Duration::from_millis(100);

/// The most circuits remembered as closed (model names come from
/// requests; past this the memory is cleared).
const CLOSED_READS_MAX: usize = 256;

struct Inner {
    redis: Option<Arc<RedisLink>>,
    /// Circuits Redis found closed, and until when that is trusted.
    closed: Mutex<HashMap<String, Instant>>,
    local: Breakers,
    cfg: BreakerConfig,
    admit: Script,
    fail: Script,
    success: Script,
    release: Script,
}

impl Circuits {
    pub fn new(redis: Option<Arc<RedisLink>>, cfg: BreakerConfig) -> Self {
        Self(Arc::new(Inner {
            redis,
            closed: Mutex::new(HashMap::new()),
            local: Breakers::new(cfg),
            cfg,
            admit: Script::new(ADMIT_LUA),
            fail: Script::new(FAIL_LUA),
            success: Script::new(SUCCESS_LUA),
            release: Script::new("redis.call('DEL', KEYS[1]) return 1"),
        }))
    }

    /// This instance's breakers (also the fallback when Redis is away).
    pub fn local(&self) -> &Breakers {
        &self.0.local
    }

    fn keys(model_key: &str) -> Vec<String> {
        let k = tag(model_key);
        ["fails", "open", "tripped", "probe"]
            .iter()
            .map(|s| format!("cb:{{{k}}}:{s}"))
            .collect()
    }

    /// May `model_key` be called now? Fleet-wide when Redis answers.
    /// `None`: its circuit is open.
    pub async fn admit(&self, model_key: &str) -> Option<Permit> {
        let admission = self.admission(model_key).await;
        let probe = match admission {
            Admission::Rejected => return None,
            Admission::Probe => true,
            Admission::Allowed => false,
        };
        Some(Permit {
            circuits: self.clone(),
            key: model_key.to_owned(),
            probe,
            settled: false,
        })
    }

    fn closed_read(&self, model_key: &str, now: Instant) -> bool {
        self.0
            .closed
            .lock()
            .ok()
            .and_then(|m| m.get(model_key).copied())
            .is_some_and(|until| now < until)
    }

    fn remember_closed(&self, model_key: &str, now: Instant) {
        if let Ok(mut m) = self.0.closed.lock() {
            if m.len() >= CLOSED_READS_MAX && !m.contains_key(model_key) {
                m.clear();
            }
            m.insert(model_key.to_owned(), now + CLOSED_READ_FOR);
        }
    }

    fn forget_closed(&self, model_key: &str) {
        if let Ok(mut m) = self.0.closed.lock() {
            m.remove(model_key);
        }
    }

    async fn admission(&self, model_key: &str) -> Admission {
        if let Some(r) = &self.0.redis {
            let now = Instant::now();
            if self.closed_read(model_key, now) {
                return Admission::Allowed;
            }
            let keys = Self::keys(model_key);
            // Closed or open is a plain read of the two flags (one slot: a
            // shared tag), cheaper for Redis than a script; only a circuit
            // past its cooldown (tripped, no longer open) runs the script,
            // which checks again and takes the probe atomically.
            let mut read = redis::pipe();
            read.cmd("MGET").arg(&keys[1]).arg(&keys[2]);
            match r
                .pipe::<((Option<String>, Option<String>),)>(&read, r.timeout())
                .await
            {
                Some(((None, None),)) => {
                    self.remember_closed(model_key, now);
                    return Admission::Allowed;
                }
                Some(((Some(_), _),)) => return Admission::Rejected,
                Some(((None, Some(_)),)) => {}
                None => return self.0.local.get(model_key).admit(Instant::now()),
            }
            // A probe may take up to a cooldown; after that another
            // instance may probe.
            let probe_ttl = self.0.cfg.cooldown.as_millis() as i64;
            if let Some(v) = r.eval::<i64>(&self.0.admit, &keys, &[probe_ttl]).await {
                return match v {
                    0 => Admission::Allowed,
                    1 => Admission::Probe,
                    _ => Admission::Rejected,
                };
            }
        }
        self.0.local.get(model_key).admit(Instant::now())
    }

    /// Counts a failure of `model_key` outside a permit: an answer that
    /// broke off after it started.
    pub async fn record_failure(&self, model_key: &str) {
        self.0.local.get(model_key).on_failure(Instant::now());
        self.forget_closed(model_key);
        if let Some(r) = &self.0.redis {
            let c = &self.0.cfg;
            let args = [
                c.window.as_millis() as i64,
                i64::from(c.failures),
                c.cooldown.as_millis() as i64,
                (c.cooldown.as_millis() as i64) * 4,
            ];
            let _ = r
                .eval::<i64>(&self.0.fail, &Self::keys(model_key), &args)
                .await;
        }
    }

    /// Only a probe's success needs the fleet (to close the circuit for
    /// everyone); ordinary successes stay local, so the healthy path costs
    /// no extra round trip.
    async fn record_success(&self, model_key: &str, probe: bool) {
        self.0.local.get(model_key).on_success();
        if probe {
            if let Some(r) = &self.0.redis {
                let _ = r
                    .eval::<i64>(&self.0.success, &Self::keys(model_key), &[])
                    .await;
            }
        }
    }

    /// Gives back a probe slot that was not used.
    async fn release_probe(&self, model_key: &str) {
        self.0.local.get(model_key).abandon_probe();
        if let Some(r) = &self.0.redis {
            let keys = Self::keys(model_key);
            let _ = r.eval::<i64>(&self.0.release, &keys[3..], &[]).await;
        }
    }
}

/// Permission to call one model. Settle it with what the call became; an
/// unsettled permit that is dropped counts as unused.
#[must_use = "settle the permit with success, failure or unused"]
pub struct Permit {
    circuits: Circuits,
    key: String,
    probe: bool,
    settled: bool,
}

impl Permit {
    /// This call is the half-open probe: its outcome decides for everyone.
    pub fn is_probe(&self) -> bool {
        self.probe
    }

    /// The model answered: the circuit closes if it was probing.
    pub async fn success(mut self) {
        self.settled = true;
        self.circuits.record_success(&self.key, self.probe).await;
    }

    /// The model failed in a way that says something about it (a 5xx, a
    /// timeout, a dropped connection).
    pub async fn failure(mut self) {
        self.settled = true;
        self.circuits.record_failure(&self.key).await;
    }

    /// The call was not made, or failed for a reason of the request's own
    /// (a 400): a probe slot goes back, the circuit is unchanged.
    pub async fn unused(mut self) {
        self.settled = true;
        if self.probe {
            self.circuits.release_probe(&self.key).await;
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if self.settled || !self.probe {
            return;
        }
        // Dropped on an exit path that did not settle it (e.g. the
        // client left mid-probe): free the slot here and in Redis.
        self.circuits.0.local.get(&self.key).abandon_probe();
        if self.circuits.0.redis.is_some() {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let circuits = self.circuits.clone();
                let key = std::mem::take(&mut self.key);
                rt.spawn(async move { circuits.release_probe(&key).await });
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
    use std::time::Duration;

    fn circuits() -> Circuits {
        Circuits::new(
            None,
            BreakerConfig {
                failures: 1,
                window: Duration::from_secs(10),
                cooldown: Duration::from_secs(5),
            },
        )
    }

    /// Opens the circuit of `key`, waits out the cooldown and takes the
    /// half-open probe.
    async fn probe(c: &Circuits, key: &str) -> Permit {
        c.record_failure(key).await;
        assert!(c.admit(key).await.is_none(), "open after one failure");
        tokio::time::advance(Duration::from_secs(5)).await;
        let p = c.admit(key).await.unwrap();
        assert!(p.is_probe());
        assert!(c.admit(key).await.is_none(), "one probe at a time");
        p
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_probe_frees_the_slot() {
        let c = circuits();
        drop(probe(&c, "m").await);
        assert!(c.admit("m").await.is_some_and(|p| p.is_probe()));
    }

    #[tokio::test(start_paused = true)]
    async fn an_unused_probe_frees_the_slot_and_a_success_closes() {
        let c = circuits();
        probe(&c, "m").await.unused().await;
        let p = c.admit("m").await.unwrap();
        assert!(p.is_probe());
        p.success().await;
        let p = c.admit("m").await.unwrap();
        assert!(!p.is_probe(), "closed after the probe's success");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_reopens() {
        let c = circuits();
        probe(&c, "m").await.failure().await;
        assert!(c.admit("m").await.is_none());
    }

    #[test]
    fn keys_keep_their_hash_tag() {
        assert_eq!(tag("a{b}c"), "a_b_c");
        assert!(
            Circuits::keys("anthropic:m")
                .iter()
                .all(|k| k.contains("{anthropic:m}"))
        );
    }
}
