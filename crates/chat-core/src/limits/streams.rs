//! Concurrent answer streams per user (`MAX_STREAMS_PER_USER`): a slot is
//! taken before the answer starts and given back when it ends, on every
//! exit path ([`Slot`] gives itself back when dropped).
//!
//! Slots are shared by the fleet in Redis (a sorted set scored by expiry,
//! one script) or, without Redis, in the table (a string set, see
//! [`super::table`]), else kept per instance. Every slot carries an
//! expiry (the longest an answer may take, plus a margin), so an
//! environment that dies mid-stream holds its slot only until then.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::Script;

use super::table::TableCounters;
use crate::redis::{RedisLink, tag};
use crate::util::now_ms;

/// KEYS: the user's slot set. ARGV: now ms, this slot's expiry ms, max,
/// id, lease ms. Drops expired slots, refuses at `max`, else adds.
pub(super) const TAKE_LUA: &str = r"
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
local open = redis.call('ZCARD', KEYS[1])
if open >= tonumber(ARGV[3]) then return {0, open} end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return {1, open + 1}
";

/// Refused: the user has this many answers streaming.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamsFull {
    pub open: u32,
    pub max: u32,
    /// `fleet` or `local`.
    pub scope: &'static str,
}

/// Where slots are kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kept {
    Redis,
    Table,
    Local,
}

pub struct StreamSlots {
    redis: Option<Arc<RedisLink>>,
    table: Option<Arc<TableCounters>>,
    max: u32,
    lease: Duration,
    /// Per caller: slot id and expiry (ms).
    local: Mutex<HashMap<String, Vec<(String, u64)>>>,
    take: Script,
}

impl StreamSlots {
    /// `max` 0 turns the limit off. `lease`: how long a slot may be held.
    pub fn new(
        redis: Option<Arc<RedisLink>>,
        table: Option<Arc<TableCounters>>,
        max: u32,
        lease: Duration,
    ) -> Self {
        let table = if redis.is_some() { None } else { table };
        Self {
            redis,
            table,
            max,
            lease,
            local: Mutex::new(HashMap::new()),
            take: Script::new(TAKE_LUA),
        }
    }

    pub fn max(&self) -> u32 {
        self.max
    }

    /// Takes a slot for answer `id` of `caller`; `Ok(None)` when the limit
    /// is off.
    pub async fn take(
        self: &Arc<Self>,
        caller: &str,
        id: &str,
    ) -> Result<Option<Slot>, StreamsFull> {
        if self.max == 0 {
            return Ok(None);
        }
        let now = now_ms();
        let expires = now + self.lease.as_millis() as u64;
        let slot = |kept| Slot {
            slots: self.clone(),
            caller: caller.to_owned(),
            id: id.to_owned(),
            expires_ms: expires,
            kept,
            given: false,
        };
        let full = |open: u32, scope| StreamsFull {
            open,
            max: self.max,
            scope,
        };
        if let Some((r, take)) = self.redis_take(caller, id) {
            let args: Vec<&str> = take.args.iter().map(String::as_str).collect();
            let taken = r
                .script::<(i64, i64)>(&self.take, &[&take.key], &args, r.timeout())
                .await;
            if let Some(t) = taken {
                return self.taken(caller, id, &take, t).map(Some);
            }
        } else if let Some(t) = &self.table {
            let taken = t
                .take_slot(caller, id, self.max, now / 1000, expires / 1000)
                .await;
            match taken {
                Some(Ok(())) => return Ok(Some(slot(Kept::Table))),
                Some(Err(open)) => return Err(full(open, "fleet")),
                None => {}
            }
        }
        let mut m = self.local.lock().unwrap_or_else(|p| p.into_inner());
        let mine = m.entry(caller.to_owned()).or_default();
        mine.retain(|(_, until)| *until > now);
        if mine.len() >= self.max as usize {
            return Err(full(mine.len() as u32, "local"));
        }
        mine.push((id.to_owned(), expires));
        Ok(Some(slot(Kept::Local)))
    }

    /// The Redis script's key and arguments for taking a slot of `caller`
    /// as `id` (see [`TAKE_LUA`]); `None` without Redis or with the limit off.
    pub(super) fn redis_take(
        &self,
        caller: &str,
        id: &str,
    ) -> Option<(&Arc<RedisLink>, RedisTake)> {
        let r = self.redis.as_ref()?;
        if self.max == 0 {
            return None;
        }
        let now = now_ms();
        let expires = now + self.lease.as_millis() as u64;
        Some((
            r,
            RedisTake {
                key: format!("streams:{{{}}}", tag(caller)),
                args: [
                    now.to_string(),
                    expires.to_string(),
                    self.max.to_string(),
                    id.to_owned(),
                    self.lease.as_millis().to_string(),
                ],
                expires,
            },
        ))
    }

    /// A take the script answered: `(1, open)` taken, `(0, open)` full.
    pub(super) fn taken(
        self: &Arc<Self>,
        caller: &str,
        id: &str,
        take: &RedisTake,
        (ok, open): (i64, i64),
    ) -> Result<Slot, StreamsFull> {
        if ok == 1 {
            Ok(Slot {
                slots: self.clone(),
                caller: caller.to_owned(),
                id: id.to_owned(),
                expires_ms: take.expires,
                kept: Kept::Redis,
                given: false,
            })
        } else {
            Err(StreamsFull {
                open: open.clamp(0, i64::from(u32::MAX)) as u32,
                max: self.max,
                scope: "fleet",
            })
        }
    }

    async fn give(&self, caller: &str, id: &str, expires_ms: u64, kept: Kept) {
        match kept {
            Kept::Redis => {
                if let Some(r) = &self.redis {
                    let key = format!("streams:{{{}}}", tag(caller));
                    let mut p = redis::pipe();
                    p.cmd("ZREM").arg(key).arg(id);
                    let _ = r.pipe::<(i64,)>(&p, r.timeout()).await;
                }
            }
            Kept::Table => {
                if let Some(t) = &self.table {
                    t.give_slot(caller, id, expires_ms / 1000).await;
                }
            }
            Kept::Local => self.give_local(caller, id),
        }
    }

    fn give_local(&self, caller: &str, id: &str) {
        let mut m = self.local.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(mine) = m.get_mut(caller) {
            mine.retain(|(i, _)| i != id);
            if mine.is_empty() {
                m.remove(caller);
            }
        }
    }
}

/// One take in Redis: the script's key and arguments, and the slot's expiry.
pub(super) struct RedisTake {
    pub key: String,
    pub args: [String; 5],
    expires: u64,
}

/// One answer's slot; given back when dropped (locally at once, in Redis
/// or the table on a task).
pub struct Slot {
    slots: Arc<StreamSlots>,
    caller: String,
    id: String,
    expires_ms: u64,
    kept: Kept,
    given: bool,
}

impl Slot {
    /// The Redis link of a slot held there (not yet given back).
    pub(super) fn fleet_link(&self) -> Option<&Arc<RedisLink>> {
        self.slots
            .redis
            .as_ref()
            .filter(|_| self.kept == Kept::Redis && !self.given)
    }

    /// The Redis link, key and member of a slot held in Redis; marks it
    /// given (the caller removes it).
    pub(super) fn take_fleet(&mut self) -> Option<(Arc<RedisLink>, String, String)> {
        if self.kept != Kept::Redis || self.given {
            return None;
        }
        let r = self.slots.redis.clone()?;
        self.given = true;
        Some((
            r,
            format!("streams:{{{}}}", tag(&self.caller)),
            std::mem::take(&mut self.id),
        ))
    }

    /// Gives the slot back now (an answer that ended).
    pub async fn give_back(mut self) {
        self.given = true;
        self.slots
            .give(&self.caller, &self.id, self.expires_ms, self.kept)
            .await;
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.given {
            return;
        }
        self.given = true;
        if self.kept == Kept::Local {
            self.slots.give_local(&self.caller, &self.id);
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let slots = self.slots.clone();
            let caller = std::mem::take(&mut self.caller);
            let id = std::mem::take(&mut self.id);
            let (expires, kept) = (self.expires_ms, self.kept);
            rt.spawn(async move { slots.give(&caller, &id, expires, kept).await });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn local_slots_are_given_back_on_drop_and_expire() {
        let s = Arc::new(StreamSlots::new(None, None, 2, Duration::from_secs(60)));
        let a = s.take("u", "a").await.unwrap();
        let _b = s.take("u", "b").await.unwrap();
        let full = s.take("u", "c").await.err().unwrap();
        assert_eq!((full.open, full.max, full.scope), (2, 2, "local"));
        assert!(s.take("v", "c").await.is_ok(), "another user has their own");
        drop(a);
        assert!(s.take("u", "c").await.is_ok());
        // A slot whose holder died expires with its lease.
        let short = Arc::new(StreamSlots::new(None, None, 1, Duration::from_millis(0)));
        std::mem::forget(short.take("u", "a").await.unwrap());
        assert!(short.take("u", "b").await.is_ok());
        let off = Arc::new(StreamSlots::new(None, None, 0, Duration::from_secs(1)));
        assert!(off.take("u", "a").await.unwrap().is_none());
    }
}
