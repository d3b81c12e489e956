//! Typed configuration, parsed once at init from an injectable source.
//!
//! Production reads the process environment ([`EnvSource`]); tests pass a
//! `HashMap`. Every variable is validated here, and a bad value fails init
//! with an error naming the variable, so a misconfigured function never
//! serves traffic. Secrets are wrapped in [`Secret`], whose `Debug` and
//! `Display` never show the value.
//!
//! Each feature owns its settings type (`provider::ProviderSettings`,
//! `cache::CacheConfig`, `limits::RateLimits`, ...); this folder reads the
//! source and assembles them: [`Config`] for chat-stream, [`WriterConfig`]
//! for db-writer, [`WarmerConfig`] for cache-warmer, each with only what
//! its binary uses. Used only by `init`, `state` and the mains.
//!
//! Layout: [`source`] (sources, flags, the validating reader),
//! `providers` (models, routing, retries, deadlines, request limits),
//! `stores` (Redis, table, auth, history, cache, live streams).

mod auth;
mod providers;
pub mod source;
mod stores;
#[cfg(test)]
mod tests;
mod warmer;
mod writer;

use std::net::SocketAddr;
use std::time::Duration;

pub use crate::error::ConfigError;
pub use crate::secrets::{ApiKeySource, Secret};
pub use source::{ConfigSource, EnvSource, Layered, flags_to_source};
pub use warmer::WarmerConfig;
pub use writer::WriterConfig;

use crate::auth::AuthMode;
use crate::cache::CacheConfig;
use crate::chat::Timeouts;
use crate::chat::attempt::Resilience;
use crate::chat::request::Limits;
use crate::persistence::PersistenceConfig;
use crate::provider::ProviderSettings;
use source::Reader;

/// chat-stream's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub bind_addr: SocketAddr,
    /// `CORS_ALLOW_ORIGINS` (comma list, `*` for any; default none): the
    /// local server's CORS policy, as the template's `CorsAllowOrigins`
    /// gives the Function URL. Not applied in Lambda.
    pub cors_allow_origins: Vec<String>,
    pub log_level: tracing::Level,
    pub providers: ProviderSettings,
    pub routing: crate::provider::routing::Routing,
    pub timeouts: Timeouts,
    pub limits: Limits,
    pub resilience: Resilience,
    /// `redis://` or `rediss://`; shares rate limits and breakers across
    /// instances. May hold a password, so it is a secret.
    pub redis_url: Option<Secret>,
    pub redis_timeout: Duration,
    /// `REDIS_CLUSTER` (default false): the server is a cluster, or a
    /// cluster-mode endpoint such as ElastiCache Serverless.
    pub redis_cluster: bool,
    pub rate_limits: crate::limits::RateLimits,
    pub abuse: crate::limits::AbuseLimits,
    pub auth: AuthMode,
    /// The response cache, when on (`CACHE_ENABLED`, default on with
    /// `REDIS_URL`).
    pub cache: Option<CacheConfig>,
    /// Resumable, followable answer streams (needs Redis; see
    /// [`crate::live`]).
    pub live: Option<crate::live::LiveConfig>,
    pub persistence: Option<PersistenceConfig>,
    pub history: crate::persistence::history::HistoryLimits,
}

fn log_level<S: ConfigSource + ?Sized>(r: &Reader<'_, S>) -> Result<tracing::Level, ConfigError> {
    r.parse(
        "LOG_LEVEL",
        tracing::Level::INFO,
        "one of error, warn, info, debug, trace",
    )
}

impl Config {
    pub fn from_source(src: &(impl ConfigSource + ?Sized)) -> Result<Self, ConfigError> {
        let r = Reader(src);
        let bind_addr = r.parse(
            "BIND_ADDR",
            SocketAddr::from(([127, 0, 0, 1], 3000)),
            "an address like 127.0.0.1:3000",
        )?;
        let providers = providers::providers(&r)?;
        let (timeouts, limits) = providers::request(&r)?;
        let (routing, resilience) = providers::models(&r, &providers)?;
        let (redis_url, redis_timeout, redis_cluster) = stores::redis(&r)?;
        let persistence = stores::persistence(&r)?;
        let cache = stores::cache(&r, redis_url.as_ref(), persistence.as_ref())?;
        let cors_allow_origins = r
            .string("CORS_ALLOW_ORIGINS")
            .map(|v| {
                v.split(',')
                    .map(|o| o.trim().trim_end_matches('/').to_owned())
                    .filter(|o| !o.is_empty())
                    .collect()
            })
            .unwrap_or_default();
        Ok(Config {
            cors_allow_origins,
            bind_addr,
            log_level: log_level(&r)?,
            routing,
            timeouts,
            limits,
            resilience,
            rate_limits: stores::rate_limits(&r)?,
            abuse: stores::abuse(&r, persistence.as_ref())?,
            auth: auth::auth(&r, persistence.as_ref())?,
            history: stores::history(&r)?,
            live: stores::live(&r, redis_url.as_ref(), cache.is_some())?,
            providers,
            cache,
            persistence,
            redis_url,
            redis_timeout,
            redis_cluster,
        })
    }
}
