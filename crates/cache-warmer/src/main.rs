//! cache-warmer: refreshes the most asked cached answers before they
//! expire, within a budget.
//!
//! Under the Lambda runtime it is the EventBridge schedule's target and
//! returns the run's report. Otherwise it runs once, or with `--every SECS`
//! on a local timer (what `make run` does). Configuration is chat-stream's
//! (model providers, `REDIS_URL`, the cache) plus the `WARM_*` budget; the
//! logic is `chat_core::warmer`.

use std::process::ExitCode;
use std::time::Duration;

use chat_core::config::{EnvSource, Layered, flags_to_source};
use chat_core::warmer::{WarmBudget, warm};
use chat_core::{AppState, Config, build_state};
use lambda_runtime::{Error, LambdaEvent, service_fn};

#[tokio::main]
async fn main() -> ExitCode {
    let flags = match flags_to_source(std::env::args().skip(1)) {
        Ok(f) => f,
        Err(e) => return fail(&e),
    };
    let source = Layered(flags, EnvSource);
    let config = match Config::from_source(&source) {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    chat_core::logging::init(config.log_level);
    let ttl = config
        .cache
        .as_ref()
        .map_or(Duration::from_secs(3600), |c| c.policy.ttl);
    let budget = match WarmBudget::from_source(&source, ttl) {
        Ok(b) => b,
        Err(e) => return fail(&e),
    };
    let every = match source.0.get("EVERY").map(|v| v.parse::<u64>()) {
        None => None,
        Some(Ok(s)) if s > 0 => Some(Duration::from_secs(s)),
        Some(_) => {
            return fail(&chat_core::ConfigError::new(
                "--every",
                "must be a whole number of seconds above 0",
            ));
        }
    };
    let state = match build_state(config).await {
        Ok(s) => s,
        Err(e) => return fail(&e),
    };

    if std::env::var_os("AWS_LAMBDA_RUNTIME_API").is_some() {
        let handler = service_fn(move |_event: LambdaEvent<serde_json::Value>| {
            let state = state.clone();
            async move { run_once(&state, &budget).await }
        });
        return match lambda_runtime::run(handler).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&*e),
        };
    }
    let Some(every) = every else {
        return match run_once(&state, &budget).await {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => fail(&*e),
        };
    };
    tracing::info!(
        every_secs = every.as_secs(),
        "cache-warmer running on a local timer"
    );
    let mut tick = tokio::time::interval(every);
    let stop = chat_core::server::shutdown_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                // A failed run is logged; the next tick tries again.
                let _ = run_once(&state, &budget).await;
            }
            () = &mut stop => return ExitCode::SUCCESS,
        }
    }
}

/// One run: its report is the function's result and one log line.
async fn run_once(state: &AppState, budget: &WarmBudget) -> Result<serde_json::Value, Error> {
    match warm(state, budget).await {
        Ok(report) => {
            tracing::info!(
                considered = report.considered,
                refreshed = report.refreshed,
                fresh = report.fresh,
                skipped_budget = report.skipped_budget,
                skipped_circuit_open = report.skipped_circuit_open,
                failed = report.failed,
                model_calls = report.model_calls,
                input_tokens = report.input_tokens,
                output_tokens = report.output_tokens,
                elapsed_ms = report.elapsed_ms,
                "cache-warmer run"
            );
            Ok(serde_json::to_value(&report)?)
        }
        Err(e) => {
            tracing::error!(error = %e, "cache-warmer run failed");
            Err(Box::new(e))
        }
    }
}

fn fail(e: &dyn std::error::Error) -> ExitCode {
    chat_core::logging::fail("cache-warmer", e)
}
