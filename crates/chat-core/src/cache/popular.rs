//! How often each cacheable request is asked: the cache-warmer's list of
//! what to keep warm.
//!
//! One sorted set `pop:{all}` (cache key -> decayed score) and one hash
//! `popdoc:{all}` (cache key -> the canonical key document, which is the
//! whole question, so the warmer can ask it again). Both share a hash tag,
//! so the one Lua script per flush stays in one slot.
//!
//! Decay without rewriting old scores: scores are log2 of a count in which
//! an ask at time t weighs 2^(t / half_life). An ask adds 2^(now/h) by a
//! log-sum-exp in the script, so numbers never overflow, and an entry asked
//! n times one half-life ago ranks like one asked n/2 times now.
//!
//! Bounded: above `max_entries` the lowest entries (and their documents)
//! are dropped in the same script. Documents over [`DOC_MAX_BYTES`] are
//! counted but not kept (the warmer skips them).
//!
//! Off the hot path: an answer queues its ask ([`Popularity::ask`]) and
//! the asks of the last [`FLUSH_EVERY`] go to Redis together, in one
//! script call, on a task nothing waits for (repeated asks of one
//! question are combined first). A process that ends before a flush loses
//! those counts; in Lambda the flush runs when the environment next thaws.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::Script;

use super::KeySpec;
use crate::redis::RedisLink;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PopularityConfig {
    /// `POPULAR_MAX` (default 500).
    pub max_entries: u32,
    /// `POPULAR_HALF_LIFE_SECS` (default 6 h).
    pub half_life: Duration,
}

/// Questions longer than this (with their history) are not kept for the
/// warmer.
pub const DOC_MAX_BYTES: usize = 64 * 1024;

const ZSET: &str = "pop:{all}";
const DOCS: &str = "popdoc:{all}";

/// Counts asks: ARGV[1] is the most entries kept, then (key, doc,
/// increment) for each question. An ask adds its increment to the key's
/// score by a log-sum-exp; above the maximum the lowest entries (and
/// their documents) are dropped.
const RECORD_MANY: &str = r"
local max = tonumber(ARGV[1])
for i = 2, #ARGV, 3 do
  local key, doc, inc = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  local s = redis.call('ZSCORE', KEYS[1], key)
  if s then
    s = tonumber(s)
    local hi = math.max(s, inc)
    local lo = math.min(s, inc)
    s = hi + math.log(1 + 2 ^ (lo - hi)) / math.log(2)
  else
    s = inc
  end
  redis.call('ZADD', KEYS[1], s, key)
  if doc ~= '' and redis.call('HEXISTS', KEYS[2], key) == 0 then
    redis.call('HSET', KEYS[2], key, doc)
  end
end
local n = redis.call('ZCARD', KEYS[1])
if n > max then
  local drop = redis.call('ZRANGE', KEYS[1], 0, n - max - 1)
  redis.call('ZREMRANGEBYRANK', KEYS[1], 0, n - max - 1)
  for _, m in ipairs(drop) do redis.call('HDEL', KEYS[2], m) end
end
return n
";

/// How long asks are gathered before they are sent together.
pub const FLUSH_EVERY: Duration = Duration::from_millis(50);

/// Most distinct questions held between flushes (more are dropped: a
/// count lost, never memory without bound).
const PENDING_MAX: usize = 10_000;

/// log2(2^a + 2^b), without overflow: two decayed asks as one.
fn add_log2(a: f64, b: f64) -> f64 {
    let (hi, lo) = if a > b { (a, b) } else { (b, a) };
    hi + (1.0 + (lo - hi).exp2()).log2()
}

const TOP: &str = r"
local top = redis.call('ZREVRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1, 'WITHSCORES')
local out = {}
for i = 1, #top, 2 do
  local doc = redis.call('HGET', KEYS[2], top[i]) or ''
  table.insert(out, top[i])
  table.insert(out, top[i + 1])
  table.insert(out, doc)
end
return out
";

/// One popular question.
#[derive(Debug, Clone, PartialEq)]
pub struct Popular {
    pub key: String,
    /// Asks, decayed to now (an ask one half-life ago counts 0.5).
    pub weight: f64,
    /// The canonical key document (empty when it was too large to keep).
    pub doc: String,
}

pub struct Popularity {
    link: Arc<RedisLink>,
    timeout: Duration,
    config: PopularityConfig,
    record_many: Script,
    top: Script,
    /// Asks not sent yet: cache key -> (document, combined increment).
    pending: Mutex<HashMap<String, (String, f64)>>,
    /// A flush is due (one task at a time).
    flushing: AtomicBool,
}

fn now_units(half_life: Duration, now_ms: u64) -> f64 {
    now_ms as f64 / 1000.0 / half_life.as_secs_f64().max(1.0)
}

impl Popularity {
    pub fn new(link: Arc<RedisLink>, timeout: Duration, config: PopularityConfig) -> Self {
        Self {
            link,
            timeout,
            config,
            record_many: Script::new(RECORD_MANY),
            top: Script::new(TOP),
            pending: Mutex::new(HashMap::new()),
            flushing: AtomicBool::new(false),
        }
    }

    /// Queues one ask of `key` (whose document is `doc`); sent with the
    /// others within [`FLUSH_EVERY`] on a task of its own. Never waits.
    pub fn ask(self: &Arc<Self>, key: &str, doc: &str) {
        let doc = if doc.len() > DOC_MAX_BYTES { "" } else { doc };
        let inc = now_units(self.config.half_life, crate::util::now_ms());
        {
            let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            let full = p.len() >= PENDING_MAX;
            match p.get_mut(key) {
                Some((_, sum)) => *sum = add_log2(*sum, inc),
                None if full => return,
                None => {
                    p.insert(key.to_owned(), (doc.to_owned(), inc));
                }
            }
        }
        if self.flushing.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            self.flushing.store(false, Ordering::Release);
            return;
        };
        let me = self.clone();
        rt.spawn(async move {
            tokio::time::sleep(FLUSH_EVERY).await;
            // Asks queued from here on schedule the next flush.
            me.flushing.store(false, Ordering::Release);
            me.flush().await;
        });
    }

    /// Sends every queued ask now, in one script call.
    pub async fn flush(&self) {
        let batch: Vec<(String, (String, f64))> = {
            let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            p.drain().collect()
        };
        if batch.is_empty() {
            return;
        }
        let mut args = Vec::with_capacity(1 + batch.len() * 3);
        args.push(self.config.max_entries.to_string());
        for (key, (doc, inc)) in batch {
            args.push(key);
            args.push(doc);
            args.push(inc.to_string());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let _: Option<i64> = self
            .link
            .script(&self.record_many, &[ZSET, DOCS], &args, self.timeout)
            .await;
    }

    /// Counts one ask of `key` (whose document is `doc`) now, with the
    /// same script as a flush. Best effort: a Redis that is away loses the
    /// count, never the answer.
    pub async fn record(&self, key: &str, doc: &str) {
        let doc = if doc.len() > DOC_MAX_BYTES { "" } else { doc };
        let inc = now_units(self.config.half_life, crate::util::now_ms()).to_string();
        let max = self.config.max_entries.to_string();
        let _: Option<i64> = self
            .link
            .script(
                &self.record_many,
                &[ZSET, DOCS],
                &[&max, key, doc, &inc],
                self.timeout,
            )
            .await;
    }

    /// Forgets every counted question of `scope` (`user:ID`, erasing a
    /// user) and returns their cache keys, so their cached answers can go
    /// too; `None` when Redis is away. Questions whose document was too
    /// large to keep cannot be attributed and stay as bare counts (a hash,
    /// no text).
    pub async fn forget_scope(&self, scope: &str) -> Option<Vec<String>> {
        let mut read = redis::pipe();
        read.hgetall(DOCS);
        let (docs,): (std::collections::HashMap<String, String>,) =
            self.link.pipe(&read, self.timeout).await?;
        let keys: Vec<String> = docs
            .into_iter()
            .filter(|(_, doc)| KeySpec::from_doc(doc).is_some_and(|s| s.scope == scope))
            .map(|(k, _)| k)
            .collect();
        if keys.is_empty() {
            return Some(keys);
        }
        let mut del = redis::pipe();
        del.atomic()
            .hdel(DOCS, &keys)
            .ignore()
            .zrem(ZSET, &keys)
            .ignore();
        self.link.pipe::<()>(&del, self.timeout).await?;
        Some(keys)
    }

    /// The `n` most asked questions, most asked first; `None` when Redis
    /// is away.
    pub async fn top(&self, n: usize) -> Option<Vec<Popular>> {
        let n = n.max(1).to_string();
        let flat: Vec<String> = self
            .link
            .script(&self.top, &[ZSET, DOCS], &[&n], self.timeout)
            .await?;
        let now = now_units(self.config.half_life, crate::util::now_ms());
        Some(
            flat.chunks(3)
                .filter_map(|c| match c {
                    [key, score, doc] => Some(Popular {
                        key: key.clone(),
                        weight: score.parse::<f64>().map_or(0.0, |s| (s - now).exp2()),
                        doc: doc.clone(),
                    }),
                    _ => None,
                })
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The script's arithmetic, in Rust (as the queue combines asks).
    fn add(a: f64, b: f64) -> f64 {
        add_log2(a, b)
    }

    #[test]
    fn decayed_counts_add_up_as_documented() {
        let h = Duration::from_secs(3600);
        let now = now_units(h, 10 * 3_600_000);
        let hour_ago = now_units(h, 9 * 3_600_000);
        // Four asks now weigh 4.
        let four = add(add(now, now), add(now, now));
        assert!(((four - now).exp2() - 4.0).abs() < 1e-9);
        // Two asks an hour ago weigh 1 now.
        let two_old = add(hour_ago, hour_ago);
        assert!(((two_old - now).exp2() - 1.0).abs() < 1e-9);
        // Scores stay small however long the service runs.
        let far = now_units(h, 100 * 365 * 86_400_000);
        assert!(add(far, far).is_finite() && far < 1e6);
    }
}
