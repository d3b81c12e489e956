//! Abuse and spend limits, each answering its documented 429 with the
//! setting named, and limits shared by the fleet through the DynamoDB
//! table when there is no Redis (moto), or through Redis.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_sdk_dynamodb::types::AttributeValue;
use e2e::{ChatServer, LocalAws, RedisServer, read_deltas, sim};
use model_sim::Sim;
use serde_json::{Value, json};

async fn instance(sim: &Sim, aws: &LocalAws, extra: &[(&str, &str)]) -> ChatServer {
    let url = sim.url();
    let table = aws.table.clone();
    let mut env = vec![
        ("ANTHROPIC_BASE_URL", url.as_str()),
        ("TABLE_NAME", table.as_str()),
        ("UPSTREAM_PREWARM", "false"),
    ];
    env.extend_from_slice(extra);
    ChatServer::start(&env).await
}

fn header<'a>(r: &'a reqwest::Response, name: &str) -> &'a str {
    r.headers()
        .get(name)
        .map(|v| v.to_str().unwrap())
        .unwrap_or("")
}

/// Waits, when needed, so the next few seconds stay in one clock minute
/// (the table counts fixed one-minute windows).
async fn early_in_a_minute() {
    let into = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis()
        % 60_000;
    if into > 45_000 {
        tokio::time::sleep(Duration::from_millis(60_000 - into as u64 + 50)).await;
    }
}

/// A 429 from one of our limits: the code, the setting, the scope.
async fn refused(r: reqwest::Response, code: &str, setting: &str, scope: &str) -> Value {
    assert_eq!(r.status(), 429);
    assert_eq!(header(&r, "x-ratelimit-scope"), scope);
    let retry: u64 = header(&r, "retry-after").parse().unwrap();
    assert!(retry >= 1);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(body["limit"], setting, "{body}");
    body
}

#[tokio::test]
async fn two_instances_without_redis_share_one_rate_limit_through_the_table() {
    let aws = LocalAws::create(&[]).await;
    let sim = sim(1, 2000.0, 3).await;
    let extra = [("RATE_LIMIT_RPM", "4")];
    let a = instance(&sim, &aws, &extra).await;
    let b = instance(&sim, &aws, &extra).await;
    early_in_a_minute().await;
    let ask = json!({"message": "hi"});
    let mut remaining = Vec::new();
    for (i, server) in [&a, &b, &a, &b].into_iter().enumerate() {
        let r = server.post_chat(Some("shared"), &ask).await;
        assert_eq!(r.status(), 200, "request {i}");
        assert_eq!(header(&r, "x-ratelimit-scope"), "fleet");
        remaining.push(header(&r, "x-ratelimit-remaining").to_owned());
        let _ = r.bytes().await;
    }
    assert_eq!(remaining, ["3", "2", "1", "0"], "one count across both");
    // Either instance now refuses: 4 per minute for the fleet, not 4 each.
    for server in [&a, &b] {
        let r = server.post_chat(Some("shared"), &ask).await;
        let body = refused(r, "rate_limited", "RATE_LIMIT_RPM", "fleet").await;
        assert!(body["message"].as_str().unwrap().contains("requests"));
    }
    // /health (credentials: any dev user) says where limits are counted.
    let h: Value = reqwest::get(a.url("/health"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(h["dependencies"]["limits"]["counted_in"], "table", "{h}");
    assert_eq!(h["dependencies"]["limits"]["scope"], "fleet", "{h}");
    // Another user has their own count.
    let r = b.post_chat(Some("someone-else"), &ask).await;
    assert_eq!(r.status(), 200);
    let _ = r.bytes().await;
    assert_eq!(sim.calls(), 5);
}

/// A slow answer held open by its reader.
async fn open_stream(server: &ChatServer, user: &str) -> e2e::BodyStream {
    let r = server
        .post_chat(Some(user), &json!({"message": "tell me a long story"}))
        .await;
    assert_eq!(r.status(), 200);
    let mut stream = e2e::body_stream(r);
    read_deltas(&mut stream, 1).await;
    stream
}

async fn streams_per_user_are_limited(server: &ChatServer, scope: &str) {
    let one = open_stream(server, "busy").await;
    let _two = open_stream(server, "busy").await;
    let r = server
        .post_chat(Some("busy"), &json!({"message": "and a third"}))
        .await;
    let body = refused(r, "too_many_streams", "MAX_STREAMS_PER_USER", scope).await;
    assert!(body["message"].as_str().unwrap().contains("2"), "{body}");
    // Another user is not held up by this one.
    let _other = open_stream(server, "idle").await;
    // One answer's client leaves: its slot comes back.
    drop(one);
    let t = Instant::now();
    loop {
        let r = server
            .post_chat(Some("busy"), &json!({"message": "now?"}))
            .await;
        if r.status() == 200 {
            break;
        }
        assert_eq!(r.status(), 429);
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the slot never came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn concurrent_streams_per_user_are_limited_through_the_table() {
    let aws = LocalAws::create(&[]).await;
    // 400 tokens at 20/s: each answer streams for many seconds.
    let sim = sim(5, 20.0, 400).await;
    let server = instance(&sim, &aws, &[("MAX_STREAMS_PER_USER", "2")]).await;
    streams_per_user_are_limited(&server, "fleet").await;
}

#[tokio::test]
async fn concurrent_streams_per_user_are_limited_through_redis() {
    let redis = RedisServer::start().await;
    let sim = sim(5, 20.0, 400).await;
    let url = sim.url();
    let redis_url = redis.url();
    let server = ChatServer::start(&[
        ("ANTHROPIC_BASE_URL", url.as_str()),
        ("REDIS_URL", redis_url.as_str()),
        ("REDIS_TIMEOUT_MS", "1000"),
        ("MAX_STREAMS_PER_USER", "2"),
        // Without live streams a client that leaves ends its answer.
        ("LIVE_STREAMS_ENABLED", "false"),
        ("CACHE_ENABLED", "false"),
    ])
    .await;
    streams_per_user_are_limited(&server, "fleet").await;
}

#[tokio::test]
async fn concurrent_streams_per_user_are_limited_per_instance_without_shared_state() {
    let sim = sim(5, 20.0, 400).await;
    let url = sim.url();
    let server = ChatServer::start(&[
        ("ANTHROPIC_BASE_URL", url.as_str()),
        ("MAX_STREAMS_PER_USER", "2"),
    ])
    .await;
    let h: Value = reqwest::get(server.url("/health"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(h["dependencies"]["limits"]["counted_in"], "instance", "{h}");
    streams_per_user_are_limited(&server, "local").await;
}

#[tokio::test]
async fn the_get_and_delete_routes_are_rate_limited_per_user() {
    let aws = LocalAws::create(&[]).await;
    let sim = sim(1, 2000.0, 3).await;
    let server = instance(&sim, &aws, &[("READ_RATE_LIMIT_RPM", "3")]).await;
    early_in_a_minute().await;
    let read = |method: reqwest::Method, path: &str, user: &str| {
        reqwest::Client::new()
            .request(method, server.url(path))
            .header("x-dev-user", user)
            .send()
    };
    let (get, delete) = (reqwest::Method::GET, reqwest::Method::DELETE);
    for _ in 0..2 {
        let r = read(get.clone(), "/conversations", "reader").await.unwrap();
        assert_eq!(r.status(), 200);
    }
    let r = read(
        delete.clone(),
        "/conversations/nosuchconversation",
        "reader",
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 404, "the third read is let through");
    for path in ["/conversations", "/conversations/abc", "/chat/streams/abc"] {
        let r = read(get.clone(), path, "reader").await.unwrap();
        refused(r, "rate_limited", "READ_RATE_LIMIT_RPM", "fleet").await;
    }
    let r = read(delete, "/conversations/abc", "reader").await.unwrap();
    refused(r, "rate_limited", "READ_RATE_LIMIT_RPM", "fleet").await;
    // Another user reads on; and the chat route has limits of its own.
    let r = read(get, "/conversations", "another-reader").await.unwrap();
    assert_eq!(r.status(), 200);
    let r = server
        .post_chat(Some("reader"), &json!({"message": "hi"}))
        .await;
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn an_address_that_fails_to_sign_in_is_refused_before_any_key_lookup() {
    use sha2::{Digest, Sha256};
    let aws = LocalAws::create(&[]).await;
    let sim = sim(1, 2000.0, 3).await;
    let server = instance(
        &sim,
        &aws,
        &[
            ("AUTH_MODE", "api_key"),
            ("AUTH_FAILURES_PER_IP_PER_MINUTE", "3"),
        ],
    )
    .await;
    early_in_a_minute().await;
    let ask = |key: String| {
        reqwest::Client::new()
            .post(server.url("/chat"))
            .bearer_auth(key)
            .json(&json!({"message": "hi"}))
            .send()
    };
    for i in 0..3 {
        let r = ask(format!("ck_wrong_{i}")).await.unwrap();
        assert_eq!(r.status(), 401, "failure {i} is a plain 401");
    }
    let r = ask("ck_wrong_3".into()).await.unwrap();
    refused(
        r,
        "auth_rate_limited",
        "AUTH_FAILURES_PER_IP_PER_MINUTE",
        "fleet",
    )
    .await;
    // A key created now, never seen by this instance, would need a table
    // read to be recognised: the address is refused before that read.
    let key = "ck_valid_created_after_the_flood";
    let hash = format!("{:x}", Sha256::digest(key.as_bytes()));
    let store = aws.store().await;
    store.put_api_key(&hash, "late", "test", 0).await.unwrap();
    let r = ask(key.into()).await.unwrap();
    refused(
        r,
        "auth_rate_limited",
        "AUTH_FAILURES_PER_IP_PER_MINUTE",
        "fleet",
    )
    .await;
    assert_eq!(sim.calls(), 0, "no model call for a refused address");
    // The same key works on an instance this address has not failed on
    // yet (the lookup happens there) until that instance counts a failure.
    let fresh = instance(&sim, &aws, &[("AUTH_MODE", "api_key")]).await;
    let r = reqwest::Client::new()
        .post(fresh.url("/chat"))
        .bearer_auth(key)
        .json(&json!({"message": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn a_user_over_the_daily_token_budget_gets_budget_exceeded_until_midnight() {
    let aws = LocalAws::create(&[]).await;
    let sim = sim(1, 2000.0, 3).await;
    let server = instance(&sim, &aws, &[("DAILY_TOKEN_BUDGET_PER_USER", "1000")]).await;
    // Today's usage as db-writer counts it.
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let day = chat_core::util::utc_day(now.as_millis() as u64);
    let sdk = chat_core::aws_sdk_config(Duration::from_secs(5), Duration::from_secs(10)).await;
    let ddb = aws_sdk_dynamodb::Client::new(&sdk);
    for (user, input, output) in [("spender", 400, 700), ("saver", 100, 200)] {
        ddb.put_item()
            .table_name(&aws.table)
            .item("PK", AttributeValue::S(format!("USER#{user}")))
            .item("SK", AttributeValue::S(format!("USAGE#{day}")))
            .item("requests", AttributeValue::N("3".into()))
            .item("input_tokens", AttributeValue::N(input.to_string()))
            .item("output_tokens", AttributeValue::N(output.to_string()))
            .send()
            .await
            .unwrap();
    }
    let r = server
        .post_chat(Some("spender"), &json!({"message": "hi"}))
        .await;
    let retry: u64 = header(&r, "retry-after").parse().unwrap();
    let body = refused(r, "budget_exceeded", "DAILY_TOKEN_BUDGET_PER_USER", "fleet").await;
    let tomorrow = chat_core::util::utc_day((now.as_secs() / 86_400 + 1) * 86_400_000);
    assert_eq!(body["resets_at"], format!("{tomorrow}T00:00:00Z"));
    let to_midnight = 86_400 - now.as_secs() % 86_400;
    assert!(retry.abs_diff(to_midnight) <= 2, "{retry} vs {to_midnight}");
    assert_eq!(sim.calls(), 0);
    let r = server
        .post_chat(Some("saver"), &json!({"message": "hi"}))
        .await;
    assert_eq!(r.status(), 200);
    let _ = r.bytes().await;
    assert_eq!(sim.calls(), 1);
}
