//! Model providers behind one trait.
//!
//! A provider turns a [`ModelRequest`] into a stream of [`Chunk`]s. The call
//! resolves once the provider has accepted the request (HTTP status known),
//! so errors that happen before any text exist as a plain `Err` and can be
//! answered with a proper status code; errors after that arrive inside the
//! stream. Each provider's wire format is parsed by a pure function that is
//! unit-tested on literal provider events.
//!
//! One file per provider (`anthropic`, `openai`, `bedrock`), plus
//! `routing` (which model answers), `health` (what we last saw of each)
//! and `fake` (the in-crate fake for unit tests). Each provider owns its
//! settings type here. Uses: `error`, `sse`, `secrets`, `http`.

pub mod anthropic;
pub mod bedrock;
pub mod fake;
pub mod health;
pub mod openai;
pub mod routing;

use std::collections::VecDeque;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use futures_util::stream::{self, BoxStream};
use reqwest::header::{HeaderMap, RETRY_AFTER};
use serde::{Deserialize, Serialize};

use crate::error::UpstreamError;
use crate::secrets::ApiKeySource;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    User,
    Assistant,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

/// Everything that determines the answer.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelRequest {
    pub model: String,
    pub system: Option<String>,
    pub messages: Vec<Message>,
    pub max_tokens: u32,
    pub temperature: Option<f32>,
    /// Stop sequences (OpenAI `stop`): the answer ends before the first.
    pub stop: Vec<String>,
}

/// One provider-neutral piece of an answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Chunk {
    /// The provider accepted the request and named the model answering.
    Start {
        model: String,
        input_tokens: Option<u32>,
    },
    /// Text to show, in order.
    Delta(String),
    /// Why the model stopped and the final usage figures.
    Stop {
        stop_reason: Option<String>,
        input_tokens: Option<u32>,
        output_tokens: Option<u32>,
    },
    /// The answer is complete; nothing follows.
    End,
}

pub type ChunkStream = BoxStream<'static, Result<Chunk, UpstreamError>>;

/// A streaming model API.
pub trait ModelProvider: Send + Sync {
    /// Short name for logs, metrics and `/health` (e.g. `anthropic`).
    fn name(&self) -> &'static str;

    /// Sends the request; resolves when the provider has accepted it.
    fn stream(&self, req: &ModelRequest) -> BoxFuture<'_, Result<ChunkStream, UpstreamError>>;

    /// Opens (or re-checks) a pooled connection to the provider without
    /// generating tokens, so the next request skips TCP and TLS set-up.
    fn prewarm(&self) -> BoxFuture<'_, Result<(), UpstreamError>>;

    /// Whether [`prewarm`](Self::prewarm) really checks the provider (some
    /// APIs have no call that costs nothing).
    fn can_probe(&self) -> bool {
        true
    }
}

/// The configured providers, by name.
#[derive(Clone, Default)]
pub struct Providers(Vec<std::sync::Arc<dyn ModelProvider>>);

impl Providers {
    pub fn new(list: Vec<std::sync::Arc<dyn ModelProvider>>) -> Self {
        Self(list)
    }

    pub fn get(&self, name: &str) -> Option<&std::sync::Arc<dyn ModelProvider>> {
        self.0.iter().find(|p| p.name() == name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &std::sync::Arc<dyn ModelProvider>> {
        self.0.iter()
    }
}

/// A provider's wire format: network reads in, chunks out. Pure; stops at
/// the first error or at the end of the answer.
pub trait Decoder: Send + 'static {
    fn feed(&mut self, bytes: &[u8], out: &mut VecDeque<Result<Chunk, UpstreamError>>);
    fn finished(&self) -> bool;
}

/// SSE bytes in, chunks out: the loop every SSE provider shares. `convert`
/// is the provider's pure per-event function; it appends the chunks one
/// event yields. Decoding stops at `Chunk::End` or at the first error.
pub struct SseDecoder<F> {
    parser: crate::sse::SseParser,
    convert: F,
    finished: bool,
    scratch: Vec<Chunk>,
}

impl<F> SseDecoder<F>
where
    F: FnMut(&crate::sse::SseEvent, &mut Vec<Chunk>) -> Result<(), UpstreamError> + Send + 'static,
{
    pub fn new(convert: F) -> Self {
        Self {
            parser: crate::sse::SseParser::new(),
            convert,
            finished: false,
            scratch: Vec::new(),
        }
    }
}

impl<F> Decoder for SseDecoder<F>
where
    F: FnMut(&crate::sse::SseEvent, &mut Vec<Chunk>) -> Result<(), UpstreamError> + Send + 'static,
{
    fn finished(&self) -> bool {
        self.finished
    }

    fn feed(&mut self, bytes: &[u8], out: &mut VecDeque<Result<Chunk, UpstreamError>>) {
        if self.finished {
            return;
        }
        let events = match self.parser.feed(bytes) {
            Ok(ev) => ev,
            Err(e) => {
                self.finished = true;
                out.push_back(Err(UpstreamError::Protocol(e.to_string())));
                return;
            }
        };
        for ev in events {
            self.scratch.clear();
            if let Err(e) = (self.convert)(&ev, &mut self.scratch) {
                self.finished = true;
                out.push_back(Err(e));
                return;
            }
            for c in self.scratch.drain(..) {
                let end = c == Chunk::End;
                out.push_back(Ok(c));
                if end {
                    self.finished = true;
                    return;
                }
            }
        }
    }
}

/// Sends a streaming request and returns its chunks, or the provider's
/// HTTP error (body read with a cap) mapped by `status_error`.
pub(crate) async fn open_sse<D: Decoder>(
    request: reqwest::RequestBuilder,
    status_error: fn(u16, &[u8], Option<Duration>) -> UpstreamError,
    decoder: D,
) -> Result<ChunkStream, UpstreamError> {
    let resp = request
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header(reqwest::header::ACCEPT, "text/event-stream")
        .send()
        .await
        .map_err(send_error)?;
    let status = resp.status();
    if !status.is_success() {
        let retry_after = retry_after(resp.headers());
        let body = read_capped(resp, 64 * 1024).await;
        return Err(status_error(status.as_u16(), &body, retry_after));
    }
    Ok(decode_stream(resp.bytes_stream().boxed(), decoder))
}

/// Sends a cheap request and drains its answer: any HTTP answer means the
/// connection (TCP + TLS + HTTP/2 if offered) is now in the pool, and the
/// drained body lets it go back there.
pub(crate) async fn warm(request: reqwest::RequestBuilder) -> Result<(), UpstreamError> {
    let resp = request.send().await.map_err(send_error)?;
    let _ = read_capped(resp, 64 * 1024).await;
    Ok(())
}

pub(crate) fn send_error(e: reqwest::Error) -> UpstreamError {
    if e.is_timeout() && e.is_connect() {
        UpstreamError::Timeout(crate::error::TimeoutKind::Connect)
    } else {
        UpstreamError::Connect(e)
    }
}

/// Reads at most `cap` bytes of an (error) body.
pub(crate) async fn read_capped(resp: reqwest::Response, cap: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let mut s = resp.bytes_stream();
    while let Some(Ok(b)) = s.next().await {
        out.extend_from_slice(&b[..b.len().min(cap - out.len())]);
        if out.len() >= cap {
            break;
        }
    }
    out
}

/// `retry-after` in seconds (what Anthropic and OpenAI send).
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    let secs: f64 = v.parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(3600.0)))
}

struct LiveStream<D> {
    body: BoxStream<'static, reqwest::Result<Bytes>>,
    decoder: D,
    ready: VecDeque<Result<Chunk, UpstreamError>>,
    done: bool,
}

/// Turns a response body into chunks with `decoder`. The body ending before
/// the decoder saw the end of the answer is [`UpstreamError::Truncated`].
pub(crate) fn decode_stream<D: Decoder>(
    body: BoxStream<'static, reqwest::Result<Bytes>>,
    decoder: D,
) -> ChunkStream {
    let state = LiveStream {
        body,
        decoder,
        ready: VecDeque::new(),
        done: false,
    };
    stream::unfold(state, |mut s| async move {
        loop {
            if let Some(item) = s.ready.pop_front() {
                if item.is_err() {
                    s.done = true;
                    s.ready.clear();
                }
                return Some((item, s));
            }
            if s.done || s.decoder.finished() {
                return None;
            }
            match s.body.next().await {
                Some(Ok(bytes)) => s.decoder.feed(&bytes, &mut s.ready),
                Some(Err(e)) => {
                    s.done = true;
                    return Some((Err(UpstreamError::Transport(e)), s));
                }
                None => {
                    s.done = true;
                    return Some((Err(UpstreamError::Truncated), s));
                }
            }
        }
    })
    .boxed()
}

/// The Anthropic Messages API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnthropicConfig {
    pub base_url: String,
    pub api_key: ApiKeySource,
    pub version: String,
}

/// An OpenAI-compatible endpoint (OpenAI, Groq, vLLM, llama.cpp server).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenAiConfig {
    /// Including the version path, e.g. `https://api.openai.com/v1`.
    pub base_url: String,
    /// Local servers often need none.
    pub api_key: Option<ApiKeySource>,
}

/// Amazon Bedrock through the AWS SDK (IAM credentials, no key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BedrockConfig {
    /// `BEDROCK_REGION`; else the SDK's region (`AWS_REGION`).
    pub region: Option<String>,
    /// `AWS_ENDPOINT_URL_BEDROCK_RUNTIME`: a stand-in such as model-sim.
    pub endpoint_url: Option<String>,
}

/// Which providers this deployment has, and how they are reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderSettings {
    /// Configured when `ANTHROPIC_API_KEY` or `..._SECRET_ARN` is set.
    pub anthropic: Option<AnthropicConfig>,
    /// Configured when `OPENAI_API_KEY`, `..._SECRET_ARN` or `OPENAI_BASE_URL` is set.
    pub openai: Option<OpenAiConfig>,
    /// Configured when `BEDROCK_ENABLED=true`.
    pub bedrock: Option<BedrockConfig>,
    /// Provider of model names without a `provider:` prefix.
    pub default_provider: String,
    /// Open the upstream connection at init so the first request does not
    /// pay for TCP + TLS.
    pub prewarm: bool,
    /// Speak HTTP/2 to the model APIs without negotiating it first
    /// ("prior knowledge"). Over TLS reqwest negotiates HTTP/2 by ALPN on
    /// its own; this is for plain-http endpoints that speak h2c (model-sim),
    /// so one connection carries every concurrent answer there too.
    pub http2_prior_knowledge: bool,
}

impl ProviderSettings {
    /// Whether the provider called `name` is configured.
    pub fn configured(&self, name: &str) -> bool {
        match name {
            "anthropic" => self.anthropic.is_some(),
            "openai" => self.openai.is_some(),
            "bedrock" => self.bedrock.is_some(),
            _ => false,
        }
    }
}
