//! The HTTP API as one axum [`Router`], served by Lambda (Function URL,
//! response streaming) and by the local server alike: one file per route
//! ([`chat`], [`conversations`], [`streams`], [`health`], and the
//! OpenAI-compatible [`openai`]), the middleware
//! and the mapping of errors to responses here.
//!
//! Every response passes [`request_context`]: it assigns the request id,
//! adds `x-request-id` and `Server-Timing`, and writes the one JSON log line
//! per request (streams write theirs when they end, see [`crate::chat`]).
//!
//! Uses: `chat`, `state`, `auth`, `live` (resume), `persistence` (reads).

mod admit;
mod chat;
mod conversations;

/// The CORS lists of the API: the template's Function URL uses the same
/// (a template test compares them; a test here checks every header the
/// API sends a browser is exposed).
pub const CORS_JSON: &str = include_str!("cors.json");
mod health;
pub mod openai;
mod streams;

use std::sync::Arc;

use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tracing::Instrument;

use crate::chat::LogDeferred;
use crate::error::ApiError;
use crate::state::{AppState, RequestCtx};
use crate::util::{ms, new_id};

/// The client's address as the platform saw it: in Lambda the Function
/// URL event's `requestContext.http.sourceIp` (set by the binary, see
/// [`with_client_addr`]), locally the socket's peer. Never a header the
/// client sends (`X-Forwarded-For` is the client's to write).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientAddr(pub String);

/// The client's address for limits and logs: [`ClientAddr`], else the
/// socket peer, else `unknown`.
pub fn client_ip(extensions: &axum::http::Extensions) -> String {
    if let Some(ClientAddr(a)) = extensions.get::<ClientAddr>() {
        return a.clone();
    }
    extensions
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip().to_string())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// Sets each request's [`ClientAddr`] from what `find` reads in its
/// extensions (the Lambda adapter's request context), before the API sees
/// it.
pub fn with_client_addr(
    router: Router,
    find: fn(&axum::http::Extensions) -> Option<String>,
) -> Router {
    router.layer(middleware::map_request(
        move |mut req: Request| async move {
            if let Some(a) = find(req.extensions()) {
                req.extensions_mut().insert(ClientAddr(a));
            }
            req
        },
    ))
}

/// Turns Nagle's algorithm off on the Runtime API connection as each
/// invocation starts, before its response streams back on it (Lambda
/// only: see [`crate::runtime_api`]).
pub fn with_runtime_nodelay(router: Router, endpoint: &str) -> Router {
    let socket = std::sync::Arc::new(crate::runtime_api::RuntimeSocket::new(endpoint));
    router.layer(middleware::map_request(move |req: Request| {
        socket.ensure();
        async move { req }
    }))
}

/// The invocation's X-Ray trace header: in Lambda the runtime's
/// (`Lambda-Runtime-Trace-Id`, set by the binary, see [`with_trace`]);
/// locally a client's `X-Amzn-Trace-Id` (see [`with_local_trace`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvocationTrace(pub String);

/// Sets each request's [`InvocationTrace`] from what `find` reads in its
/// extensions (the Lambda adapter's context).
pub fn with_trace(router: Router, find: fn(&axum::http::Extensions) -> Option<String>) -> Router {
    router.layer(middleware::map_request(
        move |mut req: Request| async move {
            if let Some(t) = find(req.extensions()) {
                req.extensions_mut().insert(InvocationTrace(t));
            }
            req
        },
    ))
}

/// The local server: a client's `X-Amzn-Trace-Id` header continues its
/// trace (what an ALB or API Gateway in front would pass on). Never in
/// Lambda, where the runtime's header is the only one.
pub fn with_local_trace(router: Router) -> Router {
    router.layer(middleware::map_request(|mut req: Request| async move {
        let t = req
            .headers()
            .get("x-amzn-trace-id")
            .and_then(|v| v.to_str().ok())
            .filter(|v| crate::obs::TraceHeader::parse(v).is_some())
            .map(str::to_owned);
        if let Some(t) = t {
            req.extensions_mut().insert(InvocationTrace(t));
        }
        req
    }))
}

/// The error code behind an error response, for the log line.
#[derive(Clone, Copy, Debug)]
pub struct ErrorCode(pub &'static str);

pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/chat", post(chat::chat))
        .route(
            "/chat/streams/{id}",
            get(streams::resume).delete(streams::stop),
        )
        .route("/health", get(health::health))
        .route("/conversations", get(conversations::list))
        .route(
            "/conversations/{id}",
            get(conversations::show).delete(conversations::delete),
        )
        .route("/v1/chat/completions", post(openai::completions))
        .route("/v1/models", get(openai::models))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(request_context))
        .with_state(state)
}

fn incoming_request_id(headers: &HeaderMap) -> Option<Arc<str>> {
    let v = headers.get("x-request-id")?.to_str().ok()?;
    let ok = !v.is_empty()
        && v.len() <= 128
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
    ok.then(|| Arc::from(v))
}

async fn request_context(mut req: Request, next: Next) -> Response {
    let start = tokio::time::Instant::now();
    let id = incoming_request_id(req.headers()).unwrap_or_else(|| Arc::from(new_id()));
    let method = req.method().clone();
    let path: Arc<str> = Arc::from(req.uri().path());
    let caller: Arc<str> = Arc::from(format!("ip:{}", client_ip(req.extensions())));
    let span = tracing::info_span!(
        "request",
        request_id = %id,
        method = %method,
        path = %path,
        trace_header = tracing::field::Empty,
        user = tracing::field::Empty,
        status = tracing::field::Empty,
    );
    if let Some(InvocationTrace(t)) = req.extensions().get::<InvocationTrace>() {
        span.record("trace_header", t.as_str());
    }
    req.extensions_mut().insert(RequestCtx {
        id: id.clone(),
        start,
        caller,
        path: path.clone(),
        span: span.clone(),
    });

    let mut resp = next.run(req).instrument(span.clone()).await;

    let elapsed = start.elapsed();
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    security_headers(resp.headers_mut());
    if !resp.headers().contains_key("server-timing") {
        if let Ok(v) = HeaderValue::from_str(&format!("total;dur={:.3}", ms(elapsed))) {
            resp.headers_mut().insert("server-timing", v);
        }
    }
    span.record("status", resp.status().as_u16());
    if resp.extensions().get::<LogDeferred>().is_none() {
        let code = resp.extensions().get::<ErrorCode>().map(|c| c.0);
        let _in = span.enter();
        // The log line and the metrics line in one write.
        crate::obs::log::together(|| {
            tracing::info!(
                request_id = %id,
                method = %method,
                path = %path,
                status = resp.status().as_u16(),
                error_code = code,
                total_ms = ms(elapsed),
                "request"
            );
            let cache = resp
                .headers()
                .get("x-cache")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            request_metrics(resp.status(), code, cache.as_deref(), elapsed).emit();
        });
    }
    resp
}

/// The metrics of a response that is not a streamed answer (those are
/// counted when the answer ends): every refusal and error, and cache hits.
fn request_metrics(
    status: StatusCode,
    code: Option<&'static str>,
    cache: Option<&str>,
    elapsed: std::time::Duration,
) -> crate::obs::emf::Metrics {
    let mut m = crate::obs::emf::Metrics::new()
        .ids()
        .dim("outcome", code.unwrap_or("ok"))
        .count("Requests", 1.0)
        .ms("Total", ms(elapsed));
    if status.is_server_error() {
        m = m.count("Errors", 1.0);
    }
    if status == StatusCode::TOO_MANY_REQUESTS {
        m = m.count("RateLimited", 1.0);
    }
    if code.is_some_and(|c| c.starts_with("upstream") || c == "model_unavailable") {
        m = m.count("UpstreamErrors", 1.0);
    }
    if cache == Some("hit") && status.is_success() {
        m = m.count("CacheHit", 1.0).ms("TimeToFirstToken", ms(elapsed));
    }
    m
}

/// On every response: the body is never sniffed into another type (an
/// answer rendered as HTML), no page is told where its user came from,
/// and no answer is stored by a browser or a shared cache (answers and
/// history are private; our own cache is server-side).
fn security_headers(h: &mut HeaderMap) {
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    if !h.contains_key(axum::http::header::CACHE_CONTROL) {
        h.insert(
            axum::http::header::CACHE_CONTROL,
            HeaderValue::from_static("no-store"),
        );
    }
}

pub fn error_response(e: ApiError) -> Response {
    let code = e.code;
    let mut resp = e.into_response();
    resp.extensions_mut().insert(ErrorCode(code));
    resp
}

async fn not_found() -> Response {
    error_response(ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such route; see POST /chat, GET /conversations, GET /conversations/{id}, GET /health, POST /v1/chat/completions and GET /v1/models",
    ))
}

async fn method_not_allowed() -> Response {
    error_response(ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this route",
    ))
}

/// The template's Function URL CORS policy, for the local server mode, so
/// a page behaves the same locally and deployed (`CORS_ALLOW_ORIGINS`, the
/// lists in `cors.json`). In Lambda the Function URL answers preflights and
/// adds the headers; the function adds none (duplicates break browsers).
///
/// `dev_user`: also allow the `x-dev-user` header, so a page on another
/// origin can name its user under `AUTH_MODE=dev` (local only: dev mode
/// refuses to start in Lambda, and the template's list never has it).
pub fn local_cors(origins: &[String], dev_user: bool) -> tower_http::cors::CorsLayer {
    use axum::http::{HeaderName, Method};
    use tower_http::cors::{AllowOrigin, CorsLayer};
    let lists: serde_json::Value = serde_json::from_str(CORS_JSON).unwrap_or_default();
    let names = |k: &str| -> Vec<HeaderName> {
        lists[k]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str()?.parse().ok())
            .collect()
    };
    let methods: Vec<Method> = lists["allow_methods"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str()?.parse().ok())
        .collect();
    let origin = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| o.parse().ok()))
    };
    CorsLayer::new()
        .allow_origin(origin)
        .allow_methods(methods)
        .allow_headers({
            let mut h = names("allow_headers");
            if dev_user {
                h.push(HeaderName::from_static(crate::auth::DEV_USER_HEADER));
            }
            h
        })
        .expose_headers(names("expose_headers"))
        .max_age(std::time::Duration::from_secs(
            lists["max_age"].as_u64().unwrap_or(3600),
        ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ip_is_the_platforms_address_then_the_peer() {
        let mut e = axum::http::Extensions::new();
        assert_eq!(client_ip(&e), "unknown");
        e.insert(axum::extract::ConnectInfo(std::net::SocketAddr::from((
            [10, 0, 0, 9],
            5000,
        ))));
        assert_eq!(client_ip(&e), "10.0.0.9");
        e.insert(ClientAddr("203.0.113.7".into()));
        assert_eq!(client_ip(&e), "203.0.113.7");
    }

    #[tokio::test]
    async fn a_client_sent_forwarded_for_is_not_its_address() {
        use tower::ServiceExt;
        let seen = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let s = seen.clone();
        let router = Router::new()
            .route(
                "/",
                get(move |req: Request| async move {
                    *s.lock().unwrap() = RequestCtx::of(req.extensions()).caller.to_string();
                    "ok"
                }),
            )
            .layer(middleware::from_fn(request_context));
        let router = with_client_addr(router, |_| Some("198.51.100.4".into()));
        let req = Request::builder()
            .uri("/")
            .header("x-forwarded-for", "1.1.1.1")
            .body(axum::body::Body::empty())
            .unwrap();
        let resp = router.oneshot(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(seen.lock().unwrap().as_str(), "ip:198.51.100.4");
    }
}
