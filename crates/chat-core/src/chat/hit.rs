//! A cache hit: the stored answer at once as `delta` events (`meta.cache`
//! is `hit`, no model call, no model tokens), and the turn persisted like
//! any other before the body ends.

use std::convert::Infallible;

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::json;

use super::finish::{Answer, Finish, TurnDraft};
use super::plan::Planned;
use super::request::ChatRequest;
use super::{Timings, answer_ids, sse_response};
use crate::auth::Identity;
use crate::cache::CachedAnswer;
use crate::persistence::turn::TurnStatus;
use crate::sse;
use crate::state::{AppState, RequestCtx};
use crate::util::{ms, new_id, split_utf8};

pub(super) fn respond(
    state: &AppState,
    ctx: &RequestCtx,
    identity: &Identity,
    req: ChatRequest,
    planned: Planned,
    hit: CachedAnswer,
) -> Response {
    let timings = Timings {
        start: ctx.start,
        validate: planned.validate,
        limits: planned.limits,
        history: planned.history,
        upstream_connect: std::time::Duration::ZERO,
        upstream_wait: std::time::Duration::ZERO,
        ttft: None,
    };
    let new_conversation = req.conversation_id.is_none();
    let conversation_id = req.conversation_id.unwrap_or_else(new_id);
    let turn_id = new_id();
    let mut frames = Vec::new();
    let next_id = |frames: &Vec<Bytes>| Some(frames.len() as u64 + 1);
    frames.push(sse::encode(
        next_id(&frames),
        "meta",
        &json!({"conversation_id": conversation_id, "turn_id": turn_id, "model": hit.model, "cache": "hit"})
            .to_string(),
    ));
    for part in split_utf8(&hit.text, 1024) {
        frames.push(sse::encode_delta(frames.len() as u64 + 1, part).0);
    }
    let total = timings.start.elapsed();
    let t = Timings {
        ttft: Some(total),
        ..timings
    };
    frames.push(sse::encode(
        next_id(&frames),
        "done",
        &json!({
            "stop_reason": hit.stop_reason,
            "usage": {"input_tokens": 0, "output_tokens": 0},
            "timings_ms": t.json(total),
        })
        .to_string(),
    ));
    let mut headers = answer_ids(req.persist, &conversation_id, &turn_id);
    headers.extend(planned.rate_headers);
    let persister = state.deps().persister.clone().filter(|_| req.persist);
    let persist = persister.map(|persister| {
        TurnDraft {
            persister,
            conversation_id,
            turn_id,
            user_id: identity.user_id.to_string(),
            started_at_ms: planned.started_at_ms,
            new_conversation,
            user_message: req.message,
        }
        .record(Answer {
            status: TurnStatus::Completed,
            error_code: None,
            model: hit.model,
            text: hit.text,
            stop_reason: hit.stop_reason,
            input_tokens: 0,
            output_tokens: 0,
        })
    });
    // No model tokens, and the stream is over as it starts: the
    // reservation and the slot go back (one script) on a task.
    let (tokens, slot) = (planned.tokens, planned.slot);
    if tokens.is_some() || slot.is_some() {
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(crate::limits::release(tokens, slot, 0));
        }
    }
    let persisting = Finish {
        persist,
        popular: planned.popular,
        ..Finish::default()
    }
    .spawn();
    let frames = futures_util::stream::iter(frames.into_iter().map(Ok::<_, Infallible>));
    // As for a miss: the body ends once the turn is durable.
    let end = futures_util::stream::once(async move {
        if let Some(h) = persisting {
            let _ = h.await;
        }
    })
    .filter_map(|()| async { None::<Result<Bytes, Infallible>> });
    let server_timing = format!(
        "validate;dur={:.3}, limits;dur={:.3}, history;dur={:.3}, cache;dur={:.3}",
        ms(timings.validate),
        ms(timings.limits),
        ms(timings.history),
        ms(total)
    );
    sse_response(
        Body::from_stream(frames.chain(end)),
        "hit",
        &server_timing,
        headers,
    )
}
