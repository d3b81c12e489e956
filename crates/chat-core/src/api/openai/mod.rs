//! The OpenAI-compatible routes, for clients written against the OpenAI
//! SDKs or the Vercel AI SDK (only their base URL and key change):
//!
//! - `POST /v1/chat/completions`, streamed (`stream: true`, with
//!   `stream_options.include_usage`) or whole. The turn goes through
//!   exactly what `/chat` does ([`crate::chat::start`]: auth, limits,
//!   cache, coalescing, live copy, persistence); [`frames`] re-frames its
//!   events. Every answer names its stream in `x-stream-id`, so it can be
//!   resumed through `GET /chat/streams/{id}`.
//! - `GET /v1/models`: the models this deployment allows, by the ids
//!   clients send.
//!
//! Errors have OpenAI's shape, `{"error": {"message", "type", "param",
//! "code"}}`, with the status `/chat` would give.
//!
//! Uses: `chat`, `state`, `sse`.

pub mod frames;
pub mod request;

use std::convert::Infallible;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::BytesMut;
use futures_util::StreamExt;
use serde_json::json;

use super::chat::json_body;
use super::error_response;
use crate::cache::CacheControl;
use crate::error::ApiError;
use crate::provider::routing::{Allowlist, ModelRef};
use crate::sse::SseParser;
use crate::state::{AppState, RequestCtx};
use frames::{Chunker, Collected, error_body};

fn unix_secs() -> u64 {
    crate::util::now_ms() / 1000
}

/// An [`ApiError`] in OpenAI's shape, with the same status and headers.
pub fn openai_error(e: ApiError) -> Response {
    let body = error_body(e.status.as_u16(), e.code, &e.message, e.field.as_deref());
    let mut resp = error_response(e);
    *resp.body_mut() = Body::from(body.to_string());
    resp
}

pub(super) async fn completions(State(state): State<AppState>, req: Request) -> Response {
    match completions_inner(state, req).await {
        Ok(r) => r,
        Err(e) => openai_error(e),
    }
}

async fn completions_inner(state: AppState, req: Request) -> Result<Response, ApiError> {
    let created = unix_secs();
    let (parts, body) = req.into_parts();
    let ctx = RequestCtx::of(&parts.extensions);
    let identity =
        super::admit::admit(&state, &ctx, &parts.headers, super::admit::Access::Chat).await?;
    let limits = state.config().limits;
    let bytes = json_body(&parts.headers, body, limits.max_body_bytes).await?;
    let text_header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok());
    let c = request::parse(
        &bytes,
        &limits,
        text_header("x-conversation-id"),
        text_header("x-persist"),
    )?;
    let cache_control = text_header("cache-control")
        .map(CacheControl::parse)
        .unwrap_or_default();
    // Not held while the answer opens (see `/chat`'s handler).
    drop(parts);
    let answer = crate::chat::start(state, ctx, identity, c.turn, cache_control).await?;
    if c.stream {
        Ok(streamed(answer, c.include_usage, created))
    } else {
        Ok(whole(answer, created).await)
    }
}

/// The answer's events re-framed as they arrive. The body ends when the
/// turn's does (after it is durable), as for `/chat`.
fn streamed(answer: Response, include_usage: bool, created: u64) -> Response {
    let (parts, body) = answer.into_parts();
    let mut parser = SseParser::new();
    let mut chunker = Chunker::new(include_usage, created);
    let frames = body.into_data_stream().filter_map(move |read| {
        let mut out = BytesMut::new();
        if let Ok(bytes) = read {
            for ev in parser.feed(&bytes).unwrap_or_default() {
                chunker.frames(&ev, &mut out);
            }
        }
        let out = (!out.is_empty()).then(|| Ok::<_, Infallible>(out.freeze()));
        std::future::ready(out)
    });
    Response::from_parts(parts, Body::from_stream(frames))
}

/// The whole answer as one `chat.completion` (or an error, when the
/// answer failed after it started).
async fn whole(answer: Response, created: u64) -> Response {
    let (mut parts, body) = answer.into_parts();
    let mut parser = SseParser::new();
    let mut all = Collected::default();
    let mut reads = body.into_data_stream();
    while let Some(read) = reads.next().await {
        let Ok(bytes) = read else { break };
        for ev in parser.feed(&bytes).unwrap_or_default() {
            all.add(&ev);
        }
    }
    let (status, json) = match all.into_completion(created) {
        Ok(v) => (StatusCode::OK, v),
        Err((s, v)) => (
            StatusCode::from_u16(s).unwrap_or(StatusCode::BAD_GATEWAY),
            v,
        ),
    };
    for h in ["x-accel-buffering", "cache-control"] {
        parts.headers.remove(h);
    }
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    parts.status = status;
    Response::from_parts(parts, Body::from(json.to_string()))
}

/// `GET /v1/models`: the ids this deployment accepts in `model`: the
/// default, the short-prompt model and the allowlist (with `MODEL_ALLOWLIST=*`
/// any name is accepted; the first two are listed).
pub(super) async fn models(State(state): State<AppState>, req: Request) -> Response {
    let ctx = RequestCtx::of(req.extensions());
    let admitted =
        super::admit::admit(&state, &ctx, req.headers(), super::admit::Access::Read).await;
    if let Err(e) = admitted {
        return openai_error(e);
    }
    let config = state.config();
    let routing = &config.routing;
    let mut ids: Vec<&str> = vec![routing.default_model.as_str()];
    ids.extend(routing.short_model.as_deref());
    if let Allowlist::Only(list) = &routing.allowlist {
        ids.extend(list.iter().map(String::as_str));
    }
    let mut seen = std::collections::HashSet::new();
    ids.retain(|m| seen.insert(*m));
    let data: Vec<_> = ids
        .into_iter()
        .map(|id| {
            let owner = ModelRef::parse(id, &config.providers.default_provider).provider;
            json!({"id": id, "object": "model", "created": 0, "owned_by": owner})
        })
        .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}
