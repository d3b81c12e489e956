//! chat-core: everything with logic lives here; the binaries are thin.
//!
//! - [`config`]: typed configuration from an injectable source.
//! - [`provider`]: the model provider trait and the Anthropic client.
//! - [`sse`]: Server-Sent Events parsing and encoding.
//! - [`app`]: the axum router (`POST /chat`, `GET /health`) shared by the
//!   Lambda and local modes; [`relay`] streams one answer.
//! - [`server`]: the local HTTP server mode.

pub mod app;
pub mod auth;
pub mod cache;
pub mod config;
mod conversations;
pub mod error;
pub mod fleet;
pub mod history;
pub mod http;
pub mod live;
pub mod logging;
pub mod persist;
pub mod popular;
pub mod provider;
mod relay;
pub mod resilience;
mod resume;
pub mod routing;
pub mod secrets;
pub mod server;
pub mod sse;
pub mod store;
pub mod turn;
pub mod validate;
pub mod warmer;
pub mod writer;

use std::sync::Arc;
use std::time::Duration;

pub use app::{AppState, app};
pub use config::{Config, ConfigError};

use provider::anthropic::AnthropicProvider;
use provider::bedrock::BedrockProvider;
use provider::openai::OpenAiProvider;
use provider::{ModelProvider, Providers};

/// The AWS SDK configuration every client shares, loaded once (region and
/// credentials from the environment; `AWS_ENDPOINT_URL` points it at a
/// local stand-in). Short timeouts: these calls sit next to a user's chat.
pub async fn aws_sdk_config(attempt: Duration, operation: Duration) -> aws_config::SdkConfig {
    let timeouts = aws_config::timeout::TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(1))
        .operation_attempt_timeout(attempt)
        .operation_timeout(operation)
        .build();
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .timeout_config(timeouts)
        .load()
        .await
}

/// Who is calling DynamoDB, which sets how long a call may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreRole {
    /// chat-stream: reads next to a user's request; short.
    Request,
    /// db-writer: transactions of up to 100 actions; a timed-out attempt
    /// that did commit only shows up as duplicates on the retry.
    Writer,
}

/// The table client for `table`.
pub async fn store_for(table: &str, retention: Option<Duration>, role: StoreRole) -> store::Store {
    let (attempt, total) = match role {
        StoreRole::Request => (Duration::from_secs(2), Duration::from_secs(6)),
        StoreRole::Writer => (Duration::from_secs(10), Duration::from_secs(25)),
    };
    store_with_timeouts(table, retention, attempt, total).await
}

/// The table client with explicit per-attempt and total call timeouts.
pub async fn store_with_timeouts(
    table: &str,
    retention: Option<Duration>,
    attempt: Duration,
    total: Duration,
) -> store::Store {
    let sdk = aws_sdk_config(attempt, total).await;
    store::Store::new(aws_sdk_dynamodb::Client::new(&sdk), table, retention)
}

/// Authentication, storage, the history buffer and the turn producer.
async fn build_deps(
    config: &Config,
    redis: Option<Arc<fleet::RedisLink>>,
) -> Result<app::Deps, InitError> {
    let store = match &config.persistence {
        Some(p) => Some(Arc::new(
            store_for(&p.table, p.retention, StoreRole::Request).await,
        )),
        None => None,
    };
    let cache: Option<Arc<dyn cache::ResponseCache>> = match (&config.cache, &redis) {
        // The shared Redis guard: a failure costs one REDIS_TIMEOUT_MS,
        // then Redis is skipped (near zero) for 2 s and tried again.
        (Some(c), Some(r)) if c.backend == config::CacheBackend::Redis => Some(Arc::new(
            cache::RedisCache::new(r.clone(), config.redis_timeout),
        )),
        // Its own client with one short timeout and no retry (a miss is
        // cheaper than waiting): a slow table costs one timeout, then it is
        // skipped for 2 s like Redis.
        (Some(c), _) if c.backend == config::CacheBackend::DynamoDb => {
            let limit = c.dynamodb_timeout;
            let table = c.dynamodb_table.as_deref().unwrap_or_default();
            let store = store_with_timeouts(table, None, limit, limit).await;
            Some(Arc::new(cache::DynamoCache::new(Arc::new(store), limit)))
        }
        _ => None,
    };
    let live = match (&config.live, &redis) {
        (Some(l), Some(r)) => Some(Arc::new(live::Live::new(
            r.clone(),
            config.redis_timeout,
            *l,
        ))),
        _ => None,
    };
    let popular = match (config.cache.as_ref().and_then(|c| c.popularity), &redis) {
        (Some(p), Some(r)) => Some(Arc::new(popular::Popularity::new(
            r.clone(),
            config
                .redis_timeout
                .max(std::time::Duration::from_millis(250)),
            p,
        ))),
        _ => None,
    };
    let buffer = redis.map(|r| Arc::new(history::RecentBuffer::new(r, config.history)));
    let persister = match (&config.persistence, &store) {
        (Some(p), Some(store)) => {
            let queue = match &p.queue_url {
                Some(url) => {
                    // Brief: SQS trouble falls back to a direct write.
                    let sdk = aws_sdk_config(p.queue_timeout * 2 / 5, p.queue_timeout).await;
                    let mut conf = aws_sdk_sqs::config::Builder::from(&sdk);
                    if let Some(endpoint) = &p.sqs_endpoint_url {
                        conf = conf.endpoint_url(endpoint);
                    }
                    Some(persist::Queue {
                        client: aws_sdk_sqs::Client::from_conf(conf.build()),
                        url: url.clone(),
                    })
                }
                None => None,
            };
            Some(Arc::new(persist::Persister::new(
                store.clone(),
                queue,
                buffer.clone(),
            )))
        }
        _ => None,
    };
    let auth: Arc<dyn auth::Authenticator> = match &config.auth {
        config::AuthMode::Dev => {
            tracing::warn!(
                "AUTH_MODE=dev: callers are NOT authenticated (x-dev-user is trusted); local use only"
            );
            Arc::new(auth::DevAuth)
        }
        config::AuthMode::ApiKey { hashes } => {
            let fixed = match hashes {
                Some(src) => {
                    let list = secrets::resolve_api_key(src).await?;
                    auth::parse_hash_list(list.expose())
                        .map_err(|e| ConfigError::new("API_KEY_HASHES_SECRET_ARN", e))?
                }
                None => Default::default(),
            };
            Arc::new(auth::ApiKeyAuth::new(fixed, store.clone()))
        }
    };
    Ok(app::Deps {
        auth,
        store,
        buffer,
        persister,
        cache,
        live,
        popular,
    })
}

/// Why the process could not start.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("could not build the HTTP client")]
    Http(#[from] reqwest::Error),
}

/// Builds everything a handler needs, once per process: resolves the API
/// keys, builds the one pooled client and the configured providers, and
/// pre-warms their connections in parallel when configured (a failed
/// pre-warm is logged, not fatal: the first request simply pays for the
/// connection).
pub async fn build_state(config: Config) -> Result<AppState, InitError> {
    let client = http::build_client(config.timeouts.connect)?;
    let mut list: Vec<Arc<dyn ModelProvider>> = Vec::new();
    if let Some(a) = &config.anthropic {
        let key = secrets::resolve_api_key(&a.api_key).await?;
        list.push(Arc::new(AnthropicProvider::new(
            client.clone(),
            &a.base_url,
            key,
            &a.version,
        )));
    }
    if let Some(o) = &config.openai {
        let key = match &o.api_key {
            Some(src) => Some(secrets::resolve_api_key(src).await?),
            None => None,
        };
        list.push(Arc::new(OpenAiProvider::new(
            client.clone(),
            &o.base_url,
            key,
        )));
    }
    if let Some(b) = &config.bedrock {
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
        if let Some(region) = &b.region {
            loader = loader.region(aws_config::Region::new(region.clone()));
        }
        let sdk = loader.load().await;
        let mut conf = aws_sdk_bedrockruntime::config::Builder::from(&sdk);
        if let Some(url) = &b.endpoint_url {
            conf = conf.endpoint_url(url);
        }
        list.push(Arc::new(BedrockProvider::new(
            aws_sdk_bedrockruntime::Client::from_conf(conf.build()),
        )));
    }
    let providers = Providers::new(list);
    let budget = config.timeouts.connect + Duration::from_secs(2);
    let prewarm = config.prewarm;
    let redis = match &config.redis_url {
        Some(url) => Some(Arc::new(
            fleet::RedisLink::new(url.expose(), config.redis_timeout).map_err(|e| {
                ConfigError::new("REDIS_URL", format!("not a usable Redis URL: {e}"))
            })?,
        )),
        None => None,
    };
    let deps = build_deps(&config, redis.clone()).await?;
    let fleet = fleet::Fleet::new(redis, config.rate_limits, config.resilience.breaker);
    let state = AppState::new(config, providers, fleet, deps);
    if prewarm {
        for (name, result) in state.check_providers(budget).await {
            match result {
                app::Probe::Ok(ms) => {
                    tracing::info!(provider = name, ms, "upstream connection pre-warmed")
                }
                app::Probe::Failed(code) => {
                    tracing::warn!(provider = name, error_code = code, "pre-warm failed")
                }
                app::Probe::Skipped => {}
            }
        }
    }
    Ok(state)
}
