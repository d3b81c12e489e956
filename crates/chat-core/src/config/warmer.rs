//! cache-warmer's settings: only what it uses (the providers, Redis, the
//! cache, the breaker) and the budget of a run. No auth, no persistence.

use std::time::Duration;

use super::source::{ConfigSource, Reader};
use crate::cache::CacheConfig;
use crate::cache::warmer::WarmBudget;
use crate::chat::Timeouts;
use crate::error::ConfigError;
use crate::limits::BreakerConfig;
use crate::provider::ProviderSettings;
use crate::secrets::Secret;

#[derive(Debug, Clone, PartialEq)]
pub struct WarmerConfig {
    pub log_level: tracing::Level,
    pub providers: ProviderSettings,
    /// Only `connect` is used (the HTTP client's).
    pub timeouts: Timeouts,
    pub redis_url: Option<Secret>,
    pub redis_timeout: Duration,
    pub redis_cluster: bool,
    pub breaker: BreakerConfig,
    pub cache: Option<CacheConfig>,
    pub budget: WarmBudget,
    /// `--every SECS` / `EVERY`: run on a local timer (outside Lambda).
    pub every: Option<Duration>,
}

impl WarmerConfig {
    pub fn from_source(src: &(impl ConfigSource + ?Sized)) -> Result<Self, ConfigError> {
        let r = Reader(src);
        let providers = super::providers::providers(&r)?;
        let (timeouts, _) = super::providers::request(&r)?;
        let (redis_url, redis_timeout, redis_cluster) = super::stores::redis(&r)?;
        let persistence = super::stores::persistence(&r)?;
        let cache = super::stores::cache(&r, redis_url.as_ref(), persistence.as_ref())?;
        let ttl = cache
            .as_ref()
            .map_or(Duration::from_secs(3600), |c| c.policy.ttl);
        let every = match r.parse::<u64>("EVERY", 0, "a whole number of seconds")? {
            0 if r.string("EVERY").is_some() => {
                return Err(ConfigError::new("EVERY", "must be above 0 seconds"));
            }
            0 => None,
            s => Some(Duration::from_secs(s)),
        };
        Ok(Self {
            log_level: super::log_level(&r)?,
            breaker: super::providers::breaker(&r)?,
            budget: WarmBudget::from_source(src, ttl)?,
            providers,
            timeouts,
            redis_url,
            redis_timeout,
            redis_cluster,
            cache,
            every,
        })
    }
}

impl crate::cache::warmer::WarmBudget {
    /// The budget of one cache-warmer run (`WARM_*`; see the type). The
    /// refresh-ahead default is a fifth of `cache_ttl`.
    pub fn from_source(
        src: &(impl ConfigSource + ?Sized),
        cache_ttl: Duration,
    ) -> Result<Self, ConfigError> {
        let r = Reader(src);
        Ok(Self {
            top: r.ranged("WARM_TOP", 50usize, 1, 10_000)?,
            max_calls: r.ranged("WARM_MAX_CALLS", 20u32, 0, 100_000)?,
            max_tokens: r.ranged("WARM_MAX_TOKENS", 100_000u64, 0, 1_000_000_000)?,
            concurrency: r.ranged("WARM_CONCURRENCY", 4usize, 1, 256)?,
            time_limit: Duration::from_secs(r.ranged("WARM_TIME_LIMIT_SECS", 240u64, 1, 900)?),
            refresh_ahead: Duration::from_secs(r.ranged(
                "WARM_REFRESH_AHEAD_SECS",
                (cache_ttl.as_secs() / 5).max(1),
                0,
                30 * 86_400,
            )?),
        })
    }
}
