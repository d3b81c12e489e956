//! The cache-warmer's work: refresh the most asked questions whose cached
//! answers are missing or close to expiry, within a budget.
//!
//! One run: read the `top` most asked questions (see [`crate::popular`]),
//! look each one up in the cache, and ask the model again for those that
//! are missing or expire within `refresh_ahead`, most asked first, storing
//! each complete answer. The budget bounds a run: model calls, tokens
//! (reserved as the question's size plus its `max_tokens` before a call,
//! settled to the real usage after), calls at once, and wall time (no call
//! starts after it, and calls still running then are abandoned). A model
//! whose circuit breaker is open is skipped, not called. The report says
//! what happened to every question considered.

use std::sync::Mutex;
use std::time::{Duration, Instant};
use tracing::Instrument;

use futures_util::StreamExt;
use serde::Serialize;

use std::sync::Arc;

use super::popular::Popularity;
use super::{CachedAnswer, KeySpec, ResponseCache, cache_key};
use crate::limits::Circuits;
use crate::provider::routing::ModelRef;
use crate::provider::{Chunk, ModelRequest, Providers};

/// What a run needs, built once per process (`init::build_warmer`).
pub struct Warmer {
    pub providers: Providers,
    pub circuits: Circuits,
    /// The cache and its TTL; `None` when the cache is not configured (a
    /// run then says so).
    pub cache: Option<(Arc<dyn ResponseCache>, Duration)>,
    /// `None` without Redis (a run then says so).
    pub popular: Option<Arc<Popularity>>,
}

/// Limits of one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WarmBudget {
    /// `WARM_TOP` (default 50): how many of the most asked to consider.
    pub top: usize,
    /// `WARM_MAX_CALLS` (default 20).
    pub max_calls: u32,
    /// `WARM_MAX_TOKENS` (default 100000): input + output tokens.
    pub max_tokens: u64,
    /// `WARM_CONCURRENCY` (default 4).
    pub concurrency: usize,
    /// `WARM_TIME_LIMIT_SECS` (default 240; keep it under the function's
    /// timeout).
    pub time_limit: Duration,
    /// `WARM_REFRESH_AHEAD_SECS` (default: a fifth of `CACHE_TTL_SECS`):
    /// entries expiring sooner than this are refreshed.
    pub refresh_ahead: Duration,
}

/// What happened to one question.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Refreshed,
    Fresh,
    SkippedBudget,
    SkippedCircuitOpen,
    /// Its document was too large to keep, or is from another format.
    SkippedUnreadable,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Warmed {
    pub key: String,
    pub weight: f64,
    pub outcome: Outcome,
    /// The error code of a failed call.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<&'static str>,
}

/// The result of a run, returned by the function and logged.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct WarmReport {
    pub considered: usize,
    pub refreshed: usize,
    pub fresh: usize,
    pub skipped_budget: usize,
    pub skipped_circuit_open: usize,
    pub skipped_unreadable: usize,
    pub failed: usize,
    pub model_calls: u32,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub elapsed_ms: u64,
    pub entries: Vec<Warmed>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WarmError {
    #[error("the response cache is not configured (CACHE_ENABLED)")]
    NoCache,
    #[error("popularity tracking needs REDIS_URL")]
    NoPopularity,
    #[error("the popularity list could not be read (redis unavailable)")]
    PopularityUnavailable,
}

/// Spent so far in a run.
struct Spent {
    calls: u32,
    tokens: u64,
}

pub async fn warm(w: &Warmer, budget: &WarmBudget) -> Result<WarmReport, WarmError> {
    let started = Instant::now();
    let deadline = started + budget.time_limit;
    let (cache, ttl) = w.cache.clone().ok_or(WarmError::NoCache)?;
    let popular = w.popular.clone().ok_or(WarmError::NoPopularity)?;
    let top = popular
        .top(budget.top)
        .await
        .ok_or(WarmError::PopularityUnavailable)?;

    // Which need a refresh: lookups in parallel (a cache read each).
    let now_ms = crate::util::now_ms();
    let checks = top.into_iter().map(|p| {
        let cache = cache.clone();
        async move {
            let spec = KeySpec::from_doc(&p.doc).filter(|s| cache_key(&s.input()) == p.key);
            let Some(spec) = spec else {
                return (p, None, Some(Outcome::SkippedUnreadable));
            };
            let remaining = match cache.get(&p.key).await {
                Ok(Some(a)) => {
                    Some((a.stored_at_ms + ttl.as_millis() as u64).saturating_sub(now_ms))
                }
                // Missing, or the cache is down (a refresh tells which).
                _ => None,
            };
            let fresh = remaining.is_some_and(|r| r > budget.refresh_ahead.as_millis() as u64);
            (p, Some(spec), fresh.then_some(Outcome::Fresh))
        }
    });
    let checked = futures_util::future::join_all(checks).await;

    let spent = Mutex::new(Spent {
        calls: 0,
        tokens: 0,
    });
    let jobs = checked.into_iter().map(|(p, spec, decided)| {
        let cache = cache.clone();
        let spent = &spent;
        async move {
            let done = |outcome, error| Warmed {
                key: p.key.clone(),
                weight: p.weight,
                outcome,
                error,
            };
            if let Some(o) = decided {
                return (done(o, None), 0, 0, false);
            }
            let Some(spec) = spec else {
                return (done(Outcome::SkippedUnreadable, None), 0, 0, false);
            };
            // Budget, claimed before the call (so concurrent calls cannot
            // overspend it together).
            let reserve = (p.doc.len() / 4) as u64 + u64::from(spec.max_tokens);
            {
                let mut s = spent.lock().unwrap_or_else(|e| e.into_inner());
                if Instant::now() >= deadline
                    || s.calls >= budget.max_calls
                    || s.tokens + reserve > budget.max_tokens
                {
                    return (done(Outcome::SkippedBudget, None), 0, 0, false);
                }
                s.calls += 1;
                s.tokens += reserve;
            }
            let settle = |used: u64| {
                let mut s = spent.lock().unwrap_or_else(|e| e.into_inner());
                s.tokens = s.tokens - reserve + used;
            };
            let mref = ModelRef::parse(&spec.model, &spec.provider);
            let model_key = mref.key();
            let Some(provider) = w.providers.get(&mref.provider).cloned() else {
                settle(0);
                return (
                    done(Outcome::Failed, Some("provider_not_configured")),
                    0,
                    0,
                    false,
                );
            };
            let Some(permit) = w.circuits.admit(&model_key).await else {
                settle(0);
                let mut s = spent.lock().unwrap_or_else(|e| e.into_inner());
                s.calls -= 1;
                return (done(Outcome::SkippedCircuitOpen, None), 0, 0, false);
            };
            let req = ModelRequest {
                model: mref.model.clone(),
                system: spec.system.clone(),
                messages: spec.messages.clone(),
                max_tokens: spec.max_tokens,
                temperature: spec.temperature,
                stop: spec.stop.clone(),
            };
            let call = async {
                let mut stream = provider.stream(&req).await?;
                let mut answer = CachedAnswer {
                    text: String::new(),
                    model: mref.model.clone(),
                    stop_reason: None,
                    input_tokens: 0,
                    output_tokens: 0,
                    stored_at_ms: 0,
                };
                while let Some(chunk) = stream.next().await {
                    match chunk? {
                        Chunk::Start { model, .. } if !model.is_empty() => answer.model = model,
                        Chunk::Start { .. } => {}
                        Chunk::Delta(t) => answer.text.push_str(&t),
                        Chunk::Stop {
                            stop_reason,
                            input_tokens,
                            output_tokens,
                        } => {
                            answer.stop_reason = stop_reason.or(answer.stop_reason.take());
                            answer.input_tokens = input_tokens.unwrap_or(answer.input_tokens);
                            answer.output_tokens = output_tokens.unwrap_or(answer.output_tokens);
                        }
                        Chunk::End => {
                            answer.stored_at_ms = crate::util::now_ms();
                            return Ok(answer);
                        }
                    }
                }
                Err(crate::error::UpstreamError::Truncated)
            };
            let result = tokio::time::timeout_at(deadline.into(), call)
                .instrument(tracing::info_span!("refresh", model = %mref.model))
                .await;
            match result {
                Ok(Ok(answer)) => {
                    permit.success().await;
                    let (i, o) = (
                        u64::from(answer.input_tokens),
                        u64::from(answer.output_tokens),
                    );
                    settle(i + o);
                    let stored = cache
                        .put(&p.key, &answer, ttl)
                        .instrument(tracing::info_span!("cache_store"))
                        .await
                        .is_ok();
                    if stored {
                        (done(Outcome::Refreshed, None), i, o, true)
                    } else {
                        (done(Outcome::Failed, Some("cache_unavailable")), i, o, true)
                    }
                }
                Ok(Err(e)) => {
                    if e.retryable() {
                        permit.failure().await;
                    } else {
                        permit.unused().await;
                    }
                    settle(0);
                    (done(Outcome::Failed, Some(e.code())), 0, 0, true)
                }
                Err(_) => {
                    // Out of time: the call says nothing about the model.
                    permit.unused().await;
                    settle(reserve);
                    (done(Outcome::Failed, Some("time_limit")), 0, 0, true)
                }
            }
        }
    });
    let results: Vec<_> = futures_util::stream::iter(jobs)
        .buffered(budget.concurrency.max(1))
        .collect()
        .await;

    let mut report = WarmReport {
        considered: results.len(),
        ..WarmReport::default()
    };
    for (w, i, o, called) in results {
        match w.outcome {
            Outcome::Refreshed => report.refreshed += 1,
            Outcome::Fresh => report.fresh += 1,
            Outcome::SkippedBudget => report.skipped_budget += 1,
            Outcome::SkippedCircuitOpen => report.skipped_circuit_open += 1,
            Outcome::SkippedUnreadable => report.skipped_unreadable += 1,
            Outcome::Failed => report.failed += 1,
        }
        report.model_calls += u32::from(called);
        report.input_tokens += i;
        report.output_tokens += o;
        report.entries.push(w);
    }
    report.elapsed_ms = started.elapsed().as_millis() as u64;
    Ok(report)
}

/// One run: its report is the function's result, one log line and one
/// metrics line. `trace_header`: the invocation's (Lambda's), for X-Ray.
pub async fn run_once(
    w: &Warmer,
    budget: &WarmBudget,
    trace_header: Option<&str>,
) -> Result<serde_json::Value, Box<dyn std::error::Error + Send + Sync>> {
    let span = tracing::info_span!("warm", trace_header = tracing::field::Empty);
    if let Some(h) = trace_header {
        span.record("trace_header", h);
    }
    match warm(w, budget).instrument(span.clone()).await {
        Ok(report) => {
            crate::obs::emf::Metrics::new()
                .count("Refreshes", report.refreshed as f64)
                .count("RefreshFailures", report.failed as f64)
                .count("WarmModelCalls", f64::from(report.model_calls))
                .ms("WarmTime", report.elapsed_ms as f64)
                .emit();
            tracing::info!(
                considered = report.considered,
                refreshed = report.refreshed,
                fresh = report.fresh,
                skipped_budget = report.skipped_budget,
                skipped_circuit_open = report.skipped_circuit_open,
                failed = report.failed,
                model_calls = report.model_calls,
                input_tokens = report.input_tokens,
                output_tokens = report.output_tokens,
                elapsed_ms = report.elapsed_ms,
                "cache-warmer run"
            );
            Ok(serde_json::to_value(&report)?)
        }
        Err(e) => {
            tracing::error!(error = %e, "cache-warmer run failed");
            Err(Box::new(e))
        }
    }
}

/// Outside Lambda: one run, or one every `every` until Ctrl-C or SIGTERM
/// (a failed run is logged; the next tick tries again).
pub async fn run_local(
    w: &Warmer,
    budget: &WarmBudget,
    every: Option<Duration>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let Some(every) = every else {
        return run_once(w, budget, None).await.map(|_| ());
    };
    tracing::info!(
        every_secs = every.as_secs(),
        "cache-warmer running on a local timer"
    );
    let mut tick = tokio::time::interval(every);
    let stop = crate::server::shutdown_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let _ = run_once(w, budget, None).await;
            }
            () = &mut stop => return Ok(()),
        }
    }
}
