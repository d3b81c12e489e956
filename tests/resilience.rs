//! Retries, fallback and the circuit breaker, against model-sim's faults.
//! All of it happens before the first byte reaches the client.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use e2e::{ChatServer, answer_text, read_sse, sim};
use model_sim::Sim;
use serde_json::{Value, json};

const LIMIT: Duration = Duration::from_secs(20);

async fn server(sim: &Sim, extra: &[(&str, &str)]) -> ChatServer {
    let url = sim.url();
    let mut env = vec![
        ("ANTHROPIC_BASE_URL", url.as_str()),
        ("UPSTREAM_RETRY_BASE_MS", "10"),
        ("UPSTREAM_PREWARM", "false"),
    ];
    env.extend_from_slice(extra);
    ChatServer::start(&env).await
}

async fn chat(server: &ChatServer, model: &str) -> reqwest::Response {
    server
        .post_chat(None, &json!({"message": "hello", "model": model}))
        .await
}

#[tokio::test]
async fn transient_failures_are_retried_and_the_answer_is_whole() {
    let sim = sim(0, 0.0, 6).await;
    let server = server(&sim, &[("UPSTREAM_MAX_RETRIES", "2")]).await;
    for fault in ["status:500", "status:529", "error-mid@0", "drop-mid@0"] {
        sim.state().reset_for_test();
        let model = format!("m+fault={fault},times=2");
        let resp = chat(&server, &model).await;
        assert_eq!(resp.status(), 200, "{fault}");
        let (events, _) = read_sse(resp, LIMIT).await;
        assert_eq!(events.last().unwrap().event, "done", "{fault}");
        assert_eq!(sim.calls(), 3, "{fault}: two failures, then the answer");
        // One clean answer: no text from the failed attempts.
        assert_eq!(
            answer_text(&events).split_whitespace().count(),
            6,
            "{fault}"
        );
    }
}

#[tokio::test]
async fn retry_after_is_honoured() {
    let sim = sim(0, 0.0, 6).await;
    let server = server(&sim, &[]).await;
    let t = Instant::now();
    let resp = chat(&server, "m+fault=status:429:1,times=1").await;
    assert_eq!(resp.status(), 200);
    assert!(
        t.elapsed() >= Duration::from_secs(1),
        "retried after {:?}",
        t.elapsed()
    );
    assert_eq!(sim.calls(), 2);
}

#[tokio::test]
async fn errors_that_a_retry_cannot_fix_are_not_retried() {
    let sim = sim(0, 0.0, 6).await;
    let server = server(&sim, &[("MODEL_FALLBACKS", "backup")]).await;
    for (fault, status) in [("status:400", 400), ("status:413", 413)] {
        sim.state().reset_for_test();
        let resp = chat(&server, &format!("m+fault={fault}")).await;
        assert_eq!(resp.status().as_u16(), status, "{fault}");
        assert_eq!(sim.calls(), 1, "{fault}: no retry, no fallback");
    }
}

#[tokio::test]
async fn retries_give_up_and_fall_back_to_the_next_model() {
    let sim = sim(0, 0.0, 6).await;
    let server = server(
        &sim,
        &[
            ("UPSTREAM_MAX_RETRIES", "1"),
            ("MODEL_FALLBACKS", "backup-model"),
        ],
    )
    .await;
    let resp = chat(&server, "primary+fault=status:529").await;
    assert_eq!(resp.status(), 200);
    let (events, _) = read_sse(resp, LIMIT).await;
    assert_eq!(
        events[0].data["model"], "backup-model",
        "meta.model names who answered"
    );
    assert_eq!(events.last().unwrap().event, "done");
    // primary twice (one retry), then the fallback once.
    assert_eq!(sim.calls(), 3);
    let models: Vec<String> = sim
        .requests()
        .iter()
        .map(|r| r["model"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        models,
        [
            "primary+fault=status:529",
            "primary+fault=status:529",
            "backup-model"
        ]
    );
}

#[tokio::test]
async fn a_slow_first_token_moves_to_the_fallback_before_any_byte() {
    let sim = sim(0, 0.0, 6).await;
    let server = server(
        &sim,
        &[
            ("UPSTREAM_FIRST_TOKEN_TIMEOUT_MS", "300"),
            ("MODEL_FALLBACKS", "fast-model"),
        ],
    )
    .await;
    let t = Instant::now();
    let resp = chat(&server, "slow+fault=stall-first:10000").await;
    assert_eq!(resp.status(), 200);
    let (events, _) = read_sse(resp, LIMIT).await;
    assert_eq!(events[0].data["model"], "fast-model");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    // The slow model is not asked twice: a retry would not make it faster.
    assert_eq!(sim.calls(), 2);
    // Without a fallback the client gets a 504, not a hang.
    let server = server_without_fallback(&sim).await;
    let resp = chat(&server, "slow+fault=stall-first:10000").await;
    assert_eq!(resp.status(), 504);
}

async fn server_without_fallback(sim: &Sim) -> ChatServer {
    server(sim, &[("UPSTREAM_FIRST_TOKEN_TIMEOUT_MS", "300")]).await
}

#[tokio::test]
async fn the_breaker_opens_rejects_without_calling_then_probes_and_closes() {
    let sim = sim(0, 0.0, 6).await;
    let server = server(
        &sim,
        &[
            ("UPSTREAM_MAX_RETRIES", "0"),
            ("BREAKER_FAILURES", "3"),
            ("BREAKER_COOLDOWN_MS", "400"),
        ],
    )
    .await;
    // The model fails its first three calls, then recovers.
    let model = "flaky+fault=status:500,times=3";
    for _ in 0..3 {
        assert_eq!(chat(&server, model).await.status(), 502);
    }
    assert_eq!(sim.calls(), 3);
    // Open: answered at once with 503, and the model is not called.
    let resp = chat(&server, model).await;
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().contains_key("retry-after"));
    assert_eq!(
        resp.json::<Value>().await.unwrap()["code"],
        "upstream_circuit_open"
    );
    assert_eq!(sim.calls(), 3);
    let health: Value = reqwest::get(server.url("/health"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["circuits"][format!("anthropic:{model}")], "open");

    // After the cooldown one probe goes through; it succeeds and closes.
    tokio::time::sleep(Duration::from_millis(450)).await;
    let resp = chat(&server, model).await;
    assert_eq!(resp.status(), 200);
    let (events, _) = read_sse(resp, LIMIT).await;
    assert_eq!(events.last().unwrap().event, "done");
    assert_eq!(sim.calls(), 4);
    let health: Value = reqwest::get(server.url("/health"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["circuits"][format!("anthropic:{model}")], "closed");
}

#[tokio::test]
async fn an_open_circuit_moves_to_the_fallback() {
    let sim = sim(0, 0.0, 6).await;
    let server = server(
        &sim,
        &[
            ("UPSTREAM_MAX_RETRIES", "0"),
            ("BREAKER_FAILURES", "1"),
            ("BREAKER_COOLDOWN_MS", "60000"),
            ("MODEL_FALLBACKS", "backup"),
        ],
    )
    .await;
    // First request: primary fails (circuit opens), backup answers.
    let resp = chat(&server, "primary+fault=status:500").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(sim.calls(), 2);
    // Second: the primary is skipped without a call.
    let resp = chat(&server, "primary+fault=status:500").await;
    let (events, _) = read_sse(resp, LIMIT).await;
    assert_eq!(events[0].data["model"], "backup");
    assert_eq!(sim.calls(), 3);
}
