//! `chat-bench limits [--requests 200]`: what fleet-wide limits in the
//! DynamoDB table (no Redis) cost on the request path.
//!
//! Two chat-stream routers in-process on one table (`TABLE_NAME`, moto
//! under `make bench-limits`), one with the counters in the table and one
//! with `LIMITS_TABLE_ENABLED=false` (per-instance counters), each
//! continuing its own conversation (so the history Query runs in the same
//! pre-work), and the same two starting a new conversation each time (no
//! history read: the counters alone), all asked in turn. Reports, per router, the table calls the
//! counters make per request (the rate count and the stream slot on the
//! path, the slot's give-back after the answer), and the pre-work's time
//! (`limits` in Server-Timing: every check in parallel) next to the
//! history read's own (`history`), p50 and p95: where the two are close,
//! the counters' round trip is hidden behind the history read. Times are
//! against moto on loopback, not DynamoDB.

#![allow(clippy::print_stdout)] // a bench prints its table

use std::process::ExitCode;

use serde_json::{Value, json};

use crate::stats::pct;

fn timing(h: &reqwest::header::HeaderMap, name: &str) -> Option<f64> {
    let st = h.get("server-timing")?.to_str().ok()?;
    st.split(',').find_map(|part| {
        let (n, rest) = part.trim().split_once(";dur=")?;
        (n == name).then(|| rest.parse().ok())?
    })
}

struct Router {
    label: &'static str,
    /// Each request continues one conversation (a history read in the
    /// pre-work) or starts a new one (none).
    continues: bool,
    url: String,
    state: chat_core::AppState,
    conversation: Option<String>,
    limits: Vec<f64>,
    history: Vec<f64>,
}

async fn router(
    label: &'static str,
    table: &str,
    sim: &str,
    table_counters: bool,
    continues: bool,
) -> Result<Router, String> {
    let (url, state) = crate::inproc::chat_stream(&[
        ("ANTHROPIC_BASE_URL", sim),
        ("TABLE_NAME", table),
        ("RATE_LIMIT_RPM", "1000000"),
        (
            "LIMITS_TABLE_ENABLED",
            if table_counters { "true" } else { "false" },
        ),
    ])
    .await?;
    Ok(Router {
        label,
        continues,
        url: format!("{url}/chat"),
        state,
        conversation: None,
        limits: Vec::new(),
        history: Vec::new(),
    })
}

async fn ask(client: &reqwest::Client, r: &mut Router, record: bool) -> Result<(), String> {
    let mut body = json!({"message": "how much does a limit cost?", "max_tokens": 16});
    if let Some(c) = r.conversation.as_ref().filter(|_| r.continues) {
        body["conversation_id"] = json!(c);
    }
    let resp = client
        .post(&r.url)
        .header(
            "x-dev-user",
            format!("bench-{}", r.label.replace([' ', ','], "-")),
        )
        .json(&body)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("{}: status {}", r.label, resp.status()));
    }
    let h = resp.headers().clone();
    let text = resp.text().await.map_err(|e| e.to_string())?;
    if r.conversation.is_none() {
        let meta = text
            .lines()
            .find_map(|l| l.strip_prefix("data: "))
            .and_then(|d| serde_json::from_str::<Value>(d).ok());
        r.conversation = meta.and_then(|m| m["conversation_id"].as_str().map(str::to_owned));
    }
    if record {
        r.limits.push(timing(&h, "limits").unwrap_or(f64::NAN));
        r.history.push(timing(&h, "history").unwrap_or(f64::NAN));
    }
    Ok(())
}

pub async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args
        .iter()
        .position(|a| a == "--requests")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let Ok(table) = std::env::var("TABLE_NAME") else {
        eprintln!("chat-bench limits: TABLE_NAME is not set (make bench-limits sets it)");
        return ExitCode::FAILURE;
    };
    let sim = match crate::inproc::sim(1, 5000.0, 5).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("chat-bench limits: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut routers = Vec::new();
    for (label, on, continues) in [
        ("table, history read", true, true),
        ("per-instance, history read", false, true),
        ("table, new conversation", true, false),
        ("per-instance, new conversation", false, false),
    ] {
        match router(label, &table, &sim.url(), on, continues).await {
            Ok(r) => routers.push(r),
            Err(e) => {
                eprintln!("chat-bench limits: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let client = reqwest::Client::new();
    // Warm-up: connections, and each conversation's first turn (stored
    // after the answer, on a task: given time to land before it is
    // continued).
    for round in 0..5 {
        if round == 1 {
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
        for r in routers.iter_mut() {
            if let Err(e) = ask(&client, r, false).await {
                eprintln!("chat-bench limits: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let before: Vec<u64> = routers.iter().map(counter_calls).collect();
    for _ in 0..n {
        for r in routers.iter_mut() {
            if let Err(e) = ask(&client, r, true).await {
                eprintln!("chat-bench limits: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    // The slots' give-backs run on tasks after each answer.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    println!(
        "| counters | requests | table calls by the counters per request | pre-work (`limits`) p50 / p95 ms | history read p50 / p95 ms |"
    );
    println!("| --- | --- | --- | --- | --- |");
    for (r, b) in routers.iter_mut().zip(before) {
        let calls = (counter_calls(r) - b) as f64 / n as f64;
        r.limits.sort_by(f64::total_cmp);
        r.history.sort_by(f64::total_cmp);
        let history = if r.continues {
            format!(
                "{:.3} / {:.3}",
                pct(&r.history, 50.0),
                pct(&r.history, 95.0)
            )
        } else {
            "none".to_owned()
        };
        println!(
            "| {} | {n} | {calls:.2} | {:.3} / {:.3} | {history} |",
            r.label,
            pct(&r.limits, 50.0),
            pct(&r.limits, 95.0),
        );
    }
    ExitCode::SUCCESS
}

fn counter_calls(r: &Router) -> u64 {
    r.state.deps().counters.as_ref().map_or(0, |c| c.calls())
}
