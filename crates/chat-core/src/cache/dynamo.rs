//! The DynamoDB backend: no VPC needed.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;

use super::{CacheError, CachedAnswer, ResponseCache};
use crate::persistence::store::Store;
use crate::util::now_ms;

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
    store: Arc<Store>,
    timeout: Duration,
    skip: Skip,
}

/// Answers whose stored JSON is over this are not cached in DynamoDB.
pub const DYNAMO_ENTRY_MAX_BYTES: usize = 350_000;

impl DynamoCache {
    pub fn new(store: Arc<Store>, timeout: Duration) -> Self {
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
            let now_secs = now_ms() / 1000;
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
