//! A local Lambda Runtime API, so the real binaries can be driven through
//! the Lambda adapters with the events in `events/`.

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
use http_body_util::BodyExt;
use serde_json::Value;
use tokio::sync::{Mutex, mpsc, oneshot};

use crate::sse::{Event, take_events};

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
    events: Mutex<mpsc::Receiver<(String, Value, String)>>,
    results: Mutex<HashMap<String, oneshot::Sender<Invocation>>>,
}

/// A Lambda Runtime API (the `2018-06-01` endpoints a runtime polls),
/// enough to run a function binary locally the way Lambda does.
pub struct FakeRuntimeApi {
    pub addr: SocketAddr,
    send: mpsc::Sender<(String, Value, String)>,
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

    /// Points `cmd` at this runtime with the environment Lambda gives a
    /// function (and nothing else of the test's own).
    pub fn environment<'c>(
        &self,
        cmd: &'c mut tokio::process::Command,
        function: &str,
        memory_mb: u32,
    ) -> &'c mut tokio::process::Command {
        cmd.env_clear()
            .env("AWS_LAMBDA_RUNTIME_API", self.endpoint())
            .env("AWS_LAMBDA_FUNCTION_NAME", function)
            .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", memory_mb.to_string())
            .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
            .env(
                "AWS_LAMBDA_LOG_GROUP_NAME",
                format!("/aws/lambda/{function}"),
            )
            .env("AWS_LAMBDA_LOG_STREAM_NAME", "local")
            .env("AWS_REGION", "us-east-1")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
    }

    /// For each socket of process `pid` connected to this Runtime API,
    /// whether it has `TCP_NODELAY` (read through a duplicate of the
    /// process's descriptor: `pidfd_getfd`, which needs the right to trace
    /// it, as a parent or root has).
    pub fn nodelay_of(&self, pid: u32) -> Vec<bool> {
        use rustix::process::{Pid, PidfdFlags, PidfdGetfdFlags, pidfd_getfd, pidfd_open};
        let pid = Pid::from_raw(pid as i32).expect("a pid");
        let pidfd = pidfd_open(pid, PidfdFlags::empty()).expect("pidfd_open");
        let mut out = Vec::new();
        for entry in
            std::fs::read_dir(format!("/proc/{pid}/fd")).expect("the process's descriptors")
        {
            let entry = entry.unwrap();
            let Ok(fd) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(dup) = pidfd_getfd(&pidfd, fd, PidfdGetfdFlags::empty()) else {
                continue;
            };
            let Ok(Some(peer)) = rustix::net::getpeername(&dup) else {
                continue;
            };
            if SocketAddr::try_from(peer).ok() == Some(self.addr) {
                out.push(rustix::net::sockopt::tcp_nodelay(&dup).expect("TCP_NODELAY"));
            }
        }
        out
    }

    /// Queues one event and waits (up to `limit`) for the function's answer.
    pub async fn invoke(&self, event: Value, limit: Duration) -> Invocation {
        self.invoke_traced(
            event,
            "Root=1-00000000-000000000000000000000000;Sampled=0",
            limit,
        )
        .await
    }

    /// [`invoke`](Self::invoke) with this `Lambda-Runtime-Trace-Id` (what
    /// Lambda sends when the function's tracing is active).
    pub async fn invoke_traced(&self, event: Value, trace: &str, limit: Duration) -> Invocation {
        let n = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let id = format!("00000000-0000-4000-8000-{n:012}");
        let (tx, rx) = oneshot::channel();
        self.state.results.lock().await.insert(id.clone(), tx);
        self.send.send((id, event, trace.to_owned())).await.unwrap();
        tokio::time::timeout(limit, rx)
            .await
            .expect("the function did not answer in time")
            .expect("runtime API dropped the invocation")
    }
}

async fn next(State(st): State<Arc<RuntimeState>>) -> Response {
    let Some((id, event, trace)) = st.events.lock().await.recv().await else {
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
            ("lambda-runtime-trace-id", trace),
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

/// Where `make build` leaves the arm64 bootstraps that SAM uploads.
pub fn arm64_bootstrap(function: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/lambda")
        .join(function)
        .join("bootstrap");
    assert!(
        path.exists(),
        "{} is missing: run `make build` (make test-artifact does)",
        path.display()
    );
    path
}

/// A command that runs a Lambda function's binary: `x86` (the build cargo
/// made for the tests), or with `arm64` the bootstrap `make build` made,
/// under qemu-user with Debian's arm64 libc as its sysroot (the bootstrap
/// is linked against glibc, as Lambda's provided.al2023 runs it).
pub fn function_command(x86: &str, function: &str, arm64: bool) -> tokio::process::Command {
    if !arm64 {
        return tokio::process::Command::new(x86);
    }
    let mut c = tokio::process::Command::new("qemu-aarch64");
    c.arg("-L")
        .arg("/usr/aarch64-linux-gnu")
        .arg(arm64_bootstrap(function));
    c
}

/// A binary of this workspace beside the running test's own (cargo puts
/// every binary of a `--workspace` build in `target/debug`): for a test that
/// runs two functions, as one turn does (chat-stream, then db-writer).
pub fn sibling_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let path = exe.parent().and_then(|d| d.parent()).unwrap().join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace (make test does)",
        path.display()
    );
    path
}
