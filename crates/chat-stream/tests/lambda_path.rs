//! The real `chat-stream` binary under the Lambda runtime: a local Runtime
//! API hands it the Function URL events from `events/`, the binary answers
//! through lambda_http's streaming adapter, and we read what Lambda would
//! relay to the caller.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use e2e::{FakeRuntimeApi, answer_text, event_file};
use model_sim::{Knobs, Sim, SimConfig};
use serde_json::Value;

struct Child(tokio::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.start_kill();
    }
}

async fn start_function(runtime: &FakeRuntimeApi, sim: &Sim) -> Child {
    start_function_with(runtime, sim, &[]).await
}

async fn start_function_with(runtime: &FakeRuntimeApi, sim: &Sim, extra: &[(&str, &str)]) -> Child {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_chat-stream"));
    let child = runtime
        .environment(&mut cmd, "chat-stream", 1024)
        .envs(extra.iter().copied())
        .env("ANTHROPIC_BASE_URL", sim.url())
        .env("ANTHROPIC_API_KEY", "test-key")
        // The events carry `Authorization: Bearer ck_local_example_key_do_not_use_in_production`.
        .env(
            "API_KEY_HASHES",
            "92d6376288da154534b93448f4e79fc1e9bd83f3cf398ad65f74212a4626523c:example-user",
        )
        .env("LOG_LEVEL", "warn")
        .spawn()
        .expect("start chat-stream");
    Child(child)
}

#[tokio::test]
async fn function_url_events_stream_through_the_lambda_adapter() {
    // 15 tokens at 15/s: about a second of generation after the first token.
    let sim = Sim::start(SimConfig {
        knobs: Knobs {
            ttft: Duration::from_millis(50),
            tokens_per_sec: 15.0,
            output_tokens: 15,
            fault: None,
            fault_times: None,
            echo: false,
        },
        api_key: Some("test-key".into()),
    })
    .await
    .unwrap();
    let runtime = FakeRuntimeApi::start().await;
    let _function = start_function(&runtime, &sim).await;
    let limit = Duration::from_secs(30);

    // A valid chat request streams meta, deltas, done.
    let inv = runtime.invoke(event_file("chat-valid.json"), limit).await;
    assert_eq!(inv.mode.as_deref(), Some("streaming"));
    assert_eq!(inv.status(), 200, "{:?}", inv.prelude);
    let headers = &inv.prelude["headers"];
    assert!(
        headers["content-type"]
            .as_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    assert!(headers["x-request-id"].is_string());
    assert!(
        headers["server-timing"]
            .as_str()
            .unwrap()
            .contains("ttft;dur=")
    );
    let events = inv.events();
    let kinds: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(kinds.first(), Some(&"meta"));
    assert_eq!(kinds.last(), Some(&"done"), "{kinds:?}");
    assert_eq!(kinds.iter().filter(|k| **k == "delta").count(), 15);
    assert_eq!(events.last().unwrap().data["usage"]["output_tokens"], 15);
    assert!(!answer_text(&events).is_empty());
    // The binary turned Nagle's algorithm off on its Runtime API
    // connection (the runtime client leaves it on; see
    // chat_core::runtime_api).
    let pid = _function.0.id().unwrap();
    let nodelay = runtime.nodelay_of(pid);
    assert!(
        !nodelay.is_empty() && nodelay.iter().all(|on| *on),
        "TCP_NODELAY of the function's Runtime API sockets: {nodelay:?}"
    );
    // Streamed, not buffered: the first delta reached the runtime API well
    // before the answer ended (generation takes ~0.93 s after it).
    let first = events.iter().find(|e| e.event == "delta").unwrap();
    let gap = events.last().unwrap().at - first.at;
    assert!(
        gap >= Duration::from_millis(700),
        "first delta only {gap:?} before done"
    );

    // The request the model got came from the event's body.
    let sent = sim.requests();
    let last = sent.last().unwrap();
    assert_eq!(last["max_tokens"], 256);
    assert!(
        last["messages"][0]["content"]
            .as_str()
            .unwrap()
            .contains("streaming")
    );

    // Bad input through the same path: 400 with a JSON body naming it.
    let inv = runtime.invoke(event_file("chat-invalid.json"), limit).await;
    assert_eq!(inv.status(), 400, "{:?}", inv.prelude);
    let body: Value = serde_json::from_str(&inv.body_text()).unwrap();
    assert_eq!(body["field"], "message");
    let inv = runtime
        .invoke(event_file("chat-unknown-field.json"), limit)
        .await;
    assert_eq!(inv.status(), 400);
    let body: Value = serde_json::from_str(&inv.body_text()).unwrap();
    assert_eq!(body["code"], "unknown_field");

    // Health: public, only "up"; with credentials, the dependencies.
    let inv = runtime.invoke(event_file("health.json"), limit).await;
    assert_eq!(inv.status(), 200);
    let body: Value = serde_json::from_str(&inv.body_text()).unwrap();
    assert_eq!(body, serde_json::json!({"status": "up"}));
    let inv = runtime
        .invoke(event_file("health-authorized.json"), limit)
        .await;
    assert_eq!(inv.status(), 200);
    let body: Value = serde_json::from_str(&inv.body_text()).unwrap();
    assert_eq!(body["dependencies"]["anthropic"]["state"], "ok");
}

/// Lambda freezes the environment when the response ends, so everything
/// an answer leaves behind must be written before: with Redis, its live
/// stream (for resume and followers) holds every event the moment the
/// invocation's response is complete.
#[tokio::test]
async fn with_redis_the_live_stream_is_complete_when_the_invocation_ends() {
    let redis = e2e::RedisServer::start().await;
    let sim = e2e::sim(20, 200.0, 15).await;
    let runtime = FakeRuntimeApi::start().await;
    let url = redis.url();
    let _function = start_function_with(&runtime, &sim, &[("REDIS_URL", url.as_str())]).await;
    let inv = runtime
        .invoke(event_file("chat-valid.json"), Duration::from_secs(30))
        .await;
    assert_eq!(inv.status(), 200, "{:?}", inv.prelude);
    let events = inv.events();
    assert_eq!(events.last().unwrap().event, "done");
    let stream_id = events[0].data["stream_id"].as_str().unwrap().to_owned();
    // Read at once: no waiting for a background task to catch up.
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    // An entry holds the events written together: `i e d i e d ...`.
    let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(format!("live:{{{stream_id}}}"))
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    let ids: Vec<u64> = entries
        .iter()
        .flat_map(|(_, fields)| fields.iter().filter(|(k, _)| k == "i"))
        .map(|(_, v)| v.parse().unwrap())
        .collect();
    let want: Vec<u64> = (1..=events.len() as u64).collect();
    assert_eq!(ids, want, "every event, meta to done, in order");
}
