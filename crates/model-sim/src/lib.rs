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

pub mod eventstream;
pub mod knobs;
mod stop;
pub mod text;

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

/// Serves the sim on `listener` until `shutdown` resolves, counting
/// connections.
pub async fn serve(
    listener: TcpListener,
    state: Arc<SimState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    let counter = state.clone();
    let listener = listener.tap_io(move |tcp| {
        counter.stats.connections.fetch_add(1, Ordering::SeqCst);
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
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

/// The text of a message's `content`: a string, or an array of blocks.
fn content_text(content: &Value) -> Option<String> {
    match content {
        Value::String(s) => Some(s.clone()),
        Value::Array(blocks) => Some(
            blocks
                .iter()
                .filter(|b| b["type"] == "text" || (b["type"].is_null() && b["text"].is_string()))
                .filter_map(|b| b["text"].as_str())
                .collect::<Vec<_>>()
                .join(""),
        ),
        _ => None,
    }
}

/// What the sim needs from a valid request.
struct Parsed {
    model: String,
    max_tokens: u32,
    stream: bool,
    /// OpenAI `stream_options.include_usage`.
    include_usage: bool,
    knobs: Knobs,
    seed: u64,
    input_tokens: u32,
    /// Stop sequences: the answer ends before the first one it contains.
    stop: Vec<String>,
}

fn parse_request(
    wire: Wire,
    headers: &HeaderMap,
    body: &Value,
    defaults: &Knobs,
) -> Result<Parsed, String> {
    let model = body["model"].as_str().ok_or("model: field required")?;
    let max_tokens = match wire {
        Wire::Anthropic => Some(&body["max_tokens"]),
        Wire::Bedrock => Some(&body["max_tokens"]).filter(|v| !v.is_null()),
        Wire::OpenAi => [&body["max_completion_tokens"], &body["max_tokens"]]
            .into_iter()
            .find(|v| !v.is_null()),
    };
    let max_tokens = match max_tokens {
        Some(v) => v
            .as_u64()
            .filter(|n| *n >= 1)
            .ok_or("max_tokens: must be a positive integer")?,
        None => 4096,
    };
    let messages = body["messages"]
        .as_array()
        .filter(|m| !m.is_empty())
        .ok_or("messages: at least one message is required")?;
    // The same conversation gets the same answer in either wire format:
    // system text and turns are hashed the same way.
    let mut system = match &body["system"] {
        Value::Null => String::new(),
        v if wire != Wire::OpenAi => {
            content_text(v).ok_or("system: must be a string or text blocks")?
        }
        _ => return Err("system: not a Chat Completions field; send a system message".into()),
    };
    let mut texts = Vec::with_capacity(messages.len());
    let mut last_role = "";
    for (i, m) in messages.iter().enumerate() {
        let role = m["role"].as_str().unwrap_or("");
        let text = content_text(&m["content"])
            .ok_or_else(|| format!("messages.{i}.content: field required"))?;
        match (wire, role) {
            (_, "user" | "assistant") => {
                texts.push(format!("{role}:{text}"));
                last_role = role;
            }
            (Wire::OpenAi, "system" | "developer") => system.push_str(&text),
            _ => return Err(format!("messages.{i}.role: {role:?} is not allowed here")),
        }
    }
    if last_role != "user" {
        return Err("messages: the last message must have role user".into());
    }
    let mut knobs = defaults.clone();
    let base = knobs.apply_model_suffix(model)?;
    for (h, k) in [
        ("x-sim-ttft-ms", "ttft"),
        ("x-sim-tps", "tps"),
        ("x-sim-tokens", "tokens"),
        ("x-sim-fault", "fault"),
        ("x-sim-times", "times"),
    ] {
        if let Some(v) = headers.get(h).and_then(|v| v.to_str().ok()) {
            knobs.set(k, v)?;
        }
    }
    let mut parts: Vec<&str> = vec![base, &system];
    parts.extend(texts.iter().map(String::as_str));
    let seed = text::fnv1a(&parts);
    let chars: usize = parts.iter().map(|p| p.len()).sum();
    Ok(Parsed {
        model: base.to_owned(),
        max_tokens: u32::try_from(max_tokens).unwrap_or(u32::MAX),
        stream: body["stream"].as_bool().unwrap_or(false),
        include_usage: body["stream_options"]["include_usage"]
            .as_bool()
            .unwrap_or(false),
        knobs,
        seed,
        input_tokens: u32::try_from(chars / 4).unwrap_or(u32::MAX).max(1),
        stop: stop::sequences(wire, body)?,
    })
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
    let mut tokens = text::tokens(p.seed, n_tokens);
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

/// One answer being produced, in one wire format.
struct Answer {
    wire: Wire,
    tokens: Vec<String>,
    /// Cut short by `max_tokens`.
    capped: bool,
    /// Ended before a stop sequence.
    stopped: bool,
    msg_id: String,
}

impl Answer {
    fn stop_reason(&self) -> &'static str {
        if self.stopped {
            return match self.wire {
                Wire::Anthropic => "stop_sequence",
                Wire::OpenAi => "stop",
                Wire::Bedrock => "stop_sequence",
            };
        }
        match (self.wire, self.capped) {
            (Wire::Anthropic, false) => "end_turn",
            (Wire::Anthropic, true) => "max_tokens",
            (Wire::OpenAi, false) => "stop",
            (Wire::OpenAi, true) => "length",
            (Wire::Bedrock, false) => "end_turn",
            (Wire::Bedrock, true) => "max_tokens",
        }
    }

    fn openai_chunk(&self, p: &Parsed, delta: Value, finish: Option<&str>) -> Bytes {
        data_line(&json!({
            "id": format!("chatcmpl-sim{}", self.msg_id), "object": "chat.completion.chunk",
            "created": 1_735_689_600, "model": p.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }))
    }

    fn start_frames(&self, p: &Parsed) -> Vec<Bytes> {
        match self.wire {
            Wire::Anthropic => vec![
                event(
                    "message_start",
                    &json!({"type": "message_start", "message": {
                        "id": format!("msg_sim_{}", self.msg_id), "type": "message", "role": "assistant",
                        "content": [], "model": p.model, "stop_reason": null, "stop_sequence": null,
                        "usage": {"input_tokens": p.input_tokens, "output_tokens": 1}
                    }}),
                ),
                event(
                    "content_block_start",
                    &json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
                ),
                event("ping", &json!({"type": "ping"})),
            ],
            Wire::OpenAi => {
                vec![self.openai_chunk(p, json!({"role": "assistant", "content": ""}), None)]
            }
            // Text answers get no contentBlockStart (Bedrock sends one only
            // for tool use).
            Wire::Bedrock => vec![eventstream::event(
                "messageStart",
                &json!({"role": "assistant"}),
            )],
        }
    }

    fn delta_frame(&self, p: &Parsed, tok: &str) -> Bytes {
        match self.wire {
            Wire::Anthropic => event(
                "content_block_delta",
                &json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": tok}}),
            ),
            Wire::OpenAi => self.openai_chunk(p, json!({"content": tok}), None),
            Wire::Bedrock => eventstream::event(
                "contentBlockDelta",
                &json!({"contentBlockIndex": 0, "delta": {"text": tok}}),
            ),
        }
    }

    fn end_frames(&self, p: &Parsed) -> Vec<Bytes> {
        let n = self.tokens.len();
        match self.wire {
            Wire::Anthropic => vec![
                event(
                    "content_block_stop",
                    &json!({"type": "content_block_stop", "index": 0}),
                ),
                event(
                    "message_delta",
                    &json!({"type": "message_delta", "delta": {"stop_reason": self.stop_reason(), "stop_sequence": null},
                            "usage": {"output_tokens": n}}),
                ),
                event("message_stop", &json!({"type": "message_stop"})),
            ],
            Wire::OpenAi => {
                let mut v = vec![self.openai_chunk(p, json!({}), Some(self.stop_reason()))];
                if p.include_usage {
                    v.push(data_line(&json!({
                        "id": format!("chatcmpl-sim{}", self.msg_id), "object": "chat.completion.chunk",
                        "created": 1_735_689_600, "model": p.model, "choices": [],
                        "usage": {"prompt_tokens": p.input_tokens, "completion_tokens": n,
                                  "total_tokens": p.input_tokens as usize + n},
                    })));
                }
                v.push(Bytes::from_static(b"data: [DONE]\n\n"));
                v
            }
            Wire::Bedrock => vec![
                eventstream::event("contentBlockStop", &json!({"contentBlockIndex": 0})),
                eventstream::event("messageStop", &json!({"stopReason": self.stop_reason()})),
                eventstream::event(
                    "metadata",
                    &json!({"usage": {"inputTokens": p.input_tokens, "outputTokens": n,
                                      "totalTokens": p.input_tokens as usize + n},
                            "metrics": {"latencyMs": 1}}),
                ),
            ],
        }
    }

    fn error_frame(&self, kind: &str) -> Bytes {
        let message = format!("simulated {kind}");
        match self.wire {
            Wire::Anthropic => event(
                "error",
                &json!({"type": "error", "error": {"type": kind, "message": message}}),
            ),
            Wire::OpenAi => {
                data_line(&json!({"error": {"message": message, "type": kind, "code": kind}}))
            }
            Wire::Bedrock => {
                let exception = match kind {
                    "rate_limit_error" => "throttlingException",
                    "overloaded_error" => "serviceUnavailableException",
                    _ => "modelStreamErrorException",
                };
                eventstream::exception(exception, &message)
            }
        }
    }
}

fn event(name: &str, data: &Value) -> Bytes {
    Bytes::from(format!("event: {name}\ndata: {data}\n\n"))
}

fn data_line(data: &Value) -> Bytes {
    Bytes::from(format!("data: {data}\n\n"))
}

type Frame = Result<Bytes, std::io::Error>;

/// Waits until `until`, or returns false early if the client went away.
async fn pause(tx: &mpsc::Sender<Frame>, until: Instant) -> bool {
    tokio::select! {
        _ = tokio::time::sleep_until(until) => true,
        _ = tx.closed() => false,
    }
}

fn stream_answer(st: Arc<SimState>, p: Parsed, answer: Answer, request_id: String) -> Response {
    let content_type = match answer.wire {
        Wire::Bedrock => "application/vnd.amazon.eventstream",
        _ => "text/event-stream; charset=utf-8",
    };
    let (tx, rx) = mpsc::channel::<Frame>(32);
    tokio::spawn(async move {
        match produce(&tx, &p, &answer).await {
            Some(true) => {
                st.stats.completed.fetch_add(1, Ordering::SeqCst);
            }
            Some(false) => {}
            None => {
                st.stats.cancelled.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        h.insert("request-id", v.clone());
        h.insert("x-request-id", v.clone());
        h.insert("x-amzn-requestid", v);
    }
    resp
}

/// Writes one streamed answer. `Some(true)`: complete; `Some(false)`: ended
/// by a fault on purpose; `None`: the client went away.
async fn produce(tx: &mpsc::Sender<Frame>, p: &Parsed, a: &Answer) -> Option<bool> {
    let send = |b: Bytes| async move { tx.send(Ok(b)).await.ok() };
    for f in a.start_frames(p) {
        send(f).await?;
    }
    let mut first_at = Instant::now() + p.knobs.ttft;
    if let Some(Fault::StallFirst(d)) = &p.knobs.fault {
        first_at += *d;
    }
    let total = a.tokens.len() as u32;
    let mid = match &p.knobs.fault {
        Some(
            Fault::StallMid { after, .. }
            | Fault::DropMid { after }
            | Fault::ErrorMid { after, .. },
        ) => Some(Knobs::fault_point(*after, total)),
        _ => None,
    };
    let mut shift = Duration::ZERO;
    for i in 0..=total {
        if mid == Some(i) {
            match &p.knobs.fault {
                Some(Fault::StallMid { pause: d, .. }) => {
                    shift += *d;
                    if !pause(tx, Instant::now() + *d).await {
                        return None;
                    }
                }
                Some(Fault::DropMid { .. }) => {
                    // An error from the body stream makes the server abort
                    // the connection without finishing the chunked body.
                    let _ = tx
                        .send(Err(std::io::Error::new(
                            std::io::ErrorKind::ConnectionAborted,
                            "simulated drop",
                        )))
                        .await;
                    return Some(false);
                }
                Some(Fault::ErrorMid { kind, .. }) => {
                    send(a.error_frame(kind)).await?;
                    return Some(false);
                }
                _ => {}
            }
        }
        let Some(tok) = a.tokens.get(i as usize) else {
            break;
        };
        if !pause(tx, first_at + p.knobs.token_offset(i) + shift).await {
            return None;
        }
        send(a.delta_frame(p, tok)).await?;
    }
    for f in a.end_frames(p) {
        send(f).await?;
    }
    Some(true)
}

async fn full_answer(st: Arc<SimState>, p: Parsed, a: Answer, request_id: String) -> Response {
    let total = a.tokens.len() as u32;
    let mut wait = p.knobs.ttft + p.knobs.token_offset(total.saturating_sub(1));
    match &p.knobs.fault {
        Some(Fault::StallFirst(d)) | Some(Fault::StallMid { pause: d, .. }) => wait += *d,
        // Without a stream there is no "middle": these become a 500.
        Some(Fault::DropMid { .. }) | Some(Fault::ErrorMid { .. }) => {
            return error_response(
                a.wire,
                500,
                "api_error",
                "simulated api_error",
                &request_id,
                None,
            );
        }
        _ => {}
    }
    tokio::time::sleep(wait).await;
    st.stats.completed.fetch_add(1, Ordering::SeqCst);
    let text = a.tokens.concat();
    let body = match a.wire {
        Wire::Anthropic => json!({
            "id": format!("msg_sim_{}", a.msg_id), "type": "message", "role": "assistant", "model": p.model,
            "content": [{"type": "text", "text": text}],
            "stop_reason": a.stop_reason(), "stop_sequence": null,
            "usage": {"input_tokens": p.input_tokens, "output_tokens": total},
        }),
        Wire::Bedrock => json!({
            "output": {"message": {"role": "assistant", "content": [{"text": text}]}},
            "stopReason": a.stop_reason(),
            "usage": {"inputTokens": p.input_tokens, "outputTokens": total, "totalTokens": p.input_tokens + total},
            "metrics": {"latencyMs": 1},
        }),
        Wire::OpenAi => json!({
            "id": format!("chatcmpl-sim{}", a.msg_id), "object": "chat.completion", "created": 1_735_689_600,
            "model": p.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": a.stop_reason()}],
            "usage": {"prompt_tokens": p.input_tokens, "completion_tokens": total, "total_tokens": p.input_tokens + total},
        }),
    };
    let mut resp = (StatusCode::OK, axum::Json(body)).into_response();
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        resp.headers_mut().insert("request-id", v);
    }
    resp
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
