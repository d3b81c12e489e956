//! Server-Sent Events, both directions.
//!
//! [`SseParser`] turns an upstream byte stream into events. Network reads cut
//! events anywhere (inside a line, inside a UTF-8 sequence, between `\r` and
//! `\n`), so the parser buffers raw bytes and only decodes complete lines.
//! It follows the WHATWG event-stream rules that matter for model APIs:
//! `event:`/`data:`/`id:` fields, multi-line `data`, comments (`:`), and
//! `\n`, `\r\n` or `\r` line endings.
//!
//! [`encode`] writes one event in the form our own clients read.

use axum::body::Body;
use axum::http::{HeaderValue, header};
use axum::response::Response;
use bytes::{BufMut, Bytes, BytesMut};
use std::fmt::Write as _;

/// One dispatched event. `event` is `"message"` when the stream named none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    pub event: String,
    pub data: String,
    pub id: Option<String>,
}

/// Incremental parser: feed it bytes as they arrive, take events as they
/// complete.
#[derive(Debug)]
pub struct SseParser {
    buf: Vec<u8>,
    /// A `\r` ended the previous chunk: a `\n` starting the next one belongs to it.
    pending_cr: bool,
    event: Option<String>,
    data: Option<String>,
    id: Option<String>,
    /// Upper bound on one buffered line, so a peer that never sends a newline
    /// cannot make us grow without limit.
    max_line: usize,
}

impl Default for SseParser {
    fn default() -> Self {
        Self::new()
    }
}

/// The stream broke the event-stream format in a way we refuse to buffer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SseError {
    #[error("an SSE line exceeded {0} bytes")]
    LineTooLong(usize),
}

impl SseParser {
    /// Lines longer than 1 MiB are rejected; model events are far smaller.
    pub fn new() -> Self {
        Self::with_max_line(1 << 20)
    }

    pub fn with_max_line(max_line: usize) -> Self {
        Self {
            buf: Vec::new(),
            pending_cr: false,
            event: None,
            data: None,
            id: None,
            max_line,
        }
    }

    /// Adds bytes from the network and returns every event they completed.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<Vec<SseEvent>, SseError> {
        let mut out = Vec::new();
        let mut rest = chunk;
        if self.pending_cr && !rest.is_empty() {
            self.pending_cr = false;
            if rest[0] == b'\n' {
                rest = &rest[1..];
            }
        }
        while let Some(pos) = rest.iter().position(|b| *b == b'\n' || *b == b'\r') {
            let line_end = rest[pos];
            self.buf.extend_from_slice(&rest[..pos]);
            let line = std::mem::take(&mut self.buf);
            self.process_line(&line, &mut out);
            rest = &rest[pos + 1..];
            if line_end == b'\r' {
                match rest.first() {
                    Some(b'\n') => rest = &rest[1..],
                    None => self.pending_cr = true,
                    Some(_) => {}
                }
            }
        }
        if self.buf.len() + rest.len() > self.max_line {
            return Err(SseError::LineTooLong(self.max_line));
        }
        self.buf.extend_from_slice(rest);
        Ok(out)
    }

    /// True when bytes of an unfinished event are buffered: the stream ended
    /// in the middle of an event.
    pub fn has_partial(&self) -> bool {
        !self.buf.is_empty() || self.data.is_some() || self.event.is_some()
    }

    fn process_line(&mut self, line: &[u8], out: &mut Vec<SseEvent>) {
        if line.is_empty() {
            // Blank line: dispatch. An event without data is dropped (spec).
            let event = self.event.take();
            let id = self.id.take();
            if let Some(data) = self.data.take() {
                out.push(SseEvent {
                    event: event.unwrap_or_else(|| "message".to_owned()),
                    data,
                    id,
                });
            }
            return;
        }
        if line[0] == b':' {
            return; // comment / keep-alive
        }
        let (field, value) = match line.iter().position(|b| *b == b':') {
            Some(i) => {
                let v = &line[i + 1..];
                let v = v.strip_prefix(b" ").unwrap_or(v);
                (&line[..i], v)
            }
            None => (line, &b""[..]),
        };
        let value = String::from_utf8_lossy(value);
        match field {
            b"event" => self.event = Some(value.into_owned()),
            b"data" => match &mut self.data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(&value);
                }
                None => self.data = Some(value.into_owned()),
            },
            b"id" => self.id = Some(value.into_owned()),
            _ => {} // `retry` and unknown fields do not concern us
        }
    }
}

/// Encodes one event. `data` must be a single line (JSON from serde is).
pub fn encode(id: Option<u64>, event: &str, data: &str) -> Bytes {
    encode_at(id, event, data).0
}

/// [`encode`], and where `data` is in the frame (to share it).
pub fn encode_at(id: Option<u64>, event: &str, data: &str) -> (Bytes, std::ops::Range<usize>) {
    let mut b = BytesMut::with_capacity(data.len() + event.len() + 40);
    let at = encode_into(&mut b, id, event, data);
    (b.freeze(), at)
}

/// [`encode`] at the end of `b`; where `data` is in `b`.
pub fn encode_into(
    b: &mut BytesMut,
    id: Option<u64>,
    event: &str,
    data: &str,
) -> std::ops::Range<usize> {
    head(b, id, event);
    let at = b.len();
    b.put_slice(data.as_bytes());
    let end = b.len();
    b.put_slice(b"\n\n");
    at..end
}

/// The frame of a `delta` event, `{"text":"..."}` with `text` escaped
/// as JSON straight into the frame, and where its data is.
pub fn encode_delta(id: u64, text: &str) -> (Bytes, std::ops::Range<usize>) {
    let mut b = BytesMut::with_capacity(text.len() + 64);
    let at = encode_delta_into(&mut b, id, text);
    (b.freeze(), at)
}

/// [`encode_delta`] at the end of `b`; where its data is in `b`.
pub fn encode_delta_into(b: &mut BytesMut, id: u64, text: &str) -> std::ops::Range<usize> {
    head(b, Some(id), "delta");
    let at = b.len();
    b.put_slice(b"{\"text\":");
    // Writing into a BytesMut cannot fail, nor can serialising a str.
    let _ = serde_json::to_writer((&mut *b).writer(), text);
    b.put_u8(b'}');
    let end = b.len();
    b.put_slice(b"\n\n");
    at..end
}

/// `id:` and `event:` lines and `data: `.
fn head(b: &mut BytesMut, id: Option<u64>, event: &str) {
    if let Some(id) = id {
        // (formatting into a BytesMut cannot fail)
        let _ = writeln!(b, "id: {id}");
    }
    b.put_slice(b"event: ");
    b.put_slice(event.as_bytes());
    b.put_slice(b"\ndata: ");
}

/// A 200 `text/event-stream` response that proxies and browsers pass on
/// unbuffered and uncached.
pub fn event_stream(body: Body) -> Response {
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-store, no-transform"),
    );
    // Tell reverse proxies (nginx and friends) not to buffer the stream.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(parser: &mut SseParser, chunks: &[&[u8]]) -> Vec<SseEvent> {
        let mut out = Vec::new();
        for c in chunks {
            out.extend(parser.feed(c).unwrap_or_default());
        }
        out
    }

    #[test]
    fn parses_named_events() {
        let mut p = SseParser::new();
        let ev = all(&mut p, &[b"event: ping\ndata: {\"type\": \"ping\"}\n\n"]);
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].event, "ping");
        assert_eq!(ev[0].data, "{\"type\": \"ping\"}");
        assert!(!p.has_partial());
    }

    #[test]
    fn every_split_point_gives_the_same_events() {
        let stream: &[u8] = "event: a\r\ndata: {\"t\":\"h\u{e9}llo\"}\r\n\r\n: keep-alive\n\nid: 7\ndata: x\ndata: y\n\nevent: b\rdata: z\r\r".as_bytes();
        let mut whole = SseParser::new();
        let expected = all(&mut whole, &[stream]);
        assert_eq!(expected.len(), 3);
        assert_eq!(expected[0].data, "{\"t\":\"h\u{e9}llo\"}");
        assert_eq!(expected[1].data, "x\ny");
        assert_eq!(expected[1].id.as_deref(), Some("7"));
        assert_eq!(expected[1].event, "message");
        assert_eq!(expected[2].event, "b");
        for i in 0..=stream.len() {
            for j in i..=stream.len() {
                let mut p = SseParser::new();
                let got = all(&mut p, &[&stream[..i], &stream[i..j], &stream[j..]]);
                assert_eq!(got, expected, "split at {i},{j}");
            }
        }
    }

    #[test]
    fn byte_at_a_time() {
        let stream = b"event: content_block_delta\ndata: {\"a\":1}\n\n";
        let mut p = SseParser::new();
        let mut got = Vec::new();
        for b in stream.iter() {
            got.extend(p.feed(std::slice::from_ref(b)).unwrap_or_default());
        }
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].event, "content_block_delta");
    }

    #[test]
    fn event_without_data_is_not_dispatched_and_partial_is_reported() {
        let mut p = SseParser::new();
        assert!(p.feed(b"event: x\n\n").unwrap_or_default().is_empty());
        assert!(p.feed(b"data: half").unwrap_or_default().is_empty());
        assert!(p.has_partial());
    }

    #[test]
    fn rejects_unbounded_lines() {
        let mut p = SseParser::with_max_line(8);
        assert_eq!(p.feed(b"data: 0123456789"), Err(SseError::LineTooLong(8)));
    }

    #[test]
    fn encode_round_trips_through_the_parser() {
        let b = encode(Some(3), "delta", "{\"text\":\"hi\"}");
        assert_eq!(&b[..], b"id: 3\nevent: delta\ndata: {\"text\":\"hi\"}\n\n");
        let mut p = SseParser::new();
        let ev = p.feed(&b).unwrap_or_default();
        assert_eq!(ev[0].id.as_deref(), Some("3"));
        assert_eq!(ev[0].event, "delta");
    }
}
