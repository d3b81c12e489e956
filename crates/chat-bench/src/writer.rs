//! `chat-bench writer`: db-writer's throughput and its DynamoDB calls per
//! 1000 turns.
//!
//! ```text
//! chat-bench writer --table T --queue-url URL [--turns 1000] [--conversations 100]
//!                   [--users 10] [--batch-size 100] [--window-ms 2000] [--answer-bytes 600]
//! ```
//!
//! Fills the queue with `--turns` turn messages (not timed), then drains it
//! the way the event source mapping would, through the local poller and
//! db-writer's own handler (`chat_core::persistence::writer::poll_once`), and times
//! that. Afterwards it checks that every turn was stored exactly once (the
//! conversations' message counts add up). Prints one Markdown table row.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use aws_sdk_sqs::types::SendMessageBatchRequestEntry;
use chat_core::persistence::turn::{TURN_SCHEMA_VERSION, TurnRecord, TurnStatus};
use chat_core::persistence::writer::{PollerConfig, poll_once};
use chat_core::util::now_ms;

struct Args {
    table: String,
    queue_url: String,
    turns: usize,
    conversations: usize,
    users: usize,
    batch_size: usize,
    window_ms: usize,
    answer_bytes: usize,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        table: String::new(),
        queue_url: String::new(),
        turns: 1000,
        conversations: 100,
        users: 10,
        batch_size: 100,
        window_ms: 2000,
        answer_bytes: 600,
    };
    let mut it = std::env::args().skip(2);
    while let Some(flag) = it.next() {
        let v = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let num = || {
            v.parse::<usize>()
                .map_err(|_| format!("{flag}: {v:?} is not a number"))
        };
        match flag.as_str() {
            "--table" => a.table = v.clone(),
            "--queue-url" => a.queue_url = v.clone(),
            "--turns" => a.turns = num()?.max(1),
            "--conversations" => a.conversations = num()?.max(1),
            "--users" => a.users = num()?.max(1),
            "--batch-size" => a.batch_size = num()?.clamp(1, 10_000),
            "--answer-bytes" => a.answer_bytes = num()?,
            "--window-ms" => a.window_ms = num()?,
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    if a.table.is_empty() || a.queue_url.is_empty() {
        return Err("--table and --queue-url are required".into());
    }
    Ok(a)
}

fn turns(a: &Args, run: &str) -> Vec<TurnRecord> {
    let t0 = now_ms();
    (0..a.turns)
        .map(|i| {
            let conv = i % a.conversations;
            let answer = "x".repeat(a.answer_bytes);
            TurnRecord {
                v: TURN_SCHEMA_VERSION,
                turn_id: format!("{run}-t{i}"),
                conversation_id: format!("{run}-c{conv}"),
                // A conversation always belongs to the same user.
                user_id: format!("{run}-u{}", conv % a.users),
                started_at_ms: t0 + i as u64,
                completed_at_ms: t0 + i as u64 + 900,
                status: TurnStatus::Completed,
                status_raw: None,
                model: "claude-sim".into(),
                user_message: format!("benchmark question {i}"),
                answer_bytes: answer.len() as u64,
                answer: Some(answer),
                answer_parts: None,
                stop_reason: Some("end_turn".into()),
                input_tokens: 20,
                output_tokens: 150,
                error_code: None,
            }
        })
        .collect()
}

async fn fill(sqs: &aws_sdk_sqs::Client, url: &str, recs: &[TurnRecord]) -> Result<(), String> {
    let chunks: Vec<_> = recs.chunks(10).collect();
    for group in chunks.chunks(8) {
        let sends = group.iter().map(|chunk| {
            let entries: Vec<_> = chunk
                .iter()
                .enumerate()
                .filter_map(|(i, r)| {
                    SendMessageBatchRequestEntry::builder()
                        .id(format!("m{i}"))
                        .message_body(r.encode())
                        .build()
                        .ok()
                })
                .collect();
            sqs.send_message_batch()
                .queue_url(url)
                .set_entries(Some(entries))
                .send()
        });
        for r in futures_util::future::join_all(sends).await {
            let out = r.map_err(|e| format!("{}", aws_sdk_sqs::error::DisplayErrorContext(&e)))?;
            if !out.failed().is_empty() {
                return Err(format!("{} messages not sent", out.failed().len()));
            }
        }
    }
    Ok(())
}

pub async fn main() -> ExitCode {
    let a = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("chat-bench writer: {e}");
            return ExitCode::from(2);
        }
    };
    let run = format!("b{}", now_ms());
    let recs = turns(&a, &run);
    let sdk = chat_core::aws_sdk_config(Duration::from_secs(20), Duration::from_secs(60)).await;
    let sqs = aws_sdk_sqs::Client::new(&sdk);
    // Generous timeouts: moto copies the whole table for every action of a
    // transaction, so a 100-action transaction can take seconds there, and
    // a client-side timeout would make the SDK retry while the first
    // attempt still runs (moto neither honours ClientRequestToken nor
    // isolates concurrent transactions; DynamoDB does both).
    let store = chat_core::store_with_timeouts(
        &a.table,
        None,
        Duration::from_secs(300),
        Duration::from_secs(600),
    )
    .await;
    if let Err(e) = fill(&sqs, &a.queue_url, &recs).await {
        eprintln!("chat-bench writer: filling the queue: {e}");
        return ExitCode::FAILURE;
    }

    let cfg = PollerConfig {
        queue_url: a.queue_url.clone(),
        batch_size: a.batch_size,
        batching_window: Duration::from_millis(a.window_ms as u64),
        wait: Duration::from_secs(0),
    };
    let calls_before = store.calls();
    let started = Instant::now();
    let (mut batches, mut done, mut failed) = (0usize, 0usize, 0usize);
    while done < a.turns {
        match poll_once(&store, &sqs, &cfg).await {
            Ok(Some(r)) => {
                batches += 1;
                done += r.written + r.duplicates;
                failed += r.failed + r.poison;
            }
            Ok(None) if started.elapsed() > Duration::from_secs(300) => break,
            Ok(None) => {}
            Err(e) => {
                eprintln!("chat-bench writer: poll: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let calls = store.calls() - calls_before;

    // Every turn exactly once: the message counts add up to two per turn.
    let mut messages = 0u64;
    for c in 0..a.conversations.min(a.turns) {
        match store.get_conversation(&format!("{run}-c{c}")).await {
            Ok(Some(m)) => messages += m.message_count,
            Ok(None) => {}
            Err(e) => {
                eprintln!("chat-bench writer: check: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let exact = messages == 2 * a.turns as u64;
    #[allow(clippy::print_stdout)]
    {
        println!(
            "| {} | {} | {} | {:.2} | {:.0} | {} | {:.1} | {} |",
            a.batch_size,
            a.turns,
            batches,
            secs,
            done as f64 / secs,
            calls,
            calls as f64 * 1000.0 / a.turns as f64,
            if exact { "yes" } else { "NO" },
        );
    }
    if !exact || failed > 0 || done < a.turns {
        eprintln!(
            "chat-bench writer: {done} of {} turns written, {failed} failed, {messages} messages stored",
            a.turns
        );
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
