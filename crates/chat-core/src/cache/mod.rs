//! Exact response cache: what is cached under which key, the policy, and
//! the Redis backend. The relay looks answers up after history (the key
//! includes it), in parallel with the rate-limit check, streams a hit at
//! once, and stores complete answers after `done`.
//!
//! Key: SHA-256 of a canonical JSON document of everything that determines
//! the answer: a format version, the scope namespace (the user, or
//! `global`), provider, model, system prompt, the whole message list
//! (history included), `max_tokens` and `temperature`. Field order is fixed
//! by the struct, so the same request always gives the same key.
//!
//! Policy: only complete answers are stored. A request whose temperature is
//! above 0, or absent (the provider's default, which samples), is cached
//! only when `cache_sampled` is set. Per request, `Cache-Control`:
//! `no-cache` skips the lookup but stores the answer, `no-store` does
//! neither, `max-age=N` accepts only entries younger than N seconds.
//!
//! Layout: [`key`] (the key), [`policy`] (what one request does), the
//! backends [`redis`] and [`dynamo`] behind [`ResponseCache`], the
//! instance's own copies of recent answers in front of them ([`local`]),
//! and the
//! cache-warmer's inputs and work: [`popular`] and [`warmer`].
//!
//! Uses: `provider` (messages, for the key; the warmer calls models),
//! `limits` (the warmer's circuit permits), `persistence::store` (the
//! DynamoDB backend), `redis`.

pub mod dynamo;
pub mod key;
pub mod local;
pub mod policy;
pub mod popular;
pub mod redis;
pub mod warmer;

use std::time::Duration;

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};

pub use dynamo::{DYNAMO_ENTRY_MAX_BYTES, DynamoCache};
pub use key::{CACHE_FORMAT, KeyInput, KeySpec, cache_doc, cache_key, key_of_doc};
pub use local::{LocalAnswers, LocalConfig, Ready};
pub use policy::{CacheControl, CachePolicy, Plan};
pub use redis::RedisCache;

/// Response cache settings (see [`crate::cache`]).
#[derive(Debug, Clone, PartialEq)]
pub struct CacheConfig {
    pub policy: CachePolicy,
    /// `CACHE_BACKEND`: `redis` (default with `REDIS_URL`) or `dynamodb`
    /// (items in `TABLE_NAME`; no VPC needed).
    pub backend: CacheBackend,
    /// How often each cacheable request is asked, for the cache-warmer
    /// (needs Redis).
    pub popularity: Option<crate::cache::popular::PopularityConfig>,
    /// The DynamoDB backend's table: `CACHE_TABLE_NAME`, else `TABLE_NAME`.
    pub dynamodb_table: Option<String>,
    /// `CACHE_DYNAMODB_TIMEOUT_MS` (default 250): the longest one DynamoDB
    /// cache call may take.
    pub dynamodb_timeout: Duration,
    /// Entries are per user (`user`, default) or shared by all (`global`).
    pub global_scope: bool,
    /// The instance's own copies of answers (see [`local`]).
    pub local: LocalConfig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheBackend {
    Redis,
    DynamoDb,
}

/// A complete answer as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CachedAnswer {
    pub text: String,
    pub model: String,
    pub stop_reason: Option<String>,
    pub input_tokens: u32,
    pub output_tokens: u32,
    pub stored_at_ms: u64,
}

impl CachedAnswer {
    /// An entry as stored; `None` for one that does not parse (an older
    /// format), which is a miss.
    pub fn parse(raw: &str) -> Option<Self> {
        serde_json::from_str(raw).ok()
    }

    /// Whether the entry is young enough for a `max-age` (none: any age).
    pub fn fresh_for(&self, max_age: Option<Duration>, now_ms: u64) -> bool {
        max_age.is_none_or(|m| now_ms.saturating_sub(self.stored_at_ms) <= m.as_millis() as u64)
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CacheError {
    #[error("cache backend unavailable")]
    Unavailable,
}

/// A response cache backend.
pub trait ResponseCache: Send + Sync {
    fn name(&self) -> &'static str;
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<CachedAnswer>, CacheError>>;
    fn put<'a>(
        &'a self,
        key: &'a str,
        answer: &'a CachedAnswer,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), CacheError>>;
    /// The Redis key of `key`'s entry, for a backend in the Redis that
    /// live streams use: the lookup and the coalescing lease then go in
    /// one script ([`crate::live::Live::lookup_or_lead`]). `None` for other
    /// backends.
    fn redis_key(&self, _key: &str) -> Option<String> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_age_freshness() {
        let a = CachedAnswer {
            text: "t".into(),
            model: "m".into(),
            stop_reason: None,
            input_tokens: 1,
            output_tokens: 1,
            stored_at_ms: 10_000,
        };
        assert!(a.fresh_for(None, 1_000_000));
        assert!(a.fresh_for(Some(Duration::from_secs(5)), 15_000));
        assert!(!a.fresh_for(Some(Duration::from_secs(5)), 15_001));
    }
}
