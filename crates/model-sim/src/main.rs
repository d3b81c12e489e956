//! model-sim as a process, for local runs and benchmarks.
//!
//! Flags (or the env vars in brackets): --addr [SIM_ADDR, 127.0.0.1:4010],
//! --ttft-ms [SIM_TTFT_MS, 300], --tps [SIM_TPS, 60], --tokens
//! [SIM_TOKENS, 80], --fault [SIM_FAULT], --api-key [SIM_API_KEY].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::ExitCode;

use model_sim::{Knobs, SimConfig, SimState, serve};

fn settings() -> Result<(SocketAddr, SimConfig), String> {
    let mut flags: HashMap<String, String> = HashMap::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let f = a
            .strip_prefix("--")
            .ok_or_else(|| format!("unexpected argument {a:?}"))?;
        let (k, v) = match f.split_once('=') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None => (
                f.to_owned(),
                args.next().ok_or_else(|| format!("--{f} needs a value"))?,
            ),
        };
        flags.insert(k, v);
    }
    let get = |flag: &str, env: &str| flags.get(flag).cloned().or_else(|| std::env::var(env).ok());
    let addr = get("addr", "SIM_ADDR").unwrap_or_else(|| "127.0.0.1:4010".into());
    let addr: SocketAddr = addr
        .parse()
        .map_err(|_| format!("--addr/SIM_ADDR: {addr:?} is not host:port"))?;
    let mut knobs = Knobs::default();
    for (flag, env, knob) in [
        ("ttft-ms", "SIM_TTFT_MS", "ttft"),
        ("tps", "SIM_TPS", "tps"),
        ("tokens", "SIM_TOKENS", "tokens"),
        ("fault", "SIM_FAULT", "fault"),
    ] {
        if let Some(v) = get(flag, env) {
            knobs
                .set(knob, &v)
                .map_err(|e| format!("--{flag}/{env}: {e}"))?;
        }
    }
    for k in flags.keys() {
        if !["addr", "ttft-ms", "tps", "tokens", "fault", "api-key"].contains(&k.as_str()) {
            return Err(format!("unknown flag --{k}"));
        }
    }
    let api_key = get("api-key", "SIM_API_KEY").filter(|k| !k.is_empty());
    Ok((addr, SimConfig { knobs, api_key }))
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt().with_target(false).init();
    let (addr, config) = match settings() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("model-sim: {e}");
            return ExitCode::from(2);
        }
    };
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("model-sim: cannot listen on {addr}: {e}");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(addr = %addr, knobs = ?config.knobs, "model-sim listening on http://{addr}");
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    match serve(listener, SimState::new(config), shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("model-sim: {e}");
            ExitCode::FAILURE
        }
    }
}
