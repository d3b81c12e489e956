//! bare-relay: the floor of `make bench-peers`. The least a streaming chat
//! relay can do: `POST /chat` with `{"message", "max_tokens",
//! "temperature"}`, one Redis `GET` when the temperature is 0 (a hit is
//! sent whole), otherwise the Anthropic Messages API over a pooled reqwest
//! client, its SSE parsed and each text delta re-framed as our `delta`
//! event, then `done`. No auth, no limits, no coalescing, no persistence,
//! no logs. Answers at temperature 0 are stored in Redis after the body.
//!
//! ```text
//! bare-relay --addr 127.0.0.1:3200 --upstream http://127.0.0.1:4010 [--redis redis://127.0.0.1:6379]
//!            [--http2-prior-knowledge true]
//! ```
//!
//! `--http2-prior-knowledge true` speaks HTTP/2 to the upstream from the
//! first byte (h2c), as chat-stream does with
//! `UPSTREAM_HTTP2_PRIOR_KNOWLEDGE=true`.
//!
//! Written for the bench only: it trusts its input more than a service
//! should (a bad body is a 400 with a JSON error, nothing more).

use std::convert::Infallible;
use std::process::ExitCode;
use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::serve::ListenerExt;
use futures_util::StreamExt;
use redis::AsyncCommands;
use serde_json::{Value, json};

struct Relay {
    http: reqwest::Client,
    upstream: String,
    redis: Option<redis::aio::MultiplexedConnection>,
}

fn frame(event: &str, data: &str) -> Bytes {
    Bytes::from(format!("event: {event}\ndata: {data}\n\n"))
}

fn bad(msg: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        [(header::CONTENT_TYPE, "application/json")],
        json!({"error": msg}).to_string(),
    )
        .into_response()
}

fn sse(body: Body) -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

async fn chat(State(relay): State<Arc<Relay>>, body: Bytes) -> Response {
    let Ok(req) = serde_json::from_slice::<Value>(&body) else {
        return bad("body is not JSON");
    };
    let Some(message) = req["message"].as_str().map(str::to_owned) else {
        return bad("message is required");
    };
    let max_tokens = req["max_tokens"].as_u64().unwrap_or(256);
    let cacheable = req["temperature"].as_f64() == Some(0.0);
    let key = format!("bare:{max_tokens}:{message}");
    if cacheable {
        if let Some(mut r) = relay.redis.clone() {
            if let Ok(Some(text)) = r.get::<_, Option<String>>(&key).await {
                let frames = [
                    frame("meta", r#"{"cache":"hit"}"#),
                    frame("delta", &json!({ "text": text }).to_string()),
                    frame("done", r#"{"stop_reason":"end_turn"}"#),
                ];
                let s = futures_util::stream::iter(frames.map(Ok::<_, Infallible>));
                return sse(Body::from_stream(s));
            }
        }
    }
    let up = relay
        .http
        .post(format!("{}/v1/messages", relay.upstream))
        .header("x-api-key", "bench")
        .header("anthropic-version", "2023-06-01")
        .json(
            &json!({"model": "claude-sonnet-4-5", "max_tokens": max_tokens, "stream": true,
                      "messages": [{"role": "user", "content": message}]}),
        )
        .send()
        .await;
    let up = match up {
        Ok(r) if r.status().is_success() => r,
        Ok(r) => {
            return (
                StatusCode::BAD_GATEWAY,
                json!({"error": format!("upstream {}", r.status())}).to_string(),
            )
                .into_response();
        }
        Err(e) => {
            return (
                StatusCode::BAD_GATEWAY,
                json!({"error": e.to_string()}).to_string(),
            )
                .into_response();
        }
    };
    let redis = relay.redis.clone().filter(|_| cacheable);
    let body = async_stream(up.bytes_stream(), redis, key);
    sse(Body::from_stream(body))
}

/// The upstream SSE parsed line by line; each `content_block_delta`'s
/// text becomes one `delta` frame.
fn async_stream(
    upstream: impl futures_util::Stream<Item = reqwest::Result<Bytes>> + Send + 'static,
    redis: Option<redis::aio::MultiplexedConnection>,
    key: String,
) -> impl futures_util::Stream<Item = Result<Bytes, Infallible>> + Send + 'static {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(32);
    tokio::spawn(async move {
        let mut upstream = std::pin::pin!(upstream);
        let mut buf: Vec<u8> = Vec::new();
        let mut text = String::new();
        let _ = tx.send(frame("meta", r#"{"cache":"miss"}"#)).await;
        while let Some(Ok(chunk)) = upstream.next().await {
            buf.extend_from_slice(&chunk);
            while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=nl).collect();
                let Some(data) = line.strip_prefix(b"data: ") else {
                    continue;
                };
                let Ok(v) = serde_json::from_slice::<Value>(data) else {
                    continue;
                };
                if v["type"] == "content_block_delta" {
                    if let Some(t) = v["delta"]["text"].as_str() {
                        text.push_str(t);
                        let f = frame("delta", &json!({ "text": t }).to_string());
                        if tx.send(f).await.is_err() {
                            return;
                        }
                    }
                }
            }
        }
        let _ = tx
            .send(frame("done", r#"{"stop_reason":"end_turn"}"#))
            .await;
        drop(tx);
        if let Some(mut r) = redis {
            let _: Result<(), _> = r.set_ex(&key, text, 300).await;
        }
    });
    tokio_stream_from(rx)
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<Bytes>,
) -> impl futures_util::Stream<Item = Result<Bytes, Infallible>> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx).map(|o| o.map(Ok)))
}

#[tokio::main]
async fn main() -> ExitCode {
    let mut addr = "127.0.0.1:3200".to_owned();
    let mut upstream = String::new();
    let mut redis_url = None;
    let mut h2c = false;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let Some(v) = it.next() else {
            eprintln!("bare-relay: {flag} needs a value");
            return ExitCode::from(2);
        };
        match flag.as_str() {
            "--addr" => addr = v,
            "--upstream" => upstream = v,
            "--redis" => redis_url = Some(v),
            "--http2-prior-knowledge" => match v.as_str() {
                "true" => h2c = true,
                "false" => h2c = false,
                _ => {
                    eprintln!("bare-relay: --http2-prior-knowledge takes true or false, not {v}");
                    return ExitCode::from(2);
                }
            },
            _ => {
                eprintln!("bare-relay: unknown flag {flag}");
                return ExitCode::from(2);
            }
        }
    }
    if upstream.is_empty() {
        eprintln!("bare-relay: --upstream is required");
        return ExitCode::from(2);
    }
    let redis = match redis_url {
        Some(u) => match redis::Client::open(u.as_str()) {
            Ok(c) => match c.get_multiplexed_async_connection().await {
                Ok(conn) => Some(conn),
                Err(e) => {
                    eprintln!("bare-relay: redis: {e}");
                    return ExitCode::FAILURE;
                }
            },
            Err(e) => {
                eprintln!("bare-relay: redis: {e}");
                return ExitCode::from(2);
            }
        },
        None => None,
    };
    let builder = reqwest::Client::builder().tcp_nodelay(true);
    let builder = if h2c {
        builder.http2_prior_knowledge()
    } else {
        builder
    };
    let http = match builder.build() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("bare-relay: {e}");
            return ExitCode::FAILURE;
        }
    };
    let relay = Arc::new(Relay {
        http,
        upstream: upstream.trim_end_matches('/').to_owned(),
        redis,
    });
    let app = Router::new().route("/chat", post(chat)).with_state(relay);
    let listener = match tokio::net::TcpListener::bind(&addr).await {
        // Frames go out as they are written (no Nagle delay), as ours do.
        Ok(l) => l.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        }),
        Err(e) => {
            eprintln!("bare-relay: bind {addr}: {e}");
            return ExitCode::FAILURE;
        }
    };
    match axum::serve(listener, app).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bare-relay: {e}");
            return ExitCode::FAILURE;
        }
    }
}
