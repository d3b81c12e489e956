//! `chat-bench faults`: drives each model fault through a running
//! chat-stream (against model-sim) and prints what the client saw: the
//! outcome, how many upstream attempts it took, how long until the outcome,
//! and whether any text was duplicated.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};

pub struct FaultArgs {
    /// chat-stream in front of model-sim.
    pub chat: String,
    /// chat-stream whose model API refuses connections.
    pub dead_chat: Option<String>,
    /// chat-stream in front of model-sim with a fallback model configured.
    pub fallback_chat: Option<String>,
}

struct Seen {
    outcome: String,
    attempts: String,
    text: String,
    elapsed: Duration,
}

async fn run_one(client: &reqwest::Client, url: &str, model: &str) -> Result<Seen, String> {
    let t = Instant::now();
    let resp = client
        .post(format!("{url}/chat"))
        .json(&json!({"message": "fault matrix question", "model": model, "max_tokens": 64}))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let attempts = resp
        .headers()
        .get("x-upstream-attempts")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("?")
        .to_owned();
    if status != 200 {
        let body: Value = resp.json().await.map_err(|e| e.to_string())?;
        return Ok(Seen {
            outcome: format!("{status} `{}`", body["code"].as_str().unwrap_or("?")),
            attempts,
            text: String::new(),
            elapsed: t.elapsed(),
        });
    }
    let mut s = resp.bytes_stream();
    let mut buf = String::new();
    let mut text = String::new();
    let mut outcome = "stream ended without done".to_owned();
    'read: while let Some(chunk) = s.next().await {
        let chunk = chunk.map_err(|e| e.to_string())?;
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            let event = block
                .lines()
                .find_map(|l| l.strip_prefix("event: "))
                .unwrap_or("");
            let data: Value = block
                .lines()
                .find_map(|l| l.strip_prefix("data: "))
                .and_then(|d| serde_json::from_str(d).ok())
                .unwrap_or(Value::Null);
            match event {
                "delta" => text.push_str(data["text"].as_str().unwrap_or("")),
                "done" => {
                    outcome = "200, `done`".to_owned();
                    break 'read;
                }
                "error" => {
                    outcome = format!(
                        "200, then `error` event `{}`",
                        data["code"].as_str().unwrap_or("?")
                    );
                    break 'read;
                }
                _ => {}
            }
        }
    }
    Ok(Seen {
        outcome,
        attempts,
        text,
        elapsed: t.elapsed(),
    })
}

pub async fn run(a: FaultArgs) -> Result<Vec<String>, String> {
    let client = reqwest::Client::new();
    // The clean answer every partial one must be a prefix of.
    let clean = run_one(&client, &a.chat, "fm").await?;
    if clean.outcome != "200, `done`" {
        return Err(format!("baseline request failed: {}", clean.outcome));
    }
    let cases: Vec<(&str, &str, String)> = vec![
        ("none", "fm", a.chat.clone()),
        (
            "429, retry-after 1 s, once",
            "fm+fault=status:429:1,times=1",
            a.chat.clone(),
        ),
        (
            "429, retry-after 1 s, every time",
            "fm+fault=status:429:1",
            a.chat.clone(),
        ),
        ("500, once", "fm+fault=status:500,times=1", a.chat.clone()),
        ("500, every time", "fm+fault=status:500", a.chat.clone()),
        (
            "529 overloaded, every time",
            "fm+fault=status:529",
            a.chat.clone(),
        ),
        (
            "`error` event before the first token",
            "fm+fault=error-mid@0",
            a.chat.clone(),
        ),
        (
            "stall before the first token (10 s)",
            "fm+fault=stall-first:10000",
            a.chat.clone(),
        ),
        (
            "no response headers (10 s)",
            "fm+fault=stall-headers:10000",
            a.chat.clone(),
        ),
        (
            "slow first token (ttft 3 s)",
            "fm+ttft=3000",
            a.chat.clone(),
        ),
        (
            "stall mid-stream (10 s after 5 tokens)",
            "fm+fault=stall-mid:10000@5",
            a.chat.clone(),
        ),
        (
            "connection dropped after 5 tokens",
            "fm+fault=drop-mid@5",
            a.chat.clone(),
        ),
        (
            "`error` event after 5 tokens",
            "fm+fault=error-mid@5",
            a.chat.clone(),
        ),
    ];
    let mut cases = cases;
    if let Some(dead) = &a.dead_chat {
        cases.push(("connection refused", "fm", dead.clone()));
    }
    // The fallback instance answers with model `fm-backup`: its clean text
    // is that model's answer.
    let fallback_clean = match &a.fallback_chat {
        Some(fb) => {
            cases.push((
                "529 every time, fallback configured",
                "fm+fault=status:529",
                fb.clone(),
            ));
            Some(run_one(&client, fb, "fm-backup").await?.text)
        }
        None => None,
    };
    let mut rows = vec![
        "| fault | client saw | upstream attempts | time to outcome | text duplicated? |"
            .to_owned(),
        "|---|---|---|---|---|".to_owned(),
    ];
    for (name, model, url) in cases {
        let seen = run_one(&client, &url, model).await?;
        let expected = if Some(&url) == a.fallback_chat.as_ref() {
            fallback_clean.as_deref().unwrap_or("")
        } else {
            clean.text.as_str()
        };
        // What arrived must be the start of one clean answer, each token once.
        let dup = if seen.text.is_empty() {
            "no (no text sent)"
        } else if expected.starts_with(&seen.text) {
            "no"
        } else {
            "**YES**"
        };
        rows.push(format!(
            "| {name} | {} | {} | {:.2} s | {dup} |",
            seen.outcome,
            seen.attempts,
            seen.elapsed.as_secs_f64()
        ));
    }
    Ok(rows)
}
