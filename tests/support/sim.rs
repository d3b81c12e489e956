//! model-sim, in-process: the model every test talks to over real HTTP.

use std::time::Duration;

use serde_json::Value;

/// model-sim in-process with these defaults, accepting the key `test-key`.
pub async fn sim(ttft_ms: u64, tokens_per_sec: f64, output_tokens: u32) -> model_sim::Sim {
    model_sim::Sim::start(model_sim::SimConfig {
        knobs: model_sim::Knobs {
            ttft: Duration::from_millis(ttft_ms),
            tokens_per_sec,
            output_tokens,
            fault: None,
            fault_times: None,
            echo: false,
        },
        api_key: Some("test-key".into()),
    })
    .await
    .unwrap()
}

/// model-sim's own answer to a one-message conversation, asked directly in
/// the Anthropic format (non-streaming). The sim answers the same
/// conversation with the same words in every wire format, so this is the
/// reference for what any relayed answer must contain.
pub async fn direct_answer(
    sim: &model_sim::Sim,
    model: &str,
    system: Option<&str>,
    message: &str,
    max_tokens: u32,
) -> String {
    let mut body = serde_json::json!({"model": model, "max_tokens": max_tokens,
                                      "messages": [{"role": "user", "content": message}]});
    if let Some(s) = system {
        body["system"] = serde_json::json!(s);
    }
    let v: Value = reqwest::Client::new()
        .post(format!("{}/v1/messages", sim.url()))
        .header("x-api-key", "test-key")
        .header("anthropic-version", "2023-06-01")
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["content"][0]["text"].as_str().unwrap().to_owned()
}
