//! The arm64 bootstrap that SAM uploads (`make build`), run under
//! qemu-user against the local Lambda Runtime API: it must answer the
//! Function URL events in `events/` with the same events as the x86 build.
//! Ignored in the plain test run (it needs the release build);
//! `make test-artifact` (part of `make test`) builds and runs it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use e2e::{FakeRuntimeApi, answer_text, event_file, function_command};
use model_sim::Sim;

/// What one build answered: (status, event names, answer text) per event
/// file.
async fn answers(sim: &Sim, arm64: bool) -> Vec<(u16, Vec<String>, String)> {
    let runtime = FakeRuntimeApi::start().await;
    let mut cmd = function_command(env!("CARGO_BIN_EXE_chat-stream"), "chat-stream", arm64);
    let child = runtime
        .environment(&mut cmd, "chat-stream", 1024)
        .env("ANTHROPIC_BASE_URL", sim.url())
        .env("ANTHROPIC_API_KEY", "test-key")
        .env(
            "API_KEY_HASHES",
            "92d6376288da154534b93448f4e79fc1e9bd83f3cf398ad65f74212a4626523c:example-user",
        )
        .env("LOG_LEVEL", "warn")
        .spawn()
        .expect("start the function");
    let mut out = Vec::new();
    for file in ["chat-valid.json", "chat-invalid.json", "health.json"] {
        let inv = runtime
            .invoke(event_file(file), Duration::from_secs(60))
            .await;
        let events = inv.events();
        out.push((
            inv.status(),
            events.iter().map(|e| e.event.clone()).collect(),
            if events.is_empty() {
                // JSON answers: compare the shape, not ids or timings.
                let v: serde_json::Value =
                    serde_json::from_str(&inv.body_text()).unwrap_or_default();
                format!("{} {}", v["code"], v["status"])
            } else {
                answer_text(&events)
            },
        ));
    }
    // The Runtime API connection has Nagle's algorithm off in this build
    // too (the system calls it takes pass through qemu-user).
    let nodelay = runtime.nodelay_of(child.id().unwrap());
    out.push((
        0,
        nodelay.iter().map(|on| on.to_string()).collect(),
        "nodelay".into(),
    ));
    out
}

#[tokio::test]
#[ignore = "needs `make build` and qemu-user; run by `make test-artifact`"]
async fn the_arm64_bootstrap_answers_like_the_x86_build() {
    let sim = e2e::sim(20, 200.0, 15).await;
    let x86 = answers(&sim, false).await;
    let arm = answers(&sim, true).await;
    assert_eq!(x86[0].0, 200);
    assert_eq!(x86[0].1.first().map(String::as_str), Some("meta"));
    assert_eq!(x86[0].1.last().map(String::as_str), Some("done"));
    let nodelay = &x86.last().unwrap().1;
    assert!(
        !nodelay.is_empty() && nodelay.iter().all(|on| on == "true"),
        "TCP_NODELAY on the Runtime API sockets: {nodelay:?}"
    );
    assert_eq!(arm, x86);
}
