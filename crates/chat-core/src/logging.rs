//! One JSON object per line on stdout: what CloudWatch Logs and Logs
//! Insights read best, and what `make run` shows locally.

use tracing_subscriber::fmt;

/// Installs the global subscriber. Safe to call more than once (later calls
/// do nothing), which tests rely on.
pub fn init(level: tracing::Level) {
    let _ = fmt()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_span_list(false)
        .with_target(false)
        .with_max_level(level)
        .try_init();
}
