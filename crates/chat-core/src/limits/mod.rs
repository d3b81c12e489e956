//! What may be called, and how often: per-caller rate limits
//! ([`rate`]), one circuit breaker per model ([`circuit`], on the pure
//! [`breaker`]), and retries with a budget ([`retry`]).
//!
//! Also the abuse limits: concurrent streams per user ([`streams`]), and
//! (through more [`RateLimiter`]s) the read routes and failed sign-ins
//! per address.
//!
//! State is shared by the fleet through Redis when it is configured and
//! answering, else through the DynamoDB table ([`table`]) when there is
//! one; otherwise each instance keeps its own (documented as
//! per-instance): never an open door, never an outage because a store is
//! down. Every 429 says which in `X-RateLimit-Scope`.
//!
//! Uses: [`crate::redis`], the AWS SDK. Used by: `chat`, `cache::warmer`, `state`, `init`.

pub mod admit;
pub mod breaker;
pub mod circuit;
pub mod failures;
pub mod rate;
pub mod retry;
pub mod streams;
pub mod table;

pub use admit::{admit, release};
pub use breaker::{Admission, BreakerConfig, BreakerState, Breakers};
pub use circuit::{Circuits, Permit};
pub use failures::{Blocked, FailedSignIns};
pub use rate::{Decision, RateLimiter, RateLimits, Reservation};
pub use retry::{RetryBudget, RetryPolicy};
pub use streams::{Slot, StreamSlots, StreamsFull};
pub use table::TableCounters;

/// The abuse and spend limits (each 0 = off), beside the per-minute
/// [`RateLimits`] of the chat routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AbuseLimits {
    /// `MAX_STREAMS_PER_USER` (default 4): answers streaming at once per
    /// user; 429 `too_many_streams`.
    pub max_streams_per_user: u32,
    /// `READ_RATE_LIMIT_RPM` (default 120): requests per minute per user on
    /// the GET and DELETE routes; 429 `rate_limited`.
    pub read_rpm: u32,
    /// `AUTH_FAILURES_PER_IP_PER_MINUTE` (default 20): failed sign-ins per
    /// client address per minute before the address gets 429
    /// `auth_rate_limited` (before any credential lookup) until the
    /// minute ends.
    pub auth_failures_per_ip: u32,
    /// `DAILY_TOKEN_BUDGET_PER_USER` (default 0, off): model tokens (input
    /// plus output) per user per UTC day, from the usage counted in the
    /// table; 429 `budget_exceeded` until midnight UTC. Needs `TABLE_NAME`.
    pub daily_token_budget: u64,
    /// `AUTH_UNKNOWN_KEY_CACHE_MAX` (default 1000): unknown API keys
    /// remembered (for a few seconds, so a flood of bad keys does not
    /// become a flood of reads); kept apart from the valid keys, which a
    /// flood can never evict.
    pub unknown_key_cache_max: usize,
    /// `LIMITS_TABLE_ENABLED` (default true): without Redis, keep the
    /// counters in the table (fleet-wide); false keeps them per instance
    /// (no table writes on the request path, N environments give a caller
    /// N times each limit).
    pub table_enabled: bool,
    /// `LIMITS_DYNAMODB_TIMEOUT_MS` (default 250): the one attempt a
    /// counter update in the table may take before the instance limits
    /// on its own.
    pub table_timeout: std::time::Duration,
}

impl Default for AbuseLimits {
    fn default() -> Self {
        Self {
            max_streams_per_user: 4,
            read_rpm: 120,
            auth_failures_per_ip: 20,
            daily_token_budget: 0,
            unknown_key_cache_max: 1000,
            table_enabled: true,
            table_timeout: std::time::Duration::from_millis(250),
        }
    }
}
