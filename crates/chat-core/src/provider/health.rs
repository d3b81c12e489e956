//! What we last saw of each model provider: lets `/health` report its
//! state without calling it.

use std::sync::Mutex;
use std::time::Instant;

use serde_json::json;

use crate::error::UpstreamError;

/// What we last saw of the model provider: lets `/health` report its state
/// without calling it.
#[derive(Default)]
pub struct ModelHealth(Mutex<HealthInner>);

#[derive(Default)]
struct HealthInner {
    last_ok: Option<Instant>,
    last_error: Option<(Instant, &'static str)>,
    consecutive_failures: u32,
}

impl ModelHealth {
    fn lock(&self) -> std::sync::MutexGuard<'_, HealthInner> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn record_ok(&self) {
        let mut h = self.lock();
        h.last_ok = Some(Instant::now());
        h.consecutive_failures = 0;
    }

    /// Only failures that say something about the provider count; a request
    /// the provider rejected as invalid does not make it unhealthy.
    pub fn record_error(&self, e: &UpstreamError) {
        let provider_fault = e.retryable()
            || matches!(
                e,
                UpstreamError::Status {
                    status: 401 | 403,
                    ..
                }
            );
        if provider_fault {
            let mut h = self.lock();
            h.last_error = Some((Instant::now(), e.code()));
            h.consecutive_failures += 1;
        }
    }

    pub fn snapshot(&self) -> serde_json::Value {
        let h = self.lock();
        let state = match (h.last_ok, h.consecutive_failures) {
            (_, n) if n >= 3 => "failing",
            (_, n) if n > 0 => "degraded",
            (Some(_), _) => "ok",
            (None, _) => "unknown",
        };
        json!({
            "state": state,
            "consecutive_failures": h.consecutive_failures,
            "last_success_ms_ago": h.last_ok.map(|t| t.elapsed().as_millis() as u64),
            "last_error": h.last_error.map(|(t, code)| json!({"code": code, "ms_ago": t.elapsed().as_millis() as u64})),
        })
    }
}
