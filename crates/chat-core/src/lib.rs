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
pub mod http;
pub mod logging;
pub mod provider;
mod relay;
pub mod resilience;
pub mod secrets;
pub mod server;
pub mod sse;
pub mod validate;

use std::sync::Arc;
use std::time::{Duration, Instant};

pub use app::{AppState, app};
pub use config::{Config, ConfigError};

use provider::ModelProvider;
use provider::anthropic::AnthropicProvider;

/// Why the process could not start.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("could not build the HTTP client")]
    Http(#[from] reqwest::Error),
}

/// Builds everything a handler needs, once per process: resolves the API
/// key, builds the pooled client and the provider, and pre-warms the
/// connection when configured (a failed pre-warm is logged, not fatal: the
/// first request simply pays for the connection).
pub async fn build_state(config: Config) -> Result<AppState, InitError> {
    let api_key = secrets::resolve_api_key(&config.anthropic.api_key).await?;
    let client = http::build_client(config.timeouts.connect)?;
    let provider: Arc<dyn ModelProvider> = Arc::new(AnthropicProvider::new(
        client,
        &config.anthropic.base_url,
        api_key,
        &config.anthropic.version,
    ));
    if config.prewarm {
        let t = Instant::now();
        let budget = config.timeouts.connect + Duration::from_secs(2);
        match tokio::time::timeout(budget, provider.prewarm()).await {
            Ok(Ok(())) => tracing::info!(
                provider = provider.name(),
                ms = app::ms(t.elapsed()),
                "upstream connection pre-warmed"
            ),
            Ok(Err(e)) => tracing::warn!(provider = provider.name(), error = %e, "pre-warm failed"),
            Err(_) => tracing::warn!(provider = provider.name(), "pre-warm timed out"),
        }
    }
    Ok(AppState::new(config, provider))
}
