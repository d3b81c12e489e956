//! `GET /health`. Public: only whether the service is up. With
//! credentials: each dependency's last known state, and with `?probe=1`
//! live checks, whose answer is reused for [`PROBE_REUSE`] so probes
//! cannot be turned into load on the providers and the table.

use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::error_response;
use crate::limits::BreakerState;
use crate::state::{AppState, CachedProbe, Probe};
use crate::util::ms;

/// How long a probe's answer is reused.
pub const PROBE_REUSE: Duration = Duration::from_secs(5);

/// `GET /health`: public, `{"status":"up"}`; with credentials, each
/// dependency's last known state. `?probe=1` (credentials required) also
/// checks the model providers live (a connection, no tokens) and the
/// table, and answers 503 if a provider check fails.
pub(super) async fn health(State(state): State<AppState>, req: Request) -> Response {
    let probe_requested = req.uri().query().is_some_and(|q| {
        q.split('&')
            .any(|kv| kv == "probe" || kv == "probe=1" || kv == "probe=true")
    });
    let ctx = crate::state::RequestCtx::of(req.extensions());
    let admitted =
        super::admit::admit(&state, &ctx, req.headers(), super::admit::Access::Health).await;
    if let Err(e) = admitted {
        if probe_requested {
            return error_response(e);
        }
        // Anyone may ask whether we are up; nothing else.
        return (
            StatusCode::OK,
            [(header::CACHE_CONTROL, "no-store")],
            axum::Json(json!({"status": "up"})),
        )
            .into_response();
    }
    if !probe_requested {
        let (status, body) = details(&state, false).await;
        return answer(status, body);
    }
    let mut cached = state.probe_cache().lock().await;
    if let Some(c) = cached.as_ref().filter(|c| c.at.elapsed() < PROBE_REUSE) {
        let mut body = c.body.clone();
        body["probe_age_ms"] = json!(ms(c.at.elapsed()));
        return answer(c.status, body);
    }
    let (status, body) = details(&state, true).await;
    *cached = Some(CachedProbe {
        at: tokio::time::Instant::now(),
        status,
        body: body.clone(),
    });
    let mut body = body;
    body["probe_age_ms"] = json!(0.0);
    answer(status, body)
}

fn answer(status: StatusCode, body: serde_json::Value) -> Response {
    (
        status,
        [(header::CACHE_CONTROL, "no-store")],
        axum::Json(body),
    )
        .into_response()
}

/// The full report: dependencies, circuits, and with `probe_requested`
/// the live checks.
async fn details(state: &AppState, probe_requested: bool) -> (StatusCode, serde_json::Value) {
    let circuits: serde_json::Map<String, serde_json::Value> = state
        .circuits()
        .local()
        .states(tokio::time::Instant::now())
        .into_iter()
        .map(|(k, st)| {
            let word = match st {
                BreakerState::Closed => "closed",
                BreakerState::Open => "open",
                BreakerState::HalfOpen => "half_open",
            };
            (k, json!(word))
        })
        .collect();
    let probes = if probe_requested {
        state.check_providers(Duration::from_secs(3)).await
    } else {
        Vec::new()
    };
    let mut ok = true;
    let mut degraded = false;
    let mut deps = serde_json::Map::new();
    for p in state.providers().iter() {
        let mut dep = state.health(p.name()).snapshot();
        degraded |= matches!(dep["state"].as_str(), Some("failing") | Some("degraded"));
        if let Some((_, result)) = probes.iter().find(|(n, _)| *n == p.name()) {
            dep["probe"] = match result {
                Probe::Ok(latency) => json!({"ok": true, "latency_ms": latency}),
                Probe::Failed(code) => {
                    ok = false;
                    json!({"ok": false, "error": code})
                }
                Probe::Skipped => {
                    json!({"ok": null, "skipped": "this provider has no token-free call"})
                }
            };
        }
        deps.insert(p.name().to_owned(), dep);
    }
    let redis = state.redis_health(probe_requested).await;
    // Redis down degrades (limits become per instance); it never fails chat.
    degraded |= redis == "down";
    // Where the limits are counted: Redis when it answers, else the table
    // (without Redis), else this instance.
    let counters = if redis == "ok" {
        "redis"
    } else if redis == "not_configured" && state.deps().counters.is_some() {
        "table"
    } else {
        "instance"
    };
    let scope = if counters == "instance" {
        "instance"
    } else {
        "fleet"
    };
    deps.insert("redis".to_owned(), json!({"state": redis, "scope": scope}));
    deps.insert(
        "limits".to_owned(),
        json!({"counted_in": counters, "scope": scope}),
    );
    if let Some(store) = &state.deps().store {
        // Conversations need the table; chat without history still works
        // when it is down (turns then wait on the queue), so it degrades.
        let (table_state, latency) = if probe_requested {
            let t = Instant::now();
            match store.probe().await {
                Ok(()) => ("ok", Some(ms(t.elapsed()))),
                Err(_) => ("down", None),
            }
        } else {
            ("configured", None)
        };
        degraded |= table_state == "down";
        deps.insert(
            "dynamodb".to_owned(),
            json!({"state": table_state, "table": store.table(), "latency_ms": latency}),
        );
    }
    if let Some(p) = &state.deps().persister {
        let q = p.queue_health();
        degraded |= matches!(q, "failing" | "degraded");
        deps.insert("sqs".to_owned(), json!({"state": q}));
    }
    deps.insert(
        "auth".to_owned(),
        json!({"method": state.deps().auth.method()}),
    );
    let status_word = if !ok {
        "down"
    } else if degraded {
        "degraded"
    } else {
        "ok"
    };
    let body = json!({
        "status": status_word,
        "version": env!("CARGO_PKG_VERSION"),
        "dependencies": deps,
        "circuits": circuits,
    });
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, body)
}
