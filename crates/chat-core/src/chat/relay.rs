//! The stream of one answer: `meta`, one `delta` per upstream text delta
//! (sent the moment it arrives: the body writes what is ready within one
//! turn of the scheduler, see [`produce::body`]), then `done`, or `error`
//! if the upstream fails. Deadlines bound the first token, the silence
//! between chunks and the whole answer.
//!
//! The relay runs on its own task and hands frames to the body (see
//! [`produce`]), so a client that leaves does not have to stop the answer.
//! The body ends only once the turn is durable.

use std::sync::Arc;

use axum::http::HeaderValue;
use axum::response::Response;
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::time::{Instant, timeout_at};
use tracing::Instrument;

// A child of this module, so it may drive the relay's private state.
#[path = "produce.rs"]
mod produce;

use super::attempt::{Deadlines, Opened, Source};
use super::finish::{Answer, CachePut, Finish, Lease, PopularJob, TurnDraft};
use super::plan::Planned;
use super::request::ChatRequest;
use super::stop::StopWatch;
use super::{
    DoneEvent, LogDeferred, MetaEvent, Timings, Usage, answer_ids, event_json, sse_response,
};
use crate::auth::Identity;
use crate::cache::CachedAnswer;
use crate::error::{ApiError, UpstreamError};
use crate::limits::{Reservation, Slot};
use crate::live::Tee;
use crate::obs::emf::Metrics;
use crate::persistence::turn::TurnStatus;
use crate::provider::{Chunk, ChunkStream};
use crate::sse;
use crate::state::{AppState, RequestCtx};
use crate::util::{ms, new_id, now_ms};
use produce::produce;

/// Builds the relay of an answer that has started, starts it on its own
/// task, and gives the streaming response.
#[allow(clippy::too_many_arguments)] // one call site; each is a distinct input
pub(super) fn respond(
    state: AppState,
    ctx: &RequestCtx,
    identity: &Identity,
    req: ChatRequest,
    planned: Planned,
    source: Source,
    turn_id: String,
    deadlines: Deadlines,
) -> Response {
    let Source {
        opened,
        tee,
        own_answer,
        coalesce_key,
    } = source;
    let Opened {
        provider,
        model_key,
        stream: upstream,
        first,
        model,
        input_tokens,
        upstream_connect,
        upstream_wait,
        attempts,
        following,
    } = opened;
    let live = state.deps().live.clone();
    let stop = state
        .stops()
        .watch(&state, &turn_id, &format!("user:{}", identity.user_id));
    let x_cache = if following {
        "follow"
    } else if planned.lookup {
        "miss"
    } else {
        "bypass"
    };
    let ttft = matches!(first, Chunk::Delta(_)).then(|| ctx.start.elapsed());
    let conversation_id = req.conversation_id.clone().unwrap_or_else(new_id);
    let mut headers = answer_ids(req.persist, &conversation_id, &turn_id);
    headers.extend(planned.rate_headers);
    let persister = state.deps().persister.clone().filter(|_| req.persist);
    let draft = persister.map(|persister| TurnDraft {
        persister,
        conversation_id: conversation_id.clone(),
        turn_id: turn_id.clone(),
        user_id: identity.user_id.to_string(),
        started_at_ms: planned.started_at_ms,
        new_conversation: req.conversation_id.is_none(),
        user_message: req.message,
    });
    let meta = event_json(&MetaEvent {
        cache: if following { "follow" } else { "miss" },
        conversation_id: &conversation_id,
        model: &model,
        // Resumable: GET /chat/streams/{stream_id} with Last-Event-ID.
        stream_id: tee.is_some().then_some(turn_id.as_str()),
        turn_id: &turn_id,
    });
    let finish_on_disconnect =
        tee.is_some() && live.as_ref().is_some_and(|l| l.config.finish_on_disconnect);
    let timings = Timings {
        start: ctx.start,
        validate: planned.validate,
        limits: planned.limits,
        history: planned.history,
        upstream_connect,
        upstream_wait,
        ttft,
    };
    let server_timing = timings.server_timing();
    let mut relay = Relay {
        provider,
        model_key,
        tokens: planned.tokens,
        slot: planned.slot,
        stop,
        state,
        upstream,
        pending: Some(first),
        meta: Some(meta),
        seq: 0,
        deadlines,
        last_chunk: Instant::now(),
        timings,
        stop_reason: None,
        input_tokens,
        output_tokens: None,
        text_chars: 0,
        answer: String::new(),
        draft,
        cache_put: planned.cache_put,
        popular: planned.popular,
        tee,
        following,
        own_answer,
        lease: match (&live, coalesce_key) {
            (Some(l), Some(k)) => Some((l.clone(), k, turn_id.clone())),
            _ => None,
        },
        persisting: None,
        finished: false,
        log: Some(LogCtx {
            route: planned.route.as_str(),
            cache: x_cache,
            attempts,
            request_id: ctx.id.to_string(),
            path: ctx.path.clone(),
            model,
            conversation_id,
            turn_id,
        }),
    };
    // Up to 64 frames wait for a slow client (a pipe: its memory grows
    // only as far as frames wait).
    let (tx, rx) = crate::pipe::pipe::<Bytes>(64);
    // The frames that need no wait are in the body before the response is
    // returned: the client's first write carries the head, `meta` and the
    // first delta together, without waiting for the relay's task to run.
    while let Some(frame) = relay.ready_frame() {
        tx.push(frame);
    }
    tokio::spawn(
        produce(relay, tx, finish_on_disconnect).instrument(tracing::info_span!(
            "stream",
            outcome = tracing::field::Empty,
            output_tokens = tracing::field::Empty,
        )),
    );
    let mut resp = sse_response(produce::body(rx), x_cache, &server_timing, headers);
    resp.headers_mut()
        .insert("x-upstream-attempts", HeaderValue::from(attempts));
    resp.extensions_mut().insert(LogDeferred);
    resp
}

struct LogCtx {
    path: std::sync::Arc<str>,
    route: &'static str,
    cache: &'static str,
    attempts: u32,
    request_id: String,
    model: String,
    conversation_id: String,
    turn_id: String,
}

pub(super) struct Relay {
    provider: &'static str,
    /// The answering model's breaker key: a mid-stream failure counts too.
    model_key: String,
    /// The tokens reserved for this answer: settled to the real usage on
    /// every exit (complete, failed, client gone).
    tokens: Option<Reservation>,
    /// The user's stream slot, given back with the reservation when the
    /// answer ends (or, if it never does, when the relay is dropped).
    slot: Option<Slot>,
    /// A stop request for this answer (`DELETE /chat/streams/{id}`).
    stop: StopWatch,
    state: AppState,
    upstream: ChunkStream,
    /// The first chunk after `Start`, read before the headers went out.
    pending: Option<Chunk>,
    meta: Option<String>,
    seq: u64,
    deadlines: Deadlines,
    last_chunk: Instant,
    timings: Timings,
    stop_reason: Option<String>,
    input_tokens: Option<u32>,
    output_tokens: Option<u32>,
    text_chars: usize,
    /// The answer so far, for the stored turn.
    answer: String,
    /// What the stored turn needs; taken when the turn is handed over.
    draft: Option<TurnDraft>,
    /// Where a complete answer is cached; taken when handed over.
    cache_put: Option<CachePut>,
    /// Counts the ask for the cache-warmer; taken when handed over.
    popular: Option<PopularJob>,
    /// Copies every event into the answer's live stream (resume, followers).
    tee: Option<Tee>,
    /// The answer comes from another request's model call.
    following: bool,
    /// A follower's flag: its answer is wholly its own after all.
    own_answer: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// The coalescing lease this answer may hold (live, cache key, turn):
    /// given up once the answer is cached.
    lease: Option<Lease>,
    /// The turn being made durable; the body ends when it is done.
    persisting: Option<tokio::task::JoinHandle<()>>,
    finished: bool,
    /// Taken when the request's log line is written (exactly once).
    log: Option<LogCtx>,
}

impl Relay {
    /// The next event's frame, encoded once: the live stream gets a
    /// slice of the same bytes.
    fn frame(&mut self, event: &'static str, data: &str) -> Bytes {
        self.seq += 1;
        let (frame, at) = sse::encode_at(Some(self.seq), event, data);
        self.tee_frame(event, &frame, at)
    }

    /// A `delta` event of `text`: its JSON written straight into the
    /// frame (no JSON value built, no second string).
    fn delta_frame(&mut self, text: &str) -> Bytes {
        self.seq += 1;
        let (frame, at) = sse::encode_delta(self.seq, text);
        self.tee_frame("delta", &frame, at)
    }

    fn tee_frame(&self, event: &'static str, frame: &Bytes, at: std::ops::Range<usize>) -> Bytes {
        if let Some(t) = &self.tee {
            t.send(self.seq, event, frame.slice(at));
        }
        frame.clone()
    }

    /// The next frame for the client; `None` once the answer is over and
    /// durable. The once-per-answer paths (failure, stop, the final
    /// release) are boxed: inline, they would size every waiting answer's
    /// task for them (1,000 open answers: 1,000 such tasks).
    async fn next_frame(&mut self) -> Option<Bytes> {
        if self.finished {
            // The client has the final event. Keep the body (and so the
            // invocation) open until the turn is durable: Lambda freezes
            // the environment once the response ends.
            let persisting = async {
                if let Some(h) = self.persisting.take() {
                    let _ = h.await;
                }
            };
            let teeing = async {
                if let Some(t) = self.tee.as_mut() {
                    t.flush().await;
                }
            };
            tokio::join!(persisting, teeing);
            return None;
        }
        if let Some(frame) = self.ready_frame() {
            return Some(frame);
        }
        loop {
            let item = match self.pending.take() {
                Some(chunk) => Ok(Some(Ok(chunk))),
                None => {
                    let (deadline, kind) = self
                        .deadlines
                        .next(self.timings.ttft.is_some(), self.last_chunk);
                    tokio::select! {
                        biased;
                        () = self.stop.stopped() => return Some(Box::pin(self.stopped()).await),
                        r = timeout_at(deadline, self.upstream.next()) => r.map_err(|_| kind),
                    }
                }
            };
            self.last_chunk = Instant::now();
            let chunk = match item {
                Ok(Some(Ok(chunk))) => chunk,
                Ok(Some(Err(e))) => return Some(Box::pin(self.fail(e)).await),
                Ok(None) => return Some(Box::pin(self.fail(UpstreamError::Truncated)).await),
                Err(kind) => return Some(Box::pin(self.fail(UpstreamError::Timeout(kind))).await),
            };
            match chunk {
                Chunk::Delta(text) if text.is_empty() => {}
                Chunk::Delta(text) => return Some(self.delta(&text)),
                Chunk::Start { .. } => {}
                Chunk::Stop {
                    stop_reason,
                    input_tokens,
                    output_tokens,
                } => {
                    self.stop_reason = stop_reason.or(self.stop_reason.take());
                    self.input_tokens = input_tokens.or(self.input_tokens);
                    self.output_tokens = output_tokens.or(self.output_tokens);
                }
                Chunk::End => {
                    // Count the tokens before the final event, while the
                    // invocation is surely still running.
                    Box::pin(crate::limits::release(
                        self.tokens.take(),
                        self.slot.take(),
                        self.used_tokens(),
                    ))
                    .await;
                    return Some(self.complete());
                }
            }
        }
    }

    /// The next frame when it needs no wait: `meta`, then the first
    /// chunk when it is text (it came with the answer's opening).
    fn ready_frame(&mut self) -> Option<Bytes> {
        if let Some(meta) = self.meta.take() {
            return Some(self.frame("meta", &meta));
        }
        match self.pending.take() {
            Some(Chunk::Delta(text)) if !text.is_empty() => Some(self.delta(&text)),
            other => {
                self.pending = other;
                None
            }
        }
    }

    fn delta(&mut self, text: &str) -> Bytes {
        self.text_chars += text.chars().count();
        if self.draft.is_some() || self.cache_put.is_some() {
            self.answer.push_str(text);
        }
        self.delta_frame(text)
    }

    fn complete(&mut self) -> Bytes {
        self.finished = true;
        self.state.health(self.provider).record_ok();
        let total = self.timings.start.elapsed();
        let data = event_json(&DoneEvent {
            stop_reason: self.stop_reason.as_deref(),
            timings_ms: self.timings.json(total),
            usage: Usage {
                input_tokens: self.input_tokens.unwrap_or(0),
                output_tokens: self.output_tokens.unwrap_or(0),
            },
        });
        let frame = self.frame("done", &data);
        self.persisting = self.hand_over(TurnStatus::Completed, None);
        self.write_log("complete", None);
        frame
    }

    /// Stopped on request: the model call ends here (its stream is
    /// dropped), the turn is recorded as `stopped` with the text so far,
    /// and the client (and any follower, through the live stream) gets
    /// `done` with `stop_reason: "stopped"`. Not cached.
    async fn stopped(&mut self) -> Bytes {
        self.finished = true;
        self.upstream = Box::pin(futures_util::stream::empty());
        crate::limits::release(self.tokens.take(), self.slot.take(), self.used_tokens()).await;
        self.stop_reason = Some("stopped".to_owned());
        let total = self.timings.start.elapsed();
        let data = event_json(&DoneEvent {
            stop_reason: Some("stopped"),
            timings_ms: self.timings.json(total),
            usage: Usage {
                input_tokens: self.input_tokens.unwrap_or(0),
                output_tokens: self
                    .output_tokens
                    .unwrap_or_else(|| u32::try_from(self.text_chars / 4).unwrap_or(u32::MAX)),
            },
        });
        tracing::info!(seq = self.seq, "answer stopped on request");
        let frame = self.frame("done", &data);
        self.persisting = self.hand_over(TurnStatus::Stopped, None);
        self.write_log("stopped", None);
        frame
    }

    /// The tokens this answer used: the provider's counts, or (for an
    /// answer cut short before it reported them) the input it reported and
    /// an estimate of the text so far. Never wraps.
    fn used_tokens(&self) -> u32 {
        let output = self
            .output_tokens
            .unwrap_or_else(|| u32::try_from(self.text_chars / 4).unwrap_or(u32::MAX));
        self.input_tokens.unwrap_or(0).saturating_add(output)
    }

    async fn fail(&mut self, e: UpstreamError) -> Bytes {
        self.finished = true;
        crate::limits::release(self.tokens.take(), self.slot.take(), self.used_tokens()).await;
        if !self.following {
            // A follower's failure is its leader's, already counted.
            self.state.health(self.provider).record_error(&e);
            if e.retryable() {
                self.state.circuits().record_failure(&self.model_key).await;
            }
        }
        let err = ApiError::from(&e);
        tracing::warn!(error = %e, error_code = e.code(), "upstream failed mid-stream");
        let frame = self.frame("error", &err.body_json());
        self.persisting = self.hand_over(TurnStatus::Failed, Some(e.code()));
        self.write_log("upstream_error", Some(e.code()));
        frame
    }

    /// The answer's log line and its metrics line, in one write.
    fn write_log(&mut self, outcome: &'static str, error_code: Option<&'static str>) {
        crate::obs::log::together(|| self.write_log_lines(outcome, error_code));
    }

    fn write_log_lines(&mut self, outcome: &'static str, error_code: Option<&'static str>) {
        let Some(log) = self.log.take() else { return };
        let t = &self.timings;
        tracing::info!(
            request_id = %log.request_id,
            method = "POST",
            path = %log.path,
            status = 200u16,
            outcome,
            error_code,
            attempts = log.attempts,
            route = log.route,
            provider = self.provider,
            model = %log.model,
            conversation_id = %log.conversation_id,
            turn_id = %log.turn_id,
            validate_ms = ms(t.validate),
            limits_ms = ms(t.limits),
            history_ms = ms(t.history),
            upstream_connect_ms = ms(t.upstream_connect),
            ttft_ms = t.ttft.map(ms),
            upstream_ms = ms(t.upstream_wait),
            overhead_ms = t.overhead().map(ms),
            total_ms = ms(t.start.elapsed()),
            input_tokens = self.input_tokens,
            output_tokens = self.output_tokens,
            answer_chars = self.text_chars,
            events = self.seq,
            "request"
        );
        let span = tracing::Span::current();
        span.record("outcome", outcome);
        if let Some(n) = self.output_tokens {
            span.record("output_tokens", n);
        }
        if !crate::obs::emf::enabled() {
            return;
        }
        let total = t.start.elapsed();
        let mut m = Metrics::new()
            .dim("model", log.model.as_str())
            .dim("outcome", error_code.unwrap_or(outcome))
            .count("Requests", 1.0)
            .ms("Total", ms(total))
            .count(
                match log.cache {
                    "follow" => "CacheFollow",
                    "miss" => "CacheMiss",
                    _ => "CacheBypass",
                },
                1.0,
            )
            .count("InputTokens", f64::from(self.input_tokens.unwrap_or(0)))
            .count("OutputTokens", f64::from(self.output_tokens.unwrap_or(0)))
            .ids()
            // (also when this runs outside the request's span: a drop)
            .prop("request_id", log.request_id.as_str());
        if let Some(ttft) = t.ttft {
            m = m
                .ms("TimeToFirstToken", ms(ttft))
                .ms("UpstreamTime", ms(t.upstream_wait))
                .ms("Overhead", ms(t.overhead().unwrap_or_default()));
        }
        if outcome == "upstream_error" {
            m = m.count("Errors", 1.0).count("UpstreamErrors", 1.0);
        }
        m.emit();
    }
}

impl Drop for Relay {
    /// The body was dropped before the answer ended: the client went away.
    /// The partial turn is recorded as interrupted (best effort: in Lambda
    /// the environment may freeze before it is sent, and it is then sent
    /// when the environment next runs).
    fn drop(&mut self) {
        if let Some(r) = self.tokens.take() {
            r.settle_soon(self.used_tokens());
        }
        if self.log.is_some() {
            if let Some(t) = &self.tee {
                // Followers take over at once; a resume gets an error.
                t.send(
                    self.seq + 1,
                    "gone",
                    Bytes::from_static(
                        br#"{"code":"client_disconnected","message":"the answer was stopped when its client left"}"#,
                    ),
                );
            }
            let _ = self.hand_over(TurnStatus::Interrupted, Some("client_disconnected"));
            self.write_log("client_disconnected", None);
        }
    }
}

impl Relay {
    /// Hands the finished turn over (see [`Finish`]).
    fn hand_over(
        &mut self,
        status: TurnStatus,
        error_code: Option<&'static str>,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let text = std::mem::take(&mut self.answer);
        let model = self
            .log
            .as_ref()
            .map(|l| l.model.clone())
            .unwrap_or_default();
        // Only complete answers are cached, by whoever called the model.
        let own_answer = !self.following
            || self
                .own_answer
                .as_ref()
                .is_some_and(|t| t.load(std::sync::atomic::Ordering::Relaxed));
        let cache = self
            .cache_put
            .take()
            .filter(|_| status == TurnStatus::Completed && own_answer)
            .map(|put| {
                let entry = CachedAnswer {
                    text: text.clone(),
                    model: model.clone(),
                    stop_reason: self.stop_reason.clone(),
                    input_tokens: self.input_tokens.unwrap_or(0),
                    output_tokens: self.output_tokens.unwrap_or(0),
                    stored_at_ms: now_ms(),
                };
                (put, entry)
            });
        let persist = self.draft.take().map(|d| {
            d.record(Answer {
                status,
                error_code,
                model,
                text,
                stop_reason: self.stop_reason.clone(),
                input_tokens: self.input_tokens.unwrap_or(0),
                output_tokens: self.output_tokens.unwrap_or(0),
            })
        });
        Finish {
            cache,
            persist,
            popular: self.popular.take(),
            lease: self.lease.take(),
        }
        .spawn()
    }
}
