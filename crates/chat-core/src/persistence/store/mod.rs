//! DynamoDB: one table for conversations, messages, usage and API keys.
//!
//! Key design (also in README "Data model"):
//!
//! | item | PK | SK | notes |
//! | --- | --- | --- | --- |
//! | conversation | `CONV#{id}` | `META` | owner, title, created_at, updated_at, message_count; `GSI1PK = USER#{owner}`, `GSI1SK = {updated_at:013}#{id}` |
//! | turn (user message + answer) | `CONV#{id}` | `TURN#{started_at:013}#{turn_id}` | in order by start time; `answer` inline, or `answer_parts` |
//! | answer part (claim check) | `CONV#{id}` | `PART#{started_at:013}#{turn_id}#{k:04}` | only for answers over [`ITEM_INLINE_MAX_BYTES`] |
//! | usage per user per day | `USER#{id}` | `USAGE#{YYYY-MM-DD}` | requests, input_tokens, output_tokens (atomic ADD) |
//! | API key | `APIKEY#{sha256 hex}` | `APIKEY` | user_id, label; the key itself is never stored |
//!
//! Access is GetItem, Query, BatchWriteItem and TransactWriteItems only:
//! a user's conversations come from the sparse GSI1 (only conversation
//! items carry its keys), newest first; a conversation's turns from one
//! Query on its partition. Nothing scans.
//!
//! Writes are idempotent: each turn is a conditional Put
//! (`attribute_not_exists`) in the same transaction as the counters it
//! changes, so a redelivered turn cancels its transaction, is recognised
//! by the cancellation reason, and is dropped before the rest is retried:
//! the counters move exactly once per turn.
//!
//! Files: `keys` (key shapes, cursors), `items` (what is read back),
//! `reads` (conversations, turns), `records` (API keys, usage, cache
//! entries), `writes` (turns in transactions, answer parts). Uses:
//! `persistence::turn`, `util`.

mod erase;
mod items;
mod keys;
mod reads;
mod records;
mod streams;
mod summary;
mod writes;

pub use erase::Erased;
pub use items::{ConversationMeta, StoredTurn, WriteOutcome};
pub use keys::*;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::types::AttributeValue;

pub(crate) type Item = HashMap<String, AttributeValue>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("DynamoDB {op} failed: {message}")]
    Dynamo { op: &'static str, message: String },
    #[error("stored item is malformed: {0}")]
    Corrupt(String),
    #[error("invalid cursor")]
    BadCursor,
}

pub(crate) fn dynamo_err<E: std::fmt::Debug>(op: &'static str, e: E) -> StoreError {
    // The SDK's Display for service errors is terse ("service error");
    // Debug carries the code and message.
    let message = format!("{e:?}");
    let message = message.chars().take(500).collect();
    StoreError::Dynamo { op, message }
}

fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}
pub(crate) fn n(v: impl std::fmt::Display) -> AttributeValue {
    AttributeValue::N(v.to_string())
}
pub(crate) fn get_s<'a>(item: &'a Item, k: &str) -> Option<&'a str> {
    item.get(k).and_then(|v| v.as_s().ok()).map(String::as_str)
}
pub(crate) fn get_n(item: &Item, k: &str) -> Option<u64> {
    item.get(k)
        .and_then(|v| v.as_n().ok())
        .and_then(|v| v.parse().ok())
}

/// The table and the client that reaches it. Counts its calls, so the
/// benchmarks can report DynamoDB calls per turn.
pub struct Store {
    client: Client,
    table: String,
    /// Retention: items get `expires_at` this far in the future (TTL).
    retention: Option<Duration>,
    calls: AtomicU64,
}

impl Store {
    pub fn new(client: Client, table: impl Into<String>, retention: Option<Duration>) -> Self {
        Self {
            client,
            table: table.into(),
            retention,
            calls: AtomicU64::new(0),
        }
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    /// DynamoDB calls made so far by this store.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    pub(crate) fn count(&self) {
        self.calls.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn expires_at(&self, from_ms: u64) -> Option<u64> {
        self.retention.map(|r| from_ms / 1000 + r.as_secs())
    }

    /// A cheap read that proves the table answers (GetItem of a key that
    /// never exists; needs no extra permission).
    pub async fn probe(&self) -> Result<(), StoreError> {
        self.get_item("HEALTH".into(), "HEALTH").await.map(|_| ())
    }

    /// One GetItem by key.
    pub(crate) async fn get_item(&self, pk: String, sk: &str) -> Result<Option<Item>, StoreError> {
        self.count();
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("PK", s(pk))
            .key("SK", s(sk))
            .send()
            .await
            .map_err(|e| dynamo_err("GetItem", e))?;
        Ok(out.item)
    }
}

/// Who is calling DynamoDB, which sets how long a call may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreRole {
    /// chat-stream: reads next to a user's request; short.
    Request,
    /// db-writer: transactions of up to 100 actions; a timed-out attempt
    /// that did commit only shows up as duplicates on the retry.
    Writer,
}

/// The table client for `table`.
pub async fn store_for(table: &str, retention: Option<Duration>, role: StoreRole) -> Store {
    let (attempt, total) = match role {
        StoreRole::Request => (Duration::from_secs(2), Duration::from_secs(6)),
        StoreRole::Writer => (Duration::from_secs(10), Duration::from_secs(25)),
    };
    store_with_timeouts(table, retention, attempt, total).await
}

/// The table client with explicit per-attempt and total call timeouts.
pub async fn store_with_timeouts(
    table: &str,
    retention: Option<Duration>,
    attempt: Duration,
    total: Duration,
) -> Store {
    let sdk = crate::aws::aws_sdk_config(attempt, total).await;
    Store::new(aws_sdk_dynamodb::Client::new(&sdk), table, retention)
}
