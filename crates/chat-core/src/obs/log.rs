//! The JSON log lines, written by our own [`Layer`] so every line under a
//! request carries its request id, trace id and pseudonymous user, and
//! the global filter in one place: events at `LOG_LEVEL` or above, plus
//! our own spans (always: they carry the context and feed X-Ray) and, when
//! X-Ray is on, the AWS SDK's operation spans.

use std::io::Write;
use std::sync::{Arc, Mutex};

use tracing::field::{Field, Visit};
use tracing::level_filters::LevelFilter;
use tracing::subscriber::Interest;
use tracing::{Event, Level, Metadata, Subscriber, span};
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::registry::LookupSpan;

use super::trace::TraceHeader;

/// Where the lines go: stdout (CloudWatch Logs in Lambda), or a buffer in
/// tests.
#[derive(Clone)]
pub enum LogOut {
    Stdout,
    Memory(Arc<Mutex<Vec<String>>>),
    /// Any writer (a bench writes to `/dev/null`).
    Writer(Arc<Mutex<Box<dyn Write + Send>>>),
}

impl LogOut {
    pub(crate) fn write_line(&self, line: &[u8]) {
        match self {
            LogOut::Stdout => {
                let held = HELD.with(|h| {
                    let mut h = h.borrow_mut();
                    let Some(buf) = h.as_mut() else {
                        return false;
                    };
                    buf.extend_from_slice(line);
                    buf.push(b'\n');
                    true
                });
                if !held {
                    let mut out = std::io::stdout().lock();
                    let _ = out.write_all(line);
                    let _ = out.write_all(b"\n");
                }
            }
            LogOut::Memory(m) => {
                if let Ok(mut v) = m.lock() {
                    v.push(String::from_utf8_lossy(line).into_owned());
                }
            }
            LogOut::Writer(w) => {
                if let Ok(mut w) = w.lock() {
                    let _ = w.write_all(line);
                    let _ = w.write_all(b"\n");
                }
            }
        }
    }
}

thread_local! {
    /// Lines for stdout held by [`together`] on this thread.
    static HELD: std::cell::RefCell<Option<Vec<u8>>> = const { std::cell::RefCell::new(None) };
}

/// Runs `f` (synchronous: nothing else runs on this thread meanwhile) and
/// writes the stdout lines it made in one write: a request's log line and
/// its metrics line are one system call, not two. A `together` inside
/// another adds to the outer one's.
pub fn together<R>(f: impl FnOnce() -> R) -> R {
    /// Writes the held lines when the outermost `together` ends, also if
    /// `f` unwinds (later lines on this thread must not stay held).
    struct Release;
    impl Drop for Release {
        fn drop(&mut self) {
            let lines = HELD.with(|h| h.borrow_mut().take());
            if let Some(lines) = lines.filter(|l| !l.is_empty()) {
                let _ = std::io::stdout().lock().write_all(&lines);
            }
        }
    }
    let outer = HELD.with(|h| {
        let mut h = h.borrow_mut();
        if h.is_some() {
            return false;
        }
        *h = Some(Vec::new());
        true
    });
    let _release = outer.then_some(Release);
    f()
}

/// The context a span gives every line under it.
#[derive(Debug, Default, Clone)]
pub(crate) struct LogFields {
    pub request_id: Option<String>,
    pub trace: Option<TraceHeader>,
    pub user: Option<String>,
}

impl LogFields {
    fn merge(&mut self, other: LogFields) {
        if other.request_id.is_some() {
            self.request_id = other.request_id;
        }
        if other.trace.is_some() {
            self.trace = other.trace;
        }
        if other.user.is_some() {
            self.user = other.user;
        }
    }

    fn any(&self) -> bool {
        self.request_id.is_some() || self.trace.is_some() || self.user.is_some()
    }
}

impl Visit for LogFields {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "request_id" => self.request_id = Some(value.to_owned()),
            "trace_header" | "xrayTraceId" => self.trace = TraceHeader::parse(value),
            "user" => self.user = Some(value.to_owned()),
            _ => {}
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if matches!(
            field.name(),
            "request_id" | "trace_header" | "xrayTraceId" | "user"
        ) {
            self.record_str(field, &format!("{value:?}"));
        }
    }
}

/// Whether a span's target is our code (its spans are always on).
pub(crate) fn ours(m: &Metadata<'_>) -> bool {
    m.target().starts_with("chat_core")
}

/// The AWS SDK's per-operation span (`DynamoDB.GetItem`, debug level).
pub(crate) fn sdk_operation(m: &Metadata<'_>) -> bool {
    m.is_span() && m.target().starts_with("aws_sdk_") && m.name().contains('.')
}

pub struct LogLayer {
    level: Level,
    sdk_spans: bool,
    out: LogOut,
}

impl LogLayer {
    /// `sdk_spans`: also enable the AWS SDK's operation spans (for X-Ray).
    pub fn new(level: Level, sdk_spans: bool, out: LogOut) -> LogLayer {
        LogLayer {
            level,
            sdk_spans,
            out,
        }
    }

    fn wanted(&self, m: &Metadata<'_>) -> bool {
        if m.is_span() && (ours(m) || m.target().starts_with("lambda_runtime")) {
            return true;
        }
        if self.sdk_spans && sdk_operation(m) {
            return true;
        }
        m.level() <= &self.level
    }
}

impl<S> Layer<S> for LogLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn register_callsite(&self, m: &'static Metadata<'static>) -> Interest {
        if self.wanted(m) {
            Interest::always()
        } else {
            Interest::never()
        }
    }

    fn enabled(&self, m: &Metadata<'_>, _: Context<'_, S>) -> bool {
        self.wanted(m)
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        let spans = if self.sdk_spans {
            LevelFilter::DEBUG
        } else {
            LevelFilter::INFO
        };
        Some(std::cmp::max(LevelFilter::from_level(self.level), spans))
    }

    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, ctx: Context<'_, S>) {
        let m = attrs.metadata();
        if !ours(m) && !m.target().starts_with("lambda_runtime") {
            return;
        }
        let mut f = LogFields::default();
        attrs.record(&mut f);
        if f.any() {
            if let Some(span) = ctx.span(id) {
                span.extensions_mut().insert(f);
            }
        }
    }

    fn on_record(&self, id: &span::Id, values: &span::Record<'_>, ctx: Context<'_, S>) {
        let mut f = LogFields::default();
        values.record(&mut f);
        if !f.any() {
            return;
        }
        if let Some(span) = ctx.span(id) {
            let mut ext = span.extensions_mut();
            match ext.get_mut::<LogFields>() {
                Some(have) => have.merge(f),
                None => ext.insert(f),
            }
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let m = event.metadata();
        if m.level() > &self.level {
            return;
        }
        let mut fields = EventFields::default();
        event.record(&mut fields);
        // The nearest span's value of each context field wins.
        let mut cx = LogFields::default();
        if let Some(scope) = ctx.event_scope(event) {
            for span in scope {
                if let Some(f) = span.extensions().get::<LogFields>() {
                    if cx.request_id.is_none() {
                        cx.request_id.clone_from(&f.request_id);
                    }
                    if cx.trace.is_none() {
                        cx.trace.clone_from(&f.trace);
                    }
                    if cx.user.is_none() {
                        cx.user.clone_from(&f.user);
                    }
                }
            }
        }
        // Written straight into one buffer (no value per field).
        let mut line: Vec<u8> = Vec::with_capacity(512);
        line.extend_from_slice(b"{\"timestamp\":\"");
        line.extend_from_slice(crate::util::rfc3339(crate::util::now_ms()).as_bytes());
        line.extend_from_slice(b"\",\"level\":\"");
        line.extend_from_slice(m.level().as_str().as_bytes());
        line.push(b'"');
        let mut put = |k: &str, v: &dyn erased::Json| {
            line.push(b',');
            let _ = serde_json::to_writer(&mut line, k);
            line.push(b':');
            v.write(&mut line);
        };
        if let Some(msg) = &fields.message {
            put("message", &msg.as_str());
        }
        let has = |k: &str| fields.values.iter().any(|(n, _)| *n == k);
        let context = [
            ("request_id", cx.request_id),
            ("trace_id", cx.trace.map(|t| t.root)),
            ("user", cx.user),
        ];
        for (k, v) in context {
            if let Some(v) = v.filter(|_| !has(k)) {
                put(k, &v.as_str());
            }
        }
        for (k, v) in &fields.values {
            put(k, v);
        }
        line.push(b'}');
        self.out.write_line(&line);
    }
}

#[derive(Default)]
struct EventFields {
    message: Option<String>,
    values: Vec<(&'static str, serde_json::Value)>,
}

impl Visit for EventFields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message = Some(value.to_owned());
        } else {
            self.values.push((field.name(), value.into()));
        }
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.record_str(field, &format!("{value:?}"));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.values.push((field.name(), value.into()));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.values.push((field.name(), value.into()));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.values.push((field.name(), value.into()));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.values.push((field.name(), value.into()));
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.record_str(field, &value.to_string());
    }
}

/// A value written as JSON into a buffer.
mod erased {
    pub trait Json {
        fn write(&self, out: &mut Vec<u8>);
    }
    impl Json for &str {
        fn write(&self, out: &mut Vec<u8>) {
            let _ = serde_json::to_writer(out, self);
        }
    }
    impl Json for serde_json::Value {
        fn write(&self, out: &mut Vec<u8>) {
            let _ = serde_json::to_writer(out, self);
        }
    }
}
