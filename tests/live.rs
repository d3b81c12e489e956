//! Live answer streams through chat-stream, against a real Redis and
//! model-sim: identical in-flight requests share one model call, a client
//! cut off mid-answer resumes with `Last-Event-ID`, and an answer whose
//! client left is finished for it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use e2e::{
    ChatServer, RedisServer, answer_text, body_stream, direct_answer, kinds, read_deltas, read_sse,
    sim,
};
use model_sim::Sim;
use serde_json::{Value, json};

const LIMIT: Duration = Duration::from_secs(30);
const MODEL: &str = "claude-sim";

async fn server(sim: &Sim, redis_url: &str, extra: &[(&str, &str)]) -> ChatServer {
    let url = sim.url();
    let mut env = vec![
        ("ANTHROPIC_BASE_URL", url.as_str()),
        ("REDIS_URL", redis_url),
        ("REDIS_TIMEOUT_MS", "1000"),
        ("DEFAULT_MODEL", MODEL),
        // 50 callers from one user in a second.
        ("RATE_LIMIT_RPM", "0"),
        ("MAX_STREAMS_PER_USER", "0"),
    ];
    env.extend_from_slice(extra);
    ChatServer::start(&env).await
}

fn q(message: &str) -> Value {
    json!({"message": message, "temperature": 0, "max_tokens": 64, "model": MODEL})
}

#[tokio::test]
async fn fifty_identical_requests_make_one_model_call_and_fifty_full_answers() {
    let redis = RedisServer::start().await;
    // About a second of generation: the other 49 arrive while it runs.
    let sim = sim(100, 40.0, 40).await;
    let server = server(&sim, &redis.url(), &[]).await;
    let body = q("what does a stampede cost?");
    let asks = (0..50).map(|_| async {
        let resp = server.post_chat(Some("herd"), &body).await;
        assert_eq!(resp.status(), 200);
        let x_cache = resp.headers()["x-cache"].to_str().unwrap().to_owned();
        let (events, err) = read_sse(resp, LIMIT).await;
        assert_eq!(err, None);
        (x_cache, events)
    });
    let answers = futures_util::future::join_all(asks).await;
    assert_eq!(
        sim.calls(),
        1,
        "one upstream call for 50 identical requests"
    );
    let expected = direct_answer(&sim, MODEL, None, "what does a stampede cost?", 64).await;
    let mut turn_ids = std::collections::HashSet::new();
    let mut followers = 0;
    for (x_cache, events) in &answers {
        assert_eq!(kinds(events).last(), Some(&"done"), "{x_cache}: {events:?}");
        assert_eq!(answer_text(events), expected);
        let meta = &events[0].data;
        assert_eq!(meta["cache"], x_cache.as_str());
        assert!(turn_ids.insert(meta["turn_id"].as_str().unwrap().to_owned()));
        followers += usize::from(x_cache == "follow");
        if x_cache == "follow" {
            let done = &events.last().unwrap().data;
            assert_eq!(
                done["usage"]["output_tokens"], 0,
                "a follower pays no tokens"
            );
        }
    }
    // Each got its own turn; the first is the leader (or a later one a
    // cache hit, if it arrived after the answer was stored).
    assert!(
        followers >= 1,
        "nobody followed: {:?}",
        answers.iter().map(|a| &a.0).collect::<Vec<_>>()
    );
    assert_eq!(
        answers.iter().filter(|(x, _)| x == "miss").count(),
        1,
        "exactly one leader"
    );
}

#[tokio::test]
async fn a_client_cut_off_mid_answer_resumes_with_last_event_id() {
    let redis = RedisServer::start().await;
    // 60 tokens at 30/s: two seconds; the cut comes early.
    let sim = sim(20, 30.0, 60).await;
    let server = server(&sim, &redis.url(), &[]).await;
    let body = json!({"message": "a long story", "max_tokens": 64, "model": MODEL});
    let resp = server.post_chat(Some("rue"), &body).await;
    assert_eq!(resp.status(), 200);
    let mut stream = body_stream(resp);
    let (before, last_id) = read_deltas(&mut stream, 3).await;
    drop(stream); // the connection breaks
    let stream_id = before[0].data["stream_id"].as_str().unwrap().to_owned();
    assert_eq!(before[0].data["turn_id"].as_str().unwrap(), stream_id);

    // Someone else cannot read it; bad ids are 4xx JSON.
    let other = reqwest::Client::new()
        .get(server.url(&format!("/chat/streams/{stream_id}")))
        .header("x-dev-user", "mallory")
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 404);
    let bad = reqwest::Client::new()
        .get(server.url(&format!("/chat/streams/{stream_id}")))
        .header("x-dev-user", "rue")
        .header("last-event-id", "three")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let v: Value = bad.json().await.unwrap();
    assert_eq!(v["code"], "invalid_last_event_id");

    let resumed = reqwest::Client::new()
        .get(server.url(&format!("/chat/streams/{stream_id}")))
        .header("x-dev-user", "rue")
        .header("last-event-id", last_id.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resumed.status(), 200);
    let (after, err) = read_sse(resumed, LIMIT).await;
    assert_eq!(err, None);
    assert_eq!(kinds(&after).last(), Some(&"done"));
    assert_eq!(
        after[0].id.as_deref(),
        Some((last_id + 1).to_string().as_str()),
        "the rest starts right after"
    );
    assert_eq!(sim.calls(), 1, "a resume makes no model call");
    let full = format!("{}{}", answer_text(&before), answer_text(&after));
    assert_eq!(
        full,
        direct_answer(&sim, MODEL, None, "a long story", 64).await
    );
    assert_eq!(
        sim.cancelled(),
        0,
        "the answer was finished for the client that left"
    );

    // From the start (no Last-Event-ID): the whole answer again.
    let again = reqwest::Client::new()
        .get(server.url(&format!("/chat/streams/{stream_id}")))
        .header("x-dev-user", "rue")
        .send()
        .await
        .unwrap();
    let (all, _) = read_sse(again, LIMIT).await;
    assert_eq!(kinds(&all)[0], "meta");
    assert_eq!(answer_text(&all), full);

    // Unknown stream: 404.
    let unknown = reqwest::Client::new()
        .get(server.url("/chat/streams/0123456789abcdef"))
        .header("x-dev-user", "rue")
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
}

#[tokio::test]
async fn a_cacheable_answer_whose_client_left_is_finished_and_cached() {
    let redis = RedisServer::start().await;
    let sim = sim(20, 40.0, 40).await;
    let server = server(&sim, &redis.url(), &[]).await;
    let body = q("finish it anyway");
    let resp = server.post_chat(Some("sid"), &body).await;
    let mut stream = body_stream(resp);
    read_deltas(&mut stream, 2).await;
    drop(stream);
    // The answer runs to its end without the client, then is cached.
    let deadline = std::time::Instant::now() + LIMIT;
    while sim.completed() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the answer was not finished"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut x_cache = String::new();
    let mut text = String::new();
    for _ in 0..50 {
        let resp = server.post_chat(Some("sid"), &body).await;
        x_cache = resp.headers()["x-cache"].to_str().unwrap().to_owned();
        let (events, _) = read_sse(resp, LIMIT).await;
        if x_cache == "hit" {
            text = answer_text(&events);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(x_cache, "hit");
    assert_eq!(sim.calls(), 1);
    assert_eq!(
        text,
        direct_answer(&sim, MODEL, None, "finish it anyway", 64).await
    );
}

#[tokio::test]
async fn with_finish_on_disconnect_off_a_client_that_leaves_stops_the_model() {
    let redis = RedisServer::start().await;
    let sim = sim(0, 5.0, 100).await;
    let server = server(&sim, &redis.url(), &[("FINISH_ON_DISCONNECT", "false")]).await;
    let resp = server
        .post_chat(Some("tom"), &json!({"message": "long", "model": MODEL}))
        .await;
    let mut stream = body_stream(resp);
    read_deltas(&mut stream, 1).await;
    drop(stream);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while sim.cancelled() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the model kept generating"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(sim.completed(), 0);
}

#[tokio::test]
async fn followers_of_a_leader_that_fails_before_its_answer_get_the_same_error() {
    let redis = RedisServer::start().await;
    let sim = sim(0, 1000.0, 10).await;
    // The model stalls before its first token; chat-stream gives up first,
    // late enough that the others surely arrive while it waits.
    let server = server(
        &sim,
        &redis.url(),
        &[
            ("UPSTREAM_FIRST_TOKEN_TIMEOUT_MS", "2000"),
            ("UPSTREAM_MAX_RETRIES", "0"),
        ],
    )
    .await;
    let mut body = q("a question the model will not answer");
    body["model"] = json!("claude-sim+fault=stall-first:5000");
    let asks = (0..5).map(|i| {
        let body = body.clone();
        let server = &server;
        async move {
            // The leader first; the rest while it waits.
            tokio::time::sleep(Duration::from_millis(if i == 0 { 0 } else { 150 })).await;
            let resp = server.post_chat(Some("uma"), &body).await;
            let status = resp.status().as_u16();
            let x_cache = resp
                .headers()
                .get("x-cache")
                .map(|v| v.to_str().unwrap().to_owned());
            let v: Value = resp.json().await.unwrap();
            (status, x_cache, v["code"].as_str().unwrap().to_owned())
        }
    });
    let results = futures_util::future::join_all(asks).await;
    assert_eq!(sim.calls(), 1, "{results:?}");
    for (status, _, code) in &results {
        assert_eq!(
            (*status, code.as_str()),
            (504, "upstream_timeout"),
            "{results:?}"
        );
    }
    let followers = results
        .iter()
        .filter(|(_, x, _)| x.as_deref() == Some("follow"))
        .count();
    assert_eq!(followers, 4, "{results:?}");
}

/// CPU seconds this test process has used (user + system).
fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let f: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    // /proc reports in USER_HZ, which Linux fixes at 100.
    ticks / 100.0
}

#[tokio::test]
async fn a_long_answer_with_live_streams_on_costs_little_cpu() {
    // A regression test: the tee task once spun on its renewal timer for
    // answers without a coalescing lease. 60 tokens at 20/s: three seconds
    // of mostly waiting for the model.
    let redis = RedisServer::start().await;
    let sim = sim(0, 20.0, 60).await;
    let server = server(&sim, &redis.url(), &[]).await;
    let before = cpu_secs();
    let resp = server
        .post_chat(
            Some("ivy"),
            &json!({"message": "slow and long", "model": MODEL}),
        )
        .await;
    let (events, err) = read_sse(resp, LIMIT).await;
    assert_eq!(err, None);
    assert_eq!(kinds(&events).last(), Some(&"done"));
    assert!(
        events[0].data["stream_id"].is_string(),
        "live streams are on"
    );
    let used = cpu_secs() - before;
    // Client, server, model-sim and Redis client all in this process; a
    // spinning task alone would use about 3 s.
    assert!(used < 1.5, "{used} CPU seconds for a 3 s answer");
}

/// Writes a live stream by hand, as a tee whose middle batch was lost:
/// ids 1, 2, then 4 and 5.
async fn stream_with_a_gap(redis: &RedisServer, turn: &str, owner: &str) {
    let client = redis::Client::open(redis.url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let key = format!("live:{{{turn}}}");
    for (i, e, d) in [
        (
            1,
            "meta",
            json!({"model": MODEL, "conversation_id": "c", "turn_id": turn}).to_string(),
        ),
        (2, "delta", json!({"text": "Hello"}).to_string()),
        (4, "delta", json!({"text": " after the hole"}).to_string()),
        (5, "done", json!({"stop_reason": "end_turn"}).to_string()),
    ] {
        let _: String = redis::cmd("XADD")
            .arg(&key)
            .arg("*")
            .arg("i")
            .arg(i)
            .arg("e")
            .arg(e)
            .arg("d")
            .arg(d)
            .query_async(&mut c)
            .await
            .unwrap();
    }
    let _: () = redis::cmd("SET")
        .arg(format!("live:{{{turn}}}:owner"))
        .arg(owner)
        .arg("EX")
        .arg(60)
        .query_async(&mut c)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_resume_through_a_gap_ends_with_stream_lost_not_spliced_text() {
    let redis = RedisServer::start().await;
    let sim = sim(0, 0.0, 8).await;
    let server = server(&sim, &redis.url(), &[]).await;
    let turn = "0123456789abcdef0123456789abcdef";
    stream_with_a_gap(&redis, turn, "user:gia").await;
    let resp = reqwest::Client::new()
        .get(server.url(&format!("/chat/streams/{turn}")))
        .header("x-dev-user", "gia")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let (events, _) = read_sse(resp, LIMIT).await;
    assert_eq!(kinds(&events), ["meta", "delta", "error"]);
    assert_eq!(events[2].data["code"], "stream_lost");
    assert!(!answer_text(&events).contains("after the hole"));
}

#[tokio::test]
async fn a_follower_that_meets_a_gap_ends_with_stream_lost_and_caches_nothing() {
    let redis = RedisServer::start().await;
    let sim = sim(0, 0.0, 8).await;
    let server = server(&sim, &redis.url(), &[("COALESCE_LEASE_MS", "3000")]).await;
    // A leader (another instance) holds the question's lease and streams
    // into a stream with a hole.
    let key = chat_core::cache::cache_key(&chat_core::cache::KeyInput {
        scope: "user:gus",
        provider: "anthropic",
        model: MODEL,
        system: None,
        messages: &[chat_core::provider::Message {
            role: chat_core::provider::Role::User,
            content: "gap question".into(),
        }],
        max_tokens: 64,
        temperature: Some(0.0),
        stop: &[],
    });
    let leader = "fedcba9876543210fedcba9876543210";
    stream_with_a_gap(&redis, leader, "user:gus").await;
    let client = redis::Client::open(redis.url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("SET")
        .arg(format!("lead:{{{key}}}"))
        .arg(leader)
        .arg("PX")
        .arg(3000)
        .query_async(&mut c)
        .await
        .unwrap();
    let calls = sim.calls();
    let resp = server.post_chat(Some("gus"), &q("gap question")).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-cache"], "follow");
    let (events, _) = read_sse(resp, LIMIT).await;
    assert_eq!(kinds(&events), ["meta", "delta", "error"], "{events:?}");
    assert_eq!(events[2].data["code"], "stream_lost");
    assert_eq!(sim.calls(), calls, "nothing spliced from a model call");
    // Not cached: once the lease is gone, the same question calls the model.
    let _: () = redis::cmd("DEL")
        .arg(format!("lead:{{{key}}}"))
        .query_async(&mut c)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let again = server.post_chat(Some("gus"), &q("gap question")).await;
    assert_eq!(again.headers()["x-cache"], "miss");
}

#[tokio::test]
async fn a_long_answer_stays_resumable_while_it_streams() {
    let redis = RedisServer::start().await;
    // 90 tokens at 30/s: three seconds of answer.
    let sim = sim(0, 30.0, 90).await;
    let server = server(&sim, &redis.url(), &[("RESUME_RETENTION_SECS", "10")]).await;
    let resp = server
        .post_chat(
            Some("lia"),
            &json!({"message": "long", "max_tokens": 128, "model": MODEL}),
        )
        .await;
    let mut stream = body_stream(resp);
    let (first, _) = read_deltas(&mut stream, 1).await;
    let turn = first[0].data["stream_id"].as_str().unwrap().to_owned();
    // Most of the answer later, the owner key must have been refreshed
    // with the stream: its TTL is close to the full retention, as the
    // stream's is.
    let _ = read_deltas(&mut stream, 75).await;
    let client = redis::Client::open(redis.url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let owner_ttl: i64 = redis::cmd("TTL")
        .arg(format!("live:{{{turn}}}:owner"))
        .query_async(&mut c)
        .await
        .unwrap();
    let stream_ttl: i64 = redis::cmd("TTL")
        .arg(format!("live:{{{turn}}}"))
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(
        owner_ttl >= 9,
        "owner TTL {owner_ttl}, stream TTL {stream_ttl}"
    );
    assert!(
        owner_ttl >= stream_ttl - 1,
        "owner TTL {owner_ttl}, stream TTL {stream_ttl}"
    );
}
