//! The AWS SDK configuration every client shares. A leaf.

use std::time::Duration;

/// The AWS SDK configuration every client shares, loaded once (region and
/// credentials from the environment; `AWS_ENDPOINT_URL` points it at a
/// local stand-in). Short timeouts: these calls sit next to a user's chat.
pub async fn aws_sdk_config(attempt: Duration, operation: Duration) -> aws_config::SdkConfig {
    let timeouts = aws_config::timeout::TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(1))
        .operation_attempt_timeout(attempt)
        .operation_timeout(operation)
        .build();
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .timeout_config(timeouts)
        .load()
        .await
}
