//! The response cache through chat-stream, against model-sim and each
//! backend (a real Redis; DynamoDB in moto): hits cost no model call,
//! anything that changes the answer misses, only complete answers are
//! stored, Cache-Control is honoured, and a dead Redis never breaks chat.
//! The behavioural tests run once per backend.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use e2e::{ChatServer, LocalAws, RedisServer, answer_text, kinds, read_sse, sim};
use model_sim::Sim;
use serde_json::{Value, json};

const LIMIT: Duration = Duration::from_secs(20);

async fn server(sim: &Sim, redis_url: &str) -> ChatServer {
    let url = sim.url();
    ChatServer::start(&[
        ("ANTHROPIC_BASE_URL", url.as_str()),
        ("REDIS_URL", redis_url),
        // A loaded test machine can take longer than the 50 ms production
        // guard; a slow Redis would turn expected hits into misses.
        ("REDIS_TIMEOUT_MS", "1000"),
    ])
    .await
}

/// A cache backend of the test's own.
enum Backend {
    Redis(RedisServer),
    DynamoDb(LocalAws),
}

#[derive(Clone, Copy)]
enum Kind {
    Redis,
    DynamoDb,
}

impl Backend {
    async fn start(kind: Kind) -> Backend {
        match kind {
            Kind::Redis => Backend::Redis(RedisServer::start().await),
            Kind::DynamoDb => Backend::DynamoDb(LocalAws::create(&[]).await),
        }
    }

    async fn server(&self, sim: &Sim) -> ChatServer {
        match self {
            Backend::Redis(r) => server(sim, &r.url()).await,
            Backend::DynamoDb(aws) => {
                let url = sim.url();
                let env = aws.env();
                let mut pairs: Vec<(&str, &str)> =
                    env.iter().map(|(k, v)| (*k, v.as_str())).collect();
                pairs.extend([
                    ("ANTHROPIC_BASE_URL", url.as_str()),
                    ("CACHE_BACKEND", "dynamodb"),
                    // moto on a loaded machine is slower than DynamoDB.
                    ("CACHE_DYNAMODB_TIMEOUT_MS", "2000"),
                ]);
                ChatServer::start(&pairs).await
            }
        }
    }
}

struct Answer {
    x_cache: String,
    server_timing: String,
    meta_cache: String,
    text: String,
    kinds: Vec<String>,
}

async fn ask(server: &ChatServer, user: &str, body: Value, cache_control: Option<&str>) -> Answer {
    let mut req = reqwest::Client::new()
        .post(server.url("/chat"))
        .header("x-dev-user", user)
        .json(&body);
    if let Some(cc) = cache_control {
        req = req.header("cache-control", cc);
    }
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let x_cache = resp.headers()["x-cache"].to_str().unwrap().to_owned();
    let server_timing = resp.headers()["server-timing"].to_str().unwrap().to_owned();
    let (events, err) = read_sse(resp, LIMIT).await;
    assert_eq!(err, None);
    Answer {
        x_cache,
        server_timing,
        meta_cache: events[0].data["cache"].as_str().unwrap().to_owned(),
        text: answer_text(&events),
        kinds: kinds(&events).iter().map(|k| (*k).to_owned()).collect(),
    }
}

fn q(message: &str) -> Value {
    json!({"message": message, "temperature": 0, "max_tokens": 40})
}

#[tokio::test]
async fn a_repeated_question_is_a_hit_without_a_model_call_redis() {
    a_repeated_question_is_a_hit_without_a_model_call(Kind::Redis).await;
}

#[tokio::test]
async fn a_repeated_question_is_a_hit_without_a_model_call_dynamodb() {
    a_repeated_question_is_a_hit_without_a_model_call(Kind::DynamoDb).await;
}

async fn a_repeated_question_is_a_hit_without_a_model_call(kind: Kind) {
    let backend = Backend::start(kind).await;
    let sim = sim(5, 2000.0, 20).await;
    let server = backend.server(&sim).await;

    let first = ask(&server, "ann", q("what is a cache?"), None).await;
    assert_eq!(
        (first.x_cache.as_str(), first.meta_cache.as_str()),
        ("miss", "miss")
    );
    let calls = sim.calls();
    let second = ask(&server, "ann", q("what is a cache?"), None).await;
    assert_eq!(
        (second.x_cache.as_str(), second.meta_cache.as_str()),
        ("hit", "hit")
    );
    assert_eq!(sim.calls(), calls, "a hit makes no model call");
    assert_eq!(second.text, first.text);
    assert_eq!(second.kinds.last().map(String::as_str), Some("done"));

    // Anything that changes the answer misses: a parameter, the model, the
    // history, the user (per-user scope by default).
    let mut other = q("what is a cache?");
    other["max_tokens"] = json!(41);
    assert_eq!(ask(&server, "ann", other, None).await.x_cache, "miss");
    let mut model = q("what is a cache?");
    model["model"] = json!("claude-other");
    assert_eq!(ask(&server, "ann", model, None).await.x_cache, "miss");
    let mut with_history = q("what is a cache?");
    with_history["conversation_id"] = json!("not-a-real-one");
    // (an unknown conversation is a 404 before any cache work)
    let resp = reqwest::Client::new()
        .post(server.url("/chat"))
        .header("x-dev-user", "ann")
        .json(&with_history)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(
        ask(&server, "bob", q("what is a cache?"), None)
            .await
            .x_cache,
        "miss"
    );

    // Sampling requests are not cached unless configured.
    let sampled = json!({"message": "what is a cache?", "max_tokens": 40});
    assert_eq!(
        ask(&server, "ann", sampled.clone(), None).await.x_cache,
        "bypass"
    );
    assert_eq!(ask(&server, "ann", sampled, None).await.x_cache, "bypass");
}

#[tokio::test]
async fn an_interrupted_answer_is_not_cached_redis() {
    an_interrupted_answer_is_not_cached(Kind::Redis).await;
}

#[tokio::test]
async fn an_interrupted_answer_is_not_cached_dynamodb() {
    an_interrupted_answer_is_not_cached(Kind::DynamoDb).await;
}

async fn an_interrupted_answer_is_not_cached(kind: Kind) {
    let backend = Backend::start(kind).await;
    // Paced (5 ms a token), so the first text is read well before the
    // connection drops: at 2000 tokens/s the drop could arrive with the
    // first bytes, which is a failure before the answer (retried), not an
    // interruption.
    let sim = sim(5, 200.0, 20).await;
    let server = backend.server(&sim).await;
    let mut broken = q("tell me a story");
    broken["model"] = json!("claude-sim+fault=drop-mid@5,times=1");
    let first = ask(&server, "cat", broken.clone(), None).await;
    assert_eq!(first.kinds.last().map(String::as_str), Some("error"));
    let calls = sim.calls();
    let second = ask(&server, "cat", broken, None).await;
    assert_eq!(second.x_cache, "miss");
    assert_eq!(second.kinds.last().map(String::as_str), Some("done"));
    assert_eq!(sim.calls(), calls + 1);
}

#[tokio::test]
async fn cache_control_no_store_no_cache_and_max_age_redis() {
    cache_control_no_store_no_cache_and_max_age(Kind::Redis).await;
}

#[tokio::test]
async fn cache_control_no_store_no_cache_and_max_age_dynamodb() {
    cache_control_no_store_no_cache_and_max_age(Kind::DynamoDb).await;
}

async fn cache_control_no_store_no_cache_and_max_age(kind: Kind) {
    let backend = Backend::start(kind).await;
    let sim = sim(5, 2000.0, 10).await;
    let server = backend.server(&sim).await;

    // no-store: neither looked up nor stored.
    let a = ask(&server, "dee", q("no store"), Some("no-store")).await;
    assert_eq!(a.x_cache, "bypass");
    assert_eq!(
        ask(&server, "dee", q("no store"), None).await.x_cache,
        "miss"
    );
    // Now it is stored; no-cache skips the lookup but stores again.
    assert_eq!(
        ask(&server, "dee", q("no store"), None).await.x_cache,
        "hit"
    );
    let calls = sim.calls();
    assert_eq!(
        ask(&server, "dee", q("no store"), Some("no-cache"))
            .await
            .x_cache,
        "bypass"
    );
    assert_eq!(sim.calls(), calls + 1);
    // max-age: only entries younger than N seconds.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        ask(&server, "dee", q("no store"), Some("max-age=1"))
            .await
            .x_cache,
        "miss"
    );
    assert_eq!(
        ask(&server, "dee", q("no store"), Some("max-age=60"))
            .await
            .x_cache,
        "hit"
    );
}

#[tokio::test]
async fn with_redis_down_chat_still_answers_and_the_cache_recovers() {
    let mut redis = RedisServer::start().await;
    let sim = sim(5, 2000.0, 10).await;
    let url = sim.url();
    let redis_url = redis.url();
    // The shared cache alone: the instance's copies would answer the
    // repeated questions below without asking Redis.
    let server = ChatServer::start(&[
        ("ANTHROPIC_BASE_URL", url.as_str()),
        ("REDIS_URL", redis_url.as_str()),
        ("REDIS_TIMEOUT_MS", "1000"),
        ("CACHE_LOCAL_MB", "0"),
    ])
    .await;
    assert_eq!(ask(&server, "eve", q("hello"), None).await.x_cache, "miss");
    assert_eq!(ask(&server, "eve", q("hello"), None).await.x_cache, "hit");
    redis.stop();
    for _ in 0..3 {
        let a = ask(&server, "eve", q("hello"), None).await;
        assert_eq!(a.x_cache, "miss");
        assert_eq!(a.kinds.last().map(String::as_str), Some("done"));
    }
    // Redis comes back (empty): after the skip window the cache works again
    // without a restart of chat-stream.
    redis.restart().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        ask(&server, "eve", q("hello again"), None).await;
        if ask(&server, "eve", q("hello again"), None).await.x_cache == "hit" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the cache did not recover"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Deletes every cached answer from `redis` (the shared cache).
async fn forget_shared(redis: &RedisServer) {
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("cache:*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(!keys.is_empty(), "no cached answer in redis");
    let _: () = redis::cmd("DEL")
        .arg(&keys)
        .query_async(&mut conn)
        .await
        .unwrap();
}

/// A question this instance answered or read before is answered from its
/// own copy: it is a hit with the shared entry gone, the rate limit still
/// counts it, it takes no stream slot, and the copy is served only for
/// `CACHE_LOCAL_TTL_SECS`.
#[tokio::test]
async fn a_repeated_question_is_answered_from_the_instances_copy() {
    let redis = RedisServer::start().await;
    let sim = sim(5, 2000.0, 20).await;
    let url = sim.url();
    let redis_url = redis.url();
    let server = ChatServer::start(&[
        ("ANTHROPIC_BASE_URL", url.as_str()),
        ("REDIS_URL", redis_url.as_str()),
        ("REDIS_TIMEOUT_MS", "1000"),
        ("CACHE_LOCAL_TTL_SECS", "2"),
        ("RATE_LIMIT_RPM", "8"),
        ("MAX_STREAMS_PER_USER", "1"),
    ])
    .await;

    // 1, 2: the answer, then a hit from the copy the miss left.
    let first = ask(&server, "fay", q("local copy"), None).await;
    assert_eq!(first.x_cache, "miss");
    let calls = sim.calls();
    let second = ask(&server, "fay", q("local copy"), None).await;
    assert_eq!(second.x_cache, "hit");
    assert!(
        second.server_timing.contains("cache;desc=local"),
        "{}",
        second.server_timing
    );
    assert_eq!(second.text, first.text);
    // 3: the shared entry gone, the copy still answers, with no model call.
    forget_shared(&redis).await;
    let third = ask(&server, "fay", q("local copy"), None).await;
    assert_eq!(
        (third.x_cache.as_str(), third.meta_cache.as_str()),
        ("hit", "hit")
    );
    assert_eq!(third.text, first.text);
    assert_eq!(third.kinds.last().map(String::as_str), Some("done"));
    assert_eq!(sim.calls(), calls);

    // 4: an answer streaming holds the user's one slot...
    let slow = {
        let url = server.url("/chat");
        tokio::spawn(async move {
            let resp = reqwest::Client::new()
                .post(url)
                .header("x-dev-user", "fay")
                .json(
                    &json!({"message": "slow", "model": "claude-sim+ttft=1500", "temperature": 0}),
                )
                .send()
                .await
                .unwrap();
            read_sse(resp, LIMIT).await
        })
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    // 5: ... so a question that needs the model is refused,
    let busy = server.post_chat(Some("fay"), &q("another question")).await;
    assert_eq!(busy.status(), 429);
    assert_eq!(
        busy.json::<Value>().await.unwrap()["code"],
        "too_many_streams"
    );
    // 6: but the copy, which is over as it starts, is answered.
    let during = ask(&server, "fay", q("local copy"), None).await;
    assert_eq!(during.x_cache, "hit");
    let (events, err) = slow.await.unwrap();
    assert_eq!(err, None);
    assert_eq!(kinds(&events).last().copied(), Some("done"));

    // 7: past CACHE_LOCAL_TTL_SECS the copy is not served, and the shared
    // entry is gone: a miss, and the model is called.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let calls = sim.calls();
    assert_eq!(
        ask(&server, "fay", q("local copy"), None).await.x_cache,
        "miss"
    );
    assert_eq!(sim.calls(), calls + 1);
    // 8, 9: the rate limit (8 a minute) counts hits from the copy, then
    // refuses them.
    assert_eq!(
        ask(&server, "fay", q("local copy"), None).await.x_cache,
        "hit"
    );
    let limited = server.post_chat(Some("fay"), &q("local copy")).await;
    assert_eq!(limited.status(), 429);
    assert_eq!(
        limited.json::<Value>().await.unwrap()["code"],
        "rate_limited"
    );
}

/// `CACHE_LOCAL_MB=0` keeps no copies: every hit is read from the shared
/// cache.
#[tokio::test]
async fn without_local_copies_every_hit_is_read_from_the_shared_cache() {
    let redis = RedisServer::start().await;
    let sim = sim(5, 2000.0, 20).await;
    let url = sim.url();
    let redis_url = redis.url();
    let server = ChatServer::start(&[
        ("ANTHROPIC_BASE_URL", url.as_str()),
        ("REDIS_URL", redis_url.as_str()),
        ("REDIS_TIMEOUT_MS", "1000"),
        ("CACHE_LOCAL_MB", "0"),
    ])
    .await;
    assert_eq!(
        ask(&server, "gus", q("shared only"), None).await.x_cache,
        "miss"
    );
    let hit = ask(&server, "gus", q("shared only"), None).await;
    assert_eq!(hit.x_cache, "hit");
    assert!(
        hit.server_timing.contains("cache;desc=shared"),
        "{}",
        hit.server_timing
    );
    forget_shared(&redis).await;
    assert_eq!(
        ask(&server, "gus", q("shared only"), None).await.x_cache,
        "miss"
    );
}
