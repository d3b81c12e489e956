//! The spans of a chat turn, in-process: chat-stream's router with a
//! subscriber whose X-Ray documents and log lines are kept in memory, over
//! model-sim, Redis and moto's table and queue. What a turn's trace looks
//! like (names and parents), that every log line of the request carries
//! its ids and pseudonymous user and never its text, and that its metrics
//! lines are valid EMF.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use chat_core::obs::{LogOut, Sink, emf};
use e2e::{
    ChatServer, LocalAws, find_segment, read_sse, require_aws_endpoint, require_redis_url, sim,
};
use serde_json::{Value, json};

struct Captured {
    docs: Arc<Mutex<Vec<String>>>,
    logs: Arc<Mutex<Vec<String>>>,
}

/// The process-wide subscriber of this test binary (one per process).
fn captured() -> &'static Captured {
    static C: OnceLock<Captured> = OnceLock::new();
    C.get_or_init(|| {
        let docs = Arc::new(Mutex::new(Vec::new()));
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sub = chat_core::obs::subscriber(
            tracing::Level::INFO,
            LogOut::Memory(logs.clone()),
            Some((Sink::Memory(docs.clone()), "chat-stream")),
        );
        tracing::subscriber::set_global_default(sub).unwrap();
        emf::configure("ChatRelayTest", "chat-stream", LogOut::Memory(logs.clone()));
        Captured { docs, logs }
    })
}

fn trace_header() -> (String, String) {
    let root = format!("1-{:08x}-{:024x}", 0x6700_0000u32, fastrand::u128(..) >> 32);
    let header = format!("Root={root};Parent=53995c3f42cd8ad8;Sampled=1");
    (root, header)
}

/// The document of the request traced as `root`, once its span has ended
/// (after the turn is persisted).
async fn doc_of(root: &str) -> Value {
    for _ in 0..200 {
        let found = captured()
            .docs
            .lock()
            .unwrap()
            .iter()
            .map(|d| serde_json::from_str::<Value>(d).unwrap())
            .find(|d| d["trace_id"] == root);
        if let Some(d) = found {
            return d;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no document for {root}");
}

/// `name` -> parent name, for every subsegment under `doc`.
fn parents(doc: &Value, out: &mut Vec<(String, String)>) {
    for c in doc["subsegments"].as_array().into_iter().flatten() {
        out.push((
            c["name"].as_str().unwrap().to_owned(),
            doc["name"].as_str().unwrap().to_owned(),
        ));
        assert!(c["start_time"].as_f64().unwrap() >= doc["start_time"].as_f64().unwrap() - 1e-3);
        assert!(c["end_time"].as_f64().unwrap() >= c["start_time"].as_f64().unwrap());
        assert_eq!(c["id"].as_str().unwrap().len(), 16);
        parents(c, out);
    }
}

#[tokio::test]
async fn a_turn_is_one_trace_of_named_phases_with_ids_on_every_line_and_valid_metrics() {
    let cap = captured();
    require_aws_endpoint();
    let redis = require_redis_url();
    let aws = LocalAws::create(&[]).await;
    let sim = sim::sim(20, 400.0, 12).await;
    let sim_url = sim.url();
    let mut env: Vec<(&str, &str)> = vec![
        ("ANTHROPIC_BASE_URL", &sim_url),
        ("REDIS_URL", &redis),
        ("CACHE_ENABLED", "true"),
        ("LOG_LEVEL", "info"),
    ];
    let aws_env = aws.env();
    env.extend(aws_env.iter().map(|(k, v)| (*k, v.as_str())));
    let server = ChatServer::start(&env).await;
    let secret = format!("planted turn text {}", fastrand::u64(..));
    let user = format!("alice-{}", fastrand::u32(..));
    let client = reqwest::Client::new();
    let send = |body: Value, header: &str| {
        client
            .post(server.url("/chat"))
            .header("x-dev-user", &user)
            .header("x-amzn-trace-id", header)
            .json(&body)
            .send()
    };

    // A miss: the model is called.
    let (root, header) = trace_header();
    let resp = send(json!({"message": secret, "temperature": 0}), &header)
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let timing = resp.headers()["server-timing"].to_str().unwrap().to_owned();
    assert!(timing.contains("overhead;dur="), "{timing}");
    let request_id = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    let (events, _) = read_sse(resp, Duration::from_secs(20)).await;
    let done = events.iter().find(|e| e.event == "done").unwrap();
    let t = &done.data["timings_ms"];
    assert!(t["overhead"].as_f64().unwrap() <= t["ttft"].as_f64().unwrap());
    let conversation = events[0].data["conversation_id"]
        .as_str()
        .unwrap()
        .to_owned();

    let doc = doc_of(&root).await;
    assert_eq!(doc["type"], "subsegment");
    assert_eq!(doc["parent_id"], "53995c3f42cd8ad8");
    assert_eq!(doc["name"], "request");
    assert_eq!(doc["annotations"]["request_id"], request_id.as_str());
    let mut pairs = Vec::new();
    parents(&doc, &mut pairs);
    let parent_of = |n: &str| {
        pairs
            .iter()
            .find(|(c, _)| c == n)
            .map(|(_, p)| p.as_str())
            .unwrap_or_else(|| panic!("no {n} in {pairs:?}"))
    };
    for (child, parent) in [
        ("auth", "request"),
        ("validate", "request"),
        ("limits", "request"),
        ("cache_lookup", "request"),
        ("upstream_connect", "request"),
        ("first_token", "request"),
        ("stream", "request"),
        ("persist", "stream"),
        ("cache_store", "persist"),
        ("queue_send", "persist"),
        ("SQS", "queue_send"),
    ] {
        assert_eq!(parent_of(child), parent, "{child}: {pairs:?}");
    }
    // The lookup took the coalescing lease in the same round trip: no
    // `lead` span of its own.
    assert!(find_segment(&doc, "lead").is_none(), "{doc}");
    assert_eq!(
        find_segment(&doc, "cache_lookup").unwrap()["annotations"]["lead"],
        "leader"
    );
    let sqs = find_segment(&doc, "SQS").unwrap();
    assert_eq!(sqs["namespace"], "aws");
    assert_eq!(sqs["aws"]["operation"], "SendMessage");
    assert_eq!(
        find_segment(&doc, "upstream_connect").unwrap()["annotations"]["provider"],
        "anthropic"
    );
    // The user is a pseudonym wherever it appears.
    let pseudonym = chat_core::obs::pseudonym::of(&user);
    assert_eq!(doc["annotations"]["user"], pseudonym.as_str());
    assert!(!doc.to_string().contains(&user));

    // The conversation continued: its history is read (from the Redis
    // buffer of recent turns here) under its own span.
    let (root2, header2) = trace_header();
    let resp = send(
        json!({"message": "and then?", "conversation_id": conversation}),
        &header2,
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 200);
    read_sse(resp, Duration::from_secs(20)).await;
    let doc2 = doc_of(&root2).await;
    let mut pairs2 = Vec::new();
    parents(&doc2, &mut pairs2);
    assert!(
        pairs2.contains(&("history".to_owned(), "request".to_owned())),
        "{pairs2:?}"
    );

    // The same question again: a hit from the instance's copy (no lookup),
    // no model call in its trace.
    let (root3, header3) = trace_header();
    let resp = send(json!({"message": secret, "temperature": 0}), &header3)
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-cache"], "hit");
    read_sse(resp, Duration::from_secs(20)).await;
    let doc3 = doc_of(&root3).await;
    assert!(find_segment(&doc3, "limits").is_some(), "{doc3}");
    assert!(find_segment(&doc3, "cache_lookup").is_none(), "{doc3}");
    assert!(find_segment(&doc3, "upstream_connect").is_none(), "{doc3}");

    // Unsampled: no document at all.
    let (root4, _) = trace_header();
    let resp = send(
        json!({"message": "not sampled"}),
        &format!("Root={root4};Parent=53995c3f42cd8ad8;Sampled=0"),
    )
    .await
    .unwrap();
    read_sse(resp, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let logs = cap.logs.lock().unwrap().clone();
    assert!(
        !cap.docs.lock().unwrap().iter().any(|d| d.contains(&root4)),
        "an unsampled trace was sent"
    );
    // Every line of the first request carries its trace and its user's
    // pseudonym; no line carries the text or the user id.
    let mine: Vec<Value> = logs
        .iter()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["request_id"] == request_id.as_str())
        .collect();
    assert!(mine.len() >= 2, "{mine:?}");
    for v in &mine {
        assert_eq!(v["trace_id"], root.as_str(), "{v}");
        assert_eq!(v["user"], pseudonym.as_str(), "{v}");
    }
    for l in &logs {
        assert!(!l.contains(&secret), "text in a log line: {l}");
        assert!(!l.contains(&user), "user id in a log line: {l}");
    }
    // Metrics: every EMF line valid; the turn's line has each of its
    // metrics; the hit and the queue send are counted.
    let emf: Vec<&String> = logs.iter().filter(|l| l.contains("\"_aws\"")).collect();
    let mut names = Vec::new();
    for l in &emf {
        names.extend(emf::validate(l).unwrap_or_else(|e| panic!("{e}: {l}")));
    }
    let turn: Value = emf
        .iter()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|v| v["request_id"] == request_id.as_str())
        .unwrap();
    assert_eq!(turn["trace_id"], root.as_str());
    assert_eq!(turn["function"], "chat-stream");
    assert_eq!(turn["outcome"], "complete");
    assert_eq!(turn["user"], pseudonym.as_str());
    for m in [
        "TimeToFirstToken",
        "Total",
        "UpstreamTime",
        "Overhead",
        "CacheMiss",
        "InputTokens",
        "OutputTokens",
    ] {
        assert!(turn[m].is_number(), "{m} missing: {turn}");
    }
    assert_eq!(turn["OutputTokens"], 12.0);
    assert!(turn["Overhead"].as_f64().unwrap() <= turn["TimeToFirstToken"].as_f64().unwrap());
    for m in ["CacheHit", "QueueSendTime"] {
        assert!(names.iter().any(|n| n == m), "{m} not in {names:?}");
    }
}
