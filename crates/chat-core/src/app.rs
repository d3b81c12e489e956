//! The HTTP API as one axum [`Router`], served by Lambda (Function URL,
//! response streaming) and by the local server alike.
//!
//! Every response passes [`request_context`]: it assigns the request id,
//! adds `x-request-id` and `Server-Timing`, and writes the one JSON log line
//! per request (streams write theirs when they end, see [`crate::relay`]).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;

use crate::auth::{Authenticator, Identity};
use crate::config::Config;
use crate::error::{ApiError, UpstreamError};
use crate::fleet::Fleet;
use crate::history::RecentBuffer;
use crate::persist::Persister;
use crate::provider::Providers;
use crate::relay;
use crate::resilience::{BreakerState, RetryBudget};
use crate::store::Store;
use crate::validate::{body_too_large, parse_chat_request};

/// Shared, read-only after init (plus the health record).
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

struct Inner {
    config: Config,
    providers: Providers,
    /// One record per provider, by name.
    health: Vec<(&'static str, ModelHealth)>,
    fleet: Fleet,
    retry_budget: RetryBudget,
    deps: Deps,
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
    pub cache: Option<Arc<dyn crate::cache::ResponseCache>>,
    /// Resumable and followable answer streams, with Redis.
    pub live: Option<Arc<crate::live::Live>>,
    /// How often cacheable questions are asked, with Redis.
    pub popular: Option<Arc<crate::popular::Popularity>>,
}

impl AppState {
    pub fn new(config: Config, providers: Providers, fleet: Fleet, deps: Deps) -> Self {
        let health = providers
            .iter()
            .map(|p| (p.name(), ModelHealth::default()))
            .collect();
        // Retries may add at most `ratio` of the request rate; a quiet
        // function keeps a reserve of ten.
        let retry_budget = RetryBudget::new(config.resilience.retry_budget_ratio, 10.0);
        Self(Arc::new(Inner {
            config,
            providers,
            health,
            fleet,
            retry_budget,
            deps,
        }))
    }

    pub fn deps(&self) -> &Deps {
        &self.0.deps
    }

    /// Resolves the caller, before any other work; 401 without valid
    /// credentials.
    pub(crate) async fn authenticate(&self, headers: &HeaderMap) -> Result<Identity, ApiError> {
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
    pub(crate) fn health(&self, provider: &str) -> &ModelHealth {
        static NONE: std::sync::OnceLock<ModelHealth> = std::sync::OnceLock::new();
        self.0
            .health
            .iter()
            .find(|(n, _)| *n == provider)
            .map(|(_, h)| h)
            .unwrap_or_else(|| NONE.get_or_init(ModelHealth::default))
    }

    /// Opens (or re-checks) a connection to every provider in parallel,
    /// within `budget`, and records what it found in their health. Used for
    /// the pre-warm at init and by `/health?probe=1`. Gives each provider's
    /// latency in ms, or the error code.
    pub async fn check_providers(&self, budget: Duration) -> Vec<(&'static str, Probe)> {
        let checks = self.providers().iter().map(|p| async move {
            if !p.can_probe() {
                return (p.name(), Probe::Skipped);
            }
            let t = Instant::now();
            let result = match tokio::time::timeout(budget, p.prewarm()).await {
                Ok(Ok(())) => {
                    self.health(p.name()).record_ok();
                    Probe::Ok(ms(t.elapsed()))
                }
                Ok(Err(e)) => {
                    self.health(p.name()).record_error(&e);
                    Probe::Failed(e.code())
                }
                Err(_) => {
                    self.health(p.name())
                        .record_error(&UpstreamError::Timeout(crate::error::TimeoutKind::Connect));
                    Probe::Failed("upstream_timeout")
                }
            };
            (p.name(), result)
        });
        futures_util::future::join_all(checks).await
    }

    pub fn fleet(&self) -> &Fleet {
        &self.0.fleet
    }

    pub(crate) fn retry_budget(&self) -> &RetryBudget {
        &self.0.retry_budget
    }
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
    pub start: Instant,
    /// The client's address (`ip:ADDR`): the rate-limit identity of
    /// requests not yet authenticated.
    pub caller: Arc<str>,
}

/// The client's address: the last `X-Forwarded-For` entry (the one the
/// Function URL front end appended; earlier entries are the client's own
/// claims), else the socket peer in local server mode.
pub fn client_ip(headers: &HeaderMap, peer: Option<std::net::SocketAddr>) -> String {
    headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .next_back()
        .and_then(|v| v.rsplit(',').map(str::trim).find(|v| !v.is_empty()))
        .map(str::to_owned)
        .or_else(|| peer.map(|p| p.ip().to_string()))
        .unwrap_or_else(|| "unknown".to_owned())
}

/// Marks a response whose log line is written when its body ends.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LogDeferred;

/// The error code behind an error response, for the log line.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ErrorCode(pub &'static str);

pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/chat", post(chat))
        .route("/chat/streams/{id}", get(crate::resume::resume))
        .route("/health", get(health))
        .route("/conversations", get(crate::conversations::list))
        .route("/conversations/{id}", get(crate::conversations::show))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(request_context))
        .with_state(state)
}

pub(crate) fn new_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

fn incoming_request_id(headers: &HeaderMap) -> Option<Arc<str>> {
    let v = headers.get("x-request-id")?.to_str().ok()?;
    let ok = !v.is_empty()
        && v.len() <= 128
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
    ok.then(|| Arc::from(v))
}

pub(crate) fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

async fn request_context(mut req: Request, next: Next) -> Response {
    let start = Instant::now();
    let id = incoming_request_id(req.headers()).unwrap_or_else(|| Arc::from(new_id()));
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let peer = req
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0);
    let caller: Arc<str> = Arc::from(format!("ip:{}", client_ip(req.headers(), peer)));
    req.extensions_mut().insert(RequestCtx {
        id: id.clone(),
        start,
        caller,
    });

    let mut resp = next.run(req).await;

    let elapsed = start.elapsed();
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    if !resp.headers().contains_key("server-timing") {
        if let Ok(v) = HeaderValue::from_str(&format!("total;dur={:.3}", ms(elapsed))) {
            resp.headers_mut().insert("server-timing", v);
        }
    }
    if resp.extensions().get::<LogDeferred>().is_none() {
        let code = resp.extensions().get::<ErrorCode>().map(|c| c.0);
        tracing::info!(
            request_id = %id,
            method = %method,
            path = %path,
            status = resp.status().as_u16(),
            error_code = code,
            total_ms = ms(elapsed),
            "request"
        );
    }
    resp
}

/// The request's context (set by the middleware; a fresh one otherwise).
pub(crate) fn request_ctx(extensions: &axum::http::Extensions) -> RequestCtx {
    extensions
        .get::<RequestCtx>()
        .cloned()
        .unwrap_or_else(|| RequestCtx {
            id: Arc::from(new_id()),
            start: Instant::now(),
            caller: Arc::from("ip:unknown"),
        })
}

pub(crate) fn error_response(e: ApiError) -> Response {
    let code = e.code;
    let mut resp = e.into_response();
    resp.extensions_mut().insert(ErrorCode(code));
    resp
}

async fn not_found() -> Response {
    error_response(ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such route; see POST /chat, GET /conversations, GET /conversations/{id} and GET /health",
    ))
}

async fn method_not_allowed() -> Response {
    error_response(ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this route",
    ))
}

fn is_json_content_type(headers: &HeaderMap) -> bool {
    match headers.get(header::CONTENT_TYPE) {
        None => true, // be lenient with clients that send none
        Some(v) => v
            .to_str()
            .map(|s| {
                let mime = s
                    .split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_ascii_lowercase();
                mime == "application/json" || mime.ends_with("+json")
            })
            .unwrap_or(false),
    }
}

async fn chat(State(state): State<AppState>, req: Request) -> Response {
    match chat_inner(state, req).await {
        Ok(r) => r,
        Err(e) => error_response(e),
    }
}

async fn chat_inner(state: AppState, req: Request) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    let ctx = request_ctx(&parts.extensions);
    // Who is calling comes first: without valid credentials nothing else
    // happens (no body read, no rate-limit count, no history read).
    let identity = state.authenticate(&parts.headers).await?;
    let limits = state.config().limits;
    if !is_json_content_type(&parts.headers) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the body as Content-Type: application/json",
        ));
    }
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limits.max_body_bytes) {
        return Err(body_too_large(limits.max_body_bytes));
    }
    let bytes = read_body(body, limits.max_body_bytes).await?;
    let chat_req = parse_chat_request(&bytes, &limits)?;
    let cache_control = parts
        .headers
        .get(header::CACHE_CONTROL)
        .and_then(|v| v.to_str().ok())
        .map(crate::cache::CacheControl::parse)
        .unwrap_or_default();
    relay::start(state, ctx, identity, chat_req, cache_control).await
}

async fn read_body(body: Body, limit: usize) -> Result<bytes::Bytes, ApiError> {
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        let inner = e.into_inner();
        if inner.is::<http_body_util::LengthLimitError>() {
            body_too_large(limit)
        } else {
            ApiError::bad_request(
                "body_read_failed",
                format!("could not read the request body: {inner}"),
            )
        }
    })
}

/// What we last saw of the model provider: lets `/health` report its state
/// without calling it.
#[derive(Default)]
pub(crate) struct ModelHealth(Mutex<HealthInner>);

#[derive(Default)]
struct HealthInner {
    last_ok: Option<Instant>,
    last_error: Option<(Instant, &'static str)>,
    consecutive_failures: u32,
}

impl ModelHealth {
    fn lock(&self) -> std::sync::MutexGuard<'_, HealthInner> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn record_ok(&self) {
        let mut h = self.lock();
        h.last_ok = Some(Instant::now());
        h.consecutive_failures = 0;
    }

    /// Only failures that say something about the provider count; a request
    /// the provider rejected as invalid does not make it unhealthy.
    pub(crate) fn record_error(&self, e: &UpstreamError) {
        let provider_fault = e.retryable()
            || matches!(
                e,
                UpstreamError::Status {
                    status: 401 | 403,
                    ..
                }
            );
        if provider_fault {
            let mut h = self.lock();
            h.last_error = Some((Instant::now(), e.code()));
            h.consecutive_failures += 1;
        }
    }

    fn snapshot(&self) -> serde_json::Value {
        let h = self.lock();
        let state = match (h.last_ok, h.consecutive_failures) {
            (_, n) if n >= 3 => "failing",
            (_, n) if n > 0 => "degraded",
            (Some(_), _) => "ok",
            (None, _) => "unknown",
        };
        json!({
            "state": state,
            "consecutive_failures": h.consecutive_failures,
            "last_success_ms_ago": h.last_ok.map(|t| t.elapsed().as_millis() as u64),
            "last_error": h.last_error.map(|(t, code)| json!({"code": code, "ms_ago": t.elapsed().as_millis() as u64})),
        })
    }
}

/// `GET /health`: each dependency's last known state. `?probe=1` also
/// checks the model provider live (a connection, no tokens), and answers
/// 503 if that fails.
async fn health(State(state): State<AppState>, req: Request) -> Response {
    let probe_requested = req.uri().query().is_some_and(|q| {
        q.split('&')
            .any(|kv| kv == "probe" || kv == "probe=1" || kv == "probe=true")
    });
    let circuits: serde_json::Map<String, serde_json::Value> = state
        .fleet()
        .local_breakers()
        .states(Instant::now())
        .into_iter()
        .map(|(k, st)| {
            let word = match st {
                BreakerState::Closed => "closed",
                BreakerState::Open => "open",
                BreakerState::HalfOpen => "half_open",
            };
            (k, json!(word))
        })
        .collect();
    let probes = if probe_requested {
        state.check_providers(Duration::from_secs(3)).await
    } else {
        Vec::new()
    };
    let mut ok = true;
    let mut degraded = false;
    let mut deps = serde_json::Map::new();
    for p in state.providers().iter() {
        let mut dep = state.health(p.name()).snapshot();
        degraded |= matches!(dep["state"].as_str(), Some("failing") | Some("degraded"));
        if let Some((_, result)) = probes.iter().find(|(n, _)| *n == p.name()) {
            dep["probe"] = match result {
                Probe::Ok(latency) => json!({"ok": true, "latency_ms": latency}),
                Probe::Failed(code) => {
                    ok = false;
                    json!({"ok": false, "error": code})
                }
                Probe::Skipped => {
                    json!({"ok": null, "skipped": "this provider has no token-free call"})
                }
            };
        }
        deps.insert(p.name().to_owned(), dep);
    }
    let redis = state.fleet().redis_health(probe_requested).await;
    // Redis down degrades (limits become per instance); it never fails chat.
    degraded |= redis == "down";
    deps.insert(
        "redis".to_owned(),
        json!({"state": redis, "scope": if redis == "ok" { "fleet" } else { "instance" }}),
    );
    if let Some(store) = &state.deps().store {
        // Conversations need the table; chat without history still works
        // when it is down (turns then wait on the queue), so it degrades.
        let (table_state, latency) = if probe_requested {
            let t = Instant::now();
            match store.probe().await {
                Ok(()) => ("ok", Some(ms(t.elapsed()))),
                Err(_) => ("down", None),
            }
        } else {
            ("configured", None)
        };
        degraded |= table_state == "down";
        deps.insert(
            "dynamodb".to_owned(),
            json!({"state": table_state, "table": store.table(), "latency_ms": latency}),
        );
    }
    if let Some(p) = &state.deps().persister {
        let q = p.queue_health();
        degraded |= matches!(q, "failing" | "degraded");
        deps.insert("sqs".to_owned(), json!({"state": q}));
    }
    deps.insert(
        "auth".to_owned(),
        json!({"method": state.deps().auth.method()}),
    );
    let status_word = if !ok {
        "down"
    } else if degraded {
        "degraded"
    } else {
        "ok"
    };
    let body = json!({
        "status": status_word,
        "version": env!("CARGO_PKG_VERSION"),
        "dependencies": deps,
        "circuits": circuits,
    });
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        [(header::CACHE_CONTROL, "no-store")],
        axum::Json(body),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ip_is_the_last_forwarded_entry_then_the_peer() {
        let peer = Some(std::net::SocketAddr::from(([10, 0, 0, 9], 5000)));
        let mut h = HeaderMap::new();
        assert_eq!(client_ip(&h, peer), "10.0.0.9");
        assert_eq!(client_ip(&h, None), "unknown");
        // A client can send its own X-Forwarded-For; the entry the front end
        // appended last is the one to trust.
        h.insert(
            "x-forwarded-for",
            HeaderValue::from_static("1.1.1.1, 203.0.113.7"),
        );
        assert_eq!(client_ip(&h, peer), "203.0.113.7");
    }
}
