//! The clients our users already have, against the real thing: the
//! official `openai` and `anthropic` Python SDKs (in the test venv, see
//! requirements-dev.txt) and the Vercel AI SDK and `openai` npm packages
//! (tests/clients/package-lock.json), driven against chat-stream's
//! OpenAI-compatible route and against model-sim. `make test` installs
//! both; the tests themselves are in `tests/clients/`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

use e2e::{ChatServer, RedisServer, repo_root, sim};

const KEY: &str = "ck_sdk_client_key";

/// chat-stream as deployed with Redis: API keys, limits, cache, live streams.
async fn stack() -> (ChatServer, model_sim::Sim, RedisServer) {
    let redis = RedisServer::start().await;
    let sim = sim(0, 1000.0, 40).await;
    let hashes = format!("{}:sdk-user", chat_core::auth::hash_key(KEY));
    let (url, redis_url) = (sim.url(), redis.url());
    let server = ChatServer::start(&[
        ("ANTHROPIC_BASE_URL", url.as_str()),
        ("AUTH_MODE", "api_key"),
        ("API_KEY_HASHES", hashes.as_str()),
        ("REDIS_URL", redis_url.as_str()),
        ("REDIS_TIMEOUT_MS", "1000"),
        ("DEFAULT_MODEL", "sim-sdk"),
    ])
    .await;
    (server, sim, redis)
}

fn need(path: PathBuf, what: &str) -> PathBuf {
    assert!(
        path.exists(),
        "{} is missing: {what} (make test installs it)",
        path.display()
    );
    path
}

async fn run(mut cmd: tokio::process::Command, server: &ChatServer, sim: &model_sim::Sim) {
    let out = cmd
        .env("CHAT_URL", server.url(""))
        .env("CHAT_KEY", KEY)
        .env("SIM_URL", sim.url())
        .env("SIM_KEY", "test-key")
        .output()
        .await
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}");
    assert!(out.status.success(), "{text}");
}

#[tokio::test]
async fn the_official_python_sdks() {
    let (server, sim, _redis) = stack().await;
    let root = repo_root();
    let python = need(root.join(".venv/bin/python"), "the test venv");
    let mut cmd = tokio::process::Command::new(python);
    cmd.current_dir(&root).args([
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "tests/clients/test_python_sdks.py",
    ]);
    run(cmd, &server, &sim).await;
}

#[tokio::test]
async fn the_vercel_ai_sdk_and_the_openai_npm_package() {
    let (server, sim, _redis) = stack().await;
    let dir = repo_root().join("tests/clients");
    need(
        dir.join("node_modules/ai"),
        "the npm packages of tests/clients",
    );
    let mut cmd = tokio::process::Command::new("node");
    cmd.current_dir(&dir).args(["--test", "js_sdks.test.mjs"]);
    run(cmd, &server, &sim).await;
}
