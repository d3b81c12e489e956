//! The arm64 db-writer bootstrap that SAM uploads (`make build`), under
//! qemu-user against the local Lambda Runtime API and a table in moto: the
//! SQS events in `events/` get the same batch failures as from the x86
//! build. Ignored in the plain test run; `make test-artifact` runs it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use e2e::{FakeRuntimeApi, LocalAws, event_file, function_command, require_aws_endpoint};

async fn failures(arm64: bool) -> Vec<Vec<String>> {
    let endpoint = require_aws_endpoint();
    let aws = LocalAws::create(&[]).await;
    let runtime = FakeRuntimeApi::start().await;
    let mut cmd = function_command(env!("CARGO_BIN_EXE_db-writer"), "db-writer", arm64);
    let _child = runtime
        .environment(&mut cmd, "db-writer", 256)
        .env("AWS_ENDPOINT_URL", endpoint)
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("TABLE_NAME", &aws.table)
        .env("LOG_LEVEL", "warn")
        .spawn()
        .expect("start db-writer");
    let mut out = Vec::new();
    for file in [
        "sqs-turns-valid.json",
        "sqs-turns-redelivery.json",
        "sqs-turns-poison.json",
    ] {
        let inv = runtime
            .invoke(event_file(file), Duration::from_secs(60))
            .await;
        assert!(inv.error.is_none(), "{file}: {:?}", inv.error);
        let mut ids: Vec<String> = inv.prelude["batchItemFailures"]
            .as_array()
            .unwrap_or_else(|| panic!("{file}: not a batch response: {}", inv.prelude))
            .iter()
            .map(|f| f["itemIdentifier"].as_str().unwrap().to_owned())
            .collect();
        ids.sort();
        out.push(ids);
    }
    let conv = aws
        .store()
        .await
        .get_conversation("c0ffee00000000000000000000000001")
        .await
        .unwrap()
        .unwrap();
    out.push(vec![conv.message_count.to_string()]);
    out
}

#[tokio::test]
#[ignore = "needs `make build` and qemu-user; run by `make test-artifact`"]
async fn the_arm64_bootstrap_reports_the_same_batch_failures_as_x86() {
    let x86 = failures(false).await;
    let arm = failures(true).await;
    assert_eq!(x86[2].len(), 2, "the poison event has two bad messages");
    assert_eq!(arm, x86);
}
