//! Getting an answer started: follow another request's answer of the same
//! question (coalescing), or call the model, retrying transient failures
//! with backoff (within the retry budget) and then each fallback model,
//! skipping models whose circuit is open. All of it happens before the
//! first byte reaches the client, so retries and fallbacks stay invisible;
//! after that they would duplicate or splice text.
//!
//! Every model call holds a circuit [`Permit`] and settles it with what
//! the call became; a permit dropped on any other path counts as unused.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use axum::http::StatusCode;
use futures_util::StreamExt;
use serde_json::json;
use tokio::time::{Instant, timeout_at};
use tracing::Instrument;

use crate::error::{ApiError, TimeoutKind, UpstreamError, upstream_code};
use crate::limits::{BreakerConfig, Permit, RetryPolicy};
use crate::live::{FollowOpen, Follower, Lead, Live, Takeover, Tee};
use crate::provider::routing::ModelRef;
use crate::provider::{Chunk, ChunkStream, ModelProvider, ModelRequest};
use crate::state::{AppState, RequestCtx};

/// What happens when a model call fails before the first text.
#[derive(Debug, Clone, PartialEq)]
pub struct Resilience {
    pub retry: RetryPolicy,
    /// Share of requests that may be retried (a retry budget), e.g. 0.2.
    pub retry_budget_ratio: f64,
    pub breaker: BreakerConfig,
    /// Models tried, in order, after the requested (or default) one fails.
    pub fallbacks: Vec<String>,
}

/// The deadlines of one model call, from config.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Deadlines {
    pub first_token: Instant,
    pub total: Instant,
    pub idle: Duration,
}

impl Deadlines {
    /// The next deadline and what it is, given whether text has arrived and
    /// when the last chunk did.
    pub(super) fn next(&self, got_text: bool, last_chunk: Instant) -> (Instant, TimeoutKind) {
        let (t, kind) = if got_text {
            (last_chunk + self.idle, TimeoutKind::Idle)
        } else {
            (self.first_token, TimeoutKind::FirstToken)
        };
        if self.total < t {
            (self.total, TimeoutKind::Total)
        } else {
            (t, kind)
        }
    }
}

/// Where an answer's text comes from.
pub(super) struct Source {
    pub opened: Opened,
    /// Copies every event into the answer's live stream (resume, followers).
    pub tee: Option<Tee>,
    /// A follower's flag: its answer is wholly its own after all.
    pub own_answer: Option<Arc<AtomicBool>>,
    /// The cache key this answer leads or follows under.
    pub coalesce_key: Option<String>,
}

/// Starts the answer: lead this question's answer, or follow whoever
/// does. Failures before the first text are plain errors (and are passed
/// on to any followers).
#[allow(clippy::too_many_arguments)] // one call site; each is a distinct input
pub(super) async fn open(
    state: &AppState,
    ctx: &RequestCtx,
    model_req: &ModelRequest,
    deadlines: Deadlines,
    primary: Option<Permit>,
    cache_key: Option<&String>,
    lookup: bool,
    lead: Option<Lead>,
    turn_id: &str,
    owner: &str,
) -> Result<Source, ApiError> {
    let live = state.deps().live.clone();
    let coalesce_key = cache_key
        .cloned()
        .filter(|_| lookup && live.as_ref().is_some_and(|l| l.config.coalesce));
    let lead = match (lead, &live, &coalesce_key) {
        // Taken with the cache lookup (see `plan`).
        (Some(lead), Some(_), Some(_)) => lead,
        (_, Some(l), Some(k)) => {
            l.lead(k, turn_id)
                .instrument(tracing::info_span!("lead"))
                .await
        }
        _ => Lead::Alone,
    };
    let mut tee = live
        .as_ref()
        .map(|l| l.tee(turn_id, owner, coalesce_key.clone()));
    let mut own_answer = None;
    let opened = match (lead, &live, &coalesce_key) {
        (Lead::Follow(leader), Some(live), Some(k)) => {
            // A follower makes no model call of its own (unless its
            // leader dies; the takeover asks the breaker again).
            if let Some(p) = primary {
                p.unused().await;
            }
            follow(
                state,
                live,
                k,
                turn_id,
                leader,
                model_req,
                deadlines,
                &mut own_answer,
            )
            .instrument(tracing::info_span!("follow"))
            .await
        }
        _ => open_with_fallback(state, model_req, &deadlines, Some(primary))
            .await
            .map_err(Failed::Upstream),
    };
    match opened {
        Ok(opened) => Ok(Source {
            opened,
            tee,
            own_answer,
            coalesce_key,
        }),
        Err(Failed::Aborted(status, body, e)) => {
            abort_followers(tee.as_mut(), status, &body).await;
            Err(e)
        }
        Err(Failed::Upstream((e, attempts))) => {
            let err = pre_stream_failure(ctx, &model_req.model, e, attempts);
            abort_followers(tee.as_mut(), err.status.as_u16(), &err.body_json()).await;
            Err(err)
        }
    }
}

/// Why no answer started.
enum Failed {
    /// The model call failed: the error and the attempts made.
    Upstream((UpstreamError, u32)),
    /// The leader we followed failed before its answer started: its
    /// status and body, and the error our client gets.
    Aborted(u16, String, ApiError),
}

#[allow(clippy::too_many_arguments)] // one call site; each is a distinct input
async fn follow(
    state: &AppState,
    live: &Arc<Live>,
    key: &str,
    turn_id: &str,
    leader: String,
    model_req: &ModelRequest,
    deadlines: Deadlines,
    own_answer: &mut Option<Arc<AtomicBool>>,
) -> Result<Opened, Failed> {
    let takeover = takeover_call(state, model_req, deadlines);
    let t0 = Instant::now();
    let primary = ModelRef::parse(&model_req.model, &state.config().providers.default_provider);
    match Follower::open(
        live.clone(),
        key.to_owned(),
        turn_id.to_owned(),
        leader,
        takeover,
    )
    .await
    {
        FollowOpen::Following {
            follower,
            model,
            first,
        } => {
            *own_answer = Some(follower.own_answer());
            Ok(Opened {
                provider: state
                    .providers()
                    .get(&primary.provider)
                    .map_or("follow", |p| p.name()),
                model_key: primary.key(),
                stream: follower.into_stream(),
                first,
                model,
                input_tokens: Some(0),
                upstream_connect: t0.elapsed(),
                upstream_wait: t0.elapsed(),
                attempts: 0,
                following: true,
            })
        }
        FollowOpen::Aborted { status, body } => {
            let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            let mut e = ApiError::new(
                StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
                upstream_code(v["code"].as_str().unwrap_or_default()),
                v["message"].as_str().unwrap_or("the model call failed"),
            );
            e.headers.push(("x-cache", "follow".into()));
            Err(Failed::Aborted(status, body, e))
        }
        FollowOpen::Lead | FollowOpen::Alone => {
            open_with_fallback(state, model_req, &deadlines, None)
                .await
                .map_err(Failed::Upstream)
        }
    }
}

/// A model call that has produced its first text (or ended empty).
pub(super) struct Opened {
    pub provider: &'static str,
    /// `provider:model`: the breaker's key.
    pub model_key: String,
    pub stream: ChunkStream,
    pub first: Chunk,
    pub model: String,
    pub input_tokens: Option<u32>,
    pub upstream_connect: Duration,
    /// From the request to the model (or the leader we follow) until its
    /// first text: the model's own share of the time to first token.
    pub upstream_wait: Duration,
    pub attempts: u32,
    /// The text comes from another request's answer (coalescing).
    pub following: bool,
}

/// The stream, its first chunk, the model, input tokens, the time to
/// connect and the time to the first text (the model's own wait).
type FirstText = (ChunkStream, Chunk, String, Option<u32>, Duration, Duration);

/// One attempt: open the stream and read up to the first text, within
/// `deadline` (the first-token deadline of this attempt).
async fn attempt(
    provider: &dyn ModelProvider,
    req: &ModelRequest,
    deadline: Instant,
    kind: TimeoutKind,
) -> Result<FirstText, UpstreamError> {
    let started = Instant::now();
    let connect_span = tracing::info_span!(
        "upstream_connect",
        provider = provider.name(),
        model = %req.model,
        error_code = tracing::field::Empty,
    );
    let opened = timeout_at(deadline, provider.stream(req))
        .instrument(connect_span.clone())
        .await;
    let mut stream = match opened {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            connect_span.record("error_code", e.code());
            return Err(e);
        }
        Err(_) => {
            connect_span.record("error_code", "upstream_timeout");
            return Err(UpstreamError::Timeout(kind));
        }
    };
    drop(connect_span);
    let connect = started.elapsed();
    let first = first_text(&mut stream, req, deadline, kind)
        .instrument(tracing::info_span!("first_token"))
        .await;
    first.map(|(chunk, model, input_tokens)| {
        (
            stream,
            chunk,
            model,
            input_tokens,
            connect,
            started.elapsed(),
        )
    })
}

/// Reads up to the first text (or the end) of an opened stream.
async fn first_text(
    stream: &mut ChunkStream,
    req: &ModelRequest,
    deadline: Instant,
    kind: TimeoutKind,
) -> Result<(Chunk, String, Option<u32>), UpstreamError> {
    let mut model = req.model.clone();
    let mut input_tokens = None;
    loop {
        match timeout_at(deadline, stream.next()).await {
            Ok(Some(Ok(Chunk::Start {
                model: m,
                input_tokens: n,
            }))) => {
                model = m;
                input_tokens = n;
            }
            Ok(Some(Ok(Chunk::Delta(t)))) if t.is_empty() => {}
            Ok(Some(Ok(chunk))) => return Ok((chunk, model, input_tokens)),
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
pub(super) async fn open_with_fallback(
    state: &AppState,
    base: &ModelRequest,
    deadlines: &Deadlines,
    primary: Option<Option<Permit>>,
) -> Result<Opened, (UpstreamError, u32)> {
    // The first model's permit, when the caller already asked for it.
    let mut known = primary;
    let res = &state.config().resilience;
    let per_attempt = state.config().timeouts.first_token;
    let default_provider = &state.config().providers.default_provider;
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
            let permit = match known.take() {
                Some(p) => p,
                None => state.circuits().admit(&model_key).await,
            };
            let Some(permit) = permit else {
                last.get_or_insert(UpstreamError::CircuitOpen);
                continue 'models;
            };
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
                Ok((stream, first, model, input_tokens, upstream_connect, upstream_wait)) => {
                    permit.success().await;
                    let model = if model.is_empty() { mref.model } else { model };
                    return Ok(Opened {
                        provider: provider.name(),
                        model_key,
                        stream,
                        first,
                        model,
                        input_tokens,
                        upstream_connect,
                        upstream_wait,
                        attempts,
                        following: false,
                    });
                }
                Err(e) => e,
            };
            tracing::info!(model = %req.model, attempt = attempts, error = %e, error_code = e.code(), "model attempt failed");
            state.health(provider.name()).record_error(&e);
            if !e.retryable() {
                // The request itself is at fault: no other try will do
                // better, and the model is not (a probe slot goes back).
                permit.unused().await;
                return Err((e, attempts));
            }
            permit.failure().await;
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

/// The model call a follower makes when its leader is gone: the same
/// request, through the same retries, fallbacks and breakers.
fn takeover_call(state: &AppState, req: &ModelRequest, deadlines: Deadlines) -> Takeover {
    let state = state.clone();
    let req = req.clone();
    Arc::new(move || {
        let state = state.clone();
        let req = req.clone();
        Box::pin(async move {
            match open_with_fallback(&state, &req, &deadlines, None).await {
                Ok(o) => {
                    let first = futures_util::stream::once(async move { Ok(o.first) });
                    Ok(first.chain(o.stream).boxed())
                }
                Err((e, _)) => Err(e),
            }
        })
    })
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

/// Tells whoever follows this answer that it failed before it started
/// (they return the same error), and waits until Redis has it.
async fn abort_followers(tee: Option<&mut Tee>, status: u16, body: &str) {
    if let Some(t) = tee {
        t.send(
            0,
            "abort",
            json!({"status": status, "body": body}).to_string().into(),
        );
        t.flush().await;
    }
}
