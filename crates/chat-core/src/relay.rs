//! `POST /chat` after validation: call the model and relay its answer as SSE.
//!
//! Until the provider has sent the first text of its answer, nothing is
//! committed to the client, so failures there become a JSON error
//! with a proper status. From then on the body is a stream: `meta`, one
//! `delta` per upstream text delta (written the moment it arrives; the body
//! stream yields each frame on its own, so hyper and the Lambda runtime
//! flush it at once), then `done`, or `error` if the upstream fails.
//!
//! The body stream pulls from the upstream stream directly, with no task
//! and no channel in between: when the client goes away the body is
//! dropped, which drops the upstream response and closes that connection,
//! so we stop paying for tokens nobody reads.

use std::convert::Infallible;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::json;
use tokio::time::timeout_at;

use crate::app::{AppState, LogDeferred, RequestCtx, ms, new_id};
use crate::auth::Identity;
use crate::cache::{
    CacheControl, CachedAnswer, KeyInput, Plan, ResponseCache, cache_doc, key_of_doc,
};
use crate::error::{ApiError, TimeoutKind, UpstreamError};
use crate::live::{FollowOpen, Follower, Lead, Takeover, Tee};
use crate::persist::Persister;
use crate::turn::{TURN_SCHEMA_VERSION, TurnRecord, TurnStatus};
use std::sync::Arc;

use crate::fleet::Decision;
use crate::provider::{Chunk, ChunkStream, Message, ModelProvider, ModelRequest, Role};
use crate::resilience::Admission;
use crate::routing::ModelRef;
use crate::sse;
use crate::validate::ChatRequest;

/// Where each phase of one request ended, relative to its start.
#[derive(Debug, Clone, Copy)]
struct Timings {
    start: Instant,
    validate: Duration,
    /// Rate limit + circuit check (Redis round trip when shared).
    limits: Duration,
    /// Loading the conversation's history (in parallel with `limits`).
    history: Duration,
    upstream_connect: Duration,
    ttft: Option<Duration>,
}

impl Timings {
    fn json(&self, total: Duration) -> serde_json::Value {
        json!({
            "validate": ms(self.validate),
            "limits": ms(self.limits),
            "history": ms(self.history),
            "upstream_connect": ms(self.upstream_connect),
            "ttft": self.ttft.map(ms),
            "total": ms(total),
        })
    }
}

/// The deadlines of one model call, from config.
#[derive(Debug, Clone, Copy)]
struct Deadlines {
    first_token: Instant,
    total: Instant,
    idle: Duration,
}

impl Deadlines {
    /// The next deadline and what it is, given whether text has arrived and
    /// when the last chunk did.
    fn next(&self, got_text: bool, last_chunk: Instant) -> (tokio::time::Instant, TimeoutKind) {
        let (t, kind) = if got_text {
            (last_chunk + self.idle, TimeoutKind::Idle)
        } else {
            (self.first_token, TimeoutKind::FirstToken)
        };
        if self.total < t {
            (self.total.into(), TimeoutKind::Total)
        } else {
            (t.into(), kind)
        }
    }
}

pub(crate) async fn start(
    state: AppState,
    ctx: RequestCtx,
    identity: Identity,
    req: ChatRequest,
    cache_control: CacheControl,
) -> Result<Response, ApiError> {
    let config = state.config();
    let validate = ctx.start.elapsed();
    let started_at_ms = crate::turn::now_ms();
    let caller: Arc<str> = Arc::from(format!("user:{}", identity.user_id));
    let (chosen, route) = config.routing.choose(&req)?;
    let chosen_ref = ModelRef::parse(&chosen, &config.default_provider);
    if state.providers().get(&chosen_ref.provider).is_none() {
        return Err(ApiError::bad_request(
            "provider_not_configured",
            format!(
                "the {} provider is not configured here",
                chosen_ref.provider
            ),
        )
        .with_field("model"));
    }
    // The rate limit, the first model's circuit and the conversation's
    // history are independent: ask all at once, so shared state costs one
    // round trip, not three.
    let primary_key = chosen_ref.key();
    let cache = state.deps().cache.clone();
    let (plan, ttl) = match (&config.cache, &cache) {
        (Some(c), Some(_)) => (c.policy.plan(req.temperature, cache_control), c.policy.ttl),
        _ => (Plan::NONE, Duration::ZERO),
    };
    let scope = match &config.cache {
        Some(c) if c.global_scope => "global".to_owned(),
        _ => format!("user:{}", identity.user_id),
    };
    let max_tokens = req.max_tokens.unwrap_or(config.limits.default_max_tokens);
    // History, then the cache lookup (its key includes the history).
    let history = async {
        let t = Instant::now();
        let messages = load_history(&state, req.conversation_id.as_deref(), &identity)
            .await
            .map(|past| {
                let mut m = crate::history::to_messages(&past);
                m.push(Message {
                    role: Role::User,
                    content: req.message.clone(),
                });
                m
            });
        let doc = match &messages {
            Ok(m) if plan.lookup || plan.store => Some(cache_doc(&KeyInput {
                scope: &scope,
                provider: &chosen_ref.provider,
                model: &chosen,
                system: req.system.as_deref(),
                messages: m,
                max_tokens,
                temperature: req.temperature,
            })),
            _ => None,
        };
        let key = doc.as_deref().map(key_of_doc);
        let hit = match (&cache, &key) {
            (Some(c), Some(k)) if plan.lookup => c
                .get(k)
                .await
                .ok()
                .flatten()
                .filter(|a| a.fresh_for(plan.max_age, crate::turn::now_ms())),
            _ => None,
        };
        (messages, key, doc, hit, t.elapsed())
    };
    let (rate, primary_admission, (history, key, doc, hit, history_time)) = tokio::join!(
        state.fleet().check_rate(&caller),
        state.fleet().admit(&primary_key),
        history
    );
    let limits = ctx.start.elapsed() - validate;
    let rate_headers = rate_limit_headers(&rate);
    if !rate.allowed {
        if primary_admission == Admission::Probe {
            // Give the probe slot back for a request that will be made.
            state.fleet().abandon_probe(&primary_key).await;
        }
        let what = rate.exceeded.unwrap_or("requests");
        let mut e = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!("too many {what} per minute from this caller; retry after the reset"),
        );
        e.retry_after = Some(rate.reset);
        e.headers = rate_headers;
        return Err(e);
    }
    let messages = match history {
        Ok(m) => m,
        Err(e) => {
            if primary_admission == Admission::Probe {
                state.fleet().abandon_probe(&primary_key).await;
            }
            return Err(e);
        }
    };
    // Counted after the answer, on the task that persists the turn.
    let popular = match (&state.deps().popular, &key, doc) {
        (Some(p), Some(k), Some(d)) => Some((p.clone(), k.clone(), d)),
        _ => None,
    };
    if let Some(hit) = hit {
        if primary_admission == Admission::Probe {
            // No model call: the probe slot goes back.
            state.fleet().abandon_probe(&primary_key).await;
        }
        let timings = Timings {
            start: ctx.start,
            validate,
            limits,
            history: history_time,
            upstream_connect: Duration::ZERO,
            ttft: None,
        };
        return Ok(hit_response(
            &state,
            &identity,
            req,
            hit,
            started_at_ms,
            timings,
            rate_headers,
            popular,
        ));
    }
    // A miss: lead this question's answer, or follow whoever does.
    let turn_id = new_id();
    let live = state.deps().live.clone();
    let coalesce_key = key
        .clone()
        .filter(|_| plan.lookup && live.as_ref().is_some_and(|l| l.config.coalesce));
    let lead = match (&live, &coalesce_key) {
        (Some(l), Some(k)) => l.lead(k, &turn_id).await,
        _ => Lead::Alone,
    };
    let owner = format!("user:{}", identity.user_id);
    let mut tee = live
        .as_ref()
        .map(|l| l.tee(&turn_id, &owner, coalesce_key.clone()));
    let model_req = ModelRequest {
        model: chosen,
        system: req.system,
        messages,
        max_tokens,
        temperature: req.temperature,
    };
    let deadlines = Deadlines {
        first_token: ctx.start + config.timeouts.first_token,
        total: ctx.start + config.timeouts.total,
        idle: config.timeouts.idle,
    };

    // Phase 1: until the first text, failures are plain errors, and
    // retries and fallbacks are still invisible to the client.
    // Set if a follower ends up calling the model itself (its leader died).
    let mut took_over: Option<Arc<std::sync::atomic::AtomicBool>> = None;
    let opened = match (lead, &live, &coalesce_key) {
        (Lead::Follow(leader), Some(live), Some(k)) => {
            if primary_admission == Admission::Probe {
                // A follower makes no model call of its own (unless its
                // leader dies; the takeover asks the breaker again).
                state.fleet().abandon_probe(&primary_key).await;
            }
            let takeover = takeover_call(&state, &model_req, deadlines);
            let t0 = Instant::now();
            match Follower::open(live.clone(), k.clone(), turn_id.clone(), leader, takeover).await {
                FollowOpen::Following {
                    follower,
                    model,
                    first,
                } => {
                    took_over = Some(follower.called_model());
                    Ok(Opened {
                        provider: state
                            .providers()
                            .get(&chosen_ref.provider)
                            .map_or("follow", |p| p.name()),
                        model_key: primary_key.clone(),
                        stream: follower.into_stream(),
                        first,
                        model,
                        input_tokens: Some(0),
                        upstream_connect: t0.elapsed(),
                        attempts: 0,
                        following: true,
                    })
                }
                FollowOpen::Aborted { status, body } => {
                    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                    let mut e = ApiError::new(
                        StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
                        crate::error::upstream_code(v["code"].as_str().unwrap_or_default()),
                        v["message"].as_str().unwrap_or("the model call failed"),
                    );
                    e.headers.push(("x-cache", "follow".into()));
                    abort_followers(tee.as_mut(), status, &body).await;
                    return Err(e);
                }
                FollowOpen::Lead | FollowOpen::Alone => {
                    let admission = state.fleet().admit(&primary_key).await;
                    open_with_fallback(&state, &model_req, &deadlines, admission).await
                }
            }
        }
        _ => open_with_fallback(&state, &model_req, &deadlines, primary_admission).await,
    };
    let Opened {
        provider,
        model_key,
        stream: upstream,
        first,
        model,
        input_tokens,
        upstream_connect,
        attempts,
        following,
    } = match opened {
        Ok(o) => o,
        Err((e, attempts)) => {
            let err = pre_stream_failure(&ctx, &model_req.model, e, attempts);
            abort_followers(tee.as_mut(), err.status.as_u16(), &err.body_json()).await;
            return Err(err);
        }
    };
    // The leader stores the answer. So does a follower that became the
    // leader: before its answer started (then it is not `following`), or
    // later (then `took_over` says so when the answer ends).
    let cache_put = match (cache, key) {
        (Some(c), Some(k)) if plan.store => Some((c, k, ttl)),
        _ => None,
    };
    let x_cache = if following {
        "follow"
    } else if plan.lookup {
        "miss"
    } else {
        "bypass"
    };
    let ttft = matches!(first, Chunk::Delta(_)).then(|| ctx.start.elapsed());
    let pending = Some(first);

    // Phase 2: the stream.
    let conversation_id = req.conversation_id.clone().unwrap_or_else(new_id);
    let draft = state.deps().persister.clone().map(|persister| TurnDraft {
        persister,
        conversation_id: conversation_id.clone(),
        turn_id: turn_id.clone(),
        user_id: identity.user_id.to_string(),
        started_at_ms,
        new_conversation: req.conversation_id.is_none(),
        user_message: req.message,
    });
    let mut meta = json!({
        "conversation_id": conversation_id,
        "turn_id": turn_id,
        "model": model,
        "cache": if following { "follow" } else { "miss" },
    });
    if tee.is_some() {
        // Resumable: GET /chat/streams/{stream_id} with Last-Event-ID.
        meta["stream_id"] = json!(turn_id);
    }
    let finish_on_disconnect =
        tee.is_some() && live.as_ref().is_some_and(|l| l.config.finish_on_disconnect);
    let timings = Timings {
        start: ctx.start,
        validate,
        limits,
        history: history_time,
        upstream_connect,
        ttft,
    };
    let server_timing = format!(
        "validate;dur={:.3}, limits;dur={:.3}, history;dur={:.3}, upstream_connect;dur={:.3}, ttft;dur={:.3}",
        ms(validate),
        ms(limits),
        ms(history_time),
        ms(upstream_connect),
        ms(ttft.unwrap_or_else(|| ctx.start.elapsed()))
    );
    let relay = Relay {
        provider,
        model_key,
        caller,
        state,
        upstream,
        pending,
        meta: Some(meta.to_string()),
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
        cache_put,
        popular,
        tee,
        following,
        took_over,
        lease: match (&live, coalesce_key) {
            (Some(l), Some(k)) => Some((l.clone(), k, turn_id.clone())),
            _ => None,
        },
        persisting: None,
        finished: false,
        log: Some(LogCtx {
            route: route.as_str(),
            attempts,
            request_id: ctx.id.to_string(),
            model,
            conversation_id,
            turn_id,
        }),
    };
    // The relay runs on its own task and hands frames to the body, so a
    // client that leaves does not have to stop the answer (see `produce`).
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    tokio::spawn(produce(relay, tx, finish_on_disconnect));
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
    });
    let mut resp = sse_response(
        Body::from_stream(body),
        x_cache,
        &server_timing,
        rate_headers,
    );
    resp.headers_mut()
        .insert("x-upstream-attempts", HeaderValue::from(attempts));
    resp.extensions_mut().insert(LogDeferred);
    Ok(resp)
}

/// A 200 `text/event-stream` response that proxies and browsers pass on
/// unbuffered and uncached.
pub(crate) fn event_stream(body: Body) -> Response {
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, no-transform"),
    );
    // Tell reverse proxies (nginx and friends) not to buffer the stream.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    resp
}

/// The headers every SSE answer carries.
fn sse_response(
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

/// A cache hit: the stored answer at once as `delta` events (`meta.cache`
/// is `hit`, no model call, no model tokens), and the turn persisted like
/// any other before the body ends.
#[allow(clippy::too_many_arguments)] // one call site; each is a distinct input
fn hit_response(
    state: &AppState,
    identity: &Identity,
    req: ChatRequest,
    hit: CachedAnswer,
    started_at_ms: u64,
    timings: Timings,
    rate_headers: Vec<(&'static str, String)>,
    popular: Option<PopularJob>,
) -> Response {
    let new_conversation = req.conversation_id.is_none();
    let conversation_id = req.conversation_id.unwrap_or_else(new_id);
    let turn_id = new_id();
    let mut frames = Vec::new();
    let mut frame = |event: &str, data: String| {
        let id = frames.len() as u64 + 1;
        frames.push(sse::encode(Some(id), event, &data));
    };
    frame(
        "meta",
        json!({"conversation_id": conversation_id, "turn_id": turn_id, "model": hit.model, "cache": "hit"})
            .to_string(),
    );
    for part in crate::turn::split_utf8(&hit.text, 1024) {
        frame("delta", json!({ "text": part }).to_string());
    }
    let total = timings.start.elapsed();
    let t = Timings {
        ttft: Some(total),
        ..timings
    };
    frame(
        "done",
        json!({
            "stop_reason": hit.stop_reason,
            "usage": {"input_tokens": 0, "output_tokens": 0},
            "timings_ms": t.json(total),
        })
        .to_string(),
    );
    let persisting = state.deps().persister.clone().map(|persister| {
        let rec = TurnRecord {
            v: TURN_SCHEMA_VERSION,
            turn_id,
            conversation_id,
            user_id: identity.user_id.to_string(),
            started_at_ms,
            completed_at_ms: crate::turn::now_ms(),
            status: TurnStatus::Completed,
            model: hit.model.clone(),
            user_message: req.message,
            answer_bytes: hit.text.len() as u64,
            answer: Some(hit.text),
            answer_parts: None,
            stop_reason: hit.stop_reason,
            input_tokens: 0,
            output_tokens: 0,
            error_code: None,
        };
        (persister, rec)
    });
    let persisting = (persisting.is_some() || popular.is_some()).then(|| {
        tokio::spawn(async move {
            let persist = async {
                if let Some((persister, rec)) = persisting {
                    persister.persist(rec, new_conversation).await;
                }
            };
            tokio::join!(persist, count_ask(popular));
        })
    });
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
        rate_headers,
    )
}

/// A model call that has produced its first text (or ended empty).
struct Opened {
    provider: &'static str,
    /// `provider:model`: the breaker's key.
    model_key: String,
    stream: ChunkStream,
    first: Chunk,
    model: String,
    input_tokens: Option<u32>,
    upstream_connect: Duration,
    attempts: u32,
    /// The text comes from another request's answer (coalescing).
    following: bool,
}

type FirstText = (ChunkStream, Chunk, String, Option<u32>, Duration);

/// One attempt: open the stream and read up to the first text, within
/// `deadline` (the first-token deadline of this attempt).
async fn attempt(
    provider: &dyn ModelProvider,
    req: &ModelRequest,
    deadline: Instant,
    kind: TimeoutKind,
) -> Result<FirstText, UpstreamError> {
    let started = Instant::now();
    let mut stream = match timeout_at(deadline.into(), provider.stream(req)).await {
        Ok(r) => r?,
        Err(_) => return Err(UpstreamError::Timeout(kind)),
    };
    let connect = started.elapsed();
    let mut model = req.model.clone();
    let mut input_tokens = None;
    loop {
        match timeout_at(deadline.into(), stream.next()).await {
            Ok(Some(Ok(Chunk::Start {
                model: m,
                input_tokens: n,
            }))) => {
                model = m;
                input_tokens = n;
            }
            Ok(Some(Ok(Chunk::Delta(t)))) if t.is_empty() => {}
            Ok(Some(Ok(chunk))) => return Ok((stream, chunk, model, input_tokens, connect)),
            Ok(Some(Err(e))) => return Err(e),
            Ok(None) => return Err(UpstreamError::Truncated),
            Err(_) => return Err(UpstreamError::Timeout(kind)),
        }
    }
}

/// Tries the requested model, retrying transient failures with backoff
/// (within the retry budget), then each fallback model in order, skipping
/// models whose circuit is open. Gives up at the first error that another
/// try cannot fix (e.g. a 400), or when the total deadline is near.
async fn open_with_fallback(
    state: &AppState,
    base: &ModelRequest,
    deadlines: &Deadlines,
    primary_admission: Admission,
) -> Result<Opened, (UpstreamError, u32)> {
    let mut known_admission = Some(primary_admission);
    let res = &state.config().resilience;
    let per_attempt = state.config().timeouts.first_token;
    let default_provider = &state.config().default_provider;
    let mut models = vec![ModelRef::parse(&base.model, default_provider)];
    for f in &res.fallbacks {
        let r = ModelRef::parse(f, default_provider);
        if !models.contains(&r) {
            models.push(r);
        }
    }
    state.retry_budget().on_request();
    let mut attempts = 0u32;
    let mut last: Option<UpstreamError> = None;
    'models: for mref in models {
        // Config validation guarantees every fallback's provider exists.
        let Some(provider) = state.providers().get(&mref.provider) else {
            continue;
        };
        let model_key = mref.key();
        let mut retries = 0u32;
        loop {
            let admission = match known_admission.take() {
                Some(a) => a,
                None => state.fleet().admit(&model_key).await,
            };
            if admission == Admission::Rejected {
                last.get_or_insert(UpstreamError::CircuitOpen);
                continue 'models;
            }
            let now = Instant::now();
            if now >= deadlines.total {
                break 'models;
            }
            let (deadline, kind) = if now + per_attempt < deadlines.total {
                (now + per_attempt, TimeoutKind::FirstToken)
            } else {
                (deadlines.total, TimeoutKind::Total)
            };
            attempts += 1;
            let req = ModelRequest {
                model: mref.model.clone(),
                ..base.clone()
            };
            let e = match attempt(provider.as_ref(), &req, deadline, kind).await {
                Ok((stream, first, model, input_tokens, upstream_connect)) => {
                    state.fleet().on_success(&model_key, admission).await;
                    let model = if model.is_empty() { mref.model } else { model };
                    return Ok(Opened {
                        provider: provider.name(),
                        model_key,
                        stream,
                        first,
                        model,
                        input_tokens,
                        upstream_connect,
                        attempts,
                        following: false,
                    });
                }
                Err(e) => e,
            };
            tracing::info!(model = %req.model, attempt = attempts, error = %e, error_code = e.code(), "model attempt failed");
            state.health(provider.name()).record_error(&e);
            if !e.retryable() {
                // The request itself is at fault: no other try will do better.
                return Err((e, attempts));
            }
            state.fleet().on_failure(&model_key).await;
            // A slow first token is not fixed by asking the same model again.
            let same_model_again = !matches!(e, UpstreamError::Timeout(_))
                && retries < res.retry.max_retries
                && state.retry_budget().try_retry();
            let wait = if same_model_again {
                res.retry.backoff(retries, e.retry_after(), fastrand::f64())
            } else {
                None
            };
            last = Some(e);
            match wait {
                Some(w) if Instant::now() + w < deadlines.total => {
                    tokio::time::sleep(w).await;
                    retries += 1;
                }
                _ => continue 'models,
            }
        }
    }
    Err((
        last.unwrap_or(UpstreamError::Timeout(TimeoutKind::Total)),
        attempts,
    ))
}

/// `X-RateLimit-*` headers for a decision (none when limits are off).
fn rate_limit_headers(d: &Decision) -> Vec<(&'static str, String)> {
    if d.scope == "off" || d.limit == 0 {
        return Vec::new();
    }
    vec![
        ("x-ratelimit-limit", d.limit.to_string()),
        ("x-ratelimit-remaining", d.remaining.to_string()),
        (
            "x-ratelimit-reset",
            d.reset.as_secs_f64().ceil().to_string(),
        ),
        ("x-ratelimit-scope", d.scope.to_owned()),
    ]
}

fn pre_stream_failure(ctx: &RequestCtx, model: &str, e: UpstreamError, attempts: u32) -> ApiError {
    tracing::warn!(
        request_id = %ctx.id,
        model,
        attempts,
        error = %e,
        error_code = e.code(),
        retryable = e.retryable(),
        "upstream failed before the stream started"
    );
    let mut err = ApiError::from(&e);
    err.headers
        .push(("x-upstream-attempts", attempts.to_string()));
    err
}

struct LogCtx {
    route: &'static str,
    attempts: u32,
    request_id: String,
    model: String,
    conversation_id: String,
    turn_id: String,
}

struct Relay {
    provider: &'static str,
    /// The answering model's breaker key: a mid-stream failure counts too.
    model_key: String,
    /// Rate-limit identity: the answer's tokens count against it.
    caller: Arc<str>,
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
    cache_put: Option<(Arc<dyn ResponseCache>, String, Duration)>,
    /// Counts the ask for the cache-warmer; taken when handed over.
    popular: Option<PopularJob>,
    /// Copies every event into the answer's live stream (resume, followers).
    tee: Option<Tee>,
    /// The answer comes from another request's model call.
    following: bool,
    /// A follower's flag: it called the model itself after all.
    took_over: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// The coalescing lease this answer may hold (live, cache key, turn):
    /// given up once the answer is cached.
    lease: Option<(Arc<crate::live::Live>, String, String)>,
    /// The turn being made durable; the body ends when it is done.
    persisting: Option<tokio::task::JoinHandle<()>>,
    finished: bool,
    /// Taken when the request's log line is written (exactly once).
    log: Option<LogCtx>,
}

impl Relay {
    fn frame(&mut self, event: &str, data: &str) -> Bytes {
        self.seq += 1;
        if let Some(t) = &self.tee {
            t.send(self.seq, event, data);
        }
        sse::encode(Some(self.seq), event, data)
    }

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
        if let Some(meta) = self.meta.take() {
            return Some(self.frame("meta", &meta));
        }
        loop {
            let item = match self.pending.take() {
                Some(chunk) => Ok(Some(Ok(chunk))),
                None => {
                    let (deadline, kind) = self
                        .deadlines
                        .next(self.timings.ttft.is_some(), self.last_chunk);
                    timeout_at(deadline, self.upstream.next())
                        .await
                        .map_err(|_| kind)
                }
            };
            self.last_chunk = Instant::now();
            let chunk = match item {
                Ok(Some(Ok(chunk))) => chunk,
                Ok(Some(Err(e))) => return Some(self.fail(e).await),
                Ok(None) => return Some(self.fail(UpstreamError::Truncated).await),
                Err(kind) => return Some(self.fail(UpstreamError::Timeout(kind)).await),
            };
            match chunk {
                Chunk::Delta(text) if text.is_empty() => {}
                Chunk::Delta(text) => {
                    self.text_chars += text.chars().count();
                    if self.draft.is_some() || self.cache_put.is_some() {
                        self.answer.push_str(&text);
                    }
                    let data = json!({ "text": text }).to_string();
                    return Some(self.frame("delta", &data));
                }
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
                    let used = self.input_tokens.unwrap_or(0) + self.output_tokens.unwrap_or(0);
                    self.state.fleet().add_tokens(&self.caller, used).await;
                    return Some(self.complete());
                }
            }
        }
    }

    fn complete(&mut self) -> Bytes {
        self.finished = true;
        self.state.health(self.provider).record_ok();
        let total = self.timings.start.elapsed();
        let data = json!({
            "stop_reason": self.stop_reason,
            "usage": {
                "input_tokens": self.input_tokens.unwrap_or(0),
                "output_tokens": self.output_tokens.unwrap_or(0),
            },
            "timings_ms": self.timings.json(total),
        });
        let frame = self.frame("done", &data.to_string());
        self.persisting = self.hand_over(TurnStatus::Completed, None);
        self.write_log("complete", None);
        frame
    }

    async fn fail(&mut self, e: UpstreamError) -> Bytes {
        self.finished = true;
        if !self.following {
            // A follower's failure is its leader's, already counted.
            self.state.health(self.provider).record_error(&e);
            if e.retryable() {
                self.state.fleet().on_failure(&self.model_key).await;
            }
        }
        let err = ApiError::from(&e);
        tracing::warn!(error = %e, error_code = e.code(), "upstream failed mid-stream");
        let frame = self.frame("error", &err.body_json());
        self.persisting = self.hand_over(TurnStatus::Failed, Some(e.code()));
        self.write_log("upstream_error", Some(e.code()));
        frame
    }

    fn write_log(&mut self, outcome: &'static str, error_code: Option<&'static str>) {
        let Some(log) = self.log.take() else { return };
        let t = &self.timings;
        tracing::info!(
            request_id = %log.request_id,
            method = "POST",
            path = "/chat",
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
            upstream_connect_ms = ms(t.upstream_connect),
            ttft_ms = t.ttft.map(ms),
            total_ms = ms(t.start.elapsed()),
            input_tokens = self.input_tokens,
            output_tokens = self.output_tokens,
            answer_chars = self.text_chars,
            events = self.seq,
            "request"
        );
    }
}

impl Drop for Relay {
    /// The body was dropped before the answer ended: the client went away.
    /// The partial turn is recorded as interrupted (best effort: in Lambda
    /// the environment may freeze before it is sent, and it is then sent
    /// when the environment next runs).
    fn drop(&mut self) {
        if self.log.is_some() {
            if let Some(t) = &self.tee {
                // Followers take over at once; a resume gets an error.
                t.send(
                    self.seq + 1,
                    "gone",
                    r#"{"code":"client_disconnected","message":"the answer was stopped when its client left"}"#,
                );
            }
            let _ = self.hand_over(TurnStatus::Interrupted, Some("client_disconnected"));
            self.write_log("client_disconnected", None);
        }
    }
}

/// What the stored turn needs besides the answer.
struct TurnDraft {
    persister: Arc<Persister>,
    conversation_id: String,
    turn_id: String,
    user_id: String,
    started_at_ms: u64,
    new_conversation: bool,
    user_message: String,
}

impl Relay {
    /// Hands the finished turn to the persister on its own task (so a
    /// client that leaves cannot cancel it).
    fn hand_over(
        &mut self,
        status: TurnStatus,
        error_code: Option<&'static str>,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let answer = std::mem::take(&mut self.answer);
        let model = self
            .log
            .as_ref()
            .map(|l| l.model.clone())
            .unwrap_or_default();
        // Only complete answers are cached, by whoever called the model.
        let own_answer = !self.following
            || self
                .took_over
                .as_ref()
                .is_some_and(|t| t.load(std::sync::atomic::Ordering::Relaxed));
        let cache_job = self
            .cache_put
            .take()
            .filter(|_| status == TurnStatus::Completed && own_answer)
            .map(|(cache, key, ttl)| {
                let entry = CachedAnswer {
                    text: answer.clone(),
                    model: model.clone(),
                    stop_reason: self.stop_reason.clone(),
                    input_tokens: self.input_tokens.unwrap_or(0),
                    output_tokens: self.output_tokens.unwrap_or(0),
                    stored_at_ms: crate::turn::now_ms(),
                };
                (cache, key, ttl, entry)
            });
        let persist_job = self.draft.take().map(|d| {
            let rec = TurnRecord {
                v: TURN_SCHEMA_VERSION,
                turn_id: d.turn_id,
                conversation_id: d.conversation_id,
                user_id: d.user_id,
                started_at_ms: d.started_at_ms,
                completed_at_ms: crate::turn::now_ms(),
                status,
                model,
                user_message: d.user_message,
                answer_bytes: answer.len() as u64,
                answer: Some(answer),
                answer_parts: None,
                stop_reason: self.stop_reason.clone(),
                input_tokens: self.input_tokens.unwrap_or(0),
                output_tokens: self.output_tokens.unwrap_or(0),
                error_code: error_code.map(str::to_owned),
            };
            (d.persister, d.new_conversation, rec)
        });
        let popular = self.popular.take();
        let lease = self.lease.take();
        if cache_job.is_none() && persist_job.is_none() && popular.is_none() && lease.is_none() {
            return None;
        }
        let handle = tokio::runtime::Handle::try_current().ok()?;
        Some(handle.spawn(async move {
            let cache = async {
                if let Some((cache, key, ttl, entry)) = cache_job {
                    if cache.put(&key, &entry, ttl).await.is_err() {
                        tracing::debug!("cache unavailable; answer not stored");
                    }
                }
                // Later identical requests find the cache now, not us.
                if let Some((live, key, turn_id)) = lease {
                    live.release(&key, &turn_id).await;
                }
            };
            let persist = async {
                if let Some((persister, new_conversation, rec)) = persist_job {
                    persister.persist(rec, new_conversation).await;
                }
            };
            tokio::join!(cache, persist, count_ask(popular));
        }))
    }
}

/// The history of `conversation_id` for `identity`; none for a new
/// conversation. Unknown and someone else's conversations are the same 404.
async fn load_history(
    state: &AppState,
    conversation_id: Option<&str>,
    identity: &Identity,
) -> Result<Vec<crate::history::PastTurn>, ApiError> {
    let Some(id) = conversation_id else {
        return Ok(Vec::new());
    };
    let not_found = || {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "conversation_not_found",
            "no such conversation",
        )
        .with_field("conversation_id")
    };
    let Some(store) = state.deps().store.as_deref() else {
        return Err(not_found());
    };
    crate::history::load(
        store,
        state.deps().buffer.as_deref(),
        id,
        &identity.user_id,
        &state.config().history,
    )
    .await
    .map_err(|e| match e {
        crate::history::HistoryError::NotFound => not_found(),
        crate::history::HistoryError::Unavailable(why) => {
            tracing::warn!(error = %why, "history unavailable");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "history_unavailable",
                "the conversation's history could not be loaded; retry shortly",
            )
        }
    })
}

/// Tells whoever follows this answer that it failed before it started
/// (they return the same error), and waits until Redis has it.
async fn abort_followers(tee: Option<&mut Tee>, status: u16, body: &str) {
    if let Some(t) = tee {
        t.send(
            0,
            "abort",
            &json!({"status": status, "body": body}).to_string(),
        );
        t.flush().await;
    }
}

/// Counts one ask of a cacheable question: (tracker, key, key document).
type PopularJob = (Arc<crate::popular::Popularity>, String, String);

async fn count_ask(job: Option<PopularJob>) {
    if let Some((p, key, doc)) = job {
        p.record(&key, &doc).await;
    }
}

/// The model call a follower makes when its leader is gone: the same
/// request, through the same retries, fallbacks and breakers.
fn takeover_call(state: &AppState, req: &ModelRequest, deadlines: Deadlines) -> Takeover {
    let state = state.clone();
    let req = req.clone();
    Arc::new(move || {
        let state = state.clone();
        let req = req.clone();
        Box::pin(async move {
            let key = ModelRef::parse(&req.model, &state.config().default_provider).key();
            let admission = state.fleet().admit(&key).await;
            match open_with_fallback(&state, &req, &deadlines, admission).await {
                Ok(o) => {
                    let first = futures_util::stream::once(async move { Ok(o.first) });
                    Ok(first.chain(o.stream).boxed())
                }
                Err((e, _)) => Err(e),
            }
        })
    })
}

/// Runs the relay and hands its frames to the client's body. When the
/// client leaves: with `finish` (live streams on), the answer runs to its
/// end, so it can be resumed, followed and cached, and the turn is stored
/// complete; without, the relay is dropped, which stops the model call and
/// records the turn as interrupted.
async fn produce(mut relay: Relay, tx: tokio::sync::mpsc::Sender<Bytes>, finish: bool) {
    let mut client = Some(tx);
    loop {
        let (frame, left) = {
            let next = relay.next_frame();
            tokio::pin!(next);
            match &client {
                Some(tx) => tokio::select! {
                    biased;
                    f = &mut next => (f, false),
                    () = tx.closed() => {
                        if !finish {
                            return;
                        }
                        (next.await, true)
                    }
                },
                None => (next.await, false),
            }
        };
        if left {
            client = None;
            tracing::info!(
                seq = relay.seq,
                "client left; finishing the answer for resume and cache"
            );
        }
        let Some(frame) = frame else { return };
        if let Some(tx) = &client {
            if tx.send(frame).await.is_err() {
                if !finish {
                    return;
                }
                client = None;
            }
        }
    }
}
