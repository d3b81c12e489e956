//! `POST /v1/chat/completions` and `GET /v1/models` over real HTTP, against
//! model-sim: the same turn as `/chat` (text, cache, persistence), framed
//! the OpenAI way. The official SDKs are driven against it in
//! `tests/clients.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use e2e::{ChatServer, LocalAws, RedisServer, answer_text, read_sse, require_aws_endpoint, sim};
use serde_json::{Value, json};

const LIMIT: Duration = Duration::from_secs(20);

async fn completions(
    server: &ChatServer,
    user: &str,
    body: &Value,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let mut req = reqwest::Client::new()
        .post(server.url("/v1/chat/completions"))
        .header("x-dev-user", user)
        .json(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap()
}

/// A streamed completion: (headers, chunks, whether `[DONE]` came last).
async fn streamed(resp: reqwest::Response) -> (reqwest::header::HeaderMap, Vec<Value>, bool) {
    assert_eq!(resp.status(), 200);
    let headers = resp.headers().clone();
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let (events, error) = read_sse(resp, LIMIT).await;
    assert_eq!(error, None);
    let done = events.last().is_some_and(|e| e.data == "[DONE]");
    let chunks = events
        .into_iter()
        .filter(|e| e.data != "[DONE]")
        .map(|e| e.data)
        .collect();
    (headers, chunks, done)
}

fn chunk_text(chunks: &[Value]) -> String {
    chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect()
}

fn user_says(text: &str) -> Value {
    json!([{"role": "user", "content": text}])
}

#[tokio::test]
async fn the_route_gives_the_text_chat_gives_streamed_and_whole() {
    let sim = sim(0, 2000.0, 40).await;
    let url = sim.url();
    let server = ChatServer::start(&[("ANTHROPIC_BASE_URL", url.as_str())]).await;
    let q = "tell me about relays";
    let resp = server
        .post_chat(
            Some("ann"),
            &json!({"message": q, "model": "sim-a", "max_tokens": 64}),
        )
        .await;
    let (events, _) = read_sse(resp, LIMIT).await;
    let chat_text = answer_text(&events);
    assert!(chat_text.len() > 20, "{chat_text}");

    let body = json!({"model": "sim-a", "messages": user_says(q), "max_tokens": 64,
                      "stream": true, "stream_options": {"include_usage": true}});
    let (headers, chunks, done) = streamed(completions(&server, "ann", &body, &[]).await).await;
    assert!(done, "the stream ends with [DONE]");
    assert_eq!(chunk_text(&chunks), chat_text);
    let stream_id = headers["x-stream-id"].to_str().unwrap();
    assert_eq!(chunks[0]["id"], format!("chatcmpl-{stream_id}"));
    assert_eq!(chunks[0]["object"], "chat.completion.chunk");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(chunks[0]["model"], "sim-a");
    let finish: Vec<_> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["finish_reason"].as_str())
        .collect();
    assert_eq!(finish, ["stop"]);
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(chunks.last().unwrap()["choices"], json!([]));
    assert_eq!(usage["completion_tokens"], 40);
    assert!(usage["prompt_tokens"].as_u64().unwrap() > 0);
    // Not stored: a stateless request without x-persist names no conversation.
    assert!(headers.get("x-conversation-id").is_none());

    let whole = completions(
        &server,
        "ann",
        &json!({"model": "sim-a", "messages": user_says(q), "max_tokens": 64}),
        &[],
    )
    .await;
    assert_eq!(whole.status(), 200);
    assert!(
        whole.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    let v: Value = whole.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["content"], chat_text.as_str());
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["usage"]["completion_tokens"], 40);

    // max_tokens cuts the answer short: finish_reason "length".
    let short = completions(
        &server,
        "ann",
        &json!({"model": "sim-a", "messages": user_says(q), "max_completion_tokens": 5}),
        &[],
    )
    .await;
    let v: Value = short.json().await.unwrap();
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 5);
}

#[tokio::test]
async fn a_stop_sequence_ends_the_answer_before_it() {
    let sim = sim(0, 2000.0, 40).await;
    let url = sim.url();
    let server = ChatServer::start(&[("ANTHROPIC_BASE_URL", url.as_str())]).await;
    let body = json!({"model": "sim-a", "messages": user_says("words please")});
    let full: Value = completions(&server, "bo", &body, &[])
        .await
        .json()
        .await
        .unwrap();
    let text = full["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned();
    // A word from the middle of the answer.
    let word = text.split_whitespace().nth(5).unwrap().to_owned();
    let at = text.find(&word).unwrap();
    let mut stopped = body.clone();
    stopped["stop"] = json!([word]);
    stopped["stream"] = json!(true);
    let (_, chunks, done) = streamed(completions(&server, "bo", &stopped, &[]).await).await;
    assert!(done);
    assert_eq!(chunk_text(&chunks), text[..at]);
    let sent = sim.state().requests();
    assert_eq!(sent.last().unwrap()["stop_sequences"], json!([word]));
}

#[tokio::test]
async fn the_messages_are_the_context_and_the_cache_key() {
    let redis = RedisServer::start().await;
    let sim = sim(0, 2000.0, 20).await;
    let (url, redis_url) = (sim.url(), redis.url());
    let server = ChatServer::start(&[
        ("ANTHROPIC_BASE_URL", url.as_str()),
        ("REDIS_URL", redis_url.as_str()),
        ("REDIS_TIMEOUT_MS", "1000"),
    ])
    .await;
    let conversation = json!([
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "what is a cache?"},
        {"role": "assistant", "content": "a store of answers"},
        {"role": "user", "content": "and a relay?"},
    ]);
    let body =
        json!({"model": "sim-a", "messages": conversation, "temperature": 0, "stream": true});
    let (h1, first, _) = streamed(completions(&server, "cy", &body, &[]).await).await;
    assert_eq!(h1["x-cache"], "miss");
    let sent = sim.state().requests();
    let last = sent.last().unwrap();
    assert_eq!(last["system"], "be brief");
    assert_eq!(last["messages"].as_array().unwrap().len(), 3);
    assert_eq!(last["messages"][1]["content"], "a store of answers");
    let calls = sim.calls();

    let (h2, second, _) = streamed(completions(&server, "cy", &body, &[]).await).await;
    assert_eq!(h2["x-cache"], "hit");
    assert_eq!(chunk_text(&second), chunk_text(&first));
    assert_eq!(sim.calls(), calls, "a hit calls no model");

    // Another context is another question.
    let mut other = body.clone();
    other["messages"][2]["content"] = json!("a store of other answers");
    let (h3, _, _) = streamed(completions(&server, "cy", &other, &[]).await).await;
    assert_eq!(h3["x-cache"], "miss");

    // The same question through /chat (no history, same message) is the same
    // key only when the context matches: a one-message request hits what
    // /chat cached.
    let resp = server
        .post_chat(
            Some("cy"),
            &json!({"message": "plain question", "model": "sim-a", "temperature": 0}),
        )
        .await;
    read_sse(resp, LIMIT).await;
    let one = json!({"model": "sim-a", "messages": user_says("plain question"), "temperature": 0, "stream": true});
    let (h4, _, _) = streamed(completions(&server, "cy", &one, &[]).await).await;
    assert_eq!(h4["x-cache"], "hit");
}

#[tokio::test]
async fn x_persist_stores_a_conversation_and_x_conversation_id_continues_it() {
    require_aws_endpoint();
    let aws = LocalAws::create(&[]).await;
    let sim = sim(0, 2000.0, 10).await;
    let url = sim.url();
    let server = ChatServer::start(&[
        ("ANTHROPIC_BASE_URL", url.as_str()),
        ("TABLE_NAME", aws.table.as_str()),
    ])
    .await;
    let body = json!({"model": "sim-a", "messages": user_says("remember this"), "stream": true});
    // Without x-persist: nothing is stored and no conversation is named.
    let (h, _, _) = streamed(completions(&server, "dee", &body, &[]).await).await;
    assert!(h.get("x-conversation-id").is_none());
    let list: Value = reqwest::Client::new()
        .get(server.url("/conversations"))
        .header("x-dev-user", "dee")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["conversations"], json!([]), "{list}");

    let (h, first, _) =
        streamed(completions(&server, "dee", &body, &[("x-persist", "true")]).await).await;
    let id = h["x-conversation-id"].to_str().unwrap().to_owned();
    let stored: Value = reqwest::Client::new()
        .get(server.url(&format!("/conversations/{id}")))
        .header("x-dev-user", "dee")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        stored["messages"][0]["content"], "remember this",
        "{stored}"
    );
    assert_eq!(
        stored["messages"][1]["content"],
        chunk_text(&first).as_str()
    );

    // Continued by id: the stored history is the context.
    let next = json!({"model": "sim-a", "messages": user_says("what did I say?"), "stream": true});
    let (h, _, done) =
        streamed(completions(&server, "dee", &next, &[("x-conversation-id", &id)]).await).await;
    assert!(done);
    assert_eq!(h["x-conversation-id"], id.as_str());
    let sent = sim.state().requests();
    let msgs = sent.last().unwrap()["messages"].as_array().unwrap().clone();
    assert_eq!(msgs.len(), 3);
    assert_eq!(msgs[0]["content"], "remember this");
    assert_eq!(msgs[2]["content"], "what did I say?");

    // With an id, exactly one new user message.
    let two = json!({"model": "sim-a", "messages": [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"}]});
    let r = completions(&server, "dee", &two, &[("x-conversation-id", &id)]).await;
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["param"], "messages");
    // Someone else's conversation is not found.
    let r = completions(&server, "eve", &next, &[("x-conversation-id", &id)]).await;
    assert_eq!(r.status(), 404);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["type"], "not_found_error");
}

#[tokio::test]
async fn errors_have_the_openai_shape_and_models_are_listed() {
    let sim = sim(0, 2000.0, 10).await;
    let url = sim.url();
    let key = "ck_openai_route_key";
    let hashes = format!("{}:fay", chat_core::auth::hash_key(key));
    let server = ChatServer::start(&[
        ("ANTHROPIC_BASE_URL", url.as_str()),
        ("AUTH_MODE", "api_key"),
        ("API_KEY_HASHES", hashes.as_str()),
        ("DEFAULT_MODEL", "sim-default"),
        ("MODEL_ALLOWLIST", "sim-b,sim-c"),
    ])
    .await;
    let client = reqwest::Client::new();
    let post = |body: Value, auth: Option<&str>| {
        let mut r = client.post(server.url("/v1/chat/completions")).json(&body);
        if let Some(k) = auth {
            r = r.bearer_auth(k);
        }
        r.send()
    };
    let ok = json!({"model": "sim-b", "messages": user_says("hi")});
    let calls = sim.calls();
    let cases: Vec<(Value, Option<&str>, u16, &str, Value)> = vec![
        (ok.clone(), None, 401, "authentication_error", Value::Null),
        (
            ok.clone(),
            Some("ck_wrong"),
            401,
            "authentication_error",
            Value::Null,
        ),
        (
            json!({"model": "sim-b", "messages": user_says("hi"), "tools": [{"type": "function"}]}),
            Some(key),
            400,
            "invalid_request_error",
            json!("tools"),
        ),
        (
            json!({"model": "sim-b", "messages": user_says("hi"), "n": 3}),
            Some(key),
            400,
            "invalid_request_error",
            json!("n"),
        ),
        (
            json!({"model": "sim-b", "messages": user_says("hi"), "frequency_penalty": 1}),
            Some(key),
            400,
            "invalid_request_error",
            json!("frequency_penalty"),
        ),
        (
            json!({"model": "gpt-unknown", "messages": user_says("hi")}),
            Some(key),
            400,
            "invalid_request_error",
            json!("model"),
        ),
    ];
    for (body, auth, status, kind, param) in cases {
        let r = post(body.clone(), auth).await.unwrap();
        assert_eq!(r.status(), status, "{body}");
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["error"]["type"], kind, "{e}");
        assert_eq!(e["error"]["param"], param, "{e}");
        assert!(e["error"]["message"].as_str().unwrap().len() > 5, "{e}");
        assert!(e["error"]["code"].is_string(), "{e}");
    }
    assert_eq!(sim.calls(), calls, "no refused request reached the model");
    let r = post(ok, Some(key)).await.unwrap();
    assert_eq!(r.status(), 200);

    let r = client.get(server.url("/v1/models")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let models: Value = client
        .get(server.url("/v1/models"))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["sim-default", "sim-b", "sim-c"]);
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["owned_by"], "anthropic");
}

#[tokio::test]
async fn the_stream_id_resumes_the_answer_through_chat_streams() {
    let redis = RedisServer::start().await;
    let sim = sim(0, 50.0, 20).await;
    let (url, redis_url) = (sim.url(), redis.url());
    let server = ChatServer::start(&[
        ("ANTHROPIC_BASE_URL", url.as_str()),
        ("REDIS_URL", redis_url.as_str()),
        ("REDIS_TIMEOUT_MS", "1000"),
    ])
    .await;
    let body = json!({"model": "sim-a", "messages": user_says("resume me"), "stream": true});
    let resp = completions(&server, "gus", &body, &[]).await;
    let id = resp.headers()["x-stream-id"].to_str().unwrap().to_owned();
    drop(resp); // the client leaves at once
    let started = Instant::now();
    let resumed = reqwest::Client::new()
        .get(server.url(&format!("/chat/streams/{id}")))
        .header("x-dev-user", "gus")
        .send()
        .await
        .unwrap();
    assert_eq!(resumed.status(), 200);
    let (events, _) = read_sse(resumed, LIMIT).await;
    assert_eq!(events.last().unwrap().event, "done", "{events:?}");
    assert!(answer_text(&events).split_whitespace().count() > 3);
    assert!(started.elapsed() < LIMIT);
    assert_eq!(sim.calls(), 1, "the answer was finished, not asked again");
}
