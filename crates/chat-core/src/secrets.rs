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
