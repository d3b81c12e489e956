//! `POST /chat`: authenticate, check the body, parse it, and hand the
//! turn to [`crate::chat`].

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;

use super::admit::{Access, admit};
use super::error_response;
use tracing::Instrument;

use crate::cache::CacheControl;
use crate::chat::request::{body_too_large, parse_chat_request};
use crate::error::ApiError;
use crate::state::{AppState, RequestCtx};

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

pub(super) async fn chat(State(state): State<AppState>, req: Request) -> Response {
    match chat_inner(state, req).await {
        Ok(r) => r,
        Err(e) => error_response(e),
    }
}

async fn chat_inner(state: AppState, req: Request) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    let ctx = RequestCtx::of(&parts.extensions);
    // Who is calling comes first: without valid credentials nothing else
    // happens (no body read, no rate-limit count, no history read).
    // Boxed: a sign-in that fetches keys is a large future, and inline it
    // would size the whole request's (see `chat::start`).
    let identity = Box::pin(admit(&state, &ctx, &parts.headers, Access::Chat)).await?;
    let limits = state.config().limits;
    let chat_req = async {
        let bytes = json_body(&parts.headers, body, limits.max_body_bytes).await?;
        parse_chat_request(&bytes, &limits)
    }
    .instrument(tracing::info_span!("validate"))
    .await?;
    let cache_control = parts
        .headers
        .get(header::CACHE_CONTROL)
        .and_then(|v| v.to_str().ok())
        .map(CacheControl::parse)
        .unwrap_or_default();
    // The request's headers are read: not held while the answer opens
    // (they are a few hundred bytes per waiting answer, and over HTTP/1.1
    // they hold on to the connection's read buffer).
    drop(parts);
    crate::chat::start(state, ctx, identity, chat_req, cache_control).await
}

/// A JSON request body of at most `limit` bytes: the content type checked,
/// a declared length over the limit refused before reading, the body read
/// up to the limit. Shared by every route that takes a JSON body.
pub(super) async fn json_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<bytes::Bytes, ApiError> {
    if !is_json_content_type(headers) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the body as Content-Type: application/json",
        ));
    }
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(body_too_large(limit));
    }
    read_body(body, limit).await
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
