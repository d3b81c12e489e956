//! `chat-bench obs [--rounds 10] [--requests 200]`: what the
//! instrumentation (JSON logs with ids, X-Ray subsegments, EMF metrics)
//! costs a request, and what it costs init.
//!
//! Three chat-stream routers in this process, each on a current-thread
//! runtime of its own with its own subscriber (a thread-local default),
//! over one model-sim (no wait to the first token, so our time is most of
//! it): `off` (no subscriber: no logs, spans or metrics at all), `logs`
//! (the log layer; no X-Ray, no metrics lines), `full, unsampled` (logs,
//! the X-Ray layer and EMF lines, requests not sampled), `full` (the same
//! with every request sampled, its documents sent over UDP to a socket
//! here). Logs go to `/dev/null` through the same writer path as
//! stdout. Rounds interleave the three; the table gives time to first
//! token (client side: request sent -> first `delta` read) and time to the
//! body's end, p50/p95, the difference to `off`, and the CPU time of the
//! thread that runs the router and its client, per request.
//!
//! Init: the subscriber, the daemon socket and the metrics settings built
//! (what `obs::init` does at start), timed over 200 builds; and, when
//! `--binary PATH` names a chat-stream build, the `obs_init_ms` that
//! binary logs at start with `AWS_XRAY_DAEMON_ADDRESS` set (20 starts).

#![allow(clippy::print_stdout)] // a bench prints its table

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chat_core::obs::{LogOut, Sink, emf};
use futures_util::StreamExt;

use crate::stats::pct;

struct Args {
    rounds: usize,
    requests: usize,
    think: Duration,
    binary: Option<String>,
}

fn args() -> Result<Args, String> {
    let mut a = Args {
        rounds: 10,
        requests: 200,
        think: Duration::from_millis(2),
        binary: None,
    };
    let mut it = std::env::args().skip(2);
    while let Some(flag) = it.next() {
        let v = it.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--rounds" => a.rounds = v.parse().map_err(|_| "--rounds: a number")?,
            "--requests" => a.requests = v.parse().map_err(|_| "--requests: a number")?,
            "--binary" => a.binary = Some(v),
            "--think-ms" => {
                a.think = Duration::from_millis(v.parse().map_err(|_| "--think-ms: a number")?);
            }
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    Ok(a)
}

struct Variant {
    name: &'static str,
    dispatch: tracing::Dispatch,
    metrics: bool,
    /// The `x-amzn-trace-id` each request carries (sampled), if any.
    traced: bool,
    rt: tokio::runtime::Runtime,
    url: String,
    client: reqwest::Client,
    ttft: Vec<f64>,
    total: Vec<f64>,
    /// CPU time of the thread that runs this router and its client, over
    /// the recorded requests (ns).
    cpu_ns: u64,
}

/// CPU time this thread has run (ns), from `/proc/thread-self/schedstat`.
fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

fn dev_null() -> Result<LogOut, String> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/null")
        .map_err(|e| e.to_string())?;
    Ok(LogOut::Writer(Arc::new(Mutex::new(Box::new(f)))))
}

/// A variant's subscriber: `off` none at all; `logs` the log layer; with
/// `xray`, the X-Ray layer sending to `daemon` too.
fn dispatch(kind: &str, daemon: std::net::SocketAddr) -> Result<tracing::Dispatch, String> {
    let xray = match kind {
        "off" => return Ok(tracing::Dispatch::none()),
        "logs" => None,
        _ => Some((Sink::udp(daemon).map_err(|e| e.to_string())?, "chat-stream")),
    };
    Ok(tracing::Dispatch::new(chat_core::obs::subscriber(
        tracing::Level::INFO,
        dev_null()?,
        xray,
    )))
}

impl Variant {
    fn new(
        name: &'static str,
        dispatch: tracing::Dispatch,
        metrics: bool,
        traced: bool,
        sim_url: &str,
    ) -> Result<Variant, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let env = [
            ("ANTHROPIC_BASE_URL", sim_url),
            ("RATE_LIMIT_RPM", "0"),
            ("MAX_STREAMS_PER_USER", "0"),
            ("CACHE_ENABLED", "false"),
            ("LOG_LEVEL", "info"),
        ];
        let url = tracing::dispatcher::with_default(&dispatch, || {
            rt.block_on(async {
                let (url, _state) = crate::inproc::chat_stream(&env).await?;
                Ok::<_, String>(url)
            })
        })?;
        let client = reqwest::Client::builder()
            .tcp_nodelay(true)
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Variant {
            name,
            dispatch,
            metrics,
            traced,
            rt,
            url,
            client,
            ttft: Vec::new(),
            total: Vec::new(),
            cpu_ns: 0,
        })
    }

    /// `n` requests one after another, `think` apart (so the work a
    /// request does after its body ends is not charged to the next one's
    /// time to first token); `keep`: record their times and CPU.
    fn block(&mut self, n: usize, think: Duration, keep: bool) -> Result<(), String> {
        emf::set_enabled(self.metrics);
        let (client, url, traced) = (self.client.clone(), self.url.clone(), self.traced);
        let cpu0 = thread_cpu_ns();
        let times = tracing::dispatcher::with_default(&self.dispatch, || {
            self.rt.block_on(async move {
                let mut out = Vec::with_capacity(n);
                for _ in 0..n {
                    out.push(once(&client, &url, traced).await?);
                    tokio::time::sleep(think).await;
                }
                Ok::<_, String>(out)
            })
        })?;
        if keep {
            self.cpu_ns += thread_cpu_ns().saturating_sub(cpu0);
            for (t, total) in times {
                self.ttft.push(t);
                self.total.push(total);
            }
        }
        Ok(())
    }
}

/// (ms to the first delta, ms to the end of the body).
async fn once(client: &reqwest::Client, url: &str, traced: bool) -> Result<(f64, f64), String> {
    let mut req = client
        .post(format!("{url}/chat"))
        .header("x-dev-user", "bench-user")
        .json(&serde_json::json!({"message": "instrumentation cost", "max_tokens": 8}));
    if traced {
        let root = chat_core::obs::TraceHeader::new_root();
        req = req.header(
            "x-amzn-trace-id",
            format!("Root={};Parent=53995c3f42cd8ad8;Sampled=1", root.root),
        );
    }
    let t0 = Instant::now();
    let resp = req.send().await.map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("status {}", resp.status()));
    }
    let mut body = resp.bytes_stream();
    let mut seen = String::new();
    let mut ttft = None;
    while let Some(b) = body.next().await {
        let b = b.map_err(|e| e.to_string())?;
        seen.push_str(&String::from_utf8_lossy(&b));
        if ttft.is_none() && seen.contains("event: delta") {
            ttft = Some(t0.elapsed());
        }
    }
    let ttft = ttft.ok_or("no delta")?;
    Ok((ttft.as_secs_f64() * 1e3, t0.elapsed().as_secs_f64() * 1e3))
}

/// The spans, log line, metrics line and X-Ray document of one answer,
/// as the code makes them (same names, fields and nesting), without the
/// answer: (us until `first_token` ends, the path to the first token; us
/// for all of it).
fn span_path(traced: bool) -> (f64, f64) {
    use tracing::field::Empty;
    let t0 = Instant::now();
    let request = tracing::info_span!(target: "chat_core::api", "request",
        request_id = "0123456789abcdef0123456789abcdef", method = "POST", path = "/chat",
        trace_header = Empty, user = Empty, status = Empty);
    if traced {
        let root = chat_core::obs::TraceHeader::new_root();
        request.record(
            "trace_header",
            format!("Root={};Parent=53995c3f42cd8ad8;Sampled=1", root.root).as_str(),
        );
    }
    let on_path;
    {
        let _r = request.enter();
        tracing::info_span!(target: "chat_core::api::admit", "auth").in_scope(|| {});
        request.record("user", chat_core::obs::pseudonym::of("bench-user").as_str());
        tracing::info_span!(target: "chat_core::api::chat", "validate").in_scope(|| {});
        tracing::info_span!(target: "chat_core::chat::plan", "limits").in_scope(|| {});
        tracing::info_span!(target: "chat_core::chat::plan", "cache_lookup").in_scope(|| {});
        tracing::info_span!(target: "chat_core::chat::attempt", "lead").in_scope(|| {});
        tracing::info_span!(target: "chat_core::chat::attempt", "upstream_connect",
            provider = "anthropic", model = "claude-sonnet-4-5", error_code = Empty)
        .in_scope(|| {});
        tracing::info_span!(target: "chat_core::chat::attempt", "first_token").in_scope(|| {});
        on_path = t0.elapsed();
        let stream = tracing::info_span!(target: "chat_core::chat::relay", "stream",
            outcome = Empty, output_tokens = Empty);
        let _s = stream.enter();
        tracing::info!(target: "chat_core::chat::relay",
            request_id = "0123456789abcdef0123456789abcdef", method = "POST", path = "/chat",
            status = 200u16, outcome = "complete", attempts = 1u32, route = "default",
            provider = "anthropic", model = "claude-sonnet-4-5",
            conversation_id = "0123456789abcdef0123456789abcdef",
            turn_id = "0123456789abcdef0123456789abcdef", validate_ms = 0.1, limits_ms = 0.2,
            history_ms = 0.0, upstream_connect_ms = 0.3, ttft_ms = 1.2, upstream_ms = 1.0,
            overhead_ms = 0.2, total_ms = 5.0, input_tokens = 10u32, output_tokens = 8u32,
            answer_chars = 40usize, events = 10u64, "request");
        stream.record("outcome", "complete");
        emf::Metrics::new()
            .dim("model", "claude-sonnet-4-5")
            .dim("outcome", "complete")
            .count("Requests", 1.0)
            .ms("Total", 5.0)
            .count("CacheMiss", 1.0)
            .count("InputTokens", 10.0)
            .count("OutputTokens", 8.0)
            .ms("TimeToFirstToken", 1.2)
            .ms("UpstreamTime", 1.0)
            .ms("Overhead", 0.2)
            .ids()
            .emit();
        tracing::info_span!(target: "chat_core::chat::finish", "persist").in_scope(|| {
            tracing::info_span!(target: "chat_core::persistence::producer", "queue_send")
                .in_scope(chat_core::obs::outgoing_trace_header)
        });
    }
    drop(request);
    (
        on_path.as_secs_f64() * 1e6,
        t0.elapsed().as_secs_f64() * 1e6,
    )
}

/// One build of what `obs::init` makes at start, in microseconds.
fn init_once(daemon: std::net::SocketAddr) -> Result<f64, String> {
    let t = Instant::now();
    let src: std::collections::HashMap<&str, &str> = [
        ("AWS_XRAY_DAEMON_ADDRESS", "127.0.0.1:2000"),
        ("LOG_USER_KEY", "a key for the bench"),
    ]
    .into_iter()
    .collect();
    let cfg = chat_core::obs::ObsConfig::from_source(&src).map_err(|e| e.to_string())?;
    let sink = Sink::udp(daemon).map_err(|e| e.to_string())?;
    let sub = chat_core::obs::subscriber(cfg.level, LogOut::Stdout, Some((sink, "chat-stream")));
    let dispatch = tracing::Dispatch::new(sub);
    let took = t.elapsed().as_secs_f64() * 1e6;
    drop(dispatch);
    Ok(took)
}

/// The `obs_init_ms` a chat-stream binary logs at start (ms). Its
/// `BIND_ADDR` is taken, so it stops after init instead of serving.
async fn binary_init(path: &str, daemon: &str) -> Result<f64, String> {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let addr = taken.local_addr().map_err(|e| e.to_string())?.to_string();
    let out = tokio::process::Command::new(path)
        .env_clear()
        .env("AWS_XRAY_DAEMON_ADDRESS", daemon)
        .env("ANTHROPIC_API_KEY", "k")
        .env("AUTH_MODE", "dev")
        .env("BIND_ADDR", addr)
        .env("LOG_USER_KEY", "a key for the bench")
        .output()
        .await
        .map_err(|e| format!("{path}: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find_map(|v| v["obs_init_ms"].as_f64())
        .ok_or_else(|| format!("{path} logged no obs_init_ms: {text}"))
}

pub async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chat-bench obs: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), String> {
    let a = args()?;
    let sim = crate::inproc::sim(0, 20_000.0, 8).await?;
    let sim_url = sim.url();
    // The daemon's place: a socket that counts what it gets.
    let daemon = std::net::UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let daemon_addr = daemon.local_addr().map_err(|e| e.to_string())?;
    let docs = Arc::new(AtomicU64::new(0));
    let seen = docs.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65_536];
        while daemon.recv(&mut buf).is_ok() {
            seen.fetch_add(1, Ordering::Relaxed);
        }
    });
    emf::configure("ChatRelayBench", "chat-stream", dev_null()?);

    let sim_url2 = sim_url.clone();
    let variants = std::thread::spawn(move || -> Result<Vec<Variant>, String> {
        // (name, metrics lines, requests sampled)
        [
            ("off", false, false),
            ("logs", false, false),
            ("full, unsampled", true, false),
            ("full", true, true),
        ]
        .into_iter()
        .map(|(name, metrics, traced)| {
            Variant::new(
                name,
                dispatch(name, daemon_addr)?,
                metrics,
                traced,
                &sim_url2,
            )
        })
        .collect()
    });
    let mut variants = variants.join().map_err(|_| "variant setup panicked")??;
    let (rounds, requests, think) = (a.rounds, a.requests, a.think);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    // All blocks on one thread, one variant at a time, interleaved.
    let mut variants = std::thread::spawn(move || -> Result<Vec<Variant>, String> {
        for v in variants.iter_mut() {
            v.block(50, think, false)?;
        }
        for _ in 0..rounds {
            for v in variants.iter_mut() {
                v.block(requests, think, true)?;
            }
        }
        Ok(variants)
    })
    .join()
    .map_err(|_| "the run panicked")??;
    tokio::time::sleep(Duration::from_millis(200)).await;

    println!(
        "instrumentation cost: {rounds} interleaved rounds x {requests} requests per variant, {} ms apart, model-sim with no wait to the first token",
        think.as_millis()
    );
    println!("load average before: {}", load.trim());
    println!(
        "| variant | TTFT p50 ms | TTFT p95 ms | body end p50 ms | body end p95 ms | TTFT p50 vs off | body end p50 vs off | CPU per request us (router + client) | vs off |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    let mut base_cpu = 0.0;
    let mut base = (0.0, 0.0);
    for v in variants.iter_mut() {
        v.ttft.sort_by(f64::total_cmp);
        v.total.sort_by(f64::total_cmp);
        let (t50, e50) = (pct(&v.ttft, 50.0), pct(&v.total, 50.0));
        let cpu = v.cpu_ns as f64 / 1e3 / v.ttft.len().max(1) as f64;
        if v.name == "off" {
            base = (t50, e50);
            base_cpu = cpu;
        }
        println!(
            "| {} | {:.3} | {:.3} | {:.3} | {:.3} | {:+.3} | {:+.3} | {:.1} | {:+.1} |",
            v.name,
            t50,
            pct(&v.ttft, 95.0),
            e50,
            pct(&v.total, 95.0),
            t50 - base.0,
            e50 - base.1,
            cpu,
            cpu - base_cpu
        );
    }
    // Runtimes may not be dropped inside this async context.
    let _ = std::thread::spawn(move || drop(variants)).join();
    let sent = docs.load(Ordering::Relaxed);
    let full_requests = (rounds * requests + 50) as u64;
    // (the unsampled variant sends none)
    println!(
        "X-Ray documents the daemon socket received: {sent} of {full_requests} sampled requests"
    );

    // The same work without the network: each variant's subscriber on
    // this thread, interleaved in blocks of 1,000.
    let micro = [
        ("off", dispatch("off", daemon_addr)?, false, false),
        ("logs", dispatch("logs", daemon_addr)?, false, false),
        ("full", dispatch("full", daemon_addr)?, true, true),
    ];
    let mut times: Vec<(Vec<f64>, Vec<f64>)> = vec![(Vec::new(), Vec::new()); micro.len()];
    for round in 0..21 {
        for (i, (_, dispatch, metrics, traced)) in micro.iter().enumerate() {
            emf::set_enabled(*metrics);
            tracing::dispatcher::with_default(dispatch, || {
                for _ in 0..1000 {
                    let (on, all) = span_path(*traced);
                    if round > 0 {
                        times[i].0.push(on);
                        times[i].1.push(all);
                    }
                }
            });
        }
    }
    println!();
    println!(
        "one answer's instrumentation without the network (its spans, log line, metrics line and X-Ray document), 20 interleaved rounds x 1,000:"
    );
    println!("| variant | to first_token p50 us | p99 us | whole answer p50 us | p99 us |");
    println!("| --- | --- | --- | --- | --- |");
    for ((name, ..), (on, all)) in micro.iter().zip(times.iter_mut()) {
        on.sort_by(f64::total_cmp);
        all.sort_by(f64::total_cmp);
        println!(
            "| {name} | {:.1} | {:.1} | {:.1} | {:.1} |",
            pct(on, 50.0),
            pct(on, 99.0),
            pct(all, 50.0),
            pct(all, 99.0)
        );
    }
    println!();

    let mut inits = Vec::new();
    for _ in 0..200 {
        inits.push(init_once(daemon_addr)?);
    }
    inits.sort_by(f64::total_cmp);
    println!(
        "init (settings, daemon socket, subscriber built), 200 builds: p50 {:.1} us, p95 {:.1} us, max {:.1} us",
        pct(&inits, 50.0),
        pct(&inits, 95.0),
        pct(&inits, 100.0)
    );
    if let Some(path) = &a.binary {
        let mut ms = Vec::new();
        for _ in 0..20 {
            ms.push(binary_init(path, &daemon_addr.to_string()).await?);
        }
        ms.sort_by(f64::total_cmp);
        println!(
            "{path}: obs_init_ms as logged at start, 20 starts: p50 {:.3} ms, max {:.3} ms",
            pct(&ms, 50.0),
            pct(&ms, 100.0)
        );
    }
    Ok(())
}
