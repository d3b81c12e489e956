//! cache-warmer: refreshes the most asked cached answers before they
//! expire, within a budget.
//!
//! Under the Lambda runtime it is the EventBridge schedule's target and
//! returns the run's report. Otherwise it runs once, or with `--every SECS`
//! on a local timer (what `make run` does). It reads only what it uses:
//! the providers, `REDIS_URL`, the cache, the breaker and the `WARM_*`
//! budget. The logic is `chat_core::cache::warmer`.

use std::process::ExitCode;
use std::sync::Arc;

use chat_core::cache::warmer::{run_local, run_once};
use chat_core::config::WarmerConfig;
use chat_core::runner::{self, in_lambda};
use lambda_runtime::{LambdaEvent, service_fn};

/// One thread in Lambda (an environment runs one invocation at a time),
/// a worker per core locally: [`runner::block_on`].
fn main() -> ExitCode {
    runner::block_on("cache-warmer", run())
}

async fn run() -> ExitCode {
    let args = std::env::args().skip(1).collect();
    runner::run("cache-warmer", args, |config: WarmerConfig| async move {
        let warmer = Arc::new(chat_core::build_warmer(&config).await?);
        if !in_lambda() {
            return run_local(&warmer, &config.budget, config.every).await;
        }
        let budget = config.budget;
        let handler = service_fn(move |event: LambdaEvent<serde_json::Value>| {
            let warmer = warmer.clone();
            async move { run_once(&warmer, &budget, event.context.xray_trace_id.as_deref()).await }
        });
        lambda_runtime::run(handler).await
    })
    .await
}
