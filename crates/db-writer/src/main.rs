//! db-writer: completed turns from SQS into DynamoDB.
//!
//! Under the Lambda runtime (`AWS_LAMBDA_RUNTIME_API` is set) it is the SQS
//! event source's handler and returns partial batch failures. Otherwise it
//! is the local poller: it reads `TURN_QUEUE_URL` the way the event source
//! mapping would (batch size, batching window, delete on success, failures
//! left for redelivery and the DLQ) and calls the same handler. The logic
//! is in `chat_core::writer` and `chat_core::store`.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent};
use chat_core::config::{EnvSource, Layered, WriterConfig, flags_to_source};
use chat_core::writer::{PollerConfig, handle_batch, poll_loop};
use lambda_runtime::{Error, LambdaEvent, service_fn};

#[tokio::main]
async fn main() -> ExitCode {
    let flags = match flags_to_source(std::env::args().skip(1)) {
        Ok(f) => f,
        Err(e) => return fail(&e),
    };
    let config = match WriterConfig::from_source(&Layered(flags, EnvSource)) {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    chat_core::logging::init(config.log_level);
    let store = Arc::new(
        chat_core::store_for(
            &config.table,
            config.retention,
            chat_core::StoreRole::Writer,
        )
        .await,
    );

    if std::env::var_os("AWS_LAMBDA_RUNTIME_API").is_some() {
        let handler = service_fn(move |event: LambdaEvent<SqsEvent>| {
            let store = store.clone();
            async move {
                let (resp, _) = handle_batch(&store, &event.payload).await;
                Ok::<SqsBatchResponse, Error>(resp)
            }
        });
        return match lambda_runtime::run(handler).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&*e),
        };
    }

    let Some(queue_url) = config.queue_url else {
        return fail(&chat_core::ConfigError::new(
            "TURN_QUEUE_URL",
            "not set (the queue the local poller reads)",
        ));
    };
    let sdk = chat_core::aws_sdk_config(Duration::from_secs(25), Duration::from_secs(30)).await;
    let sqs = aws_sdk_sqs::Client::new(&sdk);
    let cfg = PollerConfig {
        queue_url,
        batch_size: config.batch_size,
        batching_window: config.batching_window,
        wait: Duration::from_secs(1),
    };
    tracing::info!(queue = %cfg.queue_url, table = %config.table, "db-writer polling");
    poll_loop(&store, &sqs, &cfg, async {
        chat_core::server::shutdown_signal().await;
    })
    .await;
    ExitCode::SUCCESS
}

fn fail(e: &dyn std::error::Error) -> ExitCode {
    chat_core::logging::fail("db-writer", e)
}
