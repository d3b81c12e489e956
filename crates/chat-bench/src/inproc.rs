//! chat-stream and model-sim inside the bench's own process, for the
//! benches that need several routers on shared state (`limits`, `stop`).

use std::collections::HashMap;
use std::time::Duration;

/// chat-stream's router on 127.0.0.1:0 with `env` over the benches'
/// defaults (dev auth, quiet logs), as its local server mode serves it (a
/// client's `X-Amzn-Trace-Id` continues its trace): its base URL and its
/// state.
pub async fn chat_stream(env: &[(&str, &str)]) -> Result<(String, chat_core::AppState), String> {
    let mut map: HashMap<String, String> = [
        ("ANTHROPIC_API_KEY", "bench-key"),
        ("AUTH_MODE", "dev"),
        ("LOG_LEVEL", "error"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    for (k, v) in env {
        map.insert((*k).to_owned(), (*v).to_owned());
    }
    let config = chat_core::Config::from_source(&map).map_err(|e| e.to_string())?;
    let state = chat_core::build_state(config)
        .await
        .map_err(|e| e.to_string())?;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    tokio::spawn(chat_core::server::serve(
        listener,
        chat_core::api::with_local_trace(chat_core::app(state.clone())),
        std::future::pending(),
    ));
    Ok((format!("http://{addr}"), state))
}

/// model-sim in this process, any key accepted.
pub async fn sim(ttft_ms: u64, tokens_per_sec: f64, tokens: u32) -> Result<model_sim::Sim, String> {
    model_sim::Sim::start(model_sim::SimConfig {
        knobs: model_sim::Knobs {
            ttft: Duration::from_millis(ttft_ms),
            tokens_per_sec,
            output_tokens: tokens,
            fault: None,
            fault_times: None,
            echo: false,
        },
        api_key: None,
    })
    .await
    .map_err(|e| format!("model-sim: {e}"))
}
