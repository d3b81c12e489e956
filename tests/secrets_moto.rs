//! The production key path: the function is configured with a Secrets
//! Manager ARN only, reads the key at init, and the model accepts it.
//! Secrets Manager is moto's (`make test` starts it and sets
//! `AWS_ENDPOINT_URL`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use e2e::{ChatServer, answer_text, read_sse};
use model_sim::{Knobs, Sim, SimConfig};
use serde_json::json;

fn require_aws_endpoint() {
    assert!(
        std::env::var("AWS_ENDPOINT_URL").is_ok(),
        "AWS_ENDPOINT_URL is not set: run the tests with `make test`, which starts moto"
    );
}

async fn create_secret(value: &str) -> String {
    let conf = aws_config::load_from_env().await;
    let client = aws_sdk_secretsmanager::Client::new(&conf);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let out = client
        .create_secret()
        .name(format!("chat-stream/test-{nanos}"))
        .secret_string(value)
        .send()
        .await
        .expect("create secret in moto");
    out.arn().unwrap().to_owned()
}

#[tokio::test]
async fn the_api_key_comes_from_secrets_manager() {
    require_aws_endpoint();
    let sim = Sim::start(SimConfig {
        knobs: Knobs {
            ttft: Duration::ZERO,
            tokens_per_sec: 0.0,
            output_tokens: 4,
            fault: None,
            fault_times: None,
            echo: false,
        },
        api_key: Some("sk-from-secrets-manager".into()),
    })
    .await
    .unwrap();
    let arn = create_secret(r#"{"api_key":"sk-from-secrets-manager"}"#).await;
    let url = sim.url();
    let server = ChatServer::start(&[
        ("ANTHROPIC_BASE_URL", url.as_str()),
        ("ANTHROPIC_API_KEY_SECRET_ARN", arn.as_str()),
    ])
    .await;
    let resp = reqwest::Client::new()
        .post(server.url("/chat"))
        .json(&json!({"message": "hi"}))
        .send()
        .await
        .unwrap();
    // The sim accepts only that exact key: a 200 proves it was read.
    assert_eq!(resp.status(), 200);
    let (events, _) = read_sse(resp, Duration::from_secs(10)).await;
    assert_eq!(events.last().unwrap().event, "done");
    assert!(!answer_text(&events).is_empty());
}

#[tokio::test]
async fn a_missing_secret_fails_init_naming_the_variable() {
    require_aws_endpoint();
    let map: std::collections::HashMap<&str, &str> = [
        (
            "ANTHROPIC_API_KEY_SECRET_ARN",
            "arn:aws:secretsmanager:us-east-1:123456789012:secret:does-not-exist-AbCdEf",
        ),
        ("AUTH_MODE", "dev"),
    ]
    .into();
    let config = chat_core::Config::from_source(&map).unwrap();
    let err = chat_core::build_state(config)
        .await
        .err()
        .expect("init must fail");
    let text = err.to_string();
    assert!(text.contains("ANTHROPIC_API_KEY_SECRET_ARN"), "{text}");
}

async fn put_secret(arn: &str, value: &str) {
    let conf = aws_config::load_from_env().await;
    aws_sdk_secretsmanager::Client::new(&conf)
        .put_secret_value()
        .secret_id(arn)
        .secret_string(value)
        .send()
        .await
        .expect("update secret in moto");
}

/// A key rotated in Secrets Manager (and at the provider) after the
/// function started: the first request meets the provider's 401, reads
/// the secret again and succeeds with the new key; no redeploy.
#[tokio::test]
async fn a_rotated_model_key_is_picked_up_after_one_401() {
    require_aws_endpoint();
    let sim = Sim::start(SimConfig {
        knobs: Knobs {
            ttft: Duration::ZERO,
            tokens_per_sec: 0.0,
            output_tokens: 4,
            fault: None,
            fault_times: None,
            echo: false,
        },
        api_key: Some("sk-new".into()),
    })
    .await
    .unwrap();
    let arn = create_secret("sk-old").await;
    let url = sim.url();
    let server = ChatServer::start(&[
        ("ANTHROPIC_BASE_URL", url.as_str()),
        ("ANTHROPIC_API_KEY_SECRET_ARN", arn.as_str()),
        ("UPSTREAM_PREWARM", "false"),
    ])
    .await;
    put_secret(&arn, "sk-new").await;
    let ask = || {
        reqwest::Client::new()
            .post(server.url("/chat"))
            .json(&json!({"message": "hi"}))
            .send()
    };
    let resp = ask().await.unwrap();
    assert_eq!(resp.status(), 200);
    let (events, _) = read_sse(resp, Duration::from_secs(10)).await;
    assert_eq!(events.last().unwrap().event, "done");
    assert_eq!(sim.calls(), 2, "one 401 with the old key, then the new key");
    let resp = ask().await.unwrap();
    assert_eq!(resp.status(), 200);
    read_sse(resp, Duration::from_secs(10)).await;
    assert_eq!(sim.calls(), 3, "the new key is kept");
}

/// A revoked key cannot turn every request into a Secrets Manager read:
/// once per interval, and never for a key from the environment.
#[tokio::test]
async fn the_key_is_read_again_at_most_once_per_interval() {
    use chat_core::secrets::{ApiKeySource, RotatingKey, Secret};
    require_aws_endpoint();
    let arn = create_secret("a").await;
    let source = ApiKeySource::SecretsManager {
        arn: arn.clone(),
        var: "ANTHROPIC_API_KEY_SECRET_ARN".into(),
    };
    let key = RotatingKey::with_interval(Secret::new("a"), source, Duration::from_secs(60));
    assert!(!key.after_rejection(&Secret::new("a")).await, "unchanged");
    put_secret(&arn, "b").await;
    assert!(
        !key.after_rejection(&Secret::new("a")).await,
        "within the interval the secret is not read again"
    );
    assert_eq!(key.current().expose(), "a");

    let key = RotatingKey::with_interval(
        Secret::new("a"),
        ApiKeySource::SecretsManager {
            arn: arn.clone(),
            var: "ANTHROPIC_API_KEY_SECRET_ARN".into(),
        },
        Duration::ZERO,
    );
    assert!(key.after_rejection(&Secret::new("a")).await);
    assert_eq!(key.current().expose(), "b");
    // A request that used the old key while another read the new one
    // tries again without a read.
    assert!(key.after_rejection(&Secret::new("a")).await);

    let env_key = RotatingKey::with_interval(
        Secret::new("x"),
        ApiKeySource::Value(Secret::new("x")),
        Duration::ZERO,
    );
    assert!(!env_key.after_rejection(&Secret::new("x")).await);
}
