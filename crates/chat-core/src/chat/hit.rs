//! A cache hit: the stored answer at once as `delta` events (`meta.cache`
//! is `hit`, no model call, no model tokens), and the turn persisted like
//! any other before the body ends.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use futures_util::StreamExt;

use super::finish::{Answer, Finish, TurnDraft};
use super::plan::Planned;
use super::request::ChatRequest;
use super::{DoneEvent, MetaEvent, Timings, Usage, answer_ids, event_json, sse_response};
use crate::auth::Identity;
use crate::cache::{CachedAnswer, Ready};
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
    hit: Arc<Ready>,
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
    // The whole answer in one buffer: one chunk for the connection to
    // write, where a frame each made a chunk each. The deltas were encoded
    // when the answer was read (or kept), not per hit.
    let mut body = bytes::BytesMut::with_capacity(hit.frames.len() + 512);
    sse::encode_into(
        &mut body,
        Some(1),
        "meta",
        &event_json(&MetaEvent {
            cache: "hit",
            conversation_id: &conversation_id,
            model: &hit.answer.model,
            stream_id: None,
            turn_id: &turn_id,
        }),
    );
    body.extend_from_slice(&hit.frames);
    let total = timings.start.elapsed();
    let t = Timings {
        ttft: Some(total),
        ..timings
    };
    sse::encode_into(
        &mut body,
        Some(hit.next_id),
        "done",
        &event_json(&DoneEvent {
            stop_reason: hit.answer.stop_reason.as_deref(),
            timings_ms: t.json(total),
            usage: Usage {
                input_tokens: 0,
                output_tokens: 0,
            },
        }),
    );
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
            model: hit.answer.model.clone(),
            text: hit.answer.text.clone(),
            stop_reason: hit.answer.stop_reason.clone(),
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
    let frames = futures_util::stream::once(async move { Ok::<_, Infallible>(body.freeze()) });
    // As for a miss: the body ends once the turn is durable.
    let end = futures_util::stream::once(async move {
        if let Some(h) = persisting {
            let _ = h.await;
        }
    })
    .filter_map(|()| async { None::<Result<Bytes, Infallible>> });
    let server_timing = format!(
        "validate;dur={:.3}, limits;dur={:.3}, history;dur={:.3}, cache;desc={};dur={:.3}",
        ms(timings.validate),
        ms(timings.limits),
        ms(timings.history),
        if planned.local_hit { "local" } else { "shared" },
        ms(total)
    );
    sse_response(
        Body::from_stream(frames.chain(end)),
        "hit",
        &server_timing,
        headers,
    )
}

/// `answer` ready to send as a hit: its text as `delta` events, numbered
/// from 2 (the hit's `meta` is 1), in parts of at most 1 KiB.
pub(super) fn ready(answer: CachedAnswer) -> Ready {
    let mut frames = bytes::BytesMut::with_capacity(answer.text.len() + answer.text.len() / 8 + 64);
    let mut id = 1;
    for part in split_utf8(&answer.text, 1024) {
        id += 1;
        sse::encode_delta_into(&mut frames, id, part);
    }
    Ready {
        answer,
        frames: frames.freeze(),
        next_id: id + 1,
    }
}
