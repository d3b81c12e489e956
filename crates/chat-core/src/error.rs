//! Errors: [`UpstreamError`] for everything a model provider can do wrong,
//! [`ApiError`] for what our own client sees (status + JSON body), and
//! [`ConfigError`] for a setting that is missing or malformed. A leaf.
//!
//! The mapping from upstream trouble to our status codes is documented in
//! README ("Errors") and kept in one place: [`UpstreamError::status_code`].

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// A configuration value was missing or malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("configuration {variable}: {problem}")]
pub struct ConfigError {
    pub variable: String,
    pub problem: String,
}

impl ConfigError {
    pub fn new(variable: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            variable: variable.into(),
            problem: problem.into(),
        }
    }
}

/// Which deadline fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeoutKind {
    /// TCP/TLS connect to the provider.
    Connect,
    /// No text from the model within the first-token deadline.
    FirstToken,
    /// No bytes from the model for too long in the middle of an answer.
    Idle,
    /// The whole answer took too long.
    Total,
}

impl std::fmt::Display for TimeoutKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TimeoutKind::Connect => "connect",
            TimeoutKind::FirstToken => "first token",
            TimeoutKind::Idle => "idle gap between chunks",
            TimeoutKind::Total => "total",
        })
    }
}

/// Anything that went wrong talking to a model provider.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The provider answered with an HTTP error status.
    #[error("upstream answered HTTP {status} ({kind}): {message}")]
    Status {
        status: u16,
        /// Provider's error type, e.g. `overloaded_error`.
        kind: String,
        message: String,
        retry_after: Option<Duration>,
    },
    /// The provider sent an `error` event inside a 200 stream.
    #[error("upstream stream error ({kind}): {message}")]
    StreamEvent { kind: String, message: String },
    #[error("could not reach upstream")]
    Connect(#[source] reqwest::Error),
    /// Like `Connect`, from a transport that is not ours (the AWS SDK's).
    #[error("could not reach upstream: {0}")]
    Unreachable(String),
    #[error("upstream timed out ({0})")]
    Timeout(TimeoutKind),
    #[error("upstream connection failed mid-stream")]
    Transport(#[source] reqwest::Error),
    #[error("upstream closed the stream before the answer was complete")]
    Truncated,
    #[error("upstream sent data we could not understand: {0}")]
    Protocol(String),
    /// The answer we followed lost events on its way through Redis.
    #[error("the followed answer's live stream lost events")]
    StreamLost,
    /// Every model we could try has its circuit open.
    #[error("the model's circuit breaker is open after repeated failures")]
    CircuitOpen,
}

/// Every code [`UpstreamError::code`] gives.
const UPSTREAM_CODES: &[&str] = &[
    "upstream_rejected_request",
    "upstream_auth_failed",
    "model_not_found",
    "upstream_request_too_large",
    "upstream_rate_limited",
    "upstream_overloaded",
    "upstream_error",
    "upstream_unreachable",
    "upstream_timeout",
    "upstream_disconnected",
    "upstream_protocol_error",
    "upstream_circuit_open",
    "stream_lost",
];

/// The code `s` names when it is one of ours (as read back from another
/// instance's error), else `upstream_error`.
pub fn upstream_code(s: &str) -> &'static str {
    UPSTREAM_CODES
        .iter()
        .find(|c| **c == s)
        .copied()
        .unwrap_or("upstream_error")
}

impl UpstreamError {
    /// A short stable code for clients and logs.
    pub fn code(&self) -> &'static str {
        match self {
            UpstreamError::Status { status, .. } => match status {
                400 => "upstream_rejected_request",
                401 | 403 => "upstream_auth_failed",
                404 => "model_not_found",
                413 => "upstream_request_too_large",
                429 => "upstream_rate_limited",
                529 => "upstream_overloaded",
                _ => "upstream_error",
            },
            UpstreamError::StreamEvent { kind, .. } => match kind.as_str() {
                "overloaded_error" => "upstream_overloaded",
                "rate_limit_error" => "upstream_rate_limited",
                "invalid_request_error" => "upstream_rejected_request",
                _ => "upstream_error",
            },
            UpstreamError::Connect(_) | UpstreamError::Unreachable(_) => "upstream_unreachable",
            UpstreamError::Timeout(_) => "upstream_timeout",
            UpstreamError::Transport(_) | UpstreamError::Truncated => "upstream_disconnected",
            UpstreamError::Protocol(_) => "upstream_protocol_error",
            UpstreamError::CircuitOpen => "upstream_circuit_open",
            UpstreamError::StreamLost => "stream_lost",
        }
    }

    /// The status our client gets when this happens before the stream starts.
    ///
    /// Upstream auth failures are *our* misconfiguration, so they become 502,
    /// never 401 (which would tell the caller their own credentials are bad).
    pub fn status_code(&self) -> StatusCode {
        match self {
            UpstreamError::Status { status, .. } => match status {
                400 | 404 => StatusCode::BAD_REQUEST,
                413 => StatusCode::PAYLOAD_TOO_LARGE,
                429 => StatusCode::TOO_MANY_REQUESTS,
                503 | 529 => StatusCode::SERVICE_UNAVAILABLE,
                504 => StatusCode::GATEWAY_TIMEOUT,
                _ => StatusCode::BAD_GATEWAY,
            },
            UpstreamError::StreamEvent { kind, .. } => match kind.as_str() {
                "overloaded_error" => StatusCode::SERVICE_UNAVAILABLE,
                "rate_limit_error" => StatusCode::TOO_MANY_REQUESTS,
                "invalid_request_error" => StatusCode::BAD_REQUEST,
                _ => StatusCode::BAD_GATEWAY,
            },
            UpstreamError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            UpstreamError::CircuitOpen => StatusCode::SERVICE_UNAVAILABLE,
            UpstreamError::Connect(_)
            | UpstreamError::Unreachable(_)
            | UpstreamError::Transport(_)
            | UpstreamError::Truncated
            | UpstreamError::StreamLost
            | UpstreamError::Protocol(_) => StatusCode::BAD_GATEWAY,
        }
    }

    /// Whether trying again (later, or elsewhere) may succeed.
    /// The provider refused our credentials (401/403): the key may have
    /// been rotated.
    pub fn is_auth_rejection(&self) -> bool {
        matches!(
            self,
            UpstreamError::Status {
                status: 401 | 403,
                ..
            }
        )
    }

    pub fn retryable(&self) -> bool {
        match self {
            UpstreamError::Status { status, .. } => {
                matches!(status, 408 | 409 | 429 | 500..=599)
            }
            UpstreamError::StreamEvent { kind, .. } => matches!(
                kind.as_str(),
                "overloaded_error" | "api_error" | "rate_limit_error" | "timeout_error"
            ),
            UpstreamError::Connect(_)
            | UpstreamError::Unreachable(_)
            | UpstreamError::Timeout(_)
            | UpstreamError::Transport(_)
            | UpstreamError::Truncated
            | UpstreamError::StreamLost
            | UpstreamError::CircuitOpen => true,
            UpstreamError::Protocol(_) => false,
        }
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            UpstreamError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// What a client is told: a fixed sentence per code, never the
    /// provider's own text (it can name the account or organisation, echo
    /// key fragments or carry SDK debug output, up to 64 KiB). The details
    /// go to the log.
    pub fn client_message(&self) -> String {
        let fixed = match self.code() {
            "upstream_rejected_request" => "the model provider rejected the request",
            "upstream_auth_failed" => "the model provider rejected this service's credentials",
            "model_not_found" => "the model provider does not know this model",
            "upstream_request_too_large" => "the request is too large for the model",
            "upstream_rate_limited" => {
                "the model provider is rate limiting this service; retry later"
            }
            "upstream_overloaded" => "the model provider is overloaded; retry later",
            "upstream_unreachable" => "the model provider could not be reached",
            "upstream_disconnected" => "the connection to the model provider broke off",
            "upstream_protocol_error" => "the model provider sent a response we could not read",
            "stream_lost" => "the answer stopped before it was complete; ask again",
            "upstream_circuit_open" => {
                "the model is failing repeatedly and is paused for a moment; retry later"
            }
            _ => "the model provider failed",
        };
        match self {
            // Our own deadline: which one is ours to say.
            UpstreamError::Timeout(kind) => format!("the model did not answer in time ({kind})"),
            _ => fixed.to_owned(),
        }
    }
}

/// An error response: a status and a JSON body naming the problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// The request field at fault, when there is one.
    pub field: Option<String>,
    pub retry_after: Option<Duration>,
    /// Headers that explain the error (e.g. `x-ratelimit-*` on a 429).
    pub headers: Vec<(&'static str, String)>,
    /// The limit that refused the request (a 429), boxed: most errors have
    /// none.
    pub limit: Option<Box<Limit>>,
}

/// Which of our limits refused a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limit {
    /// Its setting, e.g. `MAX_STREAMS_PER_USER`.
    pub setting: &'static str,
    /// When it lets the caller in again (RFC 3339, UTC), where known.
    pub resets_at: Option<String>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    code: &'a str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    limit: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    resets_at: Option<&'a str>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            field: None,
            retry_after: None,
            headers: Vec::new(),
            limit: None,
        }
    }

    /// A 429 from one of our limits: its setting named in the body, when
    /// to come back in `Retry-After`, where it was counted in
    /// `X-RateLimit-Scope`.
    pub fn limited(
        code: &'static str,
        limit: &'static str,
        message: impl Into<String>,
        retry_after: Duration,
        scope: &str,
    ) -> Self {
        let mut e = Self::new(StatusCode::TOO_MANY_REQUESTS, code, message);
        e.limit = Some(Box::new(Limit {
            setting: limit,
            resets_at: None,
        }));
        e.retry_after = Some(retry_after);
        e.headers.push(("x-ratelimit-scope", scope.to_owned()));
        e
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    /// The JSON body, also used as the data of an SSE `error` event.
    pub fn body_json(&self) -> String {
        serde_json::to_string(&ErrorBody {
            code: self.code,
            message: &self.message,
            field: self.field.as_deref(),
            limit: self.limit.as_ref().map(|l| l.setting),
            resets_at: self.limit.as_ref().and_then(|l| l.resets_at.as_deref()),
        })
        .unwrap_or_else(|_| format!("{{\"code\":\"{}\"}}", self.code))
    }
}

impl From<&UpstreamError> for ApiError {
    fn from(e: &UpstreamError) -> Self {
        Self {
            status: e.status_code(),
            code: e.code(),
            message: e.client_message(),
            field: None,
            retry_after: e.retry_after(),
            headers: Vec::new(),
            limit: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (
            self.status,
            [(header::CONTENT_TYPE, "application/json")],
            self.body_json(),
        )
            .into_response();
        let retry_after = self.retry_after.or(match self.status {
            // A 429/503 without a hint still tells the client to back off.
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => {
                Some(Duration::from_secs(1))
            }
            _ => None,
        });
        for (name, value) in &self.headers {
            if let Ok(v) = HeaderValue::from_str(value) {
                resp.headers_mut().insert(*name, v);
            }
        }
        if let Some(ra) = retry_after {
            let secs = ra.as_secs_f64().ceil().max(1.0) as u64;
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        resp
    }
}

impl IntoResponse for &ApiError {
    fn into_response(self) -> Response {
        self.clone().into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(s: u16) -> UpstreamError {
        UpstreamError::Status {
            status: s,
            kind: "x".into(),
            message: "m".into(),
            retry_after: None,
        }
    }

    #[test]
    fn upstream_statuses_map_to_documented_client_statuses() {
        let table = [
            (400, 400, false),
            (401, 502, false),
            (403, 502, false),
            (404, 400, false),
            (413, 413, false),
            (429, 429, true),
            (500, 502, true),
            (503, 503, true),
            (529, 503, true),
        ];
        for (up, ours, retry) in table {
            let e = status(up);
            assert_eq!(e.status_code().as_u16(), ours, "upstream {up}");
            assert_eq!(e.retryable(), retry, "upstream {up}");
        }
    }

    #[test]
    fn auth_failures_do_not_leak_provider_text() {
        let e = UpstreamError::Status {
            status: 401,
            kind: "authentication_error".into(),
            message: "invalid x-api-key sk-ant-123".into(),
            retry_after: None,
        };
        assert!(!ApiError::from(&e).message.contains("sk-ant"));
    }

    #[test]
    fn provider_text_never_reaches_clients() {
        // OpenAI's 429 names the organisation; Bedrock's errors carry SDK
        // debug output; a stream error event carries free text.
        for e in [
            UpstreamError::Status {
                status: 429,
                kind: "rate_limit_exceeded".into(),
                message: "Rate limit reached for org-SECRET123 on tokens".into(),
                retry_after: None,
            },
            UpstreamError::Status {
                status: 500,
                kind: "x".into(),
                message: "x".repeat(65_536) + "SECRET123",
                retry_after: None,
            },
            UpstreamError::StreamEvent {
                kind: "overloaded_error".into(),
                message: "cluster SECRET123 overloaded".into(),
            },
            UpstreamError::Unreachable("dispatch failure: SECRET123 DebugOutput".into()),
            UpstreamError::Protocol("unexpected SECRET123".into()),
        ] {
            let api = ApiError::from(&e);
            assert!(
                !api.body_json().contains("SECRET123"),
                "{}",
                api.body_json()
            );
            assert!(api.message.len() < 100, "{}", api.message);
        }
    }

    #[test]
    fn retry_after_header_is_whole_seconds_rounded_up() {
        let mut e = ApiError::new(StatusCode::TOO_MANY_REQUESTS, "x", "y");
        e.retry_after = Some(Duration::from_millis(1500));
        let r = e.into_response();
        assert_eq!(r.headers()[header::RETRY_AFTER], "2");
    }
}
