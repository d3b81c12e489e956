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

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("keys") {
        return runner::keys_command(&args[1..]).await;
    }
    runner::run("chat-stream", args, |config: Config| async move {
        let bind_addr = config.bind_addr;
        let router = app(build_state(config).await?);
        if in_lambda() {
            lambda_http::run_with_streaming_response(router).await
        } else {
            serve_local(router, bind_addr, "chat-stream").await
        }
    })
    .await
}
