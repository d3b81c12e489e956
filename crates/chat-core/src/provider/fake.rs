//! A fake provider for tests of the logic above it (retries, fallback,
//! circuit breakers, deadlines, the relay) without sockets: what it does is
//! chosen by the model name, like tensorzero's dummy provider.
//!
//! Model names (with or without the `fake:` prefix; `#...` after the
//! name is ignored):
//! - `ok`: answers "Hello from fake." in three deltas;
//! - `status-N`: fails before the stream with HTTP status N (e.g.
//!   `status-503` is retryable, `status-400` is not);
//! - `flaky-N`: fails with 503 the first N calls, then answers like `ok`;
//! - `slow-MS`: waits MS milliseconds (on tokio's clock, so paused tests
//!   do not sleep) before its first text;
//! - `break`: sends one delta, then fails mid-stream;
//! - `hang`: accepts the request, then never sends anything;
//! - `many-N`: answers with N deltas, as fast as they are read.
//!
//! It counts its calls, so tests can see what reached the model. A fake
//! that can be set up only in code: no setting selects it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use futures_util::stream;

use super::{Chunk, ChunkStream, ModelProvider, ModelRequest};
use crate::error::UpstreamError;

/// The fake provider. It stands in for the provider it is named after
/// (e.g. `anthropic`), so model names route to it as to that provider.
#[derive(Debug)]
pub struct FakeProvider {
    name: &'static str,
    calls: AtomicU32,
    /// Answer streams not yet dropped: a model call still running.
    open: Arc<AtomicU32>,
}

impl FakeProvider {
    pub fn named(name: &'static str) -> Self {
        Self {
            name,
            calls: AtomicU32::new(0),
            open: Arc::new(AtomicU32::new(0)),
        }
    }

    /// Model calls whose answer stream is still held by someone.
    pub fn open_streams(&self) -> u32 {
        self.open.load(Ordering::SeqCst)
    }

    /// Calls of `stream` so far.
    pub fn calls(&self) -> u32 {
        self.calls.load(Ordering::SeqCst)
    }
}

const ANSWER: [&str; 3] = ["Hello", " from", " fake."];

fn answer(model: &str) -> Vec<Result<Chunk, UpstreamError>> {
    let mut out = vec![Ok(Chunk::Start {
        model: model.to_owned(),
        input_tokens: Some(3),
    })];
    out.extend(ANSWER.iter().map(|t| Ok(Chunk::Delta((*t).to_owned()))));
    out.push(Ok(Chunk::Stop {
        stop_reason: Some("end_turn".to_owned()),
        input_tokens: None,
        output_tokens: Some(3),
    }));
    out.push(Ok(Chunk::End));
    out
}

fn status(code: u16) -> UpstreamError {
    crate::provider::anthropic::status_error(code, b"{}", None)
}

impl ModelProvider for FakeProvider {
    fn name(&self) -> &'static str {
        self.name
    }

    fn stream(&self, req: &ModelRequest) -> BoxFuture<'_, Result<ChunkStream, UpstreamError>> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        let model = req.model.strip_prefix("fake:").unwrap_or(&req.model);
        // `#anything` after the name is ignored: tests use it to keep their
        // models' circuits apart.
        let model = model.split('#').next().unwrap_or(model).to_owned();
        let open = self.open.clone();
        Box::pin(async move {
            let model = model.as_str();
            let counted = |stream: ChunkStream| -> ChunkStream {
                let guard = OpenGuard::new(open);
                stream
                    .map(move |c| {
                        let _held = &guard;
                        c
                    })
                    .boxed()
            };
            let (kind, arg) = model.split_once('-').unwrap_or((model, ""));
            let num = arg.parse::<u64>().unwrap_or(0);
            match kind {
                "ok" => Ok(stream::iter(answer(model)).boxed()),
                "many" => {
                    let deltas = (0..num).map(|i| Ok(Chunk::Delta(format!("w{i} "))));
                    let end = [
                        Ok(Chunk::Stop {
                            stop_reason: Some("end_turn".to_owned()),
                            input_tokens: Some(3),
                            output_tokens: Some(num as u32),
                        }),
                        Ok(Chunk::End),
                    ];
                    Ok(counted(stream::iter(deltas.chain(end)).boxed()))
                }
                "status" => Err(status(num as u16)),
                "flaky" if u64::from(n) < num => Err(status(503)),
                "flaky" => Ok(stream::iter(answer(model)).boxed()),
                "slow" => {
                    let wait = Duration::from_millis(num);
                    let mut chunks = answer(model).into_iter();
                    let start = chunks.next();
                    let rest = stream::once(async move {
                        tokio::time::sleep(wait).await;
                        stream::iter(chunks)
                    })
                    .flatten();
                    Ok(stream::iter(start).chain(rest).boxed())
                }
                "break" => Ok(stream::iter(vec![
                    Ok(Chunk::Delta("Hel".to_owned())),
                    Err(UpstreamError::Truncated),
                ])
                .boxed()),
                "hang" => Ok(stream::pending().boxed()),
                _ => Err(status(404)),
            }
        })
    }

    fn prewarm(&self) -> BoxFuture<'_, Result<(), UpstreamError>> {
        Box::pin(async { Ok(()) })
    }
}

/// Counts an answer stream as open until it is dropped.
struct OpenGuard(Arc<AtomicU32>);

impl OpenGuard {
    fn new(open: Arc<AtomicU32>) -> Self {
        open.fetch_add(1, Ordering::SeqCst);
        Self(open)
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}
