//! The local AWS stand-in (moto) and Redis from `make test`.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

/// The repository root (where template.yaml and scripts/ are).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Panics with a clear message when the AWS stand-in is not configured
/// (`make test` starts moto and sets it).
pub fn require_aws_endpoint() -> String {
    std::env::var("AWS_ENDPOINT_URL").unwrap_or_else(|_| {
        panic!("AWS_ENDPOINT_URL is not set: run the tests with `make test` (it starts moto)")
    })
}

/// `REDIS_URL` from `make test`, which starts Redis when none answers.
pub fn require_redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| {
        panic!("REDIS_URL is not set: run the tests with `make test` (it starts Redis)")
    })
}

/// A table, a turn queue and its DLQ of the test's own in moto, created by
/// `scripts/local_aws.py` from template.yaml (so the tests use the schema
/// that is deployed). `params` override template parameters.
pub struct LocalAws {
    pub table: String,
    pub queue_url: String,
    pub dlq_url: String,
}

impl LocalAws {
    pub async fn create(params: &[(&str, &str)]) -> LocalAws {
        require_aws_endpoint();
        let root = repo_root();
        let venv_python = root.join(".venv/bin/python");
        let python = if venv_python.exists() {
            venv_python
        } else {
            PathBuf::from("python3")
        };
        let prefix = format!("t{}", &uuid_like()[..12]);
        let mut cmd = tokio::process::Command::new(python);
        cmd.arg(root.join("scripts/local_aws.py"))
            .args(["ensure", "--prefix", &prefix, "--format", "json"]);
        for (k, v) in params {
            cmd.args(["--param", &format!("{k}={v}")]);
        }
        let out = cmd.output().await.expect("run scripts/local_aws.py");
        assert!(
            out.status.success(),
            "local_aws.py failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        LocalAws {
            table: v["TABLE_NAME"].as_str().unwrap().to_owned(),
            queue_url: v["TURN_QUEUE_URL"].as_str().unwrap().to_owned(),
            dlq_url: v["TURN_DLQ_URL"].as_str().unwrap().to_owned(),
        }
    }

    pub async fn store(&self) -> chat_core::persistence::store::Store {
        chat_core::store_for(&self.table, None, chat_core::StoreRole::Writer).await
    }

    pub async fn sqs(&self) -> aws_sdk_sqs::Client {
        let sdk = chat_core::aws_sdk_config(Duration::from_secs(5), Duration::from_secs(10)).await;
        aws_sdk_sqs::Client::new(&sdk)
    }

    /// The local poller's batching for this queue.
    pub fn poller(&self) -> chat_core::persistence::writer::PollerConfig {
        chat_core::persistence::writer::PollerConfig {
            queue_url: self.queue_url.clone(),
            batch_size: 100,
            batching_window: Duration::from_millis(100),
            wait: Duration::from_secs(0),
        }
    }

    /// Messages visible plus in flight on a queue.
    pub async fn depth(&self, sqs: &aws_sdk_sqs::Client, url: &str) -> u64 {
        let out = sqs
            .get_queue_attributes()
            .queue_url(url)
            .attribute_names(aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessages)
            .attribute_names(
                aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessagesNotVisible,
            )
            .send()
            .await
            .unwrap();
        let attrs = out.attributes().unwrap();
        attrs.values().map(|v| v.parse::<u64>().unwrap_or(0)).sum()
    }

    /// chat-stream settings that point at this stack.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("TABLE_NAME", self.table.clone()),
            ("TURN_QUEUE_URL", self.queue_url.clone()),
        ]
    }
}

fn uuid_like() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}
