//! X-Ray without an SDK or a layer: a [`tracing_subscriber`] layer that
//! turns our spans (and the AWS SDK's operation spans under them) into
//! X-Ray subsegments and sends each trace root's document, with its
//! children nested, in one UDP datagram to the daemon Lambda runs beside
//! the function (`AWS_XRAY_DAEMON_ADDRESS`) when the root ends.
//!
//! A root is a span with a `trace_header` field (the request's span, a
//! queued turn's span in db-writer): its document is an independent
//! subsegment under the header's `Parent` (the Lambda function's segment,
//! or chat-stream's `queue_send` for a turn), or a segment of its own when
//! the header has no parent (a local run). Only `Sampled=1` traces are
//! sent; spans under an unsampled root cost no more than the span itself.

use std::net::{SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value, json};
use tracing::field::{Field, Visit};
use tracing::{Subscriber, span};
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::registry::LookupSpan;

use super::log::{ours, sdk_operation};
use super::trace::TraceHeader;

/// The daemon takes documents up to 64 KB; above this the children are
/// sent as documents of their own.
const MAX_DOC: usize = 60_000;

/// Where documents go.
#[derive(Clone)]
pub enum Sink {
    Udp(Arc<UdpSocket>, SocketAddr),
    /// Tests: the documents as sent.
    Memory(Arc<Mutex<Vec<String>>>),
}

impl Sink {
    /// A socket to the daemon at `to`.
    pub fn udp(to: SocketAddr) -> std::io::Result<Sink> {
        let bind: SocketAddr = if to.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let socket = UdpSocket::bind(bind)?;
        socket.set_nonblocking(true)?;
        Ok(Sink::Udp(Arc::new(socket), to))
    }

    fn send(&self, doc: &str) {
        match self {
            Sink::Udp(socket, to) => {
                let mut msg = String::with_capacity(doc.len() + 32);
                msg.push_str("{\"format\":\"json\",\"version\":1}\n");
                msg.push_str(doc);
                // Best effort, like every X-Ray SDK: a full buffer or no
                // daemon drops the document, never the request.
                let _ = socket.send_to(msg.as_bytes(), to);
            }
            Sink::Memory(m) => {
                if let Ok(mut v) = m.lock() {
                    v.push(doc.to_owned());
                }
            }
        }
    }
}

/// `AWS_XRAY_DAEMON_ADDRESS`: `host:port`, or `tcp:host:port udp:host:port`
/// (Lambda's form); the UDP address.
pub fn daemon_address(v: &str) -> Option<SocketAddr> {
    let udp = v
        .split_whitespace()
        .find_map(|p| p.strip_prefix("udp:"))
        .or_else(|| (!v.contains("tcp:")).then_some(v.trim()))?;
    use std::net::ToSocketAddrs;
    udp.to_socket_addrs().ok()?.next()
}

/// One span on its way to a document. Kept small: it is made for every
/// span of a sampled request, on the path to the first token.
pub(crate) struct SpanRec {
    id: u64,
    /// Set on a root: the trace it belongs to.
    header: Option<TraceHeader>,
    /// Its document will be sent (a sampled root, or under one).
    live: bool,
    name: &'static str,
    start: f64,
    sdk: Option<(String, String)>,
    annotations: Vec<(&'static str, Value)>,
    fault: bool,
    /// Set when it ends.
    end: f64,
    /// Its ended children, kept as records: the JSON is built once, when
    /// the root ends (after the answer), not on the path to the first
    /// token.
    children: Vec<SpanRec>,
}

impl SpanRec {
    /// Its (sub)segment id: 16 hex digits.
    pub(crate) fn segment_id(&self) -> String {
        format!("{:016x}", self.id)
    }
}

fn epoch_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

pub struct XRayLayer {
    sink: Sink,
    /// The segment name of a root with no parent (a local run).
    service: String,
}

impl XRayLayer {
    pub fn new(sink: Sink, service: &str) -> XRayLayer {
        XRayLayer {
            sink,
            service: service.to_owned(),
        }
    }
}

/// A span's fields: the trace header, the SDK's service and operation,
/// and the rest as annotations (our spans never carry text or secrets).
#[derive(Default)]
struct Fields {
    header: Option<String>,
    service: Option<String>,
    method: Option<String>,
    annotations: Vec<(&'static str, Value)>,
    fault: bool,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "trace_header" => self.header = Some(value.to_owned()),
            "rpc.service" => self.service = Some(value.to_owned()),
            "rpc.method" => self.method = Some(value.to_owned()),
            "rpc.system" | "sdk_invocation_id" => {}
            name => {
                if name == "error_code" {
                    self.fault = true;
                }
                self.annotations.push((name, value.into()));
            }
        }
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.record_str(field, &format!("{value:?}"));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.annotations.push((field.name(), value.into()));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.annotations.push((field.name(), value.into()));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.annotations.push((field.name(), value.into()));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.annotations.push((field.name(), value.into()));
    }
}

impl<S> Layer<S> for XRayLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, ctx: Context<'_, S>) {
        let m = attrs.metadata();
        if !ours(m) && !sdk_operation(m) {
            return;
        }
        let Some(span) = ctx.span(id) else { return };
        let can_root = m.fields().field("trace_header").is_some();
        let parent_live = span
            .parent()
            .and_then(|p| p.extensions().get::<SpanRec>().map(|r| r.live))
            .unwrap_or(false);
        if !can_root && !parent_live {
            return;
        }
        let mut f = Fields::default();
        attrs.record(&mut f);
        let header = f.header.as_deref().and_then(TraceHeader::parse);
        // A root-to-be without its header yet hangs under its parent
        // until one is recorded (see `on_record`).
        let live = header.as_ref().map_or(parent_live, |h| h.sampled);
        let rec = SpanRec {
            id: fastrand::u64(1..),
            live,
            header,
            name: m.name(),
            start: epoch_secs(),
            sdk: f.service.zip(f.method),
            annotations: f.annotations,
            fault: f.fault,
            end: 0.0,
            children: Vec::new(),
        };
        span.extensions_mut().insert(rec);
    }

    fn on_record(&self, id: &span::Id, values: &span::Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut ext = span.extensions_mut();
        let Some(rec) = ext.get_mut::<SpanRec>() else {
            return;
        };
        let mut f = Fields::default();
        values.record(&mut f);
        if let Some(h) = f.header.as_deref().and_then(TraceHeader::parse) {
            rec.live = h.sampled;
            rec.header = Some(h);
        }
        rec.fault |= f.fault;
        rec.annotations.extend(f.annotations);
    }

    fn on_close(&self, id: span::Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else { return };
        let Some(mut rec) = span.extensions_mut().remove::<SpanRec>() else {
            return;
        };
        if !rec.live {
            return;
        }
        rec.end = epoch_secs();
        if rec.header.is_some() {
            self.send_root(rec);
            return;
        }
        let doc = rec;
        if let Some(parent) = span.parent() {
            if let Some(p) = parent.extensions_mut().get_mut::<SpanRec>() {
                p.children.push(doc);
            }
        }
    }
}

/// The (sub)segment fields of `rec`, with its children nested.
fn document(rec: SpanRec) -> Value {
    let mut d = Map::new();
    d.insert("id".into(), rec.segment_id().into());
    d.insert("start_time".into(), rec.start.into());
    d.insert("end_time".into(), rec.end.into());
    match rec.sdk {
        Some((service, method)) => {
            d.insert("name".into(), service.into());
            d.insert("namespace".into(), "aws".into());
            d.insert("aws".into(), json!({ "operation": method }));
        }
        None => {
            d.insert("name".into(), rec.name.into());
        }
    }
    if !rec.annotations.is_empty() {
        // X-Ray annotation keys: letters, digits and underscores.
        let a: Map<String, Value> = rec
            .annotations
            .into_iter()
            .map(|(k, v)| (k.replace('.', "_"), v))
            .collect();
        d.insert("annotations".into(), Value::Object(a));
    }
    if rec.fault {
        d.insert("fault".into(), true.into());
    }
    if !rec.children.is_empty() {
        let children = rec.children.into_iter().map(document).collect();
        d.insert("subsegments".into(), Value::Array(children));
    }
    Value::Object(d)
}

impl XRayLayer {
    fn send_root(&self, mut rec: SpanRec) {
        let Some(header) = rec.header.take() else {
            return;
        };
        let id = rec.segment_id();
        let mut root = document(rec);
        root["trace_id"] = header.root.clone().into();
        match header.parent.as_deref() {
            Some(p) => {
                root["type"] = "subsegment".into();
                root["parent_id"] = p.into();
            }
            // A trace we started: a segment of our own.
            None => root["name"] = self.service.clone().into(),
        }
        let text = root.to_string();
        if text.len() <= MAX_DOC {
            self.sink.send(&text);
            return;
        }
        let children = root
            .as_object_mut()
            .and_then(|o| o.remove("subsegments"))
            .unwrap_or_default();
        self.sink.send(&root.to_string());
        for mut child in children.as_array().cloned().unwrap_or_default() {
            child["trace_id"] = header.root.clone().into();
            child["type"] = "subsegment".into();
            child["parent_id"] = id.clone().into();
            self.sink.send(&child.to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn daemon_addresses_in_both_forms() {
        assert_eq!(
            daemon_address("169.254.79.129:2000"),
            Some(([169, 254, 79, 129], 2000).into())
        );
        assert_eq!(
            daemon_address("tcp:127.0.0.1:2000 udp:127.0.0.2:2001"),
            Some(([127, 0, 0, 2], 2001).into())
        );
        assert_eq!(daemon_address("not an address"), None);
    }
}
