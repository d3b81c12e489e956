//! The model providers and how requests reach them: which providers are
//! configured, routing, retries and fallbacks, deadlines and request limits.

use super::source::{ConfigSource, Reader, key_source, url};
use crate::chat::Timeouts;
use crate::chat::attempt::Resilience;
use crate::chat::request::Limits;
use crate::error::ConfigError;
use crate::provider::routing::{Allowlist, ModelRef, Routing};
use crate::provider::{AnthropicConfig, BedrockConfig, OpenAiConfig, ProviderSettings};

/// `ANTHROPIC_*`, `OPENAI_*`, `BEDROCK_*`, `DEFAULT_PROVIDER`,
/// `UPSTREAM_PREWARM`.
pub(crate) fn providers<S: ConfigSource + ?Sized>(
    r: &Reader<'_, S>,
) -> Result<ProviderSettings, ConfigError> {
    let anthropic = match key_source(r, "ANTHROPIC_API_KEY")? {
        None => None,
        Some(api_key) => Some(AnthropicConfig {
            base_url: url(r, "ANTHROPIC_BASE_URL", "https://api.anthropic.com")?,
            api_key,
            version: r
                .string("ANTHROPIC_VERSION")
                .unwrap_or_else(|| "2023-06-01".to_owned()),
        }),
    };
    let openai_key = key_source(r, "OPENAI_API_KEY")?;
    let openai = if openai_key.is_some() || r.string("OPENAI_BASE_URL").is_some() {
        Some(OpenAiConfig {
            base_url: url(r, "OPENAI_BASE_URL", "https://api.openai.com/v1")?,
            api_key: openai_key,
        })
    } else {
        None
    };
    let bedrock = if r.bool("BEDROCK_ENABLED", false)? {
        let endpoint_url = match r.string("AWS_ENDPOINT_URL_BEDROCK_RUNTIME") {
            Some(_) => Some(url(r, "AWS_ENDPOINT_URL_BEDROCK_RUNTIME", "")?),
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
    if ![
        ("anthropic", anthropic.is_some()),
        ("openai", openai.is_some()),
        ("bedrock", bedrock.is_some()),
    ]
    .contains(&(default_provider.as_str(), true))
    {
        return Err(ConfigError::new(
            "DEFAULT_PROVIDER",
            format!(
                "{default_provider:?} is not a configured provider (anthropic, openai, bedrock)"
            ),
        ));
    }
    Ok(ProviderSettings {
        anthropic,
        openai,
        bedrock,
        default_provider,
        prewarm: r.bool("UPSTREAM_PREWARM", true)?,
        http2_prior_knowledge: r.bool("UPSTREAM_HTTP2_PRIOR_KNOWLEDGE", false)?,
    })
}

/// Deadlines of a model call and limits of a request.
pub(crate) fn request<S: ConfigSource + ?Sized>(
    r: &Reader<'_, S>,
) -> Result<(Timeouts, Limits), ConfigError> {
    let timeouts = Timeouts {
        connect: r.ms("UPSTREAM_CONNECT_TIMEOUT_MS", 3_000)?,
        first_token: r.ms("UPSTREAM_FIRST_TOKEN_TIMEOUT_MS", 20_000)?,
        idle: r.ms("UPSTREAM_IDLE_TIMEOUT_MS", 30_000)?,
        total: r.ms("UPSTREAM_TOTAL_TIMEOUT_MS", 240_000)?,
        client_send: r.ms("CLIENT_SEND_TIMEOUT_MS", 10_000)?,
        stop_poll: r.ms("STOP_POLL_MS", 100)?,
        stop_poll_table: r.ms("STOP_POLL_TABLE_MS", 1_000)?,
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
    Ok((timeouts, limits))
}

/// Which model answers (`DEFAULT_MODEL`, `ROUTE_SHORT_*`,
/// `MODEL_ALLOWLIST`) and what happens when it fails (retries, budget,
/// breaker, `MODEL_FALLBACKS`).
pub(crate) fn models<S: ConfigSource + ?Sized>(
    r: &Reader<'_, S>,
    p: &ProviderSettings,
) -> Result<(Routing, Resilience), ConfigError> {
    let default_provider = &p.default_provider;
    let configured = |name: &str| p.configured(name);
    let default_model = r.string("DEFAULT_MODEL").unwrap_or_else(|| {
        match default_provider.as_str() {
            "openai" => "gpt-4o-mini",
            "bedrock" => "anthropic.claude-3-5-haiku-20241022-v1:0",
            _ => "claude-sonnet-4-5",
        }
        .to_owned()
    });
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
        let p = ModelRef::parse(m, default_provider).provider;
        if !configured(&p) {
            return Err(ConfigError::new(
                var,
                format!("{m:?} needs the {p} provider, which is not configured"),
            ));
        }
    }
    let allowlist = match r.string("MODEL_ALLOWLIST") {
        Some(v) if v == "*" => Allowlist::Any,
        Some(v) => Allowlist::Only(
            v.split(',')
                .map(|m| m.trim().to_owned())
                .filter(|m| !m.is_empty())
                .collect(),
        ),
        // Unset: the models this deployment already names, and no others.
        None => Allowlist::Only(fallbacks.clone()),
    };
    let routing = Routing {
        default_model,
        short_model: r.string("ROUTE_SHORT_MODEL"),
        short_max_chars: r.ranged("ROUTE_SHORT_MAX_CHARS", 200usize, 1, 100_000)?,
        allowlist,
    };
    if let Some(m) = &routing.short_model {
        let p = ModelRef::parse(m, default_provider).provider;
        if !configured(&p) {
            return Err(ConfigError::new(
                "ROUTE_SHORT_MODEL",
                format!("{m:?} needs the {p} provider, which is not configured"),
            ));
        }
    }
    let resilience = Resilience {
        retry: crate::limits::RetryPolicy {
            max_retries: r.ranged("UPSTREAM_MAX_RETRIES", 2u32, 0, 10)?,
            base: r.ms("UPSTREAM_RETRY_BASE_MS", 100)?,
            max_backoff: r.ms("UPSTREAM_RETRY_MAX_BACKOFF_MS", 2_000)?,
        },
        retry_budget_ratio,
        breaker: breaker(r)?,
        fallbacks,
    };
    Ok((routing, resilience))
}

/// `BREAKER_*`: one circuit breaker per model.
pub(crate) fn breaker<S: ConfigSource + ?Sized>(
    r: &Reader<'_, S>,
) -> Result<crate::limits::BreakerConfig, ConfigError> {
    Ok(crate::limits::BreakerConfig {
        failures: r.ranged("BREAKER_FAILURES", 5u32, 1, 1000)?,
        window: r.ms("BREAKER_WINDOW_MS", 30_000)?,
        cooldown: r.ms("BREAKER_COOLDOWN_MS", 15_000)?,
    })
}
