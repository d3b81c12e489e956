//! chat-stream: `POST /chat` with streamed answers.
//!
//! Under the Lambda runtime (`AWS_LAMBDA_RUNTIME_API` is set) it serves a
//! Function URL with response streaming; otherwise it is a plain local HTTP
//! server on `BIND_ADDR` / `--bind-addr`. Both run the same router from
//! chat-core. Config is read once, clients are built once, here at init.

use std::process::ExitCode;

use chat_core::config::{EnvSource, Layered, flags_to_source};
use chat_core::{Config, app, build_state, logging, server};

#[tokio::main]
async fn main() -> ExitCode {
    let flags = match flags_to_source(std::env::args().skip(1)) {
        Ok(f) => f,
        Err(e) => return fail(&e),
    };
    let config = match Config::from_source(&Layered(flags, EnvSource)) {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    logging::init(config.log_level);
    let bind_addr = config.bind_addr;
    let state = match build_state(config).await {
        Ok(s) => s,
        Err(e) => return fail(&e),
    };
    let router = app(state);

    if std::env::var_os("AWS_LAMBDA_RUNTIME_API").is_some() {
        match lambda_http::run_with_streaming_response(router).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&*e),
        }
    } else {
        let listener = match tokio::net::TcpListener::bind(bind_addr).await {
            Ok(l) => l,
            Err(e) => return fail(&e),
        };
        let addr = listener.local_addr().unwrap_or(bind_addr);
        tracing::info!(url = %format!("http://{addr}"), "chat-stream listening");
        match server::serve(listener, router, server::shutdown_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e),
        }
    }
}

fn fail(e: &dyn std::error::Error) -> ExitCode {
    // stderr and the log both: init errors happen before logging may exist.
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    eprintln!("chat-stream: {msg}");
    tracing::error!(error = %msg, "chat-stream stopped");
    ExitCode::FAILURE
}
