//! `chat-bench jwt [--tokens 2000]`: what JWT sign-in costs chat-stream
//! per request, for each algorithm: the first verification of a token
//! (header, key lookup, signature, claims: what a new token costs) and a
//! token already verified (recognised by its hash from the cache: what
//! every later request with it costs). Against oidc-sim in-process, keys
//! fetched once before timing. Prints a Markdown table.

#![allow(clippy::print_stdout)] // a bench prints its table

use std::process::ExitCode;
use std::time::{Duration, Instant};

use chat_core::auth::JwtConfig;
use chat_core::auth::jwt::JwtAuth;

fn pct(sorted: &[Duration], p: f64) -> f64 {
    let idx = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[idx.min(sorted.len() - 1)].as_secs_f64() * 1e6
}

pub async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args
        .iter()
        .position(|a| a == "--tokens")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let issuer = match oidc_sim::start(([127, 0, 0, 1], 0).into(), Default::default()).await {
        Ok(i) => i,
        Err(e) => {
            eprintln!("chat-bench jwt: oidc-sim: {e}");
            return ExitCode::FAILURE;
        }
    };
    let config = JwtConfig {
        issuer: issuer.url(),
        audiences: vec!["chat-stream".into()],
        cognito_client_id: None,
        jwks_url: format!("{}/.well-known/jwks.json", issuer.url()),
        user_claim: "sub".into(),
        leeway_secs: 60,
        jwks_ttl: Duration::from_secs(3600),
        jwks_min_refresh: Duration::from_secs(30),
        max_token_bytes: 8192,
    };
    let http = match chat_core::http::build_client(Duration::from_secs(2), false) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("chat-bench jwt: http client: {e}");
            return ExitCode::FAILURE;
        }
    };
    let auth = JwtAuth::new(config, http);
    auth.prefetch().await;
    println!(
        "| algorithm | first verification p50 us | p95 us | cached p50 us | p95 us | tokens |"
    );
    println!("|---|---|---|---|---|---|");
    for alg in ["RS256", "ES256", "EdDSA"] {
        let mut tokens = Vec::with_capacity(n);
        for i in 0..n {
            let mut spec = oidc_sim::MintSpec::user(&format!("bench-user-{i}"));
            spec.alg = Some(alg.into());
            match issuer.mint(&spec) {
                Ok(t) => tokens.push(t),
                Err(e) => {
                    eprintln!("chat-bench jwt: mint {alg}: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
        let mut first = Vec::with_capacity(n);
        for t in &tokens {
            let start = Instant::now();
            let ok = auth.verify(t).await.is_ok();
            first.push(start.elapsed());
            if !ok {
                eprintln!("chat-bench jwt: a valid {alg} token was refused");
                return ExitCode::FAILURE;
            }
        }
        let mut cached = Vec::with_capacity(n);
        for t in &tokens {
            let start = Instant::now();
            let ok = auth.verify(t).await.is_ok();
            cached.push(start.elapsed());
            if !ok {
                return ExitCode::FAILURE;
            }
        }
        first.sort();
        cached.sort();
        println!(
            "| {alg} | {:.1} | {:.1} | {:.2} | {:.2} | {n} |",
            pct(&first, 50.0),
            pct(&first, 95.0),
            pct(&cached, 50.0),
            pct(&cached, 95.0)
        );
    }
    println!(
        "\nJWKS fetches: {} (the one before timing)",
        issuer.jwks_requests()
    );
    ExitCode::SUCCESS
}
