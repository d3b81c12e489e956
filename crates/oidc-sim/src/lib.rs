//! A local OpenID Connect issuer: what Amazon Cognito's hosted UI is to a
//! deployed page, for `make run` and the tests.
//!
//! - `GET /.well-known/openid-configuration` (discovery) and
//!   `GET /.well-known/jwks.json` (ES256, RS256 and EdDSA keys made at start);
//! - the authorization-code flow with PKCE (S256) and no client secret, as a
//!   single-page app uses it: `GET /authorize` shows a form that signs in
//!   whatever user name is typed, `POST /authorize` redirects back with a
//!   one-time code, `POST /token` trades it (and the verifier) for an ID
//!   token (`aud` = the client) and an access token (`aud` = the configured
//!   audience, `client_id`, `token_use: access`, as Cognito's carry);
//! - `POST /mint` (JSON) mints a token directly, for tests and curl;
//! - [`Issuer::rotate`] replaces the keys, as an issuer's rotation does.
//!
//! It is a stand-in for development: anyone can sign in as anyone.

pub mod keys;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{Form, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, Header};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

pub use keys::SigningKey;

#[derive(Debug, Clone)]
pub struct IssuerConfig {
    /// The `aud` of access tokens (what chat-stream's `JWT_AUDIENCE` names).
    pub audience: String,
    /// Lifetime of the tokens `/token` gives.
    pub token_ttl: Duration,
    /// The algorithm `/token` signs with.
    pub alg: Algorithm,
}

impl Default for IssuerConfig {
    fn default() -> Self {
        Self {
            audience: "chat-stream".into(),
            token_ttl: Duration::from_secs(3600),
            alg: Algorithm::ES256,
        }
    }
}

struct PendingCode {
    client_id: String,
    redirect_uri: String,
    challenge: String,
    user: String,
    nonce: Option<String>,
    expires: u64,
}

pub struct Issuer {
    url: String,
    config: IssuerConfig,
    keys: RwLock<Vec<Arc<SigningKey>>>,
    codes: Mutex<HashMap<String, PendingCode>>,
    jwks_requests: AtomicU64,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn fresh_keys() -> Result<Vec<Arc<SigningKey>>, String> {
    Ok(vec![
        Arc::new(keys::es256()?),
        Arc::new(keys::rs256()?),
        Arc::new(keys::eddsa()?),
    ])
}

/// What to put in a minted token.
#[derive(Debug, Clone, Deserialize)]
pub struct MintSpec {
    pub sub: String,
    /// Default: the configured audience.
    pub aud: Option<Value>,
    /// `ES256` (default), `RS256` or `EdDSA`.
    pub alg: Option<String>,
    /// Seconds from now; negative for an expired token.
    pub ttl_secs: Option<i64>,
    /// Seconds from now before which the token is not valid.
    pub nbf_in_secs: Option<i64>,
    /// Default: this issuer.
    pub iss: Option<String>,
    /// More claims (`token_use`, `client_id`, ...).
    #[serde(default)]
    pub extra: serde_json::Map<String, Value>,
}

impl MintSpec {
    pub fn user(sub: &str) -> Self {
        Self {
            sub: sub.into(),
            aud: None,
            alg: None,
            ttl_secs: None,
            nbf_in_secs: None,
            iss: None,
            extra: serde_json::Map::new(),
        }
    }
}

impl Issuer {
    pub fn url(&self) -> &str {
        &self.url
    }

    /// How many times the JWKS was fetched.
    pub fn jwks_requests(&self) -> u64 {
        self.jwks_requests.load(Ordering::SeqCst)
    }

    /// The current key for `alg`.
    pub fn key(&self, alg: Algorithm) -> Option<Arc<SigningKey>> {
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        keys.iter().find(|k| k.alg == alg).cloned()
    }

    /// New keys with new ids replace the old ones.
    pub fn rotate(&self) -> Result<(), String> {
        let new = fresh_keys()?;
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = new;
        Ok(())
    }

    pub fn jwks(&self) -> Value {
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        json!({"keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()})
    }

    /// Signs `claims` with the key for `alg`, under `kid` (default: that
    /// key's own id).
    pub fn sign(
        &self,
        alg: Algorithm,
        kid: Option<&str>,
        claims: &Value,
    ) -> Result<String, String> {
        let key = self
            .key(alg)
            .ok_or_else(|| format!("no {alg:?} key here"))?;
        let mut header = Header::new(alg);
        header.kid = Some(kid.unwrap_or(&key.kid).to_owned());
        jsonwebtoken::encode(&header, claims, &key.encoding).map_err(|e| e.to_string())
    }

    /// A token for `spec`.
    pub fn mint(&self, spec: &MintSpec) -> Result<String, String> {
        let alg = match spec.alg.as_deref().unwrap_or("ES256") {
            "ES256" => Algorithm::ES256,
            "RS256" => Algorithm::RS256,
            "EdDSA" => Algorithm::EdDSA,
            other => return Err(format!("alg {other:?} is not ES256, RS256 or EdDSA")),
        };
        let now = now_secs() as i64;
        let ttl = spec
            .ttl_secs
            .unwrap_or(self.config.token_ttl.as_secs() as i64);
        let mut claims = json!({
            "iss": spec.iss.clone().unwrap_or_else(|| self.url.clone()),
            "sub": spec.sub,
            "aud": spec.aud.clone().unwrap_or_else(|| json!(self.config.audience)),
            "iat": now,
            "exp": now + ttl,
        });
        if let Some(n) = spec.nbf_in_secs {
            claims["nbf"] = json!(now + n);
        }
        for (k, v) in &spec.extra {
            claims[k] = v.clone();
        }
        self.sign(alg, None, &claims)
    }
}

/// A running issuer on a local port.
pub struct RunningIssuer {
    pub issuer: Arc<Issuer>,
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl RunningIssuer {
    pub fn url(&self) -> String {
        self.issuer.url.clone()
    }
}

impl Drop for RunningIssuer {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

impl std::ops::Deref for RunningIssuer {
    type Target = Issuer;
    fn deref(&self) -> &Issuer {
        &self.issuer
    }
}

/// Starts an issuer on `addr` (port 0 for any).
pub async fn start(addr: SocketAddr, config: IssuerConfig) -> std::io::Result<RunningIssuer> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let keys = fresh_keys().map_err(std::io::Error::other)?;
    let issuer = Arc::new(Issuer {
        url: format!("http://{addr}"),
        config,
        keys: RwLock::new(keys),
        codes: Mutex::new(HashMap::new()),
        jwks_requests: AtomicU64::new(0),
    });
    let app = router(issuer.clone());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = rx.await;
            })
            .await;
    });
    Ok(RunningIssuer {
        issuer,
        addr,
        stop: Some(tx),
    })
}

pub fn router(issuer: Arc<Issuer>) -> Router {
    // A page on another origin calls discovery, the JWKS and /token with
    // fetch, as it would call Cognito's.
    let cors = tower_http::cors::CorsLayer::new()
        .allow_origin(tower_http::cors::Any)
        .allow_methods([axum::http::Method::GET, axum::http::Method::POST])
        .allow_headers([header::CONTENT_TYPE]);
    Router::new()
        .route("/.well-known/openid-configuration", get(discovery))
        .route("/.well-known/jwks.json", get(jwks))
        .route("/authorize", get(authorize_form).post(authorize))
        .route("/token", post(token))
        .route("/mint", post(mint))
        .layer(cors)
        .with_state(issuer)
}

fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    (
        status,
        Json(json!({"error": error, "error_description": description})),
    )
        .into_response()
}

async fn discovery(State(st): State<Arc<Issuer>>) -> Json<Value> {
    let u = &st.url;
    Json(json!({
        "issuer": u,
        "authorization_endpoint": format!("{u}/authorize"),
        "token_endpoint": format!("{u}/token"),
        "jwks_uri": format!("{u}/.well-known/jwks.json"),
        "response_types_supported": ["code"],
        "grant_types_supported": ["authorization_code"],
        "code_challenge_methods_supported": ["S256"],
        "token_endpoint_auth_methods_supported": ["none"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["ES256", "RS256", "EdDSA"],
        "scopes_supported": ["openid"],
    }))
}

async fn jwks(State(st): State<Arc<Issuer>>) -> Json<Value> {
    st.jwks_requests.fetch_add(1, Ordering::SeqCst);
    Json(st.jwks())
}

#[derive(Debug, Deserialize)]
struct AuthorizeParams {
    response_type: Option<String>,
    client_id: Option<String>,
    redirect_uri: Option<String>,
    code_challenge: Option<String>,
    code_challenge_method: Option<String>,
    state: Option<String>,
    nonce: Option<String>,
    /// Only in the form's POST.
    username: Option<String>,
}

struct Checked {
    client_id: String,
    redirect_uri: String,
    challenge: String,
}

/// The request's problem, for an `invalid_request` answer.
fn check_authorize(p: &AuthorizeParams) -> Result<Checked, &'static str> {
    let bad = |d: &'static str| d;
    if p.response_type.as_deref() != Some("code") {
        return Err(bad("response_type must be code"));
    }
    let client_id = p
        .client_id
        .clone()
        .filter(|c| !c.is_empty())
        .ok_or_else(|| bad("client_id is required"))?;
    let redirect_uri = p
        .redirect_uri
        .clone()
        .filter(|u| u.starts_with("http://") || u.starts_with("https://"))
        .ok_or_else(|| bad("redirect_uri must be an http(s) URL"))?;
    if p.code_challenge_method.as_deref() != Some("S256") {
        return Err(bad("PKCE is required: code_challenge_method must be S256"));
    }
    let challenge = p
        .code_challenge
        .clone()
        .filter(|c| (43..=128).contains(&c.len()))
        .ok_or_else(|| bad("code_challenge must be a base64url SHA-256"))?;
    Ok(Checked {
        client_id,
        redirect_uri,
        challenge,
    })
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

async fn authorize_form(Query(p): Query<AuthorizeParams>) -> Response {
    if let Err(why) = check_authorize(&p) {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", why);
    }
    let hidden: String = [
        ("response_type", &p.response_type),
        ("client_id", &p.client_id),
        ("redirect_uri", &p.redirect_uri),
        ("code_challenge", &p.code_challenge),
        ("code_challenge_method", &p.code_challenge_method),
        ("state", &p.state),
        ("nonce", &p.nonce),
    ]
    .iter()
    .filter_map(|(k, v)| {
        v.as_ref()
            .map(|v| format!(r#"<input type="hidden" name="{k}" value="{}">"#, escape(v)))
    })
    .collect();
    Html(format!(
        r#"<!doctype html><html><head><meta charset="utf-8"><title>Sign in (local issuer)</title></head>
<body><h1>Sign in</h1><p>Local OIDC stand-in: any user name signs in.</p>
<form method="post" action="/authorize">{hidden}
<label>User name <input name="username" id="username" autofocus required pattern="[A-Za-z0-9._@\-]{{1,64}}"></label>
<button type="submit" id="sign-in">Sign in</button></form></body></html>"#
    ))
    .into_response()
}

async fn authorize(State(st): State<Arc<Issuer>>, Form(p): Form<AuthorizeParams>) -> Response {
    let checked = match check_authorize(&p) {
        Ok(c) => c,
        Err(why) => return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", why),
    };
    let user = p.username.as_deref().map(str::trim).unwrap_or("");
    let ok = !user.is_empty()
        && user.len() <= 64
        && user
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'@'));
    if !ok {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "username: 1-64 of A-Z a-z 0-9 - _ . @",
        );
    }
    let code = uuid::Uuid::new_v4().simple().to_string();
    let sep = if checked.redirect_uri.contains('?') {
        '&'
    } else {
        '?'
    };
    let mut location = format!("{}{sep}code={code}", checked.redirect_uri);
    if let Some(s) = &p.state {
        location.push_str("&state=");
        location.push_str(&url_encode(s));
    }
    st.codes.lock().unwrap_or_else(|e| e.into_inner()).insert(
        code,
        PendingCode {
            client_id: checked.client_id,
            redirect_uri: checked.redirect_uri,
            challenge: checked.challenge,
            user: user.to_owned(),
            nonce: p.nonce.clone(),
            expires: now_secs() + 120,
        },
    );
    let mut resp = StatusCode::FOUND.into_response();
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[derive(Debug, Deserialize)]
struct TokenParams {
    grant_type: Option<String>,
    code: Option<String>,
    redirect_uri: Option<String>,
    client_id: Option<String>,
    code_verifier: Option<String>,
}

async fn token(State(st): State<Arc<Issuer>>, Form(p): Form<TokenParams>) -> Response {
    let grant = |d: &str| oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", d);
    if p.grant_type.as_deref() != Some("authorization_code") {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "grant_type must be authorization_code",
        );
    }
    // One use: the code is gone whatever happens next.
    let pending = p
        .code
        .as_deref()
        .and_then(|c| st.codes.lock().unwrap_or_else(|e| e.into_inner()).remove(c));
    let Some(pending) = pending else {
        return grant("unknown or used code");
    };
    if pending.expires < now_secs() {
        return grant("the code expired");
    }
    if p.client_id.as_deref() != Some(pending.client_id.as_str())
        || p.redirect_uri.as_deref() != Some(pending.redirect_uri.as_str())
    {
        return grant("client_id or redirect_uri differ from the authorization request");
    }
    let verifier = p.code_verifier.unwrap_or_default();
    let computed = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
    if verifier.len() < 43 || computed != pending.challenge {
        return grant("code_verifier does not match the code_challenge");
    }
    let ttl = st.config.token_ttl.as_secs() as i64;
    let alg = match st.config.alg {
        Algorithm::RS256 => "RS256",
        Algorithm::EdDSA => "EdDSA",
        _ => "ES256",
    };
    let mut id = MintSpec::user(&pending.user);
    id.aud = Some(json!(pending.client_id));
    id.alg = Some(alg.into());
    id.ttl_secs = Some(ttl);
    id.extra.insert("token_use".into(), json!("id"));
    if let Some(n) = &pending.nonce {
        id.extra.insert("nonce".into(), json!(n));
    }
    let mut access = MintSpec::user(&pending.user);
    access.alg = Some(alg.into());
    access.ttl_secs = Some(ttl);
    access.extra.insert("token_use".into(), json!("access"));
    access
        .extra
        .insert("client_id".into(), json!(pending.client_id));
    access.extra.insert("scope".into(), json!("openid"));
    match (st.mint(&id), st.mint(&access)) {
        (Ok(id_token), Ok(access_token)) => Json(json!({
            "access_token": access_token,
            "id_token": id_token,
            "token_type": "Bearer",
            "expires_in": ttl,
        }))
        .into_response(),
        (Err(e), _) | (_, Err(e)) => {
            oauth_error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", &e)
        }
    }
}

async fn mint(State(st): State<Arc<Issuer>>, Json(spec): Json<MintSpec>) -> Response {
    match st.mint(&spec) {
        Ok(t) => Json(json!({"token": t})).into_response(),
        Err(e) => oauth_error(StatusCode::BAD_REQUEST, "invalid_request", &e),
    }
}
