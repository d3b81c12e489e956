//! `chat-bench stop [--runs 20]`: how fast `DELETE /chat/streams/{id}`
//! stops an answer's model call when the request reaches another instance
//! than the one streaming (as in Lambda): two chat-stream routers
//! in-process on one Redis (`REDIS_URL`, and `TABLE_NAME` for the second
//! table) and one model-sim answering slowly; for each run, an answer is
//! started on the first, and after its first deltas the stop goes to the
//! second. Measured from sending the stop to model-sim seeing the model
//! call cancelled (its connection closed), and to the client reading
//! `done`. Then the same without Redis, through the table (moto under
//! `make bench-stop`; its times are moto's).

#![allow(clippy::print_stdout)] // a bench prints its table

use std::process::ExitCode;
use std::time::{Duration, Instant};

use futures_util::StreamExt;

use crate::stats::pct;

async fn router(env: &[(&str, &str)]) -> Result<String, String> {
    let mut all = vec![("RATE_LIMIT_RPM", "0"), ("CACHE_ENABLED", "false")];
    all.extend_from_slice(env);
    Ok(crate::inproc::chat_stream(&all).await?.0)
}

/// One stop: (ms to the model call's cancel, ms to the client's `done`).
async fn once(
    client: &reqwest::Client,
    sim: &model_sim::Sim,
    streaming: &str,
    other: &str,
    user: &str,
) -> Result<(f64, f64), String> {
    let before = sim.cancelled();
    let resp = client
        .post(format!("{streaming}/chat"))
        .header("x-dev-user", user)
        .json(&serde_json::json!({"message": "a long story, please", "max_tokens": 2000}))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let id = resp
        .headers()
        .get("x-stream-id")
        .and_then(|v| v.to_str().ok())
        .ok_or("no x-stream-id")?
        .to_owned();
    let mut body = resp.bytes_stream();
    let mut seen = String::new();
    while seen.matches("event: delta").count() < 2 {
        let b = body
            .next()
            .await
            .ok_or("ended early")?
            .map_err(|e| e.to_string())?;
        seen.push_str(&String::from_utf8_lossy(&b));
    }
    // The answer's record reaches the table off the path; give it time,
    // plus a jitter of up to a table poll interval so the stop lands at
    // every phase of the answer's polling, not always the same one.
    let jitter = u64::from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos()),
    ) % 1000;
    tokio::time::sleep(Duration::from_millis(300 + jitter)).await;
    let t = Instant::now();
    let r = client
        .delete(format!("{other}/chat/streams/{id}"))
        .header("x-dev-user", user)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if r.status().as_u16() != 202 {
        return Err(format!("stop answered {}", r.status()));
    }
    let cancel = async {
        while sim.cancelled() == before {
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        t.elapsed()
    };
    let done = async {
        let mut text = String::new();
        while let Some(Ok(b)) = body.next().await {
            text.push_str(&String::from_utf8_lossy(&b));
            if text.contains("event: done") {
                break;
            }
        }
        (t.elapsed(), text.contains(r#""stop_reason":"stopped""#))
    };
    let (cancel, (done, stopped)) = tokio::time::timeout(Duration::from_secs(10), async {
        tokio::join!(cancel, done)
    })
    .await
    .map_err(|_| "the answer did not stop within 10 s".to_owned())?;
    if !stopped {
        return Err("the answer did not end as stopped".into());
    }
    Ok((cancel.as_secs_f64() * 1e3, done.as_secs_f64() * 1e3))
}

pub async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let runs: usize = args
        .iter()
        .position(|a| a == "--runs")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let (Ok(redis), Ok(table)) = (std::env::var("REDIS_URL"), std::env::var("TABLE_NAME")) else {
        eprintln!(
            "chat-bench stop: REDIS_URL and TABLE_NAME must be set (make bench-stop sets them)"
        );
        return ExitCode::FAILURE;
    };
    let sim = match crate::inproc::sim(5, 50.0, 2000).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("chat-bench stop: {e}");
            return ExitCode::FAILURE;
        }
    };
    let url = sim.url();
    let setups: [(&str, Vec<(&str, &str)>); 2] = [
        (
            "Redis (`STOP_POLL_MS` 100)",
            vec![
                ("ANTHROPIC_BASE_URL", url.as_str()),
                ("REDIS_URL", redis.as_str()),
                ("REDIS_TIMEOUT_MS", "1000"),
            ],
        ),
        (
            "table, no Redis (`STOP_POLL_TABLE_MS` 1000; moto)",
            vec![
                ("ANTHROPIC_BASE_URL", url.as_str()),
                ("TABLE_NAME", table.as_str()),
            ],
        ),
    ];
    let client = reqwest::Client::new();
    println!(
        "| stop through | runs | to the model call's cancel p50 / p95 / max ms | to the client's `done` p50 / p95 ms |"
    );
    println!("| --- | --- | --- | --- |");
    for (label, env) in setups {
        let (streaming, other) = match (router(&env).await, router(&env).await) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(e), _) | (_, Err(e)) => {
                eprintln!("chat-bench stop: {e}");
                return ExitCode::FAILURE;
            }
        };
        let mut cancels = Vec::new();
        let mut dones = Vec::new();
        for i in 0..runs {
            match once(&client, &sim, &streaming, &other, &format!("stopper-{i}")).await {
                Ok((c, d)) => {
                    cancels.push(c);
                    dones.push(d);
                }
                Err(e) => {
                    eprintln!("chat-bench stop: {label}: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
        cancels.sort_by(f64::total_cmp);
        dones.sort_by(f64::total_cmp);
        println!(
            "| {label} | {runs} | {:.1} / {:.1} / {:.1} | {:.1} / {:.1} |",
            pct(&cancels, 50.0),
            pct(&cancels, 95.0),
            cancels[cancels.len() - 1],
            pct(&dones, 50.0),
            pct(&dones, 95.0),
        );
    }
    ExitCode::SUCCESS
}
