//! `GET /chat/streams/{stream_id}`: the rest of an answer after a broken
//! connection, from its live stream (no model call).
//!
//! The client sends the id of the last event it got in `Last-Event-ID`
//! (what `EventSource` does by itself) or `?after=N`; it receives every
//! event after that, with the original ids, then the live ones until `done`
//! or `error`. Only the user who asked may resume (anyone else gets the
//! same 404 as for an unknown or expired stream).

use std::collections::HashMap;
use std::convert::Infallible;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;

use super::admit::{Access, admit};
use super::error_response;
use crate::chat::stop::StopRequest;
use crate::error::ApiError;
use crate::live::{Entry, Reader};
use crate::sse;
use crate::state::{AppState, RequestCtx};

fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "stream_not_found",
        "no such stream: unknown, someone else's, or no longer retained",
    )
}

pub(crate) async fn resume(
    State(state): State<AppState>,
    Path(id): Path<String>,
    q: Result<Query<HashMap<String, String>>, axum::extract::rejection::QueryRejection>,
    ctx: RequestCtx,
    headers: HeaderMap,
) -> Response {
    let q = q.map(|Query(q)| q).unwrap_or_default();
    match run(state, ctx, id, q, headers).await {
        Ok(r) => r,
        Err(e) => error_response(e),
    }
}

async fn run(
    state: AppState,
    ctx: RequestCtx,
    id: String,
    q: HashMap<String, String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let who = admit(&state, &ctx, &headers, Access::Read).await?;
    let after = match headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .or(q.get("after").map(String::as_str))
    {
        None => 0,
        Some(v) => v.trim().parse::<u64>().map_err(|_| {
            ApiError::bad_request(
                "invalid_last_event_id",
                "Last-Event-ID (or ?after) must be the whole-number id of an event",
            )
            .with_field("Last-Event-ID")
        })?,
    };
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(not_found());
    }
    let Some(live) = state.deps().live.clone() else {
        return Err(not_found());
    };
    let unavailable = || {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "resume_unavailable",
            "stored streams cannot be read right now; retry shortly",
        )
    };
    let owner = live.owner(&id).await.map_err(|_| unavailable())?;
    if owner.as_deref() != Some(&format!("user:{}", who.user_id)) {
        return Err(not_found());
    }
    let reader = live.reader(&id).await.map_err(|_| unavailable())?;
    // The producer writes an event at least every idle timeout (or fails
    // the answer); silence for longer means it is gone.
    let give_up = state.config().timeouts.idle + live.block() * 2;
    let body = futures_util::stream::unfold(
        Replay {
            reader,
            after,
            give_up,
            ended: false,
        },
        |mut r| async move { r.next_frame().await.map(|b| (Ok::<_, Infallible>(b), r)) },
    );
    Ok(crate::sse::event_stream(Body::from_stream(body)))
}

struct Replay {
    reader: Reader,
    after: u64,
    give_up: std::time::Duration,
    ended: bool,
}

impl Replay {
    async fn next_frame(&mut self) -> Option<Bytes> {
        if self.ended {
            return None;
        }
        let mut quiet = std::time::Duration::ZERO;
        loop {
            let t = std::time::Instant::now();
            match self.reader.next().await {
                Ok(Some(e)) if e.seq <= self.after => continue,
                Ok(Some(e)) => {
                    self.ended = e.is_terminal();
                    let Entry { seq, event, data } = e;
                    let event = match event.as_str() {
                        "gone" | "abort" => "error",
                        other => other,
                    };
                    // Ids stay the answer's own, so a second break resumes too.
                    let frame = sse::encode(Some(seq), event, &data);
                    self.after = seq;
                    return Some(frame);
                }
                Ok(None) => {
                    quiet += t.elapsed();
                    if quiet < self.give_up {
                        continue;
                    }
                }
                Err(_) => {}
            }
            self.ended = true;
            return Some(sse::encode(
                Some(self.after + 1),
                "error",
                r#"{"code":"stream_lost","message":"the answer stopped before it was complete; ask again"}"#,
            ));
        }
    }
}

/// `DELETE /chat/streams/{id}`: stops an answer (the id is `meta`'s
/// `turn_id`, or `stream_id`, or the `x-stream-id` header). Owner only;
/// others and unknown or finished answers get the same 404. 202: the
/// answer was told to stop; it ends with `done` and `stop_reason:
/// "stopped"` within a poll interval (see [`crate::chat::stop`]).
pub(crate) async fn stop(
    State(state): State<AppState>,
    Path(id): Path<String>,
    ctx: RequestCtx,
    headers: HeaderMap,
) -> Response {
    let run = async {
        let who = admit(&state, &ctx, &headers, Access::Read).await?;
        if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(not_found());
        }
        let owner = format!("user:{}", who.user_id);
        match state.stops().request(&state, &id, &owner).await {
            StopRequest::Accepted => Ok(()),
            StopRequest::NotFound => Err(not_found()),
            StopRequest::Unavailable => Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "stop_unavailable",
                "the stop request could not be recorded right now; retry shortly",
            )),
        }
    };
    match run.await {
        Ok(()) => (
            StatusCode::ACCEPTED,
            axum::Json(serde_json::json!({"stream_id": id, "status": "stopping"})),
        )
            .into_response(),
        Err(e) => error_response(e),
    }
}
