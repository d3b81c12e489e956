//! model-sim: a stand-in for the Anthropic Messages API.
//!
//! It speaks the wire format on its own (it does not share code with
//! chat-core), so a misreading of the protocol cannot hide on both sides of
//! a test. Streaming and non-streaming `POST /v1/messages`, `GET /v1/models`
//! (used for connection pre-warming), plus `GET /sim/stats`,
//! `GET /sim/requests` and `POST /sim/reset` for tests and benchmarks.
//!
//! Latency, length and faults are set per process ([`SimConfig`]) and per
//! request ([`knobs`]). In tests, [`Sim::start`] runs it in-process on a
//! random port.
//!
//! Here: the routes and errors; `serve` runs the server, `parse` reads a
//! request in any of the wire formats, `answer` produces the answer, `stop`
//! applies stop sequences, [`text`] makes the words, [`eventstream`] frames
//! Bedrock's.

mod answer;
pub mod eventstream;
pub mod knobs;
mod parse;
mod serve;
mod stop;
pub mod text;

use answer::{Answer, full_answer, stream_answer};
use parse::{Parsed, parse_request};

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::time::Instant;

pub use knobs::{Fault, Knobs};
pub use serve::serve;

/// Process-wide settings.
#[derive(Debug, Clone, Default)]
pub struct SimConfig {
    pub knobs: Knobs,
    /// When set, requests must carry this `x-api-key`; otherwise any
    /// non-empty key is accepted.
    pub api_key: Option<String>,
}

/// Counters, readable over HTTP and in-process.
#[derive(Debug, Default)]
struct Stats {
    calls: AtomicU64,
    connections: AtomicU64,
    model_lists: AtomicU64,
    completed: AtomicU64,
    cancelled: AtomicU64,
}

const KEPT_REQUESTS: usize = 200;

pub struct SimState {
    config: SimConfig,
    stats: Stats,
    requests: Mutex<VecDeque<Value>>,
    /// How often each request (by seed and fault) has been faulted, for
    /// `times=N`.
    faulted: Mutex<std::collections::HashMap<u64, u32>>,
}

impl SimState {
    pub fn new(config: SimConfig) -> Arc<Self> {
        Arc::new(Self {
            config,
            stats: Stats::default(),
            requests: Mutex::new(VecDeque::new()),
            faulted: Mutex::new(std::collections::HashMap::new()),
        })
    }

    fn requests_lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Value>> {
        self.requests.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `POST /v1/messages` requests received (including those answered
    /// with a fault).
    pub fn calls(&self) -> u64 {
        self.stats.calls.load(Ordering::SeqCst)
    }
    /// TCP connections accepted: shows whether clients reuse connections.
    pub fn connections(&self) -> u64 {
        self.stats.connections.load(Ordering::SeqCst)
    }
    /// `GET /v1/models` requests (what clients use to pre-warm).
    pub fn model_lists(&self) -> u64 {
        self.stats.model_lists.load(Ordering::SeqCst)
    }
    /// Streams that reached `message_stop`.
    pub fn completed(&self) -> u64 {
        self.stats.completed.load(Ordering::SeqCst)
    }
    /// Streams whose client went away before the end.
    pub fn cancelled(&self) -> u64 {
        self.stats.cancelled.load(Ordering::SeqCst)
    }
    /// The most recent request bodies, oldest first.
    pub fn requests(&self) -> Vec<Value> {
        self.requests_lock().iter().cloned().collect()
    }
    /// Clears counters, recorded requests and `times=N` fault counts.
    pub fn reset_for_test(&self) {
        self.reset();
    }

    fn reset(&self) {
        self.stats.calls.store(0, Ordering::SeqCst);
        self.stats.completed.store(0, Ordering::SeqCst);
        self.stats.cancelled.store(0, Ordering::SeqCst);
        self.stats.connections.store(0, Ordering::SeqCst);
        self.stats.model_lists.store(0, Ordering::SeqCst);
        self.requests_lock().clear();
        self.faulted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }
}

pub fn router(state: Arc<SimState>) -> Router {
    Router::new()
        .route("/v1/messages", post(messages))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/model/{model_id}/converse-stream", post(converse_stream))
        .route("/model/{model_id}/converse", post(converse_once))
        .route("/v1/models", get(models))
        .route("/sim/stats", get(stats))
        .route("/sim/requests", get(requests))
        .route("/sim/reset", post(reset))
        .with_state(state)
}

/// A sim running in this process, on its own port; stopped on drop.
pub struct Sim {
    addr: SocketAddr,
    state: Arc<SimState>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Sim {
    /// Binds 127.0.0.1 on a free port and serves in the background.
    pub async fn start(config: SimConfig) -> std::io::Result<Sim> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let state = SimState::new(config);
        let task = tokio::spawn(serve(listener, state.clone(), std::future::pending()));
        Ok(Sim { addr, state, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
    pub fn state(&self) -> &Arc<SimState> {
        &self.state
    }
    pub fn calls(&self) -> u64 {
        self.state.calls()
    }
    pub fn completed(&self) -> u64 {
        self.state.completed()
    }
    pub fn cancelled(&self) -> u64 {
        self.state.cancelled()
    }
    pub fn connections(&self) -> u64 {
        self.state.connections()
    }
    pub fn model_lists(&self) -> u64 {
        self.state.model_lists()
    }
    pub fn requests(&self) -> Vec<Value> {
        self.state.requests()
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The wire format a request came in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wire {
    /// Anthropic Messages API (`POST /v1/messages`).
    Anthropic,
    /// OpenAI-compatible Chat Completions (`POST /v1/chat/completions`).
    OpenAi,
    /// Amazon Bedrock `ConverseStream` (`POST /model/{id}/converse-stream`).
    Bedrock,
}

fn error_response(
    wire: Wire,
    status: u16,
    kind: &str,
    message: &str,
    request_id: &str,
    retry_after: Option<u64>,
) -> Response {
    let body = match wire {
        Wire::Anthropic => json!({
            "type": "error",
            "error": {"type": kind, "message": message},
            "request_id": request_id,
        }),
        Wire::OpenAi => json!({
            "error": {"message": message, "type": kind, "code": kind, "param": null},
        }),
        Wire::Bedrock => json!({ "message": message }),
    };
    let (status, amzn_type) = match wire {
        Wire::Bedrock => bedrock_error(status),
        _ => (status, ""),
    };
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut resp = (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response();
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(request_id) {
        h.insert("request-id", v.clone());
        h.insert("x-request-id", v);
    }
    if let Some(s) = retry_after.and_then(|s| HeaderValue::from_str(&s.to_string()).ok()) {
        h.insert(header::RETRY_AFTER, s);
    }
    if !amzn_type.is_empty() {
        h.insert("x-amzn-errortype", HeaderValue::from_static(amzn_type));
    }
    h.insert(
        "x-should-retry",
        HeaderValue::from_static(if matches!(status, 408 | 409 | 429 | 500..=599) {
            "true"
        } else {
            "false"
        }),
    );
    resp
}

/// Bedrock names errors, and has fewer statuses than the other APIs.
fn bedrock_error(status: u16) -> (u16, &'static str) {
    match status {
        429 => (429, "ThrottlingException"),
        503 | 529 => (503, "ServiceUnavailableException"),
        400 | 413 => (400, "ValidationException"),
        401 | 403 => (403, "AccessDeniedException"),
        404 => (404, "ResourceNotFoundException"),
        408 => (408, "ModelTimeoutException"),
        _ => (500, "InternalServerException"),
    }
}

fn kind_for(status: u16) -> &'static str {
    match status {
        400 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        529 => "overloaded_error",
        _ => "api_error",
    }
}

async fn messages(State(st): State<Arc<SimState>>, headers: HeaderMap, body: Bytes) -> Response {
    handle(Wire::Anthropic, st, headers, body).await
}

/// Bedrock's request shape, restated in the fields `parse_request` reads.
fn bedrock_body(model_id: &str, body: &[u8], stream: bool) -> Result<Value, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("invalid JSON: {e}"))?;
    Ok(json!({
        "model": model_id,
        "max_tokens": v["inferenceConfig"]["maxTokens"],
        "temperature": v["inferenceConfig"]["temperature"],
        "system": v["system"],
        "messages": v["messages"],
        "stream": stream,
    }))
}

async fn converse_stream(
    State(st): State<Arc<SimState>>,
    axum::extract::Path(model_id): axum::extract::Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    converse(st, model_id, headers, body, true).await
}

async fn converse_once(
    State(st): State<Arc<SimState>>,
    axum::extract::Path(model_id): axum::extract::Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    converse(st, model_id, headers, body, false).await
}

async fn converse(
    st: Arc<SimState>,
    model_id: String,
    headers: HeaderMap,
    body: Bytes,
    stream: bool,
) -> Response {
    match bedrock_body(&model_id, &body, stream) {
        Ok(v) => handle(Wire::Bedrock, st, headers, Bytes::from(v.to_string())).await,
        Err(e) => {
            st.stats.calls.fetch_add(1, Ordering::SeqCst);
            error_response(
                Wire::Bedrock,
                400,
                "invalid_request_error",
                &e,
                "req_sim_bad",
                None,
            )
        }
    }
}

async fn chat_completions(
    State(st): State<Arc<SimState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    handle(Wire::OpenAi, st, headers, body).await
}

/// The token of an `Authorization: Bearer` header (scheme case-insensitive).
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

async fn handle(wire: Wire, st: Arc<SimState>, headers: HeaderMap, body: Bytes) -> Response {
    let n = st.stats.calls.fetch_add(1, Ordering::SeqCst) + 1;
    let request_id = format!("req_sim_{n:012}");
    let key = match wire {
        Wire::Bedrock => "",
        // The Messages API takes `x-api-key` or, as today's official SDKs
        // may send it, `Authorization: Bearer`.
        Wire::Anthropic => headers
            .get("x-api-key")
            .and_then(|v| v.to_str().ok())
            .or_else(|| bearer(&headers))
            .unwrap_or(""),
        Wire::OpenAi => bearer(&headers).unwrap_or(""),
    };
    let key_ok = match (&st.config.api_key, wire) {
        // Bedrock uses SigV4 from the caller's AWS credentials: the request
        // must be signed; the signature itself is not checked.
        (_, Wire::Bedrock) => headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("AWS4-HMAC-SHA256")),
        (Some(expected), _) => key == expected,
        // Anthropic always wants a key; OpenAI-compatible local servers may not.
        (None, Wire::Anthropic) => !key.is_empty(),
        (None, Wire::OpenAi) => true,
    };
    if !key_ok {
        return error_response(
            wire,
            401,
            "authentication_error",
            "invalid API key",
            &request_id,
            None,
        );
    }
    if wire == Wire::Anthropic && headers.get("anthropic-version").is_none() {
        return error_response(
            wire,
            400,
            "invalid_request_error",
            "anthropic-version: header is required",
            &request_id,
            None,
        );
    }
    let value: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return error_response(
                wire,
                400,
                "invalid_request_error",
                &format!("invalid JSON: {e}"),
                &request_id,
                None,
            );
        }
    };
    {
        let mut q = st.requests_lock();
        if q.len() == KEPT_REQUESTS {
            q.pop_front();
        }
        q.push_back(value.clone());
    }
    let mut p = match parse_request(wire, &headers, &value, &st.config.knobs) {
        Ok(p) => p,
        Err(msg) => {
            return error_response(wire, 400, "invalid_request_error", &msg, &request_id, None);
        }
    };
    if let (Some(times), Some(fault)) = (p.knobs.fault_times, &p.knobs.fault) {
        // Counted per request and fault: "500 once" and "429 once" on the
        // same question are separate budgets.
        let key = text::fnv1a(&[&p.seed.to_string(), &format!("{fault:?}/{times}")]);
        let mut m = st.faulted.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(key).or_insert(0);
        if *n >= times {
            p.knobs.fault = None;
        } else {
            *n += 1;
        }
    }
    match &p.knobs.fault {
        Some(Fault::StallHeaders(d)) => tokio::time::sleep(*d).await,
        Some(Fault::Status { code, retry_after }) => {
            let kind = kind_for(*code);
            return error_response(
                wire,
                *code,
                kind,
                &format!("simulated {kind}"),
                &request_id,
                *retry_after,
            );
        }
        _ => {}
    }
    let n_tokens = p.knobs.output_tokens.min(p.max_tokens);
    let capped = p.knobs.output_tokens > p.max_tokens;
    let mut tokens = if p.knobs.echo {
        // The message's words, each with the space before it, as tokens.
        let words: Vec<String> = p
            .last_user
            .split_inclusive(' ')
            .map(str::to_owned)
            .take(n_tokens as usize)
            .collect();
        words
    } else {
        text::tokens(p.seed, n_tokens)
    };
    let stopped = stop::apply(&mut tokens, &p.stop);
    let msg_id = format!("{:016x}", p.seed ^ n);
    let answer = Answer {
        wire,
        tokens,
        capped: capped && !stopped,
        stopped,
        msg_id,
    };
    if p.stream {
        stream_answer(st, p, answer, request_id)
    } else {
        full_answer(st, p, answer, request_id).await
    }
}

async fn models(State(st): State<Arc<SimState>>) -> Response {
    st.stats.model_lists.fetch_add(1, Ordering::SeqCst);
    // One body that satisfies both APIs' list shapes.
    axum::Json(json!({
        "object": "list",
        "data": [{"type": "model", "object": "model", "id": "claude-sim", "display_name": "Model simulator",
                  "created_at": "2025-01-01T00:00:00Z", "created": 1_735_689_600, "owned_by": "model-sim"}],
        "has_more": false, "first_id": "claude-sim", "last_id": "claude-sim",
    }))
    .into_response()
}

async fn stats(State(st): State<Arc<SimState>>) -> Response {
    axum::Json(
        json!({"calls": st.calls(), "completed": st.completed(), "cancelled": st.cancelled()}),
    )
    .into_response()
}

async fn requests(State(st): State<Arc<SimState>>) -> Response {
    axum::Json(Value::Array(st.requests())).into_response()
}

async fn reset(State(st): State<Arc<SimState>>) -> Result<StatusCode, Infallible> {
    st.reset();
    Ok(StatusCode::NO_CONTENT)
}
