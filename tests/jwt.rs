//! Sign-in with JWTs from an OIDC issuer (oidc-sim, the local stand-in),
//! over real HTTP: which tokens are accepted, what every refused one gets
//! (401 JSON, no model call), key rotation and the JWKS refresh limit,
//! Cognito's token shapes, both credentials at once, the
//! authorization-code flow with PKCE a page uses, and that a signed-in
//! user reaches only their own conversations.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use e2e::{ChatServer, LocalAws, RedisServer, read_sse, require_aws_endpoint, sim};
use jsonwebtoken::Algorithm;
use oidc_sim::{IssuerConfig, MintSpec, RunningIssuer};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

async fn issuer() -> RunningIssuer {
    oidc_sim::start(([127, 0, 0, 1], 0).into(), IssuerConfig::default())
        .await
        .unwrap()
}

/// chat-stream with `AUTH_MODE=jwt` against `iss`, plus `extra`.
async fn jwt_server(
    sim: &model_sim::Sim,
    iss: &RunningIssuer,
    extra: &[(&str, &str)],
) -> ChatServer {
    let (url, issuer_url) = (sim.url(), iss.url());
    let mut env = vec![
        ("ANTHROPIC_BASE_URL", url.as_str()),
        ("AUTH_MODE", "jwt"),
        ("JWT_ISSUER", issuer_url.as_str()),
        ("JWT_AUDIENCE", "chat-stream"),
    ];
    env.extend_from_slice(extra);
    ChatServer::start(&env).await
}

async fn chat(server: &ChatServer, token: &str, body: Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(server.url("/chat"))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .unwrap()
}

async fn get(server: &ChatServer, token: &str, path: &str) -> reqwest::Response {
    reqwest::Client::new()
        .get(server.url(path))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

fn hi() -> Value {
    json!({"message": "hello", "max_tokens": 16})
}

fn b64(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(v.to_string())
}

#[tokio::test]
async fn valid_tokens_of_each_algorithm_are_accepted() {
    let sim = sim(0, 2000.0, 8).await;
    let iss = issuer().await;
    let server = jwt_server(&sim, &iss, &[]).await;
    for alg in ["ES256", "RS256", "EdDSA"] {
        let mut spec = MintSpec::user(&format!("user-{alg}"));
        spec.alg = Some(alg.into());
        let token = iss.mint(&spec).unwrap();
        let resp = chat(&server, &token, hi()).await;
        assert_eq!(resp.status(), 200, "{alg}");
        let (events, _) = read_sse(resp, Duration::from_secs(10)).await;
        assert_eq!(events.last().unwrap().event, "done", "{alg}");
        // The same token again: recognised from the verified-token cache.
        assert_eq!(chat(&server, &token, hi()).await.status(), 200);
    }
    // An audience list: any of them.
    let server2 = jwt_server(&sim, &iss, &[("JWT_AUDIENCE", "web, chat-stream")]).await;
    let token = iss.mint(&MintSpec::user("ann")).unwrap();
    assert_eq!(chat(&server2, &token, hi()).await.status(), 200);
}

#[tokio::test]
async fn every_bad_token_is_a_401_json_and_calls_no_model() {
    let sim = sim(0, 2000.0, 8).await;
    let iss = issuer().await;
    let server = jwt_server(&sim, &iss, &[]).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims =
        json!({"iss": iss.url(), "sub": "mallory", "aud": "chat-stream", "exp": now + 600});
    let es = iss.key(Algorithm::ES256).unwrap();
    let rs = iss.key(Algorithm::RS256).unwrap();

    let spec = |f: &dyn Fn(&mut MintSpec)| {
        let mut s = MintSpec::user("mallory");
        f(&mut s);
        iss.mint(&s).unwrap()
    };
    let valid = spec(&|_| {});
    let mut tampered: Vec<String> = valid.split('.').map(str::to_owned).collect();
    // Another user in the payload under the original signature.
    tampered[1] =
        b64(&json!({"iss": iss.url(), "sub": "admin", "aud": "chat-stream", "exp": now + 600}));
    let hs256_with_public_key = {
        let mut h = jsonwebtoken::Header::new(Algorithm::HS256);
        h.kid = Some(rs.kid.clone());
        jsonwebtoken::encode(
            &h,
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(&rs.public_der),
        )
        .unwrap()
    };
    let alg_none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT", "kid": es.kid})),
        b64(&claims)
    );
    let mut big = MintSpec::user("mallory");
    big.extra.insert("pad".into(), json!("x".repeat(9000)));
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "expired",
            spec(&|s| s.ttl_secs = Some(-120)),
            "token_expired",
        ),
        (
            "not yet valid",
            spec(&|s| s.nbf_in_secs = Some(600)),
            "invalid_credentials",
        ),
        (
            "wrong issuer",
            spec(&|s| s.iss = Some("http://evil.example".into())),
            "invalid_credentials",
        ),
        (
            "wrong audience",
            spec(&|s| s.aud = Some(json!("other-app"))),
            "invalid_credentials",
        ),
        ("bad signature", tampered.join("."), "invalid_credentials"),
        (
            "unknown kid",
            iss.sign(Algorithm::ES256, Some("no-such-key"), &claims)
                .unwrap(),
            "invalid_credentials",
        ),
        (
            "kty disagrees with alg",
            iss.sign(Algorithm::RS256, Some(&es.kid), &claims).unwrap(),
            "invalid_credentials",
        ),
        ("alg none", alg_none, "invalid_credentials"),
        (
            "HS256 signed with the public key",
            hs256_with_public_key,
            "invalid_credentials",
        ),
        (
            "malformed",
            "eyJhbGciOiJFUzI1NiJ9.not-json.sig".into(),
            "invalid_credentials",
        ),
        ("not a JWT", "ck_some_api_key".into(), "invalid_credentials"),
        ("oversized", iss.mint(&big).unwrap(), "invalid_credentials"),
        (
            "no exp",
            iss.sign(
                Algorithm::ES256,
                None,
                &json!({"iss": iss.url(), "sub": "m", "aud": "chat-stream"}),
            )
            .unwrap(),
            "invalid_credentials",
        ),
        (
            // Found by the jwt fuzz target (crates/fuzz/corpus/jwt/).
            "no aud while an audience is configured",
            iss.sign(
                Algorithm::ES256,
                None,
                &json!({"iss": iss.url(), "sub": "m", "exp": now + 600}),
            )
            .unwrap(),
            "invalid_credentials",
        ),
    ];
    let calls = sim.calls();
    for (name, token, code) in cases {
        let resp = chat(&server, &token, hi()).await;
        assert_eq!(resp.status(), 401, "{name}");
        assert!(resp.headers().contains_key("www-authenticate"), "{name}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["code"], code, "{name}: {body}");
        assert!(body["message"].as_str().unwrap().len() > 5, "{name}");
    }
    let resp = reqwest::Client::new()
        .post(server.url("/chat"))
        .json(&hi())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["code"],
        "missing_credentials"
    );
    assert_eq!(sim.calls(), calls, "no refused request reached the model");
    // And the valid one does.
    assert_eq!(chat(&server, &valid, hi()).await.status(), 200);
}

#[tokio::test]
async fn a_key_rotation_is_picked_up_with_one_fetch() {
    let sim = sim(0, 2000.0, 8).await;
    let iss = issuer().await;
    let server = jwt_server(&sim, &iss, &[("JWT_JWKS_MIN_REFRESH_SECS", "1")]).await;
    assert_eq!(iss.jwks_requests(), 1, "fetched once at init");
    let old = iss.mint(&MintSpec::user("rot")).unwrap();
    assert_eq!(chat(&server, &old, hi()).await.status(), 200);
    assert_eq!(iss.jwks_requests(), 1, "a known key needs no fetch");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    iss.rotate().unwrap();
    let new = iss.mint(&MintSpec::user("rot")).unwrap();
    assert_eq!(chat(&server, &new, hi()).await.status(), 200);
    assert_eq!(iss.jwks_requests(), 2, "the new kid fetched the set once");
    let again = iss.mint(&MintSpec::user("rot2")).unwrap();
    assert_eq!(chat(&server, &again, hi()).await.status(), 200);
    assert_eq!(iss.jwks_requests(), 2);
}

#[tokio::test]
async fn a_flood_of_unknown_kids_fetches_the_jwks_at_most_once_per_interval() {
    let sim = sim(0, 2000.0, 8).await;
    let iss = issuer().await;
    // 100 bad tokens from one address: the failed sign-in limit is off so
    // every one reaches the JWKS path (tests/limits.rs tests that limit).
    let server = jwt_server(
        &sim,
        &iss,
        &[
            ("JWT_JWKS_MIN_REFRESH_SECS", "5"),
            ("AUTH_FAILURES_PER_IP_PER_MINUTE", "0"),
        ],
    )
    .await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = json!({"iss": iss.url(), "sub": "flood", "aud": "chat-stream", "exp": now + 600});
    let flood = |round: usize| {
        let tokens: Vec<String> = (0..50)
            .map(|i| {
                iss.sign(
                    Algorithm::ES256,
                    Some(&format!("made-up-{round}-{i}")),
                    &claims,
                )
                .unwrap()
            })
            .collect();
        let server = &server;
        async move {
            let all = tokens.iter().map(|t| chat(server, t, hi()));
            for r in futures_util::future::join_all(all).await {
                assert_eq!(r.status(), 401);
            }
        }
    };
    // Within the interval after the init fetch: none.
    flood(0).await;
    assert_eq!(iss.jwks_requests(), 1);
    tokio::time::sleep(Duration::from_millis(5100)).await;
    flood(1).await;
    assert_eq!(iss.jwks_requests(), 2, "one fetch for 50 unknown kids");
}

#[tokio::test]
async fn cognito_access_and_id_tokens_of_the_app_client() {
    let sim = sim(0, 2000.0, 8).await;
    let iss = issuer().await;
    let jwks = format!("{}/.well-known/jwks.json", iss.url());
    let issuer_url = iss.url();
    let url = sim.url();
    // A user pool and its app client alone; the issuer and JWKS are
    // pointed at the stand-in (in AWS they are derived from the pool id).
    let server = ChatServer::start(&[
        ("ANTHROPIC_BASE_URL", url.as_str()),
        ("AUTH_MODE", "jwt"),
        ("COGNITO_USER_POOL_ID", "us-east-1_Example"),
        ("COGNITO_CLIENT_ID", "app-1"),
        ("JWT_ISSUER", issuer_url.as_str()),
        ("JWT_JWKS_URL", jwks.as_str()),
    ])
    .await;
    let token = |use_: &str, client: Option<&str>, aud: Option<&str>| {
        let mut s = MintSpec::user("cog");
        s.aud = Some(aud.map_or(Value::Null, |a| json!(a)));
        s.extra.insert("token_use".into(), json!(use_));
        if let Some(c) = client {
            s.extra.insert("client_id".into(), json!(c));
        }
        iss.mint(&s).unwrap()
    };
    for (name, t, status) in [
        (
            "access token of the client",
            token("access", Some("app-1"), None),
            200,
        ),
        (
            "ID token of the client",
            token("id", None, Some("app-1")),
            200,
        ),
        (
            "access token of another client",
            token("access", Some("app-2"), None),
            401,
        ),
        (
            "ID token of another client",
            token("id", None, Some("app-2")),
            401,
        ),
        ("no token_use", token("", Some("app-1"), Some("app-1")), 401),
    ] {
        assert_eq!(chat(&server, &t, hi()).await.status(), status, "{name}");
    }
}

#[tokio::test]
async fn api_keys_and_tokens_together() {
    let sim = sim(0, 2000.0, 8).await;
    let iss = issuer().await;
    let key = "ck_both_modes_key";
    let hashes = format!("{}:key-user", chat_core::auth::hash_key(key));
    let server = jwt_server(
        &sim,
        &iss,
        &[
            ("AUTH_MODE", "api_key,jwt"),
            ("API_KEY_HASHES", hashes.as_str()),
        ],
    )
    .await;
    let token = iss.mint(&MintSpec::user("token-user")).unwrap();
    assert_eq!(chat(&server, &token, hi()).await.status(), 200);
    assert_eq!(chat(&server, key, hi()).await.status(), 200);
    let r = reqwest::Client::new()
        .post(server.url("/chat"))
        .header("x-api-key", key)
        .json(&hi())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(chat(&server, "ck_wrong", hi()).await.status(), 401);
    let mut expired = MintSpec::user("token-user");
    expired.ttl_secs = Some(-300);
    assert_eq!(
        chat(&server, &iss.mint(&expired).unwrap(), hi())
            .await
            .status(),
        401
    );
}

/// The flow a single-page app runs against Cognito's hosted UI: PKCE, no
/// client secret, then the access token on every call.
#[tokio::test]
async fn the_authorization_code_flow_with_pkce_signs_a_page_in() {
    let sim = sim(0, 2000.0, 8).await;
    let iss = issuer().await;
    let server = jwt_server(&sim, &iss, &[]).await;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let discovery: Value = http
        .get(format!("{}/.well-known/openid-configuration", iss.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(discovery["issuer"], iss.url().as_str());
    assert_eq!(
        discovery["code_challenge_methods_supported"],
        json!(["S256"])
    );
    let verifier = "a-verifier-of-at-least-forty-three-characters-long-0123456789";
    let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
    let redirect = "http://127.0.0.1:5173/callback";
    let params = [
        ("response_type", "code"),
        ("client_id", "web"),
        ("redirect_uri", redirect),
        ("code_challenge", challenge.as_str()),
        ("code_challenge_method", "S256"),
        ("state", "st<ate>&1"),
    ];
    let form = http
        .get(discovery["authorization_endpoint"].as_str().unwrap())
        .query(&params)
        .send()
        .await
        .unwrap();
    assert_eq!(form.status(), 200);
    let html = form.text().await.unwrap();
    assert!(
        html.contains("name=\"username\"") && html.contains("st&lt;ate&gt;&amp;1"),
        "{html}"
    );
    let mut signin: Vec<(&str, &str)> = params.to_vec();
    signin.push(("username", "page-user"));
    let back = http
        .post(discovery["authorization_endpoint"].as_str().unwrap())
        .form(&signin)
        .send()
        .await
        .unwrap();
    assert_eq!(back.status(), 302);
    let location = back.headers()["location"].to_str().unwrap().to_owned();
    assert!(location.starts_with(redirect), "{location}");
    assert!(location.contains("state=st%3Cate%3E%261"), "{location}");
    let code = location
        .split(['?', '&'])
        .find_map(|p| p.strip_prefix("code="))
        .unwrap()
        .to_owned();
    let token_url = discovery["token_endpoint"].as_str().unwrap();
    let exchange = |code: String, verifier: &'static str| {
        http.post(token_url)
            .form(&[
                ("grant_type", "authorization_code"),
                ("code", code.as_str()),
                ("redirect_uri", redirect),
                ("client_id", "web"),
                ("code_verifier", verifier),
            ])
            .send()
    };
    // A wrong verifier uses the code up too.
    let wrong = exchange(
        code.clone(),
        "wrong-verifier-wrong-verifier-wrong-verifier-00",
    )
    .await
    .unwrap();
    assert_eq!(wrong.status(), 400);
    assert_eq!(
        wrong.json::<Value>().await.unwrap()["error"],
        "invalid_grant"
    );
    let reused = exchange(code, verifier).await.unwrap();
    assert_eq!(reused.status(), 400);

    // Again, properly.
    let back = http
        .post(discovery["authorization_endpoint"].as_str().unwrap())
        .form(&signin)
        .send()
        .await
        .unwrap();
    let location = back.headers()["location"].to_str().unwrap().to_owned();
    let code = location
        .split(['?', '&'])
        .find_map(|p| p.strip_prefix("code="))
        .unwrap()
        .to_owned();
    let tokens: Value = exchange(code, verifier)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(tokens["token_type"], "Bearer");
    let access = tokens["access_token"].as_str().unwrap();
    let resp = chat(&server, access, hi()).await;
    assert_eq!(resp.status(), 200);
    let (events, _) = read_sse(resp, Duration::from_secs(10)).await;
    assert_eq!(events.last().unwrap().event, "done");
    // The ID token is for the page (aud = the client), not for the API.
    let id = tokens["id_token"].as_str().unwrap();
    assert_eq!(chat(&server, id, hi()).await.status(), 401);
}

#[tokio::test]
async fn a_signed_in_user_reaches_only_their_own_conversations() {
    require_aws_endpoint();
    let aws = LocalAws::create(&[]).await;
    let redis = RedisServer::start().await;
    let sim = sim(0, 40.0, 12).await;
    let iss = issuer().await;
    let redis_url = redis.url();
    let server = jwt_server(
        &sim,
        &iss,
        &[
            ("TABLE_NAME", aws.table.as_str()),
            ("REDIS_URL", redis_url.as_str()),
            ("REDIS_TIMEOUT_MS", "1000"),
        ],
    )
    .await;
    let ann = iss.mint(&MintSpec::user("ann")).unwrap();
    let bob = iss.mint(&MintSpec::user("bob")).unwrap();
    let resp = chat(&server, &ann, hi()).await;
    let stream_id = resp.headers()["x-stream-id"].to_str().unwrap().to_owned();
    let conversation = resp.headers()["x-conversation-id"]
        .to_str()
        .unwrap()
        .to_owned();
    // Bob tries Ann's stream while it is live, then after.
    let r = get(&server, &bob, &format!("/chat/streams/{stream_id}")).await;
    assert_eq!(r.status(), 404);
    read_sse(resp, Duration::from_secs(10)).await;
    assert_eq!(
        get(&server, &ann, &format!("/conversations/{conversation}"))
            .await
            .status(),
        200
    );
    let theirs = get(&server, &bob, &format!("/conversations/{conversation}")).await;
    assert_eq!(theirs.status(), 404);
    let unknown = get(&server, &bob, "/conversations/no-such-conversation").await;
    assert_eq!(unknown.status(), 404);
    assert_eq!(
        theirs.json::<Value>().await.unwrap()["code"],
        unknown.json::<Value>().await.unwrap()["code"],
        "someone else's is the same 404 as an unknown one"
    );
    let r = chat(
        &server,
        &bob,
        json!({"message": "continue", "conversation_id": conversation}),
    )
    .await;
    assert_eq!(r.status(), 404);
    let r = get(&server, &bob, &format!("/chat/streams/{stream_id}")).await;
    assert_eq!(r.status(), 404);
    let list: Value = get(&server, &bob, "/conversations")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list["conversations"], json!([]));
    let list: Value = get(&server, &ann, "/conversations")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list["conversations"][0]["id"], conversation.as_str());
}
