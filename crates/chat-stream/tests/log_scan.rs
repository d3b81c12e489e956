//! No log line carries a secret, a credential or what a user wrote: the
//! real binary at `LOG_LEVEL=debug` (its most talkative), with Redis, the
//! table and the queue, is sent known strings (`tests/planted.txt`) down
//! every path (answers, cache hits, history, the OpenAI route, bad keys,
//! bad bodies, over-long messages, a model key the model refuses), and
//! its whole log is searched for them. The request ids, which must be
//! logged, prove the log was captured at all.
//!
//! The log is also left in `target/test-logs/`, where `make test` searches
//! it again with every other captured log of the run
//! (`scripts/log-scan.sh`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use e2e::{LocalAws, read_sse};
use model_sim::{Knobs, Sim, SimConfig};
use serde_json::{Value, json};

const PLANTED: &str = include_str!("../../../tests/planted.txt");

/// The planted strings, one per line (comments start with `#`).
fn planted() -> Vec<&'static str> {
    PLANTED
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect()
}

fn find(name: &str) -> &'static str {
    planted()
        .into_iter()
        .find(|p| p.contains(name))
        .unwrap_or_else(|| panic!("tests/planted.txt has no {name} line"))
}

struct Child(tokio::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.start_kill();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn sha256_hex(s: &str) -> String {
    use sha2::{Digest, Sha256};
    format!("{:x}", Sha256::digest(s.as_bytes()))
}

#[tokio::test]
async fn no_log_line_carries_a_secret_a_credential_or_a_message() {
    e2e::require_aws_endpoint();
    // A Redis of its own: a shared one would remember the last run's answer.
    let redis = e2e::RedisServer::start().await;
    let redis_url = redis.url();
    let aws = LocalAws::create(&[]).await;
    let model_key = find("model-key");
    let api_key = find("api-key");
    let bad_key = find("wrong-key");
    let message = find("message-text");
    let system = find("system-text");
    let follow_up = find("follow-up-text");
    let openai_text = find("openai-text");
    let field_value = find("field-value");
    let sim = Sim::start(SimConfig {
        knobs: Knobs {
            ttft: Duration::from_millis(1),
            tokens_per_sec: 2000.0,
            output_tokens: 8,
            fault: None,
            fault_times: None,
            echo: false,
        },
        api_key: Some(model_key.to_owned()),
    })
    .await
    .unwrap();
    let port = free_port();
    let logs = e2e::repo_root().join("target/test-logs");
    std::fs::create_dir_all(&logs).unwrap();
    let log_path = logs.join("log_scan-chat-stream.log");
    let log_file = std::fs::File::create(&log_path).unwrap();
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_chat-stream"))
        .env_clear()
        .envs(std::env::vars().filter(|(k, _)| k.starts_with("AWS_") || k == "PATH" || k == "HOME"))
        .env("BIND_ADDR", format!("127.0.0.1:{port}"))
        .env("LOG_LEVEL", "debug")
        .env("ANTHROPIC_BASE_URL", sim.url())
        .env("ANTHROPIC_API_KEY", model_key)
        .env("AUTH_MODE", "api_key")
        .env(
            "API_KEY_HASHES",
            // Lines name users only by their pseudonym (obs::pseudonym).
            format!("{}:{}", sha256_hex(api_key), find("planted-user-id")),
        )
        .env("TABLE_NAME", &aws.table)
        .env("TURN_QUEUE_URL", &aws.queue_url)
        .env("REDIS_URL", &redis_url)
        .env("REDIS_TIMEOUT_MS", "1000")
        .env("MODEL_ALLOWLIST", "*")
        .stdout(log_file.try_clone().unwrap())
        .stderr(log_file)
        .kill_on_drop(true)
        .spawn()
        .expect("start chat-stream");
    let child = Child(child);
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let t = std::time::Instant::now();
    while client.get(format!("{base}/health")).send().await.is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "chat-stream did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut n = 0;
    let mut rid = || {
        n += 1;
        format!("planted-rid-{n}")
    };
    let post = |path: &str, key: &str, body: Vec<u8>, id: String| {
        client
            .post(format!("{base}{path}"))
            .bearer_auth(key)
            .header("content-type", "application/json")
            .header("x-request-id", id)
            .body(body)
            .send()
    };
    let chat = json!({"message": message, "system": system, "temperature": 0});
    // An answer, then the same question again (a cache hit).
    let mut conversation = String::new();
    for expect in ["miss", "hit"] {
        let r = post("/chat", api_key, chat.to_string().into(), rid())
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-cache"], expect);
        conversation = r.headers()["x-conversation-id"]
            .to_str()
            .unwrap()
            .to_owned();
        let (events, _) = read_sse(r, Duration::from_secs(10)).await;
        assert_eq!(events.last().unwrap().event, "done");
    }
    // The conversation continued (its history read back), listed, shown.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let more = json!({"message": follow_up, "conversation_id": conversation});
    let r = post("/chat", api_key, more.to_string().into(), rid())
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    read_sse(r, Duration::from_secs(10)).await;
    for path in [
        "/conversations".to_owned(),
        format!("/conversations/{conversation}"),
    ] {
        let r = client
            .get(format!("{base}{path}"))
            .bearer_auth(api_key)
            .header("x-request-id", rid())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    // The OpenAI-compatible route, streamed and not.
    for stream in [true, false] {
        let body = json!({"model": "sim-model", "stream": stream,
                          "messages": [{"role": "system", "content": system},
                                       {"role": "user", "content": openai_text}]});
        let r = post(
            "/v1/chat/completions",
            api_key,
            body.to_string().into(),
            rid(),
        )
        .await
        .unwrap();
        assert_eq!(r.status(), 200);
        let _ = r.bytes().await;
    }
    // Refusals: a wrong key, a bad body naming a field with a planted
    // value, bad JSON around planted text, an over-long message.
    let r = post("/chat", bad_key, chat.to_string().into(), rid())
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = client
        .get(format!("{base}/health?probe=1"))
        .header("x-api-key", bad_key)
        .header("x-request-id", rid())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let unknown = json!({"message": message, "mystery": field_value});
    let r = post("/chat", api_key, unknown.to_string().into(), rid())
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let broken = format!("{{\"message\": \"{message} {field_value}");
    let r = post("/chat", api_key, broken.into(), rid()).await.unwrap();
    assert_eq!(r.status(), 400);
    let long = json!({"message": message.repeat(100_000 / message.len() + 1)});
    let r = post("/chat", api_key, long.to_string().into(), rid())
        .await
        .unwrap();
    assert!(r.status().is_client_error());
    let body: Value = r.json().await.unwrap();
    assert!(body["code"].is_string());
    // The model refuses our key: the upstream error path and a re-read of
    // the key (a literal here, so nothing changes) both log.
    let refused = json!({"message": message, "model": "claude-sim+fault=status:401"});
    let r = post("/chat", api_key, refused.to_string().into(), rid())
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["code"], "upstream_auth_failed");
    // An answer that fails half-way (an error event mid-stream).
    let failing = json!({"message": follow_up, "model": "claude-sim+fault=error-mid@3"});
    let r = post("/chat", api_key, failing.to_string().into(), rid())
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (events, _) = read_sse(r, Duration::from_secs(10)).await;
    assert_eq!(events.last().unwrap().event, "error");
    // Let the turns reach the queue and the writes log what they log.
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(child);
    tokio::time::sleep(Duration::from_millis(200)).await;

    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        log.contains("planted-rid-1") && log.contains(&format!("planted-rid-{}", n)),
        "the log was not captured at debug level ({} bytes)",
        log.len()
    );
    let mut found = Vec::new();
    for p in planted() {
        for (i, line) in log.lines().enumerate() {
            if line.contains(p) {
                found.push(format!("line {}: planted string #{} ", i + 1, p.len()));
            }
        }
    }
    assert!(
        found.is_empty(),
        "planted strings in {}: {found:?}",
        log_path.display()
    );
}
