//! Rate limits and circuit breakers shared by several chat-stream
//! instances through Redis, and the per-instance fallback when Redis dies.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use e2e::{ChatServer, RedisServer, read_sse, sim};
use model_sim::Sim;
use serde_json::{Value, json};

const LIMIT: Duration = Duration::from_secs(20);

async fn instance(sim: &Sim, redis: &str, extra: &[(&str, &str)]) -> ChatServer {
    let url = sim.url();
    let mut env = vec![
        ("ANTHROPIC_BASE_URL", url.as_str()),
        ("REDIS_URL", redis),
        ("UPSTREAM_PREWARM", "false"),
        ("UPSTREAM_MAX_RETRIES", "0"),
    ];
    env.extend_from_slice(extra);
    ChatServer::start(&env).await
}

async fn chat(server: &ChatServer, model: &str) -> reqwest::Response {
    server
        .post_chat(None, &json!({"message": "hello", "model": model}))
        .await
}

fn header<'a>(r: &'a reqwest::Response, name: &str) -> &'a str {
    r.headers()
        .get(name)
        .map(|v| v.to_str().unwrap())
        .unwrap_or("")
}

#[tokio::test]
async fn two_instances_share_one_rate_limit() {
    let redis = RedisServer::start().await;
    let sim = sim(0, 0.0, 3).await;
    let url = redis.url();
    let a = instance(&sim, &url, &[("RATE_LIMIT_RPM", "4")]).await;
    let b = instance(&sim, &url, &[("RATE_LIMIT_RPM", "4")]).await;
    let mut remaining = Vec::new();
    for server in [&a, &b, &a, &b] {
        let r = chat(server, "m").await;
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "x-ratelimit-scope"), "fleet");
        assert_eq!(header(&r, "x-ratelimit-limit"), "4");
        remaining.push(header(&r, "x-ratelimit-remaining").to_owned());
        read_sse(r, LIMIT).await;
    }
    assert_eq!(
        remaining,
        ["3", "2", "1", "0"],
        "one count across both instances"
    );
    // The fifth request, on either instance, is refused before any model call.
    let r = chat(&b, "m").await;
    assert_eq!(r.status(), 429);
    assert!(header(&r, "retry-after").parse::<u64>().unwrap() >= 1);
    assert_eq!(header(&r, "x-ratelimit-remaining"), "0");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["code"], "rate_limited");
    assert_eq!(chat(&a, "m").await.status(), 429);
    assert_eq!(sim.calls(), 4);
}

#[tokio::test]
async fn tokens_per_minute_are_limited_too() {
    let redis = RedisServer::start().await;
    let sim = sim(0, 0.0, 20).await;
    let a = instance(&sim, &redis.url(), &[("RATE_LIMIT_TPM", "20")]).await;
    let r = chat(&a, "m").await;
    assert_eq!(r.status(), 200);
    let (events, _) = read_sse(r, LIMIT).await;
    assert_eq!(events.last().unwrap().data["usage"]["output_tokens"], 20);
    // That answer used over 20 tokens: the next request waits for the window.
    let r = chat(&a, "m").await;
    assert_eq!(r.status(), 429);
    assert!(
        r.json::<Value>().await.unwrap()["message"]
            .as_str()
            .unwrap()
            .contains("tokens")
    );
}

#[tokio::test]
async fn redis_down_means_a_local_limit_not_an_outage() {
    let mut redis = RedisServer::start().await;
    let sim = sim(0, 0.0, 3).await;
    let a = instance(
        &sim,
        &redis.url(),
        &[("RATE_LIMIT_RPM", "3"), ("REDIS_TIMEOUT_MS", "50")],
    )
    .await;
    let r = chat(&a, "m").await;
    assert_eq!(header(&r, "x-ratelimit-scope"), "fleet");
    read_sse(r, LIMIT).await;
    redis.stop();

    let t = Instant::now();
    for _ in 0..3 {
        let r = chat(&a, "m").await;
        assert_eq!(r.status(), 200, "chat goes on without Redis");
        assert_eq!(header(&r, "x-ratelimit-scope"), "local");
        read_sse(r, LIMIT).await;
    }
    // The local limiter holds the line: still no open door.
    let r = chat(&a, "m").await;
    assert_eq!(r.status(), 429);
    assert_eq!(header(&r, "x-ratelimit-scope"), "local");
    // A dead Redis costs at most a timeout now and then, not per request.
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "took {:?}",
        t.elapsed()
    );

    let health: Value = reqwest::get(a.url("/health"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["dependencies"]["redis"]["state"], "down");
    assert_eq!(health["status"], "degraded");
}

#[tokio::test]
async fn two_instances_share_one_breaker() {
    let redis = RedisServer::start().await;
    let sim = sim(0, 0.0, 3).await;
    let url = redis.url();
    let cfg = [("BREAKER_FAILURES", "2"), ("BREAKER_COOLDOWN_MS", "500")];
    let a = instance(&sim, &url, &cfg).await;
    let b = instance(&sim, &url, &cfg).await;
    // The model fails twice, then recovers.
    let model = "flaky+fault=status:500,times=2";
    assert_eq!(chat(&a, model).await.status(), 502);
    assert_eq!(chat(&b, model).await.status(), 502);
    // Two failures across the fleet opened the circuit for both.
    for server in [&a, &b] {
        let r = chat(server, model).await;
        assert_eq!(r.status(), 503);
        assert_eq!(
            r.json::<Value>().await.unwrap()["code"],
            "upstream_circuit_open"
        );
    }
    assert_eq!(sim.calls(), 2, "an open circuit calls nobody");

    // After the cooldown exactly one instance probes; its success closes
    // the circuit for everyone.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let r = chat(&b, model).await;
    assert_eq!(r.status(), 200);
    read_sse(r, LIMIT).await;
    let r = chat(&a, model).await;
    assert_eq!(r.status(), 200);
    read_sse(r, LIMIT).await;
    assert_eq!(sim.calls(), 4);
}

#[tokio::test]
async fn a_circuit_another_instance_opened_is_seen_within_a_tenth_of_a_second() {
    let redis = RedisServer::start().await;
    let sim = sim(0, 0.0, 3).await;
    let a = instance(&sim, &redis.url(), &[("BREAKER_COOLDOWN_MS", "60000")]).await;
    let r = chat(&a, "m").await;
    assert_eq!(r.status(), 200);
    read_sse(r, LIMIT).await;
    // Another instance opens the circuit (its keys as the breaker keeps them).
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    for flag in ["open", "tripped"] {
        let _: () = redis::cmd("SET")
            .arg(format!("cb:{{anthropic:m}}:{flag}"))
            .arg("1")
            .arg("PX")
            .arg(60_000)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    // a took the circuit as closed a moment ago; past that moment it asks
    // Redis again, finds it open, and calls nobody.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let r = chat(&a, "m").await;
    assert_eq!(r.status(), 503);
    assert_eq!(
        r.json::<Value>().await.unwrap()["code"],
        "upstream_circuit_open"
    );
    assert_eq!(sim.calls(), 1);
}
