//! Anthropic Messages API, streaming (`"stream": true`).
//!
//! Wire format: SSE events `message_start`, `content_block_start`,
//! `content_block_delta` (`text_delta`; other delta kinds carry no text for
//! us), `content_block_stop`, `ping`, `message_delta` (stop reason, usage),
//! `message_stop`, and `error`, which may arrive mid-stream after a 200.
//! Unknown event types are ignored: the API adds new ones over time.

use std::time::Duration;

use futures_util::future::BoxFuture;
use serde::Deserialize;
use serde_json::json;

use super::{Chunk, ChunkStream, ModelProvider, ModelRequest};
use crate::error::UpstreamError;
use crate::secrets::{RotatingKey, Secret};
use crate::sse::SseEvent;

pub struct AnthropicProvider {
    client: reqwest::Client,
    base_url: String,
    messages_url: String,
    api_key: RotatingKey,
    version: String,
}

impl AnthropicProvider {
    /// `client` is the shared, pooled client built once at init.
    pub fn new(
        client: reqwest::Client,
        base_url: &str,
        api_key: RotatingKey,
        version: &str,
    ) -> Self {
        let base_url = base_url.trim_end_matches('/').to_owned();
        Self {
            client,
            messages_url: format!("{base_url}/v1/messages"),
            base_url,
            api_key,
            version: version.to_owned(),
        }
    }

    fn request_body(req: &ModelRequest) -> serde_json::Value {
        let mut body = json!({
            "model": req.model,
            "max_tokens": req.max_tokens,
            "messages": req.messages,
            "stream": true,
        });
        if let Some(system) = &req.system {
            body["system"] = json!(system);
        }
        if let Some(t) = req.temperature {
            body["temperature"] = json!(t);
        }
        if !req.stop.is_empty() {
            body["stop_sequences"] = json!(req.stop);
        }
        body
    }
}

impl ModelProvider for AnthropicProvider {
    fn name(&self) -> &'static str {
        "anthropic"
    }

    fn stream(&self, req: &ModelRequest) -> BoxFuture<'_, Result<ChunkStream, UpstreamError>> {
        let body = Self::request_body(req);
        Box::pin(async move {
            let open = |key: Secret| {
                let request = self
                    .client
                    .post(&self.messages_url)
                    .header("x-api-key", key.expose())
                    .header("anthropic-version", &self.version)
                    .json(&body);
                super::open_sse(request, status_error, decoder())
            };
            let key = self.api_key.current();
            match open(key.clone()).await {
                // A rotated key: read it again and try once more.
                Err(e) if e.is_auth_rejection() && self.api_key.after_rejection(&key).await => {
                    open(self.api_key.current()).await
                }
                other => other,
            }
        })
    }

    fn prewarm(&self) -> BoxFuture<'_, Result<(), UpstreamError>> {
        Box::pin(async move {
            // Listing models costs no tokens.
            let request = self
                .client
                .get(format!("{}/v1/models?limit=1", self.base_url))
                .header("x-api-key", self.api_key.current().expose())
                .header("anthropic-version", &self.version);
            super::warm(request).await
        })
    }
}

#[derive(Deserialize)]
struct ErrorEnvelope {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    message: String,
}

/// Maps an HTTP error answer to the typed error.
pub fn status_error(status: u16, body: &[u8], retry_after: Option<Duration>) -> UpstreamError {
    let (kind, message) = match serde_json::from_slice::<ErrorEnvelope>(body) {
        Ok(env) => (env.error.kind, env.error.message),
        Err(_) => (
            default_kind(status).to_owned(),
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

pub(crate) fn default_kind(status: u16) -> &'static str {
    match status {
        400 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        529 => "overloaded_error",
        _ => "api_error",
    }
}

// Each event is parsed straight into the struct its SSE event name calls
// for: an internally tagged enum (`#[serde(tag = "type")]`) would first
// buffer the whole event as `serde_json`'s generic content to find its
// tag, then parse that buffer again (one allocation per member).

#[derive(Deserialize)]
struct MessageStart {
    message: StartMessage,
}

#[derive(Deserialize)]
struct StartMessage {
    model: String,
    #[serde(default)]
    usage: Usage,
}

#[derive(Deserialize, Default)]
struct Usage {
    input_tokens: Option<u32>,
    output_tokens: Option<u32>,
}

#[derive(Deserialize)]
struct BlockStart<'a> {
    #[serde(borrow)]
    content_block: Block<'a>,
}

#[derive(Deserialize)]
struct BlockDelta<'a> {
    #[serde(borrow)]
    delta: Block<'a>,
}

/// A content block (`text`) or a delta (`text_delta`): its type and, for
/// those two, its text. Other kinds (tool use, thinking, signatures) carry
/// no text for us, and their other members are skipped unread.
#[derive(Deserialize)]
struct Block<'a> {
    #[serde(rename = "type", borrow)]
    kind: std::borrow::Cow<'a, str>,
    #[serde(default)]
    text: MaybeText,
}

/// A member kept when it is a string and skipped when it is anything else,
/// so a block kind we do not know never fails the answer.
#[derive(Default)]
struct MaybeText(Option<String>);

impl<'de> Deserialize<'de> for MaybeText {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{IgnoredAny, MapAccess, SeqAccess, Visitor};
        struct Text;
        impl<'de> Visitor<'de> for Text {
            type Value = MaybeText;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_str<E>(self, v: &str) -> Result<MaybeText, E> {
                Ok(MaybeText(Some(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<MaybeText, E> {
                Ok(MaybeText(Some(v)))
            }
            fn visit_bool<E>(self, _: bool) -> Result<MaybeText, E> {
                Ok(MaybeText(None))
            }
            fn visit_i64<E>(self, _: i64) -> Result<MaybeText, E> {
                Ok(MaybeText(None))
            }
            fn visit_u64<E>(self, _: u64) -> Result<MaybeText, E> {
                Ok(MaybeText(None))
            }
            fn visit_f64<E>(self, _: f64) -> Result<MaybeText, E> {
                Ok(MaybeText(None))
            }
            fn visit_unit<E>(self) -> Result<MaybeText, E> {
                Ok(MaybeText(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> Result<MaybeText, A::Error> {
                while s.next_element::<IgnoredAny>()?.is_some() {}
                Ok(MaybeText(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<MaybeText, A::Error> {
                while m.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(MaybeText(None))
            }
        }
        d.deserialize_any(Text)
    }
}

#[derive(Deserialize)]
struct MessageDelta {
    delta: StopDelta,
    #[serde(default)]
    usage: Usage,
}

#[derive(Deserialize)]
struct StopDelta {
    stop_reason: Option<String>,
}

#[derive(Deserialize)]
struct ErrorEvent {
    error: ErrorDetail,
}

/// Converts one Anthropic SSE event into at most one chunk. Pure.
///
/// `ping`, block boundaries, non-text deltas and unknown event types give
/// `Ok(None)`; an `error` event gives `Err`. Unknown events may carry any
/// payload: they are not parsed.
pub fn event_to_chunk(ev: &SseEvent) -> Result<Option<Chunk>, UpstreamError> {
    let bad =
        |e: serde_json::Error| UpstreamError::Protocol(format!("bad {} event: {e}", ev.event));
    let data = ev.data.as_str();
    Ok(match ev.event.as_str() {
        "message_start" => {
            let MessageStart { message } = serde_json::from_str(data).map_err(bad)?;
            Some(Chunk::Start {
                model: message.model,
                input_tokens: message.usage.input_tokens,
            })
        }
        // An empty text carries nothing: no empty `delta` event for
        // clients, no first token that is not one (an anthropic_sse fuzz
        // find; the other decoders already skip them).
        "content_block_start" => {
            let BlockStart { content_block: b } = serde_json::from_str(data).map_err(bad)?;
            b.text
                .0
                .filter(|t| b.kind == "text" && !t.is_empty())
                .map(Chunk::Delta)
        }
        "content_block_delta" => {
            let BlockDelta { delta: b } = serde_json::from_str(data).map_err(bad)?;
            match b.text.0 {
                Some(t) if b.kind == "text_delta" => (!t.is_empty()).then_some(Chunk::Delta(t)),
                // A text delta without its text is malformed.
                None if b.kind == "text_delta" => {
                    return Err(bad(serde::de::Error::missing_field("text")));
                }
                _ => None,
            }
        }
        "message_delta" => {
            let MessageDelta { delta, usage } = serde_json::from_str(data).map_err(bad)?;
            Some(Chunk::Stop {
                stop_reason: delta.stop_reason,
                input_tokens: usage.input_tokens,
                output_tokens: usage.output_tokens,
            })
        }
        "message_stop" => {
            serde_json::from_str::<serde::de::IgnoredAny>(data).map_err(bad)?;
            Some(Chunk::End)
        }
        "error" => {
            let ErrorEvent { error } = serde_json::from_str(data).map_err(bad)?;
            return Err(UpstreamError::StreamEvent {
                kind: error.kind,
                message: error.message,
            });
        }
        _ => None,
    })
}

/// The Anthropic decoder: network reads in, chunks out. Pure; used by the
/// live stream and by tests on literal streams.
pub fn decoder() -> impl super::Decoder {
    super::SseDecoder::new(|ev: &SseEvent, out: &mut Vec<Chunk>| {
        out.extend(event_to_chunk(ev)?);
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::super::{Decoder, retry_after};
    use super::*;
    use reqwest::header::{HeaderMap, RETRY_AFTER};

    /// A literal stream as the Messages API sends it (shape from the API
    /// reference), including a ping and an event type we do not know.
    const STREAM: &str = concat!(
        "event: message_start\n",
        "data: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"model\":\"claude-sonnet-4-5\",\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\n",
        "event: content_block_start\n",
        "data: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
        "event: ping\n",
        "data: {\"type\": \"ping\"}\n\n",
        "event: content_block_delta\n",
        "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hello\"}}\n\n",
        "event: future_event_type\n",
        "data: {\"type\":\"future_event_type\",\"whatever\":[1,2]}\n\n",
        "event: content_block_delta\n",
        "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\" w\u{f6}rld!\"}}\n\n",
        "event: content_block_stop\n",
        "data: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
        "event: message_delta\n",
        "data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":15}}\n\n",
        "event: message_stop\n",
        "data: {\"type\":\"message_stop\"}\n\n",
    );

    fn decode(chunks: &[&[u8]]) -> Vec<Result<Chunk, UpstreamError>> {
        let mut d = decoder();
        let mut out = std::collections::VecDeque::new();
        for c in chunks {
            d.feed(c, &mut out);
        }
        out.into_iter().collect()
    }

    fn ok(v: Vec<Result<Chunk, UpstreamError>>) -> Vec<Chunk> {
        v.into_iter().map(|r| r.unwrap()).collect()
    }

    fn expected() -> Vec<Chunk> {
        vec![
            Chunk::Start {
                model: "claude-sonnet-4-5".into(),
                input_tokens: Some(25),
            },
            Chunk::Delta("Hello".into()),
            Chunk::Delta(" w\u{f6}rld!".into()),
            Chunk::Stop {
                stop_reason: Some("end_turn".into()),
                input_tokens: None,
                output_tokens: Some(15),
            },
            Chunk::End,
        ]
    }

    #[test]
    fn full_stream_in_one_read() {
        assert_eq!(ok(decode(&[STREAM.as_bytes()])), expected());
    }

    #[test]
    fn full_stream_split_at_every_byte_pair() {
        let b = STREAM.as_bytes();
        // Every single split point, and reads of 1..=7 bytes.
        for i in 0..b.len() {
            assert_eq!(ok(decode(&[&b[..i], &b[i..]])), expected(), "split at {i}");
        }
        for n in 1..=7 {
            let parts: Vec<&[u8]> = b.chunks(n).collect();
            assert_eq!(ok(decode(&parts)), expected(), "reads of {n} bytes");
        }
    }

    #[test]
    fn error_event_mid_stream_ends_the_stream_with_its_kind() {
        let s = concat!(
            "event: message_start\n",
            "data: {\"type\":\"message_start\",\"message\":{\"model\":\"m\",\"usage\":{\"input_tokens\":1}}}\n\n",
            "event: content_block_delta\n",
            "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\n\n",
            "event: error\n",
            "data: {\"type\": \"error\", \"error\": {\"type\": \"overloaded_error\", \"message\": \"Overloaded\"}}\n\n",
            "event: content_block_delta\n",
            "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"never\"}}\n\n",
        );
        let out = decode(&[s.as_bytes()]);
        assert_eq!(out.len(), 3);
        assert_eq!(out[1].as_ref().unwrap(), &Chunk::Delta("Hi".into()));
        match &out[2] {
            Err(e @ UpstreamError::StreamEvent { kind, message }) => {
                assert_eq!(kind, "overloaded_error");
                assert_eq!(message, "Overloaded");
                assert!(e.retryable());
                assert_eq!(e.status_code().as_u16(), 503);
            }
            other => panic!("expected a stream error, got {other:?}"),
        }
    }

    #[test]
    fn non_text_deltas_and_blocks_are_ignored() {
        let tool = SseEvent {
            event: "content_block_delta".into(),
            data: r#"{"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{\"a\""}}"#.into(),
            id: None,
        };
        assert_eq!(event_to_chunk(&tool).unwrap(), None);
        let thinking = SseEvent {
            event: "content_block_start".into(),
            data: r#"{"type":"content_block_start","index":0,"content_block":{"type":"thinking","thinking":""}}"#.into(),
            id: None,
        };
        assert_eq!(event_to_chunk(&thinking).unwrap(), None);
        // A kind we do not know whose `text` is not a string (and a text
        // block's, in the same shape) is skipped, not a broken answer.
        for (event, data) in [
            (
                "content_block_delta",
                r#"{"type":"content_block_delta","index":2,"delta":{"type":"future_delta","text":{"parts":[1,[2]],"n":null}}}"#,
            ),
            (
                "content_block_start",
                r#"{"type":"content_block_start","index":2,"content_block":{"type":"future_block","text":[true,1.5,-3]}}"#,
            ),
        ] {
            let ev = SseEvent {
                event: event.into(),
                data: data.into(),
                id: None,
            };
            assert_eq!(event_to_chunk(&ev).unwrap(), None, "{data}");
        }
    }

    /// The event's name says what it is: the data is read as that kind,
    /// whatever else it holds; a text delta must have its text.
    #[test]
    fn events_are_read_by_their_name() {
        let ev = |event: &str, data: &str| SseEvent {
            event: event.into(),
            data: data.into(),
            id: None,
        };
        assert_eq!(
            event_to_chunk(&ev(
                "content_block_delta",
                r#"{"delta":{"text":"a\u00e9\"b","type":"text_delta"},"index":0}"#
            ))
            .unwrap(),
            Some(Chunk::Delta("a\u{e9}\"b".into()))
        );
        let missing = event_to_chunk(&ev(
            "content_block_delta",
            r#"{"type":"content_block_delta","delta":{"type":"text_delta"}}"#,
        ));
        assert!(
            matches!(&missing, Err(UpstreamError::Protocol(m)) if m.contains("missing field `text`")),
            "{missing:?}"
        );
        let stop = event_to_chunk(&ev("message_stop", "{}")).unwrap();
        assert_eq!(stop, Some(Chunk::End));
        assert!(matches!(
            event_to_chunk(&ev("message_stop", "{")),
            Err(UpstreamError::Protocol(_))
        ));
        // A name we do not know is not parsed at all.
        assert_eq!(
            event_to_chunk(&ev("future_event", "{not json")).unwrap(),
            None
        );
    }

    #[test]
    fn malformed_known_event_is_a_protocol_error() {
        let ev = SseEvent {
            event: "content_block_delta".into(),
            data: "{not json".into(),
            id: None,
        };
        assert!(matches!(
            event_to_chunk(&ev),
            Err(UpstreamError::Protocol(_))
        ));
    }

    #[test]
    fn nothing_after_message_stop_is_read() {
        let s = format!(
            "{STREAM}event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{{\"type\":\"text_delta\",\"text\":\"late\"}}}}\n\n"
        );
        assert_eq!(ok(decode(&[s.as_bytes()])), expected());
    }

    #[test]
    fn http_error_bodies_map_to_typed_errors() {
        let body = br#"{"type":"error","error":{"type":"rate_limit_error","message":"Number of request tokens has exceeded your per-minute rate limit"},"request_id":"req_1"}"#;
        let e = status_error(429, body, Some(Duration::from_secs(7)));
        assert_eq!(e.status_code().as_u16(), 429);
        assert!(e.retryable());
        assert_eq!(e.retry_after(), Some(Duration::from_secs(7)));
        assert_eq!(e.code(), "upstream_rate_limited");
        match e {
            UpstreamError::Status { kind, .. } => assert_eq!(kind, "rate_limit_error"),
            other => panic!("{other:?}"),
        }
        // A body that is not the API's JSON (a proxy's HTML page) still maps by status.
        let e = status_error(529, b"<html>busy</html>", None);
        assert_eq!(e.status_code().as_u16(), 503);
        assert!(e.retryable());
        let e = status_error(401, b"", None);
        assert!(!e.retryable());
        assert_eq!(e.status_code().as_u16(), 502);
    }

    #[test]
    fn retry_after_header_parsing() {
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert(RETRY_AFTER, "3".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(3)));
        h.insert(RETRY_AFTER, "soon".parse().unwrap());
        assert_eq!(retry_after(&h), None);
    }

    #[test]
    fn request_body_has_the_api_shape() {
        let req = ModelRequest {
            model: "m".into(),
            system: Some("be brief".into()),
            messages: vec![super::super::Message {
                role: super::super::Role::User,
                content: "hi".into(),
            }],
            max_tokens: 10,
            temperature: None,
            stop: vec!["END".into()],
        };
        let b = AnthropicProvider::request_body(&req);
        assert_eq!(b["stream"], true);
        assert_eq!(b["system"], "be brief");
        assert_eq!(b["stop_sequences"], json!(["END"]));
        assert_eq!(b["messages"][0]["role"], "user");
        assert!(b.get("temperature").is_none());
    }
}
