//! The work before a model is called, all at once: the rate limit, the
//! user's stream slot, the daily token budget, the first model's circuit,
//! and the conversation's history followed by the cache lookup (its key
//! includes the history). Shared state costs one round trip in time, not
//! one per check.

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use tracing::Instrument;

use super::finish::{CachePut, PopularJob};
use super::request::ChatRequest;
use crate::auth::Identity;
use crate::cache::{
    CacheControl, CachedAnswer, KeyInput, Plan, Ready, ResponseCache, cache_doc, key_of_doc,
};
use crate::error::ApiError;
use crate::limits::{Decision, Permit, Reservation, Slot};
use crate::live::{Lead, Live, Looked};
use crate::persistence::history::{self, HistoryError, PastTurn};
use crate::provider::routing::{ModelRef, Reason};
use crate::provider::{Message, Role};
use crate::state::{AppState, RequestCtx};
use crate::util::{new_id, now_ms, utc_day};

/// What the pre-work found.
pub(super) struct Planned {
    /// The model asked for (routing's choice), and why.
    pub model: String,
    pub route: Reason,
    /// The first model's circuit permit; `None` when its circuit is open
    /// (the fallbacks may still answer).
    pub primary: Option<Permit>,
    /// The history plus the new message.
    pub messages: Vec<Message>,
    pub max_tokens: u32,
    /// The cache key, when the request is cacheable.
    pub cache_key: Option<String>,
    /// Whether a cached answer may be used (and so followed).
    pub lookup: bool,
    pub hit: Option<Arc<Ready>>,
    /// The hit is the instance's own copy (no lookup round trip).
    pub local_hit: bool,
    /// On a miss looked up with the lease in one script: who leads this
    /// question's answer (`None`: not known yet, see `attempt::open`).
    pub lead: Option<Lead>,
    /// Where the answer is cached once complete.
    pub cache_put: Option<CachePut>,
    pub popular: Option<PopularJob>,
    pub rate_headers: Vec<(&'static str, String)>,
    /// The tokens reserved for the answer, settled when it ends.
    pub tokens: Option<Reservation>,
    /// The user's stream slot, given back when the answer ends.
    pub slot: Option<Slot>,
    pub started_at_ms: u64,
    pub validate: Duration,
    pub limits: Duration,
    pub history: Duration,
}

pub(super) async fn prepare(
    state: &AppState,
    ctx: &RequestCtx,
    identity: &Identity,
    req: &ChatRequest,
    cache_control: CacheControl,
    turn_id: &str,
) -> Result<Planned, ApiError> {
    let config = state.config();
    let validate = ctx.start.elapsed();
    let started_at_ms = now_ms();
    let caller: Arc<str> = Arc::from(format!("user:{}", identity.user_id));
    let (model, route) =
        config
            .routing
            .choose(req.model.as_deref(), req.system.as_deref(), &req.message)?;
    let model_ref = ModelRef::parse(&model, &config.providers.default_provider);
    if state.providers().get(&model_ref.provider).is_none() {
        return Err(ApiError::bad_request(
            "provider_not_configured",
            format!("the {} provider is not configured here", model_ref.provider),
        )
        .with_field("model"));
    }
    let cache = state.deps().cache.clone();
    let live = state.deps().live.as_deref().filter(|l| l.config.coalesce);
    let (plan, ttl) = match (&config.cache, &cache) {
        (Some(c), Some(_)) => (c.policy.plan(req.temperature, cache_control), c.policy.ttl),
        _ => (Plan::NONE, Duration::ZERO),
    };
    let scope = match &config.cache {
        Some(c) if c.global_scope => "global".to_owned(),
        _ => format!("user:{}", identity.user_id),
    };
    let max_tokens = req.max_tokens.unwrap_or(config.limits.default_max_tokens);
    let key_doc = |messages: &[Message]| {
        cache_doc(&KeyInput {
            scope: &scope,
            provider: &model_ref.provider,
            model: &model,
            system: req.system.as_deref(),
            messages,
            max_tokens,
            temperature: req.temperature,
            stop: &req.stop,
        })
    };
    let local = state.deps().local.as_deref().filter(|_| plan.lookup);
    // The messages at once when the request gives its context or starts a
    // conversation: no history to load.
    let known = match (&req.context, &req.conversation_id) {
        (Some(given), _) => Some(given.clone()),
        (None, None) => Some(Vec::new()),
        (None, Some(_)) => None,
    }
    .map(|mut m| {
        m.push(Message {
            role: Role::User,
            content: req.message.clone(),
        });
        m
    });
    // Keyed now when they are known and the cache is asked; a copy of the
    // answer this instance holds is answered without the shared state a
    // model call needs.
    let early = match &known {
        Some(m) if plan.lookup || plan.store => {
            let doc = key_doc(m);
            let key = key_of_doc(&doc);
            if let Some(ready) = local.and_then(|l| l.get(&key, plan.max_age, now_ms())) {
                let hit = LocalHit {
                    validate,
                    started_at_ms,
                    model: model.clone(),
                    route,
                    max_tokens,
                    key,
                    doc,
                    ready,
                };
                return Box::pin(local_hit(state, ctx, identity, &caller, hit)).await;
            }
            Some((doc, key))
        }
        _ => None,
    };
    let looked_locally = early.is_some();
    // History, then the cache lookup (its key includes the history).
    let history = async {
        let t = tokio::time::Instant::now();
        let messages = match known {
            Some(m) => Ok(m),
            // Boxed, as the table read is a large future that a new
            // conversation (no history) would otherwise carry too.
            None => Box::pin(
                load_history(state, req.conversation_id.as_deref(), identity)
                    .instrument(tracing::info_span!("history")),
            )
            .await
            .map(|past| {
                let mut m = history::to_messages(&past);
                m.push(Message {
                    role: Role::User,
                    content: req.message.clone(),
                });
                m
            }),
        };
        let (doc, key) = match (early, &messages) {
            (Some((doc, key)), _) => (Some(doc), Some(key)),
            (None, Ok(m)) if plan.lookup || plan.store => {
                let doc = key_doc(m);
                let key = key_of_doc(&doc);
                (Some(doc), Some(key))
            }
            _ => (None, None),
        };
        let mut local_hit = false;
        let (hit, lead) = match (&cache, &key) {
            (Some(c), Some(k)) if plan.lookup => {
                let held = local
                    .filter(|_| !looked_locally)
                    .and_then(|l| l.get(k, plan.max_age, now_ms()));
                if held.is_some() {
                    local_hit = true;
                    (held, None)
                } else {
                    let (hit, lead) = lookup(c.as_ref(), live, k, turn_id)
                        .instrument(tracing::info_span!(
                            "cache_lookup",
                            lead = tracing::field::Empty
                        ))
                        .await;
                    let now = now_ms();
                    let hit = hit.filter(|a| a.fresh_for(plan.max_age, now)).map(|a| {
                        let ready = Arc::new(super::hit::ready(a));
                        if let Some(l) = local {
                            l.keep(k, ready.clone(), now);
                        }
                        ready
                    });
                    (hit, lead)
                }
            }
            _ => (None, None),
        };
        (messages, key, doc, hit, lead, local_hit, t.elapsed())
    };
    let primary_key = model_ref.key();
    // The answer's tokens are reserved now (its max_tokens plus an estimate
    // of the new input; the history is not known yet), so requests in
    // flight count against the limit before they end.
    let input_estimate = (req.message.len() + req.system.as_deref().map_or(0, str::len)) / 4;
    let reserve = max_tokens.saturating_add(u32::try_from(input_estimate).unwrap_or(u32::MAX));
    // A fresh id: a client-sent request id could name a slot twice.
    let slot_id = new_id();
    let limits = async {
        // The rate limit and the slot share the caller's Redis slot: one
        // script (see `limits::admit`).
        let ((rate, slot), spent, primary) = tokio::join!(
            crate::limits::admit(state.limiter(), state.streams(), &caller, reserve, &slot_id),
            spent_today(state, &identity.user_id, started_at_ms),
            state.circuits().admit(&primary_key),
        );
        (rate, slot, spent, primary)
    }
    .instrument(tracing::info_span!("limits"));
    let (
        ((rate, tokens), slot, spent, primary),
        (messages, key, doc, hit, lead, local_hit, history_time),
    ) = tokio::join!(limits, history);
    // A lease taken with the lookup goes back if the request is refused.
    let mut held = HeldLease(match (&lead, &key, &state.deps().live) {
        (Some(Lead::Leader), Some(k), Some(l)) => Some((l.clone(), k.clone(), turn_id.to_owned())),
        _ => None,
    });
    let limits = ctx.start.elapsed() - validate;
    let rate_headers = rate.headers();
    // On any refusal the other checks' holds (tokens, slot, probe permit)
    // are given back as they drop.
    if !rate.allowed {
        return Err(rate_refused(&rate, rate_headers));
    }
    let slot = slot.map_err(|full| {
        ApiError::limited(
            "too_many_streams",
            "MAX_STREAMS_PER_USER",
            format!(
                "{} answers are streaming for this user already (the most at once is {}); retry when one ends",
                full.open, full.max
            ),
            Duration::from_secs(1),
            full.scope,
        )
    })?;
    budget_check(state, spent, started_at_ms)?;
    let messages = messages?;
    // Counted after the answer, on the task that persists the turn.
    let popular = match (&state.deps().popular, &key, doc) {
        (Some(p), Some(k), Some(d)) => Some((p.clone(), k.clone(), d)),
        _ => None,
    };
    let cache_put = match (cache, &key) {
        (Some(cache), Some(k)) if plan.store => Some(CachePut {
            cache,
            key: k.clone(),
            ttl,
            local: state.deps().local.clone(),
        }),
        _ => None,
    };
    // Admitted: the lease (if any) is the answer's now.
    held.0 = None;
    Ok(Planned {
        model,
        route,
        primary,
        messages,
        max_tokens,
        cache_key: key,
        lookup: plan.lookup,
        hit,
        local_hit,
        lead,
        cache_put,
        popular,
        rate_headers,
        tokens,
        slot,
        started_at_ms,
        validate,
        limits,
        history: history_time,
    })
}

/// A request answered from the instance's copy (see [`local_hit`]).
struct LocalHit {
    validate: Duration,
    started_at_ms: u64,
    model: String,
    route: Reason,
    max_tokens: u32,
    key: String,
    doc: String,
    ready: Arc<Ready>,
}

/// A hit from the instance's copy of the answer: of the shared state only
/// the rate limit is asked (and the daily budget, when one is set). It
/// takes no stream slot and reserves no tokens, as the answer is over as
/// it starts and calls no model; nor a circuit permit. One round trip,
/// where a hit in the shared cache takes the lookup and a release too.
async fn local_hit(
    state: &AppState,
    ctx: &RequestCtx,
    identity: &Identity,
    caller: &str,
    hit: LocalHit,
) -> Result<Planned, ApiError> {
    let checks = async {
        tokio::join!(
            state.limiter().check(caller, 0),
            spent_today(state, &identity.user_id, hit.started_at_ms),
        )
    }
    .instrument(tracing::info_span!("limits"));
    let ((rate, _), spent) = checks.await;
    let limits = ctx.start.elapsed() - hit.validate;
    let rate_headers = rate.headers();
    if !rate.allowed {
        return Err(rate_refused(&rate, rate_headers));
    }
    budget_check(state, spent, hit.started_at_ms)?;
    let popular = state
        .deps()
        .popular
        .as_ref()
        .map(|p| (p.clone(), hit.key.clone(), hit.doc));
    Ok(Planned {
        model: hit.model,
        route: hit.route,
        primary: None,
        messages: Vec::new(),
        max_tokens: hit.max_tokens,
        cache_key: Some(hit.key),
        lookup: true,
        hit: Some(hit.ready),
        local_hit: true,
        lead: None,
        cache_put: None,
        popular,
        rate_headers,
        tokens: None,
        slot: None,
        started_at_ms: hit.started_at_ms,
        validate: hit.validate,
        limits,
        history: Duration::ZERO,
    })
}

/// The 429 of a rate check that refused.
fn rate_refused(rate: &Decision, headers: Vec<(&'static str, String)>) -> ApiError {
    let what = rate.exceeded.unwrap_or("requests");
    let setting = if what == "tokens" {
        "RATE_LIMIT_TPM"
    } else {
        "RATE_LIMIT_RPM"
    };
    let mut e = ApiError::limited(
        "rate_limited",
        setting,
        format!("too many {what} per minute from this caller; retry after the reset"),
        rate.reset,
        rate.scope,
    );
    e.headers = headers;
    e
}

/// The 429 when the user's daily token budget is used up (`spent`).
fn budget_check(state: &AppState, spent: Option<u64>, started_at_ms: u64) -> Result<(), ApiError> {
    let budget = state.config().abuse.daily_token_budget;
    if budget > 0 && spent.is_some_and(|s| s >= budget) {
        let midnight = (started_at_ms / 86_400_000 + 1) * 86_400_000;
        let mut e = ApiError::limited(
            "budget_exceeded",
            "DAILY_TOKEN_BUDGET_PER_USER",
            format!("this user's {budget} model tokens for today (UTC) are used up"),
            Duration::from_millis(midnight - started_at_ms),
            "fleet",
        );
        if let Some(l) = e.limit.as_mut() {
            l.resets_at = Some(format!("{}T00:00:00Z", utc_day(midnight)));
        }
        return Err(e);
    }
    Ok(())
}

/// The cache lookup of `key`: with the coalescing lease in one script when
/// the cache is in the Redis live streams use (a miss then also knows who
/// leads its answer), otherwise a plain lookup. `None` for the lead: not
/// taken here.
async fn lookup(
    cache: &dyn ResponseCache,
    live: Option<&Live>,
    key: &str,
    turn_id: &str,
) -> (Option<CachedAnswer>, Option<Lead>) {
    if let (Some(live), Some(entry_key)) = (live, cache.redis_key(key)) {
        let (hit, lead) = match live.lookup_or_lead(&entry_key, key, turn_id).await {
            Some(Looked::Cached(raw)) => (CachedAnswer::parse(&raw), None),
            Some(Looked::Missed(lead)) => (None, Some(lead)),
            // Redis is not answering: a miss, answered alone.
            None => (None, Some(Lead::Alone)),
        };
        let role = match &lead {
            Some(Lead::Leader) => "leader",
            Some(Lead::Follow(_)) => "follow",
            Some(Lead::Alone) => "alone",
            None => "none",
        };
        tracing::Span::current().record("lead", role);
        return (hit, lead);
    }
    (cache.get(key).await.ok().flatten(), None)
}

/// A coalescing lease taken before the request was admitted: given back
/// (on a task) if it is dropped while still held.
struct HeldLease(Option<(Arc<Live>, String, String)>);

impl Drop for HeldLease {
    fn drop(&mut self) {
        if let Some((live, key, turn_id)) = self.0.take() {
            if let Ok(h) = tokio::runtime::Handle::try_current() {
                h.spawn(async move { live.release(&key, &turn_id).await });
            }
        }
    }
}

/// The history of `conversation_id` for `identity`; none for a new
/// conversation. Unknown and someone else's conversations are the same 404.
async fn load_history(
    state: &AppState,
    conversation_id: Option<&str>,
    identity: &Identity,
) -> Result<Vec<PastTurn>, ApiError> {
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
    history::load(
        store,
        state.deps().buffer.as_deref(),
        id,
        &identity.user_id,
        &state.config().history,
    )
    .await
    .map_err(|e| match e {
        HistoryError::NotFound => not_found(),
        HistoryError::Unavailable(why) => {
            tracing::warn!(error = %why, "history unavailable");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "history_unavailable",
                "the conversation's history could not be loaded; retry shortly",
            )
        }
    })
}

/// The model tokens (input + output) `user` has used today (UTC), as the
/// table counts them; `None` when no budget is set, there is no table, or
/// it did not answer in time (the budget then lets the request through:
/// usage reaches the table seconds after a turn in any case).
async fn spent_today(state: &AppState, user: &str, now_ms: u64) -> Option<u64> {
    if state.config().abuse.daily_token_budget == 0 {
        return None;
    }
    let store = state.deps().store.as_deref()?;
    let limit = state.config().abuse.table_timeout;
    match tokio::time::timeout(limit, Box::pin(store.usage(user, &utc_day(now_ms)))).await {
        Ok(Ok((_, input, output))) => Some(input.saturating_add(output)),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "usage unavailable; the daily budget is not checked");
            None
        }
        Err(_) => {
            tracing::warn!("usage read timed out; the daily budget is not checked");
            None
        }
    }
}
