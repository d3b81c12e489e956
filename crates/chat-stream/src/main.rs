//! chat-stream: `POST /chat` with streamed answers.
//!
//! Under the Lambda runtime it serves a Function URL with response
//! streaming; otherwise it is a plain local HTTP server on `BIND_ADDR` /
//! `--bind-addr`. Both run the same router from chat-core; config is read
//! and clients are built once, at init. `chat-stream keys create ...`
//! manages API keys.

use std::process::ExitCode;

use chat_core::runner::{self, in_lambda, serve_local};
use chat_core::{Config, app, build_state};

/// mimalloc, not glibc's malloc: a cache hit allocates and frees a few
/// hundred small blocks, and glibc's malloc/free were about a sixth of the
/// process's CPU in a profile of 20 concurrent hits. Built without
/// transparent huge pages (`no_thp`): with them, 1,000 slow streams held
/// 128 MiB instead of 87. Figures: BENCHMARKS.md (issue 17, third pass).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    runner::block_on("chat-stream", run())
}

async fn run() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("keys") => return runner::keys_command(&args[1..]).await,
        Some("users") => return runner::users_command(&args[1..]).await,
        _ => {}
    }
    runner::run("chat-stream", args, |config: Config| async move {
        let (bind_addr, origins) = (config.bind_addr, config.cors_allow_origins.clone());
        let dev = config.auth == chat_core::auth::AuthMode::Dev;
        let router = app(build_state(config).await?);
        // The pseudonym key was read beside the rest of init.
        chat_core::obs::user_key_ready().await?;
        if in_lambda() {
            let router = chat_core::api::with_client_addr(router, source_ip);
            let router = chat_core::api::with_trace(router, trace_header);
            let endpoint = std::env::var("AWS_LAMBDA_RUNTIME_API").unwrap_or_default();
            let router = chat_core::api::with_runtime_nodelay(router, &endpoint);
            lambda_http::run_with_streaming_response(router).await
        } else {
            // The template's Function URL CORS policy, when origins are set.
            let router = chat_core::api::with_local_trace(router);
            let router = if origins.is_empty() {
                router
            } else {
                router.layer(chat_core::api::local_cors(&origins, dev))
            };
            serve_local(router, bind_addr, "chat-stream").await
        }
    })
    .await
}

/// The caller's address as the Function URL saw it (the event's
/// `requestContext.http.sourceIp`), never a header the caller wrote.
fn source_ip(extensions: &lambda_http::http::Extensions) -> Option<String> {
    match extensions.get::<lambda_http::request::RequestContext>()? {
        lambda_http::request::RequestContext::ApiGatewayV2(c) => c.http.source_ip.clone(),
        _ => None,
    }
}

/// The invocation's X-Ray trace header (`Lambda-Runtime-Trace-Id`).
fn trace_header(extensions: &lambda_http::http::Extensions) -> Option<String> {
    extensions
        .get::<lambda_http::Context>()?
        .xray_trace_id
        .clone()
}
