//! The skeleton every main shares: flags and environment read into the
//! binary's settings once, logging, then the binary's own body (build the
//! clients once, run under Lambda or locally). A failure at any step exits
//! non-zero with the whole error chain on stderr and in the log.

use std::future::Future;
use std::net::SocketAddr;
use std::process::ExitCode;

use crate::config::{
    Config, ConfigError, ConfigSource, EnvSource, Layered, WarmerConfig, WriterConfig,
    flags_to_source,
};

/// What a main's body may fail with (Lambda's runtime uses the same type).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Settings a binary reads once at start.
pub trait Settings: Sized {
    fn read(src: &dyn ConfigSource) -> Result<Self, ConfigError>;
    fn log_level(&self) -> tracing::Level;
}

impl Settings for Config {
    fn read(src: &dyn ConfigSource) -> Result<Self, ConfigError> {
        Config::from_source(src)
    }
    fn log_level(&self) -> tracing::Level {
        self.log_level
    }
}

impl Settings for WriterConfig {
    fn read(src: &dyn ConfigSource) -> Result<Self, ConfigError> {
        WriterConfig::from_source(src)
    }
    fn log_level(&self) -> tracing::Level {
        self.log_level
    }
}

impl Settings for WarmerConfig {
    fn read(src: &dyn ConfigSource) -> Result<Self, ConfigError> {
        WarmerConfig::from_source(src)
    }
    fn log_level(&self) -> tracing::Level {
        self.log_level
    }
}

/// Reads `S` from `args` (flags like `--bind-addr`) over the environment,
/// starts logging, and runs `body` with it.
pub async fn run<S, F, Fut>(bin: &str, args: Vec<String>, body: F) -> ExitCode
where
    S: Settings,
    F: FnOnce(S) -> Fut,
    Fut: Future<Output = Result<(), BoxError>>,
{
    let settings = match flags_to_source(args).and_then(|f| S::read(&Layered(f, EnvSource))) {
        Ok(s) => s,
        Err(e) => return crate::logging::fail(bin, &e),
    };
    crate::logging::init(settings.log_level());
    match body(settings).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => crate::logging::fail(bin, &*e),
    }
}

/// Whether this process runs under the Lambda runtime.
pub fn in_lambda() -> bool {
    std::env::var_os("AWS_LAMBDA_RUNTIME_API").is_some()
}

/// The local server mode: `router` on `addr` until Ctrl-C or SIGTERM.
pub async fn serve_local(
    router: axum::Router,
    addr: SocketAddr,
    name: &str,
) -> Result<(), BoxError> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let addr = listener.local_addr().unwrap_or(addr);
    tracing::info!(url = %format!("http://{addr}"), "{name} listening");
    crate::server::serve(listener, router, crate::server::shutdown_signal()).await?;
    Ok(())
}

/// `chat-stream keys create --user ID [--label TEXT]`: makes an API key,
/// stores only its SHA-256 in `TABLE_NAME`, and prints the key once.
pub async fn keys_command(args: &[String]) -> ExitCode {
    use std::io::Write;
    let usage = "usage: chat-stream keys create --user ID [--label TEXT]  (TABLE_NAME must be set)";
    let (Some("create"), Ok(flags)) = (
        args.first().map(String::as_str),
        flags_to_source(args.iter().skip(1).cloned()),
    ) else {
        eprintln!("{usage}");
        return ExitCode::from(2);
    };
    let Some(user) = flags.get("USER").filter(|u| crate::auth::valid_user_id(u)) else {
        eprintln!("--user must be 1-64 of A-Z a-z 0-9 - _ . @\n{usage}");
        return ExitCode::from(2);
    };
    let Some(table) = std::env::var("TABLE_NAME").ok().filter(|t| !t.is_empty()) else {
        eprintln!("TABLE_NAME is not set\n{usage}");
        return ExitCode::from(2);
    };
    let label = flags.get("LABEL").cloned().unwrap_or_default();
    let store = crate::persistence::store::store_for(
        &table,
        None,
        crate::persistence::store::StoreRole::Request,
    )
    .await;
    let key = crate::auth::new_api_key();
    let hash = crate::auth::hash_key(&key);
    if let Err(e) = store
        .put_api_key(&hash, user, &label, crate::util::now_ms())
        .await
    {
        return crate::logging::fail("chat-stream", &e);
    }
    let mut out = std::io::stdout();
    let _ = writeln!(out, "{key}");
    eprintln!("API key for user {user} stored as sha256 {hash}; it is shown only once.");
    ExitCode::SUCCESS
}
