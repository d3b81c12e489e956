//! chat-core: everything with logic lives here; the binaries are thin.
//!
//! - [`config`]: typed configuration from an injectable source.
//! - [`provider`]: the model provider trait and the Anthropic client.
//! - [`sse`]: Server-Sent Events parsing and encoding.
//! - [`app`]: the axum router (`POST /chat`, `GET /health`) shared by the
//!   Lambda and local modes; [`relay`] streams one answer.
//! - [`server`]: the local HTTP server mode.

pub mod app;
pub mod config;
pub mod error;
pub mod fleet;
pub mod http;
pub mod logging;
pub mod provider;
mod relay;
pub mod resilience;
pub mod routing;
pub mod secrets;
pub mod server;
pub mod sse;
pub mod store;
pub mod turn;
pub mod validate;

use std::sync::Arc;
use std::time::Duration;

pub use app::{AppState, app};
pub use config::{Config, ConfigError};

use provider::anthropic::AnthropicProvider;
use provider::bedrock::BedrockProvider;
use provider::openai::OpenAiProvider;
use provider::{ModelProvider, Providers};

/// Why the process could not start.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("could not build the HTTP client")]
    Http(#[from] reqwest::Error),
}

/// Builds everything a handler needs, once per process: resolves the API
/// keys, builds the one pooled client and the configured providers, and
/// pre-warms their connections in parallel when configured (a failed
/// pre-warm is logged, not fatal: the first request simply pays for the
/// connection).
pub async fn build_state(config: Config) -> Result<AppState, InitError> {
    let client = http::build_client(config.timeouts.connect)?;
    let mut list: Vec<Arc<dyn ModelProvider>> = Vec::new();
    if let Some(a) = &config.anthropic {
        let key = secrets::resolve_api_key(&a.api_key).await?;
        list.push(Arc::new(AnthropicProvider::new(
            client.clone(),
            &a.base_url,
            key,
            &a.version,
        )));
    }
    if let Some(o) = &config.openai {
        let key = match &o.api_key {
            Some(src) => Some(secrets::resolve_api_key(src).await?),
            None => None,
        };
        list.push(Arc::new(OpenAiProvider::new(
            client.clone(),
            &o.base_url,
            key,
        )));
    }
    if let Some(b) = &config.bedrock {
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
        if let Some(region) = &b.region {
            loader = loader.region(aws_config::Region::new(region.clone()));
        }
        let sdk = loader.load().await;
        let mut conf = aws_sdk_bedrockruntime::config::Builder::from(&sdk);
        if let Some(url) = &b.endpoint_url {
            conf = conf.endpoint_url(url);
        }
        list.push(Arc::new(BedrockProvider::new(
            aws_sdk_bedrockruntime::Client::from_conf(conf.build()),
        )));
    }
    let providers = Providers::new(list);
    let budget = config.timeouts.connect + Duration::from_secs(2);
    let prewarm = config.prewarm;
    let redis = match &config.redis_url {
        Some(url) => Some(
            fleet::RedisLink::new(url.expose(), config.redis_timeout).map_err(|e| {
                ConfigError::new("REDIS_URL", format!("not a usable Redis URL: {e}"))
            })?,
        ),
        None => None,
    };
    let fleet = fleet::Fleet::new(redis, config.rate_limits, config.resilience.breaker);
    let state = AppState::new(config, providers, fleet);
    if prewarm {
        for (name, result) in state.check_providers(budget).await {
            match result {
                app::Probe::Ok(ms) => {
                    tracing::info!(provider = name, ms, "upstream connection pre-warmed")
                }
                app::Probe::Failed(code) => {
                    tracing::warn!(provider = name, error_code = code, "pre-warm failed")
                }
                app::Probe::Skipped => {}
            }
        }
    }
    Ok(state)
}
