//! The issuer's signing keys (its JWKS), fetched at init (a failure is
//! not fatal), kept for `JWT_JWKS_TTL_SECS`, and fetched again on an
//! unknown `kid` at most once per `JWT_JWKS_MIN_REFRESH_SECS`, so a flood
//! of tokens with made-up key ids costs the issuer one request per
//! interval, not one per token. One fetch at a time (the others wait for
//! it and use its result).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use jsonwebtoken::DecodingKey;
use jsonwebtoken::jwk::Jwk;
use tokio::time::Instant;

/// A JWKS document larger than this is refused (real ones are a few KB).
const MAX_JWKS_BYTES: usize = 256 * 1024;

/// One usable key: the JWK (for the algorithm checks) and its decoder.
pub struct Key {
    pub jwk: Jwk,
    pub decoding: DecodingKey,
}

#[derive(Default)]
struct KeySet {
    by_kid: HashMap<String, Arc<Key>>,
    fetched_at: Option<Instant>,
}

pub struct Jwks {
    url: String,
    http: reqwest::Client,
    ttl: Duration,
    min_refresh: Duration,
    keys: RwLock<KeySet>,
    /// When the last fetch started (successful or not).
    last_attempt: tokio::sync::Mutex<Option<Instant>>,
    fetches: AtomicU64,
}

impl Jwks {
    pub fn new(url: String, http: reqwest::Client, ttl: Duration, min_refresh: Duration) -> Self {
        Self {
            url,
            http,
            ttl,
            min_refresh,
            keys: RwLock::new(KeySet::default()),
            last_attempt: tokio::sync::Mutex::new(None),
            fetches: AtomicU64::new(0),
        }
    }

    /// Starts with the keys of `body` (a JWKS document) as if just
    /// fetched: for the fuzz harness and benchmarks, which must not wait
    /// on a network.
    pub fn preload(&self, body: &[u8]) {
        let mut set = self.keys.write().unwrap_or_else(|p| p.into_inner());
        set.by_kid = parse_jwks(body);
        set.fetched_at = Some(Instant::now());
    }

    /// How many fetches were started (for tests and `/health`).
    pub fn fetches(&self) -> u64 {
        self.fetches.load(Ordering::Relaxed)
    }

    fn lookup(&self, kid: &str) -> (Option<Arc<Key>>, bool) {
        let set = self.keys.read().unwrap_or_else(|p| p.into_inner());
        let fresh = set.fetched_at.is_some_and(|t| t.elapsed() < self.ttl);
        (set.by_kid.get(kid).cloned(), fresh)
    }

    /// The key `kid`, fetching the set again when it is unknown or the set
    /// is older than its TTL, within the refresh limit.
    pub async fn key(&self, kid: &str) -> Option<Arc<Key>> {
        let (found, fresh) = self.lookup(kid);
        if found.is_some() && fresh {
            return found;
        }
        self.refresh().await;
        self.lookup(kid).0.or(found)
    }

    /// Fetches the set unless a fetch started within the refresh interval.
    pub async fn refresh(&self) {
        let mut last = self.last_attempt.lock().await;
        if last.is_some_and(|t| t.elapsed() < self.min_refresh) {
            return;
        }
        *last = Some(Instant::now());
        self.fetches.fetch_add(1, Ordering::Relaxed);
        match self.fetch().await {
            Ok(by_kid) => {
                tracing::info!(keys = by_kid.len(), "JWKS fetched");
                let mut set = self.keys.write().unwrap_or_else(|p| p.into_inner());
                *set = KeySet {
                    by_kid,
                    fetched_at: Some(Instant::now()),
                };
            }
            // The keys we had stay in use.
            Err(why) => tracing::warn!(error = %why, "JWKS fetch failed"),
        }
    }

    async fn fetch(&self) -> Result<HashMap<String, Arc<Key>>, String> {
        let resp = self
            .http
            .get(&self.url)
            .timeout(Duration::from_secs(3))
            .send()
            .await
            .map_err(|e| format!("request: {e}"))?;
        if !resp.status().is_success() {
            return Err(format!("status {}", resp.status()));
        }
        if resp
            .content_length()
            .is_some_and(|n| n > MAX_JWKS_BYTES as u64)
        {
            return Err("the document is too large".into());
        }
        let body = resp.bytes().await.map_err(|e| format!("body: {e}"))?;
        if body.len() > MAX_JWKS_BYTES {
            return Err("the document is too large".into());
        }
        Ok(parse_jwks(&body))
    }
}

/// The usable keys of a JWKS document by `kid`. A key we cannot use (no
/// `kid`, an unknown type, a symmetric key, bad numbers) is skipped, not
/// fatal: issuers publish keys for other uses too.
pub fn parse_jwks(body: &[u8]) -> HashMap<String, Arc<Key>> {
    let doc: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let mut out = HashMap::new();
    for k in doc["keys"].as_array().into_iter().flatten() {
        let Ok(jwk) = serde_json::from_value::<Jwk>(k.clone()) else {
            continue;
        };
        let Some(kid) = jwk.common.key_id.clone() else {
            continue;
        };
        if matches!(
            jwk.algorithm,
            jsonwebtoken::jwk::AlgorithmParameters::OctetKey(_)
        ) {
            continue;
        }
        // Keys marked for encryption only are not for signatures.
        if jwk.common.public_key_use == Some(jsonwebtoken::jwk::PublicKeyUse::Encryption) {
            continue;
        }
        if let Ok(decoding) = DecodingKey::from_jwk(&jwk) {
            out.insert(kid, Arc::new(Key { jwk, decoding }));
        }
    }
    out
}
