//! Reading an SSE response the way a browser would, keeping each event's
//! arrival time. Written independently of chat-core's parser, so a parser
//! bug cannot hide on both sides of a test.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::Value;

/// One SSE event as a client saw it.
#[derive(Debug, Clone)]
pub struct Event {
    pub id: Option<String>,
    pub event: String,
    pub data: Value,
    /// When its last byte arrived.
    pub at: Instant,
}

impl Event {
    pub fn text(&self) -> &str {
        self.data["text"].as_str().unwrap_or("")
    }
}

/// Parses complete events out of `buf`, leaving any partial event in it.
pub fn take_events(buf: &mut String, at: Instant, out: &mut Vec<Event>) {
    while let Some(end) = buf.find("\n\n") {
        let block: String = buf.drain(..end + 2).collect();
        let mut ev = Event {
            id: None,
            event: "message".into(),
            data: Value::Null,
            at,
        };
        let mut data = String::new();
        for line in block.lines() {
            if let Some(v) = line.strip_prefix("event: ") {
                ev.event = v.to_owned();
            } else if let Some(v) = line.strip_prefix("data: ") {
                data.push_str(v);
            } else if let Some(v) = line.strip_prefix("id: ") {
                ev.id = Some(v.to_owned());
            }
        }
        ev.data = serde_json::from_str(&data).unwrap_or(Value::String(data));
        out.push(ev);
    }
}

/// Reads the whole SSE body; gives up (panics) after `limit`, so a hang
/// fails the test instead of stalling it.
pub async fn read_sse(resp: reqwest::Response, limit: Duration) -> (Vec<Event>, Option<String>) {
    let mut stream = resp.bytes_stream();
    let mut buf = String::new();
    let mut events = Vec::new();
    let mut error = None;
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Err(_) => panic!("SSE stream did not end within {limit:?}; got {events:?}"),
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                error = Some(e.to_string());
                break;
            }
            Ok(Some(Ok(bytes))) => {
                buf.push_str(std::str::from_utf8(&bytes).expect("utf-8 SSE"));
                take_events(&mut buf, Instant::now(), &mut events);
            }
        }
    }
    assert!(
        buf.trim().is_empty(),
        "bytes left after the last event: {buf:?}"
    );
    (events, error)
}

/// A response body being read piece by piece (to stop part-way).
pub type BodyStream = futures_util::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>;

/// Starts reading `resp`'s body piece by piece.
pub fn body_stream(resp: reqwest::Response) -> BodyStream {
    futures_util::StreamExt::boxed(resp.bytes_stream())
}

/// The rest of `stream` as text, read for at most `limit`; `true` when
/// the body ended within it.
pub async fn read_rest(mut stream: BodyStream, limit: Duration) -> (String, bool) {
    let mut out = String::new();
    let read = async {
        while let Some(b) = futures_util::StreamExt::next(&mut stream).await {
            out.push_str(&String::from_utf8_lossy(&b.expect("body read")));
        }
    };
    let ended = tokio::time::timeout(limit, read).await.is_ok();
    (out, ended)
}

/// Reads SSE from `stream` until `n` delta events have arrived; gives the
/// events so far and the id of the last one (0 if it had none).
pub async fn read_deltas(stream: &mut BodyStream, n: usize) -> (Vec<Event>, u64) {
    let mut buf = String::new();
    let mut events = Vec::new();
    let at = Instant::now();
    while events
        .iter()
        .filter(|e: &&Event| e.event == "delta")
        .count()
        < n
    {
        let b = futures_util::StreamExt::next(stream)
            .await
            .expect("the stream ended before enough deltas")
            .expect("body read");
        buf.push_str(std::str::from_utf8(&b).expect("UTF-8"));
        take_events(&mut buf, at, &mut events);
    }
    let last = events
        .last()
        .and_then(|e| e.id.as_deref())
        .and_then(|id| id.parse().ok())
        .unwrap_or(0);
    (events, last)
}

/// The concatenated text of all `delta` events.
pub fn answer_text(events: &[Event]) -> String {
    events
        .iter()
        .filter(|e| e.event == "delta")
        .map(Event::text)
        .collect()
}

/// The event names of a stream, in order.
pub fn kinds(events: &[Event]) -> Vec<&str> {
    events.iter().map(|e| e.event.as_str()).collect()
}
