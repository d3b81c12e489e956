//! The cache-warmer against a real Redis and model-sim: chat-stream counts
//! how often each question is asked; a warmer run refreshes the most asked
//! entries that are missing, most asked first, within its budget, and
//! skips a model whose circuit is open.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::time::Duration;

use chat_core::cache::warmer::{Outcome, WarmBudget, warm};
use chat_core::cache::{KeyInput, cache_key};
use chat_core::provider::{Message, Role};
use e2e::{ChatServer, RedisServer, sim};
use model_sim::Sim;
use serde_json::json;

const MODEL: &str = "claude-sim";

fn env(sim: &Sim, redis: &RedisServer) -> Vec<(String, String)> {
    vec![
        ("ANTHROPIC_BASE_URL".into(), sim.url()),
        ("ANTHROPIC_API_KEY".into(), "test-key".into()),
        ("REDIS_URL".into(), redis.url()),
        ("REDIS_TIMEOUT_MS".into(), "1000".into()),
        ("DEFAULT_MODEL".into(), MODEL.into()),
        ("MODEL_ALLOWLIST".into(), "*".into()),
        ("AUTH_MODE".into(), "dev".into()),
        ("LOG_LEVEL".into(), "warn".into()),
        ("BREAKER_FAILURES".into(), "2".into()),
        // The tests expire the shared entries early (`expire_all`), which
        // an instance's copies would not notice: every hit is read from Redis.
        ("CACHE_LOCAL_MB".into(), "0".into()),
    ]
}

/// The warmer's own process state, from the same settings as chat-stream
/// (it reads only what it uses).
async fn warmer_state(env: &[(String, String)]) -> chat_core::cache::warmer::Warmer {
    let map: HashMap<String, String> = env.iter().cloned().collect();
    let config = chat_core::config::WarmerConfig::from_source(&map).unwrap();
    chat_core::build_warmer(&config).await.unwrap()
}

fn key_of(user: &str, question: &str) -> String {
    let messages = [Message {
        role: Role::User,
        content: question.into(),
    }];
    cache_key(&KeyInput {
        scope: &format!("user:{user}"),
        provider: "anthropic",
        model: MODEL,
        system: None,
        messages: &messages,
        max_tokens: 64,
        temperature: Some(0.0),
        stop: &[],
    })
}

async fn ask(server: &ChatServer, question: &str) -> String {
    let resp = reqwest::Client::new()
        .post(server.url("/chat"))
        .header("x-dev-user", "wes")
        .json(&json!({"message": question, "temperature": 0, "max_tokens": 64}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let x = resp.headers()["x-cache"].to_str().unwrap().to_owned();
    let (_, err) = e2e::read_sse(resp, Duration::from_secs(20)).await;
    assert_eq!(err, None);
    x
}

/// Drops every cached answer (the popularity counts stay).
async fn expire_all(redis: &RedisServer) {
    let client = redis::Client::open(redis.url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("cache:*")
        .query_async(&mut c)
        .await
        .unwrap();
    for k in keys {
        let _: () = redis::cmd("DEL").arg(k).query_async(&mut c).await.unwrap();
    }
}

fn budget(max_calls: u32, max_tokens: u64) -> WarmBudget {
    WarmBudget {
        top: 10,
        max_calls,
        max_tokens,
        concurrency: 2,
        time_limit: Duration::from_secs(30),
        refresh_ahead: Duration::from_secs(60),
    }
}

#[tokio::test]
async fn the_warmer_refreshes_the_most_asked_first_within_its_budget() {
    let redis = RedisServer::start().await;
    let sim = sim(5, 2000.0, 10).await;
    let env = env(&sim, &redis);
    let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let server = ChatServer::start(&pairs).await;
    // Asked 3, 2 and 1 times (hits count as asks too).
    for (q, n) in [("popular", 3), ("middling", 2), ("rare", 1)] {
        for _ in 0..n {
            ask(&server, q).await;
        }
    }
    // The counts are written after each answer; let the last one land.
    tokio::time::sleep(Duration::from_millis(200)).await;
    expire_all(&redis).await;
    let state = warmer_state(&env).await;

    // Two calls allowed: the two most asked are refreshed, in that order.
    let calls = sim.calls();
    let report = warm(&state, &budget(2, 1_000_000)).await.unwrap();
    let order: Vec<(String, Outcome)> = report
        .entries
        .iter()
        .map(|e| (e.key.clone(), e.outcome))
        .collect();
    assert_eq!(
        order,
        vec![
            (key_of("wes", "popular"), Outcome::Refreshed),
            (key_of("wes", "middling"), Outcome::Refreshed),
            (key_of("wes", "rare"), Outcome::SkippedBudget),
        ]
    );
    assert!(report.entries[0].weight > report.entries[1].weight);
    assert_eq!(
        (report.refreshed, report.skipped_budget, report.model_calls),
        (2, 1, 2)
    );
    assert_eq!(sim.calls(), calls + 2);
    assert!(report.output_tokens > 0);
    // chat-stream now answers them from the cache; the skipped one misses.
    assert_eq!(ask(&server, "popular").await, "hit");
    assert_eq!(ask(&server, "middling").await, "hit");
    assert_eq!(ask(&server, "rare").await, "miss");

    // Everything is fresh now: a run calls nothing.
    let calls = sim.calls();
    let again = warm(&state, &budget(10, 1_000_000)).await.unwrap();
    assert_eq!((again.fresh, again.refreshed, again.model_calls), (3, 0, 0));
    assert_eq!(sim.calls(), calls);

    // A token budget smaller than one question's reserve calls nothing.
    expire_all(&redis).await;
    let poor = warm(&state, &budget(10, 20)).await.unwrap();
    assert_eq!((poor.skipped_budget, poor.model_calls), (3, 0));
    assert_eq!(sim.calls(), calls);
}

#[tokio::test]
async fn the_warmer_skips_a_model_whose_circuit_is_open() {
    let redis = RedisServer::start().await;
    let sim = sim(5, 2000.0, 10).await;
    let env = env(&sim, &redis);
    let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let server = ChatServer::start(&pairs).await;
    ask(&server, "breaker question").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    expire_all(&redis).await;
    let state = warmer_state(&env).await;
    // Two failures open the breaker (BREAKER_FAILURES=2), shared through
    // Redis as in production.
    for _ in 0..2 {
        state
            .circuits
            .record_failure(&format!("anthropic:{MODEL}"))
            .await;
    }
    let calls = sim.calls();
    let report = warm(&state, &budget(10, 1_000_000)).await.unwrap();
    assert_eq!((report.skipped_circuit_open, report.model_calls), (1, 0));
    assert_eq!(sim.calls(), calls);
}

#[tokio::test]
async fn the_warmer_stops_at_its_time_limit() {
    let redis = RedisServer::start().await;
    let env = {
        let fast = sim(5, 2000.0, 10).await;
        let env = env(&fast, &redis);
        let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let server = ChatServer::start(&pairs).await;
        ask(&server, "slow to refresh").await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        env
    };
    expire_all(&redis).await;
    // The warmer's model now takes 10 s per answer (50 tokens at 5/s).
    let slow = sim(0, 5.0, 50).await;
    let mut env = env;
    for (k, v) in env.iter_mut() {
        if k == "ANTHROPIC_BASE_URL" {
            *v = slow.url();
        }
    }
    let state = warmer_state(&env).await;
    let b = WarmBudget {
        time_limit: Duration::from_secs(1),
        ..budget(10, 1_000_000)
    };
    let report = warm(&state, &b).await.unwrap();
    assert_eq!(report.failed, 1, "{report:?}");
    assert_eq!(report.entries[0].error, Some("time_limit"));
    assert!(report.elapsed_ms < 5_000, "{}", report.elapsed_ms);
}
