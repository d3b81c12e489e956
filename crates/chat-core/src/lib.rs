//! chat-core: everything with logic lives here; the binaries are thin.
//!
//! The folders follow the request path, and imports point one way, down
//! this list (a folder's `//!` doc says what it may use):
//!
//! - [`api`]: the axum router shared by Lambda and the local server; one
//!   file per route, the middleware, errors as responses.
//! - [`chat`]: one turn of `POST /chat`: plan (routing, cache, history,
//!   limits), attempt (retries and fallback), relay (the stream), hit,
//!   finish (the stored turn).
//! - [`provider`], [`cache`], [`live`], [`limits`], [`persistence`]: the
//!   features the turn uses. Each owns its settings type.
//! - leaves: [`redis`], [`error`], [`sse`], [`secrets`], [`util`],
//!   [`http`], [`logging`], [`obs`], [`server`]; [`auth`] (uses the store).
//!
//! Off to the side: [`config`] reads the settings, [`init`] builds the
//! clients once into a [`state::AppState`]; only `init`, `state` (which
//! holds the settings) and the mains (through [`runner`]) use `config`.

pub mod api;
pub mod auth;
pub mod aws;
pub mod cache;
pub mod chat;
pub mod config;
pub mod error;
pub mod http;
pub mod init;
pub mod limits;
pub mod live;
pub mod logging;
pub mod obs;
pub mod persistence;
pub mod pipe;
pub mod provider;
pub mod redis;
pub mod runner;
pub mod runtime_api;
pub mod secrets;
pub mod server;
pub mod sse;
pub mod state;
pub mod util;

pub use api::app;
pub use aws::aws_sdk_config;
pub use config::{Config, ConfigError};
pub use init::{InitError, build_state, build_warmer};
pub use persistence::store::{StoreRole, store_for, store_with_timeouts};
pub use state::AppState;
