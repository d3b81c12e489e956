//! chat-stream's local server against model-sim, over real HTTP.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use e2e::{ChatServer, Event, answer_text, direct_answer, kinds, read_sse, sim};
use model_sim::Sim;
use serde_json::{Value, json};

const LIMIT: Duration = Duration::from_secs(20);

async fn chat(sim: &Sim, extra: &[(&str, &str)]) -> ChatServer {
    let url = sim.url();
    let mut env = vec![("ANTHROPIC_BASE_URL", url.as_str())];
    env.extend_from_slice(extra);
    ChatServer::start(&env).await
}

/// HTTP/2 to the model from the first byte, and no per-user stream cap
/// (the tests below run many answers of one dev user at once).
const H2C_MANY_STREAMS: &[(&str, &str)] = &[
    ("UPSTREAM_HTTP2_PRIOR_KNOWLEDGE", "true"),
    ("MAX_STREAMS_PER_USER", "0"),
];

/// Asks every question at once, a client each; the events of each answer,
/// in the order asked. Every response must be a 200.
async fn ask_at_once(server: &ChatServer, questions: &[String]) -> Vec<Vec<Event>> {
    let tasks: Vec<_> = questions
        .iter()
        .map(|q| {
            let (url, body) = (server.url("/chat"), json!({"message": q}));
            tokio::spawn(async move {
                let resp = reqwest::Client::new()
                    .post(url)
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(resp.status(), 200, "{}", body["message"]);
                read_sse(resp, LIMIT).await.0
            })
        })
        .collect();
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    answers
}

#[tokio::test]
async fn full_answer_arrives_as_meta_deltas_done() {
    let sim = sim(10, 500.0, 12).await;
    let server = chat(&sim, &[]).await;
    let resp = server
        .post_chat(
            None,
            &json!({"message": "What is SSE?", "max_tokens": 100, "system": "be brief"}),
        )
        .await;
    assert_eq!(resp.status(), 200);
    let h = resp.headers().clone();
    assert!(
        h["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    assert!(!h["x-request-id"].is_empty());
    let st = h["server-timing"].to_str().unwrap();
    assert!(
        st.contains("validate;dur=")
            && st.contains("upstream_connect;dur=")
            && st.contains("ttft;dur="),
        "{st}"
    );

    let (events, err) = read_sse(resp, LIMIT).await;
    assert_eq!(err, None);
    let k = kinds(&events);
    assert_eq!(k.first(), Some(&"meta"));
    assert_eq!(k.last(), Some(&"done"));
    assert_eq!(k.iter().filter(|k| **k == "delta").count(), 12, "{k:?}");
    // ids are 1..=n, in order: what Last-Event-ID resumption will rely on.
    let ids: Vec<String> = events.iter().map(|e| e.id.clone().unwrap()).collect();
    let expected: Vec<String> = (1..=events.len()).map(|i| i.to_string()).collect();
    assert_eq!(ids, expected);

    let meta = &events[0].data;
    assert_eq!(meta["cache"], "miss");
    assert_eq!(meta["model"], "claude-sonnet-4-5");
    assert_eq!(meta["conversation_id"].as_str().unwrap().len(), 32);
    assert_eq!(meta["turn_id"].as_str().unwrap().len(), 32);

    let done = &events.last().unwrap().data;
    assert_eq!(done["stop_reason"], "end_turn");
    assert_eq!(done["usage"]["output_tokens"], 12);
    assert!(done["usage"]["input_tokens"].as_u64().unwrap() > 0);
    for t in ["validate", "limits", "upstream_connect", "ttft", "total"] {
        assert!(
            done["timings_ms"][t].as_f64().is_some(),
            "timings_ms.{t} in {done}"
        );
    }
    assert!(done["timings_ms"]["ttft"].as_f64() <= done["timings_ms"]["total"].as_f64());

    // The relayed text is exactly what the model produced: nothing lost,
    // nothing doubled, nothing reordered.
    let direct = direct_answer(
        &sim,
        "claude-sonnet-4-5",
        Some("be brief"),
        "What is SSE?",
        100,
    )
    .await;
    assert_eq!(answer_text(&events), direct);

    // What the model received: the system prompt, the message, max_tokens.
    let sent = sim
        .requests()
        .into_iter()
        .find(|r| r["stream"] == true)
        .unwrap();
    assert_eq!(sent["system"], "be brief");
    assert_eq!(sent["max_tokens"], 100);
    assert_eq!(sent["messages"][0]["content"], "What is SSE?");
}

#[tokio::test]
async fn deltas_reach_the_client_while_the_model_is_still_generating() {
    // 20 tokens at 10/s: the model needs about 1.9 s after its first token.
    let sim = sim(50, 10.0, 20).await;
    let server = chat(&sim, &[]).await;
    let sent = Instant::now();
    let resp = server
        .post_chat(None, &json!({"message": "tell me a story"}))
        .await;
    assert_eq!(resp.status(), 200);
    let (events, _) = read_sse(resp, LIMIT).await;
    let deltas: Vec<&Event> = events.iter().filter(|e| e.event == "delta").collect();
    assert_eq!(deltas.len(), 20);
    let done = events.last().unwrap();
    assert_eq!(done.event, "done");
    let generation = Duration::from_secs_f64(19.0 / 10.0);
    // Had chat-stream buffered the answer, the first delta would arrive
    // with the last one. A slow machine only widens this gap.
    let gap = done.at - deltas[0].at;
    assert!(
        gap >= generation.mul_f64(0.8),
        "first delta arrived only {gap:?} before done ({:?} after sending)",
        deltas[0].at - sent
    );
    // And deltas trickle in: the middle one arrives well before the last.
    assert!(deltas[19].at - deltas[10].at >= Duration::from_millis(700));
}

#[tokio::test]
async fn upstream_http_errors_map_to_documented_statuses() {
    let sim = sim(0, 0.0, 5).await;
    let server = chat(&sim, &[("UPSTREAM_MAX_RETRIES", "0")]).await;
    // (fault, our status, our code, Retry-After)
    let table: &[(&str, u16, &str, Option<&str>)] = &[
        ("status:400", 400, "upstream_rejected_request", None),
        ("status:401", 502, "upstream_auth_failed", None),
        ("status:403", 502, "upstream_auth_failed", None),
        ("status:404", 400, "model_not_found", None),
        ("status:413", 413, "upstream_request_too_large", None),
        ("status:429:7", 429, "upstream_rate_limited", Some("7")),
        ("status:500", 502, "upstream_error", None),
        ("status:503", 503, "upstream_error", Some("1")),
        ("status:529:2", 503, "upstream_overloaded", Some("2")),
        // An error event before any text is still answered with a status.
        ("error-mid@0", 503, "upstream_overloaded", Some("1")),
        ("error-mid:api_error@0", 502, "upstream_error", None),
    ];
    for (fault, status, code, retry_after) in table {
        let model = format!("claude-sim+fault={fault}");
        let resp = server
            .post_chat(None, &json!({"message": "hi", "model": model}))
            .await;
        assert_eq!(resp.status().as_u16(), *status, "{fault}");
        assert_eq!(
            resp.headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap()),
            *retry_after,
            "{fault}"
        );
        assert!(resp.headers().contains_key("x-request-id"));
        assert!(
            resp.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("application/json")
        );
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["code"], *code, "{fault}: {body}");
        assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
}

#[tokio::test]
async fn unreachable_upstream_is_502_and_first_token_timeout_is_504() {
    // A port nobody listens on: bind one, learn it, close it.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let dead = format!("http://127.0.0.1:{port}");
    let server = ChatServer::start(&[
        ("ANTHROPIC_BASE_URL", dead.as_str()),
        ("UPSTREAM_PREWARM", "false"),
    ])
    .await;
    let resp = server.post_chat(None, &json!({"message": "hi"})).await;
    assert_eq!(resp.status(), 502);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["code"], "upstream_unreachable");

    // Headers and message_start arrive, then the model stalls: the
    // first-token deadline fires before anything was sent to the client.
    let sim = sim(0, 0.0, 5).await;
    let server = chat(&sim, &[("UPSTREAM_FIRST_TOKEN_TIMEOUT_MS", "300")]).await;
    let t = Instant::now();
    let resp = server
        .post_chat(
            None,
            &json!({"message": "hi", "model": "m+fault=stall-first:10000"}),
        )
        .await;
    assert_eq!(resp.status(), 504);
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["code"], "upstream_timeout");
}

#[tokio::test]
async fn mid_stream_failures_end_with_an_error_event_not_a_hang() {
    let sim = sim(0, 200.0, 10).await;
    let server = chat(&sim, &[("UPSTREAM_IDLE_TIMEOUT_MS", "300")]).await;
    let full = direct_answer(&sim, "claude-sim", None, "hi", 1024).await;
    let cases = [
        ("drop-mid@4", "upstream_disconnected"),
        ("error-mid@4", "upstream_overloaded"),
        ("stall-mid:10000@4", "upstream_timeout"),
    ];
    for (fault, code) in cases {
        let model = format!("claude-sim+fault={fault}");
        let resp = server
            .post_chat(None, &json!({"message": "hi", "model": model}))
            .await;
        assert_eq!(resp.status(), 200, "{fault}");
        let (events, transport_error) = read_sse(resp, Duration::from_secs(10)).await;
        assert_eq!(
            transport_error, None,
            "{fault}: the stream must end cleanly"
        );
        let k = kinds(&events);
        assert_eq!(k.first(), Some(&"meta"), "{fault}");
        let deltas = k.iter().filter(|k| **k == "delta").count();
        if fault.starts_with("drop") {
            // A token written just before the connection is cut may be
            // lost with it, as on a real network.
            assert!((1..=4).contains(&deltas), "{fault}: {k:?}");
        } else {
            assert_eq!(deltas, 4, "{fault}: {k:?}");
        }
        // What did arrive is the start of the real answer, nothing doubled.
        assert!(full.starts_with(&answer_text(&events)), "{fault}");
        assert!(!k.contains(&"done"), "{fault}");
        let last = events.last().unwrap();
        assert_eq!(last.event, "error", "{fault}");
        assert_eq!(last.data["code"], code, "{fault}: {}", last.data);
        assert!(last.data["message"].as_str().is_some());
    }
}

#[tokio::test]
async fn bad_inputs_get_4xx_json_and_never_reach_the_model() {
    let sim = sim(0, 0.0, 5).await;
    let server = chat(&sim, &[("MAX_BODY_BYTES", "2048")]).await;
    let client = reqwest::Client::new();
    let json_ct = "application/json";
    let big = format!("{{\"message\":\"{}\"}}", "x".repeat(4096));
    let cases: Vec<(&str, String, &str, u16, &str)> = vec![
        (
            "invalid json",
            "{\"message\":".into(),
            json_ct,
            400,
            "invalid_json",
        ),
        (
            "not an object",
            "\"hi\"".into(),
            json_ct,
            400,
            "invalid_json",
        ),
        (
            "missing message",
            "{}".into(),
            json_ct,
            400,
            "missing_field",
        ),
        (
            "empty message",
            r#"{"message":""}"#.into(),
            json_ct,
            400,
            "invalid_field",
        ),
        ("oversized body", big, json_ct, 413, "body_too_large"),
        (
            "max_tokens zero",
            r#"{"message":"x","max_tokens":0}"#.into(),
            json_ct,
            400,
            "invalid_field",
        ),
        (
            "max_tokens huge",
            r#"{"message":"x","max_tokens":100000000}"#.into(),
            json_ct,
            400,
            "invalid_field",
        ),
        (
            "max_tokens string",
            r#"{"message":"x","max_tokens":"5"}"#.into(),
            json_ct,
            400,
            "invalid_field",
        ),
        (
            "unknown field",
            r#"{"message":"x","stream":true}"#.into(),
            json_ct,
            400,
            "unknown_field",
        ),
        (
            "temperature",
            r#"{"message":"x","temperature":3}"#.into(),
            json_ct,
            400,
            "invalid_field",
        ),
        (
            "form body",
            "message=hi".into(),
            "application/x-www-form-urlencoded",
            415,
            "unsupported_media_type",
        ),
    ];
    for (name, body, ct, status, code) in cases {
        let resp = client
            .post(server.url("/chat"))
            .header("content-type", ct)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), status, "{name}");
        assert!(resp.headers().contains_key("x-request-id"), "{name}");
        assert!(resp.headers().contains_key("server-timing"), "{name}");
        let v: Value = resp
            .json()
            .await
            .unwrap_or_else(|e| panic!("{name}: body is not JSON: {e}"));
        assert_eq!(v["code"], code, "{name}: {v}");
        assert!(
            v["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{name}"
        );
    }
    // Wrong method and unknown route are JSON too.
    let r = client.get(server.url("/chat")).send().await.unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(
        r.json::<Value>().await.unwrap()["code"],
        "method_not_allowed"
    );
    let r = client.get(server.url("/nope")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.json::<Value>().await.unwrap()["code"], "not_found");

    assert_eq!(sim.calls(), 0, "bad input must not cost a model call");
    // And the server still serves good requests afterwards.
    let r = server
        .post_chat(None, &json!({"message": "still there?"}))
        .await;
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn request_id_is_echoed_when_valid_and_replaced_when_not() {
    let sim = sim(0, 0.0, 3).await;
    let server = chat(&sim, &[]).await;
    let client = reqwest::Client::new();
    let r = client
        .get(server.url("/health"))
        .header("x-request-id", "trace-abc_123")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "trace-abc_123");
    let r = client
        .get(server.url("/health"))
        .header("x-request-id", "bad id with spaces")
        .send()
        .await
        .unwrap();
    assert_ne!(r.headers()["x-request-id"], "bad id with spaces");
}

#[tokio::test]
async fn health_reports_the_model_and_probes_it_on_request() {
    let sim = sim(0, 0.0, 3).await;
    let server = chat(&sim, &[("UPSTREAM_MAX_RETRIES", "0")]).await;
    let client = reqwest::Client::new();
    let v: Value = client
        .get(server.url("/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["status"], "ok");
    assert_eq!(v["dependencies"]["anthropic"]["state"], "ok");
    let r = client
        .get(server.url("/health?probe=1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["dependencies"]["anthropic"]["probe"]["ok"], true);

    // After upstream failures the model shows as degraded; a dead upstream
    // fails the probe with 503.
    for _ in 0..3 {
        let r = server
            .post_chat(
                None,
                &json!({"message": "x", "model": "m+fault=status:500"}),
            )
            .await;
        assert_eq!(r.status(), 502);
    }
    let v: Value = client
        .get(server.url("/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["dependencies"]["anthropic"]["state"], "failing");
    assert_eq!(
        v["dependencies"]["anthropic"]["last_error"]["code"],
        "upstream_error"
    );
    assert_eq!(v["status"], "degraded");

    let url = sim.url();
    drop(sim);
    let server = ChatServer::start(&[
        ("ANTHROPIC_BASE_URL", url.as_str()),
        ("UPSTREAM_PREWARM", "false"),
    ])
    .await;
    let r = client
        .get(server.url("/health?probe=1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["status"], "down");
}

#[tokio::test]
async fn a_client_that_leaves_stops_the_upstream_call() {
    // 100 tokens at 5/s: 20 s of generation unless someone stops it.
    let sim = sim(0, 5.0, 100).await;
    let server = chat(&sim, &[]).await;
    let resp = server
        .post_chat(None, &json!({"message": "long answer please"}))
        .await;
    assert_eq!(resp.status(), 200);
    let mut stream = e2e::body_stream(resp);
    // Read until the first delta, then hang up.
    e2e::read_deltas(&mut stream, 1).await;
    drop(stream);
    let t = Instant::now();
    while sim.cancelled() == 0 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the model kept generating for a client that left"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(sim.completed(), 0);
}

#[tokio::test]
async fn twenty_concurrent_streams_each_get_their_own_complete_answer() {
    let sim = sim(20, 200.0, 15).await;
    // Twenty streams of one (dev) user: over MAX_STREAMS_PER_USER's default.
    let server = chat(&sim, &[("MAX_STREAMS_PER_USER", "0")]).await;
    let questions: Vec<String> = (0..20).map(|i| format!("question {i}")).collect();
    let answers = ask_at_once(&server, &questions).await;
    for (q, events) in questions.iter().zip(answers) {
        assert_eq!(events.last().unwrap().event, "done");
        let direct = direct_answer(&sim, "claude-sonnet-4-5", None, q, 1024).await;
        assert_eq!(answer_text(&events), direct, "{q}");
    }
}

#[tokio::test]
async fn the_model_connection_is_prewarmed_and_reused() {
    let sim = sim(0, 0.0, 3).await;
    let server = chat(&sim, &[]).await;
    // Pre-warm at init: one connection opened before any user request.
    assert_eq!(sim.model_lists(), 1);
    assert_eq!(sim.connections(), 1);
    for i in 0..10 {
        let resp = server
            .post_chat(None, &json!({"message": format!("q{i}")}))
            .await;
        let (events, _) = read_sse(resp, LIMIT).await;
        assert_eq!(events.last().unwrap().event, "done");
    }
    // Ten sequential requests later, still that one connection.
    assert_eq!(
        sim.connections(),
        1,
        "chat-stream opened a new connection per request"
    );

    let sim = self::sim(0, 0.0, 3).await;
    let url = sim.url();
    let _server = ChatServer::start(&[
        ("ANTHROPIC_BASE_URL", url.as_str()),
        ("UPSTREAM_PREWARM", "false"),
    ])
    .await;
    assert_eq!(sim.model_lists(), 0);
    assert_eq!(sim.connections(), 0);
}

/// `UPSTREAM_HTTP2_PRIOR_KNOWLEDGE=true` against model-sim's h2c: ten
/// answers streaming at once share one connection, each is complete, and a
/// client that leaves stops its own upstream stream and no other.
#[tokio::test]
async fn with_http2_prior_knowledge_concurrent_answers_share_one_connection() {
    // 20 tokens at 20/s: each answer streams for about a second.
    let sim = sim(0, 20.0, 20).await;
    let server = chat(&sim, H2C_MANY_STREAMS).await;
    // The one that leaves: it reads one delta and hangs up while the
    // others stream.
    let leaver = server
        .post_chat(None, &json!({"message": "a question left early"}))
        .await;
    assert_eq!(leaver.status(), 200);
    let mut leaver = e2e::body_stream(leaver);
    e2e::read_deltas(&mut leaver, 1).await;
    let questions: Vec<String> = (0..10).map(|i| format!("multiplexed {i}")).collect();
    let others = {
        let server = &server;
        let questions = &questions;
        async move { ask_at_once(server, questions).await }
    };
    let (answers, ()) = tokio::join!(others, async move { drop(leaver) });
    // The pre-warm's connection carried all eleven.
    assert_eq!(
        sim.connections(),
        1,
        "each answer opened its own model connection"
    );
    let t = Instant::now();
    while sim.cancelled() == 0 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the leaver's stream was not stopped"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(sim.cancelled(), 1, "the leaver's stream, and only it");
    assert_eq!(sim.completed(), 10);
    // Each is the model's own answer to its question (asked directly, at
    // once: each takes a second).
    let direct = futures_util::future::join_all(
        questions
            .iter()
            .map(|q| direct_answer(&sim, "claude-sonnet-4-5", None, q, 1024)),
    )
    .await;
    for ((q, events), direct) in questions.iter().zip(answers).zip(direct) {
        assert_eq!(events.last().unwrap().event, "done", "{q}");
        assert_eq!(answer_text(&events), direct, "{q}");
    }

    // Without the setting, answers streaming at once need a connection each.
    let sim = self::sim(0, 20.0, 20).await;
    let server = chat(&sim, &[("MAX_STREAMS_PER_USER", "0")]).await;
    let questions: Vec<String> = (0..4).map(|i| format!("one each {i}")).collect();
    for events in ask_at_once(&server, &questions).await {
        assert_eq!(events.last().unwrap().event, "done");
    }
    assert!(sim.connections() >= 4, "{} connections", sim.connections());
}

/// Small SSE frames from many answers at once on one HTTP/2 connection:
/// h2 charges each unread small DATA frame against a budget of half the
/// connection window and closes the connection (`ENHANCE_YOUR_CALM`) when
/// it runs out. With a 64 KiB window (what adaptive windows start at) a
/// few hundred unread deltas across the answers were enough to fail them
/// all with `upstream_disconnected`.
#[tokio::test]
async fn with_http2_twenty_fast_answers_at_once_all_complete() {
    // 300 tokens each, as fast as the sim can send them.
    let sim = sim(0, 0.0, 300).await;
    let server = chat(&sim, H2C_MANY_STREAMS).await;
    for round in 0..3 {
        let questions: Vec<String> = (0..20).map(|i| format!("fast {round} {i}")).collect();
        for events in ask_at_once(&server, &questions).await {
            let last = events.last().unwrap();
            assert_eq!(last.event, "done", "round {round}: {}", last.data);
            assert_eq!(answer_text(&events).split_whitespace().count(), 300);
        }
    }
    assert_eq!(sim.connections(), 1);
}

/// A client (a proxy in front, say) that speaks HTTP/2 with prior
/// knowledge gets its answers multiplexed on one connection, more at once
/// than hyper's default limit of 200 streams per connection: 250 answers
/// held at their first token all reach the model before any ends.
#[tokio::test]
async fn clients_over_h2c_share_one_connection_beyond_hypers_default() {
    let sim = sim(2000, 1000.0, 5).await;
    let server = chat(&sim, H2C_MANY_STREAMS).await;
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let asks: Vec<_> = (0..250)
        .map(|i| {
            let (h2, url) = (h2.clone(), server.url("/chat"));
            tokio::spawn(async move {
                let resp = h2
                    .post(url)
                    .header("x-dev-user", format!("h2-{}", i % 5))
                    .json(&json!({"message": format!("multiplexed client {i}")}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(resp.version(), reqwest::Version::HTTP_2);
                assert_eq!(resp.status(), 200);
                read_sse(resp, LIMIT).await.0
            })
        })
        .collect();
    let t = Instant::now();
    while sim.calls() < 250 {
        assert_eq!(
            sim.completed(),
            0,
            "{} of 250 reached the model",
            sim.calls()
        );
        assert!(
            t.elapsed() < LIMIT,
            "{} of 250 reached the model",
            sim.calls()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for a in futures_util::future::join_all(asks).await {
        let events = a.unwrap();
        assert_eq!(events.last().unwrap().event, "done");
        assert_eq!(answer_text(&events).split_whitespace().count(), 5);
    }
}

/// Every response, streamed or not, success or error: nosniff, no
/// referrer, and never stored by a browser or a shared cache.
#[tokio::test]
async fn every_response_carries_the_security_headers() {
    let sim = sim(0, 2000.0, 5).await;
    let server = chat(&sim, &[]).await;
    let http = reqwest::Client::new();
    let responses = vec![
        ("answer", server.post_chat(Some("hdr"), &json!({"message": "hi"})).await),
        ("bad input", server.post_chat(Some("hdr"), &json!({"nope": 1})).await),
        ("health", http.get(server.url("/health")).send().await.unwrap()),
        ("unknown route", http.get(server.url("/nope")).send().await.unwrap()),
        (
            "openai route",
            http.post(server.url("/v1/chat/completions"))
                .header("x-dev-user", "hdr")
                .json(&json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": true}))
                .send()
                .await
                .unwrap(),
        ),
        (
            "resume of an unknown stream",
            http.get(server.url("/chat/streams/abc"))
                .header("x-dev-user", "hdr")
                .send()
                .await
                .unwrap(),
        ),
    ];
    for (what, r) in responses {
        let h = r.headers();
        assert_eq!(h["x-content-type-options"], "nosniff", "{what}");
        assert_eq!(h["referrer-policy"], "no-referrer", "{what}");
        let cc = h["cache-control"].to_str().unwrap();
        assert!(cc.contains("no-store"), "{what}: {cc}");
    }
}

/// Public `/health` says only that the service is up; the dependencies
/// and live probes need credentials, and a probe's answer is reused for a
/// few seconds (it cannot be turned into load on the provider).
#[tokio::test]
async fn health_tells_strangers_only_that_it_is_up_and_probes_are_reused() {
    let sim = sim(0, 2000.0, 5).await;
    let key = "ck_health_key";
    let hashes = format!("{}:ops", chat_core::auth::hash_key(key));
    let server = chat(
        &sim,
        &[
            ("AUTH_MODE", "api_key"),
            ("API_KEY_HASHES", hashes.as_str()),
        ],
    )
    .await;
    let http = reqwest::Client::new();
    let public = http.get(server.url("/health")).send().await.unwrap();
    assert_eq!(public.status(), 200);
    let v: Value = public.json().await.unwrap();
    assert_eq!(v, json!({"status": "up"}));
    let r = http
        .get(server.url("/health?probe=1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "a probe needs credentials");
    let r = http
        .get(server.url("/health"))
        .bearer_auth("ck_wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"status": "up"}));

    let full: Value = http
        .get(server.url("/health"))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(full["dependencies"]["auth"]["method"], "api_key");
    let before = sim.model_lists() + sim.connections();
    let first: Value = http
        .get(server.url("/health?probe=1"))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(first["dependencies"]["anthropic"]["probe"]["ok"], true);
    assert_eq!(first["probe_age_ms"], 0.0);
    let after_first = sim.model_lists() + sim.connections();
    assert!(after_first > before, "the first probe reached the provider");
    let second: Value = http
        .get(server.url("/health?probe=1"))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(second["probe_age_ms"].as_f64().unwrap() > 0.0, "{second}");
    assert_eq!(
        sim.model_lists() + sim.connections(),
        after_first,
        "a second probe within the reuse window costs the provider nothing"
    );
}

#[tokio::test]
async fn model_sim_can_echo_and_markup_in_an_answer_is_json_text() {
    let sim = sim(1, 2000.0, 50).await;
    let server = chat(&sim, &[]).await;
    let markup = "<img src=x onerror=alert(1)> and <script>alert(2)</script>";
    let resp = server
        .post_chat(
            None,
            &json!({"message": markup, "model": "claude-sim+echo=1"}),
        )
        .await;
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let (events, _) = read_sse(resp, LIMIT).await;
    assert!(events.iter().filter(|e| e.event == "delta").count() >= 5);
    assert_eq!(e2e::answer_text(&events), markup);
}

/// Locally, under `AUTH_MODE=dev`, a page on another origin may send
/// `x-dev-user` (the page's dev mode); with real credentials it may not:
/// the list is then the template's.
#[tokio::test]
async fn a_dev_mode_preflight_allows_the_dev_user_header_and_only_then() {
    let sim = sim(1, 2000.0, 3).await;
    let origin = "http://127.0.0.1:5173";
    for (auth, allowed) in [("dev", true), ("api_key", false)] {
        let key = format!("{}:u", chat_core::auth::hash_key("k"));
        let server = chat(
            &sim,
            &[
                ("CORS_ALLOW_ORIGINS", origin),
                ("AUTH_MODE", auth),
                ("API_KEY_HASHES", key.as_str()),
            ],
        )
        .await;
        let r = reqwest::Client::new()
            .request(reqwest::Method::OPTIONS, server.url("/chat"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "content-type,x-dev-user")
            .send()
            .await
            .unwrap();
        let allow = r
            .headers()
            .get("access-control-allow-headers")
            .map(|v| v.to_str().unwrap().to_ascii_lowercase())
            .unwrap_or_default();
        assert_eq!(allow.contains("x-dev-user"), allowed, "{auth}: {allow}");
        assert!(allow.contains("content-type"), "{auth}: {allow}");
    }
}
