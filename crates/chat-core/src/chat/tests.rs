//! The turn's logic against the in-crate fake provider, without sockets:
//! retries, fallback, the circuit permit on every exit path, deadlines,
//! and the relay (through the router, with `oneshot`).
//!
//! The permit tests run twice: with this instance's breakers (time
//! paused) and with the fleet's breakers in a real Redis (`REDIS_URL`,
//! started by `make test`; its clock cannot be paused, so those wait a
//! short real cooldown).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::Request;
use http_body_util::BodyExt;
use tokio::time::Instant;

use super::attempt::{Deadlines, open_with_fallback};
use crate::auth::DevAuth;
use crate::error::UpstreamError;
use crate::provider::fake::FakeProvider;
use crate::provider::{Message, ModelRequest, Providers, Role};
use crate::redis::RedisLink;
use crate::state::{AppState, Deps};

const COOLDOWN_MS: u64 = 300;

fn state(extra: &[(&str, &str)], redis: Option<Arc<RedisLink>>) -> (AppState, Arc<FakeProvider>) {
    let mut m: HashMap<&str, &str> = [
        ("ANTHROPIC_API_KEY", "unused"),
        ("AUTH_MODE", "dev"),
        ("MODEL_ALLOWLIST", "*"),
        ("UPSTREAM_MAX_RETRIES", "0"),
        ("UPSTREAM_RETRY_BASE_MS", "50"),
        ("BREAKER_FAILURES", "1"),
        ("BREAKER_COOLDOWN_MS", "300"),
    ]
    .into_iter()
    .collect();
    m.extend(extra.iter().copied());
    let config = crate::Config::from_source(&m).unwrap();
    let fake = Arc::new(FakeProvider::named("anthropic"));
    let providers = Providers::new(vec![fake.clone()]);
    let deps = Deps {
        auth: Arc::new(DevAuth),
        store: None,
        buffer: None,
        persister: None,
        cache: None,
        local: None,
        live: None,
        popular: None,
        counters: None,
    };
    (AppState::new(config, providers, redis, deps), fake)
}

fn request(model: &str) -> ModelRequest {
    ModelRequest {
        model: model.to_owned(),
        system: None,
        messages: vec![Message {
            role: Role::User,
            content: "hi".into(),
        }],
        max_tokens: 16,
        temperature: None,
        stop: Vec::new(),
    }
}

fn deadlines(total: Duration) -> Deadlines {
    let now = Instant::now();
    Deadlines {
        first_token: now + Duration::from_secs(20),
        total: now + total,
        idle: Duration::from_secs(30),
    }
}

fn redis() -> Arc<RedisLink> {
    let url = std::env::var("REDIS_URL")
        .unwrap_or_else(|_| panic!("REDIS_URL is not set: run the tests with `make test`"));
    Arc::new(RedisLink::new(&url, Duration::from_millis(500), false).unwrap())
}

/// A model name whose circuit no other test shares.
fn unique(kind: &str) -> String {
    format!("{kind}#{}", crate::util::new_id())
}

#[tokio::test(start_paused = true)]
async fn transient_failures_are_retried_then_answered() {
    let (s, fake) = state(
        &[("UPSTREAM_MAX_RETRIES", "2"), ("BREAKER_FAILURES", "5")],
        None,
    );
    let o = open_with_fallback(
        &s,
        &request("flaky-2"),
        &deadlines(Duration::from_secs(60)),
        None,
    )
    .await
    .map_err(|(e, _)| e)
    .unwrap();
    assert_eq!((o.attempts, fake.calls()), (3, 3));
}

#[tokio::test(start_paused = true)]
async fn a_failing_model_falls_back_to_the_next() {
    let (s, fake) = state(&[("MODEL_FALLBACKS", "ok")], None);
    let o = open_with_fallback(
        &s,
        &request("status-503"),
        &deadlines(Duration::from_secs(60)),
        None,
    )
    .await
    .map_err(|(e, _)| e)
    .unwrap();
    assert_eq!((o.model.as_str(), o.attempts, fake.calls()), ("ok", 2, 2));
}

#[tokio::test(start_paused = true)]
async fn a_request_error_is_not_retried_nor_sent_elsewhere() {
    let (s, fake) = state(
        &[("UPSTREAM_MAX_RETRIES", "3"), ("MODEL_FALLBACKS", "ok")],
        None,
    );
    let Err((e, attempts)) = open_with_fallback(
        &s,
        &request("status-400"),
        &deadlines(Duration::from_secs(60)),
        None,
    )
    .await
    else {
        panic!("a 400 must not be answered");
    };
    assert!(
        matches!(e, UpstreamError::Status { status: 400, .. }),
        "{e:?}"
    );
    assert_eq!((attempts, fake.calls()), (1, 1));
}

#[tokio::test(start_paused = true)]
async fn a_slow_first_token_times_out_within_the_total_deadline() {
    let (s, _) = state(&[], None);
    let Err((e, _)) = open_with_fallback(
        &s,
        &request("slow-5000"),
        &deadlines(Duration::from_secs(1)),
        None,
    )
    .await
    else {
        panic!("must time out");
    };
    assert_eq!(e.code(), "upstream_timeout");
}

/// Opens the circuit of `model` and waits out its cooldown, so the next
/// call is the half-open probe.
async fn half_open(s: &AppState, model: &str) {
    let key = format!("anthropic:{model}");
    s.circuits().record_failure(&key).await;
    assert!(s.circuits().admit(&key).await.is_none(), "open");
    tokio::time::sleep(Duration::from_millis(COOLDOWN_MS + 50)).await;
}

/// After the probe's call: the circuit is not stuck with a probe in flight.
async fn assert_usable(s: &AppState, model: &str) {
    let key = format!("anthropic:{model}");
    // A dropped permit gives its Redis slot back on a task of its own.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let p = s.circuits().admit(&key).await;
    assert!(
        p.as_ref().is_some_and(|p| p.is_probe()),
        "the circuit of {model} must let the next probe through"
    );
}

async fn probe_answered_400(redis: Option<Arc<RedisLink>>) {
    let (s, _) = state(&[], redis);
    let model = unique("status-400");
    half_open(&s, &model).await;
    let r = open_with_fallback(
        &s,
        &request(&model),
        &deadlines(Duration::from_secs(60)),
        None,
    )
    .await;
    assert!(r.is_err());
    assert_usable(&s, &model).await;
}

async fn probe_past_the_total_deadline(redis: Option<Arc<RedisLink>>) {
    let (s, _) = state(&[], redis);
    let model = unique("ok");
    half_open(&s, &model).await;
    // The probe is admitted with the pre-work, which took the whole budget.
    let primary = s.circuits().admit(&format!("anthropic:{model}")).await;
    assert!(primary.as_ref().is_some_and(|p| p.is_probe()));
    let late = Deadlines {
        total: Instant::now(),
        ..deadlines(Duration::ZERO)
    };
    let r = open_with_fallback(&s, &request(&model), &late, Some(primary)).await;
    assert!(r.is_err());
    assert_usable(&s, &model).await;
}

async fn probe_whose_client_left(redis: Option<Arc<RedisLink>>) {
    let (s, _) = state(&[], redis);
    let model = unique("hang");
    half_open(&s, &model).await;
    let (req, limits) = (request(&model), deadlines(Duration::from_secs(60)));
    let call = open_with_fallback(&s, &req, &limits, None);
    // The client leaves: the request's future is dropped mid-call.
    assert!(
        tokio::time::timeout(Duration::from_millis(100), call)
            .await
            .is_err()
    );
    assert_usable(&s, &model).await;
}

#[tokio::test(start_paused = true)]
async fn local_a_probe_answered_400_leaves_the_circuit_usable() {
    probe_answered_400(None).await;
}

#[tokio::test(start_paused = true)]
async fn local_a_probe_past_the_total_deadline_leaves_the_circuit_usable() {
    probe_past_the_total_deadline(None).await;
}

#[tokio::test(start_paused = true)]
async fn local_a_probe_whose_client_left_leaves_the_circuit_usable() {
    probe_whose_client_left(None).await;
}

#[tokio::test]
async fn redis_a_probe_answered_400_leaves_the_circuit_usable() {
    probe_answered_400(Some(redis())).await;
}

#[tokio::test]
async fn redis_a_probe_past_the_total_deadline_leaves_the_circuit_usable() {
    probe_past_the_total_deadline(Some(redis())).await;
}

#[tokio::test]
async fn redis_a_probe_whose_client_left_leaves_the_circuit_usable() {
    probe_whose_client_left(Some(redis())).await;
}

/// One request through the router (no socket): the event names of its
/// streamed body, and the body.
async fn chat(s: &AppState, req: Request<Body>) -> (Vec<String>, String) {
    use tower::ServiceExt;
    let resp = crate::api::app(s.clone()).oneshot(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&body).into_owned();
    let events = text
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .map(str::to_owned)
        .collect();
    (events, text)
}

/// The whole relay through the router: an answer that breaks off after
/// its first text ends with an `error` event, and the model's circuit
/// counts the failure.
#[tokio::test(start_paused = true)]
async fn an_answer_that_breaks_mid_stream_ends_with_an_error_event() {
    let (s, _) = state(&[], None);
    let req = Request::post("/chat")
        .header("content-type", "application/json")
        .body(Body::from(r#"{"message":"hi","model":"break"}"#))
        .unwrap();
    let (events, text) = chat(&s, req).await;
    assert_eq!(events, ["meta", "delta", "error"], "{text}");
    assert!(
        s.circuits().admit("anthropic:break").await.is_none(),
        "one failure (BREAKER_FAILURES=1) opens the circuit"
    );
}

/// A whole answer through the router, with its timings.
#[tokio::test(start_paused = true)]
async fn a_whole_answer_is_meta_deltas_done() {
    let (s, _) = state(&[], None);
    let req = Request::post("/chat")
        .body(Body::from(r#"{"message":"hi","model":"ok"}"#))
        .unwrap();
    let (events, text) = chat(&s, req).await;
    assert_eq!(
        events,
        ["meta", "delta", "delta", "delta", "done"],
        "{text}"
    );
    assert!(text.contains(r#""text":" fake.""#), "{text}");
}

/// A client that keeps its socket open but stops reading must not pin the
/// answer: once a frame has waited `CLIENT_SEND_TIMEOUT_MS` it is detached
/// as if it had left (live streams off here: the model call stops).
#[tokio::test(start_paused = true)]
async fn a_client_that_stops_reading_is_detached_and_the_model_call_stops() {
    use tower::ServiceExt;
    let (s, fake) = state(&[("CLIENT_SEND_TIMEOUT_MS", "2000")], None);
    let req = Request::post("/chat")
        .body(Body::from(r#"{"message":"hi","model":"many-100000"}"#))
        .unwrap();
    let resp = crate::api::app(s).oneshot(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    assert!(body.frame().await.is_some(), "the first frame arrives");
    assert_eq!(fake.open_streams(), 1, "the answer is streaming");
    // Nothing more is read, and the body is kept (the socket stays open).
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        fake.open_streams(),
        0,
        "the model call must stop once the client is detached"
    );
    drop(body);
}

fn post(body: String, user: &str) -> Request<Body> {
    Request::post("/chat")
        .header("x-dev-user", user)
        .body(Body::from(body))
        .unwrap()
}

/// Answers in flight hold their tokens (max_tokens + input estimate) from
/// admission, so parallel requests cannot overshoot the token limit; an
/// answer that ends gives back what it did not use, and one that fails
/// before it starts gives back everything.
async fn tokens_reserved_at_admission(redis: Option<Arc<RedisLink>>) {
    use tower::ServiceExt;
    let (s, _) = state(
        &[("RATE_LIMIT_RPM", "0"), ("RATE_LIMIT_TPM", "1000")],
        redis,
    );
    let user = crate::util::new_id();
    let body = |model: &str| format!(r#"{{"message":"hi","model":"{model}","max_tokens":600}}"#);
    for _ in 0..5 {
        let r = crate::api::app(s.clone())
            .oneshot(post(body("status-400"), &user))
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            400,
            "a failed request's reservation is given back"
        );
    }
    for _ in 0..5 {
        let r = crate::api::app(s.clone())
            .oneshot(post(body("ok"), &user))
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "a finished answer keeps only what it used");
        let _ = r.into_body().collect().await.unwrap();
    }
    // Two answers in flight (the model has not answered yet).
    for _ in 0..2 {
        let app = crate::api::app(s.clone());
        let req = post(body("slow-60000"), &user);
        tokio::spawn(async move { app.oneshot(req).await });
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let r = crate::api::app(s.clone())
        .oneshot(post(body("ok"), &user))
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        429,
        "the answers in flight hold 1200 of 1000 tokens"
    );
}

#[tokio::test(start_paused = true)]
async fn local_tokens_are_reserved_at_admission_and_settled() {
    tokens_reserved_at_admission(None).await;
}

#[tokio::test]
async fn redis_tokens_are_reserved_at_admission_and_settled() {
    tokens_reserved_at_admission(Some(redis())).await;
}

/// Every header an answer sends that a browser script may want is in the
/// CORS expose list the Function URL uses (api/cors.json), so a header
/// added later cannot be forgotten there.
#[tokio::test(start_paused = true)]
async fn every_header_the_api_sends_is_exposed_to_browsers() {
    use tower::ServiceExt;
    let cors: serde_json::Value = serde_json::from_str(crate::api::CORS_JSON).unwrap();
    let exposed: Vec<&str> = cors["expose_headers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    // Rate limits on, so the x-ratelimit-* headers are sent too.
    let (s, _) = state(&[("RATE_LIMIT_RPM", "100")], None);
    let mut names = std::collections::BTreeSet::new();
    for body in [
        r#"{"message":"hi","model":"ok"}"#,
        r#"{"message":"hi","model":"status-429"}"#,
    ] {
        let resp = crate::api::app(s.clone())
            .oneshot(Request::post("/chat").body(Body::from(body)).unwrap())
            .await
            .unwrap();
        names.extend(resp.headers().keys().map(|k| k.as_str().to_owned()));
    }
    // What browsers read without CORS (safelisted) or never need.
    let plain = [
        "content-type",
        "cache-control",
        "content-length",
        "x-accel-buffering",
        // Directives to the browser itself, not read by the page.
        "x-content-type-options",
        "referrer-policy",
    ];
    for n in &names {
        assert!(
            exposed.contains(&n.as_str()) || plain.contains(&n.as_str()),
            "{n} is sent but not in api/cors.json expose_headers"
        );
    }
    assert!(names.contains("x-ratelimit-remaining") && names.contains("retry-after"));
}

/// Every request waiting for its first token holds the turn's future and
/// the model call's opening (1,000 slow streams at once hold 1,000 of
/// each): their sizes are memory per request in flight, and every move of
/// them is a copy. So the pre-work is boxed and held only while it runs,
/// and inside it the paths most requests never take (the table's history
/// read, the usage read, the limits asked one by one) are boxed where they
/// run. Measured here (unoptimised build): the turn 1,824 bytes, the
/// opening 3,944, the pre-work 4,872 (38,072 before its rare paths were
/// boxed), the release of tokens and slot 1,392; the bounds leave room,
/// and fail if a large future is inlined again.
#[test]
fn the_futures_a_waiting_request_holds_are_small() {
    let (s, _) = state(&[], None);
    let ctx = crate::state::RequestCtx::of(&axum::http::Extensions::new());
    let identity = crate::auth::Identity {
        user_id: Arc::from("u"),
    };
    let req =
        super::request::parse_chat_request(br#"{"message":"hi"}"#, &s.config().limits).unwrap();
    let prepare = super::plan::prepare(
        &s,
        &ctx,
        &identity,
        &req,
        crate::cache::CacheControl::default(),
        "t",
    );
    let prepare_size = std::mem::size_of_val(&prepare);
    drop(prepare);
    let start = super::start(
        s.clone(),
        ctx.clone(),
        identity,
        req,
        crate::cache::CacheControl::default(),
    );
    let model_req = request("m");
    let open = super::attempt::open(
        &s,
        &ctx,
        &model_req,
        deadlines(Duration::from_secs(1)),
        None,
        None,
        false,
        None,
        "t",
        "o",
    );
    let (start, open) = (std::mem::size_of_val(&start), std::mem::size_of_val(&open));
    assert!(
        start < 4 * 1024 && start < prepare_size,
        "the turn's future is {start} bytes (the pre-work alone {prepare_size})"
    );
    // The pre-work is moved into its box whole: the rare paths inside it
    // (the table's history read, the usage read, the limits without one
    // script) are boxed where they run, not carried by every request.
    assert!(
        prepare_size < 8 * 1024,
        "the pre-work's future is {prepare_size} bytes"
    );
    assert!(open < 8 * 1024, "the opening's future is {open} bytes");
    // Every streaming answer's next-frame future holds the release of its
    // tokens and slot (15,464 bytes before its rare path was boxed).
    let release = std::mem::size_of_val(&crate::limits::release(None, None, 0));
    assert!(
        release < 4 * 1024,
        "the release's future is {release} bytes"
    );
}
