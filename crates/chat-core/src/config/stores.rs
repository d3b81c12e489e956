//! Shared state and storage: Redis, rate limits, the table and queue,
//! authentication, history, the response cache and live streams.

use std::time::Duration;

use super::source::{ConfigSource, Reader, url, valid_table_name};
use crate::cache::{CacheBackend, CacheConfig};
use crate::error::ConfigError;
use crate::persistence::PersistenceConfig;
use crate::secrets::Secret;

/// `REDIS_URL`, `REDIS_TIMEOUT_MS`, `REDIS_CLUSTER`.
pub(crate) fn redis<S: ConfigSource + ?Sized>(
    r: &Reader<'_, S>,
) -> Result<(Option<Secret>, Duration, bool), ConfigError> {
    let redis_url = r.string("REDIS_URL");
    if let Some(u) = &redis_url {
        if !(u.starts_with("redis://") || u.starts_with("rediss://")) {
            return Err(ConfigError::new(
                "REDIS_URL",
                "must start with redis:// or rediss://",
            ));
        }
    }
    let redis_timeout = r.ms("REDIS_TIMEOUT_MS", 50)?;
    let cluster = r.bool("REDIS_CLUSTER", false)?;
    Ok((redis_url.map(Secret::new), redis_timeout, cluster))
}

/// `RATE_LIMIT_RPM`, `RATE_LIMIT_TPM`.
pub(crate) fn rate_limits<S: ConfigSource + ?Sized>(
    r: &Reader<'_, S>,
) -> Result<crate::limits::RateLimits, ConfigError> {
    Ok(crate::limits::RateLimits {
        rpm: r.ranged("RATE_LIMIT_RPM", 60u32, 0, 1_000_000)?,
        tpm: r.ranged("RATE_LIMIT_TPM", 200_000u32, 0, 1_000_000_000)?,
    })
}

/// The abuse and spend limits (see [`crate::limits::AbuseLimits`]).
pub(crate) fn abuse<S: ConfigSource + ?Sized>(
    r: &Reader<'_, S>,
    persistence: Option<&PersistenceConfig>,
) -> Result<crate::limits::AbuseLimits, ConfigError> {
    let d = crate::limits::AbuseLimits::default();
    let limits = crate::limits::AbuseLimits {
        max_streams_per_user: r.ranged(
            "MAX_STREAMS_PER_USER",
            d.max_streams_per_user,
            0,
            10_000,
        )?,
        read_rpm: r.ranged("READ_RATE_LIMIT_RPM", d.read_rpm, 0, 1_000_000)?,
        auth_failures_per_ip: r.ranged(
            "AUTH_FAILURES_PER_IP_PER_MINUTE",
            d.auth_failures_per_ip,
            0,
            1_000_000,
        )?,
        daily_token_budget: r.ranged(
            "DAILY_TOKEN_BUDGET_PER_USER",
            d.daily_token_budget,
            0,
            1_000_000_000_000,
        )?,
        unknown_key_cache_max: r.ranged(
            "AUTH_UNKNOWN_KEY_CACHE_MAX",
            d.unknown_key_cache_max,
            0,
            1_000_000,
        )?,
        table_enabled: r.bool("LIMITS_TABLE_ENABLED", true)?,
        table_timeout: r.ms("LIMITS_DYNAMODB_TIMEOUT_MS", 250)?,
    };
    if limits.daily_token_budget > 0 && persistence.is_none() {
        return Err(ConfigError::new(
            "DAILY_TOKEN_BUDGET_PER_USER",
            "needs TABLE_NAME: the budget is checked against the usage counted in the table",
        ));
    }
    Ok(limits)
}

/// `TABLE_NAME`, `TURN_QUEUE_*`, `RETENTION_DAYS`: off without a table.
pub(crate) fn persistence<S: ConfigSource + ?Sized>(
    r: &Reader<'_, S>,
) -> Result<Option<PersistenceConfig>, ConfigError> {
    Ok(match r.string("TABLE_NAME") {
        None => None,
        Some(table) => {
            if !valid_table_name(&table) {
                return Err(ConfigError::new(
                    "TABLE_NAME",
                    format!("{table:?} is not a DynamoDB table name"),
                ));
            }
            let queue_url = match r.string("TURN_QUEUE_URL") {
                Some(_) => Some(url(r, "TURN_QUEUE_URL", "")?),
                None => None,
            };
            let days = r.ranged("RETENTION_DAYS", 0u64, 0, 36_500)?;
            let sqs_endpoint_url = match r.string("AWS_ENDPOINT_URL_SQS") {
                Some(_) => Some(url(r, "AWS_ENDPOINT_URL_SQS", "")?),
                None => None,
            };
            Some(PersistenceConfig {
                table,
                queue_url,
                sqs_endpoint_url,
                queue_timeout: r.ms("TURN_QUEUE_TIMEOUT_MS", 2_000)?,
                retention: (days > 0).then(|| Duration::from_secs(days * 86_400)),
                spool: crate::persistence::spool::SpoolConfig {
                    dir: r
                        .string("TURN_SPOOL_DIR")
                        .unwrap_or_else(|| "/tmp/turn-spool".to_owned())
                        .into(),
                    max_bytes: r.ranged(
                        "TURN_SPOOL_MAX_BYTES",
                        64 * 1024 * 1024u64,
                        0,
                        10 * 1024 * 1024 * 1024,
                    )?,
                    log_record: r.bool("TURN_LOST_LOG_RECORD", false)?,
                },
            })
        }
    })
}

/// `HISTORY_*`.
pub(crate) fn history<S: ConfigSource + ?Sized>(
    r: &Reader<'_, S>,
) -> Result<crate::persistence::history::HistoryLimits, ConfigError> {
    Ok(crate::persistence::history::HistoryLimits {
        max_turns: r.ranged("HISTORY_MAX_TURNS", 20u32, 1, 1000)?,
        max_tokens: r.ranged("HISTORY_MAX_TOKENS", 8_000u32, 1, 1_000_000)?,
        buffer_ttl: Duration::from_secs(r.ranged(
            "HISTORY_BUFFER_TTL_SECS",
            86_400u64,
            60,
            30 * 86_400,
        )?),
    })
}

/// `CACHE_*` and `POPULAR*`: the response cache, when on.
pub(crate) fn cache<S: ConfigSource + ?Sized>(
    r: &Reader<'_, S>,
    redis_url: Option<&Secret>,
    persistence: Option<&PersistenceConfig>,
) -> Result<Option<CacheConfig>, ConfigError> {
    let backend = match r
        .string("CACHE_BACKEND")
        .map(|v| v.to_ascii_lowercase())
        .as_deref()
    {
        None => CacheBackend::Redis,
        Some("redis") => CacheBackend::Redis,
        Some("dynamodb") => CacheBackend::DynamoDb,
        Some(other) => {
            return Err(ConfigError::new(
                "CACHE_BACKEND",
                format!("{other:?} is not redis or dynamodb"),
            ));
        }
    };
    let dynamodb_table = match r.string("CACHE_TABLE_NAME") {
        Some(t) if !valid_table_name(&t) => {
            return Err(ConfigError::new(
                "CACHE_TABLE_NAME",
                format!("{t:?} is not a DynamoDB table name"),
            ));
        }
        Some(t) => Some(t),
        None => persistence.map(|p| p.table.clone()),
    };
    let cache_default = match backend {
        CacheBackend::Redis => redis_url.is_some(),
        CacheBackend::DynamoDb => dynamodb_table.is_some(),
    };
    let popularity = match redis_url {
        Some(_) if r.bool("POPULARITY_ENABLED", true)? => {
            Some(crate::cache::popular::PopularityConfig {
                max_entries: r.ranged("POPULAR_MAX", 500u32, 10, 100_000)?,
                half_life: Duration::from_secs(r.ranged(
                    "POPULAR_HALF_LIFE_SECS",
                    21_600u64,
                    60,
                    30 * 86_400,
                )?),
            })
        }
        _ => None,
    };
    Ok(if r.bool("CACHE_ENABLED", cache_default)? {
        match backend {
            CacheBackend::Redis if redis_url.is_none() => {
                return Err(ConfigError::new(
                    "CACHE_ENABLED",
                    "the redis cache backend needs REDIS_URL (or set CACHE_BACKEND=dynamodb)",
                ));
            }
            CacheBackend::DynamoDb if dynamodb_table.is_none() => {
                return Err(ConfigError::new(
                    "CACHE_BACKEND",
                    "the dynamodb cache backend keeps entries in TABLE_NAME (or CACHE_TABLE_NAME); set it",
                ));
            }
            _ => {}
        }
        let global_scope = match r.string("CACHE_SCOPE").as_deref() {
            None | Some("user") => false,
            Some("global") => true,
            Some(other) => {
                return Err(ConfigError::new(
                    "CACHE_SCOPE",
                    format!("{other:?} is not user or global"),
                ));
            }
        };
        let ttl = Duration::from_secs(r.ranged("CACHE_TTL_SECS", 3600u64, 1, 30 * 86_400)?);
        let local = crate::cache::LocalConfig {
            max_bytes: r.ranged("CACHE_LOCAL_MB", 8u64, 0, 4096)? * 1024 * 1024,
            ttl: Duration::from_secs(r.ranged("CACHE_LOCAL_TTL_SECS", 60u64, 1, 86_400)?),
        };
        Some(CacheConfig {
            policy: crate::cache::CachePolicy {
                ttl,
                cache_sampled: r.bool("CACHE_SAMPLED", false)?,
            },
            backend,
            popularity,
            dynamodb_table,
            dynamodb_timeout: r.ms("CACHE_DYNAMODB_TIMEOUT_MS", 250)?,
            global_scope,
            local,
        })
    } else {
        None
    })
}

/// `LIVE_STREAMS_ENABLED`, `RESUME_RETENTION_SECS`, `COALESCE_*`,
/// `FINISH_ON_DISCONNECT`: live streams, with Redis.
pub(crate) fn live<S: ConfigSource + ?Sized>(
    r: &Reader<'_, S>,
    redis_url: Option<&Secret>,
    cache_on: bool,
) -> Result<Option<crate::live::LiveConfig>, ConfigError> {
    Ok(match redis_url {
        Some(_) if r.bool("LIVE_STREAMS_ENABLED", true)? => Some(crate::live::LiveConfig {
            retention: Duration::from_secs(r.ranged(
                "RESUME_RETENTION_SECS",
                300u64,
                10,
                86_400,
            )?),
            lease: Duration::from_millis(r.ranged("COALESCE_LEASE_MS", 3_000u64, 300, 60_000)?),
            coalesce: r.bool("COALESCE_ENABLED", true)? && cache_on,
            finish_on_disconnect: r.bool("FINISH_ON_DISCONNECT", true)?,
        }),
        _ => None,
    })
}
