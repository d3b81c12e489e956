//! The OpenAI-compatible provider, fallback across providers, routing and
//! the model allowlist, over real HTTP against model-sim.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use e2e::{ChatServer, Event, answer_text, direct_answer, kinds, read_sse, sim};
use serde_json::{Value, json};

const LIMIT: Duration = Duration::from_secs(20);

#[tokio::test]
async fn an_openai_compatible_endpoint_alone_serves_chat() {
    let sim = sim(5, 500.0, 9).await;
    let base = format!("{}/v1", sim.url());
    let server = ChatServer::start(&[
        ("OPENAI_BASE_URL", base.as_str()),
        ("OPENAI_API_KEY", "test-key"),
        ("DEFAULT_MODEL", "gpt-sim"),
    ])
    .await;
    let resp = server
        .post_chat(
            None,
            &json!({"message": "What is SSE?", "system": "be brief", "max_tokens": 50}),
        )
        .await;
    assert_eq!(resp.status(), 200);
    let (events, _) = read_sse(resp, LIMIT).await;
    let k = kinds(&events);
    assert_eq!(k.first(), Some(&"meta"));
    assert_eq!(k.last(), Some(&"done"), "{k:?}");
    assert_eq!(events[0].data["model"], "gpt-sim");
    let done = &events.last().unwrap().data;
    assert_eq!(done["stop_reason"], "end_turn");
    assert_eq!(done["usage"]["output_tokens"], 9);
    assert!(done["usage"]["input_tokens"].as_u64().unwrap() > 0);

    // What went over the wire is a Chat Completions request.
    let sent = sim.requests().pop().unwrap();
    assert_eq!(sent["messages"][0]["role"], "system");
    assert_eq!(sent["messages"][1]["content"], "What is SSE?");
    assert_eq!(sent["stream_options"]["include_usage"], true);

    // The sim answers the same conversation with the same words in either
    // format: the relayed text equals its Anthropic-format answer.
    let direct = direct_answer(&sim, "gpt-sim", Some("be brief"), "What is SSE?", 50).await;
    assert_eq!(answer_text(&events), direct);
}

#[tokio::test]
async fn openai_errors_map_like_every_provider() {
    let sim = sim(5, 500.0, 6).await;
    let base = format!("{}/v1", sim.url());
    let server = ChatServer::start(&[
        ("OPENAI_BASE_URL", base.as_str()),
        ("OPENAI_API_KEY", "test-key"),
        ("UPSTREAM_MAX_RETRIES", "0"),
    ])
    .await;
    let resp = server
        .post_chat(
            None,
            &json!({"message": "x", "model": "g+fault=status:429:4"}),
        )
        .await;
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "4");
    let resp = server
        .post_chat(
            None,
            &json!({"message": "x", "model": "g+fault=status:401"}),
        )
        .await;
    assert_eq!(resp.status(), 502);
    let resp = server
        .post_chat(
            None,
            &json!({"message": "x", "model": "g+fault=error-mid@3"}),
        )
        .await;
    assert_eq!(resp.status(), 200);
    let (events, _) = read_sse(resp, LIMIT).await;
    let last = events.last().unwrap();
    assert_eq!(last.event, "error");
    assert_eq!(last.data["code"], "upstream_overloaded");
    assert_eq!(kinds(&events).iter().filter(|k| **k == "delta").count(), 3);

    // A wrong key is an auth failure on our side: 502, not a 401 to the caller.
    let bad = ChatServer::start(&[
        ("OPENAI_BASE_URL", base.as_str()),
        ("OPENAI_API_KEY", "wrong"),
    ])
    .await;
    assert_eq!(
        bad.post_chat(None, &json!({"message": "x"})).await.status(),
        502
    );
}

#[tokio::test]
async fn anthropic_failure_falls_back_to_an_openai_model() {
    let sim = sim(5, 500.0, 5).await;
    let url = sim.url();
    let base = format!("{url}/v1");
    let server = ChatServer::start(&[
        ("ANTHROPIC_BASE_URL", url.as_str()),
        ("OPENAI_BASE_URL", base.as_str()),
        ("OPENAI_API_KEY", "test-key"),
        ("UPSTREAM_MAX_RETRIES", "0"),
        ("MODEL_FALLBACKS", "openai:gpt-backup"),
    ])
    .await;
    let resp = server
        .post_chat(
            None,
            &json!({"message": "hi", "model": "claude+fault=status:529"}),
        )
        .await;
    assert_eq!(resp.status(), 200);
    let (events, _) = read_sse(resp, LIMIT).await;
    assert_eq!(events[0].data["model"], "gpt-backup");
    assert_eq!(events.last().unwrap().event, "done");
    let reqs = sim.requests();
    assert_eq!(reqs.len(), 2);
    assert!(
        reqs[0].get("stream_options").is_none(),
        "first call in Anthropic format"
    );
    assert_eq!(
        reqs[1]["stream_options"]["include_usage"], true,
        "second in OpenAI format"
    );
    let health: Value = reqwest::get(server.url("/health"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["dependencies"]["openai"]["state"], "ok");
    assert_eq!(health["dependencies"]["anthropic"]["state"], "degraded");
}

#[tokio::test]
async fn short_prompts_route_to_the_fast_model_and_the_allowlist_holds() {
    let sim = sim(5, 500.0, 4).await;
    let url = sim.url();
    // No MODEL_ALLOWLIST=*: only the models this deployment names.
    let server = ChatServer::start(&[
        ("ANTHROPIC_BASE_URL", url.as_str()),
        ("MODEL_ALLOWLIST", ""),
        ("DEFAULT_MODEL", "claude-big"),
        ("ROUTE_SHORT_MODEL", "claude-fast"),
        ("ROUTE_SHORT_MAX_CHARS", "40"),
        ("MODEL_FALLBACKS", "claude-backup"),
    ])
    .await;
    let meta_model = |events: Vec<Event>| events[0].data["model"].as_str().unwrap().to_owned();

    let (ev, _) = read_sse(
        server
            .post_chat(None, &json!({"message": "capital of France?"}))
            .await,
        LIMIT,
    )
    .await;
    assert_eq!(meta_model(ev), "claude-fast");
    let long = "Please compare these two approaches in detail and explain the trade-offs.";
    let (ev, _) = read_sse(
        server.post_chat(None, &json!({"message": long})).await,
        LIMIT,
    )
    .await;
    assert_eq!(meta_model(ev), "claude-big");
    let (ev, _) = read_sse(
        server
            .post_chat(None, &json!({"message": "hi", "model": "claude-backup"}))
            .await,
        LIMIT,
    )
    .await;
    assert_eq!(meta_model(ev), "claude-backup");

    let resp = server
        .post_chat(
            None,
            &json!({"message": "hi", "model": "claude-most-expensive"}),
        )
        .await;
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["code"], "model_not_allowed");
    assert_eq!(body["field"], "model");
    assert_eq!(sim.calls(), 3, "a refused model costs no call");
}

/// The AWS SDK signs with the environment's credentials; `make test` sets
/// test ones (and moto's endpoint, which the Bedrock endpoint overrides).
fn require_aws_credentials() {
    assert!(
        std::env::var("AWS_ACCESS_KEY_ID").is_ok(),
        "AWS credentials are not set: run the tests with `make test`"
    );
}

#[tokio::test]
async fn bedrock_converse_stream_through_the_aws_sdk() {
    require_aws_credentials();
    let sim = sim(5, 500.0, 7).await;
    let url = sim.url();
    let model = "anthropic.claude-sim-v1:0";
    let server = ChatServer::start(&[
        ("BEDROCK_ENABLED", "true"),
        ("BEDROCK_REGION", "us-east-1"),
        ("AWS_ENDPOINT_URL_BEDROCK_RUNTIME", url.as_str()),
        ("DEFAULT_MODEL", model),
        ("UPSTREAM_MAX_RETRIES", "0"),
    ])
    .await;
    let resp = server
        .post_chat(
            None,
            &json!({"message": "What is SSE?", "system": "be brief", "max_tokens": 50}),
        )
        .await;
    assert_eq!(resp.status(), 200);
    let (events, _) = read_sse(resp, LIMIT).await;
    let k = kinds(&events);
    assert_eq!(k.iter().filter(|k| **k == "delta").count(), 7, "{k:?}");
    assert_eq!(events[0].data["model"], model);
    let done = &events.last().unwrap().data;
    assert_eq!(done["stop_reason"], "end_turn");
    assert_eq!(done["usage"]["output_tokens"], 7);

    // Same conversation, same words as the sim's Anthropic-format answer.
    let direct = direct_answer(&sim, model, Some("be brief"), "What is SSE?", 50).await;
    assert_eq!(answer_text(&events), direct);

    // Errors: a throttle before the stream, an exception and a dropped
    // connection inside it.
    let resp = server
        .post_chat(
            None,
            &json!({"message": "x", "model": format!("{model}+fault=status:429")}),
        )
        .await;
    assert_eq!(resp.status(), 429);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["code"],
        "upstream_rate_limited"
    );
    for (fault, code) in [
        ("error-mid@3", "upstream_overloaded"),
        ("drop-mid@3", "upstream_disconnected"),
    ] {
        let resp = server
            .post_chat(
                None,
                &json!({"message": "x", "model": format!("{model}+fault={fault}")}),
            )
            .await;
        assert_eq!(resp.status(), 200, "{fault}");
        let (events, _) = read_sse(resp, LIMIT).await;
        let last = events.last().unwrap();
        assert_eq!(last.event, "error", "{fault}");
        assert_eq!(last.data["code"], code, "{fault}");
    }
    let health: Value = reqwest::get(server.url("/health?probe=1"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        health["dependencies"]["bedrock"]["probe"]["ok"],
        Value::Null
    );
}
