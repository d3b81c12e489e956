//! Typed configuration, parsed once at init from an injectable source.
//!
//! Production reads the process environment ([`EnvSource`]); tests pass a
//! `HashMap`. Every variable is validated here, and a bad value fails init
//! with an error naming the variable, so a misconfigured function never
//! serves traffic. Secrets are wrapped in [`Secret`], whose `Debug` and
//! `Display` never show the value.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

/// Where configuration values come from.
pub trait ConfigSource {
    fn get(&self, key: &str) -> Option<String>;
}

/// The process environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct EnvSource;

impl ConfigSource for EnvSource {
    fn get(&self, key: &str) -> Option<String> {
        std::env::var(key).ok()
    }
}

impl ConfigSource for HashMap<String, String> {
    fn get(&self, key: &str) -> Option<String> {
        HashMap::get(self, key).cloned()
    }
}

impl ConfigSource for HashMap<&str, &str> {
    fn get(&self, key: &str) -> Option<String> {
        HashMap::get(self, key).map(|v| (*v).to_owned())
    }
}

/// Looks in `first`, then in `second`: e.g. command-line flags over the
/// environment.
pub struct Layered<A, B>(pub A, pub B);

impl<A: ConfigSource, B: ConfigSource> ConfigSource for Layered<A, B> {
    fn get(&self, key: &str) -> Option<String> {
        self.0.get(key).or_else(|| self.1.get(key))
    }
}

/// Turns `--bind-addr 1.2.3.4:5` / `--bind-addr=..` flags into config keys
/// (`BIND_ADDR`), so flags and env vars share one set of names and one parser.
pub fn flags_to_source(
    args: impl IntoIterator<Item = String>,
) -> Result<HashMap<String, String>, ConfigError> {
    let mut out = HashMap::new();
    let mut it = args.into_iter();
    while let Some(arg) = it.next() {
        let Some(flag) = arg.strip_prefix("--") else {
            return Err(ConfigError::new(
                "arguments",
                format!("unexpected argument {arg:?}; flags look like --bind-addr=127.0.0.1:3000"),
            ));
        };
        let (name, value) = match flag.split_once('=') {
            Some((n, v)) => (n.to_owned(), v.to_owned()),
            None => {
                let v = it
                    .next()
                    .ok_or_else(|| ConfigError::new(flag, "flag needs a value"))?;
                (flag.to_owned(), v)
            }
        };
        out.insert(name.replace('-', "_").to_ascii_uppercase(), value);
    }
    Ok(out)
}

/// A value that must never be logged.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// A configuration value was missing or malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("configuration {variable}: {problem}")]
pub struct ConfigError {
    pub variable: String,
    pub problem: String,
}

impl ConfigError {
    pub fn new(variable: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            variable: variable.into(),
            problem: problem.into(),
        }
    }
}

/// Where the model API key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiKeySource {
    /// `ANTHROPIC_API_KEY` (local runs).
    Value(Secret),
    /// `..._API_KEY_SECRET_ARN`: fetched from Secrets Manager at init.
    /// `var` names the variable, for errors.
    SecretsManager { arn: String, var: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnthropicConfig {
    pub base_url: String,
    pub api_key: ApiKeySource,
    pub version: String,
}

/// An OpenAI-compatible endpoint (OpenAI, Groq, vLLM, llama.cpp server).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenAiConfig {
    /// Including the version path, e.g. `https://api.openai.com/v1`.
    pub base_url: String,
    /// Local servers often need none.
    pub api_key: Option<ApiKeySource>,
}

/// Deadlines for one model call. See README "Configuration".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub connect: Duration,
    pub first_token: Duration,
    pub idle: Duration,
    pub total: Duration,
}

/// Request limits enforced before any upstream work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub max_message_chars: usize,
    pub max_system_chars: usize,
    pub max_tokens: u32,
    pub default_max_tokens: u32,
}

/// How callers prove who they are (see [`crate::auth`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthMode {
    /// API keys: hashes in the table and/or a fixed list.
    ApiKey {
        /// `API_KEY_HASHES` (`hash:user,...`) or `..._SECRET_ARN`.
        hashes: Option<ApiKeySource>,
    },
    /// Local development only: `x-dev-user` is trusted.
    Dev,
}

/// Response cache settings (see [`crate::cache`]).
#[derive(Debug, Clone, PartialEq)]
pub struct CacheConfig {
    pub policy: crate::cache::CachePolicy,
    /// `CACHE_BACKEND`: `redis` (default with `REDIS_URL`) or `dynamodb`
    /// (items in `TABLE_NAME`; no VPC needed).
    pub backend: CacheBackend,
    /// How often each cacheable request is asked, for the cache-warmer
    /// (needs Redis).
    pub popularity: Option<crate::popular::PopularityConfig>,
    /// The DynamoDB backend's table: `CACHE_TABLE_NAME`, else `TABLE_NAME`.
    pub dynamodb_table: Option<String>,
    /// `CACHE_DYNAMODB_TIMEOUT_MS` (default 250): the longest one DynamoDB
    /// cache call may take.
    pub dynamodb_timeout: Duration,
    /// Entries are per user (`user`, default) or shared by all (`global`).
    pub global_scope: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheBackend {
    Redis,
    DynamoDb,
}

/// Where turns are stored. Off when `TABLE_NAME` is unset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PersistenceConfig {
    pub table: String,
    /// `TURN_QUEUE_URL`; unset: turns are written to the table directly.
    pub queue_url: Option<String>,
    /// `AWS_ENDPOINT_URL_SQS`, when set in the config source (the SDK also
    /// reads it from the process environment).
    pub sqs_endpoint_url: Option<String>,
    /// `TURN_QUEUE_TIMEOUT_MS` (default 2000): the longest a send to SQS
    /// may take, retries included, before the turn is written directly.
    pub queue_timeout: Duration,
    /// `RETENTION_DAYS`; items expire (DynamoDB TTL) this long after their
    /// last update. Unset or 0: kept.
    pub retention: Option<Duration>,
}

/// Amazon Bedrock through the AWS SDK (IAM credentials, no key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BedrockConfig {
    /// `BEDROCK_REGION`; else the SDK's region (`AWS_REGION`).
    pub region: Option<String>,
    /// `AWS_ENDPOINT_URL_BEDROCK_RUNTIME`: a stand-in such as model-sim.
    pub endpoint_url: Option<String>,
}

/// What happens when a model call fails before the first text.
#[derive(Debug, Clone, PartialEq)]
pub struct Resilience {
    pub retry: crate::resilience::RetryPolicy,
    /// Share of requests that may be retried (a retry budget), e.g. 0.2.
    pub retry_budget_ratio: f64,
    pub breaker: crate::resilience::BreakerConfig,
    /// Models tried, in order, after the requested (or default) one fails.
    pub fallbacks: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub bind_addr: SocketAddr,
    pub log_level: tracing::Level,
    /// Configured when `ANTHROPIC_API_KEY` or `..._SECRET_ARN` is set.
    pub anthropic: Option<AnthropicConfig>,
    /// Configured when `OPENAI_API_KEY`, `..._SECRET_ARN` or `OPENAI_BASE_URL` is set.
    pub openai: Option<OpenAiConfig>,
    /// Configured when `BEDROCK_ENABLED=true`.
    pub bedrock: Option<BedrockConfig>,
    /// Provider of model names without a `provider:` prefix.
    pub default_provider: String,
    pub routing: crate::routing::Routing,
    pub timeouts: Timeouts,
    pub limits: Limits,
    pub resilience: Resilience,
    /// `redis://` or `rediss://`; shares rate limits and breakers across
    /// instances. May hold a password, so it is a secret.
    pub redis_url: Option<Secret>,
    pub redis_timeout: Duration,
    pub rate_limits: crate::fleet::RateLimits,
    /// Open the upstream connection at init so the first request does not
    /// pay for TCP + TLS.
    pub prewarm: bool,
    pub auth: AuthMode,
    /// The response cache, when on (`CACHE_ENABLED`, default on with
    /// `REDIS_URL`).
    pub cache: Option<CacheConfig>,
    /// Resumable, followable answer streams (needs Redis; see
    /// [`crate::live`]).
    pub live: Option<crate::live::LiveConfig>,
    pub persistence: Option<PersistenceConfig>,
    pub history: crate::history::HistoryLimits,
}

struct Reader<'a, S: ConfigSource + ?Sized>(&'a S);

impl<S: ConfigSource + ?Sized> Reader<'_, S> {
    fn string(&self, key: &str) -> Option<String> {
        self.0
            .get(key)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    }

    fn parse<T: std::str::FromStr>(
        &self,
        key: &str,
        default: T,
        what: &str,
    ) -> Result<T, ConfigError> {
        match self.string(key) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| ConfigError::new(key, format!("{v:?} is not {what}"))),
        }
    }

    fn ms(&self, key: &str, default_ms: u64) -> Result<Duration, ConfigError> {
        let v: u64 = self.parse(key, default_ms, "a whole number of milliseconds")?;
        if v == 0 {
            return Err(ConfigError::new(key, "must be greater than 0"));
        }
        Ok(Duration::from_millis(v))
    }

    fn bool(&self, key: &str, default: bool) -> Result<bool, ConfigError> {
        match self.string(key).map(|v| v.to_ascii_lowercase()) {
            None => Ok(default),
            Some(v) if matches!(v.as_str(), "1" | "true" | "yes" | "on") => Ok(true),
            Some(v) if matches!(v.as_str(), "0" | "false" | "no" | "off") => Ok(false),
            Some(v) => Err(ConfigError::new(key, format!("{v:?} is not true or false"))),
        }
    }

    fn ranged<T>(&self, key: &str, default: T, min: T, max: T) -> Result<T, ConfigError>
    where
        T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy,
    {
        let v = self.parse(key, default, "a whole number")?;
        if v < min || v > max {
            return Err(ConfigError::new(
                key,
                format!("{v} is outside {min}..={max}"),
            ));
        }
        Ok(v)
    }
}

/// `NAME` (a value) or `NAME_SECRET_ARN` (Secrets Manager), if either is set.
fn key_source<S: ConfigSource + ?Sized>(
    r: &Reader<'_, S>,
    name: &str,
) -> Result<Option<ApiKeySource>, ConfigError> {
    let arn_var = format!("{name}_SECRET_ARN");
    match (r.string(name), r.string(&arn_var)) {
        (Some(k), _) => Ok(Some(ApiKeySource::Value(Secret::new(k)))),
        (None, Some(arn)) if arn.starts_with("arn:") => {
            Ok(Some(ApiKeySource::SecretsManager { arn, var: arn_var }))
        }
        (None, Some(arn)) => Err(ConfigError::new(arn_var, format!("{arn:?} is not an ARN"))),
        (None, None) => Ok(None),
    }
}

fn url<S: ConfigSource + ?Sized>(
    r: &Reader<'_, S>,
    var: &str,
    default: &str,
) -> Result<String, ConfigError> {
    let v = r.string(var).unwrap_or_else(|| default.to_owned());
    let v = v.trim_end_matches('/').to_owned();
    if !(v.starts_with("https://") || v.starts_with("http://")) {
        return Err(ConfigError::new(
            var,
            format!("{v:?} must start with http:// or https://"),
        ));
    }
    Ok(v)
}

impl Config {
    pub fn from_source(src: &(impl ConfigSource + ?Sized)) -> Result<Self, ConfigError> {
        let r = Reader(src);
        let bind_addr = r.parse(
            "BIND_ADDR",
            SocketAddr::from(([127, 0, 0, 1], 3000)),
            "an address like 127.0.0.1:3000",
        )?;
        let log_level = r.parse(
            "LOG_LEVEL",
            tracing::Level::INFO,
            "one of error, warn, info, debug, trace",
        )?;

        let anthropic = match key_source(&r, "ANTHROPIC_API_KEY")? {
            None => None,
            Some(api_key) => Some(AnthropicConfig {
                base_url: url(&r, "ANTHROPIC_BASE_URL", "https://api.anthropic.com")?,
                api_key,
                version: r
                    .string("ANTHROPIC_VERSION")
                    .unwrap_or_else(|| "2023-06-01".to_owned()),
            }),
        };
        let openai_key = key_source(&r, "OPENAI_API_KEY")?;
        let openai = if openai_key.is_some() || r.string("OPENAI_BASE_URL").is_some() {
            Some(OpenAiConfig {
                base_url: url(&r, "OPENAI_BASE_URL", "https://api.openai.com/v1")?,
                api_key: openai_key,
            })
        } else {
            None
        };
        let bedrock = if r.bool("BEDROCK_ENABLED", false)? {
            let endpoint_url = match r.string("AWS_ENDPOINT_URL_BEDROCK_RUNTIME") {
                Some(_) => Some(url(&r, "AWS_ENDPOINT_URL_BEDROCK_RUNTIME", "")?),
                None => None,
            };
            Some(BedrockConfig {
                region: r.string("BEDROCK_REGION"),
                endpoint_url,
            })
        } else {
            None
        };
        if anthropic.is_none() && openai.is_none() && bedrock.is_none() {
            return Err(ConfigError::new(
                "ANTHROPIC_API_KEY",
                "not set (set it, or ANTHROPIC_API_KEY_SECRET_ARN to read it from Secrets Manager, \
                 configure an OpenAI-compatible provider with OPENAI_BASE_URL / OPENAI_API_KEY, \
                 or set BEDROCK_ENABLED=true)",
            ));
        }
        let configured = |p: &str| match p {
            "anthropic" => anthropic.is_some(),
            "openai" => openai.is_some(),
            "bedrock" => bedrock.is_some(),
            _ => false,
        };
        let default_provider = r.string("DEFAULT_PROVIDER").unwrap_or_else(|| {
            if anthropic.is_some() {
                "anthropic"
            } else if openai.is_some() {
                "openai"
            } else {
                "bedrock"
            }
            .to_owned()
        });
        if !configured(&default_provider) {
            return Err(ConfigError::new(
                "DEFAULT_PROVIDER",
                format!(
                    "{default_provider:?} is not a configured provider (anthropic, openai, bedrock)"
                ),
            ));
        }
        let default_model = r.string("DEFAULT_MODEL").unwrap_or_else(|| {
            match default_provider.as_str() {
                "openai" => "gpt-4o-mini",
                "bedrock" => "anthropic.claude-3-5-haiku-20241022-v1:0",
                _ => "claude-sonnet-4-5",
            }
            .to_owned()
        });
        let timeouts = Timeouts {
            connect: r.ms("UPSTREAM_CONNECT_TIMEOUT_MS", 3_000)?,
            first_token: r.ms("UPSTREAM_FIRST_TOKEN_TIMEOUT_MS", 20_000)?,
            idle: r.ms("UPSTREAM_IDLE_TIMEOUT_MS", 30_000)?,
            total: r.ms("UPSTREAM_TOTAL_TIMEOUT_MS", 240_000)?,
        };
        let max_tokens = r.ranged("MAX_TOKENS_LIMIT", 8192u32, 1, 128_000)?;
        let default_max_tokens =
            r.ranged("DEFAULT_MAX_TOKENS", 1024u32.min(max_tokens), 1, max_tokens)?;
        let limits = Limits {
            max_body_bytes: r.ranged("MAX_BODY_BYTES", 256 * 1024usize, 1024, 6 * 1024 * 1024)?,
            max_message_chars: r.ranged("MAX_MESSAGE_CHARS", 100_000usize, 1, 10_000_000)?,
            max_system_chars: r.ranged("MAX_SYSTEM_CHARS", 50_000usize, 0, 10_000_000)?,
            max_tokens,
            default_max_tokens,
        };
        let prewarm = r.bool("UPSTREAM_PREWARM", true)?;
        let retry_budget_ratio: f64 = r.parse("RETRY_BUDGET_RATIO", 0.2, "a number from 0 to 1")?;
        if !(0.0..=1.0).contains(&retry_budget_ratio) {
            return Err(ConfigError::new(
                "RETRY_BUDGET_RATIO",
                format!("{retry_budget_ratio} is outside 0..=1"),
            ));
        }
        let fallbacks: Vec<String> = r
            .string("MODEL_FALLBACKS")
            .map(|v| {
                v.split(',')
                    .map(|m| m.trim().to_owned())
                    .filter(|m| !m.is_empty())
                    .collect()
            })
            .unwrap_or_default();
        if let Some(bad) = fallbacks
            .iter()
            .find(|m| m.len() > 128 || !m.bytes().all(|b| b.is_ascii_graphic()))
        {
            return Err(ConfigError::new(
                "MODEL_FALLBACKS",
                format!("{bad:?} is not a model name"),
            ));
        }
        for (var, m) in std::iter::once(("DEFAULT_MODEL", &default_model))
            .chain(fallbacks.iter().map(|m| ("MODEL_FALLBACKS", m)))
        {
            let p = crate::routing::ModelRef::parse(m, &default_provider).provider;
            if !configured(&p) {
                return Err(ConfigError::new(
                    var,
                    format!("{m:?} needs the {p} provider, which is not configured"),
                ));
            }
        }
        let allowlist = match r.string("MODEL_ALLOWLIST") {
            Some(v) if v == "*" => crate::routing::Allowlist::Any,
            Some(v) => crate::routing::Allowlist::Only(
                v.split(',')
                    .map(|m| m.trim().to_owned())
                    .filter(|m| !m.is_empty())
                    .collect(),
            ),
            // Unset: the models this deployment already names, and no others.
            None => crate::routing::Allowlist::Only(fallbacks.clone()),
        };
        let routing = crate::routing::Routing {
            default_model,
            short_model: r.string("ROUTE_SHORT_MODEL"),
            short_max_chars: r.ranged("ROUTE_SHORT_MAX_CHARS", 200usize, 1, 100_000)?,
            allowlist,
        };
        if let Some(m) = &routing.short_model {
            let p = crate::routing::ModelRef::parse(m, &default_provider).provider;
            if !configured(&p) {
                return Err(ConfigError::new(
                    "ROUTE_SHORT_MODEL",
                    format!("{m:?} needs the {p} provider, which is not configured"),
                ));
            }
        }
        let resilience = Resilience {
            retry: crate::resilience::RetryPolicy {
                max_retries: r.ranged("UPSTREAM_MAX_RETRIES", 2u32, 0, 10)?,
                base: r.ms("UPSTREAM_RETRY_BASE_MS", 100)?,
                max_backoff: r.ms("UPSTREAM_RETRY_MAX_BACKOFF_MS", 2_000)?,
            },
            retry_budget_ratio,
            breaker: crate::resilience::BreakerConfig {
                failures: r.ranged("BREAKER_FAILURES", 5u32, 1, 1000)?,
                window: r.ms("BREAKER_WINDOW_MS", 30_000)?,
                cooldown: r.ms("BREAKER_COOLDOWN_MS", 15_000)?,
            },
            fallbacks,
        };
        let redis_url = r.string("REDIS_URL");
        if let Some(u) = &redis_url {
            if !(u.starts_with("redis://") || u.starts_with("rediss://")) {
                return Err(ConfigError::new(
                    "REDIS_URL",
                    "must start with redis:// or rediss://",
                ));
            }
        }
        let redis_timeout = r.ms("REDIS_TIMEOUT_MS", 50)?;
        let rate_limits = crate::fleet::RateLimits {
            rpm: r.ranged("RATE_LIMIT_RPM", 60u32, 0, 1_000_000)?,
            tpm: r.ranged("RATE_LIMIT_TPM", 200_000u32, 0, 1_000_000_000)?,
        };
        let persistence = match r.string("TABLE_NAME") {
            None => None,
            Some(table) => {
                if !valid_table_name(&table) {
                    return Err(ConfigError::new(
                        "TABLE_NAME",
                        format!("{table:?} is not a DynamoDB table name"),
                    ));
                }
                let queue_url = match r.string("TURN_QUEUE_URL") {
                    Some(_) => Some(url(&r, "TURN_QUEUE_URL", "")?),
                    None => None,
                };
                let days = r.ranged("RETENTION_DAYS", 0u64, 0, 36_500)?;
                let sqs_endpoint_url = match r.string("AWS_ENDPOINT_URL_SQS") {
                    Some(_) => Some(url(&r, "AWS_ENDPOINT_URL_SQS", "")?),
                    None => None,
                };
                Some(PersistenceConfig {
                    table,
                    queue_url,
                    sqs_endpoint_url,
                    queue_timeout: r.ms("TURN_QUEUE_TIMEOUT_MS", 2_000)?,
                    retention: (days > 0).then(|| Duration::from_secs(days * 86_400)),
                })
            }
        };
        let auth = match r
            .string("AUTH_MODE")
            .map(|v| v.to_ascii_lowercase())
            .as_deref()
        {
            None | Some("api_key") | Some("api-key") => {
                let hashes = key_source(&r, "API_KEY_HASHES")?;
                if let Some(ApiKeySource::Value(v)) = &hashes {
                    crate::auth::parse_hash_list(v.expose())
                        .map_err(|e| ConfigError::new("API_KEY_HASHES", e))?;
                }
                if hashes.is_none() && persistence.is_none() {
                    return Err(ConfigError::new(
                        "AUTH_MODE",
                        "api_key needs keys: set TABLE_NAME (keys in the table) or \
                         API_KEY_HASHES / API_KEY_HASHES_SECRET_ARN; \
                         AUTH_MODE=dev is for local runs only",
                    ));
                }
                AuthMode::ApiKey { hashes }
            }
            Some("dev") => {
                if r.string("AWS_LAMBDA_FUNCTION_NAME").is_some() {
                    return Err(ConfigError::new(
                        "AUTH_MODE",
                        "dev trusts any caller and is refused inside Lambda; use api_key",
                    ));
                }
                AuthMode::Dev
            }
            Some(other) => {
                return Err(ConfigError::new(
                    "AUTH_MODE",
                    format!("{other:?} is not api_key or dev"),
                ));
            }
        };
        let history = crate::history::HistoryLimits {
            max_turns: r.ranged("HISTORY_MAX_TURNS", 20u32, 1, 1000)?,
            max_tokens: r.ranged("HISTORY_MAX_TOKENS", 8_000u32, 1, 1_000_000)?,
            buffer_ttl: Duration::from_secs(r.ranged(
                "HISTORY_BUFFER_TTL_SECS",
                86_400u64,
                60,
                30 * 86_400,
            )?),
        };
        let backend = match r
            .string("CACHE_BACKEND")
            .map(|v| v.to_ascii_lowercase())
            .as_deref()
        {
            None => CacheBackend::Redis,
            Some("redis") => CacheBackend::Redis,
            Some("dynamodb") => CacheBackend::DynamoDb,
            Some(other) => {
                return Err(ConfigError::new(
                    "CACHE_BACKEND",
                    format!("{other:?} is not redis or dynamodb"),
                ));
            }
        };
        let dynamodb_table = match r.string("CACHE_TABLE_NAME") {
            Some(t) if !valid_table_name(&t) => {
                return Err(ConfigError::new(
                    "CACHE_TABLE_NAME",
                    format!("{t:?} is not a DynamoDB table name"),
                ));
            }
            Some(t) => Some(t),
            None => persistence.as_ref().map(|p| p.table.clone()),
        };
        let cache_default = match backend {
            CacheBackend::Redis => redis_url.is_some(),
            CacheBackend::DynamoDb => dynamodb_table.is_some(),
        };
        let popularity = match redis_url {
            Some(_) if r.bool("POPULARITY_ENABLED", true)? => {
                Some(crate::popular::PopularityConfig {
                    max_entries: r.ranged("POPULAR_MAX", 500u32, 10, 100_000)?,
                    half_life: Duration::from_secs(r.ranged(
                        "POPULAR_HALF_LIFE_SECS",
                        21_600u64,
                        60,
                        30 * 86_400,
                    )?),
                })
            }
            _ => None,
        };
        let cache = if r.bool("CACHE_ENABLED", cache_default)? {
            match backend {
                CacheBackend::Redis if redis_url.is_none() => {
                    return Err(ConfigError::new(
                        "CACHE_ENABLED",
                        "the redis cache backend needs REDIS_URL (or set CACHE_BACKEND=dynamodb)",
                    ));
                }
                CacheBackend::DynamoDb if dynamodb_table.is_none() => {
                    return Err(ConfigError::new(
                        "CACHE_BACKEND",
                        "the dynamodb cache backend keeps entries in TABLE_NAME (or CACHE_TABLE_NAME); set it",
                    ));
                }
                _ => {}
            }
            let global_scope = match r.string("CACHE_SCOPE").as_deref() {
                None | Some("user") => false,
                Some("global") => true,
                Some(other) => {
                    return Err(ConfigError::new(
                        "CACHE_SCOPE",
                        format!("{other:?} is not user or global"),
                    ));
                }
            };
            Some(CacheConfig {
                policy: crate::cache::CachePolicy {
                    ttl: Duration::from_secs(r.ranged(
                        "CACHE_TTL_SECS",
                        3600u64,
                        1,
                        30 * 86_400,
                    )?),
                    cache_sampled: r.bool("CACHE_SAMPLED", false)?,
                },
                backend,
                popularity,
                dynamodb_table,
                dynamodb_timeout: r.ms("CACHE_DYNAMODB_TIMEOUT_MS", 250)?,
                global_scope,
            })
        } else {
            None
        };
        let live = match redis_url {
            Some(_) if r.bool("LIVE_STREAMS_ENABLED", true)? => Some(crate::live::LiveConfig {
                retention: Duration::from_secs(r.ranged(
                    "RESUME_RETENTION_SECS",
                    300u64,
                    10,
                    86_400,
                )?),
                lease: Duration::from_millis(r.ranged(
                    "COALESCE_LEASE_MS",
                    3_000u64,
                    300,
                    60_000,
                )?),
                coalesce: r.bool("COALESCE_ENABLED", true)? && cache.is_some(),
                finish_on_disconnect: r.bool("FINISH_ON_DISCONNECT", true)?,
            }),
            _ => None,
        };
        Ok(Config {
            cache,
            live,
            auth,
            persistence,
            history,
            redis_url: redis_url.map(Secret::new),
            redis_timeout,
            rate_limits,
            bind_addr,
            log_level,
            anthropic,
            openai,
            bedrock,
            default_provider,
            routing,
            timeouts,
            limits,
            resilience,
            prewarm,
        })
    }
}

/// db-writer's configuration: the table, retention, and (outside Lambda)
/// how the local poller batches.
#[derive(Debug, Clone, PartialEq)]
pub struct WriterConfig {
    pub log_level: tracing::Level,
    pub table: String,
    pub retention: Option<Duration>,
    /// `TURN_QUEUE_URL`: polled when not running under Lambda.
    pub queue_url: Option<String>,
    /// `POLL_BATCH_SIZE` (1-1000, default 100): like the event source
    /// mapping's BatchSize.
    pub batch_size: usize,
    /// `POLL_BATCHING_WINDOW_MS` (default 500): like
    /// MaximumBatchingWindowInSeconds.
    pub batching_window: Duration,
}

impl crate::warmer::WarmBudget {
    /// The budget of one cache-warmer run (`WARM_*`; see the type). The
    /// refresh-ahead default is a fifth of `cache_ttl`.
    pub fn from_source(
        src: &(impl ConfigSource + ?Sized),
        cache_ttl: Duration,
    ) -> Result<Self, ConfigError> {
        let r = Reader(src);
        Ok(Self {
            top: r.ranged("WARM_TOP", 50usize, 1, 10_000)?,
            max_calls: r.ranged("WARM_MAX_CALLS", 20u32, 0, 100_000)?,
            max_tokens: r.ranged("WARM_MAX_TOKENS", 100_000u64, 0, 1_000_000_000)?,
            concurrency: r.ranged("WARM_CONCURRENCY", 4usize, 1, 256)?,
            time_limit: Duration::from_secs(r.ranged("WARM_TIME_LIMIT_SECS", 240u64, 1, 900)?),
            refresh_ahead: Duration::from_secs(r.ranged(
                "WARM_REFRESH_AHEAD_SECS",
                (cache_ttl.as_secs() / 5).max(1),
                0,
                30 * 86_400,
            )?),
        })
    }
}

impl WriterConfig {
    pub fn from_source(src: &(impl ConfigSource + ?Sized)) -> Result<Self, ConfigError> {
        let r = Reader(src);
        let table = r
            .string("TABLE_NAME")
            .ok_or_else(|| ConfigError::new("TABLE_NAME", "not set (the DynamoDB table)"))?;
        let queue_url = match r.string("TURN_QUEUE_URL") {
            Some(_) => Some(url(&r, "TURN_QUEUE_URL", "")?),
            None => None,
        };
        let days = r.ranged("RETENTION_DAYS", 0u64, 0, 36_500)?;
        Ok(Self {
            log_level: r.parse(
                "LOG_LEVEL",
                tracing::Level::INFO,
                "one of error, warn, info, debug, trace",
            )?,
            table,
            retention: (days > 0).then(|| Duration::from_secs(days * 86_400)),
            queue_url,
            batch_size: r.ranged("POLL_BATCH_SIZE", 100usize, 1, 1000)?,
            batching_window: r.ms("POLL_BATCHING_WINDOW_MS", 500)?,
        })
    }
}

fn valid_table_name(table: &str) -> bool {
    (3..=255).contains(&table.len())
        && table
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let mut m: HashMap<&str, &str> = pairs.iter().copied().collect();
        m.entry("ANTHROPIC_API_KEY").or_insert("sk-test-secret");
        m.entry("AUTH_MODE").or_insert("dev");
        Config::from_source(&m)
    }

    #[test]
    fn defaults_are_valid() {
        let c = cfg(&[]).unwrap();
        assert_eq!(
            c.anthropic.as_ref().unwrap().base_url,
            "https://api.anthropic.com"
        );
        assert_eq!(c.default_provider, "anthropic");
        assert_eq!(c.routing.default_model, "claude-sonnet-4-5");
        assert!(c.openai.is_none());
        assert_eq!(c.bind_addr.port(), 3000);
        assert!(c.prewarm);
        assert!(c.limits.default_max_tokens <= c.limits.max_tokens);
    }

    #[test]
    fn cache_backends_live_streams_and_the_warm_budget() {
        // No Redis, no table: no cache, no live streams.
        let c = cfg(&[]).unwrap();
        assert!(c.cache.is_none() && c.live.is_none());
        // Redis: the Redis cache, popularity, live streams with coalescing.
        let c = cfg(&[("REDIS_URL", "rediss://cache.example:6379")]).unwrap();
        let cache = c.cache.unwrap();
        assert_eq!(cache.backend, CacheBackend::Redis);
        assert!(cache.popularity.is_some());
        let live = c.live.unwrap();
        assert!(live.coalesce && live.finish_on_disconnect);
        assert_eq!(live.lease, Duration::from_secs(3));
        // DynamoDB: the table's own, or CACHE_TABLE_NAME; no coalescing
        // without Redis.
        let c = cfg(&[("CACHE_BACKEND", "dynamodb"), ("TABLE_NAME", "chat")]).unwrap();
        let cache = c.cache.unwrap();
        assert_eq!(
            (cache.backend, cache.dynamodb_table.as_deref()),
            (CacheBackend::DynamoDb, Some("chat"))
        );
        assert!(c.live.is_none());
        let c = cfg(&[("CACHE_BACKEND", "dynamodb"), ("CACHE_TABLE_NAME", "cache")]).unwrap();
        assert_eq!(c.cache.unwrap().dynamodb_table.as_deref(), Some("cache"));
        assert_eq!(
            cfg(&[("CACHE_BACKEND", "dynamodb"), ("CACHE_TABLE_NAME", "a b")])
                .unwrap_err()
                .variable,
            "CACHE_TABLE_NAME"
        );
        assert_eq!(
            cfg(&[("CACHE_BACKEND", "dynamodb"), ("CACHE_ENABLED", "true")])
                .unwrap_err()
                .variable,
            "CACHE_BACKEND"
        );
        assert_eq!(
            cfg(&[("CACHE_ENABLED", "true")]).unwrap_err().variable,
            "CACHE_ENABLED"
        );
        // Coalescing needs the cache (it shares its key).
        let c = cfg(&[("REDIS_URL", "redis://r"), ("CACHE_ENABLED", "false")]).unwrap();
        assert!(!c.live.unwrap().coalesce);

        let src: HashMap<&str, &str> = [("WARM_MAX_CALLS", "3")].into_iter().collect();
        let b = crate::warmer::WarmBudget::from_source(&src, Duration::from_secs(3600)).unwrap();
        assert_eq!((b.max_calls, b.top, b.concurrency), (3, 50, 4));
        assert_eq!(b.refresh_ahead, Duration::from_secs(720));
        let bad: HashMap<&str, &str> = [("WARM_CONCURRENCY", "0")].into_iter().collect();
        assert_eq!(
            crate::warmer::WarmBudget::from_source(&bad, Duration::from_secs(60))
                .unwrap_err()
                .variable,
            "WARM_CONCURRENCY"
        );
    }

    #[test]
    fn bad_values_name_the_variable() {
        for (k, v) in [
            ("BIND_ADDR", "nope"),
            ("UPSTREAM_IDLE_TIMEOUT_MS", "-1"),
            ("UPSTREAM_IDLE_TIMEOUT_MS", "0"),
            ("MAX_TOKENS_LIMIT", "0"),
            ("UPSTREAM_PREWARM", "maybe"),
            ("ANTHROPIC_BASE_URL", "ftp://x"),
            ("LOG_LEVEL", "loud"),
            ("RETRY_BUDGET_RATIO", "2"),
            ("UPSTREAM_MAX_RETRIES", "99"),
            ("BREAKER_FAILURES", "0"),
            ("MODEL_FALLBACKS", "a,has space"),
            ("REDIS_URL", "http://x"),
            ("RATE_LIMIT_RPM", "-5"),
            ("CACHE_BACKEND", "memcached"),
        ] {
            let e = cfg(&[(k, v)]).unwrap_err();
            assert_eq!(e.variable, k, "{e}");
        }
        // Settings of what only exists with Redis.
        for (k, v) in [
            ("COALESCE_LEASE_MS", "10"),
            ("RESUME_RETENTION_SECS", "1"),
            ("FINISH_ON_DISCONNECT", "sometimes"),
            ("POPULAR_MAX", "0"),
        ] {
            let e = cfg(&[(k, v), ("REDIS_URL", "redis://r")]).unwrap_err();
            assert_eq!(e.variable, k, "{e}");
        }
    }

    #[test]
    fn missing_key_is_an_error_and_arn_is_accepted() {
        let m: HashMap<&str, &str> = [("AUTH_MODE", "dev")].into();
        assert_eq!(
            Config::from_source(&m).unwrap_err().variable,
            "ANTHROPIC_API_KEY"
        );
        let m: HashMap<&str, &str> = [
            (
                "ANTHROPIC_API_KEY_SECRET_ARN",
                "arn:aws:secretsmanager:eu-west-1:1:secret:k",
            ),
            ("AUTH_MODE", "dev"),
        ]
        .into();
        assert!(matches!(
            Config::from_source(&m).unwrap().anthropic.unwrap().api_key,
            ApiKeySource::SecretsManager { .. }
        ));
    }

    #[test]
    fn openai_alone_is_enough_and_models_must_have_their_provider() {
        let m: HashMap<&str, &str> = [
            ("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1"),
            ("AUTH_MODE", "dev"),
        ]
        .into();
        let c = Config::from_source(&m).unwrap();
        assert_eq!(c.default_provider, "openai");
        assert_eq!(c.routing.default_model, "gpt-4o-mini");
        assert_eq!(c.openai.unwrap().api_key, None);
        let e = cfg(&[("MODEL_FALLBACKS", "openai:gpt-4o")]).unwrap_err();
        assert_eq!(e.variable, "MODEL_FALLBACKS");
        let e = cfg(&[("DEFAULT_PROVIDER", "openai")]).unwrap_err();
        assert_eq!(e.variable, "DEFAULT_PROVIDER");
        assert!(
            cfg(&[
                ("OPENAI_API_KEY", "k"),
                ("MODEL_FALLBACKS", "openai:gpt-4o")
            ])
            .is_ok()
        );
    }

    #[test]
    fn auth_needs_a_key_source_and_dev_mode_stays_out_of_lambda() {
        let e = cfg(&[("AUTH_MODE", "api_key")]).unwrap_err();
        assert_eq!(e.variable, "AUTH_MODE");
        let c = cfg(&[("AUTH_MODE", "api_key"), ("TABLE_NAME", "chat")]).unwrap();
        assert_eq!(c.auth, AuthMode::ApiKey { hashes: None });
        assert_eq!(c.persistence.unwrap().table, "chat");
        let e = cfg(&[("AUTH_MODE", "api_key"), ("API_KEY_HASHES", "abc:u")]).unwrap_err();
        assert_eq!(e.variable, "API_KEY_HASHES");
        let e = cfg(&[("AWS_LAMBDA_FUNCTION_NAME", "f")]).unwrap_err();
        assert_eq!(e.variable, "AUTH_MODE");
        let e = cfg(&[("AUTH_MODE", "jwt")]).unwrap_err();
        assert_eq!(e.variable, "AUTH_MODE");
        let e = cfg(&[("TABLE_NAME", "bad name!")]).unwrap_err();
        assert_eq!(e.variable, "TABLE_NAME");
    }

    #[test]
    fn allowlist_defaults_to_the_named_models() {
        use crate::routing::Allowlist;
        let c = cfg(&[("MODEL_FALLBACKS", "b")]).unwrap();
        assert_eq!(c.routing.allowlist, Allowlist::Only(vec!["b".into()]));
        assert!(
            c.routing.allowed("claude-sonnet-4-5")
                && c.routing.allowed("b")
                && !c.routing.allowed("c")
        );
        assert_eq!(
            cfg(&[("MODEL_ALLOWLIST", "*")]).unwrap().routing.allowlist,
            Allowlist::Any
        );
    }

    #[test]
    fn fallbacks_are_a_trimmed_list() {
        let c = cfg(&[("MODEL_FALLBACKS", " claude-a , ,claude-b")]).unwrap();
        assert_eq!(c.resilience.fallbacks, vec!["claude-a", "claude-b"]);
        assert!(cfg(&[]).unwrap().resilience.fallbacks.is_empty());
    }

    #[test]
    fn secrets_never_print() {
        let c = cfg(&[]).unwrap();
        let shown = format!("{c:?}");
        assert!(!shown.contains("sk-test-secret"), "{shown}");
    }

    #[test]
    fn flags_override_env_with_the_same_names() {
        let flags = flags_to_source([
            "--bind-addr".to_owned(),
            "127.0.0.1:9".to_owned(),
            "--log-level=debug".to_owned(),
        ])
        .unwrap();
        let env: HashMap<&str, &str> = [
            ("BIND_ADDR", "127.0.0.1:1"),
            ("ANTHROPIC_API_KEY", "k"),
            ("AUTH_MODE", "dev"),
        ]
        .into();
        let c = Config::from_source(&Layered(flags, env)).unwrap();
        assert_eq!(c.bind_addr.port(), 9);
        assert_eq!(c.log_level, tracing::Level::DEBUG);
        assert!(flags_to_source(["stray".to_owned()]).is_err());
        assert!(flags_to_source(["--port".to_owned()]).is_err());
    }
}
