//! Live answer streams in Redis: what makes answers resumable and lets
//! identical in-flight requests share one model call.
//!
//! Every streamed answer is teed, off the hot path, into a Redis Stream
//! `live:{turn_id}`: one entry per SSE event the client was sent, with its
//! `id`, event name and data, kept for `RESUME_RETENTION_SECS`. The stream's
//! owner (`user:ID`) sits next to it in `live:{turn_id}:owner`.
//!
//! - **Resume**: `GET /chat/streams/{turn_id}` with `Last-Event-ID: N`
//!   replays the events after N from the stream, then follows it live until
//!   `done` or `error`. No model call.
//! - **Coalescing**: a cacheable request that misses the cache tries to
//!   become the *leader* of its cache key: `SET lead:{key} turn_id NX PX
//!   lease`. The winner calls the model and keeps the lease alive while it
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

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use redis::Script;
use tokio::sync::mpsc;

use crate::error::UpstreamError;
use crate::fleet::{RedisLink, tag};
use crate::provider::{Chunk, ChunkStream};
use futures_util::StreamExt;
use futures_util::future::BoxFuture;

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
    #[error("live streams are unavailable (redis)")]
    Unavailable,
}

/// `SET lock turn NX PX lease`, or who holds it: one round trip.
const LEAD: &str = r"
local ok = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
if ok then return ARGV[1] end
return redis.call('GET', KEYS[1])
";

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
    renew: Script,
    release: Script,
}

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
            renew: Script::new(RENEW),
            release: Script::new(RELEASE),
        }
    }

    /// How long a follower waits for the next entry before it checks that
    /// the leader is still alive.
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
        let (tx, rx) = mpsc::unbounded_channel();
        let live = self.clone();
        let turn_id = turn_id.to_owned();
        let owner = owner.to_owned();
        let task = tokio::runtime::Handle::try_current()
            .ok()
            .map(|h| h.spawn(async move { live.run_tee(turn_id, owner, lock, rx).await }));
        Tee { tx: Some(tx), task }
    }

    async fn run_tee(
        self: Arc<Self>,
        turn_id: String,
        owner: String,
        lock: Option<String>,
        mut rx: mpsc::UnboundedReceiver<Entry>,
    ) {
        let stream = stream_key(&turn_id);
        let retention = self.config.retention.as_secs().max(1);
        let lease_ms = self.config.lease.as_millis().to_string();
        let lock = lock.map(|k| lock_key(&k));
        let renew_every = self.block();
        let mut first = true;
        let mut ended = false;
        // The first renewal is due one period after the lease was taken.
        let mut renew_at = tokio::time::Instant::now() + renew_every;
        while !ended {
            let mut batch = Vec::new();
            // Wake for the next event, or (holding a lease) to renew it.
            let renewing = lock.is_some();
            tokio::select! {
                got = rx.recv() => match got {
                    Some(e) => batch.push(e),
                    None => ended = true,
                },
                _ = tokio::time::sleep_until(renew_at), if renewing => {}
            }
            while let Ok(e) = rx.try_recv() {
                batch.push(e);
            }
            let terminal = batch
                .iter()
                .find(|e| e.is_terminal())
                .map(|e| e.event.clone());
            if !batch.is_empty() {
                let mut pipe = redis::pipe();
                for e in &batch {
                    pipe.cmd("XADD")
                        .arg(&stream)
                        .arg("*")
                        .arg("i")
                        .arg(e.seq)
                        .arg("e")
                        .arg(&e.event)
                        .arg("d")
                        .arg(&e.data)
                        .ignore();
                }
                pipe.expire(&stream, retention as i64).ignore();
                if first {
                    pipe.set_ex(owner_key(&turn_id), &owner, retention).ignore();
                    first = false;
                }
                // A slow Redis delays only this task, never the client.
                if self
                    .link
                    .pipe::<()>(&pipe, self.timeout.max(Duration::from_millis(250)))
                    .await
                    .is_none()
                {
                    tracing::debug!(turn_id = %turn_id, "live stream entries not written");
                }
            }
            if let Some(lock) = &lock {
                match terminal.as_deref() {
                    // Failures are not shared with later requests. A done
                    // answer's lease is given up by the relay once the
                    // cache has it ([`Live::release`]).
                    Some("error" | "abort" | "gone") => {
                        let _: Option<i64> = self
                            .link
                            .script(&self.release, &[lock], &[&turn_id], self.timeout)
                            .await;
                    }
                    Some(_) => {}
                    None if tokio::time::Instant::now() >= renew_at => {
                        let _: Option<i64> = self
                            .link
                            .script(&self.renew, &[lock], &[&turn_id, &lease_ms], self.timeout)
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
        })
    }
}

/// The sending half of a stream's tee; dropping it ends the tee.
pub struct Tee {
    tx: Option<mpsc::UnboundedSender<Entry>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Tee {
    /// Queues one event (never blocks, never fails the answer).
    pub fn send(&self, seq: u64, event: &str, data: &str) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Entry {
                seq,
                event: event.to_owned(),
                data: data.to_owned(),
            });
        }
    }

    /// Ends the tee and waits until everything queued is in Redis.
    pub async fn flush(&mut self) {
        self.tx = None;
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

/// Reads a stream's entries in order, blocking up to a period for new ones.
pub struct Reader {
    conn: redis::aio::MultiplexedConnection,
    key: String,
    last: String,
    block: Duration,
    pending: VecDeque<Entry>,
}

impl Reader {
    /// The next entry; `Ok(None)` when none arrived within the block
    /// period.
    pub async fn next(&mut self) -> Result<Option<Entry>, LiveError> {
        if let Some(e) = self.pending.pop_front() {
            return Ok(Some(e));
        }
        let reply: redis::Value = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(256)
            .arg("BLOCK")
            .arg(self.block.as_millis() as u64)
            .arg("STREAMS")
            .arg(&self.key)
            .arg(&self.last)
            .query_async(&mut self.conn)
            .await
            .map_err(|_| LiveError::Unavailable)?;
        for (id, entry) in parse_xread(reply) {
            self.last = id;
            self.pending.push_back(entry);
        }
        Ok(self.pending.pop_front())
    }
}

/// `[[key, [[id, [field, value, ...]], ...]]]` (RESP2) or a map (RESP3)
/// into `(id, entry)` pairs; malformed entries are skipped.
fn parse_xread(reply: redis::Value) -> Vec<(String, Entry)> {
    use redis::Value;
    let streams: Vec<Value> = match reply {
        Value::Array(a) => a
            .into_iter()
            .filter_map(|s| match s {
                Value::Array(mut kv) if kv.len() == 2 => kv.pop(),
                _ => None,
            })
            .collect(),
        Value::Map(m) => m.into_iter().map(|(_, v)| v).collect(),
        _ => Vec::new(),
    };
    let text = |v: &Value| -> Option<String> {
        match v {
            Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
            Value::SimpleString(s) => Some(s.clone()),
            _ => None,
        }
    };
    let mut out = Vec::new();
    for entries in streams {
        let Value::Array(entries) = entries else {
            continue;
        };
        for e in entries {
            let Value::Array(parts) = e else { continue };
            let [id, Value::Array(fields)] = parts.as_slice() else {
                continue;
            };
            let Some(id) = text(id) else { continue };
            let (mut seq, mut event, mut data) = (None, None, None);
            for pair in fields.chunks(2) {
                let [k, v] = pair else { continue };
                match text(k).as_deref() {
                    Some("i") => seq = text(v).and_then(|s| s.parse::<u64>().ok()),
                    Some("e") => event = text(v),
                    Some("d") => data = text(v),
                    _ => {}
                }
            }
            if let (Some(seq), Some(event), Some(data)) = (seq, event, data) {
                out.push((id, Entry { seq, event, data }));
            }
        }
    }
    out
}

/// Calls the model for a follower whose leader is gone.
pub type Takeover =
    Arc<dyn Fn() -> BoxFuture<'static, Result<ChunkStream, UpstreamError>> + Send + Sync>;

/// How following a leader began.
pub enum FollowOpen {
    /// The leader's answer has started: its model and first text.
    Following {
        follower: Box<Follower>,
        model: String,
        first: Chunk,
    },
    /// The leader failed before its answer started: the same error, as
    /// HTTP status and JSON body.
    Aborted { status: u16, body: String },
    /// The leader went away before its answer started, and this request
    /// now holds the lease: call the model as the leader.
    Lead,
    /// Redis stopped answering: call the model alone.
    Alone,
}

/// A follower of another request's answer: yields that answer as
/// [`Chunk`]s, so the relay treats it like a model stream. When the leader
/// dies it takes over (see the module docs), skipping the text already
/// yielded.
pub struct Follower {
    live: Arc<Live>,
    cache_key: String,
    own_turn: String,
    leader: String,
    reader: Option<Reader>,
    own: Option<ChunkStream>,
    takeover: Takeover,
    /// Bytes of text yielded so far.
    sent: usize,
    /// Bytes of the current source's text still to drop (already sent).
    skip: usize,
    queued: VecDeque<Chunk>,
    takeovers: u32,
    /// Set once this follower calls the model itself: its answer is then
    /// its own, and worth caching.
    called_model: Arc<std::sync::atomic::AtomicBool>,
}

impl Follower {
    /// Follows `leader` until its first text (or its end).
    pub async fn open(
        live: Arc<Live>,
        cache_key: String,
        own_turn: String,
        leader: String,
        takeover: Takeover,
    ) -> FollowOpen {
        let Ok(reader) = live.reader(&leader).await else {
            return FollowOpen::Alone;
        };
        let mut f = Follower {
            live,
            cache_key,
            own_turn,
            leader,
            reader: Some(reader),
            own: None,
            takeover,
            sent: 0,
            skip: 0,
            queued: VecDeque::new(),
            takeovers: 0,
            called_model: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        };
        let mut model = String::new();
        loop {
            let Some(reader) = f.reader.as_mut() else {
                return FollowOpen::Alone;
            };
            let check = match reader.next().await {
                Ok(Some(e)) => match e.event.as_str() {
                    "meta" => {
                        let v: serde_json::Value =
                            serde_json::from_str(&e.data).unwrap_or_default();
                        model = v["model"].as_str().unwrap_or_default().to_owned();
                        continue;
                    }
                    "abort" => {
                        let v: serde_json::Value =
                            serde_json::from_str(&e.data).unwrap_or_default();
                        return FollowOpen::Aborted {
                            status: v["status"].as_u64().unwrap_or(502) as u16,
                            body: v["body"].as_str().unwrap_or("{}").to_owned(),
                        };
                    }
                    "error" => {
                        return FollowOpen::Aborted {
                            status: 502,
                            body: e.data,
                        };
                    }
                    "gone" => f.check_leader(true).await,
                    _ => {
                        if let Some(first) = f.chunk_of(e) {
                            return FollowOpen::Following {
                                follower: Box::new(f),
                                model,
                                first,
                            };
                        }
                        // No text yet (an empty delta): keep reading.
                        continue;
                    }
                },
                // Nothing new for a period: is the leader alive?
                Ok(None) => f.check_leader(false).await,
                Err(_) => Check::Alone,
            };
            match check {
                Check::Alive => {}
                Check::Follow(h) => f.switch_to(h).await,
                Check::Lead => return FollowOpen::Lead,
                Check::Alone => return FollowOpen::Alone,
            }
        }
    }

    /// The chunk an entry of the leader's stream stands for (`None` for
    /// meta and empty text; `gone` is handled by the caller).
    fn chunk_of(&mut self, e: Entry) -> Option<Chunk> {
        let v: serde_json::Value = serde_json::from_str(&e.data).unwrap_or_default();
        match e.event.as_str() {
            "delta" => {
                let text = v["text"].as_str().unwrap_or_default();
                self.fresh_text(text).map(Chunk::Delta)
            }
            "done" => {
                self.queued.push_back(Chunk::End);
                Some(Chunk::Stop {
                    stop_reason: v["stop_reason"].as_str().map(str::to_owned),
                    // The leader paid for the answer; a follower uses none.
                    input_tokens: Some(0),
                    output_tokens: Some(0),
                })
            }
            _ => None,
        }
    }

    /// The part of `text` this follower's client does not have yet.
    fn fresh_text(&mut self, text: &str) -> Option<String> {
        let mut cut = self.skip.min(text.len());
        while !text.is_char_boundary(cut) {
            cut += 1;
        }
        self.skip -= cut.min(self.skip);
        let rest = &text[cut..];
        if rest.is_empty() {
            return None;
        }
        self.sent += rest.len();
        Some(rest.to_owned())
    }

    async fn check_leader(&mut self, gone: bool) -> Check {
        if !gone {
            match self.live.holder(&self.cache_key).await {
                Ok(Some(h)) if h == self.leader => return Check::Alive,
                Ok(Some(h)) if h != self.own_turn => return Check::Follow(h),
                Ok(_) => {}
                Err(_) => return Check::Alone,
            }
        }
        // The leader is gone: lead, or follow whoever leads now.
        self.takeovers += 1;
        if self.takeovers > 3 {
            return Check::Alone;
        }
        tracing::info!(leader = %self.leader, turn_id = %self.own_turn, "leader lost; taking over");
        match self.live.lead(&self.cache_key, &self.own_turn).await {
            Lead::Leader => Check::Lead,
            Lead::Follow(h) => Check::Follow(h),
            Lead::Alone => Check::Alone,
        }
    }

    async fn switch_to(&mut self, leader: String) {
        self.reader = self.live.reader(&leader).await.ok();
        self.leader = leader;
        self.skip = self.sent;
    }

    /// Calls the model ourselves, from where our client is.
    async fn call_model(&mut self) -> Result<(), UpstreamError> {
        self.reader = None;
        let stream = (self.takeover)().await?;
        self.own = Some(stream);
        self.called_model
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.skip = self.sent;
        Ok(())
    }

    async fn next_chunk(&mut self) -> Option<Result<Chunk, UpstreamError>> {
        loop {
            if let Some(c) = self.queued.pop_front() {
                return Some(Ok(c));
            }
            if let Some(own) = self.own.as_mut() {
                return match own.next().await {
                    Some(Ok(Chunk::Delta(t))) => match self.fresh_text(&t) {
                        Some(t) => Some(Ok(Chunk::Delta(t))),
                        None => continue,
                    },
                    other => other,
                };
            }
            let Some(reader) = self.reader.as_mut() else {
                if let Err(e) = self.call_model().await {
                    return Some(Err(e));
                }
                continue;
            };
            let step = match reader.next().await {
                Ok(Some(e)) if e.event == "gone" || e.event == "abort" => {
                    self.check_leader(true).await
                }
                Ok(Some(e)) if e.event == "error" => {
                    let v: serde_json::Value = serde_json::from_str(&e.data).unwrap_or_default();
                    return Some(Err(UpstreamError::StreamEvent {
                        kind: v["code"].as_str().unwrap_or("upstream_error").to_owned(),
                        message: v["message"].as_str().unwrap_or_default().to_owned(),
                    }));
                }
                Ok(Some(e)) => {
                    if let Some(c) = self.chunk_of(e) {
                        return Some(Ok(c));
                    }
                    continue;
                }
                Ok(None) => self.check_leader(false).await,
                Err(_) => Check::Alone,
            };
            match step {
                Check::Alive => {}
                Check::Follow(h) => self.switch_to(h).await,
                Check::Lead | Check::Alone => {
                    if let Err(e) = self.call_model().await {
                        return Some(Err(e));
                    }
                }
            }
        }
    }

    /// The follower as a model stream.
    /// Becomes true if this follower ends up calling the model itself.
    pub fn called_model(&self) -> Arc<std::sync::atomic::AtomicBool> {
        self.called_model.clone()
    }

    pub fn into_stream(self: Box<Self>) -> ChunkStream {
        futures_util::stream::unfold(*self, |mut f| async move {
            f.next_chunk().await.map(|c| (c, f))
        })
        .boxed()
    }
}

enum Check {
    Alive,
    Follow(String),
    Lead,
    Alone,
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::Value;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn xread_replies_become_entries_in_order() {
        let entry = |id: &str, seq: &str, ev: &str, d: &str| {
            Value::Array(vec![
                bulk(id),
                Value::Array(vec![
                    bulk("i"),
                    bulk(seq),
                    bulk("e"),
                    bulk(ev),
                    bulk("d"),
                    bulk(d),
                ]),
            ])
        };
        let reply = Value::Array(vec![Value::Array(vec![
            bulk("live:{t}"),
            Value::Array(vec![
                entry("1-0", "1", "meta", "{}"),
                entry("1-1", "2", "delta", "{\"text\":\"hi\"}"),
                // Missing field: skipped, not a panic.
                Value::Array(vec![bulk("1-2"), Value::Array(vec![bulk("i")])]),
                entry("1-3", "3", "done", "{}"),
            ]),
        ])]);
        let got = parse_xread(reply);
        let ids: Vec<&str> = got.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(ids, ["1-0", "1-1", "1-3"]);
        assert_eq!(got[1].1.data, "{\"text\":\"hi\"}");
        assert!(got[2].1.is_terminal() && !got[1].1.is_terminal());
        assert!(
            parse_xread(Value::Nil).is_empty(),
            "a timed-out read is empty"
        );
    }

    #[test]
    fn keys_share_a_slot_with_their_turn_or_cache_key() {
        assert_eq!(stream_key("t1"), "live:{t1}");
        assert_eq!(owner_key("t1"), "live:{t1}:owner");
        assert_eq!(lock_key("k{x}"), "lead:{k_x_}");
    }
}
