//! One JSON object per line on stdout: what CloudWatch Logs and Logs
//! Insights read best, and what `make run` shows locally. The subscriber
//! itself (log lines, X-Ray, metrics) is in [`crate::obs`].

/// Installs the global subscriber with logs only (no X-Ray), at `level`.
/// Safe to call more than once (later calls do nothing), which tests rely
/// on.
pub fn init(level: tracing::Level) {
    let _ = tracing::subscriber::set_global_default(crate::obs::subscriber(
        level,
        crate::obs::LogOut::Stdout,
        None,
    ));
}

/// Reports why a binary stopped, with the error's whole source chain, on
/// stderr and in the log (init errors happen before logging may exist),
/// and gives the failing exit code.
pub fn fail(bin: &str, e: &dyn std::error::Error) -> std::process::ExitCode {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    eprintln!("{bin}: {msg}");
    tracing::error!(error = %msg, "{bin} stopped");
    std::process::ExitCode::FAILURE
}
