//! db-writer's settings: the table, retention, and (outside Lambda) how
//! the local poller batches.

use std::time::Duration;

use super::source::{ConfigSource, Reader, url};
use crate::error::ConfigError;
pub use crate::persistence::writer::WriterConfig;

impl WriterConfig {
    pub fn from_source(src: &(impl ConfigSource + ?Sized)) -> Result<Self, ConfigError> {
        let r = Reader(src);
        let table = r
            .string("TABLE_NAME")
            .ok_or_else(|| ConfigError::new("TABLE_NAME", "not set (the DynamoDB table)"))?;
        let queue_url = match r.string("TURN_QUEUE_URL") {
            Some(_) => Some(url(&r, "TURN_QUEUE_URL", "")?),
            None => None,
        };
        let days = r.ranged("RETENTION_DAYS", 0u64, 0, 36_500)?;
        Ok(Self {
            log_level: r.parse(
                "LOG_LEVEL",
                tracing::Level::INFO,
                "one of error, warn, info, debug, trace",
            )?,
            table,
            retention: (days > 0).then(|| Duration::from_secs(days * 86_400)),
            queue_url,
            batch_size: r.ranged("POLL_BATCH_SIZE", 100usize, 1, 1000)?,
            batching_window: r.ms("POLL_BATCHING_WINDOW_MS", 500)?,
        })
    }
}
