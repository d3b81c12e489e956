//! One turn, one trace, across two functions: the real `chat-stream` and
//! `db-writer` binaries under local Lambda Runtime APIs that hand each a
//! sampled trace header, with `AWS_XRAY_DAEMON_ADDRESS` pointing at a UDP
//! listener here (the daemon's place). chat-stream sends the turn to the
//! queue (moto) with an `AWSTraceHeader`; the message, read back from the
//! queue with that attribute, is db-writer's SQS event. Every datagram
//! must be a daemon packet whose document parses, and db-writer's turn
//! must continue chat-stream's trace under its `queue_send`. Both
//! functions' stdout: valid EMF lines, and not a word of the turn.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_sqs::types::MessageSystemAttributeName;
use e2e::{
    FakeRuntimeApi, LocalAws, event_file, find_segment, require_aws_endpoint, sibling_binary,
};
use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt;

struct Child(tokio::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.start_kill();
    }
}

/// Spawns `cmd` with its stdout collected line by line into `lines`.
fn spawn_collecting(cmd: &mut tokio::process::Command, lines: Arc<Mutex<Vec<String>>>) -> Child {
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start function");
    let out = child.stdout.take().unwrap();
    tokio::spawn(async move {
        let mut r = tokio::io::BufReader::new(out).lines();
        while let Ok(Some(l)) = r.next_line().await {
            lines.lock().unwrap().push(l);
        }
    });
    Child(child)
}

fn header(tag: u32) -> (String, String) {
    let root = format!(
        "1-{:08x}-{:024x}",
        0x6750_0000u32 + tag,
        fastrand::u128(..) >> 32
    );
    let parent = format!("{:016x}", fastrand::u64(1..));
    (
        root.clone(),
        format!("Root={root};Parent={parent};Sampled=1"),
    )
}

/// The documents received so far (each datagram checked for the daemon's
/// header line).
fn documents(packets: &Mutex<Vec<Vec<u8>>>) -> Vec<Value> {
    packets
        .lock()
        .unwrap()
        .iter()
        .map(|p| {
            let text = std::str::from_utf8(p).unwrap();
            let (head, doc) = text.split_once('\n').expect("header line");
            assert_eq!(
                serde_json::from_str::<Value>(head).unwrap(),
                json!({"format": "json", "version": 1})
            );
            serde_json::from_str(doc).unwrap_or_else(|e| panic!("{e}: {doc}"))
        })
        .collect()
}

async fn wait_for(packets: &Mutex<Vec<Vec<u8>>>, what: impl Fn(&Value) -> bool) -> Value {
    for _ in 0..300 {
        if let Some(d) = documents(packets).into_iter().find(|d| what(d)) {
            return d;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no such document in {:?}", documents(packets));
}

#[tokio::test]
async fn one_turn_is_one_trace_from_chat_stream_through_the_queue_to_db_writer() {
    let endpoint = require_aws_endpoint();
    let aws = LocalAws::create(&[]).await;
    let sim = e2e::sim::sim(20, 400.0, 10).await;
    let daemon = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let daemon_addr = daemon.local_addr().unwrap().to_string();
    let packets: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let sink = packets.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        while let Ok(n) = daemon.recv(&mut buf).await {
            sink.lock().unwrap().push(buf[..n].to_vec());
        }
    });
    let aws_env = [
        ("AWS_ENDPOINT_URL", endpoint.as_str()),
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("TABLE_NAME", aws.table.as_str()),
        ("AWS_XRAY_DAEMON_ADDRESS", daemon_addr.as_str()),
        ("LOG_LEVEL", "info"),
        ("LOG_USER_KEY", "a test key for pseudonyms"),
    ];

    // chat-stream answers a Function URL event in trace 1.
    let chat_runtime = FakeRuntimeApi::start().await;
    let chat_out: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut cmd = tokio::process::Command::new(sibling_binary("chat-stream"));
    chat_runtime
        .environment(&mut cmd, "chat-stream", 1024)
        .envs(aws_env)
        .env("TURN_QUEUE_URL", &aws.queue_url)
        .env("ANTHROPIC_BASE_URL", sim.url())
        .env("ANTHROPIC_API_KEY", "test-key")
        .env(
            "API_KEY_HASHES",
            "92d6376288da154534b93448f4e79fc1e9bd83f3cf398ad65f74212a4626523c:example-user",
        );
    let _chat = spawn_collecting(&mut cmd, chat_out.clone());
    let event = event_file("chat-valid.json");
    let text: Value = serde_json::from_str(event["body"].as_str().unwrap()).unwrap();
    let text = text["message"].as_str().unwrap().to_owned();
    let (root1, header1) = header(1);
    let inv = chat_runtime
        .invoke_traced(event, &header1, Duration::from_secs(30))
        .await;
    assert_eq!(inv.status(), 200, "{:?}", inv.prelude);
    let request = wait_for(&packets, |d| d["trace_id"] == root1.as_str()).await;
    assert_eq!(request["name"], "request");
    assert_eq!(request["type"], "subsegment");
    assert_eq!(
        request["parent_id"].as_str(),
        header1
            .split("Parent=")
            .nth(1)
            .and_then(|p| p.split(';').next())
    );
    let queue_send = find_segment(&request, "queue_send").expect("queue_send in the request");
    assert_eq!(
        find_segment(queue_send, "SQS").unwrap()["aws"]["operation"],
        "SendMessage"
    );

    // The queued turn carries the trace on to its consumer.
    let sqs = aws.sqs().await;
    let mut got = None;
    for _ in 0..50 {
        let out = sqs
            .receive_message()
            .queue_url(&aws.queue_url)
            .message_system_attribute_names(MessageSystemAttributeName::All)
            .wait_time_seconds(1)
            .send()
            .await
            .unwrap();
        if let Some(m) = out.messages().first() {
            got = Some(m.clone());
            break;
        }
    }
    let msg = got.expect("the turn was queued");
    let attrs = msg.attributes().cloned().unwrap_or_default();
    let sent_header = attrs
        .get(&MessageSystemAttributeName::AwsTraceHeader)
        .expect("AWSTraceHeader on the message")
        .clone();
    assert_eq!(
        sent_header,
        format!(
            "Root={root1};Parent={};Sampled=1",
            queue_send["id"].as_str().unwrap()
        )
    );

    // db-writer handles it in an invocation of its own trace (2).
    let mut record = event_file("sqs-turns-valid.json")["Records"][0].clone();
    record["messageId"] = json!(msg.message_id().unwrap());
    record["receiptHandle"] = json!(msg.receipt_handle().unwrap());
    record["body"] = json!(msg.body().unwrap());
    record["attributes"]["AWSTraceHeader"] = json!(sent_header);
    let writer_runtime = FakeRuntimeApi::start().await;
    let writer_out: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_db-writer"));
    writer_runtime
        .environment(&mut cmd, "db-writer", 256)
        .envs(aws_env);
    let _writer = spawn_collecting(&mut cmd, writer_out.clone());
    let (root2, header2) = header(2);
    let inv = writer_runtime
        .invoke_traced(
            json!({"Records": [record]}),
            &header2,
            Duration::from_secs(30),
        )
        .await;
    assert!(inv.error.is_none(), "{:?}", inv.error);
    assert_eq!(inv.prelude["batchItemFailures"], json!([]));

    let batch = wait_for(&packets, |d| d["trace_id"] == root2.as_str()).await;
    assert_eq!(batch["name"], "batch");
    let write = find_segment(&batch, "write_turns").expect("write_turns in the batch");
    assert!(
        find_segment(write, "DynamoDB").is_some(),
        "the table calls under write_turns: {write}"
    );
    let turn = wait_for(&packets, |d| {
        d["trace_id"] == root1.as_str() && d["name"] == "turn"
    })
    .await;
    assert_eq!(turn["type"], "subsegment");
    assert_eq!(turn["parent_id"], queue_send["id"]);
    // Without Redis chat-stream also wrote the turn itself (so the next
    // turn finds it at once): db-writer's write is then a duplicate.
    let outcome = turn["annotations"]["outcome"].as_str().unwrap();
    assert!(["written", "duplicate"].contains(&outcome), "{turn}");

    // Both functions' logs: EMF lines valid, the turn's words nowhere.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut metrics = Vec::new();
    for (function, lines) in [("chat-stream", &chat_out), ("db-writer", &writer_out)] {
        let lines = lines.lock().unwrap().clone();
        assert!(!lines.is_empty(), "{function} wrote nothing");
        for l in &lines {
            assert!(!l.contains(&text), "{function} logged the text: {l}");
            assert!(
                !l.contains("example-user"),
                "{function} logged the user id: {l}"
            );
            if l.contains("\"_aws\"") {
                let names = chat_core::obs::emf::validate(l)
                    .unwrap_or_else(|e| panic!("{function}: {e}: {l}"));
                let v: Value = serde_json::from_str(l).unwrap();
                assert_eq!(v["function"], function);
                metrics.extend(names);
            } else {
                let v: Value = serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("{function}: not a JSON line ({e}): {l}"));
                assert!(v["level"].is_string() && v["timestamp"].is_string(), "{l}");
            }
        }
    }
    for m in [
        "TimeToFirstToken",
        "Overhead",
        "QueueSendTime",
        "BatchSize",
        "WriteFailures",
    ] {
        assert!(metrics.iter().any(|n| n == m), "{m} not in {metrics:?}");
    }
    // chat-stream's log lines of the request carry its trace id.
    let chat_lines = chat_out.lock().unwrap().clone();
    let request_line = chat_lines
        .iter()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|v| v["message"] == "request")
        .expect("the request's log line");
    assert_eq!(request_line["trace_id"], root1.as_str());
    assert!(request_line["user"].as_str().unwrap().starts_with("u_"));
}
