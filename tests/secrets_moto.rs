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
