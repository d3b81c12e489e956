//! Making turns durable and reading them back.
//!
//! - [`turn`]: the "turn completed" message schema (SQS), shared by the
//!   producer and db-writer.
//! - [`producer`]: chat-stream's side: sends the turn through SQS (or
//!   writes it directly when SQS fails) and updates the recent buffer.
//! - [`spool`]: turns neither SQS nor DynamoDB took, kept under `/tmp`
//!   for the next invocation.
//! - [`history`]: a conversation's past turns for the next request, from
//!   the recent buffer (Redis) or the table.
//! - [`store`]: every DynamoDB access (Query/GetItem/BatchGetItem and
//!   writes; never Scan).
//! - [`writer`]: db-writer's logic: SQS batches into the table,
//!   idempotently, with partial batch failures.
//!
//! Uses: `provider` (messages, for history), `redis`, `util`.

pub mod history;
pub mod producer;
pub mod spool;
pub mod store;
pub mod turn;
pub mod writer;

use std::time::Duration;

/// Where turns are stored. Off when `TABLE_NAME` is unset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PersistenceConfig {
    pub table: String,
    /// `TURN_QUEUE_URL`; unset: turns are written to the table directly.
    pub queue_url: Option<String>,
    /// `AWS_ENDPOINT_URL_SQS`, when set in the config source (the SDK also
    /// reads it from the process environment).
    pub sqs_endpoint_url: Option<String>,
    /// `TURN_QUEUE_TIMEOUT_MS` (default 2000): the longest a send to SQS
    /// may take, retries included, before the turn is written directly.
    pub queue_timeout: Duration,
    /// `RETENTION_DAYS`; items expire (DynamoDB TTL) this long after their
    /// last update. Unset or 0: kept.
    pub retention: Option<Duration>,
    /// Where turns go when neither SQS nor DynamoDB takes them.
    pub spool: spool::SpoolConfig,
}
