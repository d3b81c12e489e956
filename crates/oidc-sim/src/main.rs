//! oidc-sim: the local OpenID Connect issuer (see the library docs).
//! `oidc-sim [--addr 127.0.0.1:4400] [--audience chat-stream]
//! [--token-ttl-secs 3600]`; `OIDC_ADDR`, `OIDC_AUDIENCE`,
//! `OIDC_TOKEN_TTL_SECS` likewise.

use std::time::Duration;

fn arg(flag: &str, env: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1).cloned())
        .or_else(|| std::env::var(env).ok())
        .unwrap_or_else(|| default.to_owned())
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt().with_target(false).init();
    let addr = arg("--addr", "OIDC_ADDR", "127.0.0.1:4400");
    let Ok(addr) = addr.parse() else {
        eprintln!("oidc-sim: --addr {addr:?} is not HOST:PORT");
        std::process::exit(2);
    };
    let ttl = arg("--token-ttl-secs", "OIDC_TOKEN_TTL_SECS", "3600");
    let Ok(ttl) = ttl.parse::<u64>() else {
        eprintln!("oidc-sim: --token-ttl-secs {ttl:?} is not a number");
        std::process::exit(2);
    };
    let config = oidc_sim::IssuerConfig {
        audience: arg("--audience", "OIDC_AUDIENCE", "chat-stream"),
        token_ttl: Duration::from_secs(ttl),
        ..Default::default()
    };
    match oidc_sim::start(addr, config).await {
        Ok(running) => {
            tracing::info!(issuer = %running.url(), "oidc-sim listening (any user name signs in)");
            let _ = tokio::signal::ctrl_c().await;
        }
        Err(e) => {
            eprintln!("oidc-sim: {e}");
            std::process::exit(1);
        }
    }
}
