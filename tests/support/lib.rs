//! Test support shared by the end-to-end tests of every crate.
//!
//! - [`read_sse`]: reads an SSE response the way a browser would, keeping
//!   each event's arrival time. Written independently of chat-core's parser
//!   so a parser bug cannot hide on both sides of a test.
//! - [`ChatServer`]: chat-stream's router on a real socket (port 0), the
//!   same code path `make run` and Lambda use.
//! - [`FakeRuntimeApi`]: a local Lambda Runtime API, so the real
//!   `chat-stream` binary can be driven through the Lambda streaming adapter
//!   with Function URL events from `events/`.
//!
//! - [`LocalAws`]: a fresh table and queues in moto, made by
//!   `scripts/local_aws.py` from template.yaml's own definitions.
//!
//! Test-only code: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::BodyExt;
use serde_json::Value;
use tokio::sync::{Mutex, mpsc, oneshot};

/// One SSE event as a client saw it.
#[derive(Debug, Clone)]
pub struct Event {
    pub id: Option<String>,
    pub event: String,
    pub data: Value,
    /// When its last byte arrived.
    pub at: Instant,
}

impl Event {
    pub fn text(&self) -> &str {
        self.data["text"].as_str().unwrap_or("")
    }
}

/// Parses complete events out of `buf`, leaving any partial event in it.
pub fn take_events(buf: &mut String, at: Instant, out: &mut Vec<Event>) {
    while let Some(end) = buf.find("\n\n") {
        let block: String = buf.drain(..end + 2).collect();
        let mut ev = Event {
            id: None,
            event: "message".into(),
            data: Value::Null,
            at,
        };
        let mut data = String::new();
        for line in block.lines() {
            if let Some(v) = line.strip_prefix("event: ") {
                ev.event = v.to_owned();
            } else if let Some(v) = line.strip_prefix("data: ") {
                data.push_str(v);
            } else if let Some(v) = line.strip_prefix("id: ") {
                ev.id = Some(v.to_owned());
            }
        }
        ev.data = serde_json::from_str(&data).unwrap_or(Value::String(data));
        out.push(ev);
    }
}

/// Reads the whole SSE body; gives up (panics) after `limit`, so a hang
/// fails the test instead of stalling it.
pub async fn read_sse(resp: reqwest::Response, limit: Duration) -> (Vec<Event>, Option<String>) {
    let mut stream = resp.bytes_stream();
    let mut buf = String::new();
    let mut events = Vec::new();
    let mut error = None;
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Err(_) => panic!("SSE stream did not end within {limit:?}; got {events:?}"),
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                error = Some(e.to_string());
                break;
            }
            Ok(Some(Ok(bytes))) => {
                buf.push_str(std::str::from_utf8(&bytes).expect("utf-8 SSE"));
                take_events(&mut buf, Instant::now(), &mut events);
            }
        }
    }
    assert!(
        buf.trim().is_empty(),
        "bytes left after the last event: {buf:?}"
    );
    (events, error)
}

/// A response body being read piece by piece (to stop part-way).
pub type BodyStream = futures_util::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>;

/// Starts reading `resp`'s body piece by piece.
pub fn body_stream(resp: reqwest::Response) -> BodyStream {
    futures_util::StreamExt::boxed(resp.bytes_stream())
}

/// Reads SSE from `stream` until `n` delta events have arrived; gives the
/// events so far and the id of the last one (0 if it had none).
pub async fn read_deltas(stream: &mut BodyStream, n: usize) -> (Vec<Event>, u64) {
    let mut buf = String::new();
    let mut events = Vec::new();
    let at = Instant::now();
    while events
        .iter()
        .filter(|e: &&Event| e.event == "delta")
        .count()
        < n
    {
        let b = futures_util::StreamExt::next(stream)
            .await
            .expect("the stream ended before enough deltas")
            .expect("body read");
        buf.push_str(std::str::from_utf8(&b).expect("UTF-8"));
        take_events(&mut buf, at, &mut events);
    }
    let last = events
        .last()
        .and_then(|e| e.id.as_deref())
        .and_then(|id| id.parse().ok())
        .unwrap_or(0);
    (events, last)
}

/// The concatenated text of all `delta` events.
pub fn answer_text(events: &[Event]) -> String {
    events
        .iter()
        .filter(|e| e.event == "delta")
        .map(Event::text)
        .collect()
}

/// model-sim in-process with these defaults, accepting the key `test-key`.
pub async fn sim(ttft_ms: u64, tokens_per_sec: f64, output_tokens: u32) -> model_sim::Sim {
    model_sim::Sim::start(model_sim::SimConfig {
        knobs: model_sim::Knobs {
            ttft: Duration::from_millis(ttft_ms),
            tokens_per_sec,
            output_tokens,
            fault: None,
            fault_times: None,
        },
        api_key: Some("test-key".into()),
    })
    .await
    .unwrap()
}

/// model-sim's own answer to a one-message conversation, asked directly in
/// the Anthropic format (non-streaming). The sim answers the same
/// conversation with the same words in every wire format, so this is the
/// reference for what any relayed answer must contain.
pub async fn direct_answer(
    sim: &model_sim::Sim,
    model: &str,
    system: Option<&str>,
    message: &str,
    max_tokens: u32,
) -> String {
    let mut body = serde_json::json!({"model": model, "max_tokens": max_tokens,
                                      "messages": [{"role": "user", "content": message}]});
    if let Some(s) = system {
        body["system"] = serde_json::json!(s);
    }
    let v: Value = reqwest::Client::new()
        .post(format!("{}/v1/messages", sim.url()))
        .header("x-api-key", "test-key")
        .header("anthropic-version", "2023-06-01")
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["content"][0]["text"].as_str().unwrap().to_owned()
}

/// The event names of a stream, in order.
pub fn kinds(events: &[Event]) -> Vec<&str> {
    events.iter().map(|e| e.event.as_str()).collect()
}

/// chat-stream's router served in-process on 127.0.0.1:0.
pub struct ChatServer {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
}

impl ChatServer {
    /// `env` overrides the defaults: `ANTHROPIC_BASE_URL` (required) and any
    /// other config variable.
    pub async fn start(env: &[(&str, &str)]) -> ChatServer {
        let mut map: HashMap<String, String> = HashMap::new();
        map.insert("LOG_LEVEL".into(), "warn".into());
        // Tests steer model-sim through model names, so any model is allowed
        // unless a test says otherwise.
        map.insert("MODEL_ALLOWLIST".into(), "*".into());
        // Callers name themselves with x-dev-user unless a test sets
        // AUTH_MODE=api_key.
        map.insert("AUTH_MODE".into(), "dev".into());
        for (k, v) in env {
            map.insert((*k).into(), (*v).into());
        }
        if !map.contains_key("ANTHROPIC_API_KEY_SECRET_ARN")
            && map.contains_key("ANTHROPIC_BASE_URL")
        {
            map.entry("ANTHROPIC_API_KEY".into())
                .or_insert_with(|| "test-key".into());
        }
        let config = chat_core::Config::from_source(&map).expect("test config");
        chat_core::logging::init(config.log_level);
        let state = chat_core::build_state(config).await.expect("state");
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        tokio::spawn(chat_core::server::serve(
            listener,
            chat_core::app(state),
            async {
                let _ = rx.await;
            },
        ));
        ChatServer {
            addr,
            stop: Some(tx),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

impl Drop for ChatServer {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// A redis-server of the test's own on a free port, so a test can stop it
/// (to check behaviour with Redis down) without touching anyone else's.
pub struct RedisServer {
    pub port: u16,
    child: Option<std::process::Child>,
}

impl RedisServer {
    pub async fn start() -> RedisServer {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        Self::start_on(port).await
    }

    /// Starts it again on the same port (empty: nothing is persisted).
    pub async fn restart(&mut self) {
        self.stop();
        let fresh = Self::start_on(self.port).await;
        *self = fresh;
    }

    async fn start_on(port: u16) -> RedisServer {
        let mut child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("redis-server (make test installs it)");
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return RedisServer {
                    port,
                    child: Some(child),
                };
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("redis-server did not start on port {port}");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server: everything after this sees Redis down.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `events/NAME` at the repository root.
pub fn event_file(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("events")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

/// What a function sent back for one invocation through the Runtime API.
#[derive(Debug)]
pub struct Invocation {
    /// The streaming prelude (`statusCode`, `headers`, `cookies`), or the
    /// buffered response body.
    pub prelude: Value,
    /// Body bytes with the time each network read arrived.
    pub chunks: Vec<(Instant, Bytes)>,
    /// The `Lambda-Runtime-Function-Response-Mode` header it used.
    pub mode: Option<String>,
    /// A body posted to `/error` instead of `/response`.
    pub error: Option<Value>,
}

impl Invocation {
    /// The body as SSE events, timed by the read that completed each.
    pub fn events(&self) -> Vec<Event> {
        let mut buf = String::new();
        let mut out = Vec::new();
        for (at, b) in &self.chunks {
            buf.push_str(std::str::from_utf8(b).unwrap());
            take_events(&mut buf, *at, &mut out);
        }
        out
    }

    pub fn body_text(&self) -> String {
        self.chunks
            .iter()
            .map(|(_, b)| std::str::from_utf8(b).unwrap())
            .collect()
    }

    pub fn status(&self) -> u16 {
        self.prelude["statusCode"].as_u64().unwrap_or(0) as u16
    }
}

struct RuntimeState {
    events: Mutex<mpsc::Receiver<(String, Value)>>,
    results: Mutex<HashMap<String, oneshot::Sender<Invocation>>>,
}

/// A Lambda Runtime API (the `2018-06-01` endpoints a runtime polls),
/// enough to run a function binary locally the way Lambda does.
pub struct FakeRuntimeApi {
    pub addr: SocketAddr,
    send: mpsc::Sender<(String, Value)>,
    state: Arc<RuntimeState>,
    next_id: std::sync::atomic::AtomicU64,
}

impl FakeRuntimeApi {
    pub async fn start() -> FakeRuntimeApi {
        let (send, recv) = mpsc::channel(16);
        let state = Arc::new(RuntimeState {
            events: Mutex::new(recv),
            results: Mutex::new(HashMap::new()),
        });
        let app = Router::new()
            .route("/2018-06-01/runtime/invocation/next", get(next))
            .route(
                "/2018-06-01/runtime/invocation/{id}/response",
                post(response),
            )
            .route("/2018-06-01/runtime/invocation/{id}/error", post(error))
            .route("/2018-06-01/runtime/init/error", post(init_error))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeRuntimeApi {
            addr,
            send,
            state,
            next_id: 0.into(),
        }
    }

    /// Value for `AWS_LAMBDA_RUNTIME_API`.
    pub fn endpoint(&self) -> String {
        self.addr.to_string()
    }

    /// Queues one event and waits (up to `limit`) for the function's answer.
    pub async fn invoke(&self, event: Value, limit: Duration) -> Invocation {
        let n = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let id = format!("00000000-0000-4000-8000-{n:012}");
        let (tx, rx) = oneshot::channel();
        self.state.results.lock().await.insert(id.clone(), tx);
        self.send.send((id, event)).await.unwrap();
        tokio::time::timeout(limit, rx)
            .await
            .expect("the function did not answer in time")
            .expect("runtime API dropped the invocation")
    }
}

async fn next(State(st): State<Arc<RuntimeState>>) -> Response {
    let Some((id, event)) = st.events.lock().await.recv().await else {
        return StatusCode::GONE.into_response();
    };
    let deadline = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        + 60_000;
    (
        [
            ("lambda-runtime-aws-request-id", id),
            ("lambda-runtime-deadline-ms", deadline.to_string()),
            (
                "lambda-runtime-invoked-function-arn",
                "arn:aws:lambda:us-east-1:123456789012:function:chat-stream".into(),
            ),
            (
                "lambda-runtime-trace-id",
                "Root=1-00000000-000000000000000000000000;Sampled=0".into(),
            ),
            ("content-type", "application/json".into()),
        ],
        event.to_string(),
    )
        .into_response()
}

async fn response(
    State(st): State<Arc<RuntimeState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let mode = headers
        .get("lambda-runtime-function-response-mode")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut body = body;
    let mut raw: Vec<(Instant, Bytes)> = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { break };
        if let Ok(data) = frame.into_data() {
            raw.push((Instant::now(), data));
        }
    }
    let inv = if mode.as_deref() == Some("streaming") {
        split_prelude(raw, mode)
    } else {
        let all: Vec<u8> = raw.iter().flat_map(|(_, b)| b.to_vec()).collect();
        Invocation {
            prelude: serde_json::from_slice(&all).unwrap_or(Value::Null),
            chunks: Vec::new(),
            mode,
            error: None,
        }
    };
    if let Some(tx) = st.results.lock().await.remove(&id) {
        let _ = tx.send(inv);
    }
    StatusCode::ACCEPTED.into_response()
}

/// Streaming responses start with a JSON prelude, then 8 NUL bytes, then
/// the body.
fn split_prelude(raw: Vec<(Instant, Bytes)>, mode: Option<String>) -> Invocation {
    let mut head = Vec::new();
    let mut chunks = Vec::new();
    let mut in_body = false;
    for (at, b) in raw {
        if in_body {
            chunks.push((at, b));
            continue;
        }
        head.extend_from_slice(&b);
        if let Some(pos) = head.windows(8).position(|w| w == [0u8; 8]) {
            let rest = Bytes::copy_from_slice(&head[pos + 8..]);
            head.truncate(pos);
            if !rest.is_empty() {
                chunks.push((at, rest));
            }
            in_body = true;
        }
    }
    Invocation {
        prelude: serde_json::from_slice(&head).unwrap_or(Value::Null),
        chunks,
        mode,
        error: None,
    }
}

async fn error(
    State(st): State<Arc<RuntimeState>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    if let Some(tx) = st.results.lock().await.remove(&id) {
        let _ = tx.send(Invocation {
            prelude: Value::Null,
            chunks: Vec::new(),
            mode: None,
            error: Some(serde_json::from_slice(&body).unwrap_or(Value::Null)),
        });
    }
    StatusCode::ACCEPTED.into_response()
}

async fn init_error(body: Bytes) -> Response {
    panic!("function init failed: {}", String::from_utf8_lossy(&body));
}

/// The repository root (where template.yaml and scripts/ are).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Panics with a clear message when the AWS stand-in is not configured
/// (`make test` starts moto and sets it).
pub fn require_aws_endpoint() -> String {
    std::env::var("AWS_ENDPOINT_URL").unwrap_or_else(|_| {
        panic!("AWS_ENDPOINT_URL is not set: run the tests with `make test` (it starts moto)")
    })
}

/// `REDIS_URL` from `make test`, which starts Redis when none answers.
pub fn require_redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| {
        panic!("REDIS_URL is not set: run the tests with `make test` (it starts Redis)")
    })
}

/// A table, a turn queue and its DLQ of the test's own in moto, created by
/// `scripts/local_aws.py` from template.yaml (so the tests use the schema
/// that is deployed). `params` override template parameters.
pub struct LocalAws {
    pub table: String,
    pub queue_url: String,
    pub dlq_url: String,
}

impl LocalAws {
    pub async fn create(params: &[(&str, &str)]) -> LocalAws {
        require_aws_endpoint();
        let root = repo_root();
        let venv_python = root.join(".venv/bin/python");
        let python = if venv_python.exists() {
            venv_python
        } else {
            PathBuf::from("python3")
        };
        let prefix = format!("t{}", &uuid_like()[..12]);
        let mut cmd = tokio::process::Command::new(python);
        cmd.arg(root.join("scripts/local_aws.py"))
            .args(["ensure", "--prefix", &prefix, "--format", "json"]);
        for (k, v) in params {
            cmd.args(["--param", &format!("{k}={v}")]);
        }
        let out = cmd.output().await.expect("run scripts/local_aws.py");
        assert!(
            out.status.success(),
            "local_aws.py failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        LocalAws {
            table: v["TABLE_NAME"].as_str().unwrap().to_owned(),
            queue_url: v["TURN_QUEUE_URL"].as_str().unwrap().to_owned(),
            dlq_url: v["TURN_DLQ_URL"].as_str().unwrap().to_owned(),
        }
    }

    pub async fn store(&self) -> chat_core::store::Store {
        chat_core::store_for(&self.table, None, chat_core::StoreRole::Writer).await
    }

    pub async fn sqs(&self) -> aws_sdk_sqs::Client {
        let sdk = chat_core::aws_sdk_config(Duration::from_secs(5), Duration::from_secs(10)).await;
        aws_sdk_sqs::Client::new(&sdk)
    }

    /// The local poller's batching for this queue.
    pub fn poller(&self) -> chat_core::writer::PollerConfig {
        chat_core::writer::PollerConfig {
            queue_url: self.queue_url.clone(),
            batch_size: 100,
            batching_window: Duration::from_millis(100),
            wait: Duration::from_secs(0),
        }
    }

    /// Messages visible plus in flight on a queue.
    pub async fn depth(&self, sqs: &aws_sdk_sqs::Client, url: &str) -> u64 {
        let out = sqs
            .get_queue_attributes()
            .queue_url(url)
            .attribute_names(aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessages)
            .attribute_names(
                aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessagesNotVisible,
            )
            .send()
            .await
            .unwrap();
        let attrs = out.attributes().unwrap();
        attrs.values().map(|v| v.parse::<u64>().unwrap_or(0)).sum()
    }

    /// chat-stream settings that point at this stack.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("TABLE_NAME", self.table.clone()),
            ("TURN_QUEUE_URL", self.queue_url.clone()),
        ]
    }
}

fn uuid_like() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}
