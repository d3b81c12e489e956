//! `chat-bench streams`: many slow answers at once through one server,
//! and what they cost it: peak RSS, CPU per stream, errors, and RSS some
//! seconds after the last one ended (read from `/proc/PID`).
//!
//! ```text
//! chat-bench streams --url http://127.0.0.1:3000/chat --pid 1234 --streams 1000 [--ramp-ms 1000] [--settle-ms 3000] [--h2-per-conn 0]
//! ```
//!
//! By default each stream is its own HTTP/1.1 connection, as browsers
//! reach a server directly. `--h2-per-conn N` (N > 0) speaks HTTP/2 with
//! prior knowledge (h2c) and puts N streams on each connection, as a proxy
//! in front of the server multiplexes its clients (N at most 200: hyper's
//! default stream limit per connection, which axum::serve keeps).
//!
//! Every stream asks its own question (no cache hit, no coalescing) and
//! is read to its end; a stream counts as good when it ended with `done`
//! after at least one `delta`. The streams start spread over `--ramp-ms`
//! (all of them are open together once the model is slower than that).
//! The caller raises the open-files limit (each stream is a client
//! socket, a server socket and an upstream socket).

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::json;

struct Args {
    url: String,
    pid: u32,
    streams: usize,
    ramp: Duration,
    settle: Duration,
    clk_tck: u64,
    label: String,
    h2_per_conn: usize,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        url: String::new(),
        pid: 0,
        streams: 1000,
        ramp: Duration::from_millis(1000),
        settle: Duration::from_millis(3000),
        clk_tck: 100,
        label: "streams".into(),
        h2_per_conn: 0,
    };
    let mut it = std::env::args().skip(2);
    while let Some(flag) = it.next() {
        let v = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let num = |v: &str| {
            v.parse::<u64>()
                .map_err(|_| format!("{flag}: {v:?} is not a number"))
        };
        match flag.as_str() {
            "--url" => a.url = v,
            "--pid" => a.pid = num(&v)? as u32,
            "--streams" => a.streams = num(&v)?.max(1) as usize,
            "--ramp-ms" => a.ramp = Duration::from_millis(num(&v)?),
            "--settle-ms" => a.settle = Duration::from_millis(num(&v)?),
            "--clk-tck" => a.clk_tck = num(&v)?.max(1),
            "--label" => a.label = v,
            "--h2-per-conn" => a.h2_per_conn = num(&v)? as usize,
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    if a.url.is_empty() || a.pid == 0 {
        return Err("--url and --pid are required".into());
    }
    Ok(a)
}

/// Resident set size of `pid` in KiB (`VmRSS`).
fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// User + system CPU time of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 here.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

async fn one(
    client: &reqwest::Client,
    url: &str,
    i: usize,
    open: &AtomicUsize,
) -> Result<(), String> {
    let body = json!({"message": format!("slow stream question {i} {}", std::process::id()), "max_tokens": 64});
    let resp = client
        .post(url)
        .header("x-api-key", "bench")
        .json(&body)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("HTTP {}", resp.status()));
    }
    open.fetch_add(1, Ordering::Relaxed);
    let mut s = resp.bytes_stream();
    // The last bytes of the previous read and this one: a marker may be
    // split across reads.
    let mut window: Vec<u8> = Vec::new();
    let (mut delta, mut done) = (false, false);
    let r = async {
        while let Some(chunk) = s.next().await {
            let chunk = chunk.map_err(|e| e.to_string())?;
            window.extend_from_slice(&chunk);
            delta |= window.windows(13).any(|w| w == b"event: delta\n");
            done |= window.windows(12).any(|w| w == b"event: done\n");
            let keep = window.len().saturating_sub(16);
            window.drain(..keep);
        }
        Ok::<_, String>(())
    }
    .await;
    open.fetch_sub(1, Ordering::Relaxed);
    r?;
    if !delta {
        return Err("no delta".into());
    }
    if !done {
        return Err("ended without done".into());
    }
    Ok(())
}

pub async fn main() -> ExitCode {
    let a = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("chat-bench streams: {e}");
            return ExitCode::from(2);
        }
    };
    // One client per HTTP/2 connection (a reqwest client keeps one per
    // host); one client with a connection per stream for HTTP/1.1.
    let conns = match a.h2_per_conn {
        0 => 1,
        n => a.streams.div_ceil(n),
    };
    let mut clients = Vec::with_capacity(conns);
    for _ in 0..conns {
        let b = reqwest::Client::builder()
            .pool_max_idle_per_host(a.streams)
            .tcp_nodelay(true);
        let b = if a.h2_per_conn > 0 {
            b.http2_prior_knowledge()
        } else {
            b
        };
        match b.build() {
            Ok(c) => clients.push(c),
            Err(e) => {
                eprintln!("chat-bench streams: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let (Some(base_rss), Some(cpu0)) = (rss_kib(a.pid), cpu_ticks(a.pid)) else {
        eprintln!("chat-bench streams: cannot read /proc/{}", a.pid);
        return ExitCode::FAILURE;
    };
    let open = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicU64::new(base_rss));
    let peak_open = Arc::new(AtomicUsize::new(0));
    let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let (open, peak, peak_open, sampling, pid) = (
            open.clone(),
            peak.clone(),
            peak_open.clone(),
            sampling.clone(),
            a.pid,
        );
        tokio::spawn(async move {
            while sampling.load(Ordering::Relaxed) {
                if let Some(r) = rss_kib(pid) {
                    peak.fetch_max(r, Ordering::Relaxed);
                }
                peak_open.fetch_max(open.load(Ordering::Relaxed), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let started = Instant::now();
    let step = a.ramp / a.streams as u32;
    let tasks: Vec<_> = (0..a.streams)
        .map(|i| {
            let client = clients[i % conns].clone();
            let (url, open) = (a.url.clone(), open.clone());
            tokio::spawn(async move {
                tokio::time::sleep(step * i as u32).await;
                one(&client, &url, i, &open).await
            })
        })
        .collect();
    let mut errors = 0usize;
    let mut first_error = None;
    for t in tasks {
        match t.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                errors += 1;
                first_error.get_or_insert(e);
            }
            Err(e) => {
                errors += 1;
                first_error.get_or_insert(e.to_string());
            }
        }
    }
    let wall = started.elapsed();
    sampling.store(false, Ordering::Relaxed);
    let _ = sampler.await;
    let cpu1 = cpu_ticks(a.pid).unwrap_or(cpu0);
    drop(clients);
    tokio::time::sleep(a.settle).await;
    let after = rss_kib(a.pid).unwrap_or(0);
    let cpu_ms = (cpu1 - cpu0) as f64 * 1000.0 / a.clk_tck as f64;
    let peak_kib = peak.load(Ordering::Relaxed);
    let line = json!({
        "label": a.label,
        "streams": a.streams,
        "h2_per_conn": a.h2_per_conn,
        "errors": errors,
        "peak_open": peak_open.load(Ordering::Relaxed),
        "wall_s": wall.as_secs_f64(),
        "rss_base_mib": base_rss as f64 / 1024.0,
        "rss_peak_mib": peak_kib as f64 / 1024.0,
        "rss_after_mib": after as f64 / 1024.0,
        "rss_per_stream_kib": (peak_kib.saturating_sub(base_rss)) as f64 / a.streams as f64,
        "cpu_ms": cpu_ms,
        "cpu_ms_per_stream": cpu_ms / a.streams as f64,
    });
    eprintln!("{line}");
    if let Some(e) = first_error {
        eprintln!("chat-bench streams: {errors} errors; first: {e}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
