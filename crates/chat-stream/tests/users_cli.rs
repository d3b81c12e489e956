//! `chat-stream users erase --user ID`, run as the real binary against the
//! table in moto and a Redis of its own, after the user chatted through
//! the server: nothing of theirs is readable afterwards (conversations,
//! usage, keys, popularity records, cached answers), and another user's
//! data is untouched.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use e2e::{ChatServer, LocalAws, RedisServer, read_sse, sim};
use serde_json::{Value, json};

async fn ask(server: &ChatServer, user: &str, message: &str) -> (String, String) {
    let resp = server
        .post_chat(Some(user), &json!({"message": message, "temperature": 0}))
        .await;
    assert_eq!(resp.status(), 200);
    let x_cache = resp.headers()["x-cache"].to_str().unwrap().to_owned();
    let conv = resp.headers()["x-conversation-id"]
        .to_str()
        .unwrap()
        .to_owned();
    read_sse(resp, std::time::Duration::from_secs(10)).await;
    (x_cache, conv)
}

async fn list(server: &ChatServer, user: &str) -> Value {
    reqwest::Client::new()
        .get(server.url("/conversations"))
        .header("x-dev-user", user)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn erasing_a_user_leaves_nothing_of_theirs_readable() {
    e2e::require_aws_endpoint();
    let aws = LocalAws::create(&[]).await;
    let redis = RedisServer::start().await;
    let sim = sim(0, 2000.0, 6).await;
    let (url, redis_url) = (sim.url(), redis.url());
    let server = ChatServer::start(&[
        ("ANTHROPIC_BASE_URL", url.as_str()),
        ("TABLE_NAME", aws.table.as_str()),
        ("REDIS_URL", redis_url.as_str()),
        ("REDIS_TIMEOUT_MS", "1000"),
        // The instance's copy of an answer outlives its erasure by this
        // much (README "Erasing a user").
        ("CACHE_LOCAL_TTL_SECS", "1"),
    ])
    .await;
    let store = aws.store().await;
    let id = uuid_like();
    let (ann, bob) = (
        format!("ann-{}", &id[id.len() - 8..]),
        format!("bob-{}", &id[id.len() - 8..]),
    );
    let (x1, _) = ask(&server, &ann, "first private question").await;
    let (x2, _) = ask(&server, &ann, "second private question").await;
    assert_eq!((x1.as_str(), x2.as_str()), ("miss", "miss"));
    assert_eq!(ask(&server, &ann, "first private question").await.0, "hit");
    let (_, bob_conv) = ask(&server, &bob, "bob asks").await;
    let key_out = tokio::process::Command::new(env!("CARGO_BIN_EXE_chat-stream"))
        .args(["keys", "create", "--user", ann.as_str()])
        .env("TABLE_NAME", &aws.table)
        .output()
        .await
        .unwrap();
    let key = String::from_utf8_lossy(&key_out.stdout).trim().to_owned();
    let hash = chat_core::auth::hash_key(&key);
    assert_eq!(
        store.lookup_api_key(&hash).await.unwrap().as_deref(),
        Some(ann.as_str())
    );
    let day = chat_core::util::utc_day(chat_core::util::now_ms());
    assert!(store.usage(&ann, &day).await.unwrap().0 > 0);
    assert_eq!(
        list(&server, &ann).await["conversations"]
            .as_array()
            .unwrap()
            .len(),
        3
    );

    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_chat-stream"))
        .args(["users", "erase", "--user", ann.as_str()])
        .env("TABLE_NAME", &aws.table)
        .env("REDIS_URL", &redis_url)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["conversations"], 3, "{report}");
    assert_eq!(report["api_keys"], 1, "{report}");
    assert_eq!(report["popular_questions"], 2, "{report}");
    assert_eq!(report["cached_answers_deleted"], true, "{report}");

    assert_eq!(list(&server, &ann).await["conversations"], json!([]));
    assert_eq!(store.usage(&ann, &day).await.unwrap(), (0, 0, 0));
    assert_eq!(store.lookup_api_key(&hash).await.unwrap(), None);
    assert!(store.list_api_keys(&ann).await.unwrap().is_empty());
    // The cached answer is gone: once the server's copy of it has passed
    // its CACHE_LOCAL_TTL_SECS, the same question is a miss again.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let calls = sim.calls();
    assert_eq!(ask(&server, &ann, "first private question").await.0, "miss");
    assert_eq!(sim.calls(), calls + 1);
    // Bob is untouched.
    let bobs = list(&server, &bob).await;
    assert_eq!(bobs["conversations"][0]["id"], bob_conv.as_str(), "{bobs}");

    // Usage without a subcommand or user is a clear error.
    let bad = tokio::process::Command::new(env!("CARGO_BIN_EXE_chat-stream"))
        .args(["users", "erase"])
        .env("TABLE_NAME", &aws.table)
        .output()
        .await
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
}

fn uuid_like() -> String {
    format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}
