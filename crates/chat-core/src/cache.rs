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

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::fleet::{RedisLink, tag};
use crate::provider::Message;

/// Bumped when the key's inputs or the stored format change, so old
/// entries are simply never found again.
pub const CACHE_FORMAT: u32 = 1;

/// Everything that determines an answer.
#[derive(Debug, Serialize)]
pub struct KeyInput<'a> {
    pub scope: &'a str,
    pub provider: &'a str,
    pub model: &'a str,
    pub system: Option<&'a str>,
    pub messages: &'a [Message],
    pub max_tokens: u32,
    pub temperature: Option<f32>,
}

/// The same inputs, owned: what the cache-warmer reads back from the
/// popularity records to ask the question again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeySpec {
    pub scope: String,
    pub provider: String,
    pub model: String,
    pub system: Option<String>,
    pub messages: Vec<Message>,
    pub max_tokens: u32,
    pub temperature: Option<f32>,
}

#[derive(Serialize, Deserialize)]
struct KeyDocOwned {
    format: u32,
    input: KeySpec,
}

impl KeySpec {
    /// Reads a canonical key document ([`cache_doc`]); `None` for another
    /// format or malformed text.
    pub fn from_doc(doc: &str) -> Option<KeySpec> {
        let d: KeyDocOwned = serde_json::from_str(doc).ok()?;
        (d.format == CACHE_FORMAT).then_some(d.input)
    }

    pub fn input(&self) -> KeyInput<'_> {
        KeyInput {
            scope: &self.scope,
            provider: &self.provider,
            model: &self.model,
            system: self.system.as_deref(),
            messages: &self.messages,
            max_tokens: self.max_tokens,
            temperature: self.temperature,
        }
    }
}

/// The canonical JSON document the key is the hash of.
pub fn cache_doc(input: &KeyInput<'_>) -> String {
    serde_json::json!({ "format": CACHE_FORMAT, "input": input }).to_string()
}

/// The key of a canonical document: lowercase hex SHA-256.
pub fn key_of_doc(doc: &str) -> String {
    let digest = Sha256::digest(doc.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// The cache key: lowercase hex SHA-256 of the canonical JSON.
pub fn cache_key(input: &KeyInput<'_>) -> String {
    key_of_doc(&cache_doc(input))
}

/// A request's `Cache-Control` directives that the cache honours.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheControl {
    pub no_cache: bool,
    pub no_store: bool,
    pub max_age: Option<Duration>,
}

impl CacheControl {
    /// Parses a header value; unknown directives and malformed `max-age`
    /// values are ignored (as HTTP caches do).
    pub fn parse(value: &str) -> Self {
        let mut cc = CacheControl::default();
        for d in value.split(',').map(str::trim).filter(|d| !d.is_empty()) {
            let (name, arg) = match d.split_once('=') {
                Some((n, a)) => (n.trim(), Some(a.trim().trim_matches('"'))),
                None => (d, None),
            };
            match name.to_ascii_lowercase().as_str() {
                "no-cache" => cc.no_cache = true,
                "no-store" => cc.no_store = true,
                "max-age" => {
                    if let Some(secs) = arg.and_then(|a| a.parse::<u64>().ok()) {
                        cc.max_age = Some(Duration::from_secs(secs));
                    }
                }
                _ => {}
            }
        }
        cc
    }
}

/// Deployment-wide cache settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CachePolicy {
    pub ttl: Duration,
    /// Also cache requests that sample (temperature > 0 or absent).
    pub cache_sampled: bool,
}

/// What to do for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub lookup: bool,
    pub store: bool,
    /// Accept only entries younger than this.
    pub max_age: Option<Duration>,
}

impl Plan {
    /// Neither look up nor store (the cache is off).
    pub const NONE: Plan = Plan {
        lookup: false,
        store: false,
        max_age: None,
    };
}

impl CachePolicy {
    pub fn plan(&self, temperature: Option<f32>, cc: CacheControl) -> Plan {
        let deterministic = temperature == Some(0.0);
        if (!deterministic && !self.cache_sampled) || cc.no_store {
            return Plan {
                lookup: false,
                store: false,
                max_age: None,
            };
        }
        Plan {
            lookup: !cc.no_cache,
            store: true,
            max_age: cc.max_age,
        }
    }
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
}

/// Redis (ElastiCache Redis/Valkey): one string per entry with a TTL,
/// through the shared connection, with a short timeout; a Redis that fails
/// is skipped for a while by [`RedisLink`].
pub struct RedisCache {
    link: Arc<RedisLink>,
    timeout: Duration,
}

impl RedisCache {
    pub fn new(link: Arc<RedisLink>, timeout: Duration) -> Self {
        Self { link, timeout }
    }

    fn redis_key(key: &str) -> String {
        format!("cache:{{{}}}", tag(key))
    }
}

impl ResponseCache for RedisCache {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<CachedAnswer>, CacheError>> {
        Box::pin(async move {
            let mut pipe = redis::pipe();
            pipe.get(Self::redis_key(key));
            let (raw,): (Option<String>,) = self
                .link
                .pipe(&pipe, self.timeout)
                .await
                .ok_or(CacheError::Unavailable)?;
            // An entry that does not parse (an older format) is a miss.
            Ok(raw.and_then(|r| serde_json::from_str(&r).ok()))
        })
    }

    fn put<'a>(
        &'a self,
        key: &'a str,
        answer: &'a CachedAnswer,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), CacheError>> {
        Box::pin(async move {
            let json = serde_json::to_string(answer).map_err(|_| CacheError::Unavailable)?;
            let mut pipe = redis::pipe();
            pipe.set_ex(Self::redis_key(key), json, ttl.as_secs().max(1))
                .ignore();
            self.link
                .pipe::<()>(&pipe, self.timeout)
                .await
                .ok_or(CacheError::Unavailable)
        })
    }
}

/// A backend that failed is skipped for a while, so a dead backend costs
/// one timeout, not one per request.
struct Skip(std::sync::Mutex<Option<std::time::Instant>>);

impl Skip {
    const FOR: Duration = Duration::from_secs(2);

    fn active(&self) -> bool {
        let g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        g.is_some_and(|t| std::time::Instant::now() < t)
    }

    fn record<T, E: std::fmt::Display>(
        &self,
        r: Result<Result<T, E>, tokio::time::error::Elapsed>,
    ) -> Result<T, CacheError> {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match r {
            Ok(Ok(v)) => {
                *g = None;
                Ok(v)
            }
            Ok(Err(e)) => {
                if g.is_none() {
                    tracing::warn!(error = %e, "cache backend failed; skipping it for 2 s");
                }
                *g = Some(std::time::Instant::now() + Self::FOR);
                Err(CacheError::Unavailable)
            }
            Err(_) => {
                if g.is_none() {
                    tracing::warn!("cache backend timed out; skipping it for 2 s");
                }
                *g = Some(std::time::Instant::now() + Self::FOR);
                Err(CacheError::Unavailable)
            }
        }
    }
}

/// DynamoDB with TTL (`CACHE#{key}` items in the chat table): for
/// deployments without a VPC. Reads are eventually consistent; expired
/// items are ignored (DynamoDB's TTL deletes them later, within days).
/// Items are capped by DynamoDB's 400 KB: larger answers are not cached.
pub struct DynamoCache {
    store: Arc<crate::store::Store>,
    timeout: Duration,
    skip: Skip,
}

/// Answers whose stored JSON is over this are not cached in DynamoDB.
pub const DYNAMO_ENTRY_MAX_BYTES: usize = 350_000;

impl DynamoCache {
    pub fn new(store: Arc<crate::store::Store>, timeout: Duration) -> Self {
        Self {
            store,
            timeout,
            skip: Skip(std::sync::Mutex::new(None)),
        }
    }
}

impl ResponseCache for DynamoCache {
    fn name(&self) -> &'static str {
        "dynamodb"
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<CachedAnswer>, CacheError>> {
        Box::pin(async move {
            if self.skip.active() {
                return Err(CacheError::Unavailable);
            }
            let got = self
                .skip
                .record(tokio::time::timeout(self.timeout, self.store.cache_get(key)).await)?;
            let now_secs = crate::turn::now_ms() / 1000;
            Ok(got
                .filter(|(_, expires)| *expires > now_secs)
                .and_then(|(json, _)| serde_json::from_str(&json).ok()))
        })
    }

    fn put<'a>(
        &'a self,
        key: &'a str,
        answer: &'a CachedAnswer,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), CacheError>> {
        Box::pin(async move {
            let json = serde_json::to_string(answer).map_err(|_| CacheError::Unavailable)?;
            if json.len() > DYNAMO_ENTRY_MAX_BYTES {
                tracing::debug!(
                    bytes = json.len(),
                    "answer too large for a DynamoDB cache item"
                );
                return Ok(());
            }
            if self.skip.active() {
                return Err(CacheError::Unavailable);
            }
            let expires = answer.stored_at_ms / 1000 + ttl.as_secs().max(1);
            self.skip.record(
                tokio::time::timeout(self.timeout, self.store.cache_put(key, json, expires)).await,
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::Role;

    fn msgs(texts: &[&str]) -> Vec<Message> {
        texts
            .iter()
            .enumerate()
            .map(|(i, t)| Message {
                role: if i % 2 == 0 {
                    Role::User
                } else {
                    Role::Assistant
                },
                content: (*t).into(),
            })
            .collect()
    }

    fn key(scope: &str, model: &str, m: &[Message], temp: Option<f32>) -> String {
        cache_key(&KeyInput {
            scope,
            provider: "anthropic",
            model,
            system: Some("be brief"),
            messages: m,
            max_tokens: 100,
            temperature: temp,
        })
    }

    #[test]
    fn the_key_is_stable_and_covers_every_input() {
        let m = msgs(&["hi"]);
        let base = key("u1", "m", &m, Some(0.0));
        assert_eq!(base, key("u1", "m", &m, Some(0.0)));
        assert_eq!(base.len(), 64);
        assert_ne!(base, key("u2", "m", &m, Some(0.0)));
        assert_ne!(base, key("u1", "m2", &m, Some(0.0)));
        assert_ne!(base, key("u1", "m", &msgs(&["hi", "a", "hi"]), Some(0.0)));
        assert_ne!(base, key("u1", "m", &m, Some(0.5)));
        assert_ne!(base, key("u1", "m", &m, None));
    }

    #[test]
    fn a_key_document_reads_back_to_the_same_key() {
        let m = msgs(&["hi", "hello", "again"]);
        let input = KeyInput {
            scope: "user:u1",
            provider: "anthropic",
            model: "m",
            system: None,
            messages: &m,
            max_tokens: 64,
            temperature: Some(0.0),
        };
        let doc = cache_doc(&input);
        let spec = KeySpec::from_doc(&doc).unwrap();
        assert_eq!(cache_key(&spec.input()), key_of_doc(&doc));
        assert_eq!(spec.messages, m);
        assert!(KeySpec::from_doc("{\"format\":0,\"input\":{}}").is_none());
        assert!(KeySpec::from_doc("not json").is_none());
    }

    #[test]
    fn cache_control_directives() {
        assert_eq!(CacheControl::parse(""), CacheControl::default());
        let cc = CacheControl::parse("No-Cache, max-age=30, foo=bar");
        assert!(cc.no_cache && !cc.no_store);
        assert_eq!(cc.max_age, Some(Duration::from_secs(30)));
        assert!(CacheControl::parse("no-store").no_store);
        assert_eq!(CacheControl::parse("max-age=x").max_age, None);
        assert_eq!(
            CacheControl::parse("max-age=\"5\"").max_age,
            Some(Duration::from_secs(5))
        );
    }

    #[test]
    fn the_plan_follows_temperature_and_cache_control() {
        let p = CachePolicy {
            ttl: Duration::from_secs(60),
            cache_sampled: false,
        };
        let none = CacheControl::default();
        let all = Plan {
            lookup: true,
            store: true,
            max_age: None,
        };
        let nothing = Plan {
            lookup: false,
            store: false,
            max_age: None,
        };
        assert_eq!(p.plan(Some(0.0), none), all);
        assert_eq!(p.plan(Some(0.7), none), nothing);
        assert_eq!(
            p.plan(None, none),
            nothing,
            "absent = provider default, which samples"
        );
        let sampled = CachePolicy {
            cache_sampled: true,
            ..p
        };
        assert_eq!(sampled.plan(Some(0.7), none), all);
        let no_cache = CacheControl::parse("no-cache");
        assert_eq!(
            p.plan(Some(0.0), no_cache),
            Plan {
                lookup: false,
                store: true,
                max_age: None
            }
        );
        assert_eq!(p.plan(Some(0.0), CacheControl::parse("no-store")), nothing);
        assert_eq!(
            p.plan(Some(0.0), CacheControl::parse("max-age=10")).max_age,
            Some(Duration::from_secs(10))
        );
    }

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
