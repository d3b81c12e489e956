//! The one Redis connection every feature shares, and the guard around
//! it: a Redis that fails or is slow is skipped for a while, so a dead
//! Redis costs one timeout, not one per request, and every caller falls
//! back to what it does without Redis.
//!
//! A leaf: uses nothing else in the crate.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use redis::Script;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

/// A Redis connection that is skipped for a while after it fails, so a
/// dead Redis costs one timeout, not one per request.
pub struct RedisLink {
    client: redis::Client,
    conn: ConnectionManager,
    timeout: Duration,
    skip_until: Mutex<Option<Instant>>,
}

/// How long Redis is skipped after a failure before it is tried again.
const REDIS_RETRY_AFTER: Duration = Duration::from_secs(2);

impl RedisLink {
    /// Connects lazily: a Redis that is down at init is not fatal.
    pub fn new(url: &str, timeout: Duration) -> Result<Self, redis::RedisError> {
        Self::with_client(redis::Client::open(url)?, timeout)
    }

    /// From a client built elsewhere (e.g. TLS with a private CA).
    pub fn with_client(
        client: redis::Client,
        timeout: Duration,
    ) -> Result<Self, redis::RedisError> {
        let cfg = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout.max(Duration::from_millis(200))))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        Ok(Self {
            conn: ConnectionManager::new_lazy_with_config(client.clone(), cfg)?,
            client,
            timeout,
            skip_until: Mutex::new(None),
        })
    }

    fn skipping(&self) -> bool {
        let g = self.skip_until.lock().unwrap_or_else(|p| p.into_inner());
        g.is_some_and(|t| Instant::now() < t)
    }

    fn mark_down(&self, why: &str) {
        let mut g = self.skip_until.lock().unwrap_or_else(|p| p.into_inner());
        if g.is_none_or(|t| Instant::now() >= t) {
            tracing::warn!(
                error = why,
                "redis unavailable; using per-instance state for {:?}",
                REDIS_RETRY_AFTER
            );
        }
        *g = Some(Instant::now() + REDIS_RETRY_AFTER);
    }

    /// Awaits one Redis call within `timeout`, recording the outcome: a
    /// success clears the skip, a failure or timeout starts one.
    async fn guarded<T>(
        &self,
        timeout: Duration,
        call: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Option<T> {
        match tokio::time::timeout(timeout, call).await {
            Ok(Ok(v)) => {
                *self.skip_until.lock().unwrap_or_else(|p| p.into_inner()) = None;
                Some(v)
            }
            Ok(Err(e)) => {
                self.mark_down(&e.to_string());
                None
            }
            Err(_) => {
                self.mark_down("timed out");
                None
            }
        }
    }

    /// `ok` or `down`; with `probe`, a live PING, else the last known state.
    pub async fn health(&self, probe: bool) -> &'static str {
        if !probe {
            return if self.skipping() { "down" } else { "ok" };
        }
        let mut conn = self.conn.clone();
        let cmd = redis::cmd("PING");
        let ping = cmd.query_async::<String>(&mut conn);
        match self
            .guarded(self.timeout.max(Duration::from_millis(500)), ping)
            .await
        {
            Some(_) => "ok",
            None => "down",
        }
    }

    /// Runs a pipeline (atomic when built with `.atomic()`); `None` when
    /// Redis is skipped, slow or failing.
    pub async fn pipe<T: redis::FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
        timeout: Duration,
    ) -> Option<T> {
        if self.skipping() {
            return None;
        }
        let mut conn = self.conn.clone();
        self.guarded(timeout, pipe.query_async::<T>(&mut conn))
            .await
    }

    /// A connection of the caller's own, for blocking reads (`XREAD
    /// BLOCK`) that must not hold up the shared connection. Its responses
    /// may take `block` plus the usual timeout.
    pub async fn dedicated(&self, block: Duration) -> Option<redis::aio::MultiplexedConnection> {
        if self.skipping() {
            return None;
        }
        let cfg = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout.max(Duration::from_millis(200))))
            .set_response_timeout(Some(block + self.timeout.max(Duration::from_millis(200))));
        let connect = self
            .client
            .get_multiplexed_async_connection_with_config(&cfg);
        self.guarded(self.timeout.max(Duration::from_millis(500)), connect)
            .await
    }

    /// Runs a script with string arguments within `timeout`; `None` when
    /// Redis is skipped, slow or failing.
    pub async fn script<T: redis::FromRedisValue>(
        &self,
        script: &Script,
        keys: &[&str],
        args: &[&str],
        timeout: Duration,
    ) -> Option<T> {
        if self.skipping() {
            return None;
        }
        let mut inv = script.prepare_invoke();
        for k in keys {
            inv.key(*k);
        }
        for a in args {
            inv.arg(*a);
        }
        let mut conn = self.conn.clone();
        self.guarded(timeout, inv.invoke_async::<T>(&mut conn))
            .await
    }

    /// Runs a script; `None` when Redis is skipped, slow or failing.
    pub(crate) async fn eval<T: redis::FromRedisValue>(
        &self,
        script: &Script,
        keys: &[String],
        args: &[i64],
    ) -> Option<T> {
        if self.skipping() {
            return None;
        }
        let mut inv = script.prepare_invoke();
        for k in keys {
            inv.key(k);
        }
        for a in args {
            inv.arg(*a);
        }
        let mut conn = self.conn.clone();
        self.guarded(self.timeout, inv.invoke_async::<T>(&mut conn))
            .await
    }
}

/// Keys must not contain braces of their own: they would change the slot.
pub(crate) fn tag(s: &str) -> String {
    s.replace(['{', '}'], "_")
}
