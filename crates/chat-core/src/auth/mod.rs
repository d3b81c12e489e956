//! Who is calling. Every request resolves to a user id through one
//! [`Authenticator`] before any other work; without valid credentials it
//! gets 401 and nothing else happens (no model call, no rate-limit count,
//! no history read).
//!
//! - [`ApiKeyAuth`] (deployments): `Authorization: Bearer <key>` or
//!   `x-api-key: <key>`. Only SHA-256 hashes of keys are stored: in the
//!   table (`APIKEY#{hash}` items, created with `chat-stream keys create`)
//!   and/or a fixed list from `API_KEY_HASHES` (or a Secrets Manager secret
//!   named by `API_KEY_HASHES_SECRET_ARN`). Lookups are cached briefly in
//!   process, so a warm instance authenticates without a round trip.
//! - [`jwt::JwtAuth`] (`AUTH_MODE=jwt`): `Authorization: Bearer <JWT>`
//!   from an OIDC issuer such as a Cognito user pool; what a browser holds.
//! - [`EitherAuth`] (`AUTH_MODE=api_key,jwt`): a bearer credential shaped
//!   like a JWT is checked as one, anything else as an API key.
//! - [`DevAuth`] (local runs and tests only, `AUTH_MODE=dev`): trusts an
//!   `x-dev-user` header. It refuses to start inside Lambda.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[cfg(test)]
use axum::http::HeaderValue;
use axum::http::{HeaderMap, StatusCode};
use futures_util::future::BoxFuture;
use sha2::{Digest, Sha256};

use crate::error::ApiError;
use crate::persistence::store::Store;
use crate::secrets::ApiKeySource;

pub mod jwks;
pub mod jwt;

pub use jwt::JwtConfig;

/// How callers prove who they are .
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthMode {
    /// API keys: hashes in the table and/or a fixed list.
    ApiKey {
        /// `API_KEY_HASHES` (`hash:user,...`) or `..._SECRET_ARN`.
        hashes: Option<ApiKeySource>,
    },
    /// JWTs from one OIDC issuer.
    Jwt(JwtConfig),
    /// Either credential: API keys and JWTs.
    ApiKeyOrJwt {
        hashes: Option<ApiKeySource>,
        jwt: JwtConfig,
    },
    /// Local development only: `x-dev-user` is trusted.
    Dev,
}

/// The authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user_id: Arc<str>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AuthError {
    #[error("missing credentials: send Authorization: Bearer <api key>")]
    Missing,
    #[error("invalid credentials")]
    Invalid,
    #[error("the token has expired; sign in again")]
    Expired,
    #[error("the credential store is unavailable")]
    Unavailable,
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Missing | AuthError::Invalid | AuthError::Expired => {
                let mut err = ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    match e {
                        AuthError::Missing => "missing_credentials",
                        AuthError::Expired => "token_expired",
                        _ => "invalid_credentials",
                    },
                    e.to_string(),
                );
                err.headers
                    .push(("www-authenticate", "Bearer realm=\"chat\"".to_owned()));
                err
            }
            AuthError::Unavailable => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "auth_unavailable",
                "could not check credentials right now; retry shortly",
            ),
        }
    }
}

pub trait Authenticator: Send + Sync {
    /// `api_key`, `dev`, ...: for logs and `/health`.
    fn method(&self) -> &'static str;
    fn authenticate<'a>(
        &'a self,
        headers: &'a HeaderMap,
    ) -> BoxFuture<'a, Result<Identity, AuthError>>;
}

/// SHA-256 of a key, lowercase hex: what is stored and looked up.
pub fn hash_key(key: &str) -> String {
    let digest = Sha256::digest(key.as_bytes());
    let mut out = String::with_capacity(64);
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// A new random API key (`ck_` + 256 bits).
pub fn new_api_key() -> String {
    format!(
        "ck_{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

/// The presented key: `Authorization: Bearer KEY`, else `x-api-key`.
pub fn presented_key(headers: &HeaderMap) -> Option<&str> {
    let bearer = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, rest) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        });
    bearer
        .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()))
        .map(str::trim)
        .filter(|k| !k.is_empty())
}

/// Parses `hash:user,hash:user` (the `API_KEY_HASHES` format).
pub fn parse_hash_list(s: &str) -> Result<HashMap<String, String>, String> {
    let mut out = HashMap::new();
    for entry in s
        .split([',', '\n'])
        .map(str::trim)
        .filter(|e| !e.is_empty())
    {
        let (hash, user) = entry
            .split_once(':')
            .ok_or_else(|| format!("entry {entry:?} is not HASH:USER"))?;
        let hash = hash.trim().to_ascii_lowercase();
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("{hash:?} is not a SHA-256 hex digest"));
        }
        if !valid_user_id(user.trim()) {
            return Err(format!(
                "user id {user:?} is not 1-64 of A-Z a-z 0-9 - _ . @"
            ));
        }
        out.insert(hash, user.trim().to_owned());
    }
    Ok(out)
}

pub fn valid_user_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'@'))
}

/// Cached results per key hash: hits for a minute, misses for a few
/// seconds (so a new key works almost at once, and a flood of bad keys
/// does not become a flood of reads). Hits and misses are kept apart, each
/// with its own cap, so a flood of bad keys can never evict a valid one.
const HIT_TTL: Duration = Duration::from_secs(60);
const MISS_TTL: Duration = Duration::from_secs(5);
const HITS_MAX: usize = 10_000;

/// Valid keys (user) and unknown keys, by hash, with until when they hold.
#[derive(Default)]
struct KeyCache {
    hits: HashMap<String, (Arc<str>, Instant)>,
    misses: HashMap<String, Instant>,
}

pub struct ApiKeyAuth {
    fixed: HashMap<String, String>,
    store: Option<Arc<Store>>,
    cache: Mutex<KeyCache>,
    /// `AUTH_UNKNOWN_KEY_CACHE_MAX`.
    misses_max: usize,
}

/// Makes room for one more entry in a map of at most `max`: expired entries
/// go first, then (still full) the whole map. `false`: `max` is 0.
fn make_room<V>(map: &mut HashMap<String, V>, max: usize, until: impl Fn(&V) -> Instant) -> bool {
    if max == 0 {
        return false;
    }
    if map.len() >= max {
        let now = Instant::now();
        map.retain(|_, v| until(v) > now);
        if map.len() >= max {
            map.clear();
        }
    }
    true
}

impl ApiKeyAuth {
    pub fn new(
        fixed: HashMap<String, String>,
        store: Option<Arc<Store>>,
        misses_max: usize,
    ) -> Self {
        Self {
            fixed,
            store,
            cache: Mutex::new(KeyCache::default()),
            misses_max,
        }
    }

    fn cached(&self, hash: &str) -> Option<Option<Arc<str>>> {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if let Some((user, until)) = cache.hits.get(hash) {
            if now < *until {
                return Some(Some(user.clone()));
            }
        }
        cache
            .misses
            .get(hash)
            .filter(|until| now < **until)
            .map(|_| None)
    }

    fn remember(&self, hash: String, user: Option<Arc<str>>) {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        match user {
            Some(user) => {
                if make_room(&mut cache.hits, HITS_MAX, |(_, until)| *until) {
                    cache.misses.remove(&hash);
                    cache.hits.insert(hash, (user, Instant::now() + HIT_TTL));
                }
            }
            None => {
                if make_room(&mut cache.misses, self.misses_max, |until| *until) {
                    cache.misses.insert(hash, Instant::now() + MISS_TTL);
                }
            }
        }
    }

    async fn check(&self, headers: &HeaderMap) -> Result<Identity, AuthError> {
        let key = presented_key(headers).ok_or(AuthError::Missing)?;
        if key.len() > 256 {
            return Err(AuthError::Invalid);
        }
        let hash = hash_key(key);
        if let Some(user) = self.fixed.get(&hash) {
            return Ok(Identity {
                user_id: Arc::from(user.as_str()),
            });
        }
        let user = match self.cached(&hash) {
            Some(u) => u,
            None => {
                let Some(store) = &self.store else {
                    return Err(AuthError::Invalid);
                };
                let found = store.lookup_api_key(&hash).await.map_err(|e| {
                    tracing::warn!(error = %e, "API key lookup failed");
                    AuthError::Unavailable
                })?;
                let user: Option<Arc<str>> = found.map(Arc::from);
                self.remember(hash, user.clone());
                user
            }
        };
        user.map(|user_id| Identity { user_id })
            .ok_or(AuthError::Invalid)
    }
}

impl Authenticator for ApiKeyAuth {
    fn method(&self) -> &'static str {
        "api_key"
    }

    fn authenticate<'a>(
        &'a self,
        headers: &'a HeaderMap,
    ) -> BoxFuture<'a, Result<Identity, AuthError>> {
        Box::pin(self.check(headers))
    }
}

impl Authenticator for jwt::JwtAuth {
    fn method(&self) -> &'static str {
        "jwt"
    }

    fn authenticate<'a>(
        &'a self,
        headers: &'a HeaderMap,
    ) -> BoxFuture<'a, Result<Identity, AuthError>> {
        Box::pin(self.check_headers(headers))
    }
}

/// `AUTH_MODE=api_key,jwt`: a bearer credential shaped like a JWT is a
/// token, anything else (and `x-api-key`) an API key.
pub struct EitherAuth {
    pub keys: ApiKeyAuth,
    pub jwt: Arc<jwt::JwtAuth>,
}

impl Authenticator for EitherAuth {
    fn method(&self) -> &'static str {
        "api_key,jwt"
    }

    fn authenticate<'a>(
        &'a self,
        headers: &'a HeaderMap,
    ) -> BoxFuture<'a, Result<Identity, AuthError>> {
        if jwt::bearer(headers).is_some_and(jwt::looks_like_jwt) {
            Box::pin(self.jwt.check_headers(headers))
        } else {
            Box::pin(self.keys.check(headers))
        }
    }
}

/// Local development only: the caller says who it is.
pub struct DevAuth;

pub const DEV_USER_HEADER: &str = "x-dev-user";

impl Authenticator for DevAuth {
    fn method(&self) -> &'static str {
        "dev"
    }

    fn authenticate<'a>(
        &'a self,
        headers: &'a HeaderMap,
    ) -> BoxFuture<'a, Result<Identity, AuthError>> {
        let user = headers
            .get(DEV_USER_HEADER)
            .map(|v| v.to_str().map(str::trim).unwrap_or(""));
        let result = match user {
            None => Ok(Identity {
                user_id: Arc::from("dev"),
            }),
            Some(u) if valid_user_id(u) => Ok(Identity {
                user_id: Arc::from(u),
            }),
            Some(_) => Err(AuthError::Invalid),
        };
        Box::pin(async move { result })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn hash_is_sha256_hex() {
        assert_eq!(
            hash_key("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(new_api_key().starts_with("ck_"));
        assert_ne!(new_api_key(), new_api_key());
    }

    #[test]
    fn key_comes_from_bearer_or_x_api_key() {
        assert_eq!(
            presented_key(&headers(&[("authorization", "Bearer k1")])),
            Some("k1")
        );
        assert_eq!(
            presented_key(&headers(&[("authorization", "bearer  k2 ")])),
            Some("k2")
        );
        assert_eq!(presented_key(&headers(&[("x-api-key", "k3")])), Some("k3"));
        assert_eq!(
            presented_key(&headers(&[("authorization", "Basic abc")])),
            None
        );
        assert_eq!(presented_key(&headers(&[])), None);
    }

    #[tokio::test]
    async fn fixed_hashes_authenticate_and_others_do_not() {
        let list = format!("{}:alice", hash_key("secret-1"));
        let auth = ApiKeyAuth::new(parse_hash_list(&list).unwrap(), None, 1000);
        let ok = auth
            .authenticate(&headers(&[("authorization", "Bearer secret-1")]))
            .await;
        assert_eq!(ok.unwrap().user_id.as_ref(), "alice");
        let bad = auth
            .authenticate(&headers(&[("authorization", "Bearer secret-2")]))
            .await;
        assert_eq!(bad, Err(AuthError::Invalid));
        assert_eq!(
            auth.authenticate(&headers(&[])).await,
            Err(AuthError::Missing)
        );
    }

    #[test]
    fn a_flood_of_unknown_keys_never_evicts_a_valid_one() {
        let auth = ApiKeyAuth::new(HashMap::new(), None, 100);
        auth.remember(hash_key("good"), Some(Arc::from("alice")));
        for i in 0..5_000 {
            auth.remember(hash_key(&format!("bad-{i}")), None);
        }
        assert_eq!(
            auth.cached(&hash_key("good")),
            Some(Some(Arc::from("alice")))
        );
        let cache = auth.cache.lock().unwrap();
        assert!(cache.misses.len() <= 100, "unknown keys are capped");
        drop(cache);
        // The last unknown key is remembered (no second lookup for it).
        assert_eq!(auth.cached(&hash_key("bad-4999")), Some(None));
        // A cap of 0 remembers no unknown key at all.
        let none = ApiKeyAuth::new(HashMap::new(), None, 0);
        none.remember(hash_key("bad"), None);
        assert_eq!(none.cached(&hash_key("bad")), None);
    }

    #[test]
    fn hash_list_format_is_checked() {
        assert!(parse_hash_list("nothex:alice").is_err());
        assert!(parse_hash_list(&format!("{}:bad user", hash_key("x"))).is_err());
        assert_eq!(parse_hash_list(" ").unwrap().len(), 0);
    }

    #[tokio::test]
    async fn dev_mode_takes_the_header() {
        let a = DevAuth;
        assert_eq!(
            a.authenticate(&headers(&[("x-dev-user", "bob")]))
                .await
                .unwrap()
                .user_id
                .as_ref(),
            "bob"
        );
        assert_eq!(
            a.authenticate(&headers(&[("x-dev-user", "no spaces")]))
                .await,
            Err(AuthError::Invalid)
        );
    }
}
