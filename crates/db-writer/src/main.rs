//! db-writer: completed turns from SQS into DynamoDB.
//!
//! Under the Lambda runtime it is the SQS event source's handler and
//! returns partial batch failures. Otherwise it is the local poller: it
//! reads `TURN_QUEUE_URL` the way the event source mapping would and calls
//! the same handler. The logic is in `chat_core::persistence::writer`.

use std::process::ExitCode;

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent};
use chat_core::config::WriterConfig;
use chat_core::persistence::writer::{batch_span, build_store, handle_batch, poll_local};
use chat_core::runner::{self, in_lambda};
use lambda_runtime::{Error, LambdaEvent, service_fn};
use tracing::Instrument;

/// One thread in Lambda (an environment runs one invocation at a time),
/// a worker per core locally: [`runner::block_on`].
fn main() -> ExitCode {
    runner::block_on("db-writer", run())
}

async fn run() -> ExitCode {
    let args = std::env::args().skip(1).collect();
    runner::run("db-writer", args, |config: WriterConfig| async move {
        let store = build_store(&config).await;
        if !in_lambda() {
            return poll_local(&store, &config).await;
        }
        let handler = service_fn(move |event: LambdaEvent<SqsEvent>| {
            let store = store.clone();
            async move {
                // One trace per invocation (Lambda's header); each turn
                // continues the trace it was sent from.
                let span = batch_span(event.context.xray_trace_id.as_deref());
                let (resp, _) = handle_batch(&store, &event.payload).instrument(span).await;
                Ok::<SqsBatchResponse, Error>(resp)
            }
        });
        lambda_runtime::run(handler).await
    })
    .await
}
