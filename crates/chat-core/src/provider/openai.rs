//! OpenAI-compatible Chat Completions, streaming: OpenAI, Groq, vLLM,
//! llama.cpp server and anything else that speaks `POST /chat/completions`
//! with `"stream": true`.
//!
//! Wire format: `data: {json}` lines without event names, each a
//! `chat.completion.chunk` whose `choices[0].delta.content` carries text and
//! whose `finish_reason` ends the answer; with
//! `stream_options.include_usage` a last chunk carries `usage` and no
//! choices; `data: [DONE]` closes the stream. Some servers (vLLM,
//! OpenRouter) send `data: {"error": {...}}` mid-stream.

use futures_util::future::BoxFuture;
use serde::Deserialize;
use serde_json::json;

use super::{Chunk, ChunkStream, ModelProvider, ModelRequest, Role};
use crate::error::UpstreamError;
use crate::secrets::{RotatingKey, Secret};

pub struct OpenAiProvider {
    client: reqwest::Client,
    base_url: String,
    completions_url: String,
    api_key: Option<RotatingKey>,
}

impl OpenAiProvider {
    /// `base_url` includes the version path, e.g. `https://api.openai.com/v1`.
    pub fn new(client: reqwest::Client, base_url: &str, api_key: Option<RotatingKey>) -> Self {
        let base_url = base_url.trim_end_matches('/').to_owned();
        Self {
            client,
            completions_url: format!("{base_url}/chat/completions"),
            base_url,
            api_key,
        }
    }

    pub(crate) fn request_body(req: &ModelRequest) -> serde_json::Value {
        let mut messages = Vec::with_capacity(req.messages.len() + 1);
        if let Some(system) = &req.system {
            messages.push(json!({"role": "system", "content": system}));
        }
        for m in &req.messages {
            let role = match m.role {
                Role::User => "user",
                Role::Assistant => "assistant",
            };
            messages.push(json!({"role": role, "content": m.content}));
        }
        let mut body = json!({
            "model": req.model,
            "messages": messages,
            "max_tokens": req.max_tokens,
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        if let Some(t) = req.temperature {
            body["temperature"] = json!(t);
        }
        if !req.stop.is_empty() {
            body["stop"] = json!(req.stop);
        }
        body
    }

    fn authorized(
        &self,
        rb: reqwest::RequestBuilder,
        key: Option<&Secret>,
    ) -> reqwest::RequestBuilder {
        match key {
            Some(k) => rb.bearer_auth(k.expose()),
            None => rb,
        }
    }
}

impl ModelProvider for OpenAiProvider {
    fn name(&self) -> &'static str {
        "openai"
    }

    fn stream(&self, req: &ModelRequest) -> BoxFuture<'_, Result<ChunkStream, UpstreamError>> {
        let body = Self::request_body(req);
        Box::pin(async move {
            let open = |key: Option<Secret>| {
                let request = self
                    .authorized(self.client.post(&self.completions_url), key.as_ref())
                    .json(&body);
                super::open_sse(request, status_error, decoder())
            };
            let key = self.api_key.as_ref().map(RotatingKey::current);
            match (open(key.clone()).await, &self.api_key, key) {
                // A rotated key: read it again and try once more.
                (Err(e), Some(rotating), Some(used))
                    if e.is_auth_rejection() && rotating.after_rejection(&used).await =>
                {
                    open(Some(rotating.current())).await
                }
                (result, _, _) => result,
            }
        })
    }

    fn prewarm(&self) -> BoxFuture<'_, Result<(), UpstreamError>> {
        Box::pin(async move {
            let key = self.api_key.as_ref().map(RotatingKey::current);
            super::warm(self.authorized(
                self.client.get(format!("{}/models", self.base_url)),
                key.as_ref(),
            ))
            .await
        })
    }
}

#[derive(Deserialize)]
struct ErrorEnvelope {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    #[serde(default)]
    message: String,
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    code: Option<serde_json::Value>,
}

impl ErrorDetail {
    fn kind(&self, status: u16) -> String {
        self.kind
            .clone()
            .or_else(|| {
                self.code
                    .as_ref()
                    .and_then(|c| c.as_str().map(str::to_owned))
            })
            .unwrap_or_else(|| super::anthropic::default_kind(status).to_owned())
    }
}

/// Maps an HTTP error answer to the typed error (same statuses as every
/// provider; the error body's shape is OpenAI's).
pub fn status_error(
    status: u16,
    body: &[u8],
    retry_after: Option<std::time::Duration>,
) -> UpstreamError {
    let (kind, message) = match serde_json::from_slice::<ErrorEnvelope>(body) {
        Ok(env) => (env.error.kind(status), env.error.message),
        Err(_) => (
            super::anthropic::default_kind(status).to_owned(),
            String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
        ),
    };
    UpstreamError::Status {
        status,
        kind,
        message,
        retry_after,
    }
}

#[derive(Deserialize)]
struct ChunkMsg {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    choices: Vec<Choice>,
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(default)]
    error: Option<ErrorDetail>,
}

#[derive(Deserialize)]
struct Choice {
    #[serde(default)]
    delta: Option<DeltaMsg>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct DeltaMsg {
    #[serde(default)]
    content: Option<String>,
}

#[derive(Deserialize)]
struct Usage {
    prompt_tokens: Option<u32>,
    completion_tokens: Option<u32>,
}

/// Our stop reasons are Anthropic's words; OpenAI's are mapped onto them.
fn stop_reason(r: &str) -> String {
    match r {
        "stop" => "end_turn",
        "length" => "max_tokens",
        "tool_calls" | "function_call" => "tool_use",
        other => other,
    }
    .to_owned()
}

/// Converts one `data:` payload into chunks. Pure.
///
/// The first chunk that names a model yields `Start`; text yields `Delta`;
/// `finish_reason` and `usage` yield `Stop`; `[DONE]` yields `End`.
pub fn data_to_chunks(
    data: &str,
    started: &mut bool,
    out: &mut Vec<Chunk>,
) -> Result<(), UpstreamError> {
    let data = data.trim();
    if data == "[DONE]" {
        out.push(Chunk::End);
        return Ok(());
    }
    let msg: ChunkMsg = serde_json::from_str(data)
        .map_err(|e| UpstreamError::Protocol(format!("bad chat.completion.chunk: {e}")))?;
    if let Some(err) = msg.error {
        return Err(UpstreamError::StreamEvent {
            kind: err.kind(500),
            message: err.message,
        });
    }
    if !*started {
        *started = true;
        out.push(Chunk::Start {
            model: msg.model.clone().unwrap_or_default(),
            input_tokens: None,
        });
    }
    for choice in msg.choices.iter().take(1) {
        if let Some(text) = choice.delta.as_ref().and_then(|d| d.content.as_ref()) {
            if !text.is_empty() {
                out.push(Chunk::Delta(text.clone()));
            }
        }
        if let Some(r) = &choice.finish_reason {
            out.push(Chunk::Stop {
                stop_reason: Some(stop_reason(r)),
                input_tokens: None,
                output_tokens: None,
            });
        }
    }
    if let Some(u) = msg.usage {
        out.push(Chunk::Stop {
            stop_reason: None,
            input_tokens: u.prompt_tokens,
            output_tokens: u.completion_tokens,
        });
    }
    Ok(())
}

/// The OpenAI-compatible decoder: network reads in, chunks out. Pure.
pub fn decoder() -> impl super::Decoder {
    let mut started = false;
    super::SseDecoder::new(move |ev: &crate::sse::SseEvent, out: &mut Vec<Chunk>| {
        // Only unnamed (`message`) events carry chunks; `error` events are
        // sent by some servers with the same error body.
        if ev.event != "message" && ev.event != "error" {
            return Ok(());
        }
        data_to_chunks(&ev.data, &mut started, out)
    })
}

#[cfg(test)]
mod tests {
    use super::super::Decoder;
    use super::*;

    /// Shaped like OpenAI's documented streaming chunks.
    const STREAM: &str = concat!(
        "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}\n\n",
        "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hello\"},\"finish_reason\":null}]}\n\n",
        ": keep-alive comment\n\n",
        "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" w\u{f6}rld\"},\"finish_reason\":null}]}\n\n",
        "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
        "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":2,\"total_tokens\":11}}\n\n",
        "data: [DONE]\n\n",
    );

    fn decode(parts: &[&[u8]]) -> Vec<Result<Chunk, UpstreamError>> {
        let mut d = decoder();
        let mut out = std::collections::VecDeque::new();
        for p in parts {
            d.feed(p, &mut out);
        }
        out.into_iter().collect()
    }

    fn expected() -> Vec<Chunk> {
        vec![
            Chunk::Start {
                model: "gpt-4o-mini".into(),
                input_tokens: None,
            },
            Chunk::Delta("Hello".into()),
            Chunk::Delta(" w\u{f6}rld".into()),
            Chunk::Stop {
                stop_reason: Some("end_turn".into()),
                input_tokens: None,
                output_tokens: None,
            },
            Chunk::Stop {
                stop_reason: None,
                input_tokens: Some(9),
                output_tokens: Some(2),
            },
            Chunk::End,
        ]
    }

    #[test]
    fn whole_stream_and_every_split() {
        let b = STREAM.as_bytes();
        let all: Vec<Chunk> = decode(&[b]).into_iter().map(|r| r.unwrap()).collect();
        assert_eq!(all, expected());
        for i in 0..b.len() {
            let got: Vec<Chunk> = decode(&[&b[..i], &b[i..]])
                .into_iter()
                .map(|r| r.unwrap())
                .collect();
            assert_eq!(got, expected(), "split at {i}");
        }
    }

    #[test]
    fn mid_stream_error_object_ends_the_stream() {
        let s = concat!(
            "data: {\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"},\"finish_reason\":null}]}\n\n",
            "data: {\"error\":{\"message\":\"server overloaded\",\"type\":\"overloaded_error\"}}\n\n",
            "data: {\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"never\"}}]}\n\n",
        );
        let out = decode(&[s.as_bytes()]);
        assert_eq!(out.len(), 3);
        match &out[2] {
            Err(UpstreamError::StreamEvent { kind, message }) => {
                assert_eq!(kind, "overloaded_error");
                assert_eq!(message, "server overloaded");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn finish_reasons_map_to_ours() {
        assert_eq!(stop_reason("length"), "max_tokens");
        assert_eq!(stop_reason("content_filter"), "content_filter");
    }

    #[test]
    fn http_errors_use_the_openai_body() {
        let e = status_error(
            429,
            br#"{"error":{"message":"Rate limit reached","type":"requests","code":"rate_limit_exceeded"}}"#,
            None,
        );
        assert_eq!(e.status_code().as_u16(), 429);
        assert!(e.retryable());
        let e = status_error(401, br#"{"error":{"message":"Incorrect API key","type":"invalid_request_error","code":"invalid_api_key"}}"#, None);
        assert_eq!(e.status_code().as_u16(), 502);
        assert!(!e.retryable());
    }

    #[test]
    fn request_body_puts_system_first_and_asks_for_usage() {
        let req = ModelRequest {
            model: "gpt".into(),
            system: Some("sys".into()),
            messages: vec![super::super::Message {
                role: Role::User,
                content: "hi".into(),
            }],
            max_tokens: 5,
            temperature: Some(0.5),
            stop: vec!["END".into()],
        };
        let b = OpenAiProvider::request_body(&req);
        assert_eq!(b["messages"][0]["role"], "system");
        assert_eq!(b["messages"][1]["content"], "hi");
        assert_eq!(b["stream_options"]["include_usage"], true);
        assert_eq!(b["temperature"], 0.5);
        assert_eq!(b["stop"], json!(["END"]));
    }
}
