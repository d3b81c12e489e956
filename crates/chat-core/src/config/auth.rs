//! `AUTH_MODE` and what each mode reads: `API_KEY_HASHES*` for API keys,
//! `JWT_*` / `COGNITO_*` for tokens.

use std::time::Duration;

use super::source::{ConfigSource, Reader, key_source, url};
use crate::auth::{AuthMode, JwtConfig};
use crate::error::ConfigError;
use crate::persistence::PersistenceConfig;
use crate::secrets::ApiKeySource;

/// `AUTH_MODE`: `api_key` (the default), `jwt`, `api_key,jwt`, or `dev`.
pub(crate) fn auth<S: ConfigSource + ?Sized>(
    r: &Reader<'_, S>,
    persistence: Option<&PersistenceConfig>,
) -> Result<AuthMode, ConfigError> {
    let raw = r
        .string("AUTH_MODE")
        .unwrap_or_else(|| "api_key".to_owned())
        .to_ascii_lowercase()
        .replace('-', "_");
    let mut parts: Vec<&str> = raw.split(',').map(str::trim).collect();
    parts.sort_unstable();
    parts.dedup();
    Ok(match parts.as_slice() {
        ["api_key"] => AuthMode::ApiKey {
            hashes: api_keys(r, persistence)?,
        },
        ["jwt"] => AuthMode::Jwt(jwt(r)?),
        ["api_key", "jwt"] => AuthMode::ApiKeyOrJwt {
            hashes: api_keys(r, persistence)?,
            jwt: jwt(r)?,
        },
        ["dev"] => {
            if r.string("AWS_LAMBDA_FUNCTION_NAME").is_some() {
                return Err(ConfigError::new(
                    "AUTH_MODE",
                    "dev trusts any caller and is refused inside Lambda; use api_key or jwt",
                ));
            }
            AuthMode::Dev
        }
        _ => {
            return Err(ConfigError::new(
                "AUTH_MODE",
                format!("{raw:?} is not api_key, jwt, api_key,jwt or dev"),
            ));
        }
    })
}

/// `API_KEY_HASHES` / `API_KEY_HASHES_SECRET_ARN`; without them the keys
/// are in the table, so one of the two is needed.
fn api_keys<S: ConfigSource + ?Sized>(
    r: &Reader<'_, S>,
    persistence: Option<&PersistenceConfig>,
) -> Result<Option<ApiKeySource>, ConfigError> {
    let hashes = key_source(r, "API_KEY_HASHES")?;
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
    Ok(hashes)
}

/// `JWT_ISSUER`, `JWT_AUDIENCE`, `JWT_JWKS_URL`, `JWT_USER_CLAIM`,
/// `JWT_LEEWAY_SECS`, `JWT_JWKS_TTL_SECS`, `JWT_JWKS_MIN_REFRESH_SECS`,
/// `JWT_MAX_TOKEN_BYTES`; or a Cognito user pool with
/// `COGNITO_USER_POOL_ID` + `COGNITO_CLIENT_ID` alone.
pub(crate) fn jwt<S: ConfigSource + ?Sized>(r: &Reader<'_, S>) -> Result<JwtConfig, ConfigError> {
    let pool = r.string("COGNITO_USER_POOL_ID");
    let client = r.string("COGNITO_CLIENT_ID");
    let cognito_issuer = match (&pool, &client) {
        (Some(pool), Some(_)) => {
            // us-east-1_AbCdEf123: the region is before the underscore.
            let region = pool
                .split_once('_')
                .map(|(region, _)| region)
                .filter(|region| {
                    !region.is_empty()
                        && region
                            .bytes()
                            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                })
                .ok_or_else(|| {
                    ConfigError::new(
                        "COGNITO_USER_POOL_ID",
                        format!("{pool:?} is not a user pool id (REGION_ID)"),
                    )
                })?;
            Some(format!("https://cognito-idp.{region}.amazonaws.com/{pool}"))
        }
        (Some(_), None) => {
            return Err(ConfigError::new(
                "COGNITO_CLIENT_ID",
                "is required with COGNITO_USER_POOL_ID (the app client whose tokens are accepted)",
            ));
        }
        (None, Some(_)) => {
            return Err(ConfigError::new(
                "COGNITO_USER_POOL_ID",
                "is required with COGNITO_CLIENT_ID",
            ));
        }
        (None, None) => None,
    };
    let issuer = match (r.string("JWT_ISSUER"), cognito_issuer) {
        // Kept exactly as given: `iss` must equal it, trailing slash and all.
        (Some(i), _) if i.starts_with("https://") || i.starts_with("http://") => i,
        (Some(i), _) => {
            return Err(ConfigError::new(
                "JWT_ISSUER",
                format!("{i:?} must start with https:// or http://"),
            ));
        }
        (None, Some(i)) => i,
        (None, None) => {
            return Err(ConfigError::new(
                "JWT_ISSUER",
                "AUTH_MODE with jwt needs JWT_ISSUER (or COGNITO_USER_POOL_ID and COGNITO_CLIENT_ID)",
            ));
        }
    };
    let audiences: Vec<String> = r
        .string("JWT_AUDIENCE")
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(str::to_owned)
        .collect();
    if audiences.is_empty() && client.is_none() {
        return Err(ConfigError::new(
            "JWT_AUDIENCE",
            "is required: an issuer signs tokens for many applications; name the ones accepted here",
        ));
    }
    let jwks_url = url(
        r,
        "JWT_JWKS_URL",
        &format!("{}/.well-known/jwks.json", issuer.trim_end_matches('/')),
    )?;
    let user_claim = r.string("JWT_USER_CLAIM").unwrap_or_else(|| "sub".into());
    Ok(JwtConfig {
        issuer,
        audiences,
        cognito_client_id: client,
        jwks_url,
        user_claim,
        leeway_secs: r.ranged("JWT_LEEWAY_SECS", 60u64, 0, 600)?,
        jwks_ttl: Duration::from_secs(r.ranged("JWT_JWKS_TTL_SECS", 3600u64, 60, 86_400)?),
        jwks_min_refresh: Duration::from_secs(r.ranged(
            "JWT_JWKS_MIN_REFRESH_SECS",
            30u64,
            1,
            3600,
        )?),
        max_token_bytes: r.ranged("JWT_MAX_TOKEN_BYTES", 8192usize, 512, 65_536)?,
    })
}
