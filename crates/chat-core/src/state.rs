//! What the handlers share: every client, built once per process by
//! [`crate::init`], held in an [`AppState`]; and each request's context
//! ([`RequestCtx`]).
//!
//! Uses everything below `api` and `chat` and `config`. Nothing below
//! imports it back except `chat` and `api`, which receive an
//! [`AppState`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::HeaderMap;

use crate::auth::{Authenticator, Identity};
use crate::cache::popular::Popularity;
use crate::cache::{self, ResponseCache};
use crate::config::Config;
use crate::error::{ApiError, TimeoutKind, UpstreamError};
use crate::limits::{
    Circuits, FailedSignIns, RateLimiter, RateLimits, RetryBudget, StreamSlots, TableCounters,
};
use crate::live::Live;
use crate::persistence::history::RecentBuffer;
use crate::persistence::producer::Persister;
use crate::persistence::store::Store;
use crate::provider::Providers;
use crate::provider::health::ModelHealth;
use crate::redis::RedisLink;
use crate::util::{ms, new_id};

/// Shared, read-only after init (plus the health record). Cheap to clone.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

struct Inner {
    config: Config,
    providers: Providers,
    /// One record per provider, by name.
    health: Vec<(&'static str, ModelHealth)>,
    redis: Option<Arc<RedisLink>>,
    limiter: Arc<RateLimiter>,
    /// The GET and DELETE routes' requests per minute per user.
    reads: Arc<RateLimiter>,
    sign_ins: FailedSignIns,
    streams: Arc<StreamSlots>,
    stops: Arc<crate::chat::stop::Stops>,
    circuits: Circuits,
    retry_budget: RetryBudget,
    deps: Deps,
    /// The last `/health?probe=1` answer and when it was made.
    probe_cache: tokio::sync::Mutex<Option<CachedProbe>>,
}

/// A probe's answer, reused for a few seconds so `/health?probe=1` cannot
/// be turned into load on the providers and the table.
pub struct CachedProbe {
    pub at: tokio::time::Instant,
    pub status: axum::http::StatusCode,
    pub body: serde_json::Value,
}

/// Who is calling, and where conversations live.
pub struct Deps {
    pub auth: Arc<dyn Authenticator>,
    /// The table, when persistence is on.
    pub store: Option<Arc<Store>>,
    /// The recent-turns buffer, when Redis is configured.
    pub buffer: Option<Arc<RecentBuffer>>,
    /// Makes finished turns durable, when persistence is on.
    pub persister: Option<Arc<Persister>>,
    /// The response cache, when on.
    pub cache: Option<Arc<dyn ResponseCache>>,
    /// The instance's copies of recent answers, in front of `cache`.
    pub local: Option<Arc<cache::LocalAnswers>>,
    /// Resumable and followable answer streams, with Redis.
    pub live: Option<Arc<Live>>,
    /// How often cacheable questions are asked, with Redis.
    pub popular: Option<Arc<Popularity>>,
    /// Fleet-wide limit counters in the table, when there is a table and
    /// no Redis.
    pub counters: Option<Arc<TableCounters>>,
}

impl AppState {
    pub fn new(
        config: Config,
        providers: Providers,
        redis: Option<Arc<RedisLink>>,
        deps: Deps,
    ) -> Self {
        let health = providers
            .iter()
            .map(|p| (p.name(), ModelHealth::default()))
            .collect();
        // Retries may add at most `ratio` of the request rate; a quiet
        // function keeps a reserve of ten.
        let retry_budget = RetryBudget::new(config.resilience.retry_budget_ratio, 10.0);
        let counters = deps.counters.clone();
        let shared =
            |limits| Arc::new(RateLimiter::shared(redis.clone(), counters.clone(), limits));
        let limiter = shared(config.rate_limits);
        let abuse = config.abuse;
        let reads = shared(RateLimits {
            rpm: abuse.read_rpm,
            tpm: 0,
        });
        let sign_ins = FailedSignIns::new(shared(RateLimits {
            rpm: abuse.auth_failures_per_ip,
            tpm: 0,
        }));
        // A slot outlives the longest answer by a minute, then expires.
        let streams = Arc::new(StreamSlots::new(
            redis.clone(),
            counters,
            abuse.max_streams_per_user,
            config.timeouts.total + Duration::from_secs(60),
        ));
        let circuits = Circuits::new(redis.clone(), config.resilience.breaker);
        Self(Arc::new(Inner {
            config,
            providers,
            health,
            redis,
            limiter,
            reads,
            sign_ins,
            streams,
            stops: Arc::default(),
            circuits,
            retry_budget,
            deps,
            probe_cache: tokio::sync::Mutex::new(None),
        }))
    }

    pub fn deps(&self) -> &Deps {
        &self.0.deps
    }

    /// Resolves the caller, before any other work; 401 without valid
    /// credentials.
    pub async fn authenticate(&self, headers: &HeaderMap) -> Result<Identity, ApiError> {
        self.0
            .deps
            .auth
            .authenticate(headers)
            .await
            .map_err(ApiError::from)
    }

    pub fn config(&self) -> &Config {
        &self.0.config
    }

    pub fn providers(&self) -> &Providers {
        &self.0.providers
    }

    /// The health record of a provider (a shared dummy for unknown names).
    pub fn health(&self, provider: &str) -> &ModelHealth {
        health_of(&self.0.health, provider)
    }

    /// Opens (or re-checks) a connection to every provider in parallel,
    /// within `budget`, and records what it found in their health. Used for
    /// the pre-warm at init and by `/health?probe=1`.
    pub async fn check_providers(&self, budget: Duration) -> Vec<(&'static str, Probe)> {
        check_providers(self.providers(), &self.0.health, budget).await
    }

    /// The cached `/health?probe=1` answer (see [`CachedProbe`]).
    pub fn probe_cache(&self) -> &tokio::sync::Mutex<Option<CachedProbe>> {
        &self.0.probe_cache
    }

    pub fn limiter(&self) -> &Arc<RateLimiter> {
        &self.0.limiter
    }

    pub fn read_limiter(&self) -> &Arc<RateLimiter> {
        &self.0.reads
    }

    pub fn sign_ins(&self) -> &FailedSignIns {
        &self.0.sign_ins
    }

    pub fn streams(&self) -> &Arc<StreamSlots> {
        &self.0.streams
    }

    /// The answers that may be stopped, and how (see [`crate::chat::stop`]).
    pub fn stops(&self) -> &Arc<crate::chat::stop::Stops> {
        &self.0.stops
    }

    pub fn circuits(&self) -> &Circuits {
        &self.0.circuits
    }

    pub fn retry_budget(&self) -> &RetryBudget {
        &self.0.retry_budget
    }

    /// Redis as a dependency: `not_configured`, `ok` or `down` (then rate
    /// limits and breakers are per instance).
    pub async fn redis_health(&self, probe: bool) -> &'static str {
        match &self.0.redis {
            None => "not_configured",
            Some(r) => r.health(probe).await,
        }
    }
}

fn health_of<'a>(list: &'a [(&'static str, ModelHealth)], provider: &str) -> &'a ModelHealth {
    static NONE: std::sync::OnceLock<ModelHealth> = std::sync::OnceLock::new();
    list.iter()
        .find(|(n, _)| *n == provider)
        .map(|(_, h)| h)
        .unwrap_or_else(|| NONE.get_or_init(ModelHealth::default))
}

async fn check_providers(
    providers: &Providers,
    health: &[(&'static str, ModelHealth)],
    budget: Duration,
) -> Vec<(&'static str, Probe)> {
    let checks = providers.iter().map(|p| async move {
        if !p.can_probe() {
            return (p.name(), Probe::Skipped);
        }
        let h = health_of(health, p.name());
        let t = Instant::now();
        let result = match tokio::time::timeout(budget, p.prewarm()).await {
            Ok(Ok(())) => {
                h.record_ok();
                Probe::Ok(ms(t.elapsed()))
            }
            Ok(Err(e)) => {
                h.record_error(&e);
                Probe::Failed(e.code())
            }
            Err(_) => {
                h.record_error(&UpstreamError::Timeout(TimeoutKind::Connect));
                Probe::Failed("upstream_timeout")
            }
        };
        (p.name(), result)
    });
    futures_util::future::join_all(checks).await
}

/// What a live check of a provider found.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Probe {
    /// Reachable; latency in ms.
    Ok(f64),
    /// Failed with this error code.
    Failed(&'static str),
    /// The provider has no call that costs nothing; not checked.
    Skipped,
}

/// Per-request facts every handler may need.
#[derive(Clone, Debug)]
pub struct RequestCtx {
    pub id: Arc<str>,
    pub start: tokio::time::Instant,
    /// The client's address (`ip:ADDR`): the rate-limit identity of
    /// requests not yet authenticated.
    pub caller: Arc<str>,
    /// The route's path, for the log line a stream writes when it ends.
    pub path: Arc<str>,
    /// The request's root span (`request`): the phases' spans hang under
    /// it, and it carries the pseudonymous user once signed in.
    pub span: tracing::Span,
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for RequestCtx {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(RequestCtx::of(&parts.extensions))
    }
}

impl RequestCtx {
    /// The request's context (set by the middleware; a fresh one otherwise).
    pub fn of(extensions: &axum::http::Extensions) -> RequestCtx {
        extensions
            .get::<RequestCtx>()
            .cloned()
            .unwrap_or_else(|| RequestCtx {
                id: Arc::from(new_id()),
                start: tokio::time::Instant::now(),
                caller: Arc::from("ip:unknown"),
                path: Arc::from("/chat"),
                span: tracing::Span::none(),
            })
    }
}
