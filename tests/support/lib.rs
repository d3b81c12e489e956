//! Test support shared by the end-to-end tests of every crate.
//!
//! - [`read_sse`]: reads an SSE response the way a browser would, keeping
//!   each event's arrival time. Written independently of chat-core's parser
//!   so a parser bug cannot hide on both sides of a test.
//! - [`ChatServer`]: chat-stream's router on a real socket (port 0), the
//!   same code path `make run` and Lambda use.
//! - [`FakeRuntimeApi`]: a local Lambda Runtime API, so the real
//!   `chat-stream` binary can be driven through the Lambda streaming adapter
//!   with Function URL events from `events/`.
//!
//! - [`LocalAws`]: a fresh table and queues in moto, made by
//!   `scripts/local_aws.py` from template.yaml's own definitions.
//!
//! One file per fake: [`sse`], [`sim`], [`chat_server`], [`redis`],
//! [`lambda`], [`aws`].
//!
//! Test-only code: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod aws;
pub mod chat_server;
pub mod lambda;
pub mod redis;
pub mod sim;
pub mod sse;
pub mod xray;

pub use aws::*;
pub use chat_server::*;
pub use lambda::*;
pub use redis::*;
pub use sim::*;
pub use sse::*;
pub use xray::find_segment;
