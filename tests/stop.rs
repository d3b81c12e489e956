//! `DELETE /chat/streams/{id}` stops an answer in every deployment: the
//! request reaches another instance than the one streaming (as in Lambda,
//! where the streaming environment is busy), through Redis or through the
//! table, or the same process locally. The model call is cancelled, the
//! stream ends with `done` and `stop_reason: "stopped"`, followers end the
//! same way, the turn is stored as `stopped`, and only the owner may stop.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use e2e::{BodyStream, ChatServer, LocalAws, RedisServer, read_deltas, sim};
use model_sim::Sim;
use serde_json::{Value, json};

const ASK: &str = "tell me a very long story";

/// A slow answer: 400 tokens at 20 a second.
async fn slow_sim() -> Sim {
    sim(5, 20.0, 400).await
}

async fn start(server: &ChatServer, user: &str) -> (BodyStream, String, Option<String>) {
    let r = server
        .post_chat(Some(user), &json!({"message": ASK, "temperature": 0}))
        .await;
    assert_eq!(r.status(), 200);
    let id = r.headers()["x-stream-id"].to_str().unwrap().to_owned();
    let conv = r
        .headers()
        .get("x-conversation-id")
        .map(|v| v.to_str().unwrap().to_owned());
    let mut s = e2e::body_stream(r);
    read_deltas(&mut s, 2).await;
    (s, id, conv)
}

async fn delete(server: &ChatServer, user: &str, id: &str) -> reqwest::Response {
    reqwest::Client::new()
        .delete(server.url(&format!("/chat/streams/{id}")))
        .header("x-dev-user", user)
        .send()
        .await
        .unwrap()
}

/// The rest of a stream, as text, within 10 s.
async fn rest(s: BodyStream) -> String {
    let (text, ended) = e2e::read_rest(s, Duration::from_secs(10)).await;
    assert!(ended, "the stream did not end after the stop");
    text
}

fn ended_stopped(text: &str) {
    assert!(text.contains("event: done"), "no done event: {text}");
    assert!(
        text.contains(r#""stop_reason":"stopped""#),
        "not stopped: {text}"
    );
}

async fn cancelled(sim: &Sim, n: u64) {
    let t = Instant::now();
    while sim.cancelled() < n {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the model call went on"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(sim.completed(), 0);
}

/// The stored turn's status, once written.
async fn stored_status(server: &ChatServer, user: &str, conv: &str) -> String {
    let t = Instant::now();
    loop {
        let v: Value = reqwest::Client::new()
            .get(server.url(&format!("/conversations/{conv}")))
            .header("x-dev-user", user)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let answer = &v["messages"][1];
        let status = answer["status"].as_str().unwrap_or("").to_owned();
        if !status.is_empty() && !answer["pending_write"].as_bool().unwrap_or(false) {
            return status;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "no stored turn: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_stop_sent_to_another_instance_through_redis_ends_the_answer_and_its_followers() {
    let aws = LocalAws::create(&[]).await;
    let redis = RedisServer::start().await;
    let sim = slow_sim().await;
    let (url, redis_url) = (sim.url(), redis.url());
    let env = [
        ("ANTHROPIC_BASE_URL", url.as_str()),
        ("REDIS_URL", redis_url.as_str()),
        ("REDIS_TIMEOUT_MS", "1000"),
        ("TABLE_NAME", aws.table.as_str()),
    ];
    let streaming = ChatServer::start(&env).await;
    let other = ChatServer::start(&env).await;
    let (leader, id, conv) = start(&streaming, "stopper").await;
    // The same question again: it follows the leader's answer.
    let (follower, _, _) = start(&streaming, "stopper").await;
    assert_eq!(sim.calls(), 1, "the second request follows the first");
    // Someone else, an unknown id and a malformed one: the same 404.
    for (user, sid) in [
        ("intruder", id.as_str()),
        ("stopper", "nosuchstream"),
        ("stopper", "bad-id!"),
    ] {
        let r = delete(&other, user, sid).await;
        assert_eq!(r.status(), 404);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["code"], "stream_not_found");
    }
    let r = delete(&other, "stopper", &id).await;
    assert_eq!(r.status(), 202);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["status"], "stopping");
    ended_stopped(&rest(leader).await);
    ended_stopped(&rest(follower).await);
    cancelled(&sim, 1).await;
    assert_eq!(
        stored_status(&streaming, "stopper", &conv.unwrap()).await,
        "stopped"
    );
    // A stopped answer is not cached: the same question calls the model.
    let (again, _, _) = start(&streaming, "stopper").await;
    drop(again);
    assert_eq!(sim.calls(), 2);
}

#[tokio::test]
async fn a_stop_sent_to_another_instance_through_the_table_ends_the_answer() {
    let aws = LocalAws::create(&[]).await;
    let sim = slow_sim().await;
    let url = sim.url();
    let env = [
        ("ANTHROPIC_BASE_URL", url.as_str()),
        ("TABLE_NAME", aws.table.as_str()),
        ("STOP_POLL_TABLE_MS", "200"),
    ];
    let streaming = ChatServer::start(&env).await;
    let other = ChatServer::start(&env).await;
    let (stream, id, conv) = start(&streaming, "table-stopper").await;
    // The answer's record is written off the path: give it a moment.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(delete(&other, "intruder", &id).await.status(), 404);
    assert_eq!(delete(&other, "table-stopper", &id).await.status(), 202);
    ended_stopped(&rest(stream).await);
    cancelled(&sim, 1).await;
    assert_eq!(
        stored_status(&streaming, "table-stopper", &conv.unwrap()).await,
        "stopped"
    );
}

#[tokio::test]
async fn a_stop_in_the_same_process_needs_no_shared_state() {
    let sim = slow_sim().await;
    let url = sim.url();
    let server = ChatServer::start(&[("ANTHROPIC_BASE_URL", url.as_str())]).await;
    let (stream, id, _) = start(&server, "local-stopper").await;
    assert_eq!(delete(&server, "intruder", &id).await.status(), 404);
    assert_eq!(delete(&server, "local-stopper", &id).await.status(), 202);
    ended_stopped(&rest(stream).await);
    cancelled(&sim, 1).await;
    // Over: a second stop finds nothing.
    assert_eq!(delete(&server, "local-stopper", &id).await.status(), 404);
}
