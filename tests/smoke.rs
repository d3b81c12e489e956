//! `make smoke` (scripts/smoke.py), the check users run against their
//! deployed URL, run here against the local server with the deployed
//! shape: API keys, Redis (limits, cache, live streams), the table in moto
//! (direct writes), CORS for one allowed origin.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use e2e::{ChatServer, LocalAws, RedisServer, repo_root, require_aws_endpoint, sim};

#[tokio::test]
async fn make_smoke_passes_against_the_local_server() {
    require_aws_endpoint();
    let aws = LocalAws::create(&[]).await;
    let redis = RedisServer::start().await;
    let sim = sim(20, 200.0, 12).await;
    let key = "ck_smoke_test_key";
    let hashes = format!("{}:smoke-user", chat_core::auth::hash_key(key));
    let (url, redis_url) = (sim.url(), redis.url());
    let server = ChatServer::start(&[
        ("ANTHROPIC_BASE_URL", url.as_str()),
        ("AUTH_MODE", "api_key"),
        ("API_KEY_HASHES", hashes.as_str()),
        ("TABLE_NAME", aws.table.as_str()),
        ("REDIS_URL", redis_url.as_str()),
        ("CORS_ALLOW_ORIGINS", "https://app.example"),
    ])
    .await;
    let out = tokio::process::Command::new("python3")
        .arg(repo_root().join("scripts/smoke.py"))
        .arg(format!("URL={}", server.url("/")))
        .arg(format!("KEY={key}"))
        .arg("ORIGIN=https://app.example")
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}");
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("smoke: 6 passed, 0 failed"), "{text}");
}
