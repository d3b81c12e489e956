//! chat-bench: time to first token and throughput of an SSE chat endpoint.
//!
//! ```text
//! chat-bench --url http://127.0.0.1:3000/chat --api chat --concurrency 20 --requests 2000
//! chat-bench --url http://127.0.0.1:4010/v1/messages --api anthropic ...
//! ```
//!
//! `--api chat` posts our `/chat` body and waits for the first `delta`
//! event (with `--conversation continue`, each worker keeps one
//! conversation going, so every request after its first loads history); `--api anthropic` posts a Messages API request and waits for the
//! first `content_block_delta`. Each of `--concurrency` workers sends its
//! share of `--requests` one after another over a keep-alive connection,
//! after `--warmup` untimed requests. Prints one Markdown table row (and a
//! JSON line with `--json`).

mod faults;
mod inproc;
mod jwt;
mod limits;
mod obs;
mod stats;
mod stop;
mod streams;
mod writer;

use std::process::ExitCode;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::json;

#[derive(Clone)]
struct Args {
    url: String,
    api: Api,
    concurrency: usize,
    requests: usize,
    warmup: usize,
    label: String,
    json: bool,
    max_tokens: u32,
    /// Each worker continues its own conversation.
    continue_conversation: bool,
    /// Pause between one worker's requests (a user reading the answer).
    think: Duration,
    /// Every request asks the same question at temperature 0 (cache hits
    /// after the first).
    repeat: bool,
    /// `--temperature T`: sent with every (unique) question.
    temperature: Option<f64>,
    /// `--message TEXT`: the question every request asks (with `--repeat`).
    message: Option<String>,
    /// `--bearer TOKEN`: sent as `Authorization: Bearer TOKEN` too (a
    /// LiteLLM proxy's master key).
    bearer: Option<String>,
}

#[derive(Clone, Copy, PartialEq)]
enum Api {
    Chat,
    Anthropic,
    /// `POST /v1/chat/completions`, streamed: the first chunk with text.
    OpenAi,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        url: String::new(),
        api: Api::Chat,
        concurrency: 1,
        requests: 200,
        warmup: 20,
        label: String::new(),
        json: false,
        max_tokens: 32,
        continue_conversation: false,
        think: Duration::ZERO,
        repeat: false,
        temperature: None,
        message: None,
        bearer: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--json" {
            a.json = true;
            continue;
        }
        if flag == "--repeat" {
            a.repeat = true;
            continue;
        }
        let v = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let num = |v: &str| {
            v.parse::<usize>()
                .map_err(|_| format!("{flag}: {v:?} is not a number"))
        };
        match flag.as_str() {
            "--url" => a.url = v,
            "--api" => {
                a.api = match v.as_str() {
                    "chat" => Api::Chat,
                    "anthropic" => Api::Anthropic,
                    "openai" => Api::OpenAi,
                    _ => return Err(format!("--api: {v:?} is not chat, anthropic or openai")),
                }
            }
            "--concurrency" => a.concurrency = num(&v)?.max(1),
            "--requests" => a.requests = num(&v)?.max(1),
            "--warmup" => a.warmup = num(&v)?,
            "--label" => a.label = v,
            "--max-tokens" => a.max_tokens = num(&v)? as u32,
            "--think-ms" => a.think = Duration::from_millis(num(&v)? as u64),
            "--temperature" => {
                a.temperature = Some(
                    v.parse::<f64>()
                        .map_err(|_| format!("--temperature: {v:?} is not a number"))?,
                )
            }
            "--message" => a.message = Some(v),
            "--bearer" => a.bearer = Some(v),
            "--conversation" => {
                a.continue_conversation = match v.as_str() {
                    "new" => false,
                    "continue" => true,
                    _ => return Err(format!("--conversation: {v:?} is not new or continue")),
                }
            }
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    if a.url.is_empty() {
        return Err("--url is required".into());
    }
    if a.label.is_empty() {
        a.label = a.url.clone();
    }
    Ok(a)
}

#[derive(Default)]
struct Sample {
    ttft: Option<Duration>,
    /// When the answer's last event arrived (`done`, `[DONE]`,
    /// `message_stop`): the client has the whole answer. The body may
    /// stay open after it (chat-stream makes the turn durable first).
    done: Option<Duration>,
    total: Option<Duration>,
    /// From the `meta` event (chat API).
    conversation_id: Option<String>,
    /// chat-stream's own time to first token (the `done` event's
    /// `timings_ms.ttft`): no client-side time in it.
    server_ttft: Option<Duration>,
}

/// `"ttft":N` in the `done` event's timings (ms).
fn server_ttft_in(tail: &[u8]) -> Option<Duration> {
    let key = b"\"ttft\":";
    let p = tail.windows(key.len()).rposition(|w| w == key)? + key.len();
    let end = tail[p..]
        .iter()
        .position(|b| !(b.is_ascii_digit() || *b == b'.'))?;
    let ms: f64 = std::str::from_utf8(&tail[p..p + end]).ok()?.parse().ok()?;
    Some(Duration::from_secs_f64(ms / 1e3))
}

fn conversation_id_in(buf: &[u8]) -> Option<String> {
    let key = b"\"conversation_id\":\"";
    let p = buf.windows(key.len()).position(|w| w == key)? + key.len();
    let end = buf[p..].iter().position(|b| *b == b'"')?;
    String::from_utf8(buf[p..p + end].to_vec()).ok()
}

async fn one(
    client: &reqwest::Client,
    a: &Args,
    i: usize,
    conversation: Option<&str>,
) -> Result<Sample, String> {
    let message = if a.repeat {
        a.message
            .clone()
            .unwrap_or_else(|| "benchmark repeated question".to_owned())
    } else {
        // Unique across runs too (the process id and its start): a later
        // run against the same cache must not find an earlier run's
        // answers.
        format!("benchmark question number {i} of run {}", run_tag())
    };
    let (body, marker): (serde_json::Value, &[u8]) = match a.api {
        Api::Chat => {
            let mut body = json!({"message": message, "max_tokens": a.max_tokens});
            if let Some(c) = conversation {
                body["conversation_id"] = json!(c);
            }
            if a.repeat {
                body["temperature"] = json!(0);
            }
            if let Some(t) = a.temperature {
                body["temperature"] = json!(t);
            }
            (body, b"event: delta\n")
        }
        Api::Anthropic => (
            json!({"model": "claude-sonnet-4-5", "max_tokens": a.max_tokens, "stream": true,
                   "messages": [{"role": "user", "content": message}]}),
            b"event: content_block_delta\n",
        ),
        Api::OpenAi => {
            let mut body = json!({"model": "claude-sonnet-4-5", "max_tokens": a.max_tokens,
                                  "stream": true, "messages": [{"role": "user", "content": message}]});
            if a.repeat {
                body["temperature"] = json!(0);
            }
            if let Some(t) = a.temperature {
                body["temperature"] = json!(t);
            }
            // Content that is not the empty one of a role-only chunk (a
            // first chunk may carry the role and text together).
            (body, b"\"content\":\"")
        }
    };
    let start = Instant::now();
    let mut req = client
        .post(&a.url)
        .header("x-api-key", "bench")
        .header("anthropic-version", "2023-06-01");
    if let Some(t) = &a.bearer {
        req = req.bearer_auth(t);
    }
    let resp = req.json(&body).send().await.map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("HTTP {}", resp.status()));
    }
    let mut s = resp.bytes_stream();
    let mut buf: Vec<u8> = Vec::new();
    let mut sample = Sample::default();
    let mut tail: Vec<u8> = Vec::new();
    let end_marker: &[u8] = match a.api {
        Api::Chat => b"event: done\n",
        Api::Anthropic => b"event: message_stop\n",
        Api::OpenAi => b"data: [DONE]",
    };
    // The bytes of the stream's end seen so far (a marker may be split
    // across reads).
    let mut last: Vec<u8> = Vec::new();
    while let Some(chunk) = s.next().await {
        let chunk = chunk.map_err(|e| e.to_string())?;
        if sample.done.is_none() {
            last.extend_from_slice(&chunk);
            if last.windows(end_marker.len()).any(|w| w == end_marker) {
                sample.done = Some(start.elapsed());
            } else if last.len() > 256 {
                last.drain(..last.len() - 64);
            }
        }
        if a.api == Api::Chat {
            // Keep the last few KB: the `done` event is at the end.
            tail.extend_from_slice(&chunk);
            if tail.len() > 8192 {
                tail.drain(..tail.len() - 4096);
            }
        }
        if sample.ttft.is_none() {
            buf.extend_from_slice(&chunk);
            // The first delta counts once its whole event has arrived.
            if let Some(p) = first_delta(&buf, marker, a.api) {
                if buf[p..].windows(2).any(|w| w == b"\n\n") {
                    sample.ttft = Some(start.elapsed());
                    sample.conversation_id = conversation_id_in(&buf);
                }
            }
        }
    }
    sample.total = Some(start.elapsed());
    sample.done.get_or_insert(start.elapsed());
    sample.server_ttft = server_ttft_in(&tail);
    if sample.ttft.is_none() {
        return Err("stream ended without a delta".into());
    }
    Ok(sample)
}

/// This process's id and start time, once.
fn run_tag() -> &'static str {
    static TAG: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TAG.get_or_init(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        format!("{}-{t}", std::process::id())
    })
}

/// Where the first delta with text starts in `buf`.
fn first_delta(buf: &[u8], marker: &[u8], api: Api) -> Option<usize> {
    let mut from = 0;
    while let Some(p) = buf[from..].windows(marker.len()).position(|w| w == marker) {
        let at = from + p;
        // OpenAI's first chunk carries the role and an empty content.
        if api != Api::OpenAi || buf.get(at + marker.len()).is_some_and(|b| *b != b'"') {
            return Some(at);
        }
        from = at + marker.len();
    }
    None
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[idx.min(sorted.len() - 1)].as_secs_f64() * 1e3
}

async fn faults_main() -> ExitCode {
    let mut fa = faults::FaultArgs {
        chat: String::new(),
        dead_chat: None,
        fallback_chat: None,
    };
    let mut it = std::env::args().skip(2);
    while let Some(flag) = it.next() {
        let Some(v) = it.next() else {
            eprintln!("chat-bench faults: {flag} needs a value");
            return ExitCode::from(2);
        };
        match flag.as_str() {
            "--chat" => fa.chat = v,
            "--dead-chat" => fa.dead_chat = Some(v),
            "--fallback-chat" => fa.fallback_chat = Some(v),
            _ => {
                eprintln!("chat-bench faults: unknown flag {flag}");
                return ExitCode::from(2);
            }
        }
    }
    match faults::run(fa).await {
        Ok(rows) => {
            #[allow(clippy::print_stdout)]
            for r in rows {
                println!("{r}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("chat-bench faults: {e}");
            ExitCode::FAILURE
        }
    }
}

/// What `-h`/`--help` prints: the modes and the main mode's flags.
const USAGE: &str = "\
usage: chat-bench --url URL [--api chat|anthropic|openai] [--concurrency N] [--requests N]
                  [--warmup N] [--label TEXT] [--json] [--max-tokens N] [--think-ms MS]
                  [--repeat] [--temperature T] [--message TEXT] [--bearer TOKEN]
                  [--conversation new|continue]
       chat-bench faults|writer|stop|limits|obs|streams|jwt ...  (see each mode's module docs)
";

#[tokio::main]
async fn main() -> ExitCode {
    if matches!(std::env::args().nth(1).as_deref(), Some("-h" | "--help")) {
        // Asked for: the usage is this call's output.
        #[allow(clippy::print_stdout)]
        {
            print!("{USAGE}");
        }
        return ExitCode::SUCCESS;
    }
    if std::env::args().nth(1).as_deref() == Some("faults") {
        return faults_main().await;
    }
    if std::env::args().nth(1).as_deref() == Some("writer") {
        return writer::main().await;
    }
    if std::env::args().nth(1).as_deref() == Some("stop") {
        return stop::main().await;
    }
    if std::env::args().nth(1).as_deref() == Some("limits") {
        return limits::main().await;
    }
    if std::env::args().nth(1).as_deref() == Some("obs") {
        return obs::main().await;
    }
    if std::env::args().nth(1).as_deref() == Some("streams") {
        return streams::main().await;
    }
    if std::env::args().nth(1).as_deref() == Some("jwt") {
        return jwt::main().await;
    }
    let a = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("chat-bench: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let client = match reqwest::Client::builder()
        .pool_max_idle_per_host(a.concurrency * 2)
        .tcp_nodelay(true)
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("chat-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Warm-up: open the connections, fill caches, page in code.
    let warm: Vec<_> = (0..a.concurrency)
        .map(|w| {
            let (client, a) = (client.clone(), a.clone());
            tokio::spawn(async move {
                let mut conv: Option<String> = None;
                for i in 0..a.warmup.div_ceil(a.concurrency) {
                    if let Ok(s) =
                        one(&client, &a, 1_000_000 + w * 10_000 + i, conv.as_deref()).await
                    {
                        if a.continue_conversation && conv.is_none() {
                            conv = s.conversation_id;
                        }
                    }
                }
                conv
            })
        })
        .collect();
    let mut convs = Vec::with_capacity(a.concurrency);
    for w in warm {
        convs.push(w.await.ok().flatten());
    }

    let started = Instant::now();
    let per_worker = a.requests.div_ceil(a.concurrency);
    let workers: Vec<_> = (0..a.concurrency)
        .zip(convs)
        .map(|(w, mut conv)| {
            let (client, a) = (client.clone(), a.clone());
            tokio::spawn(async move {
                let mut out = Vec::with_capacity(per_worker);
                for i in 0..per_worker {
                    if i > 0 && !a.think.is_zero() {
                        tokio::time::sleep(a.think).await;
                    }
                    let r = one(&client, &a, w * per_worker + i, conv.as_deref()).await;
                    if let Ok(s) = &r {
                        if a.continue_conversation && conv.is_none() {
                            conv = s.conversation_id.clone();
                        }
                    }
                    out.push(r);
                }
                out
            })
        })
        .collect();
    let mut ttft = Vec::new();
    let mut total = Vec::new();
    let mut done = Vec::new();
    let mut server_ttft = Vec::new();
    let mut errors = 0usize;
    let mut first_error = None;
    for w in workers {
        match w.await {
            Ok(results) => {
                for r in results {
                    match r {
                        Ok(s) => {
                            ttft.extend(s.ttft);
                            total.extend(s.total);
                            done.extend(s.done);
                            server_ttft.extend(s.server_ttft);
                        }
                        Err(e) => {
                            errors += 1;
                            first_error.get_or_insert(e);
                        }
                    }
                }
            }
            Err(e) => {
                errors += per_worker;
                first_error.get_or_insert(e.to_string());
            }
        }
    }
    let elapsed = started.elapsed();
    ttft.sort();
    total.sort();
    done.sort();
    server_ttft.sort();
    let ok = ttft.len();
    let rps = ok as f64 / elapsed.as_secs_f64();
    if a.json {
        let line = json!({
            "label": a.label, "concurrency": a.concurrency, "requests": ok + errors, "ok": ok, "errors": errors,
            "ttft_ms": {"p50": pct(&ttft, 50.0), "p95": pct(&ttft, 95.0), "p99": pct(&ttft, 99.0)},
            "total_ms": {"p50": pct(&total, 50.0), "p95": pct(&total, 95.0), "p99": pct(&total, 99.0)},
            "done_ms": {"p50": pct(&done, 50.0), "p95": pct(&done, 95.0), "p99": pct(&done, 99.0)},
            "server_ttft_ms": {"p50": pct(&server_ttft, 50.0), "p95": pct(&server_ttft, 95.0)},
            "rps": rps,
        });
        eprintln!("{line}");
    }
    let row = format!(
        "| {} | {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.0} | {} |",
        a.label,
        a.concurrency,
        ok + errors,
        pct(&ttft, 50.0),
        pct(&ttft, 95.0),
        pct(&ttft, 99.0),
        pct(&total, 50.0),
        rps,
        errors
    );
    // The table row is this tool's output; stdout is where it belongs.
    #[allow(clippy::print_stdout)]
    {
        println!("{row}");
    }
    if let Some(e) = first_error {
        eprintln!("chat-bench: {errors} errors; first: {e}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
