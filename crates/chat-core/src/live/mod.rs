//! Live answer streams in Redis: what makes answers resumable and lets
//! identical in-flight requests share one model call.
//!
//! Every streamed answer is teed, off the hot path, into a Redis Stream
//! `live:{turn_id}`: the SSE events the client was sent, each as its `id`,
//! event name and data (`i`, `e`, `d`; an entry holds the events written
//! together, in order), kept for `RESUME_RETENTION_SECS`. The stream's
//! owner (`user:ID`) sits next to it in `live:{turn_id}:owner`.
//!
//! - **Resume**: `GET /chat/streams/{turn_id}` with `Last-Event-ID: N`
//!   replays the events after N from the stream, then follows it live until
//!   `done` or `error`. No model call.
//! - **Coalescing**: a cacheable request that misses the cache tries to
//!   become the *leader* of its cache key: `SET lead:{key} turn_id NX PX
//!   lease`, in the same script as its cache lookup
//!   ([`Live::lookup_or_lead`]) when the cache is in this Redis. The
//!   winner calls the model and keeps the lease alive while it
//!   streams. Everyone else *follows* the leader's stream (`meta.cache =
//!   "follow"`) instead of calling the model, and gets the same answer as
//!   their own turn.
//! - **A leader that dies** stops renewing its lease. A follower that sees
//!   no new entry for a block period and finds the lease gone (or held by
//!   someone else) takes over: it becomes the leader itself (and calls the
//!   model, skipping the text its client already has) or follows whoever
//!   did. A leader whose request fails before its answer starts writes an
//!   `abort` entry, and its followers get the same error.
//!
//! Keys share their `{hash tag}` with the turn id or cache key, so each
//! operation stays in one slot (cluster-mode Redis).
//!
//! Layout: [`tee`] (copying an answer in), [`reader`] (reading it back,
//! for resume and followers), [`follower`] (following a leader, taking
//! over when it dies). Uses: `redis`, `provider` (chunks), `error`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use redis::Script;

mod follower;
mod reader;
mod tee;

pub use follower::{FollowOpen, Follower, Takeover};
pub use reader::Reader;
pub use tee::Tee;

use crate::redis::{RedisLink, tag};

/// Settings of live streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LiveConfig {
    /// How long a finished (or abandoned) stream stays resumable.
    pub retention: Duration,
    /// A leader's lease on its cache key; renewed every third of it.
    pub lease: Duration,
    /// Identical in-flight requests follow one leader.
    pub coalesce: bool,
    /// A client that leaves does not stop its answer: it is finished, so
    /// it can be resumed, followed and cached.
    pub finish_on_disconnect: bool,
}

/// One event as sent to a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub seq: u64,
    pub event: String,
    pub data: String,
}

impl Entry {
    /// `done`, `error`, `abort` (the leader failed before its answer
    /// started) or `gone` (its client left and it stopped).
    pub fn is_terminal(&self) -> bool {
        matches!(self.event.as_str(), "done" | "error" | "abort" | "gone")
    }
}

/// What a request that missed the cache should do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lead {
    /// Call the model; others will follow.
    Leader,
    /// Follow the stream of this turn.
    Follow(String),
    /// Redis is not answering: call the model, alone.
    Alone,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LiveError {
    /// Event ids jumped: entries were lost (a batch the tee could not
    /// write). What follows cannot be trusted to complete the answer.
    #[error("the live stream has a gap in its event ids")]
    Gap,
    #[error("live streams are unavailable (redis)")]
    Unavailable,
}

/// `SET lock turn NX PX lease`, or who holds it: one round trip.
const LEAD: &str = r"
local ok = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
if ok then return ARGV[1] end
return redis.call('GET', KEYS[1])
";

/// The cache lookup and, on a miss, the lease of the same key, in one
/// round trip: both keys carry the cache key's `{hash tag}`, so they share
/// a slot (cluster mode). `{1, entry}` on a hit (no lease taken);
/// `{0, holder}` on a miss (`''`: the lease ran out between SET and GET).
const LOOKUP_LEAD: &str = r"
local v = redis.call('GET', KEYS[1])
if v then return {1, v} end
local ok = redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2])
if ok then return {0, ARGV[1]} end
local h = redis.call('GET', KEYS[2])
if h then return {0, h} end
return {0, ''}
";

/// Stores a complete answer in the cache and gives up its lease if we
/// still hold it: one round trip (the keys share the cache key's slot).
const STORE_RELEASE: &str = r"
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
if redis.call('GET', KEYS[2]) == ARGV[3] then
  redis.call('DEL', KEYS[2])
end
return 1
";

/// What [`Live::lookup_or_lead`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Looked {
    /// The cache held this entry (as stored); no lease was taken.
    Cached(String),
    /// A miss, and who leads its answer now.
    Missed(Lead),
}

/// Renews the lease only while we hold it (a new leader may have it).
const RENEW: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
";

/// Gives the lease up only if it is ours.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

pub struct Live {
    link: Arc<RedisLink>,
    timeout: Duration,
    pub config: LiveConfig,
    lead: Script,
    lookup_lead: Script,
    store_release: Script,
    renew: Script,
    release: Script,
}

/// The most events one stream entry carries.
const EVENTS_PER_ENTRY: usize = 64;

pub fn stream_key(turn_id: &str) -> String {
    format!("live:{{{}}}", tag(turn_id))
}

fn owner_key(turn_id: &str) -> String {
    format!("live:{{{}}}:owner", tag(turn_id))
}

pub fn lock_key(cache_key: &str) -> String {
    format!("lead:{{{}}}", tag(cache_key))
}

impl Live {
    pub fn new(link: Arc<RedisLink>, timeout: Duration, config: LiveConfig) -> Self {
        Self {
            link,
            timeout,
            config,
            lead: Script::new(LEAD),
            lookup_lead: Script::new(LOOKUP_LEAD),
            store_release: Script::new(STORE_RELEASE),
            renew: Script::new(RENEW),
            release: Script::new(RELEASE),
        }
    }

    /// How long a follower waits for the next entry before it checks that
    /// the leader is still alive.
    /// The Redis connection the live streams use.
    pub fn link(&self) -> &Arc<RedisLink> {
        &self.link
    }

    pub fn block(&self) -> Duration {
        (self.config.lease / 3).max(Duration::from_millis(100))
    }

    /// Becomes the leader of `cache_key` as `turn_id`, or learns whom to
    /// follow.
    pub async fn lead(&self, cache_key: &str, turn_id: &str) -> Lead {
        let lease = self.config.lease.as_millis().to_string();
        let lock = lock_key(cache_key);
        let holder: Option<Option<String>> = self
            .link
            .script(&self.lead, &[&lock], &[turn_id, &lease], self.timeout)
            .await;
        match holder {
            None => Lead::Alone,
            Some(Some(h)) if h == turn_id => Lead::Leader,
            Some(Some(h)) => Lead::Follow(h),
            // The lease ran out between SET and GET: nobody leads; we do not
            // wait for a second round trip to find out.
            Some(None) => Lead::Alone,
        }
    }

    /// Looks `cache_key` up in the cache entry `entry_key` (the Redis
    /// cache's key for it, in the same slot) and, on a miss, becomes its
    /// leader as `turn_id` or learns whom to follow: one round trip where
    /// [`Live::lead`] after a `GET` takes two. `None` when Redis is not
    /// answering (the caller then calls the model alone, as a miss).
    pub async fn lookup_or_lead(
        &self,
        entry_key: &str,
        cache_key: &str,
        turn_id: &str,
    ) -> Option<Looked> {
        let lease = self.config.lease.as_millis().to_string();
        let lock = lock_key(cache_key);
        let (hit, v): (i64, String) = self
            .link
            .script(
                &self.lookup_lead,
                &[entry_key, &lock],
                &[turn_id, &lease],
                self.timeout,
            )
            .await?;
        Some(match (hit, v) {
            (1, entry) => Looked::Cached(entry),
            (_, h) if h == turn_id => Looked::Missed(Lead::Leader),
            (_, h) if h.is_empty() => Looked::Missed(Lead::Alone),
            (_, h) => Looked::Missed(Lead::Follow(h)),
        })
    }

    /// Stores `entry` (a cache entry as JSON) under the Redis cache's
    /// `entry_key` for `ttl` and
    /// gives up the lease on `cache_key` if `turn_id` holds it, in one
    /// script; false when Redis did not answer (the lease then runs out).
    pub async fn store_and_release(
        &self,
        entry_key: &str,
        entry: &str,
        ttl: Duration,
        cache_key: &str,
        turn_id: &str,
    ) -> bool {
        let ttl = ttl.as_secs().max(1).to_string();
        let lock = lock_key(cache_key);
        self.link
            .script::<i64>(
                &self.store_release,
                &[entry_key, &lock],
                &[entry, &ttl, turn_id],
                self.timeout,
            )
            .await
            .is_some()
    }

    /// Gives up the lease on `cache_key` if `turn_id` holds it.
    pub async fn release(&self, cache_key: &str, turn_id: &str) {
        let lock = lock_key(cache_key);
        let _: Option<i64> = self
            .link
            .script(&self.release, &[&lock], &[turn_id], self.timeout)
            .await;
    }

    /// Who holds the lease on `cache_key` now; `Err` when Redis is away.
    pub async fn holder(&self, cache_key: &str) -> Result<Option<String>, LiveError> {
        let mut pipe = redis::pipe();
        pipe.get(lock_key(cache_key));
        let (h,): (Option<String>,) = self
            .link
            .pipe(&pipe, self.timeout)
            .await
            .ok_or(LiveError::Unavailable)?;
        Ok(h)
    }

    /// Who may resume the stream of `turn_id` (`None`: no such stream).
    pub async fn owner(&self, turn_id: &str) -> Result<Option<String>, LiveError> {
        let mut pipe = redis::pipe();
        pipe.get(owner_key(turn_id));
        let (o,): (Option<String>,) = self
            .link
            .pipe(&pipe, self.timeout)
            .await
            .ok_or(LiveError::Unavailable)?;
        Ok(o)
    }

    /// Starts teeing the events of `turn_id` into its stream. `lock`: the
    /// cache key whose lease this answer renews while it holds it.
    pub fn tee(self: &Arc<Self>, turn_id: &str, owner: &str, lock: Option<String>) -> Tee {
        // Unbounded (`push`): a slow Redis never holds the relay.
        let (queue, rx) = crate::pipe::pipe(1);
        let live = self.clone();
        let turn_id = turn_id.to_owned();
        let owner = owner.to_owned();
        let task = tokio::runtime::Handle::try_current()
            .ok()
            .map(|h| h.spawn(async move { live.run_tee(turn_id, owner, lock, rx).await }));
        Tee {
            queue: Some(queue),
            task,
        }
    }

    async fn run_tee(
        self: Arc<Self>,
        turn_id: String,
        owner: String,
        lock: Option<String>,
        queue: crate::pipe::Receiver<tee::Queued>,
    ) {
        let stream = stream_key(&turn_id);
        let retention = self.config.retention.as_secs().max(1);
        let lease_ms = self.config.lease.as_millis().to_string();
        let lock = lock.map(|k| lock_key(&k));
        let renew_every = self.block();
        let mut ended = false;
        // The first renewal is due one period after the lease was taken.
        let mut renew_at = tokio::time::Instant::now() + renew_every;
        let mut batch = Vec::new();
        while !ended {
            batch.clear();
            // Wake for the next events, or (holding a lease) to renew it.
            let renewing = lock.is_some();
            tokio::select! {
                more = queue.recv_all(&mut batch) => ended = !more,
                _ = tokio::time::sleep_until(renew_at), if renewing => {}
            }
            if !ended && !batch.is_empty() && !batch.iter().any(|e| e.is_terminal()) {
                // The rest of a burst joins this write.
                queue.gather(&mut batch).await;
            }
            let terminal = batch.iter().find(|e| e.is_terminal()).map(|e| e.event);
            if !batch.is_empty() {
                let mut pipe = redis::pipe();
                // One entry per batch (up to `EVENTS_PER_ENTRY` events),
                // its events' fields one after another: `i e d i e d ...`
                // (a stream entry keeps its fields in order, repeated
                // names included). One XADD instead of one per event.
                for events in batch.chunks(EVENTS_PER_ENTRY) {
                    let mut xadd = redis::cmd("XADD");
                    xadd.arg(&stream).arg("*");
                    for e in events {
                        xadd.arg("i")
                            .arg(e.seq)
                            .arg("e")
                            .arg(e.event)
                            .arg("d")
                            .arg(&e.data[..]);
                    }
                    pipe.add_command(xadd).ignore();
                }
                // The owner lives exactly as long as the stream: both are
                // refreshed with every batch, so a long answer stays
                // resumable while it streams.
                pipe.expire(&stream, retention as i64).ignore();
                pipe.set_ex(owner_key(&turn_id), &owner, retention).ignore();
                // A slow Redis delays only this task, never the client. A
                // batch that is not written leaves a gap in the event ids,
                // which readers detect (see [`Reader`]).
                let limit = self.timeout.max(Duration::from_millis(250));
                // Boxed, as are the scripts below: inline, the Redis
                // call's state would size this task (one per open answer)
                // at over a kilobyte while it waits for the next event.
                let written = Box::pin(self.link.pipe::<()>(&pipe, limit)).await;
                if written.is_none() {
                    tracing::warn!(turn_id = %turn_id, events = batch.len(), "live stream entries not written");
                }
            }
            if let Some(lock) = &lock {
                match terminal {
                    // Failures are not shared with later requests. A done
                    // answer's lease is given up by the relay once the
                    // cache has it ([`Live::release`]).
                    Some("error" | "abort" | "gone") => {
                        let _: Option<i64> = Box::pin(self.link.script(
                            &self.release,
                            &[lock],
                            &[&turn_id],
                            self.timeout,
                        ))
                        .await;
                    }
                    Some(_) => {}
                    None if tokio::time::Instant::now() >= renew_at => {
                        let _: Option<i64> = Box::pin(self.link.script(
                            &self.renew,
                            &[lock],
                            &[&turn_id, &lease_ms],
                            self.timeout,
                        ))
                        .await;
                        renew_at = tokio::time::Instant::now() + renew_every;
                    }
                    None => {}
                }
            }
            if terminal.is_some() {
                ended = true;
            }
        }
    }

    /// A reader of the stream of `turn_id` from its start, on a connection
    /// of its own (reads block).
    pub async fn reader(&self, turn_id: &str) -> Result<Reader, LiveError> {
        let block = self.block();
        let conn = self
            .link
            .dedicated(block)
            .await
            .ok_or(LiveError::Unavailable)?;
        Ok(Reader {
            conn,
            key: stream_key(turn_id),
            last: "0-0".into(),
            block,
            pending: VecDeque::new(),
            expect: 1,
        })
    }
}
