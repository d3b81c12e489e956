//! The one Redis connection every feature shares, and the guard around
//! it: a Redis that fails or is slow is skipped for a while, so a dead
//! Redis costs one timeout, not one per request, and every caller falls
//! back to what it does without Redis.
//!
//! Two kinds of server: a single endpoint (a `ConnectionManager`), or a
//! cluster (`REDIS_CLUSTER=true`: the `redis` crate's cluster client,
//! which follows MOVED and ASK and routes each command by its key's
//! slot). Every multi-key operation here keeps its keys in one slot with a
//! `{hash tag}`, so both kinds run the same scripts and pipelines.
//!
//! A leaf: uses nothing else in the crate.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Script, Value};

/// A Redis connection that is skipped for a while after it fails, so a
/// dead Redis costs one timeout, not one per request.
pub struct RedisLink {
    backend: Backend,
    timeout: Duration,
    skip_until: Mutex<Option<Instant>>,
}

enum Backend {
    Single {
        client: redis::Client,
        conn: ConnectionManager,
    },
    Cluster {
        client: ClusterClient,
        /// Made on first use (a cluster client connects asynchronously);
        /// a failed attempt is tried again on the next call.
        conn: tokio::sync::OnceCell<ClusterConnection>,
    },
}

/// A connection: the shared one, or one of a caller's own.
#[derive(Clone)]
pub enum Conn {
    Single(ConnectionManager),
    Own(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Own(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Own(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Own(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// How long Redis is skipped after a failure before it is tried again.
const REDIS_RETRY_AFTER: Duration = Duration::from_secs(2);

impl RedisLink {
    /// Connects lazily: a Redis that is down at init is not fatal.
    /// `cluster`: the server is a cluster (or a cluster-mode endpoint).
    pub fn new(url: &str, timeout: Duration, cluster: bool) -> Result<Self, redis::RedisError> {
        if cluster {
            let client = ClusterClient::builder(vec![url])
                .connection_timeout(timeout.max(Duration::from_millis(200)))
                .response_timeout(timeout)
                .retries(1)
                .build()?;
            return Ok(Self {
                backend: Backend::Cluster {
                    client,
                    conn: tokio::sync::OnceCell::new(),
                },
                timeout,
                skip_until: Mutex::new(None),
            });
        }
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
            backend: Backend::Single {
                conn: ConnectionManager::new_lazy_with_config(client.clone(), cfg)?,
                client,
            },
            timeout,
            skip_until: Mutex::new(None),
        })
    }

    /// The shared connection.
    async fn conn(&self) -> redis::RedisResult<Conn> {
        match &self.backend {
            Backend::Single { conn, .. } => Ok(Conn::Single(conn.clone())),
            Backend::Cluster { client, conn } => conn
                .get_or_try_init(|| client.get_async_connection())
                .await
                .map(|c| Conn::Cluster(c.clone())),
        }
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
        // Boxed: the call (with the cluster client's connect path in it) is
        // a large state machine, and inline it would be copied into every
        // future that awaits Redis (the request's, each spawned task's).
        match tokio::time::timeout(timeout, Box::pin(call)).await {
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
        let ping = async {
            let mut conn = self.conn().await?;
            redis::cmd("PING").query_async::<String>(&mut conn).await
        };
        match self
            .guarded(self.timeout.max(Duration::from_millis(500)), ping)
            .await
        {
            Some(_) => "ok",
            None => "down",
        }
    }

    /// Whether this is a cluster (a pipeline then must keep to one slot).
    pub fn is_cluster(&self) -> bool {
        matches!(self.backend, Backend::Cluster { .. })
    }

    /// The per-call timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
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
        let call = async {
            let mut conn = self.conn().await?;
            pipe.query_async::<T>(&mut conn).await
        };
        self.guarded(timeout, call).await
    }

    /// A connection of the caller's own, for blocking reads (`XREAD
    /// BLOCK`) that must not hold up the shared connection. Its responses
    /// may take `block` plus the usual timeout.
    pub async fn dedicated(&self, block: Duration) -> Option<Conn> {
        if self.skipping() {
            return None;
        }
        let connect_limit = self.timeout.max(Duration::from_millis(200));
        let cfg = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(connect_limit))
            .set_response_timeout(Some(block + connect_limit));
        let connect = async {
            match &self.backend {
                Backend::Single { client, .. } => client
                    .get_multiplexed_async_connection_with_config(&cfg)
                    .await
                    .map(Conn::Own),
                Backend::Cluster { client, .. } => {
                    let cfg = redis::cluster::ClusterConfig::new()
                        .set_connection_timeout(connect_limit)
                        .set_response_timeout(block + connect_limit);
                    client
                        .get_async_connection_with_config(cfg)
                        .await
                        .map(Conn::Cluster)
                }
            }
        };
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
        let call = async {
            let mut conn = self.conn().await?;
            inv.invoke_async::<T>(&mut conn).await
        };
        self.guarded(timeout, call).await
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
        let call = async {
            let mut conn = self.conn().await?;
            inv.invoke_async::<T>(&mut conn).await
        };
        self.guarded(self.timeout, call).await
    }
}

/// Keys must not contain braces of their own: they would change the slot.
pub(crate) fn tag(s: &str) -> String {
    s.replace(['{', '}'], "_")
}
