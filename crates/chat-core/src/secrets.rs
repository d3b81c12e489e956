//! Resolves the model API key at init: from the environment locally, from
//! Secrets Manager in AWS (the key never sits in the function's
//! configuration, where anyone with `lambda:GetFunctionConfiguration` could
//! read it). A leaf (with `error`): the [`Secret`] type that never prints
//! its value lives here.

use aws_sdk_secretsmanager::Client;

use crate::error::ConfigError;

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

/// Where the model API key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiKeySource {
    /// `ANTHROPIC_API_KEY` (local runs).
    Value(Secret),
    /// `..._API_KEY_SECRET_ARN`: fetched from Secrets Manager at init.
    /// `var` names the variable, for errors.
    SecretsManager { arn: String, var: String },
}

/// The secret may hold the bare key, or JSON with an `api_key` or
/// `ANTHROPIC_API_KEY` field (the console's key/value form).
pub fn key_from_secret_string(s: &str) -> Option<Secret> {
    let s = s.trim();
    if s.starts_with('{') {
        let v: serde_json::Value = serde_json::from_str(s).ok()?;
        ["api_key", "ANTHROPIC_API_KEY", "apiKey"]
            .iter()
            .find_map(|k| v.get(*k).and_then(|x| x.as_str()))
            .filter(|k| !k.is_empty())
            .map(Secret::new)
    } else if s.is_empty() {
        None
    } else {
        Some(Secret::new(s))
    }
}

pub async fn resolve_api_key(source: &ApiKeySource) -> Result<Secret, ConfigError> {
    match source {
        ApiKeySource::Value(s) => Ok(s.clone()),
        ApiKeySource::SecretsManager { arn, var } => {
            let var = var.as_str();
            let conf = aws_config::load_from_env().await;
            let out = Client::new(&conf)
                .get_secret_value()
                .secret_id(arn)
                .send()
                .await
                .map_err(|e| {
                    ConfigError::new(
                        var,
                        format!(
                            "could not read the secret: {}",
                            aws_sdk_secretsmanager::error::DisplayErrorContext(&e)
                        ),
                    )
                })?;
            out.secret_string()
                .and_then(key_from_secret_string)
                .ok_or_else(|| {
                    ConfigError::new(
                        var,
                        "the secret has no usable key (a string, or JSON with api_key)",
                    )
                })
        }
    }
}

/// A model API key that is read again from Secrets Manager after the
/// provider rejects it (401/403), at most once per `min_interval` (a
/// minute in production), so a rotation needs no redeploy and a revoked
/// key cannot turn every request into a Secrets Manager call. A key from
/// the environment is never re-read.
pub struct RotatingKey {
    current: std::sync::RwLock<Secret>,
    source: ApiKeySource,
    min_interval: std::time::Duration,
    last_reload: tokio::sync::Mutex<Option<tokio::time::Instant>>,
}

impl RotatingKey {
    pub fn new(initial: Secret, source: ApiKeySource) -> Self {
        Self::with_interval(initial, source, std::time::Duration::from_secs(60))
    }

    pub fn with_interval(
        initial: Secret,
        source: ApiKeySource,
        min_interval: std::time::Duration,
    ) -> Self {
        Self {
            current: std::sync::RwLock::new(initial),
            source,
            min_interval,
            last_reload: tokio::sync::Mutex::new(None),
        }
    }

    pub fn current(&self) -> Secret {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The provider rejected `used`. Reads the secret again (once per
    /// interval, one caller at a time) and says whether the key now in use
    /// differs from `used`, so the request is worth one more try.
    pub async fn after_rejection(&self, used: &Secret) -> bool {
        if self.current() != *used {
            // Another request already read the new key.
            return true;
        }
        if !matches!(self.source, ApiKeySource::SecretsManager { .. }) {
            return false;
        }
        let mut last = self.last_reload.lock().await;
        if self.current() != *used {
            return true;
        }
        if last.is_some_and(|t| t.elapsed() < self.min_interval) {
            return false;
        }
        *last = Some(tokio::time::Instant::now());
        match resolve_api_key(&self.source).await {
            Ok(fresh) if fresh != *used => {
                tracing::info!("the model API key was read again from Secrets Manager: it changed");
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = fresh;
                true
            }
            Ok(_) => {
                tracing::warn!(
                    "the provider rejects the model API key and Secrets Manager still holds it"
                );
                false
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not read the model API key again");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_formats() {
        assert_eq!(
            key_from_secret_string(" sk-1\n").map(|s| s.expose().to_owned()),
            Some("sk-1".into())
        );
        assert_eq!(
            key_from_secret_string(r#"{"ANTHROPIC_API_KEY":"sk-2"}"#)
                .map(|s| s.expose().to_owned()),
            Some("sk-2".into())
        );
        assert_eq!(key_from_secret_string(r#"{"other":"x"}"#), None);
        assert_eq!(key_from_secret_string(""), None);
    }
}
