//! The real `db-writer` binary under the Lambda runtime, fed the SQS events
//! in `events/` by a local Runtime API, writing to a table in moto made
//! from template.yaml. Run through `make test` (it starts moto).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use e2e::{FakeRuntimeApi, LocalAws, event_file, require_aws_endpoint};

struct Child(tokio::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.start_kill();
    }
}

fn failures(inv: &e2e::Invocation) -> Vec<String> {
    assert!(inv.error.is_none(), "handler error: {:?}", inv.error);
    let mut ids: Vec<String> = inv.prelude["batchItemFailures"]
        .as_array()
        .unwrap_or_else(|| panic!("not a batch response: {}", inv.prelude))
        .iter()
        .map(|f| f["itemIdentifier"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids
}

#[tokio::test]
async fn sqs_events_are_written_idempotently_with_partial_failures() {
    let endpoint = require_aws_endpoint();
    let aws = LocalAws::create(&[]).await;
    let runtime = FakeRuntimeApi::start().await;
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_db-writer"));
    let child = runtime
        .environment(&mut cmd, "db-writer", 256)
        .env("AWS_ENDPOINT_URL", endpoint)
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("TABLE_NAME", &aws.table)
        .env("LOG_LEVEL", "warn")
        .spawn()
        .expect("start db-writer");
    let _child = Child(child);
    let limit = Duration::from_secs(30);
    let store = aws.store().await;
    let conv = "c0ffee00000000000000000000000001";

    let inv = runtime
        .invoke(event_file("sqs-turns-valid.json"), limit)
        .await;
    assert_eq!(failures(&inv), Vec::<String>::new());
    let meta = store.get_conversation(conv).await.unwrap().unwrap();
    assert_eq!(
        (meta.owner.as_str(), meta.message_count),
        ("example-user", 4)
    );
    assert_eq!(store.recent_turns(conv, 10).await.unwrap().len(), 2);

    // The same message delivered again changes nothing.
    let inv = runtime
        .invoke(event_file("sqs-turns-redelivery.json"), limit)
        .await;
    assert_eq!(failures(&inv), Vec::<String>::new());
    let again = store.get_conversation(conv).await.unwrap().unwrap();
    assert_eq!(again.message_count, 4);
    let day = chat_core::util::utc_day(1_795_392_001_800);
    assert_eq!(store.usage("example-user", &day).await.unwrap().0, 2);

    // Poison is reported by message id; the good turn beside it is written.
    let inv = runtime
        .invoke(event_file("sqs-turns-poison.json"), limit)
        .await;
    assert_eq!(
        failures(&inv),
        [
            "0f2d7a10-0000-4000-8000-0000000000aa",
            "0f2d7a10-0000-4000-8000-0000000000bb"
        ]
    );
    let turns = store.recent_turns(conv, 10).await.unwrap();
    assert_eq!(turns.len(), 3);
    assert_eq!(turns[2].user_message, "And if the client drops?");
}
