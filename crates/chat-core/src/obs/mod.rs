//! Observability, all from the `tracing` spans the code opens for each
//! phase (`auth`, `validate`, `limits`, `history`, `cache_lookup`, `lead`,
//! `follow`, `upstream_connect`, `first_token`, `stream`, `persist`, ...):
//!
//! - [`log`]: one JSON object per line, each carrying the request id,
//!   trace id and pseudonymous user of the span it was written under.
//! - [`xray`]: the spans as X-Ray subsegments, sent to the Lambda X-Ray
//!   daemon over UDP (no SDK, no layer; see README "Tracing").
//! - [`emf`]: metrics as CloudWatch Embedded Metric Format lines.
//! - [`pseudonym`]: the keyed HMAC that stands for a user id.
//! - [`trace`]: the X-Ray trace header, in from Lambda and out on SQS.
//!
//! A leaf: uses `config` readers and `secrets` only.

pub mod emf;
pub mod log;
pub mod pseudonym;
pub mod trace;
pub mod xray;

use std::net::SocketAddr;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;

use crate::config::source::Reader;
use crate::config::{ConfigError, ConfigSource};
use crate::secrets::Secret;
pub use log::LogOut;
pub use trace::TraceHeader;
pub use xray::Sink;

/// The observability settings every binary reads.
#[derive(Debug, Clone)]
pub struct ObsConfig {
    pub level: tracing::Level,
    /// `METRICS_ENABLED` (default true): EMF lines.
    pub metrics: bool,
    /// `METRICS_NAMESPACE` (default `ChatRelay`).
    pub namespace: String,
    /// `AWS_XRAY_DAEMON_ADDRESS` (Lambda sets it when tracing is active),
    /// unless `XRAY_ENABLED=false`.
    pub xray_daemon: Option<SocketAddr>,
    /// `LOG_USER_KEY`: the pseudonym key.
    pub user_key: Option<Secret>,
    /// `LOG_USER_KEY_SECRET_ARN`: the pseudonym key in Secrets Manager.
    pub user_key_arn: Option<String>,
}

impl ObsConfig {
    pub fn from_source(src: &(impl ConfigSource + ?Sized)) -> Result<ObsConfig, ConfigError> {
        let r = Reader(src);
        let xray_daemon = match r.string("AWS_XRAY_DAEMON_ADDRESS") {
            Some(v) if r.bool("XRAY_ENABLED", true)? => Some(
                xray::daemon_address(&v)
                    .ok_or_else(|| ConfigError::new("AWS_XRAY_DAEMON_ADDRESS", "not host:port"))?,
            ),
            _ => None,
        };
        let namespace = r
            .string("METRICS_NAMESPACE")
            .unwrap_or_else(|| "ChatRelay".to_owned());
        if namespace.is_empty() || namespace.len() > 255 {
            return Err(ConfigError::new("METRICS_NAMESPACE", "1 to 255 characters"));
        }
        Ok(ObsConfig {
            level: r.parse(
                "LOG_LEVEL",
                tracing::Level::INFO,
                "one of error, warn, info, debug, trace",
            )?,
            metrics: r.bool("METRICS_ENABLED", true)?,
            namespace,
            xray_daemon,
            user_key: r
                .string("LOG_USER_KEY")
                .filter(|k| !k.is_empty())
                .map(Secret::new),
            user_key_arn: r
                .string("LOG_USER_KEY_SECRET_ARN")
                .filter(|k| !k.is_empty()),
        })
    }
}

/// The subscriber: the log layer, and the X-Ray layer when `xray` is set.
pub fn subscriber(
    level: tracing::Level,
    out: LogOut,
    xray: Option<(Sink, &str)>,
) -> impl tracing::Subscriber + for<'a> LookupSpan<'a> + Send + Sync {
    let on = xray.is_some();
    tracing_subscriber::registry()
        .with(log::LogLayer::new(level, on, out))
        .with(xray.map(|(sink, service)| xray::XRayLayer::new(sink, service)))
}

/// Installs the global subscriber and the metrics settings for `function`
/// (later calls do nothing, which tests rely on). Returns whether X-Ray
/// documents will be sent.
pub fn init(function: &str, cfg: &ObsConfig) -> bool {
    emf::configure(&cfg.namespace, function, LogOut::Stdout);
    emf::set_enabled(cfg.metrics);
    if let Some(k) = &cfg.user_key {
        pseudonym::set_key(k.expose().as_bytes());
    }
    let sink = cfg.xray_daemon.and_then(|a| Sink::udp(a).ok());
    let on = sink.is_some();
    let _ = tracing::subscriber::set_global_default(subscriber(
        cfg.level,
        LogOut::Stdout,
        sink.map(|s| (s, function)),
    ));
    on
}

type KeyLoad = tokio::task::JoinHandle<Result<(), ConfigError>>;

static KEY_LOAD: std::sync::Mutex<Option<KeyLoad>> = std::sync::Mutex::new(None);

/// Starts reading the pseudonym key from Secrets Manager when only its ARN
/// is set, on a task of its own, so it overlaps the rest of init (the
/// model key, Redis, the table client); [`user_key_ready`] waits for it.
pub fn start_user_key(cfg: &ObsConfig) {
    if cfg.user_key.is_some() {
        return;
    }
    let Some(arn) = cfg.user_key_arn.clone() else {
        tracing::warn!(
            "neither LOG_USER_KEY nor LOG_USER_KEY_SECRET_ARN is set: user pseudonyms in the logs use a key of this process only"
        );
        return;
    };
    let task = tokio::spawn(async move {
        let source = crate::secrets::ApiKeySource::SecretsManager {
            arn,
            var: "LOG_USER_KEY_SECRET_ARN".into(),
        };
        let key = crate::secrets::resolve_api_key(&source).await?;
        pseudonym::set_key(key.expose().as_bytes());
        Ok(())
    });
    if let Ok(mut slot) = KEY_LOAD.lock() {
        *slot = Some(task);
    }
}

/// Waits for the key [`start_user_key`] is reading (before the first
/// request is served); at once when there is none.
pub async fn user_key_ready() -> Result<(), ConfigError> {
    let task = KEY_LOAD.lock().ok().and_then(|mut s| s.take());
    match task {
        Some(t) => t.await.unwrap_or_else(|e| {
            Err(ConfigError::new(
                "LOG_USER_KEY_SECRET_ARN",
                format!("reading the key failed: {e}"),
            ))
        }),
        None => Ok(()),
    }
}

/// The trace header for a call made from the current span (an SQS
/// message's `AWSTraceHeader`): the request's trace, with the current
/// span's subsegment as the parent when it is traced. `None` outside a
/// traced request.
pub fn outgoing_trace_header() -> Option<String> {
    let id = tracing::Span::current().id()?;
    tracing::dispatcher::get_default(|d| {
        let reg = d.downcast_ref::<tracing_subscriber::Registry>()?;
        let span = reg.span(&id)?;
        let mut parent = None;
        for s in span.scope() {
            let ext = s.extensions();
            if parent.is_none() {
                parent = ext.get::<xray::SpanRec>().map(xray::SpanRec::segment_id);
            }
            if let Some(h) = ext.get::<log::LogFields>().and_then(|f| f.trace.clone()) {
                let parent = parent.or(h.parent.clone())?;
                return Some(h.child(&parent));
            }
        }
        None
    })
}

/// The request id, trace id and pseudonymous user of the current span,
/// for a metrics line (Logs Insights groups tokens by user with them).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CurrentIds {
    pub request_id: Option<String>,
    pub trace_id: Option<String>,
    pub user: Option<String>,
}

pub fn current_ids() -> CurrentIds {
    let mut ids = CurrentIds::default();
    let Some(id) = tracing::Span::current().id() else {
        return ids;
    };
    tracing::dispatcher::get_default(|d| {
        let Some(span) = d
            .downcast_ref::<tracing_subscriber::Registry>()
            .and_then(|reg| reg.span(&id))
        else {
            return;
        };
        for s in span.scope() {
            if let Some(f) = s.extensions().get::<log::LogFields>() {
                if ids.request_id.is_none() {
                    ids.request_id.clone_from(&f.request_id);
                }
                if ids.trace_id.is_none() {
                    ids.trace_id = f.trace.as_ref().map(|t| t.root.clone());
                }
                if ids.user.is_none() {
                    ids.user.clone_from(&f.user);
                }
            }
        }
    });
    ids
}
