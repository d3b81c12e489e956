//! The one HTTP client per process: built at init, pooled, kept alive.
//!
//! Reusing connections is what keeps time to first token low: a new TLS
//! connection to a model API costs one to three round trips before the
//! request is even sent. reqwest negotiates HTTP/2 by ALPN where the server
//! offers it (one connection, many streams) and keeps HTTP/1.1 connections
//! in a pool otherwise; `http2_prior_knowledge` makes it speak HTTP/2 from
//! the first byte (for plain-http endpoints that speak h2c).

use std::time::Duration;

pub fn build_client(
    connect_timeout: Duration,
    http2_prior_knowledge: bool,
) -> Result<reqwest::Client, reqwest::Error> {
    let builder = reqwest::Client::builder();
    let builder = if http2_prior_knowledge {
        builder.http2_prior_knowledge()
    } else {
        builder
    };
    builder
        .connect_timeout(connect_timeout)
        // Lambda freezes idle environments; servers close idle connections
        // after ~60-120 s. Dropping ours a little earlier avoids reusing a
        // connection the server has already closed.
        .pool_idle_timeout(Duration::from_secs(55))
        .pool_max_idle_per_host(256)
        .tcp_nodelay(true)
        .tcp_keepalive(Duration::from_secs(30))
        .http2_keep_alive_interval(Duration::from_secs(20))
        .http2_keep_alive_while_idle(true)
        // No adaptive window: it starts the connection window at 64 KiB,
        // and h2 closes a connection (GOAWAY ENHANCE_YOUR_CALM,
        // "too_many_data_frames") once its unread small DATA frames cost
        // more than half that window. Model APIs send every delta as a
        // small frame, so a few hundred deltas unread across the answers
        // on one connection failed them all. hyper's fixed windows (5 MiB
        // per connection, 2 MiB per stream) put that limit at 2.5 MiB.
        .user_agent(concat!("chat-stream/", env!("CARGO_PKG_VERSION")))
        .build()
}
