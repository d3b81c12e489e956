//! What may be called, and how often: per-caller rate limits
//! ([`rate`]), one circuit breaker per model ([`circuit`], on the pure
//! [`breaker`]), and retries with a budget ([`retry`]).
//!
//! State is shared by the fleet through Redis when it is configured and
//! answering; otherwise each instance keeps its own (documented as
//! per-instance): never an open door, never an outage because Redis is
//! down.
//!
//! Uses: [`crate::redis`]. Used by: `chat`, `cache::warmer`, `state`.

pub mod breaker;
pub mod circuit;
pub mod rate;
pub mod retry;

pub use breaker::{Admission, BreakerConfig, BreakerState, Breakers};
pub use circuit::{Circuits, Permit};
pub use rate::{Decision, RateLimiter, RateLimits, Reservation};
pub use retry::{RetryBudget, RetryPolicy};
