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
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("keys") {
        return keys(&args[1..]).await;
    }
    let flags = match flags_to_source(args) {
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

/// `chat-stream keys create --user ID [--label TEXT]`: makes an API key,
/// stores only its SHA-256 in `TABLE_NAME`, and prints the key once.
async fn keys(args: &[String]) -> ExitCode {
    use std::io::Write;
    let usage = "usage: chat-stream keys create --user ID [--label TEXT]  (TABLE_NAME must be set)";
    let (Some("create"), Ok(flags)) = (
        args.first().map(String::as_str),
        flags_to_source(args.iter().skip(1).cloned()),
    ) else {
        eprintln!("{usage}");
        return ExitCode::from(2);
    };
    let Some(user) = flags
        .get("USER")
        .filter(|u| chat_core::auth::valid_user_id(u))
    else {
        eprintln!("--user must be 1-64 of A-Z a-z 0-9 - _ . @\n{usage}");
        return ExitCode::from(2);
    };
    let Some(table) = std::env::var("TABLE_NAME").ok().filter(|t| !t.is_empty()) else {
        eprintln!("TABLE_NAME is not set\n{usage}");
        return ExitCode::from(2);
    };
    let label = flags.get("LABEL").cloned().unwrap_or_default();
    let store = chat_core::store_for(&table, None, chat_core::StoreRole::Request).await;
    let key = chat_core::auth::new_api_key();
    let hash = chat_core::auth::hash_key(&key);
    if let Err(e) = store
        .put_api_key(&hash, user, &label, chat_core::turn::now_ms())
        .await
    {
        return fail(&e);
    }
    let mut out = std::io::stdout();
    let _ = writeln!(out, "{key}");
    eprintln!("API key for user {user} stored as sha256 {hash}; it is shown only once.");
    ExitCode::SUCCESS
}

fn fail(e: &dyn std::error::Error) -> ExitCode {
    chat_core::logging::fail("chat-stream", e)
}
