//! Model providers behind one trait.
//!
//! A provider turns a [`ModelRequest`] into a stream of [`Chunk`]s. The call
//! resolves once the provider has accepted the request (HTTP status known),
//! so errors that happen before any text exist as a plain `Err` and can be
//! answered with a proper status code; errors after that arrive inside the
//! stream. Each provider's wire format is parsed by a pure function that is
//! unit-tested on literal provider events.

pub mod anthropic;

use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use serde::Serialize;

use crate::error::UpstreamError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    User,
    Assistant,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
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
}
