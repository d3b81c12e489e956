//! Sign-in with JSON Web Tokens from an OIDC issuer (Amazon Cognito, or
//! any issuer with a JWKS): `Authorization: Bearer <JWT>`. The signature
//! is checked by the `jsonwebtoken` crate (aws-lc-rs underneath); what is
//! ours is which tokens we accept at all:
//!
//! - asymmetric algorithms only (RS256/384/512, PS256/384/512, ES256/384,
//!   EdDSA): `alg: none` and HS* (an attacker's HMAC "signed" with our
//!   public key) are refused before any key is looked at;
//! - the key is the issuer's JWK named by `kid`; its type must fit the
//!   header's algorithm and, when the JWK names an algorithm, be that one;
//! - `iss` is the issuer; `aud` one of `JWT_AUDIENCE`, or for Cognito the
//!   app client (`client_id` of an access token, `aud` of an ID token,
//!   told apart by `token_use`); `exp` required, `exp` and `nbf` checked
//!   with `JWT_LEEWAY_SECS`;
//! - tokens over `JWT_MAX_TOKEN_BYTES` are refused unread.
//!
//! A token already verified is recognised from a bounded cache keyed by
//! its SHA-256 until it expires, so a warm instance pays the signature
//! check once per token, not once per request.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::HeaderMap;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve};
use jsonwebtoken::{Algorithm, Validation};
use sha2::{Digest, Sha256};

use super::jwks::{Jwks, Key};
use super::{AuthError, Identity, valid_user_id};

/// `JWT_*` and `COGNITO_*` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtConfig {
    /// `JWT_ISSUER` (or the Cognito user pool's issuer URL).
    pub issuer: String,
    /// `JWT_AUDIENCE`: accepted `aud` values.
    pub audiences: Vec<String>,
    /// `COGNITO_CLIENT_ID`: the app client whose access and ID tokens are
    /// accepted.
    pub cognito_client_id: Option<String>,
    /// `JWT_JWKS_URL` (default `{issuer}/.well-known/jwks.json`).
    pub jwks_url: String,
    /// `JWT_USER_CLAIM` (default `sub`): the claim that is the user id.
    pub user_claim: String,
    /// `JWT_LEEWAY_SECS` (60).
    pub leeway_secs: u64,
    /// `JWT_JWKS_TTL_SECS` (3600): how long fetched keys are used before
    /// they are fetched again.
    pub jwks_ttl: Duration,
    /// `JWT_JWKS_MIN_REFRESH_SECS` (30): the least time between fetches.
    pub jwks_min_refresh: Duration,
    /// `JWT_MAX_TOKEN_BYTES` (8192).
    pub max_token_bytes: usize,
}

/// The algorithms a public-key issuer signs with.
const ASYMMETRIC: [Algorithm; 9] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// Verified tokens remembered at most (by hash; oldest out first).
const VERIFIED_MAX: usize = 10_000;

/// Why a token was refused (logged; the client gets 401 either way, and
/// `token_expired` for an expired one so a page knows to sign in again).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    TooLarge,
    Malformed,
    Algorithm,
    UnknownKey,
    KeyMismatch,
    Signature,
    Expired,
    Claims,
    UserClaim,
}

impl Refused {
    pub fn as_str(self) -> &'static str {
        match self {
            Refused::TooLarge => "too_large",
            Refused::Malformed => "malformed",
            Refused::Algorithm => "algorithm",
            Refused::UnknownKey => "unknown_key",
            Refused::KeyMismatch => "key_mismatch",
            Refused::Signature => "signature",
            Refused::Expired => "expired",
            Refused::Claims => "claims",
            Refused::UserClaim => "user_claim",
        }
    }
}

type Verified = (Arc<str>, u64);

/// Verified tokens by SHA-256 (user, exp), and their order of arrival.
type VerifiedCache = (HashMap<[u8; 32], Verified>, VecDeque<[u8; 32]>);

pub struct JwtAuth {
    config: JwtConfig,
    jwks: Jwks,
    verified: Mutex<VerifiedCache>,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Whether `s` looks like a JWT (three base64url parts), so an API key is
/// never parsed as one.
pub fn looks_like_jwt(s: &str) -> bool {
    s.starts_with("eyJ") && s.bytes().filter(|b| *b == b'.').count() == 2
}

impl JwtAuth {
    pub fn new(config: JwtConfig, http: reqwest::Client) -> Self {
        let jwks = Jwks::new(
            config.jwks_url.clone(),
            http,
            config.jwks_ttl,
            config.jwks_min_refresh,
        );
        Self {
            config,
            jwks,
            verified: Mutex::new((HashMap::new(), VecDeque::new())),
        }
    }

    /// With the keys of a JWKS document already in place (no fetch until
    /// they are older than the TTL or a kid is unknown).
    pub fn with_keys(config: JwtConfig, http: reqwest::Client, jwks: &[u8]) -> Self {
        let auth = Self::new(config, http);
        auth.jwks.preload(jwks);
        auth
    }

    /// Fetches the keys at init (a failure is logged, not fatal: the
    /// first token fetches them again).
    pub async fn prefetch(&self) {
        self.jwks.refresh().await;
    }

    pub fn jwks_fetches(&self) -> u64 {
        self.jwks.fetches()
    }

    fn remembered(&self, hash: &[u8; 32], now: u64) -> Option<Arc<str>> {
        let v = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        v.0.get(hash)
            .filter(|(_, exp)| now < exp.saturating_add(self.config.leeway_secs))
            .map(|(user, _)| user.clone())
    }

    fn remember(&self, hash: [u8; 32], user: Arc<str>, exp: u64) {
        let mut v = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        let (map, order) = &mut *v;
        while map.len() >= VERIFIED_MAX {
            match order.pop_front() {
                Some(old) => {
                    map.remove(&old);
                }
                None => map.clear(),
            }
        }
        if map.insert(hash, (user, exp)).is_none() {
            order.push_back(hash);
        }
    }

    /// The user a token names, or why it is refused.
    pub async fn verify(&self, token: &str) -> Result<Arc<str>, Refused> {
        if token.len() > self.config.max_token_bytes {
            return Err(Refused::TooLarge);
        }
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let now = now_secs();
        if let Some(user) = self.remembered(&hash, now) {
            return Ok(user);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| Refused::Malformed)?;
        if !ASYMMETRIC.contains(&header.alg) {
            return Err(Refused::Algorithm);
        }
        let kid = header.kid.as_deref().ok_or(Refused::UnknownKey)?;
        let key = self.jwks.key(kid).await.ok_or(Refused::UnknownKey)?;
        if !key_fits(&key, header.alg) {
            return Err(Refused::KeyMismatch);
        }
        let claims = self.check(token, &key, header.alg)?;
        let user = claims
            .get(&self.config.user_claim)
            .and_then(|v| v.as_str())
            .filter(|u| valid_user_id(u))
            .ok_or(Refused::UserClaim)?;
        let exp = claims.get("exp").and_then(|v| v.as_u64()).unwrap_or(now);
        let user: Arc<str> = Arc::from(user);
        self.remember(hash, user.clone(), exp);
        Ok(user)
    }

    fn check(
        &self,
        token: &str,
        key: &Key,
        alg: Algorithm,
    ) -> Result<serde_json::Map<String, serde_json::Value>, Refused> {
        let c = &self.config;
        let mut v = Validation::new(alg);
        v.leeway = c.leeway_secs;
        v.validate_nbf = true;
        v.set_issuer(&[c.issuer.as_str()]);
        if c.audiences.is_empty() {
            v.set_required_spec_claims(&["exp", "iss"]);
            v.validate_aud = false;
        } else {
            // A token without `aud` is for no audience of ours (found by
            // the jwt fuzz target: jsonwebtoken checks `aud` only when the
            // claim is there, unless it is required).
            v.set_required_spec_claims(&["exp", "iss", "aud"]);
            v.set_audience(&c.audiences);
        }
        let data = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
            token,
            &key.decoding,
            &v,
        )
        .map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            match e.kind() {
                K::ExpiredSignature => Refused::Expired,
                K::InvalidSignature => Refused::Signature,
                K::InvalidIssuer
                | K::InvalidAudience
                | K::ImmatureSignature
                | K::MissingRequiredClaim(_) => Refused::Claims,
                K::InvalidAlgorithm | K::InvalidAlgorithmName | K::InvalidKeyFormat => {
                    Refused::KeyMismatch
                }
                _ => Refused::Malformed,
            }
        })?;
        let claims = data.claims;
        if let Some(client) = &c.cognito_client_id {
            // Cognito: access tokens name the app client in client_id and
            // carry no aud; ID tokens carry it in aud.
            let s = |k: &str| claims.get(k).and_then(|v| v.as_str());
            let ok = match s("token_use") {
                Some("access") => s("client_id") == Some(client.as_str()),
                Some("id") => s("aud") == Some(client.as_str()),
                _ => false,
            };
            if !ok {
                return Err(Refused::Claims);
            }
        }
        Ok(claims)
    }

    pub async fn check_headers(&self, headers: &HeaderMap) -> Result<Identity, AuthError> {
        let token = bearer(headers).ok_or(AuthError::Missing)?;
        match self.verify(token).await {
            Ok(user_id) => Ok(Identity { user_id }),
            Err(Refused::Expired) => Err(AuthError::Expired),
            Err(why) => {
                tracing::info!(reason = why.as_str(), "token refused");
                Err(AuthError::Invalid)
            }
        }
    }
}

/// The token of `Authorization: Bearer`.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, rest) = v.trim().split_once(' ')?;
    let t = rest.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !t.is_empty()).then_some(t)
}

/// The JWK's type fits the header's algorithm, and a JWK that names its
/// algorithm names this one.
fn key_fits(key: &Key, alg: Algorithm) -> bool {
    if let Some(named) = &key.jwk.common.key_algorithm {
        if format!("{named:?}") != format!("{alg:?}") {
            return false;
        }
    }
    match (&key.jwk.algorithm, alg) {
        (
            AlgorithmParameters::RSA(_),
            Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512,
        ) => true,
        (AlgorithmParameters::EllipticCurve(p), Algorithm::ES256) => p.curve == EllipticCurve::P256,
        (AlgorithmParameters::EllipticCurve(p), Algorithm::ES384) => p.curve == EllipticCurve::P384,
        (AlgorithmParameters::OctetKeyPair(p), Algorithm::EdDSA) => {
            p.curve == EllipticCurve::Ed25519
        }
        _ => false,
    }
}
