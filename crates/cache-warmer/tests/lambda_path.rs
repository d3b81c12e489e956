//! The real `cache-warmer` binary under the Lambda runtime: a local Runtime
//! API hands it the EventBridge schedule event from `events/`, and the
//! function's result is the run's report. Against a real Redis and
//! model-sim.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use chat_core::cache::popular::{Popularity, PopularityConfig};
use chat_core::cache::{KeyInput, RedisCache, ResponseCache, cache_doc, key_of_doc};
use chat_core::provider::{Message, Role};
use chat_core::redis::RedisLink;
use e2e::{FakeRuntimeApi, RedisServer, event_file, sim};

#[tokio::test]
async fn a_scheduled_event_refreshes_a_popular_entry_and_reports_it() {
    let redis = RedisServer::start().await;
    let sim = sim(5, 2000.0, 12).await;
    let link = Arc::new(RedisLink::new(&redis.url(), Duration::from_secs(1), false).unwrap());
    // What chat-stream records when a question is asked.
    let messages = [Message {
        role: Role::User,
        content: "what should stay warm?".into(),
    }];
    let doc = cache_doc(&KeyInput {
        scope: "user:example-user",
        provider: "anthropic",
        model: "claude-sim",
        system: None,
        messages: &messages,
        max_tokens: 32,
        temperature: Some(0.0),
        stop: &[],
    });
    let key = key_of_doc(&doc);
    let popular = Popularity::new(
        link.clone(),
        Duration::from_secs(1),
        PopularityConfig {
            max_entries: 100,
            half_life: Duration::from_secs(3600),
        },
    );
    popular.record(&key, &doc).await;

    let runtime = FakeRuntimeApi::start().await;
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_cache-warmer"))
        .env_clear()
        .env("AWS_LAMBDA_RUNTIME_API", runtime.endpoint())
        .env("AWS_LAMBDA_FUNCTION_NAME", "cache-warmer")
        .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "256")
        .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
        .env("AWS_REGION", "us-east-1")
        .env("ANTHROPIC_BASE_URL", sim.url())
        .env("ANTHROPIC_API_KEY", "test-key")
        .env("DEFAULT_MODEL", "claude-sim")
        .env("MODEL_ALLOWLIST", "*")
        .env("REDIS_URL", redis.url())
        .env("REDIS_TIMEOUT_MS", "1000")
        .env(
            "API_KEY_HASHES",
            "92d6376288da154534b93448f4e79fc1e9bd83f3cf398ad65f74212a4626523c:example-user",
        )
        .env("WARM_MAX_CALLS", "5")
        .env("LOG_LEVEL", "warn")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start cache-warmer");

    let inv = runtime
        .invoke(
            event_file("cache-warmer-schedule.json"),
            Duration::from_secs(30),
        )
        .await;
    assert!(inv.error.is_none(), "handler error: {:?}", inv.error);
    let report = &inv.prelude;
    assert_eq!(report["considered"], 1, "{report}");
    assert_eq!(report["refreshed"], 1, "{report}");
    assert_eq!(report["model_calls"], 1);
    assert_eq!(report["entries"][0]["key"], key.as_str());
    assert_eq!(sim.calls(), 1);
    let cache = RedisCache::new(link, Duration::from_secs(1));
    let stored = cache.get(&key).await.unwrap().unwrap();
    assert!(!stored.text.is_empty());

    // The next run finds it fresh and calls nothing.
    let inv = runtime
        .invoke(
            event_file("cache-warmer-schedule.json"),
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(inv.prelude["fresh"], 1, "{}", inv.prelude);
    assert_eq!(sim.calls(), 1);
    drop(child);
}
