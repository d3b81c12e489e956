//! The Redis backend (ElastiCache Redis/Valkey).

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;

use super::{CacheError, CachedAnswer, ResponseCache};
use crate::redis::{RedisLink, tag};

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

    fn entry_key(key: &str) -> String {
        format!("cache:{{{}}}", tag(key))
    }

    /// Deletes the cached answers of `keys` (erasing a user); false when
    /// Redis did not answer. One command per key (each has its own slot).
    pub async fn delete(&self, keys: &[String]) -> bool {
        let mut ok = true;
        for k in keys {
            let mut pipe = redis::pipe();
            pipe.del(Self::entry_key(k)).ignore();
            ok &= self.link.pipe::<()>(&pipe, self.timeout).await.is_some();
        }
        ok
    }
}

impl ResponseCache for RedisCache {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<CachedAnswer>, CacheError>> {
        Box::pin(async move {
            let mut pipe = redis::pipe();
            pipe.get(Self::entry_key(key));
            let (raw,): (Option<String>,) = self
                .link
                .pipe(&pipe, self.timeout)
                .await
                .ok_or(CacheError::Unavailable)?;
            Ok(raw.as_deref().and_then(CachedAnswer::parse))
        })
    }

    fn redis_key(&self, key: &str) -> Option<String> {
        Some(Self::entry_key(key))
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
            pipe.set_ex(Self::entry_key(key), json, ttl.as_secs().max(1))
                .ignore();
            self.link
                .pipe::<()>(&pipe, self.timeout)
                .await
                .ok_or(CacheError::Unavailable)
        })
    }
}
