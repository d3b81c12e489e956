//! Reading every setting: defaults, errors naming the variable, sources.

use std::collections::HashMap;
use std::time::Duration;

use super::*;
use crate::cache::CacheBackend;

fn cfg(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let mut m: HashMap<&str, &str> = pairs.iter().copied().collect();
    m.entry("ANTHROPIC_API_KEY").or_insert("sk-test-secret");
    m.entry("AUTH_MODE").or_insert("dev");
    Config::from_source(&m)
}

#[test]
fn defaults_are_valid() {
    let c = cfg(&[]).unwrap();
    assert_eq!(
        c.providers.anthropic.as_ref().unwrap().base_url,
        "https://api.anthropic.com"
    );
    assert_eq!(c.providers.default_provider, "anthropic");
    assert_eq!(c.routing.default_model, "claude-sonnet-4-5");
    assert!(c.providers.openai.is_none());
    assert_eq!(c.bind_addr.port(), 3000);
    assert!(c.providers.prewarm);
    assert!(!c.providers.http2_prior_knowledge);
    assert!(c.limits.default_max_tokens <= c.limits.max_tokens);
}

#[test]
fn cache_backends_live_streams_and_the_warm_budget() {
    // No Redis, no table: no cache, no live streams.
    let c = cfg(&[]).unwrap();
    assert!(c.cache.is_none() && c.live.is_none());
    // Redis: the Redis cache, popularity, live streams with coalescing.
    let c = cfg(&[("REDIS_URL", "rediss://cache.example:6379")]).unwrap();
    let cache = c.cache.unwrap();
    assert_eq!(cache.backend, CacheBackend::Redis);
    assert!(cache.popularity.is_some());
    // The instance's copies: 8 MiB for 60 s unless set; 0 MiB keeps none.
    assert_eq!(
        (cache.local.max_bytes, cache.local.ttl),
        (8 << 20, Duration::from_secs(60))
    );
    let r = ("REDIS_URL", "redis://r");
    let off = cfg(&[r, ("CACHE_LOCAL_MB", "0"), ("CACHE_LOCAL_TTL_SECS", "5")]).unwrap();
    let local = off.cache.unwrap().local;
    assert_eq!((local.max_bytes, local.ttl), (0, Duration::from_secs(5)));
    for (var, bad) in [
        ("CACHE_LOCAL_MB", "-1"),
        ("CACHE_LOCAL_MB", "5000"),
        ("CACHE_LOCAL_TTL_SECS", "0"),
    ] {
        assert_eq!(cfg(&[r, (var, bad)]).unwrap_err().variable, var);
    }
    let live = c.live.unwrap();
    assert!(live.coalesce && live.finish_on_disconnect);
    assert_eq!(live.lease, Duration::from_secs(3));
    // DynamoDB: the table's own, or CACHE_TABLE_NAME; no coalescing
    // without Redis.
    let c = cfg(&[("CACHE_BACKEND", "dynamodb"), ("TABLE_NAME", "chat")]).unwrap();
    let cache = c.cache.unwrap();
    assert_eq!(
        (cache.backend, cache.dynamodb_table.as_deref()),
        (CacheBackend::DynamoDb, Some("chat"))
    );
    assert!(c.live.is_none());
    let c = cfg(&[("CACHE_BACKEND", "dynamodb"), ("CACHE_TABLE_NAME", "cache")]).unwrap();
    assert_eq!(c.cache.unwrap().dynamodb_table.as_deref(), Some("cache"));
    assert_eq!(
        cfg(&[("CACHE_BACKEND", "dynamodb"), ("CACHE_TABLE_NAME", "a b")])
            .unwrap_err()
            .variable,
        "CACHE_TABLE_NAME"
    );
    assert_eq!(
        cfg(&[("CACHE_BACKEND", "dynamodb"), ("CACHE_ENABLED", "true")])
            .unwrap_err()
            .variable,
        "CACHE_BACKEND"
    );
    assert_eq!(
        cfg(&[("CACHE_ENABLED", "true")]).unwrap_err().variable,
        "CACHE_ENABLED"
    );
    // Coalescing needs the cache (it shares its key).
    let c = cfg(&[("REDIS_URL", "redis://r"), ("CACHE_ENABLED", "false")]).unwrap();
    assert!(!c.live.unwrap().coalesce);

    let src: HashMap<&str, &str> = [("WARM_MAX_CALLS", "3")].into_iter().collect();
    let b = crate::cache::warmer::WarmBudget::from_source(&src, Duration::from_secs(3600)).unwrap();
    assert_eq!((b.max_calls, b.top, b.concurrency), (3, 50, 4));
    assert_eq!(b.refresh_ahead, Duration::from_secs(720));
    let bad: HashMap<&str, &str> = [("WARM_CONCURRENCY", "0")].into_iter().collect();
    assert_eq!(
        crate::cache::warmer::WarmBudget::from_source(&bad, Duration::from_secs(60))
            .unwrap_err()
            .variable,
        "WARM_CONCURRENCY"
    );
}

#[test]
fn bad_values_name_the_variable() {
    for (k, v) in [
        ("BIND_ADDR", "nope"),
        ("UPSTREAM_IDLE_TIMEOUT_MS", "-1"),
        ("UPSTREAM_IDLE_TIMEOUT_MS", "0"),
        ("MAX_TOKENS_LIMIT", "0"),
        ("UPSTREAM_PREWARM", "maybe"),
        ("ANTHROPIC_BASE_URL", "ftp://x"),
        ("LOG_LEVEL", "loud"),
        ("RETRY_BUDGET_RATIO", "2"),
        ("UPSTREAM_MAX_RETRIES", "99"),
        ("BREAKER_FAILURES", "0"),
        ("MODEL_FALLBACKS", "a,has space"),
        ("REDIS_URL", "http://x"),
        ("RATE_LIMIT_RPM", "-5"),
        ("CACHE_BACKEND", "memcached"),
    ] {
        let e = cfg(&[(k, v)]).unwrap_err();
        assert_eq!(e.variable, k, "{e}");
    }
    // Settings of what only exists with Redis.
    for (k, v) in [
        ("COALESCE_LEASE_MS", "10"),
        ("RESUME_RETENTION_SECS", "1"),
        ("FINISH_ON_DISCONNECT", "sometimes"),
        ("POPULAR_MAX", "0"),
    ] {
        let e = cfg(&[(k, v), ("REDIS_URL", "redis://r")]).unwrap_err();
        assert_eq!(e.variable, k, "{e}");
    }
}

#[test]
fn missing_key_is_an_error_and_arn_is_accepted() {
    let m: HashMap<&str, &str> = [("AUTH_MODE", "dev")].into();
    assert_eq!(
        Config::from_source(&m).unwrap_err().variable,
        "ANTHROPIC_API_KEY"
    );
    let m: HashMap<&str, &str> = [
        (
            "ANTHROPIC_API_KEY_SECRET_ARN",
            "arn:aws:secretsmanager:eu-west-1:1:secret:k",
        ),
        ("AUTH_MODE", "dev"),
    ]
    .into();
    assert!(matches!(
        Config::from_source(&m)
            .unwrap()
            .providers
            .anthropic
            .unwrap()
            .api_key,
        ApiKeySource::SecretsManager { .. }
    ));
}

#[test]
fn openai_alone_is_enough_and_models_must_have_their_provider() {
    let m: HashMap<&str, &str> = [
        ("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1"),
        ("AUTH_MODE", "dev"),
    ]
    .into();
    let c = Config::from_source(&m).unwrap();
    assert_eq!(c.providers.default_provider, "openai");
    assert_eq!(c.routing.default_model, "gpt-4o-mini");
    assert_eq!(c.providers.openai.unwrap().api_key, None);
    let e = cfg(&[("MODEL_FALLBACKS", "openai:gpt-4o")]).unwrap_err();
    assert_eq!(e.variable, "MODEL_FALLBACKS");
    let e = cfg(&[("DEFAULT_PROVIDER", "openai")]).unwrap_err();
    assert_eq!(e.variable, "DEFAULT_PROVIDER");
    assert!(
        cfg(&[
            ("OPENAI_API_KEY", "k"),
            ("MODEL_FALLBACKS", "openai:gpt-4o")
        ])
        .is_ok()
    );
}

#[test]
fn auth_needs_a_key_source_and_dev_mode_stays_out_of_lambda() {
    let e = cfg(&[("AUTH_MODE", "api_key")]).unwrap_err();
    assert_eq!(e.variable, "AUTH_MODE");
    let c = cfg(&[("AUTH_MODE", "api_key"), ("TABLE_NAME", "chat")]).unwrap();
    assert_eq!(c.auth, AuthMode::ApiKey { hashes: None });
    assert_eq!(c.persistence.unwrap().table, "chat");
    let e = cfg(&[("AUTH_MODE", "api_key"), ("API_KEY_HASHES", "abc:u")]).unwrap_err();
    assert_eq!(e.variable, "API_KEY_HASHES");
    let e = cfg(&[("AWS_LAMBDA_FUNCTION_NAME", "f")]).unwrap_err();
    assert_eq!(e.variable, "AUTH_MODE");
    let e = cfg(&[("AUTH_MODE", "jwt")]).unwrap_err();
    assert_eq!(e.variable, "JWT_ISSUER");
    let e = cfg(&[("AUTH_MODE", "magic")]).unwrap_err();
    assert_eq!(e.variable, "AUTH_MODE");
    let e = cfg(&[("TABLE_NAME", "bad name!")]).unwrap_err();
    assert_eq!(e.variable, "TABLE_NAME");
}

#[test]
fn jwt_settings_and_cognito_alone() {
    use crate::auth::JwtConfig;
    let jwt = |c: Config| match c.auth {
        AuthMode::Jwt(j) | AuthMode::ApiKeyOrJwt { jwt: j, .. } => j,
        other => panic!("{other:?}"),
    };
    let e = cfg(&[("AUTH_MODE", "jwt"), ("JWT_ISSUER", "https://id.example/")]).unwrap_err();
    assert_eq!(e.variable, "JWT_AUDIENCE", "an audience is required");
    let j = jwt(cfg(&[
        ("AUTH_MODE", "jwt"),
        ("JWT_ISSUER", "https://id.example/"),
        ("JWT_AUDIENCE", "web, api"),
    ])
    .unwrap());
    assert_eq!(
        j,
        JwtConfig {
            // Kept as given (iss must match it exactly).
            issuer: "https://id.example/".into(),
            audiences: vec!["web".into(), "api".into()],
            cognito_client_id: None,
            jwks_url: "https://id.example/.well-known/jwks.json".into(),
            user_claim: "sub".into(),
            leeway_secs: 60,
            jwks_ttl: Duration::from_secs(3600),
            jwks_min_refresh: Duration::from_secs(30),
            max_token_bytes: 8192,
        }
    );
    let c = jwt(cfg(&[
        ("AUTH_MODE", "jwt,api_key"),
        ("TABLE_NAME", "chat"),
        ("COGNITO_USER_POOL_ID", "eu-west-2_AbC123"),
        ("COGNITO_CLIENT_ID", "client-1"),
        ("JWT_USER_CLAIM", "email"),
    ])
    .unwrap());
    assert_eq!(
        c.issuer,
        "https://cognito-idp.eu-west-2.amazonaws.com/eu-west-2_AbC123"
    );
    assert_eq!(
        c.jwks_url,
        "https://cognito-idp.eu-west-2.amazonaws.com/eu-west-2_AbC123/.well-known/jwks.json"
    );
    assert_eq!(c.cognito_client_id.as_deref(), Some("client-1"));
    assert!(c.audiences.is_empty());
    assert_eq!(c.user_claim, "email");
    for (pairs, var) in [
        (
            vec![("COGNITO_USER_POOL_ID", "eu-west-2_AbC123")],
            "COGNITO_CLIENT_ID",
        ),
        (vec![("COGNITO_CLIENT_ID", "c")], "COGNITO_USER_POOL_ID"),
        (
            vec![
                ("COGNITO_USER_POOL_ID", "nounderscore"),
                ("COGNITO_CLIENT_ID", "c"),
            ],
            "COGNITO_USER_POOL_ID",
        ),
        (
            vec![("JWT_ISSUER", "id.example"), ("JWT_AUDIENCE", "a")],
            "JWT_ISSUER",
        ),
        (
            vec![
                ("JWT_ISSUER", "https://i"),
                ("JWT_AUDIENCE", "a"),
                ("JWT_LEEWAY_SECS", "9999"),
            ],
            "JWT_LEEWAY_SECS",
        ),
    ] {
        let mut all = vec![("AUTH_MODE", "jwt")];
        all.extend(pairs);
        assert_eq!(cfg(&all).unwrap_err().variable, var);
    }
}

#[test]
fn allowlist_defaults_to_the_named_models() {
    use crate::provider::routing::Allowlist;
    let c = cfg(&[("MODEL_FALLBACKS", "b")]).unwrap();
    assert_eq!(c.routing.allowlist, Allowlist::Only(vec!["b".into()]));
    assert!(
        c.routing.allowed("claude-sonnet-4-5") && c.routing.allowed("b") && !c.routing.allowed("c")
    );
    assert_eq!(
        cfg(&[("MODEL_ALLOWLIST", "*")]).unwrap().routing.allowlist,
        Allowlist::Any
    );
}

#[test]
fn fallbacks_are_a_trimmed_list() {
    let c = cfg(&[("MODEL_FALLBACKS", " claude-a , ,claude-b")]).unwrap();
    assert_eq!(c.resilience.fallbacks, vec!["claude-a", "claude-b"]);
    assert!(cfg(&[]).unwrap().resilience.fallbacks.is_empty());
}

#[test]
fn secrets_never_print() {
    let c = cfg(&[]).unwrap();
    let shown = format!("{c:?}");
    assert!(!shown.contains("sk-test-secret"), "{shown}");
}

#[test]
fn flags_override_env_with_the_same_names() {
    let flags = flags_to_source([
        "--bind-addr".to_owned(),
        "127.0.0.1:9".to_owned(),
        "--log-level=debug".to_owned(),
    ])
    .unwrap();
    let env: HashMap<&str, &str> = [
        ("BIND_ADDR", "127.0.0.1:1"),
        ("ANTHROPIC_API_KEY", "k"),
        ("AUTH_MODE", "dev"),
    ]
    .into();
    let c = Config::from_source(&Layered(flags, env)).unwrap();
    assert_eq!(c.bind_addr.port(), 9);
    assert_eq!(c.log_level, tracing::Level::DEBUG);
    assert!(flags_to_source(["stray".to_owned()]).is_err());
    assert!(flags_to_source(["--port".to_owned()]).is_err());
}
