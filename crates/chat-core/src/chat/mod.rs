//! One turn of `POST /chat`, after the request was parsed:
//!
//! 1. [`plan`]: a copy of the answer this instance holds (then only the
//!    rate limit is asked), else the rate limit, the first model's
//!    circuit, history and the cache lookup, all at once.
//! 2. A hit is streamed at once ([`hit`]).
//! 3. A miss is started by [`attempt`]: follow an identical answer in
//!    flight, or call the model with retries and fallbacks.
//! 4. [`relay`] streams it; [`finish`] caches and stores the turn before
//!    the body ends.
//!
//! Until the first text, nothing is committed to the client, so failures
//! become a JSON error with a proper status.
//!
//! Uses: `provider`, `cache`, `live`, `limits`, `persistence`, `auth`
//! (the caller's identity), `state`. Used by: `api`.

pub mod attempt;
mod finish;
mod hit;
mod plan;
mod relay;
pub mod request;
pub mod stop;
#[cfg(test)]
mod tests;

use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderValue, StatusCode};
use axum::response::Response;
use serde::Serialize;
use tokio::time::Instant;

use crate::auth::Identity;
use crate::cache::CacheControl;
use crate::error::ApiError;
use crate::provider::ModelRequest;
use crate::sse::event_stream;
use crate::state::{AppState, RequestCtx};
use crate::util::{ms, new_id};
use attempt::Deadlines;
use request::ChatRequest;

/// Deadlines for one model call. See README "Configuration".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub connect: Duration,
    pub first_token: Duration,
    pub idle: Duration,
    pub total: Duration,
    /// `CLIENT_SEND_TIMEOUT_MS` (default 10000): the longest one frame may
    /// wait for a client that stopped reading (socket open, nothing read).
    /// Then the client is detached as if it had left.
    pub client_send: Duration,
    /// `STOP_POLL_MS` (default 100): how often an answer checks Redis for
    /// a stop request (`DELETE /chat/streams/{id}`).
    pub stop_poll: Duration,
    /// `STOP_POLL_TABLE_MS` (default 1000): the same without Redis, in the
    /// table (one eventually consistent GetItem each time).
    pub stop_poll_table: Duration,
}

/// Where each phase of one request ended, relative to its start.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timings {
    start: Instant,
    validate: Duration,
    /// Rate limit + circuit check (Redis round trip when shared).
    limits: Duration,
    /// Loading the conversation's history (in parallel with `limits`).
    history: Duration,
    upstream_connect: Duration,
    /// The model's own wait to its first text (see `Opened`).
    upstream_wait: Duration,
    ttft: Option<Duration>,
}

impl Timings {
    /// Our own share of the time to first token: all of it but the
    /// model's wait (on a cache hit, all of it).
    pub(crate) fn overhead(&self) -> Option<Duration> {
        self.ttft.map(|t| t.saturating_sub(self.upstream_wait))
    }

    /// The `Server-Timing` of an answer that has started (the time to
    /// first token is now when the model's first chunk was not text).
    pub(crate) fn server_timing(&self) -> String {
        let ttft = self.ttft.unwrap_or_else(|| self.start.elapsed());
        format!(
            "validate;dur={:.3}, limits;dur={:.3}, history;dur={:.3}, upstream_connect;dur={:.3}, upstream;dur={:.3}, overhead;dur={:.3}, ttft;dur={:.3}",
            ms(self.validate),
            ms(self.limits),
            ms(self.history),
            ms(self.upstream_connect),
            ms(self.upstream_wait),
            ms(ttft.saturating_sub(self.upstream_wait)),
            ms(ttft)
        )
    }

    pub(crate) fn json(&self, total: Duration) -> TimingsMs {
        TimingsMs {
            history: ms(self.history),
            limits: ms(self.limits),
            overhead: self.overhead().map(ms),
            total: ms(total),
            ttft: self.ttft.map(ms),
            upstream_connect: ms(self.upstream_connect),
            validate: ms(self.validate),
        }
    }
}

/// `done`'s `timings_ms`. The fields of this and the other event types
/// below are in name order, as the JSON objects they replace had them.
#[derive(Debug, Serialize)]
pub(crate) struct TimingsMs {
    history: f64,
    limits: f64,
    overhead: Option<f64>,
    total: f64,
    ttft: Option<f64>,
    upstream_connect: f64,
    validate: f64,
}

/// The `meta` event: the first of every answer.
#[derive(Debug, Serialize)]
pub(crate) struct MetaEvent<'a> {
    /// `hit`, `miss` or `follow`.
    pub cache: &'static str,
    pub conversation_id: &'a str,
    pub model: &'a str,
    /// Resumable (`GET /chat/streams/{stream_id}`): the live copy is on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream_id: Option<&'a str>,
    pub turn_id: &'a str,
}

/// The `done` event: the last of a complete (or stopped) answer.
#[derive(Debug, Serialize)]
pub(crate) struct DoneEvent<'a> {
    pub stop_reason: Option<&'a str>,
    pub timings_ms: TimingsMs,
    pub usage: Usage,
}

#[derive(Debug, Serialize)]
pub(crate) struct Usage {
    pub input_tokens: u32,
    pub output_tokens: u32,
}

/// An event's data line: JSON of a type that always serialises.
pub(crate) fn event_json(value: &impl Serialize) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

/// Marks a response whose log line is written when its body ends (the
/// relay writes it), not by the request middleware.
#[derive(Clone, Copy, Debug)]
pub struct LogDeferred;

/// Runs one turn; the response is the answer's stream, or the error
/// before it started.
pub async fn start(
    state: AppState,
    ctx: RequestCtx,
    identity: Identity,
    mut req: ChatRequest,
    cache_control: CacheControl,
) -> Result<Response, ApiError> {
    // The answer's id first: a miss may take the coalescing lease under
    // it in the same round trip as the cache lookup.
    let turn_id = new_id();
    // The pre-work and the model call's opening are boxed: inline, their
    // state machines would size this future at the largest of them (the
    // pre-work's join is the largest), and every move of it would copy
    // that much. Boxed, the pre-work's memory is held only while it runs.
    let mut planned = Box::pin(plan::prepare(
        &state,
        &ctx,
        &identity,
        &req,
        cache_control,
        &turn_id,
    ))
    .await?;
    if let Some(hit) = planned.hit.take() {
        // No model call: a probe permit goes back.
        if let Some(p) = planned.primary.take() {
            Box::pin(p.unused()).await;
        }
        return Ok(hit::respond(&state, &ctx, &identity, req, planned, hit));
    }
    let config = state.config();
    let model_req = ModelRequest {
        model: planned.model.clone(),
        system: req.system.take(),
        messages: std::mem::take(&mut planned.messages),
        max_tokens: planned.max_tokens,
        temperature: req.temperature,
        stop: std::mem::take(&mut req.stop),
    };
    let deadlines = Deadlines {
        first_token: ctx.start + config.timeouts.first_token,
        total: ctx.start + config.timeouts.total,
        idle: config.timeouts.idle,
    };
    let owner = format!("user:{}", identity.user_id);
    let opened = Box::pin(attempt::open(
        &state,
        &ctx,
        &model_req,
        deadlines,
        planned.primary.take(),
        planned.cache_key.as_ref(),
        planned.lookup,
        planned.lead.take(),
        &turn_id,
        &owner,
    ))
    .await;
    let source = match opened {
        Ok(s) => s,
        Err(e) => {
            // Nothing was answered: the reserved tokens go back before the
            // client hears so, not on a task after it (a retry at once
            // would find them still held).
            if let Some(r) = planned.tokens.take() {
                Box::pin(r.settle(0)).await;
            }
            return Err(e);
        }
    };
    Ok(relay::respond(
        state, &ctx, &identity, req, planned, source, turn_id, deadlines,
    ))
}

/// The answer's ids as headers, so a client that reads headers first
/// (the OpenAI SDKs) can resume or stop it: `x-stream-id` always,
/// `x-conversation-id` when the turn is stored.
pub(crate) fn answer_ids(
    stored: bool,
    conversation_id: &str,
    turn_id: &str,
) -> Vec<(&'static str, String)> {
    let mut h = vec![("x-stream-id", turn_id.to_owned())];
    if stored {
        h.push(("x-conversation-id", conversation_id.to_owned()));
    }
    h
}

/// The headers every SSE answer carries.
pub(crate) fn sse_response(
    body: Body,
    x_cache: &'static str,
    server_timing: &str,
    rate_headers: Vec<(&'static str, String)>,
) -> Response {
    let mut resp = event_stream(body);
    let h = resp.headers_mut();
    h.insert("x-cache", HeaderValue::from_static(x_cache));
    if let Ok(v) = HeaderValue::from_str(server_timing) {
        h.insert("server-timing", v);
    }
    for (name, value) in rate_headers {
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(name, v);
        }
    }
    *resp.status_mut() = StatusCode::OK;
    resp
}
