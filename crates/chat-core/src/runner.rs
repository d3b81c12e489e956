//! The skeleton every main shares: flags and environment read into the
//! binary's settings once, logging, then the binary's own body (build the
//! clients once, run under Lambda or locally). A failure at any step exits
//! non-zero with the whole error chain on stderr and in the log.

use std::future::Future;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

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
    let t = std::time::Instant::now();
    let read = flags_to_source(args).and_then(|f| {
        let src = Layered(f, EnvSource);
        Ok((S::read(&src)?, crate::obs::ObsConfig::from_source(&src)?))
    });
    let (settings, mut obs) = match read {
        Ok(s) => s,
        Err(e) => return crate::logging::fail(bin, &e),
    };
    obs.level = settings.log_level();
    let t_obs = std::time::Instant::now();
    let xray = crate::obs::init(bin, &obs);
    let obs_init = t_obs.elapsed();
    crate::obs::start_user_key(&obs);
    tracing::info!(
        settings_ms = crate::util::ms(t.elapsed()),
        obs_init_ms = crate::util::ms(obs_init),
        xray,
        metrics = obs.metrics,
        "{bin} settings read"
    );
    match body(settings).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => crate::logging::fail(bin, &*e),
    }
}

/// Whether this process runs under the Lambda runtime.
pub fn in_lambda() -> bool {
    std::env::var_os("AWS_LAMBDA_RUNTIME_API").is_some()
}

/// Runs `main` to its end on the runtime this process needs. In Lambda an
/// environment serves one invocation at a time: one thread runs it, with
/// no wake-ups handed between threads (on two shared cores those were a
/// third of a cache hit's profile) and no idle workers to start at a cold
/// start. Locally a worker per core (`TOKIO_WORKER_THREADS` sets the
/// count).
pub fn block_on<F: Future<Output = ExitCode>>(bin: &str, main: F) -> ExitCode {
    let runtime = if in_lambda() {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
    };
    match runtime {
        Ok(runtime) => runtime.block_on(main),
        Err(e) => {
            eprintln!("{bin}: could not start the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
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

const KEYS_USAGE: &str = "usage: chat-stream keys create --user ID [--label TEXT]
       chat-stream keys list --user ID
       chat-stream keys disable --user ID --hash SHA256
       chat-stream keys enable --user ID --hash SHA256
(TABLE_NAME must be set; a disabled key is refused within a minute, the
time each instance keeps a looked-up key)";

/// What every admin subcommand starts from: the verb, the `--flags`, a
/// valid `--user`, and the table (`TABLE_NAME`).
struct Admin {
    verb: String,
    flags: std::collections::HashMap<String, String>,
    user: String,
    store: crate::persistence::store::Store,
}

/// Reads [`Admin`] from the arguments; a usage error (exit 2, with
/// `usage_text`) otherwise.
async fn admin_args(args: &[String], usage_text: &str) -> Result<Admin, ExitCode> {
    let usage = |why: &str| {
        eprintln!("{why}\n{usage_text}");
        ExitCode::from(2)
    };
    let (Some(verb), Ok(flags)) = (
        args.first().cloned(),
        flags_to_source(args.iter().skip(1).cloned()),
    ) else {
        return Err(usage("a subcommand and --flags are needed"));
    };
    let Some(user) = flags
        .get("USER")
        .filter(|u| crate::auth::valid_user_id(u))
        .cloned()
    else {
        return Err(usage("--user must be 1-64 of A-Z a-z 0-9 - _ . @"));
    };
    let Some(table) = std::env::var("TABLE_NAME").ok().filter(|t| !t.is_empty()) else {
        return Err(usage("TABLE_NAME is not set"));
    };
    let store = crate::persistence::store::store_for(
        &table,
        None,
        crate::persistence::store::StoreRole::Request,
    )
    .await;
    Ok(Admin {
        verb,
        flags,
        user,
        store,
    })
}

/// `chat-stream keys create|list|disable|enable`: API keys without editing
/// items by hand. Only a key's SHA-256 is stored; `create` prints the key
/// once.
pub async fn keys_command(args: &[String]) -> ExitCode {
    use std::io::Write;
    let usage = |why: &str| {
        eprintln!("{why}\n{KEYS_USAGE}");
        ExitCode::from(2)
    };
    let Admin {
        verb,
        flags,
        user,
        store,
    } = match admin_args(args, KEYS_USAGE).await {
        Ok(a) => a,
        Err(code) => return code,
    };
    let (verb, user) = (verb.as_str(), user.as_str());
    let mut out = std::io::stdout();
    let hash = || {
        flags
            .get("HASH")
            .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
            .map(|h| h.to_ascii_lowercase())
    };
    match verb {
        "create" => {
            let label = flags.get("LABEL").cloned().unwrap_or_default();
            let key = crate::auth::new_api_key();
            let hash = crate::auth::hash_key(&key);
            if let Err(e) = store
                .put_api_key(&hash, user, &label, crate::util::now_ms())
                .await
            {
                return crate::logging::fail("chat-stream", &e);
            }
            let _ = writeln!(out, "{key}");
            eprintln!("API key for user {user} stored as sha256 {hash}; it is shown only once.");
        }
        "list" => match store.list_api_keys(user).await {
            Ok(keys) => {
                for (hash, label, created, disabled) in keys {
                    let state = if disabled { "disabled" } else { "enabled" };
                    let when = crate::util::rfc3339(created);
                    let _ = writeln!(out, "{hash}\t{state}\t{when}\t{label}");
                }
            }
            Err(e) => return crate::logging::fail("chat-stream", &e),
        },
        "disable" | "enable" => {
            let Some(hash) = hash() else {
                return usage("--hash must be the key's SHA-256 (64 hex digits; see keys list)");
            };
            match store
                .set_api_key_disabled(&hash, user, verb == "disable")
                .await
            {
                Ok(true) => eprintln!("key {hash} of user {user}: {verb}d"),
                Ok(false) => {
                    eprintln!("no key {hash} of user {user}");
                    return ExitCode::from(1);
                }
                Err(e) => return crate::logging::fail("chat-stream", &e),
            }
        }
        other => return usage(&format!("unknown subcommand {other:?}")),
    }
    ExitCode::SUCCESS
}

const USERS_USAGE: &str = "usage: chat-stream users erase --user ID
(TABLE_NAME must be set; with REDIS_URL [REDIS_CLUSTER] also the user's
popularity records, the cached answers they lead to, and recent-turns
buffers)";

/// `chat-stream users erase --user ID`: removes everything stored for a
/// user: conversations (summaries, turns, answer parts), usage counters,
/// API keys, and with Redis their popularity records, the cached answers
/// those name and the recent-turns buffers. Prints a JSON report.
pub async fn users_command(args: &[String]) -> ExitCode {
    use std::io::Write;
    let Admin {
        verb, user, store, ..
    } = match admin_args(args, USERS_USAGE).await {
        Ok(a) => a,
        Err(code) => return code,
    };
    if verb != "erase" {
        eprintln!("unknown subcommand {verb:?}\n{USERS_USAGE}");
        return ExitCode::from(2);
    }
    let user = user.as_str();
    let erased = match store.erase_user(user).await {
        Ok(e) => e,
        Err(e) => return crate::logging::fail("chat-stream", &e),
    };
    let mut report = serde_json::json!({
        "user": user,
        "conversations": erased.conversations,
        "items": erased.items,
        "api_keys": erased.api_keys,
    });
    if let Some(url) = std::env::var("REDIS_URL").ok().filter(|u| !u.is_empty()) {
        let cluster = std::env::var("REDIS_CLUSTER").is_ok_and(|v| v == "true");
        let timeout = Duration::from_secs(2);
        let link = match crate::redis::RedisLink::new(&url, timeout, cluster) {
            Ok(l) => std::sync::Arc::new(l),
            Err(e) => return crate::logging::fail("chat-stream", &e),
        };
        let popular = crate::cache::popular::Popularity::new(
            link.clone(),
            timeout,
            crate::cache::popular::PopularityConfig {
                max_entries: 500,
                half_life: Duration::from_secs(6 * 3600),
            },
        );
        let Some(keys) = popular.forget_scope(&format!("user:{user}")).await else {
            eprintln!("chat-stream: Redis did not answer; the popularity records were not erased");
            return ExitCode::FAILURE;
        };
        let cache = crate::cache::redis::RedisCache::new(link.clone(), timeout);
        let redis_deleted = cache.delete(&keys).await;
        // The table's cache too (CACHE_BACKEND=dynamodb keeps entries there).
        let mut table_deleted = true;
        for k in &keys {
            table_deleted &= store.cache_delete(k).await.is_ok();
        }
        let buffers = crate::persistence::history::RecentBuffer::new(
            link,
            crate::persistence::history::HistoryLimits {
                max_turns: 1,
                max_tokens: 1,
                buffer_ttl: Duration::from_secs(1),
            },
        );
        for id in &erased.conversation_ids {
            buffers.forget(id).await;
        }
        report["popular_questions"] = serde_json::json!(keys.len());
        report["cached_answers_deleted"] = serde_json::json!(redis_deleted && table_deleted);
    } else {
        report["popular_questions"] = serde_json::Value::Null;
        report["note"] = serde_json::json!(
            "no REDIS_URL: popularity records and cached answers were not reached; cached answers expire with CACHE_TTL_SECS"
        );
    }
    let _ = writeln!(std::io::stdout(), "{report}");
    ExitCode::SUCCESS
}
