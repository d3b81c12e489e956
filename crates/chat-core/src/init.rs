//! Init: builds every client once per process from the assembled
//! configuration, into the [`AppState`] the handlers share or the
//! cache-warmer's [`Warmer`]; logs what init cost.
//!
//! Uses everything below `api` and `chat` (it builds them) and `config`
//! (with the mains, the only user of it).

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::auth::{self, AuthMode, Authenticator};
use crate::aws::aws_sdk_config;
use crate::cache::popular::Popularity;
use crate::cache::warmer::Warmer;
use crate::cache::{self, CacheBackend, CacheConfig, ResponseCache};
use crate::config::{Config, ConfigError, WarmerConfig};
use crate::limits::{Circuits, TableCounters};
use crate::live::Live;
use crate::persistence::PersistenceConfig;
use crate::persistence::history::RecentBuffer;
use crate::persistence::producer::{Persister, Queue};
use crate::persistence::store::{Store, StoreRole, store_for, store_with_timeouts};
use crate::provider::anthropic::AnthropicProvider;
use crate::provider::bedrock::BedrockProvider;
use crate::provider::openai::OpenAiProvider;
use crate::provider::{ModelProvider, ProviderSettings, Providers};
use crate::redis::RedisLink;
use crate::secrets::{RotatingKey, Secret, resolve_api_key};
use crate::state::{AppState, Deps, Probe};
use crate::util::ms;

/// Why the process could not start.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("could not build the HTTP client")]
    Http(#[from] reqwest::Error),
}

/// The configured providers, on one pooled HTTP client.
async fn build_providers(
    settings: &ProviderSettings,
    connect_timeout: Duration,
) -> Result<Providers, InitError> {
    let client = crate::http::build_client(connect_timeout, settings.http2_prior_knowledge)?;
    let mut list: Vec<Arc<dyn ModelProvider>> = Vec::new();
    if let Some(a) = &settings.anthropic {
        let key = resolve_api_key(&a.api_key).await?;
        list.push(Arc::new(AnthropicProvider::new(
            client.clone(),
            &a.base_url,
            RotatingKey::new(key, a.api_key.clone()),
            &a.version,
        )));
    }
    if let Some(o) = &settings.openai {
        let key = match &o.api_key {
            Some(src) => Some(RotatingKey::new(resolve_api_key(src).await?, src.clone())),
            None => None,
        };
        list.push(Arc::new(OpenAiProvider::new(
            client.clone(),
            &o.base_url,
            key,
        )));
    }
    if let Some(b) = &settings.bedrock {
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
    Ok(Providers::new(list))
}

/// The shared Redis connection (lazy: a Redis that is down at init is not
/// fatal).
fn build_redis(
    url: Option<&Secret>,
    timeout: Duration,
    cluster: bool,
) -> Result<Option<Arc<RedisLink>>, InitError> {
    let Some(url) = url else { return Ok(None) };
    let link = RedisLink::new(url.expose(), timeout, cluster)
        .map_err(|e| ConfigError::new("REDIS_URL", format!("not a usable Redis URL: {e}")))?;
    Ok(Some(Arc::new(link)))
}

/// The response cache and the popularity tracker, as configured.
async fn build_cache(
    config: Option<&CacheConfig>,
    redis: Option<&Arc<RedisLink>>,
    redis_timeout: Duration,
) -> (Option<Arc<dyn ResponseCache>>, Option<Arc<Popularity>>) {
    let cache: Option<Arc<dyn ResponseCache>> = match (config, redis) {
        // The shared Redis guard: a failure costs one REDIS_TIMEOUT_MS,
        // then Redis is skipped (near zero) for 2 s and tried again.
        (Some(c), Some(r)) if c.backend == CacheBackend::Redis => {
            Some(Arc::new(cache::RedisCache::new(r.clone(), redis_timeout)))
        }
        // Its own client with one short timeout and no retry (a miss is
        // cheaper than waiting): a slow table costs one timeout, then it is
        // skipped for 2 s like Redis.
        (Some(c), _) if c.backend == CacheBackend::DynamoDb => {
            let limit = c.dynamodb_timeout;
            let table = c.dynamodb_table.as_deref().unwrap_or_default();
            let store = store_with_timeouts(table, None, limit, limit).await;
            Some(Arc::new(cache::DynamoCache::new(Arc::new(store), limit)))
        }
        _ => None,
    };
    let popular = match (config.and_then(|c| c.popularity), redis) {
        (Some(p), Some(r)) => Some(Arc::new(Popularity::new(
            r.clone(),
            redis_timeout.max(Duration::from_millis(250)),
            p,
        ))),
        _ => None,
    };
    (cache, popular)
}

/// The queue producer (SQS, falling back to direct writes).
async fn build_persister(
    p: &PersistenceConfig,
    store: Arc<Store>,
    buffer: Option<Arc<RecentBuffer>>,
) -> Persister {
    let queue = match &p.queue_url {
        Some(url) => {
            // Brief: SQS trouble falls back to a direct write.
            let sdk = aws_sdk_config(p.queue_timeout * 2 / 5, p.queue_timeout).await;
            let mut conf = aws_sdk_sqs::config::Builder::from(&sdk);
            if let Some(endpoint) = &p.sqs_endpoint_url {
                conf = conf.endpoint_url(endpoint);
            }
            Some(Queue {
                client: aws_sdk_sqs::Client::from_conf(conf.build()),
                url: url.clone(),
            })
        }
        None => None,
    };
    let spool = crate::persistence::spool::Spool::new(p.spool.clone());
    Persister::new(store, queue, buffer, spool)
}

async fn build_auth(
    mode: &AuthMode,
    store: Option<Arc<Store>>,
    unknown_max: usize,
) -> Result<Arc<dyn Authenticator>, InitError> {
    async fn keys(
        hashes: &Option<crate::secrets::ApiKeySource>,
        store: Option<Arc<Store>>,
        unknown_max: usize,
    ) -> Result<auth::ApiKeyAuth, InitError> {
        let fixed = match hashes {
            Some(src) => {
                let list = resolve_api_key(src).await?;
                auth::parse_hash_list(list.expose())
                    .map_err(|e| ConfigError::new("API_KEY_HASHES_SECRET_ARN", e))?
            }
            None => Default::default(),
        };
        Ok(auth::ApiKeyAuth::new(fixed, store, unknown_max))
    }
    async fn tokens(config: &auth::JwtConfig) -> Result<Arc<auth::jwt::JwtAuth>, InitError> {
        let http = crate::http::build_client(Duration::from_secs(2), false)?;
        let jwt = Arc::new(auth::jwt::JwtAuth::new(config.clone(), http));
        // At init, so the first request does not wait for it; a failure is
        // logged and the first token tries again.
        jwt.prefetch().await;
        Ok(jwt)
    }
    Ok(match mode {
        AuthMode::Dev => {
            tracing::warn!(
                "AUTH_MODE=dev: callers are NOT authenticated (x-dev-user is trusted); local use only"
            );
            Arc::new(auth::DevAuth)
        }
        AuthMode::ApiKey { hashes } => Arc::new(keys(hashes, store, unknown_max).await?),
        AuthMode::Jwt(config) => tokens(config).await?,
        AuthMode::ApiKeyOrJwt { hashes, jwt } => Arc::new(auth::EitherAuth {
            keys: keys(hashes, store, unknown_max).await?,
            jwt: tokens(jwt).await?,
        }),
    })
}

/// Authentication, storage, the history buffer and the turn producer.
async fn build_deps(config: &Config, redis: Option<&Arc<RedisLink>>) -> Result<Deps, InitError> {
    let store = match &config.persistence {
        Some(p) => Some(Arc::new(
            store_for(&p.table, p.retention, StoreRole::Request).await,
        )),
        None => None,
    };
    let (cache, popular) = build_cache(config.cache.as_ref(), redis, config.redis_timeout).await;
    let local = match (&config.cache, &cache) {
        (Some(c), Some(_)) => cache::LocalAnswers::new(c.local, c.policy.ttl).map(Arc::new),
        _ => None,
    };
    let live = match (&config.live, redis) {
        (Some(l), Some(r)) => Some(Arc::new(Live::new(r.clone(), config.redis_timeout, *l))),
        _ => None,
    };
    let buffer = redis.map(|r| Arc::new(RecentBuffer::new(r.clone(), config.history)));
    let persister = match (&config.persistence, &store) {
        (Some(p), Some(store)) => Some(Arc::new(
            build_persister(p, store.clone(), buffer.clone()).await,
        )),
        _ => None,
    };
    // Without Redis, limits are shared through the table.
    let counters = match (&config.persistence, redis) {
        (Some(p), None) if config.abuse.table_enabled => Some(Arc::new(
            TableCounters::connect(&p.table, config.abuse.table_timeout).await,
        )),
        _ => None,
    };
    Ok(Deps {
        auth: build_auth(
            &config.auth,
            store.clone(),
            config.abuse.unknown_key_cache_max,
        )
        .await?,
        counters,
        store,
        buffer,
        persister,
        cache,
        local,
        live,
        popular,
    })
}

/// Builds everything a handler needs, once per process: resolves the API
/// keys, builds the one pooled client and the configured providers, and
/// pre-warms their connections in parallel when configured (a failed
/// pre-warm is logged, not fatal: the first request simply pays for the
/// connection).
pub async fn build_state(config: Config) -> Result<AppState, InitError> {
    let t = Instant::now();
    let providers = build_providers(&config.providers, config.timeouts.connect).await?;
    let providers_ms = ms(t.elapsed());
    let budget = config.timeouts.connect + Duration::from_secs(2);
    let prewarm = config.providers.prewarm;
    let t = Instant::now();
    let redis = build_redis(
        config.redis_url.as_ref(),
        config.redis_timeout,
        config.redis_cluster,
    )?;
    let deps = build_deps(&config, redis.as_ref()).await?;
    let clients_ms = ms(t.elapsed());
    let state = AppState::new(config, providers, redis, deps);
    let t = Instant::now();
    if prewarm {
        log_prewarm(state.check_providers(budget).await);
    }
    // What init costs, by step (the cold start's share that is ours).
    tracing::info!(
        providers_ms,
        clients_ms,
        prewarm_ms = ms(t.elapsed()),
        "chat-stream initialised"
    );
    Ok(state)
}

fn log_prewarm(results: Vec<(&'static str, Probe)>) {
    for (name, result) in results {
        match result {
            Probe::Ok(ms) => tracing::info!(provider = name, ms, "upstream connection pre-warmed"),
            Probe::Failed(code) => {
                tracing::warn!(provider = name, error_code = code, "pre-warm failed")
            }
            Probe::Skipped => {}
        }
    }
}

/// Builds the cache-warmer's clients once per process.
pub async fn build_warmer(config: &WarmerConfig) -> Result<Warmer, InitError> {
    let t = Instant::now();
    let providers = build_providers(&config.providers, config.timeouts.connect).await?;
    let providers_ms = ms(t.elapsed());
    let t = Instant::now();
    let redis = build_redis(
        config.redis_url.as_ref(),
        config.redis_timeout,
        config.redis_cluster,
    )?;
    let (cache, popular) =
        build_cache(config.cache.as_ref(), redis.as_ref(), config.redis_timeout).await;
    tracing::info!(
        providers_ms,
        clients_ms = ms(t.elapsed()),
        "cache-warmer initialised"
    );
    let ttl = config.cache.as_ref().map(|c| c.policy.ttl);
    Ok(Warmer {
        providers,
        circuits: Circuits::new(redis, config.breaker),
        cache: cache.zip(ttl),
        popular,
    })
}
