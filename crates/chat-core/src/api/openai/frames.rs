//! The answer of a turn, as `/chat` streams it (`meta`, `delta`, `done`,
//! `error`), re-framed in OpenAI's wire format: `chat.completion.chunk`
//! events and `data: [DONE]`, or one `chat.completion` object. The turn
//! runs exactly as for `/chat` (cache, coalescing, live copy, persistence);
//! only the client's framing differs. Pure apart from the clock for
//! `created`.

use bytes::{BufMut, Bytes, BytesMut};
use serde_json::{Value, json};

use crate::sse::SseEvent;

/// OpenAI's `finish_reason` for a provider's stop reason.
pub fn finish_reason(stop_reason: Option<&str>) -> &'static str {
    match stop_reason {
        Some("max_tokens" | "length") => "length",
        Some("content_filter" | "guardrail_intervened" | "refusal") => "content_filter",
        _ => "stop",
    }
}

/// The HTTP status for a mid-answer `error` event's code (a non-streamed
/// answer turns it into an error response).
pub fn status_of(code: &str) -> u16 {
    match code {
        "upstream_rate_limited" => 429,
        "upstream_overloaded" | "upstream_circuit_open" => 503,
        "upstream_timeout" => 504,
        "upstream_rejected_request" => 400,
        "upstream_request_too_large" => 413,
        _ => 502,
    }
}

/// OpenAI's error `type` for a status.
pub fn error_type(status: u16) -> &'static str {
    match status {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        s if s >= 500 => "server_error",
        _ => "invalid_request_error",
    }
}

/// `{"error": {"message", "type", "param", "code"}}`.
pub fn error_body(status: u16, code: &str, message: &str, param: Option<&str>) -> Value {
    json!({"error": {
        "message": message,
        "type": error_type(status),
        "param": param,
        "code": code,
    }})
}

fn data_frame(id: Option<&str>, v: &Value) -> Bytes {
    let data = v.to_string();
    let mut b = BytesMut::with_capacity(data.len() + 32);
    if let Some(id) = id {
        // Our event ids: a client can resume through /chat/streams/{id}.
        b.put_slice(b"id: ");
        b.put_slice(id.as_bytes());
        b.put_u8(b'\n');
    }
    b.put_slice(b"data: ");
    b.put_slice(data.as_bytes());
    b.put_slice(b"\n\n");
    b.freeze()
}

/// Re-frames one answer's events as they arrive.
pub struct Chunker {
    include_usage: bool,
    created: u64,
    id: String,
    model: String,
    /// A content chunk's JSON before and after its content (known once
    /// `meta` has named the turn and model): a `delta`'s text is already
    /// a JSON string in our frame, so it goes between them as it is.
    content: Option<(Bytes, Bytes)>,
}

/// Stands in for the content while a content chunk's two halves are made.
const HOLE: &str = "\u{0}hole";

impl Chunker {
    pub fn new(include_usage: bool, created: u64) -> Self {
        Self {
            include_usage,
            created,
            id: String::from("chatcmpl-"),
            model: String::new(),
            content: None,
        }
    }

    /// The JSON of a content chunk split around its content.
    fn content_halves(&self) -> Option<(Bytes, Bytes)> {
        let whole = self.chunk(json!({ "content": HOLE }), None).to_string();
        let hole = serde_json::to_string(HOLE).ok()?;
        let at = whole.find(&hole)?;
        Some((
            Bytes::copy_from_slice(&whole.as_bytes()[..at]),
            Bytes::copy_from_slice(&whole.as_bytes()[at + hole.len()..]),
        ))
    }

    fn chunk(&self, delta: Value, finish: Option<&str>) -> Value {
        let mut c = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": null,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
        });
        if self.include_usage {
            c["usage"] = Value::Null;
        }
        c
    }

    /// The frames for one of our events (none for an event it does not
    /// know, so a newer event kind is passed over, not an error).
    pub fn frames(&mut self, ev: &SseEvent, out: &mut BytesMut) {
        let id = ev.id.as_deref();
        if ev.event == "delta" {
            // `{"text":"..."}` as our frames write it: the string passes
            // through without being parsed and written again.
            let text = ev
                .data
                .strip_prefix("{\"text\":")
                .and_then(|r| r.strip_suffix('}'))
                .filter(|t| {
                    t.starts_with('"') && serde_json::from_str::<serde::de::IgnoredAny>(t).is_ok()
                });
            if let (Some(text), Some((before, after))) = (text, &self.content) {
                if let Some(id) = id {
                    out.put_slice(b"id: ");
                    out.put_slice(id.as_bytes());
                    out.put_u8(b'\n');
                }
                out.put_slice(b"data: ");
                out.put_slice(before);
                out.put_slice(text.as_bytes());
                out.put_slice(after);
                out.put_slice(b"\n\n");
                return;
            }
        }
        let data: Value = serde_json::from_str(&ev.data).unwrap_or(Value::Null);
        match ev.event.as_str() {
            "meta" => {
                if let Some(t) = data["turn_id"].as_str() {
                    self.id = format!("chatcmpl-{t}");
                }
                self.model = data["model"].as_str().unwrap_or_default().to_owned();
                self.content = self.content_halves();
                let c = self.chunk(json!({"role": "assistant", "content": ""}), None);
                out.put(data_frame(id, &c));
            }
            "delta" => {
                let text = data["text"].as_str().unwrap_or_default();
                let c = self.chunk(json!({ "content": text }), None);
                out.put(data_frame(id, &c));
            }
            "done" => {
                let finish = finish_reason(data["stop_reason"].as_str());
                out.put(data_frame(id, &self.chunk(json!({}), Some(finish))));
                if self.include_usage {
                    let mut c = self.chunk(json!({}), None);
                    c["choices"] = json!([]);
                    c["usage"] = usage(&data["usage"]);
                    out.put(data_frame(None, &c));
                }
                out.put_slice(b"data: [DONE]\n\n");
            }
            "error" => {
                let code = data["code"].as_str().unwrap_or("upstream_error");
                let message = data["message"].as_str().unwrap_or("the answer failed");
                let e = error_body(status_of(code), code, message, None);
                out.put(data_frame(id, &e));
            }
            _ => {}
        }
    }
}

/// OpenAI's usage object from ours.
pub fn usage(u: &Value) -> Value {
    let input = u["input_tokens"].as_u64().unwrap_or(0);
    let output = u["output_tokens"].as_u64().unwrap_or(0);
    json!({"prompt_tokens": input, "completion_tokens": output, "total_tokens": input + output})
}

/// A whole answer, for `stream: false`.
#[derive(Default)]
pub struct Collected {
    pub meta: Value,
    pub text: String,
    pub done: Option<Value>,
    pub error: Option<Value>,
}

impl Collected {
    pub fn add(&mut self, ev: &SseEvent) {
        let data: Value = serde_json::from_str(&ev.data).unwrap_or(Value::Null);
        match ev.event.as_str() {
            "meta" => self.meta = data,
            "delta" => self
                .text
                .push_str(data["text"].as_str().unwrap_or_default()),
            "done" => self.done = Some(data),
            "error" => self.error = Some(data),
            _ => {}
        }
    }

    /// The `chat.completion` object, or (status, OpenAI error body).
    pub fn into_completion(self, created: u64) -> Result<Value, (u16, Value)> {
        let done = match (self.done, self.error) {
            (Some(d), None) => d,
            (_, Some(e)) => {
                let code = e["code"].as_str().unwrap_or("upstream_error");
                let status = status_of(code);
                let message = e["message"].as_str().unwrap_or("the answer failed");
                return Err((status, error_body(status, code, message, None)));
            }
            (None, None) => {
                let (status, code) = (502, "stream_lost");
                let message = "the answer stopped before it was complete; ask again";
                return Err((status, error_body(status, code, message, None)));
            }
        };
        Ok(json!({
            "id": format!("chatcmpl-{}", self.meta["turn_id"].as_str().unwrap_or_default()),
            "object": "chat.completion",
            "created": created,
            "model": self.meta["model"],
            "system_fingerprint": null,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": self.text, "refusal": null},
                "logprobs": null,
                "finish_reason": finish_reason(done["stop_reason"].as_str()),
            }],
            "usage": usage(&done["usage"]),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sse::SseParser;

    fn ev(id: u64, event: &str, data: Value) -> SseEvent {
        SseEvent {
            event: event.into(),
            data: data.to_string(),
            id: Some(id.to_string()),
        }
    }

    fn answer() -> Vec<SseEvent> {
        vec![
            ev(
                1,
                "meta",
                json!({"turn_id": "t1", "model": "m1", "cache": "miss"}),
            ),
            ev(2, "delta", json!({"text": "Hel"})),
            ev(3, "delta", json!({"text": "lo"})),
            ev(
                4,
                "done",
                json!({"stop_reason": "max_tokens", "usage": {"input_tokens": 3, "output_tokens": 2}}),
            ),
        ]
    }

    #[test]
    fn an_answer_becomes_chunks_usage_and_done() {
        let mut c = Chunker::new(true, 7);
        let mut out = BytesMut::new();
        for e in answer() {
            c.frames(&e, &mut out);
        }
        let mut p = SseParser::new();
        let events = p.feed(&out).unwrap();
        assert_eq!(events.last().unwrap().data, "[DONE]");
        let chunks: Vec<Value> = events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(&e.data).unwrap())
            .collect();
        assert_eq!(chunks.len(), 5);
        assert!(
            chunks
                .iter()
                .all(|c| c["id"] == "chatcmpl-t1" && c["model"] == "m1")
        );
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        let text: String = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(text, "Hello");
        assert_eq!(chunks[3]["choices"][0]["finish_reason"], "length");
        assert_eq!(chunks[4]["choices"], json!([]));
        assert_eq!(chunks[4]["usage"]["total_tokens"], 5);
        assert!(chunks[..4].iter().all(|c| c["usage"].is_null()));
        // Our event ids ride along, for a resume.
        assert_eq!(events[1].id.as_deref(), Some("2"));
    }

    #[test]
    fn a_delta_passed_through_is_the_chunk_a_json_value_would_make() {
        for include_usage in [false, true] {
            for text in [
                "plain",
                "quo\"te \\ back",
                "line\nbreak\ttab",
                "\u{1} ctl",
                "é ✓ 😀",
                "</script>",
            ] {
                let mut c = Chunker::new(include_usage, 7);
                let mut out = BytesMut::new();
                c.frames(&answer()[0], &mut out);
                out.clear();
                // As the relay writes a delta.
                let (frame, _) = crate::sse::encode_delta(2, text);
                let ev = SseParser::new().feed(&frame).unwrap().remove(0);
                c.frames(&ev, &mut out);
                let fast = String::from_utf8(out.to_vec()).unwrap();
                let slow = String::from_utf8(
                    data_frame(Some("2"), &c.chunk(json!({ "content": text }), None)).to_vec(),
                )
                .unwrap();
                assert_eq!(fast, slow, "{text:?}");
            }
        }
        // Data that is not exactly `{"text": <string>}` takes the slow path.
        let mut c = Chunker::new(false, 7);
        let mut out = BytesMut::new();
        c.frames(&answer()[0], &mut out);
        out.clear();
        c.frames(&ev(2, "delta", json!({"text": "a", "x": "b"})), &mut out);
        let s = String::from_utf8(out.to_vec()).unwrap();
        let chunk: Value = serde_json::from_str(s.trim().rsplit("data: ").next().unwrap()).unwrap();
        assert_eq!(chunk["choices"][0]["delta"]["content"], "a");
    }

    #[test]
    fn without_include_usage_there_is_no_usage_chunk() {
        let mut c = Chunker::new(false, 7);
        let mut out = BytesMut::new();
        for e in answer() {
            c.frames(&e, &mut out);
        }
        let s = String::from_utf8(out.to_vec()).unwrap();
        assert!(!s.contains("usage"), "{s}");
        assert!(s.ends_with("data: [DONE]\n\n"));
    }

    #[test]
    fn a_failed_answer_is_an_error_object() {
        let mut c = Chunker::new(false, 7);
        let mut out = BytesMut::new();
        c.frames(
            &ev(
                5,
                "error",
                json!({"code": "upstream_timeout", "message": "late"}),
            ),
            &mut out,
        );
        let s = String::from_utf8(out.to_vec()).unwrap();
        assert!(
            s.contains(r#""type":"server_error""#) && !s.contains("[DONE]"),
            "{s}"
        );

        let mut all = Collected::default();
        for e in &answer()[..2] {
            all.add(e);
        }
        all.add(&ev(
            3,
            "error",
            json!({"code": "upstream_rate_limited", "message": "slow"}),
        ));
        let (status, body) = all.into_completion(1).unwrap_err();
        assert_eq!(status, 429);
        assert_eq!(body["error"]["type"], "rate_limit_error");
        assert_eq!(body["error"]["code"], "upstream_rate_limited");
    }

    #[test]
    fn a_whole_answer_is_one_completion() {
        let mut all = Collected::default();
        for e in &answer() {
            all.add(e);
        }
        let v = all.into_completion(9).unwrap();
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["choices"][0]["message"]["content"], "Hello");
        assert_eq!(v["usage"]["completion_tokens"], 2);
        assert_eq!(v["created"], 9);
        // No final event: the answer was lost.
        let mut cut = Collected::default();
        cut.add(&answer()[0]);
        assert_eq!(cut.into_completion(1).unwrap_err().0, 502);
    }
}
