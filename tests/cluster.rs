//! chat-stream against a three-node Redis cluster (`REDIS_CLUSTER=true`),
//! as ElastiCache Serverless and other cluster-mode Redis present
//! themselves: rate limits, circuit breakers, the cache and live streams
//! (resume) all work with their keys spread over the nodes (the client
//! follows MOVED; every multi-key operation stays in one slot, so no
//! CROSSSLOT).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use e2e::{
    ChatServer, RedisCluster, answer_text, body_stream, read_deltas, read_rest, read_sse, sim,
};
use model_sim::Sim;
use serde_json::json;

const LIMIT: Duration = Duration::from_secs(30);

async fn server(sim: &Sim, cluster: &RedisCluster) -> ChatServer {
    let (url, redis) = (sim.url(), cluster.url());
    ChatServer::start(&[
        ("ANTHROPIC_BASE_URL", url.as_str()),
        ("REDIS_URL", redis.as_str()),
        ("REDIS_CLUSTER", "true"),
        ("REDIS_TIMEOUT_MS", "1000"),
        ("RATE_LIMIT_RPM", "1000"),
        ("BREAKER_FAILURES", "1"),
        ("BREAKER_COOLDOWN_MS", "60000"),
        ("UPSTREAM_MAX_RETRIES", "0"),
    ])
    .await
}

#[tokio::test]
async fn limits_breakers_cache_and_resume_work_on_a_redis_cluster() {
    let cluster = RedisCluster::start().await;
    let sim = sim(20, 40.0, 40).await;
    let a = server(&sim, &cluster).await;
    let b = server(&sim, &cluster).await;

    // Cache: a repeat is a hit, and the limits are the fleet's.
    let mut hits = 0;
    for i in 0..6 {
        let body = json!({"message": format!("cluster question {}", i / 2), "temperature": 0, "max_tokens": 64, "model": "claude-sim"});
        let r = a.post_chat(Some("cleo"), &body).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-ratelimit-scope"], "fleet");
        if r.headers()["x-cache"] == "hit" {
            hits += 1;
        }
        let (events, err) = read_sse(r, LIMIT).await;
        assert_eq!(err, None);
        assert_eq!(events.last().unwrap().event, "done");
    }
    assert_eq!(hits, 3, "every second ask is a hit");

    // Resume: cut after three deltas, the rest from the live stream.
    let r = a
        .post_chat(
            Some("cleo"),
            &json!({"message": "a long one", "max_tokens": 64, "model": "claude-sim"}),
        )
        .await;
    let mut stream = body_stream(r);
    let (before, last_id) = read_deltas(&mut stream, 3).await;
    drop(stream);
    let id = before[0].data["stream_id"].as_str().unwrap().to_owned();
    let resumed = reqwest::Client::new()
        .get(b.url(&format!("/chat/streams/{id}")))
        .header("x-dev-user", "cleo")
        .header("last-event-id", last_id.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resumed.status(), 200);
    let (after, err) = read_sse(resumed, LIMIT).await;
    assert_eq!(err, None);
    assert_eq!(after.last().unwrap().event, "done");
    assert!(!answer_text(&after).is_empty());

    // Breaker: one failure on instance a opens the circuit for b too.
    let failing = json!({"message": "x", "model": "claude-sim+fault=status:503"});
    assert_eq!(a.post_chat(Some("cleo"), &failing).await.status(), 503);
    let r = b.post_chat(Some("cleo"), &failing).await;
    assert_eq!(r.status(), 503);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["code"], "upstream_circuit_open", "{v}");

    // The keys really are spread over the nodes.
    let spread = cluster.keys_per_node();
    assert!(spread.iter().filter(|n| **n > 0).count() >= 2, "{spread:?}");
}

/// A stop sent to another instance reaches the answer through the cluster:
/// the streaming instance reads the stop keys of all its answers each
/// interval, one command per key (they are on different slots), and ends
/// only the answer that was stopped.
#[tokio::test]
async fn a_stop_through_the_cluster_ends_that_answer_only() {
    let cluster = RedisCluster::start().await;
    // 400 tokens at 20 a second: each answer streams for 20 s.
    let sim = sim(5, 20.0, 400).await;
    let a = server(&sim, &cluster).await;
    let b = server(&sim, &cluster).await;
    let mut answers = Vec::new();
    for i in 0..4 {
        let r = a
            .post_chat(
                Some("stella"),
                &json!({"message": format!("a long story {i}"), "model": "claude-sim", "max_tokens": 400}),
            )
            .await;
        assert_eq!(r.status(), 200);
        let id = r.headers()["x-stream-id"].to_str().unwrap().to_owned();
        let mut s = body_stream(r);
        read_deltas(&mut s, 2).await;
        answers.push((id, s));
    }
    let (stopped_id, stopped) = answers.remove(2);
    let r = reqwest::Client::new()
        .delete(b.url(&format!("/chat/streams/{stopped_id}")))
        .header("x-dev-user", "stella")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let (text, _) = read_rest(stopped, Duration::from_secs(10)).await;
    assert!(
        text.contains(r#""stop_reason":"stopped""#),
        "not stopped: {text}"
    );
    // The others are still streaming a second later.
    for (id, s) in answers {
        let (more, _) = read_rest(s, Duration::from_secs(1)).await;
        assert!(
            more.contains("event: delta") && !more.contains("event: done"),
            "answer {id} ended or stalled: {more}"
        );
    }
}
