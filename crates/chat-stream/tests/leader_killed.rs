//! Two real chat-stream processes share one Redis: a request to the second
//! follows the identical request the first is answering. The first is
//! killed (SIGKILL) mid-answer; the follower notices the lease lapse, takes
//! over, and its client still gets the whole answer, which is not cached
//! (it is spliced from two model calls).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Stdio;
use std::time::Duration;

use e2e::{RedisServer, answer_text, body_stream, direct_answer, read_deltas, read_sse, sim};
use serde_json::json;

const MODEL: &str = "claude-sim";

struct Instance {
    child: tokio::process::Child,
    url: String,
}

async fn start_instance(sim_url: &str, redis_url: &str) -> Instance {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_chat-stream"))
        .env_clear()
        .env("BIND_ADDR", format!("127.0.0.1:{port}"))
        .env("ANTHROPIC_BASE_URL", sim_url)
        .env("ANTHROPIC_API_KEY", "test-key")
        .env("AUTH_MODE", "dev")
        .env("MODEL_ALLOWLIST", "*")
        .env("DEFAULT_MODEL", MODEL)
        .env("REDIS_URL", redis_url)
        .env("REDIS_TIMEOUT_MS", "1000")
        // A dead leader is noticed within a lease plus a read period.
        .env("COALESCE_LEASE_MS", "600")
        .env("LOG_LEVEL", "warn")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start chat-stream");
    let url = format!("http://127.0.0.1:{port}");
    for _ in 0..200 {
        if let Ok(r) = reqwest::get(format!("{url}/health")).await {
            if r.status().is_success() || r.status().as_u16() == 503 {
                return Instance { child, url };
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("chat-stream did not start on {port}");
}

async fn ask(url: &str) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{url}/chat"))
        .header("x-dev-user", "kim")
        .json(
            &json!({"message": "who survives the leader?", "temperature": 0,
                      "max_tokens": 64, "model": MODEL}),
        )
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn followers_complete_when_the_leader_is_killed_mid_answer() {
    let redis = RedisServer::start().await;
    // 60 tokens at 20/s: three seconds, so the kill lands mid-answer.
    let sim = sim(20, 20.0, 60).await;
    let mut a = start_instance(&sim.url(), &redis.url()).await;
    let b = start_instance(&sim.url(), &redis.url()).await;

    // The leader's answer starts on A.
    let lead = ask(&a.url).await;
    assert_eq!(lead.headers()["x-cache"], "miss");
    let mut lead_body = body_stream(lead);
    read_deltas(&mut lead_body, 1).await;
    // The same question on B follows A's answer.
    let follow = ask(&b.url).await;
    assert_eq!(follow.headers()["x-cache"], "follow");
    let reading = tokio::spawn(read_sse(follow, Duration::from_secs(30)));
    tokio::time::sleep(Duration::from_millis(400)).await;
    a.child.start_kill().unwrap();
    let _ = a.child.wait().await;

    let (events, err) = reading.await.unwrap();
    assert_eq!(err, None);
    assert_eq!(events[0].data["cache"], "follow");
    assert_eq!(events.last().unwrap().event, "done", "{events:?}");
    let calls = sim.calls();
    assert_eq!(calls, 2, "the leader's call and the follower's takeover");
    let expected = direct_answer(&sim, MODEL, None, "who survives the leader?", 64).await;
    assert_eq!(answer_text(&events), expected, "no text lost or repeated");

    // The follower's answer is the leader's text with the rest of its own
    // call spliced on: its client gets it, the cache does not (two samples
    // joined are not one answer). The next identical request asks again.
    let calls = sim.calls();
    let again = ask(&b.url).await;
    assert_eq!(again.headers()["x-cache"], "miss");
    let (events, _) = read_sse(again, Duration::from_secs(30)).await;
    assert_eq!(events.last().unwrap().event, "done");
    assert_eq!(sim.calls(), calls + 1, "a model call: nothing was cached");
    drop(b);
}
